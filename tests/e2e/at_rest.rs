//! Never plaintext at rest: every write path (simple INSERT with literals, extended INSERT with
//! parameters, UPDATE both ways, INSERT … ON CONFLICT, multi-row INSERT, COPY FROM in text and
//! CSV, reused prepared statements, pipelines, and the shapes ORMs send: UPDATE by primary key
//! alone with no tenant known, SQLAlchemy's insertmanyvalues, Django's UNNEST bulk_create and
//! CASE bulk_update, Sequelize's upsert) runs from several concurrent sessions in a random
//! order (seeded: the seed is printed; `PGENVELOPE_AT_REST_SEED` replays it), mixed with
//! faults: sessions terminated mid-statement with `pg_terminate_backend`, clients that vanish
//! mid-COPY, statements the proxy refuses. Afterwards every protected column is scanned
//! directly in PostgreSQL: any value that is not NULL or `enc:v1:` fails the test; and every
//! row is read back through the proxy with its tenant column, so a value sealed for another
//! organisation than its row's, or one that does not open, fails it too.

use std::collections::HashSet;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::SinkExt;
use rand::{Rng, SeedableRng};

use crate::support::cluster::ClusterOptions;
use crate::support::raw::RawConn;
use crate::support::site::{assert_only_ciphertext, Site};

const WORKERS: usize = 6;
const OPS: usize = 30;

struct Worker {
    w: usize,
    org: String,
    table: String,
    cfg: String,
    port: u16,
    admin_cfg: String,
    rng: rand::rngs::StdRng,
    client: tokio_postgres::Client,
    pid: i32,
    names: Vec<String>,
    acknowledged: Arc<Mutex<HashSet<String>>>,
    seq: usize,
}

impl Worker {
    async fn connect(cfg: &str) -> (tokio_postgres::Client, i32) {
        let client = crate::support::harness::connect(cfg)
            .await
            .expect("connect");
        let pid: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        (client, pid)
    }

    fn name(&mut self) -> String {
        self.seq += 1;
        format!("w{}-{}", self.w, self.seq)
    }

    fn value(&mut self) -> String {
        format!(
            "secret-{}-{} 'quoted', \"csv\"\\t",
            self.w,
            self.rng.gen::<u32>()
        )
    }

    fn ack(&mut self, names: &[String]) {
        self.names.extend_from_slice(names);
        self.acknowledged
            .lock()
            .unwrap()
            .extend(names.iter().cloned());
    }

    fn own_name(&mut self) -> Option<String> {
        if self.names.is_empty() {
            return None;
        }
        let i = self.rng.gen_range(0..self.names.len());
        Some(self.names[i].clone())
    }

    async fn reconnect_if_closed(&mut self) {
        if self.client.is_closed() {
            let (client, pid) = Self::connect(&self.cfg).await;
            self.client = client;
            self.pid = pid;
        }
    }

