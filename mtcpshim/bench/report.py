"""Medians, spreads and shim/kernel ratios; the markdown table; the JSON.

Only valid runs enter a median.  The ratio is taken pair by pair (run k on
the shim over run k on the kernel, both valid) and the median of those
ratios reported, so that drift over the bench cancels within each pair.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from mtcpshim.bench.runner import RunRecord, Settings
from mtcpshim.bench.servers import KERNEL, SHIM, STACKS
from mtcpshim.bench.workloads import Workload

METRICS = ("throughput", "p50_us", "p99_us", "server_cpu_per_unit", "machine_cpu_per_unit")
REPOSITORY = pathlib.Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> "Spread | None":
        return cls(statistics.median(values), min(values), max(values)) if values else None


@dataclass
class StackSummary:
    valid_runs: int
    total_runs: int
    metrics: dict[str, Spread | None]
    requests_per_s: Spread | None


@dataclass
class WorkloadSummary:
    workload: Workload
    stacks: dict[str, StackSummary]
    ratios: dict[str, Spread | None]   # shim / kernel, pair by pair


def metric(record: RunRecord, workload: Workload, name: str) -> float | None:
    if name == "throughput":
        return record.requests_per_s if workload.per_request else record.gbit_per_s
    return getattr(record, name)


def summarize(records: list[RunRecord], workloads: list[Workload]) -> list[WorkloadSummary]:
    summaries = []
    for workload in workloads:
        runs = {stack: {r.run: r for r in records if r.workload == workload.name and r.stack == stack}
                for stack in STACKS}
        stacks = {}
        for stack, by_run in runs.items():
            valid = [r for r in by_run.values() if r.valid]
            stacks[stack] = StackSummary(
                valid_runs=len(valid), total_runs=len(by_run),
                metrics={name: Spread.of(_present(metric(r, workload, name) for r in valid)) for name in METRICS},
                requests_per_s=Spread.of(_present(r.requests_per_s for r in valid)))
        ratios = {}
        for name in METRICS:
            pairs = [(runs[SHIM][k], runs[KERNEL][k]) for k in runs[KERNEL] if k in runs[SHIM]]
            ratios[name] = Spread.of([
                metric(shim, workload, name) / metric(kernel, workload, name)
                for shim, kernel in pairs
                if shim.valid and kernel.valid and metric(shim, workload, name) is not None
                and metric(kernel, workload, name)])
        summaries.append(WorkloadSummary(workload, stacks, ratios))
    return summaries


def _present(values) -> list[float]:
    return [v for v in values if v is not None]


# --- the terminal table (markdown, to paste into the README) ---------------------------


_PYTHON_NAMES = {"cpython": "CPython", "pypy": "PyPy"}


def stack_environment() -> dict[str, str]:
    """The $MTCPSHIM_* defaults `mtcpshim run` takes (buffer size,
    congestion control...): an A/B run differs only in these."""
    return {name: value for name, value in sorted(os.environ.items()) if name.startswith("MTCPSHIM_")}


def markdown_table(summaries: list[WorkloadSummary], records: list[RunRecord], settings: Settings) -> str:
    lines = [
        f"{settings.runs} run(s) of {settings.duration} s per workload and stack, interleaved kernel/shim, "
        f"each after {settings.warmup} s of unmeasured load; our stack process under "
        f"{_PYTHON_NAMES.get(settings.stack_python, settings.stack_python)}"
        f"{''.join(f', {name}={value}' for name, value in stack_environment().items())}; "
        f"{settings.connections} connections for keepalive and close; "
        + ("the server on CPU 1, the client on CPU 0. " if settings.cores == 1 else
           f"the server on CPUs 0-{settings.cores - 1} (lighttpd with {settings.cores} workers, our stack "
           f"with {settings.stack_workers}), the client on CPU 0. ")
        + "The test network's veth keeps the "
        "kernel's default offloads (checksum, TSO, GSO); rows marked \"offloads off\" run on its frame-exact "
        "variant (offloads off, one segment per frame). Median (min-max); "
        "shim/kernel is the median of per-run ratios. CPU is per request (µs) or per GB (s): "
        "server = lighttpd/iperf3 plus the stack process, machine = all CPUs from /proc/stat.",
        "",
        "| workload | stack | throughput | p50 latency | p99 latency | server CPU | machine CPU | valid runs |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for summary in summaries:
        workload = summary.workload
        for stack in STACKS:
            s = summary.stacks[stack]
            throughput = _spread(s.metrics["throughput"], lambda v, unit=True: _rate(v, workload, unit))
            if not workload.per_request and s.requests_per_s:
                throughput += f", {s.requests_per_s.median:,.0f} req/s"
            lines.append(
                f"| {workload.label if stack == KERNEL else ''} | {stack} | {throughput} "
                f"| {_value(s.metrics['p50_us'], _latency)} | {_value(s.metrics['p99_us'], _latency)} "
                f"| {_value(s.metrics['server_cpu_per_unit'], lambda v: _cpu(v, workload))} "
                f"| {_value(s.metrics['machine_cpu_per_unit'], lambda v: _cpu(v, workload))} "
                f"| {s.valid_runs}/{s.total_runs} |")
        r = summary.ratios
        lines.append(
            f"| | shim/kernel | {_spread(r['throughput'], lambda v, unit=True: _ratio(v))} | {_value(r['p50_us'], _ratio)} "
            f"| {_value(r['p99_us'], _ratio)} | {_value(r['server_cpu_per_unit'], _ratio)} "
            f"| {_value(r['machine_cpu_per_unit'], _ratio)} | |")
    lines += _shim_cpu_split(summaries, records)
    invalid = [r for r in records if not r.valid]
    if invalid:
        lines += ["", "Invalid runs (left out of the medians):"]
        by_name = {w.name: w for w in (summary.workload for summary in summaries)}
        for r in invalid:
            measured = metric(r, by_name[r.workload], "throughput")
            figure = f"{_rate(measured, by_name[r.workload])}; " if measured else ""
            attempts = f" (measured {r.attempts} times)" if r.attempts > 1 else ""
            lines.append(f"- {r.workload}, {r.stack}, run {r.run}{attempts}: {figure}{'; '.join(r.problems)}")
    retried = sum(1 for r in records if r.valid and r.attempts > 1)
    if retried:
        lines += ["", f"{retried} run(s) were measured again after a disturbed attempt."]
    return "\n".join(lines)


def _shim_cpu_split(summaries: list[WorkloadSummary], records: list[RunRecord]) -> list[str]:
    """Where the shim's server-side CPU goes: the stack process against the program."""
    roles = ("stack", "program", "launcher")
    lines = ["", "Server CPU on the shim by process (median over valid runs):", "",
             "| workload | stack process | program | launcher |", "|---|---:|---:|---:|"]
    for summary in summaries:
        workload = summary.workload
        runs = [r for r in records if r.workload == workload.name and r.stack == SHIM and r.valid
                and r.server_cpu_s > 0 and r.server_cpu_per_unit is not None]
        if not runs:
            continue
        cells = []
        for role in roles:
            shares = [_role_seconds(r, role) / r.server_cpu_s * r.server_cpu_per_unit for r in runs]
            cells.append(_cpu(statistics.median(shares), workload))
        lines.append(f"| {workload.label} | {' | '.join(cells)} |")
    return lines


