//! Transfer mode: what a relay direction switches to once a read fills its
//! buffer, the sign of a transfer rather than a request-sized message.
//!
//! * `forward` splices (`--splice auto`): socket → pipe → socket with
//!   `splice(2)`, so bulk bytes never pass through user space. A copy costs
//!   the kernel a `copy_to_user` on `recv` and a `copy_from_user` on `send`,
//!   about a fifth of a forwarding proxy's CPU on a bulk stream (`perf`,
//!   docs/BENCHMARKS.md); `splice` moves page references instead, up to a
//!   pipe's capacity (64 KiB) per call.
//! * The tunnel roles, which must see every byte, batch: a direction takes a
//!   [`BATCH`]-chunk buffer, so one `recvmsg` fills several chunks' payload
//!   slots (sealing) or reads several chunks (opening), and one `sendmsg`
//!   writes them all: a quarter of the syscalls, and of the peer's wake-ups.
//!
//! Both cost something per connection: a pipe two file descriptors, a batch
//! buffer [`BATCH`] × 16 KiB. So, as HAProxy's `maxpipes`, each shard has a
//! budget of each, a quarter of `--max-connections` (pipes also only within
//! the spare descriptors of `RLIMIT_NOFILE`); a direction that finds none
//! left keeps working as before. Resources go back to the shard's pool when
//! the direction ends, and a pipe that still holds bytes (its pair failed
//! mid-move) is closed instead.

use std::cell::{Cell, RefCell};
use std::os::fd::OwnedFd;
use std::rc::Rc;

/// Idle pipes a shard keeps for reuse (two descriptors each); the rest are
/// closed when their direction ends.
const IDLE_PIPES: usize = 64;

/// Chunks per batch buffer (tunnel roles).
pub const BATCH: usize = 4;

/// Bytes asked of one `splice` from a socket: a default pipe's capacity
/// (16 pages, pipe(7)). A call moves less when the pipe's slots fill first.
pub const PIPE_CHUNK: usize = 64 * 1024;

/// A shard's pipes: a budget and the idle ones.
pub struct PipePool {
    idle: RefCell<Vec<(OwnedFd, OwnedFd)>>,
    live: Cell<usize>,
    budget: usize,
}

impl PipePool {
    /// A pool of at most `budget` pipes (0: splicing is off).
    pub fn new(budget: usize) -> Self {
        PipePool {
            idle: RefCell::new(Vec::new()),
            live: Cell::new(0),
            budget,
        }
    }

    /// An empty pipe (read end, write end), from the pool or new, that
    /// counts against the budget until [`PipePool::give_back`]; `None` when
    /// the budget is spent or the OS refuses one (then the caller copies
    /// instead).
    pub fn take_owned(&self) -> Option<(OwnedFd, OwnedFd)> {
        if self.live.get() >= self.budget {
            return None;
        }
        let fds = match self.idle.borrow_mut().pop() {
            Some(fds) => fds,
            None => crate::sys::splice_pipe().ok()?,
        };
        self.live.set(self.live.get() + 1);
        Some(fds)
    }

    /// Returns a pipe from [`PipePool::take_owned`] that still holds `held`
    /// bytes: kept for reuse if empty, closed otherwise.
    pub fn give_back(&self, fds: (OwnedFd, OwnedFd), held: usize) {
        self.live.set(self.live.get() - 1);
        let mut idle = self.idle.borrow_mut();
        // At most IDLE_PIPES kept: a burst of transfers must not hold its
        // peak of descriptors for good.
        if held == 0 && idle.len() < IDLE_PIPES {
            idle.push(fds);
        }
    }
}

/// Bytes of idle batch buffers a shard keeps for reuse (about 128 of
/// them); the rest are freed when their direction ends.
const IDLE_BATCH_BYTES: usize = 8 << 20;

/// A shard's batch buffers (tunnel roles): a budget and the idle ones.
///
/// Large chunks (docs/PROTOCOL.md §4) have a budget of their own, of the
/// same size: a session may agree to receive them only with one of
/// [`BatchPool::reserve_large`]'s reservations, because its peer, not this
/// shard, decides when to send one, and its opening direction then needs a
/// batch buffer whatever the budget (`take_over_budget`). So at the
/// connection limit at most a quarter of the sessions hold a batch buffer
/// for their transfers and another quarter one for large chunks received.
pub struct BatchPool {
    idle: RefCell<Vec<Vec<u8>>>,
    live: Cell<usize>,
    budget: usize,
    /// Sessions holding a large-chunk reservation (shared with the
    /// reservations, which a keep-alive tunnel keeps while it idles in its
    /// shard's pool, apart from any borrow of the shard).
    large: Rc<Cell<usize>>,
}

/// A session's right to receive large chunks, from
/// [`BatchPool::reserve_large`]; given back when dropped. A keep-alive
/// tunnel that agreed on large chunks keeps it between sessions.
pub struct LargeReservation {
    count: Option<Rc<Cell<usize>>>,
}

impl LargeReservation {
    /// Whether the reservation was granted.
    pub fn held(&self) -> bool {
        self.count.is_some()
    }

    /// Gives the reservation back early (the peer did not agree).
    pub fn release(&mut self) {
        if let Some(count) = self.count.take() {
            count.set(count.get() - 1);
        }
    }
}

impl Drop for LargeReservation {
    fn drop(&mut self) {
        self.release();
    }
}

