//! Shared helpers for the integration tests: start the real binary, run
//! in-test origins on 127.0.0.1:0, generate and hash data.
//!
//! Every test starts shardproxy through [`Proxy`]'s builder:
//!
//! ```ignore
//! let p = Proxy::forward(upstream).shards(2).arg("--idle-timeout").arg("1s").start();
//! let exit = Proxy::exit(origin, &key_file).start();
//! let run = Proxy::command(["run", "--config", &path]).shards(1).start();
//! ```
//!
//! Waiting is done on events: [`Proxy::wait_for_log`] blocks on a condition
//! variable until the stderr reader records a matching line. [`poll_until`] is
//! the one place that polls, for state nothing announces (an HTTP endpoint
//! refreshed on a timer, a /proc value, a port that stops accepting).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub const BIN: &str = env!("CARGO_BIN_EXE_shardproxy");

/// How long a proxy may take to log that every shard listens.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A proxy's stderr, line by line, shared with the thread that reads it.
#[derive(Default)]
struct Log {
    state: Mutex<LogState>,
    changed: Condvar,
}

#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    /// The pipe reached EOF: the process exited, no line will follow.
    closed: bool,
    /// The reader stops reading the pipe (`Proxy::pause_log`), as a stuck
    /// log consumer would.
    paused: bool,
}

impl Log {
    /// Waits until `pred` matches at least `n` lines; returns the first `n`.
    /// `None` on timeout or when the pipe closed first.
    fn wait_for(
        &self,
        pred: &mut dyn FnMut(&str) -> bool,
        n: usize,
        timeout: Duration,
    ) -> Option<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut state = self.state.lock().unwrap();
        let mut seen = 0; // lines already tested against `pred`
        let mut found = Vec::new();
        loop {
            for line in &state.lines[seen..] {
                if pred(line) {
                    found.push(line.clone());
                }
            }
            seen = state.lines.len();
            if found.len() >= n {
                found.truncate(n);
                return Some(found);
            }
            let now = Instant::now();
            if state.closed || now >= deadline {
                return None;
            }
            state = self.changed.wait_timeout(state, deadline - now).unwrap().0;
        }
    }

    /// Waits until the pipe closed (the process exited); false on timeout.
    fn wait_closed(&self, timeout: Duration) -> bool {
        let state = self.state.lock().unwrap();
        let (state, _) = self
            .changed
            .wait_timeout_while(state, timeout, |s| !s.closed)
            .unwrap();
        state.closed
    }

    fn closed(&self) -> bool {
        self.state.lock().unwrap().closed
    }

    fn lines(&self) -> Vec<String> {
        self.state.lock().unwrap().lines.clone()
    }
}

/// How to start a proxy: built by [`Proxy::forward`], [`Proxy::entry`],
/// [`Proxy::exit`] or [`Proxy::command`], started by [`ProxyBuilder::start`].
#[must_use = "a builder does nothing until .start()"]
pub struct ProxyBuilder {
    head: Vec<String>,
    listen: Option<String>,
    shards: usize,
    extra: Vec<String>,
    ulimits: Vec<(&'static str, u64)>,
    env: Vec<(String, String)>,
    hosts: Option<String>,
    own_group: bool,
    bin: Option<std::path::PathBuf>,
}

impl ProxyBuilder {
    fn new(head: Vec<String>, listen: Option<&str>) -> Self {
        ProxyBuilder {
            head,
            listen: listen.map(str::to_string),
            shards: 1,
            extra: Vec::new(),
            ulimits: Vec::new(),
            env: Vec::new(),
            hosts: None,
            own_group: false,
            bin: None,
        }
    }

    /// Runs this file instead of the built binary (a copy or hard link a
    /// test can replace while the proxy runs).
    pub fn binary(mut self, path: &std::path::Path) -> Self {
        self.bin = Some(path.to_path_buf());
        self
    }

    /// Starts it in a process group of its own, as a shell starts a
    /// foreground job, so that [`Proxy::signal_group`] can signal the whole
    /// job the way a terminal's Ctrl-C does.
    pub fn own_process_group(mut self) -> Self {
        self.own_group = true;
        self
    }

    /// A second upstream endpoint, `other`, after the first, with
    /// `--balance round-robin`: a shard's first client goes to the first
    /// endpoint, its second to `other`.
    pub fn round_robin_with(self, other: SocketAddr) -> Self {
        self.args(["--upstream", &other.to_string(), "--balance", "round-robin"])
    }

    /// Number of shards (`--cores N`); `start` waits for each to listen.
    pub fn shards(mut self, n: usize) -> Self {
        self.shards = n;
        self
    }

    /// The `--listen` address (default `127.0.0.1:0` for the role forms).
    pub fn listen(mut self, addr: impl ToString) -> Self {
        self.listen = Some(addr.to_string());
        self
    }

    /// One more command-line argument, after the defaults.
    pub fn arg(mut self, arg: impl AsRef<str>) -> Self {
        self.extra.push(arg.as_ref().to_string());
        self
    }

    /// More command-line arguments, after the defaults.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.extra
            .extend(args.into_iter().map(|a| a.as_ref().to_string()));
        self
    }

    /// An environment variable for the process only (never the test's own
    /// environment, which concurrent tests share).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Starts the binary under `ulimit <flag> <value>` (e.g. `("-n", 64)`),
    /// through `sh -c '... && exec'`, so the pid is still the proxy's.
    pub fn ulimit(mut self, flag: &'static str, value: u64) -> Self {
        self.ulimits.push((flag, value));
        self
    }

    /// Runs the proxy in a mount namespace of its own in which `path` is
    /// bind-mounted over `/etc/hosts` (`unshare --mount`, root only): name
    /// resolution tests change that file, never the machine's. Edit it in
    /// place (same inode) for the proxy to see the change.
    pub fn hosts_file(mut self, path: &str) -> Self {
        self.hosts = Some(path.to_string());
        self
    }

