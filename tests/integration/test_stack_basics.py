"""ICMP echo, packet capture, and the errors a user sees when something is
wrong: one line and exit status 2 before the program starts, or a failing
socket call (not a hang) when the stack dies under a running program."""
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from mtcpshim.stack import cc
from support.net import KERNEL_HTTP_PORT, NET, SERVER_URL, in_client
from support.programs import ShimProgram, mtcpshim_command, run_under_shim, shim_lighttpd, wait_until
from support.transfers import sha256_of


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump is not installed")
def test_pcap_shows_the_handshake(kernel_url, tmp_path):
    capture = tmp_path / "run.pcap"
    result = subprocess.run(mtcpshim_command("run", "--pcap", str(capture), "--", "curl", "-sS", "-o", "/dev/null",
                                             f"{kernel_url}/small.txt"), capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    dump = subprocess.run(["tcpdump", "-nn", "-r", str(capture), "tcp"], capture_output=True, timeout=30)
    assert dump.returncode == 0, dump.stderr.decode()
    lines = dump.stdout.decode().splitlines()
    assert any("Flags [S]," in line and f"> {NET.cli_ip}.{KERNEL_HTTP_PORT}" in line for line in lines), lines
    assert any("Flags [S.]," in line for line in lines), lines


def test_tap_backend_serves_the_large_file(test_network, docroot, tmp_path):
    out = tmp_path / "large.bin"
    with shim_lighttpd(docroot, tmp_path, options=["--io", "tap", "--cores", "1"]):
        result = in_client(["curl", "-sS", "--fail", "-o", str(out), f"{SERVER_URL}/large.bin"])
    assert result.returncode == 0, result.stderr.decode()
    assert sha256_of(out) == sha256_of(docroot / "large.bin")


def test_forked_lighttpd_workers_share_the_listening_socket(test_network, tmp_path, docroot):
    with shim_lighttpd(docroot, tmp_path, config="server.max-worker = 2") as server:
        workers = psutil.Process(server.proc.pid).children(recursive=True)
        assert sum(p.name() == "lighttpd" for p in workers) == 3  # the master and two workers
        result = in_client(["ab", "-q", "-n", "1000", "-c", "8", f"{SERVER_URL}/small.txt"], timeout=120)
    report = result.stdout.decode()
    assert "Complete requests:      1000" in report and "Failed requests:        0" in report, report


def run_refused(args, tmp_path, **kwargs):
    """`mtcpshim run ARGS -- touch MARKER`: must fail before the program runs."""
    marker = tmp_path / "program-ran"
    result = subprocess.run(mtcpshim_command("run", *args, "--", "touch", str(marker)), capture_output=True,
                            timeout=60, **kwargs)
    assert not marker.exists(), "the program started despite the error"
    return result


def assert_one_line_error(result, *words):
    stderr = result.stderr.decode().strip()
    assert result.returncode == 2, stderr
    assert len(stderr.splitlines()) == 1, stderr
    for word in words:
        assert word in stderr, stderr


def test_missing_interface_is_one_line_and_status_2(test_network, tmp_path):
    assert_one_line_error(run_refused(["--iface", "nosuch0"], tmp_path), "nosuch0")


@pytest.mark.parametrize("address", ["300.1.2.3/24", "198.18.0.2", "banana"])
def test_bad_address_is_one_line_and_status_2(address, tmp_path):
    assert_one_line_error(run_refused(["--ip", address], tmp_path), address)


@pytest.mark.parametrize("flag", [["--bogus"], ["--io", "carrier-pigeon"], ["--gateway", "x"],
                                  ["--stack-python", "jython"]])
def test_bad_flag_is_one_line_and_status_2(flag, tmp_path):
    assert_one_line_error(run_refused(flag, tmp_path), flag[-1])


def test_missing_privilege_is_one_line_and_status_2(test_network, tmp_path):
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed")
    tmp_path.chmod(0o777)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--",
                             *mtcpshim_command("run", "--", "touch", str(tmp_path / "program-ran"))],
                            capture_output=True, timeout=60, env=env)
    assert not (tmp_path / "program-ran").exists()
    assert_one_line_error(result, "root")


SOCKET_EXHAUSTION = """
import errno, resource, socket
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))

def connecting_socket():
    s = socket.socket()
    s.setblocking(False)
    try:
        s.connect(("198.18.0.1", 9))
    except BlockingIOError:
        pass
    return s

opened, failure = [], None
for _ in range(2000):
    try:
        opened.append(connecting_socket())
    except OSError as err:
        failure = err.errno
        break
print("opened", len(opened), "failure", errno.errorcode.get(failure), flush=True)
for s in opened:
    s.close()
connecting_socket()
print("a socket again after closing", flush=True)
"""


