"""Processes that share a port as servers do: pre-forked workers, each with
its own SO_REUSEPORT listener (nginx `reuseport`, gunicorn --reuse-port),
serve the kernel's clients through the stack."""
import sys

from support.net import NET, SERVER_PORT, curl_in_client
from support.programs import ShimProgram, wait_until

WORKERS = 2
REQUESTS = 32

# Each worker answers with its pid, so the client sees who served it.
REUSEPORT_SERVER = """
import os, socket, sys
port, workers = int(sys.argv[1]), int(sys.argv[2])

def serve():
    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listener.bind(("::", port))
    listener.listen(64)
    print("listening", os.getpid(), flush=True)
    while True:
        conn, _ = listener.accept()
        conn.recv(4096)
        body = str(os.getpid()).encode()
        conn.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n%s" % (len(body), body))
        conn.close()

children = []
for _ in range(workers):
    pid = os.fork()
    if pid == 0:
        serve()
    children.append(pid)
for pid in children:
    os.waitpid(pid, 0)
"""


def test_pre_forked_workers_with_so_reuseport_split_the_clients(test_network, tmp_path):
    server = ShimProgram([sys.executable, "-c", REUSEPORT_SERVER, str(SERVER_PORT), str(WORKERS)],
                         tmp_path / "server.log")
    try:
        server.stack_pid()
        wait_until(lambda: server.output().count("listening") == WORKERS, 20, "both workers to listen")
        served_by = []
        for n in range(REQUESTS):
            out = tmp_path / f"reply-{n}"
            done = curl_in_client(NET, f"http://{NET.srv_ip}:{SERVER_PORT}/", output=str(out), timeout=10)
            assert done.returncode == 0, done.stderr
            served_by.append(out.read_text())
        workers = {line.split()[1] for line in server.output().splitlines() if line.startswith("listening")}
        assert set(served_by) == workers       # every reply from a worker, and both served some
        assert server.stats()["tcp"]["tcp_passive_opens"] == REQUESTS
    finally:
        server.stop()
