//! Keep-alive tunnels (docs/PROTOCOL.md §4.1): the payloads of the two
//! chunks that frame each session after the first on one connection.
//!
//! ```text
//! entry → exit   start chunk, the first chunk after a session boundary
//!   payload = flags (1) ‖ meta (0..=64, the TLV block of §2.1)
//! exit → entry   status chunk, the answer to a start (or, on an idle
//!                tunnel, unprompted: 0x03 going away)
//!   payload = status (1)
//! ```
//!
//! Both are ordinary data chunks of the running session keys: the chunk
//! counters go on across sessions, so a start or a status cannot be
//! replayed, reordered or moved to another connection. What makes a chunk
//! a start or a status is only its place in the stream.

use super::{ProtoError, META_LEN};

/// The largest start-chunk payload: its flags byte and a whole `meta`.
pub const START_MAX: usize = 1 + META_LEN;

/// Builds a start chunk's payload, `(bytes, len)`: the session's flags
/// (only [`super::FLAG_MAY_REFUSE`] has a meaning here) and its `meta`.
///
/// Errors: `meta` longer than [`META_LEN`].
pub fn start_payload(flags: u8, meta: &[u8]) -> Result<([u8; START_MAX], usize), ProtoError> {
    if meta.len() > META_LEN {
        return Err(ProtoError::MetaTooLong);
    }
    let mut out = [0u8; START_MAX];
    out[0] = flags;
    out[1..1 + meta.len()].copy_from_slice(meta);
    Ok((out, 1 + meta.len()))
}

/// Splits a start chunk's payload into the session's flags and its `meta`
/// block (1 to 65 bytes in all).
pub fn parse_start(payload: &[u8]) -> Result<(u8, &[u8]), ProtoError> {
    match payload.split_first() {
        Some((&flags, meta)) if meta.len() <= META_LEN => Ok((flags, meta)),
        _ => Err(ProtoError::KeepAlive("a start chunk is 1 to 65 bytes")),
    }
}

/// A status chunk's one byte: [`super::STATUS_OK`] or a refusal
/// ([`super::STATUS_NO_UPSTREAM`], [`super::STATUS_BUSY`],
/// [`super::STATUS_GOING_AWAY`]; other values are refusals too).
pub fn parse_status(payload: &[u8]) -> Result<u8, ProtoError> {
    match payload {
        [status] => Ok(*status),
        _ => Err(ProtoError::KeepAlive("a status chunk is 1 byte")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_and_status_payloads() {
        let meta = [7u8; META_LEN];
        let (buf, len) = start_payload(0x01, &meta).unwrap();
        assert_eq!(len, START_MAX);
        assert_eq!(parse_start(&buf[..len]).unwrap(), (0x01, &meta[..]));
        let (buf, len) = start_payload(0, &[]).unwrap();
        assert_eq!(parse_start(&buf[..len]).unwrap(), (0, &[][..]));
        assert!(start_payload(0, &[0; META_LEN + 1]).is_err());
        assert!(parse_start(&[]).is_err());
        assert!(parse_start(&[0; START_MAX + 1]).is_err());
        assert_eq!(parse_status(&[3]).unwrap(), 3);
        assert!(parse_status(&[]).is_err());
        assert!(parse_status(&[0, 0]).is_err());
    }
}
