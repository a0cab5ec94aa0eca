"""The stack process: started by the launcher, serves one shared region.

It reports readiness (or the one-line reason it cannot start) on the ready
pipe, then runs the loop until SIGTERM.  On a crash it records the reason in
the region so that the launcher and the interposer can tell the user.
"""
import argparse
import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import traceback

from mtcpshim._shm import lib
from mtcpshim.region import Region

# How long a stopping stack keeps serving so that connections the exiting
# program left open still end with FIN exchanges rather than silence.
STOP_LINGER_SECONDS = 1.0


def _parse(argv):
    parser = argparse.ArgumentParser(prog="mtcpshim-stackd")
    parser.add_argument("--shm-fd", type=int, required=True)
    parser.add_argument("--ctl-fd", type=int, required=True)
    parser.add_argument("--wake-fd", type=int, required=True)
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--netns")
    parser.add_argument("--iface", required=True)
    parser.add_argument("--ip", type=ipaddress.IPv4Interface, required=True)
    parser.add_argument("--gateway", type=ipaddress.IPv4Address)
    parser.add_argument("--io", choices=("afpacket", "tap"), default="afpacket")
    parser.add_argument("--pcap")
    parser.add_argument("--spin-us", type=float, default=0.0)
    parser.add_argument("--impair", help="an ImpairSpec: faults applied to the packet I/O")
    parser.add_argument("--stats-socket", help="Unix socket path answering `mtcpshim stat`")
    return parser.parse_args(argv)


def _open_packet_io(args):
    """The stack's NIC: an AF_PACKET socket on --iface, or with --io tap a TAP
    device bridged to --iface by the kernel.  Opened inside --netns; the
    socket or TAP stays there.  Returns (io, cleanup)."""
    from mtcpshim.netns import enter_netns

    def in_netns():
        return enter_netns(args.netns) if args.netns else contextlib.nullcontext()

    with in_netns():
        if args.io == "tap":
            return _open_bridged_tap(args.iface, in_netns)
        from stack.io.afpacket import AfPacketIO
        return AfPacketIO(args.iface), lambda: None


TAP_NAME, BRIDGE_NAME = "mtcptap0", "mtcpbr0"


def _open_bridged_tap(iface: str, in_netns):
    from stack.io.base import PacketIOError
    from stack.io.tap import TapIO

    try:
        socket.if_nametoindex(iface)  # asks the current namespace (sysfs may show another)
    except OSError:
        raise PacketIOError(f"no such interface: {iface}") from None
    tap = TapIO(TAP_NAME)
    commands = [["ip", "link", "add", BRIDGE_NAME, "type", "bridge"],
                ["ip", "link", "set", iface, "master", BRIDGE_NAME],
                ["ip", "link", "set", TAP_NAME, "master", BRIDGE_NAME],
                ["ip", "link", "set", TAP_NAME, "up"],
                ["ip", "link", "set", BRIDGE_NAME, "up"]]
    for argv in commands:
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            subprocess.run(["ip", "link", "del", BRIDGE_NAME], capture_output=True)
            tap.close()
            raise PacketIOError(f"bridging {TAP_NAME} to {iface} failed: {done.stderr.strip()}")
    def remove_bridge():
        # Deleting the bridge releases the interface; the TAP goes with its fd.
        with in_netns():
            subprocess.run(["ip", "link", "del", BRIDGE_NAME], capture_output=True)
        tap.close()
    return tap, remove_bridge


def _build_runtime(args, region):
    from mtcpshim.runtime import Runtime
    from stack.host import TcpHost
    from stack.iface import Interface
    from stack.io.pcap import PcapWriter

    io, cleanup = _open_packet_io(args)
    if args.impair:
        from stack.io.impair import ImpairedIO, ImpairSpec
        io = ImpairedIO(io, ImpairSpec.parse(args.impair))
    ip = int(args.ip.ip)
    gateway = int(args.gateway) if args.gateway else None
    iface = Interface(io.mac, ip, args.ip.network.prefixlen, gateway)
    pcap = PcapWriter(args.pcap) if args.pcap else None
    stats = _listen_for_stats(args.stats_socket) if args.stats_socket else None
    runtime = Runtime(region, io, iface, TcpHost(ip), args.ctl_fd, args.wake_fd,
                      pcap=pcap, spin_seconds=args.spin_us / 1e6, stats_listener=stats)

    def cleanup_all():
        if stats is not None:
            stats.close()
            os.unlink(args.stats_socket)
        cleanup()
    return runtime, cleanup_all


def _listen_for_stats(path: str) -> socket.socket:
    # The launcher holds the interface's lock: a socket left at `path` is stale.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    return listener


def main(argv=None) -> int:
    args = _parse(argv)
    region = Region(args.shm_fd)
    region.header.stack_pid = os.getpid()
    with os.fdopen(args.ready_fd, "w") as ready:
        try:
            runtime, cleanup = _build_runtime(args, region)
        except Exception as err:  # reported as one line before the program starts
            ready.write(f"error: {err}\n")
            return 2
        region.header.stack_state = lib.MTS_STACK_RUNNING
        ready.write("ready\n")

    def stop(signum, frame):
        runtime.stopping = True

    signal.set_wakeup_fd(runtime.signal_fd)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        runtime.run()
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
