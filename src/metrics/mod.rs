//! Per-shard latency histograms and counters, and how they leave the shard.
//!
//! Recording is shard-local: [`Timings`] lives in the shard's `Rc` context
//! (a `RefCell` of `hdrhistogram::Histogram<u64>`, microseconds, 3
//! significant digits, saturating), so recording touches no atomic and no
//! lock. Without `--metrics-listen` nothing is timed at all.
//!
//! **Publishing: each shard publishes on a timer** (every
//! `--metrics-interval`, default 1 s, plus once when it stops) into a
//! [`Board`], from a glommio task queue with small shares so it never
//! competes with connection work. Why a timer rather than asking shards on
//! each scrape: a scrape then never waits on, wakes, or stalls a shard,
//! however slow or frequent scrapes are, and a wedged shard still shows its
//! last numbers. The cost is staleness of at most one interval.
//!
//! A shard publishes its counters and the histograms of the *interval* (a
//! delta): it moves them out and starts fresh ones, so publishing costs it an
//! allocation, not a copy. (Cloning six 1 µs–1 h histograms took ~0.4 ms, a
//! stall of the shard's event loop once a second, visible in p99.) The
//! metrics thread folds deltas into cumulative histograms, at scrape time
//! and on its own timer so unscraped deltas never pile up. The board's lock
//! is taken once per interval per shard and by the metrics thread, never per
//! connection or byte; a shard's critical section is a few pointer moves.

pub mod http;
pub mod prom;
pub mod stats_cmd;

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

use std::time::{Duration, SystemTime};

use hdrhistogram::Histogram;

use crate::stats::{CloseReason, ShardStats};

/// Largest value a histogram resolves: one hour, in microseconds. Larger
/// values saturate to it.
pub const MAX_MICROS: u64 = 3_600_000_000;

/// The latency histograms each shard keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hist {
    /// Upstream `connect()` until established.
    UpstreamConnect,
    /// Tunnel handshake (entry: hello sent → answer verified; exit: hello
    /// received → verified and answered).
    Handshake,
    /// Accept → first byte delivered upstream.
    FirstByte,
    /// Per chunk, client → upstream: read completed → write completed.
    RelayUp,
    /// Per chunk, upstream → client: read completed → write completed.
    RelayDown,
    /// Accept → close.
    ConnectionDuration,
}

impl Hist {
    /// Every histogram, in storage order.
    pub const ALL: [Hist; 6] = [
        Hist::UpstreamConnect,
        Hist::Handshake,
        Hist::FirstByte,
        Hist::RelayUp,
        Hist::RelayDown,
        Hist::ConnectionDuration,
    ];

    /// Metric name (Prometheus, seconds).
    pub fn metric(self) -> &'static str {
        match self {
            Hist::UpstreamConnect => "shardproxy_upstream_connect_seconds",
            Hist::Handshake => "shardproxy_handshake_seconds",
            Hist::FirstByte => "shardproxy_first_byte_seconds",
            Hist::RelayUp | Hist::RelayDown => "shardproxy_relay_chunk_seconds",
            Hist::ConnectionDuration => "shardproxy_connection_duration_seconds",
        }
    }

    /// The `direction` label, for the relay histograms.
    pub fn direction(self) -> Option<&'static str> {
        match self {
            Hist::RelayUp => Some("up"),
            Hist::RelayDown => Some("down"),
            _ => None,
        }
    }

    /// One-line help text.
    pub fn help(self) -> &'static str {
        match self {
            Hist::UpstreamConnect => "Time from the upstream connect call to the TCP connection being established.",
            Hist::Handshake => "Tunnel handshake time (entry: hello sent to server hello verified; exit: hello received to verified and answered).",
            Hist::FirstByte => "Time from accept to the first byte delivered upstream.",
            Hist::RelayUp | Hist::RelayDown => "Per forwarded chunk: read completed on one socket to write completed on the other (the proxy's own added latency).",
            Hist::ConnectionDuration => "Time from accept to close.",
        }
    }
}

