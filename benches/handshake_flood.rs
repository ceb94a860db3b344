//! A real entry's handshakes while an exit holds a flood of pending
//! half-hellos (connections that sent 50 bytes and wait), against the same
//! exit idle: the `--max-handshakes` budget (oldest closed first) must keep
//! the flood from delaying or locking out legitimate tunnels.
//!
//! Each sample is one fresh client connection through the entry: connect,
//! 1 KiB echo, close, which includes the tunnel handshake. Reports the p50
//! and p99 of that time, idle and under the flood, and their ratio.
//!
//! Run: `cargo bench --bench handshake_flood` (`FLOOD_CONNS`, default 2000;
//! `FLOOD_SAMPLES`, default 300). Results go in docs/BENCHMARKS.md.
//! Loopback only; every loop is bounded in time and count.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use hdrhistogram::Histogram;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn sample(entry: SocketAddr, n: usize) -> Histogram<u64> {
    let mut h = Histogram::<u64>::new(3).unwrap();
    let data = vec![5u8; 1024];
    let mut back = vec![0u8; 1024];
    for _ in 0..n {
        let t = Instant::now();
        let mut c = TcpStream::connect(entry).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        c.write_all(&data).unwrap();
        c.read_exact(&mut back).unwrap();
        drop(c);
        h.record(t.elapsed().as_micros() as u64).unwrap();
    }
    h
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let flood_n = env("FLOOD_CONNS", 2000);
    let samples = env("FLOOD_SAMPLES", 300);
    let origin = echo_origin();
    let dir = std::env::temp_dir().join(format!("shardproxy-flood-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("psk");
    keygen_to(&key);
    let (exit_addr, entry_addr) = (free_port(), free_port());
    let _exit = Target {
        name: "exit",
        addr: exit_addr,
        children: vec![spawn_role(
            "exit",
            exit_addr,
            origin,
            &key,
            &["--cpu-list", "1", "--max-handshakes", "1024"],
        )],
    };
    let _entry = Target {
        name: "entry",
        addr: entry_addr,
        children: vec![spawn_role(
            "entry",
            entry_addr,
            exit_addr,
            &key,
            &["--cpu-list", "0"],
        )],
    };
    wait_listening(exit_addr);
    wait_listening(entry_addr);
    let idle = sample(entry_addr, samples);
    let mut flood = Vec::with_capacity(flood_n);
    let half = vec![0x42u8; 50];
    for _ in 0..flood_n {
        if let Ok(mut c) = TcpStream::connect(exit_addr) {
            let _ = c.write_all(&half);
            flood.push(c);
        }
    }
    let loaded = sample(entry_addr, samples);
    let held = flood.len();
    drop(flood);
    println!(
        "{samples} fresh tunnels (connect + 1 KiB echo + close) through entry → exit, one shard each; exit --max-handshakes 1024\n"
    );
    println!("| exit state | p50 | p99 | max |");
    println!("|---|---|---|---|");
    for (name, h) in [
        ("idle", &idle),
        (&*format!("{held} pending half-hellos"), &loaded),
    ] {
        println!(
            "| {name} | {} µs | {} µs | {} µs |",
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.max()
        );
    }
    println!(
        "\np99 under the flood / idle p99: {:.2}×",
        loaded.value_at_quantile(0.99) as f64 / idle.value_at_quantile(0.99).max(1) as f64
    );
    let _ = std::fs::remove_dir_all(&dir);
}
