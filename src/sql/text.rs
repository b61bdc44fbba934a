//! Byte positions and literal values, computed from the SQL text itself.
//!
//! sqlparser reports positions as (line, column) pairs where columns count characters; this
//! module turns them into byte offsets. Literal values are decoded here from the raw token text
//! with PostgreSQL's rules (standard_conforming_strings on), not taken from sqlparser, so that the
//! value encrypted is exactly the value PostgreSQL would have stored.
//!
//! String continuation (`'abc'` newline `'def'`, one literal `abcdef` in PostgreSQL, which
//! sqlparser does not know) is handled with a *shadow* text of the same byte length in which
//! each continued literal is joined into one token and padded with spaces ([`continuations`]);
//! the parser reads the shadow, while ranges and values come from the original text.

use std::cell::Cell;
use std::ops::Range;

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::tokenizer::{Location, Span, Token, Tokenizer, Whitespace};

/// Converts sqlparser locations into byte offsets of one text.
pub(crate) struct Positions<'a> {
    /// The text the parser read (the shadow, when there are continued literals).
    sql: &'a str,
    /// The client's text: same byte length, same bytes outside `groups`.
    original: &'a str,
    /// Byte ranges of continued literals (sorted), each one token in `sql`.
    groups: Vec<Range<usize>>,
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
            original: sql,
            groups: Vec::new(),
            line_starts,
            cursor: Cell::new((0, 0, 0)),
        }
    }

    /// Positions over `shadow` (what the parser read) for ranges of `original`.
    pub(crate) fn with_shadow(
        shadow: &'a str,
        original: &'a str,
        groups: Vec<Range<usize>>,
    ) -> Self {
        let mut p = Self::new(shadow);
        p.original = original;
        p.groups = groups;
        p
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
        let mut end = self.offset(span.end)?;
        if let Ok(i) = self.groups.binary_search_by_key(&start, |g| g.start) {
            end = self.groups.get(i)?.end;
        }
        (start < end && end <= self.sql.len()).then_some(start..end)
    }

    pub(crate) fn slice(&self, range: Range<usize>) -> Option<&'a str> {
        self.original.get(range)
    }

    /// The text after `pos`.
    pub(crate) fn rest(&self, pos: usize) -> &'a str {
        self.original.get(pos..).unwrap_or_default()
    }
}

/// Continued string literals of `sql` (PostgreSQL's `quotecontinue`: a `'…'` after whitespace
/// that holds a newline, `--` comments allowed, continues the literal before it). `None` when
/// there are none; else the shadow text (same byte length, each group joined into one literal
/// and padded with spaces) and the group ranges. `Err` when a continued literal cannot be read
/// as PostgreSQL reads it (a continuation of an `E'…'` literal holding `\'`, which sqlparser
/// tokenizes without escapes): the text must be refused.
pub(crate) fn continuations(sql: &str) -> Result<Option<Shadow>, Unreadable> {
    if !sql.contains(['\n', '\r']) {
        return Ok(None);
    }
    let dialect = PostgreSqlDialect {};
    let Ok(tokens) = Tokenizer::new(&dialect, sql).tokenize_with_location() else {
        return Ok(None);
    };
    let pos = Positions::new(sql);
    let mut groups = Vec::new();
    let mut i = 0;
    while let Some(t) = tokens.get(i) {
        i += 1;
        let continuable = matches!(
            t.token,
            Token::SingleQuotedString(_)
                | Token::EscapedStringLiteral(_)
                | Token::NationalStringLiteral(_)
                | Token::UnicodeStringLiteral(_)
                | Token::HexStringLiteral(_)
        );
        if !continuable {
            continue;
        }
        let Some(first) = pos.range(t.span) else {
            continue;
        };
        let mut end = first.end;
        loop {
            let mut k = i;
            while matches!(tokens.get(k).map(|t| &t.token), Some(Token::Whitespace(w)) if !matches!(w, Whitespace::MultiLineComment(_)))
            {
                k += 1;
            }
            let Some(next) = tokens.get(k) else { break };
            if !matches!(next.token, Token::SingleQuotedString(_)) {
                break;
            }
            let Some(r) = pos.range(next.span) else { break };
            if !sql.get(end..r.start).is_some_and(separator_continues) {
                break;
            }
            end = r.end;
            i = k + 1;
        }
        if end != first.end {
            groups.push(first.start..end);
        }
    }
    if groups.is_empty() {
        return Ok(None);
    }
    let mut shadow = String::with_capacity(sql.len());
    let mut at = 0;
    for g in &groups {
        shadow.push_str(sql.get(at..g.start).ok_or(Unreadable)?);
        let joined = sql
            .get(g.clone())
            .and_then(join_segments)
            .ok_or(Unreadable)?;
        let pad = g.len().checked_sub(joined.len()).ok_or(Unreadable)?;
        shadow.push_str(&joined);
        shadow.extend(std::iter::repeat_n(' ', pad));
        at = g.end;
    }
    shadow.push_str(sql.get(at..).ok_or(Unreadable)?);
    Ok(Some(Shadow {
        text: shadow,
        groups,
    }))
}

