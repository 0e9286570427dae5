"""The inference worker: a process that claims QUEUED jobs, holds a lease on each, and records the outcome.

Each job runs through :func:`dicom_node.pipeline.run_pipeline`; around it the worker
claims the job (:func:`db.jobs.claim_next`), renews its lease from a heartbeat thread
every ``inference.lease_renew_seconds`` and records the outcome in one transaction.
Models are loaded on first use and stay resident for every later job.

A worker that dies mid-job is found two ways: on its own host at once (the supervisor in
``serve`` sees its process end; a worker starting on the same host sees its pid gone),
and from any host once its lease has run out (``inference.lease_seconds``): every worker
queues such jobs again before it claims, and so does ``serve`` (which also ends a worker of
its own that stopped renewing its lease, or that ran past ``inference.job_timeout_minutes``).
Each counts a death against ``inference.max_worker_deaths``; at the limit the job is FAILED.
A series that changes while it is processed (a late instance re-opened it), or a job whose
lease was lost, keeps its new state and the stale result is discarded.

A worker of ``serve`` that freezes while it holds no job (stopped, or stuck in a database query) renews no
lease; it counts beats in memory it shares with ``serve`` (:class:`~dicom_node.worker_watch.IdlePulse`), which
ends and replaces it once they stop for :func:`~dicom_node.worker_watch.idle_silence_limit`. While it starts
(loading its models) a thread of its own beats, so one frozen before it is ready is ended too, once it shows no
sign of life within :func:`~dicom_node.worker_watch.first_beat_limit`. A
``dicom-node worker`` (no supervisor of its own on its host) keeps ``inference.job_timeout_minutes`` itself
(:class:`JobTimeLimit`): past it the job is given up, and the process exits if the job has not stopped within
``inference.shutdown_grace_seconds``, for its service manager to restart.

On SIGTERM the worker finishes its job for up to ``inference.shutdown_grace_seconds``,
then hands it back (queued again, not counted as a death) and exits.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

from pydicom.dataset import Dataset
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from db import jobs
from db.ingest import lock_studies_of_job, record_results
from db.models import Instance, Job, Series
from db.session import (
    DatabaseBusy,
    is_database_storage_fault,
    make_engine,
    make_session_factory,
    newest_revision,
    retry_when_locked,
    storage_fault_cause,
    transaction,
)
from dicom_node.config import Settings
from dicom_node.encode.seg import warm_up
from dicom_node.logs import log_event
from dicom_node.pipeline import (
    ClaimedJob,
    Deferred,
    Failed,
    ModelCache,
    PipelineResult,
    Processed,
    discard,
    os_error_outcome,
    publish,
    run_pipeline,
)
from dicom_node.provenance import RecordedWeights, latest_weights, results_event_reason
from dicom_node.worker_watch import (
    IdlePulse,
    LeaseSweep,
    claimer_alive,
    log_worker_death,
    worker_id,
)
from inference.models.prefetch import VolumePrefetcher

LOG = logging.getLogger(__name__)

LOCKED_CLAIM_LIMIT_SECONDS = 600.0
"""A worker waits this long for a locked database when claiming, then polls again."""
LOCKED_FINISH_LIMIT_SECONDS = 6 * 3600.0
"""A finished job's outcome is retried this long against a locked database before the worker gives up on it."""
EXIT_JOB_OVER_TIME = 3
"""Exit status of a ``dicom-node worker`` whose job ran past its time limit and could not be stopped."""
START_BEAT_SECONDS = 1.0
"""How often a worker of ``serve`` beats while it starts (before its loop beats)."""


def prefetch_enabled(settings: Settings) -> bool:
    """Whether to decode the next series during inference (``inference.prefetch_next_series``)."""
    choice = settings.inference.prefetch_next_series
    if choice != "auto":
        return choice == "on"
    if settings.inference.device == "cpu" or all(m.kind != "totalsegmentator" for m in settings.models.values()):
        return False  # only TotalSegmentator models run on a GPU (and only they need torch imported here)
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


