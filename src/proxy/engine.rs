//! The encryption engine shared by all connections of a proxy, and the per-direction cipher
//! that applies it to single values.
//!
//! Never logs values, parameters, keys or ciphertext: errors carry column names and SQLSTATEs
//! only.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::crypto::{looks_like_enc_v1, ColumnId, ColumnKey, DekId, EncV1, NonceSource, OrgId};
use crate::keys::{
    spawn_key_listener, CachedDek, InstrumentedKek, KekMetrics, KekProvider, KeyError, KeyManager,
    KeyManagerConfig, KeyStore, ListenerState, RotationPolicy,
};
use crate::proxy::catalog::Catalog;
use crate::proxy::error::ClientError;
use crate::rules::{ColumnRule, RuleSet};
use crate::sql::{Analysis, Protected, ProtectedTable};

/// Counters of what the engine did (exported as metrics).
#[derive(Debug)]
pub struct EngineStats {
    /// Values encrypted on the way in.
    pub values_encrypted: AtomicU64,
    /// Values decrypted on the way out.
    pub values_decrypted: AtomicU64,
    /// Plaintext values found in encrypted columns and passed through.
    pub plaintext_reads: AtomicU64,
    /// Statements refused, by reason.
    pub statements_rejected: ReasonCounts,
    /// Values that failed to decrypt, by reason.
    pub decrypt_failures: ReasonCounts,
}

/// Reasons a statement is refused (metric label values), by SQLSTATE.
pub const REJECT_REASONS: &[&str] = &[
    "unsafe_statement",
    "tenant",
    "key_unavailable",
    "corrupted",
    "other",
];
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

/// Counters for a fixed, small set of reasons.
#[derive(Debug)]
pub struct ReasonCounts {
    names: &'static [&'static str],
    counts: Vec<AtomicU64>,
}

impl ReasonCounts {
    fn new(names: &'static [&'static str]) -> Self {
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
}

impl Default for EngineStats {
    fn default() -> Self {
        Self {
            values_encrypted: AtomicU64::new(0),
            values_decrypted: AtomicU64::new(0),
            plaintext_reads: AtomicU64::new(0),
            statements_rejected: ReasonCounts::new(REJECT_REASONS),
            decrypt_failures: ReasonCounts::new(DECRYPT_FAILURE_REASONS),
        }
    }
}

/// The metric reason for a refusal with SQLSTATE `code`.
pub(crate) fn reject_reason(code: &str) -> &'static str {
    match code {
        "0A000" => "unsafe_statement",
        "42501" => "tenant",
        "58000" => "key_unavailable",
        "XX001" => "corrupted",
        _ => "other",
    }
}

/// Settings and shared state of the encrypting layer.
pub struct Engine {
    /// Invariant: replaced whole on reload; readers take a snapshot and keep it for the
    /// message they are handling.
    rules: std::sync::RwLock<Arc<RulesSnapshot>>,
    pub(crate) keys: Arc<KeyManager>,
    pub(crate) catalog: Catalog,
    pub(crate) default_tenant: Option<OrgId>,
    pub(crate) strict_reads: bool,
    /// Values under destroyed (shredded) DEKs read as NULL instead of failing (XX001).
    pub(crate) shredded_null: bool,
    plans: crate::proxy::plans::PlanCache,
    /// What the engine did.
    pub stats: EngineStats,
    /// Calls to the KEK providers.
    pub kek_metrics: KekMetrics,
    /// The key change listener (`None` when the engine was built without one).
    pub(crate) key_listener: Option<Arc<ListenerState>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Engine({} rule tables)", self.rules().rules.len())
    }
}

