//! End-to-end benchmark: client → proxy A → proxy B → origin, on loopback.
//!
//! One run measures, side by side and interleaved over `BENCH_ROUNDS`
//! rounds (default 3):
//!
//! * direct (no proxy);
//! * the plain `forward` pair, and two chained HAProxy in TCP mode;
//! * the floor relay (`benches/floor/relay.c`, built with `cc`): the least
//!   work a user-space relay can do per message, so that the tables say how
//!   far below HAProxy any such relay can get;
//! * the encrypted `entry` + `exit` pair, and shadowsocks-rust in tunnel mode
//!   with `2022-blake3-chacha20-poly1305` (SIP022) and
//!   `chacha20-ietf-poly1305` (SIP004).
//!
//! Every pair runs A pinned to core 0 and B to core 1, one shard or thread
//! each, so the two proxies' busiest threads never share a core
//! (`BENCH_PLACEMENT=shared`: both on core 1, and the bench's client and
//! origins on core 0; the issue asks for one placement or both). Otherwise
//! shardproxy runs with its defaults (so `forward` splices transfers,
//! `--splice auto`, with the pipes its default `--max-connections` leaves
//! room for). The load
//! generator is unpinned. Workloads: bulk over 1 and 8 streams, 1 KiB and
//! 64 KiB request/response over 50 keep-alive connections, and connect +
//! 1 KiB + close. The robust figure on a noisy machine is the proxies'
//! CPU-seconds (utime+stime from /proc) per GB, per 100k requests and per
//! 100k connections; the tables give the median of the rounds and the
//! spread (min–max), and the ratios against the peers measured in the same
//! rounds.
//!
//! Run: `cargo bench --bench e2e` (`BENCH_SECS=N` per cell, default 3;
//! `BENCH_ROUNDS=N`; `BENCH_SCENARIOS=connect,1 KiB` runs only the
//! scenarios whose names contain one of those; `BENCH_WAKE_BATCH=1,100us`
//! adds both shardproxy pairs with `--wake-batch 1 --wake-batch-wait
//! 100us`, coalescing off, as extra rows; `BENCH_ENC_ARGS="--large-chunks=false"`
//! adds the encrypted pair with those flags on both proxies as an extra
//! row). HAProxy: `apt-get install haproxy`; shadowsocks-rust:
//! `cargo install shadowsocks-rust --locked --root /opt/ssrust`. A missing
//! peer's rows are skipped with a message. Every loop is bounded in time and
//! count; every address is 127.0.0.1.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Instant;

use common::*;

const SCENARIOS: [&str; 5] = [
    "bulk 1 stream",
    "bulk 8 streams",
    "1 KiB req/resp ×50",
    "64 KiB req/resp ×50",
    "connect + 1 KiB + close",
];

const FORWARD: &str = "shardproxy forward ×2";
const HAPROXY: &str = "haproxy tcp ×2";
/// `benches/floor/relay.c` ×2: the floor of a user-space relay.
const FLOOR: &str = "floor relay ×2";
/// HAProxy with its kernel splicing on (off by default), for transfers.
const HAPROXY_SPLICE: &str = "haproxy tcp ×2 + splice-auto";
const ENCRYPTED: &str = "shardproxy entry+exit";
const SS2022: &str = "ss-rust 2022-chacha20";
const SS_AEAD: &str = "ss-rust chacha20-ietf-poly1305";
const FORWARD_LOG: &str = "shardproxy forward ×2 + access log";
const FORWARD_PROXY: &str = "shardproxy forward ×2 + PROXY v2";
const ENCRYPTED_LOG: &str = "shardproxy entry+exit + access log";
const ENCRYPTED_POOL: &str = "shardproxy entry, 4 exit endpoints";
const FORWARD_WAKE: &str = "shardproxy forward ×2, BENCH_WAKE_BATCH";
const ENCRYPTED_WAKE: &str = "shardproxy entry+exit, BENCH_WAKE_BATCH";
const ENCRYPTED_ALT: &str = "shardproxy entry+exit, BENCH_ENC_ARGS";

