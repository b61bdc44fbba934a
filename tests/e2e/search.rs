//! Equality search on searchable encrypted columns, through the real proxy and PostgreSQL:
//! every operator form in the simple and extended protocol (text and binary parameters),
//! per organisation, across a DEK rotation, served by an index.

use std::collections::BTreeSet;
use std::process::Command;

use pgenvelope::crypto::EncV1;

use crate::support::harness::{code, direct, main_pg};
use crate::support::raw::{bind, codes, execute, parse, raw, sync};
use crate::support::vault::Fixture;

const COLUMNS: &str =
    "(id serial primary key, org_id text not null, email text, code text, notes text)";

fn rules(t: &str) -> String {
    format!(
        "[[table]]\nname = \"{t}\"\ntenant_column = \"org_id\"\n\
         encrypt = [\"notes\", {{ name = \"email\", search = \"equality\" }}, {{ name = \"code\", search = \"equality-ci\" }}]\n"
    )
}

/// The rows of both organisations: (org, email, code).
const ROWS: &[(&str, Option<&str>, Option<&str>)] = &[
    ("acme", Some("ada@example.com"), Some("AB-1")),
    ("acme", Some("bob@example.com"), Some("ab-1")),
    ("acme", Some("ada@example.com"), Some("Straße")),
    ("acme", None, None),
    ("acme", Some("Ada@example.com"), Some("CAFÉ")),
    ("globex", Some("ada@example.com"), Some("ab-1")),
    ("globex", Some("eve@example.com"), Some("x")),
];

/// Inserts [`ROWS`] through the proxy; returns their ids in order.
async fn fill(f: &Fixture) -> Vec<i32> {
    let c = f.client().await;
    let mut ids = Vec::new();
    for (org, email, code) in ROWS {
        let row = c
            .query_one(
                &format!(
                    "INSERT INTO {} (org_id, email, code, notes) VALUES ($1, $2, $3, $4) RETURNING id",
                    f.table
                ),
                &[org, email, code, &"n"],
            )
            .await
            .unwrap();
        ids.push(row.get(0));
    }
    ids
}

/// Ids of the rows of `org` for which `keep` holds.
fn expected(
    ids: &[i32],
    org: &str,
    keep: impl Fn(Option<&str>, Option<&str>) -> bool,
) -> BTreeSet<i32> {
    ROWS.iter()
        .zip(ids)
        .filter(|((o, e, c), _)| *o == org && keep(*e, *c))
        .map(|(_, id)| *id)
        .collect()
}

fn lower(s: Option<&str>) -> Option<String> {
    s.map(str::to_lowercase)
}

