//! Time to first byte through the encrypted pair with 20 ms of round-trip
//! time on the entry↔exit path, against a direct connection over the same
//! path. This kernel has no netem, so the "network" is a delaying relay: it
//! waits one RTT before it connects onward (the TCP handshake) and holds
//! every chunk half an RTT in each direction.
//!
//! Expected: direct = connect RTT + request + response = 2 RTT; the pair adds
//! exactly one RTT (hello → server hello) on top.
//!
//! Run: `cargo bench --bench ttfb` (`TTFB_SAMPLES`, default 40).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const RTT: Duration = Duration::from_millis(20);

/// A relay to `target` that adds `RTT` to connects and `RTT / 2` per chunk
/// per direction.
fn delaying_relay(target: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for inbound in listener.incoming().flatten() {
            thread::spawn(move || {
                thread::sleep(RTT); // SYN, SYN-ACK
                let Ok(outbound) = TcpStream::connect(target) else {
                    return;
                };
                let _ = outbound.set_nodelay(true);
                let _ = inbound.set_nodelay(true);
                let pipe = |mut from: TcpStream, mut to: TcpStream| {
                    thread::spawn(move || {
                        let mut buf = [0u8; 64 * 1024];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 {
                                let _ = to.shutdown(std::net::Shutdown::Write);
                                return;
                            }
                            thread::sleep(RTT / 2);
                            if to.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    })
                };
                let a = pipe(inbound.try_clone().unwrap(), outbound.try_clone().unwrap());
                let b = pipe(outbound, inbound);
                let _ = a.join();
                let _ = b.join();
            });
        }
    });
    addr
}

/// Connect, send one byte, wait for its echo: the time to first byte.
fn ttfb(addr: SocketAddr) -> Duration {
    let t = Instant::now();
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_nodelay(true).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    c.read_exact(&mut b).unwrap();
    t.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let samples: usize = std::env::var("TTFB_SAMPLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let origin = echo_origin();
    let direct_path = delaying_relay(origin);

    let dir = std::env::temp_dir().join(format!("shardproxy-ttfb-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("psk");
    keygen_to(&key);
    let (exit_addr, entry_addr) = (free_port(), free_port());
    let spawn = |role, listen, up| spawn_role(role, listen, up, &key, &["--cores", "1"]);
    let mut exit = spawn("exit", exit_addr, origin);
    wait_listening(exit_addr);
    let tunnel_path = delaying_relay(exit_addr);
    let mut entry = spawn("entry", entry_addr, tunnel_path);
    wait_listening(entry_addr);
    // wait_listening connected once through each; let those settle.
    thread::sleep(Duration::from_millis(200));

    let mut direct = Vec::new();
    let mut pair = Vec::new();
    for _ in 0..samples {
        direct.push(ttfb(direct_path));
        pair.push(ttfb(entry_addr));
    }
    let (d, p) = (median(direct), median(pair));
    println!(
        "| path | median TTFB ({samples} samples), {} ms RTT |",
        RTT.as_millis()
    );
    println!("|---|---|");
    println!(
        "| direct (client → delayed path → origin) | {:.1} ms |",
        d.as_secs_f64() * 1e3
    );
    println!(
        "| entry → delayed path → exit → origin | {:.1} ms |",
        p.as_secs_f64() * 1e3
    );
    println!(
        "| difference | {:.1} ms = {:.2} RTT |",
        (p.as_secs_f64() - d.as_secs_f64()) * 1e3,
        (p.as_secs_f64() - d.as_secs_f64()) / RTT.as_secs_f64()
    );
    for p in [&mut exit, &mut entry] {
        let _ = p.kill();
        let _ = p.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
