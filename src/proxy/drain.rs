//! Shutdown: stop accepting, let each session finish to its next idle ReadyForQuery, then
//! close it with `57P01`; after the grace period, close every session that is left.
//!
//! A session is *idle* when the server's last message was ReadyForQuery with status `I` and
//! the client has sent nothing since ([`crate::proxy::transform::Transform::is_idle`]): closing
//! it then loses no statement and no transaction. Each session watches the [`DrainState`] and
//! checks for an idle point after every batch of server messages.

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
