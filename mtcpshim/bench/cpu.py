"""CPU accounting over one load interval.

Two views, because neither alone is honest here:

- the server side: CPU seconds of the server's processes (lighttpd or
  iperf3, plus the launcher and stack process in the shim case), from
  psutil.  veth runs the receiver's TCP input in softirq on the *sender's*
  CPU and this kernel has no IRQ time accounting, so that work is charged to
  whatever process it interrupted: the kernel-stack server looks cheaper
  than it is.
- the whole machine, from /proc/stat.  Its busy columns are tick samples
  that undercount short bursts, so busy time is taken as elapsed x CPUs
  minus the idle and iowait deltas instead.

And what disturbs a run: CPU that user-space processes outside the bench's
own tree used over the interval (kernel threads are left out: ksoftirqd
and the workers do the network's work, ours included), and CPU the
hypervisor stole from this VM.  A run where either is above a few percent
of a CPU is not a measurement of the stacks.
"""
from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass

import psutil

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class ProcessTreeCpu:
    """CPU seconds (user + system) of some processes and all their
    descendants, per process, each under a role name: the program's own name,
    or "stack" and "launcher" for mtcpshim's two Python processes."""

    def __init__(self, root_pids: list[int]):
        self.root_pids = root_pids

    def sample(self) -> dict[int, tuple[str, float]]:
        seconds = {}
        for process in self._tree():
            try:
                times = process.cpu_times()
                used = times.user + times.system + times.children_user + times.children_system
                seconds[process.pid] = (_role(process), used)
            except psutil.NoSuchProcess:
                pass
        return seconds

    def _tree(self) -> list[psutil.Process]:
        processes = []
        for pid in self.root_pids:
            try:
                root = psutil.Process(pid)
                processes += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        return processes

    @staticmethod
    def used_by_role(before: dict, after: dict) -> dict[str, float]:
        """CPU seconds between two samples; a process born in between counts from zero."""
        used = {}
        for pid, (role, seconds) in after.items():
            used[role] = used.get(role, 0.0) + seconds - before.get(pid, (role, 0.0))[1]
        return used


def _role(process: psutil.Process) -> str:
    command = " ".join(process.cmdline())
    if "mtcpshim.stackd" in command:
        return "stack"
    if "mtcpshim.cli" in command:
        return "launcher"
    return process.name()


@dataclass(frozen=True)
class MachineSample:
    monotonic: float
    idle_ticks: int  # idle + iowait, summed over CPUs
    steal_ticks: int  # time the hypervisor ran something else on our CPUs
    cpus: int


def machine_sample() -> MachineSample:
    with open("/proc/stat") as stat:
        lines = stat.read().splitlines()
    # cpu  user nice system idle iowait irq softirq steal ...
    total = lines[0].split()
    cpus = sum(1 for line in lines if line.startswith("cpu") and line[3].isdigit())
    return MachineSample(time.monotonic(), int(total[4]) + int(total[5]), int(total[8]), cpus)


def machine_busy_seconds(before: MachineSample, after: MachineSample) -> float:
    elapsed = after.monotonic - before.monotonic
    idle = (after.idle_ticks - before.idle_ticks) / CLOCK_TICKS
    return max(0.0, elapsed * after.cpus - idle)


def stolen_seconds(before: MachineSample, after: MachineSample) -> float:
    return (after.steal_ticks - before.steal_ticks) / CLOCK_TICKS


_KTHREADD = 2


def userspace_sample() -> dict[int, tuple[str, float]]:
    """(name, CPU seconds so far) of every user-space process, by pid."""
    sample = {}
    for process in psutil.process_iter(["ppid", "name", "cpu_times"]):
        info = process.info
        times = info["cpu_times"]
        if process.pid == _KTHREADD or info["ppid"] == _KTHREADD or times is None:
            continue
        sample[process.pid] = (info["name"], times.user + times.system)
    return sample


def foreign_seconds(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
                    ours: set[int]) -> dict[str, float]:
    """CPU seconds between two samples of the processes not in `ours`, by
    name (a process born in between counts from zero; one that died in
    between is not seen)."""
    used: dict[str, float] = {}
    for pid, (name, seconds) in after.items():
        if pid in ours:
            continue
        delta = seconds - before.get(pid, (name, 0.0))[1]
        if delta > 0:
            used[name] = used.get(name, 0.0) + delta
    return used


def tree_pids(root: int) -> set[int]:
    """`root` and every living descendant."""
    try:
        process = psutil.Process(root)
        return {root, *(child.pid for child in process.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


def reaped_children_seconds() -> float:
    """CPU seconds of this process's children that have been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
