//! Injected faults: the upstream crashing (SIGKILL) mid-transaction and mid-COPY, an upstream
//! that accepts TCP but never answers, clients vanishing mid-statement, the proxy's service
//! connections killed, hostile bytes after TLS negotiation, and a panic inside one session.
//!
//! Each test that kills or stops PostgreSQL runs its own private cluster (stopped by PID on
//! drop, whatever happens). No test asserts on timings: deadlines only keep a broken build
//! from hanging.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::SinkExt;
use pgenvelope::config::SslMode;
use pgenvelope::fault::PANIC_QUERY;

use crate::support::cluster::{ClusterOptions, PrivateCluster};
use crate::support::harness::direct;
use crate::support::harness::{connect, unique, ProxyOptions, TestProxy};
use crate::support::raw::{error_field, RawConn};
use crate::support::site::{assert_only_ciphertext, rules_for, until, Site};
use crate::support::vault::Vault;

/// Generous upper bound for anything that must eventually happen.
const DEADLINE: Duration = Duration::from_secs(30);

fn sqlstate(e: &tokio_postgres::Error) -> Option<&str> {
    e.code().map(|c| c.code())
}

/// A raw StartupMessage for `user=postgres database=test`.
fn startup_packet() -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0postgres\0database\0test\0\0");
    let mut p = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    p.extend_from_slice(&body);
    p
}

/// Send a StartupMessage and read until the proxy closes: the first message must be a FATAL
/// ErrorResponse; returns its SQLSTATE.
fn startup_error(proxy: &TestProxy) -> String {
    let mut s = TcpStream::connect(proxy.addr()).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(&startup_packet()).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .expect("the proxy answers and closes in time");
    assert_eq!(buf.first(), Some(&b'E'), "{buf:?}");
    assert_eq!(error_field(&buf[5..], b'S').as_deref(), Some("FATAL"));
    error_field(&buf[5..], b'C').unwrap_or_default()
}

async fn wait_sessions_gone(proxy: &TestProxy) {
    let h = proxy.handle.clone();
    until("every proxy session torn down", async || {
        h.active_connections() == 0 && h.registered_sessions() == 0
    })
    .await;
}

async fn backend_gone(admin: &tokio_postgres::Client, pid: i32) -> bool {
    let n: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
            &[&pid],
        )
        .await
        .unwrap()
        .get(0);
    n == 0
}

