"""Fifteen thousand idle connections held by one server process under the
stack, every one answered afterwards, and every socket back in the pool
once the clients leave (issue 12: the stack served 1022 of them and
black-holed the rest when its region had 1024 sockets)."""
import json
import sys

import pytest

from support.net import NET, HarnessError, in_client
from support.programs import ShimProgram, wait_until

pytestmark = pytest.mark.integration

CONNECTIONS = 15_000       # the open-file limit of these machines is 20,000
PORT = 8090
IDLE_SECONDS = 5

# Under the stack: accepts everything, answers each "ping" with "pong".
_SERVER = r"""
import resource, selectors, socket, sys
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
listener = socket.create_server(("0.0.0.0", int(sys.argv[1])), backlog=4096)
listener.setblocking(False)
sel = selectors.DefaultSelector()
sel.register(listener, selectors.EVENT_READ)
print("listening", flush=True)
while True:
    for key, _ in sel.select():
        if key.fileobj is listener:
            while True:
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    break
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ)
        elif key.fileobj.recv(64):
            key.fileobj.send(b"pong")
        else:
            sel.unregister(key.fileobj)
            key.fileobj.close()
"""

# On the client's kernel: opens the connections a thousand at a time (all
# 15,000 at once overflow the stack's packet ring: docs/architecture.md,
# "Limits"), holds them idle, then pings each; prints how many connected and
# how many were answered.
_CLIENT = r"""
import json, resource, selectors, socket, sys, time
host, port, count, idle = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
sel = selectors.DefaultSelector()
socks, connected, deadline = [], set(), time.monotonic() + 60
for wave in range(0, count, 1000):
    for _ in range(min(1000, count - wave)):
        s = socket.socket(); s.setblocking(False)
        s.connect_ex((host, port)); socks.append(s)
        sel.register(s, selectors.EVENT_WRITE)
    while len(sel.get_map()) and time.monotonic() < deadline:
        for key, _ in sel.select(0.5):
            s = key.fileobj; sel.unregister(s)
            if not s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                connected.add(s)
time.sleep(idle)
for s in connected:
    s.send(b"ping"); sel.register(s, selectors.EVENT_READ)
answered, deadline = 0, time.monotonic() + 60
while answered < len(connected) and time.monotonic() < deadline:
    for key, _ in sel.select(0.5):
        sel.unregister(key.fileobj)
        answered += key.fileobj.recv(64) == b"pong"
for s in socks:
    s.close()
print(json.dumps({"connected": len(connected), "answered": answered}))
"""


def test_fifteen_thousand_idle_connections_are_held_and_answered_then_freed(test_network, tmp_path):
    server = ShimProgram([sys.executable, "-c", _SERVER, str(PORT)], tmp_path / "server.log")
    try:
        server.stack_pid()
        wait_until(lambda: "listening" in server.output(), 30, "the server to listen")
        at_start = server.stats()["slots_in_use"]
        done = in_client([sys.executable, "-c", _CLIENT, NET.srv_ip, str(PORT), str(CONNECTIONS),
                          str(IDLE_SECONDS)], timeout=240)
        assert done.returncode == 0, done.stderr.decode()
        assert json.loads(done.stdout) == {"connected": CONNECTIONS, "answered": CONNECTIONS}
        assert server.stats()["tcp"]["tcp_passive_opens"] == CONNECTIONS   # each handshake completed once
        # The server closes each connection as its client does: every slot comes back.
        census = {}

        def all_returned():
            stats = server.stats()
            census.update(sockets=stats["sockets"], tcp=stats["tcp"], packet_io=stats["packet_io"])
            return stats["slots_in_use"] == at_start
        try:
            wait_until(all_returned, 60, f"the {CONNECTIONS} closed sockets to return to the pool")
        except HarnessError:
            raise HarnessError(f"sockets left: {census}") from None
    finally:
        server.stop()
