"""Full is an answer, not a hole: lighttpd under a stack of few sockets
(`mtcpshim run --sockets`), more clients than sockets.  Every client whose
handshake completes is served; the others stay in SYN_SENT, as against a
Linux server whose accept queue is full, until sockets come free, then their
SYN retries are answered and they are served too."""
import json
import subprocess
import sys

import pytest

from support.net import NET, in_client
from support.programs import mtcpshim_command, shim_lighttpd

pytestmark = pytest.mark.integration

SOCKETS = 24          # the listener takes one
CLIENTS = 40

# In the client namespace: CLIENTS connections at once; each one connected
# within HOLD seconds sends a request, reads its answer and keeps the
# connection; then every connection is closed, and the ones still connecting
# get until LATE to be served.
_CLIENT = r"""
import json, selectors, socket, sys, time
host, port, clients, hold, late = sys.argv[1], int(sys.argv[2]), *map(float, sys.argv[3:])
request = f"GET /ping.txt HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()

def serve_round(socks, until):
    # the connected ones each get a request; returns {sock: answered}
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_WRITE)
    state, answered = {}, {}
    while time.monotonic() < until and len(answered) < len(socks):
        for key, _ in sel.select(0.1):
            s = key.fileobj
            if s not in state:
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    answered[s] = False; sel.unregister(s); continue
                s.send(request); state[s] = b""
                sel.modify(s, selectors.EVENT_READ)
            else:
                state[s] += s.recv(4096)
                if b"pong" in state[s]:
                    answered[s] = True; sel.unregister(s)
    return state, answered

socks = []
for _ in range(int(clients)):
    s = socket.socket(); s.setblocking(False)
    s.connect_ex((host, port)); socks.append(s)
state, answered = serve_round(socks, time.monotonic() + hold)
first = {"connected": len(state), "answered": sum(answered.values()),
         "connected_unanswered": sum(1 for s in state if not answered.get(s))}
waiting = [s for s in socks if s not in state]
for s in state:
    s.close()
state, answered = serve_round(waiting, time.monotonic() + late)
print(json.dumps({"first": first, "late_answered": sum(answered.values()), "late_total": len(waiting)}))
"""


def test_more_clients_than_sockets_are_served_in_turn_never_left_hanging(test_network, tmp_path):
    docroot = tmp_path / "docroot"
    docroot.mkdir()
    # One stack worker: with several, each has its share of the sockets
    # (README, "One stack per core"), and this test is about one pool.
    with shim_lighttpd(docroot, tmp_path, options=("--sockets", str(SOCKETS), "--cores", "1")) as server:
        done = in_client([sys.executable, "-c", _CLIENT, NET.srv_ip, "8080", str(CLIENTS), "2", "15"],
                         timeout=60)
        assert done.returncode == 0, done.stderr.decode()
        result = json.loads(done.stdout)
        counters = server.stats()["tcp"]
        said = server.output().count("SYNs go unanswered until there is room")
    first = result["first"]
    # Handshakes complete only where a socket waits: every one is served.
    assert 0 < first["connected"] < CLIENTS and first["connected_unanswered"] == 0, result
    assert counters.get("tcp_syn_dropped_no_room", 0) > 1 and said == 1, (counters, said)   # one line an episode
    # The rest retried their SYNs once sockets came free, and were served.
    assert result["late_answered"] == result["late_total"] == CLIENTS - first["connected"], result


def test_a_socket_count_out_of_range_is_one_line_before_the_program_starts():
    done = subprocess.run(mtcpshim_command("run", "--sockets", "8", "--", "true"), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "mtcpshim run: argument --sockets: sockets '8': want a whole number from 16 to 1048576"]


def test_sockets_past_the_address_space_are_one_line_before_the_program_starts(test_network):
    # 2^20 sockets of two 64 MiB rings: 128 TiB, more than a process can map.
    done = subprocess.run(mtcpshim_command("run", "--sockets", "1048576", "--buffer-size", "64M",
                                           "--", "true"), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("mtcpshim: cannot map 131072 GiB of address space for 1048576 sockets' rings")
    assert line.endswith("lower --sockets or --buffer-size")
