//! Upstream pools (issue #11): several endpoints, balancing, retries before
//! the client notices, passive and active health, DNS re-resolution. Real
//! sockets on loopback; the DNS test runs the proxy in a mount namespace of
//! its own with a bind-mounted `/etc/hosts`.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::*;

/// An echo origin that counts its connections.
fn counting_origin() -> (SocketAddr, Arc<AtomicUsize>) {
    counting_origin_on("127.0.0.1:0")
}

fn counting_origin_on(addr: &str) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind(addr).unwrap();
    let addr = l.local_addr().unwrap();
    let n = Arc::new(AtomicUsize::new(0));
    let count = n.clone();
    thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            count.fetch_add(1, Ordering::SeqCst);
            thread::spawn(move || {
                let mut buf = [0u8; 16 * 1024];
                loop {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if c.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = c.shutdown(Shutdown::Write);
            });
        }
    });
    (addr, n)
}

/// One client: sends `len` bytes of a pattern, half-closes, expects them
/// back exactly.
fn client(addr: SocketAddr, len: usize, seed: u64) -> Result<(), String> {
    client_from(None, addr, len, seed)
}

fn client_from(from: Option<&str>, addr: SocketAddr, len: usize, seed: u64) -> Result<(), String> {
    let mut c = match from {
        None => TcpStream::connect(addr).map_err(|e| e.to_string())?,
        Some(ip) => {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .map_err(|e| e.to_string())?;
            s.bind(&format!("{ip}:0").parse::<SocketAddr>().unwrap().into())
                .map_err(|e| e.to_string())?;
            s.connect(&addr.into()).map_err(|e| e.to_string())?;
            TcpStream::from(s)
        }
    };
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let data = random_bytes(len, seed);
    c.write_all(&data).map_err(|e| e.to_string())?;
    c.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
    let mut back = Vec::new();
    c.read_to_end(&mut back).map_err(|e| e.to_string())?;
    if back != data {
        return Err(format!("{} bytes back of {len}", back.len()));
    }
    Ok(())
}

