//! io_uring switched off system-wide (sysctl kernel.io_uring_disabled=2)
//! gives a one-line error and exit code 2, not glommio's panic.
//!
//! This is its own test binary with a single test: cargo runs test binaries
//! one after another, so flipping the sysctl cannot disturb other tests.

mod common;

use std::process::Command;

const KNOB: &str = "/proc/sys/kernel/io_uring_disabled";

#[test]
fn io_uring_unavailable_is_a_one_line_error() {
    let Ok(before) = std::fs::read_to_string(KNOB) else {
        eprintln!("SKIPPED: {KNOB} missing (kernel older than 6.6)");
        return;
    };
    if std::fs::write(KNOB, "2").is_err() {
        eprintln!("SKIPPED: cannot write {KNOB} (not root?)");
        return;
    }
    let out = Command::new(common::BIN)
        .args([
            "forward",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:9",
        ])
        .output();
    std::fs::write(KNOB, before.trim()).expect("restore io_uring_disabled");
    let out = out.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("io_uring is unavailable"), "{stderr}");
}