/// A histogram of microseconds plus the exact sum (HDR keeps no sum).
#[derive(Debug, Clone)]
pub struct Recorded {
    /// The distribution.
    pub hist: Histogram<u64>,
    /// Sum of every recorded value, in microseconds.
    pub sum_micros: u64,
}

impl Recorded {
    fn new() -> Self {
        Recorded {
            hist: Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("static bounds are valid"),
            sum_micros: 0,
        }
    }

    fn record(&mut self, d: Duration) {
        let us = (d.as_micros().min(u128::from(MAX_MICROS)) as u64).max(1);
        self.hist.saturating_record(us);
        self.sum_micros = self.sum_micros.saturating_add(us);
    }
}

/// A shard's histograms; present only when metrics are enabled: the
/// [`Hist::ALL`] ones, then one upstream-connect histogram per configured
/// upstream.
pub struct Timings(Option<RefCell<Vec<Recorded>>>);

impl Timings {
    /// Histograms that record (`enabled`) or a no-op; `upstreams` is the
    /// number of configured upstreams.
    pub fn new(enabled: bool, upstreams: usize) -> Self {
        Timings(enabled.then(|| RefCell::new(fresh(upstreams))))
    }

    /// Records one connect time to configured upstream `spec`.
    pub fn record_upstream(&self, spec: usize, d: Duration) {
        if let Some(h) = &self.0 {
            if let Some(r) = h.borrow_mut().get_mut(Hist::ALL.len() + spec) {
                r.record(d);
            }
        }
    }

    /// Whether anything is recorded (callers skip clock reads otherwise).
    pub fn enabled(&self) -> bool {
        self.0.is_some()
    }

    /// Records one duration.
    pub fn record(&self, which: Hist, d: Duration) {
        if let Some(h) = &self.0 {
            h.borrow_mut()[which as usize].record(d);
        }
    }

    /// What was recorded since the last call, as sparse deltas; the
    /// histograms are reset in place (`None` if nothing was recorded).
    ///
    /// Sparse because a histogram over 1 µs – 1 h at 3 significant digits
    /// is about 190 KB of counters, of which an interval fills a few
    /// hundred at most: handing whole histograms over (and allocating
    /// fresh ones) cost the shard about 1.3 MB of zeroed memory a second,
    /// page faults included.
    fn take_delta(&self) -> Option<Vec<Delta>> {
        let cell = self.0.as_ref()?;
        let mut hists = cell.borrow_mut();
        if hists.iter().all(|h| h.hist.is_empty()) {
            return None;
        }
        Some(hists.iter_mut().map(Recorded::take_delta).collect())
    }
}

/// One histogram's records of one interval: `(value, count)` pairs, one per
/// non-empty HDR bucket (the bucket's highest equivalent value, which
/// records back into the same bucket), and the exact sum.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    /// Non-empty buckets, in microseconds.
    pub counts: Vec<(u64, u64)>,
    /// Sum of every recorded value, in microseconds.
    pub sum_micros: u64,
}

impl Recorded {
    /// Moves this histogram's records into a [`Delta`] and resets it.
    fn take_delta(&mut self) -> Delta {
        if self.hist.is_empty() {
            return Delta::default();
        }
        let counts = self
            .hist
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect();
        self.hist.reset();
        Delta {
            counts,
            sum_micros: std::mem::take(&mut self.sum_micros),
        }
    }

    /// Adds a [`Delta`] of a histogram with the same bounds.
    fn add(&mut self, d: &Delta) {
        for &(value, count) in &d.counts {
            // Values came from a histogram with these bounds: in range.
            let _ = self.hist.record_n(value, count);
        }
        self.sum_micros = self.sum_micros.saturating_add(d.sum_micros);
    }
}

