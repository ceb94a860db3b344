//! Cross-shard control by message, and signals as events.
//!
//! As in libevent, a signal handler does nothing but note the signal
//! (signal-hook's self-pipe); a plain thread turns each one into a
//! [`Message`] and writes it to every shard's socketpair: `D` (drain, one
//! byte), `H` (drain after a hand-over), `K` with the reloaded keys, or `S`
//! with a successor's share of the inherited replay set. Each shard reads its end as an
//! ordinary async socket on its own loop. No lock and nothing on the data
//! path is shared; the one atomic is the metrics board's "draining" flag,
//! set once by this thread and read by scrapes.

use std::io::Write;
use std::os::unix::net::UnixStream;

use futures_lite::AsyncReadExt;
use zeroize::Zeroizing;

use crate::proto::keys::{MAX_KEYS, PSK_LEN};
use crate::proto::{KeySet, Psk};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook::iterator::Signals;

use crate::error::StartupError;
use crate::metrics::Board;

/// A message to a shard.
#[derive(Debug)]
pub enum Message {
    /// Every shard can serve and the listeners listen: start accepting
    /// (sent once, after the start; see `app::run`).
    Accept,
    /// Stop accepting, let connections finish, then stop.
    Drain,
    /// A successor took the listeners: drain, and send the replay set
    /// toward it (exit; see [`crate::replay`]).
    HandOver,
    /// Use these keys for new connections (SIGHUP reload).
    Keys(KeySet),
    /// News from the upstream manager (DNS, health checks).
    Upstream(crate::upstream::manager::Update),
    /// A successor's share of its predecessor's replay set: refuse hellos
    /// stamped before `not_before` (Unix milliseconds), remember `salts`,
    /// and start answering replay checks.
    Salts {
        /// The oldest hello timestamp accepted.
        not_before: u64,
        /// The inherited salts this shard owns.
        salts: Vec<crate::replay::Remembered>,
    },
}

/// An address on the socketpair: 16 bytes of IP (IPv4 mapped), the port
/// (u16 LE), 4 or 6.
fn put_addr(out: &mut Vec<u8>, a: std::net::SocketAddr) {
    let (ip, family) = match a.ip() {
        std::net::IpAddr::V4(v4) => (v4.to_ipv6_mapped(), 4u8),
        std::net::IpAddr::V6(v6) => (v6, 6u8),
    };
    out.extend_from_slice(&ip.octets());
    out.extend_from_slice(&a.port().to_le_bytes());
    out.push(family);
}

const ADDR_WIRE: usize = 19;

fn get_addr(b: &[u8]) -> Option<std::net::SocketAddr> {
    let ip = std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&b[..16]).ok()?);
    let port = u16::from_le_bytes([b[16], b[17]]);
    let ip = match b[18] {
        4 => std::net::IpAddr::V4(ip.to_ipv4_mapped()?),
        6 => std::net::IpAddr::V6(ip),
        _ => return None,
    };
    Some(std::net::SocketAddr::new(ip, port))
}

impl Message {
    /// Wire form on the socketpair: `D`; `H`; `K`, a count, then 32 bytes per
    /// key; or `S`, `not_before` (u64 LE), a count (u32 LE), then 20 bytes
    /// per salt.
    fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::new());
        match self {
            Message::Accept => out.push(b'L'),
            Message::Drain => out.push(b'D'),
            Message::HandOver => out.push(b'H'),
            Message::Upstream(crate::upstream::manager::Update::Endpoints(eps)) => {
                out.push(b'E');
                out.extend_from_slice(&(eps.len() as u32).to_le_bytes());
                for e in eps {
                    put_addr(&mut out, e.addr);
                    out.extend_from_slice(&e.weight.to_le_bytes());
                    out.extend_from_slice(&(e.spec as u32).to_le_bytes());
                }
            }
            Message::Upstream(crate::upstream::manager::Update::Health(h)) => {
                out.push(b'A');
                out.extend_from_slice(&(h.len() as u32).to_le_bytes());
                for (a, up) in h {
                    put_addr(&mut out, *a);
                    out.push(u8::from(*up));
                }
            }
            Message::Salts { not_before, salts } => {
                out.push(b'S');
                out.extend_from_slice(&not_before.to_le_bytes());
                out.extend_from_slice(&(salts.len() as u32).to_le_bytes());
                crate::replay::put_remembered(&mut out, salts);
            }
            Message::Keys(set) => {
                out.push(b'K');
                out.push(set.all().len() as u8);
                for k in set.all() {
                    out.extend_from_slice(k.bytes());
                }
            }
        }
        out
    }
}

