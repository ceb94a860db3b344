//! shardproxy patch: raw poll requests on the executor's main ring.
//!
//! A `Source` per request (an `Rc<RefCell<..>>`, a slot in the source map,
//! a waker per waiter) is what lets any future wait on a file descriptor.
//! A caller that drives many sockets from one state machine (shardproxy's
//! completion-driven relay) needs none of that: it arms polls with a token
//! of its own and reads the completions back in batches.
//!
//! * [`poll_add`] arms `IORING_OP_POLL_ADD` (one-shot or multishot) with a
//!   token below 2^62; [`poll_remove`] cancels it with
//!   `IORING_OP_ASYNC_CANCEL` (the poll then posts a last completion with
//!   `-ECANCELED`, or none if it had already ended). The cancel's own
//!   result comes back as a [`Completion`] with `removal` set: `0`, or
//!   `-ENOENT` (the poll had ended). Not `IORING_OP_POLL_REMOVE`: that one
//!   fails with `-EALREADY` when it finds the poll running, and leaves it
//!   armed (`io_poll_disarm` in io_uring/poll.c), so a multishot poll whose
//!   socket was hanging up at that instant was never removed; its file and
//!   its owner's state were held for good.
//! * Completions are queued per thread; [`poll_completions`] is ready when
//!   any is queued, and registers one waker otherwise; [`take_completions`]
//!   moves them out.
//! * Requests are submitted with the executor's next batch, like every
//!   other request. A raw completion counts as an event, so the executor
//!   does not sleep with one pending.
//!
//! Only for the thread's own executor: a request queued on a thread
//! without one is dropped (and never completes).

use std::cell::{Cell, RefCell};
use std::time::Duration;
use std::os::unix::io::RawFd;
use std::task::{Context, Poll, Waker};

use nix::poll::PollFlags;
use crate::sys::{ReactorQueue, UringOpDescriptor};

/// The bit that marks a raw request's user data.
pub(crate) const RAW_USER_DATA: u64 = 1 << 63;
/// With [`RAW_USER_DATA`]: the completion of a [`poll_remove`].
pub(crate) const REMOVAL_USER_DATA: u64 = RAW_USER_DATA | 1 << 62;

/// One completion of a raw request.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    /// The token the request was armed with.
    pub token: u64,
    /// The CQE's result: a poll's `revents` mask (`POLLIN` …), or `-errno`.
    pub result: i32,
    /// `IORING_CQE_F_MORE`: a multishot poll that stays armed.
    pub more: bool,
    /// The result of [`poll_remove`] for the poll armed with `token`, not
    /// of the poll itself.
    pub removal: bool,
}

