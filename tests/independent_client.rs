//! The Python implementation in tests/tunnel_client.py, written from
//! docs/PROTOCOL.md with OpenSSL (the `cryptography` package), must agree
//! with the Rust code: on the documented vector, and against a live exit.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;

#[test]
fn python_recomputes_the_documented_vector() {
    let doc = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/PROTOCOL.md");
    if let Some(out) = tunnel_client(&["vectors", doc]) {
        assert!(out.contains("vectors ok"), "{out}");
    }
}

#[test]
fn python_client_talks_to_a_live_exit() {
    let key = keygen();
    let exit = Proxy::exit(echo_origin(), &key_file(&[&key])).start();
    // 10 MiB: over 600 chunks each way, so the length masks cross from the
    // first 512-chunk keystream into the second.
    let unit = "hello from python, ".repeat(50); // 950 bytes
    let repeat = (10 << 20) / unit.len();
    let expected = unit.repeat(repeat);
    let Some(out) = tunnel_client(&[
        "send",
        &exit.addr.to_string(),
        &key,
        &unit,
        &repeat.to_string(),
    ]) else {
        return;
    };
    let digest = hex(sha256(expected.as_bytes()));
    let want = format!("reply sha256 {digest} len {} ended=True", expected.len());
    assert_eq!(out.trim(), want);
}

/// PROTOCOL.md §4: data after the end chunk is fatal. An entry (here the
/// independent client) that sends a chunk after its end chunk gets an RST,
/// and the origin sees an RST, not a clean end, and never those bytes.
#[test]
fn data_after_the_end_chunk_resets_the_exit_and_its_origin() {
    let key = keygen();
    let (origin, seen) = recording_origin();
    let exit = Proxy::exit(origin, &key_file(&[&key])).start();
    let Some(out) = tunnel_client(&["after-end", &exit.addr.to_string(), &key, "before the end"])
    else {
        return;
    };
    assert_eq!(out.trim(), "exit ended the connection: reset");
    let s = seen.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(s.end, End::Reset, "the origin saw {:?}", s.end);
    assert_eq!(s.bytes, b"before the end");
}

/// Tells a fake exit waiting on stdin to answer the hello.
fn go(fake: &mut std::process::Child) {
    fake.stdin.take().unwrap().write_all(b"go\n").unwrap();
}

/// The same in the other direction: an exit (the independent client acting
/// as one) that sends a chunk after its end chunk resets the entry's client.
#[test]
fn data_after_the_end_chunk_resets_the_entry_and_its_client() {
    let Some((fake, entry)) = fake_exit("fake-exit", &["from the fake exit"], &[]) else {
        return;
    };
    let mut c = std::net::TcpStream::connect(entry.addr).unwrap();
    c.write_all(b"hi").unwrap();
    let (end, n) = read_until_end(&mut c, Duration::from_secs(10));
    assert_eq!(
        end,
        End::Reset,
        "the entry's client saw {end:?} after {n} bytes"
    );
    assert!(n <= b"from the fake exit".len(), "{n} bytes");
    assert_eq!(fake_output(fake), "entry ended the connection: reset");
}

/// The entry's first flight, through a fake exit that answers the hello
/// only once the client's bytes wait at the entry: returns what the fake
/// exit reports (data segments it received for them, the first chunk's
/// size, whether the data arrived intact).
fn first_flight(entry_args: &[&str], data: &str) -> Option<String> {
    let (mut fake, entry) = fake_exit("first-flight", &[data], entry_args)?;
    let mut c = std::net::TcpStream::connect(entry.addr).unwrap();
    // On loopback the write has reached the entry's socket when it returns.
    c.write_all(data.as_bytes()).unwrap();
    // The fake exit has the hello once the entry is connected to it; it
    // answers now, with the data already waiting at the entry.
    go(&mut fake);
    Some(fake_output(fake))
}

/// A client that sent its request before the exit answered gets it carried
/// in the same segment as the key confirmation: one TCP segment with data
/// reaches the exit for both, counted by the fake exit's `TCP_INFO`
/// (`tcpi_data_segs_in`), where a separate confirmation makes two.
#[test]
fn the_key_confirmation_carries_the_clients_first_data() {
    if let Some(out) = first_flight(&[], "GET / HTTP/1.0") {
        assert_eq!(out, "1 segment(s): confirmation + 14-byte chunk, data ok");
    }
}