/// `n` clients from `threads` threads; the failures.
fn clients(addr: SocketAddr, n: usize, threads: usize) -> Vec<String> {
    let failed = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let failed = failed.clone();
            thread::spawn(move || {
                for i in 0..n / threads {
                    let seed = (t * 100_000 + i) as u64;
                    if let Err(e) = client(addr, 1000 + i % 3000, seed) {
                        failed.lock().unwrap().push(format!("client {t}/{i}: {e}"));
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let out = failed.lock().unwrap().clone();
    out
}

/// `/metrics` of a proxy started with [`FAST_METRICS`].
fn metrics(p: &Proxy) -> String {
    http_get(p.metrics_addr(), "/metrics").1
}

/// Metrics on, published every 100 ms (tests poll them).
const FAST_METRICS: [&str; 4] = [
    "--metrics-listen",
    "127.0.0.1:0",
    "--metrics-interval",
    "100ms",
];

#[test]
fn a_refusing_origin_is_retried_around_and_ejected() {
    let (live, served) = counting_origin();
    let dead = dead_port();
    let p = Proxy::forward(live)
        .shards(2)
        .args(["--upstream", &dead.to_string(), "--connect-attempts", "2"])
        .args(FAST_METRICS)
        .start();
    let failed = clients(p.addr, 200, 4);
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    assert_eq!(served.load(Ordering::SeqCst), 200);
    let dead_label = format!("upstream=\"{dead}\"");
    let text = poll_until(Duration::from_secs(10), || {
        let m = metrics(&p);
        if metric_sum(&m, "shardproxy_upstream_ejections_total", &[&dead_label]) > 0 {
            Ok(m)
        } else {
            Err("no ejection yet".to_string())
        }
    });
    assert!(
        metric_sum(
            &text,
            "shardproxy_upstream_connect_failures_total",
            &[&dead_label, "reason=\"refused\""]
        ) > 0,
        "{text}"
    );
    let (status, lines) = p.terminate();
    assert!(status.success());
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("upstream {dead} ejected"))),
        "{lines:?}"
    );
    let lost: u64 = summaries(&lines).iter().map(|s| s.get("no_upstream")).sum();
    assert_eq!(lost, 0, "{lines:?}");
}

#[test]
fn weighted_round_robin_splits_exactly_per_shard() {
    let (a, a_served) = counting_origin();
    let (b, b_served) = counting_origin();
    let p = Proxy::command(["forward", "--listen", "127.0.0.1:0"])
        .shards(2)
        .args([
            "--upstream",
            &format!("{a} weight=3"),
            "--upstream",
            &b.to_string(),
        ])
        .args(["--balance", "round-robin"])
        .args(FAST_METRICS)
        .start();
    let failed = clients(p.addr, 400, 4);
    assert!(failed.is_empty(), "{failed:?}");
    let (na, nb) = (
        a_served.load(Ordering::SeqCst),
        b_served.load(Ordering::SeqCst),
    );
    assert_eq!(na + nb, 400);
    let share = na as f64 / 400.0;
    assert!((share - 0.75).abs() <= 0.02, "{na}:{nb}");
    let la = format!("upstream=\"{a}\"");
    let lb = format!("upstream=\"{b}\"");
    let text = poll_until(Duration::from_secs(10), || {
        let m = metrics(&p);
        let total = metric_sum(&m, "shardproxy_upstream_connects_total", &[]);
        if total == 400 {
            Ok(m)
        } else {
            Err(format!("{total} of 400 published"))
        }
    });
    for shard in 0..2 {
        let s = format!("shard=\"{shard}\"");
        let x = metric_sum(&text, "shardproxy_upstream_connects_total", &[&s, &la]);
        let y = metric_sum(&text, "shardproxy_upstream_connects_total", &[&s, &lb]);
        // Smooth weighted round robin: within one pick of 3:1 on each shard.
        let want = 3.0 * (x + y) as f64 / 4.0;
        assert!((x as f64 - want).abs() <= 1.0, "shard {shard}: {x}:{y}");
    }
}

#[test]
fn source_hash_keeps_a_client_address_on_one_endpoint() {
    let (a, a_served) = counting_origin();
    let (b, b_served) = counting_origin();
    let p = Proxy::forward(a)
        .shards(2)
        .args(["--upstream", &b.to_string(), "--balance", "source-hash"])
        .start();
    let mut seen = Vec::new();
    for ip in ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"] {
        let before = (
            a_served.load(Ordering::SeqCst),
            b_served.load(Ordering::SeqCst),
        );
        for i in 0..20 {
            client_from(Some(ip), p.addr, 100, i).unwrap();
        }
        let after = (
            a_served.load(Ordering::SeqCst),
            b_served.load(Ordering::SeqCst),
        );
        let (da, db) = (after.0 - before.0, after.1 - before.1);
        assert!(
            (da, db) == (20, 0) || (da, db) == (0, 20),
            "{ip} was spread: {da} to {a}, {db} to {b}"
        );
        seen.push(da == 20);
    }
    let _ = p.terminate();
}

/// A tunnel exit in front of `origin`, with `key`, on `listen` (or a fresh
/// port).
fn exit(origin: SocketAddr, key: &str, listen: Option<SocketAddr>) -> Proxy {
    let b = Proxy::exit(origin, key).args(["--handshake-timeout", "2s"]);
    match listen {
        Some(l) => b.listen(l).start(),
        None => b.start(),
    }
}

