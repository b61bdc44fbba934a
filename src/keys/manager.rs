//! The DEK cache in front of the key store and the KEK provider.
//!
//! Three moka caches hold `Arc<CachedDek>`: one keyed by DEK id (read path), one keyed by
//! organisation holding its active DEK (write path), and one keyed by organisation holding its
//! active search key (search terms). Search keys never enter the DEK caches, so a search key's
//! id is never served as a DEK. A warm call makes no key-store or KEK call. Cold loads are single-flight: concurrent callers for the same key share one load and
//! one unwrap, and share its error if it fails.
//!
//! Expiry: each entry records when it was loaded on tokio's clock and is treated as missing
//! once older than the TTL, so tests can drive expiry with `tokio::time::pause()`. moka's own
//! TTL (on its own clock) only bounds memory. Plaintext keys are zeroized when the last `Arc`
//! to an entry is dropped, i.e. after eviction once in-flight users finish.
//!
//! Encryption counts are kept in memory per DEK and written to the key store in batches by
//! [`KeyManager::flush_counters`]. A count that fails to flush is kept for the next flush; a
//! flush whose connection dies after commit may count twice, which errs towards rotating early.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use moka::future::Cache;
use moka::ops::compute::Op;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::crypto::{DataKey, DekId, OrgId};

use super::error::KeyError;
use super::kek::{KekError, KekProvider, KeyContext};
use super::search::{SearchKeyRecord, SearchKeyState};
use super::store::{DekRecord, DekState, KeyStore};

/// How often the counter flusher checks DEK ages when nothing was encrypted.
const AGE_CHECK_EVERY: Duration = Duration::from_secs(60);

/// Cache settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyManagerConfig {
    /// How long an unwrapped DEK (and an organisation's active-DEK choice) is served from
    /// memory before it is read again. Default 300 s.
    pub ttl: Duration,
    /// Maximum number of cached DEKs (and, separately, of cached organisations).
    /// Default 10 000.
    pub capacity: u64,
    /// When the counter flusher rotates an active DEK by itself.
    pub rotation: RotationPolicy,
}

/// Automatic rotation: an active DEK is rotated once it has encrypted `max_encryptions`
/// values (counts as persisted by the flusher) or, with `max_age`, once it is that old.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RotationPolicy {
    /// Default 2^31: half the 2^32 limit of random 96-bit nonces under one key.
    pub max_encryptions: u64,
    /// Default: none.
    pub max_age: Option<Duration>,
}

impl Default for RotationPolicy {
    fn default() -> Self {
        Self {
            max_encryptions: crate::crypto::ROTATE_DEK_AFTER,
            max_age: None,
        }
    }
}

impl Default for KeyManagerConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(300),
            capacity: 10_000,
            rotation: RotationPolicy::default(),
        }
    }
}

/// An unwrapped DEK (or search key) as cached: the key plus what was known about it when it
/// was loaded.
///
/// [`KeyManager::search_key`] hands out search keys in this type too: then `dek_id` is the
/// search key's id, `version` its version among the organisation's search keys and `state`
/// `Active`.
#[derive(Debug)]
pub struct CachedDek {
    dek_id: DekId,
    org: OrgId,
    version: i32,
    state: DekState,
    key: DataKey,
    loaded_at: Instant,
    /// `KeyManager::generation` when its load started.
    generation: u64,
}

impl CachedDek {
    /// The DEK's id.
    pub fn dek_id(&self) -> DekId {
        self.dek_id
    }

    /// The organisation that owns it.
    pub fn org(&self) -> &OrgId {
        &self.org
    }

    /// Its version within the organisation.
    pub fn version(&self) -> i32 {
        self.version
    }

    /// Its state when loaded (`Active` or `DecryptOnly`; destroyed keys are never cached; a
    /// search key is `Active`).
    pub fn state(&self) -> DekState {
        self.state
    }

    /// The plaintext key.
    pub fn key(&self) -> &DataKey {
        &self.key
    }

    /// When it was loaded, on tokio's clock.
    pub fn loaded_at(&self) -> Instant {
        self.loaded_at
    }
}