/// The first flight's chunk is capped by `--buffer-size`, as every chunk
/// the relay seals (it took up to 16 KiB whatever the setting).
#[test]
fn the_first_flight_honours_buffer_size() {
    let data = "x".repeat(3000);
    if let Some(out) = first_flight(&["--buffer-size", "1KiB"], &data) {
        assert!(
            out.ends_with("confirmation + 1024-byte chunk, data ok"),
            "{out}"
        );
    }
}

/// A client's FIN becomes the end chunk and the tunnel's FIN in one TCP
/// segment (`MSG_MORE`, then `shutdown`): the fake exit counts every
/// segment (ACKs included) that brings them, where a separate FIN makes
/// two.
#[test]
fn the_end_chunk_and_fin_share_a_segment() {
    let Some((mut fake, entry)) = fake_exit("end-fin", &["last words"], &[]) else {
        return;
    };
    let mut c = std::net::TcpStream::connect(entry.addr).unwrap();
    c.write_all(b"last words").unwrap();
    // Half-close only once the data is at the fake exit, so that what it
    // counts next is the end chunk and FIN alone.
    let mut out = std::io::BufReader::new(fake.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "data in");
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let _ = fake.wait();
    assert_eq!(rest.trim(), "end chunk and FIN in 1 segment(s)");
}

/// A client that resets while the entry's handshake is under way: the
/// entry's look for early data meets the reset, and the tunnel is aborted
/// (RST), never ended cleanly with an end chunk. The kernel reports a
/// socket's reset once, so a read that dropped it left the next read a
/// clean EOF (found by a break-it run of the first flight).
#[test]
fn a_client_reset_during_the_handshake_is_never_a_clean_end() {
    let Some((mut fake, entry)) = fake_exit("first-flight-end", &[], &[]) else {
        return;
    };
    let c = std::net::TcpStream::connect(entry.addr).unwrap();
    // Close with SO_LINGER 0: on loopback the RST is at the entry's socket
    // when this returns, before the fake exit answers the hello.
    socket2::SockRef::from(&c)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(c);
    go(&mut fake);
    let out = fake_output(fake);
    assert!(out.starts_with("reset after"), "{out}");
    // Nothing moved either way: a probe, whatever the tunnel was doing.
    let (_, lines) = entry.terminate();
    assert_eq!(summaries(&lines)[0].get("empty"), 1, "{lines:?}");
}

/// The exit does not ACK a hello on its own: the ACK rides on the server
/// hello (quick ACKs are off on the exit's listener), so the entry receives
/// one segment for "ACK + answer", not two. Five handshakes, and at least one
/// must show it: a delayed-ACK timer (40 ms) firing before a busy machine's
/// answer may add the separate ACK back now and then, but a build with
/// quick ACKs sends it every time.
#[test]
fn the_exit_acks_the_hello_with_its_answer() {
    let key = keygen();
    let (origin, _seen) = recording_origin();
    let exit = Proxy::exit(origin, &key_file(&[&key])).start();
    let Some(out) = tunnel_client(&["hello-acks", &exit.addr.to_string(), &key, "5"]) else {
        return;
    };
    let counts: Vec<u32> = out
        .trim()
        .strip_prefix("segments per server hello: ")
        .unwrap_or_else(|| panic!("{out}"))
        .split(' ')
        .map(|c| c.parse().unwrap())
        .collect();
    assert_eq!(counts.len(), 5, "{out}");
    assert_eq!(counts.iter().min(), Some(&1), "{out}");
}

/// Protocol v2: an entry that never sends the key confirmation (here a valid
/// hello followed by a data chunk in its place) never makes the exit open an
/// origin connection, and its data goes nowhere.
#[test]
fn without_the_key_confirmation_the_origin_is_never_contacted() {
    let key = keygen();
    let (origin, seen) = recording_origin();
    let exit = Proxy::exit(origin, &key_file(&[&key])).start();
    let Some(out) = tunnel_client(&["no-confirm", &exit.addr.to_string(), &key, "smuggled"]) else {
        return;
    };
    assert_ne!(out.trim(), "exit ended the connection: open", "{out}");
    let (_, lines) = exit.terminate();
    // Once the exit is gone, any origin connection would have ended.
    assert!(
        seen.recv_timeout(Duration::from_secs(3)).is_err(),
        "the origin was contacted: {lines:?}"
    );
    assert_eq!(summaries(&lines)[0].get("auth_failed"), 1, "{lines:?}");
}