/// The control plane's ends of every shard's socketpair.
pub struct Controller {
    shards: Vec<UnixStream>,
}

impl Controller {
    /// Creates `n` socketpairs; returns the controller and the shard ends.
    pub fn new(n: usize) -> std::io::Result<(Controller, Vec<UnixStream>)> {
        let mut ours = Vec::with_capacity(n);
        let mut theirs = Vec::with_capacity(n);
        for _ in 0..n {
            let (a, b) = UnixStream::pair()?;
            ours.push(a);
            theirs.push(b);
        }
        Ok((Controller { shards: ours }, theirs))
    }

    /// Sends `cmd` to every shard. A shard that already exited is skipped.
    pub fn broadcast(&mut self, cmd: Message) {
        let bytes = cmd.encode();
        for s in &mut self.shards {
            let _ = s.write_all(&bytes);
        }
    }

    /// Sends `cmd` to shards `ids` (those that exist).
    pub fn send_to(&mut self, ids: std::ops::Range<usize>, cmd: Message) {
        let bytes = cmd.encode();
        for s in self.shards.iter_mut().take(ids.end).skip(ids.start) {
            let _ = s.write_all(&bytes);
        }
    }

    /// Sends `msgs[i]` to shard `i`.
    pub fn send_each(&mut self, msgs: Vec<Message>) {
        for (s, msg) in self.shards.iter_mut().zip(msgs) {
            let _ = s.write_all(&msg.encode());
        }
    }
}

/// The process's signal handling, installed before anything else a proxy
/// does (`main` calls [`SignalPlane::install`] before it parses the config,
/// resolves names or binds), so that no signal ever meets the default
/// disposition. As in libevent, a handler only notes the signal
/// (signal-hook's self-pipe); one plain thread acts on it:
///
/// | signal | while starting | once shards run |
/// |---|---|---|
/// | SIGTERM, SIGINT | exit 0 at once: nothing is accepted yet | first: drain (after `--drain-delay`); second: reset every connection (RST) and exit 1. After a hand-over (already draining) the first one lets the drain go on. A successor that gets it before it told its predecessor `READY` does not take over: the predecessor is told its start failed, and serves on |
/// | SIGHUP | remembered, applied once started | re-read the key file (ignored while draining) |
/// | SIGUSR2 | logged, ignored | re-execute the binary with `--takeover` (needs a control socket: `--control-socket`, or the one inherited with `--takeover`): the new process takes the listeners, this one drains |
/// | SIGUSR1 | reopen the access log | reopen the access log (after logrotate renamed it) |
///
/// SIGURG is the relay's own: the kernel sends it to a shard's thread when
/// urgent data reaches a socket the shard relays (`sys::watch_urgent`,
/// `engine`); one sent by hand only makes a shard read its sockets with
/// `TCP_INQ` from then on.
///
/// `main` blocks every signal this sets a handler for until the handlers
/// are in place, then unblocks them whatever mask it inherited
/// ([`held_at_start`]).
///
/// SIGPIPE is ignored by the Rust runtime, and the signals in [`IGNORED`]
/// explicitly; SIGQUIT (core dump) and the synchronous faults keep their
/// default actions. Readiness and state changes are also reported to systemd
/// (`sd_notify`, `Type=notify`): `READY=1`, `RELOADING=1`, `STOPPING=1`,
/// `MAINPID=` (the predecessor of a hand-over names its successor, and does
/// not send `STOPPING=1`: the service is not stopping).
pub struct SignalPlane {
    state: Arc<Mutex<Phase>>,
}

/// Signals a proxy handles as events (see [`SignalPlane::install`]).
pub const HANDLED: [i32; 5] = [SIGINT, SIGTERM, SIGHUP, SIGUSR1, SIGUSR2];

/// Every signal [`SignalPlane::install`] sets a handler for: `main` blocks
/// them first thing and a proxy unblocks them once its handlers are in
/// place ([`crate::sys::block_signals`]), so that one sent in the first
/// moments of the process waits for its handler instead of meeting the
/// default action (SIGTERM would end the process, killed by a signal), and
/// so that one its parent blocked (a mask survives fork and exec) is not
/// blocked for ever.
pub fn held_at_start() -> Vec<i32> {
    HANDLED.iter().chain(IGNORED.iter()).copied().collect()
}

