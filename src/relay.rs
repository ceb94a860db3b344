//! The bounded, half-duplex relay (after linkerd2-proxy's `duplex`).
//!
//! ```text
//!   client ──read──▶ [buf] ──(seal/open)──write──▶ upstream     (pump "up")
//!   client ◀──write──(seal/open)── [buf] ◀──read── upstream     (pump "down")
//! ```
//!
//! * [`run`] is the one entry point: two connections and a [`Framing`]. It
//!   owns the buffers, the idle clock and the pumps.
//! * Each direction owns exactly one fixed buffer (`--buffer-size` in
//!   `forward`; one [`MAX_FRAME`] chunk in the tunnel roles). A pump does not
//!   read again until everything it read has been written, so a slow reader
//!   stalls its writer (TCP backpressure) and memory per connection is
//!   bounded whatever the peers do.
//! * A read that fills the buffer marks a transfer ([`crate::transfer`]):
//!   `forward` then splices that direction through a pipe (no copy through
//!   user space), and the tunnel roles move it in batches of [`BATCH`]
//!   chunks per syscall, each while the shard's budget of pipes or batch
//!   buffers lasts. The same rule holds: nothing more is read until all of
//!   it has been written, so a pipe or a batch buffer bounds what is in
//!   flight.
//! * EOF on one side shuts down the *write half* of the other side (FIN is
//!   propagated); the pair ends when both directions have finished.
//! * An error on either side ends both directions at once; the session then
//!   closes both sockets with RST so neither peer mistakes it for a clean end.
//! * No bytes in either direction for `idle_timeout` ends the pair (the
//!   shard's idle sweep, [`crate::watchdog`], decides and wakes it).

use std::time::Instant;

use futures_lite::future;

use crate::access_log::Record;
use crate::conn::{Conn, Peer};
use crate::context::ShardCtx;
use crate::error::SessionError;
use crate::metrics::{Hist, Timings};
use crate::proto::{
    Decoded, Decoder, Encoder, ProtoError, END_LEN, LEN_LEN, MAX_FRAME, MAX_PAYLOAD, TAG_LEN,
};
use crate::stats::ShardStats;
use crate::transfer::BATCH;
use crate::watchdog::{watched, Verdict, Watch};

/// Chunks whose plaintext one gathered write sends at most.
const GATHER: usize = 8;

/// How the bytes of a pair are framed.
// Built once per connection and moved once into `run`: boxing the cipher
// states would only add a heap allocation per connection.
#[allow(clippy::large_enum_variant)]
pub enum Framing {
    /// `forward`: bytes pass unchanged both ways.
    Plain,
    /// `entry`/`exit`: `tunnel` speaks the tunnel protocol. Plaintext from
    /// the other side is sealed with `encoder` toward it; its chunks are
    /// opened with `decoder` toward the other side.
    Tunnel {
        /// The side that speaks the tunnel protocol.
        tunnel: Peer,
        /// Seals toward `tunnel`.
        encoder: Encoder,
        /// Opens what `tunnel` sends.
        decoder: Decoder,
    },
}

