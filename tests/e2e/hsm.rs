//! The `pkcs11:` KEK against a real token: SoftHSM2, one fresh token per test.
//!
//! SoftHSM2 reads its configuration (and so where its tokens live) from the `SOFTHSM2_CONF`
//! environment variable when the module is initialised, and a loaded PKCS#11 module is
//! process-wide state. Setting the variable inside this test process would race with every
//! other test (and `std::env::set_var` is disallowed), so each test here runs in two halves:
//!
//! 1. the parent test (`hsm_*`) creates a temp dir with a `softhsm2.conf` whose
//!    `directories.tokendir` points into it, initialises a token there with `softhsm2-util`
//!    (a child process given `SOFTHSM2_CONF`), then re-runs this test binary as a child process
//!    with `SOFTHSM2_CONF` set, asking it for exactly one `#[ignore]`d scenario in
//!    [`scenarios`];
//! 2. the scenario loads the module in-process (it sees only its own token), creates the KEK
//!    on the token with `C_GenerateKey` and exercises the provider.
//!
//! Scenarios check `PGENVELOPE_HSM_CHILD` and do nothing when run directly (for example by
//! `cargo test -- --include-ignored`). Under `CI`, a missing `softhsm2-util` fails the tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::support::binaries::which;
use crate::support::require_tool;

const MODULE: &str = pgenvelope::keys::DEFAULT_MODULE_PATH;
const USER_PIN: &str = "246810";
const SO_PIN: &str = "13579111";
const KEY_LABEL: &str = "pgenvelope-kek";
const CHILD_ENV: &str = "PGENVELOPE_HSM_CHILD";
const TOKEN_ENV: &str = "PGENVELOPE_HSM_TOKEN";

/// A SoftHSM2 configuration and token store in a temp dir.
struct SoftHsm {
    dir: tempfile::TempDir,
    token: String,
}

impl SoftHsm {
    /// `None` (skip) if SoftHSM2 is not installed and `CI` is unset.
    fn init(token: &str) -> Option<Self> {
        let available = which("softhsm2-util").is_some() && Path::new(MODULE).is_file();
        if !require_tool(available, "SoftHSM2 (softhsm2-util and libsofthsm2.so)") {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tokens")).unwrap();
        let hsm = Self {
            dir,
            token: token.to_owned(),
        };
        std::fs::write(
            hsm.conf(),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                hsm.dir.path().join("tokens").display()
            ),
        )
        .unwrap();
        let out = Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", token])
            .args(["--so-pin", SO_PIN, "--pin", USER_PIN])
            .env("SOFTHSM2_CONF", hsm.conf())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "softhsm2-util --init-token failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(hsm)
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("softhsm2.conf")
    }

    /// Run `scenarios::<name>` in a child process of this test binary that sees only this
    /// token, and fail unless it ran and passed.
    fn run(&self, name: &str) {
        let test = format!("hsm::scenarios::{name}");
        let out = Command::new(std::env::current_exe().unwrap())
            .args([test.as_str(), "--exact", "--ignored", "--nocapture"])
            .args(["--test-threads", "1"])
            .env("SOFTHSM2_CONF", self.conf())
            .env(CHILD_ENV, "1")
            .env(TOKEN_ENV, &self.token)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{test} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
            out.status
        );
    }
}

fn scenario(name: &str) {
    let token = format!("pgenvelope-{}", name.replace('_', "-"));
    // Token labels are at most 32 bytes.
    let token: String = token.chars().take(32).collect();
    if let Some(hsm) = SoftHsm::init(&token) {
        hsm.run(name);
    }
}

#[test]
fn hsm_end_to_end_writes_and_reads_through_the_proxy() {
    scenario("end_to_end");
}

#[test]
fn hsm_startup_errors_are_clear() {
    scenario("startup_errors");
}

#[test]
fn hsm_wrapped_key_is_bound_to_its_organisation() {
    scenario("context_binding");
}

