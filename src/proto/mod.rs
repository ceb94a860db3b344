//! The tunnel protocol, sans-io: pure functions and state machines over byte
//! slices. No sockets, no executor, no clock (time is passed in).
//!
//! The full specification, with test vectors, is `docs/PROTOCOL.md`. In short:
//!
//! ```text
//! entry → exit   client hello, 124 bytes
//!   +-------------------+------------------------------------------------+---------+
//!   | client_salt (32)  | sealed: ver(1) flags(1) unix_ts(8 BE)           | tag(16) |
//!   |                   |         meta_len(2 BE) meta(64, zero padded)   |         |
//!   +-------------------+------------------------------------------------+---------+
//!   key = HKDF-SHA256(ikm=PSK, salt=client_salt, info="shardproxy/1 client hello")
//!
//! exit → entry   server hello, 52 bytes (only after the client hello verified)
//!   +-------------------+------------------------------+---------+
//!   | server_salt (32)  | sealed: ver(1) status(1)     | tag(16) |
//!   |                   |         flags(1) 0(1)        |         |
//!   +-------------------+------------------------------+---------+
//!   prk = HKDF-Extract(salt=client_salt‖server_salt, ikm=PSK)
//!   key = HKDF-Expand(prk, "shardproxy/1 server hello"), aad = client_salt
//!
//! then, each direction (length key + data key, from the same prk):
//!   +-------------+------------------------------------------+---------+
//!   | enc_len (2) | AEAD(data_key, nonce(n, len), payload)    | tag(16) |
//!   +-------------+------------------------------------------+---------+
//!   enc_len = len (BE) XOR mask(n), masks from ChaCha20(length_key)
//!   n += 1 per chunk; len 1..=16384 (1..=65472 once both hellos agreed
//!   on large chunks); len = 0 is the authenticated end.
//! ```

pub mod aead;
pub mod frame;
#[cfg(any(test, fuzzing))]
pub mod fuzz;
pub mod handshake;
pub mod keepalive;
pub mod keys;
pub mod meta;
mod schedule;
#[cfg(test)]
mod tests;

pub use frame::{Decoded, Decoder, Encoder};
pub use handshake::{accept_hello, accept_hello_with, Accepted, ClientHandshake, Session};
pub use keys::{KeyFileError, KeySet, Psk};
pub use meta::Meta;

/// Protocol version carried (authenticated) in both hellos.
pub const VERSION: u8 = 2;
/// Random salt each side contributes.
pub const SALT_LEN: usize = 32;
/// Poly1305 tag.
pub const TAG_LEN: usize = 16;
/// Room for authenticated metadata in the client hello (e.g. PROXY protocol).
pub const META_LEN: usize = 64;
/// Plaintext of the client hello: version, flags, timestamp, meta_len, meta.
pub const CLIENT_HELLO_PT: usize = 1 + 1 + 8 + 2 + META_LEN;
/// Bytes of the client hello on the wire.
pub const CLIENT_HELLO_LEN: usize = SALT_LEN + CLIENT_HELLO_PT + TAG_LEN;
/// Plaintext of the server hello: version, status, flags, a reserved byte.
pub const SERVER_HELLO_PT: usize = 4;
/// Bytes of the server hello on the wire.
pub const SERVER_HELLO_LEN: usize = SALT_LEN + SERVER_HELLO_PT + TAG_LEN;
/// One length field (u16).
pub const LEN_LEN: usize = 2;
/// The end-of-stream chunk: its masked length of 0 and a tag.
pub const END_LEN: usize = LEN_LEN + TAG_LEN;
/// The key-confirmation chunk: the entry's first chunk (n = 0), an empty
/// payload under the length value [`CONFIRM_FIELD`] (docs/PROTOCOL.md §4).
pub const CONFIRM_LEN: usize = LEN_LEN + TAG_LEN;
/// The length value that marks the key-confirmation chunk (above any data
/// length, so it can never be taken for data).
pub const CONFIRM_FIELD: u16 = 0xffff;
/// Largest payload of one chunk: exactly 16 KiB, a whole number of ChaCha20
/// blocks, so SIMD backends never fall into their tail path on bulk data.
pub const MAX_PAYLOAD: usize = 16 * 1024;
/// Largest chunk on the wire without large chunks; a decoder that did not
/// agree to them never needs more buffer than this.
pub const MAX_FRAME: usize = LEN_LEN + MAX_PAYLOAD + TAG_LEN;
/// Largest payload of one chunk once both hellos agreed on large chunks
/// ([`FLAG_LARGE_CHUNKS`], docs/PROTOCOL.md §4): 1,023 ChaCha20 blocks, the
/// most below `0xffff` ([`CONFIRM_FIELD`]). A transfer then seals a whole
/// 64 KiB read as one chunk instead of four: a quarter of the AEAD calls,
/// whose fixed cost in OpenSSL's `EVP` layer is about a microsecond each
/// (docs/BENCHMARKS.md, "Large chunks").
pub const LARGE_PAYLOAD: usize = 1023 * 64;
/// Largest chunk on the wire with large chunks.
pub const LARGE_FRAME: usize = LEN_LEN + LARGE_PAYLOAD + TAG_LEN;
/// Chunks a direction may send before the connection must close. The nonce
/// never wraps; 2^62 chunks is far beyond any connection's life.
pub const NONCE_LIMIT: u64 = 1 << 62;

