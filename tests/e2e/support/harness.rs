//! In-process proxy for the end-to-end tests: bound on port 0, on its own runtime thread, so
//! both async tests and tests that drive external clients (psql, pgbench, Python, Node) can
//! use it. Dropping it stops the proxy.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use pgenvelope::app::{App, Parts};
use pgenvelope::config::{Config, RawConfig, SslMode};
use pgenvelope::keys::{KekProvider, RotationPolicy};
use pgenvelope::proxy::ShreddedReads;

/// Host and port of the shared test PostgreSQL (trust auth), overridable with
/// `PGENVELOPE_TEST_PGHOST` / `PGENVELOPE_TEST_PGPORT`.
pub fn main_pg() -> (String, u16) {
    let host = std::env::var("PGENVELOPE_TEST_PGHOST").unwrap_or_else(|_| "127.0.0.1".into());
    let port = std::env::var("PGENVELOPE_TEST_PGPORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(5432);
    (host, port)
}

/// A running proxy.
pub struct TestProxy {
    addr: SocketAddr,
    pub engine: Option<Arc<pgenvelope::proxy::Encryption>>,
    pub handle: pgenvelope::proxy::ServerHandle,
    pub key_schema: String,
    /// The local KEK file (unused when the options gave another KEK provider).
    pub kek_path: PathBuf,
    _dir: Option<tempfile::TempDir>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Options for [`TestProxy`]: the settings of `pgenvelope serve`, as typed values.
/// [`ProxyOptions::to`] states the harness's own defaults; every other value is the product's
/// default.
#[derive(Clone)]
pub struct ProxyOptions {
    pub upstream_host: String,
    pub upstream_port: u16,
    pub max_connections: usize,
    pub max_message_size: usize,
    pub connect_timeout: Duration,
    /// Rule file contents; `Some` turns on encryption.
    pub rules: Option<String>,
    pub default_tenant: Option<String>,
    pub strict_reads: bool,
    /// Key store schema (unique per proxy unless shared on purpose).
    pub key_schema: String,
    /// KEK file (a fresh one in a temp dir unless shared on purpose).
    pub kek_path: Option<PathBuf>,
    /// A KEK provider to use instead of a local key file.
    pub kek: Option<Arc<dyn KekProvider>>,
    /// Unwrap-only KEK providers.
    pub kek_also: Vec<Arc<dyn KekProvider>>,
    /// Database holding the key store.
    pub key_db: String,
    /// Client-facing TLS certificate and key.
    pub tls: Option<pgenvelope::proxy::TlsFiles>,
    /// Refuse plaintext clients.
    pub require_client_tls: bool,
    /// TLS toward the upstream.
    pub upstream_sslmode: SslMode,
    /// CA for verifying the upstream.
    pub upstream_ca: Option<PathBuf>,
    /// Automatic rotation limits.
    pub rotation: RotationPolicy,
    /// What values under destroyed DEKs read as.
    pub shredded_reads: ShreddedReads,
    /// How often encryption counts are flushed (and rotation checked).
    pub counter_flush_interval: Duration,
}

impl ProxyOptions {
    /// A relaying proxy in front of `host:port`. What differs from `pgenvelope serve`'s
    /// defaults: a connection limit and connect timeout sized for tests, a key store schema of
    /// its own, and the key store in the `test` database.
    pub fn to(host: &str, port: u16) -> Self {
        let defaults = Config::resolve(RawConfig::default(), None).expect("the defaults are valid");
        Self {
            upstream_host: host.to_owned(),
            upstream_port: port,
            max_connections: 1000,
            max_message_size: defaults.proxy.max_message_size,
            connect_timeout: Duration::from_secs(5),
            rules: None,
            default_tenant: None,
            strict_reads: defaults.encryption.strict_reads,
            key_schema: unique("pgenvelope_t"),
            kek_path: None,
            kek: None,
            kek_also: Vec::new(),
            key_db: "test".to_owned(),
            tls: None,
            require_client_tls: defaults.proxy.require_client_tls,
            upstream_sslmode: defaults.proxy.upstream_sslmode,
            upstream_ca: None,
            rotation: defaults.keys.rotation,
            shredded_reads: defaults.encryption.shredded_reads,
            counter_flush_interval: defaults.keys.counter_flush_interval,
        }
    }

    /// Encrypting proxy in front of the shared test PostgreSQL with these rules.
    pub fn encrypting(rules: &str) -> Self {
        let (host, port) = main_pg();
        let mut o = Self::to(&host, port);
        o.rules = Some(rules.to_owned());
        o
    }

    /// These options as the settings `pgenvelope serve` would be given, with the rules written
    /// to `dir` (an empty rule directory when there are none) and the local KEK at `kek_path`.
    fn overlay(&self, dir: &Path, kek_path: &Path) -> RawConfig {
        let rules = match &self.rules {
            Some(text) => {
                let file = dir.join("test-rules.toml");
                std::fs::write(&file, text).expect("write the test rules");
                file
            }
            None => {
                let empty = dir.join("rules");
                std::fs::create_dir(&empty).expect("create an empty rule directory");
                empty
            }
        };
        let host = if self.upstream_host.contains(':') {
            format!("[{}]", self.upstream_host)
        } else {
            self.upstream_host.clone()
        };
        let duration = |d: Duration| format!("{}ms", d.as_millis());
        RawConfig {
            listen: Some("127.0.0.1:0".to_owned()),
            upstream: Some(format!(
                "postgres://postgres@{host}:{}/{}",
                self.upstream_port, self.key_db
            )),
            max_connections: Some(self.max_connections),
            max_message_size: Some(self.max_message_size.to_string()),
            connect_timeout: Some(duration(self.connect_timeout)),
            rules: Some(rules),
            kms: self
                .kek
                .is_none()
                .then(|| format!("local:{}", kek_path.display())),
            default_tenant: self.default_tenant.clone(),
            strict_reads: Some(self.strict_reads),
            shredded_reads: Some(
                match self.shredded_reads {
                    ShreddedReads::Error => "error",
                    ShreddedReads::Null => "null",
                }
                .to_owned(),
            ),
            key_schema: Some(self.key_schema.clone()),
            rotate_after_encryptions: Some(self.rotation.max_encryptions),
            rotate_after_age: Some(self.rotation.max_age.map_or("off".to_owned(), duration)),
            counter_flush_interval: Some(duration(self.counter_flush_interval)),
            tls_cert: self.tls.as_ref().map(|t| t.cert.clone()),
            tls_key: self.tls.as_ref().map(|t| t.key.clone()),
            require_client_tls: Some(self.require_client_tls),
            upstream_sslmode: Some(self.upstream_sslmode.to_string()),
            upstream_ca: self.upstream_ca.clone(),
            ..RawConfig::default()
        }
    }
}

impl TestProxy {
    /// A proxy in front of the shared test PostgreSQL.
    pub fn start() -> Self {
        let (host, port) = main_pg();
        Self::with(ProxyOptions::to(&host, port))
    }

    /// A proxy with explicit options, built as `pgenvelope serve` builds it
    /// ([`pgenvelope::app::build`]); only KEK provider objects are handed in directly.
    pub fn with(opts: ProxyOptions) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let kek_path = opts
            .kek_path
            .clone()
            .unwrap_or_else(|| dir.path().join("kek"));
        let config = Config::resolve(opts.overlay(dir.path(), &kek_path), None)
            .expect("valid test proxy options");
        let parts = Parts {
            rules: None,
            kek: opts.kek.clone(),
            kek_also: (!opts.kek_also.is_empty()).then(|| opts.kek_also.clone()),
        };
        let (addr_tx, addr_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("test runtime");
            rt.block_on(async move {
                let App { server, encryption } = pgenvelope::app::build(&config, parts)
                    .await
                    .expect("build the proxy");
                addr_tx
                    .send((
                        server.local_addr().expect("local addr"),
                        encryption,
                        server.handle(),
                    ))
                    .expect("send addr");
                // `run` also returns when the proxy drains; keep serving the sessions left
                // until the test drops the proxy.
                let mut stop_rx = stop_rx;
                let mut stopped = false;
                server
                    .run(async {
                        let _ = (&mut stop_rx).await;
                        stopped = true;
                    })
                    .await;
                if !stopped {
                    let _ = stop_rx.await;
                }
            });
            // Dropping the runtime here cancels every connection task.
        });
        let (addr, engine, handle) = addr_rx.recv().expect("proxy started");
        TestProxy {
            addr,
            engine,
            handle,
            key_schema: opts.key_schema,
            kek_path,
            _dir: Some(dir),
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// A libpq URL through the proxy.
    pub fn url(&self, user: &str, password: Option<&str>, db: &str) -> String {
        match password {
            Some(p) => format!("postgres://{user}:{p}@127.0.0.1:{}/{db}", self.port()),
            None => format!("postgres://{user}@127.0.0.1:{}/{db}", self.port()),
        }
    }

    /// tokio-postgres config string through the proxy.
    pub fn pg_config(&self, user: &str, password: Option<&str>, db: &str) -> String {
        let mut s = format!(
            "host=127.0.0.1 port={} user={user} dbname={db}",
            self.port()
        );
        if let Some(p) = password {
            s.push_str(&format!(" password={p}"));
        }
        s
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if self.engine.is_some() {
            psql_on_main(&format!(
                "DROP SCHEMA IF EXISTS {} CASCADE",
                self.key_schema
            ));
        }
    }
}

/// Runs `sql` with psql on the main server's `test` database, ignoring the outcome. For clean-up
/// in `Drop`, where no async runtime can be used.
pub fn psql_on_main(sql: &str) {
    let (host, port) = main_pg();
    let _ = std::process::Command::new("psql")
        .args(["-X", "-q", "-h", &host, "-p", &port.to_string()])
        .args(["-U", "postgres", "-d", "test", "-c", sql])
        .output();
}

/// Drops the tables it names (comma-separated) on the main server when it goes out of scope.
pub struct DropTables(pub String);

impl Drop for DropTables {
    fn drop(&mut self) {
        psql_on_main(&format!("DROP TABLE IF EXISTS {}", self.0));
    }
}

/// A database of its own on the main server for one test (a unique name from `prefix`),
/// dropped when it goes out of scope, whatever happened: `WITH (FORCE)` also ends the sessions
/// still in it (a proxy's catalog connections, a client the test left open).
pub struct TempDatabase(pub String);

impl TempDatabase {
    /// Create it (from `template0`, which nobody connects to, so tests creating databases at
    /// the same time never wait on each other's template).
    pub async fn create(prefix: &str) -> Self {
        let name = unique(prefix);
        let (host, port) = main_pg();
        connect(&format!(
            "host={host} port={port} user=postgres dbname=test"
        ))
        .await
        .expect("connect to the test database")
        .batch_execute(&format!("CREATE DATABASE {name} TEMPLATE template0"))
        .await
        .expect("create a test database");
        TempDatabase(name)
    }

    /// A direct connection to it (not through a proxy).
    pub async fn direct(&self) -> tokio_postgres::Client {
        let (host, port) = main_pg();
        connect(&format!(
            "host={host} port={port} user=postgres dbname={}",
            self.0
        ))
        .await
        .expect("connect to the test's own database")
    }
}

impl Drop for TempDatabase {
    fn drop(&mut self) {
        psql_on_main(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.0));
    }
}

/// Column `i` of every row a `simple_query` returned (NULLs skipped).
pub fn simple_column(msgs: &[tokio_postgres::SimpleQueryMessage], i: usize) -> Vec<String> {
    msgs.iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(i).map(str::to_owned),
            _ => None,
        })
        .collect()
}

/// Connect with tokio-postgres (NoTls) and drive the connection in the background.
pub async fn connect(config: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(config, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// A table name unique to this test run.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A connection straight to the shared test PostgreSQL, bypassing the proxy.
pub async fn direct() -> tokio_postgres::Client {
    let (host, port) = main_pg();
    connect(&format!(
        "host={host} port={port} user=postgres dbname=test"
    ))
    .await
    .unwrap()
}

/// The SQLSTATE of an error, if it came from the server (or from the proxy's refusal).
pub(crate) fn code(e: &tokio_postgres::Error) -> Option<String> {
    e.code().map(|c| c.code().to_owned())
}
