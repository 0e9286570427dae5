"""Honest results: what a result leaves out is visible where a radiologist looks, and a re-run supersedes.

Every test runs a real node (`dicom-node serve` with one inference worker) and sends
with DCMTK storescu; the results are read back from the node's job folder.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from db.jobs import job_for_series_uid
from db.models import Instance, JobState, Series
from dicom_node.phantom import PhantomSpec, write_phantom_series
from dicom_node.retrieve.matching import find, matching_instances
from tests.conftest import CT_RULES, dciodvfy, storescu

pytestmark = pytest.mark.integration

SPEC = PhantomSpec(rows=96, columns=96, slices=30, pixel_spacing=(4.0, 4.0), slice_spacing=5.0, noise_sd=5.0)
LOCALIZER_WARNING = "1 localizer image(s) left out of the volume"
PARTIAL_WARNING = (
    "partial series: 2 acquisitions or matrix sizes in one series; processed the largest, 30 of 38 images "
    "(AcquisitionNumber 1, 96 x 96 at 4 x 4 mm)"
)


def mixed_series(folder: Path) -> tuple[object, list[Path]]:
    """30 axial images, a localizer, and a short repeat acquisition (8 images), all in one series."""
    main = write_phantom_series(folder / "main", replace(SPEC, add_localizer=True))
    repeat = write_phantom_series(
        folder / "repeat",
        replace(
            SPEC,
            slices=8,
            seed=7,
            series_instance_uid=main.series_instance_uid,
            study_instance_uid=main.study_instance_uid,
        ),
    )
    files = sorted((folder / "main").glob("*.dcm")) + list(repeat.files)
    first = pydicom.dcmread(main.files[0], stop_before_pixels=True)
    for path in files:  # completion by the quiet period only: no image count to reach early
        dataset = pydicom.dcmread(path)
        dataset.pop("ImagesInAcquisition", None)
        if path in repeat.files:  # a repeat scan in the same coordinate system and study, as a scanner writes it
            dataset.AcquisitionNumber = 3
            dataset.FrameOfReferenceUID = first.FrameOfReferenceUID
            dataset.StudyDate, dataset.StudyTime = first.StudyDate, first.StudyTime
        dataset.save_as(path)
    return main, files


def sr_comment(sr: pydicom.Dataset) -> str | None:
    """The text of the SR's root-level TEXT item (121106, DCM, "Comment"), if any."""
    for item in sr.ContentSequence:
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "121106":
            return str(item.TextValue)
    return None


def result_files(node, series_instance_uid: str) -> dict[str, Path]:
    with node.sessions() as session:
        job = job_for_series_uid(session, series_instance_uid)
        return {Path(f).name: Path(f) for f in job.result_files}


def test_partial_series_is_done_with_its_warnings_in_descriptions_sr_status_and_show(tmp_path, start_node):
    series, files = mixed_series(tmp_path / "ct")
    node = start_node(rules=CT_RULES, inference={"workers": 1, "partial_series": "process"})

    assert storescu(node.port, files).returncode == 0

    node.wait_for_state(series.series_instance_uid, JobState.DONE, timeout=180)
    with node.sessions() as session:
        job = job_for_series_uid(session, series.series_instance_uid)
        assert job.warnings == [LOCALIZER_WARNING, PARTIAL_WARNING]
        assert job.reason.startswith(
            f"segmented with 2 warning(s) (baseline, not a trained model): {LOCALIZER_WARNING}; {PARTIAL_WARNING}; "
        )
    results = result_files(node, series.series_instance_uid)
    seg = pydicom.dcmread(results["seg-binary.dcm"], stop_before_pixels=True)
    sr = pydicom.dcmread(results["sr-binary.dcm"])
    assert seg.SeriesDescription == "Segmentation dicom-node threshold (baseline) of series 1 PARTIAL"
    assert sr.SeriesDescription == "Measurements dicom-node threshold (baseline) of series 1 PARTIAL"
    assert sr_comment(sr) == f"Read with care: (1) {LOCALIZER_WARNING} (2) {PARTIAL_WARNING}"
    assert sr.CompletionFlag == "PARTIAL"  # the SR itself says it does not cover the whole series
    family = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmFamilyCodeSequence[0]
    assert (family.CodeValue, family.CodeMeaning) == ("123105", "Histogram Analysis"), "the baseline is no AI"
    errors, _warnings = dciodvfy(results["sr-binary.dcm"])
    assert errors == []

    status = node.cli("status").stdout
    assert "warnings" in status and "2 PARTIAL" in status
    shown = node.cli("show", series.series_instance_uid).stdout
    assert f"warning  {LOCALIZER_WARNING}\nwarning  {PARTIAL_WARNING}\n" in shown


