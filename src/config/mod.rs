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

use crate::crypto::OrgId;
use crate::keys::KmsUri;
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

/// One layer of settings, every one optional: the command line with the environment (clap), or
/// the configuration file (serde, `deny_unknown_fields`). [`Config::resolve`] lays the command
/// line over the file over the defaults.
///
/// Each field is a setting: its name is the file key, `--name-with-dashes` the flag and
/// `PGENVELOPE_NAME` the environment variable; its doc comment is the flag's `--help` text.
/// `pgenvelope serve` takes every field as a flag; the other commands fill in the fields they
/// have flags for and leave the rest `None` (`..RawConfig::default()`).
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
    pub service: tokio_postgres::Config,
    /// `sslmode` given in the URL or keyword string, if any (see [`Upstream::parse`]).
    pub sslmode: Option<SslMode>,
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
        })
    }
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

/// Validated configuration of `pgenvelope serve`.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// Upstream server.
    pub upstream: Upstream,
    /// Connection limit.
    pub max_connections: usize,
    /// Message size limit in bytes.
    pub max_message_size: usize,
    /// Upstream connect timeout.
    pub connect_timeout: Duration,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter (tracing `EnvFilter` syntax); `RUST_LOG` applies when unset.
    pub log: Option<String>,
    /// Rule file or directory.
    pub rules: PathBuf,
    /// KEK provider: wraps new DEKs and unwraps the DEKs it wrapped.
    pub kms: KmsUri,
    /// Further KEK providers, used only to unwrap DEKs they wrapped (during a migration).
    pub kms_also: Vec<KmsUri>,
    /// Organisation for writes when neither the row nor the session names one.
    pub default_tenant: Option<OrgId>,
    /// Plaintext found in an encrypted column is an error instead of being passed through.
    pub strict_reads: bool,
    /// How long an unwrapped DEK stays cached.
    pub key_cache_ttl: Duration,
    /// How many unwrapped DEKs are cached at most.
    pub key_cache_capacity: u64,
    /// Schema of the key store (`data_keys`, `key_events`) in the upstream database.
    pub key_schema: String,
    /// What a value under a destroyed (shredded) DEK reads as.
    pub shredded_reads: crate::cipher::ShreddedReads,
    /// A DEK is rotated automatically once it has encrypted this many values.
    pub rotate_after_encryptions: u64,
    /// A DEK is rotated automatically once it is this old (`None`: never by age).
    pub rotate_after_age: Option<Duration>,
    /// Threads serving connections.
    pub workers: usize,
    /// How long SIGTERM waits for sessions to reach an idle point.
    pub shutdown_grace: Duration,
    /// Admin HTTP address (`/metrics`, `/healthz`, `/readyz`), if enabled.
    pub admin: Option<SocketAddr>,
    /// Certificate and key for TLS toward clients; `None`: SSLRequest is answered `N`.
    pub tls: Option<TlsFiles>,
    /// Refuse clients that do not negotiate TLS.
    pub require_client_tls: bool,
    /// TLS toward the upstream server.
    pub upstream_sslmode: SslMode,
    /// CA file for verifying the upstream server's certificate.
    pub upstream_ca: Option<PathBuf>,
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
    /// Timeout for connecting to the upstream.
    pub connect_timeout: Duration,
    /// Certificate and key for TLS toward clients; `None`: SSLRequest is answered `N`.
    pub tls: Option<TlsFiles>,
    /// Refuse a StartupMessage that did not come over TLS (28000).
    pub require_client_tls: bool,
    /// TLS toward the upstream server.
    pub upstream_sslmode: SslMode,
    /// CA file for verifying the upstream server (needed by verify-ca and verify-full).
    pub upstream_ca: Option<std::path::PathBuf>,
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

impl Config {
    /// Lay `top` (the command line and environment) over the file over the defaults, and
    /// validate. An error names the key and where its value came from.
    pub fn resolve(
        top: RawConfig,
        file: Option<(&Path, RawConfig)>,
    ) -> Result<Config, ConfigError> {
        let (file_name, raw) = match file {
            Some((path, raw)) => (format!("{}", path.display()), raw),
            None => (String::new(), RawConfig::default()),
        };
        let pick =
            |flag: Option<String>, file: Option<String>, default: &str| -> (String, String) {
                match (flag, file) {
                    (Some(v), _) => (v, "command line or environment".to_owned()),
                    (None, Some(v)) => (v, file_name.clone()),
                    (None, None) => (default.to_owned(), "default".to_owned()),
                }
            };
        let err = |key: &'static str, source_name: String, message: String| ConfigError::Value {
            key,
            source_name,
            message,
        };

