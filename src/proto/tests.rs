//! Unit tests of the sans-io protocol: round trips, truncation, tampering,
//! limits, re-chunking, and the documented test vector.

use super::aead::AeadBackend;
use super::fuzz::{
    drive_decoder, exit_side, After, FuzzOutcome, FUZZ_NOW, FUZZ_PSK, FUZZ_SERVER_SALT,
};
use super::*;

/// Deterministic pseudo-random generator for the property tests.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn psk(b: u8) -> Psk {
    Psk::from_bytes([b; 32])
}

/// A full handshake; returns (entry encoder, entry decoder, exit encoder, exit decoder).
fn pair(key: &Psk) -> (Encoder, Decoder, Encoder, Decoder) {
    let (client, hello) = ClientHandshake::start(key, [1; 32], 1000, b"").unwrap();
    let acc = accept_hello(std::slice::from_ref(key), &hello, [2; 32], 1000, 120).unwrap();
    let (c_enc, c_dec) = client.finish(&acc.server_hello).unwrap();
    (c_enc, c_dec, acc.encoder, acc.decoder)
}

/// A valid exit-side stream for the fuzz entry point: hello + chunks + end.
/// Where a [`fuzz_stream`]'s data chunks start: after the client hello and
/// the key confirmation.
const BODY: usize = CLIENT_HELLO_LEN + CONFIRM_LEN;

fn fuzz_stream(plaintext: &[u8]) -> Vec<u8> {
    fuzz_stream_with(plaintext, 0)
}

/// [`fuzz_stream`] from a hello with `flags` ([`FLAG_LARGE_CHUNKS`]: its
/// chunks are then up to [`LARGE_PAYLOAD`] bytes).
fn fuzz_stream_with(plaintext: &[u8], flags: u8) -> Vec<u8> {
    let (client, hello, acc) = fuzz_hello_with_meta([7; 32], b"meta", flags);
    let (mut enc, _) = client.finish(&acc.server_hello).unwrap();
    let mut s = hello.to_vec();
    let mut confirm = [0u8; crate::proto::CONFIRM_LEN];
    enc.seal_confirm(&mut confirm).unwrap();
    s.extend_from_slice(&confirm);
    enc.seal_to_vec(plaintext, &mut s).unwrap();
    enc.end_to_vec(&mut s).unwrap();
    s
}

#[test]
fn round_trip_both_directions() {
    let (mut ce, mut cd, mut se, mut sd) = pair(&psk(9));
    let data = Rng(1).bytes(100_000);
    let mut wire = Vec::new();
    ce.seal_to_vec(&data, &mut wire).unwrap();
    ce.end_to_vec(&mut wire).unwrap();
    let (pt, ended, rest) = sd.open_all(wire).unwrap();
    assert_eq!((pt, ended, rest), (data.clone(), true, 0));
    let mut back = Vec::new();
    se.seal_to_vec(b"reply", &mut back).unwrap();
    assert_eq!(cd.open_all(back).unwrap().0, b"reply");
}

#[test]
fn directions_use_different_keys() {
    let (mut ce, mut cd, _, _) = pair(&psk(9));
    let mut wire = Vec::new();
    ce.seal_to_vec(b"x", &mut wire).unwrap();
    // The entry's own decoder (s2c) must not open what it sealed (c2s).
    assert!(cd.open_all(wire).is_err());
}

#[test]
fn every_truncated_prefix_needs_more() {
    let (mut ce, _, _, _) = pair(&psk(3));
    let mut wire = Vec::new();
    ce.seal_to_vec(&[5u8; 3000], &mut wire).unwrap();
    for cut in 0..wire.len() {
        let (_, _, _, mut sd) = pair(&psk(3));
        let mut part = wire[..cut].to_vec();
        assert_eq!(sd.decode(&mut part), Ok(Decoded::NeedMore), "prefix {cut}");
    }
    let (_, _, _, mut sd) = pair(&psk(3));
    assert!(matches!(
        sd.decode(&mut wire),
        Ok(Decoded::Data { len: 3000, .. })
    ));
}

#[test]
fn every_bit_flip_is_rejected_and_nothing_leaks() {
    let data = b"attack at dawn, bring snacks".to_vec();
    let stream = fuzz_stream(&data);
    let clean = exit_side(&stream, &[4096]);
    assert_eq!(
        clean,
        FuzzOutcome {
            answered: true,
            plaintext: data.clone(),
            ended: true,
            failed: false,
            sessions: 1,
            refused: None,
        }
    );
    for byte in 0..stream.len() {
        for bit in 0..8 {
            let mut s = stream.clone();
            s[byte] ^= 1 << bit;
            let out = exit_side(&s, &[4096]);
            // Rejected outright, or (a flipped length) left waiting for bytes
            // that never come, which the relay treats as truncation. Never a
            // clean end.
            assert!(!out.ended, "flip {byte}.{bit} accepted");
            assert!(
                out.failed || byte >= CLIENT_HELLO_LEN,
                "flip in hello {byte}.{bit}"
            );
            // Only chunks wholly before the flipped byte may be forwarded.
            let data_chunk_end = BODY + LEN_LEN + data.len() + TAG_LEN;
            if byte < data_chunk_end {
                assert!(
                    out.plaintext.is_empty(),
                    "flip {byte}.{bit} leaked plaintext"
                );
            } else {
                assert_eq!(out.plaintext, data, "flip in the end chunk {byte}.{bit}");
            }
            if byte < CLIENT_HELLO_LEN {
                assert!(!out.answered, "flip in hello {byte}.{bit} got an answer");
            }
        }
    }
}

#[test]
fn flip_in_a_later_chunk_forwards_only_earlier_chunks() {
    let data = Rng(5).bytes(3 * MAX_PAYLOAD);
    let mut stream = fuzz_stream(&data);
    let second_chunk = BODY + MAX_FRAME + LEN_LEN + 10;
    stream[second_chunk] ^= 0x80;
    let out = exit_side(&stream, &[1000, 7, 20000]);
    assert!(out.failed && !out.ended);
    assert_eq!(out.plaintext, data[..MAX_PAYLOAD]);
}

