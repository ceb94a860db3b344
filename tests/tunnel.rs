//! End-to-end tests of the encrypted pair: client → entry → exit → origin.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Sends `data`, half-closes, and reads the socket to its end.
fn send_and_drain(addr: SocketAddr, data: &[u8]) -> (End, usize) {
    let mut c = TcpStream::connect(addr).unwrap();
    let _ = c.write_all(data); // may fail once the proxy aborts: that is the point
    let _ = c.shutdown(Shutdown::Write);
    read_until_end(&mut c, Duration::from_secs(20))
}

/// Nagle is off on every socket of a tunnelled connection, in the entry
/// and in the exit: the accepted ones inherit `TCP_NODELAY` from their
/// listener, the upstream ones set it.
#[test]
fn every_socket_of_a_tunnelled_connection_has_nagle_off() {
    let key = key_file(&[&keygen()]);
    let origin = echo_origin();
    let exit = Proxy::exit(origin, &key).start();
    let entry = Proxy::entry(exit.addr, &key).start();
    let mut c = TcpStream::connect(entry.addr).unwrap();
    c.write_all(b"x").unwrap();
    c.read_exact(&mut [0u8; 1]).unwrap();
    let locals = assert_nagle_off(entry.pid(), "entry", &[c.local_addr().unwrap(), exit.addr]);
    assert_nagle_off(exit.pid(), "exit", &[locals[1], origin]);
}

#[test]
fn a_fin_right_behind_the_data_is_never_missed_through_the_tunnel() {
    let key = key_file(&[&keygen()]);
    let exit = Proxy::exit(echo_origin(), &key).shards(2).start();
    let entry = Proxy::entry(exit.addr, &key).shards(2).start();
    fin_behind_data(entry.addr, 1500, 50);
    for p in [entry, exit] {
        let (status, lines) = p.terminate();
        assert!(status.success(), "{lines:?}");
    }
}

/// `--wake-batch` on both ends of the tunnel: as in `forward.rs`.
#[test]
fn with_wake_batching_nothing_is_lost_or_held_back_in_the_tunnel() {
    let key = key_file(&[&keygen()]);
    // Up to three runs, as in `forward.rs` (whether a shard sleeps for a
    // batch depends on how fast the load comes); every byte in each.
    let (mut coalesced, mut all) = (0, Vec::new());
    for _ in 0..3 {
        let exit = Proxy::exit(echo_origin(), &key).args(WAKE_BATCH).start();
        let entry = Proxy::entry(exit.addr, &key).args(WAKE_BATCH).start();
        fin_behind_data(entry.addr, 600, 50);
        let data = Arc::new(random_bytes(8 << 20, 13));
        let back = echo_round_trip(entry.addr, data.clone());
        assert_eq!(sha256(&back), sha256(&data));
        // Coalescing engages in the pair: in the entry at least (an exit
        // whose sleeps mostly wait for the entry's window longer than twice
        // the wait keeps them ordinary, so it may count none).
        (coalesced, all) = (0, Vec::new());
        for p in [entry, exit] {
            let (status, lines) = p.terminate();
            assert!(status.success(), "{lines:?}");
            coalesced += summary_total(&lines, "coalesced_sleeps");
            all.extend(lines);
        }
        if coalesced > 0 || !kernel_coalesces_wake_ups() {
            break;
        }
    }
    assert_eq!(coalesced > 0, kernel_coalesces_wake_ups(), "{all:?}");

    let exit = Proxy::exit(slow_echo_origin(Duration::from_micros(300)), &key)
        .args(WAKE_BATCH)
        .start();
    let entry = Proxy::entry(exit.addr, &key).args(WAKE_BATCH).start();
    idle_transfer_round_trips(entry.addr);
    for p in [entry, exit] {
        let (status, lines) = p.terminate();
        assert!(status.success(), "{lines:?}");
        let held: u64 = summary_total(&lines, "held_back_sleeps");
        assert!(
            held <= HELD_BACK_MOST,
            "{held} sleeps held events back: {lines:?}"
        );
    }
}

