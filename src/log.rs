//! Minimal line logging to stderr: `LEVEL message`, one line per event.
//!
//! Deliberately tiny (no `log`/`tracing` facade): the proxy logs start-up,
//! shard lifecycle and rate-limited errors, never per byte.

/// Logs an informational line.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { eprintln!("INFO  {}", $crate::log::one_line(&format!($($arg)*))) };
}

/// Logs a warning line.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { eprintln!("WARN  {}", $crate::log::one_line(&format!($($arg)*))) };
}

/// Logs an error line.
#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => { eprintln!("ERROR {}", $crate::log::one_line(&format!($($arg)*))) };
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
