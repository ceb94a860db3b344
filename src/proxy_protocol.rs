//! The PROXY protocol (HAProxy, "The PROXY protocol, versions 1 & 2",
//! <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>): how a
//! load balancer in front of a proxy tells it the client's real address,
//! and how a proxy tells its upstream.
//!
//! Parsing and building are the `ppp` crate's; this module adds what the
//! proxy needs around it, sans I/O:
//!
//! * [`Reader`]: feeds the first bytes of a connection to the parser, with a
//!   size bound ([`MAX_HEADER`]), and says how many bytes the header took
//!   (the rest is the client's first data, which the session forwards).
//! * [`header_v2`]: the v2 header a `forward` or `exit` sends upstream, with
//!   the connection ID as TLV [`PP2_TYPE_CONNECTION_ID`].

use std::net::{IpAddr, SocketAddr};

/// The PP2 TLV type that carries shardproxy's connection ID (16 bytes, the
/// ID's big-endian bytes). 0xE0..=0xEF is the range the spec reserves for
/// custom use (section 2.2.7, `PP2_TYPE_MIN_CUSTOM`).
pub const PP2_TYPE_CONNECTION_ID: u8 = 0xE0;

/// The most bytes a PROXY header may take: the 16-byte v2 preamble and
/// 1024 bytes of addresses and TLVs (a v1 header is at most 107 bytes).
/// A longer header closes the connection (`bad_proxy_header`).
pub const MAX_HEADER: usize = 16 + 1024;

/// The v2 signature (spec section 2.2).
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header, CRLF included (spec section 2.1).
const V1_MAX: usize = 107;
/// A v1 header starts with this (spec section 2.1).
const V1_PREFIX: &[u8; 6] = b"PROXY ";

/// What an accepted header said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    /// The client's address, as the balancer saw it.
    pub source: SocketAddr,
    /// The address the client connected to.
    pub destination: SocketAddr,
}

/// The result of feeding a connection's first bytes to [`Reader::parse`].
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A complete header of `len` bytes. `addresses` is `None` for a v2
    /// `LOCAL` command (a balancer's own health check), a v2 `PROXY`
    /// command whose family is `AF_UNSPEC` or `AF_UNIX`, and v1 `UNKNOWN`:
    /// the connection is served as one from the balancer itself.
    Header {
        /// Bytes the header took; what follows is the client's data.
        len: usize,
        /// The client's addresses, if the header carries them.
        addresses: Option<Addresses>,
    },
    /// Not enough bytes yet.
    Incomplete,
    /// Not a valid header (or longer than [`MAX_HEADER`]): why, in a few
    /// words.
    Invalid(&'static str),
}

