//! COPY payload rewriting: encrypt the configured columns of `COPY … FROM STDIN` rows and
//! decrypt them in `COPY … TO STDOUT`, in text and CSV formats. Rows may span CopyData
//! messages; untouched fields pass byte for byte.
//!
//! The row codec is synchronous, key look-ups are not: each chunk is rewritten with the keys
//! already at hand; if a row needs a key that is not (a new organisation, a pre-encrypted
//! value under another DEK), the chunk is rewritten again from a saved copy of the codec
//! after fetching the missing keys. Only the keys change between attempts, so the output is
//! the same as a single pass.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::BytesMut;

use crate::crypto::{looks_like_enc_v1, DekId, OrgId};
use crate::keys::CachedDek;
use crate::proxy::engine::{Cipher, Prepared, Restored};
use crate::proxy::error::ClientError;
use crate::proxy::session::CopyJob;
use crate::rules::ColumnRule;
use crate::sql::CopyFormat as SqlCopyFormat;
use crate::wire::copy::{CopyError, CopyFormat, CopyRewriter, CopyRow};
use crate::wire::encoding::ClientEncoding;
use crate::wire::frontend::put_copy_data;

/// Keys a chunk needs that are not at hand yet.
#[derive(Default)]
struct Needs {
    orgs: HashSet<OrgId>,
    deks: HashMap<DekId, ColumnRule>,
}

impl Needs {
    fn is_empty(&self) -> bool {
        self.orgs.is_empty() && self.deks.is_empty()
    }
}

/// Keys fetched for this COPY.
#[derive(Default)]
struct KeyRing {
    active: HashMap<OrgId, Arc<CachedDek>>,
    by_id: HashMap<DekId, Arc<CachedDek>>,
    /// DEKs found destroyed, with the policy that reads their values as NULL.
    shredded: HashSet<DekId>,
}

impl KeyRing {
    async fn fetch(
        &mut self,
        needs: Needs,
        cipher: &mut Cipher,
        any_column: Option<&ColumnRule>,
    ) -> Result<(), ClientError> {
        for org in needs.orgs {
            let column = any_column.ok_or_else(|| {
                ClientError::unsupported("pgenvelope: COPY has no encrypted column")
            })?;
            let dek = cipher.active_key(column, &org).await?;
            self.active.insert(org, dek);
        }
        for (id, column) in needs.deks {
            match cipher.key_for_read(id, &column).await? {
                Some(dek) => {
                    self.by_id.insert(id, dek);
                }
                None => {
                    self.shredded.insert(id);
                }
            }
        }
        Ok(())
    }
}

/// A row codec plus the keys fetched for its COPY: rewrites a chunk with the keys at hand, and
/// again from a saved copy of the codec after fetching the keys a row asked for.
struct KeyedRewriter {
    rewriter: CopyRewriter,
    keys: KeyRing,
}

impl KeyedRewriter {
    /// Rewrite `data` (or, with `None`, the end of data) into CopyData messages on `out`.
    /// `row` rewrites one row with the keys at hand and records in `Needs` the ones missing.
    async fn run(
        &mut self,
        data: Option<&[u8]>,
        cipher: &mut Cipher,
        out: &mut BytesMut,
        job: &CopyJob,
        mut row: impl FnMut(
            &mut CopyRow<'_>,
            &KeyRing,
            &mut Cipher,
            &mut Needs,
        ) -> Result<(), ClientError>,
    ) -> Result<(), ClientError> {
        for _ in 0..3 {
            let saved = self.rewriter.clone();
            let mut buf = Vec::new();
            let mut needs = Needs::default();
            let result = {
                let keys = &self.keys;
                let mut f = |r: &mut CopyRow<'_>| row(r, keys, &mut *cipher, &mut needs);
                match data {
                    Some(d) => self.rewriter.feed(d, &mut buf, &mut f),
                    None => self.rewriter.finish(&mut buf, &mut f),
                }
            };
            if needs.is_empty() {
                result.map_err(|e| copy_error(e, job))?;
                if !buf.is_empty() {
                    put_copy_data(out, &buf)?;
                }
                return Ok(());
            }
            self.rewriter = saved;
            let any = job.targets.first().map(|(_, c)| c);
            // Boxed: see `Cipher::active_key`.
            Box::pin(self.keys.fetch(needs, cipher, any)).await?;
        }
        Err(ClientError::unavailable(
            "pgenvelope: keys for COPY could not be loaded",
        ))
    }
}

