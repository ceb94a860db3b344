//! Rendering: the Prometheus text format (0.0.4) and the `/histograms` lines.
//!
//! Every series carries `shard` and `role` labels. There is deliberately no
//! `shard="all"` series: buckets and counters are additive, so
//! `sum without (shard) (...)` is the exact merged view, whereas an "all"
//! series would be double-counted by every such sum. The exact merged HDR
//! distribution is on `/histograms`.

use std::fmt::Write;

use base64::Engine;
use hdrhistogram::serialization::{Serializer, V2DeflateSerializer};

use super::{Hist, ProcessInfo, Recorded, Snapshot};
use crate::stats::CloseReason;

/// Bucket upper bounds in microseconds: 1-2-5 steps from 1 µs to 50 s, then
/// 60 s (25 buckets, plus `+Inf`).
pub fn bucket_bounds_micros() -> Vec<u64> {
    let mut out = Vec::with_capacity(25);
    let mut decade = 1u64;
    while decade <= 10_000_000 {
        for step in [1, 2, 5] {
            out.push(decade * step);
        }
        decade *= 10;
    }
    out.push(60_000_000);
    out
}

/// Formats microseconds as seconds without float noise (e.g. `0.000002`).
fn seconds(us: u64) -> String {
    let whole = us / 1_000_000;
    let frac = us % 1_000_000;
    if frac == 0 {
        whole.to_string()
    } else {
        let s = format!("{whole}.{frac:06}");
        s.trim_end_matches('0').to_string()
    }
}

/// Cumulative counts per bound, from the HDR data. A value counts in a
/// bucket when its HDR equivalence range lies at or below the bound
/// (exact below 2048 µs, within 0.1% above).
fn cumulative(rec: &Recorded, bounds: &[u64]) -> Vec<u64> {
    let mut per = vec![0u64; bounds.len()];
    for v in rec.hist.iter_recorded() {
        let value = rec.hist.lowest_equivalent(v.value_iterated_to());
        if let Some(i) = bounds.iter().position(|&b| value <= b) {
            per[i] += v.count_at_value();
        }
    }
    let mut acc = 0;
    per.iter()
        .map(|c| {
            acc += c;
            acc
        })
        .collect()
}

