//! The `enc:v1:` ciphertext format: parse, seal and open.
//!
//! A value stored in an encrypted column is the ASCII text `enc:v1:` followed by the standard,
//! padded base64 (RFC 4648 §4, canonical: no whitespace, no stray bits) of this binary value:
//!
//! | offset | size   | field                                                                |
//! |-------:|-------:|----------------------------------------------------------------------|
//! | 0      | 1      | algorithm: `0x01` AES-256-GCM with a random 96-bit nonce ([`Algorithm`]); `0x02` is reserved for AES-256-GCM-SIV (deterministic) and rejected; `0x03` is `0x01` bound to its row |
//! | 1      | 16     | DEK id: UUID of one organisation's DEK version ([`DekId`])             |
//! | 17     | 4      | column id: first 4 bytes of SHA-256 of `schema.table.column` or of the rule's stable id ([`ColumnId`]) |
//! | 21     | 12     | nonce                                                                |
//! | 33     | n + 16 | AES-256-GCM ciphertext of the n plaintext bytes, then the 16-byte tag |
//!
//! The version lives in the text prefix; the algorithm byte comes first in the binary value.
//!
//! A *searchable* value (column with `search = "equality"` or `"equality-ci"`) puts a search
//! part in front of that layout: byte `0x04`, then a 17-byte search term
//! ([`crate::crypto::search`]), then an ordinary `0x01` or `0x03` value whose offsets above
//! are shifted by 18. Its AAD covers the search part too (bytes 0..39 instead of 0..21), so a
//! term cannot be moved to another value. The first 31 characters of its text depend on the
//! term alone.
//!
//! * AAD = `b"pgenvelope/v1"` ‖ bytes 0..21 of the binary value ‖ the organisation id's UTF-8
//!   bytes. Changing the algorithm, DEK id, column id or organisation fails authentication.
//! * Row binding (`0x03`, tables with a `row_key`): the AAD goes on with a zero byte and the
//!   row key as PostgreSQL prints it (`‖ 0x00 ‖ key`; an organisation id holds no zero byte).
//!   The value then opens only in the row it was written to: a copy in another row of the same
//!   organisation and column fails authentication.
//! * Key = per-column subkey `HKDF-SHA256(ikm = DEK, salt = DEK id bytes,
//!   info = b"pgenvelope/v1/enc/" ‖ 4 column-id bytes)`, 32 bytes.
//!
//! # API
//!
//! * [`ColumnKey::derive`]`(&DataKey, DekId, ColumnId)`: runs HKDF once and expands the AES key
//!   schedule; keep it (e.g. in the DEK cache) and seal many values with it.
//! * [`ColumnKey::seal`]`(&self, &OrgId, plaintext, &mut NonceSource) -> Result<String, SealError>`
//!   and [`ColumnKey::seal_into`] (appends to a caller-owned `String`).
//! * [`EncV1::parse`]`(&[u8]) -> Result<EncV1, FormatError>` for the whole `enc:v1:…` text, with
//!   accessors [`EncV1::algorithm`], [`EncV1::dek_id`], [`EncV1::column_id`], [`EncV1::nonce`],
//!   [`EncV1::ciphertext`]; [`looks_like_enc_v1`] is the cheap prefix check.
//! * [`ColumnKey::open`]`(&self, &OrgId, &EncV1) -> Result<Vec<u8>, OpenError>`.
//! * Row-bound: [`ColumnKey::seal_for_row_into`] and [`ColumnKey::open_owned_in_row`] take the
//!   row key; [`EncV1::is_row_bound`] tells which kind a value is.
//!
//! Nonces come from a [`NonceSource`]; the per-key message limit and
//! the rotation threshold are documented in [`crate::crypto::nonce`].
//!
//! # Invariants
//!
//! * No I/O, no clock, no environment; randomness only through `NonceSource`.
//! * Parsing never panics on any input, and an [`EncV1`] always holds a well-formed value of a
//!   supported algorithm.
//! * Errors never contain plaintext, ciphertext or key bytes; an authentication failure is a
//!   single unit variant that says nothing about why.

use std::fmt;

use base64_simd::STANDARD as BASE64;
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::crypto::aead::{Aead256, MAX_PLAINTEXT_LEN, NONCE_LEN, TAG_LEN};
use crate::crypto::key::{ColumnId, DataKey, DekId, OrgId, KEY_LEN};
use crate::crypto::nonce::NonceSource;
use crate::crypto::search::{SearchTerm, SEARCHABLE_BYTE, SEARCH_PART_LEN, TERM_LEN};

/// The text prefix of every value in this format.
pub const ENC_V1_PREFIX: &[u8] = b"enc:v1:";

/// Domain-separation string that starts the AAD.
const AAD_LABEL: &[u8] = b"pgenvelope/v1";

/// HKDF `info` prefix; the 4 column-id bytes follow.
const HKDF_INFO_LABEL: &[u8] = b"pgenvelope/v1/enc/";

