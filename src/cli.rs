//! The command line, as clap derive structs and nothing else.
//!
//! Validation that needs more than one flag, or the machine (cores, DNS),
//! lives in [`crate::config`], which turns these structs into validated types.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::units::{parse_count, parse_duration, parse_size};

/// A thread-per-core, sharded TCP proxy: one pinned io_uring executor per core.
#[derive(Debug, Parser)]
#[command(name = "shardproxy", version, about, propagate_version = true)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The roles and tools.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Plain TCP relay: accept clients, connect upstream, pipe bytes both ways.
    Forward(ProxyArgs),
    /// Client side of the tunnel: plain TCP in, encrypted tunnel out to an exit.
    Entry(TunnelArgs),
    /// Server side of the tunnel: encrypted tunnel in, plain TCP out to the origin.
    Exit(TunnelArgs),
    /// Write a fresh random pre-shared key (base64) to stdout or a file.
    Keygen(KeygenArgs),
    /// Print latency percentiles scraped from a running instance's metrics endpoint.
    Stats(StatsArgs),
    /// Run the role named by `role = ...` in a TOML config file; any of the role's flags given after it override the file (`run --config F --idle-timeout 1s`).
    Run(ConfigArgs),
    /// Validate a config file (and its key file) without binding anything; exit 0 or 2. Flags of the role given after it override the file, as for run (`check --config F --key-file K`).
    Check(CheckArgs),
    /// Start a loopback demo: origin, exit and entry, with a fresh key.
    Demo(DemoArgs),
}

/// Flags shared by every proxy role.
#[derive(Debug, Clone, Args)]
pub struct ProxyArgs {
    /// TOML file with any of these settings (keys are the flag names with `_`); flags given here override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<String>,

    /// Address to listen on, e.g. 0.0.0.0:8000 or [::]:8000 (every shard binds it with SO_REUSEPORT).
    #[arg(long, value_name = "ADDR")]
    pub listen: String,

