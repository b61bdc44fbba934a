//! Configuration: TOML file + environment + flags → validated [`Config`].
//!
//! Precedence is flag > environment (`PGENVELOPE_<FLAG>`) > file (`--config`) > default.
//! [`RawConfig`] is the one overlay type: clap fills it from flag and environment, serde from
//! the file (`deny_unknown_fields`), each setting declared once as a field. [`Config::resolve`]
//! lays the command line over the file over the defaults; it is the only place that reports
//! configuration errors, and it names the file and the key. No sockets here.

mod units;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::cipher::ShreddedReads;
use crate::crypto::OrgId;
use crate::keys::{KmsUri, RotationPolicy};
pub use crate::tls::{SslMode, TlsFiles};

pub use units::{parse_duration, parse_size};

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:6432";
/// Default upstream URL: the local PostgreSQL as user `postgres`.
pub const DEFAULT_UPSTREAM: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// Default connection limit.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default message size limit: PostgreSQL's own (1 GiB − 1).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = crate::wire::header::POSTGRES_MAX_MESSAGE;
/// Default upstream connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default rules location.
pub const DEFAULT_RULES: &str = "rules";
/// Default key store schema.
pub const DEFAULT_KEY_SCHEMA: &str = crate::keys::DEFAULT_SCHEMA;
/// Default automatic rotation threshold: 2^31 encryptions, half the 2^32 limit of random
/// 96-bit nonces under one key.
pub const DEFAULT_ROTATE_AFTER_ENCRYPTIONS: u64 = crate::crypto::ROTATE_DEK_AFTER;
/// Largest accepted automatic rotation threshold: 2^32 minus a margin for the encryptions made
/// between two counter flushes.
pub const MAX_ROTATE_AFTER_ENCRYPTIONS: u64 = (1 << 32) - (1 << 24);
/// Default KEK provider: a local key file, for development only.
pub const DEFAULT_KMS: &str = "local:.pgenvelope/kek";
/// Default interval of saving encryption counts to the key store (and checking rotation).
pub const DEFAULT_COUNTER_FLUSH_INTERVAL: Duration = Duration::from_secs(5);
/// Shortest accepted counter flush interval.
pub const MIN_COUNTER_FLUSH_INTERVAL: Duration = Duration::from_millis(10);
/// Longest accepted counter flush interval: [`MAX_ROTATE_AFTER_ENCRYPTIONS`] leaves a margin of
/// 2^24 encryptions per key for what is encrypted between two flushes.
pub const MAX_COUNTER_FLUSH_INTERVAL: Duration = Duration::from_secs(60);

/// One layer of settings, every one optional: the command line with the environment (clap), or
/// the configuration file (serde, `deny_unknown_fields`). [`Config::resolve`] lays the command
/// line over the file over the defaults.
///
/// Each field is a setting: its name is the file key, `--name-with-dashes` the flag and
/// `PGENVELOPE_NAME` the environment variable; its doc comment is the flag's `--help` text.
/// `pgenvelope serve` takes every field as a flag, except the few marked `#[arg(skip)]` that
/// only other commands use (they declare the flag themselves); the other commands fill in the
/// fields they have flags for and leave the rest `None` (`..RawConfig::default()`).
#[derive(Debug, Default, Clone, Deserialize, clap::Args)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct RawConfig {
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
    #[serde(default, deserialize_with = "size_text")]
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
    #[serde(default)]
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

    /// How often encryption counts are saved to the key store and automatic rotation is
    /// checked, e.g. 5s or 500ms (10ms to 60s) [default: 5s]
    #[arg(long, env = "PGENVELOPE_COUNTER_FLUSH_INTERVAL", value_name = "TIME")]
    pub counter_flush_interval: Option<String>,

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

    /// Database holding the application's tables, for `reencrypt`, `check --against-db` and
    /// `guard` (`--data-database`, `PGENVELOPE_DATA_DATABASE`): reached on the upstream's host
    /// and port with the same user, password and TLS settings, while the key store stays in
    /// the upstream URL's database. Empty or unset: the upstream URL's database. Not a flag of
    /// `serve`, whose clients name their own databases.
    #[arg(skip)]
    pub data_database: Option<String>,
}

/// `max_message_size` in the file: a number of bytes or text with a unit, kept as text (the
/// command line gives text too) and parsed by [`Config::resolve`].
fn size_text<'de, D>(deserializer: D) -> Result<Option<String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    /// A size as written in the file.
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum SizeValue {
        Bytes(u64),
        Text(String),
    }
    Ok(
        Option::<SizeValue>::deserialize(deserializer)?.map(|size| match size {
            SizeValue::Bytes(bytes) => bytes.to_string(),
            SizeValue::Text(text) => text,
        }),
    )
}