async fn backend_active(admin: &tokio_postgres::Client, pid: i32) -> bool {
    let n: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND state = 'active'",
            &[&pid],
        )
        .await
        .unwrap()
        .get(0);
    n == 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_killed_mid_transaction_and_mid_copy() {
    // Commits must survive a crash of the server process for this test.
    let opts = ClusterOptions::default().setting("synchronous_commit", "on");
    let mut site = Site::start(1, opts, |_| {});
    let t = site.tables[0].clone();
    let c1 = site.client().await;
    let insert = format!("INSERT INTO {t} (org_id, name, value) VALUES ($1, $2, $3)");
    let mut committed = Vec::new();
    for i in 0..5 {
        let v = format!("committed-{i}");
        c1.execute(&insert, &[&"acme", &"c", &v]).await.unwrap();
        committed.push(v);
    }
    // An open transaction with encrypted writes, and a COPY half-way through.
    c1.batch_execute("BEGIN").await.unwrap();
    for i in 0..3 {
        c1.execute(&insert, &[&"acme", &"tx", &format!("in-flight-{i}")])
            .await
            .unwrap();
    }
    let c2 = site.client().await;
    let sink = c2
        .copy_in(&format!("COPY {t} (org_id, name, value) FROM STDIN"))
        .await
        .unwrap();
    let mut sink = Box::pin(sink);
    for i in 0..50 {
        sink.send(Bytes::from(format!("acme\tcopy\tcopy-secret-{i}\n")))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    site.cluster.kill9_all().unwrap();

    let commit = tokio::time::timeout(DEADLINE, c1.batch_execute("COMMIT"))
        .await
        .expect("COMMIT answered or failed in time");
    assert!(commit.is_err(), "COMMIT cannot succeed on a dead server");
    let finish = tokio::time::timeout(DEADLINE, sink.as_mut().finish())
        .await
        .expect("COPY ended in time");
    assert!(finish.is_err(), "COPY cannot succeed on a dead server");
    // The proxy lets go of both sessions and stays up.
    wait_sessions_gone(&site.proxy).await;
    let down = tokio::time::timeout(
        DEADLINE,
        connect(&site.proxy.pg_config("postgres", None, "test")),
    )
    .await
    .expect("refused in time");
    let Err(down) = down else {
        panic!("no session while PostgreSQL is down");
    };
    assert_eq!(sqlstate(&down), Some("08006"), "{down}");

    site.cluster.start_again().unwrap();
    let c3 = site.client().await;
    let got: Vec<String> = c3
        .query(&format!("SELECT value FROM {t} ORDER BY id"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // Committed rows survive the crash; the open transaction and the COPY left nothing.
    assert_eq!(got, committed);
    // A new organisation needs the key store again: its connection died with the server.
    c3.execute(&insert, &[&"globex", &"after", &"after-restart"])
        .await
        .unwrap();
    let v: String = c3
        .query_one(
            &format!("SELECT value FROM {t} WHERE org_id = 'globex'"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "after-restart");
    let n = assert_only_ciphertext(&site.direct().await, &t).await;
    assert_eq!(n, committed.len() + 1);
}

/// Accepts TCP connections and never says a word, like an overloaded or wedged server.
struct SilentServer {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SilentServer {
    fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => held.push(s),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        SilentServer {
            port,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for SilentServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_upstream_gets_08006_after_the_connect_timeout() {
    let silent = SilentServer::start();
    // Without TLS the proxy waits for the answer to the StartupMessage; with `prefer` for the
    // answer to its SSLRequest: both are bounded by the connect timeout.
    for mode in [SslMode::Disable, SslMode::Prefer] {
        let mut o = ProxyOptions::to("127.0.0.1", silent.port);
        o.connect_timeout = Duration::from_millis(500);
        o.upstream_sslmode = mode;
        let proxy = TestProxy::with(o);
        let code = tokio::task::block_in_place(|| startup_error(&proxy));
        assert_eq!(code, "08006", "{mode:?}");
        assert_eq!(proxy.handle.upstream_connect_errors(), 1, "{mode:?}");
        wait_sessions_gone(&proxy).await;
    }
}

/// Sends SIGCONT to a stopped postmaster when dropped, so a failing test leaves no stopped
/// server behind.
struct Stopped<'a>(&'a PrivateCluster);

impl<'a> Stopped<'a> {
    fn stop(cluster: &'a PrivateCluster) -> Self {
        cluster.signal_postmaster("STOP");
        Stopped(cluster)
    }
}

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        self.0.signal_postmaster("CONT");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_postmaster_gets_08006_then_recovers() {
    let cluster = PrivateCluster::start(ClusterOptions::default()).unwrap();
    let mut o = ProxyOptions::to("127.0.0.1", cluster.port());
    o.connect_timeout = Duration::from_millis(500);
    let proxy = TestProxy::with(o);
    let cfg = proxy.pg_config("postgres", None, "test");
    let existing = connect(&cfg).await.unwrap();
    {
        let _stopped = Stopped::stop(&cluster);
        // The kernel still completes the TCP handshake; nobody answers the SSLRequest.
        let err = tokio::time::timeout(DEADLINE, connect(&cfg))
            .await
            .expect("bounded by the connect timeout");
        let Err(err) = err else {
            panic!("no session from a stopped server");
        };
        assert_eq!(sqlstate(&err), Some("08006"), "{err}");
        // Sessions that already have a backend do not need the postmaster.
        existing.simple_query("SELECT 1").await.unwrap();
    }
    let fresh = connect(&cfg).await.expect("served again once resumed");
    fresh.simple_query("SELECT 1").await.unwrap();
    assert!(proxy.handle.upstream_connect_errors() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_vanishing_mid_statement_ends_its_backend() {
    let vault = Vault::new().await;
    let plain = TestProxy::start();
    let admin = direct().await;
    for proxy in [&plain, &vault.proxy] {
        // Mid-query: the backend is busy in pg_sleep and would not notice the closed socket
        // until it next writes; the proxy cancels the statement.
        let (mut conn, _) = RawConn::connect(
            proxy.port(),
            &[("user", b"postgres"), ("database", b"test")],
        )
        .unwrap();
        let pid = conn.pid;
        conn.send(b'Q', b"SELECT pg_sleep(300)\0").unwrap();
        until("statement running", async || {
            backend_active(&admin, pid).await
        })
        .await;
        drop(conn);
        until("backend of the vanished client gone", async || {
            backend_gone(&admin, pid).await
        })
        .await;

        // Mid-COPY FROM into a protected table.
        let (mut conn, _) = RawConn::connect(
            proxy.port(),
            &[("user", b"postgres"), ("database", b"test")],
        )
        .unwrap();
        let pid = conn.pid;
        let copy = format!("COPY {} (org_id, name, value) FROM STDIN\0", vault.table);
        conn.send(b'Q', copy.as_bytes()).unwrap();
        let (tag, _) = conn.read_msg().unwrap();
        assert_eq!(tag, b'G', "CopyInResponse");
        conn.send(b'd', b"acme\tn\thalf-written\n").unwrap();
        conn.send(b'd', b"acme\tn\thalf-").unwrap();
        drop(conn);
        until("backend of the vanished COPY gone", async || {
            backend_gone(&admin, pid).await
        })
        .await;
        wait_sessions_gone(proxy).await;
    }
    assert!(
        vault.stored().await.is_empty(),
        "an aborted COPY wrote rows"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_connections_killed_are_reestablished() {
    let site = Site::start(2, ClusterOptions::default(), |_| {});
    let (t1, t2) = (site.tables[0].clone(), site.tables[1].clone());
    let client = site.client().await;
    let insert = |t: &str| format!("INSERT INTO {t} (org_id, name, value) VALUES ($1, $2, $3)");
    client
        .execute(&insert(&t1), &[&"acme", &"a", &"before"])
        .await
        .unwrap();
    let read: String = client
        .query_one(&format!("SELECT value FROM {t1}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(read, "before");
    let engine = site.proxy.engine.clone().unwrap();
    until("key listener up", async || {
        engine.key_listener_ready() == Some(true)
    })
    .await;

    let admin = site.direct().await;
    let service = "application_name IN ('pgenvelope-keys', 'pgenvelope-catalog') \
                   OR application_name LIKE 'pgenvelope-listen%'";
    let names: Vec<String> = admin
        .query(
            &format!("SELECT application_name FROM pg_stat_activity WHERE {service} ORDER BY 1"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(names.len(), 3, "key store, catalog and listener: {names:?}");
    let killed: i64 = admin
        .query_one(
            &format!(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE {service}"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 3);
    let killed_at = Instant::now();
    until("service backends gone", async || {
        let n: i64 = admin
            .query_one(
                &format!(
                    "SELECT count(*) FROM pg_stat_activity WHERE ({service}) \
                     AND backend_start < now() - $1::float8 * interval '1 second'"
                ),
                &[&killed_at.elapsed().as_secs_f64()],
            )
            .await
            .unwrap()
            .get(0);
        n == 0
    })
    .await;

    // A new organisation needs the key store; a table not seen before needs the catalog.
    // Neither statement may fail because a service connection died in between.
    client
        .execute(&insert(&t1), &[&"globex", &"g", &"new-org"])
        .await
        .expect("key store reconnects");
    client
        .execute(&insert(&t2), &[&"acme", &"b", &"new-table"])
        .await
        .expect("catalog reconnects");
    let mut read: Vec<String> = Vec::new();
    for t in [&t1, &t2] {
        for r in client
            .query(&format!("SELECT value FROM {t}"), &[])
            .await
            .unwrap()
        {
            read.push(r.get(0));
        }
    }
    read.sort();
    assert_eq!(read, ["before", "new-org", "new-table"]);
    // The listener is back (its reconnect flushed the key cache).
    until("key listener back", async || {
        engine.key_listener_ready() == Some(true)
    })
    .await;
    for t in [&t1, &t2] {
        assert_only_ciphertext(&admin, t).await;
    }
}

/// A TLS client that trusts `ca_file`, over a plain TcpStream already past the `S` answer.
fn tls_client(
    ca_file: &std::path::Path,
    stream: TcpStream,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca_file).unwrap();
    for cert in rustls_pemfile_certs(&pem) {
        roots.add(cert).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    rustls::StreamOwned::new(conn, stream)
}

fn rustls_pemfile_certs(pem: &[u8]) -> Vec<rustls_pki_types::CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem)
        .map(|c| c.unwrap())
        .collect()
}

/// Open a connection, send an SSLRequest and expect `S`.
fn after_ssl_request(proxy: &TestProxy) -> TcpStream {
    let mut s = TcpStream::connect(proxy.addr()).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut p = 8u32.to_be_bytes().to_vec();
    p.extend_from_slice(&80_877_103u32.to_be_bytes());
    s.write_all(&p).unwrap();
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"S");
    s
}

#[test]
fn garbage_after_tls_negotiation_is_refused_and_the_proxy_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let ca = crate::support::ca::Ca::new("pgenvelope fault CA");
    let ca_file = ca.write(dir.path(), "ca.crt");
    let files = ca.server(dir.path(), "proxy");
    let mut o = ProxyOptions::encrypting(&rules_for(&[unique("tlsfault")]));
    o.tls = Some(files);
    o.max_message_size = 64 * 1024;
    let proxy = TestProxy::with(o);

    // Not a TLS ClientHello at all, after the `S`: the handshake fails and the socket closes.
    for garbage in [
        &b"\x00\x00\x00\x08\x04\xd2\x16\x2f"[..],
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0xff, 0xff, 0x01][..],
        &[0u8; 4096][..],
    ] {
        let mut s = after_ssl_request(&proxy);
        let _ = s.write_all(garbage);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        assert!(
            buf.is_empty() || buf[0] == 0x15,
            "only a TLS alert or nothing, never a protocol message: {buf:?}"
        );
    }

    // A completed handshake, then garbage inside TLS: malformed startup packets, a second
    // SSLRequest, an oversize message after a valid startup.
    let inside: Vec<Vec<u8>> = vec![
        b"\x00\x00\x00\x02".to_vec(),
        b"\x7f\xff\xff\xff".to_vec(),
        b"\x00\x00\x00\x08\x00\x09\x00\x00".to_vec(),
        [8u32.to_be_bytes(), 80_877_103u32.to_be_bytes()].concat(),
        b"\x00\x00\x00\x0c\x00\x03\x00\x00user".to_vec(),
    ];
    for bytes in inside {
        let mut tls = tls_client(&ca_file, after_ssl_request(&proxy));
        let _ = tls.write_all(&bytes);
        let _ = tls.flush();
        tls.conn.send_close_notify();
        let _ = tls.flush();
        let mut buf = Vec::new();
        let _ = tls.read_to_end(&mut buf);
        // An ErrorResponse, or `N` to a repeated SSLRequest (no second negotiation).
        if !buf.is_empty() {
            assert!(buf[0] == b'E' || buf == b"N", "{buf:?}");
        }
    }
    let mut tls = tls_client(&ca_file, after_ssl_request(&proxy));
    tls.write_all(&startup_packet()).unwrap();
    let mut head = [0u8; 5];
    loop {
        tls.read_exact(&mut head).unwrap();
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        tls.read_exact(&mut body).unwrap();
        if head[0] == b'Z' {
            break;
        }
    }
    // Only the header of a 1 GiB message: refused before its body is read or buffered.
    tls.write_all(&[b'Q', 0x40, 0, 0, 4]).unwrap();
    tls.flush().unwrap();
    let mut buf = Vec::new();
    let _ = tls.read_to_end(&mut buf);
    assert_eq!(buf.first(), Some(&b'E'));
    assert_eq!(error_field(&buf[5..], b'C').as_deref(), Some("54000"));

    // Still serving, over TLS and in plaintext.
    let mut tls = tls_client(&ca_file, after_ssl_request(&proxy));
    tls.write_all(&startup_packet()).unwrap();
    tls.read_exact(&mut head).unwrap();
    assert_eq!(head[0], b'R', "authentication request");
    let (mut conn, _) = RawConn::connect(
        proxy.port(),
        &[("user", b"postgres"), ("database", b"test")],
    )
    .unwrap();
    conn.query(b"SELECT 1").unwrap();
}

/// Runs the panic trigger on one session and checks that only that session ends, with XX000.
async fn one_panicking_session(cfg: &str, port: u16) {
    let bystander = connect(cfg).await.unwrap();
    let in_tx = connect(cfg).await.unwrap();
    in_tx
        .batch_execute("BEGIN; SELECT pg_backend_pid()")
        .await
        .unwrap();

    let port_copy = port;
    let victim = tokio::task::spawn_blocking(move || {
        let (mut conn, _) =
            RawConn::connect(port_copy, &[("user", b"postgres"), ("database", b"test")]).unwrap();
        let mut q = PANIC_QUERY.as_bytes().to_vec();
        q.push(0);
        conn.send(b'Q', &q).unwrap();
        let mut rest = Vec::new();
        let _ = conn.raw_stream().read_to_end(&mut rest);
        rest
    })
    .await
    .unwrap();
    assert_eq!(
        victim.first(),
        Some(&b'E'),
        "an ErrorResponse first: {victim:?}"
    );
    assert_eq!(error_field(&victim[5..], b'C').as_deref(), Some("XX000"));
    assert_eq!(
        error_field(&victim[5..], b'M').as_deref(),
        Some("pgenvelope: internal error")
    );
    // The others, one idle and one inside a transaction, go on; so do new sessions.
    bystander.simple_query("SELECT 1").await.unwrap();
    in_tx.batch_execute("COMMIT").await.unwrap();
    let fresh = connect(cfg).await.unwrap();
    fresh.simple_query("SELECT 2").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_session_ends_alone_with_xx000() {
    let plain = TestProxy::start();
    let vault = Vault::new().await;
    for proxy in [&plain, &vault.proxy] {
        let cfg = proxy.pg_config("postgres", None, "test");
        one_panicking_session(&cfg, proxy.port()).await;
        // Nothing leaks from the panicked session: its slot and cancel key are released.
        let h = proxy.handle.clone();
        until("only the live sessions remain", async || {
            h.active_connections() <= 3
        })
        .await;
    }
    drop(plain);
}

#[test]
fn a_panicking_session_does_not_take_down_its_worker_thread() {
    // The real binary with one worker thread: every session shares the thread that panics.
    let (host, port) = crate::support::harness::main_pg();
    let mut serve = crate::soak::Serve::start(
        &format!("postgres://postgres@{host}:{port}/test"),
        None,
        &["--workers", "1"],
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cfg = format!(
        "host=127.0.0.1 port={} user=postgres dbname=test",
        serve.port
    );
    rt.block_on(async {
        for _ in 0..3 {
            one_panicking_session(&cfg, serve.port).await;
        }
    });
    assert!(serve.running(), "the process survived its sessions' panics");
}
