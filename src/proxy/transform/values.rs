//! Values bound for encrypted columns: literals of a statement text and parameters of a Bind.
//! For each: the column's rule, the organisation that owns it (row tenant, session tenant,
//! default tenant), the row it is bound to (row binding), and the sealed value; also the tenant
//! changes a statement makes.

use crate::cipher::{is_envelope_of, CipherError, Classified, KeyNeed, Restored};
use crate::crypto::OrgId;
use crate::proxy::error::{ClientError, ValueSite};
use crate::proxy::rules::RulesSnapshot;
use crate::rules::ColumnRule;
use crate::sql::{
    Analysis, ArraySource, ColumnRef, DrawEdit, PinPlace, PinValue, RowKeySource, SearchOperand,
    TenantChange, TenantSource, TxControl,
};
use crate::wire::encoding::ClientEncoding;
use crate::wire::frontend::{self as fe, Bind};

use super::canonical::{key_stores_as_written, stores_as_written};
use super::session::TenantChangeOp;
use super::shape::binary_as_text;
use super::{Ctx, Fail, Need};

/// OIDs of parameter types an encrypted value may be bound as.
pub(super) const TEXT_OIDS: &[u32] = &[25, 1043, 1042, 705];
/// OID of `text[]`.
pub(super) const TEXT_ARRAY_OID: u32 = 1009;
/// OIDs of array types a list of searched values may be bound as (`text[]`, `varchar[]`,
/// `bpchar[]`).
pub(super) const TEXT_ARRAY_OIDS: &[u32] = &[1009, 1015, 1014];

