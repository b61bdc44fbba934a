//! Client → server direction of an encrypting session: analyses statements, encrypts the
//! literals, parameters and COPY fields bound for encrypted columns, tracks prepared
//! statements and portals, and queues what the server side must expect.
//!
//! A statement that cannot be encrypted safely is never forwarded. In its place the server is
//! made to raise our error (`DO … RAISE`), so the client sees an ordinary ErrorResponse with
//! our SQLSTATE at exactly the right point, the transaction is aborted as for any other
//! error, and the rest of an extended-protocol pipeline is skipped up to Sync. Never logs
//! values, parameters or SQL text.
//!
//! Prepared statements and portals follow the server, not the client: a Parse, Bind or Close
//! is queued with its effect, which the server side commits only on ParseComplete,
//! BindComplete or CloseComplete (a Parse the server refuses, or anything it skips after an
//! error, changes nothing). A Bind or Execute looks its statement or portal up through the
//! requests still in flight ([`crate::proxy::session::Session::statement_ahead`]); when that
//! depends on an earlier, still unanswered cycle (a pipelined redefinition that may yet fail)
//! and either candidate touches a protected table, it is refused (0A000) rather than guessed.
//! While the server skips messages up to Sync (after our refusal, or after its own error
//! reported before the client's Sync was forwarded), every message up to Sync is dropped, a
//! Query included, as PostgreSQL ignores them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::BytesMut;

use crate::crypto::OrgId;
use crate::proxy::copy::CopyIn;
use crate::proxy::engine::{Cipher, Restored, RulesSnapshot};
use crate::proxy::error::ClientError;
use crate::proxy::pump::{Handler, PumpError};
use crate::proxy::session::{binary_as_text, may_change_lexing};
use crate::proxy::session::{
    lock, Ahead, CopyJob, Pending, Portal, SharedSession, Statement, TenantChangeOp,
};
use crate::rules::ColumnRule;
use crate::sql::{
    Analysis, ColumnRef, CopyDirection, LiteralSite, RowKeySource, TenantChange, TenantSource,
    TxControl,
};
use crate::wire::encoding::{ClientEncoding, EncodingError};
use crate::wire::frontend::{self as fe, Bind, Parse, Target};
use crate::wire::{Frame, WireError};

/// Name of the statement the proxy prepares to raise a refusal in extended protocol.
const REJECT_STATEMENT: &[u8] = b"__pgenvelope_reject";

/// Refusal while a statement that may change how text is read is still in flight.
const IN_FLIGHT: &str = "pgenvelope: a statement that may change client_encoding or standard_conforming_strings is still in flight; send this statement after its answer (or with ASCII-only text)";

/// Refusal of a Bind or Execute whose statement or portal an earlier, still unanswered cycle
/// redefines or closes: which one the server will use depends on whether that cycle succeeds.
const UNSETTLED: &str = "pgenvelope: the prepared statement or portal is redefined or closed by an earlier request whose answer has not arrived yet; send this after its answer";

/// Refusal of a Bind or Execute of values sealed for the session tenant after that tenant
/// changed: the values belong to the organisation in force when they were sealed.
const TENANT_CHANGED: &str = "pgenvelope: this statement holds values sealed for the session tenant in force when it was prepared or bound, and pgenvelope.tenant has changed since: prepare or bind it again";

/// OIDs of parameter types an encrypted value may be bound as.
const TEXT_OIDS: &[u32] = &[25, 1043, 1042, 705];

/// The client → server handler.
pub(crate) struct ClientSide {
    pub(crate) session: SharedSession,
    pub(crate) cipher: Cipher,
    pub(crate) copy_in: Option<CopyIn>,
    /// After an encryption failure inside COPY FROM: drop the client's COPY data up to its
    /// CopyDone/CopyFail (the server already got CopyFail).
    pub(crate) copy_failed: bool,
    pub(crate) max_row: usize,
    pub(crate) activity: Arc<crate::proxy::drain::Activity>,
}

impl Handler for ClientSide {
    type Error = PumpError;

    fn on_tag(&mut self, tag: u8) {
        self.activity.client_message(tag);
    }

    fn inspects(&self, tag: u8) -> bool {
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
                self.copy_in.is_some() || self.copy_failed
            }
            _ => false,
        }
    }

    async fn on_message(&mut self, frame: Frame, out: &mut BytesMut) -> Result<(), PumpError> {
        crate::proxy::fault::check(&frame);
        let tag = frame.tag();
        // After an error in the extended protocol the server skips every message up to Sync,
        // a Query too: so do we (nothing of theirs is analysed, forwarded or expected), except
        // for messages that carry no statement (Flush must reach the server so it sends the
        // error; Terminate ends the session).
        if lock(&self.session).skipping
            && !matches!(tag, fe::SYNC_TAG | fe::FLUSH_TAG | fe::TERMINATE_TAG)
        {
            return Ok(());
        }
        match tag {
            fe::QUERY_TAG => self.on_query(&frame, out).await,
            fe::PARSE_TAG => self.on_parse(&frame, out).await,
            fe::BIND_TAG => self.on_bind(&frame, out).await,
            fe::DESCRIBE_TAG => self.on_describe(&frame, out),
            fe::EXECUTE_TAG => self.on_execute(&frame, out).await,
            fe::CLOSE_TAG => self.on_close(&frame, out),
            fe::SYNC_TAG => {
                push_cycle(&self.session, Pending::Sync);
                out.extend_from_slice(frame.raw());
                Ok(())
            }
            fe::FUNCTION_CALL_TAG => {
                // Any function may change a setting.
                lock(&self.session).lexing.may_change();
                if push_cycle(&self.session, Pending::FunctionCall) {
                    out.extend_from_slice(frame.raw());
                }
                Ok(())
            }
            fe::COPY_DATA_TAG | fe::COPY_DONE_TAG | fe::COPY_FAIL_TAG => {
                self.on_copy(&frame, out).await
            }
            _ => {
                out.extend_from_slice(frame.raw());
                Ok(())
            }
        }
    }
}

