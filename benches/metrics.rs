//! What metrics cost: the encrypted pair with metrics off, on, and on while
//! both endpoints are scraped every 100 ms, in one run, interleaved over
//! several rounds (medians reported).
//!
//! Run: `cargo bench --bench metrics` (`BENCH_SECS=N` per cell, default 3;
//! `BENCH_ROUNDS=N`, default 5). Each round rotates which variant goes first,
//! so slow drift of the machine does not favour one. Besides rates and p99,
//! it reports the proxies' CPU-seconds per 100k requests, the figure that
//! survives a noisy machine. Loopback only, bounded.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Off,
    On,
    OnScraped,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Off => "metrics off",
            Variant::On => "metrics on",
            Variant::OnScraped => "metrics on, scraped every 100 ms",
        }
    }
}

/// Scrapes `/metrics` on every address every 100 ms until stopped.
fn scraper(
    addrs: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            for a in &addrs {
                if let Ok(mut c) = TcpStream::connect(a) {
                    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                    let _ = c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
                    let mut body = Vec::new();
                    if c.read_to_end(&mut body).is_ok() && body.starts_with(b"HTTP/1.1 200") {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            thread::sleep(Duration::from_millis(100));
        }
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let (echo, sink) = (echo_origin(), sink_origin());
    let variants = [Variant::Off, Variant::On, Variant::OnScraped];
    // results[variant] = (req/s, p99 µs, bulk GB/s) per round
    let mut rps = vec![Vec::new(); 3];
    let mut p99 = vec![Vec::new(); 3];
    let mut gbps = vec![Vec::new(); 3];
    let mut cpu = vec![Vec::new(); 3];
    let mut scrapes = 0u64;
    for round in 0..rounds {
        for k in 0..variants.len() {
            let i = (k + round) % variants.len();
            let v = &variants[i];
            let (m_entry, m_exit) = (free_port(), free_port());
            let flags = |m: SocketAddr| -> Vec<String> {
                if *v == Variant::Off {
                    Vec::new()
                } else {
                    vec!["--metrics-listen".into(), m.to_string()]
                }
            };
            for (origin, small) in [(echo, true), (sink, false)] {
                let pair = encrypted_pair_with(origin, &flags(m_entry), &flags(m_exit));
                let stop = Arc::new(AtomicBool::new(false));
                let count = Arc::new(AtomicU64::new(0));
                let scrape = (*v == Variant::OnScraped)
                    .then(|| scraper(vec![m_entry, m_exit], stop.clone(), count.clone()));
                let start = std::time::Instant::now();
                let cpu0 = pair.cpu_secs();
                if small {
                    let h = request_response(pair.addr, 50);
                    rps[i].push(h.len() as f64 / start.elapsed().as_secs_f64());
                    p99[i].push(h.value_at_quantile(0.99) as f64);
                    cpu[i].push((pair.cpu_secs() - cpu0) / (h.len() as f64 / 1e5));
                } else {
                    let bytes = bulk(pair.addr, 1);
                    gbps[i].push(bytes as f64 / 1e9 / start.elapsed().as_secs_f64());
                }
                stop.store(true, Ordering::Relaxed);
                if let Some(s) = scrape {
                    s.join().unwrap();
                    scrapes += count.load(Ordering::Relaxed);
                }
            }
        }
    }
    assert!(scrapes > 0, "the scraper never got a 200");
    println!("{rounds} rounds, medians; {scrapes} successful scrapes in the scraped cells");
    println!(
        "| variant | 1 KiB req/resp ×50 | p99 | CPU-s/100k req | bulk 1 stream | vs off (req/s, p99, CPU, GB/s) |"
    );
    println!("|---|---|---|---|---|---|");
    let m = |v: &[Vec<f64>], i: usize| median(v[i].clone());
    for (i, v) in variants.iter().enumerate() {
        let pct = |x: &[Vec<f64>]| (m(x, i) / m(x, 0) - 1.0) * 100.0;
        println!(
            "| {} | {:.0} req/s | {:.0} µs | {:.3} | {:.2} GB/s | {:+.1}%, {:+.1}%, {:+.1}%, {:+.1}% |",
            v.name(),
            m(&rps, i),
            m(&p99, i),
            m(&cpu, i),
            m(&gbps, i),
            pct(&rps),
            pct(&p99),
            pct(&cpu),
            pct(&gbps)
        );
    }
}