/// Parses the start of a connection. `input` holds every byte read so far.
pub fn parse(input: &[u8]) -> Parsed {
    if input.is_empty() {
        return Parsed::Incomplete;
    }
    let v2 = starts_like(input, V2_SIGNATURE);
    let v1 = starts_like(input, V1_PREFIX);
    if !v1 && !v2 {
        return Parsed::Invalid("no PROXY protocol header");
    }
    // Wait for the whole header before parsing: `ppp` judges some partial
    // v1 headers (one cut after a port's space) malformed rather than
    // incomplete, and a header may arrive in any number of segments.
    let input = if v2 {
        if input.len() < 16 {
            return Parsed::Incomplete;
        }
        // Refuse an oversized header before waiting for its body.
        let total = 16 + u16::from_be_bytes([input[14], input[15]]) as usize;
        if total > MAX_HEADER {
            return Parsed::Invalid("PROXY v2 header longer than allowed");
        }
        if input.len() < total {
            return Parsed::Incomplete;
        }
        // `LOCAL` (version 2, command 0): the receiver "MUST ignore the
        // protocol block" (spec section 2.2), whatever family it names,
        // even one whose addresses are not there (HAProxy's own health
        // checks send a bare LOCAL header), and serves the connection as
        // the balancer's own.
        if input[12] == 0x20 {
            return Parsed::Header {
                len: total,
                addresses: None,
            };
        }
        &input[..total]
    } else {
        match input.windows(2).position(|w| w == b"\r\n") {
            // `UNKNOWN`: "the receiver must ignore anything presented
            // before the CRLF" (spec section 2.1).
            Some(end)
                if end + 2 <= V1_MAX
                    && (input[..end + 2].starts_with(b"PROXY UNKNOWN ")
                        || input[..end + 2].starts_with(b"PROXY UNKNOWN\r")) =>
            {
                return Parsed::Header {
                    len: end + 2,
                    addresses: None,
                }
            }
            Some(end) if end + 2 <= V1_MAX => &input[..end + 2],
            Some(_) => return Parsed::Invalid("PROXY v1 header longer than 107 bytes"),
            None if input.len() >= V1_MAX => {
                return Parsed::Invalid("PROXY v1 header longer than 107 bytes")
            }
            None => return Parsed::Incomplete,
        }
    };
    match ppp::HeaderResult::parse(input) {
        ppp::HeaderResult::V2(Ok(h)) => match check_v2(&h) {
            Err(why) => Parsed::Invalid(why),
            Ok(()) => Parsed::Header {
                len: h.len(),
                addresses: match (h.command, h.addresses) {
                    (ppp::v2::Command::Local, _) => None,
                    (_, ppp::v2::Addresses::IPv4(a)) => Some(Addresses {
                        source: SocketAddr::new(IpAddr::V4(a.source_address), a.source_port),
                        destination: SocketAddr::new(
                            IpAddr::V4(a.destination_address),
                            a.destination_port,
                        ),
                    }),
                    (_, ppp::v2::Addresses::IPv6(a)) => Some(Addresses {
                        source: SocketAddr::new(IpAddr::V6(a.source_address), a.source_port),
                        destination: SocketAddr::new(
                            IpAddr::V6(a.destination_address),
                            a.destination_port,
                        ),
                    }),
                    // PROXY over a Unix socket or an unspecified family: no
                    // TCP client address to use. The spec leaves the receiver
                    // "free to accept the connection anyway and use the real
                    // endpoint addresses or to reject it" (proxy-protocol.txt
                    // §2.2); HAProxy accepts, and so do we, as for v1
                    // `UNKNOWN`: a balancer fronting Unix-socket clients sends it.
                    _ => None,
                },
            },
        },
        ppp::HeaderResult::V1(Ok(h)) => Parsed::Header {
            len: h.header.len(),
            addresses: match h.addresses {
                ppp::v1::Addresses::Unknown => None,
                ppp::v1::Addresses::Tcp4(a) => Some(Addresses {
                    source: SocketAddr::new(IpAddr::V4(a.source_address), a.source_port),
                    destination: SocketAddr::new(
                        IpAddr::V4(a.destination_address),
                        a.destination_port,
                    ),
                }),
                ppp::v1::Addresses::Tcp6(a) => Some(Addresses {
                    source: SocketAddr::new(IpAddr::V6(a.source_address), a.source_port),
                    destination: SocketAddr::new(
                        IpAddr::V6(a.destination_address),
                        a.destination_port,
                    ),
                }),
            },
        },
        // The whole header is here: anything but a header is malformed.
        ppp::HeaderResult::V1(_) => Parsed::Invalid("malformed PROXY v1 header"),
        ppp::HeaderResult::V2(_) => Parsed::Invalid("malformed PROXY v2 header"),
    }
}

/// The PP2 TLV type of a CRC-32C checksum of the whole header (spec
/// section 2.2.3, `PP2_TYPE_CRC32C`): 4 bytes, big-endian.
const PP2_TYPE_CRC32C: u8 = 0x03;

