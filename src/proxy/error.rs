//! Errors of a proxied connection and the ErrorResponses clients see for them.
//!
//! Every error a client sees from the proxy itself is built here, with the `pgenvelope:`
//! prefix and a SQLSTATE (DESIGN §8). Errors from the server are relayed unchanged and never
//! pass through this module.

use bytes::BytesMut;

use crate::proxy::pump::PumpError;
use crate::wire::backend::{put_error_response, Severity};
use crate::wire::{sqlstate, WireError};

/// Why a client connection ended abnormally.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnError {
    /// The client sent a malformed or oversize message.
    #[error("client protocol violation: {0}")]
    ClientProtocol(#[source] WireError),
    /// The server sent a malformed or oversize message.
    #[error("server protocol violation: {0}")]
    ServerProtocol(#[source] WireError),
    /// The client sent bytes after an SSLRequest/GSSENCRequest before reading the answer.
    #[error("client sent data before the encryption negotiation was answered")]
    BufferedBeforeNegotiation,
    /// A second SSLRequest or GSSENCRequest, or one after TLS was set up (PostgreSQL refuses
    /// these too; answering them again would let a client loop in the startup phase).
    #[error("client repeated an encryption request")]
    RepeatedNegotiation,
    /// A StartupMessage arrived in plaintext while client TLS is required.
    #[error("client did not negotiate TLS, which is required")]
    ClientTlsRequired,
    /// The TLS handshake with the client failed.
    #[error("client TLS handshake: {0}")]
    ClientTls(#[source] std::io::Error),
    /// TLS toward the upstream could not be negotiated as `sslmode` requires.
    #[error("TLS toward upstream {addr}: {source}")]
    UpstreamTls {
        /// The upstream address.
        addr: String,
        /// What failed.
        #[source]
        source: crate::proxy::TlsError,
    },
    /// A startup-phase packet announced a length PostgreSQL refuses (under 8 bytes or over its
    /// limit, e.g. a regular message sent before the StartupMessage). PostgreSQL closes such
    /// a connection without a word ("invalid length of startup packet" goes to its log only),
    /// and so does the proxy.
    #[error("invalid length of startup packet")]
    BadStartupLength,
    /// The client did not complete its startup packet in time.
    #[error("startup packet not received in time")]
    StartupTimeout,
    /// The connection limit is reached.
    #[error("connection limit reached")]
    TooManyConnections,
    /// The upstream server could not be reached.
    #[error("could not connect to upstream {addr}: {source}")]
    UpstreamConnect {
        /// The upstream address.
        addr: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// SCRAM channel binding cannot hold across the proxy: the client chose
    /// `SCRAM-SHA-256-PLUS`, which binds to the proxy's TLS certificate, not the server's; or
    /// it sent the GS2 flag `y`, which a server on TLS refuses; or the server offered nothing
    /// but `-PLUS` to a plaintext client.
    #[error("SCRAM channel binding requested through the proxy")]
    ChannelBindingUnavailable,
    /// The startup packet names a tenant that is not a valid organisation id.
    #[error("invalid pgenvelope.tenant in the startup packet")]
    InvalidStartupTenant,
    /// The proxy is shutting down.
    #[error("closed for shutdown")]
    Shutdown,
    /// A bug: the connection's task panicked. The details are in the log.
    #[error("internal error: the connection task panicked")]
    Internal,
    /// Reading from or writing to the client failed.
    #[error("client i/o: {0}")]
    ClientIo(#[source] std::io::Error),
    /// Reading from or writing to the server failed.
    #[error("server i/o: {0}")]
    ServerIo(#[source] std::io::Error),
}

impl ConnError {
    /// Classify an error of the client → server pump.
    pub(crate) fn from_client_pump(e: PumpError) -> Self {
        match e {
            PumpError::Read(e) => Self::ClientIo(e),
            PumpError::Write(e) => Self::ServerIo(e),
            PumpError::Wire(e) => Self::ClientProtocol(e),
        }
    }

    /// Classify an error of the server → client pump.
    pub(crate) fn from_server_pump(e: PumpError) -> Self {
        match e {
            PumpError::Read(e) => Self::ServerIo(e),
            PumpError::Write(e) => Self::ClientIo(e),
            PumpError::Wire(e) => Self::ServerProtocol(e),
        }
    }

    /// The FATAL ErrorResponse to send the client before closing, if one should be sent.
    pub fn client_response(&self) -> Option<(&'static str, String)> {
        match self {
            Self::ClientProtocol(WireError::TooLarge { len, limit, .. }) => Some((
                sqlstate::PROGRAM_LIMIT_EXCEEDED,
                format!("pgenvelope: message of {len} bytes exceeds the limit of {limit} bytes"),
            )),
            Self::ClientProtocol(_) => Some((
                sqlstate::PROTOCOL_VIOLATION,
                "pgenvelope: invalid message from client".to_owned(),
            )),
            Self::ServerProtocol(_) => Some((
                sqlstate::PROTOCOL_VIOLATION,
                "pgenvelope: invalid message from the server".to_owned(),
            )),
            Self::BufferedBeforeNegotiation => Some((
                sqlstate::PROTOCOL_VIOLATION,
                "pgenvelope: received unencrypted data after SSL/GSS request".to_owned(),
            )),
            Self::RepeatedNegotiation => Some((
                sqlstate::PROTOCOL_VIOLATION,
                "pgenvelope: encryption was already negotiated".to_owned(),
            )),
            Self::StartupTimeout | Self::ClientTls(_) | Self::BadStartupLength => None,
            // The code PostgreSQL uses when pg_hba.conf has no entry (e.g. hostssl only).
            Self::ClientTlsRequired => Some((
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                "pgenvelope: TLS is required: connect with sslmode=require or stronger".to_owned(),
            )),
            Self::UpstreamTls { .. } => Some((
                sqlstate::CONNECTION_FAILURE,
                "pgenvelope: could not establish TLS with the upstream server".to_owned(),
            )),
            Self::ChannelBindingUnavailable => Some((
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                "pgenvelope: SCRAM channel binding cannot pass through the proxy (TLS to the \
                 proxy ends at the proxy, not at PostgreSQL): connect with \
                 channel_binding=disable (libpq), or without enableChannelBinding (node-postgres)"
                    .to_owned(),
            )),
            Self::InvalidStartupTenant => Some((
                sqlstate::INSUFFICIENT_PRIVILEGE,
                "pgenvelope: invalid pgenvelope.tenant in the connection options".to_owned(),
            )),
            Self::TooManyConnections => Some((
                sqlstate::TOO_MANY_CONNECTIONS,
                "pgenvelope: too many connections".to_owned(),
            )),
            Self::UpstreamConnect { .. } => Some((
                sqlstate::CONNECTION_FAILURE,
                "pgenvelope: could not connect to the upstream server".to_owned(),
            )),
            Self::Shutdown => Some((
                sqlstate::ADMIN_SHUTDOWN,
                "pgenvelope: terminating connection because the proxy is shutting down".to_owned(),
            )),
            Self::Internal => Some((
                sqlstate::INTERNAL_ERROR,
                "pgenvelope: internal error".to_owned(),
            )),
            Self::ClientIo(_) | Self::ServerIo(_) => None,
        }
    }

    /// Append the FATAL ErrorResponse for this error, if any, to `out`.
    pub(crate) fn write_fatal(&self, out: &mut BytesMut) {
        if let Some((code, message)) = self.client_response() {
            // An error here only means the message could not be framed; nothing to send then.
            let _ = put_error_response(out, Severity::Fatal, code, &message);
        }
    }
}

/// A statement-level error the proxy reports to the client; the session goes on.
///
/// Messages start with `pgenvelope:`, name columns where there are any, and never contain
/// data values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientError {
    /// SQLSTATE.
    pub code: &'static str,
    /// Message text.
    pub message: String,
}

impl ClientError {
    /// 0A000: a statement that cannot be encrypted safely.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self {
            code: sqlstate::FEATURE_NOT_SUPPORTED,
            message: message.into(),
        }
    }

    /// 22021: a value PostgreSQL text cannot hold (a NUL byte).
    pub fn invalid_text(message: impl Into<String>) -> Self {
        Self {
            code: sqlstate::CHARACTER_NOT_IN_REPERTOIRE,
            message: message.into(),
        }
    }

    /// 42501: no tenant for a write, or another tenant's value.
    pub fn privilege(message: impl Into<String>) -> Self {
        Self {
            code: sqlstate::INSUFFICIENT_PRIVILEGE,
            message: message.into(),
        }
    }

    /// XX001: ciphertext fails authentication or is malformed.
    pub fn corrupted(message: impl Into<String>) -> Self {
        Self {
            code: sqlstate::DATA_CORRUPTED,
            message: message.into(),
        }
    }

    /// 58000: KMS, HSM or key store unavailable.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            code: sqlstate::SYSTEM_ERROR,
            message: message.into(),
        }
    }

    /// Append this error as an ErrorResponse (severity ERROR).
    pub(crate) fn write(&self, out: &mut BytesMut) {
        let _ = put_error_response(out, Severity::Error, self.code, &self.message);
    }

    /// A statement that makes the server raise exactly this error, so that it takes the place
    /// of a refused statement with the server's own error semantics (the transaction is
    /// aborted, the rest of a pipeline is skipped up to Sync).
    pub fn raise_sql(&self) -> String {
        format!(
            "DO $pgenvelope$ BEGIN RAISE EXCEPTION USING ERRCODE = '{}', MESSAGE = {}; END $pgenvelope$",
            self.code,
            quote_literal(&self.message)
        )
    }
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

/// A SQL expression for the text `s` that is pure ASCII and reads the same under either
/// `standard_conforming_strings` and in every client encoding (the server may read our bytes in
/// GBK, SJIS or BIG5, where a multibyte character can swallow a backslash that follows it).
///
/// Plain `'…'` pieces with quotes doubled and no backslash; `\` and `$` (so the `DO` body's
/// `$pgenvelope$` delimiter cannot occur) as `chr(n)`; every run of non-ASCII characters as
/// `convert_from(decode('<utf-8 hex>', 'hex'), 'UTF8')`, which the server converts into its own
/// encoding (unchanged bytes under SQL_ASCII). Control characters become spaces.
fn quote_literal(s: &str) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut plain = String::new();
    let mut wide = String::new();
    let flush_plain = |plain: &mut String, parts: &mut Vec<String>| {
        if !plain.is_empty() {
            parts.push(format!("'{}'", plain.replace('\'', "''")));
            plain.clear();
        }
    };
    let flush_wide = |wide: &mut String, parts: &mut Vec<String>| {
        if !wide.is_empty() {
            let hex: String = wide.bytes().map(|b| format!("{b:02x}")).collect();
            parts.push(format!("convert_from(decode('{hex}', 'hex'), 'UTF8')"));
            wide.clear();
        }
    };
    for c in s.chars() {
        if !c.is_ascii() {
            flush_plain(&mut plain, &mut parts);
            wide.push(c);
            continue;
        }
        flush_wide(&mut wide, &mut parts);
        match c {
            '\\' | '$' => {
                flush_plain(&mut plain, &mut parts);
                parts.push(format!("chr({})", u32::from(c)));
            }
            c if c.is_ascii_control() => plain.push(' '),
            c => plain.push(c),
        }
    }
    flush_plain(&mut plain, &mut parts);
    flush_wide(&mut wide, &mut parts);
    if parts.is_empty() {
        return "''".to_owned();
    }
    parts.join(" || ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raise_sql_is_ascii_without_backslashes() {
        let e = ClientError::unsupported("pgenvelope: it's $pgenvelope$ \\ bad wërt\n中");
        let sql = e.raise_sql();
        assert!(sql.is_ascii(), "{sql}");
        assert!(!sql.contains('\\'), "{sql}");
        assert_eq!(
            sql.matches('$').count(),
            4,
            "only the two delimiters: {sql}"
        );
        assert!(
            sql.contains(
                "'pgenvelope: it''s ' || chr(36) || 'pgenvelope' || chr(36) || ' ' || chr(92) || ' bad w' || convert_from(decode('c3ab', 'hex'), 'UTF8') || 'rt ' || convert_from(decode('e4b8ad', 'hex'), 'UTF8')"
            ),
            "{sql}"
        );
        assert_eq!(quote_literal(""), "''");
    }
}
