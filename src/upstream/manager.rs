//! The process's one upstream manager thread: DNS re-resolution and active
//! health checks, off the shards' threads, with results sent to every shard
//! by message (see [`crate::upstream`]).
//!
//! * Every `--dns-refresh` it resolves each hostname again. A new endpoint
//!   set goes to every shard; connections to endpoints that went away keep
//!   running. A failed lookup keeps the last good set and is logged at most
//!   once a minute.
//! * Every `--health-check-interval` it probes every endpoint, all at once
//!   (one short-lived thread each, at most [`super::MAX_ENDPOINTS`]): a TCP
//!   connect for origins, a full tunnel handshake for an entry's exits (the
//!   hello, the server hello verified with the current primary key, the key
//!   confirmation and an empty stream, so the exit sees a clean, empty
//!   tunnel). An endpoint goes down after `--health-check-fails` failures
//!   in a row and comes back after `--health-check-passes` passes; every
//!   change goes to every shard. With no endpoint up, `/healthz` says 503.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::{resolve_all, Endpoint, HealthCheck, UpstreamSpec};
use crate::proto::{ClientHandshake, KeySet, CONFIRM_LEN, END_LEN, SALT_LEN, SERVER_HELLO_LEN};

/// What the manager tells the shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// The endpoint set changed (DNS).
    Endpoints(Vec<Endpoint>),
    /// Active health verdicts, by address.
    Health(Vec<(SocketAddr, bool)>),
}

/// How endpoints are probed.
pub enum Probe {
    /// A TCP connect (origins).
    Connect,
    /// A full tunnel handshake (an entry's exits) with the primary of these
    /// keys: the shards' keys, replaced by the same SIGHUP.
    Tunnel {
        /// The keys now.
        keys: std::sync::Arc<std::sync::Mutex<KeySet>>,
    },
}

/// The manager's settings.
pub struct Manager {
    /// As configured.
    pub specs: Vec<UpstreamSpec>,
    /// As resolved at start-up.
    pub endpoints: Vec<Endpoint>,
    /// `--dns-refresh`, if any spec is a hostname.
    pub dns_refresh: Option<Duration>,
    /// The proxy's own listen address: a re-resolved endpoint that loops
    /// back to it is dropped, as at start-up.
    pub listen: SocketAddr,
    /// `--dual-stack`: an IPv6 wildcard `listen` takes IPv4 clients too.
    pub dual_stack: bool,
    /// Active checks, if on.
    pub health: Option<HealthCheck>,
    /// Probe deadline (`--connect-timeout`, plus the handshake for tunnels).
    pub timeout: Duration,
    /// How to probe.
    pub probe: Probe,
    /// Delivers an update to every shard.
    pub send: Box<dyn Fn(Update) + Send>,
    /// Tells `/healthz` whether any endpoint is up.
    pub any_up: Box<dyn Fn(bool) + Send>,
}

/// Starts the manager's thread, if it has anything to do.
pub fn spawn(m: Manager) -> std::io::Result<()> {
    if m.dns_refresh.is_none() && m.health.is_none() {
        return Ok(());
    }
    std::thread::Builder::new()
        .name("upstreams".into())
        .spawn(move || run(m))
        .map(drop)
}

#[derive(Clone, Copy)]
struct Verdict {
    up: bool,
    fails: u32,
    passes: u32,
}

