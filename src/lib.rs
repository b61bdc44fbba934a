//! pgenvelope: a transparent encrypting PostgreSQL proxy.
//!
//! Applications point their `DATABASE_URL` at pgenvelope instead of PostgreSQL. It speaks the
//! PostgreSQL v3 wire protocol to both sides, seals values bound for the encrypted columns the
//! rules name, opens them on the way back, and relays everything else byte for byte.
//!
//! ```text
//! app ──▶ proxy::listener ──▶ proxy::connection (one task per client: startup, TLS, auth,
//!                              │                  then one relay loop over both directions)
//!                              ▼
//!                 proxy::pump (framing) ──▶ proxy::transform (the protocol core, synchronous)
//!                                              │ sql (analysis)   cipher (seal / open)
//!                                              ▼
//!                         needs: keys (KeyManager), catalog facts ──▶ fetched, handed in again
//! ```
//!
//! Modules, by floor (each imports only from floors below; see `docs/architecture.md`):
//! - pure: [`wire`] (codec), [`crypto`] (`enc:v1`, AEAD, key types), [`sql`] (statement
//!   analysis and typed refusals), [`rules`] (rule files), [`tls`] (TLS settings);
//! - [`keys`] (KEK providers, key store, DEK cache, lifecycle), [`cipher`] (one value sealed
//!   or opened with the keys at hand), [`config`] (flags, environment and file → `Config`);
//! - [`proxy`] (all network I/O and the protocol core), [`reencrypt`] (online re-encryption);
//! - [`app`] (one assembly of a running proxy from a `Config`), [`admin`] (metrics, health);
//! - [`cli`] (the commands); [`fault`] (test-only fault injection).

pub mod admin;
pub mod app;
pub mod cipher;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod fault;
pub mod keys;
pub mod proxy;
pub mod reencrypt;
pub mod rules;
pub mod sql;
pub mod tls;
pub mod wire;

#[cfg(test)]
mod redaction_tests;
