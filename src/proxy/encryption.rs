//! The encrypting layer of a proxy: the handles its connections share (rules with their plan
//! cache, the key manager, the catalog, the tenancy and read policies, the metrics), each owned
//! by the part that uses it.
//!
//! Never logs values, parameters, keys or ciphertext.

use std::sync::Arc;

use prometheus_client::registry::Registry;

use crate::cipher::{Cipher, CipherMetrics, CipherPolicy, ReasonCounts};
use crate::config::{EncryptionConfig, KeysConfig};
use crate::crypto::OrgId;
use crate::keys::{
    spawn_key_listener, InstrumentedKek, KekMetrics, KekProvider, KeyError, KeyManager,
    KeyManagerConfig, KeyStore, ListenerState,
};
use crate::proxy::catalog::Catalog;
use crate::proxy::error::{ClientError, REJECT_REASONS};
use crate::proxy::rules::Rules;
use crate::rules::RuleSet;

/// The handles every encrypting connection of a proxy shares.
pub struct Encryption {
    pub(crate) rules: Arc<Rules>,
    keys: Arc<KeyManager>,
    pub(crate) catalog: Arc<Catalog>,
    default_tenant: Option<OrgId>,
    policy: CipherPolicy,
    cipher_metrics: Arc<CipherMetrics>,
    /// Statements refused, by reason.
    refusals: ReasonCounts,
    kek_metrics: KekMetrics,
    key_listener: Arc<ListenerState>,
}

impl std::fmt::Debug for Encryption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Encryption({} rule tables)", self.rules.tables())
    }
}

/// Everything the encrypting layer is built from: the loaded rules and opened KEK providers,
/// the keys' and the encryption's configuration, and the service connection to the upstream.
pub struct EncryptionSettings {
    /// The rules (must not be empty: without rules the proxy is a plain pass-through).
    pub rules: RuleSet,
    /// The KEK provider: wraps new DEKs.
    pub kek: Arc<dyn KekProvider>,
    /// Further KEK providers, used only to unwrap DEKs whose recorded KEK id is theirs.
    pub kek_also: Vec<Arc<dyn KekProvider>>,
    /// Key store schema, DEK cache, rotation and counter flushing. Its KEK URIs are not opened
    /// here: `kek` and `kek_also` are the providers.
    pub keys: KeysConfig,
    /// Default tenant and read policies. Its rules path is not read here: `rules` is the set.
    pub encryption: EncryptionConfig,
    /// Service connection settings (key store, catalog); the database holds the key store.
    pub service: tokio_postgres::Config,
    /// Timeout for service connections.
    pub connect_timeout: std::time::Duration,
    /// TLS for the service connections.
    pub service_tls: crate::tls::ServiceTls,
}

