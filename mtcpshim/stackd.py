"""A stack worker process: started by the launcher, one per core, serves its
share of one shared region (its slots, its command queue, the flows its
packet sockets' filter steers to it: stack/io/steer.py).

It opens its packet I/O as root, then drops to --stack-user with no
capabilities: a program (any of its processes can write anywhere in the
region) that subverts the stack gains nothing.  It reports readiness (or the
one-line reason it cannot start) on the ready pipe, then runs the loop until
SIGTERM, until the launcher's link closes, or, once the program has exited,
until the last of the processes it left ends (runtime.py, `detach`).  On a
crash it records the reason in the region so that the launcher and the
interposer can tell the user.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import ctypes
import importlib
import ipaddress
import marshal
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
import traceback

from mtcpshim._shm import lib
from mtcpshim.netns import in_netns
from mtcpshim.region import Region

# How long a stopping stack keeps serving so that connections the exiting
# program left open still end with FIN exchanges rather than silence.
STOP_LINGER_SECONDS = 1.0
# The buffer a loop's frames are built in (Interface frame_arena): about
# 700 full-size frames; frames past it get buffers of their own.
FRAME_ARENA_BYTES = 1 << 20


def tap_names(ifindex: int) -> tuple[str, str]:
    """The TAP and the bridge joining it to interface `ifindex` (--io tap):
    a pair per interface, so that stacks on two interfaces of a namespace
    keep apart and a pair a killed launcher left is ours to replace."""
    return f"mtcptap{ifindex}", f"mtcpbr{ifindex}"


# Once it has dropped root the stack cannot read the Python installation
# (under /root, mode 0700) nor maybe this tree: whatever it may import later,
# in a function or on an error path, is imported before the drop.
LATE_IMPORTS = ("array",                     # socket.send_fds/recv_fds
                "ast", "linecache", "tokenize", "unicodedata",   # traceback
                "warnings", "encodings.ascii", "encodings.latin_1", "encodings.idna")

_PR_CAPBSET_DROP = 24
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_PR_SET_NO_NEW_PRIVS = 38
_CAPABILITY_FIELDS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


class PrivilegeError(Exception):
    """The stack could not shed its privileges; one line."""


def _parse(argv):
    parser = argparse.ArgumentParser(prog="mtcpshim-stackd")
    parser.add_argument("--shm-fd", type=int, required=True)
    parser.add_argument("--ctl-fd", type=int, required=True)
    parser.add_argument("--wake-fds", type=_fd_list, required=True,
                        help="every worker's wake eventfd, in worker order")
    parser.add_argument("--worker", type=int, default=0, help="this worker's index")
    parser.add_argument("--cpu", type=int, help="the core this worker is pinned to")
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--netns")
    parser.add_argument("--iface", required=True)
    parser.add_argument("--ip", type=ipaddress.IPv4Interface, required=True)
    parser.add_argument("--gateway", type=ipaddress.IPv4Address)
    parser.add_argument("--io", choices=("afpacket", "tap"), default="afpacket")
    parser.add_argument("--pcap", help="append every frame to this capture file (the launcher started it)")
    parser.add_argument("--profile", help="write a cProfile of the loop here when it stops")
    parser.add_argument("--spin-us", type=float, default=0.0)
    parser.add_argument("--impair", help="an ImpairSpec: faults applied to the packet I/O")
    parser.add_argument("--congestion", help="default congestion control (else the kernel's here)")
    parser.add_argument("--stats-socket", help="Unix socket path answering `mtcpshim stat`")
    parser.add_argument("--launcher-fd", type=int,
                        help="our end of a socket pair with the launcher: it says when the program has "
                             "exited, and its end-of-file stops the stack")
    parser.add_argument("--secret-fd", type=int,
                        help="a pipe carrying the host's secret (32 bytes): the interface's, kept across restarts")
    parser.add_argument("--stack-user", default="nobody",
                        help="the user the stack serves as once its packet I/O is open (default %(default)s)")
    return parser.parse_args(argv)


def _fd_list(text: str) -> tuple[int, ...]:
    return tuple(int(fd) for fd in text.split(","))


def _open_packet_io(args, workers: int):
    """The stack's NIC: an AF_PACKET socket on --iface, or with --io tap a TAP
    device bridged to --iface by the kernel.  Opened inside --netns; the
    socket or TAP stays there.  Returns (io, cleanup)."""
    with in_netns(args.netns):
        if args.io == "tap":
            return _open_bridged_tap(args.iface)
        from mtcpshim.stack.io.afpacket import AfPacketIO
        steering = (args.worker, workers) if workers > 1 else None
        return AfPacketIO(args.iface, steering=steering), lambda: None


def _open_bridged_tap(iface: str):
    from mtcpshim.stack.io.base import PacketIOError, interface_index
    from mtcpshim.stack.io.tap import TapIO

    try:
        ifindex = interface_index(iface)  # asks the current namespace (sysfs may show another)
    except OSError:
        raise PacketIOError(f"no such interface: {iface}") from None
    tap_name, bridge_name = tap_names(ifindex)
    # The launcher removes the bridge when the stack exits, unless it was
    # killed; we hold the interface's lock, so one still there is stale.
    subprocess.run(["ip", "link", "del", bridge_name], capture_output=True)
    tap = TapIO(tap_name)
    commands = [["ip", "link", "add", bridge_name, "type", "bridge"],
                ["ip", "link", "set", iface, "master", bridge_name],
                ["ip", "link", "set", tap_name, "master", bridge_name],
                ["ip", "link", "set", tap_name, "up"],
                ["ip", "link", "set", bridge_name, "up"]]
    for argv in commands:
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            subprocess.run(["ip", "link", "del", bridge_name], capture_output=True)
            tap.close()
            raise PacketIOError(f"bridging {tap_name} to {iface} failed: {done.stderr.strip()}")
    # The TAP goes with its fd; the bridge is the launcher's to remove.
    return tap, tap.close


def _build_runtime(args, region):
    from mtcpshim.runtime import Runtime
    from mtcpshim.stack.host import TcpHost
    from mtcpshim.stack.iface import Interface
    from mtcpshim.stack.node import Node
    from mtcpshim.stack.io.pcap import PcapWriter
    from mtcpshim.stack import cc, timewait
    from mtcpshim.stack.tcp import TcpConfig

    workers = region.geom.nworkers
    if not 0 <= args.worker < workers or len(args.wake_fds) != workers:
        raise ValueError(f"worker {args.worker} with {len(args.wake_fds)} wake eventfds: the region has {workers}")
    io, cleanup = _open_packet_io(args, workers)
    if args.impair:
        from mtcpshim.stack.io.impair import ImpairedIO, ImpairSpec
        io = ImpairedIO(io, ImpairSpec.parse(args.impair))
    ip = int(args.ip.ip)
    gateway = int(args.gateway) if args.gateway else None
    iface = Interface(io.mac, ip, args.ip.network.prefixlen, gateway, frame_arena=FRAME_ARENA_BYTES,
                      answers_arp=args.worker == 0)
    pcap = PcapWriter(args.pcap) if args.pcap else None
    stats = _listen_for_stats(args.stats_socket) if args.stats_socket else None
    # Congestion control as the kernel's in this namespace, so that a
    # program sees the algorithm it would get from Linux here.
    if args.congestion and args.congestion not in cc.ALGORITHMS:
        raise ValueError(f"unknown congestion control {args.congestion!r} "
                         f"(offered: {', '.join(sorted(cc.ALGORITHMS))})")
    congestion, not_offered = (args.congestion, None) if args.congestion else cc.host_default()
    if not_offered:
        print(f"mtcpshim: the kernel's default congestion control {not_offered} is not offered by "
              f"the stack; using {congestion}", file=sys.stderr)
    region.publish_congestion(congestion)
    node = Node(iface, TcpHost(ip, TcpConfig(gso_max_size=io.gso_max_size, congestion=congestion,
                                             max_time_wait=timewait.host_limit(TcpConfig.max_time_wait)),
                               secret=_read_secret(args.secret_fd),
                               steering=(args.worker, workers) if workers > 1 else None))
    runtime = Runtime(region, io, node, args.ctl_fd, args.wake_fds[args.worker],
                      pcap=pcap, spin_seconds=args.spin_us / 1e6, stats_listener=stats,
                      launcher_fd=args.launcher_fd, on_detach=_leave_launcher,
                      worker=args.worker, wake_fds=args.wake_fds)

    def cleanup_all():
        # The statistics socket's path is the launcher's to remove (its
        # directory is root's).
        if stats is not None:
            stats.close()
        cleanup()
    return runtime, cleanup_all


def _read_secret(fd: int | None) -> bytes | None:
    if fd is None:
        return None
    with os.fdopen(fd, "rb") as pipe:
        secret = pipe.read(64)
    if len(secret) < 32:
        raise ValueError(f"the host secret on fd {fd} is {len(secret)} bytes, not 32")
    return secret


def _leave_launcher(log_fd: int) -> None:
    """The program exited and left processes that use us: the launcher
    returns to its caller, so its output and its terminal are no longer
    ours; what we say goes to `log_fd`."""
    for stdio in (1, 2):
        os.dup2(log_fd, stdio)
    with contextlib.suppress(OSError):
        os.setsid()


def _pin_to(cpu: int) -> None:
    """sched_setaffinity(2) through libc: PyPy 3.9's os module lacks it."""
    mask = (ctypes.c_ulong * 16)()
    mask[cpu // 64] = 1 << (cpu % 64)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.sched_setaffinity(0, ctypes.sizeof(mask), mask) != 0:
        raise OSError(ctypes.get_errno(), f"cannot pin the worker to core {cpu}")


def _listen_for_stats(path: str) -> socket.socket:
    # The launcher holds the interface's lock: a socket left at `path` is stale.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous = os.umask(0o177)  # 0600 from the start, whatever umask we were given
    try:
        listener.bind(path)
    finally:
        os.umask(previous)
    listener.listen(8)
    return listener


def _keep_freed_memory() -> None:
    """64 KB frames come and go every loop.  By default glibc hands the freed
    top of the heap back to the kernel and faults it in again for the next
    frame: that cost 25 us per frame, most of the send path's CPU."""
    libc = ctypes.CDLL(None)
    libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)


