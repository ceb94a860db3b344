//! Listening sockets (one per shard, `SO_REUSEPORT`) and the accept loop.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use glommio::net::TcpListener;
use glommio::sync::Semaphore;
use socket2::{Domain, Protocol, Socket, Type};

use crate::access_log::Record;
use crate::config::Config;
use crate::context::ShardCtx;
use crate::error::{SessionError, Side, StartupError};
use crate::stats::CloseReason;
use crate::trigger::bounded;

/// Binds one `SO_REUSEPORT` listener per shard on `cfg.listen`, not
/// listening yet ([`listen_all`] starts them once every shard can serve).
///
/// All sockets are created here, before any shard starts, so a port in use is
/// a start-up error, and `:0` resolves to one port that every shard shares.
pub fn bind_all(cfg: &Config, shards: usize) -> Result<Vec<Socket>, StartupError> {
    let mut addr = cfg.listen;
    let mut sockets = Vec::with_capacity(shards);
    for _ in 0..shards {
        let socket = bind_one(addr, cfg.dual_stack).map_err(|e| match e.kind() {
            io::ErrorKind::AddrInUse => StartupError::AddrInUse(addr),
            io::ErrorKind::PermissionDenied => StartupError::AddrAccess(addr),
            io::ErrorKind::AddrNotAvailable => StartupError::AddrNotAvail(addr),
            _ => StartupError::Listen { addr, source: e },
        })?;
        if addr.port() == 0 {
            addr = socket
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .ok_or(StartupError::AddrNotAvail(addr))?;
        }
        sockets.push(socket);
    }
    Ok(sockets)
}

/// Binds `count` more listeners on `addr`, to join its `SO_REUSEPORT`
/// group once they listen ([`listen_all`]): the shards a successor has
/// beyond its predecessor's.
pub fn bind_more(
    cfg: &Config,
    addr: SocketAddr,
    count: usize,
) -> Result<Vec<Socket>, StartupError> {
    (0..count)
        .map(|_| {
            bind_one(addr, cfg.dual_stack).map_err(|source| StartupError::Listen { addr, source })
        })
        .collect()
}

/// Whether something already listens on `addr` (a bind without
/// `SO_REUSEPORT` fails): then `bind_all` joins another process's group.
///
/// The probe sets `SO_REUSEADDR`, as our listeners do: on Linux that bind
/// still fails against a listening socket, but not against the `TIME_WAIT`
/// connections a previous run left on the port, which are no group to join.
pub fn port_taken(addr: SocketAddr) -> bool {
    if addr.port() == 0 {
        return false;
    }
    let Ok(socket) = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
    else {
        return false;
    };
    if socket.set_reuse_address(true).is_err() {
        return false;
    }
    matches!(socket.bind(&addr.into()), Err(e) if e.kind() == io::ErrorKind::AddrInUse)
}

fn bind_one(addr: SocketAddr, dual_stack: bool) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        // `[::]:port` means IPv6 only unless --dual-stack, as in nginx: an
        // operator who wants IPv4 too says so, and can run a second listener.
        socket.set_only_v6(!dual_stack)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// Starts listening on every socket (`listen(2)` with `backlog`; on an
/// inherited, already listening socket it only sets the new backlog).
///
/// Called once every shard can serve, never at bind time: from its
/// `listen` on, a socket of a `SO_REUSEPORT` group gets its share of the
/// group's new connections (the kernel hashes each SYN to one listening
/// socket), and a process that failed or stalled before it accepted them
/// would reset or hold them, where the other process of the group (the
/// predecessor of a hand-over, or a surge deployment's old pod) serves them.
/// Errors: the first `listen` that failed, as [`StartupError::Listen`].
pub fn listen_all(sockets: &[Socket], cfg: &Config) -> Result<(), StartupError> {
    let addr = cfg.listen;
    for socket in sockets {
        socket
            .listen(cfg.backlog.min(i32::MAX as u32) as i32)
            .map_err(|source| StartupError::Listen { addr, source })?;
        if matches!(cfg.mode, crate::config::Mode::Exit(_)) {
            // The peer is an entry (ours, with TCP_NODELAY; an exit takes no
            // PROXY header, so no balancer speaks to it on a client's
            // behalf): its hello's ACK can ride on the server hello (see
            // `Conn::delay_acks`). Accepted sockets inherit this from the
            // listener. Set after `listen`, which resets a socket's ACK
            // mode (`inet_csk_listen_start` → `inet_csk_delack_init`), and
            // on every listener, inherited ones and those bound for a
            // successor's extra shards too.
            let _ = socket.set_quickack(false);
        }
    }
    Ok(())
}

