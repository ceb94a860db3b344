//! A shard's view of its endpoints, sans I/O (time is passed in): which
//! endpoint the next connection tries, and what failures and health checks
//! did to each. See the module docs of [`crate::upstream`].

use std::cell::{Cell, RefCell};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::{Balance, Endpoint, MAX_EJECTION_FACTOR};

/// How often a refusing exit probes each of its down endpoints at most
/// (see [`Pool::claim_probes`]).
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// One endpoint, as one shard sees it.
#[derive(Debug)]
pub struct EndpointState {
    /// Where to connect.
    pub addr: SocketAddr,
    /// Relative share.
    pub weight: u32,
    /// Its spec's index (the metrics label).
    pub spec: usize,
    active: Cell<u32>,
    fails: Cell<u32>,
    ejected_until: Cell<Option<Instant>>,
    ejections_in_a_row: Cell<u32>,
    healthy: Cell<bool>,
    current: Cell<i64>,
    /// A probe of a refusing exit's down endpoint is under way, and when the
    /// last one started (see [`Pool::claim_probes`]).
    probing: Cell<bool>,
    probed_at: Cell<Option<Instant>>,
    /// When its last ejection was logged, and the ejections since.
    eject_logged: Cell<Option<Instant>>,
    ejects_unlogged: Cell<u64>,
}

impl EndpointState {
    fn new(e: &Endpoint) -> Self {
        EndpointState {
            addr: e.addr,
            weight: e.weight.max(1),
            spec: e.spec,
            active: Cell::new(0),
            fails: Cell::new(0),
            ejected_until: Cell::new(None),
            ejections_in_a_row: Cell::new(0),
            healthy: Cell::new(true),
            current: Cell::new(0),
            probing: Cell::new(false),
            probed_at: Cell::new(None),
            eject_logged: Cell::new(None),
            ejects_unlogged: Cell::new(0),
        }
    }

    /// Connections to it from this shard now.
    pub fn active(&self) -> u32 {
        self.active.get()
    }

    /// Whether the active checker says it is up (true without checks).
    pub fn healthy(&self) -> bool {
        self.healthy.get()
    }

    /// Whether passive health has it ejected at `now`.
    pub fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.get().is_some_and(|t| t > now)
    }

    /// Whether its ejection has run out at `now` with no success since: it
    /// is back in rotation, but nothing has shown that it works again.
    pub fn lapsed(&self, now: Instant) -> bool {
        self.ejected_until.get().is_some_and(|t| t <= now)
    }

    /// Up, as far as this shard knows at `now`: not marked down by the
    /// active checker, not ejected, and not merely back from an ejection
    /// that nothing has shown to be over ([`EndpointState::lapsed`]).
    pub fn up(&self) -> bool {
        self.healthy() && self.ejected_until.get().is_none()
    }

    /// Whether an ejection at `now` gets a log line: at most one a second
    /// per endpoint (an outage of every endpoint can eject and forgive one
    /// many times a second). `Some(n)`: log it, with `n` ejections since
    /// the last line; `None`: counted for the next line.
    pub fn eject_log_due(&self, now: Instant) -> Option<u64> {
        match self.eject_logged.get() {
            Some(t) if now.saturating_duration_since(t) < Duration::from_secs(1) => {
                self.ejects_unlogged.set(self.ejects_unlogged.get() + 1);
                None
            }
            _ => {
                self.eject_logged.set(Some(now));
                Some(self.ejects_unlogged.replace(0))
            }
        }
    }

    /// Claims a probe at `now` (see [`Pool::claim_probes`]): false if one
    /// is under way or the last one started less than [`PROBE_EVERY`] ago.
    fn claim_probe(&self, now: Instant) -> bool {
        let recent = self
            .probed_at
            .get()
            .is_some_and(|t| now.saturating_duration_since(t) < PROBE_EVERY);
        if self.probing.get() || recent {
            return false;
        }
        self.probing.set(true);
        self.probed_at.set(Some(now));
        true
    }

    /// An exit refused a tunnel to it (docs/PROTOCOL.md §3): it is passed
    /// over until `now + d` (or the end of a longer ejection). Not a
    /// failure: no ejection is counted or doubled, so the exit is used again
    /// soon after it can serve.
    pub fn pass_over(&self, now: Instant, d: Duration) {
        let until = now + d;
        if self.ejected_until.get().is_none_or(|t| t < until) {
            self.ejected_until.set(Some(until));
        }
    }

    /// A probe (a TCP connect) succeeded: back in rotation, as after any
    /// success.
    pub fn probe_passed(&self) {
        self.probing.set(false);
        self.succeeded();
    }

    /// It works: failures and ejections forgotten, back in rotation at once
    /// (a success can happen while ejected, when every endpoint was down and
    /// it was tried anyway).
    fn succeeded(&self) {
        self.fails.set(0);
        self.ejections_in_a_row.set(0);
        self.ejected_until.set(None);
    }

    /// A probe failed at `now`. An endpoint whose ejection had lapsed is
    /// ejected again at once, for twice as long as the last time (as a
    /// `--max-fails` run of failures would); one still ejected stays so.
    /// Returns how long it stays ejected from `now`.
    pub fn probe_failed(&self, now: Instant, fail_timeout: Duration) -> Duration {
        self.probing.set(false);
        match self.ejected_until.get() {
            Some(t) if t > now => t - now,
            _ => self.eject(now, fail_timeout),
        }
    }

    /// Ejects it from `now`, for `fail_timeout` doubled for each ejection
    /// in a row (up to [`MAX_EJECTION_FACTOR`] times).
    fn eject(&self, now: Instant, fail_timeout: Duration) -> Duration {
        self.fails.set(0);
        let n = self.ejections_in_a_row.get();
        self.ejections_in_a_row.set(n.saturating_add(1));
        let factor = 1u32
            .checked_shl(n)
            .unwrap_or(u32::MAX)
            .min(MAX_EJECTION_FACTOR);
        let length = fail_timeout.saturating_mul(factor);
        self.ejected_until.set(Some(now + length));
        length
    }
}

