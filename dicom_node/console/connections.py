"""Bounds on the console's HTTP connections: how many are held, from one address and in all, and how long a
request may take to arrive.

Uvicorn holds every connection it accepts for as long as the client keeps it, and waits for a request's headers
without a time limit: a client on the network that opens connections and sends half a request (no login needed)
held a thousand of them, every file handle of ``serve``, which then could not open stored images or accept DICOM
associations. :class:`BoundedHttpProtocol` closes a connection at once where the console already holds
``console.max_connections`` in all or ``console.max_connections_per_address`` from its address, and closes one
whose request has not arrived whole (headers and body) within ``console.request_seconds`` of its opening or of
the previous answer. A TLS handshake that never ends is given up by Python's own limit (60 s).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from dicom_node.logs import log_event

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectionLimits:
    """The console's bounds (``console.max_connections``, ``max_connections_per_address``, ``request_seconds``)."""

    total: int
    per_address: int
    request_seconds: float
    listener: str = "console"


class BoundedHttpProtocol(H11Protocol):
    """Uvicorn's HTTP/1.1 protocol with the console's :class:`ConnectionLimits`."""

    limits: ClassVar[ConnectionLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._request_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        too_many = self._too_many()
        if too_many is not None:
            address = self.client[0] if self.client else "an unknown address"
            log_event(
                LOG,
                logging.WARNING,
                "console.connection_refused",
                listener=self.limits.listener,
                address=address,
                reason=f"a connection from {address} was closed at once: {too_many}",
            )
            transport.close()
            return
        self._arm_request_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_request_deadline()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_request_deadline()  # the next request on this connection has as long as the first

    def _too_many(self) -> str | None:
        """Why this new connection is one too many, or None. It is already counted among the held ones."""
        held = [other for other in self.connections if other is self or not _closing(other)]
        if len(held) > self.limits.total:
            return f"the {self.limits.listener} holds {len(held) - 1} connections, its limit (console.max_connections)"
        address = self.client[0] if self.client else None
        same = sum(1 for other in held if (getattr(other, "client", None) or (None,))[0] == address)
        if address is not None and same > self.limits.per_address:
            return (
                f"the {self.limits.listener} holds {same - 1} connections from that address, its limit "
                "(console.max_connections_per_address)"
            )
        return None

    def _arm_request_deadline(self) -> None:
        self._cancel_request_deadline()
        self._request_deadline = self.loop.call_later(self.limits.request_seconds, self._request_overdue)

    def _cancel_request_deadline(self) -> None:
        if self._request_deadline is not None:
            self._request_deadline.cancel()
            self._request_deadline = None

    def _request_overdue(self) -> None:
        """Close the connection if its request has not arrived whole; one being answered is left alone."""
        self._request_deadline = None
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            log_event(
                LOG,
                logging.INFO,
                "console.request_too_slow",
                listener=self.limits.listener,
                address=self.client[0] if self.client else "an unknown address",
                reason=f"no whole request arrived within {self.limits.request_seconds:g} s (console.request_seconds); "
                "the connection is closed",
            )
            self.transport.close()


def _closing(protocol: object) -> bool:
    """Whether a held connection is being closed already (one refused a moment ago no longer counts)."""
    transport = getattr(protocol, "transport", None)
    return transport is None or transport.is_closing()


def bounded_protocol(limits: ConnectionLimits) -> type[BoundedHttpProtocol]:
    """A :class:`BoundedHttpProtocol` class with ``limits``, for one listener's ``uvicorn.Config(http=...)``."""
    return type("BoundedHttpProtocol", (BoundedHttpProtocol,), {"limits": limits})