class InferenceWorker:
    """Claims one job at a time from the database, runs its pipeline under a lease, records the outcome.

    ``pulse``: where a worker of ``serve`` shows it is alive while idle. ``own_time_limit``: the worker gives up a
    job past ``inference.job_timeout_minutes`` itself (a ``dicom-node worker``, which no ``serve`` can end).
    ``ready``: set once the models are loaded (the start-up beats of :func:`run_worker` then stop).
    """

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        identity: str | None = None,
        *,
        pulse: IdlePulse | None = None,
        own_time_limit: bool = False,
        ready: threading.Event | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.identity = identity or worker_id()
        self.pulse = pulse
        self.own_time_limit = own_time_limit
        self.ready = ready or threading.Event()  # the loop's beats start once the models are loaded
        self.models = ModelCache(settings, self._latest_weights)
        self.current: ClaimedJob | None = None  # the job being processed, for a clean shutdown
        self.prefetcher = VolumePrefetcher() if prefetch_enabled(settings) else None
        self._next_lease_check = 0.0  # time.monotonic() of the next look for leases that ran out
        self.leases = LeaseSweep(settings, sessions)
        self.schema = newest_revision()  # the schema this worker's code writes; checked at each claim

    @property
    def host(self) -> str:
        return self.identity.rpartition(":")[0]

    def _latest_weights(self, model_name: str) -> RecordedWeights | None:
        """The weights the latest results recorded for ``model_name`` were made with (by any worker)."""
        with self.sessions() as session:
            return latest_weights(session, model_name)

    def run(self, stop: threading.Event) -> None:
        """Work until ``stop`` is set, polling the queue every ``inference.poll_seconds``."""
        self.requeue_abandoned_jobs()
        self.models.load_all()
        warm_up_seconds = warm_up()  # highdicom's one-off table loading, not on the first job's clock
        if self.pulse is not None:  # first: serve counts it up once it is ready, as the log line says
            self.pulse.mark_ready()
        self.ready.set()
        log_event(LOG, logging.INFO, "worker.ready", worker=self.identity, warm_up_seconds=round(warm_up_seconds, 2))
        try:
            while not stop.is_set():
                self._beat()
                if not self.run_once():
                    stop.wait(self.settings.inference.poll_seconds)
        finally:
            if self.prefetcher is not None:
                self.prefetcher.close()

    def run_once(self) -> bool:
        """Queue again the jobs whose lease ran out, then process the oldest QUEUED job, if any.

        Leases are checked every ``inference.lease_renew_seconds`` at most (each check is a
        write transaction, which on SQLite takes the database's write lock). Returns whether
        there was a job to process.
        """
        if time.monotonic() >= self._next_lease_check:
            self._next_lease_check = time.monotonic() + self.settings.inference.lease_renew_seconds
            self.requeue_expired_leases()
        claim = self.claim()
        if claim is None:
            return False
        if self.pulse is not None:
            self.pulse.hold_job(True)
        try:
            self.process(claim)
        finally:
            if self.pulse is not None:
                self.pulse.hold_job(False)
        return True

    def _beat(self) -> None:
        """A sign of life while idle, for ``serve`` (none before the worker is ready, or without a pulse)."""
        if self.pulse is not None and self.ready.is_set():
            self.pulse.beat()

    # --- dead workers -------------------------------------------------------------------------

    def requeue_abandoned_jobs(self) -> int:
        """Jobs left PROCESSING by a dead worker on this host, or by any worker whose lease ran out.

        They go back to the queue (or fail at the crash limit). A locked database is
        waited for. Returns how many were queued again.
        """
        local = retry_when_locked(
            self._requeue_dead_local_workers_once,
            waiting=f"worker {self.identity} queuing again the jobs of stopped workers",
            limit_seconds=LOCKED_FINISH_LIMIT_SECONDS,
            wait_for_disk_space=True,
            wait_for_server=True,
            wait_for_storage=True,
        )
        return local + self.requeue_expired_leases()

    def _requeue_dead_local_workers_once(self) -> int:
        requeued = 0
        with transaction(self.sessions) as session:
            for job in jobs.jobs_in_state(session, [jobs.S.PROCESSING]):
                owner_host, _, owner_pid = (job.claimed_by or "").rpartition(":")
                if owner_host == self.host and not claimer_alive(owner_pid):
                    failed = jobs.worker_died(session, job, self.settings.inference.max_worker_deaths)
                    log_worker_death(job, failed)
                    requeued += not failed
        return requeued

    def requeue_expired_leases(self) -> int:
        """Jobs whose worker (on any host) stopped renewing its lease: queued again, or failed at the crash limit.

        See :class:`LeaseSweep`: a dead worker's job is queued again after two lease periods at most. A locked
        database is waited for up to :data:`LOCKED_CLAIM_LIMIT_SECONDS`, then the sweep waits for the next poll.
        """
        try:
            return retry_when_locked(
                self._sweep_once,
                waiting=f"worker {self.identity} queuing again jobs whose lease ran out",
                limit_seconds=LOCKED_CLAIM_LIMIT_SECONDS,
                wait_for_disk_space=True,
                wait_for_server=True,
                wait_for_storage=True,
            )
        except DatabaseBusy:
            return 0

    def _sweep_once(self) -> int:
        self._beat()  # each try: a worker waiting for a locked database is alive
        return self.leases.sweep()

    # --- claim --------------------------------------------------------------------------------

    def claim(self) -> ClaimedJob | None:
        """Take the oldest claimable QUEUED job (not deferred to later), or None.

        A database locked by another process is waited for (each wait logged);
        if it stays locked past :data:`LOCKED_CLAIM_LIMIT_SECONDS` the worker
        returns None and polls again rather than stopping.
        """
        started = time.perf_counter()
        try:
            claim = retry_when_locked(
                self._claim_once,
                waiting=f"worker {self.identity} claiming a job",
                limit_seconds=LOCKED_CLAIM_LIMIT_SECONDS,
                wait_for_disk_space=True,
                wait_for_server=True,
                wait_for_storage=True,
            )
        except DatabaseBusy:
            return None
        return None if claim is None else replace(claim, claim_seconds=time.perf_counter() - started)

    def _claim_once(self) -> ClaimedJob | None:
        self._beat()  # each try: a worker waiting for a locked database is alive
        lease = timedelta(seconds=self.settings.inference.lease_seconds)
        with transaction(self.sessions) as session:
            self._require_own_schema(session)
            job = jobs.claim_next(session, self.identity, lease)
            if job is None:
                return None
            instances = select(Instance.path).where(Instance.series_id == job.series_id).order_by(Instance.id)
            paths = [Path(p) for p in session.scalars(instances)]
            run, replaces = _run_and_replaced_reports(session, job)
            claim = ClaimedJob(
                job.id,
                job.series.series_instance_uid,
                job.model_name or "",
                paths,
                list(job.destinations or []),
                job.attempts,
                run=run,
                warnings=list(job.warnings or []),
                replaces=replaces,
                patient_name=job.series.study.patient_name,
            )
            # On PostgreSQL the statements above may have waited behind a newer serve's upgrade (its table locks) and
            # gone on once it committed; read again last, the revision shows that upgrade and the claim rolls back.
            self._require_own_schema(session)
            return claim

    def _require_own_schema(self, session: Session) -> None:
        """Raise :class:`SchemaChanged` when a serve of another version changed the tables since this worker
        started."""
        revision = session.scalar(text("SELECT version_num FROM alembic_version"))
        if revision != self.schema:
            raise SchemaChanged(str(revision))

    # --- one job ------------------------------------------------------------------------------

    def process(self, claim: ClaimedJob) -> None:
        """Run the job's pipeline under a renewed lease, then record its outcome."""
        log_event(
            LOG,
            logging.INFO,
            "job.processing",
            job=claim.job_id,
            worker=self.identity,
            series_instance_uid=claim.series_instance_uid,
            model=claim.model_name,
        )
        self.current = claim
        heartbeat = LeaseHeartbeat(self, claim.job_id, claim.attempt)
        heartbeat.start()
        minutes = self.settings.inference.job_timeout_minutes
        time_limit = JobTimeLimit(self, claim, heartbeat, minutes) if self.own_time_limit and minutes else None
        if time_limit is not None:
            time_limit.start()
        try:
            result = run_pipeline(
                claim,
                self.settings,
                self.models,
                lambda stage: self._record_stage(claim, stage),
                prefetcher=self.prefetcher,
                next_series=self.next_series_paths,
            )
        finally:
            if time_limit is not None:
                time_limit.stop()
            heartbeat.stop()
        self._finish(claim, result)
        self.current = None

    def next_series_paths(self) -> list[Path]:
        """The instance files of the job this worker (or another) would claim next: a read-only peek."""
        with self.sessions() as session:
            series_id = jobs.next_claimable_series_id(session)
            if series_id is None:
                return []
            return [Path(p) for p in session.scalars(select(Instance.path).where(Instance.series_id == series_id))]

    def renew_lease(self, job_id: int, attempt: int | None = None) -> bool:
        """Extend this worker's lease on ``job_id`` (its claim number ``attempt``); False when the job is no longer
        its own."""
        lease = timedelta(seconds=self.settings.inference.lease_seconds)
        with transaction(self.sessions) as session:
            return jobs.renew_lease(session, job_id, self.identity, lease, attempt)

    def _record_stage(self, claim: ClaimedJob, stage: str) -> None:
        """Record the stage this job is in (read by whoever finds this worker dead).

        A locked database, or one whose file cannot be written for a moment, is waited for, so neither costs the
        work done so far.
        """

        def record() -> None:
            with transaction(self.sessions) as session:
                jobs.set_stage(session, claim.job_id, stage, self.identity, claim.attempt)

        retry_when_locked(
            record,
            waiting=f"worker {self.identity} recording stage {stage} of job {claim.job_id}",
            limit_seconds=LOCKED_FINISH_LIMIT_SECONDS,
            wait_for_disk_space=True,
            wait_for_server=True,
            wait_for_storage=True,
        )

    def _finish(self, claim: ClaimedJob, result: PipelineResult) -> None:
        """Record the job's outcome. A locked database, or one whose file cannot be written for a moment (a disk
        input/output error), is waited for: a finished result is never thrown away, nor counted as a crash."""
        try:
            recorded = retry_when_locked(
                lambda: self._finish_once(claim, result),
                waiting=f"worker {self.identity} recording the outcome of job {claim.job_id}",
                limit_seconds=LOCKED_FINISH_LIMIT_SECONDS,
                wait_for_disk_space=True,
                wait_for_server=True,
                wait_for_storage=True,
            )
        except DatabaseBusy as exc:
            log_event(
                LOG,
                logging.ERROR,
                "job.outcome_not_recorded",
                job=claim.job_id,
                reason=f"{exc}; the job is queued again once this worker's lease on it runs out",
            )
            discard(result)
            return
        if recorded is None:
            return
        result = recorded
        timings = {f"seconds_{k}": round(v, 2) for k, v in result.timings.items()}
        if isinstance(result, Deferred):
            log_event(LOG, logging.WARNING, result.event, job=claim.job_id, reason=result.reason)
        elif isinstance(result, Failed):
            log_event(LOG, logging.ERROR, "job.failed", job=claim.job_id, reason=result.reason, **timings)
        else:
            log_event(
                LOG,
                logging.INFO,
                f"job.{result.state.value.lower()}",
                job=claim.job_id,
                reason=result.reason,
                made_by=result.made_by,
                **timings,
            )

    def _finish_once(self, claim: ClaimedJob, result: PipelineResult) -> PipelineResult | None:
        """One transaction recording the outcome: the outcome recorded (another when the results cannot be moved
        into place), or None if the job is no longer this worker's (result discarded)."""
        with transaction(self.sessions) as session:
            lock_studies_of_job(session, claim.job_id)  # results are filed in the study: its row before the job's
            job = session.get_one(Job, claim.job_id, with_for_update=True)
            if not jobs.holds(job, self.identity, claim.attempt):
                log_event(
                    LOG,
                    logging.WARNING,
                    "job.result_discarded",
                    job=claim.job_id,
                    worker=self.identity,
                    reason=late_result_reason(job, self.identity, claim.attempt),
                )
                discard(result)  # its files never left this claim's own folder
                return None
            timings = {**result.timings, "claim": claim.claim_seconds}
            job.timings = {key: round(value, 3) for key, value in timings.items()}
            if isinstance(result, Processed):
                try:
                    result = publish(result)  # into the run's folder, only now that the job is known to be ours
                except OSError as exc:  # the results folder turned read-only, failed, or went away
                    discard(result)
                    result = os_error_outcome(self.settings, exc, "publish", result.timings)
            if isinstance(result, Processed):
                record_results(session, job.id, result.indexed)  # Q/R answers from these rows
                jobs.finish_processing(
                    session,
                    job,
                    result.state,
                    result.reason,
                    result_path=str(result.job_folder),
                    result_files=result.files,
                    warnings=result.warnings,
                    event_reason=results_event_reason(result.reason, result.made_by),
                )
            elif isinstance(result, Failed):
                jobs.finish_processing(session, job, jobs.S.FAILED, result.reason)
            else:
                jobs.defer(session, job, result.until, result.reason)
        return result

    def give_up_over_time(self, claim: ClaimedJob, minutes: float) -> str:
        """Own time limit: record that ``claim``'s job ran past it (queued again, or failed at the crash limit) if
        it is still this claim's; what became of the job, as a clause for the log."""

        def record() -> str:
            with transaction(self.sessions) as session:
                job = session.get_one(Job, claim.job_id, with_for_update=True)
                if not jobs.holds(job, self.identity, claim.attempt):
                    return f"it was no longer this worker's (it is {job.state.value})"
                deaths = self.settings.inference.max_worker_deaths
                failed = jobs.ran_too_long(session, job, deaths, minutes, done="the worker gave it up itself")
                log_worker_death(job, failed)
                return "it is FAILED, at inference.max_worker_deaths" if failed else "it is queued again"

        return retry_when_locked(
            record,
            waiting=f"worker {self.identity} giving up job {claim.job_id}, past its time limit",
            limit_seconds=self.settings.inference.lease_seconds,
            wait_for_disk_space=True,
            wait_for_server=True,
            wait_for_storage=True,
        )

    def hand_back(self) -> bool:
        """Shutdown: queue the job being processed again, without counting a death; whether there was one."""
        claim = self.current
        if claim is None:
            return False
        with transaction(self.sessions) as session:
            job = session.get_one(Job, claim.job_id, with_for_update=True)
            if not jobs.holds(job, self.identity, claim.attempt):
                return False
            jobs.worker_stopped(session, job)
        log_event(
            LOG,
            logging.WARNING,
            "job.handed_back",
            job=claim.job_id,
            worker=self.identity,
            reason="the worker was stopped before the job finished; queued again",
        )
        return True


