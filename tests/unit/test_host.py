"""The endpoint table: RFC 6528 ISNs, RFC 6056 ports, the SYN backlog and
SYN cookies, and limits that refuse cleanly.  Traces go through
TcpHost.receive as wire bytes, as the runtime delivers them."""
import errno
import random

import pytest

from mtcpshim.stack import native, siphash
from mtcpshim.stack.host import COOKIE_RESERVE_SECONDS, COOKIE_WINDOW, COOKIE_WSCALE, EPHEMERAL_PORTS, TcpHost
from mtcpshim.stack.io.steer import worker_of_ports
from mtcpshim.stack.isn import COOKIE_PERIOD, ISN_CLOCK_HZ, MSS_TABLE, TcpSecrets, mss_index_for
from mtcpshim.stack.storage import RingBuffer
from mtcpshim.stack.tcp import TcpConfig, TcpState
from mtcpshim.stack.wire.tcp import ACK, FIN, PSH, RST, SYN, TcpSegment

HOST_IP = 0xC6120002
PEER_IP = 0xC6120001
PORT = 80


class Peer:
    """Scripted clients in front of one host with one listener."""

    def __init__(self, config=None, backlog=4, refuse=False, **host_options):
        self.host = TcpHost(HOST_IP, config or TcpConfig(), random.Random(1), **host_options)
        self.accepted = []                                # (remote_port, owner) per accept_buffers
        self.refuse = refuse
        self.room = 1 << 30                               # connections the listener's owner has room for
        self.listener = self.host.listen(PORT, backlog, self.accept_buffers, lambda wanted: wanted <= self.room)
        self.listener.backlog = backlog                   # 0: every SYN gets a cookie
        self.now = 0.0

    def accept_buffers(self, remote_ip, remote_port):
        if self.refuse:
            return None
        owner = f"socket-{len(self.accepted)}"
        self.accepted.append((remote_port, owner))
        return RingBuffer(65536), RingBuffer(65536), owner

    def send(self, segment, src_ip=PEER_IP):
        self.host.receive(src_ip, HOST_IP, segment.emit(src_ip, HOST_IP), self.now)

    def recv(self):
        return [TcpSegment.parse(header + bytes(payload), HOST_IP, dst, verify_checksum=False)
                for dst, header, payload, _ in self.host.take_output()]


def syn(port, seq=1000, **options):
    return TcpSegment(port, PORT, seq, 0, SYN, 64240, **options)


# -- initial sequence numbers and ports -------------------------------------

def test_siphash_gives_the_papers_test_vector():
    # Aumasson and Bernstein, "SipHash: a fast short-input PRF", appendix A.
    key, message = bytes(range(16)), bytes(range(15))
    assert siphash.siphash24(key, message) == 0xA129CA6149BE45E5
    assert native.siphash24(key, message) == 0xA129CA6149BE45E5


@pytest.mark.skipif(not native.ACCELERATED, reason="mtcpshim.stack._netfast not built")
def test_c_siphash_equals_python_at_every_tail_length():
    rng = random.Random(6528)
    for length in list(range(33)) + [rng.randrange(2000) for _ in range(200)]:
        key, data = rng.randbytes(16), rng.randbytes(length)
        assert native.siphash24(key, data) == siphash.siphash24(key, data)
    with pytest.raises(ValueError):
        native.siphash24(bytes(15), b"")


def test_isn_is_a_keyed_hash_of_the_four_tuple_plus_a_4us_clock():
    secrets = TcpSecrets(bytes(range(32)))
    first = secrets.isn(HOST_IP, 80, PEER_IP, 40000, 10.0)
    # The clock part: 4 us ticks.
    assert secrets.isn(HOST_IP, 80, PEER_IP, 40000, 10.0 + 1 / ISN_CLOCK_HZ) == first + 1
    assert (secrets.isn(HOST_IP, 80, PEER_IP, 40000, 11.0) - first) % 2**32 == ISN_CLOCK_HZ
    # Another port, another secret: unrelated offsets.
    assert secrets.isn(HOST_IP, 80, PEER_IP, 40001, 10.0) != first
    assert TcpSecrets(bytes(32)).isn(HOST_IP, 80, PEER_IP, 40000, 10.0) != first
    # The clock wraps modulo 2**32 (about every 4.77 hours).
    assert secrets.isn(HOST_IP, 80, PEER_IP, 40000, 10.0 + 2**32 / ISN_CLOCK_HZ) == first


