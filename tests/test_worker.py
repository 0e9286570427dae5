"""The inference worker and the baseline model, on phantoms with known anatomy."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image
from sqlalchemy import select, text, update

from db import jobs
from db.ingest import InstanceRecord, record_instance
from db.jobs import job_for_series_uid
from db.models import Instance, Job, JobState, Series, utcnow
from db.session import make_engine, make_session_factory, migrate, transaction
from dicom_node.config import Settings
from dicom_node.phantom import PHANTOM_LABELS, PhantomSpec, write_phantom_series
from dicom_node.pipeline import STAGING_PREFIX
from dicom_node.worker import InferenceWorker, prefetch_enabled
from dicom_node.worker_watch import requeue_jobs_of_previous_run
from inference.models import HALF_PRECISION_OVERFLOW, SegmentationFailed
from inference.models.prefetch import VolumePrefetcher
from inference.models.threshold import ThresholdModel
from inference.volume import load_series_volume
from tests.conftest import CT_RULES, ct_instance, drive_job_to, storescu, wait_for

PHANTOM = PhantomSpec(rows=128, columns=128, slices=40, pixel_spacing=(3.0, 3.0), slice_spacing=4.0, noise_sd=5.0)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_threshold_baseline_finds_body_lungs_on_the_right_sides_and_bone(tmp_path):
    series = write_phantom_series(tmp_path, PHANTOM)
    truth = series.labels

    result = ThresholdModel().segment(load_series_volume(series.files))

    assert dice(result.labels == 2, truth == PHANTOM_LABELS["lung_left"]) > 0.8
    assert dice(result.labels == 3, truth == PHANTOM_LABELS["lung_right"]) > 0.8
    assert dice(result.labels > 0, truth > 0) > 0.95
    assert dice(result.labels == 4, truth == PHANTOM_LABELS["spine"]) > 0.7
    assert ThresholdModel.is_baseline and "baseline" in ThresholdModel.algorithm_name


SHORT_CHEST = PhantomSpec(rows=128, columns=128, slices=24, pixel_spacing=(3.0, 3.0), slice_spacing=3.0, noise_sd=0.0)
"""72 mm head-feet that end inside the lungs (they reach 68 mm up): they touch the scan's upper end."""
ACQUISITIONS = {
    "axial HFS": SHORT_CHEST,
    "axial FFS": replace(SHORT_CHEST, orientation=(-1, 0, 0, 0, 1, 0)),
    "axial prone": replace(SHORT_CHEST, orientation=(-1, 0, 0, 0, -1, 0)),
    "coronal": replace(SHORT_CHEST, rows=24, slices=128, orientation=(1, 0, 0, 0, 0, -1)),
    "sagittal": replace(SHORT_CHEST, rows=24, slices=128, orientation=(0, 1, 0, 0, 0, -1)),
}
"""One anatomy on one grid of patient positions, acquired in several planes and patient positions."""


@pytest.fixture(scope="module")
def axial_voxels(tmp_path_factory) -> dict[int, int]:
    series = write_phantom_series(tmp_path_factory.mktemp("axial"), ACQUISITIONS["axial HFS"])
    labels = ThresholdModel().segment(load_series_volume(series.files)).labels
    return {int(label): int(count) for label, count in zip(*np.unique(labels, return_counts=True), strict=True)}


@pytest.mark.parametrize("acquisition", ACQUISITIONS)
def test_threshold_baseline_gives_the_same_structures_and_sides_whatever_the_acquisition_plane(
    acquisition, tmp_path, axial_voxels
):
    series = write_phantom_series(tmp_path, ACQUISITIONS[acquisition])

    labels = ThresholdModel().segment(load_series_volume(series.files)).labels

    voxels = {int(label): int(count) for label, count in zip(*np.unique(labels, return_counts=True), strict=True)}
    assert voxels.keys() == axial_voxels.keys() == {0, 1, 2, 3, 4}
    assert all(voxels[label] == pytest.approx(axial_voxels[label], rel=0.01) for label in voxels)
    assert dice(labels == 2, series.labels == PHANTOM_LABELS["lung_left"]) > 0.95  # the patient's left lung
    assert dice(labels == 3, series.labels == PHANTOM_LABELS["lung_right"]) > 0.95


