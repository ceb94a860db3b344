//! Arbitrary text → the config file translator. It must never panic, every
//! error is one line, and every produced argument is a flag or a value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardproxy::config::file::translate;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match translate(text, "fuzz.toml", None) {
        // Output is flags and their values, always starting with a flag.
        Ok(f) => assert!(f.args.first().is_none_or(|a| a.starts_with("--"))),
        Err(e) => assert_eq!(e.to_string().lines().count(), 1, "{e}"),
    }
});
