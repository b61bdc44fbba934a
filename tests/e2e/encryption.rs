//! The encrypting proxy end to end: every write form stores enc:v1 and reads back as
//! plaintext; fail-closed refusals leave nothing written and the session usable.

use std::time::Duration;

use futures_util::{SinkExt, TryStreamExt};
use tokio_postgres::error::SqlState;

use crate::support::harness::{code, direct};
use crate::support::harness::{connect, unique, ProxyOptions, TestProxy};
use crate::support::vault::Vault;

#[tokio::test]
async fn seed_scenario_insert_and_select_through_the_proxy() {
    let v = Vault::new().await;
    let t = &v.table;
    let client = v.client().await;
    client
        .execute(
            &format!("INSERT INTO {t} (org_id, name, value) VALUES ($1, $2, $3)"),
            &[&"acme", &"stripe_secret", &"sk_live_abc123"],
        )
        .await
        .unwrap();
    client
        .batch_execute(&format!(
            "INSERT INTO {t} (org_id, name, value, note) VALUES ('globex', 'db', 'hunter2', 'ünïcødé ✓')"
        ))
        .await
        .unwrap();
    let rows = client
        .query(
            &format!("SELECT org_id, name, value, note FROM {t} ORDER BY id"),
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, String, String, Option<String>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "acme".into(),
                "stripe_secret".into(),
                "sk_live_abc123".into(),
                None
            ),
            (
                "globex".into(),
                "db".into(),
                "hunter2".into(),
                Some("ünïcødé ✓".into())
            ),
        ]
    );
    v.assert_encrypted_at_rest(&["sk_live_abc123", "hunter2", "ünïcødé"])
        .await;
    // Each organisation has its own DEK.
    let stored = v.stored().await;
    let dek = |s: &str| {
        let parsed = pgenvelope::crypto::EncV1::parse(s.as_bytes()).unwrap();
        parsed.dek_id()
    };
    assert_ne!(
        dek(stored[0].1.as_deref().unwrap()),
        dek(stored[1].1.as_deref().unwrap())
    );
}

#[tokio::test]
async fn every_write_form_round_trips() {
    let v = Vault::new().await;
    let t = &v.table;
    let client = v.client().await;
    // Multi-row VALUES, columns in another order, DEFAULT, NULL, a multi-statement string.
    client
        .batch_execute(&format!(
            "INSERT INTO {t} (value, org_id, name, note) VALUES ('v1', 'o1', 'a', DEFAULT), ('v2', 'o1', 'b', NULL); \
             INSERT INTO {t} (name, org_id, value) VALUES ('c', 'o2', E'it''s\\ttabbed')"
        ))
        .await
        .unwrap();
    // UPDATE with a WHERE on the tenant, RETURNING an encrypted column.
    let row = client
        .query_one(
            &format!("UPDATE {t} SET value = 'v1-updated' WHERE org_id = 'o1' AND name = 'a' RETURNING value"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "v1-updated");
    // UPDATE with a parameter and FROM.
    client
        .execute(
            &format!("UPDATE {t} SET note = $1 FROM (SELECT 1) AS x WHERE {t}.org_id = $2 AND name = 'b'"),
            &[&"note-b", &"o1"],
        )
        .await
        .unwrap();
    // ON CONFLICT DO UPDATE with EXCLUDED and with a literal.
    client
        .batch_execute(&format!("CREATE UNIQUE INDEX ON {t} (org_id, name)"))
        .await
        .unwrap();
    client
        .execute(
            &format!(
                "INSERT INTO {t} (org_id, name, value) VALUES ($1, $2, $3) \
                 ON CONFLICT (org_id, name) DO UPDATE SET value = EXCLUDED.value"
            ),
            &[&"o2", &"c", &"replaced"],
        )
        .await
        .unwrap();
    client
        .batch_execute(&format!(
            "INSERT INTO {t} (org_id, name, value) VALUES ('o2', 'c', 'ignored') \
             ON CONFLICT (org_id, name) DO UPDATE SET note = 'from-conflict'"
        ))
        .await
        .unwrap();
    let rows = client
        .query(
            &format!("SELECT name, value, note FROM {t} ORDER BY name"),
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, Option<String>, Option<String>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        got,
        vec![
            ("a".into(), Some("v1-updated".into()), None),
            ("b".into(), Some("v2".into()), Some("note-b".into())),
            (
                "c".into(),
                Some("replaced".into()),
                Some("from-conflict".into())
            ),
        ]
    );
    v.assert_encrypted_at_rest(&["v1-updated", "note-b", "replaced", "from-conflict"])
        .await;
}

#[tokio::test]
async fn copy_in_text_and_csv_and_copy_out() {
    let v = Vault::new().await;
    let t = &v.table;
    let client = v.client().await;
    let sink = client
        .copy_in(&format!("COPY {t} (org_id, name, value) FROM STDIN"))
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    let mut data = String::new();
    for i in 0..300 {
        data.push_str(&format!("org{}\tn{i}\tsecret\\t{i}\n", i % 3));
    }
    data.push_str("org0\tnull-value\t\\N\n");
    // Split the payload at an awkward place so rows span CopyData messages.
    let (a, b) = data.split_at(1001);
    sink.send(bytes::Bytes::from(a.to_owned())).await.unwrap();
    sink.send(bytes::Bytes::from(b.to_owned())).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 301);

    let sink = client
        .copy_in(&format!(
            "COPY {t} (org_id, name, value, note) FROM STDIN WITH (FORMAT csv)"
        ))
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(
        b"org9,csv,\"comma, and \"\"quote\"\"\",\"multi\nline\"\n",
    ))
    .await
    .unwrap();
    assert_eq!(sink.finish().await.unwrap(), 1);

    v.assert_encrypted_at_rest(&["secret", "comma", "multi"])
        .await;
    let stored = v.stored().await;
    assert_eq!(
        stored.iter().filter(|r| r.1.is_none()).count(),
        1,
        "NULL stays NULL"
    );

    let out: Vec<bytes::Bytes> = client
        .copy_out(&format!(
            "COPY {t} (name, value, note) TO STDOUT WITH (FORMAT csv)"
        ))
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let text = String::from_utf8(out.concat()).unwrap();
    assert!(text.contains("n7,secret\t7,"), "{text}");
    assert!(
        text.contains("csv,\"comma, and \"\"quote\"\"\",\"multi\nline\""),
        "{text}"
    );
    let out: Vec<bytes::Bytes> = client
        .copy_out(&format!(
            "COPY (SELECT value FROM {t} WHERE name = 'n5') TO STDOUT"
        ))
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(out.concat(), b"secret\\t5\n".to_vec());

    // Through a view the analyser cannot see into, COPY output is still decrypted; a
    // COPY in binary format of it passes through as stored (ciphertext, never plaintext).
    let view = format!("{t}_view");
    direct()
        .await
        .batch_execute(&format!(
            "CREATE VIEW {view} AS SELECT name, value FROM {t}"
        ))
        .await
        .unwrap();
    let out: Vec<bytes::Bytes> = client
        .copy_out(&format!(
            "COPY (SELECT value FROM {view} WHERE name = 'n5') TO STDOUT WITH (FORMAT csv)"
        ))
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(out.concat(), b"secret\t5\n".to_vec());
    let rows = client
        .query(&format!("SELECT value FROM {view} WHERE name = 'n5'"), &[])
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, String>(0), "secret\t5");
    let out: Vec<bytes::Bytes> = client
        .copy_out(&format!(
            "COPY (SELECT value FROM {view} WHERE name = 'n5') TO STDOUT BINARY"
        ))
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let raw = out.concat();
    assert!(raw.windows(7).any(|w| w == b"enc:v1:"));
    direct()
        .await
        .batch_execute(&format!("DROP VIEW {view}"))
        .await
        .unwrap();
}

