"""A private test network for fault, fuzz and flood runs, and the transfers
that run over it.  Shared by tests/faults, tests/fuzz and
scripts/reliability.py.

Every network gets random names (mtcpt-<hex>-cli / -srv, interfaces
mt<hex>-c / -s / -l), so runs never meet the developer's mtcp-cli/mtcp-srv
or each other, and it is removed again on the way out.

Faults come from three places:
  - loss: the test network's own nftables netdev table (testnet.up);
  - duplication: an nftables `ip` table in the client namespace, below;
  - reordering, corruption, delay: `mtcpshim run --impair` (stack/io/impair.py).

Duplication cannot live in the netdev table beside loss: a netdev `dup to`
only transmits the copy, and the copy of a frame arriving at the client
would go back out towards the stack.  The `ip` family's `dup to` routes the
copy instead: towards the client it goes through loopback back into the
client's own input path (TCP sees the segment twice); from the client it is
routed to the stack's address through the veth (the stack sees the frame
twice).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import secrets
import shutil
import signal
import subprocess
import sys
import time

import psutil

from mtcpshim import stat, testnet
from mtcpshim.netns import enter_netns

# MTCPSHIM_LONG=1 selects the long variants: 256 MiB each way per fault.
LONG = os.environ.get("MTCPSHIM_LONG") == "1"
BODY_SIZE = (256 if LONG else 4) * 1024 * 1024

SERVER_PORT = 8080          # lighttpd under the stack
KERNEL_HTTP_PORT = 8000     # python3 -m http.server on the client's kernel
DUP_TABLE = "mtcpshim_dup"
DUP_SCALE = 10000           # percentages in steps of 0.01, like the loss table
STACK_START_TIMEOUT = 30.0
# Client-side kernel counters worth reporting after a run (/proc/net/snmp, netstat).
KERNEL_COUNTERS = ("Tcp.InSegs", "Tcp.OutSegs", "Tcp.RetransSegs", "Tcp.InCsumErrors",
                   "Ip.InHdrErrors", "TcpExt.TCPDSACKOldSent", "TcpExt.TCPDSACKRecv",
                   "TcpExt.TCPOFOQueue", "TcpExt.TCPSACKReorder", "TcpExt.TCPTimeouts")


# The faults of issue 4, alone and together: link faults for set_link_faults
# and an --impair spec for the stack.  Delay applies in each direction.
FAULTS = {
    "loss 5%": dict(loss_percent=5),
    "reordering 25%": dict(impair="reorder=25%,seed=7"),
    "duplication 1%": dict(duplicate_percent=1),
    "corruption 0.1%": dict(impair="corrupt=0.1%,seed=7"),
    "delay 20ms +- 10ms": dict(impair="delay=20ms,jitter=10ms,seed=7"),
    "all of them": dict(loss_percent=5, duplicate_percent=1,
                        impair="reorder=25%,corrupt=0.1%,delay=20ms,jitter=10ms,seed=7"),
}


def needs_frame_exact(fault: dict) -> bool:
    """nftables loss and duplication act on frames: on a veth at its default
    offloads a frame may be a 64 KB GSO frame, 45 segments lost or copied at
    once.  The stack's own injector (--impair) works at any frame size."""
    return bool(fault.get("loss_percent") or fault.get("duplicate_percent"))


class FaultRunError(Exception):
    """A run could not be set up or did not finish; one line."""


# --- the network -------------------------------------------------------------


def private_net(tag: str | None = None, offloads: bool = True) -> testnet.TestNet:
    """offloads False: the frame-exact variant, one segment per frame (see testnet)."""
    tag = tag or secrets.token_hex(3)
    return testnet.TestNet(cli_ns=f"mtcpt-{tag}-cli", srv_ns=f"mtcpt-{tag}-srv",
                           cli_if=f"mt{tag}-c", srv_if=f"mt{tag}-s", sink_if=f"mt{tag}-l", offloads=offloads)


@contextlib.contextmanager
def private_network(tag: str | None = None, offloads: bool = True):
    """A fresh test network under random names; always removed afterwards."""
    net = private_net(tag, offloads)
    try:
        testnet.up(net=net)
        yield net
    finally:
        testnet.down(net)


