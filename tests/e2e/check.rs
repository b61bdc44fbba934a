//! `pgenvelope check` through the real binary: client TLS files loaded as the listener loads
//! them, the upstream CA file parsed, local KEK files checked without ever being created, and
//! the `--against-kms` round trip (the AWS KMS round trip against moto is in `kms`), and
//! `--against-db` against the shared test database: row keys, the data database, search
//! indexes and the `--ddl` that creates them (run through psql).

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use pgenvelope::keys::{KekProvider, LocalKek};

use crate::support::ca::Ca;

/// Every environment variable `check` reads, so a developer's settings cannot leak in.
const CHECK_ENV: &[&str] = &[
    "PGENVELOPE_CONFIG",
    "PGENVELOPE_RULES",
    "PGENVELOPE_KMS",
    "PGENVELOPE_KMS_ALSO",
    "PGENVELOPE_UPSTREAM",
    "PGENVELOPE_TLS_CERT",
    "PGENVELOPE_TLS_KEY",
    "PGENVELOPE_UPSTREAM_SSLMODE",
    "PGENVELOPE_UPSTREAM_CA",
    "PGENVELOPE_DATA_DATABASE",
];

/// Run `pgenvelope check` in `dir` with an empty rule directory and `args`.
pub(crate) fn check<S: AsRef<OsStr>>(dir: &Path, args: &[S]) -> Output {
    check_with_env(dir, args, &[])
}

/// [`check`] with further environment variables.
pub(crate) fn check_with_env<S: AsRef<OsStr>>(
    dir: &Path,
    args: &[S],
    env: &[(&str, &str)],
) -> Output {
    let rules = dir.join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgenvelope"));
    cmd.current_dir(dir).arg("check").arg("--rules").arg(&rules);
    // A developer's AWS profile must not decide which KMS `--against-kms` talks to.
    for var in CHECK_ENV.iter().chain(&["AWS_PROFILE"]) {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    cmd.args(args).output().expect("run pgenvelope check")
}

/// stdout and stderr of a run, for assertions and their messages.
pub(crate) fn texts(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn kms_arg(path: &Path) -> String {
    format!("local:{}", path.display())
}

fn p(path: &Path) -> &OsStr {
    path.as_os_str()
}

#[test]
fn valid_tls_files_pass() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("check CA");
    let ca_file = ca.write(dir.path(), "ca.crt");
    let server = ca.server(dir.path(), "server");
    let kek = dir.path().join("kek");
    let out = check(
        dir.path(),
        &[
            OsStr::new("--tls-cert"),
            p(&server.cert),
            OsStr::new("--tls-key"),
            p(&server.key),
            OsStr::new("--upstream-ca"),
            p(&ca_file),
            OsStr::new("--kms"),
            OsStr::new(&kms_arg(&kek)),
        ],
    );
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!(
            "tls (clients): certificate {} and key {} ok",
            server.cert.display(),
            server.key.display()
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "tls (upstream): sslmode verify-full, CA {} (1 certificate) ok",
            ca_file.display()
        )),
        "{stdout}"
    );
    assert!(stdout.ends_with("ok\n"), "{stdout}");
}

#[test]
fn tls_files_come_from_the_environment_too() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("check CA");
    let server = ca.server(dir.path(), "server");
    let other = ca.server(dir.path(), "other");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgenvelope"));
    std::fs::create_dir_all(dir.path().join("rules")).unwrap();
    for var in CHECK_ENV {
        cmd.env_remove(var);
    }
    let out = cmd
        .current_dir(dir.path())
        .args(["check", "--rules", "rules"])
        .env("PGENVELOPE_TLS_CERT", &server.cert)
        .env("PGENVELOPE_TLS_KEY", &other.key)
        .output()
        .unwrap();
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("does not belong to the certificate"),
        "{stderr}"
    );
}

