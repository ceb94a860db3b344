//! Listener hand-over between two processes: how an upgrade, a config
//! change or a core-count change drops no connection.
//!
//! A running process (the *predecessor*) started with `--control-socket
//! PATH` listens on that Unix stream socket. A new process started with
//! `--takeover PATH` (the *successor*; a SIGUSR2 re-exec starts one) connects
//! and receives, with `SCM_RIGHTS` (unix(7)), duplicates of the
//! predecessor's listening sockets: every shard's `SO_REUSEPORT` listener,
//! the metrics listener and the control socket itself. The successor's
//! shards start accepting on those very sockets; only then does it say
//! `READY`, and only then does the predecessor drain, as on SIGTERM.
//!
//! Nothing is lost because the sockets are *shared*, not re-created: the
//! kernel's accept queue of each listener belongs to the socket, which stays
//! open as long as either process holds it. Connections queued while the
//! predecessor stops accepting are accepted by the successor. (Closing a
//! `SO_REUSEPORT` listener instead resets the connections queued on it,
//! unless `net.ipv4.tcp_migrate_req = 1`.) The predecessor's accept loops
//! stop by cancelling a readiness poll, never an in-flight accept (see the
//! patch in `vendor/glommio/PATCHED.md`).
//!
//! Protocol, one text line each way, then one message with the descriptors:
//!
//! ```text
//! successor   -> predecessor   TAKEOVER 2\n
//! predecessor -> successor     LISTENERS <pid> <role> <not_before> <proxy> <metrics 0|1> <control 0|1>\n  + fds
//! successor   -> predecessor   READY <pid>\n        (its shards accept)
//!                          or  FAILED <reason>\n    (its start failed; it exits)
//! predecessor -> successor     SALTS <count> <not_before> <complete 0|1>\n + count × 20 bytes
//! predecessor -> successor     DRAINING\n           (it stopped accepting)
//! ```
//!
//! The fds come in that order: `<proxy>` listeners, then the metrics
//! listener, then the control socket. If the successor goes away before
//! `READY`, the predecessor logs why (the successor's own reason, after
//! `FAILED`) and keeps serving. A predecessor that does not know `FAILED`
//! reads it as a successor that did not become ready.
//!
//! `SALTS` carries an exit's replay set (empty for other roles): each salt
//! as its 16-byte key and its remaining lifetime in milliseconds (u32 LE;
//! [`crate::replay::put_remembered`]);
//! `not_before` is the oldest hello timestamp (Unix ms) the predecessor
//! accepted; `complete` says whether every shard exported its set in time
//! (see [`crate::replay`]). A successor keeps the predecessor's
//! `not_before` only with a complete set, else it refuses hellos stamped
//! before its own start. Version 1 of the exchange (`TAKEOVER 1`, no
//! `SALTS`) is still served, and used when the running process is older.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sendfd::{RecvWithFd, SendWithFd};
use socket2::Socket;

use crate::error::StartupError;

/// Most proxy listeners one hand-over carries (one per shard).
pub const MAX_LISTENERS: usize = 200;
/// Deadline for each line of the exchange other than `READY`.
const LINE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the predecessor collects its shards' replay sets after `READY`.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(4);
/// Most salts one hand-over carries.
const MAX_SALTS: usize = crate::replay::MAX_SALTS_PER_SHARD * MAX_LISTENERS;

/// A predecessor's replay set, as the successor received it.
#[derive(Debug, Default)]
pub struct InheritedSalts {
    /// The oldest hello timestamp (Unix ms) the predecessor accepted.
    pub not_before: u64,
    /// Whether every shard of the predecessor exported its set in time.
    pub complete: bool,
    /// Every salt, with its remaining lifetime in milliseconds.
    pub salts: Vec<crate::replay::Remembered>,
}

