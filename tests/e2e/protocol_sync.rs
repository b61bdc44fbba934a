//! Protocol state the proxy must keep exactly as the server keeps it: prepared statements that
//! the server refused or skipped, the skip-to-Sync state after an error, CancelRequest timing,
//! and startup packets PostgreSQL drops without a word.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::support::harness::{main_pg, TestProxy};
use crate::support::raw::RawConn;
use crate::support::raw::{bind, close_statement, codes, execute, parse, query, raw, sync, Out};
use crate::support::vault::Vault;

/// Prepare `s` as an insert whose second parameter is encrypted.
fn prepare_insert(c: &mut RawConn, v: &Vault, name: &str) {
    parse(
        c,
        name,
        &format!("INSERT INTO {} (org_id, value) VALUES ($1, $2)", v.table),
        &[],
    );
    let r = sync(c);
    assert!(codes(&r).is_empty(), "{:?}", codes(&r));
}

/// Bind `s` with a secret, run it, and check that nothing reached the table in plaintext.
async fn insert_and_check(c: &mut RawConn, v: &Vault, name: &str, secret: &str) {
    bind(c, "", name, &["org1", secret]);
    execute(c, "");
    let _ = sync(c);
    v.assert_encrypted_at_rest(&[secret]).await;
}

#[tokio::test]
async fn parse_refused_by_server_keeps_the_old_statement() {
    let v = Vault::new().await;
    let mut c = raw(v.proxy.port());
    prepare_insert(&mut c, &v, "s");
    // The server refuses to redefine `s` (42P05) and keeps the insert.
    parse(&mut c, "s", "SELECT $1::text, $2::text", &[]);
    let r = sync(&mut c);
    assert_eq!(codes(&r), ["42P05"]);
    insert_and_check(&mut c, &v, "s", "secret-42p05").await;
    assert_eq!(v.stored().await.len(), 1, "the insert ran");
}

#[tokio::test]
async fn close_skipped_after_an_error_is_not_honoured() {
    let v = Vault::new().await;
    let mut c = raw(v.proxy.port());
    prepare_insert(&mut c, &v, "s");
    // The server skips the Close and the Parse after the failed Execute.
    execute(&mut c, "no_such_portal");
    close_statement(&mut c, "s");
    parse(&mut c, "s", "SELECT $1::text, $2::text", &[]);
    let r = sync(&mut c);
    assert_eq!(codes(&r), ["34000"]);
    insert_and_check(&mut c, &v, "s", "secret-skipped-close").await;
    assert_eq!(v.stored().await.len(), 1, "the insert ran");
}

#[tokio::test]
async fn query_during_skip_to_sync_is_skipped_as_by_the_server() {
    let v = Vault::new().await;
    let mut c = raw(v.proxy.port());
    prepare_insert(&mut c, &v, "s");
    // Refused by the proxy (an encrypted parameter typed int4); the server then skips up to
    // Sync, the Query too, and so the Close and Parse after it.
    parse(
        &mut c,
        "bad",
        &format!("INSERT INTO {} (org_id, value) VALUES ($1, $2)", v.table),
        &[25, 23],
    );
    query(&mut c, "SELECT 1");
    close_statement(&mut c, "s");
    parse(&mut c, "s", "SELECT $1::text, $2::text", &[]);
    let r = sync(&mut c);
    let tags: Vec<u8> = r.iter().map(|m| m.0).collect();
    assert_eq!(
        tags, b"EZ",
        "as PostgreSQL: the Query during the skip gets no answer"
    );
    insert_and_check(&mut c, &v, "s", "secret-query-skip").await;
    assert_eq!(v.stored().await.len(), 1, "the insert ran");

    // The same bytes straight to PostgreSQL (a server-side error in place of the refusal).
    let (_, port) = main_pg();
    let mut d = raw(port);
    parse(&mut d, "bad", "SELEC 1", &[]);
    query(&mut d, "SELECT 1");
    let r = sync(&mut d);
    let direct: Vec<u8> = r.iter().map(|m| m.0).collect();
    assert_eq!(direct, b"EZ");
}