#[test]
fn key_of_another_certificate_fails_naming_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("check CA");
    let server = ca.server(dir.path(), "server");
    let other = ca.server(dir.path(), "other");
    let out = check(
        dir.path(),
        &[
            OsStr::new("--tls-cert"),
            p(&server.cert),
            OsStr::new("--tls-key"),
            p(&other.key),
        ],
    );
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("error: tls (clients) (--tls-cert/--tls-key)"))
        .unwrap_or_else(|| panic!("no tls error line in {stderr}"));
    assert!(
        line.contains(&server.cert.display().to_string())
            && line.contains(&other.key.display().to_string())
            && line.contains("does not belong to the certificate"),
        "{line}"
    );
    assert!(!stdout.contains("tls (clients): certificate"), "{stdout}");
    assert!(stderr.contains("1 problem(s) found"), "{stderr}");
}

#[test]
fn missing_or_garbage_client_tls_files_fail_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("check CA");
    let server = ca.server(dir.path(), "server");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let missing = dir.path().join("missing.crt");
    for (cert, key, named) in [
        (&missing, &server.key, &missing),
        (&garbage, &server.key, &garbage),
        (&server.cert, &garbage, &garbage),
    ] {
        let out = check(
            dir.path(),
            &[
                OsStr::new("--tls-cert"),
                p(cert),
                OsStr::new("--tls-key"),
                p(key),
            ],
        );
        let (stdout, stderr) = texts(&out);
        assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
        assert!(
            stderr.contains("error: tls (clients) (--tls-cert/--tls-key)")
                && stderr.contains(&named.display().to_string()),
            "{stderr}"
        );
    }
    // Only one of the pair is a configuration error, as for `serve`.
    let out = check(dir.path(), &[OsStr::new("--tls-cert"), p(&server.cert)]);
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stderr.contains("tls_key"), "{stderr}");
}

#[test]
fn garbage_upstream_ca_fails() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("ca.pem");
    std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\nnot base64 !\n").unwrap();
    for mode in ["verify-full", "verify-ca", "require"] {
        let out = check(
            dir.path(),
            &[
                OsStr::new("--upstream-ca"),
                p(&garbage),
                OsStr::new("--upstream-sslmode"),
                OsStr::new(mode),
            ],
        );
        let (stdout, stderr) = texts(&out);
        assert_eq!(out.status.code(), Some(1), "{mode}\n{stdout}\n{stderr}");
        assert!(
            stderr.contains("error: tls (upstream) (--upstream-ca)")
                && stderr.contains(&garbage.display().to_string()),
            "{mode}\n{stderr}"
        );
    }
    let out = check(
        dir.path(),
        &[
            OsStr::new("--upstream-ca"),
            p(&dir.path().join("absent.pem")),
        ],
    );
    let (_, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("absent.pem"), "{stderr}");
}

#[test]
fn missing_local_kek_will_be_created_and_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let kek = dir.path().join("keys/kek");
    for extra in [None, Some("--against-kms")] {
        let mut args = vec!["--kms".to_owned(), kms_arg(&kek)];
        args.extend(extra.map(str::to_owned));
        let out = check(dir.path(), &args);
        let (stdout, stderr) = texts(&out);
        assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
        assert!(stdout.contains("will be created"), "{stdout}");
        assert!(!kek.exists(), "check created the key file");
        assert!(
            !dir.path().join("keys").exists(),
            "check created the directory"
        );
    }
    // The default location, relative to the working directory, is not created either.
    let out = check::<&str>(dir.path(), &[]);
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("kms: local:.pgenvelope/kek: the key file does not exist yet"),
        "{stdout}"
    );
    assert!(!dir.path().join(".pgenvelope").exists());
}

#[test]
fn corrupt_local_kek_fails() {
    let dir = tempfile::tempdir().unwrap();
    let kek = dir.path().join("kek");
    std::fs::write(&kek, [7u8; 31]).unwrap();
    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = check(dir.path(), &["--kms".to_owned(), kms_arg(&kek)]);
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("error: kms (--kms)")
            && stderr.contains(&kek.display().to_string())
            && stderr.contains("exactly 32 bytes, found 31 bytes"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&kek).unwrap(), [7u8; 31], "file untouched");

    // Right size, but readable by others.
    std::fs::write(&kek, [7u8; 32]).unwrap();
    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = check(dir.path(), &["--kms".to_owned(), kms_arg(&kek)]);
    let (_, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("chmod 600"), "{stderr}");
}

