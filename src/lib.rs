//! pgenvelope: a transparent encrypting PostgreSQL proxy.

pub mod crypto;
pub mod rules;
