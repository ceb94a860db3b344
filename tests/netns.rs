//! Faults on a real link between entry and exit, in network namespaces:
//! 1% and 5% random loss (nftables), a 100 Mbit/s TBF rate limit with flat
//! memory, a TCP reset injected mid-transfer, and an unreachable exit (SYNs
//! dropped, so the entry's connect timeout must fire). The scenarios live in
//! tests/netns_faults.py; this runs it against the test build.
//!
//! Needs root, iproute2 and nftables (`.ci/run` installs them). Outside CI a
//! machine that cannot create namespaces skips with a message; in CI that is
//! a failure.

use std::process::Command;

#[test]
fn netns_fault_scenarios() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/netns_faults.py");
    let have_tools = ["ip", "nft", "tc"].iter().all(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    });
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    if !(have_tools && root) {
        let why = "needs root with iproute2 and nftables (apt-get install iproute2 nftables)";
        assert!(std::env::var("CI").is_err(), "{why}");
        eprintln!("SKIPPED: {why}");
        return;
    }
    let out = Command::new("python3")
        .args([script, env!("CARGO_BIN_EXE_shardproxy")])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    if out.status.code() == Some(3) {
        assert!(
            std::env::var("CI").is_err(),
            "cannot create network namespaces: {stdout}"
        );
        eprintln!("SKIPPED: {stdout}");
        return;
    }
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("5 passed, 0 failed"), "{stdout}");
}
