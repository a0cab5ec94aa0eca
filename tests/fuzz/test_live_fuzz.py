"""Mutated and random frames thrown at the running stack from the client's
veth while a kernel client downloads a body from lighttpd under the stack,
again and again.  The stack survives, every download is byte-exact, and
every frame that had to be dropped shows up in a drop counter (or in the
packet ring's own drop count, when the stack fell behind).

CI: 50k frames.  MTCPSHIM_LONG=1 (or scripts/reliability.py fuzz): 1M."""
from attacks import fuzz_during_transfers
from support.transfers import LONG, make_body

FRAMES = 1_000_000 if LONG else 50_000
RATE = 20_000           # frames/s: about what the stack drains beside a transfer
TIME_LIMIT = 600 if LONG else 60


def test_fuzzed_stack_survives_and_keeps_the_transfer_exact(private_net, tmp_path):
    docroot = tmp_path / "docroot"
    docroot.mkdir()
    make_body(docroot / "body.bin", 4 * 1024 * 1024)

    run = fuzz_during_transfers(private_net, docroot, "body.bin", tmp_path, FRAMES, RATE, TIME_LIMIT, seed=1)

    assert run["stack_alive"] and run["still_answers"]
    assert run["frames_sent"] == FRAMES
    assert run["transfers"] >= 2 and run["transfer_failures"] == []
    assert run["drops_counted"] >= run["must_drop"]
