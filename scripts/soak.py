"""A mixed soak of lighttpd over the stack on the test network: keep-alive,
`Connection: close` churn, a thousand connections at once and bulk, in turn,
for MINUTES; then idle until TIME_WAIT has expired.  Prints one line every
SAMPLE seconds (time, phase, the stack's and lighttpd's resident memory,
sockets in use, connections, TIME_WAIT records, connections accepted so
far), so that what a long run leaves behind shows: sockets and memory
should come back to where they started.  --only runs one kind of load
(`--only close` churns connections: 10^6 in about a minute).

    sudo python3 scripts/soak.py [--minutes 10] [--sample 10] [--only PHASE]
"""
import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import psutil

from mtcpshim import stat, testnet

NET = testnet.TESTNET
URL = f"http://{NET.srv_ip}:8080"
# (phase, wrk arguments, seconds): each phase's load is bounded by wrk's -d.
PHASES = (("keepalive", ["-c64", f"{URL}/small.txt"], 20),
          ("close", ["-c64", "-H", "Connection: close", f"{URL}/small.txt"], 20),
          ("1000 conns", ["-c1000", f"{URL}/small.txt"], 10),
          ("bulk", ["-c8", f"{URL}/large.bin"], 10))
TIME_WAIT_SECONDS = 60


def rss_kib(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss >> 10


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--sample", type=float, default=10)
    parser.add_argument("--only", choices=[phase for phase, _, _ in PHASES], help="run only this load")
    args = parser.parse_args()
    phases = [phase for phase in PHASES if args.only in (None, phase[0])]
    testnet.up()
    with tempfile.TemporaryDirectory(prefix="mtcpshim-soak-") as work:
        root = pathlib.Path(work)
        (root / "small.txt").write_bytes(b"x" * 63 + b"\n")
        (root / "large.bin").write_bytes(os.urandom(1 << 20))
        conf = root / "lighttpd.conf"
        conf.write_text(f'server.document-root = "{root}"\nserver.port = 8080\nserver.bind = "0.0.0.0"\n'
                        'server.max-keep-alive-requests = 65535\nserver.max-fds = 16384\n')
        launcher = subprocess.Popen([sys.executable, "-m", "mtcpshim.cli", "run", "--", "lighttpd", "-D", "-f",
                                     str(conf)], stdout=subprocess.DEVNULL, start_new_session=True)
        try:
            return soak(launcher, phases, args.minutes * 60, args.sample)
        finally:
            launcher.terminate()
            launcher.wait(30)


def soak(launcher: subprocess.Popen, phases: list, seconds: float, sample: float) -> int:
    deadline = time.monotonic() + 30
    while True:
        try:
            stack_pid = stat.fetch(NET.srv_ns, NET.srv_if)["pid"]
            break
        except stat.StatError:
            if time.monotonic() > deadline:
                print("the stack did not answer", file=sys.stderr)
                return 1
            time.sleep(0.2)
    time.sleep(1)
    [server] = [p for p in psutil.Process(launcher.pid).children(recursive=True) if p.name() == "lighttpd"]
    print("seconds  phase       stack_rss_kib  lighttpd_rss_kib  sockets  connections  time_wait   accepted",
          flush=True)
    start = time.monotonic()
    end_of_load = start + seconds
    phase, load, next_sample, turn = "start", None, start, 0
    while True:
        now = time.monotonic()
        if load is None or load.poll() is not None:
            if now < end_of_load:
                phase, wrk_args, duration = phases[turn % len(phases)]
                turn += 1
                duration = min(duration, max(1, int(end_of_load - now)))
                load = subprocess.Popen(["ip", "netns", "exec", NET.cli_ns, "taskset", "-c", "0", "wrk", "-t1",
                                         f"-d{duration}s", *wrk_args], stdout=subprocess.DEVNULL)
            elif now > end_of_load + TIME_WAIT_SECONDS + sample:
                return 0
            else:
                phase = "idle"
        if now >= next_sample:
            snapshot = stat.fetch(NET.srv_ns, NET.srv_if)
            states = snapshot["connections"]
            time_wait = states.get("TIME_WAIT", 0)
            print(f"{now - start:7.0f}  {phase:10s}  {rss_kib(stack_pid):13d}  {rss_kib(server.pid):16d}  "
                  f"{snapshot['slots_in_use']:7d}  {sum(states.values()) - time_wait:11d}  {time_wait:9d}  "
                  f"{snapshot['tcp'].get('tcp_passive_opens', 0):9d}", flush=True)
            next_sample += sample
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())
