//! Arbitrary bytes → the exit's handshake and chunk decoder.
//!
//! The first byte picks the read sizes the decoder sees, so the fuzzer also
//! explores chunk boundaries. `exit_side` asserts the invariants (no panic,
//! bounded buffering, no plaintext without a valid tag).
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardproxy::proto::fuzz::exit_side;

fuzz_target!(|data: &[u8]| {
    let (sizes, stream) = match data.split_first() {
        Some((&s, rest)) => ([usize::from(s) + 1, usize::from(s) * 61 + 7, 16_418], rest),
        None => return,
    };
    let out = exit_side(stream, &sizes);
    // Without the fuzz PSK nothing can authenticate: any plaintext must come
    // from a stream that began with a valid hello.
    if !out.answered {
        assert!(out.plaintext.is_empty());
    }
});
