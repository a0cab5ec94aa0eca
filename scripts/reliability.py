#!/usr/bin/env python3
"""The long reliability runs behind docs/reliability.md.

    sudo python3 scripts/reliability.py                  # everything, long sizes
    sudo python3 scripts/reliability.py faults --size-mib 16 --runs 3
    sudo python3 scripts/reliability.py fuzz --frames 1000000
    sudo python3 scripts/reliability.py flood --syns 100000
    sudo python3 scripts/reliability.py hostile --hostile-ops 1000000

faults  moves a body each way under every fault of tests/support/net.py
        (256 MiB by default), sha256-checked, --runs times (the stack's own
        faults reseeded each time: one seed decides which frames are hit,
        and one hit on a request costs a client's timeout), with a summary
        of the medians and the ratio of stack to kernel sending;
fuzz    throws mutated frames at the stack while a transfer runs;
flood   sends spoofed SYNs while a client keeps connecting;
hostile runs a program under the stack that attacks the shared region:
        each attack of issue 8's table, then the seeded region fuzzer
        beside honest downloads (tests/fuzz/hostile_region.py).

Each part runs on its own private test network (random mtcpt-* names,
removed afterwards).  Results are printed as Markdown and, with --json,
written as JSON, merged into what the file already holds.
"""
import argparse
import contextlib
import itertools
import json
import os
import pathlib
import re
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "fuzz"), str(ROOT)]

import attacks  # noqa: E402
import hostile  # noqa: E402
from support.net import FAULTS, HarnessError, needs_frame_exact, private_network, set_link_faults  # noqa: E402
from support.programs import kernel_http_server  # noqa: E402
from support.transfers import make_body, stack_drop_counters, stack_receives, stack_sends  # noqa: E402

MIB = 1024 * 1024


def reseeded(impair: str | None, attempt: int) -> str | None:
    """The impairment spec of the attempt-th run: its seed counted up."""
    if impair is None or not attempt:
        return impair
    if re.search(r"\bseed=\d+", impair):
        return re.sub(r"\bseed=(\d+)", lambda match: f"seed={int(match.group(1)) + attempt}", impair)
    return f"{impair},seed={1 + attempt}"


def run_faults(size_mib: int, timeout: float, runs: int = 1) -> dict:
    """Each fault on the network it needs (needs_frame_exact), with a
    fault-free baseline on each network used, each direction `runs` times."""
    results = {"size_bytes": size_mib * MIB, "runs": []}
    plan = [("none", {}, False), ("none", {}, True)] + [
        (name, settings, needs_frame_exact(settings)) for name, settings in FAULTS.items()]
    with tempfile.TemporaryDirectory(prefix="mtcpshim-faults-") as scratch, contextlib.ExitStack() as networks:
        scratch = pathlib.Path(scratch)
        docroot = scratch / "docroot"
        docroot.mkdir()
        make_body(docroot / "body.bin", size_mib * MIB)
        made = {}
        for frame_exact in (False, True):
            net = networks.enter_context(private_network(offloads=not frame_exact))
            made[frame_exact] = net, networks.enter_context(
                kernel_http_server(net, docroot, scratch / f"http-{net.cli_ns}.log"))
        for name, settings, frame_exact in plan:
            net, kernel_url = made[frame_exact]
            settings = dict(settings)
            impair = settings.pop("impair", None)
            offloads = "off" if frame_exact else "on"
            set_link_faults(net, **settings)
            try:
                for direction, attempt in itertools.product(("stack sends", "stack receives"), range(runs)):
                    workdir = scratch / "run"
                    workdir.mkdir(exist_ok=True)
                    run_impair = reseeded(impair, attempt)
                    print(f"faults: {name} (offloads {offloads}), {direction}, {size_mib} MiB, "
                          f"run {attempt + 1} of {runs} ...", file=sys.stderr, flush=True)
                    try:
                        if direction == "stack sends":
                            transfer = stack_sends(net, docroot, "body.bin", workdir, run_impair, timeout)
                        else:
                            transfer = stack_receives(net, kernel_url, docroot, "body.bin", workdir,
                                                     run_impair, timeout)
                    except HarnessError as err:
                        results["runs"].append({"fault": name, "offloads": offloads, "direction": direction,
                                                "error": str(err)})
                        continue
                    results["runs"].append({
                        "fault": name, "offloads": offloads, "direction": direction, "impair": run_impair,
                        **settings,
                        "bytes": transfer.size, "seconds": round(transfer.seconds, 2),
                        "mb_per_s": round(transfer.megabytes_per_second, 3), "exact": transfer.exact,
                        "stack_peak_rss_kib": transfer.stack_counters["peak_rss_kib"],
                        "stack": stack_drop_counters(transfer.stack_counters),
                        "kernel": {k: v for k, v in transfer.kernel_counters.items() if v},
                        "link": {k: v for k, v in transfer.link_counters.items() if v},
                    })
                    print(f"    {transfer.size} bytes in {transfer.seconds:.1f} s, exact={transfer.exact}",
                          file=sys.stderr, flush=True)
            finally:
                set_link_faults(net)
    return results