/// Renders `/metrics`.
pub fn render(snaps: &[&Snapshot], info: &ProcessInfo) -> String {
    let role = info.role;
    let mut out = String::with_capacity(16 * 1024);
    let w = &mut out;
    let _ = writeln!(w, "# HELP shardproxy_build_info Build information.");
    let _ = writeln!(w, "# TYPE shardproxy_build_info gauge");
    let _ = writeln!(
        w,
        "shardproxy_build_info{{version=\"{}\",role=\"{role}\",aead=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        crate::proto::aead::backend_name()
    );
    let _ = writeln!(
        w,
        "# HELP shardproxy_start_time_seconds Process start time, seconds since the Unix epoch."
    );
    let _ = writeln!(w, "# TYPE shardproxy_start_time_seconds gauge");
    let _ = writeln!(
        w,
        "shardproxy_start_time_seconds{{role=\"{role}\"}} {:.3}",
        info.start_time
    );
    let _ = writeln!(
        w,
        "# HELP shardproxy_draining Whether the process is draining (1) or accepting (0)."
    );
    let _ = writeln!(w, "# TYPE shardproxy_draining gauge");
    let _ = writeln!(
        w,
        "shardproxy_draining{{role=\"{role}\"}} {}",
        u8::from(info.draining.load(std::sync::atomic::Ordering::Relaxed))
    );
    let _ = writeln!(
        w,
        "# HELP shardproxy_log_lines_dropped_total Process log lines dropped: stderr was not keeping up, or refused the write."
    );
    let _ = writeln!(w, "# TYPE shardproxy_log_lines_dropped_total counter");
    let _ = writeln!(
        w,
        "shardproxy_log_lines_dropped_total{{role=\"{role}\"}} {}",
        crate::log::dropped_lines()
    );
    if let Ok(keys) = info.keys.lock() {
        if !keys.is_empty() {
            let _ = writeln!(
                w,
                "# HELP shardproxy_key_info Loaded tunnel keys: fingerprint = first 4 bytes of SHA-256 of the key, slot 0 = the primary key (the one an entry uses)."
            );
            let _ = writeln!(w, "# TYPE shardproxy_key_info gauge");
            for (slot, fp) in keys.iter().enumerate() {
                let _ = writeln!(
                    w,
                    "shardproxy_key_info{{role=\"{role}\",fingerprint=\"{fp}\",slot=\"{slot}\"}} 1"
                );
            }
        }
    }

    let counter =
        |w: &mut String, name: &str, help: &str, kind: &str, value: &dyn Fn(&Snapshot) -> u64| {
            let _ = writeln!(w, "# HELP {name} {help}");
            let _ = writeln!(w, "# TYPE {name} {kind}");
            for s in snaps {
                let _ = writeln!(
                    w,
                    "{name}{{shard=\"{}\",role=\"{role}\"}} {}",
                    s.shard,
                    value(s)
                );
            }
        };
    counter(
        w,
        "shardproxy_connections_accepted_total",
        "Connections accepted.",
        "counter",
        &|s| s.accepted,
    );
    counter(
        w,
        "shardproxy_connections_active",
        "Connections currently open.",
        "gauge",
        &|s| s.active,
    );
    counter(
        w,
        "shardproxy_connections_limit",
        "Connection limit per shard (--max-connections).",
        "gauge",
        &|s| s.limit,
    );
    counter(
        w,
        "shardproxy_handshake_failures_total",
        "Tunnel handshakes that failed.",
        "counter",
        &|s| s.handshake_failures,
    );
    counter(
        w,
        "shardproxy_handshakes_abandoned_total",
        "Exit: authenticated, fresh tunnel hellos whose peer closed or reset before the key confirmation (not failures).",
        "counter",
        &|s| s.handshakes_abandoned,
    );
    counter(
        w,
        "shardproxy_accept_errors_total",
        "accept(2) failures (EMFILE, ENFILE, ENOBUFS, ...).",
        "counter",
        &|s| s.accept_errors,
    );
    counter(
        w,
        "shardproxy_access_log_dropped_total",
        "Access-log lines dropped because the shard's log buffer was full (the writer could not keep up).",
        "counter",
        &|s| s.access_log_dropped,
    );
    counter(
        w,
        "shardproxy_spliced_bytes_total",
        "Of shardproxy_bytes_total, the bytes moved socket to pipe to socket by splice(2), never copied through user space (forward, --splice auto).",
        "counter",
        &|s| s.spliced,
    );
    counter(
        w,
        "shardproxy_batched_bytes_total",
        "Of shardproxy_bytes_total, the bytes a tunnel role moved four chunks per syscall (a transfer in batch mode; entry and exit).",
        "counter",
        &|s| s.batched,
    );
    counter(
        w,
        "shardproxy_large_chunk_sessions_total",
        "Tunnel sessions that agreed on chunks of up to 65472 bytes (--large-chunks; entry and exit).",
        "counter",
        &|s| s.large_chunks.0,
    );
    counter(
        w,
        "shardproxy_large_chunk_denied_total",
        "Tunnel sessions that would have used chunks of up to 65472 bytes but found the shard's reservations (a quarter of --max-connections) spent: they used 16 KiB chunks.",
        "counter",
        &|s| s.large_chunks.1,
    );
    counter(
        w,
        "shardproxy_tunnel_reuses_total",
        "Tunnel sessions carried by a keep-alive tunnel an earlier session opened: no connect, no handshake (--tunnel-keepalive; entry and exit).",
        "counter",
        &|s| s.tunnels.0,
    );
    counter(
        w,
        "shardproxy_idle_tunnels",
        "Keep-alive tunnels idle now, waiting for a session (entry: its pool; exit: waiting for a start chunk).",
        "gauge",
        &|s| s.tunnels.1,
    );
    counter(
        w,
        "shardproxy_coalesced_sleeps_total",
        "Sleeps in which the shard waited for a batch of events instead of one (--wake-batch; only while its transfers move bytes; 0 before Linux 6.12).",
        "counter",
        &|s| s.coalesced_sleeps.0,
    );
    counter(
        w,
        "shardproxy_held_back_sleeps_total",
        "Of shardproxy_coalesced_sleeps_total, the sleeps that waited out the whole --wake-batch-wait with the batch unfilled (events held back up to that long).",
        "counter",
        &|s| s.coalesced_sleeps.1,
    );

    let _ = writeln!(
        w,
        "# HELP shardproxy_connections_closed_total Connections closed, by reason."
    );
    let _ = writeln!(w, "# TYPE shardproxy_connections_closed_total counter");
    for s in snaps {
        for (i, reason) in CloseReason::ALL.iter().enumerate() {
            let _ = writeln!(
                w,
                "shardproxy_connections_closed_total{{shard=\"{}\",role=\"{role}\",reason=\"{}\"}} {}",
                s.shard,
                reason.as_str(),
                s.closed.get(i).copied().unwrap_or(0)
            );
        }
    }
    let _ = writeln!(w, "# HELP shardproxy_bytes_total Plaintext bytes relayed, by direction (up: client to upstream).");
    let _ = writeln!(w, "# TYPE shardproxy_bytes_total counter");
    for s in snaps {
        for (dir, v) in [("up", s.bytes_up), ("down", s.bytes_down)] {
            let _ = writeln!(
                w,
                "shardproxy_bytes_total{{shard=\"{}\",role=\"{role}\",direction=\"{dir}\"}} {v}",
                s.shard
            );
        }
    }

    let bounds = bucket_bounds_micros();
    render_upstreams(w, snaps, info, &bounds);
    let mut seen_metric = Vec::new();
    for which in Hist::ALL {
        let name = which.metric();
        if !seen_metric.contains(&name) {
            seen_metric.push(name);
            let _ = writeln!(w, "# HELP {name} {}", which.help());
            let _ = writeln!(w, "# TYPE {name} histogram");
            // Both relay directions share one metric family; write them together.
            for part in Hist::ALL.iter().filter(|h| h.metric() == name) {
                for s in snaps {
                    let Some(rec) = s.hists.get(*part as usize) else {
                        continue;
                    };
                    let labels = match part.direction() {
                        Some(d) => {
                            format!("shard=\"{}\",role=\"{role}\",direction=\"{d}\"", s.shard)
                        }
                        None => format!("shard=\"{}\",role=\"{role}\"", s.shard),
                    };
                    histogram(w, name, &labels, rec, &bounds);
                }
            }
        }
    }
    out
}

