#!/usr/bin/env python3
"""An independent implementation of the shardproxy tunnel protocol (entry side).

Written from docs/PROTOCOL.md alone, with OpenSSL's ChaCha20-Poly1305 and
HKDF through the `cryptography` package. It shares no code with the Rust
implementation, so agreement proves the spec is complete and followed.

Usage:
  tunnel_client.py vectors DOC           recompute docs/PROTOCOL.md's test vector
  tunnel_client.py send ADDR KEYB64 MSG  handshake with an exit, send MSG, half-close,
                                         print the reply (hex) and how it ended
"""
import base64
import os
import socket
import struct
import sys
import time

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

MAX_PAYLOAD = 16384


def hkdf_extract(salt, ikm):
    h = hmac.HMAC(salt, hashes.SHA256())
    h.update(ikm)
    return h.finalize()


def hkdf_expand(prk, info, length=32):
    # RFC 5869 expand; one block suffices for 32 bytes.
    h = hmac.HMAC(prk, hashes.SHA256())
    h.update(info + b"\x01")
    return h.finalize()[:length]


def nonce(n):
    return struct.pack("<Q", n) + b"\x00" * 4


def client_hello(psk, client_salt, unix_time, meta=b""):
    key = hkdf_expand(hkdf_extract(client_salt, psk), b"shardproxy/1 client hello")
    pt = bytes([1, 0]) + struct.pack(">Q", unix_time) + struct.pack(">H", len(meta))
    pt += meta.ljust(64, b"\x00")
    return key, client_salt + ChaCha20Poly1305(key).encrypt(nonce(0), pt, client_salt)


def session(psk, client_salt, server_salt):
    prk = hkdf_extract(client_salt + server_salt, psk)
    return {
        "server_hello_key": hkdf_expand(prk, b"shardproxy/1 server hello"),
        "c2s_key": hkdf_expand(prk, b"shardproxy/1 c2s"),
        "s2c_key": hkdf_expand(prk, b"shardproxy/1 s2c"),
    }


def verify_server_hello(keys, client_salt, answer):
    pt = ChaCha20Poly1305(keys["server_hello_key"]).decrypt(nonce(0), answer[32:], client_salt)
    if pt[0] != 1:
        raise ValueError("server hello version %d" % pt[0])


class Sealer:
    def __init__(self, key):
        self.aead, self.n = ChaCha20Poly1305(key), 0

    def chunk(self, payload):
        assert 1 <= len(payload) <= MAX_PAYLOAD
        head = self.aead.encrypt(nonce(self.n), struct.pack(">H", len(payload)), b"")
        body = self.aead.encrypt(nonce(self.n + 1), payload, b"")
        self.n += 2
        return head + body

    def end(self):
        head = self.aead.encrypt(nonce(self.n), b"\x00\x00", b"")
        self.n += 1
        return head


class Opener:
    def __init__(self, key):
        self.aead, self.n, self.buf = ChaCha20Poly1305(key), 0, b""

    def feed(self, data):
        """Returns (plaintext, ended). Raises on any authentication failure."""
        self.buf += data
        out = b""
        while len(self.buf) >= 18:
            (length,) = struct.unpack(">H", self.aead.decrypt(nonce(self.n), self.buf[:18], b""))
            if length == 0:
                self.n += 1
                self.buf = self.buf[18:]
                return out, True
            if length > MAX_PAYLOAD:
                raise ValueError("bad length")
            if len(self.buf) < 18 + length + 16:
                break  # header re-verified next time; that is harmless
            out += self.aead.decrypt(nonce(self.n + 1), self.buf[18:18 + length + 16], b"")
            self.n += 2
            self.buf = self.buf[18 + length + 16:]
        return out, False


def vectors(doc_path):
    psk = bytes(range(32))
    cs = bytes(range(0x40, 0x60))
    ss = bytes(range(0x80, 0xA0))
    hello_key, hello = client_hello(psk, cs, 1800000000)
    keys = session(psk, cs, ss)
    server_pt = bytes([1, 0, 0, 0])
    server_hello = ss + ChaCha20Poly1305(keys["server_hello_key"]).encrypt(nonce(0), server_pt, cs)
    sealer = Sealer(keys["c2s_key"])
    values = {
        "client_hello_key": hello_key,
        "client_hello": hello,
        "server_hello_key": keys["server_hello_key"],
        "server_hello": server_hello,
        "c2s_key": keys["c2s_key"],
        "s2c_key": keys["s2c_key"],
        "first_chunk": sealer.chunk(b"hello"),
        "end_chunk": sealer.end(),
    }
    doc = open(doc_path).read()
    missing = [k for k, v in values.items() if "%s: %s" % (k, v.hex()) not in doc]
    if missing:
        print("MISMATCH: " + ", ".join(missing))
        return 1
    print("vectors ok: %d values match %s" % (len(values), doc_path))
    return 0


def send(addr, key_b64, message):
    host, port = addr.rsplit(":", 1)
    psk = base64.b64decode(key_b64)
    cs = os.urandom(32)
    _, hello = client_hello(psk, cs, int(time.time()))
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(hello)
    answer = b""
    while len(answer) < 52:
        got = s.recv(52 - len(answer))
        if not got:
            print("closed before server hello")
            return 1
        answer += got
    keys = session(psk, cs, answer[:32])
    verify_server_hello(keys, cs, answer)
    sealer, opener = Sealer(keys["c2s_key"]), Opener(keys["s2c_key"])
    data = message.encode()
    for i in range(0, len(data), MAX_PAYLOAD):
        s.sendall(sealer.chunk(data[i:i + MAX_PAYLOAD]))
    s.sendall(sealer.end())
    s.shutdown(socket.SHUT_WR)
    reply, ended = b"", False
    while not ended:
        got = s.recv(65536)
        if not got:
            break
        pt, ended = opener.feed(got)
        reply += pt
    print("reply %s ended=%s" % (reply.hex(), ended))
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "vectors":
        sys.exit(vectors(sys.argv[2]))
    sys.exit(send(sys.argv[2], sys.argv[3], sys.argv[4]))
