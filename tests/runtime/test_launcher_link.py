"""The launcher and the stack over their socket pair: the launcher's end
closing stops the stack; `detach`, sent when the program exits, is answered
`stopping` if none of its processes is left, else `serving PID...`, and the
stack then serves until the last of them ends."""
import os
import socket

import pytest

from mtcpshim._shm import ffi, lib


@pytest.fixture
def launcher(world):
    ours, world.runtime.launcher = socket.socketpair()
    world.runtime.launcher.setblocking(False)
    world.runtime._poller.register(world.runtime.launcher.fileno())  # as the runtime does with launcher_fd
    ours.settimeout(5)
    yield ours
    ours.close()


def housekeeping(world):
    world.now += world.runtime.HOUSEKEEPING_INTERVAL
    world.runtime.step(world.now)


def send_registration(world, pid):
    """What the interposer sends for a process (not yet read by the stack)."""
    table, pidfd = os.memfd_create("table"), os.pidfd_open(pid)
    msg = ffi.new("struct mts_ctl_msg *", {"op": lib.MTS_CTL_REGISTER_PROCESS, "id": pid, "arg": 64})
    socket.send_fds(world.ctl_app, [ffi.buffer(msg)[:]], [table, pidfd])
    lib.mts_ctl_post(world.g, 0)
    os.close(table)
    os.close(pidfd)


def detach(world, launcher):
    """The program has exited: `detach` with the log, and the stack's answer."""
    log_r, log_w = os.pipe()
    socket.send_fds(launcher, [b"detach\n"], [log_w])
    os.close(log_w)
    housekeeping(world)
    return launcher.recv(256).decode(), log_r


def test_the_launcher_s_end_closing_stops_the_stack(world, launcher, capsys):
    launcher.close()
    housekeeping(world)
    assert world.runtime.stopping and "the launcher is gone" in capsys.readouterr().err


def test_a_program_that_left_no_process_stops_the_stack(world, launcher):
    answer, log_r = detach(world, launcher)
    assert answer == "stopping\n"
    assert world.runtime.stopping and not world.runtime.detached
    os.close(log_r)


def test_a_process_the_program_left_keeps_the_stack_serving_until_it_ends(world, launcher, capsys):
    """The daemon's registration may still wait unread on the control socket
    when the launcher says `detach`: it counts."""
    go_r, go_w = os.pipe()
    daemon = os.fork()
    if daemon == 0:
        os.close(go_w)
        os.read(go_r, 1)
        os._exit(0)
    os.close(go_r)
    send_registration(world, daemon)
    handed = []
    world.runtime.on_detach = lambda log_fd: handed.append(os.dup(log_fd))
    try:
        answer, log_r = detach(world, launcher)
        assert answer == f"serving {daemon}\n"
        assert world.runtime.detached and not world.runtime.stopping
        assert len(handed) == 1 and os.fstat(handed[0]).st_ino == os.fstat(log_r).st_ino
        housekeeping(world)
        assert not world.runtime.stopping
    finally:
        os.close(go_w)
        os.waitpid(daemon, 0)
    housekeeping(world)
    assert world.runtime.stopping
    assert "the program's last process ended: stopping" in capsys.readouterr().err
    for fd in handed + [log_r]:
        os.close(fd)