/// One histogram series: its cumulative buckets at `bounds`, `+Inf`, sum
/// and count, all with `labels`.
fn histogram(w: &mut String, name: &str, labels: &str, rec: &Recorded, bounds: &[u64]) {
    for (b, c) in bounds.iter().zip(cumulative(rec, bounds)) {
        let _ = writeln!(w, "{name}_bucket{{{labels},le=\"{}\"}} {c}", seconds(*b));
    }
    let _ = writeln!(
        w,
        "{name}_bucket{{{labels},le=\"+Inf\"}} {}",
        rec.hist.len()
    );
    let _ = writeln!(w, "{name}_sum{{{labels}}} {}", seconds(rec.sum_micros));
    let _ = writeln!(w, "{name}_count{{{labels}}} {}", rec.hist.len());
}

/// A Prometheus label value, escaped (text format 0.0.4).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The per-upstream series: one `upstream` label value per configured
/// `--upstream` (not per resolved address), so cardinality is bounded by
/// the configuration whatever DNS returns.
fn render_upstreams(w: &mut String, snaps: &[&Snapshot], info: &ProcessInfo, bounds: &[u64]) {
    let role = info.role;
    let names = info.upstreams.lock().map(|n| n.clone()).unwrap_or_default();
    if names.is_empty() {
        return;
    }
    let labels = |shard: usize, up: &str| {
        format!(
            "shard=\"{shard}\",role=\"{role}\",upstream=\"{}\"",
            label(up)
        )
    };
    // Every (shard, configured upstream) pair with its counters.
    let each = || {
        snaps.iter().flat_map(|s| {
            s.upstreams
                .iter()
                .zip(names.iter())
                .map(move |(u, up)| (s.shard, up.as_str(), u))
        })
    };
    type Get = fn(&super::UpstreamSnapshot) -> u64;
    let series: [(&str, &str, &str, Get); 5] = [
        ("shardproxy_upstream_connects_total", "counter", "Attempts that reached the upstream (entry: connect and tunnel handshake).", |u| u.connects),
        ("shardproxy_upstream_ejections_total", "counter", "Times one of the upstream's endpoints was ejected after --max-fails failures in a row.", |u| u.ejections),
        ("shardproxy_upstream_active_connections", "gauge", "Connections open to the upstream's endpoints.", |u| u.active),
        ("shardproxy_upstream_endpoints", "gauge", "The upstream's endpoints (addresses it resolved to).", |u| u.endpoints),
        ("shardproxy_upstream_endpoints_available", "gauge", "Of those, the ones up: healthy (active checks), not ejected, and not back from an ejection with no success since. 0 means the upstream is down in this shard.", |u| u.available),
    ];
    for (name, kind, help, get) in series {
        let _ = writeln!(w, "# HELP {name} {help}");
        let _ = writeln!(w, "# TYPE {name} {kind}");
        for (shard, up, u) in each() {
            let _ = writeln!(w, "{name}{{{}}} {}", labels(shard, up), get(u));
        }
    }
    let name = "shardproxy_upstream_connect_failures_total";
    let _ = writeln!(w, "# HELP {name} Failed attempts, by reason: refused (a connect error, or an exit that refused the tunnel because none of its upstreams was up), timeout, handshake (entry: the tunnel handshake failed or timed out).");
    let _ = writeln!(w, "# TYPE {name} counter");
    for (shard, up, u) in each() {
        for (reason, v) in [
            ("refused", u.refused),
            ("timeout", u.timeouts),
            ("handshake", u.handshakes),
        ] {
            let _ = writeln!(w, "{name}{{{},reason=\"{reason}\"}} {v}", labels(shard, up));
        }
    }
    let name = "shardproxy_upstream_endpoint_connect_seconds";
    let _ = writeln!(
        w,
        "# HELP {name} Upstream connect time, per configured upstream."
    );
    let _ = writeln!(w, "# TYPE {name} histogram");
    for s in snaps {
        for (i, up) in names.iter().enumerate() {
            if let Some(rec) = s.hists.get(Hist::ALL.len() + i) {
                histogram(w, name, &labels(s.shard, up), rec, bounds);
            }
        }
    }
}

