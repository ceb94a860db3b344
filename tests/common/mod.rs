//! Shared helpers for the integration tests: start the real binary, run
//! in-test origins on 127.0.0.1:0, generate and hash data.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub const BIN: &str = env!("CARGO_BIN_EXE_shardproxy");

/// A running shardproxy process with its stderr captured line by line.
pub struct Proxy {
    pub child: Child,
    pub addr: SocketAddr,
    pub lines: Arc<Mutex<Vec<String>>>,
}

impl Proxy {
    /// Starts `shardproxy <args>` and waits until every shard logged its
    /// listen address (`shards` of them).
    pub fn start(args: &[&str], shards: usize) -> Proxy {
        let mut child = Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn shardproxy");
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let sink = lines.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let addr = line.split(" listening on ").nth(1).map(|rest| {
                    rest.split(' ')
                        .next()
                        .unwrap()
                        .parse::<SocketAddr>()
                        .unwrap()
                });
                // Record the line before announcing it, so a caller woken by
                // the address also sees the line in `log()`.
                sink.lock().unwrap().push(line);
                if let Some(addr) = addr {
                    let _ = tx.send(addr);
                }
            }
        });
        let mut addr = None;
        for _ in 0..shards {
            match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(a) => addr = Some(a),
                Err(_) => {
                    let _ = child.kill();
                    panic!("proxy did not start: {:?}", lines.lock().unwrap());
                }
            }
        }
        Proxy {
            child,
            addr: addr.unwrap(),
            lines,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Sends SIGTERM and waits for exit (bounded).
    pub fn terminate(mut self) -> (ExitStatus, Vec<String>) {
        self.signal("TERM");
        let status = wait_timeout(&mut self.child, Duration::from_secs(60));
        // Let the reader thread drain the pipe.
        thread::sleep(Duration::from_millis(100));
        let lines = self.lines.lock().unwrap().clone();
        (status, lines)
    }

    pub fn log(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Resident set size in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_timeout(child: &mut Child, limit: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("process did not exit within {limit:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// One shard's drain summary, parsed from its log line.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub fields: std::collections::HashMap<String, u64>,
}

impl Summary {
    pub fn get(&self, key: &str) -> u64 {
        self.fields.get(key).copied().unwrap_or(0)
    }
}

pub fn summaries(lines: &[String]) -> Vec<Summary> {
    lines
        .iter()
        .filter_map(|l| l.split(" summary: ").nth(1))
        .map(|rest| Summary {
            fields: rest
                .split(' ')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.parse().unwrap()))
                .collect(),
        })
        .collect()
}

/// Deterministic pseudo-random bytes (xorshift), so no RNG crate is needed.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// An echo origin: every connection gets its bytes back, FIN for FIN.
pub fn echo_origin() -> SocketAddr {
    serve(|mut s| {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) => {
                    let _ = s.shutdown(Shutdown::Write);
                    return;
                }
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    })
}

/// Runs `handler` on a thread per connection of a fresh 127.0.0.1:0 listener.
pub fn serve(handler: impl Fn(TcpStream) + Send + Sync + Clone + 'static) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let h = handler.clone();
            thread::spawn(move || h(conn));
        }
    });
    addr
}

/// Sends `data` and reads everything back concurrently; returns what came back.
pub fn echo_round_trip(addr: SocketAddr, data: Arc<Vec<u8>>) -> Vec<u8> {
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sender = thread::spawn(move || {
        for chunk in data.chunks(256 * 1024) {
            writer.write_all(chunk).unwrap();
        }
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    (&stream).read_to_end(&mut back).unwrap();
    sender.join().unwrap();
    back
}

/// A 127.0.0.1 port that nothing listens on (bound, then released).
pub fn dead_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Result of reading a socket until it ends.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// Clean EOF (FIN).
    Eof,
    /// ECONNRESET or another error.
    Reset,
    /// Still open after the timeout.
    Open,
}

/// Reads and discards until EOF/error or `limit`.
pub fn read_until_end(stream: &mut TcpStream, limit: Duration) -> (End, usize) {
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let start = Instant::now();
    let mut total = 0;
    let mut buf = [0u8; 16 * 1024];
    while start.elapsed() < limit {
        match stream.read(&mut buf) {
            Ok(0) => return (End::Eof, total),
            Ok(n) => total += n,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return (End::Reset, total),
        }
    }
    (End::Open, total)
}

/// Writes key lines to a fresh 0600 file in the temp dir; returns its path.
pub fn key_file(keys: &[&str]) -> String {
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "shardproxy-test-{}-{}.key",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .unwrap();
    for k in keys {
        writeln!(f, "{k}").unwrap();
    }
    path.to_string_lossy().into_owned()
}

/// A fresh key from the real `keygen` command.
pub fn keygen() -> String {
    let out = Command::new(BIN).arg("keygen").output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// What an origin connection saw.
#[derive(Debug)]
pub struct Seen {
    pub bytes: Vec<u8>,
    pub end: End,
}

/// A sink origin that reports each connection's bytes and how it ended.
pub fn recording_origin() -> (SocketAddr, mpsc::Receiver<Seen>) {
    let (tx, rx) = mpsc::channel();
    let tx = Arc::new(Mutex::new(tx));
    let addr = serve(move |mut s| {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut bytes = Vec::new();
        let mut buf = [0u8; 64 * 1024];
        let end = loop {
            match s.read(&mut buf) {
                Ok(0) => break End::Eof,
                Ok(n) => bytes.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break End::Open,
                Err(_) => break End::Reset,
            }
        };
        let _ = tx.lock().unwrap().send(Seen { bytes, end });
    });
    (addr, rx)
}

/// How a [`mitm`] tampers with the entry→exit byte stream.
#[derive(Clone, Copy, Debug)]
pub enum Tamper {
    /// Forward everything, recording the entry→exit bytes.
    Record,
    /// Flip one bit of the byte at this offset.
    Flip(usize),
    /// Forward this many bytes, then close both sides with FIN.
    Cut(usize),
}

/// A test-only TCP man-in-the-middle in front of `target`. Returns its
/// address and the recorded entry→exit bytes of the last connection.
pub fn mitm(target: SocketAddr, tamper: Tamper) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let record = Arc::new(Mutex::new(Vec::new()));
    let rec = record.clone();
    let addr = serve(move |inbound| {
        let outbound = TcpStream::connect(target).unwrap();
        let (mut in_r, mut out_w) = (inbound.try_clone().unwrap(), outbound.try_clone().unwrap());
        let (mut out_r, mut in_w) = (outbound, inbound);
        let back = thread::spawn(move || {
            let _ = std::io::copy(&mut out_r, &mut in_w);
            let _ = in_w.shutdown(Shutdown::Write);
        });
        let mut seen = 0usize;
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = match in_r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let chunk = &mut buf[..n];
            match tamper {
                Tamper::Record => rec.lock().unwrap().extend_from_slice(chunk),
                Tamper::Flip(at) if (seen..seen + n).contains(&at) => chunk[at - seen] ^= 0x01,
                Tamper::Cut(at) if seen + n >= at => {
                    let _ = out_w.write_all(&chunk[..at - seen]);
                    let _ = out_w.shutdown(Shutdown::Both);
                    let _ = in_r.shutdown(Shutdown::Both);
                    return;
                }
                _ => {}
            }
            seen += n;
            if out_w.write_all(chunk).is_err() {
                break;
            }
        }
        let _ = out_w.shutdown(Shutdown::Write);
        let _ = back.join();
    });
    (addr, record)
}
