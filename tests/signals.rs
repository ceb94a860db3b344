//! Signals, from the first instruction to the last: a SIGHUP or SIGTERM that
//! arrives while the process is still starting, SIGUSR1/SIGUSR2, and the
//! second termination signal, which must reset (RST) live connections,
//! never end them with a FIN that passes for a clean end.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Whether `pid` has a handler for SIGTERM (15) installed: the SigCgt mask
/// of /proc/PID/status.
fn catches_sigterm(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| signal_mask(&s, "SigCgt"))
        .is_some_and(|mask| mask & (1 << (15 - 1)) != 0)
}

/// Spawns `shardproxy ARGS` with stderr captured, sends `sig` `delay` after
/// its `main` installed its handlers, and returns the child and a channel
/// of its stderr lines.
///
/// Time zero is the handlers' installation, not the exec: between exec and
/// `main` (the dynamic loader and the Rust runtime, about a millisecond)
/// no program's own code runs, so no program can catch a signal there. What
/// this checks is that the handlers come first in `main`, before the config
/// is read, names resolved or ports bound (all of which the 0–10 ms delays
/// land in), and that each signal then does what it should.
fn spawn_and_signal(
    args: &[String],
    sig: &str,
    delay: Duration,
) -> (std::process::Child, mpsc::Receiver<String>) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let installed = Instant::now() + Duration::from_secs(10);
    // Polling a process's state: there is no event to wait on.
    while !catches_sigterm(child.id()) {
        assert!(Instant::now() < installed, "no SIGTERM handler after 10 s");
        thread::sleep(Duration::from_micros(100));
    }
    let started = Instant::now();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    // The delay is the input under test (when the signal lands), not a
    // synchronisation: nothing waits on it.
    if let Some(rest) = delay.checked_sub(started.elapsed()) {
        thread::sleep(rest);
    }
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig}");
    (child, rx)
}

/// Collects lines until one contains `want` (returns true) or `limit`.
fn wait_line(
    rx: &mpsc::Receiver<String>,
    want: &str,
    seen: &mut Vec<String>,
    limit: Duration,
) -> bool {
    let deadline = Instant::now() + limit;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                let hit = line.contains(want);
                seen.push(line);
                if hit {
                    return true;
                }
            }
            Err(_) => return false,
        }
    }
    false
}

fn listen_addr(line: &str) -> SocketAddr {
    line.split("listening on ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line}"))
}

const DELAYS_MS: [u64; 4] = [0, 1, 5, 10];

/// The exit of the issue: an upstream, a key file, two shards.
fn exit_args(key: &str, upstream: SocketAddr) -> Vec<String> {
    [
        "exit",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &upstream.to_string(),
        "--key-file",
        key,
        "--cores",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn sighup_during_start_up_is_applied_once_started_and_the_process_serves() {
    let keys = keygen();
    let key = key_file(&[&keys]);
    let origin = echo_origin();
    for ms in DELAYS_MS {
        let (mut child, rx) =
            spawn_and_signal(&exit_args(&key, origin), "HUP", Duration::from_millis(ms));
        let mut seen = Vec::new();
        assert!(
            wait_line(&rx, "listening on", &mut seen, Duration::from_secs(20)),
            "SIGHUP at {ms} ms: never listened: {seen:?} {:?}",
            child.try_wait()
        );
        let exit_addr = listen_addr(seen.iter().find(|l| l.contains("listening on")).unwrap());
        // Serves: a real entry gets bytes through it.
        let entry = Proxy::entry(exit_addr, &key).start();
        let data = std::sync::Arc::new(random_bytes(10_000, ms));
        assert_eq!(
            echo_round_trip(entry.addr, data.clone()),
            *data,
            "SIGHUP at {ms} ms"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "SIGHUP at {ms} ms killed it"
        );
        // The SIGHUP was not lost: it was either handled as a reload after
        // the start, or applied as one once started.
        let reloaded = "SIGHUP: reloaded 1 key(s)";
        assert!(
            seen.iter().any(|l| l.contains(reloaded))
                || wait_line(&rx, reloaded, &mut seen, Duration::from_secs(10)),
            "SIGHUP at {ms} ms was lost: {seen:?}"
        );
        drop(entry);
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(0), "{seen:?}");
    }
}

#[test]
fn sigterm_during_start_up_exits_zero_and_promptly() {
    let key = key_file(&[&keygen()]);
    let origin = echo_origin();
    for ms in DELAYS_MS {
        let (mut child, rx) =
            spawn_and_signal(&exit_args(&key, origin), "TERM", Duration::from_millis(ms));
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("SIGTERM at {ms} ms: still running after 10 s");
            }
            // Polling the child's state: there is no event to wait on.
            thread::sleep(Duration::from_millis(10));
        };
        let lines: Vec<String> = rx.try_iter().collect();
        assert_eq!(
            status.code(),
            Some(0),
            "SIGTERM at {ms} ms: {status:?} {lines:?}"
        );
    }
}

