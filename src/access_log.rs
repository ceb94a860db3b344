//! One line per connection (`--access-log`), and what a connection knows
//! about itself ([`Record`]).
//!
//! Writing never blocks a shard. Each shard appends lines to its own
//! buffer ([`ShardLog`], at most [`BUFFER_BYTES`]) and hands full buffers,
//! and every [`FLUSH_EVERY`] what it has, to its own writer thread over a
//! bounded channel ([`QUEUED_BATCHES`] batches). When both are full (the
//! disk or the pipe behind the log is slower than the traffic), lines are
//! dropped and counted (`shardproxy_access_log_dropped_total`), never waited
//! for. Each batch is whole lines written with one `write(2)` in append
//! mode, so the shards' lines never interleave within a line. `SIGUSR1`
//! makes every writer reopen the path (after logrotate renamed it), as
//! nginx does.
//!
//! Formats (`--access-log-format`): `json` (one object per line) or
//! `logfmt` (`key=value` pairs). Fields, in order:
//!
//! | field | meaning |
//! |---|---|
//! | `time` | when the line was written (RFC 3339, UTC, ms) |
//! | `event` | `close`, or `open` for an `--access-log-interval` line of a live connection |
//! | `id` | connection ID, 32 hex digits; the same in the entry's and the exit's line |
//! | `shard`, `role` | which shard, which role |
//! | `client` | original client address: from the PROXY header or the tunnel's `meta`, else the peer |
//! | `peer` | the socket's peer, only when it differs from `client` (a balancer, an entry) |
//! | `destination` | the address the client connected to |
//! | `upstream` | the endpoint connected to (absent if none was) |
//! | `duration_ms` | since accept |
//! | `bytes_up`, `bytes_down` | plaintext bytes client → upstream and back, as the metrics count them |
//! | `reason` | close reason (`docs/METRICS.md`); absent on `open` lines |
//! | `tunnel` | entry, exit: `new` (the session had a tunnel of its own, or opened one) or `kept` (it rode a keep-alive tunnel an earlier session opened) |
//! | `connect_ms` | upstream connect time |
//! | `handshake_ms` | tunnel handshake time (entry, exit); on an entry's `kept` session, the wait for the exit's status instead |
//! | `first_byte_ms` | from accept to the first upstream byte delivered to the client |
//!
//! Times are milliseconds with microsecond precision; a field whose phase
//! never happened is absent.

use std::cell::{Cell, RefCell};
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::stats::{CloseReason, ShardStats};

/// A field name as both formats write it, spelled out at compile time.
#[derive(Clone, Copy)]
struct Key {
    /// `"name":`
    json: &'static str,
    /// `name=`
    logfmt: &'static str,
}

/// `key!("name")`: the [`Key`] for field `name`.
macro_rules! key {
    ($name:literal) => {
        Key {
            json: concat!("\"", $name, "\":"),
            logfmt: concat!($name, "="),
        }
    };
}

/// Most bytes of lines a shard holds before handing them to its writer.
pub const BUFFER_BYTES: usize = 64 * 1024;
/// Room kept for one line: longer than any line (two IPv6 addresses with
/// ports, a 32-digit ID, six numbers, a timestamp and the labels come to
/// under 450 bytes).
const MAX_LINE: usize = 1024;
/// Batches a shard's writer may have queued; beyond, lines are dropped.
pub const QUEUED_BATCHES: usize = 16;
/// How long a stopping shard waits for its writer.
pub const FINISH_WAIT: Duration = Duration::from_secs(2);
/// How often a shard hands what it has to its writer.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// Bumped on SIGUSR1; each writer reopens the path when it changes.
static REOPEN: AtomicU64 = AtomicU64::new(0);

/// Set once a shard starts an access-log writer.
static STARTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Asks every access-log writer to reopen its file (SIGUSR1). `false` if
/// this process writes no access log (nothing to reopen).
pub fn reopen() -> bool {
    REOPEN.fetch_add(1, Ordering::Relaxed);
    STARTED.load(Ordering::Relaxed)
}

