//! Per-shard counters. Plain `Cell`s: a shard is one thread, so nothing here
//! is atomic and nothing is shared with another core.

use std::cell::Cell;
use std::fmt;

/// Why a connection ended. Both a log field and a metric label
/// (`shardproxy_connections_closed_total{reason=...}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Both directions finished with FIN.
    Clean,
    /// No bytes either way for `--idle-timeout`.
    IdleTimeout,
    /// The upstream refused or the connect failed.
    ConnectError,
    /// The upstream did not answer within `--connect-timeout`.
    ConnectTimeout,
    /// The upstream reset the connection or a read/write on it failed.
    UpstreamReset,
    /// The client reset the connection or a read/write on it failed.
    DownstreamReset,
    /// A peer failed authentication (tunnel roles).
    AuthFailed,
    /// A tunnel ended without its authenticated end-of-stream.
    Truncated,
    /// Aborted at the end of the drain period.
    Drained,
    /// A hard protocol limit (e.g. the nonce counter) was reached.
    Limit,
    /// A local failure that is no peer's fault (e.g. the OS RNG failed).
    Internal,
    /// A TCP health check or port probe, not a failed handshake: on an
    /// exit, the peer closed or reset before sending a single byte; on a
    /// forward or an entry (which connect upstream first), no byte moved
    /// either way and the client ended the connection with a FIN or a
    /// reset (`crate::session::close_reason`).
    Empty,
    /// A tunnel handshake did not complete within `--handshake-timeout`.
    HandshakeTimeout,
    /// `--accept-proxy`: the peer is not in `--proxy-trusted-cidrs`, or its
    /// PROXY protocol header was missing, malformed, too long or late.
    BadProxyHeader,
    /// Every attempt to reach an upstream endpoint failed
    /// (`--connect-attempts`).
    NoUpstream,
    /// The exit refused an authenticated tunnel whose entry had another
    /// exit to try: none of its upstreams was up, or it was at
    /// `--max-connections` (docs/PROTOCOL.md §3).
    Refused,
}

impl CloseReason {
    /// Every reason, in label order.
    pub const ALL: [CloseReason; 16] = [
        CloseReason::Clean,
        CloseReason::IdleTimeout,
        CloseReason::ConnectError,
        CloseReason::ConnectTimeout,
        CloseReason::UpstreamReset,
        CloseReason::DownstreamReset,
        CloseReason::AuthFailed,
        CloseReason::Truncated,
        CloseReason::Drained,
        CloseReason::Limit,
        CloseReason::Internal,
        CloseReason::Empty,
        CloseReason::HandshakeTimeout,
        CloseReason::BadProxyHeader,
        CloseReason::NoUpstream,
        CloseReason::Refused,
    ];

    /// The label used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Clean => "clean",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::ConnectError => "connect_error",
            CloseReason::ConnectTimeout => "connect_timeout",
            CloseReason::UpstreamReset => "upstream_reset",
            CloseReason::DownstreamReset => "downstream_reset",
            CloseReason::AuthFailed => "auth_failed",
            CloseReason::Truncated => "truncated",
            CloseReason::Drained => "drained",
            CloseReason::Limit => "limit",
            CloseReason::Internal => "internal",
            CloseReason::Empty => "empty",
            CloseReason::HandshakeTimeout => "handshake_timeout",
            CloseReason::BadProxyHeader => "bad_proxy_header",
            CloseReason::NoUpstream => "no_upstream",
            CloseReason::Refused => "refused",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One configured upstream's counters, in one shard.
#[derive(Debug, Default)]
pub struct UpstreamStats {
    /// Connects that succeeded (entry: connect and tunnel handshake).
    pub connects: Cell<u64>,
    /// Connects refused or failed.
    pub refused: Cell<u64>,
    /// Connects that timed out.
    pub timeouts: Cell<u64>,
    /// Entry: tunnel handshakes that failed or timed out.
    pub handshakes: Cell<u64>,
    /// Times one of its endpoints was ejected (passive health).
    pub ejections: Cell<u64>,
}

/// Counters owned by one shard.
#[derive(Debug, Default)]
pub struct ShardStats {
    /// Connections accepted.
    pub accepted: Cell<u64>,
    /// Connections currently open.
    pub active: Cell<u64>,
    /// Bytes read from clients and sent upstream (plaintext).
    pub bytes_up: Cell<u64>,
    /// Bytes read from upstream and sent to clients (plaintext).
    pub bytes_down: Cell<u64>,
    /// accept(2) failures (EMFILE, ENFILE, ENOBUFS, ...).
    pub accept_errors: Cell<u64>,
    /// Tunnel handshakes that failed (bad hello, timeout, bad answer).
    pub handshake_failures: Cell<u64>,
    /// Exit: tunnel handshakes whose peer, after an authenticated and fresh
    /// hello, closed or reset before its key confirmation (typically the
    /// entry's own client going away); not failures.
    pub handshakes_abandoned: Cell<u64>,
    /// Access-log lines dropped because the shard's buffer was full.
    pub access_log_dropped: Cell<u64>,
    /// Of `bytes_up + bytes_down`, those moved by `splice(2)` (`forward`,
    /// `--splice auto`), never copied through user space.
    pub spliced: Cell<u64>,
    /// Of `bytes_up + bytes_down`, those a tunnel role moved in batches of
    /// several chunks per syscall ([`crate::transfer`]).
    pub batched: Cell<u64>,
    /// Tunnel sessions that agreed on large chunks (docs/PROTOCOL.md §4).
    pub large_chunks: Cell<u64>,
    /// Tunnel sessions that would have offered (entry) or accepted (exit)
    /// large chunks but found the shard's reservations spent
    /// ([`crate::transfer::BatchPool::reserve_large`]): 16 KiB chunks.
    pub large_chunks_denied: Cell<u64>,
    /// Tunnel sessions carried by a keep-alive tunnel that an earlier
    /// session opened (docs/PROTOCOL.md §4.1): no connect, no handshake.
    pub tunnel_reuses: Cell<u64>,
    /// Keep-alive tunnels idle now, waiting for a session (entry: in the
    /// shard's pool; exit: waiting for a start chunk).
    pub idle_tunnels: Cell<u64>,
    closed: [Cell<u64>; CloseReason::ALL.len()],
}

fn bump(cell: &Cell<u64>, by: u64) {
    cell.set(cell.get().wrapping_add(by));
}

impl ShardStats {
    /// A connection was accepted.
    pub fn on_accept(&self) {
        bump(&self.accepted, 1);
        bump(&self.active, 1);
    }

