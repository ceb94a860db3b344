//! Chunk framing.
//!
//! ```text
//!   +-------------+----------------------------------------+---------+
//!   | enc_len (2) | AEAD(data_key, nonce(n, len), payload)  | tag(16) |
//!   +-------------+----------------------------------------+---------+
//!   enc_len     = u16_be(len) XOR mask(n)
//!   mask(n)     = bytes 2(n mod 512) .. +2 of ChaCha20(length_key, nonce(n div 512))
//!   nonce(n, l) = n (LE, 8 bytes) ‖ l (BE, 2 bytes) ‖ 00 00
//! ```
//!
//! One AEAD operation per chunk, with no associated data. The length is
//! masked, so an observer cannot find chunk boundaries, and it is bound into
//! the nonce, so it is authenticated: a receiver that unmasks a different
//! length computes a different nonce and the tag fails. A receiver unmasks
//! the length, rejects anything above its maximum ([`MAX_PAYLOAD`], or
//! [`LARGE_PAYLOAD`] once the hellos agreed on large chunks) at once, waits for
//! exactly one chunk, and only then verifies; a forged length costs it at
//! most one chunk of buffer. `len = 0` is the authenticated end of stream.
//!
//! Why this shape, measured in `benches/proto.rs`: with the
//! `chacha20poly1305` crate, a separate AEAD for the length (shadowsocks
//! style) cost 8-35% of the payload AEAD; the length as associated data cost
//! 9-18% (it misaligns Poly1305's wide path); the length inside the sealed
//! plaintext pushed 1 KiB and 16 KiB payloads one block past the SIMD batch
//! (up to 27% at 1 KiB); and a ChaCha20 call per 2-byte mask cost 120-380 ns,
//! so masks are made 32 at a time, one 64-byte ChaCha20 block per call.
//!
//! Both directions work in place on the caller's buffer and never allocate.

use chacha20::cipher::{KeyIvInit, StreamCipher};
use chacha20::ChaCha20;
use zeroize::Zeroizing;

use super::aead::{chunk_nonce, nonce_bytes, Aead, AeadBackend};

use super::{
    ProtoError, CONFIRM_FIELD, CONFIRM_LEN, END_LEN, LARGE_PAYLOAD, LEN_LEN, MAX_PAYLOAD,
    NONCE_LIMIT, TAG_LEN,
};

/// Length masks per ChaCha20 nonce (two bytes each): chunk `n`'s mask is in
/// the keystream of nonce `n div 512`. Part of the wire format.
pub const MASKS_PER_BLOCK: u64 = 512;

/// Length masks made at a time: one 64-byte ChaCha20 block (RFC 8439 §2.3).
/// Made lazily, a block when the first chunk that needs it comes: a
/// short-lived connection makes one block per direction instead of a whole
/// 1 KiB keystream (four per tunnelled connection, about 1% of the
/// entry+exit pair's CPU under connection churn), and a direction keeps 64
/// bytes of masks instead of 1 KiB. At one ChaCha20 call per 32 chunks, the
/// per-call cost noted above stays out of the per-chunk cost.
const MASKS_PER_FILL: u64 = 32;

/// The two keys of one direction.
pub(crate) struct DirKeys {
    /// Makes the length masks (plain ChaCha20).
    pub len_key: Zeroizing<[u8; 32]>,
    /// Seals the payload.
    pub aead: Aead,
}

/// Length masks for one direction, made [`MASKS_PER_FILL`] at a time.
struct Masks {
    key: Zeroizing<[u8; 32]>,
    /// Which run of [`MASKS_PER_FILL`] chunks `stream` holds (`n div 32`;
    /// `u64::MAX`: none yet).
    fill: u64,
    stream: [u8; 2 * MASKS_PER_FILL as usize],
}

impl Masks {
    fn new(key: Zeroizing<[u8; 32]>) -> Self {
        Masks {
            key,
            fill: u64::MAX,
            stream: [0; 2 * MASKS_PER_FILL as usize],
        }
    }

    /// XORs `field` with the mask of chunk `n`: bytes `2(n mod 512)..+2` of
    /// ChaCha20(length key, nonce(n div 512)).
    fn apply(&mut self, n: u64, field: &mut [u8; LEN_LEN]) {
        use chacha20::cipher::StreamCipherSeek;
        let fill = n / MASKS_PER_FILL;
        if fill != self.fill {
            let group = n / MASKS_PER_BLOCK;
            let mut c = ChaCha20::new((&*self.key).into(), &nonce_bytes(group).into());
            // The run's offset in its group's keystream: whole blocks, so
            // the seek never fails.
            let offset = (n % MASKS_PER_BLOCK) / MASKS_PER_FILL * 2 * MASKS_PER_FILL;
            c.seek(offset);
            self.stream = [0; 2 * MASKS_PER_FILL as usize];
            c.apply_keystream(&mut self.stream);
            self.fill = fill;
        }
        let at = 2 * (n % MASKS_PER_FILL) as usize;
        field[0] ^= self.stream[at];
        field[1] ^= self.stream[at + 1];
    }
}