#[test]
fn an_exit_with_the_wrong_key_is_retried_around_and_marked_down() {
    let (origin, _) = counting_origin();
    let key = key_file(&[&keygen()]);
    let other = key_file(&[&keygen()]);
    let good = exit(origin, &key, None);
    let wrong = exit(origin, &other, None);
    // Without active checks: the failed handshake is retried on the good
    // exit, so no client sees it.
    let entry = Proxy::entry(good.addr, &key)
        .round_robin_with(wrong.addr)
        .start();
    let failed = clients(entry.addr, 100, 4);
    assert!(failed.is_empty(), "{failed:?}");
    let (_, lines) = entry.terminate();
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("upstream {} ejected", wrong.addr))),
        "{lines:?}"
    );
    // With active checks: the wrong-key exit is marked down by the checker
    // (a full handshake), and no client fails meanwhile.
    let entry = Proxy::entry(good.addr, &key)
        .round_robin_with(wrong.addr)
        .args(["--health-check-interval", "1s", "--health-check-fails", "2"])
        .start();
    let load = {
        let addr = entry.addr;
        thread::spawn(move || clients(addr, 200, 2))
    };
    entry.wait_for_log(
        |l| {
            l.contains(&format!("upstream {}: health check failed", wrong.addr))
                && l.contains("down")
        },
        Duration::from_secs(15),
    );
    let failed = load.join().unwrap();
    assert!(failed.is_empty(), "{failed:?}");
    let (_, lines) = entry.terminate();
    assert!(
        !lines
            .iter()
            .any(|l| l.contains(&format!("upstream {}: health check failed", good.addr))),
        "{lines:?}"
    );
}

#[test]
fn new_clients_survive_the_loss_of_an_exit_and_it_is_used_again_when_back() {
    let (origin, _) = counting_origin();
    let key = key_file(&[&keygen()]);
    let a = exit(origin, &key, None);
    let b = exit(origin, &key, None);
    let a_addr = a.addr;
    // No keep-alive tunnels: an exit killed outright costs the clients
    // whose session starts on a kept tunnel to it before the entry has
    // seen it die (they are reset, never sent twice; docs/CONFIG.md
    // `tunnel_keepalive`). This test is about new connections.
    let entry = Proxy::entry(a.addr, &key)
        .shards(2)
        .args(["--tunnel-keepalive", "0"])
        .args(["--upstream", &b.addr.to_string()])
        .args([
            "--health-check-interval",
            "1s",
            "--health-check-fails",
            "1",
            "--health-check-passes",
            "1",
        ])
        .args(["--fail-timeout", "1s"])
        .start();
    assert!(clients(entry.addr, 50, 2).is_empty());
    // A live tunnel through each exit, then one exit dies.
    let mut live: Vec<TcpStream> = (0..6).map(|_| held_session(entry.addr)).collect();
    let mut a = a;
    a.kill();
    // New clients: every one succeeds, on the other exit.
    let failed = clients(entry.addr, 200, 4);
    assert!(
        failed.is_empty(),
        "{} failed after the exit died: {failed:?}",
        failed.len()
    );
    // The tunnels that went through the dead exit were aborted (reset),
    // never ended cleanly.
    let mut reset = 0;
    for c in &mut live {
        let (end, _) = read_until_end(c, Duration::from_millis(500));
        if end == End::Reset {
            reset += 1;
        } else {
            assert_eq!(
                end,
                End::Open,
                "a tunnel through the dead exit ended cleanly"
            );
        }
    }
    assert!(reset > 0, "no live tunnel went through the killed exit");
    entry.wait_for_log(
        |l| l.contains(&format!("upstream {a_addr}: health check failed")),
        Duration::from_secs(10),
    );
    // It comes back on the same address and is used again once its check
    // passes.
    let back = exit(origin, &key, Some(a_addr));
    entry.wait_for_log(
        |l| l.contains(&format!("upstream {a_addr}: health check passed")),
        Duration::from_secs(10),
    );
    assert!(clients(entry.addr, 100, 2).is_empty());
    let (_, lines) = back.terminate();
    let served: u64 = summaries(&lines).iter().map(|s| s.get("accepted")).sum();
    // The health probes reach it too; clients must have as well.
    let probes = 10;
    assert!(
        served > probes,
        "the returning exit served {served}: {lines:?}"
    );
    drop(live);
    let _ = entry.terminate();
    let _ = b.terminate();
}

