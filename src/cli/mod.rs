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

use crate::config::{Config, ConfigError, Overrides, RawConfig};

/// Transparent encrypting PostgreSQL proxy.
///
/// Applications point their DATABASE_URL at pgenvelope instead of PostgreSQL. Every setting of
/// `serve` (and `--upstream`, `--rules`, `--kms` of the other commands) can
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
    Serve(ServeArgs),
    /// Validate the configuration, rule files, TLS files and KEK settings; exit 1 on any error.
    ///
    /// Offline unless asked: loads the client certificate and key as the listener does (they
    /// must match), parses the upstream CA file, and checks a local: KEK file without ever
    /// creating it. --against-kms wraps and unwraps a test key with the KEK provider;
    /// --against-db checks the rules against the upstream database's catalog.
    Check(check::CheckArgs),
    /// Print the header of an enc:v1 value (algorithm, DEK, organisation, column); never decrypts.
    Inspect(inspect::InspectArgs),
    /// Inspect the key store (data keys per organisation).
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Encrypt plaintext and move values from retired data keys to the active ones, in place.
    ///
    /// Walks every encrypted column of the rules (or one table) in primary-key order, in small
    /// transactions, directly in PostgreSQL (never through a proxy). Plaintext is encrypted under
    /// the active data key of the row's organisation; values under retired (decrypt_only) keys
    /// move to their organisation's active key; values under destroyed or unknown keys, or
    /// failing authentication, are counted and left alone. Compare-and-set writes never
    /// overwrite concurrent application writes. Interrupted runs resume from a checkpoint in the
    /// key store schema; running twice changes nothing. After a run over all tables, says which
    /// retired keys no longer protect any value. Exit 1 when a table could not be processed
    /// (e.g. it has no primary key).
    Reencrypt(reencrypt::ReencryptArgs),
    /// Add CHECK constraints that make PostgreSQL refuse plaintext in encrypted columns.
    ///
    /// Writes the proxy cannot see (updatable views, partitions or inheritance children
    /// addressed by their own names, triggers, functions, rules, connections that bypass the
    /// proxy) then fail with SQLSTATE 23514 instead of storing plaintext. Each encrypted column
    /// gets `CHECK (col IS NULL OR left(col::text, 7) = 'enc:v1:') NOT VALID`: rows already
    /// stored are not scanned; `--validate` checks them (run `reencrypt` first). Idempotent.
    Guard(guard::GuardArgs),
}

