//! `shardproxy demo`: a loopback playground for the encrypted pair.
//!
//! Starts a tiny origin (HTTP for curl, echo for anything else) in this
//! process, writes a fresh key to a private temp file, and runs the real
//! binary twice as child processes: an `exit` in front of the origin and an
//! `entry` in front of the exit. Ctrl-C drains all of it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::cli::DemoArgs;
use crate::error::StartupError;

/// Runs the demo until SIGINT/SIGTERM, then waits for both proxies to drain.
pub fn run(args: &DemoArgs) -> Result<(), StartupError> {
    let cores = crate::config::allowed_cores();
    crate::config::select_cores(Some(args.cores), None, &cores)?;
    let ports = [args.port, args.origin_port, args.exit_port];
    if ports[0] == ports[1] || ports[0] == ports[2] || ports[1] == ports[2] {
        return Err(crate::config::ConfigError::Args(format!(
            "--port, --origin-port and --exit-port must be three different ports (got {}, {}, {}) (see --help)",
            ports[0], ports[1], ports[2]
        ))
        .into());
    }
    // A port another process listens on with SO_REUSEPORT (a running
    // shardproxy) would let a demo proxy bind it too and take part of that
    // process's clients: never what a demo is for.
    for (flag, port) in [
        ("--port", args.port),
        ("--exit-port", args.exit_port),
        ("--origin-port", args.origin_port),
    ] {
        if crate::listener::port_taken(SocketAddr::from(([127, 0, 0, 1], port))) {
            return Err(crate::config::ConfigError::Args(format!(
                "demo {flag} {port}: 127.0.0.1:{port} is already in use by another program (stop it or pick another port)"
            ))
            .into());
        }
    }
    let origin_addr = SocketAddr::from(([127, 0, 0, 1], args.origin_port));
    let origin = TcpListener::bind(origin_addr).map_err(|e| listen_error(origin_addr, e))?;
    thread("demo-origin", move || {
        for conn in origin.incoming().flatten() {
            // No thread for this client: it is closed, the demo goes on.
            let _ = thread("demo-client", move || serve_origin(conn));
        }
    })?;
    // TMPDIR as the C library reads it: unset, empty or relative means
    // /tmp (Rust's `temp_dir` would take an empty one as the current
    // directory).
    let tmp = match std::env::temp_dir() {
        t if t.is_absolute() => t,
        _ => std::path::PathBuf::from("/tmp"),
    };
    let Some(tmp_text) = tmp.to_str() else {
        return Err(crate::config::ConfigError::Args(format!(
            "demo: the temporary directory `{}` (TMPDIR) is not valid UTF-8; set TMPDIR to another directory",
            tmp.display()
        ))
        .into());
    };
    remove_stale_keys(&tmp);
    let key_path = format!(
        "{}/shardproxy-demo-{}.key",
        tmp_text.trim_end_matches('/'),
        std::process::id()
    );
    let _ = std::fs::remove_file(&key_path);
    crate::app::keygen(&crate::cli::KeygenArgs {
        out: Some(key_path.clone()),
    })
    .map_err(|e| {
        crate::config::ConfigError::Args(format!(
            "demo: cannot write its key in the temporary directory {tmp_text} (TMPDIR): {e}"
        ))
    })?;
    // Every way out after this removes the key (the error paths too: a
    // thread or a proxy that could not be started left it behind).
    let result = run_with_key(args, &key_path, origin_addr);
    let _ = std::fs::remove_file(&key_path);
    result
}

