"""The test network manager, exercised on a private copy of the topology.

Each test builds the network under random namespace names (mtcpt-*), so a
developer's mtcp-cli / mtcp-srv are never touched; the code path is the one
the CLI uses. Interface names and addresses are the real ones.
"""

import dataclasses
import os
import secrets
import socket
import subprocess

import pytest

from mtcpshim import testnet
from mtcpshim.netns import enter_netns, run_in_ns

requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="creating network namespaces needs root")


@pytest.fixture
def net():
    tag = secrets.token_hex(3)
    private = testnet.TestNet(cli_ns=f"mtcpt-{tag}-cli", srv_ns=f"mtcpt-{tag}-srv")
    yield private
    testnet.down(private)


def ifindex(ns, ifname):
    with enter_netns(ns):
        return socket.if_nametoindex(ifname)


def ip(ns, *args):
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True)


def borrow_stack_address(net):
    """Give the server side's kernel the stack's address, so it answers pings."""
    ip(net.srv_ns, "addr", "add", f"{net.srv_ip}/{net.prefix}", "dev", net.srv_if)


def pings(ns, address):
    return run_in_ns(ns, ["ping", "-c", "1", "-W", "0.5", address], capture_output=True).returncode == 0


# --- building and removing ---------------------------------------------------


@requires_root
def test_up_builds_the_documented_topology(net):
    testnet.up(net=net)

    state = testnet.status(net)
    client, server = state["links"][net.cli_if], state["links"][net.srv_if]
    assert state["up"]
    assert state["namespaces"] == {net.cli_ns: True, net.srv_ns: True}
    assert client["netns"] == net.cli_ns and client["admin_up"]
    assert client["addresses"] == ["198.18.0.1/24"]
    assert server["netns"] == net.srv_ns and server["admin_up"]
    assert server["addresses"] == []  # the user-level stack owns 198.18.0.2
    for link in (client, server):
        assert link["ipv6_disabled"]
        assert all(link["offloads"][name] for name in ("tx-checksum", "tso", "gso"))  # as the kernel ships a veth
    assert client["gso_max_segs"] == 65535
    assert state["offloads"] is True
    assert state["links"][net.sink_if]["present"] and not state["links"][net.sink_if]["admin_up"]
    assert state["loss"] is None


@requires_root
def test_frame_exact_variant_sends_one_segment_per_frame(net):
    testnet.up(net=dataclasses.replace(net, offloads=False))

    state = testnet.status(net)
    assert state["up"] and state["offloads"] is False
    for ifname in (net.cli_if, net.srv_if):
        assert state["links"][ifname]["offloads"] == {"tx-checksum": False, "tso": False, "gso": False, "gro": False}
    assert state["links"][net.cli_if]["gso_max_segs"] == 1


@requires_root
def test_up_switches_the_offload_variant_in_place(net):
    testnet.up(1, net=net)
    before = testnet.status(net), ifindex(net.srv_ns, net.srv_if)

    testnet.up(1, net=dataclasses.replace(net, offloads=False))
    assert testnet.status(net)["offloads"] is False
    testnet.up(1, net=net)

    assert (testnet.status(net), ifindex(net.srv_ns, net.srv_if)) == before


@requires_root
def test_up_on_a_complete_network_leaves_it_alone(net):
    testnet.up(net=net)
    before = testnet.status(net), ifindex(net.srv_ns, net.srv_if)

    testnet.up(net=net)

    assert (testnet.status(net), ifindex(net.srv_ns, net.srv_if)) == before


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda net: ip(net.cli_ns, "link", "del", net.cli_if), id="veth-deleted"),
        pytest.param(lambda net: subprocess.run(["ip", "netns", "del", net.srv_ns], check=True), id="server-netns-deleted"),
        pytest.param(lambda net: ip(net.cli_ns, "link", "del", net.sink_if), id="sink-deleted"),
        pytest.param(lambda net: ip(net.cli_ns, "addr", "flush", "dev", net.cli_if), id="client-address-lost"),
        pytest.param(borrow_stack_address, id="kernel-address-on-server"),
        pytest.param(lambda net: ip(net.cli_ns, "link", "set", net.cli_if, "down"), id="client-link-down"),
    ],
)
@requires_root
def test_up_repairs_a_damaged_network(net, damage):
    testnet.up(net=net)
    damage(net)
    assert not testnet.status(net)["up"]

    testnet.up(net=net)

    assert testnet.status(net)["up"]


