"""Servers that listen on `::`, as most do by default: under the stack they
serve the kernel's IPv4 clients of the stack's address, which they see as
IPv4-mapped peers, as on Linux."""
import json
import shutil
import sys

import pytest

from support.net import NET, SERVER_PORT, curl_in_client, in_client
from support.programs import ShimProgram, wait_until
from support.transfers import sha256_of

IPERF_SECONDS = 2


def _listening(net, port: int) -> bool:
    """Whether the server under the stack accepts a connection yet."""
    done = in_client(["bash", "-c", f"exec 3<>/dev/tcp/{net.srv_ip}/{port}"], net, timeout=10)
    return done.returncode == 0


@pytest.mark.skipif(shutil.which("iperf3") is None, reason="iperf3 is not installed")
@pytest.mark.parametrize("reverse", [False, True], ids=["stack-receives", "stack-sends"])
def test_iperf3_on_its_default_dual_stack_listener(test_network, tmp_path, reverse):
    """`iperf3 -s` without -4 listens on AF_INET6 `::` with IPV6_V6ONLY off."""
    server = ShimProgram(["iperf3", "-s", "-p", str(SERVER_PORT), "--forceflush"], tmp_path / "iperf3.log")
    try:
        server.stack_pid()
        wait_until(lambda: "Server listening" in server.output(), 20, "iperf3 to listen")
        client = in_client(["iperf3", "-c", NET.srv_ip, "-p", str(SERVER_PORT), "-t", str(IPERF_SECONDS), "-J",
                            *(["-R"] if reverse else [])], timeout=60, text=True)
        report = json.loads(client.stdout)
        assert "error" not in report, report["error"]
        assert report["end"]["sum_received"]["bytes"] > 0
        # iperf3's control and data connections, through the stack
        assert server.stats()["tcp"]["tcp_passive_opens"] == 2
    finally:
        server.stop()


def test_python_http_server_bound_to_any_ipv6(test_network, docroot, tmp_path):
    """`python3 -m http.server --bind ::` (its dual-stack server) serves a
    large file byte-exact and logs the IPv4-mapped client."""
    port = SERVER_PORT
    server = ShimProgram([sys.executable, "-m", "http.server", str(port), "--bind", "::", "--directory",
                          str(docroot)], tmp_path / "http.log")
    try:
        server.stack_pid()
        wait_until(lambda: _listening(NET, port), 20, "http.server to listen")
        out = tmp_path / "large.bin"
        done = curl_in_client(NET, f"http://{NET.srv_ip}:{port}/large.bin", output=str(out), timeout=60)
        assert done.returncode == 0, done.stderr
        assert sha256_of(out) == sha256_of(docroot / "large.bin")
        wait_until(lambda: f"::ffff:{NET.cli_ip}" in server.output(), 10, "the request in http.server's log")
        assert server.stats()["tcp"]["tcp_passive_opens"] == 2   # _listening's and curl's
    finally:
        server.stop()


NODE_SERVER = """
const http = require('http');
const body = Buffer.alloc(1 << 20, 'n');
http.createServer((request, response) => {
  console.log('from', request.socket.remoteAddress, 'family', request.socket.remoteFamily);
  response.end(body);
}).listen(%d, () => console.log('listening'));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_node_http_server_on_its_default_listener(test_network, tmp_path):
    """node's `server.listen(port)` binds `::` (dual-stack) when it can."""
    server = ShimProgram(["node", "-e", NODE_SERVER % SERVER_PORT], tmp_path / "node.log")
    try:
        server.stack_pid()
        wait_until(lambda: "listening" in server.output(), 30, "node to listen")
        out = tmp_path / "body"
        done = curl_in_client(NET, f"http://{NET.srv_ip}:{SERVER_PORT}/", output=str(out), timeout=30)
        assert done.returncode == 0, done.stderr
        assert out.read_bytes() == b"n" * (1 << 20)
        wait_until(lambda: "from" in server.output(), 10, "the request in node's log")
        assert f"from ::ffff:{NET.cli_ip} family IPv6" in server.output()
        assert server.stats()["tcp"]["tcp_passive_opens"] == 1
    finally:
        server.stop()
