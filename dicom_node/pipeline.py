"""One job's pipeline: load → segment → measure → encode → describe the results.

:func:`run_pipeline` takes a claimed job (:class:`ClaimedJob`, read from the database by
the worker) and returns what became of it (:class:`Processed`, :class:`Failed` or
:class:`Deferred`); it writes files only in the job's folder and touches the database
only through the ``on_stage`` callback. The claim, the lease and recording the outcome
are the worker's (:mod:`dicom_node.worker`).

What a result does not cover (images left out, values assumed) becomes the job's
``warnings``, the SR's comment, and "PARTIAL" in the result descriptions. A re-run
writes into ``jobs/<job id>/run-<N>/`` and supersedes the earlier run's results.

Every claim writes into a staging folder of its own (``jobs/<job id>/.claim-<attempt>-<random>/``);
the worker moves the files into the run's folder (:func:`publish`) only in the transaction that
finds the job still its own. A worker that lost its lease (a pause longer than the lease, a lost
database connection) therefore never overwrites the results of the worker that took the job over.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path

from pydicom.dataset import Dataset

from db import jobs
from db.ingest import InstanceRecord
from db.models import JobState, utcnow
from db.results import ResultFile
from db.session import DatabaseBusy, is_database_locked, is_database_storage_fault, storage_fault_cause
from dicom_node.config import Settings
from dicom_node.encode.measurements import StructureMeasurement, measure, write_measurements_json
from dicom_node.encode.results import EncodingError, encode_results
from dicom_node.encode.rtstruct import ContourBudget
from dicom_node.encode.sr import node_device_uid
from dicom_node.logs import log_event, os_error_text
from dicom_node.provenance import RecordedWeights
from dicom_node.receive.header import read_file_header
from dicom_node.receive.storage import fsync_folder, fsync_path, is_disk_full
from inference.models import (
    ModelUnavailable,
    Segmentation,
    SegmentationFailed,
    SegmentationModel,
    load_model,
    run_parameters,
)
from inference.models.prefetch import VolumePrefetcher
from inference.volume import Volume, VolumeError, load_series_volume
from inference.weights import WeightsIdentity

LOG = logging.getLogger(__name__)

TEST_WEIGHTS_NOTE = "test weights (random, not a trained model): the structures are not anatomy; not for clinical use"


@dataclass(frozen=True)
class ClaimedJob:
    """What the pipeline needs of a claimed job, read in the claim's transaction."""

    job_id: int
    series_instance_uid: str
    model_name: str
    instance_paths: list[Path]
    destinations: list[str]
    attempt: int
    run: int = 1  # 1 for the job's first results; N for the N-th
    warnings: list[str] = field(default_factory=list)  # the job's warnings so far (admission's)
    replaces: dict[str, Dataset] = field(default_factory=dict)  # SEG encoding -> the earlier run's SR it replaces
    claim_seconds: float = 0.0  # how long the claim took (kept with the job's timings as "claim")
    patient_name: str | None = None  # the study's recorded name: the results of a series spelling it two ways carry it


@dataclass(frozen=True)
class Processed:
    """Results made: SENDING (destinations wait for them) or DONE."""

    state: JobState
    reason: str
    job_folder: Path  # every run's folder is in it: retention removes it whole
    files: list[ResultFile]  # in ``staged`` until :func:`publish` moves them into ``run_folder``
    indexed: list[InstanceRecord]  # the files' headers, for query/retrieve
    warnings: list[str]
    timings: dict[str, float]
    staged: Path | None = None  # this claim's own folder; None once published
    run_folder: Path | None = None  # where the results go: jobs/<id>/ or jobs/<id>/run-<N>/
    made_by: str = ""  # the model and weights that made them, for the job's history (:func:`made_by`)


@dataclass(frozen=True)
class Failed:
    """The series cannot be processed; ``reason`` says why, for the operator."""

    reason: str
    timings: dict[str, float]