impl ClientSide {
    fn encoding(&self) -> ClientEncoding {
        lock(&self.session).encoding.clone()
    }

    fn count_rejection(&self, code: &str) {
        self.cipher
            .engine()
            .stats
            .statements_rejected
            .inc(crate::proxy::engine::reject_reason(code));
    }

    /// Decode SQL text for analysis. `Ok(None)`: it cannot touch protected tables.
    ///
    /// The text is read as the server will read it: in the session's client_encoding (for an
    /// encoding the proxy cannot convert, a view that keeps ASCII and lexes as PostgreSQL does,
    /// good for statements that carry no value for an encrypted column), and refused when the
    /// reading depends on a setting the proxy does not know for sure (see [`crate::proxy::session::LexState`]).
    fn analyse(&self, sql: &[u8]) -> Result<Option<(String, Arc<Analysis>)>, ClientError> {
        let engine = self.cipher.engine();
        let (encoding, standard_strings, uncertain, bytewise) = {
            let s = lock(&self.session);
            (
                s.encoding.clone(),
                s.lexing.standard_strings,
                s.lexing.uncertain(),
                s.lexing.server_sql_ascii,
            )
        };
        // ASCII reads the same in every client encoding PostgreSQL supports.
        if uncertain && !sql.is_ascii() && engine.might_touch(&String::from_utf8_lossy(sql)) {
            return Err(ClientError::unsupported(IN_FLIGHT));
        }
        // `exact`: the text is what the server reads, values included.
        let (text, exact) = match encoding.decode(sql) {
            Ok(t) => (t, true),
            Err(e) => {
                // Table names are ASCII: a lossy view is enough to decide that the text
                // cannot touch a protected table.
                if !engine.might_touch(&String::from_utf8_lossy(sql)) {
                    return Ok(None);
                }
                let view = match &e {
                    EncodingError::Unsupported(_)
                        if sql.is_ascii() || engine.rules().protected.ascii_names() =>
                    {
                        encoding.lexing_view(sql, bytewise)
                    }
                    _ => None,
                };
                match view {
                    Some(v) => (std::borrow::Cow::Owned(v), sql.is_ascii()),
                    None => return Err(ClientError::unsupported(format!("pgenvelope: {e}"))),
                }
            }
        };
        if !engine.might_touch(&text) {
            return Ok(None);
        }
        let analysis = engine.analyze(&text);
        if let Some(rej) = &analysis.rejection {
            return Err(ClientError::unsupported(rej.message()));
        }
        if let Some(refusal) = crate::sql::lexing_refusal(&analysis, standard_strings, uncertain) {
            return Err(ClientError::unsupported(refusal.message()));
        }
        if !exact && (!analysis.literals.is_empty() || !analysis.tenant_changes.is_empty()) {
            return Err(ClientError::unsupported(format!(
                "pgenvelope: {}",
                EncodingError::Unsupported(encoding.name().to_owned())
            )));
        }
        if uncertain
            && analysis
                .copy
                .as_ref()
                .is_some_and(|c| c.direction == CopyDirection::FromStdin)
        {
            return Err(ClientError::unsupported(IN_FLIGHT));
        }
        Ok(Some((text.into_owned(), analysis)))
    }

    async fn on_query(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<(), PumpError> {
        // A new simple query ends any leftover COPY state of a previous one (a COPY that the
        // server refused before any data was sent leaves it set).
        self.copy_failed = false;
        self.copy_in = None;
        let sql = fe::parse_query(frame.body())?;
        let prepared = self.prepare_query(sql).await;
        if may_change_lexing(sql) {
            lock(&self.session).lexing.may_change();
        }
        let copy_out = prepared.as_ref().ok().and_then(|p| p.copy_out.clone());
        let query = Pending::Query {
            copy_out,
            tenant: None,
        };
        if !push_cycle(&self.session, query) {
            // An error reported meanwhile put the server in its skip-to-Sync state: it will
            // ignore this Query, so it is not sent.
            self.copy_in = None;
            return Ok(());
        }
        match prepared {
            Ok(Prepared { sql: None, .. }) => out.extend_from_slice(frame.raw()),
            Ok(Prepared {
                sql: Some(new_sql), ..
            }) => fe::put_query(out, &new_sql)?,
            Err(e) => {
                self.count_rejection(e.code);
                self.copy_in = None;
                tracing::debug!(code = e.code, "statement refused");
                fe::put_query(out, e.raise_sql().as_bytes())?;
            }
        }
        Ok(())
    }

    /// Analyse and rewrite a simple query.
    async fn prepare_query(&mut self, sql: &[u8]) -> Result<Prepared, ClientError> {
        let Some((text, analysis)) = self.analyse(sql)? else {
            return Ok(Prepared::default());
        };
        // Literals are sealed before the text runs: a tenant change in the same text would
        // take effect only after they were sealed, so the two may not be mixed.
        if !analysis.tenant_changes.is_empty() && seals_under_session(&analysis.literals) {
            return Err(ClientError::unsupported(
                "pgenvelope: a change of pgenvelope.tenant and a write that uses the session \
                 tenant must be sent as separate queries",
            ));
        }
        // Rows are read under the tenant in force once the text's changes are made; a
        // statement before a change would be read under the wrong one.
        if analysis.protected_before_tenant_change {
            return Err(ClientError::unsupported(
                "pgenvelope: a change of pgenvelope.tenant must come before any statement on an \
                 encrypted table in one query string (or be sent as a separate query)",
            ));
        }
        let new_sql = self.rewrite_literals(&text, &analysis, None).await?;
        let mut prepared = Prepared {
            sql: new_sql,
            ..Prepared::default()
        };
        match &analysis.copy {
            // A COPY of a query naming no protected table, among other statements: relayed
            // as is (its output is only scanned for enc:v1 values when sent on its own).
            Some(_) if analysis.statement_count > 1 && !analysis.touches_protected => {}
            Some(_) if analysis.statement_count > 1 => {
                return Err(ClientError::unsupported(
                    "pgenvelope: COPY on an encrypted table must be sent as a statement of its own",
                ));
            }
            Some(plan) => {
                let job = self.copy_job(plan).await?;
                match plan.direction {
                    CopyDirection::FromStdin => self.start_copy_in(job).await?,
                    CopyDirection::ToStdout => prepared.copy_out = Some(job),
                }
            }
            None => {}
        }
        let ops = self.tenant_ops(&analysis, None)?;
        self.apply_tenant_ops(&ops);
        Ok(prepared)
    }

    /// Encrypt the literals of `analysis` and return the rewritten SQL in the client's
    /// encoding (`None` when nothing changed).
    async fn rewrite_literals(
        &mut self,
        text: &str,
        analysis: &Analysis,
        bind: Option<&BindValues<'_>>,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        if analysis.literals.is_empty() {
            return Ok(None);
        }
        let mut replacements = Vec::with_capacity(analysis.literals.len());
        let rules = self.rules();
        for site in &analysis.literals {
            let column = rule_for(&rules, &site.column)?;
            let org = self.tenant_for(&site.tenant, column, bind)?;
            let key = self.row_key_for(site.row_key.as_ref(), column, bind)?;
            let Some(sealed) = self
                .seal_value(column, &org, key.as_deref(), site.value.as_bytes())
                .await?
            else {
                continue;
            };
            replacements.push((site.range.clone(), format!("'{sealed}'")));
        }
        let new = crate::sql::rewrite_literals(text, &replacements).map_err(|_| {
            ClientError::unsupported("pgenvelope: statement could not be rewritten")
        })?;
        let bytes = self
            .encoding()
            .encode(&new)
            .map_err(|e| ClientError::unsupported(format!("pgenvelope: {e}")))?
            .into_owned();
        Ok(Some(bytes))
    }

