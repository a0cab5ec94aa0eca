"""Fixtures for the live fault runs: one private test network per session,
a body to move, and the client kernel's http.server.  Everything started
here is stopped by pid, and the network is removed at the end."""
import os

import pytest

from faultnet import BODY_SIZE, kernel_http_server, make_body, private_network


@pytest.fixture(scope="session")
def fault_net():
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    with private_network() as net:
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
