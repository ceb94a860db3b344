//! Start-up and shutdown of the whole process.

use glommio::{GlommioError, LocalExecutorBuilder, Placement};

use crate::cli::KeygenArgs;
use crate::config::Config;
use std::sync::Arc;
use std::time::Duration;

use crate::control::{Controller, SignalPlane, Started, Upgrade};
use crate::error::StartupError;
use crate::metrics::Board;
use crate::proto::Psk;

/// Checks that io_uring works here by building (and dropping) one executor,
/// so a missing memlock allowance or a disabled io_uring is a clear error
/// before any socket is bound.
pub fn preflight() -> Result<(), StartupError> {
    use glommio::ReactorErrorKind;
    // glommio's own minimum (glommio/src/sys/uring.rs).
    const MIN_MEMLOCK: u64 = 512 * 1024;
    let (have, _) = rlimit::Resource::MEMLOCK
        .get()
        .map_err(|e| StartupError::IoUring(format!("cannot read RLIMIT_MEMLOCK: {e}")))?;
    if have < MIN_MEMLOCK {
        return Err(StartupError::MemLock {
            have,
            need: MIN_MEMLOCK,
        });
    }
    let out_of_fds =
        |e: &std::io::Error| matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
    crate::sys::probe_io_uring().map_err(|e| match out_of_fds(&e) {
        true => StartupError::OutOfFds(format!("cannot set up io_uring: {e}")),
        false => StartupError::IoUring(e.to_string()),
    })?;
    match LocalExecutorBuilder::new(Placement::Unbound).make() {
        Ok(ex) => {
            drop(ex);
            Ok(())
        }
        Err(GlommioError::ReactorError(ReactorErrorKind::MemLockLimit(have, need))) => {
            Err(StartupError::MemLock { have, need })
        }
        Err(GlommioError::IoError(e)) if out_of_fds(&e) => Err(StartupError::OutOfFds(format!(
            "cannot build an executor: {e}"
        ))),
        Err(e @ GlommioError::IoError(_)) if crate::shard::is_no_thread(&e) => {
            Err(StartupError::Preflight(crate::shard::executor_failure(&e)))
        }
        Err(e) => Err(StartupError::IoUring(e.to_string().replace('\n', " "))),
    }
}

/// The fewest file descriptors a process with `shards` shards needs before
/// its first connection, with room for a few: measured (`ls /proc/PID/fd`,
/// an exit with metrics, a control socket, an access log and health
/// checks) at 10 for the process (stdio, signal and control sockets,
/// metrics) and 9 per shard (io_uring rings and eventfds, its listener,
/// its control socketpair, its access log), doubled.
pub fn min_fds(shards: usize) -> u64 {
    32 + 16 * shards as u64
}

/// Refuses a hard `RLIMIT_NOFILE` below [`min_fds`]: the shards would fail
/// to build their executors, or serve with no room for a connection.
pub fn check_fd_floor(shards: usize) -> Result<(), StartupError> {
    let need = min_fds(shards);
    match rlimit::Resource::NOFILE.get() {
        Ok((_, have)) if have < need => Err(StartupError::FdLimit { have, need, shards }),
        _ => Ok(()),
    }
}

/// Raises the soft RLIMIT_NOFILE toward `needed` (at most the hard limit),
/// as HAProxy does for its maxconn: shells and systemd start services with a
/// soft limit of 1024. `Config::warnings` has already said if the hard limit
/// is too low.
fn raise_fd_limit(needed: u64) {
    if let Ok((soft, hard)) = rlimit::Resource::NOFILE.get() {
        let want = needed.min(hard);
        if want > soft {
            if let Err(e) = rlimit::Resource::NOFILE.set(want, hard) {
                crate::warn!("cannot raise RLIMIT_NOFILE from {soft} to {want}: {e}");
            }
        }
    }
}

/// Writes a fresh key to `args.out` (mode 0600, refusing to overwrite) and
/// prints its fingerprint, or prints the key alone to stdout.
pub fn keygen(args: &KeygenArgs) -> Result<(), StartupError> {
    let key = Psk::generate().map_err(|e| StartupError::Keygen(format!("no randomness: {e}")))?;
    let line = zeroize::Zeroizing::new(format!("{}\n", key.to_base64()));
    // A file-size limit (`ulimit -f`) must fail the write (EFBIG), to
    // stdout as to `--out`, not kill the process with SIGXFSZ before it
    // says so, or before it removes the file it made (break-it rounds left
    // an empty key file so): a handler that only sets an unread flag, as a
    // proxy has.
    let _ = signal_hook::flag::register(
        signal_hook::consts::SIGXFSZ,
        std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
    );
    match args.out.as_deref() {
        // `-` is stdout, as `--access-log -` is stderr.
        None | Some("-") => {
            if stdout_is_dev_null() {
                return Err(StartupError::Keygen(
                    "stdout is /dev/null (or was closed, which the runtime turns into /dev/null): the key would be lost; give --out PATH".into(),
                ));
            }
            print_stdout(&line)
                .map_err(|e| StartupError::Keygen(format!("cannot write the key to stdout: {e}")))
        }
        Some(path) => write_key(path, &line, &key),
    }
}

