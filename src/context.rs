//! What one shard's tasks share: its configuration, counters, histograms,
//! keys and lifecycle triggers. Lives in an `Rc` on its shard's thread.
//!
//! This module sits below the listener, the session and the relay, and
//! imports none of them. Fields are private; each method is named for what
//! its caller means to do.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use crate::config::{Config, Limits};
use crate::metrics::{Board, Publish, Timings};
use crate::proto::{KeySet, SALT_LEN};
use crate::rng::SaltRng;
use crate::stats::{CloseReason, ShardStats};
use crate::trigger::Trigger;

/// One shard's shared state.
pub struct ShardCtx {
    id: usize,
    cfg: Config,
    stats: ShardStats,
    timings: Timings,
    /// Where snapshots go, when metrics are on.
    board: Option<Board>,
    /// Tunnel keys for new connections; replaced on SIGHUP. A session clones
    /// the `Rc` when it starts, and its derived session keys never change.
    keys: RefCell<Option<Rc<KeySet>>>,
    /// Fired when draining starts: the accept loop stops.
    stop_accepting: Trigger,
    /// Fired when the drain period ends: every live connection is aborted.
    abort: Trigger,
    /// Fired when draining and the last connection has closed.
    all_closed: Trigger,
    draining: Cell<bool>,
    salts: RefCell<SaltRng>,
    /// Relay buffers of finished connections, for the next ones.
    buffers: RefCell<Vec<Vec<u8>>>,
    /// Pipes for `--splice auto` (`forward`).
    pipes: crate::transfer::PipePool,
    /// Batch buffers for transfers (tunnel roles).
    batches: crate::transfer::BatchPool,
    /// The exit's replay filter (this shard's end of it).
    replay: RefCell<Option<Rc<crate::replay::Guard>>>,
    /// The exit's pending (unauthenticated) handshakes, oldest first, each
    /// with the trigger that closes it when a newer one needs the room.
    pending: Handshakes,
    /// Session permits (`--max-connections`), shared with the accept loops;
    /// the exit takes one only once a handshake has authenticated.
    sessions: RefCell<Option<Rc<glommio::sync::Semaphore>>>,
    /// This shard's view of the upstream endpoints.
    pool: crate::upstream::pool::Pool,
    /// Counters per configured upstream.
    upstream_stats: Vec<crate::stats::UpstreamStats>,
    /// This shard's end of the access log, when it is on.
    access_log: RefCell<Option<crate::access_log::ShardLog>>,
    /// Whether sessions look up their peer and local addresses (the access
    /// log, the PROXY protocol and the entry's `meta` need them).
    wants_addresses: bool,
    /// Live relays, for the idle sweep and the end of a drain.
    watchdog: crate::watchdog::Watchdog,
    /// The completion-driven relays (`forward`).
    engine: crate::engine::Engine,
    /// The entry's idle keep-alive tunnels (docs/PROTOCOL.md §4.1).
    tunnels: crate::keepalive::EntryPool,
    /// The exit's idle keep-alive tunnels.
    idle_tunnels: crate::keepalive::ExitIdle,
    /// Bumped by every key reload: a keep-alive tunnel carries no session
    /// with keys older than the shard's.
    keys_gen: Cell<u64>,
}

/// A pending handshake's place in its shard's registry; leaving it (drop)
/// frees the place. [`Pending::evicted`] fires if a newer handshake took it.
pub struct Pending<'a> {
    registry: &'a Handshakes,
    id: u64,
    evicted: Trigger,
}

impl Pending<'_> {
    /// Fires when this handshake is closed to make room for a newer one.
    pub fn evicted(&self) -> &Trigger {
        &self.evicted
    }

    /// Marks the handshake's hello as verified under our key (`true`), so
    /// that a newer handshake never takes its place, while the replay check
    /// (a message to another shard) decides whether it is fresh; `false`
    /// again for a hello found replayed. A break-it round saw a flood of
    /// silent peers close real entries' handshakes during that check.
    pub fn vouch(&self, vouched: bool) {
        self.registry.vouch(self.id, vouched);
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.registry.leave(self.id);
    }
}