const ALG_OFFSET: usize = 0;
const DEK_ID_OFFSET: usize = 1;
const COLUMN_ID_OFFSET: usize = 17;
const NONCE_OFFSET: usize = 21;
/// Length of the header: algorithm, DEK id, column id and nonce.
const HEADER_LEN: usize = 33;
/// Length of the authenticated part of the header (bytes 0..21), which enters the AAD.
const AAD_HEADER_LEN: usize = NONCE_OFFSET;
/// Shortest binary value: the header and the tag of an empty plaintext.
const MIN_BINARY_LEN: usize = HEADER_LEN + TAG_LEN;
/// Longest organisation id ([`OrgId`]'s invariant).
const MAX_ORG_LEN: usize = 255;
const MAX_AAD_LEN: usize = AAD_LABEL.len() + SEARCH_PART_LEN + AAD_HEADER_LEN + MAX_ORG_LEN;

/// Algorithm byte of an `enc:v1` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Algorithm {
    /// `0x01`: AES-256-GCM with a random 96-bit nonce, per-column HKDF-SHA256 subkey.
    Aes256GcmRandomNonce,
    /// `0x03`: as `0x01`, with the row key in the AAD (row binding).
    Aes256GcmRandomNonceRowBound,
}

impl Algorithm {
    /// Byte for AES-256-GCM with a random nonce.
    pub const AES_256_GCM_BYTE: u8 = 0x01;
    /// Byte reserved for AES-256-GCM-SIV (deterministic mode); not supported yet.
    pub const RESERVED_GCM_SIV_BYTE: u8 = 0x02;
    /// Byte for AES-256-GCM with a random nonce, bound to its row.
    pub const AES_256_GCM_ROW_BYTE: u8 = 0x03;

    /// The algorithm's byte in the binary value.
    pub fn byte(self) -> u8 {
        match self {
            Self::Aes256GcmRandomNonce => Self::AES_256_GCM_BYTE,
            Self::Aes256GcmRandomNonceRowBound => Self::AES_256_GCM_ROW_BYTE,
        }
    }

    fn from_byte(byte: u8) -> Result<Self, FormatError> {
        match byte {
            Self::AES_256_GCM_BYTE => Ok(Self::Aes256GcmRandomNonce),
            Self::AES_256_GCM_ROW_BYTE => Ok(Self::Aes256GcmRandomNonceRowBound),
            Self::RESERVED_GCM_SIV_BYTE => Err(FormatError::ReservedAlgorithm { byte }),
            _ => Err(FormatError::UnknownAlgorithm { byte }),
        }
    }
}

/// Cheap check that `input` starts with `enc:v1:`; says nothing about the rest.
pub fn looks_like_enc_v1(input: &[u8]) -> bool {
    input.starts_with(ENC_V1_PREFIX)
}

/// A parsed, well-formed `enc:v1` value (not yet authenticated).
///
/// Invariant: `binary` is at least `MIN_BINARY_LEN` (49) bytes and starts with a supported
/// algorithm byte.
#[derive(Clone, PartialEq, Eq)]
pub struct EncV1 {
    binary: Vec<u8>,
    algorithm: Algorithm,
    /// Where the ordinary value starts: 0, or [`SEARCH_PART_LEN`] for a searchable value.
    base: usize,
}

impl EncV1 {
    /// Parse the whole text of a value (`enc:v1:` and its base64).
    pub fn parse(input: &[u8]) -> Result<Self, FormatError> {
        let encoded = input
            .strip_prefix(ENC_V1_PREFIX)
            .ok_or(FormatError::MissingPrefix)?;
        let binary = BASE64
            .decode_to_vec(encoded)
            .map_err(|_| FormatError::InvalidBase64)?;
        Self::from_binary(binary)
    }

    /// Parse the decoded binary value (no `enc:v1:` prefix, no base64).
    pub fn from_binary(binary: Vec<u8>) -> Result<Self, FormatError> {
        let &alg = binary.get(ALG_OFFSET).ok_or(FormatError::TooShort {
            len: 0,
            min: MIN_BINARY_LEN,
        })?;
        let base = if alg == SEARCHABLE_BYTE {
            SEARCH_PART_LEN
        } else {
            0
        };
        if base > 0 && binary.len() <= base {
            return Err(FormatError::TooShort {
                len: binary.len(),
                min: base + MIN_BINARY_LEN,
            });
        }
        let algorithm = Algorithm::from_byte(binary[base])?;
        if binary.len() < base + MIN_BINARY_LEN {
            return Err(FormatError::TooShort {
                len: binary.len(),
                min: base + MIN_BINARY_LEN,
            });
        }
        Ok(Self {
            binary,
            algorithm,
            base,
        })
    }

    /// The search term of a searchable value.
    pub fn search_term(&self) -> Option<SearchTerm> {
        (self.base > 0).then(|| SearchTerm(self.array::<TERM_LEN>(1)))
    }

    /// Whether the value carries a search term.
    pub fn is_searchable(&self) -> bool {
        self.base > 0
    }

    /// The algorithm byte, decoded.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Whether the value is bound to its row (opens only with its row key).
    pub fn is_row_bound(&self) -> bool {
        self.algorithm == Algorithm::Aes256GcmRandomNonceRowBound
    }

    /// The DEK the value was sealed with.
    pub fn dek_id(&self) -> DekId {
        DekId::from_bytes(self.array::<16>(self.base + DEK_ID_OFFSET))
    }

    /// The column the value was sealed for.
    pub fn column_id(&self) -> ColumnId {
        ColumnId(self.array::<4>(self.base + COLUMN_ID_OFFSET))
    }

    /// The 96-bit nonce.
    pub fn nonce(&self) -> [u8; NONCE_LEN] {
        self.array::<NONCE_LEN>(self.base + NONCE_OFFSET)
    }