@pytest.mark.integration
def test_served_node_segments_a_received_series_with_the_baseline(tmp_path, start_node):
    series = write_phantom_series(tmp_path / "ct", PHANTOM)
    node = start_node(rules=CT_RULES, inference={"workers": 1})

    assert storescu(node.port, series.files).returncode == 0

    node.wait_for_state(series.series_instance_uid, JobState.DONE, timeout=120)
    with node.sessions() as session:
        job = job_for_series_uid(session, series.series_instance_uid)
        assert {"load", "predict", "write"} <= set(job.timings) and "model_load" not in job.timings  # loaded at start
        assert job.reason.startswith("segmented (baseline, not a trained model): 4 structures")
        folder = Path(job.result_path)
        assert [Path(f).name for f in job.result_files] == ["seg-binary.dcm", "sr-binary.dcm"]  # no RTSTRUCT asked
    preview = Image.open(folder / "preview.png")
    assert preview.format == "PNG" and preview.size == (5 * 256, 256)
    lung_colour = (71, 232, 244)  # lung_left's display colour, blended over the grey CT
    pixels = np.asarray(preview.convert("RGB")).reshape(-1, 3).astype(int)
    assert (pixels[:, 2] - pixels[:, 0] > 60).any(), f"no lung-coloured ({lung_colour}) overlay in the preview"
    seg = pydicom.dcmread(folder / "seg-binary.dcm")
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == series.study_instance_uid
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [
        "Body without lungs and bone",
        "Left lung",
        "Right lung",
        "Skeleton",
    ]
    labels = sitk.ReadImage(str(folder / "labels.nii.gz"))
    assert labels.GetSize() == (128, 128, 40)
    np.testing.assert_allclose(labels.GetOrigin(), series.slice_positions[0])
    written = json.loads((folder / "measurements.json").read_text())
    assert written["algorithm"]["name"] == "dicom-node threshold baseline (not a trained model)"
    measurements = written["structures"]
    assert set(measurements) == {"body", "lung_left", "lung_right", "skeleton"}
    assert measurements["lung_left"]["mean_hu"] < -700 and measurements["body"]["cut_by_scan_edge"] is True
    description = json.loads((folder / "segmentation.json").read_text())
    assert description["baseline"] is True
    assert description["classes"] == {"1": "body", "2": "lung_left", "3": "lung_right", "4": "skeleton"}
    assert [s["sop_instance_uid"] for s in description["source_instances"]] == series.sop_instance_uids
    assert "model.loaded model=baseline" in node.log()
    shown = node.cli("show", series.series_instance_uid).stdout
    assert "timings  load" in shown and f"results  {folder}" in shown
    assert "made by  dicom-node threshold baseline (not a trained model)" in shown
    # the model was loaded when the worker started, before the series came
    assert node.log().index("model.loaded model=baseline") < node.log().index("job.processing")


@pytest.mark.integration
def test_series_with_missing_slices_fails_with_the_reason(tmp_path, start_node):
    series = write_phantom_series(tmp_path / "ct", replace(PHANTOM, gaps=(20,)))
    node = start_node(rules=CT_RULES, inference={"workers": 1})

    storescu(node.port, series.files)

    node.wait_for_state(series.series_instance_uid, JobState.FAILED, timeout=120)
    assert "about 1 missing slice(s)" in node.job_reason(series.series_instance_uid)


@pytest.fixture
def worker_setup(tmp_path):
    """A database holding one QUEUED phantom series and a worker for it (in this process)."""
    return _queued_phantom(tmp_path, Settings(storage={"directory": tmp_path / "storage"}, inference={"workers": 0}))


@pytest.fixture
def pg_worker_setup(tmp_path, postgresql_url):
    """The same on PostgreSQL, for the races SQLite cannot have (its writers take turns)."""
    settings = Settings(
        storage={"directory": tmp_path / "storage"}, inference={"workers": 0}, database={"url": postgresql_url}
    )
    return _queued_phantom(tmp_path, settings)


def _queued_phantom(tmp_path: Path, settings: Settings):
    migrate(settings.database_url)
    sessions = make_session_factory(make_engine(settings.database_url))
    series = write_phantom_series(tmp_path / "ct", PHANTOM)
    with transaction(sessions) as session:
        for path, uid in zip(series.files, series.sop_instance_uids, strict=True):
            record_instance(session, _record(series, path, uid))
        job = session.scalars(select(Job)).one()
        job.destinations = []
        drive_job_to(session, job, JobState.QUEUED)
    return settings, sessions, series