@dataclass(frozen=True)
class Deferred:
    """A transient fault (full disk, locked or unwritable database): queue the job again, to be claimed from
    ``until``."""

    until: datetime
    reason: str
    event: str  # the log event: job.waiting_for_disk, job.waiting_for_database
    timings: dict[str, float]


PipelineResult = Processed | Failed | Deferred


class ModelCache:
    """The models a worker keeps resident between jobs, loaded on first use.

    ``latest_weights`` (the worker's: :func:`dicom_node.provenance.latest_weights`) tells the weights a model's
    latest recorded results were made with: a model loaded with other weights says so (``model.weights_changed``).
    """

    def __init__(
        self, settings: Settings, latest_weights: Callable[[str], RecordedWeights | None] | None = None
    ) -> None:
        self.settings = settings
        self.latest_weights = latest_weights
        self.models: dict[str, SegmentationModel] = {}

    def get(self, name: str, timings: dict[str, float]) -> SegmentationModel:
        """The model ``name`` (loading it records ``model_load`` in ``timings``).

        Raises
        ------
        ModelUnavailable
            If no such model is configured, or it cannot be loaded.
        """
        if name not in self.models:
            settings = self.settings.models.get(name)
            if settings is None:
                raise ModelUnavailable(f"model {name!r} is not configured (models: {', '.join(self.settings.models)})")
            started = time.perf_counter()
            try:
                self.models[name] = load_model(
                    settings,
                    self.settings.weights_directory,
                    device=self.settings.inference.device,
                    cpu_threads=self.settings.inference.cpu_threads,
                    name=name,
                )
            except (ModelUnavailable, MemoryError):
                raise
            except Exception as exc:  # a worker that cannot load a model must keep serving: its jobs say why
                if is_disk_full(exc) or is_database_locked(exc):
                    raise  # transient: the job is queued again (a full disk while OpenVINO caches its model)
                LOG.exception("model.load_failed", extra={"event_fields": {"model": name}})
                folder = getattr(settings, "weights_directory", None) or self.settings.weights_directory
                raise ModelUnavailable(
                    f"model {name!r} could not be loaded from {folder}: "
                    "its weights could not be read (the details are in the worker's log, model.load_failed); import the "
                    "weights again"
                ) from exc
            timings["model_load"] = time.perf_counter() - started
            model = self.models[name]
            log_event(
                LOG,
                logging.INFO,
                "model.loaded",
                model=name,
                algorithm=model.algorithm_name,
                version=model.algorithm_version,
                weights_sha256=model.weights.sha256 if model.weights else None,
                test_weights=model.is_test_weights,
                seconds=round(timings["model_load"], 2),
            )
            if model.is_test_weights:
                log_event(LOG, logging.WARNING, "model.test_weights", model=name, note=TEST_WEIGHTS_NOTE)
            self._say_if_weights_changed(name, model)
        return self.models[name]

    def _say_if_weights_changed(self, name: str, model: SegmentationModel) -> None:
        """Warn when ``model`` was loaded with other weights than its latest recorded results were made with: new
        weights were installed since (a worker ``serve`` started again after one died or ran past its time limit
        takes the weights installed now, while the others keep the ones they loaded)."""
        if model.weights is None or self.latest_weights is None:
            return
        try:
            earlier = self.latest_weights(name)
        except Exception:  # noqa: BLE001 - only a comparison for the log: every result records its weights anyway
            LOG.warning("Could not read which weights model %r last made results with; not compared.", name)
            return
        if earlier is None or earlier.sha256 == model.weights.sha256:
            return
        log_event(
            LOG,
            logging.WARNING,
            "model.weights_changed",
            model=name,
            weights_sha256=model.weights.sha256,
            earlier_weights_sha256=earlier.sha256,
            earlier_job=earlier.job_id,
            earlier_at=earlier.at.isoformat(timespec="seconds"),
            note=(
                f"this worker makes model {name}'s results with the weights installed now, not the ones its results "
                f"were made with until job {earlier.job_id}; workers still running keep the weights they loaded "
                "until they are started again: restart the node to have every worker use the same weights"
            ),
        )

    def load_all(self) -> None:
        """Load every model a processing rule names, before the first job (so no study waits for it).

        A model that cannot load is logged here; its jobs fail with the reason when they come.
        """
        names = dict.fromkeys(rule.model for rule in self.settings.rules if rule.action == "process" and rule.model)
        for name in names:
            try:
                self.get(name, {})
            except ModelUnavailable as exc:
                log_event(LOG, logging.ERROR, "model.unavailable", model=name, reason=str(exc))
            except Exception:  # memory, a full disk: loaded again by its first job, which waits or fails with why
                LOG.exception(
                    "model.unavailable",
                    extra={
                        "event_fields": {"model": name, "reason": "not loaded before the first job; it tries again"}
                    },
                )


