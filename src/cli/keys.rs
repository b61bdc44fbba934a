//! `pgenvelope keys …`: list, rotate, rewrap and shred data keys and search keys, and print
//! the audit trail.
//!
//! Every change runs while proxies serve traffic: it is one transaction in the key store
//! that records a `key_events` row (with `--reason`) and notifies every proxy, which evicts
//! the organisation's cached keys at once (see `keys::lifecycle`). Nothing here prints a key,
//! wrapped or not.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::sync::Arc;

use anyhow::Context;

use super::common::{open_keks, open_store, runtime, StoreArgs};
use crate::config::{Config, RawConfig};
use crate::crypto::OrgId;
use crate::keys::{
    DekRecord, KekProvider, KeyEvent, KeyStore, KmsUri, RewrapReport, SearchKeyRecord,
};

/// `pgenvelope keys` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum KeysCommand {
    /// List organisations' data keys and search keys: kind, version, state, KEK, dates,
    /// encryption counts.
    List(ListArgs),
    /// Give an organisation a new active data key; the previous one becomes decrypt-only.
    /// Proxies use the new key for writes within a second. Use the proxies' --kms. With
    /// --search-key, rotate its search key instead.
    Rotate(RotateArgs),
    /// Re-wrap every data key and search key under the current KEK (--kms), or under
    /// --to-kms; data rows are not touched. Batched, verified by unwrapping, resumable (rerun
    /// to finish).
    Rewrap(RewrapArgs),
    /// Destroy every data key and search key of an organisation: its encrypted values can
    /// never be decrypted again. Proxies evict the keys at once.
    Shred(ShredArgs),
    /// Print the key events (create, rotate, rewrap, shred, destroy, search_key_*), oldest
    /// first.
    Events(EventsArgs),
}

/// Flags of `pgenvelope keys rotate`.
#[derive(Debug, Clone, clap::Args)]
pub struct RotateArgs {
    /// The organisation
    #[arg(long, value_name = "ORG")]
    pub org: String,

    /// Rotate the organisation's search key (equality search) instead of its data key: a new
    /// search key becomes active, the previous one retired. Look-ups use the active search
    /// key only, so values written before are found again once `pgenvelope reencrypt` has
    /// rewritten them
    #[arg(long)]
    pub search_key: bool,

    #[command(flatten)]
    pub(crate) store: StoreArgs,
}

/// Flags of `pgenvelope keys rewrap`.
#[derive(Debug, Clone, clap::Args)]
pub struct RewrapArgs {
    /// KEK to re-wrap under [default: --kms]. Give the KEKs that wrapped the keys now as
    /// --kms and --kms-also
    #[arg(long, value_name = "URI")]
    pub to_kms: Option<String>,

    /// Data keys per transaction
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub batch: usize,

    #[command(flatten)]
    pub(crate) store: StoreArgs,
}

/// Flags of `pgenvelope keys shred`.
#[derive(Debug, Clone, clap::Args)]
pub struct ShredArgs {
    /// The organisation
    #[arg(long, value_name = "ORG")]
    pub org: String,

    /// Confirm: the organisation's encrypted data becomes unrecoverable
    #[arg(long)]
    pub yes: bool,

    #[command(flatten)]
    pub(crate) store: StoreArgs,
}

/// Flags of `pgenvelope keys events`.
#[derive(Debug, Clone, clap::Args)]
pub struct EventsArgs {
    /// Only this organisation
    #[arg(long, value_name = "ORG")]
    pub org: Option<String>,

    /// At most this many of the most recent events
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub limit: i64,

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
    /// The settings these flags give (the rest come from the file and the defaults).
    pub(crate) fn overlay(&self) -> RawConfig {
        match self {
            Self::List(a) => RawConfig {
                upstream: a.upstream.clone(),
                key_schema: a.key_schema.clone(),
                ..RawConfig::default()
            },
            Self::Events(a) => RawConfig {
                upstream: a.upstream.clone(),
                key_schema: a.key_schema.clone(),
                ..RawConfig::default()
            },
            Self::Rotate(a) => a.store.overlay(),
            Self::Rewrap(a) => a.store.overlay(),
            Self::Shred(a) => a.store.overlay(),
        }
    }
}

