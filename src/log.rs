//! Minimal line logging to stderr, one line per event:
//! `2026-11-29T20:16:31.123Z WARN  message` (text), or
//! `{"time":"2026-11-29T20:16:31.123Z","level":"warn","msg":"message"}`
//! (`--log-format json`). Timestamps are RFC 3339, UTC, milliseconds.
//!
//! Deliberately tiny (no `log`/`tracing` facade): the proxy logs start-up,
//! shard lifecycle and rate-limited failures, never per byte (at `debug`,
//! one line per closed connection). The level (`--log-level`) and format
//! are two process-wide atomics, read once per line, never on the data path.
//!
//! **A slow or stuck stderr never holds up a shard.** Once `main` has
//! started the writer ([`start_writer`]), lines go through a bounded queue
//! ([`QUEUED_LINES`]) to one writer thread, which alone blocks on stderr.
//! A line that finds the queue full is dropped and counted
//! (`shardproxy_log_lines_dropped_total`); the writer says how many were
//! dropped, in place of the gap, once it is writing again. This is what
//! HAProxy does for `log stdout` (non-blocking, lines dropped), and it
//! matters for the
//! places where stderr is a pipe that can stop: Docker's default
//! (blocking) log mode, a paused pager, a journald that is restarting.
//! `main` starts the writer first thing, so even a start-up error cannot
//! hang on a stuck stderr; [`flush`] waits, bounded, for the queue to
//! drain: the process calls it before it exits. Without a writer thread
//! (it could not be spawned), lines are written in place.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

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

/// Sets only the line format: `main` does so from the command line before
/// the config is read, so that a start-up error under `--log-format json`
/// is a JSON line too.
pub fn set_format(format: Format) {
    FORMAT.store(format as u8, Ordering::Relaxed);
}

/// Whether lines are JSON objects (`--log-format json`).
pub fn is_json() -> bool {
    FORMAT.load(Ordering::Relaxed) == Format::Json as u8
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

/// Lines the writer thread's queue holds; a line that finds it full is
/// dropped and counted. At about 150 bytes a line, 4096 lines are 600 KiB:
/// about a second of the busiest logging (`debug` under connection churn,
/// a line per connection) behind a stalled stderr, and minutes of the
/// rate-limited warnings.
pub const QUEUED_LINES: usize = 4096;

/// How long [`flush`] waits for the queue to drain: the process is exiting,
/// and a stderr that does not move must not keep it alive (stop wins).
pub const FLUSH_WAIT: Duration = Duration::from_secs(2);

/// One queued line, and how many lines were dropped just before it (the
/// writer reports them in place, where the gap is).
struct Queued {
    dropped_before: u64,
    line: String,
}

/// The writer thread's queue, once started.
static QUEUE: OnceLock<std::sync::mpsc::SyncSender<Queued>> = OnceLock::new();
/// Lines dropped since start: the queue was full, or writing failed.
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Dropped lines not yet reported in the log.
static PENDING_DROPS: AtomicU64 = AtomicU64::new(0);
/// Lines queued (counted by the senders) and lines the writer is done with.
static QUEUED: AtomicU64 = AtomicU64::new(0);
static WRITTEN: Mutex<u64> = Mutex::new(0);
static WRITTEN_MOVED: Condvar = Condvar::new();

/// Starts the writer thread (first thing in `main`, idempotent): from then
/// on [`write_line`] and [`write_raw`] only queue. Errors: the thread could
/// not be spawned; lines are then written in place, as before.
pub fn start_writer() -> std::io::Result<()> {
    if QUEUE.get().is_some() {
        return Ok(());
    }
    let (tx, rx) = std::sync::mpsc::sync_channel::<Queued>(QUEUED_LINES);
    let spawned = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || {
            use std::sync::mpsc::RecvTimeoutError;
            loop {
                match rx.recv_timeout(Duration::from_secs(1)) {
                    Ok(q) => write_out(&q),
                    // Idle with nothing queued: every earlier line is out,
                    // so drops that no later line carried are reported
                    // here, in place.
                    Err(RecvTimeoutError::Timeout) => {
                        let n = PENDING_DROPS.swap(0, Ordering::Relaxed);
                        if n > 0 {
                            emit_or_count(&drop_notice(n));
                        }
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                }
                if let Ok(mut n) = WRITTEN.lock() {
                    *n += 1;
                }
                WRITTEN_MOVED.notify_all();
            }
        });
    if let Err(e) = spawned {
        let _ = WRITER_FAILURE.set(e.to_string());
        return Err(e);
    }
    let _ = QUEUE.set(tx);
    Ok(())
}

/// Why [`start_writer`] could not start its thread, if it could not.
static WRITER_FAILURE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Why the log writer thread is missing (lines are then written in place,
/// which a stderr that does not move can block), for the proxy to say once
/// it serves; `None` when it runs.
pub fn writer_failure() -> Option<&'static str> {
    WRITER_FAILURE.get().map(String::as_str)
}

/// Writes a queued line, after the notice of the lines dropped before it.
fn write_out(q: &Queued) {
    if q.dropped_before > 0 {
        emit_or_count(&drop_notice(q.dropped_before));
    }
    emit_or_count(&q.line);
}

/// The line that stands for `n` dropped lines, where they were dropped.
fn drop_notice(n: u64) -> String {
    format_line(
        Level::Warn,
        &format!(
            "log: {n} line(s) dropped here: stderr was not keeping up or refused them \
             (shardproxy_log_lines_dropped_total)"
        ),
    )
}

/// Writes `line`; a failed write (a full disk, a closed pipe) counts as a
/// dropped line.
fn emit_or_count(line: &str) {
    if !emit(line) {
        DROPPED.fetch_add(1, Ordering::Relaxed);
        PENDING_DROPS.fetch_add(1, Ordering::Relaxed);
    }
}

/// Lines dropped since start: the writer's queue was full or stderr
/// refused the write.
pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Waits until the lines queued so far are written, at most [`FLUSH_WAIT`]
/// (after a drain, at most what is left of its time: `stop::exit_wait`).
/// Call before the process exits; a no-op without a writer thread.
pub fn flush() {
    if QUEUE.get().is_none() {
        return;
    }
    let target = QUEUED.load(Ordering::SeqCst);
    let deadline = std::time::Instant::now() + crate::stop::exit_wait(FLUSH_WAIT);
    let Ok(mut written) = WRITTEN.lock() else {
        return;
    };
    while *written < target {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return;
        }
        match WRITTEN_MOVED.wait_timeout(written, left) {
            Ok((w, _)) => written = w,
            Err(_) => return,
        }
    }
}

