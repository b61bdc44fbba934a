//! Command line: `pgenvelope serve` and friends. Connects the library's pieces; the only place
//! besides `main` that uses `anyhow`.

mod serve;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{Config, ConfigError, Overrides, RawConfig};

/// Transparent encrypting PostgreSQL proxy.
///
/// Applications point their DATABASE_URL at pgenvelope instead of PostgreSQL. Every flag can
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
pub enum Command {
    /// Run the proxy.
    Serve(ServeArgs),
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
    }
}

fn load_config(path: Option<&std::path::Path>, over: Overrides) -> Result<Config, ConfigError> {
    match path {
        Some(path) => {
            let raw = RawConfig::load(path)?;
            Config::resolve(over, Some((path, raw)))
        }
        None => Config::resolve(over, None),
    }
}
