//! The completion-driven relay: every pair's two directions as one state
//! machine per shard, driven straight from io_uring completions.
//!
//! ```text
//!   client ──read──▶ [buf] ──(copy/seal/open)──write──▶ upstream   (half 0)
//!   client ◀──write──(copy/seal/open)── [buf] ◀──read── upstream   (half 1)
//! ```
//!
//! Why not a future per direction (what [`crate::relay`] ran until
//! session 11): each readiness event was then a glommio `Source`
//! completion, a task wake, a task run and a poll through the session's
//! futures down to the socket. For request-sized messages that user-space
//! work per event was most of what a relay cost above the kernel's own
//! (docs/BENCHMARKS.md, "The floor"). Here each socket has one multishot
//! poll (`glommio::raw`, no `Source`), and the shard's one driver task
//! ([`drive`]) hands each batch of completions to
//! [`Engine::on_completions`], which reads, writes, seals, opens and splices
//! with plain syscalls: the shape of an epoll relay
//! (benches/floor/relay.c), on io_uring.
//!
//! The rules are those of [`crate::relay`]:
//!
//! * Each direction owns one buffer; nothing more is read from a side
//!   until what was read from it has been written to the other, so a slow
//!   reader stalls its writer and memory per connection is bounded. A
//!   write that finds no room arms a one-shot `POLLOUT` poll.
//! * A read that fills the buffer marks a transfer ([`crate::transfer`]):
//!   a plain direction then splices through a pipe, a sealing or opening
//!   one moves [`BATCH`] chunks per syscall, while the shard's budget
//!   lasts.
//! * EOF from one side becomes FIN to the other (after the end chunk, when
//!   sealing; an opening direction passes FIN on only once the tunnel's own
//!   FIN follows the end chunk, and EOF without it is
//!   [`SessionError::Truncated`]); the pair ends when both directions have
//!   ended. On a keep-alive tunnel (docs/PROTOCOL.md §4.1) the end chunks
//!   carry no FIN, an opening direction passes FIN on as soon as it opens
//!   the end chunk, and the pair ends at the session boundary, handing the
//!   tunnel's cipher states and any bytes read past the end back ([`Kept`]).
//! * An error on either side ends both at once, with the side named; the
//!   session then resets both sockets.
//! * Idle timeout and the drain's abort come from the shard's sweep, which
//!   wakes the session; dropping the [`Relay`] ends the pair.
//!
//! A short read is taken as "drained" (no `recv` until the next
//! completion), unless the kernel says bytes stay queued (`TCP_INQ`, see
//! `drained`: `recv` stops short just before TCP's urgent mark, with the
//! bytes behind it already queued and no wake-up to come for them), or a
//! completion reported the peer's FIN (`POLLRDHUP`/`POLLHUP`): no wake-up
//! follows a FIN already seen, so from then on the side is read to EOF.
//! Asking for `TCP_INQ` costs every read (`recvmsg` with a control message
//! instead of `recv`: 2–8% of a `forward` pair's CPU at 1 KiB requests) and
//! a `setsockopt` per socket, for data almost no peer sends. So a side
//! reads with `TCP_INQ` only once urgent data may have reached it: the
//! shard owns each socket of a pair for `SIGURG` (`F_SETOWN_EX` to its
//! thread, `sys::watch_urgent`), which the kernel sends when an urgent
//! pointer arrives, before it queues that segment's data; the signal does
//! not say which socket, so every side of the shard still reading plainly
//! switches to `TCP_INQ` (`Engine::urgent_signal`, at most once per side),
//! and reads once more at once. A socket that had urgent data pending
//! before it was watched (`recv(MSG_OOB | MSG_PEEK)` tells) reads with
//! `TCP_INQ` from the start. An upstream socket is owned before its
//! connect (`Sock::owned_since`), so it needs that check only if a
//! `SIGURG` reached the shard between then and the pair's start (one
//! `recv` fewer per connection, and one of the calls that contend for the
//! socket's lock under connection churn). Until session 19 the switch came with the
//! poll's `POLLPRI`, which was wrong in practice: an io_uring poll
//! completion carries the wake-up's key, not a fresh `tcp_poll`, and TCP's
//! data wake-up (`sock_def_readable`) always names `EPOLLIN | EPOLLPRI |
//! EPOLLRDNORM | EPOLLRDBAND`, so every side switched at its first data,
//! and paid about 250 ns per read (docs/BENCHMARKS.md, session 19).
//! The switch is made before the completion that the urgent segment's
//! data posts is handled (the signal came before the data was queued), so
//! a read that stopped at the mark is always followed by one that steps
//! over. A data wake-up after a completion was posted posts another, so no data is
//! left unread. At the mark itself, a read answers EAGAIN, with the bytes
//! behind it queued, while a signal is pending for the thread (another
//! socket's `SIGURG`): a read that found nothing while a `SIGURG` came is
//! made again (`sys::recv_inq`; shards block every other signal the
//! process catches), and
//! after a few, the direction is pumped again from the next loop iteration
//! (`come_back`). `splice(2)` stops at the urgent mark too, without a way
//! past it: there a `recv` steps over the urgent byte (see `splice`).
//!
//! A pair's slot is freed only after the last completion of each of its
//! polls (cancelled with `IORING_OP_ASYNC_CANCEL` when the pair ends), so a
//! late completion never reaches a reused slot; tokens carry a generation
//! too.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use glommio::raw::{self, Completion};

use crate::access_log::Record;
use crate::error::{Peer, SessionError};
use crate::metrics::{Hist, Timings};
use crate::proto::{
    Decoded, Decoder, Encoder, ProtoError, END_LEN, LEN_LEN, MAX_FRAME, MAX_PAYLOAD, TAG_LEN,
};
use crate::stats::ShardStats;
use crate::transfer::{BatchPool, PipePool, BATCH};
use crate::watchdog::Watch;

const POLLIN: i16 = libc::POLLIN;
const POLLOUT: i16 = libc::POLLOUT;
const POLLERR: i16 = libc::POLLERR;
const POLLHUP: i16 = libc::POLLHUP;
const POLLRDHUP: i16 = libc::POLLRDHUP;
/// What a side's multishot read poll waits for.
const READ_EVENTS: i16 = POLLIN | POLLRDHUP | POLLERR | POLLHUP;

/// What a side's multishot read poll waits for. Urgent data is not asked
/// for here: a completion's `POLLPRI` names the wake-up, not the socket's
/// state (see the module's doc); `SIGURG` tells it instead, on every side:
/// a tunnel side's peer is our own entry or exit, but an urgent byte
/// slipped into its stream (by a peer holding the key, or injected on the
/// path; the kernel strips it, so every chunk stays valid) would otherwise
/// stall the session until its idle timeout.
const READ_POLL: i16 = READ_EVENTS;

/// A socket of a pair, as [`Engine::start`] takes it.
#[derive(Clone, Copy, Debug)]
pub struct Sock {
    /// The descriptor.
    pub fd: RawFd,
    /// This thread has owned the socket for `SIGURG` since before it was
    /// connected (`sys::own_for_urgent`): `sys::urgent_epoch` as read just
    /// before it was owned. Then urgent data can have reached it only if a
    /// `SIGURG` has reached this thread since, and the relay checks for
    /// pending urgent data (one `recv`) only then.
    pub owned_since: Option<u32>,
}

impl Sock {
    /// A socket not (yet) owned for `SIGURG`: an accepted one, which may
    /// have received bytes before the accept.
    pub fn new(fd: RawFd) -> Self {
        Sock {
            fd,
            owned_since: None,
        }
    }

    /// Makes this thread the socket's `SIGURG` owner if it is not yet, and
    /// says whether urgent data may be pending already (see the module's
    /// doc); also `true` if the socket cannot be watched.
    fn watch_urgent(self) -> bool {
        match self.owned_since {
            Some(epoch) if crate::sys::urgent_epoch() == epoch => false,
            Some(_) => crate::sys::urgent_pending(self.fd),
            None => crate::sys::watch_urgent(self.fd),
        }
    }
}

/// Side 0 is the client (downstream), side 1 the upstream.
fn peer(side: usize) -> Peer {
    if side == 0 {
        Peer::Downstream
    } else {
        Peer::Upstream
    }
}

/// What a keep-alive tunnel (docs/PROTOCOL.md §4.1) keeps when a pair ends
/// at a session boundary, both directions having passed their end chunk:
/// the cipher states, each ready for the next session, and the bytes read
/// from the tunnel past the end chunk (the next session's first chunk, or
/// an exit's unprompted status), which belong to what comes next.
pub struct Kept {
    /// Seals toward the tunnel side.
    pub encoder: Encoder,
    /// Opens from the tunnel side.
    pub decoder: Decoder,
    /// Tunnel bytes read past the end chunk (at most one chunk buffer).
    pub leftover: Vec<u8>,
}

