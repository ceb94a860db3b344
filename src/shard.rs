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
    pub ready: Ready,
    /// The exit's replay-filter mesh (every shard joins it).
    pub replay: Option<crate::replay::Mesh>,
    /// The exit refuses hellos stamped before this (Unix milliseconds): the
    /// process start. After a hand-over, the inherited set replaces it.
    pub not_before: u64,
    /// A successor's exit: answer no replay check until the predecessor's
    /// set arrives (`Message::Salts`).
    pub gated: bool,
    /// Where an exit's replay set goes when a successor takes over.
    pub export: Option<std::sync::mpsc::Sender<crate::replay::Export>>,
}

/// Whether building an executor failed for want of a thread (`EAGAIN`).
pub fn is_no_thread<T>(e: &glommio::GlommioError<T>) -> bool {
    matches!(e, glommio::GlommioError::IoError(io) if io.raw_os_error() == Some(libc::EAGAIN))
}

/// Why an executor (a shard's, or the pre-flight's) could not be built or
/// stopped with an error, in one line, with the fix for what an operator
/// can fix: a thread the system refused (`EAGAIN` from `clone`: the
/// thread or process limit).
pub fn executor_failure<T>(e: &glommio::GlommioError<T>) -> String {
    let text = crate::log::one_line(&e.to_string()).into_owned();
    if is_no_thread(e) {
        format!("{text}{}", crate::error::NO_THREAD_HINT)
    } else {
        text
    }
}

/// What a shard tells the main thread: `Ok(id)` once it accepts, or
/// `Err((id, why))` if it never will (`why` when the shard knows it: see
/// [`Ready::fail`]).
pub type Notice = Result<usize, (usize, Option<String>)>;

/// How a shard tells the main thread it accepts (`Ok(id)`), or that it
/// never will (`Err`): sent when it is dropped unsent, whether the
/// shard returned early or its executor could not be built (then the
/// closure holding it is dropped unrun). The main thread then fails the
/// start at once, rather than wait for shards that will never be ready.
pub struct Ready {
    /// The shard.
    pub id: usize,
    /// The main thread's end.
    pub tx: std::sync::mpsc::Sender<Notice>,
    /// Shards that have not started yet give up once this is set (the
    /// exit's replay mesh waits for every shard to join).
    pub failed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sent: bool,
}

