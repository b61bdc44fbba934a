//! Server messages of an encrypting session: matches every response to the request queued by
//! the client side, learns result shapes from RowDescriptions, decrypts DataRow and COPY TO
//! values of encrypted columns, swallows the answers to requests the proxy injected, and
//! follows transaction ends for the session tenant.
//!
//! A value that fails to decrypt (tampered, another organisation's under a session tenant,
//! key unavailable) ends the result with an ErrorResponse carrying our SQLSTATE; the rest of
//! the server's answer up to ReadyForQuery is dropped, so the client sees an ordinary failed
//! statement and the connection stays in sync.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::BytesMut;
use zeroize::Zeroizing;

use crate::cipher::{ById, CipherError, Classified};
use crate::crypto::OrgId;
use crate::proxy::error::ClientError;
use crate::wire::backend::{self as be, DataRow, TransactionStatus};
use crate::wire::encoding::ClientEncoding;
use crate::wire::Frame;

use super::copy::CopyOut;
use super::session::Pending;
use super::shape::{field_text, Shape};
use super::{Ctx, Fail, Need, Out, Stop};

/// What handling a server message produced.
type Handled = Result<(), Fail>;

impl Ctx<'_> {
    /// Handle one inspected server message.
    pub(super) fn on_server(&mut self, frame: &Frame, out: &mut Out) -> Result<(), Stop> {
        let to_client = &mut out.to_client;
        match self.server_frame(frame, to_client) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(f)) => match self.checked(f) {
                Fail::Need(n) => Err(Stop::Need(n)),
                // Server messages never ask for a look-up.
                Fail::Lookup(_) | Fail::Answered => Ok(()),
                Fail::Refuse(e) => {
                    tracing::debug!(code = e.sqlstate(), "result refused");
                    if !self.e.suppress {
                        e.write(to_client);
                    }
                    self.e.suppress = true;
                    self.e.error_in_cycle = true;
                    self.e.copy_out = None;
                    self.e.current = None;
                    Ok(())
                }
            },
            Err(e) => Err(Stop::Malformed(e)),
        }
    }

    /// Forward `frame` unless suppressed or the request it answers was injected.
    fn emit(&self, frame: &Frame, hidden: bool, out: &mut BytesMut) {
        if !hidden && !self.e.suppress {
            out.extend_from_slice(frame.raw());
        }
    }

    /// The outer `Result` is a malformed message (the session ends); the inner one a refusal
    /// or a need.
    fn server_frame(
        &mut self,
        frame: &Frame,
        out: &mut BytesMut,
    ) -> Result<Handled, crate::wire::WireError> {
        let tag = frame.tag();
        if let Some(Pending::Lookup { simple }) = self.s.queue.front() {
            let simple = *simple;
            match tag {
                // The look-up's own answer: the proxy's, never the client's.
                be::ROW_DESCRIPTION_TAG => return Ok(Ok(())),
                be::DATA_ROW_TAG => {
                    let row = DataRow::parse(frame.body())?;
                    let value = row
                        .get(0)
                        .flatten()
                        .map(|v| String::from_utf8_lossy(v).into_owned());
                    self.lookup_row(value);
                    return Ok(Ok(()));
                }
                be::COMMAND_COMPLETE_TAG => {
                    self.lookup_done();
                    if !simple {
                        self.s.queue.pop_front();
                    }
                    return Ok(Ok(()));
                }
                _ => {}
            }
        }
        match tag {
            be::NOTICE_RESPONSE_TAG | be::NOTIFICATION_RESPONSE_TAG => self.emit(frame, false, out),
            be::PARAMETER_STATUS_TAG => {
                let (name, value) = be::parse_parameter_status(frame.body())?;
                match name {
                    b"client_encoding" => {
                        self.s.encoding = ClientEncoding::from_name(&String::from_utf8_lossy(value))
                    }
                    b"standard_conforming_strings" => {
                        self.s.lexing.standard_strings = value == b"on"
                    }
                    b"server_encoding" => self.s.lexing.server_sql_ascii = value == b"SQL_ASCII",
                    _ => {}
                }
                self.emit(frame, false, out);
            }
            be::READY_FOR_QUERY_TAG => {
                let status = be::parse_ready_for_query(frame.body())?;
                let ended = self.ready_for_query(status);
                // A look-up's cycle is the proxy's, unless its error stood in for the client's
                // statement.
                let hidden =
                    matches!(ended, Some(Pending::Lookup { .. })) && !self.e.lookups.failed();
                self.emit(frame, hidden, out);
            }
            be::ERROR_RESPONSE_TAG => self.error_response(frame, out),
            be::PARSE_COMPLETE_TAG | be::BIND_COMPLETE_TAG | be::CLOSE_COMPLETE_TAG => {
                let hidden = self.s.confirm();
                self.emit(frame, hidden, out);
            }
            be::PARAMETER_DESCRIPTION_TAG => {
                let mut hidden = false;
                let mut client_view = None;
                if let Some(Pending::DescribeStatement {
                    statement,
                    hidden: h,
                }) = self.s.queue.front()
                {
                    hidden = *h;
                    if let Ok(mut types) = be::parse_parameter_description(frame.body()) {
                        // The proxy's own parameters are not the client's to see.
                        if let Some(n) = statement.hidden_from() {
                            types.truncate(n - 1);
                            client_view = Some(types.clone());
                        }
                        let _ = statement.described_params.set(types);
                    }
                }
                match client_view {
                    Some(types) if !hidden && !self.e.suppress => {
                        be::put_parameter_description(out, &types)?;
                    }
                    _ => self.emit(frame, hidden, out),
                }
            }
            be::ROW_DESCRIPTION_TAG => {
                let shape = match self.cached_shape(frame.body())? {
                    Ok(shape) => shape,
                    Err(f) => return Ok(Err(f)),
                };
                let hidden = self.described(Some(shape));
                self.emit(frame, hidden, out);
            }
            be::NO_DATA_TAG => {
                let hidden = self.described(None);
                self.emit(frame, hidden, out);
            }
            be::DATA_ROW_TAG => {
                if self.e.suppress {
                    return Ok(Ok(()));
                }
                if self.e.current.is_none() {
                    // First row of an Execute: its shape comes from the portal (or the
                    // statement it was bound from); kept until the Execute completes.
                    if let Some(Pending::Execute {
                        portal: Some(p), ..
                    }) = self.s.queue.front()
                    {
                        self.e.current = p.shape();
                    }
                }
                match self.e.current.clone() {
                    Some(shape) if !shape.is_inert() => {
                        let row = DataRow::parse(frame.body())?;
                        let mut replace = Vec::new();
                        if let Err(f) = self.decrypt_row(&shape, &row, &mut replace) {
                            return Ok(Err(f));
                        }
                        if replace.is_empty() {
                            out.extend_from_slice(frame.raw());
                        } else {
                            row.encode_with(&replace, out)?;
                        }
                    }
                    _ => out.extend_from_slice(frame.raw()),
                }
            }
            be::COMMAND_COMPLETE_TAG => {
                let tag = be::parse_command_complete(frame.body())?;
                self.note_command(tag);
                self.e.current = None;
                if matches!(self.s.queue.front(), Some(Pending::Execute { .. })) {
                    self.s.queue.pop_front();
                }
                self.emit(frame, false, out);
            }
            be::EMPTY_QUERY_RESPONSE_TAG | be::PORTAL_SUSPENDED_TAG => {
                self.e.current = None;
                if matches!(self.s.queue.front(), Some(Pending::Execute { .. })) {
                    self.s.queue.pop_front();
                }
                self.emit(frame, false, out);
            }
            be::COPY_OUT_RESPONSE_TAG => {
                let (_, formats) = be::parse_copy_response(tag, frame.body())?;
                let job = match self.s.queue.front() {
                    Some(Pending::Query { copy_out, .. })
                    | Some(Pending::Execute { copy_out, .. }) => copy_out.clone(),
                    _ => None,
                };
                self.e.copy_out = match job {
                    Some(job) => {
                        let (encoding, tenant) = self.read_context();
                        match CopyOut::new(job, formats.len(), encoding, tenant, self.e.max_row) {
                            Ok(c) => Some(c),
                            Err(e) => return Ok(Err(e.into())),
                        }
                    }
                    None => None,
                };
                self.emit(frame, false, out);
            }
            be::COPY_DATA_TAG if self.e.copy_out.is_some() => {
                if self.e.suppress {
                    return Ok(Ok(()));
                }
                let rules = self.e.handles.rules.snapshot();
                if let Some(copy) = self.e.copy_out.as_mut() {
                    return Ok(copy.feed(
                        Some(frame.body()),
                        &mut self.e.cipher,
                        &rules.rules,
                        out,
                    ));
                }
            }
            be::COPY_DONE_TAG => {
                if let Some(copy) = self.e.copy_out.as_mut() {
                    let rules = self.e.handles.rules.snapshot();
                    if let Err(f) = copy.feed(None, &mut self.e.cipher, &rules.rules, out) {
                        return Ok(Err(f));
                    }
                    self.e.copy_out = None;
                }
                self.emit(frame, false, out);
            }
            _ => self.emit(frame, false, out),
        }
        Ok(Ok(()))
    }

    /// ReadyForQuery(`status`): the oldest outstanding cycle (and any the server skipped with
    /// it) is answered.
    fn ready_for_query(&mut self, status: TransactionStatus) -> Option<Pending> {
        let mut answered = None;
        while let Some(p) = self.s.queue.pop_front() {
            if p.ends_cycle() {
                answered = Some(p);
                break;
            }
        }
        self.s.status = status;
        if answered.is_some() {
            // Cycles the server skipped after an error end with this one.
            let rolled_back = self.e.rolled_back || self.e.error_in_cycle;
            for _ in 0..=std::mem::take(&mut self.e.skipped_cycles) {
                self.s.lexing.cycle_answered();
                self.s.tenant.cycle_answered(status, rolled_back);
            }
        }
        if status == TransactionStatus::Idle {
            // Portals end with their transaction.
            self.s.portals.clear();
        }
        self.e.suppress = false;
        self.e.error_in_cycle = false;
        self.e.rolled_back = false;
        self.e.current = None;
        self.e.copy_out = None;
        answered
    }

    fn error_response(&mut self, frame: &Frame, out: &mut BytesMut) {
        // An error while a look-up is out answers the statement waiting for it (the look-up
        // failed, or was skipped after an earlier error of the pipeline).
        self.lookup_failed();
        self.e.error_in_cycle = true;
        self.e.current = None;
        self.e.copy_out = None;
        let extended = self.s.queue.front().is_some_and(|p| !p.ends_cycle());
        if extended {
            // The server skips to Sync: so do the expectations, and the effects of the
            // skipped requests never happen.
            self.e.skipped_cycles += self.s.fail_extended();
        }
        let copy_refusal = self.s.copy_refusal.take();
        if self.e.suppress {
            return;
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
                return;
            }
        }
        // Our own refusals are raised by a DO block on the server: drop the PL/pgSQL
        // context and source location it adds (Where, File, Line, Routine), so the
        // client sees just our message and code.
        let ours = be::ErrorFields::find(frame.body(), b'M')
            .is_some_and(|m| m.starts_with(b"pgenvelope: "))
            && be::ErrorFields::find(frame.body(), b'W')
                .is_some_and(|w| w.windows(17).any(|x| x == b"inline_code_block"));
        if !(ours && be::put_fields_without(out, be::ERROR_RESPONSE_TAG, frame.body(), b"WFLR")) {
            self.emit(frame, false, out);
        }
    }

    /// A RowDescription (`Some`) or NoData (`None`) arrived: it answers a Describe of a
    /// statement or portal (recorded there), or starts a simple query's rows. Returns whether
    /// the Describe was injected (its answer is swallowed).
    fn described(&mut self, shape: Option<Arc<Shape>>) -> bool {
        match self.s.queue.front() {
            Some(Pending::DescribeStatement { statement, hidden }) => {
                let hidden = *hidden;
                let _ = statement
                    .shape
                    .set(shape.unwrap_or_else(|| Arc::new(Shape::empty())));
                self.s.queue.pop_front();
                hidden
            }
            Some(Pending::DescribePortal { portal, hidden }) => {
                let hidden = *hidden;
                let _ = portal
                    .shape
                    .set(shape.unwrap_or_else(|| Arc::new(Shape::empty())));
                self.s.queue.pop_front();
                hidden
            }
            _ => {
                if shape.is_some() {
                    self.e.current = shape;
                }
                false
            }
        }
    }

    fn note_command(&mut self, tag: &[u8]) {
        self.e.rolled_back = tag.starts_with(b"ROLLBACK");
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
            self.e.handles.catalog.invalidate(&self.s.db);
        }
    }

    /// Client encoding and session tenant (not the default tenant: it does not restrict
    /// reads). The tenant is the one the request being answered was sent under, not the one
    /// in force now: a change pipelined after it does not apply to its rows.
    fn read_context(&self) -> (ClientEncoding, Option<OrgId>) {
        let tenant = match self.s.queue.front() {
            Some(Pending::Query { tenant, .. }) | Some(Pending::Execute { tenant, .. }) => {
                tenant.clone()
            }
            _ => self.s.tenant.effective(),
        };
        (self.s.encoding.clone(), tenant)
    }

    /// The shape of a RowDescription, computed once per distinct description per connection
    /// (and again after DDL changed the catalog).
    fn cached_shape(
        &mut self,
        body: &[u8],
    ) -> Result<Result<Arc<Shape>, Fail>, crate::wire::WireError> {
        let catalog = &self.e.handles.catalog;
        let epoch = catalog.epoch();
        if epoch != self.e.shapes_epoch || self.e.shapes.len() > 512 {
            self.e.shapes.clear();
            self.e.shapes_epoch = epoch;
        }
        if let Some(hit) = self.e.shapes.get(body) {
            return Ok(Ok(Arc::clone(hit)));
        }
        let fields = be::parse_row_description(body)?;
        let db = &self.s.db;
        let failed = &self.e.tables_failed;
        let shape = Shape::of(&fields, |oid| match catalog.peek(db, oid) {
            Some(table) => Ok(table),
            None if failed.contains(&oid) => Err(Fail::Refuse(ClientError::CatalogUnavailable)),
            None => Err(Fail::Need(Need::Table(oid))),
        });
        let shape = match shape {
            Ok(s) => Arc::new(s),
            Err(f) => return Ok(Err(f)),
        };
        self.e.shapes.insert(body.to_vec(), Arc::clone(&shape));
        Ok(Ok(shape))
    }

    /// The values of `row` to replace (index, plaintext or NULL); nothing is written.
    fn decrypt_row(
        &mut self,
        shape: &Shape,
        row: &DataRow<'_>,
        replace: &mut Vec<(usize, Option<Zeroizing<Vec<u8>>>)>,
    ) -> Handled {
        let (encoding, tenant) = self.read_context();
        let rules = self.e.handles.rules.snapshot();
        let cipher = &mut self.e.cipher;
        // One pass: a value whose key is not at hand is noted and skipped; the row is handled
        // again once every key it needs is fetched (what this attempt counted is dropped).
        let mut needs = Vec::new();
        for (i, col) in shape.columns.iter().enumerate() {
            if col.rule.is_none() && !col.textlike {
                continue;
            }
            let Some(Some(value)) = row.get(i) else {
                continue;
            };
            let (parsed, found) = match cipher.classify(&rules.rules, col.rule.as_ref(), value)? {
                Classified::Plain => continue,
                Classified::Sealed { parsed, column } => (parsed, column),
            };
            let Some(column) = found.as_deref().or(col.rule.as_ref()) else {
                continue;
            };
            let key = match col.key_index {
                Some(j) => field_text(&shape.columns[j], row.get(j).flatten(), &encoding)?,
                None => None,
            };
            let dek = match cipher.by_id(parsed.dek_id(), column) {
                Ok(ById::Key(dek)) => dek,
                Ok(ById::Shredded) => {
                    replace.push((i, None));
                    continue;
                }
                Err(CipherError::Missing(need)) => {
                    if !needs.contains(&need) {
                        needs.push(need);
                    }
                    continue;
                }
                Err(e) => return Err(ClientError::from(e).into()),
            };
            if !needs.is_empty() {
                // Opened again with the row once the missing keys are here.
                continue;
            }
            let d = cipher.open_with(
                &dek,
                parsed,
                column,
                tenant.as_ref(),
                key.as_deref().map(str::as_bytes),
            )?;
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
                    cipher.count_failure("wrong_row");
                    return Err(ClientError::OtherOrgThanRow {
                        column: rule.qualified_name().to_owned(),
                    }
                    .into());
                }
            }
            let text = std::str::from_utf8(&d.plaintext)
                .map_err(|_| ClientError::NotText { column: None })?;
            // The client's encoding is mostly UTF-8: then the plaintext goes out as it is.
            let converted = match encoding.encode(text)? {
                Cow::Borrowed(_) => None,
                Cow::Owned(b) => Some(Zeroizing::new(b)),
            };
            let bytes = converted.unwrap_or(d.plaintext);
            replace.push((i, Some(bytes)));
        }
        if !needs.is_empty() {
            replace.clear();
            return Err(Fail::Need(Need::Keys(needs)));
        }
        Ok(())
    }
}