fn fresh(upstreams: usize) -> Vec<Recorded> {
    (0..Hist::ALL.len() + upstreams)
        .map(|_| Recorded::new())
        .collect()
}

/// One configured upstream in one shard, as scrapes see it.
#[derive(Debug, Clone, Default)]
pub struct UpstreamSnapshot {
    /// Successful attempts.
    pub connects: u64,
    /// Refused or failed connects.
    pub refused: u64,
    /// Timed-out connects.
    pub timeouts: u64,
    /// Failed tunnel handshakes (entry).
    pub handshakes: u64,
    /// Ejections of its endpoints.
    pub ejections: u64,
    /// Connections open to its endpoints.
    pub active: u64,
    /// Its endpoints (resolved addresses).
    pub endpoints: u64,
    /// Of those, healthy and not ejected.
    pub available: u64,
}

/// A shard's state as scrapes see it: counters and cumulative histograms.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Shard index.
    pub shard: usize,
    /// Connections accepted.
    pub accepted: u64,
    /// Connections open.
    pub active: u64,
    /// `--max-connections` (per shard).
    pub limit: u64,
    /// Closes by reason, in [`CloseReason::ALL`] order.
    pub closed: Vec<u64>,
    /// Plaintext bytes client → upstream.
    pub bytes_up: u64,
    /// Plaintext bytes upstream → client.
    pub bytes_down: u64,
    /// Failed tunnel handshakes.
    pub handshake_failures: u64,
    /// Authenticated tunnel handshakes abandoned by the peer (exit).
    pub handshakes_abandoned: u64,
    /// accept(2) failures.
    pub accept_errors: u64,
    /// Access-log lines dropped (buffer full).
    pub access_log_dropped: u64,
    /// Relayed bytes moved by `splice(2)`.
    pub spliced: u64,
    /// Relayed bytes moved in batch mode (tunnel roles).
    pub batched: u64,
    /// Tunnel sessions that agreed on large chunks, and those that wanted
    /// them but found the shard's reservations spent.
    pub large_chunks: (u64, u64),
    /// Sessions carried by a kept tunnel, and keep-alive tunnels idle now.
    pub tunnels: (u64, u64),
    /// Sleeps that waited for a batch of events (`--wake-batch`), and those
    /// of them that waited out the whole `--wake-batch-wait`.
    pub coalesced_sleeps: (u64, u64),
    /// Per configured upstream, in spec order.
    pub upstreams: Vec<UpstreamSnapshot>,
    /// Histograms in [`Hist::ALL`] order (empty when metrics are off).
    pub hists: Vec<Recorded>,
}

/// What a shard sends each interval: its counters (absolute) and the
/// histograms recorded since the last publish (a delta).
pub struct Publish {
    /// Counters; `hists` is empty.
    pub counters: Snapshot,
    /// This interval's histogram records, if any were recorded.
    pub delta: Option<Vec<Delta>>,
}

impl Publish {
    /// Collects what a shard publishes now.
    pub fn take(shard: usize, stats: &ShardStats, timings: &Timings, limit: u64) -> Publish {
        Publish {
            counters: Snapshot::counters(shard, stats, limit),
            delta: timings.take_delta(),
        }
    }
}

impl Snapshot {
    fn counters(shard: usize, stats: &ShardStats, limit: u64) -> Snapshot {
        Snapshot {
            shard,
            limit,
            accepted: stats.accepted.get(),
            active: stats.active.get(),
            closed: CloseReason::ALL.iter().map(|r| stats.closed(*r)).collect(),
            bytes_up: stats.bytes_up.get(),
            bytes_down: stats.bytes_down.get(),
            handshake_failures: stats.handshake_failures.get(),
            handshakes_abandoned: stats.handshakes_abandoned.get(),
            accept_errors: stats.accept_errors.get(),
            access_log_dropped: stats.access_log_dropped.get(),
            spliced: stats.spliced.get(),
            batched: stats.batched.get(),
            large_chunks: (stats.large_chunks.get(), stats.large_chunks_denied.get()),
            tunnels: (stats.tunnel_reuses.get(), stats.idle_tunnels.get()),
            // The shard's own executor's counts: this runs on its thread.
            coalesced_sleeps: glommio::raw::coalesced_sleeps(),
            upstreams: Vec::new(),
            hists: Vec::new(),
        }
    }