    /// Ciphertext followed by the 16-byte tag.
    pub fn ciphertext(&self) -> &[u8] {
        &self.binary[self.base + HEADER_LEN..]
    }

    /// Length of the plaintext this value decrypts to.
    pub fn plaintext_len(&self) -> usize {
        self.binary.len() - self.base - MIN_BINARY_LEN
    }

    /// The whole decoded binary value.
    pub fn as_binary(&self) -> &[u8] {
        &self.binary
    }

    /// The value as `enc:v1:` text, exactly as it parses.
    pub fn to_text(&self) -> String {
        let mut out = String::with_capacity(encoded_len(self.binary.len()));
        out.push_str("enc:v1:");
        BASE64.encode_append(&self.binary, &mut out);
        out
    }

    fn array<const N: usize>(&self, offset: usize) -> [u8; N] {
        let mut out = [0u8; N];
        out.copy_from_slice(&self.binary[offset..offset + N]);
        out
    }
}

/// Prints the header only: ciphertext never goes to logs.
impl fmt::Debug for EncV1 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncV1")
            .field("algorithm", &self.algorithm)
            .field("searchable", &self.is_searchable())
            .field("dek_id", &self.dek_id())
            .field("column_id", &self.column_id())
            .field("plaintext_len", &self.plaintext_len())
            .finish_non_exhaustive()
    }
}

/// The AES-256-GCM subkey of one DEK for one column, ready to seal and open.
///
/// Invariant: holds no raw key bytes, only the expanded cipher state, which zeroizes on drop;
/// `Debug` prints the ids only.
#[derive(Clone)]
pub struct ColumnKey {
    aead: Aead256,
    dek_id: DekId,
    column_id: ColumnId,
}

impl ColumnKey {
    /// Derive the subkey `HKDF-SHA256(ikm = DEK, salt = DEK id, info = "pgenvelope/v1/enc/" ‖
    /// column id)` and expand it. Do this once per (DEK, column), not per value.
    pub fn derive(dek: &DataKey, dek_id: DekId, column_id: ColumnId) -> Self {
        let hkdf = Hkdf::<Sha256>::new(Some(dek_id.as_bytes()), dek.expose_secret());
        let mut info = [0u8; HKDF_INFO_LABEL.len() + 4];
        info[..HKDF_INFO_LABEL.len()].copy_from_slice(HKDF_INFO_LABEL);
        info[HKDF_INFO_LABEL.len()..].copy_from_slice(&column_id.0);
        let mut subkey = Zeroizing::new([0u8; KEY_LEN]);
        hkdf.expand(&info, subkey.as_mut())
            .expect("32 bytes is within HKDF-SHA256's 8160-byte output limit");
        Self {
            aead: Aead256::new(&subkey),
            dek_id,
            column_id,
        }
    }

    /// The DEK this key was derived from.
    pub fn dek_id(&self) -> DekId {
        self.dek_id
    }

    /// The column this key is for.
    pub fn column_id(&self) -> ColumnId {
        self.column_id
    }

    /// Seal `plaintext` for organisation `org` into a new `enc:v1:` string.
    ///
    /// Every call consumes one nonce: callers count it against the DEK (see
    /// [`crate::crypto::nonce`]).
    pub fn seal(
        &self,
        org: &OrgId,
        plaintext: &[u8],
        nonces: &mut NonceSource,
    ) -> Result<String, SealError> {
        let mut out = String::new();
        self.seal_into(org, plaintext, nonces, &mut out)?;
        Ok(out)
    }

    /// Like [`seal`](Self::seal), but appends the `enc:v1:` text to `out`. On error `out` is
    /// unchanged.
    pub fn seal_into(
        &self,
        org: &OrgId,
        plaintext: &[u8],
        nonces: &mut NonceSource,
        out: &mut String,
    ) -> Result<(), SealError> {
        self.seal_with_nonce_into(org, None, None, plaintext, nonces.next_nonce(), out)
    }

    /// Like [`seal_into`](Self::seal_into), bound to the row whose key is `row_key` (as
    /// PostgreSQL prints it): algorithm `0x03`, opened only by
    /// [`open_owned_in_row`](Self::open_owned_in_row) with the same key.
    pub fn seal_for_row_into(
        &self,
        org: &OrgId,
        row_key: &[u8],
        plaintext: &[u8],
        nonces: &mut NonceSource,
        out: &mut String,
    ) -> Result<(), SealError> {
        self.seal_with_nonce_into(
            org,
            Some(row_key),
            None,
            plaintext,
            nonces.next_nonce(),
            out,
        )
    }

    /// Seal a searchable value: the search part (`0x04` ‖ `term`) in front of an ordinary
    /// value, bound to its row when `row_key` is given. The term must be the value's own,
    /// computed by the column's [`TermKey`](crate::crypto::TermKey).
    pub fn seal_searchable_into(
        &self,
        org: &OrgId,
        row_key: Option<&[u8]>,
        term: &SearchTerm,
        plaintext: &[u8],
        nonces: &mut NonceSource,
        out: &mut String,
    ) -> Result<(), SealError> {
        self.seal_with_nonce_into(
            org,
            row_key,
            Some(term),
            plaintext,
            nonces.next_nonce(),
            out,
        )
    }