/// The text the parser reads when literals are continued (see [`continuations`]).
pub(crate) struct Shadow {
    /// Same byte length as the original; each continued literal joined and padded.
    pub(crate) text: String,
    /// Byte ranges of the continued literals (sorted).
    pub(crate) groups: Vec<Range<usize>>,
}

/// A continued literal that cannot be read as PostgreSQL reads it.
pub(crate) struct Unreadable;

/// Whether the text between two string literals continues the first (PostgreSQL's
/// `whitespace_with_newline`): spaces, tabs, form feeds and `--` comments, at least one newline,
/// vertical tabs only after it.
pub(crate) fn separator_continues(sep: &str) -> bool {
    let b = sep.as_bytes();
    let mut i = 0;
    let mut newline = false;
    while let Some(&c) = b.get(i) {
        match c {
            b' ' | b'\t' | 0x0c => i += 1,
            b'\n' | b'\r' => {
                newline = true;
                i += 1;
            }
            0x0b if newline => i += 1,
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while b.get(i).is_some_and(|&c| c != b'\n' && c != b'\r') {
                    i += 1;
                }
            }
            _ => return false,
        }
    }
    newline
}

/// A quoted literal token, possibly continued over several segments, as one token: the prefix,
/// the segments' bodies joined, the closing quote. `None` when it is not well formed.
pub(crate) fn join_segments(token: &str) -> Option<String> {
    let q = token.find('\'')?;
    let escapes = token.get(..q)?.eq_ignore_ascii_case("e");
    let b = token.as_bytes();
    let mut out = String::with_capacity(token.len());
    out.push_str(token.get(..=q)?);
    let mut i = q + 1;
    loop {
        let body = i;
        loop {
            match *b.get(i)? {
                b'\\' if escapes => i += 2,
                b'\'' if b.get(i + 1) == Some(&b'\'') => i += 2,
                b'\'' => break,
                _ => i += 1,
            }
        }
        out.push_str(token.get(body..i)?);
        i += 1;
        if i == token.len() {
            out.push('\'');
            return Some(out);
        }
        let next = i + token.get(i..)?.find('\'')?;
        if !separator_continues(token.get(i..next)?) {
            return None;
        }
        i = next + 1;
    }
}

/// Decodes a string literal token (`'…'`, `E'…'`, `U&'…'`, `N'…'`, `$tag$…$tag$`) as PostgreSQL
/// reads it. `None` when the token is not a string literal this module understands, or when its
/// escapes are invalid (PostgreSQL would refuse it as well).
pub(crate) fn decode_literal(token: &str) -> Option<String> {
    if token.starts_with('$') {
        return dollar(token);
    }
    let joined = join_segments(token)?;
    let token = joined.as_str();
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

/// The text PostgreSQL stores for `v` read as a `uuid` (lower-case hex in groups of
/// 8-4-4-4-12), when `v` is 32 hex digits with hyphens or braces around and between them;
/// `None` for anything else. A value PostgreSQL's `uuid` input would still refuse (a hyphen in
/// an odd place) is refused by the server, so reading it leniently here stores nothing.
pub(crate) fn canonical_uuid(v: &str) -> Option<String> {
    let mut hex = String::with_capacity(36);
    for c in v.chars() {
        match c {
            '-' | '{' | '}' => {}
            c if c.is_ascii_hexdigit() => {
                if matches!(hex.len(), 8 | 13 | 18 | 23) {
                    hex.push('-');
                }
                hex.push(c.to_ascii_lowercase());
            }
            _ => return None,
        }
        if hex.len() > 36 {
            return None;
        }
    }
    (hex.len() == 36).then_some(hex)
}

#[cfg(test)]
mod uuid_tests {
    use super::canonical_uuid;

    #[test]
    fn uuids_in_any_accepted_form_read_as_stored() {
        let stored = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
        for written in [
            stored,
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
            "a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11",
            "{a0eebc999c0b4ef8bb6d6bb9bd380a11}",
        ] {
            assert_eq!(
                canonical_uuid(written).as_deref(),
                Some(stored),
                "{written}"
            );
        }
        for other in [
            "",
            "acme",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a111",
            "a0eebc99 9c0b 4ef8 bb6d 6bb9bd380a11",
            "g0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        ] {
            assert_eq!(canonical_uuid(other), None, "{other}");
        }
    }
}