impl Engine {
    /// Build the engine from its settings: ensure the key store schema (retried in the
    /// background while the key store is unreachable) and start the counter flusher.
    pub async fn start(settings: EngineSettings) -> Result<Arc<Engine>, KeyError> {
        let store = Arc::new(
            KeyStore::new(settings.service.clone(), &settings.key_schema)?
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
                    ttl: settings.key_cache_ttl,
                    capacity: settings.key_cache_capacity,
                    rotation: settings.rotation,
                },
            )
            .with_unwrap_only(settings.kek_also.into_iter().map(instrument).collect()),
        );
        keys.spawn_counter_flusher(settings.counter_flush_interval, std::future::pending());
        let (_, listener) = spawn_key_listener(Arc::clone(&keys));
        let mut engine = Engine::new(
            Arc::new(settings.rules),
            keys,
            settings.service.clone(),
            settings.connect_timeout,
            settings.default_tenant,
            settings.strict_reads,
        );
        engine.catalog = Catalog::new(
            settings.service,
            settings.connect_timeout,
            settings.service_tls,
        );
        engine.kek_metrics = kek_metrics;
        engine.key_listener = Some(listener);
        engine.shredded_null = settings.shredded_reads == ShreddedReads::Null;
        Ok(Arc::new(engine))
    }

    /// Build the engine.
    pub fn new(
        rules: Arc<RuleSet>,
        keys: Arc<KeyManager>,
        service: tokio_postgres::Config,
        connect_timeout: std::time::Duration,
        default_tenant: Option<OrgId>,
        strict_reads: bool,
    ) -> Self {
        Self {
            rules: std::sync::RwLock::new(Arc::new(RulesSnapshot::new(rules))),
            keys,
            catalog: Catalog::new(service, connect_timeout, crate::tls::ServiceTls::default()),
            default_tenant,
            strict_reads,
            shredded_null: false,
            plans: crate::proxy::plans::PlanCache::new(),
            stats: EngineStats::default(),
            kek_metrics: KekMetrics::default(),
            key_listener: None,
        }
    }

    /// The key manager (DEK cache and key store).
    pub fn keys(&self) -> &Arc<KeyManager> {
        &self.keys
    }

    /// Whether the key change listener is connected and listening (`None`: no listener).
    pub fn key_listener_ready(&self) -> Option<bool> {
        self.key_listener.as_ref().map(|l| l.is_listening())
    }

    /// Key change notifications applied, by kind (empty without a listener).
    pub fn key_changes(&self) -> Vec<(&'static str, u64)> {
        self.key_listener
            .as_ref()
            .map(|l| l.changes())
            .unwrap_or_default()
    }

    /// The analysis of `sql`, from the plan cache when this text was seen before.
    pub(crate) fn analyze(&self, sql: &str) -> Arc<Analysis> {
        if let Some(hit) = self.plans.get(sql) {
            return hit;
        }
        let analysis = Arc::new(crate::sql::analyze(sql, &self.rules().protected));
        self.plans.offer(sql, &analysis);
        analysis
    }

    /// Whether `sql` must be analysed: it may touch protected tables or the tenant setting,
    /// or is a COPY whose output may carry enc:v1 values (no parsing).
    pub(crate) fn might_touch(&self, sql: &str) -> bool {
        crate::sql::worth_analysing(sql, &self.rules().protected)
    }

    /// The rules in force now.
    pub(crate) fn rules(&self) -> Arc<RulesSnapshot> {
        Arc::clone(
            &self
                .rules
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Replace the rules (SIGHUP). Statements already prepared keep the analysis they were
    /// prepared with; cached analyses and catalog mappings are dropped so new statements and
    /// results use the new rules.
    pub fn reload(&self, rules: RuleSet) {
        let snapshot = Arc::new(RulesSnapshot::new(Arc::new(rules)));
        *self
            .rules
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = snapshot;
        self.plans.clear();
        self.catalog.invalidate_all();
    }

    /// Weight of the cached statement analyses, in bytes (bounded by the cache's cap).
    pub fn plan_cache_bytes(&self) -> u64 {
        self.plans.weighted_size()
    }

    /// Number of tables with rules now.
    pub fn rule_tables(&self) -> usize {
        self.rules().rules.len()
    }
}

/// What reading a value whose DEK was destroyed (`keys shred`) gives the client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ShreddedReads {
    /// An error, SQLSTATE XX001 "uses a destroyed data key" (the default).
    #[default]
    Error,
    /// NULL, in query results and `COPY … TO` alike (counted as decrypt failures with
    /// reason `shredded`). Writes of such values are still refused.
    Null,
}