#[test]
fn hsm_session_pool_survives_a_forced_logout() {
    scenario("forced_logout");
}

#[test]
fn hsm_cold_cache_unwraps_once_per_organisation() {
    scenario("cache_effectiveness");
}

#[test]
fn hsm_down_or_hanging_cached_orgs_keep_working_new_orgs_58000_then_recover() {
    scenario("down_or_hanging");
}

/// `pgenvelope check --against-kms` with a key imported by `softhsm2-util` (no scenario
/// needed: the module is only loaded by the binary, which is given `SOFTHSM2_CONF`).
#[test]
fn hsm_check_against_kms_round_trips() {
    let Some(hsm) = SoftHsm::init("pgenvelope-check") else {
        return;
    };
    let raw = hsm.dir.path().join("kek.bin");
    // softhsm2-util reads the key file as text (a NUL or a newline shortens the key), so the
    // test key is 32 random alphanumeric bytes.
    let key: String = rand::Rng::sample_iter(rand::rngs::OsRng, rand::distributions::Alphanumeric)
        .take(32)
        .map(char::from)
        .collect();
    std::fs::write(&raw, key).unwrap();
    let out = Command::new("softhsm2-util")
        .args(["--import"])
        .arg(&raw)
        .args(["--aes", "--token", "pgenvelope-check", "--label", KEY_LABEL])
        .args(["--id", "01", "--pin", USER_PIN])
        .env("SOFTHSM2_CONF", hsm.conf())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "softhsm2-util --import failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(&raw).unwrap();

    let conf = hsm.conf();
    let conf = conf.to_str().unwrap();
    let run = |object: &str| {
        let uri = format!(
            "pkcs11:token=pgenvelope-check;object={object};type=secret-key\
             ?module-path={MODULE}&pin-value={USER_PIN}"
        );
        let out = crate::check::check_with_env(
            hsm.dir.path(),
            &["--kms", uri.as_str(), "--against-kms"],
            &[("SOFTHSM2_CONF", conf)],
        );
        let (stdout, stderr) = crate::check::texts(&out);
        assert!(
            !stdout.contains(USER_PIN) && !stderr.contains(USER_PIN),
            "PIN printed"
        );
        (out.status.code(), stdout, stderr)
    };
    let (code, stdout, stderr) = run(KEY_LABEL);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("round trip ok") && stdout.contains("pin-value=REDACTED"),
        "{stdout}"
    );
    let (code, stdout, stderr) = run("no-such-key");
    assert_eq!(code, Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("error: kms (--kms)") && stderr.contains("no secret key no-such-key"),
        "{stderr}"
    );
}

/// The halves that run in a child process with `SOFTHSM2_CONF` set; see the module docs.
mod scenarios {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use async_trait::async_trait;
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::error::{Error as CkError, RvError};
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::{Attribute, KeyType, ObjectClass};
    use cryptoki::session::{Session, SessionState, UserType};
    use cryptoki::types::AuthPin;
    use pgenvelope::crypto::{DataKey, DekId, OrgId};
    use pgenvelope::keys::{
        KekError, KekProvider, KeyContext, KeyManager, KeyManagerConfig, KeyStore, KmsUri,
        Pkcs11Kek, Pkcs11Uri,
    };

    use super::{CHILD_ENV, KEY_LABEL, MODULE, TOKEN_ENV, USER_PIN};
    use crate::support::harness::{main_pg, unique};
    use crate::support::vault::Vault;

    /// The token this child process was given, or `None` when run outside a parent test.
    fn token() -> Option<String> {
        if std::env::var_os(CHILD_ENV).is_none() {
            eprintln!("not run: this scenario runs in a child process of its hsm_* test");
            return None;
        }
        Some(std::env::var(TOKEN_ENV).unwrap())
    }

