//! Client messages of an encrypting session: analyses statements, seals the literals,
//! parameters and COPY fields bound for encrypted columns, tracks prepared statements and
//! portals, and queues what the server side must expect.
//!
//! A statement that cannot be encrypted safely is never forwarded: a refusal takes its place
//! ([`super::refuse`]). Prepared statements and portals follow the server, not the client: a
//! Parse, Bind or Close is queued with its effect, which the server side commits only on
//! ParseComplete, BindComplete or CloseComplete (a Parse the server refuses, or anything it
//! skips after an error, changes nothing). A Bind or Execute looks its statement or portal up
//! through the requests still in flight ([`Session::statement_ahead`]); when that depends on an
//! earlier, still unanswered cycle and either candidate touches a protected table, it is refused
//! (0A000) rather than guessed. While the server skips messages up to Sync (after our refusal,
//! or after its own error reported before the client's Sync was forwarded), every message up
//! to Sync is dropped, a Query included, as PostgreSQL ignores them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::BytesMut;

use crate::proxy::error::{ClientError, Encoded};
use crate::sql::{Analysis, CopyDirection, CopyPlan, PinValue, SearchOperand};
use crate::wire::encoding::EncodingError;
use crate::wire::frontend::{self as fe, Bind, Parse, Target};
use crate::wire::Frame;

use super::copy::{CopyIn, CopyOrgs};
use super::session::{may_change_lexing, Ahead, CopyJob, Pending, Portal, Statement};
use super::values::{
    seals_under_session, seals_under_session_params, BindValues, PinRender, TEXT_ARRAY_OID,
    TEXT_ARRAY_OIDS, TEXT_OIDS,
};
use super::{Ctx, Fail, Need, Out, Stop};