    /// Adds a histogram delta into this snapshot's cumulative histograms
    /// (allocated on the first delta).
    fn fold(&mut self, delta: Vec<Delta>) {
        if self.hists.is_empty() {
            self.hists = delta.iter().map(|_| Recorded::new()).collect();
        }
        for (acc, d) in self.hists.iter_mut().zip(&delta) {
            acc.add(d);
        }
    }
}

/// One shard's inbox on the board.
#[derive(Default)]
struct Inbox {
    counters: Option<Snapshot>,
    deltas: Vec<Vec<Delta>>,
}

/// Where shards publish and scrapes read.
#[derive(Clone)]
pub struct Board {
    /// Shards write here (briefly).
    inbox: Arc<Mutex<Vec<Inbox>>>,
    /// Only the metrics thread touches this: cumulative state per shard.
    merged: Arc<Mutex<Vec<Option<Snapshot>>>>,
    /// Process facts for `/metrics`.
    pub info: Arc<ProcessInfo>,
}

/// Facts about the process that every scrape reports.
#[derive(Debug)]
pub struct ProcessInfo {
    /// `entry`, `exit` or `forward`.
    pub role: &'static str,
    /// Process start, seconds since the epoch.
    pub start_time: f64,
    /// Set when draining starts (for `/healthz`).
    pub draining: std::sync::atomic::AtomicBool,
    /// Fingerprints of the loaded tunnel keys, primary first
    /// (`shardproxy_key_info`). Written at start-up and on SIGHUP by the
    /// signal thread, read by scrapes; never touched by a shard.
    pub keys: Mutex<Vec<String>>,
    /// Set when a successor took the listeners over: this process's metrics
    /// thread stops accepting on the shared socket.
    pub handed_over: std::sync::atomic::AtomicBool,
    /// Metrics requests accepted and not yet answered.
    pub serving: std::sync::atomic::AtomicUsize,
    /// Set when the metrics thread stopped accepting (after a hand-over).
    pub metrics_stopped: std::sync::atomic::AtomicBool,
    /// The configured upstreams' names (`--upstream` as written), in spec
    /// order: the `upstream` label of the per-upstream series.
    pub upstreams: Mutex<Vec<String>>,
    /// Set by the upstream manager when active health checks find no
    /// endpoint up (`/healthz` then says 503).
    pub no_upstream_up: std::sync::atomic::AtomicBool,
}