/// A per-direction nonce counter with a hard limit.
struct Counter {
    next: u64,
    limit: u64,
}

impl Counter {
    /// Takes the next nonce. Never wraps, never passes the limit.
    fn take(&mut self) -> Result<u64, ProtoError> {
        if self.next >= self.limit {
            return Err(ProtoError::NonceExhausted);
        }
        let n = self.next;
        self.next += 1;
        Ok(n)
    }
}

/// Seals plaintext into chunks for one direction.
pub struct Encoder {
    aead: Aead,
    masks: Masks,
    counter: Counter,
    ended: bool,
    /// Largest payload the peer accepts: [`MAX_PAYLOAD`] or [`LARGE_PAYLOAD`].
    max: usize,
}

impl Encoder {
    pub(crate) fn new(keys: DirKeys) -> Self {
        Encoder {
            aead: keys.aead,
            masks: Masks::new(keys.len_key),
            counter: Counter {
                next: 0,
                limit: NONCE_LIMIT,
            },
            ended: false,
            max: MAX_PAYLOAD,
        }
    }

    /// The peer accepts chunks of up to [`LARGE_PAYLOAD`] bytes (both hellos
    /// agreed, docs/PROTOCOL.md §4).
    pub(crate) fn allow_large(&mut self) {
        self.max = LARGE_PAYLOAD;
    }

    /// Largest payload one chunk may carry, in bytes: [`MAX_PAYLOAD`], or
    /// [`LARGE_PAYLOAD`] once both hellos agreed on large chunks.
    pub fn max_payload(&self) -> usize {
        self.max
    }

    #[cfg(any(test, fuzzing))]
    /// Test hook: start the counter near a chosen limit.
    #[doc(hidden)]
    pub fn set_nonce_window(&mut self, next: u64, limit: u64) {
        self.counter = Counter { next, limit };
    }

    /// Seals the `len` payload bytes already placed at
    /// `frame[LEN_LEN..LEN_LEN + len]`, writing the lengths in front
    /// and the tag behind. Returns the chunk's length on the wire.
    ///
    /// Callers guarantee `1 <= len <= self.max_payload()` and room for the
    /// chunk.
    pub fn seal_in_place(&mut self, frame: &mut [u8], len: usize) -> Result<usize, ProtoError> {
        assert!((1..=self.max).contains(&len), "payload length {len}");
        assert!(!self.ended, "seal after end of stream");
        let total = LEN_LEN + len + TAG_LEN;
        self.seal(&mut frame[..total], len)?;
        Ok(total)
    }

    /// After the end chunk, on a keep-alive tunnel (docs/PROTOCOL.md §4.1):
    /// the next session goes on with the same keys and counter.
    ///
    /// Panics if the end chunk was not sealed: only a session boundary
    /// allows this.
    pub fn next_session(&mut self) {
        assert!(self.ended, "next session before the end chunk");
        self.ended = false;
    }

    /// Seals the authenticated end of stream.
    pub fn seal_end(&mut self, out: &mut [u8; END_LEN]) -> Result<(), ProtoError> {
        self.ended = true;
        self.seal(out, 0)
    }

    /// Seals the key-confirmation chunk: the entry's first chunk (n = 0),
    /// sent as soon as the server hello verified (docs/PROTOCOL.md §4).
    pub fn seal_confirm(&mut self, out: &mut [u8; CONFIRM_LEN]) -> Result<(), ProtoError> {
        assert_eq!(self.counter.next, 0, "the confirmation is the first chunk");
        let n = self.counter.take()?;
        let mut field = CONFIRM_FIELD.to_be_bytes();
        self.masks.apply(n, &mut field);
        out[..LEN_LEN].copy_from_slice(&field);
        let tag = self
            .aead
            .seal(chunk_nonce(n, CONFIRM_FIELD), &[], &mut [])?;
        out[LEN_LEN..].copy_from_slice(&tag);
        Ok(())
    }

    fn seal(&mut self, chunk: &mut [u8], len: usize) -> Result<(), ProtoError> {
        let n = self.counter.take()?;
        let mut field = (len as u16).to_be_bytes();
        self.masks.apply(n, &mut field);
        let (head, rest) = chunk.split_at_mut(LEN_LEN);
        head.copy_from_slice(&field);
        let (body, tag) = rest.split_at_mut(len);
        tag.copy_from_slice(&self.aead.seal(chunk_nonce(n, len as u16), &[], body)?);
        Ok(())
    }