/// `keygen --out PATH`: writes `line` to a new file at `path` (mode 0600).
fn write_key(path: &str, line: &str, key: &Psk) -> Result<(), StartupError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .and_then(|mut f| {
                // On disk before it is reported written (`sync_all`: a
                // crash must not leave an empty key file); and a write that
                // fails (a full disk, a quota) removes the file it made, or
                // the next keygen refused to overwrite it and `check`
                // called it keyless: an operator sent in a circle (found by
                // a break-it round).
                let written = f.write_all(line.as_bytes()).and_then(|()| f.sync_all());
                if written.is_err() {
                    let _ = std::fs::remove_file(path);
                }
                written
            })
            // The key is written; the confirmation line is best effort.
            .map(|()| {
                let _ = print_stdout(&format!("wrote key to {path} (fingerprint {}, as logs name it)\n", key.fingerprint()));
            })
            .map_err(|e| match e.kind() {
                _ if std::path::Path::new(path).is_dir() => {
                    StartupError::Keygen(format!(
                        "{path} is a directory: --out takes the key file's path, such as {}/psk",
                        path.trim_end_matches('/')
                    ))
                }
                std::io::ErrorKind::AlreadyExists => StartupError::Keygen(format!(
                    "{path} exists, and keygen never overwrites a key: choose another path or remove it first (to rotate keys, see deploy/README.md)"
                )),
                _ => StartupError::Keygen(format!("cannot write {path}: {e}")),
            })
}

/// Whether stdout is `/dev/null`: a closed stdout is reopened there by the
/// Rust runtime at start-up, so a key "printed" there is silently lost.
fn stdout_is_dev_null() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let Ok(fd) = std::io::stdout().as_fd().try_clone_to_owned() else {
        return false;
    };
    let (Ok(out), Ok(null)) = (
        std::fs::File::from(fd).metadata(),
        std::fs::metadata("/dev/null"),
    ) else {
        return false;
    };
    out.file_type().is_char_device() && out.rdev() == null.rdev()
}

