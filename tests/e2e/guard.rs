//! `pgenvelope guard`: writes the proxy cannot see — through an updatable view, a partition
//! addressed by its own name, a function, a trigger, or a connection that bypasses the proxy —
//! store plaintext without guards, and are refused by PostgreSQL (23514) with them.

use crate::support::output_text;
use std::process::{Command, Output, Stdio};

use crate::support::harness::{code, direct};
use crate::support::harness::{connect, main_pg, unique, ProxyOptions, TempDatabase, TestProxy};

fn guard(rules: &std::path::Path, extra: &[&str]) -> Output {
    guard_command(rules, extra).output().unwrap()
}

/// `pgenvelope guard` with the upstream (and key store) in database `test`.
fn guard_command(rules: &std::path::Path, extra: &[&str]) -> Command {
    let (host, port) = main_pg();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgenvelope"));
    cmd.arg("guard")
        .args(extra)
        .arg("--rules")
        .arg(rules)
        .arg("--upstream")
        .arg(format!("postgres://postgres@{host}:{port}/test"))
        .env_remove("PGENVELOPE_CONFIG")
        .env_remove("PGENVELOPE_DATA_DATABASE")
        .stdin(Stdio::null());
    cmd
}

#[tokio::test]
async fn guards_refuse_plaintext_written_around_the_proxy() {
    let t = unique("guarded");
    let db = direct().await;
    db.batch_execute(&format!(
        "CREATE TABLE {t} (id int NOT NULL, org_id text NOT NULL, value text) PARTITION BY RANGE (id);
         CREATE TABLE {t}_p1 PARTITION OF {t} FOR VALUES FROM (0) TO (1000);
         CREATE VIEW {t}_v AS SELECT id, org_id, value FROM {t};
         CREATE FUNCTION {t}_put(i int, v text) RETURNS void LANGUAGE sql
             AS $$ INSERT INTO {t} (id, org_id, value) VALUES (i, 'acme', v) $$;
         CREATE TABLE {t}_src (id int, value text);
         CREATE FUNCTION {t}_copy() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO {t} (id, org_id, value) VALUES (NEW.id, 'acme', NEW.value); RETURN NEW; END $$;
         CREATE TRIGGER {t}_trg AFTER INSERT ON {t}_src FOR EACH ROW EXECUTE FUNCTION {t}_copy();"
    ))
    .await
    .unwrap();
    let rules_text = format!(
        "[[table]]\nname = \"public.{t}\"\ntenant_column = \"org_id\"\nencrypt = [\"value\"]\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, &rules_text).unwrap();
    let proxy = TestProxy::with(ProxyOptions::encrypting(&rules_text));
    let client = connect(&proxy.pg_config("postgres", None, "test"))
        .await
        .unwrap();

    // The gap: through the view, the proxy sees no protected table and relays plaintext.
    client
        .batch_execute(&format!(
            "INSERT INTO {t}_v (id, org_id, value) VALUES (1, 'acme', 'leaked')"
        ))
        .await
        .unwrap();
    let stored: String = db
        .query_one(&format!("SELECT value FROM {t} WHERE id = 1"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, "leaked");

    let out = guard(&rules, &[]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("guard pgenvelope_enc_value added"),
        "{}",
        output_text(&out)
    );

    // Through the proxy by the table's name: encrypted, accepted.
    client
        .execute(
            &format!("INSERT INTO {t} (id, org_id, value) VALUES (2, 'acme', $1)"),
            &[&"fine"],
        )
        .await
        .unwrap();
    // Every path around the proxy is now refused by PostgreSQL itself.
    let around = [
        format!("INSERT INTO {t}_v (id, org_id, value) VALUES (3, 'acme', 'plain')"),
        format!("INSERT INTO {t}_p1 (id, org_id, value) VALUES (4, 'acme', 'plain')"),
        format!("UPDATE {t}_v SET value = 'plain' WHERE id = 2"),
        format!("SELECT {t}_put(5, 'plain')"),
        format!("INSERT INTO {t}_src VALUES (6, 'plain')"),
    ];
    for sql in &around {
        let e = client.batch_execute(sql).await.unwrap_err();
        assert_eq!(code(&e).as_deref(), Some("23514"), "{sql}: {e}");
    }
    let e = db
        .batch_execute(&format!(
            "INSERT INTO {t} (id, org_id, value) VALUES (7, 'acme', 'direct')"
        ))
        .await
        .unwrap_err();
    assert_eq!(code(&e).as_deref(), Some("23514"), "{e}");
    // The session survives the refusals; reads decrypt.
    let row = client
        .query_one(&format!("SELECT value FROM {t} WHERE id = 2"), &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "fine");

    // Idempotent; --validate refuses while plaintext is stored, then marks the guard valid.
    let out = guard(&rules, &[]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("present"));
    let out = guard(&rules, &["--validate"]);
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("1 value(s) are not encrypted"),
        "{}",
        output_text(&out)
    );
    db.batch_execute(&format!("DELETE FROM {t} WHERE id = 1"))
        .await
        .unwrap();
    let out = guard(&rules, &["--validate"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid (every stored value checked)"));
    let validated: bool = db
        .query_one(
            &format!(
                "SELECT convalidated FROM pg_constraint WHERE conrelid = '{t}'::regclass \
                 AND conname = 'pgenvelope_enc_value'"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(validated);

    let out = guard(&rules, &["--remove"]);
    assert!(out.status.success(), "{}", output_text(&out));
    db.batch_execute(&format!(
        "INSERT INTO {t}_p1 (id, org_id, value) VALUES (8, 'acme', 'unguarded')"
    ))
    .await
    .unwrap();

    db.batch_execute(&format!(
        "DROP TABLE {t}_src; DROP FUNCTION {t}_copy(); DROP FUNCTION {t}_put(int, text);
         DROP VIEW {t}_v; DROP TABLE {t};"
    ))
    .await
    .unwrap();
}

/// Issue #20 item 9: guards on tables in another database than the key store's, named with
/// `--data-database` (or `PGENVELOPE_DATA_DATABASE`) while `--upstream` stays the proxy's.
#[tokio::test]
async fn guards_tables_in_another_database_than_the_key_store() {
    let app = TempDatabase::create("guard_app").await;
    let t = unique("guarded");
    let data = app.direct().await;
    data.batch_execute(&format!(
        "CREATE TABLE {t} (id int PRIMARY KEY, org_id text NOT NULL, value text)"
    ))
    .await
    .unwrap();
    let rules_text = format!(
        "[[table]]\nname = \"public.{t}\"\ntenant_column = \"org_id\"\nencrypt = [\"value\"]\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, &rules_text).unwrap();
    let proxy = TestProxy::with(ProxyOptions::encrypting(&rules_text));
    let client = connect(&proxy.pg_config("postgres", None, &app.0))
        .await
        .unwrap();
    client
        .execute(
            &format!("INSERT INTO {t} (id, org_id, value) VALUES (1, 'acme', $1)"),
            &[&"zq-sealed"],
        )
        .await
        .unwrap();

    // Without the option the table is looked for in the key store's database: a clear error.
    let out = guard(&rules, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "table public.{t} does not exist in database test (of --upstream)"
        )) && stderr.contains("name it with --data-database"),
        "{}",
        output_text(&out)
    );

    // A data database that cannot be reached: an error naming it.
    let missing = format!("{}_missing", app.0);
    let out = guard(&rules, &["--data-database", &missing]);
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!(
            "connecting to database {missing} (--data-database)"
        )),
        "{}",
        output_text(&out)
    );

    let out = guard(&rules, &["--data-database", &app.0]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("guard pgenvelope_enc_value added"),
        "{}",
        output_text(&out)
    );
    let e = data
        .batch_execute(&format!(
            "INSERT INTO {t} (id, org_id, value) VALUES (2, 'acme', 'zq-direct')"
        ))
        .await
        .unwrap_err();
    assert_eq!(code(&e).as_deref(), Some("23514"), "{e}");
    client
        .execute(
            &format!("INSERT INTO {t} (id, org_id, value) VALUES (3, 'acme', $1)"),
            &[&"zq-through"],
        )
        .await
        .unwrap();
    let values: Vec<String> = client
        .query(&format!("SELECT value FROM {t} ORDER BY id"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(values, ["zq-sealed", "zq-through"]);

    // Every stored value is sealed, so --validate succeeds; the environment names it too.
    let out = guard_command(&rules, &["--validate"])
        .env("PGENVELOPE_DATA_DATABASE", &app.0)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("valid (every stored value checked)"),
        "{}",
        output_text(&out)
    );
    let validated: bool = data
        .query_one(
            &format!(
                "SELECT convalidated FROM pg_constraint WHERE conrelid = '{t}'::regclass \
                 AND conname = 'pgenvelope_enc_value'"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(validated);
    // Nothing was added to the key store's database.
    let in_test: bool = direct()
        .await
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&format!("public.{t}")],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!in_test);
}
