"""Programs under `mtcpshim run` (stopped by pid, with whatever they started)
and servers on the client's kernel."""
from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import psutil

from mtcpshim import stat, testnet

from .net import KERNEL_HTTP_PORT, NET, SERVER_PORT, HarnessError, curl_in_client

STACK_START_TIMEOUT = 30.0


def mtcpshim_command(*args) -> list[str]:
    return [sys.executable, "-m", "mtcpshim.cli", *args]


def run_under_shim(argv, options=(), timeout: float = 60) -> subprocess.CompletedProcess:
    """`mtcpshim run OPTIONS -- argv` to its end, the output as text."""
    return subprocess.run(mtcpshim_command("run", *options, "--", *argv), capture_output=True, text=True,
                          timeout=timeout)


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise HarnessError(f"timed out after {timeout:.0f} s waiting for {what}")


class ShimProgram:
    """A program under `mtcpshim run`, in its own session so that a stuck one
    can be killed with everything it started.  On `net` if given (else the
    shared test network, or wherever `options` say); umask -1 inherits ours."""

    def __init__(self, argv, log_path, net: testnet.TestNet | None = None, options=(),
                 impair: str | None = None, umask: int = -1):
        self.net = net or NET
        self.log_path = pathlib.Path(log_path)
        self._log = open(self.log_path, "wb")
        options = ((["--netns", net.srv_ns, "--iface", net.srv_if] if net else [])
                   + (["--impair", impair] if impair else []) + list(options))
        self.proc = subprocess.Popen(mtcpshim_command("run", *options, "--", *argv), stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True, umask=umask)

    def stack_process(self) -> psutil.Process | None:
        """The stack process the launcher started (its child running stackd)."""
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return None
        for child in children:
            try:
                if "mtcpshim.stackd" in " ".join(child.cmdline()):
                    return child
            except psutil.NoSuchProcess:
                continue  # a child that came and went (the launcher failing early)
        return None

    def stack_pid(self, timeout: float = STACK_START_TIMEOUT) -> int:
        """The serving stack's pid, from `mtcpshim stat` once it answers."""
        snapshot = {}

        def answers():
            if self.proc.poll() is not None:
                raise HarnessError(f"the launcher exited: {self.output()}")
            try:
                snapshot.update(stat.fetch(self.net.srv_ns, self.net.srv_if))
            except stat.StatError:
                return False
            return True
        wait_until(answers, timeout, "the stack to answer `mtcpshim stat`")
        return snapshot["pid"]

    def stats(self) -> dict:
        return stack_snapshot(self.net.srv_ns, self.net.srv_if)

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise HarnessError(f"{self.proc.args[-1]} under the stack did not finish within {timeout:.0f} s") from None

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # The launcher's session: the stack and the program, whatever became of the launcher.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._log.close()
        return self.proc.returncode


def stack_snapshot(netns: str, iface: str) -> dict:
    """`mtcpshim stat` of the stack serving iface, plus its peak resident
    memory so far (VmHWM, KiB)."""
    snapshot = stat.fetch(netns, iface)
    status = pathlib.Path(f"/proc/{snapshot['pid']}/status").read_text()
    snapshot["peak_rss_kib"] = int(next(line.split()[1] for line in status.splitlines()
                                        if line.startswith("VmHWM:")))
    return snapshot


def lighttpd_config(workdir: pathlib.Path, docroot: pathlib.Path, extra_ports=(), listen_backlog: int = 1024,
                    extra: str = "") -> pathlib.Path:
    """Serving docroot at SERVER_PORT and `extra_ports`; `extra` adds lines."""
    conf = workdir / "lighttpd.conf"
    listeners = "".join(f'$SERVER["socket"] == "0.0.0.0:{port}" {{ }}\n' for port in extra_ports)
    conf.write_text(f"""
server.document-root = "{docroot}"
server.port = {SERVER_PORT}
server.bind = "0.0.0.0"
server.errorlog = "{workdir / 'lighttpd-error.log'}"
server.max-keep-alive-requests = 100000
server.max-keep-alive-idle = 30
server.listen-backlog = {listen_backlog}
index-file.names = ("index.html")
mimetype.assign = (".html" => "text/html", ".txt" => "text/plain", ".bin" => "application/octet-stream")
{listeners}{extra}
""")
    return conf


@contextlib.contextmanager
def shim_lighttpd(docroot: pathlib.Path, workdir: pathlib.Path, net: testnet.TestNet | None = None, options=(),
                  impair: str | None = None, extra_ports=(), listen_backlog: int = 1024, config: str = ""):
    """lighttpd under the stack, answering on the stack's address at
    SERVER_PORT and `extra_ports`; 1024 is lighttpd's own default backlog.
    `config` adds lines to its configuration."""
    if shutil.which("lighttpd") is None:
        raise HarnessError("lighttpd is not installed")
    (docroot / "ping.txt").write_bytes(b"pong\n")
    conf = lighttpd_config(workdir, docroot, extra_ports, listen_backlog, config)
    server = ShimProgram(["lighttpd", "-D", "-f", str(conf)], workdir / "lighttpd-launcher.log", net, options, impair)
    try:
        wait_until(lambda: server.proc.poll() is not None or curl_in_client(
            server.net, f"http://{server.net.srv_ip}:{SERVER_PORT}/ping.txt", timeout=2).returncode == 0,
            STACK_START_TIMEOUT, "lighttpd to answer over the stack")
        if server.proc.poll() is not None:
            raise HarnessError(f"lighttpd under the stack exited: {server.output().strip()[-300:]}")
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def kernel_http_server(net: testnet.TestNet, docroot: pathlib.Path, log_path):
    """python3 -m http.server on the client's kernel stack; yields its URL."""
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            ["ip", "netns", "exec", net.cli_ns, sys.executable, "-m", "http.server", str(KERNEL_HTTP_PORT),
             "--bind", net.cli_ip, "--directory", str(docroot)], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: curl_in_client(net, f"http://{net.cli_ip}:{KERNEL_HTTP_PORT}/",
                                              timeout=2).returncode == 0, 20, "python3 -m http.server")
            yield f"http://{net.cli_ip}:{KERNEL_HTTP_PORT}"
        finally:
            server.terminate()
            server.wait(10)