fn run(mut m: Manager) {
    let start = Instant::now();
    let mut next_dns = m.dns_refresh.map(|d| start + d);
    // The first round of checks at once: a dead endpoint is found within
    // `fails` intervals of start-up.
    let mut next_check = m.health.map(|_| start);
    let mut verdicts: HashMap<SocketAddr, Verdict> = HashMap::new();
    let mut last_dns_error: Option<Instant> = None;
    // Endpoints left out at the last refresh: each is reported once, when
    // it starts being left out, not at every refresh.
    let mut left_out: Vec<(SocketAddr, &'static str)> = Vec::new();
    loop {
        let wake = [next_dns, next_check].into_iter().flatten().min();
        let Some(wake) = wake else { return };
        std::thread::sleep(wake.saturating_duration_since(Instant::now()));
        let now = Instant::now();
        if let (Some(at), Some(every)) = (next_dns, m.dns_refresh) {
            if now >= at {
                next_dns = Some(now + every);
                let mut now_left_out = Vec::new();
                let resolved = resolve_all(&m.specs).map(|all| {
                    keep_usable(all, (m.listen, m.dual_stack), |dropped, why| {
                        now_left_out.push((dropped, why))
                    })
                });
                if resolved.is_ok() {
                    for line in newly_left_out(&left_out, &now_left_out) {
                        crate::warn!("{line}");
                    }
                    left_out = now_left_out;
                }
                match resolved {
                    Ok(fresh) if fresh.is_empty() => {
                        crate::warn!("upstreams re-resolved to no usable endpoint; keeping the last good endpoints");
                    }
                    Ok(fresh) if fresh != m.endpoints => {
                        crate::info!(
                            "upstreams re-resolved: {} endpoint(s) now ({})",
                            fresh.len(),
                            fresh
                                .iter()
                                .map(|e| e.addr.to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        );
                        m.endpoints = fresh.clone();
                        verdicts.retain(|a, _| fresh.iter().any(|e| e.addr == *a));
                        (m.send)(Update::Endpoints(fresh));
                        if !verdicts.is_empty() {
                            (m.send)(Update::Health(current(&verdicts)));
                        }
                    }
                    Ok(_) => {}
                    Err((i, e)) => {
                        if last_dns_error
                            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60))
                        {
                            crate::warn!(
                                "upstream {}: {e}; keeping the last good endpoints",
                                crate::log::one_line(&m.specs[i].name)
                            );
                            last_dns_error = Some(now);
                        }
                    }
                }
            }
        }
        if let (Some(at), Some(hc)) = (next_check, m.health) {
            if now >= at {
                next_check = Some(now + hc.interval);
                let keys = match &m.probe {
                    Probe::Connect => None,
                    Probe::Tunnel { keys } => keys.lock().ok().map(|k| k.clone()),
                };
                let results = probe_all(&m.endpoints, m.timeout, keys.as_ref());
                let mut changed = false;
                for (addr, result) in results {
                    let v = verdicts.entry(addr).or_insert(Verdict {
                        up: true,
                        fails: 0,
                        passes: 0,
                    });
                    match result {
                        Ok(()) => {
                            v.fails = 0;
                            v.passes = v.passes.saturating_add(1);
                            if !v.up && v.passes >= hc.passes {
                                v.up = true;
                                changed = true;
                                crate::info!(
                                    "upstream {addr}: health check passed {} time(s); up",
                                    v.passes
                                );
                            }
                        }
                        Err(why) => {
                            v.passes = 0;
                            v.fails = v.fails.saturating_add(1);
                            if v.up && v.fails >= hc.fails {
                                v.up = false;
                                changed = true;
                                crate::warn!(
                                    "upstream {addr}: health check failed {} time(s) ({}); down",
                                    v.fails,
                                    crate::log::one_line(&why)
                                );
                            }
                        }
                    }
                }
                (m.any_up)(verdicts.values().any(|v| v.up));
                if changed {
                    (m.send)(Update::Health(current(&verdicts)));
                }
            }
        }
    }
}