/// How a pair ended without an error: `Some` at a keep-alive tunnel's
/// session boundary (the tunnel stays open, see [`Kept`]), `None` once both
/// directions passed FIN.
pub type Ended = Option<Box<Kept>>;

/// What a direction does to the bytes it moves.
pub enum Mode {
    /// `forward`: unchanged (and spliced in transfers).
    Copy,
    /// Plaintext in, sealed chunks out (toward the tunnel side).
    Seal(Encoder),
    /// Sealed chunks in (from the tunnel side), plaintext out.
    Open(Decoder),
}

// A batch buffer holds one large chunk (an opening direction's room for
// one, `open`; a sealing direction's one slot, `large_slot`).
const _: () = assert!(BATCH * MAX_FRAME >= crate::proto::LARGE_FRAME);

/// Chunks whose plaintext one gathered write sends at most.
const GATHER: usize = 8;

/// One direction: bytes read from side `s`, to be written to side `1 - s`.
struct Half {
    mode: Mode,
    /// The direction's own buffer: `--buffer-size` (copy), one chunk
    /// (tunnel roles).
    buf: Vec<u8>,
    /// Transfer mode in the tunnel roles: a [`BATCH`]-chunk buffer that
    /// replaces `buf` (see [`crate::transfer`]).
    batch: Option<Vec<u8>>,
    /// Sealing: the end chunk is queued; FIN follows it.
    ending: bool,
    /// Opening: undecoded input is `start..end` of the buffer; opened
    /// plaintext ranges `out[out_i..out_n]` (the first `skip` bytes of
    /// `out[out_i]` written) wait to be written; `end_seen`: the end chunk
    /// was decoded, the tunnel's FIN is next.
    start: usize,
    end: usize,
    out: [(usize, usize); GATHER],
    out_i: usize,
    out_n: usize,
    skip: usize,
    end_seen: bool,
    /// Bytes followed the end chunk: an error once what came before it is
    /// written.
    after_end: bool,
    /// A read came back short: the socket is drained until the next
    /// completion.
    drained: bool,
    /// `buf[off..len]` is read and not yet written.
    off: usize,
    len: usize,
    /// The side sent FIN.
    eof: bool,
    /// FIN passed on to the other side.
    shut: bool,
    /// A completion reported the side's FIN or hang-up: read to EOF.
    gone: bool,
    /// Urgent data may have reached the side (a `SIGURG`, or pending when
    /// the pair started): its reads ask how much stays queued (`TCP_INQ`)
    /// from then on (see `drained`).
    urgent: bool,
    /// Bytes read from the side (and counted in the shard's stats).
    bytes: u64,
    /// Bytes of `bytes` already added to the connection's record.
    synced: u64,
    /// Transfer mode: the pipe this direction splices through (read end,
    /// write end), and the bytes it holds.
    pipe: Option<(OwnedFd, OwnedFd)>,
    held: usize,
    /// When the bytes in flight were read, if chunks are timed.
    read_at: Option<Instant>,
}

impl Half {
    fn new(mode: Mode, buf: Vec<u8>) -> Self {
        Half {
            mode,
            buf,
            batch: None,
            ending: false,
            start: 0,
            end: 0,
            out: [(0, 0); GATHER],
            out_i: 0,
            out_n: 0,
            skip: 0,
            end_seen: false,
            after_end: false,
            drained: false,
            off: 0,
            len: 0,
            eof: false,
            shut: false,
            gone: false,
            urgent: false,
            bytes: 0,
            synced: 0,
            pipe: None,
            held: 0,
            read_at: None,
        }
    }
}

struct Pair {
    gen: u32,
    fds: [RawFd; 2],
    /// The tunnel side is a keep-alive tunnel (docs/PROTOCOL.md §4.1): its
    /// end chunks mark a session boundary and carry no FIN, and the pair
    /// ends once both have passed, leaving the tunnel open ([`Kept`]).
    keepalive: bool,
    /// Plaintext read per chunk when sealing.
    read_size: usize,
    half: [Half; 2],
    /// A multishot read poll is armed on the side.
    reading: [bool; 2],
    /// A one-shot `POLLOUT` poll is armed on the side.
    writing: [bool; 2],
    /// Polls whose last completion has not arrived.
    live_polls: u32,
    /// Set once: how the pair ended. Taken by the [`Relay`].
    outcome: Option<Result<Ended, SessionError>>,
    finished: bool,
    /// The [`Relay`] is gone: free the slot once no poll is live.
    detached: bool,
    waker: Option<Waker>,
    watch: Rc<Watch>,
    /// When the first upstream bytes were written to the client.
    first_down: Option<Instant>,
    /// The connection's accept time, and whether its first upstream chunk
    /// has been timed (`first_byte_seconds`), as in its [`Record`].
    accepted_at: Instant,
    first_up_timed: bool,
}

/// Token layout: slot index (bits 32..62, below `glommio::raw`'s
/// reserved bits), generation (bits 2..32, mod 2^30), kind (bits 0..2: bit 1 set for a `POLLOUT` poll, bit 0 the side).
fn token(idx: usize, gen: u32, write: bool, side: usize) -> u64 {
    ((idx as u64) << 32)
        | (u64::from(gen & 0x3fff_ffff) << 2)
        | (u64::from(write) << 1)
        | side as u64
}

/// What the engine needs of its shard: `crate::context::ShardCtx`
/// implements it (a trait, so that this module does not depend on the
/// context that holds it).
pub trait Host {
    /// The shard's engine.
    fn engine(&self) -> &Engine;
    /// Byte counters.
    fn stats(&self) -> &ShardStats;
    /// Latency histograms.
    fn timings(&self) -> &Timings;
    /// Pipes for transfers (`forward`).
    fn pipes(&self) -> &PipePool;
    /// Batch buffers for transfers (tunnel roles).
    fn batches(&self) -> &BatchPool;
    /// Takes back a relay buffer.
    fn recycle(&self, buf: Vec<u8>);
}

/// A shard's completion-driven relays.
#[derive(Default)]
pub struct Engine {
    slots: RefCell<Vec<Option<Box<Pair>>>>,
    free: RefCell<Vec<usize>>,
    gen: Cell<u32>,
    /// Sides (slot, generation, side) that read without `TCP_INQ`: all of
    /// them switch to it when this shard gets a `SIGURG` (see
    /// [`Engine::urgent_signal`]). Entries of pairs that ended are
    /// dropped then, or when the list outgrows the slots (see
    /// [`Engine::start`]).
    plain: RefCell<Vec<(usize, u32, usize)>>,
}

