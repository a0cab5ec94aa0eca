"""The interposer against the real stack (inprocess_stack.py): each test
runs one probe scenario (tests/preload/progs/probe.c) and reads its trace,
one call per line, "call result [ERRNO]"."""
import os
import socket

import pytest

from inprocess_stack import PROGRAM_TIMEOUT
from mtcpshim.shmbuf import ShmSendBuffer
from mtcpshim.stack.host import EPHEMERAL_PORTS


def test_without_the_stack_everything_stays_in_the_kernel(run_probe):
    trace = run_probe.run("passthrough", attached=False)
    assert "tcp_kernel 1 1 1" in trace
    assert "stack_listener_kernel 1" in trace


def _spin_logged(run_probe, cpus):
    """The spin a probe confined to `cpus` chose, with the stack (this
    process) confined there too."""
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        process = run_probe.start("passthrough", extra_env={"MTCPSHIM_DEBUG": "1"})
        _, err = process.communicate(timeout=PROGRAM_TIMEOUT)
    finally:
        os.sched_setaffinity(0, saved)
    (line,) = [line for line in err.splitlines() if "attached:" in line]
    return line.rsplit("spin ", 1)[1]


def test_waiting_spins_only_where_the_stack_can_run_meanwhile(run_probe):
    """Pinned to the stack's one CPU, spinning would only keep the stack from
    answering."""
    cpus = sorted(os.sched_getaffinity(0))
    assert _spin_logged(run_probe, {cpus[0]}) == "0 us"
    if len(cpus) > 1:
        assert _spin_logged(run_probe, set(cpus[:2])) == "20 us"


def test_nonblocking_handshake(run_probe):
    assert run_probe.run("handshake") == [
        "setsockopt_reuseaddr 0",
        "bind 0",
        "port_assigned 1",
        "listen 0",
        "accept -1 EAGAIN",
        "connect -1 EINPROGRESS",
        "poll_client 1",
        "revents OUT",
        "getsockopt_so_error 0",
        "so_error 0",
        "connect_again -1 EISCONN",
        "poll_listener 1",
        "revents IN",
        "accepted 1",
        "peer_is_client 1",
        "cloexec 1",
        "nonblock 1",
        "so_type_stream 1",
        "tcp_info 0",
        "tcpi_state_established 1",
        "setsockopt_nodelay 0",
        "setsockopt_congestion 0",
        "setsockopt_congestion_missing -1 ENOENT",
        "getsockopt_congestion 0",
        "congestion reno",
        "setsockopt_unknown -1 ENOPROTOOPT",
        "close_client 0",
        "close_accepted 0",
        "close_listener 0",
    ]
    run_probe.stack.settle()
    bind, listen, connect = run_probe.stack.log[:3]
    assert (bind, listen) == ("bind 0 port 0", "listen 0 backlog 16")
    # To the listener's port, which the stack drew from its ephemeral range (RFC 6056).
    assert connect.startswith("connect 1 port ") and int(connect.split()[-1]) in EPHEMERAL_PORTS
    assert "setopt 1 1" in run_probe.stack.log  # TCP_NODELAY reached the stack
    assert sorted(line for line in run_probe.stack.log if line.startswith("close")) == [
        "close 0", "close 1", "close 2"]


def test_read_write_and_their_variants(run_probe):
    assert run_probe.run("data") == [
        "write 5",
        "poll 1",
        "ioctl_fionread 0",
        "fionread 5",
        "recv_peek 3",
        "peeked hel",
        "read 5",
        "data hello",
        "writev 5",
        "poll 1",
        "readv 5",
        "data ab|cde",
        "recv_dontwait -1 EAGAIN",
        "write_big 300000",
        "read_big 300000 pattern_ok 1",
    ]


def test_so_sndbuf_bounds_what_a_send_queues(run_probe):
    assert run_probe.run("sndbuf") == [
        "setsockopt_sndbuf 0",
        "send_dontwait 8192",
        "write_rest 291808",
        "read 300000 pattern_ok 1",
    ]


def test_end_of_stream_and_shutdown(run_probe):
    assert run_probe.run("eof") == [
        "shutdown_wr 0",
        "read_eof 0",
        "send_nosignal -1 EPIPE",
        "sigpipes 0",
        "write -1 EPIPE",
        "sigpipes 1",
        "write_back 1",
        "read_back 1",
        "tcpi_state_close_wait 1",
        "close_server 0",
        "read_after_peer_close 0",
        "read_unconnected -1 ENOTCONN",
    ]


SENDFILE_TRACE = [     # large enough for the file to be registered (SPAN_REGISTER_MIN)
    "sendfile 300000",
    "offset 300000",
    "sendfile_position 299945",
    "file_position 300000",
    "received 599945 pattern_ok 1",
]


