"""The inference worker: a process of its own that claims QUEUED series and segments them.

Models are loaded on first use and stay resident for every later job. Each
stage's time is recorded on the job, and the stage the worker is in is written
to ``jobs.stage`` as it goes. A series that changes while it is being processed
(a late instance re-opened it) keeps its new state and the stale result is
discarded. A worker that dies mid-job has its job queued again (by the
supervisor in ``serve``, or the next worker to start on the same host) until
``inference.max_worker_deaths`` workers died on it; then the job is FAILED.

What a result does not cover (images left out, values assumed) becomes the job's
``warnings``, the SR's comment, and "PARTIAL" in the result descriptions. A re-run
writes into ``jobs/<job id>/run-<N>/`` and supersedes the earlier run's results.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db import jobs
from db.ingest import InstanceRecord, record_results
from db.models import Instance, Job, JobState, Series, utcnow
from db.session import DatabaseBusy, is_database_locked, retry_when_locked, transaction
from dicom_node.config import Settings
from dicom_node.encode.measurements import StructureMeasurement, measure, write_measurements_json
from dicom_node.encode.results import EncodingError, encode_results
from dicom_node.encode.rtstruct import ContourBudget
from dicom_node.encode.seg import warm_up
from dicom_node.logs import log_event
from dicom_node.receive.header import read_file_header
from dicom_node.receive.storage import is_disk_full
from inference.models import ModelUnavailable, Segmentation, SegmentationModel, load_model
from inference.volume import VolumeError, load_series_volume
from inference.weights import WeightsIdentity

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


@dataclass
class RunContext:
    """What a run inherits: the job's warnings so far (admission's) and the results it supersedes."""

    run: int = 1  # 1 for the job's first results; N for the N-th
    warnings: list[str] = field(default_factory=list)
    replaces: dict[str, Dataset] = field(default_factory=dict)  # result file name -> the earlier SR it replaces


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
        self.load_models()
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
        """Jobs left PROCESSING by a dead worker on this host go back to the queue (or fail at the crash limit).

        A locked database is waited for. Returns how many were queued again.
        """
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
                    failed = jobs.worker_died(session, job, self.settings.inference.max_worker_deaths)
                    log_worker_death(job, failed)
                    requeued += not failed
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
            job.stage = "claimed"
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
        stage = "start"
        try:
            context = self._run_context(claim)
            warnings = list(context.warnings)
            stage = self._stage(claim, "model")
            model = self._model(claim.model_name, timings)
            if model.is_test_weights and model.weights is not None:
                warnings += [w for w in [test_weights_warning(model.weights)] if w not in warnings]
            stage = self._stage(claim, "load")
            started = time.perf_counter()
            allow_partial = self.settings.inference.partial_series == "process"
            volume = load_series_volume(claim.instance_paths, allow_partial=allow_partial)
            timings["load"] = time.perf_counter() - started
            warnings += [note for note in volume.notes if note not in warnings]
            stage = self._stage(claim, "segment")
            segmentation = model.segment(volume)
            timings.update(segmentation.timings)
            stage = self._stage(claim, "measure")
            started = time.perf_counter()
            measurements = measure(volume, segmentation.labels, segmentation.classes)  # for the JSON and the SR
            stage = self._stage(claim, "write")
            output = self._write_outputs(claim, context.run, volume, segmentation, model, measurements, warnings)
            timings["write"] = time.perf_counter() - started
            stage = self._stage(claim, "encode")
            started = time.perf_counter()
            results = self._encode_results(claim, volume, segmentation, measurements, model, output, context, warnings)
            indexed = [read_file_header(path) for path in results]
            timings["encode"] = time.perf_counter() - started
        except (VolumeError, ModelUnavailable, EncodingError) as exc:
            self._finish(claim, JobState.FAILED, str(exc), timings)
            return
        except MemoryError:
            LOG.exception("job.out_of_memory", extra={"event_fields": {"job": claim.job_id, "stage": stage}})
            reason = f"not enough memory to process this series (stage {stage}); see the node's log for job {claim.job_id}"
            self._finish(claim, JobState.FAILED, reason, timings)
            return
        except Exception as exc:  # a model crash fails this job, not the worker
            if is_disk_full(exc):  # transient faults queue the job again, never fail it
                self._wait_for_disk(claim, exc, timings)
                return
            if is_database_locked(exc):
                self._wait_for_database(claim, timings)
                return
            LOG.exception("job.crashed", extra={"event_fields": {"job": claim.job_id, "stage": stage}})
            reason = f"processing stopped on an unexpected error in stage {stage}; the node's log has the details for job {claim.job_id}"
            self._finish(claim, JobState.FAILED, reason, timings)
            return
        job_folder = self.settings.jobs_directory / str(claim.job_id)  # every run's folder is in it: retention removes it whole
        self._finish(claim, JobState.SENDING if claim.destinations else JobState.DONE,
                     _result_reason(model, measurements, output, warnings), timings, job_folder, results, indexed, warnings)

    def _stage(self, claim: ClaimedJob, stage: str) -> str:
        """Record the stage this job is in (read by whoever finds this worker dead); returns it.

        A locked database is waited for, so a lock never costs the work done so far.
        """

        def record() -> None:
            with transaction(self.sessions) as session:
                jobs.set_stage(session, claim.job_id, stage)

        retry_when_locked(
            record,
            waiting=f"worker {self.identity} recording stage {stage} of job {claim.job_id}",
            limit_seconds=LOCKED_FINISH_LIMIT_SECONDS,
            wait_for_disk_space=True,
        )
        return stage

    def _run_context(self, claim: ClaimedJob) -> RunContext:
        """The job's warnings so far, which run this is, and the current results (SRs) it will supersede."""
        with self.sessions() as session:
            job = session.get_one(Job, claim.job_id)
            results = list(session.scalars(select(Series).where(Series.source_job_id == job.id)))
            current = [series for series in results if series.superseded_at is None]
            superseded_runs = len({series.superseded_at for series in results if series.superseded_at is not None})
            context = RunContext(run=superseded_runs + bool(current) + 1, warnings=list(job.warnings or []))
            for series in current:
                if series.modality != "SR":
                    continue
                for instance in series.instances:
                    earlier = Dataset()
                    earlier.SOPClassUID = instance.sop_class_uid
                    earlier.SOPInstanceUID = instance.sop_instance_uid
                    earlier.StudyInstanceUID = series.study.study_instance_uid
                    earlier.SeriesInstanceUID = series.series_instance_uid
                    context.replaces[Path(instance.path).name] = earlier
        return context

    def _encode_results(
        self,
        claim: ClaimedJob,
        volume,
        segmentation: Segmentation,
        measurements: list[StructureMeasurement],
        model,
        folder: Path,
        context: RunContext,
        warnings: list[str],
    ) -> list[str]:
        """SEG and SR files, one pair per SEG encoding wanted by the destinations or ``results`` (BINARY if none)."""
        destinations = [self.settings.destinations[d] for d in claim.destinations if d in self.settings.destinations]
        always = self.settings.results
        wanted = sorted({d.segmentation_type for d in destinations} | set(always.segmentation_types)) or ["BINARY"]
        rtstruct = always.rtstruct or any("rtstruct" in d.send for d in destinations)
        try:
            files = encode_results(
                volume, segmentation, measurements, model, folder, wanted, context.run, rtstruct=rtstruct,
                warnings=warnings, partial=any(jobs.is_partial_warning(w) for w in warnings), replaces=context.replaces,
                rtstruct_budget=ContourBudget(always.rtstruct_max_points_per_structure, always.rtstruct_max_megabytes),
            )
            return [str(p) for p in files]
        except (ValueError, KeyError) as exc:
            LOG.exception("job.encoding_failed", extra={"event_fields": {"job": claim.job_id}})
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
            model = self.models[name]
            log_event(
                LOG, logging.INFO, "model.loaded", model=name, algorithm=model.algorithm_name,
                version=model.algorithm_version, weights_sha256=model.weights.sha256 if model.weights else None,
                test_weights=model.is_test_weights, seconds=round(timings["model_load"], 2),
            )
            if model.is_test_weights:
                log_event(LOG, logging.WARNING, "model.test_weights", model=name, note=TEST_WEIGHTS_NOTE)
        return self.models[name]

    def load_models(self) -> None:
        """Load every model a processing rule names, before the first job (so no study waits for it).

        A model that cannot load is logged here; its jobs fail with the reason when they come.
        """
        names = dict.fromkeys(rule.model for rule in self.settings.rules if rule.action == "process" and rule.model)
        for name in names:
            try:
                self._model(name, {})
            except ModelUnavailable as exc:
                log_event(LOG, logging.ERROR, "model.unavailable", model=name, reason=str(exc))

    def _write_outputs(
        self,
        claim: ClaimedJob,
        run: int,
        volume,
        segmentation: Segmentation,
        model: SegmentationModel,
        measurements: list[StructureMeasurement],
        warnings: list[str],
    ) -> Path:
        """The run's folder: ``jobs/<job id>/`` for the first results, ``jobs/<job id>/run-<N>/`` after."""
        import SimpleITK as sitk

        folder = self.settings.jobs_directory / str(claim.job_id)
        if run > 1:
            folder = folder / f"run-{run}"
        folder.mkdir(parents=True, exist_ok=True)
        image = sitk.GetImageFromArray(segmentation.labels)
        image.CopyInformation(volume.to_sitk())
        sitk.WriteImage(image, str(folder / "labels.nii.gz"), useCompression=True)
        write_measurements_json(folder / "measurements.json", measurements, algorithm_description(model))
        (folder / "segmentation.json").write_text(
            json.dumps(
                {
                    "series_instance_uid": claim.series_instance_uid,
                    "model": claim.model_name,
                    "algorithm_name": model.algorithm_name,
                    "algorithm_version": model.algorithm_version,
                    "baseline": model.is_baseline,
                    "weights": model.weights.as_dict() if model.weights else None,
                    "classes": {str(k): v for k, v in segmentation.classes.items()},
                    "source_instances": [
                        {"sop_instance_uid": s.sop_instance_uid, "frame_number": s.frame_number} for s in volume.slices
                    ],
                    "run": run,
                    "warnings": warnings,
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
        warnings: list[str] | None = None,
    ) -> None:
        """Record the job's outcome. A locked database is waited for: a finished result is never thrown away."""
        try:
            recorded = retry_when_locked(
                lambda: self._finish_once(claim, state, reason, timings, output, results, indexed, warnings),
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
        warnings: list[str] | None,
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
                jobs.append_warnings(job, warnings or [])
                record_results(session, job.id, indexed or [])  # Q/R answers from these rows
            jobs.change_state(session, job, state, reason)
        return True

    def _wait_for_disk(self, claim: ClaimedJob, error: BaseException, timings: dict[str, float]) -> None:
        """Processing found the disk full: queue the job again, to be tried after ``storage.disk_full_retry_seconds``."""
        until = utcnow() + timedelta(seconds=self.settings.storage.disk_full_retry_seconds)
        detail = getattr(error, "strerror", None) or "no space left on device"
        reason = (
            f"waiting for disk space: {detail.lower()} while writing the results in {self.settings.jobs_directory}; "
            f"tried again from {until:%H:%M:%S} UTC"
        )
        self._defer(claim, until, reason, timings)
        log_event(LOG, logging.WARNING, "job.waiting_for_disk", job=claim.job_id, reason=reason)

    def _wait_for_database(self, claim: ClaimedJob, timings: dict[str, float]) -> None:
        """Processing found the database locked past its busy timeout: queue the job again at once."""
        reason = "waiting for the database: another process held it locked while the series was processed; queued again"
        self._defer(claim, utcnow(), reason, timings)
        log_event(LOG, logging.WARNING, "job.waiting_for_database", job=claim.job_id, reason=reason)

    def _defer(self, claim: ClaimedJob, until: datetime, reason: str, timings: dict[str, float]) -> None:
        """Put a job that met a transient fault back to QUEUED (``jobs.defer``), waiting out a locked or full database."""

        def defer_once() -> None:
            with transaction(self.sessions) as session:
                job = session.get_one(Job, claim.job_id)
                job.timings = {key: round(value, 3) for key, value in timings.items()}
                if job.state is JobState.PROCESSING and job.claimed_by == self.identity:
                    jobs.defer(session, job, until, reason)

        with contextlib.suppress(DatabaseBusy):  # logged by retry_when_locked; the job stays PROCESSING till restart
            retry_when_locked(
                defer_once,
                waiting=f"worker {self.identity} queuing job {claim.job_id} again",
                limit_seconds=LOCKED_FINISH_LIMIT_SECONDS,
                wait_for_disk_space=True,
            )


TEST_WEIGHTS_NOTE = "test weights (random, not a trained model): the structures are not anatomy; not for clinical use"


def test_weights_warning(weights: WeightsIdentity) -> str:
    """The warning every result made with synthetic or untrained weights carries."""
    return f"made with {TEST_WEIGHTS_NOTE} ({weights.version})"


def algorithm_description(model: SegmentationModel) -> dict[str, object]:
    """What made a result: written beside the figures in measurements.json."""
    return {
        "name": model.algorithm_name,
        "version": model.algorithm_version,
        "baseline": model.is_baseline,
        "test_weights": model.is_test_weights,
        "weights": model.weights.as_dict() if model.weights else None,
    }


def _result_reason(model: SegmentationModel, measurements: list[StructureMeasurement], output: Path, warnings: list[str]) -> str:
    """E.g. "segmented with 2 warning(s) (baseline, not a trained model): w1; w2; 4 structures; results in ..."."""
    baseline = " (baseline, not a trained model)" if model.is_baseline else ""
    caveats = f" with {len(warnings)} warning(s)" if warnings else ""
    listed = "".join(f"{warning}; " for warning in warnings)
    return f"segmented{caveats}{baseline}: {listed}{len(measurements)} structures; results in {output}"


def log_worker_death(job: Job, failed: bool) -> None:
    """One log line per job whose worker died: ERROR when the crash limit failed it."""
    log_event(
        LOG, logging.ERROR if failed else logging.WARNING, "job.worker_died", job=job.id,
        worker=job.claimed_by, stage=job.stage, deaths=job.worker_deaths, reason=job.reason,
    )


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def run_worker(settings: Settings, parent_pid: int | None = None) -> None:
    """Entry point of a worker process (`dicom-node worker`, or started by `serve`, which passes its pid)."""
    import signal

    from dicom_node.logs import configure_logging
    from dicom_node.service import open_database

    configure_logging(settings.logging.level, settings.logging.format)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    parent = parent_pid if parent_pid is not None else os.getppid()
    threading.Thread(target=_stop_when_orphaned, args=(stop, parent), name="parent-watch", daemon=True).start()
    InferenceWorker(settings, open_database(settings)).run(stop)


def _stop_when_orphaned(stop: threading.Event, parent: int, interval_seconds: float = 1.0) -> None:
    """Stop the worker when the process that started it is gone (``serve`` killed, or its shell closed).

    A worker outliving a killed ``serve`` would hold its models' memory and keep claiming
    jobs beside the workers of the next ``serve``. The job it is running finishes first.
    """
    while True:
        if os.getppid() != parent:
            log_event(LOG, logging.WARNING, "worker.orphaned", worker=f"{socket.gethostname()}:{os.getpid()}",
                      reason=f"the process that started it ({parent}) is gone; stopping after the current job")
            stop.set()
        if stop.wait(interval_seconds):
            return
