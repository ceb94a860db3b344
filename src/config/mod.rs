//! Validated configuration, built from the CLI. Binds nothing, spawns nothing.
//!
//! There is one path from the command line (and the config file it may
//! name) to a [`Config`]: [`load`]. It expands `--config FILE` into flags
//! ([`file`]), parses them with clap, and validates them here, so `run`,
//! the role subcommands and `check` cannot disagree.
//!
//! Everything that can be wrong with the input is found here, before any
//! shard starts, and becomes a [`ConfigError`] whose message is a single line
//! that names the fix.

pub mod file;
mod load;
pub mod ranges;

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::time::Duration;

use crate::cli::{ProxyArgs, TunnelArgs};
use crate::proto::{KeyFileError, KeySet};

pub use load::{allowed_cores, load, load_file, load_key_file, Loaded, Tool};

/// Which side of the tunnel this process plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Plain TCP in, plain TCP out.
    Forward,
    /// Plain TCP in, encrypted tunnel out.
    Entry,
    /// Encrypted tunnel in, plain TCP out.
    Exit,
}

impl Role {
    /// The label used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Forward => "forward",
            Role::Entry => "entry",
            Role::Exit => "exit",
        }
    }
}

/// Limits and timeouts that every connection of a shard obeys.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Relay buffer per direction.
    pub buffer_size: NonZeroUsize,
    /// Upstream connect deadline.
    pub connect_timeout: Duration,
    /// No bytes either way for this long closes the pair.
    pub idle_timeout: Duration,
    /// Grace period for live connections after SIGTERM.
    pub drain_timeout: Duration,
    /// Live connections per shard.
    pub max_connections: NonZeroUsize,
    /// Wake-up coalescing (`--wake-batch`, `--wake-batch-wait`): at most
    /// this many completions per wake-up, held back at most this long; `None`
    /// when off. See `glommio::raw::set_wake_batch`.
    pub wake_batch: Option<(u32, Duration)>,
    /// Pipes per shard for `--splice auto` (`forward` only; 0: never
    /// splice). Each is two file descriptors; see [`crate::transfer`].
    pub splice_pipes: usize,
}

/// What a proxy does with the bytes, with the settings only that mode has.
/// "entry without tunnel settings" cannot be represented.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Plain TCP in, plain TCP out.
    Forward,
    /// Plain TCP in, encrypted tunnel out.
    Entry(TunnelConfig),
    /// Encrypted tunnel in, plain TCP out.
    Exit(TunnelConfig),
}

/// A fully validated proxy configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The role and its mode-specific settings.
    pub mode: Mode,
    /// Address every shard listens on.
    pub listen: SocketAddr,
    /// Accept IPv4 on an IPv6 wildcard listener.
    pub dual_stack: bool,
    /// Listen backlog per shard.
    pub backlog: u32,
    /// The upstream pool: endpoints, balancing, retries, health.
    pub upstreams: crate::upstream::Upstreams,
    /// The cores to run one shard on each, in shard order.
    pub cores: Vec<usize>,
    /// Per-connection limits.
    pub limits: Limits,
    /// Where to serve metrics, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// How often shards publish snapshots.
    pub metrics_interval: Duration,
    /// Process lifecycle: hand-over and drain settings.
    pub lifecycle: Lifecycle,
    /// Client identity: PROXY protocol in and out.
    pub identity: Identity,
    /// The access log, if on.
    pub access_log: Option<AccessLog>,
    /// Process log level.
    pub log_level: crate::log::Level,
    /// Process log format.
    pub log_format: crate::log::Format,
    /// `--splice` was given (a warning in the tunnel roles, where it does
    /// nothing).
    pub splice_set: bool,
    /// Flags that only an exit uses, given to an entry (a warning each).
    pub exit_only_given: Vec<&'static str>,
    /// `--splice` is `auto`, given or by default (a warning in `forward`
    /// if no pipe fits).
    pub splice_requested: bool,
}

/// How the client's identity is learned and passed on.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// `--accept-proxy` (forward, entry).
    pub accept_proxy: Option<AcceptProxy>,
    /// `--send-proxy-v2` (forward, exit).
    pub send_proxy_v2: bool,
}

/// `--accept-proxy` settings.
#[derive(Debug, Clone)]
pub struct AcceptProxy {
    /// Peers allowed to send a header.
    pub trusted: Vec<ipnet::IpNet>,
    /// The header must be complete this long after accept.
    pub timeout: Duration,
}

impl AcceptProxy {
    /// Whether `peer` may send a PROXY header. An IPv4-mapped IPv6 peer (a
    /// dual-stack listener) is matched as IPv4.
    pub fn trusts(&self, peer: std::net::IpAddr) -> bool {
        let peer = match peer {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(peer, std::net::IpAddr::V4),
            v4 => v4,
        };
        self.trusted.iter().any(|net| net.contains(&peer))
    }
}

/// `--access-log` settings.
#[derive(Debug, Clone)]
pub struct AccessLog {
    /// The file, or `-` for stderr.
    pub path: String,
    /// Line format.
    pub format: crate::access_log::Format,
    /// A line per live connection this often, if set.
    pub interval: Option<Duration>,
    /// Paths the log must never be written to, with what each is: the key
    /// file, the config file and the control socket. Checked at start-up
    /// ([`crate::config::load`]) and again before every SIGUSR1 reopen, so
    /// that a path swapped for a link to one of them after start-up is
    /// refused too ([`crate::access_log::clash`]).
    pub protected: Vec<(&'static str, String)>,
}

/// How the process starts, hands over and stops.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    /// `/healthz` says 503 for this long after SIGTERM before the drain.
    pub drain_delay: Duration,
    /// How long this process waits for a successor's `READY`
    /// (`--handover-timeout`).
    pub handover_timeout: Duration,
    /// Where this process offers its listeners to a successor.
    pub control_socket: Option<std::path::PathBuf>,
    /// Take the listeners over from the process serving this socket.
    pub takeover: Option<std::path::PathBuf>,
}

/// Descriptors one shard's idle keep-alive tunnels may hold
/// (`--tunnel-keepalive`): per exit endpoint on an entry (`endpoints` of
/// them), in all on an exit. Apart from `--max-connections`, which counts
/// sessions.
fn idle_tunnel_fds(exit: bool, endpoints: usize, keepalive: usize) -> u64 {
    if exit {
        keepalive as u64
    } else {
        (keepalive * endpoints.max(1)) as u64
    }
}

/// `--max-clock-skew` unless given: SIP022's window.
pub const DEFAULT_MAX_CLOCK_SKEW: Duration = Duration::from_secs(30);
/// `--max-handshakes` unless given, per shard.
pub const DEFAULT_MAX_HANDSHAKES: i64 = 1024;

/// Settings of the encrypted roles.
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    /// Where the keys come from (re-read on SIGHUP).
    pub key_file: String,
    /// The keys as loaded at start-up.
    pub keys: KeySet,
    /// Deadline for the handshake, from accept (exit) or connect (entry).
    pub handshake_timeout: Duration,
    /// Allowed difference between the hello's clock and ours (exit).
    pub max_clock_skew: Duration,
    /// Pending (unauthenticated) handshakes per shard (exit).
    pub max_handshakes: usize,
    /// Offer (entry) or accept (exit) chunks of up to
    /// [`crate::proto::LARGE_PAYLOAD`] bytes (docs/PROTOCOL.md §4).
    pub large_chunks: bool,
    /// Keep-alive tunnels (docs/PROTOCOL.md §4.1): idle tunnels kept per
    /// exit endpoint per shard (entry) or per shard (exit); 0 is off.
    pub keepalive: usize,
    /// How long a keep-alive tunnel waits for its next session.
    pub tunnel_idle_timeout: Duration,
    /// `--tunnel-keepalive` as given, when `keepalive` had to be lowered
    /// to fit the descriptor limit (a warning).
    pub keepalive_asked: Option<usize>,
    /// `--max-handshakes` as given (or its default), when `max_handshakes`
    /// had to be lowered to fit the descriptor limit (a warning).
    pub max_handshakes_asked: Option<usize>,
}

