//! One client paired with one upstream, read top to bottom, phase by phase:
//! (handshake) → connect → (handshake) → relay. Each phase has its own
//! deadline and its own [`SessionError`], which names the side that failed.
//!
//! The relay phase runs in [`relay`]'s own heap allocation (see [`relay`]
//! below), so a connection that is still in its handshake, which is what a
//! flood of unauthenticated peers produces, costs only the small state of
//! the phases before it.

use std::future::Future;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use glommio::net::TcpStream;

use std::net::SocketAddr;

use crate::access_log::Record;
use crate::config::{AcceptProxy, Mode, TunnelConfig};
use crate::conn::{Conn, Peer};
use crate::context::ShardCtx;
use crate::engine::Kept;
use crate::error::SessionError;
use crate::keepalive::{read_chunk, seal_chunk, IdleTunnel, Next};
use crate::metrics::Hist;
use crate::proto::keepalive::{parse_start, parse_status, start_payload, START_MAX};
use crate::proto::{
    accept_hello_with, ClientHandshake, Meta, ProtoError, CLIENT_HELLO_LEN, CONFIRM_LEN,
    FLAG_CONNECT_STATUS, FLAG_KEEPALIVE, FLAG_LARGE_CHUNKS, FLAG_MAY_REFUSE, LEN_LEN, SALT_LEN,
    SERVER_HELLO_LEN, STATUS_BUSY, STATUS_GOING_AWAY, STATUS_NO_UPSTREAM, STATUS_OK, TAG_LEN,
};
use crate::proxy_protocol::{self, Parsed};
use crate::relay::Framing;
use crate::replay::Verdict;
use crate::stats::CloseReason;
use crate::transfer::LargeReservation;
use crate::trigger::{bounded, Interrupted, Trigger};
use crate::upstream::pool::Lease;

/// An exit's keep-alive tunnel at a session boundary (docs/PROTOCOL.md
/// §4.1): what [`run`] hands back for [`serve_kept`].
pub struct ExitTunnel {
    conn: Conn,
    kept: Box<Kept>,
    /// Its large-chunk reservation (held if it agreed on large chunks).
    large: LargeReservation,
    /// The shard's key generation when the tunnel was made.
    keys: u64,
}

/// Runs one accepted connection to completion, filling in `rec` as it
/// goes. `Ok` means both directions ended with FIN; on any error the
/// client is reset (RST), never closed cleanly, and the error says which
/// side failed. An exit whose tunnel ended its first session at a
/// keep-alive boundary also returns the tunnel, for [`serve_kept`].
pub async fn run(
    client: TcpStream,
    ctx: &ShardCtx,
    rec: &Record,
) -> (Result<(), SessionError>, Option<ExitTunnel>) {
    let accepted_at = rec.accepted_at;
    // The peer always: every failure's log line names the client, and after
    // a reset the socket no longer knows it. The listener passes the one
    // `accept4` returned; otherwise one `getpeername`.
    if rec.peer.get().is_none() {
        rec.peer.set(client.peer_addr().ok());
    }
    if ctx.wants_addresses() {
        // The address the client connected to: the listen address, unless
        // that is a wildcard or port 0 (one `getsockname` saved per
        // connection).
        let listen = ctx.config().listen;
        rec.destination
            .set(if listen.ip().is_unspecified() || listen.port() == 0 {
                client.local_addr().ok()
            } else {
                Some(listen)
            });
    }
    let client = Conn::accepted(client, Peer::Downstream);
    if !matches!(ctx.config().mode, Mode::Exit(_)) {
        // Plain TCP: set on the listener, inherited (shard::run).
        client.reset_unless_finished(true);
    }
    let result = async {
        // `--accept-proxy`: the header first; what followed it in the same
        // reads is the client's first data.
        let early = match &ctx.config().identity.accept_proxy {
            Some(trusted) => proxy_header(&client, ctx, trusted, rec).await?,
            None => Vec::new(),
        };
        // The tunnel roles' handshake states (about 6.5 KiB for `entry`,
        // 2.8 KiB for `exit`, against under 1 KiB for `forward`) live in
        // their own allocation: inline, they set the size of every
        // session task, which is moved (copied) several times when the
        // accept loop spawns it.
        match &ctx.config().mode {
            Mode::Forward => forward(&client, ctx, rec, &early).await.map(|()| None),
            Mode::Entry(tun) => Box::pin(entry(&client, ctx, tun, rec, &early))
                .await
                .map(|()| None),
            Mode::Exit(tun) => Box::pin(exit(&client, ctx, tun, rec)).await,
        }
    }
    .await;
    ctx.timings()
        .record(Hist::ConnectionDuration, accepted_at.elapsed());
    // A refusal has just written its server hello and FIN: a reset could
    // overtake them. Every other failure resets the client.
    if result.is_err() && !matches!(result, Err(SessionError::Refused { .. })) {
        client.abort();
    }
    match result {
        Ok(Some((kept, large, keys))) => (
            Ok(()),
            Some(ExitTunnel {
                conn: client,
                kept,
                large,
                keys,
            }),
        ),
        Ok(None) => (Ok(()), None),
        Err(e) => (Err(e), None),
    }
}

/// The close reason of a session that [`run`] finished with `result`.
///
/// A connection on which no byte moved either way and which its client
/// ended, with a FIN or a reset, is `empty`: a TCP health check or a port
/// probe, as the exit already counts one that closes before its hello.
/// `forward` and `entry` connect upstream (and the entry completes its
/// tunnel handshake) before the client's first byte, so without this such
/// a probe ended as `clean` or `downstream_reset`, and a load balancer's
/// checks looked like traffic or like client failures. The exit's
/// downstream is an entry, not a client: its reasons are unchanged.
pub fn close_reason(result: &Result<(), SessionError>, rec: &Record, mode: &Mode) -> CloseReason {
    let client_facing = !matches!(mode, Mode::Exit(_));
    let nothing = rec.bytes_up.get() == 0 && rec.bytes_down.get() == 0;
    match result {
        Ok(())
        | Err(SessionError::Io {
            peer: Peer::Downstream,
            ..
        }) if client_facing && nothing => CloseReason::Empty,
        _ => CloseReason::from(result),
    }
}

