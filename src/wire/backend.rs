//! Server → client messages: tags, decoding of the few bodies the proxy reads, and encoding of
//! the messages the proxy produces itself (ErrorResponse, ReadyForQuery).

use std::fmt;

use bytes::BytesMut;

use super::{put_cstr, put_message, Cursor, WireError};

/// Authentication request ('R').
pub const AUTHENTICATION_TAG: u8 = b'R';
/// BackendKeyData ('K').
pub const BACKEND_KEY_DATA_TAG: u8 = b'K';
/// BindComplete ('2').
pub const BIND_COMPLETE_TAG: u8 = b'2';
/// CloseComplete ('3').
pub const CLOSE_COMPLETE_TAG: u8 = b'3';
/// CommandComplete ('C').
pub const COMMAND_COMPLETE_TAG: u8 = b'C';
/// CopyData ('d').
pub const COPY_DATA_TAG: u8 = b'd';
/// CopyDone ('c').
pub const COPY_DONE_TAG: u8 = b'c';
/// CopyInResponse ('G').
pub const COPY_IN_RESPONSE_TAG: u8 = b'G';
/// CopyOutResponse ('H').
pub const COPY_OUT_RESPONSE_TAG: u8 = b'H';
/// CopyBothResponse ('W').
pub const COPY_BOTH_RESPONSE_TAG: u8 = b'W';
/// DataRow ('D').
pub const DATA_ROW_TAG: u8 = b'D';
/// EmptyQueryResponse ('I').
pub const EMPTY_QUERY_RESPONSE_TAG: u8 = b'I';
/// ErrorResponse ('E').
pub const ERROR_RESPONSE_TAG: u8 = b'E';
/// FunctionCallResponse ('V').
pub const FUNCTION_CALL_RESPONSE_TAG: u8 = b'V';
/// NegotiateProtocolVersion ('v').
pub const NEGOTIATE_PROTOCOL_VERSION_TAG: u8 = b'v';
/// NoData ('n').
pub const NO_DATA_TAG: u8 = b'n';
/// NoticeResponse ('N').
pub const NOTICE_RESPONSE_TAG: u8 = b'N';
/// NotificationResponse ('A').
pub const NOTIFICATION_RESPONSE_TAG: u8 = b'A';
/// ParameterDescription ('t').
pub const PARAMETER_DESCRIPTION_TAG: u8 = b't';
/// ParameterStatus ('S').
pub const PARAMETER_STATUS_TAG: u8 = b'S';
/// ParseComplete ('1').
pub const PARSE_COMPLETE_TAG: u8 = b'1';
/// PortalSuspended ('s').
pub const PORTAL_SUSPENDED_TAG: u8 = b's';
/// ReadyForQuery ('Z').
pub const READY_FOR_QUERY_TAG: u8 = b'Z';
/// RowDescription ('T').
pub const ROW_DESCRIPTION_TAG: u8 = b'T';

/// Transaction status reported by ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionStatus {
    /// 'I': not in a transaction block.
    Idle,
    /// 'T': in a transaction block.
    InTransaction,
    /// 'E': in a failed transaction block.
    Failed,
}

/// Decode a ReadyForQuery body.
pub fn parse_ready_for_query(body: &[u8]) -> Result<TransactionStatus, WireError> {
    let mut cur = Cursor::new(READY_FOR_QUERY_TAG, body);
    let status = match cur.u8()? {
        b'I' => TransactionStatus::Idle,
        b'T' => TransactionStatus::InTransaction,
        b'E' => TransactionStatus::Failed,
        _ => {
            return Err(WireError::Malformed {
                tag: READY_FOR_QUERY_TAG,
                what: "transaction status",
            })
        }
    };
    cur.finish()?;
    Ok(status)
}

/// Decode a ParameterStatus body into (name, value), as raw bytes.
pub fn parse_parameter_status(body: &[u8]) -> Result<(&[u8], &[u8]), WireError> {
    let mut cur = Cursor::new(PARAMETER_STATUS_TAG, body);
    let name = cur.cstr()?;
    let value = cur.cstr()?;
    cur.finish()?;
    Ok((name, value))
}

