//! End-to-end tests of `shardproxy forward` over real loopback sockets.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

fn forward(upstream: std::net::SocketAddr, extra: &[&str], shards: usize) -> Proxy {
    let up = upstream.to_string();
    let cores = shards.to_string();
    let mut args = vec![
        "forward",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &up,
        "--cores",
        &cores,
    ];
    args.extend_from_slice(extra);
    Proxy::start(&args, shards)
}

#[test]
fn round_trip_64_mib_is_byte_exact() {
    let proxy = forward(echo_origin(), &[], 2);
    let data = Arc::new(random_bytes(64 << 20, 1));
    let back = echo_round_trip(proxy.addr, data.clone());
    assert_eq!(back.len(), data.len());
    assert_eq!(sha256(&back), sha256(&data));
    let (status, lines) = proxy.terminate();
    assert!(status.success(), "{lines:?}");
    let total_up: u64 = summaries(&lines).iter().map(|s| s.get("bytes_up")).sum();
    let total_down: u64 = summaries(&lines).iter().map(|s| s.get("bytes_down")).sum();
    assert_eq!(total_up, 64 << 20);
    assert_eq!(total_down, 64 << 20);
}

#[test]
fn two_hundred_concurrent_connections_use_both_shards() {
    let proxy = forward(echo_origin(), &[], 2);
    let addr = proxy.addr;
    let workers: Vec<_> = (0..200u64)
        .map(|i| {
            thread::spawn(move || {
                let data = Arc::new(random_bytes(32 * 1024 + i as usize, i + 7));
                let back = echo_round_trip(addr, data.clone());
                assert_eq!(sha256(&back), sha256(&data), "connection {i}");
            })
        })
        .collect();
    for w in workers {
        w.join().expect("a connection failed");
    }
    let (status, lines) = proxy.terminate();
    assert!(status.success());
    let sums = summaries(&lines);
    assert_eq!(sums.len(), 2, "{lines:?}");
    let accepted: Vec<u64> = sums.iter().map(|s| s.get("accepted")).collect();
    assert_eq!(accepted.iter().sum::<u64>(), 200, "{accepted:?}");
    assert!(
        accepted.iter().all(|&a| a > 0),
        "a shard accepted nothing: {accepted:?}"
    );
    assert_eq!(sums.iter().map(|s| s.get("clean")).sum::<u64>(), 200);
}

#[test]
fn half_close_still_delivers_the_response() {
    // The origin reads the whole request (until FIN), then answers and closes.
    let origin = serve(|mut s| {
        let mut req = Vec::new();
        s.read_to_end(&mut req).unwrap();
        let reply = format!("got {} bytes", req.len());
        s.write_all(reply.as_bytes()).unwrap();
        s.write_all(&random_bytes(1 << 20, 3)).unwrap();
    });
    let proxy = forward(origin, &[], 1);
    let mut c = TcpStream::connect(proxy.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.write_all(&[b'q'; 100_000]).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut resp = Vec::new();
    c.read_to_end(&mut resp).unwrap();
    let head = b"got 100000 bytes";
    assert_eq!(&resp[..head.len()], head);
    assert_eq!(
        sha256(&resp[head.len()..]),
        sha256(&random_bytes(1 << 20, 3))
    );
    let (_, lines) = proxy.terminate();
    assert_eq!(summaries(&lines)[0].get("clean"), 1, "{lines:?}");
}

#[test]
fn refused_upstream_closes_client_promptly_and_keeps_serving() {
    let proxy = forward(dead_port(), &["--connect-timeout", "3s"], 1);
    for _ in 0..3 {
        let start = Instant::now();
        let mut c = TcpStream::connect(proxy.addr).unwrap();
        let (end, n) = read_until_end(&mut c, Duration::from_secs(5));
        assert_ne!(end, End::Open, "client left hanging");
        assert_eq!(n, 0);
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
    }
    let (status, lines) = proxy.terminate();
    assert!(status.success());
    assert_eq!(summaries(&lines)[0].get("connect_error"), 3, "{lines:?}");
}

#[test]
fn idle_timeout_closes_an_idle_pair() {
    let proxy = forward(echo_origin(), &["--idle-timeout", "700ms"], 1);
    let mut c = TcpStream::connect(proxy.addr).unwrap();
    // Traffic keeps it alive past the timeout...
    for _ in 0..5 {
        c.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        c.read_exact(&mut b).unwrap();
        thread::sleep(Duration::from_millis(300));
    }
    // ...silence ends it.
    let start = Instant::now();
    let (end, _) = read_until_end(&mut c, Duration::from_secs(10));
    let waited = start.elapsed();
    assert_ne!(end, End::Open);
    assert!(
        waited >= Duration::from_millis(400),
        "closed too early: {waited:?}"
    );
    let (_, lines) = proxy.terminate();
    assert_eq!(summaries(&lines)[0].get("idle_timeout"), 1, "{lines:?}");
}

#[test]
fn connection_limit_makes_the_next_client_wait() {
    let proxy = forward(echo_origin(), &["--max-connections", "2"], 1);
    let mut held: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut c = TcpStream::connect(proxy.addr).unwrap();
            c.write_all(b"hi").unwrap();
            let mut b = [0u8; 2];
            c.read_exact(&mut b).unwrap();
            c
        })
        .collect();
    let mut third = TcpStream::connect(proxy.addr).unwrap(); // queued in the backlog
    third.write_all(b"3rd").unwrap();
    third
        .set_read_timeout(Some(Duration::from_millis(800)))
        .unwrap();
    let mut b = [0u8; 3];
    assert!(
        third.read_exact(&mut b).is_err(),
        "third client served above the limit"
    );
    drop(held.pop());
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    third.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"3rd");
}