/// The demo once its key is written at `key_path`: starts both proxies
/// and waits for them.
fn run_with_key(
    args: &DemoArgs,
    key_path: &str,
    origin_addr: SocketAddr,
) -> Result<(), StartupError> {
    let stop = Arc::new(AtomicBool::new(false));
    // The first signal drains (forwarded to the proxies below); a second
    // one exits at once with code 1, as the proxies themselves do.
    let signals = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut incoming = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .map_err(StartupError::Signals)?;
    // A mask inherited from the parent must not keep them from the handler
    // (as for a proxy, see `control::held_at_start`).
    let _ =
        crate::sys::unblock_signals(&[signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM]);
    {
        let (stop, signals) = (stop.clone(), signals.clone());
        thread("demo-signals", move || {
            for _ in incoming.forever() {
                signals.fetch_add(1, Ordering::Relaxed);
                stop.store(true, Ordering::Relaxed);
            }
        })?;
    }
    let exe = std::env::current_exe().map_err(|source| StartupError::Demo {
        what: "the proxies (cannot find our own executable)",
        source,
    })?;
    let cores = args.cores.to_string();
    let exit_addr = format!("127.0.0.1:{}", args.exit_port);
    let entry_addr = format!("127.0.0.1:{}", args.port);
    // Proxies that have loaded the key (they read it before their shards
    // log "listening on"): once both have, the key file goes, so a demo
    // killed outright leaves no key behind.
    let loaded = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let spawn = |role: &'static str, listen: &str, upstream: &str| {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(&exe);
        // A demo killed outright (SIGKILL, an OOM kill) must not leave both
        // proxies running on its ports: they get SIGTERM and drain. This
        // runs on the main thread, which lives as long as the demo.
        crate::sys::stop_with_parent(&mut cmd);
        cmd
            // A process group of their own: a terminal's Ctrl-C signals the
            // whole foreground job, and a proxy that got it as well as the
            // SIGTERM we forward would take that as a second signal and
            // reset every connection. We alone pass the stop on.
            .process_group(0)
            .args([
                role,
                "--listen",
                listen,
                "--upstream",
                upstream,
                "--key-file",
                key_path,
            ])
            .args(["--cores", &cores, "--drain-timeout", "5s"])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map(|mut child| {
                // Both proxies log the same kinds of lines ("shard 0 core 0
                // summary: ..."): each line gets its role in front.
                if let Some(err) = child.stderr.take() {
                    let loaded = loaded.clone();
                    // Without its thread the child's lines are not
                    // shown (the demo still runs).
                    let _ = thread("demo-log", move || {
                        use std::io::BufRead;
                        let mut listening = false;
                        for line in std::io::BufReader::new(err).lines() {
                            let Ok(line) = line else { break };
                            eprintln!("[{role}] {line}");
                            if !listening && line.contains(" listening on ") {
                                listening = true;
                                loaded.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    });
                }
                child
            })
            .map_err(|source| StartupError::Demo { what: role, source })
    };
    let exit = spawn("exit", &exit_addr, &origin_addr.to_string())?;
    let entry = match spawn("entry", &entry_addr, &exit_addr) {
        Ok(entry) => entry,
        // The exit runs already: it is stopped, and waited for, before
        // the demo reports the error (it exited and left the exit
        // draining behind it).
        Err(e) => {
            let mut started = [("exit", exit)];
            terminate(&started);
            for (_, c) in &mut started {
                let _ = c.wait();
            }
            return Err(e);
        }
    };
    let mut children: Vec<(&'static str, Child)> = vec![("exit", exit), ("entry", entry)];
    crate::info!(
        "demo: client → entry {entry_addr} → (ChaCha20-Poly1305) → exit {exit_addr} → origin {origin_addr}"
    );
    // Wait for the children; forward a termination signal sent only to us.
    let mut forwarded = false;
    // A proxy that failed before anyone asked the demo to stop.
    let mut failed: Option<&'static str> = None;
    let mut key_removed = false;
    while !children.is_empty() {
        // Both proxies listen: the demo is ready, and the key file goes.
        if !key_removed && loaded.load(Ordering::Relaxed) >= 2 {
            key_removed = true;
            let _ = std::fs::remove_file(key_path);
            crate::info!(
                "demo: ready: try `curl http://{entry_addr}/` or `nc -N 127.0.0.1 {}` (echo); Ctrl-C drains and stops",
                args.port
            );
        }
        if signals.load(Ordering::Relaxed) >= 2 {
            // Second signal: the proxies' own second signal exits them at
            // once (connections reset); so do we.
            terminate(&children);
            crate::warn!("demo: second termination signal: exiting now");
            let _ = std::fs::remove_file(key_path);
            crate::log::flush();
            std::process::exit(1);
        }
        if stop.load(Ordering::Relaxed) && !forwarded {
            forwarded = true;
            terminate(&children);
            crate::info!("demo: both proxies told to drain (a second Ctrl-C stops them at once)");
        }
        children.retain_mut(|(role, c)| match c.try_wait() {
            Ok(Some(status)) => {
                if !status.success() && !forwarded && failed.is_none() {
                    failed = Some(role);
                }
                false
            }
            _ => true,
        });
        // A proxy that exits on its own (bad port, ...) stops the demo.
        if let Some(role) = failed.filter(|_| !forwarded) {
            forwarded = true;
            terminate(&children);
            crate::warn!("demo: the {role} proxy exited with an error (its lines above say why); stopping the demo");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_file(key_path);
    if let Some(role) = failed {
        return Err(StartupError::DemoProxy(role));
    }
    Ok(())
}

/// Removes the key files of earlier demos that are no longer running (a
/// demo killed before both proxies had read its key leaves it behind).
fn remove_stale_keys(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("shardproxy-demo-"))
            .and_then(|n| n.strip_suffix(".key"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Sends SIGTERM to each demo proxy (a second one makes it exit at once).
/// The children are unreaped while listed (`try_wait` removes them from
/// the list once it reaps them), so each PID is still theirs.
fn terminate(children: &[(&'static str, Child)]) {
    for (_, c) in children {
        crate::sys::terminate(c.id());
    }
}

fn listen_error(addr: SocketAddr, e: std::io::Error) -> StartupError {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => StartupError::AddrInUse(addr),
        _ => StartupError::Listen { addr, source: e },
    }
}

/// Answers `GET` with a small HTTP response, and echoes anything else.
fn serve_origin(mut conn: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    let Ok(n) = conn.read(&mut buf) else { return };
    if buf[..n].starts_with(b"GET ") {
        let body = "hello from the shardproxy demo origin, through the encrypted tunnel\n";
        let _ = write!(
            conn,
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        return;
    }
    let mut chunk = &buf[..n];
    loop {
        if conn.write_all(chunk).is_err() {
            return;
        }
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => chunk = &buf[..n],
        }
    }
}

/// A named thread; a thread the system refuses is an error, not a panic.
fn thread(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), StartupError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(drop)
        .map_err(|e| {
            let hint = if e.raw_os_error() == Some(libc::EAGAIN) {
                crate::error::NO_THREAD_HINT
            } else {
                ""
            };
            crate::config::ConfigError::Args(format!("demo: cannot start a thread: {e}{hint}"))
                .into()
        })
}
