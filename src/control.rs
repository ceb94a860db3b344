//! Cross-shard control by message, and signals as events.
//!
//! As in libevent, a signal handler does nothing but note the signal
//! (signal-hook's self-pipe); a plain thread turns each one into a
//! [`Message`] and writes it to every shard's socketpair: `D` (drain, one
//! byte) or `K` with the reloaded keys. Each shard reads its end as an
//! ordinary async socket on its own loop. No lock and nothing on the data
//! path is shared; the one atomic is the metrics board's "draining" flag,
//! set once by this thread and read by scrapes.

use std::io::Write;
use std::os::unix::net::UnixStream;

use futures_lite::AsyncReadExt;
use zeroize::Zeroizing;

use crate::proto::keys::{MAX_KEYS, PSK_LEN};
use crate::proto::{KeySet, Psk};
use std::sync::{Arc, Mutex};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook::iterator::Signals;

use crate::error::StartupError;
use crate::metrics::Board;

/// A message to a shard.
#[derive(Debug)]
pub enum Message {
    /// Stop accepting, let connections finish, then stop.
    Drain,
    /// Use these keys for new connections (SIGHUP reload).
    Keys(KeySet),
}

impl Message {
    /// Wire form on the socketpair: `D`, or `K`, a count, then 32 bytes per key.
    fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::new());
        match self {
            Message::Drain => out.push(b'D'),
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
}

/// The process's signal handling, installed before anything else a proxy
/// does (`main` calls [`SignalPlane::install`] before it parses the config,
/// resolves names or binds), so that no signal ever meets the default
/// disposition. As in libevent, a handler only notes the signal
/// (signal-hook's self-pipe); one plain thread acts on it:
///
/// | signal | while starting | once shards run |
/// |---|---|---|
/// | SIGTERM, SIGINT | exit 0 at once: nothing is accepted yet | first: drain; second: reset every connection (RST) and exit 1 |
/// | SIGHUP | remembered, applied once started | re-read the key file (ignored while draining) |
/// | SIGUSR1 | logged, ignored | logged, ignored (reserved: reopen the access log) |
/// | SIGUSR2 | logged, ignored | logged, ignored (reserved: binary upgrade) |
///
/// SIGPIPE is ignored by the Rust runtime; every other signal keeps its
/// default action.
pub struct SignalPlane {
    state: Arc<Mutex<Phase>>,
}

enum Phase {
    Starting { reload_pending: bool },
    Running(Running),
}

struct Running {
    controller: Controller,
    key_file: Option<String>,
    board: Option<Board>,
    draining: bool,
}

impl SignalPlane {
    /// Registers the handlers and starts the signal thread.
    pub fn install() -> Result<SignalPlane, StartupError> {
        let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP, SIGUSR1, SIGUSR2])
            .map_err(StartupError::Signals)?;
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
                    on_signal(&mut phase, sig);
                }
            })
            .map_err(StartupError::Signals)?;
        Ok(SignalPlane { state })
    }

    /// Start-up is over: from now on signals act on the shards through
    /// `controller`. A SIGHUP that arrived while starting is applied now.
    pub fn started(&self, controller: Controller, key_file: Option<String>, board: Option<Board>) {
        let Ok(mut phase) = self.state.lock() else {
            return;
        };
        let reload = matches!(
            *phase,
            Phase::Starting {
                reload_pending: true
            }
        );
        *phase = Phase::Running(Running {
            controller,
            key_file,
            board,
            draining: false,
        });
        if reload {
            crate::info!("applying the SIGHUP received during start-up");
            on_signal(&mut phase, SIGHUP);
        }
    }
}

fn on_signal(phase: &mut Phase, sig: i32) {
    match phase {
        Phase::Starting { reload_pending } => match sig {
            SIGHUP => {
                crate::info!("SIGHUP during start-up: will reload once started");
                *reload_pending = true;
            }
            SIGUSR1 | SIGUSR2 => ignored(sig),
            _ => {
                // No shard runs yet and nothing was accepted: a clean exit.
                crate::info!("termination signal during start-up: exiting");
                std::process::exit(0);
            }
        },
        Phase::Running(r) => match sig {
            // Draining shards no longer read their control socket: a
            // reload now could fill it and block this thread, and with it
            // the second signal.
            SIGHUP if r.draining => crate::info!("SIGHUP while draining: keys are not reloaded"),
            SIGHUP => r.reload(),
            SIGUSR1 | SIGUSR2 => ignored(sig),
            _ if r.draining => {
                let n = crate::sys::abandon_connections();
                crate::warn!(
                    "second termination signal: exiting now, {n} socket(s) reset (RST, not FIN)"
                );
                std::process::exit(1);
            }
            _ => {
                crate::info!("termination signal: draining (send again to exit at once)");
                r.draining = true;
                if let Some(b) = &r.board {
                    b.info
                        .draining
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
                r.controller.broadcast(Message::Drain);
            }
        },
    }
}

fn ignored(sig: i32) {
    let (name, reserved) = if sig == SIGUSR1 {
        ("SIGUSR1", "reopening the access log")
    } else {
        ("SIGUSR2", "a binary upgrade")
    };
    crate::info!("{name}: ignored (reserved for {reserved}, not in this version)");
}

impl Running {
    /// SIGHUP: re-reads the key file once, here, and sends the keys to
    /// every shard. A file that fails to parse is logged and the shards keep
    /// their keys.
    fn reload(&mut self) {
        let Some(path) = &self.key_file else {
            crate::info!("SIGHUP: nothing to reload in this role");
            return;
        };
        match crate::config::load_key_file(path) {
            Ok((keys, warning)) => {
                if let Some(w) = warning {
                    crate::warn!("{w}");
                }
                crate::info!("SIGHUP: reloaded {} from {path}", keys.describe());
                if let Some(b) = &self.board {
                    b.set_keys(keys.fingerprints());
                }
                self.controller.broadcast(Message::Keys(keys));
            }
            Err(e) => crate::error!("SIGHUP: {e}; keeping the current keys"),
        }
    }
}

/// Waits for the next message on a shard's end. EOF (the control plane is
/// gone) or anything malformed means drain: a shard never runs unsupervised.
pub async fn recv(stream: &mut glommio::net::UnixStream) -> Message {
    let mut head = [0u8; 2];
    if stream.read_exact(&mut head[..1]).await.is_err() || head[0] != b'K' {
        return Message::Drain;
    }
    if stream.read_exact(&mut head[1..]).await.is_err() {
        return Message::Drain;
    }
    let n = head[1] as usize;
    if n == 0 || n > MAX_KEYS {
        return Message::Drain;
    }
    let mut keys = Vec::with_capacity(n);
    let mut raw = Zeroizing::new([0u8; PSK_LEN]);
    for _ in 0..n {
        if stream.read_exact(&mut raw[..]).await.is_err() {
            return Message::Drain;
        }
        keys.push(Psk::from_bytes(*raw));
    }
    Message::Keys(KeySet::new(keys))
}
