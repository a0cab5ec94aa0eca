"""Fixtures that run real programs over the stack on the shared test network.

Everything started here is stopped by pid in teardown, and the test network
is removed again if these tests created it.
"""
import dataclasses
import os

import pytest

from mtcpshim import testnet
from support import programs
from support.net import NET

LARGE_FILE_SIZE = 10 * 1024 * 1024


@pytest.fixture(scope="session")
def test_network(needs_root):
    found = testnet.status()
    testnet.up(loss_percent=None)
    yield NET
    if found["up"]:
        testnet.up(loss_percent=None, net=dataclasses.replace(NET, offloads=found["offloads"]))
    else:
        testnet.down()


@pytest.fixture(scope="session")
def docroot(tmp_path_factory):
    root = tmp_path_factory.mktemp("docroot")
    (root / "small.txt").write_bytes(b"x" * 63 + b"\n")
    (root / "large.bin").write_bytes(os.urandom(LARGE_FILE_SIZE))
    (root / "index.html").write_bytes(b"<html>mtcpshim</html>\n")
    return root


@pytest.fixture(scope="module")
def shim_lighttpd(test_network, docroot, tmp_path_factory):
    """lighttpd under `mtcpshim run` for one module.  Only one stack can own
    the test network's interface: modules that also run other programs under
    the stack do it after this fixture's tests or without it."""
    with programs.shim_lighttpd(docroot, tmp_path_factory.mktemp("lighttpd")) as server:
        yield server


@pytest.fixture(scope="module")
def kernel_url(test_network, docroot, tmp_path_factory):
    """python3 -m http.server in the client namespace, on the kernel stack."""
    with programs.kernel_http_server(NET, docroot, tmp_path_factory.mktemp("httpserver") / "server.log") as url:
        yield url
