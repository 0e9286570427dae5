"""Who may talk to the node and what each peer may do; DICOM TLS; limits that hold before anyone is known.

Three layers, in the order a caller meets them:

1. **Connection** (:class:`GuardedServer`): a source address may hold at most
   ``network.maximum_associations_per_host`` open connections (more are closed
   at once); with ``network.tls`` the TLS handshake runs in the connection's
   own thread under ``association_request_timeout_seconds``.
2. **PDU** (:class:`GuardedDUL`): every PDU must arrive whole within
   ``pdu_read_timeout_seconds`` of its first byte, an A-ASSOCIATE-RQ may be at
   most ``maximum_association_request_bytes`` and any other PDU at most the
   PDU size we advertise; a PDU over its limit aborts the association before
   its body is read. A whole DIMSE message must arrive at
   :attr:`Limits.message_bytes_per_second` once ``pdu_read_timeout_seconds`` have passed.
3. **Association** (:func:`on_requested`): the calling AE title must belong
   to a peer configured for the caller's address; the presentation contexts a
   peer may use follow its roles, and every DIMSE request is checked again
   against them (:func:`require_role`).

pynetdicom 3 has no hook for 1 and 2: :class:`GuardedServer` is passed to
``AE.make_server`` (``server_class``), and its request handler gives each
new association the :class:`GuardedDUL` reader before the association's
threads start.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import grp
import hashlib
import io
import ipaddress
import logging
import multiprocessing
import re
import socket
import ssl
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # pynetdicom creates its SOP classes at import; its stubs do not list them
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import ALL_ROLES, Destination, NetworkSettings, PeerSettings, Settings, TlsSettings
from dicom_node.logs import log_event, log_throttled
from dicom_node.periodic import PeriodicTask
from dicom_node.reactors import EventDrivenDUL, make_event_driven
from dicom_node.store_response import send_store_responses_directly

LOG = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.0/8", "::1/128")
ANY_HOST = ("0.0.0.0/0", "::/0")
NOT_AUTHORIZED = 0x0124
"""DIMSE status "Refused: Not Authorized" (PS3.7 Annex C)."""

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


# --------------------------------------------------------------------------- peers


@dataclass(frozen=True)
class Peer:
    """A configured caller: an AE title (or any, when ``ae_title`` is None) from some networks, with roles."""

    name: str
    ae_title: str | None
    networks: tuple[Network, ...]
    roles: frozenset[str]
    certificate_names: frozenset[str] = frozenset()
    """With mutual TLS, names one of which the caller's certificate must carry; empty: any trusted certificate."""

    def calls_from(self, address: str) -> bool:
        """Whether ``address`` is in one of the peer's networks. An IPv4 caller of a dual-stack node
        (``::ffff:a.b.c.d``) is matched as IPv4; IPv4 networks (``0.0.0.0/0`` too) admit IPv4 callers only and IPv6
        networks (``::/0`` too) IPv6 callers only."""
        ip = _ip(address)
        return ip is not None and any(ip in network for network in self.networks if network.version == ip.version)

    def may(self, role: str) -> bool:
        return role in self.roles

    def closest_network(self, address: str) -> int | None:
        """The prefix length of the smallest of the peer's networks that holds ``address`` (the most specific
        match); None where none does."""
        ip = _ip(address)
        if ip is None:
            return None
        held = [network.prefixlen for network in self.networks if network.version == ip.version and ip in network]
        return max(held, default=None)

    @property
    def hosts(self) -> str:
        return ", ".join(str(n) for n in self.networks)


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The caller's address, an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``) as IPv4; None if it is none."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def shown_address(address: str) -> str:
    """``address`` as a log sentence names it: an IPv4 caller of a dual-stack node as its IPv4 address."""
    ip = _ip(address)
    return str(ip) if ip is not None and ip.version == 4 else address


OWN_HEALTH_CHECK = Peer("the node's own health check", None, (), frozenset({"echo"}))
"""The node calling itself from this machine with its own AE title (``/readyz``, the Docker health check): admitted
for C-ECHO only, whatever ``peers`` says, so a node listening on one of its addresses (``network.host``), whose
own call comes from that address and not from loopback, still passes its own health check."""


def from_this_machine(assoc: Any) -> bool:
    """Whether the association's caller is on this machine: it calls from loopback, or from the very address it
    called (the node's own listening address); no other host can open a TCP connection from those."""
    caller = _ip(str(assoc.requestor.address or ""))
    if caller is None:
        return False
    if caller.is_loopback:
        return True
    transport = getattr(getattr(assoc, "dul", None), "socket", None)
    sock = transport.socket if transport is not None else None
    try:
        local = _ip(str(sock.getsockname()[0])) if sock is not None else None
    except OSError:
        return False
    return local is not None and caller == local


class Refused(str):
    """Why a caller is not admitted: a sentence for the log, naming the AE title and address."""


LEGACY_ROLES = frozenset({"store", "echo"})
"""What an AE title of the deprecated ``network.allowed_calling_ae_titles`` may do, from any host: send images,
never read them (anyone can claim an AE title)."""


class PeerPolicy:
    """The peers of ``settings.peers`` (or the loopback default), and the deprecated AE title allow-list."""

    def __init__(self, peers: Iterable[Peer], description: str) -> None:
        self.peers = tuple(peers)
        self.description = description

    @classmethod
    def from_settings(cls, settings: Settings) -> PeerPolicy:
        peers = [_peer(name, peer) for name, peer in settings.peers.items()]
        legacy = settings.network.allowed_calling_ae_titles
        for title in legacy:
            peers.append(Peer(f"allowed_calling_ae_titles:{title}", title, _networks(ANY_HOST), LEGACY_ROLES))
        if not peers:
            return cls.loopback_only()
        names = ", ".join(
            f"{p.name} ({p.ae_title or 'any AE title'} from {p.hosts}: {','.join(sorted(p.roles))})" for p in peers
        )
        return cls(peers, f"admitting configured peers only: {names}")

    @classmethod
    def loopback_only(cls) -> PeerPolicy:
        """The default: any AE title from this machine, every role."""
        loopback = Peer("loopback", None, _networks(LOOPBACK), frozenset(ALL_ROLES))
        return cls(
            [loopback],
            "no peers configured: admitting any AE title from this machine (loopback) only, "
            "with every role; add peers to config.yaml to admit other hosts",
        )

    def admits_address(self, address: str) -> bool:
        """Whether any peer may call from ``address``."""
        return any(peer.calls_from(address) for peer in self.peers)

    def sends_from(self, address: str) -> bool:
        """Whether a peer that may send images (the ``store`` role) calls from ``address``."""
        return any(peer.may("store") and peer.calls_from(address) for peer in self.peers)

    def sender_at(self, address: str) -> Peer | None:
        """The image-sending peer (the ``store`` role) whose network holding ``address`` is the smallest (a PACS
        at 10.1.9.9 inside a scanner network 10.1.0.0/16 is the PACS), the first on a tie; None where none calls
        from it. An entry that admits any host (``0.0.0.0/0``, the deprecated AE title allow-list) is left out:
        it is no group of addresses to share places by."""
        matches = [
            (prefix, index, peer)
            for index, peer in enumerate(self.sending_entries())
            if (prefix := peer.closest_network(address)) is not None
        ]
        return max(matches, key=lambda match: (match[0], -match[1]))[2] if matches else None

    def sending_entries(self) -> list[Peer]:
        """The image-sending peers whose places are shared by entry: all but those that admit any host."""
        return [
            peer
            for peer in self.peers
            if peer.may("store") and not any(network.prefixlen == 0 for network in peer.networks)
        ]

    def identify(self, ae_title: str, address: str) -> Peer | Refused:
        """The peer this call comes from, or why it is refused.

        A peer named by AE title wins over one that admits any AE title: a
        known AE title calling from a host its peer does not list is refused,
        even where an any-title peer covers that host.
        """
        ae_title = ae_title.strip()
        named = [p for p in self.peers if p.ae_title == ae_title]
        for peer in named:
            if peer.calls_from(address):
                return peer
        if named:
            hosts = "; ".join(p.hosts for p in named)
            return Refused(f"AE title {ae_title} is configured for {hosts}, but called from {shown_address(address)}")
        for peer in self.peers:
            if peer.ae_title is None and peer.calls_from(address):
                return peer
        return Refused(f"no peer is configured for AE title {ae_title} calling from {shown_address(address)}")


def _peer(name: str, settings: PeerSettings) -> Peer:
    return Peer(
        name,
        settings.ae_title,
        _networks(settings.hosts),
        frozenset(settings.roles),
        frozenset(n.strip() for n in settings.certificate_names),
    )


def certificate_names(sock: object) -> list[str]:
    """The names a caller's TLS certificate carries: its subject's common name, then its subjectAltName's DNS
    names and IP addresses; none on a plain connection or without a certificate."""
    if not isinstance(sock, ssl.SSLSocket):
        return []
    certificate: Any = sock.getpeercert() or {}  # typeshed types its values loosely
    names = [value for rdn in certificate.get("subject", ()) for key, value in rdn if key == "commonName"]
    names += [value for kind, value in certificate.get("subjectAltName", ()) if kind in ("DNS", "IP Address")]
    return [str(name) for name in names]