#[tokio::test]
async fn fail_closed_refusals_write_nothing_and_keep_the_session() {
    let v = Vault::new().await;
    let t = &v.table;
    let client = v.client().await;
    client
        .execute(
            &format!("INSERT INTO {t} (org_id, name, value) VALUES ($1, 'x', $2)"),
            &[&"acme", &"s"],
        )
        .await
        .unwrap();
    let refused = [
        format!("INSERT INTO {t} (org_id, name, value) SELECT org_id, name, value FROM {t}"),
        format!("INSERT INTO {t} (org_id, name, value) VALUES ('acme', 'y', upper('plain'))"),
        format!("INSERT INTO {t} (org_id, name, value) VALUES ('acme', 'y', 'a' || 'b')"),
        format!("SELECT * FROM {t} WHERE value = 's'"),
        format!("SELECT * FROM {t} WHERE value LIKE 's%'"),
        format!("SELECT * FROM {t} ORDER BY value"),
        format!("SELECT value, count(*) FROM {t} GROUP BY value"),
        format!("SELECT DISTINCT value FROM {t}"),
        format!("SELECT length(value) FROM {t}"),
        format!("SELECT * FROM {t} WHERE value IN ('a', 'b')"),
        format!("UPDATE {t} SET value = note"),
    ];
    for sql in &refused {
        let err = client.simple_query(sql).await.expect_err(sql);
        assert_eq!(code(&err).as_deref(), Some("0A000"), "{sql}: {err}");
        let msg = err.as_db_error().unwrap().message().to_owned();
        assert!(msg.starts_with("pgenvelope:"), "{msg}");
        assert!(msg.contains(&format!("{t}.")), "names the column: {msg}");
        // Extended protocol too.
        let err = client.query(sql.as_str(), &[]).await.expect_err(sql);
        assert_eq!(code(&err).as_deref(), Some("0A000"), "{sql}: {err}");
        // The session goes on.
        client.simple_query("SELECT 1").await.unwrap();
    }
    // Allowed reads.
    for sql in [
        format!("SELECT count(value) FROM {t}"),
        format!("SELECT * FROM {t} WHERE value IS NOT NULL"),
        format!("SELECT value AS v FROM {t} WHERE org_id = 'acme'"),
    ] {
        client
            .simple_query(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    // Nothing was written by the refused statements.
    assert_eq!(v.stored().await.len(), 1);
    // In a transaction, a refusal aborts it like any error.
    client.batch_execute("BEGIN").await.unwrap();
    client
        .simple_query(&format!(
            "INSERT INTO {t} (org_id, name, value) VALUES ('acme', 'in-tx', 'p')"
        ))
        .await
        .unwrap();
    let _ = client
        .simple_query(&format!("SELECT * FROM {t} ORDER BY value"))
        .await
        .expect_err("refused");
    let err = client.simple_query("SELECT 1").await.expect_err("aborted");
    assert_eq!(err.code(), Some(&SqlState::IN_FAILED_SQL_TRANSACTION));
    client.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(v.stored().await.len(), 1);
}

#[tokio::test]
async fn pipelined_batch_with_a_refusal_in_the_middle_stays_in_sync() {
    let v = Vault::new().await;
    let t = &v.table;
    let client = v.client().await;
    let ins = client
        .prepare(&format!(
            "INSERT INTO {t} (org_id, name, value) VALUES ($1, $2, $3)"
        ))
        .await
        .unwrap();
    let bad = format!("SELECT * FROM {t} WHERE value = $1");
    // Statements already prepared: the three executions go out back to back in one batch.
    let a = client.execute(&ins, &[&"o", &"a", &"1"]);
    let b = client.query(bad.as_str(), &[&"1"]);
    let c = client.execute(&ins, &[&"o", &"c", &"3"]);
    let (a, b, c) = tokio::join!(a, b, c);
    a.unwrap();
    assert_eq!(code(&b.unwrap_err()).as_deref(), Some("0A000"));
    c.unwrap();
    let rows = client
        .query(&format!("SELECT value FROM {t} ORDER BY id"), &[])
        .await
        .unwrap();
    let vals: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(vals, vec!["1".to_owned(), "3".to_owned()]);
    v.assert_encrypted_at_rest(&[]).await;
}

#[tokio::test]
async fn session_tenant_default_tenant_and_missing_tenant() {
    let table = unique("notes");
    direct()
        .await
        .batch_execute(&format!("CREATE TABLE {table} (id serial, body text)"))
        .await
        .unwrap();
    let rules = format!("[[table]]\nname = \"{table}\"\nencrypt = [\"body\"]\n");
    let proxy = TestProxy::with(ProxyOptions::encrypting(&rules));
    let client = connect(&proxy.pg_config("postgres", None, "test"))
        .await
        .unwrap();
    let ins = format!("INSERT INTO {table} (body) VALUES ($1)");
    let err = client.execute(ins.as_str(), &[&"x"]).await.unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("42501"), "{err}");
    client
        .batch_execute("SET pgenvelope.tenant = 'acme'")
        .await
        .unwrap();
    client.execute(ins.as_str(), &[&"for acme"]).await.unwrap();
    // SET LOCAL in a rolled-back transaction does not stick.
    client
        .batch_execute("BEGIN; SET LOCAL pgenvelope.tenant = 'other'; ROLLBACK")
        .await
        .unwrap();
    client
        .batch_execute("BEGIN; SET pgenvelope.tenant = 'rolled'; ROLLBACK")
        .await
        .unwrap();
    client
        .execute(ins.as_str(), &[&"still acme"])
        .await
        .unwrap();
    let rows = client
        .query(&format!("SELECT body FROM {table} ORDER BY id"), &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    // Another organisation's session cannot read acme's values.
    let other = connect(&proxy.pg_config("postgres", None, "test"))
        .await
        .unwrap();
    other
        .batch_execute("SET pgenvelope.tenant = 'globex'")
        .await
        .unwrap();
    let err = other
        .query(&format!("SELECT body FROM {table}"), &[])
        .await
        .unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("42501"), "{err}");
    other.simple_query("SELECT 1").await.unwrap();
    // Startup option sets the tenant too.
    let opt = connect(&format!(
        "{} options='-c pgenvelope.tenant=acme'",
        proxy.pg_config("postgres", None, "test")
    ))
    .await
    .unwrap();
    let n = opt
        .query(&format!("SELECT body FROM {table}"), &[])
        .await
        .unwrap()
        .len();
    assert_eq!(n, 2);
    drop(proxy);
    // --default-tenant
    let mut opts = ProxyOptions::encrypting(&rules);
    opts.default_tenant = Some("fallback".into());
    let proxy = TestProxy::with(opts);
    let client = connect(&proxy.pg_config("postgres", None, "test"))
        .await
        .unwrap();
    client.execute(ins.as_str(), &[&"default"]).await.unwrap();
    direct()
        .await
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

#[tokio::test]
async fn tampering_swaps_and_copies_are_detected_on_read() {
    let v = Vault::new().await;
    let t = &v.table;
    let client = v.client().await;
    for (org, name, value) in [("a", "k1", "alpha"), ("b", "k2", "bravo")] {
        client
            .execute(
                &format!("INSERT INTO {t} (org_id, name, value) VALUES ($1, $2, $3)"),
                &[&org, &name, &value],
            )
            .await
            .unwrap();
    }
    let d = direct().await;
    let read = |sql: String| {
        let client = &client;
        async move { client.query(sql.as_str(), &[]).await }
    };
    // Swap the two organisations' values directly in PostgreSQL.
    d.batch_execute(&format!(
        "UPDATE {t} SET value = CASE name WHEN 'k1' THEN (SELECT value FROM {t} WHERE name = 'k2') \
         ELSE (SELECT value FROM {t} WHERE name = 'k1') END"
    ))
    .await
    .unwrap();
    let err = read(format!("SELECT org_id, value FROM {t}"))
        .await
        .unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("XX001"), "{err}");
    client.simple_query("SELECT 1").await.unwrap();
    // Swap back, then copy a value into the other encrypted column.
    d.batch_execute(&format!(
        "UPDATE {t} SET value = CASE name WHEN 'k1' THEN (SELECT value FROM {t} WHERE name = 'k2') \
         ELSE (SELECT value FROM {t} WHERE name = 'k1') END"
    ))
    .await
    .unwrap();
    assert_eq!(
        read(format!("SELECT org_id, value FROM {t}"))
            .await
            .unwrap()
            .len(),
        2
    );
    d.batch_execute(&format!("UPDATE {t} SET note = value WHERE name = 'k1'"))
        .await
        .unwrap();
    let err = read(format!("SELECT note FROM {t} WHERE org_id = 'a'"))
        .await
        .unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("XX001"), "{err}");
    d.batch_execute(&format!("UPDATE {t} SET note = NULL"))
        .await
        .unwrap();
    // Flip one character of the ciphertext.
    d.batch_execute(&format!(
        "UPDATE {t} SET value = overlay(value placing (CASE substr(value, 20, 1) WHEN 'A' THEN 'B' ELSE 'A' END) from 20 for 1) WHERE name = 'k2'"
    ))
    .await
    .unwrap();
    let err = client
        .simple_query(&format!("SELECT value FROM {t} WHERE name = 'k2'"))
        .await
        .unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("XX001"), "{err}");
    // The untouched row still reads, on the same connection.
    let rows = read(format!("SELECT value FROM {t} WHERE name = 'k1'"))
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, String>(0), "alpha");
    // Plaintext left in an encrypted column passes through (migration) ...
    d.batch_execute(&format!(
        "UPDATE {t} SET value = 'legacy' WHERE name = 'k2'"
    ))
    .await
    .unwrap();
    let rows = read(format!("SELECT value FROM {t} WHERE name = 'k2'"))
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, String>(0), "legacy");
    let engine = v.proxy.engine.as_ref().unwrap();
    assert!(
        engine
            .cipher_metrics()
            .plaintext_reads
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
}