impl Ctx<'_> {
    /// Encrypt the literals of `analysis`, add its tenant pins (with the session tenant as
    /// `pin`), and return the rewritten SQL in the client's encoding (`None` when nothing
    /// changed).
    pub(super) fn rewrite_text(
        &mut self,
        text: &str,
        analysis: &Analysis,
        pin: PinRender,
    ) -> Result<Option<Vec<u8>>, Fail> {
        if analysis.literals.is_empty()
            && analysis.pins.is_empty()
            && analysis.arrays.is_empty()
            && analysis.draws.is_empty()
            && analysis.searches.is_empty()
        {
            return Ok(None);
        }
        if matches!(pin, PinRender::Literal) {
            // A simple query's rows with no known tenant: look their organisation up first.
            if self.session_or_default().is_none() {
                self.looked_up_tenant(analysis, text, None)?;
            }
            // Row keys left to their default: draw them.
            self.draw_keys(analysis, None)?;
        }
        let no_row = self.writes_no_row();
        let mut replacements =
            Vec::with_capacity(analysis.literals.len() + 2 * analysis.pins.len());
        let rules = self.e.handles.rules.snapshot();
        // Every key the literals need, fetched in one round (a bulk INSERT of many
        // organisations' rows).
        let mut needs = Vec::new();
        let mut orgs = Vec::with_capacity(analysis.literals.len());
        for site in &analysis.literals {
            let mut org = None;
            if !(no_row && site.tenant == TenantSource::Session) {
                let column = rule_for(&rules, &site.column)?;
                // An error is reported where the value is sealed, below.
                org = self.tenant_for(&site.tenant, column, None).ok();
                if let Some(org) = &org {
                    self.missing_keys(column, org, &mut needs)?;
                }
            }
            orgs.push(org);
        }
        if !needs.is_empty() {
            return Err(Fail::Need(Need::Keys(needs)));
        }
        for (site, org) in analysis.literals.iter().zip(orgs) {
            if no_row && site.tenant == TenantSource::Session {
                replacements.push((site.range.clone(), "NULL".to_owned()));
                continue;
            }
            let column = rule_for(&rules, &site.column)?;
            if let (PinRender::Param { .. }, Some(RowKeySource::Drawn { .. })) =
                (&pin, &site.row_key)
            {
                return Err(ClientError::LiteralWithDrawnKey {
                    column: column.qualified_name().to_owned(),
                    key: column.row_key().unwrap_or_default().to_owned(),
                }
                .into());
            }
            let org = match org {
                Some(org) => org,
                None => self.tenant_for(&site.tenant, column, None)?,
            };
            let key = self.row_key_for(site.row_key.as_ref(), column, None)?;
            let sealed =
                self.seal_value(&rules, column, &org, key.as_deref(), site.value.as_bytes())?;
            let Some(sealed) = sealed else {
                continue;
            };
            replacements.push((site.range.clone(), format!("'{sealed}'")));
        }
        for site in &analysis.arrays {
            let ArraySource::Literal { range, .. } = &site.value else {
                continue;
            };
            if let (PinRender::Param { .. }, Some(ArraySource::Drawn(_))) = (&pin, &site.row_key) {
                let column = rule_for(&rules, &site.column)?;
                return Err(ClientError::LiteralWithDrawnKey {
                    column: column.qualified_name().to_owned(),
                    key: column.row_key().unwrap_or_default().to_owned(),
                }
                .into());
            }
            let Some(sealed) = self.seal_array(&rules, site, None)? else {
                continue;
            };
            // Sealed elements and NULL need no quoting or escapes: a plain literal is safe
            // whatever standard_conforming_strings says.
            replacements.push((
                range.clone(),
                format!("'{}'", crate::wire::array::encode_text(&sealed)),
            ));
        }
        for site in &analysis.searches {
            self.search_edits(&rules, text, site, &mut replacements)?;
        }
        for p in &analysis.pins {
            let value = match &p.value {
                PinValue::Excluded(e) => e.clone(),
                PinValue::SessionTenant => match &pin {
                    PinRender::Param { tenant, .. } => format!("${tenant}"),
                    PinRender::Literal if no_row => "NULL".to_owned(),
                    PinRender::Literal => {
                        let tenant = self.write_tenant().ok_or_else(|| ClientError::NoTenant {
                            column: p.column.clone(),
                        })?;
                        dollar_quoted(tenant.as_str())
                    }
                },
            };
            let condition = format!("{} = {value}", p.column);
            match &p.place {
                PinPlace::Wrap(r) => {
                    replacements.push((r.start..r.start, "(".to_owned()));
                    replacements.push((r.end..r.end, format!(") AND {condition}")));
                }
                PinPlace::Add(at) => replacements.push((*at..*at, format!(" WHERE {condition}"))),
            }
        }
        let mut key_param = match &pin {
            PinRender::Param { keys, .. } => *keys,
            PinRender::Literal => 0,
        };
        for (d, draw) in analysis.draws.iter().enumerate() {
            let mut texts = match &pin {
                PinRender::Literal => self.draw_texts(d, draw)?,
                PinRender::Param { .. } => Vec::new(),
            }
            .into_iter();
            for (range, edit) in &draw.edits {
                let mut key = |array: bool| match &pin {
                    PinRender::Param { .. } => {
                        key_param += 1;
                        Ok(format!("${}", key_param - 1))
                    }
                    PinRender::Literal => {
                        let t = texts.next().ok_or(ClientError::Rewrite)?;
                        // Digits and braces only: a plain literal is safe as it is.
                        Ok::<_, ClientError>(if array {
                            format!("'{t}'")
                        } else {
                            dollar_quoted(&t)
                        })
                    }
                };
                let text = match edit {
                    DrawEdit::Column => format!(", {}", crate::sql::quote_ident(&draw.column)),
                    DrawEdit::Overriding => " OVERRIDING SYSTEM VALUE".to_owned(),
                    DrawEdit::Key(_) => format!(", {}::int8", key(false)?),
                    DrawEdit::KeyInPlace(_) => format!("{}::int8", key(false)?),
                    DrawEdit::Keys => format!(", {}::int8[]", key(true)?),
                    DrawEdit::Name => ", pgenvelope_key".to_owned(),
                };
                replacements.push((range.clone(), text));
            }
        }
        if replacements.is_empty() {
            return Ok(None);
        }
        // Insertions before a replacement at the same offset (a zero-length range sorts first).
        replacements.sort_by_key(|(r, _)| (r.start, r.end));
        let new =
            crate::sql::rewrite_literals(text, &replacements).map_err(|_| ClientError::Rewrite)?;
        let bytes = self.s.encoding.encode(&new)?.into_owned();
        Ok(Some(bytes))
    }

    /// Seal the parameters of a Bind bound for encrypted columns: (parameter index, sealed
    /// value) of every one that changes.
    pub(super) fn seal_params(
        &mut self,
        analysis: &Analysis,
        values: &BindValues<'_>,
    ) -> Result<Vec<SealedParam>, Fail> {
        let mut sealed_params = Vec::with_capacity(analysis.params.len());
        let rules = self.e.handles.rules.snapshot();
        let uncertain = self.s.lexing.uncertain();
        let no_row = self.writes_no_row();
        // Every key the parameters need, fetched in one round (insertmanyvalues of many
        // organisations' rows).
        let mut needs = Vec::new();
        let mut orgs = Vec::with_capacity(analysis.params.len());
        for site in &analysis.params {
            let mut org = None;
            if !(no_row && site.tenant == TenantSource::Session) {
                let column = rule_for(&rules, &site.column)?;
                // An error is reported where the value is sealed, below.
                org = self.tenant_for(&site.tenant, column, Some(values)).ok();
                if let Some(org) = &org {
                    self.missing_keys(column, org, &mut needs)?;
                }
            }
            orgs.push(org);
        }
        if !needs.is_empty() {
            return Err(Fail::Need(Need::Keys(needs)));
        }
        for (site, org) in analysis.params.iter().zip(orgs) {
            let Some(Some(raw)) = values.bind.params.get(site.index - 1).copied() else {
                continue;
            };
            if no_row && site.tenant == TenantSource::Session {
                sealed_params.push((site.index - 1, None));
                continue;
            }
            let column = rule_for(&rules, &site.column)?;
            if raw.contains(&0) {
                return Err(ClientError::Nul {
                    site: ValueSite::Param(site.index),
                    column: site.column.to_string(),
                }
                .into());
            }
            if uncertain && !raw.is_ascii() {
                return Err(ClientError::LexingInFlight.into());
            }
            let org = match org {
                Some(org) => org,
                None => self.tenant_for(&site.tenant, column, Some(values))?,
            };
            let key = self.row_key_for(site.row_key.as_ref(), column, Some(values))?;
            // Text and binary send of text types both carry the text in the client encoding.
            let plaintext = self.s.encoding.decode(raw)?;
            let sealed =
                self.seal_value(&rules, column, &org, key.as_deref(), plaintext.as_bytes())?;
            if let Some(sealed) = sealed {
                sealed_params.push((site.index - 1, Some(sealed.into_bytes())));
            }
        }
        for site in &analysis.searches {
            self.search_params(&rules, site, values, &mut sealed_params)?;
        }
        for site in &analysis.arrays {
            let ArraySource::Param(n) = &site.value else {
                continue;
            };
            let Some(sealed) = self.seal_array(&rules, site, Some(values))? else {
                continue;
            };
            let bytes = values.array_param(*n, &sealed, &site.column)?;
            sealed_params.push((n - 1, Some(bytes)));
        }
        Ok(sealed_params)
    }

    /// Encrypt a value for `column`, or `None` if it already is a valid enc:v1 value of this
    /// column and organisation (restores, re-runs): such values are stored unchanged, except
    /// that one sealed before its table's values were bound to their rows is sealed again,
    /// bound to the row written.
    pub(super) fn seal_value(
        &mut self,
        rules: &RulesSnapshot,
        column: &ColumnRule,
        org: &OrgId,
        row_key: Option<&str>,
        plaintext: &[u8],
    ) -> Result<Option<String>, Fail> {
        let row_key = row_key.map(str::as_bytes);
        let cipher = &mut self.e.cipher;
        // Only a value shaped like an envelope of this column is checked; other text that
        // starts with `enc:v1:` is data and is encrypted like any other.
        if is_envelope_of(column, plaintext) {
            let restored = match cipher.classify(&rules.rules, Some(column), plaintext)? {
                Classified::Plain => None,
                Classified::Sealed { parsed, .. } => match cipher.by_id(parsed.dek_id(), column)? {
                    crate::cipher::ById::Key(dek) => {
                        cipher.open_restored(&dek, parsed, column, row_key)?
                    }
                    crate::cipher::ById::Shredded => {
                        return Err(ClientError::RestoredDestroyed {
                            site: ValueSite::Literal,
                            column: column.qualified_name().to_owned(),
                        }
                        .into())
                    }
                },
            };
            match restored {
                Some(Restored::AsIs(d)) if &d.org == org => return Ok(None),
                Some(Restored::Rebind(d)) if &d.org == org => {
                    return Ok(Some(cipher.seal(column, org, row_key, &d.plaintext)?));
                }
                Some(Restored::AsIs(_) | Restored::Rebind(_)) => {
                    return Err(ClientError::RestoredOtherOrg {
                        site: ValueSite::Literal,
                        column: column.qualified_name().to_owned(),
                    }
                    .into())
                }
                // Fails authentication: not a value of ours, just data.
                None => {}
            }
        }
        Ok(Some(cipher.seal(column, org, row_key, plaintext)?))
    }

    /// Adds to `needs` the keys sealing a value of `column` for `org` needs that are not at
    /// hand (its active DEK, and its search key for a searchable column). A key whose fetch
    /// failed is reported here.
    pub(super) fn missing_keys(
        &mut self,
        column: &ColumnRule,
        org: &OrgId,
        needs: &mut Vec<KeyNeed>,
    ) -> Result<(), Fail> {
        let mut note = |r: Result<(), CipherError>| match r {
            Err(CipherError::Missing(need)) => {
                if !needs.contains(&need) {
                    needs.push(need);
                }
                Ok(())
            }
            Err(e) => Err(Fail::from(e)),
            Ok(()) => Ok(()),
        };
        note(self.e.cipher.active(org, column).map(|_| ()))?;
        note(self.e.cipher.term(column, org, b"").map(|_| ()))?;
        Ok(())
    }

    /// The key of the row a value of `column` is written to (row binding), as PostgreSQL
    /// will print it; `None` when the table does not bind values to their row.
    pub(super) fn row_key_for(
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
            RowKeySource::Drawn { draw, row } => match self
                .drawn_keys(*draw)
                .and_then(|keys| keys.get(*row).cloned().flatten())
            {
                Some(k) => k,
                None => {
                    return Err(ClientError::NoKeySequence {
                        table: column.table().to_owned(),
                        key: key.to_owned(),
                    })
                }
            },
            RowKeySource::Param(n) => {
                let Some(bind) = bind else {
                    return Err(ClientError::LiteralWithKeyParam {
                        column: column.qualified_name().to_owned(),
                        key: key.to_owned(),
                        param: *n,
                    });
                };
                match bind.text(*n, &self.s.encoding)? {
                    Some(v) => v,
                    None => {
                        return Err(ClientError::NullRowKey {
                            column: column.qualified_name().to_owned(),
                            key: key.to_owned(),
                        })
                    }
                }
            }
        };
        if !key_stores_as_written(&value) {
            return Err(ClientError::NonCanonicalRowKey {
                column: column.qualified_name().to_owned(),
                key: key.to_owned(),
            });
        }
        Ok(Some(value))
    }

    /// The organisation owning a value written to `column`.
    pub(super) fn tenant_for(
        &self,
        source: &TenantSource,
        column: &ColumnRule,
        bind: Option<&BindValues<'_>>,
    ) -> Result<OrgId, ClientError> {
        let name = || column.qualified_name().to_owned();
        let row_tenant = |v: String| self.row_tenant(v, column);
        match source {
            TenantSource::Literal(v) => row_tenant(v.clone()),
            TenantSource::Param(n) => {
                let Some(bind) = bind else {
                    // A literal is encrypted when the statement is parsed, before any Bind
                    // says which organisation the row belongs to.
                    return Err(ClientError::LiteralWithTenantParam {
                        column: name(),
                        param: *n,
                    });
                };
                match bind.text(*n, &self.s.encoding)? {
                    Some(v) => row_tenant(v),
                    None => self.session_tenant(column),
                }
            }
            TenantSource::Session => self.session_tenant(column),
        }
    }

    /// A row's tenant as written in the statement (a literal, a parameter, an array element):
    /// it must be stored as written, name a valid organisation, and, under a session tenant,
    /// be the session tenant (a connection writes only its own organisation's rows, as it
    /// reads only its own organisation's values).
    pub(super) fn row_tenant(&self, v: String, column: &ColumnRule) -> Result<OrgId, ClientError> {
        let name = || column.qualified_name().to_owned();
        if !stores_as_written(&v) {
            return Err(ClientError::NonCanonicalTenant { column: name() });
        }
        let org = OrgId::new(v).map_err(|_| ClientError::InvalidRowTenant { column: name() })?;
        match self.s.tenant.effective() {
            Some(s) if s != org => Err(ClientError::OtherTenantsRow { column: name() }),
            _ => Ok(org),
        }
    }

    /// The session (or default) tenant, for a write to `column` that names none.
    pub(super) fn session_tenant(&self, column: &ColumnRule) -> Result<OrgId, ClientError> {
        self.write_tenant().ok_or_else(|| ClientError::NoTenant {
            column: column.qualified_name().to_owned(),
        })
    }

    /// The organisation values sealed for "the session tenant" belong to: the session tenant,
    /// else the default tenant, else the one a look-up found for the message being handled.
    pub(super) fn write_tenant(&self) -> Option<OrgId> {
        self.session_or_default()
            .or_else(|| self.e.lookups.tenant().flatten())
    }

    /// Whether a look-up found that the statement being handled writes no row: its values for
    /// the session tenant are then written as NULL (they are never stored).
    pub(super) fn writes_no_row(&self) -> bool {
        self.session_or_default().is_none() && self.e.lookups.tenant() == Some(None)
    }

    /// The session tenant, else the default tenant.
    pub(super) fn session_or_default(&self) -> Option<OrgId> {
        self.s
            .tenant
            .effective()
            .or_else(|| self.e.handles.default_tenant().cloned())
    }

    /// The tenant changes and savepoint events a statement makes, with their values read
    /// (from the text, or from `bind`) and checked. Recorded in the tenant history when the
    /// statement runs: a simple query at once, a portal at its Execute.
    pub(super) fn tenant_ops(
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
                return Err(ClientError::TenantChangeWithSavepoint);
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
        let invalid = |_| ClientError::InvalidTenantSetting;
        Ok(match change {
            TenantChange::Set { value, local } => {
                let org = if value.is_empty() {
                    None
                } else {
                    Some(OrgId::new(value.clone()).map_err(invalid)?)
                };
                Some((org, *local))
            }
            TenantChange::SetParam { param, local } => {
                let bind = bind.ok_or(ClientError::SetConfigParamOutsideExtended)?;
                let org = match bind.text(*param, &self.s.encoding)? {
                    Some(v) if !v.is_empty() => Some(OrgId::new(v).map_err(invalid)?),
                    _ => None,
                };
                Some((org, *local))
            }
            TenantChange::Reset { local } => Some((None, *local)),
            TenantChange::IfParamNamesTenant { name, change } => {
                let bind = bind.ok_or(ClientError::SetConfigParamOutsideExtended)?;
                // set_config(NULL, …) is an error on the server: no change.
                let names_tenant = bind
                    .text(*name, &self.s.encoding)?
                    .is_some_and(|n| n.eq_ignore_ascii_case(crate::sql::TENANT_SETTING));
                if !names_tenant || matches!(**change, TenantChange::IfParamNamesTenant { .. }) {
                    return Ok(None);
                }
                self.tenant_change(change, Some(bind))?
            }
        })
    }
}

