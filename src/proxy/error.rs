//! Errors of a proxied connection and the ErrorResponses clients see for them.
//!
//! Every error a client sees from the proxy itself is built here, with the `pgenvelope:`
//! prefix and a SQLSTATE (docs/design.md, errors). Errors from the server are relayed unchanged and never
//! pass through this module.

use bytes::BytesMut;

use crate::cipher::CipherError;
use crate::sql::ColumnRef;
use crate::wire::backend::{put_error_response, Severity};
use crate::wire::encoding::EncodingError;
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
    /// The client closed its connection (or vanished).
    #[error("client closed the connection")]
    ClientGone,
    /// Reading from or writing to the client failed.
    #[error("client i/o: {0}")]
    ClientIo(#[source] std::io::Error),
    /// Reading from or writing to the server failed.
    #[error("server i/o: {0}")]
    ServerIo(#[source] std::io::Error),
}

impl ConnError {
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
            Self::ClientIo(_) | Self::ServerIo(_) | Self::ClientGone => None,
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
/// One variant per thing that can happen, with typed context. [`ClientError::sqlstate`],
/// [`ClientError::metric_reason`] and the message (`Display`) are exhaustive matches, so a new
/// variant forces a decision on each. [`ClientError::text`] adds the `pgenvelope: ` prefix, in
/// this one place. Messages name columns, parameters and row numbers, never data values.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The analyser refused the statement (0A000).
    #[error("{}", rejection_message(.0))]
    Statement(Box<crate::sql::Rejection>),
    /// Sealing or opening a value failed (its code says why).
    #[error("{0}")]
    Cipher(CipherError),
    /// A statement that may change how the server reads text is still unanswered (0A000).
    #[error(
        "a statement that may change client_encoding or standard_conforming_strings is still \
         in flight; send this statement after its answer (or with ASCII-only text)"
    )]
    LexingInFlight,
    /// A Bind or Execute whose statement or portal an earlier, unanswered cycle redefines
    /// or closes (0A000).
    #[error(
        "the prepared statement or portal is redefined or closed by an earlier request whose \
         answer has not arrived yet; send this after its answer"
    )]
    Unsettled,
    /// A Bind of a prepared statement this connection never saw parsed (created by SQL
    /// `PREPARE` or by server-side code): its parameters cannot be checked (0A000).
    #[error(
        "prepared statement \"{name}\" was not prepared with a Parse message on this \
         connection (SQL PREPARE or server-side code): its parameters cannot be checked for \
         encrypted columns; prepare it with the extended protocol"
    )]
    UnknownStatement {
        /// The statement's name, as the client sent it.
        name: String,
    },
    /// A Bind or Execute of values sealed for a session tenant that changed since (0A000).
    #[error(
        "this statement holds values sealed for the session tenant in force when it was \
         prepared or bound, and pgenvelope.tenant has changed since: prepare or bind it again"
    )]
    TenantChanged,
    /// Text or a value cannot be read or written in the client encoding (0A000).
    #[error("{0}")]
    Encoding(EncodingError),
    /// A tenant change and a write sealed for the session tenant in one query string (0A000).
    #[error(
        "a change of pgenvelope.tenant and a write that uses the session tenant must be sent \
         as separate queries"
    )]
    TenantChangeWithSessionWrite,
    /// A tenant change after a statement on an encrypted table in one query string (0A000).
    #[error(
        "a change of pgenvelope.tenant must come before any statement on an encrypted table in \
         one query string (or be sent as a separate query)"
    )]
    TenantChangeAfterProtected,
    /// A tenant change and a savepoint command in one statement text (0A000).
    #[error(
        "a change of pgenvelope.tenant and a savepoint command must be sent as separate queries"
    )]
    TenantChangeWithSavepoint,
    /// A COPY on an encrypted table among other statements (0A000).
    #[error("COPY on an encrypted table must be sent as a statement of its own")]
    CopyNotAlone,
    /// The analysis names a table or column the rules in force no longer have (0A000).
    #[error("no rule for {name}")]
    NoRule {
        /// The table or column.
        name: String,
    },
    /// A rewritten message could not be built (0A000).
    #[error("{0} could not be encoded")]
    Encode(Encoded),
    /// The statement's literals could not be replaced (0A000).
    #[error("statement could not be rewritten")]
    Rewrite,
    /// A parameter bound for an encrypted column is declared with a non-text type (0A000).
    #[error("parameter ${param} for encrypted column {column} must be text")]
    ParamNotText {
        /// 1-based parameter number.
        param: usize,
        /// The column.
        column: ColumnRef,
    },
    /// A Bind gives another number of parameters than its statement takes (08P01).
    #[error(
        "bind message supplies {got} parameters, but the prepared statement requires {expected}"
    )]
    BindParamCount {
        /// What the statement takes.
        expected: usize,
        /// What the Bind gave.
        got: usize,
    },
    /// A parameter that names a tenant or row key cannot be read as text (0A000).
    #[error("parameter ${param} cannot be read as text")]
    ParamUnreadable {
        /// 1-based parameter number.
        param: usize,
    },
    /// A value for an encrypted column holds a NUL byte (22021).
    #[error("{}", nul_message(*site, column))]
    Nul {
        /// Where the value was.
        site: ValueSite,
        /// The column.
        column: String,
    },
    /// A literal value whose row tenant is a parameter (0A000).
    #[error(
        "the value for {column} is a literal but the row's tenant is the parameter ${param}: \
         pass the value as a parameter too"
    )]
    LiteralWithTenantParam {
        /// The column.
        column: String,
        /// 1-based parameter number.
        param: usize,
    },
    /// A literal value whose row key is a parameter (0A000).
    #[error(
        "the value for {column} is a literal but the row key {key} is the parameter ${param}: \
         pass the value as a parameter too"
    )]
    LiteralWithKeyParam {
        /// The column.
        column: String,
        /// The row key column.
        key: String,
        /// 1-based parameter number.
        param: usize,
    },
    /// Arrays of the values, tenants and row keys of one write have different lengths (0A000).
    #[error(
        "the arrays of values for {column}, of their tenants and of their row keys have \
         different lengths"
    )]
    ArrayLengths {
        /// The column.
        column: String,
    },
    /// An array of values for an encrypted column cannot be read (0A000).
    #[error("the array of values for {column} cannot be read (one dimension, text elements only)")]
    ArrayUnreadable {
        /// The column.
        column: String,
    },
    /// A row's tenant is not a valid organisation id (42501).
    #[error("the tenant given for {column} is not a valid organisation id")]
    InvalidRowTenant {
        /// The column.
        column: String,
    },
    /// A row's tenant may be stored in another form than written (42501).
    #[error(
        "the tenant given for {column} may be stored differently from how it is written \
         (surrounding spaces, or a number not in canonical form): write it as PostgreSQL \
         stores it"
    )]
    NonCanonicalTenant {
        /// The column.
        column: String,
    },
    /// A row-bound write whose row key is NULL (0A000).
    #[error("values of {column} are bound to their row: the row key {key} may not be NULL")]
    NullRowKey {
        /// The column.
        column: String,
        /// The row key column.
        key: String,
    },
    /// A drawn row key came back NULL: the key column has no sequence (0A000).
    #[error(
        "values of {table} are bound to their row, and the row key {key} is not given: it can \
         be drawn only from a serial or identity column's sequence, which {key} does not have; \
         give the key in the INSERT"
    )]
    NoKeySequence {
        /// The table.
        table: String,
        /// The row key column.
        key: String,
    },
    /// A literal value in a prepared INSERT whose row key is drawn at each execution (0A000).
    #[error(
        "the value for {column} is a literal in a prepared statement whose row key {key} is \
         drawn at each execution: pass the value as a parameter, or give the key"
    )]
    LiteralWithDrawnKey {
        /// The column.
        column: String,
        /// The row key column.
        key: String,
    },
    /// Several UPDATEs of one query text need their rows' organisation looked up (0A000).
    #[error(
        "several statements of this query text write rows whose organisation must be looked up \
         ({column}): send them one by one, or SET pgenvelope.tenant"
    )]
    SeveralLookups {
        /// The tenant column, as the first statement sees it.
        column: String,
    },
    /// A row key that may be stored in another form than written (0A000).
    #[error(
        "the row key {key} given for {column} may be stored differently from how it is \
         written (surrounding spaces, a number or UUID not in canonical form): write it as \
         PostgreSQL prints it"
    )]
    NonCanonicalRowKey {
        /// The column.
        column: String,
        /// The row key column.
        key: String,
    },
    /// A row of another organisation than the session tenant (42501).
    #[error(
        "the row written to {column} belongs to another organisation than the session tenant \
         (pgenvelope.tenant)"
    )]
    OtherTenantsRow {
        /// The column.
        column: String,
    },
    /// A write with no tenant from the row, the session or the default (42501).
    #[error(
        "no tenant for a write to {column}: set the table's tenant column, \
         SET pgenvelope.tenant, or start the proxy with --default-tenant"
    )]
    NoTenant {
        /// The column.
        column: String,
    },
    /// An UPDATE with no tenant writes rows of several organisations (42501).
    #[error(
        "the rows this statement writes belong to several organisations: name one ({column} \
         in its WHERE clause) or SET pgenvelope.tenant"
    )]
    SeveralOrganisations {
        /// The tenant column, as the statement sees it.
        column: String,
    },
    /// A `pgenvelope.tenant` setting that is not a valid organisation id (42501).
    #[error("invalid pgenvelope.tenant value")]
    InvalidTenantSetting,
    /// `set_config` with a parameter, sent as a simple query (0A000).
    #[error("set_config with a parameter outside the extended protocol")]
    SetConfigParamOutsideExtended,
    /// A write gives an enc:v1 value of another organisation (42501).
    #[error("{site}the encrypted value for {column} belongs to another organisation")]
    RestoredOtherOrg {
        /// Where the value was.
        site: ValueSite,
        /// The column.
        column: String,
    },
    /// A write gives an enc:v1 value under a destroyed key (XX001).
    #[error("{site}the encrypted value for {column} uses a destroyed data key")]
    RestoredDestroyed {
        /// Where the value was.
        site: ValueSite,
        /// The column.
        column: String,
    },
    /// A value read from a row of another organisation than the value's (XX001).
    #[error("value in {column} belongs to another organisation than its row")]
    OtherOrgThanRow {
        /// The column.
        column: String,
    },
    /// A row key or tenant field in a binary format the proxy cannot read (0A000).
    #[error(
        "a row key or tenant column was sent in a binary format the proxy cannot read: request \
         it in text format"
    )]
    BinaryKeyField,
    /// A decrypted value is not UTF-8 text (XX001).
    #[error("{}", not_text(column.as_deref()))]
    NotText {
        /// The column, when known.
        column: Option<String>,
    },
    /// The catalog could not be asked which columns are encrypted (58000).
    #[error("catalog look-up failed; cannot tell encrypted columns")]
    CatalogUnavailable,
    /// The catalog could not be asked for a table's columns (58000).
    #[error("catalog look-up failed")]
    CopyColumnsUnavailable,
    /// Keys kept going stale while a message was handled (58000).
    #[error("keys could not be loaded")]
    KeysUnavailable,
    /// A COPY option the row codec cannot handle on an encrypted table (0A000).
    #[error("COPY {0} is not supported on encrypted tables")]
    CopyFormat(CopyFormatProblem),
    /// A COPY ENCODING the proxy cannot convert (0A000).
    #[error(
        "COPY with this ENCODING is not supported on encrypted tables (use UTF8, SQL_ASCII or \
         LATIN1)"
    )]
    CopyEncoding,
    /// A COPY of a row-bound table without the row key in its column list (0A000).
    #[error(
        "values of {table} are bound to their row: the COPY column list must include the row \
         key {key}"
    )]
    CopyWithoutRowKey {
        /// The table.
        table: String,
        /// The row key column.
        key: String,
    },
    /// A COPY row of a row-bound table whose key is NULL or not canonical (0A000).
    #[error(
        "COPY row {line}: values of {column} are bound to their row, and its row key is NULL or \
         may be stored differently from how it is written (surrounding spaces, a number or \
         UUID not in canonical form)"
    )]
    CopyRowKey {
        /// Row number.
        line: u64,
        /// The column.
        column: String,
    },
    /// A COPY row whose tenant is not a valid organisation id (42501).
    #[error("COPY row {line} has an invalid tenant for {column}")]
    CopyInvalidTenant {
        /// Row number.
        line: u64,
        /// The column.
        column: String,
    },
    /// A COPY row of another organisation than the session tenant (42501).
    #[error(
        "COPY row {line}: the row written to {column} belongs to another organisation than the \
         session tenant (pgenvelope.tenant)"
    )]
    CopyOtherTenantsRow {
        /// Row number.
        line: u64,
        /// The column.
        column: String,
    },
    /// A COPY with no tenant column and no session or default tenant (42501).
    #[error(
        "no tenant for COPY into {column}: include the tenant column or SET pgenvelope.tenant"
    )]
    CopyNoTenant {
        /// The column.
        column: String,
    },
    /// A COPY row the codec cannot read or write (0A000).
    #[error("COPY {table} row {line} {problem}")]
    CopyRow {
        /// The table (or `query`).
        table: String,
        /// Row number.
        line: u64,
        /// What is wrong with it.
        problem: CopyRowProblem,
    },
}

