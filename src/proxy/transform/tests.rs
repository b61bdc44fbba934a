//! Unit tests of the protocol core from byte fixtures: what the proxy sends each way for a
//! sequence of client and server messages, without a server, a key store or a catalog (the
//! tests fulfil the core's needs themselves, as the connection task would).

use std::sync::Arc;

use bytes::{BufMut, BytesMut};

use super::{Need, Out, Stop, Transform};
use crate::cipher::KeyNeed;
use crate::crypto::OrgId;
use crate::keys::{CachedDek, KeyError};
use crate::proxy::catalog::TableMap;
use crate::proxy::encryption::Encryption;
use crate::proxy::metrics::StatementCounts;
use crate::proxy::pump::{Dir, Halt, Inbound};
use crate::rules::RuleSet;
use crate::wire::frontend::{self as fe, Bind, Parse};
use crate::wire::{Frame, Header};

const RULES: &str = r#"
[[table]]
name = "public.secrets"
tenant_column = "org_id"
encrypt = ["value"]
"#;

/// OID of `public.secrets`; its columns are id (1), org_id (2), name (3), value (4).
const SECRETS: u32 = 16_384;
const TEXT: u32 = 25;
const INT8: u32 = 20;

fn org(s: &str) -> OrgId {
    OrgId::new(s).unwrap()
}

/// A transform with the layer of a proxy, and the "key store" and catalog of the tests. Its
/// input buffers persist across calls, as the connection task's do.
struct Core {
    t: Transform,
    enc: Arc<Encryption>,
    client_in: Inbound,
    server_in: Inbound,
    /// DEKs made so far (the key store of these tests).
    deks: Vec<Arc<CachedDek>>,
    /// Search keys handed out, by organisation.
    search_keys: Vec<Arc<CachedDek>>,
    /// Organisations whose key fetch fails.
    failing: Vec<OrgId>,
    /// What the core asked for, in order.
    needs: Vec<Need>,
}

impl Core {
    fn new() -> Self {
        Self::with(None, None)
    }

    fn with(startup_tenant: Option<&str>, default_tenant: Option<&str>) -> Self {
        let rules = RuleSet::from_sources(&[("rules.toml", RULES)]).unwrap();
        let enc = Encryption::offline(rules, default_tenant.map(org));
        let t = Transform::new(
            "test".to_owned(),
            startup_tenant.map(org),
            Some(Arc::clone(&enc)),
            1 << 20,
            Arc::new(StatementCounts::default()),
        );
        Self {
            t,
            enc,
            client_in: Inbound::new(Dir::FromClient, BytesMut::new(), 1 << 20),
            server_in: Inbound::new(Dir::FromServer, BytesMut::new(), 1 << 20),
            deks: Vec::new(),
            search_keys: Vec::new(),
            failing: Vec::new(),
            needs: Vec::new(),
        }
    }

    /// Hand `msgs` from the client to the core; returns (to server, to client).
    fn client(&mut self, msgs: &[Vec<u8>]) -> (Vec<Msg>, Vec<Msg>) {
        self.client_in.buf.extend_from_slice(&msgs.concat());
        self.pump()
    }

    /// Hand `msgs` from the server to the core; returns (to server, to client).
    fn server(&mut self, msgs: &[Vec<u8>]) -> (Vec<Msg>, Vec<Msg>) {
        self.server_in.buf.extend_from_slice(&msgs.concat());
        self.pump()
    }

    /// What the client receives for the server's `msgs`.
    fn client_gets(&mut self, msgs: &[Vec<u8>]) -> Vec<Msg> {
        self.server(msgs).1
    }

    /// What the server receives for the client's `msgs`.
    fn server_gets(&mut self, msgs: &[Vec<u8>]) -> Vec<Msg> {
        self.client(msgs).0
    }

    /// What the connection task does with what was read: each direction until its input runs
    /// out, fetching what the core asks for, and a client message waiting for a look-up's
    /// answer handed in again once it came.
    fn pump(&mut self) -> (Vec<Msg>, Vec<Msg>) {
        let mut out = Out::default();
        for _ in 0..100 {
            let mut waits = false;
            loop {
                match self.client_in.process(&mut self.t, &mut out) {
                    Ok(()) => break,
                    Err(Halt::Need(Need::ServerAnswer)) => {
                        waits = true;
                        break;
                    }
                    Err(Halt::Need(need)) => self.fulfil(need),
                    Err(Halt::Malformed(e)) => panic!("malformed: {e}"),
                }
            }
            loop {
                match self.server_in.process(&mut self.t, &mut out) {
                    Ok(()) => break,
                    Err(Halt::Need(need)) => self.fulfil(need),
                    Err(Halt::Malformed(e)) => panic!("malformed: {e}"),
                }
            }
            if !(waits && self.t.lookup_answered()) {
                return (frames(&out.to_server), frames(&out.to_client));
            }
        }
        panic!("needs never end");
    }

    /// What the connection task does for a need.
    fn fulfil(&mut self, need: Need) {
        self.needs.push(need.clone());
        match need {
            Need::ServerAnswer => {}
            Need::Keys(keys) => {
                for key in keys {
                    self.fetch(key);
                }
            }
            Need::Table(oid) => {
                let map = (oid == SECRETS).then(|| {
                    let rules = self.enc.rules.snapshot();
                    let rule = rules.rules.table("public", "secrets").unwrap();
                    Arc::new(TableMap {
                        encrypted: [(4, rule.column("value").unwrap().clone())].into(),
                        tenant_attnum: Some(2),
                        key_attnum: None,
                    })
                });
                self.enc.catalog.insert_for_tests("test", oid, map);
            }
            Need::Columns { schema, table } => {
                let columns = ["id", "org_id", "name", "value"]
                    .map(str::to_owned)
                    .to_vec();
                self.t.provide_columns(schema, table, Ok(columns));
            }
        }
    }

