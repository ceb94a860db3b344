//! The two error families:
//!
//! * [`StartupError`]: why the process could not start. Each is one line that
//!   names the fix, and exits with 2.
//! * [`SessionError`]: why one connection ended early, tagged with the
//!   [`Side`] that failed (after pingora-error's `ErrorSource`). Its
//!   [`CloseReason`] is the `Copy` label for logs and metrics (after
//!   linkerd's error-kind labels).

use std::fmt;
use std::io;
use std::net::SocketAddr;

use crate::config::ConfigError;
use crate::proto::ProtoError;
use crate::stats::CloseReason;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The configuration is invalid.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// The listen port is taken by a socket without SO_REUSEPORT (not ours).
    #[error("cannot listen on {0}: address already in use by another program (stop it or pick another port)")]
    AddrInUse(SocketAddr),
    /// Binding needs a capability we lack.
    #[error(
        "cannot listen on {0}: permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)"
    )]
    AddrAccess(SocketAddr),
    /// The listen address is not one of this host's.
    #[error("cannot listen on {0}: address not available on this host")]
    AddrNotAvail(SocketAddr),
    /// Any other listen failure.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// `--access-log` cannot be opened for appending.
    #[error("cannot open --access-log {path}: {reason}")]
    AccessLog {
        /// The path.
        path: String,
        /// The OS error.
        reason: String,
    },
    /// The metrics endpoint cannot listen. Worded as the listen errors
    /// above for the same OS errors.
    #[error("cannot listen on --metrics-listen {addr}: {}", listen_reason(.source))]
    MetricsListen {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// RLIMIT_MEMLOCK is below glommio's minimum.
    #[error("memlock limit is {have} bytes but io_uring needs at least {need}: raise it with `ulimit -l 512` (or more), LimitMEMLOCK= in systemd, or --ulimit memlock= in docker")]
    MemLock {
        /// Current soft limit.
        have: u64,
        /// glommio's minimum.
        need: u64,
    },
    /// The descriptor limit cannot fit the shards before any connection.
    #[error("the file descriptor limit (hard RLIMIT_NOFILE) is {have}, but {shards} shard(s) need at least {need} to start: raise it (`ulimit -n`, LimitNOFILE= in systemd, --ulimit nofile= in docker) or use fewer --cores")]
    FdLimit {
        /// The hard limit.
        have: u64,
        /// [`crate::app::min_fds`] for the shards.
        need: u64,
        /// Shards asked for.
        shards: usize,
    },
    /// Out of descriptors while setting something up (the limit is above
    /// [`crate::app::min_fds`], but another process or the system took them).
    #[error("out of file descriptors: {0}: raise the limit (`ulimit -n`, LimitNOFILE= in systemd), or check the system-wide fs.file-max")]
    OutOfFds(String),
    /// The pre-flight executor could not be built for another reason
    /// than io_uring itself (a thread the system refused).
    #[error("cannot build a test executor before the shards: {0}")]
    Preflight(String),
    /// io_uring cannot be set up (old kernel, sysctl, seccomp).
    #[error("io_uring is unavailable ({0}): needs Linux 5.8+, sysctl kernel.io_uring_disabled=0, and a seccomp profile that allows io_uring_setup")]
    IoUring(String),
    /// A shard thread could not start.
    #[error("cannot start shard on core {core}: {reason}")]
    Shard {
        /// The core.
        core: usize,
        /// What went wrong.
        reason: String,
    },
    /// A shard stopped with an error: before it was ready (the start
    /// fails, and the other shards stop), or while serving.
    #[error("shard {id} on core {core} failed: {reason}")]
    ShardFailed {
        /// The shard.
        id: usize,
        /// Its core.
        core: usize,
        /// What went wrong.
        reason: String,
    },
    /// The metrics endpoint is bound but cannot be served (its threads).
    #[error("{0}")]
    Metrics(String),
    /// `keygen` could not produce or store a key.
    #[error("keygen: {0}")]
    Keygen(String),
    /// The signal handler could not be installed.
    #[error("cannot install signal handlers: {0}{hint}", hint = no_thread_hint(.0))]
    Signals(std::io::Error),
    /// `--control-socket` cannot be served.
    #[error("cannot serve --control-socket {path}: {reason}")]
    ControlSocket {
        /// The socket path.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// `--takeover` failed; the running process keeps serving.
    #[error("--takeover: cannot take over (the running process keeps serving): {0}")]
    Takeover(String),
    /// `--takeover` named a control socket no process serves.
    #[error("--takeover: cannot take over: {0}")]
    NoPredecessor(String),
    /// A `demo` proxy exited with an error before anyone stopped the demo.
    #[error("demo: the {0} proxy exited with an error (see its [{0}] lines above)")]
    DemoProxy(&'static str),
    /// `demo` could not start one of its processes.
    #[error("demo: cannot start {what}: {source}{hint}", hint = no_thread_hint(source))]
    Demo {
        /// Which part of the demo.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The reason part of a failed listen, in the words of
/// [`StartupError::AddrInUse`], [`StartupError::AddrAccess`] and
/// [`StartupError::AddrNotAvail`], so every listening flag says the same.
fn listen_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::AddrInUse => {
            "address already in use by another program (stop it or pick another port)".into()
        }
        io::ErrorKind::PermissionDenied => {
            "permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)".into()
        }
        io::ErrorKind::AddrNotAvailable => "address not available on this host".into(),
        _ => e.to_string(),
    }
}

impl StartupError {
    /// Process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        2
    }
}

/// Which peer a socket talks to (linkerd's client/server vocabulary:
/// *downstream* connected to us, *upstream* is where we connected).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// The client that connected to us.
    Downstream,
    /// The server we connected to.
    Upstream,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Peer::Downstream => "downstream",
            Peer::Upstream => "upstream",
        })
    }
}

