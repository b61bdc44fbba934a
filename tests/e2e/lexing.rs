//! How the proxy reads SQL text versus how PostgreSQL does: standard_conforming_strings,
//! client encodings (also while a change is still in flight), string continuation, NUL bytes,
//! and the refusal statements the proxy makes the server raise.

use crate::support::harness::{code, direct};
use crate::support::harness::{connect, main_pg, unique, ProxyOptions, TestProxy};
use crate::support::raw::{error_field, Msg, RawConn};
use crate::support::vault::Vault;

fn raw(v: &Vault, extra: &[(&str, &[u8])]) -> RawConn {
    let mut params: Vec<(&str, &[u8])> = vec![("user", b"postgres"), ("database", b"test")];
    params.extend_from_slice(extra);
    RawConn::connect(v.proxy.port(), &params).unwrap().0
}

/// Send simple queries in one write, so the proxy reads them before the server answers any.
fn pipeline(conn: &mut RawConn, texts: &[&[u8]]) {
    use std::io::Write;
    let mut buf = Vec::new();
    for sql in texts {
        buf.push(b'Q');
        buf.extend_from_slice(&(u32::try_from(sql.len() + 5).unwrap()).to_be_bytes());
        buf.extend_from_slice(sql);
        buf.push(0);
    }
    conn.raw_stream().write_all(&buf).unwrap();
}

/// The ErrorResponse bodies of a reply.
fn errors(reply: &[Msg]) -> Vec<&Vec<u8>> {
    reply
        .iter()
        .filter(|(t, _)| *t == b'E')
        .map(|(_, b)| b)
        .collect()
}

fn error_code(reply: &[Msg]) -> Option<String> {
    errors(reply).first().and_then(|b| error_field(b, b'C'))
}

/// `SELECT 'a\' /* '; INSERT … ; -- */` under standard_conforming_strings = off.
fn hidden_insert(t: &str) -> String {
    format!(
        "SELECT 'a\\' /* '; INSERT INTO {t} (org_id, value) VALUES ('o1', 'plain-hidden'); -- */"
    )
}

#[tokio::test]
async fn scs_off_by_set_refuses_texts_lexed_differently() {
    let v = Vault::new().await;
    let t = &v.table;
    let c = v.client().await;
    // Read the same way under standard_conforming_strings = on: one SELECT. Sent three times,
    // so its analysis is in the plan cache when the setting changes.
    for _ in 0..3 {
        c.batch_execute(&hidden_insert(t)).await.unwrap();
    }
    c.batch_execute("SET standard_conforming_strings = off")
        .await
        .unwrap();
    let err = c.batch_execute(&hidden_insert(t)).await.unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("0A000"), "{err:?}");
    let message = err
        .as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_default();
    assert!(message.contains("standard_conforming_strings"), "{message}");
    let err = c
        .batch_execute(&format!(
            "INSERT INTO {t} (org_id, value) VALUES ('o1', 'a\\\\b')"
        ))
        .await
        .unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("0A000"), "{err:?}");
    assert!(v.stored().await.is_empty(), "nothing written");
    // E'' strings and parameters work under either setting.
    c.batch_execute(&format!(
        "INSERT INTO {t} (org_id, value) VALUES ('o1', E'a\\\\b')"
    ))
    .await
    .unwrap();
    c.batch_execute("SET standard_conforming_strings = on")
        .await
        .unwrap();
    c.batch_execute(&format!(
        "INSERT INTO {t} (org_id, value) VALUES ('o1', 'c\\d')"
    ))
    .await
    .unwrap();
    let rows = c
        .query(&format!("SELECT value FROM {t} ORDER BY id"), &[])
        .await
        .unwrap();
    let got: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(got, vec!["a\\b".to_owned(), "c\\d".to_owned()]);
    v.assert_encrypted_at_rest(&["a\\b", "c\\d"]).await;
}

#[tokio::test]
async fn scs_off_from_startup_options_is_seen() {
    let v = Vault::new().await;
    let t = &v.table;
    let c = connect(&format!(
        "{} options='-c standard_conforming_strings=off'",
        v.proxy.pg_config("postgres", None, "test")
    ))
    .await
    .unwrap();
    let err = c.batch_execute(&hidden_insert(t)).await.unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("0A000"), "{err:?}");
    assert!(v.stored().await.is_empty(), "nothing written");
}

