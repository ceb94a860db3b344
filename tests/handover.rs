//! Listener hand-over (`--control-socket`, `--takeover`, SIGUSR2): a new
//! process takes the running one's listening sockets, and no connection is
//! lost, whether clients arrive at a steady rate, wait in the old process's
//! backlog, or the core count changes. Also: sd_notify states, and
//! `--drain-delay`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

fn control_path(tag: &str) -> String {
    let p = std::env::temp_dir().join(format!("shardproxy-ctl-{}-{tag}.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p.to_str().unwrap().to_string()
}

/// Clients opening short connections at a steady pace: each sends 1 KiB
/// of its own pattern and must get exactly it back before EOF.
struct Load {
    done: Arc<AtomicUsize>,
    failed: Arc<Mutex<Vec<String>>>,
    workers: Vec<thread::JoinHandle<()>>,
}

impl Load {
    /// `total` connections over about `secs` seconds, from 4 workers.
    fn start(addr: SocketAddr, total: usize, secs: f64) -> Load {
        let done = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let workers = (0..4)
            .map(|w| {
                let (done, failed) = (done.clone(), failed.clone());
                let per = total / 4;
                let pace = Duration::from_secs_f64(secs / per as f64);
                thread::spawn(move || {
                    for i in 0..per {
                        let started = Instant::now();
                        let pattern = random_bytes(1024, (w * 1_000_000 + i) as u64);
                        if let Err(e) = one(addr, &pattern) {
                            failed
                                .lock()
                                .unwrap()
                                .push(format!("worker {w} conn {i}: {e}"));
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                        // The pace is the offered load, not a synchronisation.
                        if let Some(rest) = pace.checked_sub(started.elapsed()) {
                            thread::sleep(rest);
                        }
                    }
                })
            })
            .collect();
        Load {
            done,
            failed,
            workers,
        }
    }

    fn wait_done(&self, n: usize) {
        poll_until(Duration::from_secs(60), || {
            let d = self.done.load(Ordering::Relaxed);
            if d >= n {
                Ok(())
            } else {
                Err(format!("{d} of {n} connections done"))
            }
        });
    }

    fn finish(self) -> (usize, Vec<String>) {
        for w in self.workers {
            w.join().unwrap();
        }
        let failed = self.failed.lock().unwrap().clone();
        (self.done.load(Ordering::Relaxed), failed)
    }
}

fn one(addr: SocketAddr, pattern: &[u8]) -> std::io::Result<()> {
    let mut c = TcpStream::connect(addr)?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    c.write_all(pattern)?;
    c.shutdown(std::net::Shutdown::Write)?;
    let mut back = Vec::new();
    c.read_to_end(&mut back)?;
    if back != pattern {
        return Err(std::io::Error::other(format!(
            "got {} bytes back, not the 1024 sent",
            back.len()
        )));
    }
    Ok(())
}

/// Waits for `proxy` to exit by itself (its stderr may stay open: a
/// successor it started shares it), returning its exit code.
fn wait_exited(proxy: &mut Proxy, limit: Duration) -> Option<i32> {
    let mut code = None;
    poll_until(limit, || match proxy.try_exit() {
        Some(status) => {
            code = status.code();
            Ok(())
        }
        None => Err("still running".to_string()),
    });
    code
}

const TOTAL: usize = 1200;
const SECS: f64 = 6.0;

/// Sends SIGUSR2 to `old` and returns the PID of the successor it started
/// (the successor shares old's stderr, so its lines are in old's log).
fn sigusr2_successor(old: &Proxy) -> u32 {
    usr2_successor(old, old.pid())
}

/// Sends SIGUSR2 to process `pid`, `first` or one of its successors (all
/// write to `first`'s stderr), and returns the PID of the successor it
/// started.
fn usr2_successor(first: &Proxy, pid: u32) -> u32 {
    let _ = Command::new("kill")
        .args(["-USR2", &pid.to_string()])
        .status();
    let started = first.wait_for_log(
        |l| l.contains(&format!("[{pid}] SIGUSR2: started")),
        Duration::from_secs(10),
    );
    started
        .split("as process ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {started}"))
}

/// The suite's own hygiene: a test that fails after a SIGUSR2 upgrade,
/// before it learned its successor's PID, drops its `Proxy`, and the drop
/// kills the successor too (found by its environment). It used to leave
/// the successor running, holding the proxy's stderr pipe, so the drop
/// waited for that pipe's EOF for ever: a hung suite, not a failed test.
#[test]
fn a_dropped_proxy_takes_its_sigusr2_successor_with_it() {
    let ctl = control_path("dropped");
    let old = Proxy::forward(echo_origin())
        .args(["--control-socket", &ctl])
        .start();
    let successor = sigusr2_successor(&old);
    old.wait_for_log(
        |l| l.contains("hand-over complete"),
        Duration::from_secs(20),
    );
    let (done, dropped) = std::sync::mpsc::channel();
    thread::spawn(move || {
        drop(old);
        let _ = done.send(());
    });
    let ended = dropped.recv_timeout(Duration::from_secs(20)).is_ok();
    let _guard = KillOnDrop(successor);
    assert!(ended, "the drop still waits, 20 s on");
    // SIGKILLed by the drop: its files (the stderr pipe) close before it
    // has finished exiting, so the drop can return while it is still
    // going. Wait for it to be gone, not only for the pipe.
    poll_until(Duration::from_secs(10), || {
        if process_running(successor) {
            Err(format!("successor {successor} outlived the drop"))
        } else {
            Ok(())
        }
    });
}

/// GET /healthz; the status code or the error.
fn healthz(addr: SocketAddr) -> Result<u16, String> {
    let mut c = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut s = String::new();
    c.read_to_string(&mut s).map_err(|e| e.to_string())?;
    s.get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad answer {s:?}"))
}

/// Old process with `from` shards, new one with `to` shards (`--takeover`),
/// under a steady client load, with /healthz polled on the shared metrics
/// port throughout: no connection and no probe may fail.
fn takeover_under_load(from: usize, to: usize) {
    let origin = echo_origin();
    let ctl = control_path(&format!("{from}-{to}"));
    let mut old = Proxy::forward(origin)
        .shards(from)
        .args(["--control-socket", &ctl, "--metrics-listen", "127.0.0.1:0"])
        .start();
    let metrics = old.metrics_addr();
    let probing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let prober = {
        let probing = probing.clone();
        thread::spawn(move || {
            let mut bad = Vec::new();
            let mut n = 0;
            // Bounded: the load below ends within a minute.
            let deadline = Instant::now() + Duration::from_secs(120);
            while probing.load(Ordering::Relaxed) && Instant::now() < deadline {
                match healthz(metrics) {
                    Ok(200) => {}
                    other => bad.push(format!("{other:?}")),
                }
                n += 1;
                thread::sleep(Duration::from_millis(2));
            }
            (n, bad)
        })
    };
    let load = Load::start(old.addr, TOTAL, SECS);
    load.wait_done(TOTAL / 2);
    let new = Proxy::forward(origin)
        .listen(old.addr)
        .shards(to)
        .args(["--takeover", &ctl, "--metrics-listen", &metrics.to_string()])
        .start();
    new.wait_for_log(
        |l| l.contains("hand-over complete"),
        Duration::from_secs(10),
    );
    assert_eq!(
        wait_exited(&mut old, Duration::from_secs(30)),
        Some(0),
        "{:?}",
        old.log()
    );
    let (done, failed) = load.finish();
    probing.store(false, Ordering::Relaxed);
    let (probes, bad_probes) = prober.join().unwrap();
    assert_eq!(done, TOTAL);
    assert!(
        failed.is_empty(),
        "{from}->{to} shards: {} failed: {failed:?}",
        failed.len()
    );
    assert!(probes > 100, "only {probes} probes");
    assert!(
        bad_probes.is_empty(),
        "{} of {probes} /healthz probes failed: {bad_probes:?}",
        bad_probes.len()
    );
    // The control socket is the successor's now: still there after the
    // predecessor exited, gone once the successor has.
    assert!(
        std::path::Path::new(&ctl).exists(),
        "{ctl} removed by the predecessor"
    );
    let (status, lines) = new.terminate();
    assert!(status.success(), "{lines:?}");
    assert!(!std::path::Path::new(&ctl).exists(), "{ctl} left behind");
    // The successor served part of the load.
    let served: u64 = summaries(&lines).iter().map(|s| s.get("accepted")).sum();
    assert!(served > 0, "{lines:?}");
}

#[test]
fn takeover_with_the_same_core_count_loses_no_connection() {
    takeover_under_load(2, 2);
}

#[test]
fn takeover_from_two_shards_to_one_loses_no_connection() {
    takeover_under_load(2, 1);
}

#[test]
fn takeover_from_one_shard_to_two_loses_no_connection() {
    takeover_under_load(1, 2);
}

#[test]
fn sigusr2_reexecutes_and_loses_no_connection() {
    let origin = echo_origin();
    let key = key_file(&[&keygen()]);
    let ctl = control_path("usr2");
    // An exit, so the re-exec also carries the key file and its role flags.
    let mut old = Proxy::exit(origin, &key)
        .shards(2)
        .args(["--control-socket", &ctl])
        .start();
    let entry = Proxy::entry(old.addr, &key).shards(1).start();
    let load = Load::start(entry.addr, TOTAL, SECS);
    load.wait_done(TOTAL / 2);
    let pid = sigusr2_successor(&old);
    old.wait_for_log(
        |l| l.contains("hand-over complete"),
        Duration::from_secs(20),
    );
    assert_eq!(
        wait_exited(&mut old, Duration::from_secs(30)),
        Some(0),
        "{:?}",
        old.log()
    );
    let (done, failed) = load.finish();
    assert_eq!(done, TOTAL);
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    // The successor serves on its own, through the same entry.
    let data = Arc::new(random_bytes(5000, 9));
    let back = echo_round_trip(entry.addr, data.clone());
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    assert_eq!(back, *data);
    poll_until(Duration::from_secs(30), || {
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            Err("successor still draining".to_string())
        } else {
            Ok(())
        }
    });
}

/// A second upgrade soon after the first (a binary, then a config; a
/// quick rollback) goes to the successor, whose control socket it now is.
/// A break-it round saw the draining predecessor, still blocked in accept
/// on the shared socket for up to 200 ms, take the new successor's
/// connection and refuse it ("draining"), so the upgrade silently failed
/// (8 of 8 at 50-150 ms). Three generations in a row, each holding a
/// session so that it drains (and keeps its process) after handing over.
#[test]
fn an_upgrade_right_after_an_upgrade_goes_to_the_successor() {
    let origin = echo_origin();
    let ctl = control_path("twice");
    let mut old = Proxy::forward(origin)
        .shards(1)
        .args(["--control-socket", &ctl, "--drain-timeout", "60s"])
        .start();
    let mut held = vec![held_session(old.addr)];
    let mut pid = old.pid();
    let mut pids = vec![pid];
    // The successors share `old`'s stderr: they must be gone before old's
    // log reader can finish, also when an assertion below fails.
    let mut successors = Vec::new();
    for _ in 0..3 {
        let next = usr2_successor(&old, pid);
        successors.push(KillOnDrop(next));
        old.wait_for_log(
            |l| {
                l.contains(&format!(
                    "hand-over: process {next} accepts on our listeners"
                ))
            },
            Duration::from_secs(20),
        );
        // Into the window the fault had: the next upgrade 60 ms after
        // this hand-over (a timing to hit, not a wait for an event).
        thread::sleep(Duration::from_millis(60));
        held.push(held_session(old.addr));
        pid = next;
        pids.push(pid);
    }
    let log = old.log();
    assert!(
        !log.iter().any(|l| l.contains("while this process drains")),
        "a draining process answered an upgrade: {log:?}"
    );
    drop(held);
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    // Each drained generation exits once its held session closed; the
    // first is ours to reap, the others their parents'.
    assert_eq!(
        wait_exited(&mut old, Duration::from_secs(30)),
        Some(0),
        "{:?}",
        old.log()
    );
    poll_until(Duration::from_secs(30), || {
        let alive = |p: &u32| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .is_ok_and(|stat| !stat.contains(") Z "))
        };
        match pids.iter().find(|p| alive(p)) {
            Some(p) => Err(format!("process {p} still running")),
            None => Ok(()),
        }
    });
}

