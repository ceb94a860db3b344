#!/usr/bin/env python3
"""An independent implementation of the shardproxy tunnel protocol (entry side).

Written from docs/PROTOCOL.md alone, with OpenSSL's ChaCha20-Poly1305 and
HKDF through the `cryptography` package. It shares no code with the Rust
implementation, so agreement proves the spec is complete and followed.

Usage:
  tunnel_client.py vectors DOC           recompute docs/PROTOCOL.md's test vector
  tunnel_client.py send ADDR KEYB64 MSG [N]
                                         handshake with an exit, send MSG N times,
                                         half-close, print the reply's SHA-256,
                                         length, and whether it ended cleanly
  tunnel_client.py after-end ADDR KEYB64 MSG
                                         as an entry: send MSG, the end chunk, then
                                         one more chunk (PROTOCOL.md §4 forbids it);
                                         print how the exit ended the connection
  tunnel_client.py no-confirm ADDR KEYB64 MSG
                                         as an entry: a valid hello, then data
                                         without the key confirmation
  tunnel_client.py abandon ADDR KEYB64 close|reset
                                         as an entry whose client went away: a
                                         valid hello, the server hello verified,
                                         then a FIN or an RST instead of the key
                                         confirmation
  tunnel_client.py stamped ADDR KEYB64 OFFSET_MS
                                         a valid session whose hello is stamped
                                         now + OFFSET_MS; prints the hello (hex)
  tunnel_client.py large ADDR KEYB64 NBYTES [off]
                                         as an entry offering large chunks (unless
                                         `off`): send NBYTES in chunks as large as
                                         agreed, half-close; print the exit's flag,
                                         the reply's SHA-256 and length, the
                                         largest chunk each way, how it ended
  tunnel_client.py fake-exit-large PORTFILE KEYB64 NBYTES
                                         as an exit: accept large chunks if the
                                         hello offers them, send NBYTES in chunks
                                         as large as agreed and the end chunk; read
                                         the entry's data to its end chunk; print
                                         what was agreed and the SHA-256 received
  tunnel_client.py keepalive ADDR KEYB64 MSG1 MSG2 [cross]
                                         as an entry offering keep-alive (§4.1):
                                         session 1 sends MSG1, session 2 (a start
                                         chunk, then MSG2) on the same connection;
                                         with `cross`, session 2 starts only once
                                         the exit has said something unprompted
                                         (its goodbye), unread; print what was
                                         agreed, each reply and session 2's status
  tunnel_client.py early-start ADDR KEYB64
                                         as an entry with keep-alive: session 1
                                         ("one" and its end chunk), then at once,
                                         before the exit's end chunk, a start and
                                         "early" (§4.1 forbids it); print how the
                                         exit ended the connection
  tunnel_client.py fake-exit-keepalive PORTFILE KEYB64 N [eof]
                                         as an exit agreeing to keep-alive: serve
                                         up to N sessions on one connection, each
                                         echoed back; print the sessions served and
                                         each start's flags and connection ID; with
                                         `eof`, close the tunnel (FIN, no status) at
                                         the first start instead
  tunnel_client.py connect-status ADDR KEYB64 MSG [PATIENCE_MS]
                                         as an entry offering a connect status
                                         (§3.1): send MSG and the end chunk; read
                                         the exit's first chunk as the status,
                                         then (status 0) the reply; print what was
                                         agreed, the status, the reply and how the
                                         exit ended the connection; with
                                         PATIENCE_MS, send it in the meta block
                                         (§2.1, type 4) and print whether the
                                         status came within it
  tunnel_client.py fake-exit-status PORTFILE KEYB64 STATUS|eof
                                         as an exit agreeing to a connect status:
                                         answer the first flight with STATUS; 0:
                                         echo the session; else FIN, and read the
                                         entry's data to its close; `eof`: FIN with
                                         no status; print what was offered and
                                         what happened
  tunnel_client.py fake-exit PORTFILE KEYB64 MSG
                                         as an exit, on 127.0.0.1 (port written to
                                         PORTFILE): answer one hello, send MSG, the
                                         end chunk, then one more chunk; print how
                                         the entry ended the connection
"""
import base64
import os
import socket
import struct
import sys
import time

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

MAX_PAYLOAD = 16384
# PROTOCOL.md §4: the largest payload once both hellos agreed on large chunks.
LARGE_PAYLOAD = 65472
FLAG_LARGE_CHUNKS = 0x02
SERVER_FLAG_LARGE_CHUNKS = 0x01
# PROTOCOL.md §4.1: keep-alive tunnels.
FLAG_KEEPALIVE = 0x04
SERVER_FLAG_KEEPALIVE = 0x02
STATUS_GOING_AWAY = 0x03
# PROTOCOL.md §3.1: the connect status.
FLAG_CONNECT_STATUS = 0x08
SERVER_FLAG_CONNECT_STATUS = 0x04
VERSION = 2
CONFIRM_FIELD = 0xFFFF