    /// The full argument list `start` passes to the binary.
    pub fn argv(&self) -> Vec<String> {
        let mut argv = self.head.clone();
        if let Some(listen) = &self.listen {
            argv.extend(["--listen".to_string(), listen.clone()]);
        }
        argv.extend(["--cores".to_string(), self.shards.to_string()]);
        argv.extend(self.extra.iter().cloned());
        argv
    }

    /// Spawns the proxy and returns once every shard logged its listen
    /// address. Panics (with the log) if that does not happen in 20 s.
    pub fn start(self) -> Proxy {
        let argv = self.argv();
        let bin = self
            .bin
            .clone()
            .unwrap_or_else(|| std::path::PathBuf::from(BIN));
        let mut cmd = if let Some(hosts) = &self.hosts {
            let mut c = Command::new("unshare");
            c.args(["--mount", "--", "sh", "-c"])
                .arg("mount --bind \"$SHARDPROXY_HOSTS\" /etc/hosts && exec \"$0\" \"$@\"")
                .arg(&bin)
                .args(&argv)
                .env("SHARDPROXY_HOSTS", hosts);
            c
        } else if self.ulimits.is_empty() {
            let mut c = Command::new(&bin);
            c.args(&argv);
            c
        } else {
            let limits: Vec<String> = self
                .ulimits
                .iter()
                .map(|(flag, v)| format!("ulimit {flag} {v}"))
                .collect();
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(format!("{} && exec \"$0\" \"$@\"", limits.join(" && ")))
                .arg(&bin)
                .args(&argv);
            c
        };
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        // Inherited by the successors a proxy re-executes (SIGUSR2): the
        // drop finds and kills them by it (see `kill_tagged`).
        let tag = {
            use std::sync::atomic::{AtomicU64, Ordering};
            static N: AtomicU64 = AtomicU64::new(0);
            format!(
                "{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            )
        };
        cmd.env(TAG_VAR, &tag);
        if self.own_group {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn shardproxy");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Log::default());
        let sink = log.clone();
        let reader = thread::spawn(move || {
            let mut lines = BufReader::new(stderr).lines();
            loop {
                {
                    let mut state = sink.state.lock().unwrap();
                    while state.paused {
                        state = sink.changed.wait(state).unwrap();
                    }
                }
                let Some(Ok(line)) = lines.next() else { break };
                sink.state.lock().unwrap().lines.push(line);
                sink.changed.notify_all();
            }
            sink.state.lock().unwrap().closed = true;
            sink.changed.notify_all();
        });
        // The address comes from lines already recorded in the log (the
        // reader records a line before it wakes anyone), so a caller that
        // got the address also sees the line in `log()`.
        let listening = log.wait_for(
            &mut |l| l.contains(" listening on "),
            self.shards,
            START_TIMEOUT,
        );
        let Some(listening) = listening else {
            let _ = child.kill();
            let _ = child.wait();
            let _ = reader.join();
            panic!("proxy {argv:?} did not start: {:?}", log.lines());
        };
        let addrs: Vec<SocketAddr> = listening
            .iter()
            .map(|l| {
                let rest = l.split(" listening on ").nth(1).unwrap();
                rest.split(' ').next().unwrap().parse().unwrap()
            })
            .collect();
        let proxy = Proxy {
            child,
            addr: addrs[0],
            log,
            reader: Some(reader),
            shards: self.shards,
            tag,
        };
        assert!(
            addrs.iter().all(|a| *a == proxy.addr),
            "shards listen on different addresses: {listening:?}"
        );
        proxy
    }
}

/// A running shardproxy process with its stderr captured line by line.
pub struct Proxy {
    child: Child,
    pub addr: SocketAddr,
    log: Arc<Log>,
    /// The stderr reader; joined once the child exited (its pipe is closed
    /// then, so the join is bounded).
    reader: Option<JoinHandle<()>>,
    shards: usize,
    /// The value of [`TAG_VAR`] in its environment and its successors'.
    tag: String,
}

/// The environment variable that marks a test's proxy and every process it
/// re-executes.
const TAG_VAR: &str = "SHARDPROXY_TEST_TAG";

/// SIGKILLs every process whose environment holds `TAG_VAR=tag`: the
/// successors a proxy re-executed (SIGUSR2), which a test that failed
/// before it learned their PIDs would otherwise leave running, holding the
/// proxy's stderr pipe open (the drop then waited for its EOF for ever).
/// By the environment, not the process group, because PIDs are reused
/// (`pid_max` is 32768 here) once a group's members are gone.
fn kill_tagged(tag: &str) {
    let mark = format!("{TAG_VAR}={tag}\0");
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    let pids: Vec<String> = dir
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.bytes().all(|b| b.is_ascii_digit()))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.windows(mark.len()).any(|w| w == mark.as_bytes()))
        })
        .collect();
    if !pids.is_empty() {
        let _ = Command::new("kill")
            .arg("-KILL")
            .args(&pids)
            .stderr(Stdio::null())
            .status();
    }
}

impl Proxy {
    /// `shardproxy forward --upstream <upstream>`.
    pub fn forward(upstream: SocketAddr) -> ProxyBuilder {
        ProxyBuilder::new(
            vec!["forward".into(), "--upstream".into(), upstream.to_string()],
            Some("127.0.0.1:0"),
        )
    }

    /// `shardproxy entry --upstream <exit> --key-file <key_file>`.
    pub fn entry(upstream: SocketAddr, key_file: &str) -> ProxyBuilder {
        Self::tunnel("entry", upstream, key_file)
    }

    /// `shardproxy exit --upstream <origin> --key-file <key_file>`.
    pub fn exit(upstream: SocketAddr, key_file: &str) -> ProxyBuilder {
        Self::tunnel("exit", upstream, key_file)
    }

    fn tunnel(role: &str, upstream: SocketAddr, key_file: &str) -> ProxyBuilder {
        ProxyBuilder::new(
            vec![
                role.into(),
                "--upstream".into(),
                upstream.to_string(),
                "--key-file".into(),
                key_file.into(),
            ],
            Some("127.0.0.1:0"),
        )
    }

