"""`mtcpshim run`: start the stack process, then the program with the
interposer preloaded, and stay between them until the program ends.

The launcher owns the plumbing both sides inherit (see mtcpshim_abi.h):
the shared region (memfd), a datagram control socket pair, the stack's wake
eventfd, and a death pipe whose only writer is the stack, so a program
blocked in epoll_wait hears of a stack crash at once.  A socket pair links
the launcher and the stack alone: the stack stops when it reads its
end-of-file, so a killed launcher leaves no stack behind.

When the program exits, the launcher asks the stack over that link whether
processes the program left (a daemon it forked) still use it.  If none do,
the stack stops.  If some do, the launcher returns the program's status, as
a daemon's parent returns to its shell, and a copy of it (the keeper) stays
behind in a session of its own: it holds the interface and the link while
the stack serves those processes, and cleans up when the stack ends.

The stack opens its packet I/O as root and then serves as an unprivileged
user (--stack-user); what needs root after that (removing its statistics
socket, the TAP bridge) is done here.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import pwd
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field

from mtcpshim import abi_source
from mtcpshim._shm import lib
from mtcpshim.netns import in_netns, netns_inode
from mtcpshim.region import DEFAULT_BUFFER_SIZE, Region, RegionSize, default_sockets
from mtcpshim.stack.io.pcap import start_capture
from mtcpshim.stackd import tap_names

LOCK_DIR = "/run/mtcpshim"
PRELOAD_LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "libmtcpshim_preload.so")
STACK_START_TIMEOUT = 20.0
STACK_STOP_TIMEOUT = 10.0
ARPHRD_ETHER = 1                 # linux/if_arp.h
ARPHRD_LOOPBACK = 772
_SIOCGIFHWADDR = 0x8927


class LaunchError(Exception):
    """One line for the user; the program was not started."""


# Microseconds the idle stack keeps polling before it sleeps.  On a core it
# shares with the program, a request/response over one connection went from
# 11-13k to 18-20k exchanges a second (p50 71-87 -> 42-48 us) at 30-50 us,
# with no more CPU per request; 10 us was too short to catch the next
# request and only burned CPU; saturated loads do not sleep, so it does not
# touch them (README, "Since the previous table").
DEFAULT_SPIN_US = 50.0


@dataclass
class StackOptions:
    netns: str | None
    iface: str
    ip: ipaddress.IPv4Interface
    gateway: ipaddress.IPv4Address | None = None
    io: str = "afpacket"
    pcap: str | None = None
    profile: str | None = None  # cProfile output of the stack's loop
    spin_us: float = DEFAULT_SPIN_US
    impair: str | None = None   # an ImpairSpec (stack/io/impair.py), already validated
    stack_user: str = "nobody"  # whom the stack serves as once its packet I/O is open
    stack_python: str = "auto"  # the stack's interpreter: STACK_PYTHONS
    congestion: str | None = None  # default congestion control; None: the kernel's in the namespace
    buffer_size: int = DEFAULT_BUFFER_SIZE  # bytes of each socket's receive and of its send ring
    sockets: int = field(default_factory=default_sockets)  # slots in the region
    cores: int | None = None    # stack workers, one per core; None: every core the program may run on


# The interpreters the stack process runs under.  PyPy's JIT runs the TCP
# core several times faster (issue 11); it needs the two cffi modules built
# for it, which setup.py does when pypy3 and its cffi are installed.  The
# default takes PyPy where it is ready and CPython elsewhere.
STACK_PYTHONS = ("cpython", "pypy", "auto")
DEFAULT_STACK_PYTHON = "auto"
PYPY_GC_NURSERY = "32MB"
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def pypy_ready() -> str | None:
    """The pypy3 to run the stack with, or None if it or the modules built
    for it are missing."""
    pypy = shutil.which("pypy3")
    stack_dir = os.path.join(PACKAGE_DIR, "stack")
    built = all(any(name.startswith(module + ".pypy") and name.endswith(".so") for name in os.listdir(where))
                for module, where in (("_shm", PACKAGE_DIR), ("_netfast", stack_dir)))
    return pypy if pypy and built else None


def resolve_stack_python(choice: str) -> str:
    """"cpython" or "pypy": the interpreter `choice` means on this machine."""
    if choice not in STACK_PYTHONS:
        raise LaunchError(f"unknown stack interpreter {choice!r} (known: {', '.join(STACK_PYTHONS)})")
    if choice == "cpython" or choice == "auto" and not pypy_ready():
        return "cpython"
    if pypy_ready():
        return "pypy"
    if not shutil.which("pypy3"):
        raise LaunchError("--stack-python pypy: pypy3 is not installed (apt-get install pypy3 pypy3-dev)")
    raise LaunchError(f"--stack-python pypy: the stack's modules are not built for PyPy in {PACKAGE_DIR} "
                      "(install pypy3-dev, then pip install . again)")


def stack_command(choice: str) -> list[str]:
    """The interpreter command line the stack process starts with."""
    return [pypy_ready()] if resolve_stack_python(choice) == "pypy" else [sys.executable]


def run(options: StackOptions, argv: list[str], user: str | None = None) -> int:
    """Runs argv over the stack, as `user` if given; returns its exit status
    (128+N for signal N), or 1 if it exited 0 but the stack died."""
    if os.geteuid() != 0:
        raise LaunchError("run needs root (CAP_NET_RAW for the packet socket, CAP_SYS_ADMIN "
                          "for the network namespace): try sudo")
    interpreter = stack_command(options.stack_python)
    if shutil.which(argv[0]) is None:
        raise LaunchError(f"program not found: {argv[0]}")
    if not os.path.exists(PRELOAD_LIBRARY):
        raise LaunchError(f"interposer not built: {PRELOAD_LIBRARY} is missing (pip install -e .)")
    if _user_entry(options.stack_user).pw_uid == 0:
        raise LaunchError(f"--stack-user {options.stack_user} is root: the stack must serve without root")
    program_user = _user_entry(user) if user else None
    if user and shutil.which("setpriv") is None:
        raise LaunchError("--user needs setpriv (util-linux)")
    ifindex = _check_serveable(options.netns, options.iface)
    if options.io == "tap" and len(worker_cpus(options.cores)) > 1:
        raise LaunchError("--io tap serves from one core: add --cores 1 (a multi-queue TAP that steers as "
                          "the packet sockets do is not built yet)")
    _check_address_free(options.netns, options.ip)

    with interface_claim(options.netns, options.iface) as claim:
        try:
            return _run_stack_and_program(options, interpreter, argv, program_user, claim)
        finally:
            if options.io == "tap":
                # The stack bridged its TAP to the interface as root; once it
                # has dropped root it cannot undo that.
                _, bridge_name = tap_names(ifindex)
                subprocess.run(["ip"] + (["-n", options.netns] if options.netns else [])
                               + ["link", "del", bridge_name], capture_output=True)


def _user_entry(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise LaunchError(f"no such user: {name}") from None


def _check_serveable(netns: str | None, iface: str) -> int:
    """The stack speaks Ethernet: anything else is refused before it starts.
    Returns the interface's index."""
    index, hardware_type = _interface(netns, iface)
    if hardware_type == ARPHRD_LOOPBACK:
        raise LaunchError(f"cannot serve {iface}: it is a loopback interface, and the stack needs an Ethernet one")
    if hardware_type != ARPHRD_ETHER:
        raise LaunchError(f"cannot serve {iface}: it is not an Ethernet interface (hardware type {hardware_type})")
    return index


