//! The proxy is invisible to tokio-postgres and to a raw protocol client: every feature below
//! is exercised through the proxy against the real PostgreSQL.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt, TryStreamExt};
use tokio_postgres::binary_copy::{BinaryCopyInWriter, BinaryCopyOutStream};
use tokio_postgres::types::Type;
use tokio_postgres::AsyncMessage;

use crate::support::harness::{connect, main_pg, unique, ProxyOptions, TestProxy};
use crate::support::raw::{data_row, error_field, RawConn};

fn cfg(proxy: &TestProxy) -> String {
    proxy.pg_config("postgres", None, "test")
}

#[tokio::test]
async fn ddl_dml_and_transactions() {
    let proxy = TestProxy::start();
    let mut client = connect(&cfg(&proxy)).await.unwrap();
    let t = unique("pt_basic");
    client
        .batch_execute(&format!(
            "CREATE TABLE {t} (id int primary key, name text, amount numeric, at timestamptz default now())"
        ))
        .await
        .unwrap();
    client
        .execute(
            &format!("INSERT INTO {t} (id, name) VALUES ($1, $2)"),
            &[&1i32, &"ann"],
        )
        .await
        .unwrap();
    {
        let tx = client.transaction().await.unwrap();
        tx.execute(
            &format!("INSERT INTO {t} (id, name) VALUES (2, 'rolled back')"),
            &[],
        )
        .await
        .unwrap();
        tx.rollback().await.unwrap();
    }
    {
        let tx = client.transaction().await.unwrap();
        tx.execute(
            &format!("INSERT INTO {t} (id, name) VALUES (3, 'kept')"),
            &[],
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
    }
    let rows = client
        .query(&format!("SELECT id, name FROM {t} ORDER BY id"), &[])
        .await
        .unwrap();
    let got: Vec<(i32, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(got, vec![(1, "ann".into()), (3, "kept".into())]);
    client
        .batch_execute(&format!("DROP TABLE {t}"))
        .await
        .unwrap();
}

#[tokio::test]
async fn prepared_statements_and_binary_results() {
    let proxy = TestProxy::start();
    let client = connect(&cfg(&proxy)).await.unwrap();
    let stmt = client
        .prepare("SELECT $1::int8 + 1, $2::text || '!', $3::bytea, $4::float8 * 2, $5::bool")
        .await
        .unwrap();
    for i in 0..50i64 {
        let bytes: Vec<u8> = (0..=255u8).collect();
        let row = client
            .query_one(
                &stmt,
                &[&i, &format!("v{i}"), &bytes, &1.5f64, &(i % 2 == 0)],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, i64>(0), i + 1);
        assert_eq!(row.get::<_, String>(1), format!("v{i}!"));
        assert_eq!(row.get::<_, Vec<u8>>(2), bytes);
        assert_eq!(row.get::<_, f64>(3), 3.0);
        assert_eq!(row.get::<_, bool>(4), i % 2 == 0);
    }
}

#[tokio::test]
async fn pipelined_batch_with_error_in_the_middle_stays_in_sync() {
    let proxy = TestProxy::start();
    let client = connect(&cfg(&proxy)).await.unwrap();
    let a = client.query_one("SELECT 1::int4", &[]);
    let b = client.query_one("SELECT 1/0", &[]);
    let c = client.query_one("SELECT 3::int4", &[]);
    let (a, b, c) = tokio::join!(a, b, c);
    assert_eq!(a.unwrap().get::<_, i32>(0), 1);
    let err = b.unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::DIVISION_BY_ZERO)
    );
    assert_eq!(c.unwrap().get::<_, i32>(0), 3);
    let row = client.query_one("SELECT 'after'", &[]).await.unwrap();
    assert_eq!(row.get::<_, &str>(0), "after");
}

