//! The test command's own set-up (tests/all.sh) works on the machines a
//! newcomer has: a distribution Python that refuses `pip install` (PEP 668,
//! Debian 12, Ubuntu 23.04+) gets a virtualenv of the suite's own
//! (tests/python_env.sh) instead of failing the run.

use std::path::Path;
use std::process::Command;

#[test]
fn a_python_that_refuses_pip_gets_a_virtualenv() {
    let root = env!("CARGO_MANIFEST_DIR");
    let dir = std::env::temp_dir().join(format!("shardproxy-pep668-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    let real = Command::new("sh")
        .args(["-c", "command -v python3"])
        .output()
        .unwrap();
    assert!(
        real.status.success(),
        "python3 is needed (apt-get install python3)"
    );
    let real = String::from_utf8(real.stdout).unwrap().trim().to_string();
    // What `pip install` says on Debian 12's own python3.
    let fake = format!(
        "#!/bin/sh\nif [ \"$1\" = -m ] && [ \"$2\" = pip ]; then\n  echo 'error: externally-managed-environment' >&2; exit 1\nfi\nexec {real} \"$@\"\n"
    );
    let fake_path = dir.join("bin/python3");
    std::fs::write(&fake_path, fake).unwrap();
    Command::new("chmod")
        .arg("+x")
        .arg(&fake_path)
        .status()
        .unwrap();
    let path = format!(
        "{}:{}",
        dir.join("bin").display(),
        std::env::var("PATH").unwrap()
    );
    let venv = dir.join("venv");
    // tomli-w: a small pure-Python package nothing else here installs; the
    // command check uses one a package puts on PATH.
    // Run from `dir` with a relative venv path: PATH must still work after
    // a `cd`. The second call goes through the venv's own pip, which takes
    // the package; what it asked for must still be checked.
    let script = format!(
        ". {root}/tests/python_env.sh; \
         ensure_python tomli_w=tomli-w cmd:tomli-w-absent-probe=tomli-w 2>&1; echo \"rc=$?\"; \
         ensure_python cmd:tomli-w-absent-probe=tomli-w 2>&1; echo \"again rc=$?\"; \
         ensure_python tomli_w=tomli-w && cd / && command -v python3 && python3 -c 'import tomli_w; print(\"imported\")'"
    );
    let out = Command::new("bash")
        .current_dir(&dir)
        .env("PATH", &path)
        .env("TEST_PYTHON_VENV", "venv")
        .args(["-c", &script])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        text.contains("refused it (error: externally-managed-environment)"),
        "{text}"
    );
    // A command the package does not install is reported, not passed over.
    assert!(
        text.contains("tomli-w-absent-probe is still missing"),
        "{text}"
    );
    assert!(text.contains("\nrc=1"), "{text}");
    assert!(text.contains("again rc=1"), "{text}");
    // The module itself is there, through the virtualenv first on PATH.
    let venv_python = format!("{}", Path::new(&venv).join("bin/python3").display());
    assert!(text.contains(&venv_python), "{text}");
    assert!(text.contains("imported"), "{text}");
    assert!(out.status.success(), "{text}");
}
