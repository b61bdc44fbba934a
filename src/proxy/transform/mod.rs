//! The protocol core: everything the proxy decides about one session, synchronously.
//!
//! ```text
//!            client bytes                                   server bytes
//!                 │                                              │
//!   connection ───┼── frames ──▶ Transform::on_client ──▶ Out.to_server
//!   (async shell) │             Transform::on_server ──▶ Out.to_client ◀── frames ──┘
//!                 │                     │
//!                 └──── Stop::Need ◀────┘  keys, catalog facts: the shell fetches them and
//!                                          hands the same message in again
//! ```
//!
//! One [`Transform`] per client connection owns all of the session's protocol state (prepared
//! statements, portals, the queue of requests awaiting answers, the tenant history, how the
//! server reads SQL text, COPY in progress) without locks; the connection task moves bytes
//! and calls it. Nothing here awaits, reads a clock or touches a socket.
//!
//! When handling a message needs something only I/O can give (a data key not at hand, which
//! columns of a table OID are encrypted, a table's column list), the handler stops with
//! [`Stop::Need`] **before it changes any state or writes any output**; the shell fetches it and
//! calls the same handler again with the same message. Handlers are written as "work out
//! everything, then commit": every need arises in the first part.
//!
//! Files: [`client`] (client messages: Query, Parse, Bind, Describe, Execute, Close, Sync,
//! FunctionCall), [`values`] (sealing literals and parameters: tenant, row key), [`server`]
//! (server messages: results, errors, ReadyForQuery), [`shape`] (result columns), [`copy`]
//! (COPY rows both ways), [`session`] (statements, portals, the pending queue, tenant
//! history, lexing), [`refuse`] (how a refusal takes a statement's place).
//!
//! Never logs values, parameters, keys or SQL text.

mod arrays;
mod canonical;
mod client;
mod copy;
mod lexing;
mod lookup;
mod refuse;
mod search;
mod server;
mod session;
mod shape;
mod tenant;
mod values;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::cipher::{Cipher, CipherError, KeyNeed};
use crate::crypto::OrgId;
use crate::proxy::encryption::Encryption;
use crate::proxy::error::ClientError;
use crate::proxy::metrics::StatementCounts;
use crate::wire::backend::{self as be, TransactionStatus};
use crate::wire::encoding::EncodingError;
use crate::wire::frontend as fe;
use crate::wire::{Frame, WireError};

use copy::{CopyIn, CopyOut};
use session::Session;
use shape::Shape;

/// What a handler needs before it can handle its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Need {
    /// Data keys.
    Keys(Vec<KeyNeed>),
    /// Which columns of table `oid` (in the session's database) are encrypted.
    Table(u32),
    /// The answer to a look-up the core sent on the server session (nothing to fetch: the
    /// message waits while the server's messages are handled).
    ServerAnswer,
    /// The column names of a table, in order (a COPY without a column list).
    Columns {
        /// Schema.
        schema: String,
        /// Table.
        table: String,
    },
}

/// Why a handler returned without handling its message.
#[derive(Debug)]
pub(crate) enum Stop {
    /// Fetch this, then hand the same message in again.
    Need(Need),
    /// The message is malformed: the session ends with a protocol violation.
    Malformed(WireError),
}

impl From<WireError> for Stop {
    fn from(e: WireError) -> Self {
        Stop::Malformed(e)
    }
}

/// What the handlers write: bytes for each side.
#[derive(Debug, Default)]
pub(crate) struct Out {
    /// Bytes for the server.
    pub(crate) to_server: BytesMut,
    /// Bytes for the client.
    pub(crate) to_client: BytesMut,
}

/// Why preparing a message's rewrite stopped (inside the handlers).
#[derive(Debug)]
enum Fail {
    /// Refuse the statement (or result) with this error.
    Refuse(ClientError),
    /// Fetch this and handle the message again.
    Need(Need),
    /// Send this look-up on the server session, then handle the message again with its answer.
    Lookup(lookup::LookupRequest),
    /// The message was answered already (by the server's error to its look-up): drop it.
    Answered,
}

impl From<ClientError> for Fail {
    fn from(e: ClientError) -> Self {
        Fail::Refuse(e)
    }
}