#[test]
fn against_kms_round_trips_with_a_local_kek() {
    let dir = tempfile::tempdir().unwrap();
    let kek_path = dir.path().join("kek");
    let kek = LocalKek::open_or_create(&kek_path).unwrap();
    let old_path = dir.path().join("old-kek");
    let old = LocalKek::open_or_create(&old_path).unwrap();
    let out = check(
        dir.path(),
        &[
            "--kms".to_owned(),
            kms_arg(&kek_path),
            "--kms-also".to_owned(),
            kms_arg(&old_path),
            "--against-kms".to_owned(),
        ],
    );
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!(
            "kms: {}: round trip ok (wrapped and unwrapped a random test key; KEK id {})",
            kms_arg(&kek_path),
            kek.kek_id()
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "kms (unwrap only): {}: key file ok (KEK id {}",
            kms_arg(&old_path),
            old.kek_id()
        )),
        "{stdout}"
    );
    // Never key material: no run of the key file's bytes, in hex, in the output.
    for path in [&kek_path, &old_path] {
        let hex: String = std::fs::read(path)
            .unwrap()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        for window in (0..hex.len() - 16).step_by(8) {
            let piece = &hex[window..window + 16];
            assert!(
                !stdout.contains(piece) && !stderr.contains(piece),
                "key bytes printed"
            );
        }
    }

    // An unwrap-only key file that does not exist could unwrap nothing: an error.
    let missing: PathBuf = dir.path().join("never-there");
    let out = check(
        dir.path(),
        &[
            "--kms".to_owned(),
            kms_arg(&kek_path),
            "--kms-also".to_owned(),
            kms_arg(&missing),
        ],
    );
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("error: kms (unwrap only) (--kms-also)")
            && stderr.contains("does not exist"),
        "{stderr}"
    );
    assert!(!missing.exists());
}