#[test]
fn clients_queued_in_the_old_backlog_are_served_by_the_successor() {
    let origin = echo_origin();
    let ctl = control_path("backlog");
    let mut old = Proxy::forward(origin)
        .shards(1)
        .args(["--control-socket", &ctl, "--max-connections", "1"])
        .start();
    // The one slot is busy...
    let mut holder = held_session(old.addr);
    // ...so these wait in the kernel's accept queue of the old listener.
    let addr = old.addr;
    let queued: Vec<_> = (0..16u64)
        .map(|i| {
            thread::spawn(move || {
                let pattern = random_bytes(1024, 100 + i);
                one(addr, &pattern).map_err(|e| e.to_string())
            })
        })
        .collect();
    poll_until(Duration::from_secs(10), || {
        let q = accept_queue_len(addr);
        if q >= 16 {
            Ok(())
        } else {
            Err(format!("{q} queued"))
        }
    });
    let new = Proxy::forward(origin)
        .listen(old.addr)
        .shards(1)
        .args(["--takeover", &ctl])
        .start();
    for q in queued {
        assert_eq!(q.join().unwrap(), Ok(()), "a queued client was lost");
    }
    // The old one drains its live connection, which still works.
    holder.write_all(b"more").unwrap();
    let mut b = [0u8; 4];
    holder.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"more");
    drop(holder);
    assert_eq!(wait_exited(&mut old, Duration::from_secs(30)), Some(0));
    let (status, lines) = new.terminate();
    assert!(status.success());
    assert_eq!(summaries(&lines)[0].get("accepted"), 16, "{lines:?}");
}

/// Connections waiting in the accept queue of the listener on `addr`
/// (`ss -ltn`: Recv-Q of a listening socket).
fn accept_queue_len(addr: SocketAddr) -> usize {
    let out = Command::new("ss")
        .args(["-ltnH", &format!("sport = :{}", addr.port())])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<usize>().ok())
        .sum()
}

/// Sends signal `sig` (`-STOP`) to process `pid`.
fn send(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success(), "kill {sig} {pid}");
}

/// Listening sockets on `addr`'s port (one per socket of a `SO_REUSEPORT`
/// group; a socket a successor inherited is the same socket).
/// Read from /proc/net/tcp (tcp(7)'s table, state `0A`), fast enough to
/// sample in a loop.
fn listening_sockets(addr: SocketAddr) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let port = format!(":{:04X}", addr.port());
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&port) && f[3] == "0A"
        })
        .count()
}

/// A predecessor (`forward`, 1 shard, a control socket) and a successor
/// with 2 shards taking over from it, stopped (SIGSTOP) as soon as it
/// logged that it took the listeners over.
struct Stalled {
    origin: SocketAddr,
    old: Proxy,
    ctl: String,
    child: std::process::Child,
    pid: u32,
    rx: std::sync::mpsc::Receiver<String>,
    lines: Vec<String>,
    /// The successor's `NOTIFY_SOCKET` (the predecessor has none).
    notify: Notify,
}

impl Drop for Stalled {
    /// A failed test leaves no stopped successor behind (it would hold the
    /// test's stdout open).
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Stalled {
    /// Lets the successor go on (SIGCONT) and waits (at most 30 s) for it
    /// to exit; its exit code, with all its lines read.
    fn resume_to_exit(&mut self) -> Option<i32> {
        send(self.pid, "-CONT");
        let status = run_bounded_wait(&mut self.child, Duration::from_secs(30));
        self.lines.extend(self.rx.iter());
        status
    }

    /// Reads the successor's lines until `done` holds for them.
    fn wait_lines(&mut self, done: impl Fn(&[String]) -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done(&self.lines) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) => self.lines.push(l),
                Err(_) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    panic!("no {what}: {:?}", self.lines);
                }
            }
        }
    }
}

/// [`Stalled`], where the stop landed where `wanted` (given the
/// successor's PID and the listen address) says it must: the stop usually
/// lands before the successor can serve, but not always, so an attempt
/// where it landed elsewhere is repeated (at most `attempts`, each with a
/// fresh pair). `Err` lists what each attempt found.
fn stalled_successor(
    tag: &str,
    attempts: usize,
    old_args: &[&str],
    wanted: impl Fn(u32, SocketAddr) -> Result<(), String>,
) -> Result<Stalled, Vec<String>> {
    let origin = echo_origin();
    let mut seen = Vec::new();
    for attempt in 0..attempts {
        let ctl = control_path(&format!("{tag}-{attempt}"));
        let old = Proxy::forward(origin)
            .shards(1)
            .args(["--control-socket", &ctl])
            .args(old_args.iter().copied())
            .start();
        assert_eq!(listening_sockets(old.addr), 1);
        let notify = Notify::new(&format!("{tag}-{attempt}"));
        let mut child = Command::new(BIN)
            .args(["forward", "--listen", &old.addr.to_string()])
            .args(["--upstream", &origin.to_string(), "--cores", "2"])
            .args(["--takeover", &ctl])
            .env("NOTIFY_SOCKET", &notify.path)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let rx = stderr_lines(&mut child);
        let mut stalled = Stalled {
            origin,
            old,
            ctl: ctl.clone(),
            child,
            pid,
            rx,
            lines: Vec::new(),
            notify,
        };
        stalled.wait_lines(
            |lines| {
                lines
                    .last()
                    .is_some_and(|l| l.contains("taking over from process"))
            },
            "takeover line",
        );
        send(pid, "-STOP");
        match wanted(pid, stalled.old.addr) {
            Ok(()) => return Ok(stalled),
            Err(why) => {
                seen.push(why);
                send(pid, "-KILL");
                let _ = stalled.child.wait();
            }
        }
    }
    Err(seen)
}

/// `strace -e trace=listen` attached to a stopped process and all its
/// threads: every listen(2) it makes from then on.
struct ListenTrace {
    strace: std::process::Child,
    path: std::path::PathBuf,
}

