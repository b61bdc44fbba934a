//! The key change listener: `LISTEN pgenvelope_keys` on a connection of its own, evicting
//! cached keys as rotations, shreds and destroys are announced (see `lifecycle`).
//!
//! The connection is checked every few seconds; when it is lost, every cached key is dropped
//! (changes may have been missed) and the listener reconnects with backoff (1 s doubling to
//! 10 s), dropping the cache again once it listens. While it is down, cached keys still expire
//! after the cache TTL.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::AsyncMessage;

use super::lifecycle::{KeyChange, NOTIFY_CHANNEL};
use super::manager::KeyManager;

/// How often the listening connection is checked.
const PING_EVERY: Duration = Duration::from_secs(5);
/// How long a check may take before the connection counts as lost.
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Whether the listener is connected and listening (for readiness and tests).
#[derive(Debug, Default)]
pub struct ListenerState {
    listening: AtomicBool,
    /// Notifications applied, by kind (in the order of [`CHANGE_KINDS`]).
    changes: [AtomicU64; 5],
}

/// Kinds of key change notifications (metric label values).
pub const CHANGE_KINDS: [&str; 5] = ["rotate", "shred", "destroy", "rewrap", "flush"];

impl ListenerState {
    /// Whether key changes are being received now.
    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }

    /// (kind, notifications applied) for every kind.
    pub fn changes(&self) -> Vec<(&'static str, u64)> {
        CHANGE_KINDS
            .iter()
            .zip(&self.changes)
            .map(|(k, n)| (*k, n.load(Ordering::Relaxed)))
            .collect()
    }

    /// Register the listener's metrics (called at each scrape).
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        #[derive(
            Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet,
        )]
        struct KindLabel {
            kind: &'static str,
        }
        let up = prometheus_client::metrics::gauge::Gauge::<i64>::default();
        up.set(i64::from(self.is_listening()));
        registry.register(
            "key_listener_up",
            "1 while the key change listener (LISTEN pgenvelope_keys) is connected",
            up,
        );
        let changes = prometheus_client::metrics::family::Family::<
            KindLabel,
            prometheus_client::metrics::counter::Counter,
        >::default();
        for (kind, n) in self.changes() {
            changes.get_or_create(&KindLabel { kind }).inc_by(n);
        }
        registry.register(
            "key_changes",
            "Key change notifications applied (cached keys evicted), by kind",
            changes,
        );
    }
}

/// Spawn the listener for `manager`'s key store. Runs until the runtime shuts down.
pub fn spawn_key_listener(manager: Arc<KeyManager>) -> (JoinHandle<()>, Arc<ListenerState>) {
    let state = Arc::new(ListenerState::default());
    let handle = tokio::spawn(run(manager, Arc::clone(&state)));
    (handle, state)
}

async fn run(manager: Arc<KeyManager>, state: Arc<ListenerState>) {
    let mut backoff = Duration::from_secs(1);
    let mut first = true;
    loop {
        match listen_once(&manager, &state, first).await {
            Ok(()) => backoff = Duration::from_secs(1),
            Err(e) => tracing::warn!(error = %e, "key change listener could not connect"),
        }
        first = false;
        state.listening.store(false, Ordering::Release);
        // Changes may have been missed while not listening.
        manager.invalidate_all();
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Connect, listen and apply notifications until the connection is lost. `Ok` once it had
/// been listening; `Err` when it never got that far.
async fn listen_once(
    manager: &KeyManager,
    state: &ListenerState,
    first: bool,
) -> Result<(), super::KeyError> {
    let store = manager.store();
    let schema = store.schema().to_owned();
    let (client, mut connection) = store.dedicated().await?;
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if tx.send(n.payload().to_owned()).is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "key change listener connection failed");
                    return;
                }
                None => return,
            }
        }
    });
    // Named after the schema so an operator can tell the listeners of several key stores
    // apart in pg_stat_activity (the schema is a plain identifier: safe to splice).
    let listen =
        format!("SET application_name = 'pgenvelope-listen {schema}'; LISTEN {NOTIFY_CHANNEL}");
    if let Err(e) = client.batch_execute(&listen).await {
        driver.abort();
        return Err(super::KeyError::store("listen for key changes", e));
    }
    // Anything cached before now may predate a change we were not listening for.
    manager.invalidate_all();
    state.listening.store(true, Ordering::Release);
    if first {
        tracing::debug!(channel = NOTIFY_CHANNEL, "listening for key changes");
    } else {
        tracing::info!(
            channel = NOTIFY_CHANNEL,
            "key change listener reconnected; key cache flushed"
        );
    }
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    loop {
        tokio::select! {
            payload = rx.recv() => {
                let Some(payload) = payload else { break };
                apply(manager, state, &schema, &payload).await;
            }
            _ = ping.tick() => {
                let alive = tokio::time::timeout(PING_TIMEOUT, client.simple_query("")).await;
                if !matches!(alive, Ok(Ok(_))) {
                    break;
                }
            }
        }
    }
    tracing::warn!("key change listener lost its connection; key cache flushed, reconnecting");
    driver.abort();
    Ok(())
}

async fn apply(manager: &KeyManager, state: &ListenerState, schema: &str, payload: &str) {
    let Some(change) = KeyChange::parse(payload, schema) else {
        return;
    };
    if let Some(i) = CHANGE_KINDS.iter().position(|k| *k == change.kind()) {
        state.changes[i].fetch_add(1, Ordering::Relaxed);
    }
    match &change {
        KeyChange::Rewrap => tracing::debug!("data keys re-wrapped elsewhere"),
        KeyChange::Flush => manager.invalidate_all(),
        KeyChange::Rotate(org) | KeyChange::Shred(org) | KeyChange::Destroy(org) => {
            manager.revoke_org(org).await;
            tracing::info!(tenant = %org, change = change.kind(), "cached keys evicted after a key change");
        }
    }
}