#[test]
fn round_trip_64_mib_with_two_shards_each_side() {
    let key = key_file(&[&keygen()]);
    let exit = Proxy::exit(echo_origin(), &key).shards(2).start();
    let entry = Proxy::entry(exit.addr, &key).shards(2).start();
    let data = Arc::new(random_bytes(64 << 20, 11));
    let back = echo_round_trip(entry.addr, data.clone());
    assert_eq!(back.len(), data.len());
    assert_eq!(sha256(&back), sha256(&data));
    for p in [entry, exit] {
        let (status, lines) = p.terminate();
        assert!(status.success());
        let sums = summaries(&lines);
        assert_eq!(
            sums.iter().map(|s| s.get("bytes_up")).sum::<u64>(),
            64 << 20
        );
        assert_eq!(
            sums.iter().map(|s| s.get("clean")).sum::<u64>(),
            1,
            "{lines:?}"
        );
        // A transfer this size is moved in batches of chunks both ways,
        // every byte counted once.
        let batched: u64 = sums.iter().map(|s| s.get("batched")).sum();
        assert!(
            batched > 64 << 20 && batched <= 2 * (64 << 20),
            "batched {batched}: {lines:?}"
        );
    }
}

#[test]
fn half_close_works_end_to_end() {
    let origin = serve(|mut s| {
        let mut req = Vec::new();
        s.read_to_end(&mut req).unwrap();
        s.write_all(format!("got {}", req.len()).as_bytes())
            .unwrap();
    });
    let key = key_file(&[&keygen()]);
    let exit = Proxy::exit(origin, &key).start();
    let entry = Proxy::entry(exit.addr, &key).start();
    let mut c = TcpStream::connect(entry.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(&[1u8; 50_000]).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut resp = String::new();
    c.read_to_string(&mut resp).unwrap();
    assert_eq!(resp, "got 50000");
}

#[test]
fn wrong_key_reaches_nothing_and_closes_the_client() {
    let (origin, seen) = recording_origin();
    let exit = Proxy::exit(origin, &key_file(&[&keygen()]))
        .args(["--handshake-timeout", "1s"])
        .start();
    let entry = Proxy::entry(exit.addr, &key_file(&[&keygen()]))
        .args(["--handshake-timeout", "3s"])
        .start();
    let start = Instant::now();
    let (end, n) = send_and_drain(entry.addr, b"GET / HTTP/1.1\r\n\r\n");
    assert_ne!(end, End::Open, "client left open");
    assert_eq!(n, 0);
    assert!(start.elapsed() < Duration::from_secs(5));
    // Once the exit is gone, any origin connection it made has ended, and
    // the origin reports each one when it ends; 500 ms is the window for
    // that report (an absence can only be shown over a window).
    let (_, lines) = exit.terminate();
    assert!(
        seen.recv_timeout(Duration::from_millis(500)).is_err(),
        "origin was contacted"
    );
    assert_eq!(
        summaries(&lines)[0].get("handshake_failures"),
        1,
        "{lines:?}"
    );
    assert_eq!(summaries(&lines)[0].get("auth_failed"), 1);
}

#[test]
fn flipped_byte_aborts_both_sides_and_forwards_only_earlier_chunks() {
    let (origin, seen) = recording_origin();
    let key = key_file(&[&keygen()]);
    let exit = Proxy::exit(origin, &key).start();
    // Hello (124) + a few chunks in, then one flipped bit.
    let (tap, _) = mitm(exit.addr, Tamper::Flip(124 + 100_000));
    let entry = Proxy::entry(tap, &key).start();
    let data = random_bytes(1 << 20, 5);
    let (end, _) = send_and_drain(entry.addr, &data);
    assert_eq!(end, End::Reset, "client must see an abort, not a clean end");
    let got = seen.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(got.end, End::Reset, "origin must see an abort");
    assert!(
        got.bytes.len() < 100_000,
        "bytes after the bad chunk were forwarded"
    );
    assert!(
        data.starts_with(&got.bytes),
        "origin got bytes that were never sent"
    );
    let (_, lines) = exit.terminate();
    assert_eq!(summaries(&lines)[0].get("auth_failed"), 1, "{lines:?}");
    // The flipped chunk came in batch mode (it switches after 16 KiB).
    assert!(summaries(&lines)[0].get("batched") > 0, "{lines:?}");
}

#[test]
fn truncated_tunnel_is_an_abort_not_an_end() {
    let (origin, seen) = recording_origin();
    let key = key_file(&[&keygen()]);
    let exit = Proxy::exit(origin, &key).start();
    let (tap, _) = mitm(exit.addr, Tamper::Cut(124 + 50_000));
    let entry = Proxy::entry(tap, &key).start();
    let mut c = TcpStream::connect(entry.addr).unwrap();
    let _ = c.write_all(&random_bytes(1 << 20, 6));
    let got = seen.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(
        got.end,
        End::Reset,
        "origin saw a clean EOF from a cut tunnel"
    );
    let (end, _) = read_until_end(&mut c, Duration::from_secs(10));
    assert_eq!(end, End::Reset, "client saw a clean EOF from a cut tunnel");
    let (_, lines) = exit.terminate();
    assert_eq!(summaries(&lines)[0].get("truncated"), 1, "{lines:?}");
    // The cut came in batch mode (it switches after 16 KiB).
    assert!(summaries(&lines)[0].get("batched") > 0, "{lines:?}");
}

/// A recorded hello replayed, to any shard, any number of times: no byte
/// back, no origin connection, the same close timing as a random probe, and
/// a real entry keeps working (issue #13's replay test).
#[test]
fn replayed_hellos_get_silence_and_reach_nothing() {
    let (origin, seen) = recording_origin();
    let key = key_file(&[&keygen()]);
    let exit = Proxy::exit(origin, &key)
        .shards(2)
        .args(["--handshake-timeout", "1s"])
        .start();
    let (tap, recording) = mitm(exit.addr, Tamper::Record);
    let entry = Proxy::entry(tap, &key).start();
    let (end, _) = send_and_drain(entry.addr, b"transfer 100 to mallory");
    assert_eq!(end, End::Eof);
    let first = seen.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(first.bytes, b"transfer 100 to mallory");
    let recorded = recording.lock().unwrap().clone();
    assert!(recorded.len() > CLIENT_HELLO);
    // One probe: what it sends, how many bytes came back, how long until
    // the exit closed.
    let probe = |bytes: Vec<u8>| {
        let addr = exit.addr;
        thread::spawn(move || {
            let start = Instant::now();
            let mut c = TcpStream::connect(addr).unwrap();
            c.write_all(&bytes).unwrap();
            let (end, n) = read_until_end(&mut c, Duration::from_secs(10));
            (end, n, start.elapsed())
        })
    };
    // 20 replays of the hello alone, 2 of the whole recording, and 2 random
    // 124-byte probes for the timing reference; all at once, so that the
    // kernel spreads them over both shards.
    let mut replays: Vec<_> = (0..20)
        .map(|_| probe(recorded[..CLIENT_HELLO].to_vec()))
        .collect();
    replays.extend((0..2).map(|_| probe(recorded.clone())));
    let randoms: Vec<_> = (0..2)
        .map(|i| probe(random_bytes(CLIENT_HELLO, 40 + i)))
        .collect();
    // A real entry works throughout.
    assert_eq!(send_and_drain(entry.addr, b"still here").0, End::Eof);
    let random_times: Vec<Duration> = randoms
        .into_iter()
        .map(|h| {
            let (end, n, took) = h.join().unwrap();
            assert_eq!(n, 0);
            assert_ne!(end, End::Open);
            took
        })
        .collect();
    for h in replays {
        let (end, n, took) = h.join().unwrap();
        assert_eq!(n, 0, "a replay got {n} bytes back");
        assert_ne!(end, End::Open);
        // Closed at the handshake timeout, like the random probes.
        for r in &random_times {
            let diff = took.abs_diff(*r);
            assert!(
                diff < Duration::from_millis(500),
                "replay closed after {took:?}, probe after {r:?}"
            );
        }
    }
    let (_, lines) = exit.terminate();
    // Origin connections: the first session and the real one only.
    let mut origin_conns = 1;
    while let Ok(s) = seen.recv_timeout(Duration::from_secs(3)) {
        assert!(
            s.bytes == b"still here",
            "a replay reached the origin: {:?}",
            s.bytes
        );
        origin_conns += 1;
    }
    assert_eq!(origin_conns, 2, "{lines:?}");
    let failures: u64 = summaries(&lines)
        .iter()
        .map(|s| s.get("handshake_failures"))
        .sum();
    assert_eq!(failures, 24, "{lines:?}");
}

/// The client hello's length on the wire (docs/PROTOCOL.md §3).
const CLIENT_HELLO: usize = 124;

#[test]
fn probes_get_no_answer_and_are_closed_at_the_handshake_timeout() {
    let (origin, seen) = recording_origin();
    let exit = Proxy::exit(origin, &key_file(&[&keygen()]))
        .args(["--handshake-timeout", "1s"])
        .start();
    let tls_client_hello = {
        let mut h = vec![
            0x16, 0x03, 0x01, 0x00, 0xc8, 0x01, 0x00, 0x00, 0xc4, 0x03, 0x03,
        ];
        h.extend(random_bytes(200, 2));
        h
    };
    let probes: Vec<Vec<u8>> = vec![
        random_bytes(300, 1),
        b"GET / HTTP/1.1\r\nHost: example\r\n\r\n".to_vec(),
        tls_client_hello,
        random_bytes(50, 3), // shorter than a hello: slow-loris
    ];
    let handles: Vec<_> = probes
        .into_iter()
        .map(|probe| {
            let addr = exit.addr;
            thread::spawn(move || {
                let start = Instant::now();
                let mut c = TcpStream::connect(addr).unwrap();
                c.write_all(&probe).unwrap();
                let (end, n) = read_until_end(&mut c, Duration::from_secs(10));
                (end, n, start.elapsed())
            })
        })
        .collect();
    for h in handles {
        let (end, n, took) = h.join().unwrap();
        assert_eq!(n, 0, "the exit answered a probe");
        assert_ne!(end, End::Open);
        assert!(
            took >= Duration::from_millis(900),
            "closed too early: {took:?}"
        );
        assert!(took < Duration::from_secs(5), "closed too late: {took:?}");
    }
    // As in the wrong-key test: after the exit is gone, a window for the
    // origin to report a connection (a bare try_recv could run before an
    // origin thread noticed its connection end).
    let (_, lines) = exit.terminate();
    assert!(
        seen.recv_timeout(Duration::from_millis(500)).is_err(),
        "a probe reached the origin"
    );
    assert_eq!(
        summaries(&lines)[0].get("handshake_failures"),
        4,
        "{lines:?}"
    );
}

#[test]
fn key_rotation_and_sighup() {
    let (old, new) = (keygen(), keygen());
    let exit_keys = key_file(&[&old, &new]);
    // Two shards: each gets the reloaded keys over its own control socket.
    let exit = Proxy::exit(echo_origin(), &exit_keys)
        .shards(2)
        .args(["--handshake-timeout", "1s"])
        .start();
    let entry_old = Proxy::entry(exit.addr, &key_file(&[&old])).start();
    let entry_new = Proxy::entry(exit.addr, &key_file(&[&new])).start();
    let ping = |addr: SocketAddr| -> bool {
        let Ok(mut c) = TcpStream::connect(addr) else {
            return false;
        };
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 4];
        c.write_all(b"ping").is_ok() && c.read_exact(&mut b).is_ok() && &b == b"ping"
    };
    assert!(ping(entry_old.addr) && ping(entry_new.addr));

    // A live tunnel made with the old key...
    let mut live = TcpStream::connect(entry_old.addr).unwrap();
    live.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 3];
    live.write_all(b"one").unwrap();
    live.read_exact(&mut b).unwrap();

    // ...survives dropping the old key; new old-key tunnels do not.
    std::fs::write(&exit_keys, format!("{new}\n")).unwrap();
    exit.signal("HUP");
    // The signal thread's "reloaded" line comes before the keys reach the
    // shards; each shard logs when it installed them.
    exit.wait_for_every_shard(": keys replaced (1 key(s))", Duration::from_secs(10));
    // Several at once, so that both shards most likely see one (the kernel
    // spreads connections over SO_REUSEPORT listeners by a hash); each is
    // refused only at the exit's 1 s handshake timeout.
    const OLD_PINGS: u64 = 8;
    let old_pings: Vec<_> = (0..OLD_PINGS)
        .map(|_| {
            let addr = entry_old.addr;
            thread::spawn(move || ping(addr))
        })
        .collect();
    for p in old_pings {
        assert!(!p.join().unwrap(), "old key still accepted after reload");
    }
    assert!(ping(entry_new.addr));
    live.write_all(b"two").unwrap();
    live.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"two");

    // A broken key file on reload keeps the current keys.
    std::fs::write(&exit_keys, "not a key\n").unwrap();
    exit.signal("HUP");
    exit.wait_for_log(
        |l| l.contains("keeping the current keys"),
        Duration::from_secs(10),
    );
    assert!(ping(entry_new.addr));
    drop(live);
    let shards = exit.shards();
    let (status, lines) = exit.terminate();
    assert!(status.success(), "{lines:?}");
    // Only the good reload reached the shards, once each.
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains(": keys replaced ("))
            .count(),
        shards,
        "{lines:?}"
    );
    // The old-key tunnels failed authentication, not something else.
    let auth_failed: u64 = summaries(&lines).iter().map(|s| s.get("auth_failed")).sum();
    assert_eq!(auth_failed, OLD_PINGS, "{lines:?}");
}