impl Ready {
    /// A shard's notice, unsent.
    pub fn new(
        id: usize,
        tx: std::sync::mpsc::Sender<Notice>,
        failed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> Ready {
        Ready {
            id,
            tx,
            failed,
            sent: false,
        }
    }

    /// Every accept loop runs.
    pub fn send(mut self) {
        self.sent = true;
        let _ = self.tx.send(Ok(self.id));
    }

    /// This shard cannot serve as configured, for this reason (one line):
    /// the start fails with it.
    pub fn fail(mut self, why: String) {
        self.sent = true;
        self.failed.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self.tx.send(Err((self.id, Some(why))));
    }
}

impl Drop for Ready {
    fn drop(&mut self) {
        if !self.sent {
            self.failed.store(true, std::sync::atomic::Ordering::SeqCst);
            let _ = self.tx.send(Err((self.id, None)));
        }
    }
}

/// Starts a shard on its core.
pub fn spawn(setup: Setup) -> Result<ExecutorJoinHandle<()>, StartupError> {
    let (id, core) = (setup.id, setup.core);
    LocalExecutorBuilder::new(Placement::Fixed(core))
        .name(&format!("shard-{id}"))
        .spawn(move || async move { run(setup).await })
        .map_err(|e| StartupError::Shard {
            core,
            reason: executor_failure(&e),
        })
}

/// Accepts past an inherited listener's queue that set `TCP_NODELAY`
/// themselves (see `run`): connections whose handshake completed while
/// the listener's option was being set.
const NAGLE_MARGIN: usize = 64;

async fn run(setup: Setup) {
    // The signals the process handles go to its other threads: a signal
    // pending on a shard's thread makes a read that stands at TCP's urgent
    // mark answer EAGAIN with bytes behind it (see `sys::recv_inq`), so
    // only SIGURG, which the shard itself needs, may interrupt it.
    let _ = crate::sys::block_signals(&crate::control::held_at_start());
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
        gated,
        export,
    } = setup;
    let wake_batch = cfg.limits.wake_batch;
    if let Some((count, wait)) = wake_batch {
        glommio::raw::set_wake_batch(count, wait);
    }
    // Options the accepted sockets inherit (`conn::set_client_options`),
    // on inherited listeners too: Nagle off; and in the roles whose clients
    // speak plain TCP, a reset, not a FIN, if this process dies
    // mid-session (`Conn::reset_unless_finished`).
    let plain_clients = !matches!(cfg.mode, crate::config::Mode::Exit(_));
    // Connections already queued on an inherited listener were made before
    // Nagle was turned off on it (by a predecessor that did not: an older
    // build), so they did not inherit it: that many accepts, and a margin
    // for connections being made as it was set, set it themselves.
    let mut listeners: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            crate::conn::set_client_options(&l, plain_clients);
            let queued = crate::sys::accept_queue(std::os::fd::AsRawFd::as_raw_fd(&l));
            let unset = queued.map_or(0, |q| q + NAGLE_MARGIN);
            (crate::sys::adopt_listener(l), unset)
        })
        .collect();
    let mut control = crate::sys::adopt_unix_stream(control);
    let addr = listeners
        .first()
        .and_then(|(l, _)| l.local_addr().ok())
        .map(|a| a.to_string())
        .unwrap_or_else(|| "?".into());
    let extra = match listeners.len() {
        1 => String::new(),
        n => format!(" ({n} inherited listeners)"),
    };
    let listening_line = format!(
        "shard {id} core {core} listening on {addr} role {} upstream {}{extra}",
        cfg.role().as_str(),
        cfg.upstreams.describe()
    );
    let skew = cfg.tunnel().map(|t| t.max_clock_skew);
    let shards = cfg.cores.len();
    let ctx = Rc::new(ShardCtx::new(id, cfg, board));
    // The exit's replay filter: every shard joins the mesh before any
    // accepts, so that no hello is checked against a partial set.
    // A shard that never comes (its executor could not be built) would
    // hold the others here for ever: they give up once the start failed.
    if let (Some(mesh), Some(skew)) = (replay, skew) {
        let join = async {
            Some(
                crate::replay::Guard::join(
                    mesh,
                    shards,
                    2 * skew + crate::replay::WINDOW_MARGIN,
                    not_before,
                    gated,
                )
                .await,
            )
        };
        let failed = ready.failed.clone();
        let gave_up = async move {
            while !failed.load(std::sync::atomic::Ordering::SeqCst) {
                glommio::timer::sleep(std::time::Duration::from_millis(50)).await;
            }
            None
        };
        match futures_lite::future::or(join, gave_up).await {
            Some(Ok(guard)) => ctx.set_replay(guard),
            Some(Err(())) => {
                crate::error!("shard {id}: replay filter unavailable; every hello is refused")
            }
            // Another shard failed to start: so does the process.
            None => return,
        }
    }
    if let Some(log) = ctx.config().access_log.clone() {
        match crate::access_log::ShardLog::start(
            &log.path,
            &log.protected,
            log.format,
            id,
            ctx.config().role().as_str(),
        ) {
            Ok(shard_log) => {
                ctx.set_access_log(shard_log);
                spawn_access_log_flusher(ctx.clone());
            }
            // A configured log that cannot be written fails the start, as
            // it does when the path cannot be opened (a break-it round saw
            // a shard without a writer thread serve without a log, counting
            // nothing).
            Err(e) => {
                let hint = if e.raw_os_error() == Some(libc::EAGAIN) {
                    crate::error::NO_THREAD_HINT
                } else {
                    ""
                };
                ready.fail(format!(
                    "access log {} not started: {e}{hint}",
                    crate::log::one_line(&log.path)
                ));
                return;
            }
        }
    }
    let permits = Rc::new(glommio::sync::Semaphore::new(
        ctx.limits().max_connections.get() as u64,
    ));
    ctx.set_sessions(permits.clone());
    spawn_idle_sweep(ctx.clone());
    if let crate::config::Mode::Entry(tun) = &ctx.config().mode {
        if tun.keepalive > 0 {
            spawn_tunnel_sweep(ctx.clone(), tun.tunnel_idle_timeout);
        }
    }
    glommio::spawn_local(crate::engine::drive(ctx.clone())).detach();
    // This shard can serve. Its listeners listen, and it accepts, only once
    // every shard can (`Message::Accept`): a listener that joins a
    // SO_REUSEPORT group takes its share of new connections from the
    // moment it listens, and a process that then failed (or stalled) before
    // accepting would reset (or hold) them, where its predecessor, or the
    // other process of the group, would have served them.
    ready.send();
    if ctx.publishes() {
        spawn_publisher(ctx.clone());
    }
    let mut accepts = Vec::new();
    let handed_over = loop {
        match control::recv(&mut control).await {
            Message::Accept if accepts.is_empty() => {
                // Tests and operators wait for this line: the port listens.
                crate::info!("{listening_line}");
                accepts = listeners
                    .drain(..)
                    .map(|(l, unset)| {
                        glommio::spawn_local(crate::listener::accept_loop(
                            l,
                            unset,
                            ctx.clone(),
                            permits.clone(),
                        ))
                        .detach()
                    })
                    .collect();
            }
            Message::Accept => {}
            Message::Keys(keys) => {
                let n = keys.all().len();
                ctx.replace_keys(keys);
                // After the keys are in place: tests and operators wait for this line.
                crate::info!("shard {id}: keys replaced ({n} key(s))");
            }
            Message::Salts { not_before, salts } => {
                if let Some(guard) = ctx.replay() {
                    let n = salts.len();
                    if guard.inherit(not_before, salts) {
                        crate::info!("shard {id}: replay set inherited ({n} salt(s))");
                    } else {
                        crate::warn!("shard {id}: the inherited replay set does not fit; refusing hellos stamped before this process started");
                    }
                }
            }
            Message::Upstream(update) => ctx.upstream_update(update),
            Message::HandOver => break true,
            Message::Drain => break false,
        }
    };

    ctx.begin_drain();
    for accept in accepts {
        accept.await;
    }
    if let (true, Some(guard), Some(tx)) = (handed_over, ctx.replay(), export) {
        export_replay_set(&ctx, &guard, tx).await;
    }
    let live = ctx.stats().active.get();
    crate::info!("shard {id} draining: stopped accepting, {live} live client connection(s)");
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
            "shard {id}: drain timeout, aborting {} client connection(s) and their upstreams",
            ctx.stats().active.get()
        );
        ctx.abort_all();
        ctx.all_closed().await;
    }
    ctx.close_access_log();
    ctx.publish();
    // With --wake-batch: how often the shard slept for a batch of events,
    // and how often such a sleep held events back for all of
    // --wake-batch-wait (0 on a kernel without the support, or when events
    // never came fast).
    let coalesced = match wake_batch {
        Some(_) => {
            let (all, held) = glommio::raw::coalesced_sleeps();
            format!(" coalesced_sleeps={all} held_back_sleeps={held}")
        }
        None => String::new(),
    };
    crate::info!("shard {id} core {core} summary: {}{coalesced}", ctx.stats());
}