def _check_address_free(netns: str | None, ip: ipaddress.IPv4Interface) -> None:
    """The stack's address must not also be the kernel's in that namespace:
    the kernel would answer ARP for it and reset every connection to it
    (the program's connections refused, with nothing said why)."""
    ns = ["-n", netns] if netns else []
    shown = subprocess.run(["ip", *ns, "-j", "-4", "addr", "show"], capture_output=True, text=True)
    if shown.returncode != 0:
        return                             # the checks before found the namespace; nothing to add
    for link in json.loads(shown.stdout or "[]"):
        for address in link.get("addr_info", []):
            if address.get("local") == str(ip.ip):
                where = f" in {netns}" if netns else ""
                raise LaunchError(
                    f"{ip.ip} is also the kernel's address on {link['ifname']}{where}: the kernel would "
                    f"reset the stack's connections; remove it (ip {' '.join(ns + [''])}addr del "
                    f"{ip.ip}/{address['prefixlen']} dev {link['ifname']})")


def _interface(netns: str | None, iface: str) -> tuple[int, int]:
    """The index and the hardware type (ARPHRD_*) of `iface`, asked inside
    its namespace."""
    where = f" in {netns}" if netns else ""
    try:
        with in_netns(netns):
            index = socket.if_nametoindex(iface)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                ifreq = fcntl.ioctl(probe.fileno(), _SIOCGIFHWADDR, struct.pack("16s16x", iface.encode()))
    except FileNotFoundError:
        raise LaunchError(f"no such network namespace: {netns}") from None
    except (OSError, ValueError):
        raise LaunchError(f"no such interface: {iface}{where}") from None
    (hardware_type,) = struct.unpack_from("H", ifreq, 16)  # ifr_hwaddr.sa_family
    return index, hardware_type


