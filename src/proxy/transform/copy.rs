//! COPY payload rewriting: encrypt the configured columns of `COPY … FROM STDIN` rows and
//! decrypt them in `COPY … TO STDOUT`, in text and CSV formats. Rows may span CopyData
//! messages; untouched fields pass byte for byte.
//!
//! Each chunk is rewritten with the keys at hand. When a row needs a key that is not (a new
//! organisation, a pre-encrypted value under another DEK), the chunk is rewritten to the end
//! to collect every key it needs, the codec is put back to where it was, and the keys are
//! asked for: the chunk is rewritten again once they are fetched. Only the keys change between
//! attempts, so the output is the same as a single pass.

use bytes::BytesMut;

use crate::cipher::{is_envelope_of, ById, Cipher, CipherError, Classified, KeyNeed, Restored};
use crate::crypto::OrgId;
use crate::proxy::error::{ClientError, CopyFormatProblem, CopyRowProblem, ValueSite};
use crate::rules::{ColumnRule, RuleSet};
use crate::sql::CopyFormat as SqlCopyFormat;
use crate::wire::copy::{CopyError, CopyFormat, CopyRewriter, CopyRow};
use crate::wire::encoding::ClientEncoding;
use crate::wire::frontend::put_copy_data;

use super::canonical::key_stores_as_written;
use super::session::CopyJob;
use super::{Fail, Need};

/// Keys a chunk needs that are not at hand yet.
#[derive(Default)]
struct Needs(Vec<KeyNeed>);

impl Needs {
    fn add(&mut self, need: KeyNeed) {
        if !self.0.contains(&need) {
            self.0.push(need);
        }
    }
}