def _drop_privileges(user: str) -> None:
    """Become `user` for good, with no capabilities and no way to gain any
    (no-new-privs: setuid binaries and file capabilities give nothing)."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"no such user: {user}") from None
    for module in LATE_IMPORTS:
        importlib.import_module(module)
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/sys/kernel/cap_last_cap") as last:
        last_cap = int(last.read())
    for cap in range(last_cap + 1):
        _prctl(libc, _PR_CAPBSET_DROP, cap)
    _prctl(libc, _PR_SET_NO_NEW_PRIVS, 1)
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)  # from root to another user: clears every capability set
    _check_unprivileged()


def _prctl(libc, option: int, arg: int) -> None:
    if libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        err = ctypes.get_errno()
        raise PrivilegeError(f"prctl({option}, {arg}) failed: {os.strerror(err)}")


def _check_unprivileged() -> None:
    """Trust the kernel's account, not the calls that should have done it."""
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    if "0" in fields["Uid"].split() or "0" in fields["Gid"].split():
        raise PrivilegeError(f"still root after dropping privileges: Uid {fields['Uid'].split()}, "
                             f"Gid {fields['Gid'].split()}")
    kept = [name for name in _CAPABILITY_FIELDS if int(fields[name], 16)]
    if kept or fields["NoNewPrivs"].strip() != "1":
        raise PrivilegeError(f"capabilities left after dropping privileges: {', '.join(kept) or 'NoNewPrivs 0'}")


