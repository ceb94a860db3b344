//! One pinned glommio executor per core, each owning its listener, its
//! connections and its counters: the shard's run loop, from listening to the
//! end of its drain. Nothing here is shared across cores: the shard's
//! [`ShardCtx`] is an `Rc`, and the only way in from outside is the control
//! socket (see [`crate::control`]).

use std::os::unix::net::UnixStream;
use std::rc::Rc;

use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};

use crate::config::Config;
use crate::context::ShardCtx;
use crate::control::{self, Message};
use crate::error::StartupError;
use crate::metrics::Board;

/// Starts shard `id` on `core`, serving `listener`, controlled by `control`.
pub fn spawn(
    id: usize,
    core: usize,
    cfg: Config,
    listener: socket2::Socket,
    control: UnixStream,
    board: Option<Board>,
) -> Result<ExecutorJoinHandle<()>, StartupError> {
    LocalExecutorBuilder::new(Placement::Fixed(core))
        .name(&format!("shard-{id}"))
        .spawn(move || async move { run(id, core, cfg, listener, control, board).await })
        .map_err(|e| StartupError::Shard {
            core,
            reason: e.to_string(),
        })
}

async fn run(
    id: usize,
    core: usize,
    cfg: Config,
    listener: socket2::Socket,
    control: UnixStream,
    board: Option<Board>,
) {
    let listener = crate::sys::adopt_listener(listener);
    let mut control = crate::sys::adopt_unix_stream(control);
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    crate::info!(
        "shard {id} core {core} listening on {addr} role {} upstream {} ({})",
        cfg.role().as_str(),
        cfg.upstream_name,
        cfg.upstream
    );
    let ctx = Rc::new(ShardCtx::new(id, cfg, board));
    let accept = glommio::spawn_local(crate::listener::accept_loop(listener, ctx.clone())).detach();
    if ctx.publishes() {
        spawn_publisher(ctx.clone());
    }

    while let Message::Keys(keys) = control::recv(&mut control).await {
        let n = keys.all().len();
        ctx.replace_keys(keys);
        // After the keys are in place: tests and operators wait for this line.
        crate::info!("shard {id}: keys replaced ({n} key(s))");
    }

    ctx.begin_drain();
    accept.await;
    let live = ctx.stats().active.get();
    crate::info!("shard {id} draining: listener closed, {live} live connections");
    let drain = ctx.limits().drain_timeout;
    let closed = async {
        ctx.all_closed().await;
        true
    };
    let timeout = async {
        glommio::timer::sleep(drain).await;
        false
    };
    let finished = futures_lite::future::or(closed, timeout).await;
    if !finished {
        crate::warn!(
            "shard {id}: drain timeout, aborting {} connections",
            ctx.stats().active.get()
        );
        ctx.abort_all();
        ctx.all_closed().await;
    }
    ctx.publish();
    crate::info!("shard {id} core {core} summary: {}", ctx.stats());
}

/// Publishes a snapshot every `--metrics-interval` from a task queue with
/// small shares, so it yields to connection work whenever both are ready.
fn spawn_publisher(ctx: Rc<ShardCtx>) {
    let every = ctx.config().metrics_interval;
    let task = async move {
        loop {
            ctx.publish();
            glommio::timer::sleep(every).await;
        }
    };
    let queue = glommio::executor().create_task_queue(
        glommio::Shares::Static(10),
        glommio::Latency::NotImportant,
        "metrics",
    );
    match glommio::spawn_local_into(task, queue) {
        Ok(t) => {
            t.detach();
        }
        Err(e) => crate::warn!("metrics publisher not started: {e}"),
    }
}
