//! Parsers for the human units every CLI flag and config key uses:
//! durations (`100us`, `500ms`, `30s`, `2m`, `1h`), sizes (`16KiB`, `1MiB`,
//! `4096`) and socket addresses with IPv6 zones (`[fe80::1%eth0]:80`).
//!
//! Pure functions, so clap's `value_parser` and the config file (which is
//! translated into flags) share one implementation and one set of error
//! messages.

use std::time::Duration;

/// Parses a duration with a mandatory unit: `us` (or `µs`), `ms`, `s`, `m`
/// or `h`.
///
/// A bare number is rejected on purpose: `--idle-timeout 30` is ambiguous
/// (seconds? milliseconds?) and an operator should never have to guess.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("`{text}` has no unit; write e.g. 500ms, 30s, 2m or 1h"))?;
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() {
        return Err(format!(
            "`{text}` is not a duration; write e.g. 500ms, 30s, 2m or 1h"
        ));
    }
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is too large"))?;
    let micros_per_unit: u64 = match unit {
        // Also the micro sign (U+00B5) and the Greek mu (U+03BC).
        "us" | "\u{b5}s" | "\u{3bc}s" => 1,
        "ms" => 1_000,
        "s" => 1_000_000,
        "m" => 60_000_000,
        "h" => 3_600_000_000,
        _ => {
            return Err(unit_error(
                text,
                unit,
                "us, ms, s, m or h, e.g. 500ms or 30s",
                if unit.ends_with("ms") {
                    "write 1500us for 1.5ms"
                } else {
                    "write 1500ms for 1.5s"
                },
            ))
        }
    };
    value
        .checked_mul(micros_per_unit)
        .map(Duration::from_micros)
        .ok_or_else(|| format!("`{text}` is too large"))
}

/// Parses a size in bytes: a plain number, or a number with `B`, `KiB`, `MiB`
/// or `GiB` (binary units; `K`/`KB` are accepted as KiB, as most tools do).
/// Units are case-insensitive: `16k`, `16K`, `16KiB` and `16kib` are equal.
pub fn parse_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() {
        return Err(format!(
            "`{text}` is not a size; write e.g. 16KiB, 1MiB or 4096"
        ));
    }
    let value: usize = digits
        .parse()
        .map_err(|_| format!("`{text}` is too large"))?;
    let multiplier: usize = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => {
            return Err(unit_error(
                text,
                unit,
                "B, K/KiB, M/MiB or G/GiB (any case), e.g. 16KiB",
                "write 1536KiB for 1.5MiB",
            ))
        }
    };
    value
        .checked_mul(multiplier)
        .ok_or_else(|| format!("`{text}` is too large"))
}

/// Parses a count setting's whole number: `3`, `+3`, and also `-1`.
///
/// A negative or oversized value parses, so that the setting's own range
/// check (`config::ranges`) reports it against the documented range ("must
/// be between 1 and 100") instead of the integer type's.
///
/// Errors: not a whole number (`1e3`, `1.5`, `ten`), or beyond ±2^63.
pub fn parse_count(text: &str) -> Result<i64, String> {
    let text = text.trim();
    let digits = text.strip_prefix(['+', '-']).unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("`{text}` is not a whole number"));
    }
    text.parse()
        .map_err(|_| format!("`{text}` is far out of range"))
}

/// The message for a unit that does not parse, naming the likely slip.
/// `example` shows a fraction written whole, in the setting's own units.
fn unit_error(text: &str, unit: &str, units: &str, example: &str) -> String {
    if unit.starts_with(char::is_whitespace) {
        format!("`{text}`: write the unit right after the number, without a space; use {units}")
    } else if unit.starts_with(['.', ',']) {
        format!("`{text}`: whole numbers only ({example}); use {units}")
    } else {
        format!("`{text}` has unknown unit `{unit}`; use {units}")
    }
}

/// Formats a duration the way [`parse_duration`] reads it back.
pub fn format_duration(d: Duration) -> String {
    if d.subsec_nanos() % 1_000_000 != 0 {
        return format!("{}us", d.as_micros());
    }
    let ms = d.as_millis();
    if ms % 3_600_000 == 0 && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1_000 == 0 {
        format!("{}s", ms / 1_000)
    } else {
        format!("{ms}ms")
    }
}

