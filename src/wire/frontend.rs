//! Client → server message tags. Pass-through needs no frontend body decoding; the encryption
//! layer adds decoders for the messages it rewrites.

/// Bind ('B').
pub const BIND_TAG: u8 = b'B';
/// Close ('C').
pub const CLOSE_TAG: u8 = b'C';
/// CopyData ('d').
pub const COPY_DATA_TAG: u8 = b'd';
/// CopyDone ('c').
pub const COPY_DONE_TAG: u8 = b'c';
/// CopyFail ('f').
pub const COPY_FAIL_TAG: u8 = b'f';
/// Describe ('D').
pub const DESCRIBE_TAG: u8 = b'D';
/// Execute ('E').
pub const EXECUTE_TAG: u8 = b'E';
/// Flush ('H').
pub const FLUSH_TAG: u8 = b'H';
/// FunctionCall ('F').
pub const FUNCTION_CALL_TAG: u8 = b'F';
/// Parse ('P').
pub const PARSE_TAG: u8 = b'P';
/// PasswordMessage, SASLInitialResponse, SASLResponse, GSSResponse ('p').
pub const PASSWORD_TAG: u8 = b'p';
/// Query ('Q').
pub const QUERY_TAG: u8 = b'Q';
/// Sync ('S').
pub const SYNC_TAG: u8 = b'S';
/// Terminate ('X').
pub const TERMINATE_TAG: u8 = b'X';

use std::fmt;

use bytes::BytesMut;

use super::{put_cstr, put_message, Cursor, WireError};

/// A Query message: the SQL text as raw bytes (in the session's client_encoding).
pub fn parse_query(body: &[u8]) -> Result<&[u8], WireError> {
    let mut cur = Cursor::new(QUERY_TAG, body);
    let sql = cur.cstr()?;
    cur.finish()?;
    Ok(sql)
}

/// Append a Query message.
pub fn put_query(out: &mut BytesMut, sql: &[u8]) -> Result<(), WireError> {
    if sql.contains(&0) {
        return Err(WireError::Malformed {
            tag: QUERY_TAG,
            what: "NUL in query text",
        });
    }
    put_message(out, QUERY_TAG, |out| put_cstr(out, sql))
}

/// A decoded Parse message, borrowing from its frame.
#[derive(Clone, PartialEq, Eq)]
pub struct Parse<'a> {
    /// Statement name ("" = unnamed).
    pub name: &'a [u8],
    /// SQL text.
    pub sql: &'a [u8],
    /// Parameter type OIDs given by the client (0 = unspecified).
    pub param_types: Vec<u32>,
}

impl fmt::Debug for Parse<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Parse({} params)", self.param_types.len())
    }
}

impl<'a> Parse<'a> {
    /// Decode a Parse body.
    pub fn decode(body: &'a [u8]) -> Result<Self, WireError> {
        let mut cur = Cursor::new(PARSE_TAG, body);
        let name = cur.cstr()?;
        let sql = cur.cstr()?;
        let n = cur.i16()?;
        let n = usize::try_from(n).map_err(|_| WireError::Malformed {
            tag: PARSE_TAG,
            what: "negative parameter count",
        })?;
        if cur.remaining().len() != n * 4 {
            return Err(WireError::Malformed {
                tag: PARSE_TAG,
                what: "parameter type list length",
            });
        }
        let mut param_types = Vec::with_capacity(n);
        for _ in 0..n {
            param_types.push(cur.u32()?);
        }
        cur.finish()?;
        Ok(Self {
            name,
            sql,
            param_types,
        })
    }

    /// Append this Parse, possibly with changed SQL or parameter types.
    pub fn encode(&self, out: &mut BytesMut) -> Result<(), WireError> {
        let n = i16::try_from(self.param_types.len()).map_err(|_| WireError::Malformed {
            tag: PARSE_TAG,
            what: "too many parameters",
        })?;
        if self.sql.contains(&0) || self.name.contains(&0) {
            return Err(WireError::Malformed {
                tag: PARSE_TAG,
                what: "NUL in text",
            });
        }
        put_message(out, PARSE_TAG, |out| {
            put_cstr(out, self.name);
            put_cstr(out, self.sql);
            out.extend_from_slice(&n.to_be_bytes());
            for t in &self.param_types {
                out.extend_from_slice(&t.to_be_bytes());
            }
        })
    }
}

/// Format code: text.
pub const FORMAT_TEXT: i16 = 0;
/// Format code: binary.
pub const FORMAT_BINARY: i16 = 1;

