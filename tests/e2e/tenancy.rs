//! The session tenant as PostgreSQL sees it: setting names match in any case.

use crate::support::harness::{
    code, connect, direct, simple_column, unique, DropTables, ProxyOptions, TestProxy,
};
use crate::support::vault::Fixture;

/// A table whose rows carry no tenant column (the session tenant seals), and a proxy for it.
struct Notes {
    proxy: TestProxy,
    table: String,
}

impl Notes {
    async fn new() -> Self {
        let table = unique("tnotes");
        direct()
            .await
            .batch_execute(&format!(
                "CREATE TABLE {table} (id serial primary key, body text)"
            ))
            .await
            .unwrap();
        let rules = format!("[[table]]\nname = \"{table}\"\nencrypt = [\"body\"]\n");
        let proxy = TestProxy::with(ProxyOptions::encrypting(&rules));
        Notes { proxy, table }
    }

    async fn client_as(&self, tenant: &str) -> tokio_postgres::Client {
        let c = connect(&self.proxy.pg_config("postgres", None, "test"))
            .await
            .unwrap();
        c.batch_execute(&format!("SET pgenvelope.tenant = '{tenant}'"))
            .await
            .unwrap();
        c
    }

    /// The body of row `id`, read by a session of `tenant` (error code on refusal).
    async fn read_as(&self, tenant: &str, id: i32) -> Result<String, Option<String>> {
        let c = self.client_as(tenant).await;
        c.query_one(
            &format!("SELECT body FROM {} WHERE id = $1", self.table),
            &[&id],
        )
        .await
        .map(|r| r.get(0))
        .map_err(|e| code(&e))
    }
}

impl Drop for Notes {
    fn drop(&mut self) {
        crate::support::harness::psql_on_main(&format!("DROP TABLE IF EXISTS {}", self.table));
    }
}

#[tokio::test]
async fn setting_names_match_in_any_case() {
    let n = Notes::new().await;
    let t = &n.table;
    let acme = n.client_as("acme").await;
    acme.execute(
        &format!("INSERT INTO {t} (id, body) VALUES (1, 'one')"),
        &[],
    )
    .await
    .unwrap();
    // A quoted upper-case name is the same setting: globex may not read acme's row.
    let c = connect(&n.proxy.pg_config("postgres", None, "test"))
        .await
        .unwrap();
    c.batch_execute("SET \"PGENVELOPE\".\"TENANT\" = 'globex'")
        .await
        .unwrap();
    let err = c
        .query(&format!("SELECT body FROM {t}"), &[])
        .await
        .unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("42501"), "{err}");
    // RESET in any case returns to no tenant: the write has no tenant.
    c.batch_execute("RESET \"PgEnvelope\".tenant")
        .await
        .unwrap();
    let err = c
        .execute(&format!("INSERT INTO {t} (body) VALUES ($1)"), &[&"x"])
        .await
        .unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("42501"), "{err}");
    // Startup options in upper case.
    let c = connect(&format!(
        "{} options='-c PGENVELOPE.TENANT=globex'",
        n.proxy.pg_config("postgres", None, "test")
    ))
    .await
    .unwrap();
    let err = c
        .query(&format!("SELECT body FROM {t}"), &[])
        .await
        .unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("42501"), "{err}");
}

/// Item 8: a tenant change and a write sealed under the session tenant in one query string
/// would seal under the tenant before the change: refused, nothing written.
#[tokio::test]
async fn tenant_change_and_session_sealed_write_in_one_text_are_refused() {
    let n = Notes::new().await;
    let c = n.client_as("org_a").await;
    let err = c
        .batch_execute(&format!(
            "SET pgenvelope.tenant = 'org_b'; INSERT INTO {} (id, body) VALUES (1, 'secret-b')",
            n.table
        ))
        .await
        .unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("0A000"), "{err}");
    let err = c
        .batch_execute(&format!(
            "BEGIN; SET LOCAL pgenvelope.tenant = 'org_b'; INSERT INTO {} (id, body) VALUES (2, 'secret-b'); COMMIT",
            n.table
        ))
        .await
        .unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("0A000"), "{err}");
    c.batch_execute("ROLLBACK").await.unwrap();
    let rows = direct()
        .await
        .query(&format!("SELECT count(*) FROM {}", n.table), &[])
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, i64>(0), 0);
    // Sent separately, the change applies first and the row belongs to org_b.
    c.batch_execute("SET pgenvelope.tenant = 'org_b'")
        .await
        .unwrap();
    c.batch_execute(&format!(
        "INSERT INTO {} (id, body) VALUES (3, 'secret-b')",
        n.table
    ))
    .await
    .unwrap();
    assert_eq!(n.read_as("org_b", 3).await.unwrap(), "secret-b");
}

