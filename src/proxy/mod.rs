//! All network I/O: the listener, per-connection tasks, TLS on both legs, cancel routing.
//!
//! ```text
//!  client ──▶ listener ──spawn──▶ connection task (one per client, one tracing span)
//!                                   startup: SSLRequest → 'S' + TLS handshake (when
//!                                              configured, else 'N'); GSSENCRequest → 'N',
//!                                            CancelRequest → cancel registry → upstream
//!                                   StartupMessage → connect upstream, SSLRequest per
//!                                     sslmode (+ TLS), forward the StartupMessage as is
//!                                   then two pumps in one task:
//!                                     client ─▶ pump ─▶ server   (raw frames)
//!                                     server ─▶ pump ─▶ client   (raw frames; S/K/Z observed)
//! ```

mod auth;
mod cancel;
mod catalog;
mod client_side;
mod connection;
mod copy;
mod drain;
pub mod engine;
pub mod error;
pub mod fault;
mod listener;
mod plans;
mod pump;
mod server_side;
mod session;
mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

pub use crate::tls::TlsError;
pub use cancel::CancelRegistry;
pub use connection::SessionState;
pub use drain::DrainState;
pub use engine::{Engine, EngineSettings, ShreddedReads};
pub use error::ConnError;
pub use tls::TlsFiles;

use crate::config::SslMode;

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

/// State shared by all connections of one proxy instance.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: ProxyConfig,
    pub(crate) cancels: Arc<CancelRegistry>,
    pub(crate) permits: Arc<Semaphore>,
    /// The encrypting layer; `None` when no rules are configured (pure pass-through).
    pub(crate) engine: Option<Arc<Engine>>,
    /// Shutdown state, watched by the listeners and every session.
    pub(crate) drain: tokio::sync::watch::Sender<DrainState>,
    /// Sessions started (past the startup packet).
    pub(crate) sessions_total: std::sync::atomic::AtomicU64,
    /// Failed connection attempts to the upstream.
    pub(crate) upstream_connect_errors: std::sync::atomic::AtomicU64,
    /// Statements by protocol kind.
    pub(crate) statements: Arc<drain::StatementCounts>,
    /// TLS toward clients, when configured.
    pub(crate) client_tls: Option<tls::ClientTls>,
    /// TLS toward the upstream.
    pub(crate) upstream_tls: tls::UpstreamTls,
}

/// Observes a running server (for tests and, later, metrics).
#[derive(Debug, Clone)]
pub struct ServerHandle {
    shared: Arc<Shared>,
}

impl ServerHandle {
    /// Number of client sessions currently holding a connection slot.
    pub fn active_connections(&self) -> usize {
        self.shared.config.max_connections - self.shared.permits.available_permits()
    }

    /// Number of sessions whose cancel key is registered (sessions past authentication).
    pub fn registered_sessions(&self) -> usize {
        self.shared.cancels.len()
    }

    /// Stop accepting connections; each session is closed with `57P01` at its next idle
    /// ReadyForQuery (no statement or transaction in progress).
    pub fn drain(&self) {
        self.shared.drain.send_if_modified(|s| {
            let change = *s == DrainState::Running;
            if change {
                *s = DrainState::Draining;
            }
            change
        });
    }

    /// Close every session now with `57P01` (after the grace period, or on SIGINT).
    pub fn close_all(&self) {
        self.shared.drain.send_replace(DrainState::Closing);
    }

