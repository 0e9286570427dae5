"""A TCP proxy (threads of the test) that relays connections, then stops reading one direction mid-stream.

It stands for a hung peer whose kernel advertises a zero window: the connection stays open, nothing more is
read, so whoever sends a file larger than the socket buffers blocks mid-file. By default the proxy stops
reading what the caller sends (a destination that stalls while the node stores to it); with
``stall_replies`` it stops reading what the target sends back (a C-GET requestor that stalls while the node
sends it the instances it asked for).
"""

from __future__ import annotations

import contextlib
import socket
import threading

from tests.conftest import free_port

SMALL_BUFFER = 4096  # the proxy's receive buffers: a stalled direction holds little beyond the sender's own


class StallingProxy:
    """Relays connections to ``target_port``; stops reading one direction after ``stall_after`` bytes."""

    def __init__(self, target_port: int, stall_after: int = 100_000, *, stall_replies: bool = False) -> None:
        self.port = free_port()
        self.target_port = target_port
        self.stall_after = stall_after
        self.stall_replies = stall_replies
        self.stalled = threading.Event()  # set once a connection stopped being read
        self._closing = threading.Event()
        self._sockets: list[socket.socket] = []
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)  # inherited by accepted sockets
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(8)
        threading.Thread(target=self._accept, name="stalling-proxy", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                caller, _ = self._listener.accept()
            except OSError:
                return
            target = socket.socket()
            target.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)  # before connecting: it sticks
            self._sockets += [caller, target]
            try:
                target.connect(("127.0.0.1", self.target_port))
            except OSError:
                caller.close()
                continue
            to_target = None if self.stall_replies else self.stall_after
            to_caller = self.stall_after if self.stall_replies else None
            for source, sink, limit in ((caller, target, to_target), (target, caller, to_caller)):
                threading.Thread(
                    target=self._relay, args=(source, sink, limit), name="stalling-proxy", daemon=True
                ).start()

    def _relay(self, source: socket.socket, sink: socket.socket, limit: int | None) -> None:
        relayed = 0
        while True:
            if limit is not None and relayed >= limit:
                self.stalled.set()
                self._closing.wait()  # stop reading: what the sender sends piles up in its buffers
                return
            try:
                data = source.recv(16384 if limit is None else min(16384, limit - relayed))
                if not data:
                    with contextlib.suppress(OSError):
                        sink.shutdown(socket.SHUT_WR)  # the other end sees this side close
                    return
                sink.sendall(data)
            except OSError:
                return
            relayed += len(data)

    def close(self) -> None:
        """Shut every connection down both ways (a close alone wakes no thread blocked on it), so the peers on
        either side see their associations end and no thread outlives the test."""
        self._closing.set()
        for sock in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
