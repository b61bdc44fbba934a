//! SQLSTATE codes used by the proxy in the errors it produces itself.
//!
//! Errors from the server are relayed unchanged; these are only for our own ErrorResponses.

/// 08P01 protocol_violation.
pub const PROTOCOL_VIOLATION: &str = "08P01";
/// 08006 connection_failure (upstream unreachable).
pub const CONNECTION_FAILURE: &str = "08006";
/// 28000 invalid_authorization_specification (PostgreSQL's code for a connection pg_hba.conf
/// rejects, such as a plaintext client where only `hostssl` is allowed).
pub const INVALID_AUTHORIZATION_SPECIFICATION: &str = "28000";
/// 0A000 feature_not_supported: a statement that cannot be encrypted safely.
pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
/// 22021 character_not_in_repertoire: a NUL byte in a value (PostgreSQL text cannot hold one).
pub const CHARACTER_NOT_IN_REPERTOIRE: &str = "22021";
/// 42501 insufficient_privilege: no tenant for a write, or another tenant's value.
pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
/// 53300 too_many_connections.
pub const TOO_MANY_CONNECTIONS: &str = "53300";
/// 54000 program_limit_exceeded (message over the size limit).
pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
/// 57P01 admin_shutdown.
pub const ADMIN_SHUTDOWN: &str = "57P01";
/// 58000 system_error: KMS, HSM or key store unavailable.
pub const SYSTEM_ERROR: &str = "58000";
/// XX000 internal_error.
pub const INTERNAL_ERROR: &str = "XX000";
/// XX001 data_corrupted: ciphertext fails authentication or is malformed.
pub const DATA_CORRUPTED: &str = "XX001";
