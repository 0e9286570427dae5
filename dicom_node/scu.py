"""Outgoing DICOM as a service user: C-ECHO, and C-FIND / C-GET as a planning system would pull results.

C-STORE of results lives in :mod:`dicom_node.dispatch`. Every call takes
``tls_args`` (``(ssl_context, server_hostname)``, see
:func:`dicom_node.security.client_tls`) for DICOM TLS.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # pynetdicom creates its SOP classes at import; its stubs do not list them
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

from dicom_node.receive.header import is_valid_uid


@dataclass(frozen=True)
class EchoResult:
    ok: bool
    message: str
    seconds: float


TlsArgs = tuple[ssl.SSLContext, str] | None


def verify(
    calling_ae: str, called_ae: str, host: str, port: int, *, timeout: float = 10.0, tls_args: TlsArgs = None
) -> EchoResult:
    """C-ECHO a peer; never raises for network trouble, it reports it."""
    ae = _ae(calling_ae, timeout)
    ae.add_requested_context(Verification)
    started = time.perf_counter()
    watch = AssociationWatch()
    try:
        assoc = watch.associate(ae, host, port, called_ae, tls_args=tls_args)
    except socket.gaierror:
        return EchoResult(False, unresolvable(host), time.perf_counter() - started)
    if not assoc.is_established:
        reason = not_established(assoc, calling_ae, called_ae, watch).reason
        return EchoResult(False, reason, time.perf_counter() - started)
    try:
        response = assoc.send_c_echo()
    finally:
        assoc.release()
    elapsed = time.perf_counter() - started
    if response and response.get("Status") == 0x0000:
        return EchoResult(True, "success", elapsed)
    code = response.get("Status") if response else None
    return EchoResult(False, f"status {code!r}" if code is not None else "no response", elapsed)


def find(
    calling_ae: str,
    called_ae: str,
    host: str,
    port: int,
    identifier: Dataset,
    *,
    timeout: float = 30.0,
    tls_args: TlsArgs = None,
) -> list[Dataset]:
    """C-FIND (Study Root) a peer; the matches, or :class:`ScuError` with the reason."""
    ae = _ae(calling_ae, timeout)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = _associate(ae, called_ae, host, port, tls_args=tls_args)
    matches: list[Dataset] = []
    try:
        for status, match in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
            code = int(status.Status) if status and "Status" in status else None
            if code in (0xFF00, 0xFF01) and match is not None:
                matches.append(match)
            elif code != 0x0000:
                raise ScuError(f"C-FIND answered {_shown(code, status)}")
    finally:
        assoc.release()
    return matches


def get(
    calling_ae: str,
    called_ae: str,
    host: str,
    port: int,
    identifier: Dataset,
    sop_classes: list[str],
    folder: Path,
    *,
    timeout: float = 60.0,
    tls_args: TlsArgs = None,
) -> list[Path]:
    """C-GET (Study Root) into ``folder``: each instance as ``<SOPInstanceUID>.dcm``, exactly as sent."""
    ae = _ae(calling_ae, timeout)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for sop_class in sorted(set(sop_classes)):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    roles = [build_role(sop_class, scp_role=True) for sop_class in sorted(set(sop_classes))]
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def _store(event: evt.Event) -> int:
        uid = str(cast(C_STORE, event.request).AffectedSOPInstanceUID or "")  # a C-STORE handler's request
        if not is_valid_uid(uid):
            return 0xA900  # not a UID: it never becomes a file name (no path of the peer's choosing)
        path = folder / f"{uid}.dcm"
        path.write_bytes(event.encoded_dataset())
        written.append(path)
        return 0x0000

    assoc = _associate(
        ae, called_ae, host, port, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, _store)], tls_args=tls_args
    )
    try:
        for status, _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet):
            code = int(status.Status) if status and "Status" in status else None
            if code not in (0xFF00, 0x0000):
                raise ScuError(f"C-GET answered {_shown(code, status)}")
    finally:
        assoc.release()
    return written


class ScuError(RuntimeError):
    """A request to a peer failed; the message says how."""


def _ae(calling_ae: str, timeout: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    return ae


def unresolvable(host: str) -> str:
    """Why no association could be opened to ``host``, a name the name service does not know."""
    return (
        f"the host name {host!r} cannot be resolved to an address (a typing error in the configured host, or the "
        "name server is not answering)"
    )


def _associate(ae: AE, called_ae: str, host: str, port: int, **kwargs: Any) -> Association:
    watch = AssociationWatch()
    try:
        assoc = watch.associate(ae, host, port, called_ae, **kwargs)
    except socket.gaierror:
        raise ScuError(f"{called_ae}@{host}:{port}: {unresolvable(host)}") from None
    if not assoc.is_established:
        reason = not_established(assoc, ae.ae_title, called_ae, watch).reason
        raise ScuError(f"{called_ae}@{host}:{port}: {reason}")
    return assoc


def send_small_pdus_at_once(event: evt.Event) -> None:
    """``EVT_CONN_OPEN``: small PDUs (a C-STORE request's command, a response) leave at once instead of waiting
    on Nagle's algorithm for the peer's delayed acknowledgement (about 40 ms each on Linux)."""
    transport = getattr(event.assoc.dul, "socket", None)
    sock = getattr(transport, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):  # closed meanwhile: nothing is sent on it
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class AssociationWatch:
    """What an association request met before it was answered: whether the TCP connection opened, and whether the
    node gave up waiting for the answer (and aborted itself). :func:`not_established` tells by it a peer that is
    down from one that let the node connect and then aborted (or closed) at once, and from one that never answered.
    """

    def __init__(self) -> None:
        self.connected = False  # the peer accepted the TCP connection
        self.gave_up = False  # the node aborted: no answer within its ACSE timeout
        # (result, source, reason) of an A-ASSOCIATE-RJ the peer sent: pynetdicom's requestor, descheduled between
        # sending its request and checking the connection, reads a rejection that already closed it as an abort
        self.rejection: tuple[int | None, int | None, int | None] | None = None

    def associate(self, ae: AE, host: str, port: int, called_ae: str, **kwargs: Any) -> Association:
        """``ae.associate``, watched; the watch ends once the request is answered (or not)."""
        handlers = [
            (evt.EVT_CONN_OPEN, self._opened),
            (evt.EVT_PDU_SENT, self._sent),
            (evt.EVT_PDU_RECV, self._received),
        ]
        assoc = ae.associate(
            host, port, ae_title=called_ae, evt_handlers=[*kwargs.pop("evt_handlers", []), *handlers], **kwargs
        )
        for event, handler in handlers:
            assoc.unbind(event, handler)  # not called for every PDU of the C-STOREs that follow
        return assoc

    def _opened(self, event: evt.Event) -> None:
        self.connected = True
        send_small_pdus_at_once(event)

    def _sent(self, event: evt.Event) -> None:
        if isinstance(getattr(event, "pdu", None), A_ABORT_RQ):
            self.gave_up = True

    def _received(self, event: evt.Event) -> None:
        pdu = getattr(event, "pdu", None)
        if isinstance(pdu, A_ASSOCIATE_RJ):
            self.rejection = (pdu.result, pdu.source, pdu.reason_diagnostic)


@dataclass(frozen=True)
class NotEstablished:
    """Why a peer gave no association, as a sentence, and whether it is worth trying again later as a peer
    that is down (no answer, or a rejection the peer calls transient) rather than as a refusal."""

    reason: str
    unreachable: bool


REJECTIONS: dict[tuple[Any, Any], str] = {
    (1, 1): "gave no reason",
    (1, 2): "does not support the DICOM application context",
    (1, 3): "does not know the node's AE title {calling} as a peer (add it to the peer's configuration)",
    (1, 7): "does not know the AE title {called} it was called by (check the AE title configured for it)",
    (2, 1): "gave no reason",
    (2, 2): "does not support the DICOM protocol version",
    (3, 1): "is too busy (temporary congestion)",
    (3, 2): "has reached its own limit of associations",
}
"""A-ASSOCIATE-RJ (source, diagnostic) as words."""


def not_established(
    assoc: Association, calling_ae: str, called_ae: str, watch: AssociationWatch | None = None
) -> NotEstablished:
    """Why ``assoc`` was not established: rejected (and why, from the A-ASSOCIATE-RJ), accepted with none of the
    SOP classes offered, or no answer at all. With the ``watch`` of the request, no answer is told apart: the
    connection refused or never made (down), made and then aborted or closed by the peer at once (a refusal, as
    some peers answer a calling or called AE title they do not admit), or made and never answered."""
    answer = getattr(assoc.acceptor, "primitive", None)
    rejection: tuple[Any, Any, Any] | None
    if assoc.is_rejected and answer is not None:
        result, source = getattr(answer, "result", None), getattr(answer, "result_source", None)
        rejection = (result, source, getattr(answer, "diagnostic", None))
    else:
        rejection = watch.rejection if watch is not None else None
    if rejection is not None:
        result, source, diagnostic = rejection
        words = REJECTIONS.get((source, diagnostic), "gave no reason the standard defines")
        transient = result == 0x02
        return NotEstablished(
            f"rejected the association: it {words.format(calling=repr(calling_ae), called=repr(called_ae))}"
            + (" (a rejection it calls transient)" if transient else ""),
            unreachable=transient,
        )
    if assoc.is_rejected:
        return NotEstablished("rejected the association", unreachable=False)
    refused = sorted({_sop_class_name(str(cx.abstract_syntax)) for cx in assoc.rejected_contexts})
    if assoc.is_aborted and refused:
        return NotEstablished(
            f"accepted the association but none of the SOP classes the node proposed: {', '.join(refused)} "
            "(it does not support them, or not in the transfer syntaxes offered)",
            unreachable=False,
        )
    if watch is not None and watch.connected and watch.gave_up:
        return NotEstablished(
            f"accepted the connection but gave no answer to the association request within {assoc.acse_timeout:g} s "
            "(overloaded, or not a DICOM service on that port)",
            unreachable=True,
        )
    if watch is not None and watch.connected:
        return NotEstablished(
            "aborted the association request as soon as the connection opened: it may not admit the calling AE "
            f"title {calling_ae!r} (this node) or the called AE title {called_ae!r} (check that the peer lists this "
            f"node's AE title and address, and that it answers to {called_ae!r})",
            unreachable=False,
        )
    return NotEstablished("no association (peer down or unreachable)", unreachable=True)


def _sop_class_name(uid: str) -> str:
    name = UID(uid).name
    return name if name and name != uid else uid


def _shown(code: int | None, status: Dataset | None) -> str:
    if code is None:
        return "no response"
    comment = f" ({status.ErrorComment})" if status is not None and "ErrorComment" in status else ""
    return f"status 0x{code:04X}{comment}"
