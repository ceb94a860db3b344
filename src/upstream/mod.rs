//! Upstream pools: several endpoints behind one proxy, chosen per
//! connection, retried on failure, ejected when they keep failing, checked
//! actively and re-resolved, all per shard and shared-nothing.
//!
//! * [`UpstreamSpec`]: one `--upstream` as configured (`HOST:PORT`, with
//!   an optional weight). A hostname expands to **every** A/AAAA record.
//! * [`pool::Pool`]: a shard's view of the endpoints: its own balancer
//!   state, active-connection counts, passive health (consecutive connect
//!   failures → ejection with a doubling backoff, as nginx's
//!   `max_fails`/`fail_timeout` and Envoy's outlier detection do), and the
//!   verdicts of the active checker. Nothing in it is shared with another
//!   core; a connection holds an `Rc` of its endpoint.
//! * [`manager`]: one thread per process that re-resolves hostnames every
//!   `--dns-refresh` and runs the active health checks every
//!   `--health-check-interval` (a TCP connect for origins, a full tunnel
//!   handshake for an entry's exits), and sends the results to every shard
//!   by message. Check traffic per endpoint does not grow with the shard
//!   count.

pub mod manager;
pub mod pool;

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

/// How a shard picks an endpoint for a new connection (`--balance`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// Weighted round robin (nginx's smooth weighted algorithm): over any
    /// run of connections on one shard, each endpoint gets its share to
    /// within one connection.
    RoundRobin,
    /// The fewest active connections relative to weight, counted per shard.
    LeastConnections,
    /// Two endpoints at random, the one with fewer active connections
    /// relative to weight (Mitzenmacher's power of two choices).
    RandomTwo,
    /// A hash of the client's IP address (weighted rendezvous hashing): one
    /// client keeps landing on the same endpoint while the set is stable,
    /// on every shard and every process, and a change of the set moves only
    /// the clients of the endpoints that changed.
    SourceHash,
}

impl Balance {
    /// Parses `--balance`.
    pub fn parse(s: &str) -> Option<Balance> {
        match s {
            "round-robin" => Some(Balance::RoundRobin),
            "least-connections" => Some(Balance::LeastConnections),
            "random-two" => Some(Balance::RandomTwo),
            "source-hash" => Some(Balance::SourceHash),
            _ => None,
        }
    }

    /// The flag value.
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round-robin",
            Balance::LeastConnections => "least-connections",
            Balance::RandomTwo => "random-two",
            Balance::SourceHash => "source-hash",
        }
    }
}

/// One configured `--upstream`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSpec {
    /// `HOST:PORT` as written: the metrics label and the name resolved.
    pub name: String,
    /// Relative share of connections (1–1000, default 1).
    pub weight: u32,
}

/// Largest `weight=`.
pub const MAX_WEIGHT: u32 = 1000;
/// Most endpoints one proxy balances over (after resolution).
pub const MAX_ENDPOINTS: usize = 256;

impl UpstreamSpec {
    /// Parses `HOST:PORT` or `HOST:PORT weight=N`.
    pub fn parse(text: &str) -> Result<UpstreamSpec, String> {
        let mut parts = text.split_whitespace();
        let name = parts.next().ok_or("empty")?.to_string();
        let mut weight = None;
        for option in parts {
            match option.split_once('=') {
                Some(("weight", _)) if weight.is_some() => {
                    return Err("weight given twice".into());
                }
                Some(("weight", n)) => {
                    weight = Some(
                        n.parse::<u32>()
                            .ok()
                            .filter(|w| (1..=MAX_WEIGHT).contains(w))
                            .ok_or_else(|| format!("weight `{n}` must be 1 to {MAX_WEIGHT}"))?,
                    );
                }
                _ => return Err(format!("unknown option `{option}` (expected weight=N)")),
            }
        }
        let Some((host, port)) = name.rsplit_once(':') else {
            return Err("expected HOST:PORT".into());
        };
        // `::1:80` is the IPv6 address ::1:80 with no port, or ::1 port 80
        // (what the resolver would make of it): RFC 3986 §3.2.2 brackets
        // are the way to say which.
        if name.starts_with('[') && !name.contains("]:") {
            return Err("expected [IPV6]:PORT".into());
        }
        if host.contains(':') && !name.starts_with('[') {
            return Err(format!(
                "an IPv6 address goes in brackets, the port after them: [{host}]:{port}, or [{name}]:PORT if all of it is the address (as for --listen)"
            ));
        }
        Ok(UpstreamSpec {
            name,
            weight: weight.unwrap_or(1),
        })
    }

