"""The Storage SCP: C-ECHO and C-STORE for every storage SOP class, compressed or not (and, through dicom_node.retrieve, Q/R).

A C-STORE is answered with success only after the instance is on disk: written,
fsynced, renamed into place, its folder fsynced, and its path in this process'
journal. The database record follows off the acknowledgement path, in batches
(:mod:`dicom_node.receive.recorder`); a receiver that dies before recording
leaves its journal for ``serve`` or start-up repair to index. Refused instances
get a failure status, a log line with the reason, a row in ``rejected_instances``
and their bytes in the quarantine folder; nothing is half-stored. An instance
that cannot be written (a full disk) is answered 0xA700 and leaves no file
behind, so the sender keeps it and sends it again. While the database cannot be
written, C-STOREs are still answered success and the recorder catches up later. A copy of an instance already
stored whose pixel data differ from it is refused (0x0111), the first copy kept, and its series held (FAILED).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # pynetdicom creates its SOP classes at import; its stubs do not list them
from pynetdicom.transport import AssociationServer
from sqlalchemy.orm import Session, sessionmaker

from db import transfers
from db.ingest import InstanceRecord, record_rejection
from db.models import utcnow
from db.session import retry_when_locked, transaction
from dicom_node import status
from dicom_node.audit import (
    MADE_REQUEST,
    Peer,
    StoreTally,
    association_ended,
    note_request,
    own_check_echo,
    record,
    status_outcome,
)
from dicom_node.config import NetworkSettings
from dicom_node.logs import REPEATED_REFUSALS, log_event, log_throttled, os_error_text, shown
from dicom_node.receive.header import (
    IDENTITY_ATTRIBUTES,
    PATIENT_IDENTITY_ATTRIBUTES,
    InstanceHeader,
    InvalidInstance,
    check_header,
    identity_conflict,
    is_valid_uid,
    read_header,
    stored_header,
)
from dicom_node.receive.open_transfers import OpenTransfers
from dicom_node.receive.recorder import InstanceRecorder, journal_folder
from dicom_node.receive.storage import (
    DIFFERENT_CONTENT_COMMENT,
    InstanceStore,
    QuarantineFull,
    copy_difference,
    different_copy_comment,
    different_copy_reason,
    encode_file_meta,
    hold_series_with_different_copies,
    is_disk_full,
    same_data_set,
)
from dicom_node.receive.studies import KnownStudies, own_results_reason
from dicom_node.retrieve.scp import RetrieveContext, add_query_retrieve_contexts
from dicom_node.retrieve.scp import handlers as retrieve_handlers
from dicom_node.scu import send_small_pdus_at_once
from dicom_node.security import (
    NON_SENDER_CONNECTIONS,
    STRANGER_CONNECTIONS,
    AssociationCaps,
    PeerPolicy,
    from_this_machine,
    on_requested,
    require_role,
    start_guarded_server,
)
from dicom_node.transfer_syntax import uid_name

LOG = logging.getLogger(__name__)

NATIVE_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)
COMPRESSED_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
)
EIGHT_BIT_ONLY_DECODERS: dict[UID, frozenset[str]] = {JPEGExtended12Bit: frozenset({"gdcm", "pillow"})}
"""pydicom decoder plugins that refuse 12-bit samples of a syntax (pydicom 3: "does not support 'JPEG Extended' for
samples with 12-bit precision"); CT in JPEG Extended is 12-bit, so they do not count as a decoder for it."""


def decodable_transfer_syntaxes() -> list[UID]:
    """The uncompressed syntaxes and Deflate, then each compressed syntax an installed decoder can read for CT.

    A compressed syntax counts when one of pydicom's decoder plugins for it is
    installed (``pydicom.pixels.get_decoder(uid).available_plugins``) and decodes
    12- to 16-bit samples. Any other syntax is not negotiated, so a sender falls
    back to an uncompressed one instead of storing images that no stage can read.
    """
    decodable = list(NATIVE_TRANSFER_SYNTAXES)
    for syntax in COMPRESSED_TRANSFER_SYNTAXES:
        decoder = get_decoder(syntax)
        plugins = set(decoder.available_plugins) - EIGHT_BIT_ONLY_DECODERS.get(syntax, frozenset())
        if decoder.is_available and plugins:
            decodable.append(syntax)
    return decodable


ACCEPTED_TRANSFER_SYNTAXES: list[UID] = decodable_transfer_syntaxes()
"""Transfer syntaxes accepted as sent: the node stores the bytes it received, never transcodes; only those it can decode."""

ERROR_COMMENT_LENGTH = 64  # ErrorComment is LO

RELEASE_WAIT_SECONDS = 10.0
"""An A-RELEASE-RQ is answered once the instances acknowledged so far are recorded, or after this long (the
database refuses writes): a sender that has released its association finds its series in the database."""

DISK_FULL_COMMENT = "out of disk space on the node"


@dataclass(frozen=True)
class StoreContext:
    store: InstanceStore
    sessions: sessionmaker[Session]
    recorder: InstanceRecorder
    """Records acknowledged instances in the database, off the acknowledgement path (started by the caller)."""
    studies: KnownStudies = field(init=False)
    """The patient of each study already stored, looked up through ``sessions``."""
    open_transfers: OpenTransfers = field(init=False)
    """The associations open that stored images, and their series: left behind should this process die."""

    def __post_init__(self) -> None:  # frozen: each set once, here
        object.__setattr__(self, "studies", KnownStudies(self.sessions))
        object.__setattr__(self, "open_transfers", OpenTransfers(journal_folder(self.store)))


def build_ae(network: NetworkSettings) -> AE:
    """An AE that accepts Verification, every storage SOP class with the transfer syntaxes above, and Query/Retrieve."""
    ae = AE(ae_title=network.ae_title)
    ae.maximum_pdu_size = network.receive_pdu_limit
    # network.maximum_associations for image senders, plus the shared places of other peers and unknown addresses
    ae.maximum_associations = network.maximum_associations + NON_SENDER_CONNECTIONS + STRANGER_CONNECTIONS
    ae.network_timeout = network.network_timeout_seconds
    ae.acse_timeout = network.association_request_timeout_seconds
    ae.require_called_aet = network.require_called_ae_title
    ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    for context in AllStoragePresentationContexts:
        if context.abstract_syntax is not None:  # always set in pynetdicom's list
            ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
    add_query_retrieve_contexts(ae)
    return ae


def start_storage_scp(
    network: NetworkSettings,
    context: StoreContext,
    retrieve: RetrieveContext | None = None,
    peers: PeerPolicy | None = None,
    *,
    caps: AssociationCaps | None = None,
    listening: socket.socket | None = None,
    heartbeat: Callable[[], object] | None = None,
) -> AssociationServer:
    """Start listening (non-blocking); returns the server to ``shutdown()`` later.

    With ``retrieve``, the same AE also answers C-FIND, C-MOVE and C-GET.
    ``peers`` decides who may associate and what each may do (default: the
    retrieve context's policy, else any AE title from loopback); the limits
    of :mod:`dicom_node.security` apply to every connection. Several receiving
    processes pass the listening socket they share and the association caps
    they count together (:mod:`dicom_node.receive.processes`), and a ``heartbeat`` run at each turn of the
    accepting loop, which their supervisor watches.
    """
    ae = build_ae(network)
    peers = peers or (retrieve.peers if retrieve is not None else None) or PeerPolicy.loopback_only()
    shared_caps = caps if listening is not None else None  # one process: the server counts its own
    handlers = [
        (evt.EVT_CONN_OPEN, _on_connection_open),
        (
            evt.EVT_REQUESTED,
            on_requested,
            [peers, shared_caps, lambda event, why: _audit_rejection(event, context.sessions, why)],
        ),
        (evt.EVT_ACCEPTED, _on_accepted),
        (evt.EVT_PDU_RECV, note_request),
        (evt.EVT_REJECTED, _on_rejected),
        (evt.EVT_ACSE_RECV, _note_abort_received),
        (evt.EVT_ABORTED, _on_aborted),
        (evt.EVT_RELEASED, _audit_association_end, [context.sessions, "released"]),
        (evt.EVT_ABORTED, _audit_association_end, [context.sessions, "aborted"]),
        (evt.EVT_RELEASED, _note_transfer_end, [context, "released"]),
        (evt.EVT_ABORTED, _note_transfer_end, [context, "aborted"]),
        (evt.EVT_REJECTED, _audit_rejection, [context.sessions]),
        (evt.EVT_C_ECHO, require_role("echo", peers, _on_echo), [context.sessions]),
        (evt.EVT_C_STORE, require_role("store", peers, handle_store), [context]),
    ]
    if retrieve is not None:
        handlers += retrieve_handlers(retrieve)
    server = start_guarded_server(ae, (network.host, network.port), network, handlers, caps, listening, peers)
    server.before_release = functools.partial(_release_requested, context)
    server.heartbeat = heartbeat
    stop_listening = server.shutdown

    def shutdown() -> None:
        stop_listening()
        end_open_associations(server, context.sessions)

    server.shutdown = shutdown  # type: ignore[method-assign]  # every caller stops the SCP through shutdown()
    log_event(
        LOG,
        logging.DEBUG if listening is not None else logging.INFO,  # the pool logs its own line
        "scp.listening",
        ae_title=network.ae_title,
        host=network.host,
        port=network.port,
        tls="on" if network.tls else "off",
        peers=peers.description,
    )
    return server


def handle_store(event: evt.Event, context: StoreContext) -> int | Dataset:
    """Store one instance durably, then answer; refuse with a reason what cannot be stored.

    The outcome is tallied per association and study for the audit trail (written when
    the association ends, :func:`dicom_node.audit.association_ended`).
    """
    attempt = _StoreAttempt()
    answer = _store(event, context, attempt)
    code = answer if isinstance(answer, int) else int(answer.Status)
    outcome = status_outcome(code)
    StoreTally.of(event.assoc).add(attempt.study_instance_uid, "success" if outcome == "partial" else outcome)
    if outcome in ("success", "partial") and attempt.series_instance_uid is not None:
        context.open_transfers.storing(event.assoc, attempt.series_instance_uid)  # before it is acknowledged
        series_stored(event.assoc).add(attempt.series_instance_uid)
    return answer


@dataclass
class _StoreAttempt:
    study_instance_uid: str | None = None  # known once the header is read
    series_instance_uid: str | None = None  # set where the image is stored into its series


SERIES_STORED = "_dicom_node_series_stored"
"""Set on an association: the SeriesInstanceUIDs it stored images of, for :func:`_note_transfer_end`."""


def series_stored(assoc: Any) -> set[str]:
    """The series an association stored images of (a set kept on it, created on first use)."""
    stored = getattr(assoc, SERIES_STORED, None)
    if stored is None:
        stored = set()
        setattr(assoc, SERIES_STORED, stored)
    return stored


def _release_requested(context: StoreContext, assoc: Any) -> None:
    """A sender asked to release its association, so it has sent all it meant to: its images are recorded first
    (for up to :data:`RELEASE_WAIT_SECONDS`), and it leaves this process' open transfers before the release is
    answered (a process killed after the answer, before the release's handlers ran, leaves no mark)."""
    context.recorder.wait_until_recorded(RELEASE_WAIT_SECONDS)
    context.open_transfers.ended(assoc)


def _note_transfer_end(event: evt.Event, context: StoreContext, outcome: Literal["released", "aborted"]) -> None:
    """An association that stored images ended: cut short, its series may lack the rest (completion waits for them,
    :mod:`db.transfers`); released, its series were sent whole again, where another association was cut short
    before this one began. Then it leaves this process' open transfers."""
    try:
        _mark_transfer_end(event.assoc, context.sessions, outcome)
    finally:
        context.open_transfers.ended(event.assoc)


ACCEPTED_AT = "_dicom_node_accepted_at"
"""Set on an association when the node accepts it: the moment (UTC), for :func:`_mark_transfer_end`."""
ABORTED_AT = "_dicom_node_aborted_at"
"""Set on an association as its abort is first handled (before the audit trail is written): the moment (UTC)."""


def _mark_transfer_end(assoc: Any, sessions: sessionmaker[Session], outcome: Literal["released", "aborted"]) -> None:
    ended_at = getattr(assoc, ABORTED_AT, None) or utcnow()
    series = set(getattr(assoc, SERIES_STORED, None) or ())
    if not series or (outcome == "aborted" and ended_idle(assoc)):
        return  # a sender silent for the idle limit had sent what it meant to: its series complete as usual
    requestor = assoc.requestor
    try:
        if outcome == "aborted":
            reason = abort_reason(assoc)
            log_event(
                LOG,
                logging.WARNING,
                "series.interrupted",
                calling_ae=requestor.ae_title,
                address=requestor.address,
                series=len(series),
                reason=f"{reason}, after it had stored images of {len(series)} series; each waits for the rest "
                "(completion.expected_count_timeout_seconds) before it is processed, then is marked partial",
            )
            retry_when_locked(
                lambda: transfers.note_interrupted(sessions, series, requestor.ae_title, reason, at=ended_at),
                waiting=f"noting the series of the association from {requestor.ae_title} that was cut short",
                limit_seconds=RELEASE_WAIT_SECONDS,
            )
        else:
            retry_when_locked(
                lambda: transfers.clear_interrupted(sessions, series, getattr(assoc, ACCEPTED_AT, ended_at)),
                waiting=f"noting the series {requestor.ae_title} sent again",
                limit_seconds=RELEASE_WAIT_SECONDS,
            )
    except Exception:  # the association has ended either way; completion then goes by the quiet period
        LOG.exception(
            "series.interruption_not_noted",
            extra={
                "event_fields": {
                    "calling_ae": requestor.ae_title,
                    "reason": f"whether the association from {requestor.ae_title} ended {outcome} could not be "
                    "recorded for its series (details follow); they complete after the quiet period as usual",
                }
            },
        )


def _store(event: evt.Event, context: StoreContext, attempt: _StoreAttempt) -> int | Dataset:
    request = cast(C_STORE, event.request)  # a C-STORE handler's request (pynetdicom types it as any DIMSE request)
    transfer_syntax = event.context.transfer_syntax
    encoded = event.encoded_dataset(include_meta=False)
    calling_ae = event.assoc.requestor.ae_title
    sop_class = str(request.AffectedSOPClassUID or "")
    sop_instance = str(request.AffectedSOPInstanceUID or "")
    identified = is_valid_uid(sop_class) and is_valid_uid(sop_instance)
    file_meta = encode_file_meta(sop_class, sop_instance, transfer_syntax, calling_ae) if identified else b""

    def refuse(status_code: int, reason: str, series_instance_uid: str | None, comment: str | None = None) -> Dataset:
        """Answer a failure status for this request (see :func:`_refuse`)."""
        return _refuse(
            context,
            encoded,
            file_meta,
            status_code,
            reason,
            request,
            transfer_syntax,
            calling_ae,
            series_instance_uid=series_instance_uid,
            comment=comment,
        )

    if identified and getattr(event.assoc, RESENDING, False):
        # The last instance on this association was already here: the sender is likely resending a series.
        # The header is checked first, so an instance already at its path is not written again.
        try:
            header = _checked_header(encoded, transfer_syntax, sop_class, sop_instance)
        except InvalidInstance as exc:
            return refuse(exc.status, str(exc), exc.series_instance_uid)
        path = context.store.path_for(header.study.study_instance_uid, header.series.series_instance_uid, sop_instance)
        temporary, write_error = (None, None) if path.exists() else _write_temporary(context.store, file_meta, encoded)
    else:
        # The header is checked in a helper thread while this one writes: the write waits in one system call
        # without the interpreter lock, which the check needs. (Writing in the helper instead, the check kept
        # the lock and the write began only after it: 1 ms more per 512x512 image, measured 2026-11-30.)
        checking = _HEADER_CHECKERS.submit(_checked_header, encoded, transfer_syntax, sop_class, sop_instance)
        temporary, write_error = _write_temporary(context.store, file_meta, encoded) if identified else (None, None)
        try:
            header = checking.result()
        except InvalidInstance as exc:
            _discard(temporary)
            return refuse(exc.status, str(exc), exc.series_instance_uid)
        except BaseException:
            _discard(temporary)
            raise
        assert temporary is not None or write_error is not None  # check_header refuses requests without valid UIDs
        path = context.store.path_for(header.study.study_instance_uid, header.series.series_instance_uid, sop_instance)
    stored = _stored_copy(context, path, header)
    conflict = _identity_conflict(stored, header)
    if conflict is not None:  # a stored instance is never relabelled, nor a new identity silently dropped
        _discard(temporary)
        return refuse(
            status.CANNOT_UNDERSTAND, _stored_with_another(sop_instance, conflict), header.series.series_instance_uid
        )
    job = context.studies.result_job(header)
    if job is not None:  # a series of the node's own results takes no received instance
        _discard(temporary)
        if stored is not None and same_data_set(stored.path, encoded, transfer_syntax):
            return _own_result_held(event, header, job, attempt)
        return refuse(status.CANNOT_UNDERSTAND, own_results_reason(header, job), header.series.series_instance_uid)
    # the series first: a study is claimed for its patient (conflict) only by an instance that may join its series
    study_conflict = context.studies.series_conflict(header) or context.studies.conflict(header)
    if study_conflict is not None:
        _discard(temporary)
        return refuse(status.CANNOT_UNDERSTAND, study_conflict, header.series.series_instance_uid)

    def write_failed(error: Exception | None) -> Dataset:
        """Answer 0xA700 for this instance, and record it as refused for its series (see :func:`_write_failed`)."""
        return _write_failed(context, error, request, transfer_syntax, calling_ae, header.series.series_instance_uid)

    if write_error is not None:
        return write_failed(write_error)

    attempt.study_instance_uid = header.study.study_instance_uid
    attempt.series_instance_uid = header.series.series_instance_uid
    record = header.record(transfer_syntax, str(path), len(file_meta) + len(encoded), calling_ae)
    recorder = context.recorder
    try:
        segment = recorder.journal.append(str(path))
    except OSError as exc:
        _discard(temporary)
        return write_failed(exc)
    if temporary is None and not path.exists():
        # Found stored before the journal line, gone now: retention purged the series meanwhile (it reads the
        # journals after setting files aside, so it puts them back or this instance is written here).
        temporary, write_error = _write_temporary(context.store, file_meta, encoded)
        if write_error is not None:
            recorder.journal.done([segment])
            return write_failed(write_error)
    try:
        installed = _place(context.store, path, temporary)
    except Exception as exc:
        recorder.journal.done([segment])
        if isinstance(exc, OSError) or is_disk_full(exc):
            return write_failed(exc)
        LOG.exception("instance.write_failed", extra={"event_fields": {"sop_instance_uid": sop_instance}})
        return write_failed(None)
    if not installed:
        # Another copy is at the path: stored before, or placed by a sender whose copy arrived at the same moment
        # (then it was not compared above). It is the one kept, so it must be the same patient's.
        if stored is None or stored.path != path:
            stored = _header_at(path, header)
        conflict = _identity_conflict(stored, header)
        if conflict is not None:
            recorder.journal.done([segment])
            reason = _stored_with_another(sop_instance, conflict)
            return refuse(status.CANNOT_UNDERSTAND, reason, header.series.series_instance_uid)
        # The copy at the path is whole (placed by a rename or link): whichever copy took the path first is kept,
        # and every later one, sent before or at the same moment, is compared with it here.
        difference = copy_difference(path, encoded, transfer_syntax)
        if difference is not None:
            recorder.journal.done([segment])
            series_instance = header.series.series_instance_uid
            return refuse(
                status.DUPLICATE_SOP_INSTANCE,
                different_copy_reason(sop_instance, series_instance, difference),
                series_instance,
                comment=different_copy_comment(difference),
            )
        record = _as_stored(record, path, stored.header if stored else None)
    recorder.submit(record, segment)
    context.studies.remember(header)
    setattr(event.assoc, RESENDING, not installed)
    log_event(
        LOG,
        logging.DEBUG,
        "instance.stored",
        sop_instance_uid=sop_instance,
        series_instance_uid=header.series.series_instance_uid,
        transfer_syntax=transfer_syntax,
        bytes=record.size_bytes,
    )
    return status.SUCCESS


def _own_result_held(event: evt.Event, header: InstanceHeader, job: str, attempt: _StoreAttempt) -> int:
    """Answer success for a copy of one of the node's own results identical to the one it holds (a PACS routing the
    node's results back to it), as for any instance sent again: nothing is written, recorded or processed, and
    the peer, which would otherwise retry, is told once a while in the log."""
    attempt.study_instance_uid = header.study.study_instance_uid
    requestor = event.assoc.requestor
    log_throttled(
        LOG,
        logging.WARNING,
        "instance.own_result_returned",
        (requestor.address, requestor.ae_title),
        calling_ae=requestor.ae_title,
        address=requestor.address,
        sop_instance_uid=header.sop_instance_uid,
        reason=f"{requestor.ae_title} at {requestor.address} sent back a result this node made (job {job}, "
        f"series {header.series.series_instance_uid}), identical to the copy the node holds: it is answered "
        "success and not stored again; a routing rule on that peer probably forwards the node's results back to it",
    )
    return status.SUCCESS


RESENDING = "_dicom_node_resending"
"""Set on an association whose last stored instance was already at its path: the next header is checked before
any write. A resent 512x512 instance then costs the header check and a stat instead of a durable write."""

_HEADER_CHECKERS = ThreadPoolExecutor(max_workers=16, thread_name_prefix="header-check")
"""Check received instances' headers while their association threads write the files."""


def _checked_header(encoded: bytes, transfer_syntax: UID, sop_class: str, sop_instance: str) -> InstanceHeader:
    """The instance's header, read and checked; raises InvalidInstance with the reason to answer."""
    return check_header(read_header(encoded, transfer_syntax), sop_class, sop_instance)


def _write_temporary(store: InstanceStore, file_meta: bytes, encoded: bytes) -> tuple[Path | None, OSError | None]:
    """The instance written durably to a temporary file, or what kept it from being written (no file is left then)."""
    try:
        return store.write_temporary(file_meta, encoded), None
    except OSError as exc:  # a full disk, for one: answered once the header is known to be fine
        return None, exc


def _place(store: InstanceStore, path: Path, temporary: Path | None) -> bool:
    """Make the instance durable at ``path``: its synced temporary file put in place
    (:meth:`InstanceStore.install_new`), the folder fsynced.

    A file already at ``path`` (the same SOP Instance UID sent again under the same study
    and series, or a copy that arrived at the same moment) is whole and is kept: only its
    folder is synced (the copy that put it there may not have synced it yet). ``temporary``
    is None when the instance was not written because a file was already at ``path``.
    Returns whether the temporary file was installed.
    """
    installed = False
    try:
        if temporary is not None and not path.exists():
            installed = store.install_new(temporary, path)
    finally:
        if temporary is not None:
            temporary.unlink(missing_ok=True)  # a no-op once renamed into place
    store.sync_folder(path.parent)
    return installed


@dataclass(frozen=True)
class _StoredCopy:
    """The header of a copy of the instance already stored, and where."""

    path: Path
    header: InstanceHeader


def _stored_copy(context: StoreContext, path: Path, header: InstanceHeader) -> _StoredCopy | None:
    """The copy of the instance already stored: at ``path``, or recorded at another path (a correction sent again
    under new study or series UIDs), so a copy naming another patient is refused before it is acknowledged."""
    if path.exists():
        return _header_at(path, header)
    elsewhere = context.studies.recorded_path(header.sop_instance_uid)
    return _header_at(Path(elsewhere), header) if elsewhere is not None else None


def _identity_conflict(stored: _StoredCopy | None, header: InstanceHeader) -> str | None:
    """The identity attribute in which the instance differs from its stored copy, or None: every one for a copy at
    its own path; the patient's for a copy filed under another study or series (see :func:`identity_conflict`)."""
    if stored is None:
        return None
    own_path = stored.header.study.study_instance_uid == header.study.study_instance_uid and (
        stored.header.series.series_instance_uid == header.series.series_instance_uid
    )
    attributes = IDENTITY_ATTRIBUTES if own_path else PATIENT_IDENTITY_ATTRIBUTES
    return identity_conflict(stored.header.study, header.study, attributes)


def _header_at(path: Path, header: InstanceHeader) -> _StoredCopy | None:
    stored = stored_header(path, header.sop_class_uid, header.sop_instance_uid)
    return _StoredCopy(path, stored) if stored is not None else None


def _stored_with_another(sop_instance: str, attribute: str) -> str:
    """Why a copy of an instance stored with another identity is refused."""
    return (
        f"SOP Instance UID {sop_instance} is already stored with another {attribute}; the stored copy is "
        "kept and this one quarantined (a stored instance is never relabelled with another identity)"
    )


def _as_stored(record: InstanceRecord, path: Path, stored: InstanceHeader | None = None) -> InstanceRecord:
    """The record of a copy that found another copy of its instance at ``path`` (sent again, or two at once),
    describing the file that is there: its size and transfer syntax, so the database never describes bytes it
    does not hold (a retrieval would otherwise refuse the file as damaged), and, given the ``stored`` copy's
    header, its study, series and instance attributes (a PACS may have filled in what this copy lacks)."""
    if stored is not None:
        record = stored.record(record.transfer_syntax_uid, record.path, record.size_bytes, record.calling_ae_title)
    try:
        file_meta, _ = split_dataset(path)
        syntax = str(file_meta.TransferSyntaxUID)
        size = path.stat().st_size
    except (OSError, ValueError, AttributeError, struct.error):  # gone, or not readable: what this copy said stands
        return record
    return dataclasses.replace(record, transfer_syntax_uid=syntax, size_bytes=size)


def _discard(temporary: Path | None) -> None:
    """Remove the temporary file of an instance that will not be stored."""
    if temporary is not None:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)


