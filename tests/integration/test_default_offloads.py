"""The test network as it ships, a veth pair at the kernel's defaults:
checksum offload and TSO/GSO on, so a kernel sender hands the link 64 KB
super-frames, as a NIC with GRO hands merged frames to a packet socket.
256 MiB each way, byte-exact, nothing truncated, through the offload paths
(merged frames in, segmented frames out, lighttpd's sendfile read by the
kernel straight from the file), at 1 Gbit/s or more: the floor
issue 9 set, a third of what this machine kind does while busy (the bench
compares the rates with the kernel's)."""
import pytest

from support.programs import kernel_http_server
from support.transfers import make_body, stack_receives, stack_sends

pytestmark = pytest.mark.integration

SIZE = 256 * 1024 * 1024
TIMEOUT = 300
FLOOR_GBIT_PER_SECOND = 1.0


@pytest.fixture(scope="module")
def docroot(tmp_path_factory):
    root = tmp_path_factory.mktemp("offloads-docroot")
    make_body(root / "body.bin", SIZE)
    return root


def test_a_kernel_sender_s_super_frames_reach_the_stack_whole(private_net, docroot, tmp_path):
    with kernel_http_server(private_net, docroot, tmp_path / "http.log") as url:
        transfer = stack_receives(private_net, url, docroot, "body.bin", tmp_path, timeout=TIMEOUT)
    print(f"stack receiving on a default veth: {transfer.megabytes_per_second * 8 / 1000:.2f} Gbit/s")
    assert transfer.size == SIZE and transfer.exact
    packet_io = transfer.stack_counters["packet_io"]
    assert packet_io["rx_truncated"] == 0 and packet_io["rx_merged"] > 0, packet_io
    assert transfer.megabytes_per_second * 8 / 1000 >= FLOOR_GBIT_PER_SECOND


def test_the_stack_sends_over_a_default_veth(private_net, docroot, tmp_path):
    transfer = stack_sends(private_net, docroot, "body.bin", tmp_path, timeout=TIMEOUT)
    print(f"stack sending on a default veth: {transfer.megabytes_per_second * 8 / 1000:.2f} Gbit/s")
    assert transfer.size == SIZE and transfer.exact
    assert transfer.stack_counters["packet_io"]["tx_segmented"] > 0
    # lighttpd's sendfile left the body in its file: the stack sent it from there
    assert transfer.stack_counters["shm"]["sendfile_files"] == 1
    assert transfer.megabytes_per_second * 8 / 1000 >= FLOOR_GBIT_PER_SECOND