#[test]
fn dns_re_resolution_picks_up_added_and_removed_endpoints() {
    let hosts = std::env::temp_dir().join(format!("shardproxy-hosts-{}", std::process::id()));
    let write_hosts = |ips: &[&str]| {
        // In place (truncate and write), so the bind mount sees it.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .create(true)
            .open(&hosts)
            .unwrap();
        let mut text = String::from("127.0.0.1 localhost\n");
        for ip in ips {
            text.push_str(&format!("{ip} pool.shardproxy.test\n"));
        }
        f.write_all(text.as_bytes()).unwrap();
    };
    // Two origins on the same port of two loopback addresses.
    let (two, two_served) = counting_origin_on("127.0.0.2:0");
    let port = two.port();
    let (_, three_served) = counting_origin_on(&format!("127.0.0.3:{port}"));
    write_hosts(&["127.0.0.2"]);
    let p = Proxy::command(["forward", "--listen", "127.0.0.1:0"])
        .args(["--upstream", &format!("pool.shardproxy.test:{port}")])
        .args(["--dns-refresh", "1s"])
        .hosts_file(hosts.to_str().unwrap())
        .start();
    assert!(clients(p.addr, 10, 1).is_empty());
    assert_eq!(two_served.load(Ordering::SeqCst), 10);
    // Added: both addresses.
    write_hosts(&["127.0.0.2", "127.0.0.3"]);
    // Once the shard has the new set (not only the manager).
    p.wait_for_log(
        |l| l.contains("shard 0: upstream endpoints now 2"),
        Duration::from_secs(10),
    );
    assert!(clients(p.addr, 40, 2).is_empty());
    assert!(three_served.load(Ordering::SeqCst) > 0);
    // Removed: only the new one is left.
    write_hosts(&["127.0.0.3"]);
    p.wait_for_log(
        |l| l.contains("shard 0: upstream endpoints now 1 (127.0.0.3"),
        Duration::from_secs(10),
    );
    let before = two_served.load(Ordering::SeqCst);
    assert!(clients(p.addr, 20, 2).is_empty());
    assert_eq!(
        two_served.load(Ordering::SeqCst),
        before,
        "a removed endpoint was used"
    );
    // A failed lookup keeps the last good set.
    write_hosts(&[]);
    p.wait_for_log(
        |l| l.contains("keeping the last good endpoints"),
        Duration::from_secs(10),
    );
    assert!(clients(p.addr, 10, 1).is_empty());
    let _ = p.terminate();
    let _ = std::fs::remove_file(&hosts);
}

/// An address nothing listens on (connects are refused).
fn dead_address() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

#[test]
fn an_exit_whose_origins_are_down_refuses_tunnels_so_the_entry_moves_on() {
    // Exit A's only origin refuses connections; exit B's works. Before the
    // status byte, A accepted every tunnel (its handshake is fine), then
    // failed to reach its origin and reset the client: about half the
    // clients failed, and the entry never counted A as failing. (Before
    // the connect status, the first one still did.)
    let (origin, _) = counting_origin();
    let dead = dead_address();
    let key = key_file(&[&keygen()]);
    let a = Proxy::exit(dead, &key)
        .shards(1)
        .args(["--max-fails", "1", "--fail-timeout", "1h"])
        .start();
    let b = exit(origin, &key, None);
    let entry = Proxy::entry(a.addr, &key)
        .round_robin_with(b.addr)
        .args(["--max-fails", "1"])
        .start();
    // A learns that its origin is down only by failing to reach it (then
    // ejects it); its connect status sends that first client to B too
    // (docs/PROTOCOL.md §3.1).
    for i in 0..4 {
        if let Err(e) = client(entry.addr, 100, i) {
            panic!("warm-up client {i} was lost: {e}");
        }
    }
    let failed = clients(entry.addr, 100, 4);
    assert!(
        failed.is_empty(),
        "{} of 100 clients failed: {failed:?}",
        failed.len()
    );
    // The entry's health probe allows a refusal: A is marked down.
    let checked = Proxy::entry(a.addr, &key)
        .args(["--upstream", &b.addr.to_string()])
        .args(["--health-check-interval", "1s", "--health-check-fails", "1"])
        .start();
    checked.wait_for_log(
        |l| {
            l.contains(&format!("upstream {}: health check failed", a.addr))
                && l.contains("refused the tunnel")
        },
        Duration::from_secs(15),
    );
    let _ = checked.terminate();
    // Without another exit to go to, the hello does not allow a refusal:
    // A tries its (ejected) origin anyway, as a pool with every endpoint
    // down does, and a client gets through once the origin is back.
    let (_revived, revived_count) = counting_origin_on(&dead.to_string());
    let only_a = Proxy::entry(a.addr, &key).start();
    let r = client(only_a.addr, 1000, 7);
    assert!(r.is_ok(), "the only exit refused or failed: {r:?}");
    assert_eq!(revived_count.load(Ordering::SeqCst), 1);
    let (_, lines) = a.terminate();
    let refused: u64 = summaries(&lines).iter().map(|s| s.get("refused")).sum();
    assert!(refused > 0, "A refused nothing: {lines:?}");
    let (_, entry_lines) = entry.terminate();
    let auth: u64 = summaries(&entry_lines)
        .iter()
        .map(|s| s.get("auth_failed"))
        .sum();
    assert_eq!(
        auth, 0,
        "refusals counted as auth failures: {entry_lines:?}"
    );
    let _ = only_a.terminate();
    let _ = b.terminate();
}

