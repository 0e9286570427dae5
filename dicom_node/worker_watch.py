"""What ``serve`` needs to watch its inference workers, without importing the inference side.

A worker's id (:func:`worker_id`), its sign of life while it holds no job (:class:`IdlePulse`) and how long it may
go without one (:func:`idle_silence_limit`, :func:`first_beat_limit`), the sweep that queues again the jobs whose
worker stopped renewing its lease (:class:`LeaseSweep`), and the start-up queueing of jobs left by this host's
previous run (:func:`requeue_jobs_of_previous_run`). The worker itself (:mod:`dicom_node.worker`) imports them from
here; ``serve`` imports only this module, so it starts without loading the encoders and models a worker needs.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from multiprocessing.context import BaseContext
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from db import jobs
from db.models import Job, as_utc
from db.session import transaction
from dicom_node.config import Settings
from dicom_node.logs import log_event

LOG = logging.getLogger("dicom_node.worker")  # its lines are the worker's, as before this module was split off

WORKER_NAME_VARIABLE = "DICOM_NODE_WORKER_NAME"
"""Environment variable naming the worker's host in its id (default: the host name)."""
LOCKED_RETRY_PAUSE_SECONDS = 5.0
"""The longest pause between two tries of a transaction against a locked database (``retry_when_locked``)."""


def worker_host(name: str | None = None) -> str:
    """The host part of a worker's id: ``name``, else ``$DICOM_NODE_WORKER_NAME``, else the host name."""
    return name or os.environ.get(WORKER_NAME_VARIABLE) or socket.gethostname()


def worker_id(name: str | None = None, pid: int | None = None) -> str:
    """The id a worker claims jobs under: ``<host>:<pid>`` (the host part can be given, e.g. per container)."""
    return f"{worker_host(name)}:{pid if pid is not None else os.getpid()}"


class IdlePulse:
    """A worker's sign of life while it holds no job, in memory it shares with ``serve`` (no database write).

    The worker counts a beat at each pass of its loop and at each try of a database transaction it makes while
    idle, and marks the time it holds a job (its lease then shows it alive). ``serve`` reads both, cheaply.
    """

    def __init__(self, context: BaseContext) -> None:
        self._values = context.RawArray("q", 3)  # beats so far; 1 while a job is held; 1 once ready

    def beat(self) -> None:
        self._values[0] += 1

    def hold_job(self, holding: bool) -> None:
        self._values[1] = int(holding)

    def mark_ready(self) -> None:
        """The worker loaded its models and takes jobs."""
        self._values[2] = 1

    @property
    def ready(self) -> bool:
        return bool(self._values[2])

    def read(self) -> tuple[int, bool]:
        """Beats so far (0: the worker is still starting) and whether it holds a job."""
        return int(self._values[0]), bool(self._values[1])


def idle_silence_limit(settings: Settings) -> float:
    """How long a worker holding no job may show no sign of life before ``serve`` ends it as frozen.

    ``inference.lease_seconds``, as for a worker holding a job, but never less than one transaction waiting out
    another process' lock on the database (``database.busy_timeout_seconds``, then a pause before the next try),
    plus one poll of the queue: a worker waiting for a locked database is alive.
    """
    inference = settings.inference
    locked_wait = settings.database.busy_timeout_seconds + LOCKED_RETRY_PAUSE_SECONDS
    return max(inference.lease_seconds, locked_wait) + inference.poll_seconds


def first_beat_limit(settings: Settings) -> float:
    """How long after its start a new worker of ``serve`` may go without its first beat before it is ended as
    frozen: :func:`idle_silence_limit` plus ``inference.worker_start_seconds`` to start Python and import."""
    return idle_silence_limit(settings) + settings.inference.worker_start_seconds


UNRENEWED_LEASE_PERIODS = 2
"""A lease seen unchanged for this many lease periods of the sweeper's steady clock counts as run out whatever its
expiry reads: a live worker renews it at least twice a period, and a lease written before the clock was set back
reads valid for as long as the step."""


