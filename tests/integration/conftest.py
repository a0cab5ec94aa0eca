"""Fixtures that run real programs over the stack on the test network.

Everything started here is stopped by pid in teardown, and the test network
is removed again if these tests created it.
"""
import dataclasses
import os
import subprocess
import sys

import pytest

from mtcpshim import testnet
from netharness import HTTP_PORT, LARGE_FILE_SIZE, NET, in_client, shim_lighttpd_running, wait_until


@pytest.fixture(scope="session")
def test_network():
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
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
    with shim_lighttpd_running(docroot, tmp_path_factory.mktemp("lighttpd")) as server:
        yield server


@pytest.fixture(scope="module")
def kernel_http_server(test_network, docroot, tmp_path_factory):
    log = open(tmp_path_factory.mktemp("httpserver") / "server.log", "wb")
    server = subprocess.Popen(
        ["ip", "netns", "exec", NET.cli_ns, sys.executable, "-m", "http.server", str(HTTP_PORT),
         "--bind", NET.cli_ip, "--directory", str(docroot)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: in_client(["curl", "-sf", "-m", "2", "-o", "/dev/null",
                                      f"http://{NET.cli_ip}:{HTTP_PORT}/small.txt"]).returncode == 0,
                   20, "python3 -m http.server")
        yield f"http://{NET.cli_ip}:{HTTP_PORT}"
    finally:
        server.terminate()
        server.wait(10)
        log.close()
