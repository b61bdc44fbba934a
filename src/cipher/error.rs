//! What can go wrong sealing or opening one value.

use crate::crypto::{DekId, OrgId};
use crate::keys::KeyError;
use crate::wire::sqlstate;

/// A key the cipher needs that is not at hand: fetch it with
/// [`Cipher::fetch`](super::Cipher::fetch) and try again.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeyNeed {
    /// The organisation's active DEK (to seal).
    Active(OrgId),
    /// A DEK by id (to open).
    ById(DekId),
    /// The organisation's active search key (to compute search terms).
    Search(OrgId),
}

/// Why sealing or opening a value failed. Every variant names the column by its qualified
/// name from the rules and never holds a value, a key or ciphertext.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CipherError {
    /// A key is not at hand. Not a failure: fetch it and run the operation again.
    #[error("key not at hand: {0:?}")]
    Missing(KeyNeed),
    /// Plaintext in an encrypted column under `strict_reads` (XX001).
    #[error("{column} holds a value that is not encrypted (strict_reads)")]
    NotEncrypted {
        /// The column.
        column: String,
    },
    /// A value that starts like an enc:v1 value but is not one (XX001).
    #[error("{}", in_column(column.as_deref(), "is malformed"))]
    Malformed {
        /// The column, when known.
        column: Option<String>,
    },
    /// An enc:v1 value of another column (XX001).
    #[error("value in {column} belongs to another column")]
    WrongColumn {
        /// The column it was read from.
        column: String,
    },
    /// A row-bound value read without its row key in the same result (0A000).
    #[error(
        "values of {column} are bound to their row: read the row key {key} in the same result \
         (a plain column reference)"
    )]
    RowKeyNotRead {
        /// The column.
        column: String,
        /// The row key column.
        key: String,
    },
    /// A write to a row-bound table that does not give the row key (0A000).
    #[error("values of {column} are bound to their row: the write must give the row key {key}")]
    RowKeyNotGiven {
        /// The column.
        column: String,
        /// The row key column.
        key: String,
    },
    /// An unbound value in a column whose table binds values to their row (XX001).
    #[error(
        "a value in {column} is not bound to its row (written before row binding was turned \
         on: run `pgenvelope reencrypt`)"
    )]
    NotRowBound {
        /// The column.
        column: String,
    },
    /// A row-bound value in a column whose table has no row key (XX001).
    #[error("a value in {column} is bound to a row, but the rules give its table no row_key")]
    BoundWithoutRowKey {
        /// The column.
        column: String,
    },
    /// A value of another organisation than the session tenant (42501).
    #[error("a value in {column} belongs to another organisation than the session tenant")]
    OtherTenant {
        /// The column.
        column: String,
    },
    /// The value fails authentication: tampered, moved to another row or organisation (XX001).
    #[error("value in {column} fails authentication")]
    Authentication {
        /// The column.
        column: String,
    },
    /// The plaintext is larger than one value can hold (0A000).
    #[error("value for {column} is too large to encrypt")]
    TooLarge {
        /// The column.
        column: String,
    },
    /// The key a value needs could not be used.
    #[error("{}", key_message(column, error))]
    Key {
        /// The column.
        column: String,
        /// What the key store or KEK said.
        #[source]
        error: KeyError,
    },
}

fn in_column(column: Option<&str>, what: &str) -> String {
    match column {
        Some(c) => format!("value in {c} {what}"),
        None => format!("encrypted value {what}"),
    }
}

fn key_message(col: &str, e: &KeyError) -> String {
    match e {
        KeyError::KekUnavailable { .. }
        | KeyError::KeyStoreUnavailable { .. }
        | KeyError::ActiveKeyContention { .. } => {
            format!("the key service is unavailable; cannot use keys for {col}")
        }
        KeyError::KekUnusable { .. } => {
            format!("the key-encryption key is disabled or deleted; cannot use keys for {col}")
        }
        KeyError::UnwrapRejected { .. }
        | KeyError::KekMismatch { .. }
        | KeyError::InvalidStoreUrl { .. }
        | KeyError::CorruptRecord { .. }
        | KeyError::InvalidSchemaName { .. } => {
            format!("the data key for {col} cannot be unwrapped")
        }
        KeyError::UnknownDek(_) => format!("a value in {col} uses an unknown data key"),
        KeyError::DestroyedDek(_) => format!("a value in {col} uses a destroyed data key"),
        KeyError::WrongOrg { .. } => format!("a value in {col} belongs to another organisation"),
    }
}

impl CipherError {
    /// The SQLSTATE a client sees for this error.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            // Never reaches a client: the operation is run again once the key is fetched.
            CipherError::Missing(_) => sqlstate::SYSTEM_ERROR,
            CipherError::RowKeyNotRead { .. }
            | CipherError::RowKeyNotGiven { .. }
            | CipherError::TooLarge { .. } => sqlstate::FEATURE_NOT_SUPPORTED,
            CipherError::OtherTenant { .. } => sqlstate::INSUFFICIENT_PRIVILEGE,
            CipherError::NotEncrypted { .. }
            | CipherError::Malformed { .. }
            | CipherError::WrongColumn { .. }
            | CipherError::NotRowBound { .. }
            | CipherError::BoundWithoutRowKey { .. }
            | CipherError::Authentication { .. } => sqlstate::DATA_CORRUPTED,
            CipherError::Key { error, .. } => match error {
                KeyError::KekUnavailable { .. }
                | KeyError::KeyStoreUnavailable { .. }
                | KeyError::ActiveKeyContention { .. }
                | KeyError::KekUnusable { .. }
                | KeyError::UnwrapRejected { .. }
                | KeyError::KekMismatch { .. }
                | KeyError::InvalidStoreUrl { .. }
                | KeyError::CorruptRecord { .. }
                | KeyError::InvalidSchemaName { .. } => sqlstate::SYSTEM_ERROR,
                KeyError::UnknownDek(_) | KeyError::DestroyedDek(_) => sqlstate::DATA_CORRUPTED,
                KeyError::WrongOrg { .. } => sqlstate::INSUFFICIENT_PRIVILEGE,
            },
        }
    }

    /// The `decrypt_failures` metric reason this error counts as, when it is a failure to
    /// read a value (`None` for write-side errors and missing keys).
    pub fn decrypt_failure_reason(&self) -> Option<&'static str> {
        Some(match self {
            CipherError::NotEncrypted { .. } => "not_encrypted",
            CipherError::Malformed { .. } => "malformed",
            CipherError::WrongColumn { .. } => "wrong_column",
            CipherError::NotRowBound { .. } | CipherError::BoundWithoutRowKey { .. } => "wrong_row",
            CipherError::OtherTenant { .. } => "other_tenant",
            CipherError::Authentication { .. } => "authentication",
            CipherError::Missing(_)
            | CipherError::RowKeyNotRead { .. }
            | CipherError::RowKeyNotGiven { .. }
            | CipherError::TooLarge { .. }
            | CipherError::Key { .. } => return None,
        })
    }
}