#[tokio::test]
async fn strict_reads_refuse_plaintext() {
    let v = Vault::with(|o| o.strict_reads = true).await;
    let t = &v.table;
    direct()
        .await
        .batch_execute(&format!(
            "INSERT INTO {t} (org_id, name, value) VALUES ('a', 'k', 'legacy')"
        ))
        .await
        .unwrap();
    let client = v.client().await;
    let err = client
        .query(&format!("SELECT value FROM {t}"), &[])
        .await
        .unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("XX001"));
    tokio::time::timeout(Duration::from_secs(5), client.simple_query("SELECT 1"))
        .await
        .unwrap()
        .unwrap();
    // Strict reads concern reads: writing plaintext values (here by COPY) encrypts them.
    let sink = client
        .copy_in(&format!("COPY {t} (org_id, name, value) FROM STDIN"))
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"a\tcopied\tfresh\n"))
        .await
        .unwrap();
    assert_eq!(sink.finish().await.unwrap(), 1);
    let engine = v.proxy.engine.as_ref().unwrap();
    assert_eq!(
        engine
            .cipher_metrics()
            .plaintext_reads
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "writes are not counted as plaintext reads"
    );
}

#[test]
fn psycopg_and_psql_through_the_encrypting_proxy() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let v = rt.block_on(Vault::new());
    let t = v.table.clone();
    let url = v.proxy.url("postgres", None, "test");
    let with_python = crate::support::require_tool(
        crate::support::ClientScript::PsycopgSmoke.available(),
        "psycopg",
    );
    if with_python {
        let out = std::process::Command::new(crate::support::binaries::python().unwrap())
            .arg(crate::support::binaries::client_script(
                "psycopg_encrypted.py",
            ))
            .env("DATABASE_URL", &url)
            .env("TABLE", &t)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.trim_end().ends_with("ok"),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // psql: simple protocol, \copy, and output identical in shape to a plain table.
    let printed = crate::clients::psql_ok(
        v.proxy.port(),
        "test",
        &[
            "-At",
            "-c",
            &format!("INSERT INTO {t} (org_id, name, value) VALUES ('psql', 'p1', 'from psql')"),
            "-c",
            &format!("SELECT value FROM {t} WHERE name = 'p1'"),
        ],
    );
    assert!(printed.contains("from psql"), "{printed}");
    rt.block_on(v.assert_encrypted_at_rest(&[
        "psycopg-secret",
        "prepared-secret",
        "many-",
        "copied-",
        "from psql",
    ]));
    let n = rt.block_on(v.stored()).len();
    assert_eq!(n, if with_python { 28 } else { 1 }, "rows written");
}