def test_host_connections_start_at_the_rfc6528_isn():
    host = TcpHost(HOST_IP, rng=random.Random(3))
    conn = host.connect(45000, PEER_IP, 80, RingBuffer(1000), RingBuffer(1000), None, 5.0)
    assert conn.iss == host.secrets.isn(HOST_IP, 45000, PEER_IP, 80, 5.0)
    (wire,) = [header for _, header, _, _ in host.take_output()]   # a SYN: no payload
    assert TcpSegment.parse(wire, HOST_IP, PEER_IP, verify_checksum=False).seq == conn.iss


def test_ephemeral_ports_follow_rfc6056_algorithm_3():
    host = TcpHost(HOST_IP, rng=random.Random(4))

    def open_to(remote_port):
        return host.connect_ephemeral(PEER_IP, remote_port, RingBuffer(100), RingBuffer(100),
                                      None, 0.0).local_port

    span = len(EPHEMERAL_PORTS)
    offset = host.secrets.port_offset(HOST_IP, PEER_IP, 80)
    # One destination: the hashed offset, then on by the shared counter.
    assert open_to(80) == EPHEMERAL_PORTS[offset % span]
    assert open_to(80) == EPHEMERAL_PORTS[(offset + 1) % span]
    # Another destination starts from its own offset.
    other = host.secrets.port_offset(HOST_IP, PEER_IP, 443)
    assert open_to(443) == EPHEMERAL_PORTS[(other + 2) % span]


def test_a_steered_host_opens_only_from_ports_whose_replies_come_back_to_it():
    """One worker of two (issue 14): the search from algorithm 3's offset
    passes over the ports the other worker's filter takes."""
    host = TcpHost(HOST_IP, rng=random.Random(14), steering=(1, 2))
    offset = host.secrets.port_offset(HOST_IP, PEER_IP, 80)
    ports = [host.connect_ephemeral(PEER_IP, 80, RingBuffer(100), RingBuffer(100), None, 0.0).local_port
             for _ in range(200)]
    assert all(worker_of_ports(port, 80, 2) == 1 and host.steers_here(port, 80) for port in ports)
    assert len(set(ports)) == 200
    span = len(EPHEMERAL_PORTS)
    assert ports[0] == next(EPHEMERAL_PORTS[(offset + i) % span] for i in range(span)
                            if worker_of_ports(EPHEMERAL_PORTS[(offset + i) % span], 80, 2) == 1)
    assert not host.steers_here(ports[0] ^ 1, 80)
    assert TcpHost(HOST_IP, rng=random.Random(14)).steers_here(ports[0] ^ 1, 80)


def test_a_steered_host_runs_out_of_its_own_ports_not_into_another_worker_s():
    host = TcpHost(HOST_IP, rng=random.Random(15), steering=(0, 3))
    for port in EPHEMERAL_PORTS:
        if host.steers_here(port, 443):
            host.bind(port)
    with pytest.raises(OSError) as raised:
        host.connect_ephemeral(PEER_IP, 443, RingBuffer(10), RingBuffer(10), None, 0.0)
    assert raised.value.errno == errno.EADDRNOTAVAIL
    with pytest.raises(ValueError):
        TcpHost(HOST_IP, steering=(3, 3))


def test_a_steered_host_never_answers_another_workers_flow():
    """A segment of a flow that steers to the other worker (the filter let
    it through) is counted, not reset, and opens nothing."""
    peer = Peer(steering=(0, 2))
    theirs = next(port for port in range(40000, 40100) if worker_of_ports(port, PORT, 2) == 1)
    ours = next(port for port in range(40000, 40100) if worker_of_ports(port, PORT, 2) == 0)
    peer.send(syn(theirs))
    peer.send(TcpSegment(theirs, PORT, 5000, 0, ACK, 64240))
    assert peer.recv() == [] and peer.accepted == []
    assert peer.host.counters["tcp_rx_other_worker"] == 2
    peer.send(syn(ours))
    assert [seg.flags for seg in peer.recv()] == [SYN | ACK]


def test_timestamps_start_at_a_per_connection_offset():
    host = TcpHost(HOST_IP, rng=random.Random(5))
    conn = host.connect(45000, PEER_IP, 80, RingBuffer(1000), RingBuffer(1000), None, 2.0)
    (wire,) = [header for _, header, _, _ in host.take_output()]   # a SYN: no payload
    tsval = TcpSegment.parse(wire, HOST_IP, PEER_IP, verify_checksum=False).timestamp[0]
    offset = host.secrets.timestamp_offset(HOST_IP, 45000, PEER_IP, 80)
    assert tsval == (2000 + offset) % 2**32
    assert conn.state == TcpState.SYN_SENT