/// The warnings for endpoints left out now that were not at the last
/// refresh, one line per reason (a name with 300 records gave 44 lines a
/// second at `--dns-refresh 1s`, every refresh).
fn newly_left_out(
    before: &[(SocketAddr, &'static str)],
    now: &[(SocketAddr, &'static str)],
) -> Vec<String> {
    let mut lines = Vec::new();
    let mut reasons: Vec<&'static str> = Vec::new();
    for (_, why) in now {
        if !reasons.contains(why) {
            reasons.push(why);
        }
    }
    for why in reasons {
        let new: Vec<String> = now
            .iter()
            .filter(|d| d.1 == why && !before.contains(d))
            .map(|(a, _)| a.to_string())
            .collect();
        match new.len() {
            0 => {}
            1 => lines.push(format!("upstream endpoint {} dropped: {why}", new[0])),
            n if n <= 4 => lines.push(format!(
                "upstream endpoints {} dropped: {why}",
                new.join(", ")
            )),
            n => lines.push(format!(
                "upstream endpoints {} and {} more dropped: {why}",
                new[..3].join(", "),
                n - 3
            )),
        }
    }
    lines
}

/// The endpoints a re-resolution may use: none that loops back to the
/// proxy's own listener, at most [`super::MAX_ENDPOINTS`]; each one left
/// out is reported to `dropped`.
pub fn keep_usable(
    all: Vec<Endpoint>,
    (listen, dual_stack): (SocketAddr, bool),
    mut dropped: impl FnMut(SocketAddr, &'static str),
) -> Vec<Endpoint> {
    let mut out = Vec::with_capacity(all.len().min(super::MAX_ENDPOINTS));
    for e in all {
        if super::loops_to(listen, e.addr, dual_stack) {
            dropped(e.addr, "it is this proxy's own listen address");
        } else if out.len() >= super::MAX_ENDPOINTS {
            dropped(e.addr, "more than 256 endpoints");
        } else {
            out.push(e);
        }
    }
    out
}

fn current(verdicts: &HashMap<SocketAddr, Verdict>) -> Vec<(SocketAddr, bool)> {
    let mut v: Vec<(SocketAddr, bool)> = verdicts.iter().map(|(a, v)| (*a, v.up)).collect();
    v.sort();
    v
}

/// Probes every endpoint at once; each result within about `timeout`.
fn probe_all(
    endpoints: &[Endpoint],
    timeout: Duration,
    keys: Option<&KeySet>,
) -> Vec<(SocketAddr, Result<(), String>)> {
    std::thread::scope(|s| {
        // A thread the system refuses (`RLIMIT_NPROC`, `pids.max`): that
        // endpoint is probed here instead, after the others have started
        // (`scope`'s own `spawn` would panic, taking the process down).
        let handles: Vec<_> = endpoints
            .iter()
            .map(|e| {
                let addr = e.addr;
                let thread = std::thread::Builder::new()
                    .name("probe".into())
                    .spawn_scoped(s, move || probe(addr, timeout, keys));
                (addr, thread.ok())
            })
            .collect();
        handles
            .into_iter()
            .map(|(addr, h)| match h {
                Some(h) => (
                    addr,
                    h.join().unwrap_or_else(|_| Err("probe panicked".into())),
                ),
                None => (addr, probe(addr, timeout, keys)),
            })
            .collect()
    })
}

/// One probe: a TCP connect, or with `keys` a full tunnel handshake.
pub fn probe(addr: SocketAddr, timeout: Duration, keys: Option<&KeySet>) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    let Some(keys) = keys else {
        return Ok(());
    };
    let io = |what: &str, e: std::io::Error| format!("{what}: {e}");
    s.set_read_timeout(Some(timeout))
        .map_err(|e| io("socket", e))?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| io("socket", e))?;
    let mut salt = [0u8; SALT_LEN];
    getrandom::fill(&mut salt).map_err(|e| format!("random: {e}"))?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    // A probe may be refused: an exit none of whose upstreams is up then
    // says so (docs/PROTOCOL.md §3), and is marked down like one that is
    // unreachable, so that clients go to the other exits.
    let (hs, hello) = ClientHandshake::start_with_flags(
        keys.primary(),
        salt,
        now_ms,
        b"",
        crate::proto::FLAG_MAY_REFUSE,
    )
    .map_err(|e| e.to_string())?;
    s.write_all(&hello).map_err(|e| io("hello", e))?;
    // One deadline for the whole answer: a peer trickling a byte at a time
    // cannot hold the probe (and the round) beyond `timeout`.
    let deadline = Instant::now() + timeout;
    let mut answer = [0u8; SERVER_HELLO_LEN];
    let mut got = 0;
    while got < answer.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("no server hello within the timeout (a wrong key gets none)".into());
        }
        s.set_read_timeout(Some(left))
            .map_err(|e| io("socket", e))?;
        match s.read(&mut answer[got..]) {
            Ok(0) => return Err("closed before the server hello (a wrong key gets none)".into()),
            Ok(n) => got += n,
            Err(e) => return Err(io("no server hello (a wrong key gets none)", e)),
        }
    }
    let (mut enc, _) = hs
        .finish(&answer)
        .map_err(|e| format!("server hello: {e}"))?;
    // Close the tunnel cleanly: the key confirmation and an empty stream.
    let mut confirm = [0u8; CONFIRM_LEN];
    let mut end = [0u8; END_LEN];
    enc.seal_confirm(&mut confirm).map_err(|e| e.to_string())?;
    enc.seal_end(&mut end).map_err(|e| e.to_string())?;
    let mut out = confirm.to_vec();
    out.extend_from_slice(&end);
    s.write_all(&out).map_err(|e| io("confirmation", e))?;
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut sink = [0u8; 256];
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let _ = s.set_read_timeout(Some(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        ));
        match s.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn left_out_endpoints_are_reported_once_and_summed_up() {
        let a = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        const MANY: &str = "more than 256 endpoints";
        const SELF: &str = "it is this proxy's own listen address";
        let first: Vec<(SocketAddr, &'static str)> = (1..=10)
            .map(|p| (a(p), MANY))
            .chain([(a(99), SELF)])
            .collect();
        assert_eq!(
            newly_left_out(&[], &first),
            [
                format!("upstream endpoints 127.0.0.1:1, 127.0.0.1:2, 127.0.0.1:3 and 7 more dropped: {MANY}"),
                format!("upstream endpoint 127.0.0.1:99 dropped: {SELF}"),
            ]
        );
        // The next refresh leaves out the same: nothing to say.
        assert!(newly_left_out(&first, &first).is_empty());
        // One more is left out: only that one.
        let mut second = first.clone();
        second.push((a(11), MANY));
        assert_eq!(
            newly_left_out(&first, &second),
            [format!("upstream endpoint 127.0.0.1:11 dropped: {MANY}")]
        );
    }

    use super::*;

    #[test]
    fn a_re_resolved_endpoint_that_loops_back_is_dropped() {
        let listen: SocketAddr = "127.0.0.1:8000".parse().unwrap();
        let e = |a: &str| Endpoint {
            addr: a.parse().unwrap(),
            weight: 1,
            spec: 0,
        };
        let mut dropped = Vec::new();
        let kept = keep_usable(
            vec![e("127.0.0.1:8000"), e("127.0.0.2:8000")],
            (listen, false),
            |a, _| dropped.push(a),
        );
        assert_eq!(kept, vec![e("127.0.0.2:8000")]);
        assert_eq!(
            dropped,
            vec!["127.0.0.1:8000".parse::<SocketAddr>().unwrap()]
        );
        let many: Vec<Endpoint> = (0..300u16)
            .map(|p| e(&format!("127.0.0.9:{}", p + 1)))
            .collect();
        let mut n = 0;
        assert_eq!(
            keep_usable(many, (listen, false), |_, _| n += 1).len(),
            super::super::MAX_ENDPOINTS
        );
        assert_eq!(n, 300 - super::super::MAX_ENDPOINTS);
    }

    #[test]
    fn a_peer_trickling_its_answer_cannot_hold_a_tunnel_probe_past_its_timeout() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            if let Ok((mut c, _)) = l.accept() {
                for _ in 0..52 {
                    if c.write_all(b"x").is_err() {
                        return;
                    }
                    // The trickle is the input under test.
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        });
        let keys = KeySet::new(vec![crate::proto::Psk::from_bytes([7; 32])]);
        let started = Instant::now();
        let r = probe(addr, Duration::from_millis(700), Some(&keys));
        assert!(r.is_err());
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
}