@requires_root
def test_down_removes_everything_and_can_repeat(net):
    testnet.up(2, net=net)

    testnet.down(net)
    testnet.down(net)

    state = testnet.status(net)
    assert not state["up"]
    assert state["namespaces"] == {net.cli_ns: False, net.srv_ns: False}
    assert not any(link["present"] for link in state["links"].values())
    assert state["loss"] is None


# --- running commands --------------------------------------------------------


@requires_root
def test_exec_in_client_runs_inside_the_client_namespace_and_returns_its_status(net):
    testnet.up(net=net)

    script = f"ip -o addr show dev {net.cli_if} | grep -q 'inet {net.cli_ip}/' && exit 7"

    assert testnet.exec_in_client(["sh", "-c", script], net) == 7


@requires_root
def test_exec_in_client_without_a_network_is_an_error(net):
    with pytest.raises(testnet.TestNetError, match="does not exist"):
        testnet.exec_in_client(["true"], net)


@requires_root
def test_run_in_ns_passes_subprocess_options_through(net):
    testnet.up(net=net)

    result = run_in_ns(net.cli_ns, ["ip", "-o", "-4", "addr", "show", "dev", net.cli_if], capture_output=True, text=True)

    assert "inet 198.18.0.1/24" in result.stdout


@requires_root
def test_enter_netns_switches_this_thread_and_returns(net):
    testnet.up(net=net)
    home = os.stat("/proc/thread-self/ns/net").st_ino

    with enter_netns(net.srv_ns):
        assert os.stat("/proc/thread-self/ns/net").st_ino != home
        socket.if_nametoindex(net.srv_if)
        packet_socket = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))  # ETH_P_ALL

    assert os.stat("/proc/thread-self/ns/net").st_ino == home
    with packet_socket:
        # Bound by name after leaving: resolved in the namespace the socket was made in.
        packet_socket.bind((net.srv_if, 0))


# --- loss --------------------------------------------------------------------


@requires_root
def test_loss_rule_is_installed_changed_and_removed(net):
    testnet.up(2.5, net=net)
    assert testnet.status(net)["loss"] == {"percent": 2.5, "dropped_to_client": 0, "dropped_from_client": 0}

    testnet.up(0.01, net=net)
    assert testnet.status(net)["loss"]["percent"] == 0.01

    testnet.up(0, net=net)
    assert testnet.status(net)["loss"] is None

    testnet.up(7, net=net)
    testnet.up(net=net)
    assert testnet.status(net)["loss"] is None


@requires_root
def test_total_loss_drops_frames_both_ways_and_removing_it_restores_traffic(net):
    testnet.up(100, net=net)
    borrow_stack_address(net)

    assert not pings(net.cli_ns, net.srv_ip)  # its ARP request leaves mtcp-c into the sink
    assert not pings(net.srv_ns, net.cli_ip)  # its ARP request is dropped at mtcp-c ingress
    loss = testnet.status(net)["loss"]
    assert loss["dropped_from_client"] > 0
    assert loss["dropped_to_client"] > 0

    testnet.up(None, net=net)
    borrow_stack_address(net)  # up() took it away again: mtcp-s carries no kernel address
    for ns in (net.cli_ns, net.srv_ns):  # forget the ARP resolutions still retrying
        ip(ns, "neigh", "flush", "all")

    assert pings(net.cli_ns, net.srv_ip)
    assert pings(net.srv_ns, net.cli_ip)


@pytest.mark.parametrize("percent", [0.001, 100.5, -1])
@requires_root
def test_loss_outside_the_supported_range_is_refused(net, percent):
    with pytest.raises(testnet.TestNetError, match="between 0.01 and 100 percent"):
        testnet.up(percent, net=net)


# --- preconditions (no root needed) ------------------------------------------


def test_not_root_is_a_readable_error(monkeypatch):
    monkeypatch.setattr(testnet.os, "geteuid", lambda: 1000)

    with pytest.raises(testnet.TestNetError, match="needs root"):
        testnet.up()


def test_missing_nft_is_a_readable_error(monkeypatch):
    monkeypatch.setattr(testnet.os, "geteuid", lambda: 0)
    monkeypatch.setattr(testnet.shutil, "which", lambda tool: None if tool == "nft" else f"/usr/sbin/{tool}")

    with pytest.raises(testnet.TestNetError, match="`nft` not found"):
        testnet.down()