/// Which side of a session failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client that connected to us.
    Downstream,
    /// The server (or exit) we connected to.
    Upstream,
    /// This process: a local resource or limit, not a peer.
    Internal,
}

impl From<Peer> for Side {
    fn from(p: Peer) -> Self {
        match p {
            Peer::Downstream => Side::Downstream,
            Peer::Upstream => Side::Upstream,
        }
    }
}

/// Why a session ended before both directions finished cleanly.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// A socket operation failed on one side (reset, broken pipe, ...).
    #[error("{peer} {op}: {source}")]
    Io {
        /// The side whose socket failed.
        peer: Peer,
        /// What we were doing: `read`, `write` or `shutdown`.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `connect(2)` to the upstream failed (refused, unreachable, or no file
    /// descriptor left for the socket).
    #[error("upstream connect: {0}")]
    Connect(#[source] io::Error),
    /// The upstream did not accept within `--connect-timeout`.
    #[error("upstream connect timed out")]
    ConnectTimeout,
    /// The peer closed before its hello was complete.
    #[error("{0} closed during the handshake")]
    HandshakeClosed(Peer),
    /// A pending handshake was closed to make room for a newer one
    /// (`--max-handshakes`).
    #[error("{0} pending handshake closed to make room (--max-handshakes)")]
    Evicted(Peer),
    /// The peer closed or reset before sending a single byte.
    #[error("{0} closed before sending anything")]
    Empty(Peer),
    /// The handshake did not complete within `--handshake-timeout`.
    #[error("{0} handshake timed out")]
    HandshakeTimeout(Peer),
    /// The tunnel peer sent something that failed authentication or broke
    /// the protocol.
    #[error("{peer} tunnel: {source}")]
    Proto {
        /// The tunnel side.
        peer: Peer,
        /// What the protocol rejected.
        source: ProtoError,
    },
    /// Our own sealing hit a hard protocol limit (the nonce counter).
    #[error("tunnel limit: {0}")]
    Limit(ProtoError),
    /// The tunnel ended (TCP EOF) without its authenticated end chunk.
    #[error("{0} tunnel truncated (EOF without the end chunk)")]
    Truncated(Peer),
    /// No bytes either way for `--idle-timeout`.
    #[error("idle timeout")]
    Idle,
    /// Aborted at the end of the drain period.
    #[error("aborted at the end of the drain")]
    Drained,
    /// The OS random number generator failed (salt for a hello).
    #[error("random number generator failed: {0}")]
    Rng(getrandom::Error),
    /// A tunnel role has no keys loaded.
    #[error("no tunnel keys loaded")]
    NoKeys,
    /// The relay buffers (this many bytes each) could not be allocated.
    #[error("cannot allocate a {0}-byte relay buffer")]
    OutOfMemory(usize),
    /// Every attempt (`--connect-attempts`) to reach an upstream endpoint
    /// failed; `last` is the last attempt's error.
    #[error("no upstream: {attempts} attempt(s) failed{}", last.as_ref().map(|e| format!("; last: {e}")).unwrap_or_default())]
    NoUpstream {
        /// Endpoints tried.
        attempts: usize,
        /// The last failure.
        last: Option<Box<SessionError>>,
    },
    /// The exit answered an authenticated session with a refusal, so the
    /// entry may send it to another exit: `status` in the server hello
    /// (docs/PROTOCOL.md §3: none of its upstream endpoints is up, or it is
    /// at `--max-connections`), or in a status chunk (§3.1, §4.1), after
    /// `cause`: its origin could not be reached, or no session slot came,
    /// in time. Nothing of the session reached an origin; whether its
    /// client is lost is the entry's to count.
    #[error("refused the session: {}{} (the entry may send it to another exit)",
        crate::proto::refusal(*status),
        cause.as_ref().map(|e| format!(" ({e})")).unwrap_or_default())]
    Refused {
        /// The status sent (non-zero).
        status: u8,
        /// What failed first, for a refusal in a status chunk.
        cause: Option<Box<SessionError>>,
    },
    /// `--accept-proxy`: the client is not trusted to send a PROXY header,
    /// or its header was missing, malformed, too long or late.
    #[error("downstream PROXY protocol header: {0}")]
    BadProxyHeader(&'static str),
    /// A tunnel failed after the entry sent a session's first bytes and
    /// before the exit's status: a kept tunnel's start (docs/PROTOCOL.md
    /// §4.1) or a new tunnel's first flight under a connect status (§3.1).
    /// The exit may have served them, so they are not sent again, and the
    /// client is reset. `what` says how it failed.
    #[error("tunnel to the exit failed before its status ({what}); the session is not sent again")]
    Unanswered {
        /// How: a reset, EOF, a timeout, a bad answer.
        what: String,
    },
}