#[test]
fn keygen_writes_a_private_file_and_bad_keys_are_one_line_errors() {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::temp_dir().join(format!("shardproxy-keygen-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let p = path.to_str().unwrap();
    let out = std::process::Command::new(BIN)
        .args(["keygen", "--out", p])
        .output()
        .unwrap();
    assert!(out.status.success());
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let line = std::fs::read_to_string(&path).unwrap();
    assert_eq!(line.trim().len(), 44, "base64 of 32 bytes");
    // Never overwrites.
    let again = std::process::Command::new(BIN)
        .args(["keygen", "--out", p])
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2));
    std::fs::remove_file(&path).unwrap();

    let bad = key_file(&["definitely not base64!"]);
    for key in [bad.as_str(), "/nonexistent/key"] {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args([
            "exit",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:9",
            "--key-file",
            key,
        ]);
        // Bounded: an exit that accepted the key would serve forever.
        let (status, err) = run_bounded(cmd, Duration::from_secs(20))
            .unwrap_or_else(|| panic!("exit started with key file {key}"));
        assert_eq!(status.code(), Some(2), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("key file"), "{err}");
    }
}

#[test]
fn world_readable_key_file_gets_a_warning_and_the_documented_mode_does_not() {
    use std::os::unix::fs::PermissionsExt;
    let warned = |mode: u32| {
        let key = key_file(&[&keygen()]);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
        let exit = Proxy::exit(echo_origin(), &key).start();
        // "keys from" is logged after the key file was read (and warned about).
        exit.wait_for_log(|l| l.contains("keys from"), Duration::from_secs(10));
        let log = exit.log();
        log.iter()
            .any(|l| l.contains(" WARN ") && l.contains("chmod 640"))
    };
    assert!(warned(0o644), "0644 key file not warned about");
    assert!(warned(0o660), "group-writable key file not warned about");
    assert!(warned(0o602), "world-writable key file not warned about");
    assert!(
        !warned(0o601),
        "execute-only bits are not access to the key"
    );
    // deploy/README.md's layout: 0640 root:shardproxy.
    assert!(
        !warned(0o640),
        "the documented 0640 layout was warned about"
    );
}

