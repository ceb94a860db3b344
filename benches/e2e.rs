//! End-to-end benchmark: client → proxy A → proxy B → origin, on loopback.
//!
//! Compares, in one run, a direct connection, a chained pair of
//! `shardproxy forward`, the encrypted `entry` + `exit` pair, and (when
//! `haproxy` is installed) a chained pair of HAProxy in TCP mode. Reports throughput/latency and, the robust figure on
//! a noisy machine, the proxies' CPU-seconds (utime+stime from /proc) per GB
//! and per 100k requests.
//!
//! Run: `cargo bench --bench e2e` (optionally `BENCH_SECS=5`).
//! Every loop is bounded in time and count; every address is 127.0.0.1.

mod common;

use std::net::SocketAddr;
use std::time::Instant;

use common::*;

// ---------- driver ----------

struct Row {
    target: &'static str,
    scenario: &'static str,
    rate: String,
    latency: String,
    cpu: String,
}

fn measure(
    target: Option<&Target>,
    direct: SocketAddr,
    scenario: &'static str,
    rows: &mut Vec<Row>,
) {
    let addr = target.map(|t| t.addr).unwrap_or(direct);
    let name = target.map(|t| t.name).unwrap_or("direct");
    let cpu0 = target.map(Target::cpu_secs).unwrap_or(0.0);
    let start = Instant::now();
    let (rate, latency, per_unit) = match scenario {
        "bulk 1 stream" | "bulk 8 streams" => {
            let streams = if scenario == "bulk 1 stream" { 1 } else { 8 };
            let bytes = bulk(addr, streams);
            let gb = bytes as f64 / 1e9;
            let el = start.elapsed().as_secs_f64();
            (
                format!("{:.2} GB/s", gb / el),
                String::from("-"),
                (gb, "GB"),
            )
        }
        "1 KiB req/resp ×50" => {
            let h = request_response(addr, 50);
            let el = start.elapsed().as_secs_f64();
            let lat = format!(
                "p50 {}µs p99 {}µs p99.9 {}µs",
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.99),
                h.value_at_quantile(0.999)
            );
            (
                format!("{:.0} req/s", h.len() as f64 / el),
                lat,
                (h.len() as f64 / 1e5, "100k req"),
            )
        }
        _ => {
            let n = connection_rate(addr);
            let el = start.elapsed().as_secs_f64();
            (
                format!("{:.0} conn/s", n as f64 / el),
                String::from("-"),
                (n as f64 / 1e5, "100k conn"),
            )
        }
    };
    let cpu = match target {
        Some(t) => format!(
            "{:.3} CPU-s/{}",
            (t.cpu_secs() - cpu0) / per_unit.0,
            per_unit.1
        ),
        None => "-".into(),
    };
    rows.push(Row {
        target: name,
        scenario,
        rate,
        latency,
        cpu,
    });
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing we need.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let sink = sink_origin();
    let echo = echo_origin();
    let scenarios = [
        "bulk 1 stream",
        "bulk 8 streams",
        "1 KiB req/resp ×50",
        "conn rate (connect, 1 KiB, close)",
    ];
    let mut rows = Vec::new();
    for scenario in scenarios {
        let origin = if scenario.starts_with("bulk") {
            sink
        } else {
            echo
        };
        measure(None, origin, scenario, &mut rows);
        let ours = shardproxy_pair(origin);
        measure(Some(&ours), origin, scenario, &mut rows);
        drop(ours);
        let tunnel = encrypted_pair(origin);
        measure(Some(&tunnel), origin, scenario, &mut rows);
        drop(tunnel);
        match haproxy_pair(origin) {
            Some(h) => measure(Some(&h), origin, scenario, &mut rows),
            None => eprintln!("haproxy not installed: skipping its row (apt-get install haproxy)"),
        }
    }
    println!(
        "AEAD backend {}: seal+open costs {:.3} CPU-s/GB on one core (16 KiB chunks)",
        shardproxy::proto::aead::backend_name(),
        aead_cpu_per_gb()
    );
    println!("| scenario | path | rate | latency | proxies' CPU |");
    println!("|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            r.scenario, r.target, r.rate, r.latency, r.cpu
        );
    }
}
