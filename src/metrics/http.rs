//! The scrape endpoint: a tiny HTTP/1.1 server on its own unpinned thread.
//!
//! It never touches a shard: it reads the [`Board`] the shards publish to.
//! Every request is bounded:
//!
//! * at most [`MAX_HEAD`] bytes of head;
//! * [`HEAD_DEADLINE`] for the *whole* head, however the client trickles it
//!   (a deadline, not a per-read timeout), and [`WRITE_DEADLINE`] for the
//!   answer;
//! * at most [`MAX_CLIENTS`] connections at once. At the cap a new
//!   connection evicts the *oldest* one, so slow or idle clients cannot lock
//!   a health probe out: a probe is only cut if [`MAX_CLIENTS`] newer
//!   connections arrive while it is being answered.
//!
//! Bad requests get 400, unknown paths 404, other methods 405; nothing a
//! client sends can crash it. This server is off the data path, so its
//! bookkeeping uses a plain `Mutex`.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{prom, Board};

/// Largest request head accepted.
pub const MAX_HEAD: usize = 8 * 1024;
/// Concurrent scrape connections; at the cap the oldest is evicted.
pub const MAX_CLIENTS: usize = 64;
/// Time a client has to send its whole request head.
pub const HEAD_DEADLINE: Duration = Duration::from_secs(2);
/// [`HEAD_DEADLINE`] for a request answered on the accept thread, when no
/// thread could be made for it (the thread limit).
pub const INLINE_HEAD_DEADLINE: Duration = Duration::from_millis(100);
/// How often, at most, answering on the accept thread is logged.
const INLINE_WARN_EVERY: Duration = Duration::from_secs(60);
/// Time a client has to take the whole answer.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(5);

/// Live connections, oldest first, with a handle to cut each one.
#[derive(Default)]
struct Live {
    next_id: u64,
    conns: VecDeque<(u64, TcpStream)>,
}

impl Live {
    /// Registers `conn`, evicting the oldest connection at the cap.
    fn admit(&mut self, conn: &TcpStream) -> Option<u64> {
        if self.conns.len() >= MAX_CLIENTS {
            if let Some((_, oldest)) = self.conns.pop_front() {
                // Its thread's read or write fails at once and it ends.
                let _ = oldest.shutdown(Shutdown::Both);
            }
        }
        let handle = conn.try_clone().ok()?;
        let id = self.next_id;
        self.next_id += 1;
        self.conns.push_back((id, handle));
        Some(id)
    }

    fn remove(&mut self, id: u64) {
        self.conns.retain(|(i, _)| *i != id);
    }
}

/// A parsed request line: the only thing we need.
#[derive(Debug, PartialEq, Eq)]
pub struct Request<'a> {
    /// `GET`, `HEAD`, ...
    pub method: &'a str,
    /// The path, without any query string.
    pub path: &'a str,
}

/// Why a request head was rejected.
#[derive(Debug, PartialEq, Eq)]
pub enum HttpError {
    /// Not a complete head yet.
    Incomplete,
    /// Malformed.
    Bad,
    /// Head larger than [`MAX_HEAD`].
    TooLarge,
}

/// The length of the head before its terminating empty line: the first
/// `\n` followed by `\n` or `\r\n`, less a `\r` in front of it.
fn blank_line(buf: &[u8]) -> Option<usize> {
    let limit = buf.len().min(MAX_HEAD + 4);
    (0..limit)
        .find(|&i| {
            buf[i] == b'\n'
                && (buf.get(i + 1) == Some(&b'\n')
                    || (buf.get(i + 1) == Some(&b'\r') && buf.get(i + 2) == Some(&b'\n')))
        })
        .map(|i| {
            if i > 0 && buf[i - 1] == b'\r' {
                i - 1
            } else {
                i
            }
        })
}