def test_sendfile_moves_a_file_through_the_tx_ring(run_probe):
    assert run_probe.run("sendfile") == SENDFILE_TRACE


def test_sendfile_leaves_the_bytes_in_the_file_where_the_stack_takes_spans(run_probe, stack, monkeypatch):
    records = []
    read_spans = ShmSendBuffer._read_spans

    def counting(buffer, seen, head):
        before = buffer._spans_read
        result = read_spans(buffer, seen, head)
        records.append((buffer._spans_read - before) & 0xFFFFFFFF)
        return result

    monkeypatch.setattr(ShmSendBuffer, "_read_spans", counting)
    monkeypatch.setattr(stack.sockets, "gathers", True)   # as over a packet socket with vnet headers
    files_before = stack.runtime.shm_counters["sendfile_files"]
    assert run_probe.run("sendfile") == SENDFILE_TRACE
    assert stack.runtime.shm_counters["sendfile_files"] == files_before + 1   # one file, one socket
    assert sum(records) >= 4, records    # each call left spans, more than the 64 KiB ring holds at once


def test_sendfile_registers_each_file_of_a_connection_once(run_probe, stack, monkeypatch):
    monkeypatch.setattr(stack.sockets, "gathers", True)
    files_before = stack.runtime.shm_counters["sendfile_files"]
    assert run_probe.run("sendfile_files") == ["sendfile 301200"] * 3 + ["received 903600 pattern_ok 1"]
    assert stack.runtime.shm_counters["sendfile_files"] == files_before + 2    # A, B, then A again from memory


def test_epoll_level_edge_oneshot_and_kernel_fds(run_probe):
    assert run_probe.run("epoll") == [
        "ctl_add 0",
        "ctl_add_again -1 EEXIST",
        "ctl_del_unknown -1 ENOENT",
        "idle 0",
        "level 1 fd0:IN",
        "level_unread 1 fd0:IN",
        "level_after_read 0",
        "ctl_mod_edge 0",
        "edge 1 fd0:IN",
        "edge_unread 0",
        "edge_more_data 1 fd0:IN",
        "ctl_mod_oneshot 0",
        "oneshot 1 fd0:IN",
        "oneshot_disabled 0",
        "ctl_mod_rearm 0",
        "oneshot_rearmed 1 fd0:IN",
        "ctl_mod_out 0",
        "writable 1 fd0:OUT",
        "ctl_add_pipe 0",
        "socket_and_pipe 2 fd0:OUT fd1:IN",
        "peer_fin 1 fd0:IN|RDHUP",
        "close_socket 0",
        "after_close 1 fd1:IN",
    ]


def test_epoll_looks_at_what_changed_among_many_sockets(run_probe):
    """The in-process stack's change log holds 16 slots: the last step
    changes 19 sockets before the wait, which must then look at all."""
    process = run_probe.start("epoll_many", extra_env={"MTCPSHIM_DEBUG": "1"})
    out, err = process.communicate(timeout=PROGRAM_TIMEOUT)
    assert process.returncode == 0, err
    assert out.splitlines() == [
        "ctl_add_dup 0",
        "idle 0",
        "two_ready 3 17",
        "still_ready 3 17",
        "dup_ready 3 5 17 40",
        "one_at_a_time 3 5 17 40",
        "ctl_del_dup 0",
        "after_del 3 5 17",
        "drained 0",
        "after_close 16 19",
        "every_one " + " ".join(str(i) for i in range(20) if i != 17),
    ]
    assert "more than the log holds: looking at all 19" in err


def test_poll_and_select_mix_a_pipe_and_a_stack_socket(run_probe):
    assert run_probe.run("pollmix") == [
        "poll_idle 0",
        "poll_pipe 1",
        "revents pipe=IN socket=0",
        "poll_socket 1",
        "revents pipe=0 socket=IN",
        "poll_both 2",
        "revents pipe=IN socket=IN",
        "select_both 2",
        "selected pipe=1 socket=1",
        "select_idle 0",
        "select_writable 1",
        "poll_wakes_for_socket 1",
        "revents pipe=0 socket=IN",
        "poll_wakes_for_pipe 1",
        "revents pipe=IN socket=0",
        "poll_timeout 0",
    ]


def test_blocking_accept_and_read_wake_up(run_probe):
    assert run_probe.run("blocking") == [
        "accepted 1",
        "read_blocks 4",
        "data ping",
        "thread_connect 0",
        "thread_write 4",
        "set_rcvtimeo 0",
        "read_times_out -1 EAGAIN",
        "read_eof 0",
    ]