impl ListenTrace {
    /// Attaches to `pid` (stopped); `None` (and a `missing` note) without
    /// strace.
    fn attach(pid: u32) -> Option<ListenTrace> {
        if Command::new("strace").arg("-V").output().is_err() {
            missing("strace (apt-get install strace)");
            return None;
        }
        let path = std::env::temp_dir().join(format!("sp-listen-{pid}.trace"));
        let strace = Command::new("strace")
            .args(["-f", "-qq", "-e", "trace=listen", "-o"])
            .arg(&path)
            .args(["-p", &pid.to_string()])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Attached once every thread has a tracer (proc(5) `TracerPid`).
        poll_until(Duration::from_secs(10), || {
            let tasks =
                std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| e.to_string())?;
            for t in tasks {
                let status =
                    std::fs::read_to_string(t.map_err(|e| e.to_string())?.path().join("status"))
                        .map_err(|e| e.to_string())?;
                if status
                    .lines()
                    .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["TracerPid:", "0"])
                {
                    return Err("a thread not traced yet".to_string());
                }
            }
            Ok(())
        });
        Some(ListenTrace { strace, path })
    }

    /// The calls traced, once the traced process has exited.
    fn calls(mut self) -> String {
        let _ = self.strace.wait();
        let calls = std::fs::read_to_string(&self.path).unwrap_or_default();
        let _ = std::fs::remove_file(&self.path);
        calls
    }
}

/// A forward with one shard that took `addr`'s listeners over from the
/// process serving `ctl`, once it logged that the hand-over is complete.
fn taken_over(origin: SocketAddr, addr: SocketAddr, ctl: &str) -> Proxy {
    let p = Proxy::forward(origin)
        .listen(addr)
        .shards(1)
        .args(["--takeover", ctl])
        .start();
    p.wait_for_log(
        |l| l.contains("hand-over complete"),
        Duration::from_secs(10),
    );
    p
}

/// Whether the successor `pid` stopped before its new listener listened.
fn not_listening(_pid: u32, addr: SocketAddr) -> Result<(), String> {
    match listening_sockets(addr) {
        1 => Ok(()),
        n => Err(format!("{n} listening sockets")),
    }
}

/// A successor with more shards than its predecessor binds new listeners
/// for them, but they listen only once every shard can serve: a successor
/// that stalls (or fails) before that takes no connection from the group,
/// where before each new listener took its share from the bind on and held
/// them unanswered (or reset them when the successor died).
///
/// The stall is a SIGSTOP (see [`stalled_successor`]). The build that
/// listened at bind time fails every attempt.
#[test]
fn a_successor_listens_only_once_it_can_serve() {
    let mut s = stalled_successor("stall", 5, &[], not_listening).unwrap_or_else(|seen| {
        panic!("in every attempt the successor's new listener listened before it could serve: {seen:?}")
    });
    let addr = s.old.addr;
    // Stalled before it could serve: every client is served, by the
    // predecessor (the successor's second listener takes none).
    for i in 0..40 {
        let data = random_bytes(1024, 700 + i);
        one(addr, &data).unwrap_or_else(|e| panic!("client {i}: {e}"));
    }
    // Let it go on: its new listener listens, and both shards accept. The
    // shards log that they listen as they start accepting, in any order
    // with the main thread's line.
    send(s.pid, "-CONT");
    s.wait_lines(
        |lines| {
            lines.iter().any(|l| l.contains("hand-over complete"))
                && lines
                    .iter()
                    .filter(|l| l.contains(" listening on "))
                    .count()
                    == 2
        },
        "hand-over after SIGCONT",
    );
    assert_eq!(listening_sockets(addr), 2, "{:?}", s.lines);
    for i in 0..40 {
        let data = random_bytes(1024, 800 + i);
        one(addr, &data).unwrap_or_else(|e| panic!("client {i} after: {e}"));
    }
    send(s.pid, "-TERM");
    let status = s.child.wait().unwrap();
    assert!(status.success(), "{status:?} {:?}", s.lines);
}

/// A successor told to stop (SIGTERM) while it starts, after its shards
/// run but before it said it is ready, stops without taking over: the
/// predecessor is told the start failed and serves on. (The build that
/// confirmed the hand-over all the same left both processes draining: the
/// service stopped.) A stop before the shards run exits at once, as the
/// predecessor also sees; the stop is made to land after, where the
/// successor's shard threads exist.
#[test]
fn a_successor_stopped_during_its_start_leaves_the_predecessor_serving() {
    let shards_run = |pid: u32, addr: SocketAddr| -> Result<(), String> {
        not_listening(pid, addr)?;
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| e.to_string())?;
        let shards = tasks
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|c| c.starts_with("shard-"))
            .count();
        match shards {
            2 => Ok(()),
            n => Err(format!("{n} shard threads")),
        }
    };
    let mut s = stalled_successor("stopped", 20, &[], shards_run).unwrap_or_else(|seen| {
        panic!(
            "no attempt stopped the successor with its shards running and not listening: {seen:?}"
        )
    });
    // It never listens on its new socket, not even on its way out (a
    // build that did, for a few ms before it exited, reset the clients the
    // kernel queued there meanwhile: a break-it round). Too short a window
    // to sample: strace, attached while it is stopped, sees every listen(2).
    let Some(trace) = ListenTrace::attach(s.pid) else {
        return;
    };
    send(s.pid, "-TERM");
    send(s.pid, "-CONT");
    let status = s.child.wait().unwrap();
    let calls = trace.calls();
    assert!(
        !calls.contains("listen("),
        "the stopped successor called listen: {calls}\n{:?}",
        s.lines
    );
    assert_eq!(status.code(), Some(0), "{:?}", s.lines);
    s.wait_lines(|_| true, "");
    let rest: Vec<String> = s.rx.iter().collect();
    s.lines.extend(rest);
    assert!(
        s.lines
            .iter()
            .any(|l| l.contains("told to stop during the start: not taking over")),
        "{:?}",
        s.lines
    );
    assert!(
        !s.lines.iter().any(|l| l.contains("hand-over complete")),
        "{:?}",
        s.lines
    );
    s.old.wait_for_log(
        |l| l.contains("hand-over failed, still serving") && l.contains("told to stop"),
        Duration::from_secs(10),
    );
    // The predecessor serves on, and still hands over later.
    for i in 0..20 {
        let data = random_bytes(1024, 900 + i);
        one(s.old.addr, &data).unwrap_or_else(|e| panic!("client {i}: {e}"));
    }
    assert!(
        !s.old.log().iter().any(|l| l.contains("draining")),
        "{:?}",
        s.old.log()
    );
}

/// The predecessor stopped (SIGTERM) while a successor that holds its
/// sockets has not yet said how its start went: it drains and exits, and
/// the successor, finding it gone, serves alone. The control socket file
/// stays, so that the successor can be upgraded in turn; a build that
/// removed it left a service that no `--takeover` or SIGUSR2 could reach
/// (a break-it round).
#[test]
fn a_predecessor_stopped_during_a_hand_over_leaves_the_control_socket() {
    let mut s = stalled_successor("predterm", 5, &[], not_listening).unwrap_or_else(|seen| {
        panic!("in every attempt the successor's new listener listened before it could serve: {seen:?}")
    });
    s.old.signal("TERM");
    let status = s.old.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{:?}", s.old.log());
    assert!(
        std::path::Path::new(&s.ctl).exists(),
        "the predecessor removed {} while a successor held its sockets: {:?}",
        s.ctl,
        s.old.log()
    );
    send(s.pid, "-CONT");
    s.wait_lines(
        |lines| {
            lines
                .iter()
                .any(|l| l.contains("this process accepts alone"))
                && lines
                    .iter()
                    .filter(|l| l.contains(" listening on "))
                    .count()
                    == 2
        },
        "successor accepting alone",
    );
    let addr = s.old.addr;
    for i in 0..20 {
        let data = random_bytes(1024, 950 + i);
        one(addr, &data).unwrap_or_else(|e| panic!("client {i}: {e}"));
    }
    // And it can be upgraded: a third process takes over through the file.
    let third = taken_over(s.origin, addr, &s.ctl);
    let status = s.child.wait().unwrap();
    assert!(status.success(), "{:?}", s.lines);
    let data = random_bytes(1024, 999);
    one(addr, &data).unwrap();
    let (status, _) = third.terminate();
    assert!(status.success());
}