# -- SYN backlog and cookies ------------------------------------------------

def test_syns_beyond_the_backlog_get_cookies_and_keep_no_state():
    peer = Peer(backlog=2)
    for port in range(40000, 40100):
        peer.send(syn(port))
    replies = peer.recv()
    assert len(replies) == 100 and all(r.flags == SYN | ACK for r in replies)
    # Two connections and two buffer sets: the backlog.  The rest are cookies.
    assert len(peer.host.connections) == 2
    assert len(peer.accepted) == 2
    assert peer.host.counters["tcp_syncookies_sent"] == 98


def test_cookie_ack_creates_the_connection_and_asks_for_buffers_then():
    peer = Peer(backlog=0)
    peer.send(syn(40000, seq=2**32 - 1, mss=1400))       # the peer's ISN wraps
    (syn_ack,) = peer.recv()
    assert syn_ack.ack == 0
    assert peer.host.connections == {} and peer.accepted == []
    peer.now = 0.05
    peer.send(TcpSegment(40000, PORT, 0, (syn_ack.seq + 1) % 2**32, ACK | PSH, 502, b"GET /"))
    (conn,) = peer.host.connections.values()
    assert peer.accepted == [(40000, "socket-0")]
    assert conn.owner == "socket-0"
    assert conn.state == TcpState.ESTABLISHED
    assert conn.send_mss == MSS_TABLE[mss_index_for(1400)] == 1300
    assert conn.recv_buf.read(100) == b"GET /"
    assert conn in peer.host.touched
    assert peer.host.counters["tcp_syncookies_accepted"] == 1


def test_cookie_keeps_window_scale_and_sack_in_the_timestamp():
    peer = Peer(backlog=0)
    peer.send(syn(40000, mss=1460, wscale=9, sack_permitted=True, timestamp=(777, 0)))
    (syn_ack,) = peer.recv()
    assert (syn_ack.wscale, syn_ack.sack_permitted, syn_ack.window) == (
        COOKIE_WSCALE, True, COOKIE_WINDOW)
    tsval = syn_ack.timestamp[0]
    peer.send(TcpSegment(40000, PORT, 1001, syn_ack.seq + 1, ACK, 100,
                         timestamp=(778, tsval)))
    (conn,) = peer.host.connections.values()
    assert (conn.snd_wscale, conn.rcv_wscale, conn.sack_enabled, conn.ts_enabled) == (
        9, COOKIE_WSCALE, True, True)
    assert conn.snd_wnd == 100 << 9
    assert conn.ts_recent == 778
    assert conn.send_mss == 1460 - 12


def test_cookie_without_timestamps_goes_without_scaling_and_sack():
    peer = Peer(backlog=0)
    peer.send(syn(40000, mss=1460, wscale=9, sack_permitted=True))
    (syn_ack,) = peer.recv()
    assert (syn_ack.wscale, syn_ack.sack_permitted) == (None, False)
    peer.send(TcpSegment(40000, PORT, 1001, syn_ack.seq + 1, ACK, 100))
    (conn,) = peer.host.connections.values()
    assert (conn.snd_wscale, conn.rcv_wscale, conn.sack_enabled) == (0, 0, False)


@pytest.mark.parametrize("tamper", ["cookie", "peer_seq", "port", "age"])
def test_invalid_cookie_is_reset(tamper):
    peer = Peer(backlog=0)
    peer.send(syn(40000))
    (syn_ack,) = peer.recv()
    seq, ack, port = 1001, syn_ack.seq + 1, 40000
    if tamper == "cookie":
        ack += 1 << 12                                    # a bit of the keyed hash
    elif tamper == "peer_seq":
        seq += 1
    elif tamper == "port":
        port += 1
    else:
        peer.now += 2 * COOKIE_PERIOD
    peer.send(TcpSegment(port, PORT, seq, ack % 2**32, ACK, 100))
    assert peer.host.connections == {}
    assert [r.flags for r in peer.recv()] == [RST]
    assert peer.accepted == []