/// `--tunnel-keepalive` unless given: an entry keeps this many idle tunnels
/// per exit endpoint per shard...
pub const DEFAULT_ENTRY_KEEPALIVE: i64 = 32;
/// ...and an exit this many per shard.
pub const DEFAULT_EXIT_KEEPALIVE: i64 = 1024;

/// Why a configuration was rejected. Every message is one line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `--metrics-listen` is not an IP:port.
    #[error("bad --metrics-listen address `{0}`: {1}")]
    BadMetricsListen(String, String),
    /// `--metrics-listen` would take connections meant for `--listen`: both
    /// sockets use `SO_REUSEPORT`, so the kernel would split clients between
    /// the proxy and the metrics endpoint.
    #[error("--metrics-listen {metrics} overlaps --listen {listen} (same port): clients would reach the metrics endpoint; pick another port")]
    MetricsOnListen {
        /// The metrics address.
        metrics: SocketAddr,
        /// The proxy's listen address.
        listen: SocketAddr,
    },
    /// `--listen` is not an IP:port.
    #[error("bad --listen address `{0}`: {1}")]
    BadListen(String, String),
    /// `--upstream` cannot be parsed or resolved.
    #[error("bad --upstream `{0}`: {1}")]
    BadUpstream(String, String),
    /// `--cores` asks for more than this process may use.
    #[error("--cores {asked}: only {available} cores are available to this process (see taskset/cpuset); use --cores {available} or fewer")]
    TooManyCores {
        /// What was asked.
        asked: i64,
        /// What the CPU mask allows.
        available: usize,
    },
    /// `--cores 0` or a negative count.
    #[error("--cores {0} is out of range: must be at least 1")]
    ZeroCores(i64),
    /// `--cpu-list` has a syntax error.
    #[error("bad --cpu-list `{0}`: expected a list such as 0,2-5")]
    BadCpuList(String),
    /// `--cpu-list` names a core outside the mask.
    #[error("--cpu-list: core {core} does not exist or is not allowed for this process (allowed: {allowed})")]
    CoreNotAllowed {
        /// The offending core.
        core: usize,
        /// The allowed set, formatted as a list.
        allowed: String,
    },
    /// The machine reports no usable cores at all.
    #[error("could not determine the CPU cores this process may use")]
    NoCores,
    /// The key file is missing or malformed.
    #[error("{0}")]
    Keys(#[from] KeyFileError),
    /// The config file is unusable.
    #[error("{0}")]
    File(#[from] file::FileError),
    /// The command line does not parse (clap's first line).
    #[error("{0}")]
    Args(String),
    /// A numeric setting outside its documented range ([`ranges`]).
    #[error("{flag} {value} is out of range: must be between {min} and {max}")]
    OutOfRange {
        /// The flag.
        flag: &'static str,
        /// The value given.
        value: String,
        /// Smallest accepted.
        min: String,
        /// Largest accepted.
        max: String,
    },
    /// `--upstream` is the proxy's own listen address: every client would
    /// loop through the proxy until file descriptors run out.
    #[error("--upstream {upstream} is this proxy's own --listen {listen}: each client would connect back to the proxy in a loop")]
    LoopedUpstream {
        /// The listen address.
        listen: SocketAddr,
        /// The upstream address.
        upstream: SocketAddr,
    },
    /// The upstream's port is 0, which nothing can connect to.
    #[error("bad --upstream `{0}`: port 0 cannot be connected to")]
    UpstreamPortZero(String),
    /// A flag given to a role it does not apply to.
    #[error("{flag} applies to {roles} only")]
    NotForRole {
        /// The flag.
        flag: &'static str,
        /// The roles it applies to.
        roles: &'static str,
    },
    /// A setting of a feature that is not turned on.
    #[error("{flag} needs {needs}")]
    Needs {
        /// The flag given.
        flag: &'static str,
        /// The flag that turns its feature on.
        needs: &'static str,
    },
    /// `--access-log` cannot be written.
    #[error("cannot open --access-log {0}: {1}")]
    BadAccessLog(String, String),
    /// `--control-socket` cannot be bound there.
    #[error("bad --control-socket {0}: {1}")]
    BadControlSocket(String, String),
    /// `--takeover` is no Unix socket path.
    #[error("bad --takeover {0}: {1}")]
    BadTakeover(String, String),
    /// `--accept-proxy` without `--proxy-trusted-cidrs`.
    #[error("--accept-proxy needs --proxy-trusted-cidrs: the peers (load balancers) allowed to send a PROXY header, e.g. 10.0.0.0/8")]
    NoTrustedCidrs,
    /// `--proxy-trusted-cidrs` has an entry that is no CIDR or address.
    #[error("bad --proxy-trusted-cidrs entry `{0}`: expected a CIDR such as 10.0.0.0/8 or an address such as 192.0.2.7")]
    BadCidr(String),
    /// A setting given in the config file was rejected: names the file and key.
    #[error("config {path}: key `{key}`: {message}")]
    InFile {
        /// The path.
        path: String,
        /// The key as written in the file.
        key: String,
        /// What was wrong.
        message: String,
    },
}

impl ConfigError {
    /// The flag this error is about, if it is about one setting.
    pub fn flag(&self) -> Option<&'static str> {
        match self {
            ConfigError::OutOfRange { flag, .. } => Some(flag),
            ConfigError::BadListen(..) => Some("--listen"),
            ConfigError::BadUpstream(..)
            | ConfigError::UpstreamPortZero(_)
            | ConfigError::LoopedUpstream { .. } => Some("--upstream"),
            ConfigError::BadMetricsListen(..) | ConfigError::MetricsOnListen { .. } => {
                Some("--metrics-listen")
            }
            ConfigError::TooManyCores { .. } | ConfigError::ZeroCores(_) => Some("--cores"),
            ConfigError::BadCpuList(_) | ConfigError::CoreNotAllowed { .. } => Some("--cpu-list"),
            ConfigError::NotForRole { flag, .. } | ConfigError::Needs { flag, .. } => Some(flag),
            ConfigError::NoTrustedCidrs | ConfigError::BadCidr(_) => Some("--proxy-trusted-cidrs"),
            ConfigError::BadAccessLog(..) => Some("--access-log"),
            ConfigError::BadControlSocket(..) => Some("--control-socket"),
            ConfigError::Keys(_) => Some("--key-file"),
            ConfigError::BadTakeover(..) => Some("--takeover"),
            _ => None,
        }
    }

    /// The setting that asked for what is missing, when [`ConfigError::flag`]
    /// names a setting that is absent (a config file then has no key for it).
    pub fn asked_by(&self) -> Option<&'static str> {
        match self {
            ConfigError::NoTrustedCidrs => Some("--accept-proxy"),
            _ => None,
        }
    }
}