/// Only the process's own user (or root) is handed its listeners, however
/// it reached the control socket. The file is made 0600 only after its
/// `bind` (a connect in between waited in the backlog and was served), so
/// the test opens the window for good: the file made 0666, and another
/// user (nobody, with `setpriv`) asks for a hand-over. It is refused, told
/// why, and the proxy serves on; an unprivileged user took a root proxy's
/// listeners this way (break-it round 23).
#[test]
fn another_user_on_the_control_socket_is_refused() {
    let origin = echo_origin();
    let ctl = control_path("otheruser");
    let p = Proxy::forward(origin)
        .shards(1)
        .args(["--control-socket", &ctl])
        .start();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&ctl, std::fs::Permissions::from_mode(0o666)).unwrap();
    // 50 tries, each answered before the next: the refusals are logged
    // rate-limited (one user connecting in a loop wrote 280,000 lines in
    // 5 s).
    let script = "import socket,sys\n\
        for i in range(50):\n\
        \x20   s=socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1])\n\
        \x20   try: s.sendall(b'TAKEOVER 2\\n')\n\
        \x20   except BrokenPipeError: pass\n\
        \x20   m,anc,_,_=s.recvmsg(512, socket.CMSG_SPACE(64*4))\n\
        \x20   if i == 0: print(repr(m), len(anc))\n\
        \x20   s.close()";
    let out = Command::new("setpriv")
        // The system's Python: another user cannot run one under /root.
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            script,
        ])
        .arg(&ctl)
        .output()
        .expect("setpriv (util-linux) and /usr/bin/python3 (tests/all.sh installs them)");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.starts_with("b\"ERROR not allowed") && said.trim_end().ends_with(" 0"),
        "another user got: {said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    p.wait_for_log(
        |l| l.contains("control socket: refused a connection from user 65534"),
        Duration::from_secs(10),
    );
    let refusals = p
        .log()
        .iter()
        .filter(|l| l.contains("control socket: refused a connection"))
        .count();
    assert!(
        refusals <= 5,
        "{refusals} lines for 50 refusals: {:?}",
        p.log()
    );
    // Still serving, and still its own to hand over.
    one(p.addr, &random_bytes(1024, 65534)).unwrap();
    let third = taken_over(origin, p.addr, &ctl);
    let (status, log) = third.terminate();
    assert!(status.success(), "{log:?}");
}

/// A process started on the control socket path of one that is draining
/// (no hand-over: a stop, then a fresh start) keeps its socket file when
/// the draining one exits, so it can still be upgraded. The draining
/// process knew its file by device and inode only, and ext4 gave the new
/// socket file the inode just freed: the draining process then removed
/// the new process's file at exit (found by a break-it round), and every
/// later SIGUSR2 or `--takeover` of the new process failed.
#[test]
fn a_draining_process_leaves_the_next_process_control_socket_alone() {
    let origin = echo_origin();
    let ctl = control_path("next");
    let mut old = Proxy::forward(origin)
        .shards(1)
        .args(["--control-socket", &ctl, "--drain-timeout", "30s"])
        .start();
    let mut held = held_session(old.addr);
    old.signal("TERM");
    old.wait_for_log(|l| l.contains(": draining"), Duration::from_secs(10));
    // Draining, it no longer serves the control socket (the file stays).
    poll_until(
        Duration::from_secs(10),
        || match std::os::unix::net::UnixStream::connect(&ctl) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let new = Proxy::forward(origin)
        .shards(1)
        .args(["--control-socket", &ctl])
        .start();
    // The old process's last connection ends, and with it its drain.
    held.shutdown(std::net::Shutdown::Write).unwrap();
    let (end, _) = read_until_end(&mut held, Duration::from_secs(10));
    assert_eq!(end, End::Eof);
    assert!(
        old.wait_exit(Duration::from_secs(20)).success(),
        "{:?}",
        old.log()
    );
    assert!(
        std::path::Path::new(&ctl).exists(),
        "the draining process removed the control socket of the process started after it: {:?}",
        old.log()
    );
    // And the new process can be upgraded through it.
    let third = taken_over(origin, new.addr, &ctl);
    let data = random_bytes(1024, 4242);
    one(new.addr, &data).unwrap();
    let (status, log) = third.terminate();
    assert!(status.success(), "{log:?}");
    drop(new);
}

/// A successor that stalls past the predecessor's `--handover-timeout`
/// is given up on: the predecessor logs it, serves on, and tells the
/// successor, which, once it runs again, stops accepting and exits 2 with
/// one error line instead of serving beside it. The predecessor can still
/// hand over later. (The build without the `ERROR gave up` line left the
/// resumed successor serving alongside, confirmed by nobody: two
/// processes accepting on the port, and the next upgrade reached one.)
#[test]
fn a_successor_past_the_handover_timeout_exits_and_the_predecessor_serves_on() {
    let mut s = stalled_successor("gaveup", 5, &["--handover-timeout", "2s"], not_listening)
        .unwrap_or_else(|seen| {
            panic!("in every attempt the successor's new listener listened before it could serve: {seen:?}")
        });
    s.old.wait_for_log(
        |l| l.contains("hand-over failed, still serving") && l.contains("--handover-timeout"),
        Duration::from_secs(20),
    );
    let addr = s.old.addr;
    for i in 0..20 {
        let data = random_bytes(1024, 1100 + i);
        one(addr, &data).unwrap_or_else(|e| panic!("client {i}: {e}"));
    }
    // Its listener for the second shard never listens (one that did
    // joined the group and reset the connections queued on it when the
    // successor gave up: a break-it round, with clients under load).
    let trace = ListenTrace::attach(s.pid);
    let status = s.resume_to_exit();
    assert_eq!(status, Some(2), "{:?}", s.lines);
    assert!(
        s.lines.last().is_some_and(|l| l.starts_with("error: ")
            && l.contains("gave up waiting for this process")
            && l.contains("still runs")),
        "{:?}",
        s.lines
    );
    assert!(
        !s.lines.iter().any(|l| l.contains("hand-over complete")),
        "{:?}",
        s.lines
    );
    if let Some(trace) = trace {
        let calls = trace.calls();
        // The inherited listener is listened again (for a new
        // `--backlog`); the other, bound by this process, is not.
        assert_eq!(
            calls.matches("listen(").count(),
            1,
            "it listened: {calls}\n{:?}",
            s.lines
        );
    }
    // Nor did it tell systemd it serves (or who the main process is).
    let told = s.notify.drain();
    assert!(
        !told
            .iter()
            .any(|m| m.contains("READY=1") || m.contains("MAINPID=")),
        "{told:?}"
    );
    // Only the predecessor's listener is left, and it serves.
    assert_eq!(listening_sockets(addr), 1);
    for i in 0..20 {
        let data = random_bytes(1024, 1200 + i);
        one(addr, &data).unwrap_or_else(|e| panic!("client {i} after: {e}"));
    }
    assert!(
        !s.old.log().iter().any(|l| l.contains("draining")),
        "{:?}",
        s.old.log()
    );
    // And it still hands over.
    let third = taken_over(s.origin, addr, &s.ctl);
    let status = s.old.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{:?}", s.old.log());
    let data = random_bytes(1024, 1300);
    one(addr, &data).unwrap();
    let (status, _) = third.terminate();
    assert!(status.success());
}

/// A successor given up on stops even when the process that gave up on it
/// is gone by the time it runs again: replaced by another successor (as a
/// retried upgrade does), or stopped. (The build that checked only
/// whether the predecessor still ran took an exited one for a crash and
/// served on: beside the new successor, holding the same control socket,
/// or after the service had been stopped: a break-it round.)
#[test]
fn a_successor_given_up_on_stops_after_its_predecessor_was_replaced() {
    let mut s = stalled_successor("replaced", 5, &["--handover-timeout", "1s"], not_listening)
        .unwrap_or_else(|seen| {
            panic!("in every attempt the successor's new listener listened before it could serve: {seen:?}")
        });
    s.old.wait_for_log(
        |l| l.contains("hand-over failed, still serving"),
        Duration::from_secs(20),
    );
    let addr = s.old.addr;
    let next = taken_over(s.origin, addr, &s.ctl);
    let status = s.old.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{:?}", s.old.log());
    let status = s.resume_to_exit();
    assert_eq!(status, Some(2), "{:?}", s.lines);
    assert!(
        s.lines
            .last()
            .is_some_and(|l| l.contains("gave up waiting") && l.contains("has exited since")),
        "{:?}",
        s.lines
    );
    // The new successor alone serves, and its control socket works.
    assert_eq!(listening_sockets(addr), 1);
    for i in 0..20 {
        let data = random_bytes(1024, 1400 + i);
        one(addr, &data).unwrap_or_else(|e| panic!("client {i}: {e}"));
    }
    let mut next = next;
    let third = taken_over(s.origin, addr, &s.ctl);
    assert!(next.wait_exit(Duration::from_secs(30)).success());
    let (status, _) = third.terminate();
    assert!(status.success());
}

/// A second successor arriving while a hand-over is in progress is
/// refused with the reason (one line, exit 2), not a bare "Broken pipe"
/// from writing to a socket the predecessor had already closed.
#[test]
fn a_second_successor_during_a_hand_over_is_told_busy() {
    let s = stalled_successor("busy", 5, &[], not_listening).unwrap_or_else(|seen| {
        panic!("in every attempt the successor's new listener listened before it could serve: {seen:?}")
    });
    let line = failed_takeover(&s.ctl, Duration::from_secs(20));
    assert!(line.contains("another hand-over is in progress"), "{line}");
    s.old.wait_for_log(
        |l| l.contains("refused a second successor (busy)"),
        Duration::from_secs(10),
    );
}

/// A forward started with `--takeover ctl` that must fail within `limit`:
/// exit 2 and one line on stderr, which is returned.
fn failed_takeover(ctl: &str, limit: Duration) -> String {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "forward",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "127.0.0.1:1",
    ])
    .args(["--takeover", ctl]);
    let (status, stderr) = run_bounded(cmd, limit).expect("hung");
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    stderr
}