impl Engine {
    /// Starts relaying between two connected sockets (`socks[0]` the
    /// client, `socks[1]` the upstream; blocking or not: every `recv`/`send` passes
    /// `MSG_DONTWAIT`, and a direction that starts splicing sets
    /// `O_NONBLOCK`), each direction with its own buffer (`bufs[s]` for the
    /// bytes read from side `s`), moving them as `modes[s]` says; a sealing
    /// direction reads at most `read_size` bytes per chunk. The sockets stay
    /// the caller's; it must keep them open until the returned [`Relay`] is
    /// dropped. Returns the pair's slot and generation.
    ///
    /// `tunnel`, for the tunnel roles: whether the tunnel is a keep-alive
    /// one (see [`Pair::keepalive`]), and tunnel bytes already read for
    /// the opening direction (a keep-alive session's chunks that came with
    /// its start or status; at most its buffer, one [`MAX_FRAME`]), opened
    /// before anything else is read.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        &self,
        socks: [Sock; 2],
        bufs: [Vec<u8>; 2],
        modes: [Mode; 2],
        read_size: usize,
        watch: Rc<Watch>,
        rec: &Record,
        tunnel: (bool, &[u8]),
    ) -> (usize, u32) {
        let gen = self.gen.get().wrapping_add(1);
        self.gen.set(gen);
        let [b0, b1] = bufs;
        let [m0, m1] = modes;
        let mut half = [Half::new(m0, b0), Half::new(m1, b1)];
        // Urgent data (see the module's doc): this shard owns both sockets
        // for SIGURG from now on; one with urgent data pending already, or
        // that cannot be watched, reads with TCP_INQ at once. An upstream
        // socket owned since before its connect needs no check unless a
        // SIGURG came since: such a signal may have been taken (by
        // `on_completion`) before this side was listed in `plain`.
        let fds = socks.map(|s| s.fd);
        for (h, sock) in half.iter_mut().zip(socks) {
            if sock.watch_urgent() {
                h.urgent = true;
                crate::sys::enable_inq(sock.fd);
            }
        }
        let (keepalive, initial) = tunnel;
        if !initial.is_empty() {
            let h = half
                .iter_mut()
                .find(|h| matches!(h.mode, Mode::Open(_)))
                .expect("tunnel bytes need an opening direction");
            assert!(initial.len() <= h.buf.len(), "more than one chunk buffer");
            h.buf[..initial.len()].copy_from_slice(initial);
            h.end = initial.len();
        }
        let pair = Box::new(Pair {
            gen,
            fds,
            keepalive,
            read_size,
            half,
            reading: [true, true],
            writing: [false, false],
            live_polls: 2,
            outcome: None,
            finished: false,
            detached: false,
            waker: None,
            watch,
            first_down: None,
            accepted_at: rec.accepted_at,
            first_up_timed: rec.first_up_timed.get(),
        });
        let mut slots = self.slots.borrow_mut();
        let idx = match self.free.borrow_mut().pop() {
            Some(i) => {
                slots[i] = Some(pair);
                i
            }
            None => {
                slots.push(Some(pair));
                slots.len() - 1
            }
        };
        let mut plain = self.plain.borrow_mut();
        for (s, &fd) in fds.iter().enumerate() {
            raw::poll_add(fd, READ_POLL, true, token(idx, gen, false, s));
            if !slots[idx].as_ref().is_some_and(|p| p.half[s].urgent) {
                plain.push((idx, gen, s));
            }
        }
        // Bounded by the live pairs: entries of ended ones go once the list
        // is twice what the live sides need.
        if plain.len() > 4 * slots.len() + 64 {
            plain.retain(|&(i, g, _)| slots[i].as_ref().is_some_and(|p| p.gen == g));
        }
        (idx, gen)
    }

    /// A `SIGURG` reached this shard: some socket it owns got an urgent
    /// pointer, and nothing says which. Every side still reading without
    /// `TCP_INQ` switches to it, and reads once more now, in case its
    /// last read stopped short at the new mark with bytes queued behind it
    /// (the completion of those bytes' wake-up may have been handled
    /// before this). Each side switches at most once, so a peer that sends
    /// urgent data again and again costs the shard no more than one switch
    /// per connection: its reads then cost what every read did before
    /// this check (see the module's doc).
    fn urgent_signal(&self, ctx: &impl Host) {
        let plain = std::mem::take(&mut *self.plain.borrow_mut());
        for (idx, gen, s) in plain {
            let mut slots = self.slots.borrow_mut();
            let Some(Some(p)) = slots.get_mut(idx) else {
                continue;
            };
            if p.gen != gen || p.half[s].urgent {
                continue;
            }
            p.half[s].urgent = true;
            crate::sys::enable_inq(p.fds[s]);
            if !p.finished && p.reading[s] {
                p.half[s].drained = false;
                let r = pump(p, s, idx, ctx);
                settle(p, idx, r);
            }
        }
    }

    /// Pairs whose slot is still taken: running, or ended with a poll the
    /// kernel has not yet released.
    pub fn live(&self) -> usize {
        self.slots.borrow().len() - self.free.borrow().len()
    }

    /// Handles one batch of completions.
    pub fn on_completions(&self, batch: &[Completion], ctx: &impl Host) {
        for c in batch {
            self.on_completion(*c, ctx);
        }
    }

    fn on_completion(&self, c: Completion, ctx: &impl Host) {
        // Before any completion is handled: the signal was sent before the
        // urgent segment's data was queued, so before this completion, or
        // any that data's wake-up posts, could be reaped.
        if crate::sys::take_urgent_signal() {
            self.urgent_signal(ctx);
        }
        let idx = (c.token >> 32) as usize;
        let gen = ((c.token >> 2) & 0x3fff_ffff) as u32;
        let write = c.token & 2 != 0;
        let side = (c.token & 1) as usize;
        let mut slots = self.slots.borrow_mut();
        let Some(Some(p)) = slots.get_mut(idx) else {
            return;
        };
        if p.gen & 0x3fff_ffff != gen {
            return;
        }
        if c.removal {
            // A removal that found the poll running and left it armed
            // (`POLL_REMOVE`'s `-EALREADY`; glommio::raw cancels instead,
            // which does not fail so): remove it again, or its last
            // completion never comes and the slot is never freed.
            let live = if write {
                p.writing[side]
            } else {
                p.reading[side]
            };
            if c.result == -libc::EALREADY && live {
                raw::poll_remove(c.token);
            }
            return;
        }
        if !c.more {
            p.live_polls -= 1;
            if write {
                p.writing[side] = false;
            } else {
                p.reading[side] = false;
            }
        }
        if !p.finished {
            let r = if c.result < 0 {
                // The kernel refused or failed the poll itself (a kernel
                // without multishot polls answers `EINVAL`): end the pair,
                // never re-arm a poll that will fail the same way again.
                let e = io::Error::from_raw_os_error(-c.result);
                Err(io_err(side, "poll", e))
            } else if write {
                // Room on `side`: flush the direction that writes into it.
                pump(p, 1 - side, idx, ctx)
            } else {
                let mask = c.result as i16;
                if mask & (POLLRDHUP | POLLHUP | POLLERR) != 0 {
                    p.half[side].gone = true;
                }
                p.half[side].drained = false;
                match (mask & POLLERR != 0)
                    .then(|| crate::sys::take_socket_error(p.fds[side]))
                    .flatten()
                {
                    // A reset (or any socket error) ends the pair now,
                    // whatever its directions are doing: one whose bytes
                    // wait for room, or one that already ended, would not
                    // touch this socket again, and the other peer would
                    // not hear of it until its own idle timeout.
                    Some(e) => Err(io_err(side, "read", e)),
                    None => pump(p, side, idx, ctx),
                }
            };
            settle(p, idx, r);
        }
        if p.detached && p.live_polls == 0 {
            let pair = slots[idx].take().expect("checked above");
            drop(slots);
            self.release(idx, pair, ctx);
        }
    }

    /// Opens tunnel bytes the pair started with (see [`Engine::start`]):
    /// no completion comes for bytes already read. They count as read
    /// now, when the relay takes them (as a fresh session's first bytes
    /// count from the relay's first read, after the upstream connect), so
    /// that their chunk and the session's first byte are timed like any
    /// other (a keep-alive session's start and data often arrive in one
    /// segment).
    fn kick(&self, idx: usize, ctx: &impl Host) {
        let mut slots = self.slots.borrow_mut();
        let p = slots[idx].as_mut().expect("the relay holds its slot");
        if let Some(s) = (0..2).find(|&s| p.half[s].end > 0) {
            p.half[s].read_at = ctx.timings().enabled().then(Instant::now);
            let r = pump(p, s, idx, ctx);
            settle(p, idx, r);
        }
    }

    /// The session's side of a pair: bytes into `rec`, the outcome once.
    fn poll_pair(
        &self,
        idx: usize,
        gen: u32,
        rec: &Record,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Ended, SessionError>> {
        let mut slots = self.slots.borrow_mut();
        let p = slots[idx].as_mut().expect("the relay holds its slot");
        debug_assert_eq!(p.gen, gen);
        sync(p, rec);
        match p.outcome.take() {
            Some(r) => Poll::Ready(r),
            None => {
                match &p.waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => p.waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
        }
    }

    /// Copies the pair's byte counts into `rec`.
    pub fn sync(&self, idx: usize, rec: &Record) {
        if let Some(Some(p)) = self.slots.borrow_mut().get_mut(idx) {
            sync(p, rec);
        }
    }

    fn detach(&self, idx: usize, ctx: &impl Host) {
        let mut slots = self.slots.borrow_mut();
        let p = slots[idx].as_mut().expect("the relay holds its slot");
        p.detached = true;
        if !p.finished {
            finish(p, idx, Ok(None));
        }
        if p.live_polls == 0 {
            let pair = slots[idx].take().expect("checked above");
            drop(slots);
            self.release(idx, pair, ctx);
        }
    }

    /// Frees a slot whose polls are all gone: buffers and empty pipes back
    /// to the shard's pools.
    fn release(&self, idx: usize, pair: Box<Pair>, ctx: &impl Host) {
        self.free.borrow_mut().push(idx);
        let [a, b] = pair.half;
        for h in [a, b] {
            ctx.recycle(h.buf);
            if let Some(pipe) = h.pipe {
                ctx.pipes().give_back(pipe, h.held);
            }
            if let Some(batch) = h.batch {
                ctx.batches().give_back(batch);
            }
        }
    }
}

fn sync(p: &mut Pair, rec: &Record) {
    for s in 0..2 {
        let h = &mut p.half[s];
        if h.bytes > h.synced {
            rec.add_bytes(s == 0, (h.bytes - h.synced) as usize);
            h.synced = h.bytes;
        }
    }
    if p.first_up_timed {
        rec.first_up_timed.set(true);
    }
    if rec.first_byte.get().is_none() {
        if let Some(at) = p.first_down {
            rec.first_byte
                .set(Some(at.saturating_duration_since(rec.accepted_at)));
        }
    }
}

/// After a pump of the pair: ends it on an error or once both directions
/// have passed FIN (or, on a keep-alive tunnel, their end chunks), else
/// re-arms any read poll whose last completion came.
fn settle(p: &mut Pair, idx: usize, r: Result<(), SessionError>) {
    match r {
        Err(e) => finish(p, idx, Err(e)),
        Ok(()) if p.half[0].shut && p.half[1].shut => {
            let kept = p.keepalive.then(|| keep(p));
            finish(p, idx, Ok(kept));
        }
        Ok(()) => {
            for s in 0..2 {
                if !p.reading[s] {
                    p.reading[s] = true;
                    p.live_polls += 1;
                    raw::poll_add(p.fds[s], READ_POLL, true, token(idx, p.gen, false, s));
                }
            }
        }
    }
}

/// A keep-alive tunnel's state at its session boundary (both directions
/// shut): the cipher states, ready for the next session, and the tunnel
/// bytes read past the end chunk. The halves are not pumped again.
fn keep(p: &mut Pair) -> Box<Kept> {
    let (mut encoder, mut decoder, mut leftover) = (None, None, Vec::new());
    for h in &mut p.half {
        match std::mem::replace(&mut h.mode, Mode::Copy) {
            Mode::Seal(mut e) => {
                e.next_session();
                encoder = Some(e);
            }
            Mode::Open(mut d) => {
                d.next_session();
                decoder = Some(d);
                let buf = h.batch.as_deref().unwrap_or(&h.buf);
                leftover = buf[h.start..h.end].to_vec();
            }
            Mode::Copy => {}
        }
    }
    Box::new(Kept {
        encoder: encoder.expect("a keep-alive pair seals one way"),
        decoder: decoder.expect("a keep-alive pair opens one way"),
        leftover,
    })
}

/// Ends the pair: no more events are handled, its polls are removed, and
/// the session is woken with `outcome`.
fn finish(p: &mut Pair, idx: usize, outcome: Result<Ended, SessionError>) {
    p.finished = true;
    p.outcome = Some(outcome);
    for s in 0..2 {
        if p.reading[s] {
            raw::poll_remove(token(idx, p.gen, false, s));
        }
        if p.writing[s] {
            raw::poll_remove(token(idx, p.gen, true, s));
        }
    }
    if let Some(w) = p.waker.take() {
        w.wake();
    }
}

fn io_err(side: usize, op: &'static str, source: io::Error) -> SessionError {
    SessionError::Io {
        peer: peer(side),
        op,
        source,
    }
}

/// Whether a read of `n` bytes into `room` left the socket drained, so
/// that the next read waits for the socket's next completion. A short read
/// is taken as drained, unless the kernel said bytes stay queued (`inq`,
/// `TCP_INQ`, asked for once the side reported urgent data: a read stops
/// short before TCP's urgent mark, with the bytes behind it already queued
/// and no wake-up to come for them), or the peer's FIN was seen (`gone`: no
/// wake-up follows it either, so read to EOF).
fn drained(n: usize, room: usize, inq: Option<usize>, gone: bool) -> bool {
    n < room && !gone && inq.is_none_or(|q| q == 0)
}

/// Arms a one-shot `POLLOUT` poll on side `s`, unless one is armed.
fn want_room(p: &mut Pair, s: usize, idx: usize) {
    if !p.writing[s] {
        p.writing[s] = true;
        p.live_polls += 1;
        raw::poll_add(p.fds[s], POLLOUT, false, token(idx, p.gen, true, s));
    }
}

/// The bytes read from side `s` have all been written to the other side:
/// the chunk's relay latency, the connection's first byte each way.
fn delivered(p: &mut Pair, s: usize, ctx: &impl Host) {
    if s == 1 && p.first_down.is_none() {
        p.first_down = Some(Instant::now());
    }
    if let Some(read_at) = p.half[s].read_at.take() {
        let now = Instant::now();
        let timings = ctx.timings();
        timings.record(
            if s == 0 {
                Hist::RelayUp
            } else {
                Hist::RelayDown
            },
            now - read_at,
        );
        if s == 0 && !p.first_up_timed {
            p.first_up_timed = true;
            timings.record(Hist::FirstByte, now - p.accepted_at);
        }
    }
}

/// Bytes were read from side `s`.
fn read(p: &mut Pair, s: usize, n: usize, ctx: &impl Host) {
    let h = &mut p.half[s];
    h.read_at = ctx.timings().enabled().then(Instant::now);
    if matches!(h.mode, Mode::Open(_)) {
        // Counted when opened: plaintext only.
        p.watch.touch();
        return;
    }
    counted(p, s, n, ctx);
}

/// `n` plaintext bytes moved in direction `s`.
fn counted(p: &mut Pair, s: usize, n: usize, ctx: &impl Host) {
    p.half[s].bytes += n as u64;
    ctx.stats().add_bytes(s == 0, n);
    p.watch.touch();
}

/// Writes `h`'s pending bytes (`buf[off..len]` of its active buffer) to
/// `to`; `Ok(true)` when all are written. `more`: `MSG_MORE` (the end
/// chunk, whose FIN follows in the same segment).
fn flush(h: &mut Half, to: RawFd, more: bool) -> io::Result<bool> {
    let buf = match &h.batch {
        Some(b) => &b[h.off..h.len],
        None => &h.buf[h.off..h.len],
    };
    let r = if more {
        crate::sys::send_more(to, buf)
    } else {
        crate::sys::send_fd(to, buf)
    };
    match r {
        Ok(n) => h.off += n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e),
    }
    Ok(h.off == h.len)
}