impl SessionError {
    /// The side that failed.
    pub fn side(&self) -> Side {
        match self {
            SessionError::Io { peer, .. }
            | SessionError::HandshakeClosed(peer)
            | SessionError::Empty(peer)
            | SessionError::Evicted(peer)
            | SessionError::HandshakeTimeout(peer)
            | SessionError::Proto { peer, .. }
            | SessionError::Truncated(peer) => Side::from(*peer),
            SessionError::BadProxyHeader(_) => Side::Downstream,
            SessionError::Unanswered { .. } => Side::Upstream,
            SessionError::NoUpstream { .. } | SessionError::Refused { .. } => Side::Upstream,
            SessionError::Connect(e) if is_fd_exhaustion(e) => Side::Internal,
            SessionError::Connect(_) | SessionError::ConnectTimeout => Side::Upstream,
            // Silence is both peers'; the timer is ours.
            SessionError::Idle
            | SessionError::Drained
            | SessionError::Limit(_)
            | SessionError::Rng(_)
            | SessionError::NoKeys
            | SessionError::OutOfMemory(_) => Side::Internal,
        }
    }

    /// The close reason this error is counted and logged under.
    pub fn reason(&self) -> CloseReason {
        match self {
            SessionError::Io { peer, .. } => match peer {
                Peer::Downstream => CloseReason::DownstreamReset,
                Peer::Upstream => CloseReason::UpstreamReset,
            },
            SessionError::Connect(_) => CloseReason::ConnectError,
            SessionError::ConnectTimeout => CloseReason::ConnectTimeout,
            SessionError::HandshakeClosed(_) => CloseReason::AuthFailed,
            SessionError::HandshakeTimeout(_) => CloseReason::HandshakeTimeout,
            SessionError::Empty(_) => CloseReason::Empty,
            SessionError::Evicted(_) => CloseReason::Limit,
            SessionError::Proto {
                source: ProtoError::NonceExhausted | ProtoError::ReplayFilterFull,
                ..
            }
            | SessionError::Limit(_) => CloseReason::Limit,
            SessionError::Proto {
                source: ProtoError::SealFailed,
                ..
            } => CloseReason::Internal,
            SessionError::Refused { .. } => CloseReason::Refused,
            SessionError::Proto {
                source: ProtoError::Refused(_),
                ..
            } => CloseReason::NoUpstream,
            SessionError::Proto { .. } => CloseReason::AuthFailed,
            SessionError::Truncated(_) => CloseReason::Truncated,
            SessionError::Idle => CloseReason::IdleTimeout,
            SessionError::Drained => CloseReason::Drained,
            SessionError::Rng(_) | SessionError::NoKeys | SessionError::OutOfMemory(_) => {
                CloseReason::Internal
            }
            SessionError::BadProxyHeader(_) => CloseReason::BadProxyHeader,
            SessionError::NoUpstream { .. } => CloseReason::NoUpstream,
            SessionError::Unanswered { .. } => CloseReason::UpstreamReset,
        }
    }