    fn fetch(&mut self, key: KeyNeed) {
        let cipher = self.t.cipher_mut().unwrap();
        match &key {
            KeyNeed::Active(o) if self.failing.contains(o) => {
                let e = KeyError::ActiveKeyContention { org: o.clone() };
                cipher.fail_for_tests(key, e);
            }
            KeyNeed::Active(o) => {
                let dek = match self.deks.iter().find(|d| d.org() == o) {
                    Some(d) => Arc::clone(d),
                    None => {
                        let d = self.enc.keys().dek_for_tests(o);
                        self.deks.push(Arc::clone(&d));
                        d
                    }
                };
                cipher.insert_for_tests(dek, true);
            }
            KeyNeed::ById(id) => match self.deks.iter().find(|d| d.dek_id() == *id) {
                Some(d) => cipher.insert_for_tests(Arc::clone(d), false),
                None => cipher.fail_for_tests(key.clone(), KeyError::UnknownDek(*id)),
            },
            KeyNeed::Search(o) => {
                let key = match self.search_keys.iter().find(|d| d.org() == o) {
                    Some(d) => Arc::clone(d),
                    None => {
                        let d = self.enc.keys().dek_for_tests(o);
                        self.search_keys.push(Arc::clone(&d));
                        d
                    }
                };
                cipher.insert_search_for_tests(key);
            }
        }
    }

    /// The value `plaintext` of `public.secrets.value`, sealed for `org` as the proxy would
    /// seal it in an INSERT.
    fn sealed(&mut self, for_org: &str, plaintext: &str) -> String {
        let sent = self.server_gets(&[query(&format!(
            "INSERT INTO secrets (org_id, name, value) VALUES ('{for_org}', 'k', '{plaintext}')"
        ))]);
        self.client_gets(&[command_complete("INSERT 0 1"), ready(b'I')]);
        let text = sent[0].text();
        let start = text.find("enc:v1:").unwrap();
        let end = start + text[start..].find('\'').unwrap();
        text[start..end].to_owned()
    }

    fn tenant(&self) -> Option<OrgId> {
        self.t.session.tenant.effective()
    }
}

/// A message the core sent: tag and body.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Msg {
    tag: u8,
    body: Vec<u8>,
}

impl Msg {
    /// The body as (lossy) text, for searching.
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The whole message, as sent.
    fn raw(&self) -> Vec<u8> {
        let mut m = vec![self.tag];
        m.extend_from_slice(&u32::try_from(self.body.len() + 4).unwrap().to_be_bytes());
        m.extend_from_slice(&self.body);
        m
    }

    /// A field of an ErrorResponse.
    fn field(&self, code: u8) -> Option<String> {
        crate::wire::backend::ErrorFields::find(&self.body, code)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// The values of a DataRow.
    fn values(&self) -> Vec<Option<String>> {
        let row = crate::wire::backend::DataRow::parse(&self.body).unwrap();
        (0..row.len())
            .map(|i| {
                row.get(i)
                    .unwrap()
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            })
            .collect()
    }
}

fn frames(mut bytes: &[u8]) -> Vec<Msg> {
    let mut out = Vec::new();
    while let Some(h) = Header::scan(bytes, usize::MAX).unwrap() {
        let len = h.frame_len();
        out.push(Msg {
            tag: h.tag(),
            body: bytes[5..len].to_vec(),
        });
        bytes = &bytes[len..];
    }
    assert!(bytes.is_empty(), "a partial message was sent");
    out
}

fn tags(msgs: &[Msg]) -> String {
    msgs.iter().map(|m| char::from(m.tag)).collect()
}

fn message(tag: u8, f: impl FnOnce(&mut BytesMut)) -> Vec<u8> {
    let mut out = BytesMut::new();
    crate::wire::put_message(&mut out, tag, f).unwrap();
    out.to_vec()
}

fn cstr(b: &mut BytesMut, s: &str) {
    b.put_slice(s.as_bytes());
    b.put_u8(0);
}

// Client messages.

fn query(sql: &str) -> Vec<u8> {
    let mut out = BytesMut::new();
    fe::put_query(&mut out, sql.as_bytes()).unwrap();
    out.to_vec()
}

fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut out = BytesMut::new();
    Parse {
        name: name.as_bytes(),
        sql: sql.as_bytes(),
        param_types: Vec::new(),
    }
    .encode(&mut out)
    .unwrap();
    out.to_vec()
}

fn bind(portal: &str, statement: &str, params: &[Option<&str>]) -> Vec<u8> {
    let values: Vec<Option<&[u8]>> = params.iter().map(|p| p.map(str::as_bytes)).collect();
    let mut out = BytesMut::new();
    Bind {
        portal: portal.as_bytes(),
        statement: statement.as_bytes(),
        param_formats: Vec::new(),
        params: values.clone(),
        result_formats: Vec::new(),
    }
    .encode_with(&values, &mut out)
    .unwrap();
    out.to_vec()
}

fn describe_portal(name: &str) -> Vec<u8> {
    let mut out = BytesMut::new();
    fe::put_describe(&mut out, fe::Target::Portal, name.as_bytes()).unwrap();
    out.to_vec()
}

