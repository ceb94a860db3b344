//! Fuzz entry points for both ends of a tunnel: the handshake, then the
//! chunk decoder, and on a keep-alive tunnel (docs/PROTOCOL.md §4.1) every
//! later session's start chunk (at the exit) or status chunk (at the entry).
//!
//! Shared by the cargo-fuzz target (`tests/fuzz/`) and by unit tests that
//! replay truncated and mutated valid streams, so it runs under `cargo test`.

use super::frame::{Decoded, Decoder};
use super::handshake::accept_hello;
use super::keepalive::{parse_start, parse_status};
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
    /// Whether the authenticated end of stream was seen, and no later
    /// session began after it.
    pub ended: bool,
    /// Whether the stream was rejected.
    pub failed: bool,
    /// Sessions that ended with their end chunk (more than one only on a
    /// keep-alive tunnel).
    pub sessions: usize,
    /// A keep-alive tunnel's refusal (a status other than 0) that ended it.
    pub refused: Option<u8>,
}

/// What must open the stream, or follow each end chunk, for
/// [`drive_decoder`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum After {
    /// Nothing: data (the stream ends with its session, if this is what
    /// follows an end chunk: no keep-alive agreed).
    Nothing,
    /// A start chunk, then the next session's data (the exit's side of a
    /// keep-alive tunnel).
    Start,
    /// A status chunk; status 0 is followed by the next session's data,
    /// any other ends the tunnel (the entry's side).
    Status,
}

/// Feeds `data` to an exit as if it arrived on the tunnel, delivered in
/// reads of the sizes cycled from `read_sizes` (any non-empty sizes).
///
/// Invariants, asserted here so the fuzzer finds violations:
/// * nothing panics;
/// * the decoder's buffer never holds more than one maximal chunk;
/// * plaintext only comes out of chunks that authenticated (an unauthenticated
///   peer cannot make the exit answer or forward anything);
/// * on a keep-alive tunnel, no session begins without a well-formed start
///   chunk after the previous session's end.
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
    let after = if accepted.keepalive {
        After::Start
    } else {
        After::Nothing
    };
    out.failed = !drive_decoder(
        decoder,
        &data[CLIENT_HELLO_LEN + CONFIRM_LEN..],
        read_sizes,
        (After::Nothing, after),
        &mut out,
    );
    out
}

/// Runs the relay's decrypting loop over `stream` with a fixed buffer of
/// one largest chunk ([`super::MAX_FRAME`], or [`super::LARGE_FRAME`] once the
/// hellos agreed on large chunks). `(opening, after)` say what the first
/// chunk must be (a status, under a connect status, §3.1), and what must
/// come after each end chunk: on a keep-alive tunnel the decoder goes on
/// to the next session (`Decoder::next_session`), whose first chunk is a
/// start or a status. Such a chunk's payload is checked, never taken as
/// plaintext. Returns false on a protocol error.
pub fn drive_decoder(
    mut decoder: Decoder,
    stream: &[u8],
    read_sizes: &[usize],
    (opening, after): (After, After),
    out: &mut FuzzOutcome,
) -> bool {
    let frame = super::LEN_LEN + decoder.max_payload() + super::TAG_LEN;
    let mut buf = vec![0u8; frame];
    let (mut start, mut end, mut pos, mut i) = (0usize, 0usize, 0usize, 0usize);
    // What the next chunk must be, at the stream's start or at a session
    // boundary (`Nothing`: data or an end chunk).
    let mut expect = opening;
    loop {
        match decoder.decode(&mut buf[start..end]) {
            Err(_) => return false,
            Ok(Decoded::Data {
                consumed,
                start: s,
                len,
            }) => {
                let payload = &buf[start + s..start + s + len];
                if expect != After::Nothing {
                    match std::mem::replace(&mut expect, After::Nothing) {
                        After::Nothing => unreachable!("checked"),
                        After::Start => {
                            if parse_start(payload).is_err() {
                                return false;
                            }
                        }
                        After::Status => match parse_status(payload) {
                            Err(_) => return false,
                            Ok(0) => {}
                            // Refused: the exit's FIN follows.
                            Ok(status) => {
                                out.refused = Some(status);
                                return true;
                            }
                        },
                    }
                    out.ended = false;
                } else {
                    out.plaintext.extend_from_slice(payload);
                }
                start += consumed;
            }
            Ok(Decoded::End { consumed }) => {
                if expect != After::Nothing {
                    // An end chunk where a start or a status must be.
                    return false;
                }
                out.ended = true;
                out.sessions += 1;
                if after == After::Nothing {
                    return true;
                }
                decoder.next_session();
                expect = after;
                start += consumed;
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
    // Offering large chunks, keep-alive and the connect status, as the
    // entry does by default.
    let Ok((hs, _hello)) = ClientHandshake::start_with_flags(
        &key,
        FUZZ_CLIENT_SALT,
        FUZZ_NOW,
        b"",
        super::FLAG_LARGE_CHUNKS | super::FLAG_KEEPALIVE | super::FLAG_CONNECT_STATUS,
    ) else {
        return out;
    };
    let Some(answer) = data.get(..SERVER_HELLO_LEN) else {
        return out;
    };
    let answer: &[u8; SERVER_HELLO_LEN] = answer.try_into().expect("exact length");
    let Ok(session) = hs.finish_session(answer) else {
        out.failed = true;
        return out;
    };
    out.answered = true;
    let status = |agreed: bool| {
        if agreed {
            After::Status
        } else {
            After::Nothing
        }
    };
    out.failed = !drive_decoder(
        session.decoder,
        &data[SERVER_HELLO_LEN..],
        read_sizes,
        (status(session.connect_status), status(session.keepalive)),
        &mut out,
    );
    out
}