@dataclass
class _Worker:
    """One stack worker process and what the launcher holds of it."""
    process: subprocess.Popen
    pidfd: int          # opened while it is our child: its pid cannot be another's yet
    link: socket.socket  # ours; close-on-exec, never the program's
    ctl_app: socket.socket  # the program's end of the worker's control socket pair
    wake_fd: int


def _run_stack_and_program(options: StackOptions, interpreter: list[str], argv: list[str],
                           program_user: pwd.struct_passwd | None, claim: InterfaceClaim) -> int:
    cpus = worker_cpus(options.cores)
    # Each worker owns an equal range of the slots.
    nslots = -(-options.sockets // len(cpus)) * len(cpus)
    size = RegionSize(nslots=nslots, nworkers=len(cpus), rx_size=options.buffer_size, tx_size=options.buffer_size)
    try:
        region = Region.create(size, int(options.ip.ip), options.ip.network.prefixlen,
                               int(options.gateway) if options.gateway else 0)
    except OSError as err:  # address space (or RLIMIT_AS) short of sockets x rings
        raise LaunchError(f"cannot map {size.bytes() >> 30} GiB of address space for {options.sockets} "
                          f"sockets' rings ({err.strerror}): lower --sockets or --buffer-size") from None
    if options.pcap:
        start_capture(options.pcap)                 # every worker appends to it
    death_r, death_w = os.pipe()
    wake_fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in cpus]
    workers = []
    survivors = None
    death_reported = False
    try:
        try:
            readies = []
            for index, cpu in enumerate(cpus):
                worker, ready_r = _start_worker(options, interpreter, claim, region, index, cpu, wake_fds, death_w)
                workers.append(worker)
                readies.append(ready_r)
        finally:
            # What the workers hold alone (and, had one failed to start, nobody).
            os.close(death_w)
            for fd in wake_fds[len(workers):]:
                os.close(fd)
        for worker, ready_r in zip(workers, readies):
            try:
                _await_ready(worker.process, ready_r)
            finally:
                os.close(ready_r)

        fds = [(worker.ctl_app.fileno(), worker.wake_fd) for worker in workers]
        program = _start_program(options.netns, argv, program_user, region.fd, death_r, fds)
        os.close(death_r)
        for worker in workers:
            worker.ctl_app.close()
            os.close(worker.wake_fd)
            with contextlib.suppress(OSError):  # the stack died already: _supervise says so
                worker.link.sendall(f"program {program.pid}\n".encode())

        forward = lambda signum, frame: program.send_signal(signum)  # noqa: E731
        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            status, death_reported = _supervise(program, workers, region)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if not death_reported:
            survivors = _ask_to_detach(workers, claim.log)
        if survivors:
            _become_keeper(status, survivors, claim)  # the launcher returns here; its keeper goes on
            _keep(workers, region)
            return status
    finally:
        for worker in workers:
            if not survivors:
                _stop(worker.process, stopping=survivors == [])
            worker.link.close()
            os.close(worker.pidfd)
    # A stack that ended before we stopped it, or failed while stopping,
    # died: the program's status alone would hide that.
    failed = [worker for worker in workers if worker.process.returncode != 0]
    if death_reported or failed:
        if not death_reported:
            _report_stack_death(failed[0].process, region)
        return status or 1
    return status


def worker_cpus(cores: int | None) -> list[int]:
    """The cores the stack's workers are pinned to, one each: the first
    `cores` of those the launcher (and so the program) may run on, all of
    them by default."""
    allowed = sorted(os.sched_getaffinity(0))
    if cores is None:
        return allowed[:lib.MTS_MAX_WORKERS]
    if not 1 <= cores <= min(len(allowed), lib.MTS_MAX_WORKERS):
        raise LaunchError(f"--cores {cores}: want 1 to {min(len(allowed), lib.MTS_MAX_WORKERS)}, the cores this "
                          f"program may run on ({_cpu_list(allowed)})")
    return allowed[:cores]


def _cpu_list(cpus: list[int]) -> str:
    return ",".join(map(str, cpus))


def worker_path(path: str, index: int) -> str:
    """Worker `index`'s own file where the user named one (--profile, the
    statistics socket): the path itself for worker 0, PATH.INDEX for the
    others."""
    return path if index == 0 else f"{path}.{index}"


