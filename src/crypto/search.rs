//! Search terms of searchable columns (`search = "equality"` or `"equality-ci"` in the rules).
//!
//! A searchable value carries, in front of its ordinary envelope, a deterministic *term* of its
//! plaintext: equal plaintexts of one organisation and column have equal terms, so an
//! equality look-up compares terms, and a B-tree index on the first
//! [`SEARCH_PREFIX_CHARS`] characters of the stored text serves it.
//!
//! Construction (pinned by `tests/vectors/enc_v1_search.json`, from an independent Python
//! implementation):
//!
//! * Per organisation a 32-byte *search key* (separate from its DEKs, wrapped by the KEK like a
//!   DEK, unchanged by DEK rotation, destroyed by shred), with a 16-byte id.
//! * Per column a subkey `HKDF-SHA256(ikm = search key, salt = search key id,
//!   info = "pgenvelope/v1/search/" ‖ 4 column-id bytes ‖ mode byte)`, 32 bytes; the mode byte
//!   is `0x01` for `equality`, `0x02` for `equality-ci`.
//! * The term is the first [`TERM_LEN`] (17) bytes of `HMAC-SHA256(subkey, normalised
//!   plaintext)`: 136 bits.
//! * Normalisation: `equality` takes the plaintext's UTF-8 bytes as they are;
//!   `equality-ci` applies Unicode NFC, then Unicode lower-casing (full case mapping,
//!   `str::to_lowercase`), and hashes the UTF-8 bytes of the result. A plaintext that is not
//!   valid UTF-8 is hashed as it is in both modes.
//!
//! The term's text, `"enc:v1:"` ‖ base64(`0x04` ‖ term), is 31 characters long and depends on
//! nothing else, because 18 bytes are exactly 24 base64 characters: it is the first 31
//! characters of every searchable value with that term ([`SearchTerm::prefix_text`]).
//!
//! Pure, like the rest of `crypto`: no I/O, nothing logged, `Debug` prints no term or key.

use std::borrow::Cow;
use std::fmt;

use base64_simd::STANDARD as BASE64;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use unicode_normalization::UnicodeNormalization;
use zeroize::Zeroizing;

use crate::crypto::key::{ColumnId, DataKey, DekId, KEY_LEN};

/// Bytes of a search term.
pub const TERM_LEN: usize = 17;
/// Bytes of a searchable value's search part: the algorithm byte `0x04` and the term.
pub const SEARCH_PART_LEN: usize = 1 + TERM_LEN;
/// Characters of the stored text that hold the term: `enc:v1:` and 24 base64 characters.
/// A look-up compares `left(column, 31)`; an index on that expression serves it.
pub const SEARCH_PREFIX_CHARS: usize = 7 + SEARCH_PART_LEN / 3 * 4;
/// The algorithm byte of a searchable value: a term, then an ordinary `0x01` or `0x03` value.
pub const SEARCHABLE_BYTE: u8 = 0x04;

const HKDF_INFO_LABEL: &[u8] = b"pgenvelope/v1/search/";

/// How a searchable column compares its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SearchMode {
    /// Exact equality of the UTF-8 text.
    Equality,
    /// Equality after NFC normalisation and Unicode lower-casing.
    EqualityCi,
}

impl SearchMode {
    /// The byte in the subkey derivation.
    pub fn byte(self) -> u8 {
        match self {
            Self::Equality => 0x01,
            Self::EqualityCi => 0x02,
        }
    }

    /// The rule file's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Equality => "equality",
            Self::EqualityCi => "equality-ci",
        }
    }

    /// The bytes the term is computed over.
    pub fn normalise(self, plaintext: &[u8]) -> Cow<'_, [u8]> {
        match (self, std::str::from_utf8(plaintext)) {
            (Self::EqualityCi, Ok(s)) => {
                let folded: String = s.nfc().collect::<String>().to_lowercase();
                if folded.as_bytes() == plaintext {
                    Cow::Borrowed(plaintext)
                } else {
                    Cow::Owned(folded.into_bytes())
                }
            }
            _ => Cow::Borrowed(plaintext),
        }
    }
}

impl fmt::Display for SearchMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The search term of one value.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SearchTerm(pub(crate) [u8; TERM_LEN]);

impl SearchTerm {
    /// The raw term bytes.
    pub fn as_bytes(&self) -> &[u8; TERM_LEN] {
        &self.0
    }

    /// The searchable value's binary search part: `0x04` ‖ term.
    pub fn part(&self) -> [u8; SEARCH_PART_LEN] {
        let mut out = [0u8; SEARCH_PART_LEN];
        out[0] = SEARCHABLE_BYTE;
        out[1..].copy_from_slice(&self.0);
        out
    }

    /// The first [`SEARCH_PREFIX_CHARS`] characters of every stored value with this term.
    pub fn prefix_text(&self) -> String {
        let mut out = String::with_capacity(SEARCH_PREFIX_CHARS);
        out.push_str("enc:v1:");
        BASE64.encode_append(self.part(), &mut out);
        out
    }
}

