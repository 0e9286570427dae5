"""The dispatcher: sends a SENDING job's results to each destination, with retries and backoff.

The per-file truth is the ``deliveries`` table: each file a destination accepts is
recorded right after its C-STORE response, in a transaction of its own, so after a
crash or a restart only files without a record are sent again (at most the one
file that was in flight, with the same SOP Instance UID). ``jobs.deliveries``
keeps, per destination, a :class:`~db.results.DeliveryRecord`: the files it takes, the
attempts, the last error and when to try next. Which of a job's result files a
destination takes is :func:`db.results.files_for` (the job's typed result description).

Destinations are sent to in parallel (``dispatch.parallel_sends`` at once, one
association per destination at a time), so a stalled destination holds up only
itself. Every destination has every file: DONE. Each destination has every file or
has used ``dispatch.max_attempts``: FAILED, the reason saying which destination
lacks what; ``dicom-node retry`` sends only the missing files. A destination that is
down, rejects the association as transient, or answers 0xA7xx (Out of Resources) is
tried again without using up ``dispatch.max_attempts``, for ``dispatch.unreachable_hours``.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, STORAGE_SERVICE_CLASS_STATUS, code_to_category
from sqlalchemy import Connection, select
from sqlalchemy.orm import Session, sessionmaker

from db import jobs
from db.models import Job, JobState, Series, Study, as_utc
from db.results import DeliveryRecord, files_for, kinds_missing
from db.session import (
    DatabaseBusy,
    is_database_locked,
    read_outside_transaction,
    read_row_outside_transaction,
    retry_when_locked,
    transaction,
)
from dicom_node import audit
from dicom_node.config import Destination, DispatchSettings, Settings
from dicom_node.logs import log_event, size_in_words
from dicom_node.periodic import PeriodicTask
from dicom_node.retrieve.reports import SEGMENTATION_CLASSES, SR_CLASSES, evidence_uids
from dicom_node.scu import AssociationWatch, not_established, unresolvable
from dicom_node.security import client_tls
from dicom_node.stall import CUT_GRACE_SECONDS, shut_down, stalled, watchdog
from dicom_node.transfer_syntax import (
    NotConverted,
    converted,
    offered_pairs,
    syntax_to_send,
    syntaxes_offered,
    uid_name,
)

LOG = logging.getLogger(__name__)

CLOCK_STEP_SECONDS = 5.0
"""A next attempt this much further off than ``dispatch.max_retry_seconds`` was planned before the clock was set
back: it is made at once."""

UNREACHABLE_GAP_MARGIN_SECONDS = 60.0
"""Between two tries that found a destination unreachable, at most twice ``dispatch.max_retry_seconds`` and this
count towards ``dispatch.unreachable_hours``: a longer gap is the node's own downtime or a clock stepped forward."""
RECORD_WAIT_LIMIT_SECONDS = 3600.0  # how long recording an accepted file waits for a locked database

RECORD_WAIT_NOTICED_SECONDS = 1.0
"""Recording an accepted file takes milliseconds; one that took this long waited for the node's own database
(locked by another process, or its disk full). An association that ended meanwhile is the node's doing, not the
destination's: that attempt is not counted."""

LOCK_LOST = (
    "sending stopped: this node no longer holds its lock on the database (another dicom-node serve took over), "
    "so that node sends the rest"
)

NODE_STOPPING = "sending stopped: this node is stopping; the files not yet sent are sent when it runs again"

SEND_END_WAIT_SECONDS = 10.0
"""At a stop, how long a send cut off at its destination is waited for to end (recording what it sent) before the
node gives its lock on the database back all the same."""


@dataclass(frozen=True)
class SendableFile:
    """The header facts of one result file that sending needs."""

    path: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    size_bytes: int

    @property
    def name(self) -> str:
        return Path(self.path).name


def read_result_file(path: str) -> SendableFile:
    """The UIDs and size of a DICOM file, read from its header only.

    Raises
    ------
    OSError, InvalidDicomError
        If the file is missing or not DICOM.
    """
    dataset = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
    return SendableFile(
        path=str(path),
        sop_instance_uid=str(dataset.SOPInstanceUID),
        sop_class_uid=str(dataset.SOPClassUID),
        transfer_syntax_uid=str(dataset.file_meta.TransferSyntaxUID),
        size_bytes=Path(path).stat().st_size,
    )


@dataclass(frozen=True)
class SendOutcome:
    sent: list[str]  # files the peer accepted in this attempt
    error: str | None  # why the attempt stopped short, or None when all went
    unreachable: bool = False  # down, not answering, or "not now" (a transient rejection, 0xA7xx): not counted
    node_waited: bool = False  # the association ended while the node waited for its own database: not counted


RunKey = tuple[str, ...]


def run_key(job: Job) -> RunKey:
    """What tells one run of a job's results from the next: the paths of its result files (each run has its own)."""
    return _paths_of(job.result_files)


def _paths_of(result_files: Sequence[Any] | None) -> RunKey:
    return tuple(f.path for f in result_files or [])


def describe_status(status: int) -> str:
    """``0xA700 (Refused: Out of Resources)``: a C-STORE status with its meaning."""
    category, meaning = STORAGE_SERVICE_CLASS_STATUS.get(status, (code_to_category(status), ""))
    if not meaning:
        meaning = {"Success": "success", "Warning": "warning", "Failure": "failure"}.get(category, "unknown status")
    return f"0x{status:04X} ({meaning})"


