"""A connection that moved bulk data and then went quiet gives its ring
pages back (docs/architecture.md 2.1): a keep-alive connection costs no
ring memory while it idles, whatever it carried before.  Both directions:
the program under the stack sends 4 MiB with send() (its TX ring), then
receives 4 MiB (its RX ring), then the connection idles, and the program
reads what of the region it still maps (RssShmem)."""
import sys

import pytest

from support.net import NET, in_client
from support.programs import ShimProgram, wait_until

pytestmark = pytest.mark.integration

PORT = 8092
BULK = 4 << 20
IDLE_SECONDS = 0.6      # several of the stack's housekeeping looks (0.1 s apart)

# Under the stack.
_SERVER = r"""
import socket, sys, time
bulk, idle = int(sys.argv[2]), float(sys.argv[3])
def shmem():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssShmem:"))
listener = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("listening", flush=True)
conn, _ = listener.accept()
conn.recv(1)
conn.sendall(bytes(bulk))
busy_tx = shmem()
got = 0
while got < bulk:
    got += len(conn.recv(1 << 16))
busy = max(busy_tx, shmem())
time.sleep(idle)
conn.sendall(f"{busy} {shmem()}\n".encode())
conn.recv(1)
"""

# On the client's kernel.
_CLIENT = r"""
import socket, sys
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])))
bulk = int(sys.argv[3])
conn.sendall(b"g")
got = 0
while got < bulk:
    got += len(conn.recv(1 << 16))
conn.sendall(bytes(bulk))
print(conn.makefile().readline().strip(), flush=True)
conn.close()
"""


def test_a_quiet_connection_gives_back_the_ring_pages_its_bulk_data_took(test_network, tmp_path):
    server = ShimProgram([sys.executable, "-c", _SERVER, str(PORT), str(BULK), str(IDLE_SECONDS)],
                         tmp_path / "server.log")
    try:
        server.stack_pid()
        wait_until(lambda: "listening" in server.output(), 30, "the server to listen")
        done = in_client([sys.executable, "-c", _CLIENT, NET.srv_ip, str(PORT), str(BULK)], timeout=60)
        assert done.returncode == 0, done.stderr.decode()
        busy_kib, idle_kib = (int(n) for n in done.stdout.split())
        # Busy: both 1 MiB rings full (at least); idle: a few pages of the region.
        assert busy_kib >= 1024, (busy_kib, idle_kib)
        assert idle_kib < 512, f"the program maps {idle_kib} KiB of the region after idling (busy: {busy_kib})"
    finally:
        server.stop()