def _start_worker(options: StackOptions, interpreter: list[str], claim: InterfaceClaim, region: Region,
                  index: int, cpu: int, wake_fds: list[int], death_w: int) -> tuple[_Worker, int]:
    """Starts stack worker `index` pinned to `cpu`; returns it and the read
    end of its ready pipe."""
    ctl_stack, ctl_app = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ready_r, ready_w = os.pipe()
    link, stack_link = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    secret_r, secret_w = os.pipe()
    os.write(secret_w, claim.secret())
    os.close(secret_w)
    # The package's parent first on the path: another interpreter than this
    # one imports the same mtcpshim.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(PACKAGE_DIR)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    # PyPy's young generation sized for a packet loop: with its default (half
    # the L2 cache) the stack spent 2.2x the CPU per keep-alive request.
    env.setdefault("PYPY_GC_NURSERY", PYPY_GC_NURSERY)
    process = subprocess.Popen(
        interpreter + ["-m", "mtcpshim.stackd", "--shm-fd", str(region.fd),
         "--ctl-fd", str(ctl_stack.fileno()), "--wake-fds", ",".join(map(str, wake_fds)),
         "--worker", str(index), "--cpu", str(cpu), "--ready-fd", str(ready_w),
         "--launcher-fd", str(stack_link.fileno()), "--stack-user", options.stack_user,
         "--iface", options.iface, "--ip", str(options.ip), "--io", options.io,
         "--spin-us", str(options.spin_us), "--stats-socket", worker_path(claim.stats, index),
         "--secret-fd", str(secret_r)]
        + (["--netns", options.netns] if options.netns else [])
        + (["--gateway", str(options.gateway)] if options.gateway else [])
        + (["--pcap", options.pcap] if options.pcap else [])
        + (["--profile", worker_path(options.profile, index)] if options.profile else [])
        + (["--impair", options.impair] if options.impair else [])
        + (["--congestion", options.congestion] if options.congestion else []),
        pass_fds=(region.fd, ctl_stack.fileno(), *wake_fds, ready_w, death_w, stack_link.fileno(), secret_r),
        env=env)
    pidfd = os.pidfd_open(process.pid)
    ctl_stack.close()
    stack_link.close()
    for fd in (ready_w, secret_r):
        os.close(fd)
    return _Worker(process, pidfd, link, ctl_app, wake_fds[index]), ready_r


def attach_env(region_fd: int, death_fd: int, workers: list[tuple[int, int]]) -> dict[str, str]:
    """What tells the interposer where its stack is: the inherited region
    and death pipe, no fd table yet (-1), then each worker's control socket
    and wake eventfd."""
    words = [region_fd, death_fd, -1] + [fd for pair in workers for fd in pair]
    return {abi_source.string_constants()["MTS_ENV_FDS"]: ",".join(map(str, words))}


def _start_program(netns: str | None, argv: list[str], user: pwd.struct_passwd | None, region_fd: int,
                   death_fd: int, workers: list[tuple[int, int]]) -> subprocess.Popen:
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(filter(None, [PRELOAD_LIBRARY, env.get("LD_PRELOAD")]))
    env.update(attach_env(region_fd, death_fd, workers))
    fds = (region_fd, death_fd, *(fd for pair in workers for fd in pair))
    # The program lives on the stack's host: its kernel sockets (loopback,
    # UDP) are in the stack's namespace too.  `ip netns exec` needs root, so
    # the switch to `user` comes after it.
    prefix = ["ip", "netns", "exec", netns] if netns else []
    if user:
        prefix += ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", "--"]
        env.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name)
    return subprocess.Popen(prefix + argv, env=env, pass_fds=fds)


def runtime_path(netns: str | None, iface: str, kind: str) -> str:
    """Where the stack serving `iface` keeps its lock ("lock") and its
    statistics socket ("stats").  Named by the namespace's inode and the
    interface's index, not by their names: a namespace can be bound under
    any number of names."""
    index, _ = _interface(netns, iface)
    return os.path.join(LOCK_DIR, f"net{netns_inode(netns)}-if{index}.{kind}")


