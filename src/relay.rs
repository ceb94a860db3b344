//! The bounded, half-duplex relay (after linkerd2-proxy's `duplex`).
//!
//! ```text
//!   client ──read──▶ [buf] ──(seal/open)──write──▶ upstream     (pump "up")
//!   client ◀──write──(seal/open)── [buf] ◀──read── upstream     (pump "down")
//! ```
//!
//! * [`run`] is the one entry point: two connections and a [`Framing`]. It
//!   owns the buffers, the idle clock and the pumps.
//! * The pair runs on the shard's completion-driven relay,
//!   [`crate::engine`]: a state machine per pair driven straight from
//!   io_uring completions, not a future per direction. The rules below are
//!   its rules.
//! * Each direction owns exactly one fixed buffer (`--buffer-size` in
//!   `forward`; one [`crate::proto::MAX_FRAME`] chunk in the tunnel roles). A pump does not
//!   read again until everything it read has been written, so a slow reader
//!   stalls its writer (TCP backpressure) and memory per connection is
//!   bounded whatever the peers do.
//! * A read that fills the buffer marks a transfer ([`crate::transfer`]):
//!   `forward` then splices that direction through a pipe (no copy through
//!   user space), and the tunnel roles move it in batches of
//!   chunks per syscall ([`crate::transfer::BATCH`]), each while the shard's budget of pipes or batch
//!   buffers lasts. The same rule holds: nothing more is read until all of
//!   it has been written, so a pipe or a batch buffer bounds what is in
//!   flight.
//! * EOF on one side shuts down the *write half* of the other side (FIN is
//!   propagated); the pair ends when both directions have finished.
//! * An error on either side ends both directions at once; the session then
//!   closes both sockets with RST so neither peer mistakes it for a clean end.
//! * No bytes in either direction for `idle_timeout` ends the pair (the
//!   shard's idle sweep, [`crate::watchdog`], decides and wakes it).

use std::time::Instant;

use crate::access_log::Record;
use crate::conn::{Conn, Peer};
use crate::context::ShardCtx;
use crate::engine::{Ended, Mode, Relay};
use crate::error::SessionError;
use crate::metrics::{Hist, Timings};
use crate::proto::{Decoder, Encoder, MAX_FRAME, MAX_PAYLOAD};
use crate::watchdog::{watched, Verdict};

/// How the bytes of a pair are framed.
// Built once per connection and moved once into `run`: boxing the cipher
// states would only add a heap allocation per connection.
#[allow(clippy::large_enum_variant)]
pub enum Framing {
    /// `forward`: bytes pass unchanged both ways.
    Plain,
    /// `entry`/`exit`: `tunnel` speaks the tunnel protocol. Plaintext from
    /// the other side is sealed with `encoder` toward it; its chunks are
    /// opened with `decoder` toward the other side.
    Tunnel {
        /// The side that speaks the tunnel protocol.
        tunnel: Peer,
        /// Seals toward `tunnel`.
        encoder: Encoder,
        /// Opens what `tunnel` sends.
        decoder: Decoder,
        /// A keep-alive tunnel (docs/PROTOCOL.md §4.1): the pair ends at the
        /// session boundary and leaves it open ([`Ended`]).
        keepalive: bool,
        /// Tunnel bytes already read for this session (at most one
        /// [`MAX_FRAME`]), opened first.
        leftover: Vec<u8>,
    },
}

/// Relays `client` ⇄ `upstream` until both directions have ended (`Ok`), one
/// fails, the pair is idle for `--idle-timeout`, or the shard aborts
/// connections at the end of its drain. Bytes and the first byte's time
/// go into `rec` too (the access log). Closing the sockets is the caller's;
/// a keep-alive tunnel that ended at its session boundary is handed back
/// open (`Ok(Some(..))`, [`Ended`]).
pub async fn run(
    client: &Conn,
    upstream: &Conn,
    framing: Framing,
    ctx: &ShardCtx,
    rec: &Record,
) -> Result<Ended, SessionError> {
    let read_size = ctx.limits().buffer_size.get();
    let (modes, buf_size, keepalive, leftover) = match framing {
        Framing::Plain => ([Mode::Copy, Mode::Copy], read_size, false, Vec::new()),
        Framing::Tunnel {
            tunnel,
            encoder,
            decoder,
            keepalive,
            leftover,
        } => {
            let modes = match tunnel {
                Peer::Upstream => [Mode::Seal(encoder), Mode::Open(decoder)],
                Peer::Downstream => [Mode::Open(decoder), Mode::Seal(encoder)],
            };
            (modes, MAX_FRAME, keepalive, leftover)
        }
    };
    // A failed allocation is this connection's error, never the process's
    // abort (a large --buffer-size under a memory limit). Buffers come from
    // and go back to the shard's pool: no allocation or zeroing per
    // connection once the shard is warm.
    let take = || {
        ctx.buffer(buf_size)
            .ok_or(SessionError::OutOfMemory(buf_size))
    };
    let bufs = [take()?, take()?];
    // The idle timeout and the drain's abort come from the shard's sweep
    // (`crate::watchdog`): no timer or trigger is polled per message.
    let guard = ctx.watchdog().watch();
    let relay = Relay::start(
        ctx,
        rec,
        [client.sock(), upstream.sock()],
        bufs,
        modes,
        read_size.clamp(1, MAX_PAYLOAD),
        guard.shared(),
        (keepalive, &leftover),
    );
    let idx = relay.index();
    watched(
        guard.watch(),
        || {
            ctx.engine().sync(idx, rec);
            ctx.log_access(rec, None)
        },
        relay,
    )
    .await
    .map_err(|v| match v {
        Verdict::Idle => SessionError::Idle,
        Verdict::Drained => SessionError::Drained,
    })
    .and_then(|r| r)
    .inspect(|_| {
        // Both directions ended with FIN: the plain sides close as usual.
        client.finished();
        upstream.finished();
    })
}

/// A chunk read at `read_at` (`None`: timings are off) has been fully
/// written on the other side: its relay latency, and for the connection's
/// first chunk upstream, the time from accept (`first_byte_seconds`). The
/// session calls it for client bytes it sends before the relay starts (with
/// a PROXY header, or with the entry's key confirmation).
pub fn chunk_done(timings: &Timings, rec: &Record, up: bool, read_at: Option<Instant>) {
    chunk_done_at(timings, rec, up, read_at, Instant::now());
}

/// [`chunk_done`], for a chunk whose write completed at `now`.
pub fn chunk_done_at(
    timings: &Timings,
    rec: &Record,
    up: bool,
    read_at: Option<Instant>,
    now: Instant,
) {
    let Some(read_at) = read_at else { return };
    let which = if up { Hist::RelayUp } else { Hist::RelayDown };
    timings.record(which, now - read_at);
    if up && !rec.first_up_timed.replace(true) {
        timings.record(Hist::FirstByte, now - rec.accepted_at);
    }
}
