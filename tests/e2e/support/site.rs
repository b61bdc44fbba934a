//! A private PostgreSQL cluster (which a test may kill or stop) with protected tables and an
//! encrypting proxy in front of it, and the at-rest scan.

use std::time::{Duration, Instant};

use crate::support::cluster::{ClusterOptions, PrivateCluster};
use crate::support::harness::{connect, unique, ProxyOptions, TestProxy};

/// Generous upper bound for anything that must eventually happen.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// A private cluster with protected tables and an encrypting proxy in front of it.
pub struct Site {
    pub proxy: TestProxy,
    pub cluster: PrivateCluster,
    pub tables: Vec<String>,
}

/// Rules protecting `value` and `note` of each table, tenant from `org_id`.
pub fn rules_for(tables: &[String]) -> String {
    tables
        .iter()
        .map(|t| {
            format!(
                "[[table]]\nname = \"public.{t}\"\ntenant_column = \"org_id\"\nencrypt = [\"value\", \"note\"]\n"
            )
        })
        .collect()
}

impl Site {
    pub fn start(tables: usize, opts: ClusterOptions, f: impl FnOnce(&mut ProxyOptions)) -> Self {
        let cluster = PrivateCluster::start(opts).expect("private cluster");
        let tables: Vec<String> = (0..tables).map(|_| unique("fault")).collect();
        for t in &tables {
            cluster
                .psql(
                    "test",
                    &format!(
                        "CREATE TABLE {t} (id serial primary key, org_id text not null, \
                         name text, value text, note varchar)"
                    ),
                )
                .expect("create table");
        }
        let mut o = ProxyOptions::to("127.0.0.1", cluster.port());
        o.rules = Some(rules_for(&tables));
        o.connect_timeout = Duration::from_secs(2);
        f(&mut o);
        let proxy = TestProxy::with(o);
        Site {
            proxy,
            cluster,
            tables,
        }
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.proxy.pg_config("postgres", None, "test"))
            .await
            .expect("connect through the proxy")
    }

    /// A connection straight to the cluster, bypassing the proxy.
    pub async fn direct(&self) -> tokio_postgres::Client {
        connect(&format!(
            "host=127.0.0.1 port={} user=postgres dbname=test",
            self.cluster.port()
        ))
        .await
        .expect("connect to the cluster")
    }
}

/// Fails on any value of a protected column that is neither NULL nor `enc:v1:`; returns the
/// number of rows scanned.
pub async fn assert_only_ciphertext(db: &tokio_postgres::Client, table: &str) -> usize {
    let rows = db
        .query(&format!("SELECT id, value, note::text FROM {table}"), &[])
        .await
        .expect("scan");
    for r in &rows {
        let id: i32 = r.get(0);
        for col in [1, 2] {
            if let Some(v) = r.get::<_, Option<String>>(col) {
                assert!(
                    v.starts_with("enc:v1:"),
                    "{table} row {id} column {col} holds plaintext at rest"
                );
            }
        }
    }
    rows.len()
}

pub async fn until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !f().await {
        assert!(started.elapsed() < DEADLINE, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
