"""Mutated and random frames thrown at the running stack from the client's
veth while a kernel client downloads a body from lighttpd under the stack,
again and again.  The stack survives, every download is byte-exact, and
every frame that had to be dropped shows up in a drop counter (or in the
packet ring's own drop count, when the stack fell behind).

CI: 50k frames.  MTCPSHIM_LONG=1 (or scripts/reliability.py fuzz): 1M."""
import os

import pytest

from attacks import fuzz_during_transfers
from faultnet import LONG, make_body, private_network

FRAMES = 1_000_000 if LONG else 50_000
RATE = 20_000           # frames/s: about what the stack drains beside a transfer
TIME_LIMIT = 600 if LONG else 60


@pytest.fixture(scope="module")
def fuzz_net():
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces and AF_PACKET")
    with private_network() as net:
        yield net


def test_fuzzed_stack_survives_and_keeps_the_transfer_exact(fuzz_net, tmp_path):
    docroot = tmp_path / "docroot"
    docroot.mkdir()
    make_body(docroot / "body.bin", 4 * 1024 * 1024)

    run = fuzz_during_transfers(fuzz_net, docroot, "body.bin", tmp_path, FRAMES, RATE, TIME_LIMIT, seed=1)

    assert run["stack_alive"] and run["still_answers"]
    assert run["frames_sent"] == FRAMES
    assert run["transfers"] >= 2 and run["transfer_failures"] == []
    assert run["drops_counted"] >= run["must_drop"]
