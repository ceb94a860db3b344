//! The process's stop deadline: when a draining process is to be gone,
//! and how long the waits after its drain may still take. A leaf module:
//! the log writers, the access log and the control plane all use it.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// When a draining process is to be gone: the moment its shards were told
/// to drain plus `--drain-timeout`. Unset until a drain starts.
static STOP_BY: OnceLock<Instant> = OnceLock::new();

/// The least [`exit_wait`] allows a wait: lines and answers already on
/// their way out take microseconds, and a drain that used all its time
/// must not drop them for nothing.
pub const EXIT_GRACE: Duration = Duration::from_millis(100);

/// How long one of the waits after a drain may take (metrics answers in
/// flight, the access-log and process-log writers): its own `limit`, cut to
/// what is left before the drain's deadline (`--drain-timeout` from the
/// drain's start), but at least [`EXIT_GRACE`]. Stop wins: a process whose
/// drain ran its full time exits within about that grace, not seconds
/// later (a break-it round measured 2 s with an idle metrics connection
/// and `--drain-timeout 0s`, and 3 s more with scrapes trickling in).
/// Without a drain (a failed start, a tool), `limit`.
pub fn exit_wait(limit: Duration) -> Duration {
    cut(
        limit,
        STOP_BY
            .get()
            .map(|by| by.saturating_duration_since(Instant::now())),
    )
}

/// [`exit_wait`] with `left`, the time left before the deadline if any.
fn cut(limit: Duration, left: Option<Duration>) -> Duration {
    match left {
        None => limit,
        Some(left) => left.clamp(EXIT_GRACE, limit.max(EXIT_GRACE)),
    }
}

/// The shards were told to drain now, with `drain_timeout` to finish:
/// sets [`exit_wait`]'s deadline (the first drain's; a process drains
/// once).
pub fn drain_started(drain_timeout: Duration) {
    let _ = STOP_BY.set(Instant::now() + drain_timeout);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_after_a_drain_are_cut_to_its_time_but_keep_a_grace() {
        let (limit, ms) = (Duration::from_secs(3), Duration::from_millis);
        assert_eq!(cut(limit, None), limit);
        assert_eq!(cut(limit, Some(Duration::ZERO)), EXIT_GRACE);
        assert_eq!(cut(limit, Some(ms(1500))), ms(1500));
        assert_eq!(cut(limit, Some(ms(60_000))), limit);
        assert_eq!(cut(ms(10), Some(ms(60_000))), EXIT_GRACE);
    }
}
