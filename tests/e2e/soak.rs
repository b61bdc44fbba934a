//! Load: many concurrent clients run a mixed encrypted workload (prepared and simple inserts,
//! selects and updates) against the real binary for a bounded time. Every value read back must
//! equal what was written, no statement may fail, and the proxy's resident memory must stay
//! flat after warm-up.
//!
//! `PGENVELOPE_SOAK_CONNECTIONS` (default 500) and `PGENVELOPE_SOAK_SECS` (default 20) size
//! the run; a several-minute run is `PGENVELOPE_SOAK_SECS=300 cargo test --test e2e soak`.

use std::collections::HashMap;
use std::io::Read;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::support::cluster::{ClusterOptions, PrivateCluster};
use crate::support::harness::unique;
use crate::support::site::{assert_only_ciphertext, rules_for};

/// The `pgenvelope serve` binary as a child process in a temporary directory (rules and a
/// local KEK there), killed by PID on drop.
pub struct Serve {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Serve {
    /// Start serving toward `upstream`; `rules` is the text of one rule file (none: relay
    /// only). Returns once the proxy accepts TCP connections.
    pub fn start(upstream: &str, rules: Option<&str>, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rules")).unwrap();
        if let Some(text) = rules {
            std::fs::write(dir.path().join("rules/test.toml"), text).unwrap();
        }
        let port = crate::support::free_port().unwrap();
        let log = std::fs::File::create(dir.path().join("proxy.log")).unwrap();
        // `PGENVELOPE_SOAK_WRAPPER` (e.g. `heaptrack -o /tmp/soak`) runs the proxy under a
        // profiler; RSS then is the wrapper's.
        let wrapper = std::env::var("PGENVELOPE_SOAK_WRAPPER").unwrap_or_default();
        let mut argv: Vec<String> = wrapper.split_whitespace().map(str::to_owned).collect();
        argv.push(env!("CARGO_BIN_EXE_pgenvelope").to_owned());
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .current_dir(dir.path())
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--upstream", upstream])
            .args(["--rules", "rules", "--kms", "local:kek", "--log", "warn"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut serve = Serve { child, port, dir };
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(serve.running(), "pgenvelope exited: {}", serve.log());
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "pgenvelope did not listen: {}",
                serve.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        serve
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The process's log so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        let _ = std::fs::File::open(self.log_path()).and_then(|mut f| f.read_to_string(&mut s));
        s
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("proxy.log")
    }

    /// Resident set size in KiB (`VmRSS` of /proc/PID/status).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("process status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS line")
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `pgenvelope_plan_cache_bytes` from the admin endpoint, in KiB (0 if unavailable).
fn plan_cache_kib(admin: &str) -> u64 {
    use std::io::Write;
    let Ok(mut s) = TcpStream::connect(admin) else {
        return 0;
    };
    let _ = write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines()
        .find_map(|l| l.strip_prefix("pgenvelope_plan_cache_bytes "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |b| b as u64 / 1024)
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Default)]
struct Totals {
    statements: AtomicU64,
    errors: AtomicU64,
    mismatches: AtomicU64,
}

/// One client's workload until `until`; returns every (id, value) it believes is stored.
async fn worker(
    n: usize,
    cfg: String,
    table: String,
    until: Instant,
    seed: u64,
    totals: Arc<Totals>,
) -> (tokio_postgres::Client, HashMap<i32, String>) {
    let client = crate::support::harness::connect(&cfg)
        .await
        .expect("connect");
    let org = format!("org{}", n % 25);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ n as u64);
    let insert = client
        .prepare(&format!(
            "INSERT INTO {table} (org_id, name, value, note) VALUES ($1, $2, $3, $4) RETURNING id"
        ))
        .await
        .unwrap();
    let select = client
        .prepare(&format!("SELECT value FROM {table} WHERE id = $1"))
        .await
        .unwrap();
    let update = client
        .prepare(&format!(
            "UPDATE {table} SET value = $1 WHERE id = $2 AND org_id = $3"
        ))
        .await
        .unwrap();
    let mut expected: HashMap<i32, String> = HashMap::new();
    let mut ids: Vec<i32> = Vec::new();
    let mut seq = 0u64;
    let fail = |e: tokio_postgres::Error| {
        totals.errors.fetch_add(1, Ordering::Relaxed);
        match e.as_db_error() {
            Some(db) => eprintln!("soak worker {n}: {} {}", db.code().code(), db.message()),
            None => eprintln!("soak worker {n}: {e}"),
        }
    };
    while Instant::now() < until {
        seq += 1;
        let value = format!("secret {n}-{seq} ünï'cødé");
        let op = if ids.is_empty() {
            0
        } else {
            rng.gen_range(0..6)
        };
        totals.statements.fetch_add(1, Ordering::Relaxed);
        match op {
            0 => match client
                .query_one(&insert, &[&org, &"p", &value, &"note"])
                .await
            {
                Ok(row) => {
                    let id: i32 = row.get(0);
                    ids.push(id);
                    expected.insert(id, value);
                }
                Err(e) => fail(e),
            },
            1 => {
                let sql = format!(
                    "INSERT INTO {table} (org_id, name, value) VALUES ('{org}', 's', '{}') RETURNING id",
                    value.replace('\'', "''")
                );
                match client.simple_query(&sql).await {
                    Ok(msgs) => {
                        let id = msgs.iter().find_map(|m| match m {
                            tokio_postgres::SimpleQueryMessage::Row(r) => {
                                r.get(0).and_then(|v| v.parse::<i32>().ok())
                            }
                            _ => None,
                        });
                        match id {
                            Some(id) => {
                                ids.push(id);
                                expected.insert(id, value);
                            }
                            None => {
                                totals.mismatches.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    Err(e) => fail(e),
                }
            }
            2 | 4 => {
                let id = ids[rng.gen_range(0..ids.len())];
                let got: Result<Option<String>, _> = if op == 2 {
                    client.query_one(&select, &[&id]).await.map(|r| r.get(0))
                } else {
                    client
                        .simple_query(&format!("SELECT value FROM {table} WHERE id = {id}"))
                        .await
                        .map(|msgs| {
                            msgs.iter().find_map(|m| match m {
                                tokio_postgres::SimpleQueryMessage::Row(r) => {
                                    r.get(0).map(str::to_owned)
                                }
                                _ => None,
                            })
                        })
                };
                match got {
                    Ok(v) if v.as_ref() == expected.get(&id) => {}
                    Ok(_) => {
                        totals.mismatches.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => fail(e),
                }
            }
            3 => {
                let id = ids[rng.gen_range(0..ids.len())];
                match client.execute(&update, &[&value, &id, &org]).await {
                    Ok(1) => {
                        expected.insert(id, value);
                    }
                    Ok(_) => {
                        totals.mismatches.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => fail(e),
                }
            }
            _ => {
                let id = ids[rng.gen_range(0..ids.len())];
                let sql = format!(
                    "UPDATE {table} SET value = '{}' WHERE id = {id} AND org_id = '{org}'",
                    value.replace('\'', "''")
                );
                match client.simple_query(&sql).await {
                    Ok(_) => {
                        expected.insert(id, value);
                    }
                    Err(e) => fail(e),
                }
            }
        }
    }
    (client, expected)
}

#[test]
fn soak_many_connections_mixed_encrypted_workload() {
    let connections = env_or("PGENVELOPE_SOAK_CONNECTIONS", 500) as usize;
    let secs = env_or("PGENVELOPE_SOAK_SECS", 20);
    let seed = env_or("PGENVELOPE_SOAK_SEED", rand::random::<u32>() as u64);
    eprintln!("soak: {connections} connections, {secs} s, seed {seed}");
    let cluster = PrivateCluster::start(
        ClusterOptions::default()
            .setting("max_connections", &(connections + 100).to_string())
            .setting("shared_buffers", "'128MB'"),
    )
    .unwrap();
    let table = unique("soak");
    cluster
        .psql(
            "test",
            &format!(
                "CREATE TABLE {table} (id serial primary key, org_id text not null, name text, \
                 value text, note varchar)"
            ),
        )
        .unwrap();
    let admin = format!("127.0.0.1:{}", crate::support::free_port().unwrap());
    let mut serve = Serve::start(
        &format!("postgres://postgres@127.0.0.1:{}/test", cluster.port()),
        Some(&rules_for(std::slice::from_ref(&table))),
        &[
            "--max-connections",
            &(connections + 50).to_string(),
            "--admin",
            &admin,
        ],
    );
    let cfg = format!(
        "host=127.0.0.1 port={} user=postgres dbname=test",
        serve.port
    );
    let rss_start = serve.rss_kib();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let totals = Arc::new(Totals::default());
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let (results, samples) = rt.block_on(async {
        let mut tasks = Vec::new();
        for n in 0..connections {
            tasks.push(tokio::spawn(worker(
                n,
                cfg.clone(),
                table.clone(),
                until,
                seed,
                Arc::clone(&totals),
            )));
            if n % 50 == 49 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        // RSS once a second while the load runs; the plan cache's weight every 10 s.
        let mut samples = Vec::new();
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let t = started.elapsed().as_secs();
            samples.push((t, serve.rss_kib()));
            if t % 10 == 0 {
                eprintln!(
                    "soak: {t} s: RSS {} KiB, plan cache {} KiB",
                    serve.rss_kib(),
                    plan_cache_kib(&admin)
                );
            }
        }
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.expect("worker"));
        }
        (results, samples)
    });
    let rss_end = serve.rss_kib();
    // Read back everything each client wrote, through the proxy.
    let verified = rt.block_on(async {
        let mut verified = 0usize;
        for (client, expected) in &results {
            let ids: Vec<i32> = expected.keys().copied().collect();
            let rows = client
                .query(
                    &format!("SELECT id, value FROM {table} WHERE id = ANY($1)"),
                    &[&ids],
                )
                .await
                .expect("read back");
            assert_eq!(rows.len(), expected.len());
            for r in rows {
                let id: i32 = r.get(0);
                let v: String = r.get(1);
                if expected.get(&id) != Some(&v) {
                    totals.mismatches.fetch_add(1, Ordering::Relaxed);
                }
                verified += 1;
            }
        }
        verified
    });
    let statements = totals.statements.load(Ordering::Relaxed);
    let errors = totals.errors.load(Ordering::Relaxed);
    let mismatches = totals.mismatches.load(Ordering::Relaxed);
    // Warm-up: the first third of the run (every connection open, caches filled).
    let warm = samples
        .iter()
        .find(|(t, _)| *t >= secs / 3)
        .map(|(_, r)| *r)
        .unwrap_or(rss_start);
    let peak = samples.iter().map(|(_, r)| *r).max().unwrap_or(rss_end);
    eprintln!(
        "soak: {connections} connections for {:.1} s: {statements} statements, {errors} errors, \
         {mismatches} mismatches, {verified} rows verified; proxy RSS start {rss_start} KiB, \
         after warm-up {warm} KiB, peak {peak} KiB, end {rss_end} KiB",
        started.elapsed().as_secs_f64()
    );
    assert!(serve.running(), "proxy exited: {}", serve.log());
    assert_eq!(errors, 0, "statements failed under load");
    assert_eq!(
        mismatches, 0,
        "values read back differ from what was written"
    );
    assert!(statements > connections as u64, "every connection worked");
    // Flat memory: after warm-up RSS may wobble with allocator caching and the plan cache may
    // fill towards its 8 MiB cap, but it must not grow with the number of statements.
    assert!(
        rss_end <= warm + warm / 4 + 16 * 1024,
        "proxy RSS grew from {warm} KiB after warm-up to {rss_end} KiB"
    );
    let db = rt.block_on(async {
        crate::support::harness::connect(&format!(
            "host=127.0.0.1 port={} user=postgres dbname=test",
            cluster.port()
        ))
        .await
        .unwrap()
    });
    let scanned = rt.block_on(assert_only_ciphertext(&db, &table));
    assert_eq!(scanned, verified);
    drop(results);
}
