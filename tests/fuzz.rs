//! Bounded property-based fuzzing of everything that parses untrusted input: the framing and
//! every message decoder (both directions, startup packets, COPY payloads), the `enc:v1`
//! decoder and `inspect`, the rules parser and the statement analyser. Each target must return
//! `Ok` or `Err` for any input: no panic, no hang, no allocation driven by a claimed length.
//! One target is differential: the analyser's statement split against the test PostgreSQL's,
//! under both `standard_conforming_strings` values and several client encodings (it needs the
//! server at 127.0.0.1:5432 or `PGENVELOPE_TEST_PGHOST`/`PGENVELOPE_TEST_PGPORT`).
//!
//! Inputs are bounded in size, so every case is fast; the number of cases per target is
//! `PGENVELOPE_FUZZ_CASES` (default 2000), and each target prints its case count and time.
//! Generators mix arbitrary bytes with well-formed inputs that are then mutated (bit flips,
//! truncation, splices, corrupted lengths), which reaches much deeper than random bytes alone.

#![allow(missing_docs, clippy::unwrap_used)]

use std::time::Instant;

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestRunner};

use pgenvelope::crypto::{ColumnId, ColumnKey, DataKey, DekId, EncV1, OrgId};
use pgenvelope::rules::RuleSet;
use pgenvelope::sql::{analyze, might_touch, rewrite_literals, Protected, ProtectedTable};
use pgenvelope::wire::backend::{self, DataRow, ErrorFields};
use pgenvelope::wire::copy::{CopyFormat, CopyRewriter};
use pgenvelope::wire::frontend::{self, Bind, Parse};
use pgenvelope::wire::header::scan_startup;
use pgenvelope::wire::startup::StartupPacket;
use pgenvelope::wire::{Frame, Header, WireError};

/// The proxy's default largest message (1 GiB - 1).
const DEFAULT_LIMIT: usize = (1 << 30) - 1;

fn cases() -> u32 {
    std::env::var("PGENVELOPE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

/// Run `check` on `cases()` inputs from `strategy`; a panic or `Err` fails with the shrunk input.
fn campaign<S: Strategy>(name: &str, strategy: S, check: impl Fn(S::Value) -> Result<(), String>) {
    let cases = cases();
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        ..Config::default()
    });
    let started = Instant::now();
    let result = runner.run(&strategy, |v| {
        check(v).map_err(proptest::test_runner::TestCaseError::fail)
    });
    eprintln!("fuzz {name}: {cases} cases in {:.2?}", started.elapsed());
    if let Err(e) = result {
        panic!("fuzz {name}: {e}");
    }
}

/// Apply byte-level mutations to `data`.
fn mutate(mut data: Vec<u8>, edits: &[(usize, u8, u8)]) -> Vec<u8> {
    for &(at, op, byte) in edits {
        let pos = if data.is_empty() { 0 } else { at % data.len() };
        match op % 6 {
            0 if !data.is_empty() => data[pos] ^= 1 << (byte % 8),
            1 if !data.is_empty() => data[pos] = byte,
            2 => data.insert(pos.min(data.len()), byte),
            3 if !data.is_empty() => {
                data.remove(pos);
            }
            4 => data.truncate(pos),
            _ => {
                // Duplicate a slice: repeated fields, doubled frames.
                let end = (pos + usize::from(byte)).min(data.len());
                let copy = data[pos.min(end)..end].to_vec();
                data.splice(pos.min(end)..pos.min(end), copy);
            }
        }
    }
    data
}

fn edits() -> impl Strategy<Value = Vec<(usize, u8, u8)>> {
    proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 0..6)
}

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut f = vec![tag];
    f.extend_from_slice(&u32::try_from(body.len() + 4).unwrap().to_be_bytes());
    f.extend_from_slice(body);
    f
}

fn cstr(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(s);
    out.push(0);
}

/// Well-formed bodies of the messages the proxy decodes, from fuzzed parts.
fn well_formed(kind: u8, a: &[u8], b: &[u8], n: u8) -> (u8, Vec<u8>) {
    let mut body = Vec::new();
    let clean = |s: &[u8]| s.iter().map(|&c| c.max(1)).collect::<Vec<u8>>();
    match kind % 12 {
        0 => {
            cstr(&mut body, &clean(a));
            (b'Q', body)
        }
        1 => {
            cstr(&mut body, &clean(b));
            cstr(&mut body, &clean(a));
            body.extend_from_slice(&u16::from(n % 4).to_be_bytes());
            for i in 0..n % 4 {
                body.extend_from_slice(&(25 + u32::from(i)).to_be_bytes());
            }
            (b'P', body)
        }
        2 => {
            cstr(&mut body, b"");
            cstr(&mut body, &clean(b));
            body.extend_from_slice(&1u16.to_be_bytes());
            body.extend_from_slice(&u16::from(n & 1).to_be_bytes());
            let params = n % 4;
            body.extend_from_slice(&u16::from(params).to_be_bytes());
            for i in 0..params {
                if i == 0 && n & 8 != 0 {
                    body.extend_from_slice(&(-1i32).to_be_bytes());
                } else {
                    body.extend_from_slice(&u32::try_from(a.len()).unwrap().to_be_bytes());
                    body.extend_from_slice(a);
                }
            }
            body.extend_from_slice(&1u16.to_be_bytes());
            body.extend_from_slice(&0u16.to_be_bytes());
            (b'B', body)
        }
        3 => {
            body.push(if n & 1 == 0 { b'S' } else { b'P' });
            cstr(&mut body, &clean(a));
            (b'D', body)
        }
        4 => {
            cstr(&mut body, &clean(a));
            body.extend_from_slice(&i32::from(n).to_be_bytes());
            (b'E', body)
        }
        5 => {
            let fields = n % 5;
            body.extend_from_slice(&u16::from(fields).to_be_bytes());
            for i in 0..fields {
                cstr(&mut body, &clean(a));
                body.extend_from_slice(&(16_384 + u32::from(i)).to_be_bytes());
                body.extend_from_slice(&(u16::from(i) + 1).to_be_bytes());
                body.extend_from_slice(&25u32.to_be_bytes());
                body.extend_from_slice(&(-1i16).to_be_bytes());
                body.extend_from_slice(&(-1i32).to_be_bytes());
                body.extend_from_slice(&u16::from(n & 1).to_be_bytes());
            }
            (b'T', body)
        }
        6 => {
            let cols = n % 5;
            body.extend_from_slice(&u16::from(cols).to_be_bytes());
            for i in 0..cols {
                if i % 2 == 1 {
                    body.extend_from_slice(&(-1i32).to_be_bytes());
                } else {
                    body.extend_from_slice(&u32::try_from(b.len()).unwrap().to_be_bytes());
                    body.extend_from_slice(b);
                }
            }
            (b'D', body)
        }
        7 => {
            for (f, v) in [(b'S', &b"ERROR"[..]), (b'C', b"0A000"), (b'M', a)] {
                body.push(f);
                cstr(&mut body, &clean(v));
            }
            body.push(0);
            (b'E', body)
        }
        8 => {
            body.push(n & 1);
            body.extend_from_slice(&u16::from(n % 3).to_be_bytes());
            for _ in 0..n % 3 {
                body.extend_from_slice(&0u16.to_be_bytes());
            }
            (b'G', body)
        }
        9 => {
            cstr(&mut body, &clean(a));
            cstr(&mut body, &clean(b));
            (b'S', body)
        }
        10 => {
            cstr(&mut body, &clean(a));
            (b'C', body)
        }
        _ => {
            body.extend_from_slice(a);
            (b'd', body)
        }
    }
}

