//! One-dimensional PostgreSQL arrays, in the text form (`{a,"b c",NULL}`) and the binary form
//! of the extended protocol, for arrays whose elements the proxy seals one by one (Django's
//! `bulk_create`: `INSERT … SELECT * FROM UNNEST($1::text[], …)`). Pure, like the rest of
//! [`crate::wire`]; never panics on any input.
//!
//! Only what one-dimensional arrays need: a text array with dimension decorations (`[1:3]=`)
//! or nested braces, or a binary array of more than one dimension, is an error, and the
//! caller refuses the statement.

use crate::wire::{Cursor, WireError};

/// Why an array could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArrayError {
    /// Not a one-dimensional array in PostgreSQL's text form.
    #[error("not a one-dimensional array literal: {0}")]
    Text(&'static str),
    /// Not a one-dimensional array in PostgreSQL's binary form.
    #[error("not a one-dimensional binary array: {0}")]
    Binary(&'static str),
}

/// The elements of a one-dimensional array in text form (`None` for NULL), as PostgreSQL
/// reads it for the text element type (white space around unquoted elements dropped,
/// backslash escapes and double quotes removed).
pub fn parse_text(text: &str) -> Result<Vec<Option<String>>, ArrayError> {
    let bad = ArrayError::Text;
    let s = text.trim_matches(is_array_space);
    let inner = s
        .strip_prefix('{')
        .and_then(|r| r.strip_suffix('}'))
        .ok_or(bad("braces"))?;
    let mut out = Vec::new();
    let mut chars = inner.chars().peekable();
    if inner.trim_matches(is_array_space).is_empty() {
        return Ok(out);
    }
    loop {
        while chars.peek().is_some_and(|c| is_array_space(*c)) {
            chars.next();
        }
        let mut value = String::new();
        let mut quoted = false;
        let mut raw_unquoted = String::new();
        match chars.peek() {
            Some('"') => {
                quoted = true;
                chars.next();
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => value.push(chars.next().ok_or(bad("escape"))?),
                        Some(c) => value.push(c),
                        None => return Err(bad("unterminated quote")),
                    }
                }
                while chars.peek().is_some_and(|c| is_array_space(*c)) {
                    chars.next();
                }
            }
            Some('{') => return Err(bad("more than one dimension")),
            _ => {
                // Unquoted: up to the next comma; trailing white space is not part of it
                // (unless escaped).
                let mut pending_space = String::new();
                while let Some(&c) = chars.peek() {
                    match c {
                        ',' => break,
                        '{' | '}' | '"' => return Err(bad("unexpected character")),
                        '\\' => {
                            chars.next();
                            value.push_str(&pending_space);
                            pending_space.clear();
                            let e = chars.next().ok_or(bad("escape"))?;
                            value.push(e);
                            raw_unquoted.push('\\');
                            raw_unquoted.push(e);
                        }
                        c if is_array_space(c) => {
                            chars.next();
                            pending_space.push(c);
                        }
                        c => {
                            chars.next();
                            value.push_str(&pending_space);
                            raw_unquoted.push_str(&pending_space);
                            pending_space.clear();
                            value.push(c);
                            raw_unquoted.push(c);
                        }
                    }
                }
                if value.is_empty() {
                    return Err(bad("empty element"));
                }
            }
        }
        if !quoted && raw_unquoted.eq_ignore_ascii_case("null") {
            out.push(None);
        } else {
            out.push(Some(value));
        }
        match chars.next() {
            Some(',') => continue,
            None => return Ok(out),
            Some(_) => return Err(bad("expected a comma")),
        }
    }
}

/// PostgreSQL's array white space (`array_isspace`).
fn is_array_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c')
}

/// The text form of a one-dimensional array of `elements` (`None` for NULL); elements are
/// quoted when they need it.
pub fn encode_text<S: AsRef<str>>(elements: &[Option<S>]) -> String {
    let mut out = String::from("{");
    for (i, e) in elements.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match e {
            None => out.push_str("NULL"),
            Some(v) => {
                let v = v.as_ref();
                let plain = !v.is_empty()
                    && !v.eq_ignore_ascii_case("null")
                    && !v
                        .chars()
                        .any(|c| matches!(c, ',' | '{' | '}' | '"' | '\\') || is_array_space(c));
                if plain {
                    out.push_str(v);
                } else {
                    out.push('"');
                    for c in v.chars() {
                        if c == '"' || c == '\\' {
                            out.push('\\');
                        }
                        out.push(c);
                    }
                    out.push('"');
                }
            }
        }
    }
    out.push('}');
    out
}

/// A one-dimensional array in binary form: its element type and elements (`None` for NULL).
#[derive(Clone, PartialEq, Eq)]
pub struct BinaryArray<'a> {
    /// The element type's OID.
    pub element_type: u32,
    /// The elements, in order.
    pub elements: Vec<Option<&'a [u8]>>,
}

impl std::fmt::Debug for BinaryArray<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "BinaryArray({} elements of {})",
            self.elements.len(),
            self.element_type
        )
    }
}

