//! The AEAD behind the protocol, as one small interface with two backends.
//!
//! * default (feature `ring`): `ring`'s assembly ChaCha20-Poly1305;
//! * `--no-default-features`: the `chacha20poly1305` crate (pure Rust,
//!   RustCrypto), for a build without C or assembly.
//!
//! Both are RFC 8439 ChaCha20-Poly1305, so the wire format is identical and
//! the two interoperate (tested below). `ring` is the default because at
//! the relay's small chunks it costs about a third less CPU than the crate,
//! whose AVX-512 backend calls its rotate intrinsic out of line: with 1 KiB
//! requests through an entry/exit pair, 1.93-2.02 CPU-s per 100k requests
//! against 2.34-2.41 (docs/BENCHMARKS.md, "AEAD build decision").

use super::{ProtoError, TAG_LEN};

/// The 96-bit nonce for counter `n`: little-endian in the first 8 bytes,
/// then four zero bytes.
pub(crate) fn nonce_bytes(n: u64) -> [u8; 12] {
    chunk_nonce(n, 0)
}

/// The nonce of data chunk `n` carrying `len` payload bytes: `n` little-endian
/// in bytes 0..8, `len` big-endian in bytes 8..10, then two zero bytes.
/// Binding the length into the nonce authenticates it at no cost: a receiver
/// that unmasks a different length computes a different nonce, and the tag
/// fails.
pub(crate) fn chunk_nonce(n: u64, len: u16) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..8].copy_from_slice(&n.to_le_bytes());
    b[8..10].copy_from_slice(&len.to_be_bytes());
    b
}

/// Seal and open in place with a detached tag.
pub(crate) trait AeadBackend: Sized {
    /// Name for logs and benchmarks.
    const NAME: &'static str;
    /// A cipher for one 32-byte key.
    fn new(key: &[u8; 32]) -> Self;
    /// Encrypts `buf` in place under `nonce`; returns the tag.
    fn seal(
        &self,
        nonce: [u8; 12],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN], ProtoError>;
    /// Verifies `tag` and decrypts `buf` in place under `nonce`.
    fn open(
        &self,
        nonce: [u8; 12],
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8],
    ) -> Result<(), ProtoError>;
}

/// RustCrypto's `chacha20poly1305`.
#[cfg_attr(feature = "ring", allow(dead_code))]
pub(crate) struct RustCrypto(chacha20poly1305::ChaCha20Poly1305);

impl AeadBackend for RustCrypto {
    const NAME: &'static str = "chacha20poly1305";

    fn new(key: &[u8; 32]) -> Self {
        use chacha20poly1305::KeyInit;
        RustCrypto(chacha20poly1305::ChaCha20Poly1305::new(key.into()))
    }

    fn seal(
        &self,
        nonce: [u8; 12],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN], ProtoError> {
        use chacha20poly1305::aead::AeadInOut;
        let tag = self
            .0
            .encrypt_inout_detached(&nonce.into(), aad, buf.into())
            .map_err(|_| ProtoError::BadTag)?;
        Ok(tag.into())
    }

    fn open(
        &self,
        nonce: [u8; 12],
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8],
    ) -> Result<(), ProtoError> {
        use chacha20poly1305::aead::AeadInOut;
        let tag = chacha20poly1305::Tag::try_from(tag).map_err(|_| ProtoError::BadTag)?;
        self.0
            .decrypt_inout_detached(&nonce.into(), aad, buf.into(), &tag)
            .map_err(|_| ProtoError::BadTag)
    }
}

/// `ring`'s ChaCha20-Poly1305.
#[cfg(feature = "ring")]
pub(crate) struct Ring(ring::aead::LessSafeKey);

#[cfg(feature = "ring")]
impl AeadBackend for Ring {
    const NAME: &'static str = "ring";

    fn new(key: &[u8; 32]) -> Self {
        let unbound = ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, key)
            .expect("32-byte key for ChaCha20-Poly1305");
        Ring(ring::aead::LessSafeKey::new(unbound))
    }

    fn seal(
        &self,
        nonce: [u8; 12],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN], ProtoError> {
        let nonce = ring::aead::Nonce::assume_unique_for_key(nonce);
        let tag = self
            .0
            .seal_in_place_separate_tag(nonce, ring::aead::Aad::from(aad), buf)
            .map_err(|_| ProtoError::BadTag)?;
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        Ok(out)
    }

    fn open(
        &self,
        nonce: [u8; 12],
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8],
    ) -> Result<(), ProtoError> {
        let nonce = ring::aead::Nonce::assume_unique_for_key(nonce);
        let tag = ring::aead::Tag::try_from(tag).map_err(|_| ProtoError::BadTag)?;
        self.0
            .open_in_place_separate_tag(nonce, ring::aead::Aad::from(aad), tag, buf, 0..)
            .map(|_| ())
            .map_err(|_| ProtoError::BadTag)
    }
}

/// The backend this build uses.
#[cfg(not(feature = "ring"))]
pub(crate) type Aead = RustCrypto;
/// The backend this build uses.
#[cfg(feature = "ring")]
pub(crate) type Aead = Ring;

/// The name of the AEAD backend compiled in.
pub fn backend_name() -> &'static str {
    Aead::NAME
}

#[cfg(all(test, feature = "ring"))]
mod tests {
    use super::*;

    /// The two backends are the same RFC 8439 AEAD: what one seals, the
    /// other opens, and a flipped bit fails in both.
    #[test]
    fn the_backends_interoperate() {
        let key = [7u8; 32];
        let (a, b) = (RustCrypto::new(&key), Ring::new(&key));
        for len in [0usize, 1, 63, 64, 1024, 16384] {
            let plain: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let nonce = chunk_nonce(len as u64, len as u16);
            let mut x = plain.clone();
            let tag = a.seal(nonce, b"ad", &mut x).unwrap();
            let mut y = plain.clone();
            assert_eq!(b.seal(nonce, b"ad", &mut y).unwrap(), tag);
            assert_eq!(x, y, "same ciphertext");
            b.open(nonce, b"ad", &mut x, &tag).unwrap();
            a.open(nonce, b"ad", &mut y, &tag).unwrap();
            assert_eq!((&x, &y), (&plain, &plain));
            let mut bad = tag;
            bad[0] ^= 1;
            assert_eq!(
                a.open(nonce, b"ad", &mut x.clone(), &bad),
                Err(ProtoError::BadTag)
            );
            assert_eq!(
                b.open(nonce, b"ad", &mut y.clone(), &bad),
                Err(ProtoError::BadTag)
            );
        }
    }
}
