//! The client hello's `meta` block (docs/PROTOCOL.md §2.1): who the client
//! is, carried authenticated from the entry to the exit.
//!
//! Type-length-value entries, one after another, in at most [`META_LEN`]
//! bytes: `type (1) ‖ len (1) ‖ value (len)`. Receivers skip types they do
//! not know, so later fields fit without a version change.
//!
//! | type | field | value |
//! |---|---|---|
//! | 0x01 | original client address | IPv4: 4 address bytes ‖ port (2, BE); IPv6: 16 ‖ 2 |
//! | 0x02 | address the client connected to | same encoding |
//! | 0x03 | connection ID | 16 bytes, big-endian |
//! | 0x04 | the entry's patience for a status | milliseconds, u32 big-endian |
//!
//! All four together take at most 2+18 + 2+18 + 2+16 + 2+4 = 64 bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use super::META_LEN;

/// Type of the original client address.
pub const META_CLIENT: u8 = 0x01;
/// Type of the address the client connected to.
pub const META_DESTINATION: u8 = 0x02;
/// Type of the connection ID.
pub const META_CONNECTION_ID: u8 = 0x03;
/// Type of the entry's patience: how long it waits for a status
/// (docs/PROTOCOL.md §3.1, §4.1), its `--handshake-timeout`.
pub const META_PATIENCE: u8 = 0x04;

/// What `meta` says about a connection. Every field is optional: an entry
/// of an older version sends an empty block.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Meta {
    /// The original client's address and port.
    pub client: Option<SocketAddr>,
    /// The address and port the client connected to.
    pub destination: Option<SocketAddr>,
    /// The connection ID (random, 128 bits), shared by the entry's and the
    /// exit's access-log lines.
    pub id: Option<u128>,
    /// How long the entry waits for a status after it sent a session's
    /// first bytes (its `--handshake-timeout`; milliseconds on the wire,
    /// at most `u32::MAX`). An exit that owes a status answers within nine
    /// tenths of the shorter of this and its own handshake timeout.
    pub patience: Option<Duration>,
}

impl Meta {
    /// Encodes the block: `(bytes, len)`, the bytes zero-padded to
    /// [`META_LEN`].
    pub fn encode(&self) -> ([u8; META_LEN], usize) {
        let mut out = [0u8; META_LEN];
        let mut at = 0;
        let mut put = |kind: u8, value: &[u8]| {
            out[at] = kind;
            out[at + 1] = value.len() as u8;
            out[at + 2..at + 2 + value.len()].copy_from_slice(value);
            at += 2 + value.len();
        };
        let mut addr_buf = [0u8; 18];
        if let Some(a) = self.client {
            put(META_CLIENT, addr_bytes(a, &mut addr_buf));
        }
        if let Some(a) = self.destination {
            put(META_DESTINATION, addr_bytes(a, &mut addr_buf));
        }
        if let Some(id) = self.id {
            put(META_CONNECTION_ID, &id.to_be_bytes());
        }
        if let Some(p) = self.patience {
            let ms = u32::try_from(p.as_millis()).unwrap_or(u32::MAX);
            put(META_PATIENCE, &ms.to_be_bytes());
        }
        (out, at)
    }

    /// Decodes a block. Unknown types are skipped; a known type with a
    /// malformed value is ignored, and an entry that runs past the end
    /// ends the block (the hello is authenticated, so this is a buggy
    /// entry, never an attacker: the session goes on without the field).
    pub fn decode(block: &[u8]) -> Meta {
        let mut meta = Meta::default();
        let mut rest = block;
        while rest.len() >= 2 {
            let (kind, len) = (rest[0], rest[1] as usize);
            let Some(value) = rest.get(2..2 + len) else {
                break;
            };
            match kind {
                META_CLIENT => meta.client = parse_addr(value),
                META_DESTINATION => meta.destination = parse_addr(value),
                META_CONNECTION_ID => {
                    meta.id = <[u8; 16]>::try_from(value).ok().map(u128::from_be_bytes)
                }
                META_PATIENCE => {
                    meta.patience = <[u8; 4]>::try_from(value)
                        .ok()
                        .map(|ms| Duration::from_millis(u32::from_be_bytes(ms).into()))
                }
                _ => {}
            }
            rest = &rest[2 + len..];
        }
        meta
    }
}

fn addr_bytes(a: SocketAddr, buf: &mut [u8; 18]) -> &[u8] {
    match a.ip() {
        IpAddr::V4(ip) => {
            buf[..4].copy_from_slice(&ip.octets());
            buf[4..6].copy_from_slice(&a.port().to_be_bytes());
            &buf[..6]
        }
        IpAddr::V6(ip) => {
            buf[..16].copy_from_slice(&ip.octets());
            buf[16..18].copy_from_slice(&a.port().to_be_bytes());
            &buf[..18]
        }
    }
}

fn parse_addr(v: &[u8]) -> Option<SocketAddr> {
    match v.len() {
        6 => {
            let ip: [u8; 4] = v[..4].try_into().ok()?;
            Some(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(ip)),
                u16::from_be_bytes([v[4], v[5]]),
            ))
        }
        18 => {
            let ip: [u8; 16] = v[..16].try_into().ok()?;
            Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(ip)),
                u16::from_be_bytes([v[16], v[17]]),
            ))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_block_fits_and_round_trips() {
        let meta = Meta {
            client: Some("[2001:db8::7]:65535".parse().unwrap()),
            destination: Some("[2001:db8::1]:443".parse().unwrap()),
            id: Some(u128::MAX - 5),
            patience: Some(Duration::from_secs(300)),
        };
        let (bytes, len) = meta.encode();
        assert_eq!(len, META_LEN);
        assert_eq!(Meta::decode(&bytes[..len]), meta);
        // The zero padding decodes as nothing (type 0, length 0 entries).
        assert_eq!(Meta::decode(&bytes), meta);
    }

    #[test]
    fn unknown_types_are_skipped_and_truncation_ends_the_block() {
        let mut block = vec![0x7f, 3, 1, 2, 3];
        block.extend_from_slice(&[META_CLIENT, 6, 192, 0, 2, 1, 0x1f, 0x90]);
        block.extend_from_slice(&[META_CONNECTION_ID, 16, 1]);
        let meta = Meta::decode(&block);
        assert_eq!(meta.client, Some("192.0.2.1:8080".parse().unwrap()));
        assert_eq!(meta.id, None);
        assert_eq!(Meta::decode(&[]), Meta::default());
        assert_eq!(Meta::decode(&[META_CLIENT, 5, 1, 2, 3, 4, 5]).client, None);
        assert_eq!(
            Meta::decode(&[META_PATIENCE, 4, 0, 0, 0x27, 0x10]).patience,
            Some(Duration::from_secs(10))
        );
        assert_eq!(Meta::decode(&[META_PATIENCE, 2, 0x27, 0x10]).patience, None);
    }
}