def _write_failed(
    context: StoreContext,
    error: Exception | None,
    request: Any,
    transfer_syntax: UID,
    calling_ae: str,
    series_instance_uid: str,
) -> Dataset:
    """Answer 0xA700 for an instance that could not be written (``error`` None: an unexpected fault, logged).

    No file is left, and none is quarantined (the disk may be full): the sender keeps the instance. The
    refusal is recorded for its series, so the series is marked partial unless the image is sent again.
    """
    if error is None:
        comment = "node cannot write the instance; see its log"
    elif is_disk_full(error):
        comment = DISK_FULL_COMMENT
    else:
        comment = f"node cannot write the instance: {getattr(error, 'strerror', None) or 'I/O error'}"
    sop_instance = str(request.AffectedSOPInstanceUID or "")
    reason = f"{comment}; answered 0xA700, the sender keeps the instance"
    log_event(
        LOG,
        logging.ERROR,
        "instance.write_failed",
        sop_instance_uid=sop_instance,
        calling_ae=calling_ae,
        reason=reason,
    )
    refusal: dict[str, Any] = {
        "status": status.OUT_OF_RESOURCES,
        "reason": reason,
        "path": None,
        "sop_instance_uid": sop_instance,
        "sop_class_uid": str(request.AffectedSOPClassUID or ""),
        "transfer_syntax_uid": str(transfer_syntax),
        "calling_ae_title": calling_ae,
        "series_instance_uid": series_instance_uid,
    }
    try:
        with transaction(context.sessions) as session:
            record_rejection(session, **refusal)
    except Exception:  # noqa: BLE001 - a full disk may hold the database too; the answer must still go out
        context.recorder.refusals.keep(**refusal)  # its series waits until it is recorded
    return _failure(status.OUT_OF_RESOURCES, comment)