#[test]
fn oversize_length_is_rejected_from_the_header_alone() {
    let (mut ce, _, _, mut sd) = pair(&psk(4));
    // Only the 2-byte length field is available: the decoder must already
    // refuse, before waiting for (or buffering) any body.
    let mut field = ce.forge_length((MAX_PAYLOAD + 1) as u16);
    assert_eq!(
        sd.decode(&mut field),
        Err(ProtoError::BadLength(MAX_PAYLOAD + 1))
    );
    // A dead decoder stays dead.
    assert!(sd.decode(&mut [0u8; 64]).is_err());
    // An in-range forged length makes the decoder wait for at most one chunk.
    let (mut ce, _, _, mut sd) = pair(&psk(4));
    let mut field = ce.forge_length(MAX_PAYLOAD as u16).to_vec();
    assert_eq!(sd.decode(&mut field), Ok(Decoded::NeedMore));
    assert_eq!(sd.needed(), MAX_FRAME);
}

#[test]
fn nonce_limit_closes_instead_of_wrapping() {
    let (mut ce, _, _, mut sd) = pair(&psk(6));
    ce.set_nonce_window(10, 12);
    sd.set_nonce_window(10, 12);
    let mut wire = Vec::new();
    ce.seal_to_vec(b"a", &mut wire).unwrap(); // nonce 10
    ce.seal_to_vec(b"b", &mut wire).unwrap(); // nonce 11
    assert_eq!(
        ce.seal_to_vec(b"c", &mut Vec::new()),
        Err(ProtoError::NonceExhausted)
    );
    assert_eq!(
        ce.end_to_vec(&mut Vec::new()),
        Err(ProtoError::NonceExhausted)
    );
    assert_eq!(sd.open_all(wire.clone()).unwrap().0, b"ab");
    // The receiver enforces the same limit.
    let (mut ce, _, _, mut sd) = pair(&psk(6));
    sd.set_nonce_window(0, 1);
    let mut two = Vec::new();
    ce.seal_to_vec(b"xy", &mut two).unwrap();
    ce.seal_to_vec(b"z", &mut two).unwrap();
    assert_eq!(sd.open_all(two), Err(ProtoError::NonceExhausted));
    // At the top of the 64-bit range the counter stops instead of wrapping.
    let (mut wrap, _, _, _) = pair(&psk(6));
    wrap.set_nonce_window(u64::MAX - 1, u64::MAX);
    wrap.seal_to_vec(b"x", &mut Vec::new()).unwrap();
    assert_eq!(
        wrap.seal_to_vec(b"x", &mut Vec::new()),
        Err(ProtoError::NonceExhausted)
    );
}

#[test]
fn rechunking_a_sealed_stream_decodes_identically() {
    let mut rng = Rng(77);
    for round in 0..200 {
        let len = rng.below(50_000) + 1;
        let data = rng.bytes(len);
        let stream = fuzz_stream(&data);
        let sizes: Vec<usize> = (0..rng.below(8) + 1)
            .map(|_| rng.below(20_000) + 1)
            .collect();
        let out = exit_side(&stream, &sizes);
        assert!(out.ended && !out.failed, "round {round} sizes {sizes:?}");
        assert_eq!(out.plaintext, data, "round {round}");
    }
}

#[test]
fn fuzz_entry_point_on_truncated_and_mutated_streams() {
    let mut rng = Rng(1234);
    let data = rng.bytes(40_000);
    let stream = fuzz_stream(&data);
    for cut in (0..stream.len()).step_by(97) {
        let out = exit_side(&stream[..cut], &[333]);
        assert!(!out.ended, "truncated stream at {cut} looked complete");
        assert!(data.starts_with(&out.plaintext));
    }
    for _ in 0..500 {
        let mut s = stream.clone();
        for _ in 0..rng.below(4) + 1 {
            let i = rng.below(s.len());
            let v = rng.next() as u8;
            s[i] = v;
        }
        if rng.below(4) == 0 {
            let keep = rng.below(s.len());
            s.truncate(keep);
        }
        let size = rng.below(5000) + 1;
        let out = exit_side(&s, &[size]);
        assert!(
            data.starts_with(&out.plaintext),
            "mutation produced foreign plaintext"
        );
    }
    // Pure garbage never gets an answer.
    for len in [0, 1, 123, 124, 125, 5000] {
        assert!(!exit_side(&rng.bytes(len), &[64]).answered);
    }
}

#[test]
fn data_after_end_is_an_error() {
    let stream = fuzz_stream(b"x");
    let hello: &[u8; CLIENT_HELLO_LEN] = stream[..CLIENT_HELLO_LEN].try_into().unwrap();
    let decoder = || {
        let mut d = accept_hello(
            &[Psk::from_bytes(FUZZ_PSK)],
            hello,
            FUZZ_SERVER_SALT,
            FUZZ_NOW,
            120,
        )
        .unwrap()
        .decoder;
        let mut confirm: [u8; CONFIRM_LEN] = stream[CLIENT_HELLO_LEN..BODY].try_into().unwrap();
        d.open_confirm(&mut confirm).unwrap();
        d
    };
    let body = stream[BODY..].to_vec();
    // Without a trailing byte the stream is accepted: the data, then a clean
    // end, after which an ended decoder given nothing is content to wait.
    let mut dec = decoder();
    assert_eq!(dec.open_all(body.clone()), Ok((b"x".to_vec(), true, 0)));
    assert_eq!(dec.decode(&mut []), Ok(Decoded::NeedMore));
    // With one byte after the end chunk: the same data and end, the byte
    // left over, and that byte rejected as DataAfterEnd, for good.
    let mut trailing = body;
    trailing.push(0);
    let mut dec = decoder();
    assert_eq!(dec.open_all(trailing), Ok((b"x".to_vec(), true, 1)));
    assert_eq!(dec.decode(&mut [0u8]), Err(ProtoError::DataAfterEnd));
    assert!(dec.decode(&mut []).is_err(), "a failed decoder recovered");
}

#[test]
fn hello_checks() {
    let (old, new) = (psk(1), psk(2));
    // Timestamps are Unix milliseconds; the skew is in seconds.
    let (_, hello) = ClientHandshake::start(&old, [3; 32], 5_000_000, b"").unwrap();
    // Key rotation: the exit tries every key.
    let acc = accept_hello(&[new.clone(), old.clone()], &hello, [4; 32], 5_000_000, 120).unwrap();
    assert_eq!(acc.key_index, 1);
    assert_eq!(acc.unix_ms, 5_000_000);
    assert!(matches!(
        accept_hello(&[new], &hello, [4; 32], 5_000_000, 120),
        Err(ProtoError::BadHello)
    ));
    assert!(matches!(
        accept_hello(std::slice::from_ref(&old), &hello, [4; 32], 5_120_001, 120),
        Err(ProtoError::ClockSkew)
    ));
    assert!(matches!(
        accept_hello(std::slice::from_ref(&old), &hello, [4; 32], 4_879_999, 120),
        Err(ProtoError::ClockSkew)
    ));
    assert!(accept_hello(std::slice::from_ref(&old), &hello, [4; 32], 5_120_000, 120).is_ok());
    assert_eq!(
        ClientHandshake::start(&old, [3; 32], 0, &[0; 65]).err(),
        Some(ProtoError::MetaTooLong)
    );
    let (_, hello) = ClientHandshake::start(&old, [3; 32], 5_000_000, b"10.0.0.1:5555").unwrap();
    let acc = accept_hello(&[old], &hello, [4; 32], 5_000_000, 120).unwrap();
    assert_eq!(&acc.meta[..acc.meta_len], b"10.0.0.1:5555");
}