impl Config {
    /// The role label of this configuration.
    pub fn role(&self) -> Role {
        match self.mode {
            Mode::Forward => Role::Forward,
            Mode::Entry(_) => Role::Entry,
            Mode::Exit(_) => Role::Exit,
        }
    }

    /// `--access-log-interval`, when the access log is on.
    pub fn access_log_interval(&self) -> Option<Duration> {
        self.access_log.as_ref().and_then(|l| l.interval)
    }

    /// The tunnel settings, in `entry` and `exit`.
    pub fn tunnel(&self) -> Option<&TunnelConfig> {
        match &self.mode {
            Mode::Forward => None,
            Mode::Entry(t) | Mode::Exit(t) => Some(t),
        }
    }

    /// Validates a `forward` command line. `allowed_cores` is the process's
    /// CPU mask (from `core_affinity`), passed in so tests need no particular
    /// machine.
    pub fn forward(args: &ProxyArgs, allowed_cores: &[usize]) -> Result<Config, ConfigError> {
        Config::from_args(Mode::Forward, args, allowed_cores)
    }

    fn from_args(
        mode: Mode,
        args: &ProxyArgs,
        allowed_cores: &[usize],
    ) -> Result<Config, ConfigError> {
        let listen = crate::units::parse_socket_addr(&args.listen).map_err(|why| {
            ConfigError::BadListen(
                args.listen.clone(),
                why.unwrap_or_else(|| {
                    "expected IP:PORT such as 127.0.0.1:8000 or [::]:8000".into()
                }),
            )
        })?;
        let upstreams = upstreams(args)?;
        if let Some(e) = upstreams
            .endpoints
            .iter()
            .find(|e| crate::upstream::loops_to(listen, e.addr, args.dual_stack))
        {
            return Err(ConfigError::LoopedUpstream {
                listen,
                upstream: e.addr,
            });
        }
        let metrics_listen = match &args.metrics_listen {
            None => None,
            Some(text) => Some(crate::units::parse_socket_addr(text).map_err(|why| {
                ConfigError::BadMetricsListen(
                    text.clone(),
                    why.unwrap_or_else(|| "expected IP:PORT such as 127.0.0.1:9100".into()),
                )
            })?),
        };
        if let Some(metrics) = metrics_listen.filter(|m| overlaps(*m, listen)) {
            return Err(ConfigError::MetricsOnListen { metrics, listen });
        }
        let cores = select_cores(args.cores, args.cpu_list.as_deref(), allowed_cores)?;
        let nz = |v: usize| NonZeroUsize::new(v).expect("ranges start at 1");
        let buffer_size = nz(ranges::BUFFER_SIZE.check_size(args.buffer_size)?);
        // `tunnel_role` passes `Forward` too, and turns splicing off after.
        let splicing = matches!(mode, Mode::Forward) && args.splice.as_deref() != Some("never");
        let max_connections = match args.max_connections {
            Some(n) => nz(ranges::MAX_CONNECTIONS.check_count(n)?),
            None if splicing => nz(default_max_connections_splicing(cores.len(), fd_limit())),
            None => nz(default_max_connections(cores.len(), fd_limit())),
        };
        let splice_pipes = if splicing {
            splice_pipes(max_connections.get(), cores.len(), fd_limit())
        } else {
            0
        };
        Ok(Config {
            mode,
            listen,
            dual_stack: args.dual_stack,
            backlog: ranges::BACKLOG.check_count(args.backlog)?,
            upstreams,
            cores,
            metrics_listen,
            metrics_interval: ranges::METRICS_INTERVAL.check(args.metrics_interval)?,
            identity: Identity {
                accept_proxy: accept_proxy(args)?,
                send_proxy_v2: args.send_proxy_v2,
            },
            access_log: match &args.access_log {
                None if args.access_log_interval.is_some() => {
                    return Err(ConfigError::Needs {
                        flag: "--access-log-interval",
                        needs: "--access-log",
                    })
                }
                None => None,
                Some(path) => Some(AccessLog {
                    path: access_log_path(path)?,
                    format: crate::access_log::Format::parse(&args.access_log_format)
                        .unwrap_or(crate::access_log::Format::Json),
                    interval: args
                        .access_log_interval
                        .map(|i| ranges::ACCESS_LOG_INTERVAL.check(i))
                        .transpose()?,
                    protected: Vec::new(),
                }),
            },
            log_level: crate::log::Level::parse(&args.log_level).unwrap_or(crate::log::Level::Info),
            log_format: if args.log_format == "json" {
                crate::log::Format::Json
            } else {
                crate::log::Format::Text
            },
            lifecycle: Lifecycle {
                drain_delay: ranges::DRAIN_DELAY.check(args.drain_delay)?,
                handover_timeout: ranges::HANDOVER_TIMEOUT.check(args.handover_timeout)?,
                control_socket: args
                    .control_socket
                    .as_deref()
                    .map(control_socket_path)
                    .transpose()?,
                takeover: args.takeover.as_deref().map(takeover_path).transpose()?,
            },
            limits: Limits {
                buffer_size,
                connect_timeout: ranges::CONNECT_TIMEOUT.check(args.connect_timeout)?,
                idle_timeout: ranges::IDLE_TIMEOUT.check(args.idle_timeout)?,
                drain_timeout: ranges::DRAIN_TIMEOUT.check(args.drain_timeout)?,
                max_connections,
                wake_batch: {
                    let count = ranges::WAKE_BATCH.check_count(args.wake_batch)?;
                    let wait = ranges::WAKE_BATCH_WAIT.check(args.wake_batch_wait)?;
                    (count > 1).then_some((count, wait))
                },
                splice_pipes,
            },
            splice_set: args.splice.is_some(),
            exit_only_given: Vec::new(),
            splice_requested: args.splice.as_deref() != Some("never"),
        })
    }

    /// File descriptors at `--max-connections` on every shard: two per
    /// connection (client and upstream), plus a margin for listeners,
    /// io_uring rings, control sockets and metrics.
    pub fn fds_needed(&self) -> u64 {
        // The exit's pending handshakes are counted apart (--max-handshakes;
        // a burst of young ones may reach twice that).
        let pending = match &self.mode {
            Mode::Exit(t) => 2 * t.max_handshakes as u64,
            _ => 0,
        };
        let pipes = 2 * self.limits.splice_pipes as u64;
        let idle = self.tunnel().map_or(0, |t| {
            let exit = matches!(self.mode, Mode::Exit(_));
            idle_tunnel_fds(exit, self.upstreams.endpoints.len(), t.keepalive)
        });
        (2 * self.limits.max_connections.get() as u64 + pending + pipes + idle)
            * self.cores.len() as u64
            + 64
    }