/// `--accept-proxy`: refuses a peer outside `--proxy-trusted-cidrs`, then
/// reads the PROXY protocol header (v1 or v2, at most
/// [`proxy_protocol::MAX_HEADER`] bytes, within `--proxy-header-timeout` of
/// accept) and records the client's addresses in `rec`. Returns the bytes
/// read past the header (the client's first data). Nothing is forwarded
/// before the header is complete and valid.
async fn proxy_header(
    client: &Conn,
    ctx: &ShardCtx,
    trusted: &AcceptProxy,
    rec: &Record,
) -> Result<Vec<u8>, SessionError> {
    if !rec.peer.get().is_some_and(|p| trusted.trusts(p.ip())) {
        return Err(SessionError::BadProxyHeader(
            "peer not in --proxy-trusted-cidrs",
        ));
    }
    let deadline = rec.accepted_at + trusted.timeout;
    // The header has usually arrived with the connection (a balancer sends
    // it at once), often with the client's first data: take both in one
    // read, into a pooled relay buffer, without arming a deadline timer.
    let mut first = relay_buffer(ctx)?;
    let room = first.len().min(FIRST_DATA);
    let got = match client.read_now(&mut first[..room]) {
        Ok(got) => got,
        // Reset before a byte arrived (a probe), as in the loop below.
        Err(_) => {
            ctx.recycle(first);
            return Err(SessionError::Empty(Peer::Downstream));
        }
    };
    if let Some(done) = header_read(rec, &first[..got]) {
        ctx.recycle(first);
        return done;
    }
    // Incomplete: less than a header, so at most `MAX_HEADER` bytes.
    let mut buf = vec![0u8; proxy_protocol::MAX_HEADER];
    let mut filled = got.min(buf.len());
    buf[..filled].copy_from_slice(&first[..filled]);
    ctx.recycle(first);
    loop {
        let n = match bounded(
            ctx.aborted(),
            Some(deadline),
            client.read(&mut buf[filled..]),
        )
        .await
        {
            Ok(Ok(n)) => n,
            // Reset (or any error) before a valid header: a bad header.
            Ok(Err(_)) if filled > 0 => {
                return Err(SessionError::BadProxyHeader("reset within the header"))
            }
            Ok(Err(_)) => return Err(SessionError::Empty(Peer::Downstream)),
            Err(Interrupted::Stopped) => return Err(SessionError::Drained),
            Err(Interrupted::Deadline) => {
                return Err(SessionError::BadProxyHeader(
                    "not complete within --proxy-header-timeout",
                ))
            }
        };
        if n == 0 {
            return Err(match filled {
                0 => SessionError::Empty(Peer::Downstream),
                _ => SessionError::BadProxyHeader("closed within the header"),
            });
        }
        filled += n;
        if let Some(done) = header_read(rec, &buf[..filled]) {
            return done;
        }
    }
}

/// What the bytes read so far mean: a complete header puts its client
/// addresses into `rec` (none for a v2 `LOCAL` or v1 `UNKNOWN` header: the
/// connection is then the balancer's own) and yields the bytes after it;
/// an invalid one is the connection's error; `None` while incomplete.
fn header_read(rec: &Record, read: &[u8]) -> Option<Result<Vec<u8>, SessionError>> {
    match proxy_protocol::parse(read) {
        Parsed::Header { len, addresses } => {
            if let Some(a) = addresses {
                rec.client.set(Some(a.source));
                rec.destination.set(Some(a.destination));
            }
            Some(Ok(read[len..].to_vec()))
        }
        Parsed::Invalid(why) => Some(Err(SessionError::BadProxyHeader(why))),
        Parsed::Incomplete => None,
    }
}

/// The exit's PROXY v2 header to `upstream` (`--send-proxy-v2`), before
/// any byte of the session; on a failed write `upstream` is reset.
async fn send_proxy_header(
    ctx: &ShardCtx,
    rec: &Record,
    upstream: &Conn,
) -> Result<(), SessionError> {
    let header = proxy_header_out(ctx, rec);
    if header.is_empty() {
        return Ok(());
    }
    let sent = abortable(ctx, upstream.write_all(&header, || ())).await;
    if sent.is_err() {
        upstream.abort();
    }
    sent
}

/// The PROXY protocol v2 header a `forward` or an `exit` sends upstream
/// (`--send-proxy-v2`), or nothing.
fn proxy_header_out(ctx: &ShardCtx, rec: &Record) -> Vec<u8> {
    if !ctx.config().identity.send_proxy_v2 {
        return Vec::new();
    }
    match (rec.client(), rec.destination.get()) {
        (Some(source), Some(destination)) => {
            proxy_protocol::header_v2(source, destination, rec.id.get())
        }
        // The addresses could not be looked up (the client is already
        // gone): say nothing about it rather than something wrong.
        _ => proxy_protocol::header_v2_local(),
    }
}

/// A buffer of the size the relay uses (so the shard's pool serves it and
/// keeps serving the relay).
fn relay_buffer(ctx: &ShardCtx) -> Result<Vec<u8>, SessionError> {
    let len = match ctx.config().mode {
        Mode::Forward => ctx.limits().buffer_size.get(),
        Mode::Entry(_) | Mode::Exit(_) => crate::proto::MAX_FRAME,
    };
    ctx.buffer(len).ok_or(SessionError::OutOfMemory(len))
}

/// Most client bytes read at once at the start of a connection: sent along
/// with a `forward`'s PROXY header, or read with an accepted one. At most
/// one tunnel chunk, so an entry seals them into one.
const FIRST_DATA: usize = crate::proto::MAX_PAYLOAD;

/// `forward`: plain both ways.
async fn forward(
    client: &Conn,
    ctx: &ShardCtx,
    rec: &Record,
    early: &[u8],
) -> Result<(), SessionError> {
    let (upstream, lease, ()) = connect_pool(ctx, rec, async |_, _| Ok(())).await?;
    let mut first = proxy_header_out(ctx, rec);
    let mut data_len = early.len();
    if !early.is_empty() {
        first.extend_from_slice(early);
        ctx.stats().add_bytes(true, early.len());
        rec.add_bytes(true, early.len());
    } else if !first.is_empty() {
        // The header goes out at once (an upstream that speaks first waits
        // for it), and in the same segment as whatever the client already
        // sent: one segment instead of two, without waiting for data.
        let mut data = relay_buffer(ctx)?;
        let room = data.len().min(FIRST_DATA);
        let n = match client.read_now(&mut data[..room]) {
            Ok(n) => n,
            Err(e) => {
                ctx.recycle(data);
                upstream.abort();
                return Err(e);
            }
        };
        data_len = n;
        first.extend_from_slice(&data[..n]);
        ctx.recycle(data);
        ctx.stats().add_bytes(true, n);
        rec.add_bytes(true, n);
    }
    if !first.is_empty() {
        let read_at = ctx.timings().enabled().then(Instant::now);
        if let Err(e) = abortable(ctx, upstream.write_all(&first, || ())).await {
            upstream.abort();
            return Err(e);
        }
        if data_len > 0 {
            crate::relay::chunk_done(ctx.timings(), rec, true, read_at);
        }
    }
    let result = relay(client, &upstream, Framing::Plain, ctx, rec).await;
    drop(lease);
    result.map(|_| ())
}