/// docs/PROTOCOL.md §3.1: an exit learns that its origin died only by
/// failing to reach it, after its server hello said yes. With the connect
/// status it then answers "no upstream" before it forwards anything, and
/// the entry sends the client's first bytes to its other exit: the first
/// clients after the death are not lost either. (Keep-alive off: every
/// client on a new tunnel; kept tunnels have their own test in
/// tests/keepalive.rs.)
#[test]
fn the_first_clients_after_an_origin_died_go_to_another_exit() {
    let (origin, served) = counting_origin();
    let dead = dead_address();
    let key = key_file(&[&keygen()]);
    let a = Proxy::exit(dead, &key)
        .shards(1)
        .args(["--max-fails", "3", "--fail-timeout", "1h"])
        .start();
    let b = exit(origin, &key, None);
    // `--max-fails 1`: a refusal counted as a failure would eject A (for
    // 10 s), where a refusal only passes it over for a second.
    let entry = Proxy::entry(a.addr, &key)
        .round_robin_with(b.addr)
        .args(["--tunnel-keepalive", "0"])
        .args(["--max-fails", "1", "--fail-timeout", "10s"])
        .args(FAST_METRICS)
        .start();
    for i in 0..12 {
        if let Err(e) = client(entry.addr, 100, i) {
            panic!("client {i} was lost: {e}");
        }
    }
    assert_eq!(served.load(Ordering::SeqCst), 12, "B's origin");
    // Counted as A's refusal, not as a failed handshake, and no ejection
    // (a break-it round found both).
    let a_label = format!("upstream=\"{}\"", a.addr);
    let text = poll_until(Duration::from_secs(10), || {
        let m = metrics(&entry);
        let failures = "shardproxy_upstream_connect_failures_total";
        match metric_sum(&m, failures, &[&a_label, "reason=\"refused\""]) {
            0 => Err(format!("no refusal counted yet:\n{m}")),
            _ => Ok(m),
        }
    });
    for (metric, labels) in [
        (
            "shardproxy_upstream_connect_failures_total",
            vec![a_label.as_str(), "reason=\"handshake\""],
        ),
        (
            "shardproxy_upstream_ejections_total",
            vec![a_label.as_str()],
        ),
    ] {
        assert_eq!(metric_sum(&text, metric, &labels), 0, "{metric}: {text}");
    }
    // The origin comes back: A serves again within seconds (its own probe
    // finds the origin, the entry's pass-over lasts a second), not after
    // an ejection of the entry's.
    let (_revived, revived) = counting_origin_on(&dead.to_string());
    let back = poll_until(Duration::from_secs(6), || {
        if let Err(e) = client(entry.addr, 100, 99) {
            panic!("a client was lost after the origin came back: {e}");
        }
        match revived.load(Ordering::SeqCst) {
            0 => Err("A has not served again".to_string()),
            n => Ok(n),
        }
    });
    assert!(back > 0);
    let (_, lines) = a.terminate();
    // A refused the clients it could not serve (the entry sent them to B):
    // counted as refusals, not as clients it lost (`no_upstream`).
    let summed_a = |key| -> u64 { summaries(&lines).iter().map(|s| s.get(key)).sum() };
    assert!(summed_a("refused") >= 1, "no client reached A: {lines:?}");
    assert_eq!(summed_a("no_upstream"), 0, "{lines:?}");
    let (_, entry_lines) = entry.terminate();
    let summed = |key| -> u64 { summaries(&entry_lines).iter().map(|s| s.get(key)).sum() };
    assert_eq!(summed("accepted"), summed("clean"), "{entry_lines:?}");
    let _ = b.terminate();
}

