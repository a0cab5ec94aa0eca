"""Test networks and the faults on their links.

The shared test network (mtcp-cli/mtcp-srv, `mtcpshim testnet`) is NET.
Private networks get random names (mtcpt-<hex>-cli / -srv, interfaces
mt<hex>-c / -s / -l), so runs never meet the developer's network or each
other, and they are removed again on the way out.

Faults come from three places:
  - loss: the test network's own nftables netdev table (testnet.up);
  - duplication: an nftables `ip` table in the client namespace, below;
  - reordering, corruption, delay: `mtcpshim run --impair` (stack/io/impair.py).

Duplication cannot live in the netdev table beside loss: a netdev `dup to`
only transmits the copy, and the copy of a frame arriving at the client
would go back out towards the stack.  The `ip` family's `dup to` routes the
copy instead: towards the client it goes through loopback back into the
client's own input path (TCP sees the segment twice); from the client it is
routed to the stack's address through the veth (the stack sees the frame
twice).
"""
from __future__ import annotations

import contextlib
import json
import secrets
import subprocess

from mtcpshim import testnet
from mtcpshim.netns import enter_netns

NET = testnet.TESTNET
SERVER_PORT = 8080          # lighttpd under the stack
KERNEL_HTTP_PORT = 8000     # python3 -m http.server on the client's kernel
SERVER_URL = f"http://{NET.srv_ip}:{SERVER_PORT}"
DUP_TABLE = "mtcpshim_dup"
DUP_SCALE = 10000           # percentages in steps of 0.01, like the loss table

# The faults of issue 4, alone and together: link faults for set_link_faults
# and an --impair spec for the stack.  Delay applies in each direction.
FAULTS = {
    "loss 5%": dict(loss_percent=5),
    "reordering 25%": dict(impair="reorder=25%,seed=7"),
    "duplication 1%": dict(duplicate_percent=1),
    "corruption 0.1%": dict(impair="corrupt=0.1%,seed=7"),
    "delay 20ms +- 10ms": dict(impair="delay=20ms,jitter=10ms,seed=7"),
    "all of them": dict(loss_percent=5, duplicate_percent=1,
                        impair="reorder=25%,corrupt=0.1%,delay=20ms,jitter=10ms,seed=7"),
}


class HarnessError(Exception):
    """A network, program or transfer could not be set up or did not finish; one line."""


def needs_frame_exact(fault: dict) -> bool:
    """nftables loss and duplication act on frames: on a veth at its default
    offloads a frame may be a 64 KB GSO frame, 45 segments lost or copied at
    once.  The stack's own injector (--impair) works at any frame size."""
    return bool(fault.get("loss_percent") or fault.get("duplicate_percent"))


@contextlib.contextmanager
def private_network(offloads: bool = True):
    """A fresh test network under random names; always removed afterwards.
    offloads False: the frame-exact variant, one segment per frame (see testnet)."""
    tag = secrets.token_hex(3)
    net = testnet.TestNet(cli_ns=f"mtcpt-{tag}-cli", srv_ns=f"mtcpt-{tag}-srv",
                          cli_if=f"mt{tag}-c", srv_if=f"mt{tag}-s", sink_if=f"mt{tag}-l", offloads=offloads)
    try:
        testnet.up(net=net)
        yield net
    finally:
        testnet.down(net)


def in_client(argv, net: testnet.TestNet = NET, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """Runs argv in the client namespace, on the kernel stack."""
    return subprocess.run(["ip", "netns", "exec", net.cli_ns, *argv], capture_output=True, timeout=timeout, **kwargs)


def curl_in_client(net: testnet.TestNet, url: str, output: str = "/dev/null", timeout: float = 5,
                   extra=()) -> subprocess.CompletedProcess:
    return in_client(["curl", "-sS", "--fail", "-m", str(timeout), *extra, "-o", output, url], net,
                     timeout=timeout + 10)


def _must_in_client(net: testnet.TestNet, argv, **kwargs) -> subprocess.CompletedProcess:
    result = in_client(argv, net, **kwargs)
    if result.returncode != 0:
        raise HarnessError(f"`{' '.join(argv)}` in {net.cli_ns} failed: {result.stderr.decode().strip()}")
    return result


def set_link_faults(net: testnet.TestNet, loss_percent: float = 0, duplicate_percent: float = 0) -> None:
    """Random loss and duplication in both directions on the client's veth,
    outside our stack; zero removes them."""
    testnet.up(loss_percent=loss_percent or None, net=net)
    _set_duplication(net, duplicate_percent)


def _set_duplication(net: testnet.TestNet, percent: float) -> None:
    threshold = round(percent * DUP_SCALE / 100)
    if not 0 <= threshold <= DUP_SCALE:
        raise HarnessError(f"duplication must be between 0 and 100 percent, not {percent}")
    # Declare-then-delete makes the script one atomic replacement.
    ruleset = f"table ip {DUP_TABLE}\ndelete table ip {DUP_TABLE}\n"
    if threshold:
        # The copy that comes back in through lo must not be copied again.
        ruleset += f"""
table ip {DUP_TABLE} {{
	chain to_client {{
		type filter hook prerouting priority 0;
		iifname "{net.cli_if}" numgen random mod {DUP_SCALE} < {threshold} counter dup to 127.0.0.1 device "lo"
	}}
	chain from_client {{
		type filter hook output priority 0;
		oifname "{net.cli_if}" numgen random mod {DUP_SCALE} < {threshold} counter dup to {net.srv_ip} device "{net.cli_if}"
	}}
}}
"""
    _must_in_client(net, ["nft", "-f", "-"], input=ruleset.encode())


def link_fault_counters(net: testnet.TestNet) -> dict[str, int]:
    """Frames the client-side rules dropped and duplicated so far."""
    counters = {}
    loss = testnet.status(net)["loss"]
    if loss is not None:
        counters["nft_lost_to_client"] = loss["dropped_to_client"]
        counters["nft_lost_from_client"] = loss["dropped_from_client"]
    listing = json.loads(_must_in_client(net, ["nft", "-j", "list", "ruleset", "ip"]).stdout)["nftables"]
    for item in listing:
        rule = item.get("rule")
        if rule and rule["table"] == DUP_TABLE:
            packets = next(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
            counters[f"nft_duplicated_{rule['chain']}"] = packets
    return counters


def kernel_counters(net: testnet.TestNet) -> dict[str, int]:
    """The client kernel's IP/TCP counters (MIB names as in nstat)."""
    text = _must_in_client(net, ["cat", "/proc/net/snmp", "/proc/net/netstat"]).stdout.decode()
    lines = text.splitlines()
    values = {}
    for names, numbers in zip(lines[0::2], lines[1::2]):
        group, _, names = names.partition(": ")
        for name, number in zip(names.split(), numbers.split(": ", 1)[1].split()):
            values[f"{group}.{name}"] = int(number)
    return values


def mac_of(ns: str, ifname: str) -> bytes:
    (link,) = json.loads(subprocess.run(["ip", "-n", ns, "-j", "link", "show", "dev", ifname],
                                        check=True, capture_output=True).stdout)
    return bytes.fromhex(link["address"].replace(":", ""))


@contextlib.contextmanager
def packet_socket(net: testnet.TestNet):
    """An AF_PACKET socket on the client's veth, for frames built by hand."""
    import socket
    with enter_netns(net.cli_ns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        sock.bind((net.cli_if, 0))
        yield sock
    finally:
        sock.close()