    /// Searchable [`danger_seal_with_nonce`](Self::danger_seal_with_nonce): test vectors only.
    #[doc(hidden)]
    pub fn danger_seal_searchable_with_nonce(
        &self,
        org: &OrgId,
        row_key: Option<&[u8]>,
        term: &SearchTerm,
        plaintext: &[u8],
        nonce: [u8; NONCE_LEN],
    ) -> Result<String, SealError> {
        let mut out = String::new();
        self.seal_with_nonce_into(org, row_key, Some(term), plaintext, nonce, &mut out)?;
        Ok(out)
    }

    /// Seal with a caller-chosen nonce. Only for fixed test vectors: reusing a nonce under one
    /// key destroys GCM's security.
    #[doc(hidden)]
    pub fn danger_seal_with_nonce(
        &self,
        org: &OrgId,
        plaintext: &[u8],
        nonce: [u8; NONCE_LEN],
    ) -> Result<String, SealError> {
        let mut out = String::new();
        self.seal_with_nonce_into(org, None, None, plaintext, nonce, &mut out)?;
        Ok(out)
    }

    /// Row-bound [`danger_seal_with_nonce`](Self::danger_seal_with_nonce): test vectors only.
    #[doc(hidden)]
    pub fn danger_seal_for_row_with_nonce(
        &self,
        org: &OrgId,
        row_key: &[u8],
        plaintext: &[u8],
        nonce: [u8; NONCE_LEN],
    ) -> Result<String, SealError> {
        let mut out = String::new();
        self.seal_with_nonce_into(org, Some(row_key), None, plaintext, nonce, &mut out)?;
        Ok(out)
    }

    /// Verify and decrypt `value` for organisation `org`.
    ///
    /// The value's DEK id and column id must be this key's; they are checked before any
    /// decryption so a mismatch is reported as such rather than as a tag failure.
    pub fn open(&self, org: &OrgId, value: &EncV1) -> Result<Vec<u8>, OpenError> {
        self.check_ids(value)?;
        if value.is_row_bound() {
            return Err(OpenError::RowKeyMissing);
        }
        let binary = value.as_binary();
        let (header, rest) = binary.split_at(value.base + HEADER_LEN);
        let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
        let mut tag_bytes = [0u8; TAG_LEN];
        tag_bytes.copy_from_slice(tag);

        let mut aad_buf = [0u8; MAX_AAD_LEN];
        let aad = build_aad(&mut aad_buf, header, org);
        let mut buf = ciphertext.to_vec();
        self.aead
            .open_in_place(&value.nonce(), aad, &mut buf, &tag_bytes)
            .map_err(|_| OpenError::Authentication)?;
        Ok(buf)
    }

    /// Like [`open`](Self::open), but decrypts in the value's own buffer and returns it as the
    /// plaintext: no second allocation or copy (the read path's hot loop). On failure the
    /// buffer, still encrypted, is dropped.
    pub fn open_owned(&self, org: &OrgId, value: EncV1) -> Result<Vec<u8>, OpenError> {
        self.open_owned_in_row(org, None, value)
    }

    /// Like [`open_owned`](Self::open_owned), for a value that may be bound to its row: a
    /// row-bound value needs `row_key`, the key of the row it is read from (as PostgreSQL
    /// prints it), and opens only if that is the row it was sealed for. An unbound value
    /// ignores `row_key`.
    pub fn open_owned_in_row(
        &self,
        org: &OrgId,
        row_key: Option<&[u8]>,
        value: EncV1,
    ) -> Result<Vec<u8>, OpenError> {
        self.check_ids(&value)?;
        let row_key = match (value.is_row_bound(), row_key) {
            (true, None) => return Err(OpenError::RowKeyMissing),
            (true, key) => key,
            (false, _) => None,
        };
        let nonce = value.nonce();
        let header_len = value.base + HEADER_LEN;
        let mut binary = value.binary;
        let tag_at = binary.len() - TAG_LEN;
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&binary[tag_at..]);
        let (header, body) = binary.split_at_mut(header_len);
        with_aad(header, org, row_key, |aad| {
            self.aead
                .open_in_place(&nonce, aad, &mut body[..tag_at - header_len], &tag)
        })
        .map_err(|_| OpenError::Authentication)?;
        binary.truncate(tag_at);
        binary.drain(..header_len);
        Ok(binary)
    }

    /// The value's DEK and column must be this key's; checked before any decryption so a
    /// mismatch is reported as such rather than as a tag failure.
    fn check_ids(&self, value: &EncV1) -> Result<(), OpenError> {
        let found_dek = value.dek_id();
        if found_dek != self.dek_id {
            return Err(OpenError::DekMismatch {
                expected: self.dek_id,
                found: found_dek,
            });
        }
        let found_column = value.column_id();
        if found_column != self.column_id {
            return Err(OpenError::ColumnMismatch {
                expected: self.column_id,
                found: found_column,
            });
        }
        Ok(())
    }

    fn seal_with_nonce_into(
        &self,
        org: &OrgId,
        row_key: Option<&[u8]>,
        term: Option<&SearchTerm>,
        plaintext: &[u8],
        nonce: [u8; NONCE_LEN],
        out: &mut String,
    ) -> Result<(), SealError> {
        if plaintext.len() > MAX_PLAINTEXT_LEN {
            return Err(SealError::PlaintextTooLong {
                len: plaintext.len(),
                max: MAX_PLAINTEXT_LEN,
            });
        }
        let base = if term.is_some() { SEARCH_PART_LEN } else { 0 };
        let mut binary = Vec::with_capacity(base + MIN_BINARY_LEN + plaintext.len());
        if let Some(term) = term {
            binary.extend_from_slice(&term.part());
        }
        binary.push(match row_key {
            None => Algorithm::AES_256_GCM_BYTE,
            Some(_) => Algorithm::AES_256_GCM_ROW_BYTE,
        });
        binary.extend_from_slice(self.dek_id.as_bytes());
        binary.extend_from_slice(&self.column_id.0);
        binary.extend_from_slice(&nonce);
        binary.extend_from_slice(plaintext);

        let (header, body) = binary.split_at_mut(base + HEADER_LEN);
        let sealed = with_aad(header, org, row_key, |aad| {
            self.aead.seal_in_place(&nonce, aad, body)
        });
        let tag = sealed.map_err(|_| SealError::PlaintextTooLong {
            len: plaintext.len(),
            max: MAX_PLAINTEXT_LEN,
        })?;
        binary.extend_from_slice(&tag);

        out.reserve(encoded_len(binary.len()));
        out.push_str("enc:v1:");
        BASE64.encode_append(&binary, out);
        Ok(())
    }
}