def _record(series, path: Path, uid: str) -> InstanceRecord:
    return ct_instance(uid, series.series_instance_uid, study_instance_uid=series.study_instance_uid, path=path)


def test_result_is_discarded_when_a_late_instance_reopens_the_series(worker_setup, tmp_path):
    settings, sessions, series = worker_setup
    worker = InferenceWorker(settings, sessions)
    claim = worker.claim()
    late = write_phantom_series(
        tmp_path / "late",
        replace(PHANTOM, slices=2, series_instance_uid=series.series_instance_uid),
    )
    with transaction(sessions) as session:
        record_instance(session, _record(series, late.files[0], late.sop_instance_uids[0]))

    worker.process(claim)

    with sessions() as session:
        job = session.scalars(select(Job)).one()
        assert job.state is JobState.RECEIVING
        assert job.result_path is None


def test_a_worker_finishing_while_a_receiver_re_opens_its_series_waits_in_the_receivers_lock_order(
    pg_worker_setup, tmp_path, caplog
):
    """PostgreSQL: a receiver holding the study's row (a new series of it) re-opens the series being segmented
    just as the worker records its results. Both take the study row before the job row: the worker waits, then
    finds the series re-opened and discards its result, without a deadlock to break and a try to repeat."""
    settings, sessions, series = pg_worker_setup
    worker = InferenceWorker(settings, sessions)
    claim = worker.claim()
    late = write_phantom_series(tmp_path / "late", replace(PHANTOM, slices=2, series_instance_uid="1.2.826.0.1.77"))
    receiver = sessions()
    receiver.begin()
    study = series.study_instance_uid
    record_instance(
        receiver, ct_instance("1.2.826.0.1.77.1", "1.2.826.0.1.77", study_instance_uid=study, path=late.files[0])
    )
    receiver.flush()  # the study's row is the receiver's until it commits
    thread = threading.Thread(target=worker.process, args=(claim,))
    thread.start()
    try:
        wait_for(lambda: not thread.is_alive() or _waiting_for_a_lock(sessions), timeout=120, what="a lock wait")
        record_instance(receiver, _record(series, late.files[1], "1.2.826.0.1.77.2"))  # a late image: re-opens it
        receiver.commit()
    finally:
        receiver.close()
        thread.join(timeout=60)

    with sessions() as session:
        job = session.scalars(
            select(Job).join(Job.series).where(Series.series_instance_uid == series.series_instance_uid)
        ).one()
        assert job.state is JobState.RECEIVING and job.result_path is None
    assert [r.message for r in caplog.records if r.message.startswith("database.")] == []


def _waiting_for_a_lock(sessions) -> bool:
    """PostgreSQL: whether some transaction waits for a row another one has locked."""
    with sessions() as session:
        return bool(session.scalar(text("SELECT count(*) FROM pg_locks WHERE NOT granted")))