def _refuse(
    context: StoreContext,
    encoded: bytes,
    file_meta: bytes,
    status_code: int,
    reason: str,
    request: Any,
    transfer_syntax: UID,
    calling_ae: str,
    *,
    series_instance_uid: str | None = None,
    comment: str | None = None,
) -> Dataset:
    """Answer a failure status, keep the bytes in quarantine and record why (and which series lacks them).

    The peer hears ``comment``, or the status' fixed meaning (:data:`REFUSAL_COMMENTS`)."""
    sop_class = str(request.AffectedSOPClassUID or "")
    sop_instance = str(request.AffectedSOPInstanceUID or "")
    quarantined: str | None = None
    try:
        quarantined = str(context.store.quarantine(file_meta, encoded))
    except QuarantineFull as exc:
        log_event(LOG, logging.WARNING, "instance.quarantine_full", reason=str(exc), sop_instance_uid=sop_instance)
    except OSError as exc:
        log_event(
            LOG,
            logging.ERROR,
            "instance.quarantine_failed",
            sop_instance_uid=sop_instance,
            reason=f"the refused instance's bytes could not be kept in quarantine ({os_error_text(exc)})",
        )

    refusal: dict[str, Any] = {
        "status": status_code,
        "reason": reason,
        "path": quarantined,
        "sop_instance_uid": sop_instance,
        "sop_class_uid": sop_class,
        "transfer_syntax_uid": str(transfer_syntax),
        "calling_ae_title": calling_ae,
        "series_instance_uid": series_instance_uid,
    }

    def record() -> None:
        with transaction(context.sessions) as session:
            record_rejection(session, **refusal)

    try:
        if status_code == status.DUPLICATE_SOP_INSTANCE:  # its row is what keeps the series from being processed
            retry_when_locked(
                record,
                waiting=f"recording the refusal of instance {sop_instance}",
                limit_seconds=DIFFERENT_CONTENT_RECORD_SECONDS,
            )
        else:
            record()
    except Exception:  # the refusal itself must still go out
        if status_code == status.DUPLICATE_SOP_INSTANCE:
            LOG.exception("instance.rejection_not_recorded")
            return _refusal_not_recorded(quarantined, sop_instance, calling_ae)
        context.recorder.refusals.keep(**refusal)  # its series waits until it is recorded
    if status_code == status.DUPLICATE_SOP_INSTANCE and series_instance_uid is not None:
        _hold_series(context, series_instance_uid)
    log_event(
        LOG,
        logging.WARNING,
        "instance.refused",
        status=f"0x{status_code:04X}",
        reason=reason,
        sop_instance_uid=sop_instance or "(none)",
        calling_ae=calling_ae,
        quarantine=quarantined,
    )
    return _failure(
        status_code, comment or REFUSAL_COMMENTS.get(status_code, "Refused: the reason is in the node's log")
    )


