//! The `aws-kms:` KEK provider against a real KMS-compatible server (moto's server, started
//! here on a free loopback port and stopped by PID), with the real `aws-sdk-kms` client.
//!
//! Outage and recovery are real too: the moto process is frozen with SIGSTOP (requests hang
//! until the provider's timeouts fire; SIGCONT brings the same server, with the same keys,
//! back) or killed outright (connection refused; restarted on the same port with a new key
//! behind the same alias). In both cases the proxy keeps running with the same provider and a
//! new organisation works once KMS answers again.
//!
//! Only key states moto does not enforce (a disabled key) use a fault-injecting wrapper around
//! the real provider.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_kms::config::{Credentials, SharedCredentialsProvider};
use pgenvelope::crypto::{DataKey, DekId, OrgId};
use pgenvelope::keys::{AwsKmsKek, KekError, KekProvider, KeyContext, KmsCallError, LocalKek};

use crate::support::binaries::{python, require_tool};
use crate::support::harness::direct;
use crate::support::harness::unique;
use crate::support::vault::Vault;

/// A moto server process. Dropping it kills it (by PID) whatever state it is in.
struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    /// Start moto on a free loopback port, or `None` (skip) when moto is not installed and
    /// the run is not under CI.
    fn start() -> Option<Moto> {
        let available = python().is_ok_and(|py| {
            Command::new(py)
                .args(["-c", "import moto.server"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        if !require_tool(available, "moto's server (pip install 'moto[server]')") {
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Some(Self::start_on(port))
    }

    fn start_on(port: u16) -> Moto {
        let child = Command::new(python().unwrap())
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto");
        let moto = Moto { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto did not start on {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        moto
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} moto");
    }

    /// Freeze the server: connections are accepted by the kernel but never answered.
    fn freeze(&self) {
        self.signal("-STOP");
    }

    fn thaw(&self) {
        self.signal("-CONT");
    }

    /// Kill the server and wait for it to exit; its port then refuses connections.
    fn kill(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SDK configuration for moto, built explicitly (no process environment involved).
fn sdk_config(endpoint: &str) -> SdkConfig {
    SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
            "test", "test", None, None, "moto",
        )))
        .http_client(
            aws_smithy_http_client::Builder::new()
                .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                    aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                ))
                .build_https(),
        )
        .build()
}

/// Create a symmetric key and an alias for it; returns `alias/NAME`.
async fn create_key(endpoint: &str, alias: Option<&str>) -> String {
    let admin = aws_sdk_kms::Client::new(&sdk_config(endpoint));
    let key = admin.create_key().send().await.unwrap();
    let key_id = key.key_metadata().unwrap().key_id().to_owned();
    let alias = alias.map_or_else(|| format!("alias/{}", unique("pgenvelope")), str::to_owned);
    admin
        .create_alias()
        .alias_name(&alias)
        .target_key_id(&key_id)
        .send()
        .await
        .unwrap();
    alias
}

fn provider(endpoint: &str, key: &str) -> Arc<AwsKmsKek> {
    Arc::new(AwsKmsKek::from_sdk_config(&sdk_config(endpoint), key).unwrap())
}

fn ctx(org: &str) -> KeyContext {
    KeyContext {
        org: OrgId::new(org.to_owned()).unwrap(),
        dek: DekId(uuid::Uuid::new_v4()),
    }
}

/// Counts calls to the real provider underneath.
struct Counting {
    inner: Arc<dyn KekProvider>,
    generates: AtomicU64,
    unwraps: AtomicU64,
    /// When set, every call fails as KMS does for a disabled key (moto does not enforce
    /// key states).
    disabled: AtomicBool,
}

impl Counting {
    fn new(inner: Arc<dyn KekProvider>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            generates: AtomicU64::new(0),
            unwraps: AtomicU64::new(0),
            disabled: AtomicBool::new(false),
        })
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.generates.load(Ordering::SeqCst),
            self.unwraps.load(Ordering::SeqCst),
        )
    }

    fn check_disabled(&self, op: &'static str) -> Result<(), KekError> {
        if !self.disabled.load(Ordering::SeqCst) {
            return Ok(());
        }
        Err(KekError::KeyUnusable {
            kek: self.inner.kek_id(),
            source: Arc::new(KmsCallError {
                op,
                code: Some("DisabledException".to_owned()),
                message: "key is disabled".to_owned(),
            }),
        })
    }
}