impl RawConfig {
    /// Parse a configuration file's contents. `origin` names the file in errors.
    pub fn parse(origin: &Path, text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::File {
            path: origin.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Read and parse a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::parse(path, &text)
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The upstream server and the proxy's own service credentials.
#[derive(Clone)]
pub struct Upstream {
    /// Host that client connections are relayed to.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Parsed connection settings for the proxy's own service connection (key store, catalog).
    /// Its database is the key store's.
    pub service: tokio_postgres::Config,
    /// `sslmode` given in the URL or keyword string, if any (see [`Upstream::parse`]).
    pub sslmode: Option<SslMode>,
    /// Database of the application's tables for the commands that work on them (`reencrypt`,
    /// `check --against-db`, `guard`), when it is not the key store's; see
    /// [`Upstream::data_service`].
    pub data_database: Option<String>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password.
        write!(f, "Upstream({}:{})", self.host, self.port)
    }
}

impl Upstream {
    /// Parse a `postgres://` URL or a libpq keyword string. Only TCP hosts are supported.
    ///
    /// An `sslmode` in it (`?sslmode=require`, `sslmode=verify-full`) is taken out and returned
    /// in [`Upstream::sslmode`]: it sets `upstream_sslmode` when that is not given, and
    /// contradicting it is an error, so a URL asking for TLS is never silently downgraded.
    pub fn parse(url: &str) -> Result<Self, String> {
        let (rest, sslmode) = take_sslmode(url)?;
        let service = tokio_postgres::Config::from_str(&rest).map_err(|e| e.to_string())?;
        let host = match service.get_hosts() {
            [] => "127.0.0.1".to_owned(),
            [tokio_postgres::config::Host::Tcp(h)] => h.clone(),
            [_] => return Err("only TCP upstream hosts are supported".to_owned()),
            _ => return Err("exactly one upstream host is supported".to_owned()),
        };
        let port = match service.get_ports() {
            [] => 5432,
            [p] => *p,
            _ => return Err("exactly one upstream port is supported".to_owned()),
        };
        Ok(Self {
            host,
            port,
            service,
            sslmode,
            data_database: None,
        })
    }

    /// Name of the key store's database: the one the URL names, else (as PostgreSQL does) the
    /// user's name.
    pub fn key_store_database(&self) -> &str {
        database_of(&self.service)
    }

    /// Name of the database holding the application's tables: `data_database`, else the key
    /// store's.
    pub fn data_database_name(&self) -> &str {
        self.data_database
            .as_deref()
            .unwrap_or_else(|| self.key_store_database())
    }

    /// Connection settings for the application's tables: the service connection's (host, port,
    /// user, password, options), with the database replaced by `data_database` when one is
    /// set. TLS settings are applied by the caller, as for the service connection.
    pub fn data_service(&self) -> tokio_postgres::Config {
        let mut config = self.service.clone();
        if let Some(db) = &self.data_database {
            config.dbname(db);
        }
        config
    }
}

/// The database a connection with `config` opens: its `dbname`, else the user's name.
fn database_of(config: &tokio_postgres::Config) -> &str {
    config
        .get_dbname()
        .or_else(|| config.get_user())
        .unwrap_or_default()
}

/// Longest database name PostgreSQL keeps (NAMEDATALEN − 1 bytes); a longer one would be
/// truncated by the server.
const MAX_DATABASE_NAME: usize = 63;

/// A `data_database` as given: `None` when empty, an error message when PostgreSQL could not
/// have a database of that name.
fn data_database(name: String) -> Result<Option<String>, String> {
    if name.is_empty() {
        return Ok(None);
    }
    if name.contains('\0') {
        return Err("a database name cannot contain a NUL byte".to_owned());
    }
    if name.len() > MAX_DATABASE_NAME {
        return Err(format!(
            "`{name}` is longer than {MAX_DATABASE_NAME} bytes, PostgreSQL's limit for names"
        ));
    }
    Ok(Some(name))
}

/// Split `sslmode` out of a URL's query (`postgres://…?sslmode=x&…`) or a keyword string
/// (`… sslmode=x …`); returns the rest and the parsed mode.
fn take_sslmode(url: &str) -> Result<(String, Option<SslMode>), String> {
    let mut mode = None;
    let mut set = |value: &str| -> Result<(), String> {
        let parsed = value
            .parse::<SslMode>()
            .map_err(|m| format!("sslmode: {m}"))?;
        match mode {
            Some(old) if old != parsed => {
                Err("sslmode is given twice with different values".into())
            }
            _ => {
                mode = Some(parsed);
                Ok(())
            }
        }
    };
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_owned(), None));
        };
        let mut kept = Vec::new();
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some(("sslmode", v)) => set(v)?,
                _ => kept.push(pair),
            }
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rest, mode));
    }
    // Keyword string: `key = value` pairs, values possibly 'quoted' (with \' and \\ escapes).
    // Only the sslmode pairs are cut out; everything else (a quoted password with spaces)
    // stays byte for byte.
    let bytes = url.as_bytes();
    let mut rest = String::with_capacity(url.len());
    let mut kept_from = 0;
    let mut i = 0;
    let skip_ws = |mut i: usize| {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    loop {
        i = skip_ws(i);
        if i >= bytes.len() {
            break;
        }
        let key_start = i;
        while i < bytes.len() && bytes[i] != b'=' && !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = &url[key_start..i];
        i = skip_ws(i);
        if bytes.get(i) != Some(&b'=') {
            // Not a pair: leave it for tokio-postgres to report.
            break;
        }
        i = skip_ws(i + 1);
        let mut value = String::new();
        if bytes.get(i) == Some(&b'\'') {
            i += 1;
            while i < bytes.len() && bytes[i] != b'\'' {
                if bytes[i] == b'\\' && i + 1 < bytes.len() {
                    i += 1;
                }
                value.push(char::from(bytes[i]));
                i += 1;
            }
            i += 1;
        } else {
            let start = i;
            while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
                i += 1;
            }
            value.push_str(&url[start..i]);
        }
        let end = i.min(bytes.len());
        if key == "sslmode" {
            set(&value)?;
            rest.push_str(&url[kept_from..key_start]);
            kept_from = end;
        }
        i = end;
    }
    rest.push_str(&url[kept_from..]);
    Ok((rest, mode))
}