    /// The per-shard limits in effect, for the start-up log: the
    /// connection limit (which a default lowers to fit `RLIMIT_NOFILE`) and
    /// the transfer budget ([`crate::transfer`]).
    pub fn limits_line(&self) -> String {
        let transfers = match &self.mode {
            Mode::Forward if self.limits.splice_pipes > 0 => {
                format!("up to {} splice pipes", self.limits.splice_pipes)
            }
            Mode::Forward if self.splice_requested => {
                "no splice pipes (no spare file descriptors)".to_string()
            }
            Mode::Forward => "splicing off (--splice never)".to_string(),
            Mode::Entry(t) | Mode::Exit(t) => {
                let large = if t.large_chunks {
                    format!("large chunks for up to {} sessions", self.batch_buffers())
                } else {
                    "large chunks off".to_string()
                };
                let kept = match (&self.mode, t.keepalive) {
                    (_, 0) => "keep-alive tunnels off".to_string(),
                    (Mode::Exit(_), n) => format!(
                        "up to {n} idle keep-alive tunnels for {}",
                        crate::units::format_duration(t.tunnel_idle_timeout)
                    ),
                    (_, n) => format!(
                        "up to {n} idle keep-alive tunnels per exit for {}",
                        crate::units::format_duration(t.tunnel_idle_timeout)
                    ),
                };
                format!(
                    "up to {} batch buffers, {large}, {kept}",
                    self.batch_buffers()
                )
            }
        };
        format!(
            "per shard: --max-connections {}, {transfers}",
            self.limits.max_connections
        )
    }

    /// Batch buffers per shard for the tunnel roles' transfers (see
    /// [`crate::transfer`]): a quarter of `max_connections`, at least one;
    /// none for `forward`, which splices or copies.
    pub fn batch_buffers(&self) -> usize {
        match self.mode {
            Mode::Forward => 0,
            Mode::Entry(_) | Mode::Exit(_) => (self.limits.max_connections.get() / 4).max(1),
        }
    }

    /// One-line warnings about settings that are accepted but cannot do all
    /// that was asked: logged at start-up and printed by `check`.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let wildcard_v6 = matches!(self.listen, SocketAddr::V6(a) if a.ip().is_unspecified());
        if self.dual_stack && !wildcard_v6 {
            out.push(format!(
                "--dual-stack has no effect on {}: it only applies to an IPv6 wildcard address such as [::]:{}",
                self.listen,
                self.listen.port()
            ));
        }
        // As nginx's "low address bits of 10.1.2.3/8 are meaningless": the
        // operator may have meant the one address.
        let mut seen: Vec<ipnet::IpNet> = Vec::new();
        for net in self.identity.accept_proxy.iter().flat_map(|a| &a.trusted) {
            if seen.contains(&net.trunc()) {
                out.push(format!(
                    "--proxy-trusted-cidrs lists {} more than once",
                    net.trunc()
                ));
            }
            seen.push(net.trunc());
            if net.prefix_len() == 0 {
                out.push(format!(
                    "--proxy-trusted-cidrs {net} trusts every {} address: any such client can set the address it is logged and passed on as with a PROXY header; list the load balancers' addresses instead",
                    if net.addr().is_ipv4() { "IPv4" } else { "IPv6" }
                ));
            } else if *net != net.trunc() {
                out.push(format!(
                    "--proxy-trusted-cidrs {net} has host bits set: it trusts all of {} (write that, or /{} for the one address)",
                    net.trunc(),
                    net.max_prefix_len()
                ));
            }
        }
        if let Some((count, _)) = self.limits.wake_batch {
            let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
            if !kernel_at_least(&release, 6, 12) {
                out.push(format!(
                    "--wake-batch {count} needs Linux 6.12 or later (this kernel: {}): wake-ups are not coalesced",
                    release.trim()
                ));
            }
        }
        if let Some(max) = read_number("/proc/sys/net/core/somaxconn") {
            if u64::from(self.backlog) > max {
                out.push(format!(
                    "--backlog {} is above net.core.somaxconn ({max}): the kernel uses {max}; raise the sysctl (deploy/sysctl/) or lower --backlog",
                    self.backlog
                ));
            }
        }
        let fds = self.fds_needed();
        if let Some(limit) = fd_limit() {
            if fds > limit {
                out.push(format!(
                    "--max-connections {} on {} shards needs about {fds} file descriptors but the hard RLIMIT_NOFILE is {limit}: beyond it, accepts back off and a client whose upstream socket cannot be opened is reset; raise the hard `ulimit -n` (LimitNOFILE= in systemd) or lower --max-connections",
                    self.limits.max_connections,
                    self.cores.len()
                ));
            }
        }
        if matches!(self.mode, Mode::Forward)
            && self.limits.splice_pipes == 0
            && self.splice_requested
        {
            let mc = self.limits.max_connections.get() as u64;
            let with_pipes = (2 * mc + 2 * (mc / 4).max(1)) * self.cores.len() as u64 + 64;
            out.push(format!(
                "--splice auto (the default) has no spare file descriptors for pipes at --max-connections {} on {} shards: every connection copies; splicing needs a hard `ulimit -n` of about {with_pipes} (or a lower --max-connections); --splice never silences this",
                self.limits.max_connections,
                self.cores.len()
            ));
        }
        if let Some(t) = self.tunnel() {
            if let Some(asked) = t.keepalive_asked {
                out.push(format!(
                    "--tunnel-keepalive {asked} lowered to {}: idle tunnels may hold at most a quarter of each shard's file descriptors (hard RLIMIT_NOFILE {} on {} shards{}); raise the hard `ulimit -n` (LimitNOFILE= in systemd) or lower --tunnel-keepalive",
                    t.keepalive,
                    fd_limit().unwrap_or(0),
                    self.cores.len(),
                    if matches!(self.mode, Mode::Entry(_)) {
                        format!(", {} exit endpoint(s)", self.upstreams.endpoints.len())
                    } else {
                        String::new()
                    }
                ));
            }
            // Only an exit lowers it (its pending handshakes).
            if let Some(asked) = t.max_handshakes_asked {
                out.push(format!(
                    "--max-handshakes {asked} lowered to {}: pending handshakes (up to twice the limit in a burst) may hold at most a quarter of each shard's file descriptors (hard RLIMIT_NOFILE {} on {} shards); raise the hard `ulimit -n` (LimitNOFILE= in systemd) or lower --max-handshakes",
                    t.max_handshakes,
                    fd_limit().unwrap_or(0),
                    self.cores.len()
                ));
            }
        }
        for flag in &self.exit_only_given {
            out.push(format!(
                "{flag} has no effect on an entry: it applies to the hellos an exit accepts"
            ));
        }
        if self.tunnel().is_some() && self.splice_set {
            out.push(
                "--splice has no effect in the tunnel roles: entry and exit seal or open every byte"
                    .to_string(),
            );
        }
        if self.tunnel().is_some() && self.limits.buffer_size.get() > crate::proto::MAX_PAYLOAD {
            out.push(format!(
                "--buffer-size {} is above the tunnel's 16KiB chunk: entry and exit read at most 16KiB per chunk",
                ranges::Bytes(self.limits.buffer_size.get())
            ));
        }
        // Relay buffers at the connection limit, every shard full.
        let large = self.tunnel().is_some_and(|t| t.large_chunks);
        let per_conn = match self.mode {
            Mode::Forward => 2 * self.limits.buffer_size.get() as u64,
            // Two chunk buffers, and a share of the batch buffers (one per
            // four connections); with large chunks, another share for the
            // sessions that may receive them (`transfer::BatchPool`).
            Mode::Entry(_) | Mode::Exit(_) => {
                let batch = (crate::transfer::BATCH * crate::proto::MAX_FRAME) as u64;
                2 * crate::proto::MAX_FRAME as u64 + batch / 4 + if large { batch / 4 } else { 0 }
            }
        };
        let worst = per_conn
            .saturating_mul(self.limits.max_connections.get() as u64)
            .saturating_mul(self.cores.len() as u64);
        if let Some(total) = memory_limit() {
            if worst > total {
                out.push(format!(
                    "relay buffers at --max-connections would need {} MiB ({} per connection × {} connections × {} shards) but this process may use {} MiB (RAM, cgroup and RLIMIT_AS): lower --max-connections or --buffer-size{}",
                    worst >> 20,
                    ranges::Bytes(per_conn as usize),
                    self.limits.max_connections,
                    self.cores.len(),
                    total >> 20,
                    if large {
                        ", or set --large-chunks=false"
                    } else {
                        ""
                    }
                ));
            }
        }
        out
    }
}