def _prefetch_next(
    prefetcher: VolumePrefetcher, next_series: Callable[[], Sequence[Path]], allow_partial: bool, job_id: int
) -> None:
    """Start decoding the next queued series; a failure here only costs the head start, never the job."""
    try:
        paths = next_series()
        if paths:
            prefetcher.prefetch(paths, allow_partial=allow_partial)
    except Exception:  # noqa: BLE001 - the next job decodes its series itself, and reports any problem then
        LOG.warning(
            "Could not look ahead at the next queued series during job %d; it will be decoded when claimed.", job_id
        )


def run_pipeline(
    claim: ClaimedJob,
    settings: Settings,
    models: ModelCache,
    on_stage: Callable[[str], None],
    prefetcher: VolumePrefetcher | None = None,
    next_series: Callable[[], Sequence[Path]] | None = None,
) -> PipelineResult:
    """Segment a claimed job's series and write its results; never raises for a bad series.

    ``on_stage`` is called with each stage's name as it starts (the worker records it on
    the job, for whoever finds the worker dead). With a ``prefetcher``, the volume is taken
    from it (decoded again unless its files are unchanged), and the files ``next_series``
    names are handed to it just before segmentation, to be decoded in the background.
    """
    timings: dict[str, float] = {}
    stage = "start"
    staged: Path | None = None
    succeeded = False

    def enter(name: str) -> str:
        on_stage(name)
        return name

    try:
        # A note on where this run is sent is the job's, not the result's: it stays out of the SR and its reason.
        warnings = [w for w in claim.warnings if not jobs.is_earlier_results_warning(w)]
        stage = enter("model")
        model = models.get(claim.model_name, timings)
        if model.is_test_weights and model.weights is not None:
            warnings += [w for w in [test_weights_warning(model.weights)] if w not in warnings]
        stage = enter("load")
        started = time.perf_counter()
        allow_partial = settings.inference.partial_series == "process"
        if prefetcher is None:
            volume = load_series_volume(claim.instance_paths, allow_partial=allow_partial)
        else:
            volume = prefetcher.take(claim.instance_paths, allow_partial=allow_partial)
        timings["load"] = time.perf_counter() - started
        warnings += [note for note in volume.notes if note not in warnings]
        if prefetcher is not None and next_series is not None:
            _prefetch_next(prefetcher, next_series, allow_partial, claim.job_id)
        stage = enter("segment")
        segmentation = model.segment(volume)
        timings.update(segmentation.timings)
        stage = enter("measure")
        started = time.perf_counter()
        measurements = measure(volume, segmentation.labels, segmentation.classes)  # for the JSON and the SR
        stage = enter("write")
        staged = staging_folder(settings, claim)
        folder = write_outputs(settings, claim, volume, segmentation, model, measurements, warnings, staged)
        timings["write"] = time.perf_counter() - started
        stage = enter("encode")
        started = time.perf_counter()
        files = _encode(settings, claim, volume, segmentation, measurements, model, folder, warnings)
        indexed = [read_file_header(file.path) for file in files]
        timings["encode"] = time.perf_counter() - started
        succeeded = True
    except (VolumeError, ModelUnavailable, SegmentationFailed, EncodingError) as exc:
        return Failed(str(exc), timings)
    except MemoryError:
        LOG.exception("job.out_of_memory", extra={"event_fields": {"job": claim.job_id, "stage": stage}})
        reason = f"not enough memory to process this series (stage {stage}); see the node's log for job {claim.job_id}"
        return Failed(reason, timings)
    except Exception as exc:
        if is_disk_full(exc):  # transient faults queue the job again, never fail it
            return _waiting_for_disk(settings, exc, timings)
        waiting = _waiting_for_database(exc, timings)
        if waiting is not None:
            return waiting
        error = os_error_in(exc)
        if error is not None:
            return os_error_outcome(settings, error, stage, timings)
        LOG.exception("job.crashed", extra={"event_fields": {"job": claim.job_id, "stage": stage}})
        reason = f"processing stopped on an unexpected error in stage {stage}; the node's log has the details for job {claim.job_id}"
        return Failed(reason, timings)
    finally:
        if not succeeded and staged is not None:
            shutil.rmtree(staged, ignore_errors=True)  # this claim's partial results: nothing else uses them
    return Processed(
        state=JobState.SENDING if claim.destinations else JobState.DONE,
        reason=_result_reason(model, measurements, run_folder(settings, claim), warnings),
        job_folder=settings.jobs_directory / str(claim.job_id),
        files=files,
        indexed=indexed,
        warnings=warnings,
        timings=timings,
        staged=staged,
        run_folder=run_folder(settings, claim),
        made_by=made_by(claim.model_name, model),
    )