def _role_seconds(record: RunRecord, role: str) -> float:
    if role == "program":
        return sum(s for name, s in record.server_cpu_s_by_process.items() if name not in ("stack", "launcher"))
    return record.server_cpu_s_by_process.get(role, 0.0)


def _spread(spread: Spread | None, show) -> str:
    if spread is None:
        return "–"
    if spread.low == spread.high:
        return show(spread.median)
    return f"{show(spread.median)} ({show(spread.low, unit=False)}–{show(spread.high, unit=False)})"


def _value(spread: Spread | None, show) -> str:
    return show(spread.median) if spread else "–"


def _rate(value: float, workload: Workload, unit: bool = True) -> str:
    if not workload.per_request:
        return f"{value:.2f}" + (" Gbit/s" if unit else "")
    number = f"{value / 1000:.1f}k" if value >= 10_000 else f"{value:,.0f}"
    return number + (" req/s" if unit else "")


def _latency(us: float) -> str:
    return f"{us:.0f} µs" if us < 1000 else f"{us / 1000:.2f} ms"


def _cpu(value: float, workload: Workload) -> str:
    return f"{value:.1f} µs/req" if workload.per_request else f"{value:.2f} s/GB"


def _ratio(value: float) -> str:
    return f"{value:.3g}×"


# --- the JSON ----------------------------------------------------------------------------


def machine_info() -> dict:
    return {
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "kernel": f"{platform.release()} {platform.version()}",
        "python": platform.python_version(),
        "lighttpd": _first_output_line(["lighttpd", "-v"]),
        "wrk": _first_output_line(["wrk", "-v"]),
        "iperf3": _first_output_line(["iperf3", "--version"]),
        "mtcpshim_commit": _git_commit(),
        # Anything else running skews the machine CPU column; this shows whether something was.
        "loadavg_at_end": os.getloadavg(),
    }


def _cpu_model() -> str | None:
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def _first_output_line(argv: list[str]) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (done.stdout + done.stderr).strip().splitlines()  # wrk -v prints its version, then exits 1
    return lines[0].strip() if lines else None


def _git_commit() -> str | None:
    def git(*args):
        return subprocess.run(["git", "-C", str(REPOSITORY), *args], capture_output=True, text=True, timeout=10)
    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + (" (modified)" if dirty.stdout.strip() else "")


def write_json(path: str, records: list[RunRecord], summaries: list[WorkloadSummary], settings: Settings,
               started: float) -> None:
    document = {
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "machine": machine_info(),
        "settings": {"workloads": [w.name for w in settings.workloads], "duration_s": settings.duration,
                     "runs": settings.runs, "connections": settings.connections,
                     "warmup_s": settings.warmup, "stack_python": settings.stack_python, "cores": settings.cores,
                     "stack_workers": settings.stack_workers,
                     "stack_environment": stack_environment()},
        "network": "the test network at the kernel's default offloads; measures named *-offloads-off on its "
                   "frame-exact variant (offloads off, one segment per frame)",
        "units": {"throughput": "req/s for keepalive, close, latency; Gbit/s for bulk and iperf",
                  "cpu_per_unit": "CPU µs per request for keepalive, close, latency; CPU s per GB for bulk and iperf"},
        "runs": [dataclasses.asdict(r) for r in records],
        "summary": [{"workload": s.workload.name, "offloads": s.workload.offloads,
                     "stacks": {stack: dataclasses.asdict(summary) for stack, summary in s.stacks.items()},
                     "shim_over_kernel": {name: dataclasses.asdict(r) if r else None for name, r in s.ratios.items()}}
                    for s in summaries],
    }
    ensure_parent(path)
    with open(path, "w") as out:
        json.dump(document, out, indent=2)
        out.write("\n")


def ensure_parent(path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