#[derive(Default)]
struct State {
    queue: Option<ReactorQueue>,
    completions: Vec<Completion>,
    waker: Option<Waker>,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

pub(crate) fn set_queue(queue: ReactorQueue) {
    STATE.with(|s| s.borrow_mut().queue = Some(queue));
}

pub(crate) fn complete(user_data: u64, result: i32, more: bool) {
    let waker = STATE.with(|s| {
        let mut s = s.borrow_mut();
        s.completions.push(Completion {
            token: user_data & !REMOVAL_USER_DATA,
            result,
            more,
            removal: user_data & REMOVAL_USER_DATA == REMOVAL_USER_DATA,
        });
        s.waker.take()
    });
    if let Some(w) = waker {
        w.wake();
    }
}

fn push(fd: RawFd, args: UringOpDescriptor, user_data: u64) {
    STATE.with(|s| {
        if let Some(q) = &s.borrow().queue {
            q.borrow_mut().push_raw(fd, args, user_data);
        }
    })
}

/// Arms a poll for `events` (`libc::POLLIN` …, as `i16`) on `fd`, tagged
/// with `token` (below 2^62). Multishot: it stays armed and posts a
/// completion with [`Completion::more`] per readiness event until removed,
/// or until the kernel ends it (a completion without `more`).
pub fn poll_add(fd: RawFd, events: i16, multishot: bool, token: u64) {
    debug_assert_eq!(token & REMOVAL_USER_DATA, 0);
    let flags = PollFlags::from_bits_retain(events);
    push(
        fd,
        UringOpDescriptor::RawPollAdd(flags, multishot),
        token | RAW_USER_DATA,
    );
}

/// Cancels the poll armed with `token`. Its last completion (`-ECANCELED`,
/// without `more`) follows, unless it had already ended. The cancel's own
/// result follows as a completion with `removal` set.
pub fn poll_remove(token: u64) {
    push(
        -1,
        UringOpDescriptor::RawPollRemove(token | RAW_USER_DATA),
        0,
    );
}

/// Ready when completions are queued; otherwise `cx`'s waker is woken by
/// the next one (one waker per thread: the last one registered).
pub fn poll_completions(cx: &mut Context<'_>) -> Poll<()> {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        if s.completions.is_empty() {
            s.waker = Some(cx.waker().clone());
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
}

/// Moves the queued completions to `out` (appended, in completion order).
pub fn take_completions(out: &mut Vec<Completion>) {
    STATE.with(|s| out.append(&mut s.borrow_mut().completions));
}

thread_local! {
    /// (count, wait) of [`set_wake_batch`]; `None`: off.
    static WAKE_BATCH: Cell<Option<(u32, Duration)>> = const { Cell::new(None) };
    /// [`set_wake_batch_active`].
    static WAKE_BATCH_ACTIVE: Cell<bool> = const { Cell::new(true) };
    /// Completions the next sleep waits for (see
    /// `SleepableRing::wait_coalesced`); 1: an ordinary sleep.
    static WAKE_BATCH_TARGET: Cell<u32> = const { Cell::new(1) };
    /// Sleeps that waited for a batch, and those of them that waited the
    /// whole `wait` (see [`coalesced_sleeps`]).
    static COALESCED: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

/// Wake-up coalescing for this thread's executor (Linux 6.12 or later, with
/// the main ring's `DEFER_TASKRUN`; otherwise nothing changes). While
/// completions arrive fast, the executor sleeps until a batch of them (up
/// to `count`; the size adapts to the rate) is ready or `wait` has passed,
/// instead of waking for each: fewer sleeps and wake-ups (context switches)
/// per completion under load, at the cost of up to `wait` of added latency
/// per wake-up. After a quiet spell (a sleep longer than `2 × wait`) it
/// wakes at the first completion, as without coalescing. `count` ≤ 1 or a zero
/// `wait` turns it off.
pub fn set_wake_batch(count: u32, wait: Duration) {
    let on = count > 1 && !wait.is_zero();
    WAKE_BATCH.with(|w| w.set(on.then_some((count, wait))));
}

/// Turns coalescing set up by [`set_wake_batch`] on (the default) or off
/// for now, e.g. only while the traffic it pays for is there. Cheap enough
/// to call after every batch of completions.
pub fn set_wake_batch_active(active: bool) {
    WAKE_BATCH_ACTIVE.with(|a| {
        if a.get() != active {
            a.set(active);
            // Start again from ordinary sleeps.
            WAKE_BATCH_TARGET.with(|t| t.set(1));
        }
    });
}

pub(crate) fn wake_batch() -> Option<(u32, Duration)> {
    if WAKE_BATCH_ACTIVE.with(|a| a.get()) {
        WAKE_BATCH.with(|w| w.get())
    } else {
        None
    }
}

pub(crate) fn disable_wake_batch() {
    WAKE_BATCH.with(|w| w.set(None));
}

pub(crate) fn wake_batch_target() -> u32 {
    WAKE_BATCH_TARGET.with(|b| b.get())
}

pub(crate) fn set_wake_batch_target(target: u32) {
    WAKE_BATCH_TARGET.with(|b| b.set(target));
}

pub(crate) fn count_coalesced_sleep(waited_out: bool) {
    COALESCED.with(|c| {
        let (all, out) = c.get();
        c.set((all + 1, out + u64::from(waited_out)));
    });
}

/// How many times this thread's executor has slept waiting for a batch of
/// completions (see [`set_wake_batch`]) rather than for one, and how many
/// of those sleeps held completions back for the whole `wait` (the batch
/// did not fill). Both stay 0 while coalescing is off, when completions
/// never came fast enough for it, and on a kernel without `min_wait_usec`
/// (before Linux 6.12).
pub fn coalesced_sleeps() -> (u64, u64) {
    COALESCED.with(|c| c.get())
}