/// An exit whose origin swallows connects (a black hole) answers the
/// connect status with a refusal within nine tenths of its handshake
/// timeout, so the entry, which waits as long for the status, sends the
/// client to its other exit instead of resetting it. (A break-it round saw
/// the reset: the exit kept trying for `--connect-attempts` ×
/// `--connect-timeout`.)
#[test]
fn an_exit_whose_origin_swallows_connects_refuses_in_time() {
    swallowed_connects_are_refused_in_time("1s");
}

/// The same with an exit whose handshake timeout is longer than the
/// entry's: the exit keeps within the entry's patience, which the entry
/// sends in its hello (docs/PROTOCOL.md §2.1, type 0x04). Before, the exit
/// gave up at nine tenths of its own 30 s and the entry had reset the
/// client after 1 s.
#[test]
fn an_exit_with_a_longer_handshake_timeout_refuses_within_the_entrys() {
    swallowed_connects_are_refused_in_time("30s");
}

fn swallowed_connects_are_refused_in_time(exit_handshake_timeout: &str) {
    let (hole, _listener, _fill) = black_hole_on(SocketAddr::from(([127, 0, 0, 1], 0)));
    let (origin, served) = counting_origin();
    let key = key_file(&[&keygen()]);
    let a = Proxy::exit(hole, &key)
        .args(["--connect-timeout", "10s"])
        .args(["--handshake-timeout", exit_handshake_timeout])
        .start();
    let b = exit(origin, &key, None);
    let entry = Proxy::entry(a.addr, &key)
        .round_robin_with(b.addr)
        .args(["--tunnel-keepalive", "0", "--handshake-timeout", "1s"])
        .start();
    let started = std::time::Instant::now();
    if let Err(e) = client(entry.addr, 100, 1) {
        panic!("the client was lost after {:?}: {e}", started.elapsed());
    }
    assert_eq!(served.load(Ordering::SeqCst), 1, "B's origin");
    let (_, lines) = a.terminate();
    refused_once_for_a_connect_timeout(&lines);
    let _ = (entry.terminate(), b.terminate());
}

/// With every exit's origin down, a client is closed as `no_upstream`
/// (every attempt refused), not as a tunnel reset: the last attempt of a
/// retried client offers the connect status too (a break-it round saw
/// `upstream_reset`, its bytes counted as sent up).
#[test]
fn a_client_no_exit_can_serve_ends_as_no_upstream() {
    let key = key_file(&[&keygen()]);
    let a = Proxy::exit(dead_address(), &key).start();
    let b = Proxy::exit(dead_address(), &key).start();
    let entry = Proxy::entry(a.addr, &key)
        .round_robin_with(b.addr)
        .args(["--tunnel-keepalive", "0"])
        .start();
    let lost = client(entry.addr, 100, 1);
    assert!(lost.is_err(), "served with no origin up: {lost:?}");
    let (_, lines) = entry.terminate();
    let summed = |key| -> u64 { summaries(&lines).iter().map(|s| s.get(key)).sum() };
    assert_eq!(
        (summed("no_upstream"), summed("upstream_reset")),
        (1, 0),
        "{lines:?}"
    );
    let _ = (a.terminate(), b.terminate());
}

