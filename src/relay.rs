//! The bounded, half-duplex relay (after linkerd2-proxy's `duplex`).
//!
//! ```text
//!   client ──read──▶ [buf: buffer_size] ──write──▶ upstream     (pump "up")
//!   client ◀──write── [buf: buffer_size] ◀──read── upstream     (pump "down")
//! ```
//!
//! * Each direction owns exactly one fixed buffer. A pump does not read again
//!   until everything it read has been written, so a slow reader stalls its
//!   writer (TCP backpressure) and memory per connection is `2 × buffer_size`
//!   whatever the peers do.
//! * EOF on one side shuts down the *write half* of the other side (FIN is
//!   propagated); the pair ends when both directions have finished.
//! * An error on either side ends both directions at once, and both sockets
//!   are closed with RST so that neither peer can mistake it for a clean end.
//! * No bytes in either direction for `idle_timeout` ends the pair (RST).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_lite::future::poll_fn;
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;

use crate::metrics::{Hist, Timings};
use crate::proto::{
    Decoded, Decoder, Encoder, ProtoError, BULK_PAYLOAD, END_LEN, HEADER_LEN, MAX_FRAME,
};
use crate::stats::{CloseReason, ShardStats};
use crate::trigger::Trigger;

/// Which peer a socket talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// The client that connected to us.
    Downstream,
    /// The server we connected to.
    Upstream,
}

impl Peer {
    /// The close reason for a failure on this side.
    pub fn reset_reason(self) -> CloseReason {
        match self {
            Peer::Downstream => CloseReason::DownstreamReset,
            Peer::Upstream => CloseReason::UpstreamReset,
        }
    }
}

/// A socket shared by the two pumps of one connection.
///
/// Each pump borrows it only for the duration of a single `poll_*` call, and a
/// shard is one thread, so the `RefCell` never conflicts. glommio keeps
/// separate read and write readiness sources per stream, so a pending read and
/// a pending write on the same socket do not interfere.
#[derive(Clone)]
pub struct Conn {
    stream: Rc<RefCell<TcpStream>>,
    /// Which peer this socket reaches.
    pub peer: Peer,
}

impl Conn {
    /// Wraps a connected stream.
    pub fn new(stream: TcpStream, peer: Peer) -> Self {
        Conn {
            stream: Rc::new(RefCell::new(stream)),
            peer,
        }
    }

    /// Reads into `buf`; `Ok(0)` is EOF.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        poll_fn(|cx| Pin::new(&mut *self.stream.borrow_mut()).poll_read(cx, buf)).await
    }

    /// Writes some of `buf`.
    pub async fn write(&self, buf: &[u8]) -> io::Result<usize> {
        poll_fn(|cx| Pin::new(&mut *self.stream.borrow_mut()).poll_write(cx, buf)).await
    }

    /// Sends FIN: shuts down our write half.
    pub fn shutdown_write(&self) -> io::Result<()> {
        let stream = self.stream.borrow();
        socket2::SockRef::from(&*stream).shutdown(Shutdown::Write)
    }

    /// Makes the close send RST instead of FIN (SO_LINGER 0). The socket is
    /// closed when the session drops its last `Conn`, right after this.
    pub fn abort(&self) {
        let stream = self.stream.borrow();
        // Best effort: the socket may already be dead, which is the point.
        let _ = socket2::SockRef::from(&*stream).set_linger(Some(Duration::ZERO));
    }
}

/// Progress in either direction, for the idle timeout.
///
/// The hot path only bumps a counter (no clock read per chunk); the watchdog
/// samples it every quarter of the idle period, so a pair is closed after
/// between `idle` and `1.25 × idle` of silence.
pub struct Activity(Cell<u64>);

impl Activity {
    /// A fresh counter.
    pub fn new() -> Self {
        Activity(Cell::new(0))
    }

    /// Records that bytes moved.
    pub fn touch(&self) {
        self.0.set(self.0.get().wrapping_add(1));
    }

