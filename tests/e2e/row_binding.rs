//! Row binding (`row_key` in the rules): a value opens only in the row it was written to, so
//! ciphertext copied in the database to another row of the same organisation no longer reads
//! as that row's secret.

use futures_util::{SinkExt, TryStreamExt};

use crate::support::harness::{
    code, connect, direct, simple_column, unique, DropTables, ProxyOptions, TestProxy,
};
use crate::support::vault::Fixture;

/// A table `(id bigint primary key, org_id, value)` and a proxy encrypting `value`; `bound`
/// sets `row_key = "id"`.
struct Vault {
    f: Fixture,
    table: String,
}

impl Vault {
    async fn new(bound: bool) -> Self {
        let key = if bound { "row_key = \"id\"\n" } else { "" };
        let f = Fixture::new(
            "rowbind",
            "(id bigint primary key, org_id text not null, value text)",
            |t| {
                format!(
                    "[[table]]\nname = \"{t}\"\ntenant_column = \"org_id\"\n{key}encrypt = [\"value\"]\n"
                )
            },
        )
        .await;
        let table = f.table.clone();
        Vault { f, table }
    }

    async fn client(&self) -> tokio_postgres::Client {
        self.f.client().await
    }

    /// `value` of row `id` read with its key (error code on refusal).
    async fn read(&self, id: i64) -> Result<Option<String>, Option<String>> {
        self.client()
            .await
            .query_one(
                &format!("SELECT id, value FROM {} WHERE id = $1", self.table),
                &[&id],
            )
            .await
            .map(|r| r.get(1))
            .map_err(|e| code(&e))
    }

    /// Copy the stored ciphertext of row `from` into row `to`, straight in the database.
    async fn copy_directly(&self, from: i64, to: i64) {
        direct()
            .await
            .execute(
                &format!(
                    "UPDATE {t} SET value = (SELECT value FROM {t} WHERE id = $1) WHERE id = $2",
                    t = self.table
                ),
                &[&from, &to],
            )
            .await
            .unwrap();
    }
}

/// Item 14: ciphertext copied to another row of the same organisation decrypts there as that
/// row's secret without row binding, and fails authentication with it.
#[tokio::test]
async fn a_value_copied_to_another_row_opens_only_where_it_was_written() {
    for bound in [false, true] {
        let v = Vault::new(bound).await;
        let c = v.client().await;
        let t = &v.table;
        c.batch_execute(&format!(
            "INSERT INTO {t} (id, org_id, value) VALUES (1, 'acme', 'secret-one')"
        ))
        .await
        .unwrap();
        c.execute(
            &format!("INSERT INTO {t} (id, org_id, value) VALUES ($1, $2, $3)"),
            &[&2i64, &"acme", &"secret-two"],
        )
        .await
        .unwrap();
        assert_eq!(v.read(1).await.unwrap().as_deref(), Some("secret-one"));
        assert_eq!(v.read(2).await.unwrap().as_deref(), Some("secret-two"));
        v.copy_directly(1, 2).await;
        if bound {
            assert_eq!(v.read(2).await.unwrap_err().as_deref(), Some("XX001"));
            assert_eq!(v.read(1).await.unwrap().as_deref(), Some("secret-one"));
        } else {
            // The documented limit without row binding.
            assert_eq!(v.read(2).await.unwrap().as_deref(), Some("secret-one"));
        }
    }
}

