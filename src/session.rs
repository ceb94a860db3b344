//! One client paired with one upstream, read top to bottom, phase by phase:
//! (handshake) → connect → (handshake) → relay. Each phase has its own
//! deadline and its own [`SessionError`], which names the side that failed.
//!
//! The relay phase runs in [`relay`]'s own heap allocation (see [`relay`]
//! below), so a connection that is still in its handshake, which is what a
//! flood of unauthenticated peers produces, costs only the small state of
//! the phases before it.

use std::future::Future;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use glommio::net::TcpStream;

use crate::config::{Mode, TunnelConfig};
use crate::conn::{Conn, Peer};
use crate::context::ShardCtx;
use crate::error::SessionError;
use crate::metrics::Hist;
use crate::proto::{
    accept_hello, ClientHandshake, ProtoError, CLIENT_HELLO_LEN, CONFIRM_LEN, SALT_LEN,
    SERVER_HELLO_LEN,
};
use crate::relay::Framing;
use crate::replay::Verdict;
use crate::trigger::{bounded, Interrupted, Trigger};

/// Runs one accepted connection to completion. `Ok` means both directions
/// ended with FIN; on any error the client is reset (RST), never closed
/// cleanly, and the error says which side failed.
pub async fn run(client: TcpStream, ctx: &ShardCtx) -> Result<(), SessionError> {
    let accepted_at = Instant::now();
    let client = Conn::new(client, Peer::Downstream);
    let result = match &ctx.config().mode {
        Mode::Forward => forward(&client, ctx, accepted_at).await,
        Mode::Entry(tun) => entry(&client, ctx, tun, accepted_at).await,
        Mode::Exit(tun) => exit(&client, ctx, tun, accepted_at).await,
    };
    ctx.timings()
        .record(Hist::ConnectionDuration, accepted_at.elapsed());
    if result.is_err() {
        client.abort();
    }
    result
}

/// `forward`: plain both ways.
async fn forward(client: &Conn, ctx: &ShardCtx, accepted_at: Instant) -> Result<(), SessionError> {
    let upstream = connect(ctx).await?;
    relay(client, &upstream, Framing::Plain, ctx, accepted_at).await
}

/// `entry`: connect to the exit, say hello, verify its answer, then seal
/// client bytes upstream and open the exit's chunks downstream.
async fn entry(
    client: &Conn,
    ctx: &ShardCtx,
    tun: &TunnelConfig,
    accepted_at: Instant,
) -> Result<(), SessionError> {
    let keys = ctx.keys().ok_or(SessionError::NoKeys)?;
    let salt = ctx.salt().map_err(SessionError::Rng)?;
    let upstream = connect(ctx).await?;
    let deadline = Instant::now() + tun.handshake_timeout;
    let handshake = async {
        let rejected = |source| SessionError::Proto {
            peer: Peer::Upstream,
            source,
        };
        // An empty `meta` cannot exceed its limit: this never fails.
        let (hs, hello) = ClientHandshake::start(keys.primary(), salt, unix_now(), b"")
            .map_err(SessionError::Limit)?;
        upstream.write_all(&hello, || ()).await?;
        let sent_at = Instant::now();
        let mut answer = [0u8; SERVER_HELLO_LEN];
        upstream.read_exact(&mut answer).await?;
        let (mut encoder, decoder) = hs.finish(&answer).map_err(rejected)?;
        ctx.timings().record(Hist::Handshake, sent_at.elapsed());
        // Key confirmation (protocol v2): the exit contacts its origin only
        // once this chunk verified. Sent at once, so a protocol whose server
        // speaks first works without waiting for client data.
        let mut confirm = [0u8; CONFIRM_LEN];
        encoder
            .seal_confirm(&mut confirm)
            .map_err(SessionError::Limit)?;
        upstream.write_all(&confirm, || ()).await?;
        Ok((encoder, decoder))
    };
    let (encoder, decoder) =
        match counted(ctx, within(ctx, deadline, Peer::Upstream, handshake).await) {
            Ok(session) => session,
            Err(e) => {
                upstream.abort();
                return Err(e);
            }
        };
    let framing = Framing::Tunnel {
        tunnel: Peer::Upstream,
        encoder,
        decoder,
    };
    relay(client, &upstream, framing, ctx, accepted_at).await
}