impl fmt::Debug for ColumnKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ColumnKey")
            .field("dek_id", &self.dek_id)
            .field("column_id", &self.column_id)
            .finish_non_exhaustive()
    }
}

/// Why a text is not a well-formed `enc:v1` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// The input does not start with `enc:v1:`.
    #[error("value does not start with `enc:v1:`")]
    MissingPrefix,
    /// The text after the prefix is not canonical, padded standard base64. The decoder's detail
    /// (offset and offending byte) is dropped on purpose: it would put ciphertext into logs.
    #[error("enc:v1 value is not valid padded base64")]
    InvalidBase64,
    /// The decoded value is shorter than a header plus tag.
    #[error("enc:v1 value is {len} bytes, shorter than the minimum of {min}")]
    TooShort {
        /// Decoded length.
        len: usize,
        /// Minimum length (header and tag).
        min: usize,
    },
    /// Algorithm byte `0x02` (AES-256-GCM-SIV, deterministic) is reserved but not supported yet.
    #[error("enc:v1 algorithm {byte:#04x} (deterministic) is reserved and not supported yet")]
    ReservedAlgorithm {
        /// The algorithm byte.
        byte: u8,
    },
    /// The algorithm byte is not one this format defines.
    #[error("enc:v1 algorithm {byte:#04x} is unknown")]
    UnknownAlgorithm {
        /// The algorithm byte.
        byte: u8,
    },
}

/// Why a value could not be sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The plaintext is longer than [`MAX_PLAINTEXT_LEN`] (PostgreSQL's 1 GiB field limit).
    #[error("plaintext of {len} bytes exceeds the limit of {max} bytes")]
    PlaintextTooLong {
        /// Plaintext length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Why a well-formed value could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The value was sealed under another DEK than this key's; look up the right DEK.
    #[error("enc:v1 value is for DEK {found}, not {expected}")]
    DekMismatch {
        /// This key's DEK.
        expected: DekId,
        /// The value's DEK.
        found: DekId,
    },
    /// The value was sealed for another column (e.g. copied from one column into another).
    #[error("enc:v1 value is for column {found}, not {expected}")]
    ColumnMismatch {
        /// This key's column.
        expected: ColumnId,
        /// The value's column.
        found: ColumnId,
    },
    /// Tag verification failed: the value was altered, or sealed for another organisation.
    /// Deliberately carries no detail.
    #[error("enc:v1 value failed authentication")]
    Authentication,
    /// The value is bound to its row and no row key was given.
    #[error("enc:v1 value is bound to its row: its row key is needed to open it")]
    RowKeyMissing,
}

/// Write `"pgenvelope/v1" ‖ header without its nonce ‖ org` into `buf` and return the used
/// prefix: bytes 0..21 of an ordinary value's header, 0..39 of a searchable one's.
fn build_aad<'a>(buf: &'a mut [u8; MAX_AAD_LEN], header: &[u8], org: &OrgId) -> &'a [u8] {
    let org = org.as_str().as_bytes();
    let aad_header = &header[..header.len() - NONCE_LEN];
    let label_end = AAD_LABEL.len();
    let header_end = label_end + aad_header.len();
    let end = header_end + org.len();
    buf[..label_end].copy_from_slice(AAD_LABEL);
    buf[label_end..header_end].copy_from_slice(aad_header);
    buf[header_end..end].copy_from_slice(org);
    &buf[..end]
}

/// Row keys up to this length build their AAD on the stack.
const INLINE_ROW_KEY_LEN: usize = 128;

/// Run `f` with the AAD of a value: [`build_aad`], then for a row-bound value a zero byte and
/// the row key. Built on the stack unless the row key is long.
fn with_aad<R>(
    header: &[u8],
    org: &OrgId,
    row_key: Option<&[u8]>,
    f: impl FnOnce(&[u8]) -> R,
) -> R {
    let mut base = [0u8; MAX_AAD_LEN];
    let aad = build_aad(&mut base, header, org);
    let Some(key) = row_key else {
        return f(aad);
    };
    let len = aad.len() + 1 + key.len();
    if key.len() <= INLINE_ROW_KEY_LEN {
        let mut buf = [0u8; MAX_AAD_LEN + 1 + INLINE_ROW_KEY_LEN];
        buf[..aad.len()].copy_from_slice(aad);
        buf[aad.len() + 1..len].copy_from_slice(key);
        return f(&buf[..len]);
    }
    let mut buf = Vec::with_capacity(len);
    buf.extend_from_slice(aad);
    buf.push(0);
    buf.extend_from_slice(key);
    f(&buf)
}

