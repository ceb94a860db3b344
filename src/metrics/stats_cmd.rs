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
    /// A line repeats an earlier one's metric, shard and direction.
    #[error("{0}: histogram line {1} repeats an earlier line's metric, shard and direction")]
    Repeated(String, usize),
    /// The answer holds more lines or metrics than any shardproxy writes.
    #[error("{0}: more than {2} histogram {1} in one answer")]
    TooMany(String, &'static str, usize),
}

/// Lines a `/histograms` answer may hold: a shard writes one per
/// [`super::Hist`] kind, so this is room for over 2,000 shards.
const MAX_LINES: usize = 16_384;
/// Distinct (metric, direction) pairs an answer may hold; `stats` keeps
/// one merged histogram (about 190 KiB) for each.
const MAX_KINDS: usize = 64;

/// One line of `/histograms`, summarised for the per-shard table.
pub struct Line {
    /// Metric name, e.g. `shardproxy_relay_chunk_seconds`.
    pub metric: String,
    /// Shard index.
    pub shard: String,
    /// `up`, `down` or `-`.
    pub direction: String,
    /// Its row: count and quantiles, in microseconds.
    pub row: Row,
}

/// A table row: how many values, and the 50th, 90th, 99th and 99.9th
/// percentiles and the largest, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    /// Values recorded.
    pub count: u64,
    /// p50, p90, p99, p99.9 and max.
    pub quantiles: [u64; 5],
}

impl Row {
    fn of(h: &Histogram<u64>) -> Row {
        let q = |x| h.value_at_quantile(x);
        Row {
            count: h.len(),
            quantiles: [q(0.5), q(0.9), q(0.99), q(0.999), h.max()],
        }
    }
}

/// A decoded `/histograms` answer: each (metric, direction) merged across
/// the shards, and each line's own row. Memory is bounded by
/// [`MAX_KINDS`] histograms and [`MAX_LINES`] rows, whatever the server
/// sends: each line's histogram is folded in and dropped as it is read.
pub struct Scrape {
    /// By (metric, direction), every shard's values together.
    pub merged: BTreeMap<(String, String), Histogram<u64>>,
    /// Every line, in the order read.
    pub lines: Vec<Line>,
}

/// Parses the `/histograms` body. Errors: a line that is not
/// `METRIC shard=N role=R direction=D BASE64` with a histogram that
/// [`decode`] takes, or more than [`MAX_LINES`] lines or [`MAX_KINDS`]
/// metrics.
pub fn parse(body: &str, source: &str) -> Result<Scrape, StatsError> {
    let mut out = Scrape {
        merged: BTreeMap::new(),
        lines: Vec::new(),
    };
    if body.lines().filter(|l| !l.trim().is_empty()).count() > MAX_LINES {
        return Err(StatsError::TooMany(source.to_string(), "lines", MAX_LINES));
    }
    let mut seen = std::collections::HashSet::new();
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
        let hist = decode(&bytes).ok_or_else(bad)?;
        let line = Line {
            metric: metric.to_string(),
            shard: field(shard, "shard=")?,
            direction: field(direction, "direction=")?,
            row: Row::of(&hist),
        };
        // Each shard's histogram once: a repeated one would count twice.
        let id = (
            line.metric.clone(),
            line.shard.clone(),
            line.direction.clone(),
        );
        if !seen.insert(id) {
            return Err(StatsError::Repeated(source.to_string(), i + 1));
        }
        let key = (line.metric.clone(), line.direction.clone());
        let full = out.merged.len() == MAX_KINDS;
        match out.merged.get_mut(&key) {
            Some(h) => {
                let _ = h.add(&hist);
            }
            None if full => {
                return Err(StatsError::TooMany(
                    source.to_string(),
                    "metrics",
                    MAX_KINDS,
                ));
            }
            None => {
                out.merged.insert(key, hist);
            }
        }
        out.lines.push(line);
    }
    Ok(out)
}