    /// Where to connect for each client: HOST:PORT, optionally followed by ` weight=N` (1-1000). Give it several times for a pool; a hostname stands for all its A/AAAA records and is re-resolved every --dns-refresh.
    #[arg(long, value_name = "HOST:PORT", required = true, action = clap::ArgAction::Append)]
    pub upstream: Vec<String>,
    /// How each shard picks an endpoint: round-robin (weighted), least-connections (counted per shard), random-two (power of two choices) or source-hash (client IP).
    #[arg(long, value_name = "POLICY", default_value = "random-two", value_parser = ["round-robin", "least-connections", "random-two", "source-hash"])]
    pub balance: String,
    /// Endpoints tried per client before it is reset (close reason no_upstream): a failed or timed-out connect, or (entry) a failed tunnel handshake, moves on to another endpoint; each endpoint is tried at most once per client (1-10).
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = parse_count)]
    pub connect_attempts: i64,
    /// Consecutive failed attempts that eject an endpoint from a shard's rotation (1-100).
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = parse_count)]
    pub max_fails: i64,
    /// How long an endpoint stays ejected the first time; each further ejection in a row doubles it, up to 32 times this (1s-1h).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub fail_timeout: Duration,
    /// Probe every endpoint this often (a TCP connect; an entry does a full tunnel handshake), from one thread per process; off by default (1s-1h).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub health_check_interval: Option<Duration>,
    /// Consecutive failed probes before an endpoint is marked down (1-100).
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = parse_count)]
    pub health_check_fails: i64,
    /// Consecutive passed probes before a down endpoint is marked up (1-100).
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = parse_count)]
    pub health_check_passes: i64,
    /// Resolve upstream hostnames again this often, off the shards' threads; a failed lookup keeps the last good endpoints (1s-24h).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub dns_refresh: Duration,

    /// Run this many shards, on the first N cores this process may use (1 to the number of those cores) [default: all of them].
    #[arg(long, value_name = "N", conflicts_with = "cpu_list", value_parser = parse_count)]
    pub cores: Option<i64>,

    /// Run one shard on each listed core, e.g. 0,2-5 (must be within this process's CPU mask).
    #[arg(long, value_name = "LIST")]
    pub cpu_list: Option<String>,

    /// Listen backlog for each shard's socket (1-65535; the kernel caps it at net.core.somaxconn).
    #[arg(long, value_name = "N", default_value_t = 4096, value_parser = parse_count)]
    pub backlog: i64,

    /// Wake-up coalescing, while a shard's bulk transfers are moving (directions whose reads filled the buffer: what forward splices and entry/exit batch): as long as events keep arriving within --wake-batch-wait, the shard sleeps until up to this many are ready (the number adapts to the rate), or --wake-batch-wait has passed, instead of waking for each. Fewer wake-ups and context switches per GB; events may wait up to --wake-batch-wait meanwhile. After a quiet spell the shard wakes at the first event, and while no transfer moves it never waits. 1 turns it off. Needs Linux 6.12 (off on older kernels) (1-256).
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = parse_count)]
    pub wake_batch: i64,

    /// The longest a shard holds a wake-up back under --wake-batch, e.g. 100us (1us-1ms).
    #[arg(long, value_name = "DURATION", default_value = "100us", value_parser = parse_duration)]
    pub wake_batch_wait: Duration,

    /// Relay buffer per direction per connection. forward: memory per connection is twice this. entry/exit: each direction always holds one full 16 KiB chunk (16402 B), and this caps the plaintext read per chunk (at most 16KiB). Range 1KiB-16MiB.
    #[arg(long, value_name = "SIZE", default_value = "16KiB", value_parser = parse_size)]
    pub buffer_size: usize,

    /// forward: move a transfer's bytes socket → pipe → socket with splice(2), never copying them through user space: `auto` switches a direction to splice once a read fills --buffer-size (a transfer, not a request), with at most a quarter of --max-connections pipes per shard, and only as file descriptors allow; `never` always copies. The tunnel roles seal or open every byte and never splice [default: auto].
    #[arg(long, value_name = "MODE", value_parser = ["auto", "never"])]
    pub splice: Option<String>,

    /// Give up connecting upstream after this long, e.g. 5s (10ms-10m).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Close a connection after this long with no bytes in either direction (100ms-168h).
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// On SIGTERM/SIGINT, let live connections finish for this long, then abort them (0s-1h).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// On SIGTERM/SIGINT, answer /healthz with 503 for this long before the listeners stop accepting, so load balancers stop sending first (0s-5m).
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
    pub drain_delay: Duration,

    /// How long this process waits for a successor (--takeover, or a re-exec on SIGUSR2) to say it is ready once it holds the listeners; then it gives up, serves on, and tells the successor, which finishes what it accepted and exits (1s-10m).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub handover_timeout: Duration,

    /// Unix socket on which this process hands its listening sockets to a successor (`--takeover`, or a re-exec on SIGUSR2); off by default.
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<String>,

    /// Start by taking the listening sockets over from the shardproxy serving this control socket, then let it drain: an upgrade or a core-count change that drops no connection.
    #[arg(long, value_name = "PATH")]
    pub takeover: Option<String>,

    /// Connections per shard; at the limit the shard stops accepting until one closes (1-1000000) [default: 10000, lowered to fit RLIMIT_NOFILE].
    #[arg(long, value_name = "N", value_parser = parse_count)]
    pub max_connections: Option<i64>,

    /// With an IPv6 listen address such as [::]:8000, accept IPv4 clients too (IPV6_V6ONLY off); --dual-stack=false turns a config file's setting off.
    #[arg(long, num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub dual_stack: bool,

    /// Serve /metrics (Prometheus), /histograms (HDR), /healthz (readiness) and /livez (liveness) on this address; off by default.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,

    /// How often each shard publishes its counters and histograms for scrapes (100ms-60s).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub metrics_interval: Duration,
    /// forward, entry: read a PROXY protocol header (v1 or v2, e.g. from a load balancer) at the start of each connection and use its client address; peers outside --proxy-trusted-cidrs and connections without a valid header are closed (close reason bad_proxy_header). --accept-proxy=false turns a config file's setting off.
    #[arg(long, num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub accept_proxy: bool,
    /// With --accept-proxy: the peers allowed to send a PROXY header, as a comma-separated list of CIDRs or addresses, e.g. 10.0.0.0/8,192.0.2.7 (required with --accept-proxy).
    #[arg(long, value_name = "CIDRS")]
    pub proxy_trusted_cidrs: Option<String>,
    /// With --accept-proxy: close a connection whose PROXY header is not complete this long after accept (100ms-60s) [default: 5s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub proxy_header_timeout: Option<Duration>,
    /// forward, exit: send a PROXY protocol v2 header first on each upstream connection, with the original client's address and the connection ID (TLV 0xE0). --send-proxy-v2=false turns a config file's setting off.
    #[arg(long, num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub send_proxy_v2: bool,
    /// Write one line per connection, when it closes, to this file (`-` for stderr); off by default. The file is reopened on SIGUSR1 (for logrotate).
    #[arg(long, value_name = "PATH")]
    pub access_log: Option<String>,
    /// Access-log line format.
    #[arg(long, value_name = "FORMAT", default_value = "json", value_parser = ["json", "logfmt"])]
    pub access_log_format: String,
    /// Also write an access-log line for each live connection this often, e.g. 1m (1s-24h); off by default.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub access_log_interval: Option<Duration>,
    /// Process log: the least severe level written.
    #[arg(long, value_name = "LEVEL", default_value = "info", value_parser = ["error", "warn", "info", "debug"])]
    pub log_level: String,
    /// Process log line format (lines start with an RFC 3339 UTC timestamp in both).
    #[arg(long, value_name = "FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

/// Flags of `run` and `check`.
#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    /// The TOML config file (see docs/CONFIG.md).
    #[arg(long, value_name = "FILE")]
    pub config: String,
}

