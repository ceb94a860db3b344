//! Per-shard latency histograms and counters, and how they leave the shard.
//!
//! Recording is shard-local: [`Timings`] lives in the shard's `Rc` context
//! (a `RefCell` of `hdrhistogram::Histogram<u64>`, microseconds, 3
//! significant digits, saturating), so recording touches no atomic and no
//! lock. Without `--metrics-listen` nothing is timed at all.
//!
//! **Publishing: each shard publishes a snapshot on a timer** (every
//! `--metrics-interval`, default 1 s, plus once when it stops) into a
//! [`Board`], from a glommio task queue with small shares so it never
//! competes with connection work. The scrape thread only reads the latest
//! snapshots. Why a timer rather than asking shards on each scrape: a scrape
//! then never waits on, wakes, or stalls a shard, however slow or frequent
//! scrapes are, and a wedged shard still shows its last numbers. The cost is
//! staleness of at most one interval. The board's lock is taken once per
//! interval per shard and by scrapes, never per connection or byte; each
//! critical section swaps or clones one `Arc`.

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

/// A shard's histograms; present only when metrics are enabled.
pub struct Timings(Option<RefCell<Vec<Recorded>>>);

impl Timings {
    /// Histograms that record (`enabled`) or a no-op.
    pub fn new(enabled: bool) -> Self {
        Timings(enabled.then(|| RefCell::new(Hist::ALL.iter().map(|_| Recorded::new()).collect())))
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

    fn snapshot(&self) -> Vec<Recorded> {
        self.0
            .as_ref()
            .map(|h| h.borrow().clone())
            .unwrap_or_default()
    }
}

/// Everything a shard publishes: counters and a copy of its histograms.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Shard index.
    pub shard: usize,
    /// Connections accepted.
    pub accepted: u64,
    /// Connections open.
    pub active: u64,
    /// Closes by reason, in [`CloseReason::ALL`] order.
    pub closed: Vec<u64>,
    /// Plaintext bytes client → upstream.
    pub bytes_up: u64,
    /// Plaintext bytes upstream → client.
    pub bytes_down: u64,
    /// Failed tunnel handshakes.
    pub handshake_failures: u64,
    /// accept(2) failures.
    pub accept_errors: u64,
    /// Histograms in [`Hist::ALL`] order (empty when metrics are off).
    pub hists: Vec<Recorded>,
}

impl Snapshot {
    /// Takes a snapshot of one shard's state.
    pub fn take(shard: usize, stats: &ShardStats, timings: &Timings) -> Snapshot {
        Snapshot {
            shard,
            accepted: stats.accepted.get(),
            active: stats.active.get(),
            closed: CloseReason::ALL.iter().map(|r| stats.closed(*r)).collect(),
            bytes_up: stats.bytes_up.get(),
            bytes_down: stats.bytes_down.get(),
            handshake_failures: stats.handshake_failures.get(),
            accept_errors: stats.accept_errors.get(),
            hists: timings.snapshot(),
        }
    }
}

/// Where shards publish and scrapes read: one slot per shard.
#[derive(Clone)]
pub struct Board {
    slots: Arc<Mutex<Vec<Option<Arc<Snapshot>>>>>,
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
}

impl Board {
    /// A board for `shards` shards.
    pub fn new(shards: usize, role: &'static str) -> Board {
        let start_time = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        Board {
            slots: Arc::new(Mutex::new(vec![None; shards])),
            info: Arc::new(ProcessInfo {
                role,
                start_time,
                draining: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// Replaces a shard's snapshot.
    pub fn publish(&self, snap: Snapshot) {
        let snap = Arc::new(snap);
        let shard = snap.shard;
        if let Ok(mut slots) = self.slots.lock() {
            if let Some(slot) = slots.get_mut(shard) {
                *slot = Some(snap);
            }
        }
    }

    /// The latest snapshot of every shard that has published.
    pub fn read(&self) -> Vec<Arc<Snapshot>> {
        match self.slots.lock() {
            Ok(slots) => slots.iter().flatten().cloned().collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Whether the process is draining.
    pub fn draining(&self) -> bool {
        self.info
            .draining
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}