    /// `shardproxy <args>` with no `--listen` added (e.g. `run --config`);
    /// `--cores <shards>` is still added.
    pub fn command<I, S>(args: I) -> ProxyBuilder
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        ProxyBuilder::new(
            args.into_iter().map(|a| a.as_ref().to_string()).collect(),
            None,
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How many shards it was started with.
    pub fn shards(&self) -> usize {
        self.shards
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Sends `sig` to its whole process group (started with
    /// [`ProxyBuilder::own_process_group`]): what a terminal's Ctrl-C does.
    pub fn signal_group(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), "--", &format!("-{}", self.pid())])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} -- -{} failed", self.pid());
    }

    /// Waits (bounded) for the process to exit on its own, then for the
    /// stderr reader to finish; returns the exit status. Panics, after a
    /// SIGKILL, if it is still running after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        // Its stderr closes when it exits: wait for that EOF, not a timer.
        if !self.log.wait_closed(limit) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.join_reader();
            panic!("process did not exit within {limit:?}: {:?}", self.log());
        }
        let status = self.child.wait().unwrap();
        self.join_reader();
        status
    }

    fn join_reader(&mut self) {
        self.resume_log();
        if let Some(reader) = self.reader.take() {
            reader.join().expect("stderr reader panicked");
        }
    }

    /// Sends SIGTERM and waits for exit (bounded); returns the status and
    /// every line it logged.
    pub fn terminate(mut self) -> (ExitStatus, Vec<String>) {
        self.signal("TERM");
        let status = self.wait_exit(Duration::from_secs(60));
        (status, self.log())
    }

    /// Its exit status if it has exited (without waiting, and without
    /// waiting for its stderr, which a child it started may share).
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILL, then reap it and its stderr reader.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.join_reader();
    }

    /// Stops reading the process's stderr (after the line being read), so
    /// that its pipe fills up: a log consumer that stopped.
    pub fn pause_log(&self) {
        self.log.state.lock().unwrap().paused = true;
        self.log.changed.notify_all();
    }

    /// Reads stderr again after [`Proxy::pause_log`].
    pub fn resume_log(&self) {
        self.log.state.lock().unwrap().paused = false;
        self.log.changed.notify_all();
    }

    /// Every stderr line so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lines()
    }

    /// Waits for a stderr line matching `pred` (including lines logged
    /// before the call) and returns it. Panics, with the log, after
    /// `timeout` or if the process exits first.
    pub fn wait_for_log(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> String {
        self.wait_for_lines(pred, 1, timeout).remove(0)
    }

    /// Like [`Proxy::wait_for_log`], for `n` matching lines.
    pub fn wait_for_lines(
        &self,
        pred: impl Fn(&str) -> bool,
        n: usize,
        timeout: Duration,
    ) -> Vec<String> {
        match self.log.wait_for(&mut |l| pred(l), n, timeout) {
            Some(lines) => lines,
            None => panic!(
                "{} of {n} expected log lines within {timeout:?}{}: {:?}",
                self.log().iter().filter(|l| pred(l)).count(),
                if self.log.closed() {
                    " (the process exited)"
                } else {
                    ""
                },
                self.log()
            ),
        }
    }

    /// Waits until every shard logged the line `shard {id}{suffix}`, e.g.
    /// `": keys replaced (1 key(s))"` or `" draining: stopped accepting"`.
    pub fn wait_for_every_shard(&self, suffix: &str, timeout: Duration) {
        for id in 0..self.shards {
            let want = format!("shard {id}{suffix}");
            self.wait_for_log(|l| l.contains(&want), timeout);
        }
    }
    /// The metrics address it logged (`--metrics-listen`, port 0 resolved).
    pub fn metrics_addr(&self) -> SocketAddr {
        let line = self.wait_for_log(
            |l| l.contains("metrics on http://"),
            Duration::from_secs(10),
        );
        line.split("metrics on http://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("bad metrics line: {line}"))
    }

    /// Resident set size in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// Open file descriptors, from /proc.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        kill_tagged(&self.tag);
        // The pipe closed with the process; don't turn a reader panic into
        // a double panic while unwinding.
        self.resume_log();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// Waits at most `limit` for `child` to exit; its exit code (`None` if it
/// had to be killed or died of a signal).
pub fn run_bounded_wait(child: &mut std::process::Child, limit: Duration) -> Option<i32> {
    let until = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if std::time::Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` (a command expected to exit by itself, such as a start-up
/// that must fail) and returns its status and stderr; `None`, after a
/// SIGKILL, if it is still running after `limit`. A proxy that wrongly
/// accepts its input serves forever, which `.output()` would wait for.
pub fn run_bounded(mut cmd: Command, limit: Duration) -> Option<(ExitStatus, String)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    // The pipe reaches EOF when the process exits.
    let reader = thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        let _ = tx.send(());
        text
    });
    let exited = rx.recv_timeout(limit).is_ok();
    if !exited {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    let stderr = reader.join().unwrap();
    exited.then_some((status, stderr))
}

/// Calls `probe` until it returns `Ok`, for at most `timeout`; then panics
/// with the last `Err`. Only for state that no log line or channel
/// announces: polling every 20 ms is the one wait that is not an event.
pub fn poll_until<T, E: std::fmt::Display>(
    timeout: Duration,
    mut probe: impl FnMut() -> Result<T, E>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match probe() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => panic!("after {timeout:?}: {e}"),
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Whether process `pid` still runs: it exists and is not a zombie (one
/// that has exited and waits for whoever adopted it to reap it; this
/// container's PID 1 reaps nothing).
pub fn process_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
    })
}

/// SIGKILLs process `pid` when dropped: a process the test did not start
/// itself (a proxy's successor, a demo's child) never outlives the test,
/// also when an assertion fails first.
pub struct KillOnDrop(pub u32);

/// An exit's log `lines` show one session refused (close reason `refused`)
/// because its origin connect ran out of time (docs/PROTOCOL.md §3.1).
pub fn refused_once_for_a_connect_timeout(lines: &[String]) {
    let refused: u64 = summaries(lines).iter().map(|s| s.get("refused")).sum();
    assert_eq!(refused, 1, "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("refused the session") && l.contains("upstream connect timed out")),
        "the exit did not give up on its origin: {lines:?}"
    );
}

/// A live session through the proxy at `addr` (to an echo origin): 4 bytes
/// sent and echoed, the connection left open, to hold a slot or keep a
/// draining process alive.
pub fn held_session(addr: SocketAddr) -> TcpStream {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    c.read_exact(&mut b).unwrap();
    c
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .status();
    }
}

/// Sum of a metric's samples in a `/metrics` text whose labels contain
/// every `want` (0 when there are none).
pub fn metric_sum(text: &str, name: &str, want: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| want.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The number right after `marker` in a log line (`"exiting now, 2
/// connection(s)"` with marker `"exiting now, "` gives 2).
pub fn number_after(line: &str, marker: &str) -> Option<u64> {
    line.split(marker).nth(1)?.split(' ').next()?.parse().ok()
}

/// One shard's drain summary, parsed from its log line.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub fields: std::collections::HashMap<String, u64>,
}

impl Summary {
    pub fn get(&self, key: &str) -> u64 {
        self.fields.get(key).copied().unwrap_or(0)
    }
}

/// The sum of one summary field over every shard's summary line.
pub fn summary_total(lines: &[String], key: &str) -> u64 {
    summaries(lines).iter().map(|s| s.get(key)).sum()
}

pub fn summaries(lines: &[String]) -> Vec<Summary> {
    lines
        .iter()
        .filter_map(|l| l.split(" summary: ").nth(1))
        .map(|rest| Summary {
            fields: rest
                .split(' ')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.parse().unwrap()))
                .collect(),
        })
        .collect()
}