/// Writes one line to stderr in one `write` (so lines from several
/// threads never interleave), with control characters escaped: through
/// the writer thread once one runs ([`start_writer`]; never blocks, drops
/// and counts the line when the queue is full), else in place.
/// Failures are ignored: a full disk, a closed pipe or a vanished journal
/// must not stop the proxy (`eprintln!` would panic on them).
pub fn write_line(level: Level, message: &str) {
    write_raw(format_line(level, message));
}

/// Like [`write_line`] for a line already formatted (newline included),
/// such as `main`'s final `error: ...` line.
pub fn write_raw(line: String) {
    let Some(queue) = QUEUE.get() else {
        emit(&line);
        return;
    };
    // Counted before the send, so that a flush that starts after this line
    // was queued waits for it.
    QUEUED.fetch_add(1, Ordering::SeqCst);
    let dropped_before = PENDING_DROPS.swap(0, Ordering::Relaxed);
    match queue.try_send(Queued {
        dropped_before,
        line,
    }) {
        Ok(()) => {}
        Err(std::sync::mpsc::TrySendError::Full(_)) => {
            QUEUED.fetch_sub(1, Ordering::SeqCst);
            DROPPED.fetch_add(1, Ordering::Relaxed);
            PENDING_DROPS.fetch_add(dropped_before + 1, Ordering::Relaxed);
        }
        Err(std::sync::mpsc::TrySendError::Disconnected(q)) => {
            QUEUED.fetch_sub(1, Ordering::SeqCst);
            write_out(&q);
        }
    }
}

/// One `write` of a whole line to stderr; whether it was written (see
/// [`write_line`] for why failures are not errors).
fn emit(line: &str) -> bool {
    // After a write cut short (a full disk under a redirected stderr), the
    // next line starts on a line of its own, not glued to the cut one, as
    // the access log does.
    let cut = FRAGMENT.load(Ordering::Relaxed);
    let owned;
    let bytes = if cut {
        owned = format!("\n{line}");
        owned.as_bytes()
    } else {
        line.as_bytes()
    };
    let (done, written) = write_counted(&mut std::io::stderr().lock(), bytes);
    match written {
        Ok(()) => FRAGMENT.store(false, Ordering::Relaxed),
        Err(_) if done > 0 => FRAGMENT.store(bytes[done - 1] != b'\n', Ordering::Relaxed),
        Err(_) => {}
    }
    written.is_ok()
}