#[test]
fn server_hello_is_bound_to_the_client_salt() {
    let key = psk(8);
    let (c1, h1) = ClientHandshake::start(&key, [1; 32], 10, b"").unwrap();
    let (_c2, h2) = ClientHandshake::start(&key, [2; 32], 10, b"").unwrap();
    let a2 = accept_hello(std::slice::from_ref(&key), &h2, [9; 32], 10, 120).unwrap();
    // Connection 1 receives connection 2's answer: rejected.
    assert!(matches!(
        c1.finish(&a2.server_hello),
        Err(ProtoError::BadServerHello)
    ));
    let _ = h1;
}

#[test]
fn replayed_stream_fails_under_a_fresh_server_salt() {
    let data = b"GET /transfer?to=mallory".to_vec();
    let recorded = fuzz_stream(&data);
    let key = Psk::from_bytes(FUZZ_PSK);
    let hello: &[u8; CLIENT_HELLO_LEN] = recorded[..CLIENT_HELLO_LEN].try_into().unwrap();
    // The exit accepts the hello (timestamp in window) but with a new salt.
    let acc = accept_hello(&[key], hello, [0x77; 32], FUZZ_NOW, 120).unwrap();
    let mut out = FuzzOutcome::default();
    let ok = drive_decoder(
        acc.decoder,
        &recorded[CLIENT_HELLO_LEN..],
        &[4096],
        (After::Nothing, After::Nothing),
        &mut out,
    );
    assert!(!ok && out.plaintext.is_empty());
}

/// The vector printed in docs/PROTOCOL.md. If this fails, either the code or
/// the document is wrong; the Python implementation in tests/ checks the same.
#[test]
fn documented_test_vector() {
    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
    let key = Psk::from_bytes(std::array::from_fn(|i| i as u8));
    let client_salt: [u8; 32] = std::array::from_fn(|i| 0x40 + i as u8);
    let server_salt: [u8; 32] = std::array::from_fn(|i| 0x80 + i as u8);
    let ts = 1_800_000_000_000;
    let (client, hello) = ClientHandshake::start(&key, client_salt, ts, b"").unwrap();
    let acc = accept_hello(std::slice::from_ref(&key), &hello, server_salt, ts, 120).unwrap();
    let hk = schedule::session_hkdf(&key, &client_salt, &server_salt);
    let chk = schedule::client_hello_hkdf(&key, &client_salt);
    let (mut enc, _) = client.finish(&acc.server_hello).unwrap();
    let mut confirm = [0u8; crate::proto::CONFIRM_LEN];
    enc.seal_confirm(&mut confirm).unwrap();
    let mut chunk = Vec::new();
    enc.seal_to_vec(b"hello", &mut chunk).unwrap();
    let mut end = Vec::new();
    enc.end_to_vec(&mut end).unwrap();
    let doc = include_str!("../../docs/PROTOCOL.md");
    let mut missing = Vec::new();
    let mut expect = |name: &str, value: String| {
        let line = format!("{name}: {value}");
        if !doc.contains(&line) {
            missing.push(line);
        }
    };
    expect(
        "client_hello_key",
        hex(&schedule::raw(&chk, schedule::INFO_CLIENT_HELLO)),
    );
    expect("client_hello", hex(&hello));
    expect(
        "server_hello_key",
        hex(&schedule::raw(&hk, schedule::INFO_SERVER_HELLO)),
    );
    expect("server_hello", hex(&acc.server_hello));
    expect("c2s_key", hex(&schedule::raw(&hk, schedule::INFO_C2S)));
    expect("s2c_key", hex(&schedule::raw(&hk, schedule::INFO_S2C)));
    expect(
        "c2s_length_key",
        hex(&schedule::raw(&hk, schedule::INFO_C2S_LEN)),
    );
    expect(
        "s2c_length_key",
        hex(&schedule::raw(&hk, schedule::INFO_S2C_LEN)),
    );
    expect("confirm_chunk", hex(&confirm));
    expect("first_chunk", hex(&chunk));
    expect("end_chunk", hex(&end));
    // The same hello with a `meta` block (§2.1).
    let meta = crate::proto::Meta {
        client: Some("192.0.2.1:40000".parse().unwrap()),
        destination: Some("[2001:db8::7]:443".parse().unwrap()),
        id: Some(u128::from_be_bytes(std::array::from_fn(|i| 0xa0 + i as u8))),
        patience: None,
    };
    let (block, len) = meta.encode();
    expect("meta", hex(&block[..len]));
    let (_, with_meta) = ClientHandshake::start(&key, client_salt, ts, &block[..len]).unwrap();
    expect("client_hello_with_meta", hex(&with_meta));
    let acc = accept_hello(std::slice::from_ref(&key), &with_meta, server_salt, ts, 120).unwrap();
    assert_eq!(crate::proto::Meta::decode(&acc.meta[..acc.meta_len]), meta);
    assert!(
        missing.is_empty(),
        "docs/PROTOCOL.md lacks:\n{}",
        missing.join("\n")
    );
}

