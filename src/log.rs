//! Minimal line logging to stderr: `LEVEL message`, one line per event.
//!
//! Deliberately tiny (no `log`/`tracing` facade): the proxy logs start-up,
//! shard lifecycle and rate-limited errors, never per byte.

/// Logs an informational line.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { eprintln!("INFO  {}", format_args!($($arg)*)) };
}

/// Logs a warning line.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { eprintln!("WARN  {}", format_args!($($arg)*)) };
}

/// Logs an error line.
#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => { eprintln!("ERROR {}", format_args!($($arg)*)) };
}