/// Item 10: a tenant set_config that might not run (WHERE false) is refused instead of
/// switching the proxy but not the server.
#[tokio::test]
async fn set_config_that_may_not_run_is_refused() {
    let n = Notes::new().await;
    let c = n.client_as("org_a").await;
    for sql in [
        "SELECT set_config('pgenvelope.tenant', 'org_b', false) WHERE false",
        "SELECT set_config('pgenvelope.tenant', 'org_b', false) FROM generate_series(1, 0)",
        "SELECT set_config('pgenvelope.tenant', 'org_b', false) LIMIT 0",
    ] {
        let err = c.batch_execute(sql).await.unwrap_err();
        assert_eq!(code(&err).as_deref(), Some("0A000"), "{sql}: {err}");
    }
    // The proxy still seals for org_a, as the server's setting says.
    c.batch_execute(&format!(
        "INSERT INTO {} (id, body) VALUES (1, 'secret-a')",
        n.table
    ))
    .await
    .unwrap();
    let server: String = c
        .query_one("SELECT current_setting('pgenvelope.tenant')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(server, "org_a");
    assert_eq!(n.read_as("org_a", 1).await.unwrap(), "secret-a");
    // The plain form still works.
    c.batch_execute("SELECT set_config('pgenvelope.tenant', 'org_b', false)")
        .await
        .unwrap();
}

/// Item 11: a row tenant that PostgreSQL stores in another form than written is refused.
#[tokio::test]
async fn row_tenants_stored_differently_from_how_they_are_written_are_refused() {
    let table = unique("tint");
    direct()
        .await
        .batch_execute(&format!(
            "CREATE TABLE {table} (id serial primary key, org_id int not null, body text);\
             CREATE TABLE {table}_t (id serial primary key, org_id text not null, body text)"
        ))
        .await
        .unwrap();
    let rules = format!(
        "[[table]]\nname = \"{table}\"\ntenant_column = \"org_id\"\nencrypt = [\"body\"]\n\
         [[table]]\nname = \"{table}_t\"\ntenant_column = \"org_id\"\nencrypt = [\"body\"]\n"
    );
    let proxy = TestProxy::with(ProxyOptions::encrypting(&rules));
    let c = connect(&proxy.pg_config("postgres", None, "test"))
        .await
        .unwrap();
    for sql in [
        format!("INSERT INTO {table} (org_id, body) VALUES (007, 's')"),
        format!("INSERT INTO {table} (org_id, body) VALUES ('+7', 's')"),
        format!("INSERT INTO {table} (org_id, body) VALUES (7.0, 's')"),
        format!("INSERT INTO {table}_t (org_id, body) VALUES ('acme'::varchar(2), 's')"),
    ] {
        let err = c.batch_execute(&sql).await.unwrap_err();
        assert!(
            matches!(code(&err).as_deref(), Some("0A000" | "42501")),
            "{sql}: {err}"
        );
    }
    let err = c
        .execute(
            &format!("INSERT INTO {table} (org_id, body) VALUES ($1::text::int, $2)"),
            &[&"007", &"s"],
        )
        .await
        .unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("42501"), "{err}");
    let n: i64 = direct()
        .await
        .query_one(
            &format!("SELECT (SELECT count(*) FROM {table}) + (SELECT count(*) FROM {table}_t)"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "nothing written");
    // Canonical forms work and read back.
    c.batch_execute(&format!(
        "INSERT INTO {table} (org_id, body) VALUES (7, 's7'), ('8'::int, 's8')"
    ))
    .await
    .unwrap();
    let rows = c
        .query(&format!("SELECT body FROM {table} ORDER BY id"), &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].get::<_, String>(0), "s7");
    let _ = direct()
        .await
        .batch_execute(&format!("DROP TABLE {table}; DROP TABLE {table}_t"))
        .await;
}