/// Which of `protected` (what each is, its path) the log at `path` would
/// write into: the same path, the same file (device and inode, so a link
/// counts), or the same place spelled differently (`./ctl.sock` for
/// `/run/sp/ctl.sock`, which matters for a socket not bound yet). `None`
/// for stderr (`-`) and for a path that clashes with nothing.
///
/// This looks at names, so a link swapped after it looked can still
/// mislead it: whatever is then opened is checked again by
/// [`open_guarded`], which is what every writer opens with.
pub fn clash(path: &str, protected: &[(&'static str, String)]) -> Option<&'static str> {
    if path == "-" {
        return None;
    }
    clash_by_place(path, protected).or_else(|| {
        protected
            .iter()
            .find(|(_, p)| same_file(path, p))
            .map(|(what, _)| *what)
    })
}

/// The part of [`clash`] that needs no file to exist: the same path, or
/// the same entry of the same directory.
fn clash_by_place(path: &str, protected: &[(&'static str, String)]) -> Option<&'static str> {
    if path == "-" {
        return None;
    }
    protected
        .iter()
        .find(|(_, p)| p == path || same_place(path, p))
        .map(|(what, _)| *what)
}

/// Whether `a` and `b` name the same file (device and inode, following
/// links); `false` if either cannot be looked at.
fn same_file(a: &str, b: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Whether `a` and `b` name the same entry of the same directory, whether
/// or not it exists: their directories resolved (`realpath(3)`) and their
/// last components equal. `false` if a directory cannot be resolved.
fn same_place(a: &str, b: &str) -> bool {
    let place = |p: &str| {
        let p = std::path::Path::new(p);
        let name = p.file_name()?.to_owned();
        let dir = p
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        Some((std::fs::canonicalize(dir).ok()?, name))
    };
    matches!((place(a), place(b)), (Some(x), Some(y)) if x == y)
}

/// Opens the log at `path` for appending ([`open_file`]) and then checks
/// the file it got, not the name: if it is one of `protected` (through a
/// link, or a link swapped after any check by name), it is closed unwritten
/// and refused. Only places are compared before the open (a control socket
/// not bound yet must not get a regular file made at its path). Every
/// writer opens with this, at start-up and on SIGUSR1.
pub fn open_guarded(
    path: &str,
    protected: &[(&'static str, String)],
) -> std::io::Result<std::fs::File> {
    if let Some(what) = clash_by_place(path, protected) {
        return Err(std::io::Error::other(clash_reason(what)));
    }
    let file = open_file(path)?;
    refuse_protected(&file, protected)?;
    Ok(file)
}

/// `Err` if `file` (open) is one of `protected`, by device and inode.
fn refuse_protected(
    file: &std::fs::File,
    protected: &[(&'static str, String)],
) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let got = file.metadata()?;
    for (what, p) in protected {
        if let Ok(m) = std::fs::metadata(p) {
            if m.dev() == got.dev() && m.ino() == got.ino() {
                return Err(std::io::Error::other(clash_reason(what)));
            }
        }
    }
    Ok(())
}

/// Why a log at a path that [`clash`]es with `what` is refused.
pub fn clash_reason(what: &str) -> String {
    if what.contains("socket") {
        format!("it is {what}")
    } else {
        format!("it is {what}, which every connection's log line would corrupt")
    }
}

/// Line format of the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line.
    Json,
    /// `key=value` pairs separated by spaces.
    Logfmt,
}

impl Format {
    /// The `--access-log-format` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Logfmt => "logfmt",
        }
    }

    /// Parses `--access-log-format`.
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "json" => Some(Format::Json),
            "logfmt" => Some(Format::Logfmt),
            _ => None,
        }
    }
}

/// What one connection knows about itself, filled in phase by phase. It
/// lives in the connection's task, so it costs no allocation. Plain
/// `Cell`s: a connection never leaves its shard.
pub struct Record {
    /// When it was accepted.
    pub accepted_at: Instant,
    /// Its ID (random, 128 bits; the entry's, carried to the exit).
    pub id: Cell<u128>,
    /// The socket's peer, once looked up.
    pub peer: Cell<Option<SocketAddr>>,
    /// The original client, when it differs from the peer.
    pub client: Cell<Option<SocketAddr>>,
    /// The address the client connected to.
    pub destination: Cell<Option<SocketAddr>>,
    /// The upstream endpoint, once connected.
    pub upstream: Cell<Option<SocketAddr>>,
    /// Plaintext bytes client → upstream.
    pub bytes_up: Cell<u64>,
    /// Plaintext bytes upstream → client.
    pub bytes_down: Cell<u64>,
    /// Upstream connect time.
    pub connect: Cell<Option<Duration>>,
    /// Tunnel handshake time (an entry's session on a kept tunnel: the
    /// wait for the exit's status).
    pub handshake: Cell<Option<Duration>>,
    /// Tunnel roles: whether the session rode a keep-alive tunnel an
    /// earlier session opened (`Some(true)`), or a tunnel of its own.
    pub kept: Cell<Option<bool>>,
    /// Accept → first upstream byte delivered to the client.
    pub first_byte: Cell<Option<Duration>>,
    /// Whether a client byte has been delivered upstream and timed (the
    /// `first_byte_seconds` histogram counts each connection once).
    pub first_up_timed: Cell<bool>,
}

impl Record {
    /// A record for a connection accepted now, with ID `id`.
    pub fn new(id: u128) -> Record {
        Record {
            accepted_at: Instant::now(),
            id: Cell::new(id),
            peer: Cell::new(None),
            client: Cell::new(None),
            destination: Cell::new(None),
            upstream: Cell::new(None),
            bytes_up: Cell::new(0),
            bytes_down: Cell::new(0),
            connect: Cell::new(None),
            handshake: Cell::new(None),
            kept: Cell::new(None),
            first_byte: Cell::new(None),
            first_up_timed: Cell::new(false),
        }
    }

    /// Counts `n` relayed plaintext bytes.
    pub fn add_bytes(&self, up: bool, n: usize) {
        let cell = if up { &self.bytes_up } else { &self.bytes_down };
        cell.set(cell.get() + n as u64);
    }

    /// The original client: from a PROXY header or the tunnel's `meta`,
    /// else the peer.
    pub fn client(&self) -> Option<SocketAddr> {
        self.client.get().or(self.peer.get())
    }

    /// Appends this record's line to `out`: a close line with `reason`, or
    /// an interval line (`None`) for a live connection.
    pub fn line(
        &self,
        out: &mut Vec<u8>,
        format: Format,
        shard: usize,
        role: &str,
        reason: Option<CloseReason>,
    ) {
        let mut w = Fields::new(out, format);
        // Values are written straight into `out`, and all but the timestamp
        // without `core::fmt`: formatting this line with `write!` cost about
        // 15k instructions (callgrind), more than the proxy's own work for a
        // short connection (benches/instructions.sh).
        w.time(key!("time"), SystemTime::now());
        w.label(
            key!("event"),
            if reason.is_some() { "close" } else { "open" },
        );
        w.hex_id(key!("id"), self.id.get());
        w.num(key!("shard"), shard as u64);
        w.label(key!("role"), role);
        let client = self.client();
        if let Some(c) = client {
            w.addr(key!("client"), c);
        }
        if let Some(p) = self.peer.get().filter(|p| Some(*p) != client) {
            w.addr(key!("peer"), p);
        }
        if let Some(d) = self.destination.get() {
            w.addr(key!("destination"), d);
        }
        if let Some(u) = self.upstream.get() {
            w.addr(key!("upstream"), u);
        }
        w.ms(key!("duration_ms"), Some(self.accepted_at.elapsed()));
        w.num(key!("bytes_up"), self.bytes_up.get());
        w.num(key!("bytes_down"), self.bytes_down.get());
        if let Some(r) = reason {
            w.label(key!("reason"), r.as_str());
        }
        if let Some(kept) = self.kept.get() {
            w.label(key!("tunnel"), if kept { "kept" } else { "new" });
        }
        w.ms(key!("connect_ms"), self.connect.get());
        w.ms(key!("handshake_ms"), self.handshake.get());
        w.ms(key!("first_byte_ms"), self.first_byte.get());
        w.end();
    }
}

/// Writes `key=value` or `"key":value` pairs. Values here are numbers,
/// addresses, hex IDs, timestamps and fixed labels: none needs quoting in
/// logfmt, and the JSON strings are escaped all the same.
struct Fields<'a> {
    out: &'a mut Vec<u8>,
    format: Format,
    first: bool,
}

impl<'a> Fields<'a> {
    fn new(out: &'a mut Vec<u8>, format: Format) -> Self {
        if format == Format::Json {
            out.push(b'{');
        }
        Fields {
            out,
            format,
            first: true,
        }
    }

    fn key(&mut self, k: Key) {
        match (self.format, self.first) {
            (Format::Json, false) => self.out.push(b','),
            (Format::Logfmt, false) => self.out.push(b' '),
            _ => {}
        }
        self.first = false;
        self.out.extend_from_slice(match self.format {
            Format::Json => k.json.as_bytes(),
            Format::Logfmt => k.logfmt.as_bytes(),
        });
    }

    /// Opens (JSON) a quoted value.
    fn open_quote(&mut self) {
        if self.format == Format::Json {
            self.out.push(b'"');
        }
    }

    /// Closes (JSON) a quoted value.
    fn close_quote(&mut self) {
        if self.format == Format::Json {
            self.out.push(b'"');
        }
    }

    /// An RFC 3339 UTC timestamp with milliseconds, quoted in JSON. The
    /// part up to the second is formatted once per second per thread.
    fn time(&mut self, k: Key, now: SystemTime) {
        thread_local! {
            /// The second formatted last, and `YYYY-MM-DDTHH:MM:SS.` for it.
            static SECOND: Cell<(u64, [u8; 20])> = const { Cell::new((u64::MAX, [0; 20])) };
        }
        self.key(k);
        self.open_quote();
        let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = since.as_secs();
        let prefix = SECOND.with(|cached| {
            let (at, mut prefix) = cached.get();
            if at != secs {
                // "2026-11-29T22:47:09Z": keep the first 19 bytes.
                let whole = humantime::format_rfc3339_seconds(now).to_string();
                prefix[..19].copy_from_slice(&whole.as_bytes()[..19]);
                prefix[19] = b'.';
                cached.set((secs, prefix));
            }
            prefix
        });
        self.out.extend_from_slice(&prefix);
        let millis = since.subsec_millis();
        for digit in [millis / 100, millis / 10 % 10, millis % 10] {
            self.out.push(b'0' + digit as u8);
        }
        self.out.push(b'Z');
        self.close_quote();
    }

    /// A fixed label (a role, a close reason), quoted in JSON.
    fn label(&mut self, k: Key, v: &str) {
        self.key(k);
        self.open_quote();
        self.out.extend_from_slice(v.as_bytes());
        self.close_quote();
    }

    /// A 128-bit ID as 32 lowercase hex digits, quoted in JSON.
    fn hex_id(&mut self, k: Key, id: u128) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        self.key(k);
        self.open_quote();
        let mut digits = [0u8; 32];
        for (i, digit) in digits.iter_mut().enumerate() {
            *digit = HEX[(id >> ((31 - i) * 4)) as usize & 0xf];
        }
        self.out.extend_from_slice(&digits);
        self.close_quote();
    }

    /// A socket address (`1.2.3.4:80`, `[::1]:80`), quoted in JSON.
    fn addr(&mut self, k: Key, a: SocketAddr) {
        self.key(k);
        self.open_quote();
        match a {
            SocketAddr::V4(v4) => {
                // "255.255.255.255:65535" is at most 21 bytes: built on the
                // stack a byte at a time, appended once.
                let mut buf = [0u8; 21];
                let mut len = 0;
                for octet in v4.ip().octets() {
                    len = put_decimal(&mut buf, len, u32::from(octet));
                    buf[len] = b'.';
                    len += 1;
                }
                buf[len - 1] = b':';
                len = put_decimal(&mut buf, len, u32::from(v4.port()));
                self.out.extend_from_slice(&buf[..len]);
            }
            SocketAddr::V6(v6) => {
                let _ = write!(self.out, "{v6}");
            }
        }
        self.close_quote();
    }

    fn num(&mut self, k: Key, v: u64) {
        self.key(k);
        self.out
            .extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
    }

    /// A duration in milliseconds with three decimals (microseconds).
    fn ms(&mut self, k: Key, v: Option<Duration>) {
        if let Some(d) = v {
            self.key(k);
            // No u128 arithmetic (`as_micros`): a library call per division.
            let whole = d.as_secs().saturating_mul(1000) + u64::from(d.subsec_millis());
            self.out
                .extend_from_slice(itoa::Buffer::new().format(whole).as_bytes());
            self.out.push(b'.');
            let frac = d.subsec_micros() % 1000;
            for digit in [frac / 100, frac / 10 % 10, frac % 10] {
                self.out.push(b'0' + digit as u8);
            }
        }
    }

    fn end(self) {
        if self.format == Format::Json {
            self.out.push(b'}');
        }
        self.out.push(b'\n');
    }
}

/// Writes `n` in decimal into `buf` at `at` a byte at a time (no `memcpy`
/// call for two or three digits); returns the end. The caller leaves room.
fn put_decimal(buf: &mut [u8], at: usize, n: u32) -> usize {
    let mut digits = [0u8; 10];
    let mut count = 0;
    let mut n = n;
    loop {
        digits[count] = b'0' + (n % 10) as u8;
        count += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..count {
        buf[at + i] = digits[count - 1 - i];
    }
    at + count
}

/// Lines in a batch (each ends with `\n`).
fn lines_in(batch: &[u8]) -> u64 {
    batch.iter().filter(|&&c| c == b'\n').count() as u64
}

/// One shard's end of the access log.
pub struct ShardLog {
    format: Format,
    role: &'static str,
    shard: usize,
    buffer: RefCell<Vec<u8>>,
    to_writer: SyncSender<Vec<u8>>,
    thread: std::thread::JoinHandle<()>,
    /// Lines dropped because the buffer was full.
    dropped: std::cell::Cell<u64>,
    /// Lines the writer could not write (an error such as ENOSPC), or that
    /// were still queued when the shard stopped: counted by the writer
    /// thread, read by the shard when it publishes (once per flush, never
    /// per connection).
    lost: std::sync::Arc<AtomicU64>,
}

impl ShardLog {
    /// Starts shard `shard`'s writer thread on `path` (`-` is stderr),
    /// which reopens never to one of `protected` (what each is, its path:
    /// see [`clash`]). Errors if the file cannot be opened (start-up
    /// reports it).
    pub fn start(
        path: &str,
        protected: &[(&'static str, String)],
        format: Format,
        shard: usize,
        role: &'static str,
    ) -> std::io::Result<ShardLog> {
        STARTED.store(true, Ordering::Relaxed);
        let file = open(path, protected)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUED_BATCHES);
        let target = Target {
            path: path.to_string(),
            protected: protected.to_vec(),
        };
        let lost = std::sync::Arc::new(AtomicU64::new(0));
        let writer_lost = lost.clone();
        let thread = std::thread::Builder::new()
            .name(format!("access-log-{shard}"))
            .spawn(move || writer(target, file, rx, writer_lost))?;
        Ok(ShardLog {
            format,
            role,
            shard,
            buffer: RefCell::new(Vec::with_capacity(BUFFER_BYTES)),
            to_writer: tx,
            thread,
            dropped: std::cell::Cell::new(0),
            lost,
        })
    }

    /// Logs `rec` (closed with `reason`, or still open: `None`). Never
    /// blocks: a line that does not fit is dropped and counted in `stats`.
    pub fn log(&self, rec: &Record, reason: Option<CloseReason>, stats: &ShardStats) {
        let mut buffer = self.buffer.borrow_mut();
        // A line is at most a few hundred bytes: make room for the longest
        // first, then format it in place (no string per line).
        if buffer.len() + MAX_LINE > BUFFER_BYTES {
            self.hand_over(&mut buffer);
        }
        if buffer.len() + MAX_LINE > BUFFER_BYTES {
            self.dropped.set(self.dropped.get() + 1);
            self.count(stats);
            return;
        }
        rec.line(&mut buffer, self.format, self.shard, self.role, reason);
    }

    /// Hands what the buffer holds to the writer, if it has room, and
    /// brings the shard's count of lost lines up to date.
    pub fn flush(&self, stats: &ShardStats) {
        let mut buffer = self.buffer.borrow_mut();
        self.hand_over(&mut buffer);
        self.count(stats);
    }

    fn count(&self, stats: &ShardStats) {
        stats
            .access_log_dropped
            .set(self.dropped.get() + self.lost.load(Ordering::Relaxed));
    }

    /// The shard is done: hands over what is left and waits until the
    /// writer has written everything, for at most [`FINISH_WAIT`], and
    /// after a drain at most what is left of its time
    /// (`stop::exit_wait`) (stop always wins: a writer blocked on a full
    /// pipe does not hold the process up; what it could not write is
    /// reported).
    pub fn finish(self, stats: &ShardStats) {
        let deadline = Instant::now() + crate::stop::exit_wait(FINISH_WAIT);
        let mut rest = Some(self.buffer.into_inner()).filter(|r| !r.is_empty());
        while let Some(batch) = rest.take() {
            match self.to_writer.try_send(batch) {
                Ok(()) => {}
                Err(TrySendError::Full(b)) if Instant::now() < deadline => {
                    rest = Some(b);
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(TrySendError::Full(b)) | Err(TrySendError::Disconnected(b)) => {
                    let n = lines_in(&b);
                    self.lost.fetch_add(n, Ordering::Relaxed);
                    crate::warn!(
                        "access log: shard {}: {n} line(s) not written at exit (the writer is blocked)",
                        self.shard
                    );
                }
            }
        }
        drop(self.to_writer);
        while !self.thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if !self.thread.is_finished() {
            crate::warn!(
                "access log: shard {}: the writer is blocked; lines it still holds are lost at exit",
                self.shard
            );
        }
        stats
            .access_log_dropped
            .set(self.dropped.get() + self.lost.load(Ordering::Relaxed));
    }

    fn hand_over(&self, buffer: &mut Vec<u8>) {
        if buffer.is_empty() {
            return;
        }
        let batch = std::mem::replace(buffer, Vec::with_capacity(BUFFER_BYTES));
        match self.to_writer.try_send(batch) {
            Ok(()) => {}
            // The writer is behind (or gone): keep the lines; new ones are
            // dropped while the buffer stays full.
            Err(TrySendError::Full(batch)) | Err(TrySendError::Disconnected(batch)) => {
                *buffer = batch;
            }
        }
    }
}

/// The log's destination.
enum Sink {
    Stderr,
    File(std::fs::File),
}

fn open(path: &str, protected: &[(&'static str, String)]) -> std::io::Result<Sink> {
    if path == "-" {
        return Ok(Sink::Stderr);
    }
    open_guarded(path, protected).map(Sink::File)
}

/// Opens `path` for appending without ever waiting: a FIFO nobody reads is
/// an error (ENXIO, "no reader") at once, not a hang; the file is then
/// switched to blocking writes (the writer thread may block, a shard never).
pub fn open_file(path: &str) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENXIO) if is_socket(path) => std::io::Error::new(
                e.kind(),
                "a Unix socket, which cannot be opened as a file (the access log takes a file, a FIFO, or - for stderr)",
            ),
            Some(libc::ENXIO) => {
                std::io::Error::new(e.kind(), "a FIFO with no reader (start the reader first)")
            }
            _ => e,
        })?;
    crate::sys::set_blocking(&file)?;
    Ok(file)
}

/// What a writer writes to: its path, and the files that path must never
/// become (the config's `AccessLog::protected`).
struct Target {
    path: String,
    protected: Vec<(&'static str, String)>,
}

impl Target {
    /// Opens the path again (SIGUSR1), unless it is now one of the
    /// protected files (an operator replaced the log with a link to the key
    /// file, say): that is refused as start-up refuses it.
    fn reopen(&self) -> std::io::Result<Sink> {
        open(&self.path, &self.protected)
    }
}

/// Whether `path` leads to a Unix socket.
fn is_socket(path: &str) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// A shard's writer thread: writes each batch in one call; reopens the path
/// when SIGUSR1 asked; ends when the shard is gone.
fn writer(target: Target, mut sink: Sink, rx: Receiver<Vec<u8>>, lost: std::sync::Arc<AtomicU64>) {
    let path = &target.path;
    let mut generation = REOPEN.load(Ordering::Relaxed);
    let mut failed = false;
    // The file ends in the start of a line that a failed write cut.
    let mut fragment = false;
    loop {
        let batch = rx.recv_timeout(Duration::from_millis(250));
        let now = REOPEN.load(Ordering::Relaxed);
        if now != generation {
            generation = now;
            match target.reopen() {
                Ok(s) => {
                    sink = s;
                    // A fragment stays in the old file.
                    fragment = false;
                }
                Err(e) => crate::warn!(
                    "access log: cannot reopen {path}: {e}; still writing to the old file"
                ),
            }
        }
        let batch = match batch {
            Ok(b) => b,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
        };
        // A write that failed part-way (a full disk) left the start of a
        // line in the file: this batch starts on a line of its own, so
        // that no record is glued onto that fragment (break-it round 23:
        // the next record after ENOSPC continued the cut line, and the
        // line was not valid JSON).
        let mut out = Vec::new();
        let bytes: &[u8] = if fragment {
            out.reserve(batch.len() + 1);
            out.push(b'\n');
            out.extend_from_slice(&batch);
            &out
        } else {
            &batch
        };
        let (done, written) = match &mut sink {
            Sink::Stderr => crate::log::write_counted(&mut std::io::stderr().lock(), bytes),
            Sink::File(f) => crate::log::write_counted(f, bytes),
        };
        match written {
            Ok(()) => {
                fragment = false;
                if failed {
                    crate::info!("access log: writing {path} works again");
                    failed = false;
                }
            }
            Err(e) => {
                // The lines written whole are in the file; the rest are
                // lost and counted, the one cut short too (it counted
                // every line of the batch, those written too). A record
                // cut just before its newline is whole: the next write's
                // leading newline ends it.
                let upto = if bytes.get(done) == Some(&b'\n') {
                    done + 1
                } else {
                    done
                };
                let whole = lines_in(&bytes[..upto]) - u64::from(fragment && upto > 0);
                lost.fetch_add(lines_in(&batch) - whole, Ordering::Relaxed);
                if done > 0 {
                    fragment = bytes[done - 1] != b'\n';
                }
                if !failed {
                    crate::warn!("access log: writing {path}: {e}; lines are dropped and counted until writing works again");
                    failed = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What was opened is checked, not only the name: a file that is the
    /// key (as a swapped link would make it after the name was checked)
    /// is refused; another file is not. Names spelled differently clash.
    #[test]
    fn an_opened_protected_file_is_refused_and_places_compare_resolved() {
        let dir = std::env::temp_dir().join(format!("sp-guard-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("key");
        std::fs::write(&key, "k\n").unwrap();
        let key = key.to_str().unwrap().to_string();
        let other = dir.join("other.log");
        let protected = [("the key file", key.clone())];
        let opened = open_file(&key).unwrap();
        let e = refuse_protected(&opened, &protected).unwrap_err();
        assert!(e.to_string().contains("it is the key file"), "{e}");
        let fine = open_file(other.to_str().unwrap()).unwrap();
        assert!(refuse_protected(&fine, &protected).is_ok());
        // Through a link, which only the opened file gives away here.
        let link = dir.join("access.log");
        std::os::unix::fs::symlink(&key, &link).unwrap();
        let e = open_guarded(link.to_str().unwrap(), &protected).unwrap_err();
        assert!(e.to_string().contains("it is the key file"), "{e}");
        assert_eq!(std::fs::read(&key).unwrap(), b"k\n");
        assert!(open_guarded(other.to_str().unwrap(), &protected).is_ok());
        // The same place, spelled two ways, before anything exists there.
        let sock = dir.join("ctl.sock");
        let spelled = format!(
            "{}/./../{}/ctl.sock",
            dir.display(),
            dir.file_name().unwrap().to_str().unwrap()
        );
        let protected = [(
            "the control socket's path",
            sock.to_str().unwrap().to_string(),
        )];
        assert_eq!(
            clash(&spelled, &protected),
            Some("the control socket's path")
        );
        assert_eq!(clash(other.to_str().unwrap(), &protected), None);
        assert_eq!(clash("-", &protected), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn record() -> Record {
        let r = Record::new(0x1234);
        r.peer.set(Some("10.0.0.1:5000".parse().unwrap()));
        r.client.set(Some("192.0.2.9:40000".parse().unwrap()));
        r.upstream.set(Some("127.0.0.1:80".parse().unwrap()));
        r.add_bytes(true, 100);
        r.add_bytes(false, 2000);
        r.connect.set(Some(Duration::from_micros(1500)));
        r
    }

    #[test]
    fn json_lines_carry_every_known_field_and_omit_unknown_ones() {
        let mut out = Vec::new();
        record().line(&mut out, Format::Json, 1, "exit", Some(CloseReason::Clean));
        let out = String::from_utf8(out).unwrap();
        assert!(out.ends_with("}\n"), "{out}");
        for want in [
            r#""event":"close""#,
            r#""id":"00000000000000000000000000001234""#,
            r#""shard":1"#,
            r#""role":"exit""#,
            r#""client":"192.0.2.9:40000""#,
            r#""peer":"10.0.0.1:5000""#,
            r#""upstream":"127.0.0.1:80""#,
            r#""bytes_up":100"#,
            r#""bytes_down":2000"#,
            r#""reason":"clean""#,
            r#""connect_ms":1.500"#,
        ] {
            assert!(out.contains(want), "{want} missing: {out}");
        }
        assert!(!out.contains("handshake_ms"), "{out}");
        assert!(!out.contains("tunnel"), "{out}");
        let r = record();
        r.kept.set(Some(true));
        let mut out = Vec::new();
        r.line(&mut out, Format::Json, 1, "exit", Some(CloseReason::Clean));
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.contains(r#""reason":"clean","tunnel":"kept","#),
            "{out}"
        );
        r.kept.set(Some(false));
        let mut out = Vec::new();
        r.line(&mut out, Format::Logfmt, 1, "exit", None);
        let out = String::from_utf8(out).unwrap();
        assert!(out.contains(" tunnel=new "), "{out}");
    }

    #[test]
    fn addresses_ids_and_times_are_written_exactly() {
        let r = Record::new(u128::MAX - 0xf);
        r.peer.set(Some("[2001:db8::1]:443".parse().unwrap()));
        r.upstream.set(Some("255.0.10.1:65535".parse().unwrap()));
        r.connect.set(Some(Duration::from_micros(12_000_007)));
        r.handshake.set(Some(Duration::from_nanos(999)));
        let mut out = Vec::new();
        r.line(&mut out, Format::Logfmt, 0, "entry", None);
        let out = String::from_utf8(out).unwrap();
        for want in [
            " id=fffffffffffffffffffffffffffffff0 ",
            " client=[2001:db8::1]:443 ",
            " upstream=255.0.10.1:65535 ",
            " connect_ms=12000.007 ",
            " handshake_ms=0.000\n",
        ] {
            assert!(out.contains(want), "{want} missing: {out}");
        }
    }

    #[test]
    fn logfmt_lines_are_key_value_pairs_and_the_peer_is_omitted_when_it_is_the_client() {
        let r = Record::new(7);
        r.peer.set(Some("10.0.0.1:5000".parse().unwrap()));
        let mut out = Vec::new();
        r.line(&mut out, Format::Logfmt, 0, "forward", None);
        let out = String::from_utf8(out).unwrap();
        assert!(out.contains(" event=open "), "{out}");
        assert!(out.contains(" client=10.0.0.1:5000 "), "{out}");
        assert!(!out.contains("peer="), "{out}");
        assert!(!out.contains("reason="), "{out}");
        assert!(out.starts_with("time="), "{out}");
        // The same instant as humantime formats it, twice (the second line
        // reuses the cached second).
        let at = UNIX_EPOCH + Duration::from_millis(1_764_456_429_007);
        for _ in 0..2 {
            let mut line = Vec::new();
            let mut w = Fields::new(&mut line, Format::Json);
            w.time(key!("time"), at);
            w.end();
            assert_eq!(line, b"{\"time\":\"2025-11-29T22:47:09.007Z\"}\n");
        }
    }
}
