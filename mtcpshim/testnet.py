"""The test network: two namespaces joined by a veth pair.

    mtcp-cli                                      mtcp-srv
    kernel TCP/IP, 198.18.0.1/24                  no kernel address: the user-level
    mtcp-c  <--------------- veth --------------> mtcp-s   stack owns 198.18.0.2/24 here
    mtcp-lost (IFB, always down): sink for frames the loss rule picks

Both ends run without IPv6 (the stack is IPv4-only and the kernel's router
solicitations would be noise).  Offloads stay as the kernel ships a veth
(checksum offload, TSO and GSO on): a kernel sender's 64 KB frames cross
whole, as a NIC with GRO hands merged frames to a packet socket.  The
frame-exact variant (TestNet.offloads False, `testnet up --no-offloads`)
turns them off and sends one segment per frame with complete checksums, so
that loss and duplication count wire frames; up() switches a network
between the two in place.

Optional random loss is applied on mtcp-c, outside our stack code, by the
nftables netdev table `mtcpshim_loss`:
  - to the client: the ingress hook on mtcp-c drops the frame before the
    client's kernel sees it.
  - from the client: the egress hook on mtcp-c runs before the frame reaches
    the wire. A `drop` there would report NET_XMIT_DROP to the client's
    kernel TCP, which then treats the segment as not yet sent and resends it:
    local congestion, not loss. Forwarding the frame to a down device
    instead reports success, so the frame is lost as on a wire.
    (A rule on mtcp-s ingress could not stand in: AF_PACKET sockets get their
    copy of a received frame before the netdev ingress hook runs.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence

from mtcpshim.netns import enter_netns, netns_exists, run_in_ns
from mtcpshim.stack.io.base import ETHTOOL_GTSO, ethtool_value


class TestNetError(Exception):
    """A one-line, user-readable reason the test network could not be handled."""

    __test__ = False  # not a pytest test class


@dataclasses.dataclass(frozen=True)
class TestNet:
    __test__ = False  # not a pytest test class

    cli_ns: str = "mtcp-cli"
    srv_ns: str = "mtcp-srv"
    cli_if: str = "mtcp-c"
    srv_if: str = "mtcp-s"
    sink_if: str = "mtcp-lost"
    cli_ip: str = "198.18.0.1"
    srv_ip: str = "198.18.0.2"
    prefix: int = 24
    loss_table: str = "mtcpshim_loss"
    # True: the veth as the kernel ships it (checksum offload, TSO/GSO: a
    # kernel sender's 64 KB frames cross whole).  False: offloads off and one
    # segment per frame, so loss and duplication count wire frames.
    offloads: bool = True


TESTNET = TestNet()
# The same network, one segment per frame (`mtcpshim testnet up --no-offloads`).
FRAME_EXACT_TESTNET = dataclasses.replace(TESTNET, offloads=False)

# A frame is lost when numgen random mod LOSS_SCALE <= threshold - 1 (nft
# limits the right-hand side to the numgen range, so 100 % cannot be written
# as "< 10000"); the finest step is 0.01 %.
LOSS_SCALE = 10000
LINK_GONE_TIMEOUT = 3.0  # seconds a deleted link may take to disappear
REBUILD_ATTEMPTS, REBUILD_SETTLE = 3, 0.3  # after recreating a namespace (see up)

# Legacy ethtool ioctls (stack/io/base.py), as the ethtool tool uses; ethtool
# itself is not installed.  Feature name -> (get, set) command.
OFFLOADS = {
    "tx-checksum": (0x16, 0x17),
    "tso": (ETHTOOL_GTSO, 0x1F),
    "gso": (0x23, 0x24),
    "gro": (0x2B, 0x2C),
}
# What a new veth has on.  GRO is left as the kernel sets it (off on a veth
# unless XDP or a user asks), so only the frame-exact variant touches it.
SHIPPED_OFFLOADS = ("tx-checksum", "tso", "gso")  # in this order: TSO needs checksum offload
SHIPPED_GSO_MAX_SEGS = 65535  # GSO_MAX_SEGS, a new link's default


# --- public interface -------------------------------------------------------


def up(loss_percent: float | None = None, net: TestNet = TESTNET) -> None:
    """Build the test network, repairing whatever is missing or misconfigured.

    Anything already as it should be is left alone, so a running stack keeps
    its interface; a network in the other offload variant than `net.offloads`
    is switched in place.  `loss_percent` (0 to 100, step 0.01) sets random
    loss in each direction; None or 0 removes it.
    """
    _preflight()
    loss_threshold = _loss_threshold(loss_percent)
    recreated = False
    for ns in (net.cli_ns, net.srv_ns):
        if not netns_exists(ns):
            _run(["ip", "netns", "add", ns])
            recreated = True
    for _ in range(REBUILD_ATTEMPTS):
        _build_links(net)
        # A namespace deleted just before is torn down asynchronously, and
        # that has been seen to take the new veth pair with it: check again.
        if not recreated or _links_survive(net):
            break

    current = _probe_loss(net)
    if not loss_threshold:
        if current is not None:
            _run(["nft", "delete", "table", "netdev", net.loss_table], ns=net.cli_ns)
    elif current is None or current["percent"] != _percent(loss_threshold):
        _install_loss(net, loss_threshold)


def _build_links(net: TestNet) -> None:
    if not (_link_exists(net.cli_ns, net.cli_if) and _link_exists(net.srv_ns, net.srv_if)):
        # Deleting either end of a veth removes both; clear a half-built pair.
        for ns, ifname in ((net.cli_ns, net.cli_if), (net.srv_ns, net.srv_if)):
            _remove_link(ns, ifname)
        _run(["ip", "link", "add", net.cli_if, "netns", net.cli_ns,
              "type", "veth", "peer", "name", net.srv_if, "netns", net.srv_ns])
    if not _link_exists(net.cli_ns, net.sink_if):
        _run(["ip", "-n", net.cli_ns, "link", "add", net.sink_if, "type", "ifb"])

    for ns, ifname, addresses in (
        (net.cli_ns, net.cli_if, [f"{net.cli_ip}/{net.prefix}"]),
        (net.srv_ns, net.srv_if, []),
    ):
        # Before the link goes up, so the kernel never sends a router solicitation.
        _disable_ipv6(ns, ifname)
        _set_offloads(ns, ifname, net.offloads)
        link = _probe_link(ns, ifname)
        if link["addresses"] != addresses:
            _run(["ip", "-n", ns, "addr", "flush", "dev", ifname])
            for address in addresses:
                _run(["ip", "-n", ns, "addr", "add", address, "dev", ifname])
        for device in (ifname, "lo"):
            _run(["ip", "-n", ns, "link", "set", "dev", device, "up"])

    # TCP builds GSO super-packets even with TSO off and splits them only after
    # the egress hook; one segment per packet makes loss count wire frames.
    gso_max_segs = SHIPPED_GSO_MAX_SEGS if net.offloads else 1
    if _probe_link(net.cli_ns, net.cli_if)["gso_max_segs"] != gso_max_segs:
        _run(["ip", "-n", net.cli_ns, "link", "set", "dev", net.cli_if, "gso_max_segs", str(gso_max_segs)])


def _links_survive(net: TestNet) -> bool:
    time.sleep(REBUILD_SETTLE)
    return _link_exists(net.cli_ns, net.cli_if) and _link_exists(net.srv_ns, net.srv_if)


def down(net: TestNet = TESTNET) -> None:
    """Remove the test network; deleting the namespaces removes links and rules,
    and a detached stack's log of the server's interface goes with them."""
    _preflight()
    if netns_exists(net.srv_ns):
        from mtcpshim.launcher import LaunchError, runtime_path
        with contextlib.suppress(LaunchError, FileNotFoundError):
            os.unlink(runtime_path(net.srv_ns, net.srv_if, "log"))
    for ns in (net.cli_ns, net.srv_ns):
        if netns_exists(ns):
            _run(["ip", "netns", "del", ns])


def status(net: TestNet = TESTNET) -> dict:
    """What exists and how it is configured.

    {"up": bool,                         # everything up() builds is in place, in either variant
     "offloads": True | False | None,    # the kernel's defaults, frame-exact (off), or neither
     "namespaces": {name: bool},
     "links": {ifname: {"netns", "present", "admin_up", "addresses",
                        "ipv6_disabled", "offloads": {feature: bool},
                        "gso_max_segs"}},
     "loss": None | {"percent", "dropped_to_client", "dropped_from_client"}}
    """
    _preflight()
    namespaces = {ns: netns_exists(ns) for ns in (net.cli_ns, net.srv_ns)}
    links = {
        ifname: _probe_link(ns, ifname) if namespaces[ns] else _absent_link(ns)
        for ns, ifname in ((net.cli_ns, net.cli_if), (net.srv_ns, net.srv_if), (net.cli_ns, net.sink_if))
    }
    client, server = links[net.cli_if], links[net.srv_if]
    offloads = _offload_variant(client, server)
    complete = (
        all(namespaces.values())
        and all(link["present"] for link in links.values())
        and client["admin_up"] and server["admin_up"]
        and client["addresses"] == [f"{net.cli_ip}/{net.prefix}"]
        and server["addresses"] == []
        and client["ipv6_disabled"] and server["ipv6_disabled"]
        and offloads is not None
    )
    return {
        "up": complete,
        "offloads": offloads,
        "namespaces": namespaces,
        "links": links,
        "loss": _probe_loss(net) if namespaces[net.cli_ns] else None,
    }


def exec_in_client(argv: Sequence[str], net: TestNet = TESTNET) -> int:
    """Run argv in the client namespace with our stdio; return its exit status."""
    _preflight()
    if not netns_exists(net.cli_ns):
        raise TestNetError(f"namespace {net.cli_ns} does not exist: run `mtcpshim testnet up` first")
    return run_in_ns(net.cli_ns, argv).returncode


# --- helpers ----------------------------------------------------------------


def _preflight() -> None:
    if os.geteuid() != 0:
        raise TestNetError("the test network needs root (CAP_NET_ADMIN); run as root")
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            raise TestNetError(f"`{tool}` not found; install the {package} package")


def _loss_threshold(loss_percent: float | None) -> int:
    """Loss percentage -> numgen threshold out of LOSS_SCALE (0 means no loss)."""
    if not loss_percent:
        return 0
    threshold = round(loss_percent * LOSS_SCALE / 100)
    if not 0 < threshold <= LOSS_SCALE:
        raise TestNetError(f"loss must be 0 or between 0.01 and 100 percent, not {loss_percent}")
    return threshold


def _run(argv: list[str], ns: str | None = None, stdin: str | None = None) -> str:
    """Run a command (in `ns` if given); a failure becomes a one-line TestNetError."""
    command = ["ip", "netns", "exec", ns, *argv] if ns else argv
    result = subprocess.run(command, input=stdin, capture_output=True, text=True)
    if result.returncode != 0:
        reason = next((line for line in result.stderr.splitlines() if line.strip()), f"exit status {result.returncode}")
        raise TestNetError(f"`{shlex.join(command)}` failed: {reason.strip()}")
    return result.stdout


def _remove_link(ns: str, ifname: str) -> None:
    """Deletes `ifname` and waits until it is gone.  A deleted namespace's
    veth end goes asynchronously, taking its peer with it: the peer may
    vanish under us, or linger a moment and collide with the new pair."""
    subprocess.run(["ip", "-n", ns, "link", "del", "dev", ifname], capture_output=True)
    deadline = time.monotonic() + LINK_GONE_TIMEOUT
    while _link_exists(ns, ifname):
        if time.monotonic() > deadline:
            raise TestNetError(f"{ifname} in {ns} did not go away")
        time.sleep(0.02)


def _link_exists(ns: str, ifname: str) -> bool:
    with enter_netns(ns):
        try:
            socket.if_nametoindex(ifname)
        except OSError:
            return False
    return True


def _absent_link(ns: str) -> dict:
    return {"netns": ns, "present": False, "admin_up": False, "addresses": [],
            "ipv6_disabled": False, "offloads": {}, "gso_max_segs": None}


def _probe_link(ns: str, ifname: str) -> dict:
    try:
        return _probe_present_link(ns, ifname) if _link_exists(ns, ifname) else _absent_link(ns)
    except (TestNetError, OSError):
        # A namespace's teardown is asynchronous: the link may go while we look.
        if netns_exists(ns) and _link_exists(ns, ifname):
            raise
        return _absent_link(ns)


def _probe_present_link(ns: str, ifname: str) -> dict:
    (link,) = json.loads(_run(["ip", "-n", ns, "-j", "-d", "addr", "show", "dev", ifname]))
    return {
        "netns": ns,
        "present": True,
        "admin_up": "UP" in link["flags"],
        "addresses": [f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", ())],
        "ipv6_disabled": _read_sysctl(ns, f"net/ipv6/conf/{ifname}/disable_ipv6") == "1",
        "offloads": _read_offloads(ns, ifname),
        "gso_max_segs": link.get("gso_max_segs"),
    }


def _read_sysctl(ns: str, key: str) -> str:
    # /proc/sys/net shows the namespace of the thread that opens the file.
    with enter_netns(ns), open(f"/proc/sys/{key}") as f:
        return f.read().strip()


def _disable_ipv6(ns: str, ifname: str) -> None:
    with enter_netns(ns), open(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6", "w") as f:
        f.write("1")


def _ethtool(sock: socket.socket, ifname: str, command: int, data: int = 0) -> int:
    try:
        return ethtool_value(sock, ifname, command, data)
    except OSError as error:
        raise TestNetError(f"ethtool ioctl {command:#x} on {ifname} failed: {error.strerror}") from None


def _read_offloads(ns: str, ifname: str) -> dict[str, bool]:
    with enter_netns(ns), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        return {name: bool(_ethtool(sock, ifname, get)) for name, (get, _) in OFFLOADS.items()}


def _set_offloads(ns: str, ifname: str, shipped: bool) -> None:
    """The shipped offloads on (GRO untouched), or every offload off."""
    wanted = dict.fromkeys(SHIPPED_OFFLOADS, True) if shipped else dict.fromkeys(OFFLOADS, False)
    with enter_netns(ns), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for name, on in wanted.items():
            get, set_ = OFFLOADS[name]
            if bool(_ethtool(sock, ifname, get)) != on:
                _ethtool(sock, ifname, set_, int(on))
                # The kernel drops a feature whose dependencies are off without an error.
                if bool(_ethtool(sock, ifname, get)) != on:
                    raise TestNetError(f"could not turn {name} {'on' if on else 'off'} on {ifname} in {ns}")


def _offload_variant(client: dict, server: dict) -> bool | None:
    """True: the shipped offloads on both ends; False: frame-exact; None: neither."""
    ends = (client, server)
    if all(all(end["offloads"].get(name) for name in SHIPPED_OFFLOADS) for end in ends) \
            and client["gso_max_segs"] == SHIPPED_GSO_MAX_SEGS:
        return True
    if all(end["present"] and not any(end["offloads"].values()) for end in ends) and client["gso_max_segs"] == 1:
        return False
    return None


def _install_loss(net: TestNet, threshold: int) -> None:
    # Declaring then deleting the table makes the whole script one atomic
    # replacement, whether or not the table existed.
    ruleset = f"""