def hkdf_extract(salt, ikm):
    # RFC 5869 extract is HMAC(salt, ikm); `cryptography` exposes it as HMAC.
    h = hmac.HMAC(salt, hashes.SHA256())
    h.update(ikm)
    return h.finalize()


def hkdf_expand(prk, info, length=32):
    return HKDFExpand(algorithm=hashes.SHA256(), length=length, info=info).derive(prk)


def hkdf(salt, ikm, info, length=32):
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def nonce(n):
    return struct.pack("<Q", n) + b"\x00" * 4


def chunk_nonce(n, length):
    return struct.pack("<Q", n) + struct.pack(">H", length) + b"\x00\x00"


def client_hello(psk, client_salt, unix_time, meta=b"", flags=0):
    key = hkdf(client_salt, psk, b"shardproxy/1 client hello")
    pt = bytes([VERSION, flags]) + struct.pack(">Q", unix_time) + struct.pack(">H", len(meta))
    pt += meta.ljust(64, b"\x00")
    return key, client_salt + ChaCha20Poly1305(key).encrypt(nonce(0), pt, client_salt)


def meta_block(client=None, destination=None, conn_id=None, patience_ms=None):
    """The hello's meta block (PROTOCOL.md 2.1): type, length, value.
    Addresses are (ip string, port); the ID is 16 bytes; the patience is
    milliseconds, u32 big-endian."""
    import ipaddress

    def addr(a):
        ip = ipaddress.ip_address(a[0])
        return ip.packed + struct.pack(">H", a[1])

    out = b""
    if client:
        v = addr(client)
        out += bytes([0x01, len(v)]) + v
    if destination:
        v = addr(destination)
        out += bytes([0x02, len(v)]) + v
    if conn_id:
        out += bytes([0x03, len(conn_id)]) + conn_id
    if patience_ms is not None:
        out += bytes([0x04, 4]) + struct.pack(">I", patience_ms)
    return out


def session(psk, client_salt, server_salt):
    prk = hkdf_extract(client_salt + server_salt, psk)
    return {
        "server_hello_key": hkdf_expand(prk, b"shardproxy/1 server hello"),
        "c2s_key": hkdf_expand(prk, b"shardproxy/1 c2s"),
        "c2s_length_key": hkdf_expand(prk, b"shardproxy/1 c2s length"),
        "s2c_key": hkdf_expand(prk, b"shardproxy/1 s2c"),
        "s2c_length_key": hkdf_expand(prk, b"shardproxy/1 s2c length"),
    }


def mask_length(length_key, n, two_bytes):
    # mask(n): bytes 2i, 2i+1 of the first 1024 keystream bytes of
    # ChaCha20(length_key, nonce(n div 512)), i = n mod 512. OpenSSL takes a
    # 16-byte IV: the 32-bit LE block counter (0), then the 12-byte nonce.
    g, i = divmod(n, 512)
    enc = Cipher(algorithms.ChaCha20(length_key, b"\x00" * 4 + nonce(g)), mode=None).encryptor()
    k = enc.update(b"\x00" * 1024)
    return bytes([two_bytes[0] ^ k[2 * i], two_bytes[1] ^ k[2 * i + 1]])


def verify_server_hello(keys, client_salt, answer):
    """Returns the answer's flags byte (PROTOCOL.md §3, byte 2)."""
    pt = ChaCha20Poly1305(keys["server_hello_key"]).decrypt(nonce(0), answer[32:], client_salt)
    if pt[0] != VERSION:
        raise ValueError("server hello version %d" % pt[0])
    return pt[2]


class Sealer:
    def __init__(self, key, length_key, max_payload=MAX_PAYLOAD):
        self.aead, self.length_key, self.n = ChaCha20Poly1305(key), length_key, 0
        self.max = max_payload

    def _chunk(self, payload):
        enc_len = mask_length(self.length_key, self.n, struct.pack(">H", len(payload)))
        out = enc_len + self.aead.encrypt(chunk_nonce(self.n, len(payload)), payload, b"")
        self.n += 1
        return out

    def chunk(self, payload):
        assert 1 <= len(payload) <= self.max
        return self._chunk(payload)

    def end(self):
        return self._chunk(b"")

    def confirm(self):
        # PROTOCOL.md §4: the entry's first chunk (n = 0), length value
        # 0xffff, empty payload, tag under nonce(0, 0xffff).
        assert self.n == 0
        enc_len = mask_length(self.length_key, 0, struct.pack(">H", CONFIRM_FIELD))
        out = enc_len + self.aead.encrypt(chunk_nonce(0, CONFIRM_FIELD), b"", b"")
        self.n += 1
        return out


class Opener:
    def __init__(self, key, length_key, max_payload=MAX_PAYLOAD):
        self.aead, self.length_key, self.n, self.buf = ChaCha20Poly1305(key), length_key, 0, b""
        self.max, self.largest = max_payload, 0

    def feed(self, data):
        """Returns (plaintext, ended). Raises on any authentication failure."""
        self.buf += data
        out = b""
        while len(self.buf) >= 2:
            enc_len = self.buf[:2]
            (length,) = struct.unpack(">H", mask_length(self.length_key, self.n, enc_len))
            if length > self.max:
                raise ValueError("bad length %d" % length)
            if len(self.buf) < 2 + length + 16:
                break
            out += self.aead.decrypt(chunk_nonce(self.n, length), self.buf[2:2 + length + 16], b"")
            self.largest = max(self.largest, length)
            self.n += 1
            self.buf = self.buf[2 + length + 16:]
            if length == 0:
                return out, True
        return out, False


