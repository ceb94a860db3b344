//! Every numeric setting: the largest valid value passes `check`, and the
//! smallest invalid one (on each side) is rejected by `check` and at
//! start-up, each with a one-line error and exit code 2; so is a negative
//! value, which must reach the value's parser and name the flag (clap read
//! `--idle-timeout -1s` as short flags). Encodings of the
//! files the proxy reads. The kind of fault: an accepted setting that crashes
//! the proxy later (`--buffer-size 64GiB` aborted the process on the first
//! client).

mod common;

use std::process::{Command, ExitStatus};
use std::time::Duration;

use common::*;

/// (config key, largest valid, smallest invalid values, tunnel-only)
const TABLE: &[(&str, &str, &[&str], bool)] = &[
    (
        "buffer_size",
        "16MiB",
        &["-1KiB", "1023", "16777217", "64GiB"],
        false,
    ),
    ("max_connections", "1000000", &["-1", "0", "1000001"], false),
    ("backlog", "65535", &["-1", "0", "65536"], false),
    ("connect_timeout", "10m", &["-1s", "9ms", "601s"], false),
    ("idle_timeout", "168h", &["-1s", "99ms", "169h"], false),
    ("drain_timeout", "1h", &["-1s", "3601s"], false),
    ("drain_delay", "5m", &["-1s", "301s"], false),
    (
        "handover_timeout",
        "10m",
        &["-1s", "0s", "999ms", "601s"],
        false,
    ),
    (
        "metrics_interval",
        "60s",
        &["-1s", "99ms", "61s", "1h"],
        false,
    ),
    ("handshake_timeout", "5m", &["-1s", "99ms", "301s"], true),
    ("max_clock_skew", "5m", &["-1s", "0s", "301s"], true),
    ("max_handshakes", "1000000", &["-1", "0", "1000001"], true),
    ("tunnel_keepalive", "100000", &["-1", "100001"], true),
    (
        "tunnel_idle_timeout",
        "1h",
        &["-1s", "999ms", "3601s"],
        true,
    ),
    ("connect_attempts", "10", &["-1", "0", "11"], false),
    ("max_fails", "100", &["-1", "0", "101"], false),
    ("fail_timeout", "1h", &["-1s", "999ms", "3601s"], false),
    (
        "health_check_interval",
        "1h",
        &["-1s", "999ms", "3601s"],
        false,
    ),
    ("health_check_fails", "100", &["-1", "0", "101"], false),
    ("health_check_passes", "100", &["-1", "0", "101"], false),
    ("dns_refresh", "24h", &["-1s", "999ms", "86401s"], false),
    ("wake_batch", "256", &["-1", "0", "257"], false),
    ("wake_batch_wait", "1ms", &["-1us", "0us", "1001us"], false),
];

fn write(name: &str, body: &str) -> String {
    let path = std::env::temp_dir().join(format!("sp-ranges-{}-{name}", std::process::id()));
    std::fs::write(&path, body).unwrap();
    path.to_string_lossy().into_owned()
}

fn config(role: &str, key_file: &str, line: &str) -> String {
    let key = if role == "forward" {
        String::new()
    } else {
        format!("key_file = \"{key_file}\"\n")
    };
    format!(
        "role = \"{role}\"\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\ncores = 1\n{key}{line}\n"
    )
}

/// Whether `value` is a whole number such as `-1` (written as a TOML integer,
/// and reported against the setting's documented range).
fn is_whole(value: &str) -> bool {
    let digits = value.strip_prefix('-').unwrap_or(value);
    !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit())
}

fn value_line(key: &str, value: &str) -> String {
    if is_whole(value) {
        format!("{key} = {value}")
    } else {
        format!("{key} = \"{value}\"")
    }
}

/// Exit status and stderr of one run.
type Ran = (ExitStatus, String);

/// Runs the binary with `args`, bounded by `common::run_bounded`: a
/// regression that accepts its input and starts serving fails instead of
/// hanging the suite.
fn run(args: &[&str]) -> Ran {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    run_bounded(cmd, Duration::from_secs(20))
        .unwrap_or_else(|| panic!("{args:?} did not exit within 20 s"))
}

