"""Issue 8: the shared region is a trust boundary.  A hostile program under
the stack (tests/fuzz/hostile_region.py) writes into the region what an
attacker would; the stack must stay alive, keep serving the network (ARP,
ping, a new connection byte-exact), and reset and count the socket the
program corrupted.

One test per row of the issue's table, then the hostile-region fuzzer
beside honest transfers.  CI: 30k hostile operations in about a minute.
MTCPSHIM_LONG=1 (or scripts/reliability.py hostile): 10^6.
"""
import pytest

import hostile
from support.transfers import LONG
from hostile_region import DATA_OFF_BYTES, data_off_pattern, tagged

FUZZ_COUNT = 1_000_000 if LONG else 30_000
FUZZ_RATE = 2_000 if LONG else 1_000       # hostile operations per second
FUZZ_TIME_LIMIT = 900 if LONG else 60

# The "shm" counters of `mtcpshim stat --json` that must have moved after
# each attack: the stack saw the impossible value and said so.
COUNTED = {
    "nslots": ("cmd_bad",),                    # a command for a slot past the stack's own count
    "cmdq": ("cmd_bad",),                      # the queue still works: the op-0 command we queued is refused
    "accept-indices": ("sockets_reset",),      # the listener whose accept ring moved
    "waiters": ("ctl_bad",),                   # a registration for a waiter past the stack's own count
    "data-off": (),                            # nothing impossible: the stack just never reads data_off
    "fake-accept": ("accept_entry_bad",),      # an accept entry the stack never queued (in place of one it did)
    "rx-tail": ("sockets_reset",),             # tail ahead of head
    "slot-free": ("sockets_reset",),           # a live slot marked free
    "slot-taken": ("sockets_reset",),          # ...and given to the program's next socket
    "keepalive-options": (),                   # out of setsockopt's range, not impossible: clamped or refused
    "sendfile-spans": ("sockets_reset",),      # a span record no interposer writes
}
TAGS = {"first": b"<first connection>", "second": b"<second connection>"}
TAG_SIZE = 64 * 1024  # hostile_region.py's default --tag-size


def _shm(observed) -> dict:
    return (observed.get("stats") or {}).get("shm") or {}


def _assert_alive_and_serving(observed, summary):
    assert observed["stack_alive"], f"{summary}\n{observed['output_tail']}"
    assert observed["stack_death"] is None, summary
    assert observed["ping_ok"], summary
    assert observed["new_connection_exact"], \
        f"{summary}: {observed['new_connection']} (check server: {observed.get('check_failed')})\n{observed['output_tail']}"


@pytest.mark.parametrize("mode", hostile.MODES)
def test_attack_leaves_the_stack_alive_serving_and_counting(private_net, tmp_path, mode):
    observed = hostile.run_attack(private_net, tmp_path, mode)
    summary = hostile.summary(observed)
    assert observed["attacked"] is not None, f"the attack did not happen: {observed['output_tail']}"
    _assert_alive_and_serving(observed, summary)

    counted = COUNTED[mode]
    if counted:
        assert sum(_shm(observed).get(name, 0) for name in counted) >= 1, \
            f"{summary}: none of {counted} counted"

    if mode == "data-off":
        # Whatever was sent came from the connection's real TX area: the
        # bytes we queued there, not the stack's memory.
        peer = observed["peer"]
        assert peer["outcome"] in ("eof", "reset"), summary
        assert data_off_pattern().startswith(peer["data"]), \
            f"{summary}: the peer received bytes we never wrote: {peer['data'][:64].hex()}"
        assert peer["outcome"] == "reset" or len(peer["data"]) == DATA_OFF_BYTES, summary
    elif mode == "rx-tail":
        # The corrupted connection ends (reset), it does not hang.
        assert observed["peer"]["outcome"] == "reset", summary
    elif mode == "fake-accept":
        # The connection whose accept entry was replaced is reset with the
        # listener (never accepted), it does not hang.
        assert observed["peer"]["outcome"] == "reset", summary
    elif mode == "slot-free":
        # Each connection got its own bytes or a reset, never the other's.
        for name in ("first", "second"):
            peer = observed[name]
            assert peer["outcome"] in ("eof", "reset"), f"{summary}: {name} {peer['outcome']}"
            assert tagged(TAGS[name], TAG_SIZE).startswith(peer["data"]), \
                f"{summary}: {name} received foreign bytes: {peer['data'][:64]!r}"
            assert peer["outcome"] == "reset" or len(peer["data"]) == TAG_SIZE, summary
    elif mode == "slot-taken":
        # The old connection was reset; the new socket in its slot serves
        # whole, its old descriptor's close notwithstanding.
        assert observed["attacked"]["taken"], f"{summary}: the new listener did not get the slot"
        assert observed["first"]["outcome"] == "reset", f"{summary}: first {observed['first']['outcome']}"
        second = observed["second"]
        assert second["outcome"] == "eof" and second["data"] == tagged(TAGS["second"], TAG_SIZE), \
            f"{summary}: second {second['outcome']}, {len(second['data'])} bytes"
    elif mode == "sendfile-spans":
        assert _shm(observed).get("sendfile_files", 0) >= 1, f"{summary}: the file never reached the stack"
        assert observed["peer"]["outcome"] == "reset", summary
    elif mode == "accept-indices":
        # The client's connection ended one way or another within its bound.
        assert observed["peer"]["outcome"] != "peer did not finish", summary


def test_closing_a_listener_during_a_handshake_leaves_its_freed_slot_alone(private_net, tmp_path):
    """Found by the fuzzer (an honest download reset for "RX ring tail
    impossible"): a connection still in its handshake when its listener
    closes has its slot freed, but its TCP connection lives on with buffers
    in that slot; when the handshake completes, received data lands in the
    freed slot, i.e. in whichever socket gets it next."""
    observed = hostile.run_attack(private_net, tmp_path, "listener-close-handshake")
    summary = hostile.summary(observed)
    assert observed["attacked"] is not None, f"{summary}\n{observed['output_tail']}"
    _assert_alive_and_serving(observed, summary)
    attack = observed["result"]["attack"]
    assert not attack["freed_slot_written"], f"the stack wrote into slot {attack['slot']} after freeing it: {attack}"


def test_hostile_region_fuzzer_beside_honest_transfers(private_net, tmp_path):
    observed = hostile.run_fuzz(private_net, tmp_path, FUZZ_COUNT, FUZZ_RATE, FUZZ_TIME_LIMIT, seed=1)
    summary = hostile.fuzz_summary(observed)
    print(summary)
    assert observed["fuzzed"] is not None, f"{summary}\n{observed['output_tail']}"
    assert observed["fuzzed"]["writes"] == FUZZ_COUNT, summary
    _assert_alive_and_serving(observed, summary)
    # The fuzzer spares the honest server's waiters: one freed under it
    # would leave a thread asleep until its timeout (a stalled download).
    waiters = observed["fuzzed"].get("honest_waiters") or {}
    assert waiters.get("after") == waiters.get("before"), f"{summary}\nhonest waiters: {waiters}"
    honest = observed["honest"]
    # Every honest download is byte-exact or reset and counted; none hangs.
    assert honest["transfers"] >= 2 and honest["hung"] == 0 and honest["failed"] == 0, summary
    if honest["reset"]:
        assert _shm(observed).get("sockets_reset", 0) >= 1, summary
    # The attacked server's downloads (observed["victims"]) may end any way:
    # what the program wrote into its own sockets may be plausible.
