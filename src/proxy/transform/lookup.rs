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
use crate::sql::{Analysis, PinLookup, PinValue};
use crate::wire::frontend::{self as fe, Bind, Parse, Target};

use super::session::Pending;
use super::shape::binary_as_text;
use super::values::{dollar_quoted, BindValues};
use super::{Ctx, Fail, Need, Stop};

/// Name of the statement and portal of an extended-protocol look-up.
const LOOKUP: &[u8] = b"__pgenvelope_lookup";

/// Where the look-up for the parked client message stands.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) enum Lookup {
    /// None asked for.
    #[default]
    Idle,
    /// Sent; its answer has not come yet. The rows' tenants arrive here.
    Waiting(Vec<String>),
    /// Answered: the organisation of every row, or `None` when no row matched.
    Found(Option<OrgId>),
    /// Answered with rows of several organisations.
    Several,
    /// The server refused it; its error went to the client in place of the statement's.
    Failed,
}

/// A look-up to send before the client's message can be handled.
#[derive(Debug)]
pub(super) struct LookupRequest {
    sql: String,
}

impl Ctx<'_> {
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
        let Some(pin) = analysis
            .pins
            .iter()
            .find(|p| p.value == PinValue::SessionTenant && p.lookup.is_some())
        else {
            return Ok(None);
        };
        match &self.e.lookup {
            Lookup::Idle => {}
            Lookup::Waiting(_) => return Err(Fail::Need(Need::ServerAnswer)),
            Lookup::Found(org) => return Ok(Some(org.clone())),
            Lookup::Several => {
                return Err(ClientError::SeveralOrganisations {
                    column: pin.column.clone(),
                }
                .into())
            }
            // Answered already (the server's error); nothing more to send.
            Lookup::Failed => return Err(Fail::Answered),
        }
        let Some(parts) = &pin.lookup else {
            return Ok(None);
        };
        let sql = self.lookup_sql(text, &pin.column, parts, bind)?;
        Err(Fail::Lookup(LookupRequest { sql }))
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
        self.e.lookup = Lookup::Waiting(Vec::new());
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
        self.e.lookup = Lookup::Waiting(Vec::new());
        Ok(Stop::Need(Need::ServerAnswer))
    }

    /// A row of a look-up's answer.
    pub(super) fn lookup_row(&mut self, tenant: Option<String>) {
        if let (Lookup::Waiting(found), Some(t)) = (&mut self.e.lookup, tenant) {
            if !found.contains(&t) {
                found.push(t);
            }
        }
    }

    /// The look-up's rows are all in.
    pub(super) fn lookup_done(&mut self) {
        let Lookup::Waiting(found) = std::mem::take(&mut self.e.lookup) else {
            return;
        };
        self.e.lookup = match found.as_slice() {
            [] => Lookup::Found(None),
            [one] => match OrgId::new(one.clone()) {
                Ok(org) => Lookup::Found(Some(org)),
                Err(_) => Lookup::Several,
            },
            _ => Lookup::Several,
        };
    }

    /// The look-up failed on the server.
    pub(super) fn lookup_failed(&mut self) {
        if matches!(self.e.lookup, Lookup::Waiting(_)) {
            self.e.lookup = Lookup::Failed;
        }
    }
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