/// Signals ignored on purpose (see [`SignalPlane::install`]).
pub const IGNORED: [i32; 8] = [
    signal_hook::consts::SIGALRM,
    signal_hook::consts::SIGVTALRM,
    signal_hook::consts::SIGPROF,
    signal_hook::consts::SIGIO,
    libc::SIGPWR,
    signal_hook::consts::SIGXFSZ,
    signal_hook::consts::SIGTTIN,
    signal_hook::consts::SIGTTOU,
];

enum Phase {
    Starting { reload_pending: bool },
    // Boxed: a running process's state is large, a starting one's a bool.
    Running(Box<Running>),
}

/// How SIGUSR2 re-executes the binary.
#[derive(Debug, Clone)]
pub struct Upgrade {
    /// The executable as it was at start-up (`/proc/self/exe` then): a new
    /// version installed at the same path is what gets started.
    pub exe: std::path::PathBuf,
    /// The command line after the program name, without `--takeover`.
    pub args: Vec<std::ffi::OsString>,
    /// The control socket the new process takes the listeners from.
    pub control_socket: std::path::PathBuf,
}

/// What the signal thread needs once the shards run.
pub struct Started {
    /// The shards' control sockets.
    pub controller: Controller,
    /// The key file to re-read on SIGHUP (entry and exit).
    pub key_file: Option<String>,
    /// The metrics board, if metrics are on.
    pub board: Option<Board>,
    /// How SIGUSR2 upgrades, if `--control-socket` is set.
    pub upgrade: Option<Upgrade>,
    /// `--drain-delay`.
    pub drain_delay: std::time::Duration,
    /// `--drain-timeout`: sets `stop::exit_wait`'s deadline when the
    /// drain starts.
    pub drain_timeout: std::time::Duration,
    /// The listeners' duplicates offered to a successor; emptied when
    /// draining starts, so that they do not keep the sockets open (and the
    /// control-socket thread stops offering them).
    pub offer: crate::handover::SharedOffer,
    /// The keys the upstream manager's tunnel health checks use: replaced
    /// on SIGHUP together with the shards' (entry).
    pub probe_keys: Option<Arc<Mutex<KeySet>>>,
}

struct Running {
    s: Started,
    draining: bool,
    /// A termination signal arrived: the next one exits at once. A drain
    /// that a hand-over started does not count as one, so the first
    /// SIGTERM after it (`systemctl stop` signals every process of the
    /// unit, the draining predecessor too) lets the drain go on.
    signalled: bool,
    /// A SIGUSR2 successor that has not said it is ready yet. A stop
    /// before the hand-over completes stops it too: stop wins over an
    /// upgrade in flight, which would otherwise leave the successor serving
    /// after the process that was told to stop has gone.
    upgrading: Option<Box<InFlight>>,
}

/// A SIGUSR2 successor that has not said it is ready yet.
struct InFlight {
    /// Its PID.
    pid: u32,
    /// Set by its reaper thread once it has exited (its PID may be reused
    /// after that).
    reaped: Arc<std::sync::atomic::AtomicBool>,
    /// Set when it says it is ready (its reaper then knows whether an exit
    /// was a failed upgrade).
    ready: Arc<std::sync::atomic::AtomicBool>,
}