impl Ctx<'_> {
    /// Handle one inspected client message.
    pub(super) fn on_client(&mut self, frame: &Frame, out: &mut Out) -> Result<(), Stop> {
        let tag = frame.tag();
        // After an error in the extended protocol the server skips every message up to Sync,
        // a Query too: so do we (nothing of theirs is analysed, forwarded or expected), except
        // for messages that carry no statement (Flush must reach the server so it sends the
        // error; Terminate ends the session).
        if self.s.skipping && !matches!(tag, fe::SYNC_TAG | fe::FLUSH_TAG | fe::TERMINATE_TAG) {
            return Ok(());
        }
        let to_server = &mut out.to_server;
        match tag {
            fe::QUERY_TAG => self.on_query(frame, to_server),
            fe::PARSE_TAG => self.on_parse(frame, to_server),
            fe::BIND_TAG => self.on_bind(frame, to_server),
            fe::DESCRIBE_TAG => self.on_describe(frame, to_server),
            fe::EXECUTE_TAG => self.on_execute(frame, to_server),
            fe::CLOSE_TAG => self.on_close(frame, to_server),
            fe::SYNC_TAG => {
                self.push_cycle(Pending::Sync);
                to_server.extend_from_slice(frame.raw());
                Ok(())
            }
            fe::FUNCTION_CALL_TAG => {
                // Any function may change a setting.
                self.s.lexing.may_change();
                if self.push_cycle(Pending::FunctionCall) {
                    to_server.extend_from_slice(frame.raw());
                }
                Ok(())
            }
            fe::COPY_DATA_TAG | fe::COPY_DONE_TAG | fe::COPY_FAIL_TAG => {
                self.on_copy(frame, to_server)
            }
            _ => {
                to_server.extend_from_slice(frame.raw());
                Ok(())
            }
        }
    }

    /// Queue a request that ends a cycle (answered by ReadyForQuery). A Sync ends the server's
    /// skip-to-Sync state; a Query or FunctionCall while the server skips is not queued
    /// (returns false: it must not be sent).
    pub(super) fn push_cycle(&mut self, mut pending: Pending) -> bool {
        if matches!(pending, Pending::Sync) {
            self.s.skipping = false;
        } else if self.s.skipping {
            return false;
        }
        if let Pending::Query { tenant, .. } = &mut pending {
            // After the query's own tenant changes (already applied): its reads follow them.
            *tenant = self.s.tenant.effective();
        }
        self.s.queue.push_back(pending);
        self.s.tenant.cycle_sent();
        self.s.lexing.cycle_sent();
        self.cycle_sent();
        true
    }

    /// Decode SQL text for analysis. `Ok(None)`: it cannot touch protected tables.
    ///
    /// The text is read as the server will read it: in the session's client_encoding (for an
    /// encoding the proxy cannot convert, a view that keeps ASCII and lexes as PostgreSQL does,
    /// good for statements that carry no value for an encrypted column), and refused when the
    /// reading depends on a setting the proxy does not know for sure (see
    /// [`super::session::LexState`]).
    fn analyse(&self, sql: &[u8]) -> Result<Option<(String, Arc<Analysis>)>, ClientError> {
        let rules = &self.e.handles.rules;
        let encoding = &self.s.encoding;
        let standard_strings = self.s.lexing.standard_strings;
        let uncertain = self.s.lexing.uncertain();
        let bytewise = self.s.lexing.server_sql_ascii;
        // ASCII reads the same in every client encoding PostgreSQL supports.
        if uncertain && !sql.is_ascii() && rules.might_touch(&String::from_utf8_lossy(sql)) {
            return Err(ClientError::LexingInFlight);
        }
        // `exact`: the text is what the server reads, values included.
        let (text, exact) = match encoding.decode(sql) {
            Ok(t) => (t, true),
            Err(e) => {
                // Table names are ASCII: a lossy view is enough to decide that the text
                // cannot touch a protected table.
                if !rules.might_touch(&String::from_utf8_lossy(sql)) {
                    return Ok(None);
                }
                let view = match &e {
                    EncodingError::Unsupported(_)
                        if sql.is_ascii() || rules.snapshot().protected.ascii_names() =>
                    {
                        encoding.lexing_view(sql, bytewise)
                    }
                    _ => None,
                };
                match view {
                    Some(v) => (std::borrow::Cow::Owned(v), sql.is_ascii()),
                    None => return Err(ClientError::Encoding(e)),
                }
            }
        };
        if !rules.might_touch(&text) {
            return Ok(None);
        }
        let analysis = rules.analyze(&text);
        if let Some(rej) = &analysis.rejection {
            return Err(ClientError::Statement(Box::new(rej.clone())));
        }
        if let Some(refusal) = crate::sql::lexing_refusal(&analysis, standard_strings, uncertain) {
            return Err(ClientError::Statement(Box::new(refusal)));
        }
        if !exact && (!analysis.literals.is_empty() || !analysis.tenant_changes.is_empty()) {
            return Err(ClientError::Encoding(EncodingError::Unsupported(
                encoding.name().to_owned(),
            )));
        }
        if uncertain
            && analysis
                .copy
                .as_ref()
                .is_some_and(|c| c.direction == CopyDirection::FromStdin)
        {
            return Err(ClientError::LexingInFlight);
        }
        Ok(Some((text.into_owned(), analysis)))
    }

    fn on_query(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<(), Stop> {
        let sql = fe::parse_query(frame.body())?;
        let prepared = match self.prepare_query(sql) {
            Ok(p) => Ok(p),
            Err(f) => match self.checked(f) {
                Fail::Need(n) => return Err(Stop::Need(n)),
                Fail::Lookup(req) => return Err(self.start_simple_lookup(req, out)?),
                // The look-up's error answered this query: nothing more to send.
                Fail::Answered => return Ok(()),
                Fail::Refuse(e) => Err(e),
            },
        };
        // Committed from here on: nothing below needs anything fetched.
        // A new simple query ends any leftover COPY state of a previous one (a COPY that the
        // server refused before any data was sent leaves it set).
        self.e.copy_failed = false;
        self.e.copy_in = None;
        let (copy_in, copy_out, rewritten, ops) = match prepared {
            Ok(p) => (p.copy_in, p.copy_out, Ok(p.sql), p.tenant_ops),
            Err(e) => (None, None, Err(e), Vec::new()),
        };
        self.s.tenant.apply(&ops);
        if may_change_lexing(sql) {
            self.s.lexing.may_change();
        }
        let query = Pending::Query {
            copy_out,
            tenant: None,
        };
        if !self.push_cycle(query) {
            // An error reported meanwhile put the server in its skip-to-Sync state: it will
            // ignore this Query, so it is not sent.
            return Ok(());
        }
        match rewritten {
            Ok(None) => out.extend_from_slice(frame.raw()),
            Ok(Some(new_sql)) => fe::put_query(out, &new_sql)?,
            Err(e) => {
                self.count_refusal(&e);
                fe::put_query(out, e.raise_sql().as_bytes())?;
                return Ok(());
            }
        }
        self.e.copy_in = copy_in;
        Ok(())
    }

    /// Analyse and rewrite a simple query.
    fn prepare_query(&mut self, sql: &[u8]) -> Result<PreparedQuery, Fail> {
        let Some((text, analysis)) = self.analyse(sql)? else {
            return Ok(PreparedQuery::default());
        };
        // Literals are sealed before the text runs: a tenant change in the same text would
        // take effect only after they were sealed, so the two may not be mixed.
        if !analysis.tenant_changes.is_empty() && seals_under_session(&analysis) {
            return Err(ClientError::TenantChangeWithSessionWrite.into());
        }
        // Rows are read under the tenant in force once the text's changes are made; a
        // statement before a change would be read under the wrong one.
        if analysis.protected_before_tenant_change {
            return Err(ClientError::TenantChangeAfterProtected.into());
        }
        let mut prepared = PreparedQuery::default();
        match &analysis.copy {
            // A COPY of a query naming no protected table, among other statements: relayed
            // as is (its output is only scanned for enc:v1 values when sent on its own).
            Some(_) if analysis.statement_count > 1 && !analysis.touches_protected => {}
            Some(_) if analysis.statement_count > 1 => {
                return Err(ClientError::CopyNotAlone.into());
            }
            Some(plan) => {
                let job = self.copy_job(plan)?;
                match plan.direction {
                    CopyDirection::FromStdin => prepared.copy_in = Some(self.copy_in(job)?),
                    CopyDirection::ToStdout => prepared.copy_out = Some(job),
                }
            }
            None => {}
        }
        prepared.sql = self.rewrite_text(&text, &analysis, PinRender::Literal)?;
        prepared.tenant_ops = self.tenant_ops(&analysis, None)?;
        Ok(prepared)
    }

    fn on_parse(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<(), Stop> {
        let parse = Parse::decode(frame.body())?;
        match self.prepare_parse(&parse) {
            Ok((mut statement, rewritten)) => {
                statement.changes_lexing = may_change_lexing(parse.sql);
                // Takes effect when the server confirms it (ParseComplete).
                self.s.queue.push_back(Pending::Parse {
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
            Err(f) => self.refuse_extended(f, out),
        }
    }

    fn prepare_parse(&mut self, parse: &Parse<'_>) -> Result<(Statement, Option<BytesMut>), Fail> {
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
        // Parameters compared with a searchable column carry text (their search terms), an
        // array of them text[].
        for site in &analysis.searches {
            for op in &site.operands {
                let (index, array) = match op {
                    SearchOperand::Param { index, .. } => (*index, false),
                    SearchOperand::ArrayParam { index, .. } => (*index, true),
                    SearchOperand::Literal { .. } => continue,
                };
                let i = index - 1;
                if types.len() <= i {
                    types.resize(i + 1, 0);
                }
                match (types[i], array) {
                    (0, false) => types[i] = 25,
                    (0, true) => types[i] = TEXT_ARRAY_OID,
                    (t, false) if TEXT_OIDS.contains(&t) => {}
                    (t, true) if TEXT_ARRAY_OIDS.contains(&t) => {}
                    _ => {
                        return Err(ClientError::ParamNotText {
                            param: index,
                            column: site.column.clone(),
                        }
                        .into())
                    }
                }
            }
        }
        for site in &analysis.params {
            let i = site.index - 1;
            if types.len() <= i {
                types.resize(i + 1, 0);
            }
            match types[i] {
                0 => types[i] = 25,
                t if TEXT_OIDS.contains(&t) => {}
                _ => {
                    return Err(ClientError::ParamNotText {
                        param: site.index,
                        column: site.column.clone(),
                    }
                    .into())
                }
            }
        }
        // A pin on the session tenant is a parameter of its own, after the client's, filled in
        // at each Bind: the statement may be bound again under another tenant.
        let tenant_param = analysis
            .pins
            .iter()
            .any(|p| p.value == PinValue::SessionTenant)
            .then(|| analysis.max_param.max(parse.param_types.len()) + 1);
        // Row keys left to their default are parameters of their own too, after the tenant's.
        let keys: usize = analysis.draws.iter().map(|d| d.params()).sum();
        let key_param = (keys > 0).then(|| {
            analysis.max_param.max(parse.param_types.len())
                + 1
                + usize::from(tenant_param.is_some())
        });
        let pin = PinRender::Param {
            tenant: tenant_param.unwrap_or(0),
            keys: key_param.unwrap_or(0),
        };
        let new_sql = self.rewrite_text(&text, &analysis, pin)?;
        let sealed_for = if new_sql.is_some() && seals_under_session(&analysis) {
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
            .map_err(|_| ClientError::Encode(Encoded::Statement))?;
            Some(buf)
        } else {
            None
        };
        let keeps_text = analysis.pins.iter().any(|p| p.lookup.is_some());
        Ok((
            Statement {
                analysis: Some(analysis),
                param_types: types,
                sealed_for,
                tenant_param,
                key_param,
                text: keeps_text.then(|| Arc::from(text.as_str())),
                ..Statement::default()
            },
            rewritten,
        ))
    }

    fn on_bind(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<(), Stop> {
        let bind = Bind::decode(frame.body())?;
        let ahead = self.s.statement_ahead(bind.statement);
        if let Ahead::Uncertain(candidates) = &ahead {
            let inert = candidates
                .iter()
                .all(|c| c.as_ref().is_none_or(|s| s.analysis.is_none()));
            if !inert {
                return self.refuse_extended(ClientError::Unsettled.into(), out);
            }
        }
        // A statement the proxy never saw parsed (SQL PREPARE, or one made by server-side
        // code) could write its parameters into encrypted columns unseen.
        if matches!(ahead, Ahead::Known(None)) && !self.e.handles.rules.snapshot().rules.is_empty()
        {
            let name = String::from_utf8_lossy(bind.statement).into_owned();
            return self.refuse_extended(ClientError::UnknownStatement { name }.into(), out);
        }
        let statement = ahead.latest().unwrap_or_default();
        let bound = match self.prepare_bind(&bind, &statement) {
            Ok(b) => b,
            Err(f) => return self.refuse_extended(f, out),
        };
        if bound.sealed.is_some() || !bound.hidden.is_empty() {
            // Straight into the output: the other parameters are copied once.
            let mut refs = bind.params.clone();
            for (i, value) in bound.sealed.iter().flatten() {
                refs[*i] = value.as_deref();
            }
            let mut with_pin = None;
            if !bound.hidden.is_empty() {
                refs.extend(bound.hidden.iter().map(|v| v.as_deref()));
                // The added parameters are text, whatever format the client's are in.
                let mut formats = match bind.param_formats.as_slice() {
                    [] => Vec::new(),
                    [one] => vec![*one; bind.params.len()],
                    many => many.to_vec(),
                };
                if !formats.is_empty() {
                    formats.resize(refs.len(), fe::FORMAT_TEXT);
                }
                with_pin = Some(Bind {
                    param_formats: formats,
                    ..bind.clone()
                });
            }
            let start = out.len();
            if with_pin
                .as_ref()
                .unwrap_or(&bind)
                .encode_with(&refs, out)
                .is_err()
            {
                out.truncate(start);
                return self.refuse_extended(ClientError::Encode(Encoded::Parameters).into(), out);
            }
        } else {
            out.extend_from_slice(frame.raw());
        }
        let portal = Arc::new(Portal {
            statement,
            result_formats: bind.result_formats.clone(),
            described: AtomicBool::new(false),
            shape: OnceLock::new(),
            sealed_for: bound.sealed_for,
            tenant_ops: bound.tenant_ops,
            ran: AtomicBool::new(false),
        });
        // Takes effect when the server confirms it (BindComplete).
        self.s.queue.push_back(Pending::Bind {
            hidden: false,
            name: bind.portal.to_vec(),
            portal: Some(portal),
        });
        Ok(())
    }

    /// Seal the parameters bound for encrypted columns, and read the tenant changes the
    /// statement makes with these parameters.
    fn prepare_bind(
        &mut self,
        bind: &Bind<'_>,
        statement: &Statement,
    ) -> Result<BoundValues, Fail> {
        let Some(analysis) = statement.analysis.clone() else {
            return Ok(BoundValues::default());
        };
        if statement.sealed_for.is_some() && statement.sealed_for != self.session_or_default() {
            return Err(ClientError::TenantChanged.into());
        }
        let values = BindValues {
            bind,
            types: statement
                .described_params
                .get()
                .cloned()
                .unwrap_or_else(|| statement.param_types.clone()),
        };
        let uncertain = self.s.lexing.uncertain();
        if uncertain && values.non_ascii_tenant_param(&analysis) {
            // Read in the wrong encoding, a tenant would name another organisation.
            return Err(ClientError::LexingInFlight.into());
        }
        let tenant_ops = self.tenant_ops(&analysis, Some(&values))?;
        if let Some(n) = statement.hidden_from() {
            if bind.params.len() + 1 != n {
                return Err(ClientError::BindParamCount {
                    expected: n - 1,
                    got: bind.params.len(),
                }
                .into());
            }
        }
        // The tenant pin: the session (or default) tenant in force now, in the client's encoding.
        let pin_tenant = match statement.tenant_param {
            None => None,
            Some(_) => {
                let column = analysis
                    .pins
                    .first()
                    .map(|p| p.column.clone())
                    .unwrap_or_default();
                let tenant = match self.session_or_default() {
                    Some(t) => Some(t),
                    // No tenant known: the rows' organisation is looked up (None: no row).
                    None => {
                        let text = statement.text.as_deref().unwrap_or_default();
                        self.looked_up_tenant(&analysis, text, Some(&values))?
                            .ok_or(ClientError::NoTenant { column })?
                    }
                };
                Some(match tenant {
                    Some(t) => Some(self.s.encoding.encode(t.as_str())?.into_owned()),
                    None => None,
                })
            }
        };
        let mut hidden: Vec<Option<Vec<u8>>> = pin_tenant.into_iter().collect();
        // Row keys left to their default: drawn now, for this execution's rows.
        if statement.key_param.is_some() {
            self.draw_keys(&analysis, Some(&values))?;
            for (d, draw) in analysis.draws.iter().enumerate() {
                for text in self.draw_texts(d, draw)? {
                    hidden.push(Some(text.into_bytes()));
                }
            }
        }
        if analysis.params.is_empty() && analysis.arrays.is_empty() && analysis.searches.is_empty()
        {
            return Ok(BoundValues {
                sealed: None,
                sealed_for: statement.sealed_for.clone(),
                tenant_ops,
                hidden,
            });
        }
        let sealed = self.seal_params(&analysis, &values)?;
        let sealed_for = if !sealed.is_empty() && seals_under_session_params(&analysis) {
            self.session_or_default()
        } else {
            statement.sealed_for.clone()
        };
        Ok(BoundValues {
            sealed: (!sealed.is_empty()).then_some(sealed),
            sealed_for,
            tenant_ops,
            hidden,
        })
    }

    fn on_describe(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<(), Stop> {
        let (target, name) = fe::parse_target(fe::DESCRIBE_TAG, frame.body())?;
        let pending = match target {
            Target::Statement => {
                let statement = self.s.statement_ahead(name).latest().unwrap_or_default();
                statement.described.store(true, Ordering::Relaxed);
                Pending::DescribeStatement {
                    statement,
                    hidden: false,
                }
            }
            Target::Portal => {
                let portal = self
                    .s
                    .portal_ahead(name)
                    .latest()
                    .unwrap_or_else(|| Arc::new(Portal::unknown()));
                portal.described.store(true, Ordering::Relaxed);
                Pending::DescribePortal {
                    portal,
                    hidden: false,
                }
            }
        };
        self.s.queue.push_back(pending);
        out.extend_from_slice(frame.raw());
        Ok(())
    }

    fn on_execute(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<(), Stop> {
        let (name, _max_rows) = fe::parse_execute(frame.body())?;
        let ahead = self.s.portal_ahead(name);
        if let Ahead::Uncertain(candidates) = &ahead {
            let inert = candidates
                .iter()
                .all(|c| c.as_ref().is_none_or(|p| p.statement.analysis.is_none()));
            if !inert {
                return self.refuse_extended(ClientError::Unsettled.into(), out);
            }
        }
        let portal = ahead.latest();
        if let Some(sealed_for) = portal.as_ref().and_then(|p| p.sealed_for.as_ref()) {
            if Some(sealed_for) != self.session_or_default().as_ref() {
                return self.refuse_extended(ClientError::TenantChanged.into(), out);
            }
        }
        // Only this Execute's own COPY may rewrite the data that follows it.
        let copy = match portal
            .as_ref()
            .and_then(|p| p.statement.analysis.as_ref())
            .and_then(|a| a.copy.as_ref())
        {
            Some(plan) => match self.prepare_copy(plan) {
                Ok(c) => Some(c),
                Err(f) => return self.refuse_extended(f, out),
            },
            None => None,
        };
        // Committed from here on.
        self.e.copy_in = None;
        self.e.copy_failed = false;
        let mut copy_out = None;
        match copy {
            Some(PreparedCopy::In(c)) => self.e.copy_in = Some(*c),
            Some(PreparedCopy::Out(job)) => copy_out = Some(job),
            None => {}
        }
        if let Some(portal) = &portal {
            if portal.statement.changes_lexing {
                self.s.lexing.may_change();
            }
            let known = portal.described.load(Ordering::Relaxed)
                || portal.statement.described.load(Ordering::Relaxed);
            if !known {
                // The client never asked for the row description; the server side needs it
                // to find encrypted columns, so ask for it and swallow the answer.
                fe::put_describe(out, Target::Portal, name)?;
                portal.described.store(true, Ordering::Relaxed);
                self.s.queue.push_back(Pending::DescribePortal {
                    portal: Arc::clone(portal),
                    hidden: true,
                });
            }
            // The portal's tenant changes take effect when it runs (once, even if it is
            // executed again after PortalSuspended), and apply to its own rows.
            self.s.tenant.apply(portal.take_tenant_ops());
        }
        let tenant = self.s.tenant.effective();
        self.s.queue.push_back(Pending::Execute {
            portal,
            copy_out,
            tenant,
        });
        out.extend_from_slice(frame.raw());
        Ok(())
    }

    fn on_close(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<(), Stop> {
        let (target, name) = fe::parse_target(fe::CLOSE_TAG, frame.body())?;
        // Takes effect when the server confirms it (CloseComplete).
        self.s.queue.push_back(Pending::Close {
            hidden: false,
            target,
            name: name.to_vec(),
        });
        out.extend_from_slice(frame.raw());
        Ok(())
    }

    /// A COPY run by an Execute: its job, and the row codec for COPY FROM.
    fn prepare_copy(&mut self, plan: &CopyPlan) -> Result<PreparedCopy, Fail> {
        let job = self.copy_job(plan)?;
        Ok(match plan.direction {
            CopyDirection::FromStdin => PreparedCopy::In(Box::new(self.copy_in(job)?)),
            CopyDirection::ToStdout => PreparedCopy::Out(job),
        })
    }

    /// Resolve a COPY plan on a protected table: column positions of encrypted columns, of
    /// the tenant column and of the row key.
    fn copy_job(&mut self, plan: &CopyPlan) -> Result<CopyJob, Fail> {
        let Some(table) = &plan.table else {
            return Ok(CopyJob {
                plan: plan.clone(),
                targets: Vec::new(),
                tenant_index: None,
                key_index: None,
            });
        };
        let snapshot = self.e.handles.rules.snapshot();
        let rule = snapshot
            .rules
            .table(&table.schema, &table.name)
            .ok_or_else(|| ClientError::NoRule {
                name: format!("{}.{}", table.schema, table.name),
            })?;
        let columns = if plan.columns.is_empty() {
            let wanted = (table.schema.clone(), table.name.clone());
            match self.e.columns.take() {
                Some((key, Ok(columns))) if key == wanted => columns,
                Some((key, Err(()))) if key == wanted => {
                    return Err(ClientError::CopyColumnsUnavailable.into())
                }
                _ => {
                    return Err(self.need(Need::Columns {
                        schema: wanted.0,
                        table: wanted.1,
                    }))
                }
            }
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
                    return Err(ClientError::CopyWithoutRowKey {
                        table: format!("{}.{}", table.schema, table.name),
                        key: k.to_owned(),
                    }
                    .into())
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

    /// The row codec of a COPY FROM STDIN.
    fn copy_in(&mut self, job: CopyJob) -> Result<CopyIn, Fail> {
        let session_org = match job.tenant_index {
            Some(_) => None,
            None => match job.targets.first() {
                Some((_, col)) => Some(self.session_tenant(col)?),
                None => None,
            },
        };
        let orgs = CopyOrgs {
            every_row: session_org,
            null_tenant: self.session_or_default(),
            session: self.s.tenant.effective(),
        };
        Ok(CopyIn::new(
            job,
            orgs,
            self.s.encoding.clone(),
            self.e.max_row,
        )?)
    }

    fn on_copy(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<(), Stop> {
        let tag = frame.tag();
        if self.e.copy_failed {
            if tag != fe::COPY_DATA_TAG {
                self.e.copy_failed = false;
            }
            return Ok(());
        }
        let Some(copy) = self.e.copy_in.as_mut() else {
            out.extend_from_slice(frame.raw());
            return Ok(());
        };
        let rules = self.e.handles.rules.snapshot();
        let cipher = &mut self.e.cipher;
        let result = match tag {
            fe::COPY_DATA_TAG => copy.feed(Some(frame.body()), cipher, &rules.rules, out),
            fe::COPY_DONE_TAG => copy.feed(None, cipher, &rules.rules, out),
            _ => {
                // CopyFail: the client gives up; the server ends the COPY.
                self.e.copy_in = None;
                out.extend_from_slice(frame.raw());
                return Ok(());
            }
        };
        let e = match result.map_err(|f| self.checked(f)) {
            Ok(()) => {
                if tag == fe::COPY_DONE_TAG {
                    out.extend_from_slice(frame.raw());
                    self.e.copy_in = None;
                }
                return Ok(());
            }
            Err(Fail::Need(n)) => return Err(Stop::Need(n)),
            Err(Fail::Refuse(e)) => e,
            // COPY data never asks for a look-up.
            Err(Fail::Lookup(_) | Fail::Answered) => ClientError::Rewrite,
        };
        self.count_refusal(&e);
        self.e.copy_in = None;
        self.e.copy_failed = tag == fe::COPY_DATA_TAG;
        self.s.copy_refusal = Some(e.sqlstate());
        fe::put_copy_fail(out, &e.text())?;
        Ok(())
    }
}

/// Outcome of preparing a simple query.
#[derive(Default)]
struct PreparedQuery {
    /// Rewritten SQL (client encoding), or `None` to forward the original.
    sql: Option<Vec<u8>>,
    /// COPY FROM STDIN whose rows must be encrypted.
    copy_in: Option<CopyIn>,
    /// COPY TO whose rows must be decrypted.
    copy_out: Option<CopyJob>,
    /// Tenant changes and savepoint events, made as the text runs.
    tenant_ops: Vec<super::session::TenantChangeOp>,
}

/// A COPY started by an Execute.
enum PreparedCopy {
    In(Box<CopyIn>),
    Out(CopyJob),
}

/// What a Bind carries besides the client's bytes.
#[derive(Default)]
struct BoundValues {
    /// (parameter index, sealed value or NULL) of every parameter that changes.
    sealed: Option<Vec<super::values::SealedParam>>,
    /// The organisation values were sealed for under the session tenant, if any.
    sealed_for: Option<crate::crypto::OrgId>,
    /// Tenant changes and savepoint events, made when the portal runs.
    tenant_ops: Vec<super::session::TenantChangeOp>,
    /// The values of the proxy's own parameters, appended to the client's: the tenant pin
    /// (`None`: NULL, no row is written), then the drawn row keys.
    hidden: Vec<Option<Vec<u8>>>,
}
