"""2% random loss in each direction, dropped by nftables on the client's veth
(outside our code): the 10 MiB transfers stay byte-exact."""
import pytest

from mtcpshim import testnet
from support.net import SERVER_URL, in_client
from support.programs import run_under_shim, shim_lighttpd
from support.transfers import sha256_of

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
    with shim_lighttpd(docroot, tmp_path):
        result = in_client(["curl", "-sS", "--fail", "-o", str(out), f"{SERVER_URL}/large.bin"], timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    assert sha256_of(out) == sha256_of(docroot / "large.bin")


def test_client_side_transfer_survives_loss(kernel_url, lossy_link, docroot, tmp_path):
    out = tmp_path / "large.bin"
    result = run_under_shim(["curl", "-sS", "--fail", "-o", str(out), f"{kernel_url}/large.bin"], timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sha256_of(out) == sha256_of(docroot / "large.bin")
