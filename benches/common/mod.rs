//! Helpers shared by the end-to-end benches: origins, proxy launchers,
//! workloads, and CPU accounting from /proc. Loopback only; every loop is
//! bounded in time and count.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

pub const BIN: &str = env!("CARGO_BIN_EXE_shardproxy");

pub fn secs() -> Duration {
    Duration::from_secs(
        std::env::var("BENCH_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3),
    )
}

// ---------- origins ----------

pub fn serve(handler: impl Fn(TcpStream) + Send + Sync + Clone + 'static) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let h = handler.clone();
            thread::spawn(move || h(conn));
        }
    });
    addr
}

/// Echo, for request/response and connection-rate runs.
pub fn echo_origin() -> SocketAddr {
    serve(|mut s| {
        let _ = s.set_nodelay(true);
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 || s.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    })
}

/// Sink: counts bytes to EOF, answers with the count (8 bytes LE).
pub fn sink_origin() -> SocketAddr {
    serve(|mut s| {
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        let _ = s.write_all(&total.to_le_bytes());
    })
}

// ---------- targets ----------

pub struct Target {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub children: Vec<Child>,
}

impl Target {
    pub fn cpu_secs(&self) -> f64 {
        self.children.iter().map(|c| proc_cpu_secs(c.id())).sum()
    }

    /// CPU of the first process only (proxy A: the client's side, e.g. the
    /// entry that balances over a pool).
    pub fn first_cpu_secs(&self) -> f64 {
        self.children.first().map_or(0.0, |c| proc_cpu_secs(c.id()))
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn clk_tck() -> f64 {
    let out = Command::new("getconf").arg("CLK_TCK").output();
    out.ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

pub fn proc_cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the ")" of comm: utime is field 14, stime 15 (1-based).
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / clk_tck()
}

/// Resident memory of `pid` in KiB (`VmRSS`), 0 if it is gone.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A loopback port nothing listens on now, and that this process has not
/// handed out before: the kernel may give a port back as soon as the probe
/// socket closes, and two components handed the same one (a relay told to
/// listen on its own upstream's port) hung a whole run.
pub fn free_port() -> SocketAddr {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        if GIVEN.lock().unwrap().insert(addr.port()) {
            return addr;
        }
    }
}

pub fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing listening on {addr}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// Where the pairs run (`BENCH_PLACEMENT`): `split` (default) pins proxy
/// A (the client's side: forward A, entry, HAProxy A, sslocal) to core 0
/// and proxy B to core 1, so their busiest threads never share a core;
/// `shared` pins both to core 1, and [`pin_load`] puts the bench's own
/// client and origin threads on core 0.
pub fn shared_placement() -> bool {
    std::env::var("BENCH_PLACEMENT").is_ok_and(|p| p == "shared")
}

/// A command that runs shardproxy. With `BENCH_PLACEMENT=shared` it goes
/// through `taskset -c 0,1`: the bench pinned itself to core 0
/// ([`pin_load`]), children inherit that, and shardproxy refuses a
/// `--cpu-list` outside the cores it is allowed (as it should, under
/// `taskset` or a cpuset).
fn proxy_command() -> Command {
    if shared_placement() {
        let mut c = Command::new("taskset");
        c.args(["-c", "0,1", BIN]);
        c
    } else {
        Command::new(BIN)
    }
}

/// Proxy A's core (see [`shared_placement`]).
pub fn core_a() -> &'static str {
    if shared_placement() {
        "1"
    } else {
        "0"
    }
}

/// Proxy B's core (see [`shared_placement`]).
pub fn core_b() -> &'static str {
    "1"
}

/// With `BENCH_PLACEMENT=shared`, pins the calling thread, and so every
/// thread it starts after (the client and the origins), to core 0; the
/// default placement leaves them unpinned. Call first thing in `main`.
pub fn pin_load() {
    if shared_placement() {
        core_affinity::set_for_current(core_affinity::CoreId { id: 0 });
    }
}

pub fn shardproxy_pair(origin: SocketAddr) -> Target {
    shardproxy_pair_with(origin, &[], &[])
}

