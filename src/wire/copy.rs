//! Streaming row codec for the payload of `COPY … FROM STDIN` / `COPY … TO STDOUT` in the text
//! and CSV formats. Pure: no I/O, no tokio, no clocks.
//!
//! CopyData message boundaries are arbitrary: a row may span several messages and one message
//! may hold many rows. [`CopyRewriter`] reassembles rows across [`CopyRewriter::feed`] calls,
//! splits each complete row into fields, hands rows that contain a target column to a
//! callback as a [`CopyRow`], and writes the row back out.
//!
//! Invariants:
//! - no function in this module panics on any input, including non-UTF-8 bytes;
//! - a row is never buffered beyond `max_row` bytes (line ending included);
//! - bytes that were not changed by the callback are copied byte for byte: untouched rows as
//!   one slice, untouched fields (and the delimiters and line ending around them) as slices of
//!   the original row. Only fields passed to [`CopyRow::set`] are re-encoded;
//! - row boundaries are found exactly as PostgreSQL's `CopyReadLineText` finds them, so the
//!   server and the proxy never disagree about which bytes make up a field. Where the server's
//!   reading depends on state this codec does not model or on the server version, the row is
//!   rejected rather than guessed at: a bare carriage return outside quotes (a line ending or
//!   an error, depending on the first line) and, in text format, `\.` that is not alone on its
//!   line (end of data before PostgreSQL 18, an error since);
//! - `Debug` never prints row contents.
//!
//! End-of-data marker (`\.` alone on a line): in text format it is passed through and every
//! byte after it is copied unchanged, since every server version stops reading rows there. In
//! CSV format the line is passed through unchanged but rows after it are still processed:
//! PostgreSQL 18 no longer treats `\.` as end of data in CSV, so the rows that follow may be
//! stored, and they must be encrypted like any other row. The `\.` line itself is still copied
//! raw, because older clients send it and servers before 18 stop there; a PostgreSQL 18
//! server stores it as the one-column value `\.`, which is not secret but will not decrypt.
//!
//! Not modelled: the `FORCE_NULL`, `FORCE_NOT_NULL` and `DEFAULT` options and the binary
//! format. Callers must refuse those for a COPY that touches an encrypted column.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use bytes::BufMut;

use field::{decode_csv, decode_text, encode_csv, encode_text, split_csv, split_text};
use scan::{RowEnd, ScanError, Scanner};

mod field;
mod scan;

/// Which COPY payload format a [`CopyFormat`] describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CopyFormatKind {
    /// The default `text` format: backslash escapes, no quoting.
    Text,
    /// The `csv` format: quoted fields, no backslash escapes.
    Csv,
}

/// The options of one COPY statement that determine how its payload is split and escaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyFormat {
    /// Text or CSV.
    pub kind: CopyFormatKind,
    /// Field separator (`DELIMITER`).
    pub delimiter: u8,
    /// The string that represents SQL NULL (`NULL`), compared with the raw field.
    pub null: Vec<u8>,
    /// CSV quote character (`QUOTE`); unused in text format.
    pub quote: u8,
    /// CSV escape character (`ESCAPE`); unused in text format.
    pub escape: u8,
    /// `HEADER`: the first line is passed through untouched.
    pub header: bool,
}

impl CopyFormat {
    /// PostgreSQL's defaults for the text format: tab delimiter, `\N` for NULL, no header.
    pub fn text() -> Self {
        Self {
            kind: CopyFormatKind::Text,
            delimiter: b'\t',
            null: b"\\N".to_vec(),
            quote: b'"',
            escape: b'"',
            header: false,
        }
    }

    /// PostgreSQL's defaults for the CSV format: comma delimiter, an unquoted empty field for
    /// NULL, `"` as quote and escape character, no header.
    pub fn csv() -> Self {
        Self {
            kind: CopyFormatKind::Csv,
            delimiter: b',',
            null: Vec::new(),
            quote: b'"',
            escape: b'"',
            header: false,
        }
    }

