//! Test-only fault injection, compiled in only with the cargo feature `fault-injection`.
//!
//! The feature is off by default, so release builds and the shipped binary contain no
//! trigger: without it, [`check`] is an empty function and [`INSPECTS_QUERIES`] is false, so
//! the pass-through direction does not even look at Query messages. The test suites turn the
//! feature on through the package's dev-dependency on itself (see `Cargo.toml`).
//!
//! With the feature, a simple-protocol Query whose whole text is [`PANIC_QUERY`] panics inside
//! the connection's task, which is how the tests prove that a panic closes only that
//! connection (with `XX000`) and leaves the others and the worker thread running. The text is
//! not valid SQL, so no real client sends it.
//!
//! The HSM faults (a token that hangs or fails) live with the PKCS#11 provider:
//! `crate::keys::set_hsm_stall` and `crate::keys::set_hsm_down`.

use crate::wire::Frame;

/// The Query text that makes the connection task panic (feature `fault-injection` only).
pub const PANIC_QUERY: &str = "pgenvelope:fault-injection:panic";

/// Whether the pass-through direction must inspect Query messages for the trigger.
pub(crate) const INSPECTS_QUERIES: bool = cfg!(feature = "fault-injection");

/// Panic if `frame` is the trigger Query.
#[cfg(feature = "fault-injection")]
pub(crate) fn check(frame: &Frame) {
    if frame.tag() == crate::wire::frontend::QUERY_TAG
        && crate::wire::frontend::parse_query(frame.body()) == Ok(PANIC_QUERY.as_bytes())
    {
        panic!("fault injection: panic requested by the client");
    }
}

/// Without the feature there is no trigger.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub(crate) fn check(_frame: &Frame) {}