/// Writes direction `s`'s pending bytes to the other side. `Ok(true)`:
/// all written, the buffer is empty again; `Ok(false)`: the rest waits for
/// room (a `POLLOUT` poll is armed). `more` as in [`flush`].
fn write_pending(p: &mut Pair, s: usize, idx: usize, more: bool) -> Result<bool, SessionError> {
    let to = p.fds[1 - s];
    let done = flush(&mut p.half[s], to, more).map_err(|e| io_err(1 - s, "write", e))?;
    p.watch.touch();
    if done {
        let h = &mut p.half[s];
        h.off = 0;
        h.len = 0;
    } else {
        want_room(p, 1 - s, idx);
    }
    Ok(done)
}

/// Direction `s` has ended: FIN to the other side, once.
fn pass_fin(p: &mut Pair, s: usize) -> Result<(), SessionError> {
    let h = &mut p.half[s];
    if !h.shut {
        crate::sys::shutdown_write_fd(p.fds[1 - s]).map_err(|e| io_err(1 - s, "shutdown", e))?;
        h.shut = true;
    }
    Ok(())
}

/// [`pump`] for sealing: plaintext from side `s` → sealed chunks to the
/// other side, whose end chunk and FIN follow EOF. A read that fills a
/// chunk marks a transfer: with a batch buffer to spare, one read then
/// fills up to [`BATCH`] payload slots, laid out so that the sealed chunks
/// are contiguous, and one write sends them all.
fn seal(p: &mut Pair, s: usize, idx: usize, ctx: &impl Host) -> Result<(), SessionError> {
    let from = p.fds[s];
    let size = p.read_size;
    let stride = LEN_LEN + size + TAG_LEN;
    loop {
        let h = &mut p.half[s];
        if h.len > h.off {
            let ending = h.ending;
            // The end chunk and its FIN in one segment; a keep-alive
            // tunnel's end chunk has no FIN behind it.
            let fin = ending && !p.keepalive;
            if !write_pending(p, s, idx, fin)? {
                return Ok(());
            }
            if fin {
                return pass_fin(p, s);
            }
            if ending {
                p.half[s].shut = true;
                return Ok(());
            }
            delivered(p, s, ctx);
        }
        let h = &mut p.half[s];
        if h.shut || h.ending {
            return Ok(());
        }
        if h.drained {
            return Ok(());
        }
        // With large chunks agreed, a batch buffer is one slot: the whole
        // read becomes one chunk (docs/PROTOCOL.md §4).
        let large = match &h.mode {
            Mode::Seal(enc) => large_slot(enc, h.batch.as_deref()),
            _ => unreachable!("seal on a sealing half"),
        };
        let (n, room) = match &mut h.batch {
            Some(batch) if large > 0 => {
                let slot = &mut batch[LEN_LEN..LEN_LEN + large];
                let mut bufs = [std::io::IoSliceMut::new(slot)];
                (crate::sys::recv_inq(from, &mut bufs, h.urgent), large)
            }
            Some(batch) => {
                let mut slots = batch.chunks_mut(stride);
                let mut bufs: [std::io::IoSliceMut<'_>; BATCH] = std::array::from_fn(|_| {
                    let slot = slots.next().expect("BATCH slots");
                    std::io::IoSliceMut::new(&mut slot[LEN_LEN..LEN_LEN + size])
                });
                (
                    crate::sys::recv_inq(from, &mut bufs, h.urgent),
                    BATCH * size,
                )
            }
            None => {
                let slot = &mut h.buf[LEN_LEN..LEN_LEN + size];
                let mut bufs = [std::io::IoSliceMut::new(slot)];
                (crate::sys::recv_inq(from, &mut bufs, h.urgent), size)
            }
        };
        let (n, inq) = match n {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return come_back(p, s, idx),
            Err(e) => return Err(io_err(s, "read", e)),
        };
        let Mode::Seal(enc) = &mut h.mode else {
            unreachable!("seal on a sealing half")
        };
        if n == 0 {
            let mut end = [0u8; END_LEN];
            enc.seal_end(&mut end).map_err(SessionError::Limit)?;
            let out = h.batch.as_mut().unwrap_or(&mut h.buf);
            out[..END_LEN].copy_from_slice(&end);
            h.off = 0;
            h.len = END_LEN;
            h.ending = true;
            continue;
        }
        h.drained = drained(n, room, inq, h.gone);
        let total = match &mut h.batch {
            Some(batch) if large > 0 => {
                let total = enc.seal_in_place(batch, n).map_err(SessionError::Limit)?;
                ctx.stats().add_batched(n);
                total
            }
            Some(batch) => {
                let (mut at, mut left, mut total) = (0, n, 0);
                while left > 0 {
                    let len = left.min(size);
                    total = at
                        + enc
                            .seal_in_place(&mut batch[at..at + stride], len)
                            .map_err(SessionError::Limit)?;
                    at += stride;
                    left -= len;
                }
                ctx.stats().add_batched(n);
                total
            }
            None => enc
                .seal_in_place(&mut h.buf, n)
                .map_err(SessionError::Limit)?,
        };
        h.off = 0;
        h.len = total;
        let full = h.batch.is_none() && n == size;
        read(p, s, n, ctx);
        if full {
            if let Some(batch) = ctx.batches().take_owned(BATCH * stride) {
                // The sealed chunk moves to the batch buffer's first slot.
                let h = &mut p.half[s];
                let mut batch = batch;
                batch[..total].copy_from_slice(&h.buf[..total]);
                h.batch = Some(batch);
            }
        }
    }
}

