//! Envelope encryption format and key types.

pub mod key;

pub use key::{ColumnId, DataKey, DekId, InvalidOrgId, OrgId, KEY_LEN};
