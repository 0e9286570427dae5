"""The audit trail: one record per association and per store, query, retrieve and send (IHE ATNA in spirit).

Each record says when, which peer (AE title and network address), what action, which
study (by UID only: no names, IDs or birth dates), the outcome and how many instances.
Stores are summed per association and study, as ATNA's "DICOM Instances Transferred"
message is, so the receive path adds no database write per image. What a caller can repeat at will
(a monitoring system's C-ECHOs and its associations for nothing else, refusals) is recorded once per
caller each 10 s, the record counting the others (:data:`REPEATS`); a C-FIND a peer repeats unchanged (a worklist
polled) once per study each 5 minutes (:data:`REPEATED_QUERIES`), the last one left out written with its own time
within about a minute and a half after its 5 minutes if no new one comes; the node's own readiness C-ECHO and its
association once an hour, counting the others (:data:`OWN_CHECKS`), logged at DEBUG. Writing an audit
record never fails the operation it describes: a record that cannot be written is
logged at ERROR instead. ``dicom-node audit`` lists the records.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Literal, get_args

from pydicom.dataset import Dataset
from pynetdicom.pdu import P_DATA_TF
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from db.models import AuditEvent, utcnow
from db.session import DatabaseBusy, retry_when_locked, transaction
from dicom_node.logs import REPEATED_REFUSALS, cut, log_event, log_throttled, shown
from dicom_node.receive.header import is_valid_uid

LOG = logging.getLogger(__name__)

Action = Literal["association", "store", "find", "move", "get", "send", "echo", "console", "operator"]
Outcome = Literal["success", "refused", "failed", "partial", "released", "aborted", "rejected"]
StatusOutcome = Literal["success", "refused", "failed", "partial"]
ACTIONS: tuple[str, ...] = get_args(Action)
MAX_DETAIL_CHARS = 2000
"""The most characters of a record's detail; the rest are cut, and the detail says how many."""
LOCKED_WAIT_LIMIT_SECONDS = 60.0
"""How long a record waits for a database another writer holds locked (tried again, with growing pauses, after
each of SQLite's busy timeouts) before it is given up and said so in the log."""


@dataclass(frozen=True)
class Peer:
    ae_title: str | None
    address: str | None

    @classmethod
    def of(cls, assoc: Any) -> Peer:
        """The requesting peer of a pynetdicom association."""
        requestor = assoc.requestor
        address = f"{requestor.address}:{requestor.port}" if getattr(requestor, "address", None) else None
        title = requestor.ae_title or getattr(requestor.primitive, "calling_ae_title", None)  # set once negotiated
        return cls(str(title or "").strip() or None, address)


@dataclass(frozen=True)
class Entry:
    """One audit record: the action, its peer, the outcome, the study (UID only), how many instances, a detail, and
    when it happened (None: when it is written)."""

    action: Action
    peer: Peer
    outcome: Outcome
    study_instance_uid: str | None = None
    instances: int = 0
    detail: str | None = None
    at: datetime | None = None


def record(
    sessions: sessionmaker[Session],
    action: Action,
    peer: Peer,
    outcome: Outcome,
    *,
    study_instance_uid: str | None = None,
    instances: int = 0,
    detail: str | None = None,
) -> None:
    """Write one audit record in its own transaction; never raises. ``detail`` is cut to :data:`MAX_DETAIL_CHARS`.

    A database locked by another writer is tried again for up to :data:`LOCKED_WAIT_LIMIT_SECONDS`. An action of
    :data:`REPEATED_ACTIONS` (a C-ECHO: monitoring systems echo every few seconds) goes through :data:`REPEATS`:
    one record per peer and outcome each 10 s, counting the others."""
    entry = Entry(action, peer, outcome, study_instance_uid, instances, detail)
    what = REPEATED_ACTIONS.get(action)
    if what is not None:
        REPEATS.add((action, peer.ae_title, host_of(peer.address), outcome), what, sessions, entry)
        return
    _write(sessions, entry)


