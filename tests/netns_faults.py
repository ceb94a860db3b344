#!/usr/bin/env python3
"""Fault injection on a real link between entry and exit, in network namespaces.

Topology: four namespaces this script creates and removes, joined by veth
pairs, each connection going only to a directly connected neighbour:

    client 198.18.1.1 == 198.18.1.2 entry 198.18.2.1 == 198.18.2.2 exit 198.18.3.1 == 198.18.3.2 origin

198.18.0.0/15 is the RFC 2544 benchmarking range; nothing outside these
namespaces uses it. Faults go on the veth link: nftables for random loss
(`numgen random mod 100 < N drop`) and resets (`reject with tcp reset`), TBF
for a rate limit. Each data scenario checks, byte for byte by SHA-256, that
what the client sent is what the origin got and the reverse.

Usage: netns_faults.py BIN  (prints one line per scenario, then
"N passed, N failed"; exits non-zero on any failure)
"""
import hashlib, os, random, subprocess, sys, threading, time

BIN = sys.argv[1]
TAG = "sp%d" % (os.getpid() % 100000)
C, A, B, O = TAG + "c", TAG + "a", TAG + "b", TAG + "o"   # client, entry, exit, origin
results = []


def sh(*cmd, ns=None, check=True):
    full = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    r = subprocess.run(full, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError("%s: %s" % (" ".join(full), r.stderr.strip()))
    return r.stdout


def link(ns1, ip1, ns2, ip2, name):
    sh("ip", "link", "add", name + "1", "netns", ns1, "type", "veth", "peer", "name", name + "2", "netns", ns2)
    sh("ip", "addr", "add", ip1 + "/30", "dev", name + "1", ns=ns1)
    sh("ip", "addr", "add", ip2 + "/30", "dev", name + "2", ns=ns2)
    sh("ip", "link", "set", name + "1", "up", ns=ns1)
    sh("ip", "link", "set", name + "2", "up", ns=ns2)


def setup():
    for ns in (C, A, B, O):
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "set", "lo", "up", ns=ns)
    link(C, "198.18.1.1", A, "198.18.1.2", TAG + "ce")
    link(A, "198.18.2.1", B, "198.18.2.2", TAG + "ex")   # the faulty link
    link(B, "198.18.3.1", O, "198.18.3.2", TAG + "xo")


def teardown():
    for ns in (C, A, B, O):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


ORIGIN = r'''
import hashlib, socket, sys, threading
s = socket.socket(); s.bind(("198.18.3.2", 0)); s.listen(16)
print(s.getsockname()[1], flush=True)
def serve(c):
    h = hashlib.sha256(); n = 0; end = "eof"
    try:
        while True:
            d = c.recv(1 << 16)
            if not d:
                break
            h.update(d); n += len(d)
            c.sendall(d)
        c.shutdown(socket.SHUT_WR)
    except OSError as e:
        end = "error"
    print("origin %d %s %s" % (n, h.hexdigest(), end), flush=True)
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
'''

CLIENT = r'''
import hashlib, random, socket, sys, threading
port, size, seed = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
c = socket.create_connection(("198.18.1.2", port))
sent = hashlib.sha256(); got = hashlib.sha256(); n = [0]; end = ["eof"]
def reader():
    flowing = False
    try:
        while True:
            d = c.recv(1 << 16)
            if not d:
                return
            got.update(d); n[0] += len(d)
            if not flowing and n[0] >= 1 << 20:
                flowing = True  # 1 MiB made the round trip: tell the harness
                print("flowing", file=sys.stderr, flush=True)
    except OSError:
        end[0] = "error"
t = threading.Thread(target=reader); t.start()
rng = random.Random(seed); left = size
try:
    while left:
        chunk = rng.randbytes(min(left, 1 << 16)); c.sendall(chunk); sent.update(chunk); left -= len(chunk)
    c.shutdown(socket.SHUT_WR)
except OSError:
    end[0] = "error"
t.join(120)
print("client %d %s %d %s %s" % (size - left, sent.hexdigest(), n[0], got.hexdigest(), end[0]), flush=True)
'''