#[tokio::test]
async fn copy_in_and_out_text_binary_and_fail() {
    let proxy = TestProxy::start();
    let client = connect(&cfg(&proxy)).await.unwrap();
    let t = unique("pt_copy");
    client
        .batch_execute(&format!("CREATE TABLE {t} (id int, name text)"))
        .await
        .unwrap();

    let sink = client
        .copy_in(&format!("COPY {t} (id, name) FROM STDIN"))
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    let mut data = String::new();
    for i in 0..5000 {
        data.push_str(&format!("{i}\tname {i} ü\n"));
    }
    sink.send(bytes::Bytes::from(data.clone())).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 5000);

    let out: Vec<bytes::Bytes> = client
        .copy_out(&format!(
            "COPY (SELECT id, name FROM {t} ORDER BY id) TO STDOUT"
        ))
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(out.concat(), data.as_bytes());

    let sink = client
        .copy_in(&format!("COPY {t} (id, name) FROM STDIN BINARY"))
        .await
        .unwrap();
    let writer = BinaryCopyInWriter::new(sink, &[Type::INT4, Type::TEXT]);
    futures_util::pin_mut!(writer);
    for i in 0..100i32 {
        writer
            .as_mut()
            .write(&[&(10_000 + i), &"bin"])
            .await
            .unwrap();
    }
    assert_eq!(writer.finish().await.unwrap(), 100);
    let stream = client
        .copy_out(&format!(
            "COPY (SELECT id, name FROM {t} WHERE id >= 10000 ORDER BY id) TO STDOUT BINARY"
        ))
        .await
        .unwrap();
    let rows: Vec<_> = BinaryCopyOutStream::new(stream, &[Type::INT4, Type::TEXT])
        .try_collect()
        .await
        .unwrap();
    assert_eq!(rows.len(), 100);
    assert_eq!(rows[5].get::<i32>(0), 10_005);
    assert_eq!(rows[5].get::<&str>(1), "bin");

    // Abandoning a COPY sends CopyFail; the server rolls it back and the session goes on.
    {
        let sink = client
            .copy_in::<_, bytes::Bytes>(&format!("COPY {t} (id, name) FROM STDIN"))
            .await
            .unwrap();
        futures_util::pin_mut!(sink);
        sink.send(bytes::Bytes::from_static(b"99999\tnever\n"))
            .await
            .unwrap();
    }
    // A COPY with a bad row fails mid-copy with the server's error.
    let sink = client
        .copy_in(&format!("COPY {t} (id, name) FROM STDIN"))
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"notanumber\tx\n"))
        .await
        .unwrap();
    let err = sink.finish().await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_TEXT_REPRESENTATION)
    );

    let n: i64 = client
        .query_one(&format!("SELECT count(*) FROM {t}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 5100);
    client
        .batch_execute(&format!("DROP TABLE {t}"))
        .await
        .unwrap();
}

#[tokio::test]
async fn listen_notify_with_sender_pid() {
    let proxy = TestProxy::start();
    let (listener, mut conn) = tokio_postgres::connect(&cfg(&proxy), tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
    tokio::spawn(async move {
        while let Some(Ok(m)) = messages.next().await {
            if let AsyncMessage::Notification(n) = m {
                let _ = tx.send((
                    n.process_id(),
                    n.channel().to_owned(),
                    n.payload().to_owned(),
                ));
            }
        }
    });
    let channel = unique("chan");
    listener
        .batch_execute(&format!("LISTEN {channel}"))
        .await
        .unwrap();

    let sender = connect(&cfg(&proxy)).await.unwrap();
    let pid: i32 = sender
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    sender
        .execute("SELECT pg_notify($1, $2)", &[&channel, &"héllo"])
        .await
        .unwrap();
    let (from, chan, payload) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("notification arrives")
        .unwrap();
    assert_eq!((from, chan, payload), (pid, channel, "héllo".to_owned()));
}

#[tokio::test]
async fn cancel_request_reaches_the_right_backend() {
    let proxy = TestProxy::start();
    let client = connect(&cfg(&proxy)).await.unwrap();
    let bystander = connect(&cfg(&proxy)).await.unwrap();
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move { client.batch_execute("SELECT pg_sleep(60)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let result = tokio::time::timeout(Duration::from_secs(20), sleeper)
        .await
        .expect("query was cancelled")
        .unwrap();
    let err = result.unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED)
    );
    // Another session on the same proxy is untouched.
    let one: i32 = bystander.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[tokio::test]
async fn portals_with_max_rows_suspend_and_resume() {
    let proxy = TestProxy::start();
    let mut client = connect(&cfg(&proxy)).await.unwrap();
    let tx = client.transaction().await.unwrap();
    let stmt = tx
        .prepare("SELECT g FROM generate_series(1, 10) g")
        .await
        .unwrap();
    let portal = tx.bind(&stmt, &[]).await.unwrap();
    let mut all = Vec::new();
    loop {
        let rows = tx.query_portal(&portal, 3).await.unwrap();
        if rows.is_empty() {
            break;
        }
        assert!(rows.len() <= 3);
        all.extend(rows.iter().map(|r| r.get::<_, i32>(0)));
    }
    assert_eq!(all, (1..=10).collect::<Vec<_>>());
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn very_large_values_both_ways() {
    let proxy = TestProxy::start();
    let client = connect(&cfg(&proxy)).await.unwrap();
    // 48 MiB text: streamed through the proxy in both directions.
    let big: String = "0123456789abcdef".repeat(3 << 20);
    let row = client
        .query_one("SELECT md5($1::text), $1::text", &[&big])
        .await
        .unwrap();
    let back: &str = row.get(1);
    assert_eq!(back.len(), big.len());
    assert!(back == big);
    let direct = {
        let (host, port) = main_pg();
        connect(&format!(
            "host={host} port={port} user=postgres dbname=test"
        ))
        .await
        .unwrap()
    };
    let md5_direct: String = direct
        .query_one("SELECT md5(repeat('0123456789abcdef', 3145728))", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(row.get::<_, &str>(0), md5_direct);
}

#[tokio::test]
async fn terminated_backend_reports_fatal_and_closes() {
    let proxy = TestProxy::start();
    let victim = connect(&cfg(&proxy)).await.unwrap();
    let pid: i32 = victim
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let admin = connect(&cfg(&proxy)).await.unwrap();
    let done: bool = admin
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap()
        .get(0);
    assert!(done);
    let err = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match victim.simple_query("SELECT 1").await {
                Err(e) => return e,
                Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
    .expect("the terminated session fails");
    // The error is the close, and the client's connection really is gone.
    let _ = err;
    tokio::time::timeout(Duration::from_secs(10), async {
        while !victim.is_closed() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("connection closed");
}

#[test]
fn backend_key_data_and_parameter_status_reach_the_client_unchanged() {
    let proxy = TestProxy::start();
    let (mut conn, startup) = RawConn::connect(
        proxy.port(),
        &[
            ("user", b"postgres"),
            ("database", b"test"),
            ("application_name", b"raw-e2e"),
        ],
    )
    .unwrap();
    assert!(startup.iter().any(|(t, _)| *t == b'K'));
    let reply = conn
        .query(b"SELECT pg_backend_pid(), current_setting('application_name')")
        .unwrap();
    let row = reply.iter().find(|(t, _)| *t == b'D').unwrap();
    let cols = data_row(&row.1);
    assert_eq!(cols[0].as_deref(), Some(conn.pid.to_string().as_bytes()));
    assert_eq!(cols[1].as_deref(), Some(&b"raw-e2e"[..]));

    // A SET that changes a reported parameter produces a ParameterStatus before completion.
    let reply = conn.query(b"SET TimeZone = 'Asia/Tokyo'").unwrap();
    let tags: Vec<u8> = reply.iter().map(|(t, _)| *t).collect();
    assert_eq!(
        tags,
        b"CSZ".to_vec(),
        "CommandComplete, ParameterStatus, ReadyForQuery"
    );
    assert_eq!(
        crate::support::raw::split_status(&reply[1].1),
        (b"TimeZone".to_vec(), b"Asia/Tokyo".to_vec())
    );

    // A notice raised in the middle of a statement arrives in order.
    let reply = conn
        .query(b"DO $$ BEGIN RAISE NOTICE 'halfway'; END $$; SELECT 1")
        .unwrap();
    let tags: Vec<u8> = reply.iter().map(|(t, _)| *t).collect();
    assert_eq!(tags, b"NCTDCZ".to_vec());
    assert_eq!(error_field(&reply[0].1, b'M').as_deref(), Some("halfway"));
}

#[test]
fn non_utf8_text_passes_byte_exact() {
    let proxy = TestProxy::start();
    let (mut conn, _) = RawConn::connect(
        proxy.port(),
        &[
            ("user", b"postgres"),
            ("database", b"test"),
            ("client_encoding", b"LATIN1"),
        ],
    )
    .unwrap();
    assert!(conn
        .params
        .contains(&(b"client_encoding".to_vec(), b"LATIN1".to_vec())));
    let reply = conn
        .query(b"SELECT 'caf\xe9 \xfc\xdf', length('caf\xe9')")
        .unwrap();
    let row = reply.iter().find(|(t, _)| *t == b'D').unwrap();
    let cols = data_row(&row.1);
    assert_eq!(cols[0].as_deref(), Some(&b"caf\xe9 \xfc\xdf"[..]));
    assert_eq!(cols[1].as_deref(), Some(&b"4"[..]));
}

#[test]
fn function_call_messages_are_relayed() {
    let proxy = TestProxy::start();
    let (mut conn, _) = RawConn::connect(
        proxy.port(),
        &[("user", b"postgres"), ("database", b"test")],
    )
    .unwrap();
    conn.query(b"BEGIN").unwrap();
    // FunctionCall: lo_creat(-1) by OID 957 with one int4 argument in binary.
    let mut body = Vec::new();
    body.extend_from_slice(&957u32.to_be_bytes());
    body.extend_from_slice(&1i16.to_be_bytes());
    body.extend_from_slice(&1i16.to_be_bytes());
    body.extend_from_slice(&1i16.to_be_bytes());
    body.extend_from_slice(&4i32.to_be_bytes());
    body.extend_from_slice(&(-1i32).to_be_bytes());
    body.extend_from_slice(&1i16.to_be_bytes());
    conn.send(b'F', &body).unwrap();
    let reply = conn.read_until_ready().unwrap();
    let v = reply
        .iter()
        .find(|(t, _)| *t == b'V')
        .expect("FunctionCallResponse");
    assert_eq!(i32::from_be_bytes([v.1[0], v.1[1], v.1[2], v.1[3]]), 4);
    conn.query(b"ROLLBACK").unwrap();
}

#[test]
fn too_many_connections_gets_53300() {
    let (host, port) = main_pg();
    let mut opts = ProxyOptions::to(&host, port);
    opts.max_connections = 1;
    let proxy = TestProxy::with(opts);
    let (_first, _) = RawConn::connect(
        proxy.port(),
        &[("user", b"postgres"), ("database", b"test")],
    )
    .unwrap();
    // The second session is refused with a single FATAL ErrorResponse, then EOF.
    let mut s = std::net::TcpStream::connect(proxy.addr()).unwrap();
    let mut startup = 196_608u32.to_be_bytes().to_vec();
    startup.extend_from_slice(b"user\0postgres\0\0");
    let mut p = ((startup.len() + 4) as u32).to_be_bytes().to_vec();
    p.extend_from_slice(&startup);
    std::io::Write::write_all(&mut s, &p).unwrap();
    let mut buf = Vec::new();
    std::io::Read::read_to_end(&mut s, &mut buf).unwrap();
    assert_eq!(buf[0], b'E');
    assert_eq!(error_field(&buf[5..], b'C').as_deref(), Some("53300"));
}

#[test]
fn unreachable_upstream_gets_08006() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let proxy = TestProxy::with(ProxyOptions::to("127.0.0.1", port));
    let mut s = std::net::TcpStream::connect(proxy.addr()).unwrap();
    let mut startup = 196_608u32.to_be_bytes().to_vec();
    startup.extend_from_slice(b"user\0postgres\0\0");
    let mut p = ((startup.len() + 4) as u32).to_be_bytes().to_vec();
    p.extend_from_slice(&startup);
    std::io::Write::write_all(&mut s, &p).unwrap();
    let mut buf = Vec::new();
    std::io::Read::read_to_end(&mut s, &mut buf).unwrap();
    assert_eq!(buf[0], b'E');
    assert_eq!(error_field(&buf[5..], b'C').as_deref(), Some("08006"));
    assert_eq!(error_field(&buf[5..], b'S').as_deref(), Some("FATAL"));
}

#[test]
fn oversize_message_is_refused_with_54000() {
    let (host, port) = main_pg();
    let mut opts = ProxyOptions::to(&host, port);
    opts.max_message_size = 64 * 1024;
    let proxy = TestProxy::with(opts);
    let (mut conn, _) = RawConn::connect(
        proxy.port(),
        &[("user", b"postgres"), ("database", b"test")],
    )
    .unwrap();
    // Only the header of a 100 MB message: refused before the body is read or buffered.
    let s = conn.raw_stream();
    std::io::Write::write_all(s, &[b'Q', 0x06, 0, 0, 0]).unwrap();
    let (tag, body) = conn.read_msg().unwrap();
    assert_eq!(tag, b'E');
    assert_eq!(error_field(&body, b'C').as_deref(), Some("54000"));
}

#[test]
fn garbage_startup_packets_are_refused_cleanly() {
    let proxy = TestProxy::start();
    for garbage in [
        &b"\x00\x00\x00\x02"[..],
        &b"\x7f\xff\xff\xff"[..],
        &b"\x00\x00\x00\x08\x00\x09\x00\x00"[..],
        &b"GET / HTTP/1.1\r\n\r\n"[..],
    ] {
        let mut s = std::net::TcpStream::connect(proxy.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        std::io::Write::write_all(&mut s, garbage).unwrap();
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut buf);
        if !buf.is_empty() {
            assert_eq!(buf[0], b'E', "only an ErrorResponse, never anything else");
        }
    }
    // Still serving.
    let (mut conn, _) = RawConn::connect(
        proxy.port(),
        &[("user", b"postgres"), ("database", b"test")],
    )
    .unwrap();
    conn.query(b"SELECT 1").unwrap();
}

#[test]
fn ssl_and_gss_requests_are_answered_n() {
    let proxy = TestProxy::start();
    for code in [80_877_103u32, 80_877_104] {
        let mut s = std::net::TcpStream::connect(proxy.addr()).unwrap();
        let mut p = 8u32.to_be_bytes().to_vec();
        p.extend_from_slice(&code.to_be_bytes());
        std::io::Write::write_all(&mut s, &p).unwrap();
        let mut answer = [0u8; 1];
        std::io::Read::read_exact(&mut s, &mut answer).unwrap();
        assert_eq!(&answer, b"N");
        // The same request again: refused (08P01) rather than answered forever.
        std::io::Write::write_all(&mut s, &p).unwrap();
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut buf);
        assert_eq!(buf.first(), Some(&b'E'));
        assert_eq!(error_field(&buf[5..], b'C').as_deref(), Some("08P01"));
    }
    // Bytes pipelined behind an SSLRequest, before its answer, are refused.
    let mut s = std::net::TcpStream::connect(proxy.addr()).unwrap();
    let mut p = 8u32.to_be_bytes().to_vec();
    p.extend_from_slice(&80_877_103u32.to_be_bytes());
    p.extend_from_slice(b"\x00\x00\x00\x08\x00\x03\x00\x00");
    std::io::Write::write_all(&mut s, &p).unwrap();
    let mut buf = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut buf);
    assert_eq!(buf.first(), Some(&b'E'));
    assert_eq!(error_field(&buf[5..], b'C').as_deref(), Some("08P01"));
}

#[tokio::test]
async fn clients_vanishing_at_any_point_leave_nothing_behind() {
    let proxy = TestProxy::start();
    let wait_idle = |proxy: &TestProxy| {
        let handle = proxy.handle.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(20), async {
                while handle.active_connections() > 0 || handle.registered_sessions() > 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await
            .expect("every session torn down");
        }
    };
    // Mid-query: a client running pg_sleep disappears.
    for _ in 0..3 {
        let client = connect(&cfg(&proxy)).await.unwrap();
        let pid: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        let q = tokio::spawn(async move {
            let _ = client.batch_execute("SELECT pg_sleep(30)").await;
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        q.abort();
        let _ = q.await;
        // The server side is closed too: the backend goes away once the proxy hangs up.
        let admin = connect(&cfg(&proxy)).await.unwrap();
        admin
            .execute("SELECT pg_cancel_backend($1)", &[&pid])
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let n: i64 = admin
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
                        &[&pid],
                    )
                    .await
                    .unwrap()
                    .get(0);
                if n == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("backend of the vanished client ended");
    }
    // During startup, half-way through a message, and right after authentication.
    for bytes in [
        &b"\x00\x00"[..],
        &b"\x00\x00\x00\x50\x00\x03\x00\x00user\x00"[..],
    ] {
        let mut s = std::net::TcpStream::connect(proxy.addr()).unwrap();
        std::io::Write::write_all(&mut s, bytes).unwrap();
    }
    {
        let (mut conn, _) = RawConn::connect(
            proxy.port(),
            &[("user", b"postgres"), ("database", b"test")],
        )
        .unwrap();
        std::io::Write::write_all(conn.raw_stream(), b"Q\x00\x00\x01\x00SELECT").unwrap();
    }
    wait_idle(&proxy).await;
}

#[test]
fn drain_closes_each_session_at_its_next_idle_point() {
    let proxy = TestProxy::start();
    let params: &[(&str, &[u8])] = &[("user", b"postgres"), ("database", b"test")];
    let (mut idle, _) = RawConn::connect(proxy.port(), params).unwrap();
    let (mut busy, _) = RawConn::connect(proxy.port(), params).unwrap();
    let (mut in_tx, _) = RawConn::connect(proxy.port(), params).unwrap();
    in_tx.query(b"BEGIN").unwrap();
    busy.send(b'Q', b"SELECT pg_sleep(0.5), 42\0").unwrap();
    std::thread::sleep(Duration::from_millis(150));

    proxy.handle.drain();
    let fatal = |conn: &mut RawConn| {
        let (tag, body) = conn.read_msg().unwrap();
        assert_eq!(tag, b'E');
        assert_eq!(error_field(&body, b'C').as_deref(), Some("57P01"));
        assert_eq!(error_field(&body, b'S').as_deref(), Some("FATAL"));
    };
    // The idle session is closed at once.
    fatal(&mut idle);
    // The busy one gets its whole answer first.
    let reply = busy.read_until_ready().unwrap();
    let row = reply
        .iter()
        .find(|(t, _)| *t == b'D')
        .expect("result delivered");
    assert_eq!(data_row(&row.1)[1].as_deref(), Some(&b"42"[..]));
    fatal(&mut busy);
    // The open transaction is left to finish; it closes after COMMIT.
    let reply = in_tx.query(b"SELECT 1").unwrap();
    assert!(reply.iter().any(|(t, _)| *t == b'D'));
    let reply = in_tx.query(b"COMMIT").unwrap();
    assert!(reply.iter().any(|(t, _)| *t == b'C'));
    fatal(&mut in_tx);
    // No new sessions while draining.
    assert!(RawConn::connect(proxy.port(), params).is_err());

    // close_all ends sessions wherever they are.
    let proxy = TestProxy::start();
    let (mut a, _) = RawConn::connect(proxy.port(), params).unwrap();
    a.query(b"BEGIN").unwrap();
    proxy.handle.close_all();
    fatal(&mut a);
}