#[async_trait]
impl KekProvider for Counting {
    fn kek_id(&self) -> String {
        self.inner.kek_id()
    }

    async fn generate(&self, ctx: &KeyContext) -> Result<(DataKey, Vec<u8>), KekError> {
        self.generates.fetch_add(1, Ordering::SeqCst);
        self.check_disabled("GenerateDataKey")?;
        self.inner.generate(ctx).await
    }

    async fn wrap(&self, ctx: &KeyContext, key: &DataKey) -> Result<Vec<u8>, KekError> {
        self.check_disabled("Encrypt")?;
        self.inner.wrap(ctx, key).await
    }

    async fn unwrap(&self, ctx: &KeyContext, wrapped: &[u8]) -> Result<DataKey, KekError> {
        self.unwraps.fetch_add(1, Ordering::SeqCst);
        self.check_disabled("Decrypt")?;
        self.inner.unwrap(ctx, wrapped).await
    }
}

async fn vault_with(kek: Arc<dyn KekProvider>) -> Vault {
    Vault::with(move |o| o.kek = Some(kek)).await
}

async fn insert(vault: &Vault, org: &str, value: &str) -> Result<u64, tokio_postgres::Error> {
    vault
        .client()
        .await
        .execute(
            &format!(
                "INSERT INTO {} (org_id, name, value, note) VALUES ($1, 'n', $2, $3)",
                vault.table
            ),
            &[&org, &value, &"a note"],
        )
        .await
}

