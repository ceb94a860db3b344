//! End-to-end tests of the encrypted pair: client → entry → exit → origin.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

fn exit_proxy(origin: SocketAddr, key_file: &str, shards: usize, extra: &[&str]) -> Proxy {
    role("exit", origin, key_file, shards, extra)
}

fn entry_proxy(exit: SocketAddr, key_file: &str, shards: usize, extra: &[&str]) -> Proxy {
    role("entry", exit, key_file, shards, extra)
}

fn role(name: &str, upstream: SocketAddr, key_file: &str, shards: usize, extra: &[&str]) -> Proxy {
    let up = upstream.to_string();
    let cores = shards.to_string();
    let mut args = vec![
        name,
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &up,
        "--key-file",
        key_file,
        "--cores",
        &cores,
    ];
    args.extend_from_slice(extra);
    Proxy::start(&args, shards)
}

/// Sends `data`, half-closes, and reads the socket to its end.
fn send_and_drain(addr: SocketAddr, data: &[u8]) -> (End, usize) {
    let mut c = TcpStream::connect(addr).unwrap();
    let _ = c.write_all(data); // may fail once the proxy aborts: that is the point
    let _ = c.shutdown(Shutdown::Write);
    read_until_end(&mut c, Duration::from_secs(20))
}

#[test]
fn round_trip_64_mib_with_two_shards_each_side() {
    let key = key_file(&[&keygen()]);
    let exit = exit_proxy(echo_origin(), &key, 2, &[]);
    let entry = entry_proxy(exit.addr, &key, 2, &[]);
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
    let exit = exit_proxy(origin, &key, 1, &[]);
    let entry = entry_proxy(exit.addr, &key, 1, &[]);
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
    let exit = exit_proxy(
        origin,
        &key_file(&[&keygen()]),
        1,
        &["--handshake-timeout", "1s"],
    );
    let entry = entry_proxy(
        exit.addr,
        &key_file(&[&keygen()]),
        1,
        &["--handshake-timeout", "3s"],
    );
    let start = Instant::now();
    let (end, n) = send_and_drain(entry.addr, b"GET / HTTP/1.1\r\n\r\n");
    assert_ne!(end, End::Open, "client left open");
    assert_eq!(n, 0);
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(
        seen.recv_timeout(Duration::from_millis(500)).is_err(),
        "origin was contacted"
    );
    let (_, lines) = exit.terminate();
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
    let exit = exit_proxy(origin, &key, 1, &[]);
    // Hello (124) + a few chunks in, then one flipped bit.
    let (tap, _) = mitm(exit.addr, Tamper::Flip(124 + 100_000));
    let entry = entry_proxy(tap, &key, 1, &[]);
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
}

#[test]
fn truncated_tunnel_is_an_abort_not_an_end() {
    let (origin, seen) = recording_origin();
    let key = key_file(&[&keygen()]);
    let exit = exit_proxy(origin, &key, 1, &[]);
    let (tap, _) = mitm(exit.addr, Tamper::Cut(124 + 50_000));
    let entry = entry_proxy(tap, &key, 1, &[]);
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
}

#[test]
fn replayed_recording_reaches_nothing() {
    let (origin, seen) = recording_origin();
    let key = key_file(&[&keygen()]);
    let exit = exit_proxy(origin, &key, 1, &[]);
    let (tap, recording) = mitm(exit.addr, Tamper::Record);
    let entry = entry_proxy(tap, &key, 1, &[]);
    let (end, _) = send_and_drain(entry.addr, b"transfer 100 to mallory");
    assert_eq!(end, End::Eof);
    let first = seen.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(first.bytes, b"transfer 100 to mallory");
    thread::sleep(Duration::from_millis(200));
    let recorded = recording.lock().unwrap().clone();
    assert!(recorded.len() > 124);
    // Replay it, byte for byte, straight to the exit.
    let mut raw = TcpStream::connect(exit.addr).unwrap();
    raw.write_all(&recorded).unwrap();
    let _ = raw.shutdown(Shutdown::Write);
    let _ = read_until_end(&mut raw, Duration::from_secs(10));
    if let Ok(replayed) = seen.recv_timeout(Duration::from_secs(3)) {
        assert!(
            replayed.bytes.is_empty(),
            "replay delivered {:?}",
            replayed.bytes
        );
    }
}

#[test]
fn probes_get_no_answer_and_are_closed_at_the_handshake_timeout() {
    let (origin, seen) = recording_origin();
    let exit = exit_proxy(
        origin,
        &key_file(&[&keygen()]),
        1,
        &["--handshake-timeout", "1s"],
    );
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
    assert!(seen.try_recv().is_err(), "a probe reached the origin");
}

#[test]
fn key_rotation_and_sighup() {
    let (old, new) = (keygen(), keygen());
    let exit_keys = key_file(&[&old, &new]);
    let exit = exit_proxy(echo_origin(), &exit_keys, 1, &["--handshake-timeout", "1s"]);
    let entry_old = entry_proxy(exit.addr, &key_file(&[&old]), 1, &[]);
    let entry_new = entry_proxy(exit.addr, &key_file(&[&new]), 1, &[]);
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
    let deadline = Instant::now() + Duration::from_secs(5);
    while !exit.log().iter().any(|l| l.contains("reloaded 1 key")) {
        assert!(Instant::now() < deadline, "no reload: {:?}", exit.log());
        thread::sleep(Duration::from_millis(20));
    }
    thread::sleep(Duration::from_millis(100));
    assert!(!ping(entry_old.addr), "old key still accepted after reload");
    assert!(ping(entry_new.addr));
    live.write_all(b"two").unwrap();
    live.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"two");

    // A broken key file on reload keeps the current keys.
    std::fs::write(&exit_keys, "not a key\n").unwrap();
    exit.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !exit
        .log()
        .iter()
        .any(|l| l.contains("keeping the current keys"))
    {
        assert!(
            Instant::now() < deadline,
            "no reload error: {:?}",
            exit.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert!(ping(entry_new.addr));
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
        let out = std::process::Command::new(BIN)
            .args([
                "exit",
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                "127.0.0.1:9",
                "--key-file",
                key,
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("key file"), "{err}");
    }
}

#[test]
fn group_readable_key_file_gets_a_warning() {
    use std::os::unix::fs::PermissionsExt;
    let key = key_file(&[&keygen()]);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let exit = exit_proxy(echo_origin(), &key, 1, &[]);
    assert!(
        exit.log()
            .iter()
            .any(|l| l.starts_with("WARN") && l.contains("chmod 600")),
        "{:?}",
        exit.log()
    );
}