@dataclass(frozen=True)
class OverdueLease:
    """A lease seen run out for a whole lease period: the job, its claim and its worker.

    ``unrenewed_seconds`` is set for a lease whose expiry still lies ahead by the clock (set back since it was
    written), taken because it stayed unchanged that long by the sweeper's steady clock.
    """

    job_id: int
    lease_expires_at: datetime | None
    claimed_by: str | None
    stage: str | None
    unrenewed_seconds: float | None = None


@dataclass(frozen=True)
class _LeaseWatch:
    """One lease value as this process watches it: when it first saw it, and first saw it run out (steady clock)."""

    lease: datetime | None
    first_seen: float
    run_out_since: float | None


class LeaseSweep:
    """Finds the jobs whose worker stopped renewing its lease, and queues them again (or fails them at the limit).

    A lease that has run out by the wall clock only counts once this process has seen it unchanged for
    ``inference.lease_seconds`` of its own steady clock: a clock stepped forward (NTP), or a host whose clock
    runs ahead of another's, never takes a job from a worker that is still renewing its lease. A lease seen
    unchanged for :data:`UNRENEWED_LEASE_PERIODS` lease periods counts whatever its expiry reads: one written
    before the clock was set back would otherwise hold a frozen worker's job for as long as the step. The look is
    a plain read; only a lease that counts is written (one transaction), so a quiet queue costs no write lock.
    """

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        self._seen: dict[int, _LeaseWatch] = {}  # job id -> its lease as last seen

    def overdue(self) -> list[OverdueLease]:
        """The leases that have stayed run out for ``inference.lease_seconds`` of this process' steady clock, or
        unchanged for :data:`UNRENEWED_LEASE_PERIODS` lease periods."""
        now = time.monotonic()
        period = self.settings.inference.lease_seconds
        seen_now: dict[int, _LeaseWatch] = {}
        found = []
        with self.sessions() as session:
            moment = jobs.database_now(session)
            for job in jobs.leased_jobs(session, lock=False):
                run_out = job.lease_expires_at is not None and as_utc(job.lease_expires_at) < moment
                watch = seen_now[job.id] = self._watch(job.id, job.lease_expires_at, run_out, now)
                unchanged = now - watch.first_seen
                stayed_run_out = watch.run_out_since is not None and now - watch.run_out_since >= period
                if stayed_run_out or unchanged >= UNRENEWED_LEASE_PERIODS * period:
                    unrenewed = None if run_out else unchanged
                    found.append(OverdueLease(job.id, job.lease_expires_at, job.claimed_by, job.stage, unrenewed))
        self._seen = seen_now
        return found

    def _watch(self, job_id: int, lease: datetime | None, run_out: bool, now: float) -> _LeaseWatch:
        """``lease`` of ``job_id`` seen at ``now``: watched afresh when it is new or was renewed since."""
        watch = self._seen.get(job_id)
        if watch is None or watch.lease != lease:
            watch = _LeaseWatch(lease, now, None)
        if run_out and watch.run_out_since is None:
            watch = _LeaseWatch(lease, watch.first_seen, now)
        return watch

    def sweep(self, end: Callable[[OverdueLease], str | None] | None = None) -> int:
        """Queue again (or fail) every overdue lease's job; how many were queued again.

        ``end`` is called first for each one (outside any transaction: a frozen worker may hold the database's
        write lock until it is ended); it returns who ended the worker (for the reason), or None.
        """
        overdue = self.overdue()
        if not overdue:
            return 0
        enders = {lease.job_id: end(lease) if end is not None else None for lease in overdue}
        wanted = {lease.job_id: lease for lease in overdue}
        requeued = 0
        with transaction(self.sessions) as session:
            for job in jobs.leased_jobs(session):
                lease = wanted.get(job.id)
                if lease is None or lease.lease_expires_at != job.lease_expires_at:
                    continue  # renewed or taken meanwhile, or first overdue after the look
                deaths = self.settings.inference.max_worker_deaths
                if lease.unrenewed_seconds is None:
                    failed = jobs.lease_expired(session, job, deaths, ended_by=enders[job.id])
                else:
                    failed = lease_left_unrenewed(session, job, deaths, lease.unrenewed_seconds, enders[job.id])
                log_worker_death(job, failed)
                requeued += not failed
                self._seen.pop(job.id, None)
        return requeued