/// `--against-db` checks a rule's `row_key`: it must be the single-column primary key, of a
/// type whose printed form is stable.
#[tokio::test]
async fn against_db_checks_row_keys() {
    let good = crate::support::harness::unique("rk_good");
    let bad = crate::support::harness::unique("rk_bad");
    crate::support::harness::direct()
        .await
        .batch_execute(&format!(
            "CREATE TABLE {good} (id bigint PRIMARY KEY, value text);\
             CREATE TABLE {bad} (id serial PRIMARY KEY, made timestamptz, value text)"
        ))
        .await
        .unwrap();
    let _drop = crate::support::harness::DropTables(format!("{good}, {bad}"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("rules")).unwrap();
    std::fs::write(
        dir.path().join("rules/r.toml"),
        format!(
            "[[table]]\nname = \"{good}\"\nrow_key = \"id\"\nencrypt = [\"value\"]\n\
             [[table]]\nname = \"{bad}\"\nrow_key = \"made\"\nencrypt = [\"value\"]\n"
        ),
    )
    .unwrap();
    let (host, port) = crate::support::harness::main_pg();
    let out = check(
        dir.path(),
        &[
            "--against-db".to_owned(),
            "--upstream".to_owned(),
            format!("postgres://postgres@{host}:{port}/test"),
        ],
    );
    let (stdout, stderr) = texts(&out);
    let all = format!("{stdout}\n{stderr}");
    assert_ne!(out.status.code(), Some(0), "{all}");
    assert!(
        all.contains(&format!("public.{bad}.made"))
            && all.contains("row key type is timestamp with time zone")
            && all.contains("must be the table's single-column primary key (it is id)"),
        "{all}"
    );
    assert!(!all.contains(&format!("public.{good}.id")), "{all}");
}

/// Issue #20 item 9: `--against-db` reads the catalog of the database holding the tables,
/// named with `--data-database` or the `data_database` file key, while `--upstream` stays the
/// proxy's (the key store's database).
#[tokio::test]
async fn against_db_checks_the_data_database() {
    let app = crate::support::harness::TempDatabase::create("check_app").await;
    let t = crate::support::harness::unique("checked");
    app.direct()
        .await
        .batch_execute(&format!(
            "CREATE TABLE {t} (id bigint PRIMARY KEY, org_id text NOT NULL, value text)"
        ))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("rules")).unwrap();
    std::fs::write(
        dir.path().join("rules/r.toml"),
        format!(
            "[[table]]\nname = \"{t}\"\ntenant_column = \"org_id\"\nrow_key = \"id\"\n\
             encrypt = [\"value\"]\n"
        ),
    )
    .unwrap();
    let (host, port) = crate::support::harness::main_pg();
    let upstream = format!("postgres://postgres@{host}:{port}/test");
    let kek = dir.path().join("kek");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "--against-db".to_owned(),
            "--upstream".to_owned(),
            upstream.clone(),
            "--kms".to_owned(),
            kms_arg(&kek),
        ];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        check(dir.path(), &args)
    };

    // Without the option the table is looked for in the key store's database.
    let out = run(&[]);
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.contains(&format!("error: public.{t} ("))
            && stderr.contains("r.toml:1): table does not exist in database test (of --upstream)")
            && stderr.contains("name it with --data-database"),
        "{stdout}\n{stderr}"
    );

    let out = run(&["--data-database", &app.0]);
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!(
            "database {}: every table and column exists and is text-like",
            app.0
        )),
        "{stdout}"
    );

    // The same from the configuration file.
    let config = dir.path().join("pgenvelope.toml");
    std::fs::write(&config, format!("data_database = \"{}\"\n", app.0)).unwrap();
    let out = run(&["--config", &config.display().to_string()]);
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains(&format!("database {}:", app.0)), "{stdout}");

    // A data database that cannot be reached: an error naming it.
    let missing = format!("{}_missing", app.0);
    let out = run(&["--data-database", &missing]);
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.contains(&format!(
            "connecting to database {missing} (--data-database)"
        )),
        "{stderr}"
    );
}

/// `check --against-db` on the main test database with the rules in `dir/rules/r.toml`.
fn check_db(dir: &Path, extra: &[&str]) -> Output {
    let (host, port) = crate::support::harness::main_pg();
    let mut args = vec![
        "--against-db".to_owned(),
        "--upstream".to_owned(),
        format!("postgres://postgres@{host}:{port}/test"),
        "--kms".to_owned(),
        kms_arg(&dir.join("kek")),
    ];
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    check(dir, &args)
}

/// A temporary directory whose `rules/r.toml` holds `rules`.
fn rules_dir(rules: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("rules")).unwrap();
    std::fs::write(dir.path().join("rules/r.toml"), rules).unwrap();
    dir
}

