"""Runs the plan: for each run k, the kernel stack then the shim (A B A B),
each serving every selected workload once from one server start per
program and network variant, with a progress line on stderr.

The test network is brought up if it is absent and left as it was found
(removed again, or its offload variant and loss rule put back).  Measures on
the frame-exact variant come after the others in each run: the network is
switched in place, between servers.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from mtcpshim import testnet
from mtcpshim.bench import cpu, interrupts, servers
from mtcpshim.bench.workloads import ClientOutputError, Workload

# Time a client may overrun its duration (start-up, iperf3's result
# exchange, wrk's 5 s request timeout) before it counts as hung.
CLIENT_GRACE_SECONDS = 10
# A run is invalid when processes outside the bench, or the hypervisor, took
# more than this share of one CPU during it; it is measured again, at most
# this many more times, before it counts as invalid.
DISTURBANCE_LIMIT = 0.05
DISTURBED_RETRIES = 2
# Server start and stop per workload, until the first step has measured it.
FIRST_GUESS_OVERHEAD = 1.5


@dataclass
class Settings:
    workloads: list[Workload]
    duration: int
    runs: int
    connections: int
    warmup: int = 0              # seconds of unmeasured load before each measured run
    stack_python: str = "cpython"
    cores: int = 1               # the server's cores: lighttpd workers, and our stack workers
    stack_workers: int = 1       # ours, on the first of those cores


@dataclass
class RunRecord:
    """One workload on one stack, one run: the raw figures for the JSON."""
    workload: str
    stack: str
    run: int
    valid: bool
    problems: list[str]
    requests: int | None = None
    bytes: int = 0
    seconds: float = 0.0
    requests_per_s: float | None = None
    gbit_per_s: float = 0.0
    p50_us: float | None = None
    p99_us: float | None = None
    retransmits: int | None = None
    wall_seconds: float = 0.0
    server_cpu_s: float = 0.0
    server_cpu_s_by_process: dict[str, float] = field(default_factory=dict)
    machine_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    foreign_cpu_s: float = 0.0           # processes outside the bench's own tree
    stolen_cpu_s: float = 0.0            # taken by the hypervisor
    disturbed: bool = False              # by either, beyond DISTURBANCE_LIMIT
    attempts: int = 1                    # measurements it took (disturbed ones are repeated)
    server_cpu_per_unit: float | None = None   # µs per request, or s per GB
    machine_cpu_per_unit: float | None = None


def run_plan(settings: Settings, progress: "Progress") -> list[RunRecord]:
    records = []
    # One server start per (network variant, program), the kernel's defaults first.
    starts = sorted(dict.fromkeys((w.offloads, w.server) for w in settings.workloads), key=lambda s: not s[0])
    with interrupts.terminate_like_interrupt(), test_network(), servers.site(settings.cores) as where:
        for run in range(1, settings.runs + 1):
            for stack in servers.STACKS:
                for offloads, program in starts:
                    testnet.up(net=servers.NET if offloads else testnet.FRAME_EXACT_TESTNET)
                    with servers.running(stack, program, where, settings.stack_python, settings.cores,
                                         settings.stack_workers) as server:
                        for workload in _run_order(settings.workloads, program, offloads):
                            progress.step(workload.name, stack, run)
                            warm_up(workload, settings, str(where.wrk_script))
                            records.append(measure_undisturbed(workload, server, run, settings,
                                                               str(where.wrk_script)))
    progress.finish()
    return records


def _run_order(workloads: list[Workload], program: str, offloads: bool) -> list[Workload]:
    """`close` leaves tens of thousands of connections in TIME_WAIT on the
    server: it goes last, so that no other workload meets them."""
    return sorted((w for w in workloads if w.server == program and w.offloads == offloads),
                  key=lambda w: w.name == "close")


def warm_up(workload: Workload, settings: Settings, wrk_script: str) -> None:
    """The workload's client for `settings.warmup` seconds, not measured."""
    if settings.warmup:
        argv = workload.client_argv(settings.warmup, settings.connections, wrk_script)
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(argv, capture_output=True, timeout=settings.warmup + CLIENT_GRACE_SECONDS)


def measure_undisturbed(workload: Workload, server: servers.RunningServer, run: int, settings: Settings,
                        wrk_script: str, measure_once=None) -> RunRecord:
    """measure(), repeated while something outside the bench disturbed it
    (at most DISTURBED_RETRIES more times): a VM's neighbours steal CPU in
    bursts, and the next ten seconds are often quiet."""
    measure_once = measure_once or measure
    for attempt in range(1, DISTURBED_RETRIES + 2):
        record = measure_once(workload, server, run, settings, wrk_script)
        record.attempts = attempt
        if not record.disturbed:
            break
    return record


