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
use std::time::Duration;

use futures_lite::future::poll_fn;
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;

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

/// A failure on one side of the relay.
#[derive(Debug, thiserror::Error)]
#[error("{peer:?} {op}: {source}")]
pub struct PumpError {
    /// The side whose socket failed.
    pub peer: Peer,
    /// What we were doing.
    pub op: &'static str,
    /// The OS error.
    #[source]
    pub source: io::Error,
}

impl PumpError {
    fn new(peer: Peer, op: &'static str, source: io::Error) -> Self {
        PumpError { peer, op, source }
    }
}

/// What a pump needs from its surroundings.
pub struct PumpCtx<'a> {
    /// Idle clock shared by both directions.
    pub activity: &'a Activity,
    /// Shard counters.
    pub stats: &'a ShardStats,
}

/// Writes all of `buf` to `to`, touching the idle clock on each progress.
pub async fn write_all(to: &Conn, mut buf: &[u8], activity: &Activity) -> Result<(), PumpError> {
    while !buf.is_empty() {
        let n = to
            .write(buf)
            .await
            .map_err(|e| PumpError::new(to.peer, "write", e))?;
        if n == 0 {
            let e = io::Error::new(io::ErrorKind::WriteZero, "peer accepted no bytes");
            return Err(PumpError::new(to.peer, "write", e));
        }
        activity.touch();
        buf = &buf[n..];
    }
    Ok(())
}

/// Copies `from` → `to` until EOF, then sends FIN to `to`.
pub async fn pump(
    from: &Conn,
    to: &Conn,
    buf: &mut [u8],
    ctx: &PumpCtx<'_>,
) -> Result<(), PumpError> {
    let up = from.peer == Peer::Downstream;
    loop {
        let n = from
            .read(buf)
            .await
            .map_err(|e| PumpError::new(from.peer, "read", e))?;
        if n == 0 {
            return to
                .shutdown_write()
                .map_err(|e| PumpError::new(to.peer, "shutdown", e));
        }
        ctx.activity.touch();
        ctx.stats.add_bytes(up, n);
        write_all(to, &buf[..n], ctx.activity).await?;
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

/// Relays plain bytes between `client` and `upstream` until both directions
/// end, one side fails, the pair idles out, or the shard aborts it.
pub async fn run_plain(
    client: Conn,
    upstream: Conn,
    buffer_size: usize,
    idle: Duration,
    stats: &ShardStats,
    abort: &Trigger,
) -> CloseReason {
    let activity = Activity::new();
    let ctx = PumpCtx {
        activity: &activity,
        stats,
    };
    let mut up_buf = vec![0u8; buffer_size];
    let mut down_buf = vec![0u8; buffer_size];
    let relay = async {
        match both(
            pump(&client, &upstream, &mut up_buf, &ctx),
            pump(&upstream, &client, &mut down_buf, &ctx),
        )
        .await
        {
            Ok(()) => CloseReason::Clean,
            Err(e) => e.peer.reset_reason(),
        }
    };
    let reason = supervise(relay, &activity, idle, abort).await;
    if reason != CloseReason::Clean {
        client.abort();
        upstream.abort();
    }
    reason
}