fn execute(portal: &str) -> Vec<u8> {
    message(fe::EXECUTE_TAG, |b| {
        cstr(b, portal);
        b.put_i32(0);
    })
}

fn close_statement(name: &str) -> Vec<u8> {
    message(fe::CLOSE_TAG, |b| {
        b.put_u8(b'S');
        cstr(b, name);
    })
}

fn sync() -> Vec<u8> {
    message(fe::SYNC_TAG, |_| {})
}

fn copy_data(data: &str) -> Vec<u8> {
    message(fe::COPY_DATA_TAG, |b| b.put_slice(data.as_bytes()))
}

fn copy_done() -> Vec<u8> {
    message(fe::COPY_DONE_TAG, |_| {})
}

// Server messages.

fn parse_complete() -> Vec<u8> {
    message(b'1', |_| {})
}

fn bind_complete() -> Vec<u8> {
    message(b'2', |_| {})
}

fn close_complete() -> Vec<u8> {
    message(b'3', |_| {})
}

fn ready(status: u8) -> Vec<u8> {
    message(b'Z', |b| b.put_u8(status))
}

fn command_complete(tag: &str) -> Vec<u8> {
    message(b'C', |b| cstr(b, tag))
}

/// A RowDescription of (name, table OID, attnum, type OID) columns, text format.
fn row_description(columns: &[(&str, u32, i16, u32)]) -> Vec<u8> {
    message(b'T', |b| {
        b.put_i16(i16::try_from(columns.len()).unwrap());
        for (name, table, attnum, ty) in columns {
            cstr(b, name);
            b.put_u32(*table);
            b.put_i16(*attnum);
            b.put_u32(*ty);
            b.put_i16(-1);
            b.put_i32(-1);
            b.put_i16(0);
        }
    })
}

/// `org_id, value` of `public.secrets`.
fn secrets_columns() -> Vec<u8> {
    row_description(&[("org_id", SECRETS, 2, TEXT), ("value", SECRETS, 4, TEXT)])
}

fn data_row(values: &[Option<&str>]) -> Vec<u8> {
    message(b'D', |b| {
        b.put_i16(i16::try_from(values.len()).unwrap());
        for v in values {
            match v {
                None => b.put_i32(-1),
                Some(v) => {
                    b.put_i32(i32::try_from(v.len()).unwrap());
                    b.put_slice(v.as_bytes());
                }
            }
        }
    })
}

fn error(code: &str, text: &str, fields: &[(u8, &str)]) -> Vec<u8> {
    message(b'E', |b| {
        for (k, v) in [(b'S', "ERROR"), (b'C', code), (b'M', text)]
            .into_iter()
            .chain(fields.iter().copied())
        {
            b.put_u8(k);
            cstr(b, v);
        }
        b.put_u8(0);
    })
}

fn copy_response(tag: u8, columns: i16) -> Vec<u8> {
    message(tag, |b| {
        b.put_i8(0);
        b.put_i16(columns);
        for _ in 0..columns {
            b.put_i16(0);
        }
    })
}

const INSERT: &str = "INSERT INTO secrets (org_id, name, value) VALUES ($1, $2, $3)";

#[test]
fn statements_that_touch_no_protected_table_pass_byte_exact() {
    let mut core = Core::new();
    // (An Execute the client did not Describe gets a Describe injected: see below.)
    let msgs = [
        query("SELECT 1"),
        parse("s", "SELECT $1::int"),
        bind("", "s", &[Some("7")]),
        describe_portal(""),
        execute(""),
        sync(),
    ];
    let sent = core.server_gets(&msgs);
    assert_eq!(
        sent.iter().flat_map(Msg::raw).collect::<Vec<_>>(),
        msgs.concat()
    );
    let rows = [
        row_description(&[("x", 0, 0, INT8)]),
        data_row(&[Some("1")]),
        command_complete("SELECT 1"),
        ready(b'I'),
    ];
    let got = core.client_gets(&rows);
    assert_eq!(
        got.iter().flat_map(Msg::raw).collect::<Vec<_>>(),
        rows.concat()
    );
    assert!(core.needs.is_empty());
}

