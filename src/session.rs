//! One client paired with one upstream, read top to bottom:
//! (handshake) → connect → (handshake) → relay → close reason.

use std::future::Future;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use futures_lite::future;
use glommio::net::TcpStream;

use crate::config::{Role, TunnelConfig};
use crate::metrics::Hist;
use crate::proto::{
    accept_hello, ClientHandshake, Decoder, Encoder, ProtoError, CLIENT_HELLO_LEN, MAX_FRAME,
    SALT_LEN, SERVER_HELLO_LEN,
};
use crate::relay::{self, Activity, Conn, Peer, PumpCtx, PumpError};
use crate::shard::ShardCtx;
use crate::stats::CloseReason;
use crate::trigger::Trigger;

/// Runs one accepted connection to completion and says why it ended. Any
/// end other than [`CloseReason::Clean`] resets the client.
pub async fn run(client: TcpStream, ctx: &ShardCtx) -> CloseReason {
    let accepted_at = Instant::now();
    let _ = client.set_nodelay(true);
    let client = Conn::new(client, Peer::Downstream);
    let reason = match (ctx.cfg.role, ctx.cfg.tunnel.as_ref()) {
        (Role::Entry, Some(tun)) => entry(&client, ctx, tun, accepted_at).await,
        (Role::Exit, Some(tun)) => exit(&client, ctx, tun, accepted_at).await,
        _ => forward(&client, ctx, accepted_at).await,
    };
    ctx.timings
        .record(Hist::ConnectionDuration, accepted_at.elapsed());
    if reason != CloseReason::Clean {
        client.abort();
    }
    reason
}

/// `forward`: plain both ways.
async fn forward(client: &Conn, ctx: &ShardCtx, accepted_at: Instant) -> CloseReason {
    let limits = &ctx.cfg.limits;
    let upstream = match connect(ctx).await {
        Ok(s) => s,
        Err(reason) => return reason,
    };
    let activity = Activity::new();
    let pctx = pump_ctx(ctx, &activity, accepted_at);
    let size = limits.buffer_size.get();
    let (mut up_buf, mut down_buf) = (vec![0u8; size], vec![0u8; size]);
    relay::run_pair(
        client,
        &upstream,
        relay::pump(client, &upstream, &mut up_buf, &pctx),
        relay::pump(&upstream, client, &mut down_buf, &pctx),
        &activity,
        limits.idle_timeout,
        &ctx.abort_all,
    )
    .await
}

/// `entry`: connect to the exit, say hello, verify its answer, then seal
/// client bytes upstream and open the exit's chunks downstream.
async fn entry(
    client: &Conn,
    ctx: &ShardCtx,
    tun: &TunnelConfig,
    accepted_at: Instant,
) -> CloseReason {
    let Some(keys) = ctx.keys() else {
        return CloseReason::AuthFailed;
    };
    let upstream = match connect(ctx).await {
        Ok(s) => s,
        Err(reason) => return reason,
    };
    let handshake = async {
        let salt = random_salt().map_err(|_| HandshakeError::Proto)?;
        let (hs, hello) = ClientHandshake::start(keys.primary(), salt, unix_now(), b"")?;
        relay::write_all(&upstream, &hello, &Activity::new()).await?;
        let sent_at = Instant::now();
        let mut answer = [0u8; SERVER_HELLO_LEN];
        read_exact(&upstream, &mut answer).await?;
        let session = hs.finish(&answer)?;
        ctx.timings.record(Hist::Handshake, sent_at.elapsed());
        Ok(session)
    };
    let deadline = Instant::now() + tun.handshake_timeout;
    let (enc, dec) = match within(deadline, &ctx.abort_all, handshake).await {
        Ok(session) => session,
        Err(e) => {
            upstream.abort();
            return e.reason(ctx);
        }
    };
    relay_tunnel(
        client,
        &upstream,
        Peer::Upstream,
        enc,
        dec,
        ctx,
        accepted_at,
    )
    .await
}