async fn ids_of(c: &tokio_postgres::Client, sql: &str) -> BTreeSet<i32> {
    c.simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(|v| v.parse().unwrap()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn every_operator_form_returns_the_rows_a_plaintext_column_would() {
    let f = Fixture::new("search", COLUMNS, rules).await;
    let ids = fill(&f).await;
    let t = f.table.clone();
    let c = f.client().await;
    c.batch_execute("SET pgenvelope.tenant = 'acme'")
        .await
        .unwrap();
    let ada = Some("ada@example.com");

    // Simple protocol: literals.
    let simple: Vec<(String, BTreeSet<i32>)> = vec![
        (
            format!("SELECT id FROM {t} WHERE email = 'ada@example.com'"),
            expected(&ids, "acme", |e, _| e == ada),
        ),
        (
            format!("SELECT id FROM {t} WHERE \"{t}\".\"email\" <> 'ada@example.com'"),
            expected(&ids, "acme", |e, _| e.is_some() && e != ada),
        ),
        (
            format!("SELECT id FROM {t} WHERE email IN ('bob@example.com', 'Ada@example.com', 'nobody')"),
            expected(&ids, "acme", |e, _| {
                matches!(e, Some("bob@example.com" | "Ada@example.com"))
            }),
        ),
        (
            format!("SELECT id FROM {t} WHERE email NOT IN ('bob@example.com')"),
            expected(&ids, "acme", |e, _| e.is_some() && e != Some("bob@example.com")),
        ),
        (
            format!("SELECT id FROM {t} WHERE email IS DISTINCT FROM 'ada@example.com'"),
            expected(&ids, "acme", |e, _| e != ada),
        ),
        (
            format!("SELECT id FROM {t} WHERE email IS NOT DISTINCT FROM NULL"),
            expected(&ids, "acme", |e, _| e.is_none()),
        ),
        (
            format!("SELECT id FROM {t} WHERE email::text = 'ada@example.com'::varchar"),
            expected(&ids, "acme", |e, _| e == ada),
        ),
        // Case-insensitive: as Django's iexact writes it, and with lower().
        (
            format!("SELECT id FROM {t} WHERE UPPER(\"{t}\".\"code\"::text) = UPPER('aB-1')"),
            expected(&ids, "acme", |_, c| lower(c).as_deref() == Some("ab-1")),
        ),
        (
            format!("SELECT id FROM {t} WHERE lower(code) = lower('café')"),
            expected(&ids, "acme", |_, c| lower(c).as_deref() == Some("café")),
        ),
        (
            format!("SELECT id FROM {t} WHERE lower(code) IN (lower('STRASSE'), lower('straße'))"),
            expected(&ids, "acme", |_, c| c == Some("Straße")),
        ),
        // The tenant from the same condition, and a self-join on the same column.
        (
            format!("SELECT id FROM {t} WHERE org_id = 'acme' AND email = 'ada@example.com'"),
            expected(&ids, "acme", |e, _| e == ada),
        ),
        (
            format!(
                "SELECT DISTINCT a.id FROM {t} a JOIN {t} b ON a.email = b.email AND a.id <> b.id"
            ),
            expected(&ids, "acme", |e, _| e == ada),
        ),
        (
            format!("SELECT a.id FROM {t} a JOIN {t} b ON b.id = a.id AND b.email = 'bob@example.com'"),
            expected(&ids, "acme", |e, _| e == Some("bob@example.com")),
        ),
    ];
    for (sql, want) in &simple {
        assert_eq!(&ids_of(&c, sql).await, want, "{sql}");
    }

    // Extended protocol, binary parameters (tokio-postgres sends text as its bytes, binary).
    let rows = |rows: Vec<tokio_postgres::Row>| -> BTreeSet<i32> {
        rows.iter().map(|r| r.get(0)).collect()
    };
    let q = format!("SELECT id FROM {t} WHERE email = $1");
    assert_eq!(
        rows(c.query(&q, &[&"ada@example.com"]).await.unwrap()),
        expected(&ids, "acme", |e, _| e == ada)
    );
    let q = format!("SELECT id FROM {t} WHERE email = ANY($1)");
    let list = vec!["bob@example.com", "ada@example.com"];
    assert_eq!(
        rows(c.query(&q, &[&list]).await.unwrap()),
        expected(&ids, "acme", |e, _| e == ada
            || e == Some("bob@example.com"))
    );
    let q = format!("SELECT id FROM {t} WHERE upper(code) = upper($1::text)");
    assert_eq!(
        rows(c.query(&q, &[&"Ab-1"]).await.unwrap()),
        expected(&ids, "acme", |_, c| lower(c).as_deref() == Some("ab-1"))
    );
    let q = format!("SELECT id FROM {t} WHERE email IS NOT DISTINCT FROM $1");
    assert_eq!(
        rows(c.query(&q, &[&None::<&str>]).await.unwrap()),
        expected(&ids, "acme", |e, _| e.is_none())
    );
    let q = format!("SELECT id FROM {t} WHERE email = $1 AND org_id = $2");
    assert_eq!(
        rows(c.query(&q, &[&"ada@example.com", &"acme"]).await.unwrap()),
        expected(&ids, "acme", |e, _| e == ada)
    );

    // Extended protocol, text parameters, on a raw connection.
    let mut r = raw(f.proxy.port());
    r.query(b"SET pgenvelope.tenant = 'acme'").unwrap();
    parse(
        &mut r,
        "",
        &format!("SELECT id FROM {t} WHERE email = $1"),
        &[],
    );
    bind(&mut r, "", "", &["ada@example.com"]);
    execute(&mut r, "");
    let msgs = sync(&mut r);
    assert!(codes(&msgs).is_empty(), "{:?}", codes(&msgs));
    let found = msgs.iter().filter(|(tag, _)| *tag == b'D').count();
    assert_eq!(found, expected(&ids, "acme", |e, _| e == ada).len());
    parse(
        &mut r,
        "",
        &format!("SELECT id FROM {t} WHERE email = ANY($1::text[])"),
        &[],
    );
    bind(&mut r, "", "", &["{\"bob@example.com\",NULL}"]);
    execute(&mut r, "");
    let msgs = sync(&mut r);
    assert!(codes(&msgs).is_empty(), "{:?}", codes(&msgs));
    assert_eq!(msgs.iter().filter(|(tag, _)| *tag == b'D').count(), 1);
}

#[tokio::test]
async fn look_ups_are_per_organisation_and_need_a_tenant() {
    let f = Fixture::new("searchorg", COLUMNS, rules).await;
    let ids = fill(&f).await;
    let t = f.table.clone();
    let c = f.client().await;
    // Another organisation's tenant finds that organisation's rows only.
    c.batch_execute("SET pgenvelope.tenant = 'globex'")
        .await
        .unwrap();
    let sql = format!("SELECT id FROM {t} WHERE email = 'ada@example.com'");
    assert_eq!(
        ids_of(&c, &sql).await,
        expected(&ids, "globex", |e, _| e == Some("ada@example.com"))
    );
    let sql = format!("SELECT id FROM {t} WHERE email = 'bob@example.com'");
    assert!(ids_of(&c, &sql).await.is_empty());
    // Without a tenant: 42501.
    let c = f.client().await;
    for sql in [
        format!("SELECT id FROM {t} WHERE email = 'ada@example.com'"),
        format!("DELETE FROM {t} WHERE email = 'ada@example.com'"),
    ] {
        let e = c.simple_query(&sql).await.unwrap_err();
        assert_eq!(code(&e).as_deref(), Some("42501"), "{sql}: {e}");
    }
    let e = c
        .query(&format!("SELECT id FROM {t} WHERE email = $1"), &[&"x"])
        .await
        .unwrap_err();
    assert_eq!(code(&e).as_deref(), Some("42501"), "{e}");
    // Non-searchable columns, ranges and pattern matching stay refused.
    for sql in [
        format!("SELECT id FROM {t} WHERE org_id = 'acme' AND notes = 'n'"),
        format!("SELECT id FROM {t} WHERE org_id = 'acme' AND email > 'a'"),
        format!("SELECT id FROM {t} WHERE org_id = 'acme' AND email LIKE 'a%'"),
        format!("SELECT id FROM {t} WHERE org_id = 'acme' AND code = 'ab-1'"),
        format!("SELECT id FROM {t} WHERE org_id = 'acme' ORDER BY email"),
    ] {
        let e = c.simple_query(&sql).await.unwrap_err();
        assert_eq!(code(&e).as_deref(), Some("0A000"), "{sql}: {e}");
    }
}

#[tokio::test]
async fn updates_deletes_upserts_and_joins_find_rows_by_value() {
    let f = Fixture::new("searchwrite", COLUMNS, rules).await;
    let ids = fill(&f).await;
    let t = f.table.clone();
    let c = f.client().await;
    c.batch_execute("SET pgenvelope.tenant = 'acme'")
        .await
        .unwrap();
    let n = c
        .execute(
            &format!("UPDATE {t} SET notes = $1 WHERE email = $2"),
            &[&"seen", &"ada@example.com"],
        )
        .await
        .unwrap();
    assert_eq!(
        n as usize,
        expected(&ids, "acme", |e, _| e == Some("ada@example.com")).len()
    );
    let notes = ids_of(
        &c,
        &format!("SELECT id FROM {t} WHERE email = 'ada@example.com'"),
    )
    .await;
    for id in &notes {
        let v: String = c
            .query_one(&format!("SELECT notes FROM {t} WHERE id = $1"), &[id])
            .await
            .unwrap()
            .get(0);
        assert_eq!(v, "seen");
    }
    // ON CONFLICT … DO UPDATE … WHERE on the searchable column.
    let id = ids[1];
    c.execute(
        &format!(
            "INSERT INTO {t} (id, org_id, email, notes) VALUES ($1, 'acme', 'bob@example.com', 'up') \
             ON CONFLICT (id) DO UPDATE SET notes = EXCLUDED.notes WHERE {t}.email = 'bob@example.com' AND {t}.org_id = EXCLUDED.org_id"
        ),
        &[&id],
    )
    .await
    .unwrap();
    let v: String = c
        .query_one(&format!("SELECT notes FROM {t} WHERE id = $1"), &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "up");
    // A join with a literal side.
    let other = crate::support::harness::unique("searchjoin");
    direct()
        .await
        .batch_execute(&format!(
            "CREATE TABLE {other} (cid int); INSERT INTO {other} SELECT generate_series(1, 1000)"
        ))
        .await
        .unwrap();
    let joined = ids_of(
        &c,
        &format!("SELECT x.cid FROM {other} x JOIN {t} c ON c.id = x.cid AND c.email = 'bob@example.com'"),
    )
    .await;
    assert_eq!(joined, BTreeSet::from([ids[1]]));
    direct()
        .await
        .batch_execute(&format!("DROP TABLE {other}"))
        .await
        .unwrap();
    // DELETE by value.
    let n = c
        .execute(
            &format!("DELETE FROM {t} WHERE email = $1"),
            &[&"ada@example.com"],
        )
        .await
        .unwrap();
    assert_eq!(n, 2);
    let left = ids_of(
        &c,
        &format!("SELECT id FROM {t} WHERE email = 'ada@example.com'"),
    )
    .await;
    assert!(left.is_empty());
    // The other organisation's equal value is untouched.
    let g: i64 = direct()
        .await
        .query_one(
            &format!("SELECT count(*) FROM {t} WHERE org_id = 'globex'"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(g, 2);
}

#[tokio::test]
async fn stored_values_carry_per_organisation_terms_and_survive_dek_rotation() {
    let f = Fixture::new("searchrot", COLUMNS, rules).await;
    let ids = fill(&f).await;
    let t = f.table.clone();
    // At rest: every value is enc:v1 and searchable; equal e-mails of one organisation share
    // the first 31 characters, the other organisation's differ.
    let stored: Vec<(String, Option<String>)> = direct()
        .await
        .query(&format!("SELECT org_id, email FROM {t} ORDER BY id"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (_, e) in &stored {
        if let Some(e) = e {
            assert!(EncV1::parse(e.as_bytes()).unwrap().is_searchable(), "{e}");
            assert!(!e.contains("example.com"));
        }
    }
    let head = |i: usize| stored[i].1.as_deref().unwrap()[..31].to_owned();
    assert_eq!(head(0), head(2));
    assert_ne!(head(0), head(4), "case matters for equality");
    assert_ne!(head(0), head(5), "another organisation's term differs");
    assert_ne!(stored[0].1, stored[2].1, "values themselves are randomised");

    // Rotate acme's DEK; values sealed before and after are found by one look-up.
    let (host, port) = main_pg();
    let out = Command::new(env!("CARGO_BIN_EXE_pgenvelope"))
        .args(["keys", "rotate", "--org", "acme"])
        .arg("--upstream")
        .arg(format!("postgres://postgres@{host}:{port}/test"))
        .args(["--key-schema", &f.proxy.key_schema])
        .arg("--kms")
        .arg(format!("local:{}", f.proxy.kek_path.display()))
        .env_remove("PGENVELOPE_KMS")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        crate::support::output_text(&out)
    );
    let c = f.client().await;
    c.batch_execute("SET pgenvelope.tenant = 'acme'")
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    c.execute(
        &format!("INSERT INTO {t} (org_id, email) VALUES ('acme', 'ada@example.com')"),
        &[],
    )
    .await
    .unwrap();
    let found = ids_of(
        &c,
        &format!("SELECT id FROM {t} WHERE email = 'ada@example.com'"),
    )
    .await;
    assert_eq!(
        found.len(),
        expected(&ids, "acme", |e, _| e == Some("ada@example.com")).len() + 1
    );
    let deks: BTreeSet<String> = direct()
        .await
        .query(
            &format!("SELECT email FROM {t} WHERE org_id = 'acme' AND email IS NOT NULL"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            EncV1::parse(r.get::<_, String>(0).as_bytes())
                .unwrap()
                .dek_id()
                .to_string()
        })
        .collect();
    assert_eq!(deks.len(), 2, "values under the old and the new DEK");
}

#[tokio::test]
async fn an_index_on_the_term_serves_look_ups() {
    let f = Fixture::new("searchidx", COLUMNS, rules).await;
    let t = f.table.clone();
    let c = f.client().await;
    c.batch_execute("SET pgenvelope.tenant = 'acme'")
        .await
        .unwrap();
    let emails: Vec<String> = (0..3000).map(|i| format!("user{i}@example.com")).collect();
    let orgs = vec!["acme"; emails.len()];
    c.execute(
        &format!("INSERT INTO {t} (org_id, email) SELECT * FROM UNNEST($1::text[], $2::text[])"),
        &[&orgs, &emails],
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    direct()
        .await
        .batch_execute(&format!(
            "CREATE INDEX {t}_email_search ON {t} (left(email, 31)); ANALYZE {t}"
        ))
        .await
        .unwrap();
    let plan: Vec<String> = c
        .query(
            &format!("EXPLAIN SELECT id FROM {t} WHERE email = $1"),
            &[&"user7@example.com"],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let plan = plan.join("\n");
    assert!(
        plan.contains("Index Scan") || plan.contains("Bitmap Index Scan"),
        "{plan}"
    );
    assert!(plan.contains(&format!("{t}_email_search")), "{plan}");
    let found = ids_of(
        &c,
        &format!("SELECT id FROM {t} WHERE email = 'user7@example.com'"),
    )
    .await;
    assert_eq!(found.len(), 1);
}

#[tokio::test]
async fn copy_and_restored_values_are_searchable() {
    use futures_util::SinkExt;
    let f = Fixture::new("searchcopy", COLUMNS, rules).await;
    let t = f.table.clone();
    let c = f.client().await;
    c.batch_execute("SET pgenvelope.tenant = 'acme'")
        .await
        .unwrap();
    let sink = c
        .copy_in(&format!("COPY {t} (org_id, email, code) FROM STDIN"))
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(
        b"acme\tcopied@example.com\tAbC\nacme\tother@example.com\tx\n",
    ))
    .await
    .unwrap();
    sink.finish().await.unwrap();
    let found = ids_of(
        &c,
        &format!("SELECT id FROM {t} WHERE email = 'copied@example.com'"),
    )
    .await;
    assert_eq!(found.len(), 1);
    let found = ids_of(
        &c,
        &format!("SELECT id FROM {t} WHERE lower(code) = lower('ABC')"),
    )
    .await;
    assert_eq!(found.len(), 1);
    // A stored value written back through the proxy (a restore) keeps working with look-ups.
    let stored: String = direct()
        .await
        .query_one(
            &format!("SELECT email FROM {t} WHERE id = (SELECT min(id) FROM {t})"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    c.execute(
        &format!("INSERT INTO {t} (org_id, email) VALUES ('acme', $1)"),
        &[&stored],
    )
    .await
    .unwrap();
    let found = ids_of(
        &c,
        &format!("SELECT id FROM {t} WHERE email = 'copied@example.com'"),
    )
    .await;
    assert_eq!(found.len(), 2);
}

/// One bulk INSERT of rows of many organisations (Django's `bulk_create`, SQLAlchemy's
/// insertmanyvalues) fetches every organisation's DEK and search key in one round, where it
/// used to fetch one key per round and give up after 16.
#[tokio::test]
async fn a_bulk_insert_across_many_organisations_is_sealed_for_each() {
    let f = Fixture::new("searchbulk", COLUMNS, rules).await;
    let t = f.table.clone();
    let c = f.client().await;
    let orgs: Vec<String> = (0..40).map(|i| format!("bulk-org-{i}")).collect();
    let emails: Vec<String> = (0..40).map(|i| format!("u{i}@example.com")).collect();
    c.execute(
        &format!("INSERT INTO {t} (org_id, email) SELECT * FROM UNNEST($1::text[], $2::text[])"),
        &[&orgs, &emails],
    )
    .await
    .unwrap();
    // Parameters of a VALUES list, as insertmanyvalues sends them.
    let values: Vec<String> = (0..30)
        .map(|i| format!("(${}, ${})", 2 * i + 1, 2 * i + 2))
        .collect();
    let mut params: Vec<String> = Vec::new();
    for i in 0..30 {
        params.push(format!("values-org-{i}"));
        params.push(format!("v{i}@example.com"));
    }
    let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
        .iter()
        .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect();
    c.execute(
        &format!(
            "INSERT INTO {t} (org_id, email) VALUES {}",
            values.join(", ")
        ),
        &refs,
    )
    .await
    .unwrap();
    // Each row is found under its own organisation only.
    for (org, email) in [
        ("bulk-org-17", "u17@example.com"),
        ("values-org-29", "v29@example.com"),
    ] {
        let found = ids_of(
            &c,
            &format!("SELECT id FROM {t} WHERE org_id = '{org}' AND email = '{email}'"),
        )
        .await;
        assert_eq!(found.len(), 1, "{org}");
        let other = ids_of(
            &c,
            &format!("SELECT id FROM {t} WHERE org_id = 'bulk-org-0' AND email = '{email}'"),
        )
        .await;
        assert!(other.is_empty());
    }
}
