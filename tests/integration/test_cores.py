"""One stack worker per core (`mtcpshim run --cores 2`) under real programs,
with the kernel as the peer: connections spread over both workers, each
flow's frames seen by one worker only (each worker writes its own capture,
--pcap's PATH and PATH.1), forked servers on both cores, active opens from
both cores, and sockets bound before connect."""
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
ETHERTYPE_IPV4, PROTO_TCP = 0x0800, 6


def flows_in(capture) -> dict[tuple[int, int], int]:
    """TCP frames in a pcap file by flow, a flow named by its two ports
    (lowest first): the stack's address is the same in every flow here."""
    data = capture.read_bytes()
    flows: dict[tuple[int, int], int] = {}
    at = 24                                        # the file header
    while at + 16 <= len(data):
        captured = struct.unpack_from("<I", data, at + 8)[0]
        frame = data[at + 16:at + 16 + captured]
        at += 16 + captured
        if len(frame) < 38 or struct.unpack_from("!H", frame, 12)[0] != ETHERTYPE_IPV4 or frame[23] != PROTO_TCP:
            continue
        ihl = (frame[14] & 0xF) * 4
        ports = struct.unpack_from("!HH", frame, 14 + ihl)
        key = (min(ports), max(ports))
        flows[key] = flows.get(key, 0) + 1
    return flows


def assert_each_flow_on_its_own_worker(capture):
    by_worker = [flows_in(capture), flows_in(capture.with_name(capture.name + ".1"))]
    assert all(by_worker), f"a worker saw no flow: {[len(flows) for flows in by_worker]}"
    assert not by_worker[0].keys() & by_worker[1].keys(), "a flow's frames reached both workers"
    for worker, flows in enumerate(by_worker):
        assert all(worker_of_ports(a, b, WORKERS) == worker for a, b in flows), (worker, sorted(flows))
    return by_worker


def test_connections_spread_over_both_workers_and_forked_servers_on_both_cores_serve_them(
        test_network, docroot, tmp_path):
    body = docroot / "cores.bin"
    make_body(body, 300_000, seed=14)
    capture = tmp_path / "stack.pcap"
    with shim_lighttpd(docroot, tmp_path, options=["--cores", "2", "--pcap", str(capture)],
                       config="server.max-worker = 2") as server:
        workers = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
                   if p.name() == "lighttpd" and p.parent().name() == "lighttpd"]
        assert len(workers) == 2
        for cpu, worker in enumerate(workers):       # one forked server on each core
            worker.cpu_affinity([cpu])
        for i in range(CONNECTIONS):
            out = tmp_path / f"got{i}.bin"
            result = in_client(["curl", "-sS", "--fail", "-o", str(out), f"{SERVER_URL}/cores.bin"])
            assert result.returncode == 0, result.stderr.decode()
            assert sha256_of(out) == sha256_of(body)
        snapshot = stat.fetch(NET.srv_ns, NET.srv_if)
    assert [worker["worker"] for worker in snapshot["workers"]] == [0, 1]
    assert snapshot["interface"]["rx_frames"] == sum(w["interface"]["rx_frames"] for w in snapshot["workers"])
    flows = assert_each_flow_on_its_own_worker(capture)
    assert sum(len(f) for f in flows) >= CONNECTIONS


def test_active_opens_from_both_cores_take_ports_that_steer_home(kernel_url, docroot, tmp_path):
    capture = tmp_path / "client.pcap"
    script = " && ".join(f"taskset -c {i % 2} curl -sS --fail -o {tmp_path}/got{i}.bin {kernel_url}/small.txt"
                         for i in range(8))
    result = subprocess.run(mtcpshim_command("run", "--cores", "2", "--pcap", str(capture), "--", "sh", "-c", script),
                            capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    assert all((tmp_path / f"got{i}.bin").read_bytes() == (docroot / "small.txt").read_bytes() for i in range(8))
    flows = assert_each_flow_on_its_own_worker(capture)
    assert all(KERNEL_HTTP_PORT in ports for worker in flows for ports in worker)


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