/// Counters for tests and metrics. Monotonic since the manager was built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyManagerStats {
    /// Calls served from memory.
    pub cache_hits: u64,
    /// Calls that had to load (possibly joining another caller's load).
    pub cache_misses: u64,
    /// Calls to [`KekProvider::unwrap`].
    pub unwrap_calls: u64,
    /// Key-store look-ups (`lookup`, `get_or_create_active`, `get_or_create_search_key`)
    /// made to load keys.
    pub store_loads: u64,
    /// DEKs this manager rotated because the rotation policy said so.
    pub auto_rotations: u64,
}

/// DEK cache: finds, creates and unwraps data keys, and counts their use.
///
/// One per proxy, shared as `Arc<KeyManager>`; no global state.
pub struct KeyManager {
    store: Arc<KeyStore>,
    kek: Arc<dyn KekProvider>,
    /// Unwrap-only KEKs, tried by KEK id for DEKs the primary did not wrap.
    also: Vec<Arc<dyn KekProvider>>,
    ttl: Duration,
    by_id: Cache<DekId, Arc<CachedDek>>,
    active: Cache<OrgId, Arc<CachedDek>>,
    /// Active search key per organisation. Invariant: holds search keys only, and search keys
    /// are held nowhere else.
    search: Cache<OrgId, Arc<CachedDek>>,
    /// DEKs known to be destroyed (permanent, so never re-read).
    destroyed: Cache<DekId, ()>,
    rotation: RotationPolicy,
    /// Bumped by every revocation; entries loaded before a revocation that concerns them are
    /// stale even if the load finished after it.
    generation: AtomicU64,
    /// Generation of the last revocation per organisation, with when it happened (pruned after
    /// a TTL: older entries are stale by age anyway).
    revoked: Mutex<HashMap<OrgId, (u64, Instant)>>,
    /// Generation of the last revocation of everything.
    revoked_all: AtomicU64,
    pending: Mutex<HashMap<DekId, u64>>,
    hits: AtomicU64,
    misses: AtomicU64,
    unwraps: AtomicU64,
    store_loads: AtomicU64,
    auto_rotations: AtomicU64,
}