/// What one direction does to the bytes it moves. Borrows the cipher state
/// from the [`Framing`], so it is stored once in the relay's future.
enum Transform<'a> {
    Seal(&'a mut Encoder),
    Open(&'a mut Decoder),
}

/// Relays `client` ⇄ `upstream` until both directions have ended (`Ok`), one
/// fails, the pair is idle for `--idle-timeout`, or the shard aborts
/// connections at the end of its drain. Bytes and the first byte's time
/// go into `rec` too (the access log). Closing the sockets is the caller's.
pub async fn run(
    client: &Conn,
    upstream: &Conn,
    mut framing: Framing,
    ctx: &ShardCtx,
    rec: &Record,
) -> Result<(), SessionError> {
    let limits = ctx.limits();
    let read_size = limits.buffer_size.get();
    let take = |len| ctx.buffer(len).ok_or(SessionError::OutOfMemory(len));
    // Futures are built inline, never bound to locals: a named future would
    // keep its own slot in this function's state next to the combinator it
    // is moved into, and this state is most of a connection's memory.
    let (up, down) = match &mut framing {
        Framing::Plain => {
            // `forward`: the shard's completion-driven relay
            // (`crate::engine`), with the same rules.
            let guard = ctx.watchdog().watch();
            let bufs = [take(read_size)?, take(read_size)?];
            let relay = crate::engine::Relay::start(
                ctx,
                rec,
                [client.raw_fd(), upstream.raw_fd()],
                bufs,
                guard.shared(),
            );
            let idx = relay.index();
            return watched(
                guard.watch(),
                || {
                    ctx.engine().sync(idx, rec);
                    ctx.log_access(rec, None)
                },
                relay,
            )
            .await
            .map_err(|v| match v {
                Verdict::Idle => SessionError::Idle,
                Verdict::Drained => SessionError::Drained,
            })
            .and_then(|r| r);
        }
        Framing::Tunnel {
            tunnel: Peer::Upstream,
            encoder,
            decoder,
        } => (Transform::Seal(encoder), Transform::Open(decoder)),
        Framing::Tunnel {
            tunnel: Peer::Downstream,
            encoder,
            decoder,
        } => (Transform::Open(decoder), Transform::Seal(encoder)),
    };
    let guard = ctx.watchdog().watch();
    let pumps = Pumps {
        batches: ctx.batches(),
        watch: guard.watch(),
        stats: ctx.stats(),
        timings: ctx.timings(),
        rec,
        read_size: read_size.clamp(1, MAX_PAYLOAD),
    };
    // A failed allocation is this connection's error, never the process's
    // abort (a large --buffer-size under a memory limit). Buffers come from
    // and go back to the shard's pool: no allocation or zeroing per
    // connection once the shard is warm.
    let (mut up_buf, mut down_buf) = (take(MAX_FRAME)?, take(MAX_FRAME)?);
    // The idle timeout and the drain's abort come from the shard's sweep
    // (`crate::watchdog`): no timer or trigger is polled per message.
    let result = watched(
        guard.watch(),
        || ctx.log_access(rec, None),
        future::try_zip(
            pumps.pump(client, upstream, up, &mut up_buf),
            pumps.pump(upstream, client, down, &mut down_buf),
        ),
    )
    .await
    .map_err(|v| match v {
        Verdict::Idle => SessionError::Idle,
        Verdict::Drained => SessionError::Drained,
    })
    .and_then(|r| r.map(|_| ()));
    ctx.recycle(up_buf);
    ctx.recycle(down_buf);
    result
}

/// A chunk read at `read_at` (`None`: timings are off) has been fully
/// written on the other side: its relay latency, and for the connection's
/// first chunk upstream, the time from accept (`first_byte_seconds`). The
/// session calls it for client bytes it sends before the relay starts (with
/// a PROXY header, or with the entry's key confirmation).
pub fn chunk_done(timings: &Timings, rec: &Record, up: bool, read_at: Option<Instant>) {
    let Some(read_at) = read_at else { return };
    let now = Instant::now();
    let which = if up { Hist::RelayUp } else { Hist::RelayDown };
    timings.record(which, now - read_at);
    if up && !rec.first_up_timed.replace(true) {
        timings.record(Hist::FirstByte, now - rec.accepted_at);
    }
}

/// What both pumps of one pair share.
struct Pumps<'a> {
    /// Progress in either direction, for the idle timeout. The hot path only
    /// bumps its counter (no clock read per chunk); the shard's sweep samples it.
    watch: &'a Watch,
    stats: &'a ShardStats,
    timings: &'a Timings,
    /// The connection's own record: bytes, first byte.
    rec: &'a Record,
    /// Plaintext read per chunk when sealing.
    read_size: usize,
    /// Batch buffers for transfers (a budget only in the tunnel roles).
    batches: &'a crate::transfer::BatchPool,
}