impl From<CipherError> for Fail {
    fn from(e: CipherError) -> Self {
        match e {
            CipherError::Missing(k) => Fail::Need(Need::Keys(vec![k])),
            e => Fail::Refuse(ClientError::Cipher(e)),
        }
    }
}

impl From<EncodingError> for Fail {
    fn from(e: EncodingError) -> Self {
        Fail::Refuse(ClientError::Encoding(e))
    }
}

/// A table's column list as fetched for a COPY: (schema, table) and the names, or `Err` when
/// the look-up failed.
type FetchedColumns = ((String, String), Result<Vec<String>, ()>);

/// Request cycles and transaction status, for graceful shutdown: a session is idle when the
/// server's last ReadyForQuery said `I` and nothing was sent since.
#[derive(Debug)]
struct Cycles {
    /// Invariant: request cycles (Query, Sync, FunctionCall, and the startup itself) sent to
    /// the server and not yet answered by ReadyForQuery.
    outstanding: i64,
    idle: bool,
}

/// The protocol core of one session.
pub(crate) struct Transform {
    session: Session,
    cycles: Cycles,
    /// A BackendKeyData not yet handed to the shell (to register for cancel requests).
    backend_key: Option<Bytes>,
    statements: Arc<StatementCounts>,
    /// `None`: a pure relay (no rules), which only follows cycles and the cancel key.
    enc: Option<Box<Encrypting>>,
}

/// The state of the encrypting layer of a session.
struct Encrypting {
    handles: Arc<Encryption>,
    cipher: Cipher,
    /// Largest COPY row.
    max_row: usize,
    /// COPY FROM STDIN being encrypted.
    copy_in: Option<CopyIn>,
    /// After a refusal inside COPY FROM: drop the client's COPY data up to its
    /// CopyDone/CopyFail (the server already got CopyFail).
    copy_failed: bool,
    /// The column list a COPY without one asked for, once fetched (consumed by the retry).
    columns: Option<FetchedColumns>,
    /// Table OIDs whose catalog look-up failed (reported by the retry).
    tables_failed: Vec<u32>,
    /// Set by the shell when needs keep coming back: the next need is refused instead.
    gave_up: bool,
    /// The look-up of the organisation of the rows the parked client message writes.
    lookups: lookup::Lookups,
    /// Server side: shape of the result set being streamed (simple query).
    current: Option<Arc<Shape>>,
    /// COPY TO being decrypted.
    copy_out: Option<CopyOut>,
    /// After a refused result: drop everything up to ReadyForQuery.
    suppress: bool,
    /// Result shapes by RowDescription body, valid for catalog epoch `shapes_epoch`.
    shapes: std::collections::HashMap<Vec<u8>, Arc<Shape>>,
    shapes_epoch: u64,
    /// An ErrorResponse was seen since the last ReadyForQuery.
    error_in_cycle: bool,
    /// The last CommandComplete tag since the last ReadyForQuery started with ROLLBACK.
    rolled_back: bool,
    /// Cycle ends (Query, FunctionCall) the server skipped after an error since the last
    /// ReadyForQuery: answered together with the Sync that ends the skip.
    skipped_cycles: usize,
}

impl Transform {
    /// The core of a session on database `db`, whose startup packet named `startup_tenant`.
    /// With `encryption`, it encrypts; without, it only relays.
    pub(crate) fn new(
        db: String,
        startup_tenant: Option<OrgId>,
        encryption: Option<Arc<Encryption>>,
        max_row: usize,
        statements: Arc<StatementCounts>,
    ) -> Self {
        let enc = encryption.map(|handles| {
            Box::new(Encrypting {
                cipher: handles.cipher(),
                handles,
                max_row,
                copy_in: None,
                copy_failed: false,
                columns: None,
                tables_failed: Vec::new(),
                gave_up: false,
                lookups: lookup::Lookups::default(),
                current: None,
                copy_out: None,
                suppress: false,
                shapes: std::collections::HashMap::new(),
                shapes_epoch: 0,
                error_in_cycle: false,
                rolled_back: false,
                skipped_cycles: 0,
            })
        });
        Self {
            session: Session::new(db, startup_tenant),
            // The startup exchange ends with the first ReadyForQuery.
            cycles: Cycles {
                outstanding: 1,
                idle: false,
            },
            backend_key: None,
            statements,
            enc,
        }
    }