/// Run every decoder on one frame, whatever its tag claims to be.
fn decode_all(tag: u8, body: &[u8]) {
    let _ = frontend::parse_query(body);
    if let Ok(p) = Parse::decode(body) {
        let mut out = bytes::BytesMut::new();
        let _ = p.encode(&mut out);
    }
    if let Ok(bind) = Bind::decode(body) {
        for i in 0..4 {
            let _ = bind.param_format(i);
        }
    }
    let _ = frontend::parse_target(tag, body);
    let _ = frontend::parse_execute(body);
    let _ = frontend::parse_copy_fail(body);
    let _ = backend::parse_row_description(body);
    let _ = backend::parse_parameter_description(body);
    let _ = backend::parse_command_complete(body);
    let _ = backend::parse_copy_response(tag, body);
    let _ = backend::parse_ready_for_query(body);
    let _ = backend::parse_parameter_status(body);
    let _ = backend::parse_backend_key_data(body);
    let _ = backend::parse_authentication_code(body);
    let _ = ErrorFields::new(body).count();
    if let Ok(row) = DataRow::parse(body) {
        for i in 0..row.len() + 1 {
            let _ = row.get(i);
        }
    }
}

/// Deframe `stream` as the pump does and decode every whole frame; returns the frames seen.
fn deframe(stream: &[u8], limit: usize) -> Result<usize, String> {
    let mut pos = 0;
    let mut frames = 0;
    loop {
        match Header::scan(&stream[pos..], limit) {
            Ok(None) => return Ok(frames),
            Err(WireError::TooLarge { len, .. }) => {
                if len as usize - 4 <= limit {
                    return Err(format!("refused {len} under limit {limit}"));
                }
                return Ok(frames);
            }
            Err(_) => return Ok(frames),
            Ok(Some(h)) => {
                if h.body_len() > limit {
                    return Err("header above the limit accepted".into());
                }
                let end = pos + h.frame_len();
                if end > stream.len() {
                    return Ok(frames);
                }
                let raw = bytes::Bytes::copy_from_slice(&stream[pos..end]);
                let f = Frame::from_raw(raw).ok_or("a scanned frame did not convert")?;
                if f.tag() != h.tag() || f.body().len() != h.body_len() {
                    return Err("frame and header disagree".into());
                }
                decode_all(f.tag(), f.body());
                frames += 1;
                pos = end;
            }
        }
    }
}

#[test]
fn fuzz_framing_and_message_decoders() {
    let messages = proptest::collection::vec(
        (
            any::<u8>(),
            proptest::collection::vec(any::<u8>(), 0..64),
            proptest::collection::vec(any::<u8>(), 0..64),
            any::<u8>(),
        ),
        0..8,
    );
    campaign(
        "wire frames (well-formed, mutated)",
        (messages, edits(), 0usize..4096),
        |(msgs, edits, limit)| {
            let mut stream = Vec::new();
            let mut n = 0;
            for (kind, a, b, x) in &msgs {
                let (tag, body) = well_formed(*kind, a, b, *x);
                decode_all(tag, &body);
                stream.extend(frame(tag, &body));
                n += 1;
            }
            // Unmutated, every frame comes out whole.
            let seen = deframe(&stream, DEFAULT_LIMIT)?;
            if seen != n {
                return Err(format!("{seen} of {n} frames"));
            }
            deframe(&mutate(stream, &edits), limit).map(drop)
        },
    );
    campaign(
        "wire arbitrary bytes",
        (
            proptest::collection::vec(any::<u8>(), 0..2048),
            0usize..1 << 20,
        ),
        |(data, limit)| deframe(&data, limit).map(drop),
    );
}

