"""One private test network and one stack for the whole conformance run:
peer_server.py under `mtcpshim run` serves the echo, bulk and sink ports,
and each test drives its own Probe connection against it.  Everything is
stopped by pid and the network removed at the end."""
import itertools
import pathlib
import random
import sys

import pytest

from probe import RST, Probe
from support.net import private_network
from support.programs import STACK_START_TIMEOUT, ShimProgram, wait_until

HERE = pathlib.Path(__file__).resolve().parent


class ServerUnderTest:
    """peer_server.py under the stack, and its connection log."""

    def __init__(self, program: ShimProgram, log_path: pathlib.Path):
        self.program = program
        self.log_path = log_path

    def events(self, peer_port: int) -> list[str]:
        """The server's events for the connection from `peer_port`, in order."""
        events = []
        for line in self.log_path.read_text().splitlines():
            _, peer, event = line.split(" ", 2)
            if int(peer) == peer_port:
                events.append(event)
        return events

    def wait_for_event(self, peer_port: int, event: str, timeout: float = 5.0) -> None:
        wait_until(lambda: event in self.events(peer_port), timeout,
                   f"the server to log {event!r} for port {peer_port}")

    def bytes_read(self, peer_port: int) -> int:
        return sum(int(event.split()[1]) for event in self.events(peer_port) if event.startswith("read "))


@pytest.fixture(scope="session")
def conformance_net(needs_root):
    # The probe counts the stack's segments one per frame, as on a wire (not 64 KB TSO frames).
    with private_network(offloads=False) as net:
        yield net


@pytest.fixture(scope="session")
def server(conformance_net, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("conformance")
    log_path = workdir / "server-events.log"
    log_path.touch()
    program = ShimProgram([sys.executable, str(HERE / "peer_server.py"), str(log_path)], workdir / "launcher.log",
                          conformance_net)
    try:
        wait_until(lambda: program.proc.poll() is not None or "listening" in log_path.read_text(),
                   STACK_START_TIMEOUT, "peer_server.py to listen under the stack")
        if program.proc.poll() is not None:
            pytest.fail(f"peer_server.py under the stack exited: {program.output().strip()[-500:]}")
        yield ServerUnderTest(program, log_path)
    finally:
        program.stop()


# Each probe gets a source port of its own, so no test meets a connection
# an earlier one left in the stack.
_source_ports = itertools.count(random.randrange(20000, 50000))


@pytest.fixture
def open_probe(conformance_net, server):
    """open_probe(port) -> a Probe aimed at the server's `port`; closed after the test."""
    probes = []

    def make(port: int) -> Probe:
        probe = Probe(conformance_net, next(_source_ports), port)
        probes.append(probe)
        return probe

    yield make
    for probe in probes:
        # Leave nothing behind in the stack: an exact RST ends the
        # connection if the test left it open, and is ignored otherwise.
        probe.send(RST, ack=0)
        probe.close()
    if server.program.proc.poll() is not None:
        pytest.fail(f"the stack exited during the test: {server.program.output().strip()[-500:]}")