def faults_markdown(results: dict) -> str:
    lines = [f"Body: {results['size_bytes'] // MIB} MiB each way per fault. Offloads: the veth at the "
             "kernel's defaults (on) or frame-exact (off, for nftables loss and duplication).", "",
             "| fault | offloads | direction | bytes | seconds | MB/s | sha256 equal | stack peak RSS "
             "| what the faults did |",
             "|---|---|---|---:|---:|---:|---|---:|---|"]
    for run in results["runs"]:
        if "error" in run:
            lines.append(f"| {run['fault']} | {run['offloads']} | {run['direction']} | | | | **failed** | "
                         f"| {run['error']} |")
            continue
        evidence = {**run["link"], **{k: v for k, v in run["stack"].items() if k.startswith("impair_")}}
        drops = {k: v for k, v in run["stack"].items() if not k.startswith("impair_")}
        kernel = {k: v for k, v in run["kernel"].items() if k.split(".")[1] in (
            "InCsumErrors", "InHdrErrors", "TCPDSACKOldSent", "TCPDSACKRecv", "RetransSegs")}
        detail = ", ".join(f"{k} {v}" for k, v in {**evidence, **drops, **kernel}.items())
        lines.append(f"| {run['fault']} | {run['offloads']} | {run['direction']} | {run['bytes']} | {run['seconds']} | "
                     f"{run['mb_per_s']} | {'yes' if run['exact'] else '**NO**'} | "
                     f"{run['stack_peak_rss_kib'] // 1024} MiB | {detail} |")
    return "\n".join(lines)


def faults_summary_markdown(results: dict) -> str:
    """Per fault, the median MB/s of each direction and their ratio: issue
    9 asks the stack as a sender for 0.8x of the kernel as a sender."""
    speeds = {}
    for run in results["runs"]:
        if "error" not in run:
            speeds.setdefault((run["fault"], run["offloads"]), {}).setdefault(
                run["direction"], []).append(run["mb_per_s"])
    lines = ["| fault | offloads | stack sends, MB/s | kernel sends to the stack, MB/s | ratio | runs |",
             "|---|---|---:|---:|---:|---|"]
    for (fault, offloads), by_direction in speeds.items():
        sends, receives = by_direction.get("stack sends", []), by_direction.get("stack receives", [])
        if not sends or not receives:
            continue
        ours, kernel = statistics.median(sends), statistics.median(receives)
        listed = "; ".join(", ".join(f"{value:g}" for value in values) for values in (sends, receives))
        lines.append(f"| {fault} | {offloads} | {ours:g} | {kernel:g} | {ours / kernel:.2f} | {listed} |")
    return "\n".join(lines)


def run_fuzz(frames: int, rate: float, seed: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="mtcpshim-fuzz-") as scratch, private_network() as net:
        scratch = pathlib.Path(scratch)
        docroot = scratch / "docroot"
        docroot.mkdir()
        make_body(docroot / "body.bin", 16 * MIB)
        print(f"fuzz: {frames} frames at {rate:.0f}/s ...", file=sys.stderr, flush=True)
        return {"seed": seed, "target_rate": rate,
                **attacks.fuzz_during_transfers(net, docroot, "body.bin", scratch, frames, rate,
                                                time_limit=3600, seed=seed)}


def fuzz_markdown(run: dict) -> str:
    kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(run["by_kind"].items()))
    reasons = ", ".join(f"{name} {count}" for name, count in sorted(run["drop_reasons"].items()) if count)
    return "\n".join([
        f"- frames sent: {run['frames_sent']} in {run['seconds']} s ({run['frames_per_s']} frames/s, seed {run['seed']})",
        f"- by kind: {kinds}",
        f"- frames that had to be dropped: {run['must_drop']}; drops counted by the stack: {run['drops_counted']} "
        f"(of which the packet ring's own: {run['ring_drops']})",
        f"- drop counters: {reasons}",
        f"- stack alive afterwards: {run['stack_alive']}, still answering: {run['still_answers']}",
        f"- downloads during the run: {run['transfers']}, byte-exact: {run['transfers_exact']} "
        f"({run['bytes_moved']} bytes)",
        f"- stack RSS: {run['rss_before'] // 1024} KiB before, peak {run['peak_rss'] // 1024} KiB",
    ])


def run_flood(syns: int, rate: float, seed: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="mtcpshim-flood-") as scratch, private_network() as net:
        scratch = pathlib.Path(scratch)
        print(f"flood: {syns} SYNs at {rate:.0f}/s ...", file=sys.stderr, flush=True)
        return {"seed": seed, "target_rate": rate,
                **attacks.syn_flood(net, scratch, scratch, syns, rate, time_limit=3600, seed=seed)}


