"""A series sent again after retention purged its images: never taken for whole when only part comes back, and
routed as it is sent now (DCMTK storescu as the sender, DCMTK storescp as the PACS the results go to)."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from db.jobs import job_for_series_uid
from db.models import JobState, Study
from dicom_node.phantom import PhantomSpec, write_phantom_series
from tests.conftest import free_port, require_tool, storescu, wait_for

SPEC = PhantomSpec(rows=32, columns=32, slices=8, pixel_spacing=(5.0, 5.0), slice_spacing=5.0)


@pytest.fixture
def pacs(tmp_path: Path):
    """A real Storage SCP (DCMTK storescp) the results are sent to: (port, folder it writes to)."""
    folder = tmp_path / "pacs"
    folder.mkdir()
    port = free_port()
    server = subprocess.Popen(
        [require_tool("storescp"), "-aet", "PACSSCP", "-od", str(folder), "-uf", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    yield port, folder
    server.terminate()
    server.wait(timeout=10)


def series_without_an_expected_count(folder: Path):
    """The phantom series without ImagesInAcquisition (as many scanners send it): only the purge knows its size."""
    return write_phantom_series(folder, replace(SPEC, images_in_acquisition=False))


def move_to_another_study(files: list[Path]) -> str:
    """Give every file one new StudyInstanceUID, as a PACS correcting the series' study does; that UID."""
    study = pydicom.uid.generate_uid()
    for path in files:
        dataset = pydicom.dcmread(path)
        dataset.StudyInstanceUID = study
        dataset.save_as(path)
    return study


def destination(port: int) -> dict:
    return {"clinical": {"ae_title": "PACSSCP", "host": "127.0.0.1", "port": port}}


def sent_series_descriptions(folder: Path) -> list[str]:
    return sorted(str(pydicom.dcmread(path, stop_before_pixels=True).SeriesDescription) for path in folder.iterdir())


def test_part_of_a_purged_series_sent_again_is_processed_as_a_partial_series(tmp_path, start_node, pacs):
    """Retention purged a DONE series of 8 images; 3 of them come back: the result says PARTIAL, 3 of 8."""
    port, received = pacs
    series = series_without_an_expected_count(tmp_path / "ct")
    uid = series.series_instance_uid
    node = start_node(
        destinations=destination(port),
        rules=[
            {
                "name": "ct",
                "match": {"modality": "CT"},
                "action": "process",
                "model": "baseline",
                "destinations": ["clinical"],
            }
        ],
        completion={"quiet_seconds": 1, "expected_count_timeout_seconds": 3, "check_interval_seconds": 0.2},
        inference={"workers": 1},
    )
    assert storescu(node.port, series.files).returncode == 0
    node.wait_for_state(uid, JobState.DONE, timeout=120)
    first = sent_series_descriptions(received)
    assert first and not any("PARTIAL" in d for d in first)
    purged = node.cli("purge", "--series", uid)
    assert purged.returncode == 0, purged.stdout + purged.stderr

    assert storescu(node.port, series.files[2:5]).returncode == 0
    node.wait_for_state(uid, JobState.RECEIVING, timeout=30)
    node.wait_for_state(uid, JobState.DONE, timeout=120)

    with node.sessions() as session:
        job = job_for_series_uid(session, uid)
        assert job is not None
        warnings = job.warnings or []
        reasons = [event.reason for event in job.events if event.to_state is JobState.RECEIVING]
    reopened = "an image of a series whose images retention had purged (8 images before) re-opened the series"
    assert f"{reopened} (was DONE)" in reasons
    assert f'series.reopened series_instance_uid={uid} reason="{reopened}' in node.log()
    assert "partial series: 3 of 8 images it held before retention purged it had arrived" in " ".join(warnings)
    wait_for(lambda: len(list(received.iterdir())) > len(first), timeout=30, what="the second run's results")
    again = [d for d in sent_series_descriptions(received) if d not in first]
    assert again and all("PARTIAL" in d for d in again), again


def test_a_purged_series_sent_again_whole_is_not_partial(tmp_path, start_node):
    """All 8 images come back after the purge: the series completes as it did the first time, with no warning."""
    series = series_without_an_expected_count(tmp_path / "ct")
    uid = series.series_instance_uid
    node = start_node(completion={"quiet_seconds": 1, "expected_count_timeout_seconds": 600})  # no rule: IGNORED
    assert storescu(node.port, series.files).returncode == 0
    node.wait_for_state(uid, JobState.IGNORED, timeout=30)
    assert node.cli("purge", "--series", uid).returncode == 0

    assert storescu(node.port, series.files).returncode == 0
    node.wait_for_state(uid, JobState.RECEIVING, timeout=30)
    node.wait_for_state(uid, JobState.IGNORED, timeout=30)  # well before the 600 s completion timeout
    with node.sessions() as session:
        job = job_for_series_uid(session, uid)
        assert job is not None and not job.warnings
        assert job.series.instance_count == 8 and job.series.images_before_purge == 8