def test_udp_and_loopback_tcp_pass_through(run_probe):
    assert run_probe.run("passthrough") == [
        "udp_bind 0",
        "udp_sendto 1",
        "udp_recv 1",
        "udp_kernel 1",
        "tcp_bind_loopback 0",
        "tcp_listen 0",
        "tcp_connect_loopback 0",
        "tcp_write 1",
        "tcp_read 1",
        "tcp_kernel 1 1 1",
        "stack_listener_kernel 0",
    ]


def test_connection_refused(run_probe):
    assert run_probe.run("refused") == [
        "connect_nonblocking -1 EINPROGRESS",
        "poll 1",
        "revents OUT|ERR|HUP",
        "so_error ECONNREFUSED",
        "connect_blocking -1 ECONNREFUSED",
    ]


def test_dup_and_fork_share_the_socket_until_the_last_close(run_probe):
    assert run_probe.run("forkdup") == [
        "close_original 0",
        "write 1",
        "read_dup 1",
        "dupfd_at_least_500 1",
        "close_dupfd 0",
        "child_exit 0",
        "read_from_child 5",
        "data child",
        "write_after_child 1",
        "read_parent 1",
        "dup2 100",
        "close_dup 0",
        "write_via_dup2 1",
        "read_dup2 1",
        "close_last 0",
        "read_eof 0",
    ]


def test_the_inherited_fds_survive_the_program(run_probe):
    trace = run_probe.run("protect")
    assert trace[:3] == ["moved_high 1", "close_inherited 0", "close_range 0"]
    assert trace[4:] == ["write 5", "read 5", "data still"]


