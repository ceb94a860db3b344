//! io_uring switched off system-wide (sysctl kernel.io_uring_disabled=2)
//! gives a one-line error and exit code 2, not glommio's panic.
//!
//! This is its own test binary with a single test: cargo runs test binaries
//! one after another, so flipping the sysctl cannot disturb other tests.

mod common;

use std::process::Command;
use std::time::Duration;

const KNOB: &str = "/proc/sys/kernel/io_uring_disabled";

#[test]
fn io_uring_unavailable_is_a_one_line_error() {
    let Ok(before) = std::fs::read_to_string(KNOB) else {
        common::missing(&format!("{KNOB} (Linux 6.6 or later)"));
        return;
    };
    if std::fs::write(KNOB, "2").is_err() {
        common::missing(&format!("root, to write {KNOB}"));
        return;
    }
    let mut cmd = Command::new(common::BIN);
    cmd.args([
        "forward",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "127.0.0.1:9",
    ]);
    // Bounded: a proxy that starts anyway would serve forever, with io_uring
    // still switched off for the whole machine. Restore the knob first,
    // whatever happened.
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        common::run_bounded(cmd, Duration::from_secs(20))
    }));
    std::fs::write(KNOB, before.trim()).expect("restore io_uring_disabled");
    let out = out.unwrap_or_else(|e| std::panic::resume_unwind(e));
    let Some((status, stderr)) = out else {
        panic!("started with io_uring disabled (killed after 20 s)");
    };
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("io_uring is unavailable"), "{stderr}");
}
