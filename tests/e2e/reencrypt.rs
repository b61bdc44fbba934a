//! `pgenvelope reencrypt` end to end: the real binary against the shared PostgreSQL, next to
//! an encrypting proxy on the same key store, KEK and rules.

use crate::support::output_text;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use pgenvelope::crypto::{DekId, EncV1};
use sha2::{Digest, Sha256};

use crate::support::harness::direct;
use crate::support::harness::{connect, main_pg, unique, ProxyOptions, TempDatabase, TestProxy};

/// An encrypting proxy plus the files the CLI needs to work on the same key store.
struct Setup {
    proxy: TestProxy,
    /// Database of the tables (the key store is in `test`).
    database: String,
    tables: Vec<String>,
    rules: PathBuf,
    kek: PathBuf,
    _dir: tempfile::TempDir,
}

impl Setup {
    /// Tables are created by `ddl` (one statement per table, `{t}` is its name); `rules`
    /// receives the table names and returns the rule file.
    async fn new(ddl: &[&str], rules: impl FnOnce(&[String]) -> String) -> Self {
        Self::in_database("test", ddl, rules).await
    }

    /// [`Setup::new`] with the tables in `database`; the key store stays in `test`.
    async fn in_database(
        database: &str,
        ddl: &[&str],
        rules: impl FnOnce(&[String]) -> String,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (host, port) = main_pg();
        let db = connect(&format!(
            "host={host} port={port} user=postgres dbname={database}"
        ))
        .await
        .unwrap();
        let mut tables = Vec::new();
        for statement in ddl {
            let t = unique("reenc");
            db.batch_execute(&statement.replace("{t}", &t))
                .await
                .unwrap();
            tables.push(t);
        }
        let text = rules(&tables);
        let path = dir.path().join("rules.toml");
        std::fs::write(&path, &text).unwrap();
        let kek = dir.path().join("kek");
        let mut opts = ProxyOptions::encrypting(&text);
        opts.kek_path = Some(kek.clone());
        let proxy = TestProxy::with(opts);
        Setup {
            proxy,
            database: database.to_owned(),
            tables,
            rules: path,
            kek,
            _dir: dir,
        }
    }

    /// A client of the proxy, in the database of the tables.
    async fn client(&self) -> tokio_postgres::Client {
        connect(&self.proxy.pg_config("postgres", None, &self.database))
            .await
            .unwrap()
    }

    /// The binary with the key store flags of this proxy.
    fn command(&self, args: &[&str]) -> Command {
        self.command_with_upstream("test", args)
    }

    /// [`Setup::command`] with `--upstream` naming `database` instead of the key store's.
    fn command_with_upstream(&self, database: &str, args: &[&str]) -> Command {
        let (host, port) = main_pg();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgenvelope"));
        cmd.args(args)
            .arg("--upstream")
            .arg(format!("postgres://postgres@{host}:{port}/{database}"))
            .args(["--key-schema", &self.proxy.key_schema])
            .arg("--kms")
            .arg(format!("local:{}", self.kek.display()))
            .env_remove("PGENVELOPE_CONFIG")
            .env_remove("PGENVELOPE_DATA_DATABASE")
            .stdin(Stdio::null());
        cmd
    }

    fn reencrypt(&self, extra: &[&str]) -> Output {
        let mut args = vec!["reencrypt", "--rules"];
        let rules = self.rules.display().to_string();
        args.push(&rules);
        args.extend_from_slice(extra);
        self.command(&args).output().unwrap()
    }

    fn keys(&self, args: &[&str]) {
        let out = self.command(&[&["keys"], args].concat()).output().unwrap();
        assert!(out.status.success(), "keys {args:?}: {}", output_text(&out));
    }