def test_a_dead_stack_fails_blocked_calls_instead_of_hanging(run_probe):
    process = run_probe.start("death")
    try:
        assert process.stdout.readline() == "blocked\n"
        run_probe.stack.die()
        out, err = process.communicate(timeout=PROGRAM_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert out.splitlines() == [
        "read -1 ENETDOWN",
        "epoll 1 fd0:IN|ERR|HUP",
        "write -1 ENETDOWN",
        "close 0",
    ]



def test_ports_below_the_namespaces_unprivileged_start_need_cap_net_bind_service(run_probe):
    assert run_probe.run("privport") == [
        "bind_80_as_root 0",
        "setuid_nobody 0",
        "bind_81_as_nobody -1 EACCES",
        "bind_8081_as_nobody 0",
    ]


def test_dual_stack_sockets_behave_as_on_the_kernel(run_probe):
    """An AF_INET6 listener on `::` takes IPv4 clients (as IPv4-mapped
    peers) and an AF_INET6 client reaches an IPv4-mapped address: the same
    calls on the kernel (over loopback) and on the stack give the same
    trace.  With IPV6_V6ONLY the listener stays the kernel's."""
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
    except OSError as error:
        pytest.skip(f"no IPv6 sockets here: {error}")
    kernel = run_probe.run("dualstack", attached=False, extra_env={"PROBE_IP": "127.0.0.1"})
    stack = run_probe.run("dualstack")
    assert "accepted_from AF_INET6 mapped port expected len 28" in kernel
    kernel.remove("listener_kernel 1")
    stack.remove("listener_kernel 0")
    assert stack == kernel


def test_a_port_in_use_or_in_time_wait_binds_as_on_the_kernel(run_probe):
    """bind() to a port that a listener, an accepted connection or a
    TIME_WAIT record still holds: EADDRINUSE, unless SO_REUSEADDR is set on
    both sides and nothing listens there.  The same calls on the kernel and
    on the stack give the same trace."""
    kernel = run_probe.run("portrules", attached=False, extra_env={"PROBE_IP": "127.0.0.1"})
    assert "bind_in_time_wait -1 EADDRINUSE" in kernel
    assert run_probe.run("portrules") == kernel


def test_so_reuseport_listeners_share_a_port_as_on_the_kernel(run_probe):
    """Two listeners bound with SO_REUSEPORT split one port's connections;
    when one closes, the other takes them all; without the option on every
    side the bind fails.  The kernel's trace and the stack's are equal."""
    kernel = run_probe.run("reuseport", attached=False, extra_env={"PROBE_IP": "127.0.0.1"})
    assert "both_listeners_got_some 1" in kernel
    assert run_probe.run("reuseport") == kernel


def test_a_killed_process_lets_go_of_its_sockets_as_on_the_kernel(run_probe):
    """A fork child holds a listener and a connection alone, and is killed
    (no exit handler runs): the connection closes with a FIN and the
    listener refuses, as when the kernel closes a dead process's files."""
    kernel = run_probe.run("killed", attached=False, extra_env={"PROBE_IP": "127.0.0.1"})
    assert "connect_to_the_gone_listener -1 ECONNREFUSED" in kernel
    assert run_probe.run("killed") == kernel


def test_a_socket_survives_exec_unless_it_has_fd_cloexec_as_on_the_kernel(run_probe):
    """A child execs a new image: the stack socket it inherited works there
    (inetd, CGI), the one with FD_CLOEXEC is closed by the exec itself, so
    its peer reads EOF while the new image still runs."""
    kernel = run_probe.run("exec", attached=False, extra_env={"PROBE_IP": "127.0.0.1"})
    assert "new_image_exit 0" in kernel
    assert run_probe.run("exec") == kernel


def test_sockets_passed_over_af_unix_work_in_the_receiver_as_on_the_kernel(run_probe):
    """A listener and a connection go over an AF_UNIX socket (SCM_RIGHTS)
    and their sender closes its copies before the receiver takes them: the
    message keeps them open; the receiver writes on the connection, accepts
    on the listener, and its exit closes both."""
    kernel = run_probe.run("passfd", attached=False, extra_env={"PROBE_IP": "127.0.0.1"})
    assert "bytes stream 1 1 cloexec 1" in kernel and "receiver_exit 0" in kernel
    assert run_probe.run("passfd") == kernel


def test_an_epoll_set_of_stack_sockets_nested_in_epoll_and_poll_as_on_the_kernel(run_probe):
    """An epoll set holding a stack connection, inside another epoll set and
    in poll: readable while the connection is, and a sleeping outer wait
    wakes when data arrives."""
    kernel = run_probe.run("nested", attached=False, extra_env={"PROBE_IP": "127.0.0.1"})
    assert "outer_reports_inner 1" in kernel and "outer_wakes 1" in kernel
    assert run_probe.run("nested") == kernel


def test_socket_calls_made_through_syscall_reach_the_stack(run_probe):
    """socket, bind, listen, accept4, read, write, dup, close... through
    syscall(SYS_...) as a runtime might make them: the listener is the
    stack's, and every result is the kernel's."""
    kernel = run_probe.run("rawsyscall", attached=False, extra_env={"PROBE_IP": "127.0.0.1"})
    stack = run_probe.run("rawsyscall")
    assert "read_nothing -1 EAGAIN" in kernel and "client_reads_eof 0" in kernel
    kernel.remove("listener_kernel 1")
    stack.remove("listener_kernel 0")
    assert stack == kernel


def test_tcp_info_reports_the_connection_s_figures_as_the_kernel_s_do(run_probe):
    """After 4 MB across: a measured RTT, MSS, a grown window, nothing left
    unacknowledged or retransmitted, the negotiated options; a short buffer
    gets the first bytes, as on Linux."""
    kernel = run_probe.run("tcpinfo", attached=False, extra_env={"PROBE_IP": "127.0.0.1"})
    assert all(line.endswith((" 1", " 0", " 8", " 4194304")) for line in kernel), kernel
    assert run_probe.run("tcpinfo") == kernel


def test_a_socket_closed_under_a_blocked_reader_stays_open_until_its_read_returns(run_probe):
    """Another thread closes the descriptor a thread is reading from: as on
    Linux, the read holds the socket; the peer's later data reaches it, and
    the socket closes (the peer reads EOF) once the read has returned."""
    kernel = run_probe.run("closeblocked", attached=False, extra_env={"PROBE_IP": "127.0.0.1"})
    assert "blocked_read 4 late" in kernel
    assert run_probe.run("closeblocked") == kernel


def test_sendmmsg_and_recvmmsg_on_a_stream_as_on_the_kernel(run_probe):
    kernel = run_probe.run("mmsg", attached=False, extra_env={"PROBE_IP": "127.0.0.1"})
    assert "received ab cd lens 2 2" in kernel
    assert run_probe.run("mmsg") == kernel


def test_fstat_calls_a_stack_socket_a_socket_and_splice_is_refused_in_one_line(run_probe):
    """S_ISSOCK as on the kernel; splice, which the kernel does on its own
    sockets, is refused with EINVAL and one line naming the call."""
    kernel = run_probe.run("fstat_splice", attached=False, extra_env={"PROBE_IP": "127.0.0.1"})
    assert "is_socket 1" in kernel and "splice_to_pipe 7" in kernel
    process = run_probe.start("fstat_splice")
    out, err = process.communicate(timeout=30)
    assert out.splitlines() == [line if not line.startswith("splice_to_pipe") else "splice_to_pipe -1 EINVAL"
                                for line in kernel]
    assert "splice: fd " in err and "which splice does not support" in err


def test_integer_options_read_back_as_the_kernel_s_do(run_probe):
    """The same setsockopt and getsockopt calls on a kernel socket and on
    a stack socket: every result, errno and value read back is the same."""
    trace = run_probe.run("options")
    assert trace[0] == "kernel_socket 1 0"
    for line in trace[1:]:
        what, calls = line.split(": ", 1)
        for call in calls.split(", "):
            kernel, stack = call.split(" ", 1)[1].split(" | ")
            assert kernel == stack, f"{what}: {call}"
