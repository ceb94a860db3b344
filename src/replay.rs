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
//! The set lives in memory, so a process that starts (or takes the
//! listeners over from another) does not know the salts its predecessor
//! saw. It therefore refuses every hello stamped before its own start
//! (Unix milliseconds): a hello recorded before a restart can only be
//! replayed after it if the entry's clock ran ahead of the exit's, and only
//! by that much. The cost: for its first seconds a new process refuses
//! entries whose clocks are behind its own by as much (keep clocks in sync).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use glommio::channels::channel_mesh::{MeshBuilder, Receivers, Senders};
use glommio::channels::local_channel::{self, LocalSender};

/// Added to the window: the wall and monotonic clocks drift apart slightly.
pub const WINDOW_MARGIN: Duration = Duration::from_secs(2);

/// Most salts one shard remembers.
pub const MAX_SALTS_PER_SHARD: usize = 1 << 18;

/// The bytes of a salt that identify it (128 bits of a random salt).
type Key = u128;

fn key(salt: &[u8; 32]) -> Key {
    let mut k = [0u8; 16];
    k.copy_from_slice(&salt[..16]);
    u128::from_le_bytes(k)
}

/// The shard that owns `salt`, of `shards`.
pub fn owner(salt: &[u8; 32], shards: usize) -> usize {
    let mut b = [0u8; 8];
    b.copy_from_slice(&salt[16..24]);
    (u64::from_le_bytes(b) % shards.max(1) as u64) as usize
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

/// One shard's end: its part of the set, and its channels to the others.
pub struct Guard {
    /// Hellos stamped before this (Unix milliseconds) are refused: this process
    /// cannot know the salts accepted before it started (see the module
    /// docs).
    not_before: u64,
    shard: usize,
    shards: usize,
    set: RefCell<SaltSet>,
    senders: Senders<Message>,
    next_id: Cell<u64>,
    pending: RefCell<HashMap<u64, LocalSender<Verdict>>>,
}

impl Guard {
    /// Joins the mesh (waits for every shard) and starts serving the other
    /// shards' questions. `window` is twice `--max-clock-skew`.
    pub async fn join(
        mesh: Mesh,
        shards: usize,
        window: Duration,
        not_before: u64,
    ) -> Result<Rc<Guard>, ()> {
        let (senders, mut receivers) = mesh.join().await.map_err(|_| ())?;
        let shard = senders.peer_id();
        let guard = Rc::new(Guard {
            not_before,
            shard,
            shards: shards.max(1),
            set: RefCell::new(SaltSet::new(window, MAX_SALTS_PER_SHARD)),
            senders,
            next_id: Cell::new(0),
            pending: RefCell::new(HashMap::new()),
        });
        serve(&guard, &mut receivers);
        Ok(guard)
    }

    /// Whether the hello with `salt`, stamped `unix_ms`, is new, asking
    /// the salt's owner shard if that is not us. A hello stamped before this
    /// process started counts as replayed. Never fails open: a lost peer
    /// counts as a full set.
    pub async fn check(&self, salt: [u8; 32], unix_ms: u64) -> Verdict {
        if unix_ms < self.not_before {
            return Verdict::Replayed;
        }
        let owner = owner(&salt, self.shards);
        if owner == self.shard {
            return self.set.borrow_mut().check(&salt, Instant::now());
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
        verdict
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
                        let verdict = guard.set.borrow_mut().check(&salt, Instant::now());
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
    fn owners_spread_over_the_shards() {
        let mut counts = [0usize; 4];
        for n in 0..=255u8 {
            let mut s = [n; 32];
            s[17] = n.wrapping_mul(31);
            counts[owner(&s, 4)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 30), "{counts:?}");
    }
}