        let (listen, src) = pick(top.listen, raw.listen, DEFAULT_LISTEN);
        let listen = listen.parse::<SocketAddr>().map_err(|e| {
            err(
                "listen",
                src,
                format!("{e} (expected HOST:PORT with an IP address)"),
            )
        })?;

        let (upstream, src) = pick(top.upstream, raw.upstream, DEFAULT_UPSTREAM);
        let upstream = Upstream::parse(&upstream).map_err(|m| err("upstream", src, m))?;

        let max_connections = top
            .max_connections
            .or(raw.max_connections)
            .unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if max_connections == 0 {
            return Err(err(
                "max_connections",
                "configuration".into(),
                "must be at least 1".into(),
            ));
        }

        let max_message_size = match (top.max_message_size, raw.max_message_size) {
            (Some(v), _) => parse_size(&v)
                .map_err(|m| err("max_message_size", "command line or environment".into(), m))?,
            (None, Some(v)) => {
                parse_size(&v).map_err(|m| err("max_message_size", file_name.clone(), m))?
            }
            (None, None) => DEFAULT_MAX_MESSAGE_SIZE as u64,
        };
        if max_message_size < 1024 || max_message_size > DEFAULT_MAX_MESSAGE_SIZE as u64 {
            return Err(err(
                "max_message_size",
                "configuration".into(),
                format!("must be between 1KiB and {DEFAULT_MAX_MESSAGE_SIZE} bytes"),
            ));
        }

        let (timeout, src) = pick(top.connect_timeout, raw.connect_timeout, "10s");
        let connect_timeout =
            parse_duration(&timeout).map_err(|m| err("connect_timeout", src, m))?;