/// Rewrite `data` (or, with `None`, the end of data) into CopyData messages on `out`. `row`
/// rewrites one row with the keys at hand and records in `Needs` the ones missing.
fn rewrite(
    rewriter: &mut CopyRewriter,
    data: Option<&[u8]>,
    out: &mut BytesMut,
    job: &CopyJob,
    mut row: impl FnMut(&mut CopyRow<'_>, &mut Needs) -> Result<(), ClientError>,
) -> Result<(), Fail> {
    let saved = rewriter.clone();
    let mut buf = Vec::new();
    let mut needs = Needs::default();
    let result = {
        let mut f = |r: &mut CopyRow<'_>| row(r, &mut needs);
        match data {
            Some(d) => rewriter.feed(d, &mut buf, &mut f),
            None => rewriter.finish(&mut buf, &mut f),
        }
    };
    if !needs.0.is_empty() {
        *rewriter = saved;
        return Err(Fail::Need(Need::Keys(needs.0)));
    }
    result.map_err(|e| copy_error(e, job))?;
    if !buf.is_empty() {
        put_copy_data(out, &buf)
            .map_err(|_| ClientError::Encode(crate::proxy::error::Encoded::Message))?;
    }
    Ok(())
}

fn copy_format(
    plan: &crate::sql::CopyPlan,
    encoding: &ClientEncoding,
) -> Result<CopyFormat, ClientError> {
    let mut format = match plan.format {
        SqlCopyFormat::Text => CopyFormat::text(),
        SqlCopyFormat::Csv => CopyFormat::csv(),
        SqlCopyFormat::Binary => return Err(ClientError::CopyFormat(CopyFormatProblem::Binary)),
    };
    let byte = |c: char, problem: CopyFormatProblem| -> Result<u8, ClientError> {
        u8::try_from(u32::from(c))
            .ok()
            .filter(u8::is_ascii)
            .ok_or(ClientError::CopyFormat(problem))
    };
    if let Some(d) = plan.delimiter {
        format.delimiter = byte(d, CopyFormatProblem::NonAsciiDelimiter)?;
    }
    if let Some(q) = plan.quote {
        format.quote = byte(q, CopyFormatProblem::NonAsciiQuote)?;
        if plan.escape.is_none() {
            format.escape = format.quote;
        }
    }
    if let Some(e) = plan.escape {
        format.escape = byte(e, CopyFormatProblem::NonAsciiEscape)?;
    }
    if let Some(n) = &plan.null {
        format.null = encoding.encode(n)?.into_owned();
    }
    format.header = plan.header;
    Ok(format)
}

/// The encoding of the COPY data: its `ENCODING` option, else the session's client_encoding.
fn copy_encoding(
    plan: &crate::sql::CopyPlan,
    session: ClientEncoding,
) -> Result<ClientEncoding, ClientError> {
    let Some(name) = &plan.encoding else {
        return Ok(session);
    };
    match ClientEncoding::from_name(name) {
        ClientEncoding::Unsupported(_) => Err(ClientError::CopyEncoding),
        e => Ok(e),
    }
}

/// `COPY … FROM STDIN` into a table with encrypted columns.
pub(super) struct CopyIn {
    rewriter: CopyRewriter,
    job: CopyJob,
    /// Organisation of every row when the tenant column is not in the COPY.
    session_org: Option<OrgId>,
    /// Organisation of rows whose tenant column is NULL.
    fallback_org: Option<OrgId>,
    /// The session tenant: every row must be its organisation's.
    session_tenant: Option<OrgId>,
    encoding: ClientEncoding,
}

impl CopyIn {
    pub(super) fn new(
        job: CopyJob,
        orgs: CopyOrgs,
        encoding: ClientEncoding,
        max_row: usize,
    ) -> Result<Self, ClientError> {
        let encoding = copy_encoding(&job.plan, encoding)?;
        let format = copy_format(&job.plan, &encoding)?;
        let targets = job.targets.iter().map(|(i, _)| *i).collect();
        let rewriter = CopyRewriter::new(format, targets, max_row)
            .map_err(|_| ClientError::CopyFormat(CopyFormatProblem::Invalid))?;
        Ok(Self {
            rewriter,
            job,
            session_org: orgs.every_row,
            fallback_org: orgs.null_tenant,
            session_tenant: orgs.session,
            encoding,
        })
    }

    /// Rewrite one CopyData payload (or, with `None`, the end of data); complete rows are
    /// appended to `out` as CopyData.
    pub(super) fn feed(
        &mut self,
        data: Option<&[u8]>,
        cipher: &mut Cipher,
        rules: &RuleSet,
        out: &mut BytesMut,
    ) -> Result<(), Fail> {
        let rows = RowsIn {
            job: &self.job,
            session_org: &self.session_org,
            fallback_org: &self.fallback_org,
            session_tenant: self.session_tenant.as_ref(),
            encoding: &self.encoding,
        };
        rewrite(&mut self.rewriter, data, out, &self.job, |row, needs| {
            rows.encrypt_row(row, cipher, rules, needs)
        })
    }
}

/// The organisations of the rows of a COPY FROM.
pub(super) struct CopyOrgs {
    /// Of every row, when the tenant column is not in the COPY.
    pub(super) every_row: Option<OrgId>,
    /// Of rows whose tenant column is NULL.
    pub(super) null_tenant: Option<OrgId>,
    /// The session tenant: every row must be its organisation's.
    pub(super) session: Option<OrgId>,
}

/// What the COPY FROM row callback needs besides the keys.
struct RowsIn<'a> {
    job: &'a CopyJob,
    session_org: &'a Option<OrgId>,
    fallback_org: &'a Option<OrgId>,
    session_tenant: Option<&'a OrgId>,
    encoding: &'a ClientEncoding,
}

