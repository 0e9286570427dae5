"""C-FIND, C-MOVE and C-GET handlers over what the node holds: received series and its own results.

They run in the same AE as the Storage SCP, so the calling AE allow-list
(``network.allowed_calling_ae_titles``) guards queries and retrievals as it
guards stores. C-MOVE sends only to the destinations named in config.yaml; an
unknown Move Destination is refused with 0xA801. Retrieved instances go out as
they were stored: the file's data set bytes, in the file's transfer syntax.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, build_context, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import Destination
from dicom_node.logs import log_event
from dicom_node.retrieve.matching import QueryError, find, matching_instances, query_level

LOG = logging.getLogger(__name__)

QUERY_RETRIEVE_MODELS = (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
)
PENDING = 0xFF00
SUCCESS = 0x0000
CANCELLED = 0xFE00
IDENTIFIER_DOES_NOT_MATCH = 0xA900
SUB_OPERATIONS_FAILED = 0xB000  # warning: one or more sub-operations failed
MAXIMUM_CONTEXTS = 128


@dataclass(frozen=True)
class RetrieveContext:
    ae_title: str
    destinations: dict[str, Destination]
    sessions: sessionmaker[Session]
    destinations_by_ae: dict[str, Destination] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "destinations_by_ae", {d.ae_title: d for d in self.destinations.values()})


def add_query_retrieve_contexts(ae: AE) -> None:
    """Accept Study and Patient Root Find/Move/Get, and the C-GET storage role for every storage class."""
    for model in QUERY_RETRIEVE_MODELS:
        ae.add_supported_context(model, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    for context in ae.supported_contexts:
        # A C-GET requestor proposes to act as Storage SCP: accept that role (and the usual SCU role).
        if context.abstract_syntax not in QUERY_RETRIEVE_MODELS:
            context.scp_role = True
            context.scu_role = True


def handlers(context: RetrieveContext) -> list[tuple[Any, ...]]:
    return [
        (evt.EVT_C_FIND, handle_find, [context]),
        (evt.EVT_C_MOVE, handle_move, [context]),
        (evt.EVT_C_GET, handle_get, [context]),
    ]


def handle_find(event: evt.Event, context: RetrieveContext) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """Yield a pending response per match, from the database."""
    identifier = event.identifier
    calling_ae = event.assoc.requestor.ae_title
    count = 0
    try:
        with context.sessions() as session:
            level = query_level(identifier)
            for response in find(session, identifier, context.ae_title):
                if event.is_cancelled:
                    yield CANCELLED, None
                    return
                count += 1
                yield PENDING, response
    except QueryError as exc:
        log_event(LOG, logging.WARNING, "query.refused", calling_ae=calling_ae, reason=str(exc))
        yield _status(IDENTIFIER_DOES_NOT_MATCH, str(exc)), None
        return
    log_event(LOG, logging.INFO, "query.answered", calling_ae=calling_ae, query_level=level, matches=count)
    yield SUCCESS, None


def handle_move(event: evt.Event, context: RetrieveContext) -> Iterator[Any]:
    """Send the matching instances to a destination named in config.yaml."""
    calling_ae = event.assoc.requestor.ae_title
    target = (event.move_destination or "").strip()
    destination = context.destinations_by_ae.get(target)
    if destination is None:
        log_event(LOG, logging.WARNING, "retrieve.refused", calling_ae=calling_ae, reason=f"unknown move destination {target!r}")
        yield None, None
        return
    paths = _paths_to_retrieve(event, context, calling_ae)
    contexts = _storage_contexts(paths)
    yield destination.host, destination.port, {"contexts": contexts, "ae_title": destination.ae_title}
    yield len(paths)
    yield from _send(event, paths, calling_ae, f"move to {target}")


def handle_get(event: evt.Event, context: RetrieveContext) -> Iterator[Any]:
    """Send the matching instances back over the requestor's own association."""
    calling_ae = event.assoc.requestor.ae_title
    paths = _paths_to_retrieve(event, context, calling_ae)
    yield len(paths)
    yield from _send(event, paths, calling_ae, "get")


class Stored(NamedTuple):
    path: str
    sop_class_uid: str
    transfer_syntax_uid: str
    sop_instance_uid: str


def _paths_to_retrieve(event: evt.Event, context: RetrieveContext, calling_ae: str) -> list[Stored]:
    """Where each instance the identifier selects is stored, and how.

    A bad identifier raises: pynetdicom answers the request with a failure
    (0xC511 for C-MOVE, 0xC411 for C-GET), and the log says why.
    """
    try:
        with context.sessions() as session:
            found = matching_instances(session, event.identifier, for_retrieval=True)
            return [Stored(i.path, i.sop_class_uid, i.transfer_syntax_uid, i.sop_instance_uid) for i in found]
    except QueryError as exc:
        log_event(LOG, logging.WARNING, "retrieve.refused", calling_ae=calling_ae, reason=str(exc))
        raise


def _storage_contexts(paths: list[Stored]) -> list[PresentationContext]:
    """Only the SOP classes and transfer syntaxes that will be sent."""
    pairs = sorted({(p.sop_class_uid, p.transfer_syntax_uid) for p in paths})
    if len(pairs) > MAXIMUM_CONTEXTS:
        raise QueryError(f"the selection needs {len(pairs)} presentation contexts; at most {MAXIMUM_CONTEXTS} fit")
    return [build_context(sop_class, syntax) for sop_class, syntax in pairs]


def _send(event: evt.Event, paths: list[Stored], calling_ae: str, what: str) -> Iterator[Any]:
    """Yield each stored data set; files gone from disk end the retrieval with a warning naming them."""
    missing: list[str] = []
    sent = 0
    for path, _, _, sop_instance_uid in paths:
        if event.is_cancelled:
            yield CANCELLED, None
            return
        try:
            dataset = dcmread(path)  # elements stay raw: they go out byte for byte
        except OSError as exc:
            log_event(LOG, logging.ERROR, "retrieve.file_missing", path=path, error=str(exc))
            missing.append(sop_instance_uid)
            continue
        sent += 1
        yield PENDING, dataset
    log_event(LOG, logging.INFO, "retrieve.sent", calling_ae=calling_ae, operation=what, instances=sent, missing=len(missing))
    if missing:
        failed = Dataset()
        failed.FailedSOPInstanceUIDList = missing
        yield SUB_OPERATIONS_FAILED, failed  # the missing ones are still "remaining": pynetdicom counts them failed


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    return status
