//! Key lifecycle with proxies serving traffic: `keys rotate`, `keys shred`, `keys rewrap`,
//! `keys events` through the real binary, automatic rotation, and the proxies' change
//! listener (two proxies on one key store; a listener whose connection is killed).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgenvelope::crypto::{ColumnId, ColumnKey, DekId, EncV1, OrgId};
use pgenvelope::keys::{KekProvider, KeyContext, LocalKek};
use uuid::Uuid;

use crate::support::harness::direct;
use crate::support::harness::{connect, main_pg, ProxyOptions, TestProxy};
use crate::support::vault::{vault_rules, Vault};

/// Run the binary with the key store flags of `schema` (and `--kms local:KEK` for commands
/// that use a KEK).
fn cli(args: &[&str], schema: &str, kek: Option<&Path>) -> Output {
    let (host, port) = main_pg();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pgenvelope"));
    cmd.args(args)
        .arg("--upstream")
        .arg(format!("postgres://postgres@{host}:{port}/test"))
        .arg("--key-schema")
        .arg(schema)
        .env_remove("PGENVELOPE_KMS")
        .env_remove("PGENVELOPE_KMS_ALSO");
    if let Some(kek) = kek {
        cmd.arg("--kms").arg(format!("local:{}", kek.display()));
    }
    cmd.output().expect("run pgenvelope")
}

async fn cli_async(args: Vec<String>, schema: String, kek: Option<PathBuf>) -> Output {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli(&args, &schema, kek.as_deref())
    })
    .await
    .unwrap()
}

fn ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {stdout}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

/// DEK id of a stored enc:v1 value.
fn dek_of(stored: &str) -> Uuid {
    EncV1::parse(stored.as_bytes()).expect("enc:v1").dek_id().0
}