/// Output that cannot be written (a closed pipe, a full disk) is a one-line
/// error or, once the key file exists, ignored: never a panic.
#[test]
fn keygen_and_check_survive_an_unwritable_stdout() {
    let full = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap()
    };
    let dir = std::env::temp_dir().join(format!("shardproxy-full-{}", std::process::id()));
    let _ = std::fs::remove_file(&dir);
    let out = std::process::Command::new(BIN)
        .args(["keygen", "--out", dir.to_str().unwrap()])
        .stdout(full())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(dir.exists());
    let _ = std::fs::remove_file(&dir);
    let out = std::process::Command::new(BIN)
        .arg("keygen")
        .stdout(full())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains("cannot write the key to stdout"),
        "{stderr}"
    );
}

/// Health checks and port probes (connect, then close or reset without a
/// byte) are `empty`, not failed handshakes; wrong-key hellos are
/// `auth_failed` and the only handshake failures; a silent client is
/// `handshake_timeout`.
#[test]
fn probes_are_empty_wrong_keys_are_auth_failures() {
    let key = key_file(&[&keygen()]);
    let exit = Proxy::exit(echo_origin(), &key)
        .shards(2)
        .args(["--handshake-timeout", "1s"])
        .start();
    for i in 0..20 {
        let c = TcpStream::connect(exit.addr).unwrap();
        if i % 2 == 1 {
            // A reset instead of a FIN.
            socket2::SockRef::from(&c)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        }
        drop(c);
    }
    let other_key = key_file(&[&keygen()]);
    let wrong = Proxy::entry(exit.addr, &other_key)
        .args(["--handshake-timeout", "2s"])
        .start();
    let tries: Vec<_> = (0..5)
        .map(|_| {
            let addr = wrong.addr;
            thread::spawn(move || send_and_drain(addr, b"hello").0)
        })
        .collect();
    for t in tries {
        assert_ne!(t.join().unwrap(), End::Eof, "a wrong key got a clean end");
    }
    // One client that connects and says nothing.
    let silent = TcpStream::connect(exit.addr).unwrap();
    let mut silent_end = silent.try_clone().unwrap();
    let (end, _) = read_until_end(&mut silent_end, Duration::from_secs(10));
    assert_ne!(end, End::Open);
    drop(silent);
    drop(wrong);
    let (_, lines) = exit.terminate();
    let sum = |key: &str| -> u64 { summaries(&lines).iter().map(|s| s.get(key)).sum() };
    assert_eq!(sum("empty"), 20, "{lines:?}");
    assert_eq!(sum("auth_failed"), 5, "{lines:?}");
    assert_eq!(sum("handshake_timeout"), 1, "{lines:?}");
    assert_eq!(sum("handshake_failures"), 6, "{lines:?}");
}