/// A parameter to replace in a Bind: its index and its new value (`None`: NULL).
pub(super) type SealedParam = (usize, Option<Vec<u8>>);

/// How a tenant pin's session tenant and drawn row keys are written into the text.
pub(super) enum PinRender {
    /// As literals (a simple query: the tenant in force now, keys drawn now).
    Literal,
    /// As parameters filled in at each Bind (a prepared statement outlives tenant changes,
    /// and each execution inserts new rows): the tenant as `$tenant`, the drawn keys from
    /// `$keys` on, draw by draw, row by row.
    Param {
        /// The tenant's parameter number.
        tenant: usize,
        /// The first key's parameter number.
        keys: usize,
    },
}

/// `s` as a dollar-quoted literal: no escapes, whatever standard_conforming_strings says, and of
/// unknown type, so it compares with a text, integer or uuid tenant column alike.
pub(super) fn dollar_quoted(s: &str) -> String {
    let mut tag = "pgenvelope".to_owned();
    let mut n = 0;
    while s.contains(&format!("${tag}$")) {
        n += 1;
        tag = format!("pgenvelope{n}");
    }
    format!("${tag}${s}${tag}$")
}

/// Whether a literal of `analysis` (or an array given as a literal) is sealed for the session
/// (or default) tenant.
pub(super) fn seals_under_session(analysis: &Analysis) -> bool {
    analysis.searches.iter().any(|s| {
        s.tenant == TenantSource::Session
            && s.operands
                .iter()
                .any(|o| matches!(o, SearchOperand::Literal { .. }))
    }) || analysis
        .literals
        .iter()
        .any(|l| l.tenant == TenantSource::Session)
        || analysis
            .arrays
            .iter()
            .any(|a| a.tenant.is_none() && matches!(a.value, ArraySource::Literal { .. }))
}

