//! The two hellos. The entry speaks first; the exit answers only after the
//! entry proved it holds a key, and never otherwise.

use super::aead::{nonce_bytes, AeadBackend};
use super::frame::{Decoder, Encoder};
use super::keys::Psk;
use super::schedule;
use super::{
    ProtoError, CLIENT_HELLO_LEN, CLIENT_HELLO_PT, FLAG_CONNECT_STATUS, FLAG_KEEPALIVE,
    FLAG_LARGE_CHUNKS, META_LEN, SALT_LEN, SERVER_FLAG_CONNECT_STATUS, SERVER_FLAG_KEEPALIVE,
    SERVER_FLAG_LARGE_CHUNKS, SERVER_HELLO_LEN, SERVER_HELLO_PT, STATUS_OK, TAG_LEN, VERSION,
};

/// A verified session, as the entry derives it from the exit's answer.
pub struct Session {
    /// entry→exit.
    pub encoder: Encoder,
    /// exit→entry.
    pub decoder: Decoder,
    /// Both hellos agreed on keep-alive ([`FLAG_KEEPALIVE`]): the
    /// connection may carry further sessions (docs/PROTOCOL.md §4.1).
    pub keepalive: bool,
    /// Both hellos agreed on a connect status ([`FLAG_CONNECT_STATUS`]):
    /// the exit's first chunk is a status (docs/PROTOCOL.md §3.1).
    pub connect_status: bool,
}

/// The entry's side of the handshake, between sending its hello and
/// receiving the exit's.
pub struct ClientHandshake {
    psk: Psk,
    client_salt: [u8; SALT_LEN],
    /// The hello's flags ([`FLAG_LARGE_CHUNKS`] is honoured only if sent).
    flags: u8,
}

impl ClientHandshake {
    /// Builds the client hello. `meta` (at most [`META_LEN`] bytes) travels
    /// authenticated and encrypted; `now_unix_ms` is the wall clock in
    /// milliseconds since the Unix epoch (protocol v2; v1 used seconds).
    pub fn start(
        psk: &Psk,
        client_salt: [u8; SALT_LEN],
        now_unix_ms: u64,
        meta: &[u8],
    ) -> Result<(ClientHandshake, [u8; CLIENT_HELLO_LEN]), ProtoError> {
        Self::start_with_flags(psk, client_salt, now_unix_ms, meta, 0)
    }

    /// [`ClientHandshake::start`] with the hello's `flags` byte
    /// ([`super::FLAG_MAY_REFUSE`], [`FLAG_LARGE_CHUNKS`]; docs/PROTOCOL.md
    /// §2).
    pub fn start_with_flags(
        psk: &Psk,
        client_salt: [u8; SALT_LEN],
        now_unix_ms: u64,
        meta: &[u8],
        flags: u8,
    ) -> Result<(ClientHandshake, [u8; CLIENT_HELLO_LEN]), ProtoError> {
        if meta.len() > META_LEN {
            return Err(ProtoError::MetaTooLong);
        }
        let mut hello = [0u8; CLIENT_HELLO_LEN];
        hello[..SALT_LEN].copy_from_slice(&client_salt);
        let pt = &mut hello[SALT_LEN..SALT_LEN + CLIENT_HELLO_PT];
        pt[0] = VERSION;
        pt[1] = flags;
        pt[2..10].copy_from_slice(&now_unix_ms.to_be_bytes());
        pt[10..12].copy_from_slice(&(meta.len() as u16).to_be_bytes());
        pt[12..12 + meta.len()].copy_from_slice(meta);
        let cipher = schedule::client_hello_cipher(psk, &client_salt);
        let tag = cipher
            .seal(nonce_bytes(0), &client_salt, pt)
            .map_err(|_| ProtoError::BadHello)?;
        hello[SALT_LEN + CLIENT_HELLO_PT..].copy_from_slice(&tag);
        Ok((
            ClientHandshake {
                psk: psk.clone(),
                client_salt,
                flags,
            },
            hello,
        ))
    }

    /// Verifies the exit's hello and derives the session: an encoder for
    /// entry→exit and a decoder for exit→entry, both allowing chunks of up
    /// to [`super::LARGE_PAYLOAD`] bytes if our hello offered them and the
    /// answer carries [`SERVER_FLAG_LARGE_CHUNKS`] (docs/PROTOCOL.md §3). An
    /// authentic hello whose status is not [`STATUS_OK`] is
    /// [`ProtoError::Refused`].
    pub fn finish(
        self,
        server_hello: &[u8; SERVER_HELLO_LEN],
    ) -> Result<(Encoder, Decoder), ProtoError> {
        self.finish_session(server_hello)
            .map(|s| (s.encoder, s.decoder))
    }

