"""Fixtures every live suite shares.  pytest imports this file with tests/
on sys.path (rootdir-relative "prepend" import of a conftest outside a
package), which is what makes `support` importable in every test module."""
import os

import pytest

from support.net import private_network


@pytest.fixture(scope="session")
def needs_root():
    """Skips what needs root: network namespaces and AF_PACKET sockets."""
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces and AF_PACKET")


@pytest.fixture(scope="module")
def private_net(needs_root):
    """A private test network for the module, its veth at the kernel's default offloads."""
    with private_network() as net:
        yield net
