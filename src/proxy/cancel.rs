//! CancelRequest routing.
//!
//! BackendKeyData reaches the client unchanged, so the key a client sends in a CancelRequest
//! is the upstream server's own key. The registry remembers which upstream address each live
//! session's key belongs to; a CancelRequest for a known key is forwarded there on a fresh
//! connection, one for an unknown key is dropped silently (as PostgreSQL itself does), so the
//! proxy cannot be used to spray cancel packets at the server. As PostgreSQL does, the client's
//! cancel connection is closed only after the server closed the forwarded one (it does so once
//! it has signalled the backend), bounded by the connect timeout: a client that, like libpq,
//! waits for that close before its next statement is not cancelled in the next statement.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::wire::startup::CANCEL_REQUEST_CODE;

/// Live sessions' cancel keys and the upstream each belongs to.
#[derive(Debug, Default)]
pub struct CancelRegistry {
    keys: Mutex<HashMap<Vec<u8>, SocketAddr>>,
}

impl CancelRegistry {
    /// Remember a session's key; the returned guard forgets it when dropped.
    pub(crate) fn register(self: &Arc<Self>, key: &[u8], upstream: SocketAddr) -> CancelGuard {
        self.keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.to_vec(), upstream);
        CancelGuard {
            registry: Arc::clone(self),
            key: key.to_vec(),
        }
    }

    fn lookup(&self, key: &[u8]) -> Option<SocketAddr> {
        self.keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .copied()
    }

    /// Number of registered sessions.
    pub fn len(&self) -> usize {
        self.keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether no session is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forward a CancelRequest for `key` to the upstream that owns it. Returns whether the key
    /// was known.
    pub(crate) async fn forward(&self, key: &[u8], connect_timeout: Duration) -> bool {
        let Some(addr) = self.lookup(key) else {
            tracing::debug!("cancel request for an unknown key dropped");
            return false;
        };
        let mut packet = Vec::with_capacity(8 + key.len());
        let len = u32::try_from(8 + key.len()).unwrap_or(u32::MAX);
        packet.extend_from_slice(&len.to_be_bytes());
        packet.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
        packet.extend_from_slice(key);
        let result = tokio::time::timeout(connect_timeout, async {
            let mut stream = TcpStream::connect(addr).await?;
            stream.write_all(&packet).await?;
            stream.shutdown().await?;
            // PostgreSQL closes the cancel connection only after it has signalled the backend.
            // Answering the client (closing its cancel connection) before that lets its next
            // statement start first and be the one cancelled; so wait for the close, bounded
            // by the timeout.
            let mut sink = [0u8; 64];
            while stream.read(&mut sink).await? > 0 {}
            Ok::<(), std::io::Error>(())
        })
        .await;
        match result {
            Ok(Ok(())) => tracing::debug!("cancel request forwarded"),
            Ok(Err(e)) => tracing::warn!(error = %e, "forwarding a cancel request failed"),
            Err(_) => tracing::warn!("forwarding a cancel request timed out"),
        }
        true
    }
}

/// Unregisters a session's cancel key when the session ends.
#[derive(Debug)]
pub(crate) struct CancelGuard {
    registry: Arc<CancelRegistry>,
    key: Vec<u8>,
}

impl CancelGuard {
    /// The session's cancel key.
    pub(crate) fn key(&self) -> &[u8] {
        &self.key
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.registry
            .keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
    }
}