impl RowsIn<'_> {
    /// Encrypt every target column of one row.
    fn encrypt_row(
        &self,
        row: &mut CopyRow<'_>,
        cipher: &mut Cipher,
        rules: &RuleSet,
        needs: &mut Needs,
    ) -> Result<(), ClientError> {
        let Some((_, first)) = self.job.targets.first() else {
            return Ok(());
        };
        let org = match self.job.tenant_index {
            None => self.session_org.clone(),
            Some(i) => match field_text(row, i, self.encoding)? {
                Some(text) => {
                    Some(
                        OrgId::new(text).map_err(|_| ClientError::CopyInvalidTenant {
                            line: row.line(),
                            column: first.qualified_name().to_owned(),
                        })?,
                    )
                }
                _ => self.fallback_org.clone(),
            },
        };
        let Some(org) = org else {
            return Err(ClientError::CopyNoTenant {
                column: first.qualified_name().to_owned(),
            });
        };
        if self.session_tenant.is_some_and(|s| *s != org) {
            return Err(ClientError::CopyOtherTenantsRow {
                line: row.line(),
                column: first.qualified_name().to_owned(),
            });
        }
        let dek = match cipher.active(&org, first) {
            Ok(dek) => dek,
            Err(crate::cipher::CipherError::Missing(need)) => {
                needs.add(need);
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        // Searchable columns also need the organisation's search key.
        if let Some((_, searchable)) = self.job.targets.iter().find(|(_, c)| c.search().is_some()) {
            match cipher.term(searchable, &org, b"") {
                Ok(_) => {}
                Err(crate::cipher::CipherError::Missing(need)) => {
                    needs.add(need);
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }
        }
        let row_key = match self.job.key_index {
            None => None,
            Some(i) => {
                let key = field_text(row, i, self.encoding)?;
                if !key.as_deref().is_some_and(key_stores_as_written) {
                    return Err(ClientError::CopyRowKey {
                        line: row.line(),
                        column: first.qualified_name().to_owned(),
                    });
                }
                key
            }
        };
        let row_key = row_key.as_deref().map(str::as_bytes);
        for (i, column) in &self.job.targets {
            let Some(Some(value)) = row.get(*i) else {
                continue;
            };
            let site = ValueSite::CopyRow(row.line());
            // PostgreSQL text cannot hold NUL (`\000` in text format, a raw NUL in CSV): the
            // server refuses it in plaintext, so it must not pass sealed either.
            if value.contains(&0) {
                return Err(ClientError::Nul {
                    site,
                    column: column.qualified_name().to_owned(),
                });
            }
            let plaintext = self.encoding.decode(&value)?.into_owned();
            // A value that already is a valid enc:v1 value of this column and organisation is
            // stored unchanged (restores of encrypted dumps). Only values shaped like one are
            // checked; text that merely starts like one is data like any other.
            let classified = if is_envelope_of(column, plaintext.as_bytes()) {
                cipher.classify(rules, Some(column), plaintext.as_bytes())?
            } else {
                Classified::Plain
            };
            if let Classified::Sealed { parsed, column: c } = classified {
                let c = c.map_or_else(|| column.clone(), |c| *c);
                let existing = match cipher.by_id(parsed.dek_id(), &c) {
                    Ok(ById::Key(d)) => d,
                    Ok(ById::Shredded) => {
                        return Err(ClientError::RestoredDestroyed {
                            site,
                            column: column.qualified_name().to_owned(),
                        })
                    }
                    Err(crate::cipher::CipherError::Missing(need)) => {
                        needs.add(need);
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                let (opened, rebind) = match cipher.open_restored(&existing, parsed, &c, row_key)? {
                    Some(Restored::AsIs(opened)) => (opened, false),
                    // Sealed before the table's rows were bound: sealed again for this row.
                    Some(Restored::Rebind(opened)) => (opened, true),
                    // Fails authentication: not one of ours, just data.
                    None => {
                        let sealed =
                            cipher.seal_with(&dek, column, &org, row_key, plaintext.as_bytes())?;
                        row.set(*i, Some(sealed.into_bytes()));
                        continue;
                    }
                };
                if opened.org != org {
                    return Err(ClientError::RestoredOtherOrg {
                        site,
                        column: column.qualified_name().to_owned(),
                    });
                }
                if rebind {
                    let sealed =
                        cipher.seal_with(&dek, column, &org, row_key, &opened.plaintext)?;
                    row.set(*i, Some(sealed.into_bytes()));
                }
                continue;
            }
            let sealed = cipher.seal_with(&dek, column, &org, row_key, plaintext.as_bytes())?;
            row.set(*i, Some(sealed.into_bytes()));
        }
        Ok(())
    }
}

/// Field `i` of a COPY row as text (the row key of a row-bound table, or the row's tenant);
/// `None` for NULL.
fn field_text(
    row: &CopyRow<'_>,
    i: usize,
    encoding: &ClientEncoding,
) -> Result<Option<String>, ClientError> {
    match row.get(i) {
        Some(Some(v)) => Ok(Some(encoding.decode(&v)?.into_owned())),
        _ => Ok(None),
    }
}

fn copy_error(e: CopyError<ClientError>, job: &CopyJob) -> ClientError {
    let table = job
        .plan
        .table
        .as_ref()
        .map(|t| format!("{}.{}", t.schema, t.name))
        .unwrap_or_else(|| "query".to_owned());
    let (line, problem) = match e {
        CopyError::Callback(e) => return e,
        CopyError::RowTooLong { line } => (line, CopyRowProblem::TooLong),
        CopyError::Malformed { line, what } => (line, CopyRowProblem::Malformed(what)),
        CopyError::Unrepresentable { line, column } => {
            (line, CopyRowProblem::Unrepresentable { column })
        }
    };
    ClientError::CopyRow {
        table,
        line,
        problem,
    }
}

/// `COPY … TO STDOUT` whose rows may hold encrypted values.
pub(super) struct CopyOut {
    job: CopyJob,
    rewriter: CopyRewriter,
    /// Column indexes and the rule each is known to come from (None: any enc:v1 value with a
    /// known column id is decrypted).
    columns: Vec<(usize, Option<ColumnRule>)>,
    encoding: ClientEncoding,
    tenant: Option<OrgId>,
}

impl CopyOut {
    /// `ncols`: the column count from CopyOutResponse.
    pub(super) fn new(
        job: CopyJob,
        ncols: usize,
        encoding: ClientEncoding,
        tenant: Option<OrgId>,
        max_row: usize,
    ) -> Result<Self, ClientError> {
        let encoding = copy_encoding(&job.plan, encoding)?;
        let format = copy_format(&job.plan, &encoding)?;
        let columns: Vec<(usize, Option<ColumnRule>)> = if job.plan.table.is_some() {
            job.targets
                .iter()
                .map(|(i, c)| (*i, Some(c.clone())))
                .collect()
        } else {
            (0..ncols).map(|i| (i, None)).collect()
        };
        let rewriter =
            CopyRewriter::new(format, columns.iter().map(|(i, _)| *i).collect(), max_row)
                .map_err(|_| ClientError::CopyFormat(CopyFormatProblem::Invalid))?;
        Ok(Self {
            job,
            rewriter,
            columns,
            encoding,
            tenant,
        })
    }

    /// Rewrite one CopyData payload from the server (or, with `None`, the end of the data)
    /// into `out` (as CopyData).
    pub(super) fn feed(
        &mut self,
        data: Option<&[u8]>,
        cipher: &mut Cipher,
        rules: &RuleSet,
        out: &mut BytesMut,
    ) -> Result<(), Fail> {
        let (columns, encoding, tenant) = (&self.columns, &self.encoding, self.tenant.as_ref());
        let (key_index, tenant_index) = (self.job.key_index, self.job.tenant_index);
        rewrite(&mut self.rewriter, data, out, &self.job, |row, needs| {
            let key = match key_index {
                Some(k) => field_text(row, k, encoding)?,
                None => None,
            };
            // The row names its organisation: its values must be that organisation's.
            let row_org = match tenant_index {
                Some(t) => field_text(row, t, encoding)?,
                None => None,
            };
            // One pass: a value whose key is not at hand is noted and skipped; the whole
            // payload runs again once the keys are fetched (see `rewrite`).
            for (i, expected) in columns {
                let Some(Some(value)) = row.get(*i) else {
                    continue;
                };
                let Classified::Sealed { parsed, column } =
                    cipher.classify(rules, expected.as_ref(), &value)?
                else {
                    continue;
                };
                let Some(column) = column.map(|c| *c).or_else(|| expected.clone()) else {
                    continue;
                };
                let dek = match cipher.by_id(parsed.dek_id(), &column) {
                    Ok(ById::Key(dek)) => dek,
                    Ok(ById::Shredded) => {
                        row.set(*i, None);
                        continue;
                    }
                    Err(CipherError::Missing(need)) => {
                        needs.add(need);
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                let opened = cipher.open_with(
                    &dek,
                    parsed,
                    &column,
                    tenant,
                    key.as_deref().map(str::as_bytes),
                )?;
                if row_org
                    .as_deref()
                    .is_some_and(|org| org != opened.org.as_str())
                {
                    cipher.count_failure("wrong_row");
                    return Err(ClientError::OtherOrgThanRow {
                        column: column.qualified_name().to_owned(),
                    });
                }
                let text =
                    std::str::from_utf8(&opened.plaintext).map_err(|_| ClientError::NotText {
                        column: Some(column.qualified_name().to_owned()),
                    })?;
                let bytes = encoding.encode(text)?.into_owned();
                row.set(*i, Some(bytes));
            }
            Ok(())
        })
    }
}
