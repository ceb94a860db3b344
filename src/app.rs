//! Start-up and shutdown of the whole process.

use glommio::{GlommioError, LocalExecutorBuilder, Placement};

use crate::cli::KeygenArgs;
use crate::config::Config;
use crate::control::{Controller, SignalPlane};
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
    crate::sys::probe_io_uring().map_err(|e| StartupError::IoUring(e.to_string()))?;
    match LocalExecutorBuilder::new(Placement::Unbound).make() {
        Ok(ex) => {
            drop(ex);
            Ok(())
        }
        Err(GlommioError::ReactorError(ReactorErrorKind::MemLockLimit(have, need))) => {
            Err(StartupError::MemLock { have, need })
        }
        Err(e) => Err(StartupError::IoUring(e.to_string().replace('\n', " "))),
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
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let key = Psk::generate().map_err(|e| StartupError::Keygen(format!("no randomness: {e}")))?;
    let line = zeroize::Zeroizing::new(format!("{}\n", key.to_base64()));
    match &args.out {
        None => print_stdout(&line)
            .map_err(|e| StartupError::Keygen(format!("cannot write the key to stdout: {e}"))),
        Some(path) => std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            // The key is written; the confirmation line is best effort.
            .map(|()| {
                let _ = print_stdout(&format!("wrote key {} to {path}\n", key.fingerprint()));
            })
            .map_err(|e| StartupError::Keygen(format!("cannot write {path}: {e}"))),
    }
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
/// addresses, cores, key file), through the same [`crate::config::load`],
/// without binding or starting anything. Returns a one-line summary.
pub fn check(path: &str) -> Result<String, StartupError> {
    let (cfg, warnings) = crate::config::load_file(path)?;
    for w in warnings {
        crate::warn!("{w}");
    }
    let keys = cfg
        .tunnel()
        .map(|t| format!(", keys from {}: {}", t.key_file, t.keys.describe()))
        .unwrap_or_default();
    Ok(format!(
        "config {path} OK: role {}, listen {}, upstream {} ({}), {} shard(s) on cores {}{keys}",
        cfg.role().as_str(),
        cfg.listen,
        cfg.upstream_name,
        cfg.upstream,
        cfg.cores.len(),
        crate::config::format_cpu_list(&cfg.cores)
    ))
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
        crate::error!("exiting after the panic: {n} socket(s) reset");
        std::process::exit(101);
    }));
    preflight()?;
    raise_fd_limit(cfg.fds_needed());
    let listeners = crate::listener::bind_all(&cfg, cfg.cores.len())?;
    let board = match cfg.metrics_listen {
        None => None,
        Some(addr) => {
            let metrics = crate::metrics::http::bind(addr)
                .map_err(|source| StartupError::MetricsListen { addr, source })?;
            let board = Board::new(cfg.cores.len(), cfg.role().as_str());
            let bound = metrics.local_addr().unwrap_or(addr);
            crate::metrics::http::spawn(metrics, board.clone(), cfg.metrics_interval)
                .map_err(|source| StartupError::MetricsListen { addr, source })?;
            crate::info!("metrics on http://{bound}/metrics (also /histograms, /healthz, /livez)");
            Some(board)
        }
    };
    if let Some(t) = cfg.tunnel() {
        crate::info!("keys from {}: {}", t.key_file, t.keys.describe());
        if let Some(b) = &board {
            b.set_keys(t.keys.fingerprints());
        }
    }
    let (controller, shard_ends) =
        Controller::new(cfg.cores.len()).map_err(StartupError::Signals)?;
    // From here a termination signal drains: a shard that has not started
    // yet finds the drain message waiting on its control socket.
    signals.started(
        controller,
        cfg.tunnel().map(|t| t.key_file.clone()),
        board.clone(),
    );
    let mut handles = Vec::with_capacity(cfg.cores.len());
    for (id, ((core, listener), control)) in
        cfg.cores.iter().zip(listeners).zip(shard_ends).enumerate()
    {
        handles.push(crate::shard::spawn(
            id,
            *core,
            cfg.clone(),
            listener,
            control,
            board.clone(),
        )?);
    }
    for (id, handle) in handles.into_iter().enumerate() {
        if let Err(e) = handle.join() {
            crate::error!("shard {id} failed: {e}");
        }
    }
    crate::info!("all shards stopped");
    Ok(())
}
