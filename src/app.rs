//! Start-up and shutdown of the whole process.

use glommio::{GlommioError, LocalExecutorBuilder, Placement};

use crate::cli::ProxyArgs;
use crate::config::{Config, Role};
use crate::control::Controller;
use crate::error::StartupError;

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

/// Runs a proxy role until it has drained. Returns once every shard stopped.
pub fn run_proxy(role: Role, args: &ProxyArgs) -> Result<(), StartupError> {
    let cfg = Config::from_args(role, args, &allowed_cores())?;
    preflight()?;
    let listeners = crate::listener::bind_all(&cfg, cfg.cores.len())?;
    let (controller, shard_ends) =
        Controller::new(cfg.cores.len()).map_err(StartupError::Signals)?;
    controller.handle_signals()?;
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