/// Whether a parameter of `analysis` (or an array given as one) is sealed for the session (or
/// default) tenant.
pub(super) fn seals_under_session_params(analysis: &Analysis) -> bool {
    analysis.searches.iter().any(|s| {
        s.tenant == TenantSource::Session
            && s.operands
                .iter()
                .any(|o| !matches!(o, SearchOperand::Literal { .. }))
    }) || analysis
        .params
        .iter()
        .any(|p| p.tenant == TenantSource::Session)
        || analysis
            .arrays
            .iter()
            .any(|a| a.tenant.is_none() && matches!(a.value, ArraySource::Param(_)))
}

/// Parameter values of a Bind, with the statement's parameter types.
pub(super) struct BindValues<'a> {
    pub(super) bind: &'a Bind<'a>,
    pub(super) types: Vec<u32>,
}

impl BindValues<'_> {
    /// Parameter `n` (1-based) as text: `None` for NULL.
    /// `elements` encoded as array parameter `$n` was sent: text, or binary with the
    /// element type it was sent with.
    pub(super) fn array_param(
        &self,
        n: usize,
        elements: &[Option<String>],
        column: &ColumnRef,
    ) -> Result<Vec<u8>, ClientError> {
        let i = n - 1;
        if self.bind.param_format(i) == fe::FORMAT_TEXT {
            return Ok(crate::wire::array::encode_text(elements).into_bytes());
        }
        let raw = self
            .bind
            .params
            .get(i)
            .copied()
            .flatten()
            .unwrap_or_default();
        let element_type = crate::wire::array::BinaryArray::decode(raw)
            .map(|a| a.element_type)
            .unwrap_or(25);
        crate::wire::array::encode_binary(element_type, elements).map_err(|_| {
            ClientError::ArrayUnreadable {
                column: column.to_string(),
            }
        })
    }

    pub(super) fn text(
        &self,
        n: usize,
        encoding: &ClientEncoding,
    ) -> Result<Option<String>, ClientError> {
        let bad = || ClientError::ParamUnreadable { param: n };
        let Some(value) = n.checked_sub(1).and_then(|i| self.bind.params.get(i)) else {
            return Err(bad());
        };
        let Some(raw) = value else {
            return Ok(None);
        };
        let ty = self.types.get(n - 1).copied().unwrap_or(0);
        if self.bind.param_format(n - 1) == fe::FORMAT_TEXT {
            let text = encoding.decode(raw).map_err(|_| bad())?;
            // A `uuid` parameter is stored in its canonical form, whatever form it is sent in.
            if ty == UUID_OID {
                if let Some(canonical) = crate::sql::canonical_uuid(&text) {
                    return Ok(Some(canonical));
                }
            }
            return Ok(Some(text.into_owned()));
        }
        if TEXT_OIDS.contains(&ty) || ty == 19 {
            return Ok(Some(encoding.decode(raw).map_err(|_| bad())?.into_owned()));
        }
        binary_as_text(ty, raw).map(Some).ok_or_else(bad)
    }

    /// Whether a parameter that names a tenant (of a written row, or of `set_config`) holds
    /// non-ASCII bytes.
    pub(super) fn non_ascii_tenant_param(&self, analysis: &Analysis) -> bool {
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
                .and_then(|i| self.bind.params.get(i).copied().flatten())
                .is_some_and(|v| !v.is_ascii())
        })
    }
}

/// The rule of a column the analyser found a value for.
pub(super) fn rule_for<'a>(
    rules: &'a RulesSnapshot,
    column: &ColumnRef,
) -> Result<&'a ColumnRule, ClientError> {
    rules
        .rules
        .column(&column.schema, &column.table, &column.column)
        .ok_or_else(|| ClientError::NoRule {
            name: column.to_string(),
        })
}

/// OID of `uuid`.
const UUID_OID: u32 = 2950;