/// `--takeover` naming a control socket nothing serves (a path never
/// created, or a stale socket file left by a process that is gone) says
/// so in one line, without claiming a running process keeps serving.
#[test]
fn a_takeover_with_no_predecessor_says_so() {
    let stale = control_path("stale");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    for ctl in [control_path("none"), stale] {
        let stderr = failed_takeover(&ctl, Duration::from_secs(20));
        assert!(
            stderr.contains(&format!("nothing serves the control socket {ctl}"))
                && !stderr.contains("keeps serving"),
            "{stderr}"
        );
    }
}

/// `--takeover` on a socket whose process accepts and never answers: after
/// the exchange's 10 s it fails in one line that says so (it said
/// "Resource temporarily unavailable", the timed-out read's errno).
#[test]
fn a_takeover_from_a_silent_process_says_it_got_no_answer() {
    let ctl = control_path("silent");
    let listener = std::os::unix::net::UnixListener::bind(&ctl).unwrap();
    let held = std::thread::spawn(move || listener.accept().map(|(c, _)| c));
    let stderr = failed_takeover(&ctl, Duration::from_secs(30));
    drop(held.join());
    assert!(stderr.contains("no answer within 10s"), "{stderr}");
}

#[test]
fn a_failed_takeover_leaves_the_running_process_serving() {
    let origin = echo_origin();
    let ctl = control_path("fail");
    let old = Proxy::forward(origin)
        .shards(1)
        .args(["--control-socket", &ctl])
        .start();
    // A different listen address cannot take these listeners.
    let mut cmd = Command::new(BIN);
    cmd.args([
        "forward",
        "--listen",
        "127.0.0.1:1",
        "--upstream",
        &origin.to_string(),
        "--cores",
        "1",
        "--takeover",
        &ctl,
    ]);
    let (status, stderr) = run_bounded(cmd, Duration::from_secs(20)).expect("hung");
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot take over"), "{stderr}");
    // The predecessor names the successor's reason (`FAILED`), not only
    // "closed by the peer" (a new-user trial's report).
    old.wait_for_log(
        |l| {
            l.contains("hand-over failed, still serving: the successor failed:")
                && l.contains("they must match")
        },
        Duration::from_secs(10),
    );
    let data = Arc::new(random_bytes(4096, 5));
    assert_eq!(echo_round_trip(old.addr, data.clone()), *data);
    // A second process may not silently serve a live control socket: it
    // refuses to start, in one line (before anything else is logged, with
    // a metrics port too: a new-user trial saw an INFO line first).
    // Also on the running process's own port, where its listeners would
    // join that process's SO_REUSEPORT group: no warning about that first
    // (a new-user trial saw one), and none of its connections reset.
    for listen in ["127.0.0.1:0".to_string(), old.addr.to_string()] {
        let mut cmd = Command::new(BIN);
        cmd.args(["forward", "--listen", &listen])
            .args(["--upstream", &origin.to_string(), "--cores", "1"])
            .args(["--metrics-listen", "127.0.0.1:0", "--control-socket", &ctl]);
        let (status, stderr) = run_bounded(cmd, Duration::from_secs(20)).expect("hung");
        assert_eq!(status.code(), Some(2), "{listen}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{listen}: {stderr}");
        assert!(
            stderr.contains("a running shardproxy serves it") && stderr.contains("--takeover"),
            "{listen}: {stderr}"
        );
    }
    // The first goes on serving.
    let data = Arc::new(random_bytes(3000, 6));
    assert_eq!(echo_round_trip(old.addr, data.clone()), *data);
    // The start-up log names the control socket and how to use it.
    let named = format!(
        "control socket {ctl} (upgrade: SIGUSR2, or start another process with --takeover {ctl})"
    );
    assert!(
        old.log().iter().any(|l| l.contains(&named)),
        "{:?}",
        old.log()
    );
    let (status, _) = old.terminate();
    assert!(status.success());
}

/// A datagram socket standing in for systemd's `NOTIFY_SOCKET`.
struct Notify {
    sock: UnixDatagram,
    path: String,
}

impl Notify {
    fn new(tag: &str) -> Notify {
        let path = std::env::temp_dir()
            .join(format!("shardproxy-notify-{}-{tag}", std::process::id()))
            .to_str()
            .unwrap()
            .to_string();
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Notify { sock, path }
    }

    /// Every message already queued (none waited for).
    fn drain(&self) -> Vec<String> {
        self.sock.set_nonblocking(true).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.sock.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
        self.sock.set_nonblocking(false).unwrap();
        out
    }

    /// Reads messages until one contains `want`; returns them all.
    fn expect(&self, want: &str) -> Vec<String> {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = self
                .sock
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("no `{want}` from sd_notify ({e}); got {seen:?}"));
            let msg = String::from_utf8_lossy(&buf[..n]).to_string();
            let hit = msg.lines().any(|l| l == want || l.starts_with(want));
            seen.push(msg);
            if hit {
                return seen;
            }
        }
    }
}

#[test]
fn sd_notify_reports_ready_reloading_stopping_and_the_new_main_pid() {
    let origin = echo_origin();
    let key = key_file(&[&keygen()]);
    let notify = Notify::new("states");
    let ctl = control_path("notify");
    let old = Proxy::exit(origin, &key)
        .shards(2)
        .args(["--control-socket", &ctl])
        .env("NOTIFY_SOCKET", &notify.path)
        .start();
    let msgs = notify.expect("READY=1");
    assert!(
        msgs.iter()
            .any(|m| m.contains(&format!("MAINPID={}", old.pid()))),
        "{msgs:?}"
    );
    old.signal("HUP");
    notify.expect("RELOADING=1");
    notify.expect("READY=1");
    // A takeover: the old process names the new one as the main PID, and
    // does not say STOPPING=1 (systemd would stop the whole service).
    let mut old = old;
    let new = Proxy::exit(origin, &key)
        .listen(old.addr)
        .shards(1)
        .args(["--takeover", &ctl])
        .env("NOTIFY_SOCKET", &notify.path)
        .start();
    let msgs = notify.expect(&format!("MAINPID={}", new.pid()));
    assert_eq!(wait_exited(&mut old, Duration::from_secs(30)), Some(0));
    let mut after = msgs;
    after.extend(notify.drain());
    assert!(
        !after.iter().any(|m| m.contains("STOPPING=1")),
        "a hand-over told systemd the service stops: {after:?}"
    );
    // The successor's own SIGTERM does.
    new.signal("TERM");
    notify.expect("STOPPING=1");
    let mut new = new;
    assert!(new.wait_exit(Duration::from_secs(30)).success());
    let _ = std::fs::remove_file(&notify.path);
}

#[test]
fn drain_delay_says_503_while_still_accepting_then_stops() {
    let origin = echo_origin();
    let mut p = Proxy::forward(origin)
        .shards(1)
        .args(["--drain-delay", "3s", "--metrics-listen", "127.0.0.1:0"])
        .start();
    let metrics = p.metrics_addr();
    assert_eq!(healthz(metrics), Ok(200));
    let sent = Instant::now();
    p.signal("TERM");
    p.wait_for_log(|l| l.contains("drain delay"), Duration::from_secs(10));
    assert_eq!(healthz(metrics), Ok(503));
    // Still accepting and serving during the delay.
    let data = Arc::new(random_bytes(2048, 3));
    assert_eq!(echo_round_trip(p.addr, data.clone()), *data);
    assert!(
        sent.elapsed() < Duration::from_secs(3),
        "too slow to observe the delay"
    );
    // Then the listener stops.
    p.wait_for_log(
        |l| l.contains("draining: stopped accepting"),
        Duration::from_secs(10),
    );
    assert!(
        sent.elapsed() >= Duration::from_millis(2900),
        "drained before the delay"
    );
    // The listener closes as the shard's accept loop ends.
    poll_until(Duration::from_secs(5), || {
        match TcpStream::connect(p.addr) {
            Err(_) => Ok(()),
            Ok(_) => Err("still accepting after the delay".to_string()),
        }
    });
    let status = p.wait_exit(Duration::from_secs(10));
    assert!(status.success());
}