impl SignalPlane {
    /// Registers the handlers and starts the signal thread.
    pub fn install() -> Result<SignalPlane, StartupError> {
        let mut signals = Signals::new(HANDLED).map_err(StartupError::Signals)?;
        // Signals whose default action would end or stop the process but
        // that mean nothing to a proxy are ignored explicitly (a handler
        // that only sets an unread flag): a stray `kill -ALRM`, a file-size
        // limit (writes fail with EFBIG instead), a background write to a
        // terminal. SIGQUIT keeps its core dump, for debugging.
        let ignored = Arc::new(std::sync::atomic::AtomicBool::new(false));
        for sig in IGNORED {
            signal_hook::flag::register(sig, ignored.clone()).map_err(StartupError::Signals)?;
        }
        let state = Arc::new(Mutex::new(Phase::Starting {
            reload_pending: false,
        }));
        let shared = state.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    let Ok(mut phase) = shared.lock() else {
                        return;
                    };
                    on_signal(&mut phase, sig, &shared);
                }
            })
            .map_err(StartupError::Signals)?;
        Ok(SignalPlane { state })
    }

    /// Start-up is over: from now on signals act on the shards through
    /// `started.controller`. A SIGHUP that arrived while starting is
    /// applied now.
    pub fn started(&self, started: Started) {
        let Ok(mut phase) = self.state.lock() else {
            return;
        };
        let reload = matches!(
            *phase,
            Phase::Starting {
                reload_pending: true
            }
        );
        *phase = Phase::Running(Box::new(Running {
            s: started,
            draining: false,
            signalled: false,
            upgrading: None,
        }));
        if reload {
            crate::info!("applying the SIGHUP received during start-up");
            on_signal(&mut phase, SIGHUP, &self.state);
        }
    }

    /// A successor (process `pid`) accepts on our listeners: tell systemd it
    /// is the main process now, and drain at once (no `--drain-delay`: new
    /// connections already go to the successor).
    pub fn handed_over(&self, pid: u32) {
        let Ok(mut phase) = self.state.lock() else {
            return;
        };
        if let Phase::Running(r) = &mut *phase {
            // The successor is the service now: a stop of ours is not its.
            if let Some(up) = r.upgrading.take() {
                up.ready.store(true, Ordering::SeqCst);
            }
            notify(&[sd_notify::NotifyState::MainPid(pid)]);
            if let Some(b) = &r.s.board {
                b.info.handed_over.store(true, Ordering::SeqCst);
            }
            if !r.draining {
                // No STOPPING=1 here: with NotifyAccess=all systemd would
                // take it for the whole service stopping, and kill the
                // successor after TimeoutStopSec.
                r.start_drain(&format!("handed over to process {pid}"), false);
                r.s.controller.broadcast(Message::HandOver);
            }
        }
    }

    /// The predecessor gave up on this process's hand-over: this process
    /// drains at once (no `--drain-delay`: it is not the service), and
    /// tells systemd nothing (it never said it was the main process, and
    /// the service is not stopping: no `STOPPING=1`).
    pub fn give_back(&self, why: &str) {
        self.drain_at_once(why, false);
    }

    /// A shard failed to start: the others stop as on SIGTERM (at once,
    /// without `--drain-delay`), so that the process exits with the
    /// failure rather than serve on part of its cores.
    pub fn abort_start(&self, why: &str) {
        self.drain_at_once(why, true);
    }

    /// Starts a drain now, without `--drain-delay`, unless one runs; tells
    /// systemd `STOPPING=1` if `stopping`.
    fn drain_at_once(&self, why: &str, stopping: bool) {
        let Ok(mut phase) = self.state.lock() else {
            return;
        };
        if let Phase::Running(r) = &mut *phase {
            if !r.draining {
                r.start_drain(why, stopping);
                r.drain_now();
            }
        }
    }

    /// Sends `msg` to every shard (the upstream manager's news). Nothing is
    /// sent once the process drains.
    pub fn broadcast(&self, msg: Message) {
        let Ok(mut phase) = self.state.lock() else {
            return;
        };
        if let Phase::Running(r) = &mut *phase {
            if !r.draining {
                r.s.controller.broadcast(msg);
            }
        }
    }

    /// Sends `msgs[i]` to shard `i` (a successor's inherited replay set).
    /// Nothing is sent once the process drains.
    pub fn send_each(&self, msgs: Vec<Message>) {
        let Ok(mut phase) = self.state.lock() else {
            return;
        };
        if let Phase::Running(r) = &mut *phase {
            if !r.draining {
                r.s.controller.send_each(msgs);
            }
        }
    }

    /// Runs `f` unless the process drains (a termination signal, or a
    /// failed start), with signal handling held off until it returns: what
    /// `f` does (a successor's `READY` to its predecessor) either happens
    /// before a stop is handled, or not at all. `f` must be quick: a
    /// second termination signal waits for it.
    pub fn unless_draining<T>(&self, f: impl FnOnce() -> T) -> Option<T> {
        let Ok(phase) = self.state.lock() else {
            return None;
        };
        match &*phase {
            Phase::Running(r) if r.draining => None,
            _ => Some(f()),
        }
    }

    /// Start-up's last step, unless the process already drains: runs
    /// `listen` (the listeners start listening) and, if it succeeds, tells
    /// the `shards` to accept (`Message::Accept`; a successor's extra
    /// shards are told once its predecessor took its READY), with signal handling
    /// held off meanwhile, so that a stop either comes before and nothing
    /// listens (a socket that listened would take connections the
    /// stopping shards never accept, reset at exit; found by a break-it
    /// round), or after, and drains shards that accept. `None` when
    /// draining.
    pub fn start_accepting<E>(
        &self,
        listen: impl FnOnce() -> Result<(), E>,
        shards: std::ops::Range<usize>,
    ) -> Option<Result<(), E>> {
        let Ok(mut phase) = self.state.lock() else {
            return None;
        };
        match &mut *phase {
            Phase::Running(r) if r.draining => None,
            Phase::Running(r) => {
                let done = listen();
                if done.is_ok() {
                    r.s.controller.send_to(shards, Message::Accept);
                }
                Some(done)
            }
            Phase::Starting { .. } => Some(listen()),
        }
    }

    /// A handle for threads that must reach the plane later (the
    /// control-socket thread).
    pub fn handle(&self) -> SignalPlane {
        SignalPlane {
            state: self.state.clone(),
        }
    }
}

