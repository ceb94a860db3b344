//! Listening sockets (one per shard, `SO_REUSEPORT`) and the accept loop.

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::future;
use glommio::net::TcpListener;
use glommio::sync::Semaphore;
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::Config;
use crate::error::StartupError;
use crate::shard::ShardCtx;

/// Binds one `SO_REUSEPORT` listener per shard on `cfg.listen`.
///
/// All sockets are created here, before any shard starts, so a port in use is
/// a start-up error, and `:0` resolves to one port that every shard shares.
pub fn bind_all(cfg: &Config, shards: usize) -> Result<Vec<Socket>, StartupError> {
    let mut addr = cfg.listen;
    let mut sockets = Vec::with_capacity(shards);
    for _ in 0..shards {
        let socket = bind_one(addr, cfg.backlog, cfg.dual_stack).map_err(|e| match e.kind() {
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

fn bind_one(addr: SocketAddr, backlog: u32, dual_stack: bool) -> io::Result<Socket> {
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
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket)
}

/// Logs accept errors at most once per second, counting the rest.
struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    fn log(&mut self, shard: usize, err: &io::Error, backoff: Duration) {
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < Duration::from_secs(1) => self.suppressed += 1,
            _ => {
                crate::warn!(
                    "shard {shard}: accept failed: {err} (retrying in {backoff:?}; {} similar errors suppressed)",
                    self.suppressed
                );
                self.last = Some(now);
                self.suppressed = 0;
            }
        }
    }
}

const MIN_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Accepts until the shard's `stop_accepting` trigger fires, then drops the
/// listener so the kernel refuses new connections.
///
/// A permit is taken *before* `accept`, so at `--max-connections` the shard
/// simply stops accepting (clients wait in the backlog) instead of accepting
/// and closing. Accept errors back off exponentially, so EMFILE can't spin.
pub async fn accept_loop(listener: TcpListener, ctx: Rc<ShardCtx>) {
    let permits = Rc::new(Semaphore::new(ctx.cfg.limits.max_connections.get() as u64));
    let stop = ctx.stop_accepting.clone();
    let mut log = RateLimitedLog {
        last: None,
        suppressed: 0,
    };
    let mut backoff = MIN_BACKOFF;
    loop {
        // A session could not open its upstream socket (EMFILE/ENFILE):
        // accepting more clients would only reset them. Back off as for a
        // failed accept and leave them waiting in the backlog instead.
        if ctx.fd_exhausted.replace(false) {
            ctx.stats.on_accept_error();
            let err = io::Error::other("out of file descriptors for upstream sockets");
            log.log(ctx.id, &err, backoff);
            future::or(glommio::timer::sleep(backoff), stop.wait()).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            continue;
        }
        let permit = future::or(
            async { permits.acquire_static_permit(1).await.ok() },
            async {
                stop.wait().await;
                None
            },
        );
        let Some(permit) = permit.await else { break };
        let accepted = future::or(async { Some(listener.accept().await) }, async {
            stop.wait().await;
            None
        });
        match accepted.await {
            None => break,
            Some(Ok(stream)) => {
                if !ctx.fd_exhausted.get() {
                    backoff = MIN_BACKOFF;
                }
                let ctx = ctx.clone();
                ctx.stats.on_accept();
                glommio::spawn_local(async move {
                    let reason = crate::session::run(stream, &ctx).await;
                    drop(permit);
                    ctx.on_close(reason);
                })
                .detach();
            }
            Some(Err(e)) => {
                ctx.stats.on_accept_error();
                let err = io::Error::from(e);
                log.log(ctx.id, &err, backoff);
                drop(permit);
                future::or(glommio::timer::sleep(backoff), stop.wait()).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    drop(listener);
}