/// Unauthenticated connections have their own budget (`--max-handshakes`,
/// oldest closed first) apart from `--max-connections`: a flood of held
/// half-hellos neither locks a real entry out nor takes session slots.
#[test]
fn a_flood_of_half_hellos_does_not_lock_out_a_real_entry() {
    let key = key_file(&[&keygen()]);
    let exit = Proxy::exit(echo_origin(), &key)
        .shards(2)
        // A long handshake timeout: held half-hellos would hold any slot
        // they took for 30 s, longer than the entry waits (10 s).
        .args(["--max-handshakes", "64", "--max-connections", "4"])
        .args(["--handshake-timeout", "30s"])
        .start();
    // 600 connections, each holding half a hello: far more than both the
    // handshake budget (2 x 64) and the session slots (2 x 4).
    let flood: Vec<TcpStream> = (0..600)
        .filter_map(|i| {
            let mut c = TcpStream::connect(exit.addr).ok()?;
            c.write_all(&random_bytes(50, 1000 + i)).ok()?;
            Some(c)
        })
        .collect();
    assert!(flood.len() > 500, "only {} flood connections", flood.len());
    let entry = Proxy::entry(exit.addr, &key).start();
    for i in 0..20u64 {
        let data = Arc::new(random_bytes(2000, i));
        assert_eq!(
            echo_round_trip(entry.addr, data.clone()),
            *data,
            "round trip {i}"
        );
    }
    drop(flood);
    drop(entry);
    let (_, lines) = exit.terminate();
    // The oldest pending handshakes were closed to make room (`limit`): at
    // most twice the budget per shard (a young burst's headroom) survived.
    let evicted: u64 = summaries(&lines).iter().map(|s| s.get("limit")).sum();
    assert!(
        evicted >= 600 - 2 * 2 * 64,
        "only {evicted} evicted: {lines:?}"
    );
}