/// Validated configuration of `pgenvelope serve`, one struct per component (the other
/// commands use the parts they need).
#[derive(Debug, Clone)]
pub struct Config {
    /// The listener and the client connections it relays.
    pub proxy: ProxyConfig,
    /// The upstream server and the proxy's own service credentials.
    pub upstream: Upstream,
    /// KEK providers, the key store, the DEK cache and automatic rotation.
    pub keys: KeysConfig,
    /// The rules and how encrypted columns are written and read.
    pub encryption: EncryptionConfig,
    /// Logging, worker threads, shutdown and the admin endpoint.
    pub ops: OpsConfig,
}

impl Config {
    /// Lay `top` (the command line and environment) over the file over the defaults, and
    /// validate. An error names the key and where its value came from.
    pub fn resolve(
        top: RawConfig,
        file: Option<(&Path, RawConfig)>,
    ) -> Result<Config, ConfigError> {
        let mut layers = Layers::new(top, file);
        let (upstream, src) = layers.take_or(|r| &mut r.upstream, DEFAULT_UPSTREAM.to_owned());
        let mut upstream = Upstream::parse(&upstream).map_err(|m| invalid("upstream", src, m))?;
        upstream.data_database = match layers.take(|r| &mut r.data_database) {
            Some((name, src)) => {
                data_database(name).map_err(|m| invalid("data_database", src, m))?
            }
            None => None,
        };
        let proxy = ProxyConfig::resolve(&mut layers, &upstream)?;
        let ops = OpsConfig::resolve(&mut layers)?;
        let encryption = EncryptionConfig::resolve(&mut layers)?;
        let keys = KeysConfig::resolve(&mut layers)?;
        Ok(Config {
            proxy,
            upstream,
            keys,
            encryption,
            ops,
        })
    }
}

/// Settings of the proxy's listener and connections.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Upstream host (name or address) that client connections go to.
    pub upstream_host: String,
    /// Upstream port.
    pub upstream_port: u16,
    /// Maximum concurrent client sessions.
    pub max_connections: usize,
    /// Largest message body accepted from either side, in bytes.
    pub max_message_size: usize,
    /// Timeout for connecting to the upstream (client connections and the service
    /// connections to the key store and catalog).
    pub connect_timeout: Duration,
    /// Certificate and key for TLS toward clients; `None`: SSLRequest is answered `N`.
    pub tls: Option<TlsFiles>,
    /// Refuse a StartupMessage that did not come over TLS (28000).
    pub require_client_tls: bool,
    /// TLS toward the upstream server (client and service connections).
    pub upstream_sslmode: SslMode,
    /// CA file for verifying the upstream server (needed by verify-ca and verify-full).
    pub upstream_ca: Option<PathBuf>,
}

impl ProxyConfig {
    /// `host:port` of the upstream, for connecting.
    pub fn upstream_addr(&self) -> String {
        if self.upstream_host.contains(':') && !self.upstream_host.starts_with('[') {
            format!("[{}]:{}", self.upstream_host, self.upstream_port)
        } else {
            format!("{}:{}", self.upstream_host, self.upstream_port)
        }
    }

