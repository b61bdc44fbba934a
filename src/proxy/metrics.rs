//! What the proxy's listener and connections count (exported as metrics by their owner).

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::wire::frontend as fe;

/// Statements seen from clients, by protocol kind.
#[derive(Debug, Default)]
pub(crate) struct StatementCounts {
    /// Simple-protocol Query messages.
    pub(crate) simple: AtomicU64,
    /// Extended-protocol Execute messages.
    pub(crate) extended: AtomicU64,
    /// FunctionCall messages.
    pub(crate) function_call: AtomicU64,
}

impl StatementCounts {
    /// Count a client message by its tag.
    pub(crate) fn count(&self, tag: u8) {
        let counter = match tag {
            fe::QUERY_TAG => &self.simple,
            fe::EXECUTE_TAG => &self.extended,
            fe::FUNCTION_CALL_TAG => &self.function_call,
            _ => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// (simple, extended, function call).
    pub(crate) fn snapshot(&self) -> (u64, u64, u64) {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        (
            load(&self.simple),
            load(&self.extended),
            load(&self.function_call),
        )
    }
}

/// Sessions and connection attempts.
#[derive(Debug, Default)]
pub(crate) struct ConnectionCounts {
    /// Sessions started (past the startup packet).
    pub(crate) sessions: AtomicU64,
    /// Failed connection attempts to the upstream.
    pub(crate) upstream_connect_errors: AtomicU64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// Register the listener's metrics.
pub(crate) fn register(
    registry: &mut Registry,
    active: u64,
    connections: &ConnectionCounts,
    statements: &StatementCounts,
) {
    let gauge = prometheus_client::metrics::gauge::Gauge::<i64>::default();
    gauge.set(i64::try_from(active).unwrap_or(i64::MAX));
    registry.register(
        "connections_active",
        "Client sessions holding a connection slot",
        gauge,
    );
    registry.register(
        "sessions",
        "Client sessions started",
        counter(connections.sessions.load(Ordering::Relaxed)),
    );
    let (simple, extended, function_call) = statements.snapshot();
    let kinds = Family::<KindLabel, Counter>::default();
    for (kind, n) in [
        ("simple", simple),
        ("extended", extended),
        ("function_call", function_call),
    ] {
        kinds.get_or_create(&KindLabel { kind }).inc_by(n);
    }
    registry.register(
        "statements",
        "Statements from clients by protocol kind (Query, Execute, FunctionCall)",
        kinds,
    );
    registry.register(
        "upstream_connect_errors",
        "Failed connection attempts to the upstream server",
        counter(connections.upstream_connect_errors.load(Ordering::Relaxed)),
    );
}

fn counter(v: u64) -> Counter {
    let c = Counter::<u64>::default();
    c.inc_by(v);
    c
}