/// A connection's hold on its endpoint: counts as active until dropped.
pub struct Lease(Rc<EndpointState>);

impl Lease {
    /// The endpoint.
    pub fn endpoint(&self) -> &Rc<EndpointState> {
        &self.0
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.active.set(self.0.active.get().saturating_sub(1));
    }
}

/// What a failure did to an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failed {
    /// Counted; the endpoint stays in rotation.
    Counted,
    /// The endpoint is now ejected for this long.
    Ejected(Duration),
}

/// One shard's endpoints and balancer state.
pub struct Pool {
    endpoints: RefCell<Vec<Rc<EndpointState>>>,
    balance: Balance,
    max_fails: u32,
    fail_timeout: Duration,
    rng: Cell<u64>,
    rotate: Cell<usize>,
}

impl Pool {
    /// A pool over `endpoints`. `seed` seeds the random choices (any value
    /// but zero).
    pub fn new(
        endpoints: &[Endpoint],
        balance: Balance,
        max_fails: u32,
        fail_timeout: Duration,
        seed: u64,
    ) -> Pool {
        Pool {
            endpoints: RefCell::new(
                endpoints
                    .iter()
                    .map(|e| Rc::new(EndpointState::new(e)))
                    .collect(),
            ),
            balance,
            max_fails: max_fails.max(1),
            fail_timeout,
            rng: Cell::new(seed | 1),
            rotate: Cell::new(0),
        }
    }

    /// Whether any endpoint is up at `now` ([`EndpointState::up`]). An exit
    /// refuses a tunnel that may be refused when none is
    /// (docs/PROTOCOL.md §3).
    pub fn any_up(&self) -> bool {
        self.any_up_except(&[])
    }

    /// The endpoints that are not up only because of passive health
    /// (ejected, or back from an ejection with no success since), each now
    /// claimed for a probe: at most one at a time per endpoint, one every
    /// [`PROBE_EVERY`]. A refusing exit probes them (a TCP connect) instead
    /// of trying them with a client's tunnel, so it serves again within
    /// about a second of its origin's return, not at the end of an ejection
    /// that may have doubled to minutes. Endpoints the active checker marks
    /// down are left to it. The caller reports each result with
    /// [`EndpointState::probe_passed`] or [`EndpointState::probe_failed`].
    pub fn claim_probes(&self, now: Instant) -> Vec<Rc<EndpointState>> {
        self.endpoints
            .borrow()
            .iter()
            .filter(|e| e.healthy() && !e.up() && e.claim_probe(now))
            .cloned()
            .collect()
    }