/// A shard's pending (unauthenticated) handshakes, oldest first: the
/// bookkeeping of `--max-handshakes` ([`ShardCtx::begin_handshake`]), apart
/// from any socket so that it can be tested alone.
#[derive(Default)]
struct Handshakes {
    places: RefCell<std::collections::VecDeque<PendingEntry>>,
    next: Cell<u64>,
}

/// One place in the registry.
struct PendingEntry {
    id: u64,
    since: std::time::Instant,
    evicted: Trigger,
    /// Its hello verified under our key and awaits the replay check: never
    /// closed to make room for peers without the key.
    vouched: bool,
}

impl Handshakes {
    /// A new place at `now`, with at most `max` (twice that for young ones)
    /// held: see [`ShardCtx::begin_handshake`]. Returns its ID and the
    /// trigger that closes it (already fired if it got no place).
    fn begin(&self, max: usize, now: std::time::Instant) -> (u64, Trigger) {
        let max = max.max(1);
        let mut places = self.places.borrow_mut();
        let id = self.next.get();
        self.next.set(id.wrapping_add(1));
        let evicted = Trigger::new();
        let mut room = true;
        while places.len() >= max {
            // The oldest unverified one (nearly always the front).
            let Some(i) = places.iter().position(|e| !e.vouched) else {
                room = places.len() < 2 * max;
                break;
            };
            let evictable = now.duration_since(places[i].since) >= EVICTABLE_AFTER;
            if !evictable && places.len() < 2 * max {
                break;
            }
            if let Some(oldest) = places.remove(i) {
                oldest.evicted.fire();
            }
        }
        if room {
            places.push_back(PendingEntry {
                id,
                since: now,
                evicted: evicted.clone(),
                vouched: false,
            });
        } else {
            evicted.fire();
        }
        (id, evicted)
    }

    fn vouch(&self, id: u64, vouched: bool) {
        if let Some(e) = self.places.borrow_mut().iter_mut().find(|e| e.id == id) {
            e.vouched = vouched;
        }
    }

    fn leave(&self, id: u64) {
        let mut places = self.places.borrow_mut();
        if let Some(i) = places.iter().position(|e| e.id == id) {
            places.remove(i);
        }
    }

    fn len(&self) -> usize {
        self.places.borrow().len()
    }
}

/// How long an entry passes over an exit that refused a tunnel
/// (docs/PROTOCOL.md §3) before offering it tunnels again.
pub const REFUSAL_PASS_OVER: std::time::Duration = std::time::Duration::from_secs(1);

