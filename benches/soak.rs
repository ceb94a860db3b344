//! Soak: mixed traffic through an entry/exit pair for `SOAK_SECS` (default
//! 600), with the exit's and entry's keys rotated by SIGHUP halfway. Then
//! checks that nothing failed, that the proxies' descriptor counts return to
//! their baseline, and that memory is back near it.
//!
//! Run: `cargo bench --bench soak` (`SOAK_SECS=60` for a short run).
//! Results go in docs/RELIABILITY.md. Loopback only; every loop is bounded.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn keygen_line() -> String {
    let out = Command::new(BIN).arg("keygen").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    failed: AtomicU64,
    bytes: AtomicU64,
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let dir = std::env::temp_dir().join(format!("shardproxy-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (old, new) = (keygen_line(), keygen_line());
    let exit_keys = dir.join("exit.key");
    let entry_keys = dir.join("entry.key");
    std::fs::write(&exit_keys, format!("{old}\n")).unwrap();
    std::fs::write(&entry_keys, format!("{old}\n")).unwrap();
    for k in [&exit_keys, &entry_keys] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(k, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let origin = echo_origin();
    let (exit_addr, entry_addr) = (free_port(), free_port());
    let start_proxy = |role, listen, up, key: &std::path::Path, cpu| {
        spawn_role(
            role,
            listen,
            up,
            key,
            &["--cpu-list", cpu, "--idle-timeout", "30s"],
        )
    };
    let mut exit = start_proxy("exit", exit_addr, origin, &exit_keys, "1");
    wait_listening(exit_addr);
    let mut entry = start_proxy("entry", entry_addr, exit_addr, &entry_keys, "0");
    wait_listening(entry_addr);
    thread::sleep(Duration::from_millis(300));
    let base = [
        (fds(exit.id()), rss_kib(exit.id())),
        (fds(entry.id()), rss_kib(entry.id())),
    ];

    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let mut workers = Vec::new();
    // 2 bulk streams (4 MiB per connection), 8 small request loops, 2 churners.
    for kind in [
        "bulk", "bulk", "small", "small", "small", "small", "small", "small", "small", "small",
        "churn", "churn",
    ] {
        let (stop, counts) = (stop.clone(), counts.clone());
        workers.push(thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let result = (|| -> std::io::Result<u64> {
                    let mut c = TcpStream::connect(entry_addr)?;
                    c.set_read_timeout(Some(Duration::from_secs(30)))?;
                    match kind {
                        "bulk" => {
                            let data = vec![0x5au8; 4 << 20];
                            let mut w = c.try_clone()?;
                            let t = thread::spawn(move || {
                                w.write_all(&data)?;
                                w.shutdown(Shutdown::Write)
                            });
                            let mut back = Vec::new();
                            c.read_to_end(&mut back)?;
                            t.join().unwrap()?;
                            if back.len() != 4 << 20 || back.iter().any(|&b| b != 0x5a) {
                                return Err(std::io::Error::other("bulk mismatch"));
                            }
                            Ok(back.len() as u64)
                        }
                        "small" => {
                            let mut n = 0;
                            let msg = [0x42u8; 1024];
                            let mut back = [0u8; 1024];
                            for _ in 0..200 {
                                c.write_all(&msg)?;
                                c.read_exact(&mut back)?;
                                n += 1024;
                            }
                            Ok(n)
                        }
                        _ => {
                            c.write_all(b"churn")?;
                            let mut back = [0u8; 5];
                            c.read_exact(&mut back)?;
                            Ok(5)
                        }
                    }
                })();
                match result {
                    Ok(n) => {
                        counts.ok.fetch_add(1, Ordering::Relaxed);
                        counts.bytes.fetch_add(n, Ordering::Relaxed);
                    }
                    Err(e) => {
                        counts.failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("soak: {kind} failed: {e}");
                    }
                }
            }
        }));
    }
    let started = Instant::now();
    let half = Duration::from_secs(secs / 2);
    thread::sleep(half);
    // Rotate: exits accept new and old, then entries switch to new, then the
    // exits drop old. Live connections keep their session keys throughout.
    std::fs::write(&exit_keys, format!("{new}\n{old}\n")).unwrap();
    let _ = Command::new("kill")
        .args(["-HUP", &exit.id().to_string()])
        .status();
    thread::sleep(Duration::from_secs(1));
    std::fs::write(&entry_keys, format!("{new}\n")).unwrap();
    let _ = Command::new("kill")
        .args(["-HUP", &entry.id().to_string()])
        .status();
    thread::sleep(Duration::from_secs(1));
    std::fs::write(&exit_keys, format!("{new}\n")).unwrap();
    let _ = Command::new("kill")
        .args(["-HUP", &exit.id().to_string()])
        .status();
    thread::sleep(Duration::from_secs(secs).saturating_sub(started.elapsed()));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    thread::sleep(Duration::from_secs(2));
    let after = [
        (fds(exit.id()), rss_kib(exit.id())),
        (fds(entry.id()), rss_kib(entry.id())),
    ];
    let (ok, failed, bytes) = (
        counts.ok.load(Ordering::Relaxed),
        counts.failed.load(Ordering::Relaxed),
        counts.bytes.load(Ordering::Relaxed),
    );
    println!("soak {secs} s: {ok} connections ok, {failed} failed, {:.2} GB echoed; keys rotated by SIGHUP at {} s", bytes as f64 / 1e9, half.as_secs());
    for (name, (b, a)) in ["exit", "entry"].iter().zip(base.iter().zip(after.iter())) {
        println!(
            "{name}: fds {} -> {}, RSS {} KiB -> {} KiB",
            b.0, a.0, b.1, a.1
        );
    }
    for p in [&mut exit, &mut entry] {
        let _ = p.kill();
        let _ = p.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(failed, 0, "errors during the soak");
    assert!(
        after[0].0 <= base[0].0 && after[1].0 <= base[1].0,
        "descriptors leaked"
    );
    assert!(
        after[0].1 < base[0].1 + 32 * 1024 && after[1].1 < base[1].1 + 32 * 1024,
        "memory not back near baseline"
    );
}
