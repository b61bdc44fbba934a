//! In-process proxy for the end-to-end tests: bound on port 0, on its own runtime thread, so
//! both async tests and tests that drive external clients (psql, pgbench, Python, Node) can
//! use it. Dropping it stops the proxy.

use std::net::SocketAddr;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use pgenvelope::proxy::{ProxyConfig, Server};

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
    pub engine: Option<std::sync::Arc<pgenvelope::proxy::Encryption>>,
    pub handle: pgenvelope::proxy::ServerHandle,
    pub key_schema: String,
    /// The local KEK file (unused when the options gave another KEK provider).
    pub kek_path: std::path::PathBuf,
    _dir: Option<tempfile::TempDir>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Options for [`TestProxy`].
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
    pub kek_path: Option<std::path::PathBuf>,
    /// A KEK provider to use instead of a local key file.
    pub kek: Option<std::sync::Arc<dyn pgenvelope::keys::KekProvider>>,
    /// Unwrap-only KEK providers.
    pub kek_also: Vec<std::sync::Arc<dyn pgenvelope::keys::KekProvider>>,
    /// Database holding the key store.
    pub key_db: String,
    /// Client-facing TLS certificate and key.
    pub tls: Option<pgenvelope::proxy::TlsFiles>,
    /// Refuse plaintext clients.
    pub require_client_tls: bool,
    /// TLS toward the upstream.
    pub upstream_sslmode: pgenvelope::config::SslMode,
    /// CA for verifying the upstream.
    pub upstream_ca: Option<std::path::PathBuf>,
    /// Automatic rotation limits.
    pub rotation: pgenvelope::keys::RotationPolicy,
    /// What values under destroyed DEKs read as.
    pub shredded_reads: pgenvelope::proxy::ShreddedReads,
    /// How often encryption counts are flushed (and rotation checked).
    pub counter_flush_interval: Duration,
}

impl ProxyOptions {
    pub fn to(host: &str, port: u16) -> Self {
        Self {
            upstream_host: host.to_owned(),
            upstream_port: port,
            max_connections: 1000,
            max_message_size: (1 << 30) - 1,
            connect_timeout: Duration::from_secs(5),
            rules: None,
            default_tenant: None,
            strict_reads: false,
            key_schema: unique("pgenvelope_t"),
            kek_path: None,
            kek: None,
            kek_also: Vec::new(),
            key_db: "test".to_owned(),
            tls: None,
            require_client_tls: false,
            upstream_sslmode: pgenvelope::config::SslMode::Prefer,
            upstream_ca: None,
            rotation: pgenvelope::keys::RotationPolicy::default(),
            shredded_reads: pgenvelope::proxy::ShreddedReads::Error,
            counter_flush_interval: Duration::from_secs(5),
        }
    }

    /// Encrypting proxy in front of the shared test PostgreSQL with these rules.
    pub fn encrypting(rules: &str) -> Self {
        let (host, port) = main_pg();
        let mut o = Self::to(&host, port);
        o.rules = Some(rules.to_owned());
        o
    }
}

impl TestProxy {
    /// A proxy in front of the shared test PostgreSQL.
    pub fn start() -> Self {
        let (host, port) = main_pg();
        Self::with(ProxyOptions::to(&host, port))
    }

    /// A proxy with explicit options.
    pub fn with(opts: ProxyOptions) -> Self {
        let key_schema = opts.key_schema.clone();
        let dir = tempfile::tempdir().expect("temp dir");
        let kek_path = opts
            .kek_path
            .clone()
            .unwrap_or_else(|| dir.path().join("kek"));
        let kek_path_copy = kek_path.clone();
        let (addr_tx, addr_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("test runtime");
            rt.block_on(async move {
                let engine = match &opts.rules {
                    None => None,
                    Some(text) => {
                        let rules = pgenvelope::rules::RuleSet::from_sources(&[(
                            "test-rules.toml",
                            text.as_str(),
                        )])
                        .expect("valid test rules");
                        let kek: std::sync::Arc<dyn pgenvelope::keys::KekProvider> =
                            match opts.kek.clone() {
                                Some(k) => k,
                                None => std::sync::Arc::new(
                                    pgenvelope::keys::LocalKek::open_or_create(&kek_path)
                                        .expect("kek"),
                                ),
                            };
                        let mut service = tokio_postgres::Config::new();
                        service
                            .host(&opts.upstream_host)
                            .port(opts.upstream_port)
                            .user("postgres")
                            .dbname(&opts.key_db);
                        let engine = pgenvelope::proxy::Encryption::start(
                            pgenvelope::proxy::EncryptionSettings {
                                rules,
                                kek,
                                kek_also: opts.kek_also.clone(),
                                service,
                                key_schema: opts.key_schema.clone(),
                                key_cache_ttl: Duration::from_secs(300),
                                key_cache_capacity: 10_000,
                                rotation: opts.rotation,
                                counter_flush_interval: opts.counter_flush_interval,
                                default_tenant: opts.default_tenant.as_ref().map(|t| {
                                    pgenvelope::crypto::OrgId::new(t.clone()).expect("org")
                                }),
                                strict_reads: opts.strict_reads,
                                shredded_reads: opts.shredded_reads,
                                connect_timeout: opts.connect_timeout,
                                service_tls: pgenvelope::tls::ServiceTls::new(
                                    opts.upstream_sslmode,
                                    opts.upstream_ca.as_deref(),
                                )
                                .expect("service TLS settings"),
                            },
                        )
                        .await
                        .expect("engine");
                        Some(engine)
                    }
                };
                let server = Server::bind_with(
                    ProxyConfig {
                        listen: "127.0.0.1:0".parse().expect("literal address"),
                        upstream_host: opts.upstream_host,
                        upstream_port: opts.upstream_port,
                        max_connections: opts.max_connections,
                        max_message_size: opts.max_message_size,
                        connect_timeout: opts.connect_timeout,
                        tls: opts.tls.clone(),
                        require_client_tls: opts.require_client_tls,
                        upstream_sslmode: opts.upstream_sslmode,
                        upstream_ca: opts.upstream_ca.clone(),
                    },
                    engine.clone(),
                )
                .await
                .expect("bind proxy");
                addr_tx
                    .send((
                        server.local_addr().expect("local addr"),
                        engine,
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
            key_schema,
            kek_path: kek_path_copy,
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