#[tokio::test]
async fn pipelined_bind_after_an_unanswered_redefinition_is_not_sent_in_plaintext() {
    let v = Vault::new().await;
    let mut c = raw(v.proxy.port());
    prepare_insert(&mut c, &v, "s");
    // Both cycles sent at once, before any answer: the proxy cannot know yet that the
    // redefinition fails (42P05), so the Bind must not go out with the parameter in
    // plaintext: it is refused (or, had the answer come first, bound to the insert).
    let mut batch = Vec::new();
    parse(&mut batch, "s", "SELECT $1::text, $2::text", &[]);
    batch.put(b'S', &[]);
    bind(&mut batch, "", "s", &["org1", "secret-pipelined"]);
    execute(&mut batch, "");
    batch.put(b'S', &[]);
    c.raw_stream().write_all(&batch).unwrap();
    let first = c.read_until_ready().unwrap();
    assert_eq!(codes(&first), ["42P05"]);
    let second = c.read_until_ready().unwrap();
    let stored = v.stored().await.len();
    match stored {
        1 => assert!(codes(&second).is_empty()),
        _ => assert_eq!(
            codes(&second),
            ["0A000"],
            "refused: the statement is not settled"
        ),
    }
    v.assert_encrypted_at_rest(&["secret-pipelined"]).await;
    // The session is usable.
    insert_and_check(&mut c, &v, "s", "secret-after").await;
}

/// Send a CancelRequest as libpq does: write it, then wait until the other end closes.
fn cancel(port: u16, key: &[u8]) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut p = 16u32.to_be_bytes().to_vec();
    p.extend_from_slice(&80_877_102u32.to_be_bytes());
    p.extend_from_slice(key);
    s.write_all(&p).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
}

/// Rounds of a short sleep cancelled at once, each followed by a statement that must run
/// uncancelled; returns how many of those were cancelled.
fn spurious_cancels(port: u16, rounds: usize) -> usize {
    let mut c = raw(port);
    let key = c.key.clone();
    let mut spurious = 0;
    for _ in 0..rounds {
        query(&mut c, "SELECT pg_sleep(0.005)");
        cancel(port, &key);
        let _ = c.read_until_ready().unwrap();
        let r = c.query(b"SELECT pg_sleep(0.02)").unwrap();
        if codes(&r).iter().any(|c| c == "57014") {
            spurious += 1;
        }
    }
    spurious
}

#[tokio::test]
async fn cancel_is_answered_only_after_the_server_acted_on_it() {
    let (_, pg_port) = main_pg();
    assert_eq!(spurious_cancels(pg_port, 100), 0, "directly");
    let proxy = TestProxy::start();
    assert_eq!(spurious_cancels(proxy.port(), 100), 0, "through the proxy");
}

/// What a server sends back for `bytes` sent before any startup packet, up to its close.
fn answer_to(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

#[tokio::test]
async fn bad_startup_length_closes_silently_as_postgresql_does() {
    let (_, pg_port) = main_pg();
    let proxy = TestProxy::start();
    // A Terminate before the StartupMessage (length 0x58000000), and a length under 8.
    for bytes in [&b"X\0\0\0\x04"[..], &b"\0\0\0\x04\0\0\0\0"[..]] {
        let direct = answer_to(pg_port, bytes);
        assert!(direct.is_empty(), "PostgreSQL 15 says nothing");
        assert_eq!(answer_to(proxy.port(), bytes), direct);
    }
}

/// Through `v`'s proxy, in `db`: create a table and read it, so the catalog looks it up.
async fn read_through_proxy(v: &Vault, db: &str, table: &str) -> Result<(), tokio_postgres::Error> {
    let c = crate::support::harness::connect(&v.proxy.pg_config("postgres", None, db))
        .await
        .unwrap();
    c.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {table} (a int, b text)"
    ))
    .await
    .unwrap();
    c.query(&format!("SELECT * FROM {table}"), &[])
        .await
        .map(|_| ())
}

#[tokio::test]
async fn catalog_connection_does_not_keep_a_dropped_database_open() {
    let v = Vault::new().await;
    let db = crate::support::harness::TempDatabase::create("psync_db").await;
    read_through_proxy(&v, &db.0, "t").await.unwrap();
    let direct = crate::support::harness::direct().await;
    // CREATE DATABASE … TEMPLATE and DROP DATABASE wait (up to 5 s) for other sessions to go.
    let copy = format!("{}_copy", db.0);
    direct
        .batch_execute(&format!("CREATE DATABASE {copy} TEMPLATE {}", db.0))
        .await
        .unwrap();
    direct
        .batch_execute(&format!("DROP DATABASE {copy}"))
        .await
        .unwrap();
    direct
        .batch_execute(&format!("DROP DATABASE {}", db.0))
        .await
        .unwrap();
}