/// Why a hand-over failed. One line each.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// Connecting to or talking on the control socket failed.
    #[error("control socket {path}: {source}")]
    Io {
        /// The control socket.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Nothing serves the control socket (no such file, or no process
    /// listening on it).
    #[error("nothing serves the control socket {path} ({source}); name the running process's --control-socket, or start without --takeover")]
    NotServed {
        /// The control socket.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The peer broke the protocol.
    #[error("control socket {path}: {reason}")]
    Protocol {
        /// The control socket.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// This process was told to stop during its start: it did not take
    /// over (the predecessor was told so, and serves on).
    #[error("told to stop during the start")]
    Stopped,
    /// The predecessor gave up on this process before it took its `READY`
    /// (it waited longer than its `--handover-timeout`, or the line never
    /// reached it): it serves on, and this process must not serve beside it.
    #[error("control socket {path}: the running process gave up on this one: {reason}")]
    Abandoned {
        /// The control socket.
        path: PathBuf,
        /// Its `ERROR` line, or why `READY` could not be sent.
        reason: String,
    },
}

/// What a successor received from its predecessor.
pub struct Inherited {
    /// The predecessor's shard listeners, in its shard order.
    pub proxy: Vec<Socket>,
    /// Its metrics listener, if it had one.
    pub metrics: Option<TcpListener>,
    /// The control socket itself, to offer the next successor.
    pub control: Option<UnixListener>,
    /// The predecessor's process ID.
    pub from_pid: u32,
    /// The oldest hello timestamp (Unix milliseconds) the predecessor accepts;
    /// the successor keeps it, so hellos already queued on the shared
    /// listeners are not refused (docs/PROTOCOL.md §7).
    pub not_before: u64,
    conn: BufReader<UnixStream>,
    path: PathBuf,
    /// The exchange's version: 1 (an older predecessor, no `SALTS`) or 2.
    version: u8,
}

impl Inherited {
    /// The address the inherited listeners are bound to.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.proxy
            .first()
            .and_then(|s| s.local_addr().ok())
            .and_then(|a| a.as_socket())
    }

    /// Tells the predecessor that this process now accepts on the sockets,
    /// receives its replay set, and waits until it confirms that it drains.
    /// A version 1 predecessor sends no set: the result is empty and not
    /// complete.
    ///
    /// `may` runs `READY`'s write and says whether it ran: it does not when
    /// this process was told to stop during its start (see
    /// `SignalPlane::unless_draining`), and then the predecessor is told
    /// this start failed instead (`FAILED`), and goes on serving; the
    /// result is [`HandoverError::Stopped`]. A predecessor that gave up
    /// waiting (`--handover-timeout`) answers `ERROR gave up: ...` where
    /// `SALTS` or `DRAINING` would come, or before it closed the exchange
    /// (then `READY`'s write fails, and the line is read after it):
    /// [`HandoverError::Abandoned`].
    pub fn confirm(
        mut self,
        may: impl FnOnce(&mut dyn FnMut() -> std::io::Result<()>) -> Option<std::io::Result<()>>,
    ) -> Result<InheritedSalts, HandoverError> {
        let path = self.path.clone();
        let io = |source| HandoverError::Io {
            path: path.clone(),
            source,
        };
        let bad = |reason: String| HandoverError::Protocol {
            path: path.clone(),
            reason,
        };
        let conn = &mut self.conn;
        let said = may(&mut || {
            if let Ok(mut slot) = TAKEOVER_IN_PROGRESS.lock() {
                slot.take();
            }
            writeln!(conn.get_mut(), "READY {}", std::process::id())
        });
        // The predecessor's `ERROR gave up: ...`, where a verdict line
        // comes: it gave up on this process.
        let gave_up = |line: &str| {
            line.strip_prefix("ERROR ")
                .map(|reason| HandoverError::Abandoned {
                    path: path.clone(),
                    reason: crate::log::one_line(reason).into_owned(),
                })
        };
        match said {
            None => {
                report_failure("it was told to stop (a termination signal) during its start");
                return Err(HandoverError::Stopped);
            }
            // The predecessor closed the exchange before READY arrived: it
            // never took it. Either it gave up on this process (its `ERROR
            // gave up` line waits in the receive queue: then this process
            // must not serve, whether the predecessor still runs or was
            // replaced or stopped since), or it exited without a verdict
            // (stopped during the hand-over, or killed): then this is an
            // I/O error, and the caller sees whether it is gone.
            Some(Err(e)) if peer_closed(&e) => {
                let _ = self.conn.get_ref().set_read_timeout(Some(LINE_TIMEOUT));
                let line = read_line_max(&mut self.conn, VERDICT_MAX).unwrap_or_default();
                return Err(gave_up(&line).unwrap_or_else(|| io(e)));
            }
            Some(r) => r.map_err(io)?,
        }
        let mut salts = InheritedSalts::default();
        if self.version >= 2 {
            // The predecessor first waits for its shards' sets.
            self.conn
                .get_ref()
                .set_read_timeout(Some(LINE_TIMEOUT + EXPORT_TIMEOUT))
                .map_err(io)?;
            let line = read_line_max(&mut self.conn, VERDICT_MAX).map_err(io)?;
            if let Some(e) = gave_up(&line) {
                return Err(e);
            }
            let fields: Vec<&str> = line.split(' ').collect();
            let parsed = match fields[..] {
                ["SALTS", count, not_before, complete] => count
                    .parse::<usize>()
                    .ok()
                    .filter(|&n| n <= MAX_SALTS)
                    .zip(not_before.parse::<u64>().ok())
                    .zip(match complete {
                        "0" => Some(false),
                        "1" => Some(true),
                        _ => None,
                    }),
                _ => None,
            };
            let Some(((count, not_before), complete)) = parsed else {
                return Err(bad(format!(
                    "expected SALTS, got `{}`",
                    crate::log::one_line(&line)
                )));
            };
            let mut raw = vec![0u8; count * crate::replay::REMEMBERED_WIRE];
            std::io::Read::read_exact(&mut self.conn, &mut raw).map_err(io)?;
            salts = InheritedSalts {
                not_before,
                complete,
                salts: crate::replay::get_remembered(&raw),
            };
        }
        let line = read_line_max(&mut self.conn, VERDICT_MAX).map_err(io)?;
        if let Some(e) = gave_up(&line) {
            return Err(e);
        }
        if line != "DRAINING" {
            return Err(HandoverError::Protocol {
                path,
                reason: format!("expected DRAINING, got `{}`", crate::log::one_line(&line)),
            });
        }
        Ok(salts)
    }
}

/// Reads one `\n`-terminated line of at most 128 bytes (without the `\n`)
/// from the connection's one buffer, so bytes that arrived after the line
/// (a peer that wrote two lines at once) stay for the next read.
fn read_line(conn: &mut BufReader<UnixStream>) -> std::io::Result<String> {
    read_line_max(conn, 128)
}

/// [`read_line`] of at most `max` bytes.
fn read_line_max(conn: &mut BufReader<UnixStream>, max: u64) -> std::io::Result<String> {
    let mut line = String::new();
    let n = std::io::Read::take(&mut *conn, max).read_line(&mut line)?;
    if n == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed by the peer",
        ));
    }
    if !line.ends_with('\n') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "line too long or unterminated",
        ));
    }
    Ok(line.trim_end().to_string())
}

