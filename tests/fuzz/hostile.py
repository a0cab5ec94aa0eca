"""Runs tests/fuzz/hostile_region.py under the stack on a private test
network and records what the stack did: each attack of issue 8's table
(`run_attack`), and the hostile-region fuzzer beside honest transfers
(`run_fuzz`).  Both return a dict of observations and stop everything they
started, also on failure.  Used by tests/fuzz/test_hostile_region.py and
scripts/reliability.py (`hostile`).

Kernel peers run in the client namespace (tests/fuzz/region_peer.py); the
hostile program and its check server run in the stack's namespace; all
traffic stays on the private veth (198.18.0.0/24 of the test network).
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import subprocess
import sys
import time

import psutil

from attacks import ClientLoop
from mtcpshim import stat
from support.net import HarnessError, curl_in_client
from support.programs import STACK_START_TIMEOUT, ShimProgram, wait_until
from support.transfers import sha256_of

HERE = pathlib.Path(__file__).resolve().parent
HOSTILE = HERE / "hostile_region.py"
PEER = HERE / "region_peer.py"

ATTACK_PORT = 9100
CHECK_PORT = 9200
BLOB_PORT = 9300
VICTIM_PORT = 9400
PEER_PORT = 7100

EVENT_TIMEOUT = 45.0     # the longest wait for one step of the hostile program
PEER_TIMEOUT = 15.0      # a kernel peer's longest silence: longer is a hang
MODES = ("nslots", "cmdq", "accept-indices", "waiters", "data-off", "fake-accept", "rx-tail", "slot-free",
         "slot-taken",
         "keepalive-options",  # found by the fuzzer
         "sendfile-spans")
HONEST_MODES = ("listener-close-handshake",)  # found by the fuzzer, no attack needed


class HostileRun:
    """The hostile program under `mtcpshim run`, and the conversation with it."""

    def __init__(self, net, workdir: pathlib.Path, mode: str, args=()):
        self.net = net
        self.state = workdir / f"state-{mode}"
        self.state.mkdir(parents=True, exist_ok=True)
        self.program = ShimProgram(
            [sys.executable, str(HOSTILE), mode, "--state", str(self.state), *map(str, args)],
            workdir / f"hostile-{mode}.log", net)
        self.stack: psutil.Process | None = None
        deadline = time.monotonic() + STACK_START_TIMEOUT
        while self.stack is None and time.monotonic() < deadline and self.program.proc.poll() is None:
            self.stack = self.program.stack_process()
            time.sleep(0.05)
        self.stack_pid = self.stack.pid if self.stack else None

    def event(self, name: str, timeout: float = EVENT_TIMEOUT, instead: str | None = None) -> dict | None:
        """The JSON the program wrote for `name`, or None if it exited, or the
        stack died, first (or the time ran out, or it wrote `instead`)."""
        path = self.state / name
        other = self.state / instead if instead else None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists():
                return json.loads(path.read_text())
            if other is not None and other.exists():
                return None
            if self.program.proc.poll() is not None or not self.stack_alive():
                time.sleep(0.2)  # a last chance for a file written just before
                return json.loads(path.read_text()) if path.exists() else None
            time.sleep(0.05)
        return None

    def signal(self, name: str) -> None:
        (self.state / name).write_text("{}")

    def stack_alive(self) -> bool:
        if self.stack is None:
            return False
        try:
            return self.stack.is_running() and self.stack.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def stats(self) -> dict | None:
        try:
            return stat.fetch(self.net.srv_ns, self.net.srv_if)
        except Exception:  # noqa: BLE001 -- dead or not answering: None says it
            return None

    def output(self) -> str:
        return self.program.log_path.read_text(errors="replace")

    def stop(self) -> int:
        self.signal("stop")
        try:
            self.program.proc.wait(20)
        except subprocess.TimeoutExpired:
            pass
        return self.program.stop()


@contextlib.contextmanager
def hostile_program(net, workdir, mode, args=()):
    run = HostileRun(net, workdir, mode, args)
    try:
        yield run
    finally:
        run.stop()


class Peer:
    """region_peer.py on the client's kernel."""

    def __init__(self, net, workdir: pathlib.Path, name: str, mode: str, *args, timeout=PEER_TIMEOUT, total=60):
        self.out = workdir / f"peer-{name}.json"
        for suffix in ("", ".bin", ".ready", ".connected"):
            pathlib.Path(str(self.out) + suffix).unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", net.cli_ns, sys.executable, str(PEER), mode, "--out", str(self.out),
             "--timeout", str(timeout), "--total", str(total), *args],
            stdout=subprocess.DEVNULL, stderr=open(workdir / f"peer-{name}.err", "wb"))
        self.total = total

    def wait_file(self, suffix: str, timeout: float = 20) -> bool:
        path = pathlib.Path(str(self.out) + suffix)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists():
                return True
            if self.proc.poll() is not None:
                return path.exists()
            time.sleep(0.05)
        return False

    def result(self, timeout: float | None = None) -> dict:
        try:
            self.proc.wait(self.total + 15 if timeout is None else timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return {"outcome": "peer did not finish"}
        if not self.out.exists():
            return {"outcome": f"peer failed (status {self.proc.returncode})"}
        result = json.loads(self.out.read_text())
        result["data"] = pathlib.Path(str(self.out) + ".bin").read_bytes()
        return result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def peers():
    started: list[Peer] = []
    try:
        yield started
    finally:
        for peer in started:
            peer.kill()


HOLD_TABLE = "mtcpshim_hold"


def _hold_segments(net, port: int, hold: bool) -> None:
    """In the client namespace: drop every segment to the stack's `port`
    but SYNs (so handshakes stay half-open at the stack), or stop doing so."""
    script = f"table ip {HOLD_TABLE}\ndelete table ip {HOLD_TABLE}\n"
    if hold:
        script += (f"table ip {HOLD_TABLE} {{\n chain out {{\n  type filter hook output priority 0;\n"
                   f"  ip daddr {net.srv_ip} tcp dport {port} tcp flags & syn == 0 drop\n }}\n}}\n")
    subprocess.run(["ip", "netns", "exec", net.cli_ns, "nft", "-f", "-"], input=script.encode(),
                   capture_output=True, check=True)


def network_still_served(net, run: HostileRun, workdir: pathlib.Path) -> dict:
    """ARP and ping from the client, then a new connection to the hostile
    program's check server, byte-exact."""
    subprocess.run(["ip", "-n", net.cli_ns, "neigh", "flush", "dev", net.cli_if], capture_output=True)
    ping = subprocess.run(["ip", "netns", "exec", net.cli_ns, "ping", "-c", "3", "-i", "0.2", "-W", "2",
                           net.srv_ip], capture_output=True, timeout=30)
    check = run.event("check-ready", instead="check-failed")
    failed = run.state / "check-failed"
    fetched = None
    if check is not None:
        out = workdir / "check.bin"
        done = curl_in_client(net, f"http://{net.srv_ip}:{check['port']}/check", str(out), timeout=20)
        fetched = {"curl_status": done.returncode, "stderr": done.stderr.decode(errors="replace").strip(),
                   "exact": done.returncode == 0 and sha256_of(out) == check["sha256"]}
        out.unlink(missing_ok=True)
    return {"ping_ok": ping.returncode == 0, "check_server": check is not None,
            "check_failed": json.loads(failed.read_text()) if failed.exists() else None,
            "check_listen_failures": (check or {}).get("listen_failures", 0),
            "new_connection": fetched, "new_connection_exact": bool(fetched and fetched["exact"])}


def _death_line(output: str) -> str | None:
    return next((line for line in output.splitlines() if "the stack died" in line), None)


def run_attack(net, workdir: pathlib.Path, mode: str, settle: float = 1.0) -> dict:
    """One row of issue 8's table against the stack serving `net`."""
    workdir.mkdir(parents=True, exist_ok=True)
    args = ["--port", ATTACK_PORT, "--check-port", CHECK_PORT, "--settle", settle, "--max-wait", EVENT_TIMEOUT,
            "--max-seconds", 120]
    observed: dict = {"mode": mode}
    with peers() as started:
        if mode in ("data-off", "rx-tail", "keepalive-options", "sendfile-spans"):
            peer = Peer(net, workdir, mode, "source" if mode == "rx-tail" else "sink",
                        "--listen", f"{net.cli_ip}:{PEER_PORT}", total=40)
            started.append(peer)
            if not peer.wait_file(".ready"):
                raise HarnessError(f"the kernel peer for {mode} did not start")
            args += ["--peer", f"{net.cli_ip}:{PEER_PORT}"]
        with hostile_program(net, workdir, mode, args) as run:
            observed["stack_pid"] = run.stack_pid
            if mode in ("slot-free", "slot-taken", "fake-accept"):
                observed["ready"] = run.event("ready")
                first = Peer(net, workdir, "first", "client", "--connect", f"{net.srv_ip}:{ATTACK_PORT}", total=40)
                started.append(first)
            if mode == "listener-close-handshake":
                observed["ready"] = run.event("ready")
                _hold_segments(net, ATTACK_PORT, True)
                try:
                    client = Peer(net, workdir, "client", "client", "--connect", f"{net.srv_ip}:{ATTACK_PORT}",
                                  "--send", "held back by nftables until the listener is gone", total=20)
                    started.append(client)
                    observed["attacked"] = run.event("attacked")
                finally:
                    _hold_segments(net, ATTACK_PORT, False)
                run.signal("go")
            else:
                observed["attacked"] = run.event("attacked")
            if mode == "accept-indices" and observed["attacked"] is not None:
                client = Peer(net, workdir, "client", "client", "--connect", f"{net.srv_ip}:{ATTACK_PORT}",
                              "--send", "hello", timeout=5, total=10)
                started.append(client)
                observed["peer"] = client.result()
                run.signal("go")
            elif mode in ("slot-free", "slot-taken") and observed["attacked"] is not None:
                second = Peer(net, workdir, "second", "client", "--connect", f"{net.srv_ip}:{ATTACK_PORT}",
                              total=40)
                started.append(second)
                observed["sent"] = run.event("sent")
                observed["first"], observed["second"] = first.result(), second.result()
            elif mode in ("data-off", "rx-tail", "keepalive-options", "sendfile-spans"):
                observed["peer"] = started[0].result()
            elif mode == "fake-accept":
                observed["peer"] = first.result()
            observed.update(network_still_served(net, run, workdir))
            observed["stack_alive"] = run.stack_alive()
            observed["stats"] = run.stats() if observed["stack_alive"] else None
            observed["stack_alive"] = observed["stack_alive"] and observed["stats"] is not None \
                and observed["stats"].get("pid") == run.stack_pid
            run.signal("stop")
            observed["result"] = run.event("result", timeout=20)
        observed["status"] = run.program.proc.returncode
        observed["output_tail"] = run.output()[-3000:]
        observed["stack_death"] = _death_line(run.output())
    return observed


def summary(observed: dict) -> str:
    """One paragraph for a human: what the stack did."""
    stats = observed.get("stats") or {}
    parts = [f"{observed['mode']}: stack {'alive' if observed['stack_alive'] else 'DEAD'}"]
    if observed.get("stack_death"):
        parts.append(observed["stack_death"].strip())
    parts.append(f"ping {'ok' if observed.get('ping_ok') else 'FAILED'}")
    parts.append(f"new connection {'exact' if observed.get('new_connection_exact') else 'FAILED'}")
    if stats:
        parts.append(f"shm counters {stats.get('shm')}")
    for name in ("peer", "first", "second"):
        if observed.get(name):
            peer = observed[name]
            parts.append(f"{name}: {peer.get('outcome')} after {peer.get('received', peer.get('sent'))} bytes")
    return "; ".join(parts)


# --- the fuzzer beside honest transfers ---------------------------------------------------


class HonestLoop(ClientLoop):
    """attacks.ClientLoop that also keeps, for each failed download, curl's
    message, the client port (to find the connection in the stack's log)
    and how many bytes arrived."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.details: list[dict] = []

    def run(self):
        while not self._stopping.is_set() and len(self.results) < self.limit:
            started = time.monotonic()
            done = curl_in_client(self.net, self.url, str(self.output), self.timeout,
                                  ("-w", "%{local_port} %{size_download}"))
            seconds = round(time.monotonic() - started, 2)
            digest = sha256_of(self.output) if done.returncode == 0 else None
            self.results.append((done.returncode, digest, seconds))
            if done.returncode != 0:
                port, _, size = done.stdout.decode(errors="replace").partition(" ")
                self.details.append({"status": done.returncode, "seconds": seconds, "client_port": port,
                                     "bytes": size, "stderr": done.stderr.decode(errors="replace").strip()})


def classify(results, expected_sha256: str) -> dict:
    """curl results (status, sha256, seconds) -> exact / reset / hung / failed."""
    out = {"exact": 0, "reset": 0, "hung": 0, "failed": 0, "failures": []}
    for status, digest, seconds in results:
        if status == 0 and digest == expected_sha256:
            out["exact"] += 1
        elif status in (7, 52, 56):   # refused, empty reply, connection reset
            out["reset"] += 1
        elif status == 28:            # --max-time: no progress, a hang
            out["hung"] += 1
            out["failures"].append((status, seconds))
        else:
            out["failed"] += 1
            out["failures"].append((status, seconds))
    return out


def run_fuzz(net, workdir: pathlib.Path, count: int, rate: float, time_limit: float, seed: int = 1,
             transfer_timeout: float = 60, all_fields: bool = False) -> dict:
    """The hostile-region fuzzer writes while a kernel client downloads a blob
    from the program's (protected) server again and again, and kernel
    clients keep 16 connections to the program's decoy listener open and
    sending: those the fuzzer attacks."""
    workdir.mkdir(parents=True, exist_ok=True)
    args = ["--seed", seed, "--count", count, "--rate", rate, "--max-seconds", time_limit + 120,
            "--blob-port", BLOB_PORT, "--victim-port", VICTIM_PORT, "--check-port", CHECK_PORT,
            "--max-wait", EVENT_TIMEOUT] + (["--all-fields"] if all_fields else [])
    observed: dict = {"seed": seed, "count": count, "rate": rate}
    stop_streams = workdir / "streams.stop"
    stop_streams.unlink(missing_ok=True)
    with peers() as started, hostile_program(net, workdir, "fuzz", args) as run:
        observed["stack_pid"] = run.stack_pid
        ready = run.event("ready")
        if ready is None:
            raise HarnessError(f"the hostile program did not start: {run.output()[-1500:]}")
        before = run.stats() or {}
        honest = HonestLoop(net, f"http://{net.srv_ip}:{BLOB_PORT}/blob", workdir, timeout=transfer_timeout)
        victims = Peer(net, workdir, "streams", "streams", "--connect", f"{net.srv_ip}:{VICTIM_PORT}",
                       "--streams", "16", "--stop", str(stop_streams), timeout=10, total=time_limit + 120)
        started.append(victims)
        honest.start()
        try:
            run.signal("go")
            fuzzed = run.event("fuzzed", timeout=time_limit + 60)
            # The honest transfer under fire finishes, then one more, clean.
            under_fire = len(honest.results) + 1
            wait_until(lambda: len(honest.results) >= under_fire or not honest.is_alive(),
                       transfer_timeout + 30, "the transfer under fire to finish")
        finally:
            honest_results = honest.stop()
            stop_streams.write_text("stop\n")
            victim_results = victims.result(30)
        observed["fuzzed"] = fuzzed
        observed["honest"] = classify(honest_results, ready["blob_sha256"])
        observed["honest"]["transfers"] = len(honest_results)
        observed["honest"]["failure_details"] = honest.details[:20]
        observed["victims"] = {k: v for k, v in victim_results.items() if k not in ("data", "sha256", "received")}
        observed.update(network_still_served(net, run, workdir))
        observed["stack_alive"] = run.stack_alive()
        after = run.stats() if observed["stack_alive"] else None
        observed["stack_alive"] = observed["stack_alive"] and after is not None and after.get("pid") == run.stack_pid
        observed["stats"] = after
        observed["shm_counters"] = (after or {}).get("shm", {})
        observed["tcp_counters"] = {k: v - (before.get("tcp") or {}).get(k, 0)
                                    for k, v in ((after or {}).get("tcp") or {}).items()}
        run.signal("stop")
        observed["result"] = run.event("result", timeout=30)
        if observed["fuzzed"] is None:  # the stack died first: what the fuzzer did is in its result
            observed["fuzzed"] = (observed["result"] or {}).get("fuzz")
    observed["status"] = run.program.proc.returncode
    observed["stack_death"] = _death_line(run.output())
    observed["output_tail"] = run.output()[-3000:]
    return observed


def fuzz_summary(observed: dict) -> str:
    fuzzed = observed.get("fuzzed") or {}
    honest, victims = observed["honest"], observed.get("victims") or {}
    kinds = ", ".join(f"{k} {v}" for k, v in sorted((fuzzed.get("by_kind") or {}).items()))
    return "\n".join([
        f"- hostile operations: {fuzzed.get('writes')} in {fuzzed.get('seconds')} s (seed {observed['seed']}, "
        f"target {observed['rate']:.0f}/s); by kind: {kinds}",
        f"- stack crashes: {0 if observed['stack_alive'] else 1}"
        + (f" ({observed['stack_death']})" if observed.get("stack_death") else ""),
        f"- honest downloads (protected server): {honest['transfers']}, byte-exact {honest['exact']}, "
        f"reset {honest['reset']}, hung {honest['hung']}, failed {honest['failed']}"
        + (f" ({honest.get('failure_details', honest['failures'])[:5]})" if honest["failures"] else ""),
        f"- attacked connections (kernel clients sending to the decoy listener): {victims.get('connects')} opened, "
        f"reset {victims.get('reset')}, closed {victims.get('eof')}, refused {victims.get('refused')}, "
        f"silent for 10 s {victims.get('silent')}, {victims.get('bytes_sent')} bytes sent",
        f"- shm counters: {observed['shm_counters']}",
        f"- afterwards: ping {'ok' if observed['ping_ok'] else 'FAILED'}, new connection "
        f"{'byte-exact' if observed['new_connection_exact'] else 'FAILED'}",
    ])