const MIN_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// The accept loop's own state: what its sessions reported back.
struct AcceptState {
    /// A session ran out of file descriptors for its upstream socket.
    fd_exhausted: Cell<bool>,
    /// Failures of this process (not of a peer), logged rate-limited.
    internal: RefCell<crate::log::RateLimited>,
    /// Tunnel handshakes and authentication that failed (a wrong key, a
    /// probe), logged rate-limited so a key mismatch shows in the log.
    auth: RefCell<crate::log::RateLimited>,
    /// Upstream connects that failed or timed out.
    connect: RefCell<crate::log::RateLimited>,
    /// Handshakes that timed out, and idle connections closed.
    timeout: RefCell<crate::log::RateLimited>,
    /// Connections reset or failed by a peer mid-stream.
    reset: RefCell<crate::log::RateLimited>,
    /// Clients refused for their PROXY protocol header.
    proxy_header: RefCell<crate::log::RateLimited>,
}

/// Accepts until the shard stops accepting, then drops the listener so the
/// kernel refuses new connections.
///
/// A permit is taken *before* `accept`, so at `--max-connections` the shard
/// simply stops accepting (clients wait in the backlog) instead of accepting
/// and closing. Accept errors back off exponentially, so EMFILE can't spin.
/// Every wait here is [`bounded`] by the stop trigger, which is polled first:
/// an accept that fails at once, or a free permit, cannot hold off stop.
/// `permits` is the shard's (`--max-connections`), shared by every accept
/// loop of the shard (a shard accepts on several listeners after a hand-over
/// from a process with more shards).
///
/// The first `unset` sockets accepted turn Nagle off themselves
/// (`TCP_NODELAY`), and set `SO_LINGER` {1, 0} where clients speak plain
/// TCP; the rest inherit both from the listener (see
/// `conn::set_client_options`).
pub async fn accept_loop(
    listener: TcpListener,
    mut unset: usize,
    ctx: Rc<ShardCtx>,
    permits: Rc<Semaphore>,
) {
    let state = Rc::new(AcceptState {
        fd_exhausted: Cell::new(false),
        internal: RefCell::new(crate::log::RateLimited::new()),
        auth: RefCell::new(crate::log::RateLimited::new()),
        connect: RefCell::new(crate::log::RateLimited::new()),
        timeout: RefCell::new(crate::log::RateLimited::new()),
        reset: RefCell::new(crate::log::RateLimited::new()),
        proxy_header: RefCell::new(crate::log::RateLimited::new()),
    });
    let stop = ctx.accepting_stopped().clone();
    let gated = !matches!(ctx.config().mode, crate::config::Mode::Exit(_));
    let mut log = crate::log::RateLimited::new();
    let mut backoff = MIN_BACKOFF;
    let id = ctx.id();
    loop {
        // A session could not open its upstream socket (EMFILE/ENFILE):
        // accepting more clients would only reset them. Back off as for a
        // failed accept and leave them waiting in the backlog instead.
        let failure = if state.fd_exhausted.replace(false) {
            Some(io::Error::other(
                "out of file descriptors for upstream sockets",
            ))
        } else {
            // The exit takes its session permit only after a handshake has
            // authenticated: pending handshakes have their own budget
            // (`--max-handshakes`, oldest evicted), so unauthenticated
            // connections can never hold every session slot.
            let permit = if gated {
                let Ok(permit) = bounded(&stop, None, permits.acquire_static_permit(1)).await
                else {
                    break;
                };
                let Ok(permit) = permit else { break };
                Some(permit)
            } else {
                None
            };
            match bounded(&stop, None, listener.shared_accept()).await {
                Err(_) => break,
                Ok(Ok(accepted)) => {
                    // The peer as `accept4` returned it: no `getpeername`.
                    let peer = accepted.peer_addr().ok();
                    let stream = accepted.bind_to_executor();
                    if unset > 0 {
                        // Queued before this process set the listener's
                        // options: set what it would have passed on.
                        unset -= 1;
                        crate::conn::set_client_options(&socket2::SockRef::from(&stream), gated);
                    }
                    if !state.fd_exhausted.get() {
                        backoff = MIN_BACKOFF;
                    }
                    ctx.on_accept();
                    let (ctx, state) = (ctx.clone(), state.clone());
                    glommio::spawn_local(async move {
                        let rec = Record::new(ctx.connection_id());
                        rec.peer.set(peer);
                        let (result, kept) = crate::session::run(stream, &ctx, &rec).await;
                        drop(permit);
                        if kept.is_some() {
                            // Counted before this session's close, so that a
                            // drain waits for the tunnel's goodbye.
                            ctx.idle_began();
                        }
                        state.closed(&ctx, &rec, &result);
                        if let Some(tunnel) = kept {
                            // An exit's keep-alive tunnel: its next sessions.
                            let done = |rec: &Record, result: &Result<(), _>| {
                                state.closed(&ctx, rec, result)
                            };
                            crate::session::serve_kept(tunnel, &ctx, peer, done).await;
                        }
                    })
                    .detach();
                    None
                }
                Ok(Err(e)) => Some(io::Error::from(e)),
            }
        };
        if let Some(err) = failure {
            ctx.stats().on_accept_error();
            log.log(|n| {
                format!("shard {id}: accept failed: {err} (retrying in {backoff:?}; {n} similar errors suppressed)")
            });
            if bounded(&stop, None, glommio::timer::sleep(backoff))
                .await
                .is_err()
            {
                break;
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
    drop(listener);
}

impl AcceptState {
    /// Books a finished session: its close reason (counted), a warning
    /// for the failures worth one, a debug line, its access-log line.
    fn closed(&self, ctx: &ShardCtx, rec: &Record, result: &Result<(), SessionError>) {
        let reason = crate::session::close_reason(result, rec, &ctx.config().mode);
        match result {
            // A probe's reset is not worth a warning.
            Err(e) if reason != CloseReason::Empty => self.report(ctx.id(), e, rec),
            _ => {}
        }
        crate::debug!(
            "shard {}: connection {:032x} from {} closed: {} after {:?}, {} B up, {} B down{}",
            ctx.id(),
            rec.id.get(),
            rec.client()
                .map_or_else(|| "?".to_string(), |c| c.to_string()),
            reason.as_str(),
            rec.accepted_at.elapsed(),
            rec.bytes_up.get(),
            rec.bytes_down.get(),
            result
                .as_ref()
                .err()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        );
        ctx.log_access(rec, Some(reason));
        ctx.on_close(reason);
    }

    /// Takes in what a finished session reports. Every failure is counted
    /// by close reason; each kind also gets a log line (at most one per
    /// second per kind and accept loop, with the count of those
    /// suppressed) naming the side that failed and the client.
    fn report(&self, shard: usize, e: &SessionError, rec: &Record) {
        let client = match (rec.client(), rec.peer.get()) {
            (Some(c), Some(p)) if c != p => format!("client {c} via {p}"),
            (Some(c), _) => format!("client {c}"),
            (None, _) => "client address unknown".to_string(),
        };
        let line = |n: u64, what: String| {
            format!("shard {shard}: {what} ({client}; {n} similar suppressed)")
        };
        if e.is_fd_exhaustion() {
            self.fd_exhausted.set(true);
            return;
        }
        match e {
            SessionError::Refused { cause: None, .. } => {
                self.connect.borrow_mut().log(|n| line(n, e.to_string()));
            }
            SessionError::Refused { cause: Some(_), .. }
            | SessionError::Connect(_)
            | SessionError::ConnectTimeout
            | SessionError::NoUpstream { .. } => {
                let upstream = rec
                    .upstream
                    .get()
                    .map_or_else(|| "?".to_string(), |u| u.to_string());
                // `e` counts the attempts and names the last failure.
                self.connect
                    .borrow_mut()
                    .log(|n| line(n, format!("{e} (last endpoint tried: {upstream})")));
            }
            SessionError::HandshakeTimeout(_) | SessionError::Idle => {
                self.timeout.borrow_mut().log(|n| line(n, e.to_string()));
            }
            SessionError::BadProxyHeader(_) => {
                self.proxy_header
                    .borrow_mut()
                    .log(|n| line(n, format!("{e}; closed")));
            }
            SessionError::Io { .. }
            | SessionError::Truncated(_)
            | SessionError::Unanswered { .. } => {
                self.reset.borrow_mut().log(|n| line(n, e.to_string()));
            }
            _ if e.reason() == CloseReason::AuthFailed => {
                self.auth.borrow_mut().log(|n| {
                    line(n, format!("tunnel handshake or authentication failed: {e} (a wrong key on one side looks like this)"))
                });
            }
            _ if e.side() == Side::Internal && !matches!(e, SessionError::Drained) => {
                self.internal
                    .borrow_mut()
                    .log(|n| line(n, format!("session failed: {e}")));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Instant;

    /// A live listener is a group to join; the `TIME_WAIT` connections a
    /// stopped process left on its port are not (a restart after traffic
    /// used to warn that it joined another process's group).
    #[test]
    fn time_wait_leftovers_are_not_a_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        assert!(port_taken(addr), "a live listener");
        // The server side closes first, so its end (on the listening port)
        // goes to TIME_WAIT once the client has closed too.
        server.write_all(b"bye").unwrap();
        drop(server);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"bye");
        drop(client);
        drop(listener);
        let deadline = Instant::now() + Duration::from_secs(10);
        let in_time_wait = || {
            std::fs::read_to_string("/proc/net/tcp")
                .unwrap_or_default()
                .lines()
                .any(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.len() > 3 && f[1].ends_with(&format!(":{:04X}", addr.port())) && f[3] == "06"
                })
        };
        while !in_time_wait() {
            assert!(Instant::now() < deadline, "no TIME_WAIT on {addr}");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!port_taken(addr), "only TIME_WAIT is left on {addr}");
    }
}
