//! Arbitrary bytes → the metrics endpoint's request parser. It must never
//! panic, and anything it accepts is a well-formed request line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardproxy::metrics::http::parse_request;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = parse_request(data) {
        assert!(req.path.starts_with('/'));
        assert!(!req.method.is_empty() && req.method.bytes().all(|b| b.is_ascii_uppercase()));
    }
});