def late_result_reason(job: Job, worker: str, attempt: int) -> str:
    """Why the result of ``worker``'s claim number ``attempt`` is not recorded: the job is no longer that claim's."""
    if job.claimed_by != worker or job.attempts != attempt:
        return (
            f"another claim holds the job now (worker {job.claimed_by}, claim {job.attempts}); it is {job.state.value}"
        )
    return f"the job was taken from this claim meanwhile; it is {job.state.value}: {job.reason}"


class JobTimeLimit:
    """A ``dicom-node worker``'s own watchdog over one job, for ``inference.job_timeout_minutes``.

    Past the limit the job is given up (:meth:`InferenceWorker.give_up_over_time`: queued again, or failed at the
    crash limit, as ``serve`` does for its own workers) and its lease no longer renewed. A thread cannot be
    stopped, so if the pipeline has not returned ``inference.shutdown_grace_seconds`` later (hung, or still
    computing), the process exits with :data:`EXIT_JOB_OVER_TIME` for its service manager to start it again.
    A late result is never recorded: the job is no longer this claim's (:func:`db.jobs.holds`).
    """

    def __init__(self, worker: InferenceWorker, claim: ClaimedJob, heartbeat: LeaseHeartbeat, minutes: float) -> None:
        self.worker = worker
        self.claim = claim
        self.heartbeat = heartbeat
        self.minutes = minutes
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"time-limit-{claim.job_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """The pipeline returned: the watch ends (it never waits on a job the worker has gone past)."""
        self._stopped.set()

    def _watch(self) -> None:
        if self._stopped.wait(self.minutes * 60):
            return
        self.heartbeat.stop()
        job, worker = self.claim.job_id, self.worker.identity
        grace = self.worker.settings.inference.shutdown_grace_seconds
        limit = f"the time limit of {self.minutes:g} min (inference.job_timeout_minutes)"
        try:
            outcome = self.worker.give_up_over_time(self.claim, self.minutes)
        except Exception:  # the database cannot be written: the lease, no longer renewed, runs out instead
            LOG.exception("job.give_up_not_recorded", extra={"event_fields": {"job": job, "worker": worker}})
            outcome, grace = "the database could not record it, so its lease runs out instead", 0.0
        log_event(
            LOG,
            logging.ERROR,
            "job.time_limit",
            job=job,
            worker=worker,
            reason=f"worker {worker} gave up job {job}, which ran past {limit}: {outcome}; the worker exits unless "
            f"the job stops within {grace:g} s (inference.shutdown_grace_seconds)",
        )
        if self._stopped.wait(grace):
            return
        log_event(
            LOG,
            logging.ERROR,
            "worker.exiting",
            worker=worker,
            reason=f"worker {worker} is exiting because job {job} ran past {limit} and did not stop within "
            f"{grace:g} s; its service manager starts it again",
        )
        logging.shutdown()
        os._exit(EXIT_JOB_OVER_TIME)


class LeaseHeartbeat:
    """A thread renewing the worker's lease on one job every ``inference.lease_renew_seconds`` until stopped."""

    def __init__(self, worker: InferenceWorker, job_id: int, attempt: int | None = None) -> None:
        self.worker = worker
        self.job_id = job_id
        self.attempt = attempt
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{job_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=30)

    def _beat(self) -> None:
        interval = self.worker.settings.inference.lease_renew_seconds
        while not self._stopped.wait(interval):
            try:
                if not self.worker.renew_lease(self.job_id, self.attempt):
                    log_event(
                        LOG,
                        logging.WARNING,
                        "job.lease_lost",
                        job=self.job_id,
                        worker=self.worker.identity,
                        reason="the job is no longer this worker's (re-opened, or its lease ran out); "
                        "its result will be discarded",
                    )
                    return
            except Exception as exc:
                if not is_database_storage_fault(exc):
                    LOG.exception("job.lease_not_renewed", extra={"event_fields": {"job": self.job_id}})
                    continue
                log_event(
                    LOG,
                    logging.WARNING,
                    "job.lease_not_renewed",
                    job=self.job_id,
                    worker=self.worker.identity,
                    reason=f"{storage_fault_cause(exc)}; the lease is renewed again in {interval:g} s",
                )


