//! The shard's idle sweep: one timer per shard, none per connection.
//!
//! Every live relay holds a [`Watch`] in its shard's [`Watchdog`]. The relay
//! only bumps the watch's activity counter when bytes move (a `Cell`
//! increment, no clock read). A background task calls [`Watchdog::sweep`]
//! every [`Watchdog::tick`]; the sweep compares each counter with what it saw
//! last time and, when a pair has been silent for `--idle-timeout`, gives it
//! the verdict [`Verdict::Idle`] and wakes its task. The end of a drain gives
//! every watch [`Verdict::Drained`] the same way ([`Watchdog::abort_all`]).
//! With `--access-log-interval` the sweep also marks a watch whose interval
//! line is due; the relay writes the line on its next poll.
//!
//! Why not a timer per relay: a relay's future is polled every time either
//! direction makes progress, and a timer (plus the shard's abort trigger)
//! inside it was polled with it: per message, a timer poll, a trigger poll
//! and their combinators (about 2% of a forward proxy's CPU per 1 KiB
//! request in `perf`), and per connection a timer inserted into and removed
//! from the reactor. [`Watched`] checks two `Cell`s and compares a waker
//! instead.
//!
//! Timing: a pair silent for `idle` is closed after between `idle` and
//! `idle + tick`, with `tick` at most a quarter of `idle` (1 ms at least).
//! With `--access-log-interval`, `tick` also divides the interval, so
//! interval lines come exactly every `interval`. The sweep runs in the
//! connections' own task queue, so a busy shard delays it no more than it
//! delays its connections.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// Why the sweep ended a relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Silent for `--idle-timeout`.
    Idle,
    /// The shard's drain period ended.
    Drained,
}

/// One live relay as the sweep sees it.
#[derive(Default)]
pub struct Watch {
    /// Bumped by the relay whenever bytes move.
    activity: Cell<u64>,
    /// `activity` at the last sweep.
    seen: Cell<u64>,
    /// Sweeps in a row that found no activity.
    quiet: Cell<u32>,
    /// Sweeps since the last interval line.
    since_line: Cell<u32>,
    verdict: Cell<Option<Verdict>>,
    line_due: Cell<bool>,
    waker: RefCell<Option<Waker>>,
    /// Index in the watchdog's list, for O(1) removal.
    index: Cell<usize>,
}

impl Watch {
    /// Records progress (bytes moved in either direction).
    pub fn touch(&self) {
        self.activity.set(self.activity.get().wrapping_add(1));
    }

    fn set_verdict(&self, v: Verdict) -> Option<Waker> {
        if self.verdict.get().is_none() {
            self.verdict.set(Some(v));
        }
        self.waker.borrow_mut().take()
    }
}

/// The shard's set of live relays and its sweep.
pub struct Watchdog {
    watches: RefCell<Vec<Rc<Watch>>>,
    tick: Duration,
    /// Silent sweeps after which a pair is idle.
    idle_ticks: u32,
    /// Sweeps between interval lines, if any.
    line_ticks: Option<u32>,
    aborted: Cell<bool>,
}

/// `ceil(a / b)` in whole ticks, at least 1.
fn ticks(a: Duration, b: Duration) -> u32 {
    let n = a.as_nanos().div_ceil(b.as_nanos().max(1));
    u32::try_from(n).unwrap_or(u32::MAX).max(1)
}

impl Watchdog {
    /// A watchdog for `idle` (`--idle-timeout`) and, when the access log
    /// writes interval lines, `interval` (`--access-log-interval`).
    pub fn new(idle: Duration, interval: Option<Duration>) -> Self {
        let base = (idle / 4).max(Duration::from_millis(1));
        // With interval lines: the largest tick up to `base` that divides
        // the interval (to the nanosecond), so the lines come every
        // `interval` (rounding the interval up to whole ticks of `base`
        // made them up to twice as far apart).
        let (tick, line_ticks) = match interval {
            Some(i) => {
                let k = ticks(i, base);
                (i / k, Some(k))
            }
            None => (base, None),
        };
        Watchdog {
            watches: RefCell::new(Vec::new()),
            tick,
            idle_ticks: ticks(idle, tick),
            line_ticks,
            aborted: Cell::new(false),
        }
    }