/// Runs the shard's idle sweep (see [`crate::watchdog`]) every tick, in
/// the connections' own task queue: a busy shard delays it no more than it
/// delays them (from a low-share queue, idle closes ran late under load).
fn spawn_idle_sweep(ctx: Rc<ShardCtx>) {
    glommio::spawn_local(async move {
        let tick = ctx.watchdog().tick();
        loop {
            glommio::timer::sleep(tick).await;
            ctx.watchdog().sweep();
        }
    })
    .detach();
}

/// How often an entry looks over its idle keep-alive tunnels: a tunnel
/// its exit said goodbye to (or closed) is closed within this, which is
/// what the exit waits for.
const TUNNEL_SWEEP: std::time::Duration = std::time::Duration::from_millis(250);

/// Closes the entry's idle keep-alive tunnels that idled `timeout` or that
/// their exit ended (see [`crate::keepalive::EntryPool::sweep`]), every
/// [`TUNNEL_SWEEP`], from a task queue with small shares.
fn spawn_tunnel_sweep(ctx: Rc<ShardCtx>, timeout: std::time::Duration) {
    let task = async move {
        loop {
            glommio::timer::sleep(TUNNEL_SWEEP).await;
            if !ctx.tunnels().is_empty() {
                ctx.tunnels().sweep(timeout, ctx.keys_gen());
            }
        }
    };
    spawn_background("tunnel-sweep", task);
}

/// Hands the shard's access-log lines to its writer every
/// [`crate::access_log::FLUSH_EVERY`], from a task queue with small shares.
fn spawn_access_log_flusher(ctx: Rc<ShardCtx>) {
    let task = async move {
        loop {
            glommio::timer::sleep(crate::access_log::FLUSH_EVERY).await;
            ctx.flush_access_log();
        }
    };
    spawn_background("access-log", task);
}

/// Hand-over: once this shard's pending handshakes have passed their replay
/// check (or [`crate::replay::EXPORT_WAIT`] passed), sends its replay set
/// toward the successor and seals it (see [`crate::replay`]).
async fn export_replay_set(
    ctx: &ShardCtx,
    guard: &crate::replay::Guard,
    tx: std::sync::mpsc::Sender<crate::replay::Export>,
) {
    let until = std::time::Instant::now() + crate::replay::EXPORT_WAIT;
    // Sessions accepted just before the stop register as pending on their
    // first poll: the first tick lets them. No event fires when the last
    // pending handshake leaves, and this runs once per hand-over, so a
    // short poll is enough.
    loop {
        glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
        if ctx.pending_handshakes() == 0 || std::time::Instant::now() >= until {
            break;
        }
    }
    let left = ctx.pending_handshakes();
    if left > 0 {
        crate::warn!(
            "shard {}: {left} handshake(s) still pending after {:?}; they are refused (the replay set is handed over)",
            ctx.id(),
            crate::replay::EXPORT_WAIT
        );
    }
    guard.export(tx);
}

/// Runs `task` (a shard's periodic housekeeping) in its own task queue
/// `name` with small shares, so it yields to connection work whenever both
/// are ready.
fn spawn_background(name: &str, task: impl std::future::Future<Output = ()> + 'static) {
    let queue = glommio::executor().create_task_queue(
        glommio::Shares::Static(10),
        glommio::Latency::NotImportant,
        name,
    );
    match glommio::spawn_local_into(task, queue) {
        Ok(t) => {
            t.detach();
        }
        Err(e) => crate::warn!("{name} task not started: {e}"),
    }
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
    spawn_background("metrics", task);
}