impl Encryption {
    /// Build the encrypting layer: ensure the key store schema (retried in the background
    /// while the key store is unreachable), start the counter flusher and the key change
    /// listener.
    pub async fn start(settings: EncryptionSettings) -> Result<Arc<Encryption>, KeyError> {
        let store = Arc::new(
            KeyStore::new(settings.service.clone(), &settings.keys.key_schema)?
                .with_tls(settings.service_tls.clone()),
        );
        match tokio::time::timeout(settings.connect_timeout, store.ensure_schema()).await {
            Ok(Ok(())) => {}
            outcome => {
                let why = match outcome {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".to_owned(),
                };
                tracing::error!(error = %why, "key store not ready; retrying in the background");
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                        if store.ensure_schema().await.is_ok() {
                            tracing::info!("key store ready");
                            return;
                        }
                    }
                });
            }
        }
        let kek_metrics = KekMetrics::default();
        let instrument = |p: Arc<dyn KekProvider>| -> Arc<dyn KekProvider> {
            Arc::new(InstrumentedKek::new(p, kek_metrics.clone()))
        };
        let keys = Arc::new(
            KeyManager::new(
                store,
                instrument(settings.kek),
                KeyManagerConfig {
                    ttl: settings.keys.key_cache_ttl,
                    capacity: settings.keys.key_cache_capacity,
                    rotation: settings.keys.rotation,
                },
            )
            .with_unwrap_only(settings.kek_also.into_iter().map(instrument).collect()),
        );
        keys.spawn_counter_flusher(settings.keys.counter_flush_interval, std::future::pending());
        let (_, key_listener) = spawn_key_listener(Arc::clone(&keys));
        Ok(Arc::new(Encryption {
            rules: Arc::new(Rules::new(Arc::new(settings.rules))),
            keys,
            catalog: Arc::new(Catalog::new(
                settings.service,
                settings.connect_timeout,
                settings.service_tls,
            )),
            default_tenant: settings.encryption.default_tenant,
            policy: CipherPolicy {
                strict_reads: settings.encryption.strict_reads,
                shredded_reads: settings.encryption.shredded_reads,
            },
            cipher_metrics: Arc::default(),
            refusals: ReasonCounts::new(REJECT_REASONS),
            kek_metrics,
            key_listener,
        }))
    }

    /// The layer for unit tests: no key store, catalog or listener is ever reached (keys and
    /// catalog facts are handed in by the test).
    #[cfg(test)]
    pub(crate) fn offline(rules: RuleSet, default_tenant: Option<OrgId>) -> Arc<Encryption> {
        let service = tokio_postgres::Config::new();
        let store = Arc::new(
            KeyStore::new(service.clone(), crate::keys::DEFAULT_SCHEMA)
                .expect("a plain schema name"),
        );
        let kek: Arc<dyn KekProvider> = Arc::new(OfflineKek);
        let keys = Arc::new(KeyManager::new(store, kek, KeyManagerConfig::default()));
        Arc::new(Encryption {
            rules: Arc::new(Rules::new(Arc::new(rules))),
            keys,
            catalog: Arc::new(Catalog::new(
                service,
                std::time::Duration::from_secs(1),
                crate::tls::ServiceTls::default(),
            )),
            default_tenant,
            policy: CipherPolicy::default(),
            cipher_metrics: Arc::default(),
            refusals: ReasonCounts::new(REJECT_REASONS),
            kek_metrics: KekMetrics::default(),
            key_listener: Arc::default(),
        })
    }

    /// A cipher for one connection.
    pub(crate) fn cipher(&self) -> Cipher {
        Cipher::new(
            Arc::clone(&self.keys),
            self.policy,
            Arc::clone(&self.cipher_metrics),
        )
    }

    /// The key manager (DEK cache and key store).
    pub fn keys(&self) -> &Arc<KeyManager> {
        &self.keys
    }

    /// What the connections' ciphers did.
    pub fn cipher_metrics(&self) -> &CipherMetrics {
        &self.cipher_metrics
    }

    /// Statements refused, by reason.
    pub fn refusals(&self) -> &ReasonCounts {
        &self.refusals
    }

    /// The tenant of writes that name none.
    pub(crate) fn default_tenant(&self) -> Option<&OrgId> {
        self.default_tenant.as_ref()
    }

    /// Count a refused statement.
    pub(crate) fn count_refusal(&self, e: &ClientError) {
        self.refusals.inc(e.metric_reason());
    }

    /// Whether the key change listener is connected and listening.
    pub fn key_listener_ready(&self) -> Option<bool> {
        Some(self.key_listener.is_listening())
    }

    /// Key change notifications applied, by kind.
    pub fn key_changes(&self) -> Vec<(&'static str, u64)> {
        self.key_listener.changes()
    }

    /// Replace the rules (SIGHUP). Statements already prepared keep the analysis they were
    /// prepared with; cached analyses and catalog mappings are dropped so new statements and
    /// results use the new rules.
    pub fn reload(&self, rules: RuleSet) {
        self.rules.replace(rules);
        self.catalog.invalidate_all();
    }

    /// Number of tables with rules now.
    pub fn rule_tables(&self) -> usize {
        self.rules.tables()
    }

    /// Weight of the cached statement analyses, in bytes (bounded by the cache's cap).
    pub fn plan_cache_bytes(&self) -> u64 {
        self.rules.plan_cache_bytes()
    }

    /// Register the encrypting layer's metrics, each by its owner (called at each scrape).
    pub fn register(&self, registry: &mut Registry) {
        self.cipher_metrics.register(registry);
        registry.register(
            "statements_rejected",
            "Statements refused, by reason",
            self.refusals.family(),
        );
        self.keys.register(registry);
        let plans = prometheus_client::metrics::gauge::Gauge::<i64>::default();
        plans.set(i64::try_from(self.plan_cache_bytes()).unwrap_or(i64::MAX));
        registry.register(
            "plan_cache_bytes",
            "Weight of cached statement analyses (SQL text and analysis), bounded by a fixed cap",
            plans,
        );
        self.key_listener.register(registry);
        self.kek_metrics.register(registry);
    }
}

/// A KEK that is never asked for anything (the offline layer of unit tests).
#[cfg(test)]
#[derive(Debug)]
struct OfflineKek;

#[cfg(test)]
#[async_trait::async_trait]
impl KekProvider for OfflineKek {
    fn kek_id(&self) -> String {
        "offline".to_owned()
    }

    async fn wrap(
        &self,
        _ctx: &crate::keys::KeyContext,
        _key: &crate::crypto::DataKey,
    ) -> Result<Vec<u8>, crate::keys::KekError> {
        Err(crate::keys::KekError::NotSupported { scheme: "offline" })
    }

    async fn unwrap(
        &self,
        _ctx: &crate::keys::KeyContext,
        _wrapped: &[u8],
    ) -> Result<crate::crypto::DataKey, crate::keys::KekError> {
        Err(crate::keys::KekError::NotSupported { scheme: "offline" })
    }
}