/// What row binding asks of statements: the key in every write of an encrypted value and in
/// every read of one; the key never changes.
#[tokio::test]
async fn statements_on_a_row_bound_table() {
    let v = Vault::new(true).await;
    let c = v.client().await;
    let t = &v.table;
    c.execute(
        &format!("INSERT INTO {t} (id, org_id, value) VALUES ($1, $2, $3)"),
        &[&1i64, &"acme", &"one"],
    )
    .await
    .unwrap();

    // Read without the key: refused, not returned as ciphertext.
    let err = c
        .query(&format!("SELECT value FROM {t} WHERE id = 1"), &[])
        .await
        .unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("0A000"), "{err}");
    // The key in text format (simple query) works as well as in binary.
    let rows = c
        .simple_query(&format!("SELECT id, value FROM {t} WHERE id = 1"))
        .await
        .unwrap();
    assert_eq!(simple_column(&rows, 1), ["one"]);

    // Writes must give the key; it may not change.
    for sql in [
        format!("INSERT INTO {t} (org_id, value) VALUES ('acme', 'x')"),
        format!("UPDATE {t} SET value = 'x' WHERE org_id = 'acme'"),
        format!("UPDATE {t} SET id = 5 WHERE id = 1 AND org_id = 'acme'"),
        // Refused before it runs: the rows would be gone and their values not returned.
        format!("DELETE FROM {t} WHERE id = 1 RETURNING value"),
        format!("INSERT INTO {t} (id, org_id, value) VALUES (1, 'acme', 'x') ON CONFLICT (org_id) DO UPDATE SET value = EXCLUDED.value"),
        format!("INSERT INTO {t} (id, org_id, value) VALUES (3, 'acme', 'x'), (4, 'acme', 'y') ON CONFLICT (id) DO UPDATE SET value = 'z'"),
    ] {
        let err = c.batch_execute(&sql).await.unwrap_err();
        assert_eq!(code(&err).as_deref(), Some("0A000"), "{sql}: {err}");
    }
    // A key PostgreSQL would store in another form than written.
    let err = c
        .batch_execute(&format!(
            "INSERT INTO {t} (id, org_id, value) VALUES ('007', 'acme', 'x')"
        ))
        .await
        .unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("0A000"), "{err}");

    c.execute(
        &format!("UPDATE {t} SET value = $1 WHERE id = $2 AND org_id = $3"),
        &[&"one-b", &1i64, &"acme"],
    )
    .await
    .unwrap();
    assert_eq!(v.read(1).await.unwrap().as_deref(), Some("one-b"));
    c.batch_execute(&format!(
        "INSERT INTO {t} (id, org_id, value) VALUES (1, 'acme', 'one-c') \
         ON CONFLICT (id) DO UPDATE SET value = EXCLUDED.value \
         WHERE {t}.org_id = EXCLUDED.org_id"
    ))
    .await
    .unwrap();
    assert_eq!(v.read(1).await.unwrap().as_deref(), Some("one-c"));

    // COPY: the key must be among the columns, both ways.
    let sink = c
        .copy_in(&format!("COPY {t} (id, org_id, value) FROM STDIN"))
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(
        b"10\tacme\tten\n11\tacme\televen\n",
    ))
    .await
    .unwrap();
    assert_eq!(sink.finish().await.unwrap(), 2);
    assert_eq!(v.read(11).await.unwrap().as_deref(), Some("eleven"));
    let err = c
        .copy_in::<_, bytes::Bytes>(&format!("COPY {t} (org_id, value) FROM STDIN"))
        .await
        .err()
        .expect("COPY without the key is refused");
    assert_eq!(code(&err).as_deref(), Some("0A000"), "{err}");
    // tokio-postgres leaves a connection whose COPY FROM failed to start unusable (the same
    // happens directly against PostgreSQL): go on with a new one.
    let c = v.client().await;
    let out: Vec<bytes::Bytes> = c
        .copy_out(&format!("COPY {t} (id, value) TO STDOUT"))
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let text = String::from_utf8(out.concat()).unwrap();
    assert!(
        text.contains("10\tten\n") && text.contains("1\tone-c\n"),
        "{text}"
    );
    let err = c
        .copy_out(&format!("COPY {t} (value) TO STDOUT"))
        .await
        .err()
        .expect("COPY without the key is refused");
    assert_eq!(code(&err).as_deref(), Some("0A000"), "{err}");

    // Nothing reached the table in plaintext.
    let stored: Vec<String> = direct()
        .await
        .query(&format!("SELECT value FROM {t}"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        stored.iter().all(|s| s.starts_with("enc:v1:")),
        "{stored:?}"
    );
}

/// A UUID row key, read by a client that asks for binary results.
#[tokio::test]
async fn uuid_row_keys_in_binary_results() {
    let table = unique("rowbind_uuid");
    direct()
        .await
        .batch_execute(&format!(
            "CREATE TABLE {table} (id uuid primary key, value text)"
        ))
        .await
        .unwrap();
    let _drop = DropTables(table.clone());
    let rules = format!("[[table]]\nname = \"{table}\"\nrow_key = \"id\"\nencrypt = [\"value\"]\n");
    let mut opts = ProxyOptions::encrypting(&rules);
    opts.default_tenant = Some("acme".to_owned());
    let proxy = TestProxy::with(opts);
    let c = connect(&proxy.pg_config("postgres", None, "test"))
        .await
        .unwrap();
    c.batch_execute(&format!(
        "INSERT INTO {table} (id, value) VALUES ('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'u-one')"
    ))
    .await
    .unwrap();
    // Upper case is stored in lower case: not the key it would be sealed for.
    let err = c
        .batch_execute(&format!(
            "INSERT INTO {table} (id, value) VALUES ('B0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11', 'u-two')"
        ))
        .await
        .unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("0A000"), "{err}");
    let rows = c
        .query(&format!("SELECT id, value FROM {table}"), &[])
        .await
        .unwrap();
    let values: Vec<String> = rows.iter().map(|r| r.get(1)).collect();
    assert_eq!(values, ["u-one"]);
}

