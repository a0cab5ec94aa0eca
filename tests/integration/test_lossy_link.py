"""2% random loss in each direction, dropped by nftables on the client's veth
(outside our code): the 10 MiB transfers stay byte-exact."""
import pytest

from mtcpshim import testnet
from netharness import SERVER_URL, download_under_shim, in_client, sha256_of, shim_lighttpd_running

LOSS_PERCENT = 2


@pytest.fixture
def lossy_link(test_network):
    # 2% of wire frames, not of 64 KB GSO frames: one segment per frame.
    testnet.up(loss_percent=LOSS_PERCENT, net=testnet.FRAME_EXACT_TESTNET)
    try:
        yield
    finally:
        testnet.up(loss_percent=None)


def test_server_side_transfer_survives_loss(lossy_link, docroot, tmp_path):
    out = tmp_path / "large.bin"
    with shim_lighttpd_running(docroot, tmp_path):
        result = in_client(["curl", "-sS", "--fail", "-o", str(out), f"{SERVER_URL}/large.bin"], timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    assert sha256_of(out) == sha256_of(docroot / "large.bin")


def test_client_side_transfer_survives_loss(kernel_http_server, lossy_link, docroot, tmp_path):
    out = tmp_path / "large.bin"
    download_under_shim(["curl", "-sS", "--fail", "-o", str(out), f"{kernel_http_server}/large.bin"], timeout=300)
    assert sha256_of(out) == sha256_of(docroot / "large.bin")