/// Item 12: writes that would seal a row for another organisation than its own are refused
/// (moving it without new values) or pinned to the session tenant's rows (updating it by
/// primary key, ON CONFLICT against it): another organisation's row is not written, and stays
/// readable by its owner.
#[tokio::test]
async fn writes_that_would_make_a_row_unreadable_are_refused() {
    let v = crate::support::vault::Vault::new().await;
    let t = &v.table;
    let c = v.client().await;
    c.batch_execute(&format!(
        "INSERT INTO {t} (id, org_id, value, note) VALUES (1, 'org_b', 'secret-b', 'note-b')"
    ))
    .await
    .unwrap();
    c.batch_execute("SET pgenvelope.tenant = 'org_a'")
        .await
        .unwrap();
    for sql in [
        // Moving the row without new values for its encrypted columns.
        format!("UPDATE {t} SET org_id = 'org_a' WHERE id = 1"),
        format!("UPDATE {t} SET org_id = 'org_a', value = 'v' WHERE id = 1"),
    ] {
        let err = c.batch_execute(&sql).await.unwrap_err();
        assert_eq!(code(&err).as_deref(), Some("0A000"), "{sql}: {err}");
    }
    // By primary key under the session tenant, and an upsert against org_b's row from org_a:
    // pinned to org_a's rows, so org_b's row is not written.
    for sql in [
        format!("UPDATE {t} SET value = 'overwritten' WHERE id = 1"),
        format!(
            "INSERT INTO {t} (id, org_id, value) VALUES (1, 'org_a', 'upserted') \
             ON CONFLICT (id) DO UPDATE SET value = EXCLUDED.value"
        ),
    ] {
        assert_eq!(c.execute(&sql, &[]).await.unwrap(), 0, "{sql}");
    }
    // Pinned forms are accepted and only ever touch the named organisation's row.
    c.batch_execute(&format!(
        "UPDATE {t} SET value = 'overwritten' WHERE id = 1 AND org_id = 'org_a'"
    ))
    .await
    .unwrap();
    c.batch_execute(&format!(
        "INSERT INTO {t} (id, org_id, value) VALUES (1, 'org_a', 'upserted') \
         ON CONFLICT (id) DO UPDATE SET value = EXCLUDED.value WHERE {t}.org_id = EXCLUDED.org_id"
    ))
    .await
    .unwrap();
    // org_b's row is intact and readable by org_b.
    let b = v.client().await;
    b.batch_execute("SET pgenvelope.tenant = 'org_b'")
        .await
        .unwrap();
    let row = b
        .query_one(
            &format!("SELECT org_id, value, note FROM {t} WHERE id = 1"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "org_b");
    assert_eq!(row.get::<_, String>(1), "secret-b");
    assert_eq!(row.get::<_, String>(2), "note-b");
    // Moving with new values for every encrypted column works and reads back under the new
    // organisation; not from a session of the old one, which writes only its own rows.
    let move_row = format!(
        "UPDATE {t} SET org_id = 'org_c', value = 'moved', note = NULL WHERE id = 1 AND org_id = 'org_b'"
    );
    let err = b.batch_execute(&move_row).await.unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("42501"), "{err}");
    v.client().await.batch_execute(&move_row).await.unwrap();
    let cc = v.client().await;
    cc.batch_execute("SET pgenvelope.tenant = 'org_c'")
        .await
        .unwrap();
    let row = cc
        .query_one(&format!("SELECT value FROM {t} WHERE id = 1"), &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "moved");
}

