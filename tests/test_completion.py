"""A series that pauses mid-transfer: the expected count (ImagesInAcquisition) decides, not the quiet period alone."""

from __future__ import annotations

import time

import pydicom
import pytest

from db.jobs import job_for_series_uid
from db.models import JobEvent, JobState, Series
from dicom_node.phantom import PhantomSpec, write_phantom_series
from tests.conftest import CT_RULES, storescu
from tests.test_partial_results import result_files

pytestmark = pytest.mark.integration

SPEC = PhantomSpec(rows=48, columns=48, slices=200, pixel_spacing=(8.0, 8.0), slice_spacing=2.0)


def _done_count(node, series_uid: str) -> int:
    with node.sessions() as session:
        job = job_for_series_uid(session, series_uid)
        return session.query(JobEvent).filter(JobEvent.job_id == job.id, JobEvent.to_state == JobState.DONE).count()


def test_a_pause_longer_than_the_quiet_period_gives_one_result_covering_all_200_images(tmp_path, start_node):
    series = write_phantom_series(tmp_path / "ct", SPEC)  # ImagesInAcquisition 200
    node = start_node(
        rules=CT_RULES, inference={"workers": 1}, completion={"quiet_seconds": 1, "expected_count_timeout_seconds": 120}
    )

    assert storescu(node.port, series.files[:150]).returncode == 0
    time.sleep(4)  # four quiet periods: 150 of the 200 announced images are in
    assert node.job_state(series.series_instance_uid) is JobState.RECEIVING
    assert storescu(node.port, series.files[150:]).returncode == 0

    node.wait_for_state(series.series_instance_uid, JobState.DONE, timeout=180)
    seg = pydicom.dcmread(result_files(node, series.series_instance_uid)["seg-binary.dcm"], stop_before_pixels=True)
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 200
    assert "PARTIAL" not in seg.SeriesDescription and _done_count(node, series.series_instance_uid) == 1
    with node.sessions() as session:
        assert not job_for_series_uid(session, series.series_instance_uid).warnings
        assert session.query(Series).filter(Series.source_job_id.is_not(None)).count() == 2  # one SEG, one SR


def test_a_forced_early_timeout_gives_a_partial_result_then_a_full_one_that_supersedes_it(tmp_path, start_node):
    series = write_phantom_series(tmp_path / "ct", SPEC)
    node = start_node(
        rules=CT_RULES, inference={"workers": 1}, completion={"quiet_seconds": 1, "expected_count_timeout_seconds": 3}
    )

    assert storescu(node.port, series.files[:150]).returncode == 0
    node.wait_for_state(series.series_instance_uid, JobState.DONE, timeout=180)
    first = result_files(node, series.series_instance_uid)
    partial = pydicom.dcmread(first["seg-binary.dcm"], stop_before_pixels=True)
    assert "PARTIAL" in partial.SeriesDescription
    assert len(partial.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 150
    with node.sessions() as session:
        warnings = job_for_series_uid(session, series.series_instance_uid).warnings
    assert warnings and warnings[0].startswith("partial series: 150 of 200 expected images")

    assert storescu(node.port, series.files[150:]).returncode == 0  # the rest arrives late
    node.wait_for_state(series.series_instance_uid, JobState.RECEIVING, timeout=30)
    node.wait_for_state(series.series_instance_uid, JobState.DONE, timeout=180)

    second = result_files(node, series.series_instance_uid)
    full = pydicom.dcmread(second["seg-binary.dcm"], stop_before_pixels=True)
    sr = pydicom.dcmread(second["sr-binary.dcm"], stop_before_pixels=True)
    assert len(full.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 200
    assert full.SeriesDescription.endswith("(re-run 2)") and "PARTIAL" not in full.SeriesDescription
    assert sr.PredecessorDocumentsSequence  # the full SR names the partial one it replaces
    with node.sessions() as session:
        rows = session.query(Series).filter(Series.source_job_id.is_not(None)).order_by(Series.id).all()
        assert [r.superseded_at is not None for r in rows] == [True, True, False, False]
        assert not job_for_series_uid(session, series.series_instance_uid).warnings
