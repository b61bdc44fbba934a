//! Server → client direction of an encrypting session: matches every response to the
//! request queued by the client side, learns result shapes from RowDescriptions, decrypts
//! DataRow and COPY TO values of encrypted columns, swallows the answers to requests the
//! proxy injected, and tracks transaction ends for the session tenant.
//!
//! A value that fails to decrypt (tampered, another organisation's under a session tenant,
//! key unavailable) ends the result with an ErrorResponse carrying our SQLSTATE; the rest of
//! the server's answer up to ReadyForQuery is dropped, so the client sees an ordinary failed
//! statement and the connection stays in sync. Never logs values.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use bytes::BytesMut;

use crate::crypto::OrgId;
use crate::proxy::copy::CopyOut;
use crate::proxy::engine::{Cipher, ReadOutcome};
use crate::proxy::error::ClientError;
use crate::proxy::pump::{Handler, PumpError};
use crate::proxy::session::{binary_as_text, lock, ColumnShape, Pending, Shape, SharedSession};
use crate::wire::backend::{self as be, DataRow, FieldDescription, TransactionStatus};
use crate::wire::encoding::ClientEncoding;
use crate::wire::{Frame, WireError};

/// Type OIDs whose values may be text: text, varchar, bpchar, name, unknown, json? (no).
const TEXTLIKE_OIDS: &[u32] = &[25, 1043, 1042, 19, 705];

/// The server → client handler.
pub(crate) struct ServerSide {
    pub(crate) session: SharedSession,
    pub(crate) cipher: Cipher,
    /// Shape of the result set being streamed (simple query).
    current: Option<Arc<Shape>>,
    /// COPY TO being decrypted.
    copy_out: Option<CopyOut>,
    /// After a decryption failure: drop everything up to ReadyForQuery.
    suppress: bool,
    /// Result shapes by RowDescription body, valid for catalog epoch `shapes_epoch`.
    shapes: HashMap<Vec<u8>, Arc<Shape>>,
    shapes_epoch: u64,
    /// An ErrorResponse was seen since the last ReadyForQuery.
    error_in_cycle: bool,
    /// The last CommandComplete tag since the last ReadyForQuery started with ROLLBACK.
    rolled_back: bool,
    /// Cycle ends (Query, FunctionCall) the server skipped after an error since the last
    /// ReadyForQuery: answered together with the Sync that ends the skip.
    skipped_cycles: usize,
    pub(crate) max_row: usize,
}

impl ServerSide {
    pub(crate) fn new(session: SharedSession, cipher: Cipher, max_row: usize) -> Self {
        Self {
            session,
            cipher,
            current: None,
            copy_out: None,
            suppress: false,
            shapes: HashMap::new(),
            shapes_epoch: 0,
            error_in_cycle: false,
            rolled_back: false,
            skipped_cycles: 0,
            max_row,
        }
    }
}

impl Handler for ServerSide {
    type Error = PumpError;

    fn inspects(&self, tag: u8) -> bool {
        !matches!(tag, be::NOTICE_RESPONSE_TAG | be::NOTIFICATION_RESPONSE_TAG) || self.suppress
    }

    async fn on_message(&mut self, frame: Frame, out: &mut BytesMut) -> Result<(), PumpError> {
        match self.handle(&frame, out).await {
            Ok(()) => Ok(()),
            Err(Failure::Wire(e)) => Err(e.into()),
            Err(Failure::Client(e)) => {
                tracing::debug!(code = e.code, "result refused");
                if !self.suppress {
                    e.write(out);
                }
                self.suppress = true;
                self.error_in_cycle = true;
                self.copy_out = None;
                self.current = None;
                Ok(())
            }
        }
    }
}

enum Failure {
    Wire(WireError),
    Client(ClientError),
}

impl From<WireError> for Failure {
    fn from(e: WireError) -> Self {
        Failure::Wire(e)
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure::Client(e)
    }
}

impl ServerSide {
    /// Forward `frame` unless suppressed or the request it answers was injected.
    fn emit(&self, frame: &Frame, hidden: bool, out: &mut BytesMut) {
        if !hidden && !self.suppress {
            out.extend_from_slice(frame.raw());
        }
    }

