//! Bad input: one line on stderr, exit code 2, no panic, no backtrace.

mod common;

use std::net::TcpListener;
use std::process::{Command, Output};

use common::BIN;

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn run_sh(script: &str) -> Output {
    Command::new("sh")
        .args(["-c", script])
        .env("BIN", BIN)
        .output()
        .unwrap()
}

/// Asserts the one-line, exit-2 contract and returns the line.
fn one_line_error(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

const UP: &str = "127.0.0.1:9";

#[test]
fn unknown_flag() {
    let e = one_line_error(&run(&[
        "forward",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        UP,
        "--bogus",
    ]));
    assert!(e.contains("--bogus"), "{e}");
}

#[test]
fn bad_listen_address() {
    let e = one_line_error(&run(&[
        "forward",
        "--listen",
        "localhost:99999",
        "--upstream",
        UP,
    ]));
    assert!(e.contains("bad --listen address"), "{e}");
}

#[test]
fn bad_upstream() {
    let e = one_line_error(&run(&[
        "forward",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "nocolon",
    ]));
    assert!(e.contains("--upstream"), "{e}");
}

#[test]
fn duration_without_unit() {
    let e = one_line_error(&run(&[
        "forward",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        UP,
        "--idle-timeout",
        "30",
    ]));
    assert!(e.contains("no unit"), "{e}");
}

#[test]
fn too_many_cores() {
    let e = one_line_error(&run(&[
        "forward",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        UP,
        "--cores",
        "4096",
    ]));
    assert!(
        e.contains("only") && e.contains("cores are available"),
        "{e}"
    );
}

#[test]
fn core_that_does_not_exist() {
    let e = one_line_error(&run(&[
        "forward",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        UP,
        "--cpu-list",
        "0,4000",
    ]));
    assert!(e.contains("core 4000"), "{e}");
}

#[test]
fn port_held_by_another_program() {
    let other = TcpListener::bind("127.0.0.1:0").unwrap(); // no SO_REUSEPORT
    let addr = other.local_addr().unwrap().to_string();
    let e = one_line_error(&run(&["forward", "--listen", &addr, "--upstream", UP]));
    assert!(e.contains("already in use"), "{e}");
}

#[test]
fn memlock_too_low_names_the_fix() {
    let out = run_sh(
        r#"ulimit -l 64 && exec "$BIN" forward --listen 127.0.0.1:0 --upstream 127.0.0.1:9"#,
    );
    let e = one_line_error(&out);
    assert!(
        e.contains("memlock") && e.contains("ulimit -l") && e.contains("LimitMEMLOCK"),
        "{e}"
    );
}
