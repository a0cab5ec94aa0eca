"""One stack worker per core (`mtcpshim run --cores 2`) under real programs,
with the kernel as the peer: connections spread over both workers and each
flow's frames reach only its own (every worker counts the segments it gets
of another's flows: `tcp_rx_other_worker`), forked servers on both cores,
active opens from both cores, and sockets bound before connect."""
import os
import struct
import subprocess

import psutil
import pytest

from mtcpshim import stat
from mtcpshim.stack.io.steer import worker_of_ports
from support.net import KERNEL_HTTP_PORT, NET, SERVER_URL, in_client
from support.programs import mtcpshim_command, shim_lighttpd
from support.transfers import make_body, sha256_of

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")

WORKERS = 2
CONNECTIONS = 24
ETHERTYPE_IPV4, PROTO_TCP, SYN, ACK = 0x0800, 6, 0x02, 0x10


def syns_in(capture) -> list[tuple[int, int]]:
    """(source port, destination port) of every SYN without ACK in a pcap
    file, in the order they were written."""
    data = capture.read_bytes()
    syns, at = [], 24                              # past the file header
    while at + 16 <= len(data):
        captured = struct.unpack_from("<I", data, at + 8)[0]
        frame = data[at + 16:at + 16 + captured]
        at += 16 + captured
        if len(frame) < 54 or struct.unpack_from("!H", frame, 12)[0] != ETHERTYPE_IPV4 or frame[23] != PROTO_TCP:
            continue
        tcp = 14 + (frame[14] & 0xF) * 4
        if frame[tcp + 13] & (SYN | ACK) == SYN:
            syns.append(struct.unpack_from("!HH", frame, tcp))
    return syns


def test_connections_spread_over_both_workers_and_forked_servers_on_both_cores_serve_them(
        test_network, docroot, tmp_path):
    body = docroot / "cores.bin"
    make_body(body, 300_000, seed=14)
    with shim_lighttpd(docroot, tmp_path, options=["--cores", "2"], config="server.max-worker = 2") as server:
        workers = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
                   if p.name() == "lighttpd" and p.parent().name() == "lighttpd"]
        assert len(workers) == 2
        for cpu, worker in enumerate(workers):       # one forked server on each core
            worker.cpu_affinity([cpu])
        before = stat.fetch(NET.srv_ns, NET.srv_if)["workers"]
        for i in range(CONNECTIONS):
            out = tmp_path / f"got{i}.bin"
            result = in_client(["curl", "-sS", "--fail", "-o", str(out), f"{SERVER_URL}/cores.bin"])
            assert result.returncode == 0, result.stderr.decode()
            assert sha256_of(out) == sha256_of(body)
        after = stat.fetch(NET.srv_ns, NET.srv_if)
    assert [worker["worker"] for worker in after["workers"]] == [0, 1]
    opened = [w["tcp"].get("tcp_passive_opens", 0) - b["tcp"].get("tcp_passive_opens", 0)
              for b, w in zip(before, after["workers"])]
    assert sum(opened) == CONNECTIONS and all(opened), opened     # both workers took connections
    assert [w["tcp"].get("tcp_rx_other_worker", 0) for w in after["workers"]] == [0, 0]
    assert after["tcp"]["tcp_passive_opens"] == sum(w["tcp"]["tcp_passive_opens"] for w in after["workers"])


def test_active_opens_from_both_cores_take_ports_that_steer_home(kernel_url, docroot, tmp_path):
    """Curl i runs on core i % 2: its socket is that core's worker's, and
    the port it opens from steers the replies back there."""
    capture = tmp_path / "client.pcap"
    script = " && ".join(f"taskset -c {i % 2} curl -sS --fail -o {tmp_path}/got{i}.bin {kernel_url}/small.txt"
                         for i in range(8))
    result = subprocess.run(mtcpshim_command("run", "--cores", "2", "--pcap", str(capture), "--", "sh", "-c", script),
                            capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    assert all((tmp_path / f"got{i}.bin").read_bytes() == (docroot / "small.txt").read_bytes() for i in range(8))
    syns = [(port, to) for port, to in syns_in(capture) if to == KERNEL_HTTP_PORT]
    assert len(syns) == 8, syns
    assert [worker_of_ports(port, to, WORKERS) for port, to in syns] == [i % 2 for i in range(8)]


def test_a_socket_bound_before_connect_moves_to_the_worker_its_port_steers_to(kernel_url, docroot, tmp_path):
    """curl --local-port binds, then connects: half the ports steer to the
    other core's worker, and the socket must move there."""
    ports = range(45000, 45008)
    assert {worker_of_ports(port, KERNEL_HTTP_PORT, WORKERS) for port in ports} == {0, 1}
    script = " && ".join(f"taskset -c 0 curl -sS --fail --local-port {port} -o {tmp_path}/got{port}.bin "
                         f"{kernel_url}/small.txt" for port in ports)
    result = subprocess.run(mtcpshim_command("run", "--cores", "2", "--", "sh", "-c", script),
                            capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    assert all((tmp_path / f"got{port}.bin").read_bytes() == (docroot / "small.txt").read_bytes() for port in ports)