/// Flags of `pgenvelope serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to accept client connections on [default: 127.0.0.1:6432]
    #[arg(long, env = "PGENVELOPE_LISTEN", value_name = "HOST:PORT")]
    pub listen: Option<String>,

    /// Upstream PostgreSQL server. Its host and port are where client connections go; its
    /// user and password are the proxy's own service credentials (never used for clients,
    /// which authenticate with their own) [default: postgres://postgres@127.0.0.1:5432/postgres]
    #[arg(long, env = "PGENVELOPE_UPSTREAM", value_name = "URL")]
    pub upstream: Option<String>,

    /// Maximum concurrent client sessions; further clients get SQLSTATE 53300 [default: 10000]
    #[arg(long, env = "PGENVELOPE_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,

    /// Largest message accepted from either side, e.g. 64MiB; larger ones end the session
    /// with SQLSTATE 54000 [default: 1GiB, PostgreSQL's own limit]
    #[arg(long, env = "PGENVELOPE_MAX_MESSAGE_SIZE", value_name = "SIZE")]
    pub max_message_size: Option<String>,

    /// Timeout for connecting to the upstream, e.g. 10s or 500ms [default: 10s]
    #[arg(long, env = "PGENVELOPE_CONNECT_TIMEOUT", value_name = "DURATION")]
    pub connect_timeout: Option<String>,

    /// Log format: text or json [default: text]
    #[arg(long, env = "PGENVELOPE_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<String>,

    /// Log filter in RUST_LOG syntax, e.g. `info,pgenvelope=debug` [default: RUST_LOG, else info]
    #[arg(long, env = "PGENVELOPE_LOG", value_name = "FILTER")]
    pub log: Option<String>,

    /// Rule file, or directory of *.toml rule files, naming the encrypted columns
    /// [default: rules]
    #[arg(long, env = "PGENVELOPE_RULES", value_name = "PATH")]
    pub rules: Option<PathBuf>,

    /// Key-encryption key provider: local:PATH (development only), aws-kms:KEY, pkcs11:URI
    /// [default: local:.pgenvelope/kek]
    #[arg(long, env = "PGENVELOPE_KMS", value_name = "URI")]
    pub kms: Option<String>,

    /// A further KEK provider used only to unwrap data keys it wrapped earlier (during a KEK
    /// migration); repeatable, or comma-separated in the environment. New keys always use --kms
    #[arg(
        long,
        env = "PGENVELOPE_KMS_ALSO",
        value_name = "URI",
        value_delimiter = ','
    )]
    pub kms_also: Vec<String>,

    /// Organisation that owns written values when neither the row's tenant column nor the
    /// session (SET pgenvelope.tenant) names one; without it such writes are refused (42501)
    #[arg(long, env = "PGENVELOPE_DEFAULT_TENANT", value_name = "ORG")]
    pub default_tenant: Option<String>,

    /// Refuse (XX001) plaintext found in an encrypted column instead of passing it through
    /// [default: false]
    #[arg(long, env = "PGENVELOPE_STRICT_READS", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub strict_reads: Option<bool>,

    /// How long an unwrapped data key stays cached, e.g. 300s [default: 300s]
    #[arg(long, env = "PGENVELOPE_KEY_CACHE_TTL", value_name = "DURATION")]
    pub key_cache_ttl: Option<String>,

    /// Maximum number of unwrapped data keys cached [default: 10000]
    #[arg(long, env = "PGENVELOPE_KEY_CACHE_CAPACITY", value_name = "N")]
    pub key_cache_capacity: Option<u64>,

    /// What a value whose data key was destroyed (keys shred) reads as: error (SQLSTATE
    /// XX001) or null [default: error]
    #[arg(long, env = "PGENVELOPE_SHREDDED_READS", value_name = "POLICY")]
    pub shredded_reads: Option<String>,

    /// Schema of the key store (data_keys, key_events) in the upstream database
    /// [default: pgenvelope]
    #[arg(long, env = "PGENVELOPE_KEY_SCHEMA", value_name = "NAME")]
    pub key_schema: Option<String>,

    /// Rotate an organisation's data key automatically once it has encrypted this many values
    /// [default: 2147483648 = 2^31, half the limit of random nonces under one key]
    #[arg(long, env = "PGENVELOPE_ROTATE_AFTER_ENCRYPTIONS", value_name = "N")]
    pub rotate_after_encryptions: Option<u64>,

    /// Rotate an organisation's data key automatically once it is this old, e.g. 90d or
    /// 2160h [default: off]
    #[arg(long, env = "PGENVELOPE_ROTATE_AFTER_AGE", value_name = "DURATION")]
    pub rotate_after_age: Option<String>,

    /// Threads serving client connections; each connection stays on one thread
    /// [default: 0 = one per CPU]
    #[arg(long, env = "PGENVELOPE_WORKERS", value_name = "N")]
    pub workers: Option<usize>,

    /// On SIGTERM, how long to let sessions finish to their next idle point before closing
    /// them with 57P01 (SIGINT closes them at once) [default: 30s]
    #[arg(long, env = "PGENVELOPE_SHUTDOWN_GRACE", value_name = "DURATION")]
    pub shutdown_grace: Option<String>,

    /// Admin HTTP address serving /metrics (Prometheus), /healthz and /readyz, e.g.
    /// 127.0.0.1:9187 [default: off]
    #[arg(long, env = "PGENVELOPE_ADMIN", value_name = "HOST:PORT")]
    pub admin: Option<String>,

    /// PEM certificate chain for TLS toward clients (with --tls-key); reloaded on SIGHUP.
    /// Without it SSLRequest is answered `N` [default: off]
    #[arg(long, env = "PGENVELOPE_TLS_CERT", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for TLS toward clients (with --tls-cert)
    #[arg(long, env = "PGENVELOPE_TLS_KEY", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,

    /// Refuse clients that do not negotiate TLS (SQLSTATE 28000) [default: false]
    #[arg(long, env = "PGENVELOPE_REQUIRE_CLIENT_TLS", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub require_client_tls: Option<bool>,

    /// TLS toward PostgreSQL: disable, prefer, require, verify-ca or verify-full
    /// [default: the --upstream URL's sslmode, else verify-full with --upstream-ca, else prefer]
    #[arg(long, env = "PGENVELOPE_UPSTREAM_SSLMODE", value_name = "MODE")]
    pub upstream_sslmode: Option<String>,

    /// PEM CA certificate(s) for verifying PostgreSQL's certificate
    #[arg(long, env = "PGENVELOPE_UPSTREAM_CA", value_name = "FILE")]
    pub upstream_ca: Option<PathBuf>,
}

impl ServeArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            listen: self.listen.clone(),
            upstream: self.upstream.clone(),
            max_connections: self.max_connections,
            max_message_size: self.max_message_size.clone(),
            connect_timeout: self.connect_timeout.clone(),
            log_format: self.log_format.clone(),
            log: self.log.clone(),
            rules: self.rules.clone(),
            kms: self.kms.clone(),
            kms_also: self.kms_also.clone(),
            default_tenant: self.default_tenant.clone(),
            strict_reads: self.strict_reads,
            key_cache_ttl: self.key_cache_ttl.clone(),
            key_cache_capacity: self.key_cache_capacity,
            key_schema: self.key_schema.clone(),
            shredded_reads: self.shredded_reads.clone(),
            rotate_after_encryptions: self.rotate_after_encryptions,
            rotate_after_age: self.rotate_after_age.clone(),
            workers: self.workers,
            shutdown_grace: self.shutdown_grace.clone(),
            admin: self.admin.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            require_client_tls: self.require_client_tls,
            upstream_sslmode: self.upstream_sslmode.clone(),
            upstream_ca: self.upstream_ca.clone(),
        }
    }
}

/// Run the parsed command line. Returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Serve(args) => {
            let config = load_config(cli.config.as_deref(), args.overrides())?;
            serve::run(config)
        }
        Command::Check(args) => {
            let config = load_config(cli.config.as_deref(), args.overrides())?;
            check::run(&config, &args)
        }
        Command::Inspect(args) => {
            let config = load_config(cli.config.as_deref(), args.overrides())?;
            inspect::run(&config, &args)
        }
        Command::Keys(cmd) => {
            let config = load_config(cli.config.as_deref(), cmd.overrides())?;
            keys::run(&config, &cmd)
        }
        Command::Reencrypt(args) => {
            let config = load_config(cli.config.as_deref(), args.overrides())?;
            reencrypt::run(&config, &args)
        }
        Command::Guard(args) => {
            let config = load_config(cli.config.as_deref(), args.overrides())?;
            guard::run(&config, &args)
        }
    }
}

pub(crate) fn load_config(
    path: Option<&std::path::Path>,
    over: Overrides,
) -> Result<Config, ConfigError> {
    match path {
        Some(path) => {
            let raw = RawConfig::load(path)?;
            Config::resolve(over, Some((path, raw)))
        }
        None => Config::resolve(over, None),
    }
}
