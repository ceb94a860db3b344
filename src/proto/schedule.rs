//! Key schedule: HKDF-SHA256 from the PSK and the two salts.

use super::aead::{Aead, AeadBackend};
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroize;

use super::frame::DirKeys;
use super::keys::Psk;
use super::SALT_LEN;

pub(crate) const INFO_CLIENT_HELLO: &[u8] = b"shardproxy/1 client hello";
pub(crate) const INFO_SERVER_HELLO: &[u8] = b"shardproxy/1 server hello";
pub(crate) const INFO_C2S: &[u8] = b"shardproxy/1 c2s";
pub(crate) const INFO_C2S_LEN: &[u8] = b"shardproxy/1 c2s length";
pub(crate) const INFO_S2C: &[u8] = b"shardproxy/1 s2c";
pub(crate) const INFO_S2C_LEN: &[u8] = b"shardproxy/1 s2c length";

/// Expands one 32-byte key and builds the cipher, wiping the raw key bytes.
fn cipher(hk: &Hkdf<Sha256>, info: &[u8]) -> Aead {
    let mut k = [0u8; 32];
    // 32 bytes is far below HKDF-SHA256's 8160-byte output limit.
    hk.expand(info, &mut k).expect("32-byte HKDF output");
    let c = Aead::new(&k);
    k.zeroize();
    c
}

/// Raw key bytes, for the test vectors in docs/PROTOCOL.md only.
#[cfg(test)]
pub(crate) fn raw(hk: &Hkdf<Sha256>, info: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 32];
    hk.expand(info, &mut k).unwrap();
    k
}

/// The client-hello key depends on the PSK and the client's salt only.
pub(crate) fn client_hello_hkdf(psk: &Psk, client_salt: &[u8; SALT_LEN]) -> Hkdf<Sha256> {
    Hkdf::<Sha256>::new(Some(client_salt), psk.bytes())
}

pub(crate) fn client_hello_cipher(psk: &Psk, client_salt: &[u8; SALT_LEN]) -> Aead {
    cipher(&client_hello_hkdf(psk, client_salt), INFO_CLIENT_HELLO)
}

/// Everything after the client hello depends on both salts.
pub(crate) fn session_hkdf(
    psk: &Psk,
    client_salt: &[u8; SALT_LEN],
    server_salt: &[u8; SALT_LEN],
) -> Hkdf<Sha256> {
    let mut salt = [0u8; 2 * SALT_LEN];
    salt[..SALT_LEN].copy_from_slice(client_salt);
    salt[SALT_LEN..].copy_from_slice(server_salt);
    Hkdf::<Sha256>::new(Some(&salt), psk.bytes())
}

/// The keys of a session: server hello, client→server, server→client.
pub(crate) struct SessionCiphers {
    pub server_hello: Aead,
    pub c2s: DirKeys,
    pub s2c: DirKeys,
}

fn dir_keys(hk: &Hkdf<Sha256>, data_info: &[u8], len_info: &[u8]) -> DirKeys {
    let mut len_key = zeroize::Zeroizing::new([0u8; 32]);
    hk.expand(len_info, &mut len_key[..])
        .expect("32-byte HKDF output");
    DirKeys {
        len_key,
        aead: cipher(hk, data_info),
    }
}

pub(crate) fn session(
    psk: &Psk,
    client_salt: &[u8; SALT_LEN],
    server_salt: &[u8; SALT_LEN],
) -> SessionCiphers {
    let hk = session_hkdf(psk, client_salt, server_salt);
    SessionCiphers {
        server_hello: cipher(&hk, INFO_SERVER_HELLO),
        c2s: dir_keys(&hk, INFO_C2S, INFO_C2S_LEN),
        s2c: dir_keys(&hk, INFO_S2C, INFO_S2C_LEN),
    }
}