def set_link_faults(net: testnet.TestNet, loss_percent: float = 0, duplicate_percent: float = 0) -> None:
    """Random loss and duplication in both directions on the client's veth,
    outside our stack; zero removes them."""
    testnet.up(loss_percent=loss_percent or None, net=net)
    _set_duplication(net, duplicate_percent)


def _set_duplication(net: testnet.TestNet, percent: float) -> None:
    threshold = round(percent * DUP_SCALE / 100)
    if not 0 <= threshold <= DUP_SCALE:
        raise FaultRunError(f"duplication must be between 0 and 100 percent, not {percent}")
    # Declare-then-delete makes the script one atomic replacement.
    ruleset = f"table ip {DUP_TABLE}\ndelete table ip {DUP_TABLE}\n"
    if threshold:
        # The copy that comes back in through lo must not be copied again.
        ruleset += f"""
table ip {DUP_TABLE} {{
	chain to_client {{
		type filter hook prerouting priority 0;
		iifname "{net.cli_if}" numgen random mod {DUP_SCALE} < {threshold} counter dup to 127.0.0.1 device "lo"
	}}
	chain from_client {{
		type filter hook output priority 0;
		oifname "{net.cli_if}" numgen random mod {DUP_SCALE} < {threshold} counter dup to {net.srv_ip} device "{net.cli_if}"
	}}
}}
"""
    _in_client(net, ["nft", "-f", "-"], input=ruleset.encode())