def _write(sessions: sessionmaker[Session], entry: Entry, level: int = logging.INFO) -> bool:
    """:func:`record` without the throttle of repeated actions; its log line at ``level``. Whether it was written
    (one the database refused is held: :data:`HELD`)."""
    peer = entry.peer
    detail = cut(entry.detail, MAX_DETAIL_CHARS) if entry.detail is not None else None
    when = {"at": entry.at} if entry.at is not None else {}  # else the column's default: now

    def write() -> None:
        with transaction(sessions) as session:
            session.add(
                AuditEvent(
                    action=entry.action,
                    peer_ae_title=(peer.ae_title or "")[:16] or None,
                    peer_address=(peer.address or "")[:64] or None,
                    study_instance_uid=entry.study_instance_uid,
                    outcome=entry.outcome,
                    instances=entry.instances,
                    detail=detail,
                    **when,
                )
            )

    waiting = f"writing the {entry.action} audit record of {peer.ae_title or peer.address or 'the console'}"
    try:
        retry_when_locked(write, waiting=waiting, limit_seconds=LOCKED_WAIT_LIMIT_SECONDS)
    except DatabaseBusy as exc:  # the audited operation must not fail because of its record
        log_event(
            LOG,
            logging.ERROR,
            "audit.not_recorded",
            action=entry.action,
            peer_ae=peer.ae_title,
            outcome=entry.outcome,
            reason=f"the audit record was lost: {exc}",
        )
        return False
    except OperationalError as exc:  # the database refused the write (a full disk): kept until it takes writes
        HELD.hold(sessions, entry, str(getattr(exc, "orig", None) or "the database refused the write"))
        return False
    except Exception:  # the audited operation must not fail because of its record
        LOG.exception(
            "audit.not_recorded",
            extra={"event_fields": {"action": entry.action, "peer_ae": peer.ae_title, "outcome": entry.outcome}},
        )
        return False
    if entry.at is None:  # a record written now: the database takes writes again, so held ones go too
        HELD.write_all(sessions, at_most=WRITTEN_HELD_AT_ONCE)
    fields = {
        "action": entry.action,
        "peer_ae": peer.ae_title,
        "peer_address": peer.address,
        "study_instance_uid": entry.study_instance_uid,
        "outcome": entry.outcome,
        "instances": entry.instances,
        "detail": detail,
        "at": entry.at.isoformat(timespec="seconds") if entry.at is not None else None,
    }
    log_event(LOG, level, "audit", **{key: value for key, value in fields.items() if value is not None})
    return True


class HeldRecords:
    """Audit records the database refused (its disk full), kept in memory, each with the time it happened, and
    written as soon as a record is written again (or when the node stops). At most :attr:`LIMIT`: the oldest
    make room, counted in the next sentence logged."""

    LIMIT = 10_000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: deque[tuple[sessionmaker[Session], Entry]] = deque()
        self._dropped = 0

    def hold(self, sessions: sessionmaker[Session], entry: Entry, problem: str) -> None:
        """Keep ``entry`` (its time now, where it had none) and say so, at most once each 10 s."""
        with self._lock:
            if len(self._held) >= self.LIMIT:
                self._held.popleft()
                self._dropped += 1
            self._held.append((sessions, replace(entry, at=entry.at or utcnow())))
            waiting, dropped = len(self._held), self._dropped
        lost = f"; {dropped} older record(s) were dropped to stay within {self.LIMIT}" if dropped else ""
        log_throttled(
            LOG,
            logging.ERROR,
            "audit.held",
            "database refused",
            reason=f"an audit record could not be written ({problem}); it is kept in memory with the time it "
            f"happened, {waiting} waiting, and written once the database takes writes again{lost}",
        )

    def write_all(self, sessions: sessionmaker[Session] | None = None, at_most: int | None = None) -> int:
        """Write the records held (of ``sessions``' database only, when given; ``at_most`` of them), oldest
        first, until one is refused again (it is held again); how many were written."""
        written = 0
        while at_most is None or written < at_most:
            with self._lock:
                item = next((held for held in self._held if sessions is None or held[0] is sessions), None)
                if item is None:
                    return written
                self._held.remove(item)
            if not _write(*item):
                return written
            written += 1
        return written

    def waiting(self, sessions: sessionmaker[Session] | None = None) -> int:
        """Records held (of ``sessions``' database only, when given)."""
        with self._lock:
            return sum(1 for held in self._held if sessions is None or held[0] is sessions)


WRITTEN_HELD_AT_ONCE = 100
"""Held records a record written in the course of a request writes after it: the rest follow with the next ones,
so the request that finds the database taking writes again is not held up by a whole backlog."""

HELD = HeldRecords()
"""This process' audit records waiting for the database to take writes again."""


def host_of(address: str | None) -> str | None:
    """The host of a peer's ``host:port`` address (an IPv6 host keeps its colons): each association of the same
    peer comes from another port."""
    if not address or ":" not in address:
        return address
    return address.rpartition(":")[0]


def with_count(detail: str | None, left_out: int, what: str) -> str | None:
    """``detail`` with a clause saying ``left_out`` more ``what`` were left out since the previous record."""
    if not left_out:
        return detail
    clause = f"{left_out} more {what} since the previous record, not recorded one by one"
    return f"{detail}; {clause}" if detail else clause