/// The memory this process may use, in bytes: the least of the machine's
/// RAM, the cgroup v2 limit and RLIMIT_AS.
fn memory_limit() -> Option<u64> {
    let ram = read_meminfo_kib("MemTotal:").map(|k| k.saturating_mul(1024));
    let cgroup = read_number("/sys/fs/cgroup/memory.max");
    let rlimit = rlimit::Resource::AS
        .get()
        .ok()
        .map(|(soft, _)| soft)
        .filter(|&l| l != rlimit::INFINITY);
    [ram, cgroup, rlimit].into_iter().flatten().min()
}

/// `--max-connections` when it is not given: 10000 per shard, lowered so
/// that every shard at its limit fits in `fds` descriptors (two per
/// connection and a margin; HAProxy derives its default maxconn the same
/// way). At least 1.
pub fn default_max_connections(shards: usize, fds: Option<u64>) -> usize {
    default_max_connections_reserving(shards, fds, 0)
}

/// [`default_max_connections`] with `reserved` more descriptors per shard
/// set aside (the exit's pending handshakes, `--max-handshakes`).
pub fn default_max_connections_reserving(shards: usize, fds: Option<u64>, reserved: u64) -> usize {
    const DEFAULT: u64 = 10_000;
    let shards = shards.max(1) as u64;
    let fit = fds
        .map(|f| f.saturating_sub(64).saturating_sub(reserved * shards) / (2 * shards))
        .unwrap_or(DEFAULT);
    DEFAULT.min(fit).max(1) as usize
}

/// [`default_max_connections`] for `forward` with `--splice auto`: each
/// connection is counted at two and a half descriptors, its share of the
/// pipes [`splice_pipes`] allows (one per four connections, two
/// descriptors each), as HAProxy's automatic `maxconn` counts `maxpipes`.
pub fn default_max_connections_splicing(shards: usize, fds: Option<u64>) -> usize {
    const DEFAULT: u64 = 10_000;
    let shards = shards.max(1) as u64;
    let fit = fds
        .map(|f| f.saturating_sub(64).saturating_mul(2) / (5 * shards))
        .unwrap_or(DEFAULT);
    DEFAULT.min(fit).max(1) as usize
}

/// Pipes per shard for `--splice auto`: a quarter of `max_connections`
/// (HAProxy's `maxpipes` default), at least one, and no more than the
/// descriptors `fds` (the hard `RLIMIT_NOFILE`, if known) leave spare beyond
/// two per connection and a margin of 64: 0 when there are none, so pipes
/// never take a connection's descriptors.
pub fn splice_pipes(max_connections: usize, shards: usize, fds: Option<u64>) -> usize {
    let shards = shards.max(1) as u64;
    let want = (max_connections as u64 / 4).max(1);
    let spare = fds.map_or(want, |f| {
        f.saturating_sub(64)
            .saturating_sub(2 * max_connections as u64 * shards)
            / (2 * shards)
    });
    want.min(spare) as usize
}

/// The file descriptors this process may open: the hard RLIMIT_NOFILE,
/// since start-up raises the soft limit to what the config needs
/// ([`Config::fds_needed`]).
fn fd_limit() -> Option<u64> {
    rlimit::Resource::NOFILE.get().ok().map(|(_, hard)| hard)
}

/// Whether a kernel release string (`/proc/sys/kernel/osrelease`, e.g.
/// `6.12.3-arch1`) is at least `major.minor`. An unreadable one is not.
fn kernel_at_least(release: &str, major: u32, minor: u32) -> bool {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let mut next = || parts.next().and_then(|p| p.parse::<u32>().ok());
    match (next(), next()) {
        (Some(a), Some(b)) => (a, b) >= (major, minor),
        _ => false,
    }
}