    /// Sessions started since the proxy started.
    pub fn sessions_total(&self) -> u64 {
        self.shared
            .sessions_total
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Failed connection attempts to the upstream since the proxy started.
    pub fn upstream_connect_errors(&self) -> u64 {
        self.shared
            .upstream_connect_errors
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Statements seen so far: (simple Query, extended Execute, FunctionCall).
    pub fn statements(&self) -> (u64, u64, u64) {
        let s = &self.shared.statements;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        (load(&s.simple), load(&s.extended), load(&s.function_call))
    }

    /// The upstream `host:port`.
    pub fn upstream_addr(&self) -> String {
        self.shared.config.upstream_addr()
    }

    /// Re-read the client-facing certificate and key. On error the configuration in force is
    /// kept. `Ok(false)` when client TLS is not configured.
    pub fn reload_tls(&self) -> Result<bool, TlsError> {
        match &self.shared.client_tls {
            Some(t) => t.reload().map(|()| true),
            None => Ok(false),
        }
    }

    /// The engine, when rules are configured.
    pub fn engine(&self) -> Option<&Arc<Engine>> {
        self.shared.engine.as_ref()
    }

    /// Current shutdown state.
    pub fn state(&self) -> DrainState {
        *self.shared.drain.borrow()
    }

    /// Wait until no session is left, at most `limit`. Returns whether none is left.
    pub async fn wait_idle(&self, limit: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while self.active_connections() > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        true
    }
}

/// A bound proxy, ready to run.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl Server {
    /// Bind the listening socket.
    pub async fn bind(config: ProxyConfig) -> std::io::Result<Server> {
        Self::bind_with(config, None).await
    }

    /// Bind the listening socket, with the encrypting layer when `engine` is given. TLS files
    /// that fail to load are an `InvalidInput` error naming the file.
    pub async fn bind_with(
        config: ProxyConfig,
        engine: Option<Arc<Engine>>,
    ) -> std::io::Result<Server> {
        let invalid = |e: TlsError| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
        let client_tls = match &config.tls {
            Some(files) => Some(tls::ClientTls::load(files.clone()).map_err(invalid)?),
            None => None,
        };
        let upstream_tls =
            tls::UpstreamTls::new(config.upstream_sslmode, config.upstream_ca.as_deref())
                .map_err(invalid)?;
        let listener = TcpListener::bind(config.listen).await?;
        let shared = Arc::new(Shared {
            permits: Arc::new(Semaphore::new(config.max_connections)),
            cancels: Arc::new(CancelRegistry::default()),
            config,
            engine,
            drain: tokio::sync::watch::channel(DrainState::Running).0,
            sessions_total: std::sync::atomic::AtomicU64::new(0),
            upstream_connect_errors: std::sync::atomic::AtomicU64::new(0),
            statements: Arc::default(),
            client_tls,
            upstream_tls,
        });
        Ok(Server { listener, shared })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Number of client sessions currently holding a connection slot.
    pub fn active_connections(&self) -> usize {
        self.handle().active_connections()
    }

    /// A handle for observing the running server.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Accept connections until `shutdown` completes.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        listener::run(self.listener, self.shared, shutdown).await
    }

    /// Serve on `threads` OS threads, each with its own single-threaded runtime accepting on
    /// the same socket, until `shutdown` completes. A connection stays on the thread that
    /// accepted it, so its two directions never hop between threads. Blocks the caller's
    /// task until every thread has stopped accepting.
    pub async fn run_threads(
        self,
        threads: usize,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> std::io::Result<()> {
        let std_listener = self.listener.into_std()?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut joins = Vec::new();
        for i in 0..threads.max(1) {
            let listener = std_listener.try_clone()?;
            let shared = Arc::clone(&self.shared);
            let mut stop = stop_rx.clone();
            let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
            std::thread::Builder::new()
                .name(format!("pgenvelope-{i}"))
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot start a worker runtime");
                            return;
                        }
                    };
                    runtime.block_on(async move {
                        match TcpListener::from_std(listener) {
                            Ok(listener) => {
                                listener::run(listener, shared, async move {
                                    let _ = stop.wait_for(|stopped| *stopped).await;
                                })
                                .await
                            }
                            Err(e) => tracing::error!(error = %e, "cannot register the listener"),
                        }
                        let _ = done_tx.send(());
                        // Serve the connections this thread holds until the process exits.
                        std::future::pending::<()>().await;
                    });
                })?;
            joins.push(done_rx);
        }
        shutdown.await;
        let _ = stop_tx.send(true);
        for done in joins {
            let _ = done.await;
        }
        Ok(())
    }
}
