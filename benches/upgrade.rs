//! Upgrades under load: steady connection churn and a steady 1 KiB
//! request/response load through an entry+exit pair, with one upgrade of
//! each kind in the middle: the exit re-executed by SIGUSR2, then the entry
//! replaced by a process started with `--takeover`.
//!
//! Reports failed connections and requests (must be 0), the p99 in the
//! second after each upgrade against the second before it, and how long the
//! old and new processes overlapped (successor started → predecessor
//! exited).
//!
//! Run: `cargo bench --bench upgrade` (`UPGRADE_SECS=N`, default 12: the
//! exit is upgraded at a third, the entry at two thirds). Results go in
//! docs/BENCHMARKS.md ("Upgrades under load"). Loopback only; every loop is
//! bounded in time and count.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use hdrhistogram::Histogram;

/// Latency samples (µs) with the time they ended, and failures.
#[derive(Default)]
struct Samples {
    at: Vec<(f64, u64)>,
}

struct Shared {
    start: Instant,
    stop: AtomicBool,
    churn: Mutex<Samples>,
    requests: Mutex<Samples>,
    churn_failed: AtomicU64,
    request_failed: AtomicU64,
}

fn spawn_logged(args: &[String], log: &std::path::Path) -> Child {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

fn wait_for_line(log: &std::path::Path, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(f) = std::fs::File::open(log) {
            for line in BufReader::new(f).lines().map_while(Result::ok) {
                if line.contains(want) {
                    return line;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "no `{want}` in {}",
            log.display()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Polls until `child` exited; returns when.
fn exited_at(child: &mut Child) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "old process did not exit");
        thread::sleep(Duration::from_millis(5));
    }
    Instant::now()
}

fn pid_exited_at(pid: u32) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
        {
            break;
        }
        assert!(Instant::now() < deadline, "old process did not exit");
        thread::sleep(Duration::from_millis(5));
    }
    Instant::now()
}

fn churn_worker(addr: SocketAddr, s: Arc<Shared>) {
    let data = vec![7u8; 1024];
    let mut back = vec![0u8; 1024];
    while !s.stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let ok = (|| -> std::io::Result<()> {
            let mut c = TcpStream::connect(addr)?;
            c.set_read_timeout(Some(Duration::from_secs(10)))?;
            c.write_all(&data)?;
            c.read_exact(&mut back)?;
            Ok(())
        })()
        .is_ok();
        if ok {
            let at = s.start.elapsed().as_secs_f64();
            s.churn
                .lock()
                .unwrap()
                .at
                .push((at, t.elapsed().as_micros() as u64));
        } else {
            s.churn_failed.fetch_add(1, Ordering::Relaxed);
        }
        // About 200 connections per second per worker: the offered load.
        if let Some(rest) = Duration::from_millis(5).checked_sub(t.elapsed()) {
            thread::sleep(rest);
        }
    }
}

