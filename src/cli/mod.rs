//! Command line: `pgenvelope serve` and friends. Connects the library's pieces; the only place
//! besides `main` that uses `anyhow`.

mod check;
mod common;
mod guard;
mod inspect;
mod keys;
mod reencrypt;
mod serve;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{Config, ConfigError, RawConfig};

/// Transparent encrypting PostgreSQL proxy.
///
/// Applications point their DATABASE_URL at pgenvelope instead of PostgreSQL. Every setting of
/// `serve` (and `--upstream`, `--rules`, `--kms`, `--data-database` of the other commands) can
/// also be set as an environment variable PGENVELOPE_<FLAG> (e.g. PGENVELOPE_UPSTREAM) or as a
/// key in the TOML file given with --config (e.g. `upstream = "postgres://…"`).
/// Precedence: flag > environment > file > default.
#[derive(Debug, Parser)]
#[command(name = "pgenvelope", version, about, long_about)]
pub struct Cli {
    /// Configuration file (TOML); keys are the long flag names with `_` for `-`.
    #[arg(long, global = true, env = "PGENVELOPE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
#[allow(
    clippy::large_enum_variant,
    reason = "parsed once at start-up; boxing would only add noise"
)]
pub enum Command {
    /// Run the proxy.
    Serve(RawConfig),
    /// Validate the configuration, rule files, TLS files and KEK settings; exit 1 on any error.
    ///
    /// Offline unless asked: loads the client certificate and key as the listener does (they
    /// must match), parses the upstream CA file, and checks a local: KEK file without ever
    /// creating it. --against-kms wraps and unwraps a test key with the KEK provider;
    /// --against-db checks the rules against the catalog of the database holding the tables
    /// (--data-database, else the --upstream URL's) and warns about missing search indexes;
    /// --ddl prints the SQL that creates them.
    Check(check::CheckArgs),
    /// Print the header of an enc:v1 value (algorithm, DEK, organisation, column); never decrypts.
    Inspect(inspect::InspectArgs),
    /// Inspect the key store (data keys per organisation).
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Encrypt plaintext and move values from retired data keys to the active ones, in place.
    ///
    /// Walks every encrypted column of the rules (or one table) in primary-key order, in small
    /// transactions, directly in PostgreSQL (never through a proxy). The tables are in the
    /// --upstream URL's database, or in --data-database; the key store is always the one in the
    /// --upstream URL's database, where the proxies keep it. Plaintext is encrypted under the
    /// active data key of the row's organisation; values under retired (decrypt_only) keys
    /// move to their organisation's active key; values under destroyed or unknown keys, or
    /// failing authentication, are counted and left alone. Compare-and-set writes never
    /// overwrite concurrent application writes. Interrupted runs resume from a checkpoint in the
    /// database of the tables (schema named as the key store's); running twice changes nothing.
    /// After a run over all tables, says which retired keys no longer protect any value. Exit 1
    /// when a table could not be processed (e.g. it has no primary key) or values are under
    /// data keys the key store does not know; a key store without any data key is refused,
    /// before anything is written, when the tables hold encrypted values (they were sealed with
    /// another key store: the wrong --upstream, --key-schema or database).
    Reencrypt(reencrypt::ReencryptArgs),
    /// Add CHECK constraints that make PostgreSQL refuse plaintext in encrypted columns.
    ///
    /// Writes the proxy cannot see (updatable views, partitions or inheritance children
    /// addressed by their own names, triggers, functions, rules, connections that bypass the
    /// proxy) then fail with SQLSTATE 23514 instead of storing plaintext. Each encrypted column
    /// gets `CHECK (col IS NULL OR left(col::text, 7) = 'enc:v1:') NOT VALID`: rows already
    /// stored are not scanned; `--validate` checks them (run `reencrypt` first). Idempotent.
    /// The tables are in the --upstream URL's database, or in --data-database.
    Guard(guard::GuardArgs),
}

/// Run the parsed command line. Returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Serve(args) => {
            let config = load_config(cli.config.as_deref(), args)?;
            serve::run(config)
        }
        Command::Check(args) => {
            let config = load_config(cli.config.as_deref(), args.overlay())?;
            check::run(&config, &args)
        }
        Command::Inspect(args) => {
            let config = load_config(cli.config.as_deref(), args.overlay())?;
            inspect::run(&config, &args)
        }
        Command::Keys(cmd) => {
            let config = load_config(cli.config.as_deref(), cmd.overlay())?;
            keys::run(&config, &cmd)
        }
        Command::Reencrypt(args) => {
            let config = load_config(cli.config.as_deref(), args.overlay())?;
            reencrypt::run(&config, &args)
        }
        Command::Guard(args) => {
            let config = load_config(cli.config.as_deref(), args.overlay())?;
            guard::run(&config, &args)
        }
    }
}

/// The configuration: `top` (flags and environment) over the `--config` file over the
/// defaults.
pub(crate) fn load_config(
    path: Option<&std::path::Path>,
    top: RawConfig,
) -> Result<Config, ConfigError> {
    match path {
        Some(path) => {
            let file = RawConfig::load(path)?;
            Config::resolve(top, Some((path, file)))
        }
        None => Config::resolve(top, None),
    }
}