    /// The proxy's settings; the upstream URL gives the host and port and the default of
    /// `upstream_sslmode`.
    fn resolve(layers: &mut Layers, upstream: &Upstream) -> Result<Self, ConfigError> {
        let (listen, src) = layers.take_or(|r| &mut r.listen, DEFAULT_LISTEN.to_owned());
        let listen = listen.parse::<SocketAddr>().map_err(|e| {
            invalid(
                "listen",
                src,
                format!("{e} (expected HOST:PORT with an IP address)"),
            )
        })?;

        let max_connections = layers.value_or(|r| &mut r.max_connections, DEFAULT_MAX_CONNECTIONS);
        if max_connections == 0 {
            return Err(invalid(
                "max_connections",
                CONFIGURATION.into(),
                "must be at least 1".into(),
            ));
        }

        let max_message_size = match layers.take(|r| &mut r.max_message_size) {
            Some((v, src)) => parse_size(&v).map_err(|m| invalid("max_message_size", src, m))?,
            None => DEFAULT_MAX_MESSAGE_SIZE as u64,
        };
        if max_message_size < 1024 || max_message_size > DEFAULT_MAX_MESSAGE_SIZE as u64 {
            return Err(invalid(
                "max_message_size",
                CONFIGURATION.into(),
                format!("must be between 1KiB and {DEFAULT_MAX_MESSAGE_SIZE} bytes"),
            ));
        }

        let (timeout, src) = layers.take_or(|r| &mut r.connect_timeout, "10s".to_owned());
        let connect_timeout =
            parse_duration(&timeout).map_err(|m| invalid("connect_timeout", src, m))?;

        let tls = match (
            layers.take(|r| &mut r.tls_cert),
            layers.take(|r| &mut r.tls_key),
        ) {
            (Some((cert, _)), Some((key, _))) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            (Some((cert, src)), None) => {
                return Err(invalid(
                    "tls_key",
                    src,
                    format!(
                        "tls_cert {} is set but tls_key is not: give both or neither",
                        cert.display()
                    ),
                ))
            }
            (None, Some((key, src))) => {
                return Err(invalid(
                    "tls_cert",
                    src,
                    format!(
                        "tls_key {} is set but tls_cert is not: give both or neither",
                        key.display()
                    ),
                ))
            }
        };
        let require_client_tls = layers.value_or(|r| &mut r.require_client_tls, false);
        if require_client_tls && tls.is_none() {
            return Err(invalid(
                "require_client_tls",
                CONFIGURATION.into(),
                "needs tls_cert and tls_key".into(),
            ));
        }
        let upstream_ca = layers.take(|r| &mut r.upstream_ca).map(|(p, _)| p);
        let upstream_sslmode = match layers.take(|r| &mut r.upstream_sslmode) {
            Some((mode, src)) => {
                let mode = mode
                    .parse::<SslMode>()
                    .map_err(|m| invalid("upstream_sslmode", src.clone(), m))?;
                match upstream.sslmode {
                    Some(in_url) if in_url != mode => {
                        return Err(invalid(
                            "upstream_sslmode",
                            src,
                            format!("{mode} contradicts sslmode={in_url} in the upstream URL"),
                        ))
                    }
                    _ => mode,
                }
            }
            None => match upstream.sslmode {
                Some(in_url) => in_url,
                None if upstream_ca.is_some() => SslMode::VerifyFull,
                None => SslMode::Prefer,
            },
        };
        if matches!(upstream_sslmode, SslMode::VerifyCa | SslMode::VerifyFull)
            && upstream_ca.is_none()
        {
            return Err(invalid(
                "upstream_ca",
                CONFIGURATION.into(),
                format!("upstream_sslmode {upstream_sslmode} needs a CA file"),
            ));
        }

        Ok(ProxyConfig {
            listen,
            upstream_host: upstream.host.clone(),
            upstream_port: upstream.port,
            max_connections,
            max_message_size: usize::try_from(max_message_size).unwrap_or(usize::MAX),
            connect_timeout,
            tls,
            require_client_tls,
            upstream_sslmode,
            upstream_ca,
        })
    }
}

/// Settings of the keys: which KEKs wrap and unwrap DEKs, where the key store is, how DEKs are
/// cached and when they are rotated.
#[derive(Debug, Clone)]
pub struct KeysConfig {
    /// KEK provider: wraps new DEKs and unwraps the DEKs it wrapped.
    pub kms: KmsUri,
    /// Further KEK providers, used only to unwrap DEKs they wrapped (during a migration).
    pub kms_also: Vec<KmsUri>,
    /// Schema of the key store (`data_keys`, `key_events`) in the upstream database.
    pub key_schema: String,
    /// How long an unwrapped DEK stays cached.
    pub key_cache_ttl: Duration,
    /// How many unwrapped DEKs are cached at most.
    pub key_cache_capacity: u64,
    /// When a DEK is rotated automatically: after this many encryptions, or at this age.
    pub rotation: RotationPolicy,
    /// How often encryption counts are saved to the key store and automatic rotation is
    /// checked.
    pub counter_flush_interval: Duration,
}

