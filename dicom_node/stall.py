"""Peers that stop reading: a send to one blocks for ever, so the node cuts the association past a bounded wait.

pynetdicom sends without a socket timeout, and its DIMSE timeout covers only the wait for a response: a peer
that accepted the association but stops reading mid-file (a hung PACS process whose kernel advertises a zero
window) blocks the send, and then pynetdicom's own abort, for ever. :func:`watchdog` shuts the connection
down when a block of code runs past its bound, so the send fails and the association ends. The dispatcher
(sending results) and the Q/R SCP (C-GET and C-MOVE sub-operations) both use it.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from pynetdicom.association import Association

from dicom_node.logs import size_in_words

CUT_GRACE_SECONDS = 2.0  # past a C-STORE's or release's time limit: pynetdicom's own abort ends it first


@contextmanager
def watchdog(assoc: Association, seconds: float, *, name: str = "stall-watchdog") -> Iterator[threading.Event]:
    """Cut the association's connection if the block has not ended within ``seconds``; yields whether it did.

    Shutting the socket down makes a blocked send fail, so the association ends. The cut happens only while
    the block runs (never on one that finished), and the watchdog's thread (a daemon named ``name``) ends
    with it.
    """
    cut = threading.Event()
    done = threading.Event()
    lock = threading.Lock()

    def watch() -> None:
        if done.wait(seconds):
            return
        with lock:
            if not done.is_set():
                cut.set()
                shut_down(assoc)

    thread = threading.Thread(target=watch, name=name, daemon=True)
    thread.start()
    try:
        yield cut
    finally:
        with lock:
            done.set()
        thread.join()
        if cut.is_set():
            assoc.abort()  # a no-op once pynetdicom has aborted it; either way its socket is closed
            close(assoc)


def raw_socket(assoc: Association) -> socket.socket | None:
    """The TCP (or TLS) socket under a pynetdicom association, or None once it has none."""
    transport = getattr(assoc.dul, "socket", None)
    return getattr(transport, "socket", None)


def shut_down(assoc: Association) -> None:
    """Shut the connection down both ways: a send blocked on it returns with an error (closed once it has)."""
    sock = raw_socket(assoc)
    if sock is not None:
        with suppress(OSError):  # closed already
            sock.shutdown(socket.SHUT_RDWR)


def close(assoc: Association) -> None:
    """Close the association's socket (after :func:`shut_down`, once nothing is blocked on it)."""
    sock = raw_socket(assoc)
    if sock is not None:
        sock.close()


def stalled(peer: str, item: str, size_bytes: int, waited: float) -> str:
    """``PACS at 10.0.0.5:104 stopped taking data for 32 s while seg.dcm (12.0 MB) was being sent, so the node
    closed the connection``: why a send was cut, naming the peer and what was being sent."""
    return (
        f"{peer} stopped taking data for {waited:.0f} s while {item} ({size_in_words(size_bytes)}) was being "
        "sent, so the node closed the connection"
    )