/// `BENCH_ENC_ARGS="--large-chunks=false"`: also run the encrypted pair
/// with these flags (whitespace-separated) on both proxies, as an extra row.
fn enc_alt_args() -> Option<Vec<String>> {
    let v = std::env::var("BENCH_ENC_ARGS").ok()?;
    let args: Vec<String> = v.split_whitespace().map(String::from).collect();
    (!args.is_empty()).then_some(args)
}

/// `BENCH_WAKE_BATCH=1,100us`: also run both shardproxy pairs with
/// `--wake-batch 1 --wake-batch-wait 100us` (coalescing off; the default
/// is 16), as extra rows.
fn wake_batch_args() -> Option<Vec<String>> {
    let v = std::env::var("BENCH_WAKE_BATCH").ok()?;
    let (count, wait) = v.split_once(',')?;
    Some(vec![
        "--wake-batch".into(),
        count.trim().into(),
        "--wake-batch-wait".into(),
        wait.trim().into(),
    ])
}

/// The scenarios the per-connection features (access log, PROXY protocol)
/// are measured in: bulk moves the same bytes per connection either way.
fn per_connection(scenario: &str) -> bool {
    !scenario.starts_with("bulk")
}

/// `--access-log` to a fresh file (on the temp dir's disk) for proxy `who`.
fn access_log(who: &str) -> Vec<String> {
    let path =
        std::env::temp_dir().join(format!("shardproxy-bench-{}-{who}.log", std::process::id()));
    let _ = std::fs::remove_file(&path);
    vec!["--access-log".into(), path.to_str().unwrap().into()]
}

/// One measurement: CPU per unit, the rate, and p99 where it applies.
#[derive(Clone, Copy)]
struct Cell {
    cpu: f64,
    /// Proxy A's share (the entry's, for the pool comparison).
    first_cpu: f64,
    rate: f64,
    p99_us: Option<u64>,
}

fn unit(scenario: &str) -> &'static str {
    match scenario {
        s if s.starts_with("bulk") => "CPU-s/GB",
        s if s.contains("req/resp") => "CPU-s/100k req",
        _ => "CPU-s/100k conn",
    }
}

fn rate_unit(scenario: &str) -> &'static str {
    match scenario {
        s if s.starts_with("bulk") => "GB/s",
        s if s.contains("req/resp") => "req/s",
        _ => "conn/s",
    }
}