#[test]
fn extended_protocol_without_describe_and_pipelined_refusal() {
    use crate::support::raw::{data_row, error_field, RawConn};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let v = rt.block_on(Vault::new());
    let t = &v.table;
    let (mut conn, _) = RawConn::connect(
        v.proxy.port(),
        &[("user", b"postgres"), ("database", b"test")],
    )
    .unwrap();
    let parse = |name: &str, sql: &str| {
        let mut b = name.as_bytes().to_vec();
        b.push(0);
        b.extend_from_slice(sql.as_bytes());
        b.push(0);
        b.extend_from_slice(&0i16.to_be_bytes());
        b
    };
    let bind = |stmt: &str, params: &[&str]| {
        let mut b = vec![0];
        b.extend_from_slice(stmt.as_bytes());
        b.push(0);
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&(params.len() as i16).to_be_bytes());
        for p in params {
            b.extend_from_slice(&(p.len() as i32).to_be_bytes());
            b.extend_from_slice(p.as_bytes());
        }
        b.extend_from_slice(&0i16.to_be_bytes());
        b
    };
    let execute = || {
        let mut b = vec![0];
        b.extend_from_slice(&0i32.to_be_bytes());
        b
    };
    // One batch, one Sync: insert, a refused comparison, another insert (skipped by the
    // server after the error), then Sync.
    let ins = format!("INSERT INTO {t} (org_id, name, value) VALUES ($1, $2, $3)");
    conn.send(b'P', &parse("ins", &ins)).unwrap();
    conn.send(b'B', &bind("ins", &["o", "r1", "raw-secret"]))
        .unwrap();
    conn.send(b'E', &execute()).unwrap();
    conn.send(
        b'P',
        &parse("", &format!("SELECT name FROM {t} WHERE value = $1")),
    )
    .unwrap();
    conn.send(b'B', &bind("", &["raw-secret"])).unwrap();
    conn.send(b'E', &execute()).unwrap();
    conn.send(b'B', &bind("ins", &["o", "r2", "never"]))
        .unwrap();
    conn.send(b'E', &execute()).unwrap();
    conn.send(b'S', &[]).unwrap();
    let reply = conn.read_until_ready().unwrap();
    let tags: Vec<u8> = reply.iter().map(|(t, _)| *t).collect();
    assert_eq!(
        tags,
        b"12CEZ".to_vec(),
        "ParseComplete, BindComplete, CommandComplete, Error, Ready"
    );
    assert_eq!(error_field(&reply[3].1, b'C').as_deref(), Some("0A000"));
    // The implicit transaction of the batch was rolled back by the error, like any error.
    // Now a read with no Describe at all: the proxy injects one and hides its answer.
    conn.send(b'B', &bind("ins", &["o", "r3", "raw-secret-3"]))
        .unwrap();
    conn.send(b'E', &execute()).unwrap();
    conn.send(
        b'P',
        &parse("sel", &format!("SELECT name, value FROM {t} ORDER BY id")),
    )
    .unwrap();
    conn.send(b'B', &bind("sel", &[])).unwrap();
    conn.send(b'E', &execute()).unwrap();
    conn.send(b'S', &[]).unwrap();
    let reply = conn.read_until_ready().unwrap();
    let tags: Vec<u8> = reply.iter().map(|(t, _)| *t).collect();
    assert_eq!(
        tags,
        b"2C12DCZ".to_vec(),
        "no RowDescription reaches a client that did not ask"
    );
    let row = data_row(&reply[4].1);
    assert_eq!(row[0].as_deref(), Some(&b"r3"[..]));
    assert_eq!(row[1].as_deref(), Some(&b"raw-secret-3"[..]));
    // A refusal followed by Flush (no Sync): the error still arrives.
    conn.send(
        b'P',
        &parse("", &format!("SELECT name FROM {t} ORDER BY value")),
    )
    .unwrap();
    conn.send(b'B', &bind("", &[])).unwrap();
    conn.send(b'E', &execute()).unwrap();
    conn.send(b'H', &[]).unwrap();
    let (tag, body) = conn.read_msg().unwrap();
    assert_eq!(tag, b'E');
    assert_eq!(error_field(&body, b'C').as_deref(), Some("0A000"));
    assert_eq!(error_field(&body, b'W'), None, "no PL/pgSQL context");
    conn.send(b'S', &[]).unwrap();
    let reply = conn.read_until_ready().unwrap();
    assert_eq!(
        reply.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
        b"Z".to_vec()
    );
    rt.block_on(v.assert_encrypted_at_rest(&["raw-secret"]));
}

