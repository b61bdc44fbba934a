//! Real client programs through the proxy: psql (libpq, including its fast-path FunctionCall
//! for large objects) and pgbench, each compared with or checked against the server directly.

use std::process::{Command, Output};

use crate::support::harness::{main_pg, unique, TestProxy};

fn psql(port: u16, db: &str, args: &[&str]) -> Output {
    let (host, _) = main_pg();
    Command::new("psql")
        .args([
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            &host,
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-d",
            db,
        ])
        .args(args)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("psql is installed")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn psql_script_output_is_identical_direct_and_through_the_proxy() {
    let proxy = TestProxy::start();
    let (_, direct_port) = main_pg();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("script.sql");
    let t = unique("psql_t");
    std::fs::write(
        &script,
        format!(
            r#"
CREATE TEMP TABLE {t} (id int primary key, name text, data bytea, n numeric);
INSERT INTO {t} VALUES (1, 'one', '\x00ff', 1.5), (2, 'twö', NULL, -2);
COPY {t} (id, name) FROM stdin;
3	three
4	\N
\.
SELECT * FROM {t} ORDER BY id;
\copy (SELECT id, name FROM {t} ORDER BY id) TO STDOUT WITH (FORMAT csv, HEADER)
BEGIN;
DELETE FROM {t} WHERE id = 1;
SAVEPOINT s;
DELETE FROM {t};
ROLLBACK TO s;
COMMIT;
SELECT count(*) FROM {t};
PREPARE q(int) AS SELECT name FROM {t} WHERE id = $1;
EXECUTE q(2);
SELECT 1/0;
"#
        ),
    )
    .unwrap();
    let run = |port: u16| {
        let out = Command::new("psql")
            .args([
                "-X",
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "postgres",
                "-d",
                "test",
            ])
            .arg("-f")
            .arg(&script)
            .output()
            .unwrap();
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).replace(&script.display().to_string(), "SCRIPT"),
        )
    };
    let direct = run(direct_port);
    let proxied = run(proxy.port());
    assert!(direct.0.contains("twö"), "{direct:?}");
    assert!(direct.1.contains("division by zero"), "{direct:?}");
    assert_eq!(proxied, direct);
}

#[test]
fn psql_large_objects_use_function_calls() {
    let proxy = TestProxy::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("in.bin");
    let dst = dir.path().join("out.bin");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    // \lo_import and \lo_export go through libpq's fast-path interface (FunctionCall 'F').
    let out = ok(&psql(
        proxy.port(),
        "test",
        &["-c", &format!("\\lo_import '{}'", src.display())],
    ));
    let oid: u32 = out
        .split_whitespace()
        .last()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("lo_import printed {out}"));
    ok(&psql(
        proxy.port(),
        "test",
        &["-c", &format!("\\lo_export {oid} '{}'", dst.display())],
    ));
    ok(&psql(
        proxy.port(),
        "test",
        &["-c", &format!("\\lo_unlink {oid}")],
    ));
    assert_eq!(std::fs::read(&dst).unwrap(), data);
}

fn pgbench(port: u16, db: &str, args: &[&str]) -> Output {
    Command::new("pgbench")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(args)
        .arg(db)
        .output()
        .expect("pgbench is installed")
}

#[test]
fn pgbench_select_only_runs_clean_simple_and_prepared() {
    let (_, direct_port) = main_pg();
    let db = unique("pgenv_bench");
    ok(&psql(
        direct_port,
        "postgres",
        &["-c", &format!("CREATE DATABASE {db}")],
    ));
    struct DropDb(u16, String);
    impl Drop for DropDb {
        fn drop(&mut self) {
            let _ = psql(
                self.0,
                "postgres",
                &[
                    "-c",
                    &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.1),
                ],
            );
        }
    }
    let _cleanup = DropDb(direct_port, db.clone());
    ok(&pgbench(direct_port, &db, &["-i", "-s", "1", "-q"]));
    let proxy = TestProxy::start();
    for mode in ["simple", "extended", "prepared"] {
        let out = pgbench(
            proxy.port(),
            &db,
            &["-S", "-n", "-c", "4", "-j", "2", "-t", "300", "-M", mode],
        );
        let text = ok(&out);
        assert!(
            text.contains("number of transactions actually processed: 1200/1200"),
            "{mode}: {text}"
        );
        assert!(
            text.contains("number of failed transactions: 0"),
            "{mode}: {text}"
        );
    }
    // A read-write run as well (BEGIN/UPDATE/INSERT/COMMIT).
    let text = ok(&pgbench(
        proxy.port(),
        &db,
        &["-n", "-c", "4", "-j", "2", "-t", "100", "-M", "prepared"],
    ));
    assert!(text.contains("number of failed transactions: 0"), "{text}");
}

/// psql output for a path, used by other modules.
pub fn psql_ok(port: u16, db: &str, args: &[&str]) -> String {
    ok(&psql(port, db, args))
}

