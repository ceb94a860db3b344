//! Start-up errors: each is one line that names the fix, and exits with 2.

use std::net::SocketAddr;

use crate::config::ConfigError;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The configuration is invalid.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// The config file is unusable.
    #[error("{0}")]
    ConfigFile(#[from] crate::config_file::FileError),
    /// A setting in the config file does not parse (clap's first line).
    #[error("config {path}: {message}")]
    ConfigValue {
        /// The path.
        path: String,
        /// What clap said.
        message: String,
    },
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
    /// The metrics endpoint cannot listen.
    #[error("cannot listen on --metrics-listen {addr}: {source}")]
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
    /// `keygen` could not produce or store a key.
    #[error("keygen: {0}")]
    Keygen(String),
    /// The signal handler could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

impl StartupError {
    /// Process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        2
    }
}