def flood_markdown(run: dict) -> str:
    counters = ", ".join(f"{name} {count}" for name, count in sorted(run["tcp_counters"].items()))
    return "\n".join([
        f"- spoofed SYNs sent: {run['syns_sent']} in {run['seconds']} s ({run['syns_per_s']} SYNs/s, seed {run['seed']})",
        f"- TCP counters during the run: {counters}",
        f"- honest connections during the flood: {run['client_during_ok']} of {run['client_during']} succeeded; "
        f"afterwards: {run['client_after_ok']} of {run['client_after']}",
        f"- stack alive afterwards: {run['stack_alive']}; connections left: {run['connections_after']}",
        f"- stack RSS: {run['rss_before'] // 1024} KiB before, peak {run['peak_rss'] // 1024} KiB, "
        f"{run['rss_after'] // 1024} KiB after",
    ])


def run_hostile(ops: int, rate: float, seed: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="mtcpshim-hostile-") as scratch, private_network() as net:
        scratch = pathlib.Path(scratch)
        attacks_seen = []
        for mode in hostile.MODES:
            print(f"hostile: {mode} ...", file=sys.stderr, flush=True)
            try:
                observed = hostile.run_attack(net, scratch / mode, mode)
            except HarnessError as err:
                attacks_seen.append({"mode": mode, "error": str(err)})
                continue
            attacks_seen.append({
                "mode": mode, "stack_alive": observed["stack_alive"], "stack_death": observed["stack_death"],
                "ping_ok": observed["ping_ok"], "new_connection_exact": observed["new_connection_exact"],
                "shm": (observed["stats"] or {}).get("shm"),
                "peers": {name: observed[name]["outcome"] for name in ("peer", "first", "second")
                          if observed.get(name)}})
        time_limit = ops / rate * 1.5 + 120 if rate else 3600
        print(f"hostile: fuzzer, {ops} operations at {rate:.0f}/s ...", file=sys.stderr, flush=True)
        fuzz = hostile.run_fuzz(net, scratch / "fuzz", ops, rate, time_limit, seed=seed)
        fuzz.pop("stats", None)
        fuzz.pop("output_tail", None)
        return {"attacks": attacks_seen, "fuzz": fuzz}


def hostile_markdown(results: dict) -> str:
    lines = ["| attack | stack | ping | new connection | counted (shm) | the attacked connections |",
             "|---|---|---|---|---|---|"]
    for run in results["attacks"]:
        if "error" in run:
            lines.append(f"| {run['mode']} | **run failed** | | | | {run['error']} |")
            continue
        stack = "alive" if run["stack_alive"] else f"**dead**: {run['stack_death'] or '?'}"
        counted = ", ".join(f"{k} {v}" for k, v in sorted((run["shm"] or {}).items())) or "-"
        peers = ", ".join(f"{k}: {v}" for k, v in run["peers"].items()) or "-"
        lines.append(f"| {run['mode']} | {stack} | {'ok' if run['ping_ok'] else '**failed**'} | "
                     f"{'byte-exact' if run['new_connection_exact'] else '**failed**'} | {counted} | {peers} |")
    return "\n".join(lines) + "\n\n" + hostile.fuzz_summary(results["fuzz"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parts", nargs="*", choices=("faults", "fuzz", "flood", "hostile", []), default=[],
                        help="what to run (default: all)")
    parser.add_argument("--size-mib", type=int, default=256, help="body size per fault and direction")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds one transfer may take")
    parser.add_argument("--runs", type=int, default=1, help="transfers per fault and direction (medians)")
    parser.add_argument("--frames", type=int, default=1_000_000, help="frames to fuzz with")
    parser.add_argument("--fuzz-rate", type=float, default=20_000, help="fuzzed frames per second")
    parser.add_argument("--syns", type=int, default=100_000, help="spoofed SYNs to flood with")
    parser.add_argument("--syn-rate", type=float, default=10_000, help="SYNs per second")
    parser.add_argument("--hostile-ops", type=int, default=1_000_000, help="hostile writes into the region")
    parser.add_argument("--hostile-rate", type=float, default=2_000, help="hostile writes per second")
    parser.add_argument("--seed", type=int, default=1, help="seed of the fuzzers and the flood")
    parser.add_argument("--json", type=pathlib.Path, help="merge the results into this JSON file")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces, AF_PACKET)")
    parts = args.parts or ["faults", "fuzz", "flood", "hostile"]

    results = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    started = time.monotonic()
    if "faults" in parts:
        results["faults"] = run_faults(args.size_mib, args.timeout, args.runs)
        print("## Faults\n\n" + faults_summary_markdown(results["faults"]) + "\n\n"
              + faults_markdown(results["faults"]) + "\n")
    if "fuzz" in parts:
        results["fuzz"] = run_fuzz(args.frames, args.fuzz_rate, args.seed)
        print("## Fuzzing\n\n" + fuzz_markdown(results["fuzz"]) + "\n")
    if "flood" in parts:
        results["flood"] = run_flood(args.syns, args.syn_rate, args.seed)
        print("## SYN flood\n\n" + flood_markdown(results["flood"]) + "\n")
    if "hostile" in parts:
        results["hostile"] = run_hostile(args.hostile_ops, args.hostile_rate, args.seed)
        print("## A hostile program\n\n" + hostile_markdown(results["hostile"]) + "\n")
    results["machine"] = {"cpus": os.cpu_count(), "kernel": os.uname().release}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"done in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
