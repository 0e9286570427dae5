"""The inference worker: a process of its own that claims QUEUED series and segments them.

Models are loaded on first use and stay resident for every later job. Each
stage's time is recorded on the job. A series that changes while it is being
processed (a late instance re-opened it) keeps its new state and the stale
result is discarded; a worker that dies mid-job has its job queued again by
the next worker to start on the same host.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db import jobs
from db.ingest import InstanceRecord, record_results
from db.models import Instance, Job, JobState, utcnow
from db.session import DatabaseBusy, retry_when_locked, transaction
from dicom_node.config import Settings
from dicom_node.encode.measurements import StructureMeasurement, measure, write_measurements_json
from dicom_node.logs import log_event
from dicom_node.encode.results import EncodingError, encode_results
from dicom_node.encode.seg import warm_up
from dicom_node.receive.header import read_file_header
from dicom_node.receive.storage import is_disk_full
from inference.models import ModelUnavailable, Segmentation, SegmentationModel, load_model
from inference.volume import VolumeError, load_series_volume

LOG = logging.getLogger(__name__)

LOCKED_CLAIM_LIMIT_SECONDS = 600.0
"""A worker waits this long for a locked database when claiming, then polls again."""
LOCKED_FINISH_LIMIT_SECONDS = 6 * 3600.0
"""A finished job's outcome is retried this long against a locked database before the worker gives up on it."""


@dataclass(frozen=True)
class ClaimedJob:
    job_id: int
    series_instance_uid: str
    model_name: str
    instance_paths: list[Path]
    destinations: list[str]
    attempt: int