/// Terms are not secret in the way keys are, but they still say which values are equal:
/// `Debug` prints nothing of them.
impl fmt::Debug for SearchTerm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SearchTerm(<redacted>)")
    }
}

/// The term key of one search key for one column and mode: computes terms.
///
/// Holds the subkey, zeroized on drop (not a keyed HMAC state, which the `hmac` crate does
/// not zeroize: the state lives only while one term is computed); `Debug` prints the ids only.
#[derive(Clone)]
pub struct TermKey {
    subkey: Zeroizing<[u8; KEY_LEN]>,
    key_id: DekId,
    column_id: ColumnId,
    mode: SearchMode,
}

impl TermKey {
    /// Derive the column's subkey from the organisation's search key. Do this once per
    /// (search key, column), not per value.
    pub fn derive(
        search_key: &DataKey,
        key_id: DekId,
        column_id: ColumnId,
        mode: SearchMode,
    ) -> Self {
        let hkdf = Hkdf::<Sha256>::new(Some(key_id.as_bytes()), search_key.expose_secret());
        let mut info = [0u8; HKDF_INFO_LABEL.len() + 5];
        info[..HKDF_INFO_LABEL.len()].copy_from_slice(HKDF_INFO_LABEL);
        info[HKDF_INFO_LABEL.len()..HKDF_INFO_LABEL.len() + 4].copy_from_slice(&column_id.0);
        info[HKDF_INFO_LABEL.len() + 4] = mode.byte();
        let mut subkey = Zeroizing::new([0u8; KEY_LEN]);
        hkdf.expand(&info, subkey.as_mut())
            .expect("32 bytes is within HKDF-SHA256's 8160-byte output limit");
        Self {
            subkey,
            key_id,
            column_id,
            mode,
        }
    }

    /// The search key this was derived from.
    pub fn key_id(&self) -> DekId {
        self.key_id
    }

    /// The column.
    pub fn column_id(&self) -> ColumnId {
        self.column_id
    }

    /// The mode.
    pub fn mode(&self) -> SearchMode {
        self.mode
    }

    /// The term of `plaintext` (normalised for the mode first).
    pub fn term(&self, plaintext: &[u8]) -> SearchTerm {
        let normalised = self.mode.normalise(plaintext);
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.subkey.as_ref())
            .expect("HMAC takes a key of any length");
        mac.update(&normalised);
        let digest = mac.finalize().into_bytes();
        let mut out = [0u8; TERM_LEN];
        out.copy_from_slice(&digest[..TERM_LEN]);
        SearchTerm(out)
    }
}

impl fmt::Debug for TermKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TermKey")
            .field("key_id", &self.key_id)
            .field("column_id", &self.column_id)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn key(column: &str, mode: SearchMode) -> TermKey {
        TermKey::derive(
            &DataKey::from_bytes([9; KEY_LEN]),
            DekId::from_bytes([2; 16]),
            ColumnId::from_name(column),
            mode,
        )
    }

    #[test]
    fn prefix_is_31_characters_and_depends_on_the_term_only() {
        assert_eq!(SEARCH_PREFIX_CHARS, 31);
        let k = key("public.customer.email", SearchMode::Equality);
        let t = k.term(b"ada@example.com");
        assert_eq!(t.prefix_text().len(), 31);
        assert_eq!(t, k.term(b"ada@example.com"));
        assert_ne!(t, k.term(b"Ada@example.com"));
    }

    #[test]
    fn terms_are_bound_to_column_mode_and_key() {
        let a = key("public.customer.email", SearchMode::Equality).term(b"x");
        assert_ne!(
            a,
            key("public.customer.other", SearchMode::Equality).term(b"x")
        );
        assert_ne!(
            a,
            key("public.customer.email", SearchMode::EqualityCi).term(b"x")
        );
        let other = TermKey::derive(
            &DataKey::from_bytes([8; KEY_LEN]),
            DekId::from_bytes([2; 16]),
            ColumnId::from_name("public.customer.email"),
            SearchMode::Equality,
        );
        assert_ne!(a, other.term(b"x"));
    }

    #[test]
    fn case_insensitive_mode_folds_case_and_composition() {
        let k = key("public.customer.email", SearchMode::EqualityCi);
        assert_eq!(k.term(b"Ada@Example.COM"), k.term(b"ada@example.com"));
        // "é" precomposed and as e + combining acute.
        assert_eq!(k.term("CAFÉ".as_bytes()), k.term("cafe\u{301}".as_bytes()));
        assert_ne!(k.term(b"ada"), k.term(b"adb"));
        let exact = key("public.customer.email", SearchMode::Equality);
        assert_ne!(exact.term(b"Ada"), exact.term(b"ada"));
    }

    #[test]
    fn debug_prints_no_term() {
        let k = key("public.customer.email", SearchMode::Equality);
        let t = k.term(b"secret");
        assert_eq!(format!("{t:?}"), "SearchTerm(<redacted>)");
        assert!(!format!("{k:?}").contains("subkey"));
    }
}