    /// An error after which no other endpoint is tried: the shard is
    /// stopping, this process is out of file descriptors, or its random
    /// number generator failed (no endpoint can help with those), or a
    /// keep-alive tunnel failed before the exit answered a session it may
    /// have served ([`SessionError::Unanswered`]: never sent twice).
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            SessionError::Drained | SessionError::Rng(_) | SessionError::Unanswered { .. }
        ) || self.is_fd_exhaustion()
    }

    /// All attempts failed (`attempts` of them; `last` the last error).
    pub fn no_upstream(attempts: usize, last: Option<SessionError>) -> SessionError {
        SessionError::NoUpstream {
            attempts,
            last: last.map(Box::new),
        }
    }

    /// Whether an exit refused the tunnel (its authenticated server hello
    /// said so, docs/PROTOCOL.md §3): not a failed handshake.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            SessionError::Proto {
                source: ProtoError::Refused(_),
                ..
            }
        )
    }

    /// Whether the process ran out of file descriptors (EMFILE/ENFILE) for
    /// the upstream socket: the accept loop backs off instead of accepting
    /// clients it could only reset.
    pub fn is_fd_exhaustion(&self) -> bool {
        matches!(self, SessionError::Connect(e) if is_fd_exhaustion(e))
    }
}

fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// The close reason of a finished session.
impl From<&Result<(), SessionError>> for CloseReason {
    fn from(r: &Result<(), SessionError>) -> Self {
        match r {
            Ok(()) => CloseReason::Clean,
            Err(e) => e.reason(),
        }
    }
}

/// What to do about a thread the system refused (`EAGAIN` from `clone(2)`:
/// the user's thread or process limit), appended to the error that met it.
pub const NO_THREAD_HINT: &str = ": no thread for it (raise the thread limit: `ulimit -u`, TasksMax= in systemd, --pids-limit in docker)";

/// [`NO_THREAD_HINT`] if `e` is `EAGAIN`, else nothing.
fn no_thread_hint(e: &std::io::Error) -> &'static str {
    if e.raw_os_error() == Some(libc::EAGAIN) {
        NO_THREAD_HINT
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_their_side_and_reason() {
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        let e = SessionError::Io {
            peer: Peer::Upstream,
            op: "read",
            source: reset,
        };
        assert_eq!(
            (e.side(), e.reason()),
            (Side::Upstream, CloseReason::UpstreamReset)
        );
        assert_eq!(e.to_string(), "upstream read: connection reset");
        let emfile = SessionError::Connect(io::Error::from_raw_os_error(libc::EMFILE));
        assert!(emfile.is_fd_exhaustion());
        assert_eq!(emfile.side(), Side::Internal);
        assert_eq!(emfile.reason(), CloseReason::ConnectError);
        let refused = SessionError::Connect(io::Error::from_raw_os_error(libc::ECONNREFUSED));
        assert!(!refused.is_fd_exhaustion());
        assert_eq!(refused.side(), Side::Upstream);
        let bad = SessionError::Proto {
            peer: Peer::Downstream,
            source: ProtoError::BadTag,
        };
        assert_eq!(
            (bad.side(), bad.reason()),
            (Side::Downstream, CloseReason::AuthFailed)
        );
        let nonce = SessionError::Proto {
            peer: Peer::Upstream,
            source: ProtoError::NonceExhausted,
        };
        assert_eq!(nonce.reason(), CloseReason::Limit);
        assert_eq!(SessionError::NoKeys.side(), Side::Internal);
        assert_eq!(SessionError::NoKeys.reason(), CloseReason::Internal);
        assert_eq!(CloseReason::from(&Ok(())), CloseReason::Clean);
    }
}