    async fn handle(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<(), Failure> {
        let tag = frame.tag();
        match tag {
            be::NOTICE_RESPONSE_TAG | be::NOTIFICATION_RESPONSE_TAG => {
                self.emit(frame, false, out);
            }
            be::PARAMETER_STATUS_TAG => {
                let (name, value) = be::parse_parameter_status(frame.body())?;
                if name == b"client_encoding" {
                    lock(&self.session).encoding =
                        ClientEncoding::from_name(&String::from_utf8_lossy(value));
                }
                if name == b"standard_conforming_strings" {
                    lock(&self.session).lexing.standard_strings = value == b"on";
                }
                if name == b"server_encoding" {
                    lock(&self.session).lexing.server_sql_ascii = value == b"SQL_ASCII";
                }
                self.emit(frame, false, out);
            }
            be::READY_FOR_QUERY_TAG => {
                let status = be::parse_ready_for_query(frame.body())?;
                {
                    let mut session = lock(&self.session);
                    let mut answered = false;
                    while let Some(p) = session.queue.pop_front() {
                        if p.ends_cycle() {
                            answered = true;
                            break;
                        }
                    }
                    session.status = status;
                    if answered {
                        // Cycles the server skipped after an error end with this one.
                        let rolled_back = self.rolled_back || self.error_in_cycle;
                        for _ in 0..=std::mem::take(&mut self.skipped_cycles) {
                            session.lexing.cycle_answered();
                            session.tenant.cycle_answered(status, rolled_back);
                        }
                    }
                    if status == TransactionStatus::Idle {
                        // Portals end with their transaction.
                        session.portals.clear();
                    }
                }
                self.suppress = false;
                self.error_in_cycle = false;
                self.rolled_back = false;
                self.current = None;
                self.copy_out = None;
                self.emit(frame, false, out);
            }
            be::ERROR_RESPONSE_TAG => {
                self.error_in_cycle = true;
                self.current = None;
                self.copy_out = None;
                let mut session = lock(&self.session);
                let extended = session.queue.front().is_some_and(|p| !p.ends_cycle());
                if extended {
                    // The server skips to Sync: so do the expectations, and the effects of
                    // the skipped requests never happen.
                    self.skipped_cycles += session.fail_extended();
                }
                let copy_refusal = session.copy_refusal.take();
                drop(session);
                if self.suppress {
                    return Ok(());
                }
                // The server's answer to our CopyFail: our SQLSTATE instead of its 57014, and
                // without its source location.
                if let Some(code) = copy_refusal {
                    let answers_ours = be::ErrorFields::find(frame.body(), b'C')
                        == Some(b"57014".as_slice())
                        && be::ErrorFields::find(frame.body(), b'M')
                            .is_some_and(|m| m.windows(12).any(|x| x == b"pgenvelope: "));
                    if answers_ours
                        && be::put_fields_replacing(
                            out,
                            be::ERROR_RESPONSE_TAG,
                            frame.body(),
                            Some((b'C', code.as_bytes())),
                            b"FLR",
                        )
                    {
                        return Ok(());
                    }
                }
                // Our own refusals are raised by a DO block on the server: drop the PL/pgSQL
                // context and source location it adds (Where, File, Line, Routine), so the
                // client sees just our message and code.
                let ours = be::ErrorFields::find(frame.body(), b'M')
                    .is_some_and(|m| m.starts_with(b"pgenvelope: "))
                    && be::ErrorFields::find(frame.body(), b'W')
                        .is_some_and(|w| w.windows(17).any(|x| x == b"inline_code_block"));
                if !(ours
                    && be::put_fields_without(out, be::ERROR_RESPONSE_TAG, frame.body(), b"WFLR"))
                {
                    self.emit(frame, false, out);
                }
            }
            be::PARSE_COMPLETE_TAG | be::BIND_COMPLETE_TAG | be::CLOSE_COMPLETE_TAG => {
                let hidden = lock(&self.session).confirm();
                self.emit(frame, hidden, out);
            }
            be::PARAMETER_DESCRIPTION_TAG => {
                let session = lock(&self.session);
                let mut hidden = false;
                if let Some(Pending::DescribeStatement {
                    statement,
                    hidden: h,
                }) = session.queue.front()
                {
                    hidden = *h;
                    if let Ok(types) = be::parse_parameter_description(frame.body()) {
                        statement
                            .described_as
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .param_types = Some(types);
                    }
                }
                drop(session);
                self.emit(frame, hidden, out);
            }
            be::ROW_DESCRIPTION_TAG => {
                let shape = self.cached_shape(frame.body()).await?;
                let mut session = lock(&self.session);
                let hidden = match session.queue.front() {
                    Some(Pending::DescribeStatement { statement, hidden }) => {
                        let hidden = *hidden;
                        statement
                            .described_as
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .shape = Some(shape);
                        session.queue.pop_front();
                        hidden
                    }
                    Some(Pending::DescribePortal { portal, hidden }) => {
                        let hidden = *hidden;
                        *portal
                            .shape
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(shape);
                        session.queue.pop_front();
                        hidden
                    }
                    _ => {
                        self.current = Some(shape);
                        false
                    }
                };
                drop(session);
                self.emit(frame, hidden, out);
            }
            be::NO_DATA_TAG => {
                let mut session = lock(&self.session);
                let hidden = match session.queue.front() {
                    Some(Pending::DescribeStatement { statement, hidden }) => {
                        let hidden = *hidden;
                        statement
                            .described_as
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .shape = Some(Arc::new(Shape::empty()));
                        session.queue.pop_front();
                        hidden
                    }
                    Some(Pending::DescribePortal { portal, hidden }) => {
                        let hidden = *hidden;
                        *portal
                            .shape
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) =
                            Some(Arc::new(Shape::empty()));
                        session.queue.pop_front();
                        hidden
                    }
                    _ => false,
                };
                drop(session);
                self.emit(frame, hidden, out);
            }
            be::DATA_ROW_TAG => {
                if self.suppress {
                    return Ok(());
                }
                if self.current.is_none() {
                    // First row of an Execute: its shape comes from the portal (or the
                    // statement it was bound from); kept until the Execute completes.
                    let session = lock(&self.session);
                    if let Some(Pending::Execute {
                        portal: Some(p), ..
                    }) = session.queue.front()
                    {
                        self.current = p.shape();
                    }
                }
                let shape = self.current.clone();
                match shape {
                    Some(shape) if !shape.is_inert() => {
                        self.decrypt_row(&shape, frame, out).await?
                    }
                    _ => out.extend_from_slice(frame.raw()),
                }
            }
            be::COMMAND_COMPLETE_TAG => {
                let tag = be::parse_command_complete(frame.body())?;
                self.note_command(tag);
                self.current = None;
                let mut session = lock(&self.session);
                if matches!(session.queue.front(), Some(Pending::Execute { .. })) {
                    session.queue.pop_front();
                }
                drop(session);
                self.emit(frame, false, out);
            }
            be::EMPTY_QUERY_RESPONSE_TAG | be::PORTAL_SUSPENDED_TAG => {
                self.current = None;
                let mut session = lock(&self.session);
                if matches!(session.queue.front(), Some(Pending::Execute { .. })) {
                    session.queue.pop_front();
                }
                drop(session);
                self.emit(frame, false, out);
            }
            be::COPY_OUT_RESPONSE_TAG => {
                let (_, formats) = be::parse_copy_response(tag, frame.body())?;
                let job = {
                    let session = lock(&self.session);
                    match session.queue.front() {
                        Some(Pending::Query { copy_out, .. })
                        | Some(Pending::Execute { copy_out, .. }) => copy_out.clone(),
                        _ => None,
                    }
                };
                self.copy_out = match job {
                    Some(job) => {
                        let (encoding, tenant) = self.read_context();
                        Some(CopyOut::new(
                            job,
                            formats.len(),
                            encoding,
                            tenant,
                            self.max_row,
                        )?)
                    }
                    None => None,
                };
                self.emit(frame, false, out);
            }
            be::COPY_DATA_TAG if self.copy_out.is_some() => {
                if self.suppress {
                    return Ok(());
                }
                if let Some(copy) = self.copy_out.as_mut() {
                    copy.feed(frame.body(), &mut self.cipher, out).await?;
                }
            }
            be::COPY_DONE_TAG => {
                if let Some(mut copy) = self.copy_out.take() {
                    copy.finish(&mut self.cipher, out).await?;
                }
                self.emit(frame, false, out);
            }
            _ => self.emit(frame, false, out),
        }
        Ok(())
    }