/// Successor side: connects to `path` and receives the sockets. The
/// running process must have the same `role` (`forward`, `entry`, `exit`):
/// an exit's listeners carry tunnel clients, not plain ones. Speaks version
/// 2 of the exchange, and version 1 to a process that does not know 2.
pub fn take_over(path: &Path, role: &str) -> Result<Inherited, HandoverError> {
    match take_over_with(path, role, 2) {
        Err(HandoverError::Protocol { reason, .. })
            if reason == "the running process refused: unsupported request" =>
        {
            crate::warn!(
                "the running process speaks hand-over version 1: its replay set is not carried over, hellos stamped before this process started are refused"
            );
            take_over_with(path, role, 1)
        }
        other => other,
    }
}

fn take_over_with(path: &Path, role: &str, version: u8) -> Result<Inherited, HandoverError> {
    let io = |source| HandoverError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bad = |reason: String| HandoverError::Protocol {
        path: path.to_path_buf(),
        reason,
    };
    let stream = UnixStream::connect(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            HandoverError::NotServed {
                path: path.to_path_buf(),
                source,
            }
        }
        _ => io(source),
    })?;
    match crate::sys::peer_uid(stream.as_raw_fd()) {
        Some(uid) if trusted_peer(uid) => {}
        who => {
            return Err(bad(format!(
                "it is served by {}, neither this process's user nor root: not taking listeners from it",
                who.map_or("an unknown user".to_string(), |u| format!("user {u}"))
            )))
        }
    }
    stream.set_read_timeout(Some(LINE_TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(LINE_TIMEOUT)).map_err(io)?;
    // A predecessor that refuses at once (`ERROR busy`) may have replied
    // and closed before the request arrived: the write then fails with
    // EPIPE, but the reply waits in the receive queue and says why.
    let mut sent = match writeln!(&stream, "TAKEOVER {version}") {
        Err(e) if peer_closed(&e) => Some(e),
        other => {
            other.map_err(io)?;
            None
        }
    };
    let mut head = [0u8; 128];
    let mut raw: Vec<RawFd> = vec![-1; MAX_LISTENERS + 2];
    // A socket call with SO_RCVTIMEO is not restarted after a signal
    // handler runs, SA_RESTART or not (signal(7)): retry on EINTR.
    let (n, nfds) = loop {
        match stream.recv_with_fd(&mut head, &mut raw) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // SO_RCVTIMEO ran out (EAGAIN): say so, not "temporarily
            // unavailable".
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(bad(format!(
                    "no answer within {}s (a process that accepts on the socket but does not speak the hand-over)",
                    LINE_TIMEOUT.as_secs()
                )));
            }
            other => {
                // Nothing to read after a failed request: its error says
                // more.
                if matches!(other, Ok((0, _)) | Err(_)) {
                    if let Some(e) = sent.take() {
                        return Err(io(e));
                    }
                }
                break other.map_err(io)?;
            }
        }
    };
    // Own whatever arrived first, so that an error below closes it.
    let mut fds: Vec<OwnedFd> = crate::sys::own_received_fds(&raw[..nfds]);
    let text = std::str::from_utf8(&head[..n]).unwrap_or("");
    let Some(line) = text.strip_suffix('\n') else {
        return Err(bad(format!("bad reply `{}`", crate::log::one_line(text))));
    };
    if let Some(reason) = line.strip_prefix("ERROR ") {
        return Err(bad(format!("the running process refused: {reason}")));
    }
    let fields: Vec<&str> = line.split(' ').collect();
    let [word, pid, their_role, not_before, proxy, metrics, control] = fields[..] else {
        return Err(bad(format!("bad reply `{}`", crate::log::one_line(line))));
    };
    if their_role != role {
        return Err(bad(format!(
            "the running process is {}, this one {role}: their clients speak different protocols",
            crate::log::one_line(their_role)
        )));
    }
    let num = |s: &str| s.parse::<usize>().ok();
    let (Some(pid), Some(proxy), Some(metrics @ 0..=1), Some(control @ 0..=1)) =
        (num(pid), num(proxy), num(metrics), num(control))
    else {
        return Err(bad(format!("bad reply `{}`", crate::log::one_line(line))));
    };
    if word != "LISTENERS" || proxy == 0 || proxy > MAX_LISTENERS {
        return Err(bad(format!("bad reply `{}`", crate::log::one_line(line))));
    }
    if fds.len() != proxy + metrics + control {
        return Err(bad(format!(
            "announced {} sockets, received {}",
            proxy + metrics + control,
            fds.len()
        )));
    }
    let Ok(not_before) = not_before.parse::<u64>() else {
        return Err(bad(format!("bad reply `{}`", crate::log::one_line(line))));
    };
    let control_fd = (control == 1).then(|| fds.pop()).flatten();
    let metrics_fd = (metrics == 1).then(|| fds.pop()).flatten();
    let mut listeners = Vec::with_capacity(proxy);
    for fd in fds {
        let socket = Socket::from(TcpListener::from(fd));
        let listening = socket.r#type().ok() == Some(socket2::Type::STREAM)
            && socket
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .is_some()
            && socket.is_listener().unwrap_or(false);
        if !listening {
            return Err(bad("a received socket is not a listening TCP socket".into()));
        }
        listeners.push(socket);
    }
    // Until READY: a start-up that fails tells the predecessor why.
    if let (Ok(copy), Ok(mut slot)) = (stream.try_clone(), TAKEOVER_IN_PROGRESS.lock()) {
        *slot = Some(copy);
    }
    Ok(Inherited {
        proxy: listeners,
        metrics: metrics_fd.map(TcpListener::from),
        control: control_fd.map(UnixListener::from),
        from_pid: u32::try_from(pid).unwrap_or(0),
        not_before,
        conn: BufReader::new(stream),
        path: path.to_path_buf(),
        version,
    })
}