def link_fault_counters(net: testnet.TestNet) -> dict[str, int]:
    """Frames the client-side rules dropped and duplicated so far."""
    counters = {}
    loss = testnet.status(net)["loss"]
    if loss is not None:
        counters["nft_lost_to_client"] = loss["dropped_to_client"]
        counters["nft_lost_from_client"] = loss["dropped_from_client"]
    listing = json.loads(_in_client(net, ["nft", "-j", "list", "ruleset", "ip"]).stdout)["nftables"]
    for item in listing:
        rule = item.get("rule")
        if rule and rule["table"] == DUP_TABLE:
            packets = next(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
            counters[f"nft_duplicated_{rule['chain']}"] = packets
    return counters


def kernel_counters(net: testnet.TestNet) -> dict[str, int]:
    """The client kernel's IP/TCP counters (MIB names as in nstat)."""
    text = _in_client(net, ["cat", "/proc/net/snmp", "/proc/net/netstat"]).stdout.decode()
    lines = text.splitlines()
    values = {}
    for names, numbers in zip(lines[0::2], lines[1::2]):
        group, _, names = names.partition(": ")
        for name, number in zip(names.split(), numbers.split(": ", 1)[1].split()):
            values[f"{group}.{name}"] = int(number)
    return values


def counter_deltas(before: dict, after: dict, names=KERNEL_COUNTERS) -> dict[str, int]:
    return {name: after.get(name, 0) - before.get(name, 0) for name in names}


def mac_of(ns: str, ifname: str) -> bytes:
    (link,) = json.loads(subprocess.run(["ip", "-n", ns, "-j", "link", "show", "dev", ifname],
                                        check=True, capture_output=True).stdout)
    return bytes.fromhex(link["address"].replace(":", ""))


def _in_client(net: testnet.TestNet, argv, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", "netns", "exec", net.cli_ns, *argv], capture_output=True, **kwargs)
    if result.returncode != 0:
        raise FaultRunError(f"`{' '.join(argv)}` in {net.cli_ns} failed: {result.stderr.decode().strip()}")
    return result


# --- programs ------------------------------------------------------------------


class ShimProgram:
    """A program under `mtcpshim run` on the private network, in its own
    session so that a stuck one can be killed with everything it started."""

    def __init__(self, net: testnet.TestNet, argv, log_path, impair: str | None = None):
        self.net = net
        self.log_path = pathlib.Path(log_path)
        self._log = open(self.log_path, "wb")
        options = ["--netns", net.srv_ns, "--iface", net.srv_if] + (["--impair", impair] if impair else [])
        self.proc = subprocess.Popen([sys.executable, "-m", "mtcpshim.cli", "run", *options, "--", *argv],
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def stack_process(self) -> psutil.Process | None:
        """The stack process the launcher started (its child running stackd)."""
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return None
        return next((c for c in children if "mtcpshim.stackd" in " ".join(c.cmdline())), None)

    def stats(self) -> dict:
        return stack_snapshot(self.net.srv_ns, self.net.srv_if)

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise FaultRunError(f"{self.proc.args[-1]} under the stack did not finish within {timeout:.0f} s") from None

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def stack_snapshot(netns: str, iface: str) -> dict:
    """`mtcpshim stat` of the stack serving iface, plus its peak resident
    memory so far (VmHWM, KiB)."""
    snapshot = stat.fetch(netns, iface)
    status = pathlib.Path(f"/proc/{snapshot['pid']}/status").read_text()
    snapshot["peak_rss_kib"] = int(next(line.split()[1] for line in status.splitlines()
                                        if line.startswith("VmHWM:")))
    return snapshot


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise FaultRunError(f"timed out after {timeout:.0f} s waiting for {what}")


def curl_in_client(net: testnet.TestNet, url: str, output: str = "/dev/null", timeout: float = 5,
                   extra=()) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", net.cli_ns, "curl", "-sS", "--fail", "-m", str(timeout),
                           *extra, "-o", output, url], capture_output=True, timeout=timeout + 10)


def lighttpd_config(workdir: pathlib.Path, docroot: pathlib.Path, extra_ports=(), listen_backlog=1024) -> pathlib.Path:
    conf = workdir / "lighttpd.conf"
    listeners = "".join(f'$SERVER["socket"] == "0.0.0.0:{port}" {{ }}\n' for port in extra_ports)
    conf.write_text(f"""
server.document-root = "{docroot}"
server.port = {SERVER_PORT}
server.bind = "0.0.0.0"
server.errorlog = "{workdir / 'lighttpd-error.log'}"
server.max-keep-alive-requests = 100000
server.listen-backlog = {listen_backlog}
mimetype.assign = (".bin" => "application/octet-stream", ".txt" => "text/plain")
{listeners}""")
    return conf


@contextlib.contextmanager
def shim_lighttpd(net: testnet.TestNet, docroot: pathlib.Path, workdir: pathlib.Path, impair: str | None = None,
                  extra_ports=(), listen_backlog=1024):
    """lighttpd under the stack, answering on the stack's address at
    SERVER_PORT and `extra_ports`; 1024 is lighttpd's own default backlog."""
    if shutil.which("lighttpd") is None:
        raise FaultRunError("lighttpd is not installed")
    (docroot / "ping.txt").write_bytes(b"pong\n")
    server = ShimProgram(net, ["lighttpd", "-D", "-f", str(lighttpd_config(workdir, docroot, extra_ports, listen_backlog))],
                         workdir / "lighttpd-launcher.log", impair)
    try:
        wait_until(lambda: server.proc.poll() is not None or curl_in_client(
            net, f"http://{net.srv_ip}:{SERVER_PORT}/ping.txt", timeout=2).returncode == 0,
            STACK_START_TIMEOUT, "lighttpd to answer over the stack")
        if server.proc.poll() is not None:
            raise FaultRunError(f"lighttpd under the stack exited: {server.output().strip()[-300:]}")
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def kernel_http_server(net: testnet.TestNet, docroot: pathlib.Path, log_path):
    """python3 -m http.server on the client's kernel stack."""
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            ["ip", "netns", "exec", net.cli_ns, sys.executable, "-m", "http.server", str(KERNEL_HTTP_PORT),
             "--bind", net.cli_ip, "--directory", str(docroot)], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: curl_in_client(net, f"http://{net.cli_ip}:{KERNEL_HTTP_PORT}/",
                                              timeout=2).returncode == 0, 20, "python3 -m http.server")
            yield f"http://{net.cli_ip}:{KERNEL_HTTP_PORT}"
        finally:
            server.terminate()
            server.wait(10)


# --- transfers -------------------------------------------------------------------


def make_body(path: pathlib.Path, size: int, seed: int = 1) -> str:
    """A file of `size` pseudo-random bytes; returns its sha256."""
    import random
    rng, digest = random.Random(seed), hashlib.sha256()
    with open(path, "wb") as out:
        left = size
        while left:
            chunk = rng.randbytes(min(left, 1 << 20))
            digest.update(chunk)
            out.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as data:
        while chunk := data.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass
class Transfer:
    direction: str              # "stack sends" or "stack receives"
    size: int
    seconds: float
    sha256_sent: str
    sha256_received: str
    stack_counters: dict        # `mtcpshim stat` snapshot at the end
    kernel_counters: dict       # client kernel counter deltas
    link_counters: dict         # nftables loss/duplication counters at the end

    @property
    def exact(self) -> bool:
        return self.sha256_sent == self.sha256_received

    @property
    def megabytes_per_second(self) -> float:
        return self.size / self.seconds / 1e6


def stack_sends(net, docroot: pathlib.Path, name: str, workdir: pathlib.Path,
                impair: str | None = None, timeout: float = 300) -> Transfer:
    """lighttpd under the stack serves docroot/name; curl on the client's
    kernel downloads it."""
    received = workdir / f"received-{name}"
    with shim_lighttpd(net, docroot, workdir, impair) as server:
        before = kernel_counters(net)
        result = curl_in_client(net, f"http://{net.srv_ip}:{SERVER_PORT}/{name}", str(received), timeout,
                                extra=("-w", "%{time_total}"))
        if result.returncode != 0:
            raise FaultRunError(f"download from the stack failed: {result.stderr.decode().strip()}")
        seconds = float(result.stdout)
        stack_counters = server.stats()
        kernel = counter_deltas(before, kernel_counters(net))
    return _finish("stack sends", docroot / name, received, seconds, stack_counters, kernel, net)


def stack_receives(net, kernel_url: str, docroot: pathlib.Path, name: str, workdir: pathlib.Path,
                   impair: str | None = None, timeout: float = 300) -> Transfer:
    """curl under the stack downloads docroot/name from the client's kernel
    http.server; the stack's counters are read (by a program under the same
    stack) before it exits."""
    received, stat_file, time_file = (workdir / f"received-{name}", workdir / "stack-stat.json",
                                      workdir / "curl-seconds")
    snapshot = (f"import json, sys; sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r}); "
                f"import faultnet; print(json.dumps(faultnet.stack_snapshot({net.srv_ns!r}, {net.srv_if!r})))")
    script = (f"curl -sS --fail -m {timeout:.0f} -w '%{{time_total}}' -o {received} {kernel_url}/{name}"
              f" > {time_file} || exit 1; exec {sys.executable} -c \"{snapshot}\" > {stat_file}")
    before = kernel_counters(net)
    client = ShimProgram(net, ["sh", "-c", script], workdir / "curl-launcher.log", impair)
    status = client.wait(timeout + 30)
    if status != 0:
        raise FaultRunError(f"download by the stack failed (status {status}): {client.output().strip()[-300:]}")
    client.stop()
    kernel = counter_deltas(before, kernel_counters(net))
    return _finish("stack receives", docroot / name, received, float(time_file.read_text()),
                   json.loads(stat_file.read_text()), kernel, net)


def _finish(direction, sent: pathlib.Path, received: pathlib.Path, seconds, stack_counters, kernel, net):
    transfer = Transfer(direction, received.stat().st_size, seconds, sha256_of(sent), sha256_of(received),
                        stack_counters, kernel, link_fault_counters(net))
    received.unlink()
    return transfer


# Counters of a stat snapshot that count traffic handled, not dropped.
NOT_DROPS = {"rx_frames", "tx_frames", "arp_request_rx", "arp_reply_rx", "arp_request_tx", "arp_reply_tx",
             "icmp_echo", "icmp_frag_needed", "tcp_pmtu_lowered", "tcp_syncookies_sent",
             "tcp_syncookies_accepted"}


def stack_drop_counters(snapshot: dict) -> dict[str, int]:
    """The drop, error and fault counters of a `mtcpshim stat` snapshot, flat."""
    flat = {}
    for section in ("packet_io", "interface", "tcp"):
        for name, value in (snapshot.get(section) or {}).items():
            if value and name not in NOT_DROPS:
                flat[name] = value
    return flat


@contextlib.contextmanager
def packet_socket(net: testnet.TestNet):
    """An AF_PACKET socket on the client's veth, for frames built by hand."""
    import socket
    with enter_netns(net.cli_ns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        sock.bind((net.cli_if, 0))
        yield sock
    finally:
        sock.close()
