//! Chunk framing: a sealed 2-byte length, then the sealed payload.
//!
//! Both directions work in place on the caller's buffer, so the relay reads
//! plaintext straight into the frame it will send, and decrypts received
//! frames where they landed. Neither type allocates.

use chacha20poly1305::aead::AeadInOut;
use chacha20poly1305::{ChaCha20Poly1305, Nonce, Tag};

use super::{ProtoError, HEADER_LEN, MAX_FRAME, MAX_PAYLOAD, NONCE_LIMIT, TAG_LEN};

/// The 96-bit nonce for counter `n`: little-endian in the first 8 bytes.
pub(crate) fn nonce(n: u64) -> Nonce {
    let mut b = [0u8; 12];
    b[..8].copy_from_slice(&n.to_le_bytes());
    b.into()
}

/// A per-direction nonce counter with a hard limit.
struct Counter {
    next: u64,
    limit: u64,
}

impl Counter {
    /// Reserves `k` nonces, returning the first. Never wraps.
    fn take(&mut self, k: u64) -> Result<u64, ProtoError> {
        let end = self.next.checked_add(k).ok_or(ProtoError::NonceExhausted)?;
        if end > self.limit {
            return Err(ProtoError::NonceExhausted);
        }
        let n = self.next;
        self.next = end;
        Ok(n)
    }
}

/// Seals plaintext into chunks for one direction.
pub struct Encoder {
    cipher: ChaCha20Poly1305,
    counter: Counter,
    ended: bool,
}

impl Encoder {
    pub(crate) fn new(cipher: ChaCha20Poly1305) -> Self {
        Encoder {
            cipher,
            counter: Counter {
                next: 0,
                limit: NONCE_LIMIT,
            },
            ended: false,
        }
    }

    /// Test hook: start the counter near a chosen limit.
    #[doc(hidden)]
    pub fn set_nonce_window(&mut self, next: u64, limit: u64) {
        self.counter = Counter { next, limit };
    }

    /// Seals the `len` payload bytes already placed at
    /// `frame[HEADER_LEN..HEADER_LEN + len]`, writing the sealed header in
    /// front and the tag behind. Returns the frame's length on the wire.
    ///
    /// `len` must be 1..=MAX_PAYLOAD and `frame` at least that frame long.
    pub fn seal_in_place(&mut self, frame: &mut [u8], len: usize) -> Result<usize, ProtoError> {
        assert!((1..=MAX_PAYLOAD).contains(&len), "payload length {len}");
        let total = HEADER_LEN + len + TAG_LEN;
        assert!(frame.len() >= total, "frame buffer too small");
        assert!(!self.ended, "seal after end of stream");
        let n = self.counter.take(2)?;
        self.seal_header(&mut frame[..HEADER_LEN], len as u16, n)?;
        let (body, tag) = frame[HEADER_LEN..total].split_at_mut(len);
        let t = self
            .cipher
            .encrypt_inout_detached(&nonce(n + 1), &[], body.into())
            .map_err(|_| ProtoError::BadTag)?;
        tag.copy_from_slice(&t);
        Ok(total)
    }

    /// Seals the authenticated end of stream (a header with length 0).
    pub fn seal_end(&mut self, out: &mut [u8; HEADER_LEN]) -> Result<(), ProtoError> {
        let n = self.counter.take(1)?;
        self.ended = true;
        self.seal_header(out, 0, n)
    }

    pub(crate) fn seal_header(&self, out: &mut [u8], len: u16, n: u64) -> Result<(), ProtoError> {
        out[..2].copy_from_slice(&len.to_be_bytes());
        let t = self
            .cipher
            .encrypt_inout_detached(&nonce(n), &[], (&mut out[..2]).into())
            .map_err(|_| ProtoError::BadTag)?;
        out[2..HEADER_LEN].copy_from_slice(&t);
        Ok(())
    }

    /// Convenience for tests and tools: seals `data` (any length, split into
    /// chunks) and appends the frames to `out`.
    pub fn seal_to_vec(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), ProtoError> {
        let mut frame = vec![0u8; MAX_FRAME];
        for chunk in data.chunks(MAX_PAYLOAD) {
            frame[HEADER_LEN..HEADER_LEN + chunk.len()].copy_from_slice(chunk);
            let n = self.seal_in_place(&mut frame, chunk.len())?;
            out.extend_from_slice(&frame[..n]);
        }
        Ok(())
    }