impl KeyManager {
    /// A manager over `store`, unwrapping with `kek`.
    pub fn new(store: Arc<KeyStore>, kek: Arc<dyn KekProvider>, config: KeyManagerConfig) -> Self {
        Self {
            store,
            kek,
            also: Vec::new(),
            ttl: config.ttl,
            by_id: cache(config),
            active: cache(config),
            search: cache(config),
            destroyed: Cache::builder().max_capacity(config.capacity).build(),
            rotation: config.rotation,
            generation: AtomicU64::new(0),
            revoked: Mutex::new(HashMap::new()),
            revoked_all: AtomicU64::new(0),
            pending: Mutex::new(HashMap::new()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            unwraps: AtomicU64::new(0),
            store_loads: AtomicU64::new(0),
            auto_rotations: AtomicU64::new(0),
        }
    }

    /// Also unwrap DEKs recorded as wrapped by any of `keks` (for example the previous KEK
    /// during a migration). New DEKs are always wrapped by the primary KEK.
    pub fn with_unwrap_only(mut self, keks: Vec<Arc<dyn KekProvider>>) -> Self {
        self.also = keks;
        self
    }

    /// The key store behind this cache.
    pub fn store(&self) -> &Arc<KeyStore> {
        &self.store
    }

    /// The organisation's active DEK for encrypting, creating its first DEK if needed.
    ///
    /// If another proxy rotates the organisation's key, this one keeps returning the old DEK
    /// until the entry expires or is invalidated; the old DEK still decrypts everywhere.
    pub async fn active_key(&self, org: &OrgId) -> Result<Arc<CachedDek>, KeyError> {
        if let Some(dek) = self.fresh(&self.active, org).await {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(dek);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        self.evict_if_stale(&self.active, org).await;
        // The entry shared with the by-id cache was loaded no later than this look-up, so a
        // revocation during it leaves the entry stale (see `is_stale`).
        let load = async {
            self.store_loads.fetch_add(1, Ordering::Relaxed);
            let record = self.store.get_or_create_active(org, &*self.kek).await?;
            self.load_by_id(record.dek_id, Some(record)).await
        };
        self.active
            .try_get_with_by_ref(org, load)
            .await
            .map_err(Arc::unwrap_or_clone)
    }

    /// The organisation's active search key, created on first use.
    ///
    /// Creation is race-free across proxies, like the first DEK's (see
    /// [`KeyStore::get_or_create_search_key`]). Cached like an active DEK: same TTL and
    /// capacity, single-flight loads, no key-store or KEK call when warm, and revoked by the
    /// same key change notifications (a search-key rotation is announced as `rotate`; a shred
    /// as `shred`), so [`KeyManager::still_fresh`] works on the returned key unchanged. After
    /// `keys shred`, the next call creates a new search key, as the next write creates a new
    /// DEK; the destroyed one is never returned again.
    ///
    /// The returned key's `dek_id()` is the search key's id; errors about the key
    /// ([`KeyError::UnwrapRejected`], [`KeyError::KekMismatch`]) carry that id. It is never a
    /// DEK: [`KeyManager::key_by_id`] with it fails with [`KeyError::UnknownDek`].
    pub async fn search_key(&self, org: &OrgId) -> Result<Arc<CachedDek>, KeyError> {
        if let Some(key) = self.fresh(&self.search, org).await {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(key);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        self.evict_if_stale(&self.search, org).await;
        let load = async {
            // Read before the look-up: a revocation during it leaves the entry stale.
            let generation = self.generation.load(Ordering::Acquire);
            self.store_loads.fetch_add(1, Ordering::Relaxed);
            let record = self.store.get_or_create_search_key(org, &*self.kek).await?;
            self.unwrap_record(record.into(), generation)
                .await
                .map(Arc::new)
        };
        self.search
            .try_get_with_by_ref(org, load)
            .await
            .map_err(Arc::unwrap_or_clone)
    }

    /// The DEK with this id, for decrypting. Rotated-out (`decrypt_only`) keys are returned;
    /// destroyed and unknown ones are errors.
    pub async fn key_by_id(&self, dek: DekId) -> Result<Arc<CachedDek>, KeyError> {
        if let Some(cached) = self.fresh(&self.by_id, &dek).await {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(cached);
        }
        if self.destroyed.contains_key(&dek) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Err(KeyError::DestroyedDek(dek));
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let result = self.load_by_id(dek, None).await;
        if let Err(KeyError::DestroyedDek(_)) = &result {
            self.destroyed.insert(dek, ()).await;
        }
        result
    }

    /// Whether a DEK this manager handed out earlier may still be used as if it had just been
    /// looked up again with [`KeyManager::key_by_id`]: not past its TTL and not revoked since
    /// (rotate, shred, key change notification). Counts as a cache hit when it may.
    ///
    /// Lets a caller that decrypts many values under one DEK (a result set) skip the cache
    /// look-up per value without missing a revocation.
    pub fn still_fresh(&self, dek: &CachedDek) -> bool {
        let fresh = !self.is_stale(dek);
        if fresh {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        fresh
    }

    /// Like [`KeyManager::key_by_id`], but fails with [`KeyError::WrongOrg`] unless the DEK
    /// belongs to `org` (the session tenant).
    pub async fn key_for_org(&self, dek: DekId, org: &OrgId) -> Result<Arc<CachedDek>, KeyError> {
        let cached = self.key_by_id(dek).await?;
        if cached.org() != org {
            return Err(KeyError::WrongOrg {
                dek,
                expected: org.clone(),
                found: cached.org().clone(),
            });
        }
        Ok(cached)
    }

    /// Forget everything cached for `org` (its active DEK, all its DEKs by id and its search
    /// key).
    ///
    /// A load already in flight may still insert what it read before the invalidation.
    pub async fn invalidate_org(&self, org: &OrgId) {
        self.active.invalidate(org).await;
        self.search.invalidate(org).await;
        let ids: Vec<DekId> = self
            .by_id
            .iter()
            .filter(|(_, dek)| dek.org() == org)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.by_id.invalidate(&id).await;
        }
    }

    /// Forget every cached key.
    pub fn invalidate_all(&self) {
        let g = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.revoked_all.store(g, Ordering::Release);
        self.active.invalidate_all();
        self.search.invalidate_all();
        self.by_id.invalidate_all();
    }

    /// Forget `org`'s keys because they changed in the key store (rotated, shredded, a
    /// retired key destroyed). Unlike [`KeyManager::invalidate_org`], a load that is in flight
    /// now cannot leave what it read before the change behind: entries whose load started
    /// before this call are stale.
    pub async fn revoke_org(&self, org: &OrgId) {
        let g = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        {
            let mut revoked = self.revoked.lock().unwrap_or_else(PoisonError::into_inner);
            let ttl = self.ttl;
            revoked.retain(|_, (_, at)| at.elapsed() < ttl);
            revoked.insert(org.clone(), (g, Instant::now()));
        }
        self.invalidate_org(org).await;
    }

    /// Record `n` encryptions under `dek`, to be persisted by the next flush.
    pub fn note_encryptions(&self, dek: DekId, n: u64) {
        if n == 0 {
            return;
        }
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let count = pending.entry(dek).or_insert(0);
        *count = count.saturating_add(n);
    }

    /// Encryptions noted for `dek` and not yet flushed.
    pub fn pending_encryptions(&self, dek: DekId) -> u64 {
        let pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        pending.get(&dek).copied().unwrap_or(0)
    }

    /// Write the noted encryption counts to the key store in one statement. Returns how many
    /// DEKs were updated. On failure the counts are kept for the next flush.
    pub async fn flush_counters(&self) -> Result<usize, KeyError> {
        let batch: Vec<(DekId, u64)> = {
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            pending.drain().collect()
        };
        if batch.is_empty() {
            return Ok(0);
        }
        if let Err(e) = self.store.add_encryptions(&batch).await {
            for (dek, n) in batch {
                self.note_encryptions(dek, n);
            }
            return Err(e);
        }
        Ok(batch.len())
    }

    /// Rotate the active DEKs that reached the rotation policy's limits (any organisation:
    /// every proxy checks, the conditional rotation in the key store makes it happen once).
    /// Returns how many this call rotated.
    pub async fn rotate_due(&self) -> Result<usize, KeyError> {
        let due = self
            .store
            .due_for_rotation(self.rotation.max_encryptions, self.rotation.max_age)
            .await?;
        let mut rotated = 0;
        for (org, dek, why) in due {
            match self
                .store
                .rotate(&org, &*self.kek, Some(dek), Some(&why))
                .await
            {
                Ok(Some(r)) => {
                    rotated += 1;
                    self.auto_rotations.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        tenant = %org,
                        retired = %dek,
                        dek = %r.active.dek_id,
                        reason = %why,
                        "data key rotated automatically"
                    );
                    self.revoke_org(&org).await;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, tenant = %org, "automatic key rotation failed")
                }
            }
        }
        Ok(rotated)
    }

    /// Spawn a task that flushes the counters every `every` (then rotates the DEKs the
    /// rotation policy says are due), and once more when `shutdown` completes. Failures are
    /// logged and retried on the next tick.
    pub fn spawn_counter_flusher(
        self: &Arc<Self>,
        every: Duration,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> JoinHandle<()> {
        let manager = Arc::clone(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tokio::pin!(shutdown);
            // Counts only change when something was flushed; ages are checked once a minute.
            let mut age_checked: Option<Instant> = None;
            loop {
                tokio::select! {
                    _ = ticks.tick() => {}
                    () = &mut shutdown => break,
                }
                let flushed = match manager.flush_counters().await {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not persist DEK encryption counters");
                        continue;
                    }
                };
                let age_due = manager.rotation.max_age.is_some()
                    && age_checked.is_none_or(|t| t.elapsed() >= AGE_CHECK_EVERY);
                if flushed == 0 && !age_due {
                    continue;
                }
                if age_due {
                    age_checked = Some(Instant::now());
                }
                if let Err(e) = manager.rotate_due().await {
                    tracing::warn!(error = %e, "could not check DEKs due for rotation");
                }
            }
            if let Err(e) = manager.flush_counters().await {
                tracing::warn!(error = %e, "could not persist DEK encryption counters at shutdown");
            }
        })
    }