/// The forward pair with extra flags for proxy A (the client's) and B.
pub fn shardproxy_pair_with(origin: SocketAddr, a_extra: &[String], b_extra: &[String]) -> Target {
    let (a, b) = (free_port(), free_port());
    let start = |listen: SocketAddr, up: SocketAddr, cpu: &str, extra: &[String]| {
        proxy_command()
            .args([
                "forward",
                "--listen",
                &listen.to_string(),
                "--upstream",
                &up.to_string(),
            ])
            .args(["--cpu-list", cpu])
            .args(extra)
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let cb = start(b, origin, core_b(), b_extra);
    let ca = start(a, b, core_a(), a_extra);
    wait_listening(b);
    wait_listening(a);
    Target {
        name: "shardproxy forward ×2",
        addr: a,
        children: vec![ca, cb],
    }
}

/// Writes a fresh key with the real `keygen` to `path` (replacing it).
pub fn keygen_to(path: &std::path::Path) {
    let _ = std::fs::remove_file(path);
    let ok = Command::new(BIN)
        .args(["keygen", "--out", path.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(ok.success());
}

/// Starts `shardproxy ROLE --listen L --upstream U --key-file K EXTRA...`
/// with stderr discarded.
pub fn spawn_role(
    role: &str,
    listen: SocketAddr,
    up: SocketAddr,
    key: &std::path::Path,
    extra: &[&str],
) -> Child {
    proxy_command()
        .args([
            role,
            "--listen",
            &listen.to_string(),
            "--upstream",
            &up.to_string(),
        ])
        .args(["--key-file", key.to_str().unwrap()])
        .args(extra)
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

pub fn encrypted_pair(origin: SocketAddr) -> Target {
    encrypted_pair_with(origin, &[], &[])
}

/// An entry (core 0) balancing over `n` endpoints (1 ≤ n ≤ 250) that are
/// all one exit (core 1), listening on every loopback address: the
/// endpoints are `127.0.0.1..n` on its port. The exit side is then the
/// same process as in the single-exit pair, so the difference is the
/// entry's balancing over a pool, not more processes sharing a core.
pub fn encrypted_pool(origin: SocketAddr, n: usize) -> Target {
    let dir = std::env::temp_dir().join(format!("shardproxy-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("bench.key");
    keygen_to(&key);
    let port = free_port().port();
    let exit_listen = SocketAddr::from(([0, 0, 0, 0], port));
    let cx = spawn_role("exit", exit_listen, origin, &key, &["--cpu-list", core_b()]);
    let entry = free_port();
    let mut args: Vec<String> = ["--cpu-list", core_a()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for i in 2..=n {
        args.push("--upstream".into());
        args.push(format!("127.0.0.{i}:{port}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let first = SocketAddr::from(([127, 0, 0, 1], port));
    wait_listening(first);
    let ce = spawn_role("entry", entry, first, &key, &args);
    wait_listening(entry);
    Target {
        name: "shardproxy entry + 4 exits",
        addr: entry,
        children: vec![ce, cx],
    }
}

/// The encrypted pair with extra flags for the entry and the exit.
pub fn encrypted_pair_with(
    origin: SocketAddr,
    entry_extra: &[String],
    exit_extra: &[String],
) -> Target {
    let (entry, exit) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("shardproxy-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("bench.key");
    keygen_to(&key);
    let start = |role: &str, listen: SocketAddr, up: SocketAddr, cpu: &str| {
        let extra = if role == "entry" {
            entry_extra
        } else {
            exit_extra
        };
        let mut args = vec!["--cpu-list", cpu];
        args.extend(extra.iter().map(String::as_str));
        spawn_role(role, listen, up, &key, &args)
    };
    let cx = start("exit", exit, origin, core_b());
    let ce = start("entry", entry, exit, core_a());
    wait_listening(exit);
    wait_listening(entry);
    Target {
        name: "shardproxy entry+exit",
        addr: entry,
        children: vec![ce, cx],
    }
}

/// CPU-seconds per GB that sealing and opening cost on one core (the
/// AEAD's own share of the encrypted pair's bulk cost), measured now.
pub fn aead_cpu_per_gb() -> f64 {
    use shardproxy::proto::{accept_hello, ClientHandshake, Decoded, Psk, MAX_FRAME, MAX_PAYLOAD};
    let psk = Psk::from_bytes([3; 32]);
    let (hs, hello) = ClientHandshake::start(&psk, [1; 32], 100, b"").unwrap();
    let acc = accept_hello(&[psk], &hello, [2; 32], 100, 120).unwrap();
    let (mut enc, _) = hs.finish(&acc.server_hello).unwrap();
    let mut dec = acc.decoder;
    let mut frame = vec![0u8; MAX_FRAME];
    let start = Instant::now();
    let mut bytes = 0u64;
    while start.elapsed() < Duration::from_secs(1) {
        let n = enc.seal_in_place(&mut frame, MAX_PAYLOAD).unwrap();
        assert!(matches!(
            dec.decode(&mut frame[..n]).unwrap(),
            Decoded::Data { .. }
        ));
        bytes += MAX_PAYLOAD as u64;
    }
    start.elapsed().as_secs_f64() / (bytes as f64 / 1e9)
}

pub fn haproxy_pair(origin: SocketAddr) -> Option<Target> {
    haproxy_pair_with(origin, "", "haproxy tcp ×2")
}

/// [`haproxy_pair`] with `extra` lines in its `defaults` section (e.g.
/// `option splice-auto`), reported as `name`. `maxpipes 1000`: HAProxy's
/// default (a quarter of `maxconn`) would need more descriptors than this
/// machine's hard `RLIMIT_NOFILE` of 20000, and it refuses to start.
pub fn haproxy_pair_with(origin: SocketAddr, extra: &str, name: &'static str) -> Option<Target> {
    Command::new("haproxy").arg("-v").output().ok()?;
    let (a, b) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("shardproxy-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let start = |name: &str, listen: SocketAddr, up: SocketAddr, cpu: &str| {
        let cfg = dir.join(format!("{name}.cfg"));
        std::fs::write(
            &cfg,
            format!(
                "global\n  nbthread 1\n  maxconn 8000\n  maxpipes 1000\n\
                 defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 5m\n  timeout server 5m\n{extra}\
                 frontend f\n  bind {listen}\n  default_backend b\n\
                 backend b\n  server s {up}\n"
            ),
        )
        .unwrap();
        Command::new("taskset")
            .args(["-c", cpu, "haproxy", "-db", "-f"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let cb = start("b", b, origin, core_b());
    let ca = start("a", a, b, core_a());
    wait_listening(b);
    wait_listening(a);
    Some(Target {
        name,
        addr: a,
        children: vec![ca, cb],
    })
}

/// The floor relay (`benches/floor/relay.c`, built with `cc -O2` once per
/// run): the least work a user-space relay can do per message, as a pair
/// placed like the others. Not a product; the reference that tells how far
/// below HAProxy any relay that moves bytes through user space can get.
/// `None` (with a message) without a C compiler.
pub fn floor_pair(origin: SocketAddr) -> Option<Target> {
    static BUILT: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    let bin = BUILT.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("shardproxy-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let bin = dir.join("floor-relay");
        let src = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/floor/relay.c");
        let ok = Command::new("cc")
            .args(["-O2", "-o"])
            .arg(&bin)
            .arg(src)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("no C compiler (cc): skipping the floor relay's row (apt-get install gcc)");
        }
        ok.then_some(bin)
    });
    let bin = bin.as_ref()?;
    let (a, b) = (free_port(), free_port());
    let start = |listen: SocketAddr, up: SocketAddr, cpu: &str| {
        Command::new("taskset")
            .args(["-c", cpu])
            .arg(bin)
            .args([listen.port().to_string(), up.port().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let cb = start(b, origin, core_b());
    let ca = start(a, b, core_a());
    wait_listening(b);
    wait_listening(a);
    Some(Target {
        name: "floor relay ×2",
        addr: a,
        children: vec![ca, cb],
    })
}

/// shadowsocks-rust's binary `name`, on PATH or where
/// `cargo install shadowsocks-rust --locked --root /opt/ssrust` puts it.
pub fn ss_binary(name: &str) -> Option<String> {
    let on_path = Command::new(name).arg("--version").output().ok();
    if on_path.is_some_and(|o| o.status.success()) {
        return Some(name.to_string());
    }
    let path = format!("/opt/ssrust/bin/{name}");
    std::path::Path::new(&path).exists().then_some(path)
}

/// shadowsocks-rust in tunnel mode, the encrypted peer: `sslocal --protocol
/// tunnel` (core 0) → `ssserver` (core 1) → origin, with `method` (e.g.
/// `2022-blake3-chacha20-poly1305`, SIP022). Each is single-threaded and
/// pinned like our pair. `None` (with a message) when it is not installed.
pub fn shadowsocks_pair(origin: SocketAddr, method: &str, name: &'static str) -> Option<Target> {
    let (Some(local), Some(server)) = (ss_binary("sslocal"), ss_binary("ssserver")) else {
        eprintln!("shadowsocks-rust not installed: skipping {name} (cargo install shadowsocks-rust --locked --root /opt/ssrust)");
        return None;
    };
    let (a, b) = (free_port(), free_port());
    // 32 bytes of key, base64 (SIP022 keys are raw; the older methods
    // derive theirs from the password).
    let key = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    let spawn = |cpu: &str, bin: &str, args: Vec<String>| {
        Command::new("taskset")
            .args(["-c", cpu, bin, "--single-threaded"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let cb = spawn(
        core_b(),
        &server,
        s(&["-s", &b.to_string(), "-m", method, "-k", key]),
    );
    let ca = spawn(
        core_a(),
        &local,
        s(&[
            "--protocol",
            "tunnel",
            "-b",
            &a.to_string(),
            "--forward-addr",
            &origin.to_string(),
            "-s",
            &b.to_string(),
            "-m",
            method,
            "-k",
            key,
        ]),
    );
    wait_listening(b);
    wait_listening(a);
    Some(Target {
        name,
        addr: a,
        children: vec![ca, cb],
    })
}

// ---------- workloads ----------

/// Bulk upload over `streams` connections for about `secs()`; returns bytes.
pub fn bulk(addr: SocketAddr, streams: usize) -> u64 {
    let limit = secs();
    let workers: Vec<_> = (0..streams)
        .map(|_| {
            thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                let chunk = vec![0x5au8; 256 * 1024];
                let start = Instant::now();
                let mut sent = 0u64;
                // Bounded by time and by 64 GiB.
                while start.elapsed() < limit && sent < (64 << 30) {
                    s.write_all(&chunk).unwrap();
                    sent += chunk.len() as u64;
                }
                s.shutdown(Shutdown::Write).unwrap();
                let mut ack = [0u8; 8];
                s.read_exact(&mut ack).unwrap();
                assert_eq!(u64::from_le_bytes(ack), sent, "bytes lost");
                sent
            })
        })
        .collect();
    workers.into_iter().map(|w| w.join().unwrap()).sum()
}

/// 1 KiB ping-pong over `conns` keep-alive connections; returns the histogram (µs).
pub fn request_response(addr: SocketAddr, conns: usize) -> Histogram<u64> {
    request_response_sized(addr, conns, 1024)
}

/// `size`-byte ping-pong over `conns` keep-alive connections; returns the
/// histogram of round trips (µs).
pub fn request_response_sized(addr: SocketAddr, conns: usize, size: usize) -> Histogram<u64> {
    let limit = secs();
    let workers: Vec<_> = (0..conns)
        .map(|_| {
            thread::spawn(move || {
                let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_nodelay(true).unwrap();
                let msg = vec![0x42u8; size];
                let mut back = vec![0u8; size];
                let start = Instant::now();
                while start.elapsed() < limit && h.len() < 10_000_000 {
                    let t = Instant::now();
                    s.write_all(&msg).unwrap();
                    s.read_exact(&mut back).unwrap();
                    h.saturating_record(t.elapsed().as_micros() as u64);
                }
                h
            })
        })
        .collect();
    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    for w in workers {
        total.add(w.join().unwrap()).unwrap();
    }
    total
}

/// Connect, 1 KiB exchange, close, from 4 threads; returns connections done.
pub fn connection_rate(addr: SocketAddr) -> u64 {
    let limit = secs();
    let workers: Vec<_> = (0..4)
        .map(|_| {
            thread::spawn(move || {
                let start = Instant::now();
                let mut n = 0u64;
                let msg = [0x17u8; 1024];
                let mut back = [0u8; 1024];
                while start.elapsed() < limit && n < 1_000_000 {
                    let mut s = TcpStream::connect(addr).unwrap();
                    s.set_nodelay(true).unwrap();
                    s.write_all(&msg).unwrap();
                    s.read_exact(&mut back).unwrap();
                    drop(s);
                    n += 1;
                }
                n
            })
        })
        .collect();
    workers.into_iter().map(|w| w.join().unwrap()).sum()
}