/// `shardproxy check --config PATH`.
fn check(path: &str) -> Ran {
    run(&["check", "--config", path])
}

/// Exit code 0.
fn assert_ok(ran: &Ran, what: &str) {
    assert!(ran.0.success(), "{what}: {}", ran.1);
}

/// Exit code 2 and exactly one line on stderr, naming `must_name`.
fn assert_one_line_error(ran: &Ran, must_name: &str, what: &str) {
    let (status, stderr) = ran;
    assert_eq!(status.code(), Some(2), "{what}: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{what}: not one line: {stderr}");
    assert!(lines[0].starts_with("error: "), "{what}: {stderr}");
    assert!(lines[0].contains(must_name), "{what}: {stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"));
}

/// A [`PARTNERED`] row.
type Partnered = (
    &'static str,
    &'static str,
    &'static [&'static str],
    &'static str,
    &'static [&'static str],
);

/// Settings whose range is enforced only together with the setting they
/// need: (config key, largest valid, smallest invalid values, the partner
/// as a config line and as flags).
const PARTNERED: &[Partnered] = &[
    (
        "proxy_header_timeout",
        "60s",
        &["-1s", "99ms", "61s"],
        "accept_proxy = true\nproxy_trusted_cidrs = \"127.0.0.1/32\"",
        &["--accept-proxy", "--proxy-trusted-cidrs", "127.0.0.1/32"],
    ),
    (
        "access_log_interval",
        "24h",
        &["-1s", "999ms", "86401s"],
        "access_log = \"-\"",
        &["--access-log", "-"],
    ),
];

#[test]
fn every_numeric_setting_has_an_enforced_range() {
    let key = key_file(&[&keygen()]);
    for &(name, max_valid, invalid, tunnel_only) in TABLE {
        let role = if tunnel_only { "exit" } else { "forward" };
        enforced_range(&key, role, name, max_valid, invalid, ("", &[]));
    }
    for &(name, max_valid, invalid, line, flags) in PARTNERED {
        enforced_range(&key, "forward", name, max_valid, invalid, (line, flags));
    }
}