/// Feed `sql` to psql on the main test database, stopping at the first error.
fn psql_script(sql: &str) -> Output {
    use std::io::Write;
    let (host, port) = crate::support::harness::main_pg();
    let mut child = Command::new(crate::support::psql().expect("psql"))
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-h", &host, "-p"])
        .arg(port.to_string())
        .args(["-U", "postgres", "-d", "test", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run psql");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(sql.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// The plan of `query` with sequential scans off: names the index a look-up can use.
async fn plan(client: &tokio_postgres::Client, query: &str) -> String {
    client
        .batch_execute("SET enable_seqscan = off")
        .await
        .unwrap();
    let rows = client
        .query(&format!("EXPLAIN {query}"), &[])
        .await
        .unwrap();
    rows.iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A searchable column without an index on `left(column, 31)` is a warning (look-ups still
/// return the right rows), and `--ddl` prints exactly the SQL creating the missing indexes,
/// quoted as PostgreSQL needs, which psql runs as it is; afterwards nothing is missing.
#[tokio::test]
async fn against_db_reports_missing_search_indexes_and_ddl_creates_them() {
    let t = crate::support::harness::unique("search_ix");
    let mixed = format!("Mixed_{t}");
    let client = crate::support::harness::direct().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {t} (id bigint PRIMARY KEY, org_id text, email text, code varchar, \
                               notes text);\
             CREATE TABLE \"{mixed}\" (\"eMail\" text);\
             CREATE INDEX ON {t} (email);\
             CREATE INDEX ON {t} (left(email, 7));\
             CREATE INDEX ON {t} (left(code, 31)) WHERE org_id = 'a';\
             CREATE INDEX ON {t} (left(notes, 31));\
             CREATE INDEX ON \"{mixed}\" (left(\"eMail\", 31) COLLATE \"C\")"
        ))
        .await
        .unwrap();
    let _drop = crate::support::harness::DropTables(format!("{t}, \"{mixed}\""));
    let dir = rules_dir(&format!(
        "[[table]]\nname = \"{t}\"\ntenant_column = \"org_id\"\n\
         encrypt = [\"notes\", {{ name = \"email\", search = \"equality\" }}, \
                    {{ name = \"code\", search = \"equality-ci\" }}]\n\
         [[table]]\nname = '\"{mixed}\"'\nencrypt = [{{ name = '\"eMail\"', search = \"equality\" }}]\n"
    ));

    // None of the existing indexes serves a look-up: a warning per searchable column, exit 0.
    let out = check_db(dir.path(), &[]);
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    for (column, term, mode) in [
        (format!("public.{t}.email"), "left(email, 31)", "equality"),
        (format!("public.{t}.code"), "left(code, 31)", "equality-ci"),
        (
            format!("public.{mixed}.eMail"),
            "left(\"eMail\", 31)",
            "equality",
        ),
    ] {
        let line = stderr
            .lines()
            .find(|l| l.starts_with(&format!("warning: {column} (")))
            .unwrap_or_else(|| panic!("no warning for {column} in\n{stderr}"));
        assert!(
            line.contains(&format!("no search index on {term}"))
                && line.contains(&format!("(search = \"{mode}\") return the right rows"))
                && line.contains("--ddl"),
            "{line}"
        );
    }
    assert!(!stderr.contains(&format!("{t}.notes")), "{stderr}");
    assert!(stdout.ends_with("ok (3 warning(s))\n"), "{stdout}");

    // --ddl: SQL only on stdout, one statement per line.
    let out = check_db(dir.path(), &["--ddl"]);
    let (ddl, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(0), "{ddl}\n{stderr}");
    let expected = [
        format!("{t}_email_search ON public.{t} (left(email, 31));"),
        format!("{t}_code_search ON public.{t} (left(code, 31));"),
        format!("\"{mixed}_eMail_search\" ON public.\"{mixed}\" (left(\"eMail\", 31));"),
    ]
    .iter()
    .flat_map(|on| {
        [
            format!("CREATE INDEX IF NOT EXISTS {on}"),
            format!(
                "-- for per-organisation uniqueness instead: CREATE UNIQUE INDEX IF NOT EXISTS {on}"
            ),
        ]
    })
    .collect::<Vec<_>>();
    assert_eq!(ddl.lines().collect::<Vec<_>>(), expected, "{stderr}");
    assert!(
        stderr.contains("rules: 2 table(s)") && stderr.contains("no search index on"),
        "{stderr}"
    );

    // The whole set-up: `check --against-db --ddl | psql`.
    let ran = psql_script(&ddl);
    assert!(
        ran.status.success(),
        "{}",
        crate::support::output_text(&ran)
    );
    let indexes: Vec<String> = client
        .query(
            "SELECT indexname::text FROM pg_indexes WHERE indexname = ANY ($1) ORDER BY 1",
            &[&vec![
                format!("{t}_email_search"),
                format!("{t}_code_search"),
                format!("{mixed}_eMail_search"),
            ]],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(indexes.len(), 3, "{indexes:?}");
    // They serve the look-ups the proxy sends, varchar and mixed-case columns included.
    for (query, index) in [
        (
            format!("SELECT id FROM {t} WHERE left(email, 31) = 'x'"),
            format!("{t}_email_search"),
        ),
        (
            format!("SELECT id FROM {t} WHERE left(code, 31) = 'x'"),
            format!("{t}_code_search"),
        ),
        (
            format!("SELECT 1 FROM \"{mixed}\" WHERE left(\"eMail\", 31) = 'x'"),
            format!("\"{mixed}_eMail_search\""),
        ),
    ] {
        let plan = plan(&client, &query).await;
        assert!(plan.contains(&format!(" on {index}")), "{query}\n{plan}");
    }

    // Nothing is missing any more.
    let out = check_db(dir.path(), &[]);
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(!stderr.contains("search index"), "{stderr}");
    assert!(
        stdout.contains(&format!(
            "search index (public.{t}.email): {t}_email_search\n"
        )) && stdout.contains(&format!(
            "search index (public.{mixed}.eMail): {mixed}_eMail_search\n"
        )) && stdout.ends_with("ok\n"),
        "{stdout}"
    );
    let out = check_db(dir.path(), &["--ddl"]);
    let (ddl, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(0), "{ddl}\n{stderr}");
    assert_eq!(ddl, "", "{stderr}");
    assert!(stderr.contains("ddl: nothing to create"), "{stderr}");

    // --ddl is about the database.
    let out = check(dir.path(), &["--ddl"]);
    let (_, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--against-db"), "{stderr}");
}

/// The UNIQUE form `--ddl` offers as a comment is the per-organisation uniqueness index and
/// counts as the search index; an index left invalid is rebuilt with REINDEX; a name taken by
/// another relation is not reused.
#[tokio::test]
async fn against_db_unique_search_index_invalid_index_and_taken_name() {
    let t = crate::support::harness::unique("search_uq");
    let client = crate::support::harness::direct().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {t} (email text, code text, handle text);\
             CREATE TABLE {t}_handle_search ()"
        ))
        .await
        .unwrap();
    let _drop = crate::support::harness::DropTables(format!("{t}, {t}_handle_search"));
    let dir = rules_dir(&format!(
        "[[table]]\nname = \"{t}\"\nencrypt = [{{ name = \"email\", search = \"equality-ci\" }}, \
         {{ name = \"code\", search = \"equality\" }}, {{ name = \"handle\", search = \"equality\" }}]\n"
    ));
    let out = check_db(dir.path(), &["--ddl"]);
    let (ddl, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(0), "{ddl}\n{stderr}");
    let prefix = "-- for per-organisation uniqueness instead: ";
    let email_unique = ddl
        .lines()
        .find(|l| l.starts_with(prefix) && l.contains("(left(email, 31))"))
        .unwrap_or_else(|| panic!("no UNIQUE form for email in\n{ddl}"));
    let ran = psql_script(&email_unique[prefix.len()..]);
    assert!(
        ran.status.success(),
        "{}",
        crate::support::output_text(&ran)
    );
    // The name of the existing table is not used; another deterministic one is.
    let handle = ddl
        .lines()
        .find(|l| l.starts_with("CREATE INDEX") && l.contains("(left(handle, 31))"))
        .unwrap_or_else(|| panic!("no index for handle in\n{ddl}"));
    assert!(
        !handle.contains(&format!(" {t}_handle_search ")) && handle.contains("_search ON "),
        "{handle}"
    );

    // A failed CREATE UNIQUE INDEX CONCURRENTLY (duplicates) leaves an invalid index.
    client
        .batch_execute(&format!("INSERT INTO {t} (code) VALUES ('same'), ('same')"))
        .await
        .unwrap();
    let failed = client
        .batch_execute(&format!(
            "CREATE UNIQUE INDEX CONCURRENTLY {t}_code_search ON {t} (left(code, 31))"
        ))
        .await;
    assert!(
        failed.is_err(),
        "the duplicate values should fail the build"
    );

    let out = check_db(dir.path(), &[]);
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!(
            "search index (public.{t}.email): {t}_email_search (unique: per-organisation \
             uniqueness of plaintexts)"
        )),
        "{stdout}"
    );
    assert!(
        stderr.contains(&format!(
            "search index {t}_code_search is not valid (left by a failed CREATE INDEX \
             CONCURRENTLY?)"
        )),
        "{stderr}"
    );
    let out = check_db(dir.path(), &["--ddl"]);
    let (ddl, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(0), "{ddl}\n{stderr}");
    let lines: Vec<&str> = ddl.lines().collect();
    assert_eq!(
        lines[0],
        format!("REINDEX INDEX public.{t}_code_search;"),
        "{ddl}"
    );
    assert!(lines[1..].iter().all(|l| l.contains("handle")), "{ddl}");
}

/// The `warning:` line of `check` about `column` that contains `needle`.
fn warning_about<'a>(stderr: &'a str, column: &str, needle: &str) -> &'a str {
    stderr
        .lines()
        .find(|l| l.starts_with(&format!("warning: {column} (")) && l.contains(needle))
        .unwrap_or_else(|| panic!("no warning on {column} with {needle:?} in\n{stderr}"))
}