def test_a_purged_series_sent_again_by_another_sender_is_routed_by_that_sender(tmp_path, start_node, pacs):
    """Sent by SCANNER1 and processed; purged; sent again by RESEARCH, whose series a rule ignores: ignored, and
    nothing more goes to the clinical PACS."""
    port, received = pacs
    series = write_phantom_series(tmp_path / "ct", SPEC)
    uid = series.series_instance_uid
    research = {"hosts": ["127.0.0.1"], "ae_title": "RESEARCH", "roles": ["store"]}
    scanner = {"hosts": ["127.0.0.1"], "ae_title": "SCANNER1", "roles": ["store"]}
    node = start_node(
        peers={"research": research, "scanner": scanner},
        destinations=destination(port),
        rules=[
            {"name": "research", "match": {"calling_ae_title": "RESEARCH"}, "action": "ignore"},
            {
                "name": "scanner",
                "match": {"modality": "CT", "calling_ae_title": "SCANNER1"},
                "action": "process",
                "model": "baseline",
                "destinations": ["clinical"],
            },
        ],
        completion={"quiet_seconds": 1, "check_interval_seconds": 0.2},
        inference={"workers": 1},
    )
    assert storescu(node.port, series.files, calling_ae="SCANNER1").returncode == 0
    node.wait_for_state(uid, JobState.DONE, timeout=120)
    delivered = len(list(received.iterdir()))
    assert node.cli("purge", "--series", uid).returncode == 0

    assert storescu(node.port, series.files, calling_ae="RESEARCH").returncode == 0
    node.wait_for_state(uid, JobState.RECEIVING, timeout=30)
    node.wait_for_state(uid, JobState.IGNORED, timeout=30)
    with node.sessions() as session:
        job = job_for_series_uid(session, uid)
        assert job is not None and job.rule_name == "research"
        assert job.series.calling_ae_title == "RESEARCH"
    assert len(list(received.iterdir())) == delivered


def test_a_purged_series_sent_again_in_part_is_partial_even_when_its_images_count_themselves_whole(
    tmp_path, start_node
):
    """3 of 8 images come back, each saying ImagesInAcquisition 3 (one acquisition's count): not whole at that
    count, but partial after the completion timeout, as without the count."""
    series = series_without_an_expected_count(tmp_path / "ct")
    uid = series.series_instance_uid
    node = start_node(completion={"quiet_seconds": 1, "expected_count_timeout_seconds": 3})  # no rule: IGNORED
    assert storescu(node.port, series.files).returncode == 0
    node.wait_for_state(uid, JobState.IGNORED, timeout=30)
    assert node.cli("purge", "--series", uid).returncode == 0
    for path in series.files[:3]:
        dataset = pydicom.dcmread(path)
        dataset.ImagesInAcquisition = 3
        dataset.save_as(path)

    assert storescu(node.port, series.files[:3]).returncode == 0
    node.wait_for_state(uid, JobState.RECEIVING, timeout=30)
    node.wait_for_state(uid, JobState.IGNORED, timeout=30)
    with node.sessions() as session:
        job = job_for_series_uid(session, uid)
        assert job is not None
        completed = [event.reason for event in job.events if event.to_state is JobState.COMPLETE][-1]
    assert completed.startswith("only 3 of 8 images it held before retention purged it after 3 s"), completed


def test_a_purged_series_sent_again_under_a_corrected_study_is_filed_under_that_study(tmp_path, start_node):
    """The PACS moved the series to another study before sending it again: it is filed, and answered, there."""
    series = write_phantom_series(tmp_path / "ct", SPEC)
    uid = series.series_instance_uid
    node = start_node(completion={"quiet_seconds": 1})  # no rule: IGNORED
    assert storescu(node.port, series.files).returncode == 0
    node.wait_for_state(uid, JobState.IGNORED, timeout=30)
    assert node.cli("purge", "--series", uid).returncode == 0
    corrected_study = move_to_another_study(series.files)

    assert storescu(node.port, series.files).returncode == 0
    node.wait_for_state(uid, JobState.RECEIVING, timeout=30)
    node.wait_for_state(uid, JobState.IGNORED, timeout=30)
    with node.sessions() as session:
        job = job_for_series_uid(session, uid)
        assert job is not None
        assert job.series.study.study_instance_uid == corrected_study
        assert job.series.study.patient_id == SPEC.patient_id


def test_the_old_study_keeps_no_identity_once_the_results_left_in_it_are_purged(tmp_path, start_node):
    """Processed in study A; its images purged, its results kept; sent again under study B and processed there;
    then purged whole: study A, which held only the first results, keeps no patient identity either."""
    series = write_phantom_series(tmp_path / "ct", SPEC)
    uid, first_study = series.series_instance_uid, series.study_instance_uid
    node = start_node(
        rules=[{"name": "ct", "match": {"modality": "CT"}, "action": "process", "model": "baseline"}],
        completion={"quiet_seconds": 1, "check_interval_seconds": 0.2},
        inference={"workers": 1},
    )
    assert storescu(node.port, series.files).returncode == 0
    node.wait_for_state(uid, JobState.DONE, timeout=120)
    images_only = node.cli("purge", "--days", "0.00001", "--results-days", "30")
    assert images_only.returncode == 0, images_only.stdout + images_only.stderr
    move_to_another_study(series.files)
    assert storescu(node.port, series.files).returncode == 0
    node.wait_for_state(uid, JobState.RECEIVING, timeout=30)
    node.wait_for_state(uid, JobState.DONE, timeout=120)

    assert node.cli("purge", "--series", uid).returncode == 0

    with node.sessions() as session:
        old = session.scalars(select(Study).where(Study.study_instance_uid == first_study)).one()
        assert (old.patient_id, old.patient_name) == (None, None)