/// The process a SIGUSR2 upgrade executes inherits none of the old
/// process's connections: the old one's drain timeout still resets them.
/// A predecessor draining after a hand-over is not stopped by the first
/// SIGTERM it gets: `systemctl stop` (KillMode=control-group, the default)
/// signals every process of the unit, the draining one too, and a stop
/// drains. It used to take that signal as the second one and reset the
/// connections it was draining. A second SIGTERM still exits at once.
#[test]
fn a_stop_during_the_hand_over_drain_lets_the_drain_finish() {
    let origin = echo_origin();
    let ctl = control_path("stopdrain");
    let mut old = Proxy::forward(origin)
        .shards(1)
        .args(["--control-socket", &ctl, "--drain-timeout", "30s"])
        .start();
    let mut held = held_session(old.addr);
    // The successor shares old's stderr: it must be gone before old's log
    // reader can finish, also when an assertion below fails.
    let successor = KillOnDrop(sigusr2_successor(&old));
    old.wait_for_log(
        |l| l.contains("hand-over complete"),
        Duration::from_secs(20),
    );
    old.signal("TERM");
    old.wait_for_log(
        |l| l.contains("termination signal while draining after the hand-over"),
        Duration::from_secs(10),
    );
    // Still draining: the held connection works, then ends cleanly, and
    // with it the drain (exit 0).
    held.write_all(b"pong").unwrap();
    let mut b = [0u8; 4];
    held.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"pong");
    held.shutdown(std::net::Shutdown::Write).unwrap();
    let (end, _) = read_until_end(&mut held, Duration::from_secs(10));
    drop(successor);
    assert_eq!(end, End::Eof, "{:?}", old.log());
    assert_eq!(wait_exited(&mut old, Duration::from_secs(30)), Some(0));
    assert!(
        !old.log()
            .iter()
            .any(|l| l.contains("second termination signal: exiting now")),
        "{:?}",
        old.log()
    );
}

#[test]
fn a_reexecuted_successor_inherits_no_client_connection() {
    let origin = echo_origin();
    let ctl = control_path("cloexec");
    let mut old = Proxy::forward(origin)
        .shards(1)
        .args(["--control-socket", &ctl, "--drain-timeout", "2s"])
        .start();
    let mut idle = held_session(old.addr);
    let pid = sigusr2_successor(&old);
    old.wait_for_log(
        |l| l.contains("hand-over complete"),
        Duration::from_secs(20),
    );
    // The successor holds only its own sockets: no TCP connection.
    let conns = Command::new("ss")
        .args(["-tnpH", "state", "established"])
        .output()
        .unwrap();
    let held: Vec<String> = String::from_utf8_lossy(&conns.stdout)
        .lines()
        .filter(|l| l.contains(&format!("pid={pid},")))
        .map(str::to_string)
        .collect();
    // The idle client is reset at the old process's drain timeout.
    let (end, _) = read_until_end(&mut idle, Duration::from_secs(10));
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    assert!(held.is_empty(), "the successor holds connections: {held:?}");
    assert_eq!(
        end,
        End::Reset,
        "the idle client was not reset at the drain timeout"
    );
    assert_eq!(wait_exited(&mut old, Duration::from_secs(30)), Some(0));
}

#[test]
fn control_socket_paths_and_roles_are_checked() {
    let origin = echo_origin();
    // A regular file is never replaced by the control socket.
    let file = control_path("regular");
    std::fs::write(&file, "precious").unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args([
        "forward",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &origin.to_string(),
    ])
    .args(["--cores", "1", "--control-socket", &file]);
    let (status, stderr) = run_bounded(cmd, Duration::from_secs(20)).expect("hung");
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not a socket"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");
    let _ = std::fs::remove_file(&file);
    // An exit cannot take over a forward's listeners.
    let ctl = control_path("role");
    let old = Proxy::forward(origin)
        .shards(1)
        .args(["--control-socket", &ctl])
        .start();
    let key = key_file(&[&keygen()]);
    let mut cmd = Command::new(BIN);
    cmd.args([
        "exit",
        "--listen",
        &old.addr.to_string(),
        "--upstream",
        &origin.to_string(),
    ])
    .args(["--key-file", &key, "--cores", "1", "--takeover", &ctl]);
    let (status, stderr) = run_bounded(cmd, Duration::from_secs(20)).expect("hung");
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("the running process is forward"),
        "{stderr}"
    );
    let data = Arc::new(random_bytes(1000, 7));
    assert_eq!(echo_round_trip(old.addr, data.clone()), *data);
    let (status, _) = old.terminate();
    assert!(status.success());
}

/// A second process on the same port (no `--takeover`) joins the
/// `SO_REUSEPORT` group; while `net.ipv4.tcp_migrate_req` is 0 it warns
/// that closing either side resets queued connections.
#[test]
fn joining_a_group_warns_when_queued_connections_would_be_reset() {
    let origin = echo_origin();
    let first = Proxy::forward(origin).shards(1).start();
    let second = Proxy::forward(origin).listen(first.addr).shards(1).start();
    let migrate = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req")
        .unwrap()
        .trim()
        .to_string();
    let warned = second
        .log()
        .iter()
        // Each text line names its process: `TIME LEVEL [PID] message`.
        .any(|l| {
            l.contains(" WARN ")
                && l.contains(&format!(" [{}] ", second.pid()))
                && l.contains("tcp_migrate_req = 0")
        });
    assert_eq!(
        warned,
        migrate == "0",
        "migrate_req={migrate}: {:?}",
        second.log()
    );
    // The first process joined no group: no warning there.
    assert!(
        !first.log().iter().any(|l| l.contains("tcp_migrate_req")),
        "{:?}",
        first.log()
    );
}

/// The client hello's length on the wire (docs/PROTOCOL.md §2).
const CLIENT_HELLO: usize = 124;

/// The exit's replay set crosses a hand-over (issue #13, docs/PROTOCOL.md
/// §7): a hello the predecessor accepted gets silence from the successor,
/// on whichever shard it lands, while tunnel clients under load lose no
/// connection (the successor holds its replay checks until the set
/// arrives).
fn exit_takeover_carries_the_replay_set(from: usize, to: usize) {
    let origin = echo_origin();
    let key = key_file(&[&keygen()]);
    let ctl = control_path(&format!("exit-{from}-{to}"));
    let mut old = Proxy::exit(origin, &key)
        .shards(from)
        .args(["--control-socket", &ctl, "--handshake-timeout", "1s"])
        .start();
    // Sessions recorded by a man in the middle, before the hand-over.
    let (tap, recording) = mitm(old.addr, Tamper::Record);
    let recorder = Proxy::entry(tap, &key).start();
    one(recorder.addr, &random_bytes(1024, 7)).unwrap();
    let hello = recording.lock().unwrap()[..CLIENT_HELLO].to_vec();
    // Every client a hello of its own (no keep-alive tunnels, which would
    // carry most of them without one), so that the set is large.
    let entry = Proxy::entry(old.addr, &key)
        .args(["--tunnel-keepalive", "0"])
        .start();
    let load = Load::start(entry.addr, TOTAL / 2, SECS);
    load.wait_done(TOTAL / 4);
    let new = Proxy::exit(origin, &key)
        .listen(old.addr)
        .shards(to)
        .args(["--takeover", &ctl, "--handshake-timeout", "1s"])
        .start();
    let line = new.wait_for_log(
        |l| l.contains("replay set of") && l.contains("inherited"),
        Duration::from_secs(15),
    );
    let inherited = number_after(&line, "replay set of ").unwrap_or(0) as usize;
    // The recorded session and the load's first quarter, at least.
    assert!(inherited > TOTAL / 4, "{line}");
    assert_eq!(
        wait_exited(&mut old, Duration::from_secs(30)),
        Some(0),
        "{:?}",
        old.log()
    );
    let (done, failed) = load.finish();
    assert_eq!(done, TOTAL / 2);
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    // Replays, in parallel so that the kernel spreads them over the shards.
    let replays: Vec<_> = (0..10)
        .map(|_| {
            let (addr, hello) = (new.addr, hello.clone());
            thread::spawn(move || {
                let mut c = TcpStream::connect(addr).unwrap();
                c.write_all(&hello).unwrap();
                read_until_end(&mut c, Duration::from_secs(10))
            })
        })
        .collect();
    for r in replays {
        let (end, n) = r.join().unwrap();
        assert_eq!(n, 0, "a replay after the hand-over got {n} bytes back");
        assert_ne!(end, End::Open);
    }
    // A fresh session still works.
    one(entry.addr, &random_bytes(1024, 8)).unwrap();
    let (status, lines) = new.terminate();
    assert!(status.success(), "{lines:?}");
    let failures: u64 = summaries(&lines)
        .iter()
        .map(|s| s.get("handshake_failures"))
        .sum();
    assert_eq!(failures, 10, "{lines:?}");
}

#[test]
fn an_exit_takeover_carries_the_replay_set_two_to_two() {
    exit_takeover_carries_the_replay_set(2, 2);
}

#[test]
fn an_exit_takeover_carries_the_replay_set_two_to_one() {
    exit_takeover_carries_the_replay_set(2, 1);
}

/// Reads one `\n`-terminated line, a byte at a time (so that nothing after
/// it is consumed).
fn line_from(conn: &mut impl Read) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while conn.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    String::from_utf8_lossy(&line).into_owned()
}

