//! TLS on both legs with a private CA generated per test: clients verify the proxy
//! (verify-full), the proxy verifies a PostgreSQL started with ssl=on.

use crate::support::output_text;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use pgenvelope::config::SslMode;
use pgenvelope::proxy::TlsFiles;

use crate::support::ca::{psql_conninfo, tls_cluster, tls_cluster_for, Ca};
use crate::support::cluster::{ClusterOptions, PrivateCluster};
use crate::support::harness::{main_pg, ProxyOptions, TestProxy};
use crate::support::vault::Vault;

fn tls_proxy(files: &TlsFiles, require: bool) -> TestProxy {
    let (host, port) = main_pg();
    let mut opts = ProxyOptions::to(&host, port);
    opts.tls = Some(files.clone());
    opts.require_client_tls = require;
    TestProxy::with(opts)
}

#[test]
fn client_verify_full_through_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("pgenvelope test CA");
    let ca_file = ca.write(dir.path(), "ca.crt");
    let files = ca.server(dir.path(), "proxy");
    let proxy = tls_proxy(&files, false);
    for host in ["localhost", "127.0.0.1"] {
        let conninfo = format!(
            "host={host} port={} user=postgres dbname=test sslmode=verify-full sslrootcert={}",
            proxy.port(),
            ca_file.display()
        );
        let out = psql_conninfo(&conninfo, "\\conninfo");
        assert!(out.status.success(), "{}", output_text(&out));
        let info = String::from_utf8_lossy(&out.stdout);
        assert!(info.contains("SSL connection"), "{info}");
        let out = psql_conninfo(&conninfo, "SELECT 40 + 2");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "42",
            "{}",
            output_text(&out)
        );
    }
    // Without TLS flags on the client the proxy still serves plaintext.
    let out = psql_conninfo(
        &format!(
            "host=127.0.0.1 port={} user=postgres dbname=test sslmode=disable",
            proxy.port()
        ),
        "SELECT 1",
    );
    assert!(out.status.success(), "{}", output_text(&out));
}

#[test]
fn client_with_the_wrong_ca_refuses_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("pgenvelope test CA");
    let other = Ca::new("some other CA");
    let other_file = other.write(dir.path(), "other.crt");
    let files = ca.server(dir.path(), "proxy");
    let proxy = tls_proxy(&files, false);
    let out = psql_conninfo(
        &format!(
            "host=localhost port={} user=postgres dbname=test sslmode=verify-full sslrootcert={}",
            proxy.port(),
            other_file.display()
        ),
        "SELECT 1",
    );
    assert!(!out.status.success(), "{}", output_text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("certificate"), "{err}");
}

#[test]
fn require_client_tls_refuses_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("pgenvelope test CA");
    let files = ca.server(dir.path(), "proxy");
    let proxy = tls_proxy(&files, true);
    let out = psql_conninfo(
        &format!(
            "host=127.0.0.1 port={} user=postgres dbname=test sslmode=disable",
            proxy.port()
        ),
        "SELECT 1",
    );
    assert!(!out.status.success(), "{}", output_text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TLS is required"), "{err}");
    let out = psql_conninfo(
        &format!(
            "host=127.0.0.1 port={} user=postgres dbname=test sslmode=require",
            proxy.port()
        ),
        "SELECT 1",
    );
    assert!(out.status.success(), "{}", output_text(&out));
}

#[test]
fn ssl_request_is_answered_s_and_early_bytes_are_refused() {
    const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    const GSSENC_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("pgenvelope test CA");
    let files = ca.server(dir.path(), "proxy");
    let proxy = tls_proxy(&files, false);

    let mut s = std::net::TcpStream::connect(proxy.addr()).unwrap();
    s.write_all(&SSL_REQUEST).unwrap();
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).unwrap();
    assert_eq!(answer[0], b'S');

    // GSSENCRequest stays refused; then SSLRequest is still possible (libpq's order with
    // gssencmode=prefer), but a repeated request is a protocol violation, as in PostgreSQL.
    let mut s = std::net::TcpStream::connect(proxy.addr()).unwrap();
    s.write_all(&GSSENC_REQUEST).unwrap();
    s.read_exact(&mut answer).unwrap();
    assert_eq!(answer[0], b'N');
    s.write_all(&GSSENC_REQUEST).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    assert_eq!(buf.first(), Some(&b'E'));
    assert!(String::from_utf8_lossy(&buf).contains("08P01"));
    let mut s = std::net::TcpStream::connect(proxy.addr()).unwrap();
    s.write_all(&GSSENC_REQUEST).unwrap();
    s.read_exact(&mut answer).unwrap();
    assert_eq!(answer[0], b'N');
    s.write_all(&SSL_REQUEST).unwrap();
    s.read_exact(&mut answer).unwrap();
    assert_eq!(answer[0], b'S');

    // Bytes sent behind the SSLRequest, before the answer, are refused with 08P01.
    let mut s = std::net::TcpStream::connect(proxy.addr()).unwrap();
    let mut early = SSL_REQUEST.to_vec();
    early.extend_from_slice(&[0x16, 0x03, 0x01, 0x00]);
    s.write_all(&early).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    assert_eq!(buf.first(), Some(&b'E'));
    assert!(String::from_utf8_lossy(&buf).contains("08P01"));
}