#[test]
fn a_literal_is_sealed_once_its_key_is_fetched() {
    let mut core = Core::new();
    let sent = core.server_gets(&[query(
        "INSERT INTO secrets (org_id, name, value) VALUES ('acme', 'k', 'hunter2')",
    )]);
    assert_eq!(core.needs, [Need::Keys(vec![KeyNeed::Active(org("acme"))])]);
    assert_eq!(tags(&sent), "Q");
    let text = sent[0].text();
    assert!(text.contains("'enc:v1:"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    // The key is at hand from now on.
    core.sealed("acme", "again");
    assert_eq!(core.needs.len(), 1);
}

#[test]
fn a_need_leaves_no_trace_until_the_message_is_handled() {
    let mut core = Core::new();
    let msg = Frame::from_raw(bind_on_insert("acme").into()).unwrap();
    core.server_gets(&[parse("s", INSERT), sync()]);
    core.client_gets(&[parse_complete(), ready(b'I')]);
    let queued = core.t.session.queue.len();
    let mut out = Out::default();
    let stop = core.t.on_client(&msg, &mut out);
    assert!(matches!(stop, Err(Stop::Need(Need::Keys(_)))));
    assert!(out.to_server.is_empty() && out.to_client.is_empty());
    assert_eq!(core.t.session.queue.len(), queued, "nothing queued");
    core.fetch(KeyNeed::Active(org("acme")));
    core.t.on_client(&msg, &mut out).unwrap();
    let sent = frames(&out.to_server);
    assert_eq!(tags(&sent), "B");
    assert!(sent[0].text().contains("enc:v1:"));
    assert!(!sent[0].text().contains("hunter2"));
    assert_eq!(core.t.session.queue.len(), queued + 1);
}

fn bind_on_insert(tenant: &str) -> Vec<u8> {
    bind("", "s", &[Some(tenant), Some("k"), Some("hunter2")])
}

#[test]
fn a_value_is_decrypted_and_must_belong_to_its_row() {
    let mut core = Core::new();
    let sealed = core.sealed("acme", "hunter2");
    core.server_gets(&[query("SELECT org_id, value FROM secrets")]);
    let got = core.client_gets(&[
        secrets_columns(),
        data_row(&[Some("acme"), Some(&sealed)]),
        // The same value moved into another organisation's row.
        data_row(&[Some("globex"), Some(&sealed)]),
        data_row(&[Some("acme"), Some(&sealed)]),
        command_complete("SELECT 3"),
        ready(b'I'),
    ]);
    assert!(core.needs.contains(&Need::Table(SECRETS)));
    assert_eq!(
        tags(&got),
        "TDEZ",
        "the rest of the result is dropped after the error"
    );
    assert_eq!(
        got[1].values(),
        [Some("acme".into()), Some("hunter2".into())]
    );
    assert_eq!(got[2].field(b'C').as_deref(), Some("XX001"));
    let text = got[2].field(b'M').unwrap();
    assert!(text.starts_with("pgenvelope: "), "{text}");
    assert!(!text.contains("hunter2"));
}

#[test]
fn a_refused_simple_query_becomes_the_servers_error() {
    let mut core = Core::new();
    let sent = core.server_gets(&[query("SELECT value FROM secrets ORDER BY value")]);
    assert_eq!(tags(&sent), "Q");
    let text = sent[0].text();
    assert!(text.starts_with("DO $pgenvelope$"), "{text}");
    assert!(text.contains("'0A000'"), "{text}");
    assert_eq!(core.enc.refusals().total(), 1);
    // The server raises it inside a DO block: its PL/pgSQL context is dropped.
    let got = core.client_gets(&[
        error(
            "0A000",
            "pgenvelope: ORDER BY on encrypted column public.secrets.value is not supported",
            &[
                (b'W', "PL/pgSQL function inline_code_block line 1 at RAISE"),
                (b'F', "pl_exec.c"),
            ],
        ),
        ready(b'I'),
    ]);
    assert_eq!(tags(&got), "EZ");
    assert_eq!(got[0].field(b'W'), None);
    assert_eq!(got[0].field(b'F'), None);
    assert_eq!(got[0].field(b'C').as_deref(), Some("0A000"));
}

#[test]
fn a_refusal_in_a_pipeline_skips_to_sync_like_the_server() {
    let mut core = Core::new();
    let sent = core.server_gets(&[
        parse("", "SELECT 1"),
        bind("", "", &[]),
        execute(""),
        parse("", "SELECT value FROM secrets ORDER BY value"),
        bind("", "", &[]),
        execute(""),
        sync(),
    ]);
    // The refused Parse is replaced by the refusal (Close, Parse, Bind, Execute of a DO
    // block); the client's Bind and Execute after it are dropped; Sync goes.
    assert_eq!(tags(&sent), "PBDECPBES");
    assert!(sent[5].text().contains("__pgenvelope_reject"));
    assert!(sent[5].text().contains("DO $pgenvelope$"));
    let got = core.client_gets(&[
        parse_complete(),
        bind_complete(),
        row_description(&[("x", 0, 0, INT8)]),
        data_row(&[Some("1")]),
        command_complete("SELECT 1"),
        close_complete(),
        parse_complete(),
        bind_complete(),
        error(
            "0A000",
            "pgenvelope: refused",
            &[(b'W', "inline_code_block")],
        ),
        ready(b'E'),
    ]);
    // The answers to the refusal's own Close, Parse and Bind are swallowed.
    assert_eq!(tags(&got), "12DCEZ");
    assert!(core.t.session.queue.is_empty());
    assert!(!core.t.session.skipping);
}

#[test]
fn after_a_server_error_the_core_skips_what_the_server_skips() {
    let mut core = Core::new();
    core.server_gets(&[parse("s", INSERT), bind_on_insert("acme"), execute("")]);
    // The Parse fails before the client's Sync was sent.
    let got = core.client_gets(&[error("42P01", "relation does not exist", &[])]);
    assert_eq!(tags(&got), "E");
    assert!(core.t.session.skipping);
    // Until Sync, nothing reaches the server (a Query included, as the server ignores it).
    let sent = core.server_gets(&[query("SELECT 2"), bind_on_insert("acme"), sync()]);
    assert_eq!(tags(&sent), "S");
    core.client_gets(&[ready(b'I')]);
    assert!(core.t.session.queue.is_empty());
    assert!(
        core.t.session.statements.is_empty(),
        "the failed Parse defined nothing"
    );
}

#[test]
fn statements_change_only_when_the_server_confirms() {
    let mut core = Core::new();
    core.server_gets(&[parse("s", "SELECT $1::text"), sync()]);
    core.client_gets(&[parse_complete(), ready(b'I')]);
    // A redefinition of `s` as a write is still unanswered: a Bind of `s` now could use
    // either, so it is refused rather than guessed.
    core.server_gets(&[parse("s", INSERT), sync()]);
    let sent = core.server_gets(&[bind_on_insert("acme")]);
    assert_eq!(tags(&sent), "CPBE", "refused");
    assert!(sent[1].text().contains("redefined or closed"));
    core.client_gets(&[parse_complete(), ready(b'I')]);
    core.client_gets(&[close_complete(), parse_complete(), bind_complete()]);
    core.client_gets(&[error("0A000", "pgenvelope: x", &[])]);
    core.server_gets(&[sync()]);
    core.client_gets(&[ready(b'I')]);
    // Confirmed: the write's parameters are sealed.
    let sent = core.server_gets(&[bind_on_insert("acme"), execute(""), sync()]);
    assert_eq!(tags(&sent), "BDES", "with a Describe injected for the rows");
    assert!(sent[0].text().contains("enc:v1:"));
    assert!(!sent[0].text().contains("hunter2"));
    // A Close takes effect when confirmed too.
    core.server_gets(&[close_statement("s"), sync()]);
    assert!(core.t.session.statements.contains_key(&b"s"[..]));
    core.client_gets(&[
        bind_complete(),
        message(b'n', |_| {}),
        command_complete("INSERT 0 1"),
        ready(b'I'),
        close_complete(),
        ready(b'I'),
    ]);
    assert!(!core.t.session.statements.contains_key(&b"s"[..]));
}

#[test]
fn a_tenant_change_takes_effect_when_its_portal_runs() {
    let mut core = Core::new();
    core.server_gets(&[
        parse("", "SELECT set_config('pgenvelope.tenant', $1, false)"),
        bind("", "", &[Some("acme")]),
    ]);
    assert_eq!(core.tenant(), None, "bound, not run");
    core.server_gets(&[execute(""), sync()]);
    assert_eq!(core.tenant(), Some(org("acme")));
    // A write in the same pipeline is sealed for it.
    core.server_gets(&[parse(
        "w",
        "INSERT INTO secrets (name, value) VALUES ($1, $2)",
    )]);
    core.server_gets(&[bind("", "w", &[Some("k"), Some("v")])]);
    assert!(core
        .needs
        .contains(&Need::Keys(vec![KeyNeed::Active(org("acme"))])));
}

#[test]
fn rolling_back_to_a_savepoint_restores_the_tenant() {
    let mut core = Core::new();
    let step = |core: &mut Core, sql: &str, tag: &str, status: u8| {
        core.server_gets(&[query(sql)]);
        core.client_gets(&[command_complete(tag), ready(status)]);
    };
    step(&mut core, "BEGIN", "BEGIN", b'T');
    step(&mut core, "SET pgenvelope.tenant = 'a'", "SET", b'T');
    step(&mut core, "SAVEPOINT s1", "SAVEPOINT", b'T');
    step(&mut core, "SET pgenvelope.tenant = 'b'", "SET", b'T');
    assert_eq!(core.tenant(), Some(org("b")));
    step(&mut core, "ROLLBACK TO SAVEPOINT s1", "ROLLBACK", b'T');
    assert_eq!(core.tenant(), Some(org("a")));
    step(&mut core, "COMMIT", "COMMIT", b'I');
    assert_eq!(core.tenant(), Some(org("a")));
    // A transaction that rolls back undoes its SET.
    step(&mut core, "BEGIN", "BEGIN", b'T');
    step(&mut core, "SET pgenvelope.tenant = 'c'", "SET", b'T');
    step(&mut core, "ROLLBACK", "ROLLBACK", b'I');
    assert_eq!(core.tenant(), Some(org("a")));
}

#[test]
fn rows_are_read_under_the_tenant_their_query_was_sent_under() {
    let mut core = Core::with(Some("acme"), None);
    let sealed = core.sealed("acme", "hunter2");
    // A SET pipelined after the SELECT does not apply to the SELECT's rows.
    core.server_gets(&[query("SELECT org_id, value FROM secrets")]);
    core.server_gets(&[query("SET pgenvelope.tenant = 'globex'")]);
    let got = core.client_gets(&[
        secrets_columns(),
        data_row(&[Some("acme"), Some(&sealed)]),
        command_complete("SELECT 1"),
        ready(b'I'),
    ]);
    assert_eq!(tags(&got), "TDCZ");
    assert_eq!(got[1].values()[1].as_deref(), Some("hunter2"));
    core.client_gets(&[command_complete("SET"), ready(b'I')]);
    // Under globex, acme's value is refused.
    core.server_gets(&[query("SELECT org_id, value FROM secrets")]);
    let got = core.client_gets(&[
        secrets_columns(),
        data_row(&[Some("acme"), Some(&sealed)]),
        command_complete("SELECT 1"),
        ready(b'I'),
    ]);
    assert_eq!(tags(&got), "TEZ");
    assert_eq!(got[1].field(b'C').as_deref(), Some("42501"));
}

#[test]
fn copy_in_rows_are_sealed_and_copy_out_rows_opened() {
    let mut core = Core::new();
    // No column list: the column names are looked up.
    core.server_gets(&[query("COPY secrets FROM STDIN")]);
    assert!(core.needs.iter().any(|n| matches!(n, Need::Columns { .. })));
    core.client_gets(&[copy_response(b'G', 4)]);
    let sent = core.server_gets(&[
        copy_data("1\tacme\tk\thunter2\n2\tglobex\tk\tswordfish\n"),
        copy_done(),
    ]);
    assert_eq!(tags(&sent), "dc");
    let rows = sent[0].text();
    assert!(
        !rows.contains("hunter2") && !rows.contains("swordfish"),
        "{rows}"
    );
    assert_eq!(rows.matches("enc:v1:").count(), 2, "{rows}");
    core.client_gets(&[command_complete("COPY 2"), ready(b'I')]);

    let copied: Vec<&str> = rows.lines().collect();
    core.server_gets(&[query("COPY secrets (id, org_id, name, value) TO STDOUT")]);
    let got = core.client_gets(&[
        copy_response(b'H', 4),
        copy_data(&format!("{}\n{}\n", copied[0], copied[1])),
        copy_done(),
        command_complete("COPY 2"),
        ready(b'I'),
    ]);
    assert_eq!(tags(&got), "HdcCZ");
    assert_eq!(
        got[1].text(),
        "1\tacme\tk\thunter2\n2\tglobex\tk\tswordfish\n"
    );
}

#[test]
fn a_refused_copy_row_fails_the_copy_with_the_proxys_code() {
    let mut core = Core::new();
    core.server_gets(&[query("COPY secrets (org_id, name, value) FROM STDIN")]);
    core.client_gets(&[copy_response(b'G', 3)]);
    // No tenant for the row: the COPY is failed, the client's later data dropped.
    let sent = core.server_gets(&[
        copy_data("\\N\tk\tv\n"),
        copy_data("a\tk\tv\n"),
        copy_done(),
    ]);
    assert_eq!(tags(&sent), "f");
    let got = core.client_gets(&[
        error(
            "57014",
            "COPY from stdin failed: pgenvelope: no tenant",
            &[(b'F', "copy.c")],
        ),
        ready(b'I'),
    ]);
    assert_eq!(got[0].field(b'C').as_deref(), Some("42501"));
    assert_eq!(got[0].field(b'F'), None);
}

#[test]
fn an_execute_without_describe_gets_one_and_its_answer_is_swallowed() {
    let mut core = Core::new();
    let sealed = core.sealed("acme", "hunter2");
    let sent = core.server_gets(&[
        parse("", "SELECT org_id, value FROM secrets"),
        bind("", "", &[]),
        execute(""),
        sync(),
    ]);
    assert_eq!(tags(&sent), "PBDES");
    let got = core.client_gets(&[
        parse_complete(),
        bind_complete(),
        secrets_columns(),
        data_row(&[Some("acme"), Some(&sealed)]),
        command_complete("SELECT 1"),
        ready(b'I'),
    ]);
    assert_eq!(tags(&got), "12DCZ");
    assert_eq!(got[2].values()[1].as_deref(), Some("hunter2"));
    // Described by the client: its Describe is answered as usual.
    let sent = core.server_gets(&[
        parse("", "SELECT org_id, value FROM secrets"),
        bind("", "", &[]),
        describe_portal(""),
        execute(""),
        sync(),
    ]);
    assert_eq!(tags(&sent), "PBDES");
    let got = core.client_gets(&[
        parse_complete(),
        bind_complete(),
        secrets_columns(),
        data_row(&[Some("acme"), Some(&sealed)]),
        command_complete("SELECT 1"),
        ready(b'I'),
    ]);
    assert_eq!(tags(&got), "12TDCZ");
}

#[test]
fn a_key_that_cannot_be_fetched_refuses_the_statement_with_58000() {
    let mut core = Core::new();
    core.failing.push(org("acme"));
    let sent = core.server_gets(&[query(
        "INSERT INTO secrets (org_id, name, value) VALUES ('acme', 'k', 'hunter2')",
    )]);
    let text = sent[0].text();
    assert!(text.starts_with("DO $pgenvelope$"), "{text}");
    assert!(text.contains("'58000'"), "{text}");
    assert!(!text.contains("hunter2"));
    // The failure is reported once: the next statement asks again.
    core.failing.clear();
    core.sealed("acme", "later");
}

#[test]
fn a_write_without_any_tenant_is_refused_and_one_with_a_default_is_sealed() {
    let mut core = Core::new();
    let sent = core.server_gets(&[query("INSERT INTO secrets (name, value) VALUES ('k', 'v')")]);
    assert!(sent[0].text().contains("'42501'"), "{}", sent[0].text());
    let mut core = Core::with(None, Some("acme"));
    let sent = core.server_gets(&[query("INSERT INTO secrets (name, value) VALUES ('k', 'v')")]);
    assert!(sent[0].text().contains("enc:v1:"));
    assert_eq!(core.needs, [Need::Keys(vec![KeyNeed::Active(org("acme"))])]);
}

#[test]
fn idle_follows_cycles_and_transactions() {
    let mut core = Core::new();
    assert!(
        !core.t.is_idle(),
        "the startup exchange is not answered yet"
    );
    core.client_gets(&[ready(b'I')]);
    assert!(core.t.is_idle());
    core.server_gets(&[query("BEGIN")]);
    assert!(!core.t.is_idle());
    core.client_gets(&[command_complete("BEGIN"), ready(b'T')]);
    assert!(!core.t.is_idle(), "inside a transaction");
    core.server_gets(&[query("COMMIT")]);
    core.client_gets(&[command_complete("COMMIT"), ready(b'I')]);
    assert!(core.t.is_idle());
}

#[test]
fn decoded_messages_are_checked() {
    let mut core = Core::new();
    let mut inbound = Inbound::new(
        Dir::FromClient,
        BytesMut::from(&b"P\0\0\0\x05x"[..]),
        1 << 20,
    );
    let mut out = Out::default();
    assert!(matches!(
        inbound.process(&mut core.t, &mut out),
        Err(Halt::Malformed(_))
    ));
}

#[test]
fn an_update_by_primary_key_is_pinned_to_the_session_tenant() {
    let mut core = Core::with(Some("acme"), None);
    let sent = core.server_gets(&[query(
        "UPDATE secrets SET value = 'vip' WHERE secrets.id = 1",
    )]);
    let text = sent[0].text();
    assert!(
        text.contains(
            r#"WHERE (secrets.id = 1) AND "secrets"."org_id" = $pgenvelope$acme$pgenvelope$"#
        ),
        "{text}"
    );
    assert!(!text.contains("vip"), "{text}");
    core.client_gets(&[command_complete("UPDATE 1"), ready(b'I')]);

    // Prepared: the tenant is a parameter of the proxy's own, filled in at each Bind with the
    // tenant in force then, and hidden from the client's view of the statement.
    let sent = core.server_gets(&[
        parse("u", "UPDATE secrets SET value = $1 WHERE secrets.id = $2"),
        message(fe::DESCRIBE_TAG, |b| {
            b.put_u8(b'S');
            cstr(b, "u");
        }),
        sync(),
    ]);
    assert!(
        sent[0].text().contains(r#"AND "secrets"."org_id" = $3"#),
        "{}",
        sent[0].text()
    );
    let got = core.client_gets(&[
        parse_complete(),
        message(b't', |b| {
            b.put_i16(3);
            for t in [TEXT, INT8, TEXT] {
                b.put_u32(t);
            }
        }),
        message(b'n', |_| {}),
        ready(b'I'),
    ]);
    assert_eq!(tags(&got), "1tnZ");
    assert_eq!(
        &got[1].body[..2],
        &2_i16.to_be_bytes(),
        "two parameters, as the client wrote"
    );
    let bound = |core: &mut Core| {
        let sent = core.server_gets(&[
            bind("", "u", &[Some("hunter2"), Some("1")]),
            execute(""),
            sync(),
        ]);
        let b = crate::wire::frontend::Bind::decode(&sent[0].body).unwrap();
        assert_eq!(b.params.len(), 3);
        assert!(String::from_utf8_lossy(b.params[0].unwrap()).starts_with("enc:v1:"));
        core.client_gets(&[bind_complete(), command_complete("UPDATE 1"), ready(b'I')]);
        String::from_utf8_lossy(b.params[2].unwrap()).into_owned()
    };
    assert_eq!(bound(&mut core), "acme");
    core.server_gets(&[query("SET pgenvelope.tenant = 'globex'")]);
    core.client_gets(&[command_complete("SET"), ready(b'I')]);
    assert_eq!(
        bound(&mut core),
        "globex",
        "the same statement, bound under another tenant"
    );
    // A Bind with another number of parameters than the statement takes is refused.
    let sent = core.server_gets(&[bind("", "u", &[Some("x")])]);
    assert_eq!(tags(&sent), "CPBE");
    assert!(sent[1].text().contains("08P01"));
}

#[test]
fn without_any_tenant_the_rows_organisation_is_looked_up_first() {
    let mut core = Core::new();
    let update = || query(r#"UPDATE "secrets" SET "value" = 'vip' WHERE "secrets"."id" = 1"#);
    // The UPDATE waits; a look-up on the same session goes first.
    let sent = core.server_gets(&[update()]);
    assert_eq!(tags(&sent), "Q");
    assert_eq!(
        sent[0].text(),
        "SELECT DISTINCT (\"secrets\".\"org_id\")::text FROM \"secrets\" WHERE \"secrets\".\"id\" = 1 LIMIT 2\0"
    );
    // Its answer is the proxy's; then the UPDATE goes, sealed for the row's organisation and
    // pinned to it.
    let (sent, got) = core.server(&[
        row_description(&[("org_id", 0, 0, TEXT)]),
        data_row(&[Some("acme")]),
        command_complete("SELECT 1"),
        ready(b'I'),
    ]);
    assert!(
        got.is_empty(),
        "the look-up's answer is not the client's: {got:?}"
    );
    let text = sent[0].text();
    assert!(text.contains("enc:v1:") && !text.contains("vip"), "{text}");
    assert!(
        text.contains(r#"AND "secrets"."org_id" = $pgenvelope$acme$pgenvelope$"#),
        "{text}"
    );
    assert!(core
        .needs
        .contains(&Need::Keys(vec![KeyNeed::Active(org("acme"))])));
    let got = core.client_gets(&[command_complete("UPDATE 1"), ready(b'I')]);
    assert_eq!(tags(&got), "CZ");

    // No row matches: nothing is sealed, and the UPDATE matches nothing.
    core.server_gets(&[update()]);
    let (sent, _) = core.server(&[command_complete("SELECT 0"), ready(b'I')]);
    let text = sent[0].text();
    assert!(
        text.contains(r#"SET "value" = NULL"#) && text.contains("= NULL"),
        "{text}"
    );
    core.client_gets(&[command_complete("UPDATE 0"), ready(b'I')]);

    // Rows of several organisations: refused.
    core.server_gets(&[update()]);
    let (sent, _) = core.server(&[
        data_row(&[Some("acme")]),
        data_row(&[Some("globex")]),
        command_complete("SELECT 2"),
        ready(b'I'),
    ]);
    assert!(sent[0].text().contains("'42501'"), "{}", sent[0].text());
    core.client_gets(&[error("42501", "pgenvelope: x", &[]), ready(b'I')]);

    // The look-up fails: its error answers the client's statement, which is never sent.
    core.server_gets(&[update()]);
    let (sent, got) = core.server(&[error("42703", "column does not exist", &[]), ready(b'I')]);
    assert!(sent.is_empty());
    assert_eq!(tags(&got), "EZ");
    assert!(core.t.session.queue.is_empty());

    // Prepared: the look-up is a statement of its own, with the Bind's values written in.
    let sent = core.server_gets(&[
        parse("u", "UPDATE secrets SET value = $1 WHERE secrets.id = $2"),
        bind("", "u", &[Some("hunter2"), Some("7")]),
        execute(""),
        sync(),
    ]);
    assert_eq!(
        tags(&sent),
        "PCPCBECH",
        "Parse, then the look-up (the Bind waits)"
    );
    assert!(
        sent[2]
            .text()
            .contains("WHERE secrets.id = $pgenvelope$7$pgenvelope$ LIMIT 2"),
        "{}",
        sent[2].text()
    );
    let (sent, got) = core.server(&[
        parse_complete(),
        close_complete(),
        parse_complete(),
        close_complete(),
        bind_complete(),
        data_row(&[Some("acme")]),
        command_complete("SELECT 1"),
        close_complete(),
    ]);
    assert_eq!(tags(&got), "1", "only the client's own ParseComplete");
    assert_eq!(
        tags(&sent),
        "BDES",
        "then the Bind, sealed, and the rest of the pipeline"
    );
    let b = crate::wire::frontend::Bind::decode(&sent[0].body).unwrap();
    assert!(String::from_utf8_lossy(b.params[0].unwrap()).starts_with("enc:v1:"));
    assert_eq!(
        b.params[2],
        Some(&b"acme"[..]),
        "pinned to the looked-up organisation"
    );
    let got = core.client_gets(&[
        bind_complete(),
        message(b'n', |_| {}),
        command_complete("UPDATE 1"),
        ready(b'I'),
    ]);
    assert_eq!(tags(&got), "2CZ");
}

#[test]
fn under_a_session_tenant_rows_of_other_organisations_are_not_written() {
    let mut core = Core::with(Some("acme"), None);
    let sent = core.server_gets(&[query(
        "INSERT INTO secrets (org_id, name, value) VALUES ('globex', 'k', 'v')",
    )]);
    assert!(sent[0].text().contains("'42501'"), "{}", sent[0].text());
    core.client_gets(&[error("42501", "pgenvelope: x", &[]), ready(b'I')]);
    core.server_gets(&[query("COPY secrets (org_id, name, value) FROM STDIN")]);
    core.client_gets(&[copy_response(b'G', 3)]);
    let sent = core.server_gets(&[copy_data("acme\tk\tv\nglobex\tk\tv\n")]);
    assert_eq!(tags(&sent), "f", "the whole COPY fails");
    // Its own rows are written.
    core.client_gets(&[
        error("57014", "COPY from stdin failed: pgenvelope: x", &[]),
        ready(b'I'),
    ]);
    let sent = core.server_gets(&[query(
        "INSERT INTO secrets (org_id, name, value) VALUES ('acme', 'k', 'v')",
    )]);
    assert!(sent[0].text().contains("enc:v1:"));
}

#[test]
fn bulk_create_arrays_are_sealed_element_by_element() {
    // Client-side binding: literals.
    let mut core = Core::new();
    let sent = core.server_gets(&[query(
        r#"INSERT INTO "secrets" ("org_id", "name", "value") SELECT * FROM UNNEST(('{acme,globex,acme}')::text[], ('{a,b,c}')::text[], ('{hunter2,NULL,"swordfish pw"}')::text[])"#,
    )]);
    let text = sent[0].text();
    assert!(
        !text.contains("hunter2") && !text.contains("swordfish"),
        "{text}"
    );
    let start = text.find("('{enc:v1:").unwrap() + 2;
    let end = start + text[start..].find('\'').unwrap();
    let sealed = crate::wire::array::parse_text(&text[start..end]).unwrap();
    assert_eq!(sealed.len(), 3);
    assert!(sealed[1].is_none());
    // Each element is its own row's: read back with its row's tenant.
    core.client_gets(&[command_complete("INSERT 0 3"), ready(b'I')]);
    core.server_gets(&[query("SELECT org_id, value FROM secrets")]);
    let got = core.client_gets(&[
        secrets_columns(),
        data_row(&[Some("acme"), sealed[0].as_deref()]),
        data_row(&[Some("acme"), sealed[2].as_deref()]),
        command_complete("SELECT 2"),
        ready(b'I'),
    ]);
    assert_eq!(got[1].values()[1].as_deref(), Some("hunter2"));
    assert_eq!(got[2].values()[1].as_deref(), Some("swordfish pw"));

    // Server-side binding: text and binary array parameters.
    let sent = core.server_gets(&[
        parse("", r#"INSERT INTO "secrets" ("org_id", "value") SELECT * FROM UNNEST(($1)::text[], ($2)::text[])"#),
        bind("", "", &[Some("{acme,globex}"), Some("{hunter2,swordfish}")]),
    ]);
    let b = crate::wire::frontend::Bind::decode(&sent[1].body).unwrap();
    let values = String::from_utf8_lossy(b.params[1].unwrap()).into_owned();
    assert!(!values.contains("hunter2"), "{values}");
    assert_eq!(crate::wire::array::parse_text(&values).unwrap().len(), 2);
    // Rows of the arrays must pair up.
    let sent = core.server_gets(&[
        sync(),
        parse("", r#"INSERT INTO "secrets" ("org_id", "value") SELECT * FROM UNNEST(($1)::text[], ($2)::text[])"#),
        bind("", "", &[Some("{acme}"), Some("{hunter2,swordfish}")]),
    ]);
    assert_eq!(tags(&sent), "SPCPBE");
    assert!(sent[3].text().contains("different lengths"));
}