fn measure(target: Option<&Target>, direct: SocketAddr, scenario: &str) -> Cell {
    let addr = target.map(|t| t.addr).unwrap_or(direct);
    let cpu0 = target.map(Target::cpu_secs).unwrap_or(0.0);
    let first0 = target.map(Target::first_cpu_secs).unwrap_or(0.0);
    let start = Instant::now();
    let (units, rate, p99_us) = match scenario {
        "bulk 1 stream" | "bulk 8 streams" => {
            let streams = if scenario == "bulk 1 stream" { 1 } else { 8 };
            let gb = bulk(addr, streams) as f64 / 1e9;
            (gb, gb / start.elapsed().as_secs_f64(), None)
        }
        "1 KiB req/resp ×50" | "64 KiB req/resp ×50" => {
            let size = if scenario.starts_with("1 KiB") {
                1024
            } else {
                64 * 1024
            };
            let h = request_response_sized(addr, 50, size);
            let rate = h.len() as f64 / start.elapsed().as_secs_f64();
            (h.len() as f64 / 1e5, rate, Some(h.value_at_quantile(0.99)))
        }
        _ => {
            let n = connection_rate(addr) as f64;
            (n / 1e5, n / start.elapsed().as_secs_f64(), None)
        }
    };
    let cpu = target.map(|t| (t.cpu_secs() - cpu0) / units).unwrap_or(0.0);
    let first_cpu = target
        .map(|t| (t.first_cpu_secs() - first0) / units)
        .unwrap_or(0.0);
    Cell {
        cpu,
        first_cpu,
        rate,
        p99_us,
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Median CPU (and p99) per (scenario, path).
type Medians = BTreeMap<(usize, &'static str), (f64, Option<f64>)>;

/// `a`'s median CPU over `b`'s in scenario `si`, as "0.93×", or "-".
fn cpu_ratio(medians: &Medians, si: usize, a: &str, b: &str) -> String {
    match (medians.get(&(si, a)), medians.get(&(si, b))) {
        (Some(x), Some(y)) if y.0 > 0.0 => format!("{:.2}×", x.0 / y.0),
        _ => "-".into(),
    }
}

/// `a`'s median p99 over `b`'s in scenario `si`, as "0.93×", or "-".
fn p99_ratio(medians: &Medians, si: usize, a: &str, b: &str) -> String {
    match (medians.get(&(si, a)), medians.get(&(si, b))) {
        (Some((_, Some(x))), Some((_, Some(y)))) if *y > 0.0 => format!("{:.2}×", x / y),
        _ => "-".into(),
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing we need.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    pin_load();
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .clamp(1, 20);
    let sink = sink_origin();
    let echo = echo_origin();
    // (scenario, path) -> one cell per round.
    let mut cells: BTreeMap<(usize, &'static str), Vec<Cell>> = BTreeMap::new();
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        for (si, scenario) in SCENARIOS.iter().enumerate() {
            // `BENCH_SCENARIOS=connect,1 KiB`: only scenarios containing one
            // of these (a targeted re-measurement).
            if let Ok(only) = std::env::var("BENCH_SCENARIOS") {
                if !only.split(',').any(|o| scenario.contains(o.trim())) {
                    continue;
                }
            }
            let origin = if scenario.starts_with("bulk") {
                sink
            } else {
                echo
            };
            let mut run = |name: &'static str, target: Option<Target>| {
                let cell = measure(target.as_ref(), origin, scenario);
                cells.entry((si, name)).or_default().push(cell);
            };
            run("direct", None);
            run(FORWARD, Some(shardproxy_pair(origin)));
            match haproxy_pair(origin) {
                Some(h) => run(HAPROXY, Some(h)),
                None => {
                    eprintln!("haproxy not installed: skipping its row (apt-get install haproxy)")
                }
            }
            if let Some(f) = floor_pair(origin) {
                run(FLOOR, Some(f));
            }
            if !per_connection(scenario) || scenario.starts_with("64") {
                // shardproxy splices transfers by default (`--splice
                // auto`); HAProxy can too, with `option splice-auto`.
                if let Some(h) = haproxy_pair_with(origin, "  option splice-auto\n", HAPROXY_SPLICE)
                {
                    run(HAPROXY_SPLICE, Some(h));
                }
            }
            run(ENCRYPTED, Some(encrypted_pair(origin)));
            if let Some(alt) = enc_alt_args() {
                run(ENCRYPTED_ALT, Some(encrypted_pair_with(origin, &alt, &alt)));
            }
            if let Some(wake) = wake_batch_args() {
                run(
                    FORWARD_WAKE,
                    Some(shardproxy_pair_with(origin, &wake, &wake)),
                );
                run(
                    ENCRYPTED_WAKE,
                    Some(encrypted_pair_with(origin, &wake, &wake)),
                );
            }
            if per_connection(scenario) {
                // Issue #12's costs: each proxy logs every connection; A
                // sends a PROXY v2 header that B reads.
                run(
                    FORWARD_LOG,
                    Some(shardproxy_pair_with(
                        origin,
                        &access_log("a"),
                        &access_log("b"),
                    )),
                );
                let proxy_in = vec![
                    "--accept-proxy".to_string(),
                    "--proxy-trusted-cidrs".to_string(),
                    "127.0.0.1".to_string(),
                ];
                run(
                    FORWARD_PROXY,
                    Some(shardproxy_pair_with(
                        origin,
                        &["--send-proxy-v2".to_string()],
                        &proxy_in,
                    )),
                );
                run(
                    ENCRYPTED_LOG,
                    Some(encrypted_pair_with(
                        origin,
                        &access_log("entry"),
                        &access_log("exit"),
                    )),
                );
            }
            if scenario.starts_with("connect") {
                // Issue #11: balancing over four exit endpoints
                // (random-two), all one exit process.
                run(ENCRYPTED_POOL, Some(encrypted_pool(origin, 4)));
            }
            if let Some(ss) = shadowsocks_pair(origin, "2022-blake3-chacha20-poly1305", SS2022) {
                run(SS2022, Some(ss));
            }
            if let Some(ss) = shadowsocks_pair(origin, "chacha20-ietf-poly1305", SS_AEAD) {
                run(SS_AEAD, Some(ss));
            }
        }
    }
    println!(
        "AEAD backend {}: seal+open costs {:.3} CPU-s/GB on one core (16 KiB chunks); {rounds} round(s) of {} s per cell; placement: {}",
        shardproxy::proto::aead::backend_name(),
        aead_cpu_per_gb(),
        secs().as_secs(),
        if shared_placement() {
            "shared (both proxies on core 1, client and origins on core 0)"
        } else {
            "split (proxy A on core 0, B on core 1, client and origins unpinned)"
        }
    );
    println!("| scenario | path | rate (median) | p99 (median) | proxies' CPU, median [min–max] |");
    println!("|---|---|---|---|---|");
    let mut medians: Medians = BTreeMap::new();
    for (&(si, name), v) in &cells {
        let scenario = SCENARIOS[si];
        let mut rate: Vec<f64> = v.iter().map(|c| c.rate).collect();
        let mut cpu: Vec<f64> = v.iter().map(|c| c.cpu).collect();
        let mut p99: Vec<f64> = v
            .iter()
            .filter_map(|c| c.p99_us)
            .map(|p| p as f64)
            .collect();
        let (lo, hi) = cpu
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), &c| (lo.min(c), hi.max(c)));
        let cpu_m = median(&mut cpu);
        let p99_m = (!p99.is_empty()).then(|| median(&mut p99));
        medians.insert((si, name), (cpu_m, p99_m));
        let rate_m = median(&mut rate);
        let rate_txt = if scenario.starts_with("bulk") {
            format!("{rate_m:.2} {}", rate_unit(scenario))
        } else {
            format!("{rate_m:.0} {}", rate_unit(scenario))
        };
        let p99_txt = p99_m
            .map(|p| format!("{p:.0} µs"))
            .unwrap_or_else(|| "-".into());
        let cpu_txt = if name == "direct" {
            "-".to_string()
        } else {
            format!("{cpu_m:.3} [{lo:.3}–{hi:.3}] {}", unit(scenario))
        };
        println!("| {scenario} | {name} | {rate_txt} | {p99_txt} | {cpu_txt} |");
    }
    println!();
    println!("| scenario | forward ×2 / HAProxy ×2 | entry+exit / ss-rust 2022 | entry+exit / ss-rust chacha20-ietf-poly1305 | p99 ratio (fwd/HAProxy, enc/ss2022) |");
    println!("|---|---|---|---|---|");
    for (si, scenario) in SCENARIOS.iter().enumerate() {
        let ratio = |a: &str, b: &str| cpu_ratio(&medians, si, a, b);
        let p99 = |a: &str, b: &str| p99_ratio(&medians, si, a, b);
        println!(
            "| {scenario} | {} | {} | {} | {}, {} |",
            ratio(FORWARD, HAPROXY),
            ratio(ENCRYPTED, SS2022),
            ratio(ENCRYPTED, SS_AEAD),
            p99(FORWARD, HAPROXY),
            p99(ENCRYPTED, SS2022)
        );
    }
    if let Some(wake) = wake_batch_args() {
        println!();
        println!(
            "| scenario | forward {0} / HAProxy ×2 | entry+exit {0} / ss-rust 2022 | p99 ratio (fwd/HAProxy, enc/ss2022) | forward, {0} / defaults | entry+exit, {0} / defaults |",
            wake.join(" ")
        );
        println!("|---|---|---|---|---|---|");
        for (si, scenario) in SCENARIOS.iter().enumerate() {
            let ratio = |a: &str, b: &str| cpu_ratio(&medians, si, a, b);
            let p99 = |a: &str, b: &str| p99_ratio(&medians, si, a, b);
            println!(
                "| {scenario} | {} | {} | {}, {} | {} | {} |",
                ratio(FORWARD_WAKE, HAPROXY),
                ratio(ENCRYPTED_WAKE, SS2022),
                p99(FORWARD_WAKE, HAPROXY),
                p99(ENCRYPTED_WAKE, SS2022),
                ratio(FORWARD_WAKE, FORWARD),
                ratio(ENCRYPTED_WAKE, ENCRYPTED)
            );
        }
    }
    if let Some(alt) = enc_alt_args() {
        println!();
        println!(
            "| scenario | entry+exit {0} / ss-rust 2022 | p99 ratio (enc {0}/ss2022) | entry+exit, defaults / {0} |",
            alt.join(" ")
        );
        println!("|---|---|---|---|");
        for (si, scenario) in SCENARIOS.iter().enumerate() {
            println!(
                "| {scenario} | {} | {} | {} |",
                cpu_ratio(&medians, si, ENCRYPTED_ALT, SS2022),
                p99_ratio(&medians, si, ENCRYPTED_ALT, SS2022),
                cpu_ratio(&medians, si, ENCRYPTED, ENCRYPTED_ALT)
            );
        }
    }
    println!();
    println!("| scenario | floor relay ×2 / HAProxy ×2 | forward ×2 / floor relay ×2 |");
    println!("|---|---|---|");
    for (si, scenario) in SCENARIOS.iter().enumerate() {
        let ratio = |a: &str, b: &str| match (medians.get(&(si, a)), medians.get(&(si, b))) {
            (Some(x), Some(y)) if y.0 > 0.0 => format!("{:.2}×", x.0 / y.0),
            _ => "-".into(),
        };
        println!(
            "| {scenario} | {} | {} |",
            ratio(FLOOR, HAPROXY),
            ratio(FORWARD, FLOOR)
        );
    }
    println!();
    println!("| scenario | forward ×2 / HAProxy ×2 with splice-auto |");
    println!("|---|---|");
    for (si, scenario) in SCENARIOS.iter().enumerate() {
        if let (Some(x), Some(y)) = (
            medians.get(&(si, FORWARD)),
            medians.get(&(si, HAPROXY_SPLICE)),
        ) {
            println!("| {scenario} | {:.2}× |", x.0 / y.0);
        }
    }
    println!();
    println!("| scenario | forward + access log / forward | forward + PROXY v2 / forward | entry+exit + access log / entry+exit |");
    println!("|---|---|---|---|");
    for (si, scenario) in SCENARIOS.iter().enumerate() {
        if !per_connection(scenario) {
            continue;
        }
        let ratio = |a: &str, b: &str| match (medians.get(&(si, a)), medians.get(&(si, b))) {
            (Some(x), Some(y)) if y.0 > 0.0 => format!("{:.3}×", x.0 / y.0),
            _ => "-".into(),
        };
        println!(
            "| {scenario} | {} | {} | {} |",
            ratio(FORWARD_LOG, FORWARD),
            ratio(FORWARD_PROXY, FORWARD),
            ratio(ENCRYPTED_LOG, ENCRYPTED)
        );
    }
    if let Some(si) = SCENARIOS.iter().position(|s| s.starts_with("connect")) {
        let entry_cpu = |name: &str| {
            cells.get(&(si, name)).map(|v| {
                let mut c: Vec<f64> = v.iter().map(|c| c.first_cpu).collect();
                median(&mut c)
            })
        };
        if let (Some(x), Some(y)) = (entry_cpu(ENCRYPTED_POOL), entry_cpu(ENCRYPTED)) {
            println!();
            println!("| connect + 1 KiB + close | entry's CPU, 1 endpoint | entry's CPU, 4 endpoints (random-two) | ratio |");
            println!("|---|---|---|---|");
            println!("| CPU-s/100k conn | {y:.3} | {x:.3} | {:.3}× |", x / y);
        }
    }
}