/// Regenerates the fuzz corpus seeds (run with `--ignored`).
#[test]
#[ignore]
fn write_fuzz_seeds() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fuzz/corpus/exit_stream");
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = Rng(99);
    for (i, len) in [0usize, 1, 100, 16_384, 16_385, 40_000]
        .into_iter()
        .enumerate()
    {
        let data = rng.bytes(len);
        let mut seed = vec![(i * 37) as u8];
        seed.extend(fuzz_stream(&data));
        std::fs::write(format!("{dir}/valid-{i}"), seed).unwrap();
    }
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fuzz/corpus/entry_stream"
    );
    std::fs::create_dir_all(dir).unwrap();
    for (i, len) in [0usize, 1, 100, 16_384, 40_000].into_iter().enumerate() {
        let data = rng.bytes(len);
        let mut seed = vec![(i * 53) as u8];
        seed.extend(entry_fuzz_stream(&data));
        std::fs::write(format!("{dir}/valid-{i}"), seed).unwrap();
    }
    // Large chunks agreed (docs/PROTOCOL.md §4): 65,472-byte chunks.
    let data = Rng(LARGE_SEED).bytes(LARGE_SEED_LEN);
    let mut seed = vec![0x2a];
    seed.extend(entry_fuzz_stream_with(&data, true));
    std::fs::write(format!("{dir}/valid-large"), seed).unwrap();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fuzz/corpus/exit_stream");
    let mut seed = vec![0x2a];
    seed.extend(fuzz_stream_with(&data, FLAG_LARGE_CHUNKS));
    std::fs::write(format!("{dir}/valid-large"), seed).unwrap();
    // Keep-alive agreed (docs/PROTOCOL.md §4.1): three sessions on one
    // tunnel, with start chunks (exit side) and status chunks (entry side).
    let sessions = keepalive_sessions();
    let mut seed = vec![0x11];
    seed.extend(keepalive_exit_stream(&sessions));
    std::fs::write(format!("{dir}/valid-keepalive"), seed).unwrap();
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fuzz/corpus/entry_stream"
    );
    let mut seed = vec![0x11];
    seed.extend(keepalive_entry_stream(&sessions, STATUS_OK));
    std::fs::write(format!("{dir}/valid-keepalive"), seed).unwrap();
    // The connect status (docs/PROTOCOL.md §3.1) agreed: status 0 first.
    let mut seed = vec![0x05];
    seed.extend(connect_status_entry_stream(&sessions[2], &[STATUS_OK]));
    std::fs::write(format!("{dir}/valid-connect-status"), seed).unwrap();
}

/// An exit→entry stream under a connect status (docs/PROTOCOL.md §3.1):
/// the server hello agreeing to it, then `first` as the exit's first chunk
/// (a status, or whatever a test wants there), then (unless `first` is a
/// refusal) `plaintext` and the end chunk.
fn connect_status_entry_stream(plaintext: &[u8], first: &[u8]) -> Vec<u8> {
    let (_, _, acc) = fuzz_hello(super::fuzz::FUZZ_CLIENT_SALT, FLAG_CONNECT_STATUS);
    assert!(acc.connect_status);
    let mut enc = acc.encoder;
    let mut s = acc.server_hello.to_vec();
    enc.seal_to_vec(first, &mut s).unwrap();
    if first == [STATUS_OK] || first.len() != 1 {
        enc.seal_to_vec(plaintext, &mut s).unwrap();
        enc.end_to_vec(&mut s).unwrap();
    }
    s
}

/// docs/PROTOCOL.md §3.1 through the entry's fuzz entry point: under a
/// connect status the exit's first chunk must be a one-byte status; 0 is
/// followed by the session, a refusal ends the tunnel with nothing taken
/// as plaintext, and a first chunk that is not a status fails it.
#[test]
fn the_connect_status_through_the_fuzz_entry_point() {
    use super::fuzz::entry_side;
    let data = Rng(5).bytes(20_000);
    let out = entry_side(&connect_status_entry_stream(&data, &[STATUS_OK]), &[777]);
    assert!(out.answered && out.ended && !out.failed, "{out:?}");
    assert!(out.plaintext == data && out.sessions == 1 && out.refused.is_none());
    let out = entry_side(
        &connect_status_entry_stream(&data, &[STATUS_NO_UPSTREAM]),
        &[777],
    );
    assert!(!out.failed && out.plaintext.is_empty(), "{out:?}");
    assert_eq!(out.refused, Some(STATUS_NO_UPSTREAM));
    // Data where the status must be: two bytes, or the whole reply.
    for first in [&[0u8, 0][..], &data[..100]] {
        let out = entry_side(&connect_status_entry_stream(&data, first), &[777]);
        assert!(out.failed && out.plaintext.is_empty(), "{out:?}");
    }
    mutated_replies(
        &mut Rng(6),
        &data,
        &connect_status_entry_stream(&data, &[STATUS_OK]),
    );
}

/// A hello from the fuzz key (client salt `salt`, `flags`, no `meta`), and
/// an exit's acceptance of it under [`FUZZ_SERVER_SALT`].
fn fuzz_hello(salt: [u8; 32], flags: u8) -> (ClientHandshake, [u8; CLIENT_HELLO_LEN], Accepted) {
    fuzz_hello_with_meta(salt, b"", flags)
}

/// [`fuzz_hello`] carrying `meta`.
fn fuzz_hello_with_meta(
    salt: [u8; 32],
    meta: &[u8],
    flags: u8,
) -> (ClientHandshake, [u8; CLIENT_HELLO_LEN], Accepted) {
    let key = Psk::from_bytes(FUZZ_PSK);
    let (client, hello) =
        ClientHandshake::start_with_flags(&key, salt, FUZZ_NOW, meta, flags).unwrap();
    let acc = accept_hello(
        std::slice::from_ref(&key),
        &hello,
        FUZZ_SERVER_SALT,
        FUZZ_NOW,
        120,
    )
    .unwrap();
    (client, hello, acc)
}

/// The plaintexts of the `valid-keepalive` seeds, one per session: empty,
/// short, and more than one chunk.
fn keepalive_sessions() -> Vec<Vec<u8>> {
    let mut rng = Rng(17);
    vec![rng.bytes(0), rng.bytes(300), rng.bytes(MAX_PAYLOAD + 5)]
}

/// An entry→exit stream on a keep-alive tunnel: the hello (offering
/// keep-alive), the key confirmation, then each session's data and end
/// chunk, each session after the first opened by a start chunk (flags 0,
/// `meta` holding the session's number as its connection ID).
fn keepalive_exit_stream(sessions: &[Vec<u8>]) -> Vec<u8> {
    let (client, hello, acc) = fuzz_hello([8; 32], FLAG_KEEPALIVE);
    let mut session = client.finish_session(&acc.server_hello).unwrap();
    assert!(session.keepalive);
    let enc = &mut session.encoder;
    let mut s = hello.to_vec();
    let mut confirm = [0u8; CONFIRM_LEN];
    enc.seal_confirm(&mut confirm).unwrap();
    s.extend_from_slice(&confirm);
    for (i, data) in sessions.iter().enumerate() {
        if i > 0 {
            enc.next_session();
            let (meta, meta_len) = meta::Meta {
                client: None,
                destination: None,
                id: Some(i as u128),
                patience: None,
            }
            .encode();
            let (start, len) = keepalive::start_payload(0, &meta[..meta_len]).unwrap();
            enc.seal_to_vec(&start[..len], &mut s).unwrap();
        }
        enc.seal_to_vec(data, &mut s).unwrap();
        enc.end_to_vec(&mut s).unwrap();
    }
    s
}