/// Formats a measured duration for a log line: whole milliseconds below a
/// second, tenths of a second above (`9.8s`, never `9788149us`); an exact
/// setting prints as [`format_duration`] does.
pub fn format_approx(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else if d.subsec_nanos() == 0 {
        format_duration(d)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// Parses `IP:PORT`, `[IPV6]:PORT` or `[IPV6%ZONE]:PORT`, where the zone
/// (RFC 4007 §11, the scope of a link-local address) is a numeric scope
/// id or, unlike `SocketAddr`'s parser, an interface name (`%eth0`, as
/// ip(8) and ping(8) take it), looked up in this network namespace.
/// `Err(Some(why))` says what is wrong with a zone; `Err(None)` is any
/// other malformed address, for the caller's usage hint.
pub fn parse_socket_addr(text: &str) -> Result<std::net::SocketAddr, Option<String>> {
    if let Ok(addr) = text.parse::<std::net::SocketAddr>() {
        return Ok(addr);
    }
    let zoned = text
        .strip_prefix('[')
        .and_then(|t| t.split_once("]:"))
        .and_then(|(host, port)| Some((host.split_once('%')?, port)));
    let Some(((ip, zone), port)) = zoned else {
        return Err(None);
    };
    let (Ok(ip), Ok(port)) = (ip.parse::<std::net::Ipv6Addr>(), port.parse::<u16>()) else {
        return Err(None);
    };
    let scope = crate::sys::interface_index(zone).ok_or_else(|| {
        Some(format!(
            "no network interface `{}` here (the zone after `%` names one, as in [fe80::1%eth0]:80, or gives its index)",
            zone.escape_debug()
        ))
    })?;
    Ok(std::net::SocketAddr::V6(std::net::SocketAddrV6::new(
        ip, port, 0, scope,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("30").unwrap_err().contains("no unit"));
        assert!(parse_duration("ms").is_err());
        assert!(parse_duration("3d").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("30 s")
            .unwrap_err()
            .contains("without a space"));
        assert!(parse_duration("1.5s")
            .unwrap_err()
            .contains("whole numbers"));
        assert!(parse_duration("99999999999999999999s").is_err());
        assert!(parse_duration("18446744073709551615h").is_err());
        // Microseconds, for --wake-batch-wait.
        assert_eq!(parse_duration("100us"), Ok(Duration::from_micros(100)));
        assert_eq!(parse_duration("7\u{b5}s"), Ok(Duration::from_micros(7)));
        assert_eq!(parse_duration("7\u{3bc}s"), Ok(Duration::from_micros(7)));
        assert!(parse_duration("1.5ms")
            .unwrap_err()
            .contains("1500us for 1.5ms"));
        assert!(parse_duration("1.5s")
            .unwrap_err()
            .contains("1500ms for 1.5s"));
        assert!(parse_duration("5ns")
            .unwrap_err()
            .contains("us, ms, s, m or h"));
    }

    #[test]
    fn durations_print_as_they_parse() {
        for text in ["100us", "1500us", "500ms", "30s", "2m", "1h", "0s"] {
            let d = parse_duration(text).unwrap();
            assert_eq!(format_duration(d), text);
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
    }

    #[test]
    fn measured_durations_print_coarsely() {
        assert_eq!(format_approx(Duration::from_micros(9_788_149)), "9.8s");
        assert_eq!(format_approx(Duration::from_micros(1_500)), "1ms");
        assert_eq!(format_approx(Duration::from_millis(250)), "250ms");
        assert_eq!(format_approx(Duration::from_secs(20)), "20s");
        assert_eq!(format_approx(Duration::from_millis(2_500)), "2.5s");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16KiB"), Ok(16384));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("2K"), Ok(2048));
        for same in ["16k", "16K", "16KB", "16kb", "16KiB", "16kib"] {
            assert_eq!(parse_size(same), Ok(16384), "{same}");
        }
        assert!(parse_size("KiB").is_err());
        assert!(parse_size("1TiB").is_err());
        assert!(parse_size("16 KiB")
            .unwrap_err()
            .contains("without a space"));
        // The example is a size, not a duration ("write 1500ms" it said).
        assert!(parse_size("1.5MiB")
            .unwrap_err()
            .contains("whole numbers only (write 1536KiB for 1.5MiB)"));
        assert!(parse_size("-1").is_err());
    }

    #[test]
    fn duration_round_trip() {
        for text in ["500ms", "30s", "2m", "1h", "0s", "1500ms"] {
            assert_eq!(format_duration(parse_duration(text).unwrap()), text);
        }
    }
}