    /// [`ClientHandshake::finish`], also saying whether both hellos agreed
    /// on keep-alive: our hello set [`FLAG_KEEPALIVE`] and the answer
    /// carries [`SERVER_FLAG_KEEPALIVE`].
    pub fn finish_session(
        self,
        server_hello: &[u8; SERVER_HELLO_LEN],
    ) -> Result<Session, ProtoError> {
        let mut server_salt = [0u8; SALT_LEN];
        server_salt.copy_from_slice(&server_hello[..SALT_LEN]);
        let ciphers = schedule::session(&self.psk, &self.client_salt, &server_salt);
        let mut pt = [0u8; SERVER_HELLO_PT];
        pt.copy_from_slice(&server_hello[SALT_LEN..SALT_LEN + SERVER_HELLO_PT]);
        let tag = &server_hello[SALT_LEN + SERVER_HELLO_PT..];
        ciphers
            .server_hello
            .open(nonce_bytes(0), &self.client_salt, &mut pt, tag)
            .map_err(|_| ProtoError::BadServerHello)?;
        if pt[0] != VERSION {
            return Err(ProtoError::Version(pt[0]));
        }
        if pt[1] != STATUS_OK {
            return Err(ProtoError::Refused(pt[1]));
        }
        let (mut encoder, mut decoder) = (Encoder::new(ciphers.c2s), Decoder::new(ciphers.s2c));
        // Byte 2 is the exit's flags; an older exit sends 0 there. Byte 3
        // stays reserved and is ignored.
        if self.flags & FLAG_LARGE_CHUNKS != 0 && pt[2] & SERVER_FLAG_LARGE_CHUNKS != 0 {
            encoder.allow_large();
            decoder.allow_large();
        }
        Ok(Session {
            encoder,
            decoder,
            keepalive: self.flags & FLAG_KEEPALIVE != 0 && pt[2] & SERVER_FLAG_KEEPALIVE != 0,
            connect_status: self.flags & FLAG_CONNECT_STATUS != 0
                && pt[2] & SERVER_FLAG_CONNECT_STATUS != 0,
        })
    }
}

/// What the exit learns from a verified client hello.
pub struct Accepted {
    /// The answer to send.
    pub server_hello: [u8; SERVER_HELLO_LEN],
    /// exit→entry encoder.
    pub encoder: Encoder,
    /// entry→exit decoder.
    pub decoder: Decoder,
    /// Which key of the set matched (for rotation metrics/logs).
    pub key_index: usize,
    /// The authenticated metadata block.
    pub meta: [u8; META_LEN],
    /// How many metadata bytes are meaningful.
    pub meta_len: usize,
    /// The hello's authenticated timestamp (Unix milliseconds).
    pub unix_ms: u64,
    /// The hello's flags byte ([`super::FLAG_MAY_REFUSE`],
    /// [`FLAG_LARGE_CHUNKS`]).
    pub flags: u8,
    /// The status `server_hello` carries ([`STATUS_OK`] unless the caller
    /// of [`accept_hello_with`] refused).
    pub status: u8,
    /// The answer agrees to keep-alive ([`SERVER_FLAG_KEEPALIVE`]).
    pub keepalive: bool,
    /// The answer agrees to a connect status
    /// ([`SERVER_FLAG_CONNECT_STATUS`]): the exit's first chunk must be a
    /// status chunk (docs/PROTOCOL.md §3.1).
    pub connect_status: bool,
}

/// Verifies a client hello against every key, checks its clock (both
/// times in Unix milliseconds, the allowed skew in seconds), and builds the
/// answer with the exit's fresh `server_salt`.
///
/// Returns an error, and nothing to send, for anything but a valid hello.
pub fn accept_hello(
    keys: &[Psk],
    hello: &[u8; CLIENT_HELLO_LEN],
    server_salt: [u8; SALT_LEN],
    now_unix_ms: u64,
    max_skew_secs: u64,
) -> Result<Accepted, ProtoError> {
    accept_hello_with(
        keys,
        hello,
        server_salt,
        now_unix_ms,
        max_skew_secs,
        FLAG_LARGE_CHUNKS | FLAG_KEEPALIVE | FLAG_CONNECT_STATUS,
        |_| STATUS_OK,
    )
}