    /// Check the combination of options the way PostgreSQL's `ProcessCopyOptions` does, so
    /// that the codec never works with a format in which fields are ambiguous.
    pub fn validate(&self) -> Result<(), CopyFormatError> {
        let bad = |what| Err(CopyFormatError { what });
        let d = self.delimiter;
        if d == b'\r' || d == b'\n' {
            return bad("delimiter cannot be newline or carriage return");
        }
        if self.null.iter().any(|&b| b == b'\r' || b == b'\n') {
            return bad("NULL string cannot contain newline or carriage return");
        }
        if self.null.contains(&d) {
            return bad("delimiter must not appear in the NULL string");
        }
        match self.kind {
            CopyFormatKind::Text => {
                if b"\\.abcdefghijklmnopqrstuvwxyz0123456789".contains(&d) {
                    return bad("delimiter is not allowed in text format");
                }
            }
            CopyFormatKind::Csv => {
                let (q, e) = (self.quote, self.escape);
                if q == d {
                    return bad("delimiter and quote must be different");
                }
                if [q, e].iter().any(|&c| c == b'\r' || c == b'\n') {
                    return bad("quote and escape cannot be newline or carriage return");
                }
                if self.null.contains(&q) {
                    return bad("quote must not appear in the NULL string");
                }
            }
        }
        Ok(())
    }
}

/// A COPY format whose options PostgreSQL would refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid COPY format: {what}")]
pub struct CopyFormatError {
    /// Which option is wrong (a fixed description).
    pub what: &'static str,
}

/// Why a COPY payload could not be rewritten.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CopyError<E> {
    /// A row is longer than the configured limit.
    #[error("COPY row {line} is longer than the limit")]
    RowTooLong {
        /// 1-based row number (the header counts as row 1).
        line: u64,
    },
    /// A row is not valid in its format.
    #[error("COPY row {line} is malformed: {what}")]
    Malformed {
        /// 1-based row number (the header counts as row 1).
        line: u64,
        /// What is wrong (a fixed description, never row contents).
        what: &'static str,
    },
    /// A value set by the callback has no representation in this format (an empty string
    /// when the text-format NULL string is empty).
    #[error("COPY row {line}: value for column {column} cannot be represented")]
    Unrepresentable {
        /// 1-based row number (the header counts as row 1).
        line: u64,
        /// 0-based column index.
        column: usize,
    },
    /// The callback failed.
    #[error("COPY row callback failed")]
    Callback(#[source] E),
}

/// Splits a COPY payload into rows, lets a callback rewrite target columns, and re-encodes.
#[derive(Clone)]
pub struct CopyRewriter {
    rows: RowProcessor,
    scan: Scanner,
    /// Invariant: the already-scanned bytes of one incomplete row; never more than `max_row`.
    pending: Vec<u8>,
    failed: bool,
}

impl CopyRewriter {
    /// A rewriter for one COPY payload.
    ///
    /// `targets` are the 0-based indexes of the columns to hand to the callback; rows in
    /// which none of them is present are copied without being split. `max_row` bounds the
    /// length of one row, line ending included.
    pub fn new(
        format: CopyFormat,
        targets: Vec<usize>,
        max_row: usize,
    ) -> Result<Self, CopyFormatError> {
        format.validate()?;
        let mut targets = targets;
        targets.sort_unstable();
        targets.dedup();
        let phase = if format.header {
            Phase::Header
        } else {
            Phase::Rows
        };
        Ok(Self {
            scan: Scanner::new(&format, max_row),
            rows: RowProcessor {
                format,
                targets,
                fields: Vec::new(),
                scratch: Vec::new(),
                line: 0,
                phase,
            },
            pending: Vec::new(),
            failed: false,
        })
    }