/// Decode a BackendKeyData body: the process id and the whole key (pid ‖ secret) as sent, which
/// is what a CancelRequest must repeat.
pub fn parse_backend_key_data(body: &[u8]) -> Result<(i32, &[u8]), WireError> {
    let mut cur = Cursor::new(BACKEND_KEY_DATA_TAG, body);
    let pid = cur.i32()?;
    let secret = cur.remaining();
    if secret.len() < 4 || secret.len() > 256 {
        return Err(WireError::Malformed {
            tag: BACKEND_KEY_DATA_TAG,
            what: "secret key length",
        });
    }
    Ok((pid, body))
}

/// Decode the authentication request code of an 'R' message (0 = AuthenticationOk).
pub fn parse_authentication_code(body: &[u8]) -> Result<i32, WireError> {
    Cursor::new(AUTHENTICATION_TAG, body).i32()
}

/// The fields of an ErrorResponse or NoticeResponse body, as (field type, value) pairs.
pub struct ErrorFields<'a> {
    cur: Cursor<'a>,
}

impl<'a> ErrorFields<'a> {
    /// Iterate over an ErrorResponse/NoticeResponse body.
    pub fn new(body: &'a [u8]) -> Self {
        Self {
            cur: Cursor::new(ERROR_RESPONSE_TAG, body),
        }
    }

    /// The value of one field type (e.g. `b'C'` for the SQLSTATE, `b'S'` for severity).
    pub fn find(body: &'a [u8], field: u8) -> Option<&'a [u8]> {
        Self::new(body)
            .filter_map(Result::ok)
            .find(|(f, _)| *f == field)
            .map(|(_, v)| v)
    }
}

impl<'a> Iterator for ErrorFields<'a> {
    type Item = Result<(u8, &'a [u8]), WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.cur.is_empty() {
            return None;
        }
        let field = match self.cur.u8() {
            Ok(0) => return None,
            Ok(f) => f,
            Err(e) => return Some(Err(e)),
        };
        Some(self.cur.cstr().map(|v| (field, v)))
    }
}

impl fmt::Debug for ErrorFields<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ErrorFields")
    }
}

/// Append an ErrorResponse/NoticeResponse (`tag`) with the fields of `body` except those of
/// the types in `drop`. Returns `false` (appending nothing) if `body` is malformed.
pub fn put_fields_without(out: &mut BytesMut, tag: u8, body: &[u8], drop: &[u8]) -> bool {
    put_fields_replacing(out, tag, body, None, drop)
}

/// Like [`put_fields_without`], and with the value of the field of type `replace.0` (if
/// `body` has one) replaced by `replace.1`.
pub fn put_fields_replacing(
    out: &mut BytesMut,
    tag: u8,
    body: &[u8],
    replace: Option<(u8, &[u8])>,
    drop: &[u8],
) -> bool {
    let fields: Result<Vec<(u8, &[u8])>, WireError> = ErrorFields::new(body).collect();
    let Ok(fields) = fields else {
        return false;
    };
    put_message(out, tag, |out| {
        for (f, v) in fields.iter().filter(|(f, _)| !drop.contains(f)) {
            out.extend_from_slice(&[*f]);
            match replace {
                Some((r, with)) if r == *f => put_cstr(out, with),
                _ => put_cstr(out, v),
            }
        }
        out.extend_from_slice(&[0]);
    })
    .is_ok()
}

/// Severity of an error the proxy produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The statement failed; the session goes on.
    Error,
    /// The session ends after this message.
    Fatal,
}

impl Severity {
    fn as_bytes(self) -> &'static [u8] {
        match self {
            Severity::Error => b"ERROR",
            Severity::Fatal => b"FATAL",
        }
    }
}