/// What `ppp` leaves to the receiver in a v2 header it parsed:
///
/// * A `PROXY` command for a datagram (UDP) connection is refused: this is
///   a TCP proxy, and its client is not that UDP peer (HAProxy refuses it
///   too). A `LOCAL` command's protocol is ignored, as the spec says.
/// * The TLVs must fill the rest of the header exactly, each within it
///   (`ppp` parses them lazily, so a TLV that claims more bytes than
///   follow would otherwise pass).
/// * A `PP2_TYPE_CRC32C` TLV is verified: CRC-32C (Castagnoli, RFC 4960
///   appendix B) of the whole header with the checksum's 4 bytes zeroed
///   must equal its value, big-endian (spec section 2.2.3: a receiver that
///   supports it "MUST treat the TCP connection providing the header as
///   invalid" otherwise).
fn check_v2(h: &ppp::v2::Header<'_>) -> Result<(), &'static str> {
    if h.command == ppp::v2::Command::Proxy && h.protocol == ppp::v2::Protocol::Datagram {
        return Err("PROXY v2 header for a datagram (UDP) connection");
    }
    let header = h.as_bytes();
    // The TLVs are the header's tail, after the addresses.
    let mut at = header.len() - h.tlvs().as_bytes().len();
    let mut crc_at = None;
    while at < header.len() {
        let Some(&[kind, hi, lo]) = header.get(at..at + 3) else {
            return Err("malformed PROXY v2 header (a TLV overruns it)");
        };
        let len = u16::from_be_bytes([hi, lo]) as usize;
        if header.len() - at - 3 < len {
            return Err("malformed PROXY v2 header (a TLV overruns it)");
        }
        if kind == PP2_TYPE_CRC32C {
            if len != 4 || crc_at.is_some() {
                return Err("malformed PROXY v2 header (bad CRC32C TLV)");
            }
            crc_at = Some(at + 3);
        }
        at += 3 + len;
    }
    if let Some(at) = crc_at {
        let want = u32::from_be_bytes(header[at..at + 4].try_into().expect("4 bytes"));
        let crc = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
        let mut digest = crc.digest();
        digest.update(&header[..at]);
        digest.update(&[0; 4]);
        digest.update(&header[at + 4..]);
        if digest.finalize() != want {
            return Err("PROXY v2 header with a wrong CRC32C");
        }
    }
    Ok(())
}

/// Whether `input` and `prefix` agree on their common length.
fn starts_like(input: &[u8], prefix: &[u8]) -> bool {
    let n = input.len().min(prefix.len());
    input[..n] == prefix[..n]
}

/// A PROXY protocol v2 header (`PROXY` command, TCP) from `source` (the
/// client) to `destination` (the address it connected to), with the
/// connection ID as TLV [`PP2_TYPE_CONNECTION_ID`]. Addresses of different
/// families are both written as IPv6 (IPv4-mapped), as the spec allows.
pub fn header_v2(source: SocketAddr, destination: SocketAddr, id: u128) -> Vec<u8> {
    let (source, destination) = match (source, destination) {
        (SocketAddr::V4(_), SocketAddr::V6(_)) => (mapped(source), destination),
        (SocketAddr::V6(_), SocketAddr::V4(_)) => (source, mapped(destination)),
        same => same,
    };
    let built = ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (source, destination),
    )
    .write_tlv(PP2_TYPE_CONNECTION_ID, &id.to_be_bytes())
    .and_then(|b| b.build());
    // Writing into a Vec cannot fail, and the header is far below the
    // format's 64 KiB limit.
    built.unwrap_or_default()
}

/// A PROXY protocol v2 `LOCAL` header: "this connection is the proxy's
/// own"; the upstream uses the socket's addresses.
pub fn header_v2_local() -> Vec<u8> {
    let mut h = V2_SIGNATURE.to_vec();
    h.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    h
}