#[test]
fn scs_change_in_flight_is_uncertain() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let v = rt.block_on(Vault::new());
    let t = &v.table;
    let mut conn = raw(&v, &[]);
    // Pipelined: the SET is not answered yet when the next text arrives.
    pipeline(
        &mut conn,
        &[
            b"SET standard_conforming_strings = off",
            hidden_insert(t).as_bytes(),
        ],
    );
    let first = conn.read_until_ready().unwrap();
    assert_eq!(error_code(&first), None);
    let second = conn.read_until_ready().unwrap();
    assert_eq!(error_code(&second).as_deref(), Some("0A000"));
    assert!(rt.block_on(v.stored()).is_empty(), "nothing written");
    // Once answered, plain ASCII texts without backslashes pass as before.
    let ok = conn
        .query(format!("INSERT INTO {t} (org_id, value) VALUES ('o1', 'fine')").as_bytes())
        .unwrap();
    assert_eq!(error_code(&ok), None);
    rt.block_on(v.assert_encrypted_at_rest(&["fine"]));
}

#[test]
fn refusals_are_ascii_sql_and_carry_no_plpgsql_location() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let table = unique("münzen");
    rt.block_on(async {
        direct()
            .await
            .batch_execute(&format!(
                "CREATE TABLE \"{table}\" (id serial, org_id text, \"wërt\" text)"
            ))
            .await
            .unwrap();
    });
    let rules = format!(
        "[[table]]\nname = \"public.{table}\"\ntenant_column = \"org_id\"\nencrypt = [\"wërt\"]\n"
    );
    let proxy = TestProxy::with(ProxyOptions::encrypting(&rules));
    let (mut conn, _) = RawConn::connect(
        proxy.port(),
        &[
            ("user", b"postgres"),
            ("database", b"test"),
            ("client_encoding", b"LATIN1"),
        ],
    )
    .unwrap();
    let latin1 = |s: &str| -> Vec<u8> {
        s.chars()
            .map(|c| u8::try_from(u32::from(c)).unwrap())
            .collect()
    };
    for scs in ["on", "off"] {
        let r = conn
            .query(format!("SET standard_conforming_strings = {scs}").as_bytes())
            .unwrap();
        assert_eq!(error_code(&r), None);
        let r = conn
            .query(&latin1(&format!(
                "SELECT 1 FROM \"{table}\" ORDER BY \"wërt\""
            )))
            .unwrap();
        let errs = errors(&r);
        assert_eq!(errs.len(), 1);
        let body = errs[0];
        assert_eq!(error_field(body, b'C').as_deref(), Some("0A000"));
        let m = error_field(body, b'M').unwrap();
        // The message names the column in the client's encoding (LATIN1 bytes for ë, ü).
        let expected =
            String::from_utf8_lossy(&latin1(&format!("public.{table}.wërt"))).into_owned();
        assert!(m.contains(&expected), "{m:?} lacks {expected:?}");
        for f in [b'W', b'F', b'L', b'R', b'P', b'p', b'q'] {
            assert_eq!(error_field(body, f), None, "field {}", f as char);
        }
    }
    drop(proxy);
    rt.block_on(async {
        direct()
            .await
            .batch_execute(&format!("DROP TABLE \"{table}\""))
            .await
            .unwrap();
    });
}

#[test]
fn encoding_change_in_flight_refuses_non_ascii_text() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let v = rt.block_on(Vault::new());
    let t = &v.table;
    let mut conn = raw(&v, &[("client_encoding", b"LATIN1")]);
    // In GBK, 0x95 0x5C is one character: the backslash does not escape the quote, so the
    // server sees `E'…'` and then an INSERT, where a LATIN1 reading sees one long literal.
    // The INSERT is valid in both readings: hidden inside the literal for LATIN1, run by the
    // server in GBK.
    let mut sql = b"SELECT E'\x95\\'; INSERT INTO ".to_vec();
    sql.extend_from_slice(t.as_bytes());
    sql.extend_from_slice(b" (org_id, value) VALUES (chr(111) || chr(49), chr(112)); SELECT 1 --'");
    pipeline(&mut conn, &[b"SET client_encoding = 'GBK'", &sql]);
    let first = conn.read_until_ready().unwrap();
    assert_eq!(error_code(&first), None);
    let second = conn.read_until_ready().unwrap();
    assert_eq!(error_code(&second).as_deref(), Some("0A000"));
    assert!(rt.block_on(v.stored()).is_empty(), "nothing written");
    // Settled in GBK: the same text is read as PostgreSQL reads it. It writes a plaintext
    // literal into an encrypted column under an encoding the proxy cannot convert: refused.
    let r = conn.query(&sql).unwrap();
    assert_eq!(error_code(&r).as_deref(), Some("0A000"));
    assert!(rt.block_on(v.stored()).is_empty(), "nothing written");
}