#[tokio::test]
async fn views_ctes_unions_cursors_and_portals_decrypt() {
    let v = Vault::new().await;
    let t = &v.table;
    let mut client = v.client().await;
    for i in 0..5 {
        client
            .execute(
                &format!("INSERT INTO {t} (org_id, name, value) VALUES ('o', $1, $2)"),
                &[&format!("n{i}"), &format!("secret-{i}")],
            )
            .await
            .unwrap();
    }
    let view = unique("vault_view");
    direct()
        .await
        .batch_execute(&format!(
            "CREATE VIEW {view} AS SELECT name, value FROM {t}"
        ))
        .await
        .unwrap();
    let col = |rows: Vec<tokio_postgres::Row>, i: usize| -> Vec<String> {
        let mut v: Vec<String> = rows.iter().map(|r| r.get(i)).collect();
        v.sort();
        v
    };
    let expected: Vec<String> = (0..5).map(|i| format!("secret-{i}")).collect();
    let rows = client
        .query(&format!("SELECT name, value FROM {view}"), &[])
        .await
        .unwrap();
    assert_eq!(col(rows, 1), expected, "view");
    let rows = client
        .query(
            &format!("WITH c AS (SELECT value AS v FROM {t}) SELECT v FROM c"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(col(rows, 0), expected, "cte");
    let rows = client
        .query(&format!("SELECT value FROM {t} WHERE name = 'n0' UNION ALL SELECT value FROM {t} WHERE name <> 'n0'"), &[])
        .await
        .unwrap();
    assert_eq!(col(rows, 0), expected, "union all");
    // Cursor FETCH (simple protocol).
    let tx = client.transaction().await.unwrap();
    tx.batch_execute(&format!(
        "DECLARE cur CURSOR FOR SELECT value FROM {t} ORDER BY id"
    ))
    .await
    .unwrap();
    let msgs = tx.simple_query("FETCH 2 FROM cur").await.unwrap();
    assert_eq!(
        crate::support::harness::simple_column(&msgs, 0),
        ["secret-0", "secret-1"]
    );
    // Portal with a row limit.
    let stmt = tx
        .prepare(&format!("SELECT value FROM {t} ORDER BY id"))
        .await
        .unwrap();
    let portal = tx.bind(&stmt, &[]).await.unwrap();
    let first = tx.query_portal(&portal, 3).await.unwrap();
    let rest = tx.query_portal(&portal, 10).await.unwrap();
    assert_eq!(first.len() + rest.len(), 5);
    assert_eq!(first[0].get::<_, String>(0), "secret-0");
    tx.commit().await.unwrap();
    direct()
        .await
        .batch_execute(&format!("DROP VIEW {view}"))
        .await
        .unwrap();
}

#[tokio::test]
async fn restored_ciphertext_is_stored_unchanged_and_copy_without_column_list() {
    let v = Vault::new().await;
    let t = &v.table;
    let client = v.client().await;
    client
        .execute(
            &format!("INSERT INTO {t} (org_id, name, value) VALUES ('o', 'orig', 'original')"),
            &[],
        )
        .await
        .unwrap();
    let stored = v.stored().await[0].1.clone().unwrap();
    // Re-inserting the ciphertext (a restore) stores it as is.
    client
        .execute(
            &format!("INSERT INTO {t} (org_id, name, value) VALUES ('o', 'copy', $1)"),
            &[&stored],
        )
        .await
        .unwrap();
    let after = v.stored().await;
    assert_eq!(after[1].1.as_deref(), Some(stored.as_str()));
    let rows = client
        .query(&format!("SELECT value FROM {t} WHERE name = 'copy'"), &[])
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, String>(0), "original");
    // ... but not into another organisation's row.
    let err = client
        .execute(
            &format!("INSERT INTO {t} (org_id, name, value) VALUES ('other', 'x', $1)"),
            &[&stored],
        )
        .await
        .unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("42501"), "{err}");
    // COPY with no column list: positions come from the catalog.
    let sink = client
        .copy_in(&format!("COPY {t} FROM STDIN WITH (FORMAT csv)"))
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(
        b"100,o,nolist,listless secret,note\n",
    ))
    .await
    .unwrap();
    assert_eq!(sink.finish().await.unwrap(), 1);
    v.assert_encrypted_at_rest(&["original", "listless", "note"])
        .await;
    let out: Vec<bytes::Bytes> = client
        .copy_out(&format!("COPY {t} TO STDOUT WITH (FORMAT csv)"))
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let text = String::from_utf8(out.concat()).unwrap();
    assert!(text.contains("100,o,nolist,listless secret,note"), "{text}");
}

