//! Accept loop.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::proxy::drain::DrainState;
use crate::proxy::{connection, Shared};

/// Accept clients until `shutdown` resolves; each client gets its own task.
pub(crate) async fn run(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut drain = shared.drain.subscribe();
    loop {
        tokio::select! {
            () = &mut shutdown => {
                tracing::info!("shutting down: no longer accepting connections");
                return;
            }
            _ = drain.wait_for(|s| *s != DrainState::Running) => {
                tracing::info!("draining: no longer accepting connections");
                return;
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tokio::spawn(connection::serve(stream, peer, Arc::clone(&shared)));
                }
                Err(e) => {
                    // Typically EMFILE/ENFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}