def test_running_out_of_stack_sockets_is_enobufs_and_closing_frees_them(test_network):
    result = subprocess.run(mtcpshim_command("run", "--sockets", "1024", "--", sys.executable, "-c",
                                             SOCKET_EXHAUSTION), capture_output=True, timeout=120)
    output = result.stdout.decode()
    assert result.returncode == 0, output + result.stderr.decode()
    assert "opened 1024 failure ENOBUFS" in output  # the region's 1024 socket slots
    assert "a socket again after closing" in output


BLOCKED_ACCEPT = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 9000))
s.listen()
print("listening", flush=True)
try:
    s.accept()
except OSError as err:
    print("accept failed:", err.errno, flush=True)
    sys.exit(3)
"""


def test_stack_death_fails_blocked_call_and_is_reported(test_network, tmp_path):
    program = ShimProgram([sys.executable, "-c", BLOCKED_ACCEPT], tmp_path / "launcher.log")
    try:
        wait_until(lambda: "listening" in program.output() or program.proc.poll() is not None, 30,
                   "the program to listen")
        assert "listening" in program.output(), program.output()
        stack = program.stack_process()
        assert stack is not None
        stack.send_signal(signal.SIGKILL)
        program.proc.wait(30)  # a hang fails here
        output = program.output()
        assert program.proc.returncode == 3, output
        assert "accept failed:" in output
        assert "the stack died" in output and "signal 9" in output, output
    finally:
        program.stop()


_CONGESTION_OF_A_STACK_SOCKET = (
    "import socket, sys; s = socket.socket(); "
    "sys.argv[1:] and s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, sys.argv[1].encode()); "
    "s.bind(({ip!r}, 0)); "
    "print(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b'\\0').decode())")


def test_congestion_control_defaults_to_the_kernels_and_run_can_choose(test_network):
    """A stack socket starts with the algorithm the kernel's sockets get in
    the stack's namespace; `--congestion` picks another; an unknown name is
    one line and status 2 before the program starts."""
    probe = [sys.executable, "-c", _CONGESTION_OF_A_STACK_SOCKET.format(ip=NET.srv_ip)]
    kernel_default = subprocess.run(["ip", "netns", "exec", NET.srv_ns, "sysctl", "-n",
                                     "net.ipv4.tcp_congestion_control"], capture_output=True, text=True).stdout.strip()
    done = run_under_shim(probe)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (kernel_default if kernel_default in cc.ALGORITHMS else cc.DEFAULT)
    done = run_under_shim(probe, options=("--congestion", "reno"))
    assert done.returncode == 0 and done.stdout.strip() == "reno", done.stderr
    # Chosen while the socket was still the kernel's (before bind, as
    # iperf3 -C does before connect): the stack socket keeps the choice.
    done = run_under_shim(probe + ["reno"], options=("--congestion", "cubic"))
    assert done.returncode == 0 and done.stdout.strip() == "reno", done.stderr
    done = subprocess.run(mtcpshim_command("run", "--", *probe), capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, MTCPSHIM_CONGESTION="vegas"))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == ["mtcpshim: unknown congestion control 'vegas' (offered: bbr, cubic, reno)"]


_BUFFERS_OF_A_STACK_SOCKET = (
    "import socket; s = socket.socket(); s.bind(({ip!r}, 0)); "
    "print(s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF), s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))")


def test_socket_buffers_are_a_megabyte_each_way_and_run_can_choose(test_network):
    """What one connection may have in flight each way: 1 MiB unless
    `--buffer-size` (or $MTCPSHIM_BUFFER_SIZE) says otherwise; a size the
    rings cannot take is one line and status 2 before the program starts."""
    probe = [sys.executable, "-c", _BUFFERS_OF_A_STACK_SOCKET.format(ip=NET.srv_ip)]
    done = run_under_shim(probe)
    assert done.returncode == 0 and done.stdout.split() == [str(1 << 20)] * 2, done.stderr
    done = run_under_shim(probe, options=("--buffer-size", "4M"))
    assert done.returncode == 0 and done.stdout.split() == [str(4 << 20)] * 2, done.stderr
    done = subprocess.run(mtcpshim_command("run", "--", *probe), capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, MTCPSHIM_BUFFER_SIZE="3M"))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "mtcpshim run: argument --buffer-size: buffer size 3M: want a power of two from 64K to 64M "
        "(the rings wrap with a mask)"]
