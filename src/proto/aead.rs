//! The AEAD behind the protocol, as one small interface with three backends.
//!
//! * default (features `ring` and `openssl`): chunks of at least
//!   [`LARGE_CHUNK`] bytes go through OpenSSL's libcrypto (3.0 or later),
//!   smaller ones (hellos, requests, the end chunk) through `ring`
//!   ([`SizeSplit`]);
//! * feature `ring` alone: `ring`'s assembly ChaCha20-Poly1305 for all;
//! * `--no-default-features`: the `chacha20poly1305` crate (pure Rust,
//!   RustCrypto), for a build without C or assembly.
//!
//! All are RFC 8439 ChaCha20-Poly1305, so the wire format is identical and
//! they interoperate (tested below). Why two libraries by size: OpenSSL has
//! AVX-512 (and AVX-512 IFMA Poly1305) code that `ring` lacks, 1.5x the
//! seal+open rate at 16 KiB on an AVX-512 server (1.95 against 1.31 GB/s),
//! but its `EVP` calls cost about a microsecond each, so below 2 KiB `ring`
//! is faster (1 KiB: 1.00 against 0.72 GB/s). docs/BENCHMARKS.md ("AEAD build
//! decision") has the run. `ring` is the default because at
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

/// The backend for chunks below [`LARGE_CHUNK`] (all chunks without the
/// `openssl` feature).
#[cfg(not(feature = "ring"))]
type Small = RustCrypto;
/// The backend for chunks below [`LARGE_CHUNK`] (all chunks without the
/// `openssl` feature).
#[cfg(feature = "ring")]
type Small = Ring;

/// The backend this build uses.
#[cfg(not(feature = "openssl"))]
pub(crate) type Aead = Small;
/// The backend this build uses.
#[cfg(feature = "openssl")]
pub(crate) type Aead = SizeSplit;

/// Buffers of at least this many bytes are sealed and opened by OpenSSL,
/// smaller ones by the small backend. Measured crossover (seal+open, one
/// core, `ring` against OpenSSL 3.0): 2 KiB 1.14 against 1.10 GB/s, 4 KiB
/// 1.23 against 1.49 GB/s.
#[cfg(feature = "openssl")]
pub(crate) const LARGE_CHUNK: usize = 2048;

/// `ring` (or the pure-Rust crate) for small buffers, OpenSSL for large
/// ones: one key, two implementations of the same RFC 8439 AEAD. The OpenSSL
/// context is made on the first large buffer, so connections that only
/// ever carry small chunks (and idle ones) never allocate it. Should
/// OpenSSL fail to set up (no ChaCha20-Poly1305 in its default provider, or
/// out of memory), the small backend does the work instead.
#[cfg(feature = "openssl")]
pub(crate) struct SizeSplit {
    small: Small,
    large: OpenSsl,
}

#[cfg(feature = "openssl")]
impl AeadBackend for SizeSplit {
    #[cfg(feature = "ring")]
    const NAME: &'static str = "ring+openssl";
    #[cfg(not(feature = "ring"))]
    const NAME: &'static str = "chacha20poly1305+openssl";

    fn new(key: &[u8; 32]) -> Self {
        SizeSplit {
            small: Small::new(key),
            large: OpenSsl::new(key),
        }
    }

    fn seal(
        &self,
        nonce: [u8; 12],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN], ProtoError> {
        if buf.len() >= LARGE_CHUNK {
            if let Some(sealed) = self.large.seal(nonce, aad, buf) {
                return sealed;
            }
        }
        self.small.seal(nonce, aad, buf)
    }

    fn open(
        &self,
        nonce: [u8; 12],
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8],
    ) -> Result<(), ProtoError> {
        if buf.len() >= LARGE_CHUNK {
            if let Some(done) = self.large.open(nonce, aad, buf, tag) {
                return done;
            }
        }
        self.small.open(nonce, aad, buf, tag)
    }
}