/// Sends states to systemd if it supervises us (`NOTIFY_SOCKET`); a no-op
/// otherwise. Failures are logged, never fatal.
pub fn notify(states: &[sd_notify::NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none_or(|v| v.is_empty()) {
        return;
    }
    if let Err(e) = sd_notify::notify(false, states) {
        crate::warn!("sd_notify: {e}");
    }
}

fn on_signal(phase: &mut Phase, sig: i32, shared: &Arc<Mutex<Phase>>) {
    match phase {
        Phase::Starting { reload_pending } => match sig {
            SIGHUP => {
                crate::info!("SIGHUP during start-up: will reload once started");
                *reload_pending = true;
            }
            SIGUSR1 => reopen_access_log(),
            SIGUSR2 => ignored(sig, "during start-up"),
            _ => {
                // No shard runs yet and nothing was accepted: a clean exit.
                crate::info!("termination signal during start-up: exiting");
                crate::log::flush();
                std::process::exit(0);
            }
        },
        Phase::Running(r) => match sig {
            // Draining shards no longer read their control socket: a
            // reload now could fill it and block this thread, and with it
            // the second signal.
            SIGHUP if r.draining => crate::info!("SIGHUP while draining: keys are not reloaded"),
            SIGHUP => {
                notify(&[sd_notify::NotifyState::Reloading]);
                r.reload();
                notify(&[sd_notify::NotifyState::Ready]);
            }
            SIGUSR2 if r.draining => ignored(sig, "while draining"),
            SIGUSR2 => r.upgrade(),
            SIGUSR1 => reopen_access_log(),
            _ if r.draining && !r.signalled => {
                r.signalled = true;
                crate::info!(
                    "termination signal while draining after the hand-over: the drain goes on (a second one exits at once)"
                );
            }
            _ if r.draining => {
                let n = crate::sys::abandon_connections();
                crate::warn!(
                    "second termination signal: exiting now, {n} TCP connection(s) reset (RST, not FIN; a client and its upstream are two)"
                );
                crate::log::flush();
                std::process::exit(1);
            }
            _ => {
                r.signalled = true;
                if let Some(up) = r.upgrading.take() {
                    let pid = up.pid;
                    // Unreaped, the PID is still that child's (a PID is
                    // reused only after its process has been reaped).
                    if !up.reaped.load(Ordering::SeqCst) {
                        crate::sys::terminate(pid);
                        crate::info!(
                            "termination signal during the upgrade: process {pid}, not ready yet, told to stop too"
                        );
                    }
                }
                r.start_drain("termination signal", true);
                let delay = r.s.drain_delay;
                if delay.is_zero() {
                    r.drain_now();
                } else {
                    crate::info!(
                        "drain delay: /healthz answers 503 for {delay:?} while the listeners still accept"
                    );
                    let shared = shared.clone();
                    let spawned = std::thread::Builder::new()
                        .name("drain-delay".into())
                        .spawn(move || {
                            std::thread::sleep(delay);
                            if let Ok(mut phase) = shared.lock() {
                                if let Phase::Running(r) = &mut *phase {
                                    r.drain_now();
                                }
                            }
                        });
                    if spawned.is_err() {
                        r.drain_now();
                    }
                }
            }
        },
    }
}

fn ignored(sig: i32, when: &str) {
    let name = if sig == SIGUSR1 { "SIGUSR1" } else { "SIGUSR2" };
    crate::info!("{name}: ignored {when} ({name} upgrades by re-executing the binary)");
}

/// SIGUSR1: every access-log writer reopens its path (a no-op without
/// `--access-log`).
fn reopen_access_log() {
    if crate::access_log::reopen() {
        crate::info!("SIGUSR1: reopening the access log");
    } else {
        crate::info!("SIGUSR1: no access log to reopen (--access-log is not set)");
    }
}

impl Running {
    /// Marks the process as draining: `/healthz` says 503, systemd hears
    /// `STOPPING=1`, no more hand-overs are offered. The shards keep
    /// accepting until [`Running::drain_now`].
    fn start_drain(&mut self, why: &str, tell_systemd: bool) {
        crate::info!("{why}: draining (a second termination signal exits at once)");
        self.draining = true;
        if let Ok(mut offer) = self.s.offer.lock() {
            *offer = None;
        }
        if tell_systemd {
            notify(&[sd_notify::NotifyState::Stopping]);
        }
        if let Some(b) = &self.s.board {
            b.info.draining.store(true, Ordering::Relaxed);
        }
    }

    /// Tells every shard to stop accepting and finish its connections.
    fn drain_now(&mut self) {
        crate::stop::drain_started(self.s.drain_timeout);
        self.s.controller.broadcast(Message::Drain);
    }

    /// SIGHUP: re-reads the key file once, here, and sends the keys to
    /// every shard. A file that fails to parse is logged and the shards keep
    /// their keys.
    fn reload(&mut self) {
        let Some(path) = &self.s.key_file else {
            crate::info!("SIGHUP: nothing to reload in this role");
            return;
        };
        match crate::config::load_key_file(path) {
            Ok((keys, warning)) => {
                if let Some(w) = warning {
                    crate::warn!("{w}");
                }
                // The board first: whoever reads the log line and then
                // scrapes sees the new keys.
                if let Some(b) = &self.s.board {
                    b.set_keys(keys.fingerprints());
                }
                crate::info!("SIGHUP: reloaded {} from {path}", keys.describe());
                if let Some(slot) = &self.s.probe_keys {
                    if let Ok(mut k) = slot.lock() {
                        *k = keys.clone();
                    }
                }
                self.s.controller.broadcast(Message::Keys(keys));
            }
            Err(e) => crate::error!("SIGHUP: {e}; keeping the current keys"),
        }
    }

    /// SIGUSR2: starts the binary again with `--takeover`. The new process
    /// takes the listeners over the control socket; this one drains when it
    /// says it is ready (`SignalPlane::handed_over`). If it fails, this one
    /// keeps serving and logs why.
    fn upgrade(&mut self) {
        let Some(up) = &self.s.upgrade else {
            crate::warn!("SIGUSR2: cannot upgrade without --control-socket; ignored");
            return;
        };
        let spawned = std::process::Command::new(&up.exe)
            .args(&up.args)
            .arg("--takeover")
            .arg(&up.control_socket)
            .stdin(std::process::Stdio::null())
            .spawn();
        match spawned {
            Ok(mut child) => {
                let pid = child.id();
                crate::info!(
                    "SIGUSR2: started {} as process {pid} to take the listeners over",
                    up.exe.display()
                );
                let reaped = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
                self.upgrading = Some(Box::new(InFlight {
                    pid,
                    reaped: reaped.clone(),
                    ready: ready.clone(),
                }));
                // Reap it; say so if it ends (a failed start) while we live.
                // The child goes to the thread once it runs: a thread that
                // cannot be made leaves it here, to be stopped.
                let (hand, take) = std::sync::mpsc::channel::<std::process::Child>();
                let watched = std::thread::Builder::new()
                    .name("upgrade-child".into())
                    .spawn(move || {
                        let Ok(mut child) = take.recv() else {
                            return;
                        };
                        let status = child.wait();
                        reaped.store(true, Ordering::SeqCst);
                        match status {
                            // Whatever its exit status, an exit before it
                            // said it was ready is a failed upgrade.
                            Ok(status) if !ready.load(Ordering::SeqCst) => crate::warn!(
                                "upgrade: process {pid} exited ({status}) before taking the listeners over: the upgrade failed"
                            ),
                            Ok(status) if status.success() => {
                                crate::info!("upgrade: process {pid} exited ({status})")
                            }
                            Ok(status) => {
                                crate::warn!("upgrade: process {pid} exited ({status})")
                            }
                            Err(_) => {}
                        }
                    });
                match watched {
                    Ok(_) => {
                        let _ = hand.send(child);
                    }
                    // No thread to reap it (the thread limit: the
                    // successor's own threads count too): it would end a
                    // zombie nobody reports, holding a slot of that limit.
                    // Stop it now, before it can take anything over.
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        self.upgrading = None;
                        crate::error!(
                            "SIGUSR2: no thread to watch process {pid} (the thread limit?); stopped it: the upgrade failed, still serving"
                        );
                    }
                }
            }
            Err(e) => crate::error!(
                "SIGUSR2: cannot start {}: {e}; still serving",
                up.exe.display()
            ),
        }
    }
}

