//! Replay protection for the exit: a recorded client hello, replayed to any
//! shard any number of times within the acceptance window, gets what garbage
//! gets (no byte back, no origin connection).
//!
//! The state is an exact set of recently accepted client salts, split over
//! the shards with nothing shared: each salt has an *owner* shard (its first
//! eight bytes, as a number, modulo the shard count; the salt is uniformly
//! random, so the split is even). A shard that verifies a hello asks the
//! salt's owner, by message over a glommio channel mesh, whether the salt is
//! new; the owner records it and answers. A per-shard filter alone would not
//! do: `SO_REUSEPORT` hashes the replayer's new connection to any shard.
//!
//! A salt is remembered for twice `--max-clock-skew`, plus a margin of
//! [`WINDOW_MARGIN`], after it was first seen: its hello's timestamp was
//! within the skew of our clock then, so no later copy can pass the
//! timestamp check once that time has passed. (The margin covers the
//! timestamp check running on the wall clock and this window on the
//! monotonic clock; a wall clock stepped back by more than the margin
//! reopens the window by the step.)
//! Memory is bounded: at most [`MAX_SALTS_PER_SHARD`] salts per shard (about
//! 48 bytes each, 12 MiB per shard at the bound), which covers a sustained
//! 4,369 hellos per second per shard at the default 30 s skew. At the bound
//! the filter fails closed: a hello whose salt cannot be recorded is
//! refused like a replay, and counted.
//!
//! The set lives in memory. A freshly started process does not know the
//! salts any earlier process saw, so it refuses every hello stamped before
//! its own start (Unix milliseconds): a hello recorded before a restart can
//! only be replayed after it if the entry's clock ran ahead of the exit's,
//! and only by that much. The cost: for its first seconds a new process
//! refuses entries whose clocks are behind its own by as much (keep clocks
//! in sync).
//!
//! A listener hand-over (`--takeover`, SIGUSR2) carries the set instead,
//! because hellos stamped before the successor started may already wait in
//! the shared accept queues:
//!
//! 1. The successor's shards start *gated*: a check waits (within its
//!    handshake deadline) until the inherited set is in place.
//! 2. Once the successor accepts, the predecessor's shards stop accepting,
//!    wait (at most [`EXPORT_WAIT`]) for their pending handshakes, then
//!    [`Guard::export`] their sets and *seal*: no later check of theirs
//!    returns [`Verdict::Fresh`]. A salt an owner records after its export
//!    (asked by a shard that has not exported yet) follows as a delta.
//! 3. The predecessor sends every salt, with its remaining lifetime, over
//!    the control socket ([`crate::handover`]); the successor's shards
//!    [`Guard::inherit`] their share (by owner) and open the gate.
//!
//! So for every salt exactly one process decides, and the successor decides
//! only knowing every salt the predecessor accepted. If the set does not
//! arrive complete (the predecessor died, or a shard did not export in
//! time), the successor falls back to refusing hellos stamped before its own
//! start: it fails closed.
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use glommio::channels::channel_mesh::{MeshBuilder, Receivers, Senders};
use glommio::channels::local_channel::{self, LocalSender};

use crate::trigger::Trigger;

/// Added to the window: the wall and monotonic clocks drift apart slightly.
pub const WINDOW_MARGIN: Duration = Duration::from_secs(2);

/// Most salts one shard remembers.
pub const MAX_SALTS_PER_SHARD: usize = 1 << 18;

/// How long a predecessor's shard waits, after it stopped accepting, for
/// its pending handshakes to pass their replay check before it exports its
/// set and seals (later checks of its handshakes fail closed).
pub const EXPORT_WAIT: Duration = Duration::from_secs(2);

/// The bytes of a salt that identify it: its first 16 bytes, little-endian
/// (128 bits of a random salt). This is also what a hand-over carries.
pub type Key = u128;

/// The key of `salt`.
pub fn key(salt: &[u8; 32]) -> Key {
    let mut k = [0u8; 16];
    k.copy_from_slice(&salt[..16]);
    u128::from_le_bytes(k)
}