def _tell_launcher(fd: int, line: str) -> None:
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


def main(argv=None) -> int:
    args = _parse(argv)
    _keep_freed_memory()
    region = Region(args.shm_fd)
    if args.worker == 0:
        region.header.stack_pid = os.getpid()
    try:
        if args.cpu is not None:
            # Its flows' frames, its commands and the program's threads on
            # this core meet here: nothing on the data path crosses cores.
            _pin_to(args.cpu)
            lib.mts_worker_at(region.geom, args.worker % region.geom.nworkers).cpu = args.cpu
        runtime, cleanup = _build_runtime(args, region)
        # Opened while root: the stack user may not write where the user asked.
        profile_file = open(args.profile, "wb") if args.profile else None
    except Exception as err:  # reported as one line before the program starts
        _tell_launcher(args.ready_fd, f"error: {err}")
        return 2

    def stop(signum, frame):
        runtime.stopping = True

    # Before "ready": the launcher may stop us as soon as it has read it.
    signal.set_wakeup_fd(runtime.signal_fd)
    signal.signal(signal.SIGTERM, stop)
    # A terminal's ^C reaches the whole process group: the program ends, then
    # the launcher stops us, and connections the program left get closed.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _drop_privileges(args.stack_user)
    except (PrivilegeError, OSError) as err:
        cleanup()
        _tell_launcher(args.ready_fd, f"error: the stack cannot drop its privileges: {err}")
        return 2
    region.header.stack_state = lib.MTS_STACK_RUNNING
    try:
        _tell_launcher(args.ready_fd, "ready")
    except BrokenPipeError:  # the launcher died before it started the program
        cleanup()
        return 1
    profiler = cProfile.Profile() if profile_file else None
    try:
        if profiler is not None:
            profiler.enable()
        runtime.run()
        if profiler is not None:
            profiler.disable()
            profiler.create_stats()
            with profile_file:
                marshal.dump(profiler.stats, profile_file)  # the format pstats reads
        if runtime.fault is not None:  # nothing can be sent any more: no linger
            region.set_fault(f"the stack stopped: {runtime.fault}")
            return 1
        runtime.close_all(time.monotonic() + STOP_LINGER_SECONDS)
    except Exception as err:
        traceback.print_exc()
        region.set_fault(f"stack crashed: {type(err).__name__}: {err}")
        return 1
    finally:
        if runtime.pcap is not None:
            runtime.pcap.close()
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