    fn note_command(&mut self, tag: &[u8]) {
        self.rolled_back = tag.starts_with(b"ROLLBACK");
        let ddl = [
            &b"CREATE TABLE"[..],
            b"ALTER TABLE",
            b"DROP TABLE",
            b"DROP SCHEMA",
            b"ALTER SCHEMA",
            b"CREATE SCHEMA",
            b"SELECT INTO",
            b"CREATE TABLE AS",
        ];
        if ddl.iter().any(|d| tag.starts_with(d)) {
            let db = lock(&self.session).db.clone();
            self.cipher.engine().catalog.invalidate(&db);
        }
    }

    /// Client encoding and session tenant (not the default tenant: it does not restrict
    /// reads). The tenant is the one the request being answered was sent under, not the one
    /// in force now: a change pipelined after it does not apply to its rows.
    fn read_context(&self) -> (ClientEncoding, Option<OrgId>) {
        let session = lock(&self.session);
        let tenant = match session.queue.front() {
            Some(Pending::Query { tenant, .. }) | Some(Pending::Execute { tenant, .. }) => {
                tenant.clone()
            }
            _ => session.tenant.effective(),
        };
        (session.encoding.clone(), tenant)
    }

    /// The shape of a RowDescription, computed once per distinct description per connection
    /// (and again after DDL changed the catalog).
    async fn cached_shape(&mut self, body: &[u8]) -> Result<Arc<Shape>, Failure> {
        let epoch = self.cipher.engine().catalog.epoch();
        if epoch != self.shapes_epoch || self.shapes.len() > 512 {
            self.shapes.clear();
            self.shapes_epoch = epoch;
        }
        if let Some(hit) = self.shapes.get(body) {
            return Ok(Arc::clone(hit));
        }
        let fields = be::parse_row_description(body)?;
        // Boxed: the catalog look-up's future is large and rarely needed (see
        // `Cipher::active_key`).
        let shape = Arc::new(Box::pin(self.shape(&fields)).await?);
        self.shapes.insert(body.to_vec(), Arc::clone(&shape));
        Ok(shape)
    }

