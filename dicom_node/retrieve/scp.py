"""C-FIND, C-MOVE and C-GET handlers over what the node holds: received series and its own results.

They run in the same AE as the Storage SCP, behind the same peer check
(:mod:`dicom_node.security`): a peer needs the ``find``, ``move`` or ``get``
role for each service. PATIENT-level and universal queries need ``find``
itself; peers that only move or get may look up what they know (a unique key
or accession number without wildcards). A C-FIND stops after
``retrieve.max_find_matches`` with 0xA700; a C-MOVE or C-GET selecting more
than ``retrieve.max_instances_per_retrieval`` instances is refused with 0xA702,
and its unique key must be literal UIDs (no ``*``, ``?`` or empty value).
C-MOVE sends only to destinations and peers with an address in config.yaml
(over TLS where they say ``tls: true``); an unknown Move Destination is refused
with 0xA801, and one that cannot be reached (no connection within ``dispatch.timeout_seconds``,
no association within ``network.association_request_timeout_seconds``) fails with 0xA702 and a
comment naming it; one that accepts none of the objects offered fails with 0xA702 and a comment saying so.
Retrieved instances go out as they were stored: the file's data set bytes, in the file's transfer syntax; for a
peer that does not accept it, converted to Explicit or Implicit VR Little Endian (:mod:`dicom_node.transfer_syntax`),
a compressed one decompressed, unless a frame's own header disagrees with Rows and Columns or
the decoded pixel data would exceed ``MAX_DECOMPRESSED_BYTES``, or the node would not use the image for its own
results (a lossy frame under a lossless-only transfer syntax, or JPEG 2000 or JPEG data whose structure shows damage,
as the series loader checks them), or its pixel values need more
bits than BitsStored (decoded, they would silently become other values; then that instance
is a failed sub-operation, ``retrieve.not_decompressed`` in the log). Peers hear
short fixed comments; the log has the details.

SEGs go before SRs, and a peer gets an SR only with every SEG it names as evidence, each as itself (as dispatch
holds such an SR back): a LABELMAP SEG that goes as its BINARY twin, or is left out because that twin is selected
too (a peer that does not accept Label Map Segmentation), has its SR left out (the twin's own SR holds the same
measurements; not a failed sub-operation), and a SEG that cannot be sent has its SR fail with it
(``retrieve.report_left_out`` in the log names both). A C-MOVE decides this once its sub-association has
accepted its contexts, after its count: what it leaves out is neither completed nor failed.

Each instance sent to a C-GET or C-MOVE peer may take ``dispatch.timeout_seconds`` + its
size in MB x ``dispatch.seconds_per_megabyte``, as results sent to a destination may: a
peer that stops taking data mid-instance has its association cut then, and the
retrieval ends (a C-MOVE answers with its failed sub-operations and a comment naming
its destination; the log says which peer stalled on which instance). Over a C-GET requestor's own association
the node's send bound (``network.pdu_read_timeout_seconds``) usually cuts such a peer first: it is said to have
stopped taking data all the same. Each retrieval has one audit record, written with the final status its peer
heard (a stalled one too: failed or partial), whose detail says why a retrieval ended early.

While a C-GET or C-MOVE runs, the series it sends are not purged (``dicom-node purge`` and retention skip them,
naming the peer: :mod:`dicom_node.retrieve.inflight`). Each C-MOVE sub-association has its own connect timeout
(``dispatch.timeout_seconds``); the AE every association shares is not changed per C-MOVE.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, SegmentationStorage
from pynetdicom import AE, build_context, evt
from pynetdicom.dimse_messages import C_GET_RSP, C_MOVE_RSP
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # pynetdicom creates its SOP classes at import; its stubs do not list them
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Instance, Job, Series
from db.session import read_only
from dicom_node.audit import (
    MAX_STUDIES_AUDITED,
    answered_without_the_handler,
    audited_retrieve,
    disclosed,
    repeatable_refusal,
    retrieval_ended,
    why_unreadable,
)
from dicom_node.config import Destination, PeerSettings, RetrieveSettings, Settings, TlsSettings
from dicom_node.logs import REPEATED_REFUSALS, Throttle, log_event, log_throttled
from dicom_node.retrieve.inflight import Retrieval, retrieving
from dicom_node.retrieve.matching import (
    KEYS,
    AmbiguousPatient,
    QueryError,
    UnsearchableValue,
    check_level_in_model,
    find_disclosing,
    is_narrow,
    matching_instances,
    query_level,
    why_not_served,
)
from dicom_node.retrieve.reports import SegmentationsNotSent, evidence_uids, is_report, is_segmentation
from dicom_node.retrieve.stored import read_stored
from dicom_node.retrieve.suboperations import (
    PENDING,
    SUCCESS,
    SendLimits,
    SubOperations,
    association_ended,
    quiet_ignored_final_status,
)
from dicom_node.scu import send_small_pdus_at_once
from dicom_node.security import PEER_ATTRIBUTE, Peer, PeerPolicy, Refused, client_tls, not_authorized, peer_of
from dicom_node.stall import stalled
from dicom_node.transfer_syntax import NotConverted, converted, offered_pairs, syntax_to_send, uid_name
from inference.frames import (
    codestream_damage,
    decoded_bytes,
    encapsulated_problem,
    lossy_in_lossless_syntax,
    stored_precision,
)

LABEL_MAP_SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.7"

LOG = logging.getLogger(__name__)

QUERY_RETRIEVE_MODELS = (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
)
CANCELLED = 0xFE00
OUT_OF_RESOURCES = 0xA700  # C-FIND: refused, out of resources
TOO_MANY_SUB_OPERATIONS = 0xA702  # C-MOVE/C-GET: refused, out of resources - unable to perform sub-operations
IDENTIFIER_DOES_NOT_MATCH = 0xA900
UNABLE_TO_PROCESS_FIND = 0xC001
MAXIMUM_CONTEXTS = 128
MAXIMUM_SUB_OPERATIONS = 65535  # pynetdicom's ceiling for the count a C-MOVE/C-GET handler yields
MAX_DECOMPRESSED_BYTES = 2_000_000_000
"""Largest pixel data (decoded, by its header) the node decompresses for a peer: decoding and sending hold
it about three times over, in a receiving process that also receives."""

Target = Destination | PeerSettings


class QueryBudget:
    """How many C-FIND queries each peer made in the last minute, for peers without the ``find`` role (this
    receiving process, which allows its share of the node's budget: :meth:`RetrieveContext.from_settings`). Peers
    are the configured ones, so it holds a few timestamps per peer at most."""

    WINDOW_SECONDS = 60.0

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._made: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def spend(self, peer: str) -> bool:
        """Count one query of ``peer``; False (and not counted) once it made ``per_minute`` in the last minute."""
        now = time.monotonic()
        with self._lock:
            made = self._made[peer]
            while made and made[0] <= now - self.WINDOW_SECONDS:
                made.popleft()
            if len(made) >= self.per_minute:
                return False
            made.append(now)
            return True


@dataclass(frozen=True)
class RetrieveContext:
    ae_title: str
    destinations: dict[str, Destination]
    sessions: sessionmaker[Session]
    peers: PeerPolicy = field(default_factory=PeerPolicy.loopback_only)
    limits: RetrieveSettings = field(default_factory=RetrieveSettings)
    move_peers: dict[str, PeerSettings] = field(default_factory=dict)
    tls: TlsSettings | None = None
    sending: SendLimits = field(default_factory=SendLimits)
    """How long each instance sent to a C-GET or C-MOVE peer may take before a peer that stopped taking data
    has its association cut."""
    send_bound_seconds: float = 30.0
    """``network.pdu_read_timeout_seconds``: the node's bound on each send over an association a peer opened (a
    C-GET's), past which the peer is taken to have stopped reading."""
    storage: Path | None = None
    """The storage folder, where each retrieval names the series it sends while it runs, so that no purge deletes
    them underneath it (:mod:`dicom_node.retrieve.inflight`); None: not named."""
    targets_by_ae: dict[str, Target] = field(init=False)
    queries_without_find: QueryBudget = field(init=False)

    def __post_init__(self) -> None:
        targets: dict[str, Target] = {p.ae_title: p for p in self.move_peers.values() if p.ae_title and p.host}
        targets.update({d.ae_title: d for d in self.destinations.values()})
        object.__setattr__(self, "targets_by_ae", targets)
        object.__setattr__(self, "queries_without_find", QueryBudget(self.limits.queries_per_minute_without_find))

    @classmethod
    def from_settings(
        cls, settings: Settings, sessions: sessionmaker[Session], *, processes: int = 1
    ) -> RetrieveContext:
        """Everything the handlers need from the configuration, for one of ``processes`` receiving processes.

        ``retrieve.queries_per_minute_without_find`` is the node's: each receiving process allows its share, so a
        peer that opens an association per query (landing on every process in turn) gets no more in all."""
        limits = settings.retrieve
        if processes > 1:
            share = max(limits.queries_per_minute_without_find // processes, 1)
            limits = limits.model_copy(update={"queries_per_minute_without_find": share})
        return cls(
            ae_title=settings.network.ae_title,
            destinations=settings.destinations,
            sessions=sessions,
            peers=PeerPolicy.from_settings(settings),
            limits=limits,
            move_peers=settings.peers,
            tls=settings.network.tls,
            sending=SendLimits(settings.dispatch.timeout_seconds, settings.dispatch.seconds_per_megabyte),
            send_bound_seconds=settings.network.pdu_read_timeout_seconds,
            storage=settings.storage.directory,
        )


def add_query_retrieve_contexts(ae: AE) -> None:
    """Accept Study and Patient Root Find/Move/Get, and the C-GET storage role for every storage class; each C-MOVE
    sub-association opened with its own connect timeout (:func:`own_connect_timeouts`).

    These are the contexts of peers with the ``store`` role; :func:`storage_roles_of_peer` narrows them for the
    others."""
    own_connect_timeouts(ae)
    for model in QUERY_RETRIEVE_MODELS:
        ae.add_supported_context(model, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    for context in ae.supported_contexts:
        # A C-GET requestor proposes to act as Storage SCP: accept that role (and the usual SCU role).
        if context.abstract_syntax not in QUERY_RETRIEVE_MODELS:
            context.scp_role = True
            context.scu_role = True


def storage_roles_of_peer(event: evt.Event) -> None:
    """EVT_REQUESTED, after the peer check (:func:`dicom_node.security.on_requested`): a peer without the
    ``store`` role gets storage contexts only to receive its C-GET answers.

    It keeps those storage SOP classes it proposes to act as Storage SCP for (SCP/SCU Role Selection), each
    accepted with that role alone: the node sends C-STOREs on them, the peer none. A storage context proposed
    without the SCP role (the default role: the peer storing to the node) is not accepted. The server's shared
    contexts are never changed: this association gets copies."""
    assoc = event.assoc
    peer = getattr(assoc, PEER_ATTRIBUTE, None)
    if not isinstance(peer, Peer) or peer.may("store") or assoc.is_rejected or assoc.is_aborted:
        return
    as_storage_scp = {
        str(uid) for uid, item in assoc.requestor.role_selection.items() if getattr(item, "scp_role", False)
    }
    narrowed: list[PresentationContext] = []
    for context in assoc.acceptor.supported_contexts:
        syntax = str(context.abstract_syntax)
        if syntax in QUERY_RETRIEVE_MODELS or syntax == str(Verification):
            narrowed.append(context)
        elif syntax in as_storage_scp:
            receiving = build_context(syntax, list(context.transfer_syntax))
            receiving.scu_role, receiving.scp_role = False, True
            narrowed.append(receiving)
    assoc.acceptor.supported_contexts = narrowed


def handlers(context: RetrieveContext) -> list[tuple[Any, ...]]:
    """The C-FIND, C-MOVE and C-GET handlers, each leaving one audit record per request, and the storage roles
    of peers that do not store (bound after the peer check)."""
    quiet_ignored_final_status()
    return [
        (evt.EVT_REQUESTED, storage_roles_of_peer),
        (evt.EVT_C_FIND, audited_retrieve("find", handle_find, context.sessions), [context]),
        (evt.EVT_C_MOVE, audited_retrieve("move", handle_move, context.sessions), [context]),
        (evt.EVT_C_GET, audited_retrieve("get", handle_get, context.sessions), [context]),
    ]


KEPT_PATIENT_KEYS = frozenset({"PatientID", "IssuerOfPatientID"})
HIDDEN_PREFIXES = ("Patient", "OtherPatient", "NumberOfPatientRelated")


def is_hidden(keyword: str) -> bool:
    """Whether a peer without the ``find`` role is kept from this attribute (who the patient is, and how many
    other studies the patient has)."""
    return keyword.startswith(HIDDEN_PREFIXES) and keyword not in KEPT_PATIENT_KEYS


def hidden_keys_matched(identifier: Dataset) -> list[str]:
    """The keys of ``identifier`` that would match on an attribute hidden from a peer without the ``find`` role:
    each answer (a match or none) would tell it what it may not read, one guess at a time. Only keys the node
    matches on count; an empty key, or a lone ``*``, asks for the value and matches everything: it tells nothing.
    Any other value selects, even one of wildcards and separators alone (``*^*`` tells whether the name has a
    given name)."""

    def selects(value: object) -> bool:
        values = value if isinstance(value, (list, MultiValue)) else [value]
        return any(str(v if v is not None else "").strip() not in ("", "*") for v in values)

    return sorted(
        element.keyword
        for element in identifier
        if element.keyword in KEYS and is_hidden(element.keyword) and selects(element.value)
    )


def without_demographics(response: Dataset) -> Dataset:
    """A match for a peer without the ``find`` role: its patient's name, birth date, sex and other details empty.

    Such a peer looks up what it was told of (an accession number, a study UID) to retrieve it; it learns
    the UIDs and the PatientID, never who the patient is, however many accession numbers it tries.
    """
    for element in list(response):
        if is_hidden(element.keyword):
            response[element.tag].value = None
    if "SpecificCharacterSet" in response and all(str(element.value).isascii() for element in response):
        del response.SpecificCharacterSet  # set for a name it no longer carries: it would hint at one
    return response


def _refusal_without_find(identifier: Dataset, peer: Peer, context: RetrieveContext) -> tuple[str, int, str] | None:
    """For a peer without the ``find`` role: why this C-FIND is refused (the log's reason, the status and its
    comment), or None. It may look up what it was told of, not browse, guess hidden details, or try key after key.

    Every query counts against ``retrieve.queries_per_minute_without_find``, refused ones too (one whose
    QueryRetrieveLevel cannot be read raises QueryError after it is counted): refusals cost the peer as much as
    answers, so it cannot repeat them faster than it may query."""
    if peer.may("find"):
        return None
    if not context.queries_without_find.spend(peer.name):
        per_minute = context.limits.queries_per_minute_without_find
        return (
            f"peer {peer.name} has no find role and made {per_minute} queries in the last minute "
            "(retrieve.queries_per_minute_without_find): trying one key after another is not allowed",
            OUT_OF_RESOURCES,
            "Too many queries: wait a minute",
        )
    level = query_level(identifier)
    if not is_narrow(identifier, level):
        return (
            f"peer {peer.name} has no find role: only narrow queries below PATIENT level (a unique key or "
            "AccessionNumber without wildcards)",
            0x0124,
            "Not authorized: query too broad",
        )
    hidden = hidden_keys_matched(identifier)
    if hidden:
        return (
            f"peer {peer.name} has no find role, so it may not match on patient details it is not shown "
            f"({', '.join(hidden)})",
            0x0124,
            "Not authorized: no matching on patient details",
        )
    return None


def handle_find(event: evt.Event, context: RetrieveContext) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """Yield a pending response per match, from the database, up to ``retrieve.max_find_matches``."""
    identifier = event.identifier
    calling_ae = event.assoc.requestor.ae_title
    peer = peer_of(event, context.peers)
    if isinstance(peer, Refused) or not ({"find", "move", "get"} & peer.roles):
        repeatable_refusal(event)
        yield not_authorized(event, "find", peer), None
        return
    limit = context.limits.max_find_matches
    count = 0
    try:
        refusal = _refusal_without_find(identifier, peer, context)
        if refusal is not None:
            reason, status_code, comment = refusal
            fields = {"calling_ae": calling_ae, "address": event.assoc.requestor.address, "reason": reason}
            # a peer can repeat these at will: one line per peer and reason, one record per peer, each ten seconds
            why = "rate" if status_code == OUT_OF_RESOURCES else comment
            log_throttled(LOG, logging.WARNING, "query.refused", (peer.name, why), **fields)
            repeatable_refusal(event)
            yield _status(status_code, comment), None
            return
        check_level_in_model(identifier, event.context.abstract_syntax)
        level = query_level(identifier)
        for response, studies in _matches(context, identifier, limit + 1):
            if event.is_cancelled:
                yield CANCELLED, None
                return
            if count == limit:
                log_event(
                    LOG,
                    logging.WARNING,
                    "query.truncated",
                    calling_ae=calling_ae,
                    address=event.assoc.requestor.address,
                    query_level=level,
                    reason=f"more than {limit} matches (retrieve.max_find_matches)",
                )
                yield _status(OUT_OF_RESOURCES, f"More than {limit} matches: narrow the query"), None
                return
            count += 1
            if studies is not None:
                disclosed(event, studies)
            yield PENDING, response if peer.may("find") else without_demographics(response)
    except QueryError as exc:
        fields = {"calling_ae": calling_ae, "address": event.assoc.requestor.address, "reason": str(exc)}
        if isinstance(exc, UnsearchableValue):  # repeatable at will, disclosing nothing: throttled as the others
            log_throttled(LOG, logging.WARNING, "query.refused", (peer.name, "value", exc.keyword), **fields)
            repeatable_refusal(event)
        else:
            log_event(LOG, logging.WARNING, "query.refused", **fields)
        yield _status(IDENTIFIER_DOES_NOT_MATCH, "Identifier does not match: see the node's log"), None
        return
    except Exception as exc:  # noqa: BLE001 - the peer hears a fixed comment, the log the details
        _log_query_failure(exc, peer, calling_ae, event.assoc.requestor.address)
        yield _status(UNABLE_TO_PROCESS_FIND, "Unable to process the query"), None
        return
    log_event(LOG, logging.INFO, "query.answered", calling_ae=calling_ae, query_level=level, matches=count)
    yield SUCCESS, None


FAILURES_TRACED = Throttle(3600.0, max_keys=256)
"""The C-FIND failures whose details (the traceback) were logged in the last hour, by kind and message."""


def _log_query_failure(
    exc: Exception, peer: Peer, calling_ae: str, address: str, event: str = "query.failed", what: str = "query"
) -> None:
    """A C-FIND (or, with ``event`` ``retrieve.failed``, a C-GET or C-MOVE) the node could not answer for an
    internal error (its database unreachable, say): one ERROR line per peer and failure each 10 s, with the details
    (the traceback) once an hour for each distinct failure, so that a peer repeating a request that fails cannot
    fill the disk with tracebacks."""
    kind = (type(exc).__qualname__, str(exc)[:200])
    dropped = REPEATED_REFUSALS.admit((event, peer.name, kind))
    if dropped is None:
        return
    traced = FAILURES_TRACED.admit(kind) is not None
    fields: dict[str, Any] = {
        "calling_ae": calling_ae,
        "address": address,
        "reason": f"the node could not answer this {what} because of an internal error; "
        + ("its details are in this line's exception field" if traced else "the same error as logged before"),
    }
    if dropped:
        fields["not_logged_since_last"] = dropped
    LOG.error(event, exc_info=exc if traced else None, extra={"event_fields": fields})


def _matches(context: RetrieveContext, identifier: Dataset, limit: int) -> list[tuple[Dataset, list[str] | None]]:
    """Each match (at most ``limit``) with, at PATIENT level, the studies it discloses (None below).

    Read in one short read-only transaction that ends before the first is answered: a peer slow to read its
    answers holds no lock or connection of the database, and the audit records are written without waiting
    for one. The caller's cap (``retrieve.max_find_matches``) bounds what is held meanwhile.
    """
    with read_only(context.sessions) as session:
        return [
            (response, None if studies is None else studies[:MAX_STUDIES_AUDITED])
            for response, studies in find_disclosing(session, identifier, context.ae_title, limit=limit)
        ]


def handle_move(event: evt.Event, context: RetrieveContext) -> Iterator[Any]:
    """Send the matching instances to a destination or peer with an address in config.yaml."""
    calling_ae = event.assoc.requestor.ae_title
    peer = peer_of(event, context.peers)
    if isinstance(peer, Refused) or not peer.may("move"):
        repeatable_refusal(event)
        not_authorized(event, "move", peer)
        yield None, None  # pynetdicom answers 0xA801; the log says why
        return
    target = (event.move_destination or "").strip()
    destination = context.targets_by_ae.get(target)
    if destination is None:
        log_event(
            LOG,
            logging.WARNING,
            "retrieve.refused",
            calling_ae=calling_ae,
            address=event.assoc.requestor.address,
            reason=f"unknown move destination {target!r}",
        )
        yield None, None
        return
    selection = _paths_to_retrieve(event, context, calling_ae, peer)
    paths = selection.paths if isinstance(selection, Selection) else selection
    # a refusal still opens the sub-association (pynetdicom's order); Verification keeps it valid
    contexts = _storage_contexts(paths) if isinstance(paths, list) and paths else [build_context(Verification)]
    sub_association: dict[str, Any] = {}
    route = Route(
        "move",
        f"move to {target}",
        f"move destination {destination.ae_title} at {destination.host}:{destination.port}",
        f"Move destination {destination.ae_title}",
        lambda: sub_association.get("assoc"),
        SubOperations(),
        SegmentationsNotSent(),
    )
    options: dict[str, Any] = {
        "contexts": contexts,
        "ae_title": destination.ae_title,
        "evt_handlers": [
            # the sub-association's accepted contexts decide the form each instance is sent in
            (evt.EVT_ACCEPTED, lambda e: sub_association.update(assoc=e.assoc)),
            (evt.EVT_DIMSE_RECV, route.answers.on_message),  # the destination's answer to each instance
            (evt.EVT_DATA_SENT, route.answers.on_sent),  # how far each instance went out
            # how far opening it went, for the sentence when it could not be opened
            (evt.EVT_CONN_OPEN, lambda e: sub_association.update(connected=True)),
            (evt.EVT_CONN_OPEN, send_small_pdus_at_once),  # each instance's command without a Nagle wait
            (evt.EVT_REJECTED, lambda e: sub_association.update(rejected=True)),
        ],
    }
    tls_args = client_tls(destination, context.tls)
    if tls_args is not None:
        options["tls_args"] = tls_args
    count = len(paths) if isinstance(paths, list) else 0
    refusal = paths if isinstance(paths, str) else None
    unreachable = _UnreachableDestination(
        event, route, sub_association, count, context.sending.timeout_seconds, refusal
    )
    event.assoc.bind(evt.EVT_DIMSE_SENT, unreachable.on_sent)
    series = selection.series if isinstance(selection, Selection) else frozenset()
    retrieval = Retrieval(f"{calling_ae} at {_address(event)}", f"C-MOVE to {destination.ae_title}", series)
    with retrieving(context.storage, retrieval):  # until the last instance is sent: no purge deletes them
        yield from _move(event, context, paths, route, unreachable, (destination.host, destination.port, options))


def _address(event: evt.Event) -> str:
    """The requestor's ``host:port``."""
    requestor = event.assoc.requestor
    return f"{requestor.address}:{requestor.port}"


def _move(
    event: evt.Event,
    context: RetrieveContext,
    paths: list[Stored] | str,
    route: Route,
    unreachable: _UnreachableDestination,
    destination: tuple[Any, Any, dict[str, Any]],
) -> Iterator[Any]:
    """The C-MOVE from its destination on: the sub-association, the count (or a refusal), the instances."""
    calling_ae = event.assoc.requestor.ae_title
    # pynetdicom opens the sub-association after the count, in this thread: resumed past it, the handler has one.
    # Its connect waits as long as a send's (its own timeout: the node's AE, shared by every association, is left
    # as it is).
    _opening.connect_seconds = context.sending.timeout_seconds
    try:
        yield destination
        if isinstance(paths, str):  # pynetdicom has no way to refuse before the destination: refuse as the first
            yield 1
            unreachable.stop()
            _correct_final_counts(event, failed=-1)  # the one sub-operation counted above was none
            yield _refusal(paths), None
            return
        yield from _count_or_refuse(paths, context, event, route.operation)
        unreachable.stop()
        yield from _send(event, paths, calling_ae, route, context)
    finally:
        _opening.__dict__.pop("connect_seconds", None)  # when pynetdicom did not associate
        unreachable.stop()


_opening = threading.local()
"""The connect timeout of the C-MOVE sub-association this thread's handler is about to have pynetdicom open."""


def own_connect_timeouts(ae: AE) -> None:
    """Give each C-MOVE sub-association the ``ae`` opens its own connect timeout (the one its handler set in
    :data:`_opening`), instead of the AE's, which every association of the AE shares and which pynetdicom copies
    into each association it creates: a C-MOVE setting it on the AE would change it under another one's."""
    create_socket = ae._create_socket
    if getattr(create_socket, "own_connect_timeouts", False):
        return

    def with_own_timeout(assoc: Any, address: Any, tls_args: Any) -> Any:
        seconds = _opening.__dict__.pop("connect_seconds", None)
        if seconds is not None:
            assoc.connection_timeout = seconds
        return create_socket(assoc, address, tls_args)

    with_own_timeout.own_connect_timeouts = True  # type: ignore[attr-defined]
    setattr(ae, "_create_socket", with_own_timeout)  # noqa: B010 - an instance's own, not pynetdicom's class


MOVE_DESTINATION_UNKNOWN = 0xA801


class _UnreachableDestination:
    """While a C-MOVE's sub-association is being opened: when it could not be (the destination refused, did not
    answer within ``dispatch.timeout_seconds``, or rejected the association), pynetdicom answers the requestor
    0xA801 (Move Destination unknown) itself, without a comment, and never resumes the handler. This turns that
    answer, as it is sent, into 0xA702 (unable to perform sub-operations), every sub-operation failed, with a
    comment naming the destination, and logs a sentence naming it; or, for a request already refused
    (:attr:`refusal`, its comment), into that refusal, as the peer hears it when the destination is up."""

    def __init__(
        self,
        event: evt.Event,
        route: Route,
        sub_association: dict[str, Any],
        count: int,
        connect_seconds: float,
        refusal: str | None = None,
    ) -> None:
        self.event, self.route, self.sub_association, self.count = event, route, sub_association, count
        self.connect_seconds, self.refusal = connect_seconds, refusal
        self.bound = True

    def on_sent(self, sent: evt.Event) -> None:
        """``EVT_DIMSE_SENT`` of the requestor's association; only the first C-MOVE response counts."""
        message = sent.message
        if not isinstance(message, C_MOVE_RSP):
            return
        self.stop()
        command = message.command_set
        opened = self.sub_association.get("assoc")
        if command.get("Status") != MOVE_DESTINATION_UNKNOWN or (opened is not None and opened.accepted_contexts):
            return
        if self.refusal is not None:
            self._refuse(message, self.refusal)
            return
        command.Status = TOO_MANY_SUB_OPERATIONS
        command.NumberOfFailedSuboperations = min(self.count, MAXIMUM_SUB_OPERATIONS)
        command.NumberOfCompletedSuboperations = command.NumberOfWarningSuboperations = 0
        unaccepted = "accepted none of the objects offered" if opened is not None else "could not be reached"
        command.ErrorComment = f"{self.route.addressed} {unaccepted}"[:64]
        message._set_command_group_length()  # the elements above change the command's length
        requestor = self.event.assoc.requestor
        reason = (
            f"the C-MOVE{self.route.operation.removeprefix('move')} was not done: {self._why()}, so none "
            f"of its {self.count} instance(s) was sent"
        )
        log_event(
            LOG,
            logging.WARNING,
            "retrieve.destination_unreachable",
            calling_ae=requestor.ae_title,
            address=requestor.address,
            operation=self.route.operation,
            reason=reason,
        )
        retrieval_ended(self.event, reason)  # the retrieval's audit record says why too

    def _refuse(self, message: C_MOVE_RSP, comment: str) -> None:
        """Make the answer being sent the refusal of the request (already logged), not a destination's failure."""
        command = message.command_set
        refusal = _refusal(comment)
        command.Status, command.ErrorComment = refusal.Status, refusal.ErrorComment
        command.NumberOfFailedSuboperations = 0
        command.NumberOfCompletedSuboperations = command.NumberOfWarningSuboperations = 0
        message._set_command_group_length()  # the elements above change the command's length
        answered_without_the_handler(self.event, int(refusal.Status))

    def _why(self) -> str:
        """How far opening the sub-association went, as a clause naming the destination."""
        receiver = self.route.receiver
        opened = self.sub_association.get("assoc")
        if opened is not None:  # it answered, accepting none of the presentation contexts proposed
            return f"{receiver} accepted none of the kinds of objects offered ({_kinds_offered(opened)})"
        if self.sub_association.get("rejected"):
            return f"{receiver} rejected the association"
        if self.sub_association.get("connected"):
            return (
                f"{receiver} took the connection but did not accept the association in time "
                "(network.association_request_timeout_seconds)"
            )
        return (
            f"{receiver} refused the connection or did not answer it within {self.connect_seconds:g} s "
            "(dispatch.timeout_seconds)"
        )

    def stop(self) -> None:
        """Stop watching the requestor's responses (once the sub-association opened, or the answer was sent)."""
        if self.bound:
            self.bound = False
            self.event.assoc.unbind(evt.EVT_DIMSE_SENT, self.on_sent)


def _kinds_offered(assoc: Any) -> str:
    """The SOP classes and transfer syntaxes an association proposed, by name, for a sentence."""
    syntaxes: dict[str, list[str]] = {}
    for proposed in assoc.requestor.requested_contexts:
        names = syntaxes.setdefault(uid_name(proposed.abstract_syntax), [])
        names += [uid_name(uid) for uid in proposed.transfer_syntax if uid_name(uid) not in names]
    return "; ".join(f"{sop_class} in {', '.join(names)}" for sop_class, names in sorted(syntaxes.items()))


def handle_get(event: evt.Event, context: RetrieveContext) -> Iterator[Any]:
    """Send the matching instances back over the requestor's own association."""
    calling_ae = event.assoc.requestor.ae_title
    peer = peer_of(event, context.peers)
    if isinstance(peer, Refused) or not peer.may("get"):
        repeatable_refusal(event)
        yield 1
        yield not_authorized(event, "get", peer), None
        return
    selection = _paths_to_retrieve(event, context, calling_ae, peer)
    if isinstance(selection, str):
        yield 1
        yield _refusal(selection), None
        return
    receiver = f"{calling_ae} at {_address(event)}"
    with retrieving(context.storage, Retrieval(receiver, "C-GET", selection.series)):  # no purge deletes them
        answers = SubOperations(context.send_bound_seconds)  # the requestor's association: its sends are bounded
        route = Route("get", "get", receiver, "Requestor", lambda: event.assoc, answers, SegmentationsNotSent())
        paths = _planned(selection.paths, accepted_pairs(event.assoc), route)
        yield from _count_or_refuse(paths, context, event, "get")
        event.assoc.bind(evt.EVT_DIMSE_RECV, answers.on_message)  # the requestor's answer to each instance
        event.assoc.bind(evt.EVT_DATA_SENT, answers.on_sent)  # how far each instance went out
        try:
            yield from _send(event, paths, calling_ae, route, context)
        finally:
            event.assoc.unbind(evt.EVT_DATA_SENT, answers.on_sent)
            event.assoc.unbind(evt.EVT_DIMSE_RECV, answers.on_message)


def _planned(paths: list[Stored], accepted: set[tuple[str, str]], route: Route) -> list[Stored]:
    """What goes to the peer, once the contexts it accepted are known: SEGs before SRs, so that each SR is sent or
    left out once its SEGs' fate is known (:func:`_report_fate`, as dispatch holds one back); a LABELMAP SEG it
    would get as its BINARY twin left out where that twin is selected anyway (it would get the same instance
    twice). Which SEGs the selected SRs report on is read here where a SEG has a twin: an SR left out for its
    LABELMAP SEG is no failure only when an SR on the twin goes too."""
    ordered = sorted(paths, key=_send_order)
    selected = {stored.sop_instance_uid for stored in ordered}
    if any(stored.alternative is not None for stored in ordered):  # a LABELMAP SEG: which SEGs the SRs report on
        route.segmentations.reported = {
            uid for stored in ordered if is_report(stored.sop_class_uid) for uid in evidence_uids(stored.path)
        }
    kept: list[Stored] = []
    for stored in ordered:
        twin = stored.alternative
        if (
            twin is not None
            and twin.sop_instance_uid in selected
            and syntax_to_send(stored.sop_class_uid, stored.transfer_syntax_uid, accepted) is None
        ):
            why = f"is left out because its BINARY twin {twin.sop_instance_uid}, selected too, goes instead"
            _note_unsent_segmentation(stored, route, why)
            continue
        kept.append(stored)
    return kept


def _send_order(stored: Stored) -> int:
    """SEGs first, then SRs (which reference them), then the rest, each in the order selected (as dispatch)."""
    if is_segmentation(stored.sop_class_uid):
        return 0
    return 1 if is_report(stored.sop_class_uid) else 2


def _as_twin(stored: Stored) -> str:
    """Why the peer does not get this LABELMAP SEG as itself, when it gets its BINARY twin in its place."""
    twin = stored.alternative.sop_instance_uid if stored.alternative is not None else "?"
    return f"goes as its BINARY twin {twin}"


def _note_unsent_segmentation(stored: Stored, route: Route, why: str, *, failed: bool = False) -> None:
    """Note that the peer does not get SEG ``stored`` as itself (``why``, a clause; ``failed``: it could not be
    sent at all), so that an SR on it is left out. Nothing for an instance that is not a SEG."""
    if is_segmentation(stored.sop_class_uid):
        twin = stored.alternative.sop_instance_uid if stored.alternative is not None else None
        route.segmentations.note(stored.sop_instance_uid, why, failed=failed, twin=twin)


def _report_fate(stored: Stored, calling_ae: str, route: Route) -> Literal["send", "leave out", "fail"]:
    """Whether ``stored`` is sent: an SR naming a SEG the peer does not get as itself is left out, with a log line
    saying so (the peer would hold a report on a segmentation it lacks; dispatch holds such an SR back). It fails
    (a failed sub-operation) where such a SEG could not be sent at all; else its twin's own SR reports the same."""
    if not is_report(stored.sop_class_uid):
        return "send"
    lacking = route.segmentations.named_by(stored.path)
    if not lacking:
        return "send"
    failed = route.segmentations.failed.intersection(lacking)
    unmeasured = [uid for uid in lacking if not route.segmentations.measured_elsewhere(uid)]
    reasons = "; ".join(f"segmentation {uid} {route.segmentations.why[uid]}" for uid in lacking)
    if failed:
        outcome = "it counts as a failed sub-operation"
    elif unmeasured:
        outcome = (
            "it counts as a failed sub-operation, as no SR on the BINARY SEG that goes instead is retrieved with it "
            "(retrieve that SR's series too, for the same measurements)"
        )
    else:
        outcome = "this is not a failure: the SR on that BINARY SEG, sent too, holds the same measurements"
    log_event(
        LOG,
        logging.WARNING if failed or unmeasured else logging.INFO,
        "retrieve.report_left_out",
        calling_ae=calling_ae,
        operation=route.operation,
        sop_instance_uid=stored.sop_instance_uid,
        reason=f"SR {stored.sop_instance_uid} was not sent to {route.receiver}, because it reports on a segmentation "
        f"that peer does not get as itself ({reasons}); {outcome}",
    )
    return "fail" if failed or unmeasured else "leave out"


def _left_out_not_failed(event: evt.Event, left_out: int) -> None:
    """pynetdicom counts every sub-operation still remaining at a final failure or warning as failed: take the
    ``left_out`` instances left out without failing (after the count, :func:`_planned`) off that number as the
    final response is sent."""
    _correct_final_counts(event, failed=-left_out)


def _cancelled(event: evt.Event, answers: SubOperations, not_sent: list[str], left_out: int) -> tuple[int, Dataset]:
    """The Cancel answer. pynetdicom counts as remaining every instance it was not handed: those that could not be
    sent are failed sub-operations instead (and listed), and those left out without failing are in no count."""
    if not_sent or left_out:
        _correct_final_counts(event, failed=len(not_sent), remaining=-(len(not_sent) + left_out))
    report = Dataset()
    report.FailedSOPInstanceUIDList = [*answers.failed, *not_sent]
    return CANCELLED, report


def _correct_final_counts(event: evt.Event, *, failed: int = 0, remaining: int = 0) -> None:
    """Add ``failed`` and ``remaining`` to the counts pynetdicom puts in the final C-MOVE or C-GET response, as it is
    sent (it is changed before it is encoded; pynetdicom sets those counts itself, over any the handler yields)."""

    def on_sent(sent: evt.Event) -> None:
        message = sent.message
        if not isinstance(message, (C_MOVE_RSP, C_GET_RSP)) or message.command_set.get("Status") == PENDING:
            return
        event.assoc.unbind(evt.EVT_DIMSE_SENT, on_sent)
        command = message.command_set
        for keyword, change in (("NumberOfFailedSuboperations", failed), ("NumberOfRemainingSuboperations", remaining)):
            count = command.get(keyword)
            if change and count is not None:
                setattr(command, keyword, max(int(count) + change, 0))
        message._set_command_group_length()  # the elements above may change the command's length

    event.assoc.bind(evt.EVT_DIMSE_SENT, on_sent)


def _success_with_none_remaining() -> Dataset:
    """The final Success of a retrieval that left instances out without failing (counted before they were): it
    says no sub-operation remains, rather than the count pynetdicom last sent."""
    status = Dataset()
    status.Status = SUCCESS
    status.NumberOfRemainingSuboperations = None
    return status


def _count_or_refuse(paths: list[Any], context: RetrieveContext, event: evt.Event, what: str) -> Iterator[Any]:
    """Yield the sub-operation count; over ``retrieve.max_instances_per_retrieval``, then a 0xA702 refusal."""
    yield min(len(paths), MAXIMUM_SUB_OPERATIONS)
    calling_ae, address = event.assoc.requestor.ae_title, event.assoc.requestor.address
    limit = context.limits.max_instances_per_retrieval
    if len(paths) > limit:
        log_event(
            LOG,
            logging.WARNING,
            "retrieve.refused",
            calling_ae=calling_ae,
            address=address,
            operation=what,
            reason=f"more than {limit} instances selected (retrieve.max_instances_per_retrieval)",
        )
        yield _status(TOO_MANY_SUB_OPERATIONS, f"More than {limit} instances: retrieve less"), None
        paths.clear()


class Stored(NamedTuple):
    path: str
    sop_class_uid: str
    transfer_syntax_uid: str
    sop_instance_uid: str
    alternative: Stored | None = None  # the same result in a form more peers read (BINARY beside LABELMAP)
    size_bytes: int | None = None  # the file's size when it was stored


class DamagedFile(ValueError):
    """A stored file whose size is not the size it was stored with; the message says so."""


def _intact(stored: Stored) -> str:
    """``stored.path``, once its size is the one it was stored with.

    Raises
    ------
    DamagedFile
        If the file was shortened or changed on disk since (sending it would hand the peer a broken instance).
    OSError
        If it cannot be read at all.
    """
    size = os.stat(stored.path).st_size
    if stored.size_bytes is not None and size != stored.size_bytes:
        raise DamagedFile(
            f"the stored file of instance {stored.sop_instance_uid} is {size:,} bytes, but it was stored with "
            f"{stored.size_bytes:,}: it was changed or damaged on disk, so it is not sent (restore it from a backup, "
            "or have the sender send it again)"
        )
    return stored.path


NOT_MATCHING = "Identifier does not match: see the node's log"
SEVERAL_PATIENTS = "PatientID names several patients: retrieve by StudyInstanceUID"


class Selection(NamedTuple):
    """The instances a C-GET or C-MOVE selected, and the received series a purge of them names (a result's is the
    series it was made from)."""

    paths: list[Stored]
    series: frozenset[str]


def _series_purged_with(session: Session, series_ids: set[int]) -> frozenset[str]:
    """The Series Instance UIDs by which ``dicom-node purge`` and retention name the series ``series_ids``: a
    received series by its own, a result series by the series its job processed."""
    rows = session.execute(select(Series.series_instance_uid, Series.source_job_id).where(Series.id.in_(series_ids)))
    received, jobs = set(), set()
    for uid, job_id in rows:
        if job_id is None:
            received.add(uid)
        else:
            jobs.add(job_id)
    if jobs:
        processed = select(Series.series_instance_uid).join(Job, Job.series_id == Series.id).where(Job.id.in_(jobs))
        received.update(session.scalars(processed))
    return frozenset(received)


def _paths_to_retrieve(event: evt.Event, context: RetrieveContext, calling_ae: str, peer: Peer) -> Selection | str:
    """Where each instance the identifier selects is stored, and how; for an identifier that cannot be retrieved,
    the comment for the peer (and a log line saying why).

    A peer without the ``find`` role may not retrieve at PATIENT level: a PatientID is easily guessed
    (hospital numbers run in sequence), so such a peer retrieves only what it was told of, by Study,
    Series or SOP Instance UID.
    """
    try:
        _check_readable(event, peer)
        check_level_in_model(event.identifier, event.context.abstract_syntax)
        if not peer.may("find") and query_level(event.identifier) == "PATIENT":
            raise QueryError(
                f"peer {peer.name} has no find role, so it may not retrieve a whole patient by PatientID "
                "(which can be guessed); it retrieves by StudyInstanceUID or below"
            )
        hidden = [] if peer.may("find") else hidden_keys_matched(event.identifier)
        if hidden:
            raise QueryError(
                f"peer {peer.name} has no find role, so it may not select by patient details it is not shown "
                f"({', '.join(hidden)})"
            )
        with read_only(context.sessions) as session:  # ended before the first instance is sent
            limit = context.limits.max_instances_per_retrieval + 1  # one more shows there are too many
            found = matching_instances(session, event.identifier, for_retrieval=True, limit=limit)
            paths = [
                Stored(
                    i.path,
                    i.sop_class_uid,
                    i.transfer_syntax_uid,
                    i.sop_instance_uid,
                    _binary_twin(session, i),
                    i.size_bytes,
                )
                for i in found
            ]
            if not found:
                _say_why_nothing_is_served(event, session, calling_ae, peer)
            return Selection(paths, _series_purged_with(session, {i.series_id for i in found}))
    except QueryError as exc:
        ambiguous = isinstance(exc, AmbiguousPatient)
        fields = {
            "calling_ae": calling_ae,
            "address": event.assoc.requestor.address,
            "reason": f"a retrieval by peer {peer.name} was refused: {exc}" if ambiguous else str(exc),
        }
        if isinstance(exc, UnsearchableValue):  # repeatable at will: one line per peer and attribute each 10 s
            log_throttled(LOG, logging.WARNING, "retrieve.refused", (peer.name, "value", exc.keyword), **fields)
            repeatable_refusal(event)
        else:
            log_event(LOG, logging.WARNING, "retrieve.refused", **fields)
        return SEVERAL_PATIENTS if ambiguous else NOT_MATCHING
    except Exception as exc:  # noqa: BLE001 - the peer hears a fixed comment, the log the details
        _log_query_failure(
            exc, peer, calling_ae, event.assoc.requestor.address, "retrieve.failed", "retrieval (C-GET or C-MOVE)"
        )
        return NOT_PROCESSED


class Unprocessed(str):
    """The comment for a retrieval the node could not process for an error of its own: answered 0xC000."""


NOT_PROCESSED = Unprocessed("Unable to process: see the node's log")
UNABLE_TO_PROCESS = 0xC000


def _refusal(comment: str) -> Dataset:
    """The final status of a retrieval refused with ``comment``: 0xC000 for an error of the node's own, else
    0xA900 (the identifier cannot be retrieved)."""
    return _status(UNABLE_TO_PROCESS if isinstance(comment, Unprocessed) else IDENTIFIER_DOES_NOT_MATCH, comment)


def _say_why_nothing_is_served(event: evt.Event, session: Session, calling_ae: str, peer: Peer) -> None:
    """A retrieval that selected nothing, of series the node holds but no longer serves: the log and the audit
    record say why (purged, superseded, withheld); the peer hears Success with no instances, as for a UID the node
    never held."""
    reason = why_not_served(session, event.identifier)
    if reason is None:
        return
    sentence = f"nothing was sent to peer {peer.name}: {reason}"
    log_event(
        LOG,
        logging.INFO,
        "retrieve.nothing_served",
        calling_ae=calling_ae,
        address=event.assoc.requestor.address,
        reason=sentence,
    )
    retrieval_ended(event, sentence)


def _check_readable(event: evt.Event, peer: Peer) -> None:
    """Decode the identifier now: one nested too deeply (or not DICOM) is refused in a sentence, not a traceback.

    Raises
    ------
    QueryError
        Saying why the identifier cannot be read.
    """
    try:
        event.identifier.get("QueryRetrieveLevel")
    except Exception as exc:  # noqa: BLE001 - the peer's bytes are at fault, whatever pydicom raises
        raise QueryError(f"a retrieval by peer {peer.name} was refused: {why_unreadable(exc)}") from None


def _binary_twin(session: Session, instance: Instance) -> Stored | None:
    """For a LABELMAP SEG: the BINARY SEG the same run of the same job made, if there is one."""
    if instance.sop_class_uid != LABEL_MAP_SEGMENTATION:
        return None
    series = instance.series
    if series.source_job_id is None:
        return None
    twin = session.scalars(
        select(Instance)
        .join(Series, Instance.series_id == Series.id)
        .where(
            Series.source_job_id == series.source_job_id,
            Instance.sop_class_uid == SegmentationStorage,
            Series.superseded_at.is_(None)
            if series.superseded_at is None
            else Series.superseded_at == series.superseded_at,
        )
        .limit(1)
    ).first()
    if twin is None:
        return None
    return Stored(twin.path, twin.sop_class_uid, twin.transfer_syntax_uid, twin.sop_instance_uid, None, twin.size_bytes)


def _storage_contexts(paths: list[Stored]) -> list[PresentationContext]:
    """The SOP classes and transfer syntaxes that may be sent: as stored, and the forms offered instead.

    Every instance may go out in Explicit or Implicit VR Little Endian (converted without loss:
    :mod:`dicom_node.transfer_syntax`) and a LABELMAP SEG as its BINARY twin, for a destination that accepts
    only those.
    """
    forms = [(stored.sop_class_uid, stored.transfer_syntax_uid) for stored in paths]
    forms += [(s.alternative.sop_class_uid, s.alternative.transfer_syntax_uid) for s in paths if s.alternative]
    pairs = offered_pairs(forms)
    if len(pairs) > MAXIMUM_CONTEXTS:
        raise QueryError(f"the selection needs {len(pairs)} presentation contexts; at most {MAXIMUM_CONTEXTS} fit")
    return [build_context(sop_class, syntax) for sop_class, syntax in sorted(pairs)]


def accepted_pairs(assoc: Any) -> set[tuple[str, str]]:
    """(SOP class, transfer syntax) pairs an association accepted, for sending data sets over it."""
    if assoc is None:
        return set()
    return {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}


class NotDecompressed(ValueError):
    """A stored instance the node does not decompress or convert for a peer; the message says why."""


def decompression_refusal(dataset: Dataset, sop_instance_uid: str) -> str | None:
    """Why the node does not decompress this stored instance in the receiving process, or None.

    A frame whose own header (JPEG 2000 SIZ, JPEG SOF, RLE header) describes another image than Rows and
    Columns would make the decoder allocate what the frame says; and a small compressed file may declare
    more frames of more pixels than a receiving process should hold decoded (``MAX_DECOMPRESSED_BYTES``); and
    an image the node does not trust for its own results (:func:`untrusted_pixels`) would go out as a clean,
    never compressed one; and pixel values that need more bits than BitsStored would be altered
    (:func:`values_beyond_bits_stored`).
    """
    name = f"instance {sop_instance_uid}"
    mismatch = encapsulated_problem(dataset, name)
    if mismatch is not None:
        return mismatch
    size = decoded_bytes(dataset)
    if size > MAX_DECOMPRESSED_BYTES:
        frames = int(dataset.get("NumberOfFrames") or 1)
        return (
            f"{name} would take {size / 1e6:,.0f} MB decompressed ({frames} frame(s) of {dataset.Columns} x "
            f"{dataset.Rows} pixels), more than the {MAX_DECOMPRESSED_BYTES / 1e6:,.0f} MB the node decompresses "
            "for a retrieval; it is sent only to peers that accept its stored transfer syntax"
        )
    return untrusted_pixels(dataset, name) or values_beyond_bits_stored(dataset, name)


def untrusted_pixels(dataset: Dataset, name: str) -> str | None:
    """Why the node would not use the pixels of ``dataset`` for its own results, as the series loader checks them,
    or None: a frame that is lossy although its transfer syntax allows lossless data only
    (:func:`inference.frames.lossy_in_lossless_syntax`), or a JPEG 2000 or JPEG frame whose structure shows damage
    a decoder reads through without an error (:func:`inference.frames.codestream_damage`).

    Decompressed, such an image would reach the peer as a clean one that was never compressed; sent as stored,
    the peer's own decoder reads the data as the node received it."""
    reason = lossy_in_lossless_syntax(dataset, name) or codestream_damage(dataset, name)
    if reason is None:
        return None
    return (
        f"{reason}. The node does not decompress it for a peer either: it is sent only to peers that accept its "
        "stored transfer syntax"
    )


def values_beyond_bits_stored(dataset: Dataset, name: str) -> str | None:
    """Why decompressing ``dataset`` would change its pixel values, or None.

    pydicom's decoders keep only BitsStored bits of each value: values that need more (a wrong BitsStored, or
    something in the bits above it) would go out silently altered. So, as the receive path does, the frames are
    decoded first with every bit they hold (their own header's precision,
    :func:`inference.frames.stored_precision`; all of BitsAllocated for RLE), and their values must fit BitsStored
    (signed values may also be written without sign extension, as DICOM allows).
    """
    try:
        bits_stored, allocated = int(dataset.BitsStored), int(dataset.BitsAllocated)
        signed = int(dataset.get("PixelRepresentation", 0)) == 1
    except (AttributeError, TypeError, ValueError):
        return None  # decompressing refuses what it cannot read
    precision = stored_precision(dataset)
    held = allocated if precision is None else max(bits_stored, min(precision, allocated))
    if held <= bits_stored:
        return None
    dataset.pixel_array_options(bits_stored=held)
    try:
        pixels = dataset.pixel_array
        low, high = int(pixels.min()), int(pixels.max())
    finally:
        dataset.pixel_array_options()  # the decoded copy is let go; decompressing decodes on its own
    if signed:
        fits = -(1 << (bits_stored - 1)) <= low and high < 1 << (bits_stored - 1)
        fits = fits or (low >= 0 and high < 1 << bits_stored)
        needed = max((value if value >= 0 else -value - 1).bit_length() + 1 for value in (low, high))
    else:
        fits, needed = high < 1 << bits_stored, max(high.bit_length(), 1)
    if fits:
        return None
    return (
        f"{name} has {'signed' if signed else 'unsigned'} pixel values that need {needed} bits, but its BitsStored "
        f"(0028,0101) says {bits_stored}: decompressed, they would become other values, so it is sent only to "
        "peers that accept its stored transfer syntax"
    )


def readable_form(stored: Stored, accepted: set[tuple[str, str]]) -> tuple[Dataset, str] | None:
    """The data set to send so that the peer can read it, and how it was chosen; None when nothing fits.

    As stored, byte for byte, when the peer accepts that SOP class and transfer syntax; else
    converted to Explicit (or Implicit) VR Little Endian, a compressed one decompressed by pydicom's decoders
    (:func:`dicom_node.transfer_syntax.converted`); else (a LABELMAP SEG) the BINARY SEG of the same result.
    """
    syntax = syntax_to_send(stored.sop_class_uid, stored.transfer_syntax_uid, accepted)
    if syntax == stored.transfer_syntax_uid:
        return read_stored(_intact(stored)), "as stored"
    if syntax is not None:
        dataset: Dataset = dcmread(_intact(stored))
        compressed = UID(stored.transfer_syntax_uid).is_compressed
        refusal = decompression_refusal(dataset, stored.sop_instance_uid) if compressed else None
        if refusal is not None:
            raise NotDecompressed(refusal)
        try:
            dataset = converted(dataset, syntax, f"instance {stored.sop_instance_uid}")
        except NotConverted as exc:
            raise NotDecompressed(str(exc)) from None
        return dataset, f"{'decompressed' if compressed else 'converted'} to {UID(syntax).name}"
    twin = stored.alternative
    if twin is not None and (twin.sop_class_uid, twin.transfer_syntax_uid) in accepted:
        return read_stored(_intact(twin)), "as its BINARY SEG"
    return None


def _unreadable(stored: Stored, exc: Exception) -> str:
    """Why a stored instance could not be sent, as a sentence."""
    if isinstance(exc, DamagedFile):
        return str(exc)
    name = f"the stored file of instance {stored.sop_instance_uid}"
    if isinstance(exc, FileNotFoundError):
        return (
            f"{name} is no longer on disk (its series was purged while it was being retrieved, or the file was "
            "removed), so it is not sent"
        )
    if isinstance(exc, OSError):
        return f"{name} cannot be read ({(exc.strerror or 'a read error').lower()}), so it is not sent"
    return f"{name} cannot be read as DICOM or decompressed (damaged on disk?), so it is not sent"


class Route(NamedTuple):
    """Where a retrieval's instances go, and how its sentences name that peer."""

    action: Literal["get", "move"]
    operation: str  # for the log: "get", "move to PLANNER"
    receiver: str  # for sentences: "PLANNER at 10.0.0.7:4000", "move destination PACS at pacs:104"
    addressed: str  # for the peer's comment: "Requestor", "Move destination PACS"
    association: Callable[[], Any]  # the association the instances go over (None before it is open)
    answers: SubOperations  # the peer's answer to each instance
    segmentations: SegmentationsNotSent  # the SEGs the peer does not get as themselves, for the SRs on them


def _send(
    event: evt.Event, paths: list[Stored], calling_ae: str, route: Route, context: RetrieveContext
) -> Iterator[Any]:
    """Yield each stored data set in a form the peer reads, then (unless all went well) the final status.

    What cannot be sent is a failed sub-operation the log names. A C-MOVE's selection is planned here, once the
    destination's accepted contexts are known (:func:`_planned`; a C-GET's before its count); an SR on a SEG the
    peer does not get as itself is left out (:func:`_report_fate`). A peer that stops taking data has its
    association cut after a bounded wait (:mod:`dicom_node.retrieve.suboperations`), and one that closes it
    ends the retrieval too: the instances left count as failed, and the log says why.
    The final status is yielded so that the retrieval's audit record has it; pynetdicom answers it itself when
    every instance was sent (it ignores a status yielded then, and answers the same one, without a comment:
    :class:`~dicom_node.retrieve.suboperations.IgnoredFinalStatus`).
    """
    not_sent: list[str] = []
    comment: str | None = None
    counted = len(paths)
    if route.action == "move":  # the count went before the sub-association: its accepted contexts are known now
        paths = _planned(paths, accepted_pairs(route.association()), route)
    left_out = counted - len(paths)  # left out without failing: the peer gets what they hold in other instances
    for index, stored in enumerate(paths):
        if event.is_cancelled:
            yield _cancelled(event, route.answers, not_sent, left_out)
            return
        assoc = route.association()
        if association_ended(assoc):
            comment = _ended(event, route, stored, len(paths) - index)
            not_sent += [rest.sop_instance_uid for rest in paths[index:]]
            break
        fate = _report_fate(stored, calling_ae, route)
        if fate != "send":
            if fate == "fail":
                not_sent.append(stored.sop_instance_uid)
            else:
                left_out += 1
            continue
        form = _sendable(stored, accepted_pairs(assoc), calling_ae, route.operation)
        if form is None:
            not_sent.append(stored.sop_instance_uid)
            _note_unsent_segmentation(stored, route, "could not be sent (the line before says why)", failed=True)
            continue
        dataset, size = form
        if str(dataset.get("SOPInstanceUID", "")) != stored.sop_instance_uid:
            _note_unsent_segmentation(stored, route, _as_twin(stored))
        refused_before = len(route.answers.failed)
        waited = yield from route.answers.send(assoc, dataset, stored.sop_instance_uid, size, context.sending)
        if len(route.answers.failed) > refused_before:
            _note_unsent_segmentation(stored, route, "was not stored by that peer", failed=True)
        if waited is not None:
            not_sent += [rest.sop_instance_uid for rest in paths[index + 1 :]]
            comment = _cut(event, route, stored, size, waited, len(paths) - index - 1)
            break
    answers = route.answers
    stored_by_peer, failed = answers.completed + answers.warned, len(answers.failed) + len(not_sent)
    log_event(
        LOG,
        logging.INFO,
        "retrieve.sent",
        calling_ae=calling_ae,
        operation=route.operation,
        instances=stored_by_peer,
        failed=failed,
    )
    final = answers.final(not_sent, comment)
    if final[0] != SUCCESS:
        if left_out:
            _left_out_not_failed(event, left_out)
        yield final
    elif left_out:  # pynetdicom answers Success itself, but would say that some sub-operations remain
        yield _success_with_none_remaining(), None


def _sendable(
    stored: Stored, accepted: set[tuple[str, str]], calling_ae: str, operation: str
) -> tuple[Dataset, int] | None:
    """The data set to send for ``stored`` and about how many bytes it takes; None (and a log line saying why)
    when it cannot be sent."""
    try:
        chosen = readable_form(stored, accepted)
        size = _bytes_to_send(stored, *chosen) if chosen is not None else 0
    except NotDecompressed as exc:
        log_event(
            LOG,
            logging.WARNING,
            "retrieve.not_decompressed",
            calling_ae=calling_ae,
            operation=operation,
            sop_instance_uid=stored.sop_instance_uid,
            reason=str(exc),
        )
        return None
    except Exception as exc:  # noqa: BLE001 - one damaged file fails its own sub-operation, never the retrieval
        log_event(
            LOG,
            logging.ERROR if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError) else logging.WARNING,
            "retrieve.file_unreadable",
            calling_ae=calling_ae,
            operation=operation,
            sop_instance_uid=stored.sop_instance_uid,
            path=stored.path,
            reason=_unreadable(stored, exc),
        )
        return None
    if chosen is None:
        log_event(
            LOG,
            logging.WARNING,
            "retrieve.not_accepted",
            calling_ae=calling_ae,
            operation=operation,
            sop_instance_uid=stored.sop_instance_uid,
            reason=f"the peer accepts neither SOP class {stored.sop_class_uid} in {stored.transfer_syntax_uid} "
            "nor a form the node can convert it to",
        )
        return None
    dataset, how = chosen
    if how != "as stored":
        log_event(LOG, logging.INFO, "retrieve.converted", sop_instance_uid=stored.sop_instance_uid, sent=how)
    return dataset, size


def _bytes_to_send(stored: Stored, dataset: Dataset, how: str) -> int:
    """About how many bytes the data set chosen for ``stored`` takes on the wire (what its send may wait on)."""
    source = stored.alternative if how == "as its BINARY SEG" and stored.alternative is not None else stored
    size = source.size_bytes if source.size_bytes is not None else os.stat(source.path).st_size
    return max(size, decoded_bytes(dataset)) if how.startswith(("decompressed", "converted")) else size


def _cut(event: evt.Event, route: Route, stored: Stored, size: int, waited: float, left: int) -> str:
    """The peer stopped taking data and its association was cut, with ``left`` instances still to send: say so
    in the log, naming the peer and the instance; the comment the peer hears (a C-MOVE's requestor: its
    destination stalled). The retrieval's one audit record is written with the final status, as any other's."""
    sentence = stalled(route.receiver, f"instance {stored.sop_instance_uid}", size, waited)
    if left:
        sentence += f"; the {left} instance(s) left were not sent"
    reason = f"{_retrieval(route)} ended: {sentence}"
    log_event(
        LOG,
        logging.WARNING,
        "retrieve.peer_stalled",
        calling_ae=event.assoc.requestor.ae_title,
        operation=route.operation,
        sop_instance_uid=stored.sop_instance_uid,
        reason=reason,
    )
    retrieval_ended(event, reason)
    return f"{route.addressed} stopped taking data"


def _retrieval(route: Route) -> str:
    """``the C-GET``, ``the C-MOVE to PACS``: the retrieval, for sentences."""
    return "the C-GET" if route.action == "get" else f"the C-MOVE{route.operation.removeprefix('move')}"


def _ended(event: evt.Event, route: Route, stored: Stored, left: int) -> str:
    """The association the instances go over ended before ``stored`` was sent (the peer closed it): log it, and
    tell the audit record; the comment the peer hears."""
    reason = (
        f"{_retrieval(route)} ended: {route.receiver} closed the association before instance "
        f"{stored.sop_instance_uid} was sent, so the {left} instance(s) left were not sent"
    )
    log_event(
        LOG,
        logging.WARNING,
        "retrieve.peer_closed",
        calling_ae=event.assoc.requestor.ae_title,
        operation=route.operation,
        reason=reason,
    )
    retrieval_ended(event, reason)
    return f"{route.addressed} closed the association"


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    return status