/// One setting of [`TABLE`] or [`PARTNERED`], in `role`, with `partner` (a
/// config line and the same as flags) set too.
fn enforced_range(
    key: &str,
    role: &str,
    name: &str,
    max_valid: &str,
    invalid: &[&str],
    partner: (&str, &[&str]),
) {
    let flag = format!("--{}", name.replace('_', "-"));
    let line = |value: &str| format!("{}\n{}", partner.0, value_line(name, value));
    // The largest valid value passes check.
    let path = write(
        &format!("{name}-ok.toml"),
        &config(role, key, &line(max_valid)),
    );
    let out = check(&path);
    assert_ok(&out, &format!("{name} = {max_valid} rejected"));
    let args_with = |value: &str| -> Vec<String> {
        let mut args: Vec<String> = [role, "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if role != "forward" {
            args.extend(["--key-file".to_string(), key.to_string()]);
        }
        args.extend(partner.1.iter().map(|s| s.to_string()));
        args.push(format!("{flag}={value}"));
        args
    };
    let run_with = |value: &str| {
        let args = args_with(value);
        run(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    for &bad in invalid {
        // check: the file and key are named.
        let path = write(&format!("{name}-bad.toml"), &config(role, key, &line(bad)));
        let out = check(&path);
        assert_one_line_error(
            &out,
            &format!("key `{name}`"),
            &format!("check {name} = {bad}"),
        );
        // start-up: the flag is named, and nothing starts.
        let out = run_with(bad);
        assert_one_line_error(&out, &flag, &format!("{flag} {bad}"));
        // A count out of range, negative included, is reported against
        // the documented range, not the integer type's (`--max-fails -1`
        // said "-1 is not in 0..=4294967295").
        if is_whole(bad) && name != "buffer_size" {
            let range = format!("{flag} {bad} is out of range: must be between ");
            assert!(out.1.contains(&range), "{flag} {bad}: {}", out.1);
        }
    }
    // A value that does not even parse into the setting's type (beyond
    // ±2^63, too large for a duration or a size, or not a number) still
    // names the range (it said only "far out of range" or "too large").
    let unit = max_valid.trim_start_matches(|c: char| c.is_ascii_digit());
    let huge = format!("99999999999999999999{unit}");
    for bad in [huge.as_str(), "-99999999999999999999", "1e5"] {
        let out = run_with(bad);
        assert_one_line_error(&out, "must be between ", &format!("{flag} {bad}"));
    }
}

#[test]
fn cores_are_bounded_by_the_cpu_mask() {
    let n = std::thread::available_parallelism().unwrap().get();
    let ok = write(
        "cores-ok.toml",
        &config("forward", "", "").replace("cores = 1", &format!("cores = {n}")),
    );
    let out = check(&ok);
    assert_ok(&out, &format!("cores = {n}"));
    for bad in ["0", &(n + 1).to_string(), "-1"] {
        let path = write(
            "cores-bad.toml",
            &config("forward", "", "").replace("cores = 1", &format!("cores = {bad}")),
        );
        let out = check(&path);
        assert_one_line_error(&out, "key `cores`", &format!("cores = {bad}"));
    }
    // Beyond ±2^63 or not a number: the range is the cores available.
    for bad in ["99999999999999999999", "1e5"] {
        let arg = format!("--cores={bad}");
        let out = run(&[
            "forward",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:9",
            &arg,
        ]);
        let range = format!("must be between 1 and {n} (the cores this process may use)");
        assert_one_line_error(&out, &range, &arg);
    }
}

#[test]
fn settings_that_cannot_work_are_errors_or_warnings() {
    // Upstream port 0: an error.
    let path = write(
        "port0.toml",
        &config("forward", "", "").replace("127.0.0.1:9", "127.0.0.1:0"),
    );
    let out = check(&path);
    assert_one_line_error(&out, "port 0", "upstream port 0");
    // A dashed key: an error with a hint.
    let path = write("dashed.toml", &config("forward", "", "dual-stack = true"));
    let out = check(&path);
    assert_one_line_error(&out, "did you mean `dual_stack`", "dashed key");
    // --dual-stack on an IPv4 listener, a backlog above somaxconn: warnings.
    let path = write(
        "noop.toml",
        &config("forward", "", "dual_stack = true\nbacklog = 65535"),
    );
    let out = check(&path);
    let stderr = &out.1;
    assert!(out.0.success(), "{stderr}");
    assert!(
        stderr.contains("--dual-stack has no effect on 127.0.0.1:0"),
        "{stderr}"
    );
    // Flags of another role that the shared tunnel flags let through: a
    // warning each, in an entry (`--splice` in both tunnel roles); an exit
    // takes them silently, as they are its own.
    let key = key_file(&[&keygen()]);
    let exit_only = "max_handshakes = 5\nmax_clock_skew = \"10s\"\nsplice = \"never\"";
    for role in ["entry", "exit"] {
        let path = write("other-role.toml", &config(role, &key, exit_only));
        let out = check(&path);
        let stderr = &out.1;
        assert!(out.0.success(), "{role}: {stderr}");
        for flag in ["--max-handshakes", "--max-clock-skew"] {
            let warned = format!("{flag} has no effect on an entry");
            assert_eq!(
                stderr.contains(&warned),
                role == "entry",
                "{role}: {stderr}"
            );
        }
        assert!(
            stderr.contains("--splice has no effect"),
            "{role}: {stderr}"
        );
    }
    // A keep-alive setting that would take more than a quarter of each
    // shard's descriptors is lowered with a warning that names it, instead
    // of cutting the default --max-connections to 1.
    let path = write(
        "keepalive-fds.toml",
        &config("exit", &key, "tunnel_keepalive = 100000"),
    );
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "ulimit -n 4160 && exec \"$0\" check --config \"$1\""])
        .arg(BIN)
        .arg(&path);
    let (status, lowered) = run_bounded(cmd, Duration::from_secs(20)).unwrap();
    assert!(status.success(), "{lowered}");
    assert!(
        lowered.contains("--tunnel-keepalive 100000 lowered to 1024"),
        "{lowered}"
    );
    // So are the exit's pending handshakes (a burst may reach twice the
    // setting, a descriptor each): a break-it round saw the default 1024
    // kept under a 64-descriptor limit, and silent peers took them all.
    assert!(
        lowered.contains("--max-handshakes 1024 lowered to 512"),
        "{lowered}"
    );
    let somaxconn: u64 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    if somaxconn < 65535 {
        assert!(stderr.contains("above net.core.somaxconn"), "{stderr}");
    }
    // A trusted CIDR with host bits set (nginx: "low address bits ... are
    // meaningless"): a warning, and `check` shows the network it means.
    let path = write(
        "hostbits.toml",
        &config(
            "forward",
            "",
            "accept_proxy = true\nproxy_trusted_cidrs = [\"10.1.2.3/8\", \"::1/128\", \"1.2.3.4/0\", \"10.0.0.0/8\"]",
        ),
    );
    let out = Command::new(BIN)
        .args(["check", "--config", &path])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "--proxy-trusted-cidrs 10.1.2.3/8 has host bits set: it trusts all of 10.0.0.0/8"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("::1/128 has host bits"), "{stderr}");
    // 10.1.2.3/8 and 10.0.0.0/8 are the same network.
    assert!(
        stderr.contains("--proxy-trusted-cidrs lists 10.0.0.0/8 more than once"),
        "{stderr}"
    );
    // /0 trusts everyone: a warning of its own.
    assert!(
        stderr.contains("--proxy-trusted-cidrs 1.2.3.4/0 trusts every IPv4 address"),
        "{stderr}"
    );
    assert!(
        stdout.contains("PROXY headers accepted from 10.0.0.0/8,::1/128,0.0.0.0/0,10.0.0.0/8 "),
        "{stdout}"
    );
    // Lower-case size units are accepted like upper-case ones.
    let path = write("k.toml", &config("forward", "", "buffer_size = \"16k\""));
    let out = check(&path);
    assert_ok(&out, "buffer_size = 16k");
}