    /// How often [`Watchdog::sweep`] must run.
    pub fn tick(&self) -> Duration {
        self.tick
    }

    /// Live watches (for tests: proves they are released).
    pub fn len(&self) -> usize {
        self.watches.borrow().len()
    }

    /// Whether no relay is watched.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Registers a relay. The guard unregisters it when dropped. After
    /// [`Watchdog::abort_all`], a new watch starts with [`Verdict::Drained`].
    pub fn watch(&self) -> WatchGuard<'_> {
        let watch = Rc::new(Watch::default());
        if self.aborted.get() {
            watch.verdict.set(Some(Verdict::Drained));
        }
        // The first sweep after registration counts as activity: a pair is
        // only idle after `idle_ticks` whole ticks of silence.
        watch.seen.set(u64::MAX);
        let mut watches = self.watches.borrow_mut();
        watch.index.set(watches.len());
        watches.push(watch.clone());
        WatchGuard { dog: self, watch }
    }

    /// One pass over every live relay: marks the idle ones and the ones
    /// whose interval line is due, and wakes them.
    pub fn sweep(&self) {
        let mut wake = Vec::new();
        for w in self.watches.borrow().iter() {
            let now = w.activity.get();
            if now == w.seen.get() {
                w.quiet.set(w.quiet.get().saturating_add(1));
                if w.quiet.get() >= self.idle_ticks {
                    wake.extend(w.set_verdict(Verdict::Idle));
                    continue;
                }
            } else {
                w.seen.set(now);
                w.quiet.set(0);
            }
            if let Some(every) = self.line_ticks {
                w.since_line.set(w.since_line.get() + 1);
                if w.since_line.get() >= every {
                    w.since_line.set(0);
                    w.line_due.set(true);
                    wake.extend(w.waker.borrow_mut().take());
                }
            }
        }
        wake.into_iter().for_each(Waker::wake);
    }

    /// Ends every live relay ([`Verdict::Drained`]), and every later one.
    pub fn abort_all(&self) {
        self.aborted.set(true);
        let wake: Vec<Waker> = self
            .watches
            .borrow()
            .iter()
            .filter_map(|w| w.set_verdict(Verdict::Drained))
            .collect();
        wake.into_iter().for_each(Waker::wake);
    }
}

/// A relay's registration; dropping it unregisters the relay.
pub struct WatchGuard<'a> {
    dog: &'a Watchdog,
    watch: Rc<Watch>,
}

impl WatchGuard<'_> {
    /// The relay's watch.
    pub fn watch(&self) -> &Watch {
        &self.watch
    }

    /// The relay's watch, for a relay that outlives a borrow.
    pub fn shared(&self) -> Rc<Watch> {
        self.watch.clone()
    }
}

impl Drop for WatchGuard<'_> {
    fn drop(&mut self) {
        let mut watches = self.dog.watches.borrow_mut();
        let i = self.watch.index.get();
        watches.swap_remove(i);
        if let Some(moved) = watches.get(i) {
            moved.index.set(i);
        }
    }
}

pin_project_lite::pin_project! {
    /// Runs `fut` until it completes or the watch gets a verdict. On each
    /// poll the verdict is checked first (stop always wins), then a due
    /// interval line is written with `on_line`, then `fut` is polled.
    pub struct Watched<'a, F, L> {
        watch: &'a Watch,
        on_line: L,
        #[pin]
        fut: F,
    }
}

/// See [`Watched`].
pub fn watched<F: Future, L: FnMut()>(watch: &Watch, on_line: L, fut: F) -> Watched<'_, F, L> {
    Watched {
        watch,
        on_line,
        fut,
    }
}