/// Item 13: `ROLLBACK TO SAVEPOINT` undoes a tenant change made after the savepoint, as in
/// the server; a later write is sealed for the tenant the server has.
#[tokio::test]
async fn rollback_to_savepoint_undoes_a_tenant_change() {
    let n = Notes::new().await;
    let c = n.client_as("org_a").await;
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute("SAVEPOINT s").await.unwrap();
    c.batch_execute("SET pgenvelope.tenant = 'org_b'")
        .await
        .unwrap();
    c.batch_execute("ROLLBACK TO SAVEPOINT s").await.unwrap();
    let server: String = c
        .query_one("SELECT current_setting('pgenvelope.tenant')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(server, "org_a");
    c.batch_execute(&format!(
        "INSERT INTO {} (id, body) VALUES (1, 'secret-a')",
        n.table
    ))
    .await
    .unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    // Sealed for org_a, the server's tenant: org_a reads it, org_b is refused.
    assert_eq!(n.read_as("org_a", 1).await.unwrap(), "secret-a");
    assert_eq!(
        n.read_as("org_b", 1).await.unwrap_err().as_deref(),
        Some("42501")
    );
    // The same through the extended protocol, with RELEASE keeping a change.
    c.batch_execute("BEGIN").await.unwrap();
    c.execute("SAVEPOINT s2", &[]).await.unwrap();
    c.execute("SET pgenvelope.tenant = 'org_b'", &[])
        .await
        .unwrap();
    c.execute("RELEASE SAVEPOINT s2", &[]).await.unwrap();
    c.execute(
        &format!("INSERT INTO {} (id, body) VALUES (2, $1)", n.table),
        &[&"secret-b"],
    )
    .await
    .unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(n.read_as("org_b", 2).await.unwrap(), "secret-b");
    // Mixed in one query string: refused (their order is not tracked).
    let err = c
        .batch_execute("BEGIN; SAVEPOINT s3; SET pgenvelope.tenant = 'org_c'")
        .await
        .unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("0A000"), "{err}");
}