/// Parses a request head (pure; fuzzable). Needs the full head, up to the
/// blank line.
pub fn parse_request(buf: &[u8]) -> Result<Request<'_>, HttpError> {
    // A request head is printable ASCII: reject binary junk at once instead
    // of waiting for a blank line that will never come.
    let scan = &buf[..buf.len().min(MAX_HEAD + 4)];
    if !scan
        .iter()
        .all(|&b| matches!(b, b'\r' | b'\n' | b'\t' | 0x20..=0x7e))
    {
        return Err(HttpError::Bad);
    }
    // The head ends at the first empty line. Lines end with CRLF, or a bare
    // LF, which RFC 9112 §2.2 lets a recipient accept.
    let head_end = match blank_line(buf) {
        Some(i) => i,
        // Not even the longest head plus its terminator fits.
        None if buf.len() >= MAX_HEAD + 4 => return Err(HttpError::TooLarge),
        None => return Err(HttpError::Incomplete),
    };
    if head_end > MAX_HEAD {
        return Err(HttpError::TooLarge);
    }
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| HttpError::Bad)?;
    let line = head
        .split('\n')
        .next()
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .ok_or(HttpError::Bad)?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::Bad);
    };
    if !matches!(version, "HTTP/1.0" | "HTTP/1.1")
        || method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_uppercase())
        || !target.starts_with('/')
    {
        return Err(HttpError::Bad);
    }
    let path = target.split('?').next().unwrap_or(target);
    Ok(Request { method, path })
}

/// Status, content type and body for a request.
pub fn respond(req: &Request<'_>, board: &Board) -> (u16, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.method != "GET" && req.method != "HEAD" {
        return (405, TEXT, "method not allowed\n".into());
    }
    match req.path {
        "/metrics" => (
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            board.with_snapshots(|s| prom::render(s, &board.info)),
        ),
        "/histograms" => (
            200,
            TEXT,
            board.with_snapshots(|s| prom::histograms(s, board.info.role)),
        ),
        // After a hand-over the endpoint is served by the successor: a probe
        // that still reaches this process learns that, not our drain.
        "/healthz" if board.handed_over() => (200, TEXT, "ok (handed over)\n".into()),
        "/healthz" if board.draining() => (503, TEXT, "draining\n".into()),
        "/healthz" if board.no_upstream_up() => (
            503,
            TEXT,
            "no upstream endpoint passes its health check\n".into(),
        ),
        "/healthz" => (200, TEXT, "ok\n".into()),
        // Liveness: 200 for as long as the process serves HTTP, draining or
        // not, so a liveness probe never kills a pod mid-drain and never
        // touches the tunnel port (where a probe would count as a failed
        // handshake).
        "/livez" => (200, TEXT, "alive\n".into()),
        _ => (404, TEXT, "not found\n".into()),
    }
}

/// Binds the endpoint (a start-up error if it cannot), with `SO_REUSEPORT`
/// like the proxy port: a second process of the same user started next to
/// this one (a Kubernetes surge pod on the host network) can bind it too.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    Ok(socket.into())
}