#[test]
fn certificate_reload_swaps_the_certificate_and_keeps_it_on_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let first = Ca::new("first CA");
    let second = Ca::new("second CA");
    let first_file = first.write(dir.path(), "first.crt");
    let second_file = second.write(dir.path(), "second.crt");
    let files = first.server(dir.path(), "proxy");
    let proxy = tls_proxy(&files, false);
    let conninfo = |ca: &Path| {
        format!(
            "host=localhost port={} user=postgres dbname=test sslmode=verify-full sslrootcert={}",
            proxy.port(),
            ca.display()
        )
    };
    assert!(psql_conninfo(&conninfo(&first_file), "SELECT 1")
        .status
        .success());

    // A broken key file: the reload fails and the certificate in force stays.
    std::fs::write(&files.key, "not a key").unwrap();
    let e = proxy.handle.reload_tls().unwrap_err().to_string();
    assert!(e.contains("proxy.key"), "{e}");
    assert!(psql_conninfo(&conninfo(&first_file), "SELECT 1")
        .status
        .success());

    second.server(dir.path(), "proxy");
    assert!(proxy.handle.reload_tls().unwrap());
    let out = psql_conninfo(&conninfo(&second_file), "SELECT 1");
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(!psql_conninfo(&conninfo(&first_file), "SELECT 1")
        .status
        .success());
}

#[test]
fn encrypted_pipelined_workload_over_client_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("pgenvelope test CA");
    let ca_file = ca.write(dir.path(), "ca.crt");
    let files = ca.server(dir.path(), "proxy");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let v = rt.block_on(Vault::with(|o| {
        o.tls = Some(files.clone());
        o.require_client_tls = true;
    }));
    let t = v.table.clone();
    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        v.proxy
            .url("postgres", None, "test")
            .replace("127.0.0.1", "localhost"),
        ca_file.display()
    );
    let with_python = crate::support::require_tool(
        crate::support::ClientScript::PsycopgSmoke.available(),
        "psycopg",
    );
    if with_python {
        let out = Command::new(crate::support::binaries::python().unwrap())
            .arg(crate::support::binaries::client_script(
                "psycopg_encrypted.py",
            ))
            .env("DATABASE_URL", &url)
            .env("TABLE", &t)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.trim_end().ends_with("ok"),
            "{}",
            output_text(&out)
        );
    }
    let out = psql_conninfo(
        &url,
        &format!("INSERT INTO {t} (org_id, name, value) VALUES ('psql', 'p1', 'over tls')"),
    );
    assert!(out.status.success(), "{}", output_text(&out));
    let out = psql_conninfo(&url, &format!("SELECT value FROM {t} WHERE name = 'p1'"));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "over tls",
        "{}",
        output_text(&out)
    );
    rt.block_on(v.assert_encrypted_at_rest(&["over tls", "psycopg-secret"]));
}

fn upstream_proxy(cluster: &PrivateCluster, mode: SslMode, ca: Option<PathBuf>) -> TestProxy {
    let mut opts = ProxyOptions::to("localhost", cluster.port());
    opts.upstream_sslmode = mode;
    opts.upstream_ca = ca;
    TestProxy::with(opts)
}

const SSL_IN_USE: &str = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

#[test]
fn upstream_verify_full_and_verify_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("pgenvelope test CA");
    let ca_file = ca.write(dir.path(), "ca.crt");
    let cluster = tls_cluster(&ca);
    for mode in [SslMode::VerifyFull, SslMode::VerifyCa, SslMode::Require] {
        let proxy = upstream_proxy(&cluster, mode, Some(ca_file.clone()));
        let out = psql_conninfo(
            &format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=disable",
                proxy.port()
            ),
            SSL_IN_USE,
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "t",
            "{mode}: {}",
            output_text(&out)
        );
    }
}

#[test]
fn upstream_wrong_ca_or_no_tls_fails_with_08006() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("pgenvelope test CA");
    let other = Ca::new("some other CA");
    let other_file = other.write(dir.path(), "other.crt");
    let cluster = tls_cluster(&ca);
    let proxy = upstream_proxy(&cluster, SslMode::VerifyFull, Some(other_file));
    let out = psql_conninfo(
        &format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=disable",
            proxy.port()
        ),
        "SELECT 1",
    );
    assert!(!out.status.success(), "{}", output_text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("could not establish TLS"), "{err}");
    assert_eq!(proxy.handle.upstream_connect_errors(), 1);

    // A server without TLS: prefer falls back to plaintext, require fails.
    let plain = PrivateCluster::start(ClusterOptions::default()).unwrap();
    let prefer = upstream_proxy(&plain, SslMode::Prefer, None);
    let conninfo = |p: &TestProxy| {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=disable",
            p.port()
        )
    };
    let out = psql_conninfo(&conninfo(&prefer), SSL_IN_USE);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "f",
        "{}",
        output_text(&out)
    );
    let require = upstream_proxy(&plain, SslMode::Require, None);
    let out = psql_conninfo(&conninfo(&require), "SELECT 1");
    assert!(!out.status.success(), "{}", output_text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("could not establish TLS"),
        "{}",
        output_text(&out)
    );
}