/// Everything the engine is built from.
pub struct EngineSettings {
    /// The rules (must not be empty: without rules the proxy is a plain pass-through).
    pub rules: RuleSet,
    /// The KEK provider: wraps new DEKs.
    pub kek: Arc<dyn KekProvider>,
    /// Further KEK providers, used only to unwrap DEKs whose recorded KEK id is theirs.
    pub kek_also: Vec<Arc<dyn KekProvider>>,
    /// Service connection settings (key store, catalog); the database holds the key store.
    pub service: tokio_postgres::Config,
    /// Key store schema name.
    pub key_schema: String,
    /// DEK cache TTL.
    pub key_cache_ttl: std::time::Duration,
    /// DEK cache capacity.
    pub key_cache_capacity: u64,
    /// Automatic rotation limits.
    pub rotation: RotationPolicy,
    /// How often encryption counts are written to the key store (and rotation is checked).
    pub counter_flush_interval: std::time::Duration,
    /// Default tenant for writes.
    pub default_tenant: Option<OrgId>,
    /// Refuse plaintext in encrypted columns on read.
    pub strict_reads: bool,
    /// What reading a value under a destroyed (shredded) DEK gives.
    pub shredded_reads: ShreddedReads,
    /// Timeout for service connections.
    pub connect_timeout: std::time::Duration,
    /// TLS for the service connections (default: none, as before).
    pub service_tls: crate::tls::ServiceTls,
}

/// The rules and the analyser's view of them, swapped together.
#[derive(Debug)]
pub(crate) struct RulesSnapshot {
    pub(crate) rules: Arc<RuleSet>,
    pub(crate) protected: Protected,
}

impl RulesSnapshot {
    fn new(rules: Arc<RuleSet>) -> Self {
        let protected = protected_from_rules(&rules);
        Self { rules, protected }
    }
}

/// The analyser's view of the rules.
pub(crate) fn protected_from_rules(rules: &RuleSet) -> Protected {
    Protected::new(rules.tables().map(|t| ProtectedTable {
        schema: t.schema().to_owned(),
        name: t.name().to_owned(),
        tenant_column: t.tenant_column().map(str::to_owned),
        row_key: t.row_key().map(str::to_owned),
        encrypted: t.columns().map(|c| c.column().to_owned()).collect(),
    }))
}

/// A decrypted value.
pub(crate) struct Decrypted {
    /// Plaintext (UTF-8 as encrypted).
    pub(crate) plaintext: Vec<u8>,
    /// The organisation that owns the value.
    pub(crate) org: OrgId,
}

/// What reading one value of a column found.
pub(crate) enum ReadOutcome {
    /// An enc:v1 value, decrypted.
    Decrypted(Decrypted),
    /// Not an enc:v1 value: passed through unchanged.
    Plain,
    /// An enc:v1 value under a destroyed DEK, with the `null` shredded-reads policy.
    Shredded,
}

/// What a write found in a value it gives for an encrypted column that already is an enc:v1
/// value of that column (a restore of an encrypted dump, a re-run): see [`Cipher::read_restored`].
pub(crate) enum Restored {
    /// Valid for the row it is written to: stored unchanged.
    AsIs(Decrypted),
    /// Valid, but sealed before its table's values were bound to their rows (the table's
    /// `row_key` was added since): its plaintext is sealed again, bound to the row written.
    Rebind(Decrypted),
}

/// Encrypts and decrypts single values for one direction of one connection: holds the nonce
/// generator and derived per-column keys.
pub(crate) struct Cipher {
    engine: Arc<Engine>,
    nonces: NonceSource,
    /// Derived subkeys, valid while the cached DEK they came from is the same allocation.
    /// Reads find their DEK here first (checking it is still fresh is far cheaper than a DEK
    /// cache look-up per value, and rows of many organisations interleave in one result).
    /// Keys are ids of DEKs that exist in the key store (random, not chosen by clients), so a
    /// fast non-keyed hash is safe.
    subkeys: SubkeyMap,
    /// The active DEK of the last value written, reused for the same organisation while it
    /// is still fresh (not expired, not revoked by a rotation or shred).
    last_active_dek: Option<Arc<CachedDek>>,
}

impl Cipher {
    pub(crate) fn new(engine: Arc<Engine>) -> Self {
        Self {
            engine,
            nonces: NonceSource::from_os_rng(),
            subkeys: SubkeyMap::default(),
            last_active_dek: None,
        }
    }