#[test]
fn latin1_client_encoding_round_trips() {
    use crate::support::raw::{data_row, RawConn};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let v = rt.block_on(Vault::new());
    let t = &v.table;
    let (mut conn, _) = RawConn::connect(
        v.proxy.port(),
        &[
            ("user", b"postgres"),
            ("database", b"test"),
            ("client_encoding", b"LATIN1"),
        ],
    )
    .unwrap();
    let mut sql =
        format!("INSERT INTO {t} (org_id, name, value) VALUES ('o', 'l', 'caf").into_bytes();
    sql.extend_from_slice(b"\xe9 cr\xe8me')");
    let reply = conn.query(&sql).unwrap();
    assert!(reply.iter().all(|(tag, _)| *tag != b'E'));
    let reply = conn
        .query(format!("SELECT value FROM {t}").as_bytes())
        .unwrap();
    let row = reply.iter().find(|(tag, _)| *tag == b'D').unwrap();
    assert_eq!(
        data_row(&row.1)[0].as_deref(),
        Some(&b"caf\xe9 cr\xe8me"[..])
    );
    // Stored as the UTF-8 plaintext, encrypted: a UTF-8 client reads the same text.
    let rows = rt.block_on(async {
        v.client()
            .await
            .query(&format!("SELECT value FROM {t}"), &[])
            .await
            .unwrap()
    });
    assert_eq!(rows[0].get::<_, String>(0), "café crème");
    rt.block_on(v.assert_encrypted_at_rest(&["caf"]));
}

