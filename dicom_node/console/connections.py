"""Bounds on the console's HTTP connections: how many are held, from one address and in all, and how long a
request may take to arrive.

Uvicorn holds every connection it accepts for as long as the client keeps it, and waits for a request's headers
without a time limit: a client on the network that opens connections and sends half a request (no login needed)
held a thousand of them, every file handle of ``serve``, which then could not open stored images or accept DICOM
associations. :class:`BoundedHttpProtocol` closes a connection at once where the console already holds
``console.max_connections`` in all or ``console.max_connections_per_address`` from its address, and closes one
whose request has not arrived whole (headers and body) within ``console.request_seconds`` of its opening or of
the previous answer. On an HTTPS console the connection is counted from its TCP accept, before the TLS handshake
(uvicorn's own TLS counted it only once the handshake was over, and waited 60 s for one that never came: a thousand
silent TCP connections again held every file handle), and the handshake, too, must end within
``console.request_seconds``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
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
    """Uvicorn's HTTP/1.1 protocol with the console's :class:`ConnectionLimits`, and TLS where ``tls`` is set."""

    limits: ClassVar[ConnectionLimits]
    tls: ClassVar[ssl.SSLContext | None] = None
    handshaking: ClassVar[set[BoundedHttpProtocol]]  # this listener's connections in their TLS handshake

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._request_deadline: asyncio.TimerHandle | None = None
        self._address: str | None = None
        self._connected = False
        self._handshake: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        peer = transport.get_extra_info("peername")
        self._address = str(peer[0]) if isinstance(peer, tuple) and peer else None
        too_many = self._too_many()
        if too_many is not None:
            address = self._address or "an unknown address"
            log_event(
                LOG,
                logging.WARNING,
                "console.connection_refused",
                listener=self.limits.listener,
                address=address,
                reason=f"a connection from {address} was closed at once: {too_many}",
            )
            transport.abort()
            return
        if self.tls is None:
            self._serve(transport)
            return
        self.handshaking.add(self)
        self._handshake = self.loop.create_task(self._shake_hands(transport))

    def _serve(self, transport: asyncio.Transport) -> None:
        """Hand the connection to uvicorn's HTTP protocol, with the deadline for its first request."""
        self._connected = True
        super().connection_made(transport)
        self._arm_request_deadline()

    async def _shake_hands(self, raw: asyncio.Transport) -> None:
        """TLS on ``raw`` within ``request_seconds``; then serve HTTP on it. A failed handshake closes it."""
        assert self.tls is not None
        early = _EarlyData()
        try:
            secure = await self.loop.start_tls(
                raw, early, self.tls, server_side=True, ssl_handshake_timeout=self.limits.request_seconds
            )
        except OSError as exc:  # TLS errors, a reset, the handshake's time limit
            raw.abort()
            self._handshake_failed(exc)
            return
        except BaseException:  # cancelled as the console stops, or unforeseen: the connection goes all the same
            raw.abort()
            raise
        finally:
            self.handshaking.discard(self)
        if secure is None or secure.is_closing() or early.lost:
            raw.abort()
            return
        self._serve(secure)
        secure.set_protocol(self)
        if early.data:
            self.data_received(bytes(early.data))
        if early.eof:
            self.eof_received()

    def _handshake_failed(self, exc: OSError) -> None:
        address = self._address or "an unknown address"
        why = (
            f"did not finish within {self.limits.request_seconds:g} s (console.request_seconds)"
            if isinstance(exc, (TimeoutError, ConnectionAbortedError))
            else "failed (the client may not speak HTTPS, or did not accept the console's certificate)"
        )
        log_event(
            LOG,
            logging.INFO,
            "console.tls_handshake_failed",
            listener=self.limits.listener,
            address=address,
            reason=f"the TLS handshake with {address} {why}; the connection is closed",
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_request_deadline()
        if self._connected:  # one refused at once, or lost in its handshake, never reached uvicorn
            super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_request_deadline()  # the next request on this connection has as long as the first

    def _too_many(self) -> str | None:
        """Why this new connection is one too many, or None: those served and those in their TLS handshake count."""
        held = [other for other in self.connections if not _closing(other)]
        addresses = [getattr(other, "_address", None) for other in [*held, *self.handshaking]]
        if len(addresses) >= self.limits.total:
            return f"the {self.limits.listener} holds {len(addresses)} connections, its limit (console.max_connections)"
        same = sum(1 for address in addresses if address == self._address)
        if self._address is not None and same >= self.limits.per_address:
            return (
                f"the {self.limits.listener} holds {same} connections from that address, its limit "
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


class _EarlyData(asyncio.Protocol):
    """What a connection sends between the end of its TLS handshake and uvicorn taking it over."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.data.extend(data)

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


def bounded_protocol(limits: ConnectionLimits, tls: ssl.SSLContext | None = None) -> type[BoundedHttpProtocol]:
    """A :class:`BoundedHttpProtocol` class with ``limits`` (and ``tls``, for HTTPS), for one listener's
    ``uvicorn.Config(http=...)``; uvicorn itself is then given no certificate."""
    return type("BoundedHttpProtocol", (BoundedHttpProtocol,), {"limits": limits, "tls": tls, "handshaking": set()})


def server_tls(certificate: str, private_key: str) -> ssl.SSLContext:
    """The HTTPS console's TLS settings: TLS 1.2 or later, the certificate chain and its key."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certificate, private_key)
    return context
