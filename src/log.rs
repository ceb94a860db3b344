//! Minimal line logging to stderr: `LEVEL message`, one line per event.
//!
//! Deliberately tiny (no `log`/`tracing` facade): the proxy logs start-up,
//! shard lifecycle and rate-limited errors, never per byte.

/// Logs an informational line.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log::write_line("INFO ", &format!($($arg)*)) };
}

/// Logs a warning line.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::log::write_line("WARN ", &format!($($arg)*)) };
}

/// Logs an error line.
#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => { $crate::log::write_line("ERROR", &format!($($arg)*)) };
}

/// Writes `LEVEL message\n` to stderr in one `write` (so lines from
/// several threads never interleave), with control characters escaped.
/// Failures are ignored: a full disk, a closed pipe or a vanished journal
/// must not stop the proxy (`eprintln!` would panic on them).
pub fn write_line(level: &str, message: &str) {
    use std::io::Write;
    let line = format!("{level} {}\n", one_line(message));
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Escapes control characters (`\n`, `\r`, ESC, ...) so that a message
/// that quotes operator or peer input stays one line and cannot forge
/// another log line.
pub fn one_line(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(
            super::one_line("a\nINFO  forged\r\x1b"),
            "a\\nINFO  forged\\r\\u{1b}"
        );
        assert_eq!(super::one_line("plain"), "plain");
    }
}
