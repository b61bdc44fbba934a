//! `pgenvelope reencrypt`: encrypt plaintext left from before adoption and move values from
//! retired DEKs to the active ones, directly in PostgreSQL (see [`crate::reencrypt`]).
//!
//! Prints a progress bar on a terminal (stderr), plain progress lines every 2 s otherwise,
//! then a summary per table on stdout. Never prints values, keys or ciphertext.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::common::{self, DataArgs, StoreArgs};
use crate::config::{Config, RawConfig};
use crate::crypto::OrgId;
use crate::keys::{KeyManager, KeyManagerConfig};
use crate::reencrypt::{
    Options, Progress, ReencryptError, Reencryptor, TableReport, Untouched, DEFAULT_BATCH,
};
use crate::rules::{ident, load_path, DEFAULT_SCHEMA};

/// How long this command's own key cache keeps a DEK: a rotation during a long run is
/// picked up within this time.
const OWN_KEY_CACHE_TTL: Duration = Duration::from_secs(60);
/// Interval of plain progress lines.
const PLAIN_EVERY: Duration = Duration::from_secs(2);
/// Shortest interval between redraws of the progress bar.
const BAR_EVERY: Duration = Duration::from_millis(100);

/// Flags of `pgenvelope reencrypt` (the command's help text is on `Command::Reencrypt`).
#[derive(Debug, Clone, clap::Args)]
pub struct ReencryptArgs {
    /// Only this table (schema-qualified; unqualified means public); it must be in the rules
    #[arg(long, value_name = "TABLE")]
    pub table: Option<String>,

    /// Only values owned by this organisation
    #[arg(long, value_name = "ORG")]
    pub org: Option<String>,

    /// Rows per transaction
    #[arg(long, value_name = "N", default_value_t = DEFAULT_BATCH,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch: u32,

    /// Afterwards, destroy every retired DEK that no configured column uses any more and that
    /// was retired longer ago than --key-cache-ttl (a read-only scan of all configured columns
    /// checks first)
    #[arg(long)]
    pub destroy_retired: bool,

    /// Ignore saved checkpoints and start every table from the beginning
    #[arg(long)]
    pub restart: bool,

    /// Rule file, or directory of *.toml rule files (the proxy's --rules) [default: rules]
    #[arg(long, env = "PGENVELOPE_RULES", value_name = "PATH")]
    pub rules: Option<PathBuf>,

    /// Organisation owning plaintext in rows without a tenant column value (the proxy's
    /// --default-tenant); without it such values are reported and left as they are
    #[arg(long, env = "PGENVELOPE_DEFAULT_TENANT", value_name = "ORG")]
    pub default_tenant: Option<String>,

    /// The proxies' --key-cache-ttl: a retired DEK is destroyed only once it was retired longer
    /// ago than this, since a proxy may still encrypt with it until then [default: 300s]
    #[arg(long, env = "PGENVELOPE_KEY_CACHE_TTL", value_name = "DURATION")]
    pub key_cache_ttl: Option<String>,

    #[command(flatten)]
    pub(crate) store: StoreArgs,

    #[command(flatten)]
    pub(crate) data: DataArgs,
}

impl ReencryptArgs {
    /// The settings these flags give (the rest come from the file and the defaults).
    pub(crate) fn overlay(&self) -> RawConfig {
        RawConfig {
            rules: self.rules.clone(),
            default_tenant: self.default_tenant.clone(),
            key_cache_ttl: self.key_cache_ttl.clone(),
            data_database: self.data.data_database.clone(),
            ..self.store.overlay()
        }
    }
}

/// Run the command; returns the exit code (1 when a table could not be processed).
pub(crate) fn run(config: &Config, args: &ReencryptArgs) -> anyhow::Result<i32> {
    let rules = load_path(&config.encryption.rules).map_err(|e| anyhow::anyhow!("{e}"))?;
    if rules.is_empty() {
        anyhow::bail!(
            "no encrypted columns in {}",
            config.encryption.rules.display()
        );
    }
    let table = match &args.table {
        None => None,
        Some(t) => Some(parse_table(t)?),
    };
    let org = match &args.org {
        Some(o) => Some(OrgId::new(o.clone()).map_err(|e| anyhow::anyhow!("--org: {e}"))?),
        None => None,
    };
    let options = Options {
        rules,
        table,
        org,
        default_tenant: config.encryption.default_tenant.clone(),
        batch: args.batch as usize,
        restart: args.restart,
    };
    common::runtime()?.block_on(run_async(config, args, options))
}