@dataclass
class InterfaceClaim:
    """What holding an interface gives: where the stack's statistics socket
    and its log (once it serves on without the launcher) go."""
    netns: str | None
    iface: str
    stats: str
    log: str
    lock_fd: int

    def secret(self) -> bytes:
        """The interface's host secret (isn.py), the same for every stack it
        gets until reboot, as a host keeps its own: a stack started again
        numbers a reused 4-tuple's sequence and timestamps above its last
        incarnation's, so that a peer still in TIME_WAIT takes the new SYN
        (with a new secret, half were refused by PAWS, and each such
        connect waited out SYN retransmissions).  Derived from one machine
        secret, so no file per interface outlives its namespace."""
        identity = os.path.basename(runtime_path(self.netns, self.iface, "secret")).encode()
        return hashlib.blake2s(identity, key=_machine_secret()).digest()

    def note_holder(self, pid: int) -> None:
        """The pid a second launcher names, and `mtcpshim stop` signals."""
        os.ftruncate(self.lock_fd, 0)
        os.pwrite(self.lock_fd, f"{pid}\n".encode(), 0)


def _machine_secret() -> bytes:
    """32 random bytes in /run/mtcpshim (root's, 0600), made by the first
    launcher after boot; a file put in place whole, so that two launchers
    starting at once agree on it."""
    path = os.path.join(LOCK_DIR, "secret")
    try:
        with open(path, "rb") as existing:
            secret = existing.read(32)
        if len(secret) == 32:
            return secret
    except FileNotFoundError:
        pass
    draft = f"{path}.{os.getpid()}"
    with open(os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), "wb") as new:
        new.write(os.urandom(32))
    try:
        os.link(draft, path)          # fails if another launcher's is there already
    except FileExistsError:
        pass
    finally:
        os.unlink(draft)
    with open(path, "rb") as chosen:
        return chosen.read(32)


@contextlib.contextmanager
def interface_claim(netns: str | None, iface: str):
    """One stack per interface: a second would answer the first one's
    segments with resets.  Held for the block, which gets an InterfaceClaim;
    then the lock file and the statistics socket (the stack cannot remove it
    once it has dropped root) go too, and the log if the stack wrote none."""
    os.makedirs(LOCK_DIR, exist_ok=True)
    path = runtime_path(netns, iface, "lock")
    claim = InterfaceClaim(netns, iface, runtime_path(netns, iface, "stats"), runtime_path(netns, iface, "log"), -1)
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
    claim.lock_fd = fd
    try:
        claim.note_holder(os.getpid())  # a killed launcher's file may remain
        yield claim
    finally:
        for index in range(lib.MTS_MAX_WORKERS):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(worker_path(claim.stats, index))
        with contextlib.suppress(FileNotFoundError):
            if os.stat(claim.log).st_size == 0:
                os.unlink(claim.log)
        os.unlink(path)  # while still locked: a waiter re-checks the inode
        os.close(fd)


def stop(netns: str | None, iface: str) -> None:
    """`mtcpshim stop`: ends the program's processes that the stack serves
    (SIGTERM, then SIGKILL), as stopping a service does, and with them the
    stack; then, if it still holds the interface, the launcher or keeper.
    Processes left alive on a stopped stack would see every call fail with
    ENETDOWN, and a server's accept loop would spin on it."""
    where = f"{iface}{' in ' + netns if netns else ''}"
    path = runtime_path(netns, iface, "lock")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise LaunchError(f"no stack is serving {where}") from None

    def released(within: float) -> bool:
        deadline = time.monotonic() + within
        while True:
            with contextlib.suppress(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
    try:
        if released(0):
            raise LaunchError(f"no stack is serving {where} (a stale {path})")
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if not holder.isdigit():
            raise LaunchError(f"{path} names no launcher: {holder!r}")
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _served_processes(netns, iface):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            if released(STACK_STOP_TIMEOUT):
                return
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(holder), signal.SIGTERM)
        if not released(2 * STACK_STOP_TIMEOUT):
            raise LaunchError(f"the stack serving {where} (launcher pid {holder}) has not stopped "
                              f"within {4 * STACK_STOP_TIMEOUT:.0f} s")
    finally:
        os.close(fd)


def _served_processes(netns: str | None, iface: str) -> list[int]:
    """The pids of the program's processes, as the stack knows them (each
    registered with a pidfd); none if it does not answer."""
    from mtcpshim import stat
    try:
        return [int(pid) for pid in stat.fetch(netns, iface)["processes"]["sockets"]]
    except (stat.StatError, KeyError, ValueError):
        return []


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