def _waiting_for_disk(settings: Settings, error: BaseException, timings: dict[str, float]) -> Deferred:
    """Processing found the disk full: queue the job again, to be tried after ``storage.disk_full_retry_seconds``."""
    until = utcnow() + timedelta(seconds=settings.storage.disk_full_retry_seconds)
    detail = getattr(error, "strerror", None) or "no space left on device"
    reason = (
        f"waiting for disk space: {detail.lower()} while writing the results in {settings.jobs_directory}; "
        f"tried again from {until:%H:%M:%S} UTC"
    )
    return Deferred(until, reason, "job.waiting_for_disk", timings)


def _waiting_for_database(error: BaseException, timings: dict[str, float]) -> Deferred | None:
    """A database that could not be used for a while (locked, its file unreadable or unwritable, or so for longer
    than the worker waits): the job is queued again, never failed nor counted as a crash; None for any other error."""
    if is_database_locked(error):
        why = "another process held it locked while the series was processed"
    elif is_database_storage_fault(error):
        why = f"{storage_fault_cause(error)} while the series was processed"
    elif isinstance(error, DatabaseBusy):
        why = str(error)  # "the database is locked by another process for 600 s while worker ... recording ..."
    else:
        return None
    reason = f"waiting for the database: {why}; queued again"
    return Deferred(utcnow(), reason, "job.waiting_for_database", timings)


RESULTS_FOLDER_FAULTS = frozenset(
    {errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.ENOENT, errno.ESTALE, errno.ENOTCONN}
)
"""Errors of the results folder an administrator fixes (read-only, failing, no access, gone): the job waits."""
RESULTS_STAGES = frozenset({"write", "encode", "publish"})
"""The stages that write in the results folder (``publish`` moves the files into the run's folder)."""
DOING_IN_STAGE = {
    "model": "loading the model",
    "load": "reading the series' images",
    "write": "writing the results",
    "encode": "writing the results",
    "publish": "moving the results into place",
}