async fn values_of(vault: &Vault, org: &str) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = vault
        .client()
        .await
        .query(
            &format!(
                "SELECT value FROM {} WHERE org_id = $1 ORDER BY id",
                vault.table
            ),
            &[&org],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

async fn keks_in_store(vault: &Vault) -> Vec<(String, String)> {
    direct()
        .await
        .query(
            &format!(
                "SELECT org_id, kek FROM {}.data_keys ORDER BY org_id",
                vault.proxy.key_schema
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_owned()).unwrap_or_default()
}

fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_else(|| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_kms_writes_and_reads_through_the_proxy() {
    let Some(moto) = Moto::start() else { return };
    let alias = create_key(&moto.url(), None).await;
    let kek = Counting::new(provider(&moto.url(), &alias));
    let vault = vault_with(kek.clone()).await;

    insert(&vault, "acme", "acme-secret-1").await.unwrap();
    insert(&vault, "acme", "acme-secret-2").await.unwrap();
    insert(&vault, "globex", "globex-secret").await.unwrap();

    assert_eq!(
        values_of(&vault, "acme").await.unwrap(),
        ["acme-secret-1", "acme-secret-2"]
    );
    assert_eq!(
        values_of(&vault, "globex").await.unwrap(),
        ["globex-secret"]
    );
    vault
        .assert_encrypted_at_rest(&["acme-secret", "globex-secret", "a note"])
        .await;
    let expected = format!("aws-kms:{alias}");
    assert_eq!(
        keks_in_store(&vault).await,
        [
            ("acme".to_owned(), expected.clone()),
            ("globex".to_owned(), expected.clone())
        ]
    );
    // One GenerateDataKey per new organisation.
    assert_eq!(kek.counts().0, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encryption_context_binds_org_and_dek() {
    let Some(moto) = Moto::start() else { return };
    let alias = create_key(&moto.url(), None).await;
    let kek = provider(&moto.url(), &alias);
    assert_eq!(kek.kek_id(), format!("aws-kms:{alias}"));

    let acme = ctx("acme");
    let (key, wrapped) = kek.generate(&acme).await.unwrap();
    let unwrapped = kek.unwrap(&acme, &wrapped).await.unwrap();
    assert_eq!(unwrapped.expose_secret(), key.expose_secret());

    // Moved to another organisation's row: same DEK id, other org.
    let moved = KeyContext {
        org: OrgId::new("globex".to_owned()).unwrap(),
        dek: acme.dek,
    };
    let err = kek.unwrap(&moved, &wrapped).await.err().unwrap();
    assert!(matches!(err, KekError::Rejected), "{err}");
    // Same organisation, another DEK id.
    let err = kek.unwrap(&ctx("acme"), &wrapped).await.err().unwrap();
    assert!(matches!(err, KekError::Rejected), "{err}");
    // Altered bytes.
    let mut bad = wrapped.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let err = kek.unwrap(&acme, &bad).await.err().unwrap();
    assert!(
        matches!(err, KekError::Rejected | KekError::Malformed { .. }),
        "{err}"
    );

    // Decrypt names the key: a blob of this key is refused under another key.
    let other = provider(&moto.url(), &create_key(&moto.url(), None).await);
    let err = other.unwrap(&acme, &wrapped).await.err().unwrap();
    assert!(matches!(err, KekError::Rejected), "{err}");

    // Encrypt (used by rewrap) binds the context the same way.
    let rewrapped = kek.wrap(&acme, &key).await.unwrap();
    assert_ne!(rewrapped, wrapped);
    let again = kek.unwrap(&acme, &rewrapped).await.unwrap();
    assert_eq!(again.expose_secret(), key.expose_secret());
    assert!(matches!(
        kek.unwrap(&moved, &rewrapped).await,
        Err(KekError::Rejected)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_key_is_a_clear_error_that_is_not_retried() {
    let Some(moto) = Moto::start() else { return };
    let kek = provider(&moto.url(), "alias/does-not-exist");
    let started = Instant::now();
    let err = kek.generate(&ctx("acme")).await.err().unwrap();
    assert!(matches!(err, KekError::KeyUnusable { .. }), "{err}");
    assert!(err.to_string().contains("aws-kms:alias/does-not-exist"));
    // A client error: answered at once, no backoff.
    assert!(started.elapsed() < Duration::from_secs(2));

    // Through the proxy: 58000 with a message that names the cause.
    let vault = vault_with(kek).await;
    let err = insert(&vault, "acme", "x").await.unwrap_err();
    assert_eq!(sqlstate(&err), "58000");
    assert!(message(&err).contains("disabled or deleted"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_key_gives_58000_and_cached_orgs_keep_working() {
    let Some(moto) = Moto::start() else { return };
    let alias = create_key(&moto.url(), None).await;
    let kek = Counting::new(provider(&moto.url(), &alias));
    let vault = vault_with(kek.clone()).await;
    insert(&vault, "acme", "before").await.unwrap();

    kek.disabled.store(true, Ordering::SeqCst);
    let (generates, _) = kek.counts();
    let err = insert(&vault, "initech", "x").await.unwrap_err();
    assert_eq!(sqlstate(&err), "58000");
    assert!(message(&err).contains("disabled or deleted"), "{err}");
    // The key manager does not retry an unusable key.
    assert_eq!(kek.counts().0, generates + 1);
    // Already unwrapped: keeps serving until the cache entry expires.
    insert(&vault, "acme", "during").await.unwrap();
    assert_eq!(
        values_of(&vault, "acme").await.unwrap(),
        ["before", "during"]
    );
    assert!(values_of(&vault, "initech").await.unwrap().is_empty());

    kek.disabled.store(false, Ordering::SeqCst);
    insert(&vault, "initech", "after").await.unwrap();
    assert_eq!(values_of(&vault, "initech").await.unwrap(), ["after"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_kms_cached_orgs_keep_working_new_org_58000_then_recovers() {
    let Some(moto) = Moto::start() else { return };
    let alias = create_key(&moto.url(), None).await;
    let kek = provider(&moto.url(), &alias);
    let vault = vault_with(kek).await;
    insert(&vault, "acme", "before").await.unwrap();

    moto.freeze();
    insert(&vault, "acme", "during").await.unwrap();
    assert_eq!(
        values_of(&vault, "acme").await.unwrap(),
        ["before", "during"]
    );
    let started = Instant::now();
    let err = insert(&vault, "initech", "x").await.unwrap_err();
    let took = started.elapsed();
    moto.thaw();
    assert_eq!(sqlstate(&err), "58000", "{err}");
    assert!(
        message(&err).contains("key service is unavailable"),
        "{err}"
    );
    // Bounded by the provider's operation timeout (8 s), not hanging with the server.
    assert!(took < Duration::from_secs(12), "took {took:?}");
    // Nothing was written for the refused organisation.
    assert!(values_of(&vault, "initech").await.unwrap().is_empty());

    // Same proxy, same provider, same KMS state: works again without any restart.
    insert(&vault, "initech", "after").await.unwrap();
    assert_eq!(values_of(&vault, "initech").await.unwrap(), ["after"]);
    vault
        .assert_encrypted_at_rest(&["before", "during", "after"])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_kms_new_org_58000_quickly_then_recovers_after_restart() {
    let Some(moto) = Moto::start() else { return };
    let url = moto.url();
    let alias = create_key(&url, None).await;
    let vault = vault_with(provider(&url, &alias)).await;
    insert(&vault, "acme", "before").await.unwrap();

    let port = moto.kill();
    insert(&vault, "acme", "during").await.unwrap();
    let started = Instant::now();
    let err = insert(&vault, "initech", "x").await.unwrap_err();
    assert_eq!(sqlstate(&err), "58000", "{err}");
    // Connection refused: a few quick retries, no waiting for timeouts.
    assert!(started.elapsed() < Duration::from_secs(5));

    // moto keeps its keys in memory only, so the restarted server gets a new key behind
    // the same alias; the running proxy resolves the alias on its next call.
    let moto = Moto::start_on(port);
    create_key(&moto.url(), Some(&alias)).await;
    insert(&vault, "initech", "after").await.unwrap();
    assert_eq!(values_of(&vault, "initech").await.unwrap(), ["after"]);
    assert_eq!(
        values_of(&vault, "acme").await.unwrap(),
        ["before", "during"]
    );
}

/// Writes for `org` from `n` proxy connections at once.
async fn concurrent_inserts(vault: &Arc<Vault>, org: &str, n: usize) {
    let mut clients = Vec::new();
    for _ in 0..n {
        clients.push(vault.client().await);
    }
    let sql = format!(
        "INSERT INTO {} (org_id, value) VALUES ($1, $2)",
        vault.table
    );
    let mut tasks = Vec::new();
    for (i, client) in clients.into_iter().enumerate() {
        let (sql, org) = (sql.clone(), org.to_owned());
        tasks.push(tokio::spawn(async move {
            client
                .execute(&sql, &[&org, &format!("v{i}")])
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

// PostgreSQL's default max_connections is 100, shared with the key store and other tests:
// 100 concurrent users are tasks on the proxy's key manager (the path every connection
// takes), and 20 are real client connections through the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_users_of_a_new_org_share_one_kms_call() {
    let Some(moto) = Moto::start() else { return };
    let alias = create_key(&moto.url(), None).await;
    let kek = Counting::new(provider(&moto.url(), &alias));
    let vault = Arc::new(vault_with(kek.clone()).await);
    let keys = Arc::clone(vault.proxy.engine.as_ref().unwrap().keys());

    // 100 concurrent first writes of one new organisation.
    let acme = OrgId::new("acme".to_owned()).unwrap();
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (keys, acme) = (Arc::clone(&keys), acme.clone());
        tasks.push(tokio::spawn(async move {
            keys.active_key(&acme).await.unwrap().dek_id()
        }));
    }
    let mut deks = Vec::new();
    for t in tasks {
        deks.push(t.await.unwrap());
    }
    deks.dedup();
    assert_eq!(deks.len(), 1);
    assert_eq!(kek.counts(), (1, 1), "(GenerateDataKey, Decrypt) calls");

    // 20 client connections of another new organisation.
    concurrent_inserts(&vault, "initech", 20).await;
    assert_eq!(kek.counts(), (2, 2));
    assert_eq!(values_of(&vault, "initech").await.unwrap().len(), 20);

    // N new organisations, 20 concurrent users each: N calls of each kind.
    let n = 5;
    let mut tasks = Vec::new();
    for org in 0..n {
        let org = OrgId::new(format!("org{org}")).unwrap();
        for _ in 0..20 {
            let (keys, org) = (Arc::clone(&keys), org.clone());
            tasks.push(tokio::spawn(async move {
                keys.active_key(&org).await.unwrap();
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(kek.counts(), (2 + n, 2 + n));

    // A fresh proxy over the same key store: 100 concurrent cold reads of one DEK and 20
    // connections reading another organisation make one Decrypt per organisation.
    let reader = Counting::new(provider(&moto.url(), &alias));
    let mut reader_proxy = crate::support::harness::TestProxy::with({
        let mut o = crate::support::harness::ProxyOptions::encrypting(
            &crate::support::vault::vault_rules(&vault.table),
        );
        o.key_schema = vault.proxy.key_schema.clone();
        o.kek = Some(reader.clone());
        o
    });
    let reader_keys = Arc::clone(reader_proxy.engine.as_ref().unwrap().keys());
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (keys, dek) = (Arc::clone(&reader_keys), deks[0]);
        tasks.push(tokio::spawn(async move {
            keys.key_by_id(dek).await.unwrap();
        }));
    }
    let sql = format!("SELECT value FROM {} WHERE org_id = 'initech'", vault.table);
    for _ in 0..20 {
        let cfg = reader_proxy.pg_config("postgres", None, "test");
        let sql = sql.clone();
        tasks.push(tokio::spawn(async move {
            let client = crate::support::harness::connect(&cfg).await.unwrap();
            assert_eq!(client.query(&sql, &[]).await.unwrap().len(), 20);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(reader.counts(), (0, 2), "one Decrypt per organisation read");
    // The key schema belongs to `vault`'s proxy, which drops it.
    reader_proxy.key_schema = unique("pgenvelope_unused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deks_of_a_previous_kek_stay_readable_with_kms_also() {
    let Some(moto) = Moto::start() else { return };
    let alias = create_key(&moto.url(), None).await;
    let dir = tempfile::tempdir().unwrap();
    let local_path = dir.path().join("old-kek");
    let old: Arc<dyn KekProvider> = Arc::new(LocalKek::open_or_create(&local_path).unwrap());
    let old_id = old.kek_id();

    // Before the migration: local KEK.
    let before = vault_with(Arc::clone(&old)).await;
    insert(&before, "acme", "old-secret").await.unwrap();

    // After: AWS KMS primary, the local KEK unwrap-only, same table and key store.
    let table = before.table.clone();
    let migrated = crate::support::harness::TestProxy::with({
        let mut o = crate::support::harness::ProxyOptions::encrypting(
            &crate::support::vault::vault_rules(&table),
        );
        o.key_schema = before.proxy.key_schema.clone();
        o.kek = Some(provider(&moto.url(), &alias));
        o.kek_also = vec![Arc::clone(&old)];
        o
    });
    let client = crate::support::harness::connect(&migrated.pg_config("postgres", None, "test"))
        .await
        .unwrap();
    let rows = client
        .query(
            &format!("SELECT value FROM {table} WHERE org_id = 'acme'"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, String>(0), "old-secret");
    client
        .execute(
            &format!("INSERT INTO {table} (org_id, value) VALUES ('globex', 'new-secret')"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        keks_in_store(&before).await,
        [
            ("acme".to_owned(), old_id),
            ("globex".to_owned(), format!("aws-kms:{alias}"))
        ]
    );

    // Without --kms-also the old DEK cannot be used: 58000, not garbage.
    let strict = crate::support::harness::TestProxy::with({
        let mut o = crate::support::harness::ProxyOptions::encrypting(
            &crate::support::vault::vault_rules(&table),
        );
        o.key_schema = before.proxy.key_schema.clone();
        o.kek = Some(provider(&moto.url(), &alias));
        o
    });
    let client = crate::support::harness::connect(&strict.pg_config("postgres", None, "test"))
        .await
        .unwrap();
    let err = client
        .query(
            &format!("SELECT value FROM {table} WHERE org_id = 'acme'"),
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "58000", "{err}");
    // The key schema belongs to `before`'s proxy, which drops it.
    let (mut strict, mut migrated) = (strict, migrated);
    strict.key_schema = unique("pgenvelope_unused");
    migrated.key_schema = unique("pgenvelope_unused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rewrap_moves_deks_between_kms_keys_with_reencrypt() {
    let Some(moto) = Moto::start() else { return };
    let (first, second) = (
        create_key(&moto.url(), None).await,
        create_key(&moto.url(), None).await,
    );
    let vault = vault_with(provider(&moto.url(), &first)).await;
    insert(&vault, "acme", "acme-secret").await.unwrap();
    insert(&vault, "globex", "globex-secret").await.unwrap();
    let before = vault.stored().await;

    let (host, port) = crate::support::harness::main_pg();
    let out = Command::new(env!("CARGO_BIN_EXE_pgenvelope"))
        .args(["keys", "rewrap", "--reason", "move to the new KMS key"])
        .arg("--upstream")
        .arg(format!("postgres://postgres@{host}:{port}/test"))
        .arg("--key-schema")
        .arg(&vault.proxy.key_schema)
        .arg("--kms")
        .arg(format!("aws-kms:{first}"))
        .arg("--to-kms")
        .arg(format!("aws-kms:{second}"))
        .env("AWS_ENDPOINT_URL", moto.url())
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env_remove("AWS_PROFILE")
        .env_remove("PGENVELOPE_KMS_ALSO")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Both keys moved by ReEncrypt: the plaintext DEKs never left KMS for the move.
    assert!(
        stdout.contains("re-wrapped 2 data key(s)") && stdout.contains("(2 by the KMS"),
        "{stdout}"
    );
    assert_eq!(vault.stored().await, before, "data rows untouched");
    let expected = format!("aws-kms:{second}");
    assert_eq!(
        keks_in_store(&vault).await,
        [
            ("acme".to_owned(), expected.clone()),
            ("globex".to_owned(), expected)
        ]
    );

    // A proxy holding only the second key reads both organisations.
    let table = vault.table.clone();
    let mut reader = crate::support::harness::TestProxy::with({
        let mut o = crate::support::harness::ProxyOptions::encrypting(
            &crate::support::vault::vault_rules(&table),
        );
        o.key_schema = vault.proxy.key_schema.clone();
        o.kek = Some(provider(&moto.url(), &second));
        o
    });
    let client = crate::support::harness::connect(&reader.pg_config("postgres", None, "test"))
        .await
        .unwrap();
    let rows = client
        .query(&format!("SELECT value FROM {table} ORDER BY id"), &[])
        .await
        .unwrap();
    let values: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(values, ["acme-secret", "globex-secret"]);
    // The key schema belongs to the vault's proxy, which drops it.
    reader.key_schema = unique("pgenvelope_unused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_against_kms_round_trips_with_a_real_key_and_fails_on_a_missing_one() {
    let Some(moto) = Moto::start() else { return };
    let alias = create_key(&moto.url(), None).await;
    let url = moto.url();
    let dir = tempfile::tempdir().unwrap();
    let run = |kms: &str, against_kms: bool| {
        let mut args = vec!["--kms".to_owned(), format!("aws-kms:{kms}")];
        if against_kms {
            args.push("--against-kms".to_owned());
        }
        let out = crate::check::check_with_env(
            dir.path(),
            &args,
            &[
                ("AWS_ENDPOINT_URL", url.as_str()),
                ("AWS_ACCESS_KEY_ID", "test"),
                ("AWS_SECRET_ACCESS_KEY", "test"),
                ("AWS_REGION", "us-east-1"),
            ],
        );
        let (stdout, stderr) = crate::check::texts(&out);
        (out.status.code(), stdout, stderr)
    };

    let (code, stdout, stderr) = run(&alias, true);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("kms: aws-kms:{alias}: round trip ok")),
        "{stdout}"
    );

    // Without --against-kms nothing is contacted, so a missing key passes.
    let (code, stdout, stderr) = run("alias/does-not-exist", false);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("not contacted"), "{stdout}");

    for missing in [
        "alias/does-not-exist".to_owned(),
        uuid::Uuid::new_v4().to_string(),
    ] {
        let (code, stdout, stderr) = run(&missing, true);
        assert_eq!(code, Some(1), "{missing}\n{stdout}\n{stderr}");
        assert!(
            stderr.contains(&format!(
                "error: kms (--kms): aws-kms:{missing}: wrapping a test key"
            )) && stderr.contains("disabled, pending deletion or not found"),
            "{missing}\n{stderr}"
        );
    }
}
