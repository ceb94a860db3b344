//! The Python implementation in tests/tunnel_client.py, written from
//! docs/PROTOCOL.md with OpenSSL (the `cryptography` package), must agree
//! with the Rust code: on the documented vector, and against a live exit.

mod common;

use std::process::Command;

use common::*;

/// Runs the Python client; `None` (with a reason printed) if Python or
/// `cryptography` is missing outside CI. In CI (`CI=true`) that is a failure:
/// `.ci/run` installs them.
fn python(args: &[&str]) -> Option<String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tunnel_client.py");
    let probe = Command::new("python3")
        .args(["-c", "import cryptography"])
        .output();
    if !probe.map(|o| o.status.success()).unwrap_or(false) {
        let why =
            "python3 with the `cryptography` package is not installed (pip install cryptography)";
        missing(why);
        return None;
    }
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

#[test]
fn python_recomputes_the_documented_vector() {
    let doc = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/PROTOCOL.md");
    if let Some(out) = python(&["vectors", doc]) {
        assert!(out.contains("vectors ok"), "{out}");
    }
}

#[test]
fn python_client_talks_to_a_live_exit() {
    let key = keygen();
    let exit = Proxy::exit(echo_origin(), &key_file(&[&key])).start();
    // 10 MiB: over 600 chunks each way, so the length masks cross from the
    // first 512-chunk keystream into the second.
    let unit = "hello from python, ".repeat(50); // 950 bytes
    let repeat = (10 << 20) / unit.len();
    let expected = unit.repeat(repeat);
    let Some(out) = python(&[
        "send",
        &exit.addr.to_string(),
        &key,
        &unit,
        &repeat.to_string(),
    ]) else {
        return;
    };
    let digest: String = sha256(expected.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let want = format!("reply sha256 {digest} len {} ended=True", expected.len());
    assert_eq!(out.trim(), want);
}
