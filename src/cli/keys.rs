//! `pgenvelope keys …`: inspect the key store. Read-only: it never unwraps or prints a key,
//! wrapped or not.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;

use crate::config::{Config, Overrides};
use crate::crypto::OrgId;
use crate::keys::{DekRecord, KeyStore};

/// `pgenvelope keys` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum KeysCommand {
    /// List organisations' data keys: version, state, KEK, dates, encryption counts.
    List(ListArgs),
}

/// Flags of `pgenvelope keys list`.
#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    /// Only this organisation
    #[arg(long, value_name = "ORG")]
    pub org: Option<String>,

    /// One JSON object per line instead of a table
    #[arg(long)]
    pub json: bool,

    /// Upstream URL whose database holds the key store
    /// [default: postgres://postgres@127.0.0.1:5432/postgres]
    #[arg(long, env = "PGENVELOPE_UPSTREAM", value_name = "URL")]
    pub upstream: Option<String>,

    /// Schema of the key store [default: pgenvelope]
    #[arg(long, env = "PGENVELOPE_KEY_SCHEMA", value_name = "NAME")]
    pub key_schema: Option<String>,
}

impl KeysCommand {
    pub(crate) fn overrides(&self) -> Overrides {
        match self {
            Self::List(a) => Overrides {
                upstream: a.upstream.clone(),
                key_schema: a.key_schema.clone(),
                ..Overrides::default()
            },
        }
    }
}

/// Run a `keys` subcommand; returns the exit code.
pub(crate) fn run(config: &Config, cmd: &KeysCommand) -> anyhow::Result<i32> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cmd {
        KeysCommand::List(args) => runtime.block_on(list(config, args)),
    }
}

async fn list(config: &Config, args: &ListArgs) -> anyhow::Result<i32> {
    let org = match &args.org {
        Some(o) => Some(OrgId::new(o.clone()).map_err(|e| anyhow::anyhow!("--org: {e}"))?),
        None => None,
    };
    let store = KeyStore::new(config.upstream.service.clone(), &config.key_schema)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let records = tokio::time::timeout(config.connect_timeout, store.list(org.as_ref()))
        .await
        .map_err(|_| anyhow::anyhow!("the key store did not answer in time"))?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if args.json {
        for r in &records {
            println!("{}", json_line(r));
        }
        return Ok(0);
    }
    println!(
        "{:<24} {:>7} {:<13} {:<36} {:<28} {:<20} {:<20} {:>12}",
        "ORGANISATION", "VERSION", "STATE", "DEK", "KEK", "CREATED", "RETIRED", "ENCRYPTIONS"
    );
    for r in &records {
        println!(
            "{:<24} {:>7} {:<13} {:<36} {:<28} {:<20} {:<20} {:>12}",
            r.org_id.as_str(),
            r.version,
            r.state.as_str(),
            r.dek_id.to_string(),
            r.kek,
            timestamp(Some(r.created_at)),
            timestamp(r.retired_at),
            r.encryptions
        );
    }
    if records.is_empty() {
        println!("(no data keys)");
    }
    Ok(0)
}

fn json_line(r: &DekRecord) -> String {
    let esc = |s: &str| {
        let mut out = String::with_capacity(s.len() + 2);
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push(c),
            }
        }
        out
    };
    let opt = |t: Option<SystemTime>| match t {
        Some(_) => format!("\"{}\"", timestamp(t)),
        None => "null".to_owned(),
    };
    format!(
        "{{\"org\":\"{}\",\"version\":{},\"state\":\"{}\",\"dek\":\"{}\",\"kek\":\"{}\",\"created_at\":{},\"retired_at\":{},\"destroyed_at\":{},\"encryptions\":{}}}",
        esc(r.org_id.as_str()),
        r.version,
        r.state.as_str(),
        r.dek_id,
        esc(&r.kek),
        opt(Some(r.created_at)),
        opt(r.retired_at),
        opt(r.destroyed_at),
        r.encryptions
    )
}

/// UTC time as `YYYY-MM-DD HH:MM:SS`, or `-`.
fn timestamp(t: Option<SystemTime>) -> String {
    let Some(t) = t else {
        return "-".to_owned();
    };
    let secs = t
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02}:{s:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_dates() {
        assert_eq!(timestamp(Some(UNIX_EPOCH)), "1970-01-01 00:00:00");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        assert_eq!(timestamp(Some(t)), "2026-11-18 11:06:40");
        assert_eq!(timestamp(None), "-");
    }
}