/// The replay set starts empty in a new process, so a new exit refuses
/// every hello stamped before it started: a hello recorded before a restart
/// gets silence after it (docs/PROTOCOL.md §7).
#[test]
fn a_restarted_exit_refuses_hellos_recorded_before_it_started() {
    let (origin, seen) = recording_origin();
    let key = key_file(&[&keygen()]);
    let first = Proxy::exit(origin, &key).start();
    let (tap, recording) = mitm(first.addr, Tamper::Record);
    let entry = Proxy::entry(tap, &key).start();
    assert_eq!(send_and_drain(entry.addr, b"before").0, End::Eof);
    let _ = seen.recv_timeout(Duration::from_secs(10)).unwrap();
    let hello = recording.lock().unwrap()[..CLIENT_HELLO].to_vec();
    let port = first.addr;
    let (status, _) = first.terminate();
    assert!(status.success());
    // Hello timestamps are milliseconds: the new exit starts well after
    // this one was stamped, even within the same second (no waiting).
    let second = Proxy::exit(origin, &key)
        .listen(port)
        .args(["--handshake-timeout", "1s"])
        .start();
    let mut c = TcpStream::connect(second.addr).unwrap();
    c.write_all(&hello).unwrap();
    let (end, n) = read_until_end(&mut c, Duration::from_secs(10));
    assert_eq!(n, 0, "a hello from before the restart got {n} bytes back");
    assert_ne!(end, End::Open);
    // A fresh hello from the same entry still works (through the tap, to
    // the same port).
    assert_eq!(send_and_drain(entry.addr, b"after").0, End::Eof);
    let (_, lines) = second.terminate();
    let fresh = seen.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(fresh.bytes, b"after", "{lines:?}");
    assert!(
        seen.recv_timeout(Duration::from_secs(2)).is_err(),
        "the replay reached the origin: {lines:?}"
    );
}