/// `entry`: connect to the exit, say hello, verify its answer, then seal
/// client bytes upstream and open the exit's chunks downstream. With
/// keep-alive tunnels (docs/PROTOCOL.md §4.1), an idle tunnel to the
/// chosen exit carries the session instead of a new connection and
/// handshake ([`kept_session`]), and a tunnel whose session ended both ways
/// goes back to the shard's pool.
async fn entry(
    client: &Conn,
    ctx: &ShardCtx,
    tun: &TunnelConfig,
    rec: &Record,
    early: &[u8],
) -> Result<(), SessionError> {
    let keys = ctx.keys().ok_or(SessionError::NoKeys)?;
    let keys_gen = ctx.keys_gen();
    // Who the client is, for the exit (docs/PROTOCOL.md §2.1).
    let (meta, meta_len) = Meta {
        client: rec.client(),
        destination: rec.destination.get(),
        id: Some(rec.id.get()),
        // How long this entry waits for a status, so that an exit with a
        // longer handshake timeout still answers in time (§3.1).
        patience: Some(tun.handshake_timeout),
    }
    .encode();
    let meta = &meta[..meta_len];
    // Large chunks are offered only with a reservation to receive them
    // (the shard's budget, `crate::transfer::BatchPool`).
    let mut large = ctx.batches().reserve_large(tun.large_chunks);
    let offer = if large.held() { FLAG_LARGE_CHUNKS } else { 0 }
        | if tun.keepalive > 0 { FLAG_KEEPALIVE } else { 0 };
    // The client's first bytes, once a session that opens with a status (a
    // start on a kept tunnel, or a new tunnel with a connect status) has
    // read them: sent again, on another tunnel, only after an exit said it
    // did not serve them. (A `Cell`: both attempts below use it, one at a
    // time.)
    let first: std::cell::Cell<Option<Vec<u8>>> = std::cell::Cell::new(None);
    let reuse = async |lease: &Lease, more: bool| {
        if tun.keepalive == 0 {
            return None;
        }
        let endpoint = lease.endpoint().addr;
        loop {
            let idle = ctx
                .tunnels()
                .take(endpoint, tun.tunnel_idle_timeout, keys_gen)?;
            rec.upstream.set(Some(endpoint));
            let mut bytes = first.take();
            let reused = kept_session(client, ctx, tun, rec, idle, meta, more, early, &mut bytes);
            let reused = reused.await;
            first.set(bytes);
            match reused {
                Reused::Served(conn, link) => return Some(Ok((conn, *link))),
                // Not served: another idle tunnel, or a new connection to
                // the same exit (it is not the exit's failure).
                Reused::GoingAway => continue,
                Reused::Failed(e) => return Some(Err(e)),
            }
        }
    };
    // Each attempt is a connect and a handshake with one exit: a refused
    // connect, a wrong key or a silent exit moves on to the next one. No
    // byte of the client's has been read yet (the relay has not started),
    // so nothing is lost or sent twice.
    // `more`: another exit may be tried after this one, so this one may
    // refuse when none of its upstreams is up (docs/PROTOCOL.md §3).
    let handshake = async |upstream: &Conn, at: Attempt| {
        let more = at.more;
        upstream.delay_acks();
        let salt = ctx.salt().map_err(SessionError::Rng)?;
        let deadline = Instant::now() + tun.handshake_timeout;
        // The connect status (docs/PROTOCOL.md §3.1) only where a refusal
        // has somewhere to go, or on a retry (where it at least ends the
        // client as `no_upstream` rather than as a reset tunnel): it costs
        // a segment and a wake-up per new tunnel (about 6% of a tunnel's
        // CPU with keep-alive off).
        let flags = offer
            | if more { FLAG_MAY_REFUSE } else { 0 }
            | if more || at.retry {
                FLAG_CONNECT_STATUS
            } else {
                0
            };
        let step = tunnel_handshake(upstream, ctx, rec, &keys, salt, meta, flags);
        let (session, confirm) = counted(ctx, within(ctx, deadline, Peer::Upstream, step).await)?;
        let mut link = Link {
            encoder: session.encoder,
            decoder: session.decoder,
            keepalive: session.keepalive,
            confirm: Some(confirm),
            leftover: Vec::new(),
            large: None,
            keys: keys_gen,
        };
        if session.connect_status {
            // The first flight now, and the exit's status: a refusal moves
            // on to another exit with the same first bytes.
            let mut bytes = first.take();
            let opened = connect_status(
                client, upstream, ctx, tun, rec, &mut link, early, &mut bytes,
            );
            let opened = opened.await;
            first.set(bytes);
            opened?;
        }
        Ok(link)
    };
    let (upstream, lease, link) = connect_pool_with(ctx, rec, reuse, handshake).await?;
    rec.kept.set(Some(link.large.is_some()));
    let Link {
        mut encoder,
        decoder,
        keepalive,
        confirm,
        leftover,
        large: kept_large,
        keys: link_keys,
    } = link;
    match kept_large {
        // A kept tunnel brings the reservation its first session took.
        Some(r) => large = r,
        None if decoder.max_payload() > crate::proto::MAX_PAYLOAD => {
            ctx.stats().on_large_chunks(true)
        }
        None => {
            // The exit did not agree (an older one, or `--large-chunks=false`,
            // or its reservations were spent).
            large.release();
            if tun.large_chunks && offer & FLAG_LARGE_CHUNKS == 0 {
                ctx.stats().on_large_chunks(false);
            }
        }
    }
    if let Some(confirm) = confirm {
        // A new tunnel without a connect status: the confirmation, with
        // the client's first bytes (those a kept tunnel's start already
        // read, if its exit went away before serving them).
        let first = first.take();
        let early = first.as_deref().filter(|f| !f.is_empty()).unwrap_or(early);
        if let Err(e) =
            first_flight(client, &upstream, ctx, rec, &mut encoder, &confirm, early).await
        {
            upstream.abort();
            return Err(e);
        }
    }
    let framing = Framing::Tunnel {
        tunnel: Peer::Upstream,
        encoder,
        decoder,
        keepalive,
        leftover,
    };
    let result = relay(client, &upstream, framing, ctx, rec).await;
    let endpoint = lease.endpoint().addr;
    drop(lease);
    if let Some(kept) = result? {
        // The session ended both ways: the tunnel waits for the shard's
        // next client to this exit, unless the shard drains, the keys
        // changed, or enough already wait (then it closes: FIN at the
        // boundary).
        if !ctx.draining() && link_keys == ctx.keys_gen() {
            let idle = IdleTunnel {
                conn: upstream,
                kept,
                large,
                since: Instant::now(),
                keys: link_keys,
            };
            ctx.tunnels().put(endpoint, idle, tun.keepalive);
        }
    }
    Ok(())
}

/// A tunnel for one entry session, new or kept: its cipher states and what
/// is left to send or open.
struct Link {
    encoder: crate::proto::Encoder,
    decoder: crate::proto::Decoder,
    /// Both hellos agreed on keep-alive.
    keepalive: bool,
    /// A new tunnel's key confirmation, still to be sent with the first
    /// flight; `None` once sent (with a connect status, §3.1) and on a
    /// kept tunnel, whose start carried the first bytes.
    confirm: Option<[u8; CONFIRM_LEN]>,
    /// Tunnel bytes read past the exit's status.
    leftover: Vec<u8>,
    /// A kept tunnel's own large-chunk reservation (`None`: a new tunnel).
    large: Option<LargeReservation>,
    /// The key generation the tunnel was made with.
    keys: u64,
}

/// How a session's start on a kept tunnel went.
enum Reused {
    /// The exit answered status 0: it serves the session.
    Served(Conn, Box<Link>),
    /// The exit is closing the tunnel (status "going away"); it served
    /// nothing.
    GoingAway,
    /// It refused (a refusal status, not served: another exit may be
    /// tried), or the tunnel failed before its answer
    /// ([`SessionError::Unanswered`], final), or the client did.
    Failed(SessionError),
}

