//! One pinned glommio executor per core, each owning its listener, its
//! connections and its counters. Nothing here is shared across cores: the
//! shard's context is an `Rc`, and the only way in from outside is the
//! control socket (see [`crate::control`]).

use std::cell::{Cell, RefCell};
use std::os::unix::net::UnixStream;
use std::rc::Rc;

use futures_lite::future;
use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};

use crate::config::Config;
use crate::control::{self, Command};
use crate::error::StartupError;
use crate::metrics::{Board, Publish, Timings};
use crate::proto::KeySet;
use crate::stats::{CloseReason, ShardStats};
use crate::trigger::Trigger;

/// Everything one shard's tasks share. Lives in an `Rc` on its own thread.
pub struct ShardCtx {
    /// Shard index (0-based).
    pub id: usize,
    /// The core this shard is pinned to.
    pub core: usize,
    /// The configuration (a per-shard copy).
    pub cfg: Config,
    /// Counters.
    pub stats: ShardStats,
    /// Fired when draining starts: the accept loop stops.
    pub stop_accepting: Trigger,
    /// Fired when the drain period ends: every live connection is aborted.
    pub abort_all: Trigger,
    /// Fired when draining and the last connection has closed.
    pub all_closed: Trigger,
    /// Latency histograms (no-op unless metrics are on).
    pub timings: Timings,
    /// Where snapshots go, when metrics are on.
    board: Option<Board>,
    /// Tunnel keys for new connections; replaced on SIGHUP. A session clones
    /// the `Rc` when it starts, and its derived session keys never change.
    pub keys: RefCell<Option<Rc<KeySet>>>,
    draining: Cell<bool>,
    /// Set when a session ran out of file descriptors; the accept loop backs off.
    pub fd_exhausted: Cell<bool>,
}

impl ShardCtx {
    /// Publishes a snapshot of this shard's counters and histograms.
    pub fn publish(&self) {
        if let Some(board) = &self.board {
            board.publish(Publish::take(
                self.id,
                &self.stats,
                &self.timings,
                self.cfg.limits.max_connections.get() as u64,
            ));
        }
    }

    /// The current key set (tunnel roles).
    pub fn keys(&self) -> Option<Rc<KeySet>> {
        self.keys.borrow().clone()
    }

    /// Records a finished connection.
    pub fn on_close(&self, reason: CloseReason) {
        self.stats.on_close(reason);
        if self.draining.get() && self.stats.active.get() == 0 {
            self.all_closed.fire();
        }
    }
}

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
        cfg.role.as_str(),
        cfg.upstream_name,
        cfg.upstream
    );
    let keys = cfg.tunnel.as_ref().map(|t| Rc::new(t.keys.clone()));
    let ctx = Rc::new(ShardCtx {
        timings: Timings::new(board.is_some()),
        board,
        keys: RefCell::new(keys),
        id,
        core,
        cfg,
        stats: ShardStats::default(),
        stop_accepting: Trigger::new(),
        abort_all: Trigger::new(),
        all_closed: Trigger::new(),
        draining: Cell::new(false),
        fd_exhausted: Cell::new(false),
    });
    let accept = glommio::spawn_local(crate::listener::accept_loop(listener, ctx.clone())).detach();
    if ctx.board.is_some() {
        spawn_publisher(ctx.clone());
    }

    while let Command::Keys(keys) = control::recv(&mut control).await {
        crate::info!("shard {id}: keys replaced ({} key(s))", keys.all().len());
        *ctx.keys.borrow_mut() = Some(Rc::new(keys));
    }

    ctx.draining.set(true);
    ctx.stop_accepting.fire();
    accept.await;
    let live = ctx.stats.active.get();
    crate::info!("shard {id} draining: listener closed, {live} live connections");
    if live == 0 {
        ctx.all_closed.fire();
    }
    let drain = ctx.cfg.limits.drain_timeout;
    let finished = future::or(
        async {
            ctx.all_closed.wait().await;
            true
        },
        async {
            glommio::timer::sleep(drain).await;
            false
        },
    )
    .await;
    if !finished {
        crate::warn!(
            "shard {id}: drain timeout, aborting {} connections",
            ctx.stats.active.get()
        );
        ctx.abort_all.fire();
        ctx.all_closed.wait().await;
    }
    ctx.publish();
    crate::info!("shard {id} core {core} summary: {}", ctx.stats);
}

/// Publishes a snapshot every `--metrics-interval` from a task queue with
/// small shares, so it yields to connection work whenever both are ready.
fn spawn_publisher(ctx: Rc<ShardCtx>) {
    let every = ctx.cfg.metrics_interval;
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