def measure(workload: Workload, server: servers.RunningServer, run: int, settings: Settings,
            wrk_script: str) -> RunRecord:
    """One client run against `server`, with CPU accounted over the load interval only."""
    argv = workload.client_argv(settings.duration, settings.connections, wrk_script)
    others_before = cpu.userspace_sample()
    client_before = cpu.reaped_children_seconds()
    server_before = server.cpu.sample()
    machine_before = cpu.machine_sample()
    try:
        done = subprocess.run(argv, capture_output=True, text=True,
                              timeout=settings.duration + CLIENT_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        done = None
    machine_after = cpu.machine_sample()
    server_after = server.cpu.sample()
    client_after = cpu.reaped_children_seconds()
    foreign = cpu.foreign_seconds(others_before, cpu.userspace_sample(), cpu.tree_pids(os.getpid()))

    server_roles = server.cpu.used_by_role(server_before, server_after)
    record = RunRecord(workload.name, server.stack, run, valid=False, problems=[],
                       wall_seconds=machine_after.monotonic - machine_before.monotonic,
                       server_cpu_s=sum(server_roles.values()), server_cpu_s_by_process=server_roles,
                       machine_cpu_s=cpu.machine_busy_seconds(machine_before, machine_after),
                       client_cpu_s=client_after - client_before,
                       foreign_cpu_s=sum(foreign.values()),
                       stolen_cpu_s=cpu.stolen_seconds(machine_before, machine_after))
    disturbed_by = disturbances(record, foreign)
    record.disturbed = bool(disturbed_by)
    record.problems += disturbed_by
    if done is None:
        record.problems.append(f"client did not finish within {settings.duration + CLIENT_GRACE_SECONDS} s")
    else:
        try:
            _fill(record, workload, workload.parse(done.stdout))
        except ClientOutputError as err:
            record.problems.append(str(err))
        if done.returncode != 0:
            record.problems.append(f"client exit status {done.returncode}: {_first_line(done.stderr)}")
    if not server.alive():
        record.problems.append(f"the server exited: {server.log_tail()}")
    record.valid = not record.problems
    return record


def disturbances(record: RunRecord, foreign: dict[str, float]) -> list[str]:
    """Why the run measured more than the two stacks, if it did."""
    problems = []
    limit = DISTURBANCE_LIMIT * record.wall_seconds
    if record.foreign_cpu_s > limit:
        top = sorted(foreign.items(), key=lambda item: -item[1])[:3]
        named = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in top)
        problems.append(f"other processes used {record.foreign_cpu_s / record.wall_seconds:.0%} of a CPU "
                        f"({named})")
    if record.stolen_cpu_s > limit:
        problems.append(f"the hypervisor took {record.stolen_cpu_s / record.wall_seconds:.0%} of a CPU (steal)")
    return problems


def _fill(record: RunRecord, workload: Workload, result) -> None:
    record.problems += result.problems
    record.requests, record.bytes, record.seconds = result.requests, result.bytes, result.seconds
    record.p50_us, record.p99_us, record.retransmits = result.p50_us, result.p99_us, result.retransmits
    if result.seconds > 0:
        record.gbit_per_s = result.bytes * 8 / result.seconds / 1e9
        if result.requests is not None:
            record.requests_per_s = result.requests / result.seconds
    if workload.per_request:
        served = result.requests / 1e6 if result.requests else 0   # CPU seconds -> µs per request
    else:
        served = result.bytes / 1e9                                # CPU seconds per GB
    if served:
        record.server_cpu_per_unit = record.server_cpu_s / served
        record.machine_cpu_per_unit = record.machine_cpu_s / served


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "(no message)")


@contextlib.contextmanager
def test_network() -> Iterator[None]:
    """The test network, up and without loss, for the block; restored afterwards."""
    found = testnet.status()
    # Fail early, before touching anything, if a stack serves the interface
    # (there is none to claim, nor to serve, before the network exists).
    if found["links"][servers.NET.srv_if]["present"]:
        with servers.interface_lock():
            pass
    loss = (found["loss"] or {}).get("percent")
    try:
        testnet.up(loss_percent=None)
        yield
    finally:
        with interrupts.deferred():
            if not any(found["namespaces"].values()):
                testnet.down()
            else:
                testnet.up(loss_percent=loss, net=testnet.FRAME_EXACT_TESTNET if found["offloads"] is False
                           else servers.NET)


class Progress:
    """One status line on stderr, rewritten in place on a terminal, else
    printed once per step."""

    def __init__(self, settings: Settings, stream=sys.stderr):
        self.stream = stream
        self.total = settings.runs * len(servers.STACKS) * len(settings.workloads)
        self.duration = settings.duration + settings.warmup
        self.runs = settings.runs
        self.done = 0
        self.started = time.monotonic()
        self.in_place = stream.isatty()

    def step(self, workload: str, stack: str, run: int) -> None:
        elapsed = time.monotonic() - self.started
        overhead = (elapsed / self.done - self.duration) if self.done else FIRST_GUESS_OVERHEAD
        left = (self.total - self.done) * (self.duration + max(0.0, overhead))
        self.done += 1
        self._write(f"bench: {workload:<10} {stack:<6} run {run}/{self.runs}  "
                    f"step {self.done}/{self.total}  about {_minutes(left)} left")

    def finish(self) -> None:
        self._write(f"bench: done in {_minutes(time.monotonic() - self.started)}")
        if self.in_place:
            self.stream.write("\n")

    def _write(self, line: str) -> None:
        self.stream.write(f"\r\x1b[K{line}" if self.in_place else line + "\n")
        self.stream.flush()


def _minutes(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"
