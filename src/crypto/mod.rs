//! Envelope encryption: key types, the `enc:v1` ciphertext format, AEAD seal/open, nonces.
//!
//! Pure: no I/O, no clock, no environment. The only outside input is the operating system's RNG,
//! read once per [`NonceSource`] to seed it. Nothing here logs, and no error or `Debug` output
//! contains plaintext, ciphertext or key bytes.
//!
//! * [`key`]: [`DataKey`], [`DekId`], [`OrgId`], [`ColumnId`].
//! * [`envelope`]: the `enc:v1:` format (byte layout table there), [`ColumnKey`], [`EncV1`].
//! * [`search`]: search terms of searchable columns ([`TermKey`], [`SearchMode`]).
//! * [`nonce`]: [`NonceSource`] and the per-key message limit.

mod aead;
pub mod envelope;
pub mod key;
pub mod nonce;
pub mod search;

pub use aead::{MAX_PLAINTEXT_LEN, NONCE_LEN, TAG_LEN};
pub use envelope::{
    looks_like_enc_v1, Algorithm, ColumnKey, EncV1, FormatError, OpenError, SealError,
    ENC_V1_PREFIX,
};
pub use key::{ColumnId, DataKey, DekId, InvalidOrgId, OrgId, KEY_LEN};
pub use nonce::{NonceSource, MAX_RANDOM_NONCES_PER_KEY, ROTATE_DEK_AFTER};
pub use search::{SearchMode, SearchTerm, TermKey, SEARCHABLE_BYTE, SEARCH_PREFIX_CHARS, TERM_LEN};