DIFFERENT_CONTENT_RECORD_SECONDS = 10.0
"""How long the refusal of a copy with other pixel data (or attribute values) waits for a locked database before
the copy is answered 0xA700 instead (send again later): unrecorded, it would not keep its series from being
processed."""


def _refusal_not_recorded(quarantined: str | None, sop_instance: str, calling_ae: str) -> Dataset:
    """A copy with other pixel data (or attribute values) whose refusal could not be recorded: its quarantined bytes
    go (nothing names them), and the sender hears 0xA700, so that it sends the copy again, to be refused and recorded
    then."""
    if quarantined is not None:
        with contextlib.suppress(OSError):
            Path(quarantined).unlink()
    log_event(
        LOG,
        logging.WARNING,
        "instance.refused",
        status=f"0x{status.OUT_OF_RESOURCES:04X}",
        reason=f"instance {sop_instance} was already received with other content, and the database could not "
        "record that now (locked or unavailable), so the sender is asked to send it again later",
        sop_instance_uid=sop_instance,
        calling_ae=calling_ae,
    )
    return _failure(status.OUT_OF_RESOURCES, "Out of resources: the node cannot record this now; send it later")


def _hold_series(context: StoreContext, series_instance_uid: str) -> None:
    """Fail the series of a refused copy with other pixel data (or attribute values) now; if that cannot be written,
    the watcher holds the series before routing it (the refusal's row is recorded)."""
    try:
        with transaction(context.sessions) as session:
            hold_series_with_different_copies(session, series_instance_uid)
    except Exception:  # noqa: BLE001 - the watcher holds it before it is processed
        log_event(
            LOG,
            logging.WARNING,
            "series.hold_deferred",
            series_instance_uid=series_instance_uid,
            reason="the series of a copy refused as different could not be marked failed now; it is "
            "marked before it is routed",
        )