/// Every `PGENVELOPE_*` variable and `--flag` used in deploy/ exists in `pgenvelope serve --help`.
#[test]
fn deploy_files_use_only_existing_settings() {
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_pgenvelope"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-')) {
            if let Some(name) = word.strip_prefix("PGENVELOPE_") {
                if name.is_empty() {
                    continue;
                }
                assert!(
                    help.contains(&format!("PGENVELOPE_{name}")),
                    "{}: PGENVELOPE_{name}",
                    path.display()
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 4, "deploy files name settings");
}

/// The binary: SIGTERM drains (idle sessions get 57P01, the process exits 0); the README's
/// first command works with an explicit empty rule directory.
#[test]
fn sigterm_drains_and_exits() {
    use crate::support::raw::{error_field, RawConn};
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("rules")).unwrap();
    let port = crate::support::free_port().unwrap();
    let (_, pg_port) = main_pg();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pgenvelope"))
        .current_dir(dir.path())
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args([
            "--upstream",
            &format!("postgres://postgres@127.0.0.1:{pg_port}/test"),
        ])
        .args([
            "--rules",
            "rules",
            "--shutdown-grace",
            "10s",
            "--log",
            "warn",
        ])
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let pid = child.id();
    let params: &[(&str, &[u8])] = &[("user", b"postgres"), ("database", b"test")];
    let mut conn = None;
    for _ in 0..100 {
        if let Ok((c, _)) = RawConn::connect(port, params) {
            conn = Some(c);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mut conn = conn.expect("proxy serving");
    conn.query(b"SELECT 1").unwrap();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let (tag, body) = conn.read_msg().unwrap();
    assert_eq!(tag, b'E');
    assert_eq!(error_field(&body, b'C').as_deref(), Some("57P01"));
    let mut exit = None;
    for _ in 0..200 {
        if let Some(s) = child.try_wait().unwrap() {
            exit = Some(s);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _guard = Kill(child);
    assert!(exit.expect("exited after draining").success());
}

/// A full encrypted workload with the binary logging at trace level: no plaintext value, no
/// ciphertext, no key material and no password appears anywhere in the log output.
#[test]
fn trace_logs_never_contain_values_keys_or_passwords() {
    use crate::support::{Auth, ClusterOptions, PrivateCluster};
    let cluster = PrivateCluster::start(ClusterOptions::new(Auth::ScramSha256)).unwrap();
    cluster
        .psql(
            "test",
            "CREATE TABLE leak (id serial, org_id text, value text)",
        )
        .unwrap();
    let pw = cluster.superuser_password().to_owned();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("rules")).unwrap();
    std::fs::write(
        dir.path().join("rules/leak.toml"),
        "[[table]]\nname = \"leak\"\ntenant_column = \"org_id\"\nencrypt = [\"value\"]\n",
    )
    .unwrap();
    let port = crate::support::free_port().unwrap();
    let log_path = dir.path().join("proxy.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_pgenvelope"))
        .current_dir(dir.path())
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--upstream")
        .arg(format!(
            "postgres://postgres:{pw}@127.0.0.1:{}/test",
            cluster.port()
        ))
        .args(["--rules", "rules", "--kms", "local:kek", "--log", "trace"])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _child = Kill(child);
    let canary = "PLAINTEXT-CANARY-7f3a9";
    let url = format!("postgres://postgres:{pw}@127.0.0.1:{port}/test");
    let mut ok = false;
    for _ in 0..100 {
        if std::process::Command::new("psql")
            .args([url.as_str(), "-X", "-q", "-c", "SELECT 1"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
        {
            ok = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(ok, "proxy serving");
    let script = format!(
        "INSERT INTO leak (org_id, value) VALUES ('acme', '{canary}-lit');\n\
         PREPARE p(text, text) AS INSERT INTO leak (org_id, value) VALUES ($1, $2);\n\
         SELECT value FROM leak;\n\
         COPY leak (org_id, value) FROM STDIN;\nacme\t{canary}-copy\n\\.\n\
         SELECT * FROM leak WHERE value = '{canary}-refused';\n"
    );
    let script_path = dir.path().join("workload.sql");
    std::fs::write(&script_path, &script).unwrap();
    let _ = std::process::Command::new("psql")
        .args([url.as_str(), "-X", "-q"])
        .arg("-f")
        .arg(&script_path)
        .output()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = crate::support::harness::connect(&format!(
            "host=127.0.0.1 port={port} user=postgres password={pw} dbname=test"
        ))
        .await
        .unwrap();
        client
            .execute(
                "INSERT INTO leak (org_id, value) VALUES ($1, $2)",
                &[&"acme", &format!("{canary}-param")],
            )
            .await
            .unwrap();
        let rows = client.query("SELECT value FROM leak", &[]).await.unwrap();
        assert_eq!(rows.len(), 3, "literal, COPY and parameter rows");
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let stored = cluster.psql("test", "SELECT value FROM leak").unwrap();
    let text = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        text.contains("TRACE") || text.contains("DEBUG"),
        "trace logging is on"
    );
    if let Some(line) = text.lines().find(|l| l.contains(canary)) {
        panic!("plaintext in the log: {}", &line[..line.len().min(300)]);
    }
    assert!(!text.contains("enc:v1:"), "ciphertext in the log");
    for line in stored.lines().filter(|l| l.starts_with("enc:v1:")) {
        assert!(!text.contains(&line[7..40]), "ciphertext in the log");
    }
    assert!(!text.contains(&pw), "password in the log");
    let kek = std::fs::read(dir.path().join("kek")).unwrap();
    let hex: String = kek.iter().map(|b| format!("{b:02x}")).collect();
    assert!(!text.to_lowercase().contains(&hex), "KEK in the log");

    // `keys list` shows the organisation's DEK from the key store, never key material.
    let listed = std::process::Command::new(env!("CARGO_BIN_EXE_pgenvelope"))
        .args(["keys", "list", "--json", "--upstream"])
        .arg(format!(
            "postgres://postgres:{pw}@127.0.0.1:{}/test",
            cluster.port()
        ))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.status.success(),
        "{out} {}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let line = out
        .lines()
        .find(|l| l.contains("\"org\":\"acme\""))
        .expect("acme listed");
    assert!(
        line.contains("\"version\":1") && line.contains("\"state\":\"active\""),
        "{line}"
    );
    assert!(line.contains("\"kek\":\"local:"), "{line}");
    let table = std::process::Command::new(env!("CARGO_BIN_EXE_pgenvelope"))
        .args(["keys", "list", "--org", "acme", "--upstream"])
        .arg(format!(
            "postgres://postgres:{pw}@127.0.0.1:{}/test",
            cluster.port()
        ))
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.starts_with("ORGANISATION") && table.contains("acme"),
        "{table}"
    );
}

/// SIGHUP reloads the rules: a newly listed column is encrypted from then on; a broken rule
/// file is refused and the rules in force are kept.
#[test]
fn sighup_reloads_rules_and_keeps_them_on_error() {
    let (_, pg_port) = main_pg();
    let table = crate::support::harness::unique("reload");
    ok(&psql(
        pg_port,
        "test",
        &[
            "-c",
            &format!("CREATE TABLE {table} (id serial, org_id text, a text, b text)"),
        ],
    ));
    struct DropTable(u16, String);
    impl Drop for DropTable {
        fn drop(&mut self) {
            let _ = psql(
                self.0,
                "test",
                &["-c", &format!("DROP TABLE IF EXISTS {}", self.1)],
            );
        }
    }
    let _cleanup = DropTable(pg_port, table.clone());
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("rules")).unwrap();
    let rules = dir.path().join("rules/r.toml");
    let write_rules = |cols: &str| {
        std::fs::write(
            &rules,
            format!(
                "[[table]]\nname = \"{table}\"\ntenant_column = \"org_id\"\nencrypt = [{cols}]\n"
            ),
        )
        .unwrap()
    };
    write_rules("\"a\"");
    let port = crate::support::free_port().unwrap();
    // The org is unique to this run: each run has a fresh local KEK, and the key store in
    // the shared database outlives it.
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_pgenvelope"))
        .current_dir(dir.path())
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args([
            "--upstream",
            &format!("postgres://postgres@127.0.0.1:{pg_port}/test"),
        ])
        .args(["--rules", "rules", "--kms", "local:kek", "--log", "warn"])
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = Kill(child);
    let pid = child.0.id().to_string();
    let through = |sql: &str| psql(port, "test", &["-At", "-c", sql]);
    for _ in 0..100 {
        if through("SELECT 1").status.success() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let insert = |n: &str| {
        ok(&through(&format!(
            "INSERT INTO {table} (org_id, a, b) VALUES ('{table}', 'a-{n}', 'b-{n}')"
        )));
    };
    let stored = |n: &str| {
        ok(&psql(
            pg_port,
            "test",
            &["-At", "-c", &format!("SELECT a, b FROM {table} WHERE a LIKE 'enc:%' OR a = 'a-{n}' ORDER BY id DESC LIMIT 1")],
        ))
    };
    insert("1");
    let row = stored("1");
    assert!(
        row.starts_with("enc:v1:") && row.trim_end().ends_with("|b-1"),
        "{row}"
    );
    // Add column b and reload.
    write_rules("\"a\", \"b\"");
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let mut reloaded = false;
    for i in 0..50 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        insert(&format!("r{i}"));
        let row = stored(&format!("r{i}"));
        if row
            .split('|')
            .nth(1)
            .is_some_and(|b| b.starts_with("enc:v1:"))
        {
            reloaded = true;
            break;
        }
    }
    assert!(reloaded, "b is encrypted after SIGHUP");
    // A broken rule file is refused; the rules in force stay (b still encrypted).
    std::fs::write(&rules, "[[table]]\nname = \n").unwrap();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    std::thread::sleep(std::time::Duration::from_millis(300));
    insert("after-broken");
    let row = stored("after-broken");
    assert!(
        row.split('|')
            .nth(1)
            .is_some_and(|b| b.starts_with("enc:v1:")),
        "{row}"
    );
    // And reads decrypt both columns.
    let out = ok(&through(&format!(
        "SELECT a, b FROM {table} ORDER BY id DESC LIMIT 1"
    )));
    assert_eq!(out.trim(), "a-after-broken|b-after-broken");
}
