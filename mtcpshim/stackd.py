"""The stack process: started by the launcher, serves one shared region.

It reports readiness (or the one-line reason it cannot start) on the ready
pipe, then runs the loop until SIGTERM.  On a crash it records the reason in
the region so that the launcher and the interposer can tell the user.
"""
import argparse
import ipaddress
import os
import signal
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
    return parser.parse_args(argv)


def _open_packet_io(args):
    from stack.io.afpacket import AfPacketIO
    from stack.io.tap import TapIO
    from mtcpshim.netns import enter_netns

    backend = TapIO if args.io == "tap" else AfPacketIO
    if not args.netns:
        return backend(args.iface)
    # The packet socket stays in the namespace it was opened in.
    with enter_netns(args.netns):
        return backend(args.iface)


def _build_runtime(args, region):
    from mtcpshim.runtime import Runtime
    from stack.host import TcpHost
    from stack.iface import Interface
    from stack.io.pcap import PcapWriter

    io = _open_packet_io(args)
    ip = int(args.ip.ip)
    gateway = int(args.gateway) if args.gateway else None
    iface = Interface(io.mac, ip, args.ip.network.prefixlen, gateway)
    pcap = PcapWriter(args.pcap) if args.pcap else None
    return Runtime(region, io, iface, TcpHost(ip), args.ctl_fd, args.wake_fd,
                   pcap=pcap, spin_seconds=args.spin_us / 1e6)


def main(argv=None) -> int:
    args = _parse(argv)
    region = Region(args.shm_fd)
    region.header.stack_pid = os.getpid()
    with os.fdopen(args.ready_fd, "w") as ready:
        try:
            runtime = _build_runtime(args, region)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