/// Item 8, pipelines: rows are read under the tenant in force when their statement was sent,
/// not under a change pipelined after it.
#[tokio::test]
async fn rows_are_read_under_the_tenant_their_statement_was_sent_under() {
    use crate::support::raw::data_rows;
    use crate::support::raw::{bind, codes, execute, parse, query, raw};
    use std::io::Write;

    let n = Notes::new().await;
    let t = &n.table;
    n.client_as("org_a")
        .await
        .batch_execute(&format!(
            "INSERT INTO {t} (id, body) VALUES (1, 'secret-a')"
        ))
        .await
        .unwrap();
    let mut c = raw(n.proxy.port());
    let r = c.query(b"SET pgenvelope.tenant = 'org_a'").unwrap();
    assert!(codes(&r).is_empty(), "{:?}", codes(&r));
    // SELECT (extended), Sync and a change of tenant in one write.
    let mut buf = Vec::new();
    parse(
        &mut buf,
        "",
        &format!("SELECT body FROM {t} WHERE id = 1"),
        &[],
    );
    bind(&mut buf, "", "", &[]);
    execute(&mut buf, "");
    buf.extend_from_slice(b"S\0\0\0\x04");
    query(&mut buf, "SET pgenvelope.tenant = 'org_b'");
    c.raw_stream().write_all(&buf).unwrap();
    let mut msgs = c.read_until_ready().unwrap();
    msgs.extend(c.read_until_ready().unwrap());
    assert!(codes(&msgs).is_empty(), "{:?}", codes(&msgs));
    let rows = data_rows(&msgs);
    assert_eq!(rows, vec![vec![Some(b"secret-a".to_vec())]]);
    // Now org_b is in force: org_a's row is refused.
    let r = c
        .query(format!("SELECT body FROM {t} WHERE id = 1").as_bytes())
        .unwrap();
    assert_eq!(codes(&r), vec!["42501".to_string()]);

    // A tenant change takes effect when its portal runs, not when it is bound: bound first,
    // executed after a SELECT, it does not apply to the SELECT's rows.
    let r = c.query(b"SET pgenvelope.tenant = 'org_a'").unwrap();
    assert!(codes(&r).is_empty(), "{:?}", codes(&r));
    let mut buf = Vec::new();
    parse(
        &mut buf,
        "change",
        "SELECT set_config('pgenvelope.tenant', 'org_b', false)",
        &[],
    );
    parse(
        &mut buf,
        "read",
        &format!("SELECT body FROM {t} WHERE id = 1"),
        &[],
    );
    bind(&mut buf, "p_change", "change", &[]);
    bind(&mut buf, "p_read", "read", &[]);
    execute(&mut buf, "p_read");
    execute(&mut buf, "p_change");
    buf.extend_from_slice(b"S\0\0\0\x04");
    c.raw_stream().write_all(&buf).unwrap();
    let msgs = c.read_until_ready().unwrap();
    assert!(codes(&msgs).is_empty(), "{:?}", codes(&msgs));
    let rows = data_rows(&msgs);
    assert_eq!(
        rows,
        vec![
            vec![Some(b"secret-a".to_vec())],
            vec![Some(b"org_b".to_vec())]
        ]
    );
    // And after it, org_b is in force.
    let r = c
        .query(format!("SELECT body FROM {t} WHERE id = 1").as_bytes())
        .unwrap();
    assert_eq!(codes(&r), vec!["42501".to_string()]);

    // In one query string, a read before a change of tenant is refused (it would be read
    // under the new tenant); after it, it is read under the new tenant.
    let a = n.client_as("org_a").await;
    let err = a
        .batch_execute(&format!(
            "SELECT body FROM {t}; SET pgenvelope.tenant = 'org_b'"
        ))
        .await
        .unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("0A000"), "{err}");
    let rows = a
        .simple_query(&format!(
            "SET pgenvelope.tenant = 'org_a'; SELECT body FROM {t} WHERE id = 1"
        ))
        .await
        .unwrap();
    assert_eq!(simple_column(&rows, 0), ["secret-a"]);
}

/// Item 8, prepared statements: values sealed for the session tenant when a statement was
/// prepared (literals) or bound (parameters) are not written after the tenant changed.
#[tokio::test]
async fn values_sealed_before_a_tenant_change_are_not_written_after_it() {
    let n = Notes::new().await;
    let t = &n.table;
    let c = n.client_as("org_a").await;
    // A literal is sealed at Parse, for org_a.
    let literal = c
        .prepare(&format!(
            "INSERT INTO {t} (id, body) VALUES (1, 'secret-a')"
        ))
        .await
        .unwrap();
    c.batch_execute("SET pgenvelope.tenant = 'org_b'")
        .await
        .unwrap();
    let err = c.execute(&literal, &[]).await.unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("0A000"), "{err}");
    // Prepared again under org_b, it is sealed for org_b.
    let again = c
        .prepare(&format!(
            "INSERT INTO {t} (id, body) VALUES (1, 'secret-b')"
        ))
        .await
        .unwrap();
    c.execute(&again, &[]).await.unwrap();
    assert_eq!(n.read_as("org_b", 1).await.unwrap(), "secret-b");
    // Back under org_a, the first statement runs as prepared.
    c.batch_execute("SET pgenvelope.tenant = 'org_a'")
        .await
        .unwrap();
    c.execute(&format!("DELETE FROM {t}"), &[]).await.unwrap();
    c.execute(&literal, &[]).await.unwrap();
    assert_eq!(n.read_as("org_a", 1).await.unwrap(), "secret-a");

    // A parameter is sealed at Bind: a portal bound under org_a is not run under org_b.
    let mut c = n.client_as("org_a").await;
    let insert = c
        .prepare(&format!("INSERT INTO {t} (id, body) VALUES (2, $1)"))
        .await
        .unwrap();
    let tx = c.transaction().await.unwrap();
    let portal = tx.bind(&insert, &[&"secret-2"]).await.unwrap();
    tx.batch_execute("SET LOCAL pgenvelope.tenant = 'org_b'")
        .await
        .unwrap();
    let err = tx.query_portal(&portal, 0).await.unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("0A000"), "{err}");
    drop(tx);
    let count: i64 = direct()
        .await
        .query_one(&format!("SELECT count(*) FROM {t} WHERE id = 2"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 0);
}