fn read_number(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn read_meminfo_kib(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

impl Config {
    /// Validates an `entry` (`exit == false`) or `exit` command line, loading
    /// the key file. Returns the config and, if the key file's mode is too
    /// open, a warning.
    pub fn tunnel_role(
        exit: bool,
        args: &TunnelArgs,
        allowed_cores: &[usize],
    ) -> Result<(Config, Option<String>), ConfigError> {
        // Flags of another role first: the advice of a later error (such as
        // "--accept-proxy needs --proxy-trusted-cidrs") would be wrong.
        let p = &args.proxy;
        if exit
            && (p.accept_proxy
                || p.proxy_trusted_cidrs.is_some()
                || p.proxy_header_timeout.is_some())
        {
            return Err(ConfigError::NotForRole {
                flag: if p.accept_proxy {
                    "--accept-proxy"
                } else if p.proxy_trusted_cidrs.is_some() {
                    "--proxy-trusted-cidrs"
                } else {
                    "--proxy-header-timeout"
                },
                roles: "forward and entry (an exit's clients are entries; the entry carries the client's address in the tunnel)",
            });
        }
        if !exit && p.send_proxy_v2 {
            return Err(ConfigError::NotForRole {
                flag: "--send-proxy-v2",
                roles: "forward and exit (the entry carries the client's address to the exit inside the tunnel)",
            });
        }
        // The shared flags are checked first, as for `forward`.
        let mut cfg = Config::from_args(Mode::Forward, &args.proxy, allowed_cores)?;
        let (keys, warning) = load_key_file(&args.key_file)?;
        let mut tunnel = TunnelConfig {
            key_file: args.key_file.clone(),
            keys,
            handshake_timeout: ranges::HANDSHAKE_TIMEOUT.check(args.handshake_timeout)?,
            max_clock_skew: ranges::MAX_CLOCK_SKEW
                .check(args.max_clock_skew.unwrap_or(DEFAULT_MAX_CLOCK_SKEW))?,
            max_handshakes: ranges::MAX_HANDSHAKES
                .check_count(args.max_handshakes.unwrap_or(DEFAULT_MAX_HANDSHAKES))?,
            large_chunks: args.large_chunks,
            keepalive: ranges::TUNNEL_KEEPALIVE.check_count(args.tunnel_keepalive.unwrap_or(
                if exit {
                    DEFAULT_EXIT_KEEPALIVE
                } else {
                    DEFAULT_ENTRY_KEEPALIVE
                },
            ))?,
            tunnel_idle_timeout: ranges::TUNNEL_IDLE_TIMEOUT.check(args.tunnel_idle_timeout)?,
            keepalive_asked: None,
            max_handshakes_asked: None,
        };
        // Idle tunnels hold descriptors apart from --max-connections: at
        // most a quarter of each shard's, so that a large setting cannot
        // starve the sessions (the default --max-connections fits the rest).
        let endpoints = cfg.upstreams.endpoints.len();
        if let Some(limit) = fd_limit() {
            let budget = limit.saturating_sub(64) / cfg.cores.len().max(1) as u64 / 4;
            let per = idle_tunnel_fds(exit, endpoints, 1).max(1);
            let fit = usize::try_from(budget / per).unwrap_or(usize::MAX);
            if tunnel.keepalive > fit {
                tunnel.keepalive_asked = Some(tunnel.keepalive);
                tunnel.keepalive = fit;
            }
            // The exit's pending handshakes likewise (a burst may reach
            // twice the limit, a descriptor each): without this, a small
            // `ulimit -n` left 1024 of them free to take every descriptor,
            // so that a flood of silent peers ended in failed accepts
            // rather than in the oldest handshake being closed.
            let fit = usize::try_from(budget / 2).unwrap_or(usize::MAX).max(1);
            if exit && tunnel.max_handshakes > fit {
                tunnel.max_handshakes_asked = Some(tunnel.max_handshakes);
                tunnel.max_handshakes = fit;
            }
        }
        // Settings of the exit's handshakes, given to an entry (say, in a
        // config file shared by both roles): checked, then a warning.
        if !exit {
            let given = [
                (args.max_handshakes.is_some(), "--max-handshakes"),
                (args.max_clock_skew.is_some(), "--max-clock-skew"),
            ];
            cfg.exit_only_given = given.iter().filter(|g| g.0).map(|g| g.1).collect();
        }
        // The tunnel roles transform every byte: no pipes.
        cfg.limits.splice_pipes = 0;
        if args.proxy.max_connections.is_none() {
            // The exit's pending handshakes need descriptors of their own,
            // and so do idle keep-alive tunnels (both roles).
            let idle = idle_tunnel_fds(exit, cfg.upstreams.endpoints.len(), tunnel.keepalive);
            let reserved = if exit {
                2 * tunnel.max_handshakes as u64 + idle
            } else {
                idle
            };
            let fit = default_max_connections_reserving(cfg.cores.len(), fd_limit(), reserved);
            cfg.limits.max_connections = NonZeroUsize::new(fit).unwrap_or(NonZeroUsize::MIN);
        }
        cfg.mode = if exit {
            Mode::Exit(tunnel)
        } else {
            Mode::Entry(tunnel)
        };
        Ok((cfg, warning))
    }
}

/// `--access-log`: `-`, an existing file (or FIFO) this process can open
/// for appending, or a new file in an existing directory. Checked here so
/// that `check` and start-up agree; start-up opens it once more.
/// The longest file name (one path component) Linux file systems take,
/// in bytes (`NAME_MAX`).
const NAME_MAX: usize = 255;
/// The longest path Linux takes, in bytes, without the terminating NUL
/// (`PATH_MAX` is 4096 with it).
const PATH_MAX: usize = 4095;

fn access_log_path(path: &str) -> Result<String, ConfigError> {
    // A path too long to be one is named by its start, so that the reason
    // still fits the one capped error line.
    let shown = if path.len() > 120 {
        let mut cut = 100;
        while !path.is_char_boundary(cut) {
            cut -= 1;
        }
        format!(
            "{}… ({} bytes)",
            crate::log::one_line(&path[..cut]),
            path.len()
        )
    } else {
        crate::log::one_line(path).into_owned()
    };
    let bad = |reason: String| ConfigError::BadAccessLog(shown.clone(), reason);
    if path == "-" {
        return Ok(path.to_string());
    }
    if path.is_empty() {
        return Err(bad("empty path (use - for stderr)".into()));
    }
    if path.contains('\0') {
        return Err(bad("a path cannot contain a NUL byte".into()));
    }
    if path.len() > PATH_MAX {
        return Err(bad(format!(
            "{} bytes long; a Linux path is at most {PATH_MAX}",
            path.len()
        )));
    }
    if path.ends_with('/') {
        return Err(bad(
            "a directory's path (it ends in /); give the log file's path".into(),
        ));
    }
    if std::path::Path::new(path).exists() {
        crate::access_log::open_file(path).map_err(|e| bad(e.to_string()))?;
    } else {
        // What creating it at start-up would meet, found without creating
        // it (`check` passed what `run` then failed on). A dangling link is
        // followed: the file is created where it points.
        let mut p = std::path::PathBuf::from(path);
        if let Ok(target) = std::fs::read_link(&p) {
            let base = p
                .parent()
                .map(std::path::Path::to_path_buf)
                .unwrap_or_default();
            p = base.join(target);
        }
        directory_exists(&p).map_err(bad)?;
        use std::os::unix::ffi::OsStrExt;
        if p.file_name().is_some_and(|n| n.as_bytes().len() > NAME_MAX) {
            return Err(bad(format!(
                "the file name is longer than {NAME_MAX} bytes, the most a Linux file system takes"
            )));
        }
        may_create_in(&p).map_err(bad)?;
    }
    Ok(path.to_string())
}

/// `Ok` if this process may create a file at `path` (in a directory that
/// exists: see [`directory_exists`]), else the reason.
fn may_create_in(path: &std::path::Path) -> Result<(), String> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    crate::sys::may_create_in(dir)
        .map_err(|e| format!("cannot create a file in {}: {e}", dir.display()))
}

/// `Ok` if the directory a new file at `path` would go in exists (the
/// current one for a bare name), else the reason.
fn directory_exists(path: &std::path::Path) -> Result<(), String> {
    let parent = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    if parent.is_dir() {
        Ok(())
    } else {
        Err(format!("directory {} does not exist", parent.display()))
    }
}

/// `--control-socket`: a path a Unix socket can be bound at, so that
/// `check` finds what start-up would (which binds it, replacing a stale
/// socket, in `handover::bind_control`).
fn control_socket_path(path: &str) -> Result<std::path::PathBuf, ConfigError> {
    let bad = |reason: String| {
        ConfigError::BadControlSocket(format!("`{}`", crate::log::one_line(path)), reason)
    };
    unix_socket_path(path).map_err(bad)?;
    let p = std::path::Path::new(path);
    match existing_socket(p) {
        Some(Err(why)) => return Err(bad(why.into())),
        Some(Ok(())) => {}
        None => {
            directory_exists(p).map_err(bad)?;
            may_create_in(p).map_err(bad)?;
        }
    }
    Ok(p.to_path_buf())
}

/// What is at a control socket's `path`: `None` if nothing, `Some(Ok)` if
/// a socket (live or stale), else why it cannot be one. Shared by `check`
/// and the bind at start-up (`handover::bind_control`), so both say the
/// same.
pub fn existing_socket(path: &std::path::Path) -> Option<Result<(), &'static str>> {
    use std::os::unix::fs::FileTypeExt;
    let kind = std::fs::symlink_metadata(path).ok()?.file_type();
    Some(if kind.is_symlink() {
        Err("the path is a symbolic link; give the socket's own path")
    } else if !kind.is_socket() {
        Err("the path exists and is not a socket")
    } else {
        Ok(())
    })
}

/// What any Unix socket path must be: not empty, no NUL byte, and at most
/// 107 bytes (`sockaddr_un`'s `sun_path` holds 108 with the terminating NUL).
fn unix_socket_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("empty path".into());
    }
    if path.contains('\0') {
        return Err("a path cannot contain a NUL byte".into());
    }
    if path.len() > 107 {
        return Err(format!(
            "{} bytes long; a Unix socket path holds at most 107",
            path.len()
        ));
    }
    Ok(())
}

/// `--takeover`: the predecessor's control socket. Only its form is checked
/// here (`check` runs while the predecessor may not); start-up connects.
fn takeover_path(path: &str) -> Result<std::path::PathBuf, ConfigError> {
    unix_socket_path(path).map_err(|reason| {
        ConfigError::BadTakeover(format!("`{}`", crate::log::one_line(path)), reason)
    })?;
    Ok(path.into())
}

