//! Key material and identifier newtypes shared by `crypto` and `keys`.
//!
//! Invariant: key bytes live only in [`DataKey`] / [`KekBytes`], which zeroize on drop, print as
//! `[REDACTED]`, cannot be serialized, and hand out their bytes through one greppable method,
//! `expose_secret()`.

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop};

/// Length in bytes of every symmetric key we hold (AES-256).
pub const KEY_LEN: usize = 32;

/// A 256-bit data-encryption key (DEK) in plaintext form, after unwrapping.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct DataKey([u8; KEY_LEN]);

impl DataKey {
    /// Wrap raw key bytes. The caller's copy should be zeroized by the caller.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// Build a key from a slice; `None` unless it is exactly [`KEY_LEN`] bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let arr: [u8; KEY_LEN] = bytes.try_into().ok()?;
        Some(Self(arr))
    }

    /// A fresh random key from the OS RNG.
    pub fn generate() -> Self {
        let mut bytes = [0u8; KEY_LEN];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
        Self(bytes)
    }

    /// The raw key bytes. Every use is a place key material leaves this type: keep them few.
    pub fn expose_secret(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey([REDACTED])")
    }
}

/// Identifier of one DEK version of one organisation (a UUID, stored in every `enc:v1` value).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DekId(pub uuid::Uuid);

impl DekId {
    /// A new random (v4) DEK id.
    pub fn new_random() -> Self {
        Self(uuid::Uuid::new_v4())
    }

    /// The 16 raw bytes as stored in the `enc:v1` header.
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    /// From the 16 raw header bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(uuid::Uuid::from_bytes(bytes))
    }
}

impl fmt::Display for DekId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for DekId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DekId({})", self.0)
    }
}

/// An organisation (tenant) id, as written in `tenant_column` or `pgenvelope.tenant`.
///
/// Invariant: non-empty, at most 255 bytes, no NUL.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct OrgId(String);

impl OrgId {
    /// Validate and wrap an organisation id.
    pub fn new(s: impl Into<String>) -> Result<Self, InvalidOrgId> {
        let s = s.into();
        if s.is_empty() || s.len() > 255 || s.contains('\0') {
            return Err(InvalidOrgId);
        }
        Ok(Self(s))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OrgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An organisation id was empty, longer than 255 bytes or contained NUL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("organisation id must be 1..=255 bytes without NUL")]
pub struct InvalidOrgId;

/// Column id: first 4 bytes of SHA-256 of `schema.table.column` (or of the rule's stable `id`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ColumnId(pub [u8; 4]);

impl ColumnId {
    /// Derive the id from its name (`schema.table.column` or a stable rule id).
    pub fn from_name(name: &str) -> Self {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(name.as_bytes());
        let mut id = [0u8; 4];
        id.copy_from_slice(&digest[..4]);
        Self(id)
    }
}

impl fmt::Display for ColumnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ColumnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ColumnId({self})")
    }
}