fn mapped(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port()),
        v6 => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_v2_header_we_build_parses_back_with_its_connection_id() {
        let h = header_v2(addr("192.0.2.7:40000"), addr("10.1.2.3:443"), 0xabcdef);
        // Signature, v2 PROXY, TCP over IPv4, 12 address bytes + a 19-byte TLV.
        assert_eq!(&h[..12], V2_SIGNATURE);
        assert_eq!(h[12], 0x21);
        assert_eq!(h[13], 0x11);
        assert_eq!(u16::from_be_bytes([h[14], h[15]]), 12 + 3 + 16);
        let mut with_data = h.clone();
        with_data.extend_from_slice(b"GET /");
        assert_eq!(
            parse(&with_data),
            Parsed::Header {
                len: h.len(),
                addresses: Some(Addresses {
                    source: addr("192.0.2.7:40000"),
                    destination: addr("10.1.2.3:443"),
                }),
            }
        );
        let tlv = &h[16 + 12..];
        assert_eq!(tlv[0], PP2_TYPE_CONNECTION_ID);
        assert_eq!(u16::from_be_bytes([tlv[1], tlv[2]]), 16);
        assert_eq!(u128::from_be_bytes(tlv[3..].try_into().unwrap()), 0xabcdef);
    }

    #[test]
    fn mixed_families_are_written_as_ipv6() {
        let h = header_v2(addr("192.0.2.7:1"), addr("[2001:db8::1]:2"), 1);
        assert_eq!(h[13], 0x21);
        match parse(&h) {
            Parsed::Header {
                addresses: Some(a), ..
            } => assert_eq!(a.source, addr("[::ffff:192.0.2.7]:1")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn v1_headers_are_read_up_to_their_crlf() {
        let input = b"PROXY TCP4 198.51.100.1 203.0.113.9 56324 443\r\nhello";
        assert_eq!(
            parse(input),
            Parsed::Header {
                len: input.len() - 5,
                addresses: Some(Addresses {
                    source: addr("198.51.100.1:56324"),
                    destination: addr("203.0.113.9:443"),
                }),
            }
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            Parsed::Header {
                len: 15,
                addresses: None
            }
        );
    }

    #[test]
    fn every_prefix_of_a_header_is_incomplete_and_garbage_is_invalid_at_once() {
        let v2 = header_v2(addr("[2001:db8::7]:9"), addr("[2001:db8::1]:2"), 5);
        let v1 = b"PROXY TCP6 2001:db8::7 2001:db8::1 9 2\r\n".to_vec();
        for h in [v2, v1] {
            for n in 0..h.len() {
                assert_eq!(parse(&h[..n]), Parsed::Incomplete, "{n} bytes");
            }
        }
        assert!(matches!(parse(b"GET / HTTP/1.1\r\n"), Parsed::Invalid(_)));
        assert!(matches!(parse(b"\r\n\r\n\0\r\nQUIX"), Parsed::Invalid(_)));
        assert!(matches!(
            parse(b"PROXY TCP4 1.2.3.4 nonsense\r\n"),
            Parsed::Invalid(_)
        ));
    }

    #[test]
    fn a_v2_local_command_carries_no_address() {
        let h = header_v2_local();
        assert_eq!(
            parse(&h),
            Parsed::Header {
                len: 16,
                addresses: None
            }
        );
    }

    /// A PROXY command for a Unix-socket or unspecified client (family
    /// 0x3 or 0x0; proxy-protocol.txt §2.2) is served as from the balancer,
    /// as HAProxy does; a break-it round found it refused.
    #[test]
    fn a_v2_proxy_command_without_a_tcp_family_carries_no_address() {
        // AF_UNIX, stream: two 108-byte paths.
        let mut unix = V2_SIGNATURE.to_vec();
        unix.extend_from_slice(&[0x21, 0x31, 0x00, 216]);
        unix.extend_from_slice(&[0u8; 216]);
        // AF_UNSPEC: no address block.
        let mut unspec = V2_SIGNATURE.to_vec();
        unspec.extend_from_slice(&[0x21, 0x00, 0x00, 0x00]);
        for (h, len) in [(unix, 232), (unspec, 16)] {
            assert_eq!(
                parse(&h),
                Parsed::Header {
                    len,
                    addresses: None
                }
            );
        }
    }

    #[test]
    fn oversized_headers_are_refused_before_their_body() {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(matches!(parse(&h), Parsed::Invalid(_)));
        // A v1 header without its CRLF past the v1 limit.
        let mut v1 = b"PROXY TCP4 ".to_vec();
        v1.resize(200, b'1');
        assert!(matches!(parse(&v1), Parsed::Invalid(_)));
    }

    #[test]
    fn random_bytes_after_either_prefix_never_panic_and_never_exceed_the_bound() {
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..20_000 {
            let mut input = if round % 2 == 0 {
                V2_SIGNATURE.to_vec()
            } else {
                b"PROXY TCP4 ".to_vec()
            };
            let extra = (next() % 1200) as usize;
            input.extend((0..extra).map(|_| {
                // Mostly header-like bytes, so parsing gets deep.
                let r = next();
                if round % 2 == 1 && r % 3 == 0 {
                    b"0123456789. \r\n:"[(r % 15) as usize]
                } else {
                    r as u8
                }
            }));
            if let Parsed::Header { len, .. } = parse(&input) {
                assert!(len <= MAX_HEADER && len <= input.len());
            }
        }
    }

    #[test]
    fn a_bad_v2_signature_is_invalid() {
        let mut h = header_v2(addr("192.0.2.7:1"), addr("10.0.0.1:2"), 1);
        h[5] ^= 0xff;
        assert!(matches!(parse(&h), Parsed::Invalid(_)));
    }

    /// A v2 header: `command` (0 `LOCAL`, 1 `PROXY`), `family_protocol`
    /// (0x11 TCP over IPv4), IPv4 addresses, then `tlvs`.
    fn v2_with(command: u8, family_protocol: u8, tlvs: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family_protocol);
        h.extend_from_slice(&((12 + tlvs.len()) as u16).to_be_bytes());
        h.extend_from_slice(&[192, 0, 2, 7, 10, 0, 0, 1, 0x9c, 0x40, 0x01, 0xbb]);
        h.extend_from_slice(tlvs);
        h
    }

    /// A `PROXY` header with `tlvs`, then a CRC32C TLV filled in as a
    /// sender does (spec section 2.2.3: zeros, then the checksum of the
    /// whole header, big-endian).
    fn with_crc(tlvs: &[u8]) -> Vec<u8> {
        let mut all = tlvs.to_vec();
        all.extend_from_slice(&[PP2_TYPE_CRC32C, 0, 4, 0, 0, 0, 0]);
        let mut h = v2_with(1, 0x11, &all);
        let crc = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI).checksum(&h);
        let at = h.len() - 4;
        h[at..].copy_from_slice(&crc.to_be_bytes());
        h
    }

    #[test]
    fn v2_tlvs_must_fit_the_header() {
        let noop = [0x04, 0, 2, 0, 0];
        assert!(matches!(
            parse(&v2_with(1, 0x11, &noop)),
            Parsed::Header {
                addresses: Some(_),
                ..
            }
        ));
        // A TLV that claims 500 bytes with 3 behind it (a break-it round's
        // header, which was served), and tails too short for a TLV.
        for tlvs in [&[0x04, 0x01, 0xf4, 1, 2, 3][..], &[0x04, 0], &[0x04]] {
            assert_eq!(
                parse(&v2_with(1, 0x11, tlvs)),
                Parsed::Invalid("malformed PROXY v2 header (a TLV overruns it)"),
                "{tlvs:?}"
            );
        }
    }

    #[test]
    fn a_v2_crc32c_is_verified() {
        // The catalogue's check value (CRC-32C of "123456789").
        let crc = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
        assert_eq!(crc.checksum(b"123456789"), 0xe306_9283);
        let good = with_crc(&[0x04, 0, 1, 0]);
        assert!(matches!(
            parse(&good),
            Parsed::Header {
                addresses: Some(_),
                ..
            }
        ));
        // Any changed byte of the addresses, the other TLV or the checksum
        // (the first TLV at 28..32, the checksum's at 32..39).
        for at in 16..good.len() {
            let mut bad = good.clone();
            bad[at] ^= 0x20;
            // Not the TLVs' lengths (then the walk fails first), nor the
            // checksum's type (then there is no checksum).
            if matches!(at, 29 | 30 | 32 | 33 | 34) {
                continue;
            }
            assert_eq!(
                parse(&bad),
                Parsed::Invalid("PROXY v2 header with a wrong CRC32C"),
                "byte {at}"
            );
        }
        // A checksum of another size, or two of them.
        let short = v2_with(1, 0x11, &[PP2_TYPE_CRC32C, 0, 3, 0, 0, 0]);
        let twice = with_crc(&[PP2_TYPE_CRC32C, 0, 4, 0, 0, 0, 0]);
        for h in [short, twice] {
            assert_eq!(
                parse(&h),
                Parsed::Invalid("malformed PROXY v2 header (bad CRC32C TLV)")
            );
        }
    }

    #[test]
    fn a_v1_unknown_header_is_served_whatever_follows_it() {
        for line in [
            &b"PROXY UNKNOWN\r\n"[..],
            b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n",
            b"PROXY UNKNOWN junk\r\n",
        ] {
            let mut input = line.to_vec();
            input.extend_from_slice(b"GET /");
            assert_eq!(
                parse(&input),
                Parsed::Header {
                    len: line.len(),
                    addresses: None
                }
            );
        }
        assert!(matches!(parse(b"PROXY UNKNOWNX\r\n"), Parsed::Invalid(_)));
    }

    #[test]
    fn a_v2_local_header_is_served_whatever_its_block_says() {
        // Every family, with no address bytes at all (a break-it round had
        // all but AF_UNSPEC reset), and with junk where TLVs would be.
        for family in [0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32] {
            let mut h = V2_SIGNATURE.to_vec();
            h.extend_from_slice(&[0x20, family, 0, 0]);
            assert_eq!(
                parse(&h),
                Parsed::Header {
                    len: 16,
                    addresses: None
                },
                "family {family:#x}"
            );
            let mut junk = V2_SIGNATURE.to_vec();
            junk.extend_from_slice(&[0x20, family, 0, 3, 0xff, 0xff, 0xff]);
            assert!(matches!(
                parse(&junk),
                Parsed::Header {
                    len: 19,
                    addresses: None
                }
            ));
        }
    }

    #[test]
    fn a_v2_proxy_for_udp_is_refused_and_a_local_one_is_not() {
        assert_eq!(
            parse(&v2_with(1, 0x12, &[])),
            Parsed::Invalid("PROXY v2 header for a datagram (UDP) connection")
        );
        // `LOCAL`: the balancer's own connection, whatever the block says.
        assert!(matches!(
            parse(&v2_with(0, 0x12, &[])),
            Parsed::Header {
                addresses: None,
                ..
            }
        ));
    }
}