/// What could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoded {
    /// A rewritten Parse.
    Statement,
    /// A rewritten Bind.
    Parameters,
    /// Any other message.
    Message,
}

impl std::fmt::Display for Encoded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Encoded::Statement => "statement",
            Encoded::Parameters => "parameters",
            Encoded::Message => "message",
        })
    }
}

/// Where a value was written (for messages that say so).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueSite {
    /// A literal of the statement text.
    Literal,
    /// Parameter `$n` (1-based).
    Param(usize),
    /// Row `n` of a COPY.
    CopyRow(u64),
}

impl std::fmt::Display for ValueSite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ValueSite::Literal => Ok(()),
            ValueSite::Param(n) => write!(f, "parameter ${n}: "),
            ValueSite::CopyRow(n) => write!(f, "COPY row {n}: "),
        }
    }
}

/// A COPY option refused on encrypted tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyFormatProblem {
    /// `FORMAT binary`.
    Binary,
    /// A delimiter outside ASCII.
    NonAsciiDelimiter,
    /// A quote character outside ASCII.
    NonAsciiQuote,
    /// An escape character outside ASCII.
    NonAsciiEscape,
    /// Options the row codec refuses (e.g. a delimiter equal to the quote).
    Invalid,
}

impl std::fmt::Display for CopyFormatProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CopyFormatProblem::Binary => "in binary format",
            CopyFormatProblem::NonAsciiDelimiter => "with a non-ASCII delimiter",
            CopyFormatProblem::NonAsciiQuote => "with a non-ASCII quote",
            CopyFormatProblem::NonAsciiEscape => "with a non-ASCII escape",
            CopyFormatProblem::Invalid => "with these options",
        })
    }
}

