"""pynetdicom's two reactor loops for an accepted association, woken by events instead of polling.

pynetdicom runs two threads per association: the DUL reactor (reads PDUs from the
socket, sends queued ones) and the association reactor (serves each DIMSE message).
Both poll: the DUL loop sleeps ``_run_loop_delay`` whenever it found nothing to
do, the association loop sleeps 1 ms on every turn. Each image therefore waits
for the association thread's next turn, its response for the DUL thread's, and
both threads wake thousands of times a second to find nothing, taking the GIL
from the thread that stores the image (on 2 cores they used 6.6 ms of CPU per
512x512 image, the storing itself under 1 ms).

Here each thread sleeps until there is work:

* the DUL thread blocks in ``select`` on its socket and a doorbell socket that
  :meth:`EventDrivenDUL.send_pdu` (a response to send), :meth:`kill_dul` and
  :meth:`stop_dul` ring;
* the association thread waits on an event set whenever the DUL thread hands it
  a DIMSE message or an ACSE primitive (release, abort), or when the DUL thread ends.

Both also wake every :data:`IDLE_CHECK_SECONDS` to check their timers (ARTIM,
the network timeout), as pynetdicom's loops do on every turn. The loops are
pynetdicom 3.0's, with only the sleeps replaced; ``tests/test_reactors.py``
notices when pynetdicom changes the loops this module stands in for.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import threading
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

PYNETDICOM_LOG = logging.getLogger("pynetdicom")  # the loops below log what pynetdicom's would

IDLE_CHECK_SECONDS = 0.05
"""Longest sleep of either thread with nothing to do: how late a timer (ARTIM, network timeout) may be noticed."""


class _SignallingQueue(queue.Queue[Any]):
    """A queue that sets ``wake`` after every put: the association thread sleeps on that event."""

    def __init__(self, wake: threading.Event) -> None:
        super().__init__()
        self.wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self.wake.set()


class EventDrivenDUL(DULServiceProvider):
    """A DUL reactor that sleeps in ``select`` on its socket and a doorbell, not in ``time.sleep``."""

    _doorbell: tuple[socket.socket, socket.socket]
    _association_wake: threading.Event

    def _install_doorbell(self, association_wake: threading.Event) -> None:
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        self._doorbell = (reader, writer)
        self._association_wake = association_wake
        self._run_loop_delay = 0  # the idle wait is the select below; this only yields the GIL

    def _ring(self) -> None:
        with contextlib.suppress(OSError):  # a full doorbell already rings; a closed one has nobody left to wake
            self._doorbell[1].send(b"\0")

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self._ring()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._ring()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state != "Sta1":
            return False
        self._kill_thread = True
        self._ring()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()
        return True

    def run(self) -> None:  # the thread's target is pynetdicom's run_reactor, bound before the class was switched
        try:
            super().run()
        finally:
            self._association_wake.set()  # the association thread checks whether this thread is alive
            for end in self._doorbell:
                end.close()

    def _is_transport_event(self) -> bool:
        if self.state_machine.current_state != "Sta13":
            self._wait_for_work()
        return super()._is_transport_event()

    def _wait_for_work(self) -> None:
        """Block until the socket is readable, the doorbell rings or the idle check is due; nothing queued."""
        transport = self.socket
        raw = transport.socket if transport is not None else None
        if raw is None or self._kill_thread:
            return
        if not (self.event_queue.empty() and self.to_provider_queue.empty()):
            return
        if isinstance(raw, ssl.SSLSocket) and raw.pending():
            return
        reader = self._doorbell[0]
        try:
            readable, _, _ = select.select([raw, reader], [], [], IDLE_CHECK_SECONDS)
        except (OSError, ValueError):  # closed meanwhile: pynetdicom's own check reports it
            return
        if reader in readable:
            with contextlib.suppress(OSError):  # drained (would block) or closed
                while reader.recv(4096):
                    pass


class EventDrivenAssociation(Association):
    """An acceptor whose reactor sleeps on an event set when the DUL thread hands it work."""

    _wake: threading.Event

    def _run_reactor(self) -> None:
        """pynetdicom 3.0's acceptor loop, waiting on :attr:`_wake` instead of sleeping 1 ms per turn."""
        self._is_paused = False
        while not self._kill:
            if self.dimse.msg_queue.empty():
                self._is_paused = True  # not touching the queues while asleep: release() may go ahead
                self._wake.wait(IDLE_CHECK_SECONDS)
                self._wake.clear()

            # As pynetdicom's: a thread that sends on this association pauses the reactor first
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, context_id)  # type: ignore[arg-type]  # set whenever msg is

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                PYNETDICOM_LOG.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                PYNETDICOM_LOG.info(log_msg)
                self.dul.receive_pdu(wait=False)  # EVT_ACSE_RECV fires for subscribers
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                PYNETDICOM_LOG.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


def make_event_driven(association: Association) -> None:
    """Turn an accepted association, before its thread starts, into one whose two threads sleep until there is work.

    Its DUL must already be a :class:`EventDrivenDUL` (or a subclass).
    """
    dul = association.dul
    if not isinstance(dul, EventDrivenDUL):
        raise TypeError("the association's DUL must be an EventDrivenDUL")
    wake = threading.Event()
    association.__class__ = EventDrivenAssociation
    association._wake = wake  # type: ignore[attr-defined]  # the class was just switched
    association.dimse.msg_queue = _SignallingQueue(wake)
    dul.to_user_queue = _SignallingQueue(wake)
    dul._install_doorbell(wake)