def certificate_refusal(peer: Peer, sock: object) -> Refused | None:
    """Why the caller's certificate is not one configured for ``peer`` (``peers.<name>.certificate_names``), else
    None."""
    if not peer.certificate_names:
        return None
    presented = certificate_names(sock)
    configured = {name.lower() for name in peer.certificate_names}
    if configured & {name.lower() for name in presented}:  # DNS names are case-insensitive
        return None
    shown = ", ".join(presented) or "none"
    return Refused(
        f"the TLS certificate presented (names: {shown}) is not one configured for peer {peer.name} "
        f"(peers.{peer.name}.certificate_names: {', '.join(sorted(peer.certificate_names))})"
    )


def _networks(hosts: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(h, strict=False) for h in hosts)


def log_policy(settings: Settings, policy: PeerPolicy) -> None:
    """The start-up lines: who is admitted, a deprecation warning for the old allow-list, and a warning for each
    peer that mutual TLS does not bind to its certificate."""
    log_event(LOG, logging.INFO, "security.peers", policy=policy.description)
    if settings.network.allowed_calling_ae_titles:
        log_event(
            LOG,
            logging.WARNING,
            "config.deprecated",
            key="network.allowed_calling_ae_titles",
            hint="move these AE titles to peers (with hosts and roles); until then they are admitted from any host "
            "to store and echo only: an AE title alone proves no one's identity, so it opens no patient's data",
        )
    if settings.network.maximum_pdu_size == 0:
        log_event(LOG, logging.INFO, "config.pdu_size", hint="network.maximum_pdu_size 0 now means the 16 MiB ceiling")
    tls = settings.network.tls
    if tls is not None and tls.require_client_certificate:
        for name, peer in settings.peers.items():
            if not peer.certificate_names:
                log_event(
                    LOG,
                    logging.WARNING,
                    "config.unbound_peer",
                    peer=name,
                    hint=f"any certificate your CA signed may call as peer {name} "
                    f"({peer.ae_title or 'any AE title'}) with its roles ({', '.join(peer.roles)}); "
                    f"bind it with peers.{name}.certificate_names",
                )


# ------------------------------------------------------------- association-time check


SERVICE_ROLES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.2.1.1": "find",  # Patient Root Find
    "1.2.840.10008.5.1.4.1.2.2.1": "find",  # Study Root Find
    "1.2.840.10008.5.1.4.1.2.1.2": "move",
    "1.2.840.10008.5.1.4.1.2.2.2": "move",
    "1.2.840.10008.5.1.4.1.2.1.3": "get",
    "1.2.840.10008.5.1.4.1.2.2.3": "get",
    str(Verification): "echo",
}


def context_allowed(abstract_syntax: str, peer: Peer) -> bool:
    """Whether ``peer`` may use a presentation context.

    C-FIND contexts are open to peers that may find, move or get (the latter
    two only for narrow queries, see :mod:`dicom_node.retrieve.scp`); storage
    contexts to peers that store, or that get (C-GET answers come back as
    C-STOREs on the requestor's storage contexts).
    """
    role = SERVICE_ROLES.get(str(abstract_syntax))
    if role == "find":
        return bool({"find", "move", "get"} & peer.roles)
    if role is not None:
        return peer.may(role)
    return peer.may("store") or peer.may("get")


PEER_ATTRIBUTE = "dicom_node_peer"
"""Where :func:`on_requested` leaves the peer it admitted on the association, for :func:`peer_of`."""


def on_requested(
    event: evt.Event,
    policy: PeerPolicy,
    caps: AssociationCaps | None = None,
    on_rejected: Callable[[evt.Event, str], None] | None = None,
) -> None:
    """EVT_REQUESTED: refuse a caller that is no configured peer; narrow the contexts to its roles.

    ``network.maximum_associations`` caps the connections of image senders in the counts of the server that
    accepted the connection (``caps`` if given): with several receiving processes those of every process.
    pynetdicom's own check counts every association of this process, the extra places included.
    ``on_rejected`` is called with the event of each association refused here and why (its audit
    record): pynetdicom's EVT_REJECTED does not fire for a rejection sent from this handler.

    Fails closed: pynetdicom goes on negotiating when this handler raises, so an error while checking
    the caller rejects the association instead of admitting it unchecked.
    """
    try:
        _admit_or_reject(event, policy, caps, on_rejected)
    except Exception:  # whatever went wrong, the caller was not checked
        assoc = event.assoc
        request = assoc.requestor.primitive
        LOG.exception(
            "association.rejected",
            extra={
                "event_fields": {
                    "calling_ae": str(request.calling_ae_title).strip() if request is not None else None,
                    "address": assoc.requestor.address,
                    "reason": "the node could not check this caller against the configured peers (an internal "
                    "error, details follow); refused rather than admitted unchecked",
                }
            },
        )
        if not (assoc.is_rejected or assoc.is_aborted):
            assoc.acse.send_reject(0x02, 0x01, 0x01)  # transient, service user, no reason given
            if on_rejected is not None:
                with suppress(Exception):  # the audit record is best effort here: the rejection stands
                    on_rejected(event, "the node could not check this caller against the configured peers")
        assoc.kill()


def _admit_or_reject(
    event: evt.Event,
    policy: PeerPolicy,
    caps: AssociationCaps | None,
    on_rejected: Callable[[evt.Event, str], None] | None,
) -> None:
    assoc = event.assoc
    request = assoc.requestor.primitive
    assert request is not None  # EVT_REQUESTED is the A-ASSOCIATE request arriving
    ae_title = str(request.calling_ae_title).strip()
    address = assoc.requestor.address
    found = policy.identify(ae_title, address)
    if isinstance(found, Refused) and ae_title == str(assoc.acceptor.ae_title).strip() and from_this_machine(assoc):
        found = OWN_HEALTH_CHECK
    if not isinstance(found, Refused):
        sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
        found = certificate_refusal(found, sock) or found
    if isinstance(found, Refused):
        _reject(event, str(found), (0x01, 0x01, 0x03), on_rejected)  # permanent, service user, AE not recognised
        return
    too_small = _pdu_too_small(request.maximum_length_received, ae_title, address)
    if too_small is not None:
        _reject(event, too_small, (0x01, 0x01, 0x01), on_rejected)  # permanent, service user, no reason given
        return
    full = _senders_limit_reached(assoc, address, caps)
    if full is not None:
        _reject(event, full, (0x02, 0x03, 0x02), on_rejected)  # transient, service provider, local limit exceeded
        return
    assoc.acceptor.supported_contexts = [
        cx for cx in assoc.acceptor.supported_contexts if context_allowed(str(cx.abstract_syntax), found)
    ]
    setattr(assoc, PEER_ATTRIBUTE, found)


def _reject(
    event: evt.Event,
    reason: str,
    codes: tuple[int, int, int],
    on_rejected: Callable[[evt.Event, str], None] | None,
) -> None:
    """Send the A-ASSOCIATE-RJ ``codes`` (result, source, diagnostic), log and audit ``reason``, and close."""
    assoc = event.assoc
    request = assoc.requestor.primitive
    ae_title = str(request.calling_ae_title).strip() if request is not None else None
    address = assoc.requestor.address
    log_throttled(
        LOG, logging.WARNING, "association.rejected", address, calling_ae=ae_title, address=address, reason=reason
    )
    assoc.acse.send_reject(*codes)
    if on_rejected is not None:
        on_rejected(event, reason)
    assoc.kill()


SMALLEST_PEER_PDU_BYTES = 4096
"""The smallest maximum PDU length a caller may ask the node to send in (DCMTK's smallest, ``ASC_MINIMUMPDUSIZE``; 0
means no limit). pynetdicom fails on a PDU of under 8 bytes and aborts; one of a few bytes sends a study as millions
of PDUs and holds a core for minutes."""


def _pdu_too_small(maximum_length: int | None, ae_title: str, address: str) -> str | None:
    """Why an association whose caller asks for PDUs of at most ``maximum_length`` bytes is refused; None if not."""
    if not maximum_length or maximum_length >= SMALLEST_PEER_PDU_BYTES:
        return None
    return (
        f"{ae_title} at {address} asked for PDUs of at most {maximum_length} bytes, fewer than the "
        f"{SMALLEST_PEER_PDU_BYTES} the node sends in at the least; set the peer's maximum PDU length to "
        f"{SMALLEST_PEER_PDU_BYTES} bytes or more (0: no limit)"
    )