/// Flags of `check`.
#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// The TOML config file (see docs/CONFIG.md).
    #[arg(long, value_name = "FILE")]
    pub config: String,

    /// Any of the role's flags, overriding the file as they would for `run`.
    #[arg(
        value_name = "FLAGS",
        trailing_var_arg = true,
        allow_hyphen_values = true,
        num_args = 0..
    )]
    pub overrides: Vec<String>,
}

/// Flags of the `stats` subcommand.
#[derive(Debug, Clone, Args)]
pub struct StatsArgs {
    /// The instance's metrics endpoint, e.g. http://127.0.0.1:9100.
    #[arg(long, value_name = "URL")]
    pub from: String,

    /// Also print one row per shard.
    #[arg(long)]
    pub per_shard: bool,
}

/// Flags of the `entry` and `exit` roles.
#[derive(Debug, Clone, Args)]
pub struct TunnelArgs {
    /// Core proxy flags.
    #[command(flatten)]
    pub proxy: ProxyArgs,

    /// Key file: base64 32-byte keys, one per line, `#` comments allowed. The entry uses the first; the exit accepts any (rotation). SIGHUP reloads it.
    #[arg(long, value_name = "FILE")]
    pub key_file: String,

    /// Close a tunnel whose handshake has not completed within this time (100ms-5m).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// exit: unauthenticated connections (pending handshakes) per shard, counted apart from --max-connections; past it the oldest pending one is closed (1-1000000). No effect on an entry (a warning) [default: 1024].
    #[arg(long, value_name = "N", value_parser = parse_count)]
    pub max_handshakes: Option<i64>,

    /// exit: reject hellos whose timestamp differs from our clock by more than this (1s-5m; SIP022's window is 30s), and remember accepted hellos for twice this, to refuse replays. No effect on an entry (a warning): its hellos carry its clock [default: 30s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub max_clock_skew: Option<Duration>,

    /// Offer (entry) and accept (exit) tunnel chunks of up to 65472 bytes instead of 16 KiB, sent only while a direction carries a transfer: a quarter of the AEAD calls, 2-22% less CPU per GB for a tunnelled stream. Both ends must agree per connection (an older peer keeps 16 KiB chunks), and a shard agrees for at most a quarter of --max-connections sessions at once, since each must then be able to hold a 64 KiB chunk whenever its peer sends one: about 96 KiB per session at the connection limit instead of 80. --large-chunks=false turns it off.
    #[arg(long, num_args = 0..=1, require_equals = true, default_value_t = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub large_chunks: bool,

    /// Keep-alive tunnels: a tunnel whose session ended both ways stays open for the next client, with no new connection or handshake. entry: idle tunnels kept per exit endpoint per shard; exit: idle tunnels kept per shard, past which the longest idle one gets a goodbye. A tunnel is kept only if both its ends allow it (negotiated per connection; the numbers need not match); 0 turns it off. At most a quarter of each shard's file descriptors (a warning says when it is lowered) (0-100000) [default: 32 on an entry, 1024 on an exit].
    #[arg(long, value_name = "N", value_parser = parse_count)]
    pub tunnel_keepalive: Option<i64>,

    /// Close a keep-alive tunnel that has carried no session for this long, e.g. 30s (1s-1h); an exit tells its entry first, so that a session crossing the close is not lost.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub tunnel_idle_timeout: Duration,
}

/// Flags of the `keygen` subcommand.
#[derive(Debug, Clone, Args)]
pub struct KeygenArgs {
    /// Write the key to this file (created with mode 0600, never overwritten) instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<String>,
}

/// Flags of the `demo` subcommand.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Port the entry listens on: point clients here (loopback only; 1-65535).
    #[arg(long, default_value_t = 8000, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,

    /// Port of the demo echo origin (loopback only; 1-65535).
    #[arg(long, default_value_t = 7000, value_parser = clap::value_parser!(u16).range(1..))]
    pub origin_port: u16,

    /// Port of the demo exit (loopback only; 1-65535).
    #[arg(long, default_value_t = 7100, value_parser = clap::value_parser!(u16).range(1..))]
    pub exit_port: u16,

    /// Shards for each proxy (1 to the number of cores this process may use).
    #[arg(long, default_value_t = 1, value_parser = parse_count)]
    pub cores: i64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn cores_and_cpu_list_conflict() {
        let err = Cli::try_parse_from([
            "shardproxy",
            "forward",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:1",
            "--cores",
            "1",
            "--cpu-list",
            "0",
        ])
        .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    #[test]
    fn durations_and_sizes_parse_with_units() {
        let cli = Cli::try_parse_from([
            "shardproxy",
            "forward",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:1",
            "--idle-timeout",
            "500ms",
            "--buffer-size",
            "4KiB",
        ])
        .unwrap();
        let Command::Forward(args) = cli.command else {
            panic!("not forward")
        };
        assert_eq!(args.idle_timeout, Duration::from_millis(500));
        assert_eq!(args.buffer_size, 4096);
        assert!(Cli::try_parse_from([
            "shardproxy",
            "forward",
            "--listen",
            "x",
            "--upstream",
            "y",
            "--idle-timeout",
            "30",
        ])
        .is_err());
    }
}