#[test]
fn statements_without_encrypted_values_pass_under_any_encoding() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let v = rt.block_on(Vault::new());
    let t = &v.table;
    for enc in [&b"LATIN9"[..], b"GBK", b"SJIS", b"WIN1252"] {
        let mut conn = raw(&v, &[("client_encoding", enc)]);
        // 0xA4 is € in LATIN9; in GBK/SJIS 0x95 0x5C is one character.
        let text: &[u8] = if enc == b"LATIN9" || enc == b"WIN1252" {
            b"caf\xe9 \xa4"
        } else {
            b"x\x95\\y"
        };
        let mut sql = format!("INSERT INTO {t} (org_id, name) VALUES ('o1', '").into_bytes();
        sql.extend_from_slice(text);
        sql.extend_from_slice(b"')");
        let r = conn.query(&sql).unwrap();
        assert_eq!(error_code(&r), None, "{}", String::from_utf8_lossy(enc));
        let mut sel = format!("SELECT org_id, name FROM {t} WHERE name = '").into_bytes();
        sel.extend_from_slice(text);
        sel.extend_from_slice(b"'");
        let r = conn.query(&sel).unwrap();
        assert_eq!(error_code(&r), None);
        assert!(r.iter().any(|(tag, _)| *tag == b'D'));
        // A value for an encrypted column is still refused: the proxy cannot convert it.
        let mut ins = format!("INSERT INTO {t} (org_id, value) VALUES ('o1', '").into_bytes();
        ins.extend_from_slice(text);
        ins.extend_from_slice(b"')");
        let r = conn.query(&ins).unwrap();
        assert_eq!(error_code(&r).as_deref(), Some("0A000"));
    }
    let stored = rt.block_on(v.stored());
    assert_eq!(stored.len(), 4);
    assert!(stored.iter().all(|(_, value, _)| value.is_none()));
}

#[tokio::test]
async fn string_continuation_is_one_literal() {
    let v = Vault::new().await;
    let t = &v.table;
    let c = v.client().await;
    c.batch_execute(&format!(
        "INSERT INTO {t} (org_id, name, value, note) VALUES ('o1', 'ab'\n'cd', 'sec' -- c\n  'ret', E'x\\''\n'y')"
    ))
    .await
    .unwrap();
    let rows = c
        .query(&format!("SELECT name, value, note FROM {t}"), &[])
        .await
        .unwrap();
    let got: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        got,
        vec![("abcd".to_owned(), "secret".to_owned(), "x'y".to_owned())]
    );
    v.assert_encrypted_at_rest(&["secret", "sec", "ret", "x'y"])
        .await;
}

#[tokio::test]
async fn nul_in_a_parameter_is_refused() {
    let v = Vault::new().await;
    let t = &v.table;
    let c = v.client().await;
    let err = c
        .execute(
            &format!("INSERT INTO {t} (org_id, value) VALUES ($1, $2)"),
            &[&"o1", &"a\0b"],
        )
        .await
        .unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("22021"), "{err:?}");
    assert!(v.stored().await.is_empty(), "nothing written");
    // Not in a literal either: PostgreSQL refuses E'\0' itself.
    let err = c
        .batch_execute(&format!(
            "INSERT INTO {t} (org_id, value) VALUES ('o1', E'a\\0b')"
        ))
        .await
        .unwrap_err();
    assert!(code(&err).is_some(), "{err:?}");
    assert!(v.stored().await.is_empty(), "nothing written");
    let _ = main_pg();
}

#[tokio::test]
async fn nul_in_a_copy_field_is_refused() {
    use futures_util::SinkExt;
    let v = Vault::new().await;
    let t = &v.table;
    let c = v.client().await;
    for (sql, row) in [
        (
            format!("COPY {t} (org_id, value) FROM STDIN"),
            "o1\ta\\000b\n",
        ),
        (
            format!("COPY {t} (org_id, value) FROM STDIN WITH (FORMAT csv)"),
            "o1,\"a\0b\"\n",
        ),
    ] {
        let sink = c.copy_in(&sql).await.unwrap();
        let mut sink = Box::pin(sink);
        let sent = sink.send(bytes::Bytes::from(row.to_owned())).await;
        let finished = match sent {
            Ok(()) => sink.as_mut().finish().await,
            Err(e) => Err(e),
        };
        assert!(finished.is_err(), "{sql}: accepted");
        assert!(v.stored().await.is_empty(), "{sql}: nothing written");
    }
}