    /// Every address the name stands for now (all A/AAAA records, sorted,
    /// without duplicates). Blocks on DNS: call it at start-up or from the
    /// manager's thread, never from a shard.
    pub fn resolve(&self) -> Result<Vec<SocketAddr>, String> {
        let mut addrs: Vec<SocketAddr> = match crate::units::parse_socket_addr(&self.name) {
            Ok(a) => vec![a],
            Err(Some(why)) => return Err(why),
            Err(None) => self
                .name
                .to_socket_addrs()
                .map_err(|e| format!("cannot resolve: {e}"))?
                .collect(),
        };
        addrs.sort();
        addrs.dedup();
        if addrs.is_empty() {
            return Err("name resolved to no addresses".into());
        }
        if let Some(a) = addrs.iter().find(|a| a.port() == 0) {
            return Err(format!("port 0 ({a}) cannot be connected to"));
        }
        Ok(addrs)
    }
}

/// One endpoint: an address and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    /// Where to connect.
    pub addr: SocketAddr,
    /// Its weight (its spec's).
    pub weight: u32,
    /// Index of its [`UpstreamSpec`] (the metrics label).
    pub spec: usize,
}

/// Whether connecting to `upstream` reaches the listener on `listen`
/// (`dual_stack`: an IPv6 wildcard that takes IPv4 clients too): the same
/// port, and the same address, or, when `listen` is a wildcard, an address
/// of this host in a family it takes. A connect to the unspecified address
/// (`0.0.0.0`, `::`) goes to the loopback address of its family (Linux:
/// `ip_route_connect`, `tcp_v6_connect`). For "an address of this host",
/// see [`is_local`]. A loop through a second proxy cannot be seen from
/// here.
pub fn loops_to(listen: SocketAddr, upstream: SocketAddr, dual_stack: bool) -> bool {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    if listen.port() != upstream.port() {
        return false;
    }
    // `[::ffff:127.0.0.1]` is 127.0.0.1 written as IPv6: compare the
    // canonical forms.
    let up = match upstream.ip().to_canonical() {
        IpAddr::V4(a) if a.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(a) if a.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        a => a,
    };
    let l = listen.ip().to_canonical();
    if !l.is_unspecified() {
        return l == up;
    }
    let takes = match (l, up) {
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => true,
        (IpAddr::V6(_), IpAddr::V4(_)) => dual_stack,
        (IpAddr::V4(_), IpAddr::V6(_)) => false,
    };
    // An IPv6 link-local address means nothing without its scope (the
    // interface): keep the upstream's.
    let scope = match upstream {
        SocketAddr::V6(a) => a.scope_id(),
        SocketAddr::V4(_) => 0,
    };
    takes && is_local(up, scope)
}

/// Whether `ip` (with `scope`, an IPv6 interface index or 0) is an address
/// of this host: a loopback address; one whose route is local, which a
/// connected UDP socket shows by taking it, or a loopback address, as its
/// own source address (no packet is sent); or one a socket can be bound to, unless the host lets
/// any address be bound (`ip_nonlocal_bind`). The bind alone missed every
/// address under `ip_nonlocal_bind`, and a link-local one (bound without its
/// scope); the route alone misses the rest of a prefix that is local as a
/// whole (`198.51.100.0/24` on `lo`), which takes the prefix's first
/// address as source (break-it round 23).
fn is_local(ip: std::net::IpAddr, scope: u32) -> bool {
    use std::net::{IpAddr, SocketAddrV6, UdpSocket};
    if ip.is_loopback() {
        return true;
    }
    // A multicast group is no host's address (a socket binds to one to
    // receive from it); a TCP connect to it fails anyway.
    if ip.is_multicast() || ip == IpAddr::V4(std::net::Ipv4Addr::BROADCAST) {
        return false;
    }
    let at = |port| match ip {
        IpAddr::V4(a) => SocketAddr::from((a, port)),
        IpAddr::V6(a) => SocketAddr::V6(SocketAddrV6::new(a, port, 0, scope)),
    };
    let any: SocketAddr = match ip {
        IpAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    // The route is local when the kernel takes the address itself as the
    // source, or a loopback one: a local route with no address of its own
    // in it (`ip -6 route add local 2001:db8::/64 dev lo`) leaves ::1, and
    // a connect there still reaches a wildcard listener (break-it round
    // 23, third pass).
    let routed_here = UdpSocket::bind(any)
        .and_then(|s| s.connect(at(9)).and_then(|()| s.local_addr()))
        .is_ok_and(|own| own.ip() == ip || own.ip().is_loopback());
    if routed_here {
        return true;
    }
    let sysctl = match ip {
        IpAddr::V4(_) => "/proc/sys/net/ipv4/ip_nonlocal_bind",
        IpAddr::V6(_) => "/proc/sys/net/ipv6/ip_nonlocal_bind",
    };
    let any_binds = std::fs::read_to_string(sysctl).is_ok_and(|v| v.trim() != "0");
    !any_binds && UdpSocket::bind(at(0)).is_ok()
}

/// Resolves every spec: the endpoint set, in spec order.
pub fn resolve_all(specs: &[UpstreamSpec]) -> Result<Vec<Endpoint>, (usize, String)> {
    let mut out = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        for addr in spec.resolve().map_err(|e| (i, e))? {
            out.push(Endpoint {
                addr,
                weight: spec.weight,
                spec: i,
            });
        }
    }
    Ok(out)
}

