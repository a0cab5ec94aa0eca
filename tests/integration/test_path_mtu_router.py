"""Path MTU discovery against the real Linux kernel as a router: lighttpd
under the stack sends a file to curl on a kernel client through a router
namespace whose link toward the client carries 1280-byte packets, while
the client's own end of that link (MTU 1500) announces MSS 1460.  Every
full-sized segment the stack sends first is too large: the router drops it
with an ICMP "fragmentation needed", and the download completes only if
the stack shrinks its segments.  It runs twice: with the stack's veth as
the kernel ships it, where the stack hands over 64 KB super-frames the
router cuts into segments of the stack's MSS (so the MSS is what must
shrink), and with offloads off there, one segment per frame.

    stack ns                    router ns (kernel, forwarding)           client ns (kernel)
    pm<tag>s  <--- veth --->  pm<tag>r 198.18.77.1   pm<tag>o 198.18.78.1  <--- veth --->  pm<tag>c
    198.18.77.2 (our stack)                           MTU 1280                              198.18.78.2, MTU 1500

Names are random per run; the namespaces are deleted on the way out."""
import json
import os
import secrets
import shutil
import subprocess

import pytest

from mtcpshim import stat, testnet
from support.net import SERVER_PORT
from support.programs import ShimProgram, lighttpd_config, wait_until
from support.transfers import sha256_of

pytestmark = pytest.mark.integration

STACK_NET, CLIENT_NET = "198.18.77", "198.18.78"
STACK_IP, CLIENT_IP = f"{STACK_NET}.2", f"{CLIENT_NET}.2"
BOTTLENECK_MTU = 1280
BODY_SIZE = 4 * 1024 * 1024
DOWNLOAD_TIMEOUT = 120
PROBE_TABLE = "mtcpshim_pmtu_probe"


def run(*argv, ns=None, **kwargs) -> subprocess.CompletedProcess:
    command = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
    return subprocess.run(command, check=True, capture_output=True, timeout=60, **kwargs)


class RoutedNet:
    """Three namespaces: the stack's, a kernel router's and a kernel client's."""

    def __init__(self, stack_offloads: bool):
        self.stack_offloads = stack_offloads
        tag = secrets.token_hex(3)
        self.stack_ns, self.router_ns, self.client_ns = (
            f"mtpm-{tag}-{role}" for role in ("srv", "rtr", "cli"))
        self.stack_if, self.router_in, self.router_out, self.client_if = (
            f"pm{tag}{end}" for end in "sroc")

    def up(self) -> None:
        for ns in (self.stack_ns, self.router_ns, self.client_ns):
            run("ip", "netns", "add", ns)
            # IPv4 only, as the stack: no router solicitations in the way.
            run("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1", ns=ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "link", "add", self.stack_if, "netns", self.stack_ns, "type", "veth",
            "peer", "name", self.router_in, "netns", self.router_ns)
        run("ip", "link", "add", self.router_out, "netns", self.router_ns, "type", "veth",
            "peer", "name", self.client_if, "netns", self.client_ns)
        run("ip", "-n", self.router_ns, "addr", "add", f"{STACK_NET}.1/24", "dev", self.router_in)
        run("ip", "-n", self.router_ns, "addr", "add", f"{CLIENT_NET}.1/24", "dev", self.router_out)
        run("ip", "-n", self.router_ns, "link", "set", self.router_out, "mtu", str(BOTTLENECK_MTU))
        run("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=self.router_ns)
        run("ip", "-n", self.client_ns, "addr", "add", f"{CLIENT_IP}/24", "dev", self.client_if)
        if not self.stack_offloads:
            testnet._set_offloads(self.stack_ns, self.stack_if, False)
        for ns, ifname in ((self.stack_ns, self.stack_if), (self.router_ns, self.router_in),
                           (self.router_ns, self.router_out), (self.client_ns, self.client_if)):
            run("ip", "-n", ns, "link", "set", ifname, "up")
        run("ip", "-n", self.client_ns, "route", "add", "default", "via", f"{CLIENT_NET}.1")
        # Count what the stack sends the router before it is routed: packets
        # too large for the bottleneck are dropped before any later hook.
        run("nft", "-f", "-", ns=self.router_ns, input=f"""
table ip {PROBE_TABLE} {{
	chain from_stack {{
		type filter hook prerouting priority 0;
		iifname "{self.router_in}" ip protocol tcp ip length > {BOTTLENECK_MTU} counter
		iifname "{self.router_in}" ip protocol tcp counter
	}}
}}
""".encode())

    def down(self) -> None:
        for ns in (self.stack_ns, self.router_ns, self.client_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=60)

    def in_client(self, *argv, timeout) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.client_ns, *argv],
                              capture_output=True, timeout=timeout)

    def stack_packets(self) -> tuple[int, int]:
        """TCP packets from the stack that reached the router: (larger than
        the bottleneck MTU, all)."""
        listing = json.loads(run("nft", "-j", "list", "table", "ip", PROBE_TABLE,
                                 ns=self.router_ns).stdout)["nftables"]
        oversized, total = (next(e["counter"]["packets"] for e in item["rule"]["expr"] if "counter" in e)
                            for item in listing if "rule" in item)
        return oversized, total

    def icmp_sent(self) -> int:
        """Destination unreachables the router sent (/proc/net/snmp)."""
        lines = [line.split() for line in run("cat", "/proc/net/snmp", ns=self.router_ns)
                 .stdout.decode().splitlines() if line.startswith("Icmp:")]
        return int(dict(zip(lines[0], lines[1]))["OutDestUnreachs"])