def vectors(doc_path):
    psk = bytes(range(32))
    cs = bytes(range(0x40, 0x60))
    ss = bytes(range(0x80, 0xA0))
    hello_key, hello = client_hello(psk, cs, 1800000000000)
    keys = session(psk, cs, ss)
    server_pt = bytes([VERSION, 0, 0, 0])
    server_hello = ss + ChaCha20Poly1305(keys["server_hello_key"]).encrypt(nonce(0), server_pt, cs)
    sealer = Sealer(keys["c2s_key"], keys["c2s_length_key"])
    confirm = sealer.confirm()
    values = {
        "client_hello_key": hello_key,
        "client_hello": hello,
        "server_hello_key": keys["server_hello_key"],
        "server_hello": server_hello,
        "c2s_key": keys["c2s_key"],
        "c2s_length_key": keys["c2s_length_key"],
        "s2c_key": keys["s2c_key"],
        "s2c_length_key": keys["s2c_length_key"],
        "confirm_chunk": confirm,
        "first_chunk": sealer.chunk(b"hello"),
        "end_chunk": sealer.end(),
    }
    meta = meta_block(("192.0.2.1", 40000), ("2001:db8::7", 443), bytes(range(0xA0, 0xB0)))
    values["meta"] = meta
    values["client_hello_with_meta"] = client_hello(psk, cs, 1800000000000, meta)[1]
    doc = open(doc_path).read()
    missing = [k for k, v in values.items() if "%s: %s" % (k, v.hex()) not in doc]
    if missing:
        print("MISMATCH: " + ", ".join(missing))
        return 1
    print("vectors ok: %d values match %s" % (len(values), doc_path))
    return 0


def next_chunk(s, opener):
    """Reads until one whole chunk is open (PROTOCOL.md §4, §4.1: on a
    keep-alive tunnel chunks go on after an end chunk, with the counter).
    Returns (payload, is_end), or None at EOF with nothing buffered."""
    while True:
        if len(opener.buf) >= 2:
            (length,) = struct.unpack(">H", mask_length(opener.length_key, opener.n, opener.buf[:2]))
            if length > opener.max:
                raise ValueError("bad length %d" % length)
            if len(opener.buf) >= 2 + length + 16:
                body = opener.buf[2:2 + length + 16]
                payload = opener.aead.decrypt(chunk_nonce(opener.n, length), body, b"")
                opener.n += 1
                opener.buf = opener.buf[2 + length + 16:]
                return payload, length == 0
        got = s.recv(65536)
        if not got:
            if opener.buf:
                raise ValueError("EOF inside a chunk")
            return None
        opener.buf += got


def read_session(s, opener):
    """Opens data chunks up to and including an end chunk. Returns the
    data, and whether the end chunk came (False: EOF first)."""
    data = b""
    while True:
        got = next_chunk(s, opener)
        if got is None:
            return data, False
        payload, end = got
        if end:
            return data, True
        data += payload


def keepalive(addr, key_b64, msg1, msg2, cross=""):
    """PROTOCOL.md §4.1 as an entry: two sessions on one tunnel."""
    import select
    done = handshake(addr, key_b64, flags=FLAG_KEEPALIVE)
    if done is None:
        return 1
    s, keys, _, server_flags = done
    agreed = bool(server_flags & SERVER_FLAG_KEEPALIVE)
    sealer = Sealer(keys["c2s_key"], keys["c2s_length_key"])
    opener = Opener(keys["s2c_key"], keys["s2c_length_key"])
    # Session 1: the confirmation, data, the end chunk; its FIN only
    # without keep-alive (§4: there the end chunk's FIN must follow it).
    s.sendall(sealer.confirm() + sealer.chunk(msg1.encode()) + sealer.end())
    if not agreed:
        s.shutdown(socket.SHUT_WR)
    reply1, ended1 = read_session(s, opener)
    if not agreed:
        print("agreed=False reply1=%r ended1=%s" % (reply1, ended1))
        return 0
    if cross == "cross":
        # Wait until the exit has said something (its goodbye), unread, so
        # that our start crosses it.
        readable, _, _ = select.select([s], [], [], 20)
        if not readable:
            print("the exit said nothing")
            return 1
    start = bytes([0]) + meta_block(conn_id=bytes(range(0xA0, 0xB0)))
    s.sendall(sealer.chunk(start) + sealer.chunk(msg2.encode()) + sealer.end())
    got = next_chunk(s, opener)
    if got is None or got[1]:
        print("agreed=True reply1=%r no status: %r" % (reply1, got))
        return 0
    status = got[0]
    reply2, ended2 = b"", False
    if status == b"\x00":
        reply2, ended2 = read_session(s, opener)
    s.shutdown(socket.SHUT_WR)
    print("agreed=True reply1=%r ended1=%s status=%d reply2=%r ended2=%s closed=%s" % (
        reply1, ended1, status[0], reply2, ended2, how_it_ended(s)))
    return 0