#[test]
fn huge_length_claims_are_refused_from_the_header_alone() {
    // Only the 5 header bytes exist: a refusal proves nothing was read or reserved for the
    // body (the pump's own test measures that it reserves nothing either).
    // The length field counts itself: a body of exactly the limit is allowed, one byte more
    // (a claim of 1 GiB + 4) is not.
    let edge = [b'Q', 0x40, 0, 0, 3];
    assert_eq!(
        Header::scan(&edge, DEFAULT_LIMIT)
            .unwrap()
            .unwrap()
            .body_len(),
        DEFAULT_LIMIT
    );
    for claim in [
        (1u32 << 30) + 4,
        (1 << 30) + 5,
        0x7fff_ffff,
        0x8000_0000,
        u32::MAX,
    ] {
        for tag in [b'Q', b'D', b'd', b'B', b'P', b'T', b'X', 0, 0xff] {
            let mut head = vec![tag];
            head.extend_from_slice(&claim.to_be_bytes());
            let err = Header::scan(&head, DEFAULT_LIMIT).expect_err("refused");
            assert!(matches!(err, WireError::TooLarge { .. }), "{err}");
        }
        // Startup-phase packets carry their own, much smaller, limit.
        assert!(scan_startup(&claim.to_be_bytes()).is_err());
    }
}

#[test]
fn fuzz_startup_packets() {
    let params = proptest::collection::vec(("[a-z_.]{0,12}", "\\PC{0,16}"), 0..6);
    campaign(
        "startup packets (well-formed, mutated)",
        (params, any::<u32>(), edits()),
        |(params, code, edits)| {
            let mut body = match code % 5 {
                0 => 196_608u32,
                1 => 80_877_103,
                2 => 80_877_104,
                3 => 80_877_102,
                _ => code,
            }
            .to_be_bytes()
            .to_vec();
            for (k, v) in &params {
                cstr(&mut body, k.as_bytes());
                cstr(&mut body, v.as_bytes());
            }
            body.push(0);
            let mut packet = u32::try_from(body.len() + 4)
                .unwrap()
                .to_be_bytes()
                .to_vec();
            packet.extend_from_slice(&body);
            let packet = mutate(packet, &edits);
            if let Ok(Some(len)) = scan_startup(&packet) {
                if len > packet.len() {
                    return Err("scan_startup overran the buffer".into());
                }
                if let Ok(StartupPacket::Startup(p)) = StartupPacket::parse(&packet[..len]) {
                    let _ = p.iter().count();
                    let _ = (p.get_str("user"), p.get("options"), p.is_replication());
                }
            }
            let _ = StartupPacket::parse(&packet);
            Ok(())
        },
    );
}

#[test]
fn fuzz_copy_payloads() {
    let rows = proptest::collection::vec(
        proptest::collection::vec(
            prop_oneof![
                Just("\\N".to_owned()),
                "[a-z]{0,6}",
                "\\PC{0,8}",
                Just("\"q,\"\"x\"".to_owned())
            ],
            0..5,
        ),
        0..8,
    );
    campaign(
        "COPY text/csv payloads in chunks",
        (
            rows,
            any::<bool>(),
            edits(),
            proptest::collection::vec(1usize..64, 0..6),
            0usize..4,
        ),
        |(rows, csv, edits, cuts, target)| {
            let sep = if csv { "," } else { "\t" };
            let text: String = rows.iter().map(|r| r.join(sep) + "\n").collect();
            let payload = mutate(text.into_bytes(), &edits);
            let format = if csv {
                CopyFormat::csv()
            } else {
                CopyFormat::text()
            };
            let mut rw =
                CopyRewriter::new(format, vec![target], 4096).map_err(|e| e.to_string())?;
            let mut out: Vec<u8> = Vec::new();
            let mut f = |row: &mut pgenvelope::wire::copy::CopyRow<'_>| -> Result<(), ()> {
                if let Some(Some(v)) = row.get(target) {
                    let v = v.to_vec();
                    row.set(target, Some(v));
                }
                Ok(())
            };
            let mut pos = 0;
            for c in cuts {
                let end = (pos + c).min(payload.len());
                if rw.feed(&payload[pos..end], &mut out, &mut f).is_err() {
                    return Ok(());
                }
                pos = end;
            }
            if rw.feed(&payload[pos..], &mut out, &mut f).is_ok() {
                let _ = rw.finish(&mut out, &mut f);
            }
            Ok(())
        },
    );
}

fn sealed_value(plaintext: &[u8], nonce: [u8; 12]) -> String {
    let dek = DekId(uuid::Uuid::from_u128(
        0x1234_5678_9abc_def0_1234_5678_9abc_def0,
    ));
    let key = ColumnKey::derive(
        &DataKey::from_bytes([7u8; 32]),
        dek,
        ColumnId::from_name("public.vault.value"),
    );
    key.danger_seal_with_nonce(&OrgId::new("acme").unwrap(), plaintext, nonce)
        .unwrap()
}

#[test]
fn fuzz_enc_v1_decoder() {
    let rules = RuleSet::from_sources(&[(
        "r.toml",
        "[[table]]\nname = \"public.vault\"\ntenant_column = \"org_id\"\nencrypt = [\"value\"]\n",
    )])
    .unwrap();
    let key = ColumnKey::derive(
        &DataKey::from_bytes([7u8; 32]),
        DekId(uuid::Uuid::from_u128(
            0x1234_5678_9abc_def0_1234_5678_9abc_def0,
        )),
        ColumnId::from_name("public.vault.value"),
    );
    let org = OrgId::new("acme").unwrap();
    campaign(
        "enc:v1 text (valid, mutated) and binary",
        (
            proptest::collection::vec(any::<u8>(), 0..64),
            any::<[u8; 12]>(),
            edits(),
            proptest::collection::vec(any::<u8>(), 0..128),
        ),
        |(pt, nonce, edits, binary)| {
            let valid = sealed_value(&pt, nonce);
            let parsed = EncV1::parse(valid.as_bytes()).map_err(|e| e.to_string())?;
            if key.open(&org, &parsed).map_err(|e| e.to_string())? != pt {
                return Err("round trip".into());
            }
            let mutated = mutate(valid.clone().into_bytes(), &edits);
            if let Ok(v) = EncV1::parse(&mutated) {
                // What `inspect` prints, and decryption: a changed value never opens.
                let _ = (
                    v.algorithm(),
                    v.dek_id(),
                    v.nonce(),
                    v.plaintext_len(),
                    v.to_text(),
                );
                let _ = rules.by_column_id(v.column_id());
                if let Ok(out) = key.open(&org, &v) {
                    if out != pt {
                        return Err("a mutated value opened to other plaintext".into());
                    }
                }
            }
            if let Ok(v) = EncV1::from_binary(binary.clone()) {
                let _ = (v.ciphertext().len(), v.as_binary().len(), v.to_text());
                let _ = key.open(&org, &v);
            }
            let _ = EncV1::parse(&binary);
            Ok(())
        },
    );
}