@pytest.fixture(params=[True, False], ids=["super-frames", "one-segment-per-frame"])
def routed_net(request):
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    for tool in ("lighttpd", "curl", "nft"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    net = RoutedNet(stack_offloads=request.param)
    try:
        net.up()
        yield net
    finally:
        net.down()


def test_a_download_through_a_smaller_mtu_completes_with_segments_shrunk(routed_net, tmp_path):
    net = routed_net
    docroot = tmp_path / "docroot"
    docroot.mkdir()
    (docroot / "ping.txt").write_bytes(b"pong\n")
    (docroot / "body.bin").write_bytes(os.urandom(BODY_SIZE))
    url = f"http://{STACK_IP}:{SERVER_PORT}"
    server = ShimProgram(["lighttpd", "-D", "-f", str(lighttpd_config(tmp_path, docroot))],
                         tmp_path / "launcher.log",
                         options=["--netns", net.stack_ns, "--iface", net.stack_if, "--ip", f"{STACK_IP}/24",
                                  "--gateway", f"{STACK_NET}.1"])
    try:
        wait_until(lambda: server.proc.poll() is not None or net.in_client(
            "curl", "-sf", "-m", "2", "-o", "/dev/null", f"{url}/ping.txt", timeout=10).returncode == 0,
            30, "lighttpd to answer over the stack through the router")
        assert server.proc.poll() is None, server.output()
        received = tmp_path / "received.bin"
        result = net.in_client("curl", "-sS", "--fail", "-m", str(DOWNLOAD_TIMEOUT), "-o", str(received),
                               f"{url}/body.bin", timeout=DOWNLOAD_TIMEOUT + 10)
        assert result.returncode == 0, result.stderr.decode() + server.output()
        snapshot = stat.fetch(net.stack_ns, net.stack_if)
    finally:
        server.stop()
    assert sha256_of(received) == sha256_of(docroot / "body.bin")

    oversized, total = net.stack_packets()
    icmp_sent = net.icmp_sent()
    print(f"stack -> router: {total} TCP packets, {oversized} over {BOTTLENECK_MTU} bytes; "
          f"router sent {icmp_sent} ICMP unreachables; stack: "
          f"{json.dumps({k: v for k, v in snapshot['tcp'].items() if 'frag' in k or 'pmtu' in k})}")
    # The router drops every packet (or super-frame cut into pieces) over
    # its MTU with DF set and reports each: the body arrived whole, so the
    # stack shrank its segments, and after the first report lowered the MSS
    # the rest of that first flight drew the only other reports.
    assert oversized >= 1
    assert 1 <= icmp_sent <= 10           # the initial window
    assert snapshot["interface"]["icmp_frag_needed"] == icmp_sent
    assert snapshot["tcp"]["tcp_pmtu_lowered"] == 1
    if not net.stack_offloads:
        # One segment per frame: the router saw the segments themselves.
        assert oversized == icmp_sent
        assert total > BODY_SIZE // BOTTLENECK_MTU