def connect_status(addr, key_b64, message, patience_ms=None):
    """PROTOCOL.md §3.1 as an entry: the exit's first chunk is a status,
    sent once it reached its origin (0) or failed to (1, then its FIN);
    with `patience_ms` (§2.1, type 4), within that long."""
    meta = b"" if patience_ms is None else meta_block(patience_ms=patience_ms)
    done = handshake(addr, key_b64, flags=FLAG_CONNECT_STATUS, meta=meta)
    if done is None:
        return 1
    s, keys, _, server_flags = done
    agreed = bool(server_flags & SERVER_FLAG_CONNECT_STATUS)
    sealer = Sealer(keys["c2s_key"], keys["c2s_length_key"])
    opener = Opener(keys["s2c_key"], keys["s2c_length_key"])
    s.sendall(sealer.confirm() + sealer.chunk(message.encode()) + sealer.end())
    s.shutdown(socket.SHUT_WR)
    sent_at = time.monotonic()
    status = None
    if agreed:
        got = next_chunk(s, opener)
        if got is None or got[1] or len(got[0]) != 1:
            print("agreed=True no status: %r" % (got,))
            return 0
        status = got[0][0]
    waited_ms = (time.monotonic() - sent_at) * 1000
    reply, ended = b"", False
    if status in (None, 0):
        reply, ended = read_session(s, opener)
    line = "agreed=%s status=%s reply=%r ended=%s closed=%s" % (
        agreed, status, reply, ended, how_it_ended(s))
    if patience_ms is not None:
        line += " in_time=%s" % (waited_ms < patience_ms)
    print(line)
    return 0


def fin_and_drain(s, data):
    """Sends our FIN, then reads to the peer's close; returns `data` and
    what was read. The peer may already have closed or reset."""
    try:
        s.shutdown(socket.SHUT_WR)
        while True:
            more = s.recv(65536)
            if not more:
                break
            data += more
    except OSError:
        pass
    return data


def fake_exit_status(port_file, key_b64, status):
    """PROTOCOL.md §3.1 as an exit: answer the entry's first flight with
    `status`; 0 echoes the session, anything else ends the tunnel (status,
    FIN, read to the entry's close). If the hello does not offer the
    connect status, no status is sent and the session is echoed."""
    opened = open_as_exit(port_file, key_b64, FLAG_CONNECT_STATUS, SERVER_FLAG_CONNECT_STATUS)
    if opened is None:
        return 1
    s, offered, opener, sealer, rest = opened
    s.settimeout(30)
    if offered and status == "eof":
        # Closes the tunnel unanswered (as a killed exit's kernel does).
        fin_and_drain(s, rest)
        print("offered=%s closed unanswered" % offered)
        return 0
    if offered and int(status) != 0:
        s.sendall(sealer.chunk(bytes([int(status)])))
        data = fin_and_drain(s, rest)
        print("offered=%s refused, %d byte(s) of chunks unopened" % (offered, len(data)))
        return 0
    if offered:
        s.sendall(sealer.chunk(b"\x00"))
    data, ended = read_session(s, opener)
    out = b"".join(sealer.chunk(data[j:j + MAX_PAYLOAD]) for j in range(0, len(data), MAX_PAYLOAD))
    s.sendall(out + sealer.end())
    s.shutdown(socket.SHUT_WR)
    print("offered=%s served %d byte(s) ended=%s closed=%s" % (offered, len(data), ended, how_it_ended(s)))
    return 0


def early_start(addr, key_b64):
    """PROTOCOL.md §4.1: a session may start only at the boundary. Sends
    the next session's start right behind session 1's end chunk, before
    the exit can have sent its own."""
    done = handshake(addr, key_b64, flags=FLAG_KEEPALIVE)
    if done is None:
        return 1
    s, keys, _, server_flags = done
    if not server_flags & SERVER_FLAG_KEEPALIVE:
        print("no keep-alive")
        return 1
    sealer = Sealer(keys["c2s_key"], keys["c2s_length_key"])
    start = bytes([0]) + meta_block(conn_id=bytes(16))
    s.sendall(sealer.confirm() + sealer.chunk(b"one") + sealer.end()
              + sealer.chunk(start) + sealer.chunk(b"early") + sealer.end())
    print("exit ended the connection: " + how_it_ended(s))
    return 0