/// An exit→entry stream on a keep-alive tunnel: the server hello (agreeing
/// to keep-alive), each session's data and end chunk, each session after
/// the first opened by status 0; then, if `last` is not 0, that status (a
/// refusal or "going away", which ends the tunnel).
fn keepalive_entry_stream(sessions: &[Vec<u8>], last: u8) -> Vec<u8> {
    let (_, _, acc) = fuzz_hello(super::fuzz::FUZZ_CLIENT_SALT, FLAG_KEEPALIVE);
    assert!(acc.keepalive);
    let mut enc = acc.encoder;
    let mut s = acc.server_hello.to_vec();
    for (i, data) in sessions.iter().enumerate() {
        if i > 0 {
            enc.next_session();
            enc.seal_to_vec(&[STATUS_OK], &mut s).unwrap();
        }
        enc.seal_to_vec(data, &mut s).unwrap();
        enc.end_to_vec(&mut s).unwrap();
    }
    if last != STATUS_OK {
        enc.next_session();
        enc.seal_to_vec(&[last], &mut s).unwrap();
    }
    s
}

/// docs/PROTOCOL.md §4.1 through the fuzz entry points: every session of a
/// keep-alive tunnel decodes, on both sides; a stream cut anywhere never
/// ends cleanly unless it was cut at a session boundary (then it holds
/// exactly the sessions before the cut); a malformed start or status, or
/// an end chunk where one must be, fails the tunnel; and no mutation yields
/// plaintext that was not sent.
#[test]
fn keepalive_sessions_through_the_fuzz_entry_points() {
    use super::fuzz::entry_side;
    let sessions = keepalive_sessions();
    let all: Vec<u8> = sessions.concat();
    let exit_stream = keepalive_exit_stream(&sessions);
    let out = exit_side(&exit_stream, &[1000, 7, 20_000]);
    assert!(out.answered && out.ended && !out.failed, "{out:?}");
    assert_eq!((out.sessions, out.refused), (3, None));
    assert!(out.plaintext == all);
    for last in [STATUS_OK, STATUS_GOING_AWAY, STATUS_NO_UPSTREAM] {
        let stream = keepalive_entry_stream(&sessions, last);
        let out = entry_side(&stream, &[333, 4096]);
        assert!(
            out.answered && !out.failed && out.plaintext == all,
            "{out:?}"
        );
        assert_eq!(out.sessions, 3);
        assert_eq!(out.refused, (last != STATUS_OK).then_some(last));
    }

    // Cut anywhere: a clean end only at a boundary, with what came before.
    let ends: Vec<usize> = (1..=sessions.len())
        .map(|n| keepalive_exit_stream(&sessions[..n]).len())
        .collect();
    for cut in (BODY..exit_stream.len()).step_by(97).chain(ends.clone()) {
        let out = exit_side(&exit_stream[..cut], &[512]);
        assert!(!out.failed && all.starts_with(&out.plaintext), "cut {cut}");
        match ends.iter().position(|&e| e == cut) {
            Some(n) => assert!(out.ended && out.sessions == n + 1, "cut {cut}: {out:?}"),
            None => assert!(!out.ended, "cut {cut} ended cleanly"),
        }
    }

    // A malformed start (66 bytes, or none: an end chunk where a start must
    // be) fails the tunnel at the exit; a two-byte status at the entry.
    for bad in [vec![0u8; keepalive::START_MAX + 1], Vec::new()] {
        let (client, _, acc) = fuzz_hello([8; 32], FLAG_KEEPALIVE);
        let mut enc = client.finish_session(&acc.server_hello).unwrap().encoder;
        let mut wire = Vec::new();
        enc.seal_to_vec(b"one", &mut wire).unwrap();
        enc.end_to_vec(&mut wire).unwrap();
        enc.next_session();
        if bad.is_empty() {
            enc.end_to_vec(&mut wire).unwrap();
        } else {
            enc.seal_to_vec(&bad, &mut wire).unwrap();
            enc.seal_to_vec(b"two", &mut wire).unwrap();
        }
        let mut out = FuzzOutcome::default();
        let ok = drive_decoder(
            acc.decoder,
            &wire,
            &[4096],
            (After::Nothing, After::Start),
            &mut out,
        );
        assert!(
            !ok && out.plaintext == b"one",
            "{} bytes: {out:?}",
            bad.len()
        );
    }
    let (_, _, acc) = fuzz_hello(super::fuzz::FUZZ_CLIENT_SALT, FLAG_KEEPALIVE);
    let mut enc = acc.encoder;
    let mut stream = acc.server_hello.to_vec();
    enc.seal_to_vec(b"one", &mut stream).unwrap();
    enc.end_to_vec(&mut stream).unwrap();
    enc.next_session();
    enc.seal_to_vec(&[0, 0], &mut stream).unwrap();
    let out = entry_side(&stream, &[4096]);
    assert!(
        out.failed && out.sessions == 1 && out.plaintext == b"one",
        "{out:?}"
    );

    // Mutations: never foreign plaintext, never more sessions than sent.
    let mut rng = Rng(2024);
    for _ in 0..300 {
        let mut s = exit_stream.clone();
        let i = BODY + rng.below(s.len() - BODY);
        s[i] ^= rng.next() as u8 | 1;
        let out = exit_side(&s, &[4096]);
        assert!(
            all.starts_with(&out.plaintext) && out.sessions <= 3,
            "{out:?}"
        );
    }
}

/// The plaintext of the `valid-large` seeds: a generator seed and a length
/// that takes two full large chunks and a partial one.
const LARGE_SEED: u64 = 7;
const LARGE_SEED_LEN: usize = 2 * LARGE_PAYLOAD + 1000;

/// Replays the checked-in entry-side seeds.
#[test]
fn entry_fuzz_corpus_replays_cleanly() {
    use super::fuzz::entry_side;
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fuzz/corpus/entry_stream"
    );
    let (mut ended, mut sessions) = (0, 0);
    for entry in std::fs::read_dir(dir).unwrap() {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        let (first, stream) = data.split_first().unwrap();
        let s = usize::from(*first);
        let out = entry_side(stream, &[s + 1, s * 61 + 7, MAX_FRAME]);
        ended += usize::from(out.ended);
        sessions += out.sessions;
    }
    assert!(ended >= 8, "seeds no longer decode: {ended}");
    // valid-keepalive: three sessions on one tunnel.
    assert!(
        sessions >= ended + 2,
        "the keep-alive seed no longer decodes"
    );
}