#[cfg(feature = "openssl")]
thread_local! {
    /// This thread's ChaCha20-Poly1305 from OpenSSL's default provider,
    /// fetched once: giving a context the built-in (legacy) cipher object
    /// instead would fetch it again for every context, under a lock that
    /// all threads share (OpenSSL 3 `EVP_CIPHER_fetch`). `None` if the
    /// provider has no such cipher.
    static OPENSSL_CHACHA: Option<openssl::cipher::Cipher> =
        openssl::cipher::Cipher::fetch(None, "ChaCha20-Poly1305", None).ok();
}

/// OpenSSL's ChaCha20-Poly1305 through `EVP_CIPHER_CTX` (libcrypto 3.0 or
/// later), for one key. Its methods return `None` when OpenSSL could not set
/// up a context; the buffer is then untouched and the caller uses another
/// backend.
#[cfg(feature = "openssl")]
pub(crate) struct OpenSsl {
    key: zeroize::Zeroizing<[u8; 32]>,
    /// The context, made on first use, and whether it was set up to seal
    /// (true) or open. OpenSSL wipes its copy of the key when it is freed.
    ctx: std::cell::RefCell<Option<(openssl::cipher_ctx::CipherCtx, bool)>>,
}

#[cfg(feature = "openssl")]
impl OpenSsl {
    pub(crate) fn new(key: &[u8; 32]) -> Self {
        OpenSsl {
            key: zeroize::Zeroizing::new(*key),
            ctx: std::cell::RefCell::new(None),
        }
    }

    /// Sets the context up for `sealing` (or opening) under `nonce`.
    fn start(
        &self,
        slot: &mut Option<(openssl::cipher_ctx::CipherCtx, bool)>,
        sealing: bool,
        nonce: &[u8; 12],
    ) -> Option<()> {
        if !matches!(slot, Some((_, s)) if *s == sealing) {
            let mut ctx = openssl::cipher_ctx::CipherCtx::new().ok()?;
            OPENSSL_CHACHA.with(|cipher| {
                let cipher = cipher.as_ref()?;
                if sealing {
                    ctx.encrypt_init(Some(cipher), Some(&self.key[..]), None)
                } else {
                    ctx.decrypt_init(Some(cipher), Some(&self.key[..]), None)
                }
                .ok()
            })?;
            *slot = Some((ctx, sealing));
        }
        let (ctx, _) = slot.as_mut()?;
        if sealing {
            ctx.encrypt_init(None, None, Some(nonce)).ok()
        } else {
            ctx.decrypt_init(None, None, Some(nonce)).ok()
        }
    }

    /// Runs one seal (`sealing`) or open over `buf` under `nonce`, with
    /// `aad`: the context's set-up, the associated data and the in-place
    /// update, then `finish` (tag out, or tag in and check). `None` when the
    /// context could not be set up (`buf` untouched). On an error `buf` is
    /// zeroed, never left half sealed or as unauthenticated plaintext, and
    /// the next call makes a fresh context.
    fn crypt<T>(
        &self,
        sealing: bool,
        nonce: &[u8; 12],
        aad: &[u8],
        buf: &mut [u8],
        finish: impl FnOnce(
            &mut openssl::cipher_ctx::CipherCtxRef,
        ) -> Result<T, openssl::error::ErrorStack>,
    ) -> Option<Result<T, openssl::error::ErrorStack>> {
        let mut slot = self.ctx.borrow_mut();
        self.start(&mut slot, sealing, nonce)?;
        let (ctx, _) = slot.as_mut()?;
        let run = || {
            if !aad.is_empty() {
                ctx.cipher_update(aad, None)?;
            }
            let len = buf.len();
            ctx.cipher_update_inplace(buf, len)?;
            finish(ctx)
        };
        let done = run();
        if done.is_err() {
            *slot = None;
            buf.fill(0);
        }
        Some(done)
    }

