//! Cipher and framing micro-benchmark, single core, in one run:
//!
//! * raw `chacha20poly1305` (the pure-Rust crate, `--no-default-features`)
//!   sealing a buffer in place;
//! * `ring` 0.17 (assembly, run-time CPU detection; the default) doing the same;
//! * our framing (`Encoder::seal_in_place`), and the seal+open round trip
//!   (`Decoder::decode`) against raw encrypt+decrypt, with the AEAD backend
//!   this build selected (`--no-default-features` switches to the crate).
//!
//! "16 KiB" framing rows seal the relay's full chunk: `MAX_PAYLOAD` (16384)
//! payload bytes behind a 2-byte masked length, with a 16-byte tag after it
//! (docs/PROTOCOL.md §4). Rates are payload bytes per second.
//!
//! Run: `cargo bench --bench proto` (`BENCH_MS=N` per cell, default 1500).

use std::hint::black_box;
use std::time::{Duration, Instant};

use chacha20poly1305::aead::AeadInOut;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit};
use shardproxy::proto::{
    accept_hello, aead::backend_name, ClientHandshake, Decoded, Psk, LEN_LEN, MAX_FRAME,
    MAX_PAYLOAD,
};

fn budget() -> Duration {
    Duration::from_millis(
        std::env::var("BENCH_MS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1500),
    )
}

/// Runs `op` (which processes `bytes` bytes) repeatedly for the budget;
/// returns GB/s. The best of three runs damps scheduler noise.
fn rate(bytes: usize, mut op: impl FnMut()) -> f64 {
    let mut best = 0f64;
    for _ in 0..3 {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < budget() / 3 {
            for _ in 0..64 {
                op();
            }
            n += 64;
        }
        best = best.max((n * bytes as u64) as f64 / start.elapsed().as_secs_f64() / 1e9);
    }
    best
}

fn nonce(n: u64) -> chacha20poly1305::Nonce {
    let mut b = [0u8; 12];
    b[..8].copy_from_slice(&n.to_le_bytes());
    b.into()
}

fn pair() -> (shardproxy::proto::Encoder, shardproxy::proto::Decoder) {
    let psk = Psk::from_bytes([7; 32]);
    let (hs, hello) = ClientHandshake::start(&psk, [1; 32], 100, b"").unwrap();
    let acc = accept_hello(&[psk], &hello, [2; 32], 100, 120).unwrap();
    let (enc, _) = hs.finish(&acc.server_hello).unwrap();
    (enc, acc.decoder)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    println!("framing uses AEAD backend: {}", backend_name());
    println!("| size | raw chacha20poly1305 seal | same, 2-byte AAD | ring seal | crate vs ring | framing seal | framing overhead | raw seal+open | framing seal+open | overhead |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for size in [1024usize, 16 * 1024] {
        let key = [9u8; 32];
        let cipher = ChaCha20Poly1305::new(&key.into());
        let mut buf = vec![0x33u8; size];
        let mut ctr = 0u64;
        let raw = rate(size, || {
            ctr += 1;
            let tag = cipher
                .encrypt_inout_detached(&nonce(ctr), &[], buf.as_mut_slice().into())
                .unwrap();
            black_box(tag);
        });

        let ring_key = ring::aead::LessSafeKey::new(
            ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, &key).unwrap(),
        );
        let mut ctr = 0u64;
        let ring_rate = rate(size, || {
            ctr += 1;
            let mut nb = [0u8; 12];
            nb[..8].copy_from_slice(&ctr.to_le_bytes());
            let tag = ring_key
                .seal_in_place_separate_tag(
                    ring::aead::Nonce::assume_unique_for_key(nb),
                    ring::aead::Aad::empty(),
                    &mut buf,
                )
                .unwrap();
            let _ = black_box(tag);
        });

        let (mut enc, _) = pair();
        // Payload 64-byte aligned, as in raw (alignment measured: no effect).
        let mut backing = vec![0x33u8; MAX_FRAME + 64];
        let off = (64 - (backing.as_ptr() as usize + LEN_LEN) % 64) % 64;
        let frame = &mut backing[off..off + MAX_FRAME];
        let payload = if size == MAX_PAYLOAD {
            MAX_PAYLOAD
        } else {
            size
        };
        let framed = rate(payload, || {
            black_box(enc.seal_in_place(frame, payload).unwrap());
        });

        let mut ctr = 0u64;
        let raw_rt = rate(size, || {
            ctr += 1;
            let tag = cipher
                .encrypt_inout_detached(&nonce(ctr), &[], buf.as_mut_slice().into())
                .unwrap();
            cipher
                .decrypt_inout_detached(&nonce(ctr), &[], buf.as_mut_slice().into(), &tag)
                .unwrap();
        });

        let (mut enc, mut dec) = pair();
        let framed_rt = rate(payload, || {
            let n = enc.seal_in_place(frame, payload).unwrap();
            match dec.decode(&mut frame[..n]).unwrap() {
                Decoded::Data { len, .. } => assert_eq!(len, payload),
                other => panic!("{other:?}"),
            }
        });
        let mut ctr = 0u64;
        let with_aad = rate(size, || {
            ctr += 1;
            let tag = cipher
                .encrypt_inout_detached(&nonce(ctr), &[1, 2], buf.as_mut_slice().into())
                .unwrap();
            black_box(tag);
        });
        println!(
            "| {} KiB | {raw:.2} GB/s | {with_aad:.2} GB/s | {ring_rate:.2} GB/s | {:.0}% | {framed:.2} GB/s | {:.1}% | {raw_rt:.2} GB/s | {framed_rt:.2} GB/s | {:.1}% |",
            size / 1024,
            raw / ring_rate * 100.0,
            (1.0 - framed / raw) * 100.0,
            (1.0 - framed_rt / raw_rt) * 100.0,
        );
    }
}
