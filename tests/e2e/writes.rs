//! The write path end to end: UPDATE/ON CONFLICT self-references, COPY without a column list,
//! long identifiers, DDL that would rewrite encrypted columns, and statements that used to be
//! refused although they cannot leak plaintext.

use futures_util::SinkExt;

use crate::support::harness::{code, direct};
use crate::support::harness::{unique, ProxyOptions, TestProxy};
use crate::support::vault::Vault;

async fn refused(client: &tokio_postgres::Client, sql: &str) {
    let err = client.batch_execute(sql).await.expect_err(sql);
    assert_eq!(code(&err).as_deref(), Some("0A000"), "{sql}: {err}");
    assert!(
        err.as_db_error()
            .is_some_and(|d| d.message().starts_with("pgenvelope:")),
        "{sql}: {err}"
    );
}

async fn copy(
    client: &tokio_postgres::Client,
    sql: &str,
    data: impl AsRef<[u8]>,
) -> Result<u64, String> {
    let show = |e: tokio_postgres::Error| match e.as_db_error() {
        Some(d) => d.message().to_owned(),
        None => e.to_string(),
    };
    let sink = client.copy_in(sql).await.map_err(show)?;
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::copy_from_slice(data.as_ref()))
        .await
        .map_err(show)?;
    sink.finish().await.map_err(show)
}

#[tokio::test]
async fn update_from_a_relation_named_like_the_aliased_target_is_not_the_same_column() {
    let v = Vault::new().await;
    let t = &v.table;
    let client = v.client().await;
    client
        .batch_execute(&format!(
            "INSERT INTO {t} (org_id, value) VALUES ('acme', 'old-secret')"
        ))
        .await
        .unwrap();
    refused(
        &client,
        &format!("UPDATE {t} v SET value = {t}.value FROM (SELECT 'leak1'::text AS value) AS {t}"),
    )
    .await;
    refused(
        &client,
        &format!(
            "WITH {t} AS (SELECT 'leak2'::text AS value) UPDATE {t} AS v SET value = {t}.value FROM {t}"
        ),
    )
    .await;
    // The same column of the same row, through the alias or bare, still passes.
    client
        .batch_execute(&format!(
            "UPDATE {t} v SET value = v.value; UPDATE {t} SET value = value, note = {t}.note"
        ))
        .await
        .unwrap();
    v.assert_encrypted_at_rest(&["leak1", "leak2", "old-secret"])
        .await;
}

#[tokio::test]
async fn on_conflict_update_with_an_aliased_target_passes() {
    let v = Vault::new().await;
    let t = &v.table;
    let client = v.client().await;
    let sql = format!(
        "INSERT INTO {t} AS v (id, org_id, value, note) VALUES (1, 'acme', 'first', 'first') \
         ON CONFLICT (id) DO UPDATE SET value = v.value, note = EXCLUDED.note \
         WHERE v.org_id = EXCLUDED.org_id"
    );
    client.batch_execute(&sql).await.unwrap();
    client.batch_execute(&sql).await.unwrap();
    let row = client
        .query_one(&format!("SELECT value, note FROM {t}"), &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "first");
    assert_eq!(row.get::<_, String>(1), "first");
    // Another column through the alias is still refused.
    refused(
        &client,
        &format!(
            "INSERT INTO {t} AS v (id, org_id, value) VALUES (1, 'acme', 'x') \
             ON CONFLICT (id) DO UPDATE SET value = v.name"
        ),
    )
    .await;
    v.assert_encrypted_at_rest(&["first"]).await;
}

