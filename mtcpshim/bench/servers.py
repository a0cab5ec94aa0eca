"""The server side: the same lighttpd (or iperf3) binary and configuration,
once on the kernel stack and once under `mtcpshim run`, pinned to CPU 1
(with `--cores N`: lighttpd with N workers, and N stack workers, on CPUs
0 to N-1).

Kernel case: the stack side's veth gets the kernel address for the
duration and loses it again afterwards, whatever happens: with a kernel
address on that interface the kernel answers our stack's segments with
resets.  While it is there the bench holds the launcher's interface lock, so
no stack can start on the interface meanwhile.

Every server is started in its own session and stopped by pid; then
anything left in that session, and every process it had started, is killed.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psutil

from mtcpshim import launcher, testnet
from mtcpshim.bench import interrupts
from mtcpshim.bench.cpu import ProcessTreeCpu
from mtcpshim.bench.workloads import (HTTP_PORT, IPERF_PORT, LARGE_FILE, LARGE_FILE_SIZE, SMALL_FILE,
                                      SMALL_FILE_SIZE, WRK_SCRIPT)

NET = testnet.TESTNET
SERVER_CPU = "1"
KERNEL, SHIM = "kernel", "shim"
STACKS = (KERNEL, SHIM)
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
POLL_INTERVAL = 0.05


class BenchError(Exception):
    """One line for the user: the bench cannot go on."""


@dataclass(frozen=True)
class Site:
    """The files both stacks serve, and the scratch space of one bench."""
    directory: pathlib.Path

    @property
    def lighttpd_conf(self) -> pathlib.Path:
        return self.directory / "lighttpd.conf"

    @property
    def wrk_script(self) -> pathlib.Path:
        return self.directory / "summary.lua"


def server_cpus(cores: int) -> str:
    """The CPUs the server (and our stack) runs on, as taskset takes them:
    CPU 1 alone, away from the client on CPU 0; N cores from CPU 0 on."""
    return SERVER_CPU if cores == 1 else f"0-{cores - 1}"


@contextlib.contextmanager
def site(cores: int = 1) -> Iterator[Site]:
    with tempfile.TemporaryDirectory(prefix="mtcpshim-bench-") as directory:
        root = pathlib.Path(directory)
        docroot = root / "docroot"
        docroot.mkdir()
        (docroot / SMALL_FILE).write_bytes(b"x" * (SMALL_FILE_SIZE - 1) + b"\n")
        (docroot / LARGE_FILE).write_bytes(os.urandom(LARGE_FILE_SIZE))
        made = Site(root)
        made.wrk_script.write_text(WRK_SCRIPT)
        made.lighttpd_conf.write_text(f"""\
