//! Peers that fail, on loopback: an origin that resets, an exit that is
//! killed and comes back, an upstream that never reads, file-descriptor
//! exhaustion, a flood of half-finished handshakes, and a log consumer
//! that stops reading.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Streams data to `addr` until the connection ends; returns how it ended.
fn stream_until_end(addr: SocketAddr, limit: Duration) -> End {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let chunk = vec![0x61u8; 64 * 1024];
    let start = Instant::now();
    while start.elapsed() < limit {
        if c.write_all(&chunk).is_err() {
            break;
        }
    }
    read_until_end(&mut c, Duration::from_secs(10)).0
}

#[test]
fn origin_reset_mid_transfer_aborts_the_client_and_the_shard_keeps_serving() {
    // The origin reads 100 KB, then resets (SO_LINGER 0).
    let origin = serve(|mut s| {
        let mut buf = vec![0u8; 100_000];
        let _ = s.read_exact(&mut buf);
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    });
    let key = key_file(&[&keygen()]);
    let exit = Proxy::exit(origin, &key).start();
    let entry = Proxy::entry(exit.addr, &key).start();
    // Send more than the origin reads, then only read: a pending RST is
    // reported to the first syscall after it, so no write may consume it.
    let send_then_read = || {
        let mut c = TcpStream::connect(entry.addr).unwrap();
        c.write_all(&vec![0x61u8; 200_000]).unwrap();
        read_until_end(&mut c, Duration::from_secs(10)).0
    };
    assert_eq!(send_then_read(), End::Reset, "client saw a clean end");
    // The same shards still serve (and abort again).
    assert_eq!(send_then_read(), End::Reset);
    let (_, exit_lines) = exit.terminate();
    assert_eq!(
        summaries(&exit_lines)[0].get("upstream_reset"),
        2,
        "{exit_lines:?}"
    );
    let (_, entry_lines) = entry.terminate();
    assert_eq!(
        summaries(&entry_lines)[0].get("upstream_reset"),
        2,
        "{entry_lines:?}"
    );
}

#[test]
fn killed_exit_aborts_clients_fails_fast_and_recovers_without_restarting_the_entry() {
    let key = key_file(&[&keygen()]);
    let origin = echo_origin();
    let mut exit = Proxy::exit(origin, &key).start();
    let exit_addr = exit.addr;
    let entry = Proxy::entry(exit_addr, &key)
        .args(["--connect-timeout", "2s"])
        .start();
    // A transfer in flight when the exit dies.
    let mut c = TcpStream::connect(entry.addr).unwrap();
    c.write_all(b"before").unwrap();
    let mut b = [0u8; 6];
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.read_exact(&mut b).unwrap();
    exit.kill(); // SIGKILL: no end chunk, no FIN from a drain
    let _ = c.write_all(b"after");
    assert_eq!(
        read_until_end(&mut c, Duration::from_secs(10)).0,
        End::Reset,
        "clean EOF after the exit died"
    );
    // While it is down, new clients fail fast.
    let start = Instant::now();
    let mut d = TcpStream::connect(entry.addr).unwrap();
    let _ = d.write_all(b"x");
    let (end, n) = read_until_end(&mut d, Duration::from_secs(5));
    assert!(end != End::Open && n == 0, "{end:?} {n}");
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "not fast: {:?}",
        start.elapsed()
    );
    // The exit comes back on the same address; the entry just works again.
    let _exit2 = Proxy::exit(origin, &key).listen(exit_addr).start();
    let mut e = TcpStream::connect(entry.addr).unwrap();
    e.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    e.write_all(b"again").unwrap();
    let mut b = [0u8; 5];
    e.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"again");
}

/// An origin for one connection that tells when it has the client's
/// first 3 bytes, then how its connection ended.
fn recording_origin() -> (SocketAddr, std::sync::mpsc::Receiver<Option<End>>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let Ok((mut c, _)) = l.accept() else { return };
        let mut first = [0u8; 3];
        if c.read_exact(&mut first).is_err() {
            return;
        }
        let _ = tx.send(None);
        let _ = tx.send(Some(read_until_end(&mut c, Duration::from_secs(20)).0));
    });
    (addr, rx)
}

