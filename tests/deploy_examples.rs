//! The example config files in deploy/examples/ start a real entry/exit pair
//! (with ports, the origin and the key file rewritten for the test) that
//! carries data, and `shardproxy check` accepts them.

mod common;

use std::process::Command;
use std::sync::Arc;

use common::*;

/// Rewrites `key = ...` lines of a TOML example.
fn rewrite(example: &str, set: &[(&str, String)]) -> String {
    let path = format!("{}/deploy/examples/{example}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        let key = line.split('=').next().unwrap_or("").trim();
        match set.iter().find(|(k, _)| *k == key) {
            Some((k, v)) => out.push_str(&format!("{k} = \"{v}\"\n")),
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

fn write_tmp(name: &str, text: &str) -> String {
    let path = std::env::temp_dir().join(format!("shardproxy-{}-{name}", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn example_configs_run_a_working_pair() {
    let key = key_file(&[&keygen()]);
    let exit_cfg = write_tmp(
        "exit.toml",
        &rewrite(
            "exit.toml",
            &[
                ("listen", "127.0.0.1:0".into()),
                ("upstream", echo_origin().to_string()),
                ("key_file", key.clone()),
                ("metrics_listen", "127.0.0.1:0".into()),
            ],
        ),
    );
    let exit = Proxy::command(["run", "--config", &exit_cfg]).start();
    let entry_cfg = write_tmp(
        "entry.toml",
        &rewrite(
            "entry.toml",
            &[
                ("listen", "127.0.0.1:0".into()),
                ("upstream", exit.addr.to_string()),
                ("key_file", key.clone()),
                ("metrics_listen", "127.0.0.1:0".into()),
            ],
        ),
    );
    let entry = Proxy::command(["run", "--config", &entry_cfg]).start();
    assert!(exit.log().iter().any(|l| l.contains("role exit")));
    assert!(entry.log().iter().any(|l| l.contains("role entry")));
    let data = Arc::new(random_bytes(1 << 20, 21));
    assert_eq!(
        sha256(&echo_round_trip(entry.addr, data.clone())),
        sha256(&data)
    );

    for cfg in [&exit_cfg, &entry_cfg] {
        let out = Command::new(BIN)
            .args(["check", "--config", cfg])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains(" OK: role "));
    }
    let _ = std::fs::remove_file(exit_cfg);
    let _ = std::fs::remove_file(entry_cfg);
}

#[test]
fn check_rejects_bad_configs_with_one_line() {
    let cases = [
        ("role = \"exit\"\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:1\"\nkey_file = \"/nonexistent\"\n", "key `key_file`: cannot read key file /nonexistent"),
        ("role = \"forward\"\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:1\"\nidle_timeout = 30\n", "key `idle_timeout` must be a string with a unit"),
        ("role = \"forward\"\nlisten = \"nowhere\"\nupstream = \"127.0.0.1:1\"\n", "bad --listen"),
        ("role = \"forward\"\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:1\"\ncpu_list = \"4000\"\n", "core 4000"),
        ("listen = \"127.0.0.1:0\"\n", "role"),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let path = write_tmp(&format!("bad{i}.toml"), text);
        let out = Command::new(BIN)
            .args(["check", "--config", &path])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "case {i}: {err}");
        assert_eq!(err.lines().count(), 1, "case {i}: {err}");
        assert!(err.contains(needle), "case {i}: {err}");
        let _ = std::fs::remove_file(path);
    }
}

/// `check` takes the role's flags after the file, as `run` does: an
/// example that names a key file this machine lacks checks with
/// `--key-file` given; an override is validated like the file's own value;
/// and the file given without `--config` gets a hint.
#[test]
fn check_takes_overrides_as_run_does() {
    let exit_toml = "role = \"exit\"\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:1\"\nkey_file = \"/nonexistent\"\n";
    let path = write_tmp("override.toml", exit_toml);
    let key = key_file(&[&keygen()]);
    let check = |extra: &[&str]| {
        let out = Command::new(BIN)
            .args(["check", "--config", &path])
            .args(extra)
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        );
        (out.status.code(), stdout, stderr)
    };
    let (code, _, err) = check(&[]);
    assert_eq!(code, Some(2), "{err}");
    let (code, out, err) = check(&["--key-file", &key]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains(" OK: role exit") && out.contains(&format!("keys from {key}")),
        "{out}"
    );
    // Where it is operated from: the metrics endpoint is named too.
    let (code, out, err) = check(&["--key-file", &key, "--metrics-listen", "127.0.0.1:9100"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains(", metrics on http://127.0.0.1:9100/metrics"),
        "{out}"
    );
    let (code, _, err) = check(&["--key-file", &key, "--idle-timeout", "5"]);
    assert_eq!((code, err.lines().count()), (Some(2), 1), "{err}");
    assert!(err.contains("`5` has no unit"), "{err}");
    let (code, _, err) = check(&["--key-file", &key, "--no-such-flag"]);
    assert_eq!((code, err.lines().count()), (Some(2), 1), "{err}");
    let out = Command::new(BIN).args(["check", &path]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        (out.status.code(), err.lines().count()),
        (Some(2), 1),
        "{err}"
    );
    assert!(
        err.contains(&format!("write `shardproxy check --config {path}`")),
        "{err}"
    );
    let _ = std::fs::remove_file(path);
}