#[test]
fn clap_errors_keep_the_part_that_matters() {
    let out = run(&["forward", "--listen", "127.0.0.1:0"]);
    assert_one_line_error(&out, "--upstream <HOST:PORT>", "missing --upstream");
    let out = run(&["forwrd"]);
    assert_one_line_error(&out, "'forward'", "typo of forward");
}

#[test]
fn files_in_every_common_encoding_are_accepted() {
    let key = keygen();
    let variants: [(&str, Vec<u8>); 5] = [
        ("bom", format!("\u{feff}{key}\n").into_bytes()),
        ("crlf", format!("{key}\r\n").into_bytes()),
        ("bom-crlf", format!("\u{feff}{key}\r\n").into_bytes()),
        ("blanks", format!("{key}  \t \n").into_bytes()),
        ("no-newline", key.clone().into_bytes()),
    ];
    for (name, bytes) in variants {
        // The key file in this encoding ...
        let key_path = key_file(&[]);
        std::fs::write(&key_path, &bytes).unwrap();
        // ... and the config file in the same one.
        let text = config("exit", &key_path, "idle_timeout = \"5m\"");
        let cfg = match name {
            "bom" => format!("\u{feff}{text}"),
            "crlf" => text.replace('\n', "\r\n"),
            "bom-crlf" => format!("\u{feff}{}", text.replace('\n', "\r\n")),
            "blanks" => text.replace('\n', "   \n"),
            _ => text.trim_end().to_string(),
        };
        let path = write(&format!("enc-{name}.toml"), &cfg);
        let out = check(&path);
        assert_ok(&out, name);
    }
}

