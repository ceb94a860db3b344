//! Memory per connection, per role: what sizing (`max_connections`, the
//! Kubernetes memory limits in deploy/) is derived from.
//!
//! For each role, one process is measured while it holds `MEM_CONNS`
//! (default 2000) **idle** sessions (established end to end, one 1 KiB round
//! trip done, then silent), and then `MEM_BUSY` (default 200) more **busy**
//! sessions whose client sends without reading, so that every buffer on the
//! path fills (the worst case: a slow reader behind a fast writer).
//!
//! Two figures per state, per connection:
//! * **RSS**: the process's `VmRSS` growth (`/proc/PID/status`), user space:
//!   relay buffers, session state, allocator overhead;
//! * **socket**: the kernel memory queued on the process's own sockets
//!   (`ss -tm`: receive queue `r` + send queue `w` + forward-alloc `f`),
//!   which a cgroup v2 memory limit also charges to the container.
//!
//! Run: `cargo bench --bench memory` (`MEM_CONNS=N MEM_BUSY=M` to change the
//! counts). Results go in docs/BENCHMARKS.md ("Memory per connection").
//! Loopback only; every loop is bounded in time and count.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Kernel memory (bytes) queued on the TCP sockets `pid` owns, from
/// `ss -tnmp`: skmem's r (receive queue) + w (queued for sending) + f
/// (forward-allocated).
fn socket_bytes(pid: u32) -> u64 {
    let out = Command::new("ss").args(["-tnmpH"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let needle = format!("pid={pid},");
    let mut total = 0;
    // One socket per entry; skmem may sit on the same line or the next one.
    let mut mine = false;
    for line in text.lines() {
        if !line.starts_with(char::is_whitespace) {
            mine = line.contains(&needle);
        }
        if !mine {
            continue;
        }
        if let Some(sk) = line.split("skmem:(").nth(1) {
            for field in sk.trim_end_matches(')').split(',') {
                let (k, v) = field.split_at(field.find(|c: char| c.is_ascii_digit()).unwrap_or(0));
                if matches!(k, "r" | "w" | "f") {
                    total += v.trim_end_matches(')').parse::<u64>().unwrap_or(0);
                }
            }
        }
    }
    total
}

/// Opens `n` sessions through `addr`, each with one 1 KiB round trip.
fn idle_sessions(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut out = Vec::with_capacity(n);
    let req = vec![7u8; 1024];
    let mut resp = vec![0u8; 1024];
    while out.len() < n && Instant::now() < deadline {
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(&req).unwrap();
        c.read_exact(&mut resp).unwrap();
        out.push(c);
    }
    assert_eq!(out.len(), n, "could not open {n} sessions in time");
    out
}

/// Opens `n` sessions whose clients write up to 8 MiB without reading: the
/// echo origin's replies back up, and every buffer on the path fills.
fn busy_sessions(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut out = idle_sessions(addr, n);
    let chunk = vec![1u8; 64 * 1024];
    for c in &mut out {
        c.set_nonblocking(true).unwrap();
    }
    // Write until every client's socket refuses more (bounded by time and
    // by 8 MiB per client).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut written = vec![0usize; n];
    loop {
        let mut progress = false;
        for (i, c) in out.iter_mut().enumerate() {
            if written[i] >= 8 << 20 {
                continue;
            }
            if let Ok(k) = c.write(&chunk) {
                written[i] += k;
                progress = true;
            }
        }
        if !progress || Instant::now() > deadline {
            // Let the last writes settle into the proxy's buffers.
            thread::sleep(Duration::from_millis(500));
            break;
        }
    }
    out
}

struct Row {
    role: &'static str,
    base_kib: u64,
    idle_rss: f64,
    idle_sock: f64,
    busy_rss: f64,
    busy_sock: f64,
}

fn measure(role: &'static str, target: &Target, pid: u32, conns: usize, busy: usize) -> Row {
    thread::sleep(Duration::from_millis(300));
    let (rss0, sock0) = (rss_kib(pid), socket_bytes(pid));
    let idle = idle_sessions(target.addr, conns);
    thread::sleep(Duration::from_millis(300));
    let (rss1, sock1) = (rss_kib(pid), socket_bytes(pid));
    let hot = busy_sessions(target.addr, busy);
    let (rss2, sock2) = (rss_kib(pid), socket_bytes(pid));
    if std::env::var("MEM_DEBUG").is_ok() {
        eprintln!("{role}: rss {rss0} {rss1} {rss2} KiB, sockets {sock0} {sock1} {sock2} B");
    }
    drop(hot);
    drop(idle);
    let per = |d: f64, n: usize| d / n as f64;
    Row {
        role,
        base_kib: rss0,
        idle_rss: per(rss1.saturating_sub(rss0) as f64, conns),
        idle_sock: per(sock1.saturating_sub(sock0) as f64 / 1024.0, conns),
        busy_rss: per(rss2.saturating_sub(rss1) as f64, busy),
        busy_sock: per(sock2.saturating_sub(sock1) as f64 / 1024.0, busy),
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let conns = env_usize("MEM_CONNS", 2000);
    let busy = env_usize("MEM_BUSY", 200);
    let origin = echo_origin();
    let mut rows = Vec::new();
    {
        let t = shardproxy_pair(origin);
        // children[0] is the proxy clients connect to.
        rows.push(measure("forward", &t, t.children[0].id(), conns, busy));
    }
    {
        let t = encrypted_pair(origin);
        rows.push(measure("entry", &t, t.children[0].id(), conns, busy));
    }
    {
        let t = encrypted_pair(origin);
        rows.push(measure("exit", &t, t.children[1].id(), conns, busy));
    }
    println!(
        "{conns} idle sessions, then {busy} busy (backpressured) sessions, one shard per process, default 16 KiB buffers\n"
    );
    println!("| role | RSS at start | idle: RSS / conn | idle: socket / conn | busy: RSS / conn | busy: socket / conn |");
    println!("|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {:.1} MiB | {:.1} KiB | {:.1} KiB | {:.1} KiB | {:.1} KiB |",
            r.role,
            r.base_kib as f64 / 1024.0,
            r.idle_rss,
            r.idle_sock,
            r.busy_rss,
            r.busy_sock
        );
    }
}