/// Replays every checked-in seed through the fuzz entry point. The
/// `valid-N` seeds are valid streams (see `write_fuzz_seeds`): each must be
/// answered, decode to exactly the plaintext it was made from, and end
/// cleanly. Any other seed only has to keep the entry point's invariants.
#[test]
fn fuzz_corpus_replays_cleanly() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fuzz/corpus/exit_stream");
    // The plaintexts `write_fuzz_seeds` sealed into valid-0 .. valid-5.
    let mut rng = Rng(99);
    let expected: Vec<Vec<u8>> = [0usize, 1, 100, 16_384, 16_385, 40_000]
        .into_iter()
        .map(|len| rng.bytes(len))
        .collect();
    let mut valid = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        let data = std::fs::read(entry.path()).unwrap();
        let (first, stream) = data.split_first().unwrap();
        let s = usize::from(*first);
        let out = exit_side(stream, &[s + 1, s * 61 + 7, MAX_FRAME]);
        let Some(i) = name.strip_prefix("valid-") else {
            continue;
        };
        let large = Rng(LARGE_SEED).bytes(LARGE_SEED_LEN);
        let keepalive = keepalive_sessions().concat();
        let plaintext = match i {
            "large" => &large,
            "keepalive" => {
                assert_eq!(out.sessions, 3, "{name}");
                &keepalive
            }
            i => &expected[i.parse::<usize>().unwrap()],
        };
        assert!(
            out.answered && out.ended && !out.failed,
            "{name}: answered {} ended {} failed {}",
            out.answered,
            out.ended,
            out.failed
        );
        assert!(
            out.plaintext == *plaintext,
            "{name}: {} plaintext bytes, want {}",
            out.plaintext.len(),
            plaintext.len()
        );
        valid += 1;
    }
    assert_eq!(valid, expected.len() + 2, "valid seeds missing");
}

/// A valid exit→entry stream for [`entry_side`]: server hello + chunks + end.
fn entry_fuzz_stream(plaintext: &[u8]) -> Vec<u8> {
    entry_fuzz_stream_with(plaintext, false)
}

/// [`entry_fuzz_stream`], the exit agreeing to large chunks (`large`) or
/// not; [`entry_side`]'s entry offers them.
fn entry_fuzz_stream_with(plaintext: &[u8], large: bool) -> Vec<u8> {
    let flags = if large { FLAG_LARGE_CHUNKS } else { 0 };
    let (_, _, acc) = fuzz_hello(super::fuzz::FUZZ_CLIENT_SALT, flags);
    let mut enc = acc.encoder;
    let mut s = acc.server_hello.to_vec();
    enc.seal_to_vec(plaintext, &mut s).unwrap();
    enc.end_to_vec(&mut s).unwrap();
    s
}

#[test]
fn entry_fuzz_entry_point_on_valid_truncated_and_mutated_replies() {
    let mut rng = Rng(4321);
    // Without and with large chunks (docs/PROTOCOL.md §4).
    for (len, large) in [(30_000, false), (2 * LARGE_PAYLOAD + 300, true)] {
        let data = rng.bytes(len);
        let stream = entry_fuzz_stream_with(&data, large);
        mutated_replies(&mut rng, &data, &stream);
    }
}

fn mutated_replies(rng: &mut Rng, data: &[u8], stream: &[u8]) {
    use super::fuzz::entry_side;
    let clean = entry_side(stream, &[777]);
    assert!(clean.answered && clean.ended && !clean.failed && clean.plaintext == data);
    for cut in (0..stream.len()).step_by(101) {
        let out = entry_side(&stream[..cut], &[500]);
        assert!(!out.ended && data.starts_with(&out.plaintext));
    }
    for _ in 0..300 {
        let mut s = stream.to_vec();
        let i = rng.below(s.len());
        let v = rng.next() as u8 | 1;
        s[i] ^= v;
        let out = entry_side(&s, &[4096]);
        assert!(
            data.starts_with(&out.plaintext),
            "mutation produced foreign plaintext"
        );
        if i < SERVER_HELLO_LEN {
            assert!(!out.answered, "a forged server hello verified");
        }
    }
}

/// PROTOCOL.md §4: the entry's first chunk is the key confirmation, and
/// only a confirmation from this session's keys opens.
#[test]
fn key_confirmation_is_the_first_chunk_and_nothing_else_passes_for_it() {
    let (mut ce, _, _, mut sd) = pair(&psk(6));
    let mut confirm = [0u8; CONFIRM_LEN];
    ce.seal_confirm(&mut confirm).unwrap();
    sd.open_confirm(&mut confirm.clone()).unwrap();
    // Data follows at n = 1.
    let mut wire = Vec::new();
    ce.seal_to_vec(b"after", &mut wire).unwrap();
    assert_eq!(sd.open_all(wire).unwrap().0, b"after");
    // A data chunk in its place is refused, and the decoder stays dead.
    let (mut ce, _, _, mut sd) = pair(&psk(6));
    let mut data = Vec::new();
    ce.seal_to_vec(b"sixteen bytes!!!", &mut data).unwrap();
    let mut head: [u8; CONFIRM_LEN] = data[..CONFIRM_LEN].try_into().unwrap();
    assert_eq!(sd.open_confirm(&mut head), Err(ProtoError::BadConfirm));
    assert!(sd.decode(&mut data.clone()).is_err());
    // Every single bit flip of a real confirmation is refused.
    for byte in 0..CONFIRM_LEN {
        for bit in 0..8 {
            let (mut ce, _, _, mut sd) = pair(&psk(6));
            let mut c = [0u8; CONFIRM_LEN];
            ce.seal_confirm(&mut c).unwrap();
            c[byte] ^= 1 << bit;
            assert_eq!(sd.open_confirm(&mut c), Err(ProtoError::BadConfirm));
        }
    }
    // A confirmation from another session (another server salt) is refused.
    let key = psk(6);
    let (client, hello) = ClientHandshake::start(&key, [1; 32], 1000, b"").unwrap();
    let first = accept_hello(std::slice::from_ref(&key), &hello, [2; 32], 1000, 120).unwrap();
    let (mut ce, _) = client.finish(&first.server_hello).unwrap();
    let mut c = [0u8; CONFIRM_LEN];
    ce.seal_confirm(&mut c).unwrap();
    let mut other = accept_hello(std::slice::from_ref(&key), &hello, [9; 32], 1000, 120)
        .unwrap()
        .decoder;
    assert_eq!(other.open_confirm(&mut c), Err(ProtoError::BadConfirm));
}