/// A unique constraint or index on an encrypted column never fires (equal plaintexts encrypt
/// differently); only the term index of a searchable column compares plaintexts.
#[tokio::test]
async fn against_db_warns_about_unique_constraints_on_encrypted_columns() {
    let t = crate::support::harness::unique("uq_enc");
    let client = crate::support::harness::direct().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {t} (id bigint PRIMARY KEY, org_id text, email text UNIQUE, ssn text, \
                               nick text, handle text, body text, notes text);\
             CREATE UNIQUE INDEX {t}_org_ssn ON {t} (org_id, ssn);\
             CREATE UNIQUE INDEX {t}_lower_nick ON {t} (lower(nick));\
             CREATE UNIQUE INDEX {t}_handle_search ON {t} (left(handle, 31));\
             CREATE UNIQUE INDEX {t}_body_prefix ON {t} (left(body, 31));\
             CREATE INDEX ON {t} (notes);\
             CREATE UNIQUE INDEX ON {t} (id) INCLUDE (notes)"
        ))
        .await
        .unwrap();
    let _drop = crate::support::harness::DropTables(t.clone());
    let dir = rules_dir(&format!(
        "[[table]]\nname = \"{t}\"\ntenant_column = \"org_id\"\n\
         encrypt = [\"email\", \"ssn\", \"nick\", \"body\", \"notes\", \
                    {{ name = \"handle\", search = \"equality\" }}]\n"
    ));
    let out = check_db(dir.path(), &[]);
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let col = |c: &str| format!("public.{t}.{c}");
    for (column, what) in [
        (
            "email",
            format!("UNIQUE constraint {t}_email_key never rejects a duplicate"),
        ),
        (
            "ssn",
            format!("unique index {t}_org_ssn never rejects a duplicate"),
        ),
        (
            "nick",
            format!("unique index {t}_lower_nick never rejects a duplicate"),
        ),
    ] {
        let line = warning_about(&stderr, &col(column), &what);
        assert!(
            line.contains("equal plaintexts encrypt to different values")
                && line.contains(&format!(
                    "make the column searchable (search = \"equality\") and use a UNIQUE index \
                     on left({column}, 31)"
                )),
            "{line}"
        );
    }
    warning_about(
        &stderr,
        &col("body"),
        &format!(
            "unique index {t}_body_prefix on left(body, 31) compares the values' data key ids"
        ),
    );
    // The term index of a searchable column is the per-organisation uniqueness index; an
    // encrypted column merely included in a unique index or in a plain index is fine.
    assert!(!stderr.contains(&col("handle")), "{stderr}");
    assert!(!stderr.contains(&col("notes")), "{stderr}");
    assert!(
        stdout.contains(&format!(
            "search index ({}): {t}_handle_search (unique: per-organisation uniqueness of \
             plaintexts)",
            col("handle")
        )),
        "{stdout}"
    );
    assert!(stdout.ends_with("ok (4 warning(s))\n"), "{stdout}");
}

