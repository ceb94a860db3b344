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

/// Everything one shard starts with.
pub struct Setup {
    /// Shard index (0-based).
    pub id: usize,
    /// The core it is pinned to.
    pub core: usize,
    /// Its copy of the configuration.
    pub cfg: Config,
    /// The listeners it accepts on: usually one; more after a hand-over
    /// from a process with more shards.
    pub listeners: Vec<socket2::Socket>,
    /// Its end of the control socketpair.
    pub control: UnixStream,
    /// Where metrics snapshots go, if metrics are on.
    pub board: Option<Board>,
    /// Gets `id` once every accept loop runs.
    pub ready: std::sync::mpsc::Sender<usize>,
    /// The exit's replay-filter mesh (every shard joins it).
    pub replay: Option<crate::replay::Mesh>,
    /// The exit refuses hellos stamped before this (Unix milliseconds): the
    /// process start, or its predecessor's limit after a hand-over.
    pub not_before: u64,
}

/// Starts a shard on its core.
pub fn spawn(setup: Setup) -> Result<ExecutorJoinHandle<()>, StartupError> {
    let (id, core) = (setup.id, setup.core);
    LocalExecutorBuilder::new(Placement::Fixed(core))
        .name(&format!("shard-{id}"))
        .spawn(move || async move { run(setup).await })
        .map_err(|e| StartupError::Shard {
            core,
            reason: e.to_string(),
        })
}

async fn run(setup: Setup) {
    let Setup {
        id,
        core,
        cfg,
        listeners,
        control,
        board,
        ready,
        replay,
        not_before,
    } = setup;
    let listeners: Vec<_> = listeners
        .into_iter()
        .map(crate::sys::adopt_listener)
        .collect();
    let mut control = crate::sys::adopt_unix_stream(control);
    let addr = listeners
        .first()
        .and_then(|l| l.local_addr().ok())
        .map(|a| a.to_string())
        .unwrap_or_else(|| "?".into());
    let extra = match listeners.len() {
        1 => String::new(),
        n => format!(" ({n} inherited listeners)"),
    };
    crate::info!(
        "shard {id} core {core} listening on {addr} role {} upstream {} ({}){extra}",
        cfg.role().as_str(),
        cfg.upstream_name,
        cfg.upstream
    );
    let skew = cfg.tunnel().map(|t| t.max_clock_skew);
    let shards = cfg.cores.len();
    let ctx = Rc::new(ShardCtx::new(id, cfg, board));
    // The exit's replay filter: every shard joins the mesh before any
    // accepts, so that no hello is checked against a partial set.
    if let (Some(mesh), Some(skew)) = (replay, skew) {
        match crate::replay::Guard::join(
            mesh,
            shards,
            2 * skew + crate::replay::WINDOW_MARGIN,
            not_before,
        )
        .await
        {
            Ok(guard) => ctx.set_replay(guard),
            Err(()) => {
                crate::error!("shard {id}: replay filter unavailable; every hello is refused")
            }
        }
    }
    let permits = Rc::new(glommio::sync::Semaphore::new(
        ctx.limits().max_connections.get() as u64,
    ));
    ctx.set_sessions(permits.clone());
    let accepts: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            glommio::spawn_local(crate::listener::accept_loop(
                l,
                ctx.clone(),
                permits.clone(),
            ))
            .detach()
        })
        .collect();
    let _ = ready.send(id);
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
    for accept in accepts {
        accept.await;
    }
    let live = ctx.stats().active.get();
    crate::info!("shard {id} draining: stopped accepting, {live} live connections");
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
