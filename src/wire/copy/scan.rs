//! Finds where COPY rows end, across chunk boundaries, as PostgreSQL's `CopyReadLineText`
//! does; input it would read differently depending on server state or version is rejected
//! (see the parent module). Pure; never panics; never scans more than `max_row` bytes of a row.

use super::{CopyFormat, CopyFormatKind};

/// How a complete row ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RowEnd {
    /// Bytes of line ending at the end of the row: 0 (end of data), 1 (`\n`) or 2 (`\r\n`).
    pub(super) ending: usize,
    /// The row is the text-format end-of-data marker `\.`.
    pub(super) marker: bool,
}

/// Finds where rows end, one byte at a time, across chunks; mirrors PostgreSQL's
/// `CopyReadLineText`.
#[derive(Clone)]
pub(super) struct Scanner {
    csv: bool,
    quote: u8,
    /// The CSV escape character when it differs from the quote character.
    escape: Option<u8>,
    max_row: usize,
    /// Bytes of the current row scanned so far. Invariant: `len <= max_row`.
    pub(super) len: usize,
    /// Text: the previous byte was an unescaped backslash. CSV: PostgreSQL's `last_was_esc`.
    escaped: bool,
    in_quote: bool,
    /// The previous byte was an unescaped carriage return outside quotes.
    cr: bool,
    /// Text: the row so far is exactly `\.`.
    marker: bool,
}

pub(super) enum ScanError {
    TooLong,
    Malformed(&'static str),
}

impl Scanner {
    pub(super) fn new(format: &CopyFormat, max_row: usize) -> Self {
        let csv = format.kind == CopyFormatKind::Csv;
        Self {
            csv,
            quote: format.quote,
            escape: (format.escape != format.quote).then_some(format.escape),
            max_row,
            len: 0,
            escaped: false,
            in_quote: false,
            cr: false,
            marker: false,
        }
    }

    /// Scan `bytes`, which continue the current row. Returns the offset just past the row's
    /// line ending, or `None` if the row goes on past `bytes`.
    pub(super) fn scan(&mut self, bytes: &[u8]) -> Result<Option<(usize, RowEnd)>, ScanError> {
        let mut i = 0;
        while i < bytes.len() {
            if !self.escaped && !self.cr && !self.marker {
                let rest = bytes.get(i..).unwrap_or_default();
                let skip = self.plain_prefix(rest);
                if self.len + skip > self.max_row {
                    return Err(ScanError::TooLong);
                }
                self.len += skip;
                i += skip;
            }
            let Some(&b) = bytes.get(i) else {
                break;
            };
            i += 1;
            self.len += 1;
            if self.len > self.max_row {
                return Err(ScanError::TooLong);
            }
            if self.cr && b != b'\n' {
                return Err(ScanError::Malformed("carriage return in data"));
            }
            let ended = if self.csv {
                self.step_csv(b)
            } else {
                self.step_text(b)?
            };
            if ended {
                let end = RowEnd {
                    ending: if self.cr { 2 } else { 1 },
                    marker: self.marker,
                };
                self.reset();
                return Ok(Some((i, end)));
            }
        }
        Ok(None)
    }

    /// The state at end of data, for a final row without a line ending.
    pub(super) fn finish(&mut self) -> Result<RowEnd, &'static str> {
        if self.in_quote {
            return Err("unterminated CSV quoted field");
        }
        if self.cr {
            return Err("carriage return in data");
        }
        let end = RowEnd {
            ending: 0,
            marker: self.marker,
        };
        self.reset();
        Ok(end)
    }

    fn reset(&mut self) {
        self.len = 0;
        self.escaped = false;
        self.in_quote = false;
        self.cr = false;
        self.marker = false;
    }

    /// Length of the prefix of `bytes` that cannot change the scanner's state.
    fn plain_prefix(&self, bytes: &[u8]) -> usize {
        let found = if !self.csv {
            memchr::memchr3(b'\\', b'\r', b'\n', bytes)
        } else if self.in_quote {
            match self.escape {
                Some(e) => memchr::memchr2(self.quote, e, bytes),
                None => memchr::memchr(self.quote, bytes),
            }
        } else {
            memchr::memchr3(self.quote, b'\r', b'\n', bytes)
        };
        found.unwrap_or(bytes.len())
    }

    /// One text-format byte (already counted in `len`). Returns whether it ends the row.
    fn step_text(&mut self, b: u8) -> Result<bool, ScanError> {
        if self.escaped {
            self.escaped = false;
            if b == b'.' {
                if self.len != 2 {
                    return Err(ScanError::Malformed(
                        "end-of-copy marker is not alone on its line",
                    ));
                }
                self.marker = true;
            }
            return Ok(false);
        }
        if self.marker && b != b'\r' && b != b'\n' {
            return Err(ScanError::Malformed("end-of-copy marker corrupt"));
        }
        match b {
            b'\\' => self.escaped = true,
            b'\r' => self.cr = true,
            b'\n' => return Ok(true),
            _ => {}
        }
        Ok(false)
    }

    /// One CSV byte (already counted in `len`). Returns whether it ends the row.
    fn step_csv(&mut self, b: u8) -> bool {
        let is_escape = self.escape == Some(b);
        if self.in_quote && is_escape {
            self.escaped = !self.escaped;
        }
        if b == self.quote && !self.escaped {
            self.in_quote = !self.in_quote;
        }
        if !is_escape {
            self.escaped = false;
        }
        if self.in_quote {
            return false;
        }
        match b {
            b'\r' => self.cr = true,
            b'\n' => return true,
            _ => {}
        }
        false
    }
}
