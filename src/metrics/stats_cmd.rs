//! `shardproxy stats --from http://HOST:PORT`: scrape `/histograms` from a
//! running instance, merge the shards' HDR histograms exactly, print a table.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use base64::Engine;
use hdrhistogram::serialization::Deserializer;
use hdrhistogram::Histogram;

/// Largest `/histograms` answer we accept (a few KiB per shard in practice).
const MAX_BODY: u64 = 8 << 20;
/// The whole scrape (connect, request, answer) must finish within this,
/// however the server trickles its bytes.
const DEADLINE: Duration = Duration::from_secs(10);

/// Why `stats` failed. One line each.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// `--from` is not `http://HOST:PORT`.
    #[error("bad --from `{0}`: expected http://HOST:PORT")]
    BadUrl(String),
    /// Connecting or reading failed.
    #[error("cannot scrape {0}: {1}")]
    Io(String, std::io::Error),
    /// The server answered something else than 200.
    #[error("{0} answered: {1}")]
    Status(String, String),
    /// A line could not be decoded.
    #[error("{0}: undecodable histogram line {1}")]
    Decode(String, usize),
}

/// One decoded line of `/histograms`.
pub struct Line {
    /// Metric name, e.g. `shardproxy_relay_chunk_seconds`.
    pub metric: String,
    /// Shard index.
    pub shard: String,
    /// `up`, `down` or `-`.
    pub direction: String,
    /// The distribution, in microseconds.
    pub hist: Histogram<u64>,
}

/// Parses the `/histograms` body.
pub fn parse(body: &str, source: &str) -> Result<Vec<Line>, StatsError> {
    let mut out = Vec::new();
    for (i, raw) in body.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let bad = || StatsError::Decode(source.to_string(), i + 1);
        let f: Vec<&str> = raw.split(' ').collect();
        let [metric, shard, _role, direction, b64] = f[..] else {
            return Err(bad());
        };
        let field = |kv: &str, key: &str| kv.strip_prefix(key).map(str::to_string).ok_or_else(bad);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| bad())?;
        let hist: Histogram<u64> = Deserializer::new()
            .deserialize(&mut &bytes[..])
            .map_err(|_| bad())?;
        out.push(Line {
            metric: metric.to_string(),
            shard: field(shard, "shard=")?,
            direction: field(direction, "direction=")?,
            hist,
        });
    }
    Ok(out)
}

/// Formats microseconds for people.
fn human(us: u64) -> String {
    match us {
        0..=9_999 => format!("{us}µs"),
        10_000..=9_999_999 => format!("{:.1}ms", us as f64 / 1e3),
        _ => format!("{:.2}s", us as f64 / 1e6),
    }
}

/// Renders the table: merged across shards, then per shard if asked.
pub fn table(lines: &[Line], per_shard: bool) -> String {
    let mut merged: BTreeMap<(String, String), Histogram<u64>> = BTreeMap::new();
    for l in lines {
        let key = (l.metric.clone(), l.direction.clone());
        match merged.get_mut(&key) {
            Some(h) => {
                let _ = h.add(&l.hist);
            }
            None => {
                merged.insert(key, l.hist.clone());
            }
        }
    }
    let mut out = String::new();
    let header = |out: &mut String, first: &str| {
        let _ = writeln!(
            out,
            "{first:<26} {:<5} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "dir", "count", "p50", "p90", "p99", "p99.9", "max"
        );
    };
    let row = |out: &mut String, name: &str, dir: &str, h: &Histogram<u64>| {
        let q = |x| human(h.value_at_quantile(x));
        let _ = writeln!(
            out,
            "{name:<26} {dir:<5} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
            h.len(),
            q(0.5),
            q(0.9),
            q(0.99),
            q(0.999),
            human(h.max())
        );
    };
    let short = |m: &str| {
        m.trim_start_matches("shardproxy_")
            .trim_end_matches("_seconds")
            .to_string()
    };
    header(&mut out, "metric (all shards)");
    for ((metric, dir), h) in &merged {
        row(&mut out, &short(metric), dir, h);
    }
    if per_shard {
        let _ = writeln!(out);
        header(&mut out, "metric [shard]");
        let mut sorted: Vec<&Line> = lines.iter().collect();
        sorted.sort_by(|a, b| {
            (&a.metric, &a.direction, &a.shard).cmp(&(&b.metric, &b.direction, &b.shard))
        });
        for l in sorted {
            row(
                &mut out,
                &format!("{} [{}]", short(&l.metric), l.shard),
                &l.direction,
                &l.hist,
            );
        }
    }
    out
}

/// Fetches `path` from `url` (`http://HOST:PORT`, optionally followed by
/// the endpoint's own `/metrics` or `/histograms` path, as the proxy logs
/// it), returning the body. The whole scrape is bounded by [`DEADLINE`] and
/// the answer by [`MAX_BODY`].
pub fn fetch(url: &str, path: &str) -> Result<String, StatsError> {
    let authority = url
        .strip_prefix("http://")
        .map(|r| {
            r.strip_suffix("/metrics")
                .or_else(|| r.strip_suffix("/histograms"))
                .unwrap_or(r)
                .trim_end_matches('/')
        })
        .filter(|a| !a.is_empty() && !a.contains('/'))
        .ok_or_else(|| StatsError::BadUrl(url.to_string()))?;
    let io = |e| StatsError::Io(url.to_string(), e);
    let deadline = std::time::Instant::now() + DEADLINE;
    let timed_out = || {
        StatsError::Io(
            url.to_string(),
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no complete answer within {}s", DEADLINE.as_secs()),
            ),
        )
    };
    // A name that does not resolve is not a malformed URL.
    let addr = authority
        .to_socket_addrs()
        .map_err(|e| {
            if authority
                .rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
            {
                io(e)
            } else {
                StatsError::BadUrl(url.to_string())
            }
        })?
        .next()
        .ok_or_else(|| StatsError::BadUrl(url.to_string()))?;
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(io)?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))
        .map_err(io)?;
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )
    .map_err(io)?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        let left = deadline
            .checked_duration_since(std::time::Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(timed_out)?;
        conn.set_read_timeout(Some(left)).map_err(io)?;
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if raw.len() as u64 + n as u64 > MAX_BODY {
                    return Err(StatsError::Status(
                        url.to_string(),
                        format!("an answer larger than {} MiB", MAX_BODY >> 20),
                    ));
                }
                raw.extend_from_slice(&buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(timed_out())
            }
            Err(e) => return Err(io(e)),
        }
    }
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| StatsError::Status(url.to_string(), "no HTTP response".into()))?;
    let status = head.lines().next().unwrap_or("");
    if !status.contains(" 200 ") {
        return Err(StatsError::Status(url.to_string(), status.to_string()));
    }
    Ok(body.to_string())
}

/// The `stats` command.
pub fn run(url: &str, per_shard: bool) -> Result<String, StatsError> {
    let body = fetch(url, "/histograms")?;
    Ok(table(&parse(&body, url)?, per_shard))
}