#[test]
fn an_exit_at_its_connection_limit_refuses_so_the_entry_moves_on() {
    // Exit A takes one session at a time (`--max-connections 1`) and one is
    // held open through it. Before the busy status, a tunnel to A waited
    // for a slot until A's handshake timeout (60 s here), so its client
    // waited too (and failed at the client's 20 s read timeout).
    let (origin, _) = counting_origin();
    let key = key_file(&[&keygen()]);
    let a = Proxy::exit(origin, &key)
        .shards(1)
        .args(["--max-connections", "1", "--handshake-timeout", "60s"])
        .start();
    let b = Proxy::exit(origin, &key)
        .args(["--handshake-timeout", "60s"])
        .start();
    let only_a = Proxy::entry(a.addr, &key).start();
    let held = held_session(only_a.addr);
    let entry = Proxy::entry(a.addr, &key)
        .round_robin_with(b.addr)
        .args(["--handshake-timeout", "60s"])
        .start();
    let failed = clients(entry.addr, 40, 4);
    assert!(
        failed.is_empty(),
        "{} of 40 clients failed: {failed:?}",
        failed.len()
    );
    drop(held);
    let _ = only_a.terminate();
    let a_addr = a.addr;
    let (_, lines) = a.terminate();
    let refused: u64 = summaries(&lines).iter().map(|s| s.get("refused")).sum();
    assert!(refused > 0, "A refused nothing: {lines:?}");
    // A full exit is passed over for a moment, never ejected: an ejection
    // (10 s, doubling) kept it idle long after its slots freed.
    let (_, entry_lines) = entry.terminate();
    assert!(
        !entry_lines
            .iter()
            .any(|l| l.contains(&format!("upstream {a_addr} ejected"))),
        "{entry_lines:?}"
    );
    let _ = b.terminate();
}

#[test]
fn an_exit_probes_an_origin_whose_ejection_ran_out_instead_of_losing_clients_on_it() {
    // Exit A's origin is dead; A ejects it for 1 s, then 2 s, 4 s, ... Each
    // time an ejection ran out, A used to take tunnels again and lose
    // `--max-fails` clients on the dead origin before ejecting it again,
    // although exit B was fine. Now A probes the origin with a connect of
    // its own and refuses meanwhile.
    let (origin, _) = counting_origin();
    let dead = dead_address();
    let key = key_file(&[&keygen()]);
    let a = Proxy::exit(dead, &key)
        .shards(1)
        .args(["--max-fails", "1", "--fail-timeout", "1s"])
        .start();
    let b = exit(origin, &key, None);
    let entry = Proxy::entry(a.addr, &key)
        .round_robin_with(b.addr)
        .args(["--fail-timeout", "1s"])
        .start();
    // Warm-up: A learns that its origin is down by failing to reach it
    // (the client goes on to B: docs/PROTOCOL.md §3.1).
    for i in 0..4 {
        if let Err(e) = client(entry.addr, 100, i) {
            panic!("warm-up client {i} was lost: {e}");
        }
    }
    // Clients for 4 s (at most 4000): A's ejection runs out at least twice.
    let start = std::time::Instant::now();
    let mut failed = Vec::new();
    let mut n = 0;
    while start.elapsed() < Duration::from_secs(4) && n < 4000 {
        if let Err(e) = client(entry.addr, 100, 10 + n) {
            failed.push(format!("{:?}: {e}", start.elapsed()));
        }
        n += 1;
        thread::sleep(Duration::from_millis(1));
    }
    assert!(
        failed.is_empty(),
        "{} of {n} lost: {failed:?}",
        failed.len()
    );
    a.wait_for_log(
        |l| l.contains(&format!("upstream {dead} still down")),
        Duration::from_secs(5),
    );
    // The origin comes back: a probe finds it, and A serves again.
    let (_revived, served) = counting_origin_on(&dead.to_string());
    let keep = {
        let addr = entry.addr;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let h = thread::spawn(move || {
            let mut lost = 0;
            for i in 0..20_000u64 {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                if client(addr, 100, 100_000 + i).is_err() {
                    lost += 1;
                }
                thread::sleep(Duration::from_millis(1));
            }
            lost
        });
        (stop, h)
    };
    a.wait_for_log(
        |l| l.contains(&format!("upstream {dead} answers again")),
        Duration::from_secs(40),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while served.load(Ordering::SeqCst) == 0 && std::time::Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    keep.0.store(true, Ordering::SeqCst);
    let lost = keep.1.join().unwrap();
    assert_eq!(lost, 0, "clients lost while the origin came back");
    assert!(served.load(Ordering::SeqCst) > 0, "A never served again");
    let _ = entry.terminate();
    let _ = a.terminate();
    let _ = b.terminate();
}