/// The entry's session on a kept tunnel (docs/PROTOCOL.md §4.1): the start
/// chunk (the session's flags and `meta`) and the client's first bytes in
/// one write, then the exit's status, within `--handshake-timeout`.
/// `first` holds the client's first bytes once read (from `early`, what
/// came with a PROXY header, or what the client socket holds now), for a
/// resend on another tunnel if this exit does not serve them.
#[allow(clippy::too_many_arguments)]
async fn kept_session(
    client: &Conn,
    ctx: &ShardCtx,
    tun: &TunnelConfig,
    rec: &Record,
    idle: IdleTunnel,
    meta: &[u8],
    more: bool,
    early: &[u8],
    first: &mut Option<Vec<u8>>,
) -> Reused {
    let IdleTunnel {
        conn,
        kept,
        large,
        keys,
        ..
    } = idle;
    let Kept {
        mut encoder,
        mut decoder,
        leftover: mut buf,
    } = *kept;
    let data = match first_bytes(client, ctx, early, first) {
        Ok(data) => data,
        Err(e) => return Reused::Failed(e),
    };
    let flags = if more { FLAG_MAY_REFUSE } else { 0 };
    let (start, len) = match start_payload(flags, meta) {
        Ok(start) => start,
        Err(e) => return Reused::Failed(SessionError::Limit(e)),
    };
    let opening = Opening {
        head: &[],
        start: Some(&start[..len]),
        data,
    };
    let exchange = opening.exchange(&conn, ctx, tun, &mut encoder, &mut decoder, &mut buf);
    let answer = match exchange.await {
        Ok(answer) => answer,
        // The exit closed the tunnel unanswered (it served nothing): as
        // "going away", another tunnel or a new connection to it; a dead
        // exit fails that connect and is counted then.
        Err(SessionError::HandshakeClosed(_)) => return Reused::GoingAway,
        Err(e) => return Reused::Failed(e),
    };
    let status = answer.status;
    if status != STATUS_OK {
        // Not served, so nothing of it reached the origin; the tunnel ends
        // here (our FIN answers the exit's).
        return if status == STATUS_GOING_AWAY {
            Reused::GoingAway
        } else {
            Reused::Failed(refused_by_exit(status))
        };
    }
    rec.handshake.set(Some(answer.waited));
    answer.served(ctx, rec, data);
    ctx.stats()
        .tunnel_reuses
        .set(ctx.stats().tunnel_reuses.get() + 1);
    Reused::Served(
        conn,
        Box::new(Link {
            encoder,
            decoder,
            keepalive: true,
            confirm: None,
            leftover: buf,
            large: Some(large),
            keys,
        }),
    )
}

/// The client's first bytes, read once per client and kept in `first` for
/// a resend on another tunnel: `early` (what came with its PROXY header),
/// or else what the client socket holds now, without waiting (at most
/// `FIRST_DATA` and `--buffer-size`; none, for a protocol whose server
/// speaks first).
fn first_bytes<'f>(
    client: &Conn,
    ctx: &ShardCtx,
    early: &[u8],
    first: &'f mut Option<Vec<u8>>,
) -> Result<&'f [u8], SessionError> {
    if first.is_none() {
        let bytes = if early.is_empty() {
            let mut buf = relay_buffer(ctx)?;
            let room = FIRST_DATA.min(ctx.limits().buffer_size.get());
            let read = client.read_now(&mut buf[..room]);
            let data = read.map(|n| buf[..n].to_vec());
            ctx.recycle(buf);
            data?
        } else {
            early.to_vec()
        };
        *first = Some(bytes);
    }
    Ok(first.as_deref().unwrap_or_default())
}

/// The entry's opening flight of a session that the exit answers with a
/// status chunk before any of it reaches an origin: a kept tunnel's start
/// (docs/PROTOCOL.md §4.1), or a new tunnel's key confirmation under a
/// connect status (§3.1).
struct Opening<'a> {
    /// Sent as it is first: a new tunnel's sealed key confirmation.
    head: &'a [u8],
    /// Sealed as a chunk of its own next: a kept tunnel's start payload.
    start: Option<&'a [u8]>,
    /// The client's first bytes, sealed as data chunks behind it.
    data: &'a [u8],
}

impl Opening<'_> {
    /// Sends the flight in one write, then reads the exit's status chunk
    /// within `--handshake-timeout` of the write. Returns the status and
    /// its timing; tunnel bytes read past the status stay in `buf` (they
    /// belong to the session).
    ///
    /// Errors: a sealing failure before anything was sent; `Drained`;
    /// [`SessionError::HandshakeClosed`] for a clean EOF before the status
    /// (the exit served nothing); and otherwise, once the flight may have
    /// been sent, [`SessionError::Unanswered`] with the tunnel aborted: the
    /// exit may or may not have served the session, so it must not be sent
    /// again.
    async fn exchange(
        &self,
        conn: &Conn,
        ctx: &ShardCtx,
        tun: &TunnelConfig,
        encoder: &mut crate::proto::Encoder,
        decoder: &mut crate::proto::Decoder,
        buf: &mut Vec<u8>,
    ) -> Result<Answer, SessionError> {
        let sealed_at = Instant::now();
        let mut out = Vec::with_capacity(
            self.head.len() + 2 * (LEN_LEN + TAG_LEN) + START_MAX + self.data.len(),
        );
        out.extend_from_slice(self.head);
        if let Some(start) = self.start {
            seal_chunk(encoder, start, &mut out)?;
        }
        self.data
            .chunks(crate::proto::MAX_PAYLOAD)
            .try_for_each(|piece| seal_chunk(encoder, piece, &mut out))?;
        let sent_at = Instant::now();
        let unanswered = |what: String| {
            conn.abort();
            SessionError::Unanswered { what }
        };
        match abortable(ctx, conn.write_all(&out, || ())).await {
            Ok(()) => {}
            Err(SessionError::Drained) => return Err(SessionError::Drained),
            Err(e) => return Err(unanswered(e.to_string())),
        }
        let written_at = Instant::now();
        let deadline = sent_at + tun.handshake_timeout;
        let answer = within(
            ctx,
            deadline,
            Peer::Upstream,
            read_chunk(conn, decoder, buf),
        )
        .await;
        let status = match answer {
            Ok(Next::Data(payload)) => {
                parse_status(&payload).map_err(|e| unanswered(e.to_string()))?
            }
            Ok(Next::End) => return Err(unanswered("an end chunk".into())),
            // A clean EOF with no status before it: the exit closed the
            // tunnel without answering. It sends nothing to an origin
            // before status 0, and its FIN follows everything it wrote, so
            // it served nothing (docs/PROTOCOL.md §4.1): the session may go
            // elsewhere. (An exit killed while the tunnel idled does this:
            // its kernel sends the FIN, and a start crossed it.) A reset
            // stays ambiguous: it may have discarded a status unsent.
            Ok(Next::Closed) => {
                conn.abort();
                return Err(SessionError::HandshakeClosed(Peer::Upstream));
            }
            Err(SessionError::Drained) => return Err(SessionError::Drained),
            Err(e) => return Err(unanswered(e.to_string())),
        };
        Ok(Answer {
            status,
            waited: sent_at.elapsed(),
            flight: (sealed_at, written_at),
        })
    }
}

/// The exit's answer to an [`Opening`].
struct Answer {
    /// Its status (0: served).
    status: u8,
    /// From the flight's write to the status.
    waited: Duration,
    /// When the flight was sealed (the client's first bytes had just been
    /// read) and when its write completed.
    flight: (Instant, Instant),
}

impl Answer {
    /// Records the client's first bytes, once served, as delivered
    /// upstream when the flight's write completed (the first-byte and
    /// upward relay histograms, as `first_flight` does).
    fn served(&self, ctx: &ShardCtx, rec: &Record, data: &[u8]) {
        if !data.is_empty() {
            ctx.stats().add_bytes(true, data.len());
            rec.add_bytes(true, data.len());
            if ctx.timings().enabled() {
                let (sealed, written) = self.flight;
                crate::relay::chunk_done_at(ctx.timings(), rec, true, Some(sealed), written);
            }
        }
    }
}

/// A new tunnel's first flight under a connect status (docs/PROTOCOL.md
/// §3.1): the key confirmation and the client's first bytes, then the
/// exit's status, sent once it reached an origin or failed to. Status 0
/// leaves `link` ready for the relay; any other is a refusal
/// ([`refused_by_exit`]): nothing reached an origin, and another exit may
/// get the same first bytes.
#[allow(clippy::too_many_arguments)]
async fn connect_status(
    client: &Conn,
    upstream: &Conn,
    ctx: &ShardCtx,
    tun: &TunnelConfig,
    rec: &Record,
    link: &mut Link,
    early: &[u8],
    first: &mut Option<Vec<u8>>,
) -> Result<(), SessionError> {
    let data = first_bytes(client, ctx, early, first)?;
    let confirm = link.confirm.take().unwrap_or_default();
    let opening = Opening {
        head: &confirm,
        start: None,
        data,
    };
    let exchange = opening.exchange(
        upstream,
        ctx,
        tun,
        &mut link.encoder,
        &mut link.decoder,
        &mut link.leftover,
    );
    let answer = exchange.await?;
    if answer.status != STATUS_OK {
        return Err(refused_by_exit(answer.status));
    }
    answer.served(ctx, rec, data);
    Ok(())
}

