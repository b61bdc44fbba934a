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
            Self::StartupTimeout => None,
            Self::TooManyConnections => Some((
                sqlstate::TOO_MANY_CONNECTIONS,
                "pgenvelope: too many connections".to_owned(),
            )),
            Self::UpstreamConnect { .. } => Some((
                sqlstate::CONNECTION_FAILURE,
                "pgenvelope: could not connect to the upstream server".to_owned(),
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
