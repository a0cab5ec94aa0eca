"""Fixtures for the live fault runs: private test networks for the session
(one as the kernel ships it, one frame-exact for nftables loss and
duplication, each made on first use), a body to move, and the client
kernel's http.server on each.  Everything started here is stopped by pid,
and the networks are removed at the end."""
import pytest

from support.net import private_network
from support.programs import kernel_http_server
from support.transfers import BODY_SIZE, make_body


@pytest.fixture(scope="session")
def fault_net(needs_root):
    with private_network() as net:
        yield net


@pytest.fixture(scope="session")
def frame_exact_net(needs_root):
    # nftables loss and duplication must count wire frames: one segment per frame.
    with private_network(offloads=False) as net:
        yield net


@pytest.fixture(scope="session")
def docroot(tmp_path_factory):
    root = tmp_path_factory.mktemp("docroot")
    make_body(root / "body.bin", BODY_SIZE)
    return root


@pytest.fixture(scope="session")
def kernel_url(fault_net, docroot, tmp_path_factory):
    with kernel_http_server(fault_net, docroot, tmp_path_factory.mktemp("http") / "server.log") as url:
        yield url


@pytest.fixture(scope="session")
def frame_exact_kernel_url(frame_exact_net, docroot, tmp_path_factory):
    with kernel_http_server(frame_exact_net, docroot, tmp_path_factory.mktemp("http") / "server.log") as url:
        yield url