fn copy_format(
    plan: &crate::sql::CopyPlan,
    encoding: &ClientEncoding,
) -> Result<CopyFormat, ClientError> {
    let unsupported = |what: &str| {
        ClientError::unsupported(format!(
            "pgenvelope: COPY {what} is not supported on encrypted tables"
        ))
    };
    let mut format = match plan.format {
        SqlCopyFormat::Text => CopyFormat::text(),
        SqlCopyFormat::Csv => CopyFormat::csv(),
        SqlCopyFormat::Binary => return Err(unsupported("in binary format")),
    };
    let byte = |c: char, what: &str| -> Result<u8, ClientError> {
        u8::try_from(u32::from(c))
            .ok()
            .filter(u8::is_ascii)
            .ok_or_else(|| unsupported(what))
    };
    if let Some(d) = plan.delimiter {
        format.delimiter = byte(d, "with a non-ASCII delimiter")?;
    }
    if let Some(q) = plan.quote {
        format.quote = byte(q, "with a non-ASCII quote")?;
        if plan.escape.is_none() {
            format.escape = format.quote;
        }
    }
    if let Some(e) = plan.escape {
        format.escape = byte(e, "with a non-ASCII escape")?;
    }
    if let Some(n) = &plan.null {
        format.null = encoding
            .encode(n)
            .map_err(|e| ClientError::unsupported(format!("pgenvelope: {e}")))?
            .into_owned();
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
        ClientEncoding::Unsupported(_) => Err(ClientError::unsupported(
            "pgenvelope: COPY with this ENCODING is not supported on encrypted tables (use UTF8, SQL_ASCII or LATIN1)",
        )),
        e => Ok(e),
    }
}

/// `COPY … FROM STDIN` into a table with encrypted columns.
pub(crate) struct CopyIn {
    codec: KeyedRewriter,
    rows: RowsIn,
}

/// What the COPY FROM row callback needs besides the keys.
struct RowsIn {
    job: CopyJob,
    /// Organisation of every row when the tenant column is not in the COPY.
    session_org: Option<OrgId>,
    /// Organisation of rows whose tenant column is NULL.
    fallback_org: Option<OrgId>,
    encoding: ClientEncoding,
}

impl CopyIn {
    pub(crate) fn new(
        job: CopyJob,
        session_org: Option<OrgId>,
        fallback_org: Option<OrgId>,
        encoding: ClientEncoding,
        max_row: usize,
    ) -> Result<Self, ClientError> {
        let encoding = copy_encoding(&job.plan, encoding)?;
        let format = copy_format(&job.plan, &encoding)?;
        let targets = job.targets.iter().map(|(i, _)| *i).collect();
        let rewriter = CopyRewriter::new(format, targets, max_row)
            .map_err(|e| ClientError::unsupported(format!("pgenvelope: {e}")))?;
        Ok(Self {
            codec: KeyedRewriter {
                rewriter,
                keys: KeyRing::default(),
            },
            rows: RowsIn {
                job,
                session_org,
                fallback_org,
                encoding,
            },
        })
    }

    /// Rewrite one CopyData payload; complete rows are appended to `out` as CopyData.
    pub(crate) async fn feed(
        &mut self,
        data: &[u8],
        cipher: &mut Cipher,
        out: &mut BytesMut,
    ) -> Result<(), ClientError> {
        self.run(Some(data), cipher, out).await
    }

    /// End of data: the last row (if it has no line ending).
    pub(crate) async fn finish(
        &mut self,
        cipher: &mut Cipher,
        out: &mut BytesMut,
    ) -> Result<(), ClientError> {
        self.run(None, cipher, out).await
    }

    async fn run(
        &mut self,
        data: Option<&[u8]>,
        cipher: &mut Cipher,
        out: &mut BytesMut,
    ) -> Result<(), ClientError> {
        let rows = &self.rows;
        self.codec
            .run(data, cipher, out, &rows.job, |row, keys, cipher, needs| {
                rows.encrypt_row(row, keys, cipher, needs)
            })
            .await
    }
}

