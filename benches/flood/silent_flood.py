"""Opens RATE connections a second to HOST:PORT for SECS seconds (at most
RATE x SECS), each sending nothing; closes each when the peer does. Prints
how many were opened and how many the peer sent any byte to (it must be 0
for an exit: nothing goes to a peer without a valid hello)."""
import selectors
import socket
import sys
import time

host, port = sys.argv[1].rsplit(":", 1)
secs, rate = float(sys.argv[2]), float(sys.argv[3])
sel = selectors.DefaultSelector()
opened = answered = 0
t0 = time.time()
next_open = t0
while time.time() - t0 < secs:
    now = time.time()
    while next_open <= now and opened < rate * secs:
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect((host, int(port)))
        except BlockingIOError:
            pass
        except OSError:
            s.close()
            next_open += 1.0 / rate
            continue
        sel.register(s, selectors.EVENT_READ)
        opened += 1
        next_open += 1.0 / rate
    # 50 ms between rounds: the connections go out in bursts of RATE/20,
    # as a flood does, and a burst overflows a small handshake budget.
    for key, _ in sel.select(timeout=0.05):
        s = key.fileobj
        try:
            if s.recv(65536):
                answered += 1
        except OSError:
            pass
        sel.unregister(s)
        s.close()
print("opened=%d answered=%d" % (opened, answered))
