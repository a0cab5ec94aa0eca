"""`mtcpshim bench`: the same lighttpd and iperf3 on the kernel's TCP stack
and on ours, side by side on the test network at the kernel's default
offloads; bulk and iperf3 also on its frame-exact variant (offloads off).

    workloads   the client commands (wrk, iperf3) and their parsers
    servers     the server side on either stack, started and stopped by pid
    cpu         CPU accounting over a load interval (psutil, /proc/stat)
    runner      the interleaved plan, the progress line, network restore
    report      medians, spreads, ratios; the markdown table and the JSON
    plot        the PNG bar chart
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

DEFAULT_DURATION = 10
DEFAULT_RUNS = 3
DEFAULT_CONNECTIONS = 64
DEFAULT_WARMUP = 3
QUICK_DURATION = 2
QUICK_RUNS = 1
INTERRUPTED = 130
FAILED = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mtcpshim.bench.workloads import WORKLOAD_NAMES

    def workload_list(text):
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in WORKLOAD_NAMES]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown workload {', '.join(unknown) or text!r}: "
                                             f"choose from {','.join(WORKLOAD_NAMES)}")
        return names

    def positive(text):
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(f"want a whole number above 0, not {text!r}")
        return value

    parser.add_argument("--workload", type=workload_list, default=list(WORKLOAD_NAMES),
                        help=f"comma-separated, from {','.join(WORKLOAD_NAMES)} (default: all)")
    parser.add_argument("--duration", type=positive, metavar="S",
                        help=f"seconds of load per run (default {DEFAULT_DURATION}, {QUICK_DURATION} with --quick)")
    parser.add_argument("--runs", type=positive, metavar="N",
                        help=f"runs per stack, interleaved kernel/shim (default {DEFAULT_RUNS}, "
                             f"{QUICK_RUNS} with --quick)")
    parser.add_argument("--connections", type=positive, default=DEFAULT_CONNECTIONS, metavar="C",
                        help="wrk connections for keepalive and close (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, metavar="S",
                        help="seconds of unmeasured load before each workload's run, on both stacks: caches, "
                             "and PyPy's JIT, warm up as in a server that has run a while (default %(default)s)")
    parser.add_argument("--stack-python", default=os.environ.get("MTCPSHIM_STACK_PYTHON"),
                        metavar="{cpython,pypy,auto}",
                        help="the interpreter of our stack process, as `mtcpshim run --stack-python` "
                             "(default $MTCPSHIM_STACK_PYTHON, else auto: PyPy where ready)")
    parser.add_argument("--cores", type=positive, default=1, metavar="N",
                        help="the server's cores: lighttpd with N workers and our stack with N workers, on CPUs "
                             "0 to N-1 (the client shares CPU 0); default 1: the server alone on CPU 1")
    parser.add_argument("--stack-workers", type=positive, metavar="N",
                        help="our stack's workers, if not one per server core (--cores): with fewer, "
                             "a worker serves several cores' flows, from the first of them")
    parser.add_argument("--quick", action="store_true", help="a smoke run of every workload in under a minute")
    parser.add_argument("--json", metavar="FILE", help="write every run's raw figures and the machine's details")
    parser.add_argument("--plot", metavar="FILE", help="write a PNG bar chart")


def main(args: argparse.Namespace) -> int:
    from mtcpshim.bench import report, runner, workloads
    from mtcpshim.bench.servers import BenchError
    from mtcpshim.testnet import TestNetError

    if os.geteuid() != 0:
        print("mtcpshim bench: needs root (network namespaces, the stack's packet socket): try sudo",
              file=sys.stderr)
        return FAILED
    missing = [tool for tool in ("lighttpd", "wrk", "iperf3", "curl", "taskset") if shutil.which(tool) is None]
    if missing:
        print(f"mtcpshim bench: not installed: {', '.join(missing)} (scripts/install.sh installs them)",
              file=sys.stderr)
        return FAILED
    from mtcpshim import launcher
    try:
        stack_python = launcher.resolve_stack_python(args.stack_python or launcher.DEFAULT_STACK_PYTHON)
    except launcher.LaunchError as err:
        print(f"mtcpshim bench: {err}", file=sys.stderr)
        return FAILED
    if (os.cpu_count() or 1) < 2:
        print("mtcpshim bench: needs two CPUs (client on CPU 0, server on CPU 1)", file=sys.stderr)
        return FAILED

    if args.cores > (os.cpu_count() or 1):
        print(f"mtcpshim bench: --cores {args.cores}: this machine has {os.cpu_count()} CPUs", file=sys.stderr)
        return FAILED
    stack_workers = args.stack_workers or args.cores
    if stack_workers > args.cores:
        print(f"mtcpshim bench: --stack-workers {stack_workers} is more than the server's --cores {args.cores}",
              file=sys.stderr)
        return FAILED
    settings = runner.Settings(
        workloads=workloads.select(args.workload),
        duration=args.duration or (QUICK_DURATION if args.quick else DEFAULT_DURATION),
        runs=args.runs or (QUICK_RUNS if args.quick else DEFAULT_RUNS),
        connections=args.connections,
        warmup=0 if args.quick else max(args.warmup, 0),
        stack_python=stack_python, cores=args.cores, stack_workers=stack_workers)
    started = time.time()
    try:
        records = runner.run_plan(settings, runner.Progress(settings))
    except KeyboardInterrupt:
        print("\nmtcpshim bench: interrupted; servers stopped and the network restored", file=sys.stderr)
        return INTERRUPTED
    except (BenchError, TestNetError) as err:
        print(f"\nmtcpshim bench: {err}", file=sys.stderr)
        return FAILED

    summaries = report.summarize(records, settings.workloads)
    print(report.markdown_table(summaries, records, settings))
    if args.json:
        report.write_json(args.json, records, summaries, settings, started)
    if args.plot:
        from mtcpshim.bench import plot
        plot.write_png(args.plot, summaries,
                       f"lighttpd/iperf3, kernel TCP vs mtcpshim ({settings.runs} run(s) x {settings.duration} s)")
    return 0