    /// Counters since the manager was built.
    pub fn stats(&self) -> KeyManagerStats {
        KeyManagerStats {
            cache_hits: self.hits.load(Ordering::Relaxed),
            cache_misses: self.misses.load(Ordering::Relaxed),
            unwrap_calls: self.unwraps.load(Ordering::Relaxed),
            store_loads: self.store_loads.load(Ordering::Relaxed),
            auto_rotations: self.auto_rotations.load(Ordering::Relaxed),
        }
    }

    /// Single-flight load of one DEK by id. `known` skips the key-store look-up when the
    /// caller already holds the row.
    async fn load_by_id(
        &self,
        dek: DekId,
        known: Option<DekRecord>,
    ) -> Result<Arc<CachedDek>, KeyError> {
        self.evict_if_stale(&self.by_id, &dek).await;
        let load = async {
            let generation = self.generation.load(Ordering::Acquire);
            let record = match known {
                Some(record) => record,
                None => {
                    self.store_loads.fetch_add(1, Ordering::Relaxed);
                    self.store
                        .lookup(dek)
                        .await?
                        .ok_or(KeyError::UnknownDek(dek))?
                }
            };
            self.unwrap_record(record.into(), generation)
                .await
                .map(Arc::new)
        };
        self.by_id
            .try_get_with(dek, load)
            .await
            .map_err(Arc::unwrap_or_clone)
    }

