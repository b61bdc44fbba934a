//! Splitting a complete COPY row into raw fields, and decoding and encoding one field, in
//! the text and CSV formats. Pure; never panics.

use std::borrow::Cow;
use std::ops::Range;

use super::{CopyFormat, CopyFormatError};

/// Split a text-format row (without line ending) at unescaped delimiters.
pub(super) fn split_text(content: &[u8], delimiter: u8, fields: &mut Vec<Range<usize>>) {
    let mut start = 0;
    let mut i = 0;
    while let Some(&b) = content.get(i) {
        if b == b'\\' {
            i += 2;
            continue;
        }
        if b == delimiter {
            fields.push(start..i);
            start = i + 1;
        }
        i += 1;
    }
    fields.push(start..content.len());
}

/// Split a CSV row (without line ending) at delimiters outside quotes, as PostgreSQL's
/// `CopyReadAttributesCSV` does.
pub(super) fn split_csv(
    content: &[u8],
    format: &CopyFormat,
    fields: &mut Vec<Range<usize>>,
) -> Result<(), &'static str> {
    let (quote, escape) = (format.quote, format.escape);
    let mut start = 0;
    let mut i = 0;
    let mut in_quote = false;
    while let Some(&b) = content.get(i) {
        i += 1;
        if in_quote {
            if b == escape && content.get(i).is_some_and(|&n| n == escape || n == quote) {
                i += 1;
            } else if b == quote {
                in_quote = false;
            }
        } else if b == format.delimiter {
            fields.push(start..i - 1);
            start = i;
        } else if b == quote {
            in_quote = true;
        }
    }
    if in_quote {
        return Err("unterminated CSV quoted field");
    }
    fields.push(start..content.len());
    Ok(())
}

pub(super) fn decode_text<'a>(raw: &'a [u8], format: &CopyFormat) -> Option<Cow<'a, [u8]>> {
    if raw == format.null.as_slice() {
        return None;
    }
    if !raw.contains(&b'\\') {
        return Some(Cow::Borrowed(raw));
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut it = raw.iter().copied().peekable();
    while let Some(b) = it.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        let Some(c) = it.next() else {
            // A lone backslash at the very end of data: PostgreSQL drops it.
            break;
        };
        let decoded = match c {
            b'0'..=b'7' => {
                // Up to three octal digits; PostgreSQL keeps the low 8 bits of the value.
                let mut v = c - b'0';
                for _ in 0..2 {
                    match it.peek() {
                        Some(&d @ b'0'..=b'7') => {
                            v = v.wrapping_mul(8).wrapping_add(d - b'0');
                            it.next();
                        }
                        _ => break,
                    }
                }
                v
            }
            b'x' => match it.peek().and_then(|&d| hex_value(d)) {
                Some(h) => {
                    it.next();
                    let mut v = h;
                    if let Some(l) = it.peek().and_then(|&d| hex_value(d)) {
                        it.next();
                        v = (v << 4) | l;
                    }
                    v
                }
                None => b'x',
            },
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'v' => 0x0b,
            other => other,
        };
        out.push(decoded);
    }
    Some(Cow::Owned(out))
}

fn hex_value(d: u8) -> Option<u8> {
    match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        b'A'..=b'F' => Some(d - b'A' + 10),
        _ => None,
    }
}

pub(super) fn decode_csv<'a>(raw: &'a [u8], format: &CopyFormat) -> Option<Cow<'a, [u8]>> {
    let (quote, escape) = (format.quote, format.escape);
    if !raw.contains(&quote) {
        if raw == format.null.as_slice() {
            return None;
        }
        return Some(Cow::Borrowed(raw));
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut in_quote = false;
    let mut i = 0;
    while let Some(&b) = raw.get(i) {
        i += 1;
        if in_quote {
            if b == escape {
                if let Some(&n) = raw.get(i).filter(|&&n| n == escape || n == quote) {
                    out.push(n);
                    i += 1;
                    continue;
                }
            }
            if b == quote {
                in_quote = false;
                continue;
            }
        } else if b == quote {
            in_quote = true;
            continue;
        }
        out.push(b);
    }
    Some(Cow::Owned(out))
}

pub(super) fn encode_text(
    value: &[u8],
    format: &CopyFormat,
    out: &mut Vec<u8>,
) -> Result<(), CopyFormatError> {
    if value.is_empty() && format.null.is_empty() {
        return Err(CopyFormatError {
            what: "empty string with an empty NULL string",
        });
    }
    let start = out.len();
    for &b in value {
        push_text_byte(b, format.delimiter, out);
    }
    if out.get(start..) == Some(format.null.as_slice()) {
        // The plain encoding would read back as NULL: spell the first byte as a hex escape.
        out.truncate(start);
        let mut bytes = value.iter().copied();
        if let Some(first) = bytes.next() {
            push_hex_escape(first, out);
        }
        for b in bytes {
            push_text_byte(b, format.delimiter, out);
        }
    }
    Ok(())
}

fn push_text_byte(b: u8, delimiter: u8, out: &mut Vec<u8>) {
    let escaped = match b {
        b'\\' => b'\\',
        b'\n' => b'n',
        b'\r' => b'r',
        b'\t' => b't',
        0x08 => b'b',
        0x0c => b'f',
        0x0b => b'v',
        _ if b < 0x20 || b == 0x7f => return push_hex_escape(b, out),
        _ if b == delimiter => b,
        _ => return out.push(b),
    };
    out.extend_from_slice(&[b'\\', escaped]);
}

fn push_hex_escape(b: u8, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.extend_from_slice(&[
        b'\\',
        b'x',
        HEX[usize::from(b >> 4)],
        HEX[usize::from(b & 0x0f)],
    ]);
}

pub(super) fn encode_csv(value: &[u8], format: &CopyFormat, out: &mut Vec<u8>) {
    let (quote, escape) = (format.quote, format.escape);
    let needs_quote = value == format.null.as_slice()
        || value == b"\\."
        || value.iter().any(|&b| {
            b == format.delimiter || b == quote || b == escape || b == b'\r' || b == b'\n'
        });
    if !needs_quote {
        out.extend_from_slice(value);
        return;
    }
    out.push(quote);
    for &b in value {
        if b == quote || b == escape {
            out.push(escape);
        }
        out.push(b);
    }
    out.push(quote);
}