    /// `--fail-timeout`.
    pub fn fail_timeout(&self) -> Duration {
        self.fail_timeout
    }

    /// Whether an endpoint not in `tried` is up at `now` (see
    /// [`Pool::any_up`]): an entry lets an exit refuse only when it has
    /// such an alternative (docs/PROTOCOL.md §3).
    pub fn any_up_except(&self, tried: &[SocketAddr]) -> bool {
        self.endpoints
            .borrow()
            .iter()
            .any(|e| !tried.contains(&e.addr) && e.up())
    }

    /// Every endpoint now.
    pub fn endpoints(&self) -> Vec<Rc<EndpointState>> {
        self.endpoints.borrow().clone()
    }

    /// Picks the endpoint for the next attempt of a connection from
    /// `client`, never one in `tried`: as in nginx, a connection tries each
    /// endpoint at most once (retrying a refusing endpoint, or one with the
    /// wrong key, at once only triples its failures), so `--connect-attempts`
    /// is capped by the endpoint count. Prefers endpoints that are healthy
    /// and not ejected; if none is, any untried one (as nginx does when
    /// every server is down: a guess beats a certain failure). `None` once
    /// every endpoint was tried.
    pub fn pick(
        &self,
        client: Option<IpAddr>,
        tried: &[SocketAddr],
        now: Instant,
    ) -> Option<Lease> {
        let all = self.endpoints.borrow();
        let untried = |e: &&Rc<EndpointState>| !tried.contains(&e.addr);
        let mut candidates: Vec<&Rc<EndpointState>> = all
            .iter()
            .filter(untried)
            .filter(|e| e.healthy() && !e.ejected(now))
            .collect();
        if candidates.is_empty() {
            candidates = all.iter().filter(untried).collect();
        }
        let chosen = match candidates.len() {
            0 => return None,
            1 => candidates[0],
            _ => match self.balance {
                Balance::RoundRobin => smooth_weighted(&candidates),
                Balance::LeastConnections => self.least_connections(&candidates),
                Balance::RandomTwo => self.random_two(&candidates),
                Balance::SourceHash => match client {
                    Some(ip) => rendezvous(&candidates, ip),
                    None => self.random_two(&candidates),
                },
            },
        };
        chosen.active.set(chosen.active.get() + 1);
        Some(Lease(chosen.clone()))
    }

    fn next_random(&self) -> u64 {
        let mut x = self.rng.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.set(x);
        x
    }

    /// An index into `c`, drawn with probability proportional to weight,
    /// never `skip`; `total` is the sum of the weights that may be drawn.
    fn weighted_index(&self, c: &[&Rc<EndpointState>], total: u64, skip: Option<usize>) -> usize {
        let mut r = self.next_random() % total.max(1);
        for (i, e) in c.iter().enumerate() {
            if Some(i) == skip {
                continue;
            }
            let w = u64::from(e.weight);
            if r < w {
                return i;
            }
            r -= w;
        }
        // Not reached while `total` is the sum; the last eligible one.
        (0..c.len()).rev().find(|&i| Some(i) != skip).unwrap_or(0)
    }