/// A client reset reaches the origin through the tunnel at once, after the
/// client's FIN or while its upload waits for room (see the `forward` test
/// of the same name).
#[test]
fn a_client_reset_reaches_the_origin_through_the_tunnel() {
    let key = key_file(&[&keygen()]);
    for how in [ResetAfter::Fin, ResetAfter::BlockedUpload] {
        let (origin, run) = client_reset_reaches_the_origin(how);
        let exit = Proxy::exit(origin, &key).start();
        let entry = Proxy::entry(exit.addr, &key).start();
        let seen = run(entry.addr);
        assert!(seen.is_some(), "{how:?}: the origin never saw the reset");
        let (_, lines) = entry.terminate();
        assert_eq!(
            summaries(&lines)[0].get("downstream_reset"),
            1,
            "{how:?}: {lines:?}"
        );
        drop(exit);
    }
}

/// Bytes behind an urgent byte arrive at once through the tunnel, each way
/// (see the `forward` test of the same name).
#[test]
fn bytes_behind_an_urgent_byte_are_never_stranded_in_the_tunnel() {
    let key = key_file(&[&keygen()]);
    let (up, up_got, down) = urgent_origins();
    let exit_up = Proxy::exit(up, &key).start();
    let entry_up = Proxy::entry(exit_up.addr, &key).start();
    let exit_down = Proxy::exit(down, &key).start();
    let entry_down = Proxy::entry(exit_down.addr, &key).start();
    let sizes = [(1000, 1000), (16383, 1000), (20000, 5000)];
    let stalled = urgent_bursts(entry_up.addr, &up_got, entry_down.addr, &sizes, 4);
    assert!(stalled.is_empty(), "stalled {stalled:?}");
}

/// A session with `exit` as an entry would open it (hello with `flags`,
/// answer verified, key confirmation sent), in this process: the socket and
/// the session's encoder and decoder.
fn tunnel_session(
    exit: SocketAddr,
    key: &str,
    flags: u8,
) -> (
    TcpStream,
    shardproxy::proto::Encoder,
    shardproxy::proto::Decoder,
) {
    use base64::Engine as _;
    use shardproxy::proto::{ClientHandshake, Psk};
    let bytes: [u8; 32] = base64::engine::general_purpose::STANDARD
        .decode(key)
        .unwrap()
        .try_into()
        .unwrap();
    let psk = Psk::from_bytes(bytes);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut salt = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut salt)
        .unwrap();
    let (hs, hello) = ClientHandshake::start_with_flags(&psk, salt, now, b"", flags).unwrap();
    let mut s = TcpStream::connect(exit).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&hello).unwrap();
    let mut answer = [0u8; shardproxy::proto::SERVER_HELLO_LEN];
    s.read_exact(&mut answer).unwrap();
    let (mut enc, dec) = hs.finish(&answer).unwrap();
    let mut confirm = [0u8; shardproxy::proto::CONFIRM_LEN];
    enc.seal_confirm(&mut confirm).unwrap();
    s.write_all(&confirm).unwrap();
    (s, enc, dec)
}

/// A hello offering large chunks to `exit`, answered and verified; the
/// connection stays open (the key confirmation sent) until dropped.
/// Returns it and whether the exit agreed (docs/PROTOCOL.md §3).
fn offer_large_chunks(exit: SocketAddr, key: &str) -> (TcpStream, bool) {
    use shardproxy::proto::{FLAG_LARGE_CHUNKS, MAX_PAYLOAD};
    let (s, _, dec) = tunnel_session(exit, key, FLAG_LARGE_CHUNKS);
    (s, dec.max_payload() > MAX_PAYLOAD)
}

/// An urgent byte (`MSG_OOB`) slipped into the tunnel's own stream, between
/// two chunks, strands nothing at the exit: the kernel strips it, so both
/// chunks are valid, but `recv` stops short at its mark, and the exit took
/// that short read as "drained" and waited for a wake-up that never came
/// (found by a break-it round: 3 stalls in 15 tries, the session ending at
/// its idle timeout as `truncated`). Each try must echo both chunks back
/// at once.
/// Urgent bytes both ways, round after round, on 20 connections at once
/// through an entry and an exit (see `tests/forward.rs`,
/// `urgent_bytes_both_ways_on_many_connections_never_stall`).
#[test]
fn urgent_bytes_both_ways_through_the_tunnel_never_stall() {
    let key = key_file(&[&keygen()]);
    let exit = Proxy::exit(urgent_ping_pong_origin(), &key).start();
    let entry = Proxy::entry(exit.addr, &key).start();
    let stalled = urgent_ping_pong(entry.addr, 20, 100);
    assert!(stalled.is_empty(), "stalled {stalled:?}");
}

