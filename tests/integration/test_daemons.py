"""Programs that daemonize: the parent exits and `mtcpshim run` returns with
its status, as a shell sees it on the kernel, while the stack goes on
serving the daemon; it stops when the daemon ends, or at `mtcpshim stop`,
and cleans up after itself either way."""
import contextlib
import os
import shutil
import signal
import subprocess
import sys

import pytest

from mtcpshim import launcher
from support.net import NET, SERVER_PORT, in_client
from support.programs import mtcpshim_command, run_under_shim, stack_snapshot, wait_until

# Forks twice and leaves, as daemon(3) does; the daemon answers `requests`
# HTTP requests, then ends.
DAEMON = """
import os, socket, sys
port, requests = int(sys.argv[1]), int(sys.argv[2])
if os.fork():
    os._exit(0)
os.setsid()
if os.fork():
    os._exit(0)
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
listener = socket.create_server(("", port))
listener.settimeout(120)
for _ in range(requests):
    conn, _ = listener.accept()
    conn.recv(4096)
    conn.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: 6\\r\\n\\r\\ndaemon")
    conn.close()
"""


def lock_path():
    return launcher.runtime_path(NET.srv_ns, NET.srv_if, "lock")


def stack_serves() -> bool:
    return os.path.exists(lock_path())


def ended(pid: int) -> bool:
    """Gone, or a zombie its new parent (init) has yet to reap."""
    try:
        with open(f"/proc/{pid}/stat") as stat_line:
            return stat_line.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def daemon_pids() -> list[int]:
    return [int(pid) for pid in stack_snapshot(NET.srv_ns, NET.srv_if)["processes"]["sockets"]]


@contextlib.contextmanager
def detached_stack():
    """Whatever the test leaves is ended: `mtcpshim stop` ends every process
    of the program the stack still serves, and the stack; the pids the test
    named are killed too, should the stack not answer."""
    started = []
    try:
        yield started
    finally:
        if stack_serves():
            subprocess.run(mtcpshim_command("stop"), capture_output=True, timeout=120)
        for pid in started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def get(url: str) -> str:
    return in_client(["curl", "-s", "-m", "10", url], timeout=30).stdout.decode()


def test_a_daemon_keeps_the_stack_serving_after_the_launcher_returns(test_network):
    with detached_stack() as started:
        done = run_under_shim([sys.executable, "-c", DAEMON, str(SERVER_PORT), "3"], timeout=30)
        assert done.returncode == 0, done.stderr
        assert "still use the stack, which serves them until they end" in done.stderr
        wait_until(lambda: len(daemon_pids()) == 1, 10, "the daemon's parent to be seen ending")
        started += daemon_pids()
        assert [get(f"http://{NET.srv_ip}:{SERVER_PORT}/") for _ in range(3)] == ["daemon"] * 3
        wait_until(lambda: not stack_serves(), 30, "the stack to stop once the daemon ended")
        assert not os.path.exists(launcher.runtime_path(NET.srv_ns, NET.srv_if, "stats"))
        log = launcher.runtime_path(NET.srv_ns, NET.srv_if, "log")
        with open(log) as lines:
            assert "the program's last process ended: stopping" in lines.read()
        os.unlink(log)


def test_stop_ends_the_daemon_and_the_stack_that_serves_it(test_network):
    """As stopping a service: the daemon gets SIGTERM, and the stack stops
    once it has ended (left alive on a stopped stack, a server's accept
    loop would spin on ENETDOWN)."""
    with detached_stack() as started:
        done = run_under_shim([sys.executable, "-c", DAEMON, str(SERVER_PORT), "1000"], timeout=30)
        assert done.returncode == 0, done.stderr
        wait_until(lambda: len(daemon_pids()) == 1, 10, "the daemon's parent to be seen ending")
        started += daemon_pids()
        assert get(f"http://{NET.srv_ip}:{SERVER_PORT}/") == "daemon"
        stopped = subprocess.run(mtcpshim_command("stop"), capture_output=True, text=True, timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        assert not stack_serves()
        assert ended(started[0])
        again = subprocess.run(mtcpshim_command("stop"), capture_output=True, text=True, timeout=60)
        assert again.returncode != 0 and again.stderr.strip() == \
            f"mtcpshim: no stack is serving {NET.srv_if} in {NET.srv_ns}"


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_redis_daemonized_serves_redis_benchmark(test_network, tmp_path):
    """redis-server with `daemonize yes`: the daemon serves a benchmark from
    the kernel's client, error-free, and `shutdown` ends it and the stack."""
    pidfile = tmp_path / "redis.pid"
    with detached_stack() as started:
        done = run_under_shim(["redis-server", "--daemonize", "yes", "--port", str(SERVER_PORT),
                               "--bind", "0.0.0.0", "--protected-mode", "no", "--save", "", "--appendonly", "no",
                               "--dir", str(tmp_path), "--pidfile", str(pidfile),
                               "--logfile", str(tmp_path / "redis.log")], timeout=30)
        assert done.returncode == 0, done.stderr
        wait_until(pidfile.exists, 20, "redis to write its pid file")
        started.append(int(pidfile.read_text()))
        wait_until(lambda: daemon_pids() == started, 10, "the stack to serve only the daemon")
        bench = in_client(["redis-benchmark", "-h", NET.srv_ip, "-p", str(SERVER_PORT), "-n", "20000", "-c", "20",
                           "-t", "set,get,incr,lpush,lpop", "-q", "--csv"], timeout=120, text=True)
        assert bench.returncode == 0, bench.stderr
        results = [line.split(",")[0].strip('"') for line in bench.stdout.splitlines()[1:]]
        assert results == ["SET", "GET", "INCR", "LPUSH", "LPOP"], bench.stdout
        cli = in_client(["redis-cli", "-h", NET.srv_ip, "-p", str(SERVER_PORT), "info", "stats"], timeout=30, text=True)
        commands = int(next(line.split(":")[1] for line in cli.stdout.splitlines()
                            if line.startswith("total_commands_processed")))
        assert commands >= 5 * 20000
        in_client(["redis-cli", "-h", NET.srv_ip, "-p", str(SERVER_PORT), "shutdown", "nosave"], timeout=30)
        wait_until(lambda: not stack_serves(), 30, "the stack to stop once redis ended")
        os.unlink(launcher.runtime_path(NET.srv_ns, NET.srv_if, "log"))