    async fn unwrap_record(
        &self,
        record: StoredKey,
        generation: u64,
    ) -> Result<CachedDek, KeyError> {
        let dek = record.id;
        let Some(wrapped) = record
            .wrapped
            .filter(|_| record.state != DekState::Destroyed)
        else {
            return Err(KeyError::DestroyedDek(dek));
        };
        let ours = self.kek.kek_id();
        let Some(kek) = std::iter::once(&self.kek)
            .chain(&self.also)
            .find(|k| k.kek_id() == record.kek)
        else {
            return Err(KeyError::KekMismatch {
                dek,
                stored: record.kek,
                ours,
            });
        };
        let ctx = KeyContext {
            org: record.org,
            dek,
        };
        self.unwraps.fetch_add(1, Ordering::Relaxed);
        let key = kek
            .unwrap(&ctx, &wrapped)
            .await
            .map_err(|source| match source {
                KekError::Rejected | KekError::Malformed { .. } => {
                    KeyError::UnwrapRejected { dek, source }
                }
                source => KeyError::kek(record.kek.clone(), source),
            })?;
        tracing::debug!(dek = %dek, tenant = %ctx.org, state = %record.state, kind = record.kind, "unwrapped key");
        Ok(CachedDek {
            dek_id: dek,
            org: ctx.org,
            version: record.version,
            state: record.state,
            key,
            loaded_at: Instant::now(),
            generation,
        })
    }

    /// The cached entry if present and younger than the TTL.
    async fn fresh<K>(&self, cache: &Cache<K, Arc<CachedDek>>, key: &K) -> Option<Arc<CachedDek>>
    where
        K: Hash + Eq + Send + Sync + 'static,
    {
        cache.get(key).await.filter(|dek| !self.is_stale(dek))
    }

    /// Remove the entry for `key` if it is older than the TTL, so the next single-flight load
    /// replaces it. Serialized per key, so a fresh entry inserted meanwhile is kept.
    async fn evict_if_stale<K>(&self, cache: &Cache<K, Arc<CachedDek>>, key: &K)
    where
        K: Hash + Eq + Send + Sync + Clone + 'static,
    {
        if cache.get(key).await.is_none() {
            return;
        }
        cache
            .entry_by_ref(key)
            .and_compute_with(|entry| {
                let op = match entry {
                    Some(entry) if self.is_stale(entry.value()) => Op::Remove,
                    _ => Op::Nop,
                };
                std::future::ready(op)
            })
            .await;
    }

    /// Whether a DEK handed out earlier must be looked up again (past its TTL, or revoked
    /// since); [`KeyManager::still_fresh`] without counting a cache hit.
    pub fn is_stale(&self, dek: &CachedDek) -> bool {
        if dek.loaded_at.elapsed() >= self.ttl {
            return true;
        }
        if dek.generation == self.generation.load(Ordering::Acquire) {
            return false;
        }
        if dek.generation < self.revoked_all.load(Ordering::Acquire) {
            return true;
        }
        let revoked = self.revoked.lock().unwrap_or_else(PoisonError::into_inner);
        revoked
            .get(&dek.org)
            .is_some_and(|&(g, _)| dek.generation < g)
    }
}

