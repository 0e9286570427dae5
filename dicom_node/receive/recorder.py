"""Recording received instances in the database off the acknowledgement path.

A C-STORE is answered success once its file is durable (fsynced, renamed into
place, folder fsynced) and its path is in this process' journal; a recorder
thread then records the instances in batches, one transaction per batch. The
journal is what makes "acknowledged" survive the recorder: a receiver process
that dies before recording leaves its journal behind, and whoever finds it
(``serve``'s supervisor at once, or start-up repair) indexes the files it names.

Layout under the storage directory::

    journal/<pid>-<n>.journal   paths of instances acknowledged by process <pid>, not yet all recorded

A segment holds at most :data:`SEGMENT_ENTRIES` paths and is deleted once each
of them is recorded, so recovery reads only what was in flight.

While the database cannot be written (locked past the busy timeout, its disk
full, its server gone), acknowledgements continue (the files are durable), the
recorder retries with a growing delay, and the log says so once, and once more
when recording resumes.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from db.ingest import InstanceRecord
from db.models import Instance, utcnow
from db.session import read_outside_transaction, transaction
from dicom_node.logs import log_event
from dicom_node.receive.pending_refusals import RefusalKeeper, record_kept_refusals, series_with_kept_refusals
from dicom_node.receive.storage import (
    UNIQUE_COLLISION_RETRIES,
    InstanceStore,
    StoreOutcome,
    UnindexableFile,
    index_file,
    quarantine_stored_file,
    record_copies_set_aside,
    record_stored_instances,
)

LOG = logging.getLogger(__name__)

JOURNAL_SUFFIX = ".journal"
SEGMENT_ENTRIES = 1000
SEGMENT_SECONDS = 10.0
"""A segment takes new entries this long at most: one that still exists a while after it was made names an entry
that has waited at least that while less this long (``/readyz``'s storage check, :class:`RecordingLag`), whether
or not images keep arriving. Without it, a segment taking a steady stream of images lived while its oldest entries
were long recorded."""
BATCH_INSTANCES = 500
"""Most instances recorded in one transaction."""
BATCH_GATHER_SECONDS = 0.1
"""After the first instance of a batch, wait this long for more: fewer, larger transactions take less CPU
(and GIL) away from the associations of this process. Recording 10 instances in one batch took 0.26 ms of
CPU each, one at a time 0.6-0.8 ms (SQLite, 2026-11-29); one association brings about 10 in 0.1 s. The
gathering ends early when someone waits for the queue to be recorded (:meth:`InstanceRecorder.wait_until_recorded`,
a sender's A-RELEASE-RQ): a release then waits for one transaction, not for the rest of the gathering time."""
LONGEST_RETRY_DELAY_SECONDS = 5.0
IDLE_SECONDS = 1.0
"""With nothing to record for this long, the recorder tries again to delete journal segments it could not."""


def journal_folder(store: InstanceStore) -> Path:
    return store.root / "journal"


class Journal:
    """This process' list of acknowledged instance paths that are not recorded yet, in segment files.

    Appends are plain ``write`` calls on an ``O_APPEND`` file, without fsync: a process
    that dies leaves them in the kernel's page cache for :func:`recover_journals`; a
    machine that loses power has start-up repair, which indexes every unrecorded file.
    """

    def __init__(self, folder: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self._lock = threading.Lock()
        self._descriptor: int | None = None
        self._segment = -1
        self._entries_in_segment = 0
        self._segment_opened = 0.0
        self._outstanding: dict[int, int] = {}  # segment -> paths not yet recorded
        self._undeleted: set[int] = set()  # segments all recorded whose file could not be deleted yet
        self._deletion_failing = False

    def _path(self, segment: int) -> Path:
        return self.folder / f"{os.getpid()}-{segment}{JOURNAL_SUFFIX}"

    def append(self, path: str) -> int:
        """Note ``path`` as acknowledged-to-be; returns the entry's segment for :meth:`done`."""
        line = (path + "\n").encode("utf-8")
        with self._lock:
            if (
                self._descriptor is None
                or self._entries_in_segment >= SEGMENT_ENTRIES
                or self.clock() - self._segment_opened >= SEGMENT_SECONDS
            ):
                self._open_next_segment()
            assert self._descriptor is not None
            os.write(self._descriptor, line)
            self._entries_in_segment += 1
            self._outstanding[self._segment] = self._outstanding.get(self._segment, 0) + 1
            return self._segment

    def _open_next_segment(self) -> None:
        self._close_segment()
        self._segment += 1
        self._entries_in_segment = 0
        self._segment_opened = self.clock()
        self._descriptor = os.open(self._path(self._segment), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def _close_segment(self) -> None:
        if self._descriptor is not None:
            descriptor, self._descriptor = self._descriptor, None
            with suppress(OSError):  # Linux frees the descriptor even when close reports an error
                os.close(descriptor)

    def done(self, segments: Iterable[int]) -> None:
        """The entries (one per item of ``segments``) are recorded; delete segments left with none. Never raises:
        a segment that cannot be deleted now is tried again (:meth:`delete_finished`)."""
        with self._lock:
            for segment in segments:
                self._outstanding[segment] -= 1
            for segment in [s for s, n in self._outstanding.items() if n <= 0]:
                del self._outstanding[segment]
                if segment == self._segment:
                    self._close_segment()
                self._undeleted.add(segment)
        self.delete_finished()

    def delete_finished(self) -> None:
        """Delete the segments whose entries are all recorded. One that cannot be deleted (its folder briefly
        read-only, an I/O error) stays and is tried again at the next call: completion leaves the series it names
        alone while it exists, and start-up recovery would only find its files recorded already."""
        with self._lock:
            for segment in sorted(self._undeleted):
                try:
                    self._path(segment).unlink(missing_ok=True)
                except OSError as exc:
                    if not self._deletion_failing:
                        log_event(
                            LOG,
                            logging.WARNING,
                            "recorder.journal_not_deleted",
                            journal=str(self._path(segment)),
                            reason=f"the journal file {self._path(segment)} cannot be deleted "
                            f"({(exc.strerror or 'an error of the operating system').lower()}); the instances it "
                            "names are recorded, and it is tried again "
                            "every second; until then their series are not completed",
                        )
                    self._deletion_failing = True
                    return
                self._undeleted.discard(segment)
            if self._deletion_failing:
                log_event(
                    LOG, logging.INFO, "recorder.journal_deleted", note="the journal files could be deleted again"
                )
                self._deletion_failing = False


@dataclass(frozen=True)
class _Pending:
    record: InstanceRecord
    segment: int


_STOP = object()
_FLUSH = object()
"""Queued by a waiter: record what is queued now, without gathering more."""


class InstanceRecorder:
    """A thread that records acknowledged instances in batches; see the module docstring."""

    def __init__(self, store: InstanceStore, sessions: sessionmaker[Session]) -> None:
        self.store = store
        self.sessions = sessions
        self.journal = Journal(journal_folder(store))
        self.refusals = RefusalKeeper(journal_folder(store))
        """Refusals the database would not take when they happened (a full disk), recorded here once it does."""
        self._queue: queue.Queue[object] = queue.Queue()
        self._submitted = 0  # instances handed to submit(), ever
        self._finished = 0  # of those, recorded (or refused by the database and quarantined), in order
        self._idle = threading.Condition()
        self._stopping = threading.Event()
        self._give_up_at = float("inf")
        self._waiting_since: float | None = None  # the database could not be written since then
        self._thread = threading.Thread(target=self._run, name="instance-recorder", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, record: InstanceRecord, segment: int) -> None:
        """Record ``record`` (its path already in the journal, at ``segment``) as soon as the database allows."""
        with self._idle:
            self._submitted += 1
        self._queue.put(_Pending(record, segment))

    @property
    def unrecorded(self) -> int:
        """Instances acknowledged and not yet recorded."""
        return self._submitted - self._finished

    def wait_until_recorded(self, timeout: float | None = None) -> bool:
        """Block until every instance whose :meth:`submit` returned before this call is recorded.

        False if ``timeout`` ran out first. The queue is recorded in order, so waiting until as many
        instances have finished as had been submitted is enough; instances submitted meanwhile (other
        associations of this process still sending) are not waited for. The batch being gathered is
        recorded at once instead of after :data:`BATCH_GATHER_SECONDS`.
        """
        with self._idle:
            target = self._submitted
            if self._finished >= target:
                return True
        self._queue.put(_FLUSH)
        with self._idle:
            return self._idle.wait_for(lambda: self._finished >= target, timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Record what is queued (for up to ``timeout`` s while the database refuses), then end the thread.

        Whatever is still unrecorded stays in the journal, for start-up repair.
        """
        self._give_up_at = time.monotonic() + timeout
        self._stopping.set()
        self._queue.put(_STOP)
        self._thread.join(timeout + 5)
        self.refusals.record(self.sessions)
        self.refusals.close()  # what is still kept stays in its file, for the next start
        if self.unrecorded:
            log_event(
                LOG,
                logging.WARNING,
                "recorder.stopped_with_unrecorded",
                instances=self.unrecorded,
                hint="their files are stored; the next start indexes them",
            )

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                self.journal.delete_finished()
                self.refusals.record(self.sessions)
                continue
            if first is _STOP:
                return
            if first is _FLUSH:
                continue  # what it asked for was recorded already
            batch: list[_Pending] = [first]  # type: ignore[list-item]
            stop_after = False
            gather_until = time.monotonic() + BATCH_GATHER_SECONDS
            while len(batch) < BATCH_INSTANCES:
                try:
                    item = self._queue.get(timeout=max(gather_until - time.monotonic(), 0))
                except queue.Empty:
                    break
                if item is _STOP:
                    stop_after = True
                    break
                if item is _FLUSH:
                    break
                batch.append(item)  # type: ignore[arg-type]
            if not self._record_surviving(batch):
                return  # stopping while the database refuses: the journal keeps the rest
            if self.refusals.waiting:
                self.refusals.record(self.sessions)
            if stop_after:
                return

    def _record_surviving(self, batch: list[_Pending]) -> bool:
        """:meth:`_record`, tried again each second after an error it does not expect: the thread must outlive any
        one error, or this process would go on acknowledging images it never records."""
        while True:
            try:
                return self._record(batch)
            except Exception as exc:  # logged with its trace; the batch is not lost
                if self._stopping.is_set() and time.monotonic() >= self._give_up_at:
                    return False
                LOG.error(
                    "recorder.failed",
                    exc_info=exc,
                    extra={
                        "event_fields": {
                            "instances": len(batch),
                            "reason": f"{len(batch)} acknowledged instance(s) could not be recorded because of an "
                            "unexpected error (details follow); trying again in a second",
                        }
                    },
                )
                time.sleep(1.0)

    def _record(self, batch: list[_Pending]) -> bool:
        """Record ``batch`` in one transaction, retrying while the database refuses; False if given up."""
        delay = 0.05
        collisions = 0
        while True:
            try:
                outcomes = self._commit(batch)
                break
            except StaleDataError:  # another process changed the series' job meanwhile: record it again
                time.sleep(0.01)
                continue
            except OperationalError as exc:
                self._note_waiting(exc, len(batch))
                if self._stopping.is_set() and time.monotonic() >= self._give_up_at:
                    return False
                time.sleep(delay)
                delay = min(delay * 2, LONGEST_RETRY_DELAY_SECONDS)
            except Exception as exc:  # one instance's values the database refuses
                if isinstance(exc, IntegrityError) and collisions < UNIQUE_COLLISION_RETRIES:
                    # Another receiving process recorded the same study, series or instance at the same moment
                    # (PostgreSQL: its row was not visible when this transaction looked): read again, it is there.
                    collisions += 1
                    time.sleep(0.01 * collisions)
                    continue
                if len(batch) > 1:
                    return all(self._record([pending]) for pending in batch)
                LOG.exception(
                    "recorder.database_refused_instance",
                    extra={"event_fields": {"sop_instance_uid": batch[0].record.sop_instance_uid}},
                )
                self._refuse(batch[0])
                outcomes = []
                break
        if self._waiting_since is not None:
            waited = time.monotonic() - self._waiting_since
            log_event(
                LOG,
                logging.INFO,
                "recorder.resumed",
                waited_seconds=round(waited, 1),
                note="the database accepts writes again; waiting instances are being recorded",
            )
            self._waiting_since = None
        for pending, outcome in outcomes:
            with suppress(Exception):  # recorded: a log line that fails must not record it again
                _log_outcome(pending.record, outcome)
        self.journal.done(pending.segment for pending in batch)
        with self._idle:
            self._finished += len(batch)
            self._idle.notify_all()
        return True

    def _commit(self, batch: list[_Pending]) -> list[tuple[_Pending, StoreOutcome]]:
        # The earliest a series' quiet period may start: it starts when the transaction has written the instances,
        # after any wait for another process' lock (db.ingest.record_new_instances reads the clock then).
        counted_at = utcnow()
        with transaction(self.sessions) as session:
            outcomes = record_stored_instances(session, self.store, [p.record for p in batch], counted_at)
        return list(zip(batch, outcomes, strict=True))

    def _note_waiting(self, error: OperationalError, batch_size: int) -> None:
        if self._waiting_since is not None:
            return
        self._waiting_since = time.monotonic()
        message = str(error.orig if error.orig is not None else error).strip().splitlines()[0]
        log_event(
            LOG,
            logging.WARNING,
            "recorder.waiting",
            reason=f"the database cannot be written ({message})",
            instances=max(batch_size, self.unrecorded),
            note="acknowledged instances are stored on disk and are recorded once the database accepts "
            "writes; C-STOREs are still answered",
        )

    def _refuse(self, pending: _Pending) -> None:
        """The database refuses this instance's values: its file goes to quarantine, with a rejection row; but a
        file another process has recorded at this path meanwhile (the same SOP Instance UID) stays where it is."""
        record = pending.record
        try:
            recorded = read_outside_transaction(self.sessions, select(Instance.id).where(Instance.path == record.path))
        except Exception:  # the database cannot be read: the file stays; start-up repair looks at it again
            LOG.exception("recorder.quarantine_failed")
            return
        if recorded is not None:
            log_event(
                LOG,
                logging.INFO,
                "instance.duplicate",
                sop_instance_uid=record.sop_instance_uid,
                calling_ae=record.calling_ae_title,
                note="another receiving process recorded this instance at the same moment; kept once",
            )
            return
        self._refuse_file(pending)

    def _refuse_file(self, pending: _Pending) -> None:
        """Quarantine the file of an instance the database refuses, with a rejection row."""
        path = Path(pending.record.path)
        if path.exists():
            try:
                quarantine_stored_file(
                    path,
                    UnindexableFile("the database refused its values (see the log)"),
                    self.store,
                    self.sessions,
                    when="received",
                    series_instance_uid=pending.record.series.series_instance_uid,
                )
            except Exception:  # start-up repair sees the file again
                LOG.exception("recorder.quarantine_failed")


def _log_outcome(record: InstanceRecord, stored: StoreOutcome) -> None:
    outcome = stored.recorded
    if stored.set_aside is not None:
        log_event(
            LOG,
            logging.WARNING,
            "instance.set_aside",
            sop_instance_uid=record.sop_instance_uid,
            series_instance_uid=record.series.series_instance_uid,
            calling_ae=record.calling_ae_title,
            quarantine=str(stored.set_aside),
            note=f"this SOP Instance UID is already stored in series {stored.path.parent.name}; the copy was "
            "acknowledged, then set aside, and the series it names is processed without it (marked partial)",
        )
        return
    if not outcome.stored:
        log_event(
            LOG,
            logging.INFO,
            "instance.duplicate",
            sop_instance_uid=record.sop_instance_uid,
            calling_ae=record.calling_ae_title,
            note="already stored; kept once",
        )
        return
    if outcome.series_created:
        log_event(
            LOG,
            logging.INFO,
            "series.receiving",
            series_instance_uid=record.series.series_instance_uid,
            modality=record.series.modality,
            calling_ae=record.calling_ae_title,
        )
    if outcome.series_reopened:
        log_event(
            LOG,
            logging.INFO,
            "series.reopened",
            series_instance_uid=record.series.series_instance_uid,
            reason=outcome.reopened_because,
        )


def recover_journals(store: InstanceStore, sessions: sessionmaker[Session], pid: int | None = None) -> int:
    """Index the files named in the journals of a receiver process that is gone (``pid``), or of all.

    Call it only for processes that no longer run (their recorder is gone too):
    ``serve``'s supervisor for a receiver that died, start-up for every journal.
    Returns how many files were indexed; the journals are deleted.
    """
    folder = journal_folder(store)
    if not folder.is_dir():
        return 0
    pattern = f"{pid}-*{JOURNAL_SUFFIX}" if pid is not None else f"*{JOURNAL_SUFFIX}"
    indexed = 0
    for segment in sorted(folder.glob(pattern)):
        paths = [line for line in segment.read_text(encoding="utf-8", errors="replace").splitlines() if line]
        for path in dict.fromkeys(paths):
            if not Path(path).is_file():  # never renamed into place, or a copy set aside in quarantine
                indexed += record_copies_set_aside(Path(path), store, sessions)
            elif _needs_indexing(sessions, Path(path)):
                indexed += index_file(Path(path), store, sessions, found_by="journal recovery") == "indexed"
        segment.unlink(missing_ok=True)
    record_kept_refusals(folder, sessions, pid)  # refused by it, and not recorded while it lived
    if indexed:
        log_event(
            LOG,
            logging.WARNING,
            "recorder.recovered",
            process=pid if pid is not None else "all",
            instances_indexed=indexed,
            note="files acknowledged by a receiver that stopped before recording them",
        )
    return indexed


def series_waiting_to_be_recorded(storage_directory: Path) -> set[str]:
    """Series UIDs with an instance acknowledged by some receiving process and not yet recorded, or refused and its
    refusal not yet recorded (:mod:`dicom_node.receive.pending_refusals`).

    Read from the journals (an instance stays in its journal until its transaction has
    committed), so completion can leave these series alone: their ``last_received_at``
    does not yet show their newest instances, nor their refusals what they lack.
    """
    return {Path(line).parent.name for line in _journaled(storage_directory)} | series_with_kept_refusals(
        storage_directory
    )


def instances_waiting_to_be_recorded(storage_directory: Path) -> int:
    """How many acknowledged instances the receiving processes' journals still name: at most this many are not
    recorded in the database yet (a journal segment is deleted once all it names are recorded)."""
    return len(_journaled(storage_directory))


def _journaled(storage_directory: Path) -> set[str]:
    """The paths every journal segment under ``storage_directory`` names now."""
    folder = storage_directory / "journal"
    paths: set[str] = set()
    try:
        segments = list(folder.glob(f"*{JOURNAL_SUFFIX}"))
    except OSError:
        return paths
    for segment in segments:
        try:
            text = segment.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue  # deleted meanwhile: all of it recorded
        paths.update(line for line in text.splitlines() if line)
    return paths


def _needs_indexing(sessions: sessionmaker[Session], path: Path) -> bool:
    """Whether a journaled file is on disk and not recorded at this path (a copy under another series counts)."""
    if not path.is_file():
        return False  # never renamed into place: it was not acknowledged
    with sessions() as session:
        recorded = session.scalar(select(Instance.path).where(Instance.sop_instance_uid == path.stem))
    return recorded != str(path)