/// An entry that gives up after an authenticated hello (its own client went
/// away: a FIN, or an RST as from a load balancer's connect-and-reset health
/// check) is counted as an abandoned handshake, not as a failed one: an
/// operator reads `handshake_failures` as probing or a key mismatch. A bad
/// confirmation still counts as a failure, and no origin is contacted in
/// either case.
#[test]
fn an_entry_that_gives_up_after_its_hello_is_not_a_handshake_failure() {
    let key = keygen();
    let (origin, seen) = recording_origin();
    let exit = Proxy::exit(origin, &key_file(&[&key]))
        .args(["--metrics-listen", "127.0.0.1:0"])
        .start();
    let metrics = exit.metrics_addr();
    let addr = exit.addr.to_string();
    for how in ["close", "reset"] {
        let Some(out) = tunnel_client(&["abandon", &addr, &key, how]) else {
            return;
        };
        assert_eq!(out.trim(), format!("abandoned with a {how}"), "{out}");
    }
    tunnel_client(&["no-confirm", &addr, &key, "smuggled"]).expect("python client");
    let value = |body: &str, name: &str| metric_sum(body, name, &[]);
    // The exit counts each one once it has seen its end: wait for all three.
    let body = poll_until(Duration::from_secs(10), || {
        let (_, body) = http_get(metrics, "/metrics");
        let done = value(&body, "shardproxy_handshakes_abandoned_total")
            + value(&body, "shardproxy_handshake_failures_total");
        if done >= 3 {
            Ok(body)
        } else {
            Err(format!("{done} of 3 handshakes counted"))
        }
    });
    assert_eq!(
        value(&body, "shardproxy_handshakes_abandoned_total"),
        2,
        "{body}"
    );
    assert_eq!(
        value(&body, "shardproxy_handshake_failures_total"),
        1,
        "{body}"
    );
    // Closed as what they were: the FIN a truncated tunnel, the RST a
    // reset; only the bad confirmation is an authentication failure.
    let reason = |r: &str| {
        let label = format!("reason=\"{r}\"");
        metric_sum(&body, "shardproxy_connections_closed_total", &[&label])
    };
    assert_eq!(
        (
            reason("truncated"),
            reason("downstream_reset"),
            reason("auth_failed")
        ),
        (1, 1, 1),
        "{body}"
    );
    let (_, lines) = exit.terminate();
    assert!(
        seen.recv_timeout(Duration::from_secs(3)).is_err(),
        "the origin was contacted: {lines:?}"
    );
    let abandoned: u64 = summaries(&lines)
        .iter()
        .map(|s| s.get("handshakes_abandoned"))
        .sum();
    assert_eq!(abandoned, 2, "{lines:?}");
}

/// A hello stamped as far ahead as the exit allows (an entry whose clock
/// runs `--max-clock-skew` fast) passes the clock check for up to twice the
/// skew after it was first seen, so the replay set must remember it that
/// long: a replay 1.5 skews later (clock check passed, a one-skew memory
/// would have forgotten it) gets nothing back.
#[test]
fn a_hello_stamped_ahead_cannot_be_replayed_late_in_its_window() {
    let key = keygen();
    let exit = Proxy::exit(echo_origin(), &key_file(&[&key]))
        .args(["--max-clock-skew", "1s", "--handshake-timeout", "1s"])
        .start();
    // Stamped 1 s ahead: still accepted.
    let Some(out) = tunnel_client(&["stamped", &exit.addr.to_string(), &key, "999"]) else {
        return;
    };
    let hello: Vec<u8> = (0..out.trim().len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&out.trim()[i..i + 2], 16).unwrap())
        .collect();
    assert_eq!(hello.len(), 124, "{out}");
    let seen_at = std::time::Instant::now();
    let replay = || {
        let mut c = std::net::TcpStream::connect(exit.addr).unwrap();
        c.write_all(&hello).unwrap();
        read_until_end(&mut c, Duration::from_secs(10)).1
    };
    assert_eq!(replay(), 0, "an immediate replay was answered");
    // 1.5 s after it was first seen, its timestamp (1 s ahead) is 0.5 s
    // behind our clock: it still passes the 1 s clock check.
    let at = Duration::from_millis(1500);
    if let Some(wait) = at.checked_sub(seen_at.elapsed()) {
        // The wait is the input under test (when the replay arrives).
        std::thread::sleep(wait);
    }
    assert_eq!(replay(), 0, "a replay 1.5 s later was answered");
}

/// The byte pattern tests/tunnel_client.py's `pattern()` sends.
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| ((i * 7 + (i >> 8)) & 0xff) as u8).collect()
}