/// `--accept-proxy` and its settings, validated.
fn accept_proxy(args: &ProxyArgs) -> Result<Option<AcceptProxy>, ConfigError> {
    if !args.accept_proxy {
        // Settings of a feature that is off are a mistake, not a no-op.
        if args.proxy_trusted_cidrs.is_some() {
            return Err(ConfigError::Needs {
                flag: "--proxy-trusted-cidrs",
                needs: "--accept-proxy",
            });
        }
        if args.proxy_header_timeout.is_some() {
            return Err(ConfigError::Needs {
                flag: "--proxy-header-timeout",
                needs: "--accept-proxy",
            });
        }
        return Ok(None);
    }
    let list = args
        .proxy_trusted_cidrs
        .as_deref()
        .ok_or(ConfigError::NoTrustedCidrs)?;
    let mut trusted = Vec::new();
    // An empty entry (`10.0.0.0/8,,x`, a stray comma) is an error like any
    // other bad one: it most likely lost the address meant there.
    for entry in list.split(',').map(str::trim) {
        let net = entry
            .parse::<ipnet::IpNet>()
            .or_else(|_| entry.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            .map_err(|_| ConfigError::BadCidr(crate::log::one_line(entry).into_owned()))?;
        trusted.push(net);
    }
    if trusted.is_empty() {
        return Err(ConfigError::NoTrustedCidrs);
    }
    Ok(Some(AcceptProxy {
        trusted,
        timeout: ranges::PROXY_HEADER_TIMEOUT
            .check(args.proxy_header_timeout.unwrap_or(Duration::from_secs(5)))?,
    }))
}

/// Whether two listening addresses would share connections: the same
/// (non-zero) port on the same address, or with either one a wildcard.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    // `[::ffff:127.0.0.1]` is 127.0.0.1: compare the canonical forms.
    let (x, y) = (a.ip().to_canonical(), b.ip().to_canonical());
    a.port() != 0 && a.port() == b.port() && (x == y || x.is_unspecified() || y.is_unspecified())
}

/// The `--upstream` pool and its settings, validated and resolved (every
/// A/AAAA record of a hostname is an endpoint).
fn upstreams(args: &ProxyArgs) -> Result<crate::upstream::Upstreams, ConfigError> {
    use crate::upstream::{Balance, HealthCheck, UpstreamSpec, Upstreams, MAX_ENDPOINTS};
    let mut specs = Vec::with_capacity(args.upstream.len());
    for text in &args.upstream {
        let spec = UpstreamSpec::parse(text).map_err(|why| {
            ConfigError::BadUpstream(crate::log::one_line(text).into_owned(), why)
        })?;
        // Each configured upstream is one metrics label value.
        if specs.iter().any(|s: &UpstreamSpec| s.name == spec.name) {
            return Err(ConfigError::BadUpstream(
                crate::log::one_line(&spec.name).into_owned(),
                "given twice (give it once, with a weight if it should get more)".into(),
            ));
        }
        specs.push(spec);
    }
    let endpoints = crate::upstream::resolve_all(&specs).map_err(|(i, why)| {
        if why.starts_with("port 0") {
            ConfigError::UpstreamPortZero(specs[i].name.clone())
        } else {
            ConfigError::BadUpstream(crate::log::one_line(&specs[i].name).into_owned(), why)
        }
    })?;
    if endpoints.len() > MAX_ENDPOINTS {
        // Named by its first entry: the whole list would be a line of
        // kilobytes that reads as one value.
        let first = crate::log::one_line(&specs[0].name).into_owned();
        let others = match specs.len() {
            1 => String::new(),
            n => format!("with the other {} ", n - 1),
        };
        return Err(ConfigError::BadUpstream(
            first,
            format!(
                "{others}gives {} endpoints, more than {MAX_ENDPOINTS}",
                endpoints.len()
            ),
        ));
    }
    // Checked whether or not checks are on: a bad value is a mistake either way.
    let fails = ranges::HEALTH_CHECK_FAILS.check_count(args.health_check_fails)?;
    let passes = ranges::HEALTH_CHECK_PASSES.check_count(args.health_check_passes)?;
    let health = match args.health_check_interval {
        None => None,
        Some(interval) => Some(HealthCheck {
            interval: ranges::HEALTH_CHECK_INTERVAL.check(interval)?,
            fails,
            passes,
        }),
    };
    Ok(Upstreams {
        specs,
        endpoints,
        balance: Balance::parse(&args.balance).unwrap_or(Balance::RandomTwo),
        connect_attempts: ranges::CONNECT_ATTEMPTS.check_count(args.connect_attempts)?,
        max_fails: ranges::MAX_FAILS.check_count(args.max_fails)?,
        fail_timeout: ranges::FAIL_TIMEOUT.check(args.fail_timeout)?,
        health,
        dns_refresh: ranges::DNS_REFRESH.check(args.dns_refresh)?,
    })
}

/// Picks the cores: all allowed ones, the first N, or an explicit list.
pub fn select_cores(
    count: Option<i64>,
    list: Option<&str>,
    allowed: &[usize],
) -> Result<Vec<usize>, ConfigError> {
    if allowed.is_empty() {
        return Err(ConfigError::NoCores);
    }
    match (count, list) {
        (Some(n), _) if n < 1 => Err(ConfigError::ZeroCores(n)),
        (Some(n), _) => match usize::try_from(n) {
            Ok(n) if n <= allowed.len() => Ok(allowed[..n].to_vec()),
            _ => Err(ConfigError::TooManyCores {
                asked: n,
                available: allowed.len(),
            }),
        },
        (None, Some(list)) => {
            let cores = parse_cpu_list(list)?;
            for &core in &cores {
                if !allowed.contains(&core) {
                    return Err(ConfigError::CoreNotAllowed {
                        core,
                        allowed: format_cpu_list(allowed),
                    });
                }
            }
            Ok(cores)
        }
        (None, None) => Ok(allowed.to_vec()),
    }
}

/// Parses `0,2-5` into `[0, 2, 3, 4, 5]`: sorted, without duplicates.
pub fn parse_cpu_list(text: &str) -> Result<Vec<usize>, ConfigError> {
    let bad = || ConfigError::BadCpuList(text.to_string());
    let mut cores = Vec::new();
    for part in text.split(',') {
        let part = part.trim();
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (lo.trim(), hi.trim()),
            None => (part, part),
        };
        let number = |t: &str| {
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            t.parse::<usize>().map_err(|_| bad())
        };
        let (lo, hi) = (number(lo)?, number(hi)?);
        // 4096 is the kernel's CONFIG_NR_CPUS ceiling; it bounds the range.
        if lo > hi || hi >= 4096 {
            return Err(bad());
        }
        cores.extend(lo..=hi);
    }
    cores.sort_unstable();
    cores.dedup();
    Ok(cores)
}