/// Client hello flag (docs/PROTOCOL.md §2): the entry has another exit to
/// try for this client, so the exit may refuse the tunnel (server hello
/// status [`STATUS_NO_UPSTREAM`]) instead of accepting it while none of its
/// own upstreams is up. Without it the exit accepts and tries anyway.
pub const FLAG_MAY_REFUSE: u8 = 0x01;
/// Client hello flag (docs/PROTOCOL.md §2): the entry accepts data chunks
/// of up to [`LARGE_PAYLOAD`] bytes. An exit that accepts them too answers
/// with [`SERVER_FLAG_LARGE_CHUNKS`], and both directions may then send
/// them; otherwise both keep to [`MAX_PAYLOAD`].
pub const FLAG_LARGE_CHUNKS: u8 = 0x02;
/// Client hello flag (docs/PROTOCOL.md §2, §4.1): the entry may carry
/// further sessions over this connection once the first has ended both
/// ways (keep-alive tunnels). An exit that agrees answers with
/// [`SERVER_FLAG_KEEPALIVE`].
pub const FLAG_KEEPALIVE: u8 = 0x04;
/// Client hello flag (docs/PROTOCOL.md §2, §3.1): the entry reads a
/// status chunk as the exit's first chunk of the tunnel, sent once the exit
/// has reached an origin (or failed to), and may then send the client's
/// first bytes again elsewhere if it says the exit did not serve them. An
/// exit that agrees answers with [`SERVER_FLAG_CONNECT_STATUS`].
pub const FLAG_CONNECT_STATUS: u8 = 0x08;
/// Server hello flag (byte 2 of its plaintext, docs/PROTOCOL.md §3): the
/// answer to [`FLAG_LARGE_CHUNKS`], set only in reply to it.
pub const SERVER_FLAG_LARGE_CHUNKS: u8 = 0x01;
/// Server hello flag: the answer to [`FLAG_KEEPALIVE`], set only in reply
/// to it.
pub const SERVER_FLAG_KEEPALIVE: u8 = 0x02;
/// Server hello flag: the answer to [`FLAG_CONNECT_STATUS`], set only in
/// reply to it.
pub const SERVER_FLAG_CONNECT_STATUS: u8 = 0x04;
/// Server hello status (docs/PROTOCOL.md §3): the session is accepted.
pub const STATUS_OK: u8 = 0x00;
/// Server hello status: refused, because every upstream endpoint of the
/// exit is down (ejected by passive health or failing its health checks).
/// Sent only to a hello with [`FLAG_MAY_REFUSE`].
pub const STATUS_NO_UPSTREAM: u8 = 0x01;
/// Server hello status: refused, because the exit is at its connection
/// limit (`--max-connections`) and would only queue the session. Sent only
/// to a hello with [`FLAG_MAY_REFUSE`].
pub const STATUS_BUSY: u8 = 0x02;

/// Status of a keep-alive tunnel (docs/PROTOCOL.md §4.1), never in a
/// server hello: the exit takes no more sessions on this connection (its
/// idle timeout, a drain, a key reload, its idle-tunnel limit) and closes
/// it; a session the entry started on it was not served.
pub const STATUS_GOING_AWAY: u8 = 0x03;

/// Why an exit refused, for logs: the meaning of a non-zero status.
pub fn refusal(status: u8) -> std::borrow::Cow<'static, str> {
    match status {
        STATUS_NO_UPSTREAM => "none of its upstreams is up".into(),
        STATUS_BUSY => "it is at its connection limit".into(),
        STATUS_GOING_AWAY => "it is closing the tunnel".into(),
        s => format!("status {s}").into(),
    }
}

/// Why the protocol rejected input. Every variant is fatal to its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// The client hello did not verify under any key.
    #[error("client hello failed authentication")]
    BadHello,
    /// The client hello's timestamp is outside the allowed skew.
    #[error("client hello timestamp outside the allowed clock skew")]
    ClockSkew,
    /// A hello with a version we do not speak.
    #[error("unsupported protocol version {0}")]
    Version(u8),
    /// The server hello did not verify.
    #[error("server hello failed authentication")]
    BadServerHello,
    /// A chunk failed authentication.
    #[error("chunk failed authentication")]
    BadTag,
    /// An authenticated header carried a length above the maximum.
    #[error("chunk length {0} above the maximum")]
    BadLength(usize),
    /// Bytes followed the end-of-stream chunk.
    #[error("data after end of stream")]
    DataAfterEnd,
    /// The nonce counter reached its hard limit.
    #[error("nonce limit reached")]
    NonceExhausted,
    /// The entry's first chunk was not a valid key confirmation.
    #[error("no valid key confirmation")]
    BadConfirm,
    /// A verified client hello whose salt was already accepted (a replay).
    #[error("client hello replayed: its salt was accepted before")]
    Replayed,
    /// The replay filter is full: the hello is refused (fail closed).
    #[error("replay filter full: hello refused")]
    ReplayFilterFull,
    /// The AEAD library failed while sealing (out of memory in OpenSSL):
    /// the chunk is lost, so the connection must be aborted.
    #[error("the AEAD library failed to seal a chunk")]
    SealFailed,
    /// The exit answered with a status other than [`STATUS_OK`]: it refused
    /// the tunnel ([`STATUS_NO_UPSTREAM`], [`STATUS_BUSY`]).
    #[error("the exit refused the tunnel: {}", refusal(*.0))]
    Refused(u8),
    /// Metadata larger than [`META_LEN`].
    #[error("metadata longer than {META_LEN} bytes")]
    MetaTooLong,
    /// A keep-alive tunnel's next session did not begin with a valid start
    /// chunk, or its answer with a valid status chunk (docs/PROTOCOL.md
    /// §4.1), or a chunk came where none may.
    #[error("keep-alive tunnel: {0}")]
    KeepAlive(&'static str),
}