impl RowsIn {
    /// The per-row callback of COPY FROM: encrypt every target column of the row.
    fn encrypt_row(
        &self,
        row: &mut CopyRow<'_>,
        keys: &KeyRing,
        cipher: &mut Cipher,
        needs: &mut Needs,
    ) -> Result<(), ClientError> {
        let (job, session_org, fallback_org, encoding) = (
            &self.job,
            &self.session_org,
            &self.fallback_org,
            &self.encoding,
        );
        let Some((_, first)) = job.targets.first() else {
            return Ok(());
        };
        let org = match job.tenant_index {
            None => session_org.clone(),
            Some(i) => match field_text(row, i, encoding)? {
                Some(text) => Some(OrgId::new(text).map_err(|_| {
                    ClientError::privilege(format!(
                        "pgenvelope: COPY row {} has an invalid tenant for {}",
                        row.line(),
                        first.qualified_name()
                    ))
                })?),
                _ => fallback_org.clone(),
            },
        };
        let Some(org) = org else {
            return Err(ClientError::privilege(format!(
            "pgenvelope: no tenant for COPY into {}: include the tenant column or SET pgenvelope.tenant",
            first.qualified_name()
        )));
        };
        let Some(dek) = keys.active.get(&org) else {
            needs.orgs.insert(org);
            return Ok(());
        };
        let row_key = match job.key_index {
            None => None,
            Some(i) => {
                let key = field_text(row, i, encoding)?;
                if !key
                    .as_deref()
                    .is_some_and(crate::proxy::client_side::key_stores_as_written)
                {
                    return Err(ClientError::unsupported(format!(
                        "pgenvelope: COPY row {}: values of {} are bound to their row, and its \
                         row key is NULL or may be stored differently from how it is written \
                         (surrounding spaces, a number or UUID not in canonical form)",
                        row.line(),
                        first.qualified_name()
                    )));
                }
                key
            }
        };
        let row_key = row_key.as_deref().map(str::as_bytes);
        for (i, column) in &job.targets {
            let Some(Some(value)) = row.get(*i) else {
                continue;
            };
            // PostgreSQL text cannot hold NUL (`\000` in text format, a raw NUL in CSV): the
            // server refuses it in plaintext, so it must not pass sealed either.
            if value.contains(&0) {
                return Err(ClientError::invalid_text(format!(
                    "pgenvelope: COPY row {}: the value for {} holds a NUL byte, which text cannot hold",
                    row.line(),
                    column.qualified_name()
                )));
            }
            let plaintext = encoding
                .decode(&value)
                .map_err(|e| ClientError::unsupported(format!("pgenvelope: {e}")))?
                .into_owned();
            // A value that already is a valid enc:v1 value of this column and organisation is
            // stored unchanged (restores of encrypted dumps).
            // (Only values that look like one are checked: `prepare` is the read path and
            // would count, or under strict reads refuse, ordinary plaintext.)
            // Text that merely starts like one is data like any other and is encrypted.
            let sealed = if is_envelope_of(column, plaintext.as_bytes()) {
                cipher.prepare(Some(column), plaintext.as_bytes())?
            } else {
                Prepared::Plain
            };
            if let Prepared::Sealed { parsed, column: c } = sealed {
                if keys.shredded.contains(&parsed.dek_id()) {
                    return Err(ClientError::corrupted(format!(
                        "pgenvelope: COPY row {}: the encrypted value for {} uses a destroyed data key",
                        row.line(),
                        column.qualified_name()
                    )));
                }
                let Some(existing) = keys.by_id.get(&parsed.dek_id()) else {
                    needs.deks.insert(parsed.dek_id(), *c);
                    continue;
                };
                let (opened, rebind) = match cipher.open_restored(existing, parsed, &c, row_key)? {
                    Some(Restored::AsIs(opened)) => (opened, false),
                    // Sealed before the table's rows were bound: sealed again for this row.
                    Some(Restored::Rebind(opened)) => (opened, true),
                    // Fails authentication: not one of ours, just data.
                    None => {
                        let sealed = cipher.encrypt_with(
                            dek,
                            column,
                            &org,
                            row_key,
                            plaintext.as_bytes(),
                        )?;
                        row.set(*i, Some(sealed.into_bytes()));
                        continue;
                    }
                };
                if opened.org != org {
                    return Err(ClientError::privilege(format!(
                    "pgenvelope: COPY row {}: the encrypted value for {} belongs to another organisation",
                    row.line(),
                    column.qualified_name()
                )));
                }
                if rebind {
                    let sealed =
                        cipher.encrypt_with(dek, column, &org, row_key, &opened.plaintext)?;
                    row.set(*i, Some(sealed.into_bytes()));
                }
                continue;
            }
            let sealed = cipher.encrypt_with(dek, column, &org, row_key, plaintext.as_bytes())?;
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
        Some(Some(v)) => encoding
            .decode(&v)
            .map(|t| Some(t.into_owned()))
            .map_err(|e| ClientError::unsupported(format!("pgenvelope: {e}"))),
        _ => Ok(None),
    }
}

/// Whether `value` is shaped like an enc:v1 value of `column` (it parses and carries the
/// column's id). Anything else that merely starts with `enc:v1:` is plaintext to encrypt.
pub(crate) fn is_envelope_of(column: &ColumnRule, value: &[u8]) -> bool {
    looks_like_enc_v1(value)
        && crate::crypto::EncV1::parse(value).is_ok_and(|p| p.column_id() == column.id())
}

fn copy_error(e: CopyError<ClientError>, job: &CopyJob) -> ClientError {
    let table = job
        .plan
        .table
        .as_ref()
        .map(|t| format!("{}.{}", t.schema, t.name))
        .unwrap_or_else(|| "query".to_owned());
    match e {
        CopyError::Callback(e) => e,
        CopyError::RowTooLong { line } => {
            ClientError::unsupported(format!("pgenvelope: COPY {table} row {line} is too long"))
        }
        CopyError::Malformed { line, what } => ClientError::unsupported(format!(
            "pgenvelope: COPY {table} row {line} is malformed: {what}"
        )),
        CopyError::Unrepresentable { line, column } => ClientError::unsupported(format!(
            "pgenvelope: COPY {table} row {line} column {column} cannot be represented"
        )),
    }
}

/// `COPY … TO STDOUT` whose rows may hold encrypted values.
pub(crate) struct CopyOut {
    job: CopyJob,
    codec: KeyedRewriter,
    /// Column indexes and the rule each is known to come from (None: any enc:v1 value with a
    /// known column id is decrypted).
    columns: Vec<(usize, Option<ColumnRule>)>,
    encoding: ClientEncoding,
    tenant: Option<OrgId>,
}

impl CopyOut {
    /// `ncols`: the column count from CopyOutResponse.
    pub(crate) fn new(
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
                .map_err(|e| ClientError::unsupported(format!("pgenvelope: {e}")))?;
        Ok(Self {
            job,
            codec: KeyedRewriter {
                rewriter,
                keys: KeyRing::default(),
            },
            columns,
            encoding,
            tenant,
        })
    }