/// [`accept_hello`], with the answer's status chosen by `status_for` from
/// the verified hello's flags (docs/PROTOCOL.md §3). It is called only for
/// a valid hello. `accept` holds the client hello flags the exit agrees to
/// when offered ([`accept_hello`] agrees to all three): with
/// [`FLAG_LARGE_CHUNKS`], an offer of large chunks is answered with
/// [`SERVER_FLAG_LARGE_CHUNKS`], and both directions' encoder and decoder
/// then allow chunks of up to [`super::LARGE_PAYLOAD`] bytes; with
/// [`FLAG_KEEPALIVE`], an offer of keep-alive is answered with
/// [`SERVER_FLAG_KEEPALIVE`] ([`Accepted::keepalive`]); with
/// [`FLAG_CONNECT_STATUS`], an offer of a connect status with
/// [`SERVER_FLAG_CONNECT_STATUS`] ([`Accepted::connect_status`]).
pub fn accept_hello_with(
    keys: &[Psk],
    hello: &[u8; CLIENT_HELLO_LEN],
    server_salt: [u8; SALT_LEN],
    now_unix_ms: u64,
    max_skew_secs: u64,
    accept: u8,
    status_for: impl FnOnce(u8) -> u8,
) -> Result<Accepted, ProtoError> {
    let mut client_salt = [0u8; SALT_LEN];
    client_salt.copy_from_slice(&hello[..SALT_LEN]);
    let tag = &hello[SALT_LEN + CLIENT_HELLO_PT..];
    let mut found = None;
    for (i, psk) in keys.iter().enumerate() {
        let mut pt = [0u8; CLIENT_HELLO_PT];
        pt.copy_from_slice(&hello[SALT_LEN..SALT_LEN + CLIENT_HELLO_PT]);
        let cipher = schedule::client_hello_cipher(psk, &client_salt);
        if cipher
            .open(nonce_bytes(0), &client_salt, &mut pt, tag)
            .is_ok()
        {
            found = Some((i, psk, pt));
            break;
        }
    }
    let (key_index, psk, pt) = found.ok_or(ProtoError::BadHello)?;
    if pt[0] != VERSION {
        return Err(ProtoError::Version(pt[0]));
    }
    let ts = u64::from_be_bytes(pt[2..10].try_into().expect("8 bytes"));
    if ts.abs_diff(now_unix_ms) > max_skew_secs.saturating_mul(1000) {
        return Err(ProtoError::ClockSkew);
    }
    let meta_len = u16::from_be_bytes([pt[10], pt[11]]) as usize;
    if meta_len > META_LEN {
        return Err(ProtoError::MetaTooLong);
    }
    let mut meta = [0u8; META_LEN];
    meta.copy_from_slice(&pt[12..12 + META_LEN]);
    let flags = pt[1];
    let status = status_for(flags);

    let ciphers = schedule::session(psk, &client_salt, &server_salt);
    let mut server_hello = [0u8; SERVER_HELLO_LEN];
    server_hello[..SALT_LEN].copy_from_slice(&server_salt);
    let body = &mut server_hello[SALT_LEN..SALT_LEN + SERVER_HELLO_PT];
    body[0] = VERSION;
    body[1] = status;
    let agreed = flags & accept;
    let large = agreed & FLAG_LARGE_CHUNKS != 0;
    let keepalive = agreed & FLAG_KEEPALIVE != 0;
    if large {
        body[2] |= SERVER_FLAG_LARGE_CHUNKS;
    }
    if keepalive {
        body[2] |= SERVER_FLAG_KEEPALIVE;
    }
    let connect_status = agreed & FLAG_CONNECT_STATUS != 0;
    if connect_status {
        body[2] |= SERVER_FLAG_CONNECT_STATUS;
    }
    let tag = ciphers
        .server_hello
        .seal(nonce_bytes(0), &client_salt, body)
        .map_err(|_| ProtoError::BadHello)?;
    server_hello[SALT_LEN + SERVER_HELLO_PT..SALT_LEN + SERVER_HELLO_PT + TAG_LEN]
        .copy_from_slice(&tag);
    let (mut encoder, mut decoder) = (Encoder::new(ciphers.s2c), Decoder::new(ciphers.c2s));
    if large {
        encoder.allow_large();
        decoder.allow_large();
    }
    Ok(Accepted {
        server_hello,
        encoder,
        decoder,
        key_index,
        meta,
        meta_len,
        unix_ms: ts,
        flags,
        status,
        keepalive,
        connect_status,
    })
}