def agree_to(s, psk, hello, flag, server_flag):
    """As an exit: answers `hello` (PROTOCOL.md §3) under a fresh server
    salt, with `server_flag` set if the hello's flags offer `flag`.
    Returns (whether it was offered, the session keys)."""
    cs = hello[:32]
    hello_key = hkdf(cs, psk, b"shardproxy/1 client hello")
    pt = ChaCha20Poly1305(hello_key).decrypt(nonce(0), hello[32:], cs)
    offered = bool(pt[1] & flag)
    ss = os.urandom(32)
    keys = session(psk, cs, ss)
    answer = bytes([VERSION, 0, server_flag if offered else 0, 0])
    s.sendall(ss + ChaCha20Poly1305(keys["server_hello_key"]).encrypt(nonce(0), answer, cs))
    return offered, keys


def open_as_exit(port_file, key_b64, flag, server_flag):
    """As an exit: accept one entry, answer its hello agreeing to `flag`
    if offered (`server_flag`), and verify its key confirmation. Returns
    (socket, whether offered, an Opener for the entry's chunks (holding
    the bytes read past the confirmation), a Sealer for ours, those bytes),
    or None (printed)."""
    psk = base64.b64decode(key_b64)
    s, hello = accept_hello(port_file)
    if s is None:
        return None
    offered, keys = agree_to(s, psk, hello, flag, server_flag)
    confirmed = read_confirmation(s, keys)
    if confirmed is None:
        return None
    opener, rest = confirmed
    opener.buf = rest
    return s, offered, opener, Sealer(keys["s2c_key"], keys["s2c_length_key"]), rest


def fake_exit_keepalive(port_file, key_b64, most, at_start=""):
    """As an exit agreeing to keep-alive (PROTOCOL.md §4.1): echo each
    session back, answering each start after the first with status 0;
    with `eof`, close the tunnel unanswered (FIN) at the first start."""
    opened = open_as_exit(port_file, key_b64, FLAG_KEEPALIVE, SERVER_FLAG_KEEPALIVE)
    if opened is None:
        return 1
    s, offered, opener, sealer, _ = opened
    starts = []
    served = 0
    s.settimeout(30)
    for i in range(int(most)):
        if i > 0:
            got = next_chunk(s, opener)
            if got is None:
                break
            payload, end = got
            if end or not 1 <= len(payload) <= 65:
                print("bad start chunk")
                return 1
            conn_id = b""
            meta = payload[1:]
            while len(meta) >= 2:
                kind, n = meta[0], meta[1]
                if kind == 0x03 and n == 16:
                    conn_id = meta[2:18]
                meta = meta[2 + n:]
            starts.append("%d:%s" % (payload[0], conn_id.hex()))
            if at_start == "eof":
                s.shutdown(socket.SHUT_WR)
                print("offered=%s served=%d closed unanswered at a start; then %s" % (
                    offered, served, how_it_ended(s)))
                return 0
            s.sendall(sealer.chunk(b"\x00"))
        data, ended = read_session(s, opener)
        if not ended:
            break
        out = b"".join(sealer.chunk(data[j:j + MAX_PAYLOAD]) for j in range(0, len(data), MAX_PAYLOAD))
        s.sendall(out + sealer.end())
        served += 1
    print("offered=%s served=%d starts=%s closed=%s" % (offered, served, ",".join(starts), how_it_ended(s)))
    return 0


def read_server_hello(s):
    """Reads the exit's 52-byte server hello, or returns None (printed) if
    the exit closed first."""
    answer = b""
    while len(answer) < 52:
        got = s.recv(52 - len(answer))
        if not got:
            print("closed before server hello")
            return None
        answer += got
    return answer


def handshake(addr, key_b64, offset_ms=0, flags=0, meta=b""):
    """As an entry: connect, send a hello stamped now + offset_ms with
    `flags` and `meta`, verify the server hello. Returns (socket, session
    keys, hello, the answer's flags), or None (printed) if the exit closed
    before answering."""
    host, port = addr.rsplit(":", 1)
    psk = base64.b64decode(key_b64)
    cs = os.urandom(32)
    stamp = int(time.time() * 1000) + offset_ms
    _, hello = client_hello(psk, cs, stamp, meta=meta, flags=flags)
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(hello)
    answer = read_server_hello(s)
    if answer is None:
        return None
    keys = session(psk, cs, answer[:32])
    server_flags = verify_server_hello(keys, cs, answer)
    return s, keys, hello, server_flags


def pattern(n):
    """n bytes of a fixed, non-repeating-looking pattern (the tests recompute
    its SHA-256)."""
    return bytes((i * 7 + (i >> 8)) & 0xFF for i in range(n))