def test_partial_series_fails_with_the_reason_when_partial_series_is_fail(tmp_path, start_node):
    series, files = mixed_series(tmp_path / "ct")
    node = start_node(rules=CT_RULES, inference={"workers": 1, "partial_series": "fail"})

    assert storescu(node.port, files).returncode == 0

    node.wait_for_state(series.series_instance_uid, JobState.FAILED, timeout=180)
    assert node.job_reason(series.series_instance_uid) == (
        f"{PARTIAL_WARNING}; a partial series is not processed (inference.partial_series is 'fail')"
    )
    with node.sessions() as session:
        assert session.query(Series).filter(Series.source_job_id.is_not(None)).count() == 0


def test_series_reopened_after_done_gets_a_result_that_supersedes_the_first(tmp_path, start_node):
    series = write_phantom_series(tmp_path / "ct", SPEC)
    # 20 of the 30 images ImagesInAcquisition announces: complete (partial) once the short expected-count timeout ends
    node = start_node(rules=CT_RULES, inference={"workers": 1}, completion={"expected_count_timeout_seconds": 3})

    assert storescu(node.port, series.files[:20]).returncode == 0
    node.wait_for_state(series.series_instance_uid, JobState.DONE, timeout=180)
    first = result_files(node, series.series_instance_uid)
    first_sr = pydicom.dcmread(first["sr-binary.dcm"], stop_before_pixels=True)

    assert storescu(node.port, series.files[20:]).returncode == 0  # late images re-open the series
    node.wait_for_state(series.series_instance_uid, JobState.RECEIVING, timeout=30)
    node.wait_for_state(series.series_instance_uid, JobState.DONE, timeout=180)

    second = result_files(node, series.series_instance_uid)
    assert second["seg-binary.dcm"].parent.name == "run-2"
    seg = pydicom.dcmread(second["seg-binary.dcm"], stop_before_pixels=True)
    sr = pydicom.dcmread(second["sr-binary.dcm"])
    assert seg.NumberOfFrames > 0 and len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 30
    assert seg.SeriesDescription == "Segmentation dicom-node (baseline) of series 1 (re-run 2)"
    assert sr.SeriesDescription.endswith("(re-run 2)")
    predecessor = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert predecessor.SeriesInstanceUID == first_sr.SeriesInstanceUID
    assert predecessor.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first_sr.SOPInstanceUID
    errors, _warnings = dciodvfy(second["sr-binary.dcm"])
    assert errors == []
    with node.sessions() as session:
        rows = session.query(Series).filter(Series.source_job_id.is_not(None)).order_by(Series.id).all()
        assert [(r.modality, r.superseded_at is not None) for r in rows] == [
            ("SEG", True),
            ("SR", True),
            ("SEG", False),
            ("SR", False),
        ]
        kept = session.query(Instance.path).filter(Instance.series_id == rows[1].id).scalar()
        assert kept == str(first["sr-binary.dcm"]) and Path(kept).exists()
    shown = node.cli("show", series.series_instance_uid).stdout
    assert shown.count("(superseded ") == 2
    with node.sessions() as session:  # Query/Retrieve answers and sends the current results only
        study = Dataset()
        study.QueryRetrieveLevel, study.StudyInstanceUID = "STUDY", seg.StudyInstanceUID
        served = {i.series.series_instance_uid for i in matching_instances(session, study, for_retrieval=True)}
        answered = {str(a.SeriesInstanceUID) for a in find(session, _series_level(seg.StudyInstanceUID), "NODE")}
    current = {r.series_instance_uid for r in rows if r.superseded_at is None}
    superseded = {r.series_instance_uid for r in rows if r.superseded_at is not None}
    assert current <= served and current <= answered and series.series_instance_uid in served
    assert not superseded & served and not superseded & answered


def _series_level(study_instance_uid: str) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel, identifier.StudyInstanceUID, identifier.SeriesInstanceUID = (
        "SERIES",
        study_instance_uid,
        "",
    )
    return identifier