/// Writes `text` to stdout, returning the error where `print!` would panic
/// (a closed pipe, `/dev/full`).
pub fn print_stdout(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// `shardproxy check --config FILE`: everything `run` would validate (flags,
/// addresses, cores, key file, through the same [`crate::config::load`];
/// the descriptor and memlock limits and io_uring, through the same
/// pre-flight), without binding or starting anything. Returns a one-line summary.
pub fn check(path: &str, overrides: &[String]) -> Result<String, StartupError> {
    let (cfg, warnings) = crate::config::load_file(path, overrides)?;
    // The process limits start-up checks before any executor is built
    // (the descriptor floor before the warnings, as `main` does).
    check_fd_floor(cfg.cores.len())?;
    for w in warnings {
        crate::warn!("{w}");
    }
    raise_fd_limit(cfg.fds_needed());
    preflight()?;
    let keys = cfg
        .tunnel()
        .map(|t| format!(", keys from {}: {}", t.key_file, t.keys.describe()))
        .unwrap_or_default();
    // Client identity and the access log: what changes what the upstream
    // and the operator see about a client.
    let mut identity = String::new();
    if let Some(a) = &cfg.identity.accept_proxy {
        let trusted: Vec<String> = a.trusted.iter().map(|n| n.trunc().to_string()).collect();
        identity.push_str(&format!(
            ", PROXY headers accepted from {} (timeout {})",
            trusted.join(","),
            crate::units::format_duration(a.timeout)
        ));
    }
    if cfg.identity.send_proxy_v2 {
        identity.push_str(", PROXY v2 header sent upstream");
    }
    if let Some(log) = &cfg.access_log {
        identity.push_str(&format!(", {}", describe_access_log(log)));
    }
    // Where it is operated from: metrics, and the control socket upgrades
    // go through (a new-user trial looked for both).
    if let Some(addr) = cfg.metrics_listen {
        identity.push_str(&format!(", metrics on http://{addr}/metrics"));
    }
    if let Some(path) = &cfg.lifecycle.control_socket {
        identity.push_str(&format!(", control socket {}", path.display()));
    }
    // Only its form is checked: the process it names need not run while
    // `check` does.
    if let Some(path) = &cfg.lifecycle.takeover {
        identity.push_str(&format!(
            ", takes the listeners over from the process serving {} (not checked: that process need not run now)",
            path.display()
        ));
    }
    Ok(format!(
        "config {path} OK: role {}, listen {}, upstream {} (balance {}), {} shard(s) on cores {}{keys}{identity}",
        cfg.role().as_str(),
        cfg.listen,
        cfg.upstreams.describe(),
        cfg.upstreams.balance.as_str(),
        cfg.cores.len(),
        crate::config::format_cpu_list(&cfg.cores)
    ))
}

/// `access log "PATH" (FORMAT[, live connections every D])`, or `on
/// stderr`, for `check` and the start-up log.
fn describe_access_log(log: &crate::config::AccessLog) -> String {
    // Quoted, so that a file named `stderr`, or one with spaces or commas in
    // its name, is not mistaken for something else.
    let to = if log.path == "-" {
        "on stderr".to_string()
    } else {
        format!("{:?}", log.path)
    };
    let every = log
        .interval
        .map(|d| {
            format!(
                ", live connections every {}",
                crate::units::format_duration(d)
            )
        })
        .unwrap_or_default();
    format!("access log {to} ({}{every})", log.format.as_str())
}

/// Runs a validated configuration until it has drained.
/// `signals` was installed first thing in `main` (before the config was
/// loaded); from the moment the shards' control sockets exist it drives them.
pub fn run(cfg: Config, signals: SignalPlane) -> Result<(), StartupError> {
    // A panic anywhere (a bug) ends the process: one log line, every
    // connection reset (RST, never a FIN that would pass for a clean end),
    // exit code 101. The supervisor restarts it.
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        crate::error!("panic in thread {}: {info}", thread.name().unwrap_or("?"));
        let n = crate::sys::abandon_connections();
        crate::error!("exiting after the panic: {n} TCP connection(s) reset (a client and its upstream are two)");
        crate::log::flush();
        std::process::exit(101);
    }));
    // Before anything else that takes time: hellos stamped earlier than
    // this are refused (the replay set starts empty).
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    // The log writer runs already (`main` starts it first and flushes it
    // before the process exits): no thread blocks on stderr.
    crate::log::set(cfg.log_level, cfg.log_format);
    // Also checked in `main` before the config's warnings (which would
    // otherwise precede the error with advice about connection limits).
    check_fd_floor(cfg.cores.len())?;
    // The soft limit up to the hard one first: the pre-flight's executor
    // needs descriptors too (a soft limit of 8 under a hard one of 20000
    // failed it, where the process would have had plenty).
    raise_fd_limit(cfg.fds_needed());
    preflight()?;
    if let Some(log) = &cfg.access_log {
        check_access_log(&log.path, &log.protected)?;
    }
    let exe = std::env::current_exe().ok();
    let mut inherited = match &cfg.lifecycle.takeover {
        None => None,
        Some(path) => {
            let got =
                crate::handover::take_over(path, cfg.role().as_str()).map_err(|e| match e {
                    crate::handover::HandoverError::NotServed { .. } => {
                        StartupError::NoPredecessor(e.to_string())
                    }
                    _ => StartupError::Takeover(e.to_string()),
                })?;
            Some(got)
        }
    };
    // A control socket another process serves fails the start here, in one
    // line, before the listeners join that process's SO_REUSEPORT group
    // (and warn about it). Checked, not bound: see `refuse_served_control`.
    if let (None, Some(path)) = (&inherited, &cfg.lifecycle.control_socket) {
        crate::handover::refuse_served_control(path)?;
    }
    let handed = inherited.as_ref().map_or(0, |got| got.proxy.len());
    let (per_shard, distinct) = shard_listeners(&cfg, inherited.as_mut())?;
    // Bound, not listening yet (see `listener::listen_all`): started once
    // every shard can serve.
    let to_listen = distinct
        .iter()
        .map(|s| {
            s.try_clone().map_err(|source| StartupError::Listen {
                addr: cfg.listen,
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(got) = &inherited {
        // One listener per shard: the handed-over ones, and more of the
        // same SO_REUSEPORT group where this process has more shards.
        let total = distinct.len();
        crate::info!(
            "taking over from process {}: {handed} listener(s){}{}{}",
            got.from_pid,
            if total > handed {
                format!(", {} more bound for this process's shards", total - handed)
            } else {
                String::new()
            },
            if got.metrics.is_some() {
                ", metrics"
            } else {
                ""
            },
            if got.control.is_some() {
                ", control socket"
            } else {
                ""
            },
        );
    }
    // The control socket: the one named, or, after a takeover, the same
    // socket the predecessor served (so SIGUSR2 and --takeover keep working).
    let control_path = cfg
        .lifecycle
        .control_socket
        .clone()
        .or_else(|| cfg.lifecycle.takeover.clone());
    // Bound before anything logs a line, so that a control socket another
    // process serves fails the start in one line.
    // Whether this process bound it (rather than inherited it).
    let mut bound_control = false;
    let control_listener = match &control_path {
        None => None,
        Some(path) => {
            let inherited_control = inherited
                .as_mut()
                .and_then(|i| i.control.take())
                .filter(|_| cfg.lifecycle.takeover.as_deref() == Some(path.as_path()));
            Some(match inherited_control {
                Some(l) => l,
                None => {
                    bound_control = true;
                    crate::handover::bind_control(path)?
                }
            })
        }
    };
    // The socket file this process serves: removed at exit if it is this
    // process's (it bound it, or the predecessor it took it from is gone),
    // unless a successor took it over, or something else is at the path by
    // then. A successor that fails before its predecessor drained leaves
    // it: the predecessor serves it still.
    let control_file = control_path.as_deref().and_then(crate::handover::file_id);
    let mut owns_control = bound_control;
    // Set when the predecessor gave up on this process's hand-over: the
    // process drains what it accepted and fails its start with this.
    let mut abandoned: Option<StartupError> = None;
    // Duplicates of every listener, to offer a successor in turn (only with
    // a control socket: a duplicate keeps a socket open after a drain).
    // Each listener once, though several shards may accept on it. Without
    // a control socket they are closed here: the shards hold their own
    // duplicates, and a drain must leave no listening socket open.
    let offer_proxy: Vec<socket2::Socket> = match control_path {
        None => {
            drop(distinct);
            Vec::new()
        }
        Some(_) => distinct,
    };
    let (board, offer_metrics) = match cfg.metrics_listen {
        None => (None, None),
        Some(addr) => {
            let inherited_metrics = inherited
                .as_mut()
                .and_then(|i| i.metrics.take())
                .filter(|l| l.local_addr().is_ok_and(|a| same_address(a, addr)));
            let metrics = match inherited_metrics {
                Some(l) => l,
                None => {
                    // SO_REUSEPORT lets a second process bind it too (a
                    // surge pod beside the old one); anything else is a
                    // mistake that makes scrapes land on either at random.
                    let shared = crate::listener::port_taken(addr);
                    let l = crate::metrics::http::bind(addr)
                        .map_err(|source| StartupError::MetricsListen { addr, source })?;
                    if shared {
                        crate::warn!(
                            "--metrics-listen {addr} is also served by another process (SO_REUSEPORT): connections to it (scrapes, and clients if it is that process's proxy port) are split between the two at random; expected only while a surge pod runs beside the old one, otherwise give each process its own port"
                        );
                    }
                    l
                }
            };
            let offer = control_path.as_ref().and_then(|_| metrics.try_clone().ok());
            let board = Board::new(cfg.cores.len(), cfg.role().as_str());
            let bound = metrics.local_addr().unwrap_or(addr);
            crate::metrics::http::spawn(metrics, board.clone(), cfg.metrics_interval).map_err(
                |e| {
                    StartupError::Metrics(format!(
                        "cannot serve --metrics-listen {addr}: {e}{}",
                        if e.raw_os_error() == Some(libc::EAGAIN) {
                            crate::error::NO_THREAD_HINT
                        } else {
                            ""
                        }
                    ))
                },
            )?;
            crate::info!("metrics on http://{bound}/metrics (also /histograms, /healthz, /livez)");
            (Some(board), offer)
        }
    };
    if let Some(b) = &board {
        if let Ok(mut names) = b.info.upstreams.lock() {
            *names = cfg.upstreams.specs.iter().map(|s| s.name.clone()).collect();
        }
    }
    if let Some(t) = cfg.tunnel() {
        if let Some(b) = &board {
            b.set_keys(t.keys.fingerprints());
        }
        crate::info!("keys from {}: {}", t.key_file, t.keys.describe());
    }
    // Logged once the listeners are bound (a failed start stays one line).
    crate::info!("{}", cfg.limits_line());
    if let Some(log) = &cfg.access_log {
        crate::info!("{}", describe_access_log(log));
    }
    if let Some(path) = &control_path {
        crate::info!(
            "control socket {} (upgrade: SIGUSR2, or start another process with --takeover {})",
            path.display(),
            path.display()
        );
    }
    let (controller, shard_ends) =
        Controller::new(cfg.cores.len()).map_err(StartupError::Signals)?;
    let offer: crate::handover::SharedOffer =
        Arc::new(std::sync::Mutex::new(control_listener.as_ref().map(|_| {
            crate::handover::Offer {
                role: cfg.role().as_str(),
                // Until a hand-over completes (below): our own start.
                not_before: started_unix,
                proxy: offer_proxy,
                metrics: offer_metrics,
            }
        })));
    // The keys the tunnel health checks use (entry): the shards' keys,
    // replaced by the same SIGHUP.
    let probe_keys = match &cfg.mode {
        crate::config::Mode::Entry(t) => Some(Arc::new(std::sync::Mutex::new(t.keys.clone()))),
        _ => None,
    };
    // From here a termination signal drains: a shard that has not started
    // yet finds the drain message waiting on its control socket.
    signals.started(Started {
        controller,
        key_file: cfg.tunnel().map(|t| t.key_file.clone()),
        board: board.clone(),
        upgrade: match (&control_path, exe) {
            (Some(path), Some(exe)) => Some(without_takeover(Upgrade {
                exe,
                args: std::env::args_os().skip(1).collect::<Vec<_>>(),
                control_socket: path.clone(),
            })),
            _ => None,
        },
        drain_delay: cfg.lifecycle.drain_delay,
        drain_timeout: cfg.limits.drain_timeout,
        offer: offer.clone(),
        probe_keys: probe_keys.clone(),
    });
    spawn_upstream_manager(&cfg, &signals, board.clone(), probe_keys);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let start_failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let is_exit = matches!(cfg.mode, crate::config::Mode::Exit(_));
    let replay = is_exit.then(|| crate::replay::mesh(cfg.cores.len()));
    // An exit's shards send their replay sets here when a successor takes
    // over; the control-socket thread forwards them.
    let (export_tx, export_rx) = match (is_exit, &control_listener) {
        (true, Some(_)) => {
            let (tx, rx) = std::sync::mpsc::channel();
            (Some(tx), Some((rx, cfg.cores.len())))
        }
        _ => (None, None),
    };
    let mut handles = Vec::with_capacity(cfg.cores.len());
    for (id, ((core, listeners), control)) in
        cfg.cores.iter().zip(per_shard).zip(shard_ends).enumerate()
    {
        handles.push(crate::shard::spawn(crate::shard::Setup {
            id,
            core: *core,
            cfg: cfg.clone(),
            listeners,
            control,
            board: board.clone(),
            ready: crate::shard::Ready::new(id, ready_tx.clone(), start_failed.clone()),
            replay: replay.clone(),
            not_before: started_unix,
            gated: inherited.is_some(),
            export: export_tx.clone(),
        })?);
    }
    drop(ready_tx);
    // Every shard accepts: tell systemd, then the predecessor. A shard that
    // failed first (its executor could not be built: io_uring, descriptors,
    // memory) never says so; then the whole start fails, below, and the
    // others stop: a process that serves on part of its cores looks healthy
    // and is not.
    // The first shard that said why it cannot serve (`Ready::fail`).
    let mut refused: Option<(usize, String)> = None;
    let all_ready = (0..handles.len()).all(|_| match ready_rx.recv() {
        Ok(Ok(_)) => true,
        Ok(Err((id, why))) => {
            if let (None, Some(why)) = (&refused, why) {
                refused = Some((id, why));
            }
            false
        }
        Err(_) => false,
    });
    // Every shard can serve: the listeners listen now (a new listener of a
    // SO_REUSEPORT group takes its share of connections from then on), and
    // the shards accept.
    // A stop that came during the start leaves them unlistened (see
    // `SignalPlane::start_accepting`).
    // A successor with more shards than it inherited listeners holds the
    // listeners bound for the extra shards back until its predecessor took
    // its READY (`listen_rest` below): a listener that joins the group
    // takes new connections from its listen on, and one closed because
    // the hand-over did not go through (its predecessor gave up on it, or
    // it was told to stop) would reset those queued on it.
    let now = match &inherited {
        Some(_) => handed.min(to_listen.len()),
        None => to_listen.len(),
    };
    let mut listen_now = to_listen;
    let mut listen_later = listen_now.split_off(now);
    // The shards that accept on those (the first ones: see
    // `shard_listeners`).
    let first_shards = 0..now.min(cfg.cores.len());
    let later_shards = first_shards.end..cfg.cores.len();
    let listen_failed = match all_ready {
        true => signals
            .start_accepting(
                || crate::listener::listen_all(&listen_now, &cfg),
                first_shards,
            )
            .and_then(Result::err),
        false => None,
    };
    // Closed now: these duplicates would keep the listeners open after the
    // shards closed theirs in a drain.
    drop(listen_now);
    // The rest, once this process serves (a no-op without them); closed
    // then, or below.
    let mut listen_rest = || {
        let later = std::mem::take(&mut listen_later);
        if later.is_empty() {
            return;
        }
        let r = signals.start_accepting(
            || crate::listener::listen_all(&later, &cfg),
            later_shards.clone(),
        );
        if let Some(Err(e)) = r {
            crate::error!(
                "shards {}-{} do not accept: {e}; the others serve",
                later_shards.start,
                later_shards.end - 1
            );
        }
    };
    let all_ready = all_ready && listen_failed.is_none();
    if !all_ready {
        signals.abort_start("a shard failed to start");
    }
    if all_ready {
        // Said once serving: a start that fails for want of threads says
        // only why it failed, in one line.
        if let Some(e) = crate::log::writer_failure() {
            crate::warn!("log writer thread not started ({e}): lines are written in place");
        }
        // Serving: systemd hears it. A successor says so once it knows it
        // serves (its predecessor, which is the main process until then,
        // names it when it takes its READY; one that gave up on it or was
        // replaced meanwhile must not be displaced by it).
        let serving = || {
            crate::control::notify(&[
                sd_notify::NotifyState::Ready,
                sd_notify::NotifyState::MainPid(std::process::id()),
            ])
        };
        if inherited.is_none() {
            serving();
        }
        if let Some(inherited) = inherited.take() {
            let from = inherited.from_pid;
            // A stop that came during the start (the shards got it
            // already) is this process's, not the service's: the
            // predecessor is told the start failed, and serves on.
            let got = match inherited.confirm(|ready| signals.unless_draining(ready)) {
                Ok(got) => {
                    crate::info!("hand-over complete: process {from} is draining");
                    owns_control = true;
                    serving();
                    listen_rest();
                    got
                }
                Err(crate::handover::HandoverError::Stopped) => {
                    crate::info!(
                        "told to stop during the start: not taking over; process {from} serves on"
                    );
                    crate::handover::InheritedSalts::default()
                }
                // It gave up waiting for this process and serves on: two
                // processes must not serve side by side (each would accept
                // a share of the clients, and a later upgrade would reach
                // only one of them). This one stops accepting, finishes
                // what it accepted meanwhile, and fails its start.
                // Whether or not it still runs: one that gave up may have
                // been replaced or stopped since, and this process is then
                // not the service either.
                Err(e @ crate::handover::HandoverError::Abandoned { .. }) => {
                    // "Still runs", not "serves on": it may be draining
                    // after a hand-over to another successor.
                    let since = if pid_alive(from) {
                        "still runs"
                    } else {
                        "has exited since"
                    };
                    crate::error!(
                        "hand-over: {e}; process {from} {since}: this process stops accepting, finishes its connections and exits"
                    );
                    signals.give_back(&format!("process {from} gave up on this hand-over"));
                    abandoned = Some(StartupError::Takeover(format!(
                        "process {from} gave up waiting for this process to be ready (its --handover-timeout) and {since}; this process did not take over"
                    )));
                    crate::handover::InheritedSalts::default()
                }
                Err(e) => {
                    // A predecessor that stopped meanwhile accepts nothing.
                    if pid_alive(from) {
                        crate::warn!(
                            "hand-over: process {from} did not confirm ({e}); both processes accept"
                        );
                    } else {
                        crate::warn!(
                            "hand-over: process {from} did not confirm ({e}) and has exited; this process accepts alone"
                        );
                        owns_control = true;
                    }
                    serving();
                    listen_rest();
                    crate::handover::InheritedSalts::default()
                }
            };
            if is_exit && abandoned.is_none() {
                let not_before = inherit_replay_set(&signals, got, started_unix, cfg.cores.len());
                if let Ok(mut o) = offer.lock() {
                    if let Some(o) = o.as_mut() {
                        o.not_before = not_before;
                    }
                }
            }
        }
        // An abandoned successor serves no control socket: it is the
        // predecessor's.
        if let Some(listener) = control_listener.filter(|_| abandoned.is_none()) {
            let plane = signals.handle();
            let timeout = cfg.lifecycle.handover_timeout;
            if let Err(e) =
                crate::handover::serve(listener, offer, export_rx, timeout, move |pid| {
                    plane.handed_over(pid)
                })
            {
                // Serving on: the predecessor, if any, is draining. But
                // upgrades of this process are impossible until a restart.
                let hint = if e.raw_os_error() == Some(libc::EAGAIN) {
                    crate::error::NO_THREAD_HINT
                } else {
                    ""
                };
                crate::error!(
                    "control socket not served: {e}{hint}; SIGUSR2 upgrades and --takeover of this process will fail until it is restarted"
                );
            }
        }
    }
    // Closed, if they never listened (a start that failed, was given up
    // on or was told to stop).
    drop(listen_later);
    let mut failed = None;
    for ((id, handle), core) in handles.into_iter().enumerate().zip(&cfg.cores) {
        if let Err(e) = handle.join() {
            let reason = crate::shard::executor_failure(&e);
            match failed {
                // The first is the process's error line; the others are
                // logged.
                None => {
                    failed = Some(StartupError::ShardFailed {
                        id,
                        core: *core,
                        reason,
                    })
                }
                // Another shard failing the same way says nothing new:
                // the start's error stays one line.
                Some(StartupError::ShardFailed {
                    reason: ref first, ..
                }) if *first == reason => {}
                Some(_) => crate::error!("shard {id} failed: {reason}"),
            }
        }
    }
    if failed.is_none() {
        failed = listen_failed.or(abandoned);
    }
    if let (None, Some((id, reason))) = (&failed, refused) {
        failed = Some(StartupError::ShardFailed {
            id,
            core: cfg.cores[id],
            reason,
        });
    }
    crate::info!("all shards stopped");
    // A hand-over that started this drain finishes its exchange (the
    // replay set, then DRAINING) before the process exits.
    crate::handover::wait_exchanges(crate::handover::EXPORT_TIMEOUT + Duration::from_secs(1));
    if let (Some(path), Some(id), true) = (&control_path, control_file, owns_control) {
        crate::handover::remove_control(path, id);
    }
    // Answer the metrics requests already accepted (the metrics HTTP
    // deadlines bound each to a few seconds) before the process exits,
    // within what is left of the drain's time.
    if let Some(b) = &board {
        b.wait_answered(crate::stop::exit_wait(Duration::from_secs(3)));
    }
    // A shard that failed, at start-up or later, fails the process (exit
    // 2), so that a supervisor sees it and restarts the service.
    failed.map_or(Ok(()), Err)
}

/// A successor exit: hands each shard its share (by owner) of the
/// predecessor's replay set, which opens their replay checks. With a
/// complete set the predecessor's `not_before` is kept (hellos queued on the
/// shared listeners stay acceptable); otherwise hellos stamped before this
/// process started are refused (fail closed). Returns the limit in force.
fn inherit_replay_set(
    signals: &SignalPlane,
    got: crate::handover::InheritedSalts,
    started_unix: u64,
    shards: usize,
) -> u64 {
    let not_before = if got.complete {
        got.not_before.min(started_unix)
    } else {
        crate::warn!(
            "hand-over: the predecessor's replay set is incomplete; refusing hellos stamped before this process started"
        );
        started_unix
    };
    let n = got.salts.len();
    let mut per_shard: Vec<Vec<crate::replay::Remembered>> = vec![Vec::new(); shards];
    for salt in got.salts {
        per_shard[crate::replay::owner(salt.0, shards)].push(salt);
    }
    signals.send_each(
        per_shard
            .into_iter()
            .map(|salts| crate::control::Message::Salts { not_before, salts })
            .collect(),
    );
    crate::info!("hand-over: replay set of {n} salt(s) inherited");
    not_before
}

/// Starts the upstream manager (DNS re-resolution, active health checks),
/// which reaches the shards through the signal plane's control sockets.
fn spawn_upstream_manager(
    cfg: &Config,
    signals: &SignalPlane,
    board: Option<Board>,
    probe_keys: Option<Arc<std::sync::Mutex<crate::proto::KeySet>>>,
) {
    use crate::upstream::manager::{Manager, Probe};
    let ups = &cfg.upstreams;
    let probe = match probe_keys {
        Some(keys) => Probe::Tunnel { keys },
        None => Probe::Connect,
    };
    let timeout = cfg.limits.connect_timeout
        + match &cfg.mode {
            crate::config::Mode::Entry(t) => t.handshake_timeout,
            _ => Duration::ZERO,
        };
    let plane = signals.handle();
    let manager = Manager {
        specs: ups.specs.clone(),
        endpoints: ups.endpoints.clone(),
        dns_refresh: ups.has_names().then_some(ups.dns_refresh),
        listen: cfg.listen,
        dual_stack: cfg.dual_stack,
        health: ups.health,
        timeout,
        probe,
        send: Box::new(move |u| plane.broadcast(crate::control::Message::Upstream(u))),
        any_up: Box::new(move |up| {
            if let Some(b) = &board {
                b.info
                    .no_upstream_up
                    .store(!up, std::sync::atomic::Ordering::Relaxed);
            }
        }),
    };
    if let Err(e) = crate::upstream::manager::spawn(manager) {
        crate::warn!("upstream manager not started (no DNS refresh, no health checks): {e}");
    }
}

/// Opens the access log once before any shard starts, so a path that
/// cannot be written is a start-up error, not a per-shard one.
fn check_access_log(path: &str, protected: &[(&'static str, String)]) -> Result<(), StartupError> {
    if path == "-" {
        return Ok(());
    }
    crate::access_log::open_guarded(path, protected)
        .map(drop)
        .map_err(|e| StartupError::AccessLog {
            path: path.to_string(),
            reason: e.to_string(),
        })
}

/// `a` is `want`, or `want` asks for port 0 on the same IP.
fn same_address(a: std::net::SocketAddr, want: std::net::SocketAddr) -> bool {
    a == want || (want.port() == 0 && a.ip() == want.ip())
}

/// The re-exec's command line: the original one without `--takeover PATH`
/// (or `--takeover=PATH`), which the upgrade adds back itself.
fn without_takeover(mut up: Upgrade) -> Upgrade {
    let mut out = Vec::with_capacity(up.args.len());
    let mut skip_next = false;
    for arg in up.args.drain(..) {
        if skip_next {
            skip_next = false;
            continue;
        }
        if arg == "--takeover" {
            skip_next = true;
            continue;
        }
        if arg.to_str().is_some_and(|a| a.starts_with("--takeover=")) {
            continue;
        }
        out.push(arg);
    }
    up.args = out;
    up
}

/// Which of `n` inherited listeners each of `m` shards accepts on (indices).
/// Shard `i < n` takes listener `i`. Listeners beyond `m` (the successor has
/// fewer shards) are accepted on by every shard: the kernel spreads new
/// connections evenly over the `n` listeners of the `SO_REUSEPORT` group,
/// so giving each extra one to a single shard (as `j % m` did) sent that
/// shard twice the others' share after a 3→2 upgrade. Shared, an extra
/// listener's connections go to whichever shard accepts first (the less
/// busy one, under load; 256–320 of 600 sequential connections per shard
/// in `tests/handover.rs`, against 400 and 200 before). Steering new
/// connections away from the extras with a BPF program on the group was
/// tried and dropped: the program belongs to the whole group, so it also
/// starved processes that joined it fresh (a surge deployment). Shards
/// `i >= n` get none here: they bind new listeners that join the group.
/// Inherited sockets are never closed: a closed listener would reset the
/// connections queued on it (unless `net.ipv4.tcp_migrate_req = 1`).
fn assign_inherited(n: usize, m: usize) -> Vec<Vec<usize>> {
    (0..m)
        .map(|i| {
            let own = (i < n).then_some(i);
            own.into_iter().chain(m..n).collect()
        })
        .collect()
}

/// The listeners of each shard, and each distinct listener once (the ones
/// to offer a successor). Fresh: one new `SO_REUSEPORT` listener per
/// shard. After a takeover of N listeners by M shards: see
/// [`assign_inherited`]; shards beyond N bind new listeners that join the
/// group. Each shard holds a duplicate of its sockets.
fn shard_listeners(
    cfg: &Config,
    inherited: Option<&mut crate::handover::Inherited>,
) -> Result<(Vec<Vec<socket2::Socket>>, Vec<socket2::Socket>), StartupError> {
    let m = cfg.cores.len();
    let dup = |s: &socket2::Socket| {
        s.try_clone().map_err(|source| StartupError::Listen {
            addr: cfg.listen,
            source,
        })
    };
    let Some(inherited) = inherited else {
        let joining = crate::listener::port_taken(cfg.listen);
        let fresh = crate::listener::bind_all(cfg, m)?;
        if joining && read_sysctl("/proc/sys/net/ipv4/tcp_migrate_req") == Some(0) {
            crate::warn!(
                "joined another process's SO_REUSEPORT group on {} while net.ipv4.tcp_migrate_req = 0: when either process closes its listeners, connections queued on them are reset; set it to 1 (deploy/sysctl/) or use --takeover",
                cfg.listen
            );
        }
        let per_shard = fresh
            .iter()
            .map(|s| dup(s).map(|d| vec![d]))
            .collect::<Result<_, _>>()?;
        return Ok((per_shard, fresh));
    };
    let Some(addr) = inherited.listen_addr() else {
        return Err(StartupError::Takeover("no listener was handed over".into()));
    };
    if !same_address(addr, cfg.listen) {
        return Err(StartupError::Takeover(format!(
            "the running process listens on {addr}, this configuration on {}; they must match",
            cfg.listen
        )));
    }
    let mut distinct = std::mem::take(&mut inherited.proxy);
    let n = distinct.len();
    let mut per_shard: Vec<Vec<socket2::Socket>> = assign_inherited(n, m)
        .into_iter()
        .map(|js| js.into_iter().map(|j| dup(&distinct[j])).collect())
        .collect::<Result<_, _>>()?;
    if m > n {
        for (k, socket) in crate::listener::bind_more(cfg, addr, m - n)?
            .into_iter()
            .enumerate()
        {
            per_shard[n + k].push(dup(&socket)?);
            distinct.push(socket);
        }
    }
    Ok((per_shard, distinct))
}

fn read_sysctl(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether process `pid` is alive ([`process_alive`] of its
/// `/proc/PID/stat`; gone if that cannot be read).
fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|st| process_alive(&st))
}

/// Whether `/proc/PID/stat` (proc(5)) describes a process that is neither a
/// zombie (`Z`) or dead (`X`) nor exiting (`PF_EXITING`, 0x4, in the
/// `flags` field). A killed process closes its sockets in the middle of its
/// exit, before it becomes a zombie: its hand-over partner sees the reset
/// while the state still says running, but the flag is already set.
fn process_alive(stat: &str) -> bool {
    const PF_EXITING: u64 = 0x4;
    let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
        return false;
    };
    let mut fields = rest.split_whitespace();
    let state = fields.next().unwrap_or("X");
    // After the state: ppid, pgrp, session, tty_nr, tpgid, then flags.
    let flags = fields
        .nth(5)
        .and_then(|f| f.parse::<u64>().ok())
        .unwrap_or(0);
    !matches!(state, "Z" | "X" | "x") && flags & PF_EXITING == 0
}

#[cfg(test)]
mod tests {
    use super::{assign_inherited, process_alive};

    /// Every inherited listener has an acceptor, each shard has one of its
    /// own, and extras (fewer shards than listeners) are shared by all, so
    /// no shard takes two listeners' share.
    #[test]
    fn inherited_listeners_are_spread_so_no_shard_takes_a_double_share() {
        assert_eq!(assign_inherited(2, 2), [vec![0], vec![1]]);
        assert_eq!(assign_inherited(3, 2), [vec![0, 2], vec![1, 2]]);
        assert_eq!(assign_inherited(2, 1), [vec![0, 1]]);
        assert_eq!(
            assign_inherited(5, 3),
            [vec![0, 3, 4], vec![1, 3, 4], vec![2, 3, 4]]
        );
        // More shards than listeners: the others bind their own.
        assert_eq!(assign_inherited(1, 3), [vec![0], vec![], vec![]]);
        for n in 1..=8 {
            for m in 1..=8 {
                let a = assign_inherited(n, m);
                for j in 0..n {
                    assert!(a.iter().any(|s| s.contains(&j)), "{n}->{m}: {j} unserved");
                }
                // Expected share of new connections per shard, in units of
                // 1/n: its own listener plus an equal part of the shared.
                let shared = n.saturating_sub(m) as f64 / m as f64;
                for (i, s) in a.iter().enumerate().take(n.min(m)) {
                    let share = 1.0 + s.iter().filter(|&&j| j >= m).count() as f64 / m as f64;
                    assert!((share - (1.0 + shared)).abs() < 1e-9, "{n}->{m}: shard {i}");
                }
            }
        }
    }

    #[test]
    fn a_process_is_alive_unless_it_is_exiting_or_a_zombie() {
        let line = |state: &str, flags: u64| {
            format!("42 (shard proxy) {state} 1 42 42 0 -1 {flags} 0 0 0 0 1 2 0 0 20 0 9")
        };
        assert!(process_alive(&line("S", 0x400140)));
        assert!(process_alive(&line("R", 0)));
        assert!(!process_alive(&line("Z", 0x400140)));
        assert!(!process_alive(&line("X", 0)));
        // Killed, closing its files, not yet a zombie.
        assert!(!process_alive(&line("R", 0x400144)));
        assert!(!process_alive(&line("D", 0x4)));
        assert!(!process_alive("garbage"));
        let me = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(process_alive(&me), "{me}");
    }
}