#[tokio::test]
async fn catalog_look_up_survives_a_terminated_service_connection() {
    let v = Vault::new().await;
    let db = crate::support::harness::TempDatabase::create("psync_db").await;
    let c = crate::support::harness::connect(&v.proxy.pg_config("postgres", None, &db.0))
        .await
        .unwrap();
    for i in 0..10 {
        c.batch_execute(&format!("CREATE TABLE t{i} (a int, b text)"))
            .await
            .unwrap();
    }
    let direct = crate::support::harness::direct().await;
    c.query("SELECT * FROM t0", &[]).await.unwrap();
    for i in 1..10 {
        // Each round: the service connection is killed, then a new table is looked up at once.
        direct
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = $1 AND application_name = 'pgenvelope-catalog'",
                &[&db.0],
            )
            .await
            .unwrap();
        c.query(&format!("SELECT * FROM t{i}"), &[]).await.unwrap();
    }
}

/// Tags of the answers to: a Parse that fails, Flush (its error read), a Query, then Sync, and
/// then a Query on its own.
fn query_after_reported_error(port: u16) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let mut c = raw(port);
    parse(&mut c, "", "SELEC 1", &[]);
    c.send(b'H', &[]).unwrap();
    let error = c.read_msg().unwrap();
    query(&mut c, "SELECT 1");
    let skipped: Vec<u8> = sync(&mut c).iter().map(|m| m.0).collect();
    let next: Vec<u8> = c.query(b"SELECT 1").unwrap().iter().map(|m| m.0).collect();
    (vec![error.0], skipped, next)
}

#[tokio::test]
async fn query_after_a_reported_extended_error_is_ignored_as_by_the_server() {
    let v = Vault::new().await;
    let (_, pg_port) = main_pg();
    let direct = query_after_reported_error(pg_port);
    assert_eq!(direct, (b"E".to_vec(), b"Z".to_vec(), b"TDCZ".to_vec()));
    assert_eq!(query_after_reported_error(v.proxy.port()), direct);
}

#[tokio::test]
async fn skipped_query_does_not_shift_the_session_tenant_bookkeeping() {
    let v = Vault::new().await;
    let mut c = raw(v.proxy.port());
    parse(&mut c, "", "SELEC 1", &[]);
    c.send(b'H', &[]).unwrap();
    let _error = c.read_msg().unwrap();
    query(&mut c, "SELECT 1");
    let _ = sync(&mut c);
    let r = c
        .query(
            format!(
                "INSERT INTO {} (org_id, value) VALUES ('org_b', 'secret-of-b')",
                v.table
            )
            .as_bytes(),
        )
        .unwrap();
    assert!(codes(&r).is_empty(), "{:?}", codes(&r));
    let r = c.query(b"SET pgenvelope.tenant = 'org_a'").unwrap();
    assert!(codes(&r).is_empty(), "{:?}", codes(&r));
    let r = c.query(b"SELECT 1/0").unwrap();
    assert_eq!(codes(&r), ["22012"]);
    // The session tenant is org_a: org_b's value is not decrypted for it.
    let r = c
        .query(format!("SELECT value FROM {}", v.table).as_bytes())
        .unwrap();
    let rows: Vec<_> = r.iter().filter(|m| m.0 == b'D').collect();
    assert!(
        !rows
            .iter()
            .any(|m| String::from_utf8_lossy(&m.1).contains("secret-of-b")),
        "another organisation's value decrypted"
    );
    assert!(!codes(&r).is_empty(), "refused under the session tenant");
}

/// A statement prepared by server-side code (here SQL `PREPARE` run by a DO block, with the
/// table name built from pieces) was never parsed through the proxy: a Bind of it is refused,
/// or its parameters would reach the encrypted column in plaintext.
#[tokio::test]
async fn bind_of_a_statement_the_proxy_never_saw_parsed_is_refused() {
    let v = Vault::new().await;
    let mut c = raw(v.proxy.port());
    let (head, tail) = v.table.split_at(3);
    let made = c
        .query(
            format!(
                "DO $$ BEGIN EXECUTE 'PREPARE hidden(text, text) AS INSERT INTO ' || '{head}' || '{tail}' \
                 || ' (org_id, value) VALUES ($1, $2)'; END $$"
            )
            .as_bytes(),
        )
        .unwrap();
    assert!(codes(&made).is_empty(), "{:?}", codes(&made));
    insert_and_check(&mut c, &v, "hidden", "secret-hidden").await;
    bind(&mut c, "", "hidden", &["org1", "secret-hidden-2"]);
    execute(&mut c, "");
    let r = sync(&mut c);
    assert_eq!(codes(&r), ["0A000"]);
    assert!(v.stored().await.is_empty(), "nothing was written");
    // A statement parsed through the proxy still binds.
    prepare_insert(&mut c, &v, "seen");
    insert_and_check(&mut c, &v, "seen", "secret-seen").await;
    assert_eq!(v.stored().await.len(), 1);
}