/// Whether a write failed because the peer closed its end (EPIPE, or
/// ECONNRESET with unread data): a reply it sent first may still wait in
/// this end's receive queue.
fn peer_closed(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
    )
}

/// The longest reason a `FAILED` line carries, in bytes.
const FAILED_MAX: usize = 1000;
/// Longest line a successor reads after its `READY`: `SALTS`, `DRAINING`,
/// or the predecessor's `ERROR gave up: <why>` (whose excerpt of a bad
/// line is cut to fit).
const VERDICT_MAX: u64 = 512;

/// This process's control connection to its predecessor while it takes
/// over and is not yet ready (a start-up thread's, not a shard's: no data
/// path touches it).
static TAKEOVER_IN_PROGRESS: std::sync::Mutex<Option<UnixStream>> = std::sync::Mutex::new(None);

/// Tells the predecessor, if this process is taking over and not yet
/// ready, why its start failed (`FAILED <reason>`): the predecessor logs
/// it with its "hand-over failed, still serving" line. Best effort.
pub fn report_failure(reason: &str) {
    let Ok(mut slot) = TAKEOVER_IN_PROGRESS.lock() else {
        return;
    };
    if let Some(stream) = slot.take() {
        let mut reason = crate::log::one_line(reason).into_owned();
        if reason.len() > FAILED_MAX {
            let mut cut = FAILED_MAX;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        let _ = writeln!(&stream, "FAILED {reason}");
    }
}

/// Set once a successor said `READY`: the control socket is then its.
static HANDED_OVER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Which file a path names: device, inode, and the inode's change time
/// (`st_ctime`, in nanoseconds since the epoch). The time is what tells a
/// file from a later one that reuses its inode number: a filesystem hands
/// a freed inode number to the next file it makes (ext4 did, at once, in a
/// break-it round: a draining process then removed the control socket of
/// the process started after it on the same path, which could never be
/// upgraded).
pub type FileId = (u64, u64, i128);

/// The file at `path` as a [`FileId`], if any.
pub fn file_id(path: &Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| {
        let ctime = i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec());
        (m.dev(), m.ino(), ctime)
    })
}