/// A decoded Bind message, borrowing from its frame.
#[derive(Clone, PartialEq, Eq)]
pub struct Bind<'a> {
    /// Destination portal ("" = unnamed).
    pub portal: &'a [u8],
    /// Source statement ("" = unnamed).
    pub statement: &'a [u8],
    /// Parameter format codes as sent (0, 1 or n entries).
    pub param_formats: Vec<i16>,
    /// Parameter values (None = NULL).
    pub params: Vec<Option<&'a [u8]>>,
    /// Result format codes as sent (0, 1 or n entries).
    pub result_formats: Vec<i16>,
}

impl fmt::Debug for Bind<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bind({} params)", self.params.len())
    }
}

impl<'a> Bind<'a> {
    /// Decode a Bind body.
    pub fn decode(body: &'a [u8]) -> Result<Self, WireError> {
        let bad = |what| WireError::Malformed {
            tag: BIND_TAG,
            what,
        };
        let mut cur = Cursor::new(BIND_TAG, body);
        let portal = cur.cstr()?;
        let statement = cur.cstr()?;
        let nf = usize::try_from(cur.i16()?).map_err(|_| bad("negative format count"))?;
        let mut param_formats = Vec::with_capacity(nf.min(cur.remaining().len() / 2));
        for _ in 0..nf {
            param_formats.push(check_format(cur.i16()?, BIND_TAG)?);
        }
        let np = usize::try_from(cur.i16()?).map_err(|_| bad("negative parameter count"))?;
        let mut params = Vec::with_capacity(np.min(cur.remaining().len() / 4));
        for _ in 0..np {
            let len = cur.i32()?;
            if len == -1 {
                params.push(None);
            } else {
                let len = usize::try_from(len).map_err(|_| bad("negative parameter length"))?;
                params.push(Some(cur.bytes(len)?));
            }
        }
        let nr = usize::try_from(cur.i16()?).map_err(|_| bad("negative result format count"))?;
        let mut result_formats = Vec::with_capacity(nr.min(cur.remaining().len() / 2));
        for _ in 0..nr {
            result_formats.push(check_format(cur.i16()?, BIND_TAG)?);
        }
        cur.finish()?;
        if param_formats.len() > 1 && param_formats.len() != params.len() {
            return Err(bad("format count does not match parameter count"));
        }
        Ok(Self {
            portal,
            statement,
            param_formats,
            params,
            result_formats,
        })
    }

    /// The format of parameter `i` (0-based).
    pub fn param_format(&self, i: usize) -> i16 {
        format_at(&self.param_formats, i)
    }

    /// Append this Bind with the given parameter values (same count as `self.params`).
    pub fn encode_with(
        &self,
        params: &[Option<&[u8]>],
        out: &mut BytesMut,
    ) -> Result<(), WireError> {
        let too_many = WireError::Malformed {
            tag: BIND_TAG,
            what: "too many fields",
        };
        let nf = i16::try_from(self.param_formats.len()).map_err(|_| too_many.clone())?;
        let np = i16::try_from(params.len()).map_err(|_| too_many.clone())?;
        let nr = i16::try_from(self.result_formats.len()).map_err(|_| too_many.clone())?;
        let mut lens = Vec::with_capacity(params.len());
        let mut size = 5
            + self.portal.len()
            + self.statement.len()
            + 8
            + 2 * (self.param_formats.len() + self.result_formats.len());
        for p in params {
            lens.push(match p {
                None => -1,
                Some(v) => i32::try_from(v.len()).map_err(|_| too_many.clone())?,
            });
            size += 4 + p.map_or(0, <[u8]>::len);
        }
        // One allocation for the whole message instead of growing it value by value.
        out.reserve(size);
        put_message(out, BIND_TAG, |out| {
            put_cstr(out, self.portal);
            put_cstr(out, self.statement);
            out.extend_from_slice(&nf.to_be_bytes());
            for f in &self.param_formats {
                out.extend_from_slice(&f.to_be_bytes());
            }
            out.extend_from_slice(&np.to_be_bytes());
            for (p, len) in params.iter().zip(&lens) {
                out.extend_from_slice(&len.to_be_bytes());
                if let Some(v) = p {
                    out.extend_from_slice(v);
                }
            }
            out.extend_from_slice(&nr.to_be_bytes());
            for f in &self.result_formats {
                out.extend_from_slice(&f.to_be_bytes());
            }
        })
    }
}