/// The shard that owns the salt with key `k`, of `shards`: the salt's first
/// eight bytes (little-endian) modulo the shard count.
pub fn owner(k: Key, shards: usize) -> usize {
    ((k as u64) % shards.max(1) as u64) as usize
}

/// A salt remembered, with what is left of its window in milliseconds:
/// the unit a hand-over carries (monotonic instants do not cross
/// processes).
pub type Remembered = (Key, u32);

/// Bytes of one [`Remembered`] on the wire (a hand-over's `SALTS`, a
/// shard's control socket): the 16-byte key, then the remaining lifetime
/// in milliseconds, both little-endian.
pub const REMEMBERED_WIRE: usize = 20;

/// Appends `salts` in their wire form ([`REMEMBERED_WIRE`] bytes each).
pub fn put_remembered(out: &mut Vec<u8>, salts: &[Remembered]) {
    out.reserve(REMEMBERED_WIRE * salts.len());
    for (k, ms) in salts {
        out.extend_from_slice(&k.to_le_bytes());
        out.extend_from_slice(&ms.to_le_bytes());
    }
}

/// Reads salts in their wire form; a trailing partial entry is ignored.
pub fn get_remembered(raw: &[u8]) -> Vec<Remembered> {
    raw.chunks_exact(REMEMBERED_WIRE)
        .map(|c| {
            let mut k = [0u8; 16];
            k.copy_from_slice(&c[..16]);
            let mut ms = [0u8; 4];
            ms.copy_from_slice(&c[16..]);
            (u128::from_le_bytes(k), u32::from_le_bytes(ms))
        })
        .collect()
}

/// What a predecessor's shard sends toward the control socket during a
/// hand-over.
#[derive(Debug)]
pub enum Export {
    /// Its whole set, once it has sealed.
    Set {
        /// The shard.
        shard: usize,
        /// Every salt it remembers.
        salts: Vec<Remembered>,
    },
    /// A salt it recorded, as owner, after it exported its set.
    Delta(Remembered),
}

/// What the set said about a salt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// First time seen: recorded.
    Fresh,
    /// Seen before within the window: a replay.
    Replayed,
    /// The set is full: refused (fail closed).
    Full,
}

/// The exact set of one shard's salts, sans I/O: insertion order is expiry
/// order (every entry lives for the same window), so expired entries are
/// dropped from the front.
pub struct SaltSet {
    window: Duration,
    cap: usize,
    seen: HashMap<Key, Instant>,
    order: VecDeque<(Instant, Key)>,
}