/// What is wrong with a COPY row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyRowProblem {
    /// Longer than the message size limit.
    TooLong,
    /// Not valid in the COPY format.
    Malformed(&'static str),
    /// A field cannot be written back in the COPY's encoding and format.
    Unrepresentable {
        /// 0-based field index.
        column: usize,
    },
}

impl std::fmt::Display for CopyRowProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CopyRowProblem::TooLong => f.write_str("is too long"),
            CopyRowProblem::Malformed(what) => write!(f, "is malformed: {what}"),
            CopyRowProblem::Unrepresentable { column } => {
                write!(f, "column {column} cannot be represented")
            }
        }
    }
}

fn rejection_message(r: &crate::sql::Rejection) -> String {
    r.reason()
}

fn nul_message(site: ValueSite, column: &str) -> String {
    match site {
        ValueSite::Param(n) => format!(
            "parameter ${n} for encrypted column {column} holds a NUL byte, which text cannot hold"
        ),
        site => format!("{site}the value for {column} holds a NUL byte, which text cannot hold"),
    }
}

fn not_text(column: Option<&str>) -> String {
    match column {
        Some(c) => format!("value in {c} is not text"),
        None => "a decrypted value is not text".to_owned(),
    }
}

/// The prefix of every message the proxy itself sends.
pub(crate) const PREFIX: &str = "pgenvelope: ";