def os_error_in(error: BaseException) -> OSError | None:
    """The operating system's error that ``error`` is, or was raised from; None when there is none."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and (seen.errno is not None or seen.filename is not None):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def os_error_outcome(settings: Settings, error: OSError, stage: str, timings: dict[str, float]) -> Deferred | Failed:
    """What an error of the operating system in ``stage`` makes of the job, in words naming the file and the error.

    A full disk, or in the results folder an error an administrator fixes (read-only, failing, no access, gone:
    :data:`RESULTS_FOLDER_FAULTS`), makes the job wait: it is queued again, to be tried after
    ``storage.disk_full_retry_seconds``, so it runs once the folder is fixed. Any other such error fails the job
    with that sentence.
    """
    if is_disk_full(error):
        return _waiting_for_disk(settings, error, timings)
    doing = DOING_IN_STAGE.get(stage, f"in stage {stage}")
    text = os_error_text(error)
    in_results = _in_results_folder(settings, error, stage)
    if in_results and not error.filename:
        text = f"{text} in {settings.jobs_directory}"
    if in_results and error.errno in RESULTS_FOLDER_FAULTS:
        until = utcnow() + timedelta(seconds=settings.storage.disk_full_retry_seconds)
        reason = (
            f"waiting for the results folder {settings.jobs_directory} to be usable: {text} while {doing}; "
            f"tried again from {until:%H:%M:%S} UTC"
        )
        return Deferred(until, reason, "job.waiting_for_results_folder", timings)
    return Failed(f"processing stopped on an error of the operating system while {doing}: {text}", timings)


def _in_results_folder(settings: Settings, error: OSError, stage: str) -> bool:
    """Whether ``error`` concerns the results folder: a file it names is there, or (naming none) it came while
    writing the results."""
    named = [Path(os.fsdecode(name)) for name in (error.filename, error.filename2) if isinstance(name, (str, bytes))]
    if not named:
        return stage in RESULTS_STAGES
    folder = Path(os.path.abspath(settings.jobs_directory))
    return any(Path(os.path.abspath(path)).is_relative_to(folder) for path in named)


def _encode(
    settings: Settings,
    claim: ClaimedJob,
    volume: Volume,
    segmentation: Segmentation,
    measurements: list[StructureMeasurement],
    model: SegmentationModel,
    folder: Path,
    warnings: list[str],
) -> list[ResultFile]:
    """SEG and SR files, one pair per SEG encoding wanted by the destinations or ``results`` (BINARY if none)."""
    destinations = [settings.destinations[d] for d in claim.destinations if d in settings.destinations]
    always = settings.results
    wanted = sorted({d.segmentation_type for d in destinations} | set(always.segmentation_types)) or ["BINARY"]
    rtstruct = always.rtstruct or any("rtstruct" in d.send for d in destinations)
    try:
        return encode_results(
            volume,
            segmentation,
            measurements,
            model,
            folder,
            wanted,
            claim.run,
            rtstruct=rtstruct,
            warnings=warnings,
            partial=any(jobs.is_partial_warning(w) for w in warnings),
            replaces=claim.replaces,
            rtstruct_budget=ContourBudget(always.rtstruct_max_points_per_structure, always.rtstruct_max_megabytes),
            device_uid=node_device_uid(settings.storage.directory),
            patient_name=claim.patient_name,
        )
    except (ValueError, KeyError) as exc:
        LOG.exception("job.encoding_failed", extra={"event_fields": {"job": claim.job_id}})
        raise EncodingError(f"results cannot be encoded: {_encoding_failure(exc)}") from None


def _encoding_failure(error: ValueError | KeyError) -> str:
    """Why encoding failed, in words: a missing value named by its DICOM keyword, not a bare ``KeyError``'s key."""
    if not isinstance(error, KeyError):
        return str(error)
    key = error.args[0] if error.args else None
    if key is None:
        return "a value they need is missing (the node's log says which)"
    if isinstance(key, int):
        from pydicom.datadict import keyword_for_tag
        from pydicom.tag import Tag

        tag = Tag(key)
        key = f"{keyword_for_tag(tag) or 'the private attribute'} {tag}"
    return f"a value they need, {key}, is missing (the node's log says where)"


def write_outputs(
    settings: Settings,
    claim: ClaimedJob,
    volume: Volume,
    segmentation: Segmentation,
    model: SegmentationModel,
    measurements: list[StructureMeasurement],
    warnings: list[str],
    folder: Path | None = None,
) -> Path:
    """Label map, measurements and description into ``folder`` (default: the run's folder); returns it."""
    import SimpleITK as sitk

    folder = folder or run_folder(settings, claim)
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
                "run": claim.run,
                "warnings": warnings,
            },
            indent=2,
        )
    )
    return folder