/// Run a `keys` subcommand; returns the exit code.
pub(crate) fn run(config: &Config, cmd: &KeysCommand) -> anyhow::Result<i32> {
    let runtime = runtime()?;
    match cmd {
        KeysCommand::List(args) => runtime.block_on(list(config, args)),
        KeysCommand::Rotate(args) => runtime.block_on(rotate(config, args)),
        KeysCommand::Rewrap(args) => runtime.block_on(rewrap(config, args)),
        KeysCommand::Shred(args) => runtime.block_on(shred(config, args)),
        KeysCommand::Events(args) => runtime.block_on(events(config, args)),
    }
}

fn org_flag(org: &str) -> anyhow::Result<OrgId> {
    OrgId::new(org).map_err(|e| anyhow::anyhow!("--org: {e}"))
}

async fn rotate(config: &Config, args: &RotateArgs) -> anyhow::Result<i32> {
    let org = org_flag(&args.org)?;
    let store = open_store(config).await?;
    let (kek, _) = open_keks(config).await?;
    if args.search_key {
        let rotation = store
            .rotate_search_key(&org, &*kek, args.store.reason.as_deref())
            .await
            .map_err(|e| anyhow::anyhow!("rotating the search key of {org}: {e}"))?;
        let active = &rotation.active;
        match &rotation.retired {
            Some(old) => println!(
                "{org}: search key version {} ({}) is active; version {} ({}) is now retired. \
                 Values written under it are found by equality look-ups again once \
                 `pgenvelope reencrypt` has rewritten them",
                active.version, active.key_id, old.version, old.key_id
            ),
            None => println!(
                "{org}: search key version {} ({}) is active; there was no active search key \
                 before",
                active.version, active.key_id
            ),
        }
        return Ok(0);
    }
    let rotation = store
        .rotate(&org, &*kek, None, args.store.reason.as_deref())
        .await
        .map_err(|e| anyhow::anyhow!("rotating the data key of {org}: {e}"))?
        .context("rotation did not happen")?;
    match &rotation.retired {
        Some(old) => println!(
            "{org}: version {} ({}) is active; version {} ({}) is now decrypt-only",
            rotation.active.version, rotation.active.dek_id, old.version, old.dek_id
        ),
        None => println!(
            "{org}: version {} ({}) is active; there was no active key before",
            rotation.active.version, rotation.active.dek_id
        ),
    }
    Ok(0)
}

