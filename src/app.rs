//! Start-up and shutdown of the whole process.

use glommio::{GlommioError, LocalExecutorBuilder, Placement};

use crate::cli::{KeygenArgs, ProxyArgs, TunnelArgs};
use crate::config::{Config, Role};
use crate::control::Controller;
use crate::error::StartupError;
use crate::metrics::Board;
use crate::proto::Psk;

/// The cores this process may run on (respects taskset and cpusets).
pub fn allowed_cores() -> Vec<usize> {
    let mut ids: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    ids.sort_unstable();
    ids
}

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

/// Runs `forward` until it has drained.
pub fn run_forward(args: &ProxyArgs) -> Result<(), StartupError> {
    run(Config::from_args(Role::Forward, args, &allowed_cores())?)
}

/// Runs `entry` or `exit` until it has drained.
pub fn run_tunnel(role: Role, args: &TunnelArgs) -> Result<(), StartupError> {
    let (cfg, warning) = Config::from_tunnel_args(role, args, &allowed_cores())?;
    if let Some(w) = warning {
        crate::warn!("{w}");
    }
    run(cfg)
}

/// Writes a fresh key to `args.out` (mode 0600, refusing to overwrite) or stdout.
pub fn keygen(args: &KeygenArgs) -> Result<(), StartupError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let key = Psk::generate().map_err(|e| StartupError::Keygen(format!("no randomness: {e}")))?;
    let line = zeroize::Zeroizing::new(format!("{}\n", key.to_base64()));
    match &args.out {
        None => {
            print!("{}", line.as_str());
            Ok(())
        }
        Some(path) => std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .map_err(|e| StartupError::Keygen(format!("cannot write {path}: {e}"))),
    }
}

/// `shardproxy check --config FILE`: everything `run` would validate (flags,
/// addresses, cores, key file), without binding or starting anything.
/// Returns a one-line summary.
pub fn check(path: &str) -> Result<String, StartupError> {
    use clap::Parser;
    let file = crate::config_file::load(path, None)?;
    let role = file
        .role
        .clone()
        .ok_or(crate::config_file::FileError::BadRole {
            path: path.to_string(),
        })?;
    let mut argv = vec!["shardproxy".to_string(), role];
    argv.extend(file.args);
    let cli = crate::cli::Cli::try_parse_from(argv).map_err(|e| StartupError::ConfigValue {
        path: path.to_string(),
        message: e
            .to_string()
            .lines()
            .next()
            .unwrap_or("invalid setting")
            .trim_start_matches("error: ")
            .to_string(),
    })?;
    let cores = allowed_cores();
    let cfg = match &cli.command {
        crate::cli::Command::Forward(a) => Config::from_args(Role::Forward, a, &cores)?,
        crate::cli::Command::Entry(a) => Config::from_tunnel_args(Role::Entry, a, &cores)?.0,
        crate::cli::Command::Exit(a) => Config::from_tunnel_args(Role::Exit, a, &cores)?.0,
        _ => unreachable!("a config file names a proxy role"),
    };
    Ok(format!(
        "config {path} OK: role {}, listen {}, upstream {} ({}), {} shard(s) on cores {}",
        cfg.role.as_str(),
        cfg.listen,
        cfg.upstream_name,
        cfg.upstream,
        cfg.cores.len(),
        crate::config::format_cpu_list(&cfg.cores)
    ))
}

/// Runs a validated configuration until it has drained.
pub fn run(cfg: Config) -> Result<(), StartupError> {
    preflight()?;
    let listeners = crate::listener::bind_all(&cfg, cfg.cores.len())?;
    let board = match cfg.metrics_listen {
        None => None,
        Some(addr) => {
            let metrics = crate::metrics::http::bind(addr)
                .map_err(|source| StartupError::MetricsListen { addr, source })?;
            let board = Board::new(cfg.cores.len(), cfg.role.as_str());
            let bound = metrics.local_addr().unwrap_or(addr);
            crate::metrics::http::spawn(metrics, board.clone(), cfg.metrics_interval)
                .map_err(|source| StartupError::MetricsListen { addr, source })?;
            crate::info!("metrics on http://{bound}/metrics (also /histograms, /healthz)");
            Some(board)
        }
    };
    let (controller, shard_ends) =
        Controller::new(cfg.cores.len()).map_err(StartupError::Signals)?;
    controller.handle_signals(
        cfg.tunnel.as_ref().map(|t| t.key_file.clone()),
        board.clone(),
    )?;
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