    /// Encrypt a value for `column`, or `None` if it already is a valid enc:v1 value of this
    /// column and organisation (restores, re-runs): such values are stored unchanged, except
    /// that one sealed before its table's values were bound to their rows is sealed again,
    /// bound to the row written.
    async fn seal_value(
        &mut self,
        column: &ColumnRule,
        org: &OrgId,
        row_key: Option<&str>,
        plaintext: &[u8],
    ) -> Result<Option<String>, ClientError> {
        let row_key = row_key.map(str::as_bytes);
        // Only a value shaped like an envelope of this column is checked; other text that
        // starts with `enc:v1:` is data and is encrypted like any other.
        if crate::proxy::copy::is_envelope_of(column, plaintext) {
            match self
                .cipher
                .read_restored(column, plaintext, row_key)
                .await?
            {
                Some(Restored::AsIs(d)) if &d.org == org => return Ok(None),
                Some(Restored::Rebind(d)) if &d.org == org => {
                    return self
                        .cipher
                        .encrypt(column, org, row_key, &d.plaintext)
                        .await
                        .map(Some)
                }
                Some(Restored::AsIs(_) | Restored::Rebind(_)) => {
                    return Err(ClientError::privilege(format!(
                        "pgenvelope: the encrypted value for {} belongs to another organisation",
                        column.qualified_name()
                    )))
                }
                // Fails authentication: not a value of ours, just data.
                None => {}
            }
        }
        self.cipher
            .encrypt(column, org, row_key, plaintext)
            .await
            .map(Some)
    }

    /// The rules in force for this statement (one snapshot, so a reload between two values of
    /// one statement cannot mix rule sets, and no rule is cloned per value).
    fn rules(&self) -> Arc<RulesSnapshot> {
        self.cipher.engine().rules()
    }

    /// The key of the row a value of `column` is written to (row binding), as PostgreSQL
    /// will print it; `None` when the table does not bind values to their row.
    fn row_key_for(
        &self,
        source: Option<&RowKeySource>,
        column: &ColumnRule,
        bind: Option<&BindValues<'_>>,
    ) -> Result<Option<String>, ClientError> {
        let Some(source) = source else {
            return Ok(None);
        };
        let key = column.row_key().unwrap_or_default();
        let value = match source {
            RowKeySource::Literal(v) => v.clone(),
            RowKeySource::Param(n) => {
                let Some(bind) = bind else {
                    return Err(ClientError::unsupported(format!(
                        "pgenvelope: the value for {} is a literal but the row key {key} is the \
                         parameter ${n}: pass the value as a parameter too",
                        column.qualified_name()
                    )));
                };
                match bind.text(*n, &self.encoding())? {
                    Some(v) => v,
                    None => {
                        return Err(ClientError::unsupported(format!(
                            "pgenvelope: values of {} are bound to their row: the row key {key} \
                             may not be NULL",
                            column.qualified_name()
                        )))
                    }
                }
            }
        };
        if !key_stores_as_written(&value) {
            return Err(ClientError::unsupported(format!(
                "pgenvelope: the row key {key} given for {} may be stored differently from how \
                 it is written (surrounding spaces, a number or UUID not in canonical form): \
                 write it as PostgreSQL prints it",
                column.qualified_name()
            )));
        }
        Ok(Some(value))
    }

    /// The organisation owning a value written to `column`.
    fn tenant_for(
        &self,
        source: &TenantSource,
        column: &ColumnRule,
        bind: Option<&BindValues<'_>>,
    ) -> Result<OrgId, ClientError> {
        let invalid = || {
            ClientError::privilege(format!(
                "pgenvelope: the tenant given for {} is not a valid organisation id",
                column.qualified_name()
            ))
        };
        let row_tenant = |v: String| {
            if !stores_as_written(&v) {
                return Err(ClientError::privilege(format!(
                    "pgenvelope: the tenant given for {} may be stored differently from how it is \
                     written (surrounding spaces, or a number not in canonical form): write it \
                     as PostgreSQL stores it",
                    column.qualified_name()
                )));
            }
            OrgId::new(v).map_err(|_| invalid())
        };
        match source {
            TenantSource::Literal(v) => row_tenant(v.clone()),
            TenantSource::Param(n) => {
                let Some(bind) = bind else {
                    // A literal is encrypted when the statement is parsed, before any Bind
                    // says which organisation the row belongs to.
                    return Err(ClientError::unsupported(format!(
                        "pgenvelope: the value for {} is a literal but the row's tenant is the \
                         parameter ${n}: pass the value as a parameter too",
                        column.qualified_name()
                    )));
                };
                match bind.text(*n, &self.encoding())? {
                    Some(v) => row_tenant(v),
                    None => self.session_tenant(column),
                }
            }
            TenantSource::Session => self.session_tenant(column),
        }
    }