/// A dump taken directly from the database before `row_key` was added (unbound values) and
/// restored through a proxy with row binding: each value is sealed again, bound to the row it
/// is restored into, by INSERT literals, parameters and COPY alike; a bound value restored into
/// its own row is stored unchanged; a value of another organisation is still refused, and so
/// is a bound value given where the rules bind nothing.
#[tokio::test]
async fn a_dump_from_before_row_binding_restores_bound() {
    let before = Vault::new(false).await;
    let t = before.table.clone();
    let c = before.client().await;
    c.batch_execute(&format!(
        "INSERT INTO {t} (id, org_id, value) VALUES (1, 'acme', 'one'), (2, 'acme', 'two'), \
         (3, 'globex', 'three')"
    ))
    .await
    .unwrap();
    let stored = || async {
        direct()
            .await
            .query(
                &format!("SELECT id, org_id, value FROM {t} ORDER BY id"),
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r.get::<_, i64>(0),
                    r.get::<_, String>(1),
                    r.get::<_, String>(2),
                )
            })
            .collect::<Vec<_>>()
    };
    let is_bound = |v: &str| {
        pgenvelope::crypto::EncV1::parse(v.as_bytes())
            .unwrap()
            .is_row_bound()
    };
    let dump = stored().await;
    assert!(dump.iter().all(|(_, _, v)| !is_bound(v)));
    direct()
        .await
        .batch_execute(&format!("TRUNCATE {t}"))
        .await
        .unwrap();

    // The same table, key store and KEK, now with `row_key = "id"`.
    let rules = format!(
        "[[table]]\nname = \"{t}\"\ntenant_column = \"org_id\"\nrow_key = \"id\"\nencrypt = [\"value\"]\n"
    );
    let mut opts = ProxyOptions::encrypting(&rules);
    opts.key_schema = before.f.proxy.key_schema.clone();
    opts.kek_path = Some(before.f.proxy.kek_path.clone());
    let after = TestProxy::with(opts);
    let c = connect(&after.pg_config("postgres", None, "test"))
        .await
        .unwrap();
    // Row 1 as a literal, row 2 as a parameter, row 3 by COPY.
    c.batch_execute(&format!(
        "INSERT INTO {t} (id, org_id, value) VALUES (1, 'acme', '{}')",
        dump[0].2
    ))
    .await
    .unwrap();
    insert(&c, &t, 2, "acme", &dump[1].2).await.unwrap();
    copy_row(&c, &t, format!("3\tglobex\t{}\n", dump[2].2))
        .await
        .unwrap();

    let restored = stored().await;
    assert!(restored.iter().all(|(_, _, v)| is_bound(v)), "{restored:?}");
    let values: Vec<String> = c
        .query(&format!("SELECT id, value FROM {t} ORDER BY id"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(1))
        .collect();
    assert_eq!(values, ["one", "two", "three"]);

    // A bound value restored into its own row is stored as it is.
    c.batch_execute(&format!("DELETE FROM {t} WHERE id = 1 AND org_id = 'acme'"))
        .await
        .unwrap();
    insert(&c, &t, 1, "acme", &restored[0].2).await.unwrap();
    assert_eq!(stored().await[0].2, restored[0].2);

    // An unbound value of acme restored into a row of globex is refused.
    let err = insert(&c, &t, 4, "globex", &dump[0].2).await.unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("42501"), "{err}");

    // A bound value given to a proxy whose rules bind nothing cannot be opened there: refused,
    // not stored as the encryption of its envelope text.
    let err = insert(&before.client().await, &t, 5, "acme", &restored[1].2)
        .await
        .unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("XX001"), "{err}");

    // An envelope of this column under a data key the key store does not know (another
    // deployment's dump) is refused too, by INSERT and by COPY.
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut raw = b64.decode(&dump[0].2["enc:v1:".len()..]).unwrap();
    raw[1..17].copy_from_slice(&[0x5a; 16]);
    let foreign = format!("enc:v1:{}", b64.encode(raw));
    let err = insert(&c, &t, 6, "acme", &foreign).await.unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("XX001"), "{err}");
    let err = copy_row(&c, &t, format!("6\tacme\t{foreign}\n"))
        .await
        .unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("XX001"), "{err:?}");
    assert_eq!(stored().await.len(), 3);
}

/// `INSERT INTO t (id, org_id, value)` with the values as parameters.
async fn insert(
    c: &tokio_postgres::Client,
    t: &str,
    id: i64,
    org: &str,
    value: &str,
) -> Result<u64, tokio_postgres::Error> {
    c.execute(
        &format!("INSERT INTO {t} (id, org_id, value) VALUES ($1, $2, $3)"),
        &[&id, &org, &value],
    )
    .await
}

