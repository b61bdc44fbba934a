//! Real ORMs, unchanged, through the encrypting proxy: a small multi-tenant app on Django 5.2
//! (client- and server-side binding), SQLAlchemy 2 (psycopg 3 and asyncpg), Sequelize 6 and
//! Knex 3 (node-postgres) creates, bulk-creates, saves one field, updates by primary key,
//! bulk-updates, upserts and deletes, with `customer.email`, `customer.ssn` and
//! `customer.notes` encrypted per `org_id` (an integer, or a UUID), with and without a session
//! tenant, with and without row binding on a `bigserial` key. Every value reads back exactly,
//! and every value at rest is `enc:v1`.

use std::process::Stdio;

use crate::support::binaries::{client_script, node, python};
use crate::support::harness::direct;
use crate::support::vault::Fixture;
use crate::support::{output_text, require_tool};

/// One app run: which ORM and how it is set up.
#[derive(Clone, Copy, Debug)]
struct Run {
    script: &'static str,
    org_type: &'static str,
    tenant_mode: &'static str,
    /// Django: `client` or `server` binding; SQLAlchemy: the driver.
    variant: &'static str,
    /// Whether values are bound to their row (`row_key = "id"`, a bigserial).
    row_key: bool,
}

fn python_has(module: &str) -> bool {
    python()
        .ok()
        .and_then(|p| {
            std::process::Command::new(p)
                .args(["-c", &format!("import {module}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .ok()
        })
        .is_some_and(|s| s.success())
}

fn node_has(module: &str) -> bool {
    node()
        .ok()
        .and_then(|n| {
            std::process::Command::new(n)
                .args(["-e", &format!("require('{module}')")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .ok()
        })
        .is_some_and(|s| s.success())
}

async fn run_app(run: Run) {
    let org_column = match run.org_type {
        "uuid" => "uuid",
        _ => "bigint",
    };
    let row_key = if run.row_key {
        "row_key = \"id\"\n"
    } else {
        ""
    };
    let app = Fixture::new(
        "customer",
        &format!(
            "(id bigserial PRIMARY KEY, org_id {org_column} NOT NULL, name text NOT NULL, \
             email text, ssn text, notes text, code text)"
        ),
        |t| {
            format!(
                "[[table]]\nname = \"public.{t}\"\ntenant_column = \"org_id\"\n{row_key}\
                 encrypt = [{{ name = \"email\", search = \"equality\" }}, \"ssn\", \"notes\", \
                 {{ name = \"code\", search = \"equality-ci\" }}]\n"
            )
        },
    )
    .await;
    let (url, table) = (app.url(), app.table.clone());
    let variant_var = if run.script.starts_with("django") {
        "BINDING"
    } else {
        "DRIVER"
    };
    let interpreter = if run.script.ends_with(".js") {
        node()
    } else {
        python()
    };
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(interpreter.unwrap())
            .arg(client_script(run.script))
            .env("DATABASE_URL", url)
            .env("TABLE", table)
            .env("ORG_TYPE", run.org_type)
            .env("TENANT_MODE", run.tenant_mode)
            .env("ROW_KEY", if run.row_key { "id" } else { "" })
            .env(variant_var, run.variant)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.lines().last() == Some("ok"),
        "{run:?}: {}",
        output_text(&out)
    );
    // At rest: every value of an encrypted column is ciphertext.
    let rows = direct()
        .await
        .query(
            &format!("SELECT email, ssn, notes FROM {} ORDER BY id", app.table),
            &[],
        )
        .await
        .unwrap();
    assert!(!rows.is_empty());
    let mut values = 0;
    for row in &rows {
        for i in 0..3 {
            if let Some(v) = row.get::<_, Option<String>>(i) {
                assert!(v.starts_with("enc:v1:"), "{run:?}: plaintext at rest");
                values += 1;
            }
        }
    }
    assert!(values >= 8, "{run:?}: only {values} values stored");
    drop(app);
}

#[tokio::test]
async fn django_app_works_unchanged() {
    if !require_tool(python_has("django"), "Django in the test Python") {
        return;
    }
    for (org_type, tenant_mode, binding, row_key) in [
        ("int", "none", "client", false),
        ("int", "none", "server", false),
        ("uuid", "none", "client", false),
        ("uuid", "session", "server", false),
        ("int", "none", "client", true),
        ("uuid", "session", "server", true),
    ] {
        run_app(Run {
            script: "django_orm.py",
            org_type,
            tenant_mode,
            variant: binding,
            row_key,
        })
        .await;
    }
}

#[tokio::test]
async fn sqlalchemy_app_works_unchanged() {
    if !require_tool(python_has("sqlalchemy"), "SQLAlchemy in the test Python") {
        return;
    }
    for (org_type, tenant_mode, driver, row_key) in [
        ("int", "none", "psycopg", false),
        ("int", "none", "asyncpg", false),
        ("uuid", "none", "psycopg", false),
        ("uuid", "session", "asyncpg", false),
        ("int", "none", "psycopg", true),
        ("uuid", "session", "asyncpg", true),
    ] {
        run_app(Run {
            script: "sqlalchemy_orm.py",
            org_type,
            tenant_mode,
            variant: driver,
            row_key,
        })
        .await;
    }
}

#[tokio::test]
async fn sequelize_app_works_unchanged() {
    if !require_tool(node_has("sequelize"), "Sequelize for the test node") {
        return;
    }
    for (org_type, tenant_mode, row_key) in [
        ("int", "none", false),
        ("uuid", "none", false),
        ("int", "session", false),
        ("int", "none", true),
        ("uuid", "session", true),
    ] {
        run_app(Run {
            script: "sequelize_orm.js",
            org_type,
            tenant_mode,
            variant: "pg",
            row_key,
        })
        .await;
    }
}

#[tokio::test]
async fn knex_app_works_unchanged() {
    if !require_tool(node_has("knex"), "Knex for the test node") {
        return;
    }
    for (org_type, tenant_mode, row_key) in [
        ("int", "none", false),
        ("uuid", "none", false),
        ("int", "session", false),
        ("int", "none", true),
        ("uuid", "session", true),
    ] {
        run_app(Run {
            script: "knex_orm.js",
            org_type,
            tenant_mode,
            variant: "pg",
            row_key,
        })
        .await;
    }
}
