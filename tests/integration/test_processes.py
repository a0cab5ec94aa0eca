"""The program's processes as the kernel treats them: a worker killed with
SIGKILL closes what it held, and `mtcpshim stat` shows who holds what."""
import os
import signal
import subprocess
import sys

from support.net import NET, SERVER_PORT
from support.programs import ShimProgram, wait_until

# The parent accepts one connection, forks a worker and lets go of the
# listener and the connection: the worker holds both, alone.
HANDING_SERVER = """
import os, socket, sys, time
listener = socket.create_server(("", int(sys.argv[1])))
print("listening", flush=True)
conn, _ = listener.accept()
worker = os.fork()
if worker == 0:
    time.sleep(3600)
    os._exit(0)
conn.close()
listener.close()
print("worker", worker, flush=True)
os.waitpid(worker, 0)
print("worker gone", flush=True)
time.sleep(3600)
"""

# The kernel's client: connects, waits for a line on stdin, then reports
# what its connection and a new one meet.
CLIENT = """
import socket, sys
address = (sys.argv[1], int(sys.argv[2]))
conn = socket.create_connection(address, timeout=10)
print("connected", flush=True)
sys.stdin.readline()
print("read", conn.recv(100), flush=True)
try:
    socket.create_connection(address, timeout=10)
    print("new connection accepted", flush=True)
except ConnectionRefusedError:
    print("new connection refused", flush=True)
"""


def test_a_worker_killed_with_sigkill_closes_what_it_held(test_network, tmp_path):
    server = ShimProgram([sys.executable, "-c", HANDING_SERVER, str(SERVER_PORT)], tmp_path / "server.log")
    client = None
    try:
        server.stack_pid()
        wait_until(lambda: "listening" in server.output(), 20, "the server to listen")
        client = subprocess.Popen(["ip", "netns", "exec", NET.cli_ns, sys.executable, "-c", CLIENT, NET.srv_ip,
                                   str(SERVER_PORT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert client.stdout.readline().strip() == "connected"
        wait_until(lambda: "worker " in server.output(), 20, "the worker to hold the sockets")
        worker = int(server.output().split("worker ", 1)[1].split()[0])
        held = server.stats()["processes"]["sockets"]
        assert len(held[str(worker)]) == 2                  # the listener and the connection
        os.kill(worker, signal.SIGKILL)
        wait_until(lambda: "worker gone" in server.output(), 20, "the worker to be reaped")
        out, _ = client.communicate("go\n", timeout=30)
        assert out.splitlines() == ["read b''", "new connection refused"]
        processes = server.stats()["processes"]
        assert processes["ended"] == 1 and str(worker) not in processes["sockets"]
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()
        server.stop()


# A privilege-separated server in miniature: the parent accepts and hands
# each connection over an AF_UNIX socket to a worker it forked before any
# connection existed, closing its own copy at once.
PASSING_SERVER = """
import os, socket, sys
parent_end, worker_end = socket.socketpair()
worker = os.fork()
if worker == 0:
    parent_end.close()
    while True:
        _, fds, _, _ = socket.recv_fds(worker_end, 1, 1)
        if not fds:
            os._exit(0)
        conn = socket.socket(fileno=fds[0])
        request = conn.recv(4096)
        body = f"worker {os.getpid()} family {conn.family.name}".encode()
        conn.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(body) + body)
        conn.close()
worker_end.close()
listener = socket.create_server(("", int(sys.argv[1])))
print("worker", worker, flush=True)
for _ in range(int(sys.argv[2])):
    conn, _ = listener.accept()
    socket.send_fds(parent_end, [b"c"], [conn.fileno()])
    conn.close()
parent_end.close()
os.waitpid(worker, 0)
"""


def test_connections_passed_to_a_worker_over_af_unix_are_served_there(test_network, tmp_path):
    requests = 20
    server = ShimProgram([sys.executable, "-c", PASSING_SERVER, str(SERVER_PORT), str(requests)],
                         tmp_path / "server.log")
    try:
        server.stack_pid()
        wait_until(lambda: "worker " in server.output(), 20, "the server to listen")
        worker = server.output().split("worker ", 1)[1].split()[0]
        for _ in range(requests):
            got = subprocess.run(["ip", "netns", "exec", NET.cli_ns, "curl", "-s", "-m", "10",
                                  f"http://{NET.srv_ip}:{SERVER_PORT}/"], capture_output=True, text=True, timeout=30)
            assert got.stdout == f"worker {worker} family AF_INET", got
        assert server.wait(30) == 0
    finally:
        server.stop()