def large(addr, key_b64, nbytes, offer="on"):
    """PROTOCOL.md §2-§4: offer large chunks, send with the agreed maximum,
    read the echo on a thread (so neither side's buffers fill), and report
    the largest chunk in each direction."""
    import hashlib
    import threading
    flags = FLAG_LARGE_CHUNKS if offer != "off" else 0
    done = handshake(addr, key_b64, flags=flags)
    if done is None:
        return 1
    s, keys, _, server_flags = done
    agreed = bool(flags) and bool(server_flags & SERVER_FLAG_LARGE_CHUNKS)
    most = LARGE_PAYLOAD if agreed else MAX_PAYLOAD
    sealer = Sealer(keys["c2s_key"], keys["c2s_length_key"], most)
    opener = Opener(keys["s2c_key"], keys["s2c_length_key"], most)
    result = {"reply": [], "ended": False, "error": None}

    def reader():
        try:
            while not result["ended"]:
                got = s.recv(1 << 20)
                if not got:
                    break
                pt, result["ended"] = opener.feed(got)
                result["reply"].append(pt)
        except Exception as e:  # reported below, never swallowed
            result["error"] = repr(e)

    t = threading.Thread(target=reader)
    t.start()
    data = pattern(int(nbytes))
    s.sendall(sealer.confirm())
    for i in range(0, len(data), most):
        s.sendall(sealer.chunk(data[i:i + most]))
    s.sendall(sealer.end())
    s.shutdown(socket.SHUT_WR)
    t.join(60)
    reply = b"".join(result["reply"])
    print("agreed=%s largest_sent=%d largest_received=%d reply sha256 %s len %d ended=%s error=%s" % (
        agreed, min(most, len(data)), opener.largest, hashlib.sha256(reply).hexdigest(),
        len(reply), result["ended"], result["error"]))
    return 0


def fake_exit_large(port_file, key_b64, nbytes):
    """As an exit: agree to large chunks if the hello offers them (PROTOCOL.md
    §3), send `nbytes` of pattern() in chunks as large as agreed, then the
    end chunk; read the entry's data up to its end chunk."""
    import hashlib
    psk = base64.b64decode(key_b64)
    s, hello = accept_hello(port_file)
    if s is None:
        return 1
    offered, keys = agree_to(s, psk, hello, FLAG_LARGE_CHUNKS, SERVER_FLAG_LARGE_CHUNKS)
    confirmed = read_confirmation(s, keys)
    if confirmed is None:
        return 1
    opener, rest = confirmed
    most = LARGE_PAYLOAD if offered else MAX_PAYLOAD
    opener.max = most
    sealer = Sealer(keys["s2c_key"], keys["s2c_length_key"], most)
    data = pattern(int(nbytes))
    for i in range(0, len(data), most):
        s.sendall(sealer.chunk(data[i:i + most]))
    s.sendall(sealer.end())
    s.shutdown(socket.SHUT_WR)
    got, ended = opener.feed(rest)
    while not ended:
        more = s.recv(1 << 20)
        if not more:
            print("EOF without the end chunk")
            return 1
        plain, ended = opener.feed(more)
        got += plain
    print("offered=%s largest_received=%d received sha256 %s len %d" % (
        offered, opener.largest, hashlib.sha256(got).hexdigest(), len(got)))
    return 0


def send(addr, key_b64, message, repeat=1):
    done = handshake(addr, key_b64)
    if done is None:
        return 1
    s, keys, hello, _ = done
    sealer = Sealer(keys["c2s_key"], keys["c2s_length_key"])
    opener = Opener(keys["s2c_key"], keys["s2c_length_key"])
    s.sendall(sealer.confirm())
    data = message.encode() * repeat
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
    import hashlib
    print("reply sha256 %s len %d ended=%s" % (hashlib.sha256(reply).hexdigest(), len(reply), ended))
    return 0


def how_it_ended(s):
    try:
        while s.recv(65536):
            pass
        return "eof"
    except ConnectionResetError:
        return "reset"
    except socket.timeout:
        return "open"


def after_end(addr, key_b64, message):
    done = handshake(addr, key_b64)
    if done is None:
        return 1
    s, keys, hello, _ = done
    sealer = Sealer(keys["c2s_key"], keys["c2s_length_key"])
    s.sendall(sealer.confirm() + sealer.chunk(message.encode()) + sealer.end() + sealer.chunk(b"after the end"))
    print("exit ended the connection: " + how_it_ended(s))
    return 0


def no_confirm(addr, key_b64, message):
    """A valid hello, then a data chunk at n = 0 instead of the key
    confirmation: the exit must not contact its origin."""
    done = handshake(addr, key_b64)
    if done is None:
        return 1
    s, keys, hello, _ = done
    sealer = Sealer(keys["c2s_key"], keys["c2s_length_key"])
    s.sendall(sealer.chunk(message.encode()) + sealer.end())
    print("exit ended the connection: " + how_it_ended(s))
    return 0


def abandon(addr, key_b64, how):
    """A valid hello, the server hello verified, then a close (FIN) or a
    reset (SO_LINGER 0) before the key confirmation."""
    done = handshake(addr, key_b64)
    if done is None:
        return 1
    s = done[0]
    if how == "reset":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    print("abandoned with a " + ("reset" if how == "reset" else "close"))
    return 0


def stamped_session(addr, key_b64, offset_ms):
    """A full, valid session whose hello is stamped now + offset_ms (an
    entry whose clock runs ahead or behind); prints the hello as hex."""
    done = handshake(addr, key_b64, int(offset_ms))
    if done is None:
        return 1
    s, keys, hello, _ = done
    sealer = Sealer(keys["c2s_key"], keys["c2s_length_key"])
    s.sendall(sealer.confirm() + sealer.chunk(b"stamped") + sealer.end())
    s.shutdown(socket.SHUT_WR)
    how_it_ended(s)
    print(hello.hex())
    return 0