impl BatchPool {
    /// A pool of at most `budget` buffers in use at once, and as many
    /// large-chunk reservations.
    pub fn new(budget: usize) -> Self {
        BatchPool {
            idle: RefCell::new(Vec::new()),
            live: Cell::new(0),
            budget,
            large: Rc::new(Cell::new(0)),
        }
    }

    /// A reservation to receive large chunks if `wanted` and the budget
    /// allows; otherwise one that is not [`LargeReservation::held`] (the
    /// session then keeps to 16 KiB chunks).
    pub fn reserve_large(&self, wanted: bool) -> LargeReservation {
        if !wanted || self.large.get() >= self.budget {
            return LargeReservation { count: None };
        }
        self.large.set(self.large.get() + 1);
        LargeReservation {
            count: Some(self.large.clone()),
        }
    }

    /// A buffer of exactly `len` bytes (its contents are an earlier
    /// connection's: write before reading) that counts against the budget
    /// until [`BatchPool::give_back`], or `None` when the budget is spent or
    /// the allocation fails.
    pub fn take_owned(&self, len: usize) -> Option<Vec<u8>> {
        if self.live.get() >= self.budget {
            return None;
        }
        self.take_over_budget(len)
    }

    /// [`BatchPool::take_owned`] past the budget: for an opening direction
    /// whose peer sent a chunk larger than its one-chunk buffer (large
    /// chunks, docs/PROTOCOL.md §4), which cannot go on without room for
    /// it. Only sessions holding a [`LargeReservation`] agree to large
    /// chunks, so these are bounded by that budget. `None` only when the
    /// allocation fails.
    pub fn take_over_budget(&self, len: usize) -> Option<Vec<u8>> {
        let buf = match self.idle.borrow_mut().pop() {
            Some(buf) if buf.len() == len => buf,
            _ => {
                let mut buf = Vec::new();
                buf.try_reserve_exact(len).ok()?;
                buf.resize(len, 0);
                buf
            }
        };
        self.live.set(self.live.get() + 1);
        Some(buf)
    }

    /// Returns a buffer from [`BatchPool::take_owned`] or
    /// [`BatchPool::take_over_budget`].
    pub fn give_back(&self, buf: Vec<u8>) {
        self.live.set(self.live.get() - 1);
        let mut idle = self.idle.borrow_mut();
        // Keep at most IDLE_BATCH_BYTES' worth, as the shard's pool of
        // chunk buffers does: a burst of transfers must not pin its peak.
        if (idle.len() + 1) * buf.len() <= IDLE_BATCH_BYTES && idle.len() < self.budget {
            idle.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn batch_buffers_are_bounded_and_reused() {
        let pool = BatchPool::new(1);
        let mut a = pool.take_owned(100).unwrap();
        a[0] = 7;
        assert!(pool.take_owned(100).is_none(), "over budget");
        pool.give_back(a);
        let b = pool.take_owned(100).unwrap();
        assert_eq!(b.len(), 100);
        assert_eq!(b[0], 7, "the idle buffer was reused");
        pool.give_back(b);
        assert!(BatchPool::new(0).take_owned(100).is_none());
        // Idle buffers are kept up to IDLE_BATCH_BYTES, not up to the budget.
        let pool = BatchPool::new(1000);
        let len = 1 << 20;
        let taken: Vec<_> = (0..20).map(|_| pool.take_owned(len).unwrap()).collect();
        for b in taken {
            pool.give_back(b);
        }
        assert_eq!(pool.idle.borrow().len(), IDLE_BATCH_BYTES / len);
    }

    #[test]
    fn large_chunk_reservations_are_bounded_and_given_back() {
        let pool = BatchPool::new(2);
        assert!(!pool.reserve_large(false).held(), "not wanted");
        let a = pool.reserve_large(true);
        let mut b = pool.reserve_large(true);
        assert!(a.held() && b.held());
        assert!(!pool.reserve_large(true).held(), "over budget");
        b.release();
        assert!(!b.held());
        drop(b);
        assert_eq!(pool.large.get(), 1, "released once, not twice");
        let c = pool.reserve_large(true);
        assert!(c.held());
        drop((a, c));
        assert_eq!(pool.large.get(), 0);
        assert!(!BatchPool::new(0).reserve_large(true).held());
    }

    #[test]
    fn the_budget_bounds_live_pipes_and_only_empty_pipes_are_reused() {
        let pool = PipePool::new(2);
        let a = pool.take_owned().unwrap();
        let b = pool.take_owned().unwrap();
        assert!(pool.take_owned().is_none(), "over budget");
        assert_eq!(pool.live.get(), 2);
        let a_fd = a.0.as_raw_fd();
        pool.give_back(a, 0);
        assert_eq!(pool.live.get(), 1);
        let again = pool.take_owned().unwrap();
        assert_eq!(again.0.as_raw_fd(), a_fd, "an empty pipe is reused");
        pool.give_back(b, 10);
        assert_eq!(
            pool.idle.borrow().len(),
            0,
            "a pipe holding bytes is closed"
        );
        pool.give_back(again, 0);
        assert_eq!(pool.idle.borrow().len(), 1);
        assert!(PipePool::new(0).take_owned().is_none());
        // After a burst, at most IDLE_PIPES stay open.
        let pool = PipePool::new(1000);
        let taken: Vec<_> = (0..IDLE_PIPES + 10)
            .map(|_| pool.take_owned().unwrap())
            .collect();
        for p in taken {
            pool.give_back(p, 0);
        }
        assert_eq!(pool.idle.borrow().len(), IDLE_PIPES);
    }
}
