//! Minimal line logging to stderr, one line per event:
//! `2026-11-29T20:16:31.123Z WARN  message` (text), or
//! `{"time":"2026-11-29T20:16:31.123Z","level":"warn","msg":"message"}`
//! (`--log-format json`). Timestamps are RFC 3339, UTC, milliseconds.
//!
//! Deliberately tiny (no `log`/`tracing` facade): the proxy logs start-up,
//! shard lifecycle and rate-limited failures, never per byte. The level
//! (`--log-level`) and format are two process-wide atomics, read once per
//! line, never on the data path.

use std::sync::atomic::{AtomicU8, Ordering};

/// How severe a line is; a line is written if it is at most the level set
/// with [`set`] (`Error` < `Warn` < `Info` < `Debug`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Something failed that an operator must look at.
    Error = 0,
    /// Something failed or was refused; the proxy goes on.
    Warn = 1,
    /// Lifecycle: start, drain, reload, hand-over.
    Info = 2,
    /// Detail for debugging.
    Debug = 3,
}

impl Level {
    /// The level's name in `--log-level` and in JSON lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
        }
    }

    /// Parses a `--log-level` value.
    pub fn parse(s: &str) -> Option<Level> {
        match s {
            "error" => Some(Level::Error),
            "warn" => Some(Level::Warn),
            "info" => Some(Level::Info),
            "debug" => Some(Level::Debug),
            _ => None,
        }
    }

    /// The five-character tag of text lines.
    fn tag(self) -> &'static str {
        match self {
            Level::Error => "ERROR",
            Level::Warn => "WARN ",
            Level::Info => "INFO ",
            Level::Debug => "DEBUG",
        }
    }
}

/// Line format of the process log (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `TIME LEVEL message`.
    Text = 0,
    /// One JSON object per line: `time`, `level`, `msg`.
    Json = 1,
}

static LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);
static FORMAT: AtomicU8 = AtomicU8::new(Format::Text as u8);

/// Sets the process log's level and format (start-up, from the config).
pub fn set(level: Level, format: Format) {
    LEVEL.store(level as u8, Ordering::Relaxed);
    FORMAT.store(format as u8, Ordering::Relaxed);
}

/// Whether lines of `level` are written.
pub fn enabled(level: Level) -> bool {
    level as u8 <= LEVEL.load(Ordering::Relaxed)
}

/// Logs a debug line (`--log-level debug`).
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => {
        if $crate::log::enabled($crate::log::Level::Debug) {
            $crate::log::write_line($crate::log::Level::Debug, &format!($($arg)*))
        }
    };
}

/// Logs an informational line.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => {
        if $crate::log::enabled($crate::log::Level::Info) {
            $crate::log::write_line($crate::log::Level::Info, &format!($($arg)*))
        }
    };
}

/// Logs a warning line.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => {
        if $crate::log::enabled($crate::log::Level::Warn) {
            $crate::log::write_line($crate::log::Level::Warn, &format!($($arg)*))
        }
    };
}

/// Logs an error line.
#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => {
        $crate::log::write_line($crate::log::Level::Error, &format!($($arg)*))
    };
}

/// Writes one line to stderr in one `write` (so lines from several
/// threads never interleave), with control characters escaped.
/// Failures are ignored: a full disk, a closed pipe or a vanished journal
/// must not stop the proxy (`eprintln!` would panic on them).
pub fn write_line(level: Level, message: &str) {
    use std::io::Write;
    let time = humantime::format_rfc3339_millis(std::time::SystemTime::now());
    let line = if FORMAT.load(Ordering::Relaxed) == Format::Json as u8 {
        let mut line = format!(r#"{{"time":"{time}","level":"{}","msg":"#, level.as_str());
        json_string(&mut line, message);
        line.push_str("}\n");
        line
    } else {
        format!("{time} {} {}\n", level.tag(), one_line(message))
    };
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Appends `s` to `out` as a JSON string (RFC 8259 §7): quoted, with `"`,
/// `\` and control characters escaped.
pub fn json_string(out: &mut String, s: &str) {
    use std::fmt::Write;
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
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

    #[test]
    fn json_strings_escape_quotes_backslashes_and_controls() {
        let mut out = String::new();
        super::json_string(&mut out, "a\"b\\c\nd\u{1b}é");
        assert_eq!(out, r#""a\"b\\c\u000ad\u001bé""#);
    }
}
