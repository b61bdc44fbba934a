//! Looking up, on the same server session, the organisation of the rows an UPDATE writes when
//! no tenant is known (no session tenant, no default tenant, no tenant in its WHERE): the
//! unit-of-work write of an ORM in an application that keeps the organisation in a column.
//!
//! ```text
//!  client: UPDATE t SET email = $1 WHERE t.id = $2       (parked: not forwarded yet)
//!  proxy:  SELECT DISTINCT (t.org_id)::text FROM t WHERE t.id = '7' LIMIT 2   (hidden)
//!  server: 'acme'                                         → seal for acme, pin it:
//!  proxy:  UPDATE t SET email = 'enc:v1:…' WHERE (t.id = $2) AND t.org_id = 'acme'
//! ```
//!
//! The look-up runs in the client's session and transaction, so it sees what the UPDATE will
//! see; the pin makes a row that moved to another organisation in between simply not updated
//! (never sealed for the wrong one). No rows: the UPDATE is sent with NULL for its encrypted
//! values and a condition that matches nothing, and reports `UPDATE 0` as it would have. Rows of
//! several organisations: refused (42501). A look-up that fails (an error in the WHERE clause)
//! answers the client's statement with the server's error, as the statement itself would have.
//!
//! In the extended protocol the look-up is a Parse/Bind/Execute of its own (statement and portal
//! `__pgenvelope_lookup`; the portal is closed before the Bind and after the Execute; then
//! Flush), with the Bind's parameter values written into its text as
//! literals; in the simple protocol it is a Query of its own. One extra round trip per such
//! UPDATE; none when a tenant is known.

use bytes::BytesMut;

use crate::crypto::OrgId;
use crate::proxy::error::ClientError;
use crate::sql::{Analysis, ArraySource, DrawEdit, DrawRows, KeyDraw, PinLookup, PinValue};
use crate::wire::frontend::{self as fe, Bind, Parse, Target};

use super::session::Pending;
use super::shape::binary_as_text;
use super::values::{dollar_quoted, BindValues};
use super::{Ctx, Fail, Need, Stop};

/// Name of the statement and portal of an extended-protocol look-up.
const LOOKUP: &[u8] = b"__pgenvelope_lookup";

/// What a look-up asks the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ask {
    /// The organisation of the rows an UPDATE writes (its first column: the tenants).
    Tenant,
    /// The keys of entry `n` of [`Analysis::draws`], one row each.
    Keys(usize),
}

/// The look-ups of the client message being handled: the one out, the answers in.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Lookups {
    /// Sent, its answer not complete yet: what it asks, and the rows so far (first column).
    waiting: Option<(Ask, Vec<Option<String>>)>,
    /// Answered, for the message being handled.
    answers: Vec<(Ask, Vec<Option<String>>)>,
    /// The server refused one; its error went to the client in place of the message's.
    failed: bool,
}

impl Lookups {
    /// Whether one is out and its answer not complete.
    pub(super) fn waiting(&self) -> bool {
        self.waiting.is_some()
    }

    /// Whether one failed (its error answered the client's message).
    pub(super) fn failed(&self) -> bool {
        self.failed
    }

    /// The rows answering `ask`, if it was answered.
    fn answer(&self, ask: Ask) -> Option<&[Option<String>]> {
        self.answers
            .iter()
            .find(|(a, _)| *a == ask)
            .map(|(_, rows)| rows.as_slice())
    }

    /// The organisation a tenant look-up found: `Some(None)` when no row matched; `None` when
    /// none was answered (or rows of several organisations were found, which the statement's
    /// handler refuses).
    pub(super) fn tenant(&self) -> Option<Option<OrgId>> {
        match self.tenants()? {
            Found::One(org) => Some(Some(org)),
            Found::NoRow => Some(None),
            Found::Several => None,
        }
    }

    fn tenants(&self) -> Option<Found> {
        let rows = self.answer(Ask::Tenant)?;
        let mut found: Vec<&str> = Vec::new();
        for t in rows.iter().flatten() {
            if !found.contains(&t.as_str()) {
                found.push(t);
            }
        }
        Some(match found.as_slice() {
            [] => Found::NoRow,
            [one] => match OrgId::new((*one).to_owned()) {
                Ok(org) => Found::One(org),
                Err(_) => Found::Several,
            },
            _ => Found::Several,
        })
    }
}

/// What a tenant look-up found.
enum Found {
    NoRow,
    One(OrgId),
    Several,
}

/// A look-up to send before the client's message can be handled.
#[derive(Debug)]
pub(super) struct LookupRequest {
    ask: Ask,
    sql: String,
}