    /// A connection ended.
    pub fn on_close(&self, reason: CloseReason) {
        self.active.set(self.active.get().saturating_sub(1));
        bump(&self.closed[reason.index()], 1);
    }

    /// Count of connections closed for `reason`.
    pub fn closed(&self, reason: CloseReason) -> u64 {
        self.closed[reason.index()].get()
    }

    /// Count of connections closed for any reason.
    pub fn closed_total(&self) -> u64 {
        self.closed.iter().map(Cell::get).sum()
    }

    /// Adds relayed plaintext bytes.
    pub fn add_bytes(&self, up: bool, n: usize) {
        bump(if up { &self.bytes_up } else { &self.bytes_down }, n as u64);
    }

    /// `n` of the relayed bytes went through a pipe.
    pub fn add_spliced(&self, n: usize) {
        bump(&self.spliced, n as u64);
    }

    /// `n` of the relayed bytes were moved in batches.
    pub fn add_batched(&self, n: usize) {
        bump(&self.batched, n as u64);
    }

    /// A tunnel session agreed on large chunks (`true`), or wanted them
    /// and found no reservation left (`false`).
    pub fn on_large_chunks(&self, agreed: bool) {
        bump(
            if agreed {
                &self.large_chunks
            } else {
                &self.large_chunks_denied
            },
            1,
        );
    }

    /// An accept(2) failed.
    pub fn on_accept_error(&self) {
        bump(&self.accept_errors, 1);
    }

    /// A tunnel handshake failed.
    pub fn on_handshake_failure(&self) {
        bump(&self.handshake_failures, 1);
    }

    /// An authenticated tunnel handshake was abandoned by its peer.
    pub fn on_handshake_abandoned(&self) {
        bump(&self.handshakes_abandoned, 1);
    }
}

/// The one-line summary a shard prints when it stops.
impl fmt::Display for ShardStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "accepted={} active={} closed={} bytes_up={} bytes_down={} accept_errors={} handshake_failures={}",
            self.accepted.get(),
            self.active.get(),
            self.closed_total(),
            self.bytes_up.get(),
            self.bytes_down.get(),
            self.accept_errors.get(),
            self.handshake_failures.get(),
        )?;
        for reason in CloseReason::ALL {
            let n = self.closed(reason);
            if n > 0 {
                write!(f, " {}={n}", reason.as_str())?;
            }
        }
        if self.handshakes_abandoned.get() > 0 {
            write!(
                f,
                " handshakes_abandoned={}",
                self.handshakes_abandoned.get()
            )?;
        }
        if self.access_log_dropped.get() > 0 {
            write!(f, " access_log_dropped={}", self.access_log_dropped.get())?;
        }
        if self.spliced.get() > 0 {
            write!(f, " spliced={}", self.spliced.get())?;
        }
        if self.batched.get() > 0 {
            write!(f, " batched={}", self.batched.get())?;
        }
        if self.large_chunks.get() > 0 {
            write!(f, " large_chunks={}", self.large_chunks.get())?;
        }
        if self.large_chunks_denied.get() > 0 {
            write!(f, " large_chunks_denied={}", self.large_chunks_denied.get())?;
        }
        if self.tunnel_reuses.get() > 0 {
            write!(f, " tunnel_reuses={}", self.tunnel_reuses.get())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_summary() {
        let s = ShardStats::default();
        s.on_accept();
        s.on_accept();
        s.on_close(CloseReason::Clean);
        s.add_bytes(true, 10);
        s.add_bytes(false, 7);
        assert_eq!(s.active.get(), 1);
        assert_eq!(s.closed(CloseReason::Clean), 1);
        assert_eq!(
            s.to_string(),
            "accepted=2 active=1 closed=1 bytes_up=10 bytes_down=7 accept_errors=0 handshake_failures=0 clean=1"
        );
        for (i, r) in CloseReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }
}
