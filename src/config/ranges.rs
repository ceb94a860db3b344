//! The accepted range of every numeric setting, enforced by `check` and at
//! start-up. `docs/CONFIG.md` lists the same table; `tests/ranges.rs` tries
//! the largest valid and the smallest invalid value of each.
//!
//! Bounds are chosen so that no accepted value can crash the process later:
//! a buffer size is capped far below what one allocation can fail on, and
//! durations stay within what timers and `Instant` arithmetic handle.

use std::fmt;
use std::time::Duration;

use super::ConfigError;
use crate::units::format_duration;

/// An inclusive range of one setting, named by its flag.
#[derive(Debug, Clone, Copy)]
pub struct Bound<T> {
    /// The command-line flag (the config key is the same with `_`).
    pub flag: &'static str,
    /// Smallest accepted value.
    pub min: T,
    /// Largest accepted value.
    pub max: T,
}

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// `--buffer-size`: 1 KiB to 16 MiB per direction per connection.
pub const BUFFER_SIZE: Bound<usize> = Bound {
    flag: "--buffer-size",
    min: 1 << 10,
    max: 16 << 20,
};
/// `--max-connections`: per shard.
pub const MAX_CONNECTIONS: Bound<usize> = Bound {
    flag: "--max-connections",
    min: 1,
    max: 1_000_000,
};
/// `--backlog`: per shard; the kernel caps it at `net.core.somaxconn`.
pub const BACKLOG: Bound<u32> = Bound {
    flag: "--backlog",
    min: 1,
    max: 65_535,
};
/// `--wake-batch`: completions per wake-up (1: off).
pub const WAKE_BATCH: Bound<u32> = Bound {
    flag: "--wake-batch",
    min: 1,
    max: 256,
};
/// `--wake-batch-wait`: the added latency a coalesced wake-up may cost.
pub const WAKE_BATCH_WAIT: Bound<Duration> = Bound {
    flag: "--wake-batch-wait",
    min: Duration::from_micros(1),
    max: ms(1),
};
/// `--connect-timeout`.
pub const CONNECT_TIMEOUT: Bound<Duration> = Bound {
    flag: "--connect-timeout",
    min: ms(10),
    max: secs(600),
};
/// `--idle-timeout`: up to 7 days.
pub const IDLE_TIMEOUT: Bound<Duration> = Bound {
    flag: "--idle-timeout",
    min: ms(100),
    max: secs(7 * 24 * 3600),
};
/// `--drain-timeout`: 0s aborts live connections at once.
pub const DRAIN_TIMEOUT: Bound<Duration> = Bound {
    flag: "--drain-timeout",
    min: secs(0),
    max: secs(3600),
};
/// `--drain-delay`: how long /healthz says 503 before the drain starts.
pub const DRAIN_DELAY: Bound<Duration> = Bound {
    flag: "--drain-delay",
    min: secs(0),
    max: secs(300),
};
/// `--handover-timeout`: how long a predecessor waits for its successor's
/// `READY`.
pub const HANDOVER_TIMEOUT: Bound<Duration> = Bound {
    flag: "--handover-timeout",
    min: secs(1),
    max: secs(600),
};
/// `--handshake-timeout` (entry and exit).
pub const HANDSHAKE_TIMEOUT: Bound<Duration> = Bound {
    flag: "--handshake-timeout",
    min: ms(100),
    max: secs(300),
};
/// `--max-handshakes` (exit): pending handshakes per shard.
pub const MAX_HANDSHAKES: Bound<usize> = Bound {
    flag: "--max-handshakes",
    min: 1,
    max: 1_000_000,
};
/// `--max-clock-skew` (exit): 0s would reject every hello; the replay
/// filter remembers each accepted salt for twice this, so the upper bound
/// also bounds its memory (docs/PROTOCOL.md §7).
pub const MAX_CLOCK_SKEW: Bound<Duration> = Bound {
    flag: "--max-clock-skew",
    min: secs(1),
    max: secs(300),
};
/// `--connect-attempts`: endpoints tried per client.
pub const CONNECT_ATTEMPTS: Bound<u32> = Bound {
    flag: "--connect-attempts",
    min: 1,
    max: 10,
};
/// `--max-fails`: consecutive failures before an ejection.
pub const MAX_FAILS: Bound<u32> = Bound {
    flag: "--max-fails",
    min: 1,
    max: 100,
};
/// `--tunnel-keepalive`: idle keep-alive tunnels (entry: per exit endpoint
/// per shard; exit: per shard); 0 is off.
pub const TUNNEL_KEEPALIVE: Bound<usize> = Bound {
    flag: "--tunnel-keepalive",
    min: 0,
    max: 100_000,
};
/// `--tunnel-idle-timeout`: how long a keep-alive tunnel waits for its
/// next session.
pub const TUNNEL_IDLE_TIMEOUT: Bound<Duration> = Bound {
    flag: "--tunnel-idle-timeout",
    min: secs(1),
    max: secs(3600),
};
/// `--fail-timeout`: the first ejection's length.
pub const FAIL_TIMEOUT: Bound<Duration> = Bound {
    flag: "--fail-timeout",
    min: secs(1),
    max: secs(3600),
};
/// `--health-check-interval`.
pub const HEALTH_CHECK_INTERVAL: Bound<Duration> = Bound {
    flag: "--health-check-interval",
    min: secs(1),
    max: secs(3600),
};
/// `--health-check-fails`.
pub const HEALTH_CHECK_FAILS: Bound<u32> = Bound {
    flag: "--health-check-fails",
    min: 1,
    max: 100,
};
/// `--health-check-passes`.
pub const HEALTH_CHECK_PASSES: Bound<u32> = Bound {
    flag: "--health-check-passes",
    min: 1,
    max: 100,
};
/// `--dns-refresh`.
pub const DNS_REFRESH: Bound<Duration> = Bound {
    flag: "--dns-refresh",
    min: secs(1),
    max: secs(24 * 3600),
};
/// `--proxy-header-timeout` (with `--accept-proxy`).
pub const PROXY_HEADER_TIMEOUT: Bound<Duration> = Bound {
    flag: "--proxy-header-timeout",
    min: ms(100),
    max: secs(60),
};
/// `--access-log-interval`: a line per live connection this often.
pub const ACCESS_LOG_INTERVAL: Bound<Duration> = Bound {
    flag: "--access-log-interval",
    min: secs(1),
    max: secs(24 * 3600),
};
/// `--metrics-interval`: below 100ms the publisher costs CPU while idle;
/// above a minute the metrics look frozen.
pub const METRICS_INTERVAL: Bound<Duration> = Bound {
    flag: "--metrics-interval",
    min: ms(100),
    max: secs(60),
};

