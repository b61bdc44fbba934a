//! pgenvelope: a transparent encrypting PostgreSQL proxy.
//!
//! Applications point their `DATABASE_URL` at pgenvelope instead of PostgreSQL. It speaks the
//! PostgreSQL v3 wire protocol to both sides and relays everything byte for byte, looking only
//! at the few messages it must track.
//!
//! ```text
//! app ──(PG v3 wire)──▶ proxy::listener ──▶ proxy::connection (one task per client)
//!                                              │ startup: wire::startup
//!                                              │ frames:  wire::header (tag + length scan)
//!                                              ▼
//!                                 client ⇄ proxy::pump ⇄ server   (raw bytes, batched writes)
//! ```
//!
//! Modules: [`wire`] (pure codec), [`proxy`] (all network I/O), [`config`] (file + env + flags
//! → validated config), [`app`] (builds the running proxy from a config), [`cli`] (commands),
//! [`admin`] (metrics and health over HTTP), [`crypto`] (key material and the `enc:v1` format),
//! [`sql`] (pure statement analysis: which literals and parameters feed encrypted columns),
//! [`tls`] (TLS client settings toward PostgreSQL).

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