#[test]
fn files_that_are_not_text_are_named_for_what_they_are() {
    let utf16: Vec<u8> = [0xff, 0xfe]
        .into_iter()
        .chain(keygen().encode_utf16().flat_map(|u| u.to_le_bytes()))
        .collect();
    let binary = vec![0x7f, b'E', b'L', b'F', 0, 1, 2, 0xff, 0xfe, 0];
    for (name, bytes, must) in [
        ("utf16", utf16.clone(), "UTF-16"),
        ("binary", binary.clone(), "not UTF-8"),
        ("latin1", b"caf\xe9\n".to_vec(), "not UTF-8"),
    ] {
        let key_path = key_file(&[]);
        std::fs::write(&key_path, &bytes).unwrap();
        let path = write(
            &format!("bad-key-{name}.toml"),
            &config("exit", &key_path, ""),
        );
        let out = check(&path);
        assert_one_line_error(&out, must, &format!("key file {name}"));
        let path = write(&format!("bad-cfg-{name}.toml"), "");
        std::fs::write(&path, &bytes).unwrap();
        let out = check(&path);
        assert_one_line_error(&out, must, &format!("config file {name}"));
    }
    // A key of the wrong length says so, not "not base64".
    let short = key_file(&["AAAAAAAAAAAAAAAAAAAAAA=="]);
    let path = write("short-key.toml", &config("exit", &short, ""));
    let out = check(&path);
    assert_one_line_error(&out, "decodes to 16 bytes", "short key");
}

