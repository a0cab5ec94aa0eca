"""Spoofed SYNs from random addresses and ports in 198.18.0.0/24 at
lighttpd under the stack, while a kernel client keeps connecting.  Past the
listen backlog the stack answers with SYN cookies and keeps no state, so
the honest client gets through during and after the flood, and the stack's
peak memory in a flood stays where earlier floods of the same size settled
it (one for CPython; PyPy's JIT and collector take about four: 120 MiB,
then 146, 165, 181 and 196, then flat, with a sawtooth of up to 18 MiB
above the resting size within a flood).

CI: 30k SYNs.  MTCPSHIM_LONG=1 (or scripts/reliability.py flood): 100k."""
from attacks import syn_flood
from support.transfers import LONG

SYNS = 100_000 if LONG else 30_000
RATE = 10_000           # SYNs/s
MEMORY_SLACK = 16 * 1024 * 1024


def test_honest_clients_connect_through_a_syn_flood(private_net, tmp_path):
    run = syn_flood(private_net, tmp_path, tmp_path, SYNS, RATE, time_limit=120,
                    settle_memory=MEMORY_SLACK)

    assert run["stack_alive"]
    assert run["syns_sent"] == SYNS
    assert run["tcp_counters"].get("tcp_syncookies_sent", 0) > 0.9 * SYNS
    assert run["client_during"] > 0 and run["client_during_ok"] == run["client_during"]
    assert run["client_after_ok"] == run["client_after"]
    assert run["peak_rss"] - run["previous_peak_rss"] < MEMORY_SLACK


def test_honest_clients_connect_when_the_backlog_is_as_large_as_the_slot_table(private_net, tmp_path):
    run = syn_flood(private_net, tmp_path, tmp_path, 5000, RATE, time_limit=60, listen_backlog=1024,
                    client_timeout=3, attempts_after=1)

    assert run["stack_alive"]
    assert run["client_during"] > 0 and run["client_during_ok"] == run["client_during"]