fn request_worker(addr: SocketAddr, s: Arc<Shared>) {
    let data = vec![9u8; 1024];
    let mut back = vec![0u8; 1024];
    let mut conn: Option<TcpStream> = None;
    let mut done = 0u64;
    while !s.stop.load(Ordering::Relaxed) {
        if conn.is_none() {
            conn = TcpStream::connect(addr).ok();
            if let Some(c) = &conn {
                let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
                let _ = c.set_nodelay(true);
            }
        }
        let Some(c) = conn.as_mut() else {
            s.request_failed.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let t = Instant::now();
        if c.write_all(&data)
            .and_then(|()| c.read_exact(&mut back))
            .is_ok()
        {
            let at = s.start.elapsed().as_secs_f64();
            s.requests
                .lock()
                .unwrap()
                .at
                .push((at, t.elapsed().as_micros() as u64));
        } else {
            s.request_failed.fetch_add(1, Ordering::Relaxed);
            conn = None;
        }
        // Keep-alive connections are reopened every 200 requests, so that
        // they also move to the new process.
        done += 1;
        if done % 200 == 0 {
            conn = None;
        }
        if let Some(rest) = Duration::from_millis(2).checked_sub(t.elapsed()) {
            thread::sleep(rest);
        }
    }
}

fn p99(samples: &Samples, from: f64, to: f64) -> (u64, usize) {
    let mut h = Histogram::<u64>::new(3).unwrap();
    for (at, us) in &samples.at {
        if *at >= from && *at < to {
            let _ = h.record(*us);
        }
    }
    (h.value_at_quantile(0.99), h.len() as usize)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let secs: f64 = std::env::var("UPGRADE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12.0);
    let dir = std::env::temp_dir().join(format!("shardproxy-upgrade-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("psk");
    keygen_to(&key);
    let origin = echo_origin();
    let (entry_addr, exit_addr) = (free_port(), free_port());
    let s = |v: &str| v.to_string();
    let exit_ctl = dir.join("exit.sock");
    let entry_ctl = dir.join("entry.sock");
    let key_s = key.to_str().unwrap().to_string();
    let mut exit = spawn_logged(
        &[
            s("exit"),
            s("--listen"),
            exit_addr.to_string(),
            s("--upstream"),
            origin.to_string(),
            s("--key-file"),
            key_s.clone(),
            s("--cpu-list"),
            s("1"),
            s("--control-socket"),
            exit_ctl.to_str().unwrap().to_string(),
        ],
        &dir.join("exit.log"),
    );
    let entry_args = |ctl: (&str, &std::path::Path), cpu: &str| {
        vec![
            s("entry"),
            s("--listen"),
            entry_addr.to_string(),
            s("--upstream"),
            exit_addr.to_string(),
            s("--key-file"),
            key_s.clone(),
            s("--cpu-list"),
            s(cpu),
            s(ctl.0),
            ctl.1.to_str().unwrap().to_string(),
        ]
    };
    let mut entry = spawn_logged(
        &entry_args(("--control-socket", &entry_ctl), "0"),
        &dir.join("entry.log"),
    );
    wait_listening(exit_addr);
    wait_listening(entry_addr);

    let shared = Arc::new(Shared {
        start: Instant::now(),
        stop: AtomicBool::new(false),
        churn: Mutex::new(Samples::default()),
        requests: Mutex::new(Samples::default()),
        churn_failed: AtomicU64::new(0),
        request_failed: AtomicU64::new(0),
    });
    let mut workers = Vec::new();
    for _ in 0..2 {
        let s2 = shared.clone();
        workers.push(thread::spawn(move || churn_worker(entry_addr, s2)));
    }
    for _ in 0..8 {
        let s2 = shared.clone();
        workers.push(thread::spawn(move || request_worker(entry_addr, s2)));
    }

    // Exit: SIGUSR2 at a third of the run.
    thread::sleep(Duration::from_secs_f64(secs / 3.0));
    let exit_at = shared.start.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let _ = Command::new("kill")
        .args(["-USR2", &exit.id().to_string()])
        .status();
    let line = wait_for_line(&dir.join("exit.log"), "SIGUSR2: started");
    let new_exit: u32 = line
        .split("as process ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap();
    let exit_overlap = exited_at(&mut exit).duration_since(t0);

    // Entry: a new process with --takeover at two thirds.
    thread::sleep(Duration::from_secs_f64(secs / 3.0));
    let entry_at = shared.start.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut new_entry = spawn_logged(
        &entry_args(("--takeover", &entry_ctl), "0"),
        &dir.join("entry2.log"),
    );
    let entry_overlap = exited_at(&mut entry).duration_since(t1);

    thread::sleep(Duration::from_secs_f64(secs / 3.0));
    shared.stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let _ = new_entry.kill();
    let _ = new_entry.wait();
    let _ = Command::new("kill")
        .args(["-KILL", &new_exit.to_string()])
        .status();
    let _ = pid_exited_at(new_exit);

    let churn = shared.churn.lock().unwrap();
    let reqs = shared.requests.lock().unwrap();
    println!(
        "{:.0} s run; 2 churn workers (connect + 1 KiB + close, ~200/s each), 8 keep-alive 1 KiB request workers (~500/s each, reconnecting every 200 requests); entry and exit one shard each\n",
        secs
    );
    println!("| upgrade | churn p99, second before → second after (µs) | request p99, second before → second after (µs) | old and new overlap |");
    println!("|---|---|---|---|");
    let failed_c = shared.churn_failed.load(Ordering::Relaxed);
    let failed_r = shared.request_failed.load(Ordering::Relaxed);
    for (name, at, overlap) in [
        ("exit, SIGUSR2 re-exec", exit_at, exit_overlap),
        ("entry, --takeover", entry_at, entry_overlap),
    ] {
        let (cb, _) = p99(&churn, at - 1.0, at);
        let (ca, _) = p99(&churn, at, at + 1.0);
        let (rb, _) = p99(&reqs, at - 1.0, at);
        let (ra, _) = p99(&reqs, at, at + 1.0);
        println!(
            "| {name} | {cb} → {ca} | {rb} → {ra} | {:.3} s |",
            overlap.as_secs_f64()
        );
    }
    println!(
        "\nwhole run: {} connections, {} requests; failed: {failed_c} connections, {failed_r} requests",
        churn.at.len(),
        reqs.at.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