/// A `varchar(n)` encrypted column: the longest plaintext that fits once encrypted (checked
/// here by storing sealed values of that length and one byte more), and the length plaintexts
/// of `n` bytes need.
#[tokio::test]
async fn against_db_warns_about_short_varchar_columns() {
    use pgenvelope::crypto::{
        ColumnId, ColumnKey, DataKey, DekId, NonceSource, OrgId, SearchMode, TermKey,
    };

    let t = crate::support::harness::unique("short_vc");
    let client = crate::support::harness::direct().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {t} (id serial PRIMARY KEY, name varchar(255), code varchar(255), \
                               tiny varchar(40), fixed char(200), body text, free varchar)"
        ))
        .await
        .unwrap();
    let _drop = crate::support::harness::DropTables(t.clone());
    let dir = rules_dir(&format!(
        "[[table]]\nname = \"{t}\"\n\
         encrypt = [\"name\", \"tiny\", \"fixed\", \"body\", \"free\", \
                    {{ name = \"code\", search = \"equality\" }}]\n"
    ));
    let out = check_db(dir.path(), &[]);
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let col = |c: &str| format!("public.{t}.{c}");
    warning_about(
        &stderr,
        &col("name"),
        "varchar(255) holds plaintexts of up to 137 bytes once encrypted (a longer one fails \
         with SQLSTATE 22001); plaintexts of up to 255 bytes need varchar(415); use text",
    );
    warning_about(
        &stderr,
        &col("code"),
        "varchar(255) holds plaintexts of up to 119 bytes once encrypted as searchable values \
         (a longer one fails with SQLSTATE 22001); plaintexts of up to 255 bytes need \
         varchar(439); use text",
    );
    warning_about(
        &stderr,
        &col("tiny"),
        "varchar(40) holds no value once encrypted (an empty plaintext needs varchar(75))",
    );
    warning_about(
        &stderr,
        &col("fixed"),
        "char(200) holds plaintexts of up to 95 bytes once encrypted",
    );
    assert!(!stderr.contains(&col("body")), "{stderr}");
    assert!(!stderr.contains(&col("free")), "{stderr}");

    // The numbers are PostgreSQL's: a sealed value of the longest plaintext is stored, one of a
    // byte more is refused.
    let column = ColumnId::from_name(&col("name"));
    let key = ColumnKey::derive(&DataKey::generate(), DekId::new_random(), column);
    let terms = TermKey::derive(
        &DataKey::generate(),
        DekId::new_random(),
        column,
        SearchMode::Equality,
    );
    let org = OrgId::new("acme").unwrap();
    let mut nonces = NonceSource::from_os_rng();
    for (target, searchable, longest) in [("name", false, 137), ("code", true, 119)] {
        for len in [longest, longest + 1] {
            let plaintext = "x".repeat(len);
            let mut value = String::new();
            if searchable {
                let term = terms.term(plaintext.as_bytes());
                key.seal_searchable_into(
                    &org,
                    None,
                    &term,
                    plaintext.as_bytes(),
                    &mut nonces,
                    &mut value,
                )
                .unwrap();
            } else {
                key.seal_into(&org, plaintext.as_bytes(), &mut nonces, &mut value)
                    .unwrap();
            }
            let stored = client
                .execute(
                    &format!("INSERT INTO {t} ({target}) VALUES ($1)"),
                    &[&value],
                )
                .await;
            match (len == longest, stored) {
                (true, Ok(_)) => {}
                (false, Err(e)) => assert_eq!(
                    crate::support::harness::code(&e).as_deref(),
                    Some("22001"),
                    "{e}"
                ),
                (fits, result) => panic!("{target}, {len} bytes (fits: {fits}): {result:?}"),
            }
        }
    }
}