/// A pending handshake younger than this is not closed to make room while
/// the shard holds fewer than twice `--max-handshakes` (see
/// [`ShardCtx::begin_handshake`]).
pub const EVICTABLE_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Bytes of idle relay buffers a shard keeps for reuse (256 connections'
/// worth at the default 16 KiB).
const POOLED_BYTES: usize = 8 << 20;

impl ShardCtx {
    /// The context of shard `id`; `board` is where metrics snapshots go.
    pub fn new(id: usize, cfg: Config, board: Option<Board>) -> Self {
        let keys = cfg.tunnel().map(|t| Rc::new(t.keys.clone()));
        let mut salts = SaltRng::new();
        let seed = salts
            .salt()
            .map(|s| u64::from_le_bytes(s[..8].try_into().unwrap_or([1; 8])))
            .unwrap_or(id as u64 + 1);
        let ups = &cfg.upstreams;
        let pool = crate::upstream::pool::Pool::new(
            &ups.endpoints,
            ups.balance,
            ups.max_fails,
            ups.fail_timeout,
            seed,
        );
        let upstream_stats = ups.specs.iter().map(|_| Default::default()).collect();
        let wants_addresses = cfg.access_log.is_some()
            || cfg.upstreams.balance == crate::upstream::Balance::SourceHash
            || cfg.identity.accept_proxy.is_some()
            || cfg.identity.send_proxy_v2
            || matches!(cfg.mode, crate::config::Mode::Entry(_));
        let watchdog =
            crate::watchdog::Watchdog::new(cfg.limits.idle_timeout, cfg.access_log_interval());
        let pipes = crate::transfer::PipePool::new(cfg.limits.splice_pipes);
        let batches = crate::transfer::BatchPool::new(cfg.batch_buffers());
        ShardCtx {
            id,
            watchdog,
            engine: crate::engine::Engine::default(),
            timings: Timings::new(board.is_some(), cfg.upstreams.specs.len()),
            board,
            keys: RefCell::new(keys),
            cfg,
            stats: ShardStats::default(),
            stop_accepting: Trigger::new(),
            abort: Trigger::new(),
            all_closed: Trigger::new(),
            draining: Cell::new(false),
            salts: RefCell::new(salts),
            buffers: RefCell::new(Vec::new()),
            pipes,
            batches,
            replay: RefCell::new(None),
            pending: Handshakes::default(),
            sessions: RefCell::new(None),
            access_log: RefCell::new(None),
            wants_addresses,
            pool,
            upstream_stats,
            tunnels: Default::default(),
            idle_tunnels: Default::default(),
            keys_gen: Cell::new(0),
        }
    }

    /// Registers a pending handshake. At `max` pending ones, the oldest is
    /// closed first (its [`Pending::evicted`] fires) if it has waited at
    /// least [`EVICTABLE_AFTER`]: a flood of held, unauthenticated
    /// connections costs the flooder its own oldest ones and never blocks
    /// the accept loop or established sessions. A burst of *young*
    /// handshakes (real clients arriving at once, each done in a round
    /// trip) may grow to twice `max` before the oldest is closed regardless:
    /// the bound is hard, the burst has room. A handshake whose hello
    /// verified ([`Pending::vouch`]) is never the one closed; when only
    /// such ones hold the places, the newcomer is closed at once.
    pub fn begin_handshake(&self, max: usize) -> Pending<'_> {
        let (id, evicted) = self.pending.begin(max, std::time::Instant::now());
        Pending {
            registry: &self.pending,
            id,
            evicted,
        }
    }

    /// Installs the shard's session permits (once, before accepting).
    pub fn set_sessions(&self, permits: Rc<glommio::sync::Semaphore>) {
        *self.sessions.borrow_mut() = Some(permits);
    }

    /// The shard's session permits.
    pub fn sessions(&self) -> Option<Rc<glommio::sync::Semaphore>> {
        self.sessions.borrow().clone()
    }

    /// Pending (unauthenticated) handshakes now.
    pub fn pending_handshakes(&self) -> usize {
        self.pending.len()
    }

    /// Installs the exit's replay filter (once, before accepting).
    pub fn set_replay(&self, guard: Rc<crate::replay::Guard>) {
        *self.replay.borrow_mut() = Some(guard);
    }

    /// The exit's replay filter, if this shard has one.
    pub fn replay(&self) -> Option<Rc<crate::replay::Guard>> {
        self.replay.borrow().clone()
    }

    /// Shard index (0-based).
    pub fn id(&self) -> usize {
        self.id
    }

    /// The configuration (this shard's copy).
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Per-connection limits and timeouts.
    pub fn limits(&self) -> &Limits {
        &self.cfg.limits
    }

    /// Counters.
    pub fn stats(&self) -> &ShardStats {
        &self.stats
    }

    /// Latency histograms (no-ops unless metrics are on).
    pub fn timings(&self) -> &Timings {
        &self.timings
    }

    /// The key set new tunnel sessions use (`None` in `forward`).
    pub fn keys(&self) -> Option<Rc<KeySet>> {
        self.keys.borrow().clone()
    }

    /// Installs reloaded keys for sessions that start from now on. Idle
    /// keep-alive tunnels, made with the old keys, are closed (entry) or
    /// said goodbye to (exit); tunnels carrying a session close when it
    /// ends.
    pub fn replace_keys(&self, keys: KeySet) {
        *self.keys.borrow_mut() = Some(Rc::new(keys));
        self.keys_gen.set(self.keys_gen.get() + 1);
        self.tunnels.clear();
        self.idle_tunnels.retire_all();
    }

    /// The key generation (see [`ShardCtx::replace_keys`]).
    pub fn keys_gen(&self) -> u64 {
        self.keys_gen.get()
    }

    /// The entry's idle keep-alive tunnels.
    pub fn tunnels(&self) -> &crate::keepalive::EntryPool {
        &self.tunnels
    }

    /// The exit's idle keep-alive tunnels.
    pub fn exit_idle(&self) -> &crate::keepalive::ExitIdle {
        &self.idle_tunnels
    }

    /// The exit: a tunnel goes idle between sessions. Until
    /// [`ShardCtx::idle_ended`] it keeps a drain waiting, as a live
    /// connection does (it will say goodbye once the drain starts).
    pub fn idle_began(&self) {
        self.stats
            .idle_tunnels
            .set(self.stats.idle_tunnels.get() + 1);
    }

    /// The exit: an idle tunnel carries a session again, or closed.
    pub fn idle_ended(&self) {
        self.stats
            .idle_tunnels
            .set(self.stats.idle_tunnels.get().saturating_sub(1));
        self.check_drained();
    }

    fn check_drained(&self) {
        let idle = match self.cfg.mode {
            crate::config::Mode::Exit(_) => self.stats.idle_tunnels.get(),
            _ => 0,
        };
        if self.draining.get() && self.stats.active.get() == 0 && idle == 0 {
            self.all_closed.fire();
        }
    }

    /// A fresh random salt for a hello (see [`crate::rng`]).
    pub fn salt(&self) -> Result<[u8; SALT_LEN], getrandom::Error> {
        self.salts.borrow_mut().salt()
    }

    /// A fresh connection ID (128 random bits from the shard's CSPRNG; 0 if
    /// the OS could not seed it).
    pub fn connection_id(&self) -> u128 {
        self.salt()
            .map(|s| u128::from_le_bytes(s[..16].try_into().unwrap_or([0; 16])))
            .unwrap_or(0)
    }

    /// The shard's pipes for splicing (`forward`, `--splice auto`).
    pub fn pipes(&self) -> &crate::transfer::PipePool {
        &self.pipes
    }

    /// The shard's batch buffers for transfers (tunnel roles).
    pub fn batches(&self) -> &crate::transfer::BatchPool {
        &self.batches
    }

    /// A relay buffer of `len` bytes: a pooled one, or a new zeroed one. A
    /// pooled buffer holds bytes of an earlier connection; the relay only
    /// ever sends what it read into a buffer, never what was there. `None`
    /// if the allocation fails (the caller's connection ends; the process
    /// does not abort).
    pub fn buffer(&self, len: usize) -> Option<Vec<u8>> {
        let mut pool = self.buffers.borrow_mut();
        match pool.pop() {
            Some(buf) if buf.len() == len => Some(buf),
            _ => {
                pool.clear();
                let mut buf = Vec::new();
                buf.try_reserve_exact(len).ok()?;
                buf.resize(len, 0);
                Some(buf)
            }
        }
    }

    /// Returns a relay buffer for reuse (dropped beyond the pool's bound).
    pub fn recycle(&self, buf: Vec<u8>) {
        let mut pool = self.buffers.borrow_mut();
        if (pool.len() + 1) * buf.len() <= POOLED_BYTES {
            pool.push(buf);
        }
    }

    /// Fires when the shard stops accepting (start of drain).
    pub fn accepting_stopped(&self) -> &Trigger {
        &self.stop_accepting
    }

    /// Fires when live connections must be aborted (end of drain).
    pub fn aborted(&self) -> &Trigger {
        &self.abort
    }

    /// Starts the drain: the accept loop stops; live connections go on.
    pub fn begin_drain(&self) {
        self.draining.set(true);
        self.stop_accepting.fire();
        // Idle keep-alive tunnels close at once: the exit takes their FIN
        // at a session boundary as the tunnel's end.
        self.tunnels.clear();
        self.check_drained();
    }

    /// Whether the shard is draining (no new sessions on kept tunnels).
    pub fn draining(&self) -> bool {
        self.draining.get()
    }

    /// Ends the drain: every live connection is aborted (RST).
    pub fn abort_all(&self) {
        self.abort.fire();
        self.watchdog.abort_all();
    }

    /// Live relays: registration, the idle sweep, the drain's abort.
    pub fn watchdog(&self) -> &crate::watchdog::Watchdog {
        &self.watchdog
    }

    /// The shard's completion-driven relays.
    pub fn engine(&self) -> &crate::engine::Engine {
        &self.engine
    }

    /// Completes once draining and no connection is left.
    pub async fn all_closed(&self) {
        self.all_closed.wait().await
    }

    /// Records an accepted connection.
    pub fn on_accept(&self) {
        self.stats.on_accept();
    }

    /// Records a finished connection.
    pub fn on_close(&self, reason: CloseReason) {
        self.stats.on_close(reason);
        self.check_drained();
    }

    /// Picks the endpoint for a connection's next attempt (see
    /// [`crate::upstream::pool::Pool::pick`]).
    pub fn pick_upstream(
        &self,
        rec: &crate::access_log::Record,
        tried: &[std::net::SocketAddr],
    ) -> Option<crate::upstream::pool::Lease> {
        self.pool.pick(
            rec.client().map(|a| a.ip()),
            tried,
            std::time::Instant::now(),
        )
    }

    /// Probes, with a TCP connect each, the endpoints that passive health
    /// holds down (see [`crate::upstream::pool::Pool::claim_probes`]: at
    /// most one probe per endpoint and second). A refusing exit calls this
    /// instead of trying such an endpoint with a client's tunnel: a probe
    /// that connects puts it back in rotation; one that fails re-ejects an
    /// endpoint whose ejection had run out, for twice as long. Stop wins: a
    /// shard that starts draining drops its probes.
    pub fn probe_down_upstreams(&self) {
        let now = std::time::Instant::now();
        for e in self.pool.claim_probes(now) {
            let (id, stop) = (self.id, self.stop_accepting.clone());
            let (timeout, fail_timeout) = (self.limits().connect_timeout, self.pool.fail_timeout());
            glommio::spawn_local(async move {
                let connect = glommio::net::TcpStream::connect_timeout(e.addr, timeout);
                match crate::trigger::bounded(&stop, None, connect).await {
                    Ok(Ok(_)) => {
                        e.probe_passed();
                        crate::info!(
                            "shard {id}: upstream {} answers again (a connect probe while it was held down)",
                            e.addr
                        );
                    }
                    Ok(Err(err)) => {
                        let d = e.probe_failed(std::time::Instant::now(), fail_timeout);
                        crate::info!(
                            "shard {id}: upstream {} still down ({err}); ejected for {} more",
                            e.addr,
                            crate::units::format_approx(d)
                        );
                    }
                    Err(_) => {}
                }
            })
            .detach();
        }
    }

    /// Whether an upstream endpoint other than those in `tried` is up now.
    pub fn upstream_up_except(&self, tried: &[std::net::SocketAddr]) -> bool {
        self.pool.any_up_except(tried)
    }

    /// Whether any upstream endpoint is up now (see
    /// [`crate::upstream::pool::Pool::any_up`]).
    pub fn upstream_up(&self) -> bool {
        self.pool.any_up()
    }

    /// An attempt on `lease`'s endpoint succeeded.
    pub fn upstream_ok(&self, lease: &crate::upstream::pool::Lease) {
        let e = lease.endpoint();
        self.pool.on_success(e);
        if let Some(s) = self.upstream_stats.get(e.spec) {
            s.connects.set(s.connects.get() + 1);
        }
    }

    /// An attempt on `lease`'s endpoint failed with `err`: counted by
    /// reason, and the endpoint ejected after `--max-fails` in a row.
    pub fn upstream_failed(
        &self,
        lease: &crate::upstream::pool::Lease,
        err: &crate::error::SessionError,
    ) {
        use crate::error::SessionError;
        let e = lease.endpoint();
        if let Some(s) = self.upstream_stats.get(e.spec) {
            let cell = match err {
                _ if err.is_refusal() => &s.refused,
                SessionError::Connect(_) => &s.refused,
                SessionError::ConnectTimeout => &s.timeouts,
                _ => &s.handshakes,
            };
            cell.set(cell.get() + 1);
        }
        let now = std::time::Instant::now();
        if err.is_refusal() {
            // An exit that refused can serve again as soon as its origins
            // are back or a slot frees: passed over for a moment, never
            // ejected (an ejection doubles, up to minutes).
            e.pass_over(now, REFUSAL_PASS_OVER);
            return;
        }
        if let crate::upstream::pool::Failed::Ejected(d) = self.pool.on_failure(e, now) {
            if let Some(s) = self.upstream_stats.get(e.spec) {
                s.ejections.set(s.ejections.get() + 1);
            }
            if let Some(since) = e.eject_log_due(now) {
                let more = if since > 0 {
                    format!("; {since} more ejection(s) of it since the last such line")
                } else {
                    String::new()
                };
                crate::warn!(
                    "shard {}: upstream {} ejected for {} after {} failed attempt(s) in a row (last: {err}){more}",
                    self.id,
                    e.addr,
                    crate::units::format_approx(d),
                    self.cfg.upstreams.max_fails
                );
            }
        }
    }

    /// The upstream manager's news: a new endpoint set, or health verdicts.
    pub fn upstream_update(&self, update: crate::upstream::manager::Update) {
        use crate::upstream::manager::Update;
        match update {
            Update::Endpoints(e) => {
                self.pool.replace(&e);
                // After the set is in place: tests and operators wait for it.
                crate::info!(
                    "shard {}: upstream endpoints now {} ({})",
                    self.id,
                    e.len(),
                    e.iter()
                        .map(|e| e.addr.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            Update::Health(h) => self.pool.set_health(&h),
        }
    }

    /// Installs this shard's access log (once, before accepting).
    pub fn set_access_log(&self, log: crate::access_log::ShardLog) {
        *self.access_log.borrow_mut() = Some(log);
    }

    /// Logs `rec` to the access log, if it is on: closed with `reason`, or
    /// still open (`None`, an `--access-log-interval` line). Never blocks.
    pub fn log_access(&self, rec: &crate::access_log::Record, reason: Option<CloseReason>) {
        if let Some(log) = self.access_log.borrow().as_ref() {
            log.log(rec, reason, &self.stats);
        }
    }

    /// Hands buffered access-log lines to the writer (periodic).
    pub fn flush_access_log(&self) {
        if let Some(log) = self.access_log.borrow().as_ref() {
            log.flush(&self.stats);
        }
    }

    /// Ends the access log: every buffered line is written (blocking; the
    /// shard is done).
    pub fn close_access_log(&self) {
        let log = self.access_log.borrow_mut().take();
        if let Some(log) = log {
            log.finish(&self.stats);
        }
    }

    /// Whether sessions look up their addresses (see the field).
    pub fn wants_addresses(&self) -> bool {
        self.wants_addresses
    }

    /// Whether a metrics board receives snapshots.
    pub fn publishes(&self) -> bool {
        self.board.is_some()
    }

    /// Publishes a snapshot of this shard's counters and histograms.
    pub fn publish(&self) {
        if let Some(board) = &self.board {
            // The entry's idle-tunnel gauge is its pool's size, read here;
            // the exit counts its idle tunnels as they come and go (a
            // drain waits for them).
            if matches!(self.cfg.mode, crate::config::Mode::Entry(_)) {
                self.stats.idle_tunnels.set(self.tunnels.len() as u64);
            }
            let mut publish = Publish::take(
                self.id,
                &self.stats,
                &self.timings,
                self.cfg.limits.max_connections.get() as u64,
            );
            publish.counters.upstreams = self.upstream_snapshot();
            board.publish(publish);
        }
    }

    /// Per configured upstream: counters, and its endpoints' state now.
    fn upstream_snapshot(&self) -> Vec<crate::metrics::UpstreamSnapshot> {
        let endpoints = self.pool.endpoints();
        self.upstream_stats
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mine = endpoints.iter().filter(|e| e.spec == i);
                crate::metrics::UpstreamSnapshot {
                    connects: s.connects.get(),
                    refused: s.refused.get(),
                    timeouts: s.timeouts.get(),
                    handshakes: s.handshakes.get(),
                    ejections: s.ejections.get(),
                    active: mine.clone().map(|e| u64::from(e.active())).sum(),
                    endpoints: mine.clone().count() as u64,
                    available: mine.filter(|e| e.up()).count() as u64,
                }
            })
            .collect()
    }
}

impl crate::engine::Host for ShardCtx {
    fn engine(&self) -> &crate::engine::Engine {
        &self.engine
    }
    fn stats(&self) -> &ShardStats {
        &self.stats
    }
    fn timings(&self) -> &Timings {
        &self.timings
    }
    fn pipes(&self) -> &crate::transfer::PipePool {
        &self.pipes
    }
    fn batches(&self) -> &crate::transfer::BatchPool {
        &self.batches
    }
    fn recycle(&self, buf: Vec<u8>) {
        ShardCtx::recycle(self, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// `--max-handshakes`: the oldest is closed for a newcomer once it is
    /// old enough, or at twice the limit regardless; a vouched one (its
    /// hello verified) never, and when only vouched ones hold the places
    /// the newcomer is the one closed.
    #[test]
    fn pending_handshakes_evict_the_oldest_unverified() {
        let reg = Handshakes::default();
        let t0 = Instant::now();
        let (a, a_gone) = reg.begin(2, t0);
        let (b, b_gone) = reg.begin(2, t0);
        // Young ones: a burst may reach twice the limit.
        let (_c, _) = reg.begin(2, t0);
        let (_d, _) = reg.begin(2, t0);
        assert_eq!(reg.len(), 4);
        assert!(!a_gone.is_fired() && !b_gone.is_fired());
        // At twice the limit, the oldest goes.
        let (_e, _) = reg.begin(2, t0);
        assert!(a_gone.is_fired());
        assert_eq!(reg.len(), 4);
        reg.leave(a);
        assert_eq!(reg.len(), 4);
        // b verified: the next oldest unverified goes instead.
        reg.vouch(b, true);
        let (_f, _) = reg.begin(2, t0);
        assert!(!b_gone.is_fired());
        // Old enough: closed as soon as the limit is reached.
        let later = t0 + EVICTABLE_AFTER + Duration::from_millis(1);
        let (_g, g_gone) = reg.begin(2, later);
        assert!(!b_gone.is_fired() && !g_gone.is_fired());
        // Only vouched ones at twice the limit: the newcomer is closed.
        let all = Handshakes::default();
        let ids: Vec<u64> = (0..4).map(|_| all.begin(2, t0).0).collect();
        for id in &ids {
            all.vouch(*id, true);
        }
        let (_, late) = all.begin(2, later);
        assert!(late.is_fired());
        assert_eq!(all.len(), 4);
        // Unvouched again (a replayed hello): evictable as before.
        all.vouch(ids[0], false);
        let (_, fine) = all.begin(2, later);
        assert!(!fine.is_fired());
        assert_eq!(all.len(), 4);
    }
}