#[test]
fn sigterm_drains_in_flight_transfer_and_refuses_new_connections() {
    let proxy = forward(echo_origin(), &["--drain-timeout", "60s"], 2);
    let addr = proxy.addr;
    let data = Arc::new(random_bytes(64 << 20, 9));
    // A slow sender, so the transfer is still in flight when SIGTERM lands.
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let send = data.clone();
    let sender = thread::spawn(move || {
        for chunk in send.chunks(1 << 20) {
            writer.write_all(chunk).unwrap();
            thread::sleep(Duration::from_millis(30));
        }
        writer.shutdown(Shutdown::Write).unwrap();
    });
    thread::sleep(Duration::from_millis(300));
    proxy.signal("TERM");
    // New connections are refused once every shard closed its listener.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpStream::connect(addr) {
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
                break;
            }
            Ok(_) => assert!(
                Instant::now() < deadline,
                "listener still open after SIGTERM"
            ),
        }
        thread::sleep(Duration::from_millis(20));
    }
    let mut back = Vec::new();
    (&stream).read_to_end(&mut back).unwrap();
    sender.join().unwrap();
    assert_eq!(sha256(&back), sha256(&data));
    let mut proxy = proxy;
    let status = wait_timeout(&mut proxy.child, Duration::from_secs(30));
    assert_eq!(status.code(), Some(0));
}

#[test]
fn slow_reader_stalls_the_sender_with_bounded_memory() {
    // The origin pushes up to 512 MiB; the client never reads.
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = sent.clone();
    let origin = serve(move |mut s| {
        let chunk = vec![7u8; 64 * 1024];
        s.set_write_timeout(Some(Duration::from_secs(15))).unwrap();
        for _ in 0..(512 * 16) {
            if s.write_all(&chunk).is_err() {
                return;
            }
            counter.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let proxy = forward(origin, &[], 1);
    let baseline = proxy.rss_kib();
    let _client = TcpStream::connect(proxy.addr).unwrap();
    // Wait until the sender has stalled: no progress for 500 ms.
    let mut last = 0;
    for _ in 0..100 {
        thread::sleep(Duration::from_millis(500));
        let now = sent.load(std::sync::atomic::Ordering::Relaxed);
        if now == last && now > 0 {
            break;
        }
        last = now;
    }
    let stalled_at = sent.load(std::sync::atomic::Ordering::Relaxed);
    let growth = proxy.rss_kib().saturating_sub(baseline);
    // Only kernel socket buffers (a few MiB each) plus one 16 KiB relay
    // buffer can hold data: far below what the origin wanted to send.
    assert!(
        stalled_at < 64 << 20,
        "sender was not stalled: {stalled_at} bytes"
    );
    assert!(growth < 8 * 1024, "proxy RSS grew by {growth} KiB");
}

#[test]
fn second_signal_exits_at_once() {
    let proxy = forward(echo_origin(), &["--drain-timeout", "60s"], 1);
    // A live connection would keep a graceful drain going for 60 s.
    let mut live = TcpStream::connect(proxy.addr).unwrap();
    live.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    live.read_exact(&mut b).unwrap();
    proxy.signal("TERM");
    thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    proxy.signal("TERM");
    let mut proxy = proxy;
    let status = wait_timeout(&mut proxy.child, Duration::from_secs(10));
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(status.code(), Some(1));
}

#[test]
fn ipv6_listener_is_v6_only_unless_dual_stack() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("SKIPPED: no IPv6 loopback on this machine");
        return;
    }
    let up = echo_origin().to_string();
    let v6 = Proxy::start(
        &[
            "forward",
            "--listen",
            "[::1]:0",
            "--upstream",
            &up,
            "--cores",
            "1",
        ],
        1,
    );
    let mut c = TcpStream::connect(v6.addr).unwrap();
    c.write_all(b"six").unwrap();
    let mut b = [0u8; 3];
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"six");
    // [::]:port without --dual-stack: IPv4 clients are not accepted on it.
    let only6 = Proxy::start(
        &[
            "forward",
            "--listen",
            "[::]:0",
            "--upstream",
            &up,
            "--cores",
            "1",
        ],
        1,
    );
    let v4 = std::net::SocketAddr::from(([127, 0, 0, 1], only6.addr.port()));
    assert!(
        TcpStream::connect(v4).is_err(),
        "IPv4 reached a v6-only listener"
    );
    let dual = Proxy::start(
        &[
            "forward",
            "--listen",
            "[::]:0",
            "--upstream",
            &up,
            "--cores",
            "1",
            "--dual-stack",
        ],
        1,
    );
    let v4 = std::net::SocketAddr::from(([127, 0, 0, 1], dual.addr.port()));
    let mut c = TcpStream::connect(v4).unwrap();
    c.write_all(b"four").unwrap();
    let mut b = [0u8; 4];
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"four");
}
