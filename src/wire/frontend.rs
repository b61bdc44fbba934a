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