    fn least_connections<'a>(&self, c: &[&'a Rc<EndpointState>]) -> &'a Rc<EndpointState> {
        // Ties go round the candidates, so equal endpoints share the load.
        let start = self.rotate.get() % c.len();
        self.rotate.set(self.rotate.get().wrapping_add(1));
        let mut best = c[start];
        for i in 1..c.len() {
            let e = c[(start + i) % c.len()];
            if fewer(e, best) {
                best = e;
            }
        }
        best
    }

    /// Power of two choices, weighted: two distinct candidates drawn with
    /// probability proportional to their weights, then the less loaded
    /// one relative to its weight. Drawing them uniformly let weights count
    /// only between the two: a weight-1 endpoint among three took about a
    /// sixth of the connections next to one of weight 1000.
    fn random_two<'a>(&self, c: &[&'a Rc<EndpointState>]) -> &'a Rc<EndpointState> {
        let total: u64 = c.iter().map(|e| u64::from(e.weight)).sum();
        let a = self.weighted_index(c, total, None);
        let b = self.weighted_index(c, total - u64::from(c[a].weight), Some(a));
        if fewer(c[b], c[a]) {
            c[b]
        } else {
            c[a]
        }
    }

    /// A connection to `e` was established (or its handshake completed).
    pub fn on_success(&self, e: &EndpointState) {
        e.succeeded();
    }

    /// A connect (or an entry's tunnel handshake) to `e` failed at `now`.
    /// After `--max-fails` in a row the endpoint is ejected for
    /// `--fail-timeout`, doubled for each ejection in a row (up to
    /// [`MAX_EJECTION_FACTOR`] times); the first success resets both.
    pub fn on_failure(&self, e: &EndpointState, now: Instant) -> Failed {
        // Attempts that were under way when it was ejected change nothing:
        // one outage must not count as several ejections in a row.
        if e.ejected(now) {
            return Failed::Counted;
        }
        let fails = e.fails.get() + 1;
        if fails < self.max_fails {
            e.fails.set(fails);
            return Failed::Counted;
        }
        Failed::Ejected(e.eject(now, self.fail_timeout))
    }

    /// The active checker's verdicts, by address. An endpoint that comes
    /// back up is also forgiven its passive ejection: its checks passed
    /// since, so it is used again at once.
    pub fn set_health(&self, verdicts: &[(SocketAddr, bool)]) {
        for e in self.endpoints.borrow().iter() {
            if let Some((_, up)) = verdicts.iter().find(|(a, _)| *a == e.addr) {
                if *up && !e.healthy.get() {
                    e.ejected_until.set(None);
                    e.fails.set(0);
                    e.ejections_in_a_row.set(0);
                }
                e.healthy.set(*up);
            }
        }
    }

    /// A new endpoint set (DNS re-resolution). Endpoints still present keep
    /// their state; connections to removed ones keep running (they hold
    /// their endpoint).
    pub fn replace(&self, endpoints: &[Endpoint]) {
        let mut all = self.endpoints.borrow_mut();
        let next: Vec<Rc<EndpointState>> = endpoints
            .iter()
            .map(
                |e| match all.iter().find(|s| s.addr == e.addr && s.spec == e.spec) {
                    Some(s) => s.clone(),
                    None => Rc::new(EndpointState::new(e)),
                },
            )
            .collect();
        *all = next;
    }
}

/// Whether `a` is less loaded than `b` relative to weight, counting the
/// connection about to be placed: `(active + 1) / weight`, so that between
/// idle endpoints the heavier one wins (a plain `active / weight` calls
/// every idle endpoint equal and ignores weights under light load).
fn fewer(a: &EndpointState, b: &EndpointState) -> bool {
    (u64::from(a.active()) + 1) * u64::from(b.weight)
        < (u64::from(b.active()) + 1) * u64::from(a.weight)
}

/// nginx's smooth weighted round robin (ngx_http_upstream_round_robin.c):
/// every candidate gains its weight, the largest is chosen and loses the
/// total. Over any `total` picks each gets exactly its weight.
fn smooth_weighted<'a>(c: &[&'a Rc<EndpointState>]) -> &'a Rc<EndpointState> {
    let total: i64 = c.iter().map(|e| i64::from(e.weight)).sum();
    let mut best = c[0];
    for e in c {
        e.current.set(e.current.get() + i64::from(e.weight));
        if e.current.get() > best.current.get() {
            best = e;
        }
    }
    best.current.set(best.current.get() - total);
    best
}

/// Weighted rendezvous hashing (Thaler and Ravishankar; the weighted form
/// `-w / ln(u)` from Schindelhauer and Schomaker): the candidate with the
/// highest score for this client wins.
fn rendezvous<'a>(c: &[&'a Rc<EndpointState>], client: IpAddr) -> &'a Rc<EndpointState> {
    let key = match client {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    };
    let mut best = c[0];
    let mut best_score = f64::MIN;
    let client_hash = mix(mix(key as u64) ^ (key >> 64) as u64);
    for e in c {
        let addr = match e.addr.ip() {
            IpAddr::V4(v4) => u128::from(u32::from(v4)),
            IpAddr::V6(v6) => u128::from(v6),
        };
        // Address and port are mixed in one after the other, never XORed
        // together first: 127.0.0.5:51140 and 127.0.0.6:51143 (equal
        // `address ^ port`) hashed alike, and the later one never won.
        let endpoint_hash =
            mix(mix(mix(addr as u64) ^ (addr >> 64) as u64) ^ u64::from(e.addr.port()));
        let h = mix(client_hash ^ endpoint_hash);
        // A uniform value in (0, 1).
        let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let score = -f64::from(e.weight) / u.ln();
        if score > best_score {
            best_score = score;
            best = e;
        }
    }
    best
}

