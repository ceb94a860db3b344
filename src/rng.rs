//! Per-shard salt generator, so that a connection costs no `getrandom(2)`.
//!
//! A ChaCha20 keystream under a 256-bit key from the OS, with a zero nonce
//! (the construction of `rand_chacha`'s `ChaCha20Rng`, RFC 8439 §2.4 for the
//! cipher), rekeyed from the OS every 2^20 salts (32 MiB of keystream, far
//! below ChaCha20's 256 GiB per key and nonce). Salts are public; what they
//! need is to be unpredictable and never repeat, which a fresh OS key per
//! 2^20 salts gives. The key is wiped when replaced (the `zeroize` feature
//! of `chacha20`). Each shard owns one; nothing is shared across cores.

use chacha20::cipher::{KeyIvInit, StreamCipher};
use chacha20::ChaCha20;

use crate::proto::SALT_LEN;

/// Salts drawn from one key before the generator rekeys from the OS.
const SALTS_PER_KEY: u32 = 1 << 20;

/// A per-shard source of random salts.
#[derive(Default)]
pub struct SaltRng {
    cipher: Option<ChaCha20>,
    left: u32,
}

impl SaltRng {
    /// A generator that keys itself from the OS on first use.
    pub fn new() -> Self {
        Self::default()
    }

    /// 32 fresh random bytes. Errors only when the OS has no randomness to
    /// give for a new key.
    pub fn salt(&mut self) -> Result<[u8; SALT_LEN], getrandom::Error> {
        if self.left == 0 || self.cipher.is_none() {
            let mut key = zeroize::Zeroizing::new([0u8; 32]);
            getrandom::fill(&mut key[..])?;
            self.cipher = Some(ChaCha20::new((&*key).into(), &[0u8; 12].into()));
            self.left = SALTS_PER_KEY;
        }
        let mut salt = [0u8; SALT_LEN];
        if let Some(c) = self.cipher.as_mut() {
            c.apply_keystream(&mut salt);
        }
        self.left -= 1;
        Ok(salt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn salts_differ_and_rekey() {
        let mut rng = SaltRng::new();
        let a = rng.salt().unwrap();
        let b = rng.salt().unwrap();
        assert_ne!(a, b);
        assert_ne!(a, [0u8; SALT_LEN]);
        // Two generators never start alike (independent OS keys).
        assert_ne!(SaltRng::new().salt().unwrap(), a);
        rng.left = 1;
        let _ = rng.salt().unwrap();
        assert_eq!(rng.left, 0);
        let _ = rng.salt().unwrap();
        assert_eq!(rng.left, SALTS_PER_KEY - 1, "rekeyed");
    }
}
