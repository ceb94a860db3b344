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
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
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

    /// Spawns the signal thread: first SIGINT/SIGTERM drains, a second one
    /// exits at once, SIGHUP reloads `key_file` (if any). The file is parsed
    /// once, here; a file that fails to parse is logged and the shards keep
    /// their keys.
    pub fn handle_signals(
        mut self,
        key_file: Option<String>,
        board: Option<Board>,
    ) -> Result<(), StartupError> {
        let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(StartupError::Signals)?;
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut draining = false;
                for sig in signals.forever() {
                    match sig {
                        // Draining shards no longer read their control
                        // socket: a reload now could fill it and block this
                        // thread, and with it the second signal.
                        SIGHUP if draining => {
                            crate::info!("SIGHUP while draining: keys are not reloaded")
                        }
                        SIGHUP => match &key_file {
                            None => crate::info!("SIGHUP: nothing to reload in this role"),
                            Some(path) => match crate::config::load_key_file(path) {
                                Ok((keys, warning)) => {
                                    if let Some(w) = warning {
                                        crate::warn!("{w}");
                                    }
                                    crate::info!(
                                        "SIGHUP: reloaded {} from {path}",
                                        keys.describe()
                                    );
                                    if let Some(b) = &board {
                                        b.set_keys(keys.fingerprints());
                                    }
                                    self.broadcast(Message::Keys(keys));
                                }
                                Err(e) => crate::error!("SIGHUP: {e}; keeping the current keys"),
                            },
                        },
                        _ if draining => {
                            crate::warn!("second termination signal: exiting now");
                            std::process::exit(1);
                        }
                        _ => {
                            crate::info!(
                                "termination signal: draining (send again to exit at once)"
                            );
                            draining = true;
                            if let Some(b) = &board {
                                b.info
                                    .draining
                                    .store(true, std::sync::atomic::Ordering::Relaxed);
                            }
                            self.broadcast(Message::Drain);
                        }
                    }
                }
            })
            .map_err(StartupError::Signals)?;
        Ok(())
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