/// Serves `listener` on a dedicated thread until the process exits, and
/// folds published deltas every `fold_every` on another, so memory stays
/// bounded when nobody scrapes.
pub fn spawn(listener: TcpListener, board: Board, fold_every: Duration) -> std::io::Result<()> {
    let folder = board.clone();
    std::thread::Builder::new()
        .name("metrics-fold".into())
        .spawn(move || loop {
            std::thread::sleep(fold_every);
            folder.with_snapshots(|_| ());
        })?;
    let live = Arc::new(Mutex::new(Live::default()));
    // accept(2) honours SO_RCVTIMEO: an accept that loses a connection to
    // a successor (the socket is shared with it after a hand-over) returns
    // within 200 ms.
    socket2::SockRef::from(&listener).set_read_timeout(Some(Duration::from_millis(200)))?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            use crate::handover::{shared_listener_turn, Turn};
            use std::os::fd::AsRawFd;
            let handed = || {
                board
                    .info
                    .handed_over
                    .load(std::sync::atomic::Ordering::SeqCst)
            };
            // The flag is looked at after the wait for a connection and
            // before its accept, never after one: a connection accepted here
            // is always answered, and once a successor took the socket over
            // none is.
            // Requests answered on this thread (no thread could be made
            // for them) since the last WARN about it, and when that was.
            let mut inline_since_warn = 0u64;
            let mut last_warn: Option<Instant> = None;
            loop {
                match shared_listener_turn(listener.as_raw_fd(), handed) {
                    Turn::Accept => {}
                    Turn::Idle => continue,
                    Turn::HandedOver => break,
                }
                let conn = match listener.accept().map(|(c, _)| c) {
                    Ok(conn) => conn,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(_) => {
                        // EMFILE and friends: do not spin.
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                };
                let admitted = live.lock().unwrap_or_else(|p| p.into_inner()).admit(&conn);
                let Some(id) = admitted else { continue };
                // Counted until answered: the process waits for these
                // before it exits (`Board::wait_answered`).
                board
                    .info
                    .serving
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let answer = Answer {
                    conn,
                    board: board.clone(),
                    live: live.clone(),
                    id,
                };
                // The answer goes to a thread of its own through a slot this
                // loop can take it back from: with no thread to be had (the
                // process's or the user's thread limit), this thread answers
                // it, bounded by the head and write deadlines. Dropping it
                // instead left the connection open, held by its `Live`
                // handle, with no answer and no log line.
                let slot = Arc::new(Mutex::new(Some(answer)));
                let theirs = slot.clone();
                let spawned = std::thread::Builder::new()
                    .name("metrics-conn".into())
                    .spawn(move || {
                        let job = theirs.lock().unwrap_or_else(|p| p.into_inner()).take();
                        if let Some(job) = job {
                            job.run();
                        }
                    });
                if let Err(e) = spawned {
                    // Logged at most once a minute, with how many went
                    // unlogged (near the limit, spawning fails and succeeds
                    // by turns: once per spell flooded the log).
                    inline_since_warn += 1;
                    if last_warn.is_none_or(|t: Instant| t.elapsed() >= INLINE_WARN_EVERY) {
                        crate::warn!(
                            "metrics: no thread for a request ({e}{}); answered {inline_since_warn} request(s) on the accept thread, one at a time, each given {INLINE_HEAD_DEADLINE:?} to send its request",
                            crate::error::NO_THREAD_HINT
                        );
                        last_warn = Some(Instant::now());
                        inline_since_warn = 0;
                    }
                    let job = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
                    if let Some(job) = job {
                        job.run_inline();
                    }
                }
            }
            board
                .info
                .metrics_stopped
                .store(true, std::sync::atomic::Ordering::SeqCst);
        })
        .map(|_| ())
}

/// One accepted request to answer, and the bookkeeping to undo once it is.
struct Answer {
    conn: TcpStream,
    board: Board,
    live: Arc<Mutex<Live>>,
    id: u64,
}

impl Answer {
    fn run(self) {
        self.answer(HEAD_DEADLINE);
    }

    /// On the accept thread (no thread could be made): the request must
    /// come within [`INLINE_HEAD_DEADLINE`], so that clients that connect
    /// and send nothing hold the others up for that long each, not for
    /// [`HEAD_DEADLINE`].
    fn run_inline(self) {
        self.answer(INLINE_HEAD_DEADLINE);
    }