impl KeysConfig {
    fn resolve(layers: &mut Layers) -> Result<Self, ConfigError> {
        let (kms, src) = layers.take_or(|r| &mut r.kms, DEFAULT_KMS.to_owned());
        let kms = kms
            .parse::<KmsUri>()
            .map_err(|e| invalid("kms", src, e.to_string()))?;
        let (also, src) = layers.take_list(|r| &mut r.kms_also);
        let kms_also = also
            .iter()
            .map(|u| u.trim())
            .filter(|u| !u.is_empty())
            .map(|u| {
                u.parse::<KmsUri>()
                    .map_err(|e| invalid("kms_also", src.clone(), e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;

        let (ttl, src) = layers.take_or(|r| &mut r.key_cache_ttl, "300s".to_owned());
        let key_cache_ttl = parse_duration(&ttl).map_err(|m| invalid("key_cache_ttl", src, m))?;
        let key_cache_capacity = layers.value_or(|r| &mut r.key_cache_capacity, 10_000);
        if key_cache_capacity == 0 {
            return Err(invalid(
                "key_cache_capacity",
                CONFIGURATION.into(),
                "must be at least 1".into(),
            ));
        }

        let (key_schema, src) =
            layers.take_or(|r| &mut r.key_schema, DEFAULT_KEY_SCHEMA.to_owned());
        if !crate::keys::is_plain_identifier(&key_schema) {
            return Err(invalid(
                "key_schema",
                src,
                format!("`{key_schema}` is not 1-63 characters of a-z, 0-9 and _ (not starting with a digit)"),
            ));
        }

        let max_encryptions = layers.value_or(
            |r| &mut r.rotate_after_encryptions,
            DEFAULT_ROTATE_AFTER_ENCRYPTIONS,
        );
        if max_encryptions == 0 || max_encryptions > MAX_ROTATE_AFTER_ENCRYPTIONS {
            return Err(invalid(
                "rotate_after_encryptions",
                CONFIGURATION.into(),
                format!("must be between 1 and {MAX_ROTATE_AFTER_ENCRYPTIONS} (2^32 random nonces per key is the hard limit)"),
            ));
        }
        let (age, src) = layers.take_or(|r| &mut r.rotate_after_age, "off".to_owned());
        let max_age = match age.as_str() {
            "off" | "" => None,
            text => {
                let age = parse_duration(text)
                    .map_err(|m| invalid("rotate_after_age", src.clone(), m))?;
                if age < Duration::from_secs(1) {
                    return Err(invalid(
                        "rotate_after_age",
                        src,
                        "must be at least 1s (or off)".into(),
                    ));
                }
                Some(age)
            }
        };

        let counter_flush_interval = match layers.take(|r| &mut r.counter_flush_interval) {
            Some((text, src)) => {
                let every = parse_duration(&text)
                    .map_err(|m| invalid("counter_flush_interval", src.clone(), m))?;
                if !(MIN_COUNTER_FLUSH_INTERVAL..=MAX_COUNTER_FLUSH_INTERVAL).contains(&every) {
                    return Err(invalid(
                        "counter_flush_interval",
                        src,
                        format!(
                            "must be between {MIN_COUNTER_FLUSH_INTERVAL:?} and \
                             {MAX_COUNTER_FLUSH_INTERVAL:?} (the encryptions of one interval \
                             are the margin below the nonce limit)"
                        ),
                    ));
                }
                every
            }
            None => DEFAULT_COUNTER_FLUSH_INTERVAL,
        };

        Ok(KeysConfig {
            kms,
            kms_also,
            key_schema,
            key_cache_ttl,
            key_cache_capacity,
            rotation: RotationPolicy {
                max_encryptions,
                max_age,
            },
            counter_flush_interval,
        })
    }
}

/// Settings of encryption: which columns are encrypted, who owns a written value, and what
/// reading an encrypted column may return.
#[derive(Debug, Clone)]
pub struct EncryptionConfig {
    /// Rule file or directory.
    pub rules: PathBuf,
    /// Organisation for writes when neither the row nor the session names one.
    pub default_tenant: Option<OrgId>,
    /// Plaintext found in an encrypted column is an error instead of being passed through.
    pub strict_reads: bool,
    /// What a value under a destroyed (shredded) DEK reads as.
    pub shredded_reads: ShreddedReads,
}

impl EncryptionConfig {
    fn resolve(layers: &mut Layers) -> Result<Self, ConfigError> {
        let (rules, src) = layers.take_or(|r| &mut r.rules, PathBuf::from(DEFAULT_RULES));
        if rules.as_os_str().is_empty() {
            return Err(invalid("rules", src, "must not be empty".into()));
        }
        let default_tenant = match layers.take(|r| &mut r.default_tenant) {
            Some((v, src)) => {
                Some(OrgId::new(v).map_err(|e| invalid("default_tenant", src, e.to_string()))?)
            }
            None => None,
        };
        let strict_reads = layers.value_or(|r| &mut r.strict_reads, false);
        let (shredded, src) = layers.take_or(|r| &mut r.shredded_reads, "error".to_owned());
        let shredded_reads = match shredded.as_str() {
            "error" => ShreddedReads::Error,
            "null" => ShreddedReads::Null,
            other => {
                return Err(invalid(
                    "shredded_reads",
                    src,
                    format!("`{other}` is not error or null"),
                ))
            }
        };
        Ok(EncryptionConfig {
            rules,
            default_tenant,
            strict_reads,
            shredded_reads,
        })
    }
}

/// Settings of how the process runs: logging, worker threads, shutdown and the admin
/// endpoint.
#[derive(Debug, Clone)]
pub struct OpsConfig {
    /// Log filter (tracing `EnvFilter` syntax); `RUST_LOG` applies when unset.
    pub log: Option<String>,
    /// Log format.
    pub log_format: LogFormat,
    /// Threads serving connections.
    pub workers: usize,
    /// How long SIGTERM waits for sessions to reach an idle point.
    pub shutdown_grace: Duration,
    /// Admin HTTP address (`/metrics`, `/healthz`, `/readyz`), if enabled.
    pub admin: Option<SocketAddr>,
}

impl OpsConfig {
    fn resolve(layers: &mut Layers) -> Result<Self, ConfigError> {
        let (format, src) = layers.take_or(|r| &mut r.log_format, "text".to_owned());
        let log_format = match format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(invalid(
                    "log_format",
                    src,
                    format!("`{other}` is not text or json"),
                ))
            }
        };
        let log = layers.take(|r| &mut r.log).map(|(v, _)| v);
        let workers = match layers.value_or(|r| &mut r.workers, 0) {
            0 => std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            n => n,
        };
        let (grace, src) = layers.take_or(|r| &mut r.shutdown_grace, "30s".to_owned());
        let shutdown_grace =
            parse_duration(&grace).map_err(|m| invalid("shutdown_grace", src, m))?;
        let admin = match layers.take(|r| &mut r.admin) {
            Some((v, _)) if v.is_empty() || v == "off" => None,
            Some((v, src)) => Some(v.parse::<SocketAddr>().map_err(|e| {
                invalid(
                    "admin",
                    src,
                    format!("{e} (expected HOST:PORT with an IP address)"),
                )
            })?),
            None => None,
        };
        Ok(OpsConfig {
            log,
            log_format,
            workers,
            shutdown_grace,
            admin,
        })
    }
}

/// A configuration error, naming where the bad value came from.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The configuration file could not be read or parsed.
    #[error("{}: {message}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong (includes the line and key for parse errors).
        message: String,
    },
    /// A value is invalid.
    #[error("invalid value for `{key}` (from {source_name}): {message}")]
    Value {
        /// The key or flag.
        key: &'static str,
        /// Where the value came from: "command line or environment", the file, or "default".
        source_name: String,
        /// What is wrong.
        message: String,
    },
}