/// Append an ErrorResponse with severity, SQLSTATE and message.
pub fn put_error_response(
    out: &mut BytesMut,
    severity: Severity,
    sqlstate: &str,
    message: &str,
) -> Result<(), WireError> {
    put_message(out, ERROR_RESPONSE_TAG, |out| {
        out.extend_from_slice(b"S");
        put_cstr(out, severity.as_bytes());
        out.extend_from_slice(b"V");
        put_cstr(out, severity.as_bytes());
        out.extend_from_slice(b"C");
        put_cstr(out, sqlstate.as_bytes());
        out.extend_from_slice(b"M");
        put_cstr(out, message.as_bytes());
        out.extend_from_slice(&[0]);
    })
}

/// Append a ParameterDescription.
pub fn put_parameter_description(out: &mut BytesMut, types: &[u32]) -> Result<(), WireError> {
    let n = i16::try_from(types.len()).map_err(|_| WireError::Malformed {
        tag: PARAMETER_DESCRIPTION_TAG,
        what: "too many parameters",
    })?;
    put_message(out, PARAMETER_DESCRIPTION_TAG, |out| {
        out.extend_from_slice(&n.to_be_bytes());
        for t in types {
            out.extend_from_slice(&t.to_be_bytes());
        }
    })
}

/// Append a ReadyForQuery.
pub fn put_ready_for_query(out: &mut BytesMut, status: TransactionStatus) -> Result<(), WireError> {
    let byte = match status {
        TransactionStatus::Idle => b'I',
        TransactionStatus::InTransaction => b'T',
        TransactionStatus::Failed => b'E',
    };
    put_message(out, READY_FOR_QUERY_TAG, |out| {
        out.extend_from_slice(&[byte])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_response_round_trip() {
        let mut out = BytesMut::new();
        put_error_response(&mut out, Severity::Error, "0A000", "pgenvelope: no").unwrap();
        let body = &out[5..];
        assert_eq!(ErrorFields::find(body, b'C'), Some(&b"0A000"[..]));
        assert_eq!(ErrorFields::find(body, b'M'), Some(&b"pgenvelope: no"[..]));
        assert_eq!(ErrorFields::find(body, b'S'), Some(&b"ERROR"[..]));
        let len = u32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize;
        assert_eq!(len + 1, out.len());
    }

    #[test]
    fn fields_replaced_and_dropped() {
        let body = b"SERROR\0C57014\0MCOPY from stdin failed: x\0Fcopyfromparse.c\0L315\0\0";
        let mut out = BytesMut::new();
        assert!(put_fields_replacing(
            &mut out,
            ERROR_RESPONSE_TAG,
            body,
            Some((b'C', b"XX001")),
            b"FL"
        ));
        let fields: Vec<(u8, &[u8])> = ErrorFields::new(&out[5..]).map(Result::unwrap).collect();
        let expected: [(u8, &[u8]); 3] = [
            (b'S', b"ERROR"),
            (b'C', b"XX001"),
            (b'M', b"COPY from stdin failed: x"),
        ];
        assert_eq!(fields, expected);
        // A malformed body appends nothing.
        let mut out = BytesMut::new();
        assert!(!put_fields_without(
            &mut out,
            ERROR_RESPONSE_TAG,
            b"C57014",
            b""
        ));
        assert!(out.is_empty());
    }

    #[test]
    fn parses_small_messages() {
        assert_eq!(
            parse_ready_for_query(b"T").unwrap(),
            TransactionStatus::InTransaction
        );
        assert!(parse_ready_for_query(b"X").is_err());
        assert!(parse_ready_for_query(b"").is_err());
        let (n, v) = parse_parameter_status(b"client_encoding\0UTF8\0").unwrap();
        assert_eq!((n, v), (&b"client_encoding"[..], &b"UTF8"[..]));
        assert!(parse_parameter_status(b"client_encoding\0UTF8").is_err());
        let (pid, key) = parse_backend_key_data(&[0, 0, 0, 9, 1, 2, 3, 4]).unwrap();
        assert_eq!(pid, 9);
        assert_eq!(key.len(), 8);
        assert!(parse_backend_key_data(&[0, 0, 0]).is_err());
    }
}

/// One field of a RowDescription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDescription {
    /// Column name as raw bytes.
    pub name: Vec<u8>,
    /// OID of the source table, or 0.
    pub table_oid: u32,
    /// Attribute number in the source table, or 0.
    pub attnum: i16,
    /// Data type OID.
    pub type_oid: u32,
    /// Type size.
    pub type_len: i16,
    /// Type modifier.
    pub type_mod: i32,
    /// Format code (0 text, 1 binary; always 0 from Describe Statement).
    pub format: i16,
}

/// Decode a RowDescription body.
pub fn parse_row_description(body: &[u8]) -> Result<Vec<FieldDescription>, WireError> {
    let mut cur = Cursor::new(ROW_DESCRIPTION_TAG, body);
    let n = usize::try_from(cur.i16()?).map_err(|_| WireError::Malformed {
        tag: ROW_DESCRIPTION_TAG,
        what: "negative field count",
    })?;
    let mut fields = Vec::with_capacity(n.min(body.len() / 19));
    for _ in 0..n {
        let name = cur.cstr()?.to_vec();
        fields.push(FieldDescription {
            name,
            table_oid: cur.u32()?,
            attnum: cur.i16()?,
            type_oid: cur.u32()?,
            type_len: cur.i16()?,
            type_mod: cur.i32()?,
            format: cur.i16()?,
        });
    }
    cur.finish()?;
    Ok(fields)
}

/// Decode a ParameterDescription body into parameter type OIDs.
pub fn parse_parameter_description(body: &[u8]) -> Result<Vec<u32>, WireError> {
    let mut cur = Cursor::new(PARAMETER_DESCRIPTION_TAG, body);
    let n = usize::try_from(cur.i16()?).map_err(|_| WireError::Malformed {
        tag: PARAMETER_DESCRIPTION_TAG,
        what: "negative parameter count",
    })?;
    if cur.remaining().len() != n * 4 {
        return Err(WireError::Malformed {
            tag: PARAMETER_DESCRIPTION_TAG,
            what: "parameter list length",
        });
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(cur.u32()?);
    }
    Ok(out)
}

/// The command tag of a CommandComplete body (e.g. `INSERT 0 1`), as raw bytes.
pub fn parse_command_complete(body: &[u8]) -> Result<&[u8], WireError> {
    let mut cur = Cursor::new(COMMAND_COMPLETE_TAG, body);
    let tag = cur.cstr()?;
    cur.finish()?;
    Ok(tag)
}

/// Overall format and per-column formats of a CopyInResponse/CopyOutResponse/CopyBothResponse.
pub fn parse_copy_response(tag: u8, body: &[u8]) -> Result<(i8, Vec<i16>), WireError> {
    let mut cur = Cursor::new(tag, body);
    let overall = i8::from_be_bytes([cur.u8()?]);
    let n = usize::try_from(cur.i16()?).map_err(|_| WireError::Malformed {
        tag,
        what: "negative column count",
    })?;
    let mut formats = Vec::with_capacity(n.min(body.len() / 2));
    for _ in 0..n {
        formats.push(cur.i16()?);
    }
    cur.finish()?;
    Ok((overall, formats))
}

/// A DataRow body viewed in place: the byte range of each column value.
#[derive(Clone)]
pub struct DataRow<'a> {
    body: &'a [u8],
    /// (start, end) of each value in `body`, or None for NULL.
    ranges: Vec<Option<(usize, usize)>>,
}