/// `exit`: verify the hello before saying anything, answer, connect to the
/// origin, then open chunks upstream and seal the origin's bytes downstream.
async fn exit(
    client: &Conn,
    ctx: &ShardCtx,
    tun: &TunnelConfig,
    accepted_at: Instant,
) -> CloseReason {
    let deadline = accepted_at + tun.handshake_timeout;
    let Some(keys) = ctx.keys() else {
        return CloseReason::AuthFailed;
    };
    let mut hello = [0u8; CLIENT_HELLO_LEN];
    if let Err(e) = within(deadline, &ctx.abort_all, async {
        read_exact(client, &mut hello).await?;
        Ok(())
    })
    .await
    {
        return e.reason(ctx);
    }
    let hello_at = Instant::now();
    let verified = random_salt()
        .map_err(|_| ProtoError::BadHello)
        .and_then(|salt| {
            accept_hello(
                keys.all(),
                &hello,
                salt,
                unix_now(),
                tun.max_clock_skew.as_secs(),
            )
        });
    let accepted = match verified {
        Ok(a) => a,
        Err(_) => {
            // Say nothing. Swallow input until the deadline so a prober
            // learns nothing from when we hang up.
            ctx.stats.on_handshake_failure();
            discard_until(client, deadline, &ctx.abort_all).await;
            return CloseReason::AuthFailed;
        }
    };
    if let Err(e) = relay::write_all(client, &accepted.server_hello, &Activity::new()).await {
        return e.reason();
    }
    ctx.timings.record(Hist::Handshake, hello_at.elapsed());
    let upstream = match connect(ctx).await {
        Ok(s) => s,
        Err(reason) => return reason,
    };
    let (enc, dec) = (accepted.encoder, accepted.decoder);
    relay_tunnel(
        client,
        &upstream,
        Peer::Downstream,
        enc,
        dec,
        ctx,
        accepted_at,
    )
    .await
}

/// Relays a pair where `tunnel_side` speaks the tunnel protocol: plaintext
/// from the other side is sealed toward it, its chunks are opened toward
/// the other side. One [`MAX_FRAME`] buffer per direction.
async fn relay_tunnel(
    client: &Conn,
    upstream: &Conn,
    tunnel_side: Peer,
    mut enc: Encoder,
    mut dec: Decoder,
    ctx: &ShardCtx,
    accepted_at: Instant,
) -> CloseReason {
    let limits = &ctx.cfg.limits;
    let activity = Activity::new();
    let pctx = pump_ctx(ctx, &activity, accepted_at);
    let (mut frame, mut buf) = (vec![0u8; MAX_FRAME], vec![0u8; MAX_FRAME]);
    let (plain, tunnel) = match tunnel_side {
        Peer::Upstream => (client, upstream),
        Peer::Downstream => (upstream, client),
    };
    let seal = relay::seal_pump(
        plain,
        tunnel,
        &mut enc,
        &mut frame,
        limits.buffer_size.get(),
        &pctx,
    );
    let open = relay::open_pump(tunnel, plain, &mut dec, &mut buf, &pctx);
    let (idle, abort) = (limits.idle_timeout, &ctx.abort_all);
    // run_pair takes the client→upstream direction first.
    match tunnel_side {
        Peer::Upstream => {
            relay::run_pair(client, upstream, seal, open, &activity, idle, abort).await
        }
        Peer::Downstream => {
            relay::run_pair(client, upstream, open, seal, &activity, idle, abort).await
        }
    }
}

/// Why a handshake did not complete.
enum HandshakeError {
    /// A socket failed.
    Io(PumpError),
    /// The peer closed before the hello was complete.
    Closed,
    /// The answer did not verify.
    Proto,
    /// The handshake deadline passed.
    Timeout,
    /// The shard is aborting connections (end of drain).
    Aborted,
}

