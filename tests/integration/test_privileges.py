"""Least privilege and lifetimes (issue 8): the serving stack holds no root
and no capabilities, `run --user` runs the program as that user, one stack
per interface whatever the namespace is called, interfaces the stack cannot
serve are refused, a killed launcher takes its stack with it, and a stack's
death is reported even when the program exits 0 first.

Each module run gets its own test network under random names (the
private_net fixture), so these tests never meet mtcp-cli/mtcp-srv or another run.
"""
import os
import pathlib
import signal
import subprocess
import sys
import time

import psutil
import pytest

from mtcpshim import launcher, stat
from support.net import in_client, private_network
from support.programs import ShimProgram, kernel_http_server, run_under_shim, wait_until

pytestmark = pytest.mark.integration

NOBODY = 65534


def proc_status(pid: int) -> dict[str, str]:
    text = pathlib.Path(f"/proc/{pid}/status").read_text()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in text.splitlines())}


def has_exited(process: psutil.Process) -> bool:
    """Gone, or a zombie that init has not reaped yet."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_serving_stack_holds_no_root_and_no_capabilities(private_net, tmp_path):
    program = ShimProgram(["sleep", "30"], tmp_path / "launcher.log", private_net, umask=0)
    try:
        status = proc_status(program.stack_pid())
        assert all(int(uid) != 0 for uid in status["Uid"].split()), status["Uid"]
        assert all(int(gid) != 0 for gid in status["Gid"].split()), status["Gid"]
        for capabilities in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[capabilities], 16) == 0, f"{capabilities} {status[capabilities]}"
        assert status["NoNewPrivs"] == "1"
        # Created under umask 0, yet only root may ask it.
        stats_path = launcher.runtime_path(private_net.srv_ns, private_net.srv_if, "stats")
        assert os.stat(stats_path).st_mode & 0o777 == 0o600
        # Still serving the network after the drop.
        ping = in_client(["ping", "-c", "1", "-W", "5", private_net.srv_ip], private_net, timeout=20, text=True)
        assert ping.returncode == 0, ping.stdout + ping.stderr
    finally:
        program.stop()
    assert not os.path.exists(stats_path)


def test_program_runs_as_the_given_user_over_the_stack(private_net, tmp_path):
    docroot = tmp_path / "docroot"
    docroot.mkdir()
    (docroot / "hello.txt").write_text("hello from the kernel side\n")
    with kernel_http_server(private_net, docroot, tmp_path / "http.log") as url:
        # The kernel of the stack's namespace has no address: the download
        # works only through the stack, that is, with the interposer loaded.
        done = run_under_shim(["sh", "-c", f"id -u; id -g; curl -sS -m 10 {url}/hello.txt"],
                              options=("--netns", private_net.srv_ns, "--iface", private_net.srv_if, "--user", "nobody"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [str(NOBODY), str(NOBODY), "hello from the kernel side"]


def test_a_second_name_of_the_namespace_gets_no_second_stack(private_net, tmp_path):
    alias = f"{private_net.srv_ns}-alias"
    alias_path = f"/run/netns/{alias}"
    program = ShimProgram(["sleep", "30"], tmp_path / "launcher.log", private_net)
    pathlib.Path(alias_path).touch()
    try:
        subprocess.run(["mount", "--bind", f"/run/netns/{private_net.srv_ns}", alias_path], check=True)
        stack_pid = program.stack_pid()
        second = run_under_shim(["true"], options=("--netns", alias, "--iface", private_net.srv_if))
        assert second.returncode == 2, second.stdout + second.stderr
        assert second.stderr.count("\n") == 1 and "already serves" in second.stderr, second.stderr
        # `mtcpshim stat` finds the stack under either name.
        assert stat.fetch(alias, private_net.srv_if)["pid"] == stack_pid
    finally:
        subprocess.run(["umount", alias_path], capture_output=True)
        os.unlink(alias_path)
        program.stop()


def test_interfaces_the_stack_cannot_serve_are_refused_in_one_line(private_net):
    tun = "mtptun0"
    subprocess.run(["ip", "-n", private_net.srv_ns, "tuntap", "add", "dev", tun, "mode", "tun"], check=True)
    try:
        for iface, reason in (("lo", "loopback"), (tun, "not an Ethernet interface"),
                              ("mtpnone0", "no such interface")):
            done = run_under_shim(["true"], options=("--netns", private_net.srv_ns, "--iface", iface))
            assert done.returncode == 2, (iface, done.stderr)
            assert done.stderr.count("\n") == 1 and reason in done.stderr, done.stderr
    finally:
        subprocess.run(["ip", "-n", private_net.srv_ns, "link", "del", tun], capture_output=True)


def test_an_address_the_kernel_also_holds_is_refused_in_one_line(private_net):
    """With the kernel holding the stack's address, it would answer ARP for
    it and reset every connection: say so before the program starts."""
    where = ["ip", "-n", private_net.srv_ns]
    address = f"{private_net.srv_ip}/{private_net.prefix}"
    subprocess.run(where + ["addr", "add", address, "dev", private_net.srv_if], check=True)
    try:
        done = run_under_shim(["true"], options=("--netns", private_net.srv_ns, "--iface", private_net.srv_if,
                                                 "--ip", address))
        assert done.returncode == 2, done.stderr
        assert done.stderr.splitlines() == [
            f"mtcpshim: {private_net.srv_ip} is also the kernel's address on {private_net.srv_if} in "
            f"{private_net.srv_ns}: the kernel would reset the stack's connections; remove it "
            f"(ip -n {private_net.srv_ns} addr del {address} dev {private_net.srv_if})"]
    finally:
        subprocess.run(where + ["addr", "del", address, "dev", private_net.srv_if], capture_output=True)
    done = run_under_shim(["true"], options=("--netns", private_net.srv_ns, "--iface", private_net.srv_if,
                                             "--ip", address))
    assert done.returncode == 0, done.stderr


def test_a_killed_launcher_takes_its_stack_with_it(private_net, tmp_path):
    program = ShimProgram(["sleep", "30"], tmp_path / "launcher.log", private_net)
    try:
        stack = psutil.Process(program.stack_pid())
        os.kill(program.proc.pid, signal.SIGKILL)
        program.proc.wait()
        deadline = time.monotonic() + 10
        while not has_exited(stack) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert has_exited(stack), (f"stack {stack.pid} still {stack.status()} 10 s after its launcher "
                                   f"was killed, CPU {stack.cpu_times()}; its log:\n{program.output()}")
    finally:
        program.stop()
    # Nothing it left behind keeps the next stack from serving.
    done = run_under_shim(["true"], options=("--netns", private_net.srv_ns, "--iface", private_net.srv_if))
    assert done.returncode == 0, done.stderr


# Blocks in accept on a stack socket and exits 0 as soon as the stack's death
# fails it: the program ends before the launcher can notice by itself.
EXIT_ZERO_ON_STACK_DEATH = """
import socket, sys
s = socket.socket()
s.bind(("0.0.0.0", 9000))
s.listen()
print("listening", flush=True)
try:
    s.accept()