/// Files that are not regular files (a FIFO that never gets a writer,
/// `/dev/zero`) and oversized files are refused at once: `check` neither
/// blocks nor reads without bound.
#[test]
fn special_and_oversized_files_are_refused_at_once() {
    let dir = std::env::temp_dir().join(format!("sp-special-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("fifo");
    let _ = std::fs::remove_file(&fifo);
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let fifo = fifo.to_str().unwrap();
    let big = dir.join("big.toml");
    std::fs::write(&big, vec![b'#'; (1 << 20) + 1]).unwrap();
    let big_key = dir.join("big.key");
    std::fs::write(&big_key, format!("{}\n{}", keygen(), "#".repeat(70_000))).unwrap();
    let big_key = big_key.to_str().unwrap();
    for (what, args, must) in [
        (
            "config FIFO",
            vec!["check", "--config", fifo],
            "not a regular file",
        ),
        (
            "config /dev/zero",
            vec!["check", "--config", "/dev/zero"],
            "not a regular file",
        ),
        (
            "config over 1 MiB",
            vec!["check", "--config", big.to_str().unwrap()],
            "larger than",
        ),
    ] {
        let out = run(&args);
        assert_one_line_error(&out, must, what);
    }
    for (what, key, must) in [
        ("key FIFO", fifo, "not a regular file"),
        ("key /dev/zero", "/dev/zero", "not a regular file"),
        ("key over 64 KiB", big_key, "larger than 65536 bytes"),
    ] {
        let path = write("special.toml", &config("exit", key, ""));
        let out = run(&["check", "--config", &path]);
        assert_one_line_error(&out, must, what);
    }
}

/// Operator input quoted in an error cannot add lines (log injection).
#[test]
fn errors_quoting_input_stay_one_line() {
    let out = run(&[
        "forward",
        "--listen",
        "127.0.0.1:1\nINFO  forged",
        "--upstream",
        "127.0.0.1:9",
    ]);
    assert_one_line_error(&out, "\\nINFO  forged", "newline in --listen");
    let path = write(
        "inject.toml",
        &config("forward", "", "").replace("127.0.0.1:9", "127.0.0.1:9\\r\\nWARN  spoofed"),
    );
    let out = run(&["check", "--config", &path]);
    assert_one_line_error(&out, "\\r\\nWARN  spoofed", "CRLF in upstream");
    // A right-to-left override or a line separator is shown escaped, so
    // the quoted input reads in the order it was written.
    let out = run(&[
        "forward",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "evil\u{202e}moc.example:80\u{2028}x",
    ]);
    assert_one_line_error(
        &out,
        "evil\\u{202e}moc.example:80\\u{2028}x",
        "bidi in upstream",
    );
    assert!(!out.1.contains('\u{202e}'), "{}", out.1);
}

/// Flags override the file, including the settings a flag excludes, and a
/// file's `dual_stack = true` can be turned off.
#[test]
fn flags_override_the_file_including_exclusive_ones() {
    let path = write("override.toml", &config("forward", "", "dual_stack = true"));
    let out = run(&[
        "forward",
        "--config",
        &path,
        "--cpu-list",
        "0",
        "--dual-stack=false",
        "--listen",
        "127.0.0.1:1",
        "--upstream",
        "127.0.0.1:1",
    ]);
    // It got as far as the loop check: both overrides were accepted.
    assert_one_line_error(&out, "own --listen", "looped upstream");
    let cores_file = write(
        "cpulist.toml",
        &config("forward", "", "").replace("cores = 1", "cpu_list = \"0\""),
    );
    let out = run(&[
        "forward",
        "--config",
        &cores_file,
        "--cores",
        "1",
        "--listen",
        "127.0.0.1:1",
        "--upstream",
        "127.0.0.1:1",
    ]);
    assert_one_line_error(&out, "own --listen", "cores over cpu_list");
}

/// `demo` with a bad setting fails with exit code 2, not 0.
#[test]
fn demo_rejects_more_cores_than_allowed() {
    let n = std::thread::available_parallelism().unwrap().get() + 1;
    let out = run(&[
        "demo",
        "--cores",
        &n.to_string(),
        "--port",
        "1",
        "--origin-port",
        "2",
        "--exit-port",
        "3",
    ]);
    assert_one_line_error(&out, "--cores", "demo --cores");
}

/// A config-file error names the key even when clap rejects the value (a
/// boolean: its flag is spelt `--dual-stack[=<DUAL_STACK>]` in clap's error)
/// and when the setting at fault asks for one that is missing; a value of the
/// wrong TOML type is refused for its type.
#[test]
fn config_errors_name_the_key_for_booleans_and_missing_partners() {
    let key = key_file(&[&keygen()]);
    for (name, line, want) in [
        ("bool-forward", "dual_stack = -1", "key `dual_stack`"),
        (
            "bool-exit",
            "send_proxy_v2 = \"yes\"",
            "key `send_proxy_v2`",
        ),
        ("partner", "accept_proxy = true", "key `accept_proxy`"),
        // A NUL byte in a path passed check and failed at start-up.
        (
            "nul-access-log",
            "access_log = \"a\\u0000b\"",
            "key `access_log`",
        ),
        (
            "nul-control",
            "control_socket = \"s\\u0000x\"",
            "key `control_socket`",
        ),
        ("empty-takeover", "takeover = \"\"", "key `takeover`"),
        // A required key the file lacks is named as a key.
        (
            "no-upstream",
            "REMOVE upstream",
            "lacks `upstream` (--upstream)",
        ),
        // A number where a path, a list or a duration is meant is refused
        // for its type: `access_log = -1` wrote to a file named `-1`.
        (
            "path-integer",
            "access_log = -1",
            "key `access_log` must be a string",
        ),
        (
            "list-integer",
            "cpu_list = 0",
            "key `cpu_list` must be a string",
        ),
        ("duration-integer", "idle_timeout = 30", "such as \"30s\""),
        (
            "count-float",
            "max_fails = 1.5",
            "key `max_fails` must be an integer",
        ),
        // A boolean only for a switch: `access_log = false` made a file
        // named `false`; a switch takes only a boolean.
        (
            "path-bool",
            "access_log = false",
            "key `access_log` must be a string",
        ),
        (
            "socket-bool",
            "control_socket = true",
            "key `control_socket` must be a string",
        ),
        (
            "switch-integer",
            "dual_stack = 1",
            "key `dual_stack` must be true or false",
        ),
    ] {
        let role = if name == "bool-exit" {
            "exit"
        } else {
            "forward"
        };
        let text = match line.strip_prefix("REMOVE ") {
            Some(k) => config(role, &key, "")
                .lines()
                .filter(|l| !l.starts_with(&format!("{k} =")))
                .collect::<Vec<_>>()
                .join("\n"),
            None => config(role, &key, line),
        };
        let path = write(&format!("{name}.toml"), &text);
        assert_one_line_error(&check(&path), want, line);
        let out = run(&["run", "--config", &path]);
        assert_one_line_error(&out, want, &format!("run: {line}"));
    }
}

/// An upstream that is the proxy's own listener is refused in one line
/// however it is written: a connect to the unspecified address goes to
/// loopback, so `--upstream 0.0.0.0:PORT` is `127.0.0.1:PORT` (a break-it
/// round saw one client fill a shard with connections to itself, as
/// `check` passed it). And an IPv6 wildcard takes IPv4 clients only with
/// `--dual-stack`: without it, an IPv4 upstream on the same port is not a
/// loop (it was refused as one).
#[test]
fn an_upstream_that_is_the_listener_is_refused_however_written() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let path = write("loops.toml", &config("forward", "", ""));
    for (listen, upstream, dual) in [
        ("127.0.0.1", "0.0.0.0", false),
        ("0.0.0.0", "0.0.0.0", false),
        ("0.0.0.0", "127.0.0.9", false),
        ("[::1]", "[::]", false),
        ("[::]", "127.0.0.1", true),
    ] {
        let (l, u) = (format!("{listen}:{port}"), format!("{upstream}:{port}"));
        let mut args = vec!["check", "--config", &path, "--listen", &l, "--upstream", &u];
        if dual {
            args.push("--dual-stack");
        }
        let out = run(&args);
        assert_one_line_error(&out, "own --listen", &format!("{l} -> {u}"));
    }
    let (l, u) = (format!("[::]:{port}"), format!("127.0.0.1:{port}"));
    let (status, stderr) = run(&["check", "--config", &path, "--listen", &l, "--upstream", &u]);
    assert!(!stderr.contains("own --listen"), "{stderr}");
    assert_eq!(status.code(), Some(0), "{stderr}");
}

/// A wildcard listener takes connections to every address of this host:
/// an upstream at one of its non-loopback addresses on the same port is
/// the listener too. Checked in a network namespace of the test's own
/// (`unshare --net`, as root), whose only interface holds 198.51.100.7,
/// and where 198.51.100.8 is another host's.
#[test]
fn an_upstream_at_one_of_this_hosts_addresses_loops_to_a_wildcard() {
    let path = write("loops-host.toml", &config("forward", "", ""));
    // Also: with `ip_nonlocal_bind` (every address binds, so binding tells
    // nothing), an IPv6 link-local address (it binds only with its scope),
    // and a multicast group (no host's address; it was refused as a loop).
    let check = |listen: &str, up: &str| {
        format!("{BIN} check --config {path} --listen {listen} --upstream {up}; echo rc=$?; ")
    };
    let script = [
        "ip link set lo up && ip addr add 198.51.100.7/32 dev lo && ".to_string(),
        // A veth pair (the dummy driver may not be there).
        "ip link add d0 type veth peer name d1 && ip link set d1 up && ip link set d0 up && "
            .into(),
        "ip -6 addr add fe80::7/64 dev d0 nodad; ".into(),
        check("0.0.0.0:20999", "198.51.100.7:20999"),
        check("0.0.0.0:20999", "198.51.100.8:20999"),
        check("[::]:20999", "[fe80::7%d0]:20999"),
        check("0.0.0.0:20999", "224.0.0.1:20999"),
        // A local IPv6 prefix with no address of this host's in it: a
        // connect there reaches [::] all the same (its source is ::1).
        "ip -6 route add local 2001:db8:77::/64 dev lo; ".into(),
        check("[::]:20999", "[2001:db8:77::7]:20999"),
        "sysctl -qw net.ipv4.ip_nonlocal_bind=1; ".into(),
        check("0.0.0.0:20999", "198.51.100.7:20999"),
        check("0.0.0.0:20999", "198.51.100.8:20999"),
    ]
    .concat();
    let mut cmd = Command::new("unshare");
    cmd.args(["--net", "sh", "-c", &script]);
    let out = cmd.output().expect("unshare (util-linux)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = text.lines().collect();
    // (The scope is printed as the interface's index.)
    for up in ["198.51.100.7:20999", "[fe80::7%", "[2001:db8:77::7]:20999"] {
        let loop_line = |l: &&str| {
            l.starts_with(&format!("error: --upstream {up}")) && l.contains("own --listen")
        };
        assert!(lines.iter().any(loop_line), "{up}: {text}");
    }
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.starts_with("rc="))
            .copied()
            .collect::<Vec<_>>(),
        ["rc=2", "rc=0", "rc=2", "rc=0", "rc=2", "rc=2", "rc=0"],
        "{text}"
    );
}
