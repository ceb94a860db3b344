//! A one-shot, shard-local broadcast event: once fired, every current and
//! future waiter completes. Used for "stop accepting" and "abort everything".
//!
//! `Rc<RefCell<..>>` because it never leaves its shard.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

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
}
