//! One-call set-up for an end-to-end test: a table of its own, rules for it, an encrypting
//! proxy and clients. [`Fixture`] takes any table and rules; [`Vault`] is the common one
//! (`org_id`, `name`, `value`, `note`, with `value` and `note` encrypted per `org_id`).

use crate::support::harness::{
    connect, direct, main_pg, psql_on_main, unique, DropTables, ProxyOptions, TestProxy,
};

/// A vault table per test and an encrypting proxy for it.
pub struct Vault {
    pub proxy: TestProxy,
    pub table: String,
}

pub fn vault_rules(table: &str) -> String {
    format!(
        "[[table]]\nname = \"public.{table}\"\ntenant_column = \"org_id\"\nencrypt = [\"value\", \"note\"]\n"
    )
}

impl Vault {
    pub async fn new() -> Self {
        Self::with(|_| {}).await
    }

    pub async fn with(f: impl FnOnce(&mut ProxyOptions)) -> Self {
        let table = unique("vault");
        direct()
            .await
            .batch_execute(&format!(
                "CREATE TABLE {table} (id serial primary key, org_id text not null, name text, value text, note varchar)"
            ))
            .await
            .unwrap();
        let mut opts = ProxyOptions::encrypting(&vault_rules(&table));
        f(&mut opts);
        let proxy = TestProxy::with(opts);
        Vault { proxy, table }
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.proxy.pg_config("postgres", None, "test"))
            .await
            .unwrap()
    }

    /// All stored (org_id, value, note) straight from PostgreSQL.
    pub async fn stored(&self) -> Vec<(String, Option<String>, Option<String>)> {
        direct()
            .await
            .query(
                &format!(
                    "SELECT org_id, value, note::text FROM {} ORDER BY id",
                    self.table
                ),
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    }

    /// Every non-NULL encrypted column holds enc:v1 and none holds one of `plaintexts`.
    pub async fn assert_encrypted_at_rest(&self, plaintexts: &[&str]) {
        for (_, value, note) in self.stored().await {
            for v in [value, note].into_iter().flatten() {
                assert!(v.starts_with("enc:v1:"), "stored in plaintext");
                for p in plaintexts {
                    assert!(!v.contains(p));
                }
            }
        }
    }
}

impl Drop for Vault {
    fn drop(&mut self) {
        psql_on_main(&format!("DROP TABLE IF EXISTS {}", self.table));
    }
}

/// A table of the test's own (dropped at the end), an encrypting proxy with rules for it, and
/// clients through it: `Fixture::new("vault", "(id serial primary key, org_id text, value
/// text)", |t| format!("[[table]]\nname = \"{t}\"\n…"))`.
pub struct Fixture {
    pub proxy: TestProxy,
    pub table: String,
    _drop: DropTables,
}

impl Fixture {
    /// Creates table `<prefix>_<unique>` with `columns` (the parenthesised column list) and a
    /// proxy with the rules `rules(table)`.
    pub async fn new(prefix: &str, columns: &str, rules: impl FnOnce(&str) -> String) -> Self {
        Self::with(prefix, columns, rules, |_| {}).await
    }

    /// As [`Fixture::new`], with the proxy's options adjusted by `f`.
    pub async fn with(
        prefix: &str,
        columns: &str,
        rules: impl FnOnce(&str) -> String,
        f: impl FnOnce(&mut ProxyOptions),
    ) -> Self {
        let table = unique(prefix);
        direct()
            .await
            .batch_execute(&format!("CREATE TABLE {table} {columns}"))
            .await
            .unwrap();
        let _drop = DropTables(table.clone());
        let mut opts = ProxyOptions::encrypting(&rules(&table));
        f(&mut opts);
        Fixture {
            proxy: TestProxy::with(opts),
            table,
            _drop,
        }
    }

    /// A client through the proxy (user postgres, database test).
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.proxy.pg_config("postgres", None, "test"))
            .await
            .unwrap()
    }

    /// The proxy's URL for external clients.
    pub fn url(&self) -> String {
        self.proxy.url("postgres", None, "test")
    }
}