#[test]
fn encoding_change_in_flight_is_seen_in_extended_protocol() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let v = rt.block_on(Vault::new());
    let t = &v.table;
    let mut conn = raw(&v, &[("client_encoding", b"LATIN1")]);
    let mut buf = Vec::new();
    let mut put = |tag: u8, body: &[u8]| {
        buf.push(tag);
        buf.extend_from_slice(&u32::try_from(body.len() + 4).unwrap().to_be_bytes());
        buf.extend_from_slice(body);
    };
    let cycle = |put: &mut dyn FnMut(u8, &[u8]), sql: &[u8]| {
        let mut parse = vec![0];
        parse.extend_from_slice(sql);
        parse.push(0);
        parse.extend_from_slice(&0i16.to_be_bytes());
        put(b'P', &parse);
        put(b'B', &[0, 0, 0, 0, 0, 0, 0, 0]);
        put(b'E', &[0, 0, 0, 0, 0]);
        put(b'S', &[]);
    };
    // Read in LATIN1, `name` gets one long literal and `value` NULL; read in GBK (0x95 0x5C is
    // one character), `value` gets chr(112) in plaintext.
    let mut insert = format!("INSERT INTO {t} (org_id, name, value) VALUES ('o1', E'").into_bytes();
    insert.extend_from_slice(b"\x95\\', chr(112)) --', NULL)");
    cycle(&mut put, b"SET client_encoding = 'GBK'");
    cycle(&mut put, &insert);
    {
        use std::io::Write;
        conn.raw_stream().write_all(&buf).unwrap();
    }
    let first = conn.read_until_ready().unwrap();
    assert_eq!(error_code(&first), None);
    let second = conn.read_until_ready().unwrap();
    assert_eq!(error_code(&second).as_deref(), Some("0A000"));
    assert!(rt.block_on(v.stored()).is_empty(), "nothing written");
}

#[test]
fn tenant_parameter_during_an_encoding_change_is_refused() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let v = rt.block_on(Vault::new());
    let t = &v.table;
    let mut conn = raw(&v, &[]);
    let mut buf = Vec::new();
    let mut put = |tag: u8, body: &[u8]| {
        buf.push(tag);
        buf.extend_from_slice(&u32::try_from(body.len() + 4).unwrap().to_be_bytes());
        buf.extend_from_slice(body);
    };
    let mut set = vec![0];
    set.extend_from_slice(b"SET client_encoding = 'LATIN1'\0");
    set.extend_from_slice(&0i16.to_be_bytes());
    put(b'P', &set);
    put(b'B', &[0, 0, 0, 0, 0, 0, 0, 0]);
    put(b'E', &[0, 0, 0, 0, 0]);
    put(b'S', &[]);
    let mut ins = vec![0];
    ins.extend_from_slice(format!("INSERT INTO {t} (org_id, value) VALUES ($1, $2)\0").as_bytes());
    ins.extend_from_slice(&0i16.to_be_bytes());
    put(b'P', &ins);
    // The tenant "é" in UTF-8: the server reads it in LATIN1 as "Ã©", the organisation a
    // value sealed for "é" would not open under.
    let mut bind = vec![0, 0];
    bind.extend_from_slice(&0i16.to_be_bytes());
    bind.extend_from_slice(&2i16.to_be_bytes());
    for p in [&b"\xc3\xa9"[..], b"secret"] {
        bind.extend_from_slice(&i32::try_from(p.len()).unwrap().to_be_bytes());
        bind.extend_from_slice(p);
    }
    bind.extend_from_slice(&0i16.to_be_bytes());
    put(b'B', &bind);
    put(b'E', &[0, 0, 0, 0, 0]);
    put(b'S', &[]);
    {
        use std::io::Write;
        conn.raw_stream().write_all(&buf).unwrap();
    }
    let first = conn.read_until_ready().unwrap();
    assert_eq!(error_code(&first), None);
    let second = conn.read_until_ready().unwrap();
    assert_eq!(error_code(&second).as_deref(), Some("0A000"));
    assert!(rt.block_on(v.stored()).is_empty(), "nothing written");
}
