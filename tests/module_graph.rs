//! The source modules form no import cycle, and the lifecycle reads top
//! down: app → shard → listener → session → relay → conn → proto.
//!
//! Reads `src/` and collects every `crate::MODULE` path outside comments,
//! per top-level module, then checks the graph is acyclic.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn top_module(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.trim_end_matches(".rs");
    (!matches!(name, "main" | "lib")).then(|| name.to_string())
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let Some(module) = top_module(&src, &file) else {
            continue;
        };
        let entry = deps.entry(module.clone()).or_default();
        for line in std::fs::read_to_string(&file).unwrap().lines() {
            let code = line.split("//").next().unwrap_or("");
            let mut rest = code;
            while let Some(at) = rest.find("crate::") {
                rest = &rest[at + "crate::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                let is_macro = rest[name.len()..].starts_with('!');
                if !name.is_empty() && !is_macro && name != module {
                    entry.insert(name);
                }
            }
        }
    }
    deps
}

fn find_cycle(deps: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        deps: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|n| n == node) {
            let mut cycle = stack[i..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_string());
        for next in deps.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, deps, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    deps.keys()
        .find_map(|n| visit(n, deps, &mut Vec::new(), &mut done))
}

#[test]
fn source_modules_have_no_import_cycle() {
    let deps = graph();
    // The scan must see the modules it is about, or it proves nothing.
    for m in [
        "app", "shard", "listener", "session", "relay", "conn", "proto",
    ] {
        assert!(deps.contains_key(m), "module {m} not found in src/");
    }
    assert!(
        deps["session"].contains("relay"),
        "the scan missed session → relay"
    );
    if let Some(cycle) = find_cycle(&deps) {
        panic!("import cycle: {}", cycle.join(" → "));
    }
    // The lifecycle order: nothing below imports anything above it.
    let order = [
        "app", "shard", "listener", "session", "relay", "conn", "proto",
    ];
    for (i, low) in order.iter().enumerate() {
        for high in &order[..i] {
            assert!(
                !deps[*low].contains(*high),
                "{low} imports {high}, which is above it"
            );
        }
    }
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    deps.entry("a".into()).or_default().insert("b".into());
    deps.entry("b".into()).or_default().insert("c".into());
    deps.entry("c".into()).or_default().insert("a".into());
    assert_eq!(find_cycle(&deps).unwrap(), ["a", "b", "c", "a"]);
    deps.get_mut("c").unwrap().clear();
    assert!(find_cycle(&deps).is_none());
}