/// PROTOCOL.md §5: a hello of another version (here 1) is invalid: an
/// error, so the exit says nothing.
#[test]
fn a_version_1_hello_is_refused() {
    use super::aead::AeadBackend;
    let key = psk(8);
    let salt = [5u8; 32];
    let mut hello = [0u8; CLIENT_HELLO_LEN];
    hello[..SALT_LEN].copy_from_slice(&salt);
    let pt = &mut hello[SALT_LEN..SALT_LEN + CLIENT_HELLO_PT];
    pt[0] = 1;
    pt[2..10].copy_from_slice(&1000u64.to_be_bytes());
    let tag = schedule::client_hello_cipher(&key, &salt)
        .seal(super::aead::nonce_bytes(0), &salt, pt)
        .unwrap();
    hello[SALT_LEN + CLIENT_HELLO_PT..].copy_from_slice(&tag);
    assert!(matches!(
        accept_hello(std::slice::from_ref(&key), &hello, [2; 32], 1000, 120),
        Err(ProtoError::Version(1))
    ));
}

#[test]
fn a_refusal_is_authenticated_and_only_offered_to_a_hello_that_allows_it() {
    use crate::proto::{
        accept_hello_with, FLAG_LARGE_CHUNKS, FLAG_MAY_REFUSE, STATUS_NO_UPSTREAM, STATUS_OK,
    };
    let key = psk(9);
    let keys = std::slice::from_ref(&key);
    // The exit sees the hello's flags and refuses (docs/PROTOCOL.md §3).
    let (client, hello) =
        ClientHandshake::start_with_flags(&key, [1; 32], 10, b"", FLAG_MAY_REFUSE).unwrap();
    let mut seen = None;
    let acc = accept_hello_with(keys, &hello, [2; 32], 10, 120, FLAG_LARGE_CHUNKS, |f| {
        seen = Some(f);
        STATUS_NO_UPSTREAM
    })
    .unwrap();
    assert_eq!(seen, Some(FLAG_MAY_REFUSE));
    assert_eq!(
        (acc.flags, acc.status),
        (FLAG_MAY_REFUSE, STATUS_NO_UPSTREAM)
    );
    assert!(matches!(
        client.finish(&acc.server_hello),
        Err(ProtoError::Refused(STATUS_NO_UPSTREAM))
    ));
    // The status is sealed: a man in the middle cannot turn a refusal into
    // an acceptance, or the reverse (any flipped bit fails the tag).
    let (client, hello) = ClientHandshake::start(&key, [3; 32], 10, b"").unwrap();
    let acc = accept_hello_with(keys, &hello, [4; 32], 10, 120, FLAG_LARGE_CHUNKS, |_| {
        STATUS_OK
    })
    .unwrap();
    assert_eq!(acc.flags, 0, "start() sends no flags");
    let mut flipped = acc.server_hello;
    flipped[SALT_LEN + 1] ^= STATUS_NO_UPSTREAM;
    let (client2, _) = ClientHandshake::start(&key, [3; 32], 10, b"").unwrap();
    assert!(matches!(
        client2.finish(&flipped),
        Err(ProtoError::BadServerHello)
    ));
    assert!(client.finish(&acc.server_hello).is_ok());
    // The plain accept_hello never refuses.
    let (_, hello) =
        ClientHandshake::start_with_flags(&key, [5; 32], 10, b"", FLAG_MAY_REFUSE).unwrap();
    assert_eq!(
        accept_hello(keys, &hello, [6; 32], 10, 120).unwrap().status,
        STATUS_OK
    );
}

/// Large chunks (docs/PROTOCOL.md §2–§4) only when the hello offers them and
/// the exit accepts: both directions then carry up to LARGE_PAYLOAD, and a
/// side that did not agree rejects a large length from the header alone.
#[test]
fn large_chunks_only_when_both_hellos_agree() {
    use crate::proto::{
        accept_hello_with, FLAG_LARGE_CHUNKS, FLAG_MAY_REFUSE, LARGE_FRAME, LARGE_PAYLOAD,
        SERVER_FLAG_LARGE_CHUNKS, STATUS_OK,
    };
    let key = psk(11);
    let keys = std::slice::from_ref(&key);
    for (offer, accept) in [(false, false), (true, false), (false, true), (true, true)] {
        let flags = FLAG_MAY_REFUSE | if offer { FLAG_LARGE_CHUNKS } else { 0 };
        let (client, hello) =
            ClientHandshake::start_with_flags(&key, [1; 32], 10, b"", flags).unwrap();
        let accepted = if accept { FLAG_LARGE_CHUNKS } else { 0 };
        let acc =
            accept_hello_with(keys, &hello, [2; 32], 10, 120, accepted, |_| STATUS_OK).unwrap();
        let both = offer && accept;
        // The answer's flag byte, as an independent reader would see it.
        let pt = server_hello_plaintext(&key, &acc.server_hello);
        let want = if both { SERVER_FLAG_LARGE_CHUNKS } else { 0 };
        assert_eq!((pt[2], pt[3]), (want, 0), "offer {offer} accept {accept}");
        let (mut ce, mut cd) = client.finish(&acc.server_hello).unwrap();
        let (mut se, mut sd) = (acc.encoder, acc.decoder);
        let max = if both { LARGE_PAYLOAD } else { MAX_PAYLOAD };
        for m in [
            ce.max_payload(),
            cd.max_payload(),
            se.max_payload(),
            sd.max_payload(),
        ] {
            assert_eq!(m, max, "offer {offer} accept {accept}");
        }
        // The confirmation, then the largest chunk each way, in one piece.
        let mut confirm = [0u8; CONFIRM_LEN];
        ce.seal_confirm(&mut confirm).unwrap();
        sd.open_confirm(&mut confirm).unwrap();
        let data = Rng(u64::from(max as u32)).bytes(max);
        for (enc, dec) in [(&mut ce, &mut sd), (&mut se, &mut cd)] {
            let mut wire = Vec::new();
            enc.seal_to_vec(&data, &mut wire).unwrap();
            assert_eq!(wire.len(), LEN_LEN + max + TAG_LEN, "one chunk");
            assert!(wire.len() <= LARGE_FRAME);
            assert_eq!(dec.open_all(wire).unwrap(), (data.clone(), false, 0));
            // One byte above the maximum is refused before any body byte.
            let mut field = enc.forge_length((max + 1) as u16);
            assert_eq!(dec.decode(&mut field), Err(ProtoError::BadLength(max + 1)));
        }
    }
}

