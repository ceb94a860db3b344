//! The build assumes x86-64-v3 (`.cargo/config.toml`). On a CPU without
//! those features the binary must say so in one line and exit 2, not die of
//! SIGILL. QEMU's user-mode emulator (Debian `qemu-user`, installed by
//! tests/all.sh) runs the real binary with an older CPU model.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn an_older_cpu_gets_a_one_line_error_not_sigill() {
    if !cfg!(target_arch = "x86_64") || !cfg!(target_feature = "avx2") {
        // A baseline build needs nothing; there is nothing to refuse.
        return;
    }
    if Command::new("qemu-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        missing("qemu-x86_64 (apt-get install qemu-user)");
        return;
    }
    // Nehalem (2008): SSE4.2 and POPCNT, no AVX, AVX2, BMI2, FMA.
    let mut cmd = Command::new("qemu-x86_64");
    cmd.args(["-cpu", "Nehalem", BIN, "--version"]);
    let (status, output) = run_bounded(cmd, Duration::from_secs(60)).expect("qemu run hung");
    assert_eq!(status.code(), Some(2), "{status:?}: {output}");
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(lines.len(), 1, "{output}");
    assert!(lines[0].starts_with("error: "), "{output}");
    assert!(lines[0].contains("avx2"), "{output}");
    assert!(lines[0].contains("target-cpu=native"), "{output}");
    // The same binary under a CPU model that has x86-64-v3 starts normally:
    // the check refuses what is missing, not everything QEMU runs.
    let out = Command::new("qemu-x86_64")
        .args(["-cpu", "max", BIN, "--version"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{:?}: {stdout}", out.status);
    assert!(stdout.starts_with("shardproxy "), "{stdout}");
}