    /// Whether client messages with this tag must be handed to [`Transform::on_client`] whole
    /// (the others are forwarded as they are).
    pub(crate) fn inspects_client(&self, tag: u8) -> bool {
        let Some(enc) = &self.enc else {
            return crate::fault::INSPECTS_QUERIES && tag == fe::QUERY_TAG;
        };
        match tag {
            fe::QUERY_TAG
            | fe::PARSE_TAG
            | fe::BIND_TAG
            | fe::DESCRIBE_TAG
            | fe::EXECUTE_TAG
            | fe::CLOSE_TAG
            | fe::SYNC_TAG
            | fe::FUNCTION_CALL_TAG => true,
            fe::COPY_DATA_TAG | fe::COPY_DONE_TAG | fe::COPY_FAIL_TAG => {
                enc.copy_in.is_some() || enc.copy_failed
            }
            _ => false,
        }
    }

    /// Whether server messages with this tag must be handed to [`Transform::on_server`].
    pub(crate) fn inspects_server(&self, tag: u8) -> bool {
        let tracked = matches!(
            tag,
            be::PARAMETER_STATUS_TAG | be::BACKEND_KEY_DATA_TAG | be::READY_FOR_QUERY_TAG
        );
        match &self.enc {
            None => tracked,
            Some(enc) => {
                !matches!(tag, be::NOTICE_RESPONSE_TAG | be::NOTIFICATION_RESPONSE_TAG)
                    || enc.suppress
            }
        }
    }

    /// A client message is about to be handled or forwarded (once per message, inspected or
    /// not).
    pub(crate) fn client_tag(&mut self, tag: u8) {
        self.statements.count(tag);
        // The encrypting side counts the cycles it forwards (it drops some while the server
        // skips to Sync); a relay forwards them all.
        if self.enc.is_none() && matches!(tag, fe::QUERY_TAG | fe::SYNC_TAG | fe::FUNCTION_CALL_TAG)
        {
            self.cycle_sent();
        }
    }

    /// Handle one whole inspected client message.
    pub(crate) fn on_client(&mut self, frame: &Frame, out: &mut Out) -> Result<(), Stop> {
        crate::fault::check(frame);
        let result = self.client_message(frame, out);
        self.settle_client(&result);
        result
    }

    /// Handle one whole inspected server message.
    pub(crate) fn on_server(&mut self, frame: &Frame, out: &mut Out) -> Result<(), Stop> {
        self.track(frame).map_err(Stop::Malformed)?;
        let result = self.server_message(frame, out);
        self.settle(&result);
        result
    }

    /// Whether the session is idle: the server's last ReadyForQuery said `I` and nothing was
    /// sent since. Closing it then loses no statement and no transaction.
    pub(crate) fn is_idle(&self) -> bool {
        self.cycles.idle
    }

    /// A BackendKeyData seen since the last call (its body), to register for cancel requests.
    pub(crate) fn take_backend_key(&mut self) -> Option<Bytes> {
        self.backend_key.take()
    }

    /// The session's database.
    pub(crate) fn db(&self) -> &str {
        &self.session.db
    }

    /// The encrypting layer's handles, when encrypting.
    pub(crate) fn encryption(&self) -> Option<&Arc<Encryption>> {
        self.enc.as_ref().map(|e| &e.handles)
    }

    /// The cipher, to fetch a key a handler asked for.
    pub(crate) fn cipher_mut(&mut self) -> Option<&mut Cipher> {
        self.enc.as_mut().map(|e| &mut e.cipher)
    }

    /// Whether the client message waiting for a look-up's answer can be handled again.
    pub(crate) fn lookup_answered(&self) -> bool {
        self.enc.as_ref().is_some_and(|e| !e.lookups.waiting())
    }

    /// The catalog look-up of table `oid` failed: the next attempt refuses (58000).
    pub(crate) fn table_failed(&mut self, oid: u32) {
        if let Some(e) = &mut self.enc {
            e.tables_failed.push(oid);
        }
    }

    /// The column list of `schema.table` (or `Err` when the look-up failed), for the COPY
    /// being handled.
    pub(crate) fn provide_columns(
        &mut self,
        schema: String,
        table: String,
        columns: Result<Vec<String>, ()>,
    ) {
        if let Some(e) = &mut self.enc {
            e.columns = Some(((schema, table), columns));
        }
    }

