//! Random 96-bit GCM nonces from a user-space CSPRNG.
//!
//! # Per-key message limit
//!
//! With random 96-bit nonces, NIST SP 800-38D §8.3 allows at most **2^32 invocations of the
//! authenticated encryption function per key**, which keeps the probability of any nonce
//! repeating below 2^-32. A repeated nonce under one key loses confidentiality of both messages
//! and lets an attacker forge tags, so the limit is a hard one.
//!
//! Each enc:v1 value is sealed under a per-column subkey of a DEK, so the limit applies per
//! (DEK, column). We count conservatively **per DEK** (all columns together): the key store keeps
//! an `encryptions` counter on every DEK and rotates to a new DEK once it reaches
//! [`ROTATE_DEK_AFTER`], well before [`MAX_RANDOM_NONCES_PER_KEY`]. Rotation does not re-encrypt
//! anything: the old DEK stays available for decryption.
//!
//! # Generator
//!
//! [`NonceSource`] is ChaCha20 (`rand_chacha`) seeded once from the operating system's RNG, so
//! drawing a nonce is a few nanoseconds and no system call. It is deliberately not `Clone`: two
//! copies of one generator would produce the same nonces.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::crypto::aead::NONCE_LEN;

/// NIST SP 800-38D limit on encryptions with random 96-bit nonces under one key.
pub const MAX_RANDOM_NONCES_PER_KEY: u64 = 1 << 32;

/// Encryptions after which a DEK is rotated by default: half of [`MAX_RANDOM_NONCES_PER_KEY`], so
/// a counter that lags behind (several proxies, batched counter updates) still stays far from
/// the limit. Configurable (`--rotate-after-encryptions`).
pub const ROTATE_DEK_AFTER: u64 = 1 << 31;

/// A source of random GCM nonces; one per connection or per worker, never shared by copying.
pub struct NonceSource {
    rng: ChaCha20Rng,
}

impl NonceSource {
    /// A generator seeded from the operating system's RNG.
    ///
    /// Panics if the operating system cannot provide randomness: nothing may be sealed then.
    pub fn from_os_rng() -> Self {
        Self {
            rng: ChaCha20Rng::from_seed(os_seed()),
        }
    }

    /// The next 96-bit nonce.
    pub fn next_nonce(&mut self) -> [u8; NONCE_LEN] {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill_bytes(&mut nonce);
        nonce
    }
}

impl Default for NonceSource {
    fn default() -> Self {
        Self::from_os_rng()
    }
}

impl std::fmt::Debug for NonceSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NonceSource { .. }")
    }
}

/// 32 bytes from the OS RNG; the seed is moved into the generator and this copy dropped.
fn os_seed() -> [u8; 32] {
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    seed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_differ() {
        let mut a = NonceSource::from_os_rng();
        let mut b = NonceSource::from_os_rng();
        let n = a.next_nonce();
        assert_ne!(n, a.next_nonce());
        assert_ne!(n, b.next_nonce());
    }

    #[test]
    fn debug_shows_no_state() {
        assert_eq!(
            format!("{:?}", NonceSource::from_os_rng()),
            "NonceSource { .. }"
        );
    }
}