impl fmt::Debug for DataRow<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DataRow({} columns)", self.ranges.len())
    }
}

impl<'a> DataRow<'a> {
    /// Index a DataRow body.
    pub fn parse(body: &'a [u8]) -> Result<Self, WireError> {
        let mut cur = Cursor::new(DATA_ROW_TAG, body);
        let n = usize::try_from(cur.i16()?).map_err(|_| WireError::Malformed {
            tag: DATA_ROW_TAG,
            what: "negative column count",
        })?;
        let mut ranges = Vec::with_capacity(n.min(body.len() / 4));
        for _ in 0..n {
            let len = cur.i32()?;
            if len == -1 {
                ranges.push(None);
                continue;
            }
            let len = usize::try_from(len).map_err(|_| WireError::Malformed {
                tag: DATA_ROW_TAG,
                what: "negative value length",
            })?;
            let start = body.len() - cur.remaining().len();
            cur.bytes(len)?;
            ranges.push(Some((start, start + len)));
        }
        cur.finish()?;
        Ok(Self { body, ranges })
    }

    /// Number of columns.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Whether the row has no columns.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Value of column `i`: `None` if out of range, `Some(None)` for NULL.
    pub fn get(&self, i: usize) -> Option<Option<&'a [u8]>> {
        let r = self.ranges.get(i)?;
        Some(r.map(|(s, e)| &self.body[s..e]))
    }

    /// Append a DataRow where the columns in `replace` (index, new value) are swapped and every
    /// other column is copied byte for byte.
    pub fn encode_with<V: AsRef<[u8]>>(
        &self,
        replace: &[(usize, Option<V>)],
        out: &mut BytesMut,
    ) -> Result<(), WireError> {
        let n = i16::try_from(self.ranges.len()).map_err(|_| WireError::Malformed {
            tag: DATA_ROW_TAG,
            what: "too many columns",
        })?;
        let mut lens = Vec::with_capacity(replace.len());
        for (_, v) in replace {
            lens.push(match v {
                None => -1,
                Some(v) => i32::try_from(v.as_ref().len()).map_err(|_| WireError::TooLarge {
                    tag: DATA_ROW_TAG,
                    len: v.as_ref().len() as u64,
                    limit: i32::MAX as u64,
                })?,
            });
        }
        put_message(out, DATA_ROW_TAG, |out| {
            out.extend_from_slice(&n.to_be_bytes());
            for (i, r) in self.ranges.iter().enumerate() {
                if let Some(pos) = replace.iter().position(|(j, _)| *j == i) {
                    out.extend_from_slice(&lens[pos].to_be_bytes());
                    if let Some(v) = &replace[pos].1 {
                        out.extend_from_slice(v.as_ref());
                    }
                    continue;
                }
                match r {
                    None => out.extend_from_slice(&(-1i32).to_be_bytes()),
                    Some((s, e)) => {
                        let len = (e - s) as u32;
                        out.extend_from_slice(&len.to_be_bytes());
                        out.extend_from_slice(&self.body[*s..*e]);
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod row_tests {
    use proptest::prelude::*;

    use super::*;

    fn data_row(values: &[Option<Vec<u8>>]) -> Vec<u8> {
        let mut b = (values.len() as i16).to_be_bytes().to_vec();
        for v in values {
            match v {
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(v) => {
                    b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    b.extend_from_slice(v);
                }
            }
        }
        b
    }

    proptest! {
        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_row_description(&data);
            let _ = parse_parameter_description(&data);
            let _ = parse_command_complete(&data);
            let _ = parse_copy_response(COPY_IN_RESPONSE_TAG, &data);
            if let Ok(row) = DataRow::parse(&data) {
                for i in 0..row.len() + 1 {
                    let _ = row.get(i);
                }
            }
        }

        #[test]
        fn rewriting_a_data_row_keeps_other_columns_byte_exact(
            values in proptest::collection::vec(proptest::option::of(proptest::collection::vec(any::<u8>(), 0..50)), 1..10),
            pick in any::<proptest::sample::Index>(),
            new in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..50)),
        ) {
            let body = data_row(&values);
            let row = DataRow::parse(&body).unwrap();
            let i = pick.index(values.len());
            let mut out = BytesMut::new();
            row.encode_with(&[(i, new.clone())], &mut out).unwrap();
            let mut expected = values.clone();
            expected[i] = new;
            prop_assert_eq!(&out[5..], &data_row(&expected)[..]);
            let mut same = BytesMut::new();
            row.encode_with::<Vec<u8>>(&[], &mut same).unwrap();
            prop_assert_eq!(&same[5..], &body[..]);
        }
    }
}
