//! The plan cache: statement analyses by SQL text, so a text the application sends again is not
//! parsed again.
//!
//! Applications that inline values (`… WHERE id = 42`) send a new text for nearly every
//! statement. Caching those would fill the cache with entries that are never used again and make
//! the proxy's memory grow until the cap. So a text is admitted only on its **second** sighting
//! within a recent window: a direct-mapped table of 4,096 text hashes (32 KiB, lock-free)
//! remembers what was seen. A text used once costs one hash and no allocation; a text used twice
//! is cached from then on. A hash collision only admits a text early.
//!
//! Entries are weighed by an estimate of the memory they hold (text, analysis, the cache's own
//! bookkeeping), and the total is capped at [`PLAN_CACHE_BYTES`].
//!
//! Texts carrying literals bound for encrypted columns are never cached (they hold plaintext),
//! nor are texts above [`PLAN_CACHE_MAX_TEXT`] (bulk literals).

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::sql::Analysis;

/// Cap on the total weight of cached analyses, in (estimated) bytes.
pub(crate) const PLAN_CACHE_BYTES: u64 = 8 * 1024 * 1024;
/// Statements longer than this are analysed each time (typically bulk literals).
pub(crate) const PLAN_CACHE_MAX_TEXT: usize = 256 * 1024;
/// Slots of the admission table (a power of two).
const SEEN_SLOTS: usize = 4096;
/// Estimated fixed cost of one entry: the `Analysis` struct, its `Arc`s, and moka's entry,
/// deque nodes and hash table slot.
const ENTRY_OVERHEAD: usize = 640;
/// Estimated cost of one element of the analysis' vectors (sites hold column names).
const PART_BYTES: usize = 128;

/// Analyses by SQL text, admitted on second sighting, bounded by weight.
pub(crate) struct PlanCache {
    plans: moka::sync::Cache<Arc<str>, Arc<Analysis>>,
    seen: Box<[AtomicU64]>,
    hasher: std::collections::hash_map::RandomState,
}

impl std::fmt::Debug for PlanCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PlanCache({} entries)", self.plans.entry_count())
    }
}

impl PlanCache {
    pub(crate) fn new() -> Self {
        Self::with_capacity(PLAN_CACHE_BYTES)
    }

    fn with_capacity(bytes: u64) -> Self {
        Self {
            plans: moka::sync::Cache::builder()
                .weigher(|sql: &Arc<str>, a: &Arc<Analysis>| {
                    u32::try_from(weight(sql, a)).unwrap_or(u32::MAX)
                })
                .max_capacity(bytes)
                .build(),
            seen: (0..SEEN_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// The cached analysis of `sql`, if any.
    pub(crate) fn get(&self, sql: &str) -> Option<Arc<Analysis>> {
        self.plans.get(sql)
    }

    /// Offer a fresh analysis of `sql`; it is kept only if this text was seen recently
    /// (see the module docs) and may be kept at all.
    pub(crate) fn offer(&self, sql: &str, analysis: &Arc<Analysis>) {
        if sql.len() > PLAN_CACHE_MAX_TEXT || !analysis.literals.is_empty() {
            return;
        }
        // Never 0, so an empty slot cannot match.
        let hash = self.hasher.hash_one(sql) | 1;
        let slot = &self.seen[(hash as usize) & (SEEN_SLOTS - 1)];
        if slot.swap(hash, Ordering::Relaxed) == hash {
            self.plans.insert(Arc::from(sql), Arc::clone(analysis));
        }
    }

    /// Drop every entry (rules changed).
    pub(crate) fn clear(&self) {
        self.plans.invalidate_all();
        for slot in self.seen.iter() {
            slot.store(0, Ordering::Relaxed);
        }
    }

    /// Total weight of the cached analyses, in estimated bytes.
    pub(crate) fn weighted_size(&self) -> u64 {
        self.plans.run_pending_tasks();
        self.plans.weighted_size()
    }

    #[cfg(test)]
    fn entry_count(&self) -> u64 {
        self.plans.run_pending_tasks();
        self.plans.entry_count()
    }
}

/// Estimated bytes held by one entry.
fn weight(sql: &str, a: &Analysis) -> usize {
    let parts = a.params.len()
        + a.literals.len()
        + a.tenant_changes.len()
        + a.tx_controls.len()
        + a.kinds.len()
        + usize::from(a.copy.is_some())
        + usize::from(a.rejection.is_some());
    sql.len() + ENTRY_OVERHEAD + parts * PART_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::Protected;

    fn analysis(sql: &str) -> Arc<Analysis> {
        Arc::new(crate::sql::analyze(sql, &Protected::default()))
    }

    #[test]
    fn a_text_is_cached_on_its_second_sighting() {
        let cache = PlanCache::new();
        let sql = "SELECT 1";
        cache.offer(sql, &analysis(sql));
        assert!(cache.get(sql).is_none(), "one sighting is not enough");
        cache.offer(sql, &analysis(sql));
        assert!(cache.get(sql).is_some());
        cache.clear();
        assert!(cache.get(sql).is_none());
        cache.offer(sql, &analysis(sql));
        assert!(cache.get(sql).is_none(), "clear forgets sightings too");
    }

    #[test]
    fn unique_texts_are_not_cached() {
        let cache = PlanCache::new();
        for i in 0..20_000 {
            let sql = format!("SELECT * FROM t WHERE id = {i}");
            cache.offer(&sql, &analysis(&sql));
        }
        assert_eq!(cache.entry_count(), 0);
    }

    #[test]
    fn weight_is_capped() {
        let cache = PlanCache::with_capacity(64 * 1024);
        for i in 0..2_000 {
            let sql = format!("SELECT * FROM t WHERE id = {i}");
            let a = analysis(&sql);
            cache.offer(&sql, &a);
            cache.offer(&sql, &a);
        }
        assert!(cache.weighted_size() <= 64 * 1024);
        assert!(cache.entry_count() > 10);
    }
}