#[test]
fn inspect_command_never_panics_on_hostile_values() {
    // The binary end to end, on fewer inputs (one process each).
    let mut runner = TestRunner::new(Config {
        cases: 48,
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        ..Config::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    runner
        .run(&(any::<[u8; 12]>(), edits()), |(nonce, edits)| {
            let value = mutate(sealed_value(b"secret", nonce).into_bytes(), &edits);
            let value = String::from_utf8_lossy(&value).replace('\0', "");
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgenvelope"))
                .current_dir(dir.path())
                .args(["inspect", "--offline", "--rules", "none", "--"])
                .arg(&value)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            prop_assert!(!stderr.contains("panicked"), "{stderr}");
            prop_assert!(matches!(out.status.code(), Some(0..=2)), "{:?}", out.status);
            Ok(())
        })
        .unwrap();
    eprintln!("fuzz inspect binary: 48 cases in {:.2?}", started.elapsed());
}

const RULE_VOCAB: &[&str] = &[
    "[[table]]\n",
    "[table]\n",
    "name = \"public.t\"\n",
    "name = \"a.b.c\"\n",
    "name = \"\"\n",
    "tenant_column = \"org_id\"\n",
    "encrypt = [\"value\"]\n",
    "encrypt = [{ name = \"email\", mode = \"deterministic\" }]\n",
    "encrypt = [{ name = \"x\", id = \"stable\" }]\n",
    "encrypt = []\n",
    "unknown = 1\n",
    "= \n",
    "\"\n",
    "[[\n",
    "# comment\n",
    "name = \"Ü\u{0}\"\n",
];

#[test]
fn fuzz_rules_parser() {
    campaign(
        "rules: token sequences, mutated",
        (
            proptest::collection::vec(0..RULE_VOCAB.len(), 0..12),
            edits(),
            any::<String>(),
        ),
        |(tokens, edits, extra)| {
            let text: String = tokens.iter().map(|&i| RULE_VOCAB[i]).collect();
            let text = String::from_utf8_lossy(&mutate(text.into_bytes(), &edits)).into_owned();
            if let Ok(rules) = RuleSet::from_sources(&[("a.toml", text.as_str())]) {
                for t in rules.tables() {
                    let _ = t.columns().len();
                }
            }
            let _ = RuleSet::from_sources(&[("a.toml", text.as_str()), ("b.toml", extra.as_str())]);
            Ok(())
        },
    );
}

const SQL_VOCAB: &[&str] = &[
    "INSERT INTO secrets (org_id, value) VALUES ('a', 'b')",
    "INSERT INTO public.secrets (value, note) VALUES ($1, $2), ($3, $4)",
    "UPDATE secrets SET value = $1 WHERE org_id = 'x'",
    "INSERT INTO secrets (id, org_id, value) VALUES (7, 'a', 'b') RETURNING id, value",
    "UPDATE secrets s SET value = 'v' WHERE s.id = $2 AND org_id = $3",
    "INSERT INTO secrets (id, org_id, value) VALUES ($1, 'a', $2) ON CONFLICT (id) DO UPDATE SET value = EXCLUDED.value WHERE secrets.org_id = EXCLUDED.org_id",
    "SELECT value FROM secrets WHERE id = 1",
    "COPY secrets (org_id, value) FROM STDIN WITH (FORMAT csv)",
    "INSERT INTO secrets (org_id, value) VALUES ($1, $2) ON CONFLICT (org_id) DO UPDATE SET value = EXCLUDED.value",
    "WITH x AS (UPDATE secrets SET value = 'p' RETURNING *) SELECT * FROM x",
    "SET pgenvelope.tenant = 'acme'",
    "BEGIN; SAVEPOINT s; ROLLBACK TO s; COMMIT",
    "DO $$ BEGIN PERFORM 1; END $$",
    "SELECT set_config('pgenvelope.tenant', $1, true)",
    // The shapes ORMs send.
    "UPDATE secrets SET value = $1::VARCHAR WHERE secrets.id = $2::BIGINT",
    "UPDATE \"secrets\" SET \"note\" = (CASE WHEN (\"secrets\".\"id\" = 1) THEN 'a' WHEN (\"secrets\".\"id\" = 2) THEN 'b' ELSE NULL END)::text WHERE \"secrets\".\"id\" IN (1, 2)",
    "INSERT INTO \"secrets\" (\"org_id\", \"value\") SELECT * FROM UNNEST(($1)::varchar[], ($2)::text[]) RETURNING \"secrets\".\"id\"",
    "INSERT INTO secrets (org_id, value) SELECT p0::VARCHAR, p1::VARCHAR FROM (VALUES ($1::VARCHAR, $2::VARCHAR, 0), ($3::VARCHAR, $4::VARCHAR, 1)) AS imp_sen(p0, p1, sen_counter) ORDER BY sen_counter RETURNING secrets.id",
    "INSERT INTO \"secrets\" (\"id\",\"org_id\",\"value\") VALUES (DEFAULT,$1,$2) ON CONFLICT (\"id\") DO UPDATE SET \"id\"=EXCLUDED.\"id\",\"org_id\"=EXCLUDED.\"org_id\",\"value\"=EXCLUDED.\"value\" RETURNING \"id\"",
    "INSERT INTO secrets (org_id, value) VALUES ('00000001-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid, 'x')",
    "ALTER TABLE secrets ADD COLUMN note text NULL",
    "ALTER TABLE secrets ALTER COLUMN value TYPE text USING value::text",
    "CREATE OR REPLACE FUNCTION pg_temp.testfunc(OUT response \"secrets\", OUT sequelize_caught_exception text) RETURNS RECORD AS $func_1$ BEGIN INSERT INTO \"secrets\" (\"id\",\"org_id\",\"value\") VALUES (DEFAULT,'a','z') RETURNING * INTO response; EXCEPTION WHEN unique_violation THEN GET STACKED DIAGNOSTICS sequelize_caught_exception = PG_EXCEPTION_DETAIL; END $func_1$ LANGUAGE plpgsql; SELECT (testfunc.response).\"value\", testfunc.sequelize_caught_exception FROM pg_temp.testfunc()",
    "E'\\x41'",
    "$tag$ body $tag$",
    "U&'\\0041'",
    "/* nested /* comment */ */",
    "-- line\n",
    ";",
    "'",
    "\"",
    "(",
    ")",
    "$1",
    "secrets",
    "value",
];

fn protected() -> Protected {
    Protected::new([ProtectedTable {
        schema: "public".into(),
        name: "secrets".into(),
        tenant_column: Some("org_id".into()),
        row_key: None,
        encrypted: vec!["value".into(), "note".into()],
        searchable: Vec::new(),
    }])
}

/// [`protected`] with row binding (`row_key = "id"`).
fn bound() -> Protected {
    Protected::new([ProtectedTable {
        row_key: Some("id".into()),
        ..protected().tables()[0].clone()
    }])
}

fn check_sql(sql: &str, p: &Protected) -> Result<(), String> {
    // Row binding: whatever the text, a value accepted for sealing carries its row key.
    let b = analyze(sql, &bound());
    let unkeyed = b.literals.iter().any(|l| l.row_key.is_none())
        || b.params.iter().any(|p| p.row_key.is_none())
        || b.arrays.iter().any(|a| a.row_key.is_none());
    if b.rejection.is_none() && unkeyed {
        return Err("a value of a row-bound table is sealed without its row key".into());
    }
    if b.rejection.is_none() {
        // Everything the proxy writes into the text (sealed values, tenant pins, drawn keys)
        // fits together: in bounds, on character boundaries, never overlapping.
        edits_fit(sql, &b)?;
    }
    let a = analyze(sql, p);
    if (a.touches_protected || !a.tenant_changes.is_empty()) && !might_touch(sql, p) {
        return Err("analysis touches protected data the pre-check missed".into());
    }
    if a.rejection.is_none() {
        edits_fit(sql, &a)?;
        // An UPDATE value sealed for "the session tenant" is pinned to it: written nowhere
        // else than to that organisation's rows.
        let session_sealed = a
            .literals
            .iter()
            .map(|l| &l.tenant)
            .chain(a.params.iter().map(|p| &p.tenant))
            .any(|t| *t == pgenvelope::sql::TenantSource::Session);
        let updates = a.kinds.contains(&pgenvelope::sql::StatementKind::Update);
        if session_sealed && updates && a.pins.is_empty() && a.statement_count == 1 {
            return Err("an UPDATE sealed for the session tenant is not pinned to it".into());
        }
    }
    let mut last = 0;
    let mut replacements = Vec::new();
    for l in &a.literals {
        if l.range.start < last || sql.get(l.range.clone()).is_none() {
            return Err(format!("bad literal range {:?}", l.range));
        }
        last = l.range.end;
        replacements.push((l.range.clone(), "'enc:v1:AAAA'".to_owned()));
    }
    let rewritten = rewrite_literals(sql, &replacements).map_err(|e| e.to_string())?;
    let _ = analyze(&rewritten, p);
    Ok(())
}

/// The edits the proxy makes to `sql` for `a` (literals replaced, pins and drawn keys inserted)
/// apply cleanly.
fn edits_fit(sql: &str, a: &pgenvelope::sql::Analysis) -> Result<(), String> {
    use pgenvelope::sql::PinPlace;
    let mut edits: Vec<(std::ops::Range<usize>, String)> = Vec::new();
    for l in &a.literals {
        edits.push((l.range.clone(), "'enc:v1:AAAA'".into()));
    }
    for p in &a.pins {
        match &p.place {
            PinPlace::Wrap(r) => {
                edits.push((r.start..r.start, "(".into()));
                edits.push((r.end..r.end, ") AND pin".into()));
            }
            PinPlace::Add(at) => edits.push((*at..*at, " WHERE pin".into())),
        }
    }
    for d in &a.draws {
        for (r, _) in &d.edits {
            edits.push((r.clone(), ", key".into()));
        }
    }
    edits.sort_by_key(|(r, _)| (r.start, r.end));
    rewrite_literals(sql, &edits)
        .map(|_| ())
        .map_err(|e| format!("the proxy's edits do not fit: {e}"))
}

#[test]
fn fuzz_statement_analyser() {
    let p = protected();
    campaign(
        "sql: statement splices, mutated",
        (
            proptest::collection::vec(0..SQL_VOCAB.len(), 1..6),
            proptest::collection::vec((any::<usize>(), 0u8..4, "\\PC{0,3}"), 0..5),
        ),
        |(pieces, edits)| {
            let mut s: String = pieces
                .iter()
                .map(|&i| SQL_VOCAB[i])
                .collect::<Vec<_>>()
                .join(" ");
            for (at, op, text) in edits {
                let mut pos = at % (s.len() + 1);
                while !s.is_char_boundary(pos) {
                    pos -= 1;
                }
                match op {
                    0 => s.insert_str(pos, &text),
                    1 => s.truncate(pos),
                    2 => s.insert(pos, '\''),
                    _ => s.insert_str(pos, "$$"),
                }
            }
            check_sql(&s, &p)
        },
    );
    campaign("sql: arbitrary text", "\\PC{0,300}", |s| check_sql(&s, &p));
    campaign(
        "sql: rewrite_literals with arbitrary ranges",
        (
            "\\PC{0,64}",
            proptest::collection::vec((0usize..80, 0usize..80, "\\PC{0,8}"), 0..4),
        ),
        |(s, ranges)| {
            let replacements: Vec<_> = ranges.into_iter().map(|(a, b, t)| (a..b, t)).collect();
            let _ = rewrite_literals(&s, &replacements);
            Ok(())
        },
    );
}

/// [`protected`] with `value` searchable (`search = "equality"`); `note` stays unsearchable.
fn searchable() -> Protected {
    Protected::new([ProtectedTable {
        searchable: vec![("value".into(), pgenvelope::crypto::SearchMode::Equality)],
        ..protected().tables()[0].clone()
    }])
}

/// Pieces of look-ups: the marker `SECRET` appears only in values compared with the searchable
/// column `value` (always named so that it resolves: a qualifier naming no relation in scope is
/// not a protected column to the analyser, and the server refuses the statement).
const SEARCH_VOCAB: &[&str] = &[
    "SELECT id FROM secrets WHERE",
    "SELECT * FROM secrets WHERE",
    "UPDATE secrets SET note = $9 WHERE",
    "DELETE FROM secrets WHERE",
    "value = 'SECRET1'",
    "secrets.value <> 'SECRET2'",
    "value IN ('SECRET3', $1)",
    "value IS DISTINCT FROM E'SECRET4'",
    "value = $2::text",
    "secrets.value = ANY($3)",
    "value NOT IN ($$SECRET5$$)",
    "org_id = 'acme'",
    "note IS NULL",
    "AND",
    "OR",
    "NOT",
    "(",
    ")",
    ";",
    "id = 3",
];

/// Applies the proxy's edits for look-ups: column sides, terms, parameters, pins.
fn search_rewritten(sql: &str, a: &pgenvelope::sql::Analysis) -> Result<String, String> {
    use pgenvelope::sql::{PinPlace, SearchOperand};
    let mut edits: Vec<(std::ops::Range<usize>, String)> = Vec::new();
    for l in &a.literals {
        edits.push((l.range.clone(), "'enc:v1:AAAA'".into()));
    }
    for site in &a.searches {
        let col = sql
            .get(site.column_ref.clone())
            .ok_or("column reference out of bounds")?;
        edits.push((site.column_range.clone(), format!("left({col}, 31)")));
        for o in &site.operands {
            match o {
                SearchOperand::Literal { range, .. } => {
                    edits.push((range.clone(), "'enc:v1:TERM'".into()))
                }
                SearchOperand::Param { range, index } => {
                    edits.push((range.clone(), format!("${index}")))
                }
                SearchOperand::ArrayParam { .. } => {}
            }
        }
    }
    for p in &a.pins {
        match &p.place {
            PinPlace::Wrap(r) => {
                edits.push((r.start..r.start, "(".into()));
                edits.push((r.end..r.end, ") AND pin".into()));
            }
            PinPlace::Add(at) => edits.push((*at..*at, " WHERE pin".into())),
        }
    }
    edits.sort_by_key(|(r, _)| (r.start, r.end));
    rewrite_literals(sql, &edits).map_err(|e| format!("the proxy's edits do not fit: {e}"))
}

/// Checks one text against searchable and unsearchable rules; `exact`: the text is a splice of
/// [`SEARCH_VOCAB`] pieces as they are, so every `SECRET` in it is a value compared with the
/// searchable column (mutated texts can turn it into part of another identifier or literal).
fn check_search(s: &str, exact: bool) -> Result<(), String> {
    let (p, plain) = (searchable(), protected());
    let a = analyze(s, &p);
    // A text that names no protected table compares no encrypted column (the proxy forwards
    // it without analysis), and one that does not parse is refused by the server as a whole
    // before anything runs.
    let parses =
        sqlparser::parser::Parser::parse_sql(&sqlparser::dialect::PostgreSqlDialect {}, s).is_ok();
    if a.rejection.is_some() || !might_touch(s, &p) || !parses {
        return Ok(());
    }
    // The edits fit, and the rewritten statement never carries a value compared with the
    // column.
    let rewritten = search_rewritten(s, &a)?;
    if exact && rewritten.contains("SECRET") {
        return Err(format!("a searched value reaches the server: {rewritten}"));
    }
    // The same look-up on a column that is not searchable is refused.
    if !a.searches.is_empty() && analyze(s, &plain).rejection.is_none() {
        return Err("a look-up on an unsearchable encrypted column is accepted".into());
    }
    Ok(())
}

#[test]
fn fuzz_search_rewrites() {
    let splice = |pieces: &[usize]| -> String {
        pieces
            .iter()
            .map(|&i| SEARCH_VOCAB[i])
            .collect::<Vec<_>>()
            .join(" ")
    };
    campaign(
        "sql: look-ups on a searchable column, spliced",
        proptest::collection::vec(0..SEARCH_VOCAB.len(), 1..10),
        |pieces| check_search(&splice(&pieces), true),
    );
    campaign(
        "sql: look-ups on a searchable column, mutated",
        (
            proptest::collection::vec(0..SEARCH_VOCAB.len(), 1..8),
            proptest::collection::vec((any::<usize>(), 0u8..4, "\\PC{0,3}"), 0..4),
        ),
        |(pieces, edits)| {
            let mut s = splice(&pieces);
            for (at, op, text) in edits {
                let mut pos = at % (s.len() + 1);
                while !s.is_char_boundary(pos) {
                    pos -= 1;
                }
                match op {
                    0 => s.insert_str(pos, &text),
                    1 => s.truncate(pos),
                    2 => s.insert(pos, '\''),
                    _ => s.insert_str(pos, "$$"),
                }
            }
            check_search(&s, false)
        },
    );
}

/// Differential check of the statement split: texts built from hostile fragments (quotes,
/// backslashes, comments, dollar quotes, `E''`, `U&''`, continued literals, multibyte
/// characters whose trailing byte is `\`) run on a direct connection to the test PostgreSQL,
/// inside a transaction that is rolled back, under both `standard_conforming_strings` values and
/// several client encodings. Each statement is `SELECT n, <literal or comment> FROM <protected
/// table>`, with statements hidden in the bodies. Whenever the proxy's reading of a
/// text (decoding as the proxy does, then [`analyze`] and [`lexing_refusal`]) accepts it and the
/// server runs it without error, both must see the same number of statements: otherwise a
/// statement runs that the analyser never saw.
mod differential {
    use std::cell::RefCell;
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    use super::*;
    use pgenvelope::sql::lexing_refusal;
    use pgenvelope::wire::encoding::{ClientEncoding, EncodingError};

    type Msg = (u8, Vec<u8>);

    struct Pg {
        stream: TcpStream,
        server_sql_ascii: bool,
    }

    fn put(buf: &mut Vec<u8>, tag: u8, body: &[u8]) {
        buf.push(tag);
        buf.extend_from_slice(&u32::try_from(body.len() + 4).unwrap().to_be_bytes());
        buf.extend_from_slice(body);
    }

    fn query(buf: &mut Vec<u8>, sql: &[u8]) {
        let mut body = sql.to_vec();
        body.push(0);
        put(buf, b'Q', &body);
    }

    impl Pg {
        fn connect() -> Pg {
            let host =
                std::env::var("PGENVELOPE_TEST_PGHOST").unwrap_or_else(|_| "127.0.0.1".into());
            let port: u16 = std::env::var("PGENVELOPE_TEST_PGPORT")
                .ok()
                .and_then(|p| p.parse().ok())
                .unwrap_or(5432);
            let stream = TcpStream::connect((host.as_str(), port)).unwrap_or_else(|e| {
                panic!(
                    "the differential lexing check needs the test PostgreSQL at {host}:{port}: {e}"
                )
            });
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            let mut body = 196_608u32.to_be_bytes().to_vec();
            for (k, v) in [("user", "postgres"), ("database", "test")] {
                body.extend_from_slice(k.as_bytes());
                body.push(0);
                body.extend_from_slice(v.as_bytes());
                body.push(0);
            }
            body.push(0);
            let mut packet = u32::try_from(body.len() + 4)
                .unwrap()
                .to_be_bytes()
                .to_vec();
            packet.extend_from_slice(&body);
            let mut pg = Pg {
                stream,
                server_sql_ascii: false,
            };
            pg.stream.write_all(&packet).unwrap();
            for (tag, body) in pg.read_until_ready() {
                assert_ne!(tag, b'E', "startup failed");
                if tag == b'S' && body.starts_with(b"server_encoding\0SQL_ASCII\0") {
                    pg.server_sql_ascii = true;
                }
            }
            pg
        }

        fn read_msg(&mut self) -> Msg {
            let mut head = [0u8; 5];
            self.stream.read_exact(&mut head).unwrap();
            let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
            let mut body = vec![0u8; len - 4];
            self.stream.read_exact(&mut body).unwrap();
            (head[0], body)
        }

        fn read_until_ready(&mut self) -> Vec<Msg> {
            let mut out = Vec::new();
            loop {
                let m = self.read_msg();
                let done = m.0 == b'Z';
                out.push(m);
                if done {
                    return out;
                }
            }
        }

        /// Run simple queries in order (one write), each answer up to ReadyForQuery.
        fn run(&mut self, texts: &[&[u8]]) -> Vec<Vec<Msg>> {
            let mut buf = Vec::new();
            for t in texts {
                query(&mut buf, t);
            }
            self.stream.write_all(&buf).unwrap();
            texts.iter().map(|_| self.read_until_ready()).collect()
        }

        /// Statements the server completed for `text` (run in a rolled-back transaction), or
        /// `None` when it refused the text (syntax, encoding) or failed half-way.
        fn statements(&mut self, text: &[u8]) -> Option<usize> {
            let answers = self.run(&[b"BEGIN", text, b"ROLLBACK"]);
            let reply = &answers[1];
            if reply.iter().any(|(t, _)| *t == b'E') {
                return None;
            }
            Some(reply.iter().filter(|(t, _)| *t == b'C').count())
        }

        fn set(&mut self, setting: &str, value: &str) {
            let sql = format!("SET {setting} = '{value}'");
            let answers = self.run(&[sql.as_bytes()]);
            assert!(answers[0].iter().all(|(t, _)| *t != b'E'), "{sql} failed");
        }
    }

    /// Pieces of the bodies of literals and comments.
    const BODY: &[&[u8]] = &[
        b"a",
        b"\\",
        b"\\",
        b"'",
        b"'",
        b"''",
        b";",
        b" ; SELECT 90 FROM @ ; ",
        b" ; SELECT 91 FROM @ -- ",
        b"/*",
        b"*/",
        b"--",
        b"\n",
        b"$q$",
        b"E'",
        b"\x95\\",
        b"\xa4\\",
        b"\x81\\",
        b"\xc3\xa9",
        b"\xe9",
    ];

    /// One statement `SELECT n, <literal or comment> FROM T`: the wrapper kind and body pieces.
    type Piece = (u8, Vec<usize>);

    fn build(statements: &[Piece], table: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for (n, (kind, body)) in statements.iter().enumerate() {
            if n > 0 {
                out.extend_from_slice(if kind % 2 == 0 { b";" } else { b";\n" });
            }
            let body: Vec<u8> = body
                .iter()
                .flat_map(|&i| BODY[i].iter().copied())
                .flat_map(|b| {
                    if b == b'@' {
                        table.as_bytes().to_vec()
                    } else {
                        vec![b]
                    }
                })
                .collect();
            out.extend_from_slice(format!("SELECT {n}").as_bytes());
            let (open, close): (&[u8], &[u8]) = match kind % 8 {
                0 => (b", '", b"'"),
                1 => (b", E'", b"'"),
                2 => (b", $q$", b"$q$"),
                3 => (b", U&'", b"'"),
                4 => (b" /*", b"*/"),
                5 => (b" --", b"\n"),
                6 => (b", 'x'\n'", b"'"),
                _ => (b"", b""),
            };
            out.extend_from_slice(open);
            out.extend_from_slice(&body);
            out.extend_from_slice(close);
            out.extend_from_slice(b" FROM ");
            out.extend_from_slice(table.as_bytes());
        }
        out
    }

    /// How the proxy reads `bytes`: `None` when it refuses the text, else the statement count.
    fn proxy_reading(
        bytes: &[u8],
        encoding: &ClientEncoding,
        standard_strings: bool,
        server_sql_ascii: bool,
        p: &Protected,
    ) -> Option<usize> {
        let text = match encoding.decode(bytes) {
            Ok(t) => t.into_owned(),
            Err(EncodingError::Unsupported(_)) => encoding.lexing_view(bytes, server_sql_ascii)?,
            Err(_) => return None,
        };
        let a = analyze(&text, p);
        if a.rejection.is_some() || lexing_refusal(&a, standard_strings, false).is_some() {
            return None;
        }
        Some(a.statement_count)
    }

    /// Texts that split differently under standard_conforming_strings = off or in a multibyte
    /// encoding, checked first in every setting (`@` stands for the table).
    const KNOWN: &[&[u8]] = &[
        b"SELECT 1 FROM @; SELECT 'a\\' /* '; SELECT 2 FROM @; -- */",
        b"SELECT 'a\\' , '; SELECT 2 FROM @; --'",
        b"SELECT E'\x95\\'; SELECT 2 FROM @; --'",
        b"SELECT '\x95\\'; SELECT 2 FROM @; --'",
        b"SELECT 1 FROM @;\nSELECT 'a'\n'b\\' ; SELECT 2 FROM @; --'",
        b"SELECT E'a'\n'b\\' ; SELECT 2 FROM @; --'",
    ];

    #[test]
    fn statement_split_matches_the_server() {
        let pg = RefCell::new(Pg::connect());
        let table = format!("fzlex_{}", std::process::id());
        pg.borrow_mut().run(&[format!(
            "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id int, secret text); INSERT INTO {table} VALUES (1, NULL)"
        )
        .as_bytes()]);
        let p = Protected::new([ProtectedTable {
            schema: "public".into(),
            name: table.clone(),
            tenant_column: None,
            row_key: None,
            encrypted: vec!["secret".into()],
            searchable: Vec::new(),
        }]);
        let per_setting = (cases() / 4).max(100);
        let compared = RefCell::new(0usize);
        let mut total = 0usize;
        for scs in ["on", "off"] {
            for enc in ["UTF8", "LATIN1", "LATIN9", "GBK", "SJIS", "BIG5"] {
                {
                    let mut pg = pg.borrow_mut();
                    pg.set("standard_conforming_strings", scs);
                    pg.set("client_encoding", enc);
                }
                let encoding = ClientEncoding::from_name(enc);
                let bytewise = pg.borrow().server_sql_ascii;
                let check = |text: &[u8]| -> Result<(), String> {
                    let Some(ours) = proxy_reading(text, &encoding, scs == "on", bytewise, &p)
                    else {
                        return Ok(());
                    };
                    let Some(theirs) = pg.borrow_mut().statements(text) else {
                        return Ok(());
                    };
                    *compared.borrow_mut() += 1;
                    if ours == theirs {
                        return Ok(());
                    }
                    Err(format!(
                        "standard_conforming_strings={scs}, client_encoding={enc}: the analyser saw {ours} statement(s), the server ran {theirs}: {:?}",
                        String::from_utf8_lossy(text)
                    ))
                };
                for known in KNOWN {
                    let mut bytes = Vec::new();
                    for &b in *known {
                        if b == b'@' {
                            bytes.extend_from_slice(table.as_bytes());
                        } else {
                            bytes.push(b);
                        }
                    }
                    if let Err(e) = check(&bytes) {
                        panic!("fuzz lexing (known case): {e}");
                    }
                }
                let before = *compared.borrow();
                let mut runner = TestRunner::new(Config {
                    cases: per_setting,
                    failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
                    ..Config::default()
                });
                let result = runner.run(
                    &proptest::collection::vec(
                        (any::<u8>(), proptest::collection::vec(0..BODY.len(), 0..5)),
                        1..4,
                    ),
                    |statements| {
                        check(&build(&statements, &table))
                            .map_err(proptest::test_runner::TestCaseError::fail)
                    },
                );
                if let Err(e) = result {
                    panic!("fuzz lexing: {e}");
                }
                total += *compared.borrow() - before;
            }
        }
        pg.borrow_mut()
            .run(&[format!("DROP TABLE IF EXISTS {table}").as_bytes()]);
        eprintln!(
            "fuzz lexing: {} texts run on both sides and compared",
            total
        );
        assert!(
            total >= 12 * (per_setting as usize) / 20,
            "too few texts were accepted by both sides ({total}): the check would prove little"
        );
    }
}