def test_a_worker_that_lost_its_lease_leaves_the_results_of_the_one_that_took_over_untouched(worker_setup):
    """Worker A stalls past its lease, B takes the job over and finishes; A's late results never reach disk."""
    settings, sessions, _series = worker_setup
    short_lease = settings.inference.model_copy(update={"lease_seconds": 1, "lease_renew_seconds": 0.5})
    settings = settings.model_copy(update={"inference": short_lease})
    stalled, live = InferenceWorker(settings, sessions, "host-a:1"), InferenceWorker(settings, sessions, "host-b:2")
    claim = stalled.claim()
    assert claim is not None
    with transaction(sessions) as session:  # A's lease runs out while it is stalled
        session.execute(update(Job).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    job_folder = settings.jobs_directory / str(claim.job_id)
    left = job_folder / f"{STAGING_PREFIX}0-died"  # as a worker killed while writing leaves it
    left.mkdir(parents=True)
    (left / "seg-binary.dcm").write_bytes(b"half written")
    assert live.requeue_expired_leases() == 0  # B sees the lease run out; it counts once it stays so a lease long
    time.sleep(1.1)
    assert live.run_once()  # B queues the job again, claims it and records its results
    assert not left.exists()
    with sessions() as session:
        job = session.scalars(select(Job)).one()
        assert job.state is JobState.DONE
        recorded = {
            Path(f.path): pydicom.dcmread(f.path, stop_before_pixels=True).SOPInstanceUID for f in job.result_files
        }
        indexed = set(
            session.scalars(select(Instance.sop_instance_uid).where(Instance.path.in_([str(p) for p in recorded])))
        )
    assert set(recorded.values()) == indexed

    stalled.process(claim)  # A wakes up and finishes its run: discarded, as the job is B's

    for path, uid in recorded.items():
        assert pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID == uid, f"{path.name} was overwritten"
    assert not [p for p in job_folder.iterdir() if p.name.startswith(STAGING_PREFIX)], "A's staging folder was left"
    with sessions() as session:
        assert session.scalars(select(Job)).one().state is JobState.DONE


def test_job_of_a_dead_worker_is_queued_again(worker_setup):
    settings, sessions, _series = worker_setup
    with transaction(sessions) as session:
        job = session.scalars(select(Job)).one()
        assert jobs.claim(session, job, f"{socket.gethostname()}:999999999", timedelta(minutes=5))

    worker = InferenceWorker(settings, sessions)
    assert worker.requeue_abandoned_jobs() == 1
    assert worker.run_once()

    with sessions() as session:
        job = session.scalars(select(Job)).one()
        assert job.state is JobState.DONE
        assert [e.to_state for e in job.events][-3:] == [JobState.QUEUED, JobState.PROCESSING, JobState.DONE]


def test_job_whose_workers_died_at_the_limit_is_failed_naming_the_stage(worker_setup):
    settings, sessions, _series = worker_setup
    with transaction(sessions) as session:
        job = session.scalars(select(Job)).one()
        assert jobs.claim(session, job, f"{socket.gethostname()}:999999999", timedelta(minutes=5))
        job.stage = "segment"
        job.worker_deaths = settings.inference.max_worker_deaths - 1

    worker = InferenceWorker(settings, sessions)
    assert worker.requeue_abandoned_jobs() == 0
    assert not worker.run_once()  # nothing left to claim: the queue moves on

    with sessions() as session:
        job = session.scalars(select(Job)).one()
        assert job.state is JobState.FAILED
        assert job.reason == "worker died while processing (2 times): last seen in stage segment"


def test_missing_totalsegmentator_weights_fail_the_job_naming_both_commands(worker_setup, tmp_path):
    settings, sessions, _series = worker_setup
    settings.models["ts"] = Settings.model_validate(
        {
            "models": {
                "ts": {"kind": "totalsegmentator", "task": "total_fast", "weights_directory": str(tmp_path / "none")}
            }
        }
    ).models["ts"]
    with transaction(sessions) as session:
        session.scalars(select(Job)).one().model_name = "ts"

    InferenceWorker(settings, sessions).run_once()

    with sessions() as session:
        job = session.scalars(select(Job)).one()
        assert job.state is JobState.FAILED
        assert "dicom-node weights download --task total_fast" in job.reason
        assert "dicom-node weights import FILE.zip" in job.reason


def test_a_series_the_model_cannot_segment_fails_with_the_models_reason(worker_setup, monkeypatch):
    settings, sessions, _series = worker_setup

    def overflowing(_model: ThresholdModel, _volume: object) -> None:
        raise SegmentationFailed(HALF_PRECISION_OVERFLOW)

    monkeypatch.setattr(ThresholdModel, "segment", overflowing)
    InferenceWorker(settings, sessions).run_once()

    with sessions() as session:
        job = session.scalars(select(Job)).one()
        assert job.state is JobState.FAILED
        assert job.reason == HALF_PRECISION_OVERFLOW  # not "an unexpected error in stage segment"


def test_results_are_indexed_for_query_retrieve_and_a_rerun_supersedes_them(worker_setup):
    settings, sessions, series = worker_setup
    settings.results.rtstruct = True
    worker = InferenceWorker(settings, sessions)

    def result_series(*, superseded: bool) -> dict[str, tuple[str, str]]:
        with sessions() as session:
            rows = session.scalars(select(Series).where(Series.source_job_id.is_not(None))).all()
            return {
                s.modality: (s.series_instance_uid, s.instances[0].path)
                for s in rows
                if (s.superseded_at is not None) == superseded
            }

    assert worker.run_once()
    first = result_series(superseded=False)
    assert set(first) == {"SEG", "SR", "RTSTRUCT"}
    for uid, path in first.values():
        assert pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID == uid

    with transaction(sessions) as session:
        jobs.retry(session, session.scalars(select(Job)).one())  # DONE -> COMPLETE
        job = session.scalars(select(Job)).one()
        jobs.queue(session, job, rule_name="ct", model_name="baseline", destinations=[])  # as routing would
    assert worker.run_once()

    second = result_series(superseded=False)
    assert set(second) == {"SEG", "SR", "RTSTRUCT"}
    assert result_series(superseded=True) == first  # the earlier rows stay, marked superseded
    assert not {uid for uid, _ in first.values()} & {uid for uid, _ in second.values()}
    for _uid, path in first.values():
        assert Path(path).exists()  # the earlier files stay retrievable
    assert {Path(path).parent.name for _uid, path in second.values()} == {"run-2"}
    seg = pydicom.dcmread(second["SEG"][1], stop_before_pixels=True)
    sr = pydicom.dcmread(second["SR"][1])
    assert seg.SeriesDescription == sr.SeriesDescription.replace("Measurements", "Segmentation")
    assert seg.SeriesDescription.endswith("(re-run 2)")
    earlier_sr = pydicom.dcmread(first["SR"][1], stop_before_pixels=True)
    predecessor = sr.PredecessorDocumentsSequence[0]
    assert predecessor.StudyInstanceUID == series.study_instance_uid
    assert predecessor.ReferencedSeriesSequence[0].SeriesInstanceUID == earlier_sr.SeriesInstanceUID
    assert predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
        earlier_sr.SOPInstanceUID
    )
    with sessions() as session:
        job = session.scalars(select(Job)).one()
        assert job.result_path == str(settings.jobs_directory / str(job.id))  # all runs: retention removes it whole
        assert job.reason.endswith(f"results in {Path(second['SEG'][1]).parent}")


