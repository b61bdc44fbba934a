//! The error type of the key store and the DEK cache.

use std::sync::Arc;

use crate::crypto::{DekId, OrgId};

use super::kek::KekError;

/// Why a data key could not be created, found or unwrapped.
///
/// `Clone` so one failed load can be handed to every caller waiting on it; sources are
/// shared through `Arc`. The SQLSTATE each variant will map to is noted on it; the mapping
/// itself lives with the other client-facing errors.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The KEK provider (KMS, HSM, key file) failed or could not be reached while wrapping or
    /// unwrapping a key. SQLSTATE 58000.
    #[error("KEK `{kek}` unavailable")]
    KekUnavailable {
        /// The provider's KEK id.
        kek: String,
        /// What the provider reported.
        #[source]
        source: KekError,
    },
    /// The KEK is disabled, pending deletion or gone: an operator must act, so the call is
    /// not retried. SQLSTATE 58000.
    #[error("KEK `{kek}` is disabled, pending deletion or not found")]
    KekUnusable {
        /// The provider's KEK id.
        kek: String,
        /// What the provider reported.
        #[source]
        source: KekError,
    },
    /// The KEK rejected a stored wrapped DEK: it was altered, moved to another organisation's
    /// row, or wrapped by another KEK with the same id. Points at tampering or corruption of
    /// the key store. SQLSTATE 58000 (details go to the log only).
    #[error("wrapped DEK {dek} was rejected by the KEK")]
    UnwrapRejected {
        /// The DEK whose wrapped form was rejected.
        dek: DekId,
        /// The provider's error.
        #[source]
        source: KekError,
    },
    /// The DEK was wrapped by a KEK this proxy holds neither as its primary KEK nor as an
    /// unwrap-only one (`--kms-also`). SQLSTATE 58000.
    #[error("DEK {dek} is wrapped by KEK `{stored}`, but this proxy uses `{ours}`")]
    KekMismatch {
        /// The DEK.
        dek: DekId,
        /// KEK id recorded in the key store.
        stored: String,
        /// KEK id of this proxy's provider.
        ours: String,
    },
    /// The key store (PostgreSQL) could not be reached or a query failed. SQLSTATE 58000.
    #[error("key store unavailable: {op} failed")]
    KeyStoreUnavailable {
        /// What we were doing, e.g. `connect` or `lookup`.
        op: &'static str,
        /// The driver's error.
        #[source]
        source: Arc<tokio_postgres::Error>,
    },
    /// The key-store connection URL did not parse. The message never repeats the URL, which
    /// may hold the service password.
    #[error("invalid key store connection URL")]
    InvalidStoreUrl {
        /// The driver's parse error.
        #[source]
        source: Arc<tokio_postgres::Error>,
    },
    /// A key-store row breaks an invariant (unknown state, invalid organisation id, negative
    /// counter). SQLSTATE XX000.
    #[error("key store row for key {dek} is invalid: {reason}")]
    CorruptRecord {
        /// The id of the row (a DEK's, or a search key's).
        dek: DekId,
        /// Which invariant is broken.
        reason: &'static str,
    },
    /// The key-store schema name is not a plain lower-case identifier.
    #[error(
        "invalid key store schema name `{name}`: use 1 to 63 characters of a-z, 0-9 and _, \
         not starting with a digit"
    )]
    InvalidSchemaName {
        /// The rejected name.
        name: String,
    },
    /// No DEK with this id exists in the key store (a ciphertext from another installation,
    /// or a forged header). SQLSTATE XX001.
    #[error("unknown DEK {0}")]
    UnknownDek(DekId),
    /// The DEK was destroyed (crypto-shredded); data encrypted under it is unrecoverable.
    /// SQLSTATE XX001.
    #[error("DEK {0} has been destroyed")]
    DestroyedDek(DekId),
    /// The DEK belongs to another organisation than the session's tenant. SQLSTATE 42501.
    #[error("DEK {dek} belongs to another organisation")]
    WrongOrg {
        /// The DEK.
        dek: DekId,
        /// The organisation the caller asked for.
        expected: OrgId,
        /// The organisation that owns the DEK.
        found: OrgId,
    },
    /// Several proxies kept racing to create the organisation's first DEK (or search key) and
    /// this one gave up after a few attempts. Retrying the statement is safe. SQLSTATE 58000.
    #[error("could not create or find an active key for organisation `{org}`")]
    ActiveKeyContention {
        /// The organisation.
        org: OrgId,
    },
}

impl KeyError {
    /// Classify a KEK provider failure while using KEK `kek`: unusable keys stay distinct
    /// from transient unavailability.
    pub(crate) fn kek(kek: String, source: KekError) -> Self {
        match source {
            KekError::KeyUnusable { .. } => Self::KekUnusable { kek, source },
            source => Self::KekUnavailable { kek, source },
        }
    }

    pub(crate) fn store(op: &'static str, source: tokio_postgres::Error) -> Self {
        Self::KeyStoreUnavailable {
            op,
            source: Arc::new(source),
        }
    }
}
