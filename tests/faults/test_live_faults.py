"""Transfers between our stack and the Linux kernel over a bad link, one
fault at a time and all together, in both directions: lighttpd under the
stack serving a client on the kernel, and curl under the stack fetching from
the kernel's http.server.  Each body arrives byte-exact (sha256), and what
the faults did is visible in the counters on both sides.

Faults that nftables makes run on the frame-exact network, the stack's own
injector on the network as the kernel ships it (support.net.needs_frame_exact).

The CI variant moves a few MiB per run; MTCPSHIM_LONG=1 moves 256 MiB
(scripts/reliability.py runs the long variant and writes the figures)."""
import dataclasses

import pytest

from support.net import FAULTS, needs_frame_exact, set_link_faults
from support.transfers import BODY_SIZE, LONG, stack_drop_counters, stack_receives, stack_sends

TIMEOUT = 3600 if LONG else 120


@dataclasses.dataclass
class Fault:
    net: object
    impair: str | None
    link: dict           # set_link_faults' arguments
    frame_exact: bool


@pytest.fixture(params=list(FAULTS))
def fault(request):
    settings = dict(FAULTS[request.param])
    impair = settings.pop("impair", None)
    frame_exact = needs_frame_exact(settings)
    net = request.getfixturevalue("frame_exact_net" if frame_exact else "fault_net")
    set_link_faults(net, **settings)
    try:
        yield Fault(net, impair, settings, frame_exact)
    finally:
        set_link_faults(net)


def check_faults_were_applied(transfer, impair, link):
    counters = stack_drop_counters(transfer.stack_counters)
    if link.get("loss_percent"):
        assert transfer.link_counters["nft_lost_to_client"] + transfer.link_counters["nft_lost_from_client"] > 0
    if link.get("duplicate_percent"):
        assert transfer.link_counters["nft_duplicated_to_client"] + \
            transfer.link_counters["nft_duplicated_from_client"] > 0
    if impair and "reorder" in impair:
        assert counters["impair_rx_reordered"] > 0 and counters["impair_tx_reordered"] > 0
    if impair and "corrupt" in impair:
        corrupted_in = counters.get("impair_rx_corrupted", 0)
        # Whatever was damaged on the way in was dropped and counted by the stack.
        # (A flipped header-length bit makes the header outrun the packet:
        # "ipv4_truncated".)
        dropped = sum(value for name, value in counters.items()
                      if name.startswith(("ipv4_bad", "ipv4_truncated", "tcp_bad", "tcp_truncated")))
        assert dropped == corrupted_in, counters


def test_stack_sends_to_kernel(fault, docroot, tmp_path):
    transfer = stack_sends(fault.net, docroot, "body.bin", tmp_path, fault.impair, TIMEOUT)
    assert transfer.size == BODY_SIZE
    assert transfer.exact
    check_faults_were_applied(transfer, fault.impair, fault.link)


def test_stack_receives_from_kernel(fault, docroot, tmp_path, request):
    kernel_url = request.getfixturevalue("frame_exact_kernel_url" if fault.frame_exact else "kernel_url")
    transfer = stack_receives(fault.net, kernel_url, docroot, "body.bin", tmp_path, fault.impair, TIMEOUT)
    assert transfer.size == BODY_SIZE
    assert transfer.exact
    check_faults_were_applied(transfer, fault.impair, fault.link)