impl Board {
    /// A board for `shards` shards.
    pub fn new(shards: usize, role: &'static str) -> Board {
        let start_time = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        Board {
            inbox: Arc::new(Mutex::new((0..shards).map(|_| Inbox::default()).collect())),
            merged: Arc::new(Mutex::new(vec![None; shards])),
            info: Arc::new(ProcessInfo {
                role,
                start_time,
                draining: std::sync::atomic::AtomicBool::new(false),
                keys: Mutex::new(Vec::new()),
                handed_over: std::sync::atomic::AtomicBool::new(false),
                serving: std::sync::atomic::AtomicUsize::new(0),
                metrics_stopped: std::sync::atomic::AtomicBool::new(false),
                no_upstream_up: std::sync::atomic::AtomicBool::new(false),
                upstreams: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Records the fingerprints of the keys now loaded (start-up, SIGHUP).
    pub fn set_keys(&self, fingerprints: Vec<String>) {
        if let Ok(mut k) = self.info.keys.lock() {
            *k = fingerprints;
        }
    }

    /// A shard's publish: counters replace, histogram deltas queue.
    pub fn publish(&self, p: Publish) {
        let shard = p.counters.shard;
        if let Ok(mut inbox) = self.inbox.lock() {
            if let Some(slot) = inbox.get_mut(shard) {
                slot.counters = Some(p.counters);
                slot.deltas.extend(p.delta);
            }
        }
    }

    /// Folds everything published so far into the cumulative state and
    /// calls `f` with every shard that has published (metrics thread only).
    pub fn with_snapshots<R>(&self, f: impl FnOnce(&[&Snapshot]) -> R) -> R {
        let incoming: Vec<(Option<Snapshot>, Vec<Vec<Delta>>)> = match self.inbox.lock() {
            Ok(mut inbox) => inbox
                .iter_mut()
                .map(|s| (s.counters.take(), std::mem::take(&mut s.deltas)))
                .collect(),
            Err(_) => Vec::new(),
        };
        let Ok(mut merged) = self.merged.lock() else {
            return f(&[]);
        };
        for (slot, (counters, deltas)) in merged.iter_mut().zip(incoming) {
            if let Some(mut c) = counters {
                c.hists = slot.take().map(|old| old.hists).unwrap_or_default();
                *slot = Some(c);
            }
            if let Some(s) = slot.as_mut() {
                for d in deltas {
                    s.fold(d);
                }
            }
        }
        // Render straight from the cumulative state: no copy.
        let view: Vec<&Snapshot> = merged.iter().flatten().collect();
        f(&view)
    }

    /// Whether the process is draining.
    /// Waits (at most `limit`) until every accepted metrics request has
    /// been answered, so that exiting never resets a scrape or a probe in
    /// flight (after a hand-over the port stays open in the successor).
    pub fn wait_answered(&self, limit: Duration) {
        use std::sync::atomic::Ordering::SeqCst;
        let deadline = std::time::Instant::now() + limit;
        // After a hand-over the thread stops accepting within its 200 ms
        // accept timeout; wait for that first, so no request is accepted
        // after the count reached zero.
        while self.info.handed_over.load(SeqCst)
            && !self.info.metrics_stopped.load(SeqCst)
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        while self.info.serving.load(SeqCst) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether a successor took this process's listeners over.
    pub fn handed_over(&self) -> bool {
        self.info
            .handed_over
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether active health checks find every upstream endpoint down.
    pub fn no_upstream_up(&self) -> bool {
        self.info
            .no_upstream_up
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn draining(&self) -> bool {
        self.info
            .draining
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two intervals' sparse deltas folded together give exactly the
    /// histogram (counts per bucket, sum) of recording everything in one.
    #[test]
    fn sparse_deltas_fold_into_the_same_histogram() {
        let timings = Timings::new(true, 1);
        let mut direct = Recorded::new();
        let mut snap = Snapshot::counters(0, &ShardStats::default(), 1);
        let values = [1u64, 7, 7, 999, 1_000, 1_001, 65_535, 3_000_000_000];
        for round in 0..2u64 {
            for (i, v) in values.iter().enumerate() {
                let d = Duration::from_micros(v + round * i as u64);
                timings.record(Hist::RelayUp, d);
                direct.record(d);
            }
            timings.record_upstream(0, Duration::from_micros(42));
            let delta = timings.take_delta().expect("recorded");
            assert_eq!(delta.len(), Hist::ALL.len() + 1);
            assert!(delta[Hist::FirstByte as usize].counts.is_empty());
            snap.fold(delta);
            assert!(timings.take_delta().is_none(), "reset in place");
        }
        let folded = &snap.hists[Hist::RelayUp as usize];
        assert_eq!(folded.sum_micros, direct.sum_micros);
        assert_eq!(folded.hist, direct.hist);
        assert_eq!(snap.hists[Hist::ALL.len()].hist.len(), 2);
    }
}