async fn run_async(config: &Config, args: &ReencryptArgs, options: Options) -> anyhow::Result<i32> {
    // Created by the run once it has checked that the tables fit this key store.
    let store = common::store_handle(config)?;
    let (kek, also) = common::open_keks(config).await?;
    let keys = Arc::new(
        KeyManager::new(
            Arc::clone(&store),
            kek,
            KeyManagerConfig {
                ttl: OWN_KEY_CACHE_TTL,
                capacity: config.keys.key_cache_capacity,
                ..KeyManagerConfig::default()
            },
        )
        .with_unwrap_only(also),
    );
    let tls = crate::tls::ServiceTls::new(
        config.proxy.upstream_sslmode,
        config.proxy.upstream_ca.as_deref(),
    )
    .context("TLS settings for the service connection")?;
    let filtered = options.table.is_some() || options.org.is_some();
    let data = common::data_database_label(config);
    let store_label = format!(
        "key store schema {} in database {} (of --upstream)",
        config.keys.key_schema,
        config.upstream.key_store_database()
    );
    let mut job = tokio::time::timeout(
        config.proxy.connect_timeout,
        Reencryptor::connect(
            config.upstream.data_service(),
            tls,
            &config.keys.key_schema,
            Arc::clone(&keys),
            options,
        ),
    )
    .await
    .map_err(|_| anyhow::anyhow!("{data} or the key store did not answer in time"))??;
    println!("tables in {data}; {store_label}");

    let progress = Display::new();
    let reports = match job.run(&progress).await {
        Ok(reports) => reports,
        Err(e @ ReencryptError::ForeignKeyStore { .. }) => anyhow::bail!(
            "{e}. Give the proxies' --upstream and --key-schema; if the application's tables \
             are in another database than the key store, name it with --data-database"
        ),
        Err(e) => return Err(e.into()),
    };
    let mut failed = false;
    for report in &reports {
        failed |= print_report(report);
    }
    if let Err(e) = keys.flush_counters().await {
        eprintln!("warning: could not save encryption counts: {e}");
    }
    if config.upstream.data_database.is_none()
        && reports
            .iter()
            .any(|r| matches!(r.result, Err(ReencryptError::NoSuchTable { .. })))
    {
        eprintln!(
            "hint: if the application's tables are in another database than the key store, \
             name it with --data-database"
        );
    }
    let unknown: u64 = reports
        .iter()
        .filter_map(|r| r.result.as_ref().ok())
        .filter_map(|stats| stats.untouched.get(&Untouched::UnknownDek))
        .sum();
    if unknown > 0 {
        // Never a result of a key operation (destroyed keys keep their row): the key store is
        // not the one the values were sealed with.
        eprintln!(
            "error: {unknown} value(s) are under data keys unknown to the {store_label}. Is it \
             the proxies' key store? Give their --upstream and --key-schema; if the application's \
             tables are in another database than the key store, name it with --data-database"
        );
        failed = true;
    }

    if !args.destroy_retired && filtered {
        return Ok(i32::from(failed));
    }
    // Settledness first: a key settled before the census began cannot gain values from a
    // proxy's stale cache during it.
    let mut retired = job.retired_keys(config.keys.key_cache_ttl).await?;
    if retired.is_empty() {
        println!("no retired DEKs");
        return Ok(i32::from(failed));
    }
    eprintln!(
        "checking which retired DEKs still protect values in the configured columns of {data} \
         (read-only scan; other databases are not scanned)…"
    );
    let census = job.census().await?;
    for key in &mut retired {
        key.remaining = census.under(key.dek);
        let label = format!("retired DEK {} (org {} v{})", key.dek, key.org, key.version);
        if key.remaining == 0 {
            println!("no value remains under {label}");
        } else {
            println!("{} value(s) remain under {label}", key.remaining);
        }
    }
    if !args.destroy_retired {
        return Ok(i32::from(failed));
    }
    let reason = args.store.reason.as_deref();
    for key in &retired {
        let label = format!("retired DEK {} (org {} v{})", key.dek, key.org, key.version);
        if key.remaining > 0 {
            println!("kept {label}: {} value(s) remain under it", key.remaining);
            continue;
        }
        if !key.settled {
            println!(
                "kept {label}: retired less than --key-cache-ttl ({}s) ago, so a proxy may still \
                 encrypt with it; run again later",
                config.keys.key_cache_ttl.as_secs()
            );
            continue;
        }
        match store.destroy_retired(key.dek, reason).await {
            Ok(true) => println!("destroyed {label}"),
            Ok(false) => println!("kept {label}: no longer decrypt_only"),
            Err(e) => {
                eprintln!("error: destroying {label}: {e}");
                failed = true;
            }
        }
    }
    Ok(i32::from(failed))
}