#[test]
fn an_urgent_byte_in_the_tunnel_stream_strands_nothing() {
    use shardproxy::proto::Decoded;
    let key = keygen();
    let exit = Proxy::exit(echo_origin(), &key_file(&[&key])).start();
    let mut stalled = Vec::new();
    for attempt in 0..20 {
        let (mut s, mut enc, mut dec) = tunnel_session(exit.addr, &key, 0);
        let (first, second) = (vec![1u8; 3000], vec![2u8; 3000]);
        let mut seal = |data: &[u8]| {
            let mut frame = vec![0u8; shardproxy::proto::MAX_FRAME];
            frame[2..2 + data.len()].copy_from_slice(data);
            let n = enc.seal_in_place(&mut frame, data.len()).unwrap();
            frame.truncate(n);
            frame
        };
        let (a, b) = (seal(&first), seal(&second));
        s.write_all(&a).unwrap();
        socket2::SockRef::from(&s).send_out_of_band(b"!").unwrap();
        s.write_all(&b).unwrap();
        // The echo of both chunks, opened as it comes, within 3 s.
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let (mut wire, mut echoed) = (Vec::new(), 0usize);
        let mut buf = [0u8; 65536];
        while echoed < first.len() + second.len() {
            let n = match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            wire.extend_from_slice(&buf[..n]);
            while let Ok(Decoded::Data { consumed, len, .. }) = dec.decode(&mut wire) {
                echoed += len;
                wire.drain(..consumed);
            }
        }
        if echoed < first.len() + second.len() {
            stalled.push((attempt, echoed));
        }
    }
    assert!(
        stalled.is_empty(),
        "(attempt, bytes echoed) that stalled: {stalled:?}"
    );
}

/// A session agrees to large chunks only with one of its shard's
/// reservations (a quarter of --max-connections): its peer decides when to
/// send one, and each needs a 64 KiB buffer, so the reservations are what
/// keeps memory at the connection limit bounded (docs/CONFIG.md,
/// `large_chunks`). At --max-connections 4 the budget is one session; once
/// it ends the next session may agree again.
#[test]
fn large_chunks_are_agreed_only_within_the_shards_budget() {
    let key = keygen();
    let exit = Proxy::exit(echo_origin(), &key_file(&[&key]))
        .args(["--max-connections", "4"])
        .start();
    let (first, agreed) = offer_large_chunks(exit.addr, &key);
    assert!(agreed, "the first session has the shard's one reservation");
    let (second, agreed) = offer_large_chunks(exit.addr, &key);
    assert!(!agreed, "no reservation left: 16 KiB chunks");
    drop((first, second));
    // The reservation comes back when the first session ends (an event the
    // exit sees soon after the close, not at a known instant).
    poll_until(Duration::from_secs(10), || {
        let (s, agreed) = offer_large_chunks(exit.addr, &key);
        drop(s);
        if agreed {
            Ok(())
        } else {
            Err("still no reservation".to_string())
        }
    });
    // Both outcomes are counted (summary line, and /metrics from the same
    // counters): the two that agreed, and at least the one denied.
    let (_, lines) = exit.terminate();
    assert_eq!(summary_total(&lines, "large_chunks"), 2, "{lines:?}");
    assert!(
        summary_total(&lines, "large_chunks_denied") >= 1,
        "{lines:?}"
    );
}

/// The entry counts probes (connect, then a FIN or a reset without a
/// byte) as `empty`, as the exit does: it completes its tunnel handshake
/// before the client's first byte, so they used to end as `clean` or
/// `downstream_reset`. A connection that carried bytes stays `clean`.
#[test]
fn the_entry_counts_probes_as_empty() {
    let key = key_file(&[&keygen()]);
    let exit = Proxy::exit(echo_origin(), &key).start();
    let entry = Proxy::entry(exit.addr, &key).start();
    probe(entry.addr, 10);
    assert_eq!(send_and_drain(entry.addr, b"ping"), (End::Eof, 4));
    let (_, lines) = entry.terminate();
    let sum = |k: &str| summaries(&lines).iter().map(|s| s.get(k)).sum::<u64>();
    assert_eq!(
        (sum("empty"), sum("clean"), sum("downstream_reset")),
        (10, 1, 0),
        "{lines:?}"
    );
    drop(exit);
}