/// Length of the `enc:v1:` text for a binary value of `binary_len` bytes.
fn encoded_len(binary_len: usize) -> usize {
    ENC_V1_PREFIX.len() + binary_len.div_ceil(3) * 4
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;

    use super::*;
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;

    fn key(column: &str) -> ColumnKey {
        ColumnKey::derive(
            &DataKey::from_bytes([7; KEY_LEN]),
            DekId::from_bytes([1; 16]),
            ColumnId::from_name(column),
        )
    }

    fn org(s: &str) -> OrgId {
        OrgId::new(s).unwrap()
    }

    #[test]
    fn round_trip_and_layout() {
        let k = key("public.t.c");
        let mut nonces = NonceSource::from_os_rng();
        let text = k.seal(&org("acme"), b"hello", &mut nonces).unwrap();
        assert!(looks_like_enc_v1(text.as_bytes()));
        assert_eq!(text.len(), encoded_len(MIN_BINARY_LEN + 5));
        let v = EncV1::parse(text.as_bytes()).unwrap();
        assert_eq!(v.algorithm(), Algorithm::Aes256GcmRandomNonce);
        assert_eq!(v.dek_id(), k.dek_id());
        assert_eq!(v.column_id(), k.column_id());
        assert_eq!(v.ciphertext().len(), 5 + TAG_LEN);
        assert_eq!(v.to_text(), text);
        assert_eq!(k.open(&org("acme"), &v).unwrap(), b"hello");
    }

    #[test]
    fn seal_into_appends() {
        let k = key("public.t.c");
        let mut nonces = NonceSource::from_os_rng();
        let mut out = String::from("x");
        k.seal_into(&org("a"), b"", &mut nonces, &mut out).unwrap();
        assert!(out.starts_with("xenc:v1:"));
    }

    #[test]
    fn row_bound_values_open_only_in_their_row() {
        let k = key("public.t.c");
        let mut nonces = NonceSource::from_os_rng();
        let mut text = String::new();
        k.seal_for_row_into(&org("acme"), b"17", b"secret", &mut nonces, &mut text)
            .unwrap();
        let v = EncV1::parse(text.as_bytes()).unwrap();
        assert!(v.is_row_bound());
        assert_eq!(v.as_binary()[0], Algorithm::AES_256_GCM_ROW_BYTE);
        let open = |row: Option<&[u8]>| k.open_owned_in_row(&org("acme"), row, v.clone());
        assert_eq!(open(Some(b"17")).unwrap(), b"secret");
        assert_eq!(open(Some(b"18")), Err(OpenError::Authentication));
        assert_eq!(open(Some(b"")), Err(OpenError::Authentication));
        assert_eq!(open(None), Err(OpenError::RowKeyMissing));
        assert_eq!(k.open(&org("acme"), &v), Err(OpenError::RowKeyMissing));
        assert_eq!(
            k.open_owned_in_row(&org("other"), Some(b"17"), v.clone()),
            Err(OpenError::Authentication)
        );
        // Claiming to be unbound (algorithm byte 0x01) fails authentication.
        let mut binary = v.as_binary().to_vec();
        binary[0] = Algorithm::AES_256_GCM_BYTE;
        let unbound = EncV1::from_binary(binary).unwrap();
        assert_eq!(
            k.open_owned_in_row(&org("acme"), Some(b"17"), unbound),
            Err(OpenError::Authentication)
        );
        // Long keys (AAD built on the heap) as well as short ones.
        let long = vec![b'k'; INLINE_ROW_KEY_LEN + 1];
        let mut text = String::new();
        k.seal_for_row_into(&org("acme"), &long, b"long", &mut nonces, &mut text)
            .unwrap();
        let v = EncV1::parse(text.as_bytes()).unwrap();
        assert_eq!(
            k.open_owned_in_row(&org("acme"), Some(&long), v.clone())
                .unwrap(),
            b"long"
        );
        assert_eq!(
            k.open_owned_in_row(&org("acme"), Some(&long[1..]), v),
            Err(OpenError::Authentication)
        );
        // An unbound value ignores a row key.
        let plain = k.seal(&org("acme"), b"x", &mut nonces).unwrap();
        let plain = EncV1::parse(plain.as_bytes()).unwrap();
        assert!(!plain.is_row_bound());
        assert_eq!(
            k.open_owned_in_row(&org("acme"), Some(b"17"), plain)
                .unwrap(),
            b"x"
        );
    }

    #[test]
    fn searchable_values_carry_their_term_in_front() {
        use crate::crypto::search::{SearchMode, TermKey, SEARCH_PREFIX_CHARS};
        let k = key("public.t.c");
        let tk = TermKey::derive(
            &DataKey::from_bytes([3; KEY_LEN]),
            DekId::from_bytes([4; 16]),
            ColumnId::from_name("public.t.c"),
            SearchMode::Equality,
        );
        let term = tk.term(b"hello");
        let mut nonces = NonceSource::from_os_rng();
        let mut a = String::new();
        k.seal_searchable_into(&org("acme"), None, &term, b"hello", &mut nonces, &mut a)
            .unwrap();
        let mut b = String::new();
        k.seal_searchable_into(
            &org("acme"),
            Some(b"7"),
            &term,
            b"hello",
            &mut nonces,
            &mut b,
        )
        .unwrap();
        assert_eq!(a[..SEARCH_PREFIX_CHARS], term.prefix_text());
        assert_eq!(b[..SEARCH_PREFIX_CHARS], term.prefix_text());
        assert_ne!(a, b);
        let pa = EncV1::parse(a.as_bytes()).unwrap();
        assert!(pa.is_searchable());
        assert_eq!(pa.search_term(), Some(term));
        assert_eq!(pa.dek_id(), k.dek_id());
        assert_eq!(pa.column_id(), k.column_id());
        assert_eq!(pa.plaintext_len(), 5);
        assert_eq!(k.open(&org("acme"), &pa).unwrap(), b"hello");
        assert_eq!(k.open_owned(&org("acme"), pa.clone()).unwrap(), b"hello");
        assert!(k.open(&org("globex"), &pa).is_err());
        let pb = EncV1::parse(b.as_bytes()).unwrap();
        assert!(pb.is_row_bound());
        assert_eq!(
            k.open_owned_in_row(&org("acme"), Some(b"7"), pb.clone())
                .unwrap(),
            b"hello"
        );
        assert!(k.open_owned_in_row(&org("acme"), Some(b"8"), pb).is_err());
        // Another term in front of the same value fails authentication.
        let other = tk.term(b"world");
        let mut bin = pa.as_binary().to_vec();
        bin[1..18].copy_from_slice(other.as_bytes());
        let moved = EncV1::from_binary(bin).unwrap();
        assert_eq!(
            k.open_owned(&org("acme"), moved),
            Err(OpenError::Authentication)
        );
        // Dropping the search part gives a value that fails too.
        let bare = EncV1::from_binary(pa.as_binary()[18..].to_vec()).unwrap();
        assert_eq!(k.open(&org("acme"), &bare), Err(OpenError::Authentication));
        // A search part alone, or nested, is malformed.
        assert!(EncV1::from_binary(pa.as_binary()[..18].to_vec()).is_err());
        let mut nested = term.part().to_vec();
        nested.extend_from_slice(pa.as_binary());
        assert!(EncV1::from_binary(nested).is_err());
    }

    #[test]
    fn debug_hides_secrets() {
        let k = key("public.t.c");
        let dbg = format!("{k:?}");
        assert!(dbg.starts_with("ColumnKey { dek_id:"), "{dbg}");
        let v = EncV1::parse(
            k.danger_seal_with_nonce(&org("a"), b"secret", [0; 12])
                .unwrap()
                .as_bytes(),
        )
        .unwrap();
        assert!(!format!("{v:?}").contains("ciphertext"));
    }

    #[test]
    fn format_errors() {
        assert_eq!(
            EncV1::parse(b"enc:v2:AAAA"),
            Err(FormatError::MissingPrefix)
        );
        assert_eq!(EncV1::parse(b""), Err(FormatError::MissingPrefix));
        assert_eq!(
            EncV1::parse(b"enc:v1:"),
            Err(FormatError::TooShort { len: 0, min: 49 })
        );
        assert_eq!(
            EncV1::parse(b"enc:v1:AQ=="),
            Err(FormatError::TooShort { len: 1, min: 49 })
        );
        assert_eq!(EncV1::parse(b"enc:v1:AQ"), Err(FormatError::InvalidBase64));
        assert_eq!(
            EncV1::parse(b"enc:v1:A Q=="),
            Err(FormatError::InvalidBase64)
        );
        assert_eq!(
            EncV1::parse(b"enc:v1:AR=="),
            Err(FormatError::InvalidBase64)
        );
        let mut bin = vec![0u8; MIN_BINARY_LEN];
        bin[0] = 0x02;
        let text = format!("enc:v1:{}", STANDARD.encode(&bin));
        assert_eq!(
            EncV1::parse(text.as_bytes()),
            Err(FormatError::ReservedAlgorithm { byte: 2 })
        );
        bin[0] = 0xff;
        assert_eq!(
            EncV1::from_binary(bin),
            Err(FormatError::UnknownAlgorithm { byte: 0xff })
        );
    }

    #[test]
    fn mismatches_are_typed() {
        let k = key("public.t.c");
        let text = k.danger_seal_with_nonce(&org("a"), b"x", [3; 12]).unwrap();
        let v = EncV1::parse(text.as_bytes()).unwrap();
        let other_col = key("public.t.d");
        assert!(matches!(
            other_col.open(&org("a"), &v),
            Err(OpenError::ColumnMismatch { .. })
        ));
        let other_dek = ColumnKey::derive(
            &DataKey::from_bytes([7; KEY_LEN]),
            DekId::from_bytes([2; 16]),
            ColumnId::from_name("public.t.c"),
        );
        assert!(matches!(
            other_dek.open(&org("a"), &v),
            Err(OpenError::DekMismatch { .. })
        ));
        assert_eq!(k.open(&org("b"), &v), Err(OpenError::Authentication));
    }

    #[test]
    fn longest_org_fits_aad() {
        let k = key("public.t.c");
        let long = org(&"o".repeat(255));
        let text = k.danger_seal_with_nonce(&long, b"x", [0; 12]).unwrap();
        let v = EncV1::parse(text.as_bytes()).unwrap();
        assert_eq!(k.open(&long, &v).unwrap(), b"x");
    }

    fn org_strategy() -> impl Strategy<Value = OrgId> {
        "[a-zA-Z0-9_-]{1,40}".prop_map(|s| OrgId::new(s).unwrap())
    }

    proptest! {
        #[test]
        fn open_seal_bytes(pt in proptest::collection::vec(any::<u8>(), 0..2048), o in org_strategy()) {
            let k = key("public.t.c");
            let mut nonces = NonceSource::from_os_rng();
            let text = k.seal(&o, &pt, &mut nonces).unwrap();
            let v = EncV1::parse(text.as_bytes()).unwrap();
            prop_assert_eq!(k.open(&o, &v).unwrap(), pt);
        }

        #[test]
        fn open_seal_utf8(pt in any::<String>(), o in org_strategy()) {
            let k = key("public.t.c");
            let mut nonces = NonceSource::from_os_rng();
            let text = k.seal(&o, pt.as_bytes(), &mut nonces).unwrap();
            let v = EncV1::parse(text.as_bytes()).unwrap();
            let opened = String::from_utf8(k.open(&o, &v).unwrap()).unwrap();
            prop_assert_eq!(opened, pt);
        }

        #[test]
        fn any_bit_flip_fails(pt in proptest::collection::vec(any::<u8>(), 0..64), bit in any::<prop::sample::Index>()) {
            let k = key("public.t.c");
            let o = org("acme");
            let text = k.danger_seal_with_nonce(&o, &pt, [9; 12]).unwrap();
            let mut bin = EncV1::parse(text.as_bytes()).unwrap().as_binary().to_vec();
            let i = bit.index(bin.len() * 8);
            bin[i / 8] ^= 1 << (i % 8);
            let reencoded = format!("enc:v1:{}", STANDARD.encode(&bin));
            match EncV1::parse(reencoded.as_bytes()) {
                Err(_) => {}
                Ok(v) => prop_assert!(k.open(&o, &v).is_err()),
            }
        }

        #[test]
        fn wrong_org_or_column_fails(pt in proptest::collection::vec(any::<u8>(), 0..64), a in org_strategy(), b in org_strategy()) {
            prop_assume!(a != b);
            let c = key("public.t.c");
            let d = key("public.t.d");
            let mut nonces = NonceSource::from_os_rng();
            let v = EncV1::parse(c.seal(&a, &pt, &mut nonces).unwrap().as_bytes()).unwrap();
            prop_assert_eq!(c.open(&b, &v), Err(OpenError::Authentication));
            let mismatch = matches!(d.open(&a, &v), Err(OpenError::ColumnMismatch { .. }));
            prop_assert!(mismatch);
            // Same bytes relabelled as column D: the AAD no longer matches.
            let mut bin = v.as_binary().to_vec();
            bin[COLUMN_ID_OFFSET..NONCE_OFFSET].copy_from_slice(&d.column_id().0);
            let forged = EncV1::from_binary(bin).unwrap();
            prop_assert_eq!(d.open(&a, &forged), Err(OpenError::Authentication));
        }

        /// The SIMD decoder on the hot path must accept exactly what the reference decoder
        /// (`base64`, strict: padded, no stray bits) accepts, with the same bytes: valid
        /// encodings with their tails cut and replaced.
        #[test]
        fn simd_base64_agrees_with_the_reference(bin in proptest::collection::vec(any::<u8>(), 0..80), cut in 0usize..4, tail in "[A-Za-z0-9+/=]{0,3}") {
            let encoded = STANDARD.encode(&bin);
            prop_assert_eq!(BASE64.encode_to_string(&bin), encoded.clone());
            let mut text = encoded;
            text.truncate(text.len().saturating_sub(cut));
            text.push_str(&tail);
            prop_assert_eq!(BASE64.decode_to_vec(text.as_bytes()).ok(), STANDARD.decode(&text).ok());
        }

        #[test]
        fn open_owned_equals_open(pt in proptest::collection::vec(any::<u8>(), 0..300), o in org_strategy()) {
            prop_assume!(o.as_str() != "other");
            let k = key("public.t.c");
            let mut nonces = NonceSource::from_os_rng();
            let v = EncV1::parse(k.seal(&o, &pt, &mut nonces).unwrap().as_bytes()).unwrap();
            prop_assert_eq!(k.open(&o, &v).unwrap(), pt.clone());
            prop_assert_eq!(k.open_owned(&o, v.clone()).unwrap(), pt);
            prop_assert_eq!(k.open_owned(&org("other"), v), Err(OpenError::Authentication));
        }

        #[test]
        fn parse_arbitrary_bytes_never_panics(input in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = EncV1::parse(&input);
            let mut prefixed = ENC_V1_PREFIX.to_vec();
            prefixed.extend_from_slice(&input);
            let _ = EncV1::parse(&prefixed);
            let _ = EncV1::from_binary(input);
        }

        #[test]
        fn parse_arbitrary_strings_never_panics(s in "enc:v1:[A-Za-z0-9+/=]{0,120}", t in any::<String>()) {
            if let Ok(v) = EncV1::parse(s.as_bytes()) {
                prop_assert_eq!(v.to_text(), s);
                let _ = key("public.t.c").open(&org("a"), &v);
            }
            let _ = EncV1::parse(t.as_bytes());
        }
    }
}