def spawn(ns, args, **kw):
    return subprocess.Popen(["ip", "netns", "exec", ns] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def listening(proc):
    for line in proc.stderr:
        if " listening on " in line:
            return line.split(" listening on ")[1].split(" ")[0]
    raise RuntimeError("proxy did not start")


def rss_kib(pid):
    for line in open("/proc/%d/status" % pid):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def pair(idle="60s", connect_timeout="5s"):
    key = "/tmp/%s.key" % TAG
    if not os.path.exists(key):
        subprocess.run([BIN, "keygen", "--out", key], check=True)
    origin = spawn(O, ["python3", "-c", ORIGIN])
    oport = int(origin.stdout.readline())
    exit_ = spawn(B, [BIN, "exit", "--listen", "198.18.2.2:0", "--upstream", "198.18.3.2:%d" % oport,
                      "--key-file", key, "--cores", "1", "--idle-timeout", idle])
    exit_addr = listening(exit_)
    entry = spawn(A, [BIN, "entry", "--listen", "198.18.1.2:0", "--upstream", exit_addr,
                      "--key-file", key, "--cores", "1", "--idle-timeout", idle,
                      "--connect-timeout", connect_timeout])
    entry_port = int(listening(entry).rsplit(":", 1)[1])
    return origin, exit_, entry, int(exit_addr.rsplit(":", 1)[1]), entry_port


def stop(*procs):
    for p in procs:
        p.kill()
        p.wait()


def nft(ns, rules):
    sh("nft", "add", "table", "inet", "sp", ns=ns)
    sh("nft", "add", "chain", "inet", "sp", "f", "{ type filter hook input priority 0 ; policy accept ; }", ns=ns)
    for r in rules:
        sh("nft", "add", "rule", "inet", "sp", "f", *r.split(), ns=ns)


def clear_faults():
    sh("nft", "delete", "table", "inet", "sp", ns=A, check=False)
    sh("nft", "delete", "table", "inet", "sp", ns=B, check=False)
    sh("tc", "qdisc", "del", "dev", TAG + "ex1", "root", ns=A, check=False)
    sh("tc", "qdisc", "del", "dev", TAG + "ex2", "root", ns=B, check=False)


def transfer(entry_port, size, seed, timeout, on_flowing=None):
    """Runs the client to the end; calls on_flowing() once its first MiB
    came back, while the rest is still in flight."""
    p = subprocess.Popen(["ip", "netns", "exec", C, "python3", "-c", CLIENT, str(entry_port), str(size), str(seed)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if on_flowing:
        line = p.stderr.readline()  # "" if the client ended first
        assert line.strip() == "flowing", "client never got its first MiB back: %r" % line
        on_flowing()
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise
    f = out.split()
    return {"sent": int(f[1]), "sent_hash": f[2], "got": int(f[3]), "got_hash": f[4], "end": f[5]}


def origin_report(origin):
    f = origin.stdout.readline().split()
    return {"got": int(f[1]), "hash": f[2], "end": f[3]}


def scenario(name, fn):
    start = time.time()
    try:
        detail = fn()
        results.append(True)
        print("ok   %s (%.1fs) %s" % (name, time.time() - start, detail or ""), flush=True)
    except Exception as e:  # report and continue
        results.append(False)
        print("FAIL %s: %s" % (name, e), flush=True)
    finally:
        clear_faults()


def lossy(percent, size):
    def run():
        origin, exit_, entry, exit_port, entry_port = pair()
        try:
            nft(B, ["tcp dport %d numgen random mod 100 < %d drop" % (exit_port, percent)])
            nft(A, ["tcp sport %d numgen random mod 100 < %d drop" % (exit_port, percent)])
            c = transfer(entry_port, size, percent, 600)
            o = origin_report(origin)
            assert c["end"] == "eof" and o["end"] == "eof", (c, o)
            assert c["sent"] == size == o["got"] == c["got"], (c, o)
            assert c["sent_hash"] == o["hash"] == c["got_hash"], "hash mismatch"
            return "%d MiB each way byte-exact" % (size >> 20)
        finally:
            stop(entry, exit_, origin)
    return run


def rate_limited():
    origin, exit_, entry, exit_port, entry_port = pair()
    try:
        for ns, dev in ((A, TAG + "ex1"), (B, TAG + "ex2")):
            sh("tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", "100mbit", "burst", "64kb", "latency", "50ms", ns=ns)
        base = rss_kib(entry.pid)
        peak = [base]
        done = threading.Event()
        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], rss_kib(entry.pid), rss_kib(exit_.pid))
                time.sleep(0.1)
        t = threading.Thread(target=sample); t.start()
        size = 64 << 20
        c = transfer(entry_port, size, 7, 600)
        done.set(); t.join()
        o = origin_report(origin)
        assert c["sent"] == size == o["got"] == c["got"] and c["sent_hash"] == o["hash"] == c["got_hash"], (c, o)
        growth = peak[0] - base
        # Bound: 16 MiB over the proxy's idle RSS, whatever the transfer size.
        assert growth < 16 * 1024, "RSS grew %d KiB" % growth
        return "64 MiB each way at 100 Mbit/s, peak RSS growth %d KiB (bound 16384)" % growth
    finally:
        stop(entry, exit_, origin)


def reset_mid_transfer():
    # The rule also eats the entry's RSTs to the exit, so the exit only
    # learns of the death through its idle timeout: keep that short.
    origin, exit_, entry, exit_port, entry_port = pair(idle="5s")
    try:
        # The reset goes in once data is flowing both ways, not after a timer.
        c = transfer(entry_port, 256 << 20, 9, 120,
                     on_flowing=lambda: nft(B, ["tcp dport %d reject with tcp reset" % exit_port]))
        o = origin_report(origin)
        assert c["end"] == "error", "client saw a clean end: %s" % c
        assert o["end"] == "error", "origin saw a clean end: %s" % o
        assert o["got"] < 256 << 20
        return "client and origin both aborted (origin had %d bytes)" % o["got"]
    finally:
        stop(entry, exit_, origin)


PROBE = r'''
import socket, sys, time
c = socket.create_connection(("198.18.1.2", int(sys.argv[1])))
c.sendall(b"hello?"); c.settimeout(10); t = time.time(); n = 0; end = "open"
try:
    while True:
        d = c.recv(4096)
        if not d:
            end = "eof"; break
        n += len(d)
except socket.timeout:
    end = "open"
except OSError:
    end = "reset"
print("%s %d %.2f" % (end, n, time.time() - t), flush=True)
'''


def unreachable_upstream():
    origin, exit_, entry, exit_port, entry_port = pair(connect_timeout="1s")
    try:
        # Every SYN to the exit vanishes: the entry's connect can only time out.
        nft(B, ["tcp dport %d tcp flags syn drop" % exit_port])
        r = subprocess.run(["ip", "netns", "exec", C, "python3", "-c", PROBE, str(entry_port)],
                           capture_output=True, text=True, timeout=30)
        end, n, took = r.stdout.split()
        assert end in ("eof", "reset") and n == "0", r.stdout
        assert 0.9 <= float(took) < 3.0, "closed after %ss, connect timeout is 1s" % took
        return "client closed after %ss (connect timeout 1s), %s" % (took, end)
    finally:
        stop(entry, exit_, origin)


try:
    setup()
except Exception as e:
    print("cannot create network namespaces: %s" % e)
    sys.exit(3)
try:
    scenario("1% loss on entry<->exit, 64 MiB each way", lossy(1, 64 << 20))
    scenario("5% loss on entry<->exit, 16 MiB each way", lossy(5, 16 << 20))
    scenario("100 Mbit/s TBF, 64 MiB, memory flat", rate_limited)
    scenario("tcp reset injected mid-transfer", reset_mid_transfer)
    scenario("unreachable upstream (SYNs dropped)", unreachable_upstream)
finally:
    teardown()
    try:
        os.unlink("/tmp/%s.key" % TAG)
    except OSError:
        pass
print("%d passed, %d failed" % (results.count(True), results.count(False)))
sys.exit(0 if all(results) else 1)