def out_of_resources(status: int) -> bool:
    """Whether a C-STORE status is 0xA7xx, Refused: Out of Resources: the peer cannot take the object now (its disk
    full, or too busy), which says nothing against the object; it is tried again later, as a peer that is down."""
    return status & 0xFF00 == 0xA700


def stored(status: int) -> bool:
    """Whether a C-STORE status says the peer stored the object: success, or any warning status.

    Warnings (0x0001, 0x0107, 0x0116 and 0xB000-0xBFFF) mean stored, with a remark; a failure, a cancel or a
    status the standard does not define means not stored, and the file is sent again at the next attempt.
    """
    return code_to_category(status) in (STATUS_SUCCESS, STATUS_WARNING)


def send_files(
    calling_ae: str,
    destination: Destination,
    files: list[str] | list[SendableFile],
    timeout: float,
    *,
    seconds_per_megabyte: float = 0.0,
    on_accepted: Callable[[SendableFile, int], None] | None = None,
    stop_reason: Callable[[], str | None] | None = None,
    on_sending: Callable[[SendableFile, Association], None] | None = None,
) -> SendOutcome:
    """C-STORE ``files`` over one association, negotiating only the SOP classes sent: each in its stored syntax,
    Explicit and Implicit VR Little Endian; a file goes as stored where the destination accepts that, else
    converted without loss to the syntax it accepted (:mod:`dicom_node.transfer_syntax`).

    SEGs go first, then SRs, then the rest. A file the destination refuses is named in the error and the next one
    is sent, except an SR that references a file refused in this attempt: it is held back, so that the PACS never
    holds a report on a segmentation it lacks. An answer 0xA7xx (Out of Resources: "not now") ends the attempt
    there, and the outcome says ``unreachable``: tried again like a destination that is down, without using up
    ``dispatch.max_attempts`` (unless a file was refused for good in the same attempt).

    Parameters
    ----------
    timeout
        Association timeout; each C-STORE waits ``timeout`` + its size in MB x
        ``seconds_per_megabyte`` for its response.
    on_accepted
        Called with each file the peer accepts and its status, right after the
        response and before the next file is sent (the delivery record). If it takes
        :data:`RECORD_WAIT_NOTICED_SECONDS` or longer (the database was locked) and the
        association ended meanwhile, the outcome says ``node_waited``.
    stop_reason
        Asked before each file: a reason to stop sending (the results were
        superseded meanwhile), or None to go on.
    on_sending
        Called with each file and the association right before the file is sent (so
        that a stop can cut off a file the destination does not answer).
    """
    results = sorted((f if isinstance(f, SendableFile) else read_result_file(f) for f in files), key=_send_order)
    peer = f"{destination.ae_title}@{destination.host}:{destination.port}"
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    for sop_class, syntax in sorted(offered_pairs((f.sop_class_uid, f.transfer_syntax_uid) for f in results)):
        ae.add_requested_context(sop_class, syntax)
    watch = AssociationWatch()
    try:
        assoc = watch.associate(
            ae, destination.host, destination.port, destination.ae_title, tls_args=client_tls(destination)
        )
    except socket.gaierror:  # tried again like a destination that is down: the name server may be the one down
        return SendOutcome([], f"{peer} is unreachable: {unresolvable(destination.host)}", unreachable=True)
    if not assoc.is_established:
        answer = not_established(assoc, calling_ae, destination.ae_title, watch)
        if answer.unreachable and not assoc.is_rejected and not watch.connected:
            return SendOutcome(
                [], f"{peer} is unreachable (no association: destination down, or not answering)", unreachable=True
            )
        retried = "; tried again later" if answer.unreachable else ""
        return SendOutcome([], f"{peer} {answer.reason}{retried}", unreachable=answer.unreachable)
    sent: list[str] = []
    refusals: list[str] = []  # each file of this attempt not accepted, and why; joined into the attempt's error
    refused: dict[str, str] = {}  # SOP Instance UID -> file name, of the files not accepted in this attempt
    accepted = {(str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts}
    recorded: tuple[SendableFile, float] | None = None  # the file recorded last and how long that took, until a send
    try:
        for result in results:
            why = stop_reason() if stop_reason is not None else None
            if why is not None:
                return SendOutcome(sent, why)
            held = _held_back(result, refused, destination)
            if held is not None:
                refusals.append(held)
                continue
            sent_in = syntax_to_send(result.sop_class_uid, result.transfer_syntax_uid, accepted)
            if sent_in is None:
                refused[result.sop_instance_uid] = result.name
                offered = ", ".join(uid_name(syntax) for syntax in syntaxes_offered(result.transfer_syntax_uid))
                refusals.append(
                    f"{destination.ae_title} does not accept {uid_name(result.sop_class_uid)} ({result.name}) in any "
                    f"of the transfer syntaxes offered: {offered}"
                )
                continue
            try:
                sendable = result.path if sent_in == result.transfer_syntax_uid else _converted(result, sent_in)
            except ConversionFailed as exc:
                refused[result.sop_instance_uid] = result.name
                refusals.append(str(exc))
                continue
            if not assoc.is_established:  # closed by the peer, or cut by the watchdog, after the last response
                if recorded is not None and recorded[1] >= RECORD_WAIT_NOTICED_SECONDS:
                    ended = _ended_while_recording(destination, *recorded)
                    return SendOutcome(sent, _joined(refusals, ended), node_waited=True)
                closed = f"{destination.ae_title} closed the association before {result.name} was sent"
                return SendOutcome(sent, _joined(refusals, closed))
            recorded = None
            wait = timeout + result.size_bytes / 1_000_000 * seconds_per_megabyte
            assoc.dimse_timeout = assoc.network_timeout = wait
            if on_sending is not None:
                on_sending(result, assoc)
            started = time.monotonic()
            with watchdog(assoc, wait + CUT_GRACE_SECONDS, name="dispatch-watchdog") as cut:
                response = assoc.send_c_store(sendable)
            status = int(response.Status) if response and "Status" in response else None
            if status is None and cut.is_set():
                return SendOutcome(sent, _joined(refusals, _stalled(destination, result, time.monotonic() - started)))
            if status is None:
                waited = time.monotonic() - started
                return SendOutcome(sent, _joined(refusals, _no_response(destination, result, wait, waited)))
            if out_of_resources(status):  # "not now": the rest waits for the next try, which this one does not use up
                not_now = _out_of_resources(destination, result, status, counted=bool(refusals))
                return SendOutcome(sent, _joined(refusals, not_now), unreachable=not refusals)
            if not stored(status):
                refused[result.sop_instance_uid] = result.name
                refusals.append(f"{destination.ae_title} refused {result.name} with status {describe_status(status)}")
                continue
            if on_accepted is not None:
                recording_started = time.monotonic()
                on_accepted(result, status)
                recorded = (result, time.monotonic() - recording_started)
            sent.append(result.path)
    finally:
        if assoc.is_established:
            with watchdog(assoc, timeout + CUT_GRACE_SECONDS, name="dispatch-watchdog"):
                assoc.release()
    return SendOutcome(sent, "; ".join(refusals) or None)


def _send_order(result: SendableFile) -> int:
    """SEGs first, then SRs (which reference them), then the rest, each in the order given."""
    if result.sop_class_uid.startswith(SEGMENTATION_CLASSES):
        return 0
    return 1 if result.sop_class_uid.startswith(SR_CLASSES) else 2


def _joined(refusals: list[str], ending: str) -> str:
    """The error of an attempt that ended early: the files refused before it ended, then how it ended."""
    return "; ".join([*refusals, ending])


def _out_of_resources(destination: Destination, result: SendableFile, status: int, *, counted: bool) -> str:
    """Why an attempt stopped at a 0xA7xx answer, and when the rest is tried again."""
    said = f"{destination.ae_title} answered Out of Resources (0x{status:04X}) for {result.name}"
    if counted:  # a file refused for good in the same attempt: the attempt counts all the same
        return f"{said}: it cannot take it now; it and the files not yet sent are sent again at the next attempt"
    return (
        f"{said}: it cannot take it now (its disk full, or too busy); it is tried again later, with the files not "
        "yet sent, without using up dispatch.max_attempts (for up to dispatch.unreachable_hours)"
    )


def _held_back(result: SendableFile, refused: dict[str, str], destination: Destination) -> str | None:
    """Why ``result`` is not sent in this attempt: it references a file ``destination`` did not accept in this
    attempt (an SR naming a refused SEG as evidence), so the PACS would hold a report on a result it lacks."""
    if not refused or not result.sop_class_uid.startswith(SR_CLASSES):
        return None
    lacking = [refused[uid] for uid in evidence_uids(result.path) if uid in refused]
    if not lacking:
        return None
    return (
        f"{result.name} held back: it references {', '.join(lacking)}, which {destination.ae_title} did not accept; "
        "it is sent once it has"
    )


class ConversionFailed(ValueError):
    """A result file that could not be converted to the syntax its destination accepted; the message says why."""


def _converted(result: SendableFile, syntax: str) -> Dataset:
    """The result file read and converted to ``syntax`` (one its destination accepted instead of the stored one).

    Raises
    ------
    ConversionFailed
        Saying which file could not be converted, and why.
    """
    try:
        dataset = converted(dcmread(result.path), syntax, result.name)
    except NotConverted as exc:
        raise ConversionFailed(str(exc)) from None
    except (OSError, ValueError, RuntimeError, NotImplementedError):
        raise ConversionFailed(
            f"{result.name} could not be read or converted to {UID(syntax).name}, the only form its destination "
            "accepts (damaged on disk?)"
        ) from None
    log_event(LOG, logging.INFO, "dispatch.converted", file=result.name, sent=f"converted to {UID(syntax).name}")
    return dataset


def _ended_while_recording(destination: Destination, recorded: SendableFile, waited: float) -> str:
    return (
        f"the association to {destination.ae_title} ended while this node waited {waited:.0f} s for its own database "
        f"to record {recorded.name} as delivered (the database was locked by another process, or its disk was full); "
        "the files not yet sent are sent at the next attempt"
    )


def _stalled(destination: Destination, result: SendableFile, waited: float) -> str:
    return stalled(
        f"{destination.ae_title} at {destination.host}:{destination.port}", result.name, result.size_bytes, waited
    )


def _no_response(destination: Destination, result: SendableFile, wait: float, waited: float) -> str:
    size = size_in_words(result.size_bytes)
    if waited < wait - 1:
        return (
            f"{destination.ae_title} closed the association after {waited:.0f} s while {result.name} ({size}) was sent"
        )
    return f"no response within {wait:.0f} s from {destination.ae_title} to {result.name} ({size})"


@contextmanager
def _reading(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """A session for reads only, outside any transaction (as :func:`db.session.read_outside_transaction`): on
    SQLite it takes no write lock, so another process writing meanwhile never makes it wait or fail."""
    bind = sessions.kw["bind"]
    if isinstance(bind, Connection):
        with sessions() as session:
            yield session
        return
    with bind.connect() as connection, sessions(bind=connection.execution_options(isolation_level="AUTOCOMMIT")) as s:
        yield s


class Dispatcher(PeriodicTask):
    """Sends SENDING jobs' results; runs as a thread of ``serve``, each send in a thread of its own.

    ``holds_lock`` is the fence (:meth:`db.session.NodeLock.confirm`): asked before each attempt and each file,
    it says whether this node still holds the database's node lock. Once it answers no, another node dispatches:
    nothing more is sent or counted here (at most the one file then in flight reaches the PACS from both nodes,
    with the same SOP Instance UID, as after a crash).

    :meth:`stop` (the node stopping) ends sending the same way before the node gives its lock back: no new
    attempt, no further file, and the attempt cut short is not counted. It returns only once every send has
    ended: a file at a destination gets ``dispatch.timeout_seconds`` for its answer, then its association is cut
    off and the file is left to be sent again at the next start (logged and audited as such). A lock given back
    at a stop is not a lock lost.
    """

    name = "dispatch"

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        holds_lock: Callable[[], bool] | None = None,
    ) -> None:
        super().__init__(settings, sessions)
        self._holds_lock = holds_lock or (lambda: True)
        self._fenced = threading.Event()  # the node lock was found lost: nothing more is sent
        self._stopping = threading.Event()  # the node is stopping: nothing more is sent
        self._fence = threading.RLock()  # a stop waits for a look at the node lock in progress
        self._busy: set[str] = set()  # destinations with a send in flight
        self._held_until: dict[str, float] = {}  # destination -> monotonic time: held back after a send crashed
        self._sends: dict[str, threading.Thread] = {}  # destination -> the thread sending to it now
        self._in_flight: dict[str, tuple[SendableFile, Association]] = {}  # destination -> the file it is sent now
        self._cut_at_stop: dict[str, SendableFile] = {}  # destination -> its file cut off by the stop
        self._busy_lock = threading.Lock()

    @property
    def interval_seconds(self) -> float:
        return self.settings.dispatch.check_interval_seconds

    @property
    def _dispatch(self) -> DispatchSettings:
        return self.settings.dispatch

    def stop(self) -> None:
        """Start no further attempt and send no further file, stop the passes, then wait for the sends to end.

        Called before the node gives its lock on the database back: no send runs, nor asks for the lock, after.
        A file still unanswered ``dispatch.timeout_seconds`` after the stop is cut off (see the class).
        """
        with self._fence:
            self._stopping.set()
        super().stop()
        with self._busy_lock:
            from_a_send = threading.current_thread() in self._sends.values()
        if not from_a_send:  # a send that found the lock lost stops the dispatcher too: it cannot wait for itself
            self._end_sends()

    def _end_sends(self) -> None:
        """Wait for each send; cut off the file still unanswered after ``dispatch.timeout_seconds``."""
        limit = self._dispatch.timeout_seconds
        deadline = time.monotonic() + limit
        with self._busy_lock:
            sends = dict(self._sends)
        for thread in sends.values():
            thread.join(max(deadline - time.monotonic(), 0.0))
        running = {name: thread for name, thread in sends.items() if thread.is_alive()}
        if not running:
            return
        with self._busy_lock:
            in_flight = {name: self._in_flight[name] for name in running if name in self._in_flight}
            self._cut_at_stop.update({name: result for name, (result, _) in in_flight.items()})
        for _, assoc in in_flight.values():
            shut_down(assoc)  # the send waiting for the answer returns at once, without it
        deadline = time.monotonic() + SEND_END_WAIT_SECONDS
        for name, thread in running.items():
            thread.join(max(deadline - time.monotonic(), 0.0))
            if thread.is_alive():
                log_event(
                    LOG,
                    logging.ERROR,
                    "dispatch.send_not_ended",
                    destination=name,
                    reason=f"the send to {name} had not ended {limit + SEND_END_WAIT_SECONDS:g} s after the node was "
                    "asked to stop (it may be waiting for the database to record a delivery); the node stops all "
                    "the same, and a file whose delivery was not recorded is sent again when the node runs again",
                )

    def run_once(self, now: datetime | None = None) -> None:
        """One pass over SENDING jobs: each idle destination gets the oldest job that is due for it."""
        now = now or datetime.now(timezone.utc)
        if self._fenced.is_set() or self._stopping.is_set():
            return
        with _reading(self.sessions) as session:
            snapshot = [
                (job.id, list(job.destinations or []), dict(job.deliveries or {}))
                for job in jobs.jobs_in_state(session, [JobState.SENDING])
            ]
        for job_id, destinations, deliveries in snapshot:
            open_destinations = [name for name in destinations if not self._settled(deliveries.get(name))]
            if not open_destinations:
                self._settle(job_id)  # every destination finished: DONE or FAILED (e.g. after a crash)
                continue
            for name in open_destinations:
                if (deliveries.get(name) or DeliveryRecord()).due(now, self._longest_wait) and self._reserve(name):
                    thread = threading.Thread(
                        target=self._send_guarded, args=(job_id, name), name=f"dispatch-{name}", daemon=True
                    )
                    with self._busy_lock:
                        self._sends[name] = thread  # before it starts: a stop waits for it
                    thread.start()

    def _still_ours(self) -> bool:
        """The fence: whether this node still holds the database's node lock and is not stopping."""
        return self._why_not_ours() is None

    def _why_not_ours(self) -> str | None:
        """None while this node holds the database's node lock and is not stopping; else why nothing more is sent.

        A lock found lost stays lost, and is logged once. Once :meth:`stop` was called the lock is not asked: the
        node gives it back next, which is no loss.
        """
        with self._fence:
            if self._stopping.is_set():
                return NODE_STOPPING
            if self._fenced.is_set():
                return LOCK_LOST
            if self._holds_lock():
                return None
            self._fenced.set()
        log_event(
            LOG,
            logging.ERROR,
            "dispatch.stopped_lock_lost",
            note="this node's dispatcher stopped sending: the node no longer holds its lock on the database "
            "(another dicom-node serve took over, or the database file was replaced; node.lock_lost says which)",
        )
        return LOCK_LOST

    def _settled(self, record: DeliveryRecord | None) -> bool:
        """A destination that has every file, has used all its attempts, or has been unreachable too long."""
        dispatch = self._dispatch
        return jobs.delivery_settled(
            record, max_attempts=dispatch.max_attempts, unreachable_hours=dispatch.unreachable_hours
        )

    def _reserve(self, destination: str) -> bool:
        """Claim ``destination`` for one send, unless it is busy or the pool is full."""
        with self._busy_lock:
            if self._stopping.is_set():
                return False
            if destination in self._busy or len(self._busy) >= self._dispatch.parallel_sends:
                return False
            if time.monotonic() < self._held_until.get(destination, 0.0):
                return False
            self._busy.add(destination)
            return True

    def _send_guarded(self, job_id: int, destination: str) -> None:
        """One attempt; if it ends in an unexpected error, it still counts, and the destination waits its backoff.

        Without that, an attempt that fails after the destination accepted a file (say, while recording the
        delivery) would be repeated at the next pass, a second later, sending the same file again and again.
        A database locked by another process is no fault of the destination: it waits its backoff, uncounted.
        """
        started = datetime.now(timezone.utc)
        run: list[RunKey] = []  # the run of results the attempt read, once it has
        try:
            self._attempt(job_id, destination, run)
        except Exception as exc:  # one failed send must not stop the dispatcher; the trace is logged
            with self._busy_lock:
                self._held_until[destination] = time.monotonic() + self._backoff(1).total_seconds()
            if isinstance(exc, DatabaseBusy) or is_database_locked(exc):
                log_event(
                    LOG,
                    logging.WARNING,
                    "dispatch.database_busy",
                    job=job_id,
                    destination=destination,
                    note=f"sending job {job_id} to {destination} waits: the database is locked by another process; "
                    "this does not count as an attempt, and it is tried again shortly",
                )
            elif not self._fenced.is_set():
                LOG.exception(
                    "dispatch.send_crashed", extra={"event_fields": {"job": job_id, "destination": destination}}
                )
                if self._still_ours():  # a node that is stopping, or lost its lock, counts no attempt
                    self._count_crashed_attempt(job_id, destination, started, run[0] if run else None)
        finally:
            with self._busy_lock:
                self._busy.discard(destination)
                self._sends.pop(destination, None)
                self._in_flight.pop(destination, None)

    def _count_crashed_attempt(self, job_id: int, destination: str, started: datetime, key: RunKey | None) -> None:
        error = f"the attempt to send to {destination} stopped on an unexpected error (logged with job id {job_id})"
        try:
            self._finish_attempt(job_id, destination, error, started, key)
        except Exception:  # the database itself may be what failed: the destination stays held back
            LOG.exception(
                "dispatch.attempt_not_recorded", extra={"event_fields": {"job": job_id, "destination": destination}}
            )

    def _attempt(self, job_id: int, name: str, run: list[RunKey]) -> None:
        """One attempt to send ``name`` the job's files it lacks, then record the attempt.

        The attempt belongs to the run of results it read (``run`` receives its key): if the series is
        re-opened and processed again meanwhile, the rest of the superseded run is not sent, and the attempt
        is not counted against the new run. Nothing is sent, and the attempt is not counted, once this node no
        longer holds its lock on the database (the fence, asked before the attempt and before each file).
        """
        now = datetime.now(timezone.utc)
        if not self._still_ours():
            return
        destination = self.settings.destinations.get(name)
        pending, error, key = self._pending_files(job_id, name, destination, now)
        if pending is None:
            return  # the job left SENDING, or another pass sent to this destination meanwhile
        run.append(key)
        if error is None and pending:
            assert destination is not None
            outcome = send_files(
                self.settings.network.ae_title,
                destination,
                pending,
                self._dispatch.timeout_seconds,
                seconds_per_megabyte=self._dispatch.seconds_per_megabyte,
                on_accepted=lambda result, status: self._record_delivery(job_id, name, result, status),
                stop_reason=lambda: self._stop_reason(job_id, key),
                on_sending=lambda result, assoc: self._note_in_flight(name, result, assoc),
            )
            with self._busy_lock:
                cut_off = self._cut_at_stop.pop(name, None)
            if cut_off is not None and (cut_off.path in outcome.sent or outcome.error in (None, NODE_STOPPING)):
                cut_off = None  # its answer came (the stop then cut nothing off)
            error = outcome.error if cut_off is None else self._cut_off_at_stop(destination, cut_off)
            self._audit(job_id, destination, len(outcome.sent), len(pending), error)
            if self._fenced.is_set():
                return  # the node that holds the lock now counts its own attempts
            if error == NODE_STOPPING or cut_off is not None:
                self._not_counted(job_id, name, "dispatch.stopped_at_node_stop", error, len(outcome.sent), len(pending))
                return  # the next start sends the rest
            if outcome.node_waited:
                self._not_counted(job_id, name, "dispatch.database_busy", error, len(outcome.sent), len(pending))
                return  # due again at once: the next pass sends the rest on a new association
            if outcome.unreachable:
                self._finish_attempt(job_id, name, error, now, key, unreachable=True)
                return
        self._finish_attempt(job_id, name, error, now, key)

    def _note_in_flight(self, name: str, result: SendableFile, assoc: Association) -> None:
        with self._busy_lock:
            self._in_flight[name] = (result, assoc)

    def _cut_off_at_stop(self, destination: Destination, result: SendableFile) -> str:
        """Why the file at ``destination`` was cut off by the stop, and that it is sent again."""
        return (
            f"sending stopped: this node is stopping, and {destination.ae_title} had not answered {result.name} "
            f"{self._dispatch.timeout_seconds:g} s after the stop (dispatch.timeout_seconds), so the node cut the "
            f"association off; {result.name} (SOP Instance UID {result.sop_instance_uid}) and the files not yet "
            f"sent are sent again when the node runs again"
        )

    @staticmethod
    def _not_counted(job_id: int, name: str, event: str, error: str | None, sent: int, pending: int) -> None:
        """An attempt cut short by the node itself (stopping, or waiting for its own database): logged, not counted."""
        log_event(
            LOG,
            logging.WARNING,
            event,
            job=job_id,
            destination=name,
            note=f"{name} accepted {sent} of {pending} file(s) of job {job_id}; {error}; this does not count as an "
            "attempt",
        )

    def _stop_reason(self, job_id: int, key: RunKey) -> str | None:
        """Asked before each file: why sending stops (the node stopping or its lock lost, the results superseded),
        or None."""
        return self._why_not_ours() or self._superseded(job_id, key)

    def _superseded(self, job_id: int, key: RunKey) -> str | None:
        """Why the results being sent are no longer the job's to send (re-opened, or processed again), or None.

        Read outside a transaction: another process writing meanwhile never makes it wait or fail.
        """
        row = read_row_outside_transaction(
            self.sessions, select(Job.state, Job.result_files, Job.result_path).where(Job.id == job_id)
        )
        if row is not None and row.state is JobState.SENDING and _paths_of(row.result_files) == key:
            return None
        if row is not None and row.state is JobState.SENDING:
            newer = Path(row.result_path).name if row.result_path else "a newer run"
            return (
                f"sending stopped: job {job_id}'s results were replaced by a newer run of the series ({newer}) while "
                f"they were being sent, so the rest of them are not sent; the results of {newer} are sent instead"
            )
        now = "removed" if row is None else row.state.value
        return (
            f"sending stopped: the series changed while job {job_id}'s results were being sent (the job is now "
            f"{now}), so the rest of these results are out of date and are not sent"
        )

    def _audit(self, job_id: int, destination: Destination, sent: int, pending: int, error: str | None) -> None:
        """One audit record per attempt: the destination, the study, how many files it accepted."""
        study = read_outside_transaction(
            self.sessions,
            select(Study.study_instance_uid)
            .join(Series, Series.study_id == Study.id)
            .join(Job, Job.series_id == Series.id)
            .where(Job.id == job_id),
        )
        outcome: audit.Outcome = "success" if error is None else ("partial" if sent else "failed")
        audit.record(
            self.sessions,
            "send",
            audit.Peer(destination.ae_title, f"{destination.host}:{destination.port}"),
            outcome,
            study_instance_uid=study,
            instances=sent,
            detail=f"job {job_id}: {sent} of {pending} file(s) accepted" + (f"; {error}" if error else ""),
        )

    def _pending_files(
        self, job_id: int, name: str, destination: Destination | None, now: datetime
    ) -> tuple[list[SendableFile] | None, str | None, RunKey]:
        """The files ``name`` takes and has no delivery record of, or why none can be sent; and the run's key.

        None when there is nothing to attempt now: the job left SENDING, or the
        destination is settled or not yet due (as seen in this fresh read, made outside a transaction).
        """
        with _reading(self.sessions) as session:
            job = session.get_one(Job, job_id)
            record = jobs.delivery_record(job, name)
            key = run_key(job)
            if job.state is not JobState.SENDING or self._settled(record) or not record.due(now, self._longest_wait):
                return None, None, key
            planned = record.files
            result_files = list(job.result_files or [])
            delivered = jobs.delivered_sop_instance_uids(session, job_id, name)
            series_uid = job.series.series_instance_uid
        if destination is None:
            return [], f"destination {name!r} is no longer configured", key
        peer = peer_name(destination)
        if record.peer is not None and record.peer != peer:  # re-pointed in config.yaml since its plan was made
            self._write(
                lambda session: _repoint(session, job_id, name, key, peer),
                waiting=f"starting job {job_id} afresh for {name}, which names another peer now",
            )
            return self._pending_files(job_id, name, destination, now)
        # Planned or not, what the destination takes is read from its settings now: a plan made under older
        # settings (its `send` changed before a retry) would count as delivered while short of a kind.
        missing = kinds_missing(result_files, destination.send, destination.segmentation_type)
        if missing:  # never a plan short of a kind, which would count as delivered
            self._write(
                lambda session: jobs.note_results_lacking(session.get_one(Job, job_id), name, missing),
                waiting=f"noting the results job {job_id} lacks for {name}",
            )
            return [], _missing_results(name, missing, series_uid), key
        paths = [f.path for f in files_for(result_files, destination.send, destination.segmentation_type)]
        if planned is not None and set(planned.values()) == set(paths):
            paths = list(planned.values())
        else:
            planned = None  # planned now, or again; files it accepted already are not sent twice
        try:
            results = [read_result_file(path) for path in paths]
        except (OSError, InvalidDicomError, AttributeError):
            return [], f"a result file of this job is missing or unreadable (in {Path(paths[0]).parent})", key
        if planned is None:
            # Before per-file records, jobs.deliveries listed the accepted paths under "sent".
            earlier = [r for r in results if r.path in set(record.sent)]
            self._write(
                lambda session: _plan(session, job_id, name, key, results, earlier, peer),
                waiting=f"planning job {job_id} for {name}",
            )
            delivered |= {r.sop_instance_uid for r in earlier}
        return [r for r in results if r.sop_instance_uid not in delivered], None, key

    def _record_delivery(self, job_id: int, name: str, result: SendableFile, status: int) -> None:
        """Right after a C-STORE response: the file's delivery record, in its own transaction."""
        self._write(
            lambda session: jobs.record_delivery(
                session,
                job_id,
                name,
                sop_instance_uid=result.sop_instance_uid,
                sop_class_uid=result.sop_class_uid,
                path=result.path,
                status=status,
            ),
            waiting=f"recording {result.name} of job {job_id} as delivered to {name}",
        )
        log_event(
            LOG,
            logging.DEBUG if status == 0x0000 else logging.WARNING,
            "dispatch.file_delivered" if status == 0x0000 else "dispatch.stored_with_warning",
            job=job_id,
            destination=name,
            file=result.name,
            sop_instance_uid=result.sop_instance_uid,
            **({} if status == 0x0000 else {"status": describe_status(status)}),
        )

    def _write(self, change: Callable, *, waiting: str) -> None:
        def run() -> None:
            with transaction(self.sessions) as session:
                change(session)

        # A full disk, or a database file that cannot be written for a moment, also waits: a file the destination
        # accepted must be recorded before anything is sent again.
        retry_when_locked(
            run,
            waiting=waiting,
            limit_seconds=RECORD_WAIT_LIMIT_SECONDS,
            wait_for_disk_space=True,
            wait_for_storage=True,
        )

    def _finish_attempt(
        self,
        job_id: int,
        name: str,
        error: str | None,
        now: datetime,
        key: RunKey | None,
        *,
        unreachable: bool = False,
    ) -> None:
        """Count the attempt, note its error and next try, and finish the job if every destination is settled.

        An attempt at results that were superseded meanwhile (``key`` is not the job's run any more) is not
        counted: the new run's results start with every attempt they are allowed. An attempt that found the
        destination ``unreachable`` (down, a transient rejection, or an answer 0xA7xx Out of Resources) is tried
        again every ``dispatch.max_retry_seconds`` at most, without using up ``dispatch.max_attempts``, until it has
        been so for ``dispatch.unreachable_hours``.
        """
        logged: list[tuple[int, str, dict]] = []

        def change(session) -> None:
            logged.clear()
            job = session.get_one(Job, job_id)
            if job.state is not JobState.SENDING or (key is not None and run_key(job) != key):
                logged.append((logging.INFO, "dispatch.attempt_superseded", {"detail": error or ""}))
                return  # re-opened meanwhile: its new run sends its own results
            progress = next(p for p in jobs.delivery_progress(session, job) if p.destination == name)
            complete = error is None and progress.complete
            earlier = jobs.delivery_record(job, name)
            tries = earlier.unreachable_attempts + 1 if unreachable else earlier.attempts + 1
            record = jobs.record_attempt(
                session,
                job,
                name,
                now=now,
                complete=complete,
                error=error,
                next_attempt_at=None if complete else now + self._backoff(tries),
                unreachable=unreachable,
                longest_gap=timedelta(seconds=2 * self._dispatch.max_retry_seconds + UNREACHABLE_GAP_MARGIN_SECONDS),
            )
            if complete:
                logged.append((logging.INFO, "dispatch.delivered", {"files": progress.total}))
            else:
                # a try that found the destination down or asking for a later try is not an attempt: its own count
                counted = (
                    {"uncounted_try": record.unreachable_attempts} if unreachable else {"attempt": record.attempts}
                )
                logged.append(
                    (logging.WARNING, "dispatch.attempt_failed", {**counted, "error": record.last_error}),
                )
            logged.extend(self._settle_in(session, job))

        self._write(change, waiting=f"recording job {job_id}'s attempt for {name}")
        for level, event, fields in logged:
            if event.startswith("dispatch."):
                fields = {"destination": name, **fields}
            log_event(LOG, level, event, job=job_id, **fields)

    def _settle(self, job_id: int) -> None:
        logged: list[tuple[int, str, dict]] = []

        def change(session) -> None:
            logged.clear()
            job = session.get_one(Job, job_id)
            if job.state is JobState.SENDING:
                logged.extend(self._settle_in(session, job))

        self._write(change, waiting=f"finishing job {job_id}")
        for level, event, fields in logged:
            log_event(LOG, level, event, job=job_id, **fields)

    def _settle_in(self, session, job: Job) -> list[tuple[int, str, dict]]:
        """DONE when every destination has every file; FAILED when the rest used all their attempts.

        Either way, each file a destination stored with a warning status is named in the job's warnings.
        """
        progress = jobs.delivery_progress(session, job)
        jobs.append_warnings(job, stored_with_warnings(progress), replacing=is_stored_with_warning)
        if all(p.complete for p in progress):
            files = sum(p.total or 0 for p in progress)
            jobs.finish_sending(session, job, f"sent {files} file(s): {', '.join(p.summary() for p in progress)}")
            return [(logging.INFO, "job.done", {"reason": job.reason})]
        if all(
            p.complete
            or p.attempts >= self._dispatch.max_attempts
            or jobs.unreachable_too_long(p.unreachable_since, p.unreachable_last_at, self._dispatch.unreachable_hours)
            for p in progress
        ):
            jobs.fail(session, job, sending_failure(progress))
            return [(logging.ERROR, "job.failed", {"reason": job.reason})]
        return []

    @property
    def _longest_wait(self) -> timedelta:
        """The longest wait between attempts: one planned further off was planned before the clock was set back."""
        return timedelta(seconds=self._dispatch.max_retry_seconds + CLOCK_STEP_SECONDS)

    def _backoff(self, attempts: int) -> timedelta:
        settings = self._dispatch
        doubled = settings.first_retry_seconds * 2 ** min(max(attempts - 1, 0), 40)  # 2**1025 is too large a float
        return timedelta(seconds=min(doubled, settings.max_retry_seconds))


def _missing_results(name: str, missing: list[str], series_instance_uid: str) -> str:
    """Why a destination gets nothing of a job whose results lack kinds it takes."""
    return (
        f"this job's results hold no {', '.join(missing)}, which destination {name} takes: they were made under "
        "another configuration (a worker's config.yaml that differs from the node's, or a change since the job "
        f"ran); nothing is sent to it until `dicom-node retry {series_instance_uid}` makes them again"
    )


STORED_WITH_WARNING = re.compile(r"^\S+ stored .+ with warning 0x[0-9A-F]{4} ")


def stored_with_warnings(progress: list[jobs.DestinationProgress]) -> list[str]:
    """``pacs stored seg-binary.dcm with warning 0xB006 (Element Discarded)``: one sentence per file that a
    destination stored with a warning status (it kept the file, perhaps changed or without some elements)."""
    return [
        f"{p.destination} stored {Path(row.path).name} with warning {describe_status(row.status)}: "
        "it kept the file, but may have changed or dropped part of it"
        for p in progress
        for row in p.delivered.values()
        if row.status != 0x0000
    ]


def is_stored_with_warning(warning: str) -> bool:
    """A job warning written by :func:`stored_with_warnings` (replaced whenever the job settles again)."""
    return STORED_WITH_WARNING.match(warning) is not None


def sending_failure(progress: list[jobs.DestinationProgress]) -> str:
    """``sending failed: pacs received 2 of 2 files; planner received 0 of 1: <last error> (after 5 attempts)``."""
    parts = []
    for p in progress:
        if p.total is None:
            received = f"{p.destination} received nothing"
        else:
            received = (
                f"{p.destination} received {p.total - len(p.missing)} of {p.total} file{'s' if p.total != 1 else ''}"
            )
        if not p.complete and p.unreachable_since is not None:
            since = as_utc(p.unreachable_since)
            received += f": {p.last_error or 'not sent'} (not taking files since {since:%Y-%m-%d %H:%M} UTC)"
        elif not p.complete:
            attempts = f"{p.attempts} attempt{'s' if p.attempts != 1 else ''}"
            received += f": {p.last_error or 'not sent'} (after {attempts})"
        parts.append(received)
    return f"{jobs.SENDING_FAILURE_PREFIX}: " + "; ".join(parts)


def peer_name(destination: Destination) -> str:
    """The peer a destination names, as a delivery plan records it: ``AE@host:port``."""
    return f"{destination.ae_title}@{destination.host}:{destination.port}"


def _repoint(session, job_id: int, name: str, key: RunKey, peer: str) -> None:
    """``name`` names another peer than its plan was made for: it starts afresh (:func:`db.jobs.repoint_delivery`)."""
    job = session.get_one(Job, job_id)
    if job.state is not JobState.SENDING or run_key(job) != key:
        return
    sentence = jobs.repoint_delivery(session, job, name, peer)
    if sentence is not None:
        log_event(LOG, logging.WARNING, "dispatch.destination_repointed", job=job_id, destination=name, reason=sentence)


def _plan(
    session,
    job_id: int,
    name: str,
    key: RunKey,
    results: list[SendableFile],
    earlier: list[SendableFile],
    peer: str | None = None,
) -> None:
    """Record the files ``name`` (now ``peer``) takes, and (from an older record) those it accepted already."""
    job = session.get_one(Job, job_id)
    if job.state is not JobState.SENDING or run_key(job) != key:
        return
    jobs.plan_delivery(session, job, name, {r.sop_instance_uid: r.path for r in results}, peer)
    for r in earlier:
        jobs.record_delivery(
            session,
            job_id,
            name,
            sop_instance_uid=r.sop_instance_uid,
            sop_class_uid=r.sop_class_uid,
            path=r.path,
            status=0x0000,
        )