impl<F: Future, L: FnMut()> Future for Watched<'_, F, L> {
    type Output = Result<F::Output, Verdict>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let watch = *this.watch;
        if let Some(v) = watch.verdict.get() {
            return Poll::Ready(Err(v));
        }
        if watch.line_due.replace(false) {
            (this.on_line)();
        }
        {
            let mut slot = watch.waker.borrow_mut();
            match &*slot {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *slot = Some(cx.waker().clone()),
            }
        }
        this.fut.poll(cx).map(Ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future;

    fn poll_once<F: Future + Unpin>(f: &mut F) -> Option<F::Output> {
        future::block_on(future::poll_once(f))
    }

    #[test]
    fn a_silent_relay_is_idle_after_its_ticks_and_an_active_one_never() {
        // idle 1 s → tick 250 ms, idle after more than 4 silent sweeps.
        let dog = Watchdog::new(Duration::from_secs(1), None);
        assert_eq!(dog.tick(), Duration::from_millis(250));
        let quiet = dog.watch();
        let busy = dog.watch();
        let mut q = Box::pin(watched(quiet.watch(), || {}, std::future::pending::<()>()));
        let mut b = Box::pin(watched(busy.watch(), || {}, std::future::pending::<()>()));
        assert!(poll_once(&mut q).is_none());
        for _ in 0..5 {
            assert!(poll_once(&mut q).is_none(), "closed too early");
            busy.watch().touch();
            dog.sweep();
        }
        assert_eq!(poll_once(&mut q), Some(Err(Verdict::Idle)));
        assert!(poll_once(&mut b).is_none(), "an active pair stays");
        drop(q);
        drop(quiet);
        assert_eq!(dog.len(), 1, "a dropped guard leaves the list");
    }

    #[test]
    fn abort_ends_live_and_later_relays_first() {
        let dog = Watchdog::new(Duration::from_secs(60), None);
        let g = dog.watch();
        // Ready at once, yet the verdict wins once it is set.
        let mut ready = Box::pin(watched(g.watch(), || {}, async { 7 }));
        assert_eq!(poll_once(&mut ready), Some(Ok(7)));
        let mut live = Box::pin(watched(g.watch(), || {}, async { 7 }));
        dog.abort_all();
        assert_eq!(poll_once(&mut live), Some(Err(Verdict::Drained)));
        let later = dog.watch();
        let mut l = Box::pin(watched(later.watch(), || {}, async { 7 }));
        assert_eq!(poll_once(&mut l), Some(Err(Verdict::Drained)));
    }

    #[test]
    fn the_tick_divides_the_interval_and_stays_within_a_quarter_of_idle() {
        for (idle_ms, interval_ms) in [
            (1_500u64, 1_000u64),
            (3_000, 1_000),
            (3_960, 1_000),
            (7_000, 2_000),
            (239_000, 60_000),
            (300_000, 1_000),
            (100, 1_000),
            (3_600_000, 86_400_000),
        ] {
            let (idle, interval) = (
                Duration::from_millis(idle_ms),
                Duration::from_millis(interval_ms),
            );
            let dog = Watchdog::new(idle, Some(interval));
            let tick = dog.tick();
            assert!(tick <= idle / 4, "{idle:?} {interval:?}: tick {tick:?}");
            let lines = dog.line_ticks.unwrap();
            // Every `interval`, to within a nanosecond per tick.
            let every = tick * lines;
            assert!(every <= interval, "{idle:?} {interval:?}: {every:?}");
            assert!(interval - every < Duration::from_nanos(lines.into()));
            // Closed after at least `idle` and less than `idle + tick`.
            assert!(tick * dog.idle_ticks >= idle);
            assert!(tick * (dog.idle_ticks - 1) < idle);
        }
    }

    #[test]
    fn interval_lines_come_every_interval_and_removal_keeps_indices() {
        let dog = Watchdog::new(Duration::from_secs(60), Some(Duration::from_secs(2)));
        assert_eq!(dog.tick(), Duration::from_secs(2));
        let a = dog.watch();
        let b = dog.watch();
        let c = dog.watch();
        drop(a); // c moves into a's place
        let lines = Cell::new(0);
        let mut f = Box::pin(watched(
            c.watch(),
            || lines.set(lines.get() + 1),
            std::future::pending::<()>(),
        ));
        for _ in 0..3 {
            c.watch().touch();
            dog.sweep();
            assert!(poll_once(&mut f).is_none());
        }
        assert_eq!(lines.get(), 3);
        drop(f);
        drop(c);
        drop(b);
        assert!(dog.is_empty());
    }
}