/// Source name of a value from the command line or the environment.
const FROM_TOP: &str = "command line or environment";
/// Source name of a default value.
const FROM_DEFAULT: &str = "default";
/// Source name of an error about a value's range (wherever the value came from).
const CONFIGURATION: &str = "configuration";

/// The two layers [`Config::resolve`] merges. Each setting is taken out once, with the name
/// of the layer it came from.
struct Layers {
    top: RawConfig,
    file: RawConfig,
    /// The file's path as shown in errors.
    file_name: String,
}

impl Layers {
    fn new(top: RawConfig, file: Option<(&Path, RawConfig)>) -> Self {
        let (file_name, file) = match file {
            Some((path, raw)) => (path.display().to_string(), raw),
            None => (String::new(), RawConfig::default()),
        };
        Layers {
            top,
            file,
            file_name,
        }
    }

    /// The setting `field` from the command line, else from the file, with its source name.
    fn take<T>(&mut self, field: impl Fn(&mut RawConfig) -> &mut Option<T>) -> Option<(T, String)> {
        if let Some(v) = field(&mut self.top).take() {
            return Some((v, FROM_TOP.to_owned()));
        }
        field(&mut self.file)
            .take()
            .map(|v| (v, self.file_name.clone()))
    }

    /// [`Layers::take`], else `default`.
    fn take_or<T>(
        &mut self,
        field: impl Fn(&mut RawConfig) -> &mut Option<T>,
        default: T,
    ) -> (T, String) {
        self.take(field)
            .unwrap_or_else(|| (default, FROM_DEFAULT.to_owned()))
    }

    /// The value of [`Layers::take`] without its source, else `default` (for settings whose
    /// errors do not name a source).
    fn value_or<T>(&mut self, field: impl Fn(&mut RawConfig) -> &mut Option<T>, default: T) -> T {
        self.take(field).map_or(default, |(v, _)| v)
    }

    /// A list setting: the command line's if it gave any item, else the file's (maybe
    /// empty).
    fn take_list<T>(&mut self, field: impl Fn(&mut RawConfig) -> &mut Vec<T>) -> (Vec<T>, String) {
        let top = std::mem::take(field(&mut self.top));
        if !top.is_empty() {
            return (top, FROM_TOP.to_owned());
        }
        (
            std::mem::take(field(&mut self.file)),
            self.file_name.clone(),
        )
    }
}