/// Waits for the next message on a shard's end. EOF (the control plane is
/// gone) or anything malformed means drain: a shard never runs unsupervised.
pub async fn recv(stream: &mut glommio::net::UnixStream) -> Message {
    let mut tag = [0u8; 1];
    if stream.read_exact(&mut tag).await.is_err() {
        return Message::Drain;
    }
    let got = match tag[0] {
        b'H' => Some(Message::HandOver),
        b'L' => Some(Message::Accept),
        b'K' => recv_keys(stream).await,
        b'S' => recv_salts(stream).await,
        b'E' | b'A' => recv_upstream(stream, tag[0]).await,
        _ => None,
    };
    got.unwrap_or(Message::Drain)
}

async fn recv_keys(stream: &mut glommio::net::UnixStream) -> Option<Message> {
    let mut count = [0u8; 1];
    stream.read_exact(&mut count).await.ok()?;
    let n = count[0] as usize;
    if n == 0 || n > MAX_KEYS {
        return None;
    }
    let mut keys = Vec::with_capacity(n);
    let mut raw = Zeroizing::new([0u8; PSK_LEN]);
    for _ in 0..n {
        stream.read_exact(&mut raw[..]).await.ok()?;
        keys.push(Psk::from_bytes(*raw));
    }
    Some(Message::Keys(KeySet::new(keys)))
}

