"""The stack thread's loop: shared-memory commands and packets in, segments
and readiness out.

One iteration (`step`): waiter registrations (waiters.py) -> the program's
commands (sockets.py) -> a batch of received frames into the node
(stack/node.py) -> timers -> housekeeping every 0.1 s (statistics, the
launcher's link, lost commands, processes that ended) -> resets of sockets
found corrupt -> one flush of transmitted frames -> readiness published
once per touched socket (mTCP's flow-level event aggregation) -> armed
waiters woken once.  When nothing is left to do the thread announces it is
sleeping, re-checks the command queue, and sleeps in poll() on the NIC, the
wake eventfd, the control socket, the launcher's link, the program's
processes and the statistics socket until the next timer.

The region is a trust boundary: what the stack reads there is checked in
sockets.py and waiters.py, against the stack's private geometry
(region.geom), before use.

With `mtcpshim run --cores N` each of N worker processes runs this loop
over its own slots, command queue, control socket and packet sockets;
`worker` is its index, and `wake_fds` every worker's wake eventfd, for the
commands it queues to the others (a listener it owns has closed).
"""
from __future__ import annotations

import collections
import contextlib
import os
import platform
import resource
import select
import socket
import sys
import time

from mtcpshim import stat
from mtcpshim._shm import lib
from mtcpshim.processes import Processes
from mtcpshim.sockets import SocketTable
from mtcpshim.stacklog import log
from mtcpshim.waiters import Waiters
from mtcpshim.stack.node import Node
from mtcpshim.stack.tcp import TcpState

RX_BATCH = 64

_POLL_TROUBLE = select.POLLERR | select.POLLHUP | select.POLLNVAL
_MAX_SLEEP_MS = 60_000  # a far deadline is re-read after this long anyway
_IDLE_LOOK_MS = 1000