def _run_and_replaced_reports(session: Session, job: Job) -> tuple[int, dict[str, Dataset]]:
    """Which run this is, and the current SRs (per SEG encoding) that its SRs will supersede."""
    results = list(session.scalars(select(Series).where(Series.source_job_id == job.id)))
    current = [series for series in results if series.superseded_at is None]
    superseded_runs = len({series.superseded_at for series in results if series.superseded_at is not None})
    described = {file.path: file for file in job.result_files or []}
    replaces: dict[str, Dataset] = {}
    for series in current:
        if series.modality != "SR":
            continue
        for instance in series.instances:
            file = described.get(instance.path)
            if file is None or file.encoding is None:
                continue
            earlier = Dataset()
            earlier.SOPClassUID = instance.sop_class_uid
            earlier.SOPInstanceUID = instance.sop_instance_uid
            earlier.StudyInstanceUID = series.study.study_instance_uid
            earlier.SeriesInstanceUID = series.series_instance_uid
            replaces[file.encoding] = earlier
    return superseded_runs + bool(current) + 1, replaces


def run_worker(
    settings: Settings, parent_pid: int | None = None, name: str | None = None, pulse: IdlePulse | None = None
) -> None:
    """Entry point of a worker process (`dicom-node worker`, or started by `serve`, which passes its pid and the
    worker's :class:`IdlePulse`; `serve` also ends it at the job time limit, which `dicom-node worker` keeps itself).

    ``name`` is the host part of the worker's id (default ``$DICOM_NODE_WORKER_NAME``, else the host name).
    """
    import faulthandler
    import signal

    from dicom_node.logs import configure_logging

    configure_logging(settings.logging.level, settings.logging.format)
    ready = threading.Event()
    if pulse is not None:  # before anything that may hang: serve ends a worker that never beats
        threading.Thread(target=_beat_while_starting, args=(pulse, ready), name="start-pulse", daemon=True).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: every thread's stack to stderr
    parent = parent_pid if parent_pid is not None else os.getppid()
    threading.Thread(target=_stop_when_orphaned, args=(stop, parent), name="parent-watch", daemon=True).start()
    identity = worker_id(name)
    sessions = _database_once_upgraded(settings, identity, stop)
    if sessions is None:
        return  # asked to stop while it waited for the upgrade
    worker = InferenceWorker(
        settings,
        sessions,
        identity,
        pulse=pulse,
        own_time_limit=parent_pid is None,
        ready=ready,
    )
    done = threading.Event()
    threading.Thread(
        target=_hand_back_after_grace, args=(worker, stop, done), name="shutdown-grace", daemon=True
    ).start()
    try:
        worker.run(stop)
    except SchemaChanged as exc:
        _schema_changed(identity, exc.revision, worker.schema)
    done.set()