/// Renders `/histograms`: one line per shard and histogram,
/// `METRIC shard=N role=R direction=D BASE64`, where BASE64 is HdrHistogram's
/// standard V2 compressed (deflate) encoding of microsecond values
/// (`direction=-` where it does not apply).
pub fn histograms(snaps: &[&Snapshot], role: &str) -> String {
    let mut out = String::new();
    let mut ser = V2DeflateSerializer::new();
    for s in snaps {
        for which in Hist::ALL {
            let Some(rec) = s.hists.get(which as usize) else {
                continue;
            };
            let mut bytes = Vec::new();
            if ser.serialize(&rec.hist, &mut bytes).is_err() {
                continue;
            }
            let _ = writeln!(
                out,
                "{} shard={} role={role} direction={} {}",
                which.metric(),
                s.shard,
                which.direction().unwrap_or("-"),
                base64::engine::general_purpose::STANDARD.encode(bytes)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A board with one shard that recorded `samples` (µs) as RelayUp.
    fn board(shards: &[&[u64]]) -> super::super::Board {
        let board = super::super::Board::new(shards.len(), "entry");
        for (i, samples) in shards.iter().enumerate() {
            let timings = super::super::Timings::new(true, 0);
            for &us in *samples {
                timings.record(Hist::RelayUp, Duration::from_micros(us));
            }
            let stats = crate::stats::ShardStats::default();
            stats.on_accept();
            board.publish(super::super::Publish::take(i, &stats, &timings, 100));
        }
        board
    }

    #[test]
    fn bucket_layout() {
        let b = bucket_bounds_micros();
        assert_eq!(b.len(), 25);
        assert_eq!(&b[..4], &[1, 2, 5, 10]);
        assert_eq!(b[b.len() - 2..], [50_000_000, 60_000_000]);
        assert_eq!(seconds(2), "0.000002");
        assert_eq!(seconds(1_500_000), "1.5");
        assert_eq!(seconds(60_000_000), "60");
    }

    #[test]
    fn buckets_are_cumulative_and_exact() {
        let b = board(&[&[1, 3, 3, 700, 70_000_000], &[2]]);
        let text = b.with_snapshots(|s| render(s, &b.info));
        let line = |needle: &str| {
            text.lines()
                .find(|l| l.starts_with(needle))
                .unwrap_or_else(|| panic!("missing {needle}\n{text}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .to_string()
        };
        let up =
            "shardproxy_relay_chunk_seconds_bucket{shard=\"0\",role=\"entry\",direction=\"up\",";
        assert_eq!(line(&format!("{up}le=\"0.000001\"}}")), "1");
        assert_eq!(line(&format!("{up}le=\"0.000002\"}}")), "1");
        assert_eq!(line(&format!("{up}le=\"0.000005\"}}")), "3");
        assert_eq!(line(&format!("{up}le=\"0.001\"}}")), "4");
        assert_eq!(line(&format!("{up}le=\"60\"}}")), "4"); // 70 s is above the last bound
        assert_eq!(line(&format!("{up}le=\"+Inf\"}}")), "5");
        assert_eq!(
            line(
                "shardproxy_relay_chunk_seconds_count{shard=\"0\",role=\"entry\",direction=\"up\"}"
            ),
            "5"
        );
        assert_eq!(
            line("shardproxy_relay_chunk_seconds_sum{shard=\"0\",role=\"entry\",direction=\"up\"}"),
            "70.000707"
        );
        assert_eq!(
            line("shardproxy_connections_accepted_total{shard=\"1\""),
            "1"
        );
        assert!(!text.contains("shard=\"all\""));
    }

    #[test]
    fn histogram_lines_round_trip() {
        use hdrhistogram::serialization::Deserializer;
        let b = board(&[&[], &[], &[], &[10, 20, 30]]);
        let text = b.with_snapshots(|s| histograms(s, "exit"));
        let line = text.lines().find(|l| l.contains("direction=up")).unwrap();
        let fields: Vec<&str> = line.split(' ').collect();
        assert_eq!(
            &fields[..4],
            &[
                "shardproxy_relay_chunk_seconds",
                "shard=3",
                "role=exit",
                "direction=up"
            ]
        );
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(fields[4])
            .unwrap();
        let h: hdrhistogram::Histogram<u64> =
            Deserializer::new().deserialize(&mut &bytes[..]).unwrap();
        assert_eq!(h.len(), 3);
        assert_eq!(h.max(), 30);
    }

    #[test]
    fn deltas_accumulate_across_publishes() {
        let board = super::super::Board::new(1, "exit");
        let timings = super::super::Timings::new(true, 0);
        let stats = crate::stats::ShardStats::default();
        for round in 1..=3u64 {
            for _ in 0..round {
                timings.record(Hist::Handshake, Duration::from_micros(5));
            }
            board.publish(super::super::Publish::take(0, &stats, &timings, 100));
            if round == 2 {
                board.with_snapshots(|_| ()); // a fold between publishes
            }
        }
        board.publish(super::super::Publish::take(0, &stats, &timings, 100)); // empty delta
        let text = board.with_snapshots(|s| render(s, &board.info));
        assert!(
            text.contains("shardproxy_handshake_seconds_count{shard=\"0\",role=\"exit\"} 6"),
            "{text}"
        );
        assert!(
            text.contains("shardproxy_handshake_seconds_sum{shard=\"0\",role=\"exit\"} 0.00003\n")
        );
    }
}
