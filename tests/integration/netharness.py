"""Helpers for the integration tests: the test network's names, programs in
the client namespace, programs under `mtcpshim run` stopped by pid."""
import contextlib
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import pytest

from mtcpshim import testnet

# tests/faults' harness (parametrised by network) serves these tests too.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "faults"))
from faultnet import sha256_of, wait_until  # noqa: E402,F401 (re-exported)

NET = testnet.TESTNET
SERVER_PORT = 8080
SERVER_URL = f"http://{NET.srv_ip}:{SERVER_PORT}"
LARGE_FILE_SIZE = 10 * 1024 * 1024
HTTP_PORT = 8000  # the kernel-side python3 -m http.server in the client namespace


def mtcpshim_command(*args) -> list[str]:
    return [sys.executable, "-m", "mtcpshim.cli", *args]


def in_client(argv, timeout=120, **kwargs) -> subprocess.CompletedProcess:
    """Runs argv in the client namespace on the kernel stack."""
    return subprocess.run(["ip", "netns", "exec", NET.cli_ns, *argv], capture_output=True,
                          timeout=timeout, **kwargs)


class Launched:
    """A program started under `mtcpshim run`, stopped by pid."""

    def __init__(self, argv, log_path, extra_args=()):
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(mtcpshim_command("run", *extra_args, "--", *argv),
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        self.log.flush()
        return pathlib.Path(self.log_path).read_text(errors="replace")

    def stop(self, timeout=20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: only what it started
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def lighttpd_config(directory: pathlib.Path, docroot: pathlib.Path, extra: str = "") -> pathlib.Path:
    conf = directory / "lighttpd.conf"
    conf.write_text(f"""
server.document-root = "{docroot}"
server.port = {SERVER_PORT}
server.bind = "0.0.0.0"
server.errorlog = "{directory / 'error.log'}"
server.max-keep-alive-requests = 10000
server.max-keep-alive-idle = 30
index-file.names = ("index.html")
mimetype.assign = (".html" => "text/html", ".txt" => "text/plain", ".bin" => "application/octet-stream")
{extra}
""")
    return conf


@contextlib.contextmanager
def shim_lighttpd_running(docroot, workdir, run_args=(), config=""):
    """lighttpd under `mtcpshim run RUN_ARGS`, answering on the stack's address;
    `config` adds lines to its configuration."""
    if shutil.which("lighttpd") is None:
        pytest.skip("lighttpd is not installed")
    conf = lighttpd_config(workdir, docroot, config)
    server = Launched(["lighttpd", "-D", "-f", str(conf)], workdir / "launcher.log", run_args)
    try:
        wait_until(lambda: server.proc.poll() is not None or in_client(
            ["curl", "-sf", "-m", "2", "-o", "/dev/null", f"{SERVER_URL}/small.txt"], timeout=10).returncode == 0,
            30, "lighttpd to answer over the stack")
        assert server.proc.poll() is None, server.output()
        yield server
    finally:
        server.stop()


def download_under_shim(argv, timeout=180):
    result = subprocess.run(mtcpshim_command("run", "--", *argv), capture_output=True, timeout=timeout)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    return result