    /// Feed one chunk of payload.
    ///
    /// Each complete row is appended to `out` (a `Vec<u8>`, or the `BytesMut` a CopyData
    /// message is being built in): unchanged if it has no target column or the callback set
    /// nothing, re-encoded otherwise. An incomplete trailing row is kept until the next call.
    /// After an error the rewriter refuses further input.
    pub fn feed<E>(
        &mut self,
        chunk: &[u8],
        out: &mut impl BufMut,
        f: &mut impl FnMut(&mut CopyRow<'_>) -> Result<(), E>,
    ) -> Result<(), CopyError<E>> {
        if self.failed {
            return Err(self.after_failure());
        }
        let result = self.feed_inner(chunk, out, f);
        self.failed = result.is_err();
        result
    }

    /// End of data (CopyDone): process a final row that has no line ending.
    ///
    /// Fails on an unterminated quoted field or a trailing carriage return.
    pub fn finish<E>(
        &mut self,
        out: &mut impl BufMut,
        f: &mut impl FnMut(&mut CopyRow<'_>) -> Result<(), E>,
    ) -> Result<(), CopyError<E>> {
        if self.failed {
            return Err(self.after_failure());
        }
        self.failed = true;
        if self.rows.phase == Phase::Done || self.scan.len == 0 {
            return Ok(());
        }
        let line = self.rows.line + 1;
        let end = self
            .scan
            .finish()
            .map_err(|what| CopyError::Malformed { line, what })?;
        let row = std::mem::take(&mut self.pending);
        self.rows.process(&row, end, out, f)
    }

    /// Rows seen so far, the header included.
    pub fn rows(&self) -> u64 {
        self.rows.line
    }

    fn feed_inner<E>(
        &mut self,
        chunk: &[u8],
        out: &mut impl BufMut,
        f: &mut impl FnMut(&mut CopyRow<'_>) -> Result<(), E>,
    ) -> Result<(), CopyError<E>> {
        let mut rest = chunk;
        while !rest.is_empty() {
            if self.rows.phase == Phase::Done {
                out.put_slice(rest);
                return Ok(());
            }
            let line = self.rows.line + 1;
            let found = self.scan.scan(rest).map_err(|e| match e {
                ScanError::TooLong => CopyError::RowTooLong { line },
                ScanError::Malformed(what) => CopyError::Malformed { line, what },
            })?;
            let Some((at, end)) = found else {
                self.pending.extend_from_slice(rest);
                return Ok(());
            };
            let (row, tail) = rest.split_at(at);
            if self.pending.is_empty() {
                self.rows.process(row, end, out, f)?;
            } else {
                let mut joined = std::mem::take(&mut self.pending);
                joined.extend_from_slice(row);
                let result = self.rows.process(&joined, end, out, f);
                joined.clear();
                self.pending = joined;
                result?;
            }
            rest = tail;
        }
        Ok(())
    }

    fn after_failure<E>(&self) -> CopyError<E> {
        CopyError::Malformed {
            line: self.rows.line + 1,
            what: "input after end of data or an earlier error",
        }
    }
}

impl fmt::Debug for CopyRewriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CopyRewriter")
            .field("kind", &self.rows.format.kind)
            .field("rows", &self.rows.line)
            .field("pending_len", &self.pending.len())
            .finish_non_exhaustive()
    }
}

/// One complete row, as seen by the callback of [`CopyRewriter::feed`].
pub struct CopyRow<'a> {
    format: &'a CopyFormat,
    /// The row without its line ending.
    content: &'a [u8],
    /// Invariant: ranges into `content`, in order, each a complete and well-formed raw field.
    fields: &'a [Range<usize>],
    changes: Vec<(usize, Option<Vec<u8>>)>,
    line: u64,
}

impl CopyRow<'_> {
    /// Number of fields in the row.
    pub fn len(&self) -> usize {
        self.fields.len()
    }

    /// Whether the row has no fields (never true: an empty line is one empty field).
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// The decoded value of column `i`: `None` if the row has no such column, `Some(None)`
    /// for SQL NULL. Reflects earlier calls to [`CopyRow::set`].
    pub fn get(&self, i: usize) -> Option<Option<Cow<'_, [u8]>>> {
        if let Some((_, v)) = self.changes.iter().find(|(c, _)| *c == i) {
            return Some(v.as_deref().map(Cow::Borrowed));
        }
        let raw = self.content.get(self.fields.get(i)?.clone())?;
        Some(match self.format.kind {
            CopyFormatKind::Text => decode_text(raw, self.format),
            CopyFormatKind::Csv => decode_csv(raw, self.format),
        })
    }

    /// Replace the value of column `i` (`None` for SQL NULL). The value is re-encoded with
    /// the escaping or quoting its format needs. A column the row does not have is ignored.
    pub fn set(&mut self, i: usize, value: Option<Vec<u8>>) {
        if i >= self.fields.len() {
            return;
        }
        match self.changes.iter_mut().find(|(c, _)| *c == i) {
            Some(slot) => slot.1 = value,
            None => self.changes.push((i, value)),
        }
    }

    /// 1-based row number, the header included, as PostgreSQL counts lines in COPY errors.
    pub fn line(&self) -> u64 {
        self.line
    }
}

