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
    DekState, KekError, KekProvider, KeyContext, KeyError, KeyManager, KeyManagerConfig, KeyStore,
    KmsUri, LocalKek,
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
    assert_eq!(tables, ["data_keys", "key_events"]);
    let indexes: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_indexes WHERE schemaname = $1 \
             AND indexname = 'data_keys_one_active_per_org'",
            &[&db.schema],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(indexes, 1);
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

    assert_eq!(store.shred(&acme, None).await.unwrap().len(), 1);
    assert_ne!(
        after_destroy,
        filenode(&db, "data_keys").await,
        "data_keys not rewritten after shred"
    );
}
