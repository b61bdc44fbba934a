//! Key store and DEK cache against a real PostgreSQL.
//!
//! Needs PostgreSQL at 127.0.0.1:5432 with trust auth for user `postgres` and a database
//! `test` (override with `PGENVELOPE_TEST_DB`). Every test works in its own schema with a
//! random suffix, dropped when the test ends, even on failure.

#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pgenvelope::crypto::{DataKey, DekId, OrgId};
use pgenvelope::keys::{
    spawn_key_listener, CachedDek, DekState, KekError, KekProvider, KeyContext, KeyError,
    KeyManager, KeyManagerConfig, KeyStore, KmsUri, ListenerState, LocalKek, SearchKeyState,
    SEARCH_KEY_CREATED, SEARCH_KEY_DESTROYED, SEARCH_KEY_REWRAPPED, SEARCH_KEY_ROTATED,
};
use tokio_postgres::{Client, Config, NoTls};

fn db_url() -> String {
    std::env::var("PGENVELOPE_TEST_DB")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A schema of our own, dropped on drop.
struct TestDb {
    schema: String,
    _kek_dir: tempfile::TempDir,
    kek: Arc<LocalKek>,
}

impl TestDb {
    fn new() -> Self {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let kek_dir = tempfile::tempdir().unwrap();
        let kek = Arc::new(LocalKek::open_or_create(kek_dir.path().join("kek")).unwrap());
        Self {
            schema: format!("pgenvelope_test_{}", &suffix[..12]),
            _kek_dir: kek_dir,
            kek,
        }
    }

    fn config(&self) -> Config {
        db_url().parse().unwrap()
    }

    /// A store with its own connection.
    fn store(&self) -> Arc<KeyStore> {
        Arc::new(KeyStore::new(self.config(), &self.schema).unwrap())
    }

    async fn ready_store(&self) -> Arc<KeyStore> {
        let store = self.store();
        store.ensure_schema().await.unwrap();
        store
    }

    fn manager(
        &self,
        store: Arc<KeyStore>,
        kek: Arc<dyn KekProvider>,
        ttl: Duration,
    ) -> KeyManager {
        let config = KeyManagerConfig {
            ttl,
            ..KeyManagerConfig::default()
        };
        KeyManager::new(store, kek, config)
    }

    async fn admin(&self) -> Client {
        let (client, connection) = self.config().connect(NoTls).await.unwrap();
        tokio::spawn(connection);
        client
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let sql = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.schema);
        let config = self.config();
        // Drop may run inside a runtime (or during a panic): use a runtime of our own on a
        // separate thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok((client, connection)) = config.connect(NoTls).await {
                    tokio::spawn(connection);
                    let _ = client.batch_execute(&sql).await;
                }
            });
        })
        .join();
    }
}

/// Wraps a provider and counts calls; `delay` widens race windows.
struct Counting {
    inner: Arc<dyn KekProvider>,
    wraps: AtomicUsize,
    unwraps: AtomicUsize,
    delay: Duration,
}

impl Counting {
    fn new(inner: Arc<dyn KekProvider>, delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            inner,
            wraps: AtomicUsize::new(0),
            unwraps: AtomicUsize::new(0),
            delay,
        })
    }

    fn unwraps(&self) -> usize {
        self.unwraps.load(Ordering::SeqCst)
    }

    fn calls(&self) -> usize {
        self.wraps.load(Ordering::SeqCst) + self.unwraps()
    }
}

#[async_trait]
impl KekProvider for Counting {
    fn kek_id(&self) -> String {
        self.inner.kek_id()
    }

    async fn wrap(&self, ctx: &KeyContext, key: &DataKey) -> Result<Vec<u8>, KekError> {
        self.wraps.fetch_add(1, Ordering::SeqCst);
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        self.inner.wrap(ctx, key).await
    }

    async fn unwrap(&self, ctx: &KeyContext, wrapped: &[u8]) -> Result<DataKey, KekError> {
        self.unwraps.fetch_add(1, Ordering::SeqCst);
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        self.inner.unwrap(ctx, wrapped).await
    }
}

fn org(name: &str) -> OrgId {
    OrgId::new(name).unwrap()
}