/// (dek_id, state) of every DEK of `org`, by version.
async fn deks(schema: &str, org: &str) -> Vec<(Uuid, String, Option<Vec<u8>>)> {
    direct()
        .await
        .query(
            &format!(
                "SELECT dek_id, state, wrapped FROM {schema}.data_keys WHERE org_id = $1 ORDER BY version"
            ),
            &[&org],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

async fn active_dek(schema: &str, org: &str) -> Option<Uuid> {
    deks(schema, org)
        .await
        .into_iter()
        .find(|(_, s, _)| s == "active")
        .map(|(d, _, _)| d)
}

async fn stored_value(table: &str, id: i32) -> String {
    direct()
        .await
        .query_one(&format!("SELECT value FROM {table} WHERE id = $1"), &[&id])
        .await
        .unwrap()
        .get(0)
}

async fn insert(client: &tokio_postgres::Client, table: &str, org: &str, value: &str) -> i32 {
    client
        .query_one(
            &format!("INSERT INTO {table} (org_id, value) VALUES ($1, $2) RETURNING id"),
            &[&org, &value],
        )
        .await
        .unwrap()
        .get(0)
}

/// Insert through `client` until the stored value is under `dek`, up to `limit`; returns how
/// long it took.
async fn until_writes_use(
    client: &tokio_postgres::Client,
    table: &str,
    org: &str,
    dek: Uuid,
    limit: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        let id = insert(client, table, org, "probe").await;
        if dek_of(&stored_value(table, id).await) == dek {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "writes still use the old key after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Read one row through `client` until it fails with XX001, up to `limit`.
async fn until_read_fails(
    client: &tokio_postgres::Client,
    table: &str,
    id: i32,
    limit: Duration,
) -> (Duration, String) {
    let started = Instant::now();
    loop {
        let r = client
            .query_one(&format!("SELECT value FROM {table} WHERE id = $1"), &[&id])
            .await;
        if let Err(e) = r {
            let code = e.code().map(|c| c.code().to_owned());
            assert_eq!(code.as_deref(), Some("XX001"), "{e:?}");
            let message = e.as_db_error().map(|d| d.message().to_owned()).unwrap();
            return (started.elapsed(), message);
        }
        assert!(
            started.elapsed() < limit,
            "reads still succeed after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_while_a_client_writes_continuously() {
    let dir = tempfile::tempdir().unwrap();
    let kek = dir.path().join("kek");
    let v = Vault::with(|o| o.kek_path = Some(kek.clone())).await;
    let (t, schema) = (v.table.clone(), v.proxy.key_schema.clone());
    let first = insert(&v.client().await, &t, "acme", "first").await;
    let old = dek_of(&stored_value(&t, first).await);

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, t) = (Arc::clone(&stop), t.clone());
        let client = v.client().await;
        tokio::spawn(async move {
            let (mut written, mut errors) = (Vec::new(), Vec::new());
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let value = format!("secret-{n}");
                n += 1;
                match client
                    .query_one(
                        &format!(
                            "INSERT INTO {t} (org_id, value) VALUES ('acme', $1) RETURNING id"
                        ),
                        &[&value],
                    )
                    .await
                {
                    Ok(row) => written.push((row.get::<_, i32>(0), value, Instant::now())),
                    Err(e) => errors.push(format!("{e:?}")),
                }
            }
            (written, errors)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cli_started = Instant::now();
    let out = cli_async(
        strings(&["keys", "rotate", "--org", "acme", "--reason", "scheduled"]),
        schema.clone(),
        Some(kek.clone()),
    )
    .await;
    let stdout = ok(&out);
    assert!(stdout.contains("version 2"), "{stdout}");
    let rotated = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let (written, errors) = writer.await.unwrap();
    assert!(
        errors.is_empty(),
        "statements failed during rotation: {errors:?}"
    );

    let new = active_dek(&schema, "acme").await.unwrap();
    assert_ne!(new, old);
    let states = deks(&schema, "acme").await;
    assert_eq!(states.len(), 2);
    assert_eq!((states[0].0, states[0].1.as_str()), (old, "decrypt_only"));
    let (mut before, mut after) = (0, 0);
    for (id, _, at) in &written {
        let dek = dek_of(&stored_value(&t, *id).await);
        if *at < cli_started {
            assert_eq!(dek, old, "row {id} written before the rotation");
            before += 1;
        } else if at.duration_since(rotated) > Duration::from_secs(1) {
            assert_eq!(dek, new, "row {id} written a second after the rotation");
            after += 1;
        } else {
            assert!(dek == old || dek == new);
        }
    }
    assert!(before > 0 && after > 0, "before {before}, after {after}");

    // `inspect` names the key of a new value as version 2, active.
    let (last_id, _, _) = written.last().unwrap();
    let value = stored_value(&t, *last_id).await;
    let out = cli_async(
        vec!["inspect".into(), value, "--offline".into()],
        schema.clone(),
        None,
    )
    .await;
    assert!(ok(&out).contains(&new.to_string()));

    // Every row, old key or new, reads back through the proxy.
    let client = v.client().await;
    let rows = client
        .query(&format!("SELECT id, value FROM {t} ORDER BY id"), &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), written.len() + 1);
    for ((id, value, _), row) in written.iter().zip(rows.iter().skip(1)) {
        assert_eq!(row.get::<_, i32>(0), *id);
        assert_eq!(&row.get::<_, String>(1), value);
    }

    let events = ok(&cli(
        &["keys", "events", "--org", "acme", "--json"],
        &schema,
        None,
    ));
    let rotate = events
        .lines()
        .find(|l| l.contains("\"event\":\"rotate\""))
        .unwrap_or_else(|| panic!("no rotate event: {events}"));
    assert!(rotate.contains("\"reason\":\"scheduled\""), "{rotate}");
    assert!(rotate.contains(&new.to_string()), "{rotate}");
    assert!(rotate.contains("\"actor\":\"cli:"), "{rotate}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_see_rotate_and_shred_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let kek = dir.path().join("kek");
    let v = Vault::with(|o| o.kek_path = Some(kek.clone())).await;
    let (t, schema) = (v.table.clone(), v.proxy.key_schema.clone());
    let mut opts = ProxyOptions::encrypting(&vault_rules(&t));
    opts.key_schema = schema.clone();
    opts.kek_path = Some(kek.clone());
    let b = TestProxy::with(opts);
    let ca = v.client().await;
    let cb = connect(&b.pg_config("postgres", None, "test"))
        .await
        .unwrap();

    // Both proxies cache acme's active key and can read each other's rows.
    let row_a = insert(&ca, &t, "acme", "from a").await;
    let row_b = insert(&cb, &t, "acme", "from b").await;
    let other = insert(&cb, &t, "globex", "globex secret").await;
    let old = dek_of(&stored_value(&t, row_a).await);
    assert_eq!(dek_of(&stored_value(&t, row_b).await), old);
    for c in [&ca, &cb] {
        let n: i64 = c
            .query_one(&format!("SELECT count(*) FROM {t}"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 3);
        let value: String = c
            .query_one(&format!("SELECT value FROM {t} WHERE id = $1"), &[&row_a])
            .await
            .unwrap()
            .get(0);
        assert_eq!(value, "from a");
    }

    ok(&cli_async(
        strings(&["keys", "rotate", "--org", "acme"]),
        schema.clone(),
        Some(kek.clone()),
    )
    .await);
    let new = active_dek(&schema, "acme").await.unwrap();
    assert_ne!(new, old);
    // Far below the 300 s cache TTL: only the notification can explain the switch.
    let limit = Duration::from_secs(5);
    let took_a = until_writes_use(&ca, &t, "acme", new, limit).await;
    let took_b = until_writes_use(&cb, &t, "acme", new, limit).await;
    eprintln!("rotation seen by proxy A after {took_a:?}, by proxy B after {took_b:?}");

    ok(&cli_async(
        strings(&[
            "keys",
            "shred",
            "--org",
            "acme",
            "--yes",
            "--reason",
            "contract ended",
        ]),
        schema.clone(),
        Some(kek.clone()),
    )
    .await);
    let (took_a, message) = until_read_fails(&ca, &t, row_a, limit).await;
    assert!(message.contains("destroyed"), "{message}");
    let (took_b, _) = until_read_fails(&cb, &t, row_b, limit).await;
    eprintln!("shred seen by proxy A after {took_a:?}, by proxy B after {took_b:?}");
    // Another organisation is unaffected on both.
    for c in [&ca, &cb] {
        let value: String = c
            .query_one(&format!("SELECT value FROM {t} WHERE id = $1"), &[&other])
            .await
            .unwrap()
            .get(0);
        assert_eq!(value, "globex secret");
    }
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shred_makes_one_organisation_unrecoverable_and_leaves_others_intact() {
    let dir = tempfile::tempdir().unwrap();
    let kek = dir.path().join("kek");
    let v = Vault::with(|o| o.kek_path = Some(kek.clone())).await;
    let (t, schema) = (v.table.clone(), v.proxy.key_schema.clone());
    let client = v.client().await;
    let mut a_rows = vec![insert(&client, &t, "org-a", "a one").await];
    insert(&client, &t, "org-b", "b one").await;
    // Org A has a retired key and an active one.
    ok(&cli_async(
        strings(&["keys", "rotate", "--org", "org-a"]),
        schema.clone(),
        Some(kek.clone()),
    )
    .await);
    let a2 = active_dek(&schema, "org-a").await.unwrap();
    until_writes_use(&client, &t, "org-a", a2, Duration::from_secs(5)).await;
    a_rows.push(insert(&client, &t, "org-a", "a two").await);
    insert(&client, &t, "org-b", "b two").await;

    // Without --yes nothing happens.
    let refused = cli(&["keys", "shred", "--org", "org-a"], &schema, Some(&kek));
    assert_eq!(refused.status.code(), Some(2));
    assert!(deks(&schema, "org-a")
        .await
        .iter()
        .all(|(_, s, _)| s != "destroyed"));

    let out = ok(&cli_async(
        strings(&[
            "keys",
            "shred",
            "--org",
            "org-a",
            "--yes",
            "--reason",
            "GDPR erasure",
        ]),
        schema.clone(),
        Some(kek.clone()),
    )
    .await);
    assert!(out.contains("2 data key(s) destroyed"), "{out}");
    let a_keys = deks(&schema, "org-a").await;
    assert!(a_keys
        .iter()
        .all(|(_, s, w)| s == "destroyed" && w.is_none()));

    // Through the proxy: A's rows are refused with a clear error, B's read back.
    for id in &a_rows {
        let err = client
            .query_one(&format!("SELECT value FROM {t} WHERE id = $1"), &[id])
            .await
            .unwrap_err();
        let db = err.as_db_error().unwrap();
        assert_eq!(db.code().code(), "XX001");
        assert!(
            db.message().contains("destroyed data key"),
            "{}",
            db.message()
        );
    }
    let b: Vec<String> = client
        .query(
            &format!("SELECT value FROM {t} WHERE org_id = 'org-b' ORDER BY id"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(b, ["b one", "b two"]);

    // No key left in the store opens A's values, whatever DEK id it is tried under.
    let local = LocalKek::open_or_create(&kek).unwrap();
    let column = ColumnId::from_name(&format!("public.{t}.value"));
    let remaining = direct()
        .await
        .query(
            &format!(
                "SELECT dek_id, org_id, wrapped FROM {schema}.data_keys WHERE wrapped IS NOT NULL"
            ),
            &[],
        )
        .await
        .unwrap();
    assert!(!remaining.is_empty());
    for id in &a_rows {
        let stored = stored_value(&t, *id).await;
        let parsed = EncV1::parse(stored.as_bytes()).unwrap();
        for r in &remaining {
            let (dek, org): (Uuid, String) = (r.get(0), r.get(1));
            let ctx = KeyContext {
                org: OrgId::new(org.clone()).unwrap(),
                dek: DekId(dek),
            };
            let key = local.unwrap(&ctx, r.get::<_, &[u8]>(2)).await.unwrap();
            for as_org in ["org-a", org.as_str()] {
                let attempt = ColumnKey::derive(&key, parsed.dek_id(), column)
                    .open(&OrgId::new(as_org).unwrap(), &parsed);
                assert!(attempt.is_err(), "a remaining key opened a shredded value");
            }
        }
    }

    // The shred is in the audit trail, one tombstone per key.
    let events = ok(&cli(
        &["keys", "events", "--org", "org-a", "--json"],
        &schema,
        None,
    ));
    let shreds: Vec<&str> = events
        .lines()
        .filter(|l| l.contains("\"event\":\"shred\""))
        .collect();
    assert_eq!(shreds.len(), 2, "{events}");
    assert!(shreds
        .iter()
        .all(|l| l.contains("\"reason\":\"GDPR erasure\"")));
    let table = ok(&cli(&["keys", "list", "--org", "org-a"], &schema, None));
    assert_eq!(table.matches("destroyed").count(), 2, "{table}");

    // The organisation can write again, under a new key; the old data stays gone.
    let id = insert(&client, &t, "org-a", "a three").await;
    let fresh = dek_of(&stored_value(&t, id).await);
    assert!(a_keys.iter().all(|(d, _, _)| *d != fresh));
    let value: String = client
        .query_one(&format!("SELECT value FROM {t} WHERE id = $1"), &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(value, "a three");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrap_to_a_second_kek_then_remove_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let (kek1, kek2) = (dir.path().join("kek1"), dir.path().join("kek2"));
    let v = Vault::with(|o| o.kek_path = Some(kek1.clone())).await;
    let (t, schema) = (v.table.clone(), v.proxy.key_schema.clone());
    let client = v.client().await;
    let mut expected = Vec::new();
    for (org, value) in [("acme", "a1"), ("globex", "g1"), ("initech", "i1")] {
        expected.push((insert(&client, &t, org, value).await, value.to_owned()));
    }
    ok(&cli_async(
        strings(&["keys", "rotate", "--org", "acme"]),
        schema.clone(),
        Some(kek1.clone()),
    )
    .await);
    let acme2 = active_dek(&schema, "acme").await.unwrap();
    until_writes_use(&client, &t, "acme", acme2, Duration::from_secs(5)).await;
    expected.push((insert(&client, &t, "acme", "a2").await, "a2".to_owned()));
    // The proxy makes acme's search key (under the first KEK).
    let acme = OrgId::new("acme").unwrap();
    let search = v
        .proxy
        .engine
        .clone()
        .unwrap()
        .keys()
        .search_key(&acme)
        .await
        .unwrap();
    let before = v.stored().await;

    let out = ok(&cli_async(
        vec![
            "keys".into(),
            "rewrap".into(),
            "--to-kms".into(),
            format!("local:{}", kek2.display()),
            "--batch".into(),
            "2".into(),
            "--reason".into(),
            "KEK migration".into(),
        ],
        schema.clone(),
        Some(kek1.clone()),
    )
    .await);
    assert!(
        out.contains("re-wrapped 4 data key(s) and 1 search key(s)"),
        "{out}"
    );
    assert_eq!(v.stored().await, before, "rewrap must not touch data rows");
    let kek2_id = LocalKek::open_or_create(&kek2).unwrap().kek_id();
    let keks: Vec<String> = direct()
        .await
        .query(&format!("SELECT DISTINCT kek FROM {schema}.data_keys"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(keks, std::slice::from_ref(&kek2_id));
    let search_kek: String = direct()
        .await
        .query_one(&format!("SELECT kek FROM {schema}.search_keys"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(search_kek, kek2_id);
    // A rerun finds nothing left to do.
    let again = ok(&cli_async(
        vec![
            "keys".into(),
            "rewrap".into(),
            "--to-kms".into(),
            format!("local:{}", kek2.display()),
        ],
        schema.clone(),
        Some(kek1.clone()),
    )
    .await);
    assert!(
        again.contains("re-wrapped 0 data key(s) and 0 search key(s)")
            && again.contains("5 already"),
        "{again}"
    );

    // The first KEK is gone; a proxy with only the second reads everything and writes.
    std::fs::remove_file(&kek1).unwrap();
    let mut opts = ProxyOptions::encrypting(&vault_rules(&t));
    opts.key_schema = schema.clone();
    opts.kek_path = Some(kek2.clone());
    let fresh = TestProxy::with(opts);
    let c2 = connect(&fresh.pg_config("postgres", None, "test"))
        .await
        .unwrap();
    for (id, value) in &expected {
        let got: String = c2
            .query_one(&format!("SELECT value FROM {t} WHERE id = $1"), &[id])
            .await
            .unwrap()
            .get(0);
        assert_eq!(&got, value);
    }
    let id = insert(&c2, &t, "globex", "g2").await;
    let got: String = c2
        .query_one(&format!("SELECT value FROM {t} WHERE id = $1"), &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(got, "g2");
    // The search key is the same key, now unwrapped by the second KEK.
    let moved = fresh
        .engine
        .clone()
        .unwrap()
        .keys()
        .search_key(&acme)
        .await
        .unwrap();
    assert_eq!(moved.dek_id(), search.dek_id());
    assert_eq!(moved.key().expose_secret(), search.key().expose_secret());
    let events = ok(&cli(&["keys", "events", "--json"], &schema, None));
    assert_eq!(
        events.matches("\"event\":\"rewrap\"").count(),
        4,
        "{events}"
    );
    assert_eq!(
        events.matches("\"event\":\"search_key_rewrapped\"").count(),
        1,
        "{events}"
    );
    drop(fresh);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_automatically_after_the_configured_count() {
    let v = Vault::with(|o| {
        o.rotation.max_encryptions = 20;
        o.counter_flush_interval = Duration::from_millis(200);
    })
    .await;
    let (t, schema) = (v.table.clone(), v.proxy.key_schema.clone());
    let client = v.client().await;
    let first = insert(&client, &t, "acme", "first").await;
    let v1 = dek_of(&stored_value(&t, first).await);
    for i in 0..25 {
        insert(&client, &t, "acme", &format!("value {i}")).await;
    }
    let started = Instant::now();
    let v2 = loop {
        match active_dek(&schema, "acme").await {
            Some(d) if d != v1 => break d,
            _ => {}
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no automatic rotation"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    until_writes_use(&client, &t, "acme", v2, Duration::from_secs(5)).await;
    let events = ok(&cli(
        &["keys", "events", "--org", "acme", "--json"],
        &schema,
        None,
    ));
    let rotate = events
        .lines()
        .find(|l| l.contains("\"event\":\"rotate\""))
        .unwrap_or_else(|| panic!("{events}"));
    assert!(rotate.contains("\"reason\":\"automatic: "), "{rotate}");
    assert!(rotate.contains("\"actor\":\"pgenvelope\""), "{rotate}");
    // Exactly one rotation although the flusher kept checking.
    assert_eq!(deks(&schema, "acme").await.len(), 2);
    // Old values still read.
    let n: i64 = client
        .query_one(&format!("SELECT count(value) FROM {t}"), &[])
        .await
        .unwrap()
        .get(0);
    assert!(n >= 26);
    let value: String = client
        .query_one(&format!("SELECT value FROM {t} WHERE id = $1"), &[&first])
        .await
        .unwrap()
        .get(0);
    assert_eq!(value, "first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_reconnects_and_still_sees_rotations() {
    let dir = tempfile::tempdir().unwrap();
    let kek = dir.path().join("kek");
    let v = Vault::with(|o| o.kek_path = Some(kek.clone())).await;
    let (t, schema) = (v.table.clone(), v.proxy.key_schema.clone());
    let client = v.client().await;
    let engine = v.proxy.engine.clone().unwrap();
    let started = Instant::now();
    while engine.key_listener_ready() != Some(true) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "listener never ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    insert(&client, &t, "acme", "before").await;

    // Kill this proxy's listening backend.
    let admin = direct().await;
    let killed: i64 = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = $1",
            &[&format!("pgenvelope-listen {schema}")],
        )
        .await
        .unwrap()
        .get(0);
    assert!(killed >= 1);
    let started = Instant::now();
    while engine.key_listener_ready() == Some(true) {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "loss not noticed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    while engine.key_listener_ready() != Some(true) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "listener did not come back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ok(&cli_async(
        strings(&["keys", "rotate", "--org", "acme"]),
        schema.clone(),
        Some(kek.clone()),
    )
    .await);
    let new = active_dek(&schema, "acme").await.unwrap();
    until_writes_use(&client, &t, "acme", new, Duration::from_secs(5)).await;
    let metrics = pgenvelope::admin::metrics(&v.proxy.handle);
    assert!(
        metrics.contains("pgenvelope_key_listener_up 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pgenvelope_key_changes_total{kind=\"rotate\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shredded_values_read_as_null_with_the_null_policy() {
    use futures_util::TryStreamExt;

    let dir = tempfile::tempdir().unwrap();
    let kek = dir.path().join("kek");
    let v = Vault::with(|o| {
        o.kek_path = Some(kek.clone());
        o.shredded_reads = pgenvelope::proxy::ShreddedReads::Null;
    })
    .await;
    let (t, schema) = (v.table.clone(), v.proxy.key_schema.clone());
    let client = v.client().await;
    let a = insert(&client, &t, "org-a", "a secret").await;
    insert(&client, &t, "org-b", "b secret").await;
    let a_stored = stored_value(&t, a).await;
    ok(&cli_async(
        strings(&["keys", "shred", "--org", "org-a", "--yes"]),
        schema.clone(),
        Some(kek.clone()),
    )
    .await);

    let started = Instant::now();
    let rows = loop {
        let rows: Vec<(String, Option<String>)> = client
            .query(&format!("SELECT org_id, value FROM {t} ORDER BY id"), &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        if rows[0].1.is_none() {
            break rows;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "shred not seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        rows,
        [
            ("org-a".to_owned(), None),
            ("org-b".to_owned(), Some("b secret".to_owned()))
        ]
    );
    let out: Vec<bytes::Bytes> = client
        .copy_out(&format!("COPY {t} (org_id, value) TO STDOUT"))
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8(out.concat()).unwrap(),
        "org-a\t\\N\norg-b\tb secret\n"
    );
    // Writing a shredded value back (a restore) is refused, not stored as if plaintext.
    let err = client
        .execute(
            &format!("INSERT INTO {t} (org_id, value) VALUES ('org-a', $1)"),
            &[&a_stored],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("XX001"), "{err:?}");
    let metrics = pgenvelope::admin::metrics(&v.proxy.handle);
    assert!(
        metrics.contains("pgenvelope_decrypt_failures_total{reason=\"shredded\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrap_without_the_wrapping_kek_changes_nothing_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let (kek1, other, kek2) = (
        dir.path().join("kek1"),
        dir.path().join("other"),
        dir.path().join("kek2"),
    );
    let v = Vault::with(|o| o.kek_path = Some(kek1.clone())).await;
    let (t, schema) = (v.table.clone(), v.proxy.key_schema.clone());
    insert(&v.client().await, &t, "acme", "secret").await;
    let before = deks(&schema, "acme").await;
    let out = cli_async(
        vec![
            "keys".into(),
            "rewrap".into(),
            "--to-kms".into(),
            format!("local:{}", kek2.display()),
        ],
        schema.clone(),
        Some(other.clone()),
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("re-wrapped 0 data key(s)"), "{stdout}");
    assert!(
        stdout.contains("not re-wrapped") && stdout.contains("was not given"),
        "{stdout}"
    );
    assert_eq!(deks(&schema, "acme").await, before);
}

/// (key_id, state, wrapped) of every search key of `org`, by version.
async fn search_keys(schema: &str, org: &str) -> Vec<(Uuid, String, Option<Vec<u8>>)> {
    direct()
        .await
        .query(
            &format!(
                "SELECT key_id, state, wrapped FROM {schema}.search_keys WHERE org_id = $1 \
                 ORDER BY version"
            ),
            &[&org],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// Wait until the proxy's cached `key` is no longer fresh (revoked by a notification).
async fn until_stale(keys: &pgenvelope::keys::KeyManager, key: &pgenvelope::keys::CachedDek) {
    let started = Instant::now();
    while keys.still_fresh(key) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the proxy still holds the old search key"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `keys rotate --search-key`, `keys list`, `keys events` and `keys shred` through the binary
/// handle search keys; a serving proxy drops its cached search key when told, and its DEK is
/// not touched by a search-key rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_keys_rotate_list_and_shred_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let kek = dir.path().join("kek");
    let v = Vault::with(|o| o.kek_path = Some(kek.clone())).await;
    let (t, schema) = (v.table.clone(), v.proxy.key_schema.clone());
    let client = v.client().await;
    let row = insert(&client, &t, "acme", "secret").await;
    let dek = active_dek(&schema, "acme").await.unwrap();
    let engine = v.proxy.engine.clone().unwrap();
    let started = Instant::now();
    while engine.key_listener_ready() != Some(true) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "listener never ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let keys = engine.keys();
    let acme = OrgId::new("acme").unwrap();
    let v1 = keys.search_key(&acme).await.unwrap();
    assert_eq!(v1.version(), 1);

    let help = std::process::Command::new(env!("CARGO_BIN_EXE_pgenvelope"))
        .args(["keys", "rotate", "--help"])
        .output()
        .unwrap();
    let help = ok(&help);
    assert!(
        help.contains("--search-key") && help.contains("pgenvelope reencrypt"),
        "{help}"
    );

    let out = ok(&cli_async(
        strings(&[
            "keys",
            "rotate",
            "--org",
            "acme",
            "--search-key",
            "--reason",
            "yearly",
        ]),
        schema.clone(),
        Some(kek.clone()),
    )
    .await);
    assert!(
        out.contains("search key version 2") && out.contains("now retired"),
        "{out}"
    );
    until_stale(keys, &v1).await;
    let v2 = keys.search_key(&acme).await.unwrap();
    assert_eq!(v2.version(), 2);
    assert!(out.contains(&v2.dek_id().to_string()), "{out}");
    let stored: Vec<(Uuid, String)> = search_keys(&schema, "acme")
        .await
        .into_iter()
        .map(|(id, state, _)| (id, state))
        .collect();
    assert_eq!(
        stored,
        [
            (v1.dek_id().0, "retired".to_owned()),
            (v2.dek_id().0, "active".to_owned())
        ]
    );
    // The data key is not rotated: the same DEK encrypts and the old row reads.
    assert_eq!(deks(&schema, "acme").await.len(), 1);
    let again = insert(&client, &t, "acme", "after").await;
    assert_eq!(dek_of(&stored_value(&t, again).await), dek);
    let value: String = client
        .query_one(&format!("SELECT value FROM {t} WHERE id = $1"), &[&row])
        .await
        .unwrap()
        .get(0);
    assert_eq!(value, "secret");

    let listed = ok(&cli(
        &["keys", "list", "--org", "acme", "--json"],
        &schema,
        None,
    ));
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 3, "{listed}");
    assert!(
        lines[0].contains("\"kind\":\"dek\"") && lines[0].contains(&dek.to_string()),
        "{listed}"
    );
    for (line, (id, state)) in lines[1..]
        .iter()
        .zip([(v1.dek_id(), "retired"), (v2.dek_id(), "active")])
    {
        assert!(line.contains("\"kind\":\"search\""), "{line}");
        assert!(line.contains(&format!("\"key\":\"{id}\"")), "{line}");
        assert!(line.contains(&format!("\"state\":\"{state}\"")), "{line}");
    }
    let table = ok(&cli(&["keys", "list", "--org", "acme"], &schema, None));
    assert!(table.starts_with("ORGANISATION"), "{table}");
    let kinds: Vec<&str> = table
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(kinds, ["dek", "search", "search"], "{table}");

    // First use (`search_key_created`, by the proxy) and the rotation are in the trail.
    let events = ok(&cli(
        &["keys", "events", "--org", "acme", "--json"],
        &schema,
        None,
    ));
    let created = events
        .lines()
        .find(|l| l.contains("\"event\":\"search_key_created\""))
        .unwrap_or_else(|| panic!("{events}"));
    assert!(created.contains(&v1.dek_id().to_string()), "{created}");
    assert!(created.contains("\"actor\":\"pgenvelope\""), "{created}");
    let rotated = events
        .lines()
        .find(|l| l.contains("\"event\":\"search_key_rotated\""))
        .unwrap_or_else(|| panic!("{events}"));
    assert!(rotated.contains("\"reason\":\"yearly\""), "{rotated}");
    assert!(rotated.contains("\"actor\":\"cli:"), "{rotated}");
    assert!(rotated.contains(&v2.dek_id().to_string()), "{rotated}");
    let table = ok(&cli(&["keys", "events", "--org", "acme"], &schema, None));
    assert!(table.contains("search_key_rotated"), "{table}");

    let out = ok(&cli_async(
        strings(&["keys", "shred", "--org", "acme", "--yes"]),
        schema.clone(),
        Some(kek.clone()),
    )
    .await);
    assert!(
        out.contains("1 data key(s) destroyed") && out.contains("2 search key(s) destroyed"),
        "{out}"
    );
    until_stale(keys, &v2).await;
    assert!(search_keys(&schema, "acme")
        .await
        .iter()
        .all(|(_, state, wrapped)| state == "destroyed" && wrapped.is_none()));
    let events = ok(&cli(
        &["keys", "events", "--org", "acme", "--json"],
        &schema,
        None,
    ));
    let destroyed = events
        .lines()
        .filter(|l| l.contains("\"event\":\"search_key_destroyed\""))
        .count();
    assert_eq!(destroyed, 2, "{events}");
    // As with its DEK, the organisation gets a new search key on next use, never an old one.
    let v3 = keys.search_key(&acme).await.unwrap();
    assert!(![v1.dek_id(), v2.dek_id()].contains(&v3.dek_id()));
    assert_eq!(v3.version(), 3);
}