@dataclass
class _LeftOut:
    """The latest record a key of :class:`RepeatedRecords` left out (its entry stamped with the time it happened),
    and how many it left out since it wrote one."""

    sessions: sessionmaker[Session]
    entry: Entry
    what: str
    count: int = 1
    level: int = logging.INFO

    def write(self, occasion: str) -> None:
        """Write the latest record left out, at the time it happened, counting the others, and saying it was written
        late, at ``occasion``."""
        detail = with_count(self.entry.detail, self.count - 1, self.what)
        note = f"written {occasion}"
        _write(self.sessions, replace(self.entry, detail=f"{detail}; {note}" if detail else note), self.level)


REPEAT_SECONDS = REPEATED_REFUSALS.seconds
"""The records a caller can repeat at will are written at most once per caller in this long, as refused
connections and associations are logged."""


def _span(seconds: float) -> str:
    """A window's length in words: ``hour``, ``5 minutes``, ``10 seconds``."""
    if seconds == 3600:
        return "hour"
    if seconds % 3600 == 0:
        return f"{seconds / 3600:g} hours"
    if seconds % 60 == 0:
        return "minute" if seconds == 60 else f"{seconds / 60:g} minutes"
    return f"{seconds:g} seconds"


class RepeatedRecords:
    """Records a caller can repeat at will (a throttled login, a refused download or query, a monitoring system's
    C-ECHO): at most one per key each ``seconds``. Those left out are counted, and the next record written for the
    key says how many; :meth:`flush` writes the latest one left out of each key, with its count, when the node
    stops. At most ``max_keys`` keys are held: the least recently used one makes room, its count written first,
    so nothing is left out without a record counting it.

    With ``hold_seconds`` (at least ``seconds``), no record is held longer than that after its key's last written
    one: a thread of this process (started when one is first left out, ended when none is held) writes, each
    :attr:`sweep_seconds`, those of keys no new request has written a record for by then (the caller stopped
    repeating it), so a record left out is not kept in memory only, where a process killed would lose it. A
    record left out is written with the time it happened, not the time it is written. ``log_level``: that of the
    records' log lines. ``clock``: the monotonic clock of the windows (tests)."""

    def __init__(
        self,
        seconds: float = REPEAT_SECONDS,
        max_keys: int = 4096,
        *,
        hold_seconds: float | None = None,
        log_level: int = logging.INFO,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.seconds = seconds
        self.max_keys = max_keys
        self.hold_seconds = max(hold_seconds, seconds) if hold_seconds is not None else None
        self.sweep_seconds = min(max((self.hold_seconds or seconds) - seconds, 2.0) / 2, 30.0)
        self.log_level = log_level
        self.clock = clock
        self._lock = threading.Lock()
        self._writing = threading.Lock()  # held while the thread writes what it took: flush() waits for it
        self._keys: dict[Any, tuple[float, _LeftOut | None]] = {}  # key -> (when one was written, left out since)
        self._sweeper: tuple[int, threading.Thread] | None = None  # (process id, thread)

    def _now(self) -> float:
        return self.clock() if self.clock is not None else time.monotonic()

    def record(
        self,
        key: Any,
        what: str,
        sessions: sessionmaker[Session],
        action: Action,
        peer: Peer,
        outcome: Outcome,
        *,
        study_instance_uid: str | None = None,
        instances: int = 0,
        detail: str | None = None,
    ) -> bool:
        """:meth:`add` of the record these arguments describe."""
        return self.add(key, what, sessions, Entry(action, peer, outcome, study_instance_uid, instances, detail))

    def add(self, key: Any, what: str, sessions: sessionmaker[Session], entry: Entry) -> bool:
        """Write ``entry`` (with a clause counting ``what`` was left out since the previous one of ``key``), or
        leave it out and count it when one was written for ``key`` less than :attr:`seconds` ago. Whether it was
        written."""
        now = self._now()
        if entry.at is None:  # a record left out is written later: with the time it happened
            entry = replace(entry, at=utcnow())
        latest = _LeftOut(sessions, entry, what, level=self.log_level)
        with self._lock:
            last = self._keys.pop(key, None)  # put back below: the dict stays ordered by last use
            if last is not None and now - last[0] < self.seconds:
                if last[1] is not None:
                    latest.count = last[1].count + 1
                self._keys[key] = (last[0], latest)
                self._sweep_later()
                return False
            evicted = self._make_room()
            self._keys[key] = (now, None)
        for left_out in evicted:
            left_out.write("early: too many callers were being counted at once")
        left = last[1].count if last is not None and last[1] is not None else 0
        _write(sessions, replace(entry, detail=with_count(entry.detail, left, what)), self.log_level)
        return True

    def _make_room(self) -> list[_LeftOut]:
        """Drop the least recently used keys down to ``max_keys - 1``; the records they left out (lock held)."""
        evicted = []
        while len(self._keys) >= self.max_keys:
            oldest = next(iter(self._keys))
            _when, left_out = self._keys.pop(oldest)
            if left_out is not None:
                evicted.append(left_out)
        return evicted

    def flush(self, occasion: str = "when the node stopped", sessions: sessionmaker[Session] | None = None) -> int:
        """Write the latest record each key left out (into the database of ``sessions`` only, when given), counting
        the others; how many were written. The keys keep their time: the next record of a key within
        :attr:`seconds` is counted again."""
        with self._writing:  # after what the thread is writing, if it is
            return self._write_held(lambda _when, left_out: sessions is None or left_out.sessions is sessions, occasion)

    def expire(self) -> int:
        """Write the latest record left out of each key whose last written record is :attr:`hold_seconds` old or
        older, counting the others; how many were written. What the thread does each :attr:`sweep_seconds`."""
        if self.hold_seconds is None:
            return 0
        hold, now = self.hold_seconds, self._now()
        occasion = f"when the {_span(self.seconds)} after the previous record had passed without a new one"
        with self._writing:
            return self._write_held(lambda when, _left_out: now - when >= hold, occasion)

    def _write_held(self, due: Callable[[float, _LeftOut], bool], occasion: str) -> int:
        """Write the records left out for which ``due(when their key's last was written, record)`` is true, at
        ``occasion``; how many (``_writing`` held)."""
        with self._lock:
            pending = [
                (key, entry) for key, entry in self._keys.items() if entry[1] is not None and due(entry[0], entry[1])
            ]
            for key, (when, _left_out) in pending:
                self._keys[key] = (when, None)
        for _key, (_when, left_out) in pending:
            assert left_out is not None
            left_out.write(occasion)
        return len(pending)

    def _sweep_later(self) -> None:
        """Start this process' thread of :meth:`expire` if it is not running (lock held)."""
        if self.hold_seconds is None:
            return
        pid = os.getpid()
        if self._sweeper is not None and self._sweeper[0] == pid and self._sweeper[1].is_alive():
            return
        thread = threading.Thread(target=self._sweep, name="audit-held-records", daemon=True)
        self._sweeper = (pid, thread)
        thread.start()

    def _sweep(self) -> None:
        """Each :attr:`sweep_seconds`, :meth:`expire`; end when no record is left out."""
        while True:
            time.sleep(self.sweep_seconds)
            try:
                self.expire()
            except Exception:  # a record that cannot be written is logged by _write; go on
                LOG.exception("audit.held_records_not_written")
            with self._lock:
                if not any(left_out is not None for _when, left_out in self._keys.values()):
                    self._sweeper = None
                    return


REPEATS = RepeatedRecords()
"""The audit records of this process that a caller can repeat at will, throttled per caller."""
REPEATED_ACTIONS: dict[str, str] = {"echo": "C-ECHO requests of this peer"}
"""Actions :func:`record` always throttles through :data:`REPEATS`, and what their count clause calls them."""


REPEATED_QUERY_SECONDS = 300.0
"""A C-FIND that a peer repeats unchanged (a planning system polling its worklist) is recorded once per study it
discloses in this long, the next record counting the identical ones left out."""
REPEATED_QUERY_HOLD_SECONDS = REPEATED_QUERY_SECONDS + 60.0
"""The longest the last C-FIND left out of a poll waits for the peer's next one (whose record would count it) before
it is written on its own, with its time: a peer that stopped polling has its last queries in the trail within 6 to
6.5 minutes, not only when the node stops."""
REPEATED_QUERIES = RepeatedRecords(
    seconds=REPEATED_QUERY_SECONDS, max_keys=20_000, hold_seconds=REPEATED_QUERY_HOLD_SECONDS
)
"""The audit records of this process of C-FIND requests repeated unchanged, per peer, query and study."""
REPEATED_QUERY = "identical C-FIND requests of this peer that disclosed this study"


OWN_CHECK_SECONDS = 3600.0
"""The node's own readiness C-ECHO (``/readyz``, the Docker health check: one each 5 s) is recorded once in this
long, with its association, the next record counting the others."""
OWN_CHECKS = RepeatedRecords(
    seconds=OWN_CHECK_SECONDS, max_keys=64, hold_seconds=OWN_CHECK_SECONDS + 60.0, log_level=logging.DEBUG
)
"""The audit records of this process of the node's own readiness C-ECHOs and their associations: one per database,
action and outcome each hour, logged at DEBUG (a probe each 5 s wrote two rows and two INFO lines each 10 s)."""
OWN_CHECK_ECHOES = "C-ECHO requests of the node's own readiness check"
OWN_CHECK_ASSOCIATIONS = "C-ECHO-only associations of the node's own readiness check"


def own_check_echo(sessions: sessionmaker[Session], peer: Peer) -> None:
    """Record a C-ECHO of the node's own readiness check (the receiving side tells it,
    :func:`dicom_node.receive.scp.own_health_check`) through :data:`OWN_CHECKS`: once an hour, counting the
    others."""
    OWN_CHECKS.add((sessions, "echo", "success"), OWN_CHECK_ECHOES, sessions, Entry("echo", peer, "success"))


def flush_repeated(sessions: sessionmaker[Session] | None = None, occasion: str = "when the node stopped") -> int:
    """Write the records :data:`REPEATS`, :data:`REPEATED_QUERIES` and :data:`OWN_CHECKS` left out and no record
    counted yet (into the database of ``sessions`` only, when given): call it when the process stops answering
    requests."""
    written = sum(repeated.flush(occasion, sessions) for repeated in (REPEATS, REPEATED_QUERIES, OWN_CHECKS))
    written += HELD.write_all(sessions)
    if lost := HELD.waiting(sessions):
        log_event(
            LOG,
            logging.ERROR,
            "audit.not_recorded",
            reason=f"{lost} audit record(s) held since the database refused them could not be written {occasion} "
            "either (it still refused writes), and are lost",
        )
    return written


class StoreTally:
    """Instances stored and refused on one association, per study; written when the association ends."""

    ATTRIBUTE = "_dicom_node_store_tally"

    def __init__(self) -> None:
        self._counts: Counter[tuple[str | None, Literal["success", "refused", "failed"]]] = Counter()
        self._lock = threading.Lock()

    @classmethod
    def of(cls, assoc: Any) -> StoreTally:
        """The tally kept on a pynetdicom association (created on first use)."""
        tally = getattr(assoc, cls.ATTRIBUTE, None)
        if tally is None:
            tally = cls()
            setattr(assoc, cls.ATTRIBUTE, tally)
        return tally

    def add(self, study_instance_uid: str | None, outcome: Literal["success", "refused", "failed"]) -> None:
        with self._lock:
            self._counts[(study_instance_uid, outcome)] += 1

    def flush(self, sessions: sessionmaker[Session], peer: Peer) -> None:
        """One ``store`` record per study and outcome; the tally is emptied."""
        with self._lock:
            counts, self._counts = self._counts, Counter()
        for (study, outcome), count in sorted(counts.items(), key=lambda item: (item[0][0] or "", item[0][1])):
            record(sessions, "store", peer, outcome, study_instance_uid=study, instances=count)


VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
ECHO_ONLY_DETAIL = "C-ECHO only: Verification was the only service accepted"
ECHO_ONLY_ASSOCIATIONS = "C-ECHO-only associations of this peer"
EMPTY_ASSOCIATIONS = "associations of this peer that made no request"
MADE_REQUEST = "_dicom_node_made_request"
"""Set on an association as its first request (a DIMSE message) arrives: :func:`note_request`."""


def note_request(event: Any) -> None:
    """``EVT_PDU_RECV``: a P-DATA-TF PDU (the first fragment of a request, even one never finished: a data set too
    large) means the association made a request, so its record is its own (:func:`association_ended`)."""
    if isinstance(getattr(event, "pdu", None), P_DATA_TF):
        setattr(event.assoc, MADE_REQUEST, True)


def association_ended(
    sessions: sessionmaker[Session],
    assoc: Any,
    outcome: Literal["released", "aborted"],
    detail: str | None = None,
    *,
    own_check: bool = False,
) -> None:
    """Write the association's store tally, then the association record itself (with ``detail``: why it was
    aborted, say).

    An association on which Verification was the only service accepted could do nothing but C-ECHO (a monitoring
    system's, every few seconds): its record goes through :data:`REPEATS` as the C-ECHO records do, one per peer
    and outcome each 10 s, counting the others; the node's own readiness check's (``own_check``) through
    :data:`OWN_CHECKS`, once an hour. So does one that made no request at all (:func:`note_request` never ran:
    a caller opening and aborting associations in a loop). Any other association keeps a record of its own."""
    peer = Peer.of(assoc)
    tally = getattr(assoc, StoreTally.ATTRIBUTE, None)
    if tally is not None:
        tally.flush(sessions, peer)
    if own_check and echo_only(assoc):
        entry = Entry("association", peer, outcome, detail=ECHO_ONLY_DETAIL)
        OWN_CHECKS.add((sessions, "association", outcome), OWN_CHECK_ASSOCIATIONS, sessions, entry)  # per database
        return
    if echo_only(assoc):
        key = ("association", peer.ae_title, host_of(peer.address), outcome)
        entry = Entry("association", peer, outcome, detail=ECHO_ONLY_DETAIL)
        REPEATS.add(key, ECHO_ONLY_ASSOCIATIONS, sessions, entry)
        return
    if not getattr(assoc, MADE_REQUEST, True):  # opened and ended without a request: a caller in a loop
        key = ("association without a request", peer.ae_title, host_of(peer.address), outcome)
        entry = Entry("association", peer, outcome, detail=f"no request was made; {detail}" if detail else None)
        REPEATS.add(key, EMPTY_ASSOCIATIONS, sessions, entry)
        return
    record(sessions, "association", peer, outcome, detail=detail)


def echo_only(assoc: Any) -> bool:
    """Whether the association was accepted for Verification (C-ECHO) alone."""
    services = {str(context.abstract_syntax) for context in getattr(assoc, "accepted_contexts", ())}
    return services == {VERIFICATION_SOP_CLASS}


def recent(
    session: Session,
    *,
    since: datetime | None = None,
    peer_ae_title: str | None = None,
    actions: Sequence[str] = (),
    study_instance_uid: str | None = None,
    limit: int = 100,
) -> list[AuditEvent]:
    """Audit records, newest first, filtered."""
    query = select(AuditEvent).order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(limit)
    if since is not None:
        query = query.where(AuditEvent.at >= since)
    if peer_ae_title:
        query = query.where(AuditEvent.peer_ae_title == peer_ae_title)
    if actions:
        query = query.where(AuditEvent.action.in_(list(actions)))
    if study_instance_uid:
        query = query.where(AuditEvent.study_instance_uid == study_instance_uid)
    return list(session.scalars(query))


def status_outcome(code: int | None) -> StatusOutcome:
    """What a DIMSE status says happened, for the audit trail.

    success (0x0000); partial (a warning, 0xBxxx); failed on the node's side (out of
    resources 0xA7xx, cancelled 0xFE00, unable to process 0xC001-0xCFFF, no status);
    refused for everything else (not authorized, unknown destination, identifier or
    data set that does not match, cannot understand 0xC000).
    """
    if code is None:
        return "failed"
    if code == 0x0000:
        return "success"
    if code & 0xF000 == 0xB000:
        return "partial"
    if code & 0xFF00 == 0xA700 or code == 0xFE00 or 0xC001 <= code <= 0xCFFF:
        return "failed"
    return "refused"


def _code(value: Any) -> int | None:
    if isinstance(value, int):
        return value
    return int(value.Status) if value is not None and "Status" in value else None


def _literal_uid(identifier: Any, keyword: str) -> str | None:
    """The identifier's value of a UID key if it names one valid UID (digits and dots, at most 64 characters),
    else None: a record never names a study by whatever text a peer put in the key (``1.2.3%``, a wildcard)."""
    value = str(identifier.get(keyword, "") or "").strip(" \0") if identifier is not None else ""
    return value if is_valid_uid(value) else None


def as_sent(text: str, limit: int = 16) -> str:
    """A value a peer sent (a level, an AE title), for a detail: as it is when short and printable, else quoted
    and cut."""
    return text if len(text) <= limit and text.isprintable() else shown(text, limit)


def retrieval_outcome(last: int | None, sent: int, *, finished: bool, counted: int | None) -> StatusOutcome:
    """What a C-MOVE or C-GET handler's run did, for the audit trail.

    ``last`` is the last status it yielded, ``sent`` how many data sets it handed out to be sent, ``finished``
    whether it ran to its end, ``counted`` the number of sub-operations it announced. A run that ends after its
    pending statuses (pynetdicom then answers success) is a success; one that sent some and failed others (a
    warning, 0xBxxx), was stopped half-way or was cancelled by its peer (0xFE00) after it sent some is partial; one
    with nothing to send is a success with 0 instances.
    """
    if last == 0xFF00:
        if finished:
            return "success"
        return "partial" if sent else "failed"
    if last is None:
        return "success" if counted == 0 else "failed"
    if last & 0xF000 == 0xB000:
        return "partial" if sent else "failed"
    if last == 0xFE00 and sent:  # cancelled by its peer after some went; a failure after some is no success
        return "partial"
    return status_outcome(last)


STUDY_INSTANCE_UID_TAG = 0x0020000D


def _study_of(dataset: Any) -> str | None:
    """The StudyInstanceUID of a data set handed out to be sent, if it names one. A stored element is read as its
    bytes, never converted: the data set goes out byte for byte as it was stored."""
    try:
        element = dataset.get_item(STUDY_INSTANCE_UID_TAG)
        value = element.value if element is not None else None
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
    except Exception:  # noqa: BLE001 - an element that cannot be read: the study stays unknown
        return None
    text = str(value or "").rstrip("\x00 ").strip()
    return _literal_uid({"StudyInstanceUID": text}, "StudyInstanceUID") if text else None


DISCLOSED_ATTRIBUTE = "_dicom_node_disclosed_studies"
MAX_STUDIES_AUDITED = 1000
"""The most studies one query or retrieval names in the trail, one record each; matches of further studies are
counted in one record without a study, whose detail says so."""
IDENTIFIER_DOES_NOT_MATCH = 0xA900


def disclosed(event: Any, studies: Sequence[str]) -> None:
    """Tell the audit of a C-FIND which studies the match about to be yielded discloses, when the match does
    not name them itself (a PATIENT-level match names the patient, not the patient's studies)."""
    setattr(event, DISCLOSED_ATTRIBUTE, list(studies))


ENDED_ATTRIBUTE = "_dicom_node_retrieval_ended"


def retrieval_ended(event: Any, sentence: str) -> None:
    """Tell the audit of a C-GET or C-MOVE why it ended before its last instance (a peer that stopped taking data
    or closed its association), or why it sent nothing of the series it named, in a sentence naming it: its
    record's detail says so, as the log does."""
    setattr(event, ENDED_ATTRIBUTE, sentence)


ANSWERED_ATTRIBUTE = "_dicom_node_answered_without_the_handler"


def answered_without_the_handler(event: Any, status: int) -> None:
    """Tell the audit of a C-MOVE the final status its peer heard where pynetdicom answered it without resuming the
    handler (a refused request whose destination could not be reached): its record's outcome follows that status."""
    setattr(event, ANSWERED_ATTRIBUTE, status)


REPEATABLE_ATTRIBUTE = "_dicom_node_repeatable_refusal"


def repeatable_refusal(event: Any) -> None:
    """Tell the audit of a request that its refusal is one its peer can repeat at will (a role it lacks, a query
    too broad, too many queries): such refusals, disclosing nothing, are recorded at most once per peer and
    service each 10 s, the record counting those left out (:data:`REPEATS`)."""
    setattr(event, REPEATABLE_ATTRIBUTE, True)


def _studies_of_match(event: Any, dataset: Any) -> list[str | None]:
    """The studies a match discloses: those the handler named for it (:func:`disclosed`), else its own."""
    named = getattr(event, DISCLOSED_ATTRIBUTE, None)
    if named is not None:
        setattr(event, DISCLOSED_ATTRIBUTE, None)
        return list(named) or [None]
    return [_study_of(dataset)]


def _tally(studies: Counter[str | None], found: list[str | None]) -> int:
    """Count a match or instance under each of its studies, up to :data:`MAX_STUDIES_AUDITED` studies; past
    them, under no study. How many were counted so."""
    beyond = 0
    for study in found:
        if study in studies or len(studies) < MAX_STUDIES_AUDITED:
            studies[study] += 1
        else:
            studies[None] += 1
            beyond += 1
    return beyond


def why_unreadable(exc: BaseException) -> str:
    """Why a request's identifier could not be read, for the log and the trail (no exception class names)."""
    if isinstance(exc, RecursionError):
        return "its identifier nests sequences too deeply to be read"
    return "its identifier is not a readable DICOM data set"


def _refusal(action: str, event: Any, why: str) -> Iterator[Any]:
    """What the peer hears when its identifier cannot be read: 0xA900 (for a C-GET after its count)."""
    peer = Peer.of(event.assoc)
    log_event(
        LOG,
        logging.WARNING,
        "query.refused" if action == "find" else "retrieve.refused",
        calling_ae=peer.ae_title,
        address=peer.address,
        reason=f"a C-{action.upper()} from {peer.ae_title or 'a peer'} was refused: {why}",
    )
    status = Dataset()
    status.Status = IDENTIFIER_DOES_NOT_MATCH
    status.ErrorComment = "Identifier cannot be read"
    if action == "get":
        yield 1
    yield status, None


def audited_retrieve(action: Literal["find", "move", "get"], handler: Any, sessions: sessionmaker[Session]) -> Any:
    """Wrap a C-FIND, C-MOVE or C-GET generator handler: one audit record when its request is answered.

    A C-MOVE or C-GET that sent instances of several studies leaves one record per study (its instances
    counted), and so does a C-FIND whose matches belong to several studies (its matches counted), so that each
    study's trail shows every query and retrieval that disclosed it, however the peer selected it. A C-FIND or
    C-GET whose identifier cannot be read is refused with 0xA900 and recorded as refused, without its keys. A
    refusal the handler marks :func:`repeatable_refusal` is recorded at most once per peer each 10 s. A retrieval
    the handler says ended early (:func:`retrieval_ended`) has that sentence in its detail."""
    import functools

    @functools.wraps(handler)
    def wrapped(event: Any, *args: Any) -> Any:
        identifier: Any = None
        level, unreadable = "", ""
        matches, last, refused_destination, finished = 0, None, False, False
        counted: int | None = None
        studies: Counter[str | None] = Counter()
        beyond = 0  # matches of studies past MAX_STUDIES_AUDITED
        values: Any = None
        try:
            try:
                identifier = getattr(event, "identifier", None)
                level = str(identifier.get("QueryRetrieveLevel", "")) if identifier is not None else ""
            except Exception as exc:  # noqa: BLE001 - refused below, in a sentence; the peer's bytes are at fault
                identifier, unreadable = None, why_unreadable(exc)
            values = _refusal(action, event, unreadable) if unreadable and action != "move" else handler(event, *args)
            for value in values:
                if isinstance(value, tuple) and len(value) == 2:
                    first, dataset = value
                    if first is None and dataset is None:  # C-MOVE to an unknown or forbidden destination
                        refused_destination = True
                    elif first is not None:
                        last = _code(first)
                        if last == 0xFF00 and dataset is not None:
                            matches += 1
                            found = _studies_of_match(event, dataset) if action == "find" else [_study_of(dataset)]
                            beyond += _tally(studies, found)
                elif isinstance(value, int) and counted is None:  # a C-MOVE or C-GET's number of sub-operations
                    counted = value
                yield value
            finished = True
        finally:
            # pynetdicom stops at the final status and drops this generator: the handler, stopped where it yielded
            # it, is closed here, before the record, so whatever it still holds is let go first.
            close = getattr(values, "close", None)
            if close is not None:
                close()
            last = getattr(event, ANSWERED_ATTRIBUTE, last)
            if action == "find":
                outcome = status_outcome(last)
            else:
                outcome = retrieval_outcome(last, matches, finished=finished, counted=counted)
            if refused_destination or unreadable:
                outcome = "refused"
            destination = ""
            if action == "move":
                destination = f", to {as_sent(str(getattr(event, 'move_destination', '') or '').strip())}"
            if not studies:  # nothing sent or matched: the study the peer named, if it named one
                studies[_literal_uid(identifier, "StudyInstanceUID")] = matches
            repeatable = not matches and getattr(event, REPEATABLE_ATTRIBUTE, False)  # 0x0124, too many (0xA700)
            ended = getattr(event, ENDED_ATTRIBUTE, None)
            peer = Peer.of(event.assoc)
            query = _query_fingerprint(event) if action == "find" and outcome == "success" else None
            for study, count in studies.items():
                if unreadable:
                    detail = f"refused: {unreadable}"
                else:
                    detail = f"{as_sent(level)} level, {count} {'matches' if action == 'find' else 'instances'}"
                if len(studies) > 1:
                    detail += f" ({matches} in all, over {len(studies)} studies)"
                if study is None and beyond:
                    detail += f"; {beyond} belong to studies past the first {MAX_STUDIES_AUDITED}, not named one by one"
                detail += destination + (f"; {ended}" if ended else "")
                if repeatable:  # one record per peer each 10 s; the next one written counts those left out
                    key = (action, peer.ae_title, host_of(peer.address))
                    what = f"refused C-{action.upper()} requests of this peer"
                    REPEATS.record(
                        key,
                        what,
                        sessions,
                        action,
                        peer,
                        outcome,
                        study_instance_uid=study,
                        instances=count,
                        detail=detail,
                    )
                elif action == "find" and query is not None and matches:  # a poll: once per study each 5 minutes
                    polled = (sessions, peer.ae_title, host_of(peer.address), query, study)  # per database too
                    entry = Entry(action, peer, outcome, study, count, detail)
                    REPEATED_QUERIES.add(polled, REPEATED_QUERY, sessions, entry)
                else:
                    record(
                        sessions,
                        action,
                        peer,
                        outcome,
                        study_instance_uid=study,
                        instances=count,
                        detail=detail,
                    )

    return wrapped


def _query_fingerprint(event: Any) -> str | None:
    """A digest of a C-FIND's identifier as the peer encoded it (the same query sent again has the same one); None
    where it cannot be read."""
    try:
        encoded = event.request.Identifier.getvalue()
    except Exception:  # noqa: BLE001 - no identifier: the request is recorded on its own
        return None
    return hashlib.sha256(encoded).hexdigest() if isinstance(encoded, bytes) else None
