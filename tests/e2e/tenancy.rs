//! The session tenant as PostgreSQL sees it: setting names match in any case.

use crate::encryption::{code, direct};
use crate::harness::{connect, unique, ProxyOptions, TestProxy};

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
        let table = self.table.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                let _ = direct()
                    .await
                    .batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
                    .await;
            });
        })
        .join();
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
