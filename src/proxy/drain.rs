//! Shutdown: stop accepting, let each session finish to its next idle ReadyForQuery, then
//! close it with `57P01`; after the grace period, close every session that is left.
//!
//! A session is *idle* when the server's last message was ReadyForQuery with status `I` and
//! the client has sent nothing since: closing it then loses no statement and no transaction.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use tokio::sync::{watch, Notify};

/// What the proxy is doing with its sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainState {
    /// Serving.
    Running,
    /// No new connections; sessions close at their next idle point.
    Draining,
    /// Every session is closed now.
    Closing,
}

/// Statements seen from clients, by protocol kind (for `/metrics`).
#[derive(Debug, Default)]
pub(crate) struct StatementCounts {
    /// Simple-protocol Query messages.
    pub(crate) simple: std::sync::atomic::AtomicU64,
    /// Extended-protocol Execute messages.
    pub(crate) extended: std::sync::atomic::AtomicU64,
    /// FunctionCall messages.
    pub(crate) function_call: std::sync::atomic::AtomicU64,
}

/// Per-session activity, shared by its two directions.
///
/// Invariant: `outstanding` counts request cycles (Query, Sync, FunctionCall, and the startup
/// itself) sent to the server and not yet answered by ReadyForQuery.
#[derive(Debug)]
pub(crate) struct Activity {
    outstanding: AtomicI64,
    idle: AtomicBool,
    ready: Notify,
    statements: std::sync::Arc<StatementCounts>,
}

impl Activity {
    /// Activity of a new session, counting its statements into `statements`.
    pub(crate) fn new(statements: std::sync::Arc<StatementCounts>) -> Self {
        Self {
            // The startup exchange ends with the first ReadyForQuery.
            outstanding: AtomicI64::new(1),
            idle: AtomicBool::new(false),
            ready: Notify::new(),
            statements,
        }
    }

    /// The client side forwarded a message; Query, Sync and FunctionCall start a cycle.
    pub(crate) fn client_message(&self, tag: u8) {
        let counter = match tag {
            b'Q' => Some(&self.statements.simple),
            b'E' => Some(&self.statements.extended),
            b'F' => Some(&self.statements.function_call),
            _ => None,
        };
        if let Some(c) = counter {
            c.fetch_add(1, Ordering::Relaxed);
        }
        if matches!(tag, b'Q' | b'S' | b'F') {
            self.outstanding.fetch_add(1, Ordering::AcqRel);
            self.idle.store(false, Ordering::Release);
        }
    }

    /// The server sent ReadyForQuery; `in_transaction` unless its status is `I`.
    pub(crate) fn ready_for_query(&self, in_transaction: bool) {
        let left = self.outstanding.fetch_sub(1, Ordering::AcqRel) - 1;
        if left <= 0 && !in_transaction {
            self.idle.store(true, Ordering::Release);
            self.ready.notify_waiters();
        } else {
            self.idle.store(false, Ordering::Release);
        }
    }

    /// Whether the session is idle: the server's last ReadyForQuery said `I` and nothing was
    /// sent since.
    pub(crate) fn is_idle(&self) -> bool {
        self.idle.load(Ordering::Acquire)
    }
}

/// Resolves when this session must end: when the proxy drains and the session is idle, or
/// when the proxy closes every session.
pub(crate) async fn session_must_end(mut state: watch::Receiver<DrainState>, activity: &Activity) {
    loop {
        let now = *state.borrow_and_update();
        if now == DrainState::Running {
            // Idle points matter only while draining: not listening for them while serving
            // saves a wake-up of the session per statement.
            if state.changed().await.is_err() {
                // The server is gone: nothing will ever ask this session to end.
                std::future::pending::<()>().await;
            }
            continue;
        }
        // Registered before the idle check, so a ReadyForQuery in between is not missed.
        let notified = activity.ready.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        match now {
            DrainState::Closing => return,
            DrainState::Draining if activity.is_idle() => return,
            _ => {}
        }
        tokio::select! {
            changed = state.changed() => {
                if changed.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            () = &mut notified => {}
        }
    }
}
