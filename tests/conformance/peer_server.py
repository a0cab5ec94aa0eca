"""The server under test: runs under `mtcpshim run` and serves three ports,
one behaviour each, in a single epoll loop (so a connection a probe
abandons never holds up the next test):

  ECHO_PORT   writes back every byte it reads, until EOF or reset
  BULK_PORT   sends BULK_SIZE bytes of bulk_pattern(), then reads and discards
  SINK_PORT   accepts and never reads, so the receive window fills

Every connection event goes to the log file as one line,
`<port> <peer port> <event>`: accepted, read <n>, eof, reset, error <errno>.
Usage: peer_server.py LOG_FILE
"""
import errno
import selectors
import socket
import sys

ECHO_PORT = 7001
BULK_PORT = 7002
SINK_PORT = 7003
BULK_SIZE = 256 * 1024


def bulk_pattern(size: int) -> bytes:
    """Bytes whose value depends on their offset, so a misplaced byte shows."""
    return bytes((offset * 7 + offset // 251) & 0xFF for offset in range(size))


class Server:
    def __init__(self, log):
        self.log = log
        self.selector = selectors.DefaultSelector()
        self.peers: dict[socket.socket, tuple[int, int]] = {}   # conn -> (port, peer port)
        self.unsent: dict[socket.socket, bytes] = {}
        self.sinks: list[socket.socket] = []                     # held open, never read
        self.bulk = bulk_pattern(BULK_SIZE)
        for port in (ECHO_PORT, BULK_PORT, SINK_PORT):
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("0.0.0.0", port))
            listener.listen(64)
            listener.setblocking(False)
            self.selector.register(listener, selectors.EVENT_READ, self.accept)
        self.log.write("0 0 listening\n")
        self.log.flush()

    def note(self, conn: socket.socket, event: str) -> None:
        port, peer_port = self.peers[conn]
        self.log.write(f"{port} {peer_port} {event}\n")
        self.log.flush()

    def accept(self, listener: socket.socket) -> None:
        conn, (_, peer_port) = listener.accept()
        conn.setblocking(False)
        port = listener.getsockname()[1]
        self.peers[conn] = (port, peer_port)
        self.note(conn, "accepted")
        if port == SINK_PORT:
            self.sinks.append(conn)
            return
        if port == BULK_PORT:
            self.unsent[conn] = self.bulk
        self.selector.register(conn, self.events_for(conn), self.serve)

    def events_for(self, conn: socket.socket) -> int:
        return selectors.EVENT_READ | (selectors.EVENT_WRITE if self.unsent.get(conn) else 0)

    def serve(self, conn: socket.socket) -> None:
        port = self.peers[conn][0]
        try:
            data = conn.recv(65536)
            if data == b"":
                return self.finish(conn, "eof")
            self.note(conn, f"read {len(data)}")
            if port == ECHO_PORT:
                self.unsent[conn] = self.unsent.get(conn, b"") + data
        except BlockingIOError:
            pass
        except OSError as error:
            return self.finish(conn, _describe(error))
        unsent = self.unsent.get(conn)
        if unsent:
            try:
                self.unsent[conn] = unsent[conn.send(unsent):]
            except BlockingIOError:
                pass
            except OSError as error:
                return self.finish(conn, _describe(error))
        self.selector.modify(conn, self.events_for(conn), self.serve)

    def finish(self, conn: socket.socket, event: str) -> None:
        self.note(conn, event)
        self.selector.unregister(conn)
        self.unsent.pop(conn, None)
        self.peers.pop(conn)
        conn.close()

    def run(self) -> None:
        while True:
            for key, _ in self.selector.select():
                key.data(key.fileobj)


def _describe(error: OSError) -> str:
    return "reset" if error.errno == errno.ECONNRESET else f"error {error.errno}"


if __name__ == "__main__":
    with open(sys.argv[1], "a") as log_file:
        Server(log_file).run()