    pub(crate) fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Encrypt `plaintext` (UTF-8) for `column` under `org`'s active DEK. `row_key`: the key
    /// of the row the value is written to, as PostgreSQL prints it; needed (and only used)
    /// when the column's table binds values to their row.
    pub(crate) async fn encrypt(
        &mut self,
        column: &ColumnRule,
        org: &OrgId,
        row_key: Option<&[u8]>,
        plaintext: &[u8],
    ) -> Result<String, ClientError> {
        let dek = self.active_key(column, org).await?;
        self.encrypt_with(&dek, column, org, row_key, plaintext)
    }

    /// The active DEK of `org` (for a write to `column`).
    pub(crate) async fn active_key(
        &mut self,
        column: &ColumnRule,
        org: &OrgId,
    ) -> Result<Arc<CachedDek>, ClientError> {
        if let Some(dek) = &self.last_active_dek {
            if dek.org() == org && self.engine.keys.still_fresh(dek) {
                return Ok(Arc::clone(dek));
            }
        }
        // Boxed here and below: the key manager's futures (cache, key store, KMS) are large,
        // and a session's relay future would otherwise carry their size even while idle.
        let dek = Box::pin(self.engine.keys.active_key(org))
            .await
            .map_err(|e| key_error(&e, column))?;
        self.last_active_dek = Some(Arc::clone(&dek));
        Ok(dek)
    }

    /// The DEK `id` (to read a value of `column`), or `None` when it was destroyed and the
    /// policy reads such values as NULL.
    pub(crate) async fn key_for_read(
        &self,
        id: DekId,
        column: &ColumnRule,
    ) -> Result<Option<Arc<CachedDek>>, ClientError> {
        match Box::pin(self.engine.keys.key_by_id(id)).await {
            Ok(d) => Ok(Some(d)),
            Err(KeyError::DestroyedDek(_)) if self.engine.shredded_null => {
                self.engine.stats.decrypt_failures.inc("shredded");
                Ok(None)
            }
            Err(e) => {
                self.engine.stats.decrypt_failures.inc("key_unavailable");
                Err(key_error(&e, column))
            }
        }
    }

    /// Encrypt with an already fetched DEK.
    pub(crate) fn encrypt_with(
        &mut self,
        dek: &Arc<CachedDek>,
        column: &ColumnRule,
        org: &OrgId,
        row_key: Option<&[u8]>,
        plaintext: &[u8],
    ) -> Result<String, ClientError> {
        let key = subkey(&mut self.subkeys, dek, column.id());
        let sealed = match (column.row_key(), row_key) {
            (None, _) => key.seal(org, plaintext, &mut self.nonces),
            (Some(k), None) => {
                return Err(ClientError::unsupported(format!(
                    "pgenvelope: values of {} are bound to their row: the write must give the \
                     row key {k}",
                    column.qualified_name()
                )))
            }
            (Some(_), Some(row)) => {
                let mut out = String::new();
                key.seal_for_row_into(org, row, plaintext, &mut self.nonces, &mut out)
                    .map(|()| out)
            }
        };
        let sealed = sealed.map_err(|_| {
            ClientError::unsupported(format!(
                "pgenvelope: value for {} is too large to encrypt",
                column.qualified_name()
            ))
        })?;
        self.engine.keys.note_encryptions(dek.dek_id(), 1);
        self.engine
            .stats
            .values_encrypted
            .fetch_add(1, Ordering::Relaxed);
        Ok(sealed)
    }

    /// Read a value of a column whose origin is known (`expected`), or of a column with no
    /// origin (`None`: only values that carry a header of a known rule column are decrypted).
    ///
    /// `tenant`: the session tenant; a value of another organisation is refused (42501).
    /// `row_key`: the key of the row the value was read from, when known (row binding).
    pub(crate) async fn read(
        &mut self,
        expected: Option<&ColumnRule>,
        value: &[u8],
        tenant: Option<&OrgId>,
        row_key: Option<&[u8]>,
    ) -> Result<ReadOutcome, ClientError> {
        let (parsed, looked_up) = match self.classify(expected, value)? {
            Classified::Plain => return Ok(ReadOutcome::Plain),
            Classified::Sealed { parsed, column } => (parsed, column),
        };
        let Some(column) = looked_up.as_deref().or(expected) else {
            return Ok(ReadOutcome::Plain);
        };
        let Some(dek) = self.dek_for(&parsed, column).await? else {
            return Ok(ReadOutcome::Shredded);
        };
        self.open_with(&dek, parsed, column, tenant, row_key)
            .map(ReadOutcome::Decrypted)
    }