/// A process that dies at once (`kill -9`, the OOM killer) resets its
/// plain-TCP peers: the kernel's close would otherwise send a FIN after
/// part of a stream, which passes for a clean end (a break-it round saw
/// an origin take 355 KiB of a 512 KiB upload as a whole request). For a
/// `forward`, both of its peers; for an exit, its origin; for an entry,
/// its client (the other peer in each pair hears of it through the
/// tunnel, which resets already).
#[test]
fn a_killed_proxy_resets_its_plain_peers_never_a_clean_end() {
    let key = key_file(&[&keygen()]);
    for victim in ["forward", "exit", "entry"] {
        let (origin, seen) = recording_origin();
        let (mut proxies, front) = match victim {
            "forward" => {
                let f = Proxy::forward(origin).start();
                let a = f.addr;
                (vec![f], a)
            }
            _ => {
                let exit = Proxy::exit(origin, &key).start();
                let entry = Proxy::entry(exit.addr, &key).start();
                let a = entry.addr;
                (vec![exit, entry], a)
            }
        };
        let mut c = TcpStream::connect(front).unwrap();
        c.write_all(b"abc").unwrap();
        // The bytes are at the origin: nothing is in flight when it dies.
        assert_eq!(
            seen.recv_timeout(Duration::from_secs(10)),
            Ok(None),
            "{victim}"
        );
        let i = match victim {
            "entry" => 1,
            _ => 0,
        };
        proxies[i].kill();
        let client_end = read_until_end(&mut c, Duration::from_secs(10)).0;
        let origin_end = seen.recv_timeout(Duration::from_secs(20)).unwrap();
        assert_eq!(
            (client_end, origin_end),
            (End::Reset, Some(End::Reset)),
            "{victim} killed: (client, origin)"
        );
    }
}

#[test]
fn blackhole_upstream_is_closed_by_the_idle_timeout_with_bounded_memory() {
    // Accepts, never reads, holds the socket for up to 30 s. The sleep is
    // the blackhole itself, not synchronization: nothing waits for it.
    let origin = serve(|s| {
        thread::sleep(Duration::from_secs(30));
        drop(s);
    });
    let proxy = Proxy::forward(origin)
        .args(["--idle-timeout", "1s"])
        .start();
    let baseline = proxy.rss_kib();
    let start = Instant::now();
    let end = stream_until_end(proxy.addr, Duration::from_secs(20));
    assert_ne!(end, End::Open);
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "idle timeout did not fire: {:?}",
        start.elapsed()
    );
    let growth = proxy.rss_kib().saturating_sub(baseline);
    assert!(growth < 8 * 1024, "RSS grew {growth} KiB");
    let (_, lines) = proxy.terminate();
    assert_eq!(summaries(&lines)[0].get("idle_timeout"), 1, "{lines:?}");
}

fn proc_cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<u64> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|v| v.parse().unwrap())
        .collect();
    f[0] + f[1]
}