/// A peer that sends a large chunk to a decoder that did not agree to them
/// (an older exit or entry, or `--large-chunks=false`) is cut off at the
/// header: large chunks never reach a side that has no room for them.
#[test]
fn a_large_chunk_to_a_side_that_did_not_agree_is_refused() {
    use crate::proto::LARGE_PAYLOAD;
    let (mut ce, _, _, mut sd) = pair(&psk(12));
    ce.allow_large();
    let mut wire = Vec::new();
    ce.seal_to_vec(&vec![7u8; LARGE_PAYLOAD], &mut wire)
        .unwrap();
    assert_eq!(
        sd.decode(&mut wire),
        Err(ProtoError::BadLength(LARGE_PAYLOAD))
    );
}

/// Keep-alive (docs/PROTOCOL.md §2–§4.1) only when the hello offers it and
/// the exit accepts; after both end chunks the same keys and counters carry
/// the next session's start, status and data, and without `next_session`
/// a chunk after the end is still `DataAfterEnd`.
#[test]
fn keepalive_only_when_both_hellos_agree_and_sessions_follow_each_other() {
    use crate::proto::keepalive::{parse_start, parse_status, start_payload};
    use crate::proto::{
        accept_hello_with, ProtoError, FLAG_KEEPALIVE, FLAG_LARGE_CHUNKS, SERVER_FLAG_KEEPALIVE,
        STATUS_OK,
    };
    let key = psk(12);
    let keys = std::slice::from_ref(&key);
    for (offer, accept) in [(false, false), (true, false), (false, true), (true, true)] {
        let flags = if offer { FLAG_KEEPALIVE } else { 0 };
        let (client, hello) =
            ClientHandshake::start_with_flags(&key, [1; 32], 10, b"", flags).unwrap();
        let accepted = FLAG_LARGE_CHUNKS | if accept { FLAG_KEEPALIVE } else { 0 };
        let acc =
            accept_hello_with(keys, &hello, [2; 32], 10, 120, accepted, |_| STATUS_OK).unwrap();
        let both = offer && accept;
        assert_eq!(acc.keepalive, both, "offer {offer} accept {accept}");
        let pt = server_hello_plaintext(&key, &acc.server_hello);
        let want = if both { SERVER_FLAG_KEEPALIVE } else { 0 };
        assert_eq!(pt[2], want, "offer {offer} accept {accept}");
        let session = client.finish_session(&acc.server_hello).unwrap();
        assert_eq!(session.keepalive, both);
        if !both {
            continue;
        }
        let (mut ce, mut cd) = (session.encoder, session.decoder);
        let (mut se, mut sd) = (acc.encoder, acc.decoder);
        let mut confirm = [0u8; CONFIRM_LEN];
        ce.seal_confirm(&mut confirm).unwrap();
        sd.open_confirm(&mut confirm).unwrap();
        // Session 1, both ways, then the next session's start right behind
        // the end chunk in the same read.
        let mut up = Vec::new();
        ce.seal_to_vec(b"one", &mut up).unwrap();
        ce.end_to_vec(&mut up).unwrap();
        ce.next_session();
        let (start, len) = start_payload(0x01, b"\x03\x01\x07").unwrap();
        ce.seal_to_vec(&start[..len], &mut up).unwrap();
        ce.seal_to_vec(b"two", &mut up).unwrap();
        let (data, ended, rest) = sd.open_all(up.clone()).unwrap();
        assert_eq!((&data[..], ended), (&b"one"[..], true));
        // Without next_session, what follows the end is fatal.
        let mut strict = sd_clone_after_end(&key);
        assert_eq!(
            strict.decode(&mut up[up.len() - rest..].to_vec()),
            Err(ProtoError::DataAfterEnd)
        );
        sd.next_session();
        let tail = up[up.len() - rest..].to_vec();
        let mut pos = 0;
        let mut chunks = Vec::new();
        let mut tail = tail;
        while pos < tail.len() {
            match sd.decode(&mut tail[pos..]).unwrap() {
                Decoded::Data {
                    consumed,
                    start,
                    len,
                } => {
                    chunks.push(tail[pos + start..pos + start + len].to_vec());
                    pos += consumed;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            parse_start(&chunks[0]).unwrap(),
            (0x01, &b"\x03\x01\x07"[..])
        );
        assert_eq!(chunks[1], b"two");
        // The exit's side: session 1's end, then the status of session 2.
        let mut down = Vec::new();
        se.end_to_vec(&mut down).unwrap();
        se.next_session();
        se.seal_to_vec(&[STATUS_OK], &mut down).unwrap();
        let (data, ended, rest) = cd.open_all(down.clone()).unwrap();
        assert!(data.is_empty() && ended);
        cd.next_session();
        let (data, ended, _) = cd.open_all(down[down.len() - rest..].to_vec()).unwrap();
        assert_eq!((parse_status(&data).unwrap(), ended), (STATUS_OK, false));
    }
}

/// A decoder that has seen its end chunk (the exit's c2s decoder of a fresh
/// session), for checking what follows the end without `next_session`.
fn sd_clone_after_end(key: &Psk) -> Decoder {
    let keys = std::slice::from_ref(key);
    let (client, hello) = ClientHandshake::start(key, [5; 32], 10, b"").unwrap();
    let acc = accept_hello(keys, &hello, [6; 32], 10, 120).unwrap();
    let (mut ce, _) = client.finish(&acc.server_hello).unwrap();
    let mut sd = acc.decoder;
    let mut confirm = [0u8; CONFIRM_LEN];
    ce.seal_confirm(&mut confirm).unwrap();
    sd.open_confirm(&mut confirm).unwrap();
    let mut up = Vec::new();
    ce.end_to_vec(&mut up).unwrap();
    assert!(sd.open_all(up).unwrap().1);
    sd
}

/// A server hello's plaintext (docs/PROTOCOL.md §3), opened as an
/// independent reader would: client salt `[1; 32]`, server salt `[2; 32]`.
fn server_hello_plaintext(key: &Psk, hello: &[u8; SERVER_HELLO_LEN]) -> [u8; SERVER_HELLO_PT] {
    let schedule = super::schedule::session(key, &[1; 32], &[2; 32]);
    let mut pt = [0u8; SERVER_HELLO_PT];
    pt.copy_from_slice(&hello[SALT_LEN..SALT_LEN + SERVER_HELLO_PT]);
    schedule
        .server_hello
        .open(
            super::aead::nonce_bytes(0),
            &[1; 32],
            &mut pt,
            &hello[SALT_LEN + SERVER_HELLO_PT..],
        )
        .unwrap();
    pt
}
