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