    /// Completes once nothing has moved for at least `idle`.
    pub async fn idle(&self, idle: Duration) {
        let tick = (idle / 4).max(Duration::from_millis(1));
        let mut seen = self.0.get();
        let mut quiet = Duration::ZERO;
        loop {
            glommio::timer::sleep(tick).await;
            let now = self.0.get();
            if now == seen {
                quiet += tick;
                if quiet >= idle {
                    return;
                }
            } else {
                seen = now;
                quiet = Duration::ZERO;
            }
        }
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// Why one direction of the relay stopped early.
#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    /// A socket operation failed on one side.
    #[error("{peer:?} {op}: {source}")]
    Io {
        /// The side whose socket failed.
        peer: Peer,
        /// What we were doing.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The tunnel peer sent something that failed authentication, or a limit
    /// was reached.
    #[error("tunnel: {0}")]
    Proto(#[from] ProtoError),
    /// The tunnel ended (TCP EOF) without its authenticated end chunk.
    #[error("tunnel truncated")]
    Truncated,
}

impl PumpError {
    fn io(peer: Peer, op: &'static str, source: io::Error) -> Self {
        PumpError::Io { peer, op, source }
    }

    /// The close reason this failure is counted under.
    pub fn reason(&self) -> CloseReason {
        match self {
            PumpError::Io { peer, .. } => peer.reset_reason(),
            PumpError::Proto(ProtoError::NonceExhausted) => CloseReason::Limit,
            PumpError::Proto(_) => CloseReason::AuthFailed,
            PumpError::Truncated => CloseReason::Truncated,
        }
    }
}

/// What a pump needs from its surroundings.
pub struct PumpCtx<'a> {
    /// Idle clock shared by both directions.
    pub activity: &'a Activity,
    /// Shard counters.
    pub stats: &'a ShardStats,
    /// Shard histograms (a no-op when metrics are off).
    pub timings: &'a Timings,
    /// When the client was accepted, for the first-byte histogram.
    pub accepted_at: Instant,
    /// Whether the first byte upstream has been recorded.
    pub first_byte_done: Cell<bool>,
}

impl PumpCtx<'_> {
    /// The time a chunk's read completed, if anything is timed.
    fn now(&self) -> Option<Instant> {
        self.timings.enabled().then(Instant::now)
    }

    /// A chunk read at `read_at` has been fully written on the other side.
    fn chunk_done(&self, up: bool, read_at: Option<Instant>) {
        let Some(read_at) = read_at else { return };
        let now = Instant::now();
        let which = if up { Hist::RelayUp } else { Hist::RelayDown };
        self.timings.record(which, now - read_at);
        if up && !self.first_byte_done.replace(true) {
            self.timings.record(Hist::FirstByte, now - self.accepted_at);
        }
    }
}

/// Writes all of `buf` to `to`, touching the idle clock on each progress.
pub async fn write_all(to: &Conn, mut buf: &[u8], activity: &Activity) -> Result<(), PumpError> {
    while !buf.is_empty() {
        let n = to
            .write(buf)
            .await
            .map_err(|e| PumpError::io(to.peer, "write", e))?;
        if n == 0 {
            let e = io::Error::new(io::ErrorKind::WriteZero, "peer accepted no bytes");
            return Err(PumpError::io(to.peer, "write", e));
        }
        activity.touch();
        buf = &buf[n..];
    }
    Ok(())
}

/// Reads into `buf`, mapping errors to the reading side.
async fn read(from: &Conn, buf: &mut [u8], activity: &Activity) -> Result<usize, PumpError> {
    let n = from
        .read(buf)
        .await
        .map_err(|e| PumpError::io(from.peer, "read", e))?;
    if n > 0 {
        activity.touch();
    }
    Ok(n)
}

fn shutdown_write(to: &Conn) -> Result<(), PumpError> {
    to.shutdown_write()
        .map_err(|e| PumpError::io(to.peer, "shutdown", e))
}

/// Plain copy `from` → `to` until EOF, then sends FIN to `to`.
pub async fn pump(
    from: &Conn,
    to: &Conn,
    buf: &mut [u8],
    ctx: &PumpCtx<'_>,
) -> Result<(), PumpError> {
    let up = from.peer == Peer::Downstream;
    loop {
        let n = read(from, buf, ctx.activity).await?;
        if n == 0 {
            return shutdown_write(to);
        }
        let read_at = ctx.now();
        ctx.stats.add_bytes(up, n);
        write_all(to, &buf[..n], ctx.activity).await?;
        ctx.chunk_done(up, read_at);
    }
}

/// Encrypting pump: plaintext from `plain` → sealed chunks to `tunnel`.
///
/// Plaintext is read straight into the payload slot of `frame` (one
/// [`MAX_FRAME`] buffer) and sealed in place. EOF on `plain` becomes the
/// authenticated end chunk followed by FIN.
pub async fn seal_pump(
    plain: &Conn,
    tunnel: &Conn,
    enc: &mut Encoder,
    frame: &mut [u8],
    read_size: usize,
    ctx: &PumpCtx<'_>,
) -> Result<(), PumpError> {
    let up = plain.peer == Peer::Downstream;
    let read_size = read_size.clamp(1, BULK_PAYLOAD);
    loop {
        let n = read(
            plain,
            &mut frame[HEADER_LEN..HEADER_LEN + read_size],
            ctx.activity,
        )
        .await?;
        if n == 0 {
            let mut end = [0u8; END_LEN];
            enc.seal_end(&mut end)?;
            write_all(tunnel, &end, ctx.activity).await?;
            return shutdown_write(tunnel);
        }
        let read_at = ctx.now();
        ctx.stats.add_bytes(up, n);
        let total = enc.seal_in_place(frame, n)?;
        write_all(tunnel, &frame[..total], ctx.activity).await?;
        ctx.chunk_done(up, read_at);
    }
}

/// Decrypting pump: sealed chunks from `tunnel` → plaintext to `plain`.
///
/// `buf` is one [`MAX_FRAME`] buffer: the decoder authenticates each header
/// before waiting for its body, so a whole chunk always fits. Only
/// authenticated plaintext is written. The end chunk becomes FIN; EOF without
/// it is [`PumpError::Truncated`].
pub async fn open_pump(
    tunnel: &Conn,
    plain: &Conn,
    dec: &mut Decoder,
    buf: &mut [u8],
    ctx: &PumpCtx<'_>,
) -> Result<(), PumpError> {
    debug_assert!(buf.len() >= MAX_FRAME);
    let up = tunnel.peer == Peer::Downstream;
    let (mut start, mut end) = (0usize, 0usize);
    let mut read_at = None;
    loop {
        match dec.decode(&mut buf[start..end])? {
            Decoded::Data {
                consumed,
                start: s,
                len,
            } => {
                let at = start + s;
                ctx.stats.add_bytes(up, len);
                write_all(plain, &buf[at..at + len], ctx.activity).await?;
                ctx.chunk_done(up, read_at);
                start += consumed;
            }
            Decoded::End { .. } => return shutdown_write(plain),
            Decoded::NeedMore => {
                buf.copy_within(start..end, 0);
                end -= start;
                start = 0;
                let n = read(tunnel, &mut buf[end..], ctx.activity).await?;
                if n == 0 {
                    return Err(PumpError::Truncated);
                }
                read_at = ctx.now();
                end += n;
            }
        }
    }
}

/// Drives two fallible futures concurrently: returns `Ok` once both succeed,
/// or the first error as soon as either fails (the other is dropped).
pub async fn both<E>(
    a: impl Future<Output = Result<(), E>>,
    b: impl Future<Output = Result<(), E>>,
) -> Result<(), E> {
    let (mut a, mut b) = (pin!(a), pin!(b));
    let (mut a_done, mut b_done) = (false, false);
    poll_fn(|cx| {
        if !a_done {
            if let Poll::Ready(r) = a.as_mut().poll(cx) {
                r?;
                a_done = true;
            }
        }
        if !b_done {
            if let Poll::Ready(r) = b.as_mut().poll(cx) {
                r?;
                b_done = true;
            }
        }
        if a_done && b_done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await
}

/// Races `main` against the idle clock and the shard's abort trigger.
pub async fn supervise(
    main: impl Future<Output = CloseReason>,
    activity: &Activity,
    idle: Duration,
    abort: &Trigger,
) -> CloseReason {
    let idle = async {
        activity.idle(idle).await;
        CloseReason::IdleTimeout
    };
    let drained = async {
        abort.wait().await;
        CloseReason::Drained
    };
    futures_lite::future::or(main, futures_lite::future::or(idle, drained)).await
}

/// Runs the two directions of a pair to completion and closes it: cleanly
/// (both FINs already sent by the pumps) or, for any other outcome, with RST
/// on both sockets.
pub async fn run_pair(
    client: &Conn,
    upstream: &Conn,
    up: impl Future<Output = Result<(), PumpError>>,
    down: impl Future<Output = Result<(), PumpError>>,
    activity: &Activity,
    idle: Duration,
    abort: &Trigger,
) -> CloseReason {
    let relay = async {
        match both(up, down).await {
            Ok(()) => CloseReason::Clean,
            Err(e) => e.reason(),
        }
    };
    let reason = supervise(relay, activity, idle, abort).await;
    if reason != CloseReason::Clean {
        client.abort();
        upstream.abort();
    }
    reason
}