    fn answer(self, head_deadline: Duration) {
        serve(self.conn, &self.board, head_deadline);
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(self.id);
        self.board
            .info
            .serving
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Reads into `buf` until `deadline`; `None` when the client is gone, too
/// slow, or the deadline has passed.
fn read_by(conn: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> Option<usize> {
    let left = deadline.checked_duration_since(Instant::now())?;
    if left.is_zero() {
        return None;
    }
    conn.set_read_timeout(Some(left)).ok()?;
    match conn.read(buf) {
        Ok(0) | Err(_) => None,
        Ok(n) => Some(n),
    }
}

fn serve(mut conn: TcpStream, board: &Board, head_deadline: Duration) {
    let deadline = Instant::now() + head_deadline;
    let mut buf = vec![0u8; MAX_HEAD + 4];
    let mut filled = 0;
    let result = loop {
        match parse_request(&buf[..filled]) {
            Err(HttpError::Incomplete) => {}
            other => break other,
        }
        match read_by(&mut conn, &mut buf[filled..], deadline) {
            None => return, // gone or too slow: nothing to answer
            Some(n) => filled += n,
        }
    };
    // A HEAD answer has the GET answer's header fields, its
    // `content-length` included, and no body (RFC 9110 §9.3.2, §8.6).
    let (status, ctype, body, head_only) = match result {
        Ok(req) => {
            let (s, c, b) = respond(&req, board);
            (s, c, b, req.method == "HEAD")
        }
        Err(HttpError::TooLarge) => (
            431,
            "text/plain",
            "request header too large\n".into(),
            false,
        ),
        Err(_) => (400, "text/plain", "bad request\n".into(), false),
    };
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let deadline = Instant::now() + WRITE_DEADLINE;
    if write_by(&mut conn, head.as_bytes(), deadline)
        && (head_only || write_by(&mut conn, body.as_bytes(), deadline))
    {
        linger(conn);
    }
}

/// Closes after the answer without losing it: FIN first, then read and drop
/// what the client still sends (a head we rejected as too large, say), for at
/// most 64 KiB or one second. Closing with unread input would send RST, and
/// the client could lose the answer before reading it (nginx's
/// `lingering_close` does the same).
fn linger(mut conn: TcpStream) {
    let _ = conn.shutdown(Shutdown::Write);
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut sink = [0u8; 4096];
    let mut left: usize = 64 * 1024;
    while left > 0 {
        match read_by(&mut conn, &mut sink, deadline) {
            Some(n) => left = left.saturating_sub(n),
            None => break,
        }
    }
}

/// Writes all of `data` before `deadline`; `false` if it could not.
fn write_by(conn: &mut TcpStream, mut data: &[u8], deadline: Instant) -> bool {
    while !data.is_empty() {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            return false;
        };
        if left.is_zero() || conn.set_write_timeout(Some(left)).is_err() {
            return false;
        }
        match conn.write(data) {
            Ok(0) | Err(_) => return false,
            Ok(n) => data = &data[n..],
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        assert_eq!(
            parse_request(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"),
            Ok(Request {
                method: "GET",
                path: "/metrics"
            })
        );
        assert_eq!(
            parse_request(b"GET /metrics HTTP/1.1\r\n"),
            Err(HttpError::Incomplete)
        );
        for bad in [
            &b"\x16\x03\x01\x00\x10junk\r\n\r\n"[..],
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"GET /a HTTP/9\r\n\r\n",
            b"get /a HTTP/1.1\r\n\r\n",
            b"GET /a b HTTP/1.1\r\n\r\n",
            b"\r\n\r\n",
            b"\xff\xfe /x HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(parse_request(bad), Err(HttpError::Bad), "{bad:?}");
        }
        let huge = vec![b'a'; MAX_HEAD + 4];
        assert_eq!(parse_request(&huge), Err(HttpError::TooLarge));
        // Bare LF line ends are accepted (RFC 9112 §2.2).
        assert_eq!(
            parse_request(b"GET /healthz HTTP/1.1\n\n"),
            Ok(Request {
                method: "GET",
                path: "/healthz"
            })
        );
        // The largest head is accepted however it is split: its first
        // MAX_HEAD bytes alone are only incomplete.
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD, b'a');
        assert_eq!(parse_request(&big), Err(HttpError::Incomplete));
        big.extend_from_slice(b"\r\n\r\n");
        assert!(parse_request(&big).is_ok());
    }

    #[test]
    fn routes() {
        let board = Board::new(1, "forward");
        let get = |p| {
            respond(
                &Request {
                    method: "GET",
                    path: p,
                },
                &board,
            )
            .0
        };
        assert_eq!(get("/metrics"), 200);
        assert_eq!(get("/histograms"), 200);
        assert_eq!(get("/healthz"), 200);
        assert_eq!(get("/nope"), 404);
        assert_eq!(
            respond(
                &Request {
                    method: "POST",
                    path: "/metrics"
                },
                &board
            )
            .0,
            405
        );
        board
            .info
            .draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(get("/healthz"), 503);
        assert_eq!(get("/livez"), 200, "liveness must hold while draining");
    }

    /// The fuzz seeds parse as requests (and the parser survives them).
    #[test]
    fn fuzz_seeds_parse() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fuzz/corpus/http_request"
        );
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            assert!(
                parse_request(&data).is_ok(),
                "{:?}",
                String::from_utf8_lossy(&data)
            );
            n += 1;
        }
        assert!(n >= 2);
    }
}