table netdev {net.loss_table}
delete table netdev {net.loss_table}
table netdev {net.loss_table} {{
	chain to_client {{
		type filter hook ingress device "{net.cli_if}" priority 0;
		numgen random mod {LOSS_SCALE} <= {threshold - 1} counter drop
	}}
	chain from_client {{
		type filter hook egress device "{net.cli_if}" priority 0;
		numgen random mod {LOSS_SCALE} <= {threshold - 1} counter fwd to "{net.sink_if}"
	}}
}}
"""
    _run(["nft", "-f", "-"], ns=net.cli_ns, stdin=ruleset)


def _percent(threshold: int) -> float:
    return threshold * 100 / LOSS_SCALE


def _probe_loss(net: TestNet) -> dict | None:
    """The loss table's rate and drop counters; None if there is no table.

    percent is None when the table is not the one _install_loss writes.
    """
    listing = json.loads(_run(["nft", "-j", "list", "ruleset", "netdev"], ns=net.cli_ns))["nftables"]
    if not any("table" in item and item["table"]["name"] == net.loss_table for item in listing):
        return None
    rules = {
        item["rule"]["chain"]: item["rule"]["expr"]
        for item in listing
        if "rule" in item and item["rule"]["table"] == net.loss_table
    }
    thresholds = {_loss_threshold_of(rules.get(chain, [])) for chain in ("to_client", "from_client")}
    (threshold,) = thresholds if len(thresholds) == 1 else (None,)
    return {
        "percent": _percent(threshold) if threshold else None,
        "dropped_to_client": _counted(rules.get("to_client", [])),
        "dropped_from_client": _counted(rules.get("from_client", [])),
    }


def _loss_threshold_of(rule: list) -> int | None:
    """Threshold of a `numgen random mod LOSS_SCALE <= N` rule (JSON form), else None."""
    for statement in rule:
        match = statement.get("match", {})
        if match.get("op") == "<=" and match.get("left", {}).get("numgen", {}).get("mod") == LOSS_SCALE:
            return match["right"] + 1
    return None


def _counted(rule: list) -> int | None:
    return next((statement["counter"]["packets"] for statement in rule if "counter" in statement), None)
