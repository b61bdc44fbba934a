//! What ciphers did, summed over every connection of a proxy (exported as metrics).

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Reasons a value fails to decrypt (metric label values).
pub const DECRYPT_FAILURE_REASONS: &[&str] = &[
    "malformed",
    "wrong_column",
    "wrong_row",
    "authentication",
    "other_tenant",
    "key_unavailable",
    "not_encrypted",
    "shredded",
];

/// Counters of the ciphers of one proxy.
#[derive(Debug)]
pub struct CipherMetrics {
    /// Values encrypted on the way in.
    pub values_encrypted: AtomicU64,
    /// Values decrypted on the way out.
    pub values_decrypted: AtomicU64,
    /// Plaintext values found in encrypted columns and passed through.
    pub plaintext_reads: AtomicU64,
    /// Values that failed to decrypt, by reason.
    pub decrypt_failures: ReasonCounts,
}

impl Default for CipherMetrics {
    fn default() -> Self {
        Self {
            values_encrypted: AtomicU64::new(0),
            values_decrypted: AtomicU64::new(0),
            plaintext_reads: AtomicU64::new(0),
            decrypt_failures: ReasonCounts::new(DECRYPT_FAILURE_REASONS),
        }
    }
}

impl CipherMetrics {
    /// Add the counts of one completed operation.
    pub(crate) fn add(&self, encrypted: u64, decrypted: u64, plaintext: u64, failures: &[&str]) {
        for (counter, n) in [
            (&self.values_encrypted, encrypted),
            (&self.values_decrypted, decrypted),
            (&self.plaintext_reads, plaintext),
        ] {
            if n > 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        }
        for reason in failures {
            self.decrypt_failures.inc(reason);
        }
    }

    /// Register the current values (called at each scrape).
    pub fn register(&self, registry: &mut Registry) {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        registry.register(
            "values_encrypted",
            "Values encrypted on the way to the server",
            counter(load(&self.values_encrypted)),
        );
        registry.register(
            "values_decrypted",
            "Values decrypted on the way to the client",
            counter(load(&self.values_decrypted)),
        );
        registry.register(
            "plaintext_reads",
            "Plaintext values found in encrypted columns and passed through",
            counter(load(&self.plaintext_reads)),
        );
        registry.register(
            "decrypt_failures",
            "Values that failed to decrypt, by reason",
            self.decrypt_failures.family(),
        );
    }
}

fn counter(v: u64) -> Counter {
    let c = Counter::<u64>::default();
    c.inc_by(v);
    c
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabel {
    reason: &'static str,
}

/// Counters for a fixed, small set of reasons.
#[derive(Debug)]
pub struct ReasonCounts {
    names: &'static [&'static str],
    counts: Vec<AtomicU64>,
}

impl ReasonCounts {
    /// Counters for `names` (the last one also counts unknown reasons).
    pub fn new(names: &'static [&'static str]) -> Self {
        Self {
            names,
            counts: names.iter().map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Count one event of `reason` (unknown reasons count as the last one).
    pub fn inc(&self, reason: &str) {
        let i = self
            .names
            .iter()
            .position(|n| *n == reason)
            .unwrap_or(self.names.len() - 1);
        if let Some(c) = self.counts.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// (reason, count) for every reason.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        self.names
            .iter()
            .zip(&self.counts)
            .map(|(n, c)| (*n, c.load(Ordering::Relaxed)))
            .collect()
    }

    /// Sum over all reasons.
    pub fn total(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// The counts as a metric family labelled `reason`.
    pub(crate) fn family(&self) -> Family<ReasonLabel, Counter> {
        let f = Family::<ReasonLabel, Counter>::default();
        for (reason, n) in self.snapshot() {
            f.get_or_create(&ReasonLabel { reason }).inc_by(n);
        }
        f
    }
}