    /// The DEK a sealed value of `column` names (from this connection's subkeys while fresh,
    /// else from the key store); `None` when destroyed under the `null` shredded-reads policy.
    async fn dek_for(
        &mut self,
        parsed: &EncV1,
        column: &ColumnRule,
    ) -> Result<Option<Arc<CachedDek>>, ClientError> {
        let known = self
            .subkeys
            .get(&(parsed.dek_id(), column.id()))
            .map(|(d, _)| d)
            .filter(|d| self.engine.keys.still_fresh(d))
            .cloned();
        match known {
            Some(d) => Ok(Some(d)),
            None => self.key_for_read(parsed.dek_id(), column).await,
        }
    }

    /// Open `parsed`, an enc:v1 value of `column` that a write gives for the row with key
    /// `row_key` (a restore of an encrypted dump, a re-run); `Ok(None)` when it fails
    /// authentication (not a value of ours: data like any other, to be encrypted). The binding
    /// is checked as by [`Cipher::open_with`], except that an unbound value written before the
    /// table's `row_key` was added opens without a row key and comes back as
    /// [`Restored::Rebind`], to be sealed again for its new row as `reencrypt` would: a dump
    /// taken directly from the database before row binding was turned on restores as bound
    /// values, not as the encryption of their envelope text. The caller checks the
    /// organisation.
    pub(crate) fn open_restored(
        &mut self,
        dek: &Arc<CachedDek>,
        parsed: EncV1,
        column: &ColumnRule,
        row_key: Option<&[u8]>,
    ) -> Result<Option<Restored>, ClientError> {
        let rebind = column.row_key().is_some() && !parsed.is_row_bound();
        let row_key = if rebind {
            None
        } else {
            self.check_binding(&parsed, column, row_key)?;
            row_key
        };
        let org = dek.org().clone();
        let opened =
            subkey(&mut self.subkeys, dek, column.id()).open_owned_in_row(&org, row_key, parsed);
        let Ok(plaintext) = opened else {
            return Ok(None);
        };
        self.engine
            .stats
            .values_decrypted
            .fetch_add(1, Ordering::Relaxed);
        let d = Decrypted { plaintext, org };
        Ok(Some(if rebind {
            Restored::Rebind(d)
        } else {
            Restored::AsIs(d)
        }))
    }

    /// [`Cipher::open_restored`] for a value given as text: fetches the DEK it names.
    /// `Ok(None)`: not an enc:v1 value of `column` after all (data, to be encrypted). A value
    /// under a destroyed DEK is refused (XX001) whatever the shredded-reads policy.
    pub(crate) async fn read_restored(
        &mut self,
        column: &ColumnRule,
        value: &[u8],
        row_key: Option<&[u8]>,
    ) -> Result<Option<Restored>, ClientError> {
        let parsed = match self.classify(Some(column), value)? {
            Classified::Plain => return Ok(None),
            Classified::Sealed { parsed, .. } => parsed,
        };
        let Some(dek) = self.dek_for(&parsed, column).await? else {
            return Err(ClientError::corrupted(format!(
                "pgenvelope: the encrypted value for {} uses a destroyed data key",
                column.qualified_name()
            )));
        };
        self.open_restored(&dek, parsed, column, row_key)
    }

    /// First, synchronous half of [`Cipher::read`]: classify the value and check its header.
    pub(crate) fn prepare(
        &self,
        expected: Option<&ColumnRule>,
        value: &[u8],
    ) -> Result<Prepared, ClientError> {
        Ok(match self.classify(expected, value)? {
            Classified::Plain => Prepared::Plain,
            Classified::Sealed { parsed, column } => {
                match column.or_else(|| expected.map(|c| Box::new(c.clone()))) {
                    Some(column) => Prepared::Sealed { parsed, column },
                    None => Prepared::Plain,
                }
            }
        })
    }

