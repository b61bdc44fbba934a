//! Byte positions and literal values, computed from the SQL text itself.
//!
//! sqlparser reports positions as (line, column) pairs where columns count characters; this
//! module turns them into byte offsets. Literal values are decoded here from the raw token text
//! with PostgreSQL's rules (standard_conforming_strings on), not taken from sqlparser, so that the
//! value encrypted is exactly the value PostgreSQL would have stored.

use std::cell::Cell;
use std::ops::Range;

use sqlparser::tokenizer::{Location, Span};

/// Converts sqlparser locations into byte offsets of one text.
pub(crate) struct Positions<'a> {
    sql: &'a str,
    /// Invariant: byte offset of the first character of each line; `line_starts[0] == 0`.
    line_starts: Vec<usize>,
    /// Last resolved position as (line index, character column, byte offset), so that resolving
    /// many literals of one long line in order stays linear.
    cursor: Cell<(usize, usize, usize)>,
}

impl<'a> Positions<'a> {
    pub(crate) fn new(sql: &'a str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(
            sql.bytes()
                .enumerate()
                .filter(|&(_, b)| b == b'\n')
                .map(|(i, _)| i + 1),
        );
        Positions {
            sql,
            line_starts,
            cursor: Cell::new((0, 0, 0)),
        }
    }

    /// Byte offset of a 1-based (line, character column) location.
    pub(crate) fn offset(&self, loc: Location) -> Option<usize> {
        let line = usize::try_from(loc.line).ok()?.checked_sub(1)?;
        let col = usize::try_from(loc.column).ok()?.checked_sub(1)?;
        let line_start = *self.line_starts.get(line)?;
        let (cursor_line, cursor_col, cursor_byte) = self.cursor.get();
        let (mut seen, start) = if cursor_line == line && cursor_col <= col {
            (cursor_col, cursor_byte)
        } else {
            (0, line_start)
        };
        let rest = self.sql.get(start..)?;
        for (i, c) in rest.char_indices() {
            if seen == col {
                self.cursor.set((line, col, start + i));
                return Some(start + i);
            }
            if c == '\n' {
                return None;
            }
            seen += 1;
        }
        (seen == col).then_some(self.sql.len())
    }

    /// Byte range of a span (end exclusive).
    pub(crate) fn range(&self, span: Span) -> Option<Range<usize>> {
        let start = self.offset(span.start)?;
        let end = self.offset(span.end)?;
        (start < end && end <= self.sql.len()).then_some(start..end)
    }

    pub(crate) fn slice(&self, range: Range<usize>) -> Option<&'a str> {
        self.sql.get(range)
    }

    /// The text after `pos`.
    pub(crate) fn rest(&self, pos: usize) -> &'a str {
        self.sql.get(pos..).unwrap_or_default()
    }
}

/// Decodes a string literal token (`'…'`, `E'…'`, `U&'…'`, `N'…'`, `$tag$…$tag$`) as PostgreSQL
/// reads it. `None` when the token is not a string literal this module understands, or when its
/// escapes are invalid (PostgreSQL would refuse it as well).
pub(crate) fn decode_literal(token: &str) -> Option<String> {
    let bytes = token.as_bytes();
    match bytes.first()? {
        b'\'' => standard(token),
        b'e' | b'E' if bytes.get(1) == Some(&b'\'') => escaped(token.get(1..)?),
        b'n' | b'N' if bytes.get(1) == Some(&b'\'') => standard(token.get(1..)?),
        b'u' | b'U' if bytes.get(1) == Some(&b'&') && bytes.get(2) == Some(&b'\'') => {
            unicode(&standard(token.get(2..)?)?)
        }
        b'$' => dollar(token),
        _ => None,
    }
}

/// `'…'` with `''` as the only escape.
fn standard(token: &str) -> Option<String> {
    let inner = token.strip_prefix('\'')?.strip_suffix('\'')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\'' && chars.next() != Some('\'') {
            return None;
        }
        out.push(c);
    }
    Some(out)
}

/// `'…'` with backslash escapes (the `E` already stripped).
fn escaped(token: &str) -> Option<String> {
    let inner = token.strip_prefix('\'')?.strip_suffix('\'')?;
    let mut out: Vec<u8> = Vec::with_capacity(inner.len());
    let mut chars = inner.chars().peekable();
    let mut buf = [0u8; 4];
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                if chars.next() != Some('\'') {
                    return None;
                }
                out.push(b'\'');
            }
            '\\' => {
                let e = chars.next()?;
                match e {
                    'b' => out.push(8),
                    'f' => out.push(12),
                    'n' => out.push(b'\n'),
                    'r' => out.push(b'\r'),
                    't' => out.push(b'\t'),
                    '0'..='7' => {
                        let mut v = e.to_digit(8)?;
                        for _ in 0..2 {
                            match chars.peek().and_then(|d| d.to_digit(8)) {
                                Some(d) => {
                                    v = v * 8 + d;
                                    chars.next();
                                }
                                None => break,
                            }
                        }
                        out.push(u8::try_from(v & 0xff).ok()?);
                    }
                    'x' => {
                        let mut v = chars.peek().and_then(|d| d.to_digit(16))?;
                        chars.next();
                        if let Some(d) = chars.peek().and_then(|d| d.to_digit(16)) {
                            v = v * 16 + d;
                            chars.next();
                        }
                        out.push(u8::try_from(v).ok()?);
                    }
                    'u' | 'U' => {
                        let n = if e == 'u' { 4 } else { 8 };
                        let mut v: u32 = 0;
                        for _ in 0..n {
                            v = v
                                .checked_mul(16)?
                                .checked_add(chars.next()?.to_digit(16)?)?;
                        }
                        let ch = char::from_u32(v)?;
                        out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                    }
                    other => out.extend_from_slice(other.encode_utf8(&mut buf).as_bytes()),
                }
            }
            other => out.extend_from_slice(other.encode_utf8(&mut buf).as_bytes()),
        }
    }
    if out.contains(&0) {
        return None;
    }
    String::from_utf8(out).ok()
}

/// Unicode escapes of a `U&'…'` body (quotes already removed), with the default `\` escape.
fn unicode(body: &str) -> Option<String> {
    let mut out = String::with_capacity(body.len());
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let mut n = 4;
        let mut v: u32 = 0;
        match chars.clone().next()? {
            '\\' => {
                chars.next();
                out.push('\\');
                continue;
            }
            '+' => {
                chars.next();
                n = 6;
            }
            _ => {}
        }
        for _ in 0..n {
            v = v
                .checked_mul(16)?
                .checked_add(chars.next()?.to_digit(16)?)?;
        }
        if v == 0 {
            return None;
        }
        out.push(char::from_u32(v)?);
    }
    Some(out)
}

/// `$tag$…$tag$`, verbatim.
fn dollar(token: &str) -> Option<String> {
    let rest = token.strip_prefix('$')?;
    let end = rest.find('$')?;
    let tag = rest.get(..end)?;
    let delim_len = tag.len() + 2;
    if token.len() < 2 * delim_len {
        return None;
    }
    let body = token.get(delim_len..token.len() - delim_len)?;
    let close = token.get(token.len() - delim_len..)?;
    if close.strip_prefix('$')?.strip_suffix('$')? != tag {
        return None;
    }
    Some(body.to_owned())
}
