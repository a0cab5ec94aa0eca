"""Fixtures for the live fault runs: private test networks for the session
(one as the kernel ships it, one frame-exact for nftables loss and
duplication, each made on first use), a body to move, and the client
kernel's http.server on each.  Everything started here is stopped by pid,
and the networks are removed at the end."""
import os

import pytest

from faultnet import BODY_SIZE, kernel_http_server, make_body, private_network


def _network(offloads):
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    return private_network(offloads=offloads)


@pytest.fixture(scope="session")
def fault_net():
    with _network(offloads=True) as net:
        yield net


@pytest.fixture(scope="session")
def frame_exact_net():
    # nftables loss and duplication must count wire frames: one segment per frame.
    with _network(offloads=False) as net:
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