/// A successor of this version taking over from a process that speaks only
/// version 1 of the hand-over (no replay set): it falls back, says so,
/// refuses hellos stamped before its own start (fail closed) and serves.
#[test]
fn a_takeover_from_a_version_1_process_falls_back_and_serves() {
    use sendfd::SendWithFd;
    use std::os::fd::AsRawFd;
    let origin = echo_origin();
    let key = key_file(&[&keygen()]);
    let ctl = control_path("v1-predecessor");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let control = std::os::unix::net::UnixListener::bind(&ctl).unwrap();
    let fake = thread::spawn(move || {
        let mut seen = Vec::new();
        // First the successor asks for version 2; a version 1 process
        // refuses the request.
        let (mut c, _) = control.accept().unwrap();
        seen.push(line_from(&mut c));
        c.write_all(b"ERROR unsupported request\n").unwrap();
        drop(c);
        let (mut c, _) = control.accept().unwrap();
        seen.push(line_from(&mut c));
        let head = format!("LISTENERS {} exit 0 1 0 1\n", std::process::id());
        c.send_with_fd(
            head.as_bytes(),
            &[listener.as_raw_fd(), control.as_raw_fd()],
        )
        .unwrap();
        seen.push(line_from(&mut c));
        c.write_all(b"DRAINING\n").unwrap();
        seen
    });
    let new = Proxy::exit(origin, &key)
        .listen(addr)
        .args(["--takeover", &ctl])
        .start();
    new.wait_for_log(
        |l| l.contains("replay set of 0 salt(s) inherited"),
        Duration::from_secs(15),
    );
    let seen = fake.join().unwrap();
    assert_eq!(seen[..2], ["TAKEOVER 2", "TAKEOVER 1"]);
    assert!(seen[2].starts_with("READY "), "{seen:?}");
    let log = new.log().join("\n");
    assert!(log.contains("speaks hand-over version 1"), "{log}");
    assert!(log.contains("replay set is incomplete"), "{log}");
    let entry = Proxy::entry(addr, &key).start();
    one(entry.addr, &random_bytes(1024, 9)).unwrap();
    let (status, lines) = new.terminate();
    assert!(status.success(), "{lines:?}");
}

/// A fake predecessor (hand-over version 1, role forward) holding `n`
/// listeners of one `SO_REUSEPORT` group on 127.0.0.1 and the control
/// socket `ctl`; it hands them over to the first successor that asks.
/// Returns their address and the thread, which ends with the successor's
/// `READY` line. (This machine has too few cores for a real predecessor
/// with more shards than a successor.)
fn fake_predecessor(ctl: &str, n: usize) -> (SocketAddr, thread::JoinHandle<String>) {
    use sendfd::SendWithFd;
    use std::os::fd::AsRawFd;
    let group: Vec<socket2::Socket> = (0..n)
        .map(|_| {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.set_reuse_port(true).unwrap();
            s
        })
        .collect();
    group[0]
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    let addr = group[0].local_addr().unwrap().as_socket().unwrap();
    for s in &group[1..] {
        s.bind(&addr.into()).unwrap();
    }
    for s in &group {
        s.listen(1024).unwrap();
    }
    let control = std::os::unix::net::UnixListener::bind(ctl).unwrap();
    let fake = thread::spawn(move || {
        let (mut c, _) = control.accept().unwrap();
        line_from(&mut c);
        c.write_all(b"ERROR unsupported request\n").unwrap();
        drop(c);
        let (mut c, _) = control.accept().unwrap();
        line_from(&mut c);
        let head = format!("LISTENERS {} forward 0 {n} 0 1\n", std::process::id());
        let mut fds: Vec<_> = group.iter().map(|s| s.as_raw_fd()).collect();
        fds.push(control.as_raw_fd());
        c.send_with_fd(head.as_bytes(), &fds).unwrap();
        let ready = line_from(&mut c);
        c.write_all(b"DRAINING\n").unwrap();
        ready
    });
    (addr, fake)
}

/// `N` connections through `p`, then stops it: how many each shard accepted.
fn accepted_per_shard(p: Proxy) -> Vec<u64> {
    for i in 0..N_SPREAD {
        one(p.addr, &[i as u8; 16]).unwrap();
    }
    let (status, lines) = p.terminate();
    assert!(status.success(), "{lines:?}");
    let accepted: Vec<u64> = summaries(&lines)
        .iter()
        .map(|s| s.get("accepted"))
        .collect();
    assert_eq!(accepted.iter().sum::<u64>(), N_SPREAD, "{lines:?}");
    accepted
}

const N_SPREAD: u64 = 600;

/// A successor with fewer shards than there are listeners (3 listeners,
/// 2 shards) serves every connection, and on every shard. The extra
/// listener is shared by both shards (the unit test
/// `app::tests::assign_inherited` pins that assignment): each shard then
/// has its own listener's third of the connections, plus what it wins of
/// the shared one's third, which is a race. With the extra listener given
/// to one shard the split was 400 and 200 of 600; shared, 227–320 per
/// shard over six runs, but also 373/227 and 395/205 in CI runs: counts
/// cannot tell the two apart, and this test asserted at least 35% each
/// until the 395/205 run failed it. What counts can show is that each
/// shard serves its own listener: at least 25% each (its third, 200 of
/// 600, less four standard deviations of SO_REUSEPORT's spread, about 12).
#[test]
fn a_successor_with_fewer_shards_serves_on_every_shard() {
    let origin = echo_origin();
    let ctl = control_path("3-listeners");
    let (addr, fake) = fake_predecessor(&ctl, 3);
    let new = Proxy::forward(origin)
        .listen(addr)
        .shards(2)
        .args(["--takeover", &ctl])
        .start();
    let ready = fake.join().unwrap();
    assert!(ready.starts_with("READY "), "{ready}");
    new.wait_for_log(
        |l| l.contains("hand-over complete"),
        Duration::from_secs(15),
    );
    let accepted = accepted_per_shard(new);
    assert_each_shard_took(&accepted, N_SPREAD * 25 / 100);
}

/// After a shrink (2 listeners to 1 shard, which accepts on both), the next
/// successor with as many shards as listeners is balanced again: one
/// listener each, at least 35% of 600 connections each.
#[test]
fn a_successor_with_more_shards_undoes_a_shrink() {
    let origin = echo_origin();
    let ctl = control_path("shrink-then-grow");
    let (addr, fake) = fake_predecessor(&ctl, 2);
    let mut one_shard = Proxy::forward(origin)
        .listen(addr)
        .shards(1)
        .args(["--takeover", &ctl])
        .start();
    assert!(fake.join().unwrap().starts_with("READY "));
    one_shard.wait_for_log(
        |l| l.contains("hand-over complete"),
        Duration::from_secs(15),
    );
    let two = Proxy::forward(origin)
        .listen(addr)
        .shards(2)
        .args(["--takeover", &ctl])
        .start();
    two.wait_for_log(
        // Not "did not confirm ... accepts alone": an idle predecessor
        // exited before writing DRAINING, until it waited for its exchange.
        |l| l.contains("hand-over complete"),
        Duration::from_secs(15),
    );
    assert_eq!(
        wait_exited(&mut one_shard, Duration::from_secs(30)),
        Some(0),
        "{:?}",
        one_shard.log()
    );
    assert_each_shard_took(&accepted_per_shard(two), N_SPREAD * 35 / 100);
}

/// Two shards, each of which accepted at least `least` connections.
fn assert_each_shard_took(accepted: &[u64], least: u64) {
    assert_eq!(accepted.len(), 2, "{accepted:?}");
    for (shard, n) in accepted.iter().enumerate() {
        assert!(*n >= least, "shard {shard} accepted {n}: {accepted:?}");
    }
}

/// A successor that speaks only version 1 (an older binary) still takes the
/// listeners over from this version: no `SALTS` line, then `DRAINING`.
#[test]
fn a_version_1_successor_is_still_served() {
    use sendfd::RecvWithFd;
    let origin = echo_origin();
    let key = key_file(&[&keygen()]);
    let ctl = control_path("v1-successor");
    let mut old = Proxy::exit(origin, &key)
        .args(["--control-socket", &ctl])
        .start();
    let mut c = std::os::unix::net::UnixStream::connect(&ctl).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.write_all(b"TAKEOVER 1\n").unwrap();
    let mut head = [0u8; 128];
    let mut fds = [-1; 8];
    let (n, nfds) = c.recv_with_fd(&mut head, &mut fds).unwrap();
    let head = String::from_utf8_lossy(&head[..n]).into_owned();
    assert!(
        head.starts_with("LISTENERS ") && head.contains(" exit "),
        "{head}"
    );
    assert_eq!(nfds, 2, "{head}");
    c.write_all(b"READY 1\n").unwrap();
    assert_eq!(line_from(&mut c), "DRAINING");
    assert_eq!(wait_exited(&mut old, Duration::from_secs(30)), Some(0));
}