/// The documented range of a bounded setting, by its flag as spelt on the
/// command line (`--max-connections`), worded as range errors word it:
/// `must be between 1 and 1000000`. `None` for a flag without a range.
///
/// For errors raised before a value reaches its range check: a count
/// beyond ±2^63, a duration or size too large for its type, or text that
/// is not a number at all still gets the setting's range in its message.
pub fn range_of(flag: &str) -> Option<String> {
    fn text<T: Show>(b: &Bound<T>) -> String {
        format!("must be between {} and {}", b.min.show(), b.max.show())
    }
    macro_rules! table {
        ($($bound:ident),* ; sizes: $($size:ident),*) => {
            $(if flag == $bound.flag { return Some(text(&$bound)); })*
            $(if flag == $size.flag {
                return Some(format!("must be between {} and {}", Bytes($size.min), Bytes($size.max)));
            })*
        };
    }
    table!(
        MAX_CONNECTIONS, BACKLOG, WAKE_BATCH, WAKE_BATCH_WAIT, CONNECT_TIMEOUT, IDLE_TIMEOUT,
        DRAIN_TIMEOUT, DRAIN_DELAY, HANDOVER_TIMEOUT, HANDSHAKE_TIMEOUT, MAX_HANDSHAKES, MAX_CLOCK_SKEW,
        CONNECT_ATTEMPTS, MAX_FAILS, FAIL_TIMEOUT, HEALTH_CHECK_INTERVAL, HEALTH_CHECK_FAILS,
        HEALTH_CHECK_PASSES, DNS_REFRESH, PROXY_HEADER_TIMEOUT, ACCESS_LOG_INTERVAL,
        METRICS_INTERVAL, TUNNEL_KEEPALIVE, TUNNEL_IDLE_TIMEOUT;
        sizes: BUFFER_SIZE
    );
    None
}

/// How a bound's values are written in messages.
pub trait Show: Copy + PartialOrd {
    /// The value as the operator would write it.
    fn show(self) -> String;
}