impl Pumps<'_> {
    fn touch(&self) {
        self.watch.touch();
    }

    /// Counts `n` plaintext bytes moved, for the shard and the connection.
    fn count(&self, up: bool, n: usize) {
        self.stats.add_bytes(up, n);
        self.rec.add_bytes(up, n);
    }

    /// A chunk was written on the other side: the first one downstream is
    /// the connection's first byte (access log).
    fn delivered(&self, up: bool) {
        if !up && self.rec.first_byte.get().is_none() {
            self.rec
                .first_byte
                .set(Some(self.rec.accepted_at.elapsed()));
        }
    }

    /// The time a chunk's read completed, if anything is timed.
    fn now(&self) -> Option<Instant> {
        self.timings.enabled().then(Instant::now)
    }

    /// A chunk read at `read_at` has been fully written on the other side.
    fn chunk_done(&self, up: bool, read_at: Option<Instant>) {
        chunk_done(self.timings, self.rec, up, read_at);
    }

    async fn read(&self, from: &Conn, buf: &mut [u8]) -> Result<usize, SessionError> {
        let n = from.read(buf).await?;
        if n > 0 {
            self.touch();
        }
        Ok(n)
    }

    async fn write_all(&self, to: &Conn, buf: &[u8]) -> Result<(), SessionError> {
        to.write_all(buf, || self.touch()).await
    }

    /// One direction, `from` → `to`, until EOF (then FIN to `to`) or error.
    async fn pump(
        &self,
        from: &Conn,
        to: &Conn,
        transform: Transform<'_>,
        buf: &mut [u8],
    ) -> Result<(), SessionError> {
        match transform {
            Transform::Seal(enc) => self.seal(from, to, enc, buf).await,
            Transform::Open(dec) => self.open(from, to, dec, buf).await,
        }
    }

    /// Plaintext from `plain` → sealed chunks to `tunnel`.
    ///
    /// Plaintext is read straight into the payload slot of `frame` (one
    /// [`MAX_FRAME`] buffer) and sealed in place. EOF on `plain` becomes the
    /// authenticated end chunk followed by FIN. A read that fills the slot
    /// marks a transfer: the direction then takes a batch buffer, if the
    /// shard has one to spare, and goes on in [`Pumps::seal_batched`].
    async fn seal(
        &self,
        plain: &Conn,
        tunnel: &Conn,
        enc: &mut Encoder,
        frame: &mut [u8],
    ) -> Result<(), SessionError> {
        let up = plain.peer() == Peer::Downstream;
        loop {
            let n = self
                .read(plain, &mut frame[LEN_LEN..LEN_LEN + self.read_size])
                .await?;
            if n == 0 {
                return self.seal_end(tunnel, enc).await;
            }
            let read_at = self.now();
            self.count(up, n);
            let total = enc.seal_in_place(frame, n).map_err(SessionError::Limit)?;
            self.write_all(tunnel, &frame[..total]).await?;
            self.delivered(up);
            self.chunk_done(up, read_at);
            if n == self.read_size {
                let stride = LEN_LEN + self.read_size + TAG_LEN;
                if let Some(batch) = self.batches.take(BATCH * stride) {
                    return self.seal_batched(plain, tunnel, enc, batch).await;
                }
            }
        }
    }

    /// [`Pumps::seal`] for a transfer: one read fills up to [`BATCH`]
    /// payload slots, laid out so that the sealed chunks are contiguous,
    /// and one write sends them all.
    async fn seal_batched(
        &self,
        plain: &Conn,
        tunnel: &Conn,
        enc: &mut Encoder,
        mut batch: crate::transfer::BatchBuf<'_>,
    ) -> Result<(), SessionError> {
        let up = plain.peer() == Peer::Downstream;
        let size = self.read_size;
        let stride = LEN_LEN + size + TAG_LEN;
        loop {
            let n = {
                let mut slots = batch.chunks_mut(stride);
                let mut bufs: [std::io::IoSliceMut<'_>; BATCH] = std::array::from_fn(|_| {
                    let slot = slots.next().expect("BATCH slots");
                    std::io::IoSliceMut::new(&mut slot[LEN_LEN..LEN_LEN + size])
                });
                plain.read_vectored(&mut bufs).await?
            };
            if n == 0 {
                return self.seal_end(tunnel, enc).await;
            }
            self.touch();
            let read_at = self.now();
            self.count(up, n);
            self.stats.add_batched(n);
            let (mut at, mut left, mut total) = (0, n, 0);
            while left > 0 {
                let len = left.min(size);
                total = at
                    + enc
                        .seal_in_place(&mut batch[at..at + stride], len)
                        .map_err(SessionError::Limit)?;
                at += stride;
                left -= len;
            }
            self.write_all(tunnel, &batch[..total]).await?;
            self.delivered(up);
            self.chunk_done(up, read_at);
        }
    }

    /// The end chunk, then FIN, in one segment.
    async fn seal_end(&self, tunnel: &Conn, enc: &mut Encoder) -> Result<(), SessionError> {
        let mut end = [0u8; END_LEN];
        enc.seal_end(&mut end).map_err(SessionError::Limit)?;
        tunnel.write_all_then_fin(&end, || self.touch()).await
    }

    /// Sealed chunks from `tunnel` → plaintext to `plain`.
    ///
    /// `small` is one [`MAX_FRAME`] buffer: the decoder authenticates each
    /// header before waiting for its body, so a whole chunk always fits.
    /// Only authenticated plaintext is written; the plaintext of every whole
    /// chunk in the buffer goes out in one gathered write. The end chunk
    /// becomes FIN; EOF without it is [`SessionError::Truncated`]. A read
    /// that fills the buffer marks a transfer: the direction then reads into
    /// a [`BATCH`]-chunk buffer, if the shard has one to spare.
    async fn open(
        &self,
        tunnel: &Conn,
        plain: &Conn,
        dec: &mut Decoder,
        small: &mut [u8],
    ) -> Result<(), SessionError> {
        debug_assert!(small.len() >= MAX_FRAME);
        let up = tunnel.peer() == Peer::Downstream;
        let rejected = |source| SessionError::Proto {
            peer: tunnel.peer(),
            source,
        };
        let mut batch: Option<crate::transfer::BatchBuf<'_>> = None;
        let (mut start, mut end) = (0usize, 0usize);
        let mut read_at = None;
        loop {
            let batched = batch.is_some();
            let buf: &mut [u8] = match batch.as_mut() {
                Some(b) => b,
                None => &mut *small,
            };
            // Open the whole chunks there (at most GATHER per write).
            let mut out = [(0usize, 0usize); GATHER];
            let mut opened = 0;
            let mut ended = None;
            while opened < GATHER {
                match dec.decode(&mut buf[start..end]).map_err(rejected)? {
                    Decoded::Data {
                        consumed,
                        start: s,
                        len,
                    } => {
                        out[opened] = (start + s, len);
                        opened += 1;
                        start += consumed;
                    }
                    Decoded::End { consumed } => {
                        // PROTOCOL.md §4: nothing may follow the end chunk.
                        ended = Some(start + consumed < end);
                        start += consumed;
                        break;
                    }
                    Decoded::NeedMore => break,
                }
            }
            if opened > 0 {
                let bytes: usize = out[..opened].iter().map(|&(_, len)| len).sum();
                self.count(up, bytes);
                if batched {
                    self.stats.add_batched(bytes);
                }
                self.write_gathered(plain, buf, &out[..opened]).await?;
                self.delivered(up);
                self.chunk_done(up, read_at);
            }
            match ended {
                Some(true) => return Err(rejected(ProtoError::DataAfterEnd)),
                // The plain side's FIN waits for the tunnel's own FIN, so
                // that a byte after the end chunk aborts both plain sides
                // (RST) instead of following a clean end.
                Some(false) => {
                    return match self.read(tunnel, buf).await? {
                        0 => plain.shutdown_write(),
                        _ => Err(rejected(ProtoError::DataAfterEnd)),
                    };
                }
                None if opened == GATHER => continue,
                None => {}
            }
            buf.copy_within(start..end, 0);
            end -= start;
            start = 0;
            let n = self.read(tunnel, &mut buf[end..]).await?;
            if n == 0 {
                return Err(SessionError::Truncated(tunnel.peer()));
            }
            read_at = self.now();
            end += n;
            if end == buf.len() && batch.is_none() {
                if let Some(mut b) = self.batches.take(BATCH * MAX_FRAME) {
                    b[..end].copy_from_slice(&small[..end]);
                    batch = Some(b);
                }
            }
        }
    }

    /// Writes the `(offset, len)` ranges of `buf`, in order, with as few
    /// gathered writes as the socket allows.
    async fn write_gathered(
        &self,
        to: &Conn,
        buf: &[u8],
        ranges: &[(usize, usize)],
    ) -> Result<(), SessionError> {
        if let [(at, len)] = ranges {
            return self.write_all(to, &buf[*at..*at + *len]).await;
        }
        let (mut i, mut skip) = (0, 0);
        while i < ranges.len() {
            let mut iov = [std::io::IoSlice::new(&[]); GATHER];
            let k = ranges.len() - i;
            for (j, &(at, len)) in ranges[i..].iter().enumerate() {
                let from = if j == 0 { skip } else { 0 };
                iov[j] = std::io::IoSlice::new(&buf[at + from..at + len]);
            }
            let mut n = to.write_vectored(&iov[..k]).await?;
            self.touch();
            while n > 0 {
                let left = ranges[i].1 - skip;
                if n >= left {
                    n -= left;
                    i += 1;
                    skip = 0;
                } else {
                    skip += n;
                    n = 0;
                }
            }
        }
        Ok(())
    }
}
