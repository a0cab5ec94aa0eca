"""`mtcpshim run`: start the stack process, then the program with the
interposer preloaded, and stay between them until the program ends.

The launcher owns the plumbing both sides inherit (see mtcpshim_abi.h):
the shared region (memfd), a datagram control socket pair, the stack's wake
eventfd, and a death pipe whose only writer is the stack, so a program
blocked in epoll_wait hears of a stack crash at once.
"""
import contextlib
import fcntl
import ipaddress
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass

from mtcpshim import abi_source
from mtcpshim.region import Region, RegionSize

LOCK_DIR = "/run/mtcpshim"
PRELOAD_LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "libmtcpshim_preload.so")
STACK_START_TIMEOUT = 20.0
STACK_STOP_TIMEOUT = 10.0


class LaunchError(Exception):
    """One line for the user; the program was not started."""


@dataclass
class StackOptions:
    netns: str | None
    iface: str
    ip: ipaddress.IPv4Interface
    gateway: ipaddress.IPv4Address | None = None
    io: str = "afpacket"
    pcap: str | None = None
    spin_us: float = 0.0
    impair: str | None = None   # an ImpairSpec (stack/io/impair.py), already validated


def run(options: StackOptions, argv: list[str]) -> int:
    """Runs argv over the stack; returns its exit status (128+N for signal N)."""
    if os.geteuid() != 0:
        raise LaunchError("run needs root (CAP_NET_RAW for the packet socket, CAP_SYS_ADMIN "
                          "for the network namespace): try sudo")
    if shutil.which(argv[0]) is None:
        raise LaunchError(f"program not found: {argv[0]}")
    if not os.path.exists(PRELOAD_LIBRARY):
        raise LaunchError(f"interposer not built: {PRELOAD_LIBRARY} is missing (pip install -e .)")

    with interface_claim(options.netns, options.iface):
        return _run_stack_and_program(options, argv)


def _run_stack_and_program(options: StackOptions, argv: list[str]) -> int:
    region = Region.create(RegionSize(), int(options.ip.ip), options.ip.network.prefixlen,
                           int(options.gateway) if options.gateway else 0)
    ctl_stack, ctl_app = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    wake_fd = os.eventfd(0, os.EFD_NONBLOCK)
    death_r, death_w = os.pipe()
    ready_r, ready_w = os.pipe()

    stack = subprocess.Popen(
        [sys.executable, "-m", "mtcpshim.stackd", "--shm-fd", str(region.fd),
         "--ctl-fd", str(ctl_stack.fileno()), "--wake-fd", str(wake_fd), "--ready-fd", str(ready_w),
         "--iface", options.iface, "--ip", str(options.ip), "--io", options.io,
         "--spin-us", str(options.spin_us),
         "--stats-socket", runtime_path(options.netns, options.iface, "stats")]
        + (["--netns", options.netns] if options.netns else [])
        + (["--gateway", str(options.gateway)] if options.gateway else [])
        + (["--pcap", options.pcap] if options.pcap else [])
        + (["--impair", options.impair] if options.impair else []),
        pass_fds=(region.fd, ctl_stack.fileno(), wake_fd, ready_w, death_w))
    ctl_stack.close()
    os.close(ready_w)
    os.close(death_w)
    try:
        _await_ready(stack, ready_r)
    except LaunchError:
        _stop(stack)
        raise
    finally:
        os.close(ready_r)

    fds = (region.fd, ctl_app.fileno(), wake_fd, death_r)
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(filter(None, [PRELOAD_LIBRARY, env.get("LD_PRELOAD")]))
    env[abi_source.string_constants()["MTS_ENV_FDS"]] = ",".join(map(str, fds))
    # The program lives on the stack's host: its kernel sockets (loopback,
    # UDP) are in the stack's namespace too.
    in_netns = ["ip", "netns", "exec", options.netns] if options.netns else []
    program = subprocess.Popen(in_netns + argv, env=env, pass_fds=fds)
    for fd in fds[1:]:
        os.close(fd)
    ctl_app.detach()

    forward = lambda signum, frame: program.send_signal(signum)  # noqa: E731
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = _supervise(program, stack, region)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop(stack)
    return status


def runtime_path(netns: str | None, iface: str, kind: str) -> str:
    """Where the stack serving `iface` keeps its lock ("lock") and its
    statistics socket ("stats")."""
    return os.path.join(LOCK_DIR, f"{netns or 'host'}-{iface}.{kind}")


@contextlib.contextmanager
def interface_claim(netns: str | None, iface: str):
    """One stack per interface: a second would answer the first one's
    segments with resets.  Held for the block; then the lock file and the
    statistics socket's path (left by a stack that was killed) go too."""
    os.makedirs(LOCK_DIR, exist_ok=True)
    path = runtime_path(netns, iface, "lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise LaunchError(f"another mtcpshim stack already serves {iface}"
                              f"{' in ' + netns if netns else ''} (launcher pid {holder})") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder removed the file meanwhile: lock the new one
    try:
        os.ftruncate(fd, 0)  # a killed launcher's file may remain
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(runtime_path(netns, iface, "stats"))
        os.unlink(path)  # while still locked: a waiter re-checks the inode
        os.close(fd)


def _await_ready(stack: subprocess.Popen, ready_r: int) -> None:
    readable, _, _ = select.select([ready_r], [], [], STACK_START_TIMEOUT)
    line = os.read(ready_r, 4096).decode(errors="replace").strip() if readable else ""
    if line == "ready":
        return
    if line.startswith("error: "):
        raise LaunchError(line[len("error: "):])
    if stack.poll() is not None:
        raise LaunchError(f"the stack process exited with status {stack.returncode} before it was ready")
    raise LaunchError(f"the stack process did not become ready within {STACK_START_TIMEOUT:.0f} s")


def _supervise(program: subprocess.Popen, stack: subprocess.Popen, region: Region) -> int:
    program_fd = os.pidfd_open(program.pid)
    stack_fd = os.pidfd_open(stack.pid)
    try:
        stack_alive = True
        while program.poll() is None:
            watched = [program_fd] + ([stack_fd] if stack_alive else [])
            try:
                readable, _, _ = select.select(watched, [], [])
            except InterruptedError:
                continue
            if stack_alive and stack_fd in readable:
                stack_alive = False
                _report_stack_death(stack, region)
        return program.returncode if program.returncode >= 0 else 128 - program.returncode
    finally:
        os.close(program_fd)
        os.close(stack_fd)


def _report_stack_death(stack: subprocess.Popen, region: Region) -> None:
    code = stack.wait()
    fault = region.fault()
    if not fault:
        how = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
        fault = f"the stack process {how}"
        region.set_fault(fault)
    print(f"mtcpshim: the stack died, the program's stack sockets now fail: {fault}", file=sys.stderr)


def _stop(stack: subprocess.Popen) -> None:
    if stack.poll() is not None:
        return
    stack.terminate()
    try:
        stack.wait(STACK_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        stack.kill()
        stack.wait()