    /// Encrypts `buf` in place; returns the tag. `Some(Err)` when OpenSSL
    /// failed part way: `buf` is then zeroed (part of it may already be
    /// ciphertext, so no backend can seal it again).
    pub(crate) fn seal(
        &self,
        nonce: [u8; 12],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Option<Result<[u8; TAG_LEN], ProtoError>> {
        let sealed = self.crypt(true, &nonce, aad, buf, |ctx| {
            ctx.cipher_final(&mut [])?;
            let mut tag = [0u8; TAG_LEN];
            ctx.tag(&mut tag)?;
            Ok(tag)
        })?;
        Some(sealed.map_err(|_| ProtoError::SealFailed))
    }

    /// Verifies `tag` and decrypts `buf` in place. `Some(Err)` when the tag
    /// does not verify; `buf` is then zeroed, never left as unauthenticated
    /// plaintext.
    pub(crate) fn open(
        &self,
        nonce: [u8; 12],
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8],
    ) -> Option<Result<(), ProtoError>> {
        if tag.len() != TAG_LEN {
            return Some(Err(ProtoError::BadTag));
        }
        let opened = self.crypt(false, &nonce, aad, buf, |ctx| {
            ctx.set_tag(tag)?;
            ctx.cipher_final(&mut []).map(|_| ())
        })?;
        Some(opened.map_err(|_| ProtoError::BadTag))
    }
}

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

    /// OpenSSL, alone and behind the size split, is the same AEAD as
    /// `ring`, at sizes on both sides of the split, with and without
    /// associated data; one instance may seal, then open, then seal again;
    /// and a buffer whose tag fails is zeroed, never left as unauthenticated
    /// plaintext.
    #[cfg(feature = "openssl")]
    #[test]
    fn openssl_and_the_size_split_match_ring() {
        let key = [9u8; 32];
        let ring = Ring::new(&key);
        let ossl = OpenSsl::new(&key);
        let split = SizeSplit::new(&key);
        for len in [0usize, 1, 1024, LARGE_CHUNK - 1, LARGE_CHUNK, 16384, 65536] {
            for aad in [&b""[..], &b"associated"[..]] {
                let plain: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
                let nonce = chunk_nonce(len as u64 + 3, len as u16);
                let mut want = plain.clone();
                let tag = ring.seal(nonce, aad, &mut want).unwrap();
                let mut x = plain.clone();
                assert_eq!(ossl.seal(nonce, aad, &mut x), Some(Ok(tag)), "len {len}");
                assert_eq!(x, want);
                let mut y = plain.clone();
                assert_eq!(split.seal(nonce, aad, &mut y), Ok(tag));
                assert_eq!(y, want);
                assert_eq!(ossl.open(nonce, aad, &mut x, &tag), Some(Ok(())));
                assert_eq!(split.open(nonce, aad, &mut y, &tag), Ok(()));
                assert_eq!((&x, &y), (&plain, &plain));

                let mut bad = tag;
                bad[15] ^= 0x80;
                let mut z = want.clone();
                assert_eq!(
                    ossl.open(nonce, aad, &mut z, &bad),
                    Some(Err(ProtoError::BadTag))
                );
                assert!(z.iter().all(|&b| b == 0), "a failed open is zeroed");
                let mut z = want.clone();
                assert_eq!(
                    split.open(nonce, aad, &mut z, &bad),
                    Err(ProtoError::BadTag)
                );
                let mut flipped = want.clone();
                if let Some(b) = flipped.last_mut() {
                    *b ^= 1;
                    assert_eq!(
                        split.open(nonce, aad, &mut flipped, &tag),
                        Err(ProtoError::BadTag)
                    );
                }
                assert_eq!(
                    ossl.open(nonce, aad, &mut want.clone(), &tag[..8]),
                    Some(Err(ProtoError::BadTag)),
                    "a short tag is a bad tag"
                );
            }
        }
    }
}