async fn recv_upstream(stream: &mut glommio::net::UnixStream, tag: u8) -> Option<Message> {
    use crate::upstream::manager::Update;
    let mut count = [0u8; 4];
    stream.read_exact(&mut count).await.ok()?;
    let n = u32::from_le_bytes(count) as usize;
    if n > crate::upstream::MAX_ENDPOINTS {
        return None;
    }
    let each = if tag == b'E' {
        ADDR_WIRE + 8
    } else {
        ADDR_WIRE + 1
    };
    let mut raw = vec![0u8; n * each];
    stream.read_exact(&mut raw).await.ok()?;
    let update = if tag == b'E' {
        let mut eps = Vec::with_capacity(n);
        for c in raw.chunks_exact(each) {
            eps.push(crate::upstream::Endpoint {
                addr: get_addr(c)?,
                weight: u32::from_le_bytes(c[ADDR_WIRE..ADDR_WIRE + 4].try_into().ok()?),
                spec: u32::from_le_bytes(c[ADDR_WIRE + 4..].try_into().ok()?) as usize,
            });
        }
        Update::Endpoints(eps)
    } else {
        let mut h = Vec::with_capacity(n);
        for c in raw.chunks_exact(each) {
            h.push((get_addr(c)?, c[ADDR_WIRE] == 1));
        }
        Update::Health(h)
    };
    Some(Message::Upstream(update))
}

async fn recv_salts(stream: &mut glommio::net::UnixStream) -> Option<Message> {
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.ok()?;
    let not_before = u64::from_le_bytes(head[..8].try_into().ok()?);
    let n = u32::from_le_bytes(head[8..].try_into().ok()?) as usize;
    // Our own control plane sends this; bound it all the same.
    if n > crate::replay::MAX_SALTS_PER_SHARD * crate::handover::MAX_LISTENERS {
        return None;
    }
    // One read for the whole payload, not one per salt.
    let mut raw = vec![0u8; n * crate::replay::REMEMBERED_WIRE];
    stream.read_exact(&mut raw).await.ok()?;
    let salts = crate::replay::get_remembered(&raw);
    Some(Message::Salts { not_before, salts })
}