/// splitmix64's finaliser: a fixed, well-mixed 64-bit hash, the same in
/// every shard and process.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(port: u16, weight: u32) -> Endpoint {
        Endpoint {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            weight,
            spec: 0,
        }
    }

    fn pool(eps: &[Endpoint], balance: Balance) -> Pool {
        Pool::new(eps, balance, 3, Duration::from_secs(10), 42)
    }

    #[test]
    fn up_means_neither_ejected_nor_marked_down() {
        let p = pool(&[ep(1, 1), ep(2, 1)], Balance::RoundRobin);
        let now = Instant::now();
        let a = SocketAddr::from(([127, 0, 0, 1], 1));
        let b = SocketAddr::from(([127, 0, 0, 1], 2));
        assert!(p.any_up() && p.any_up_except(&[a]));
        // Endpoint 2: ejected after three failures in a row.
        let e2 = p.endpoints()[1].clone();
        for _ in 0..3 {
            p.on_failure(&e2, now);
        }
        assert!(p.any_up(), "endpoint 1 is still up");
        assert!(!p.any_up_except(&[a]), "the only other one is ejected");
        assert!(p.any_up_except(&[b]));
        // Endpoint 1: marked down by the checker. Nothing is up.
        p.set_health(&[(a, false)]);
        assert!(!p.any_up());
        // Endpoint 2's ejection runs out: it is back in rotation (`pick`
        // tries it) but not up until something shows it works. A probe
        // claims it once; a failed probe ejects it again for twice as long.
        let later = now + Duration::from_secs(11);
        p.set_health(&[(a, true)]);
        assert!(p.any_up(), "endpoint 1 is up again");
        p.set_health(&[(a, false)]);
        assert!(!p.any_up() && e2.lapsed(later));
        let claimed = p.claim_probes(later);
        assert_eq!(claimed.len(), 1);
        assert!(p.claim_probes(later).is_empty(), "one probe at a time");
        assert_eq!(
            e2.probe_failed(later, p.fail_timeout()),
            Duration::from_secs(20)
        );
        assert!(e2.ejected(later + Duration::from_secs(19)));
        // Still ejected: probed again a second later, and a failure there
        // does not extend the ejection.
        let next = later + PROBE_EVERY;
        assert!(p
            .claim_probes(later + Duration::from_millis(500))
            .is_empty());
        assert_eq!(p.claim_probes(next).len(), 1);
        assert_eq!(
            e2.probe_failed(next, p.fail_timeout()),
            Duration::from_secs(19)
        );
        // A probe that connects ends the ejection at once.
        let much_later = next + PROBE_EVERY;
        assert_eq!(p.claim_probes(much_later).len(), 1);
        e2.probe_passed();
        assert!(p.any_up() && !e2.lapsed(much_later));
    }

    #[test]
    fn a_refusal_passes_an_endpoint_over_without_counting_a_failure() {
        let p = pool(&[ep(1, 1), ep(2, 1)], Balance::RoundRobin);
        let now = Instant::now();
        let e1 = p.endpoints()[0].clone();
        for _ in 0..10 {
            e1.pass_over(now, Duration::from_secs(1));
        }
        assert!(e1.ejected(now) && !e1.ejected(now + Duration::from_secs(1)));
        // No failure was counted: the next real failure is the first of
        // three, and its ejection is the first (not doubled).
        let later = now + Duration::from_secs(2);
        assert_eq!(p.on_failure(&e1, later), Failed::Counted);
        p.on_failure(&e1, later);
        assert_eq!(
            p.on_failure(&e1, later),
            Failed::Ejected(Duration::from_secs(10))
        );
        // Passing over never shortens an ejection.
        e1.pass_over(later, Duration::from_secs(1));
        assert!(e1.ejected(later + Duration::from_secs(9)));
    }

    #[test]
    fn round_robin_gives_each_endpoint_exactly_its_weight() {
        let p = pool(&[ep(1, 3), ep(2, 1)], Balance::RoundRobin);
        let now = Instant::now();
        let mut counts = [0; 2];
        for i in 1..=400 {
            let lease = p.pick(None, &[], now).unwrap();
            counts[(lease.endpoint().addr.port() - 1) as usize] += 1;
            // Exact after every full cycle, within one in between.
            if i % 4 == 0 {
                assert_eq!(counts, [3 * i / 4, i / 4]);
            }
        }
    }

    #[test]
    fn least_connections_and_random_two_prefer_the_idle_endpoint() {
        for balance in [Balance::LeastConnections, Balance::RandomTwo] {
            let p = pool(&[ep(1, 1), ep(2, 1)], balance);
            let now = Instant::now();
            let held: Vec<Lease> = (0..5)
                .map(|_| {
                    p.pick(None, &[SocketAddr::from(([127, 0, 0, 1], 2))], now)
                        .unwrap()
                })
                .collect();
            assert!(held.iter().all(|l| l.endpoint().addr.port() == 1));
            let next = p.pick(None, &[], now).unwrap();
            assert_eq!(next.endpoint().addr.port(), 2, "{balance:?}");
            drop(held);
            assert_eq!(p.endpoints()[0].active(), 0);
        }
    }

    #[test]
    fn source_hash_is_stable_and_spreads_clients() {
        let eps: Vec<Endpoint> = (1..=4).map(|p| ep(p, 1)).collect();
        let (a, b) = (
            pool(&eps, Balance::SourceHash),
            pool(&eps, Balance::SourceHash),
        );
        let now = Instant::now();
        let mut used = std::collections::HashSet::new();
        for i in 0..200u32 {
            let ip = IpAddr::from([10, 0, (i >> 8) as u8, i as u8]);
            let first = a.pick(Some(ip), &[], now).unwrap().endpoint().addr;
            for _ in 0..3 {
                assert_eq!(a.pick(Some(ip), &[], now).unwrap().endpoint().addr, first);
            }
            // Another shard (another pool) agrees.
            assert_eq!(b.pick(Some(ip), &[], now).unwrap().endpoint().addr, first);
            used.insert(first);
        }
        assert_eq!(used.len(), 4);
    }

    #[test]
    fn failures_eject_with_a_doubling_backoff_and_a_success_resets() {
        let p = pool(&[ep(1, 1), ep(2, 1)], Balance::RoundRobin);
        let t = Instant::now();
        let e = p.endpoints()[0].clone();
        assert_eq!(p.on_failure(&e, t), Failed::Counted);
        assert_eq!(p.on_failure(&e, t), Failed::Counted);
        assert_eq!(
            p.on_failure(&e, t),
            Failed::Ejected(Duration::from_secs(10))
        );
        assert!(e.ejected(t + Duration::from_secs(9)));
        // While ejected it is skipped.
        for _ in 0..4 {
            assert_eq!(p.pick(None, &[], t).unwrap().endpoint().addr.port(), 2);
        }
        let later = t + Duration::from_secs(11);
        assert!(!e.ejected(later));
        for _ in 0..3 {
            p.on_failure(&e, later);
        }
        assert!(e.ejected(later + Duration::from_secs(19)));
        p.on_success(&e);
        for _ in 0..3 {
            p.on_failure(&e, later);
        }
        assert!(!e.ejected(later + Duration::from_secs(11)));
    }

    #[test]
    fn when_everything_is_down_an_untried_endpoint_is_still_tried() {
        let p = pool(&[ep(1, 1), ep(2, 1)], Balance::RandomTwo);
        let now = Instant::now();
        p.set_health(&[(ep(1, 1).addr, false), (ep(2, 1).addr, false)]);
        let first = p.pick(None, &[], now).unwrap().endpoint().addr;
        let second = p.pick(None, &[first], now).unwrap().endpoint().addr;
        assert_ne!(first, second);
        // Both tried: no third attempt on either.
        assert!(p.pick(None, &[first, second], now).is_none());
    }

    #[test]
    fn random_two_draws_its_candidates_by_weight() {
        // Uniform draws gave the weight-1000 endpoint 2/3 of the picks
        // among three (the pairs without it).
        let p = pool(&[ep(1, 1), ep(2, 1), ep(3, 1000)], Balance::RandomTwo);
        let now = Instant::now();
        let heavy = (0..3000)
            .filter(|_| p.pick(None, &[], now).unwrap().endpoint().addr.port() == 3)
            .count();
        assert!(heavy > 2950, "{heavy}");
        // Equal weights still spread evenly.
        let p = pool(&[ep(1, 1), ep(2, 1), ep(3, 1)], Balance::RandomTwo);
        let mut n = [0usize; 3];
        for _ in 0..3000 {
            let lease = p.pick(None, &[], now).unwrap();
            n[usize::from(lease.endpoint().addr.port()) - 1] += 1;
        }
        assert!(n.iter().all(|&k| k > 800), "{n:?}");
    }

    #[test]
    fn source_hash_gives_every_endpoint_clients_even_with_equal_address_xor_port() {
        // 5 ^ 51140 == 6 ^ 51143: the second endpoint got no client.
        let eps = [
            Endpoint {
                addr: SocketAddr::from(([127, 0, 0, 5], 51140)),
                weight: 1,
                spec: 0,
            },
            Endpoint {
                addr: SocketAddr::from(([127, 0, 0, 6], 51143)),
                weight: 1,
                spec: 0,
            },
            Endpoint {
                addr: SocketAddr::from(([127, 0, 0, 3], 51012)),
                weight: 1,
                spec: 0,
            },
        ];
        let p = pool(&eps, Balance::SourceHash);
        let now = Instant::now();
        let mut used = std::collections::HashMap::new();
        for i in 0..384u32 {
            let ip = IpAddr::from([127, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
            *used
                .entry(p.pick(Some(ip), &[], now).unwrap().endpoint().addr)
                .or_insert(0) += 1;
        }
        assert_eq!(used.len(), 3, "{used:?}");
        assert!(used.values().all(|&k| k > 60), "{used:?}");
    }

    #[test]
    fn weights_count_for_the_load_aware_balancers_even_when_idle() {
        for balance in [Balance::LeastConnections, Balance::RandomTwo] {
            let p = pool(&[ep(1, 1), ep(2, 1000)], balance);
            let now = Instant::now();
            let heavy = (0..300)
                .filter(|_| p.pick(None, &[], now).unwrap().endpoint().addr.port() == 2)
                .count();
            assert_eq!(heavy, 300, "{balance:?}");
        }
    }

    #[test]
    fn failures_already_under_way_do_not_stack_ejections_and_a_success_ends_one() {
        let p = Pool::new(
            &[ep(1, 1), ep(2, 1)],
            Balance::RoundRobin,
            1,
            Duration::from_secs(1),
            7,
        );
        let t = Instant::now();
        let e = p.endpoints()[0].clone();
        assert_eq!(p.on_failure(&e, t), Failed::Ejected(Duration::from_secs(1)));
        // Twenty more attempts that were in flight fail: still 1 s.
        for _ in 0..20 {
            assert_eq!(p.on_failure(&e, t), Failed::Counted);
        }
        assert!(!e.ejected(t + Duration::from_millis(1001)));
        p.on_failure(&e, t + Duration::from_secs(2));
        assert!(e.ejected(t + Duration::from_secs(3)));
        p.on_success(&e);
        assert!(!e.ejected(t + Duration::from_secs(2)));
    }

    #[test]
    fn an_endpoint_whose_checks_pass_again_is_used_at_once() {
        let p = pool(&[ep(1, 1), ep(2, 1)], Balance::RoundRobin);
        let t = Instant::now();
        let e = p.endpoints()[0].clone();
        for _ in 0..3 {
            p.on_failure(&e, t);
        }
        p.set_health(&[(e.addr, false)]);
        assert!(e.ejected(t));
        p.set_health(&[(e.addr, true)]);
        assert!(!e.ejected(t) && e.healthy());
    }

    #[test]
    fn a_new_endpoint_set_keeps_the_state_of_endpoints_that_stay() {
        let p = pool(&[ep(1, 1), ep(2, 1)], Balance::RoundRobin);
        let now = Instant::now();
        let held = p
            .pick(None, &[SocketAddr::from(([127, 0, 0, 1], 2))], now)
            .unwrap();
        p.replace(&[ep(1, 1), ep(3, 1)]);
        let ports: Vec<u16> = p.endpoints().iter().map(|e| e.addr.port()).collect();
        assert_eq!(ports, [1, 3]);
        assert_eq!(p.endpoints()[0].active(), 1);
        drop(held);
        assert_eq!(p.endpoints()[0].active(), 0);
    }
}
