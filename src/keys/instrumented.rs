//! A KEK provider wrapper that counts and times every call, for `/metrics`:
//! `pgenvelope_kek_requests_total{op, result}` and `pgenvelope_kek_request_seconds{op}`.
//! Labels come from fixed sets (`generate`/`wrap`/`unwrap`, `ok`/`error`); never key material.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::crypto::DataKey;
use crate::keys::kek::{KekError, KekProvider, KeyContext};

/// Labels of a KEK request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KekRequestLabels {
    /// `generate`, `wrap` or `unwrap`.
    pub(crate) op: &'static str,
    /// `ok` or `error`.
    pub(crate) result: &'static str,
}

/// Labels of a KEK latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KekOpLabels {
    /// `generate`, `wrap` or `unwrap`.
    pub(crate) op: &'static str,
}

/// The KEK metric families. Cheap to clone (shared counters).
#[derive(Clone, Debug)]
pub struct KekMetrics {
    requests: Family<KekRequestLabels, Counter>,
    seconds: Family<KekOpLabels, Histogram>,
}

impl Default for KekMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 16))
            }),
        }
    }
}

impl KekMetrics {
    /// Register the families (names get the `pgenvelope_` prefix from the registry).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "kek_requests",
            "Calls to the key-encryption key provider (KMS, HSM, key file)",
            self.requests.clone(),
        );
        registry.register(
            "kek_request_seconds",
            "Latency of calls to the key-encryption key provider",
            self.seconds.clone(),
        );
    }

    fn record<T, E>(&self, op: &'static str, started: Instant, result: &Result<T, E>) {
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.requests
            .get_or_create(&KekRequestLabels {
                op,
                result: outcome,
            })
            .inc();
        self.seconds
            .get_or_create(&KekOpLabels { op })
            .observe(started.elapsed().as_secs_f64());
    }

    /// Calls made so far with this op and result (for tests).
    pub fn count(&self, op: &'static str, result: &'static str) -> u64 {
        self.requests
            .get_or_create(&KekRequestLabels { op, result })
            .get()
    }
}

/// Wraps a provider and records every call in [`KekMetrics`].
pub struct InstrumentedKek {
    inner: Arc<dyn KekProvider>,
    metrics: KekMetrics,
}

impl InstrumentedKek {
    /// Instrument `inner`.
    pub fn new(inner: Arc<dyn KekProvider>, metrics: KekMetrics) -> Self {
        Self { inner, metrics }
    }
}

#[async_trait]
impl KekProvider for InstrumentedKek {
    fn kek_id(&self) -> String {
        self.inner.kek_id()
    }

    async fn generate(&self, ctx: &KeyContext) -> Result<(DataKey, Vec<u8>), KekError> {
        let started = Instant::now();
        let r = self.inner.generate(ctx).await;
        self.metrics.record("generate", started, &r);
        r
    }

    async fn wrap(&self, ctx: &KeyContext, key: &DataKey) -> Result<Vec<u8>, KekError> {
        let started = Instant::now();
        let r = self.inner.wrap(ctx, key).await;
        self.metrics.record("wrap", started, &r);
        r
    }

    async fn unwrap(&self, ctx: &KeyContext, wrapped: &[u8]) -> Result<DataKey, KekError> {
        let started = Instant::now();
        let r = self.inner.unwrap(ctx, wrapped).await;
        self.metrics.record("unwrap", started, &r);
        r
    }

    async fn rewrap_to(
        &self,
        ctx: &KeyContext,
        wrapped: &[u8],
        to: &dyn KekProvider,
    ) -> Option<Result<Vec<u8>, KekError>> {
        let started = Instant::now();
        let r = self.inner.rewrap_to(ctx, wrapped, to).await?;
        self.metrics.record("rewrap", started, &r);
        Some(r)
    }

    fn aws_kms_key(&self) -> Option<String> {
        self.inner.aws_kms_key()
    }
}