/// Deterministic pseudo-random bytes (xorshift), so no RNG crate is needed.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// An echo origin: every connection gets its bytes back, FIN for FIN.
pub fn echo_origin() -> SocketAddr {
    serve(|mut s| {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) => {
                    let _ = s.shutdown(Shutdown::Write);
                    return;
                }
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    })
}

/// Runs `handler` on a thread per connection of a fresh 127.0.0.1:0 listener.
pub fn serve(handler: impl Fn(TcpStream) + Send + Sync + Clone + 'static) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let h = handler.clone();
            thread::spawn(move || h(conn));
        }
    });
    addr
}

/// Sends `data` and reads everything back concurrently; returns what came back.
pub fn echo_round_trip(addr: SocketAddr, data: Arc<Vec<u8>>) -> Vec<u8> {
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sender = thread::spawn(move || {
        for chunk in data.chunks(256 * 1024) {
            writer.write_all(chunk).unwrap();
        }
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    (&stream).read_to_end(&mut back).unwrap();
    sender.join().unwrap();
    back
}

/// `conns` echo round trips through `addr` from `parallel` threads, each
/// sending its data and its FIN back to back (sizes from 1 byte to 40 KiB,
/// so reads end full and short; every other connection after eight small
/// exchanges). Panics naming the first connection whose
/// echo did not come back whole, followed by EOF, within 10 s.
///
/// This is the pattern that once lost an EOF in the proxy: the FIN's poll
/// completion overwritten by a later one before the stream read it (see
/// `vendor/glommio/PATCHED.md`); with it, 1 connection in about 100 hung.
pub fn fin_behind_data(addr: SocketAddr, conns: usize, parallel: usize) {
    let workers: Vec<_> = (0..parallel)
        .map(|w| {
            thread::spawn(move || {
                for i in (w..conns).step_by(parallel) {
                    let len = 1 + (i * 7919) % (40 * 1024);
                    let data = random_bytes(len, i as u64);
                    let stream = TcpStream::connect(addr).unwrap();
                    stream
                        .set_read_timeout(Some(Duration::from_secs(10)))
                        .unwrap();
                    let mut writer = stream.try_clone().unwrap();
                    // Every other connection first exchanges a few small
                    // messages, so its sockets have left the proxy's first
                    // (one-shot) read polls for the multishot one.
                    if i % 2 == 1 {
                        for round in 0..8u8 {
                            writer.write_all(&[round; 100]).unwrap();
                            let mut echo = [0u8; 100];
                            (&stream).read_exact(&mut echo).unwrap();
                            assert_eq!(echo, [round; 100], "connection {i}");
                        }
                    }
                    let sent = data.clone();
                    let sender = thread::spawn(move || {
                        writer.write_all(&sent).unwrap();
                        writer.shutdown(Shutdown::Write).unwrap();
                    });
                    let mut back = Vec::new();
                    let read = (&stream).read_to_end(&mut back);
                    sender.join().unwrap();
                    assert!(
                        read.is_ok() && back == data,
                        "connection {i}: sent {len} bytes and FIN, got {} bytes back, then {read:?}",
                        back.len()
                    );
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("an echo round trip failed");
    }
}

/// A 127.0.0.1 port free now (bound, then released), for a process under
/// test to bind. Not an upstream that must stay dead: see [`dead_port`].
pub fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A 127.0.0.1 port that nothing listens on, and that stays so for the
/// rest of the test process: a socket is bound to it and never listens (a
/// connect is refused), and is kept, so the port cannot become another
/// test's origin. (It used to be bound, then released: a proxy whose
/// upstream was "dead" then reached a parallel test's listener, and broke
/// that test, in a fresh-clone CI run.)
pub fn dead_port() -> SocketAddr {
    static HELD: Mutex<Vec<socket2::Socket>> = Mutex::new(Vec::new());
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    HELD.lock().unwrap_or_else(|p| p.into_inner()).push(s);
    addr
}

/// An origin on `addr` (port 0: any) that never completes a connect: a
/// listener whose accept queue (backlog 0) one connection fills, so the
/// kernel drops every further SYN. Keep the returned sockets for as long
/// as it must last.
pub fn black_hole_on(addr: SocketAddr) -> (SocketAddr, socket2::Socket, TcpStream) {
    let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    // The port may have just been another listener's.
    l.set_reuse_address(true).unwrap();
    l.bind(&addr.into()).unwrap();
    l.listen(0).unwrap();
    let addr = l.local_addr().unwrap().as_socket().unwrap();
    let fill = TcpStream::connect(addr).unwrap();
    (addr, l, fill)
}

/// Result of reading a socket until it ends.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// Clean EOF (FIN).
    Eof,
    /// ECONNRESET or another error.
    Reset,
    /// Still open after the timeout.
    Open,
}

/// Reads and discards until EOF/error or `limit`.
pub fn read_until_end(stream: &mut TcpStream, limit: Duration) -> (End, usize) {
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let start = Instant::now();
    let mut total = 0;
    let mut buf = [0u8; 16 * 1024];
    while start.elapsed() < limit {
        match stream.read(&mut buf) {
            Ok(0) => return (End::Eof, total),
            Ok(n) => total += n,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return (End::Reset, total),
        }
    }
    (End::Open, total)
}

/// Writes key lines to a fresh 0600 file in cargo's per-build temp dir
/// (`target/tmp`, so runs do not pile key files up in /tmp); returns its
/// path.
pub fn key_file(keys: &[&str]) -> String {
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "shardproxy-test-{}-{}.key",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    // A file left at this path by an earlier run whose process had the same
    // PID (a test turns its key file into a FIFO, and opening a FIFO for
    // writing blocks until a reader comes) is removed, never opened.
    let _ = std::fs::remove_file(&path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .unwrap();
    for k in keys {
        writeln!(f, "{k}").unwrap();
    }
    path.to_string_lossy().into_owned()
}

/// A fresh key from the real `keygen` command.
pub fn keygen() -> String {
    let out = Command::new(BIN).arg("keygen").output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// What an origin connection saw.
#[derive(Debug)]
pub struct Seen {
    pub bytes: Vec<u8>,
    pub end: End,
}

/// A sink origin that reports each connection's bytes and how it ended.
pub fn recording_origin() -> (SocketAddr, mpsc::Receiver<Seen>) {
    let (tx, rx) = mpsc::channel();
    let tx = Arc::new(Mutex::new(tx));
    let addr = serve(move |mut s| {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut bytes = Vec::new();
        let mut buf = [0u8; 64 * 1024];
        let end = loop {
            match s.read(&mut buf) {
                Ok(0) => break End::Eof,
                Ok(n) => bytes.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break End::Open,
                Err(_) => break End::Reset,
            }
        };
        let _ = tx.lock().unwrap().send(Seen { bytes, end });
    });
    (addr, rx)
}

/// How a [`mitm`] tampers with the entry→exit byte stream.
#[derive(Clone, Copy, Debug)]
pub enum Tamper {
    /// Forward everything, recording the entry→exit bytes.
    Record,
    /// Flip one bit of the byte at this offset.
    Flip(usize),
    /// Forward this many bytes, then close both sides with FIN.
    Cut(usize),
}

/// A test-only TCP man-in-the-middle in front of `target`. Returns its
/// address and the recorded entry→exit bytes of the last connection.
pub fn mitm(target: SocketAddr, tamper: Tamper) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let record = Arc::new(Mutex::new(Vec::new()));
    let rec = record.clone();
    let addr = serve(move |inbound| {
        let outbound = TcpStream::connect(target).unwrap();
        let (mut in_r, mut out_w) = (inbound.try_clone().unwrap(), outbound.try_clone().unwrap());
        let (mut out_r, mut in_w) = (outbound, inbound);
        let back = thread::spawn(move || {
            let _ = std::io::copy(&mut out_r, &mut in_w);
            let _ = in_w.shutdown(Shutdown::Write);
        });
        let mut seen = 0usize;
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = match in_r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let chunk = &mut buf[..n];
            match tamper {
                Tamper::Record => rec.lock().unwrap().extend_from_slice(chunk),
                Tamper::Flip(at) if (seen..seen + n).contains(&at) => chunk[at - seen] ^= 0x01,
                Tamper::Cut(at) if seen + n >= at => {
                    let _ = out_w.write_all(&chunk[..at - seen]);
                    let _ = out_w.shutdown(Shutdown::Both);
                    let _ = in_r.shutdown(Shutdown::Both);
                    return;
                }
                _ => {}
            }
            seen += n;
            if out_w.write_all(chunk).is_err() {
                break;
            }
        }
        let _ = out_w.shutdown(Shutdown::Write);
        let _ = back.join();
    });
    (addr, record)
}

/// `GET path` on `addr` (a metrics endpoint): the status and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut raw = String::new();
    c.read_to_string(&mut raw).unwrap();
    let status = raw[9..12].parse().unwrap();
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Whether python3 with `cryptography` (what the independent tunnel
/// client, `tests/tunnel_client.py`, needs) is here; if not, says so with
/// [`missing`] (a failure unless skips are allowed on purpose).
pub fn python_cryptography() -> bool {
    let here = Command::new("python3")
        .args(["-c", "import cryptography"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !here {
        missing("python3 with the `cryptography` package (pip install cryptography)");
    }
    here
}

/// Runs the independent tunnel client (`tests/tunnel_client.py`) with
/// `args` and returns its stdout; it must exit 0. `None` if Python or
/// `cryptography` is missing (see [`python_cryptography`]).
pub fn tunnel_client(args: &[&str]) -> Option<String> {
    if !python_cryptography() {
        return None;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tunnel_client.py");
    let out = Command::new("python3")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "python client failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(stdout)
}

/// A prerequisite of a test is missing. Fails the test, naming what is
/// missing and how to get it: a check must never be skipped silently on a
/// fresh machine (`bash tests/all.sh` installs the suite's tools). Only with
/// `SHARDPROXY_ALLOW_SKIP=1`, set on purpose, does it log and let the caller
/// skip.
pub fn missing(what: &str) {
    if std::env::var("SHARDPROXY_ALLOW_SKIP").as_deref() == Ok("1") {
        eprintln!("SKIPPED (SHARDPROXY_ALLOW_SKIP=1): {what}");
        return;
    }
    panic!(
        "missing prerequisite: {what}. `bash tests/all.sh` installs the suite's tools; set SHARDPROXY_ALLOW_SKIP=1 to skip such checks on purpose"
    );
}

/// How a client resets its connection in [`client_reset_reaches_the_origin`].
#[derive(Clone, Copy, Debug)]
pub enum ResetAfter {
    /// After a request and its FIN; the origin reads both and stays silent.
    Fin,
    /// While its upload waits for room: the origin never reads.
    BlockedUpload,
}

/// A client connects through `front`, which relays to the origin this
/// returns first (pass it to the proxies, then call the returned closure
/// with the front address): the client resets as `how` says, and the
/// closure returns how long the origin took to see the reset (`SO_ERROR`
/// set), or `None` if it did not within 5 s (idle timeouts are minutes).
pub fn client_reset_reaches_the_origin(
    how: ResetAfter,
) -> (SocketAddr, impl FnOnce(SocketAddr) -> Option<Duration>) {
    let (tx, rx) = mpsc::channel::<Option<Duration>>();
    let (reset_tx, reset_rx) = mpsc::channel::<Instant>();
    let reset_rx = Arc::new(Mutex::new(reset_rx));
    let (fin_tx, fin_rx) = mpsc::channel::<()>();
    let fin_tx = Arc::new(Mutex::new(fin_tx));
    let origin = serve(move |mut s| {
        if matches!(how, ResetAfter::Fin) {
            let mut req = Vec::new();
            let _ = s.read_to_end(&mut req);
            let _ = fin_tx.lock().unwrap().send(());
        }
        // When the client reset.
        let Ok(at) = reset_rx
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(30))
        else {
            return;
        };
        let seen = loop {
            match s.take_error() {
                Ok(Some(_)) | Err(_) => break Some(at.elapsed()),
                Ok(None) if at.elapsed() > Duration::from_secs(5) => break None,
                Ok(None) => thread::sleep(Duration::from_millis(5)),
            }
        };
        let _ = tx.send(seen);
    });
    let run = move |front: SocketAddr| {
        let mut c = TcpStream::connect(front).unwrap();
        match how {
            ResetAfter::Fin => {
                c.write_all(b"request").unwrap();
                c.shutdown(Shutdown::Write).unwrap();
                // The request and the FIN reach the origin before the reset.
                fin_rx.recv_timeout(Duration::from_secs(10)).unwrap();
            }
            ResetAfter::BlockedUpload => {
                // Write until every buffer on the path is full.
                c.set_write_timeout(Some(Duration::from_millis(300)))
                    .unwrap();
                let chunk = vec![7u8; 64 * 1024];
                let start = Instant::now();
                while start.elapsed() < Duration::from_secs(20) {
                    if c.write(&chunk).is_err() {
                        break;
                    }
                }
            }
        }
        socket2::SockRef::from(&c)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(c);
        reset_tx.send(Instant::now()).unwrap();
        rx.recv_timeout(Duration::from_secs(30)).unwrap()
    };
    (origin, run)
}

/// Sends `a` ordinary bytes, one urgent byte (`MSG_OOB`), then `b` ordinary
/// bytes, in one burst and without a FIN.
pub fn urgent_burst(s: &TcpStream, a: usize, b: usize) {
    let mut w = s;
    w.write_all(&vec![b'a'; a]).unwrap();
    socket2::SockRef::from(s).send_out_of_band(b"!").unwrap();
    w.write_all(&vec![b'b'; b]).unwrap();
}

/// Reads until `want` bytes came, EOF, an error, or 5 s of silence;
/// returns how many came.
pub fn read_up_to(s: &mut TcpStream, want: usize) -> usize {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    while got < want {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    got
}

/// [`urgent_burst`]s of `(a, b)` bytes through `front`, `trials` times each
/// way (client → origin, then origin → client), against origins from
/// `origin_up` (reads, sends what it got on the channel) and `origin_down`
/// (sends the burst): returns the transfers that stalled, as
/// `(a, b, direction, bytes received)`.
pub fn urgent_bursts(
    front_up: SocketAddr,
    up_got: &mpsc::Receiver<usize>,
    front_down: SocketAddr,
    sizes: &[(usize, usize)],
    trials: usize,
) -> Vec<(usize, usize, &'static str, usize)> {
    let mut stalled = Vec::new();
    for &(a, b) in sizes {
        for _ in 0..trials {
            let mut c = TcpStream::connect(front_up).unwrap();
            c.write_all(&(a as u64).to_be_bytes()).unwrap();
            c.write_all(&(b as u64).to_be_bytes()).unwrap();
            urgent_burst(&c, a, b);
            let got = up_got.recv_timeout(Duration::from_secs(15)).unwrap();
            if got != a + b {
                stalled.push((a, b, "up", got));
            }
            drop(c);
            let mut c = TcpStream::connect(front_down).unwrap();
            c.write_all(&(a as u64).to_be_bytes()).unwrap();
            c.write_all(&(b as u64).to_be_bytes()).unwrap();
            let got = read_up_to(&mut c, a + b);
            if got != a + b {
                stalled.push((a, b, "down", got));
            }
        }
    }
    stalled
}

/// The origins for [`urgent_bursts`], each told `(a, b)` first (two
/// big-endian u64): one reads the burst and reports how much came, the
/// other sends the burst back and waits for the client to close.
pub fn urgent_origins() -> (SocketAddr, mpsc::Receiver<usize>, SocketAddr) {
    let (tx, rx) = mpsc::channel();
    let tx = Arc::new(Mutex::new(tx));
    let up = serve(move |mut s| {
        let mut sizes = [0u8; 16];
        if s.read_exact(&mut sizes).is_err() {
            return;
        }
        let a = u64::from_be_bytes(sizes[..8].try_into().unwrap()) as usize;
        let b = u64::from_be_bytes(sizes[8..].try_into().unwrap()) as usize;
        let got = read_up_to(&mut s, a + b);
        let _ = tx.lock().unwrap().send(got);
    });
    let down = serve(|mut s| {
        let mut sizes = [0u8; 16];
        if s.read_exact(&mut sizes).is_err() {
            return;
        }
        let a = u64::from_be_bytes(sizes[..8].try_into().unwrap()) as usize;
        let b = u64::from_be_bytes(sizes[8..].try_into().unwrap()) as usize;
        urgent_burst(&s, a, b);
        let _ = read_up_to(&mut s, 1);
    });
    (up, rx, down)
}

/// The flags that turn wake-up coalescing on at its longest hold-back.
pub const WAKE_BATCH: [&str; 4] = ["--wake-batch", "16", "--wake-batch-wait", "1ms"];

/// The most sleeps one proxy may count as having held events back
/// (`held_back_sleeps`) over [`idle_transfer_round_trips`]: a proxy that
/// held back every answer would count about 100. Measured 3 to 9 per proxy
/// (the transfer's tail and the batch target's ramp-down after it).
pub const HELD_BACK_MOST: u64 = 20;

/// Whether this kernel has io_uring's `min_wait_usec` (Linux 6.12), which
/// `--wake-batch` needs.
pub fn kernel_coalesces_wake_ups() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let mut next = || parts.next().and_then(|p| p.parse::<u32>().ok());
    matches!((next(), next()), (Some(a), Some(b)) if (a, b) >= (6, 12))
}

/// An origin that answers each read with the same bytes `delay` later: long
/// enough for a proxy to go to sleep waiting for the answer.
pub fn slow_echo_origin(delay: Duration) -> SocketAddr {
    serve(move |mut s| {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    thread::sleep(delay);
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    })
}

/// Through proxies run with [`WAKE_BATCH`] in front of a
/// [`slow_echo_origin`]: one connection carries a 64 KiB transfer (which
/// turns coalescing on) and then idles, open; another then makes 100 small
/// request/response round trips back to back, and 5 more after 20 ms quiet
/// spells. Returns when all came back intact.
///
/// What the caller checks in the proxies' summaries: once the transfer has
/// stopped moving, the shard must not hold other connections' events back
/// for batches. It did if its sleeps were "held back" (waited out the whole
/// 1 ms with the batch unfilled: one connection never makes 16 events).
/// With coalescing on for as long as a transfer's connection stayed open,
/// nearly every round trip was held back (found by a break-it round).
pub fn idle_transfer_round_trips(addr: SocketAddr) {
    // 64 KiB fills a 16 KiB relay buffer: a transfer, in every role.
    let mut bulk = TcpStream::connect(addr).unwrap();
    bulk.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let data = random_bytes(64 << 10, 21);
    bulk.write_all(&data).unwrap();
    let mut back = vec![0u8; data.len()];
    bulk.read_exact(&mut back).unwrap();
    assert!(back == data, "the transfer came back altered");
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_nodelay(true).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for i in 0..105u8 {
        if i >= 100 {
            // A quiet spell: the proxies' shards go to sleep.
            thread::sleep(Duration::from_millis(20));
        }
        c.write_all(&[i; 64]).unwrap();
        let mut back = [0u8; 64];
        c.read_exact(&mut back).unwrap();
        assert_eq!(back, [i; 64]);
    }
    drop(bulk);
}

/// `n` probes: connect, then a FIN (even) or a reset (odd) without a
/// byte, as a load balancer's TCP health check or a port scan does.
pub fn probe(addr: SocketAddr, n: usize) {
    for i in 0..n {
        let c = TcpStream::connect(addr).unwrap();
        if i % 2 == 1 {
            socket2::SockRef::from(&c)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        }
        drop(c);
    }
}

/// tests/tunnel_client.py as a fake exit in `mode` (`args` after its port
/// file and key; stdin and stdout piped), and an entry (with `entry_args`)
/// in front of it. `None` if Python's `cryptography` is missing.
pub fn fake_exit(
    mode: &str,
    args: &[&str],
    entry_args: &[&str],
) -> Option<(std::process::Child, Proxy)> {
    let (fake, addr, key) = fake_exit_at(mode, args)?;
    let entry = Proxy::entry(addr, &key_file(&[&key]))
        .args(entry_args)
        .start();
    Some((fake, entry))
}

/// tests/tunnel_client.py as a fake exit in `mode` (see [`fake_exit`]),
/// alone: the fake, its address, and the base64 key it holds. `None` if
/// Python's `cryptography` is missing.
pub fn fake_exit_at(
    mode: &str,
    args: &[&str],
) -> Option<(std::process::Child, std::net::SocketAddr, String)> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    if !python_cryptography() {
        return None;
    }
    let key = keygen();
    let port_file = std::env::temp_dir().join(format!(
        "sp-fake-exit-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&port_file);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tunnel_client.py");
    let fake = Command::new("python3")
        .arg(script)
        .args([mode, port_file.to_str().unwrap(), &key])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let port: u16 = poll_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&port_file)
            .map_err(|e| e.to_string())
            .and_then(|p| p.trim().parse::<u16>().map_err(|e| e.to_string()))
    });
    let _ = std::fs::remove_file(&port_file);
    Some((
        fake,
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        key,
    ))
}

/// What a fake exit printed, once it has exited.
pub fn fake_output(fake: std::process::Child) -> String {
    let out = fake.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `child`'s stderr, line by line, as it comes; the channel closes when the
/// process exits (its pipe reaches EOF).
pub fn stderr_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::{BufRead, BufReader};
    let (tx, rx) = std::sync::mpsc::channel();
    let pipe = child.stderr.take().expect("stderr is piped");
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// The connected TCP sockets of process `pid`, as (local address, peer
/// address, `TCP_NODELAY` set, `SO_LINGER` {1, 0} set), each copied into a Python helper with
/// pidfd_getfd(2) (Linux 5.6; needs ptrace rights over `pid`, which the
/// suite has as root) and asked with getsockopt(2): in Python, so that
/// the suite needs no `unsafe`. Sockets that close meanwhile, listeners
/// and Unix sockets are left out.
pub fn tcp_sockets_of(pid: u32) -> Vec<(SocketAddr, SocketAddr, bool, bool)> {
    const SCRIPT: &str = r#"
import ctypes, os, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
pid = int(sys.argv[1])
pidfd = os.pidfd_open(pid)
host = lambda a: f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}"
for name in os.listdir(f"/proc/{pid}/fd"):
    try:
        if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
            continue
    except OSError:
        continue
    fd = libc.syscall(438, pidfd, int(name), 0)  # SYS_pidfd_getfd
    if fd < 0:
        continue
    s = socket.socket(fileno=fd)
    try:
        if s.type == socket.SOCK_STREAM and s.family in (socket.AF_INET, socket.AF_INET6):
            nodelay = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            onoff, secs = struct.unpack("ii", s.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8))
            abortive = int(onoff != 0 and secs == 0)
            print(host(s.getsockname()), host(s.getpeername()), nodelay, abortive, flush=True)
    except OSError:
        pass
    finally:
        s.close()
"#;
    let out = Command::new("python3")
        .args(["-c", SCRIPT, &pid.to_string()])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "listing the sockets of {pid}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2] != "0",
                f[3] != "0",
            )
        })
        .collect()
}

/// Asserts that process `pid` has a TCP socket connected to each of
/// `peers`, with Nagle off (`TCP_NODELAY`); returns those sockets' local
/// addresses, in order.
pub fn assert_nagle_off(pid: u32, what: &str, peers: &[SocketAddr]) -> Vec<SocketAddr> {
    let sockets = tcp_sockets_of(pid);
    peers
        .iter()
        .map(|peer| {
            let &(local, _, nodelay, _) = sockets
                .iter()
                .find(|s| s.1 == *peer)
                .unwrap_or_else(|| panic!("{what}: no socket to {peer} in {sockets:?}"));
            assert!(nodelay, "{what}: Nagle on for the socket to {peer}");
            local
        })
        .collect()
}

/// A wrapper that runs the proxy with `signals` blocked, as a supervisor
/// that blocked them leaves it (a signal mask survives fork and exec;
/// Python's `subprocess` does not reset it), after sending itself each of
/// `pending` (which then wait, pending, across the exec).
pub fn masked_wrapper(tag: &str, signals: &str, pending: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("sp-masked-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let wrapper = dir.join("masked");
    std::fs::write(
        &wrapper,
        format!(
            "#!/usr/bin/env python3\nimport os, signal, sys\nsignal.pthread_sigmask(signal.SIG_BLOCK, {{{signals}}})\nfor s in [{pending}]:\n    os.kill(os.getpid(), s)\nos.execv({BIN:?}, [{BIN:?}] + sys.argv[1:])\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    wrapper
}

/// An origin for [`urgent_ping_pong`]: on each connection, reads rounds of
/// `X + Y` bytes ([`PING_PONG`]) and answers each with an
/// [`urgent_burst`] of its own.
pub fn urgent_ping_pong_origin() -> SocketAddr {
    let (x, y) = PING_PONG;
    serve(move |mut s| loop {
        if read_up_to(&mut s, x + y) != x + y {
            return;
        }
        urgent_burst(&s, x, y);
    })
}

/// The two halves of each round of [`urgent_ping_pong`]: bytes before and
/// after the urgent byte.
pub const PING_PONG: (usize, usize) = (500, 500);

/// `conns` clients at once through `front` to an [`urgent_ping_pong_origin`],
/// each making `rounds` round trips of an [`urgent_burst`] each way (the
/// origin's answer too): many urgent bytes on one shard at the same time,
/// so that the shard's thread often has a `SIGURG` pending while it reads.
/// Returns the connections that stalled, as (connection, round, bytes of
/// the answer that came within 5 s).
pub fn urgent_ping_pong(
    front: SocketAddr,
    conns: usize,
    rounds: usize,
) -> Vec<(usize, usize, usize)> {
    let (x, y) = PING_PONG;
    let workers: Vec<_> = (0..conns)
        .map(|i| {
            thread::spawn(move || {
                let mut c = TcpStream::connect(front).unwrap();
                for r in 0..rounds {
                    urgent_burst(&c, x, y);
                    let got = read_up_to(&mut c, x + y);
                    if got != x + y {
                        return Some((i, r, got));
                    }
                }
                None
            })
        })
        .collect();
    workers
        .into_iter()
        .filter_map(|w| w.join().unwrap())
        .collect()
}

/// Asserts that process `pid` has a TCP socket connected to each of
/// `peers`, closed with a reset if the process dies (`SO_LINGER` {1, 0},
/// see `Conn::reset_unless_finished`).
pub fn assert_abortive_close(pid: u32, what: &str, peers: &[SocketAddr]) {
    let sockets = tcp_sockets_of(pid);
    for peer in peers {
        let &(_, _, _, abortive) = sockets
            .iter()
            .find(|s| s.1 == *peer)
            .unwrap_or_else(|| panic!("{what}: no socket to {peer} in {sockets:?}"));
        assert!(
            abortive,
            "{what}: no SO_LINGER {{1, 0}} on the socket to {peer}"
        );
    }
}

/// A signal mask from a /proc `status` text (`field`: `SigBlk`, `SigCgt`,
/// ...), as a bit set (bit `n - 1` for signal `n`); `None` if it is absent.
pub fn signal_mask(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
}

/// A small tmpfs mounted for one test at a fresh directory (the suite runs
/// as root), to fill a disk on purpose; unmounted and removed on drop.
pub struct Tmpfs {
    /// Where it is mounted.
    pub dir: std::path::PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (mount(8)'s `size=`, e.g. `16k`) at a
    /// directory named after `tag` and this process.
    pub fn mount(tag: &str, size: &str) -> Tmpfs {
        let dir = std::env::temp_dir().join(format!("sp-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .unwrap()
            .success();
        assert!(
            ok,
            "mount a tmpfs at {} (the suite runs as root)",
            dir.display()
        );
        Tmpfs { dir }
    }

    /// Grows (or shrinks) it to `size`, keeping what it holds.
    pub fn resize(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount {} with size={size}", self.dir.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}