except OSError:
    sys.exit(0)
"""


def test_stack_death_makes_the_launcher_fail_even_if_the_program_exits_0(private_net, tmp_path):
    program = ShimProgram([sys.executable, "-c", EXIT_ZERO_ON_STACK_DEATH], tmp_path / "launcher.log", private_net)
    try:
        wait_until(lambda: "listening" in program.output() or program.proc.poll() is not None, 30,
                   "the program to listen")
        os.kill(program.stack_pid(), signal.SIGKILL)
        status = program.proc.wait(30)
        output = program.output()
        assert status == 1, output
        assert "the stack died" in output and "signal 9" in output, output
    finally:
        program.stop()


def test_a_removed_interface_stops_the_stack_with_its_reason(tmp_path):
    """The packet socket reports the loss forever once the interface is gone:
    the stack must stop and say why, not spin on it."""
    with private_network() as own:
        program = ShimProgram(["sleep", "30"], tmp_path / "launcher.log", own)
        try:
            stack = psutil.Process(program.stack_pid())
            subprocess.run(["ip", "-n", own.srv_ns, "link", "del", own.srv_if], check=True)
            wait_until(lambda: has_exited(stack), 10, "the stack to stop after its interface went")
            wait_until(lambda: "was removed" in program.output(), 10, "the launcher to say why")
            assert f"the stack stopped: interface {own.srv_if} was removed" in program.output()
        finally:
            program.stop()
