//! Keep-alive tunnels (docs/PROTOCOL.md §4.1), the shard's side: the
//! entry's pool of idle tunnels, the exit's registry of idle ones, and the
//! reads and writes of the chunks that frame a session on a kept tunnel.
//!
//! A tunnel whose session has ended both ways (both end chunks passed, see
//! [`crate::engine::Kept`]) stays open when both hellos agreed on
//! keep-alive. The entry puts it in its shard's pool, by exit endpoint; a
//! later client of the same shard going to the same endpoint takes it
//! instead of connecting and shaking hands: its start chunk and first bytes
//! go out at once, and the exit answers with a status chunk before it
//! forwards anything to its origin. What that saves is the middle hop's TCP
//! handshake and teardown, the hellos' crypto, and a round trip.
//!
//! Nothing is shared across shards: a tunnel is reused only by the shard
//! that holds it (on the exit, the shard that accepted it).
//!
//! When is a client's first flight sent again on another tunnel? Only when
//! the exit said, authenticated, that it did not serve the session (a
//! status other than 0, "going away" included): the exit forwards nothing
//! to its origin before its status 0 is written. A tunnel that fails
//! without an answer after the start was sent is a visible abort of that
//! client (as a failure mid-session is), never a resend: the exit may have
//! served it. Before it sends a start, the entry checks the tunnel holds
//! nothing unread (an exit's "going away", or its FIN), so an exit that
//! closed a tunnel is found before, not after.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::conn::Conn;
use crate::engine::Kept;
use crate::error::SessionError;
use crate::proto::{Decoded, Decoder, Encoder, LEN_LEN, MAX_FRAME, TAG_LEN};
use crate::transfer::LargeReservation;
use crate::trigger::Trigger;

/// A kept tunnel with no session: the connection, its cipher states at
/// the session boundary, and what the session it came from agreed.
pub struct IdleTunnel {
    /// The tunnel connection.
    pub conn: Conn,
    /// Cipher states and the bytes read past the last end chunk.
    pub kept: Box<Kept>,
    /// Its large-chunk reservation, if it agreed on large chunks.
    pub large: LargeReservation,
    /// When its last session ended.
    pub since: Instant,
    /// The shard's key generation when it was made: a key reload retires
    /// the tunnels made before it.
    pub keys: u64,
}

impl IdleTunnel {
    /// Whether the tunnel can carry another session now: not older than
    /// `timeout`, made with the current keys (`keys`), and holding nothing
    /// from the exit (an unprompted status is its "going away"; EOF, its
    /// close) and no socket error.
    fn usable(&self, now: Instant, timeout: Duration, keys: u64) -> bool {
        now.duration_since(self.since) < timeout
            && self.keys == keys
            && self.kept.leftover.is_empty()
            && crate::sys::quiet_fd(self.conn.raw_fd())
    }
}

/// The entry's idle tunnels, by exit endpoint, most recently used last.
#[derive(Default)]
pub struct EntryPool {
    idle: RefCell<HashMap<SocketAddr, Vec<IdleTunnel>>>,
    len: Cell<usize>,
}

impl EntryPool {
    /// Keeps `t` for `endpoint`, unless `max` tunnels already idle for it:
    /// then `t` is closed (FIN at the boundary, which the exit takes as the
    /// end of the tunnel). Returns whether it was kept.
    pub fn put(&self, endpoint: SocketAddr, t: IdleTunnel, max: usize) -> bool {
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry(endpoint).or_default();
        if list.len() >= max {
            return false;
        }
        list.push(t);
        self.len.set(self.len.get() + 1);
        true
    }

    /// The most recently used idle tunnel to `endpoint` that is still
    /// usable (see `IdleTunnel::usable`); the unusable ones met on the way
    /// are closed.
    pub fn take(&self, endpoint: SocketAddr, timeout: Duration, keys: u64) -> Option<IdleTunnel> {
        let now = Instant::now();
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(&endpoint)?;
        while let Some(t) = list.pop() {
            self.len.set(self.len.get() - 1);
            if t.usable(now, timeout, keys) {
                return Some(t);
            }
        }
        None
    }

    /// Closes the idle tunnels that are no longer usable: older than
    /// `timeout`, made with other keys, or closed or said goodbye to by
    /// their exit. Run by the shard about once a second.
    pub fn sweep(&self, timeout: Duration, keys: u64) {
        let now = Instant::now();
        let mut idle = self.idle.borrow_mut();
        let mut left = 0;
        for list in idle.values_mut() {
            list.retain(|t| t.usable(now, timeout, keys));
            left += list.len();
        }
        idle.retain(|_, list| !list.is_empty());
        self.len.set(left);
    }

    /// Closes every idle tunnel (a drain, a key reload).
    pub fn clear(&self) {
        self.idle.borrow_mut().clear();
        self.len.set(0);
    }

    /// Idle tunnels now.
    pub fn len(&self) -> usize {
        self.len.get()
    }

