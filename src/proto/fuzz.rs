//! Fuzz entry point for the exit side: handshake, then the chunk decoder.
//!
//! Shared by the cargo-fuzz target (`tests/fuzz/`) and by unit tests that
//! replay truncated and mutated valid streams, so it runs under `cargo test`.

use super::frame::{Decoded, Decoder};
use super::handshake::accept_hello;
use super::keys::Psk;
use super::{CLIENT_HELLO_LEN, CONFIRM_LEN};

/// The fixed key, salts and clock the fuzz entry point uses.
pub const FUZZ_PSK: [u8; 32] = [0x42; 32];
/// The exit's salt in the fuzz entry point.
pub const FUZZ_SERVER_SALT: [u8; 32] = [0x5a; 32];
/// The exit's clock in the fuzz entry point.
pub const FUZZ_NOW: u64 = 1_800_000_000;

/// What [`exit_side`] observed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FuzzOutcome {
    /// Whether a server hello would have been sent.
    pub answered: bool,
    /// Plaintext the exit would have forwarded to the origin.
    pub plaintext: Vec<u8>,
    /// Whether the authenticated end of stream was seen.
    pub ended: bool,
    /// Whether the stream was rejected.
    pub failed: bool,
}

/// Feeds `data` to an exit as if it arrived on the tunnel, delivered in
/// reads of the sizes cycled from `read_sizes` (any non-empty sizes).
///
/// Invariants, asserted here so the fuzzer finds violations:
/// * nothing panics;
/// * the decoder's buffer never holds more than one maximal chunk;
/// * plaintext only comes out of chunks that authenticated (an unauthenticated
///   peer cannot make the exit answer or forward anything).
pub fn exit_side(data: &[u8], read_sizes: &[usize]) -> FuzzOutcome {
    let mut out = FuzzOutcome::default();
    let Some(hello) = data.get(..CLIENT_HELLO_LEN) else {
        return out;
    };
    let hello: &[u8; CLIENT_HELLO_LEN] = hello.try_into().expect("exact length");
    let keys = [Psk::from_bytes(FUZZ_PSK)];
    let Ok(accepted) = accept_hello(&keys, hello, FUZZ_SERVER_SALT, FUZZ_NOW, 120) else {
        out.failed = true;
        return out;
    };
    out.answered = true;
    // Protocol v2: the exit reads exactly the key confirmation next, and
    // forwards nothing (it would not even connect) unless it verifies.
    let mut decoder = accepted.decoder;
    let Some(confirm) = data.get(CLIENT_HELLO_LEN..CLIENT_HELLO_LEN + CONFIRM_LEN) else {
        return out;
    };
    let mut confirm: [u8; CONFIRM_LEN] = confirm.try_into().expect("exact length");
    if decoder.open_confirm(&mut confirm).is_err() {
        out.failed = true;
        return out;
    }
    out.failed = !drive_decoder(
        decoder,
        &data[CLIENT_HELLO_LEN + CONFIRM_LEN..],
        read_sizes,
        &mut out,
    );
    out
}

/// Runs the relay's decrypting loop over `stream` with a fixed buffer of
/// one largest chunk ([`super::MAX_FRAME`], or [`super::LARGE_FRAME`] once the
/// hellos agreed on large chunks). Returns false on a protocol error.
pub fn drive_decoder(
    mut decoder: Decoder,
    stream: &[u8],
    read_sizes: &[usize],
    out: &mut FuzzOutcome,
) -> bool {
    let frame = super::LEN_LEN + decoder.max_payload() + super::TAG_LEN;
    let mut buf = vec![0u8; frame];
    let (mut start, mut end, mut pos, mut i) = (0usize, 0usize, 0usize, 0usize);
    loop {
        match decoder.decode(&mut buf[start..end]) {
            Err(_) => return false,
            Ok(Decoded::Data {
                consumed,
                start: s,
                len,
            }) => {
                out.plaintext
                    .extend_from_slice(&buf[start + s..start + s + len]);
                start += consumed;
            }
            Ok(Decoded::End { .. }) => {
                out.ended = true;
                return true;
            }
            Ok(Decoded::NeedMore) => {
                if pos == stream.len() {
                    return true; // EOF without end: the caller sees !ended
                }
                // Compact, then "read" into the free space only.
                buf.copy_within(start..end, 0);
                end -= start;
                start = 0;
                assert!(end < decoder.needed() && decoder.needed() <= frame);
                let want = read_sizes
                    .get(i % read_sizes.len().max(1))
                    .copied()
                    .unwrap_or(4096)
                    .max(1);
                i += 1;
                let n = want.min(frame - end).min(stream.len() - pos);
                buf[end..end + n].copy_from_slice(&stream[pos..pos + n]);
                end += n;
                pos += n;
            }
        }
    }
}

/// The entry's client salt in [`entry_side`].
pub const FUZZ_CLIENT_SALT: [u8; 32] = [0x3c; 32];

/// Feeds `data` to an entry as the exit's answer and stream: the first
/// [`SERVER_HELLO_LEN`](super::SERVER_HELLO_LEN) bytes as the server hello,
/// the rest as chunks. Same invariants as [`exit_side`]: no panic, bounded
/// buffering, no plaintext unless the server hello and each chunk verified.
pub fn entry_side(data: &[u8], read_sizes: &[usize]) -> FuzzOutcome {
    use super::{handshake::ClientHandshake, SERVER_HELLO_LEN};
    let mut out = FuzzOutcome::default();
    let key = Psk::from_bytes(FUZZ_PSK);
    // Offering large chunks, as the entry does by default.
    let Ok((hs, _hello)) = ClientHandshake::start_with_flags(
        &key,
        FUZZ_CLIENT_SALT,
        FUZZ_NOW,
        b"",
        super::FLAG_LARGE_CHUNKS,
    ) else {
        return out;
    };
    let Some(answer) = data.get(..SERVER_HELLO_LEN) else {
        return out;
    };
    let answer: &[u8; SERVER_HELLO_LEN] = answer.try_into().expect("exact length");
    let Ok((_enc, dec)) = hs.finish(answer) else {
        out.failed = true;
        return out;
    };
    out.answered = true;
    out.failed = !drive_decoder(dec, &data[SERVER_HELLO_LEN..], read_sizes, &mut out);
    out
}
