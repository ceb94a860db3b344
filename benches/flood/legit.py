"""Real clients through 127.0.0.1:PORT for SECS seconds (at most 5,000): each
connects, sends 200 random bytes and FIN, and must read exactly them back
before EOF; 20 ms apart. Prints `ok=N fail=M` and the errors seen."""
import os
import socket
import sys
import time

addr = ("127.0.0.1", int(sys.argv[1]))
secs = float(sys.argv[2])
ok = fail = 0
errs = {}
t0 = time.time()
while time.time() - t0 < secs and ok + fail < 5000:
    msg = os.urandom(200)
    try:
        s = socket.create_connection(addr, timeout=5)
        s.settimeout(5)
        s.sendall(msg)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            d = s.recv(65536)
            if not d:
                break
            got += d
        s.close()
        if got == msg:
            ok += 1
        else:
            fail += 1
            errs["wrong echo"] = errs.get("wrong echo", 0) + 1
    except OSError as e:
        fail += 1
        errs[type(e).__name__] = errs.get(type(e).__name__, 0) + 1
    time.sleep(0.02)
print("ok=%d fail=%d errors=%s" % (ok, fail, errs))