class SchemaChanged(Exception):
    """The database's schema revision is no longer the one this worker's code writes (``revision``: the new one)."""

    def __init__(self, revision: str) -> None:
        super().__init__(revision)
        self.revision = revision


SCHEMA_POLL_SECONDS = 10.0
"""How often a worker on a database of an older schema looks whether ``serve`` has upgraded it."""

EXIT_SCHEMA_NEWER = 2
"""Exit status of a worker whose database a newer version of dicom-node upgraded: restarting it cannot help."""


def _database_once_upgraded(settings: Settings, identity: str, stop: threading.Event) -> sessionmaker[Session] | None:
    """The worker's sessions once the database has this version's schema; None if asked to stop meanwhile.

    A worker never changes the schema: ``serve`` upgrades it, holding the node's lock. A newer worker started first
    (the GPU hosts updated before the node) would otherwise upgrade it under an older ``serve`` still running, whose
    rows would then lack what the new columns hold. A database of a newer schema ends the worker with a sentence.
    """
    from db.session import is_known_revision, schema_revision

    url, waiting_logged = settings.database_url, False
    while True:
        current, newest = schema_revision(url), newest_revision()
        if current == newest:
            return make_session_factory(make_engine(url, settings.database.busy_timeout_seconds))
        if current is not None and not is_known_revision(current):
            _schema_newer(identity, current, newest)
        if not waiting_logged:
            had = f"schema revision {current}" if current is not None else "no schema yet"
            log_event(
                LOG,
                logging.WARNING,
                "worker.waiting_for_upgrade",
                worker=identity,
                reason=f"the database has {had}, older than this worker's (revision {newest}): it waits for "
                "`dicom-node serve` of this version to upgrade it (workers never change the schema), looking "
                f"every {SCHEMA_POLL_SECONDS:g} s",
            )
            waiting_logged = True
        if stop.wait(SCHEMA_POLL_SECONDS):
            return None