    /// A second, independent view of the module, as an administrator's tool would have.
    fn admin_session(token: &str) -> Session {
        let ctx = Pkcs11::new(MODULE).unwrap();
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => panic!("C_Initialize: {e}"),
        }
        let slot = ctx
            .get_slots_with_token()
            .unwrap()
            .into_iter()
            .find(|s| ctx.get_token_info(*s).unwrap().label().trim_end() == token)
            .expect("the parent initialised the token");
        let session = ctx.open_rw_session(slot).unwrap();
        match session.login(UserType::User, Some(&AuthPin::from(USER_PIN))) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => panic!("C_Login: {e}"),
        }
        session
    }

    /// Create an AES-256 key on the token with `C_GenerateKey`.
    fn generate_key(token: &str, label: &str, extractable: bool) {
        let session = admin_session(token);
        session
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::ValueLen(32.into()),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(extractable),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                    Attribute::Label(label.as_bytes().to_vec()),
                ],
            )
            .unwrap();
    }

    fn uri(token: &str, label: &str) -> String {
        format!("pkcs11:token={token};object={label};type=secret-key?module-path={MODULE}&pin-value={USER_PIN}")
    }

    fn open(token: &str) -> Arc<Pkcs11Kek> {
        generate_key(token, KEY_LABEL, false);
        Arc::new(Pkcs11Kek::open(&Pkcs11Uri::parse(&uri(token, KEY_LABEL)).unwrap()).unwrap())
    }

    fn ctx(org: &str) -> KeyContext {
        KeyContext {
            org: OrgId::new(org).unwrap(),
            dek: DekId::from_bytes(*uuid::Uuid::new_v4().as_bytes()),
        }
    }

    /// An HSM that hangs, then one that fails every call (SoftHSM runs inside this process,
    /// so both are injected in front of each real token call; see `proxy::fault`).
    #[tokio::test(flavor = "multi_thread")]
    #[ignore = "run in a child process by hsm_down_or_hanging_cached_orgs_keep_working_new_orgs_58000_then_recover"]
    async fn down_or_hanging() {
        use std::time::{Duration, Instant};

        use pgenvelope::keys::{set_hsm_down, set_hsm_stall};

        let Some(token) = token() else { return };
        generate_key(&token, KEY_LABEL, false);
        let kek = Pkcs11Kek::open(&Pkcs11Uri::parse(&uri(&token, KEY_LABEL)).unwrap())
            .unwrap()
            .with_timeout(Duration::from_secs(1));
        let v = Vault::with(|o| o.kek = Some(Arc::new(kek))).await;
        let t = v.table.clone();
        let client = v.client().await;
        let insert = |org: &'static str, value: &'static str| {
            let client = &client;
            let t = t.clone();
            async move {
                client
                    .execute(
                        &format!("INSERT INTO {t} (org_id, name, value) VALUES ($1, 'n', $2)"),
                        &[&org, &value],
                    )
                    .await
            }
        };
        let sqlstate = |e: &tokio_postgres::Error| {
            e.as_db_error()
                .map(|d| d.code().code().to_owned())
                .unwrap_or_else(|| e.to_string())
        };
        insert("acme", "before").await.unwrap();

        // Hanging: every token call blocks for 4 s, the provider gives up after 1 s.
        set_hsm_stall(Duration::from_secs(4));
        insert("acme", "during-hang").await.unwrap();
        let started = Instant::now();
        let err = insert("initech", "x").await.unwrap_err();
        let took = started.elapsed();
        set_hsm_stall(Duration::ZERO);
        assert_eq!(sqlstate(&err), "58000", "{err}");
        // Bounded by the operation timeout, not by the hang.
        assert!(took < Duration::from_secs(4), "took {took:?}");
        // The same proxy recovers once the token answers again (hung calls free their
        // sessions when they return).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match insert("initech", "after-hang").await {
                Ok(_) => break,
                Err(e) if sqlstate(&e) == "58000" && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("no recovery after the hang: {e}"),
            }
        }

        // Down: every token call fails as with CKR_DEVICE_ERROR.
        set_hsm_down(true);
        insert("acme", "during-outage").await.unwrap();
        insert("initech", "during-outage").await.unwrap();
        let started = Instant::now();
        let err = insert("globex", "x").await.unwrap_err();
        let took = started.elapsed();
        set_hsm_down(false);
        assert_eq!(sqlstate(&err), "58000", "{err}");
        assert!(took < Duration::from_secs(4), "took {took:?}");
        insert("globex", "after-outage").await.unwrap();

        let rows = client
            .query(&format!("SELECT org_id, value FROM {t} ORDER BY id"), &[])
            .await
            .unwrap();
        let got: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let want = [
            ("acme", "before"),
            ("acme", "during-hang"),
            ("initech", "after-hang"),
            ("acme", "during-outage"),
            ("initech", "during-outage"),
            ("globex", "after-outage"),
        ];
        assert_eq!(
            got,
            want.iter()
                .map(|(o, v)| (o.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        );
        v.assert_encrypted_at_rest(&["before", "during-hang", "after-hang", "after-outage"])
            .await;
    }

    #[tokio::test(flavor = "multi_thread")]
    #[ignore = "run in a child process by hsm_end_to_end_writes_and_reads_through_the_proxy"]
    async fn end_to_end() {
        let Some(token) = token() else { return };
        generate_key(&token, KEY_LABEL, false);
        // Through the same path as `serve --kms pkcs11:…`.
        let kms: KmsUri = uri(&token, KEY_LABEL).parse().unwrap();
        let kek = kms.open().await.unwrap();
        let expected_id = format!("pkcs11:token={token};object={KEY_LABEL}");
        assert_eq!(kek.kek_id(), expected_id);
        let v = Vault::with(|o| o.kek = Some(kek)).await;
        let t = &v.table;
        let client = v.client().await;
        client
            .execute(
                &format!("INSERT INTO {t} (org_id, name, value, note) VALUES ($1, $2, $3, $4)"),
                &[&"acme", &"stripe", &"sk_live_hsm", &"first"],
            )
            .await
            .unwrap();
        client
            .batch_execute(&format!(
                "INSERT INTO {t} (org_id, name, value) VALUES ('globex', 'db', 'hunter2')"
            ))
            .await
            .unwrap();
        let rows = client
            .query(
                &format!("SELECT org_id, value, note FROM {t} ORDER BY id"),
                &[],
            )
            .await
            .unwrap();
        let got: Vec<(String, String, Option<String>)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        assert_eq!(
            got,
            vec![
                ("acme".into(), "sk_live_hsm".into(), Some("first".into())),
                ("globex".into(), "hunter2".into(), None),
            ]
        );
        v.assert_encrypted_at_rest(&["sk_live_hsm", "first", "hunter2"])
            .await;
        let keks: Vec<String> = crate::support::harness::direct()
            .await
            .query(
                &format!("SELECT DISTINCT kek FROM {}.data_keys", v.proxy.key_schema),
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(keks, vec![expected_id]);
    }

    #[tokio::test(flavor = "multi_thread")]
    #[ignore = "run in a child process by hsm_startup_errors_are_clear"]
    async fn startup_errors() {
        let Some(token) = token() else { return };
        generate_key(&token, KEY_LABEL, false);
        generate_key(&token, "extractable-kek", true);
        let open = |uri: String| {
            Pkcs11Kek::open(&Pkcs11Uri::parse(&uri).unwrap())
                .err()
                .map(|e| format!("{e:#}"))
                .expect("open must fail")
        };

        let wrong = format!(
            "pkcs11:token={token};object={KEY_LABEL}?module-path={MODULE}&pin-value=999999"
        );
        let msg = open(wrong);
        assert_eq!(msg, format!("PIN incorrect for token {token}"));

        let msg = open(uri(&token, "no-such-key"));
        assert!(msg.contains("no secret key no-such-key"), "{msg}");
        assert!(!msg.contains(USER_PIN), "{msg}");

        let msg = open(uri(&token, "extractable-kek"));
        assert!(msg.contains("CKA_EXTRACTABLE is true"), "{msg}");

        let msg = open(uri("no-such-token", KEY_LABEL));
        assert!(msg.contains("no PKCS#11 token no-such-token"), "{msg}");

        // After all that, the right PIN still works.
        let kek = Pkcs11Kek::open(&Pkcs11Uri::parse(&uri(&token, KEY_LABEL)).unwrap()).unwrap();
        let c = ctx("acme");
        let (key, wrapped) = kek.generate(&c).await.unwrap();
        let back = kek.unwrap(&c, &wrapped).await.unwrap();
        assert_eq!(back.expose_secret(), key.expose_secret());
    }

    #[tokio::test(flavor = "multi_thread")]
    #[ignore = "run in a child process by hsm_wrapped_key_is_bound_to_its_organisation"]
    async fn context_binding() {
        let Some(token) = token() else { return };
        let kek = open(&token);
        let acme = ctx("acme");
        let key = DataKey::generate();
        let wrapped = kek.wrap(&acme, &key).await.unwrap();
        assert_eq!(wrapped.len(), 61);
        assert_eq!(wrapped[0], 1);
        assert!(!wrapped
            .windows(32)
            .any(|w| w == key.expose_secret().as_slice()));

        let back = kek.unwrap(&acme, &wrapped).await.unwrap();
        assert_eq!(back.expose_secret(), key.expose_secret());

        let globex = KeyContext {
            org: OrgId::new("globex").unwrap(),
            dek: acme.dek,
        };
        let err = kek.unwrap(&globex, &wrapped).await.unwrap_err();
        assert!(matches!(err, KekError::Rejected), "{err:#}");
        let other_dek = ctx("acme");
        let err = kek.unwrap(&other_dek, &wrapped).await.unwrap_err();
        assert!(matches!(err, KekError::Rejected), "{err:#}");

        let mut tampered = wrapped.clone();
        tampered[20] ^= 1;
        let err = kek.unwrap(&acme, &tampered).await.unwrap_err();
        assert!(matches!(err, KekError::Rejected), "{err:#}");
        let err = kek.unwrap(&acme, &wrapped[..60]).await.unwrap_err();
        assert!(matches!(err, KekError::Malformed { .. }), "{err:#}");

        // Two wraps of one key differ (random IV).
        assert_ne!(kek.wrap(&acme, &key).await.unwrap(), wrapped);
    }

    #[tokio::test(flavor = "multi_thread")]
    #[ignore = "run in a child process by hsm_session_pool_survives_a_forced_logout"]
    async fn forced_logout() {
        let Some(token) = token() else { return };
        let kek = open(&token);
        let c = ctx("acme");
        let (key, wrapped) = kek.generate(&c).await.unwrap();
        kek.unwrap(&c, &wrapped).await.unwrap();

        for _ in 0..2 {
            // Login state is per application: logging out on any session logs out all of them,
            // including the provider's pooled ones.
            let admin = admin_session(&token);
            admin.logout().unwrap();
            let state = admin.get_session_info().unwrap().session_state();
            assert!(matches!(state, SessionState::RwPublic), "{state:?}");
            drop(admin);

            let back = kek.unwrap(&c, &wrapped).await.unwrap();
            assert_eq!(back.expose_secret(), key.expose_secret());
            let rewrapped = kek.wrap(&c, &key).await.unwrap();
            kek.unwrap(&c, &rewrapped).await.unwrap();
        }

        // Many concurrent calls share the pool and leave several sessions in it.
        concurrent_unwraps(&kek, &c, &wrapped).await;

        // The module finalised and initialised again under the provider's feet (as after a
        // token restart): every pooled session handle is invalid and the login is gone, so
        // the provider drops them, opens a fresh session and logs in again.
        let ctx = Pkcs11::new(MODULE).unwrap();
        ctx.clone().finalize().unwrap();
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .unwrap();
        let back = kek.unwrap(&c, &wrapped).await.unwrap();
        assert_eq!(back.expose_secret(), key.expose_secret());

        concurrent_unwraps(&kek, &c, &wrapped).await;
    }

    async fn concurrent_unwraps(kek: &Arc<Pkcs11Kek>, c: &KeyContext, wrapped: &[u8]) {
        let calls: Vec<_> = (0..32)
            .map(|_| {
                let kek = Arc::clone(kek);
                let (c, wrapped) = (c.clone(), wrapped.to_vec());
                tokio::spawn(async move { kek.unwrap(&c, &wrapped).await.map(|_| ()) })
            })
            .collect();
        for call in calls {
            call.await.unwrap().unwrap();
        }
    }

    /// Counts unwrap calls reaching the provider.
    struct Counting {
        inner: Arc<Pkcs11Kek>,
        unwraps: AtomicUsize,
    }

    #[async_trait]
    impl KekProvider for Counting {
        fn kek_id(&self) -> String {
            self.inner.kek_id()
        }

        async fn wrap(&self, ctx: &KeyContext, key: &DataKey) -> Result<Vec<u8>, KekError> {
            self.inner.wrap(ctx, key).await
        }

        async fn unwrap(&self, ctx: &KeyContext, wrapped: &[u8]) -> Result<DataKey, KekError> {
            self.unwraps.fetch_add(1, Ordering::SeqCst);
            self.inner.unwrap(ctx, wrapped).await
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    #[ignore = "run in a child process by hsm_cold_cache_unwraps_once_per_organisation"]
    async fn cache_effectiveness() {
        let Some(token) = token() else { return };
        let kek = open(&token);
        let (host, port) = main_pg();
        let store = Arc::new(
            KeyStore::from_url(
                &format!("host={host} port={port} user=postgres dbname=test"),
                &unique("pgenvelope_hsm"),
            )
            .unwrap(),
        );
        store.ensure_schema().await.unwrap();
        let orgs: Vec<OrgId> = (0..5)
            .map(|i| OrgId::new(format!("org-{i}")).unwrap())
            .collect();
        let writer = KeyManager::new(Arc::clone(&store), kek.clone(), KeyManagerConfig::default());
        let mut deks = Vec::new();
        for org in &orgs {
            deks.push(writer.active_key(org).await.unwrap().dek_id());
        }

        // One organisation, 100 concurrent cold lookups: one unwrap.
        let counting = Arc::new(Counting {
            inner: kek.clone(),
            unwraps: AtomicUsize::new(0),
        });
        let manager = Arc::new(KeyManager::new(
            Arc::clone(&store),
            counting.clone(),
            KeyManagerConfig::default(),
        ));
        let lookups: Vec<_> = (0..100)
            .map(|_| {
                let manager = Arc::clone(&manager);
                let dek = deks[0];
                tokio::spawn(async move { manager.key_by_id(dek).await.map(|k| k.dek_id()) })
            })
            .collect();
        for lookup in lookups {
            assert_eq!(lookup.await.unwrap().unwrap(), deks[0]);
        }
        assert_eq!(counting.unwraps.load(Ordering::SeqCst), 1);

        // N organisations, 100 concurrent cold lookups spread over them: N unwraps.
        let counting = Arc::new(Counting {
            inner: kek,
            unwraps: AtomicUsize::new(0),
        });
        let manager = Arc::new(KeyManager::new(
            store,
            counting.clone(),
            KeyManagerConfig::default(),
        ));
        let lookups: Vec<_> = (0..100)
            .map(|i| {
                let manager = Arc::clone(&manager);
                let org = orgs[i % orgs.len()].clone();
                tokio::spawn(async move { manager.active_key(&org).await.map(|k| k.dek_id()) })
            })
            .collect();
        for (i, lookup) in lookups.into_iter().enumerate() {
            assert_eq!(lookup.await.unwrap().unwrap(), deks[i % deks.len()]);
        }
        assert_eq!(counting.unwraps.load(Ordering::SeqCst), orgs.len());
    }
}