/// The entry's error for an exit's refusal in a status chunk (a kept
/// tunnel's start, or a connect status): the same as a refusal in the
/// server hello, so that the exit is passed over for a moment and counted
/// under `refused`, never ejected ([`SessionError::is_refusal`]).
/// (`SessionError::Refused` is the exit's own close reason.)
fn refused_by_exit(status: u8) -> SessionError {
    SessionError::Proto {
        peer: Peer::Upstream,
        source: ProtoError::Refused(status),
    }
}

/// The entry's side of one tunnel handshake on `upstream`: the hello (with
/// `meta`), then the exit's answer verified. Returns the session (cipher
/// states; whether keep-alive was agreed) and the sealed key confirmation,
/// which [`first_flight`] sends.
async fn tunnel_handshake(
    upstream: &Conn,
    ctx: &ShardCtx,
    rec: &Record,
    keys: &crate::proto::KeySet,
    salt: [u8; SALT_LEN],
    meta: &[u8],
    flags: u8,
) -> Result<(crate::proto::Session, [u8; CONFIRM_LEN]), SessionError> {
    let rejected = |source| SessionError::Proto {
        peer: Peer::Upstream,
        source,
    };
    // `Meta::encode` fits its block: this never fails.
    let (hs, hello) =
        ClientHandshake::start_with_flags(keys.primary(), salt, unix_now(), meta, flags)
            .map_err(SessionError::Limit)?;
    // Timed from before the write: its completion may be seen only
    // together with the answer.
    let sent_at = Instant::now();
    upstream.write_all(&hello, || ()).await?;
    let mut answer = [0u8; SERVER_HELLO_LEN];
    upstream.read_exact(&mut answer).await?;
    let mut session = hs.finish_session(&answer).map_err(rejected)?;
    ctx.timings().record(Hist::Handshake, sent_at.elapsed());
    rec.handshake.set(Some(sent_at.elapsed()));
    let mut confirm = [0u8; CONFIRM_LEN];
    session
        .encoder
        .seal_confirm(&mut confirm)
        .map_err(SessionError::Limit)?;
    Ok((session, confirm))
}

/// The entry's first write on a verified session: the key confirmation
/// (protocol v2: the exit contacts its origin only once this chunk
/// verified), and in the same write, sealed as the first data chunk, the
/// client's first bytes: `early` (what came with its PROXY header), or else
/// what the client socket already holds. That read does not wait: a protocol
/// whose server speaks first gets the confirmation at once. A client that
/// sent its request with its connect (most do) costs one segment to the exit
/// instead of two, and the exit reads the confirmation and the request
/// together.
async fn first_flight(
    client: &Conn,
    upstream: &Conn,
    ctx: &ShardCtx,
    rec: &Record,
    encoder: &mut crate::proto::Encoder,
    confirm: &[u8; CONFIRM_LEN],
    early: &[u8],
) -> Result<(), SessionError> {
    // One relay buffer (`MAX_FRAME`) holds the confirmation and a chunk of
    // up to `MAX_PAYLOAD - CONFIRM_LEN` bytes. `early` can be longer: up to
    // `FIRST_DATA` less the shortest PROXY header (15 bytes, v1 `UNKNOWN`),
    // and then it gets a buffer of its own.
    let fits = crate::proto::MAX_PAYLOAD - CONFIRM_LEN;
    let mut out = if early.len() <= fits {
        relay_buffer(ctx)?
    } else {
        let len = CONFIRM_LEN + LEN_LEN + early.len() + crate::proto::TAG_LEN;
        let mut own = Vec::new();
        own.try_reserve_exact(len)
            .map_err(|_| SessionError::OutOfMemory(len))?;
        own.resize(len, 0);
        own
    };
    out[..CONFIRM_LEN].copy_from_slice(confirm);
    let at = CONFIRM_LEN + LEN_LEN;
    let len = if early.is_empty() {
        // At most `--buffer-size`, as every chunk the relay seals.
        let room = fits.min(FIRST_DATA).min(ctx.limits().buffer_size.get());
        match client.read_now(&mut out[at..at + room]) {
            Ok(n) => n,
            Err(e) => {
                ctx.recycle(out);
                return Err(e);
            }
        }
    } else {
        out[at..at + early.len()].copy_from_slice(early);
        early.len()
    };
    let read_at = (len > 0).then(|| ctx.timings().enabled().then(Instant::now));
    let mut total = CONFIRM_LEN;
    if len > 0 {
        total += encoder
            .seal_in_place(&mut out[CONFIRM_LEN..], len)
            .map_err(SessionError::Limit)?;
        ctx.stats().add_bytes(true, len);
        rec.add_bytes(true, len);
    }
    let sent = abortable(ctx, upstream.write_all(&out[..total], || ())).await;
    if early.len() <= fits {
        ctx.recycle(out);
    }
    if let (Ok(()), Some(read_at)) = (&sent, read_at) {
        crate::relay::chunk_done(ctx.timings(), rec, true, read_at);
    }
    sent
}

