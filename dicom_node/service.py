"""`dicom-node serve`: the SCP (store, query/retrieve), the series watcher, the inference worker processes, the dispatcher and retention."""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from db import jobs
from db import session as db_session
from db.models import Instance, Job
from db.session import DatabaseBusy, retry_when_locked, transaction
from dicom_node import audit, security
from dicom_node.admission import models_over_memory
from dicom_node.config import Settings, hide_password, open_peer_warnings
from dicom_node.dispatch import Dispatcher
from dicom_node.logs import log_event
from dicom_node.periodic import PeriodicTask, locked_database_words
from dicom_node.process_exit import how_a_process_ended
from dicom_node.receive.backfill import fill_instance_identities
from dicom_node.receive.moved_storage import adopt_moved_storage
from dicom_node.receive.name_keys import NameKeying, key_recorded_names
from dicom_node.receive.processes import Receiving, start_receiving
from dicom_node.receive.storage import InstanceStore, repair
from dicom_node.retention import (
    RetentionTask,
    delete_purged_leftovers,
    put_back_set_aside_files,
    recorded_before_start,
)
from dicom_node.security import CertificateWatch, tls_files
from dicom_node.stop_signal import wait_until_stopped
from dicom_node.storage_lock import StorageLock, StorageRefused, database_identity, describe_database
from dicom_node.wal_checkpoint import WalCheckpoint
from dicom_node.watcher import SeriesWatcher

if TYPE_CHECKING:
    from dicom_node.console.app import ConsoleServer
from dicom_node.worker_process import run_worker_process
from dicom_node.worker_watch import (
    IdlePulse,
    LeaseSweep,
    OverdueLease,
    first_beat_limit,
    idle_silence_limit,
    log_worker_death,
    requeue_jobs_of_previous_run,
    worker_id,
)

LOG = logging.getLogger(__name__)