def _senders_limit_reached(assoc: Any, address: str, caps: AssociationCaps | None) -> str | None:
    """Why an image sender's association from ``address`` is over ``network.maximum_associations``; None if not.

    Only the connections of image senders count, over every receiving process (``caps``, else the server's own):
    the places of peers that send no images and of unknown addresses come on top and are capped at accept.
    """
    server = getattr(assoc, "_server", None)
    if not isinstance(server, GuardedServer) or server.caps_key(address) != address:
        return None
    held = (caps or server.caps).total()
    if held <= server.limits.senders:
        return None
    return (
        f"association limit reached: {held - 1} other connections of peers that send images are open "
        f"(network.maximum_associations is {server.limits.senders})"
    )


def peer_of(event: evt.Event, policy: PeerPolicy) -> Peer | Refused:
    """The peer admitted for this association (its certificate checked, where bound), else identified anew."""
    admitted = getattr(event.assoc, PEER_ATTRIBUTE, None)
    if isinstance(admitted, Peer):
        return admitted
    requestor = event.assoc.requestor
    return policy.identify(requestor.ae_title, requestor.address)


def require_role(role: str, policy: PeerPolicy, handler: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a C-STORE or C-ECHO handler: callers without ``role`` get 0x0124 (Refused: Not Authorized)."""

    @functools.wraps(handler)
    def guarded(event: evt.Event, *args: Any) -> Any:
        peer = peer_of(event, policy)
        if isinstance(peer, Refused) or not peer.may(role):
            return not_authorized(event, role, peer)
        return handler(event, *args)

    return guarded


def not_authorized(event: evt.Event, role: str, peer: Peer | Refused) -> Dataset:
    """Log why, and answer 0x0124 with a short fixed comment.

    A peer can repeat such a request at will (a query in a loop): one line per peer address, AE title and role
    each 10 s, the next one counting those left out (``not_logged_since_last``)."""
    requestor = event.assoc.requestor
    reason = peer if isinstance(peer, Refused) else f"peer {peer.name} has no {role} role"
    log_throttled(
        LOG,
        logging.WARNING,
        "request.refused",
        (requestor.address, requestor.ae_title, role),
        calling_ae=requestor.ae_title,
        address=requestor.address,
        role=role,
        reason=reason,
    )
    status = Dataset()
    status.Status = NOT_AUTHORIZED
    status.ErrorComment = f"Not authorized: no {role} role"
    return status


# ------------------------------------------------------------------------------ TLS


TLS_FAILURES = {
    "WRONG_VERSION_NUMBER": "the caller did not speak TLS (plain DICOM to the TLS port?)",
    "HTTP_REQUEST": "the caller sent an HTTP request, not TLS",
    "UNKNOWN_PROTOCOL": "the caller did not speak TLS (plain DICOM to the TLS port?)",
    "UNSUPPORTED_PROTOCOL": "the caller offers only TLS versions older than network.tls.minimum_version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "the caller offers only TLS versions older than network.tls.minimum_version",
    "NO_SHARED_CIPHER": "the caller offers no cipher the node accepts",
    "NO_CIPHERS_AVAILABLE": "the caller offers no cipher the node accepts",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the caller sent no certificate, and network.tls.require_client_certificate "
    "is on",
    "CERTIFICATE_VERIFY_FAILED": "the caller's certificate is not signed by a CA in network.tls.ca_certificates, or "
    "is expired or not valid yet",
    "TLSV1_ALERT_UNKNOWN_CA": "the caller does not trust the node's certificate (its CA is unknown to the caller)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the caller refused the node's certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the caller refused the node's certificate as expired",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the caller refused the node's certificate",
    "TLSV1_ALERT_DECRYPT_ERROR": "the caller refused the node's certificate or key",
}
"""OpenSSL's reasons for a failed handshake that admins meet, as the cause in words."""


def handshake_failure(error: BaseException) -> str:
    """Why a caller's TLS handshake failed, for ``connection.refused``: the cause in words where OpenSSL's reason
    is a known one, with OpenSSL's own code in brackets for a search."""
    code = getattr(error, "reason", None)
    if not code:
        return "TLS handshake failed (the caller closed the connection)"
    said = TLS_FAILURES.get(str(code))
    return f"TLS handshake failed: {said} [{code}]" if said else f"TLS handshake failed [OpenSSL: {code}]"


def server_tls(tls: TlsSettings) -> ssl.SSLContext:
    """The SCP's TLS context: our certificate, TLS 1.2+, client certificates verified when required."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=_optional(tls.ca_certificates))
    context.minimum_version = _version(tls.minimum_version)
    context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.require_client_certificate:
        context.verify_mode = ssl.CERT_REQUIRED
    else:  # a certificate that is presented must still be valid
        context.verify_mode = ssl.CERT_OPTIONAL if tls.ca_certificates else ssl.CERT_NONE
    return context


_node_tls: TlsSettings | None = None
"""``network.tls`` of the running node (see :func:`apply`), for :func:`client_tls` callers that lack settings."""


def apply(settings: Settings) -> PeerPolicy:
    """At start: remember ``network.tls`` for outgoing associations, log who is admitted, and warn about TLS files
    (:func:`tls_file_warnings`)."""
    global _node_tls
    _node_tls = settings.network.tls
    policy = PeerPolicy.from_settings(settings)
    log_policy(settings, policy)
    for event, fields in tls_file_warnings(settings):
        log_event(LOG, logging.WARNING, event, **fields)
    return policy


CERTIFICATE_WARNING_DAYS = 30
"""A certificate that expires within this many days is warned about at every start."""


def tls_files(settings: Settings) -> list[tuple[str, Path, str, Path]]:
    """The certificates and private keys the node presents: (certificate's key, file, private key's key, file)."""
    pairs = []
    tls = settings.network.tls
    if tls is not None:
        pairs.append(("network.tls.certificate", tls.certificate, "network.tls.private_key", tls.private_key))
    web = settings.console
    if web.enabled and web.tls_certificate is not None and web.tls_private_key is not None:
        pairs.append(("console.tls_certificate", web.tls_certificate, "console.tls_private_key", web.tls_private_key))
    return pairs


def certificate_lifetime(path: Path) -> tuple[datetime, datetime] | None:
    """When the first certificate of the PEM file ``path`` (the node's own; intermediate ones follow it) becomes valid
    and when it expires, in UTC; None where the file holds no certificate that can be read."""
    from cryptography import x509

    try:
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        return None
    return certificate.not_valid_before_utc, certificate.not_valid_after_utc


def certificate_date_problem(key: str, path: Path, now: datetime) -> str | None:
    """Why the certificate ``path`` (the setting ``key``) cannot be presented at ``now``: expired, or not valid yet."""
    lifetime = certificate_lifetime(path)
    if lifetime is None:
        return None
    not_before, not_after = lifetime
    if now > not_after:
        return (
            f"{key} {path} expired on {_day(not_after)}: every caller would refuse it during the TLS handshake; "
            "install a renewed certificate and start again"
        )
    if now < not_before:
        return (
            f"{key} {path} is not valid before {_day(not_before)}: every caller would refuse it during the TLS "
            "handshake; check this machine's clock, or install a certificate valid now"
        )
    return None


def tls_file_warnings(settings: Settings, now: datetime | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Start-up warnings (event, fields) about the node's TLS files: a certificate that expires within
    :data:`CERTIFICATE_WARNING_DAYS`, and a private key that users other than the node's may read."""
    now = now or datetime.now(timezone.utc)
    warnings: list[tuple[str, dict[str, Any]]] = []
    for cert_key, certificate, key_key, private_key in tls_files(settings):
        with suppress(OSError):
            lifetime = certificate_lifetime(certificate)
            if lifetime is not None and now <= lifetime[1] <= now + timedelta(days=CERTIFICATE_WARNING_DAYS):
                days = (lifetime[1] - now).days
                warnings.append(
                    (
                        "tls.certificate_expires_soon",
                        {
                            "key": cert_key,
                            "file": str(certificate),
                            "expires": _day(lifetime[1]),
                            "hint": f"{cert_key} {certificate} expires on {_day(lifetime[1])} (in {days} day(s)); "
                            "install a renewed certificate and restart the node before then, or every TLS caller "
                            "will be refused",
                        },
                    )
                )
        with suppress(OSError):
            readers = _other_readers(private_key)
            if readers:
                warnings.append(
                    (
                        "tls.private_key_readable",
                        {
                            "key": key_key,
                            "file": str(private_key),
                            "hint": f"{key_key} {private_key} may be read by {readers}: whoever reads it can pose as "
                            f"this node; chmod 600 {private_key}",
                        },
                    )
                )
    return warnings


CERTIFICATE_CHECK_SECONDS = 6 * 3600.0
"""How often a running node looks again at the dates of the certificates it presents."""


class CertificateWatch(PeriodicTask):
    """Every :data:`CERTIFICATE_CHECK_SECONDS`, warns about a certificate the node presents that expires within
    :data:`CERTIFICATE_WARNING_DAYS` (``tls.certificate_expires_soon``), and says at ERROR when it has expired
    (``tls.certificate_expired``): a node runs for months, and start-up's warning is long scrolled away by then.

    The dates are those of the certificate read at start, the one the node presents until it restarts, not of a
    renewed file on disk."""

    name = "certificate_watch"

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        super().__init__(settings, sessions)
        self.presented: list[tuple[str, Path, datetime]] = []
        for cert_key, certificate, _key_key, _private_key in tls_files(settings):
            with suppress(OSError):
                lifetime = certificate_lifetime(certificate)
                if lifetime is not None:
                    self.presented.append((cert_key, certificate, lifetime[1]))
        self._passes = 0

    @property
    def interval_seconds(self) -> float:
        return CERTIFICATE_CHECK_SECONDS

    def run_once(self) -> None:
        """The first pass, at start, says nothing: start-up has warned already (:func:`tls_file_warnings`)."""
        self._passes += 1
        if self._passes > 1:
            self.check(datetime.now(timezone.utc))

    def check(self, now: datetime) -> None:
        """Log each presented certificate that has expired or expires soon at ``now``."""
        for cert_key, certificate, not_after in self.presented:
            if now > not_after:
                log_event(
                    LOG,
                    logging.ERROR,
                    "tls.certificate_expired",
                    key=cert_key,
                    file=str(certificate),
                    expired=_day(not_after),
                    hint=f"{cert_key} {certificate}, which the node presents since it started, expired on "
                    f"{_day(not_after)}: every TLS caller refuses it now; install a renewed certificate and restart "
                    "the node",
                )
            elif not_after <= now + timedelta(days=CERTIFICATE_WARNING_DAYS):
                log_event(
                    LOG,
                    logging.WARNING,
                    "tls.certificate_expires_soon",
                    key=cert_key,
                    file=str(certificate),
                    expires=_day(not_after),
                    hint=f"{cert_key} {certificate}, which the node presents since it started, expires on "
                    f"{_day(not_after)} (in {(not_after - now).days} day(s)); install a renewed certificate and "
                    "restart the node before then, or every TLS caller will be refused",
                )


def _other_readers(path: Path) -> str | None:
    """Who besides the file's owner may read ``path``, in words (its group, everyone), or None."""
    mode = path.stat().st_mode
    if mode & stat.S_IROTH:
        return "every user of this machine"
    if mode & stat.S_IRGRP:
        try:
            group = grp.getgrgid(path.stat().st_gid).gr_name
        except KeyError:
            group = str(path.stat().st_gid)
        return f"the members of its group {group}"
    return None


def _day(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def client_tls(
    destination: Destination | PeerSettings, tls: TlsSettings | None = None
) -> tuple[ssl.SSLContext, str] | None:
    """``tls_args`` for ``AE.associate`` to a destination or peer: None unless it has ``tls: true``.

    ``tls`` defaults to the running node's ``network.tls`` (:func:`apply`).

    The peer's certificate must chain to ``network.tls.ca_certificates`` (or the
    system's CAs) and, with ``check_hostname``, name the configured host; our
    certificate goes along for peers that require one.

    Raises
    ------
    ValueError
        If the peer wants TLS but ``network.tls`` is not configured.
    """
    if not destination.tls:
        return None
    tls = tls or _node_tls
    if tls is None:
        raise ValueError(f"{destination.ae_title} is set to tls: true, but network.tls is not configured")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=_optional(tls.ca_certificates))
    context.minimum_version = _version(tls.minimum_version)
    context.check_hostname = tls.check_hostname
    context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    return context, str(destination.host)


def _version(name: str) -> ssl.TLSVersion:
    return ssl.TLSVersion.TLSv1_3 if name == "TLSv1.3" else ssl.TLSVersion.TLSv1_2


def _optional(path: Any) -> str | None:
    return str(path) if path else None


# --------------------------------------------------------------- bounded resources


@dataclass(frozen=True)
class Limits:
    """What a caller may cost the node before and after association."""

    association_request_bytes: int
    pdu_bytes: int
    association_request_seconds: float
    pdu_seconds: float
    per_host: int
    message_bytes_per_second: float = 2_000
    """``network.minimum_message_kilobytes_per_second``: the slowest a message (its command and its data set) may
    arrive on average from its first fragment, once ``pdu_seconds`` have passed. Each PDU resets the idle timeout
    and arrives whole within its own deadline, so without it a peer sending two bytes of a command every 20 s would
    hold its association (and a place of ``network.maximum_associations``) for ever."""
    data_set_bytes: int = 3_000_000_000
    in_flight_bytes: int = 6_000_000_000
    senders: int = 16
    """``network.maximum_associations``: connections of image senders open at a time, over every receiving process."""
    per_peer: int = 12
    """``network.maximum_associations_per_peer``: connections one image-sending peer entry holds, all its addresses
    together."""

    @classmethod
    def from_settings(cls, network: NetworkSettings) -> Limits:
        return cls(
            association_request_bytes=network.maximum_association_request_bytes,
            pdu_bytes=network.receive_pdu_limit,
            association_request_seconds=network.association_request_timeout_seconds,
            pdu_seconds=network.pdu_read_timeout_seconds,
            per_host=network.maximum_associations_per_host,
            message_bytes_per_second=network.minimum_message_kilobytes_per_second * 1000,
            data_set_bytes=int(network.maximum_data_set_megabytes * 1_000_000),
            in_flight_bytes=int(network.maximum_in_flight_megabytes * 1_000_000),
            senders=network.maximum_associations,
            per_peer=network.maximum_associations_per_peer or network.maximum_associations,
        )

    def for_pdu(self, pdu_type: int) -> int:
        """Largest acceptable length field of a PDU of this type.

        P-DATA-TF: our advertised maximum PDU length plus the 6-byte PDV item
        header allowance peers commonly include; A-ASSOCIATE-RQ/AC: the request
        limit; release, reject and abort PDUs have 4-byte bodies.
        """
        if pdu_type == 0x04:
            return self.pdu_bytes + 6
        if pdu_type in (0x01, 0x02):
            return self.association_request_bytes
        return 64


class PduRefused(Exception):
    """A PDU broke a limit; the message says which, for the log."""


VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
QUERY_RETRIEVE_PREFIX = "1.2.840.10008.5.1.4.1.2."  # the Query/Retrieve information models (FIND, MOVE, GET)
IDENTIFIER_BYTES = 1_000_000
"""Largest data set on a Query/Retrieve context: an identifier (query keys) is a few kB."""
COMMAND_BYTES = 64 * 1024
"""Largest command set of one message: a DIMSE command is a few hundred bytes."""


C_CANCEL = 0x0FFF
"""CommandField of C-CANCEL-RQ: a request that gets no response of its own."""
SERVED_COMMANDS = frozenset({0x0001, 0x0030, 0x0020, 0x0010, 0x0021, C_CANCEL, 0x8001})
"""The CommandFields a peer may send on an association the node accepts: C-STORE, C-ECHO, C-FIND, C-GET and
C-MOVE requests, C-CANCEL, and C-STORE responses (to a C-GET's sub-operations). Any other (an N-EVENT-REPORT,
which pynetdicom serves at once on a thread of its own; a normalized request that pynetdicom would hand to the
storage handler by its SOP class) ends the association."""


class Command(NamedTuple):
    """What the node reads of a DIMSE command set."""

    field: int | None  # CommandField (0000,0100)
    well_formed: bool  # only group 0000 elements of defined length, ending at its end, each of the fields below once
    data_set_follows: bool = False  # CommandDataSetType (0000,0800) is there and other than 0x0101 (no data set)


NO_DATA_SET = 0x0101
"""CommandDataSetType of a message that is its command alone."""
COMMAND_NAMES = {
    0x0001: "a C-STORE request",
    0x8001: "a C-STORE response",
    0x0030: "a C-ECHO request",
    0x0020: "a C-FIND request",
    0x0010: "a C-GET request",
    0x0021: "a C-MOVE request",
    C_CANCEL: "a C-CANCEL request",
}
"""The messages of :data:`SERVED_COMMANDS`, as the log names them."""
COMMAND_FIELDS = (0x0100, 0x0110, 0x0120, 0x0800, 0x0900)
"""CommandField, MessageID, MessageIDBeingRespondedTo, CommandDataSetType and Status: each at most once, of 2 bytes."""


def command_fields(command: bytes | bytearray) -> Command:
    """Read a DIMSE command set (Implicit VR Little Endian, group 0000) strictly: anything pydicom would read
    otherwise (an item delimiter, an undefined length, another group) makes it not ``well_formed``."""
    values: dict[int, int] = {}
    well_formed = True
    offset, end = 0, len(command)
    while offset < end:
        if offset + 8 > end:
            well_formed = False
            break
        group, element, length = struct.unpack_from("<HHL", command, offset)
        if group != 0 or length == 0xFFFFFFFF or offset + 8 + length > end:
            well_formed = False
            break
        if element in COMMAND_FIELDS:
            if element in values or length != 2:
                well_formed = False
                break
            (values[element],) = struct.unpack_from("<H", command, offset + 8)
        offset += 8 + length
    return Command(
        field=values.get(0x0100),
        well_formed=well_formed and 0x0100 in values,
        data_set_follows=values.get(0x0800, NO_DATA_SET) != NO_DATA_SET,
    )


MESSAGE_PARTS = ("DataSet", "Identifier", "AttributeList", "EventInformation", "ActionInformation", "ModificationList")
"""The attributes of pynetdicom's DIMSE primitives that hold a received message's data set (encoded)."""


def message_data_set_bytes(message: Any) -> int:
    """The encoded data set bytes a received DIMSE message holds."""
    size = 0
    for name in MESSAGE_PARTS:
        part = getattr(message, name, None)
        if isinstance(part, io.BytesIO):
            with part.getbuffer() as view:
                size += view.nbytes
    return size


class GuardedDUL(EventDrivenDUL):
    """The DUL reader with a deadline per PDU, a size limit per PDU type checked before the body is read, and
    limits on what one message may carry, counted as its fragments arrive: its command, and its data set by
    the presentation context it is sent on (none on Verification, an identifier's worth on Query/Retrieve,
    ``network.maximum_data_set_megabytes`` on a storage context). pynetdicom holds a message in memory until
    it is whole, so a peer allowed only to echo can never make the node hold gigabytes. The data set bytes
    received and not yet served count per association (a sender that does not wait for answers gains
    nothing) and over the node (``network.maximum_in_flight_megabytes``, summed over every receiving process
    in :class:`AssociationCaps`): they count from their arrival until pynetdicom has served the message
    that holds them (:meth:`handled`, called after each ``_serve_request``), whatever its command says, and
    a message pynetdicom never serves stays counted until the association ends. A message must also arrive
    whole in time: at :attr:`Limits.message_bytes_per_second` on average from its first fragment, once
    ``network.pdu_read_timeout_seconds`` have passed (:meth:`_message_too_slow`)."""

    _data_set_bytes = 0  # of the message being received, so far
    _request_read = False  # whether the A-ASSOCIATE-RQ has arrived
    _told_no_request = False  # whether the association's thread was told none will
    _command_bytes = 0
    _command_in: bytearray | None = None  # the peer's command being received (at most COMMAND_BYTES)
    _unanswered_bytes = 0  # data set bytes received and not yet served: whole messages waiting, and the current one
    _message_started: float | None = None  # when the first fragment of the message being received arrived
    _message_bytes = 0  # of the message being received (its command and its data set), so far
    _message_command: int | None = None  # its CommandField, once its command is whole
    _clock = staticmethod(time.monotonic)  # a test's clock may replace it

    _process_unanswered: ClassVar[int] = 0
    """Unanswered data set bytes over this process' associations: every change to one association's count changes
    it by the same amount, under the lock below; an association that ends gives its bytes back (``run``)."""
    _unanswered_lock: ClassVar[threading.Lock] = threading.Lock()

    def run(self) -> None:
        try:
            super().run()
        finally:
            self._let_go()  # the association ended: what it was receiving is gone with it

    def _change_unanswered(self, change: int) -> int:
        """Add ``change`` to this association's and this process' unanswered bytes (the lock held); the node's
        total over every receiving process."""
        self._unanswered_bytes += change
        GuardedDUL._process_unanswered += change
        return self.assoc._server.caps.set_in_flight(GuardedDUL._process_unanswered)  # type: ignore[union-attr]

    def handled(self, message: Any) -> None:
        """pynetdicom has served ``message`` (answered it, or refused it): the data set bytes it held go back."""
        size = message_data_set_bytes(message)
        if not size:
            return
        with self._unanswered_lock:
            self._change_unanswered(-min(size, self._unanswered_bytes))

    def _let_go(self) -> None:
        """This association holds no data set bytes any more."""
        with self._unanswered_lock:
            if self._unanswered_bytes:
                self._change_unanswered(-self._unanswered_bytes)

    def _hold(self, size: int, limits: Limits) -> str | None:
        """Count ``size`` more data set bytes not yet served; why the association is stopped if the association
        or the node would then hold too many."""
        with self._unanswered_lock:
            in_flight = self._change_unanswered(size)
            unanswered = self._unanswered_bytes
        if unanswered > limits.data_set_bytes:
            return (
                f"more than {limits.data_set_bytes / 1_000_000:g} MB of data sets were sent without waiting for the "
                "node's answers (network.maximum_data_set_megabytes)"
            )
        if in_flight > limits.in_flight_bytes:
            return (
                f"the node already holds {in_flight / 1_000_000:.0f} MB of images still arriving from all senders "
                f"together (network.maximum_in_flight_megabytes is {limits.in_flight_bytes / 1_000_000:g}); this "
                "association was stopped to keep memory for the others, and its sender can send again"
            )
        return None

    def _fragments_refused(self, pdu: bytearray, limits: Limits) -> str | None:
        """Count a P-DATA-TF's fragments; why the message is refused once one is over its limit, else None."""
        offset, end = 6, len(pdu)
        while offset + 6 <= end:
            (item_length,) = struct.unpack_from(">L", pdu, offset)
            context_id, control = pdu[offset + 4], pdu[offset + 5]
            size = max(item_length - 2, 0)
            too_slow = self._message_too_slow(size, limits)
            if too_slow is not None:
                return too_slow
            if control & 0x01:  # a command's fragment
                self._command_bytes += size
                if self._command_bytes > COMMAND_BYTES:
                    return f"a command of more than {COMMAND_BYTES // 1024} KB was being sent"
                if self._command_in is None:
                    self._command_in = bytearray()
                self._command_in.extend(pdu[offset + 6 : offset + 4 + item_length])
                if control & 0x02:
                    self._command_bytes = 0
                    command, self._command_in = command_fields(self._command_in), None
                    if not command.well_formed:
                        return (
                            "a command set that is not well-formed was sent (elements outside group 0000, of "
                            "undefined length or repeated, or not ending where it ends)"
                        )
                    if command.field not in SERVED_COMMANDS:
                        return (
                            f"a DIMSE command the node does not serve was sent (CommandField 0x{command.field or 0:04X}); "
                            "it serves C-ECHO, C-STORE, C-FIND, C-GET, C-MOVE and C-CANCEL requests"
                        )
                    self._message_command = command.field
                    if not command.data_set_follows:
                        self._message_started = None  # the message is whole
            else:
                self._data_set_bytes += size
                limit, carried = self._data_set_limit(context_id, limits)
                if self._data_set_bytes > limit:
                    return carried
                refused = self._hold(size, limits)
                if refused is not None:
                    return refused
                if control & 0x02:  # its last fragment: the next message starts from zero
                    self._data_set_bytes = 0
                    self._message_started = None
            offset += 4 + item_length
        return None

    def _message_too_slow(self, size: int, limits: Limits) -> str | None:
        """Count a fragment of ``size`` bytes toward the message being received; why the association is stopped
        if the message arrives slower than :attr:`Limits.message_bytes_per_second` since its first fragment, once
        ``network.pdu_read_timeout_seconds`` have passed; None if it is in time."""
        now = self._clock()
        if self._message_started is None:
            self._message_started, self._message_bytes, self._message_command = now, 0, None
        self._message_bytes += size
        elapsed = now - self._message_started
        allowed = max(limits.pdu_seconds, self._message_bytes / limits.message_bytes_per_second)
        if elapsed <= allowed:
            return None
        what = COMMAND_NAMES.get(self._message_command or 0, "a command")
        return (
            f"{what} was still arriving after {elapsed:.0f} s ({self._message_bytes:,} bytes so far): a message "
            f"must arrive at {limits.message_bytes_per_second / 1000:g} kB/s at least "
            f"(network.minimum_message_kilobytes_per_second), once {limits.pdu_seconds:g} s "
            "(network.pdu_read_timeout_seconds) have passed"
        )

    _accepted: dict[int, str] | None = None  # context ID -> abstract syntax, read at the first P-DATA-TF
    _not_storing: str | None = None  # the admitted peer's name when it has no store role, read with _accepted

    def _data_set_limit(self, context_id: int, limits: Limits) -> tuple[int, str]:
        """The most data set bytes one message may carry on this presentation context, and the refusal.

        A peer without the ``store`` role sends no data set on a storage context (it only answers the C-STOREs
        of its C-GETs, with commands alone): one that does is stopped at its first fragment, before the node
        reads a data set it would refuse anyway."""
        if self._accepted is None:  # negotiated once, before any P-DATA-TF
            accepted = self.assoc.accepted_contexts
            self._accepted = {cx.context_id: str(cx.abstract_syntax) for cx in accepted if cx.context_id is not None}
            peer = getattr(self.assoc, PEER_ATTRIBUTE, None)
            if isinstance(peer, Peer) and not peer.may("store"):
                self._not_storing = peer.name
        syntax = self._accepted.get(context_id)
        if syntax is None:
            return 0, f"a data set was sent on presentation context {context_id}, which was not accepted"
        if syntax == VERIFICATION_SOP_CLASS:
            return 0, "a data set was sent on the Verification context, whose messages carry none"
        if syntax.startswith(QUERY_RETRIEVE_PREFIX):
            return IDENTIFIER_BYTES, (
                f"a query or retrieval identifier of more than {IDENTIFIER_BYTES / 1_000_000:g} MB was being sent"
            )
        if self._not_storing is not None:
            return 0, (
                f"peer {self._not_storing} has no store role, but sent a data set on a storage context (an image "
                "for the node to store); it may only receive images, so the association was stopped before the "
                "data set was read"
            )
        return limits.data_set_bytes, (
            f"a data set of more than {limits.data_set_bytes / 1_000_000:g} MB was being sent "
            "(network.maximum_data_set_megabytes)"
        )

    def _read_pdu_data(self) -> None:
        limits: Limits = self.assoc._server.limits  # type: ignore[union-attr]
        sock = self.socket
        assert sock is not None and sock.socket is not None
        raw = sock.socket
        seconds = limits.pdu_seconds
        if not self._request_read:  # the first PDU: the association request, under its own deadline
            seconds = min(seconds, limits.association_request_seconds)
        deadline = time.monotonic() + seconds
        try:
            header = _read_exactly(raw, bytearray(6), deadline)
            pdu_type, _, length = struct.unpack(">BBL", header)
            if pdu_type in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
                limit = limits.for_pdu(pdu_type)
                if length > limit:
                    raise PduRefused(f"PDU type 0x{pdu_type:02X} of {length} bytes is over the limit of {limit} bytes")
                whole = bytearray(6 + length)  # the body is received straight into place: no copies
                whole[:6] = header
                _read_exactly(raw, memoryview(whole)[6:], deadline)
        except PduRefused as exc:
            self._refuse(str(exc), reason=0x06)
            return
        except TimeoutError:
            self._refuse(f"a PDU did not arrive whole within {seconds:g} s", reason=0x00)
            return
        except (OSError, ConnectionError, struct.error):
            self._no_request_coming()
            self.event_queue.put("Evt17")  # transport closed
            return
        finally:
            if sock.socket is not None:
                sock.socket.settimeout(limits.pdu_seconds)
        if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            self._refuse(f"unknown PDU type 0x{pdu_type:02X}", reason=0x01)
            return
        refused = self._fragments_refused(whole, limits) if pdu_type == 0x04 else None
        if refused is not None:
            self._refuse(refused, reason=0x00)
            return
        try:
            pdu, event = self._decode_pdu(whole)
        except Exception:  # noqa: BLE001 - any undecodable PDU is the peer's error
            self._refuse(f"undecodable PDU type 0x{pdu_type:02X}", reason=0x06)
            return
        self._request_read = self._request_read or pdu_type == 0x01
        before_release = self.assoc._server.before_release  # type: ignore[union-attr]
        if pdu_type == 0x05 and before_release is not None:
            before_release(self.assoc)  # e.g. let the recorder catch up: the sender sees the release once recorded
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _no_request_coming(self) -> None:
        """Before an association request arrived, the connection ends: tell the association's thread at once.

        It waits for the request up to ``network.association_request_timeout_seconds``, and its connection
        holds a place in ``network.maximum_associations_per_host`` until it ends: a monitor's port check
        (connect, close), an HTTP health check or a TLS hello on the plain port would otherwise keep a sender's
        place for that long. Decided by whether a request was read, not by the state machine: the first bytes
        are often read before it has left Sta1."""
        if not self._request_read and not self._told_no_request:
            self._told_no_request = True
            self.to_user_queue.put(None)  # type: ignore[arg-type]  # read as "no request in time": it closes

    def _refuse(self, why: str, *, reason: int) -> None:
        """Log the refusal naming the peer (once per address and kind each 10 s: a stranger can repeat it in a
        loop), send an A-ABORT and close the connection."""
        requestor = self.assoc.requestor
        log_throttled(
            LOG,
            logging.WARNING,
            "connection.aborted",
            (requestor.address, reason, re.sub(r"\d{3,}", "_", why)[:200]),  # sizes and times vary: not the kind
            address=requestor.address,
            calling_ae=(requestor.primitive.calling_ae_title if requestor.primitive else "(not yet known)"),
            reason=why,
        )
        self._no_request_coming()
        self._let_go()
        abort = A_ABORT_RQ()
        abort.source = 0x02
        abort.reason_diagnostic = reason
        assert self.socket is not None
        try:
            if self.socket.socket is not None:
                self.socket.socket.sendall(abort.encode())
        except OSError:
            pass
        self.socket.close()  # Evt17: the state machine ends the association


def _read_exactly(sock: socket.socket, into: bytearray | memoryview, deadline: float) -> bytearray | memoryview:
    """Fill ``into`` from ``sock`` and return it; TimeoutError at ``deadline``, ConnectionError if the peer closes first."""
    view = memoryview(into)
    count = len(view)
    received = 0
    while received < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        got = sock.recv_into(view[received:], count - received)
        if not got:
            raise ConnectionError("closed by peer")
        received += got
    return into


class GuardedRequestHandler(RequestHandler):
    """Per connection: TLS handshake in this thread under a deadline, then an association with a :class:`GuardedDUL`.

    The connection holds its place in :class:`AssociationCaps` (taken in
    :meth:`GuardedServer.verify_request`) until its association's thread ends.
    """

    server: GuardedServer

    def handle(self) -> None:
        started = False
        try:
            started = self._open_association()
        finally:
            if not started:
                self.server.give_back(self.client_address[0])

    def _open_association(self) -> bool:
        limits = self.server.limits
        request = self.request
        address = self.client_address[0]
        if isinstance(request, ssl.SSLSocket):
            request.settimeout(limits.association_request_seconds)
            try:
                request.do_handshake()
            except ssl.SSLEOFError:  # a port check that connects and closes: nothing to refuse
                log_throttled(
                    LOG,
                    logging.INFO,
                    "connection.closed",
                    address,
                    address=address,
                    reason="closed before TLS handshake",
                )
                self.server.shutdown_request(request)
                return False
            except (ssl.SSLError, OSError) as exc:
                reason = "no TLS handshake in time" if isinstance(exc, TimeoutError) else handshake_failure(exc)
                log_throttled(
                    LOG, logging.WARNING, "connection.refused", (address, reason), address=address, reason=reason
                )
                self.server.shutdown_request(request)
                return False
        request.settimeout(limits.pdu_seconds)  # no send or receive waits longer without progress
        assoc = self._create_association()
        assoc.dul.socket.__class__ = GuardedSocket  # before its thread starts: sends bounded in time
        assoc.dul.__class__ = GuardedDUL  # before its thread starts: same state, guarded reader
        make_event_driven(assoc)  # both threads sleep until there is work (dicom_node.reactors)
        send_store_responses_directly(assoc.dimse)  # plain C-STORE responses without pydicom
        server = self.server
        run, serve, dul = assoc.run, assoc._serve_request, assoc.dul

        def serve_then_give_back(message: Any, context_id: int) -> None:
            try:
                serve(message, context_id)
            finally:
                dul.handled(message)  # type: ignore[attr-defined]  # a GuardedDUL since above

        assoc._serve_request = serve_then_give_back  # type: ignore[method-assign,assignment]

        def run_then_release() -> None:
            try:
                run()
            finally:
                server.give_back(address)

        assoc.run = run_then_release  # type: ignore[method-assign]
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        return True


SEND_SLICE_BYTES = 1_000_000
"""A PDU the node sends leaves in slices of at most this many bytes, each within ``pdu_read_timeout_seconds``:
the peer chooses how large a PDU may be (up to no limit at all), so the bound is on each slice, not the PDU."""


class GuardedSocket(AssociationSocket):
    """An accepted association's socket whose sends are bounded in time, as its reads are (:class:`GuardedDUL`).

    A peer that stops reading what the node sends it (a C-FIND requestor that takes no more answers, a C-GET
    requestor that takes no more images) fills the TCP window, and a send then waits on it. Each slice of a
    PDU (:data:`SEND_SLICE_BYTES`) must leave within ``network.pdu_read_timeout_seconds``; past that the
    association is aborted (its place in ``maximum_associations_per_host`` given back when its thread ends),
    the connection reset so that what was queued for the peer is let go, and the log says which peer it was.
    """

    def send(self, bytestream: bytes) -> None:
        limits: Limits = self.assoc._server.limits  # type: ignore[union-attr]
        raw = self.socket
        try:
            assert raw is not None
            _send_within(raw, bytestream, limits.pdu_seconds)
        except TimeoutError:
            self._reset()  # at once: what was queued for the peer is let go, not sent on while the log is written
            self._stopped_reading(min(len(bytestream), SEND_SLICE_BYTES), limits.pdu_seconds)
            return
        except Exception:  # noqa: BLE001 - as pynetdicom's send: any failure closes the transport
            self.event_queue.put("Evt17")
            return
        evt.trigger(self.assoc, evt.EVT_DATA_SENT, {"data": bytestream})

    def _reset(self) -> None:
        """Close the connection with a reset (linger 0): the kernel drops what it still holds for the peer.

        No shutdown first: it would queue a FIN behind the data and let the peer go on reading until the close.
        ``close`` then tells the state machine the transport closed (Evt17), which ends the association."""
        raw = self.socket
        if raw is not None:
            with suppress(OSError):  # closed already
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                raw.close()
        self.close()

    def _stopped_reading(self, size: int, seconds: float) -> None:
        """Log (once per address each 10 s) that the peer stopped taking data."""
        requestor = self.assoc.requestor
        address = requestor.address
        title = requestor.primitive.calling_ae_title if requestor.primitive else None
        who = f"peer {title} at {shown_address(address)}" if title else f"the peer at {shown_address(address)}"
        reason = (
            f"{who} stopped taking what the node sends it: {size:,} bytes could not be sent within {seconds:g} s "
            "(network.pdu_read_timeout_seconds), so the node closed its association"
        )
        log_throttled(
            LOG,
            logging.WARNING,
            "connection.aborted",
            (address, "stopped reading"),
            address=address,
            calling_ae=title or "(not yet known)",
            reason=reason,
        )


def _send_within(sock: socket.socket, data: bytes, seconds: float) -> None:
    """Send all of ``data``, each :data:`SEND_SLICE_BYTES` within ``seconds``; TimeoutError when one is not.

    The socket's timeout is ``seconds`` before and after (the reader sets it too, in the same thread)."""
    view = memoryview(data)
    changed = False
    try:
        for start in range(0, len(view), SEND_SLICE_BYTES):
            piece = view[start : start + SEND_SLICE_BYTES]
            deadline = time.monotonic() + seconds
            sent = sock.send(piece)  # mostly all at once, under the socket's own timeout of ``seconds``
            while sent < len(piece):
                piece = piece[sent:]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                changed = True
                sent = sock.send(piece)
    finally:
        if changed:
            sock.settimeout(seconds)


@contextlib.contextmanager
def locked_after_death(
    lock: Any, holder: Any, number: int, processes: int, what: str, orphaned_seconds: float
) -> Iterator[None]:
    """Hold a lock shared by the receiving processes for ``serve``'s supervisor, after receiving process ``number``
    died.

    ``holder`` is the shared value each process sets to its number + 1 while inside ``lock``. A process killed while
    it held the lock (held for microseconds at a time) left it taken: every other receiving process would wait for
    it forever. It is given back here first, but only when the lock is still taken after ``orphaned_seconds`` and the
    holder recorded is the dead process (or none: killed between taking the lock and recording itself); a live
    holder that is merely slow (paused, swapped out) is waited for. ``what`` names what the lock guards, for the log.
    """
    acquired = lock.acquire(timeout=orphaned_seconds)
    if not acquired and holder.value in (0, number + 1):
        log_event(
            LOG,
            logging.WARNING,
            "receiver.lock_recovered",
            receiver=number,
            note=f"the receiving process died while it held the lock on {what}; "
            "it was given back so the other receiving processes go on",
        )
        with contextlib.suppress(ValueError):  # given back meanwhile after all
            lock.release()
    if not acquired:
        lock.acquire()
    holder.value = processes + 1  # the supervisor
    try:
        yield
    finally:
        holder.value = 0
        lock.release()


class AssociationCaps:
    """Open connections per source address and in all, and data set bytes in flight, shared by every receiving
    process.

    ``serve`` creates one before it starts the receiving processes and hands each
    its own row of it (:meth:`for_process`: a lock and shared-memory arrays from
    ``multiprocessing``), so ``network.maximum_associations_per_host``,
    ``network.maximum_associations`` and ``network.maximum_in_flight_megabytes``
    hold for the node as a whole. A connection holds a place, counted in its
    process' row, from accept until its association ends. Places taken as
    ``extra`` (peers that send no images, unknown addresses) come on top of
    ``network.maximum_associations``: :meth:`total` leaves them out. The table has ``slots``
    addresses; when it is full, a connection from a new address is refused like
    one over the per-host cap. A receiving process that dies gives nothing back by
    itself: :meth:`forget` empties its row before it is started again.
    """

    KEY_BYTES = 16
    ORPHANED_LOCK_SECONDS = 2.0

    def __init__(self, slots: int, processes: int = 1, context: Any = None) -> None:
        context = context or multiprocessing.get_context("spawn")
        self.slots = slots
        self.processes = processes
        self.row = 0
        self._lock = context.Lock()
        self._holder = context.RawValue(ctypes.c_int, 0)  # the row number + 1 of the process inside the lock; 0: none
        self._keys = context.RawArray(ctypes.c_char, slots * self.KEY_BYTES)
        self._extra = context.RawArray(ctypes.c_bool, slots)  # the slot's places come on top of the senders'
        self._counts = context.RawArray(ctypes.c_int, processes * slots)
        self._in_flight = context.RawArray(ctypes.c_longlong, processes)

    @classmethod
    def for_network(cls, network: NetworkSettings, processes: int = 1) -> AssociationCaps:
        return cls(2 * network.maximum_associations + 16, processes)

    def for_process(self, number: int) -> AssociationCaps:
        """The same shared counts, with what this object takes and gives back counted in receiving process
        ``number``'s row."""
        if not 0 <= number < self.processes:
            raise ValueError(f"receiving process {number} has no row (there are {self.processes})")
        view = copy.copy(self)
        view.row = number
        return view

    def _key(self, address: str) -> bytes:
        try:
            return ipaddress.ip_address(address.split("%")[0]).packed.ljust(self.KEY_BYTES, b"\0")
        except ValueError:
            return hashlib.blake2b(address.encode(), digest_size=self.KEY_BYTES).digest()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The shared lock, with this process' row recorded as its holder while it is held."""
        with self._lock:
            self._holder.value = self.row + 1
            try:
                yield
            finally:
                self._holder.value = 0

    def _held_in(self, slot: int) -> int:
        """Connections counted in ``slot`` over every process' row (the lock held)."""
        return sum(self._counts[row * self.slots + slot] for row in range(self.processes))

    def _slot_of(self, key: bytes) -> int | None:
        width = self.KEY_BYTES
        for slot in range(self.slots):
            if self._keys[slot * width : (slot + 1) * width] == key and self._held_in(slot):
                return slot
        return None

    def hold(self, address: str, per_host: int, *, extra: bool = False) -> int | None:
        """Take a place for a connection from ``address``; None if it already holds ``per_host`` (the count).

        ``extra``: the place comes on top of ``network.maximum_associations`` (not counted by :meth:`total`).
        """
        key = self._key(address)
        width = self.KEY_BYTES
        with self._locked():
            slot = self._slot_of(key)
            if slot is not None:
                count = self._held_in(slot)
                if count >= per_host:
                    return count
            else:
                slot = next((free for free in range(self.slots) if not self._held_in(free)), None)
                if slot is None:
                    return 0
                self._keys[slot * width : (slot + 1) * width] = key
                self._extra[slot] = extra
            self._counts[self.row * self.slots + slot] += 1
            return None

    def release(self, address: str) -> None:
        with self._locked():
            slot = self._slot_of(self._key(address))
            if slot is not None and self._counts[self.row * self.slots + slot] > 0:
                self._counts[self.row * self.slots + slot] -= 1

    def held(self, address: str) -> int:
        with self._locked():
            slot = self._slot_of(self._key(address))
            return 0 if slot is None else self._held_in(slot)

    def total(self) -> int:
        """Places held over every process, those taken as ``extra`` left out: what ``network.maximum_associations``
        caps."""
        with self._locked():
            return sum(self._held_in(slot) for slot in range(self.slots) if not self._extra[slot])

    def forget(self, number: int) -> None:
        """Empty receiving process ``number``'s row: it died, and its connections and data sets with it.

        The shared lock is given back first where the dead process held it (after :attr:`ORPHANED_LOCK_SECONDS`:
        :func:`locked_after_death`); a live holder that is merely slow is waited for.
        """
        with locked_after_death(
            self._lock, self._holder, number, self.processes, "the shared connection counts", self.ORPHANED_LOCK_SECONDS
        ):
            for slot in range(self.slots):
                self._counts[number * self.slots + slot] = 0
            self._in_flight[number] = 0

    def set_in_flight(self, data_set_bytes: int) -> int:
        """Record the data set bytes this process holds unanswered; the node's total over every process."""
        self._in_flight[self.row] = data_set_bytes
        return sum(self._in_flight)


class SharedContexts(list[PresentationContext]):
    """The server's supported presentation contexts, shared by every association instead of copied.

    pynetdicom deep-copies the server's contexts for each association it accepts
    (``RequestHandler._create_association``): for the node's 177 contexts that took
    25-40 ms of CPU per association, held under the interpreter lock that every other
    association's thread needs. Negotiation only reads them (``negotiate_as_acceptor``
    builds new contexts for its answer) and the node only ever replaces an
    association's list (:func:`on_requested`), so a copy of the list is enough.
    """

    def __deepcopy__(self, memo: dict[int, object]) -> list[PresentationContext]:
        return list(self)


PEER_ENTRY = "peer entry "
"""What a place counted for a whole image-sending peer entry (all its addresses) is keyed by, before its name."""
STRANGERS = "addresses no peer calls from"
"""The one place in :class:`AssociationCaps` where connections from unknown addresses are counted together."""
STRANGER_CONNECTIONS = 2
"""Connections from addresses no peer calls from, open at a time in all: enough for a misconfigured peer to be
told why it is rejected, too few to fill ``network.maximum_associations``."""
NON_SENDERS = "addresses of peers that send no images"
"""The one place where connections from addresses only peers without the ``store`` role call from are counted."""
NON_SENDER_CONNECTIONS = 8
"""Connections from such addresses, open at a time in all: a planning system's retrievals and the echoes of
monitoring, never enough to lock out the PACS (``network.maximum_associations`` is kept for image senders)."""
NON_SENDER_CONNECTIONS_PER_ADDRESS = 3
"""Of those, open at a time from any one address: a monitor that echoes too often, or a peer that leaves
associations open, cannot take the places of the other peers that send no images."""


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with a per-address connection cap and a non-blocking TLS accept.

    With ``listening``, the server accepts on that already bound and listening socket
    (shared by several receiving processes) instead of binding its own.
    """

    def __init__(
        self,
        *args: Any,
        limits: Limits,
        caps: AssociationCaps,
        listening: socket.socket | None = None,
        policy: PeerPolicy | None = None,
        **kwargs: Any,
    ) -> None:
        self.limits = limits
        self.caps = caps
        self.policy = policy
        self._listening = listening
        self.before_release: Callable[[Any], object] | None = None
        """Run in the connection's reader when an A-RELEASE-RQ arrives, before it is answered."""
        self.heartbeat: Callable[[], object] | None = None
        """Run at each turn of the accepting loop (at least every half second): a sign that it still accepts."""
        kwargs["request_handler"] = GuardedRequestHandler
        super().__init__(*args, **kwargs)
        self.contexts = SharedContexts(self.contexts)

    def server_bind(self) -> None:
        if self._listening is None:
            super().server_bind()
            return
        if self.socket is not None:
            self.socket.close()
        self.socket = self._listening
        self.socket.settimeout(0)  # every process wakes for a connection; those that lose the accept() go back
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self._listening is None:
            super().server_activate()

    def server_close(self) -> None:
        if self._listening is None:
            super().server_close()
        elif self.socket is not None:
            self.socket.close()  # close this process' descriptor only; shutdown() would stop the others too

    def service_actions(self) -> None:
        super().service_actions()
        if self.heartbeat is not None:
            self.heartbeat()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = self.socket.accept()  # type: ignore[union-attr]
        if self._listening is not None:
            client.setblocking(True)  # accepted sockets inherit the listening socket's non-blocking mode
        if self.ssl_context:
            # The handshake runs in the connection's thread: a silent client must not stall accept().
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def caps_key(self, address: str) -> str:
        """Where a connection from ``address`` is counted: its address, for an address an image sender (a peer
        with the ``store`` role) calls from; else one place shared by all addresses of peers that send no images
        (:data:`NON_SENDER_CONNECTIONS` at a time, and each address also counted on its own), or by all
        addresses no peer calls from (:data:`STRANGER_CONNECTIONS`). Those two never take the image senders'
        places."""
        if self.policy is None or self.policy.sends_from(address):
            return address
        if self.policy.admits_address(address):
            return NON_SENDERS
        return STRANGERS

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit the connection unless its address already holds ``maximum_associations_per_host`` (or its
        shared place, for addresses of peers that send no images or of no peer, is full)."""
        address = client_address[0]
        key = self.caps_key(address)
        if key == NON_SENDERS:
            reason = self._hold_non_sender(address)
        elif key == STRANGERS:
            reason = self._hold(key, STRANGER_CONNECTIONS)
        else:
            reason = self._hold_sender(address)
        if reason is None:
            return True
        log_throttled(LOG, logging.WARNING, "connection.refused", (address, reason), address=address, reason=reason)
        return False

    def give_back(self, address: str) -> None:
        """Give back the place(s) a connection from ``address`` held since :meth:`verify_request`."""
        key = self.caps_key(address)
        self.caps.release(key)
        if key == NON_SENDERS:
            self.caps.release(address)
        elif key == address and (entry := self._entry_key(address)) is not None:
            self.caps.release(entry)

    def _entry_key(self, address: str) -> str | None:
        """Where the connections of the image-sending peer entry ``address`` belongs to are counted together."""
        peer = self.policy.sender_at(address) if self.policy is not None else None
        return None if peer is None else f"{PEER_ENTRY}{peer.name}"

    def _hold_sender(self, address: str) -> str | None:
        """A place for ``address`` of its own and one of its peer entry's (``maximum_associations_per_peer``, every
        address of the entry together: silent connections from a scanner network's many addresses, or one host on
        two, cannot take every place); why not, if not."""
        reason = self._hold(address, self.limits.per_host)
        entry = self._entry_key(address)
        if reason is not None or entry is None:
            return reason
        limit = self._entry_limit()
        held = self.caps.hold(entry, limit, extra=True)  # counted by address already
        if held is None:
            return None
        self.caps.release(address)
        if not held:
            return "the node holds as many connections as it can track; try again shortly"
        if limit == self.limits.per_peer:
            why = (
                f"network.maximum_associations_per_peer is {limit}, so one peer never takes every place from the others"
            )
        else:
            why = (
                f"at most {limit}: network.maximum_associations and maximum_associations_per_host together, so its "
                "connections cannot fill the node's table of addresses"
            )
        return (
            f"{held} connections of peer {entry.removeprefix(PEER_ENTRY)!r} are already open from its addresses "
            f"together ({why})"
        )

    def _entry_limit(self) -> int:
        """Connections one image-sending peer entry may open: its share, where other entries send images too and
        the share is less than ``maximum_associations``; otherwise enough that ``maximum_associations`` rejects the
        surplus at association (an A-ASSOCIATE-RJ that says why), while silent connections from its many addresses
        still cannot fill the table of addresses (and lock out the peers that send no images)."""
        senders = len(self.policy.sending_entries()) if self.policy is not None else 0
        if senders > 1 and self.limits.per_peer < self.limits.senders:
            return self.limits.per_peer
        return self.limits.senders + self.limits.per_host

    def _hold_non_sender(self, address: str) -> str | None:
        """A place for ``address`` of its own and one among all peers that send no images; why not, if not."""
        reason = self._hold(address, NON_SENDER_CONNECTIONS_PER_ADDRESS)
        if reason is None:
            reason = self._hold(NON_SENDERS, NON_SENDER_CONNECTIONS)
            if reason is not None:
                self.caps.release(address)
        return reason

    def _hold(self, key: str, limit: int) -> str | None:
        """Take a place counted under ``key`` (at most ``limit``); None when taken, else why not, as a sentence.

        Only an image sender's own address takes a place of ``network.maximum_associations``; the others are
        extra places on top of it.
        """
        extra = key in (NON_SENDERS, STRANGERS) or self.caps_key(key) == NON_SENDERS
        held = self.caps.hold(key, limit, extra=extra)
        if held is None:
            return None
        if not held:
            return "the node holds as many connections as it can track; try again shortly"
        if key in (NON_SENDERS, STRANGERS):
            return (
                f"{held} connections from {key} are already open (at most {limit} at a time, so they never take "
                "the places of the peers that send images)"
            )
        if self.caps_key(key) == NON_SENDERS:
            return (
                f"{held} connections already open from this address (a peer that sends no images may hold at most "
                f"{limit} at a time, so it never takes the places of the other peers)"
            )
        return f"{held} connections already open from this address (network.maximum_associations_per_host is {limit})"


def _address(assoc: Any) -> str | None:
    info = assoc.requestor.address_info
    return info.address if info is not None else None


def start_guarded_server(
    ae: AE,
    address: tuple[str, int],
    network: NetworkSettings,
    evt_handlers: list[Any],
    caps: AssociationCaps | None = None,
    listening: socket.socket | None = None,
    policy: PeerPolicy | None = None,
) -> GuardedServer:
    """``ae.start_server(block=False)`` with the guards above (and TLS when ``network.tls`` is set).

    ``caps`` (default: this process' own) counts connections per address; ``listening``
    is a bound, listening socket to accept on instead of binding ``address``; with ``policy``,
    a connection from an address no peer calls from is closed at accept.
    """
    ssl_context = server_tls(network.tls) if network.tls else None
    # make_server builds server_class, though its annotation names only the base class
    server = cast(
        GuardedServer,
        ae.make_server(
            address,
            ssl_context=ssl_context,
            evt_handlers=evt_handlers,
            server_class=GuardedServer,
            limits=Limits.from_settings(network),
            caps=caps or AssociationCaps.for_network(network),
            listening=listening,
            policy=policy,
        ),
    )
    ae._servers.append(server)  # so ae.shutdown() stops it, as start_server does
    thread = threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{address[1]}", daemon=True)
    thread.start()
    return server