    fn session_tenant(&self, column: &ColumnRule) -> Result<OrgId, ClientError> {
        let session = lock(&self.session);
        if let Some(t) = session.tenant.effective() {
            return Ok(t);
        }
        drop(session);
        if let Some(t) = &self.cipher.engine().default_tenant {
            return Ok(t.clone());
        }
        Err(ClientError::privilege(format!(
            "pgenvelope: no tenant for a write to {}: set the table's tenant column, \
             SET pgenvelope.tenant, or start the proxy with --default-tenant",
            column.qualified_name()
        )))
    }

    /// Record tenant changes and savepoint events in the session's tenant history, in order.
    fn apply_tenant_ops(&self, ops: &[TenantChangeOp]) {
        if ops.is_empty() {
            return;
        }
        let mut session = lock(&self.session);
        for op in ops {
            match op {
                TenantChangeOp::Change { value, local } => {
                    session.tenant.set(value.clone(), *local);
                }
                other => session.tenant.savepoint_event(other.clone()),
            }
        }
    }

    /// The tenant changes and savepoint events a statement makes, with their values read
    /// (from the text, or from `bind`) and checked. Recorded by [`Self::apply_tenant_ops`]
    /// when the statement runs: a simple query at once, a portal at its Execute.
    fn tenant_ops(
        &self,
        analysis: &Analysis,
        bind: Option<&BindValues<'_>>,
    ) -> Result<Vec<TenantChangeOp>, ClientError> {
        let savepoints: Vec<TenantChangeOp> = analysis
            .tx_controls
            .iter()
            .filter_map(|t| match t {
                TxControl::Savepoint(n) => Some(TenantChangeOp::Savepoint(n.clone())),
                TxControl::RollbackTo(n) => Some(TenantChangeOp::RollbackTo(n.clone())),
                TxControl::Release(n) => Some(TenantChangeOp::Release(n.clone())),
                _ => None,
            })
            .collect();
        if !savepoints.is_empty() {
            if !analysis.tenant_changes.is_empty() {
                // Their relative order is not kept by the analysis.
                return Err(ClientError::unsupported(
                    "pgenvelope: a change of pgenvelope.tenant and a savepoint command must be \
                     sent as separate queries",
                ));
            }
            return Ok(savepoints);
        }
        let mut ops = Vec::new();
        for change in &analysis.tenant_changes {
            if let Some((value, local)) = self.tenant_change(change, bind)? {
                ops.push(TenantChangeOp::Change { value, local });
            }
        }
        Ok(ops)
    }

    /// The new tenant (`None`: reset) and whether it is `LOCAL`, or `None` when `change`
    /// turns out not to change the tenant (a bound setting name that names another setting).
    fn tenant_change(
        &self,
        change: &TenantChange,
        bind: Option<&BindValues<'_>>,
    ) -> Result<Option<(Option<OrgId>, bool)>, ClientError> {
        let invalid = || ClientError::privilege("pgenvelope: invalid pgenvelope.tenant value");
        let outside = || {
            ClientError::unsupported(
                "pgenvelope: set_config with a parameter outside the extended protocol",
            )
        };
        Ok(match change {
            TenantChange::Set { value, local } => {
                let org = if value.is_empty() {
                    None
                } else {
                    Some(OrgId::new(value.clone()).map_err(|_| invalid())?)
                };
                Some((org, *local))
            }
            TenantChange::SetParam { param, local } => {
                let bind = bind.ok_or_else(outside)?;
                let org = match bind.text(*param, &self.encoding())? {
                    Some(v) if !v.is_empty() => Some(OrgId::new(v).map_err(|_| invalid())?),
                    _ => None,
                };
                Some((org, *local))
            }
            TenantChange::Reset { local } => Some((None, *local)),
            TenantChange::IfParamNamesTenant { name, change } => {
                let bind = bind.ok_or_else(outside)?;
                // set_config(NULL, …) is an error on the server: no change.
                let names_tenant = bind
                    .text(*name, &self.encoding())?
                    .is_some_and(|n| n.eq_ignore_ascii_case(crate::sql::TENANT_SETTING));
                if !names_tenant || matches!(**change, TenantChange::IfParamNamesTenant { .. }) {
                    return Ok(None);
                }
                self.tenant_change(change, Some(bind))?
            }
        })
    }