#[tokio::test]
async fn copy_without_a_column_list_skips_generated_columns() {
    let table = unique("wgen");
    direct()
        .await
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int, org_id text, tag text GENERATED ALWAYS AS (org_id || '!') STORED, value text)"
        ))
        .await
        .unwrap();
    let (_proxy, client) = value_proxy(&table).await;
    let n = copy(
        &client,
        &format!("COPY {table} FROM STDIN"),
        "1\tacme\tcopied-secret\n",
    )
    .await
    .unwrap();
    assert_eq!(n, 1);
    let stored: String = direct()
        .await
        .query_one(&format!("SELECT value FROM {table}"), &[])
        .await
        .unwrap()
        .get(0);
    assert!(stored.starts_with("enc:v1:"), "stored in plaintext");
    let read: String = client
        .query_one(&format!("SELECT value FROM {table}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(read, "copied-secret");
    direct()
        .await
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

#[tokio::test]
async fn identifiers_longer_than_63_bytes_are_truncated_like_postgres() {
    // A protected table whose name is exactly 63 bytes; the statement spells it longer.
    let base = unique("wlong");
    let table = format!("{base}{}", "x".repeat(63 - base.len()));
    assert_eq!(table.len(), 63);
    direct()
        .await
        .batch_execute(&format!(
            "CREATE TABLE {table} (id serial, org_id text, value text)"
        ))
        .await
        .unwrap();
    let (_proxy, client) = value_proxy(&table).await;
    client
        .batch_execute(&format!(
            "INSERT INTO {table}_and_more (org_id, value) VALUES ('acme', 'long-secret')"
        ))
        .await
        .unwrap();
    refused(&client, &format!("UPDATE {table}zzz SET value = org_id")).await;
    let stored: String = direct()
        .await
        .query_one(&format!("SELECT value FROM {table}"), &[])
        .await
        .unwrap()
        .get(0);
    assert!(stored.starts_with("enc:v1:"), "stored in plaintext");
    direct()
        .await
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

#[tokio::test]
async fn ddl_that_rewrites_renames_or_retypes_encrypted_columns_is_refused() {
    let v = Vault::new().await;
    let t = &v.table;
    let other = unique("wplain");
    let dom = unique("wdom");
    let d = direct().await;
    d.batch_execute(&format!(
        "CREATE TABLE {other} (id int, org_id text, value text); \
         CREATE DOMAIN {dom} AS text DEFAULT 'domain-plain'; \
         ALTER TABLE {t} ADD COLUMN spare text"
    ))
    .await
    .unwrap();
    let client = v.client().await;
    for sql in [
        format!("ALTER TABLE {t} ALTER COLUMN value TYPE text USING 'plain'"),
        format!("ALTER TABLE {t} ALTER value TYPE char(200)"),
        format!("ALTER TABLE {t} ALTER COLUMN note SET DATA TYPE text USING lower(note)"),
        format!("ALTER TABLE {t} RENAME COLUMN value TO old_value"),
        format!("ALTER TABLE {t} RENAME COLUMN spare TO value"),
        format!("ALTER TABLE {t} RENAME TO {t}_moved"),
        format!("ALTER TABLE {other} RENAME TO {t}"),
        format!("ALTER TABLE {t} ALTER COLUMN value SET DEFAULT 'plain'"),
        format!("ALTER TABLE {t} DROP COLUMN note"),
        format!("ALTER TABLE {t} DROP COLUMN note, ADD COLUMN note text DEFAULT 'plain'"),
        format!("ALTER TABLE {t} DROP CONSTRAINT pgenvelope_enc_value"),
        format!("ALTER TABLE IF EXISTS {t} DROP CONSTRAINT IF EXISTS pgenvelope_enc_note"),
        format!("ALTER TABLE {other} INHERIT {t}"),
        format!("ALTER TABLE {t} INHERIT {other}"),
        format!("ALTER TABLE {t} ATTACH PARTITION {other} DEFAULT"),
        format!("ALTER TABLE {t} SET SCHEMA pg_temp"),
    ] {
        refused(&client, &sql).await;
    }
    d.batch_execute(&format!("ALTER TABLE {t} DROP COLUMN note"))
        .await
        .unwrap();
    refused(&client, &format!("ALTER TABLE {t} ADD COLUMN note {dom}")).await;
    // DDL that leaves encrypted columns alone still passes.
    client
        .batch_execute(&format!(
            "ALTER TABLE {t} ADD COLUMN extra int DEFAULT 1; ALTER TABLE {t} ALTER COLUMN name SET DEFAULT 'n'; \
             ALTER TABLE {t} RENAME COLUMN extra TO extra2"
        ))
        .await
        .unwrap();
    d.batch_execute(&format!("DROP TABLE {other}; DROP DOMAIN {dom}"))
        .await
        .unwrap();
}

/// Migrations as the ORMs emit them that cannot write plaintext pass: a nullable encrypted
/// column without a default (Django's AddField), and a type change to text or varchar without a
/// `USING` that rewrites values (Django's AlterField, Knex's `alter()`, Sequelize's
/// `changeColumn`). Every value stays readable; a varchar too short for the ciphertext makes the
/// ALTER fail rather than truncate.
#[tokio::test]
async fn orm_migrations_that_cannot_write_plaintext_pass() {
    let v = Vault::new().await;
    let t = &v.table;
    direct()
        .await
        .batch_execute(&format!("ALTER TABLE {t} DROP COLUMN note"))
        .await
        .unwrap();
    let client = v.client().await;
    client
        .batch_execute(&format!(
            "INSERT INTO {t} (org_id, name, value) VALUES ('acme', 'a', 'secret-a')"
        ))
        .await
        .unwrap();
    // Django AddField (TextField(null=True)).
    client
        .batch_execute(&format!(r#"ALTER TABLE "{t}" ADD COLUMN "note" text NULL"#))
        .await
        .unwrap();
    client
        .batch_execute(&format!(
            "UPDATE {t} SET note = 'note-a' WHERE org_id = 'acme' AND name = 'a'"
        ))
        .await
        .unwrap();
    // Too short for the ciphertext: PostgreSQL refuses, nothing is truncated.
    let err = client
        .batch_execute(&format!(
            "ALTER TABLE {t} ALTER COLUMN value TYPE varchar(12)"
        ))
        .await
        .unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("22001"), "{err}");
    for sql in [
        // Sequelize changeColumn, Alembic alter_column.
        format!(r#"ALTER TABLE "{t}" ALTER COLUMN "value" TYPE VARCHAR(500)"#),
        // Django AlterField CharField(500) -> TextField.
        format!(r#"ALTER TABLE "{t}" ALTER COLUMN "value" TYPE text USING "value"::text"#),
        // Knex .alter().
        format!(
            r#"alter table "{t}" alter column "note" drop default, alter column "note" drop not null, alter column "note" type varchar(1000) using ("note"::text)"#
        ),
    ] {
        client.batch_execute(&sql).await.unwrap();
    }
    let row = client
        .query_one(
            &format!("SELECT value, note FROM {t} WHERE org_id = 'acme'"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "secret-a");
    assert_eq!(row.get::<_, String>(1), "note-a");
    v.assert_encrypted_at_rest(&["secret-a", "note-a"]).await;
}

#[tokio::test]
async fn do_blocks_and_role_statements_that_name_no_protected_table_pass() {
    let v = Vault::new().await;
    let client = v.client().await;
    client
        .batch_execute("DO $$ BEGIN EXECUTE 'select 1'; END $$")
        .await
        .unwrap();
    client
        .batch_execute(
            "DO $$ DECLARE n int; BEGIN EXECUTE 'select 1' INTO n; PERFORM n; END $$ LANGUAGE plpgsql",
        )
        .await
        .unwrap();
    client
        .batch_execute("BEGIN; CREATE USER \"u6\\\"\"\"; RESET ROLE; ROLLBACK")
        .await
        .unwrap();
    // Still refused when the dynamic SQL names the protected table.
    refused(
        &client,
        &format!(
            "DO $$ BEGIN EXECUTE 'insert into {} (org_id, value) values (''a'', ''b'')'; END $$",
            v.table
        ),
    )
    .await;
}

#[tokio::test]
async fn typed_literals_and_qualified_text_types_are_encrypted() {
    let v = Vault::new().await;
    let t = &v.table;
    let client = v.client().await;
    client
        .batch_execute(&format!(
            "INSERT INTO {t} (org_id, value, note) VALUES ('acme', text 'typed-one', varchar 'typed-two'); \
             INSERT INTO {t} (org_id, value, note) VALUES ('acme', 'typed-three'::pg_catalog.text, pg_catalog.text 'typed-four'); \
             UPDATE {t} SET note = CAST('typed-five' AS pg_catalog.varchar) WHERE org_id = 'acme' AND id = (SELECT max(id) FROM {t})"
        ))
        .await
        .unwrap();
    let rows = client
        .query(&format!("SELECT value, note FROM {t} ORDER BY id"), &[])
        .await
        .unwrap();
    let got: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        got,
        vec![
            ("typed-one".into(), "typed-two".into()),
            ("typed-three".into(), "typed-five".into()),
        ]
    );
    v.assert_encrypted_at_rest(&["typed"]).await;
    refused(
        &client,
        &format!("INSERT INTO {t} (org_id, value) VALUES ('acme', varchar(3) 'truncated')"),
    )
    .await;
}

#[tokio::test]
async fn positional_order_by_of_a_plain_output_column_passes() {
    let v = Vault::new().await;
    let t = &v.table;
    let client = v.client().await;
    client
        .batch_execute(&format!(
            "INSERT INTO {t} (org_id, name, value) VALUES ('acme', 'b', 's2'), ('acme', 'a', 's1')"
        ))
        .await
        .unwrap();
    let rows = client
        .query(&format!("SELECT name, value FROM {t} ORDER BY 1"), &[])
        .await
        .unwrap();
    let got: Vec<String> = rows.iter().map(|r| r.get(1)).collect();
    assert_eq!(got, vec!["s1", "s2"]);
    // A `*` over a derived table or CTE of known columns keeps positions.
    let rows = client
        .query(
            &format!("SELECT * FROM (SELECT name, value FROM {t}) s ORDER BY 1"),
            &[],
        )
        .await
        .unwrap();
    let got: Vec<String> = rows.iter().map(|r| r.get(1)).collect();
    assert_eq!(got, vec!["s1", "s2"]);
    refused(
        &client,
        &format!("WITH s AS (SELECT name, value FROM {t}) SELECT * FROM s ORDER BY 2"),
    )
    .await;
    // Through a wildcard the width is unknown: still refused (the analyser has no catalog).
    refused(&client, &format!("SELECT * FROM {t} ORDER BY 1")).await;
    refused(&client, &format!("SELECT name, value FROM {t} ORDER BY 2")).await;
}

#[tokio::test]
async fn copy_header_where_and_encoding_options() {
    let v = Vault::new().await;
    let t = &v.table;
    let client = v.client().await;
    for (opts, data) in [
        ("(FORMAT csv, HEADER off)", &b"acme,h-off\n"[..]),
        ("(FORMAT csv, HEADER 0)", b"acme,h-zero\n"),
        ("(FORMAT csv, HEADER false)", b"acme,h-false\n"),
        ("(FORMAT csv, HEADER true)", b"org_id,value\nacme,h-true\n"),
        (
            "(FORMAT csv, HEADER MATCH)",
            b"org_id,value\nacme,h-match\n",
        ),
        ("(FORMAT text, ENCODING 'UTF8')", b"acme\th-enc\n"),
        ("(FORMAT text, ENCODING 'LATIN1')", b"acme\th-\xe9\n"),
    ] {
        copy(
            &client,
            &format!("COPY {t} (org_id, value) FROM STDIN WITH {opts}"),
            data,
        )
        .await
        .unwrap_or_else(|e| panic!("{opts}: {e:?}"));
    }
    copy(
        &client,
        &format!("COPY {t} (org_id, value) FROM STDIN WHERE org_id = 'acme'"),
        "acme\th-where\nother\th-skipped\n",
    )
    .await
    .unwrap();
    let err = copy(
        &client,
        &format!("COPY {t} (org_id, value) FROM STDIN WHERE value = 'x'"),
        "acme\tx\n",
    )
    .await
    .expect_err("WHERE on an encrypted column");
    assert!(err.contains("pgenvelope:"), "{err}");
    let rows = client
        .query(&format!("SELECT value FROM {t} ORDER BY id"), &[])
        .await
        .unwrap();
    let got: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        got,
        vec!["h-off", "h-zero", "h-false", "h-true", "h-match", "h-enc", "h-\u{e9}", "h-where"]
    );
    v.assert_encrypted_at_rest(&["h-"]).await;
}

#[tokio::test]
async fn coalesce_over_an_encrypted_column_decrypts() {
    let v = Vault::new().await;
    let t = &v.table;
    let client = v.client().await;
    client
        .batch_execute(&format!(
            "INSERT INTO {t} (org_id, value) VALUES ('acme', 'co-secret'), ('acme', NULL)"
        ))
        .await
        .unwrap();
    let rows = client
        .query(
            &format!("SELECT coalesce(value, '') FROM {t} ORDER BY id"),
            &[],
        )
        .await
        .unwrap();
    let got: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(got, vec!["co-secret", ""]);
    refused(&client, &format!("SELECT coalesce(value, name) FROM {t}")).await;
}

#[tokio::test]
async fn plaintext_that_starts_like_an_envelope_is_encrypted() {
    let v = Vault::new().await;
    let t = &v.table;
    let client = v.client().await;
    client
        .batch_execute(&format!(
            "INSERT INTO {t} (org_id, value) VALUES ('acme', 'enc:v1:not-really')"
        ))
        .await
        .unwrap();
    client
        .execute(
            &format!("INSERT INTO {t} (org_id, value) VALUES ($1, $2)"),
            &[&"acme", &"enc:v1:AAAA"],
        )
        .await
        .unwrap();
    copy(
        &client,
        &format!("COPY {t} (org_id, value) FROM STDIN"),
        "acme\tenc:v1:copied\n",
    )
    .await
    .unwrap();
    let rows = client
        .query(&format!("SELECT value FROM {t} ORDER BY id"), &[])
        .await
        .unwrap();
    let got: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        got,
        vec!["enc:v1:not-really", "enc:v1:AAAA", "enc:v1:copied"]
    );
    let stored = v.stored().await;
    assert!(stored
        .iter()
        .all(|(_, value, _)| value.as_deref().is_some_and(|s| s.len() > 40)));
    // A valid envelope of another organisation stays refused.
    let theirs = stored[0].1.clone().unwrap();
    let err = client
        .execute(
            &format!("INSERT INTO {t} (org_id, value) VALUES ($1, $2)"),
            &[&"globex", &theirs],
        )
        .await
        .unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("42501"), "{err}");
}

#[tokio::test]
async fn create_table_with_a_default_on_an_encrypted_column_is_refused() {
    let table = unique("wcreate");
    let dom = unique("wcdom");
    direct()
        .await
        .batch_execute(&format!(
            "CREATE DOMAIN {dom} AS text DEFAULT 'domain-plain'"
        ))
        .await
        .unwrap();
    let (_proxy, client) = value_proxy(&table).await;
    for sql in [
        format!("CREATE TABLE {table} (org_id text, value text DEFAULT 'plain')"),
        format!(
            "CREATE TABLE {table} (org_id text, value text GENERATED ALWAYS AS (org_id) STORED)"
        ),
        format!("CREATE TABLE {table} (org_id text, value {dom})"),
    ] {
        refused(&client, &sql).await;
    }
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id serial, org_id text DEFAULT 'acme', value text NOT NULL)"
        ))
        .await
        .unwrap();
    direct()
        .await
        .batch_execute(&format!("DROP TABLE {table}; DROP DOMAIN {dom}"))
        .await
        .unwrap();
}

/// A proxy encrypting `value` of `public.{table}` (tenant column `org_id`), and a client of it.
async fn value_proxy(table: &str) -> (TestProxy, tokio_postgres::Client) {
    let rules = format!(
        "[[table]]\nname = \"public.{table}\"\ntenant_column = \"org_id\"\nencrypt = [\"value\"]\n"
    );
    let proxy = TestProxy::with(ProxyOptions::encrypting(&rules));
    let client = crate::support::harness::connect(&proxy.pg_config("postgres", None, "test"))
        .await
        .unwrap();
    (proxy, client)
}