/// `exit`: verify the hello before saying anything, answer, connect to the
/// origin, then open chunks upstream and seal the origin's bytes downstream.
async fn exit(
    client: &Conn,
    ctx: &ShardCtx,
    tun: &TunnelConfig,
    rec: &Record,
) -> Result<Option<(Box<Kept>, LargeReservation, u64)>, SessionError> {
    let accepted_at = rec.accepted_at;
    let deadline = accepted_at + tun.handshake_timeout;
    let keys = ctx.keys().ok_or(SessionError::NoKeys)?;
    let keys_gen = ctx.keys_gen();
    let server_salt = ctx.salt().map_err(SessionError::Rng)?;
    // Until its hello has authenticated and proved fresh, this is a pending
    // handshake: a newer one may close it (`--max-handshakes`, which bounds
    // unauthenticated peers; `--max-connections` bounds the rest).
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
    // A hello whose entry has another exit to try is refused (after it
    // verified and proved fresh) while none of our upstreams is up, or when
    // it would only wait for a session slot, so that the entry moves on
    // before it sends any client byte; without the flag we accept and try
    // anyway (docs/PROTOCOL.md §3).
    let status_for = |flags: u8| refusal_for(ctx, flags);
    // Large chunks are agreed to only with a reservation to receive them
    // (the shard's budget, `crate::transfer::BatchPool`), held for the
    // session's life.
    let mut large = ctx.batches().reserve_large(tun.large_chunks);
    let verified = accept_hello_with(
        keys.all(),
        &hello,
        server_salt,
        unix_now(),
        skew,
        if large.held() { FLAG_LARGE_CHUNKS } else { 0 }
            | if tun.keepalive > 0 { FLAG_KEEPALIVE } else { 0 }
            | FLAG_CONNECT_STATUS,
        status_for,
    )
    .map(Box::new);
    if !matches!(&verified, Ok(a) if a.flags & FLAG_LARGE_CHUNKS != 0) {
        large.release();
    }
    // A verified hello is new only if no shard accepted its salt before.
    let verified = match (verified, ctx.replay()) {
        (Ok(a), Some(guard)) => {
            // Verified under our key: no newer handshake takes its place
            // while the replay check runs.
            pending.vouch(true);
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
            // learns nothing from when we hang up. (A replayed hello is
            // evictable again meanwhile.)
            pending.vouch(false);
            ctx.stats().on_handshake_failure();
            discard_until(client, ctx, deadline, &evicted).await;
            return Err(SessionError::Proto {
                peer: Peer::Downstream,
                source,
            });
        }
    };
    // Authenticated and fresh: no longer evictable by a flood of peers
    // without the key (a break-it round saw real entries' tunnels closed
    // by one; the drop used to wait for a session slot).
    drop(pending);
    if accepted.status != STATUS_OK {
        let answer = client.write_all_then_fin(&accepted.server_hello, || ());
        within(ctx, deadline, Peer::Downstream, answer).await?;
        return Err(SessionError::Refused {
            status: accepted.status,
            cause: None,
        });
    }
    if accepted.flags & FLAG_LARGE_CHUNKS != 0 && tun.large_chunks {
        // Counted once the hello proved fresh and was accepted.
        ctx.stats().on_large_chunks(large.held());
    }
    // Authenticated: now it needs a session slot (`--max-connections`).
    let _permit = session_slot(ctx, deadline).await?;
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
    // The hello was authenticated and fresh: a peer that now closes or
    // resets holds the key and gave up, which is what an entry does when
    // its own client goes away (a load balancer's connect-and-reset health
    // check, say). That is counted apart, not as a failed handshake that
    // an operator would read as probing or a key mismatch. A timeout or a
    // bad confirmation still is one.
    // Its close reason is `downstream_reset` for an RST, `truncated` (the
    // tunnel ended without its end chunk) for a FIN, never `auth_failed`.
    match read {
        Err(e @ SessionError::Io { .. }) => {
            ctx.stats().on_handshake_abandoned();
            return Err(e);
        }
        Err(SessionError::HandshakeClosed(peer)) => {
            ctx.stats().on_handshake_abandoned();
            return Err(SessionError::Truncated(peer));
        }
        _ => {}
    }
    counted(ctx, read)?;
    if let Err(source) = accepted.decoder.open_confirm(&mut confirm) {
        ctx.stats().on_handshake_failure();
        return Err(SessionError::Proto {
            peer: Peer::Downstream,
            source,
        });
    }
    ctx.timings().record(Hist::Handshake, hello_at.elapsed());
    rec.handshake.set(Some(hello_at.elapsed()));
    // Who the client is, as the entry saw it (an older entry sends nothing:
    // the entry's own address and a fresh ID stand in).
    let meta = Meta::decode(&accepted.meta[..accepted.meta_len]);
    if let Some(id) = meta.id {
        rec.id.set(id);
    }
    if meta.client.is_some() {
        rec.client.set(meta.client);
    }
    if meta.destination.is_some() {
        rec.destination.set(meta.destination);
    }
    // With a connect status (docs/PROTOCOL.md §3.1) the entry hears
    // whether an origin was reached before anything is forwarded.
    let (upstream, lease) = if accepted.connect_status {
        let deadline = status_deadline(rec, tun, meta.patience);
        connect_and_answer(client, &mut accepted.encoder, ctx, rec, tun, deadline).await?
    } else {
        let (upstream, lease, ()) = connect_pool(ctx, rec, async |_, _| Ok(())).await?;
        (upstream, lease)
    };
    send_proxy_header(ctx, rec, &upstream).await?;
    rec.kept.set(Some(false));
    let framing = Framing::Tunnel {
        tunnel: Peer::Downstream,
        encoder: accepted.encoder,
        decoder: accepted.decoder,
        keepalive: accepted.keepalive,
        leftover: Vec::new(),
    };
    let result = relay(client, &upstream, framing, ctx, rec).await;
    drop(lease);
    Ok(result?.map(|kept| (kept, large, keys_gen)))
}

/// The exit's sessions after the first on a keep-alive tunnel
/// (docs/PROTOCOL.md §4.1), until the tunnel closes. The tunnel idles
/// (counted by [`ShardCtx::idle_began`], which the caller did) until the
/// entry's next start chunk, or says goodbye (status "going away") when it
/// has idled `--tunnel-idle-timeout`, the shard drains, the keys were
/// reloaded, or newer idle tunnels need its place (`--tunnel-keepalive`).
/// Each session is a connection of its own to `done` (its access-log line
/// and close reason), counted from its start chunk.
pub async fn serve_kept(
    mut t: ExitTunnel,
    ctx: &ShardCtx,
    peer: Option<std::net::SocketAddr>,
    mut done: impl FnMut(&Record, &Result<(), SessionError>),
) {
    let Mode::Exit(tun) = &ctx.config().mode else {
        ctx.idle_ended();
        return;
    };
    loop {
        let next = if t.keys != ctx.keys_gen() {
            None
        } else {
            let slot = ctx.exit_idle().begin(tun.keepalive);
            let wait = read_chunk(&t.conn, &mut t.kept.decoder, &mut t.kept.leftover);
            let until = Instant::now() + tun.tunnel_idle_timeout;
            let waited = bounded(
                ctx.accepting_stopped(),
                Some(until),
                bounded(slot.retired(), None, wait),
            )
            .await;
            match waited {
                Ok(Ok(r)) => Some(r),
                // Idle too long, draining, or retired: goodbye.
                _ => None,
            }
        };
        let payload = match next {
            None => {
                say_goodbye(&t.conn, &mut t.kept.encoder, STATUS_GOING_AWAY, ctx, tun).await;
                ctx.idle_ended();
                return;
            }
            // The entry closed the tunnel at the boundary: its end.
            Some(Ok(Next::Closed)) => {
                ctx.idle_ended();
                return;
            }
            Some(Ok(Next::Data(payload))) => Ok(payload),
            Some(Ok(Next::End)) => Err(SessionError::Proto {
                peer: Peer::Downstream,
                source: ProtoError::KeepAlive("an end chunk where a start must be"),
            }),
            Some(Err(e)) => Err(e),
        };
        // A session (or a failed attempt at one): a connection of its own
        // from here.
        let rec = Record::new(ctx.connection_id());
        rec.peer.set(peer);
        rec.kept.set(Some(true));
        ctx.on_accept();
        ctx.idle_ended();
        let (result, kept) = match payload {
            Ok(payload) => kept_exit_session(t, payload, ctx, tun, &rec).await,
            Err(e) => {
                t.conn.abort();
                (Err(e), None)
            }
        };
        ctx.timings()
            .record(Hist::ConnectionDuration, rec.accepted_at.elapsed());
        if kept.is_some() {
            ctx.idle_began();
        }
        done(&rec, &result);
        match kept {
            Some(next) => t = next,
            None => return,
        }
    }
}