    /// Needs keep coming back for the message being handled (keys going stale as fast as
    /// they are fetched): the next attempt refuses instead of asking again.
    pub(crate) fn give_up(&mut self) {
        if let Some(e) = &mut self.enc {
            e.gave_up = true;
        }
    }

    /// After a client message: as [`Transform::settle`], and a look-up's answer is used up.
    fn settle_client(&mut self, result: &Result<(), Stop>) {
        self.settle(result);
        if let (Some(enc), false) = (&mut self.enc, matches!(result, Err(Stop::Need(_)))) {
            enc.lookups = lookup::Lookups::default();
        }
    }

    /// After a handler: counts of a finished message are kept, those of an attempt to be run
    /// again are dropped.
    fn settle(&mut self, result: &Result<(), Stop>) {
        let Some(enc) = &mut self.enc else {
            return;
        };
        match result {
            Err(Stop::Need(_)) => enc.cipher.abandon(),
            _ => {
                enc.cipher.commit();
                enc.gave_up = false;
                enc.tables_failed.clear();
                enc.columns = None;
            }
        }
    }

    /// Follow what every session tracks, relay or not: the cancel key and request cycles.
    fn track(&mut self, frame: &Frame) -> Result<(), WireError> {
        match frame.tag() {
            be::BACKEND_KEY_DATA_TAG => {
                be::parse_backend_key_data(frame.body())?;
                self.backend_key = Some(Bytes::copy_from_slice(frame.body()));
            }
            be::READY_FOR_QUERY_TAG => {
                let status = be::parse_ready_for_query(frame.body())?;
                self.cycles.outstanding -= 1;
                self.cycles.idle =
                    self.cycles.outstanding <= 0 && status == TransactionStatus::Idle;
            }
            be::PARAMETER_STATUS_TAG => {
                be::parse_parameter_status(frame.body())?;
            }
            _ => {}
        }
        Ok(())
    }

    /// A request cycle (Query, Sync, FunctionCall) goes to the server.
    fn cycle_sent(&mut self) {
        self.cycles.outstanding += 1;
        self.cycles.idle = false;
    }

    /// The handlers' view of an encrypting transform.
    fn ctx(&mut self) -> Option<Ctx<'_>> {
        Some(Ctx {
            s: &mut self.session,
            e: self.enc.as_deref_mut()?,
            cycles: &mut self.cycles,
        })
    }

    fn client_message(&mut self, frame: &Frame, out: &mut Out) -> Result<(), Stop> {
        match self.ctx() {
            Some(mut ctx) => ctx.on_client(frame, out),
            None => {
                out.to_server.extend_from_slice(frame.raw());
                Ok(())
            }
        }
    }

    fn server_message(&mut self, frame: &Frame, out: &mut Out) -> Result<(), Stop> {
        match self.ctx() {
            Some(mut ctx) => ctx.on_server(frame, out),
            None => {
                out.to_client.extend_from_slice(frame.raw());
                Ok(())
            }
        }
    }
}

/// What the handlers work on: the session's facts and the encrypting state, borrowed apart.
struct Ctx<'a> {
    s: &'a mut Session,
    e: &'a mut Encrypting,
    cycles: &'a mut Cycles,
}

impl Ctx<'_> {
    /// A handler's need, unless the shell gave up on this message (then it is refused).
    fn need(&self, need: Need) -> Fail {
        if !self.e.gave_up {
            return Fail::Need(need);
        }
        Fail::Refuse(match need {
            Need::Keys(_) => ClientError::KeysUnavailable,
            Need::Table(_) => ClientError::CatalogUnavailable,
            Need::Columns { .. } => ClientError::CopyColumnsUnavailable,
            Need::ServerAnswer => return Fail::Need(need),
        })
    }

    /// A fail as the handlers report it, with needs checked against `gave_up`.
    fn checked(&self, f: Fail) -> Fail {
        match f {
            Fail::Need(n) => self.need(n),
            f => f,
        }
    }

    /// A request cycle (Query, Sync, FunctionCall) goes to the server.
    fn cycle_sent(&mut self) {
        self.cycles.outstanding += 1;
        self.cycles.idle = false;
    }

    /// Count a refused statement.
    fn count_refusal(&self, e: &ClientError) {
        self.e.handles.count_refusal(e);
        tracing::debug!(code = e.sqlstate(), "statement refused");
    }
}