impl From<CipherError> for ClientError {
    fn from(e: CipherError) -> Self {
        ClientError::Cipher(e)
    }
}

impl From<EncodingError> for ClientError {
    fn from(e: EncodingError) -> Self {
        ClientError::Encoding(e)
    }
}

impl ClientError {
    /// The SQLSTATE the client sees.
    pub fn sqlstate(&self) -> &'static str {
        use sqlstate::*;
        match self {
            ClientError::Cipher(e) => e.sqlstate(),
            ClientError::Statement(_)
            | ClientError::LexingInFlight
            | ClientError::Unsettled
            | ClientError::UnknownStatement { .. }
            | ClientError::TenantChanged
            | ClientError::Encoding(_)
            | ClientError::TenantChangeWithSessionWrite
            | ClientError::TenantChangeAfterProtected
            | ClientError::TenantChangeWithSavepoint
            | ClientError::CopyNotAlone
            | ClientError::NoRule { .. }
            | ClientError::Encode(_)
            | ClientError::Rewrite
            | ClientError::ParamNotText { .. }
            | ClientError::ParamUnreadable { .. }
            | ClientError::ArrayLengths { .. }
            | ClientError::ArrayUnreadable { .. }
            | ClientError::LiteralWithTenantParam { .. }
            | ClientError::LiteralWithKeyParam { .. }
            | ClientError::NullRowKey { .. }
            | ClientError::NoKeySequence { .. }
            | ClientError::LiteralWithDrawnKey { .. }
            | ClientError::SeveralLookups { .. }
            | ClientError::NonCanonicalRowKey { .. }
            | ClientError::SetConfigParamOutsideExtended
            | ClientError::BinaryKeyField
            | ClientError::CopyFormat(_)
            | ClientError::CopyEncoding
            | ClientError::CopyWithoutRowKey { .. }
            | ClientError::CopyRowKey { .. }
            | ClientError::CopyRow { .. } => FEATURE_NOT_SUPPORTED,
            ClientError::Nul { .. } => CHARACTER_NOT_IN_REPERTOIRE,
            ClientError::BindParamCount { .. } => PROTOCOL_VIOLATION,
            ClientError::InvalidRowTenant { .. }
            | ClientError::NonCanonicalTenant { .. }
            | ClientError::OtherTenantsRow { .. }
            | ClientError::NoTenant { .. }
            | ClientError::InvalidTenantSetting
            | ClientError::SeveralOrganisations { .. }
            | ClientError::RestoredOtherOrg { .. }
            | ClientError::CopyInvalidTenant { .. }
            | ClientError::CopyOtherTenantsRow { .. }
            | ClientError::CopyNoTenant { .. } => INSUFFICIENT_PRIVILEGE,
            ClientError::RestoredDestroyed { .. }
            | ClientError::OtherOrgThanRow { .. }
            | ClientError::NotText { .. } => DATA_CORRUPTED,
            ClientError::CatalogUnavailable
            | ClientError::CopyColumnsUnavailable
            | ClientError::KeysUnavailable => SYSTEM_ERROR,
        }
    }

    /// The `statements_rejected` metric reason (one of [`REJECT_REASONS`]).
    pub fn metric_reason(&self) -> &'static str {
        match self.sqlstate() {
            sqlstate::FEATURE_NOT_SUPPORTED => "unsafe_statement",
            sqlstate::INSUFFICIENT_PRIVILEGE => "tenant",
            sqlstate::SYSTEM_ERROR => "key_unavailable",
            sqlstate::DATA_CORRUPTED => "corrupted",
            _ => "other",
        }
    }

    /// The message the client sees: `pgenvelope: ` and what happened.
    pub fn text(&self) -> String {
        format!("{PREFIX}{self}")
    }

    /// Append this error as an ErrorResponse (severity ERROR).
    pub(crate) fn write(&self, out: &mut BytesMut) {
        let _ = put_error_response(out, Severity::Error, self.sqlstate(), &self.text());
    }

    /// A statement that makes the server raise exactly this error, so that it takes the place
    /// of a refused statement with the server's own error semantics (the transaction is
    /// aborted, the rest of a pipeline is skipped up to Sync).
    pub fn raise_sql(&self) -> String {
        format!(
            "DO $pgenvelope$ BEGIN RAISE EXCEPTION USING ERRCODE = '{}', MESSAGE = {}; END $pgenvelope$",
            self.sqlstate(),
            quote_literal(&self.text())
        )
    }
}

/// Reasons a statement is refused (metric label values).
pub const REJECT_REASONS: &[&str] = &[
    "unsafe_statement",
    "tenant",
    "key_unavailable",
    "corrupted",
    "other",
];

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
        let e = ClientError::NoRule {
            name: "it's $pgenvelope$ \\ bad wërt\n中".to_owned(),
        };
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
                "'pgenvelope: no rule for it''s ' || chr(36) || 'pgenvelope' || chr(36) || ' ' || chr(92) || ' bad w' || convert_from(decode('c3ab', 'hex'), 'UTF8') || 'rt ' || convert_from(decode('e4b8ad', 'hex'), 'UTF8')"
            ),
            "{sql}"
        );
        assert_eq!(quote_literal(""), "''");
    }
}
