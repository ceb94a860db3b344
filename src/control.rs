//! Cross-shard control by message, and signals as events.
//!
//! As in libevent, a signal handler does nothing but note the signal
//! (signal-hook's self-pipe); a plain thread turns each one into a
//! [`Command`] and writes it, one byte, to every shard's socketpair. Each
//! shard reads its end as an ordinary async socket on its own loop. Nothing
//! is shared: no locks, no atomics, only messages.

use std::io::Write;
use std::os::unix::net::UnixStream;

use futures_lite::AsyncReadExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::error::StartupError;

/// A message to a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Stop accepting, let connections finish, then stop.
    Drain,
    /// Reload key material (SIGHUP).
    Reload,
}

impl Command {
    fn to_byte(self) -> u8 {
        match self {
            Command::Drain => b'D',
            Command::Reload => b'R',
        }
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
    pub fn broadcast(&mut self, cmd: Command) {
        for s in &mut self.shards {
            let _ = s.write_all(&[cmd.to_byte()]);
        }
    }

    /// Spawns the signal thread: first SIGINT/SIGTERM drains, a second one
    /// exits at once, SIGHUP reloads.
    pub fn handle_signals(mut self) -> Result<(), StartupError> {
        let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(StartupError::Signals)?;
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut draining = false;
                for sig in signals.forever() {
                    match sig {
                        SIGHUP => {
                            crate::info!("SIGHUP: reloading");
                            self.broadcast(Command::Reload);
                        }
                        _ if draining => {
                            crate::warn!("second termination signal: exiting now");
                            std::process::exit(1);
                        }
                        _ => {
                            crate::info!(
                                "termination signal: draining (send again to exit at once)"
                            );
                            draining = true;
                            self.broadcast(Command::Drain);
                        }
                    }
                }
            })
            .map_err(StartupError::Signals)?;
        Ok(())
    }
}

/// Waits for the next command on a shard's end. EOF (the control plane is
/// gone) or an unknown byte means drain: a shard never runs unsupervised.
pub async fn recv(stream: &mut glommio::net::UnixStream) -> Command {
    let mut byte = [0u8; 1];
    match stream.read(&mut byte).await {
        Ok(1) if byte[0] == b'R' => Command::Reload,
        _ => Command::Drain,
    }
}