/// Garbage and truncated messages of every type the encrypting proxy decodes, sent after a
/// valid startup: each session ends or errors, the proxy never panics and keeps serving.
#[test]
fn hostile_messages_never_take_the_encrypting_proxy_down() {
    use crate::support::raw::RawConn;
    use rand::{Rng, SeedableRng};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let v = rt.block_on(Vault::new());
    let t = v.table.clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let tags = [
        b'Q', b'P', b'B', b'D', b'E', b'C', b'S', b'H', b'F', b'd', b'c', b'f', b'X', b'?',
    ];
    let valid_sql = [
        format!("INSERT INTO {t} (org_id, name, value) VALUES ('o', 'n', 'v')"),
        format!("SELECT value FROM {t}"),
        format!("COPY {t} (org_id, name, value) FROM STDIN"),
    ];
    for round in 0..150 {
        let Ok((mut conn, _)) = RawConn::connect(
            v.proxy.port(),
            &[("user", b"postgres"), ("database", b"test")],
        ) else {
            panic!("proxy stopped accepting at round {round}");
        };
        for _ in 0..rng.gen_range(1..6) {
            let tag = tags[rng.gen_range(0..tags.len())];
            let mut body: Vec<u8> = match rng.gen_range(0..3) {
                0 => (0..rng.gen_range(0..64)).map(|_| rng.gen()).collect(),
                1 => {
                    let mut b = valid_sql[rng.gen_range(0..valid_sql.len())]
                        .clone()
                        .into_bytes();
                    b.push(0);
                    b
                }
                _ => {
                    let mut b = b"\0".to_vec();
                    b.extend_from_slice(valid_sql[rng.gen_range(0..valid_sql.len())].as_bytes());
                    b.push(0);
                    b.extend((0..rng.gen_range(0..12)).map(|_| rng.gen::<u8>()));
                    b
                }
            };
            if rng.gen_bool(0.3) && !body.is_empty() {
                let cut = rng.gen_range(0..body.len());
                body.truncate(cut);
            }
            if conn.send(tag, &body).is_err() {
                break;
            }
        }
        let _ = conn.send(b'S', &[]);
        let _ = conn
            .raw_stream()
            .set_read_timeout(Some(Duration::from_millis(300)));
        let mut sink = [0u8; 4096];
        while let Ok(n) = std::io::Read::read(conn.raw_stream(), &mut sink) {
            if n == 0 {
                break;
            }
        }
    }
    // Still serving, and nothing unencrypted was stored by any of it.
    rt.block_on(async {
        let client = v.client().await;
        client
            .execute(
                &format!("INSERT INTO {t} (org_id, name, value) VALUES ('o', 'after', 'fine')"),
                &[],
            )
            .await
            .unwrap();
        v.assert_encrypted_at_rest(&[]).await;
    });
}