    async fn on_parse(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<(), PumpError> {
        let parse = Parse::decode(frame.body())?;
        match self.prepare_parse(&parse).await {
            Ok((mut statement, rewritten)) => {
                statement.changes_lexing = may_change_lexing(parse.sql);
                // Takes effect when the server confirms it (ParseComplete).
                lock(&self.session).queue.push_back(Pending::Parse {
                    hidden: false,
                    name: parse.name.to_vec(),
                    statement: Some(Arc::new(statement)),
                });
                match rewritten {
                    Some(bytes) => out.extend_from_slice(&bytes),
                    None => out.extend_from_slice(frame.raw()),
                }
                Ok(())
            }
            // Never forwarded: the server keeps what it had under this name, and so do we.
            Err(e) => self.reject_extended(&e, out),
        }
    }

    async fn prepare_parse(
        &mut self,
        parse: &Parse<'_>,
    ) -> Result<(Statement, Option<BytesMut>), ClientError> {
        let Some((text, analysis)) = self.analyse(parse.sql)? else {
            return Ok((
                Statement {
                    param_types: parse.param_types.clone(),
                    ..Statement::default()
                },
                None,
            ));
        };
        let mut types = parse.param_types.clone();
        for site in &analysis.params {
            let i = site.index - 1;
            if types.len() <= i {
                types.resize(i + 1, 0);
            }
            match types[i] {
                0 => types[i] = 25,
                t if TEXT_OIDS.contains(&t) => {}
                _ => {
                    return Err(ClientError::unsupported(format!(
                        "pgenvelope: parameter ${} for encrypted column {} must be text",
                        site.index, site.column
                    )))
                }
            }
        }
        let new_sql = self.rewrite_literals(&text, &analysis, None).await?;
        let sealed_for = if new_sql.is_some() && seals_under_session(&analysis.literals) {
            self.session_or_default()
        } else {
            None
        };
        let changed = new_sql.is_some() || types != parse.param_types;
        let rewritten = if changed {
            let mut buf = BytesMut::new();
            let sql = new_sql.as_deref().unwrap_or(parse.sql);
            Parse {
                name: parse.name,
                sql,
                param_types: types.clone(),
            }
            .encode(&mut buf)
            .map_err(|_| ClientError::unsupported("pgenvelope: statement could not be encoded"))?;
            Some(buf)
        } else {
            None
        };
        Ok((
            Statement {
                analysis: Some(analysis),
                param_types: types,
                sealed_for,
                ..Statement::default()
            },
            rewritten,
        ))
    }

    async fn on_bind(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<(), PumpError> {
        let bind = Bind::decode(frame.body())?;
        let ahead = lock(&self.session).statement_ahead(bind.statement);
        if let Ahead::Uncertain(candidates) = &ahead {
            let inert = candidates
                .iter()
                .all(|c| c.as_ref().is_none_or(|s| s.analysis.is_none()));
            if !inert {
                return self.reject_extended(&ClientError::unsupported(UNSETTLED), out);
            }
        }
        let statement = ahead.latest().unwrap_or_default();
        let result = self.prepare_bind(&bind, &statement).await;
        match result {
            Ok(BoundValues {
                sealed: rewritten,
                sealed_for,
                tenant_ops,
            }) => {
                let portal = Arc::new(Portal {
                    statement,
                    result_formats: bind.result_formats.clone(),
                    described: AtomicBool::new(false),
                    shape: Default::default(),
                    sealed_for,
                    tenant_ops: std::sync::Mutex::new(tenant_ops),
                });
                // Takes effect when the server confirms it (BindComplete).
                lock(&self.session).queue.push_back(Pending::Bind {
                    hidden: false,
                    name: bind.portal.to_vec(),
                    portal: Some(portal),
                });
                match rewritten {
                    Some(sealed) => {
                        // Straight into the output: the other parameters are copied once.
                        let mut refs = bind.params.clone();
                        for (i, value) in &sealed {
                            refs[*i] = Some(value.as_slice());
                        }
                        let start = out.len();
                        if bind.encode_with(&refs, out).is_err() {
                            out.truncate(start);
                            return self.reject_extended(
                                &ClientError::unsupported(
                                    "pgenvelope: parameters could not be encoded",
                                ),
                                out,
                            );
                        }
                    }
                    None => out.extend_from_slice(frame.raw()),
                }
                Ok(())
            }
            Err(e) => self.reject_extended(&e, out),
        }
    }

    /// Seal the parameters bound for encrypted columns, and read the tenant changes the
    /// statement makes with these parameters.
    async fn prepare_bind(
        &mut self,
        bind: &Bind<'_>,
        statement: &Statement,
    ) -> Result<BoundValues, ClientError> {
        let Some(analysis) = statement.analysis.clone() else {
            return Ok(BoundValues::default());
        };
        if statement.sealed_for.is_some() && statement.sealed_for != self.session_or_default() {
            return Err(ClientError::unsupported(TENANT_CHANGED));
        }
        let described = statement
            .described_as
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .param_types
            .clone();
        let values = BindValues {
            bind,
            types: described.unwrap_or_else(|| statement.param_types.clone()),
        };
        let (encoding, uncertain) = {
            let s = lock(&self.session);
            (s.encoding.clone(), s.lexing.uncertain())
        };
        if uncertain && non_ascii_tenant_param(&analysis, bind) {
            // Read in the wrong encoding, a tenant would name another organisation.
            return Err(ClientError::unsupported(IN_FLIGHT));
        }
        let tenant_ops = self.tenant_ops(&analysis, Some(&values))?;
        if analysis.params.is_empty() {
            return Ok(BoundValues {
                sealed: None,
                sealed_for: statement.sealed_for.clone(),
                tenant_ops,
            });
        }
        // (parameter index, sealed value) of every parameter that changes.
        let mut sealed_params = Vec::with_capacity(analysis.params.len());
        let rules = self.rules();
        for site in &analysis.params {
            let Some(Some(raw)) = bind.params.get(site.index - 1).copied() else {
                continue;
            };
            let column = rule_for(&rules, &site.column)?;
            if raw.contains(&0) {
                return Err(ClientError::invalid_text(format!(
                    "pgenvelope: parameter ${} for encrypted column {} holds a NUL byte, which text cannot hold",
                    site.index, site.column
                )));
            }
            if uncertain && !raw.is_ascii() {
                return Err(ClientError::unsupported(IN_FLIGHT));
            }
            let org = self.tenant_for(&site.tenant, column, Some(&values))?;
            let key = self.row_key_for(site.row_key.as_ref(), column, Some(&values))?;
            // Text and binary send of text types both carry the text in the client encoding.
            let plaintext = encoding
                .decode(raw)
                .map_err(|e| ClientError::unsupported(format!("pgenvelope: {e}")))?;
            if let Some(sealed) = self
                .seal_value(column, &org, key.as_deref(), plaintext.as_bytes())
                .await?
            {
                sealed_params.push((site.index - 1, sealed.into_bytes()));
            }
        }
        let sealed_for = if !sealed_params.is_empty() && seals_under_session_params(&analysis) {
            self.session_or_default()
        } else {
            statement.sealed_for.clone()
        };
        Ok(BoundValues {
            sealed: (!sealed_params.is_empty()).then_some(sealed_params),
            sealed_for,
            tenant_ops,
        })
    }

    fn on_describe(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<(), PumpError> {
        let (target, name) = fe::parse_target(fe::DESCRIBE_TAG, frame.body())?;
        let mut session = lock(&self.session);
        let pending = match target {
            Target::Statement => {
                let statement = session.statement_ahead(name).latest().unwrap_or_default();
                statement.described.store(true, Ordering::Relaxed);
                Pending::DescribeStatement {
                    statement,
                    hidden: false,
                }
            }
            Target::Portal => {
                let portal = session.portal_ahead(name).latest().unwrap_or_else(|| {
                    Arc::new(Portal {
                        statement: Arc::default(),
                        result_formats: Vec::new(),
                        described: AtomicBool::new(true),
                        shape: Default::default(),
                        sealed_for: None,
                        tenant_ops: Default::default(),
                    })
                });
                portal.described.store(true, Ordering::Relaxed);
                Pending::DescribePortal {
                    portal,
                    hidden: false,
                }
            }
        };
        session.queue.push_back(pending);
        drop(session);
        out.extend_from_slice(frame.raw());
        Ok(())
    }

    async fn on_execute(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<(), PumpError> {
        let (name, _max_rows) = fe::parse_execute(frame.body())?;
        let ahead = lock(&self.session).portal_ahead(name);
        if let Ahead::Uncertain(candidates) = &ahead {
            let inert = candidates
                .iter()
                .all(|c| c.as_ref().is_none_or(|p| p.statement.analysis.is_none()));
            if !inert {
                return self.reject_extended(&ClientError::unsupported(UNSETTLED), out);
            }
        }
        let portal = ahead.latest();
        if let Some(sealed_for) = portal.as_ref().and_then(|p| p.sealed_for.as_ref()) {
            if Some(sealed_for) != self.session_or_default().as_ref() {
                return self.reject_extended(&ClientError::unsupported(TENANT_CHANGED), out);
            }
        }
        let mut copy_out = None;
        // Only this Execute's own COPY may rewrite the data that follows it.
        self.copy_in = None;
        self.copy_failed = false;
        if let Some(portal) = &portal {
            if portal.statement.changes_lexing {
                lock(&self.session).lexing.may_change();
            }
            if let Some(plan) = portal
                .statement
                .analysis
                .as_ref()
                .and_then(|a| a.copy.clone())
            {
                let job = match self.copy_job(&plan).await {
                    Ok(job) => job,
                    Err(e) => return self.reject_extended(&e, out),
                };
                match plan.direction {
                    CopyDirection::FromStdin => {
                        if let Err(e) = self.start_copy_in(job).await {
                            return self.reject_extended(&e, out);
                        }
                    }
                    CopyDirection::ToStdout => copy_out = Some(job),
                }
            }
            let known = portal.described.load(Ordering::Relaxed)
                || portal.statement.described.load(Ordering::Relaxed);
            if !known {
                // The client never asked for the row description; the server side needs it
                // to find encrypted columns, so ask for it and swallow the answer.
                fe::put_describe(out, Target::Portal, name)?;
                portal.described.store(true, Ordering::Relaxed);
                lock(&self.session)
                    .queue
                    .push_back(Pending::DescribePortal {
                        portal: Arc::clone(portal),
                        hidden: true,
                    });
            }
        }
        // The portal's tenant changes take effect when it runs (once, even if it is executed
        // again after PortalSuspended), and apply to its own rows.
        if let Some(p) = &portal {
            let ops = std::mem::take(
                &mut *p
                    .tenant_ops
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            self.apply_tenant_ops(&ops);
        }
        let mut session = lock(&self.session);
        let tenant = session.tenant.effective();
        session.queue.push_back(Pending::Execute {
            portal,
            copy_out,
            tenant,
        });
        drop(session);
        out.extend_from_slice(frame.raw());
        Ok(())
    }

    fn on_close(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<(), PumpError> {
        let (target, name) = fe::parse_target(fe::CLOSE_TAG, frame.body())?;
        // Takes effect when the server confirms it (CloseComplete).
        lock(&self.session).queue.push_back(Pending::Close {
            hidden: false,
            target,
            name: name.to_vec(),
        });
        out.extend_from_slice(frame.raw());
        Ok(())
    }

    /// Refuse an extended-protocol message: make the server raise `e` in its place and skip
    /// the client's messages up to Sync, as the server does after an error.
    fn reject_extended(&mut self, e: &ClientError, out: &mut BytesMut) -> Result<(), PumpError> {
        self.count_rejection(e.code);
        tracing::debug!(code = e.code, "statement refused");
        let raise = e.raise_sql();
        let mut close = BytesMut::new();
        crate::wire::put_message(&mut close, fe::CLOSE_TAG, |b| {
            b.extend_from_slice(b"S");
            b.extend_from_slice(REJECT_STATEMENT);
            b.extend_from_slice(&[0]);
        })?;
        out.extend_from_slice(&close);
        Parse {
            name: REJECT_STATEMENT,
            sql: raise.as_bytes(),
            param_types: Vec::new(),
        }
        .encode(out)?;
        Bind {
            portal: b"",
            statement: REJECT_STATEMENT,
            param_formats: Vec::new(),
            params: Vec::new(),
            result_formats: Vec::new(),
        }
        .encode_with(&[], out)?;
        crate::wire::put_message(out, fe::EXECUTE_TAG, |b| {
            b.extend_from_slice(&[0]);
            b.extend_from_slice(&0i32.to_be_bytes());
        })?;
        let mut session = lock(&self.session);
        session.queue.push_back(Pending::Close {
            hidden: true,
            target: Target::Statement,
            name: REJECT_STATEMENT.to_vec(),
        });
        session.queue.push_back(Pending::Parse {
            hidden: true,
            name: REJECT_STATEMENT.to_vec(),
            statement: None,
        });
        // The server's unnamed portal becomes the refusal's.
        session.queue.push_back(Pending::Bind {
            hidden: true,
            name: Vec::new(),
            portal: None,
        });
        session.queue.push_back(Pending::Execute {
            portal: None,
            copy_out: None,
            tenant: None,
        });
        session.skipping = true;
        drop(session);
        Ok(())
    }

    /// Resolve a COPY plan on a protected table: column positions of encrypted columns and of
    /// the tenant column.
    async fn copy_job(&self, plan: &crate::sql::CopyPlan) -> Result<CopyJob, ClientError> {
        let engine = Arc::clone(self.cipher.engine());
        let Some(table) = &plan.table else {
            return Ok(CopyJob {
                plan: plan.clone(),
                targets: Vec::new(),
                tenant_index: None,
                key_index: None,
            });
        };
        let rules = engine.rules();
        let rule = rules
            .rules
            .table(&table.schema, &table.name)
            .ok_or_else(|| {
                ClientError::unsupported(format!(
                    "pgenvelope: no rule for {}.{}",
                    table.schema, table.name
                ))
            })?;
        let columns = if plan.columns.is_empty() {
            let db = lock(&self.session).db.clone();
            // Boxed: see `Cipher::active_key`.
            Box::pin(engine.catalog.columns(&db, &table.schema, &table.name))
                .await
                .map_err(|e| {
                    tracing::warn!(error = %e, "catalog unavailable");
                    ClientError::unavailable("pgenvelope: catalog look-up failed")
                })?
        } else {
            plan.columns.clone()
        };
        let targets = columns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| rule.column(c).map(|r| (i, r.clone())))
            .collect();
        let tenant_index = rule
            .tenant_column()
            .and_then(|t| columns.iter().position(|c| c == t));
        let key_index = match rule.row_key() {
            None => None,
            Some(k) => match columns.iter().position(|c| c == k) {
                Some(i) => Some(i),
                // Without the key no value can be sealed or opened for its row.
                None if rule
                    .columns()
                    .any(|r| columns.contains(&r.column().to_owned())) =>
                {
                    return Err(ClientError::unsupported(format!(
                        "pgenvelope: values of {}.{} are bound to their row: the COPY column \
                         list must include the row key {k}",
                        table.schema, table.name
                    )))
                }
                None => None,
            },
        };
        Ok(CopyJob {
            plan: plan.clone(),
            targets,
            tenant_index,
            key_index,
        })
    }

    async fn start_copy_in(&mut self, job: CopyJob) -> Result<(), ClientError> {
        let session_org = match job.tenant_index {
            Some(_) => None,
            None => match job.targets.first() {
                Some((_, col)) => Some(self.session_tenant(col)?),
                None => None,
            },
        };
        let encoding = self.encoding();
        let fallback = self.session_or_default();
        self.copy_in = Some(CopyIn::new(
            job,
            session_org,
            fallback,
            encoding,
            self.max_row,
        )?);
        Ok(())
    }

    fn session_or_default(&self) -> Option<OrgId> {
        lock(&self.session)
            .tenant
            .effective()
            .or_else(|| self.cipher.engine().default_tenant.clone())
    }

    async fn on_copy(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<(), PumpError> {
        let tag = frame.tag();
        if self.copy_failed {
            if tag != fe::COPY_DATA_TAG {
                self.copy_failed = false;
            }
            return Ok(());
        }
        let Some(copy) = self.copy_in.as_mut() else {
            out.extend_from_slice(frame.raw());
            return Ok(());
        };
        let result = match tag {
            fe::COPY_DATA_TAG => copy.feed(frame.body(), &mut self.cipher, out).await,
            fe::COPY_DONE_TAG => {
                let r = copy.finish(&mut self.cipher, out).await;
                if r.is_ok() {
                    out.extend_from_slice(frame.raw());
                    self.copy_in = None;
                }
                r
            }
            _ => {
                self.copy_in = None;
                out.extend_from_slice(frame.raw());
                Ok(())
            }
        };
        if let Err(e) = result {
            self.count_rejection(e.code);
            tracing::debug!(code = e.code, "COPY refused");
            self.copy_in = None;
            self.copy_failed = tag == fe::COPY_DATA_TAG;
            lock(&self.session).copy_refusal = Some(e.code);
            fe::put_copy_fail(out, &e.message)?;
        }
        Ok(())
    }
}

/// Whether a parameter that names a tenant (of a written row, or of `set_config`) holds
/// non-ASCII bytes.
fn non_ascii_tenant_param(analysis: &Analysis, bind: &Bind<'_>) -> bool {
    let rows = analysis
        .params
        .iter()
        .map(|p| &p.tenant)
        .chain(analysis.literals.iter().map(|l| &l.tenant))
        .filter_map(|t| match t {
            TenantSource::Param(n) => Some(*n),
            _ => None,
        });
    let settings = analysis.tenant_changes.iter().flat_map(|c| match c {
        TenantChange::SetParam { param, .. } => vec![*param],
        TenantChange::IfParamNamesTenant { name, change } => match **change {
            TenantChange::SetParam { param, .. } => vec![*name, param],
            _ => vec![*name],
        },
        _ => Vec::new(),
    });
    rows.chain(settings).any(|n| {
        n.checked_sub(1)
            .and_then(|i| bind.params.get(i).copied().flatten())
            .is_some_and(|v| !v.is_ascii())
    })
}

/// What a Bind carries besides the client's bytes.
#[derive(Default)]
struct BoundValues {
    /// (parameter index, sealed value) of every parameter that changes.
    sealed: Option<Vec<(usize, Vec<u8>)>>,
    /// The organisation values were sealed for under the session tenant, if any.
    sealed_for: Option<OrgId>,
    /// Tenant changes and savepoint events, made when the portal runs.
    tenant_ops: Vec<TenantChangeOp>,
}

/// Whether any of `literals` is sealed for the session (or default) tenant.
fn seals_under_session(literals: &[LiteralSite]) -> bool {
    literals.iter().any(|l| l.tenant == TenantSource::Session)
}

/// Whether a parameter of `analysis` is sealed for the session (or default) tenant.
fn seals_under_session_params(analysis: &Analysis) -> bool {
    analysis
        .params
        .iter()
        .any(|p| p.tenant == TenantSource::Session)
}

/// Queue a request that ends a cycle (answered by ReadyForQuery). A Sync ends the server's
/// skip-to-Sync state; a Query or FunctionCall while the server skips is not queued (returns
/// false: it must not be sent). One lock, since the server side sets `skipping` on an error
/// only while no Sync is queued.
fn push_cycle(session: &SharedSession, mut pending: Pending) -> bool {
    let mut s = lock(session);
    if matches!(pending, Pending::Sync) {
        s.skipping = false;
    } else if s.skipping {
        return false;
    }
    if let Pending::Query { tenant, .. } = &mut pending {
        // After the query's own tenant changes (already applied): its reads follow them.
        *tenant = s.tenant.effective();
    }
    s.queue.push_back(pending);
    s.tenant.cycle_sent();
    s.lexing.cycle_sent();
    true
}

/// Outcome of preparing a simple query.
#[derive(Default)]
struct Prepared {
    /// Rewritten SQL (client encoding), or `None` to forward the original.
    sql: Option<Vec<u8>>,
    /// COPY TO whose rows must be decrypted.
    copy_out: Option<CopyJob>,
}

/// Parameter values of a Bind, with the statement's parameter types.
struct BindValues<'a> {
    bind: &'a Bind<'a>,
    types: Vec<u32>,
}

impl BindValues<'_> {
    /// Parameter `n` (1-based) as text: `None` for NULL.
    fn text(&self, n: usize, encoding: &ClientEncoding) -> Result<Option<String>, ClientError> {
        let bad = || {
            ClientError::unsupported(format!("pgenvelope: parameter ${n} cannot be read as text"))
        };
        let Some(value) = n.checked_sub(1).and_then(|i| self.bind.params.get(i)) else {
            return Err(bad());
        };
        let Some(raw) = value else {
            return Ok(None);
        };
        if self.bind.param_format(n - 1) == fe::FORMAT_TEXT {
            return encoding
                .decode(raw)
                .map(|t| Some(t.into_owned()))
                .map_err(|_| bad());
        }
        let ty = self.types.get(n - 1).copied().unwrap_or(0);
        if TEXT_OIDS.contains(&ty) || ty == 19 {
            return Ok(Some(encoding.decode(raw).map_err(|_| bad())?.into_owned()));
        }
        binary_as_text(ty, raw).map(Some).ok_or_else(bad)
    }
}

impl From<WireError> for ClientError {
    fn from(_: WireError) -> Self {
        ClientError::unsupported("pgenvelope: message could not be encoded")
    }
}

/// The rule of a column the analyser found a value for.
fn rule_for<'a>(
    rules: &'a RulesSnapshot,
    column: &ColumnRef,
) -> Result<&'a ColumnRule, ClientError> {
    rules
        .rules
        .column(&column.schema, &column.table, &column.column)
        .ok_or_else(|| ClientError::unsupported(format!("pgenvelope: no rule for {column}")))
}

/// Whether a row's tenant value is certainly stored as written, whatever the tenant column's
/// type: no surrounding white space, and a number only in canonical form (an integer column
/// stores `007`, `+7` or `7.0` as `7`, which would not be the organisation the value was sealed
/// for).
fn stores_as_written(v: &str) -> bool {
    if v.trim() != v {
        return false;
    }
    let digits = v.strip_prefix('-').unwrap_or(v);
    let numeric_start = digits
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_digit() || c == '.' || c == '+');
    if !numeric_start && !v.starts_with('+') {
        return true;
    }
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        // Canonical integer: no leading zero (except `0` itself), no `-0`.
        return (digits == "0" && !v.starts_with('-')) || !digits.starts_with('0');
    }
    // Starts like a number but is not a canonical integer (`+7`, `7.0`, `1e3`, `0x1F`): an
    // integer or numeric column could store it in another form.
    // Text such as `7days` is no number in any form and stays as written.
    v.parse::<f64>().is_err() && !v.starts_with('+') && !digits.starts_with('0')
}

