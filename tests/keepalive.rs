//! Keep-alive tunnels (docs/PROTOCOL.md §4.1): a tunnel whose session ended
//! both ways carries the next client's session, with no connect and no
//! handshake; whatever the exit does not serve is sent again elsewhere,
//! and nothing a client sent is lost or delivered twice.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use common::*;

const FAST_METRICS: [&str; 4] = [
    "--metrics-listen",
    "127.0.0.1:0",
    "--metrics-interval",
    "100ms",
];

/// A relay in front of `target` that counts the TCP connections made
/// through it (the tunnels between an entry and an exit).
fn counting_tap(target: SocketAddr) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let n = Arc::new(AtomicUsize::new(0));
    let count = n.clone();
    thread::spawn(move || {
        for a in l.incoming().flatten() {
            count.fetch_add(1, Ordering::SeqCst);
            let Ok(b) = TcpStream::connect(target) else {
                continue;
            };
            for (mut from, mut to) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)] {
                thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(Shutdown::Write);
                });
            }
        }
    });
    (addr, n)
}

/// Sends `data`, half-closes, and returns the echo.
fn echo(addr: SocketAddr, data: &[u8]) -> Vec<u8> {
    echo_round_trip(addr, Arc::new(data.to_vec()))
}

/// An echo origin that serves one connection, then closes its port; the
/// receiver hears when it has.
fn one_shot_origin() -> (SocketAddr, mpsc::Receiver<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (gone_tx, gone_rx) = mpsc::channel();
    thread::spawn(move || {
        if let Ok((mut c, _)) = l.accept() {
            let mut buf = [0u8; 16 * 1024];
            while let Ok(n) = c.read(&mut buf) {
                if n == 0 || c.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = c.shutdown(Shutdown::Write);
        }
        drop(l);
        let _ = gone_tx.send(());
    });
    (addr, gone_rx)
}

fn total(lines: &[String], key: &str) -> u64 {
    summaries(lines).iter().map(|s| s.get(key)).sum()
}

/// Two clients through `entry`, whose round robin sends one to each of its
/// two exits: each is echoed and leaves a kept tunnel (clients 0 and 1).
fn kept_tunnel_to_each_exit(entry: &Proxy) {
    for i in 0..2 {
        let data = random_bytes(3000, i);
        assert!(echo(entry.addr, &data) == data, "client {i}");
        idle_tunnels_are(entry, i + 1);
    }
}

/// Waits until the proxy's metrics (it runs with [`FAST_METRICS`]) say
/// `n` keep-alive tunnels idle.
fn idle_tunnels_are(p: &Proxy, n: u64) {
    poll_until(Duration::from_secs(15), || {
        let body = http_get(p.metrics_addr(), "/metrics").1;
        match metric_sum(&body, "shardproxy_idle_tunnels", &[]) {
            m if m == n => Ok(()),
            m => Err(format!("{m} idle, waiting for {n}")),
        }
    });
}

/// [`echo`] through `entry`, then waits for its tunnel to be back in the
/// entry's pool: a client that connects the instant the last one saw its
/// end may find the tunnel not yet put back, and get a new one.
fn echo_kept(entry: &Proxy, data: &[u8]) -> Vec<u8> {
    let back = echo(entry.addr, data);
    idle_tunnels_are(entry, 1);
    back
}

/// One tunnel carries sequential sessions of every size, transfers with
/// large chunks and batches included, every byte intact; the entry and the
/// exit both count the reuses, and only one TCP connection was made.
#[test]
fn sessions_after_the_first_reuse_the_tunnel_and_arrive_intact() {
    let key = key_file(&[&keygen()]);
    let exit = Proxy::exit(echo_origin(), &key).start();
    let (tap, tunnels) = counting_tap(exit.addr);
    let entry = Proxy::entry(tap, &key).args(FAST_METRICS).start();
    let sizes = [1, 1000, 16 * 1024, 70_000, 8 << 20, 5, 300_000, 1];
    for (i, &len) in sizes.iter().cycle().take(24).enumerate() {
        let data = random_bytes(len, i as u64);
        let back = echo_kept(&entry, &data);
        assert!(back == data, "session {i}: {} of {len} bytes", back.len());
    }
    assert_eq!(tunnels.load(Ordering::SeqCst), 1, "tunnels opened");
    let (_, entry_lines) = entry.terminate();
    let (_, exit_lines) = exit.terminate();
    for lines in [&entry_lines, &exit_lines] {
        assert_eq!(total(lines, "tunnel_reuses"), 23, "{lines:?}");
        assert_eq!(total(lines, "clean"), 24, "{lines:?}");
        assert!(total(lines, "large_chunks") >= 1, "{lines:?}");
    }
    // Each session is a connection of its own on the exit.
    assert_eq!(total(&exit_lines, "accepted"), 24, "{exit_lines:?}");
}

/// Half-close in either order on a kept tunnel: here the origin speaks
/// first and ends its side before the client sends anything, so the
/// exit's end chunk comes before the entry's; every client byte still
/// reaches the origin, session after session.
#[test]
fn the_origin_may_end_its_side_first_on_a_kept_tunnel() {
    let (tx, rx) = mpsc::channel();
    let origin = serve(move |mut s| {
        s.write_all(b"banner").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        let _ = tx.send(got);
    });
    let key = key_file(&[&keygen()]);
    let exit = Proxy::exit(origin, &key).start();
    let entry = Proxy::entry(exit.addr, &key).args(FAST_METRICS).start();
    for i in 0..3u64 {
        let mut c = TcpStream::connect(entry.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut banner = Vec::new();
        c.read_to_end(&mut banner).unwrap();
        assert_eq!(banner, b"banner");
        let data = random_bytes(50_000, i);
        c.write_all(&data).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let got = rx.recv_timeout(Duration::from_secs(20)).unwrap();
        assert!(got == data, "session {i}: {} bytes", got.len());
        // The session is over for the client once the entry closes.
        assert_eq!(read_until_end(&mut c, Duration::from_secs(10)).0, End::Eof);
        idle_tunnels_are(&entry, 1);
    }
    let (_, lines) = entry.terminate();
    assert_eq!(total(&lines, "tunnel_reuses"), 2, "{lines:?}");
    assert_eq!(total(&lines, "clean"), 3, "{lines:?}");
}

/// An exit closes a tunnel that idled `--tunnel-idle-timeout` with its
/// goodbye; the entry closes its end, and the next client gets a new
/// tunnel. The same after a key reload on either side (tunnels made with
/// the old keys carry no more sessions).
#[test]
fn idle_tunnels_end_at_the_idle_timeout_and_at_a_key_reload() {
    let key = key_file(&[&keygen()]);
    let exit = Proxy::exit(echo_origin(), &key)
        .args(["--tunnel-idle-timeout", "1s"])
        .args(FAST_METRICS)
        .start();
    let entry = Proxy::entry(exit.addr, &key).args(FAST_METRICS).start();
    assert_eq!(echo_kept(&entry, b"one"), b"one");
    // The exit's goodbye, a second later; the entry's sweep closes its end.
    idle_tunnels_are(&entry, 0);
    idle_tunnels_are(&exit, 0);
    assert_eq!(echo_kept(&entry, b"two"), b"two");
    let (_, lines) = entry.terminate();
    assert_eq!(total(&lines, "tunnel_reuses"), 0, "{lines:?}");
    let (_, exit_lines) = exit.terminate();
    assert_eq!(total(&exit_lines, "tunnel_reuses"), 0, "{exit_lines:?}");
    assert_eq!(total(&exit_lines, "clean"), 2, "{exit_lines:?}");
    // Key reloads: the exit says goodbye at once (its timeout is far), the
    // entry closes its idle tunnels.
    let exit = Proxy::exit(echo_origin(), &key).args(FAST_METRICS).start();
    let entry = Proxy::entry(exit.addr, &key).args(FAST_METRICS).start();
    assert_eq!(echo_kept(&entry, b"three"), b"three");
    idle_tunnels_are(&exit, 1);
    exit.signal("HUP");
    exit.wait_for_log(|l| l.contains("keys replaced"), Duration::from_secs(10));
    idle_tunnels_are(&exit, 0);
    idle_tunnels_are(&entry, 0);
    assert_eq!(echo_kept(&entry, b"four"), b"four");
    entry.signal("HUP");
    entry.wait_for_log(|l| l.contains("keys replaced"), Duration::from_secs(10));
    idle_tunnels_are(&entry, 0);
    assert_eq!(echo_kept(&entry, b"five"), b"five");
    let (_, lines) = entry.terminate();
    assert_eq!(total(&lines, "tunnel_reuses"), 0, "{lines:?}");
    assert_eq!(total(&lines, "clean"), 3, "{lines:?}");
    let (_, exit_lines) = exit.terminate();
    assert_eq!(total(&exit_lines, "clean"), 3, "{exit_lines:?}");
}

/// Either side with `--tunnel-keepalive 0` keeps every session on a
/// tunnel of its own (an older peer, which neither offers nor answers the
/// flag, looks the same).
#[test]
fn keepalive_needs_both_sides() {
    let key = key_file(&[&keygen()]);
    for (entry_args, exit_args) in [
        (&["--tunnel-keepalive", "0"][..], &[][..]),
        (&[][..], &["--tunnel-keepalive", "0"][..]),
    ] {
        let exit = Proxy::exit(echo_origin(), &key).args(exit_args).start();
        let (tap, tunnels) = counting_tap(exit.addr);
        let entry = Proxy::entry(tap, &key).args(entry_args).start();
        for i in 0..3 {
            let data = random_bytes(2000, i);
            assert!(echo(entry.addr, &data) == data);
        }
        assert_eq!(
            tunnels.load(Ordering::SeqCst),
            3,
            "{entry_args:?} {exit_args:?}"
        );
        let (_, lines) = entry.terminate();
        assert_eq!(total(&lines, "tunnel_reuses"), 0, "{lines:?}");
    }
}

/// A kept session is timed like a new one, though its first bytes come in
/// one segment with its start (at the exit) or with the exit's answer (at
/// the entry), read before the relay runs: every session's first byte
/// upstream, and a chunk each way (a break-it round found the exit timing
/// about half of such sessions, and the entry missing some answers).
#[test]
fn every_kept_session_is_timed() {
    let key = key_file(&[&keygen()]);
    let exit = Proxy::exit(echo_origin(), &key).args(FAST_METRICS).start();
    let entry = Proxy::entry(exit.addr, &key).args(FAST_METRICS).start();
    let n = 12;
    for i in 0..n {
        let data = random_bytes(5, i);
        assert!(echo_kept(&entry, &data) == data, "session {i}");
    }
    for (p, role) in [(&exit, "exit"), (&entry, "entry")] {
        poll_until(Duration::from_secs(10), || {
            let m = http_get(p.metrics_addr(), "/metrics").1;
            let chunks = "shardproxy_relay_chunk_seconds_count";
            let counts = (
                metric_sum(&m, "shardproxy_first_byte_seconds_count", &[]),
                metric_sum(&m, chunks, &["direction=\"up\""]),
                metric_sum(&m, chunks, &["direction=\"down\""]),
            );
            match counts {
                (first, up, down) if first == n && up >= n && down >= n => Ok(()),
                c => Err(format!(
                    "{role}: {n} sessions, timed (first byte, chunks up, chunks down) = {c:?}"
                )),
            }
        });
    }
}

/// A client that resets in the middle of a session on a kept tunnel: the
/// origin sees the reset, the tunnel is aborted, not kept, and the next
/// client gets a new one.
#[test]
fn a_reset_on_a_kept_tunnel_reaches_the_origin_and_ends_the_tunnel() {
    // Per connection: "data" once the first bytes came, then how it ended.
    let (tx, rx) = mpsc::channel::<&'static str>();
    let tx = Arc::new(std::sync::Mutex::new(tx));
    let origin = serve(move |mut s| {
        let mut buf = [0u8; 4096];
        let mut told = false;
        let end = loop {
            match s.read(&mut buf) {
                Ok(0) => break "eof",
                Ok(_) if !told => {
                    told = true;
                    let _ = tx.lock().unwrap().send("data");
                }
                Ok(_) => {}
                Err(_) => break "reset",
            }
        };
        let _ = s.shutdown(Shutdown::Write);
        let _ = tx.lock().unwrap().send(end);
    });
    let key = key_file(&[&keygen()]);
    let exit = Proxy::exit(origin, &key).start();
    let (tap, tunnels) = counting_tap(exit.addr);
    let entry = Proxy::entry(tap, &key).args(FAST_METRICS).start();
    let recv = || rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(echo_kept(&entry, b"first").is_empty());
    assert_eq!((recv(), recv()), ("data", "eof"));
    // On the kept tunnel: bytes, then a reset once the origin has them.
    let c = TcpStream::connect(entry.addr).unwrap();
    (&c).write_all(b"second").unwrap();
    assert_eq!(recv(), "data");
    socket2::SockRef::from(&c)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(c);
    assert_eq!(recv(), "reset");
    idle_tunnels_are(&entry, 0);
    assert!(echo_kept(&entry, b"third").is_empty());
    assert_eq!((recv(), recv()), ("data", "eof"));
    assert_eq!(tunnels.load(Ordering::SeqCst), 2, "tunnels opened");
    let (_, lines) = entry.terminate();
    assert_eq!(total(&lines, "tunnel_reuses"), 1, "{lines:?}");
    assert_eq!(total(&lines, "downstream_reset"), 1, "{lines:?}");
    drop(exit);
}

/// A kept tunnel's exit that cannot reach its origin answers the session's
/// start with a refusal before it forwards anything, so the entry sends
/// the client's first bytes to its other exit: no client is lost (a new
/// tunnel does the same with its connect status: tests/pools.rs
/// `the_first_clients_after_an_origin_died_go_to_another_exit`).
#[test]
fn a_kept_tunnel_whose_origin_died_sends_the_client_to_another_exit() {
    let key = key_file(&[&keygen()]);
    // Exit A's origin serves one connection, then closes its port.
    let (a_origin, gone_rx) = one_shot_origin();
    let a = Proxy::exit(a_origin, &key).start();
    let b = Proxy::exit(echo_origin(), &key).start();
    let entry = Proxy::entry(a.addr, &key)
        .round_robin_with(b.addr)
        .args(FAST_METRICS)
        .start();
    kept_tunnel_to_each_exit(&entry);
    gone_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    // One of the next two goes to A's kept tunnel first.
    for i in 2..4 {
        let data = random_bytes(3000, i);
        assert!(echo(entry.addr, &data) == data, "client {i}");
    }
    // Counted as A's refusal (passed over for a second), not as a failed
    // handshake towards an ejection.
    let a_label = format!("upstream=\"{}\"", a.addr);
    let failures = "shardproxy_upstream_connect_failures_total";
    let text = poll_until(Duration::from_secs(10), || {
        let m = http_get(entry.metrics_addr(), "/metrics").1;
        match metric_sum(&m, failures, &[&a_label, "reason=\"refused\""]) {
            0 => Err(format!("no refusal counted yet:\n{m}")),
            _ => Ok(m),
        }
    });
    let handshake = metric_sum(&text, failures, &[&a_label, "reason=\"handshake\""]);
    assert_eq!(handshake, 0, "{text}");
    let (_, a_lines) = a.terminate();
    assert_eq!(
        (total(&a_lines, "refused"), total(&a_lines, "no_upstream")),
        (1, 0),
        "{a_lines:?}"
    );
    assert_eq!(total(&a_lines, "tunnel_reuses"), 1, "{a_lines:?}");
    let (_, lines) = entry.terminate();
    assert_eq!(total(&lines, "clean"), 4, "{lines:?}");
    drop(b);
}

/// A kept tunnel's exit whose origin now swallows connects (a black hole)
/// refuses the start within nine tenths of its handshake timeout, so the
/// entry sends the client to its other exit instead of resetting it when
/// its own wait for the status runs out (as for a new tunnel's connect
/// status: tests/pools.rs `an_exit_whose_origin_swallows_connects_refuses_in_time`).
#[test]
fn a_kept_tunnel_whose_origin_swallows_connects_refuses_in_time() {
    kept_start_to_a_black_hole_is_refused_in_time("1s");
}

/// The same with an exit whose handshake timeout is longer than the
/// entry's: the exit answers within the entry's patience, which the start
/// carries (docs/PROTOCOL.md §2.1, type 0x04).
#[test]
fn a_kept_start_is_refused_within_the_entrys_patience() {
    kept_start_to_a_black_hole_is_refused_in_time("30s");
}

fn kept_start_to_a_black_hole_is_refused_in_time(exit_handshake_timeout: &str) {
    let key = key_file(&[&keygen()]);
    // Exit A's origin serves one connection, then its port becomes a
    // black hole.
    let (a_origin, gone_rx) = one_shot_origin();
    let a = Proxy::exit(a_origin, &key)
        .args(["--connect-timeout", "10s"])
        .args(["--handshake-timeout", exit_handshake_timeout])
        .start();
    let b = Proxy::exit(echo_origin(), &key).start();
    let entry = Proxy::entry(a.addr, &key)
        .round_robin_with(b.addr)
        .args(["--handshake-timeout", "1s"])
        .args(FAST_METRICS)
        .start();
    kept_tunnel_to_each_exit(&entry);
    gone_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let (_, _hole, _fill) = black_hole_on(a_origin);
    // The next client goes to A's kept tunnel first.
    let data = random_bytes(3000, 2);
    assert!(echo(entry.addr, &data) == data, "client 2");
    let (_, a_lines) = a.terminate();
    refused_once_for_a_connect_timeout(&a_lines);
    assert_eq!(total(&a_lines, "tunnel_reuses"), 1, "{a_lines:?}");
    let (_, lines) = entry.terminate();
    assert_eq!(total(&lines, "clean"), 3, "{lines:?}");
    drop(b);
}

/// A kept tunnel's start that must wait for a session slot (the exit is at
/// `--max-connections`, and the entry, with one exit, does not allow a
/// refusal) is answered "at the connection limit" within the entry's
/// patience. Before, the exit waited its own handshake timeout and then
/// reset the tunnel; the entry, unsure whether the session was served,
/// had already reset its client (`upstream_reset`). Now the entry knows
/// nothing was served and ends the client as `no_upstream`.
#[test]
fn a_kept_start_waiting_for_a_slot_is_answered_in_time() {
    let key = key_file(&[&keygen()]);
    let a = Proxy::exit(echo_origin(), &key)
        .shards(1)
        .args(["--max-connections", "1", "--handshake-timeout", "30s"])
        .start();
    let entry = Proxy::entry(a.addr, &key)
        .shards(1)
        .args(["--handshake-timeout", "1s"])
        .args(FAST_METRICS)
        .start();
    let data = random_bytes(3000, 0);
    assert!(echo(entry.addr, &data) == data, "client 0");
    idle_tunnels_are(&entry, 1);
    // A's one session slot, held through an entry of its own.
    let other = Proxy::entry(a.addr, &key)
        .args(["--tunnel-keepalive", "0"])
        .start();
    let held = held_session(other.addr);
    // The next client's start waits on A for the slot.
    let mut c = TcpStream::connect(entry.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.write_all(b"hello").unwrap();
    let mut got = Vec::new();
    let ended = c.read_to_end(&mut got);
    assert!(
        got.is_empty() && !matches!(&ended, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the client was served or left waiting: {ended:?} {got:?}"
    );
    let (_, lines) = entry.terminate();
    assert_eq!(
        (
            total(&lines, "no_upstream"),
            total(&lines, "upstream_reset")
        ),
        (1, 0),
        "{lines:?}"
    );
    drop(held);
    let _ = (other.terminate(), a.terminate());
}

/// The independent implementation (tests/tunnel_client.py, from
/// docs/PROTOCOL.md alone) as an entry: two sessions on one tunnel, each
/// echoed; the second's start is answered with status 0. An exit with
/// `--tunnel-keepalive 0` does not agree.
#[test]
fn an_independent_entry_carries_two_sessions_on_one_tunnel() {
    let key = keygen();
    let exit = Proxy::exit(echo_origin(), &key_file(&[&key])).start();
    let Some(out) = tunnel_client(&["keepalive", &exit.addr.to_string(), &key, "one", "two"])
    else {
        return;
    };
    assert_eq!(
        out.trim(),
        "agreed=True reply1=b'one' ended1=True status=0 reply2=b'two' ended2=True closed=eof"
    );
    let (_, lines) = exit.terminate();
    assert_eq!(total(&lines, "tunnel_reuses"), 1, "{lines:?}");
    let exit = Proxy::exit(echo_origin(), &key_file(&[&key]))
        .args(["--tunnel-keepalive", "0"])
        .start();
    let out = tunnel_client(&["keepalive", &exit.addr.to_string(), &key, "one", "two"]).unwrap();
    assert_eq!(out.trim(), "agreed=False reply1=b'one' ended1=True");
}

/// A start that crosses the exit's goodbye (the entry sent it before it
/// read the goodbye) is answered by that goodbye, "going away", and never
/// reaches the origin: the entry may send it again elsewhere.
#[test]
fn a_start_that_crosses_the_goodbye_is_not_served() {
    let key = keygen();
    let (origin, seen) = recording_origin();
    let exit = Proxy::exit(origin, &key_file(&[&key]))
        .args(["--tunnel-idle-timeout", "1s"])
        .start();
    let Some(out) = tunnel_client(&[
        "keepalive",
        &exit.addr.to_string(),
        &key,
        "one",
        "crossed",
        "cross",
    ]) else {
        return;
    };
    assert_eq!(
        out.trim(),
        "agreed=True reply1=b'' ended1=True status=3 reply2=b'' ended2=False closed=eof"
    );
    let first = seen.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(first.bytes, b"one");
    let (_, lines) = exit.terminate();
    assert!(
        seen.try_recv().is_err(),
        "the crossed session reached the origin: {lines:?}"
    );
    assert_eq!(total(&lines, "accepted"), 1, "{lines:?}");
}

/// Our entry against the independent implementation as an exit: five
/// clients, one tunnel, each later session opened by a start chunk whose
/// `meta` carries the client's connection ID.
#[test]
fn our_entry_keeps_tunnels_alive_with_an_independent_exit() {
    let Some((fake, entry)) = fake_exit("fake-exit-keepalive", &["5"], &["--access-log", "-"])
    else {
        return;
    };
    for i in 0..5 {
        let data = random_bytes(20_000 + i, i as u64);
        assert!(echo(entry.addr, &data) == data, "client {i}");
    }
    let (_, lines) = entry.terminate();
    let out = fake_output(fake);
    let starts = out
        .split_once("starts=")
        .map(|(_, rest)| rest.split(' ').next().unwrap_or(""))
        .unwrap_or("");
    assert!(out.starts_with("offered=True served=5 "), "{out}");
    assert!(out.ends_with("closed=eof"), "{out}");
    let count = |what: &str| lines.iter().filter(|l| l.contains(what)).count();
    assert_eq!(
        (count(r#""tunnel":"new""#), count(r#""tunnel":"kept""#)),
        (1, 4),
        "{lines:?}"
    );
    let ids: Vec<&str> = starts
        .split(',')
        .map(|s| s.trim_start_matches("0:"))
        .collect();
    assert_eq!(ids.len(), 4, "{out}");
    for id in ids {
        assert_eq!(id.len(), 32, "{out}");
        assert!(
            lines.iter().any(|l| l.contains(id)),
            "connection ID {id} is in no access-log line: {lines:?}"
        );
    }
}

/// docs/PROTOCOL.md §4.1: a kept tunnel that the exit closes (FIN) with no
/// status before it served nothing, so the session goes elsewhere rather
/// than being reset: an exit that dies after it read a start and before it
/// answered ends the tunnel so (nothing left unread), and so does a killed
/// exit's kernel for an idle tunnel whose FIN a start crossed.
#[test]
fn a_kept_tunnel_closed_unanswered_sends_the_client_elsewhere() {
    let Some((fake, fake_addr, key)) = fake_exit_at("fake-exit-keepalive", &["5", "eof"]) else {
        return;
    };
    let key = key_file(&[&key]);
    let b = Proxy::exit(echo_origin(), &key).start();
    // Round robin: client 0 to the fake (a kept tunnel after it), client 1
    // to B, client 2 to the fake's kept tunnel, which it closes at the
    // start (and then nothing listens there).
    let entry = Proxy::entry(fake_addr, &key)
        .round_robin_with(b.addr)
        .args(FAST_METRICS)
        .start();
    for i in 0..3 {
        let data = random_bytes(4000, i);
        assert!(echo(entry.addr, &data) == data, "client {i}");
        if i < 2 {
            idle_tunnels_are(&entry, i + 1);
        }
    }
    let out = fake_output(fake);
    assert!(
        out.starts_with("offered=True served=1 closed unanswered at a start"),
        "{out}"
    );
    let (_, lines) = entry.terminate();
    assert_eq!(total(&lines, "clean"), 3, "{lines:?}");
    drop(b);
}

/// A session may start only at the boundary (docs/PROTOCOL.md §4.1): a
/// start sent right behind an end chunk, before the exit's own, is fatal
/// as data after the end is. Nothing of it reaches an origin, and the
/// first session's origin sees a reset, not a clean end. (A break-it round
/// found the exit served it as the next session.)
#[test]
fn a_start_before_the_boundary_is_fatal() {
    // Reads to EOF, reports, then holds its side open until told: the
    // exit's end chunk cannot go out first.
    let (tx, rx) = mpsc::channel::<(Vec<u8>, End)>();
    let tx = Arc::new(std::sync::Mutex::new(tx));
    let origin = serve(move |mut s| {
        let mut got = Vec::new();
        let end = match s.read_to_end(&mut got) {
            // A FIN first: the reset, if any, comes while we hold on.
            Ok(_) => read_until_end(&mut s, Duration::from_secs(10)).0,
            Err(_) => End::Reset,
        };
        let _ = tx.lock().unwrap().send((got, end));
    });
    let key = keygen();
    let exit = Proxy::exit(origin, &key_file(&[&key])).start();
    let Some(out) = tunnel_client(&["early-start", &exit.addr.to_string(), &key]) else {
        return;
    };
    assert_eq!(out.trim(), "exit ended the connection: reset");
    let (got, end) = rx.recv_timeout(Duration::from_secs(15)).unwrap();
    assert_eq!((&got[..], end), (&b"one"[..], End::Reset));
    let (_, lines) = exit.terminate();
    assert!(
        rx.try_recv().is_err(),
        "a second session was served: {lines:?}"
    );
    assert_eq!(total(&lines, "accepted"), 1, "{lines:?}");
    assert_eq!(total(&lines, "auth_failed"), 1, "{lines:?}");
}
