//! Client identity (issue #12): the PROXY protocol in (`--accept-proxy`,
//! against real HAProxy) and out (`--send-proxy-v2`, read by an origin with
//! its own PROXY v2 parser, written here from the spec), the connection ID
//! across the tunnel, and the access log.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// What a PROXY-v2-reading origin saw on one connection.
#[derive(Debug)]
struct Proxied {
    /// `None` for a LOCAL command.
    source: Option<SocketAddr>,
    destination: Option<SocketAddr>,
    /// TLV 0xE0, shardproxy's connection ID.
    id: Option<u128>,
    data: Vec<u8>,
}

/// An origin that requires a PROXY protocol v2 header, parses it with its
/// own code (HAProxy's proxy-protocol.txt, section 2.2, independent of the
/// `ppp` crate the proxy uses), then echoes the payload and reports.
fn ppv2_origin() -> (SocketAddr, mpsc::Receiver<Result<Proxied, String>>) {
    let (tx, rx) = mpsc::channel();
    let tx = Arc::new(Mutex::new(tx));
    let addr = serve(move |mut s| {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let got = read_ppv2(&mut s).and_then(|(source, destination, id)| {
            let mut data = Vec::new();
            s.read_to_end(&mut data).map_err(|e| e.to_string())?;
            s.write_all(&data).map_err(|e| e.to_string())?;
            let _ = s.shutdown(Shutdown::Write);
            Ok(Proxied {
                source,
                destination,
                id,
                data,
            })
        });
        let _ = tx.lock().unwrap().send(got);
    });
    (addr, rx)
}

type Header = (Option<SocketAddr>, Option<SocketAddr>, Option<u128>);

fn read_ppv2(s: &mut TcpStream) -> Result<Header, String> {
    let mut head = [0u8; 16];
    s.read_exact(&mut head)
        .map_err(|e| format!("header: {e}"))?;
    if &head[..12] != b"\r\n\r\n\x00\r\nQUIT\n" {
        return Err(format!("no v2 signature: {head:02x?}"));
    }
    let (ver_cmd, fam) = (head[12], head[13]);
    if ver_cmd >> 4 != 2 {
        return Err(format!("version {ver_cmd:#x}"));
    }
    let len = u16::from_be_bytes([head[14], head[15]]) as usize;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).map_err(|e| format!("body: {e}"))?;
    if ver_cmd & 0x0f == 0 {
        return Ok((None, None, None));
    }
    let (source, destination, rest) = match fam {
        0x11 => {
            let ip = |o: usize| {
                IpAddr::V4(Ipv4Addr::new(
                    body[o],
                    body[o + 1],
                    body[o + 2],
                    body[o + 3],
                ))
            };
            let port = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
            (
                SocketAddr::new(ip(0), port(8)),
                SocketAddr::new(ip(4), port(10)),
                &body[12..],
            )
        }
        0x21 => {
            let ip = |o: usize| {
                let b: [u8; 16] = body[o..o + 16].try_into().unwrap();
                IpAddr::V6(Ipv6Addr::from(b))
            };
            let port = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
            (
                SocketAddr::new(ip(0), port(32)),
                SocketAddr::new(ip(16), port(34)),
                &body[36..],
            )
        }
        other => return Err(format!("family/protocol {other:#x}")),
    };
    let mut id = None;
    let mut tlvs = rest;
    while tlvs.len() >= 3 {
        let (kind, n) = (tlvs[0], u16::from_be_bytes([tlvs[1], tlvs[2]]) as usize);
        let value = tlvs.get(3..3 + n).ok_or("TLV past the header")?;
        if kind == 0xE0 {
            id = Some(u128::from_be_bytes(
                value.try_into().map_err(|_| "ID length")?,
            ));
        }
        tlvs = &tlvs[3 + n..];
    }
    Ok((Some(source), Some(destination), id))
}

/// Sends `data`, half-closes, and returns what came back before EOF.
fn exchange(c: &mut TcpStream, data: &[u8]) -> Vec<u8> {
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.write_all(data).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    c.read_to_end(&mut back).unwrap();
    back
}