    /// One random operation. Ordinary writes must succeed; faults may fail their own
    /// statement but nothing else.
    async fn step(&mut self) {
        self.reconnect_if_closed().await;
        let t = self.table.clone();
        let org = self.org.clone();
        let op = self.rng.gen_range(0..19);
        match op {
            0 => {
                let (n, v) = (self.name(), self.value());
                let sql = format!(
                    "INSERT INTO {t} (org_id, name, value, note) VALUES ('{org}', '{n}', {}, 'note {n}')",
                    quote(&v)
                );
                self.client
                    .batch_execute(&sql)
                    .await
                    .expect("simple INSERT");
                self.ack(&[n]);
            }
            1 => {
                let (n, v) = (self.name(), self.value());
                self.client
                    .execute(
                        &format!(
                            "INSERT INTO {t} (org_id, name, value, note) VALUES ($1, $2, $3, $4)"
                        ),
                        &[&org, &n, &v, &"n"],
                    )
                    .await
                    .expect("extended INSERT");
                self.ack(&[n]);
            }
            2 => {
                let Some(n) = self.own_name() else { return };
                let v = self.value();
                self.client
                    .batch_execute(&format!(
                        "UPDATE {t} SET value = {}, note = NULL WHERE org_id = '{org}' AND name = '{n}'",
                        quote(&v)
                    ))
                    .await
                    .expect("simple UPDATE");
            }
            3 => {
                let Some(n) = self.own_name() else { return };
                let v = self.value();
                self.client
                    .execute(
                        &format!("UPDATE {t} SET note = $1 WHERE org_id = $2 AND name = $3"),
                        &[&v, &org, &n],
                    )
                    .await
                    .expect("extended UPDATE");
            }
            4 => {
                let n = match self.own_name() {
                    Some(n) if self.rng.gen_bool(0.5) => n,
                    _ => self.name(),
                };
                let v = self.value();
                self.client
                    .execute(
                        &format!(
                            "INSERT INTO {t} (org_id, name, value) VALUES ($1, $2, $3) \
                             ON CONFLICT (org_id, name) DO UPDATE SET value = EXCLUDED.value"
                        ),
                        &[&org, &n, &v],
                    )
                    .await
                    .expect("INSERT … ON CONFLICT");
                self.ack(&[n]);
            }
            5 => {
                let rows: Vec<(String, String)> =
                    (0..3).map(|_| (self.name(), self.value())).collect();
                let values: Vec<String> = rows
                    .iter()
                    .map(|(n, v)| format!("('{org}', '{n}', {}, NULL)", quote(v)))
                    .collect();
                self.client
                    .batch_execute(&format!(
                        "INSERT INTO {t} (org_id, name, value, note) VALUES {}",
                        values.join(", ")
                    ))
                    .await
                    .expect("multi-row INSERT");
                let names: Vec<String> = rows.into_iter().map(|(n, _)| n).collect();
                self.ack(&names);
            }
            6 | 7 => {
                let csv = op == 7;
                let rows: Vec<(String, String)> =
                    (0..4).map(|_| (self.name(), self.value())).collect();
                let sql = if csv {
                    format!("COPY {t} (org_id, name, value, note) FROM STDIN WITH (FORMAT csv)")
                } else {
                    format!("COPY {t} (org_id, name, value, note) FROM STDIN")
                };
                let sink = self.client.copy_in(&sql).await.expect("COPY FROM");
                let mut sink = Box::pin(sink);
                for (n, v) in &rows {
                    let line = if csv {
                        format!("{org},{n},\"{}\",\n", v.replace('"', "\"\""))
                    } else {
                        format!("{org}\t{n}\t{}\t\\N\n", v.replace('\\', "\\\\"))
                    };
                    sink.send(Bytes::from(line)).await.expect("COPY data");
                }
                sink.as_mut().finish().await.expect("COPY finish");
                let names: Vec<String> = rows.into_iter().map(|(n, _)| n).collect();
                self.ack(&names);
            }
            8 => {
                let stmt = self
                    .client
                    .prepare(&format!(
                        "INSERT INTO {t} (org_id, name, value, note) VALUES ($1, $2, $3, $4)"
                    ))
                    .await
                    .expect("prepare");
                let mut names = Vec::new();
                for _ in 0..3 {
                    let (n, v) = (self.name(), self.value());
                    self.client
                        .execute(&stmt, &[&org, &n, &v, &v])
                        .await
                        .expect("prepared INSERT reused");
                    names.push(n);
                }
                self.ack(&names);
            }
            9 => {
                // tokio-postgres pipelines concurrent statements on one connection.
                let rows: Vec<(String, String)> =
                    (0..4).map(|_| (self.name(), self.value())).collect();
                let sql = format!("INSERT INTO {t} (org_id, name, value) VALUES ($1, $2, $3)");
                let client = &self.client;
                let futures = rows
                    .iter()
                    .map(|(n, v)| async { client.execute(&sql, &[&org, n, v]).await });
                for r in futures_util::future::join_all(futures).await {
                    r.expect("pipelined INSERT");
                }
                let names: Vec<String> = rows.into_iter().map(|(n, _)| n).collect();
                self.ack(&names);
            }
            10 => {
                // Refused: the value would come from elsewhere, or through a function.
                let refused = [
                    format!("INSERT INTO {t} (org_id, name, value) SELECT '{org}', 'x', 'plain-from-select'"),
                    format!("INSERT INTO {t} (org_id, name, value) VALUES ('{org}', 'x', upper('plain-through-function'))"),
                ];
                let sql = &refused[self.rng.gen_range(0..refused.len())];
                let err = self
                    .client
                    .batch_execute(sql)
                    .await
                    .expect_err("refused statement");
                assert_eq!(err.code().map(|c| c.code()), Some("0A000"), "{err}");
            }
            11 => {
                // Terminated mid-statement: a pipeline in flight when the backend is killed.
                let admin = crate::support::harness::connect(&self.admin_cfg)
                    .await
                    .unwrap();
                let pid = self.pid;
                let delay = Duration::from_millis(self.rng.gen_range(0..30));
                let rows: Vec<(String, String)> =
                    (0..8).map(|_| (self.name(), self.value())).collect();
                let sql = format!("INSERT INTO {t} (org_id, name, value) VALUES ($1, $2, $3)");
                let client = &self.client;
                let futures = rows
                    .iter()
                    .map(|(n, v)| async { (n.clone(), client.execute(&sql, &[&org, n, v]).await) });
                let killer = async {
                    tokio::time::sleep(delay).await;
                    admin
                        .execute("SELECT pg_terminate_backend($1)", &[&pid])
                        .await
                        .unwrap();
                };
                let (results, ()) = tokio::join!(futures_util::future::join_all(futures), killer);
                let done: Vec<String> = results
                    .into_iter()
                    .filter_map(|(n, r)| r.ok().map(|_| n))
                    .collect();
                self.ack(&done);
                // The session ends once the server's FATAL error has arrived; then reconnect.
                tokio::time::timeout(Duration::from_secs(30), async {
                    while !self.client.is_closed() {
                        let _ = self.client.simple_query("SELECT 1").await;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                })
                .await
                .expect("terminated session closed");
            }
            13 | 14 => {
                // UPDATE by primary key alone, no tenant known: the row's organisation is looked
                // up. Any row, of any organisation: its value is sealed for that row's.
                let ids: Vec<i32> = self
                    .client
                    .query(
                        &format!("SELECT id FROM {t} ORDER BY id DESC LIMIT 20"),
                        &[],
                    )
                    .await
                    .expect("ids")
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                if ids.is_empty() {
                    return;
                }
                let id = ids[self.rng.gen_range(0..ids.len())];
                let v = self.value();
                if op == 13 {
                    self.client
                        .execute(
                            &format!(
                                "UPDATE {t} SET value = $1::VARCHAR WHERE {t}.id = $2::INTEGER"
                            ),
                            &[&v, &id],
                        )
                        .await
                        .expect("UPDATE by key (extended)");
                } else {
                    self.client
                        .batch_execute(&format!(
                            r#"UPDATE "{t}" SET "note" = {} WHERE "{t}"."id" = {id}"#,
                            quote(&v)
                        ))
                        .await
                        .expect("UPDATE by key (simple)");
                }
            }
            15 => {
                // SQLAlchemy's insertmanyvalues.
                let rows: Vec<(String, String)> =
                    (0..3).map(|_| (self.name(), self.value())).collect();
                let values: Vec<String> = (0..rows.len())
                    .map(|i| {
                        format!(
                            "(${}::VARCHAR, ${}::VARCHAR, ${}::VARCHAR, {i})",
                            3 * i + 1,
                            3 * i + 2,
                            3 * i + 3
                        )
                    })
                    .collect();
                let sql = format!(
                    "INSERT INTO {t} (org_id, name, value) SELECT p0::VARCHAR, p1::VARCHAR,                      p2::VARCHAR FROM (VALUES {}) AS imp_sen(p0, p1, p2, sen_counter)                      ORDER BY sen_counter RETURNING {t}.id, {t}.id AS id__1",
                    values.join(", ")
                );
                let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = Vec::new();
                for (n, v) in &rows {
                    params.push(&org);
                    params.push(n);
                    params.push(v);
                }
                let got = self
                    .client
                    .query(&sql, &params)
                    .await
                    .expect("insertmanyvalues");
                assert_eq!(got.len(), rows.len());
                let names: Vec<String> = rows.into_iter().map(|(n, _)| n).collect();
                self.ack(&names);
            }
            16 => {
                // Django's bulk_create.
                let rows: Vec<(String, String)> =
                    (0..3).map(|_| (self.name(), self.value())).collect();
                let orgs: Vec<&str> = rows.iter().map(|_| org.as_str()).collect();
                let names: Vec<&str> = rows.iter().map(|(n, _)| n.as_str()).collect();
                let values: Vec<&str> = rows.iter().map(|(_, v)| v.as_str()).collect();
                self.client
                    .query(
                        &format!(
                            r#"INSERT INTO "{t}" ("org_id", "name", "value") SELECT * FROM UNNEST(($1)::varchar[], ($2)::text[], ($3)::text[]) RETURNING "{t}"."id""#
                        ),
                        &[&orgs, &names, &values],
                    )
                    .await
                    .expect("UNNEST bulk_create");
                let names: Vec<String> = rows.into_iter().map(|(n, _)| n).collect();
                self.ack(&names);
            }
            17 => {
                // Django's bulk_update, over two of this worker's rows.
                let (Some(a), Some(b)) = (self.own_name(), self.own_name()) else {
                    return;
                };
                let (va, vb) = (self.value(), self.value());
                self.client
                    .execute(
                        &format!(
                            r#"UPDATE "{t}" SET "value" = (CASE WHEN ("{t}"."name" = $1) THEN $2 WHEN ("{t}"."name" = $3) THEN $4 ELSE NULL END)::text WHERE "{t}"."name" IN ($5, $6) AND "{t}"."org_id" = $7"#
                        ),
                        &[&a, &va, &b, &vb, &a, &b, &org],
                    )
                    .await
                    .expect("bulk_update");
            }
            18 => {
                // Sequelize's upsert: every column assigned from EXCLUDED.
                let n = match self.own_name() {
                    Some(n) if self.rng.gen_bool(0.5) => n,
                    _ => self.name(),
                };
                let v = self.value();
                self.client
                    .execute(
                        &format!(
                            r#"INSERT INTO "{t}" ("org_id","name","value") VALUES ($1,$2,$3) ON CONFLICT ("org_id", "name") DO UPDATE SET "org_id"=EXCLUDED."org_id","name"=EXCLUDED."name","value"=EXCLUDED."value" RETURNING "id""#
                        ),
                        &[&org, &n, &v],
                    )
                    .await
                    .expect("Sequelize upsert");
                self.ack(&[n]);
            }
            _ => {
                // A client that vanishes half-way through COPY data.
                let (t, org, port) = (t.clone(), org.clone(), self.port);
                let (n, v) = (self.name(), self.value());
                let cut = self.rng.gen_range(1..v.len());
                tokio::task::spawn_blocking(move || {
                    let (mut conn, _) =
                        RawConn::connect(port, &[("user", b"postgres"), ("database", b"test")])
                            .unwrap();
                    let copy = format!("COPY {t} (org_id, name, value) FROM STDIN\0");
                    conn.send(b'Q', copy.as_bytes()).unwrap();
                    let (tag, _) = conn.read_msg().unwrap();
                    assert_eq!(tag, b'G');
                    let line = format!("{org}\t{n}-full\t{v}\n{org}\t{n}\t{v}");
                    let line = &line.as_bytes()[..line.len() - v.len() + cut];
                    conn.send(b'd', line).unwrap();
                    conn.raw_stream().flush().unwrap();
                })
                .await
                .unwrap();
            }
        }
    }
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_plaintext_at_rest_under_random_interleavings_and_faults() {
    let seed: u64 = std::env::var("PGENVELOPE_AT_REST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("at-rest seed: {seed} (replay with PGENVELOPE_AT_REST_SEED={seed})");
    let site = Site::start(1, ClusterOptions::default(), |_| {});
    let t = site.tables[0].clone();
    site.cluster
        .psql(
            "test",
            &format!("CREATE UNIQUE INDEX ON {t} (org_id, name)"),
        )
        .unwrap();
    let cfg = site.proxy.pg_config("postgres", None, "test");
    let admin_cfg = format!(
        "host=127.0.0.1 port={} user=postgres dbname=test",
        site.cluster.port()
    );
    let acknowledged = Arc::new(Mutex::new(HashSet::new()));
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let (client, pid) = Worker::connect(&cfg).await;
        let mut worker = Worker {
            w,
            org: format!("org{}", w % 3),
            table: t.clone(),
            cfg: cfg.clone(),
            port: site.proxy.port(),
            admin_cfg: admin_cfg.clone(),
            rng: rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(w as u64)),
            client,
            pid,
            names: Vec::new(),
            acknowledged: Arc::clone(&acknowledged),
            seq: 0,
        };
        tasks.push(tokio::spawn(async move {
            for _ in 0..OPS {
                worker.step().await;
            }
        }));
    }
    for task in tasks {
        if let Err(e) = task.await {
            panic!("worker failed (seed {seed}): {e}");
        }
    }

    let db = site.direct().await;
    let scanned = assert_only_ciphertext(&db, &t).await;
    // Everything stored decrypts through the proxy, and every acknowledged write is there.
    let reader = site.client().await;
    // With the tenant column in the result, a value sealed for another organisation than its
    // row's is refused.
    let rows = reader
        .query(&format!("SELECT name, value, note, org_id FROM {t}"), &[])
        .await
        .expect("every stored value decrypts, each for its own row's organisation");
    assert_eq!(rows.len(), scanned);
    let mut names = HashSet::new();
    for r in &rows {
        names.insert(r.get::<_, String>(0));
        for col in [1, 2] {
            if let Some(v) = r.get::<_, Option<String>>(col) {
                assert!(v.starts_with("secret-") || v.starts_with("note") || v == "n");
            }
        }
    }
    let acknowledged = acknowledged.lock().unwrap();
    let missing: Vec<&String> = acknowledged
        .iter()
        .filter(|n| !names.contains(*n))
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged writes lost (seed {seed}): {missing:?}"
    );
    eprintln!(
        "at-rest: {scanned} rows scanned, {} acknowledged writes, seed {seed}",
        acknowledged.len()
    );
}