/// Stop wins over an upgrade in flight: a termination signal that reaches
/// the old process after SIGUSR2 started a successor but before the
/// successor said it was ready stops the successor too. It used to take
/// the listeners over and keep serving after the process told to stop had
/// gone (found by break-it testing: 6 of 10 tries with the stop 6-8 ms
/// after SIGUSR2).
#[test]
fn a_stop_during_an_upgrade_stops_the_successor_too() {
    let origin = echo_origin();
    let ctl = control_path("stopupgrade");
    let mut old = Proxy::forward(origin)
        .shards(1)
        .args(["--control-socket", &ctl])
        .start();
    let pid = sigusr2_successor(&old);
    let _successor = KillOnDrop(pid);
    // The successor holds the listeners now (it shares old's stderr) but
    // has not said it is ready: the window.
    old.wait_for_log(
        |l| l.contains("taking over from process"),
        Duration::from_secs(20),
    );
    old.signal("TERM");
    assert_eq!(wait_exited(&mut old, Duration::from_secs(30)), Some(0));
    let log = old.log();
    let stopped_it = format!("termination signal during the upgrade: process {pid}");
    let ready_first = log
        .iter()
        .any(|l| l.contains("termination signal while draining after the hand-over"))
        // The old one handed over and finished its (empty) drain before
        // the signal came: it logs nothing about it (seen in CI).
        || (log.iter().any(|l| l.contains(&format!("handed over to process {pid}")))
            && !log.iter().any(|l| l.contains(&stopped_it)));
    if ready_first {
        // The successor was ready first: it is the service now, rightly.
        return;
    }
    poll_until(Duration::from_secs(15), || match process_running(pid) {
        true => Err(format!("successor {pid} still serving: {log:?}")),
        false => Ok(()),
    });
    assert!(
        log.iter().any(|l| l.contains(&format!(
            "termination signal during the upgrade: process {pid}, not ready yet, told to stop too"
        ))),
        "{log:?}"
    );
}

/// A SIGUSR2 successor that exits before taking the listeners over, even
/// with status 0, is reported as a failed upgrade; it was an INFO line
/// ("exited (exit status: 0)") with nothing saying the upgrade had failed.
#[test]
fn a_successor_that_exits_before_taking_over_is_a_failed_upgrade() {
    // A hard link of the binary (same file system as target/), replaced by
    // a script once the proxy runs: SIGUSR2 executes the path it started
    // from, which now exits 0 at once.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("upgrade-exit0-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("shardproxy");
    let _ = std::fs::remove_file(&exe);
    std::fs::hard_link(BIN, &exe).unwrap();
    let origin = echo_origin();
    let ctl = control_path("exit0");
    let old = Proxy::forward(origin)
        .shards(1)
        .binary(&exe)
        .args(["--control-socket", &ctl])
        .start();
    std::fs::remove_file(&exe).unwrap();
    std::fs::write(&exe, "#!/bin/sh\nexit 0\n").unwrap();
    Command::new("chmod").arg("755").arg(&exe).status().unwrap();
    old.signal("USR2");
    old.wait_for_log(
        |l| l.contains("before taking the listeners over: the upgrade failed"),
        Duration::from_secs(20),
    );
    // Still serving.
    let mut c = TcpStream::connect(old.addr).unwrap();
    c.write_all(b"still").unwrap();
    let mut b = [0u8; 5];
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"still");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A successor whose predecessor dies before confirming the hand-over says
/// it accepts alone; it said "both processes accept" (found by break-it
/// testing, after a stop during an upgrade).
#[test]
fn a_successor_whose_predecessor_died_says_it_accepts_alone() {
    let origin = echo_origin();
    let ctl = control_path("diedmid");
    let old = Proxy::forward(origin)
        .shards(1)
        .args(["--control-socket", &ctl])
        .start();
    let _successor = KillOnDrop(sigusr2_successor(&old));
    old.wait_for_log(
        |l| l.contains("taking over from process"),
        Duration::from_secs(20),
    );
    old.signal("KILL");
    // The successor shares old's stderr, so its lines are in old's log.
    let line = old.wait_for_log(
        |l| l.contains("did not confirm") || l.contains("hand-over complete"),
        Duration::from_secs(20),
    );
    if line.contains("hand-over complete") {
        return; // it confirmed before the kill: nothing to check
    }
    assert!(
        line.contains("and has exited; this process accepts alone"),
        "{line}"
    );
}

/// Hand-overs of both tunnel roles under load while keep-alive tunnels
/// carry most sessions (docs/PROTOCOL.md §4.1): the old exit says goodbye
/// on its idle tunnels and serves every session already started on one;
/// the old entry closes its idle tunnels; no client is lost either time.
#[test]
fn takeovers_of_keepalive_tunnels_lose_no_connection() {
    let origin = echo_origin();
    let key = key_file(&[&keygen()]);
    let exit_ctl = control_path("ka-exit");
    let entry_ctl = control_path("ka-entry");
    let mut old_exit = Proxy::exit(origin, &key)
        .shards(2)
        .args(["--control-socket", &exit_ctl])
        .start();
    let mut old_entry = Proxy::entry(old_exit.addr, &key)
        .shards(2)
        .args(["--control-socket", &entry_ctl])
        .start();
    let load = Load::start(old_entry.addr, TOTAL, SECS);
    load.wait_done(TOTAL / 3);
    let new_exit = Proxy::exit(origin, &key)
        .listen(old_exit.addr)
        .shards(2)
        .args(["--takeover", &exit_ctl])
        .start();
    assert_eq!(
        wait_exited(&mut old_exit, Duration::from_secs(30)),
        Some(0),
        "{:?}",
        old_exit.log()
    );
    load.wait_done(2 * TOTAL / 3);
    let new_entry = Proxy::entry(old_exit.addr, &key)
        .listen(old_entry.addr)
        .shards(2)
        .args(["--takeover", &entry_ctl])
        .start();
    assert_eq!(
        wait_exited(&mut old_entry, Duration::from_secs(30)),
        Some(0),
        "{:?}",
        old_entry.log()
    );
    let (done, failed) = load.finish();
    assert_eq!(done, TOTAL);
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    let reuses = |lines: &[String]| -> u64 {
        summaries(lines)
            .iter()
            .map(|s| s.get("tunnel_reuses"))
            .sum()
    };
    // Kept tunnels carried sessions before and after each hand-over.
    let old_entry_lines = old_entry.log();
    assert!(reuses(&old_entry_lines) > 0, "{old_entry_lines:?}");
    let (_, entry_lines) = new_entry.terminate();
    assert!(reuses(&entry_lines) > 0, "{entry_lines:?}");
    let (status, exit_lines) = new_exit.terminate();
    assert!(status.success(), "{exit_lines:?}");
    assert!(reuses(&exit_lines) > 0, "{exit_lines:?}");
}

/// A stand-in for a predecessor of an older build, in Python: it listens on
/// 127.0.0.1:0 with Nagle on (as builds before session 22 left their
/// listeners), prints `PORT <port>`, then hands that listener and the
/// control socket over to the first successor that connects to `ctl`
/// (`TAKEOVER 2`, see `src/handover.rs`) and exits once it said
/// `DRAINING`.
const OLD_PREDECESSOR: &str = r#"
import os, socket, sys
ctl = sys.argv[1]
l = socket.socket()
l.bind(("127.0.0.1", 0))
l.listen(64)
u = socket.socket(socket.AF_UNIX)
u.bind(ctl)
u.listen(1)
u.settimeout(30)
print("PORT", l.getsockname()[1], flush=True)
c, _ = u.accept()
c.settimeout(30)
f = c.makefile("rb")
assert f.readline().startswith(b"TAKEOVER"), "no TAKEOVER"
socket.send_fds(c, [b"LISTENERS %d forward 0 1 0 1\n" % os.getpid()], [l.fileno(), u.fileno()])
assert f.readline().startswith(b"READY"), "no READY"
c.sendall(b"SALTS 0 0 1\nDRAINING\n")
c.close()
"#;

/// Clients queued on a listener taken over from a predecessor that left
/// Nagle on (an older build) did not inherit `TCP_NODELAY` (nor
/// `SO_LINGER` {1, 0}) from it: the successor sets both on them itself. A break-it round found every
/// client queued at an upgrade from the build before relayed with Nagle
/// on (every second round trip 40 ms instead of 2.5 ms).
#[test]
fn clients_queued_at_a_takeover_from_an_older_build_get_nagle_off() {
    use std::io::BufRead;
    let ctl = control_path("older");
    let mut old = Command::new("python3")
        .args(["-c", OLD_PREDECESSOR, &ctl])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let _old = KillOnDrop(old.id());
    let mut line = String::new();
    std::io::BufReader::new(old.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line
        .strip_prefix("PORT ")
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no port from the stand-in: {line:?}"));
    let listen: SocketAddr = ([127, 0, 0, 1], port).into();
    // Queued: nobody accepts on the stand-in's listener.
    let mut clients: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(listen).unwrap())
        .collect();
    let successor = Proxy::forward(echo_origin())
        .listen(listen)
        .args(["--takeover", &ctl])
        .start();
    successor.wait_for_log(
        |l| l.contains("hand-over complete"),
        Duration::from_secs(20),
    );
    for c in &mut clients {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(b"x").unwrap();
        c.read_exact(&mut [0u8; 1]).unwrap();
    }
    let peers: Vec<SocketAddr> = clients.iter().map(|c| c.local_addr().unwrap()).collect();
    assert_nagle_off(successor.pid(), "successor", &peers);
    // And SO_LINGER {1, 0}, which a plain-TCP client's socket would have
    // inherited from the listener too.
    assert_abortive_close(successor.pid(), "successor", &peers);
    assert_eq!(run_bounded_wait(&mut old, Duration::from_secs(10)), Some(0));
}