    /// Convenience: appends the end-of-stream frame to `out`.
    pub fn end_to_vec(&mut self, out: &mut Vec<u8>) -> Result<(), ProtoError> {
        let mut h = [0u8; HEADER_LEN];
        self.seal_end(&mut h)?;
        out.extend_from_slice(&h);
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
    /// Waiting for a sealed header.
    Header,
    /// Header verified (at the front of the input), waiting for the body.
    Body(usize),
    /// End of stream seen.
    Ended,
    /// A previous call failed; the stream is dead.
    Failed,
}

/// Opens chunks for one direction.
pub struct Decoder {
    cipher: ChaCha20Poly1305,
    counter: Counter,
    state: State,
}

impl Decoder {
    pub(crate) fn new(cipher: ChaCha20Poly1305) -> Self {
        Decoder {
            cipher,
            counter: Counter {
                next: 0,
                limit: NONCE_LIMIT,
            },
            state: State::Header,
        }
    }

    /// Test hook: start the counter near a chosen limit.
    #[doc(hidden)]
    pub fn set_nonce_window(&mut self, next: u64, limit: u64) {
        self.counter = Counter { next, limit };
    }

    /// Whether the end-of-stream chunk has been seen.
    pub fn is_ended(&self) -> bool {
        self.state == State::Ended
    }

    /// Bytes of input the next step needs in total (header, or whole chunk
    /// once the header verified). Never more than [`MAX_FRAME`].
    pub fn needed(&self) -> usize {
        match self.state {
            State::Body(len) => HEADER_LEN + len + TAG_LEN,
            _ => HEADER_LEN,
        }
    }

    /// Tries to open one chunk at the front of `input`.
    ///
    /// The header is authenticated and its length checked *before* the body
    /// is waited for, so a bad length is rejected with at most
    /// [`HEADER_LEN`] bytes buffered. Any error is final.
    pub fn decode(&mut self, input: &mut [u8]) -> Result<Decoded, ProtoError> {
        let result = self.step(input);
        if result.is_err() {
            self.state = State::Failed;
        }
        result
    }

    fn step(&mut self, input: &mut [u8]) -> Result<Decoded, ProtoError> {
        if self.state == State::Header {
            if input.len() < HEADER_LEN {
                return Ok(Decoded::NeedMore);
            }
            let n = self.counter.take(1)?;
            let mut len_bytes = [input[0], input[1]];
            let tag = Tag::try_from(&input[2..HEADER_LEN]).map_err(|_| ProtoError::BadTag)?;
            self.cipher
                .decrypt_inout_detached(&nonce(n), &[], (&mut len_bytes[..]).into(), &tag)
                .map_err(|_| ProtoError::BadTag)?;
            let len = u16::from_be_bytes(len_bytes) as usize;
            if len == 0 {
                self.state = State::Ended;
                return Ok(Decoded::End {
                    consumed: HEADER_LEN,
                });
            }
            if len > MAX_PAYLOAD {
                return Err(ProtoError::BadLength(len));
            }
            self.state = State::Body(len);
        }
        match self.state {
            State::Body(len) => {
                let total = HEADER_LEN + len + TAG_LEN;
                if input.len() < total {
                    return Ok(Decoded::NeedMore);
                }
                let n = self.counter.take(1)?;
                let (body, tag) = input[HEADER_LEN..total].split_at_mut(len);
                let tag = Tag::try_from(&*tag).map_err(|_| ProtoError::BadTag)?;
                self.cipher
                    .decrypt_inout_detached(&nonce(n), &[], body.into(), &tag)
                    .map_err(|_| ProtoError::BadTag)?;
                self.state = State::Header;
                Ok(Decoded::Data {
                    consumed: total,
                    start: HEADER_LEN,
                    len,
                })
            }
            State::Ended if !input.is_empty() => Err(ProtoError::DataAfterEnd),
            State::Ended => Ok(Decoded::NeedMore),
            State::Failed => Err(ProtoError::BadTag),
            State::Header => unreachable!("handled above"),
        }
    }

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