/// What unwrapping needs of a stored key: a DEK row or a search key row.
struct StoredKey {
    /// `dek` or `search`, for the log.
    kind: &'static str,
    id: DekId,
    org: OrgId,
    version: i32,
    state: DekState,
    kek: String,
    wrapped: Option<Vec<u8>>,
}

impl From<DekRecord> for StoredKey {
    fn from(r: DekRecord) -> Self {
        Self {
            kind: "dek",
            id: r.dek_id,
            org: r.org_id,
            version: r.version,
            state: r.state,
            kek: r.kek,
            wrapped: r.wrapped,
        }
    }
}

impl From<SearchKeyRecord> for StoredKey {
    fn from(r: SearchKeyRecord) -> Self {
        Self {
            kind: "search",
            id: r.key_id,
            org: r.org_id,
            version: r.version,
            state: match r.state {
                SearchKeyState::Active => DekState::Active,
                SearchKeyState::Retired => DekState::DecryptOnly,
                SearchKeyState::Destroyed => DekState::Destroyed,
            },
            kek: r.kek,
            wrapped: r.wrapped,
        }
    }
}

fn cache<K>(config: KeyManagerConfig) -> Cache<K, Arc<CachedDek>>
where
    K: Hash + Eq + Send + Sync + 'static,
{
    Cache::builder()
        .max_capacity(config.capacity)
        .time_to_live(config.ttl)
        .build()
}

impl KeyManager {
    /// Register the cache's metrics (called at each scrape).
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        let counter = |v: u64| {
            let c = prometheus_client::metrics::counter::Counter::<u64>::default();
            c.inc_by(v);
            c
        };
        let stats = self.stats();
        registry.register(
            "dek_cache_hits",
            "Data-key look-ups served from memory",
            counter(stats.cache_hits),
        );
        registry.register(
            "dek_cache_misses",
            "Data-key look-ups that had to load",
            counter(stats.cache_misses),
        );
        registry.register(
            "dek_auto_rotations",
            "Data keys this proxy rotated by the rotation policy (count or age)",
            counter(stats.auto_rotations),
        );
    }
}

#[cfg(test)]
impl KeyManager {
    /// A fresh active DEK of `org`, as if just loaded: for unit tests of the layers above,
    /// which hand it to a cipher themselves instead of going to a key store.
    pub(crate) fn dek_for_tests(&self, org: &OrgId) -> Arc<CachedDek> {
        Arc::new(CachedDek {
            dek_id: DekId::new_random(),
            org: org.clone(),
            version: 1,
            state: DekState::Active,
            key: DataKey::generate(),
            loaded_at: Instant::now(),
            generation: self.generation.load(Ordering::Acquire),
        })
    }
}