#[test]
fn service_connections_use_the_upstream_sslmode() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("pgenvelope test CA");
    let ca_file = ca.write(dir.path(), "ca.crt");
    let cluster = tls_cluster(&ca);
    cluster
        .psql(
            "test",
            "CREATE TABLE secrets (id serial primary key, org_id text not null, value text)",
        )
        .unwrap();
    let mut opts = ProxyOptions::to("localhost", cluster.port());
    opts.rules = Some(
        "[[table]]\nname = \"public.secrets\"\ntenant_column = \"org_id\"\nencrypt = [\"value\"]\n"
            .to_owned(),
    );
    opts.upstream_sslmode = SslMode::VerifyFull;
    opts.upstream_ca = Some(ca_file);
    let proxy = TestProxy::with(opts);
    let conninfo = format!(
        "host=127.0.0.1 port={} user=postgres dbname=test sslmode=disable",
        proxy.port()
    );
    let out = psql_conninfo(
        &conninfo,
        "INSERT INTO secrets (org_id, value) VALUES ('acme', 'tls-secret')",
    );
    assert!(out.status.success(), "{}", output_text(&out));
    let out = psql_conninfo(&conninfo, "SELECT value FROM secrets");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "tls-secret",
        "{}",
        output_text(&out)
    );
    let stored = cluster.psql("test", "SELECT value FROM secrets").unwrap();
    assert!(stored.contains("enc:v1:"), "{stored}");
    let services = cluster
        .psql(
            "postgres",
            "SELECT string_agg(a.application_name || '=' || s.ssl, ',' ORDER BY a.application_name) \
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name LIKE 'pgenvelope%'",
        )
        .unwrap();
    assert!(services.contains("pgenvelope-keys=t"), "{services}");
    assert!(services.contains("pgenvelope-catalog=t"), "{services}");
    assert!(!services.contains("=f"), "{services}");
}

#[test]
fn upstream_verify_ca_ignores_the_host_name_and_verify_full_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("pgenvelope test CA");
    let ca_file = ca.write(dir.path(), "ca.crt");
    let cluster = tls_cluster_for(&ca, &["db.example.invalid"]);
    let conninfo = |p: &TestProxy| {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=disable",
            p.port()
        )
    };
    let verify_ca = upstream_proxy(&cluster, SslMode::VerifyCa, Some(ca_file.clone()));
    let out = psql_conninfo(&conninfo(&verify_ca), SSL_IN_USE);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "t",
        "{}",
        output_text(&out)
    );
    let verify_full = upstream_proxy(&cluster, SslMode::VerifyFull, Some(ca_file));
    let out = psql_conninfo(&conninfo(&verify_full), "SELECT 1");
    assert!(!out.status.success(), "{}", output_text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("could not establish TLS"),
        "{}",
        output_text(&out)
    );
}

/// The binary: certificate from PGENVELOPE_TLS_CERT/PGENVELOPE_TLS_KEY, reloaded on SIGHUP;
/// a broken key file keeps the certificate in force.
#[test]
fn binary_reloads_the_certificate_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("rules")).unwrap();
    let first = Ca::new("first CA");
    let second = Ca::new("second CA");
    let first_file = first.write(dir.path(), "first.crt");
    let second_file = second.write(dir.path(), "second.crt");
    let files = first.server(dir.path(), "proxy");
    let (pg_host, pg_port) = main_pg();
    let port = crate::support::free_port().unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = Kill(
        Command::new(env!("CARGO_BIN_EXE_pgenvelope"))
            .current_dir(dir.path())
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args([
                "--upstream",
                &format!("postgres://postgres@{pg_host}:{pg_port}/test"),
            ])
            .args(["--rules", "rules", "--log", "warn", "--require-client-tls"])
            .env("PGENVELOPE_TLS_CERT", &files.cert)
            .env("PGENVELOPE_TLS_KEY", &files.key)
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id().to_string();
    let works = |ca: &Path| {
        psql_conninfo(
            &format!(
                "host=localhost port={port} user=postgres dbname=test sslmode=verify-full sslrootcert={}",
                ca.display()
            ),
            "SELECT 1",
        )
        .status
        .success()
    };
    let until = |ca: &Path| {
        (0..100).any(|_| {
            if works(ca) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
            false
        })
    };
    let hup = || {
        assert!(Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success())
    };
    assert!(until(&first_file), "serves the first certificate");
    second.server(dir.path(), "proxy");
    hup();
    assert!(
        until(&second_file),
        "serves the second certificate after SIGHUP"
    );
    assert!(!works(&first_file));
    std::fs::write(&files.key, "broken").unwrap();
    hup();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(works(&second_file), "keeps the certificate in force");
}