REFUSAL_COMMENTS = {
    status.CANNOT_UNDERSTAND: "Cannot understand: the reason is in the node's log",
    status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS: "Data set does not match SOP class: reason in node's log",
    status.DUPLICATE_SOP_INSTANCE: DIFFERENT_CONTENT_COMMENT,
}
"""What a peer hears of a refusal: the status' meaning, fixed; the reason (which may quote the data) stays in
the log, in ``rejected_instances`` and in ``dicom-node rejected``."""


def _failure(status_code: int, comment: str) -> Dataset:
    response = Dataset()
    response.Status = status_code
    response.ErrorComment = comment[:ERROR_COMMENT_LENGTH]
    return response


STOP_WAIT_SECONDS = 10.0
"""How long stopping waits for the associations still open to be aborted, audited and their threads to end."""


def end_open_associations(
    server: AssociationServer, sessions: sessionmaker[Session], wait_seconds: float = STOP_WAIT_SECONDS
) -> None:
    """The node is stopping: abort each association still open, so each is audited as any association the node
    aborts (its stores per study, then the association, :func:`_audit_association_end`) before the process ends.

    Each is aborted in a thread of its own (a peer slow to close its end holds up only its own), and what its
    thread stored after the abort (a C-STORE it was still answering) is written once that thread ends. At most
    ``wait_seconds`` for all: one still running then ends with the process."""
    still_open = [assoc for assoc in server.active_associations if assoc.is_established]
    enders = [
        threading.Thread(target=_end_at_stop, args=(assoc, sessions), name="association-stop", daemon=True)
        for assoc in still_open
    ]
    for ender in enders:
        ender.start()
    deadline = time.monotonic() + wait_seconds
    for ender in enders:
        ender.join(max(deadline - time.monotonic(), 0.0))