/// A [`ConfigError::Value`].
fn invalid(key: &'static str, source_name: String, message: String) -> ConfigError {
    ConfigError::Value {
        key,
        source_name,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = Config::resolve(RawConfig::default(), None).unwrap();
        assert_eq!(c.proxy.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.upstream.host, "127.0.0.1");
        assert_eq!(c.upstream.port, 5432);
        assert_eq!(c.upstream.service.get_user(), Some("postgres"));
        assert_eq!(c.proxy.connect_timeout, Duration::from_secs(10));
    }

    #[test]
    fn precedence_flag_over_file() {
        let raw = RawConfig::parse(
            Path::new("p.toml"),
            "listen = \"127.0.0.1:7000\"\nupstream = \"postgres://u@db:6000/x\"\n",
        )
        .unwrap();
        let top = RawConfig {
            listen: Some("127.0.0.1:7001".into()),
            ..RawConfig::default()
        };
        let c = Config::resolve(top, Some((Path::new("p.toml"), raw))).unwrap();
        assert_eq!(c.proxy.listen.port(), 7001);
        assert_eq!(c.upstream.host, "db");
        assert_eq!(c.upstream.port, 6000);
    }

    #[test]
    fn sslmode_in_the_upstream_url_is_honoured() {
        let with = |upstream: &str, flag: Option<&str>| {
            Config::resolve(
                RawConfig {
                    upstream: Some(upstream.into()),
                    upstream_sslmode: flag.map(Into::into),
                    upstream_ca: Some("ca.crt".into()),
                    ..RawConfig::default()
                },
                None,
            )
        };
        let c = with(
            "postgres://u@db:6000/x?sslmode=require&application_name=a",
            None,
        )
        .unwrap();
        assert_eq!(c.proxy.upstream_sslmode, SslMode::Require);
        assert_eq!(c.upstream.service.get_application_name(), Some("a"));
        assert_eq!(c.upstream.port, 6000);
        let c = with("postgresql://u@db/x?sslmode=verify-full", None).unwrap();
        assert_eq!(c.proxy.upstream_sslmode, SslMode::VerifyFull);
        let c = with("host=db port=6001 sslmode=disable user=u", None).unwrap();
        assert_eq!(c.proxy.upstream_sslmode, SslMode::Disable);
        assert_eq!(c.upstream.service.get_user(), Some("u"));
        assert_eq!(c.upstream.port, 6001);
        // Spaced and quoted forms; the other values, quoted spaces included, stay as given.
        let c = with(
            "host=db sslmode = 'verify-ca' password='two  spaces' user=u",
            None,
        )
        .unwrap();
        assert_eq!(c.proxy.upstream_sslmode, SslMode::VerifyCa);
        assert_eq!(c.upstream.service.get_password(), Some(&b"two  spaces"[..]));
        assert_eq!(c.upstream.service.get_user(), Some("u"));
        let (rest, mode) = take_sslmode("host=db password='a b' sslmode=require").unwrap();
        assert_eq!(rest, "host=db password='a b' ");
        assert_eq!(mode, Some(SslMode::Require));
        // Same value twice is fine; a contradiction is an error, never a silent downgrade.
        let c = with("postgres://u@db/x?sslmode=require", Some("require")).unwrap();
        assert_eq!(c.proxy.upstream_sslmode, SslMode::Require);
        let msg = with("postgres://u@db/x?sslmode=require", Some("prefer"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("contradicts sslmode=require"), "{msg}");
        let msg = with("postgres://u@db/x?sslmode=sometimes", None)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("sometimes"), "{msg}");
        let msg = with("postgres://u@db/x?sslmode=require&sslmode=disable", None)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("twice"), "{msg}");
    }

    proptest::proptest! {
        /// Any text, including near-misses of quoting, is split without panicking.
        #[test]
        fn take_sslmode_never_panics(s in "[a-z =' \\\\é]{0,40}", t in proptest::prelude::any::<String>()) {
            let _ = take_sslmode(&s);
            let _ = take_sslmode(&format!("sslmode = {t}"));
            let _ = take_sslmode(&t);
        }
    }

    #[test]
    fn data_database_replaces_only_the_database() {
        let upstream = "postgres://svc:secret@db:6000/keys?application_name=a";
        let raw = RawConfig::parse(Path::new("p.toml"), "data_database = \"from_file\"\n").unwrap();
        let resolve = |top: Option<&str>, file: Option<&RawConfig>| {
            Config::resolve(
                RawConfig {
                    upstream: Some(upstream.into()),
                    data_database: top.map(Into::into),
                    ..RawConfig::default()
                },
                file.map(|f| (Path::new("p.toml"), f.clone())),
            )
        };

        // Unset: the data is in the key store's database.
        let c = resolve(None, None).unwrap();
        assert_eq!(c.upstream.data_database, None);
        assert_eq!(c.upstream.key_store_database(), "keys");
        assert_eq!(c.upstream.data_database_name(), "keys");
        assert_eq!(c.upstream.data_service().get_dbname(), Some("keys"));
        assert_eq!(
            resolve(Some(""), None).unwrap().upstream.data_database,
            None
        );

        // Flag over file; everything but the database stays the upstream's.
        let c = resolve(None, Some(&raw)).unwrap();
        assert_eq!(c.upstream.data_database_name(), "from_file");
        let c = resolve(Some("appdb"), Some(&raw)).unwrap();
        assert_eq!(c.upstream.data_database_name(), "appdb");
        assert_eq!(c.upstream.key_store_database(), "keys");
        assert_eq!(c.upstream.service.get_dbname(), Some("keys"));
        let data = c.upstream.data_service();
        assert_eq!(data.get_dbname(), Some("appdb"));
        assert_eq!(data.get_user(), Some("svc"));
        assert_eq!(data.get_password(), Some(&b"secret"[..]));
        assert_eq!(data.get_hosts(), c.upstream.service.get_hosts());
        assert_eq!(data.get_ports(), [6000]);
        assert_eq!(data.get_application_name(), Some("a"));

        // Without a database in the URL, PostgreSQL uses the user's name.
        let c = Config::resolve(
            RawConfig {
                upstream: Some("host=db user=svc".into()),
                ..RawConfig::default()
            },
            None,
        )
        .unwrap();
        assert_eq!(c.upstream.key_store_database(), "svc");

        for bad in ["a\0b".to_owned(), "d".repeat(64)] {
            let msg = resolve(Some(&bad), None).unwrap_err().to_string();
            assert!(
                msg.contains("data_database") && msg.contains("command line"),
                "{msg}"
            );
        }
        assert!(resolve(Some(&"d".repeat(63)), None).is_ok());
    }

    #[test]
    fn unknown_file_key_names_file_and_key() {
        let e = RawConfig::parse(Path::new("p.toml"), "listn = \"x\"\n").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("p.toml"), "{msg}");
        assert!(msg.contains("listn"), "{msg}");
        assert!(msg.contains("line 1"), "{msg}");
    }

    #[test]
    fn max_message_size_number_or_text() {
        let size = |file: &str| {
            let raw = RawConfig::parse(Path::new("p.toml"), file).unwrap();
            Config::resolve(RawConfig::default(), Some((Path::new("p.toml"), raw)))
        };
        assert_eq!(
            size("max_message_size = 65536\n")
                .unwrap()
                .proxy
                .max_message_size,
            65_536
        );
        assert_eq!(
            size("max_message_size = \"64KiB\"\n")
                .unwrap()
                .proxy
                .max_message_size,
            65_536
        );
        let msg = size("max_message_size = \"lots\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("max_message_size") && msg.contains("p.toml"),
            "{msg}"
        );
        assert!(RawConfig::parse(Path::new("p.toml"), "max_message_size = true\n").is_err());
    }

    #[test]
    fn counter_flush_interval_default_and_bounds() {
        let every = |v: &str| {
            Config::resolve(
                RawConfig {
                    counter_flush_interval: Some(v.into()),
                    ..RawConfig::default()
                },
                None,
            )
        };
        let c = Config::resolve(RawConfig::default(), None).unwrap();
        assert_eq!(c.keys.counter_flush_interval, Duration::from_secs(5));
        assert_eq!(
            every("200ms").unwrap().keys.counter_flush_interval,
            Duration::from_millis(200)
        );
        for bad in ["0", "2m", "soon"] {
            let msg = every(bad).unwrap_err().to_string();
            assert!(
                msg.contains("counter_flush_interval") && msg.contains("command line"),
                "{msg}"
            );
        }
    }

    #[test]
    fn bad_values_name_the_key() {
        let raw = RawConfig::parse(Path::new("p.toml"), "connect_timeout = \"soon\"\n").unwrap();
        let e =
            Config::resolve(RawConfig::default(), Some((Path::new("p.toml"), raw))).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("connect_timeout") && msg.contains("p.toml"),
            "{msg}"
        );
    }

    #[test]
    fn tls_files_both_or_neither() {
        let top = RawConfig {
            tls_cert: Some("server.crt".into()),
            ..RawConfig::default()
        };
        let msg = Config::resolve(top, None).unwrap_err().to_string();
        assert!(
            msg.contains("tls_key") && msg.contains("server.crt"),
            "{msg}"
        );
        let c = Config::resolve(RawConfig::default(), None).unwrap();
        assert!(c.proxy.tls.is_none());
        assert_eq!(c.proxy.upstream_sslmode, SslMode::Prefer);
        let top = RawConfig {
            upstream_ca: Some("ca.crt".into()),
            ..RawConfig::default()
        };
        assert_eq!(
            Config::resolve(top, None).unwrap().proxy.upstream_sslmode,
            SslMode::VerifyFull
        );
        let top = RawConfig {
            upstream_sslmode: Some("verify-ca".into()),
            ..RawConfig::default()
        };
        let msg = Config::resolve(top, None).unwrap_err().to_string();
        assert!(msg.contains("upstream_ca"), "{msg}");
    }

    #[test]
    fn kms_also_from_file_or_flags() {
        let raw = RawConfig::parse(
            Path::new("p.toml"),
            "kms = \"aws-kms:alias/new\"\nkms_also = [\"local:old-kek\"]\n",
        )
        .unwrap();
        let c = Config::resolve(
            RawConfig::default(),
            Some((Path::new("p.toml"), raw.clone())),
        )
        .unwrap();
        assert_eq!(c.keys.kms.to_string(), "aws-kms:alias/new");
        assert_eq!(c.keys.kms_also.len(), 1);
        assert_eq!(c.keys.kms_also[0].to_string(), "local:old-kek");

        let top = RawConfig {
            kms_also: vec!["aws-kms:alias/a".into(), "aws-kms:alias/b".into()],
            ..RawConfig::default()
        };
        let c = Config::resolve(top, Some((Path::new("p.toml"), raw))).unwrap();
        assert_eq!(c.keys.kms_also.len(), 2);
        assert!(Config::resolve(RawConfig::default(), None)
            .unwrap()
            .keys
            .kms_also
            .is_empty());

        let top = RawConfig {
            kms_also: vec!["vault:x".into()],
            ..RawConfig::default()
        };
        let msg = Config::resolve(top, None).unwrap_err().to_string();
        assert!(msg.contains("kms_also"), "{msg}");
    }
}