impl Show for usize {
    fn show(self) -> String {
        self.to_string()
    }
}

impl Show for u32 {
    fn show(self) -> String {
        self.to_string()
    }
}

impl Show for Duration {
    fn show(self) -> String {
        format_duration(self)
    }
}

/// A size in bytes, shown with a binary unit when it has one.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Bytes(pub usize);

impl Show for Bytes {
    fn show(self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
            if n >= 1 << shift && n % (1 << shift) == 0 {
                return write!(f, "{}{unit}", n >> shift);
            }
        }
        write!(f, "{n}B")
    }
}

impl<T: Show> Bound<T> {
    /// `Ok(value)` inside the range, else a one-line error naming the flag.
    pub fn check(&self, value: T) -> Result<T, ConfigError> {
        if value < self.min || value > self.max {
            return Err(ConfigError::OutOfRange {
                flag: self.flag,
                value: value.show(),
                min: self.min.show(),
                max: self.max.show(),
            });
        }
        Ok(value)
    }
}

impl<T: Show + TryFrom<i64>> Bound<T> {
    /// As [`Bound::check`], for a count parsed as any whole number
    /// ([`crate::units::parse_count`]): a negative value, or one beyond
    /// the setting's integer type, gets the same documented-range error.
    pub fn check_count(&self, value: i64) -> Result<T, ConfigError> {
        match T::try_from(value) {
            Ok(v) => self.check(v),
            Err(_) => Err(ConfigError::OutOfRange {
                flag: self.flag,
                value: value.to_string(),
                min: self.min.show(),
                max: self.max.show(),
            }),
        }
    }
}

impl Bound<usize> {
    /// As [`Bound::check`], for a size in bytes.
    pub fn check_size(&self, value: usize) -> Result<usize, ConfigError> {
        let sized = Bound {
            flag: self.flag,
            min: Bytes(self.min),
            max: Bytes(self.max),
        };
        sized.check(Bytes(value)).map(|b| b.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_accept_their_ends_and_reject_beyond() {
        assert_eq!(BUFFER_SIZE.check_size(16 << 20), Ok(16 << 20));
        let e = BUFFER_SIZE.check_size(64 << 30).unwrap_err().to_string();
        assert_eq!(
            e,
            "--buffer-size 64GiB is out of range: must be between 1KiB and 16MiB"
        );
        assert!(MAX_CLOCK_SKEW.check(Duration::ZERO).is_err());
        assert_eq!(DRAIN_TIMEOUT.check(Duration::ZERO), Ok(Duration::ZERO));
        assert!(METRICS_INTERVAL.check(ms(1)).is_err());
        assert!(METRICS_INTERVAL.check(secs(3600)).is_err());
        assert!(BACKLOG.check(0).is_err());
        assert_eq!(Bytes(1536).to_string(), "1536B");
        assert_eq!(MAX_FAILS.check_count(100), Ok(100));
        assert_eq!(
            MAX_FAILS.check_count(-1).unwrap_err().to_string(),
            "--max-fails -1 is out of range: must be between 1 and 100"
        );
        assert_eq!(
            MAX_CONNECTIONS
                .check_count(i64::MIN)
                .unwrap_err()
                .to_string(),
            "--max-connections -9223372036854775808 is out of range: must be between 1 and 1000000"
        );
        assert!(BACKLOG.check_count(i64::MAX).is_err());
    }

    /// Every bound in this module is in [`range_of`]'s table: counted from
    /// the source, so a new bound cannot be left out of it.
    #[test]
    fn every_bound_has_its_range_by_flag() {
        let source = include_str!("ranges.rs");
        let flags: Vec<&str> = source
            .lines()
            .filter_map(|l| l.trim().strip_prefix("flag: \"--"))
            .map(|l| l.trim_end_matches("\","))
            .collect();
        assert!(flags.len() >= 24, "{flags:?}");
        for flag in flags {
            let flag = format!("--{flag}");
            assert!(range_of(&flag).is_some(), "{flag} is not in range_of");
        }
        assert_eq!(
            range_of("--buffer-size").as_deref(),
            Some("must be between 1KiB and 16MiB")
        );
        assert_eq!(
            range_of("--wake-batch-wait").as_deref(),
            Some("must be between 1us and 1ms")
        );
        assert_eq!(range_of("--listen"), None);
    }
}