def _end_at_stop(assoc: Any, sessions: sessionmaker[Session]) -> None:
    """Abort one association open at stop (an A-ABORT to its peer; EVT_ABORTED audits it), then, once its thread
    has answered the request it was serving, write what that request added to its store tally."""
    requestor = assoc.requestor
    log_event(
        LOG,
        logging.WARNING,
        "association.open_at_stop",
        calling_ae=requestor.ae_title,
        address=requestor.address,
        reason="the node is stopping while this association is open: it is aborted, and the instances stored on "
        "it are kept and written to the audit trail",
    )
    setattr(assoc, ABORT_REASON, "the node was stopping while the association was open, so it aborted it")
    assoc.abort()
    assoc.join()
    tally = getattr(assoc, StoreTally.ATTRIBUTE, None)
    if tally is not None:
        tally.flush(sessions, Peer.of(assoc))


def _audit_association_end(
    event: evt.Event, sessions: sessionmaker[Session], outcome: Literal["released", "aborted"]
) -> None:
    """The association's store tally, then its record: an aborted one's says why (:func:`abort_reason`)."""
    detail = abort_reason(event.assoc) if outcome == "aborted" else None
    association_ended(sessions, event.assoc, outcome, detail=detail, own_check=own_health_check(event.assoc))


def _audit_rejection(event: evt.Event, sessions: sessionmaker[Session], why: str | None = None) -> None:
    """One audit record per rejected association, saying why, but at most one per address each 10 s: a caller in
    a loop gets one record that counts the others, not a row each."""
    peer = Peer.of(event.assoc)
    detail = why or _rejection_reason(event)
    kind = re.sub(r"\d+", "_", detail)[:80]  # counts and titles vary; another reason is recorded on its own
    dropped = REPEATED_REFUSALS.admit(("audit.association_rejected", event.assoc.requestor.address, kind))
    if dropped is None:
        return
    if dropped:
        detail += (
            f"; {dropped} more association(s) from this address were rejected since the previous record and not "
            "recorded one by one"
        )
    record(sessions, "association", peer, "rejected", detail=detail)


