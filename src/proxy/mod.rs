//! All network I/O, and the protocol core it drives: the listener, per-connection tasks, TLS
//! on both legs, authentication, cancel routing.
//!
//! ```text
//!  client ──▶ listener ──spawn──▶ connection task (one per client, one tracing span)
//!                                   startup: SSLRequest → 'S' + TLS handshake (when
//!                                              configured, else 'N'); GSSENCRequest → 'N',
//!                                            CancelRequest → cancel registry → upstream
//!                                   StartupMessage → connect upstream, SSLRequest per
//!                                     sslmode (+ TLS), forward the StartupMessage as is
//!                                   auth: relayed until AuthenticationOk (auth.rs)
//!                                   then one loop over both directions:
//!                                     bytes ─▶ pump (framing) ─▶ transform (sync core) ─▶ bytes
//!                                     transform needs keys / catalog facts ─▶ fetched, retried
//! ```
//!
//! [`transform`] is the only place that decides anything about a statement or a result; it
//! is synchronous and owned by its connection task. [`encryption`] holds what encrypting
//! connections share (rules and plan cache, keys, catalog, metrics).

mod auth;
mod cancel;
mod catalog;
mod connection;
mod drain;
mod encryption;
pub mod error;
mod listener;
mod metrics;
mod plans;
mod pump;
mod rules;
mod tls;
mod transform;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

pub use crate::cipher::ShreddedReads;
pub use crate::config::ProxyConfig;
pub use crate::tls::TlsError;
pub use cancel::CancelRegistry;
pub use drain::DrainState;
pub use encryption::{Encryption, EncryptionSettings};
pub use error::{ClientError, ConnError};
pub use rules::Rules;
pub use tls::{TlsFiles, ValidateTlsFiles};

/// State shared by all connections of one proxy instance.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: ProxyConfig,
    pub(crate) cancels: Arc<CancelRegistry>,
    pub(crate) permits: Arc<Semaphore>,
    /// The encrypting layer; `None` when no rules are configured (pure pass-through).
    pub(crate) encryption: Option<Arc<Encryption>>,
    /// Shutdown state, watched by the listeners and every session.
    pub(crate) drain: tokio::sync::watch::Sender<DrainState>,
    /// Sessions started and failed upstream connections.
    pub(crate) connections: metrics::ConnectionCounts,
    /// Statements by protocol kind.
    pub(crate) statements: Arc<metrics::StatementCounts>,
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
            .connections
            .sessions
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Failed connection attempts to the upstream since the proxy started.
    pub fn upstream_connect_errors(&self) -> u64 {
        self.shared
            .connections
            .upstream_connect_errors
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Statements seen so far: (simple Query, extended Execute, FunctionCall).
    pub fn statements(&self) -> (u64, u64, u64) {
        self.shared.statements.snapshot()
    }

    /// Register the proxy's metrics, each by its owner (called at each scrape).
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        metrics::register(
            registry,
            self.active_connections() as u64,
            &self.shared.connections,
            &self.shared.statements,
        );
        if let Some(e) = &self.shared.encryption {
            e.register(registry);
        }
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

    /// The encrypting layer, when rules are configured.
    pub fn encryption(&self) -> Option<&Arc<Encryption>> {
        self.shared.encryption.as_ref()
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

    /// Bind the listening socket, with the encrypting layer when `encryption` is given. TLS
    /// files that fail to load are an `InvalidInput` error naming the file.
    pub async fn bind_with(
        config: ProxyConfig,
        encryption: Option<Arc<Encryption>>,
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
            encryption,
            drain: tokio::sync::watch::channel(DrainState::Running).0,
            connections: metrics::ConnectionCounts::default(),
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