    /// [`Cipher::prepare`] without copying `expected`: a sealed value's column is `None` when
    /// it is `expected`, and only a column found by the value's header is returned owned.
    fn classify(
        &self,
        expected: Option<&ColumnRule>,
        value: &[u8],
    ) -> Result<Classified, ClientError> {
        let stats = &self.engine.stats;
        if !looks_like_enc_v1(value) {
            if let Some(col) = expected {
                if self.engine.strict_reads {
                    stats.decrypt_failures.inc("not_encrypted");
                    return Err(ClientError::corrupted(format!(
                        "pgenvelope: {} holds a value that is not encrypted (strict_reads)",
                        col.qualified_name()
                    )));
                }
                stats.plaintext_reads.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(Classified::Plain);
        }
        let fail = |what: &str, col: Option<&ColumnRule>| {
            let reason = if what.starts_with("belongs") {
                "wrong_column"
            } else {
                "malformed"
            };
            stats.decrypt_failures.inc(reason);
            ClientError::corrupted(match col {
                Some(c) => format!("pgenvelope: value in {} {what}", c.qualified_name()),
                None => format!("pgenvelope: encrypted value {what}"),
            })
        };
        let parsed = match EncV1::parse(value) {
            Ok(p) => p,
            // Text that merely starts like an enc:v1 value in a column we know nothing about
            // is not ours.
            Err(_) if expected.is_none() => return Ok(Classified::Plain),
            Err(_) => return Err(fail("is malformed", expected)),
        };
        let column = match expected {
            Some(col) if parsed.column_id() != col.id() => {
                return Err(fail("belongs to another column", expected))
            }
            Some(_) => None,
            None => match self.engine.rules().rules.by_column_id(parsed.column_id()) {
                Some(col) => Some(Box::new(col.clone())),
                None => return Ok(Classified::Plain),
            },
        };
        Ok(Classified::Sealed { parsed, column })
    }

    /// Second, synchronous half of [`Cipher::read`]: open with the fetched DEK.
    ///
    /// Row binding: a value of a column whose table has a `row_key` must be bound to its row
    /// and opens only with `row_key`, the key of the row it was read from; without one it is
    /// refused (0A000: read the key column too). A bound value in a column without a row key,
    /// or an unbound one in a column with one, is refused (XX001).
    pub(crate) fn open_with(
        &mut self,
        dek: &Arc<CachedDek>,
        parsed: EncV1,
        column: &ColumnRule,
        tenant: Option<&OrgId>,
        row_key: Option<&[u8]>,
    ) -> Result<Decrypted, ClientError> {
        self.check_binding(&parsed, column, row_key)?;
        let stats = &self.engine.stats;
        if let Some(t) = tenant {
            if dek.org() != t {
                stats.decrypt_failures.inc("other_tenant");
                return Err(ClientError::privilege(format!(
                    "pgenvelope: a value in {} belongs to another organisation than the session tenant",
                    column.qualified_name()
                )));
            }
        }
        let org = dek.org().clone();
        let opened =
            subkey(&mut self.subkeys, dek, column.id()).open_owned_in_row(&org, row_key, parsed);
        match opened {
            Ok(plaintext) => {
                stats.values_decrypted.fetch_add(1, Ordering::Relaxed);
                Ok(Decrypted { plaintext, org })
            }
            Err(_) => Err(self.authentication_failed(column)),
        }
    }

    /// Whether `parsed` is bound as its column's rules say: bound to a row (and then opened
    /// with the key of the row it was read from) exactly when the table has a `row_key`.
    fn check_binding(
        &self,
        parsed: &EncV1,
        column: &ColumnRule,
        row_key: Option<&[u8]>,
    ) -> Result<(), ClientError> {
        let stats = &self.engine.stats;
        match (column.row_key(), parsed.is_row_bound(), row_key) {
            (Some(_), true, Some(_)) | (None, false, _) => Ok(()),
            (Some(k), true, None) => Err(ClientError::unsupported(format!(
                "pgenvelope: values of {} are bound to their row: read the row key {k} in \
                     the same result (a plain column reference)",
                column.qualified_name()
            ))),
            (Some(_), false, _) => {
                stats.decrypt_failures.inc("wrong_row");
                Err(ClientError::corrupted(format!(
                    "pgenvelope: a value in {} is not bound to its row (written before row \
                     binding was turned on: run `pgenvelope reencrypt`)",
                    column.qualified_name()
                )))
            }
            (None, true, _) => {
                stats.decrypt_failures.inc("wrong_row");
                Err(ClientError::corrupted(format!(
                    "pgenvelope: a value in {} is bound to a row, but the rules give its table \
                     no row_key",
                    column.qualified_name()
                )))
            }
        }
    }

    /// A value of `column` failed authentication (counted).
    fn authentication_failed(&self, column: &ColumnRule) -> ClientError {
        self.engine.stats.decrypt_failures.inc("authentication");
        ClientError::corrupted(format!(
            "pgenvelope: value in {} fails authentication",
            column.qualified_name()
        ))
    }
}

/// Result of [`Cipher::prepare`].
pub(crate) enum Prepared {
    /// Not an enc:v1 value of a known column: pass through.
    Plain,
    /// An enc:v1 value of `column`, to open with the DEK its header names.
    Sealed {
        /// The parsed value.
        parsed: EncV1,
        /// Its column (boxed: rules are large, and most values are [`Prepared::Plain`]).
        column: Box<ColumnRule>,
    },
}

/// Result of [`Cipher::classify`].
enum Classified {
    /// Not an enc:v1 value of a known column: pass through.
    Plain,
    /// An enc:v1 value; `column` is `None` when it is the expected column.
    Sealed {
        /// The parsed value.
        parsed: EncV1,
        /// Its column, when it was found from the value's header.
        column: Option<Box<ColumnRule>>,
    },
}

/// Derived subkeys by (DEK, column), with the cached DEK they were derived from.
type SubkeyMap = HashMap<(DekId, ColumnId), (Arc<CachedDek>, ColumnKey), rustc_hash::FxBuildHasher>;

/// The derived subkey for (DEK, column), derived once per cached DEK allocation.
fn subkey<'a>(subkeys: &'a mut SubkeyMap, dek: &Arc<CachedDek>, column: ColumnId) -> &'a ColumnKey {
    let key = (dek.dek_id(), column);
    let fresh = match subkeys.get(&key) {
        Some((cached, _)) => !Arc::ptr_eq(cached, dek),
        None => true,
    };
    if fresh {
        if subkeys.len() > 4096 {
            subkeys.clear();
        }
        subkeys.remove(&key);
    }
    &subkeys
        .entry(key)
        .or_insert_with(|| {
            (
                Arc::clone(dek),
                ColumnKey::derive(dek.key(), dek.dek_id(), column),
            )
        })
        .1
}