def _on_connection_open(event: evt.Event) -> None:
    # Small PDUs (the C-STORE response) must leave at once, not wait on Nagle's algorithm.
    # (The association's threads need no polling delay: they sleep until there is work, dicom_node.reactors.)
    send_small_pdus_at_once(event)


def own_health_check(assoc: Any) -> bool:
    """Whether ``assoc`` is the node's own readiness C-ECHO (its AE title calling itself from this machine: from
    loopback, or from the very address it called, as when ``network.host`` is one address), logged at DEBUG and
    audited once an hour (:data:`dicom_node.audit.OWN_CHECKS`): a probe every few seconds would fill the log with
    two lines and the audit trail with two rows each."""
    return assoc.requestor.ae_title == assoc.acceptor.ae_title and from_this_machine(assoc)


def _on_accepted(event: evt.Event) -> None:
    setattr(event.assoc, ACCEPTED_AT, utcnow())
    setattr(event.assoc, MADE_REQUEST, False)  # until its first request arrives (audit.note_request)
    requestor = event.assoc.requestor
    log_event(
        LOG,
        logging.DEBUG if own_health_check(event.assoc) else logging.INFO,
        "association.accepted",
        calling_ae=requestor.ae_title,
        address=requestor.address,
        receiver=os.getpid(),
    )
    rejected = rejected_contexts(event.assoc)
    if rejected:  # the peer finds out only when its send fails: the log says which kinds of objects, and why
        log_throttled(
            LOG,
            logging.WARNING,
            "association.contexts_rejected",
            (requestor.address, requestor.ae_title),
            calling_ae=requestor.ae_title,
            address=requestor.address,
            reason=f"the node did not accept these kinds of objects from {requestor.ae_title} at "
            f"{requestor.address}: {rejected}",
        )


CONTEXT_REJECTIONS_NAMED = 10
"""The most rejected presentation contexts one log line names (a peer may propose over a hundred)."""


def rejected_contexts(assoc: Any) -> str:
    """The presentation contexts the node rejected on ``assoc``: why, and for which SOP classes; "" if none.

    Those a C-GET requestor proposed only to receive (SCP role) are left out: it offers every kind it can store,
    and the node sends none that it does not hold."""
    receiving = {str(uid) for uid, item in assoc.requestor.role_selection.items() if getattr(item, "scp_role", False)}
    by_reason: dict[str, list[str]] = {}
    for context in assoc.rejected_contexts:
        if str(context.abstract_syntax) in receiving:  # offered to receive C-GET answers: nothing it sends
            continue
        if context.result == 0x04:
            proposed = ", ".join(dict.fromkeys(uid_name(uid) for uid in context.transfer_syntax)) or "none"
            why = f"none of the transfer syntaxes proposed is one the node reads ({proposed})"
        elif context.result == 0x03:
            why = "the node does not take these kinds of objects from this peer (abstract syntax not supported)"
        else:
            why = "refused by the node"
        sop_classes = by_reason.setdefault(why, [])
        if uid_name(context.abstract_syntax) not in sop_classes:
            sop_classes.append(uid_name(context.abstract_syntax))
    return "; ".join(f"{why}: {_named(sop_classes)}" for why, sop_classes in by_reason.items())


