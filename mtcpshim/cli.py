"""The `mtcpshim` command line."""
import argparse
import ipaddress
import os
import sys

from mtcpshim import testnet
from mtcpshim.launcher import DEFAULT_SPIN_US
from mtcpshim.stack import cc as congestion_control

USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """Reports a bad flag as one readable line and exit status 2."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: {message}\n")
        sys.exit(USAGE_ERROR)


def _ipv4_interface(text):
    try:
        iface = ipaddress.IPv4Interface(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad address {text!r}: want A.B.C.D/PREFIX")
    if "/" not in text:
        raise argparse.ArgumentTypeError(f"bad address {text!r}: the prefix length is missing")
    return iface


def _ipv4_address(text):
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad gateway address {text!r}")


def _impairment(text):
    from mtcpshim.stack.io.impair import ImpairSpec, ImpairSpecError
    try:
        ImpairSpec.parse(text)
    except ImpairSpecError as err:
        raise argparse.ArgumentTypeError(str(err))
    return text  # the stack process parses it again


def _buffer_size(text):
    from mtcpshim.region import parse_buffer_size
    try:
        return parse_buffer_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err))


def _sockets(text):
    from mtcpshim.region import parse_sockets
    try:
        return parse_sockets(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err))


def _cores(text):
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"cores {text!r}: want a whole number from 1")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    net = testnet.TESTNET
    parser = _Parser(prog="mtcpshim", description="Run unmodified programs over a user-level TCP stack.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    tn = commands.add_parser("testnet", help="the built-in test network")
    tn_commands = tn.add_subparsers(dest="action", required=True, parser_class=_Parser)
    tn_up = tn_commands.add_parser("up", help=f"create {net.cli_ns} and {net.srv_ns} joined by a veth pair")
    tn_up.add_argument("--loss", type=float, metavar="PCT",
                       help="drop PCT%% of packets in each direction (nftables on the client's veth)")
    tn_up.add_argument("--no-offloads", action="store_true",
                       help="turn checksum offload, TSO, GSO and GRO off on both veth ends and send one "
                            "segment per frame, so that loss counts wire frames (without it the veth keeps "
                            "the kernel's default offloads, and up restores them)")
    tn_commands.add_parser("down", help="remove the test network")
    tn_commands.add_parser("status", help="show the test network")
    tn_exec = tn_commands.add_parser("exec", help=f"run a command in {net.cli_ns} on the kernel stack")
    tn_exec.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD")

    run = commands.add_parser("run", help="run PROGRAM with its TCP sockets on the user-level stack")
    run.add_argument("--netns", default=net.srv_ns, help="namespace of the stack's interface (default %(default)s)")
    run.add_argument("--iface", default=net.srv_if, help="interface the stack owns (default %(default)s)")
    run.add_argument("--ip", type=_ipv4_interface, default=ipaddress.IPv4Interface(f"{net.srv_ip}/{net.prefix}"),
                     help="the stack's address, ADDR/PREFIX (default %(default)s)")
    run.add_argument("--gateway", type=_ipv4_address, help="next hop for destinations off the prefix")
    run.add_argument("--io", choices=("afpacket", "tap"), default="afpacket", help="packet I/O backend")
    run.add_argument("--pcap", metavar="FILE", help="write every frame the stack sends and receives")
    run.add_argument("--profile", metavar="FILE",
                     help="profile the stack's loop, written to FILE when it stops (python3 -m pstats FILE)")
    run.add_argument("--spin-us", type=float, default=DEFAULT_SPIN_US,
                     help="microseconds the idle stack polls before it sleeps (default %(default)g)")
    run.add_argument("--impair", type=_impairment, metavar="SPEC",
                     help="seeded faults on the stack's frames, e.g. loss=1%%,dup=1%%,reorder=25%%,"
                          "corrupt=0.1%%,delay=20ms,jitter=10ms,seed=7,dir=rx|tx|both")
    run.add_argument("--user", help="run PROGRAM as USER (its uid, group and supplementary groups)")
    run.add_argument("--stack-user", default="nobody", metavar="USER",
                     help="the unprivileged user the stack serves as once its packet I/O is open "
                          "(default %(default)s)")
    run.add_argument("--stack-python", default=os.environ.get("MTCPSHIM_STACK_PYTHON"),
                     metavar="{cpython,pypy,auto}",
                     help="the stack process's interpreter: pypy (its JIT, if pypy3 is installed and the "
                          "modules were built for it), cpython, or auto (pypy where ready); the default is "
                          "$MTCPSHIM_STACK_PYTHON, else auto")
    run.add_argument("--congestion", default=os.environ.get("MTCPSHIM_CONGESTION"),
                     choices=sorted(congestion_control.ALGORITHMS), metavar="NAME",
                     help="the stack's default congestion control (%(choices)s); a program may still "
                          "choose with TCP_CONGESTION.  The default is $MTCPSHIM_CONGESTION, else the "
                          "kernel's net.ipv4.tcp_congestion_control in the stack's namespace, as a "
                          "program on the kernel would get")
    run.add_argument("--buffer-size", type=_buffer_size, metavar="SIZE",
                     default=os.environ.get("MTCPSHIM_BUFFER_SIZE", "1M"),
                     help="each socket's receive and send buffer, a power of two from 64K to 64M: what "
                          "one connection may have in flight (a path's bandwidth times its round trip, "
                          "and more under loss).  The default is $MTCPSHIM_BUFFER_SIZE, else %(default)s")
    run.add_argument("--sockets", type=_sockets, metavar="N", default=os.environ.get("MTCPSHIM_SOCKETS"),
                     help="stack sockets the program may hold at once, connections waiting to be accepted "
                          "included; while none is free, new clients' SYNs go unanswered (they retry), as "
                          "on Linux with a full accept queue.  The default is $MTCPSHIM_SOCKETS, else the "
                          "program's open-file limit, at least 65536 (each costs address space; memory "
                          "only where data passed)")
    run.add_argument("--cores", type=_cores, metavar="N", default=os.environ.get("MTCPSHIM_CORES"),
                     help="stack workers, one pinned to each of the first N cores the program may run on, "
                          "each with its own flows (steered by their ports), sockets and timers.  The "
                          "default is $MTCPSHIM_CORES, else every such core")
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- PROGRAM [ARGS...]")

    stat = commands.add_parser("stat", help="counters of a running stack (drops by reason, TCP, packet I/O)")
    stat.add_argument("--netns", default=net.srv_ns, help="namespace given to `run` (default %(default)s)")
    stat.add_argument("--iface", default=net.srv_if, help="interface given to `run` (default %(default)s)")
    stat.add_argument("--json", action="store_true", help="print the raw JSON snapshot")

    stop = commands.add_parser("stop", help="stop a stack, such as one that serves on for the processes "
                                            "a program left when it exited (a daemon)")
    stop.add_argument("--netns", default=net.srv_ns, help="namespace given to `run` (default %(default)s)")
    stop.add_argument("--iface", default=net.srv_if, help="interface given to `run` (default %(default)s)")

    bench = commands.add_parser("bench", help="lighttpd and iperf3 on the kernel's TCP stack vs ours, side by side")
    from mtcpshim import bench as bench_command
    bench_command.add_arguments(bench)
    return parser


def _strip_dashes(argv: list[str]) -> list[str]:
    return argv[1:] if argv[:1] == ["--"] else argv


def _render_status(status: dict) -> str:
    if status["up"]:
        variant = "the kernel's default offloads" if status["offloads"] else "offloads off, one segment per frame"
        lines = [f"test network: up, {variant}"]
    else:
        lines = ["test network: down or incomplete"]
    for name, present in status["namespaces"].items():
        lines.append(f"  namespace {name}: {'present' if present else 'missing'}")
    for name, link in status["links"].items():
        if not link["present"]:
            lines.append(f"  {name}: missing")
            continue
        offloads = [feature for feature, on in link["offloads"].items() if on]
        lines.append(f"  {name} in {link['netns']}: {'up' if link['admin_up'] else 'down'}, "
                     f"addresses {', '.join(link['addresses']) or 'none'}, "
                     f"offloads {', '.join(offloads) or 'off'}, gso_max_segs {link['gso_max_segs']}")
    loss = status["loss"]
    lines.append("  loss: none" if loss is None else
                 f"  loss: {loss['percent']}% each way ({loss['dropped_to_client']} frames dropped "
                 f"towards the client, {loss['dropped_from_client']} from it)")
    return "\n".join(lines)


def _testnet(args) -> int:
    if args.action == "up":
        testnet.up(loss_percent=args.loss, net=testnet.FRAME_EXACT_TESTNET if args.no_offloads else testnet.TESTNET)
    elif args.action == "down":
        testnet.down()
    elif args.action == "status":
        print(_render_status(testnet.status()))
    else:
        argv = _strip_dashes(args.argv)
        if not argv:
            raise testnet.TestNetError("testnet exec needs a command: mtcpshim testnet exec -- CMD")
        return testnet.exec_in_client(argv)
    return 0


def _run(args) -> int:
    from mtcpshim import launcher
    from mtcpshim.region import default_sockets
    from mtcpshim.netns import netns_exists

    argv = _strip_dashes(args.argv)
    if not argv:
        raise launcher.LaunchError("run needs a program: mtcpshim run [OPTIONS] -- PROGRAM [ARGS...]")
    net = testnet.TESTNET
    if args.netns == net.srv_ns and args.iface == net.srv_if and not netns_exists(net.srv_ns):
        testnet.up()
    if args.netns and not netns_exists(args.netns):
        raise launcher.LaunchError(f"no such network namespace: {args.netns}")
    options = launcher.StackOptions(netns=args.netns, iface=args.iface, ip=args.ip, gateway=args.gateway,
                                    io=args.io, pcap=args.pcap, profile=args.profile, spin_us=args.spin_us,
                                    impair=args.impair, stack_user=args.stack_user,
                                    stack_python=args.stack_python or launcher.DEFAULT_STACK_PYTHON,
                                    congestion=args.congestion, buffer_size=args.buffer_size,
                                    sockets=args.sockets or default_sockets(), cores=args.cores)
    return launcher.run(options, argv, user=args.user)


def _stat(args) -> int:
    from mtcpshim import stat
    print(stat.render(stat.fetch(args.netns, args.iface), as_json=args.json))
    return 0


def _stop(args) -> int:
    from mtcpshim import launcher
    from mtcpshim.netns import netns_exists
    if args.netns and not netns_exists(args.netns):
        raise launcher.LaunchError(f"no such network namespace: {args.netns}")
    launcher.stop(args.netns, args.iface)
    return 0


def _bench(args) -> int:
    from mtcpshim import bench
    return bench.main(args)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from mtcpshim.launcher import LaunchError
    from mtcpshim.stat import StatError
    commands = {"testnet": _testnet, "run": _run, "stat": _stat, "stop": _stop, "bench": _bench}
    try:
        return commands[args.command](args)
    except (testnet.TestNetError, LaunchError, StatError) as err:
        print(f"mtcpshim: {err}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