impl<'a> BinaryArray<'a> {
    /// Decode the binary form (`array_send`): dimensions, flags, element type, then each
    /// element's length and bytes. Zero dimensions is the empty array.
    pub fn decode(raw: &'a [u8]) -> Result<Self, ArrayError> {
        let bad = |_: WireError| ArrayError::Binary("truncated");
        let mut cur = Cursor::new(0, raw);
        let ndim = cur.i32().map_err(bad)?;
        let _flags = cur.i32().map_err(bad)?;
        let element_type = cur.u32().map_err(bad)?;
        let count = match ndim {
            0 => 0,
            1 => {
                let n = cur.i32().map_err(bad)?;
                let _lower = cur.i32().map_err(bad)?;
                usize::try_from(n).map_err(|_| ArrayError::Binary("length"))?
            }
            _ => return Err(ArrayError::Binary("more than one dimension")),
        };
        let mut elements = Vec::with_capacity(count.min(raw.len() / 4));
        for _ in 0..count {
            let len = cur.i32().map_err(bad)?;
            if len < 0 {
                elements.push(None);
                continue;
            }
            let len = usize::try_from(len).map_err(|_| ArrayError::Binary("length"))?;
            elements.push(Some(cur.bytes(len).map_err(bad)?));
        }
        if !cur.is_empty() {
            return Err(ArrayError::Binary("trailing bytes"));
        }
        Ok(Self {
            element_type,
            elements,
        })
    }
}

/// The binary form of a one-dimensional array of `element_type` (lower bound 1).
pub fn encode_binary<B: AsRef<[u8]>>(
    element_type: u32,
    elements: &[Option<B>],
) -> Result<Vec<u8>, ArrayError> {
    let too_long = || ArrayError::Binary("too long");
    let mut out = Vec::new();
    let n = i32::try_from(elements.len()).map_err(|_| too_long())?;
    let has_null = elements.iter().any(Option::is_none);
    out.extend_from_slice(&i32::from(n > 0).to_be_bytes());
    out.extend_from_slice(&i32::from(has_null).to_be_bytes());
    out.extend_from_slice(&element_type.to_be_bytes());
    if n > 0 {
        out.extend_from_slice(&n.to_be_bytes());
        out.extend_from_slice(&1_i32.to_be_bytes());
    }
    for e in elements {
        match e {
            None => out.extend_from_slice(&(-1_i32).to_be_bytes()),
            Some(v) => {
                let v = v.as_ref();
                let len = i32::try_from(v.len()).map_err(|_| too_long())?;
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(v);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn some(v: &[&str]) -> Vec<Option<String>> {
        v.iter().map(|s| Some((*s).to_owned())).collect()
    }

    #[test]
    fn text_arrays_read_as_postgresql_reads_them() {
        assert_eq!(parse_text("{}").unwrap(), Vec::<Option<String>>::new());
        assert_eq!(parse_text("{a,b}").unwrap(), some(&["a", "b"]));
        assert_eq!(
            parse_text(r#" { a b , "c,d" ,NULL,"NULL", e\,f , \"x }"#).unwrap(),
            vec![
                Some("a b".into()),
                Some("c,d".into()),
                None,
                Some("NULL".into()),
                Some("e,f".into()),
                Some("\"x".into()),
            ]
        );
        assert_eq!(parse_text(r#"{"a\"b\\c"}"#).unwrap(), some(&["a\"b\\c"]));
        for bad in [
            "",
            "{",
            "{a",
            "{{a}}",
            "[1:2]={a,b}",
            "{a,}",
            "{,a}",
            "{a\"b}",
            "{\"a\"b}",
        ] {
            assert!(parse_text(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn text_arrays_round_trip() {
        let v = vec![
            Some("enc:v1:AQID+/==".to_owned()),
            None,
            Some(String::new()),
            Some("null".into()),
            Some("a,b {c} \"d\" \\e".into()),
        ];
        assert_eq!(
            encode_text(&v),
            r#"{enc:v1:AQID+/==,NULL,"","null","a,b {c} \"d\" \\e"}"#
        );
        assert_eq!(parse_text(&encode_text(&v)).unwrap(), v);
    }

    #[test]
    fn binary_arrays_round_trip() {
        let v: Vec<Option<&[u8]>> = vec![Some(b"a"), None, Some(b"")];
        let raw = encode_binary(25, &v).unwrap();
        let back = BinaryArray::decode(&raw).unwrap();
        assert_eq!(back.element_type, 25);
        assert_eq!(back.elements, v);
        let empty = encode_binary::<&[u8]>(25, &[]).unwrap();
        assert!(BinaryArray::decode(&empty).unwrap().elements.is_empty());
        assert!(BinaryArray::decode(&raw[..raw.len() - 1]).is_err());
    }

    proptest! {
        #[test]
        fn any_elements_round_trip(v in proptest::collection::vec(proptest::option::of(".{0,12}"), 0..8)) {
            prop_assert_eq!(parse_text(&encode_text(&v)).unwrap(), v);
        }

        #[test]
        fn decoders_never_panic(text in ".{0,64}", raw in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = parse_text(&text);
            let _ = BinaryArray::decode(&raw);
        }
    }
}