    async fn shape(&self, fields: &[FieldDescription]) -> Result<Shape, ClientError> {
        let engine = Arc::clone(self.cipher.engine());
        let rules = engine.rules();
        let db = lock(&self.session).db.clone();
        let mut columns = Vec::with_capacity(fields.len());
        for f in fields {
            let mut rule = None;
            let mut tenant_attnum = None;
            let mut key_attnum = None;
            if f.table_oid != 0 && f.attnum > 0 {
                let table = engine
                    .catalog
                    .table(&db, f.table_oid, &rules.rules)
                    .await
                    .map_err(|e| {
                        tracing::warn!(error = %e, "catalog unavailable");
                        ClientError::unavailable(
                            "pgenvelope: catalog look-up failed; cannot tell encrypted columns",
                        )
                    })?;
                if let Some(t) = table {
                    rule = t.encrypted.get(&f.attnum).cloned();
                    tenant_attnum = t.tenant_attnum;
                    key_attnum = t.key_attnum;
                }
            }
            let tenant_index = match (rule.is_some(), tenant_attnum) {
                (true, Some(att)) => fields
                    .iter()
                    .position(|g| g.table_oid == f.table_oid && g.attnum == att),
                _ => None,
            };
            // The row key of the same row: with the key twice in the result (a self-join),
            // which one belongs to this value is unknown, and the read is refused.
            let key_index = match (rule.is_some(), key_attnum) {
                (true, Some(att)) => {
                    let mut same = fields
                        .iter()
                        .enumerate()
                        .filter(|(_, g)| g.table_oid == f.table_oid && g.attnum == att)
                        .map(|(i, _)| i);
                    match (same.next(), same.next()) {
                        (Some(i), None) => Some(i),
                        _ => None,
                    }
                }
                _ => None,
            };
            columns.push(ColumnShape {
                rule,
                tenant_index,
                key_index,
                type_oid: f.type_oid,
                textlike: TEXTLIKE_OIDS.contains(&f.type_oid),
                format: f.format,
            });
        }
        Ok(Shape::new(columns))
    }