/// Formats cores as a compact list, e.g. `0-3,6`.
pub fn format_cpu_list(cores: &[usize]) -> String {
    let mut sorted = cores.to_vec();
    sorted.sort_unstable();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    out.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_compare_by_major_then_minor() {
        assert!(kernel_at_least("6.12.0", 6, 12));
        assert!(kernel_at_least("6.18.44-fc-v769\n", 6, 12));
        assert!(kernel_at_least("7.0-rc1", 6, 12));
        assert!(!kernel_at_least("6.11.9", 6, 12));
        assert!(!kernel_at_least("5.19.17-generic", 6, 12));
        assert!(!kernel_at_least("", 6, 12));
        assert!(!kernel_at_least("garbage", 6, 12));
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0,2-5").unwrap(), vec![0, 2, 3, 4, 5]);
        assert_eq!(parse_cpu_list("3,1,1").unwrap(), vec![1, 3]);
        for bad in ["", "a", "3-1", "1-", "0,,1", "99999", "+1", "1-+2"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad}");
        }
        assert_eq!(format_cpu_list(&[0, 1, 2, 3, 6]), "0-3,6");
    }

    #[test]
    fn core_selection() {
        let allowed = [0, 1];
        assert_eq!(select_cores(None, None, &allowed).unwrap(), vec![0, 1]);
        assert_eq!(select_cores(Some(1), None, &allowed).unwrap(), vec![0]);
        assert_eq!(
            select_cores(Some(3), None, &allowed),
            Err(ConfigError::TooManyCores {
                asked: 3,
                available: 2
            })
        );
        assert_eq!(
            select_cores(Some(0), None, &allowed),
            Err(ConfigError::ZeroCores(0))
        );
        assert_eq!(
            select_cores(Some(-1), None, &allowed)
                .unwrap_err()
                .to_string(),
            "--cores -1 is out of range: must be at least 1"
        );
        assert!(matches!(
            select_cores(None, Some("0,7"), &allowed),
            Err(ConfigError::CoreNotAllowed { core: 7, .. })
        ));
        assert_eq!(select_cores(None, Some("1"), &allowed).unwrap(), vec![1]);
    }

    #[test]
    fn looped_upstreams_are_seen() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let is_loop = |l, u| crate::upstream::loops_to(l, u, false);
        assert!(is_loop(a("127.0.0.1:80"), a("127.0.0.1:80")));
        assert!(is_loop(a("0.0.0.0:80"), a("127.0.0.1:80")));
        assert!(is_loop(a("[::]:80"), a("[::1]:80")));
        assert!(!is_loop(a("127.0.0.1:80"), a("127.0.0.1:81")));
        assert!(!is_loop(a("127.0.0.1:80"), a("127.0.0.2:80")));
        // Port 0 is a fresh port: never the upstream (which is rejected anyway).
        assert!(!is_loop(a("127.0.0.1:0"), a("127.0.0.1:9")));
        // A connect to the unspecified address goes to loopback (found by
        // a break-it round: one client filled the shard with its loop).
        assert!(is_loop(a("127.0.0.1:80"), a("0.0.0.0:80")));
        assert!(is_loop(a("0.0.0.0:80"), a("0.0.0.0:80")));
        assert!(is_loop(a("[::1]:80"), a("[::]:80")));
        assert!(!is_loop(a("127.0.0.2:80"), a("0.0.0.0:80")));
        // An IPv6 wildcard takes IPv4 clients only with --dual-stack.
        assert!(!is_loop(a("[::]:80"), a("127.0.0.1:80")));
        assert!(!is_loop(a("[::]:80"), a("0.0.0.0:80")));
        assert!(crate::upstream::loops_to(
            a("[::]:80"),
            a("127.0.0.1:80"),
            true
        ));
        assert!(crate::upstream::loops_to(
            a("[::]:80"),
            a("[::ffff:127.0.0.1]:80"),
            true
        ));
        assert!(!is_loop(a("0.0.0.0:80"), a("[::1]:80")));
        // A wildcard takes this host's other addresses too; not others'
        // (an address this host has not: one no socket binds to).
        let other = a("198.51.100.254:80");
        if std::net::UdpSocket::bind((other.ip(), 0)).is_err() {
            assert!(!is_loop(a("0.0.0.0:80"), other));
        }
    }

    #[test]
    fn default_connections_fit_the_fd_limit() {
        assert_eq!(default_max_connections(2, None), 10_000);
        assert_eq!(default_max_connections(2, Some(1 << 20)), 10_000);
        assert_eq!(default_max_connections(2, Some(20_000)), 4_984);
        assert_eq!(default_max_connections(4, Some(1024)), 120);
        assert_eq!(default_max_connections(8, Some(10)), 1);
        // forward with --splice auto: 2.5 descriptors per connection, and
        // the pipes fit in what is left.
        assert_eq!(default_max_connections_splicing(1, Some(20_000)), 7_974);
        let (conns, pipes) = (
            default_max_connections_splicing(1, Some(20_000)),
            splice_pipes(7_974, 1, Some(20_000)),
        );
        assert_eq!(pipes, 1_993);
        assert!(2 * conns + 2 * pipes + 64 <= 20_000, "{conns} {pipes}");
        assert_eq!(default_max_connections_splicing(2, None), 10_000);
        assert_eq!(splice_pipes(10_000, 2, None), 2_500);
        // An explicit --max-connections that uses every descriptor: no pipes.
        assert_eq!(splice_pipes(9_968, 1, Some(20_000)), 0);
        assert_eq!(splice_pipes(3, 1, None), 1, "at least one");
        // An exit sets 1024 descriptors per shard aside for handshakes.
        assert_eq!(
            default_max_connections_reserving(2, Some(20_000), 1024),
            4_472
        );
    }

    #[test]
    fn addresses() {
        use crate::upstream::UpstreamSpec;
        let port = |t: &str| UpstreamSpec::parse(t).unwrap().resolve().unwrap()[0].port();
        assert_eq!(port("127.0.0.1:80"), 80);
        assert_eq!(port("localhost:81"), 81);
        assert!(UpstreamSpec::parse("nocolon").is_err());
        let msg = ConfigError::BadListen("x".into(), "y".into()).to_string();
        assert!(!msg.contains('\n'));
    }

    /// IPv6 zones (RFC 4007 §11) by index and by interface name, for
    /// `--listen`, `--metrics-listen` and literal `--upstream`s.
    #[test]
    fn zoned_addresses() {
        use crate::upstream::UpstreamSpec;
        let lo = crate::sys::interface_index("lo").expect("a loopback interface");
        let scope = |t: &str| match crate::units::parse_socket_addr(t) {
            Ok(SocketAddr::V6(a)) => a.scope_id(),
            other => panic!("{t}: {other:?}"),
        };
        assert_eq!(scope("[fe80::1%lo]:80"), lo);
        assert_eq!(scope("[fe80::1%7]:80"), 7);
        assert_eq!(scope("[::1]:80"), 0);
        let missing = crate::units::parse_socket_addr("[fe80::1%sp-nosuch0]:80")
            .unwrap_err()
            .unwrap();
        assert!(
            missing.contains("no network interface `sp-nosuch0`"),
            "{missing}"
        );
        for bad in [
            "x",
            "[fe80::1%lo]",
            "[fe80::1%lo]:99999",
            "[nope%lo]:80",
            "1.2.3.4%lo:80",
        ] {
            assert_eq!(crate::units::parse_socket_addr(bad), Err(None), "{bad}");
        }
        let spec = UpstreamSpec::parse("[fe80::1%lo]:80").unwrap();
        match spec.resolve().unwrap()[..] {
            [SocketAddr::V6(a)] => assert_eq!((a.scope_id(), a.port()), (lo, 80)),
            ref other => panic!("{other:?}"),
        }
        let err = UpstreamSpec::parse("[fe80::1%sp-nosuch0]:80")
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(err.contains("no network interface"), "{err}");
    }
}