impl Ctx<'_> {
    /// Where a look-up stands for `ask`: `Ok(rows)` when answered, else the failure that
    /// stops the message (a look-up to send, the answer to wait for, or the error that
    /// already answered it).
    fn asked(
        &self,
        ask: Ask,
        sql: impl FnOnce() -> Result<String, ClientError>,
    ) -> Result<&[Option<String>], Fail> {
        let l = &self.e.lookups;
        if let Some(rows) = l.answer(ask) {
            return Ok(rows);
        }
        if l.failed {
            return Err(Fail::Answered);
        }
        if l.waiting.is_some() {
            return Err(Fail::Need(Need::ServerAnswer));
        }
        Err(Fail::Lookup(LookupRequest { ask, sql: sql()? }))
    }

    /// The organisation values of `analysis` sealed for "the session tenant" belong to, when
    /// no session or default tenant is known: looked up (asks for it when not done yet).
    /// `Ok(None)`: no look-up applies (the caller reports the missing tenant); `Ok(Some(None))`:
    /// no row matched.
    pub(super) fn looked_up_tenant(
        &self,
        analysis: &Analysis,
        text: &str,
        bind: Option<&BindValues<'_>>,
    ) -> Result<Option<Option<OrgId>>, Fail> {
        let mut pins = analysis
            .pins
            .iter()
            .filter(|p| p.value == PinValue::SessionTenant && p.lookup.is_some());
        let Some(pin) = pins.next() else {
            return Ok(None);
        };
        // Values sealed for "the session tenant" are sealed for one organisation per
        // message: two look-ups could find two.
        if pins.next().is_some() {
            return Err(ClientError::SeveralLookups {
                column: pin.column.clone(),
            }
            .into());
        }
        let Some(parts) = &pin.lookup else {
            return Ok(None);
        };
        self.asked(Ask::Tenant, || {
            self.lookup_sql(text, &pin.column, parts, bind)
        })?;
        match self.e.lookups.tenants() {
            Some(Found::One(org)) => Ok(Some(Some(org))),
            Some(Found::NoRow) | None => Ok(Some(None)),
            Some(Found::Several) => Err(ClientError::SeveralOrganisations {
                column: pin.column.clone(),
            }
            .into()),
        }
    }

    /// Draw the row keys of every [`KeyDraw`] of `analysis` (asks for the next one not drawn
    /// yet). `bind` gives the arrays whose length says how many rows an UNNEST inserts.
    pub(super) fn draw_keys(
        &self,
        analysis: &Analysis,
        bind: Option<&BindValues<'_>>,
    ) -> Result<(), Fail> {
        for (n, draw) in analysis.draws.iter().enumerate() {
            let rows = match &draw.rows {
                DrawRows::Fixed(rows) => *rows,
                DrawRows::Longest(arrays) => {
                    let mut longest = 0;
                    for a in arrays {
                        longest = longest.max(self.array_len(a, bind)?);
                    }
                    longest
                }
            };
            self.asked(Ask::Keys(n), || Ok(draw_sql(draw, rows)))?;
        }
        Ok(())
    }

    /// The keys drawn for draw `draw` (`None` in the list: NULL, the key column has no
    /// sequence), once drawn.
    pub(super) fn drawn_keys(&self, draw: usize) -> Option<&[Option<String>]> {
        self.e.lookups.answer(Ask::Keys(draw))
    }

    /// The texts the keys of draw `n` take in the statement, one per key parameter (a key per
    /// VALUES row, or one array for UNNEST), in text order.
    pub(super) fn draw_texts(&self, n: usize, draw: &KeyDraw) -> Result<Vec<String>, ClientError> {
        let none = || ClientError::NoKeySequence {
            table: draw.table.clone(),
            key: draw.column.clone(),
        };
        let keys = self.drawn_keys(n).ok_or_else(none)?;
        let mut texts = Vec::new();
        for (_, edit) in &draw.edits {
            match edit {
                DrawEdit::Key(row) | DrawEdit::KeyInPlace(row) => {
                    texts.push(keys.get(*row).cloned().flatten().ok_or_else(none)?);
                }
                DrawEdit::Keys => {
                    let all: Option<Vec<Option<String>>> =
                        keys.iter().map(|k| k.clone().map(Some)).collect();
                    texts.push(crate::wire::array::encode_text(&all.ok_or_else(none)?));
                }
                DrawEdit::Column | DrawEdit::Overriding | DrawEdit::Name => {}
            }
        }
        Ok(texts)
    }

    /// Number of elements of an array given as a literal or a parameter (0 for NULL).
    fn array_len(
        &self,
        source: &ArraySource,
        bind: Option<&BindValues<'_>>,
    ) -> Result<usize, ClientError> {
        let bad = || ClientError::ArrayUnreadable {
            column: "an UNNEST argument".to_owned(),
        };
        let text = match source {
            ArraySource::Literal { text, .. } => std::borrow::Cow::Borrowed(text.as_str()),
            ArraySource::Param(n) => {
                let Some(bind) = bind else {
                    return Err(bad());
                };
                let Some(Some((raw, text_format))) = bind.raw(*n) else {
                    return Ok(0);
                };
                if !text_format {
                    return crate::wire::array::BinaryArray::decode(raw)
                        .map(|a| a.elements.len())
                        .map_err(|_| bad());
                }
                std::borrow::Cow::Owned(
                    self.s.encoding.decode(raw).map_err(|_| bad())?.into_owned(),
                )
            }
            ArraySource::Drawn(_) => return Err(bad()),
        };
        crate::wire::array::parse_text(&text)
            .map(|e| e.len())
            .map_err(|_| bad())
    }

    /// `SELECT DISTINCT (col)::text FROM target[, from] [WHERE cond] LIMIT 2`, with the Bind's
    /// parameter values written in as literals.
    fn lookup_sql(
        &self,
        text: &str,
        column: &str,
        parts: &PinLookup,
        bind: Option<&BindValues<'_>>,
    ) -> Result<String, ClientError> {
        let slice = |r: &std::ops::Range<usize>| -> Result<String, ClientError> {
            let s = text.get(r.clone()).ok_or(ClientError::Rewrite)?;
            match bind {
                Some(b) => inline_params(s, b, &self.s.encoding),
                None => Ok(s.to_owned()),
            }
        };
        let mut sql = format!(
            "SELECT DISTINCT ({column})::text FROM {}",
            slice(&parts.target)?
        );
        if let Some(from) = &parts.from {
            sql.push_str(", ");
            sql.push_str(&slice(from)?);
        }
        if let Some(cond) = &parts.cond {
            sql.push_str(" WHERE ");
            sql.push_str(&slice(cond)?);
        }
        sql.push_str(" LIMIT 2");
        Ok(sql)
    }

    /// Send a look-up for a simple Query: a Query of its own, answered before the client's.
    pub(super) fn start_simple_lookup(
        &mut self,
        req: LookupRequest,
        out: &mut BytesMut,
    ) -> Result<Stop, Stop> {
        let bytes = self.s.encoding.encode(&req.sql).map_err(|_| {
            Stop::Malformed(crate::wire::WireError::Malformed {
                tag: fe::QUERY_TAG,
                what: "look-up text",
            })
        })?;
        fe::put_query(out, &bytes)?;
        self.push_cycle(Pending::Lookup { simple: true });
        self.e.lookups.waiting = Some((req.ask, Vec::new()));
        Ok(Stop::Need(Need::ServerAnswer))
    }

    /// Send a look-up in the extended protocol: Close, Parse, Bind, Execute of a statement and
    /// portal of its own, then Flush so the answer comes before the client's Sync.
    pub(super) fn start_extended_lookup(
        &mut self,
        req: LookupRequest,
        out: &mut BytesMut,
    ) -> Result<Stop, Stop> {
        let bytes = self.s.encoding.encode(&req.sql).map_err(|_| {
            Stop::Malformed(crate::wire::WireError::Malformed {
                tag: fe::PARSE_TAG,
                what: "look-up text",
            })
        })?;
        crate::wire::put_message(out, fe::CLOSE_TAG, |b| {
            b.extend_from_slice(b"S");
            b.extend_from_slice(LOOKUP);
            b.extend_from_slice(&[0]);
        })?;
        Parse {
            name: LOOKUP,
            sql: &bytes,
            param_types: Vec::new(),
        }
        .encode(out)?;
        put_close_portal(out)?;
        Bind {
            portal: LOOKUP,
            statement: LOOKUP,
            param_formats: Vec::new(),
            params: Vec::new(),
            result_formats: Vec::new(),
        }
        .encode_with(&[], out)?;
        crate::wire::put_message(out, fe::EXECUTE_TAG, |b| {
            b.extend_from_slice(LOOKUP);
            b.extend_from_slice(&[0]);
            b.extend_from_slice(&0i32.to_be_bytes());
        })?;
        put_close_portal(out)?;
        crate::wire::put_message(out, fe::FLUSH_TAG, |_| {})?;
        let queue = &mut self.s.queue;
        queue.push_back(Pending::Close {
            hidden: true,
            target: Target::Statement,
            name: LOOKUP.to_vec(),
        });
        queue.push_back(Pending::Parse {
            hidden: true,
            name: LOOKUP.to_vec(),
            statement: None,
        });
        let close_portal = || Pending::Close {
            hidden: true,
            target: Target::Portal,
            name: LOOKUP.to_vec(),
        };
        queue.push_back(close_portal());
        queue.push_back(Pending::Bind {
            hidden: true,
            name: LOOKUP.to_vec(),
            portal: None,
        });
        queue.push_back(Pending::Lookup { simple: false });
        queue.push_back(close_portal());
        self.e.lookups.waiting = Some((req.ask, Vec::new()));
        Ok(Stop::Need(Need::ServerAnswer))
    }

    /// A row of a look-up's answer: its first column.
    pub(super) fn lookup_row(&mut self, value: Option<String>) {
        if let Some((_, rows)) = &mut self.e.lookups.waiting {
            rows.push(value);
        }
    }

    /// The look-up's rows are all in.
    pub(super) fn lookup_done(&mut self) {
        if let Some(answer) = self.e.lookups.waiting.take() {
            self.e.lookups.answers.push(answer);
        }
    }

    /// The look-up failed on the server.
    pub(super) fn lookup_failed(&mut self) {
        if self.e.lookups.waiting.take().is_some() {
            self.e.lookups.failed = true;
        }
    }
}