fn hex(d: [u8; 32]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The number after `key=` in a line of tunnel_client.py's output.
fn field(out: &str, key: &str) -> usize {
    let at = out.find(key).unwrap_or_else(|| panic!("no {key} in {out}")) + key.len();
    out[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {key} in {out}"))
}

/// PROTOCOL.md §2–§4, large chunks, against the independent implementation
/// as an entry: an exit accepts them when the hello offers them, and then
/// sends its own transfer's bytes in chunks above 16 KiB, every byte intact
/// and the end clean; an exit run with `--large-chunks=false`, or a hello
/// that does not offer them (an older entry), keeps both directions at
/// 16 KiB (the independent decoder rejects anything larger).
#[test]
fn an_exit_agrees_to_large_chunks_only_when_both_sides_offer_them() {
    let key = keygen();
    let n = 4 << 20;
    let want = format!(
        "reply sha256 {} len {n} ended=True error=None",
        hex(sha256(&pattern(n)))
    );
    for (exit_args, offer, agreed) in [
        (&[][..], "on", true),
        (&["--large-chunks=false"][..], "on", false),
        (&[][..], "off", false),
    ] {
        let exit = Proxy::exit(echo_origin(), &key_file(&[&key]))
            .args(exit_args)
            .start();
        let Some(out) =
            tunnel_client(&["large", &exit.addr.to_string(), &key, &n.to_string(), offer])
        else {
            return;
        };
        let case = format!("exit {exit_args:?}, offer {offer}: {out}");
        assert!(
            out.contains(&format!("agreed={}", if agreed { "True" } else { "False" })),
            "{case}"
        );
        assert!(out.contains(&want), "{case}");
        let largest = field(&out, "largest_received=");
        if agreed {
            // The echo is a transfer: the exit seals whole 64 KiB reads.
            assert!((16385..=65472).contains(&largest), "{case}");
            assert_eq!(field(&out, "largest_sent="), 65472, "{case}");
        } else {
            assert!((1..=16384).contains(&largest), "{case}");
        }
    }
}

/// The same, with the independent implementation as the exit: an entry
/// offers large chunks (unless `--large-chunks=false`), opens the exit's
/// 64 KiB chunks for its client intact, and sends its own client's transfer
/// in chunks above 16 KiB once agreed.
#[test]
fn an_entry_offers_large_chunks_and_uses_them_once_agreed() {
    use std::io::Read;
    let (down, up) = (3 << 20, 2 << 20);
    for (entry_args, offered) in [(&[][..], true), (&["--large-chunks=false"][..], false)] {
        let Some((fake, entry)) = fake_exit("fake-exit-large", &[&down.to_string()], entry_args)
        else {
            return;
        };
        let mut c = std::net::TcpStream::connect(entry.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut w = c.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            w.write_all(&pattern(up)).unwrap();
            w.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let mut got = Vec::new();
        c.read_to_end(&mut got).expect("a clean end from the entry");
        writer.join().unwrap();
        assert!(
            got == pattern(down),
            "{} bytes, not the fake exit's {down}",
            got.len()
        );
        let out = fake_output(fake);
        let case = format!("entry {entry_args:?}: {out}");
        assert!(
            out.contains(&format!(
                "offered={}",
                if offered { "True" } else { "False" }
            )),
            "{case}"
        );
        assert!(
            out.contains(&format!(
                "received sha256 {} len {up}",
                hex(sha256(&pattern(up)))
            )),
            "{case}"
        );
        let largest = field(&out, "largest_received=");
        if offered {
            assert!((16385..=65472).contains(&largest), "{case}");
        } else {
            assert!((1..=16384).contains(&largest), "{case}");
        }
    }
}

/// docs/PROTOCOL.md §3.1 from an independent entry: an exit that agrees to
/// the connect status sends status 0 as its first chunk once it reached the
/// origin, then the reply; one whose origin is down sends status 1 and its
/// FIN, and nothing of the session reached an origin.
#[test]
fn python_entry_reads_the_connect_status() {
    let key = keygen();
    let exit = Proxy::exit(echo_origin(), &key_file(&[&key])).start();
    let Some(out) = tunnel_client(&["connect-status", &exit.addr.to_string(), &key, "hello"])
    else {
        return;
    };
    assert_eq!(
        out.trim(),
        "agreed=True status=0 reply=b'hello' ended=True closed=eof"
    );
    let exit = Proxy::exit(dead_port(), &key_file(&[&key])).start();
    let out = tunnel_client(&["connect-status", &exit.addr.to_string(), &key, "hello"]).unwrap();
    assert_eq!(
        out.trim(),
        "agreed=True status=1 reply=b'' ended=False closed=eof"
    );
    let (_, lines) = exit.terminate();
    let refused: u64 = summaries(&lines).iter().map(|s| s.get("refused")).sum();
    assert_eq!(refused, 1, "{lines:?}");
}

/// docs/PROTOCOL.md §2.1 type 4 and §3.1 from the independent entry: an
/// exit whose origin swallows connects, and whose own handshake timeout is
/// 30 s, refuses within the 1 s patience the entry sent (before, it gave up
/// at 27 s, long after the entry).
#[test]
fn an_exit_answers_within_an_independent_entrys_patience() {
    let (hole, _listener, _fill) = black_hole_on(SocketAddr::from(([127, 0, 0, 1], 0)));
    let key = keygen();
    let exit = Proxy::exit(hole, &key_file(&[&key]))
        .args(["--connect-timeout", "10s", "--handshake-timeout", "30s"])
        .start();
    let addr = exit.addr.to_string();
    let Some(out) = tunnel_client(&["connect-status", &addr, &key, "hello", "1000"]) else {
        return;
    };
    assert_eq!(
        out.trim(),
        "agreed=True status=1 reply=b'' ended=False closed=eof in_time=True"
    );
    let (_, lines) = exit.terminate();
    refused_once_for_a_connect_timeout(&lines);
    // A patience of 0 (a peer with the key, not an entry of ours) counts as
    // the least an entry can have, 100 ms: a live origin is still reached
    // (before, every such session was refused, logged as an origin timeout).
    let exit = Proxy::exit(echo_origin(), &key_file(&[&key])).start();
    let addr = exit.addr.to_string();
    let out = tunnel_client(&["connect-status", &addr, &key, "hello", "0"]).unwrap();
    assert_eq!(
        out.trim(),
        "agreed=True status=0 reply=b'hello' ended=True closed=eof in_time=False"
    );
}

/// docs/PROTOCOL.md §3.1 from an independent exit: an entry with another
/// exit to go to offers the connect status, reads status 0 before the
/// reply, and relays the session (one with no other exit does not offer
/// it); a refusal ends the tunnel, and once no exit is left the client is
/// closed rather than left waiting.
#[test]
fn our_entry_reads_an_independent_connect_status() {
    use std::io::Read;
    // The second exit: nothing listens there (round robin tries it second).
    let other = dead_port().to_string();
    let two = ["--upstream", other.as_str(), "--balance", "round-robin"];
    for (args, offered) in [(&two[..], "True"), (&[][..], "False")] {
        let Some((fake, entry)) = fake_exit("fake-exit-status", &["0"], args) else {
            return;
        };
        let data = std::sync::Arc::new(random_bytes(30_000, 3));
        let back = echo_round_trip(entry.addr, data.clone());
        assert!(back == *data, "{} bytes back", back.len());
        assert_eq!(
            fake_output(fake),
            format!("offered={offered} served 30000 byte(s) ended=True closed=eof")
        );
    }

    let Some((fake, entry)) = fake_exit("fake-exit-status", &["1"], &two) else {
        return;
    };
    let mut c = std::net::TcpStream::connect(entry.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"first bytes").unwrap();
    let mut back = Vec::new();
    let read = c.read_to_end(&mut back);
    assert!(back.is_empty(), "{back:?}");
    assert!(
        read.is_ok()
            || read
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "the client was left waiting: {read:?}"
    );
    let out = fake_output(fake);
    assert!(out.starts_with("offered=True refused, "), "{out}");
    let (_, lines) = entry.terminate();
    assert!(
        lines.iter().any(|l| l.contains("refused")),
        "the refusal is not logged or counted: {lines:?}"
    );
}

/// docs/PROTOCOL.md §3.1: an exit that closes the tunnel (FIN) before its
/// status served nothing (it sends nothing to an origin before status 0,
/// and its FIN follows all it wrote), so the entry sends the client to its
/// other exit. A killed exit's kernel does this.
#[test]
fn an_exit_that_closes_before_its_status_sends_the_client_elsewhere() {
    let Some((fake, fake_addr, key)) = fake_exit_at("fake-exit-status", &["eof"]) else {
        return;
    };
    let key = key_file(&[&key]);
    let b = Proxy::exit(echo_origin(), &key).start();
    let entry = Proxy::entry(fake_addr, &key)
        .round_robin_with(b.addr)
        .start();
    let data = std::sync::Arc::new(random_bytes(5000, 9));
    let back = echo_round_trip(entry.addr, data.clone());
    assert!(back == *data, "{} bytes back", back.len());
    assert_eq!(fake_output(fake), "offered=True closed unanswered");
    let (_, lines) = entry.terminate();
    let clean: u64 = summaries(&lines).iter().map(|s| s.get("clean")).sum();
    assert_eq!(clean, 1, "{lines:?}");
}