    /// `org` -> its active DEK, straight from the key store.
    async fn active_deks(&self) -> HashMap<String, DekId> {
        direct()
            .await
            .query(
                &format!(
                    "SELECT org_id, dek_id FROM {}.data_keys WHERE state = 'active'",
                    self.proxy.key_schema
                ),
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), DekId(r.get(1))))
            .collect()
    }

    async fn dek_states(&self) -> HashMap<DekId, (String, i32, String)> {
        direct()
            .await
            .query(
                &format!(
                    "SELECT dek_id, org_id, version, state FROM {}.data_keys",
                    self.proxy.key_schema
                ),
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (DekId(r.get(0)), (r.get(1), r.get(2), r.get(3))))
            .collect()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let (host, port) = main_pg();
        for t in &self.tables {
            let _ = Command::new("psql")
                .args(["-X", "-q", "-h", &host, "-p", &port.to_string()])
                .args(["-U", "postgres", "-d", &self.database, "-c"])
                .arg(format!("DROP TABLE IF EXISTS {t}"))
                .output();
        }
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// SHA-256 over `id:org:value` of every row, read (and decrypted) through the proxy.
async fn checksum(client: &tokio_postgres::Client, table: &str) -> (usize, String) {
    let rows = client
        .query(
            &format!("SELECT id, org_id, value FROM {table} ORDER BY id"),
            &[],
        )
        .await
        .unwrap();
    let mut hash = Sha256::new();
    for r in &rows {
        let (id, org, value): (i64, String, Option<String>) = (r.get(0), r.get(1), r.get(2));
        hash.update(format!("{id}:{org}:{value:?}\n"));
    }
    let digest: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    (rows.len(), digest)
}

/// Raw stored `(id, org, value)` straight from PostgreSQL.
async fn stored(table: &str) -> Vec<(i64, String, Option<String>)> {
    stored_in(&direct().await, table).await
}

/// [`stored`] over a direct connection to the table's database.
async fn stored_in(
    client: &tokio_postgres::Client,
    table: &str,
) -> Vec<(i64, String, Option<String>)> {
    client
        .query(
            &format!("SELECT id, org_id, value FROM {table} ORDER BY id"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// COPY rows through the proxy: ids `from..to`, organisation `org{id % 3}`, value `prefix{id}`.
async fn copy_through_proxy(
    client: &tokio_postgres::Client,
    table: &str,
    ids: std::ops::Range<i64>,
    prefix: &str,
) {
    let sink = client
        .copy_in(&format!("COPY {table} (id, org_id, value) FROM STDIN"))
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    let mut data = String::new();
    for id in ids.clone() {
        data.push_str(&format!("{id}\torg{}\t{prefix}{id}\n", id % 3));
    }
    sink.send(bytes::Bytes::from(data)).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), ids.end.abs_diff(ids.start));
}

/// The `N conflict(s) retried` count of a one-table report.
fn conflicts_in(report: &str) -> u64 {
    let Some(end) = report.find(" conflict(s) retried") else {
        return 0;
    };
    let start = report[..end].rfind(' ').map_or(0, |i| i + 1);
    report[start..end].parse().unwrap_or(0)
}

fn one_table_rules(tables: &[String]) -> String {
    format!(
        "[[table]]\nname = \"public.{}\"\ntenant_column = \"org_id\"\nencrypt = [\"value\"]\n",
        tables[0]
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_rows_killed_halfway_resume_and_keep_every_value() {
    let s = Setup::new(
        &["CREATE TABLE {t} (id bigint PRIMARY KEY, org_id text NOT NULL, value text)"],
        one_table_rules,
    )
    .await;
    let t = s.tables[0].clone();
    let client = s.client().await;

    // 40k plaintext rows written before adoption (straight into PostgreSQL), some NULL.
    direct()
        .await
        .batch_execute(&format!(
            "INSERT INTO {t} SELECT g, 'org' || (g % 3), \
             CASE WHEN g % 97 = 0 THEN NULL ELSE 'plain' || g END \
             FROM generate_series(0, 39999) g"
        ))
        .await
        .unwrap();
    // 30k under the organisations' first DEKs, then a rotation, then 30k more.
    copy_through_proxy(&client, &t, 40_000..70_000, "old").await;
    let first = s.active_deks().await;
    assert_eq!(first.len(), 3);
    for org in ["org0", "org1", "org2"] {
        s.keys(&["rotate", "--org", org, "--reason", "reencrypt test"]);
    }
    copy_through_proxy(&client, &t, 70_000..100_000, "new").await;
    let active = s.active_deks().await;
    for (org, dek) in &active {
        assert_ne!(first[org], *dek, "{org} was not rotated");
    }
    let before = checksum(&client, &t).await;
    assert_eq!(before.0, 100_000);

    // First run, killed once the checkpoint shows progress.
    let mut child = s
        .command(&[
            "reencrypt",
            "--batch",
            "200",
            "--rules",
            &s.rules.display().to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let db = direct().await;
    let progress_sql = format!(
        "SELECT coalesce(max(rows_done), 0)::bigint FROM {}.reencrypt_progress",
        s.proxy.key_schema
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before it could be killed"
        );
        let done: i64 = match db.query_one(&progress_sql, &[]).await {
            Ok(row) => row.get(0),
            Err(_) => 0, // the table is created by the run itself
        };
        if done >= 40_000 {
            break;
        }
        assert!(Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let done: i64 = db.query_one(&progress_sql, &[]).await.unwrap().get(0);
    assert!((40_000..100_000).contains(&done), "checkpoint at {done}");
    // Killed half-way: some values are still under a retired DEK, and everything reads back
    // the same.
    let retired: Vec<DekId> = first.values().copied().collect();
    let under_retired = stored(&t)
        .await
        .iter()
        .filter_map(|(_, _, v)| v.as_deref())
        .filter(|v| EncV1::parse(v.as_bytes()).is_ok_and(|e| retired.contains(&e.dek_id())))
        .count();
    assert!(under_retired > 0, "nothing left for the second run");
    assert_eq!(checksum(&client, &t).await, before);

    // Second run resumes and finishes.
    let out = s.reencrypt(&["--batch", "500"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let report = stdout(&out);
    assert!(
        report.contains(&format!("(resumed after {done} row(s))")),
        "{report}"
    );
    assert!(
        report.contains("no value remains under retired DEK"),
        "{report}"
    );
    let progress_rows: i64 = db
        .query_one(
            &format!(
                "SELECT count(*) FROM {}.reencrypt_progress",
                s.proxy.key_schema
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(progress_rows, 0, "checkpoint left behind");

    // Every value is enc:v1 under the active DEK of its organisation; nothing changed.
    let after = stored(&t).await;
    let mut nulls = 0;
    for (id, org, value) in &after {
        let Some(value) = value else {
            nulls += 1;
            continue;
        };
        let parsed =
            EncV1::parse(value.as_bytes()).unwrap_or_else(|_| panic!("row {id} not enc:v1"));
        assert_eq!(
            parsed.dek_id(),
            active[org],
            "row {id} not under {org}'s active DEK"
        );
    }
    assert_eq!(nulls, (0..40_000).filter(|g| g % 97 == 0).count());
    assert_eq!(checksum(&client, &t).await, before);

    // A third run changes nothing.
    let out = s.reencrypt(&[]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        stdout(&out).contains("0 encrypted from plaintext, 0 moved from retired DEKs"),
        "{}",
        output_text(&out)
    );
    assert_eq!(stored(&t).await, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_through_the_proxy_are_never_overwritten() {
    const ROWS: i64 = 3000;
    let s = Setup::new(
        &["CREATE TABLE {t} (id bigint PRIMARY KEY, org_id text NOT NULL, value text)"],
        one_table_rules,
    )
    .await;
    let t = s.tables[0].clone();
    direct()
        .await
        .batch_execute(&format!(
            "INSERT INTO {t} SELECT g, 'org' || (g % 3), 'plain' || g FROM generate_series(0, {}) g",
            ROWS - 1
        ))
        .await
        .unwrap();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..3_i64 {
        let client = s.client().await;
        let (t, stop) = (t.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let statement = client
                .prepare(&format!(
                    "UPDATE {t} SET value = $1 WHERE org_id = $2 AND id = $3"
                ))
                .await
                .unwrap();
            let mut last: HashMap<i64, String> = HashMap::new();
            let mut n = 0_i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Each writer owns the ids congruent to w mod 3 and sweeps them in order, so
                // its writes keep landing next to the re-encryption cursor.
                let id = (n * 3 + w) % ROWS;
                let value = format!("w{w}-{n}");
                let org = format!("org{}", id % 3);
                let changed = client
                    .execute(&statement, &[&value, &org, &id])
                    .await
                    .unwrap();
                assert_eq!(changed, 1);
                last.insert(id, value);
                n += 7;
            }
            last
        }));
    }
    // Several passes while the writers run (each pass starts over).
    let mut conflicts = 0;
    for _ in 0..3 {
        let out = s.reencrypt(&["--batch", "20", "--restart"]);
        assert!(out.status.success(), "{}", output_text(&out));
        let report = stdout(&out);
        conflicts += conflicts_in(&report);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut expected: HashMap<i64, String> = (0..ROWS).map(|g| (g, format!("plain{g}"))).collect();
    for w in writers {
        expected.extend(w.await.unwrap());
    }
    eprintln!("compare-and-set conflicts retried: {conflicts}");

    let client = s.client().await;
    let rows = client
        .query(&format!("SELECT id, value FROM {t} ORDER BY id"), &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), ROWS as usize);
    for r in &rows {
        let (id, value): (i64, String) = (r.get(0), r.get(1));
        assert_eq!(value, expected[&id], "row {id}: lost update");
    }
    // A last pass with the writers gone leaves nothing in plaintext.
    let out = s.reencrypt(&[]);
    assert!(out.status.success(), "{}", output_text(&out));
    for (id, _, value) in stored(&t).await {
        assert!(
            value.unwrap().starts_with("enc:v1:"),
            "row {id} in plaintext"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_without_primary_key_fails_and_destroyed_keys_are_left_alone() {
    let s = Setup::new(
        &[
            "CREATE TABLE {t} (id bigint, org_id text NOT NULL, value text)",
            "CREATE TABLE {t} (id bigint, org_id text NOT NULL, value text, PRIMARY KEY (org_id, id))",
        ],
        |t| {
            format!(
                "[[table]]\nname = \"{}\"\ntenant_column = \"org_id\"\nencrypt = [\"value\"]\n\
                 [[table]]\nname = \"{}\"\ntenant_column = \"org_id\"\nencrypt = [\"value\"]\n",
                t[0], t[1]
            )
        },
    )
    .await;
    let (nopk, keyed) = (s.tables[0].clone(), s.tables[1].clone());
    let client = s.client().await;
    for org in ["gone", "kept"] {
        for id in 0..5_i64 {
            client
                .execute(
                    &format!("INSERT INTO {keyed} (id, org_id, value) VALUES ($1, $2, $3)"),
                    &[&id, &org, &format!("{org} secret {id}")],
                )
                .await
                .unwrap();
        }
    }
    direct()
        .await
        .batch_execute(&format!(
            "INSERT INTO {nopk} VALUES (1, 'kept', 'zq-nopk'); \
             INSERT INTO {keyed} VALUES (99, 'kept', 'zq-keyed-99')"
        ))
        .await
        .unwrap();
    s.keys(&[
        "shred",
        "--org",
        "gone",
        "--yes",
        "--reason",
        "reencrypt test",
    ]);
    let gone_before: Vec<_> = stored(&keyed)
        .await
        .into_iter()
        .filter(|(_, org, _)| org == "gone")
        .collect();

    let out = s.reencrypt(&[]);
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    let report = stdout(&out);
    assert!(
        report.contains(&format!(
            "public.{nopk}: error: table public.{nopk} has no primary key"
        )),
        "{report}"
    );
    assert!(
        report.contains("left untouched: 5 under a destroyed DEK"),
        "{report}"
    );
    assert!(report.contains("1 encrypted from plaintext"), "{report}");
    for needle in ["secret", "zq-"] {
        assert!(!output_text(&out).contains(needle), "a value was printed");
    }
    // The destroyed organisation's values are exactly as they were; the PK-less table too.
    let gone_after: Vec<_> = stored(&keyed)
        .await
        .into_iter()
        .filter(|(_, org, _)| org == "gone")
        .collect();
    assert_eq!(gone_after, gone_before);
    let untouched: String = direct()
        .await
        .query_one(&format!("SELECT value FROM {nopk}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(untouched, "zq-nopk");
    let kept: String = client
        .query_one(
            &format!("SELECT value FROM {keyed} WHERE org_id = 'kept' AND id = 99"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, "zq-keyed-99");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_retired_destroys_emptied_keys_and_keeps_used_ones() {
    let s = Setup::new(
        &["CREATE TABLE {t} (id bigint PRIMARY KEY, org_id text NOT NULL, value text, note text)"],
        |t| {
            format!(
                "[[table]]\nname = \"{}\"\ntenant_column = \"org_id\"\nencrypt = [\"value\", \"note\"]\n",
                t[0]
            )
        },
    )
    .await;
    let t = s.tables[0].clone();
    let client = s.client().await;
    for (id, org) in [(1_i64, "a"), (2, "a"), (3, "b"), (4, "b")] {
        client
            .execute(
                &format!("INSERT INTO {t} (id, org_id, value) VALUES ($1, $2, $3)"),
                &[&id, &org, &format!("v{id}")],
            )
            .await
            .unwrap();
    }
    let old = s.active_deks().await;
    // A value of b copied into another column: it fails authentication there, so reencrypt
    // cannot move it and b's old DEK stays in use.
    direct()
        .await
        .batch_execute(&format!("UPDATE {t} SET note = value WHERE id = 3"))
        .await
        .unwrap();
    for org in ["a", "b"] {
        s.keys(&["rotate", "--org", org]);
    }

    // Retired just now: proxies may still hold the keys as active, so nothing is destroyed.
    let out = s.reencrypt(&["--destroy-retired", "--reason", "emptied"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let report = stdout(&out);
    assert!(
        report.contains("left untouched: 1 failed authentication"),
        "{report}"
    );
    assert!(
        report.contains(&format!(
            "no value remains under retired DEK {} (org a v1)",
            old["a"]
        )),
        "{report}"
    );
    assert!(
        report.contains(&format!(
            "1 value(s) remain under retired DEK {} (org b v1)",
            old["b"]
        )),
        "{report}"
    );
    assert!(
        report.contains("retired less than --key-cache-ttl"),
        "{report}"
    );
    assert_eq!(s.dek_states().await[&old["a"]].2, "decrypt_only");

    let out = s.reencrypt(&[
        "--destroy-retired",
        "--key-cache-ttl",
        "0s",
        "--reason",
        "emptied",
    ]);
    assert!(out.status.success(), "{}", output_text(&out));
    let report = stdout(&out);
    assert!(
        report.contains(&format!("destroyed retired DEK {}", old["a"])),
        "{report}"
    );
    assert!(
        report.contains(&format!(
            "kept retired DEK {} (org b v1): 1 value(s) remain",
            old["b"]
        )),
        "{report}"
    );
    let states = s.dek_states().await;
    assert_eq!(states[&old["a"]].2, "destroyed");
    assert_eq!(states[&old["b"]].2, "decrypt_only");
    let events: Vec<(String, Option<String>)> = direct()
        .await
        .query(
            &format!(
                "SELECT event, reason FROM {}.key_events WHERE dek_id = $1 ORDER BY id",
                s.proxy.key_schema
            ),
            &[&old["a"].0],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(
        events.contains(&("destroy".to_owned(), Some("emptied".to_owned()))),
        "{events:?}"
    );
    // Everything still reads back through the proxy.
    let rows = client
        .query(&format!("SELECT id, value FROM {t} ORDER BY id"), &[])
        .await
        .unwrap();
    let values: Vec<String> = rows.iter().map(|r| r.get(1)).collect();
    assert_eq!(values, ["v1", "v2", "v3", "v4"]);
}

/// Row binding: `reencrypt` seals plaintext and moved values for their row, and binds values
/// written before `row_key` was added to the rules.
#[tokio::test]
async fn reencrypt_binds_values_to_their_rows() {
    let s = Setup::new(
        &["CREATE TABLE {t} (id bigint PRIMARY KEY, org_id text NOT NULL, value text)"],
        |t| {
            format!(
                "[[table]]\nname = \"{}\"\ntenant_column = \"org_id\"\nrow_key = \"id\"\nencrypt = [\"value\"]\n",
                t[0]
            )
        },
    )
    .await;
    let t = s.tables[0].clone();
    direct()
        .await
        .batch_execute(&format!(
            "INSERT INTO {t} VALUES (1, 'acme', 'one'), (2, 'acme', 'two'), (3, 'globex', 'three')"
        ))
        .await
        .unwrap();
    // Sealed without binding, as by rules without row_key.
    let unbound = s._dir.path().join("unbound.toml");
    std::fs::write(
        &unbound,
        format!("[[table]]\nname = \"{t}\"\ntenant_column = \"org_id\"\nencrypt = [\"value\"]\n"),
    )
    .unwrap();
    let out = s
        .command(&["reencrypt", "--rules", &unbound.display().to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let bound = |rows: &[(i64, String, Option<String>)]| -> Vec<bool> {
        rows.iter()
            .map(|(_, _, v)| {
                EncV1::parse(v.as_deref().unwrap().as_bytes())
                    .unwrap()
                    .is_row_bound()
            })
            .collect()
    };
    assert_eq!(bound(&stored(&t).await), [false, false, false]);
    let client = s.client().await;
    let err = client
        .query(&format!("SELECT id, value FROM {t} ORDER BY id"), &[])
        .await
        .unwrap_err();
    assert_eq!(
        crate::support::harness::code(&err).as_deref(),
        Some("XX001"),
        "{err}"
    );

    // With the row key in the rules they are sealed again, bound to their rows.
    let out = s.reencrypt(&[]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(bound(&stored(&t).await), [true, true, true]);
    let values =
        |rows: Vec<tokio_postgres::Row>| -> Vec<String> { rows.iter().map(|r| r.get(1)).collect() };
    let sql = format!("SELECT id, value FROM {t} ORDER BY id");
    assert_eq!(
        values(client.query(&sql, &[]).await.unwrap()),
        ["one", "two", "three"]
    );

    // After a rotation they move to the new DEK and stay bound.
    s.keys(&["rotate", "--org", "acme"]);
    let out = s.reencrypt(&[]);
    assert!(out.status.success(), "{}", output_text(&out));
    let active = s.active_deks().await;
    let rows = stored(&t).await;
    assert_eq!(bound(&rows), [true, true, true]);
    for (id, org, v) in &rows {
        let dek = EncV1::parse(v.as_deref().unwrap().as_bytes())
            .unwrap()
            .dek_id();
        assert_eq!(dek, active[org], "row {id}");
    }
    assert_eq!(
        values(client.query(&sql, &[]).await.unwrap()),
        ["one", "two", "three"]
    );
}

/// Issue #20 item 9: the application's tables in another database than the key store.
/// `--data-database` names it; the key store stays in the `--upstream` URL's database, where
/// the proxy keeps it, and every DEK is found and created there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reencrypt_works_on_tables_in_another_database_than_the_key_store() {
    let app = TempDatabase::create("reenc_app").await;
    let s = Setup::in_database(
        &app.0,
        &["CREATE TABLE {t} (id bigint PRIMARY KEY, org_id text NOT NULL, value text)"],
        one_table_rules,
    )
    .await;
    let t = s.tables[0].clone();
    let client = s.client().await;
    for (id, org) in [(1_i64, "a"), (2, "a"), (3, "b"), (4, "b")] {
        client
            .execute(
                &format!("INSERT INTO {t} (id, org_id, value) VALUES ($1, $2, $3)"),
                &[&id, &org, &format!("zq-secret-{id}")],
            )
            .await
            .unwrap();
    }
    let data = app.direct().await;
    data.batch_execute(&format!("INSERT INTO {t} VALUES (5, 'b', 'zq-secret-5')"))
        .await
        .unwrap();
    let old = s.active_deks().await;
    assert_eq!(old.len(), 2, "the proxy keeps the keys in the key store");
    s.keys(&["rotate", "--org", "a"]);
    let before = stored_in(&data, &t).await;

    // Without the option the tables are looked for in the key store's database: a clear
    // error naming that database and the option, and nothing changes.
    let out = s.reencrypt(&[]);
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    assert!(
        stdout(&out).contains(&format!(
            "public.{t}: error: table public.{t} does not exist in database test"
        )),
        "{}",
        output_text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("name it with --data-database"),
        "{}",
        output_text(&out)
    );
    assert_eq!(stored_in(&data, &t).await, before);

    // The failure of the issue: --upstream naming the application's database opened a key
    // store there, found none of the proxy's keys and reported every value as under an
    // unknown DEK (and would have sealed the plaintext row with keys no proxy reads). Now it
    // is refused before anything is created or written.
    let rules = s.rules.display().to_string();
    let out = s
        .command_with_upstream(&app.0, &["reencrypt", "--rules", &rules])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "public.{t}.value in database {app} holds encrypted values, but the key store \
             (schema {schema} in database {app}) holds no data keys: they were sealed with \
             another key store; nothing was changed",
            app = app.0,
            schema = s.proxy.key_schema
        )) && stderr.contains("name it with --data-database"),
        "{}",
        output_text(&out)
    );
    assert_eq!(stored_in(&data, &t).await, before);
    let created: bool = data
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&s.proxy.key_schema],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        !created,
        "a key store was created in the application's database"
    );

    // A data database that cannot be reached: an error naming it.
    let missing = format!("{}_missing", app.0);
    let out = s.reencrypt(&["--data-database", &missing]);
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains(&format!("could not connect to database {missing}")),
        "{}",
        output_text(&out)
    );

    // With it: plaintext sealed and a's values moved to its new DEK, both from the key store
    // in `test`; the emptied retired DEK is destroyed there.
    let out = s.reencrypt(&[
        "--data-database",
        &app.0,
        "--destroy-retired",
        "--key-cache-ttl",
        "0s",
    ]);
    assert!(out.status.success(), "{}", output_text(&out));
    let report = stdout(&out);
    assert!(
        report.contains(&format!(
            "tables in database {} (--data-database); key store schema {} in database test",
            app.0, s.proxy.key_schema
        )),
        "{report}"
    );
    assert!(
        report.contains(&format!(
            "public.{t}: 5 row(s) scanned; values: 1 encrypted from plaintext, 2 moved from \
             retired DEKs, 2 unchanged, 0 NULL, 0 left untouched"
        )),
        "{report}"
    );
    assert!(
        report.contains(&format!("destroyed retired DEK {}", old["a"])),
        "{report}"
    );
    assert!(!output_text(&out).contains("zq-"), "a value was printed");
    let active = s.active_deks().await;
    assert_eq!(active.len(), 2);
    assert_ne!(active["a"], old["a"]);
    for (id, org, value) in stored_in(&data, &t).await {
        let value = value.unwrap();
        let dek = EncV1::parse(value.as_bytes()).unwrap().dek_id();
        assert_eq!(dek, active[&org], "row {id}");
    }
    assert_eq!(s.dek_states().await[&old["a"]].2, "destroyed");
    let rows = client
        .query(&format!("SELECT id, value FROM {t} ORDER BY id"), &[])
        .await
        .unwrap();
    let values: Vec<String> = rows.iter().map(|r| r.get(1)).collect();
    assert_eq!(
        values,
        [
            "zq-secret-1",
            "zq-secret-2",
            "zq-secret-3",
            "zq-secret-4",
            "zq-secret-5"
        ]
    );

    // A second run, named by the environment this time, finds nothing to do.
    let out = s
        .command(&["reencrypt", "--rules", &s.rules.display().to_string()])
        .env("PGENVELOPE_DATA_DATABASE", &app.0)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        stdout(&out).contains("0 encrypted from plaintext, 0 moved from retired DEKs, 5 unchanged"),
        "{}",
        output_text(&out)
    );

    // A value under a data key the key store does not know (a sealed value with its DEK id
    // replaced) fails the run with an error naming the key store, and is left as it is.
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let sealed = stored_in(&data, &t).await[0].2.clone().unwrap();
    let mut bytes = b64.decode(&sealed["enc:v1:".len()..]).unwrap();
    bytes[1..17].copy_from_slice(DekId::new_random().as_bytes());
    let foreign = format!("enc:v1:{}", b64.encode(&bytes));
    data.execute(&format!("INSERT INTO {t} VALUES (6, 'b', $1)"), &[&foreign])
        .await
        .unwrap();
    let out = s.reencrypt(&["--data-database", &app.0]);
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    assert!(
        stdout(&out).contains("left untouched: 1 under an unknown DEK"),
        "{}",
        output_text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!(
            "error: 1 value(s) are under data keys unknown to the key store schema {} in \
             database test (of --upstream)",
            s.proxy.key_schema
        )),
        "{}",
        output_text(&out)
    );
    assert_eq!(
        stored_in(&data, &t).await[5].2.as_deref(),
        Some(foreign.as_str())
    );
}

/// Searchable columns: `reencrypt` adds search terms to values written before the column
/// became searchable (plaintext and unsearchable ciphertext alike), so look-ups find them, and
/// removes the terms when the column stops being searchable.
#[tokio::test]
async fn reencrypt_adds_and_removes_search_terms() {
    let s = Setup::new(
        &["CREATE TABLE {t} (id bigint PRIMARY KEY, org_id text NOT NULL, value text)"],
        |t| {
            format!(
                "[[table]]\nname = \"{}\"\ntenant_column = \"org_id\"\n\
                 encrypt = [{{ name = \"value\", search = \"equality\" }}]\n",
                t[0]
            )
        },
    )
    .await;
    let t = s.tables[0].clone();
    direct()
        .await
        .batch_execute(&format!(
            "INSERT INTO {t} VALUES (1, 'acme', 'one'), (2, 'acme', 'two'), (3, 'globex', 'one')"
        ))
        .await
        .unwrap();
    // Sealed first by rules without search: no terms.
    let unsearchable = s._dir.path().join("unsearchable.toml");
    std::fs::write(
        &unsearchable,
        format!("[[table]]\nname = \"{t}\"\ntenant_column = \"org_id\"\nencrypt = [\"value\"]\n"),
    )
    .unwrap();
    let plain_rules = unsearchable.display().to_string();
    let out = s
        .command(&["reencrypt", "--rules", &plain_rules])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let searchable = |rows: &[(i64, String, Option<String>)]| -> Vec<bool> {
        rows.iter()
            .map(|(_, _, v)| {
                EncV1::parse(v.as_deref().unwrap().as_bytes())
                    .unwrap()
                    .is_searchable()
            })
            .collect()
    };
    assert_eq!(searchable(&stored(&t).await), [false, false, false]);
    let client = s.client().await;
    client
        .batch_execute("SET pgenvelope.tenant = 'acme'")
        .await
        .unwrap();
    let find = format!("SELECT id FROM {t} WHERE value = 'one'");
    let ids =
        |rows: Vec<tokio_postgres::Row>| -> Vec<i64> { rows.iter().map(|r| r.get(0)).collect() };
    assert_eq!(
        ids(client.query(&find, &[]).await.unwrap()),
        Vec::<i64>::new()
    );

    // With the searchable rules, the terms are added and the look-up finds the value.
    let out = s.reencrypt(&[]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(searchable(&stored(&t).await), [true, true, true]);
    assert_eq!(ids(client.query(&find, &[]).await.unwrap()), [1]);
    // A second run leaves them as they are.
    let before = stored(&t).await;
    let out = s.reencrypt(&[]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(stored(&t).await, before);

    // Back to unsearchable rules: the terms are removed, the values still open.
    let out = s
        .command(&["reencrypt", "--rules", &plain_rules])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(searchable(&stored(&t).await), [false, false, false]);
    let values: Vec<String> = client
        .query(&format!("SELECT value FROM {t} WHERE id = 2"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(values, ["two"]);
}