    #[cfg(any(test, fuzzing))]
    /// Test hook: masks an arbitrary length for the next chunk, as a forger
    /// holding the length key could, without sealing anything.
    #[doc(hidden)]
    pub fn forge_length(&mut self, len: u16) -> [u8; LEN_LEN] {
        let mut field = len.to_be_bytes();
        self.masks.apply(self.counter.next, &mut field);
        field
    }

    #[cfg(any(test, fuzzing))]
    /// Convenience for tests and tools: seals `data` (split into chunks)
    /// and appends the chunks to `out`.
    pub fn seal_to_vec(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), ProtoError> {
        let mut frame = vec![0u8; LEN_LEN + self.max + TAG_LEN];
        for chunk in data.chunks(self.max) {
            frame[LEN_LEN..LEN_LEN + chunk.len()].copy_from_slice(chunk);
            let n = self.seal_in_place(&mut frame, chunk.len())?;
            out.extend_from_slice(&frame[..n]);
        }
        Ok(())
    }

    #[cfg(any(test, fuzzing))]
    /// Convenience: appends the end-of-stream chunk to `out`.
    pub fn end_to_vec(&mut self, out: &mut Vec<u8>) -> Result<(), ProtoError> {
        let mut end = [0u8; END_LEN];
        self.seal_end(&mut end)?;
        out.extend_from_slice(&end);
        Ok(())
    }
}

/// The result of one [`Decoder::decode`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    /// Not a whole chunk yet: read more bytes and call again with all
    /// unconsumed input. Nothing was consumed.
    NeedMore,
    /// One authenticated chunk. Its plaintext now sits, decrypted in place,
    /// at `input[start..start + len]`; drop `consumed` bytes afterwards.
    Data {
        /// Bytes of input this chunk occupied.
        consumed: usize,
        /// Where the plaintext starts within the input.
        start: usize,
        /// Plaintext length.
        len: usize,
    },
    /// The authenticated end of stream; drop `consumed` bytes.
    End {
        /// Bytes of input the end chunk occupied.
        consumed: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for a length field.
    Header,
    /// Length unmasked and in bounds; waiting for the whole chunk.
    Body(usize),
    /// End of stream seen.
    Ended,
    /// A previous call failed; the stream is dead.
    Failed,
}

/// Opens chunks for one direction.
pub struct Decoder {
    aead: Aead,
    masks: Masks,
    counter: Counter,
    state: State,
    /// Largest payload accepted: [`MAX_PAYLOAD`] or [`LARGE_PAYLOAD`].
    max: usize,
}

impl Decoder {
    pub(crate) fn new(keys: DirKeys) -> Self {
        Decoder {
            aead: keys.aead,
            masks: Masks::new(keys.len_key),
            counter: Counter {
                next: 0,
                limit: NONCE_LIMIT,
            },
            state: State::Header,
            max: MAX_PAYLOAD,
        }
    }

    /// Accepts chunks of up to [`LARGE_PAYLOAD`] bytes (both hellos agreed,
    /// docs/PROTOCOL.md §4).
    pub(crate) fn allow_large(&mut self) {
        self.max = LARGE_PAYLOAD;
    }

    /// Largest payload one chunk may carry, in bytes (see
    /// [`Encoder::max_payload`]); a chunk above it is
    /// [`ProtoError::BadLength`] from its header alone.
    pub fn max_payload(&self) -> usize {
        self.max
    }

    #[cfg(any(test, fuzzing))]
    /// Test hook: start the counter near a chosen limit.
    #[doc(hidden)]
    pub fn set_nonce_window(&mut self, next: u64, limit: u64) {
        self.counter = Counter { next, limit };
    }

    /// Opens the key-confirmation chunk, which must be the first chunk
    /// (n = 0). Any other input is [`ProtoError::BadConfirm`], and final.
    pub fn open_confirm(&mut self, input: &mut [u8; CONFIRM_LEN]) -> Result<(), ProtoError> {
        let opened = (|| {
            if self.counter.next != 0 || self.state != State::Header {
                return Err(ProtoError::BadConfirm);
            }
            let mut field = [input[0], input[1]];
            self.masks.apply(0, &mut field);
            if u16::from_be_bytes(field) != CONFIRM_FIELD {
                return Err(ProtoError::BadConfirm);
            }
            let n = self.counter.take()?;
            let (_, tag) = input.split_at_mut(LEN_LEN);
            self.aead
                .open(chunk_nonce(n, CONFIRM_FIELD), &[], &mut [], tag)
                .map_err(|_| ProtoError::BadConfirm)
        })();
        if opened.is_err() {
            self.state = State::Failed;
        }
        opened
    }