def _schema_newer(identity: str, current: str, newest: str) -> NoReturn:
    """Say that the database's schema is not this worker's (a newer `serve` upgraded it, at start or while the
    worker ran) and exit :data:`EXIT_SCHEMA_NEWER`: a restart of the same version cannot help."""
    log_event(
        LOG,
        logging.ERROR,
        "worker.schema_newer",
        worker=identity,
        reason=f"the database has schema revision {current}, made by a newer version of dicom-node than this "
        f"worker (revision {newest}): install the version the node runs on this host",
    )
    logging.shutdown()
    raise SystemExit(EXIT_SCHEMA_NEWER)


EXIT_SCHEMA_OLDER = 1
"""Exit status of a worker whose database went back to an older schema while it ran: a restart waits for the
upgrade (:func:`_database_once_upgraded`)."""


def _schema_changed(identity: str, current: str, newest: str) -> NoReturn:
    """A worker's claim found the schema changed since it started: newer (a newer `serve` upgraded it) or older (a
    database restored from a backup); say so and exit, having claimed nothing."""
    from db.session import is_known_revision

    if not is_known_revision(current):
        _schema_newer(identity, current, newest)
    log_event(
        LOG,
        logging.ERROR,
        "worker.schema_older",
        worker=identity,
        reason=f"the database has schema revision {current}, older than this worker's (revision {newest}), since "
        "the worker started (a database restored from a backup?): it claims nothing more and stops; started again, "
        "it waits for `dicom-node serve` of this version to upgrade the database",
    )
    logging.shutdown()
    raise SystemExit(EXIT_SCHEMA_OLDER)