def _supervise(program: subprocess.Popen, workers: list[_Worker], region: Region) -> tuple[int, bool]:
    """Waits for the program, reporting the stack's death (any worker's) if
    it comes first (or with the program's exit: a program that hears of it
    through the death pipe may well end before we do).  Returns the
    program's status and whether the stack died."""
    program_fd = os.pidfd_open(program.pid)
    try:
        stack_alive = True
        while program.poll() is None:
            watched = [program_fd] + ([worker.pidfd for worker in workers] if stack_alive else [])
            try:
                readable, _, _ = select.select(watched, [], [])
            except InterruptedError:
                continue
            dead = [worker for worker in workers if worker.pidfd in readable]
            if stack_alive and dead:
                stack_alive = False
                _report_stack_death(dead[0].process, region)
                _end_workers(workers)
        dead = [worker for worker in workers if worker.process.poll() is not None]
        if stack_alive and dead:
            stack_alive = False
            _report_stack_death(dead[0].process, region)
            _end_workers(workers)
        return program.returncode if program.returncode >= 0 else 128 - program.returncode, not stack_alive
    finally:
        os.close(program_fd)


def _end_workers(workers: list[_Worker]) -> None:
    """One worker died, so the stack did: the others go too, and with the
    last of them the death pipe's write end, which wakes every call the
    program has blocked on the stack (ENETDOWN)."""
    for worker in workers:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(worker.pidfd, signal.SIGKILL)


def _ask_to_detach(workers: list[_Worker], log_path: str) -> list[int] | None:
    """Tells every worker that the program has exited.  Returns the pids of
    the processes it left that still use the stack, which serves them on and
    writes its log to `log_path`; [] if there are none and the stack is
    stopping; None if a worker did not answer."""
    os.close(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600))
    answers = [_ask_worker_to_detach(worker.link, log_path) for worker in workers]
    if None in answers:
        return None
    return sorted(set().union(*answers))


def _ask_worker_to_detach(link: socket.socket, log_path: str) -> list[int] | None:
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        socket.send_fds(link, [b"detach\n"], [log_fd])
        link.settimeout(STACK_STOP_TIMEOUT)
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = link.recv(256)
            if not chunk:
                return None
            answer += chunk
    except OSError:  # the stack died meanwhile, or is stuck: stopped as before
        return None
    finally:
        os.close(log_fd)
    word, *pids = answer.decode(errors="replace").split()
    if word == "serving" and pids and all(pid.isdigit() for pid in pids):
        return [int(pid) for pid in pids]
    return [] if word == "stopping" else None


def _become_keeper(status: int, survivors: list[int], claim: InterfaceClaim) -> None:
    """Forks: the launcher leaves with the program's status, and the child,
    the keeper, returns in a session of its own with the stack's log as
    its stderr."""
    where = (["--netns", claim.netns] if claim.netns else []) + ["--iface", claim.iface]
    print(f"mtcpshim: the program exited, but its processes {' '.join(map(str, survivors))} still use the "
          f"stack, which serves them until they end (log: {claim.log}; to end it sooner: mtcpshim stop "
          f"{' '.join(where)})", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() != 0:
        os._exit(status)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    log = os.open(claim.log, os.O_WRONLY | os.O_APPEND)
    for fd, stdio in ((null, 0), (null, 1), (log, 2)):
        os.dup2(fd, stdio)
    os.close(null)
    os.close(log)
    claim.note_holder(os.getpid())


def _keep(workers: list[_Worker], region: Region) -> None:
    """The keeper: waits for the stack's workers to end, passing them
    SIGTERM (from `mtcpshim stop`) or SIGINT."""
    def stop(signum, frame):
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(worker.pidfd, signal.SIGTERM)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    running = [worker.pidfd for worker in workers]
    while running:
        with contextlib.suppress(InterruptedError):
            ended = select.select(running, [], [])[0]
            running = [fd for fd in running if fd not in ended]
    fault = region.fault()
    if fault:
        print(f"mtcpshim: the stack died: {fault}", file=sys.stderr, flush=True)


def _report_stack_death(stack: subprocess.Popen, region: Region) -> None:
    code = stack.wait()
    fault = region.fault()
    if not fault:
        how = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
        fault = f"the stack process {how}"
        region.set_fault(fault)
    print(f"mtcpshim: the stack died, the program's stack sockets now fail: {fault}", file=sys.stderr)


def _stop(stack: subprocess.Popen, stopping: bool = False) -> None:
    """Ends the stack: with SIGTERM, unless it said it is `stopping` on its
    own (a signal would cut its last exchanges short); killed if it lingers."""
    if stack.poll() is not None:
        return
    if not stopping:
        stack.terminate()
    try:
        stack.wait(STACK_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        stack.kill()
        stack.wait()