def _named(sop_classes: list[str]) -> str:
    """The first :data:`CONTEXT_REJECTIONS_NAMED` SOP classes, and how many more."""
    named = ", ".join(sop_classes[:CONTEXT_REJECTIONS_NAMED])
    more = len(sop_classes) - CONTEXT_REJECTIONS_NAMED
    return f"{named} and {more} more" if more > 0 else named


REJECTION_REASONS: dict[tuple[int | None, int | None], str] = {
    (0x01, 0x03): "calling AE title not recognised",
    (0x01, 0x07): "called AE title is not ours",
    (0x03, 0x02): "association limit reached (network.maximum_associations)",
    (0x02, 0x02): "protocol version not supported",
}


def _rejection_key(event: evt.Event) -> tuple[int | None, int | None]:
    answer = event.assoc.acceptor.primitive
    return getattr(answer, "result_source", None), getattr(answer, "diagnostic", None)


def _rejection_reason(event: evt.Event) -> str:
    """Why pynetdicom rejected the association, from the rejection it sent (the title asked for, where it was the
    called AE title)."""
    key = _rejection_key(event)
    if key == (0x01, 0x07):
        request = event.assoc.requestor.primitive
        asked = str(request.called_ae_title).strip() if request is not None else ""
        return (
            f"called AE title {shown(asked, 16)} is not this node's ({event.assoc.acceptor.ae_title}); the peer's "
            "configuration names another AE title for it"
        )
    return REJECTION_REASONS.get(key, "no acceptable presentation context or other ACSE reason")


def _on_rejected(event: evt.Event) -> None:
    requestor = event.assoc.requestor
    log_throttled(
        LOG,
        logging.WARNING,
        "association.rejected",
        (requestor.address, _rejection_key(event)),  # another reason from the address is logged on its own
        calling_ae=Peer.of(event.assoc).ae_title,
        address=requestor.address,
        reason=_rejection_reason(event),
    )


ABORT_REASON = "_dicom_node_abort_reason"
"""Set on an association, before the node aborts it, to the sentence saying why (the node is stopping)."""
ABORT_RECEIVED = "_dicom_node_abort_received"
"""Set on an association when an A-ABORT or A-P-ABORT reaches it: the primitive, read by :func:`abort_reason`."""


def _note_abort_received(event: evt.Event) -> None:
    """Keep an abort that reached the association (pynetdicom takes it off its queue before EVT_ABORTED fires)."""
    primitive = getattr(event, "primitive", None)  # set for this event from its data (pynetdicom's stubs lack it)
    if isinstance(primitive, (A_ABORT, A_P_ABORT)):
        setattr(event.assoc, ABORT_RECEIVED, primitive)


ENDED_IDLE = "_dicom_node_ended_idle"
"""Set on an association as its abort is first handled: whether :func:`ended_idle` held then (the idle timer is
started again once the peer closes its end, so a later look would not see it expired)."""


def ended_idle(assoc: Any) -> bool:
    """Whether the node aborted the association because nothing arrived for ``network.network_timeout_seconds``."""
    seen = getattr(assoc, ENDED_IDLE, None)
    if seen is not None:
        return bool(seen)
    if getattr(assoc, ABORT_RECEIVED, None) is not None or getattr(assoc, ABORT_REASON, None) is not None:
        return False
    return bool(getattr(assoc, "_sent_abort", False) and assoc.dul.idle_timer_expired())


def abort_reason(assoc: Any) -> str:
    """Why an association ended in an abort, as far as the node can tell: the sender's A-ABORT, a connection
    closed or broken under it, the node's network timeout, or the node's own abort (stopping)."""
    requestor = assoc.requestor
    sender = f"{requestor.ae_title} at {requestor.address}"
    received = getattr(assoc, ABORT_RECEIVED, None)
    if isinstance(received, A_ABORT):
        return f"{sender} aborted the association (it sent an A-ABORT) instead of releasing it"
    if isinstance(received, A_P_ABORT):
        return (
            f"the connection to {sender} was closed or broken before the association was released (the sender's "
            "end closed it, the network dropped it, or its DICOM software reported a protocol fault)"
        )
    told = getattr(assoc, ABORT_REASON, None)
    if told is not None:
        return str(told)
    if ended_idle(assoc):
        return (
            f"nothing arrived from {sender} for {assoc.network_timeout:g} s (network.network_timeout_seconds), so "
            "the node aborted the association"
        )
    if getattr(assoc, "_sent_abort", False):
        return f"the node aborted the association with {sender}"
    return f"the association with {sender} ended without a release; the node could not tell why"


def _on_aborted(event: evt.Event) -> None:
    setattr(event.assoc, ABORTED_AT, utcnow())
    setattr(event.assoc, ENDED_IDLE, ended_idle(event.assoc))  # before anything waits: the timer starts again
    requestor = event.assoc.requestor
    fields = {"calling_ae": requestor.ae_title, "address": requestor.address, "reason": abort_reason(event.assoc)}
    if getattr(event.assoc, MADE_REQUEST, True):
        log_event(LOG, logging.WARNING, "association.aborted", **fields)
    else:  # nothing requested: a caller opening and aborting in a loop gets one line each 10 s, counting the others
        log_throttled(LOG, logging.WARNING, "association.aborted", (requestor.address, "no request"), **fields)


def _on_echo(event: evt.Event, sessions: sessionmaker[Session]) -> int:
    own = own_health_check(event.assoc)
    log_event(LOG, logging.DEBUG if own else logging.INFO, "echo", calling_ae=event.assoc.requestor.ae_title)
    if own:  # a probe each 5 s: one record an hour, counting the others
        own_check_echo(sessions, Peer.of(event.assoc))
    else:
        record(sessions, "echo", Peer.of(event.assoc), "success")
    return status.SUCCESS