/// `exit`: verify the hello before saying anything, answer, connect to the
/// origin, then open chunks upstream and seal the origin's bytes downstream.
async fn exit(
    client: &Conn,
    ctx: &ShardCtx,
    tun: &TunnelConfig,
    accepted_at: Instant,
) -> Result<(), SessionError> {
    let deadline = accepted_at + tun.handshake_timeout;
    let keys = ctx.keys().ok_or(SessionError::NoKeys)?;
    let server_salt = ctx.salt().map_err(SessionError::Rng)?;
    // Until it has authenticated and holds a session permit, this is a
    // pending handshake: a newer one may close it (`--max-handshakes`).
    let pending = ctx.begin_handshake(tun.max_handshakes);
    let evicted = pending.evicted().clone();
    let mut hello = [0u8; CLIENT_HELLO_LEN];
    // The first read tells a probe (connect, then close or reset without a
    // byte: a TCP health check) from a failed handshake.
    let first = within(
        ctx,
        deadline,
        Peer::Downstream,
        evictable(&evicted, client.read(&mut hello)),
    )
    .await;
    let got = match first {
        Ok(0) | Err(SessionError::Io { .. }) => return Err(SessionError::Empty(Peer::Downstream)),
        other => counted(ctx, other)?,
    };
    let read = within(
        ctx,
        deadline,
        Peer::Downstream,
        evictable(&evicted, client.read_exact(&mut hello[got..])),
    )
    .await;
    counted(ctx, read)?;
    let hello_at = Instant::now();
    let skew = tun.max_clock_skew.as_secs();
    // Boxed before any await: the cipher state would otherwise sit in this
    // future's state for the whole session (see the module docs).
    let verified = accept_hello(keys.all(), &hello, server_salt, unix_now(), skew).map(Box::new);
    // A verified hello is new only if no shard accepted its salt before.
    let verified = match (verified, ctx.replay()) {
        (Ok(a), Some(guard)) => {
            let mut salt = [0u8; SALT_LEN];
            salt.copy_from_slice(&hello[..SALT_LEN]);
            let stamped = a.unix_ms;
            let check = async { Ok(guard.check(salt, stamped).await) };
            match within(ctx, deadline, Peer::Downstream, evictable(&evicted, check)).await? {
                Verdict::Fresh => Ok(a),
                Verdict::Replayed => Err(ProtoError::Replayed),
                Verdict::Full => Err(ProtoError::ReplayFilterFull),
            }
        }
        // No filter (it could not start): fail closed.
        (Ok(_), None) => Err(ProtoError::ReplayFilterFull),
        (Err(e), _) => Err(e),
    };
    let accepted = match verified {
        Ok(a) => a,
        Err(source) => {
            // Say nothing. Swallow input until the deadline so a prober
            // learns nothing from when we hang up.
            ctx.stats().on_handshake_failure();
            discard_until(client, ctx, deadline, &evicted).await;
            return Err(SessionError::Proto {
                peer: Peer::Downstream,
                source,
            });
        }
    };
    // Authenticated: now it needs a session slot (`--max-connections`).
    let _permit = match ctx.sessions() {
        None => None,
        Some(permits) => {
            let take = async {
                permits
                    .acquire_static_permit(1)
                    .await
                    .map_err(|_| SessionError::Drained)
            };
            Some(within(ctx, deadline, Peer::Downstream, evictable(&evicted, take)).await?)
        }
    };
    drop(pending);
    let answer = client.write_all(&accepted.server_hello, || ());
    within(ctx, deadline, Peer::Downstream, answer).await?;
    // Key confirmation (protocol v2): the origin is contacted only once the
    // entry's first chunk proves it derived the session keys, which a
    // replayed hello cannot.
    let mut accepted = accepted;
    let mut confirm = [0u8; CONFIRM_LEN];
    let read = within(
        ctx,
        deadline,
        Peer::Downstream,
        client.read_exact(&mut confirm),
    )
    .await;
    counted(ctx, read)?;
    if let Err(source) = accepted.decoder.open_confirm(&mut confirm) {
        ctx.stats().on_handshake_failure();
        return Err(SessionError::Proto {
            peer: Peer::Downstream,
            source,
        });
    }
    ctx.timings().record(Hist::Handshake, hello_at.elapsed());
    let upstream = connect(ctx).await?;
    let framing = Framing::Tunnel {
        tunnel: Peer::Downstream,
        encoder: accepted.encoder,
        decoder: accepted.decoder,
    };
    relay(client, &upstream, framing, ctx, accepted_at).await
}

