//! Key management: KEK providers, the DEK store in PostgreSQL, and the DEK cache.
//!
//! ```text
//!  proxy ──active_key(org) / key_by_id(dek)──▶ KeyManager (moka, TTL, single-flight)
//!                                                 │ cold only
//!                               ┌─────────────────┴──────────────────┐
//!                               ▼                                    ▼
//!                KeyStore (data_keys, key_events)          KekProvider (local | KMS | HSM)
//!                wrapped DEKs in the upstream DB           wrap / unwrap, bound to org + DEK
//! ```
//!
//! Async and I/O-bound by design; the pure envelope format lives in `crypto`. This module
//! never logs key material in any form, wrapped or not, and holds plaintext keys only in
//! zeroizing types ([`DataKey`](crate::crypto::DataKey), `Zeroizing` buffers).
//!
//! Per-key limit: with random 96-bit nonces a DEK must not encrypt more than 2^32 values.
//! [`KeyManager`] counts encryptions per DEK, persists them, and rotates a DEK automatically
//! once its count (or age) passes the [`RotationPolicy`].
//!
//! Search keys (`search`): one active key per organisation for the deterministic search
//! terms of searchable columns, stored in their own table, wrapped like DEKs and cached by the
//! same [`KeyManager`] ([`KeyManager::search_key`]); never returned where a DEK is asked for.
//!
//! Lifecycle (rotate, rewrap, shred, destroy) is in `lifecycle`: each change is one
//! transaction in the key store that also records a `key_events` row and sends
//! `NOTIFY pgenvelope_keys`; every proxy's listener (`listener`) evicts the organisation's
//! cached keys when it arrives.

mod aws;
mod error;
mod instrumented;
mod kek;
mod lifecycle;
mod listener;
mod local;
mod manager;
mod pkcs11;
mod rewrap;
mod search;
mod store;

pub use aws::{AwsKmsKek, KmsCallError, CONTEXT_DEK, CONTEXT_ORG};
pub use error::KeyError;
pub use instrumented::{InstrumentedKek, KekMetrics};
pub use kek::{KekError, KekProvider, KeyContext, KmsUri};
pub use lifecycle::{KeyChange, KeyEvent, Rotation, Shredded, NOTIFY_CHANNEL};
pub use listener::{spawn_key_listener, ListenerState, CHANGE_KINDS};
pub use local::LocalKek;
pub use manager::{CachedDek, KeyManager, KeyManagerConfig, KeyManagerStats, RotationPolicy};
#[cfg(feature = "fault-injection")]
pub use pkcs11::fault::{set_hsm_down, set_hsm_stall};
pub use pkcs11::{PinSource, Pkcs11Error, Pkcs11Kek, Pkcs11Uri, DEFAULT_MODULE_PATH, MAX_SESSIONS};
pub use rewrap::RewrapReport;
pub use search::{
    SearchKeyRecord, SearchKeyState, SearchRotation, SEARCH_KEY_CREATED, SEARCH_KEY_DESTROYED,
    SEARCH_KEY_REWRAPPED, SEARCH_KEY_ROTATED,
};
pub use store::{is_plain_identifier, DekRecord, DekState, KeyStore, DEFAULT_SCHEMA};