/// `set_config($1, $2, false)`: the setting name is a parameter; it changes the tenant only
/// when it names pgenvelope.tenant.
#[tokio::test]
async fn set_config_with_the_setting_name_as_a_parameter() {
    let n = Notes::new().await;
    let t = &n.table;
    let c = n.client_as("org_a").await;
    let sql = "SELECT set_config($1, $2, false)";
    let got: String = c
        .query_one(sql, &[&"application_name", &"pgenvelope-test"])
        .await
        .unwrap()
        .get(0);
    assert_eq!(got, "pgenvelope-test");
    c.query_one(sql, &[&"PGENVELOPE.TENANT", &"org_b"])
        .await
        .unwrap();
    c.execute(
        &format!("INSERT INTO {t} (id, body) VALUES (1, $1)"),
        &[&"secret-b"],
    )
    .await
    .unwrap();
    assert_eq!(n.read_as("org_b", 1).await.unwrap(), "secret-b");
    assert_eq!(
        n.read_as("org_a", 1).await.unwrap_err().as_deref(),
        Some("42501")
    );
}

/// A value moved in the database into a row of another organisation is refused when the row
/// names its organisation, also when the client reads the tenant column in binary (an integer
/// tenant through tokio-postgres, JDBC or asyncpg).
#[tokio::test]
async fn value_of_another_organisation_is_refused_with_a_binary_tenant_column() {
    let table = unique("tbin");
    direct()
        .await
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int primary key, org_id int not null, body text)"
        ))
        .await
        .unwrap();
    let rules = format!(
        "[[table]]\nname = \"{table}\"\ntenant_column = \"org_id\"\nencrypt = [\"body\"]\n"
    );
    let proxy = TestProxy::with(ProxyOptions::encrypting(&rules));
    let _drop = DropTables(table.clone());
    let c = connect(&proxy.pg_config("postgres", None, "test"))
        .await
        .unwrap();
    c.batch_execute(&format!(
        "INSERT INTO {table} (id, org_id, body) VALUES (1, 7, 'secret-7'), (2, 8, 'secret-8')"
    ))
    .await
    .unwrap();
    let sql = format!("SELECT org_id, body FROM {table} WHERE id = $1");
    let body = c
        .query_one(&sql, &[&1i32])
        .await
        .unwrap()
        .get::<_, String>(1);
    assert_eq!(body, "secret-7");
    direct()
        .await
        .batch_execute(&format!(
            "UPDATE {table} SET body = (SELECT body FROM {table} WHERE id = 2) WHERE id = 1"
        ))
        .await
        .unwrap();
    let err = c.query_one(&sql, &[&1i32]).await.unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("XX001"), "{err}");
    let err = c
        .simple_query(&format!("SELECT org_id, body FROM {table} WHERE id = 1"))
        .await
        .unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("XX001"), "{err}");
    // COPY TO checks it too.
    let copied = c
        .copy_out(&format!("COPY {table} (org_id, body) TO STDOUT"))
        .await
        .unwrap();
    let err = futures_util::TryStreamExt::try_collect::<Vec<bytes::Bytes>>(copied)
        .await
        .unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("XX001"), "{err}");
}