/// Active health checks (`--health-check-*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthCheck {
    /// How often every endpoint is probed.
    pub interval: Duration,
    /// Consecutive failed probes before an endpoint is down.
    pub fails: u32,
    /// Consecutive passed probes before a down endpoint is up again.
    pub passes: u32,
}

/// Everything about the upstream side of a proxy.
#[derive(Debug, Clone)]
pub struct Upstreams {
    /// As configured.
    pub specs: Vec<UpstreamSpec>,
    /// Resolved at start-up.
    pub endpoints: Vec<Endpoint>,
    /// `--balance`.
    pub balance: Balance,
    /// `--connect-attempts`: endpoints tried per client before giving up.
    pub connect_attempts: u32,
    /// `--max-fails`: consecutive failures that eject an endpoint.
    pub max_fails: u32,
    /// `--fail-timeout`: the first ejection's length; each further one
    /// doubles it, up to [`MAX_EJECTION_FACTOR`] times.
    pub fail_timeout: Duration,
    /// Active checks, if on.
    pub health: Option<HealthCheck>,
    /// `--dns-refresh`.
    pub dns_refresh: Duration,
}

/// An ejection lasts at most this many times `--fail-timeout`.
pub const MAX_EJECTION_FACTOR: u32 = 32;

impl Upstreams {
    /// Whether any spec is a hostname (needs re-resolution).
    pub fn has_names(&self) -> bool {
        self.specs
            .iter()
            .any(|s| crate::units::parse_socket_addr(&s.name).is_err())
    }

    /// The endpoints as one line: `a:1 (10.0.0.1:1, 10.0.0.2:1), b:2 weight=3`.
    pub fn describe(&self) -> String {
        self.specs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let addrs: Vec<String> = self
                    .endpoints
                    .iter()
                    .filter(|e| e.spec == i)
                    .map(|e| e.addr.to_string())
                    .collect();
                let weight = if s.weight == 1 {
                    String::new()
                } else {
                    format!(" weight={}", s.weight)
                };
                if addrs.len() == 1 && addrs[0] == s.name {
                    format!("{}{weight}", s.name)
                } else {
                    format!("{} ({}){weight}", s.name, addrs.join(", "))
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_with_and_without_a_weight() {
        assert_eq!(
            UpstreamSpec::parse("10.0.0.1:80").unwrap(),
            UpstreamSpec {
                name: "10.0.0.1:80".into(),
                weight: 1
            }
        );
        assert_eq!(UpstreamSpec::parse("h:80 weight=3").unwrap().weight, 3);
        assert!(UpstreamSpec::parse("h:80 weight=0").is_err());
        assert!(UpstreamSpec::parse("h:80 weight=1001").is_err());
        assert_eq!(
            UpstreamSpec::parse("h:80 weight=5 weight=6").unwrap_err(),
            "weight given twice"
        );
        assert!(UpstreamSpec::parse("h:80 wait=3").is_err());
        assert!(UpstreamSpec::parse("h").is_err());
        assert!(UpstreamSpec::parse("").is_err());
    }

    #[test]
    fn a_name_expands_to_every_address() {
        let spec = UpstreamSpec::parse("localhost:80").unwrap();
        let addrs = spec.resolve().unwrap();
        assert!(!addrs.is_empty());
        assert!(addrs.iter().all(|a| a.port() == 80 && a.ip().is_loopback()));
    }
}