/// The relay phase, in a heap allocation of its own: its state (both
/// pumps and, in the tunnel roles, the cipher state) is most of a
/// connection's future, and boxing it keeps that cost off connections that
/// never get past the handshake. One allocation per relayed connection,
/// next to the two relay buffers it allocates anyway.
/// (A plain `fn`: an `async fn` would hold `framing` in its own state.)
fn relay<'a>(
    client: &'a Conn,
    upstream: &'a Conn,
    framing: Framing,
    ctx: &'a ShardCtx,
    accepted_at: Instant,
) -> impl Future<Output = Result<(), SessionError>> + 'a {
    let relay = Box::pin(crate::relay::run(
        client,
        upstream,
        framing,
        ctx,
        accepted_at,
    ));
    async move { relay.await.inspect_err(|_| upstream.abort()) }
}

/// Connects upstream within `--connect-timeout`, giving up at once if the
/// shard aborts; records the connect time.
///
/// The deadline is io_uring's own (`IORING_OP_LINK_TIMEOUT` linked to the
/// connect), so a connection costs no reactor timer for it.
async fn connect(ctx: &ShardCtx) -> Result<Conn, SessionError> {
    let started = Instant::now();
    let attempt = TcpStream::connect_timeout(ctx.config().upstream, ctx.limits().connect_timeout);
    match bounded(ctx.aborted(), None, attempt).await {
        Ok(Ok(stream)) => {
            ctx.timings()
                .record(Hist::UpstreamConnect, started.elapsed());
            Ok(Conn::new(stream, Peer::Upstream))
        }
        Ok(Err(e)) => {
            let e = std::io::Error::from(e);
            if e.kind() == std::io::ErrorKind::TimedOut {
                Err(SessionError::ConnectTimeout)
            } else {
                Err(SessionError::Connect(e))
            }
        }
        Err(_) => Err(SessionError::Drained),
    }
}

/// Runs a handshake step with `peer` until `deadline`, or until the shard
/// aborts everything.
async fn within<T>(
    ctx: &ShardCtx,
    deadline: Instant,
    peer: Peer,
    step: impl Future<Output = Result<T, SessionError>>,
) -> Result<T, SessionError> {
    match bounded(ctx.aborted(), Some(deadline), step).await {
        Ok(r) => r,
        Err(Interrupted::Stopped) => Err(SessionError::Drained),
        Err(Interrupted::Deadline) => Err(SessionError::HandshakeTimeout(peer)),
    }
}

/// Counts a failed handshake (anything but the end of a drain).
fn counted<T>(ctx: &ShardCtx, r: Result<T, SessionError>) -> Result<T, SessionError> {
    if let Err(e) = &r {
        if !matches!(e, SessionError::Drained | SessionError::Evicted(_)) {
            ctx.stats().on_handshake_failure();
        }
    }
    r
}

/// A handshake step that ends early with [`SessionError::Evicted`] when
/// `evicted` fires (a newer pending handshake needed the room).
async fn evictable<T>(
    evicted: &Trigger,
    step: impl Future<Output = Result<T, SessionError>>,
) -> Result<T, SessionError> {
    match bounded(evicted, None, step).await {
        Ok(r) => r,
        Err(_) => Err(SessionError::Evicted(Peer::Downstream)),
    }
}

/// Reads and drops input until the deadline, EOF, an error, abort, or
/// eviction.
async fn discard_until(from: &Conn, ctx: &ShardCtx, deadline: Instant, evicted: &Trigger) {
    let sink = async {
        let mut sink = [0u8; 2048];
        while let Ok(n) = from.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    let _ = bounded(ctx.aborted(), Some(deadline), bounded(evicted, None, sink)).await;
}

/// The wall clock in Unix milliseconds (the hello's timestamp unit).
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
