//! Faults on a real link between entry and exit, in network namespaces:
//! 1% and 5% random loss (nftables), a 100 Mbit/s TBF rate limit with flat
//! memory, a TCP reset injected mid-transfer, and an unreachable exit (SYNs
//! dropped, so the entry's connect timeout must fire). The scenarios live in
//! tests/netns_faults.py; this runs it against the test build.
//!
//! Needs root, iproute2 and nftables (`tests/all.sh` installs them). A
//! machine that cannot create namespaces fails the test, naming what is
//! missing (`common::missing`).

mod common;

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
        common::missing(why);
        return;
    }
    let out = Command::new("python3")
        .args([script, env!("CARGO_BIN_EXE_shardproxy")])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    if out.status.code() == Some(3) {
        common::missing(&format!("the right to create network namespaces: {stdout}"));
        return;
    }
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("5 passed, 0 failed"), "{stdout}");
}