/// Decodes one histogram as shardproxy's metrics endpoint writes it, and
/// nothing else: HdrHistogram's V2 compressed encoding (HdrHistogram's
/// "V2 encoding" and "V2 compressed encoding"; the Rust crate's
/// `V2DeflateSerializer`): a 4-byte cookie `0x1c849314`, a 4-byte length
/// and a zlib stream of the V2 encoding, whose 40-byte header (cookie
/// `0x1c849313`, payload length, normalizing offset, significant digits,
/// lowest and highest trackable value, conversion ratio; big-endian) is
/// followed by the counts (zig-zag LEB128, at most 9 bytes each), with
/// shardproxy's bounds: 1 µs to [`super::MAX_MICROS`], 3 digits.
///
/// The bounds are checked, and the stream inflated with a cap, before
/// anything is sized from them: the crate's decoder sizes its counts from
/// the header's bounds and its buffer from the stated payload length, so
/// one line stating a 4 GiB payload, or a few with a 2^62 bound and 5
/// digits, made `stats` allocate gigabytes (found by a break-it round).
/// Returns `None` for anything else.
pub fn decode(bytes: &[u8]) -> Option<Histogram<u64>> {
    const COMPRESSED_COOKIE: u32 = 0x1c84_9314;
    const COOKIE: u32 = 0x1c84_9313;
    const HEADER: usize = 40;
    const DIGITS: u8 = 3;
    let be32 = |b: &[u8], at: usize| {
        b.get(at..at + 4)
            .map(|x| u32::from_be_bytes([x[0], x[1], x[2], x[3]]))
    };
    let be64 = |b: &[u8], at: usize| {
        b.get(at..at + 8).map(|x| {
            let mut a = [0u8; 8];
            a.copy_from_slice(x);
            u64::from_be_bytes(a)
        })
    };
    if be32(bytes, 0)? != COMPRESSED_COOKIE {
        return None;
    }
    let stream = bytes.get(8..8 + be32(bytes, 4)? as usize)?;
    let counts = Histogram::<u64>::new_with_bounds(1, super::MAX_MICROS, DIGITS)
        .ok()?
        .distinct_values();
    let cap = HEADER + 9 * counts;
    let mut plain = Vec::new();
    flate2::read::ZlibDecoder::new(stream)
        .take(cap as u64 + 1)
        .read_to_end(&mut plain)
        .ok()?;
    let payload = be32(&plain, 4)? as usize;
    let ours = (HEADER..=cap).contains(&plain.len())
        && be32(&plain, 0)? == COOKIE
        && payload <= plain.len() - HEADER
        && be32(&plain, 12)? == u32::from(DIGITS)
        && be64(&plain, 16)? == 1
        && be64(&plain, 24)? == super::MAX_MICROS;
    if !ours {
        return None;
    }
    Deserializer::new()
        .deserialize(&mut &plain[..HEADER + payload])
        .ok()
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
pub fn table(scrape: &Scrape, per_shard: bool) -> String {
    let mut out = String::new();
    let header = |out: &mut String, first: &str| {
        let _ = writeln!(
            out,
            "{first:<26} {:<5} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "dir", "count", "p50", "p90", "p99", "p99.9", "max"
        );
    };
    let row = |out: &mut String, name: &str, dir: &str, r: Row| {
        let [p50, p90, p99, p999, max] = r.quantiles.map(human);
        let _ = writeln!(
            out,
            "{name:<26} {dir:<5} {:>10} {p50:>9} {p90:>9} {p99:>9} {p999:>9} {max:>9}",
            r.count
        );
    };
    let short = |m: &str| {
        m.trim_start_matches("shardproxy_")
            .trim_end_matches("_seconds")
            .to_string()
    };
    header(&mut out, "metric (all shards)");
    for ((metric, dir), h) in &scrape.merged {
        row(&mut out, &short(metric), dir, Row::of(h));
    }
    if per_shard {
        let _ = writeln!(out);
        header(&mut out, "metric [shard]");
        let mut sorted: Vec<&Line> = scrape.lines.iter().collect();
        sorted.sort_by(|a, b| {
            (&a.metric, &a.direction, &a.shard).cmp(&(&b.metric, &b.direction, &b.shard))
        });
        for l in sorted {
            row(
                &mut out,
                &format!("{} [{}]", short(&l.metric), l.shard),
                &l.direction,
                l.row,
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
            let r = r.trim_end_matches('/');
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
    // One write: `write!` on the stream would make a system call (and a
    // segment) per piece of the format.
    let request = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).map_err(io)?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    // Once the head is in: where the body starts, and its length if the
    // server gave one (RFC 9112 §6.3): the answer is complete then, even
    // if the server keeps the connection open.
    let mut framing: Option<(usize, Option<usize>)> = None;
    // What is wrong with the head's framing, reported after its status: a
    // `Transfer-Encoding` (chunked; shardproxy never sends one), or a
    // `Content-Length` that is not one number within MAX_BODY.
    let mut bad_framing: Option<String> = None;
    loop {
        if framing.is_none() {
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
                // Field lines, not obsolete folded continuations (RFC 9112
                // §5.2: those start with a space or a tab).
                let values = |name: &str| -> Vec<String> {
                    head.lines()
                        .skip(1)
                        .filter(|l| !l.starts_with([' ', '\t']))
                        .filter_map(|l| l.split_once(':'))
                        .filter(|(k, _)| k.trim() == name)
                        .map(|(_, v)| v.trim().to_string())
                        .collect()
                };
                let lengths = values("content-length");
                let length = match lengths.first() {
                    None => None,
                    Some(first) => {
                        let n = Some(first)
                            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                            .and_then(|v| v.parse::<u64>().ok())
                            .filter(|&n| n <= MAX_BODY && lengths.iter().all(|v| v == first));
                        if n.is_none() {
                            bad_framing =
                                Some(format!("a bad Content-Length ({})", lengths.join(", ")));
                            break;
                        }
                        n.map(|n| n as usize)
                    }
                };
                if values("transfer-encoding").iter().any(|v| v != "identity") {
                    bad_framing = Some(
                        "a chunked (or otherwise encoded) answer, which shardproxy never sends: is this a shardproxy metrics endpoint?".into(),
                    );
                    break;
                }
                framing = Some((end + 4, length));
            }
        }
        if let Some((start, Some(len))) = framing {
            if raw.len() >= start + len {
                raw.truncate(start + len);
                break;
            }
        }
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
    let mut words = status.split_whitespace();
    let ok = words.next().is_some_and(|v| v.starts_with("HTTP/1.")) && words.next() == Some("200");
    if !ok {
        return Err(StatsError::Status(url.to_string(), status.to_string()));
    }
    if let Some(why) = bad_framing {
        return Err(StatsError::Status(url.to_string(), why));
    }
    // Closed before the length it announced: the rest of the shards'
    // lines would be missing from the totals without a word.
    if let Some((start, Some(len))) = framing {
        let got = raw.len() - start;
        if got < len {
            return Err(StatsError::Status(
                url.to_string(),
                format!("an answer cut short: {got} of its {len} bytes"),
            ));
        }
    }
    Ok(body.to_string())
}

/// The `stats` command.
pub fn run(url: &str, per_shard: bool) -> Result<String, StatsError> {
    let body = fetch(url, "/histograms")?;
    Ok(table(&parse(&body, url)?, per_shard))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hdrhistogram::serialization::{Serializer, V2DeflateSerializer};

    /// HdrHistogram's V2 compressed encoding of a V2 header with these
    /// fields, followed by `payload`.
    fn encoded(payload_len: u32, digits: u32, low: u64, high: u64, payload: &[u8]) -> Vec<u8> {
        let mut inner = Vec::new();
        for v in [0x1c84_9313u32, payload_len, 0, digits] {
            inner.extend_from_slice(&v.to_be_bytes());
        }
        inner.extend_from_slice(&low.to_be_bytes());
        inner.extend_from_slice(&high.to_be_bytes());
        inner.extend_from_slice(&1.0f64.to_be_bytes());
        inner.extend_from_slice(payload);
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&inner).unwrap();
        let z = z.finish().unwrap();
        let mut out = Vec::new();
        out.extend_from_slice(&0x1c84_9314u32.to_be_bytes());
        out.extend_from_slice(&(z.len() as u32).to_be_bytes());
        out.extend_from_slice(&z);
        out
    }

    fn line(metric: &str, bytes: &[u8]) -> String {
        shard_line(metric, 0, bytes)
    }

    fn shard_line(metric: &str, shard: u32, bytes: &[u8]) -> String {
        format!(
            "{metric} shard={shard} role=forward direction=- {}\n",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        )
    }

    #[test]
    fn what_the_metrics_endpoint_writes_decodes_and_merges() {
        let mut h = Histogram::<u64>::new_with_bounds(1, crate::metrics::MAX_MICROS, 3).unwrap();
        for v in [5, 50, 500, 5000, 3_600_000_000] {
            h.record(v).unwrap();
        }
        let mut bytes = Vec::new();
        V2DeflateSerializer::new()
            .serialize(&h, &mut bytes)
            .unwrap();
        assert_eq!(decode(&bytes).unwrap(), h);
        let body = shard_line("m", 0, &bytes) + &shard_line("m", 1, &bytes);
        let scrape = parse(&body, "x").unwrap();
        assert_eq!(scrape.lines.len(), 2);
        assert_eq!(scrape.merged[&("m".into(), "-".into())].len(), 10);
        assert_eq!(scrape.lines[0].row.count, 5);
        // The same shard's histogram twice would count twice.
        let err = parse(&(line("m", &bytes) + &line("m", &bytes)), "x")
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "x: histogram line 2 repeats an earlier line's metric, shard and direction"
        );
    }

    /// Headers that would have the decoder allocate from what they state:
    /// a 4 GiB payload, a 2^62 bound with 5 digits (48 MiB of counts per
    /// line), other bounds than shardproxy's, and a stream that inflates
    /// past what any of its histograms needs. Each is refused before any
    /// allocation sized by it.
    #[test]
    fn headers_out_of_shardproxy_bounds_are_refused() {
        let max = crate::metrics::MAX_MICROS;
        assert!(decode(&encoded(1, 3, 1, max, &[0])).is_some());
        assert!(decode(&encoded(u32::MAX, 3, 1, max, &[0])).is_none());
        assert!(decode(&encoded(1, 5, 1, 1 << 62, &[0])).is_none());
        assert!(decode(&encoded(1, 3, 1, max * 2, &[0])).is_none());
        assert!(decode(&encoded(1, 2, 1, max, &[0])).is_none());
        assert!(decode(&encoded(1, 3, 2, max, &[0])).is_none());
        let bomb = vec![0u8; 1 << 20];
        assert!(decode(&encoded(bomb.len() as u32, 3, 1, max, &bomb)).is_none());
        // A header cut short of its 40 bytes (the payload check
        // underflowed, and the slice panicked: break-it round 23).
        let mut short = encoded(0, 3, 1, max, &[]);
        assert!(decode(&short).is_some());
        for cut in [8, 4, 1] {
            let mut inner = Vec::new();
            for v in [0x1c84_9313u32, 0, 0, 3] {
                inner.extend_from_slice(&v.to_be_bytes());
            }
            inner.extend_from_slice(&1u64.to_be_bytes());
            inner.extend_from_slice(&max.to_be_bytes());
            inner.extend_from_slice(&1.0f64.to_be_bytes()[..8 - cut]);
            let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            std::io::Write::write_all(&mut z, &inner).unwrap();
            let z = z.finish().unwrap();
            short = 0x1c84_9314u32.to_be_bytes().to_vec();
            short.extend_from_slice(&(z.len() as u32).to_be_bytes());
            short.extend_from_slice(&z);
            assert!(decode(&short).is_none(), "header {} bytes short", cut);
        }
        // Truncated and foreign encodings.
        let good = encoded(1, 3, 1, max, &[0]);
        assert!(decode(&good[..good.len() - 1]).is_none());
        assert!(decode(&good[..6]).is_none());
        assert!(decode(b"").is_none());
        let err = parse(&line("m", &encoded(u32::MAX, 3, 1, max, &[0])), "src")
            .err()
            .unwrap();
        assert_eq!(err.to_string(), "src: undecodable histogram line 1");
    }

    /// Any inner encoding, however mangled (bytes changed, cut short or
    /// grown; each then compressed as the endpoint would), is decoded or
    /// refused, never a panic: the sibling search for the short-header
    /// panic. 3000 cases from a fixed seed.
    #[test]
    fn mangled_encodings_never_panic() {
        let mut h = Histogram::<u64>::new_with_bounds(1, crate::metrics::MAX_MICROS, 3).unwrap();
        for v in [1, 7, 300, 40_000, 3_600_000_000] {
            h.record_n(v, v).unwrap();
        }
        let mut compressed = Vec::new();
        V2DeflateSerializer::new()
            .serialize(&h, &mut compressed)
            .unwrap();
        let mut plain = Vec::new();
        flate2::read::ZlibDecoder::new(&compressed[8..])
            .read_to_end(&mut plain)
            .unwrap();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..3000 {
            let mut m = plain.clone();
            match next() % 3 {
                0 => m.truncate((next() as usize) % (m.len() + 1)),
                1 => m.extend((0..next() % 64).map(|_| next() as u8)),
                _ => {}
            }
            for _ in 0..(next() % 4) {
                if !m.is_empty() {
                    let i = (next() as usize) % m.len();
                    m[i] = next() as u8;
                }
            }
            let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut z, &m).unwrap();
            let z = z.finish().unwrap();
            let mut bytes = 0x1c84_9314u32.to_be_bytes().to_vec();
            bytes.extend_from_slice(&(z.len() as u32).to_be_bytes());
            bytes.extend_from_slice(&z);
            let _ = decode(&bytes);
            let cut = (next() as usize) % (bytes.len() + 1);
            let _ = decode(&bytes[..cut]);
        }
    }

    #[test]
    fn too_many_metrics_or_lines_are_refused() {
        let good = encoded(1, 3, 1, crate::metrics::MAX_MICROS, &[0]);
        let body: String = (0..=MAX_KINDS)
            .map(|i| line(&format!("m{i}"), &good))
            .collect();
        let err = parse(&body, "src").err().unwrap();
        assert_eq!(
            err.to_string(),
            "src: more than 64 histogram metrics in one answer"
        );
        let body = line("m", &good).repeat(MAX_LINES + 1);
        let err = parse(&body, "src").err().unwrap();
        assert_eq!(
            err.to_string(),
            "src: more than 16384 histogram lines in one answer"
        );
    }
}