/// stderr ends in the start of a line that a failed write cut.
static FRAGMENT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Writes all of `bytes` to `w` as `write_all` does, and says how many got
/// written when it fails (a full disk takes part of a write).
pub fn write_counted(w: &mut impl std::io::Write, bytes: &[u8]) -> (usize, std::io::Result<()>) {
    let mut done = 0;
    while done < bytes.len() {
        match w.write(&bytes[done..]) {
            Ok(0) => return (done, Err(std::io::ErrorKind::WriteZero.into())),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return (done, Err(e)),
        }
    }
    (done, Ok(()))
}

/// The text or JSON line for `message`, newline included. Each names the
/// process (as nginx's error log does), since during an upgrade the
/// successor writes to its predecessor's stderr: `TIME LEVEL [PID] message`,
/// or JSON with `time`, `level`, `pid` and `msg`.
fn format_line(level: Level, message: &str) -> String {
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let pid = *PID.get_or_init(std::process::id);
    let time = humantime::format_rfc3339_millis(std::time::SystemTime::now());
    if FORMAT.load(Ordering::Relaxed) == Format::Json as u8 {
        let mut line = format!(
            r#"{{"time":"{time}","level":"{}","pid":{pid},"msg":"#,
            level.as_str()
        );
        json_string(&mut line, message);
        line.push_str("}\n");
        line
    } else {
        format!("{time} {} [{pid}] {}\n", level.tag(), one_line(message))
    }
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
            c if (c as u32) < 0x20 || c == '\u{7f}' || deceptive(c) => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `text` cut to at most `max` bytes (at a character boundary), with a
/// note of how much there was: an error that quotes a huge input stays a
/// readable line.
pub fn capped(mut text: String, max: usize) -> String {
    if text.len() > max {
        let all = text.len();
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str(&format!("… (cut at {cut} of {all} bytes)"));
    }
    text
}

/// Escapes control characters (`\n`, `\r`, ESC, ...) and the
/// [`deceptive`] format characters, so that a message that quotes operator
/// or peer input stays one line, cannot forge another log line, and reads
/// in the order it was written.
pub fn one_line(text: &str) -> std::borrow::Cow<'_, str> {
    let escaped = |c: char| c.is_control() || deceptive(c);
    if !text.chars().any(escaped) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if escaped(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Characters that are not controls but change how the text around them
/// is shown: the bidirectional formatting characters (Unicode's
/// `Bidi_Control` property, UAX #9: U+061C, U+200E, U+200F, U+202A to
/// U+202E, U+2066 to U+2069), which can make quoted input display in
/// another order ("Trojan Source", CVE-2021-42574), and the line and
/// paragraph separators U+2028 and U+2029, which some viewers break lines
/// at.
pub fn deceptive(c: char) -> bool {
    matches!(
        c,
        '\u{061c}'
            | '\u{200e}'
            | '\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2066}'..='\u{2069}'
            | '\u{2028}'
            | '\u{2029}'
    )
}

/// A warning logged at most once per second; the ones in between are
/// counted and the next line is told how many (`line(suppressed)`).
pub struct RateLimited {
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl RateLimited {
    /// Nothing logged yet.
    pub fn new() -> Self {
        RateLimited {
            last: None,
            suppressed: 0,
        }
    }

    /// Logs `line(n)` at `warn`, `n` being how many were suppressed since
    /// the last, unless one was logged less than a second ago.
    pub fn log(&mut self, line: impl FnOnce(u64) -> String) {
        let now = std::time::Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < Duration::from_secs(1) => self.suppressed += 1,
            _ => {
                crate::warn!("{}", line(self.suppressed));
                self.last = Some(now);
                self.suppressed = 0;
            }
        }
    }
}

impl Default for RateLimited {
    fn default() -> Self {
        Self::new()
    }
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
        // Bidirectional overrides and line separators too.
        assert_eq!(
            super::one_line("a\u{202e}b\u{2066}c\u{2028}d\u{200f}é"),
            "a\\u{202e}b\\u{2066}c\\u{2028}d\\u{200f}é"
        );
    }

    #[test]
    fn json_strings_escape_quotes_backslashes_and_controls() {
        let mut out = String::new();
        super::json_string(&mut out, "a\"b\\c\nd\u{1b}é");
        assert_eq!(out, r#""a\"b\\c\u000ad\u001bé""#);
        let mut out = String::new();
        super::json_string(&mut out, "x\u{202e}y\u{2029}");
        assert_eq!(out, r#""x\u202ey\u2029""#);
    }
}
