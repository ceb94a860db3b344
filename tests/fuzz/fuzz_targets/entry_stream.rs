//! Arbitrary bytes → the entry's check of the exit's answer and its chunk
//! decoder (`shardproxy::proto::fuzz::entry_side` asserts the invariants).
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardproxy::proto::fuzz::entry_side;

fuzz_target!(|data: &[u8]| {
    let (sizes, stream) = match data.split_first() {
        Some((&s, rest)) => ([usize::from(s) + 1, usize::from(s) * 61 + 7, 16_418], rest),
        None => return,
    };
    let out = entry_side(stream, &sizes);
    if !out.answered {
        assert!(out.plaintext.is_empty());
    }
});