/// One session on a kept tunnel at the exit: its start chunk (`payload`)
/// read; then, before anything reaches the origin, the answer: a refusal
/// where a hello with the same flags would get one, or where no upstream
/// endpoint could be reached (the entry may then try another exit: nothing
/// was forwarded), else status 0, and the relay. Returns the tunnel again
/// at the next boundary.
async fn kept_exit_session(
    t: ExitTunnel,
    payload: Vec<u8>,
    ctx: &ShardCtx,
    tun: &TunnelConfig,
    rec: &Record,
) -> (Result<(), SessionError>, Option<ExitTunnel>) {
    let ExitTunnel {
        conn,
        kept,
        large,
        keys,
    } = t;
    let Kept {
        mut encoder,
        decoder,
        leftover,
    } = *kept;
    let fail = |e: SessionError| {
        conn.abort();
        (Err(e), None)
    };
    let (flags, meta) = match parse_start(&payload) {
        Ok(start) => start,
        Err(source) => {
            return fail(SessionError::Proto {
                peer: Peer::Downstream,
                source,
            })
        }
    };
    let meta = Meta::decode(meta);
    if let Some(id) = meta.id {
        rec.id.set(id);
    }
    rec.client.set(meta.client);
    rec.destination.set(meta.destination);
    ctx.stats()
        .tunnel_reuses
        .set(ctx.stats().tunnel_reuses.get() + 1);
    let status = refusal_for(ctx, flags);
    if status != STATUS_OK {
        say_goodbye(&conn, &mut encoder, status, ctx, tun).await;
        return (
            Err(SessionError::Refused {
                status,
                cause: None,
            }),
            None,
        );
    }
    // A session slot, as after a hello, then the origin, both within the
    // entry's patience: a start left waiting for a slot that long is
    // answered "at the connection limit" (the entry may send it elsewhere),
    // never with a reset that leaves the entry unsure whether it was served.
    let deadline = status_deadline(rec, tun, meta.patience);
    let _permit = match session_slot(ctx, deadline).await {
        Ok(permit) => permit,
        Err(SessionError::HandshakeTimeout(_)) => {
            // "At its connection limit" says it all (for the whole wait).
            say_goodbye(&conn, &mut encoder, STATUS_BUSY, ctx, tun).await;
            let busy = SessionError::Refused {
                status: STATUS_BUSY,
                cause: None,
            };
            return (Err(busy), None);
        }
        Err(e) => return fail(e),
    };
    let answered = connect_and_answer(&conn, &mut encoder, ctx, rec, tun, deadline);
    let (upstream, lease) = match answered.await {
        Ok(up) => up,
        // The tunnel is ended already (a goodbye, or aborted).
        Err(e) => return (Err(e), None),
    };
    if let Err(e) = send_proxy_header(ctx, rec, &upstream).await {
        return fail(e);
    }
    let framing = Framing::Tunnel {
        tunnel: Peer::Downstream,
        encoder,
        decoder,
        keepalive: true,
        leftover,
    };
    let result = relay(&conn, &upstream, framing, ctx, rec).await;
    drop(lease);
    match result {
        Ok(Some(kept)) => (
            Ok(()),
            Some(ExitTunnel {
                conn,
                kept,
                large,
                keys,
            }),
        ),
        Ok(None) => (Ok(()), None),
        Err(e) => fail(e),
    }
}

/// When an exit that owes a session a status (a connect status,
/// docs/PROTOCOL.md §3.1, or a kept tunnel's start, §4.1) must have
/// answered: nine tenths of the shorter of its own `--handshake-timeout`
/// and the entry's `patience` (meta type 0x04, the entry's handshake
/// timeout; absent from older entries), from the session's accept or start.
/// The entry's wait starts about half a round trip later and its answer
/// arrives half a round trip after it is sent, so the entry hears a refusal,
/// and sends its client to another exit, before it gives up on the status
/// and resets the client, whichever side has the shorter timeout.
///
/// A patience below the least handshake timeout an entry can have (100 ms,
/// `crate::config::ranges::HANDSHAKE_TIMEOUT`) counts as that: a peer with
/// the key that sends 0 would otherwise have every session refused, each
/// logged as an origin that timed out.
fn status_deadline(rec: &Record, tun: &TunnelConfig, patience: Option<Duration>) -> Instant {
    let least = crate::config::ranges::HANDSHAKE_TIMEOUT.min;
    let bound = patience.map_or(tun.handshake_timeout, |p| {
        p.max(least).min(tun.handshake_timeout)
    });
    rec.accepted_at + bound * 9 / 10
}

/// The exit's connect to its origin for a session it answers with a status,
/// bounded by the status `deadline` ([`status_deadline`]; an origin that
/// drops SYNs would otherwise hold the exit for `--connect-attempts` ×
/// `--connect-timeout`). Running out is [`SessionError::ConnectTimeout`],
/// which the caller answers with a refusal.
async fn connect_for_status(
    ctx: &ShardCtx,
    rec: &Record,
    deadline: Instant,
) -> Result<(Conn, Lease, ()), SessionError> {
    let connect = connect_pool(ctx, rec, async |_, _| Ok(()));
    match within(ctx, deadline, Peer::Upstream, connect).await {
        Err(SessionError::HandshakeTimeout(_)) => Err(SessionError::ConnectTimeout),
        other => other,
    }
}

/// The exit's side of a session it owes a status (a connect status,
/// docs/PROTOCOL.md §3.1, or a kept tunnel's start, §4.1), before any byte
/// reaches an origin: the origin connect ([`connect_for_status`]), then
/// status 0 on the tunnel `conn`. Returns the origin connection and its
/// lease.
///
/// Errors end the tunnel here: an origin that could not be reached (a
/// failure that is not final) is answered "no upstream" with
/// [`say_goodbye`] and returned as [`SessionError::Refused`] (its cause
/// what failed), so the entry may send the session elsewhere; anything
/// else aborts `conn`.
async fn connect_and_answer(
    conn: &Conn,
    encoder: &mut crate::proto::Encoder,
    ctx: &ShardCtx,
    rec: &Record,
    tun: &TunnelConfig,
    deadline: Instant,
) -> Result<(Conn, Lease), SessionError> {
    let (upstream, lease, ()) = match connect_for_status(ctx, rec, deadline).await {
        Ok(up) => up,
        Err(e) if e.is_final() => {
            conn.abort();
            return Err(e);
        }
        Err(e) => {
            say_goodbye(conn, encoder, STATUS_NO_UPSTREAM, ctx, tun).await;
            return Err(SessionError::Refused {
                status: STATUS_NO_UPSTREAM,
                cause: Some(Box::new(e)),
            });
        }
    };
    let mut out = Vec::with_capacity(LEN_LEN + 1 + TAG_LEN);
    let answered = match seal_chunk(encoder, &[STATUS_OK], &mut out) {
        Ok(()) => abortable(ctx, conn.write_all(&out, || ())).await,
        Err(e) => Err(e),
    };
    if let Err(e) = answered {
        upstream.abort();
        conn.abort();
        return Err(e);
    }
    Ok((upstream, lease))
}

/// An authenticated tunnel session's slot (`--max-connections`; `None`
/// when the shard has no limit installed), waited for until `deadline`.
/// (An authenticated handshake has left the pending set, so no newer one
/// can take its place meanwhile.)
async fn session_slot(
    ctx: &ShardCtx,
    deadline: Instant,
) -> Result<Option<glommio::sync::StaticPermit>, SessionError> {
    let Some(permits) = ctx.sessions() else {
        return Ok(None);
    };
    let take = async {
        permits
            .acquire_static_permit(1)
            .await
            .map_err(|_| SessionError::Drained)
    };
    within(ctx, deadline, Peer::Downstream, take)
        .await
        .map(Some)
}

/// The status a session with these hello or start `flags` gets: a refusal
/// only if it allows one (docs/PROTOCOL.md §3), because none of our
/// upstreams is up or no session slot is free.
fn refusal_for(ctx: &ShardCtx, flags: u8) -> u8 {
    if flags & FLAG_MAY_REFUSE == 0 {
        STATUS_OK
    } else if !ctx.upstream_up() {
        // The endpoints held down are probed, not tried with this
        // tunnel; the next hellos are accepted once one answers.
        ctx.probe_down_upstreams();
        STATUS_NO_UPSTREAM
    } else if ctx.sessions().is_some_and(|p| p.available() == 0) {
        STATUS_BUSY
    } else {
        STATUS_OK
    }
}