/// The format code for column/parameter `i` given a format list with 0, 1 or n entries.
pub fn format_at(formats: &[i16], i: usize) -> i16 {
    match formats {
        [] => FORMAT_TEXT,
        [one] => *one,
        many => many.get(i).copied().unwrap_or(FORMAT_TEXT),
    }
}

fn check_format(f: i16, tag: u8) -> Result<i16, WireError> {
    if f == FORMAT_TEXT || f == FORMAT_BINARY {
        Ok(f)
    } else {
        Err(WireError::Malformed {
            tag,
            what: "unknown format code",
        })
    }
}

/// What a Describe or Close refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A prepared statement ('S').
    Statement,
    /// A portal ('P').
    Portal,
}

/// Decode a Describe or Close body: target kind and name.
pub fn parse_target(tag: u8, body: &[u8]) -> Result<(Target, &[u8]), WireError> {
    let mut cur = Cursor::new(tag, body);
    let kind = match cur.u8()? {
        b'S' => Target::Statement,
        b'P' => Target::Portal,
        _ => {
            return Err(WireError::Malformed {
                tag,
                what: "describe/close target",
            })
        }
    };
    let name = cur.cstr()?;
    cur.finish()?;
    Ok((kind, name))
}

/// Append a Describe message.
pub fn put_describe(out: &mut BytesMut, target: Target, name: &[u8]) -> Result<(), WireError> {
    put_message(out, DESCRIBE_TAG, |out| {
        out.extend_from_slice(match target {
            Target::Statement => b"S",
            Target::Portal => b"P",
        });
        put_cstr(out, name);
    })
}

/// Decode an Execute body: portal name and row limit (0 = all).
pub fn parse_execute(body: &[u8]) -> Result<(&[u8], i32), WireError> {
    let mut cur = Cursor::new(EXECUTE_TAG, body);
    let portal = cur.cstr()?;
    let max_rows = cur.i32()?;
    cur.finish()?;
    Ok((portal, max_rows))
}

/// Decode a CopyFail body (the message is kept as raw bytes).
pub fn parse_copy_fail(body: &[u8]) -> Result<&[u8], WireError> {
    let mut cur = Cursor::new(COPY_FAIL_TAG, body);
    let msg = cur.cstr()?;
    cur.finish()?;
    Ok(msg)
}

/// Append a CopyFail message.
pub fn put_copy_fail(out: &mut BytesMut, message: &str) -> Result<(), WireError> {
    put_message(out, COPY_FAIL_TAG, |out| put_cstr(out, message.as_bytes()))
}

/// Append a CopyData message.
pub fn put_copy_data(out: &mut BytesMut, data: &[u8]) -> Result<(), WireError> {
    put_message(out, COPY_DATA_TAG, |out| out.extend_from_slice(data))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn bind_round_trip() {
        let bind = Bind {
            portal: b"p",
            statement: b"s1",
            param_formats: vec![0, 1],
            params: vec![Some(b"abc"), None],
            result_formats: vec![1],
        };
        let mut out = BytesMut::new();
        bind.encode_with(&bind.params, &mut out).unwrap();
        let back = Bind::decode(&out[5..]).unwrap();
        assert_eq!(back, bind);
        assert_eq!(back.param_format(1), 1);
    }

    #[test]
    fn parse_round_trip() {
        let p = Parse {
            name: b"",
            sql: b"insert into t values ($1)",
            param_types: vec![25],
        };
        let mut out = BytesMut::new();
        p.encode(&mut out).unwrap();
        assert_eq!(Parse::decode(&out[5..]).unwrap(), p);
    }

    proptest! {
        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Bind::decode(&data);
            let _ = Parse::decode(&data);
            let _ = parse_query(&data);
            let _ = parse_target(DESCRIBE_TAG, &data);
            let _ = parse_execute(&data);
            let _ = parse_copy_fail(&data);
        }

        #[test]
        fn bind_encode_decode(
            params in proptest::collection::vec(proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)), 0..8),
            binary in any::<bool>(),
        ) {
            let refs: Vec<Option<&[u8]>> = params.iter().map(|p| p.as_deref()).collect();
            let bind = Bind { portal: b"", statement: b"x", param_formats: vec![i16::from(binary)], params: refs.clone(), result_formats: vec![] };
            let mut out = BytesMut::new();
            bind.encode_with(&refs, &mut out).unwrap();
            prop_assert_eq!(Bind::decode(&out[5..]).unwrap(), bind);
        }
    }
}