    async fn decrypt_row(
        &mut self,
        shape: &Shape,
        frame: &Frame,
        out: &mut BytesMut,
    ) -> Result<(), Failure> {
        let row = DataRow::parse(frame.body())?;
        let (encoding, tenant) = self.read_context();
        let mut replace: Vec<(usize, Option<Vec<u8>>)> = Vec::new();
        for (i, col) in shape.columns.iter().enumerate() {
            if col.rule.is_none() && !col.textlike {
                continue;
            }
            let Some(Some(value)) = row.get(i) else {
                continue;
            };
            let key = match col.key_index {
                Some(j) => field_text(&shape.columns[j], row.get(j).flatten(), &encoding)?,
                None => None,
            };
            let d = match self
                .cipher
                .read(
                    col.rule.as_ref(),
                    value,
                    tenant.as_ref(),
                    key.as_deref().map(str::as_bytes),
                )
                .await?
            {
                ReadOutcome::Decrypted(d) => d,
                ReadOutcome::Plain => continue,
                ReadOutcome::Shredded => {
                    replace.push((i, None));
                    continue;
                }
            };
            if let (Some(rule), Some(j)) = (&col.rule, col.tenant_index) {
                // The row names its organisation: the value must be that organisation's.
                let tcol = &shape.columns[j];
                // A tenant that cannot be read as text: an undecodable text field is another
                // organisation; a binary field of another type cannot name one as written.
                let other = match field_text(tcol, row.get(j).flatten(), &encoding) {
                    Ok(org) => org.is_some_and(|org| org != d.org.as_str()),
                    Err(_) => tcol.format == 0 || tcol.textlike,
                };
                if other {
                    self.cipher.engine().stats.decrypt_failures.inc("wrong_row");
                    return Err(ClientError::corrupted(format!(
                        "pgenvelope: value in {} belongs to another organisation than its row",
                        rule.qualified_name()
                    ))
                    .into());
                }
            }
            let text = String::from_utf8(d.plaintext)
                .map_err(|_| ClientError::corrupted("pgenvelope: a decrypted value is not text"))?;
            let converted = match encoding
                .encode(&text)
                .map_err(|e| ClientError::unsupported(format!("pgenvelope: {e}")))?
            {
                Cow::Borrowed(_) => None,
                Cow::Owned(b) => Some(b),
            };
            // The client's encoding is mostly UTF-8: then the plaintext goes out as it is.
            let bytes = converted.unwrap_or_else(|| text.into_bytes());
            replace.push((i, Some(bytes)));
        }
        if replace.is_empty() {
            out.extend_from_slice(frame.raw());
        } else {
            row.encode_with(&replace, out)?;
        }
        Ok(())
    }
}

/// A result field as PostgreSQL prints it (a row key, a row's tenant): the text of a
/// text-format field (borrowed from the row when it is UTF-8); a binary field is rendered for
/// integer, UUID and text types, and refused otherwise. `None` for NULL.
pub(crate) fn field_text<'a>(
    column: &ColumnShape,
    value: Option<&'a [u8]>,
    encoding: &ClientEncoding,
) -> Result<Option<Cow<'a, str>>, ClientError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let bad = || {
        ClientError::unsupported(
            "pgenvelope: a row key or tenant column was sent in a binary format the proxy \
             cannot read: request it in text format",
        )
    };
    if column.format == 0 || column.textlike {
        return encoding.decode(value).map(Some).map_err(|_| bad());
    }
    binary_as_text(column.type_oid, value)
        .map(|t| Some(Cow::Owned(t)))
        .ok_or_else(bad)
}