def lease_left_unrenewed(
    session: Session, job: Job, max_deaths: int, seconds: float, ended_by: str | None = None
) -> bool:
    """``job``'s lease went unrenewed for ``seconds`` though its expiry still lies ahead (the clock was set back
    since it was written): its worker is taken for dead as by :func:`db.jobs.lease_expired`; True when failed."""
    expiry = as_utc(job.lease_expires_at).strftime("%Y-%m-%d %H:%M:%S") if job.lease_expires_at else "unknown"
    unrenewed = (
        f"its lease not renewed for {seconds:.0f} s, though it reads valid until {expiry} UTC "
        "(the clock was set back since it was written)"
    )
    if ended_by is not None:
        why = f"it stopped renewing its lease (frozen or hung; {unrenewed}), so {ended_by} ended it"
        return jobs.taken_from_hung_worker(session, job, max_deaths, why)
    return jobs.worker_died(session, job, max_deaths, detail=f", {unrenewed}")


def log_worker_death(job: Job, failed: bool) -> None:
    """One log line per job whose worker died: ERROR when the crash limit failed it."""
    log_event(
        LOG,
        logging.ERROR if failed else logging.WARNING,
        "job.worker_died",
        job=job.id,
        worker=job.claimed_by,
        stage=job.stage,
        deaths=job.worker_deaths,
        reason=job.reason,
    )


def requeue_jobs_of_previous_run(sessions: sessionmaker[Session], name: str | None = None) -> int:
    """At ``serve`` start-up, before its workers start: jobs left PROCESSING on this host by workers that are gone
    were cut off by the node's own stop (killed, power cut). They are queued again without counting a death
    (:func:`db.jobs.node_restarted`): two restarts during one long job must not fail it. Returns how many."""
    host = worker_host(name)
    requeued = 0
    with transaction(sessions) as session:
        for job in jobs.jobs_in_state(session, [jobs.S.PROCESSING]):
            owner_host, _, owner_pid = (job.claimed_by or "").rpartition(":")
            if owner_host == host and not claimer_alive(owner_pid, job.state_changed_at):
                jobs.node_restarted(session, job)
                log_event(LOG, logging.WARNING, "job.node_restarted", job=job.id, reason=job.reason)
                requeued += 1
    return requeued


CLAIM_CLOCK_TOLERANCE_SECONDS = 2.0


def claimer_alive(pid: str, claimed_at: datetime | None = None) -> bool:
    """Whether process ``pid`` runs, and (given ``claimed_at``) could be the worker that claimed a job then.

    A zombie is dead: a worker killed after its ``serve`` died waits to be reaped by whichever process
    adopted it, which in a container without an init never happens. A process that started after the
    claim has only reused the number (a container restarted: its new workers often get the old ones'
    pids), so the claimer is gone. That comparison is only made at ``serve`` start-up, when no worker of
    this host can be running: it reads start times off the wall clock, which a step of the clock (NTP, a
    resumed virtual machine) would shift.
    """
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        pass
    stat = _process_stat(int(pid))
    if stat is None:
        return True
    if stat[0] in ("Z", "X"):
        return False
    if claimed_at is None:
        return True
    started = _started_at(stat)
    if started is None:
        return True
    return started <= as_utc(claimed_at).timestamp() + CLAIM_CLOCK_TOLERANCE_SECONDS


def _process_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first); None where it cannot be read."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def _started_at(stat: list[str]) -> float | None:
    """When the process of ``stat`` started (Unix time), from its start in clock ticks after boot."""
    try:
        boot = next(
            float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
        return boot + int(stat[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None