impl std::fmt::Debug for KeyManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyManager")
            .field("kek", &self.kek.kek_id())
            .field("ttl", &self.ttl)
            .field("cached", &self.by_id.entry_count())
            .field("search_keys", &self.search.entry_count())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::keys::LocalKek;

    fn manager(ttl: Duration, dir: &tempfile::TempDir) -> KeyManager {
        // Never connects: these tests stay in memory.
        let config = "host=127.0.0.1".parse().unwrap();
        let store = Arc::new(KeyStore::new(config, "pgenvelope").unwrap());
        let kek = Arc::new(LocalKek::open_or_create(dir.path().join("kek")).unwrap());
        KeyManager::new(
            store,
            kek,
            KeyManagerConfig {
                ttl,
                capacity: 10,
                rotation: RotationPolicy::default(),
            },
        )
    }

    fn cached() -> CachedDek {
        CachedDek {
            dek_id: DekId::new_random(),
            org: OrgId::new("acme").unwrap(),
            version: 1,
            state: DekState::Active,
            key: DataKey::from_bytes([0x5a; 32]),
            loaded_at: Instant::now(),
            generation: 0,
        }
    }

    #[test]
    fn default_config() {
        let config = KeyManagerConfig::default();
        assert_eq!(config.ttl, Duration::from_secs(300));
        assert_eq!(config.capacity, 10_000);
    }

    #[tokio::test(start_paused = true)]
    async fn entries_go_stale_at_the_ttl_on_tokios_clock() {
        let dir = tempfile::tempdir().unwrap();
        let manager = manager(Duration::from_secs(10), &dir);
        let dek = cached();
        assert!(!manager.is_stale(&dek));
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(!manager.is_stale(&dek));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(manager.is_stale(&dek));
    }

    #[tokio::test(start_paused = true)]
    async fn stale_entries_are_evicted_fresh_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let manager = manager(Duration::from_secs(10), &dir);
        let old = Arc::new(cached());
        let id = old.dek_id();
        manager.by_id.insert(id, old).await;
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(manager.fresh(&manager.by_id, &id).await.is_none());
        let young = Arc::new(cached());
        let young_id = young.dek_id();
        manager.by_id.insert(young_id, young).await;
        manager.evict_if_stale(&manager.by_id, &id).await;
        manager.evict_if_stale(&manager.by_id, &young_id).await;
        assert!(manager.by_id.get(&id).await.is_none());
        assert!(manager.by_id.get(&young_id).await.is_some());
    }

    #[test]
    fn encryption_counts_accumulate_and_saturate() {
        let dir = tempfile::tempdir().unwrap();
        let manager = manager(Duration::from_secs(10), &dir);
        let dek = DekId::new_random();
        manager.note_encryptions(dek, 2);
        manager.note_encryptions(dek, 3);
        assert_eq!(manager.pending_encryptions(dek), 5);
        manager.note_encryptions(dek, u64::MAX);
        assert_eq!(manager.pending_encryptions(dek), u64::MAX);
        assert_eq!(manager.pending_encryptions(DekId::new_random()), 0);
    }

    #[tokio::test]
    async fn search_keys_are_revoked_with_their_organisation() {
        let dir = tempfile::tempdir().unwrap();
        let manager = manager(Duration::from_secs(300), &dir);
        let acme = OrgId::new("acme").unwrap();
        let globex = OrgId::new("globex").unwrap();
        let mut keys = Vec::new();
        for org in [&acme, &globex] {
            let key = Arc::new(CachedDek {
                org: org.clone(),
                ..cached()
            });
            manager.search.insert(org.clone(), Arc::clone(&key)).await;
            keys.push(key);
        }
        assert!(keys.iter().all(|k| manager.still_fresh(k)));
        manager.revoke_org(&acme).await;
        assert!(
            !manager.still_fresh(&keys[0]),
            "a revoked search key stays fresh"
        );
        assert!(manager.fresh(&manager.search, &acme).await.is_none());
        assert!(manager.still_fresh(&keys[1]));
        assert!(manager.fresh(&manager.search, &globex).await.is_some());
        manager.invalidate_all();
        assert!(manager.search.get(&globex).await.is_none());
        assert!(!manager.still_fresh(&keys[1]));
    }

    #[test]
    fn search_key_rows_unwrap_under_their_own_id() {
        let record = SearchKeyRecord {
            key_id: DekId::from_bytes([0x33; 16]),
            org_id: OrgId::new("acme").unwrap(),
            version: 4,
            state: SearchKeyState::Active,
            kek: "local:00".into(),
            wrapped: Some(vec![0; 61]),
            created_at: std::time::SystemTime::UNIX_EPOCH,
            retired_at: None,
            destroyed_at: None,
        };
        let stored = StoredKey::from(record.clone());
        assert_eq!(
            (stored.kind, stored.id, stored.version, stored.state),
            ("search", record.key_id, 4, DekState::Active)
        );
        for (state, expected) in [
            (SearchKeyState::Retired, DekState::DecryptOnly),
            (SearchKeyState::Destroyed, DekState::Destroyed),
        ] {
            let stored = StoredKey::from(SearchKeyRecord {
                state,
                ..record.clone()
            });
            assert_eq!(stored.state, expected);
        }
    }

    #[test]
    fn debug_never_shows_key_bytes() {
        let dek = CachedDek {
            dek_id: DekId::from_bytes([0x11; 16]),
            ..cached()
        };
        let debug = format!("{dek:?}");
        assert!(debug.contains("REDACTED"), "{debug}");
        assert!(
            !debug.contains("90, 90") && !debug.contains("5a5a"),
            "{debug}"
        );
    }
}