    /// After the end chunk, on a keep-alive tunnel (docs/PROTOCOL.md §4.1):
    /// the chunks that follow it belong to the next session, with the same
    /// keys and counter, instead of being [`ProtoError::DataAfterEnd`].
    ///
    /// Panics unless the end chunk was seen: only a session boundary
    /// allows this.
    pub fn next_session(&mut self) {
        assert!(
            self.state == State::Ended,
            "next session before the end chunk"
        );
        self.state = State::Header;
    }

    /// Whether the end-of-stream chunk has been seen.
    pub fn is_ended(&self) -> bool {
        self.state == State::Ended
    }

    /// Bytes of input the next step needs in total: the masked length, or
    /// the whole chunk once its length is known. Never more than
    /// `LEN_LEN + self.max_payload() + TAG_LEN` ([`super::MAX_FRAME`] or
    /// [`super::LARGE_FRAME`]).
    pub fn needed(&self) -> usize {
        match self.state {
            State::Body(len) => LEN_LEN + len + TAG_LEN,
            _ => LEN_LEN,
        }
    }

    /// Tries to open one chunk at the front of `input`. Any error is final.
    pub fn decode(&mut self, input: &mut [u8]) -> Result<Decoded, ProtoError> {
        let result = self.step(input);
        if result.is_err() {
            self.state = State::Failed;
        }
        result
    }

    fn step(&mut self, input: &mut [u8]) -> Result<Decoded, ProtoError> {
        if self.state == State::Header {
            if input.len() < LEN_LEN {
                return Ok(Decoded::NeedMore);
            }
            if self.counter.next >= self.counter.limit {
                return Err(ProtoError::NonceExhausted);
            }
            let mut field = [input[0], input[1]];
            self.masks.apply(self.counter.next, &mut field);
            let len = u16::from_be_bytes(field) as usize;
            // Checked before a single body byte is waited for.
            if len > self.max {
                return Err(ProtoError::BadLength(len));
            }
            self.state = State::Body(len);
        }
        match self.state {
            State::Body(len) => {
                let total = LEN_LEN + len + TAG_LEN;
                if input.len() < total {
                    return Ok(Decoded::NeedMore);
                }
                let n = self.counter.take()?;
                let (body, tag) = input[LEN_LEN..total].split_at_mut(len);
                self.aead.open(chunk_nonce(n, len as u16), &[], body, tag)?;
                if len == 0 {
                    self.state = State::Ended;
                    return Ok(Decoded::End { consumed: total });
                }
                self.state = State::Header;
                Ok(Decoded::Data {
                    consumed: total,
                    start: LEN_LEN,
                    len,
                })
            }
            State::Ended if !input.is_empty() => Err(ProtoError::DataAfterEnd),
            State::Ended => Ok(Decoded::NeedMore),
            State::Failed => Err(ProtoError::BadTag),
            State::Header => unreachable!("handled above"),
        }
    }

    #[cfg(any(test, fuzzing))]
    /// Convenience for tests and tools: decodes a whole buffer, returning
    /// the plaintext, whether the end was seen, and the unconsumed tail.
    pub fn open_all(&mut self, mut input: Vec<u8>) -> Result<(Vec<u8>, bool, usize), ProtoError> {
        let mut out = Vec::new();
        let mut pos = 0;
        loop {
            match self.decode(&mut input[pos..])? {
                Decoded::NeedMore => return Ok((out, false, input.len() - pos)),
                Decoded::Data {
                    consumed,
                    start,
                    len,
                } => {
                    out.extend_from_slice(&input[pos + start..pos + start + len]);
                    pos += consumed;
                }
                Decoded::End { consumed } => {
                    pos += consumed;
                    return Ok((out, true, input.len() - pos));
                }
            }
        }
    }
}

#[cfg(test)]
mod mask_tests {
    use super::*;

    /// The lazy 64-byte fills give the wire format's masks: bytes
    /// `2(n mod 512)..+2` of the whole keystream of nonce `n div 512`, across
    /// fill and group boundaries and in any order of access.
    #[test]
    fn lazy_masks_match_the_whole_keystream() {
        let key = [7u8; 32];
        let whole = |n: u64| {
            let mut stream = [0u8; 2 * MASKS_PER_BLOCK as usize];
            let mut c = ChaCha20::new((&key).into(), &nonce_bytes(n / MASKS_PER_BLOCK).into());
            c.apply_keystream(&mut stream);
            let at = 2 * (n % MASKS_PER_BLOCK) as usize;
            [stream[at], stream[at + 1]]
        };
        let mut masks = Masks::new(Zeroizing::new(key));
        let order = (0..1100u64).chain([31, 32, 511, 512, 0, 1023, 1024, 5, (1 << 40) + 3]);
        for n in order {
            let mut field = [0u8; LEN_LEN];
            masks.apply(n, &mut field);
            assert_eq!(field, whole(n), "mask of chunk {n}");
        }
    }
}