    /// Whether no tunnel idles.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The exit's idle tunnels, oldest first, each with the trigger that
/// retires it (past `--tunnel-keepalive`, the oldest one is retired for a
/// newer one).
#[derive(Default)]
pub struct ExitIdle {
    set: RefCell<VecDeque<(u64, Trigger)>>,
    next: Cell<u64>,
}

/// One idle tunnel's place in its shard's [`ExitIdle`]; dropping it frees
/// the place. [`IdleSlot::retired`] fires when a newer idle tunnel needs
/// the room.
pub struct IdleSlot<'a> {
    owner: &'a ExitIdle,
    id: u64,
    retired: Trigger,
}

impl ExitIdle {
    /// Registers an idle tunnel; with `max` already idle, the oldest is
    /// retired (it says goodbye and closes).
    pub fn begin(&self, max: usize) -> IdleSlot<'_> {
        let mut set = self.set.borrow_mut();
        while set.len() >= max.max(1) {
            match set.pop_front() {
                Some((_, oldest)) => oldest.fire(),
                None => break,
            }
        }
        let id = self.next.get();
        self.next.set(id.wrapping_add(1));
        let retired = Trigger::new();
        set.push_back((id, retired.clone()));
        IdleSlot {
            owner: self,
            id,
            retired,
        }
    }

    /// Retires every idle tunnel (a key reload).
    pub fn retire_all(&self) {
        let all: Vec<_> = self.set.borrow_mut().drain(..).collect();
        for (_, t) in all {
            t.fire();
        }
    }

    /// Idle tunnels now.
    pub fn len(&self) -> usize {
        self.set.borrow().len()
    }

    /// Whether no tunnel idles.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl IdleSlot<'_> {
    /// Fires when this tunnel must say goodbye: a newer idle tunnel needed
    /// its place, or the keys were reloaded.
    pub fn retired(&self) -> &Trigger {
        &self.retired
    }
}

impl Drop for IdleSlot<'_> {
    fn drop(&mut self) {
        let mut set = self.owner.set.borrow_mut();
        if let Some(i) = set.iter().position(|(id, _)| *id == self.id) {
            set.remove(i);
        }
    }
}

/// What [`read_chunk`] found.
pub enum Next {
    /// A data chunk's plaintext.
    Data(Vec<u8>),
    /// An end chunk.
    End,
    /// EOF at a chunk boundary, with nothing buffered.
    Closed,
}

/// Bytes asked of the socket per read while waiting for a chunk: a start
/// or a status chunk (at most 83 bytes) and the start of what follows.
/// Small, so that an idle tunnel's wait holds no chunk-sized buffer.
const READ_STEP: usize = 512;

/// Reads from `conn` until `dec` opens one whole chunk at the front of
/// `buf` (which holds bytes read before, and keeps what follows the chunk,
/// at most one [`MAX_FRAME`] in all).
///
/// Errors: a chunk that fails authentication (the side is `conn`'s), EOF
/// inside a chunk ([`SessionError::Truncated`]), or the socket's.
pub async fn read_chunk(
    conn: &Conn,
    dec: &mut Decoder,
    buf: &mut Vec<u8>,
) -> Result<Next, SessionError> {
    let rejected = |source| SessionError::Proto {
        peer: conn.peer(),
        source,
    };
    loop {
        match dec.decode(buf).map_err(rejected)? {
            Decoded::Data {
                consumed,
                start,
                len,
            } => {
                let payload = buf[start..start + len].to_vec();
                buf.drain(..consumed);
                return Ok(Next::Data(payload));
            }
            Decoded::End { consumed } => {
                buf.drain(..consumed);
                return Ok(Next::End);
            }
            Decoded::NeedMore => {}
        }
        let room = READ_STEP.min(MAX_FRAME.saturating_sub(buf.len()));
        if room == 0 {
            // A large chunk outgrows one frame: the relay's opening
            // direction takes it with a batch buffer; here only start and
            // status chunks are read, far below it.
            return Err(rejected(crate::proto::ProtoError::KeepAlive(
                "a start or status chunk longer than a frame",
            )));
        }
        let at = buf.len();
        buf.resize(at + room, 0);
        let n = match conn.read(&mut buf[at..]).await {
            Ok(n) => n,
            Err(e) => {
                buf.truncate(at);
                return Err(e);
            }
        };
        buf.truncate(at + n);
        if n == 0 {
            return if at == 0 {
                Ok(Next::Closed)
            } else {
                Err(SessionError::Truncated(conn.peer()))
            };
        }
    }
}

/// Appends one sealed chunk carrying `payload` (1 to 16384 bytes) to `out`.
pub fn seal_chunk(
    enc: &mut Encoder,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), SessionError> {
    let at = out.len();
    out.resize(at + LEN_LEN + payload.len() + TAG_LEN, 0);
    out[at + LEN_LEN..at + LEN_LEN + payload.len()].copy_from_slice(payload);
    enc.seal_in_place(&mut out[at..], payload.len())
        .map_err(SessionError::Limit)?;
    Ok(())
}
