//! A one-shot, shard-local broadcast event: once fired, every current and
//! future waiter completes. Used for "stop accepting" and "abort everything".
//!
//! [`bounded`] is the one place where a wait is raced against stop and a
//! deadline; every wait that must end on shutdown goes through it.
//!
//! `Rc<RefCell<..>>` because it never leaves its shard.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

#[derive(Default)]
struct State {
    fired: bool,
    /// One slot per live waiter; a dropped waiter frees its slot, so the
    /// table is bounded by the number of live waiters, not by history.
    slots: Vec<Option<Waker>>,
    free: Vec<usize>,
}

/// A cloneable handle to one event.
#[derive(Clone, Default)]
pub struct Trigger(Rc<RefCell<State>>);

impl Trigger {
    /// A new, unfired trigger.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fires the event and wakes every waiter. Idempotent.
    pub fn fire(&self) {
        let wakers: Vec<Waker> = {
            let mut state = self.0.borrow_mut();
            state.fired = true;
            state.slots.iter_mut().filter_map(Option::take).collect()
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Whether [`Trigger::fire`] was called.
    pub fn is_fired(&self) -> bool {
        self.0.borrow().fired
    }

    /// Completes once the trigger has fired.
    pub fn wait(&self) -> Wait {
        Wait {
            trigger: self.clone(),
            slot: None,
        }
    }

    /// Live waiters (for tests: proves slots are released).
    pub fn waiters(&self) -> usize {
        let state = self.0.borrow();
        state.slots.len() - state.free.len()
    }
}

/// The future returned by [`Trigger::wait`].
pub struct Wait {
    trigger: Trigger,
    slot: Option<usize>,
}

impl Future for Wait {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = self.trigger.0.borrow_mut();
        if state.fired {
            return Poll::Ready(());
        }
        match self.slot {
            Some(i) => match &mut state.slots[i] {
                Some(w) if w.will_wake(cx.waker()) => {}
                other => *other = Some(cx.waker().clone()),
            },
            None => {
                let waker = Some(cx.waker().clone());
                let i = match state.free.pop() {
                    Some(i) => {
                        state.slots[i] = waker;
                        i
                    }
                    None => {
                        state.slots.push(waker);
                        state.slots.len() - 1
                    }
                };
                drop(state);
                self.slot = Some(i);
            }
        }
        Poll::Pending
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            let mut state = self.trigger.0.borrow_mut();
            state.slots[i] = None;
            state.free.push(i);
        }
    }
}

/// Why a [`bounded`] wait ended without its future's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupted {
    /// The stop trigger fired.
    Stopped,
    /// The deadline passed.
    Deadline,
}

/// Runs `fut` until it completes, `stop` fires, or `deadline` passes.
///
/// **Stop always wins:** on every wake-up `stop` is polled first, then the
/// deadline, and only then `fut`. A future that is always ready (an `accept`
/// failing at once with EMFILE, a free permit) therefore cannot starve
/// shutdown, which `futures_lite::future::or(fut, stop)` would allow because
/// it polls its first argument first.
///
/// A plain struct rather than an `async fn`: an `async fn` would store `fut`
/// twice in its state (once as its argument, once pinned), and the relay's
/// future is the bulk of each connection's memory.
pub fn bounded<F: Future>(stop: &Trigger, deadline: Option<Instant>, fut: F) -> Bounded<F> {
    Bounded {
        stop: stop.wait(),
        deadline,
        timer: None,
        fut,
    }
}

pin_project_lite::pin_project! {
    /// The future returned by [`bounded`].
    pub struct Bounded<F> {
        stop: Wait,
        deadline: Option<Instant>,
        // Armed on first poll, only when there is a deadline.
        timer: Option<glommio::timer::Timer>,
        #[pin]
        fut: F,
    }
}

impl<F: Future> Future for Bounded<F> {
    type Output = Result<F::Output, Interrupted>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if Pin::new(this.stop).poll(cx).is_ready() {
            return Poll::Ready(Err(Interrupted::Stopped));
        }
        if let Some(at) = *this.deadline {
            // The clock check makes a deadline that has already passed win
            // even before the reactor has fired the timer.
            let now = Instant::now();
            if now >= at {
                return Poll::Ready(Err(Interrupted::Deadline));
            }
            let timer = this
                .timer
                .get_or_insert_with(|| glommio::timer::Timer::new(at - now));
            if Pin::new(timer).poll(cx).is_ready() {
                return Poll::Ready(Err(Interrupted::Deadline));
            }
        }
        this.fut.poll(cx).map(Ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future;

    #[test]
    fn fires_and_releases_slots() {
        let t = Trigger::new();
        let mut a = Box::pin(t.wait());
        let mut b = Box::pin(t.wait());
        assert!(future::block_on(future::poll_once(&mut a)).is_none());
        assert!(future::block_on(future::poll_once(&mut b)).is_none());
        assert_eq!(t.waiters(), 2);
        drop(b);
        assert_eq!(t.waiters(), 1);
        t.fire();
        assert!(future::block_on(future::poll_once(&mut a)).is_some());
        assert!(t.is_fired());
        future::block_on(t.wait());
    }

    #[test]
    fn stop_wins_over_a_future_that_is_always_ready() {
        glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                let stop = Trigger::new();
                assert_eq!(bounded(&stop, None, async { 7 }).await, Ok(7));
                let soon = Instant::now() + std::time::Duration::from_millis(20);
                assert_eq!(
                    bounded(&stop, Some(soon), std::future::pending::<()>()).await,
                    Err(Interrupted::Deadline)
                );
                stop.fire();
                // Ready at once, yet stop is reported.
                assert_eq!(
                    bounded(&stop, None, async { 7 }).await,
                    Err(Interrupted::Stopped)
                );
                // A passed deadline beats a ready future too.
                let live = Trigger::new();
                let past = Instant::now() - std::time::Duration::from_millis(1);
                assert_eq!(
                    bounded(&live, Some(past), async { 7 }).await,
                    Err(Interrupted::Deadline)
                );
                assert_eq!(live.waiters(), 0, "the stop waiter is released");
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