def _beat_while_starting(pulse: IdlePulse, ready: threading.Event) -> None:
    """Beat every :data:`START_BEAT_SECONDS` until the worker is ready: a frozen process (all its threads
    stopped) shows no sign of life, while one loading large models or waiting for a locked database does."""
    pulse.beat()
    while not ready.wait(START_BEAT_SECONDS):
        pulse.beat()


EXIT_STALL_SECONDS = 10.0
"""After its loop ended, a worker that has not exited within this long exits at once (logged)."""


def _hand_back_after_grace(worker: InferenceWorker, stop: threading.Event, done: threading.Event) -> None:
    """Once asked to stop, give the running job ``inference.shutdown_grace_seconds``; then hand it back and exit.

    Also a backstop for the exit itself: a process still alive :data:`EXIT_STALL_SECONDS`
    after its loop ended (a library thread holding up the interpreter's exit) exits at once.

    A worker asked to stop before it was ready (loading its models, or waiting for the database) exits at once:
    it has taken no job, and will take none (its loop looks at ``stop`` before its first claim). Everything it
    may be doing then (a transaction, a converted model written under a temporary name) is safe to cut short.
    """
    stop.wait()
    if not worker.ready.is_set():
        log_event(
            LOG,
            logging.INFO,
            "worker.stopped_while_starting",
            worker=worker.identity,
            reason=f"worker {worker.identity} was asked to stop while it was still starting (loading its models or "
            "waiting for the database); it had taken no job, so it stops now",
        )
        logging.shutdown()
        os._exit(0)
    if done.wait(worker.settings.inference.shutdown_grace_seconds):
        time.sleep(EXIT_STALL_SECONDS)  # a daemon thread: normally the process has exited before this returns
        log_event(
            LOG,
            logging.WARNING,
            "worker.exit_stalled",
            worker=worker.identity,
            reason=f"the worker had not exited {EXIT_STALL_SECONDS:.0f} s after it stopped; exiting now",
        )
    else:
        try:
            worker.hand_back()
        except Exception:
            LOG.exception("job.hand_back_failed", extra={"event_fields": {"worker": worker.identity}})
    logging.shutdown()
    os._exit(0)


def _stop_when_orphaned(stop: threading.Event, parent: int, interval_seconds: float = 1.0) -> None:
    """Stop the worker when the process that started it is gone (``serve`` killed, or its shell closed).

    A worker outliving a killed ``serve`` would hold its models' memory and keep claiming
    jobs beside the workers of the next ``serve``. The job it is running finishes first.
    """
    while True:
        if os.getppid() != parent:
            log_event(
                LOG,
                logging.WARNING,
                "worker.orphaned",
                worker=worker_id(),
                reason=f"the process that started it ({parent}) is gone; stopping after the current job",
            )
            stop.set()
        if stop.wait(interval_seconds):
            return