#[test]
fn sigusr1_without_an_access_log_and_sigusr2_without_a_control_socket_are_harmless() {
    // Without an access log, SIGUSR1 says there is none to reopen (it
    // claimed to reopen one); the reopen itself is in tests/identity.rs.
    let p = Proxy::forward(echo_origin()).shards(1).start();
    p.signal("USR1");
    p.wait_for_log(
        |l| l.contains("SIGUSR1: no access log to reopen (--access-log is not set)"),
        Duration::from_secs(10),
    );
    p.signal("USR2");
    p.wait_for_log(
        |l| l.contains("SIGUSR2: cannot upgrade without --control-socket"),
        Duration::from_secs(10),
    );
    let data = std::sync::Arc::new(random_bytes(1000, 1));
    assert_eq!(echo_round_trip(p.addr, data.clone()), *data);
    let (status, lines) = p.terminate();
    assert!(status.success(), "{lines:?}");
}

/// An origin that streams an endless download to each connection.
fn streaming_origin() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            thread::spawn(move || {
                let chunk = vec![0x5au8; 16 * 1024];
                let start = Instant::now();
                // Bounded: 60 s at most.
                while start.elapsed() < Duration::from_secs(60) {
                    if c.write_all(&chunk).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn second_sigterm_resets_live_downloads_never_a_clean_eof() {
    for role in ["forward", "entry+exit"] {
        let origin = streaming_origin();
        let key = key_file(&[&keygen()]);
        let (mut front, _back) = if role == "forward" {
            (
                Proxy::forward(origin)
                    .shards(1)
                    .args(["--drain-timeout", "60s"])
                    .start(),
                None,
            )
        } else {
            let exit = Proxy::exit(origin, &key).shards(1).start();
            let entry = Proxy::entry(exit.addr, &key)
                .shards(1)
                .args(["--drain-timeout", "60s"])
                .start();
            (entry, Some(exit))
        };
        let mut c = TcpStream::connect(front.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0usize;
        while got < 1 << 20 {
            got += c.read(&mut buf).unwrap();
        }
        front.signal("TERM");
        front.wait_for_log(|l| l.contains("draining"), Duration::from_secs(10));
        // Still flowing during the drain.
        let before = got;
        while got < before + (1 << 20) {
            got += c.read(&mut buf).unwrap();
        }
        front.signal("TERM");
        let status = front.wait_exit(Duration::from_secs(10));
        assert_eq!(status.code(), Some(1), "{role}");
        let (end, _) = read_until_end(&mut c, Duration::from_secs(10));
        assert_eq!(
            end,
            End::Reset,
            "{role}: an abandoned download ended with {end:?}"
        );
        // The client's connection and the upstream one: the count is of
        // connections, not of every socket (listeners, control socket).
        let line = front
            .log()
            .into_iter()
            .find(|l| l.contains("TCP connection(s) reset"))
            .unwrap_or_else(|| panic!("{role}: {:?}", front.log()));
        let n = number_after(&line, "exiting now, ").unwrap_or_else(|| panic!("{role}: {line}"));
        assert_eq!(n, 2, "{role}: {line}");
    }
}

#[test]
fn stray_signals_are_ignored_explicitly() {
    let p = Proxy::forward(echo_origin()).shards(1).start();
    for sig in [
        "ALRM", "VTALRM", "PROF", "IO", "PWR", "XFSZ", "TTIN", "TTOU",
    ] {
        p.signal(sig);
    }
    // Still serving after all of them (each would have ended or stopped it).
    let data = std::sync::Arc::new(random_bytes(1000, 2));
    assert_eq!(echo_round_trip(p.addr, data.clone()), *data);
    let (status, lines) = p.terminate();
    assert!(status.success(), "{lines:?}");
}

/// Started with SIGTERM and SIGHUP blocked by its parent, a proxy still
/// stops on SIGTERM (drains, exit 0) and reloads on SIGHUP: it unblocks
/// the signals it handles once its handlers are in place. It ignored both
/// for ever (`systemctl stop` then ends in SIGKILL after the stop timeout,
/// resetting every connection), as the relay once did SIGURG.
#[test]
fn signals_blocked_by_the_parent_still_stop_and_reload_the_proxy() {
    let key = key_file(&[&keygen()]);
    let wrapper = masked_wrapper("blocked", "signal.SIGTERM, signal.SIGHUP", "");
    let mut p = Proxy::exit(echo_origin(), &key).binary(&wrapper).start();
    p.signal("HUP");
    p.wait_for_log(|l| l.contains("SIGHUP: reloaded"), Duration::from_secs(10));
    p.signal("TERM");
    let status = p.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{:?}", p.log());
    let _ = std::fs::remove_dir_all(wrapper.parent().unwrap());
}

/// A SIGTERM that reached the process before its handlers were in place
/// (here: sent while its parent blocked it, so that it waits across the
/// exec) stops it as one during the start does: exit 0, not death by the
/// signal.
#[test]
fn a_sigterm_pending_at_exec_stops_the_start_with_exit_zero() {
    let wrapper = masked_wrapper("pending", "signal.SIGTERM", "signal.SIGTERM");
    let mut cmd = Command::new(&wrapper);
    cmd.args(["forward", "--listen", "127.0.0.1:0", "--upstream"])
        .arg(echo_origin().to_string())
        .stdin(Stdio::null());
    let (status, stderr) =
        run_bounded(cmd, Duration::from_secs(20)).expect("still running after 20 s");
    assert_eq!(status.code(), Some(0), "{status:?}: {stderr}");
    let _ = std::fs::remove_dir_all(wrapper.parent().unwrap());
}

/// Each shard's thread blocks every signal the process handles, and never
/// SIGURG: a signal pending on a shard's thread makes a read that stands
/// at TCP's urgent mark answer EAGAIN (see
/// `urgent_bytes_both_ways_on_many_connections_never_stall` in
/// `tests/forward.rs`), and only a SIGURG is counted, so that the read is
/// made again. Read from /proc (SigBlk of each thread).
#[test]
fn shard_threads_block_every_handled_signal_but_sigurg() {
    let p = Proxy::forward(echo_origin()).shards(2).start();
    let mut blocking = 0;
    for task in std::fs::read_dir(format!("/proc/{}/task", p.pid())).unwrap() {
        let task = task.unwrap().path();
        let name = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if !name.starts_with("shard-") {
            continue;
        }
        let status = std::fs::read_to_string(task.join("status")).unwrap();
        let blocked = signal_mask(&status, "SigBlk").unwrap();
        let bit = |sig: u32| blocked & (1 << (sig - 1)) != 0;
        assert!(!bit(23), "{name}: SIGURG blocked: {status}");
        if [1, 2, 10, 12, 15].iter().all(|&s| bit(s)) {
            blocking += 1;
        }
    }
    assert!(
        blocking >= 2,
        "{blocking} shard threads block HUP, INT, USR1, USR2 and TERM; want one per shard"
    );
}