def accept_hello(port_file):
    """As an exit: listen on a free loopback port, write it to `port_file`,
    accept one entry and read its 124-byte hello. Returns (socket, hello),
    or (None, None) (printed) if the entry closed first."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    with open(port_file + ".tmp", "w") as f:
        f.write(str(ls.getsockname()[1]))
    os.rename(port_file + ".tmp", port_file)
    ls.settimeout(20)
    s, _ = ls.accept()
    s.settimeout(10)
    hello = b""
    while len(hello) < 124:
        got = s.recv(124 - len(hello))
        if not got:
            print("closed before the hello")
            return None, None
        hello += got
    return s, hello


def server_hello_for(psk, hello):
    """The exit's answer to `hello` (PROTOCOL.md §3) under a fresh server
    salt. Returns (session keys, server hello bytes)."""
    cs, ss = hello[:32], os.urandom(32)
    keys = session(psk, cs, ss)
    return keys, ss + ChaCha20Poly1305(keys["server_hello_key"]).encrypt(nonce(0), bytes([VERSION, 0, 0, 0]), cs)


def read_confirmation(s, keys):
    """Reads and verifies the entry's key confirmation (PROTOCOL.md §4:
    chunk 0, length value 0xffff, empty payload). Returns an Opener for the
    chunks after it and the bytes already read past it, or None (printed)
    if the entry closed first or sent another chunk."""
    got = b""
    while len(got) < 18:
        more = s.recv(65536)
        if not more:
            print("closed before the confirmation")
            return None
        got += more
    (field,) = struct.unpack(">H", mask_length(keys["c2s_length_key"], 0, got[:2]))
    if field != CONFIRM_FIELD:
        print("first chunk is not the key confirmation")
        return None
    ChaCha20Poly1305(keys["c2s_key"]).decrypt(chunk_nonce(0, CONFIRM_FIELD), got[2:18], b"")
    opener = Opener(keys["c2s_key"], keys["c2s_length_key"])
    opener.n = 1
    return opener, got[18:]


def read_data(s, opener, rest, want):
    """Opens the entry's chunks (`rest`, then what follows) until the data
    reads `want` or the end chunk came. Returns (data, ended), or None
    (printed) if the entry closed first."""
    data, ended = opener.feed(rest)
    while data != want.encode() and not ended:
        more = s.recv(65536)
        if not more:
            print("closed after %r" % data)
            return None
        plain, ended = opener.feed(more)
        data += plain
    return data, ended


def fake_exit(port_file, key_b64, message):
    psk = base64.b64decode(key_b64)
    s, hello = accept_hello(port_file)
    if s is None:
        return 1
    keys, server_hello = server_hello_for(psk, hello)
    sealer = Sealer(keys["s2c_key"], keys["s2c_length_key"])
    s.sendall(server_hello + sealer.chunk(message.encode()) + sealer.end() + sealer.chunk(b"after the end"))
    print("entry ended the connection: " + how_it_ended(s))
    return 0


def data_segments_in(s):
    # struct tcp_info (linux/tcp.h): tcpi_data_segs_in, the segments with
    # data this socket received, is the u32 at byte 152 (Linux 4.6+).
    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return struct.unpack_from("I", info, 152)[0]


def segments_in(s):
    # struct tcp_info: tcpi_segs_in, every segment received, ACKs included,
    # is the u32 at byte 140 (Linux 4.2+).
    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return struct.unpack_from("I", info, 140)[0]


def hello_acks(addr, key_b64, tries):
    """As an entry, `tries` times: send a hello and count the segments that
    arrive until the server hello is in (1 if the hello's ACK rode on it, 2
    if it came on its own). Prints the counts."""
    host, port = addr.rsplit(":", 1)
    psk = base64.b64decode(key_b64)
    counts = []
    for _ in range(int(tries)):
        cs = os.urandom(32)
        _, hello = client_hello(psk, cs, int(time.time() * 1000))
        s = socket.create_connection((host, int(port)), timeout=10)
        before = segments_in(s)
        s.sendall(hello)
        answer = read_server_hello(s)
        if answer is None:
            return 1
        verify_server_hello(session(psk, cs, answer[:32]), cs, answer)
        counts.append(segments_in(s) - before)
        s.close()
    print("segments per server hello: " + " ".join(map(str, counts)))
    return 0


def first_flight(port_file, key_b64, want):
    """A fake exit that answers the hello only when told to (a line on
    stdin, once the test's client has sent its request to the entry), reads
    the key confirmation and then the client's data up to `want`, and
    reports how many TCP segments with data that took and the size of the
    first data chunk."""
    psk = base64.b64decode(key_b64)
    s, hello = accept_hello(port_file)
    if s is None:
        return 1
    sys.stdin.readline()
    before = data_segments_in(s)
    keys, answer = server_hello_for(psk, hello)
    s.sendall(answer)
    confirmed = read_confirmation(s, keys)
    if confirmed is None:
        return 1
    opener, rest = confirmed
    got = read_data(s, opener, rest, want)
    if got is None:
        return 1
    data, _ = got
    segments = data_segments_in(s) - before
    (first_chunk,) = struct.unpack(">H", mask_length(keys["c2s_length_key"], 1, rest[:2]))
    print("%d segment(s): confirmation + %d-byte chunk, %s" % (
        segments, first_chunk, "data ok" if data == want.encode() else "data wrong"))
    s.close()
    return 0


def first_flight_end(port_file, key_b64):
    """A fake exit that answers the hello when told to (a line on stdin),
    then reads to the end and says how the entry ended the tunnel: "reset",
    or "clean end" (the key confirmation, then the end chunk and EOF), or
    what else it saw."""
    psk = base64.b64decode(key_b64)
    s, hello = accept_hello(port_file)
    if s is None:
        return 1
    sys.stdin.readline()
    keys, answer = server_hello_for(psk, hello)
    s.sendall(answer)
    got = b""
    try:
        while True:
            more = s.recv(65536)
            if not more:
                break
            got += more
    except ConnectionResetError:
        print("reset after %d bytes" % len(got))
        return 0
    opener = Opener(keys["c2s_key"], keys["c2s_length_key"])
    opener.n = 1
    data, ended = opener.feed(got[18:]) if len(got) >= 18 else (b"", False)
    print("clean end" if ended and not data else "eof after %d bytes" % len(got))
    return 0


def end_fin(port_file, key_b64, want):
    """A fake exit that answers at once, reads the confirmation and the
    client's data up to `want`, then counts the TCP segments (ACKs included,
    via tcpi_segs_in) that bring the end chunk and FIN, and checks the end
    chunk. Prints "end chunk and FIN in N segment(s)"."""
    psk = base64.b64decode(key_b64)
    s, hello = accept_hello(port_file)
    if s is None:
        return 1
    keys, answer = server_hello_for(psk, hello)
    s.sendall(answer)
    confirmed = read_confirmation(s, keys)
    if confirmed is None:
        return 1
    opener, rest = confirmed
    got = read_data(s, opener, rest, want)
    if got is None:
        return 1
    data, ended = got
    before = segments_in(s)
    # The test half-closes its client only after this line.
    print("data in", flush=True)
    while not ended:
        more = s.recv(65536)
        if not more:
            print("EOF without the end chunk")
            return 1
        _, ended = opener.feed(more)
    if s.recv(65536) != b"":
        print("bytes after the end chunk")
        return 1
    print("end chunk and FIN in %d segment(s)" % (segments_in(s) - before))
    s.close()
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "end-fin":
        sys.exit(end_fin(sys.argv[2], sys.argv[3], sys.argv[4]))
    if sys.argv[1] == "first-flight-end":
        sys.exit(first_flight_end(sys.argv[2], sys.argv[3]))
    if sys.argv[1] == "hello-acks":
        sys.exit(hello_acks(sys.argv[2], sys.argv[3], sys.argv[4]))
    if sys.argv[1] == "first-flight":
        sys.exit(first_flight(sys.argv[2], sys.argv[3], sys.argv[4]))
    if sys.argv[1] == "vectors":
        sys.exit(vectors(sys.argv[2]))
    if sys.argv[1] == "after-end":
        sys.exit(after_end(sys.argv[2], sys.argv[3], sys.argv[4]))
    if sys.argv[1] == "no-confirm":
        sys.exit(no_confirm(sys.argv[2], sys.argv[3], sys.argv[4]))
    if sys.argv[1] == "abandon":
        sys.exit(abandon(sys.argv[2], sys.argv[3], sys.argv[4]))
    if sys.argv[1] == "stamped":
        sys.exit(stamped_session(sys.argv[2], sys.argv[3], sys.argv[4]))
    if sys.argv[1] == "large":
        sys.exit(large(*sys.argv[2:]))
    if sys.argv[1] == "fake-exit-large":
        sys.exit(fake_exit_large(sys.argv[2], sys.argv[3], sys.argv[4]))
    if sys.argv[1] == "keepalive":
        sys.exit(keepalive(*sys.argv[2:]))
    if sys.argv[1] == "early-start":
        sys.exit(early_start(sys.argv[2], sys.argv[3]))
    if sys.argv[1] == "fake-exit-keepalive":
        sys.exit(fake_exit_keepalive(*sys.argv[2:]))
    if sys.argv[1] == "connect-status":
        patience = int(sys.argv[5]) if len(sys.argv) > 5 else None
        sys.exit(connect_status(sys.argv[2], sys.argv[3], sys.argv[4], patience))
    if sys.argv[1] == "fake-exit-status":
        sys.exit(fake_exit_status(sys.argv[2], sys.argv[3], sys.argv[4]))
    if sys.argv[1] == "fake-exit":
        sys.exit(fake_exit(sys.argv[2], sys.argv[3], sys.argv[4]))
    repeat = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    sys.exit(send(sys.argv[2], sys.argv[3], sys.argv[4], repeat))