/// `SELECT nextval(pg_get_serial_sequence('t', 'k'))::text FROM generate_series(1, rows)`:
/// one key per row from the key column's own sequence (NULL when it has none).
fn draw_sql(draw: &KeyDraw, rows: usize) -> String {
    format!(
        "SELECT nextval(pg_get_serial_sequence({}, {}))::text FROM generate_series(1, {rows})",
        dollar_quoted(&draw.table),
        dollar_quoted(&draw.column),
    )
}

/// Close the look-up's portal (before its Bind, in case one is left from an earlier look-up,
/// and after its Execute, so it holds no snapshot until the transaction ends).
fn put_close_portal(out: &mut BytesMut) -> Result<(), crate::wire::WireError> {
    crate::wire::put_message(out, fe::CLOSE_TAG, |b| {
        b.extend_from_slice(b"P");
        b.extend_from_slice(LOOKUP);
        b.extend_from_slice(&[0]);
    })
}

/// `text` (a slice of a statement) with each `$n` replaced by parameter `n`'s value as a
/// literal (NULL as `NULL`). Binary values are written as their text for integer, UUID and
/// text types; any other binary value cannot be, and is refused.
fn inline_params(
    text: &str,
    bind: &BindValues<'_>,
    encoding: &crate::wire::encoding::ClientEncoding,
) -> Result<String, ClientError> {
    use sqlparser::dialect::PostgreSqlDialect;
    use sqlparser::tokenizer::{Token, Tokenizer};
    let tokens = Tokenizer::new(&PostgreSqlDialect {}, text)
        .tokenize_with_location()
        .map_err(|_| ClientError::Rewrite)?;
    let pos = crate::sql::Offsets::new(text);
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for t in &tokens {
        let Token::Placeholder(p) = &t.token else {
            continue;
        };
        let Some(n) = p.strip_prefix('$').and_then(|n| n.parse::<usize>().ok()) else {
            continue;
        };
        let (Some(start), Some(end)) = (pos.offset(t.span.start), pos.offset(t.span.end)) else {
            return Err(ClientError::Rewrite);
        };
        out.push_str(text.get(at..start).ok_or(ClientError::Rewrite)?);
        let literal = match bind.raw(n) {
            None => return Err(ClientError::ParamUnreadable { param: n }),
            Some(None) => "NULL".to_owned(),
            Some(Some((raw, text_format))) => {
                let value = if text_format {
                    encoding
                        .decode(raw)
                        .map_err(|_| ClientError::ParamUnreadable { param: n })?
                        .into_owned()
                } else {
                    bind.binary_text(n, raw, encoding)
                        .ok_or(ClientError::ParamUnreadable { param: n })?
                };
                dollar_quoted(&value)
            }
        };
        out.push_str(&literal);
        at = end;
    }
    out.push_str(text.get(at..).ok_or(ClientError::Rewrite)?);
    Ok(out)
}

impl BindValues<'_> {
    /// Parameter `n` (1-based): `None` if there is no such parameter, `Some(None)` for NULL,
    /// else its bytes and whether they are in text format.
    pub(super) fn raw(&self, n: usize) -> Option<Option<(&[u8], bool)>> {
        let i = n.checked_sub(1)?;
        let value = self.bind.params.get(i)?;
        Some(value.map(|v| (v, self.bind.param_format(i) == fe::FORMAT_TEXT)))
    }

    /// A binary parameter value as text, for integer, UUID and text types.
    fn binary_text(
        &self,
        n: usize,
        raw: &[u8],
        encoding: &crate::wire::encoding::ClientEncoding,
    ) -> Option<String> {
        let ty = self.types.get(n - 1).copied().unwrap_or(0);
        if super::values::TEXT_OIDS.contains(&ty) || ty == 19 {
            return encoding.decode(raw).ok().map(|t| t.into_owned());
        }
        binary_as_text(ty, raw)
    }
}
