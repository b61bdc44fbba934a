//! End-to-end tests against real PostgreSQL servers: one test binary, one module per area.

// Test-only helpers: `pub` items shared between modules of this binary, unwraps on test setup.
#![allow(unreachable_pub, missing_docs, dead_code, clippy::unwrap_used)]

mod support;

mod admin;
mod at_rest;
mod check;
mod clients;
mod cluster_smoke;
mod encryption;
mod faults;
mod guard;
mod hsm;
mod keys_lifecycle;
mod kms;
mod lexing;
mod orms;
mod passthrough;
mod protocol_sync;
mod reencrypt;
mod row_binding;
mod scram_tls;
mod search;
mod sessions;
mod soak;
mod tenancy;
mod tls;
mod writes;
