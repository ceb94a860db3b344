//! One client paired with one upstream, top to bottom:
//! connect → relay → close reason.

use std::net::SocketAddr;
use std::time::Duration;

use futures_lite::future;
use glommio::net::TcpStream;

use crate::relay::{self, Conn, Peer};
use crate::shard::ShardCtx;
use crate::stats::CloseReason;
use crate::trigger::Trigger;

/// Runs one connection to completion and says why it ended.
pub async fn run(client: TcpStream, ctx: &ShardCtx) -> CloseReason {
    let _ = client.set_nodelay(true);
    let client = Conn::new(client, Peer::Downstream);
    let limits = &ctx.cfg.limits;
    let upstream = match connect(ctx.cfg.upstream, limits.connect_timeout, &ctx.abort_all).await {
        Ok(s) => Conn::new(s, Peer::Upstream),
        Err(reason) => {
            client.abort();
            return reason;
        }
    };
    relay::run_plain(
        client,
        upstream,
        limits.buffer_size.get(),
        limits.idle_timeout,
        &ctx.stats,
        &ctx.abort_all,
    )
    .await
}

/// Connects to `addr` within `timeout`, giving up early if the shard aborts.
pub async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    abort: &Trigger,
) -> Result<TcpStream, CloseReason> {
    let attempt = async {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                Ok(s)
            }
            Err(_) => Err(CloseReason::ConnectError),
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