server.document-root = "{docroot}"
server.port = {HTTP_PORT}
server.bind = "0.0.0.0"
server.errorlog = "{root / 'lighttpd-error.log'}"
mimetype.assign = (".txt" => "text/plain", ".bin" => "application/octet-stream")
# Keep-alive connections must outlive a run; the field is 16 bits wide.
server.max-keep-alive-requests = 65535
server.max-keep-alive-idle = 60
# Also 16 bits (65536 would wrap to 0), and below the hard open-file limit.
server.max-fds = 16384
""" + (f"server.max-worker = {cores}\n" if cores > 1 else ""))
        yield made


def server_argv(program: str, where: Site) -> list[str]:
    if program == "lighttpd":
        return ["lighttpd", "-D", "-f", str(where.lighttpd_conf)]
    # An explicit IPv4 bind: iperf3's default wildcard is an IPv6 socket,
    # which stays with the kernel under the shim.
    return ["iperf3", "-s", "-p", str(IPERF_PORT), "-B", NET.srv_ip, "--forceflush"]


class RunningServer:
    """A started server: its process tree for CPU accounting, and its log."""

    def __init__(self, stack: str, program: str, argv: list[str], log_path: pathlib.Path):
        self.stack = stack
        self.program = program
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        self.cpu = ProcessTreeCpu([self.process.pid])

    def alive(self) -> bool:
        # WNOWAIT leaves an exited server a zombie until stop() reaps it: its
        # pid, and so the process group stop() signals, cannot be reused before.
        return os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None

    def log_tail(self) -> str:
        lines = self.log_path.read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else "(no output)"

    def await_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if not self.alive():
                raise BenchError(f"{self.program} on the {self.stack} stack exited: {self.log_tail()}")
            if self._answers():
                return
            time.sleep(POLL_INTERVAL)
        raise BenchError(f"{self.program} on the {self.stack} stack did not answer within {READY_TIMEOUT:.0f} s")

    def _answers(self) -> bool:
        if self.program == "iperf3":
            return "Server listening" in self.log_path.read_text(errors="replace")
        probe = ["ip", "netns", "exec", NET.cli_ns, "curl", "-sf", "-m", "1", "-o", "/dev/null",
                 f"http://{NET.srv_ip}:{HTTP_PORT}/{SMALL_FILE}"]
        return subprocess.run(probe, capture_output=True).returncode == 0

    def stop(self) -> None:
        """The launcher forwards SIGINT to its program, then stops the stack.
        What the server started is ended too: lighttpd moves to a session of
        its own, and its workers may outlive its master (the launcher then
        returns while the stack serves them)."""
        started = _descendants(self.process.pid)
        if self.alive():
            os.kill(self.process.pid, signal.SIGINT if self.stack == SHIM else signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while self.alive() and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL)
        # Whatever is left in the server's session (a stack process whose
        # launcher died, say).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        for process in started:
            with contextlib.suppress(psutil.Error):
                process.kill()                    # by pid and start time: only what we started


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


@contextlib.contextmanager
def running(stack: str, program: str, where: Site, stack_python: str = "cpython",
            cores: int = 1, stack_workers: int = 1) -> Iterator[RunningServer]:
    """`program` serving on `stack` until the block ends, on `cores` cores;
    ours under `stack_python`, with `stack_workers` workers."""
    cpus = server_cpus(cores)
    argv = server_argv(program, where)
    log_path = where.directory / f"{program}-{stack}.log"
    with kernel_address() if stack == KERNEL else contextlib.nullcontext():
        if stack == KERNEL:
            argv = ["ip", "netns", "exec", NET.srv_ns, "taskset", "-c", cpus, *argv]
        else:
            # The stack process and the program inherit the launcher's affinity.
            argv = ["taskset", "-c", cpus, sys.executable, "-m", "mtcpshim.cli", "run",
                    "--stack-python", stack_python, "--cores", str(stack_workers), "--", *argv]
        server = None
        try:
            server = RunningServer(stack, program, argv, log_path)
            server.await_ready()
            yield server
        finally:
            with interrupts.deferred():
                if server is not None:
                    server.stop()


@contextlib.contextmanager
def kernel_address() -> Iterator[None]:
    """The stack address on the stack side's veth, owned by the kernel, for the block."""
    address = f"{NET.srv_ip}/{NET.prefix}"
    with interface_lock():
        try:
            _ip("-n", NET.srv_ns, "addr", "add", address, "dev", NET.srv_if)
            yield
        finally:
            with interrupts.deferred():
                _ip("-n", NET.srv_ns, "addr", "del", address, "dev", NET.srv_if, check=False)


@contextlib.contextmanager
def interface_lock() -> Iterator[None]:
    """The lock `mtcpshim run` takes for the test network's interface, so the
    kernel-stack runs and a stack exclude each other.  A server of several
    processes may leave the stack serving its last ones for a moment after
    the launcher returned (its keeper holds the lock): that is waited for."""
    deadline = time.monotonic() + STOP_TIMEOUT
    with contextlib.ExitStack() as held:
        while True:
            try:
                held.enter_context(launcher.interface_claim(NET.srv_ns, NET.srv_if))
                break
            except launcher.LaunchError as err:  # only the claim raises it
                if time.monotonic() >= deadline:
                    raise BenchError(f"{err}: stop it before benchmarking") from None
                time.sleep(POLL_INTERVAL)
        yield


def _ip(*args: str, check: bool = True) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise BenchError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