/// Map a key-management failure to what the client sees (58000 unavailable; XX001 for keys
/// that are gone; 42501 for another organisation's key).
pub(crate) fn key_error(e: &KeyError, column: &ColumnRule) -> ClientError {
    tracing::warn!(error = %e, column = column.qualified_name(), "key unavailable");
    let col = column.qualified_name();
    match e {
        KeyError::KekUnavailable { .. }
        | KeyError::KeyStoreUnavailable { .. }
        | KeyError::ActiveKeyContention { .. } => ClientError::unavailable(format!(
            "pgenvelope: the key service is unavailable; cannot use keys for {col}"
        )),
        KeyError::KekUnusable { .. } => ClientError::unavailable(format!(
            "pgenvelope: the key-encryption key is disabled or deleted; cannot use keys for {col}"
        )),
        KeyError::UnwrapRejected { .. }
        | KeyError::KekMismatch { .. }
        | KeyError::InvalidStoreUrl { .. }
        | KeyError::CorruptRecord { .. }
        | KeyError::InvalidSchemaName { .. } => ClientError::unavailable(format!(
            "pgenvelope: the data key for {col} cannot be unwrapped"
        )),
        KeyError::UnknownDek(_) => ClientError::corrupted(format!(
            "pgenvelope: a value in {col} uses an unknown data key"
        )),
        KeyError::DestroyedDek(_) => ClientError::corrupted(format!(
            "pgenvelope: a value in {col} uses a destroyed data key"
        )),
        KeyError::WrongOrg { .. } => ClientError::privilege(format!(
            "pgenvelope: a value in {col} belongs to another organisation"
        )),
    }
}