/// `COPY t (id, org_id, value) FROM STDIN` of one text-format line.
async fn copy_row(
    c: &tokio_postgres::Client,
    t: &str,
    line: String,
) -> Result<u64, tokio_postgres::Error> {
    let sink = c
        .copy_in::<_, bytes::Bytes>(&format!("COPY {t} (id, org_id, value) FROM STDIN"))
        .await?;
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from(line)).await?;
    sink.finish().await
}

/// Item 6 of the ORM issue: an INSERT that leaves a serial or identity key to its default (as
/// every ORM's does, reading the key back with RETURNING) has its keys drawn by the proxy from
/// the column's own sequence on the same session, so each value is sealed for the key its row
/// gets; in simple queries, prepared statements (new keys at each execution) and multi-row
/// VALUES. A key with no sequence behind it is refused, as is a literal in a prepared INSERT
/// (it would be sealed once for keys drawn at each execution).
#[tokio::test]
async fn keys_left_to_their_serial_or_identity_default_are_drawn() {
    for key_type in [
        "bigserial",
        "int GENERATED ALWAYS AS IDENTITY",
        "bigint GENERATED BY DEFAULT AS IDENTITY",
    ] {
        let table = unique("rowdraw");
        direct()
            .await
            .batch_execute(&format!(
                "CREATE TABLE {table} (id {key_type} primary key, org_id text not null, value text)"
            ))
            .await
            .unwrap();
        let _drop = DropTables(table.clone());
        let rules = format!(
            "[[table]]\nname = \"{table}\"\ntenant_column = \"org_id\"\nrow_key = \"id\"\n\
             encrypt = [\"value\"]\n"
        );
        let proxy = TestProxy::with(ProxyOptions::encrypting(&rules));
        let c = connect(&proxy.pg_config("postgres", None, "test"))
            .await
            .unwrap();
        let t = &table;
        // Simple query, two rows, RETURNING the keys (Django with client-side binding).
        let rows = c
            .simple_query(&format!(
                r#"INSERT INTO "{t}" ("org_id", "value") VALUES ('acme', 'one'), ('globex', 'two') RETURNING "{t}"."id""#
            ))
            .await
            .unwrap();
        assert_eq!(simple_column(&rows, 0).len(), 2, "{key_type}");
        // Prepared, run twice: new keys each time (SQLAlchemy, Sequelize, Knex).
        let insert = c
            .prepare(&format!(
                "INSERT INTO {t} (org_id, value) VALUES ($1, $2), ($3, $4) RETURNING id::bigint"
            ))
            .await
            .unwrap();
        assert_eq!(
            insert.params().len(),
            4,
            "the drawn keys are not the client's"
        );
        for (a, b) in [("three", "four"), ("five", "six")] {
            let ids = c.query(&insert, &[&"acme", &a, &"acme", &b]).await.unwrap();
            assert_eq!(ids.len(), 2);
        }
        // Every value reads back with its own row's key, in its own organisation.
        let got: Vec<(String, String)> = c
            .query(
                &format!("SELECT id, org_id, value FROM {t} ORDER BY id"),
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(1), r.get(2)))
            .collect();
        let want: Vec<(String, String)> = [
            ("acme", "one"),
            ("globex", "two"),
            ("acme", "three"),
            ("acme", "four"),
            ("acme", "five"),
            ("acme", "six"),
        ]
        .iter()
        .map(|(o, v)| (o.to_string(), v.to_string()))
        .collect();
        assert_eq!(got, want, "{key_type}");
        // A literal in a prepared INSERT whose key is drawn at each execution: refused.
        let err = c
            .execute(
                &format!("INSERT INTO {t} (org_id, value) VALUES ($1, 'lit')"),
                &[&"acme"],
            )
            .await
            .unwrap_err();
        assert_eq!(code(&err).as_deref(), Some("0A000"), "{err}");
        let stored: Vec<String> = direct()
            .await
            .query(&format!("SELECT value FROM {t}"), &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(stored.len(), 6);
        assert!(
            stored.iter().all(|s| s.starts_with("enc:v1:")),
            "{stored:?}"
        );
    }
    // No sequence behind the key: refused, nothing written.
    let v = Vault::new(true).await;
    let c = v.client().await;
    for sql in [
        format!(
            "INSERT INTO {} (org_id, value) VALUES ('acme', 'x')",
            v.table
        ),
        format!("INSERT INTO {} (org_id, value) VALUES ($1, $2)", v.table),
    ] {
        let err = if sql.contains('$') {
            c.execute(&sql, &[&"acme", &"x"]).await.unwrap_err()
        } else {
            c.batch_execute(&sql).await.unwrap_err()
        };
        assert_eq!(code(&err).as_deref(), Some("0A000"), "{sql}: {err}");
        let message = err
            .as_db_error()
            .map(|d| d.message().to_owned())
            .unwrap_or_default();
        assert!(message.contains("sequence"), "{message}");
    }
}