def test_acks_are_not_taken_for_cookies_unless_cookies_were_sent():
    peer = Peer(backlog=4)
    secrets = peer.host.secrets
    cookie = secrets.syn_cookie(HOST_IP, PORT, PEER_IP, 40000, 1000, 0, peer.now)
    peer.send(TcpSegment(40000, PORT, 1001, cookie + 1, ACK, 100))
    assert peer.host.connections == {}
    assert peer.host.counters["tcp_no_socket"] == 1


def test_legitimate_client_connects_during_a_flood():
    peer = Peer(backlog=8)
    flood = random.Random(9)
    for _ in range(2000):                                 # spoofed sources, never ACKed
        peer.send(syn(flood.randrange(1024, 65536), seq=flood.getrandbits(32)),
                  src_ip=0xC6130000 | flood.getrandbits(16))
        if flood.random() < 0.005:
            peer.now += 0.001
    peer.host.take_output()
    peer.send(syn(50000, seq=77, mss=1460, timestamp=(5, 0)))
    (syn_ack,) = [r for r in peer.recv() if r.dst_port == 50000]
    peer.send(TcpSegment(50000, PORT, 78, syn_ack.seq + 1, ACK, 1000,
                         timestamp=(6, syn_ack.timestamp[0])))
    conn = peer.host.connections[(PORT, PEER_IP, 50000)]
    assert conn.state == TcpState.ESTABLISHED
    assert len(peer.host.connections) == 9                # the backlog plus the client
    assert len(peer.accepted) == 9


def test_without_cookies_a_full_backlog_drops_syns():
    peer = Peer(config=TcpConfig(syn_cookies=False), backlog=1)
    peer.send(syn(40000))
    peer.send(syn(40001))
    assert len(peer.recv()) == 1
    assert peer.host.counters["tcp_syn_backlog_full"] == 1


# -- limits -----------------------------------------------------------------

def test_without_room_for_one_more_connection_syns_go_unanswered_cookies_or_not():
    """As Linux with its accept queue full: the client retries its SYN, and
    no handshake completes that nobody would serve."""
    for backlog in (8, 0):                 # a SYN for the backlog, and one for a cookie
        peer = Peer(backlog=backlog)
        peer.room = 0
        peer.send(syn(40001))
        assert peer.recv() == [] and peer.host.connections == {}
        assert peer.host.counters["tcp_syn_dropped_no_room"] == 1
        peer.room = 1
        peer.send(syn(40001))              # the client's retry
        (syn_ack,) = peer.recv()
        assert syn_ack.flags == SYN | ACK


def test_refused_buffers_drop_a_syn_unanswered():
    peer = Peer(backlog=8, refuse=True)
    peer.send(syn(40001))
    assert peer.recv() == [] and peer.host.connections == {}
    assert peer.host.counters["tcp_syn_dropped_no_room"] == 1


def test_a_cookie_ack_without_buffers_waits_for_them():
    peer = Peer(backlog=0)
    peer.send(syn(40001))
    (syn_ack,) = peer.recv()                 # a cookie SYN-ACK keeps nothing
    assert syn_ack.flags == SYN | ACK and peer.host.connections == {}
    assert peer.host.counters["tcp_syncookies_sent"] == 1
    peer.refuse = True                      # by the handshake's end no buffers are left
    peer.send(TcpSegment(40001, PORT, 1001, syn_ack.seq + 1, ACK, 100))
    # Still no buffers: nothing is created and nothing is reset; the peer's
    # retransmission may find buffers later, the cookie stays valid.
    assert peer.recv() == [] and peer.host.connections == {}
    assert peer.host.counters["tcp_accept_refused"] == 1
    peer.refuse = False
    peer.now += 1.0
    peer.send(TcpSegment(40001, PORT, 1001, syn_ack.seq + 1, ACK | PSH, 100, b"retry"))
    (conn,) = peer.host.connections.values()
    assert conn.recv_buf.read(10) == b"retry"


def test_connection_table_limit_refuses_cleanly():
    peer = Peer(backlog=8, max_connections=2)
    peer.send(syn(40000))
    peer.send(syn(40001))
    peer.send(syn(40002))
    assert len(peer.host.connections) == 2
    assert peer.host.counters["tcp_connection_limit"] == 1
    with pytest.raises(OSError) as raised:
        peer.host.connect_ephemeral(PEER_IP, 9, RingBuffer(10), RingBuffer(10), None, 0.0)
    assert raised.value.errno == errno.ENOBUFS