impl SaltSet {
    /// A set that remembers each salt for `window`, at most `cap` at once.
    pub fn new(window: Duration, cap: usize) -> SaltSet {
        SaltSet {
            window,
            cap,
            seen: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Records `salt` as seen at `now`, unless it was seen within the window.
    pub fn check(&mut self, salt: &[u8; 32], now: Instant) -> Verdict {
        while let Some(&(expires, k)) = self.order.front() {
            if expires > now {
                break;
            }
            self.order.pop_front();
            if self.seen.get(&k) == Some(&expires) {
                self.seen.remove(&k);
            }
        }
        let k = key(salt);
        if self.seen.contains_key(&k) {
            return Verdict::Replayed;
        }
        if self.seen.len() >= self.cap {
            return Verdict::Full;
        }
        let expires = now + self.window;
        self.seen.insert(k, expires);
        self.order.push_back((expires, k));
        Verdict::Fresh
    }

    /// Every salt remembered at `now`, oldest first, with its remaining
    /// lifetime.
    pub fn entries(&self, now: Instant) -> Vec<Remembered> {
        self.order
            .iter()
            .filter(|(expires, k)| *expires > now && self.seen.get(k) == Some(expires))
            .map(|(expires, k)| (*k, remaining_ms(*expires, now)))
            .collect()
    }

    /// Remembers salts a predecessor accepted, each for its remaining
    /// lifetime. Must run before any [`SaltSet::check`] (insertion order is
    /// expiry order). Returns false if they did not all fit.
    pub fn inherit(&mut self, mut salts: Vec<Remembered>, now: Instant) -> bool {
        salts.sort_unstable_by_key(|&(_, ms)| ms);
        let mut all = true;
        for (k, ms) in salts {
            if ms == 0 || self.seen.contains_key(&k) {
                continue;
            }
            if self.seen.len() >= self.cap {
                all = false;
                break;
            }
            let expires = now + Duration::from_millis(u64::from(ms));
            self.seen.insert(k, expires);
            self.order.push_back((expires, k));
        }
        all
    }

    /// Salts currently remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether no salt is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// A message between shards.
#[derive(Debug)]
pub enum Message {
    /// "Is this salt new?" from shard `from`, request `id`.
    Check {
        /// The asking shard.
        from: usize,
        /// Its request number.
        id: u64,
        /// The client salt.
        salt: [u8; 32],
    },
    /// The owner's answer to request `id`.
    Answer {
        /// The request number.
        id: u64,
        /// What the owner's set said.
        verdict: Verdict,
    },
}

/// The mesh every shard of an exit joins (created once, cloned per shard).
pub type Mesh = MeshBuilder<Message, glommio::channels::channel_mesh::Full>;

/// Creates the mesh for `shards` shards.
pub fn mesh(shards: usize) -> Mesh {
    MeshBuilder::full(shards, 1024)
}

fn remaining_ms(expires: Instant, now: Instant) -> u32 {
    u32::try_from(expires.saturating_duration_since(now).as_millis()).unwrap_or(u32::MAX)
}

/// One shard's end: its part of the set, and its channels to the others.
pub struct Guard {
    /// Hellos stamped before this (Unix milliseconds) are refused: this
    /// process cannot know the salts accepted before it started (see the
    /// module docs). Set again when an inherited set arrives.
    not_before: Cell<u64>,
    shard: usize,
    shards: usize,
    set: RefCell<SaltSet>,
    senders: Senders<Message>,
    next_id: Cell<u64>,
    pending: RefCell<HashMap<u64, LocalSender<Verdict>>>,
    /// Fired once checks may be answered: at once on a fresh start, after
    /// [`Guard::inherit`] on a successor.
    open: Trigger,
    /// After [`Guard::export`]: where salts this shard records as owner go.
    export: RefCell<Option<std::sync::mpsc::Sender<Export>>>,
    /// After [`Guard::export`]: this shard's own checks fail closed.
    sealed: Cell<bool>,
}

impl Guard {
    /// Joins the mesh (waits for every shard) and starts serving the other
    /// shards' questions. `window` is twice `--max-clock-skew` plus the
    /// margin. A `gated` guard (a successor's) answers nothing until
    /// [`Guard::inherit`].
    pub async fn join(
        mesh: Mesh,
        shards: usize,
        window: Duration,
        not_before: u64,
        gated: bool,
    ) -> Result<Rc<Guard>, ()> {
        let (senders, mut receivers) = mesh.join().await.map_err(|_| ())?;
        let shard = senders.peer_id();
        let guard = Rc::new(Guard {
            not_before: Cell::new(not_before),
            shard,
            shards: shards.max(1),
            set: RefCell::new(SaltSet::new(window, MAX_SALTS_PER_SHARD)),
            senders,
            next_id: Cell::new(0),
            pending: RefCell::new(HashMap::new()),
            open: Trigger::new(),
            export: RefCell::new(None),
            sealed: Cell::new(false),
        });
        if !gated {
            guard.open.fire();
        }
        serve(&guard, &mut receivers);
        Ok(guard)
    }

    /// Whether the hello with `salt`, stamped `unix_ms`, is new, asking
    /// the salt's owner shard if that is not us. A hello stamped before this
    /// process started counts as replayed. Never fails open: a lost peer
    /// counts as a full set, and so does any check after [`Guard::export`].
    /// On a successor, waits until the inherited set is in place (the
    /// caller bounds the wait with its handshake deadline).
    pub async fn check(&self, salt: [u8; 32], unix_ms: u64) -> Verdict {
        self.open.wait().await;
        if unix_ms < self.not_before.get() {
            return Verdict::Replayed;
        }
        if self.sealed.get() {
            return Verdict::Full;
        }
        let owner = owner(key(&salt), self.shards);
        if owner == self.shard {
            return self.record(&salt);
        }
        let id = self.next_id.get();
        self.next_id.set(id.wrapping_add(1));
        let (tx, rx) = local_channel::new_bounded(1);
        self.pending.borrow_mut().insert(id, tx);
        let asked = self
            .senders
            .send_to(
                owner,
                Message::Check {
                    from: self.shard,
                    id,
                    salt,
                },
            )
            .await;
        let verdict = match asked {
            Ok(()) => rx.recv().await.unwrap_or(Verdict::Full),
            Err(_) => Verdict::Full,
        };
        self.pending.borrow_mut().remove(&id);
        // Sealed while we waited: the set we exported may not hold this
        // salt, so do not accept it here.
        if self.sealed.get() && verdict == Verdict::Fresh {
            return Verdict::Full;
        }
        verdict
    }

    /// Checks `salt` against this shard's own part of the set; a salt
    /// recorded after an export also goes to the exporter.
    fn record(&self, salt: &[u8; 32]) -> Verdict {
        let verdict = self.set.borrow_mut().check(salt, Instant::now());
        if verdict == Verdict::Fresh {
            if let Some(tx) = self.export.borrow().as_ref() {
                let window = self.set.borrow().window;
                let lifetime = u32::try_from(window.as_millis()).unwrap_or(u32::MAX);
                if tx.send(Export::Delta((key(salt), lifetime))).is_err() {
                    // Nobody takes it over any more: nothing to keep in sync.
                    self.export.borrow_mut().take();
                }
            }
        }
        verdict
    }

    /// Hand-over, predecessor side: sends this shard's whole set to `tx`
    /// and seals (see the module docs). Call once this shard no longer
    /// accepts and its pending handshakes are done (or [`EXPORT_WAIT`]
    /// passed).
    pub fn export(&self, tx: std::sync::mpsc::Sender<Export>) {
        self.sealed.set(true);
        let salts = self.set.borrow().entries(Instant::now());
        if tx
            .send(Export::Set {
                shard: self.shard,
                salts,
            })
            .is_ok()
        {
            *self.export.borrow_mut() = Some(tx);
        }
    }

    /// Hand-over, successor side: remembers `salts` (this shard's share of
    /// the predecessor's set), refuses hellos stamped before `not_before`
    /// (Unix milliseconds) and opens the gate. Returns false if the salts
    /// did not all fit; the caller then falls back to its own start.
    pub fn inherit(&self, not_before: u64, salts: Vec<Remembered>) -> bool {
        let fit = self.set.borrow_mut().inherit(salts, Instant::now());
        self.not_before.set(not_before);
        self.open.fire();
        fit
    }

    /// Whether checks are answered (the inherited set is in place).
    pub fn is_open(&self) -> bool {
        self.open.is_fired()
    }

    /// The shard count the owners are computed over.
    pub fn shards(&self) -> usize {
        self.shards
    }
}

/// One task per peer: answer its questions from our set, and deliver its
/// answers to our waiting sessions.
fn serve(guard: &Rc<Guard>, receivers: &mut Receivers<Message>) {
    for (_, stream) in receivers.streams() {
        let guard = guard.clone();
        glommio::spawn_local(async move {
            while let Some(msg) = stream.recv().await {
                match msg {
                    Message::Check { from, id, salt } => {
                        // A successor's owner answers only from the whole
                        // (inherited) set.
                        guard.open.wait().await;
                        let verdict = guard.record(&salt);
                        let _ = guard
                            .senders
                            .send_to(from, Message::Answer { id, verdict })
                            .await;
                    }
                    Message::Answer { id, verdict } => {
                        let waiting = guard.pending.borrow_mut().remove(&id);
                        if let Some(tx) = waiting {
                            let _ = tx.try_send(verdict);
                        }
                    }
                }
            }
        })
        .detach();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn salt(n: u8) -> [u8; 32] {
        let mut s = [0u8; 32];
        s[0] = n;
        s[20] = n;
        s
    }

    #[test]
    fn a_salt_is_fresh_once_within_the_window_and_again_after_it() {
        let mut set = SaltSet::new(Duration::from_secs(60), 10);
        let t = Instant::now();
        assert_eq!(set.check(&salt(1), t), Verdict::Fresh);
        assert_eq!(
            set.check(&salt(1), t + Duration::from_secs(59)),
            Verdict::Replayed
        );
        assert_eq!(
            set.check(&salt(2), t + Duration::from_secs(59)),
            Verdict::Fresh
        );
        // Past the window the first one is forgotten (its hello's timestamp
        // could no longer pass the skew check anyway).
        assert_eq!(
            set.check(&salt(1), t + Duration::from_secs(61)),
            Verdict::Fresh
        );
        assert_eq!(set.len(), 2);
    }

    #[test]
    fn a_full_set_fails_closed_until_entries_expire() {
        let mut set = SaltSet::new(Duration::from_secs(10), 3);
        let t = Instant::now();
        for n in 0..3 {
            assert_eq!(set.check(&salt(n), t), Verdict::Fresh);
        }
        assert_eq!(set.check(&salt(9), t), Verdict::Full);
        assert_eq!(set.check(&salt(0), t), Verdict::Replayed);
        assert_eq!(
            set.check(&salt(9), t + Duration::from_secs(11)),
            Verdict::Fresh
        );
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn an_exported_set_inherited_elsewhere_refuses_the_same_salts_for_what_is_left_of_their_window()
    {
        let t = Instant::now();
        let mut old = SaltSet::new(Duration::from_secs(60), 10);
        assert_eq!(old.check(&salt(1), t), Verdict::Fresh);
        assert_eq!(
            old.check(&salt(2), t + Duration::from_secs(30)),
            Verdict::Fresh
        );
        let exported = old.entries(t + Duration::from_secs(40));
        assert_eq!(
            exported,
            vec![(key(&salt(1)), 20_000), (key(&salt(2)), 50_000)]
        );
        // Another process, another clock: only the remaining lifetimes count.
        let u = Instant::now() + Duration::from_secs(1000);
        let mut new = SaltSet::new(Duration::from_secs(60), 10);
        assert!(new.inherit(exported, u));
        assert_eq!(new.check(&salt(1), u), Verdict::Replayed);
        assert_eq!(new.check(&salt(2), u), Verdict::Replayed);
        assert_eq!(new.check(&salt(3), u), Verdict::Fresh);
        // Each is forgotten when its own window ends, not a full window later.
        assert_eq!(
            new.check(&salt(1), u + Duration::from_secs(21)),
            Verdict::Fresh
        );
        assert_eq!(
            new.check(&salt(2), u + Duration::from_secs(21)),
            Verdict::Replayed
        );
    }

    #[test]
    fn an_inherited_set_beyond_the_bound_says_so() {
        let t = Instant::now();
        let mut set = SaltSet::new(Duration::from_secs(60), 2);
        let salts = (1..=3).map(|n| (key(&salt(n)), 1000)).collect();
        assert!(!set.inherit(salts, t));
        assert_eq!(set.len(), 2);
    }

    #[test]
    fn salts_cross_the_wire_unchanged() {
        let salts = vec![(key(&salt(1)), 5), (u128::MAX, u32::MAX)];
        let mut out = Vec::new();
        put_remembered(&mut out, &salts);
        assert_eq!(out.len(), 2 * REMEMBERED_WIRE);
        assert_eq!(get_remembered(&out), salts);
    }

    #[test]
    fn owners_spread_over_the_shards() {
        let mut counts = [0usize; 4];
        for n in 0..=255u8 {
            let mut s = [n; 32];
            s[1] = n.wrapping_mul(31);
            counts[owner(key(&s), 4)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 30), "{counts:?}");
    }
}