/// `schema.table` or `table` as PostgreSQL stores the names.
fn parse_table(text: &str) -> anyhow::Result<(String, String)> {
    let parts = ident::parse_qualified(text).map_err(|e| anyhow::anyhow!("--table: {e}"))?;
    match <[String; 2]>::try_from(parts) {
        Ok([schema, table]) => Ok((schema, table)),
        Err(parts) if parts.len() == 1 => Ok((DEFAULT_SCHEMA.to_owned(), parts.concat())),
        Err(_) => anyhow::bail!("--table: expected TABLE or SCHEMA.TABLE"),
    }
}

/// Print one table's summary; returns whether it failed.
fn print_report(report: &TableReport) -> bool {
    let stats = match &report.result {
        Ok(stats) => stats,
        Err(e) => {
            println!("{}: error: {}", report.table, error_chain(e));
            return true;
        }
    };
    let resumed = if stats.resumed_rows > 0 {
        format!(" (resumed after {} row(s))", stats.resumed_rows)
    } else if stats.restarted {
        " (started over: keys changed since the checkpoint)".to_owned()
    } else {
        String::new()
    };
    println!(
        "{}: {} row(s) scanned{resumed}; values: {} encrypted from plaintext, {} moved from \
         retired DEKs, {} unchanged, {} NULL, {} left untouched; {} conflict(s) retried",
        report.table,
        stats.rows,
        stats.encrypted,
        stats.moved,
        stats.unchanged,
        stats.nulls,
        stats.untouched_total(),
        stats.conflicts,
    );
    if stats.other_org > 0 {
        println!(
            "    {} value(s) of other organisations skipped",
            stats.other_org
        );
    }
    for (why, n) in &stats.untouched {
        println!("    left untouched: {n} {}", why.describe());
    }
    if stats.keys_changed_during {
        println!(
            "    keys were rotated or shredded meanwhile: run again to move values written since"
        );
    }
    false
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Progress on stderr: a bar on a terminal, plain lines otherwise.
struct Display {
    terminal: bool,
    state: Mutex<DisplayState>,
}

struct DisplayState {
    started: Instant,
    start_done: u64,
    last_draw: Option<Instant>,
    /// Latest (done, total) reported, drawn once more when the table ends.
    latest: (u64, u64),
    drawn: bool,
}

impl Display {
    fn new() -> Self {
        Self {
            terminal: std::io::stderr().is_terminal(),
            state: Mutex::new(DisplayState {
                started: Instant::now(),
                start_done: 0,
                last_draw: None,
                latest: (0, 0),
                drawn: false,
            }),
        }
    }

    fn draw(&self, table: &str, done: u64, total: u64, force: bool) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.latest = (done, total);
        let every = if self.terminal {
            BAR_EVERY
        } else {
            PLAIN_EVERY
        };
        if !force && state.last_draw.is_some_and(|t| t.elapsed() < every) {
            return;
        }
        state.last_draw = Some(Instant::now());
        let secs = state.started.elapsed().as_secs_f64();
        let rate = if secs > 0.0 {
            (done.saturating_sub(state.start_done)) as f64 / secs
        } else {
            0.0
        };
        let percent = (done.min(total) * 100).checked_div(total).unwrap_or(100) as usize;
        let mut err = std::io::stderr().lock();
        if self.terminal {
            let filled = percent * 30 / 100;
            let _ = write!(
                err,
                "\r\x1b[2K{table} [{}{}] {percent:>3}% {done}/{total} rows, {rate:.0} rows/s",
                "#".repeat(filled),
                "-".repeat(30 - filled)
            );
            state.drawn = true;
        } else {
            let _ = writeln!(
                err,
                "{table}: {done}/{total} rows ({percent}%), {rate:.0} rows/s"
            );
        }
        let _ = err.flush();
    }

    fn end_line(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.drawn {
            eprintln!();
            state.drawn = false;
        }
    }
}

impl Progress for Display {
    fn table_started(&self, table: &str, done: u64, total: u64) {
        {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.started = Instant::now();
            state.start_done = done;
            state.last_draw = None;
        }
        self.draw(table, done, total, true);
    }

    fn advanced(&self, table: &str, done: u64, total: u64) {
        self.draw(table, done, total, false);
    }

    fn table_finished(&self, table: &str) {
        let (done, total) = self
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .latest;
        self.draw(table, done, total, true);
        self.end_line();
    }

    fn notice(&self, table: &str, message: &str) {
        self.end_line();
        eprintln!("{table}: {message}");
    }
}