        let (format, src) = pick(top.log_format, raw.log_format, "text");
        let log_format = match format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(err(
                    "log_format",
                    src,
                    format!("`{other}` is not text or json"),
                ))
            }
        };

        let (rules, src) = match (top.rules, raw.rules) {
            (Some(v), _) => (v, "command line or environment".to_owned()),
            (None, Some(v)) => (v, file_name.clone()),
            (None, None) => (PathBuf::from(DEFAULT_RULES), "default".to_owned()),
        };
        if rules.as_os_str().is_empty() {
            return Err(err("rules", src, "must not be empty".into()));
        }

        let (kms, src) = pick(top.kms, raw.kms, DEFAULT_KMS);
        let kms = kms
            .parse::<KmsUri>()
            .map_err(|e| err("kms", src, e.to_string()))?;
        let (also, src) = match (top.kms_also, raw.kms_also) {
            (flag, _) if !flag.is_empty() => (flag, "command line or environment".to_owned()),
            (_, file) => (file, file_name.clone()),
        };
        let kms_also = also
            .iter()
            .map(|u| u.trim())
            .filter(|u| !u.is_empty())
            .map(|u| {
                u.parse::<KmsUri>()
                    .map_err(|e| err("kms_also", src.clone(), e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;

        let default_tenant = match (top.default_tenant, raw.default_tenant) {
            (Some(v), _) => Some((v, "command line or environment".to_owned())),
            (None, Some(v)) => Some((v, file_name.clone())),
            (None, None) => None,
        };
        let default_tenant = match default_tenant {
            Some((v, src)) => {
                Some(OrgId::new(v).map_err(|e| err("default_tenant", src, e.to_string()))?)
            }
            None => None,
        };

        let (ttl, src) = pick(top.key_cache_ttl, raw.key_cache_ttl, "300s");
        let key_cache_ttl = parse_duration(&ttl).map_err(|m| err("key_cache_ttl", src, m))?;
        let key_cache_capacity = top
            .key_cache_capacity
            .or(raw.key_cache_capacity)
            .unwrap_or(10_000);
        if key_cache_capacity == 0 {
            return Err(err(
                "key_cache_capacity",
                "configuration".into(),
                "must be at least 1".into(),
            ));
        }

        let (key_schema, src) = pick(top.key_schema, raw.key_schema, DEFAULT_KEY_SCHEMA);
        if !crate::keys::is_plain_identifier(&key_schema) {
            return Err(err(
                "key_schema",
                src,
                format!("`{key_schema}` is not 1-63 characters of a-z, 0-9 and _ (not starting with a digit)"),
            ));
        }
        let (shredded, src) = pick(top.shredded_reads, raw.shredded_reads, "error");
        let shredded_reads = match shredded.as_str() {
            "error" => crate::cipher::ShreddedReads::Error,
            "null" => crate::cipher::ShreddedReads::Null,
            other => {
                return Err(err(
                    "shredded_reads",
                    src,
                    format!("`{other}` is not error or null"),
                ))
            }
        };
        let rotate_after_encryptions = top
            .rotate_after_encryptions
            .or(raw.rotate_after_encryptions)
            .unwrap_or(DEFAULT_ROTATE_AFTER_ENCRYPTIONS);
        if rotate_after_encryptions == 0 || rotate_after_encryptions > MAX_ROTATE_AFTER_ENCRYPTIONS
        {
            return Err(err(
                "rotate_after_encryptions",
                "configuration".into(),
                format!("must be between 1 and {MAX_ROTATE_AFTER_ENCRYPTIONS} (2^32 random nonces per key is the hard limit)"),
            ));
        }
        let (age, src) = pick(top.rotate_after_age, raw.rotate_after_age, "off");
        let rotate_after_age = match age.as_str() {
            "off" | "" => None,
            text => {
                let age =
                    parse_duration(text).map_err(|m| err("rotate_after_age", src.clone(), m))?;
                if age < Duration::from_secs(1) {
                    return Err(err(
                        "rotate_after_age",
                        src,
                        "must be at least 1s (or off)".into(),
                    ));
                }
                Some(age)
            }
        };

        let workers = match top.workers.or(raw.workers).unwrap_or(0) {
            0 => std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            n => n,
        };

        let (grace, src) = pick(top.shutdown_grace, raw.shutdown_grace, "30s");
        let shutdown_grace = parse_duration(&grace).map_err(|m| err("shutdown_grace", src, m))?;

        let admin = match (top.admin, raw.admin) {
            (Some(v), _) => Some((v, "command line or environment".to_owned())),
            (None, Some(v)) => Some((v, file_name.clone())),
            (None, None) => None,
        };
        let admin = match admin {
            Some((v, _)) if v.is_empty() || v == "off" => None,
            Some((v, src)) => Some(v.parse::<SocketAddr>().map_err(|e| {
                err(
                    "admin",
                    src,
                    format!("{e} (expected HOST:PORT with an IP address)"),
                )
            })?),
            None => None,
        };

        let path_pick = |flag: Option<PathBuf>, file: Option<PathBuf>| match (flag, file) {
            (Some(v), _) => Some((v, "command line or environment".to_owned())),
            (None, Some(v)) => Some((v, file_name.clone())),
            (None, None) => None,
        };
        let tls = match (
            path_pick(top.tls_cert, raw.tls_cert),
            path_pick(top.tls_key, raw.tls_key),
        ) {
            (Some((cert, _)), Some((key, _))) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            (Some((cert, src)), None) => {
                return Err(err(
                    "tls_key",
                    src,
                    format!(
                        "tls_cert {} is set but tls_key is not: give both or neither",
                        cert.display()
                    ),
                ))
            }
            (None, Some((key, src))) => {
                return Err(err(
                    "tls_cert",
                    src,
                    format!(
                        "tls_key {} is set but tls_cert is not: give both or neither",
                        key.display()
                    ),
                ))
            }
        };
        let require_client_tls = top
            .require_client_tls
            .or(raw.require_client_tls)
            .unwrap_or(false);
        if require_client_tls && tls.is_none() {
            return Err(err(
                "require_client_tls",
                "configuration".into(),
                "needs tls_cert and tls_key".into(),
            ));
        }
        let upstream_ca = path_pick(top.upstream_ca, raw.upstream_ca).map(|(p, _)| p);
        let upstream_sslmode = match path_pick(
            top.upstream_sslmode.map(PathBuf::from),
            raw.upstream_sslmode.map(PathBuf::from),
        ) {
            Some((mode, src)) => {
                let mode = mode
                    .to_string_lossy()
                    .parse::<SslMode>()
                    .map_err(|m| err("upstream_sslmode", src.clone(), m))?;
                match upstream.sslmode {
                    Some(in_url) if in_url != mode => {
                        return Err(err(
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
            return Err(err(
                "upstream_ca",
                "configuration".into(),
                format!("upstream_sslmode {upstream_sslmode} needs a CA file"),
            ));
        }

        Ok(Config {
            tls,
            require_client_tls,
            upstream_sslmode,
            upstream_ca,
            admin,
            shutdown_grace,
            workers,
            rules,
            kms,
            kms_also,
            default_tenant,
            strict_reads: top.strict_reads.or(raw.strict_reads).unwrap_or(false),
            key_cache_ttl,
            key_cache_capacity,
            key_schema,
            shredded_reads,
            rotate_after_encryptions,
            rotate_after_age,
            listen,
            upstream,
            max_connections,
            max_message_size: usize::try_from(max_message_size).unwrap_or(usize::MAX),
            connect_timeout,
            log_format,
            log: top.log.or(raw.log),
        })
    }

    /// The proxy's listener and connection settings.
    pub fn proxy(&self) -> ProxyConfig {
        ProxyConfig {
            listen: self.listen,
            upstream_host: self.upstream.host.clone(),
            upstream_port: self.upstream.port,
            max_connections: self.max_connections,
            max_message_size: self.max_message_size,
            connect_timeout: self.connect_timeout,
            tls: self.tls.clone(),
            require_client_tls: self.require_client_tls,
            upstream_sslmode: self.upstream_sslmode,
            upstream_ca: self.upstream_ca.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = Config::resolve(RawConfig::default(), None).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.upstream.host, "127.0.0.1");
        assert_eq!(c.upstream.port, 5432);
        assert_eq!(c.upstream.service.get_user(), Some("postgres"));
        assert_eq!(c.connect_timeout, Duration::from_secs(10));
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
        assert_eq!(c.listen.port(), 7001);
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
        assert_eq!(c.upstream_sslmode, SslMode::Require);
        assert_eq!(c.upstream.service.get_application_name(), Some("a"));
        assert_eq!(c.upstream.port, 6000);
        let c = with("postgresql://u@db/x?sslmode=verify-full", None).unwrap();
        assert_eq!(c.upstream_sslmode, SslMode::VerifyFull);
        let c = with("host=db port=6001 sslmode=disable user=u", None).unwrap();
        assert_eq!(c.upstream_sslmode, SslMode::Disable);
        assert_eq!(c.upstream.service.get_user(), Some("u"));
        assert_eq!(c.upstream.port, 6001);
        // Spaced and quoted forms; the other values, quoted spaces included, stay as given.
        let c = with(
            "host=db sslmode = 'verify-ca' password='two  spaces' user=u",
            None,
        )
        .unwrap();
        assert_eq!(c.upstream_sslmode, SslMode::VerifyCa);
        assert_eq!(c.upstream.service.get_password(), Some(&b"two  spaces"[..]));
        assert_eq!(c.upstream.service.get_user(), Some("u"));
        let (rest, mode) = take_sslmode("host=db password='a b' sslmode=require").unwrap();
        assert_eq!(rest, "host=db password='a b' ");
        assert_eq!(mode, Some(SslMode::Require));
        // Same value twice is fine; a contradiction is an error, never a silent downgrade.
        let c = with("postgres://u@db/x?sslmode=require", Some("require")).unwrap();
        assert_eq!(c.upstream_sslmode, SslMode::Require);
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
            size("max_message_size = 65536\n").unwrap().max_message_size,
            65_536
        );
        assert_eq!(
            size("max_message_size = \"64KiB\"\n")
                .unwrap()
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
        assert!(c.tls.is_none());
        assert_eq!(c.upstream_sslmode, SslMode::Prefer);
        let top = RawConfig {
            upstream_ca: Some("ca.crt".into()),
            ..RawConfig::default()
        };
        assert_eq!(
            Config::resolve(top, None).unwrap().upstream_sslmode,
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
        assert_eq!(c.kms.to_string(), "aws-kms:alias/new");
        assert_eq!(c.kms_also.len(), 1);
        assert_eq!(c.kms_also[0].to_string(), "local:old-kek");

        let top = RawConfig {
            kms_also: vec!["aws-kms:alias/a".into(), "aws-kms:alias/b".into()],
            ..RawConfig::default()
        };
        let c = Config::resolve(top, Some((Path::new("p.toml"), raw))).unwrap();
        assert_eq!(c.kms_also.len(), 2);
        assert!(Config::resolve(RawConfig::default(), None)
            .unwrap()
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