def test_exhausted_receive_buffer_only_closes_the_window():
    host = TcpHost(HOST_IP, rng=random.Random(2))
    host.listen(PORT, 4, lambda ip, port: (RingBuffer(100), RingBuffer(1), None))
    host.receive(PEER_IP, HOST_IP, syn(40000, mss=1460).emit(PEER_IP, HOST_IP), 0.0)
    (conn,) = host.connections.values()
    for seq in (1001, 1002, 1002):
        host.receive(PEER_IP, HOST_IP, TcpSegment(
            40000, PORT, seq, conn.iss + 1, ACK | PSH, 100, b"xy").emit(PEER_IP, HOST_IP), 0.1)
    assert conn.recv_buf.read(5) == b"x"
    acks = [TcpSegment.parse(header, HOST_IP, PEER_IP, verify_checksum=False)
            for _, header, _, _ in host.take_output()]
    assert acks[-1].ack == 1002 and acks[-1].window == 0


def test_time_wait_keeps_a_compact_record_that_acks_and_reincarnates():
    from mtcpshim.stack.storage import RingBuffer
    from mtcpshim.stack.tcp import TcpState
    from mtcpshim.stack.wire.tcp import ACK, FIN, SYN, TcpSegment

    server_ip, client_ip, now = 0xC6120002, 0xC6120001, 100.0
    server = TcpHost(server_ip)
    server.listen(80, 4, lambda ip, port: (RingBuffer(4096), RingBuffer(4096), None))

    def client_sends(seq, ack, flags):
        segment = TcpSegment(40000, 80, seq, ack, flags, 65535, mss=1460 if flags & SYN else None)
        server.receive(client_ip, server_ip, segment.emit(client_ip, server_ip), now)
        return [TcpSegment.parse(header, server_ip, client_ip, verify_checksum=False)
                for _, header, _, _ in server.take_output()]   # no data in a handshake

    (syn_ack,) = client_sends(1000, 0, SYN)
    iss = syn_ack.seq
    client_sends(1001, iss + 1, ACK)
    conn = server.connections[(80, client_ip, 40000)]
    conn.close(now)                                  # the server closes first: FIN
    server.collect(conn, now)
    server.take_output()
    client_sends(1001, iss + 2, ACK)                 # FIN_WAIT_2
    client_sends(1001, iss + 2, FIN | ACK)           # TIME_WAIT: a record replaces the connection
    assert conn.state == TcpState.TIME_WAIT
    assert (80, client_ip, 40000) not in server.connections
    assert len(server.time_waits) == 1

    (again,) = client_sends(1001, iss + 2, FIN | ACK)  # a retransmitted FIN: the final ACK again
    assert (again.flags, again.seq, again.ack) == (ACK, iss + 2, 1002)

    (new_syn_ack,) = client_sends(5000, 0, SYN)       # a higher SYN reincarnates the 4-tuple
    assert new_syn_ack.flags == SYN | ACK and new_syn_ack.ack == 5001
    assert len(server.time_waits) == 0


def test_a_port_comes_back_for_bind_as_linux_gives_it_back():
    """A listener's port stays held by its connections, then by their
    TIME_WAIT records: bind() gets EADDRINUSE unless it and they set
    SO_REUSEADDR (the listener's, inherited), and the port is free for
    everyone once the last record expires."""
    peer = Peer()
    host, listener = peer.host, peer.listener
    host.bind(PORT)
    listener.reuse_address = True                    # the listener set SO_REUSEADDR
    peer.send(syn(40000))
    (syn_ack,) = peer.recv()
    peer.send(TcpSegment(40000, PORT, 1001, syn_ack.seq + 1, ACK, 64240))
    conn = host.connections[(PORT, PEER_IP, 40000)]
    for reuse_address in (False, True):              # the listener has it
        with pytest.raises(OSError) as refused:
            host.bind(PORT, reuse_address)
        assert refused.value.errno == errno.EADDRINUSE
    host.unlisten(listener)
    host.unbind(PORT)

    with pytest.raises(OSError):
        host.bind(PORT)                              # the connection has it
    assert host.bind(PORT, reuse_address=True) == PORT
    host.unbind(PORT)

    conn.close(peer.now)                             # we close first: TIME_WAIT
    host.collect(conn, peer.now)
    peer.recv()
    peer.send(TcpSegment(40000, PORT, 1001, syn_ack.seq + 2, ACK | FIN, 64240))
    assert conn.state == TcpState.TIME_WAIT and not host.connections
    with pytest.raises(OSError):
        host.bind(PORT)                              # its record has it
    assert host.bind(PORT, reuse_address=True) == PORT
    host.unbind(PORT)
    peer.now += host.config.time_wait
    host.on_timers(peer.now)
    assert len(host.time_waits) == 0
    assert host.bind(PORT) == PORT                   # the record expired