class InferenceWorker:
    """Claims one job at a time from the database and runs its model."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        self.identity = f"{socket.gethostname()}:{os.getpid()}"
        self.models: dict[str, SegmentationModel] = {}

    def run(self, stop: threading.Event) -> None:
        """Work until ``stop`` is set, polling the queue every ``inference.poll_seconds``."""
        self.requeue_abandoned_jobs()
        warm_up_seconds = warm_up()  # highdicom's one-off table loading, not on the first job's clock
        log_event(LOG, logging.INFO, "worker.ready", worker=self.identity, warm_up_seconds=round(warm_up_seconds, 2))
        while not stop.is_set():
            if not self.run_once():
                stop.wait(self.settings.inference.poll_seconds)

    def run_once(self) -> bool:
        """Process the oldest QUEUED job, if any; returns whether there was one."""
        claim = self.claim()
        if claim is None:
            return False
        self.process(claim)
        return True

    def requeue_abandoned_jobs(self) -> int:
        """Jobs left PROCESSING by a dead worker on this host go back to the queue (a locked database is waited for)."""
        return retry_when_locked(
            self._requeue_abandoned_jobs_once,
            waiting=f"worker {self.identity} queuing again the jobs of stopped workers",
            limit_seconds=LOCKED_FINISH_LIMIT_SECONDS,
            wait_for_disk_space=True,
        )

    def _requeue_abandoned_jobs_once(self) -> int:
        host = socket.gethostname()
        requeued = 0
        with transaction(self.sessions) as session:
            for job in jobs.jobs_in_state(session, [JobState.PROCESSING]):
                owner_host, _, owner_pid = (job.claimed_by or "").rpartition(":")
                if owner_host == host and not _pid_alive(owner_pid):
                    jobs.change_state(session, job, JobState.QUEUED, f"worker {job.claimed_by} stopped mid-job; queued again")
                    requeued += 1
        return requeued

    def claim(self) -> ClaimedJob | None:
        """Take the oldest claimable QUEUED job (not deferred to later), or None.

        A database locked by another process is waited for (each wait logged);
        if it stays locked past :data:`LOCKED_CLAIM_LIMIT_SECONDS` the worker
        returns None and polls again rather than stopping.
        """
        try:
            return retry_when_locked(
                self._claim_once,
                waiting=f"worker {self.identity} claiming a job",
                limit_seconds=LOCKED_CLAIM_LIMIT_SECONDS,
                wait_for_disk_space=True,
            )
        except DatabaseBusy:
            return None

    def _claim_once(self) -> ClaimedJob | None:
        with transaction(self.sessions) as session:
            job = session.scalars(
                select(Job)
                .where(jobs.claimable())
                .order_by(Job.state_changed_at)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if job is None:
                return None
            jobs.change_state(session, job, JobState.PROCESSING, f"claimed by worker {self.identity}")
            job.claimed_by = self.identity
            job.not_before = None
            job.attempts += 1
            paths = [Path(p) for p in session.scalars(select(Instance.path).where(Instance.series_id == job.series_id))]
            return ClaimedJob(
                job.id,
                job.series.series_instance_uid,
                job.model_name or "",
                paths,
                list(job.destinations or []),
                job.attempts,
            )

    def process(self, claim: ClaimedJob) -> None:
        timings: dict[str, float] = {}
        log_event(LOG, logging.INFO, "job.processing", job=claim.job_id, series_instance_uid=claim.series_instance_uid, model=claim.model_name)
        try:
            model = self._model(claim.model_name, timings)
            started = time.perf_counter()
            volume = load_series_volume(claim.instance_paths)
            timings["load"] = time.perf_counter() - started
            segmentation = model.segment(volume)
            timings.update(segmentation.timings)
            started = time.perf_counter()
            measurements = measure(volume, segmentation.labels, segmentation.classes)  # for the JSON and the SR
            output = self._write_outputs(claim, volume, segmentation, model, measurements)
            timings["write"] = time.perf_counter() - started
            started = time.perf_counter()
            results = self._encode_results(claim, volume, segmentation, measurements, model, output)
            indexed = [read_file_header(path) for path in results]
            timings["encode"] = time.perf_counter() - started
        except (VolumeError, ModelUnavailable, EncodingError) as exc:
            self._finish(claim, JobState.FAILED, str(exc), timings)
            return
        except Exception as exc:  # noqa: BLE001 - a model crash fails this job, not the worker
            if is_disk_full(exc):
                self._wait_for_disk(claim, exc, timings)
                return
            LOG.exception("job.crashed", extra={"event_fields": {"job": claim.job_id}})
            self._finish(claim, JobState.FAILED, f"{type(exc).__name__}: {exc}", timings)
            return
        baseline = " (baseline, not a trained model)" if model.is_baseline else ""
        reason = f"segmented{baseline}: {len(measurements)} structures; results in {output}"
        next_state = JobState.SENDING if claim.destinations else JobState.DONE
        self._finish(claim, next_state, reason, timings, output, results, indexed)

    def _encode_results(  # noqa: ANN001
        self, claim: ClaimedJob, volume, segmentation: Segmentation, measurements: list[StructureMeasurement], model, folder: Path
    ) -> list[str]:
        """SEG and SR files, one pair per SEG encoding wanted by the destinations or ``results`` (BINARY if none)."""
        destinations = [self.settings.destinations[d] for d in claim.destinations if d in self.settings.destinations]
        always = self.settings.results
        wanted = sorted({d.segmentation_type for d in destinations} | set(always.segmentation_types)) or ["BINARY"]
        rtstruct = always.rtstruct or any("rtstruct" in d.send for d in destinations)
        try:
            files = encode_results(
                volume, segmentation, measurements, model, folder, wanted, claim.attempt, rtstruct=rtstruct
            )
            return [str(p) for p in files]
        except (ValueError, KeyError) as exc:
            raise EncodingError(f"results cannot be encoded: {exc}") from None

    def _model(self, name: str, timings: dict[str, float]) -> SegmentationModel:
        if name not in self.models:
            settings = self.settings.models.get(name)
            if settings is None:
                raise ModelUnavailable(f"model {name!r} is not configured (models: {', '.join(self.settings.models)})")
            started = time.perf_counter()
            self.models[name] = load_model(
                settings,
                self.settings.weights_directory,
                device=self.settings.inference.device,
                cpu_threads=self.settings.inference.cpu_threads,
            )
            timings["model_load"] = time.perf_counter() - started
            log_event(LOG, logging.INFO, "model.loaded", model=name, seconds=round(timings["model_load"], 2))
        return self.models[name]

    def _write_outputs(  # noqa: ANN001
        self,
        claim: ClaimedJob,
        volume,
        segmentation: Segmentation,
        model: SegmentationModel,
        measurements: list[StructureMeasurement],
    ) -> Path:
        import SimpleITK as sitk

        folder = self.settings.jobs_directory / str(claim.job_id)
        folder.mkdir(parents=True, exist_ok=True)
        image = sitk.GetImageFromArray(segmentation.labels)
        image.CopyInformation(volume.to_sitk())
        sitk.WriteImage(image, str(folder / "labels.nii.gz"), useCompression=True)
        write_measurements_json(folder / "measurements.json", measurements)
        (folder / "segmentation.json").write_text(
            json.dumps(
                {
                    "series_instance_uid": claim.series_instance_uid,
                    "model": claim.model_name,
                    "algorithm_name": model.algorithm_name,
                    "algorithm_version": model.algorithm_version,
                    "baseline": model.is_baseline,
                    "classes": {str(k): v for k, v in segmentation.classes.items()},
                    "source_instances": [
                        {"sop_instance_uid": s.sop_instance_uid, "frame_number": s.frame_number} for s in volume.slices
                    ],
                    "notes": volume.notes,
                },
                indent=2,
            )
        )
        return folder

    def _finish(
        self,
        claim: ClaimedJob,
        state: JobState,
        reason: str,
        timings: dict[str, float],
        output: Path | None = None,
        results: list[str] | None = None,
        indexed: list[InstanceRecord] | None = None,
    ) -> None:
        """Record the job's outcome. A locked database is waited for: a finished result is never thrown away."""
        try:
            recorded = retry_when_locked(
                lambda: self._finish_once(claim, state, reason, timings, output, results, indexed),
                waiting=f"worker {self.identity} recording the outcome of job {claim.job_id}",
                limit_seconds=LOCKED_FINISH_LIMIT_SECONDS,
                wait_for_disk_space=True,
            )
        except DatabaseBusy as exc:
            log_event(
                LOG,
                logging.ERROR,
                "job.outcome_not_recorded",
                job=claim.job_id,
                reason=f"{exc}; the job stays PROCESSING until the node restarts, then it is queued again",
            )
            return
        if not recorded:
            return
        level = logging.ERROR if state is JobState.FAILED else logging.INFO
        log_event(LOG, level, f"job.{state.value.lower()}", job=claim.job_id, reason=reason, **{f"seconds_{k}": round(v, 2) for k, v in timings.items()})

    def _finish_once(
        self,
        claim: ClaimedJob,
        state: JobState,
        reason: str,
        timings: dict[str, float],
        output: Path | None,
        results: list[str] | None,
        indexed: list[InstanceRecord] | None,
    ) -> bool:
        """One transaction recording the outcome; False if the series changed meanwhile (result discarded)."""
        with transaction(self.sessions) as session:
            job = session.get_one(Job, claim.job_id)
            job.timings = {key: round(value, 3) for key, value in timings.items()}
            if job.state is not JobState.PROCESSING or job.claimed_by != self.identity:
                log_event(
                    LOG,
                    logging.WARNING,
                    "job.result_discarded",
                    job=claim.job_id,
                    reason=f"series changed while processing (now {job.state.value})",
                )
                return False
            if output is not None:
                job.result_path = str(output)
                job.result_files = results or []
                job.deliveries = {}
                record_results(session, job.id, indexed or [])  # Q/R answers from these rows
            jobs.change_state(session, job, state, reason)
        return True

    def _wait_for_disk(self, claim: ClaimedJob, error: BaseException, timings: dict[str, float]) -> None:
        """Processing found the disk full: queue the job again, to be tried after ``storage.disk_full_retry_seconds``."""
        delay = self.settings.storage.disk_full_retry_seconds
        until = utcnow() + timedelta(seconds=delay)
        detail = getattr(error, "strerror", None) or "no space left on device"
        reason = (
            f"waiting for disk space: {detail.lower()} while writing the results in {self.settings.jobs_directory}; "
            f"tried again from {until:%H:%M:%S} UTC"
        )

        def defer_once() -> None:
            with transaction(self.sessions) as session:
                job = session.get_one(Job, claim.job_id)
                job.timings = {key: round(value, 3) for key, value in timings.items()}
                if job.state is JobState.PROCESSING and job.claimed_by == self.identity:
                    jobs.defer(session, job, until, reason)

        try:
            retry_when_locked(
                defer_once,
                waiting=f"worker {self.identity} deferring job {claim.job_id}",
                limit_seconds=LOCKED_FINISH_LIMIT_SECONDS,
                wait_for_disk_space=True,
            )
        except DatabaseBusy:
            return
        log_event(LOG, logging.WARNING, "job.waiting_for_disk", job=claim.job_id, reason=reason)


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def run_worker(settings: Settings) -> None:
    """Entry point of a worker process (`dicom-node worker`, or started by `serve`)."""
    import signal

    from dicom_node.logs import configure_logging
    from dicom_node.service import open_database

    configure_logging(settings.logging.level, settings.logging.format)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    InferenceWorker(settings, open_database(settings)).run(stop)