#[test]
fn fd_exhaustion_is_counted_does_not_spin_and_recovers() {
    let origin = echo_origin();
    // 64 descriptors: the executor takes a handful, each pair takes two.
    let proxy = Proxy::forward(origin)
        .ulimit("-n", 64)
        .args(["--max-connections", "1000", "--drain-timeout", "2s"])
        .start();
    let addr = proxy.addr;
    let base_fds = proxy.open_fds();
    // Hold 60 connections: far more than fit in 64 descriptors.
    let held: Vec<TcpStream> = (0..60)
        .filter_map(|_| TcpStream::connect(addr).ok())
        .collect();
    assert!(held.len() >= 40);
    // The shard ran out of descriptors and backs off.
    proxy.wait_for_log(|l| l.contains("accept failed"), Duration::from_secs(10));
    // The clients that did not fit wait in the backlog: not accepted and reset.
    assert!(accept_queue(addr) > 0, "no client left in the accept queue");
    // A CPU sampling window: the measured quantity, not synchronization.
    let t0 = proc_cpu_ticks(proxy.pid());
    thread::sleep(Duration::from_secs(2));
    let used = proc_cpu_ticks(proxy.pid()) - t0;
    // 2 s at 100 ticks/s; under 10% of one core is under 20 ticks.
    assert!(used < 20, "spinning: {used} ticks in 2 s");
    let warns = proxy
        .log()
        .iter()
        .filter(|l| l.contains("accept failed"))
        .count();
    assert!(warns >= 1, "EMFILE never logged: {:?}", proxy.log());
    assert!(warns <= 5, "not rate-limited: {warns} lines");
    // Recovery: release everything, then a new client is served. First the
    // shard works through the released clients still in its accept queue
    // (each takes two descriptors for a moment, which can exhaust them
    // again); a client arriving before it is idle could be reset for that.
    drop(held);
    poll_until(Duration::from_secs(20), || {
        let (queued, open) = (accept_queue(addr), proxy.open_fds());
        if queued == 0 && open <= base_fds {
            Ok(())
        } else {
            Err(format!(
                "not idle: {queued} in the accept queue, {open} descriptors (idle: {base_fds})"
            ))
        }
    });
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"alive").unwrap();
    let mut b = [0u8; 5];
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"alive");
    drop(c);
    let (_, all) = proxy.terminate();
    let errors = summaries(&all)[0].get("accept_errors");
    assert!(errors > 0, "accept errors not counted: {all:?}");
}

/// Connections waiting in the accept queue of the listener(s) on `addr`:
/// for a listening socket, /proc/net/tcp reports that queue as `rx_queue`.
fn accept_queue(addr: SocketAddr) -> usize {
    let SocketAddr::V4(v4) = addr else {
        panic!("IPv4 only: {addr}")
    };
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(v4.ip().octets()),
        v4.port()
    );
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let queues: Vec<usize> = table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f[1] == local && f[3] == "0A") // 0A: LISTEN
        .map(|f| usize::from_str_radix(f[4].split(':').nth(1).unwrap(), 16).unwrap())
        .collect();
    assert!(!queues.is_empty(), "no listener on {addr} in /proc/net/tcp");
    queues.iter().sum()
}

/// Raises this process's open-file limit to its hard limit.
fn raise_nofile() -> u64 {
    let (_, hard) = rlimit::Resource::NOFILE.get().unwrap();
    let _ = rlimit::Resource::NOFILE.set(hard, hard);
    rlimit::Resource::NOFILE.get().unwrap().0
}

#[test]
fn handshake_flood_is_closed_at_the_timeout_while_real_clients_get_through() {
    const FLOOD: usize = 2000;
    if raise_nofile() < (FLOOD as u64 + 500) {
        missing(&format!(
            "RLIMIT_NOFILE high enough for {FLOOD} sockets (ulimit -n)"
        ));
        return;
    }
    let key = key_file(&[&keygen()]);
    // Room for the whole flood (--max-handshakes): this checks that each
    // pending handshake is closed at its deadline; eviction when the budget
    // overflows is tests/tunnel.rs's.
    let exit = Proxy::exit(echo_origin(), &key)
        .args(["--handshake-timeout", "3s", "--max-connections", "5000"])
        .args(["--max-handshakes", "4096"])
        .start();
    let entry = Proxy::entry(exit.addr, &key).start();
    let baseline = exit.rss_kib();
    let base_fds = exit.open_fds();
    // 2000 connections that send half a hello and stall.
    let flood: Vec<TcpStream> = (0..FLOOD)
        .map(|i| {
            let mut s = TcpStream::connect(exit.addr).unwrap();
            s.write_all(&random_bytes(62, i as u64 + 1)).unwrap();
            s
        })
        .collect();
    let started = Instant::now();
    // Every flood connection was accepted (one descriptor each: no upstream
    // before the handshake). The kernel completes them before the exit
    // accepts, and nothing logs an accept, so this watches /proc.
    poll_until(Duration::from_secs(10), || {
        let open = exit.open_fds();
        if open >= base_fds + FLOOD {
            Ok(())
        } else {
            Err(format!(
                "exit accepted only {} of {FLOOD}",
                open.saturating_sub(base_fds)
            ))
        }
    });
    let per_pending = exit.rss_kib().saturating_sub(baseline) * 1024 / FLOOD as u64;
    // Legitimate clients during the flood.
    let mut lat = Vec::new();
    while started.elapsed() < Duration::from_millis(2500) {
        let t = Instant::now();
        let mut c = TcpStream::connect(entry.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"legit").unwrap();
        let mut b = [0u8; 5];
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"legit");
        c.shutdown(Shutdown::Write).unwrap();
        lat.push(t.elapsed());
    }
    lat.sort();
    eprintln!(
        "legitimate clients during a {FLOOD}-connection handshake flood: {} requests, p50 {:?}, p99 {:?}, max {:?}; exit RSS per pending handshake {per_pending} B",
        lat.len(),
        lat[lat.len() / 2],
        lat[lat.len() * 99 / 100],
        lat[lat.len() - 1]
    );
    assert!(lat.len() >= 10, "legitimate clients starved");
    assert!(
        per_pending < 16 * 1024,
        "{per_pending} bytes per pending handshake"
    );
    // Every flood connection is closed by the exit at its deadline, unanswered.
    let deadline = started + Duration::from_secs(3 + 10);
    for (i, mut s) in flood.into_iter().enumerate() {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        let (end, n) = read_until_end(&mut s, left);
        assert_eq!(n, 0, "flood connection {i} got an answer");
        assert_ne!(end, End::Open, "flood connection {i} still open");
    }
    assert!(
        started.elapsed() >= Duration::from_millis(2900),
        "closed before the handshake timeout"
    );
    let (_, lines) = exit.terminate();
    assert!(
        summaries(&lines)[0].get("handshake_failures") >= FLOOD as u64,
        "{lines:?}"
    );
}