/// Removes the control socket file at `path` when this process exits,
/// unless a successor took the socket over (it serves it at the same path)
/// or the path is no longer the file `id` this process served (`file_id`
/// at start-up). Before, a stale file stayed after every stop (harmless:
/// the next start replaces it, but it looked like a live service).
///
/// Nor while a successor holds the sockets and has not said how its start
/// went (this process was stopped meanwhile): it serves the same socket
/// once it finds this process gone, and without the file it could never be
/// upgraded (found by a break-it round: a SIGTERM to the predecessor
/// during a successor's start). A successor that fails then leaves a stale
/// file, which the next start replaces.
pub fn remove_control(path: &Path, id: FileId) {
    if !HANDED_OVER.load(std::sync::atomic::Ordering::SeqCst)
        && OFFERED.load(std::sync::atomic::Ordering::SeqCst) == 0
        && file_id(path) == Some(id)
    {
        let _ = std::fs::remove_file(path);
    }
}

/// Successors that hold this process's sockets and have not yet said
/// `READY` or `FAILED` (nor closed the connection).
static OFFERED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One piece of work in progress, counted in its counter (`OFFERED`,
/// `IN_EXCHANGE`) until dropped.
struct Counted(&'static std::sync::atomic::AtomicUsize);

impl Counted {
    fn begin(counter: &'static std::sync::atomic::AtomicUsize) -> Counted {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Counted(counter)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Hand-overs between the successor's `READY` and this process's
/// `DRAINING` (see [`wait_exchanges`]).
static IN_EXCHANGE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Waits, at most `limit`, until no hand-over is between `READY` and
/// `DRAINING`. A process whose drain a hand-over started is idle at once
/// when it has no connections, and exited before its `DRAINING` line was
/// written: the successor then logged that its predecessor "did not
/// confirm" a hand-over that had worked.
pub fn wait_exchanges(limit: Duration) {
    let until = std::time::Instant::now() + limit;
    while IN_EXCHANGE.load(std::sync::atomic::Ordering::SeqCst) > 0
        && std::time::Instant::now() < until
    {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Binds the control socket at `path`. A stale socket file (nobody
/// listening) is replaced; a live one is an error: that process should be
/// taken over (`--takeover`), not shadowed.
/// Whether a process of user `uid` at the other end of a control
/// connection may be trusted with this process's sockets (or, for a
/// successor, to hand it its listeners): this process's own user, or
/// root. The socket file is mode 0600 too, but only from the `chmod` after
/// its `bind`: a connect in between (the file is made with the umask's
/// mode) waited in the backlog and was served a hand-over, and an
/// unprivileged user took a root proxy's listeners (break-it round 23).
/// The credentials the kernel records at `connect` close that window, and
/// any other way to the socket (a directory made writable, a file mode
/// changed by hand).
pub fn trusted_peer(uid: u32) -> bool {
    uid == 0 || uid == crate::sys::effective_uid()
}

pub fn bind_control(path: &Path) -> Result<UnixListener, StartupError> {
    let err = |reason: String| StartupError::ControlSocket {
        path: path.display().to_string(),
        reason,
    };
    if refuse_served_control(path)? {
        std::fs::remove_file(path)
            .map_err(|e| err(format!("cannot remove the stale socket: {e}")))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| err(e.to_string()))?;
    // Only the service's own user (and root) may take its listeners.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| err(e.to_string()))?;
    Ok(listener)
}

/// The check [`bind_control`] makes first, without binding: an error if
/// `path` is not a socket, or a live one (a running process serves it: it
/// should be taken over with `--takeover`, not shadowed). `Ok(true)`: a
/// stale socket file is there; `Ok(false)`: nothing is. Start-up calls it
/// before it binds the proxy's listeners too, so that such a start fails
/// in one line, before the warning about joining another process's
/// `SO_REUSEPORT` group (binding the control socket that early would leave
/// its file behind when a later step of the start fails).
pub fn refuse_served_control(path: &Path) -> Result<bool, StartupError> {
    let err = |reason: String| StartupError::ControlSocket {
        path: path.display().to_string(),
        reason,
    };
    let Some(existing) = crate::config::existing_socket(path) else {
        return Ok(false);
    };
    existing.map_err(|why| err(why.into()))?;
    if UnixStream::connect(path).is_ok() {
        return Err(err(
            "a running shardproxy serves it; start with --takeover to replace that process".into(),
        ));
    }
    Ok(true)
}

/// What the predecessor offers: duplicates of its sockets.
pub struct Offer {
    /// This process's role (`forward`, `entry`, `exit`).
    pub role: &'static str,
    /// The oldest hello timestamp this process accepts (see [`Inherited`]).
    pub not_before: u64,
    /// Every listener its shards accept on.
    pub proxy: Vec<Socket>,
    /// The metrics listener, if any.
    pub metrics: Option<TcpListener>,
}

/// The offer, shared between the control-socket thread and the drain:
/// starting a drain empties it at once, so that the duplicates it holds do
/// not keep the listening sockets open (and accepting into their queues)
/// after the shards stopped accepting.
pub type SharedOffer = Arc<std::sync::Mutex<Option<Offer>>>;

/// Whether the listeners are still on offer (not handed over, not draining).
fn offered(offer: &SharedOffer) -> bool {
    offer.lock().is_ok_and(|o| o.is_some())
}

/// Predecessor side: serves `listener` on a thread. For each successor that
/// connects, sends the sockets and waits for `READY`; then calls
/// `on_ready(pid)` (which starts the drain), answers `DRAINING`, and stops
/// serving the socket (the successor serves it from then on). The thread
/// ends once `offer` is emptied: after a hand-over, or when the process
/// drains for another reason.
///
/// `salts` (an exit's) receives the shards' replay sets once they drain
/// after a hand-over; `shards` of them are awaited (at most
/// [`EXPORT_TIMEOUT`]) and sent to the successor before `DRAINING`.
///
/// A successor silent for `ready_timeout` after it got the sockets
/// (`--handover-timeout`) is given up on: it is told so (`ERROR gave up:
/// ...`, which it reads after its `READY`) and this process serves on.
pub fn serve(
    listener: UnixListener,
    offer: SharedOffer,
    salts: Option<(std::sync::mpsc::Receiver<crate::replay::Export>, usize)>,
    ready_timeout: Duration,
    on_ready: impl Fn(u32) + Send + Sync + 'static,
) -> std::io::Result<()> {
    // accept(2) honours SO_RCVTIMEO: an accept that loses a connection to
    // the successor (the socket is shared with it) returns within 200 ms.
    socket2::SockRef::from(&listener).set_read_timeout(Some(Duration::from_millis(200)))?;
    let on_ready = Arc::new(on_ready);
    // One hand-over at a time; a second successor is told at once.
    let exchange = Arc::new(std::sync::Mutex::new(salts));
    let listener = Arc::new(listener);
    // Set once a successor said READY: the control socket is then its, and
    // this process accepts nothing more on it (a break-it round saw the
    // next upgrade, sent to the successor within 200 ms, answered
    // "draining" by this process, which was still blocked in accept).
    let handed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    std::thread::Builder::new()
        .name("control-socket".into())
        .spawn(move || {
            let handed_over = || handed.load(std::sync::atomic::Ordering::SeqCst);
            let mut refusals = crate::log::RateLimited::new();
            while offered(&offer) {
                match shared_listener_turn(listener.as_raw_fd(), handed_over) {
                    Turn::Accept => {}
                    Turn::Idle => continue,
                    Turn::HandedOver => break,
                }
                let Ok((conn, _)) = listener.accept() else {
                    continue;
                };
                match crate::sys::peer_uid(conn.as_raw_fd()) {
                    Some(uid) if trusted_peer(uid) => {}
                    who => {
                        let who = who.map_or("an unknown user".to_string(), |u| format!("user {u}"));
                        let _ = (&conn).write_all(
                            b"ERROR not allowed: only this process's user or root may take its listeners\n",
                        );
                        // Rate-limited: another user connecting in a loop
                        // wrote 280,000 lines in 5 s (break-it round 23).
                        refusals.log(|n| {
                            let more = match n {
                                0 => String::new(),
                                n => format!("; {n} more refused since the last such line"),
                            };
                            format!(
                                "control socket: refused a connection from {who} (neither this process's user nor root){more}"
                            )
                        });
                        continue;
                    }
                }
                // Each connection on its own thread: a client that sends
                // nothing (or never says READY) cannot hold up the next one.
                let (offer, on_ready, exchange, listener, handed) = (
                    offer.clone(),
                    on_ready.clone(),
                    exchange.clone(),
                    listener.clone(),
                    handed.clone(),
                );
                // Kept to answer on if no thread can be made for it.
                let refusal = conn.try_clone();
                let spawned = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || {
                        let mut exchange = match exchange.try_lock() {
                            Ok(guard) => guard,
                            Err(_) => {
                                // Its request first (at most 1 s): a reply
                                // sent before the request arrived, and the
                                // close, made the successor's own write
                                // fail ("Broken pipe") instead of reading
                                // why it was refused.
                                let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
                                let _ = std::io::Read::read(&mut &conn, &mut [0u8; 128]);
                                let _ = (&conn).write_all(b"ERROR busy: another hand-over is in progress\n");
                                // Not "hand-over failed": the one in progress goes on.
                                crate::warn!("hand-over: refused a second successor (busy); the hand-over in progress goes on");
                                return;
                            }
                        };
                        let answer = offer_to(&conn, &offer, &listener, ready_timeout);
                        if answer.is_ok() {
                            handed.store(true, std::sync::atomic::Ordering::SeqCst);
                            HANDED_OVER.store(true, std::sync::atomic::Ordering::SeqCst);
                        }
                        match answer {
                            Ok((pid, version, not_before)) if offered(&offer) => {
                                // Counted before the drain starts, so the
                                // process cannot exit before DRAINING went.
                                let _exchange = Counted::begin(&IN_EXCHANGE);
                                on_ready(pid);
                                if version >= 2 {
                                    // Only an exit keeps a replay set; the
                                    // others send an empty one, unlogged.
                                    let has_set = exchange.is_some();
                                    let set = collect_salts(exchange.as_mut());
                                    let n = set.salts.len();
                                    match send_salts(&conn, &set, not_before) {
                                        Ok(()) if !has_set => {}
                                        Ok(()) => crate::info!(
                                            "hand-over: sent the replay set ({n} salt(s){})",
                                            if set.complete { "" } else { ", incomplete" }
                                        ),
                                        Err(e) => crate::warn!("hand-over: sending the replay set: {e}"),
                                    }
                                }
                                let _ = (&conn).write_all(b"DRAINING\n");
                                crate::info!(
                                    "hand-over: process {pid} accepts on our listeners; draining"
                                );
                                if let Ok(mut o) = offer.lock() {
                                    *o = None;
                                }
                            }
                            Ok((pid, _, _)) => {
                                // We started draining meanwhile: the successor
                                // serves alone; it hears no DRAINING.
                                crate::warn!("hand-over: process {pid} became ready while we were already draining");
                            }
                            Err(reason) if reason.is_empty() => {}
                            Err(reason) => {
                                crate::warn!("hand-over failed, still serving: {reason}");
                            }
                        }
                    });
                if let Err(e) = spawned {
                    // The successor is told why and stops; this process
                    // serves on, and says so (before, the connection was
                    // closed unanswered and nothing was logged here).
                    if let Ok(conn) = refusal {
                        let _ = (&conn).write_all(
                            format!("ERROR no thread to serve the hand-over: {e}\n").as_bytes(),
                        );
                    }
                    crate::warn!("hand-over refused, still serving: no thread to serve it ({e})");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        })?;
    Ok(())
}

/// What a thread serving a listener shared with a successor (the control
/// socket, the metrics listener) does next: see [`shared_listener_turn`].
pub enum Turn {
    /// A connection waits, and this process may take it.
    Accept,
    /// Nothing yet (after at most 200 ms): look again.
    Idle,
    /// A successor is ready: the socket is its; accept nothing more.
    HandedOver,
}

/// One turn of a thread serving listener `fd`, which a successor shares
/// once a hand-over has begun: waits up to 200 ms for a connection without
/// taking it, then looks whether `handed_over()`; only if not may the
/// caller accept. A thread blocked in `accept` instead would take the
/// successor's connections for up to its timeout after `READY` (a
/// break-it round saw the next upgrade refused as "draining" by the old
/// process so). The caller's accept should itself time out (SO_RCVTIMEO):
/// the successor may take the connection first.
pub fn shared_listener_turn(fd: RawFd, handed_over: impl Fn() -> bool) -> Turn {
    if handed_over() {
        return Turn::HandedOver;
    }
    match crate::sys::wait_readable(fd, Duration::from_millis(200)) {
        Ok(true) if handed_over() => Turn::HandedOver,
        Ok(true) => Turn::Accept,
        Ok(false) => Turn::Idle,
        // Not expected on a valid socket (ENOMEM): no spin.
        Err(_) => {
            std::thread::sleep(Duration::from_millis(50));
            Turn::Idle
        }
    }
}

/// Collects the shards' replay sets (see [`crate::replay`]): every shard's
/// [`crate::replay::Export::Set`], and the deltas sent meanwhile, for at
/// most [`EXPORT_TIMEOUT`]. Without a receiver (not an exit) the set is
/// empty and complete.
fn collect_salts(
    salts: Option<&mut (std::sync::mpsc::Receiver<crate::replay::Export>, usize)>,
) -> InheritedSalts {
    use crate::replay::Export;
    let Some((rx, shards)) = salts else {
        return InheritedSalts {
            complete: true,
            ..InheritedSalts::default()
        };
    };
    let deadline = std::time::Instant::now() + EXPORT_TIMEOUT;
    let mut got = InheritedSalts::default();
    let mut sets = 0;
    while sets < *shards {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(Export::Set { salts, .. }) => {
                sets += 1;
                got.salts.extend(salts);
            }
            Ok(Export::Delta(salt)) => got.salts.push(salt),
            Err(_) => break,
        }
        if got.salts.len() > MAX_SALTS {
            break;
        }
    }
    got.complete = sets == *shards && got.salts.len() <= MAX_SALTS;
    got.salts.truncate(MAX_SALTS);
    got
}

/// Writes the `SALTS` line and its payload.
fn send_salts(conn: &UnixStream, set: &InheritedSalts, not_before: u64) -> std::io::Result<()> {
    let mut out = Vec::new();
    writeln!(
        out,
        "SALTS {} {not_before} {}",
        set.salts.len(),
        u8::from(set.complete)
    )?;
    crate::replay::put_remembered(&mut out, &set.salts);
    let mut w = conn;
    w.write_all(&out)
}

/// One exchange with a successor; returns its PID, the exchange's version
/// and our `not_before` once it is `READY`. The offer is locked only while
/// the sockets are sent (the kernel duplicates them then), never while
/// waiting for `READY`, so a drain can empty it.
fn offer_to(
    conn: &UnixStream,
    offer: &SharedOffer,
    control: &UnixListener,
    ready_timeout: Duration,
) -> Result<(u32, u8, u64), String> {
    conn.set_read_timeout(Some(LINE_TIMEOUT))
        .and_then(|()| conn.set_write_timeout(Some(LINE_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(conn.try_clone().map_err(|e| e.to_string())?);
    let request = match read_line(&mut reader) {
        Ok(r) => r,
        // A liveness probe (a process refusing to shadow this socket) connects
        // and closes without a request: not a hand-over.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(String::new()),
        Err(e) => return Err(format!("reading the request: {e}")),
    };
    let version = match request.as_str() {
        "TAKEOVER 1" => 1,
        "TAKEOVER 2" => 2,
        _ => {
            let _ = (&*conn).write_all(b"ERROR unsupported request\n");
            return Err(format!(
                "unsupported request `{}`",
                crate::log::one_line(&request)
            ));
        }
    };
    let not_before = {
        let guard = offer.lock().map_err(|_| "offer unavailable".to_string())?;
        let Some(offer) = guard.as_ref() else {
            let _ = (&*conn).write_all(b"ERROR draining\n");
            return Err("a successor asked while this process drains".into());
        };
        let mut fds: Vec<RawFd> = offer.proxy.iter().map(AsRawFd::as_raw_fd).collect();
        fds.extend(offer.metrics.as_ref().map(AsRawFd::as_raw_fd));
        fds.push(control.as_raw_fd());
        let head = format!(
            "LISTENERS {} {} {} {} {} 1\n",
            std::process::id(),
            offer.role,
            offer.not_before,
            offer.proxy.len(),
            u8::from(offer.metrics.is_some())
        );
        conn.send_with_fd(head.as_bytes(), &fds)
            .map_err(|e| format!("sending the sockets: {e}"))?;
        offer.not_before
    };
    // Until the successor says how its start went, the control socket may
    // be its (see `remove_control`).
    let _offered = Counted::begin(&OFFERED);
    conn.set_read_timeout(Some(ready_timeout))
        .map_err(|e| e.to_string())?;
    // `READY <pid>`, or `FAILED <reason>` (at most FAILED_MAX bytes).
    // Giving up on a successor that may still be alive (it stalled past
    // `--handover-timeout`, or spoke nonsense), this process says so before it
    // closes, in the line the successor reads after its READY: it then
    // knows that its READY was never taken, and stops instead of serving
    // alongside (`HandoverError::Abandoned`).
    let give_up = |why: String| {
        let _ = (&*conn).write_all(format!("ERROR gave up: {why}; serving on\n").as_bytes());
        why
    };
    let ready = read_line_max(&mut reader, FAILED_MAX as u64 + 16).map_err(|e| {
        give_up(
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) {
                format!(
                    "the successor did not become ready within {} (--handover-timeout)",
                    crate::units::format_duration(ready_timeout)
                )
            } else {
                format!("the successor did not become ready: {e}")
            },
        )
    })?;
    if let Some(reason) = ready.strip_prefix("FAILED ") {
        return Err(format!(
            "the successor failed: {}",
            crate::log::one_line(reason)
        ));
    }
    let pid = ready
        .strip_prefix("READY ")
        .and_then(|pid| pid.parse().ok())
        .ok_or_else(|| {
            // 64 bytes of it at most: the whole line fits VERDICT_MAX.
            let got = crate::log::capped(crate::log::one_line(&ready).into_owned(), 64);
            give_up(format!("expected READY, got `{got}`"))
        })?;
    Ok((pid, version, not_before))
}