def test_a_connection_without_so_reuseaddr_holds_its_port_against_everyone():
    peer = Peer()                                    # the listener did not set SO_REUSEADDR
    peer.send(syn(40000))
    (syn_ack,) = peer.recv()
    peer.send(TcpSegment(40000, PORT, 1001, syn_ack.seq + 1, ACK, 64240))
    peer.host.unlisten(peer.listener)
    with pytest.raises(OSError) as refused:
        peer.host.bind(PORT, reuse_address=True)
    assert refused.value.errno == errno.EADDRINUSE


def test_so_reuseport_listeners_split_a_port_by_the_peer_s_address():
    host = TcpHost(HOST_IP, rng=random.Random(1))
    taken = {"a": [], "b": []}

    def listen(name):
        return host.listen(PORT, 64, lambda ip, port: (taken[name].append(port) or
                                                       (RingBuffer(4096), RingBuffer(4096), name)))

    assert host.bind(PORT, reuse_port=True) == PORT
    with pytest.raises(OSError):
        host.bind(PORT)                              # without it: not in the group
    assert host.bind(PORT, reuse_port=True) == PORT
    first, _ = listen("a"), listen("b")
    for port in range(40000, 40064):
        host.receive(PEER_IP, HOST_IP, syn(port).emit(PEER_IP, HOST_IP), 0.0)
        host.receive(PEER_IP, HOST_IP, syn(port).emit(PEER_IP, HOST_IP), 0.0)   # a retransmission
    assert sorted(taken["a"] + taken["b"]) == list(range(40000, 40064))      # each SYN to one of them
    assert 16 < len(taken["a"]) < 48
    host.unlisten(first)
    host.unbind(PORT, reuse_port=True)
    for port in range(41000, 41016):
        host.receive(PEER_IP, HOST_IP, syn(port).emit(PEER_IP, HOST_IP), 0.0)
    assert taken["b"][-16:] == list(range(41000, 41016))


def test_time_wait_records_expire():
    from mtcpshim.stack.timewait import TimeWaitTable

    class Closed:
        local_port, remote_ip, remote_port = 80, 1, 2
        reuse_address = False

        def time_wait_fields(self):
            return (10, 20, 100, None, 0)

    table = TimeWaitTable(60.0, limit=10)
    table.add(Closed(), now=0.0)
    assert table.next_deadline() == 60.0
    table.expire(59.9)
    assert len(table) == 1
    table.expire(60.0)
    assert len(table) == 0 and table.next_deadline() is None


def test_past_the_time_wait_limit_a_connection_closes_without_a_record():
    from mtcpshim.stack.storage import RingBuffer
    from mtcpshim.stack.tcp import TcpConfig, TcpState
    from mtcpshim.stack.wire.tcp import ACK, FIN, RST, SYN, TcpSegment

    server_ip, client_ip, now = 0xC6120002, 0xC6120001, 100.0
    server = TcpHost(server_ip, TcpConfig(max_time_wait=2))
    server.listen(80, 4, lambda ip, port: (RingBuffer(4096), RingBuffer(4096), None))

    def client_sends(port, seq, ack, flags):
        segment = TcpSegment(port, 80, seq, ack, flags, 65535, mss=1460 if flags & SYN else None)
        server.receive(client_ip, server_ip, segment.emit(client_ip, server_ip), now)
        return [TcpSegment.parse(header, server_ip, client_ip, verify_checksum=False)
                for _, header, _, _ in server.take_output()]

    def server_closes_first(port):
        (syn_ack,) = client_sends(port, 1000, 0, SYN)
        iss = syn_ack.seq
        client_sends(port, 1001, iss + 1, ACK)
        conn = server.connections[(80, client_ip, port)]
        conn.close(now)                               # FIN
        server.collect(conn, now)
        server.take_output()
        (last_ack,) = client_sends(port, 1001, iss + 2, FIN | ACK)
        assert last_ack.flags == ACK and conn.state == TcpState.TIME_WAIT
        assert (80, client_ip, port) not in server.connections
        return iss

    for port in (40000, 40001):
        server_closes_first(port)
    assert len(server.time_waits) == 2
    iss = server_closes_first(40002)                  # one over the limit: no record, counted
    assert len(server.time_waits) == 2
    assert server.counters["tcp_time_wait_overflow"] == 1
    (reply,) = client_sends(40002, 1001, iss + 2, FIN | ACK)  # its retransmitted FIN: nobody home
    assert reply.flags & RST