def run_folder(settings: Settings, claim: ClaimedJob) -> Path:
    """The run's folder: ``jobs/<job id>/`` for the first results, ``jobs/<job id>/run-<N>/`` after."""
    folder = settings.jobs_directory / str(claim.job_id)
    return folder / f"run-{claim.run}" if claim.run > 1 else folder


STAGING_PREFIX = ".claim-"


def staging_folder(settings: Settings, claim: ClaimedJob) -> Path:
    """A new folder of this claim's own, inside the job's folder (so retention removes it with the job)."""
    job_folder = settings.jobs_directory / str(claim.job_id)
    job_folder.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{claim.attempt}-", dir=job_folder))


def publish(result: Processed) -> Processed:
    """Move a claim's results from its staging folder into the run's folder; the result with the final paths.

    Call it only while the job is still this worker's (in the transaction that records the outcome). Each file
    is synced to disk, then renamed into place, replacing a file of the same name a claim before left
    unrecorded; then the folder is synced and the staging folder removed, with those earlier claims left behind
    (a worker that died, or one still running that lost its lease and will find its result discarded).
    """
    if result.staged is None or result.run_folder is None:
        return result
    target = result.run_folder
    if result.staged.exists():  # absent when a transaction that published it is run again
        target.mkdir(parents=True, exist_ok=True)
        for file in sorted(result.staged.iterdir()):
            if file.is_file():
                fsync_path(file)  # on disk before its name is: after a power cut a recorded result is never empty
                os.replace(file, target / file.name)
        fsync_folder(target)
        shutil.rmtree(result.staged, ignore_errors=True)
    for left in result.staged.parent.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(left, ignore_errors=True)

    def moved(path: str) -> str:
        return str(target / Path(path).name)

    return replace(
        result,
        files=[replace(file, path=moved(file.path)) for file in result.files],
        indexed=[replace(record, path=moved(record.path)) for record in result.indexed],
        staged=None,
    )


def discard(result: PipelineResult) -> None:
    """Remove the staging folder of results that will not be recorded (the job is no longer this worker's)."""
    if isinstance(result, Processed) and result.staged is not None:
        shutil.rmtree(result.staged, ignore_errors=True)


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
        "parameters": run_parameters(model),  # device, backend, precision, tile step, mirroring
    }


def made_by(model_name: str, model: SegmentationModel) -> str:
    """What made a run's results, for the job's history (:mod:`dicom_node.provenance`): the model's name, the
    algorithm and its version, the weights' whole SHA-256, and how the network ran (:func:`run_parameters`), e.g.
    "model ts: TotalSegmentator total_fast Dataset297 sha256:e7a03ab88bf64f5e, weights sha256:e7a0…, device cpu,
    backend torch, precision fp32, tile_step_size 0.8, mirroring off, labels totalsegmentator 2.18.0"."""
    parts = [f"model {model_name}: {model.algorithm_name} {model.algorithm_version}"]
    if model.weights is not None:
        test = " (test weights, not a trained model)" if model.is_test_weights else ""
        parts.append(f"weights sha256:{model.weights.sha256}{test}")
    parts += [f"{key} {value}" for key, value in run_parameters(model).items()]
    return ", ".join(parts)


def _result_reason(
    model: SegmentationModel, measurements: list[StructureMeasurement], output: Path, warnings: list[str]
) -> str:
    """E.g. "segmented with 2 warning(s) (baseline, not a trained model): w1; w2; 4 structures; results in ..."."""
    baseline = " (baseline, not a trained model)" if model.is_baseline else ""
    caveats = f" with {len(warnings)} warning(s)" if warnings else ""
    listed = "".join(f"{warning}; " for warning in warnings)
    return f"segmented{caveats}{baseline}: {listed}{len(measurements)} structures; results in {output}"