/// Ends a kept tunnel at a session boundary from the exit's side: a status
/// chunk that says the session, if one crossed it, was not served ("going
/// away", or a refusal), then FIN; then input is read and dropped until the
/// entry's FIN, for at most `--handshake-timeout` (so a start that crossed
/// the goodbye is not answered with a reset, which could overtake the
/// status).
async fn say_goodbye(
    conn: &Conn,
    encoder: &mut crate::proto::Encoder,
    status: u8,
    ctx: &ShardCtx,
    tun: &TunnelConfig,
) {
    let mut out = Vec::with_capacity(LEN_LEN + 1 + TAG_LEN);
    if seal_chunk(encoder, &[status], &mut out).is_err() {
        conn.abort();
        return;
    }
    let deadline = Instant::now() + tun.handshake_timeout;
    let sent = within(
        ctx,
        deadline,
        Peer::Downstream,
        conn.write_all_then_fin(&out, || ()),
    )
    .await;
    if sent.is_err() {
        conn.abort();
        return;
    }
    discard_until(conn, ctx, deadline, &Trigger::new()).await;
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
    rec: &'a Record,
) -> impl Future<Output = Result<crate::engine::Ended, SessionError>> + 'a {
    let relay = Box::pin(crate::relay::run(client, upstream, framing, ctx, rec));
    async move { relay.await.inspect_err(|_| upstream.abort()) }
}

/// The endpoints one connection has tried, without an allocation
/// (`--connect-attempts` is at most 10).
struct Tried {
    addrs: [SocketAddr; 10],
    len: usize,
}

impl Tried {
    fn new() -> Self {
        Tried {
            addrs: [SocketAddr::from(([0, 0, 0, 0], 0)); 10],
            len: 0,
        }
    }

    fn push(&mut self, a: SocketAddr) {
        if self.len < self.addrs.len() {
            self.addrs[self.len] = a;
            self.len += 1;
        }
    }

    fn as_slice(&self) -> &[SocketAddr] {
        &self.addrs[..self.len]
    }

    fn len(&self) -> usize {
        self.len
    }
}

/// Where an attempt of [`connect_pool`] stands, for its `then`.
#[derive(Clone, Copy)]
struct Attempt {
    /// Another endpoint that is up may be tried after this one.
    more: bool,
    /// An earlier attempt for this client failed.
    retry: bool,
}

/// Connects to the pool, trying up to `--connect-attempts` endpoints: after
/// each connect, `then` runs on the new connection (the entry's tunnel
/// handshake; nothing for `forward` and `exit`), and a failed connect or a
/// failed `then` moves on to another endpoint. All failed:
/// [`SessionError::NoUpstream`]. Returns the connection, its endpoint's
/// lease (held for the connection's life) and what `then` returned.
async fn connect_pool<T>(
    ctx: &ShardCtx,
    rec: &Record,
    then: impl AsyncFnMut(&Conn, Attempt) -> Result<T, SessionError>,
) -> Result<(Conn, Lease, T), SessionError> {
    connect_pool_with(ctx, rec, async |_: &Lease, _: bool| None, then).await
}

/// [`connect_pool`], where each attempt first asks `reuse` for a kept
/// connection to the endpoint picked (the entry's keep-alive tunnels):
/// `None` goes on with a new connection to it; a failure counts against
/// the endpoint as a failed connect does.
async fn connect_pool_with<T>(
    ctx: &ShardCtx,
    rec: &Record,
    mut reuse: impl AsyncFnMut(&Lease, bool) -> Option<Result<(Conn, T), SessionError>>,
    mut then: impl AsyncFnMut(&Conn, Attempt) -> Result<T, SessionError>,
) -> Result<(Conn, Lease, T), SessionError> {
    let mut tried = Tried::new();
    let mut last = None;
    let attempts = ctx.config().upstreams.connect_attempts;
    for attempt in 0..attempts {
        let Some(lease) = ctx.pick_upstream(rec, tried.as_slice()) else {
            break;
        };
        tried.push(lease.endpoint().addr);
        // Whether another endpoint that is up may be tried after this one
        // (then an exit may refuse: docs/PROTOCOL.md §3). With none, the
        // exit had better try its best than refuse.
        let more = attempt + 1 < attempts && ctx.upstream_up_except(tried.as_slice());
        let kept = reuse(&lease, more).await;
        let connected = match kept {
            Some(Ok((conn, done))) => {
                ctx.upstream_ok(&lease);
                return Ok((conn, lease, done));
            }
            Some(Err(e)) => Err(e),
            None => connect_to(ctx, rec, &lease).await,
        };
        let failed = match connected {
            Ok(conn) => match then(
                &conn,
                Attempt {
                    more,
                    retry: attempt > 0,
                },
            )
            .await
            {
                Ok(done) => {
                    ctx.upstream_ok(&lease);
                    return Ok((conn, lease, done));
                }
                Err(e) => {
                    conn.abort();
                    e
                }
            },
            Err(e) => e,
        };
        // The client's own failure (its reset, met while a kept tunnel's
        // start read its first bytes) is no endpoint's, and no other
        // endpoint can help.
        if failed.is_final() || failed.side() == crate::error::Side::Downstream {
            return Err(failed);
        }
        ctx.upstream_failed(&lease, &failed);
        last = Some(failed);
    }
    Err(SessionError::no_upstream(tried.len(), last))
}

/// One connect to the endpoint `lease` holds, within `--connect-timeout`,
/// giving up at once if the shard aborts; records the connect time.
///
/// The deadline is io_uring's own (`IORING_OP_LINK_TIMEOUT` linked to the
/// connect), so a connection costs no reactor timer for it.
async fn connect_to(ctx: &ShardCtx, rec: &Record, lease: &Lease) -> Result<Conn, SessionError> {
    let started = Instant::now();
    let upstream = lease.endpoint().addr;
    rec.upstream.set(Some(upstream));
    // The shard owns the socket for SIGURG before its connect, so that
    // urgent data can reach it only with a signal (`engine::Sock`).
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(upstream),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(SessionError::Connect)?;
    let epoch = crate::sys::urgent_epoch();
    let owned_since =
        crate::sys::own_for_urgent(std::os::fd::AsRawFd::as_raw_fd(&socket)).then_some(epoch);
    let attempt = TcpStream::connect_socket_timeout(socket, upstream, ctx.limits().connect_timeout);
    match bounded(ctx.aborted(), None, attempt).await {
        Ok(Ok(stream)) => {
            let took = started.elapsed();
            ctx.timings().record(Hist::UpstreamConnect, took);
            ctx.timings().record_upstream(lease.endpoint().spec, took);
            rec.connect.set(Some(took));
            let conn = Conn::connected(stream, Peer::Upstream, owned_since);
            if !matches!(ctx.config().mode, Mode::Entry(_)) {
                // Plain TCP to an origin (`forward`, `exit`).
                conn.reset_unless_finished(false);
            }
            Ok(conn)
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

/// Runs a write made before the relay (and its drain watchdog) takes over
/// the pair, until it completes or the shard aborts everything: stop wins
/// even over a peer that never reads.
async fn abortable(
    ctx: &ShardCtx,
    write: impl Future<Output = Result<(), SessionError>>,
) -> Result<(), SessionError> {
    bounded(ctx.aborted(), None, write)
        .await
        .unwrap_or(Err(SessionError::Drained))
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
        if !e.is_refusal() && !matches!(e, SessionError::Drained | SessionError::Evicted(_)) {
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
