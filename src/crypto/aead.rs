//! The one place that calls AES-256-GCM: a thin wrapper over the RustCrypto `aes-gcm` AEAD.
//!
//! Everything above this module speaks in terms of [`Aead256`]; the Wycheproof known-answer tests
//! at the bottom run through the same two functions the envelope format uses, so a change of
//! primitive or crate shows up there first.
//!
//! Invariant: key bytes never outlive construction here; the cipher state zeroizes on drop
//! (the `zeroize` features of `aes`, `ghash` and `polyval` are turned on in `Cargo.toml`).

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};

use crate::crypto::key::KEY_LEN;

/// Length of a GCM nonce (96 bits).
pub const NONCE_LEN: usize = 12;

/// Length of a GCM tag (128 bits).
pub const TAG_LEN: usize = 16;

/// Largest plaintext we hand to GCM: PostgreSQL's 1 GiB field limit, far below GCM's own
/// 2^36 - 32 bytes, so sealing cannot fail on length once this is checked.
pub const MAX_PLAINTEXT_LEN: usize = 1 << 30;

/// A ready AES-256-GCM cipher (expanded key schedule and GHASH key).
#[derive(Clone)]
pub(crate) struct Aead256 {
    cipher: Aes256Gcm,
}

/// Encryption or decryption failed; deliberately carries no detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AeadFailure;

impl Aead256 {
    /// Expand a 32-byte key.
    pub(crate) fn new(key: &[u8; KEY_LEN]) -> Self {
        Self {
            cipher: Aes256Gcm::new(key.into()),
        }
    }

    /// Encrypt `buf` in place and return the detached tag.
    ///
    /// Fails only when `buf` is longer than GCM allows, which callers rule out by checking
    /// [`MAX_PLAINTEXT_LEN`] first.
    pub(crate) fn seal_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN], AeadFailure> {
        let tag = self
            .cipher
            .encrypt_in_place_detached(Nonce::from_slice(nonce), aad, buf)
            .map_err(|_| AeadFailure)?;
        Ok(tag.into())
    }

    /// Verify `tag` and decrypt `buf` in place. On failure `buf` is left encrypted.
    pub(crate) fn open_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), AeadFailure> {
        self.cipher
            .decrypt_in_place_detached(Nonce::from_slice(nonce), aad, buf, Tag::from_slice(tag))
            .map_err(|_| AeadFailure)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use wycheproof::aead::{TestName, TestSet};
    use wycheproof::TestResult;

    use super::*;

    /// Every Wycheproof AES-GCM case our parameters can express (256-bit key, 96-bit nonce,
    /// 128-bit tag) must give the expected answer through our wrapper.
    #[test]
    fn wycheproof_aes_256_gcm() {
        let set = TestSet::load(TestName::AesGcm).unwrap();
        let mut ran = 0usize;
        for group in set.test_groups {
            if group.key_size != 256 || group.nonce_size != 96 || group.tag_size != 128 {
                continue;
            }
            for t in group.tests {
                let key: [u8; KEY_LEN] = t.key.as_slice().try_into().unwrap();
                let nonce: [u8; NONCE_LEN] = t.nonce.as_slice().try_into().unwrap();
                let tag: [u8; TAG_LEN] = t.tag.as_slice().try_into().unwrap();
                let aead = Aead256::new(&key);

                let mut buf = t.ct.to_vec();
                let opened = aead.open_in_place(&nonce, &t.aad, &mut buf, &tag);
                match t.result {
                    TestResult::Valid | TestResult::Acceptable => {
                        assert!(opened.is_ok(), "tc {} should open", t.tc_id);
                        assert_eq!(buf, t.pt.to_vec(), "tc {} plaintext", t.tc_id);
                        let mut buf = t.pt.to_vec();
                        let sealed = aead.seal_in_place(&nonce, &t.aad, &mut buf).unwrap();
                        assert_eq!(buf, t.ct.to_vec(), "tc {} ciphertext", t.tc_id);
                        assert_eq!(sealed, tag, "tc {} tag", t.tc_id);
                    }
                    TestResult::Invalid => {
                        assert!(opened.is_err(), "tc {} must fail", t.tc_id);
                    }
                }
                ran += 1;
            }
        }
        assert!(
            ran > 50,
            "only {ran} Wycheproof cases matched our parameters"
        );
    }

    /// NIST GCM test vectors (gcmEncryptExtIV256.rsp), AES-256, 96-bit IV, 128-bit tag.
    #[test]
    fn nist_gcm_256() {
        struct V {
            key: &'static str,
            iv: &'static str,
            pt: &'static str,
            aad: &'static str,
            ct: &'static str,
            tag: &'static str,
        }
        let vectors = [
            // Count 0, PTlen 0, AADlen 0
            V {
                key: "b52c505a37d78eda5dd34f20c22540ea1b58963cf8e5bf8ffa85f9f2492505b4",
                iv: "516c33929df5a3284ff463d7",
                pt: "",
                aad: "",
                ct: "",
                tag: "bdc1ac884d332457a1d2664f168c76f0",
            },
            // The Test Case 16 of the original GCM specification (McGrew & Viega).
            V {
                key: "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
                iv: "cafebabefacedbaddecaf888",
                pt: "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
                aad: "feedfacedeadbeeffeedfacedeadbeefabaddad2",
                ct: "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662",
                tag: "76fc6ece0f4e1768cddf8853bb2d551b",
            },
            // Test Case 14: 16 zero bytes under the zero key.
            V {
                key: "0000000000000000000000000000000000000000000000000000000000000000",
                iv: "000000000000000000000000",
                pt: "00000000000000000000000000000000",
                aad: "",
                ct: "cea7403d4d606b6e074ec5d3baf39d18",
                tag: "d0d1c8a799996bf0265b98b5d48ab919",
            },
        ];
        for v in vectors {
            let key: [u8; KEY_LEN] = hex(v.key).try_into().unwrap();
            let nonce: [u8; NONCE_LEN] = hex(v.iv).try_into().unwrap();
            let aead = Aead256::new(&key);
            let mut buf = hex(v.pt);
            let tag = aead.seal_in_place(&nonce, &hex(v.aad), &mut buf).unwrap();
            assert_eq!(buf, hex(v.ct));
            assert_eq!(tag.to_vec(), hex(v.tag));
            aead.open_in_place(&nonce, &hex(v.aad), &mut buf, &tag)
                .unwrap();
            assert_eq!(buf, hex(v.pt));
        }
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }
}