const TTL: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_schema_is_idempotent_and_concurrent() {
    let db = TestDb::new();
    let stores: Vec<_> = (0..8).map(|_| db.store()).collect();
    let tasks: Vec<_> = stores
        .iter()
        .cloned()
        .map(|s| tokio::spawn(async move { s.ensure_schema().await }))
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    for store in &stores {
        store.ensure_schema().await.unwrap();
    }

    let admin = db.admin().await;
    let tables: Vec<String> = admin
        .query(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1 \
             ORDER BY 1",
            &[&db.schema],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(tables, ["data_keys", "key_events", "search_keys"]);
    let indexes: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_indexes WHERE schemaname = $1 \
             AND indexname IN ('data_keys_one_active_per_org', 'search_keys_one_active_per_org')",
            &[&db.schema],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(indexes, 2);
}

/// `holds_keys` creates nothing: false without tables, false with empty ones, true once a DEK
/// exists. `database` names the store's database.
#[tokio::test]
async fn holds_keys_only_looks() {
    let db = TestDb::new();
    let store = db.store();
    assert_eq!(
        store.database(),
        db.config().get_dbname().unwrap_or("postgres")
    );
    assert!(!store.holds_keys().await.unwrap());
    let schemas: i64 = db
        .admin()
        .await
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname = $1",
            &[&db.schema],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(schemas, 0, "holds_keys created the schema");
    store.ensure_schema().await.unwrap();
    assert!(!store.holds_keys().await.unwrap());
    store
        .get_or_create_active(&org("acme"), db.kek.as_ref())
        .await
        .unwrap();
    assert!(store.holds_keys().await.unwrap());
}

#[tokio::test]
async fn schema_enforces_invariants_and_append_only_events() {
    let db = TestDb::new();
    let store = db.ready_store().await;
    let acme = org("acme");
    let record = store.get_or_create_active(&acme, &*db.kek).await.unwrap();
    let admin = db.admin().await;
    let s = &db.schema;

    let second_active = admin
        .execute(
            &format!(
                "INSERT INTO \"{s}\".data_keys (dek_id, org_id, version, state, kek, wrapped) \
                 VALUES (gen_random_uuid(), 'acme', 2, 'active', 'k', '\\x00')"
            ),
            &[],
        )
        .await;
    assert!(second_active.is_err(), "two active DEKs for one org");
    let bad_state = admin
        .execute(
            &format!("UPDATE \"{s}\".data_keys SET state = 'retired' WHERE dek_id = $1"),
            &[&record.dek_id.0],
        )
        .await;
    assert!(bad_state.is_err());
    let destroyed_with_key = admin
        .execute(
            &format!("UPDATE \"{s}\".data_keys SET state = 'destroyed' WHERE dek_id = $1"),
            &[&record.dek_id.0],
        )
        .await;
    assert!(
        destroyed_with_key.is_err(),
        "destroyed must drop the wrapped key"
    );

    for sql in [
        format!("UPDATE \"{s}\".key_events SET reason = 'x'"),
        format!("DELETE FROM \"{s}\".key_events"),
        format!("TRUNCATE \"{s}\".key_events"),
    ] {
        let err = admin.batch_execute(&sql).await.unwrap_err();
        assert!(
            format!("{:?}", err.as_db_error()).contains("append-only"),
            "{sql}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_creators_make_one_active_dek() {
    let db = TestDb::new();
    db.ready_store().await;
    // Ten stores, ten connections: the race happens in PostgreSQL, as between proxies.
    let stores: Vec<_> = (0..10).map(|_| db.store()).collect();
    let kek = Counting::new(db.kek.clone(), Duration::from_millis(5));
    let acme = org("acme");
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let store = Arc::clone(&stores[i % stores.len()]);
            let (kek, acme) = (Arc::clone(&kek), acme.clone());
            tokio::spawn(async move { store.get_or_create_active(&acme, &*kek).await })
        })
        .collect();
    let mut ids = Vec::new();
    for task in tasks {
        let record = task.await.unwrap().unwrap();
        assert_eq!(record.state, DekState::Active);
        assert_eq!(record.version, 1);
        assert_eq!(record.org_id, acme);
        ids.push(record.dek_id);
    }
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
    // The 5 ms wrap delay keeps every first-round caller from seeing the winner's row, so
    // several really did generate a key and try to insert it.
    let wraps = kek.wraps.load(Ordering::SeqCst);
    assert!(wraps > 1, "no race happened: {wraps} wraps");

    let admin = db.admin().await;
    let s = &db.schema;
    let rows = admin
        .query(
            &format!(
                "SELECT dek_id, state, version, kek FROM \"{s}\".data_keys WHERE org_id = 'acme'"
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, uuid::Uuid>(0), ids[0].0);
    assert_eq!(rows[0].get::<_, &str>(1), "active");
    assert_eq!(rows[0].get::<_, &str>(3), db.kek.kek_id());
    let events: i64 = admin
        .query_one(
            &format!(
                "SELECT count(*) FROM \"{s}\".key_events \
                 WHERE org_id = 'acme' AND event = 'create' AND dek_id = $1"
            ),
            &[&ids[0].0],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(events, 1, "exactly one create event");

    // The stored wrapped key unwraps in its own context.
    let record = stores[0].lookup(ids[0]).await.unwrap().unwrap();
    let ctx = KeyContext {
        org: acme,
        dek: ids[0],
    };
    db.kek
        .unwrap(&ctx, record.wrapped.as_deref().unwrap())
        .await
        .unwrap();
}

#[tokio::test]
async fn new_version_after_rotation_out_of_band() {
    let db = TestDb::new();
    let store = db.ready_store().await;
    let acme = org("acme");
    let v1 = store.get_or_create_active(&acme, &*db.kek).await.unwrap();
    let admin = db.admin().await;
    admin
        .execute(
            &format!(
                "UPDATE \"{}\".data_keys SET state = 'decrypt_only', retired_at = now() \
                 WHERE dek_id = $1",
                db.schema
            ),
            &[&v1.dek_id.0],
        )
        .await
        .unwrap();
    let v2 = store.get_or_create_active(&acme, &*db.kek).await.unwrap();
    assert_ne!(v1.dek_id, v2.dek_id);
    assert_eq!(v2.version, 2);
    let old = store.lookup(v1.dek_id).await.unwrap().unwrap();
    assert_eq!(old.state, DekState::DecryptOnly);
    assert!(old.retired_at.is_some());
    assert!(store.active(&org("nobody")).await.unwrap().is_none());
    assert!(store.lookup(DekId::new_random()).await.unwrap().is_none());
}

#[tokio::test]
async fn warm_cache_makes_no_store_or_kek_calls() {
    let db = TestDb::new();
    let store = db.ready_store().await;
    let kek = Counting::new(db.kek.clone(), Duration::ZERO);
    let manager = db.manager(store, kek.clone(), TTL);
    let acme = org("acme");

    let first = manager.active_key(&acme).await.unwrap();
    assert_eq!(first.state(), DekState::Active);
    assert_eq!(first.org(), &acme);
    let (calls, stats) = (kek.calls(), manager.stats());
    assert_eq!(kek.unwraps(), 1);

    for _ in 0..20 {
        let again = manager.active_key(&acme).await.unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        let by_id = manager.key_by_id(first.dek_id()).await.unwrap();
        assert!(Arc::ptr_eq(&first, &by_id));
    }
    assert_eq!(kek.calls(), calls, "no KEK call when warm");
    let after = manager.stats();
    assert_eq!(
        after.store_loads, stats.store_loads,
        "no key-store call when warm"
    );
    assert_eq!(after.unwrap_calls, 1);
    assert_eq!(after.cache_hits, stats.cache_hits + 40);
    assert_eq!(after.cache_misses, stats.cache_misses);
}

#[tokio::test]
async fn key_by_id_unwraps_once_then_serves_from_cache() {
    let db = TestDb::new();
    let store = db.ready_store().await;
    let acme = org("acme");
    let record = store.get_or_create_active(&acme, &*db.kek).await.unwrap();

    let kek = Counting::new(db.kek.clone(), Duration::ZERO);
    let manager = db.manager(store, kek.clone(), TTL);
    let key = manager.key_by_id(record.dek_id).await.unwrap();
    assert_eq!(kek.unwraps(), 1);
    for _ in 0..10 {
        let again = manager.key_by_id(record.dek_id).await.unwrap();
        assert_eq!(again.key().expose_secret(), key.key().expose_secret());
    }
    assert_eq!(kek.unwraps(), 1);
    let stats = manager.stats();
    assert_eq!((stats.cache_misses, stats.cache_hits), (1, 10));
    assert_eq!(stats.unwrap_calls, 1);

    // The active path reuses the DEK already unwrapped by id.
    manager.active_key(&acme).await.unwrap();
    assert_eq!(kek.unwraps(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_cold_loads_unwrap_once() {
    let db = TestDb::new();
    let store = db.ready_store().await;
    let acme = org("acme");
    let record = store.get_or_create_active(&acme, &*db.kek).await.unwrap();

    let kek = Counting::new(db.kek.clone(), Duration::from_millis(50));
    let manager = Arc::new(db.manager(store, kek.clone(), TTL));
    let dek = record.dek_id;
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let manager = Arc::clone(&manager);
            tokio::spawn(async move { manager.key_by_id(dek).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(kek.unwraps(), 1);
    assert_eq!(manager.stats().unwrap_calls, 1);
    assert_eq!(manager.stats().store_loads, 1);

    // Same for an organisation's first write across 50 callers of one proxy.
    let globex = org("globex");
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (manager, globex) = (Arc::clone(&manager), globex.clone());
            tokio::spawn(async move { manager.active_key(&globex).await.map(|k| k.dek_id()) })
        })
        .collect();
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(task.await.unwrap().unwrap());
    }
    assert!(ids.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(kek.unwraps(), 2);
    assert_eq!(kek.wraps.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn entries_expire_after_ttl_on_tokio_clock() {
    let db = TestDb::new();
    let store = db.ready_store().await;
    let kek = Counting::new(db.kek.clone(), Duration::ZERO);
    let ttl = Duration::from_secs(60);
    let manager = db.manager(store, kek.clone(), ttl);
    let acme = org("acme");
    let dek = manager.active_key(&acme).await.unwrap().dek_id();
    assert_eq!(kek.unwraps(), 1);
    let loads = manager.stats().store_loads;

    // Network I/O still works with a paused clock: nothing below waits on a timer.
    tokio::time::pause();
    tokio::time::advance(ttl - Duration::from_secs(1)).await;
    manager.key_by_id(dek).await.unwrap();
    manager.active_key(&acme).await.unwrap();
    assert_eq!(kek.unwraps(), 1, "still fresh");
    assert_eq!(manager.stats().store_loads, loads);

    tokio::time::advance(Duration::from_secs(2)).await;
    let reloaded = manager.key_by_id(dek).await.unwrap();
    assert_eq!(kek.unwraps(), 2, "expired entry is reloaded");
    assert_eq!(manager.stats().store_loads, loads + 1);
    // The active mapping expired too; it re-reads the store but reuses the fresh DEK.
    let active = manager.active_key(&acme).await.unwrap();
    assert!(Arc::ptr_eq(&reloaded, &active));
    assert_eq!(kek.unwraps(), 2);
    assert_eq!(manager.stats().store_loads, loads + 2);
}

#[tokio::test]
async fn wrapped_dek_moved_to_another_org_is_rejected() {
    let db = TestDb::new();
    let store = db.ready_store().await;
    let acme = org("acme");
    let record = store.get_or_create_active(&acme, &*db.kek).await.unwrap();

    // Directly: the wrapped bytes do not open under another organisation's context.
    let moved = KeyContext {
        org: org("globex"),
        dek: record.dek_id,
    };
    let wrapped = record.wrapped.clone().unwrap();
    assert!(matches!(
        db.kek.unwrap(&moved, &wrapped).await,
        Err(KekError::Rejected)
    ));

    // Through the store: someone rewrites the row's organisation.
    let admin = db.admin().await;
    admin
        .execute(
            &format!(
                "UPDATE \"{}\".data_keys SET org_id = 'globex' WHERE dek_id = $1",
                db.schema
            ),
            &[&record.dek_id.0],
        )
        .await
        .unwrap();
    let manager = db.manager(store, db.kek.clone(), TTL);
    let err = manager.key_by_id(record.dek_id).await.unwrap_err();
    assert!(
        matches!(err, KeyError::UnwrapRejected { dek, .. } if dek == record.dek_id),
        "{err}"
    );
}

#[tokio::test]
async fn wrong_org_unknown_destroyed_and_foreign_kek() {
    let db = TestDb::new();
    let store = db.ready_store().await;
    let acme = org("acme");
    let manager = db.manager(store.clone(), db.kek.clone(), TTL);
    let dek = manager.active_key(&acme).await.unwrap().dek_id();

    manager.key_for_org(dek, &acme).await.unwrap();
    let err = manager.key_for_org(dek, &org("globex")).await.unwrap_err();
    assert!(matches!(err, KeyError::WrongOrg { .. }), "{err}");

    let unknown = DekId::new_random();
    let err = manager.key_by_id(unknown).await.unwrap_err();
    assert!(
        matches!(err, KeyError::UnknownDek(d) if d == unknown),
        "{err}"
    );

    let admin = db.admin().await;
    admin
        .execute(
            &format!(
                "UPDATE \"{}\".data_keys SET state = 'destroyed', wrapped = NULL, \
                 destroyed_at = now() WHERE dek_id = $1",
                db.schema
            ),
            &[&dek.0],
        )
        .await
        .unwrap();
    // Still cached until invalidated (NOTIFY will drive this).
    manager.key_by_id(dek).await.unwrap();
    manager.invalidate_org(&acme).await;
    let err = manager.key_by_id(dek).await.unwrap_err();
    assert!(
        matches!(err, KeyError::DestroyedDek(d) if d == dek),
        "{err}"
    );

    // A proxy holding another KEK says so instead of failing authentication.
    let other_dir = tempfile::tempdir().unwrap();
    let other = Arc::new(LocalKek::open_or_create(other_dir.path().join("kek")).unwrap());
    let foreign = db.manager(store, other, TTL);
    let beta = db.manager(db.store(), db.kek.clone(), TTL);
    let beta_dek = beta.active_key(&org("beta")).await.unwrap().dek_id();
    let err = foreign.key_by_id(beta_dek).await.unwrap_err();
    assert!(matches!(err, KeyError::KekMismatch { .. }), "{err}");
}

#[tokio::test]
async fn invalidation_forces_reload() {
    let db = TestDb::new();
    let store = db.ready_store().await;
    let kek = Counting::new(db.kek.clone(), Duration::ZERO);
    let manager = db.manager(store, kek.clone(), TTL);
    let (acme, globex) = (org("acme"), org("globex"));
    manager.active_key(&acme).await.unwrap();
    manager.active_key(&globex).await.unwrap();
    assert_eq!(kek.unwraps(), 2);

    manager.invalidate_org(&acme).await;
    manager.active_key(&globex).await.unwrap();
    assert_eq!(kek.unwraps(), 2, "other organisations stay cached");
    manager.active_key(&acme).await.unwrap();
    assert_eq!(kek.unwraps(), 3);

    manager.invalidate_all();
    manager.active_key(&acme).await.unwrap();
    manager.active_key(&globex).await.unwrap();
    assert_eq!(kek.unwraps(), 5);
}

#[tokio::test]
async fn encryption_counters_are_persisted_in_batches() {
    let db = TestDb::new();
    let store = db.ready_store().await;
    let manager = Arc::new(db.manager(store.clone(), db.kek.clone(), TTL));
    let a = manager.active_key(&org("acme")).await.unwrap().dek_id();
    let g = manager.active_key(&org("globex")).await.unwrap().dek_id();

    manager.note_encryptions(a, 5);
    manager.note_encryptions(a, 7);
    manager.note_encryptions(g, 1);
    manager.note_encryptions(g, 0);
    assert_eq!(manager.pending_encryptions(a), 12);
    assert_eq!(manager.flush_counters().await.unwrap(), 2);
    assert_eq!(manager.pending_encryptions(a), 0);
    assert_eq!(manager.flush_counters().await.unwrap(), 0);
    assert_eq!(store.lookup(a).await.unwrap().unwrap().encryptions, 12);
    assert_eq!(store.lookup(g).await.unwrap().unwrap().encryptions, 1);

    store.add_encryptions(&[(a, 1), (a, 2)]).await.unwrap();
    assert_eq!(store.lookup(a).await.unwrap().unwrap().encryptions, 15);

    // The background flusher writes on shutdown.
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let flusher = manager.spawn_counter_flusher(Duration::from_secs(3600), async move {
        let _ = rx.await;
    });
    manager.note_encryptions(a, 100);
    tx.send(()).unwrap();
    flusher.await.unwrap();
    assert_eq!(store.lookup(a).await.unwrap().unwrap().encryptions, 115);
}

#[tokio::test]
async fn counters_survive_a_failed_flush() {
    let db = TestDb::new();
    // The schema does not exist yet, so the flush fails.
    let store = db.store();
    let manager = db.manager(store.clone(), db.kek.clone(), TTL);
    let dek = DekId::new_random();
    manager.note_encryptions(dek, 3);
    let err = manager.flush_counters().await.unwrap_err();
    assert!(matches!(err, KeyError::KeyStoreUnavailable { .. }), "{err}");
    assert_eq!(manager.pending_encryptions(dek), 3);
}

#[tokio::test]
async fn reconnects_after_the_connection_is_lost() {
    let db = TestDb::new();
    let mut config = db.config();
    let app = format!("pgenvelope-test-{}", uuid::Uuid::new_v4().simple());
    config.application_name(&app);
    let store = KeyStore::new(config, &db.schema).unwrap();
    store.ensure_schema().await.unwrap();
    let acme = org("acme");
    let record = store.get_or_create_active(&acme, &*db.kek).await.unwrap();

    let admin = db.admin().await;
    let killed: i64 = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = $1",
            &[&app],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 1);
    // Give the client a moment to notice the closed socket (it also copes if it has not).
    tokio::time::sleep(Duration::from_millis(50)).await;
    let again = store.lookup(record.dek_id).await.unwrap().unwrap();
    assert_eq!(again.dek_id, record.dek_id);
}

#[tokio::test]
async fn unreachable_store_is_reported_as_unavailable() {
    let mut config: Config = "host=127.0.0.1 port=1 user=postgres dbname=test"
        .parse()
        .unwrap();
    config.connect_timeout(Duration::from_secs(2));
    let store = KeyStore::new(config, "pgenvelope").unwrap();
    let err = store.lookup(DekId::new_random()).await.unwrap_err();
    assert!(
        matches!(err, KeyError::KeyStoreUnavailable { op: "connect", .. }),
        "{err}"
    );
}

#[tokio::test]
async fn kms_uri_builds_local_provider() {
    let dir = tempfile::tempdir().unwrap();
    let uri: KmsUri = format!("local:{}", dir.path().join("kek").display())
        .parse()
        .unwrap();
    let kek = uri.open().await.unwrap();
    assert!(kek.kek_id().starts_with("local:"));
    // A PKCS#11 URI whose module does not exist fails at open with a clear error.
    let err = "pkcs11:token=hsm;object=kek?module-path=/nonexistent/libnothing.so&pin-value=1"
        .parse::<KmsUri>()
        .unwrap()
        .open()
        .await
        .err()
        .unwrap();
    assert!(matches!(err, KekError::Pkcs11(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_conditional_rotations_rotate_once() {
    let db = TestDb::new();
    let store = db.ready_store().await;
    let acme = org("acme");
    let v1 = store.get_or_create_active(&acme, &*db.kek).await.unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (store, kek, acme) = (Arc::clone(&store), Arc::clone(&db.kek), acme.clone());
            tokio::spawn(async move {
                store
                    .rotate(&acme, &*kek, Some(v1.dek_id), Some("test"))
                    .await
            })
        })
        .collect();
    let mut rotated = Vec::new();
    for t in tasks {
        if let Some(r) = t.await.unwrap().unwrap() {
            rotated.push(r);
        }
    }
    assert_eq!(rotated.len(), 1, "exactly one rotation wins");
    let r = &rotated[0];
    assert_eq!(r.retired.as_ref().unwrap().dek_id, v1.dek_id);
    assert_eq!(r.active.version, 2);
    let all = store.list(Some(&acme)).await.unwrap();
    let states: Vec<(i32, DekState)> = all.iter().map(|d| (d.version, d.state)).collect();
    assert_eq!(states, [(1, DekState::DecryptOnly), (2, DekState::Active)]);
    // An unconditional rotation always rotates; one event per rotation.
    let v3 = store
        .rotate(&acme, &*db.kek, None, None)
        .await
        .unwrap()
        .unwrap();
    let events = store.events(Some(&acme), 100).await.unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(kinds, ["create", "rotate", "rotate"]);
    // Destroying works on retired keys only.
    assert!(!store.destroy_retired(v3.active.dek_id, None).await.unwrap());
    assert!(store
        .destroy_retired(v1.dek_id, Some("emptied"))
        .await
        .unwrap());
    assert!(!store.destroy_retired(v1.dek_id, None).await.unwrap());
    let gone = store.lookup(v1.dek_id).await.unwrap().unwrap();
    assert_eq!(gone.state, DekState::Destroyed);
    assert!(gone.wrapped.is_none());
}

/// PostgreSQL file node of `table` in the test schema (changes when the table is rewritten).
async fn filenode(db: &TestDb, table: &str) -> u32 {
    db.admin()
        .await
        .query_one(
            &format!(
                "SELECT pg_relation_filenode('\"{}\".{table}')::text::bigint",
                db.schema
            ),
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
        .try_into()
        .unwrap()
}

/// After a shred the key table is rewritten (`VACUUM FULL`), so the erased wrapped keys leave
/// its files; so is it after destroying one retired key.
#[tokio::test]
async fn shred_and_destroy_rewrite_the_key_table() {
    let db = TestDb::new();
    let store = db.ready_store().await;
    let acme = org("acme");
    let v1 = store.get_or_create_active(&acme, &*db.kek).await.unwrap();
    store.rotate(&acme, &*db.kek, None, None).await.unwrap();

    let before = filenode(&db, "data_keys").await;
    assert!(store.destroy_retired(v1.dek_id, None).await.unwrap());
    let after_destroy = filenode(&db, "data_keys").await;
    assert_ne!(
        before, after_destroy,
        "data_keys not rewritten after destroy"
    );

    assert_eq!(store.shred(&acme, None).await.unwrap().deks.len(), 1);
    assert_ne!(
        after_destroy,
        filenode(&db, "data_keys").await,
        "data_keys not rewritten after shred"
    );
}

// ---- search keys ----

/// Rows of `table` for `org`: (id, state, wrapped present), by version.
async fn key_rows(db: &TestDb, table: &str, org: &str) -> Vec<(uuid::Uuid, String, bool)> {
    let id = if table == "search_keys" {
        "key_id"
    } else {
        "dek_id"
    };
    db.admin()
        .await
        .query(
            &format!(
                "SELECT {id}, state, wrapped IS NOT NULL FROM \"{}\".{table} \
                 WHERE org_id = $1 ORDER BY version",
                db.schema
            ),
            &[&org],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// (event, key id, detail) of `org`'s events, oldest first.
async fn event_list(store: &KeyStore, org: &OrgId) -> Vec<(String, Option<DekId>, String)> {
    store
        .events(Some(org), 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.event, e.dek, e.detail.unwrap_or_default()))
        .collect()
}

/// A manager whose cache follows `NOTIFY pgenvelope_keys`, once its listener listens.
async fn listening_manager(db: &TestDb, kek: Arc<dyn KekProvider>) -> Arc<KeyManager> {
    let manager = Arc::new(db.manager(db.store(), kek, TTL));
    let (_task, state) = spawn_key_listener(Arc::clone(&manager));
    wait_for("the key listener", || state.is_listening()).await;
    let _: &ListenerState = &state;
    manager
}

/// Poll `done` every 10 ms for up to 5 s (far below the cache TTL).
async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    while !done() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// First use by many callers of two managers (two proxies, two connections) creates exactly
/// one active search key; it is a key of its own, unwrapped in its own context, and never a
/// DEK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_search_key_is_created_once_across_proxies_and_is_no_dek() {
    let db = TestDb::new();
    db.ready_store().await;
    let kek = Counting::new(db.kek.clone(), Duration::from_millis(5));
    let managers = [
        Arc::new(db.manager(db.store(), kek.clone(), TTL)),
        Arc::new(db.manager(db.store(), kek.clone(), TTL)),
    ];
    let acme = org("acme");
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let (manager, acme) = (Arc::clone(&managers[i % 2]), acme.clone());
            tokio::spawn(async move { manager.search_key(&acme).await })
        })
        .collect();
    let mut keys = Vec::new();
    for task in tasks {
        keys.push(task.await.unwrap().unwrap());
    }
    let first = Arc::clone(&keys[0]);
    for key in &keys {
        assert_eq!(key.dek_id(), first.dek_id());
        assert_eq!(key.key().expose_secret(), first.key().expose_secret());
        assert_eq!(key.org(), &acme);
        assert_eq!((key.version(), key.state()), (1, DekState::Active));
    }
    // Both managers loaded (each had a miss); the 5 ms wrap delay let both try to create one.
    assert!(kek.wraps.load(Ordering::SeqCst) > 1, "no race happened");
    for manager in &managers {
        assert_eq!(manager.stats().unwrap_calls, 1, "single-flight per manager");
    }

    let rows = key_rows(&db, "search_keys", "acme").await;
    assert_eq!(rows, [(first.dek_id().0, "active".to_owned(), true)]);
    let store = db.store();
    let record = store
        .lookup_search_key(first.dek_id())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.kek, db.kek.kek_id());
    assert!(record.retired_at.is_none() && record.destroyed_at.is_none());
    let ctx = KeyContext {
        org: acme.clone(),
        dek: first.dek_id(),
    };
    let unwrapped = db
        .kek
        .unwrap(&ctx, record.wrapped.as_deref().unwrap())
        .await
        .unwrap();
    assert_eq!(unwrapped.expose_secret(), first.key().expose_secret());
    let created: Vec<_> = event_list(&store, &acme)
        .await
        .into_iter()
        .filter(|(e, _, _)| e == SEARCH_KEY_CREATED)
        .collect();
    assert_eq!(
        created,
        [(
            SEARCH_KEY_CREATED.to_owned(),
            Some(first.dek_id()),
            "v1".to_owned()
        )]
    );

    // Never a DEK: not created as one, not found as one, not listed or counted as one.
    assert!(key_rows(&db, "data_keys", "acme").await.is_empty());
    let manager = &managers[0];
    let err = manager.key_by_id(first.dek_id()).await.unwrap_err();
    assert!(
        matches!(err, KeyError::UnknownDek(d) if d == first.dek_id()),
        "{err}"
    );
    let err = manager
        .key_for_org(first.dek_id(), &acme)
        .await
        .unwrap_err();
    assert!(matches!(err, KeyError::UnknownDek(_)), "{err}");
    assert!(store.lookup(first.dek_id()).await.unwrap().is_none());
    assert!(store.active(&acme).await.unwrap().is_none());
    assert!(store.list(Some(&acme)).await.unwrap().is_empty());
    // The organisation's DEK is another key.
    let dek = manager.active_key(&acme).await.unwrap();
    assert_ne!(dek.dek_id(), first.dek_id());
    assert_ne!(dek.key().expose_secret(), first.key().expose_secret());
    let search_again = manager.search_key(&acme).await.unwrap();
    assert!(Arc::ptr_eq(&search_again, &keys[0]) || search_again.dek_id() == first.dek_id());
    let listed = store.list_search_keys(Some(&acme)).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].state, SearchKeyState::Active);
    assert!(store
        .list_search_keys(Some(&org("nobody")))
        .await
        .unwrap()
        .is_empty());
}

/// A warm search key costs no key-store or KEK call, and `still_fresh` accepts it.
#[tokio::test]
async fn warm_search_key_makes_no_store_or_kek_calls() {
    let db = TestDb::new();
    let store = db.ready_store().await;
    let kek = Counting::new(db.kek.clone(), Duration::ZERO);
    let manager = db.manager(store, kek.clone(), TTL);
    let acme = org("acme");

    let first = manager.search_key(&acme).await.unwrap();
    let (calls, stats) = (kek.calls(), manager.stats());
    assert_eq!(stats.store_loads, 1);
    for _ in 0..20 {
        let again = manager.search_key(&acme).await.unwrap();
        assert!(Arc::ptr_eq(&first, &again));
    }
    assert!(manager.still_fresh(&first));
    assert_eq!(kek.calls(), calls, "no KEK call when warm");
    let after = manager.stats();
    assert_eq!(
        after.store_loads, stats.store_loads,
        "no key-store call when warm"
    );
    assert_eq!(after.cache_hits, stats.cache_hits + 21);
    assert_eq!(after.cache_misses, stats.cache_misses);

    // Same TTL as DEKs, on tokio's clock.
    tokio::time::pause();
    tokio::time::advance(TTL).await;
    assert!(!manager.still_fresh(&first));
    let reloaded = manager.search_key(&acme).await.unwrap();
    assert!(!Arc::ptr_eq(&first, &reloaded));
    assert_eq!(reloaded.dek_id(), first.dek_id());
    assert_eq!(manager.stats().store_loads, stats.store_loads + 1);
}

/// `rotate_search_key`: a new active key, the old one retired, an event, and a notification
/// that makes a listening proxy drop the old key at once. DEKs are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_key_rotation_retires_the_old_key_and_proxies_drop_it() {
    let db = TestDb::new();
    let store = db.ready_store().await;
    let manager = listening_manager(&db, db.kek.clone()).await;
    let acme = org("acme");
    let dek = manager.active_key(&acme).await.unwrap();
    let old = manager.search_key(&acme).await.unwrap();

    let rotation = store
        .rotate_search_key(&acme, &*db.kek, Some("yearly"))
        .await
        .unwrap();
    let retired = rotation.retired.unwrap();
    assert_eq!(retired.key_id, old.dek_id());
    assert_eq!(retired.state, SearchKeyState::Retired);
    assert!(retired.retired_at.is_some());
    assert_eq!(rotation.active.version, 2);
    assert_eq!(rotation.active.state, SearchKeyState::Active);
    assert_ne!(rotation.active.key_id, old.dek_id());

    wait_for("the rotation to reach the proxy", || {
        !manager.still_fresh(&old)
    })
    .await;
    let new = manager.search_key(&acme).await.unwrap();
    assert_eq!(new.dek_id(), rotation.active.key_id);
    assert_eq!(new.version(), 2);
    assert_ne!(new.key().expose_secret(), old.key().expose_secret());
    assert_eq!(
        key_rows(&db, "search_keys", "acme").await,
        [
            (old.dek_id().0, "retired".to_owned(), true),
            (new.dek_id().0, "active".to_owned(), true)
        ]
    );

    // The DEK is still the active one, and still the same key.
    assert_eq!(
        key_rows(&db, "data_keys", "acme").await,
        [(dek.dek_id().0, "active".to_owned(), true)]
    );
    let dek_again = manager.active_key(&acme).await.unwrap();
    assert_eq!(dek_again.dek_id(), dek.dek_id());

    let events = store.events(Some(&acme), 100).await.unwrap();
    let rotated = events
        .iter()
        .find(|e| e.event == SEARCH_KEY_ROTATED)
        .expect("a search_key_rotated event");
    assert_eq!(rotated.dek, Some(new.dek_id()));
    assert_eq!(rotated.reason.as_deref(), Some("yearly"));
    let detail = rotated.detail.as_deref().unwrap();
    assert!(
        detail.contains("v1 → v2") && detail.contains(&old.dek_id().to_string()),
        "{detail}"
    );
    assert!(
        !events.iter().any(|e| e.event == "rotate"),
        "a DEK was rotated"
    );

    // A rotation with no search key yet makes the first one.
    let globex = org("globex");
    let first = store
        .rotate_search_key(&globex, &*db.kek, None)
        .await
        .unwrap();
    assert!(first.retired.is_none());
    assert_eq!(first.active.version, 1);
    assert_eq!(
        manager.search_key(&globex).await.unwrap().dek_id(),
        first.active.key_id
    );
}

/// `shred` destroys every search key of the organisation with the DEKs, records a tombstone
/// per key, rewrites the table, and a listening proxy drops its cached search key at once.
/// As for DEKs, the next request makes a new key; the destroyed ones never come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shred_destroys_search_keys_and_proxies_drop_them_at_once() {
    let db = TestDb::new();
    let store = db.ready_store().await;
    let manager = listening_manager(&db, db.kek.clone()).await;
    let (acme, globex) = (org("acme"), org("globex"));
    let dek = manager.active_key(&acme).await.unwrap();
    let v1 = manager.search_key(&acme).await.unwrap();
    store
        .rotate_search_key(&acme, &*db.kek, None)
        .await
        .unwrap();
    wait_for("the rotation to reach the proxy", || {
        !manager.still_fresh(&v1)
    })
    .await;
    let v2 = manager.search_key(&acme).await.unwrap();
    let other = manager.search_key(&globex).await.unwrap();
    let before = filenode(&db, "search_keys").await;

    let shredded = store.shred(&acme, Some("erasure")).await.unwrap();
    assert_eq!(shredded.deks.len(), 1);
    assert_eq!(shredded.deks[0].dek_id, dek.dek_id());
    let destroyed: Vec<(DekId, SearchKeyState, bool)> = shredded
        .search_keys
        .iter()
        .map(|k| (k.key_id, k.state, k.wrapped.is_none()))
        .collect();
    assert_eq!(
        destroyed,
        [
            (v1.dek_id(), SearchKeyState::Destroyed, true),
            (v2.dek_id(), SearchKeyState::Destroyed, true)
        ]
    );
    assert!(key_rows(&db, "search_keys", "acme")
        .await
        .iter()
        .all(|(_, state, wrapped)| state == "destroyed" && !wrapped));
    assert_ne!(
        before,
        filenode(&db, "search_keys").await,
        "search_keys not rewritten"
    );

    // Evicted at once through NOTIFY, far below the TTL; other organisations keep theirs.
    wait_for("the shred to reach the proxy", || !manager.still_fresh(&v2)).await;
    assert!(manager.still_fresh(&other));
    assert!(Arc::ptr_eq(
        &manager.search_key(&globex).await.unwrap(),
        &other
    ));

    // Tombstones: one per search key, saying what it was.
    let tombstones: Vec<(Option<DekId>, String)> = event_list(&store, &acme)
        .await
        .into_iter()
        .filter(|(e, _, _)| e == SEARCH_KEY_DESTROYED)
        .map(|(_, id, detail)| (id, detail))
        .collect();
    assert_eq!(
        tombstones,
        [
            (Some(v1.dek_id()), "v1 was retired".to_owned()),
            (Some(v2.dek_id()), "v2 was active".to_owned())
        ]
    );

    // Mirrors DEKs after a shred: the next request creates a new key, never an old one.
    let new_dek = manager.active_key(&acme).await.unwrap();
    let v3 = manager.search_key(&acme).await.unwrap();
    assert!(![dek.dek_id()].contains(&new_dek.dek_id()));
    assert!(![v1.dek_id(), v2.dek_id()].contains(&v3.dek_id()));
    assert_eq!(v3.version(), 3);
    assert_ne!(v3.key().expose_secret(), v2.key().expose_secret());

    // A manager that never saw the old keys cannot get them either.
    let fresh: &CachedDek = &db
        .manager(db.store(), db.kek.clone(), TTL)
        .search_key(&acme)
        .await
        .unwrap();
    assert_eq!(fresh.dek_id(), v3.dek_id());
}

/// `rewrap` moves search keys to the new KEK too (verified, with an event), so a proxy that
/// holds only the new KEK still gets the organisation's search key.
#[tokio::test]
async fn rewrap_moves_search_keys_to_the_new_kek() {
    let db = TestDb::new();
    let store = db.ready_store().await;
    let acme = org("acme");
    let old_manager = db.manager(db.store(), db.kek.clone(), TTL);
    let before = old_manager.search_key(&acme).await.unwrap();
    old_manager.active_key(&acme).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let new_kek: Arc<dyn KekProvider> =
        Arc::new(LocalKek::open_or_create(dir.path().join("kek")).unwrap());
    let only_new = db.manager(db.store(), Arc::clone(&new_kek), TTL);
    let err = only_new.search_key(&acme).await.unwrap_err();
    assert!(matches!(err, KeyError::KekMismatch { .. }), "{err}");

    let from: Vec<Arc<dyn KekProvider>> = vec![db.kek.clone()];
    let report = store
        .rewrap(&from, &*new_kek, 10, Some("migration"), |_| {})
        .await
        .unwrap();
    assert_eq!((report.rewrapped, report.search_keys), (2, 1));
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    let record = store
        .lookup_search_key(before.dek_id())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.kek, new_kek.kek_id());

    let only_new = db.manager(db.store(), Arc::clone(&new_kek), TTL);
    let after = only_new.search_key(&acme).await.unwrap();
    assert_eq!(after.dek_id(), before.dek_id());
    assert_eq!(after.key().expose_secret(), before.key().expose_secret());
    let rewrapped: Vec<_> = event_list(&store, &acme)
        .await
        .into_iter()
        .filter(|(e, _, _)| e == SEARCH_KEY_REWRAPPED)
        .collect();
    assert_eq!(rewrapped.len(), 1);
    assert_eq!(rewrapped[0].1, Some(before.dek_id()));

    // A rerun has nothing left to do.
    let again = store
        .rewrap(&from, &*new_kek, 10, None, |_| {})
        .await
        .unwrap();
    assert_eq!((again.rewrapped, again.already), (0, 2));
}

/// The schema keeps search keys' invariants like the DEKs', and a key store made before
/// search keys existed gains their table on the next `ensure_schema`, its DEKs untouched.
#[tokio::test]
async fn search_key_schema_invariants_and_upgrade_in_place() {
    let db = TestDb::new();
    let store = db.ready_store().await;
    let acme = org("acme");
    let dek = store.get_or_create_active(&acme, &*db.kek).await.unwrap();
    let admin = db.admin().await;
    let s = &db.schema;

    // As an earlier version left it: no search_keys table.
    admin
        .batch_execute(&format!("DROP TABLE \"{s}\".search_keys"))
        .await
        .unwrap();
    let reader = db.store();
    assert!(reader.list_search_keys(None).await.unwrap().is_empty());
    store.ensure_schema().await.unwrap();
    assert_eq!(
        store.lookup(dek.dek_id).await.unwrap().unwrap().dek_id,
        dek.dek_id
    );
    let key = store
        .get_or_create_search_key(&acme, &*db.kek)
        .await
        .unwrap();
    assert_eq!(key.version, 1);

    let second_active = admin
        .execute(
            &format!(
                "INSERT INTO \"{s}\".search_keys (key_id, org_id, version, state, kek, wrapped) \
                 VALUES (gen_random_uuid(), 'acme', 2, 'active', 'k', '\\x00')"
            ),
            &[],
        )
        .await;
    assert!(second_active.is_err(), "two active search keys for one org");
    let dek_state = admin
        .execute(
            &format!("UPDATE \"{s}\".search_keys SET state = 'decrypt_only' WHERE key_id = $1"),
            &[&key.key_id.0],
        )
        .await;
    assert!(dek_state.is_err());
    let destroyed_with_key = admin
        .execute(
            &format!("UPDATE \"{s}\".search_keys SET state = 'destroyed' WHERE key_id = $1"),
            &[&key.key_id.0],
        )
        .await;
    assert!(
        destroyed_with_key.is_err(),
        "destroyed must drop the wrapped key"
    );
}
