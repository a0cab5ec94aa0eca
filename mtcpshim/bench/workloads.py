"""The client side of each workload: the command that loads the server from
the client namespace, and the parser that turns its output into figures.

Nine measures come from the five workloads a user names: `iperf` measures
both directions, and `bulk` and `iperf` run once more on the test network's
frame-exact variant (offloads off, one segment per frame) beside the
kernel's defaults, so that what the offloads are worth to each stack shows.
Every client runs pinned to CPU 0 (the server side has CPU 1), so that
neither side steals the other's core.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from mtcpshim import testnet

NET = testnet.TESTNET
CLIENT_CPU = "0"
OFFLOADS_OFF = "-offloads-off"  # the name suffix of a measure on the frame-exact network
HTTP_PORT = 8080
IPERF_PORT = 5201
SMALL_FILE, SMALL_FILE_SIZE = "small.txt", 64
LARGE_FILE, LARGE_FILE_SIZE = "large.bin", 1024 * 1024
# A few concurrent 1 MiB streams fill the link; more would only queue in
# send buffers and turn per-request latency into seconds.
BULK_CONNECTIONS = 8
WRK_TIMEOUT = "5s"
# wrk prints its summary through this script as one line of JSON: exact
# counts and percentiles instead of the rounded human-readable text.
WRK_MARK = "WRK-SUMMARY "
WRK_SCRIPT = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests": %%d, "bytes": %%d, "duration_us": %%d, "connect": %%d, "read": %%d, '
    .. '"write": %%d, "timeout": %%d, "non_2xx_3xx": %%d, "p50_us": %%.1f, "p99_us": %%.1f}\\n',
    summary.requests, summary.bytes, summary.duration, e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
""" % WRK_MARK

# Many open connections at once (issue 12): each one idles between its
# requests, as a real server's clients do, and the server holds them all.
CONCURRENCY = (1000, 10000)
WORKLOAD_NAMES = ("keepalive", "close", "bulk", "latency", "iperf", "concurrency")


class ClientOutputError(Exception):
    """The client's output held no figures (it failed before measuring)."""


@dataclass
class ClientResult:
    """What one client run measured.  `problems` lists every failed request,
    socket error or client failure; a run with any is invalid."""
    requests: int | None
    bytes: int
    seconds: float
    p50_us: float | None = None
    p99_us: float | None = None
    retransmits: int | None = None
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Workload:
    name: str            # the measure's key in the JSON and the plot
    group: str           # the --workload name that selects it
    server: str          # "lighttpd" or "iperf3"
    label: str           # row label in the table
    per_request: bool    # CPU reported per request (else per GB) and rate in req/s (else Gbit/s)
    offloads: bool = True  # the test network's variant: the kernel's defaults, or frame-exact
    connections: int = 0   # keep-alive connections; 0: the run's --connections

    @property
    def client(self) -> str:
        """The client command, the same on either network."""
        return "keepalive" if self.connections else self.name.removesuffix(OFFLOADS_OFF)

    def client_argv(self, duration: int, connections: int, script_path: str) -> list[str]:
        prefix = ["ip", "netns", "exec", NET.cli_ns, "taskset", "-c", CLIENT_CPU]
        if self.server == "iperf3":
            reverse = ["-R"] if self.client == "iperf-send" else []
            return prefix + ["iperf3", "-c", NET.srv_ip, "-p", str(IPERF_PORT), "-t", str(duration), "-J", *reverse]
        wrk = ["wrk", "-t1", f"-d{duration}s", "--timeout", WRK_TIMEOUT, "-s", script_path]
        base_url = f"http://{NET.srv_ip}:{HTTP_PORT}"
        if self.client == "keepalive":
            return prefix + wrk + [f"-c{self.connections or connections}", f"{base_url}/{SMALL_FILE}"]
        if self.client == "close":
            return prefix + wrk + [f"-c{connections}", "-H", "Connection: close", f"{base_url}/{SMALL_FILE}"]
        if self.client == "bulk":
            return prefix + wrk + [f"-c{BULK_CONNECTIONS}", f"{base_url}/{LARGE_FILE}"]
        return prefix + wrk + ["-c1", f"{base_url}/{SMALL_FILE}"]

    def parse(self, stdout: str) -> ClientResult:
        return parse_iperf3(stdout) if self.server == "iperf3" else parse_wrk(stdout)


WORKLOADS = (
    Workload("keepalive", "keepalive", "lighttpd", "keepalive, 64 B", True),
    Workload("close", "close", "lighttpd", "Connection: close, 64 B", True),
    Workload("bulk", "bulk", "lighttpd", f"bulk, 1 MiB, {BULK_CONNECTIONS} conns", False),
    Workload("bulk" + OFFLOADS_OFF, "bulk", "lighttpd", f"bulk, 1 MiB, {BULK_CONNECTIONS} conns, offloads off",
             False, offloads=False),
    Workload("latency", "latency", "lighttpd", "latency, 1 conn, 64 B", True),
    Workload("iperf-recv", "iperf", "iperf3", "iperf3, server receives", False),
    Workload("iperf-send", "iperf", "iperf3", "iperf3 -R, server sends", False),
    Workload("iperf-recv" + OFFLOADS_OFF, "iperf", "iperf3", "iperf3, server receives, offloads off", False,
             offloads=False),
    Workload("iperf-send" + OFFLOADS_OFF, "iperf", "iperf3", "iperf3 -R, server sends, offloads off", False,
             offloads=False),
    *(Workload(f"keepalive-{n}", "concurrency", "lighttpd", f"keepalive, {n:,} conns, 64 B", True, connections=n)
      for n in CONCURRENCY),
)


def select(groups: list[str]) -> list[Workload]:
    """The measures of the named workloads, in the canonical order."""
    return [w for w in WORKLOADS if w.group in groups]


def parse_wrk(stdout: str) -> ClientResult:
    match = re.search(rf"^{re.escape(WRK_MARK)}(.*)$", stdout, re.MULTILINE)
    if not match:
        raise ClientOutputError("wrk printed no summary")
    summary = json.loads(match.group(1))
    socket_errors = {kind: summary[kind] for kind in ("connect", "read", "write", "timeout") if summary[kind]}
    problems = []
    if socket_errors:
        problems.append("socket errors: " + ", ".join(f"{kind} {count}" for kind, count in socket_errors.items()))
    if summary["non_2xx_3xx"]:
        problems.append(f"non-2xx/3xx responses: {summary['non_2xx_3xx']}")
    if summary["requests"] == 0:
        problems.append("no request completed")
    return ClientResult(requests=summary["requests"], bytes=summary["bytes"],
                        seconds=summary["duration_us"] / 1e6,
                        p50_us=summary["p50_us"], p99_us=summary["p99_us"], problems=problems)


def parse_iperf3(stdout: str) -> ClientResult:
    try:
        report = json.loads(stdout)
    except json.JSONDecodeError:
        raise ClientOutputError("iperf3 printed no JSON report") from None
    if "error" in report:
        raise ClientOutputError(f"iperf3: {report['error']}")
    received = report["end"]["sum_received"]
    problems = [] if received["bytes"] else ["no data arrived"]
    return ClientResult(requests=None, bytes=received["bytes"], seconds=received["seconds"],
                        retransmits=report["end"].get("sum_sent", {}).get("retransmits"), problems=problems)