/// SIGHUPs while draining (here with the key file replaced by a FIFO that
/// nobody writes) can neither block the signal thread nor the second
/// SIGTERM: the process exits at once, and the FIFO is never opened for a
/// blocking read.
#[test]
fn sighup_during_drain_cannot_hold_off_the_second_signal() {
    let key = key_file(&[&keygen()]);
    let mut exit = Proxy::exit(echo_origin(), &key)
        .shards(1)
        .args(["--drain-timeout", "60s"])
        .start();
    // A live connection keeps the drain going.
    let _held = TcpStream::connect(exit.addr).unwrap();
    exit.wait_for_log(|l| l.contains("listening on"), Duration::from_secs(5));
    std::fs::remove_file(&key).unwrap();
    assert!(std::process::Command::new("mkfifo")
        .arg(&key)
        .status()
        .unwrap()
        .success());
    // Before the drain: a reload of a FIFO is refused, not blocked on.
    exit.signal("HUP");
    exit.wait_for_log(|l| l.contains("not a regular file"), Duration::from_secs(5));
    exit.signal("TERM");
    exit.wait_for_log(|l| l.contains("draining"), Duration::from_secs(5));
    for _ in 0..200 {
        exit.signal("HUP");
    }
    exit.signal("TERM");
    let started = Instant::now();
    let status = exit.wait_exit(Duration::from_secs(10));
    let _ = std::fs::remove_file(&key);
    assert_eq!(status.code(), Some(1), "the second signal exits at once");
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Out of descriptors, with live connections and clients queued in the
/// backlog: SIGINT still ends the process within `--drain-timeout` + 1 s,
/// using little CPU while it waits. Then the same for two forwards pointed
/// at each other (a loop no start-up check can see), which exhaust their
/// descriptors on their own.
#[test]
fn sigint_ends_an_fd_exhausted_process_within_the_drain_timeout() {
    let origin = echo_origin();
    let mut proxy = Proxy::forward(origin)
        .ulimit("-n", 64)
        .args(["--max-connections", "1000", "--drain-timeout", "2s"])
        .start();
    let held: Vec<TcpStream> = (0..60)
        .filter_map(|_| TcpStream::connect(proxy.addr).ok())
        .collect();
    proxy.wait_for_log(|l| l.contains("accept failed"), Duration::from_secs(10));
    let sent = Instant::now();
    proxy.signal("INT");
    proxy.wait_for_log(
        |l| l.contains("draining: stopped accepting"),
        Duration::from_secs(5),
    );
    // A CPU sampling window inside the 2 s drain: the measured quantity.
    let t0 = proc_cpu_ticks(proxy.pid());
    thread::sleep(Duration::from_millis(1000));
    let used = proc_cpu_ticks(proxy.pid()) - t0;
    let status = proxy.wait_exit(Duration::from_secs(10));
    let took = sent.elapsed();
    assert!(status.success(), "{:?}", proxy.log());
    assert!(
        took < Duration::from_secs(3),
        "took {took:?} (drain timeout 2 s)"
    );
    // 1 s at 100 ticks/s: under 10% of one core.
    assert!(used < 10, "spinning while draining: {used} ticks in 1 s");
    drop(held);

    // Two forwards in a loop: A's upstream is B, B's is A.
    let b_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut a = Proxy::forward(b_port)
        .ulimit("-n", 256)
        .args(["--drain-timeout", "2s"])
        .start();
    let mut b = Proxy::forward(a.addr)
        .listen(b_port)
        .ulimit("-n", 256)
        .args(["--drain-timeout", "2s"])
        .start();
    // One client starts the storm; both fill up to their connection limit
    // (lowered to fit the 256 descriptors) or run out of descriptors.
    let _client = TcpStream::connect(a.addr).unwrap();
    poll_until(Duration::from_secs(20), || match a.open_fds() {
        n if n > 150 => Ok(()),
        n => Err(format!("only {n} descriptors in use")),
    });
    // A CPU sampling window: the measured quantity, not synchronization.
    let (ta, tb) = (proc_cpu_ticks(a.pid()), proc_cpu_ticks(b.pid()));
    thread::sleep(Duration::from_secs(2));
    let used = proc_cpu_ticks(a.pid()) - ta + proc_cpu_ticks(b.pid()) - tb;
    // Two processes, 2 s at 100 ticks/s: under a quarter of one core.
    assert!(used < 50, "the loop spins: {used} ticks in 2 s");
    let sent = Instant::now();
    a.signal("INT");
    b.signal("INT");
    let (sa, sb) = (
        a.wait_exit(Duration::from_secs(10)),
        b.wait_exit(Duration::from_secs(10)),
    );
    assert!(
        sent.elapsed() < Duration::from_secs(3),
        "took {:?}",
        sent.elapsed()
    );
    assert!(sa.success() && sb.success(), "{sa:?} {sb:?}");
}

/// A stderr that stops moving (Docker's blocking log mode, a paused pager)
/// never holds up a shard. With `--log-level debug` (a line per closed
/// connection) and the log's reader paused, 8000 connections still
/// complete: their lines overflow the pipe (64 KiB) and the log writer's
/// queue (4096 lines), and the rest are dropped, counted in
/// `shardproxy_log_lines_dropped_total` and reported, once stderr moves
/// again, where the gap is. With shard threads writing stderr themselves,
/// the shard blocks in `write(2)` after some 400 lines and the connections
/// time out; with the notice written before the next line the writer
/// dequeued, it came some 4000 lines before the gap.
#[test]
fn a_stuck_stderr_never_holds_up_the_shards() {
    const CONNS: usize = 8000;
    let origin = echo_origin();
    let proxy = Proxy::forward(origin)
        .shards(1)
        .args(["--log-level", "debug", "--metrics-listen", "127.0.0.1:0"])
        .start();
    let metrics = proxy.metrics_addr();
    proxy.pause_log();
    let deadline = Instant::now() + Duration::from_secs(120);
    // Connection i sends i + 1 bytes: its log line ("N B up") names it.
    for i in 0..CONNS {
        assert!(
            Instant::now() < deadline,
            "{CONNS} short connections did not complete in 120 s (at {i})"
        );
        let payload = vec![b'p'; i + 1];
        let mut c = TcpStream::connect(proxy.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(&payload).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back)
            .unwrap_or_else(|e| panic!("connection {i} with stderr stuck: {e}"));
        assert_eq!(back.len(), payload.len(), "connection {i}");
    }
    let (_, body) = http_get(metrics, "/metrics");
    let dropped = metric_sum(&body, "shardproxy_log_lines_dropped_total", &[]) as usize;
    assert!(dropped > 0, "no line counted as dropped: {body}");
    proxy.resume_log();
    // Every connection's line is either in the log or among the dropped.
    let closed = |l: &str| l.contains(" closed: ") && l.contains(" B up");
    proxy.wait_for_lines(closed, CONNS - dropped, Duration::from_secs(30));
    let notice = proxy.wait_for_log(
        |l| l.contains("line(s) dropped here"),
        Duration::from_secs(20),
    );
    let n =
        number_after(&notice, "log: ").unwrap_or_else(|| panic!("bad notice: {notice}")) as usize;
    assert_eq!(n, dropped, "one gap, reported whole: {notice}");
    // The notice stands where the gap is: the connections logged before it
    // come before the dropped ones, those after it after them (within a
    // couple of lines: consecutive sessions may log out of order).
    let log = proxy.log();
    let at = log.iter().position(|l| l == &notice).unwrap();
    let index = |l: &String| -> Option<usize> {
        let up = l.split(" B up").next()?.rsplit(' ').next()?;
        up.parse::<usize>().ok().map(|b| b - 1)
    };
    let before: Vec<usize> = log[..at]
        .iter()
        .filter(|l| closed(l))
        .filter_map(index)
        .collect();
    let after: Vec<usize> = log[at..]
        .iter()
        .filter(|l| closed(l))
        .filter_map(index)
        .collect();
    assert_eq!(before.len() + after.len() + dropped, CONNS);
    let mut seen = vec![false; CONNS];
    for &i in before.iter().chain(&after) {
        seen[i] = true;
    }
    let missing: Vec<usize> = (0..CONNS).filter(|&i| !seen[i]).collect();
    let (lo, hi) = (missing[0], missing[missing.len() - 1]);
    let late_before = before.iter().filter(|&&i| i > lo).count();
    let early_after = after.iter().filter(|&&i| i < hi).count();
    assert!(
        late_before <= 2 && early_after <= 2,
        "the notice ({notice}) is at line {at}, but the dropped lines are connections {lo}..={hi}: \
         {late_before} later connection(s) logged before it, {early_after} earlier ones after it"
    );
}

/// A start-up error is one line, and the process exits with it even when
/// stderr is a pipe that is already full and never read: that line too
/// goes through the log writer, with the bounded flush at exit. (Written
/// in place, it blocked the process for as long as the pipe stayed full.)
#[test]
fn a_start_up_error_exits_even_with_stderr_stuck() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    // Python fills a pipe (non-blocking while filling, blocking again
    // after, as a stuck consumer's pipe is) and starts the proxy on it.
    let script = r#"
import os, subprocess, sys, time
r, w = os.pipe()
os.set_blocking(w, False)
try:
    while True:
        os.write(w, b"x" * 4096)
except BlockingIOError:
    pass
os.set_blocking(w, True)
t = time.time()
p = subprocess.Popen([sys.argv[1], "forward", "--listen", "127.0.0.1:" + sys.argv[2],
                      "--upstream", "127.0.0.1:9"], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=w)
try:
    rc = p.wait(timeout=30)
except subprocess.TimeoutExpired:
    p.kill()
    p.wait()
    print("hung")
    sys.exit(0)
print(rc, round(time.time() - t, 2))
"#;
    let out = Command::new("python3")
        .args(["-c", script, env!("CARGO_BIN_EXE_shardproxy"), &port])
        .output()
        .expect("python3");
    let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let mut parts = said.split(' ');
    let rc = parts.next().unwrap_or("");
    let secs: f64 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::MAX);
    assert_eq!(
        rc,
        "2",
        "exit code, or hung: {said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(secs < 10.0, "took {secs} s with stderr stuck");
    drop(taken);
}

/// A low soft descriptor limit under a high hard one is raised before
/// anything else needs descriptors (the start-up check built an executor
/// first, and failed at a soft limit of 8 telling the operator to raise a
/// limit that was already high).
#[test]
fn a_low_soft_descriptor_limit_is_raised_before_the_start_up_check() {
    let p = Proxy::forward(echo_origin()).ulimit("-Sn", 8).start();
    let data = random_bytes(3000, 8);
    assert!(echo_round_trip(p.addr, std::sync::Arc::new(data.clone())) == data);
}