def test_reincarnated_time_wait_records_leave_no_backlog_of_expiries():
    # A client that reuses its ports at once (wrk) takes over each 4-tuple
    # long before its record would expire: what the table holds follows
    # the records alive, not every record of the last minute.
    from mtcpshim.stack.timewait import REINCARNATE, TimeWaitTable
    from mtcpshim.stack.wire.tcp import SYN, TcpSegment

    class Closed:
        local_port, remote_ip = 80, 1
        reuse_address = False

        def __init__(self, remote_port):
            self.remote_port = remote_port

        def time_wait_fields(self):
            return (10, 20, 100, None, 0)

    table = TimeWaitTable(60.0, limit=100_000)
    now = 0.0
    for n in range(50_000):
        port = 40000 + n % 100
        key = (80, 1, port)
        if key in table:
            assert table.receive(key, TcpSegment(port, 80, 1000, 0, SYN, 65535), now) is REINCARNATE
        table.add(Closed(port), now)
        now += 0.0001
    assert len(table) == 100
    assert len(table._expiry) <= 2 * len(table) + 1024
    table.expire(now + 60.0)                  # and the records still expire, all of them
    assert len(table) == 0 and table.next_deadline() is None


def test_the_time_wait_limit_follows_the_kernel_s_setting(tmp_path):
    from mtcpshim.stack.timewait import host_limit

    sysctl = tmp_path / "tcp_max_tw_buckets"
    sysctl.write_text("4096\n")
    assert host_limit(131072, str(sysctl)) == 4096
    assert host_limit(131072, str(tmp_path / "missing")) == 131072   # no /proc: Linux's default
    sysctl.write_text("garbage")
    assert host_limit(131072, str(sysctl)) == 131072


# -- timers -------------------------------------------------------------------

def test_short_connections_leave_no_timer_entries_behind():
    # Each connection's SYN-ACK arms a 1 s timeout that outlives it.
    peer = Peer(backlog=8)
    for port in range(40000, 43000):
        peer.send(syn(port))
        (syn_ack,) = peer.recv()
        peer.send(TcpSegment(port, PORT, 1001, syn_ack.seq + 1, ACK, 502))
        peer.send(TcpSegment(port, PORT, 1001, 0, RST, 0))
        peer.now += 0.0001
    assert len(peer.host.connections) == 0
    assert len(peer.host._timers) <= 64
    # A connection still waiting on its timer is not dropped with them.
    peer.send(syn(50000))
    (syn_ack,) = peer.recv()
    for port in range(43000, 43200):
        peer.send(syn(port))
        peer.recv()
        peer.send(TcpSegment(port, PORT, 1001, 0, RST, 0))
    assert peer.host.next_deadline() == pytest.approx(peer.now + 1.0)
    peer.now += 1.0
    peer.host.on_timers(peer.now)
    (again,) = peer.recv()
    assert again.flags == SYN | ACK and again.seq == syn_ack.seq


def test_cookies_in_flight_keep_room_for_their_connections():
    """A burst of SYNs answered with cookies: as many as there is room for,
    since each may complete any moment; the rest wait for their retry."""
    peer = Peer(backlog=2)
    peer.room = 5                            # connections beyond the half-open ones
    for port in range(40000, 40010):
        peer.send(syn(port))
    answered = peer.recv()
    # Two half-open connections (their buffers taken already), then five
    # cookies, one per connection there is room for; five SYNs unanswered.
    assert len(peer.host.connections) == 2 and len(answered) == 7
    assert peer.host.counters["tcp_syncookies_sent"] == 5
    assert peer.host.counters["tcp_syn_dropped_no_room"] == 3
    peer.now += 2 * COOKIE_RESERVE_SECONDS   # a stall: the host read no input since
    peer.send(syn(40009))
    assert peer.recv() == []                 # the cookies' ACKs may be waiting unread: room kept
    peer.now += 2 * COOKIE_RESERVE_SECONDS   # input read that long after them: they had their time
    peer.send(syn(40009))
    assert len(peer.recv()) == 1