impl fmt::Debug for CopyRow<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CopyRow")
            .field("line", &self.line)
            .field("fields", &self.fields.len())
            .finish_non_exhaustive()
    }
}

/// Encode `value` as one field of `format` (NULL as the NULL string), appending to `out`.
///
/// Fails only for an empty string in text format with an empty NULL string, which has no
/// representation.
pub fn encode_field(
    format: &CopyFormat,
    value: Option<&[u8]>,
    out: &mut Vec<u8>,
) -> Result<(), CopyFormatError> {
    let Some(value) = value else {
        out.extend_from_slice(&format.null);
        return Ok(());
    };
    match format.kind {
        CopyFormatKind::Text => encode_text(value, format, out),
        CopyFormatKind::Csv => {
            encode_csv(value, format, out);
            Ok(())
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Header,
    Rows,
    /// After a text-format end-of-data marker: everything passes through.
    Done,
}

#[derive(Clone)]
struct RowProcessor {
    format: CopyFormat,
    /// Invariant: sorted, no duplicates.
    targets: Vec<usize>,
    /// Scratch space for field ranges, reused between rows.
    fields: Vec<Range<usize>>,
    /// Scratch space for a re-encoded row, reused between rows.
    scratch: Vec<u8>,
    line: u64,
    phase: Phase,
}

impl RowProcessor {
    fn process<E>(
        &mut self,
        row: &[u8],
        end: RowEnd,
        out: &mut impl BufMut,
        f: &mut impl FnMut(&mut CopyRow<'_>) -> Result<(), E>,
    ) -> Result<(), CopyError<E>> {
        self.line += 1;
        let line = self.line;
        if end.marker {
            self.phase = Phase::Done;
            out.put_slice(row);
            return Ok(());
        }
        if self.phase == Phase::Header || self.targets.is_empty() {
            self.phase = Phase::Rows;
            out.put_slice(row);
            return Ok(());
        }
        let content = row
            .get(..row.len().saturating_sub(end.ending))
            .unwrap_or(row);
        if self.format.kind == CopyFormatKind::Csv && content == b"\\." {
            out.put_slice(row);
            return Ok(());
        }
        self.fields.clear();
        let split = match self.format.kind {
            CopyFormatKind::Text => {
                split_text(content, self.format.delimiter, &mut self.fields);
                Ok(())
            }
            CopyFormatKind::Csv => split_csv(content, &self.format, &mut self.fields),
        };
        split.map_err(|what| CopyError::Malformed { line, what })?;
        if !self.targets.iter().any(|&t| t < self.fields.len()) {
            out.put_slice(row);
            return Ok(());
        }
        let mut view = CopyRow {
            format: &self.format,
            content,
            fields: &self.fields,
            changes: Vec::new(),
            line,
        };
        f(&mut view).map_err(CopyError::Callback)?;
        if view.changes.is_empty() {
            out.put_slice(row);
            return Ok(());
        }
        view.changes.sort_unstable_by_key(|(c, _)| *c);
        let encoded = &mut self.scratch;
        encoded.clear();
        let mut copied = 0;
        for (column, value) in &view.changes {
            let Some(range) = self.fields.get(*column) else {
                continue;
            };
            encoded.extend_from_slice(content.get(copied..range.start).unwrap_or_default());
            encode_field(&self.format, value.as_deref(), encoded).map_err(|_| {
                CopyError::Unrepresentable {
                    line,
                    column: *column,
                }
            })?;
            copied = range.end;
        }
        encoded.extend_from_slice(row.get(copied..).unwrap_or_default());
        out.put_slice(encoded);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