/// ORM issue, item 5: tenants of every tenant column type work as ORMs send them. A UUID tenant
/// cast to `uuid` (32 hex digits as Django writes it, upper case, braces) or bound as a `uuid`
/// parameter is taken in its canonical form, as stored, and so is a canonical UUID that starts
/// with `0` (one organisation in sixteen, refused before as "a number not in canonical form").
/// Every value reads back through the proxy with its row's tenant column in the result (so one
/// sealed for another organisation would be refused), and an UPDATE by key alone (tenant looked
/// up) is sealed for the row's own organisation.
#[tokio::test]
async fn tenants_of_every_column_type_as_orms_send_them() {
    let org_uuid = uuid::Uuid::parse_str("0ed04a9b-9c0b-4ef8-bb6d-6bb9bd380a11").unwrap();
    let cases: [(&str, Vec<String>); 4] = [
        (
            "text",
            vec![
                "'acme'".into(),
                "'0ed04a9b-9c0b-4ef8-bb6d-6bb9bd380a11'".into(),
            ],
        ),
        ("integer", vec!["7".into(), "'7'".into(), "7::int4".into()]),
        (
            "bigint",
            vec!["9000000000".into(), "'9000000000'::bigint".into()],
        ),
        (
            "uuid",
            vec![
                "'0ed04a9b-9c0b-4ef8-bb6d-6bb9bd380a11'".into(),
                "'0ed04a9b9c0b4ef8bb6d6bb9bd380a11'::uuid".into(),
                "'0ED04A9B-9C0B-4EF8-BB6D-6BB9BD380A11'::uuid".into(),
                "'{0ed04a9b-9c0b-4ef8-bb6d-6bb9bd380a11}'::UUID".into(),
            ],
        ),
    ];
    for (ty, literals) in cases {
        let f = Fixture::new(
            "tenanttype",
            &format!("(id serial primary key, org_id {ty} not null, value text)"),
            |t| format!("[[table]]\nname = \"{t}\"\ntenant_column = \"org_id\"\nencrypt = [\"value\"]\n"),
        )
        .await;
        let (t, c) = (f.table.clone(), f.client().await);
        // Literals, through the casts ORMs write.
        for (i, lit) in literals.iter().enumerate() {
            c.batch_execute(&format!(
                "INSERT INTO {t} (org_id, value) VALUES ({lit}, 'literal-{i}')"
            ))
            .await
            .unwrap_or_else(|e| panic!("{ty} {lit}: {e}"));
        }
        // Parameters of the column's own type (binary), and the UPDATE by key alone.
        let id: i32 = match ty {
            "text" => {
                c.query_one(
                    &format!("INSERT INTO {t} (org_id, value) VALUES ($1, $2) RETURNING id"),
                    &[&"acme", &"param"],
                )
                .await
            }
            "integer" => {
                c.query_one(
                    &format!("INSERT INTO {t} (org_id, value) VALUES ($1, $2) RETURNING id"),
                    &[&7i32, &"param"],
                )
                .await
            }
            "bigint" => {
                c.query_one(
                    &format!("INSERT INTO {t} (org_id, value) VALUES ($1, $2) RETURNING id"),
                    &[&9_000_000_000i64, &"param"],
                )
                .await
            }
            _ => {
                c.query_one(
                    &format!("INSERT INTO {t} (org_id, value) VALUES ($1::UUID, $2) RETURNING id"),
                    &[&org_uuid, &"param"],
                )
                .await
            }
        }
        .unwrap_or_else(|e| panic!("{ty} parameter: {e}"))
        .get(0);
        c.execute(
            &format!("UPDATE {t} SET value = $1 WHERE {t}.id = $2"),
            &[&"updated", &id],
        )
        .await
        .unwrap_or_else(|e| panic!("{ty} update by key: {e}"));
        let rows = c
            .query(
                &format!("SELECT org_id::text, value FROM {t} ORDER BY id"),
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("{ty} read back: {e}"));
        let values: Vec<String> = rows.iter().map(|r| r.get(1)).collect();
        let mut want: Vec<String> = (0..literals.len())
            .map(|i| format!("literal-{i}"))
            .collect();
        want.push("updated".into());
        assert_eq!(values, want, "{ty}");
        // Read with the tenant column as the table has it (binary for non-text types): each
        // value is its own row's organisation's.
        c.query(&format!("SELECT org_id, value FROM {t}"), &[])
            .await
            .unwrap_or_else(|e| panic!("{ty} read with the tenant column: {e}"));
    }
}