/// The payload room of a sealing direction's batch buffer used as one large
/// chunk: the encoder's maximum, within the buffer; 0 without large chunks
/// or a batch buffer, or when the buffer holds no more than a 16 KiB chunk
/// (a small `--buffer-size`, which then keeps capping each chunk).
fn large_slot(enc: &Encoder, batch: Option<&[u8]>) -> usize {
    match batch {
        Some(b) if enc.max_payload() > MAX_PAYLOAD => {
            let room = enc.max_payload().min(b.len() - LEN_LEN - TAG_LEN);
            if room > MAX_PAYLOAD {
                room
            } else {
                0
            }
        }
        _ => 0,
    }
}

/// [`pump`] for opening: sealed chunks from side `s` → plaintext to the
/// other side. Only authenticated plaintext is written; the plaintext of
/// every whole chunk in the buffer goes out in one gathered write. The end
/// chunk becomes FIN once the tunnel's own FIN follows it (a byte after it
/// aborts both sides); EOF without it is [`SessionError::Truncated`].
fn open(p: &mut Pair, s: usize, idx: usize, ctx: &impl Host) -> Result<(), SessionError> {
    let (from, to) = (p.fds[s], p.fds[1 - s]);
    let rejected = |source| SessionError::Proto {
        peer: peer(s),
        source,
    };
    loop {
        // 1. Opened plaintext waiting to be written.
        let h = &mut p.half[s];
        if h.out_i < h.out_n {
            let buf: &[u8] = h.batch.as_deref().unwrap_or(&h.buf);
            let mut iov = [std::io::IoSlice::new(&[]); GATHER];
            let k = h.out_n - h.out_i;
            for (j, &(at, len)) in h.out[h.out_i..h.out_n].iter().enumerate() {
                let from = if j == 0 { h.skip } else { 0 };
                iov[j] = std::io::IoSlice::new(&buf[at + from..at + len]);
            }
            let mut n = match crate::sys::send_vectored(to, &iov[..k]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(io_err(1 - s, "write", e)),
            };
            if n > 0 {
                p.watch.touch();
            }
            let h = &mut p.half[s];
            while n > 0 {
                let left = h.out[h.out_i].1 - h.skip;
                if n >= left {
                    n -= left;
                    h.out_i += 1;
                    h.skip = 0;
                } else {
                    h.skip += n;
                    n = 0;
                }
            }
            if h.out_i < h.out_n {
                want_room(p, 1 - s, idx);
                return Ok(());
            }
            h.out_i = 0;
            h.out_n = 0;
            delivered(p, s, ctx);
        }
        // 2. After the end chunk on a keep-alive tunnel: FIN to the plain
        // side at once, and nothing more read here; the bytes behind the
        // end chunk are the next session's (`keep`). But the next session
        // may start only at the boundary, once our own end chunk has gone
        // out (docs/PROTOCOL.md §4.1): a byte from the tunnel before it is
        // fatal, as data after the end is without keep-alive.
        if p.keepalive && p.half[s].end_seen {
            if !p.half[1 - s].shut {
                let early = || {
                    Err(rejected(ProtoError::KeepAlive(
                        "a chunk before the session boundary",
                    )))
                };
                if p.half[s].after_end {
                    return early();
                }
                match crate::sys::peek_fd(from) {
                    Ok(0) => return Err(SessionError::Truncated(peer(s))),
                    Ok(_) => return early(),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(io_err(s, "read", e)),
                }
            }
            return pass_fin(p, s);
        }
        let h = &mut p.half[s];
        // 2. After the end chunk: the tunnel's FIN, and nothing else.
        if h.end_seen {
            if h.after_end {
                return Err(rejected(ProtoError::DataAfterEnd));
            }
            if h.shut {
                return Ok(());
            }
            let mut probe = [0u8; 1];
            return match crate::sys::recv_fd(from, &mut probe) {
                Ok(0) => pass_fin(p, s),
                Ok(_) => Err(rejected(ProtoError::DataAfterEnd)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
                Err(e) => Err(io_err(s, "read", e)),
            };
        }
        // 3. Open the whole chunks in the buffer (at most GATHER a write).
        let Mode::Open(dec) = &mut h.mode else {
            unreachable!("open on an opening half")
        };
        let buf: &mut [u8] = match h.batch.as_mut() {
            Some(b) => b,
            None => &mut h.buf,
        };
        let mut bytes = 0;
        while h.out_n < GATHER {
            match dec.decode(&mut buf[h.start..h.end]).map_err(rejected)? {
                Decoded::Data {
                    consumed,
                    start: at,
                    len,
                } => {
                    h.out[h.out_n] = (h.start + at, len);
                    h.out_n += 1;
                    bytes += len;
                    h.start += consumed;
                }
                Decoded::End { consumed } => {
                    // PROTOCOL.md §4: nothing may follow the end chunk.
                    h.after_end = h.start + consumed < h.end;
                    h.start += consumed;
                    h.end_seen = true;
                    break;
                }
                Decoded::NeedMore => break,
            }
        }
        if h.out_n > 0 || h.end_seen {
            if bytes > 0 {
                if h.batch.is_some() {
                    ctx.stats().add_batched(bytes);
                }
                counted(p, s, bytes, ctx);
            }
            continue;
        }
        // 4. Read more, unless the socket is drained until its next event.
        if h.drained {
            return Ok(());
        }
        buf.copy_within(h.start..h.end, 0);
        h.end -= h.start;
        h.start = 0;
        let room = buf.len() - h.end;
        if room == 0 {
            // A full buffer without a whole chunk: only a large chunk
            // (docs/PROTOCOL.md §4) outgrows the one-chunk buffer, and a
            // batch buffer holds one. The peer sends them only in its
            // transfers, so this direction takes one from the pool, or, with
            // the budget spent, one over it: never more than one per
            // direction, so memory stays bounded per connection.
            if h.batch.is_some() {
                // Cannot happen (a batch buffer holds the largest chunk, see
                // the assertion by `GATHER`); never read into no room.
                return Err(rejected(ProtoError::BadLength(dec.needed())));
            }
            let len = BATCH * MAX_FRAME;
            let pool = ctx.batches();
            let mut b = pool
                .take_owned(len)
                .or_else(|| pool.take_over_budget(len))
                .ok_or(SessionError::OutOfMemory(len))?;
            b[..h.end].copy_from_slice(&h.buf[..h.end]);
            h.batch = Some(b);
            continue;
        }
        let into = &mut [std::io::IoSliceMut::new(&mut buf[h.end..])];
        let (n, inq) = match crate::sys::recv_inq(from, into, h.urgent) {
            Ok((0, _)) => return Err(SessionError::Truncated(peer(s))),
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return come_back(p, s, idx),
            Err(e) => return Err(io_err(s, "read", e)),
        };
        h.end += n;
        h.drained = drained(n, room, inq, h.gone);
        if h.end == buf.len() && h.batch.is_none() {
            if let Some(mut b) = ctx.batches().take_owned(BATCH * MAX_FRAME) {
                b[..h.end].copy_from_slice(&h.buf[..h.end]);
                h.batch = Some(b);
            }
        }
        read(p, s, n, ctx);
    }
}

/// Moves bytes from side `s` to the other side until `s` is drained or the
/// other side has no room (then a `POLLOUT` poll waits for it). A read that
/// fills the buffer marks a transfer: with a pipe to spare (`--splice
/// auto`), the direction then splices ([`crate::transfer`]).
fn pump(p: &mut Pair, s: usize, idx: usize, ctx: &impl Host) -> Result<(), SessionError> {
    match p.half[s].mode {
        Mode::Copy if p.half[s].pipe.is_some() => splice(p, s, idx, ctx),
        Mode::Copy => copy(p, s, idx, ctx),
        Mode::Seal(_) => seal(p, s, idx, ctx),
        Mode::Open(_) => open(p, s, idx, ctx),
    }
}

/// [`pump`] for a plain copy.
fn copy(p: &mut Pair, s: usize, idx: usize, ctx: &impl Host) -> Result<(), SessionError> {
    let (from, to) = (p.fds[s], p.fds[1 - s]);
    loop {
        let h = &mut p.half[s];
        if h.len > h.off {
            let full = h.len == h.buf.len();
            if !write_pending(p, s, idx, false)? {
                return Ok(());
            }
            delivered(p, s, ctx);
            if full {
                if let Some(pipe) = ctx.pipes().take_owned() {
                    for (side, fd) in [(s, from), (1 - s, to)] {
                        crate::sys::set_nonblocking_fd(fd).map_err(|e| io_err(side, "fcntl", e))?;
                    }
                    p.half[s].pipe = Some(pipe);
                    return splice(p, s, idx, ctx);
                }
            }
        }
        if p.half[s].eof {
            return pass_fin(p, s);
        }
        let h = &mut p.half[s];
        let room = h.buf.len();
        match crate::sys::recv_inq(from, &mut [std::io::IoSliceMut::new(&mut h.buf)], h.urgent) {
            Ok((0, _)) => h.eof = true,
            Ok((n, inq)) => {
                h.len = n;
                let short = drained(n, room, inq, h.gone);
                read(p, s, n, ctx);
                if short {
                    // A short read drained the socket: write, and wait for
                    // the next completion before reading again.
                    let h = &mut p.half[s];
                    match crate::sys::send_fd(to, &h.buf[..n]) {
                        Ok(w) => h.off = w,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(io_err(1 - s, "write", e)),
                    }
                    if h.off < h.len {
                        p.watch.touch();
                        want_room(p, 1 - s, idx);
                    } else {
                        h.off = 0;
                        h.len = 0;
                        delivered(p, s, ctx);
                    }
                    return Ok(());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return come_back(p, s, idx),
            Err(e) => return Err(io_err(s, "read", e)),
        }
    }
}

/// Side `s` holds bytes that a read could not take yet (a pending signal
/// held it at TCP's urgent mark, `sys::recv_inq`'s `Interrupted`), and no
/// wake-up will come for them: this direction is pumped again from a later
/// loop iteration, through a one-shot `POLLOUT` poll on the other side,
/// whose completion pumps the direction that writes into that side (this
/// one). Its buffer is empty, as it was reading, so the poll completes as
/// soon as the other side has room: at once, as a rule.
fn come_back(p: &mut Pair, s: usize, idx: usize) -> Result<(), SessionError> {
    want_room(p, 1 - s, idx);
    Ok(())
}

/// [`pump`] in transfer mode: side `s` → pipe → the other side. The pipe
/// is emptied before the next splice from `s`, so at most its capacity is
/// in flight. Every wake-up is read to `EAGAIN` (a splice can stop short
/// with data left: the pipe's slots fill first).
fn splice(p: &mut Pair, s: usize, idx: usize, ctx: &impl Host) -> Result<(), SessionError> {
    let (from, to) = (p.fds[s], p.fds[1 - s]);
    loop {
        // Bytes read with `recv` past an urgent mark (below) go first.
        if p.half[s].len > p.half[s].off {
            if !write_pending(p, s, idx, false)? {
                return Ok(());
            }
            delivered(p, s, ctx);
        }
        let h = &mut p.half[s];
        let (r, w) = match &h.pipe {
            Some((r, w)) => (r.as_raw_fd(), w.as_raw_fd()),
            None => unreachable!("splice without a pipe"),
        };
        if h.held > 0 {
            match crate::sys::splice(r, to, h.held) {
                Ok(n) => {
                    h.held -= n.min(h.held);
                    p.watch.touch();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(io_err(1 - s, "write", e)),
            }
            if p.half[s].held > 0 {
                want_room(p, 1 - s, idx);
                return Ok(());
            }
            delivered(p, s, ctx);
        }
        if p.half[s].eof {
            return pass_fin(p, s);
        }
        let h = &mut p.half[s];
        let r = crate::sys::splice(from, w, crate::transfer::PIPE_CHUNK);
        let stuck = match &r {
            Ok(0) => true,
            Err(e) => e.kind() == io::ErrorKind::WouldBlock,
            Ok(_) => false,
        };
        // `splice` stops at TCP's urgent mark (`MSG_OOB`): EAGAIN, or 0 once
        // a FIN is queued, with data behind it. `recv` steps over the urgent
        // byte, as a direct connection's reader does, and reads on.
        if stuck && crate::sys::at_urgent_mark(from).map_err(|e| io_err(s, "read", e))? {
            match crate::sys::recv_fd(from, &mut h.buf) {
                Ok(0) => h.eof = true,
                Ok(n) => {
                    h.off = 0;
                    h.len = n;
                    read(p, s, n, ctx);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(io_err(s, "read", e)),
            }
            continue;
        }
        match r {
            Ok(0) => h.eof = true,
            Ok(n) => {
                h.held = n;
                ctx.stats().add_spliced(n);
                read(p, s, n, ctx);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(io_err(s, "read", e)),
        }
    }
}

/// A running pair, as its session sees it: ready with the outcome;
/// dropping it ends the pair (its buffers go back to the shard's pool once
/// the kernel has released its polls).
pub struct Relay<'a, H: Host> {
    ctx: &'a H,
    rec: &'a Record,
    idx: usize,
    gen: u32,
}

impl<'a, H: Host> Relay<'a, H> {
    /// See [`Engine::start`].
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        ctx: &'a H,
        rec: &'a Record,
        socks: [Sock; 2],
        bufs: [Vec<u8>; 2],
        modes: [Mode; 2],
        read_size: usize,
        watch: Rc<Watch>,
        tunnel: (bool, &[u8]),
    ) -> Self {
        let (idx, gen) = ctx
            .engine()
            .start(socks, bufs, modes, read_size, watch, rec, tunnel);
        if !tunnel.1.is_empty() {
            ctx.engine().kick(idx, ctx);
        }
        Relay { ctx, rec, idx, gen }
    }

    /// The slot, for [`Engine::sync`].
    pub fn index(&self) -> usize {
        self.idx
    }
}

impl<H: Host> Future for Relay<'_, H> {
    type Output = Result<Ended, SessionError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.ctx
            .engine()
            .poll_pair(self.idx, self.gen, self.rec, cx)
    }
}

impl<H: Host> Drop for Relay<'_, H> {
    fn drop(&mut self) {
        self.ctx.engine().sync(self.idx, self.rec);
        self.ctx.engine().detach(self.idx, self.ctx);
    }
}

/// The shard's driver: hands every batch of raw completions to the engine.
/// Runs for the shard's life.
pub async fn drive<H: Host>(ctx: Rc<H>) {
    let mut batch = Vec::with_capacity(64);
    // Transfer bytes (spliced or batched) seen so far, and the driver's
    // rounds since they last grew.
    let mut moved = 0u64;
    let mut still = u32::MAX;
    loop {
        futures_lite::future::poll_fn(raw::poll_completions).await;
        raw::take_completions(&mut batch);
        ctx.engine().on_completions(&batch, &*ctx);
        batch.clear();
        // Wake-up coalescing (`--wake-batch`) pays only in transfers: it
        // spares the wake-ups of a pipeline whose reads fill buffers, and
        // would hold back latency-bound exchanges for nothing. So it is on
        // only while transfer bytes are moving: within TRANSFER_ROUNDS
        // rounds of the last. (Holding a pipe or batch buffer is not
        // enough: a keep-alive connection that once carried a transfer
        // keeps its buffer while it idles, and every other connection of
        // the shard then paid for batches that never filled; found by a
        // break-it round.)
        let now = ctx.stats().spliced.get() + ctx.stats().batched.get();
        if now != moved {
            moved = now;
            still = 0;
        } else {
            still = still.saturating_add(1);
        }
        raw::set_wake_batch_active(still < TRANSFER_ROUNDS);
    }
}

/// Driver rounds without transfer bytes after which wake-up coalescing
/// stops (see [`drive`]): long enough to span a pipeline's rounds that only
/// write or only see a peer's window open, short enough that a shard whose
/// transfers went quiet stops holding other connections' events within a
/// few milliseconds of traffic.
const TRANSFER_ROUNDS: u32 = 16;

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    struct TestHost {
        engine: Engine,
        stats: ShardStats,
        timings: Timings,
        pipes: PipePool,
        batches: BatchPool,
    }

    impl Host for TestHost {
        fn engine(&self) -> &Engine {
            &self.engine
        }
        fn stats(&self) -> &ShardStats {
            &self.stats
        }
        fn timings(&self) -> &Timings {
            &self.timings
        }
        fn pipes(&self) -> &PipePool {
            &self.pipes
        }
        fn batches(&self) -> &BatchPool {
            &self.batches
        }
        fn recycle(&self, _: Vec<u8>) {}
    }

    /// A host with no pipes or batch buffers to lend, and its driver task
    /// (on the current executor).
    fn start_host() -> Rc<TestHost> {
        let host = Rc::new(TestHost {
            engine: Engine::default(),
            stats: ShardStats::default(),
            timings: Timings::new(false, 0),
            pipes: PipePool::new(0),
            batches: BatchPool::new(0),
        });
        glommio::spawn_local(drive(host.clone())).detach();
        host
    }

    /// A plain copy relay with 4 KiB buffers between our ends of a client
    /// and an upstream connection, neither owned for `SIGURG` beforehand.
    fn copy_pair<'a>(
        host: &'a TestHost,
        rec: &'a Record,
        client: &TcpStream,
        upstream: &TcpStream,
    ) -> Relay<'a, TestHost> {
        Relay::start(
            host,
            rec,
            [
                Sock::new(client.as_raw_fd()),
                Sock::new(upstream.as_raw_fd()),
            ],
            [vec![0; 4096], vec![0; 4096]],
            [Mode::Copy, Mode::Copy],
            4096,
            Rc::new(Watch::default()),
            (false, &[]),
        )
    }

    /// A connected pair of loopback sockets: (our end, the peer's end).
    fn pair(l: &TcpListener) -> (TcpStream, TcpStream) {
        let peer = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (ours, _) = l.accept().unwrap();
        (ours, peer)
    }

    /// Every pair's slot is freed once its connection has ended, however
    /// its last events race with the removal of its polls. With
    /// `POLL_REMOVE`, a removal that found a poll running failed with
    /// `EALREADY` and left it armed: every connection whose client hung up
    /// in that instant kept its slot and both buffers for the process's
    /// life (in a `wrk` churn, about one connection in two: 34 KiB each).
    /// Fails with `POLL_REMOVE` and no retry.
    #[test]
    fn every_slot_is_freed_and_every_byte_relayed_when_peers_hang_up() {
        const CONNS: usize = 200;
        glommio::LocalExecutorBuilder::default()
            .make()
            .unwrap()
            .run(async {
                let host = start_host();
                let l = TcpListener::bind("127.0.0.1:0").unwrap();
                for i in 0..CONNS {
                    let (client_ours, client) = pair(&l);
                    let (upstream_ours, upstream) = pair(&l);
                    // The peers run on a thread of their own: the client
                    // sends a request and hangs up its sending side, the
                    // upstream answers after the request's EOF and closes.
                    let peers = std::thread::spawn(move || {
                        let (mut client, mut upstream) = (client, upstream);
                        let request = vec![i as u8; 1000 + i];
                        client.write_all(&request).unwrap();
                        client.shutdown(Shutdown::Write).unwrap();
                        let mut got = Vec::new();
                        upstream.read_to_end(&mut got).unwrap();
                        assert_eq!(got, request, "request of connection {i}");
                        upstream.write_all(&got[..100]).unwrap();
                        drop(upstream);
                        let mut answer = Vec::new();
                        client.read_to_end(&mut answer).unwrap();
                        assert_eq!(answer, request[..100], "answer of connection {i}");
                    });
                    let rec = Record::new(i as u128);
                    let relay = copy_pair(&host, &rec, &client_ours, &upstream_ours);
                    relay.await.unwrap();
                    assert_eq!(rec.bytes_up.get(), 1000 + i as u64);
                    assert_eq!(rec.bytes_down.get(), 100);
                    drop((client_ours, upstream_ours));
                    peers.join().unwrap();
                }
                // The kernel releases the last polls within a few loop
                // iterations; wait for that (bounded), not for a time.
                let deadline = Instant::now() + Duration::from_secs(10);
                while host.engine.live() > 0 && Instant::now() < deadline {
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                }
                assert_eq!(
                    host.engine.live(),
                    0,
                    "slots still taken after {CONNS} connections"
                );
            });
    }

    /// docs/PROTOCOL.md §4, large chunks: an opening direction whose peer
    /// sends a chunk larger than its one-chunk buffer takes a batch buffer,
    /// past the shard's budget if it must (here the budget is 0), instead of
    /// waiting for room that never comes; every byte arrives and the end is
    /// clean. Without it the relay stalls: a full buffer and no whole chunk.
    #[test]
    fn a_large_chunk_is_opened_even_with_the_batch_budget_spent() {
        use crate::proto::{accept_hello, ClientHandshake, Psk, FLAG_LARGE_CHUNKS, LARGE_PAYLOAD};
        glommio::LocalExecutorBuilder::default()
            .make()
            .unwrap()
            .run(async {
                let host = start_host();
                let key = Psk::from_bytes([3; 32]);
                let (hs, hello) =
                    ClientHandshake::start_with_flags(&key, [1; 32], 10, b"", FLAG_LARGE_CHUNKS)
                        .unwrap();
                let acc =
                    accept_hello(std::slice::from_ref(&key), &hello, [2; 32], 10, 120).unwrap();
                let (enc, dec) = hs.finish(&acc.server_hello).unwrap();
                let (mut exit_enc, mut exit_dec) = (acc.encoder, acc.decoder);
                assert_eq!(exit_enc.max_payload(), LARGE_PAYLOAD);
                let l = TcpListener::bind("127.0.0.1:0").unwrap();
                let (client_ours, client) = pair(&l);
                let (tunnel_ours, tunnel) = pair(&l);
                let down: Vec<u8> = (0..3 * LARGE_PAYLOAD + 5)
                    .map(|i| (i % 253) as u8)
                    .collect();
                let up = b"request".to_vec();
                let (want_down, want_up) = (down.clone(), up.clone());
                // The exit's end: large chunks down, then the end chunk and
                // FIN; the entry's chunks up, opened to their end chunk.
                let peers = std::thread::spawn(move || {
                    let (mut client, mut tunnel) = (client, tunnel);
                    let mut wire = Vec::new();
                    exit_enc.seal_to_vec(&down, &mut wire).unwrap();
                    exit_enc.end_to_vec(&mut wire).unwrap();
                    tunnel.write_all(&wire).unwrap();
                    tunnel.shutdown(Shutdown::Write).unwrap();
                    client.write_all(&up).unwrap();
                    client.shutdown(Shutdown::Write).unwrap();
                    let mut got = Vec::new();
                    client.read_to_end(&mut got).unwrap();
                    let mut sealed = Vec::new();
                    tunnel.read_to_end(&mut sealed).unwrap();
                    (got, exit_dec.open_all(sealed).unwrap())
                });
                let rec = Record::new(1);
                let relay = Relay::start(
                    &*host,
                    &rec,
                    [
                        Sock::new(client_ours.as_raw_fd()),
                        Sock::new(tunnel_ours.as_raw_fd()),
                    ],
                    [vec![0; MAX_FRAME], vec![0; MAX_FRAME]],
                    [Mode::Seal(enc), Mode::Open(dec)],
                    MAX_PAYLOAD,
                    Rc::new(Watch::default()),
                    (false, &[]),
                );
                glommio::timer::timeout(Duration::from_secs(20), async { Ok(relay.await) })
                    .await
                    .expect("the relay stalled on a large chunk")
                    .unwrap();
                drop((client_ours, tunnel_ours));
                let (got, (opened, ended, rest)) = peers.join().unwrap();
                assert!(got == want_down, "{} bytes down", got.len());
                assert_eq!((opened, ended, rest), (want_up, true, 0));
                assert_eq!(rec.bytes_down.get(), want_down.len() as u64);
            });
    }

    /// An upstream socket owned for `SIGURG` since before its connect is
    /// checked for pending urgent data when a `SIGURG` has reached the shard
    /// since (else it is not: no `recv(MSG_OOB | MSG_PEEK)` per
    /// connection). Here the origin's urgent byte came before the pair
    /// started, and its signal was taken, as `on_completion` takes it for
    /// the shard's other pairs, before this side was listed: only the
    /// check can tell. The bytes behind the urgent byte must arrive; a
    /// relay that trusted the ownership alone stranded them (the read
    /// stops at the mark and no wake-up follows).
    #[test]
    fn urgent_data_before_the_pair_on_an_owned_socket_is_not_stranded() {
        use std::os::fd::AsRawFd;
        const A: usize = 1000;
        const B: usize = 1500;
        glommio::LocalExecutorBuilder::default()
            .make()
            .unwrap()
            .run(async {
                let host = start_host();
                let l = TcpListener::bind("127.0.0.1:0").unwrap();
                let (client_ours, mut client) = pair(&l);
                let upstream_ours = socket2::Socket::new(
                    socket2::Domain::IPV4,
                    socket2::Type::STREAM,
                    Some(socket2::Protocol::TCP),
                )
                .unwrap();
                let epoch = crate::sys::urgent_epoch();
                assert!(crate::sys::own_for_urgent(upstream_ours.as_raw_fd()));
                upstream_ours
                    .connect(&l.local_addr().unwrap().into())
                    .unwrap();
                let (mut origin, _) = l.accept().unwrap();
                origin.write_all(&[b'a'; A]).unwrap();
                socket2::SockRef::from(&origin)
                    .send_out_of_band(b"!")
                    .unwrap();
                origin.write_all(&[b'b'; B]).unwrap();
                let deadline = Instant::now() + Duration::from_secs(10);
                while crate::sys::urgent_epoch() == epoch {
                    assert!(Instant::now() < deadline, "no SIGURG reached the shard");
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                }
                assert!(crate::sys::take_urgent_signal());
                let rec = Record::new(1);
                let relay = Relay::start(
                    &*host,
                    &rec,
                    [
                        Sock::new(client_ours.as_raw_fd()),
                        Sock {
                            fd: upstream_ours.as_raw_fd(),
                            owned_since: Some(epoch),
                        },
                    ],
                    [vec![0; 4096], vec![0; 4096]],
                    [Mode::Copy, Mode::Copy],
                    4096,
                    Rc::new(Watch::default()),
                    (false, &[]),
                );
                let reader = std::thread::spawn(move || {
                    client
                        .set_read_timeout(Some(Duration::from_secs(5)))
                        .unwrap();
                    let mut got = 0;
                    let mut buf = [0u8; 4096];
                    while got < A + B {
                        match client.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => got += n,
                        }
                    }
                    got
                });
                let deadline = Instant::now() + Duration::from_secs(20);
                while !reader.is_finished() && Instant::now() < deadline {
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                }
                assert_eq!(reader.join().unwrap(), A + B, "bytes stranded");
                drop(relay);
                drop((client_ours, upstream_ours, origin));
            });
    }

    /// A read that a pending signal held at TCP's urgent mark for
    /// `MARK_RETRIES` tries (`sys::recv_inq`'s `Interrupted`) leaves bytes
    /// queued with no wake-up to come for them: `come_back` pumps the
    /// direction again through a `POLLOUT` poll on the other side. Here
    /// the first reads of each direction answer `Interrupted` (the test
    /// hook `sys::interrupt_reads`); every byte must still arrive both
    /// ways. Stalls, and fails, when `come_back` arms nothing.
    #[test]
    fn a_read_held_at_the_urgent_mark_is_made_again_without_a_wake_up() {
        const N: usize = 3000;
        glommio::LocalExecutorBuilder::default()
            .make()
            .unwrap()
            .run(async {
                let host = start_host();
                let l = TcpListener::bind("127.0.0.1:0").unwrap();
                let (client_ours, mut client) = pair(&l);
                let (upstream_ours, mut origin) = pair(&l);
                let rec = Record::new(1);
                let relay = copy_pair(&host, &rec, &client_ours, &upstream_ours);
                // One direction at a time, so that each one's first read
                // is an interrupted one.
                client.set_nonblocking(true).unwrap();
                origin.set_nonblocking(true).unwrap();
                let mut got = Vec::new();
                for dir in 0..2 {
                    let (from, to) = match dir {
                        0 => (&mut client, &mut origin),
                        _ => (&mut origin, &mut client),
                    };
                    crate::sys::interrupt_reads(2);
                    from.write_all(&[b'x'; N]).unwrap();
                    let deadline = Instant::now() + Duration::from_secs(10);
                    let mut n = 0;
                    let mut buf = [0u8; 4096];
                    while n < N && Instant::now() < deadline {
                        match to.read(&mut buf) {
                            Ok(0) => break,
                            Ok(k) => n += k,
                            Err(_) => glommio::timer::sleep(Duration::from_millis(1)).await,
                        }
                    }
                    got.push(n);
                }
                assert_eq!(got, [N, N], "bytes stranded behind an interrupted read");
                drop(relay);
                drop((client_ours, upstream_ours));
            });
    }

    /// A sealing direction seals a whole read as one large chunk only with
    /// large chunks agreed and a batch buffer that holds more than 16 KiB:
    /// with a small `--buffer-size` (a small batch buffer) it keeps the
    /// four-slot layout, so `--buffer-size` still caps each chunk.
    #[test]
    fn a_large_slot_needs_agreement_and_room() {
        use crate::proto::{accept_hello, ClientHandshake, Psk, FLAG_LARGE_CHUNKS, LARGE_PAYLOAD};
        let key = Psk::from_bytes([5; 32]);
        let (hs, hello) =
            ClientHandshake::start_with_flags(&key, [1; 32], 10, b"", FLAG_LARGE_CHUNKS).unwrap();
        let acc = accept_hello(std::slice::from_ref(&key), &hello, [2; 32], 10, 120).unwrap();
        let (large, _) = hs.finish(&acc.server_hello).unwrap();
        let (hs, hello) = ClientHandshake::start(&key, [3; 32], 10, b"").unwrap();
        let acc = accept_hello(std::slice::from_ref(&key), &hello, [4; 32], 10, 120).unwrap();
        let (small, _) = hs.finish(&acc.server_hello).unwrap();
        let full = vec![0u8; BATCH * MAX_FRAME];
        let tiny = vec![0u8; BATCH * (LEN_LEN + 1024 + TAG_LEN)];
        assert_eq!(large_slot(&large, Some(&full)), LARGE_PAYLOAD);
        assert_eq!(large_slot(&large, Some(&tiny)), 0, "--buffer-size 1KiB");
        assert_eq!(large_slot(&large, None), 0, "no batch buffer");
        assert_eq!(large_slot(&small, Some(&full)), 0, "not agreed");
    }
}