class WorkerSupervisor:
    """Keeps ``inference.workers`` worker processes running; restarts one that dies, and ends one that hangs.

    When a worker dies, the job it held (PROCESSING, claimed by its "host:pid") is
    queued again at once, or FAILED once ``inference.max_worker_deaths`` workers
    died on it (:func:`db.jobs.worker_died`), so one poison series cannot block the queue.

    Every ``inference.lease_renew_seconds`` it also looks for hung workers: a job whose lease has run out (its
    worker frozen, or gone with its host) is queued again, and a worker of its own holding it is ended first
    (a stopped process too); a job processing past ``inference.job_timeout_minutes`` (a worker stuck while its
    lease is still renewed) is taken from its worker, which is ended when it is one of its own. Both count like
    a death, so a series that hangs every worker ends FAILED.

    A worker holding no job renews no lease: each one counts beats in memory shared with this supervisor
    (:class:`~dicom_node.worker_watch.IdlePulse`), read every check; one whose beats stop for
    :func:`~dicom_node.worker_watch.idle_silence_limit` (frozen, or stuck in a database query) is ended and replaced. A
    worker beats while it starts too: one that shows no sign of life within
    :func:`~dicom_node.worker_watch.first_beat_limit` of its start (frozen before it was ready) is ended the same way.
    """

    CHECK_SECONDS = 0.5
    RESTART_DELAY_SECONDS = 5.0  # at least this long between two starts of one worker slot
    LONGEST_RESTART_DELAY_SECONDS = 300.0  # a worker that keeps dying before it is ready waits twice as long each time
    END_WAIT_SECONDS = 10.0  # how long an ended worker is waited for before a new one takes its slot anyway

    def __init__(self, settings: Settings, sessions: sessionmaker[Session] | None = None) -> None:
        self.settings = settings
        self.sessions = sessions
        self._context = multiprocessing.get_context("spawn")
        self._processes: list[multiprocessing.process.BaseProcess] = []
        self._started_at: list[float] = []
        self._failed_starts: list[int] = []  # per slot: its workers that died before they were ready, in a row
        self._slot_pulses: dict[int, IdlePulse] = {}  # slot -> the pulse of its latest worker (kept after its death)
        self._handled: set[int | None] = set()  # pids whose death (or ending) was recorded
        self._leases = LeaseSweep(settings, sessions) if sessions is not None else None
        self._claims_seen: dict[tuple[int, int, str], float] = {}  # (job, claim number, worker) -> first seen
        self._ended: set[str] = set()  # ids ("host:pid") of the workers this supervisor ended
        self._pulses: dict[int | None, IdlePulse] = {}  # pid -> the worker's sign of life while idle
        self._spawned_at: dict[int | None, float] = {}  # pid -> time.monotonic() when it was started
        self._beats_seen: dict[int | None, tuple[int, float]] = {}  # pid -> (its beats, time.monotonic() then)
        self._next_hang_check = 0.0
        self._last_check_failure: str | None = None  # the last look's error, logged with its trace once
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="worker-supervisor", daemon=True)

    def start(self) -> None:
        self._processes = [self._spawn(n) for n in range(self.settings.inference.workers)]
        self._started_at = [time.monotonic()] * len(self._processes)
        self._failed_starts = [0] * len(self._processes)
        self._thread.start()

    def _spawn(self, number: int) -> multiprocessing.process.BaseProcess:
        pulse = IdlePulse(self._context)
        process = self._context.Process(
            target=run_worker_process, args=(self.settings, os.getpid(), None, pulse), name=f"worker-{number}"
        )
        process.start()
        self._pulses[process.pid] = pulse
        self._slot_pulses[number] = pulse
        self._spawned_at[process.pid] = time.monotonic()
        log_event(LOG, logging.INFO, "worker.started", worker=number, pid=process.pid)
        return process

    def _supervise(self) -> None:
        while not self._stop.wait(self.CHECK_SECONDS):
            if time.monotonic() >= self._next_hang_check:
                self._next_hang_check = time.monotonic() + self.settings.inference.lease_renew_seconds
                self.check_hung_workers()
            self.end_silent_idle_workers()
            for number, process in enumerate(self._processes):
                if self._stop.is_set() or (process.is_alive() and process.pid not in self._handled):
                    if self._is_ready(number):
                        self._failed_starts[number] = 0
                    continue  # a worker ended but not gone (waiting on a disk) is replaced all the same
                if process.pid not in self._handled:
                    self._handled.add(process.pid)
                    self._record_death(number, process)
                if time.monotonic() - self._started_at[number] >= self._restart_delay(number):
                    self._processes[number] = self._spawn(number)
                    self._started_at[number] = time.monotonic()

    def _is_ready(self, number: int) -> bool:
        """Whether the latest worker of slot ``number`` said it is ready (it may have died since)."""
        pulse = self._slot_pulses.get(number)
        return pulse is not None and pulse.ready

    def _restart_delay(self, number: int) -> float:
        """How long after its last start a worker slot is started again: twice as long for each of its workers in a
        row that died before it was ready (a model that cannot load, memory too small), up to five minutes."""
        failed = self._failed_starts[number]
        return min(self.RESTART_DELAY_SECONDS * 2 ** max(failed - 1, 0), self.LONGEST_RESTART_DELAY_SECONDS)

    def _record_death(self, number: int, process: multiprocessing.process.BaseProcess) -> None:
        """Log a worker's death, count it against its slot when it died before it was ready, and release its job."""
        reason = how_a_process_ended(process.exitcode)
        if self._is_ready(number):
            self._failed_starts[number] = 0  # it was ready, if only for a moment: its slot starts again at once
        else:
            self._failed_starts[number] += 1
            failed = self._failed_starts[number]
            reason += (
                f"; it died before it was ready (while starting or loading its models), {failed} time(s) in a row: "
                f"the next one starts {self._restart_delay(number):.0f} s after this one did, and the node counts no "
                "worker up in this slot until one is ready"
            )
        log_event(
            LOG,
            logging.ERROR,
            "worker.died",
            worker=number,
            pid=process.pid,
            exit_code=process.exitcode,
            reason=reason,
        )
        self._release_jobs_of(process.pid)

    def _release_jobs_of(self, pid: int | None) -> None:
        """Queue again (or fail, at the crash limit) the job the dead worker ``pid`` held."""
        if self.sessions is None or pid is None:
            return  # the next worker to start finds the job (requeue_abandoned_jobs)
        try:
            with transaction(self.sessions) as session:
                for job in jobs.jobs_of_worker(session, worker_id(pid=pid)):
                    log_worker_death(job, jobs.worker_died(session, job, self.settings.inference.max_worker_deaths))
        except Exception:  # the restarted worker's own check takes over
            LOG.exception("worker.release_failed", extra={"event_fields": {"pid": pid}})

    # --- hung workers -------------------------------------------------------------------------

    def end_silent_idle_workers(self) -> None:
        """End (and replace) each worker that has held no job and shown no sign of life for the idle limit, or
        shown none at all within the first-beat limit of its start.

        A job it claimed just before it froze (its claim recorded, not yet marked held in memory) is released
        as a dead worker's would be.
        """
        now = time.monotonic()
        running = self._local_workers()
        self._pulses = {pid: pulse for pid, pulse in self._pulses.items() if worker_id(pid=pid) in running}
        self._spawned_at = {pid: at for pid, at in self._spawned_at.items() if pid in self._pulses}
        self._beats_seen = {pid: seen for pid, seen in self._beats_seen.items() if pid in self._pulses}
        for number, process in running.values():
            pulse = self._pulses.get(process.pid)
            if pulse is None:
                continue
            beats, holding = pulse.read()
            seen, since = self._beats_seen.get(process.pid, (0, self._spawned_at.get(process.pid, now)))
            if holding or beats != seen:  # busy (its lease shows it alive), or alive
                self._beats_seen[process.pid] = (beats, now)
                continue
            why = self._silence(beats, now - since)
            if why is not None:
                self._end(number, process, why)
                self._release_jobs_of(process.pid)

    def _silence(self, beats: int, silent_for: float) -> str | None:
        """Why a worker silent for ``silent_for`` s (``beats`` so far: 0 if it never beat) is ended, or None."""
        if beats == 0:
            limit, start = first_beat_limit(self.settings), self.settings.inference.worker_start_seconds
            if silent_for < limit:
                return None
            return (
                f"it showed no sign of life in the {silent_for:.0f} s since it was started (frozen before it was "
                f"ready; the limit is {limit:g} s: the idle limit, set by inference.lease_seconds and "
                f"database.busy_timeout_seconds, plus inference.worker_start_seconds, {start:g} s, to start)"
            )
        limit = idle_silence_limit(self.settings)
        if silent_for < limit:
            return None
        return (
            f"it showed no sign of life for {silent_for:.0f} s while it held no job (frozen, or stuck in a "
            f"database query; the limit is {limit:g} s, set by inference.lease_seconds and "
            "database.busy_timeout_seconds)"
        )

    def check_hung_workers(self) -> None:
        """Take jobs from workers that ran past the time limit or stopped renewing their lease (see the class).

        A locked database waits for the next check (said once, in a WARNING); any other failure is logged with its
        trace, and the next check runs as usual.
        """
        if self.sessions is None or self._leases is None:
            return
        limit = self.settings.inference.lease_renew_seconds * 2
        try:
            self._take_jobs_over_time()
            retry_when_locked(
                lambda: self._leases.sweep(self._end_frozen) if self._leases else 0,
                waiting="serve queuing again the jobs whose lease ran out",
                limit_seconds=limit,
            )
        except DatabaseBusy:
            return  # the next check looks again (its wait was logged as database.busy)
        except Exception as exc:  # noqa: BLE001 - the supervisor must keep restarting dead workers: logged below
            self._hang_check_failed(exc, limit / 2)
            return
        self._last_check_failure = None

    def _hang_check_failed(self, exc: Exception, every: float) -> None:
        """Log a failed look for hung workers once until a look succeeds: a database locked by another process as
        a WARNING in words, any other error with its trace."""
        locked = locked_database_words(exc)
        failure = "locked" if locked else str(exc)[:200]
        if failure != self._last_check_failure:
            again = f"the look for hung workers is tried again every {every:g} s"
            if locked:
                fields = {"reason": f"{locked}; {again}"}
                LOG.warning("worker.hang_check_failed", extra={"event_fields": fields})
            else:
                reason = f"the look for hung workers failed; {again}"
                LOG.error("worker.hang_check_failed", exc_info=exc, extra={"event_fields": {"reason": reason}})
        self._last_check_failure = failure

    def _local_workers(self) -> dict[str, tuple[int, multiprocessing.process.BaseProcess]]:
        """This node's running workers by the id they claim jobs under ("host:pid"), with their slot."""
        return {
            worker_id(pid=p.pid): (number, p)
            for number, p in enumerate(self._processes)
            if p.pid is not None and p.pid not in self._handled and p.is_alive()
        }

    def _end_frozen(self, lease: OverdueLease) -> str | None:
        """End this node's worker that holds ``lease`` (it stopped renewing it); "serve" if it was one, else None."""
        if lease.claimed_by in self._ended:
            return "serve"  # ended at a look whose record waited for the database
        local = self._local_workers().get(lease.claimed_by or "")
        if local is None:
            return None
        why = f"it stopped renewing its lease on job {lease.job_id} (frozen or hung in stage {lease.stage or 'start'})"
        self._end(*local, why)
        return "serve"

    def _take_jobs_over_time(self) -> None:
        """Jobs processing longer than ``inference.job_timeout_minutes`` (by this process' steady clock, from when
        it first saw the claim): this node's worker is ended, and the job queued again or failed."""
        minutes = self.settings.inference.job_timeout_minutes
        if minutes is None or self.sessions is None:
            return
        now = time.monotonic()
        with self.sessions() as session:
            claims = [(j.id, j.attempts, j.claimed_by or "") for j in jobs.jobs_in_state(session, [jobs.S.PROCESSING])]
        self._claims_seen = {claim: self._claims_seen.get(claim, now) for claim in claims}
        for claim, first_seen in list(self._claims_seen.items()):
            if now - first_seen >= minutes * 60:
                self._take_over_time(*claim, minutes)
                del self._claims_seen[claim]

    def _take_over_time(self, job_id: int, attempt: int, worker: str, minutes: float) -> None:
        """End this node's ``worker`` (if it is one) and record that job ``job_id`` ran past its time limit."""
        local = self._local_workers().get(worker)
        done = (
            "serve took the job from that worker (one serve did not start: it gives the job up itself at its own limit)"
        )
        if local is not None:
            limit = f"{minutes:g} min (inference.job_timeout_minutes)"
            self._end(*local, f"job {job_id} ran past the time limit of {limit}")
            done = "serve ended the worker"
        retry_when_locked(
            functools.partial(self._record_over_time, job_id, attempt, worker, minutes, done),
            waiting=f"serve taking job {job_id} from worker {worker}, past its time limit",
            limit_seconds=self.settings.inference.lease_renew_seconds * 2,
        )

    def _record_over_time(self, job_id: int, attempt: int, worker: str, minutes: float, done: str) -> None:
        assert self.sessions is not None
        with transaction(self.sessions) as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is not None and jobs.holds(job, worker, attempt):
                deaths = self.settings.inference.max_worker_deaths
                log_worker_death(job, jobs.ran_too_long(session, job, deaths, minutes, done=done))

    def _end(self, number: int, process: multiprocessing.process.BaseProcess, why: str) -> None:
        """Kill a hung worker (SIGKILL also ends a stopped one); its slot gets a new worker at the next look."""
        self._handled.add(process.pid)  # its job is recorded by whoever ended it, not as a death
        self._ended.add(worker_id(pid=process.pid))
        log_event(
            LOG,
            logging.ERROR,
            "worker.ended",
            worker=number,
            pid=process.pid,
            reason=f"worker {number} (process {process.pid}) was ended because {why}; a new worker takes its place",
        )
        process.kill()
        process.join(timeout=self.END_WAIT_SECONDS)
        if process.is_alive():
            log_event(
                LOG,
                logging.ERROR,
                "worker.not_ended",
                worker=number,
                pid=process.pid,
                reason=f"worker process {process.pid} was still running {self.END_WAIT_SECONDS:.0f} s after it was "
                "killed (it may be waiting on a disk or network file system); a new worker takes its slot anyway",
            )

    def alive_count(self) -> int:
        """How many of the local worker processes are up now: running, and either ready or the first try of their
        slot since the last ready one (a slot whose workers keep dying while they start counts none)."""
        return sum(
            process.is_alive()
            and process.pid not in self._handled
            and (self._is_ready(number) or self._failed_starts[number] == 0)
            for number, process in enumerate(self._processes)
        )

    def stop(self) -> None:
        """Ask every worker to stop; one still busy after 30 s is killed and its job queued again (not a death)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.END_WAIT_SECONDS + 5)  # a hang check in progress ends first
        for process in self._processes:
            process.terminate()
        for process in self._processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join(timeout=10)
                self._requeue_jobs_of(process.pid)

    def _requeue_jobs_of(self, pid: int | None) -> None:
        if self.sessions is None or pid is None:
            return
        with transaction(self.sessions) as session:
            for job in jobs.jobs_of_worker(session, worker_id(pid=pid)):
                jobs.worker_stopped(session, job)


@dataclass
class RunningNode:
    server: Receiving
    watcher: SeriesWatcher
    workers: WorkerSupervisor
    dispatcher: Dispatcher
    sessions: sessionmaker[Session]
    retention: RetentionTask
    console: ConsoleServer | None = None
    certificates: CertificateWatch | None = None
    node_lock: db_session.NodeLock | None = None
    storage_lock: StorageLock | None = None
    checkpoint: WalCheckpoint | None = None  # SQLite only
    name_keys: NameKeying | None = None

    def stop(self) -> None:
        if self.console is not None:
            self.console.stop()
        self.server.shutdown()
        audit.flush_repeated(self.sessions)  # counts of repeated requests (C-ECHO, refusals) not yet written
        self.watcher.stop()
        self.workers.stop()
        self.dispatcher.stop()
        self.retention.stop()
        if self.name_keys is not None:
            self.name_keys.stop()
        if self.certificates is not None:
            self.certificates.stop()
        if self.checkpoint is not None:
            self.checkpoint.stop()
        if self.storage_lock is not None:  # first: a node waiting for the database lock then finds both free
            self.storage_lock.release()
        if self.node_lock is not None:
            self.node_lock.release()
        log_event(LOG, logging.INFO, "node.stopped")


class NodeLockLost(Exception):
    """``serve`` stopped because it lost its lock on the database; the message says why, in words."""


class DatabaseUnavailable(Exception):
    """The database cannot be opened, reached or used; the message says why in words, never with the password."""


class RefusedAsConfigured(Exception):
    """``serve`` cannot start as configured, and starting it again would not change that (a storage folder of
    another database, a database of a newer version): `serve` exits 2, as on a configuration error. The message says
    why in words."""


class ConsoleNotStarted(Exception):
    """The console or metrics listener cannot listen now (its port in use, its host not an address of this machine
    yet): ``serve`` exits 1, so a supervisor tries again. The message says why, naming the setting."""


class StorageNotFound(Exception):
    """The storage folder holds none of the images the database records and does not record its database (a file
    system not mounted yet, a wrong path): ``serve`` exits 1, so a supervisor tries again once it is mounted."""


class StoppedWhileStarting(Exception):
    """``serve`` was asked to stop while it waited to start (for another node's lock on the database)."""


def open_database(settings: Settings) -> sessionmaker[Session]:
    """Migrate the schema to the newest revision and return a session factory.

    Raises
    ------
    DatabaseUnavailable
        If the database URL is not one, its driver is missing, or the database cannot be reached or read.
    RefusedAsConfigured
        If its schema is of a newer version of dicom-node, or cannot be upgraded.
    OSError
        If the SQLite file's folder cannot be made.
    """
    from alembic.util.exc import CommandError
    from sqlalchemy.exc import SQLAlchemyError

    url = settings.database_url
    try:
        return db_session.open_database(url, settings.database.busy_timeout_seconds)
    except CommandError as exc:  # its schema is of a newer version, or cannot be upgraded: a restart cannot help
        raise RefusedAsConfigured(describe_database_error(exc, url)) from None
    except (SQLAlchemyError, ImportError) as exc:
        raise DatabaseUnavailable(describe_database_error(exc, url)) from None


def describe_database_error(exc: BaseException, url: str) -> str:
    """One sentence an administrator understands for a failure to open or use the database at ``url``.

    It names the file, or the host and port, and the cause; never the password, the SQL, or a Python class.
    """
    from alembic.util.exc import CommandError
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return (
            f"database.url {hide_password(url)!r} is not a database URL (for example postgresql+psycopg://user@host/db)"
        )
    backend = parsed.get_backend_name()
    if isinstance(exc, NoSuchModuleError):
        return (
            f"database.url names a kind of database dicom-node cannot use ({parsed.drivername}): use "
            "postgresql+psycopg://user@host/db, or leave database.url out for the SQLite file in storage.directory"
        )
    if isinstance(exc, ImportError):
        hint = (
            "; write postgresql+psycopg:// to use the psycopg driver that comes with dicom-node"
            if backend == "postgresql" and parsed.get_driver_name() != "psycopg"
            else "; dicom-node works with PostgreSQL (postgresql+psycopg://user@host/db) or its own SQLite file"
        )
        driver = exc.name or "module"
        return f"database.url: the database driver {driver} for {parsed.drivername} URLs is not installed{hint}"
    if backend == "sqlite":
        place = f"the database file {parsed.database}"
    else:
        port = parsed.port or {"postgresql": 5432, "mysql": 3306}.get(backend)
        place = f"the database at {parsed.host or 'localhost'}{f':{port}' if port else ''}"
    if isinstance(exc, CommandError):
        revision = re.search(r"revision identified by '([^']+)'", str(exc))
        if revision:
            return (
                f"{place} was written by a newer version of dicom-node (its schema revision {revision.group(1)} "
                "is unknown to this version): run the newer version, or restore a backup"
            )
        return f"the schema of {place} cannot be upgraded: {hide_password(_first_line(exc))}"
    if not isinstance(exc, DBAPIError):
        return f"cannot use {place}: {hide_password(_first_line(exc))}"
    cause = str(exc.orig if exc.orig is not None else exc)
    text = cause.lower()
    if "no such table" in text or ("relation" in text and "does not exist" in text):
        return f"{place} holds no dicom-node tables: has `dicom-node serve` run with this configuration?"
    if "no such column" in text or ("column" in text and "does not exist" in text):
        return (
            f"{place} was made by another version of dicom-node (a column is missing): "
            "start `dicom-node serve` of this version once to upgrade it"
        )
    if backend == "sqlite":
        return _describe_sqlite_error(Path(parsed.database or ""), text, cause)
    if "connection refused" in text:
        return f"cannot reach {place} (connection refused: is the database server running there?)"
    if any(
        words in text
        for words in ("translate host name", "name or service not known", "name resolution", "nodename nor servname")
    ):
        return f"cannot reach {place}: the host name {parsed.host} cannot be resolved"
    if "timeout" in text or "timed out" in text:
        return f"cannot reach {place}: no answer (timed out)"
    if "no route to host" in text or "network is unreachable" in text:
        return f"cannot reach {place}: no route to that host"
    if "authentication failed" in text:
        return f"{place} refused the login of user {parsed.username!r} (wrong user name or password in database.url)"
    if "no password supplied" in text:
        return f"{place} asks for a password, and database.url gives none"
    missing = re.search(r'database "([^"]+)" does not exist', cause)
    if missing:
        return f"the database {missing.group(1)!r} does not exist on {place.removeprefix('the database at ')}"
    detail = _first_line(cause).removeprefix("connection failed: ")
    return f"cannot use {place}: {hide_password(detail)}"


def _describe_sqlite_error(path: Path, text: str, cause: str) -> str:
    """A failure of SQLite on the file ``path`` (``text``: the driver's message, lower case)."""
    if "file is not a database" in text:
        return f"the database file {path} is not an SQLite database (damaged, or another kind of file)"
    if "malformed" in text:
        return f"the database file {path} is damaged (SQLite: the database disk image is malformed)"
    if "locked" in text or "busy" in text:
        return f"the database file {path} is locked by another process; try again in a moment"
    if "disk is full" in text or ("disk i/o error" in text and _nearly_full(path.parent)):
        return f"the disk holding the database file {path} is full: free space on it (in {path.parent} or elsewhere)"
    if "disk i/o error" in text:
        return f"the disk holding the database file {path} reported an input/output error"
    folder = path.parent
    if "unable to open" in text or "readonly" in text or "read-only" in text:
        if not folder.is_dir():
            return f"cannot open the database file {path}: its folder {folder} does not exist"
        if _read_only_file_system(folder):
            return f"cannot open the database file {path}: {folder} is on a read-only file system"
        if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            return f"cannot open the database file {path}: the node's user may not write it or its folder {folder}"
        if path.is_dir():
            return f"cannot open the database file {path}: it is a folder"
        return f"cannot open the database file {path}"
    return f"cannot use the database file {path}: {_first_line(cause)}"


FULL_DISK_BYTES = 1 << 20
"""Free space below which SQLite's "disk I/O error" counts as a full disk: SQLite answers some writes on a full disk
so rather than with "database or disk is full" (a start on a full tmpfs, review of 2026-12-03)."""


def _nearly_full(folder: Path) -> bool:
    try:
        usage = os.statvfs(folder)
    except OSError:
        return False
    return usage.f_bavail * usage.f_frsize < FULL_DISK_BYTES


def _read_only_file_system(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _first_line(exc: BaseException | str) -> str:
    """The first line of an error message, without SQLAlchemy's "(Background on this error at: ...)" note."""
    line = str(exc).strip().split("\n", 1)[0]
    return re.sub(r"\s*\(Background on this error at: [^)]*\)", "", line).strip() or "unknown error"


def start_node(settings: Settings, stopping: threading.Event | None = None) -> RunningNode:
    """Repair storage after any crash, then start the SCP (store, query/retrieve), the watcher, workers and dispatcher.

    ``stopping`` set while it waits for another node's lock on the database raises :class:`StoppedWhileStarting`.
    """
    _warn_about_open_doors(settings)
    # Before migrating: a second node must not change the first one's schema.
    node_lock = take_node_lock(settings, stopping=stopping)
    try:
        storage_lock = take_storage_lock(settings, stopping=stopping)  # before repair: it deletes and overwrites
    except BaseException:
        node_lock.release()
        raise
    try:
        sessions = open_database(settings)
        record_storage_database(
            settings, storage_lock, sessions
        )  # only now: a database that cannot be used claims nothing
    except BaseException:
        storage_lock.release()
        node_lock.release()
        raise
    started: list[Callable[[], None]] = []  # how to stop what has started, in start order
    try:
        return _start_parts(settings, sessions, node_lock, storage_lock, started)
    except BaseException:
        for stop in reversed(started):  # a part that failed to start: what started before it stops, the locks go
            with suppress(Exception):
                stop()
        storage_lock.release()
        node_lock.release()
        raise


def _start_parts(
    settings: Settings,
    sessions: sessionmaker[Session],
    node_lock: db_session.NodeLock,
    storage_lock: StorageLock,
    started: list[Callable[[], None]],
) -> RunningNode:
    """Repair the storage folder, then start the receiver, console, watcher, workers, dispatcher and retention,
    adding each part's stop to ``started`` as it starts (:func:`start_node` stops them if a later part fails)."""
    stop_first: list[PeriodicTask] = []  # what sends or deletes: stopped at once if the lock is lost
    node_lock.watch(lambda why: _stop_this_node(settings, why, stop_first))
    store = InstanceStore(
        settings.storage.directory,
        fsync=settings.storage.fsync,
        quarantine_reserve_gigabytes=settings.storage.quarantine_reserve_gigabytes,
    )
    try:
        # Before anything is recorded at this clock (repair, requeueing, a PACS' C-ECHO): retention judges it by this.
        before_start = recorded_before_start(sessions)
        names = NameKeying(settings, sessions)  # before the start's pass: it keys what is recorded from then on
        _repair_storage(settings, sessions, store)
        # Bind first: a port in use must stop start-up before any thread or process exists.
        server = start_receiving(settings, store, sessions)  # it indexes the journals of receivers that ended
    except OperationalError as exc:
        raise DatabaseUnavailable(_repair_cannot_write(exc, settings)) from None
    started.append(server.shutdown)
    workers = WorkerSupervisor(settings, sessions)
    console = _start_console(settings, sessions, server, workers)
    if console is not None:
        started.append(console.stop)
    watcher = SeriesWatcher(settings, sessions)
    watcher.start()
    started.append(watcher.stop)
    workers.start()
    started.append(workers.stop)
    dispatcher = Dispatcher(settings, sessions, holds_lock=node_lock.confirm)  # fenced: only while the lock holds
    retention = RetentionTask(settings, sessions, before_start)
    stop_first.extend([dispatcher, retention])
    dispatcher.start()
    started.append(dispatcher.stop)
    retention.start()
    started.append(retention.stop)
    names.start()
    started.append(names.stop)
    certificates = CertificateWatch(settings, sessions) if tls_files(settings) else None
    if certificates is not None:
        certificates.start()
        started.append(certificates.stop)
    checkpoint = _start_wal_checkpoint(settings, sessions)
    if checkpoint is not None:
        started.append(checkpoint.stop)
    return RunningNode(
        server=server,
        watcher=watcher,
        workers=workers,
        dispatcher=dispatcher,
        sessions=sessions,
        retention=retention,
        console=console,
        certificates=certificates,
        node_lock=node_lock,
        storage_lock=storage_lock,
        checkpoint=checkpoint,
        name_keys=names,
    )


def _start_wal_checkpoint(settings: Settings, sessions: sessionmaker[Session]) -> WalCheckpoint | None:
    """On SQLite, the thread that keeps the write-ahead log within its limit; None on PostgreSQL."""
    database = db_session.sqlite_file(settings.database_url)
    if database is None:
        return None
    checkpoint = WalCheckpoint(settings, sessions, database)
    checkpoint.start()
    return checkpoint


def _repair_storage(settings: Settings, sessions: sessionmaker[Session], store: InstanceStore) -> None:
    """Bring storage and database into agreement after any stop (:func:`repair`), and requeue the jobs of the
    previous run; raises the database's OperationalError when it cannot be written (locked, gone, its disk full)."""
    adopt_moved_storage(store.root, sessions)  # first: the rows name the files where they are now
    delete_purged_leftovers(sessions, store.instances_dir)  # a purge that committed, then stopped: never put back
    put_back = put_back_set_aside_files(store.instances_dir)  # a purge cut off by a crash: the rows are still there
    report = repair(store, sessions)
    fill_instance_identities(sessions)  # before Query/Retrieve serves: images stored before revision 0011
    key_recorded_names(sessions)  # before Query/Retrieve serves: names an older version recorded since 0016
    requeue_jobs_of_previous_run(sessions)  # before this run's workers start: their pids may be the old ones'
    log_event(
        LOG,
        logging.INFO,
        "node.storage_checked",
        directory=str(settings.storage.directory),
        set_aside_files_put_back=put_back,
        partial_files_removed=report.partial_files_removed,
        instances_indexed=report.instances_indexed,
        unreadable_files=report.unreadable_files,
        duplicates_of_other_series_quarantined=report.duplicates_quarantined,
        quarantine_files_recorded=report.quarantine_files_recorded,
    )


def _repair_cannot_write(error: OperationalError, settings: Settings) -> str:
    """Why start-up cannot record what the node stored before it stopped, and that nothing of it is lost."""
    return (
        f"{describe_database_error(error, settings.database_url)}; start-up cannot record the images stored before "
        f"the node stopped: they are kept in {settings.storage.directory} and are recorded at the first start that "
        "can write the database"
    )


NODE_LOCK_RETRY_SECONDS = 2.0
NODE_LOCK_LOG_SECONDS = 60.0


def take_node_lock(
    settings: Settings, give_up_after: float | None = None, stopping: threading.Event | None = None
) -> db_session.NodeLock:
    """Wait until no other ``dicom-node serve`` runs on this database, then hold its lock while this one runs.

    Nothing is repaired, received, dispatched or purged before: two nodes on one database would send every
    result twice. Logged once a minute while waiting. ``give_up_after`` (seconds) raises DatabaseUnavailable
    instead of waiting longer (for tests and one-off commands); ``stopping`` set while waiting (SIGTERM) raises
    StoppedWhileStarting.
    """
    from alembic.util.exc import CommandError
    from sqlalchemy.exc import SQLAlchemyError

    lock = db_session.NodeLock(settings.database_url)
    started = time.monotonic()
    logged = -NODE_LOCK_LOG_SECONDS
    try:
        taken = lock.try_take(unreachable_is_busy=False)  # a wrong URL or a database that is down fails at once
    except (SQLAlchemyError, ImportError, CommandError) as exc:
        raise DatabaseUnavailable(describe_database_error(exc, settings.database_url)) from None
    free_at_last_look = False
    while not taken:
        if lock.on_postgresql:
            # A lock given back may be its holder's, whose connection ended while the holder runs on: it takes the
            # lock again within its watch interval. Only a lock still free at the next look, a try later, is taken.
            free = lock.given_back()
            if free and free_at_last_look:
                taken = lock.try_take()
            free_at_last_look = free and not taken
        else:
            taken = lock.try_take()
        if taken:
            break
        waited = time.monotonic() - started
        where = lock.where
        if give_up_after is not None and waited >= give_up_after:
            raise DatabaseUnavailable(
                f"another dicom-node serve is running on {where}; only one may (two would send every result twice)"
            )
        if waited - logged >= NODE_LOCK_LOG_SECONDS:
            logged = waited
            log_event(
                LOG,
                logging.WARNING,
                "node.waiting_for_other_node",
                database=str(where),
                waited_seconds=round(waited),
                note="another dicom-node serve is running on this database (or the database cannot be reached "
                "yet); this one starts once it has stopped (two nodes on one database would send every result "
                "twice). Workers on other hosts run `dicom-node worker`, not `serve`",
            )
        if stopping is not None and stopping.wait(NODE_LOCK_RETRY_SECONDS):
            raise StoppedWhileStarting
        if stopping is None:
            time.sleep(NODE_LOCK_RETRY_SECONDS)
    return lock


def take_storage_lock(settings: Settings, stopping: threading.Event | None = None) -> StorageLock:
    """Hold the storage folder's lock while this node runs, and check the folder records no other database (the
    record is written once the database opened: :func:`record_storage_database`).

    Taken once this node holds the database lock, before anything is repaired or received. A folder held by a
    `serve` on another database refuses the start at once (both would repair, overwrite and delete each other's
    files); one held by a `serve` on this database (it lost the database lock to this one, and is stopping) is
    waited for, logged once a minute. ``stopping`` set while waiting raises StoppedWhileStarting.

    Raises
    ------
    RefusedAsConfigured
        When another database's `serve` holds the folder, or the folder records another database.
    """
    directory = settings.storage.directory
    database = database_identity(settings.database_url, directory)
    lock = StorageLock(directory, database, node=f"{settings.network.ae_title} on {worker_id()}")
    started, logged = time.monotonic(), -NODE_LOCK_LOG_SECONDS
    while (holder := lock.try_take()) is not None:
        if holder.database and holder.database != database:
            raise RefusedAsConfigured(
                f"storage.directory {directory} is in use by another dicom-node serve ({holder.node or 'unknown'}) "
                f"on {describe_database(holder.database)}; this node uses {describe_database(database)}. Each "
                "database needs a storage folder of its own: two nodes on one folder would overwrite and delete "
                "each other's files"
            )
        waited = time.monotonic() - started
        if waited - logged >= NODE_LOCK_LOG_SECONDS:
            logged = waited
            log_event(
                LOG,
                logging.WARNING,
                "node.waiting_for_storage",
                directory=str(directory),
                holder=holder.node or "unknown",
                waited_seconds=round(waited),
                note=f"the dicom-node serve {holder.node or 'that held this database before'} still holds storage "
                f"folder {directory} while it stops; this one starts once it has stopped",
            )
        if stopping is not None and stopping.wait(NODE_LOCK_RETRY_SECONDS):
            raise StoppedWhileStarting
        if stopping is None:
            time.sleep(NODE_LOCK_RETRY_SECONDS)
    try:
        lock.check_database()
    except StorageRefused as refused:
        lock.release()
        raise RefusedAsConfigured(str(refused)) from None
    return lock


def record_storage_database(settings: Settings, lock: StorageLock, sessions: sessionmaker[Session]) -> None:
    """Once the database opened: record the storage folder as that database's where it records none yet, so that a
    failed start on a mistyped database URL leaves no record that refuses the corrected one.

    Raises
    ------
    StorageNotFound
        When the folder records no database, holds neither the database's file nor a stored image, while the database
        records some: the images' file system is not mounted (its empty mount point is left), or storage.directory
        names another folder.
    """
    if not lock.has_recorded_database() and not lock.holds_its_database:
        _check_storage_holds_images(settings.storage.directory, sessions)
    if lock.record_database():
        directory = settings.storage.directory
        log_event(
            LOG,
            logging.INFO,
            "node.storage_recorded",
            directory=str(directory),
            note=f"storage folder {directory} is recorded as the folder of {describe_database(lock.database)} (in "
            f"{lock.database_file}); a dicom-node serve on another database is refused on it",
        )


def _check_storage_holds_images(directory: Path, sessions: sessionmaker[Session]) -> None:
    """Refuse a storage folder without images, and without the record of its database, for a database recording
    some: adopting it would store new images on the disk under an unmounted file system, hidden once it is mounted."""
    instances = directory / "instances"
    try:
        holds_images = instances.is_dir() and next(instances.iterdir(), None) is not None
    except OSError:
        holds_images = False
    if holds_images:
        return
    with sessions() as session:
        recorded = session.scalar(select(func.count()).select_from(Instance))
        example = session.scalar(select(Instance.path).order_by(Instance.id.desc()).limit(1))
    if not recorded:
        return
    raise StorageNotFound(
        f"storage.directory {directory} holds none of the {recorded:,} images the database records (the newest at "
        f"{example}) and no {directory / '.database'}: is the file system of the images mounted? Mount it (or set "
        "storage.directory to the folder that holds them) and start again; the node will not store new images "
        "under an empty mount point, where they would be hidden once the file system is mounted"
    )


def _stop_this_node(settings: Settings, why: str, stop_first: Sequence[PeriodicTask]) -> None:
    """The node lost its lock on the database to another node: stop at once what sends results or deletes files
    (``stop_first``: the dispatcher, retention), log why, then stop the rest as SIGTERM would (the workers last)."""
    for task in stop_first:
        task.stop()
    node = f"{settings.network.ae_title} on {worker_id()}"
    log_event(
        LOG,
        logging.ERROR,
        "node.lock_lost",
        node=node,
        reason=why,
        note=f"dicom-node serve {node} lost its lock on the database: its dispatcher (no further file is sent; "
        "one in flight gets its answer) and retention stopped at once; the receiver, the watcher and the workers "
        "stop next",
    )
    os.kill(os.getpid(), signal.SIGTERM)


def _start_console(
    settings: Settings, sessions: sessionmaker[Session], server: Receiving, workers: WorkerSupervisor
) -> ConsoleServer | None:
    """The operations console (``console.enabled``); a port in use stops start-up like the SCP's would."""
    if not settings.console.enabled:
        return None
    from dicom_node.console.app import ListenerNotBound, start_console
    from dicom_node.console.metrics import Liveness, scp_listener

    def workers_alive() -> int | None:
        return workers.alive_count() if settings.inference.workers else None

    listening = scp_listener(settings.network.host, settings.network.port)
    try:
        return start_console(settings, sessions, Liveness(workers_alive, listening, server.alive_count))
    except ListenerNotBound as exc:
        server.shutdown()
        raise (RefusedAsConfigured if exc.lasting else ConsoleNotStarted)(str(exc)) from None
    except OSError:
        server.shutdown()
        raise


def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT.

    Raises
    ------
    NodeLockLost
        After stopping, when the stop came from losing the lock on the database (the command then exits 1).
    """
    stopping = threading.Event()

    def _request_stop(signum: int, _frame: object) -> None:
        log_event(LOG, logging.INFO, "node.stopping", signal=signal.Signals(signum).name)
        stopping.set()

    # Before anything starts: a stop asked for during start-up (a receiver may already acknowledge images) waits
    # for start-up to end, then stops every part as it would later, rather than killing the node half-started.
    previous = signal.signal(signal.SIGTERM, _request_stop), signal.signal(signal.SIGINT, _request_stop)
    try:
        try:
            node = start_node(settings, stopping)
        except StoppedWhileStarting:
            log_event(LOG, logging.INFO, "node.stopped", note="stopped while it waited for the other node to stop")
            return
        log_event(LOG, logging.INFO, "node.ready", ae_title=settings.network.ae_title, port=settings.network.port)
        wait_until_stopped(stopping)
        node.stop()
    finally:  # the caller's handlers again (a process that runs serve in-process, as tests do, keeps its own)
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
    if node.node_lock is not None and node.node_lock.lost:
        # Not a clean stop: a supervisor (systemd Restart=on-failure, Docker, Kubernetes) starts it again, and the
        # new serve waits until the lock is free (the database back, or the other node gone).
        raise NodeLockLost(
            f"dicom-node serve {settings.network.ae_title} on {worker_id()} stopped: it lost its lock on the "
            f"database ({node.node_lock.where}); start it again, it waits until it can take the lock"
        )


def _warn_about_open_doors(settings: Settings) -> None:
    security.apply(settings)
    for hint in open_peer_warnings(settings):
        log_event(LOG, logging.WARNING, "config.open_peer", hint=hint)
    if not settings.rules:
        log_event(LOG, logging.WARNING, "config.no_rules", hint="every series will be IGNORED; add rules")
    for hint in models_over_memory(settings):
        log_event(LOG, logging.WARNING, "config.memory_too_small", hint=hint)
