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

use std::cell::RefCell;
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