fn temp(name: &str) -> String {
    let p = std::env::temp_dir().join(format!("shardproxy-id-{}-{name}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p.to_str().unwrap().to_string()
}

/// The access log's lines once it holds `n` (the shards flush every 200 ms
/// and at exit).
fn log_lines(path: &str, n: usize) -> Vec<String> {
    poll_until(Duration::from_secs(10), || {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines.len() >= n {
            Ok(lines)
        } else {
            Err(format!("{} of {n} lines in {path}", lines.len()))
        }
    })
}

/// The value of `"key":` in a JSON line (strings unquoted).
fn field(line: &str, key: &str) -> Option<String> {
    let at = line.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = &line[at..];
    if let Some(s) = rest.strip_prefix('"') {
        Some(s[..s.find('"')?].to_string())
    } else {
        let end = rest.find([',', '}']).unwrap_or(rest.len());
        Some(rest[..end].to_string())
    }
}

struct Haproxy(std::process::Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// HAProxy in TCP mode on a free port, sending a PROXY v2 header to
/// `backend` (`send-proxy-v2`), with a CRC-32C TLV (`proxy-v2-options
/// crc32c`), which its receiver verifies: the checksum as HAProxy computes
/// it, not only as our own tests do.
fn haproxy_send_proxy_v2(backend: SocketAddr) -> Option<(Haproxy, SocketAddr)> {
    if Command::new("haproxy").arg("-v").output().is_err() {
        missing("haproxy (Debian's `haproxy` package)");
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cfg = temp("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  nbthread 1\n\
             defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend f\n  bind {port}\n  default_backend b\n\
             backend b\n  server s {backend} send-proxy-v2 proxy-v2-options crc32c\n"
        ),
    )
    .unwrap();
    let child = Command::new("haproxy")
        .args(["-db", "-f", &cfg])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let guard = Haproxy(child);
    poll_until(Duration::from_secs(10), || {
        TcpStream::connect(port)
            .map(drop)
            .map_err(|e| e.to_string())
    });
    Some((guard, port))
}

/// HAProxy (send-proxy-v2) → entry (--accept-proxy) → exit
/// (--send-proxy-v2) → an origin with its own PROXY v2 parser: the
/// client's address and port arrive exactly, and the connection ID in the
/// origin's header is the one both proxies log.
#[test]
fn the_client_address_crosses_haproxy_the_tunnel_and_reaches_the_origin() {
    let (origin, seen) = ppv2_origin();
    let key = key_file(&[&keygen()]);
    let (exit_log, entry_log) = (temp("exit.log"), temp("entry.log"));
    let exit = Proxy::exit(origin, &key)
        .args(["--send-proxy-v2", "--access-log", &exit_log])
        .start();
    let entry = Proxy::entry(exit.addr, &key)
        .args([
            "--accept-proxy",
            "--proxy-trusted-cidrs",
            "127.0.0.1/32",
            "--access-log",
            &entry_log,
        ])
        .start();
    let Some((_haproxy, front)) = haproxy_send_proxy_v2(entry.addr) else {
        return;
    };
    let mut clients = Vec::new();
    for i in 0..3u8 {
        let mut c = TcpStream::connect(front).unwrap();
        let me = c.local_addr().unwrap();
        let data = vec![b'a' + i; 1000 * (i as usize + 1)];
        assert_eq!(exchange(&mut c, &data), data);
        // Skip the connections of the readiness probe (no data).
        let got = poll_until(Duration::from_secs(10), || {
            match seen.recv_timeout(Duration::from_secs(10)) {
                Ok(Ok(p)) if p.data.is_empty() => Err("a probe".to_string()),
                Ok(got) => Ok(got),
                Err(e) => Err(e.to_string()),
            }
        })
        .expect("the origin could not read the PROXY header");
        assert_eq!(
            got.source,
            Some(me),
            "the origin saw another client address"
        );
        assert_eq!(got.destination, Some(front));
        assert_eq!(got.data, data);
        clients.push((me, got.id.expect("no connection ID TLV"), data.len()));
    }
    let (s1, _) = entry.terminate();
    let (s2, _) = exit.terminate();
    assert!(s1.success() && s2.success());
    let entry_lines = log_lines(&entry_log, 3);
    let exit_lines = log_lines(&exit_log, 3);
    for (me, id, len) in clients {
        let id = format!("{id:032x}");
        for (role, lines) in [("entry", &entry_lines), ("exit", &exit_lines)] {
            let line = lines
                .iter()
                .find(|l| field(l, "id").as_deref() == Some(id.as_str()))
                .unwrap_or_else(|| panic!("no {role} line with id {id}: {lines:?}"));
            assert_eq!(field(line, "client"), Some(me.to_string()), "{line}");
            assert_eq!(field(line, "reason").as_deref(), Some("clean"), "{line}");
            assert_eq!(field(line, "bytes_up"), Some(len.to_string()), "{line}");
            assert_eq!(field(line, "bytes_down"), Some(len.to_string()), "{line}");
            assert_eq!(field(line, "role").as_deref(), Some(role), "{line}");
        }
    }
}

/// A peer outside the trusted ranges, a truncated header, a v2 header with
/// a bad signature, and a header that trickles in past the deadline: each
/// is closed (RST), counted as `bad_proxy_header`, and nothing reaches the
/// origin.
#[test]
fn bad_proxy_headers_are_closed_counted_and_never_forwarded() {
    let (origin, seen) = recording_origin();
    let untrusting = Proxy::forward(origin)
        .args(["--accept-proxy", "--proxy-trusted-cidrs", "10.0.0.0/8"])
        .start();
    let trusting = Proxy::forward(origin)
        .args([
            "--accept-proxy",
            "--proxy-trusted-cidrs",
            "192.0.2.0/24,127.0.0.1",
            "--proxy-header-timeout",
            "500ms",
        ])
        .start();
    let valid = b"PROXY TCP4 198.51.100.1 203.0.113.9 56324 443\r\nsecret".to_vec();
    let mut v2 = b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    v2.extend_from_slice(&[192, 0, 2, 1, 192, 0, 2, 2, 0x1f, 0x90, 0x01, 0xbb]);
    let mut bad_signature = v2.clone();
    bad_signature[9] = b'X';
    bad_signature.extend_from_slice(b"secret");
    let mut truncated = v2[..20].to_vec();
    truncated.truncate(20);
    // An untrusted peer is reset as soon as it is accepted, which can beat
    // the client's own write: a write or shutdown failing with a reset is
    // that same outcome.
    let attempt = |addr: SocketAddr, bytes: &[u8], close: bool| {
        let mut c = TcpStream::connect(addr).unwrap();
        let sent = c.write_all(bytes).and_then(|()| match close {
            true => c.shutdown(Shutdown::Write),
            false => Ok(()),
        });
        match sent {
            Ok(()) => read_until_end(&mut c, Duration::from_secs(10)),
            Err(e) => {
                assert!(
                    matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                    ),
                    "{e}"
                );
                (End::Reset, 0)
            }
        }
    };
    // A valid header, but from a peer nobody trusts.
    assert_eq!(attempt(untrusting.addr, &valid, false), (End::Reset, 0));
    assert_eq!(
        attempt(trusting.addr, &bad_signature, false),
        (End::Reset, 0)
    );
    assert_eq!(attempt(trusting.addr, &truncated, true), (End::Reset, 0));
    // One byte every 100 ms: still incomplete at the 500 ms deadline. The
    // trickle stops after five bytes (400 ms): a write racing the RST would
    // take the socket's ECONNRESET first and leave the reader an EOF.
    let started = Instant::now();
    let mut c = TcpStream::connect(trusting.addr).unwrap();
    let trickler = {
        let mut c = c.try_clone().unwrap();
        let valid = valid.clone();
        thread::spawn(move || {
            for b in valid.into_iter().take(5) {
                if c.write_all(&[b]).is_err() {
                    return;
                }
                // The trickle is the input under test.
                thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let (end, n) = read_until_end(&mut c, Duration::from_secs(10));
    let took = started.elapsed();
    assert_eq!((end, n), (End::Reset, 0));
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "closed after {took:?}"
    );
    drop(c);
    trickler.join().unwrap();
    let (_, l1) = untrusting.terminate();
    let (_, l2) = trusting.terminate();
    let bad: u64 = summaries(&l1)
        .iter()
        .chain(summaries(&l2).iter())
        .map(|s| s.get("bad_proxy_header"))
        .sum();
    assert_eq!(bad, 4, "{l1:?} {l2:?}");
    assert!(
        l1.iter()
            .chain(&l2)
            .any(|l| l.contains("PROXY protocol header")),
        "no log line names the refused header: {l1:?} {l2:?}"
    );
    assert!(
        seen.recv_timeout(Duration::from_millis(500)).is_err(),
        "something reached the origin"
    );
}

/// `--send-proxy-v2` on a forward reads what the client already sent to
/// put it in the header's segment; a client that reset before that must
/// reach the upstream as a reset, never as the header followed by a clean
/// end (the kernel reports a reset once: a read that dropped it left the
/// relay a clean EOF). Twenty clients that connect and reset at once.
#[test]
fn a_client_reset_before_the_header_goes_out_is_a_reset_upstream() {
    let (origin, seen) = recording_origin();
    let fwd = Proxy::forward(origin).args(["--send-proxy-v2"]).start();
    for _ in 0..20 {
        let c = TcpStream::connect(fwd.addr).unwrap();
        socket2::SockRef::from(&c)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(c);
        let got = seen.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_ne!(
            got.end,
            End::Eof,
            "the upstream saw a clean end after {} bytes",
            got.bytes.len()
        );
    }
    let (status, lines) = fwd.terminate();
    assert!(status.success(), "{lines:?}");
}

/// An entry whose balancer sends a short PROXY header (v1 `UNKNOWN`, 15
/// bytes) and a lot of data at once: the bytes after the header fill
/// almost the whole first read, more than fits beside the key
/// confirmation in one relay buffer. Every byte still arrives, once, in
/// order. Ten connections, so that some first reads find all of it queued.
#[test]
fn a_short_header_and_a_full_first_read_through_the_entry() {
    let key = key_file(&[&keygen()]);
    let exit = Proxy::exit(echo_origin(), &key).start();
    let entry = Proxy::entry(exit.addr, &key)
        .args(["--accept-proxy", "--proxy-trusted-cidrs", "127.0.0.0/8"])
        .start();
    for i in 0..10 {
        let mut c = TcpStream::connect(entry.addr).unwrap();
        let mut first = b"PROXY UNKNOWN\r\n".to_vec();
        let payload = random_bytes(100_000, i);
        first.extend_from_slice(&payload);
        let back = exchange(&mut c, &first);
        assert!(
            back == payload,
            "connection {i}: {} bytes back, not the {} sent",
            back.len(),
            payload.len()
        );
    }
    let (status, lines) = entry.terminate();
    assert!(status.success(), "{lines:?}");
}

/// A v1 header with the client's first data in the same segment: the data
/// reaches the origin exactly once, after a v2 header with the v1 header's
/// addresses. A v2 LOCAL header (a balancer's health check) is served as a
/// connection from the balancer itself.
#[test]
fn v1_headers_early_data_and_local_commands_on_forward() {
    let (origin, seen) = ppv2_origin();
    let fwd = Proxy::forward(origin)
        .args([
            "--accept-proxy",
            "--proxy-trusted-cidrs",
            "127.0.0.0/8",
            "--send-proxy-v2",
        ])
        .start();
    let mut c = TcpStream::connect(fwd.addr).unwrap();
    let header = b"PROXY TCP4 198.51.100.1 203.0.113.9 56324 443\r\n";
    let mut first = header.to_vec();
    first.extend_from_slice(b"early data, ");
    first.extend_from_slice(&random_bytes(100_000, 3));
    let payload = &first[header.len()..];
    let back = exchange(&mut c, &first);
    assert!(
        back == payload,
        "{} bytes back, not the {} sent",
        back.len(),
        payload.len()
    );
    let got = seen.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    assert_eq!(got.source, Some("198.51.100.1:56324".parse().unwrap()));
    assert_eq!(got.destination, Some("203.0.113.9:443".parse().unwrap()));
    assert!(
        got.data == payload,
        "the origin got {} bytes",
        got.data.len()
    );
    assert!(got.id.is_some());

    let mut c = TcpStream::connect(fwd.addr).unwrap();
    let me = c.local_addr().unwrap();
    let mut local = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00".to_vec();
    local.extend_from_slice(b"health");
    assert_eq!(exchange(&mut c, &local), b"health");
    let got = seen.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    assert_eq!(
        got.source,
        Some(me),
        "a LOCAL connection is the balancer's own"
    );
    assert_eq!(got.destination, Some(fwd.addr));
    let (status, lines) = fwd.terminate();
    assert!(status.success(), "{lines:?}");
}

/// `--send-proxy-v2` on a forward without `--accept-proxy`: the header
/// names the client's socket, and the client's bytes (some of which may
/// travel in the header's segment) arrive exactly once, in order.
#[test]
fn a_forward_sends_the_header_then_every_client_byte_once() {
    let (origin, seen) = ppv2_origin();
    let fwd = Proxy::forward(origin).arg("--send-proxy-v2").start();
    for seed in 0..5u64 {
        let mut c = TcpStream::connect(fwd.addr).unwrap();
        let me = c.local_addr().unwrap();
        let data = random_bytes(50_000 + seed as usize * 7_000, seed);
        let back = exchange(&mut c, &data);
        assert!(back == data, "{} bytes back of {}", back.len(), data.len());
        let got = seen.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
        assert_eq!(got.source, Some(me));
        assert_eq!(got.destination, Some(fwd.addr));
        assert!(got.data == data, "the origin got {} bytes", got.data.len());
    }
}

/// An entry that sends no `meta` (an older one; here the independent
/// client): the exit still serves it, and its PROXY header names the
/// entry's own address.
#[test]
fn an_exit_serves_hellos_without_meta() {
    if !python_cryptography() {
        return;
    }
    let (origin, seen) = ppv2_origin();
    let key = keygen();
    let exit = Proxy::exit(origin, &key_file(&[&key]))
        .arg("--send-proxy-v2")
        .start();
    let Some(stdout) = tunnel_client(&["send", &exit.addr.to_string(), &key, "no meta here"])
    else {
        return;
    };
    assert!(stdout.contains("len 12 ended=True"), "{stdout}");
    let got = seen.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    assert_eq!(got.data, b"no meta here");
    assert_eq!(
        got.source.map(|s| s.ip()),
        Some(IpAddr::V4(Ipv4Addr::LOCALHOST))
    );
    assert_eq!(got.destination, Some(exit.addr));
    assert!(got.id.is_some());
}

/// One JSON line per connection, with exact byte counts that add up to the
/// shard counters (the same counters the metrics export).
#[test]
fn the_access_log_has_one_exact_line_per_connection() {
    let path = temp("forward.log");
    let fwd = Proxy::forward(echo_origin())
        .shards(2)
        .args(["--access-log", &path])
        .start();
    for i in 1..=20usize {
        let mut c = TcpStream::connect(fwd.addr).unwrap();
        let data = random_bytes(i * 1000, i as u64);
        assert_eq!(exchange(&mut c, &data), data);
    }
    let (status, lines) = fwd.terminate();
    assert!(status.success(), "{lines:?}");
    let log = log_lines(&path, 20);
    assert_eq!(log.len(), 20, "{log:?}");
    let mut sizes: Vec<u64> = log
        .iter()
        .map(|l| {
            assert_eq!(field(l, "event").as_deref(), Some("close"), "{l}");
            assert_eq!(field(l, "reason").as_deref(), Some("clean"), "{l}");
            assert_eq!(field(l, "bytes_up"), field(l, "bytes_down"), "{l}");
            assert!(field(l, "first_byte_ms").is_some(), "{l}");
            assert!(field(l, "connect_ms").is_some(), "{l}");
            assert!(field(l, "time").is_some_and(|t| t.ends_with('Z')), "{l}");
            field(l, "bytes_up").unwrap().parse().unwrap()
        })
        .collect();
    sizes.sort_unstable();
    assert_eq!(sizes, (1..=20).map(|i| i * 1000).collect::<Vec<u64>>());
    let counted: u64 = summaries(&lines).iter().map(|s| s.get("bytes_up")).sum();
    assert_eq!(counted, sizes.iter().sum::<u64>());
    let ids: std::collections::HashSet<_> = log.iter().map(|l| field(l, "id")).collect();
    assert_eq!(ids.len(), 20, "connection IDs repeat");
}

/// `--access-log-interval`: a live connection gets `event=open` lines with
/// its bytes so far, every interval, then one `close` line; the interval
/// lines stop with it. The idle timeout (7 s, whose quarter does not divide
/// 2 s) must not stretch the interval: lines once came every 3.5 s here.
#[test]
fn a_live_connection_gets_interval_lines_then_its_close_line() {
    let path = temp("interval.log");
    let fwd = Proxy::forward(echo_origin())
        .shards(1)
        .args(["--access-log", &path, "--access-log-interval", "2s"])
        .args(["--idle-timeout", "7s"])
        .start();
    let mut c = TcpStream::connect(fwd.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let data = random_bytes(3000, 7);
    c.write_all(&data).unwrap();
    let mut back = vec![0u8; data.len()];
    c.read_exact(&mut back).unwrap();
    assert_eq!(back, data);
    // Two interval lines while the connection lives (a second apart).
    let open = log_lines(&path, 2);
    assert!(open.len() >= 2, "{open:?}");
    for l in &open {
        assert_eq!(field(l, "event").as_deref(), Some("open"), "{l}");
        assert_eq!(field(l, "bytes_up").as_deref(), Some("3000"), "{l}");
        assert_eq!(field(l, "reason"), None, "{l}");
    }
    assert_eq!(field(&open[0], "id"), field(&open[1], "id"));
    // `"time":"…T12:34:56.789Z"`: seconds of the day.
    let at = |l: &str| -> f64 {
        let t = field(l, "time").unwrap();
        let hms = &t[t.find('T').unwrap() + 1..t.len() - 1];
        hms.split(':')
            .map(|x| x.parse::<f64>().unwrap())
            .fold(0.0, |acc, x| acc * 60.0 + x)
    };
    let gap = (at(&open[1]) - at(&open[0])).rem_euclid(86_400.0); // across midnight
    assert!((1.5..2.9).contains(&gap), "interval lines {gap:.3} s apart");
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(c.read(&mut back).unwrap(), 0, "the echo's FIN comes back");
    let (status, lines) = fwd.terminate();
    assert!(status.success(), "{lines:?}");
    let all = log_lines(&path, 3);
    let closes: Vec<_> = all
        .iter()
        .filter(|l| field(l, "event").as_deref() == Some("close"))
        .collect();
    assert_eq!(closes.len(), 1, "{all:?}");
    assert_eq!(
        all.last().map(|l| field(l, "event")),
        Some(Some("close".into())),
        "{all:?}"
    );
}

/// SIGUSR1 reopens the access log after logrotate renamed it.
#[test]
fn sigusr1_reopens_a_renamed_access_log() {
    let path = temp("rotate.log");
    let fwd = Proxy::forward(echo_origin())
        .shards(1)
        .args(["--access-log", &path, "--access-log-format", "logfmt"])
        .start();
    let mut c = TcpStream::connect(fwd.addr).unwrap();
    assert_eq!(exchange(&mut c, b"one"), b"one");
    log_lines(&path, 1);
    let rotated = format!("{path}.1");
    std::fs::rename(&path, &rotated).unwrap();
    fwd.signal("USR1");
    fwd.wait_for_log(
        |l| l.contains("SIGUSR1: reopening the access log"),
        Duration::from_secs(10),
    );
    let mut c = TcpStream::connect(fwd.addr).unwrap();
    assert_eq!(exchange(&mut c, b"two"), b"two");
    let fresh = log_lines(&path, 1);
    assert_eq!(fresh.len(), 1, "{fresh:?}");
    assert!(fresh[0].contains(" bytes_up=3 "), "{fresh:?}");
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert_eq!(old.lines().count(), 1, "{old}");
    let _ = fwd.terminate();
    let _ = std::fs::remove_file(rotated);
}

/// SIGUSR1 re-checks what start-up checks: an access log replaced by a link
/// to the key file (or the config file) after start-up is not reopened, so
/// no connection's line is appended to the key (which would break the next
/// SIGHUP and the next start); the process keeps writing to the old file.
#[test]
fn sigusr1_never_reopens_the_access_log_onto_the_key_file() {
    let key = key_file(&[&keygen()]);
    let key_before = std::fs::read(&key).unwrap();
    let path = temp("swapped.log");
    // An "exit" that closes every connection at once, on a port this test
    // keeps: a closed port (`dead_port`) can be another test's origin by
    // the time the entry connects, and the entry's hello then broke that
    // test (a fresh-clone CI run).
    let closer = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let exit = closer.local_addr().unwrap();
    thread::spawn(move || {
        for c in closer.incoming() {
            drop(c);
        }
    });
    let entry = Proxy::entry(exit, &key)
        .shards(1)
        .args(["--access-log", &path, "--access-log-format", "logfmt"])
        .start();
    let served = |n: usize| {
        let mut c = TcpStream::connect(entry.addr).unwrap();
        let _ = c.write_all(b"x");
        let mut buf = [0u8; 16];
        let _ = c.read(&mut buf); // the exit closed it: so does the entry
        log_lines(&rotated_or(&path), n)
    };
    fn rotated_or(path: &str) -> String {
        let old = format!("{path}.old");
        if std::path::Path::new(&old).exists() {
            old
        } else {
            path.to_string()
        }
    }
    served(1);
    std::fs::rename(&path, format!("{path}.old")).unwrap();
    std::os::unix::fs::symlink(&key, &path).unwrap();
    entry.signal("USR1");
    let refused = entry.wait_for_log(|l| l.contains("cannot reopen"), Duration::from_secs(10));
    assert!(refused.contains("it is the key file"), "{refused}");
    // The next connection's line goes to the old file, not into the key.
    let old = served(2);
    assert_eq!(old.len(), 2, "{old:?}");
    assert_eq!(
        std::fs::read(&key).unwrap(),
        key_before,
        "the key file was written to"
    );
    let (status, lines) = entry.terminate();
    assert!(status.success(), "{lines:?}");
    assert_eq!(
        std::fs::read(&key).unwrap(),
        key_before,
        "the key file was written to"
    );
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(format!("{path}.old"));
}

/// An access log on a pipe nobody reads: lines are dropped and counted,
/// every connection is still served, and the process still stops.
#[test]
fn a_blocked_access_log_drops_and_counts_lines_and_never_blocks_traffic() {
    use std::os::unix::fs::OpenOptionsExt;
    let path = temp("blocked.fifo");
    let made = Command::new("mkfifo").arg(&path).status().unwrap();
    assert!(made.success());
    // A reader that never reads: the pipe fills after 64 KiB.
    let _reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&path)
        .unwrap();
    let fwd = Proxy::forward(echo_origin())
        .args(["--access-log", &path])
        .start();
    let addr = fwd.addr;
    let workers: Vec<_> = (0..8)
        .map(|w| {
            thread::spawn(move || {
                for i in 0..1000 {
                    let mut c = TcpStream::connect(addr).unwrap();
                    let data = [w as u8, (i % 251) as u8];
                    assert_eq!(exchange(&mut c, &data), data);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let started = Instant::now();
    let (status, lines) = fwd.terminate();
    assert!(status.success(), "{lines:?}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "stopping took {:?}",
        started.elapsed()
    );
    let dropped: u64 = summaries(&lines)
        .iter()
        .map(|s| s.get("access_log_dropped"))
        .sum();
    let served: u64 = summaries(&lines).iter().map(|s| s.get("clean")).sum();
    assert_eq!(served, 8000, "{lines:?}");
    assert!(dropped > 0, "no line was dropped: {lines:?}");
    let _ = std::fs::remove_file(&path);
}

/// Process logs: a dead upstream gets a (rate-limited) line naming the
/// upstream and the client; `--log-format json` lines are JSON objects with
/// an RFC 3339 time; `--log-level error` drops everything less severe.
#[test]
fn process_logs_name_the_failure_side_and_client_with_timestamps() {
    let dead = dead_port();
    let p = Proxy::forward(dead).args(["--log-format", "json"]).start();
    let c = TcpStream::connect(p.addr).unwrap();
    let me = c.local_addr().unwrap();
    let line = p.wait_for_log(|l| l.contains("no upstream"), Duration::from_secs(10));
    assert!(line.contains(&dead.to_string()), "{line}");
    assert!(line.contains(&format!("client {me}")), "{line}");
    assert!(line.starts_with(r#"{"time":"20"#), "{line}");
    assert!(line.contains(r#""level":"warn""#), "{line}");
    assert!(line.contains(&format!(r#""pid":{},"#, p.pid())), "{line}");
    assert!(line.ends_with('}'), "{line}");
    let (_, lines) = p.terminate();
    for l in &lines {
        assert!(
            l.starts_with(r#"{"time":""#) && l.ends_with('}'),
            "not a JSON line: {l}"
        );
    }

    // `--log-level error`: not even the start-up lines (the harness waits
    // for those, so this one is started by hand).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let quiet = Command::new(env!("CARGO_BIN_EXE_shardproxy"))
        .args(["forward", "--listen", &port.to_string(), "--upstream"])
        .arg(dead.to_string())
        .args(["--cores", "1", "--log-level", "error"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    poll_until(Duration::from_secs(10), || {
        TcpStream::connect(port)
            .map(drop)
            .map_err(|e| e.to_string())
    });
    let killed = Command::new("kill")
        .args(["-TERM", &quiet.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = quiet.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        !text.contains(" INFO ") && !text.contains(" WARN "),
        "{text}"
    );
}

/// An access log that cannot take lines: a FIFO nobody reads is a one-line
/// start-up error (never a hang), and on /dev/full every line is counted as
/// dropped while traffic goes on.
#[test]
fn unwritable_access_logs_fail_fast_or_count_every_lost_line() {
    let fifo = temp("noreader.fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shardproxy"));
    cmd.args([
        "forward",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "127.0.0.1:9",
    ])
    .args(["--cores", "1", "--access-log", &fifo]);
    let (status, stderr) = run_bounded(cmd, Duration::from_secs(20)).expect("hung on the FIFO");
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no reader"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    let _ = std::fs::remove_file(&fifo);

    let fwd = Proxy::forward(echo_origin())
        .args(["--access-log", "/dev/full"])
        .start();
    for i in 0..50u64 {
        let mut c = TcpStream::connect(fwd.addr).unwrap();
        assert_eq!(exchange(&mut c, &i.to_le_bytes()), i.to_le_bytes());
    }
    let (status, lines) = fwd.terminate();
    assert!(status.success(), "{lines:?}");
    let dropped: u64 = summaries(&lines)
        .iter()
        .map(|s| s.get("access_log_dropped"))
        .sum();
    assert_eq!(dropped, 50, "{lines:?}");
}

/// Settings of the wrong role, or of a feature that is off, are one-line
/// errors naming the right flag; `check` rejects what start-up would.
#[test]
fn proxy_settings_are_checked_against_the_role_and_the_feature() {
    let key = key_file(&[&keygen()]);
    let run = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shardproxy"));
        cmd.args(args);
        let (status, stderr) = run_bounded(cmd, Duration::from_secs(20)).expect("it started");
        assert_eq!(status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        stderr
    };
    let base = ["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9"];
    let exit: Vec<&str> = ["exit", "--key-file", key.as_str()]
        .into_iter()
        .chain(base)
        .collect();
    let with = |head: &[&str], more: &[&'static str]| -> Vec<String> {
        head.iter().chain(more).map(|s| s.to_string()).collect()
    };
    let e = run(&with(&exit, &["--accept-proxy"])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert!(
        e.contains("--accept-proxy applies to forward and entry"),
        "{e}"
    );
    let e = run(&with(&exit, &["--proxy-trusted-cidrs", "10.0.0.0/8"])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert!(
        e.contains("--proxy-trusted-cidrs applies to forward and entry"),
        "{e}"
    );
    let fwd: Vec<&str> = ["forward"].into_iter().chain(base).collect();
    let e = run(&with(&fwd, &["--proxy-trusted-cidrs", "10.0.0.0/8"])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert!(
        e.contains("--proxy-trusted-cidrs needs --accept-proxy"),
        "{e}"
    );
    let e = run(&with(&fwd, &["--access-log", "/nonexistent-dir/x.log"])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert!(e.contains("--access-log"), "{e}");
    // `check` says the same about a config file.
    let cfg = temp("check.toml");
    std::fs::write(
        &cfg,
        "role = \"forward\"\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\naccess_log = \"/nonexistent-dir/x.log\"\n",
    )
    .unwrap();
    let e = run(&["check", "--config", &cfg]);
    assert!(e.contains("access_log"), "{e}");
}

/// `check` names what changes what the upstream and the operator learn
/// about a client: accepted PROXY headers (from whom, how long to wait),
/// a PROXY v2 header sent upstream, and the access log. Without them in
/// the summary, a config that silently lacks `accept_proxy` looks the same
/// as one that has it.
#[test]
fn check_summarises_the_client_identity_settings() {
    let run = |cfg: &str| {
        let path = temp("summary.toml");
        std::fs::write(&path, cfg).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_shardproxy"))
            .args(["check", "--config", &path])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let base = "role = \"forward\"\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n";
    let plain = run(base);
    for absent in ["PROXY", "access log"] {
        assert!(!plain.contains(absent), "{plain}");
    }
    let log = temp("summary-access.log");
    let full = run(&format!(
        "{base}accept_proxy = true\nproxy_trusted_cidrs = \"10.0.0.0/8,192.0.2.7\"\n\
         proxy_header_timeout = \"2s\"\nsend_proxy_v2 = true\n\
         access_log = \"{log}\"\naccess_log_format = \"logfmt\"\n"
    ));
    let stderr_log = run(&format!(
        "{base}access_log = \"-\"\naccess_log_interval = \"30s\"\n"
    ));
    assert!(
        stderr_log.contains("access log on stderr (json, live connections every 30s)"),
        "{stderr_log}"
    );
    // A file that happens to be named `stderr` is a file: quoted.
    let named = run(&format!("{base}access_log = \"stderr\"\n"));
    assert!(named.contains("access log \"stderr\" (json)"), "{named}");
    let _ = std::fs::remove_file("stderr");
    for want in [
        "PROXY headers accepted from 10.0.0.0/8,192.0.2.7/32 (timeout 2s)",
        "PROXY v2 header sent upstream",
        &format!("access log {log:?} (logfmt)"),
    ] {
        assert!(full.contains(want), "{want:?} missing: {full}");
    }
}

/// An access log on a disk that fills up and then has room again: every
/// connection has a whole line in the file or is counted as dropped (not
/// both), and no record is glued onto the line a failed write cut short.
/// The file is on a 16 KiB tmpfs mounted for the test, grown to 1 MiB
/// halfway. A break-it round found the next record after the ENOSPC
/// appended to the cut line (invalid JSON), and the whole failed batch
/// counted as dropped, the lines already written too.
#[test]
fn an_access_log_on_a_full_disk_loses_whole_lines_only_and_counts_them() {
    let disk = Tmpfs::mount("fulllog", "16k");
    let dir = &disk.dir;
    let path = dir.join("a.log").to_str().unwrap().to_string();
    let fwd = Proxy::forward(echo_origin())
        .shards(1)
        .args(["--access-log", &path])
        .start();
    let full = |l: &str| l.contains("lines are dropped and counted");
    let mut batches = 0;
    while !fwd.log().iter().any(|l| full(l)) {
        batches += 1;
        assert!(batches <= 50, "the disk never filled: {:?}", fwd.log());
        for i in 0..100u64 {
            let mut c = TcpStream::connect(fwd.addr).unwrap();
            assert_eq!(exchange(&mut c, &i.to_le_bytes()), i.to_le_bytes());
        }
        // Each batch reaches the writer within 200 ms: watch for the
        // warning a while before adding more.
        let until = Instant::now() + Duration::from_millis(600);
        while Instant::now() < until && !fwd.log().iter().any(|l| full(l)) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    disk.resize("1m");
    for i in 0..5u64 {
        let mut c = TcpStream::connect(fwd.addr).unwrap();
        assert_eq!(exchange(&mut c, &i.to_le_bytes()), i.to_le_bytes());
    }
    fwd.wait_for_log(
        |l| l.ends_with(&format!("access log: writing {path} works again")),
        Duration::from_secs(10),
    );
    let (status, lines) = fwd.terminate();
    assert!(status.success(), "{lines:?}");
    let accepted: u64 = summaries(&lines).iter().map(|s| s.get("accepted")).sum();
    let dropped: u64 = summaries(&lines)
        .iter()
        .map(|s| s.get("access_log_dropped"))
        .sum();
    let text = std::fs::read_to_string(&path).unwrap();
    let records: Vec<&str> = text.lines().collect();
    for l in &records {
        assert!(
            l.matches(r#"{"time""#).count() <= 1,
            "two records on one line: {l}"
        );
    }
    let whole = records
        .iter()
        .filter(|l| l.starts_with(r#"{"time""#) && l.ends_with('}'))
        .count() as u64;
    assert!(records.len() as u64 - whole <= 1, "more than one cut line");
    assert!(dropped > 0);
    assert_eq!(
        whole + dropped,
        accepted,
        "lines {whole} + dropped {dropped}"
    );
    assert!(records.last().unwrap().ends_with('}'), "the log ends cut");
}

/// The process log, stderr redirected to a file on a disk that fills up
/// and then has room again: no line is glued onto one that a failed write
/// cut short (the sibling of the access-log fault). Debug level logs a
/// line per connection; the file is on a 16 KiB tmpfs, grown to 1 MiB
/// once full.
#[test]
fn the_process_log_on_a_full_disk_never_glues_lines() {
    let disk = Tmpfs::mount("fullerr", "16k");
    let dir = &disk.dir;
    let err = dir.join("err.log");
    let origin = echo_origin();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("exec \"$0\" forward --listen 127.0.0.1:0 --upstream \"$1\" --cores 1 --log-level debug 2>>\"$2\"")
        .arg(env!("CARGO_BIN_EXE_shardproxy"))
        .arg(origin.to_string())
        .arg(&err)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let _kill = KillOnDrop(child.id());
    let mut addr = None;
    poll_until(Duration::from_secs(20), || {
        let text = std::fs::read_to_string(&err).unwrap_or_default();
        addr = text
            .lines()
            .find_map(|l| l.split(" listening on ").nth(1))
            .and_then(|r| r.split(' ').next())
            .and_then(|a| a.parse::<SocketAddr>().ok());
        addr.map(|_| ()).ok_or("not listening yet")
    });
    let addr = addr.unwrap();
    let run = |n: u64| {
        for i in 0..n {
            let mut c = TcpStream::connect(addr).unwrap();
            assert_eq!(exchange(&mut c, &i.to_le_bytes()), i.to_le_bytes());
        }
    };
    // Full: the file stops growing under more connections.
    let mut batches = 0;
    loop {
        let before = std::fs::metadata(&err).unwrap().len();
        run(50);
        batches += 1;
        let grew = poll_size(&err, before);
        if !grew {
            break;
        }
        assert!(batches <= 100, "the disk never filled");
    }
    disk.resize("1m");
    run(20);
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let text = std::fs::read_to_string(&err).unwrap();
    let pid = format!(" [{}] ", child.id());
    for l in text.lines() {
        assert!(l.matches(&pid).count() <= 1, "two lines glued: {l}");
    }
    assert!(
        text.contains("all shards stopped"),
        "no line after the disk had room"
    );
}

/// Whether `path` grows past `before` within a second (the log writer
/// writes within milliseconds when it can).
fn poll_size(path: &std::path::Path, before: u64) -> bool {
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        if std::fs::metadata(path).map(|m| m.len()).unwrap_or(0) > before {
            return true;
        }
        thread::sleep(Duration::from_millis(10));
    }
    false
}
