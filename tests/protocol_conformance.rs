//! docs/PROTOCOL.md §9 names, for every rule of the protocol, the test that
//! holds the code to it. This keeps that table true: every test it names
//! must exist (a renamed or deleted test fails here, not silently).

use std::path::Path;

fn sources(dir: &Path, out: &mut String) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push_str(&std::fs::read_to_string(&path).unwrap());
        }
    }
}

#[test]
fn every_test_named_in_the_conformance_table_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/PROTOCOL.md")).unwrap();
    let table = doc
        .split("## 9. Conformance")
        .nth(1)
        .expect("PROTOCOL.md has a §9 conformance table");
    let mut code = String::new();
    sources(&root.join("src"), &mut code);
    sources(&root.join("tests"), &mut code);
    let names: Vec<&str> = table
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|s| {
            s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                && s.contains('_')
        })
        // A setting quoted in the rules, not a test.
        .filter(|s| *s != "max_clock_skew")
        .collect();
    assert!(names.len() >= 20, "only {} test names found", names.len());
    let missing: Vec<&&str> = names
        .iter()
        .filter(|n| !code.contains(&format!("fn {n}(")))
        .collect();
    assert!(
        missing.is_empty(),
        "PROTOCOL.md §9 names missing tests: {missing:?}"
    );
}