@pytest.mark.integration
def test_corrupt_jpeg2000_image_fails_the_series_naming_it(shared_fixtures, tmp_path, start_node):
    from pydicom.encaps import encapsulate, generate_frames

    folder = tmp_path / "ct"
    folder.mkdir()
    files = []
    for source in sorted((shared_fixtures / "example_ct_dicom_valid").glob("*.dcm")):
        files.append(folder / source.name)
        files[-1].write_bytes(source.read_bytes())
    damaged = pydicom.dcmread(files[9])
    codestream = next(generate_frames(damaged.PixelData, number_of_frames=1))
    damaged.PixelData = encapsulate([codestream[: len(codestream) * 2 // 3]])  # the codestream is cut short
    damaged.save_as(files[9])
    node = start_node(rules=CT_RULES, inference={"workers": 1})

    assert storescu(node.port, files, extra=["-xv"]).returncode == 0

    node.wait_for_state(damaged.SeriesInstanceUID, JobState.FAILED, timeout=180)
    assert node.job_reason(damaged.SeriesInstanceUID) == (
        f"image {damaged.InstanceNumber} (SOP Instance UID {damaged.SOPInstanceUID}) cannot be decoded: "
        "its JPEG 2000 Image Compression (Lossless Only) data is damaged or incomplete"
    )
    with node.sessions() as session:
        job = job_for_series_uid(session, damaged.SeriesInstanceUID)
        assert job.result_path is None and job.stage == "load"  # failed before any inference


def test_worker_decodes_the_next_queued_series_while_segmenting_and_uses_that_volume(worker_setup, tmp_path):
    settings, sessions, _series = worker_setup
    second = write_phantom_series(tmp_path / "ct2", replace(PHANTOM, seed=7))
    with transaction(sessions) as session:
        for path, uid in zip(second.files, second.sop_instance_uids, strict=True):
            record_instance(session, _record(second, path, uid))
        job = session.scalars(
            select(Job).join(Series).where(Series.series_instance_uid == second.series_instance_uid)
        ).one()
        job.destinations = []
        drive_job_to(session, job, JobState.QUEUED)
    decoded_in: list[tuple[str, str]] = []

    def counting_loader(paths, **kwargs):
        decoded_in.append((threading.current_thread().name, str(Path(paths[0]).parent)))
        return load_series_volume(paths, **kwargs)

    on = settings.model_copy(update={"inference": settings.inference.model_copy(update={"prefetch_next_series": "on"})})
    worker = InferenceWorker(on, sessions)
    assert worker.prefetcher is not None
    worker.prefetcher = VolumePrefetcher(loader=counting_loader)
    try:
        assert worker.run_once() and worker.run_once()
    finally:
        worker.prefetcher.close()

    with sessions() as session:
        assert [j.state for j in session.scalars(select(Job).order_by(Job.id))] == [JobState.DONE, JobState.DONE]
    # The first series is decoded when claimed; the second in the background during the first
    # job's segmentation, and taken from there (no third decode).
    assert len(decoded_in) == 2
    assert not decoded_in[0][0].startswith("dicom-prefetch")
    assert decoded_in[1] == (decoded_in[1][0], str(tmp_path / "ct2")) and decoded_in[1][0].startswith("dicom-prefetch")


def test_prefetch_is_off_on_a_cpu_unless_asked_for():
    assert prefetch_enabled(Settings(inference={"device": "cpu"})) is False
    assert prefetch_enabled(Settings(inference={"device": "cpu", "prefetch_next_series": "on"})) is True
    assert prefetch_enabled(Settings(inference={"prefetch_next_series": "off"})) is False


def test_a_claim_lost_and_taken_again_by_the_same_worker_id_does_not_publish_the_first_claims_result(worker_setup):
    """Two containers with one host name, each its process 1: one worker id; only the newer claim may publish."""
    settings, sessions, _series = worker_setup
    first, second = InferenceWorker(settings, sessions, "node:1"), InferenceWorker(settings, sessions, "node:1")
    lost = first.claim()
    assert lost is not None
    with transaction(sessions) as session:  # its lease ran out and another worker swept it
        jobs.lease_expired(session, session.scalars(select(Job)).one(), settings.inference.max_worker_deaths)
    taken = second.claim()
    assert taken is not None and taken.attempt == lost.attempt + 1

    first.process(lost)
    with sessions() as session:
        job = session.scalars(select(Job)).one()
        assert job.state is JobState.PROCESSING and job.result_path is None, "the first claim's result was discarded"

    second.process(taken)
    with sessions() as session:
        assert session.scalars(select(Job)).one().state is JobState.DONE


def test_a_job_claimed_before_its_claimers_pid_was_taken_again_is_queued_again(worker_setup):
    """A container restarted: this process has the old worker's pid, but started after the claim."""
    _settings, sessions, _series = worker_setup
    with transaction(sessions) as session:
        job = session.scalars(select(Job)).one()
        assert jobs.claim(session, job, f"{socket.gethostname()}:{os.getpid()}", timedelta(minutes=5))
        job.state_changed_at = datetime(2020, 1, 1, tzinfo=timezone.utc)

    assert requeue_jobs_of_previous_run(sessions) == 1

    with sessions() as session:
        job = session.scalars(select(Job)).one()
        assert job.state is JobState.QUEUED and job.worker_deaths == 0
        assert job.reason.startswith("the node was restarted while worker ")


def test_a_job_of_a_running_claimer_is_left_alone_at_start_up(worker_setup):
    _settings, sessions, _series = worker_setup
    with transaction(sessions) as session:
        job = session.scalars(select(Job)).one()
        assert jobs.claim(session, job, f"{socket.gethostname()}:{os.getpid()}", timedelta(minutes=5))

    assert requeue_jobs_of_previous_run(sessions) == 0
    with sessions() as session:
        assert session.scalars(select(Job)).one().state is JobState.PROCESSING


def test_a_killed_worker_not_yet_reaped_counts_as_gone():
    """A zombie answers kill(pid, 0); in a container without an init nobody reaps it, yet its job must move on."""
    import subprocess

    from dicom_node.worker_watch import claimer_alive

    child = subprocess.Popen(["true"])
    try:
        for _ in range(100):
            if open(f"/proc/{child.pid}/stat").read().rpartition(")")[2].split()[0] == "Z":
                break
            time.sleep(0.02)
        assert not claimer_alive(str(child.pid)) and not claimer_alive(str(child.pid), utcnow())
    finally:
        child.wait()
    assert claimer_alive(str(os.getpid())) and not claimer_alive("not a pid")
