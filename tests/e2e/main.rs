//! End-to-end tests against a real PostgreSQL: one test binary, one module per area.

// Test-only helpers: `pub` items shared between modules of this binary, unwraps on test setup.
#![allow(unreachable_pub, missing_docs, dead_code, clippy::unwrap_used)]

mod clients;
mod harness;
mod passthrough;
mod raw;