impl From<PumpError> for HandshakeError {
    fn from(e: PumpError) -> Self {
        HandshakeError::Io(e)
    }
}

impl From<ProtoError> for HandshakeError {
    fn from(_: ProtoError) -> Self {
        HandshakeError::Proto
    }
}

impl HandshakeError {
    /// Counts the failure and names the close reason.
    fn reason(self, ctx: &ShardCtx) -> CloseReason {
        if matches!(self, HandshakeError::Aborted) {
            return CloseReason::Drained;
        }
        ctx.stats.on_handshake_failure();
        match self {
            HandshakeError::Io(e) => e.reason(),
            _ => CloseReason::AuthFailed,
        }
    }
}

/// Runs `fut` until `deadline`, or until the shard aborts everything.
async fn within<T>(
    deadline: Instant,
    abort: &Trigger,
    fut: impl Future<Output = Result<T, HandshakeError>>,
) -> Result<T, HandshakeError> {
    let timeout = async {
        glommio::timer::sleep(deadline.saturating_duration_since(Instant::now())).await;
        Err(HandshakeError::Timeout)
    };
    let aborted = async {
        abort.wait().await;
        Err(HandshakeError::Aborted)
    };
    future::or(fut, future::or(timeout, aborted)).await
}

/// Fills `buf` completely; EOF first is [`HandshakeError::Closed`].
async fn read_exact(from: &Conn, buf: &mut [u8]) -> Result<(), HandshakeError> {
    let mut filled = 0;
    while filled < buf.len() {
        match from.read(&mut buf[filled..]).await {
            Ok(0) => return Err(HandshakeError::Closed),
            Ok(n) => filled += n,
            Err(e) => {
                return Err(HandshakeError::Io(PumpError::Io {
                    peer: from.peer,
                    op: "read",
                    source: e,
                }))
            }
        }
    }
    Ok(())
}

/// Reads and drops input until `deadline`, EOF, an error, or abort.
async fn discard_until(from: &Conn, deadline: Instant, abort: &Trigger) {
    let _ = within(deadline, abort, async {
        let mut sink = [0u8; 2048];
        loop {
            match from.read(&mut sink).await {
                Ok(0) | Err(_) => return Ok::<(), HandshakeError>(()),
                Ok(_) => {}
            }
        }
    })
    .await;
}

fn random_salt() -> Result<[u8; SALT_LEN], getrandom::Error> {
    let mut salt = [0u8; SALT_LEN];
    getrandom::fill(&mut salt)?;
    Ok(salt)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn pump_ctx<'a>(ctx: &'a ShardCtx, activity: &'a Activity, accepted_at: Instant) -> PumpCtx<'a> {
    PumpCtx {
        activity,
        stats: &ctx.stats,
        timings: &ctx.timings,
        accepted_at,
        first_byte_done: std::cell::Cell::new(false),
    }
}

/// Connects upstream within `--connect-timeout`, giving up early if the
/// shard aborts; records the connect time.
async fn connect(ctx: &ShardCtx) -> Result<Conn, CloseReason> {
    let (addr, timeout, abort) = (
        ctx.cfg.upstream,
        ctx.cfg.limits.connect_timeout,
        &ctx.abort_all,
    );
    let started = Instant::now();
    let attempt = async {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                ctx.timings.record(Hist::UpstreamConnect, started.elapsed());
                let _ = s.set_nodelay(true);
                Ok(Conn::new(s, Peer::Upstream))
            }
            Err(e) => {
                let e = std::io::Error::from(e);
                if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                    ctx.fd_exhausted.set(true);
                }
                Err(CloseReason::ConnectError)
            }
        }
    };
    let deadline = async {
        glommio::timer::sleep(timeout).await;
        Err(CloseReason::ConnectTimeout)
    };
    let aborted = async {
        abort.wait().await;
        Err(CloseReason::Drained)
    };
    future::or(attempt, future::or(deadline, aborted)).await
}