    /// Rewrite one CopyData payload from the server into `out` (as CopyData).
    pub(crate) async fn feed(
        &mut self,
        data: &[u8],
        cipher: &mut Cipher,
        out: &mut BytesMut,
    ) -> Result<(), ClientError> {
        self.run(Some(data), cipher, out).await
    }

    /// End of the COPY data.
    pub(crate) async fn finish(
        &mut self,
        cipher: &mut Cipher,
        out: &mut BytesMut,
    ) -> Result<(), ClientError> {
        self.run(None, cipher, out).await
    }

    async fn run(
        &mut self,
        data: Option<&[u8]>,
        cipher: &mut Cipher,
        out: &mut BytesMut,
    ) -> Result<(), ClientError> {
        let (columns, encoding, tenant) = (&self.columns, &self.encoding, self.tenant.as_ref());
        let (key_index, tenant_index) = (self.job.key_index, self.job.tenant_index);
        self.codec
            .run(data, cipher, out, &self.job, |row, keys, cipher, needs| {
                let key = match key_index {
                    Some(k) => field_text(row, k, encoding)?,
                    None => None,
                };
                // The row names its organisation: its values must be that organisation's.
                let row_org = match tenant_index {
                    Some(t) => field_text(row, t, encoding)?,
                    None => None,
                };
                for (i, expected) in columns {
                    let Some(Some(value)) = row.get(*i) else {
                        continue;
                    };
                    let Prepared::Sealed { parsed, column } =
                        cipher.prepare(expected.as_ref(), &value)?
                    else {
                        continue;
                    };
                    if keys.shredded.contains(&parsed.dek_id()) {
                        row.set(*i, None);
                        continue;
                    }
                    let Some(dek) = keys.by_id.get(&parsed.dek_id()) else {
                        needs.deks.insert(parsed.dek_id(), *column);
                        continue;
                    };
                    let opened = cipher.open_with(
                        dek,
                        parsed,
                        &column,
                        tenant,
                        key.as_deref().map(str::as_bytes),
                    )?;
                    if row_org
                        .as_deref()
                        .is_some_and(|org| org != opened.org.as_str())
                    {
                        cipher.engine().stats.decrypt_failures.inc("wrong_row");
                        return Err(ClientError::corrupted(format!(
                            "pgenvelope: value in {} belongs to another organisation than its row",
                            column.qualified_name()
                        )));
                    }
                    let text = String::from_utf8(opened.plaintext).map_err(|_| {
                        ClientError::corrupted(format!(
                            "pgenvelope: value in {} is not text",
                            column.qualified_name()
                        ))
                    })?;
                    let bytes = encoding
                        .encode(&text)
                        .map_err(|e| ClientError::unsupported(format!("pgenvelope: {e}")))?
                        .into_owned();
                    row.set(*i, Some(bytes));
                }
                Ok(())
            })
            .await
    }
}