#[tokio::test]
async fn set_config_tenant_and_warm_path_makes_no_key_calls() {
    let table = unique("cfg");
    direct()
        .await
        .batch_execute(&format!("CREATE TABLE {table} (id serial, body text)"))
        .await
        .unwrap();
    let rules = format!("[[table]]\nname = \"{table}\"\nencrypt = [\"body\"]\n");
    let proxy = TestProxy::with(ProxyOptions::encrypting(&rules));
    let client = connect(&proxy.pg_config("postgres", None, "test"))
        .await
        .unwrap();
    let ins = format!("INSERT INTO {table} (body) VALUES ($1)");
    // set_config with a literal, session-wide.
    client
        .batch_execute("SELECT set_config('pgenvelope.tenant', 'lit', false)")
        .await
        .unwrap();
    client.execute(ins.as_str(), &[&"one"]).await.unwrap();
    // set_config with a parameter, transaction-local: gone after COMMIT.
    let mut client = client;
    let tx = client.transaction().await.unwrap();
    tx.query(
        "SELECT set_config('pgenvelope.tenant', $1, true)",
        &[&"param"],
    )
    .await
    .unwrap();
    tx.execute(ins.as_str(), &[&"two"]).await.unwrap();
    tx.commit().await.unwrap();
    let stored: Vec<String> = direct()
        .await
        .query(&format!("SELECT body FROM {table} ORDER BY id"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let orgs: Vec<String> = {
        let engine = proxy.engine.as_ref().unwrap();
        let mut orgs = Vec::new();
        for s in &stored {
            let dek = pgenvelope::crypto::EncV1::parse(s.as_bytes())
                .unwrap()
                .dek_id();
            orgs.push(engine_org(engine, dek).await);
        }
        orgs
    };
    assert_eq!(orgs, vec!["lit".to_owned(), "param".to_owned()]);

    // Warm: many statements, no key-store load and no unwrap.
    client.execute(ins.as_str(), &[&"warm-up"]).await.unwrap();
    let engine = proxy.engine.as_ref().unwrap();
    let before = engine.keys().stats();
    for i in 0..200 {
        client
            .execute(ins.as_str(), &[&format!("v{i}")])
            .await
            .unwrap();
        client
            .query(
                &format!("SELECT body FROM {table} WHERE id = $1"),
                &[&(i + 3)],
            )
            .await
            .unwrap();
    }
    let after = engine.keys().stats();
    assert_eq!(
        after.unwrap_calls, before.unwrap_calls,
        "no KEK call per statement once warm"
    );
    assert_eq!(
        after.store_loads, before.store_loads,
        "no key-store call per statement once warm"
    );
    // COPY in binary format into an encrypted table is refused up front.
    let err = client
        .simple_query(&format!("COPY {table} (body) FROM STDIN BINARY"))
        .await
        .unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("0A000"), "{err}");
    client.simple_query("SELECT 1").await.unwrap();
    direct()
        .await
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

async fn engine_org(
    engine: &pgenvelope::proxy::Encryption,
    dek: pgenvelope::crypto::DekId,
) -> String {
    engine
        .keys()
        .key_by_id(dek)
        .await
        .unwrap()
        .org()
        .to_string()
}

#[tokio::test]
async fn literal_with_a_parameter_tenant_is_refused_clearly() {
    let v = Vault::new().await;
    let t = &v.table;
    let client = v.client().await;
    let err = client
        .execute(
            &format!("INSERT INTO {t} (org_id, name, value) VALUES ($1, 'n', 'literal')"),
            &[&"o"],
        )
        .await
        .unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("0A000"));
    let msg = err.as_db_error().unwrap().message().to_owned();
    assert!(msg.contains("pass the value as a parameter"), "{msg}");
    assert!(v.stored().await.is_empty());
    // The same row with the value as a parameter is fine.
    client
        .execute(
            &format!("INSERT INTO {t} (org_id, name, value) VALUES ($1, 'n', $2)"),
            &[&"o", &"literal"],
        )
        .await
        .unwrap();
    v.assert_encrypted_at_rest(&["literal"]).await;
}

/// 100 concurrent client connections of one new organisation cause exactly one unwrap; N new
/// organisations cause N. A private cluster, so 100 connections fit beside the others.
#[test]
fn hundred_connections_of_a_new_organisation_unwrap_once() {
    use crate::support::{Auth, ClusterOptions, PrivateCluster};
    let cluster =
        PrivateCluster::start(ClusterOptions::new(Auth::Trust).setting("max_connections", "200"))
            .unwrap();
    cluster
        .psql(
            "test",
            "CREATE TABLE secrets (id serial, org_id text, value text)",
        )
        .unwrap();
    let mut opts = ProxyOptions::to("127.0.0.1", cluster.port());
    opts.rules = Some(
        "[[table]]\nname = \"secrets\"\ntenant_column = \"org_id\"\nencrypt = [\"value\"]\n".into(),
    );
    let proxy = TestProxy::with(opts);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let engine = proxy.engine.clone().unwrap();
        let config = proxy.pg_config("postgres", None, "test");
        let run = |org: String, n: usize| {
            let config = config.clone();
            async move {
                let clients =
                    futures_util::future::join_all((0..n).map(|_| connect(&config))).await;
                let clients: Vec<_> = clients.into_iter().map(Result::unwrap).collect();
                let writes = clients.iter().enumerate().map(|(i, c)| {
                    let org = org.clone();
                    async move {
                        c.execute(
                            "INSERT INTO secrets (org_id, value) VALUES ($1, $2)",
                            &[&org, &format!("v{i}")],
                        )
                        .await
                    }
                });
                for r in futures_util::future::join_all(writes).await {
                    r.unwrap();
                }
            }
        };
        let before = engine.keys().stats();
        run("crowd".to_owned(), 100).await;
        let after = engine.keys().stats();
        assert_eq!(
            after.unwrap_calls - before.unwrap_calls,
            1,
            "one unwrap for 100 connections"
        );
        let before = after;
        for i in 0..5 {
            run(format!("org{i}"), 4).await;
        }
        let after = engine.keys().stats();
        assert_eq!(
            after.unwrap_calls - before.unwrap_calls,
            5,
            "one unwrap per organisation"
        );
    });
}

/// A COPY into an encrypted table that the server refuses leaves no state behind: the next
/// COPY into another table is relayed untouched.
#[tokio::test]
async fn failed_copy_leaves_no_rewriter_behind() {
    let v = Vault::new().await;
    let t = &v.table;
    let client = v.client().await;
    let plain = unique("plain_copy");
    direct()
        .await
        .batch_execute(&format!("CREATE TABLE {plain} (a text, b text, c text)"))
        .await
        .unwrap();
    // The server refuses this COPY (no such column) before any data is sent.
    let err = client
        .simple_query(&format!("COPY {t} (org_id, nosuchcol, value) FROM STDIN"))
        .await
        .expect_err("refused by the server");
    assert!(err.code().is_some(), "{err}");
    let sink = client
        .copy_in(&format!("COPY {plain} (a, b, c) FROM STDIN"))
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"x\ty\tz\n"))
        .await
        .unwrap();
    sink.finish().await.unwrap();
    let row = direct()
        .await
        .query_one(&format!("SELECT a, b, c FROM {plain}"), &[])
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, String>(1),
            row.get::<_, String>(2)
        ),
        ("x".into(), "y".into(), "z".into())
    );
    direct()
        .await
        .batch_execute(&format!("DROP TABLE {plain}"))
        .await
        .unwrap();
}