async fn rewrap(config: &Config, args: &RewrapArgs) -> anyhow::Result<i32> {
    let store = open_store(config).await?;
    let (kek, also) = open_keks(config).await?;
    let to: Arc<dyn KekProvider> = match &args.to_kms {
        Some(uri) => {
            let uri: KmsUri = uri.parse().map_err(|e| anyhow::anyhow!("--to-kms: {e}"))?;
            uri.open()
                .await
                .with_context(|| format!("opening the target KEK provider {uri}"))?
        }
        None => Arc::clone(&kek),
    };
    let mut from = vec![kek];
    from.extend(also);
    from.push(Arc::clone(&to));
    let report = store
        .rewrap(
            &from,
            &*to,
            args.batch,
            args.store.reason.as_deref(),
            |r: &RewrapReport| {
                eprintln!(
                    "rewrap: {} re-wrapped, {} skipped so far",
                    r.rewrapped,
                    r.skipped.len()
                );
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("re-wrapping data keys: {e}"))?;
    println!(
        "re-wrapped {} data key(s) and {} search key(s) under {} ({} by the KMS without \
         leaving it); {} already were",
        report.rewrapped - report.search_keys,
        report.search_keys,
        to.kek_id(),
        report.by_kms,
        report.already
    );
    for (dek, why) in &report.skipped {
        println!("not re-wrapped: {dek}: {why}");
    }
    Ok(if report.skipped.is_empty() { 0 } else { 1 })
}

async fn shred(config: &Config, args: &ShredArgs) -> anyhow::Result<i32> {
    let org = org_flag(&args.org)?;
    if !args.yes {
        eprintln!(
            "pgenvelope keys shred destroys every data key and search key of {org}: its \
             encrypted values can never be decrypted again. Add --yes to do it."
        );
        return Ok(2);
    }
    let store = open_store(config).await?;
    let shredded = store
        .shred(&org, args.store.reason.as_deref())
        .await
        .map_err(|e| anyhow::anyhow!("shredding {org}: {e}"))?;
    let destroyed = &shredded.deks;
    if destroyed.is_empty() {
        println!("{org}: no live data keys; nothing destroyed (recorded in key_events)");
    } else {
        for r in destroyed {
            println!("{org}: destroyed version {} ({})", r.version, r.dek_id);
        }
        println!(
            "{org}: {} data key(s) destroyed; its encrypted values are unrecoverable",
            destroyed.len()
        );
    }
    for k in &shredded.search_keys {
        println!(
            "{org}: destroyed search key version {} ({})",
            k.version, k.key_id
        );
    }
    if !shredded.search_keys.is_empty() {
        println!(
            "{org}: {} search key(s) destroyed",
            shredded.search_keys.len()
        );
    }
    Ok(0)
}

async fn events(config: &Config, args: &EventsArgs) -> anyhow::Result<i32> {
    let org = args.org.as_deref().map(org_flag).transpose()?;
    let store = KeyStore::new(config.upstream.service.clone(), &config.keys.key_schema)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let events = tokio::time::timeout(
        config.proxy.connect_timeout,
        store.events(org.as_ref(), args.limit.max(1)),
    )
    .await
    .map_err(|_| anyhow::anyhow!("the key store did not answer in time"))?
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    if args.json {
        for e in &events {
            println!("{}", event_json(e));
        }
        return Ok(0);
    }
    println!(
        "{:<20} {:<24} {:<20} {:<36} {:<28} {:<24} REASON / DETAIL",
        "AT", "ORGANISATION", "EVENT", "KEY", "KEK", "ACTOR"
    );
    for e in &events {
        let dek = e
            .dek
            .map(|d| d.to_string())
            .unwrap_or_else(|| "-".to_owned());
        let mut note = e.reason.clone().unwrap_or_default();
        if let Some(d) = &e.detail {
            if !note.is_empty() {
                note.push_str(" / ");
            }
            note.push_str(d);
        }
        println!(
            "{:<20} {:<24} {:<20} {:<36} {:<28} {:<24} {}",
            timestamp(Some(e.at)),
            e.org,
            e.event,
            dek,
            e.kek.as_deref().unwrap_or("-"),
            e.actor.as_deref().unwrap_or("-"),
            note
        );
    }
    if events.is_empty() {
        println!("(no key events)");
    }
    Ok(0)
}

fn event_json(e: &KeyEvent) -> String {
    let s = |v: Option<&str>| v.map_or_else(|| "null".to_owned(), |v| format!("\"{}\"", esc(v)));
    format!(
        "{{\"id\":{},\"at\":\"{}\",\"org\":\"{}\",\"event\":\"{}\",\"dek\":{},\"kek\":{},\"reason\":{},\"actor\":{},\"detail\":{}}}",
        e.id,
        timestamp(Some(e.at)),
        esc(&e.org),
        esc(&e.event),
        s(e.dek.map(|d| d.to_string()).as_deref()),
        s(e.kek.as_deref()),
        s(e.reason.as_deref()),
        s(e.actor.as_deref()),
        s(e.detail.as_deref()),
    )
}

/// JSON string escaping.
fn esc(s: &str) -> String {
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
}

async fn list(config: &Config, args: &ListArgs) -> anyhow::Result<i32> {
    let org = match &args.org {
        Some(o) => Some(OrgId::new(o.clone()).map_err(|e| anyhow::anyhow!("--org: {e}"))?),
        None => None,
    };
    let store = KeyStore::new(config.upstream.service.clone(), &config.keys.key_schema)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (deks, search_keys) = tokio::time::timeout(config.proxy.connect_timeout, async {
        let deks = store.list(org.as_ref()).await?;
        let search_keys = store.list_search_keys(org.as_ref()).await?;
        Ok::<_, crate::keys::KeyError>((deks, search_keys))
    })
    .await
    .map_err(|_| anyhow::anyhow!("the key store did not answer in time"))?
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let listed = listing(&deks, &search_keys);
    if args.json {
        for key in &listed {
            println!("{}", key.json());
        }
        return Ok(0);
    }
    println!(
        "{:<24} {:<6} {:>7} {:<13} {:<36} {:<28} {:<20} {:<20} {:>12}",
        "ORGANISATION",
        "KIND",
        "VERSION",
        "STATE",
        "KEY",
        "KEK",
        "CREATED",
        "RETIRED",
        "ENCRYPTIONS"
    );
    for key in &listed {
        println!("{}", key.row());
    }
    if listed.is_empty() {
        println!("(no keys)");
    }
    Ok(0)
}

/// One line of `keys list`: a DEK or a search key.
#[derive(Clone, Copy)]
enum Listed<'a> {
    Dek(&'a DekRecord),
    Search(&'a SearchKeyRecord),
}

/// DEKs and search keys together, by organisation, then DEKs before search keys, then
/// version.
fn listing<'a>(deks: &'a [DekRecord], search_keys: &'a [SearchKeyRecord]) -> Vec<Listed<'a>> {
    let mut listed: Vec<Listed<'a>> = deks
        .iter()
        .map(Listed::Dek)
        .chain(search_keys.iter().map(Listed::Search))
        .collect();
    listed.sort_by(|a, b| {
        let key = |l: &Listed<'a>| match *l {
            Listed::Dek(r) => (r.org_id.as_str().to_owned(), 0, r.version),
            Listed::Search(r) => (r.org_id.as_str().to_owned(), 1, r.version),
        };
        key(a).cmp(&key(b))
    });
    listed
}

impl Listed<'_> {
    /// A table row, aligned with the header in `list`.
    fn row(self) -> String {
        let (org, kind, version, state, id, kek, created, retired, encryptions) = match self {
            Self::Dek(r) => (
                &r.org_id,
                "dek",
                r.version,
                r.state.as_str(),
                r.dek_id,
                &r.kek,
                r.created_at,
                r.retired_at,
                r.encryptions.to_string(),
            ),
            Self::Search(r) => (
                &r.org_id,
                "search",
                r.version,
                r.state.as_str(),
                r.key_id,
                &r.kek,
                r.created_at,
                r.retired_at,
                "-".to_owned(),
            ),
        };
        format!(
            "{:<24} {:<6} {:>7} {:<13} {:<36} {:<28} {:<20} {:<20} {:>12}",
            org.as_str(),
            kind,
            version,
            state,
            id.to_string(),
            kek,
            timestamp(Some(created)),
            timestamp(retired),
            encryptions
        )
    }

    /// One JSON object: a DEK's fields as before plus `"kind":"dek"`; a search key has
    /// `"kind":"search"`, its id as `"key"` and no encryption count.
    fn json(self) -> String {
        let opt = |t: Option<SystemTime>| match t {
            Some(_) => format!("\"{}\"", timestamp(t)),
            None => "null".to_owned(),
        };
        match self {
            Self::Dek(r) => format!(
                "{{\"org\":\"{}\",\"kind\":\"dek\",\"version\":{},\"state\":\"{}\",\"dek\":\"{}\",\"kek\":\"{}\",\"created_at\":{},\"retired_at\":{},\"destroyed_at\":{},\"encryptions\":{}}}",
                esc(r.org_id.as_str()),
                r.version,
                r.state.as_str(),
                r.dek_id,
                esc(&r.kek),
                opt(Some(r.created_at)),
                opt(r.retired_at),
                opt(r.destroyed_at),
                r.encryptions
            ),
            Self::Search(r) => format!(
                "{{\"org\":\"{}\",\"kind\":\"search\",\"version\":{},\"state\":\"{}\",\"key\":\"{}\",\"kek\":\"{}\",\"created_at\":{},\"retired_at\":{},\"destroyed_at\":{}}}",
                esc(r.org_id.as_str()),
                r.version,
                r.state.as_str(),
                r.key_id,
                esc(&r.kek),
                opt(Some(r.created_at)),
                opt(r.retired_at),
                opt(r.destroyed_at)
            ),
        }
    }
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
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::crypto::DekId;
    use crate::keys::{DekState, SearchKeyState};

    fn dek(org: &str, version: i32) -> DekRecord {
        DekRecord {
            dek_id: DekId::new_random(),
            org_id: OrgId::new(org).unwrap(),
            version,
            state: DekState::Active,
            kek: "local:00".into(),
            wrapped: Some(vec![1; 61]),
            encryptions: 7,
            created_at: UNIX_EPOCH,
            retired_at: None,
            destroyed_at: None,
        }
    }

    fn search(org: &str, version: i32, state: SearchKeyState) -> SearchKeyRecord {
        SearchKeyRecord {
            key_id: DekId::new_random(),
            org_id: OrgId::new(org).unwrap(),
            version,
            state,
            kek: "local:00".into(),
            wrapped: (state != SearchKeyState::Destroyed).then(|| vec![2; 61]),
            created_at: UNIX_EPOCH,
            retired_at: None,
            destroyed_at: None,
        }
    }

    #[test]
    fn listing_groups_by_organisation_deks_first() {
        let deks = [dek("b", 1), dek("a", 2), dek("a", 1)];
        let search_keys = [
            search("b", 1, SearchKeyState::Active),
            search("a", 2, SearchKeyState::Active),
            search("a", 1, SearchKeyState::Retired),
        ];
        let order: Vec<(String, &str, i32)> = listing(&deks, &search_keys)
            .into_iter()
            .map(|l| match l {
                Listed::Dek(r) => (r.org_id.as_str().to_owned(), "dek", r.version),
                Listed::Search(r) => (r.org_id.as_str().to_owned(), "search", r.version),
            })
            .collect();
        let expected = [
            ("a", "dek", 1),
            ("a", "dek", 2),
            ("a", "search", 1),
            ("a", "search", 2),
            ("b", "dek", 1),
            ("b", "search", 1),
        ];
        let expected: Vec<(String, &str, i32)> = expected
            .iter()
            .map(|&(o, k, v)| (o.to_owned(), k, v))
            .collect();
        assert_eq!(order, expected);
    }

    #[test]
    fn list_lines_name_the_kind_and_never_the_key() {
        let d = dek("acme", 1);
        let k = search("acme", 3, SearchKeyState::Retired);
        let json = Listed::Dek(&d).json();
        assert!(json.contains("\"kind\":\"dek\""), "{json}");
        assert!(
            json.contains(&format!("\"dek\":\"{}\"", d.dek_id)),
            "{json}"
        );
        assert!(json.contains("\"encryptions\":7"), "{json}");
        let json = Listed::Search(&k).json();
        assert!(json.contains("\"kind\":\"search\""), "{json}");
        assert!(
            json.contains(&format!("\"key\":\"{}\"", k.key_id)),
            "{json}"
        );
        assert!(json.contains("\"state\":\"retired\""), "{json}");
        assert!(json.contains("\"version\":3"), "{json}");
        assert!(
            !json.contains("\"dek\"") && !json.contains("encryptions"),
            "{json}"
        );
        serde_json::from_str::<serde_json::Value>(&json).unwrap();

        let row = Listed::Search(&k).row();
        let fields: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(fields[..4], ["acme", "search", "3", "retired"], "{row}");
        assert_eq!(fields.last(), Some(&"-"), "{row}");
        let row = Listed::Dek(&d).row();
        assert!(row.split_whitespace().nth(1) == Some("dek"), "{row}");
        for line in [Listed::Dek(&d).row(), Listed::Search(&k).row()] {
            assert!(!line.contains("0101") && !line.contains("0202"), "{line}");
        }
    }

    #[test]
    fn timestamps_are_utc_dates() {
        assert_eq!(timestamp(Some(UNIX_EPOCH)), "1970-01-01 00:00:00");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        assert_eq!(timestamp(Some(t)), "2026-11-18 11:06:40");
        assert_eq!(timestamp(None), "-");
    }
}