class Runtime:
    def __init__(self, region, packet_io, node: Node, ctl_fd: int, wake_fd: int,
                 pcap=None, spin_seconds: float = 0.0, stats_listener: socket.socket | None = None,
                 launcher_fd: int | None = None, on_detach=None, worker: int = 0,
                 wake_fds: tuple[int, ...] | None = None):
        self.region = region
        self.worker = worker
        self._wake_fds = wake_fds if wake_fds is not None else (wake_fd,)
        self.header = region.header
        self.geom = region.geom
        self.io = packet_io
        self.node = node
        self.iface, self.host = node.iface, node.host
        self.pcap = pcap
        self.spin_seconds = spin_seconds
        self.wake_fd = wake_fd
        self.shm_counters = collections.Counter()  # what the program wrote that was refused
        self.processes = Processes(self.geom, worker)
        self.waiters = Waiters(self.geom, ctl_fd, self.shm_counters, self.processes, worker)
        self.sockets = SocketTable(self.geom, node, self.waiters, self.shm_counters, region.release_rings,
                                   gathers=packet_io.gathers_payload and pcap is None, worker=worker,
                                   tell_workers=self._tell_workers if self.geom.nworkers > 1 else None)
        lib.mts_worker_at(self.geom, worker).pid = os.getpid()
        self.stopping = False
        self.counters = {"loops": 0, "sleeps": 0, "wake_reads": 0}
        self.stats_listener = stats_listener
        self._next_housekeeping = 0.0
        self._signal_r, signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._signal_w = signal_w
        self._poller = select.poll()
        self._io_fds = packet_io.filenos()
        self.fault = None  # why the stack stopped on its own, if it did
        self._device_down = False  # reported down, still there: looked at again until frames return
        self._truncation_reported = False
        for fd in (*self._io_fds, wake_fd, ctl_fd, self._signal_r, self.processes.fileno()):
            self._poller.register(fd, select.POLLIN)
        self.launcher = socket.socket(fileno=launcher_fd) if launcher_fd is not None else None
        if self.launcher is not None:
            self.launcher.setblocking(False)
            self._poller.register(launcher_fd, select.POLLIN)
        self.detached = False  # the program exited and the launcher returned: serving what it left
        self.on_detach = on_detach  # on_detach(log_fd): the process leaves the launcher's terminal and output
        if stats_listener is not None:
            stats_listener.setblocking(False)
            self._poller.register(stats_listener.fileno(), select.POLLIN)
        node.iface.announce()  # neighbours may remember another MAC for our address

    @property
    def signal_fd(self) -> int:
        """Write end for signal.set_wakeup_fd: a signal ends the sleep."""
        return self._signal_w

    # -- the loop ----------------------------------------------------------

    def run(self, until=None) -> None:
        """Serves until stopped (SIGTERM) or until `until()` turns true."""
        clock = time.monotonic
        idle_since = None
        while not self.stopping and not (until is not None and until()):
            now = clock()
            if self.step(now):
                idle_since = None
                continue
            if idle_since is None:
                idle_since = now
            if now - idle_since < self.spin_seconds:
                continue
            self._sleep(clock(), max_ms=-1 if until is None else 50)
            idle_since = None

    def step(self, now: float) -> bool:
        """One iteration of the loop; True if there was input to handle."""
        self.counters["loops"] += 1
        busy = self.waiters.receive() | self.sockets.execute_commands(now) | self._receive(now)
        self.node.on_timers(now)
        if now >= self._next_housekeeping:
            self._housekeeping(now)
        self._output(now)
        if self.sockets.corrupt_pending:  # found while publishing: the resets go out now
            self._output(now)
        return busy

    HOUSEKEEPING_INTERVAL = 0.1  # seconds between looks at the stats socket, the launcher, lost commands

    def _housekeeping(self, now: float) -> None:
        self._next_housekeeping = now + self.HOUSEKEEPING_INTERVAL
        if self.stats_listener is not None:
            stat.serve(self.stats_listener, self.stats)
        self._hear_launcher()
        if self._device_down:
            self._device_trouble()     # gone by now, or still only down
        self.waiters.look()            # a registration sent without being counted
        self._bury_ended_processes(now)
        self.sockets.recover_lost_tx(now)
        if not self._truncation_reported:
            self._report_truncation()

    def _bury_ended_processes(self, now: float) -> None:
        """What a killed process held is closed, as the kernel closes it at
        exit; its waiters go too."""
        ended, closed = self.processes.reap()
        for pid in ended:
            self.waiters.free_owned_by(pid)
        for slot_id in closed:
            self.sockets.close_abandoned(slot_id, now)
        if ended and self.detached:
            self._take_registrations()
            if not self.processes:
                log("the program's last process ended: stopping")
                self.stopping = True

    def _take_registrations(self) -> None:
        """A process registers the child it forks before fork returns: once
        it is seen to have ended, what it registered is on the control
        socket, and read now."""
        self.waiters.look()
        self.waiters.receive()

    def _report_truncation(self) -> None:
        """Frames too large for the packet I/O's slots are lost: say so once
        (`mtcpshim stat` counts every one)."""
        if hasattr(self.io, "counters") and self.io.counters().get("rx_truncated"):
            self._truncation_reported = True
            log("received frames larger than the packet ring's slots are dropped (rx_truncated): "
                 "lower the sender's gso_max_size or the interface's GRO size")

    def _output(self, now: float) -> None:
        if self.sockets.corrupt_pending:
            self.sockets.reset_corrupt(now)
        self._transmit(now)
        self.sockets.publish()

    def close(self) -> None:
        """Lets go of the descriptors the runtime made or was handed: the
        signal pipe, the control socket and the waiters' eventfds."""
        self.waiters.close()
        self.processes.close()
        os.close(self._signal_r)
        os.close(self._signal_w)

    def close_all(self, deadline: float) -> None:
        """The program is gone: close what it left open, as the kernel does
        at exit, and serve until those connections finish or `deadline`."""
        self.header.stack_state = lib.MTS_STACK_STOPPED
        self.sockets.close_all(time.monotonic())
        self.stopping = False
        finished = (TcpState.TIME_WAIT, TcpState.CLOSED)
        self.run(until=lambda: time.monotonic() > deadline or all(
            conn.state in finished for conn in self.host.connections.values()))

    def _sleep(self, now: float, max_ms: int) -> None:
        if not lib.mts_stack_try_sleep(self.geom, self.worker, self.sockets.cmd_position):
            return
        deadline = self._next_deadline()
        timeout = -1 if deadline is None else min(max(0, int((deadline - now) * 1000) + 1), _MAX_SLEEP_MS)
        if self.sockets and (timeout < 0 or timeout > _IDLE_LOOK_MS):
            timeout = _IDLE_LOOK_MS  # housekeeping finds lost commands even when all is quiet
        if max_ms >= 0 and (timeout < 0 or timeout > max_ms):
            timeout = max_ms
        self.counters["sleeps"] += 1
        for fd, events in self._poller.poll(timeout):
            if fd in self._io_fds and events & _POLL_TROUBLE:
                self._device_trouble()
            elif fd == self.wake_fd:
                _drain_eventfd(fd)
                self.counters["wake_reads"] += 1
            elif fd == self.waiters.fileno():
                self.waiters.look()
            elif fd == self._signal_r:
                os.read(fd, 64)
            elif fd == self.processes.fileno() or (self.stats_listener is not None
                                                   and fd == self.stats_listener.fileno()):
                self._next_housekeeping = 0.0
            elif self.launcher is not None and fd == self.launcher.fileno():
                self._hear_launcher()
        lib.mts_stack_awake(self.geom, self.worker)

    def _tell_workers(self, op: int, slot_id: int, generation: int, arg: int) -> None:
        """Queues a command to every other worker, as a program's thread
        would, and wakes those asleep."""
        for worker, wake_fd in enumerate(self._wake_fds):
            if worker == self.worker:
                continue
            if lib.mts_cmd_push(self.geom, worker, op, slot_id, generation, arg) != 0:
                self.shm_counters["worker_queue_full"] += 1  # the program filled it: its listener stays there
                continue
            if lib.mts_worker_at(self.geom, worker).sleeping:
                os.write(wake_fd, _EVENTFD_ONE)

    def _next_deadline(self):
        io_deadline = getattr(self.io, "deadline", None)  # a fault injector's held frames
        deadlines = [d for d in (self.node.poll_at(), io_deadline() if io_deadline else None)
                     if d is not None]
        return min(deadlines) if deadlines else None

    def _device_trouble(self) -> None:
        reason = self.io.device_error()
        if reason is not None:
            log(f"{reason}: stopping")
            self.fault = reason
            self.stopping = True
        else:
            # Removing an interface takes it down first; the packet socket
            # reports that once, and maybe before the interface is gone.
            if not self._device_down:
                log("the interface went down: serving again once it is back up")
            self._device_down = True

    # -- packets ------------------------------------------------------------

    def _receive(self, now: float) -> bool:
        frames = self.io.recv_batch(RX_BATCH)
        if not frames:
            return False
        self._device_down = False          # up again
        if self.pcap is not None:
            stamp = time.time()
            for frame in frames:
                self.pcap.write(frame, stamp)
        self.node.ingest(frames, now, self.io.rx_vouched)
        return True

    def _transmit(self, now: float) -> None:
        frames = self.node.egress(now)
        if frames:
            if self.pcap is not None:
                stamp = time.time()
                for frame in frames:
                    self.pcap.write(frame, stamp)
            self.io.send_batch(frames)

    # -- statistics -----------------------------------------------------------

    def stats(self) -> dict:
        states = collections.Counter(conn.state.name for conn in self.host.connections.values())
        if self.host.time_waits:
            states["TIME_WAIT"] += len(self.host.time_waits)
        io_counters = self.io.counters() if hasattr(self.io, "counters") else {}
        return {
            "pid": os.getpid(),
            "worker": self.worker,
            "python": _PYTHON,
            "runtime": {**self.counters, "commands": self.sockets.commands,
                        "waiter_wakeups": self.waiters.wakeups, "rings_released": self.sockets.rings_released},
            "cost": self._cost(io_counters),
            "interface": dict(self.iface.counters),
            "packet_io": dict(io_counters),
            "tcp": dict(self.host.counters),
            "tcp_recovery": dict(self.host.recovery_counts),
            "congestion": self._congestion(),
            "connections": dict(states),
            "shm": dict(self.shm_counters),
            "slots_in_use": len(self.sockets),
            "sockets": self.sockets.census(),
            "waiters": len(self.waiters),
            "processes": {"sockets": self.processes.holdings(), "ended": self.processes.ended},
        }

    def _congestion(self) -> dict:
        """Open connections by algorithm, and the medians of BBR's model
        over them, as `ss -i` shows per socket."""
        figures = collections.Counter()
        bandwidths, min_rtts, windows = [], [], []
        for conn in self.host.connections.values():
            model = conn.congestion_model
            figures[f"connections_{model.name}"] += 1
            figures[f"{model.name}_mode_{getattr(model, 'mode', 'window')}"] += 1
            windows.append(conn.cwnd // max(conn.send_mss, 1))
            if model.name == "bbr" and model.min_rtt is not None:
                bandwidths.append(model.bandwidth)
                min_rtts.append(model.min_rtt)
        if windows:
            figures["cwnd_segments_median"] = sorted(windows)[len(windows) // 2]
        if bandwidths:
            figures["bbr_bandwidth_mbit_median"] = int(sorted(bandwidths)[len(bandwidths) // 2] * 8 / 1e6)
            figures["bbr_min_rtt_us_median"] = int(sorted(min_rtts)[len(min_rtts) // 2] * 1e6)
        return dict(figures)

    def _cost(self, io_counters: dict) -> dict:
        """The stack process's CPU since it started, per unit of work: what
        every lever of issue 11 is meant to move."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu_us = (usage.ru_utime + usage.ru_stime) * 1e6
        packets = self.iface.counters["rx_frames"] + self.iface.counters["tx_frames"]
        cost = {"cpu_ms": round(cpu_us / 1000)}
        for unit, count in (("packet", packets), ("command", self.sockets.commands),
                            ("loop", self.counters["loops"])):
            if count:
                cost[f"cpu_ns_per_{unit}"] = round(cpu_us * 1000 / count)
        if packets:
            cost["wakeups_per_1000_packets"] = round(self.waiters.wakeups * 1000 / packets)
            cost["sleeps_per_1000_packets"] = round(self.counters["sleeps"] * 1000 / packets)
            # The loop's own syscalls: packet sends, poll() to sleep, the
            # eventfd writes that wake the program and the reads of ours.
            # Received frames cost none (the packet ring is mapped).
            syscalls = (io_counters.get("tx_syscalls", 0) + self.counters["sleeps"]
                        + self.waiters.wakeups + self.counters["wake_reads"])
            cost["syscalls_per_1000_packets"] = round(syscalls * 1000 / packets)
        received = self.iface.counters["rx_frames"]
        if received:
            # Frames header prediction took whole (stack/fastpath.py).
            cost["fast_path_hit_percent"] = round(100 * self.host.counters.get("tcp_fast_path", 0) / received, 1)
        return cost

    # -- the launcher ---------------------------------------------------------

    def _hear_launcher(self) -> None:
        """The launcher says `program PID` once, and `detach` (with the log
        to write to) when the program has exited; its end of the link
        closing means it is gone, and so is the reason to serve."""
        if self.launcher is None:
            return
        try:
            data, fds, _, _ = socket.recv_fds(self.launcher, 256, 1)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        for line in data.decode(errors="replace").splitlines():
            word, _, pid = line.partition(" ")
            if word == "program" and pid.isdigit():
                self.sockets.program_pid = int(pid)
            elif word == "detach":
                self._detach(fds[0] if fds else None)
                fds = []
        for fd in fds:
            os.close(fd)
        if not data:
            log("the launcher is gone: stopping")
            self._poller.unregister(self.launcher.fileno())
            self.launcher.close()
            self.launcher = None
            self.stopping = True

    def _detach(self, log_fd: int | None) -> None:
        """The program has exited.  Processes it left (a daemon it forked)
        keep the stack serving, in a session of its own, with `log_fd` as
        its output, until the last of them ends; the launcher hears which
        (`serving PID...`) or that we stop (`stopping`)."""
        self._bury_ended_processes(time.monotonic())
        self._take_registrations()
        pids = self.processes.pids()
        if pids and log_fd is not None:
            if self.on_detach is not None:
                self.on_detach(log_fd)
            self.detached = True
            log(f"the program exited; serving its processes {' '.join(map(str, pids))} until they end")
        if log_fd is not None:
            os.close(log_fd)
        answer = f"serving {' '.join(map(str, pids))}" if self.detached else "stopping"
        with contextlib.suppress(OSError):
            self.launcher.sendall(f"{answer}\n".encode())
        if not self.detached:
            self.stopping = True


_PYTHON = f"{platform.python_implementation()} {platform.python_version()}"
_EVENTFD_ONE = (1).to_bytes(8, sys.byteorder)


def _drain_eventfd(fd: int) -> None:
    try:
        os.read(fd, 8)                     # an eventfd's counter, reset
    except BlockingIOError:
        pass