/// Whether a row key is certainly stored as written: [`stores_as_written`], and a UUID only
/// in PostgreSQL's output form (lower-case hex in groups of 8-4-4-4-12; a `uuid` column
/// stores `{A0EE…}` or hex without hyphens in that form).
pub(crate) fn key_stores_as_written(v: &str) -> bool {
    // A uuid column reads 32 hex digits with any hyphens and braces around them as a UUID.
    let mut hex_digits = 0;
    for c in v.chars() {
        match c {
            '-' | '{' | '}' => {}
            c if c.is_ascii_hexdigit() => hex_digits += 1,
            _ => return stores_as_written(v),
        }
    }
    if hex_digits != 32 {
        return stores_as_written(v);
    }
    v.len() == 36
        && v.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_digit() || ('a'..='f').contains(&c),
        })
}

#[cfg(test)]
mod tenant_text_tests {
    use super::{key_stores_as_written, stores_as_written};

    #[test]
    fn only_canonical_row_keys_pass() {
        for ok in [
            "17",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "user-42",
            "deadbeef",
            "0a1b2c3d-9c0b-4ef8-bb6d-6bb9bd380a11",
        ] {
            assert!(key_stores_as_written(ok), "{ok}");
        }
        for bad in [
            "017",
            " 17",
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
            "a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
            "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11",
        ] {
            assert!(!key_stores_as_written(bad), "{bad}");
        }
    }

    #[test]
    fn only_canonical_tenants_pass() {
        for ok in ["acme", "42", "0", "-5", "org-7", "7days", "a b"] {
            assert!(stores_as_written(ok), "{ok}");
        }
        for bad in [
            "007", "+7", "7.0", "1e3", "-0", " acme", "acme ", "0x1F", ".5",
        ] {
            assert!(!stores_as_written(bad), "{bad}");
        }
    }
}
