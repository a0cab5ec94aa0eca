"""The test network as it ships, a veth pair at the kernel's defaults:
checksum offload and TSO/GSO on, so a kernel sender hands the link 64 KB
super-frames, as a NIC with GRO hands merged frames to a packet socket.
256 MiB each way, byte-exact, nothing truncated; the rates go to the test's
output (the bench compares them with the kernel's)."""
import os
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "faults"))
from faultnet import kernel_http_server, make_body, private_network, stack_receives, stack_sends  # noqa: E402

pytestmark = pytest.mark.integration

SIZE = 256 * 1024 * 1024
TIMEOUT = 300


@pytest.fixture(scope="module")
def net():
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    with private_network() as net:
        yield net


@pytest.fixture(scope="module")
def docroot(tmp_path_factory):
    root = tmp_path_factory.mktemp("offloads-docroot")
    make_body(root / "body.bin", SIZE)
    return root


def test_a_kernel_sender_s_super_frames_reach_the_stack_whole(net, docroot, tmp_path):
    with kernel_http_server(net, docroot, tmp_path / "http.log") as url:
        transfer = stack_receives(net, url, docroot, "body.bin", tmp_path, timeout=TIMEOUT)
    print(f"stack receiving on a default veth: {transfer.megabytes_per_second * 8 / 1000:.2f} Gbit/s")
    assert transfer.size == SIZE and transfer.exact
    packet_io = transfer.stack_counters["packet_io"]
    assert packet_io["rx_truncated"] == 0, packet_io


def test_the_stack_sends_over_a_default_veth(net, docroot, tmp_path):
    transfer = stack_sends(net, docroot, "body.bin", tmp_path, timeout=TIMEOUT)
    print(f"stack sending on a default veth: {transfer.megabytes_per_second * 8 / 1000:.2f} Gbit/s")
    assert transfer.size == SIZE and transfer.exact
