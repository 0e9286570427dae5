"""A series that pauses mid-transfer: the expected count (ImagesInAcquisition) decides, not the quiet period alone."""

from __future__ import annotations

import dataclasses
import re
import time

import pydicom
import pytest

from db.jobs import job_for_series_uid
from db.models import JobEvent, JobState, RejectedInstance, Series
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


SMALL = PhantomSpec(rows=48, columns=48, slices=12, pixel_spacing=(8.0, 8.0), slice_spacing=4.0)


def _missing_warning(node, series_uid: str) -> list[str]:
    with node.sessions() as session:
        return list(job_for_series_uid(session, series_uid).warnings or [])


def _private_sequence(dataset: pydicom.Dataset, group: int, items: list[pydicom.Dataset]) -> None:
    dataset.private_block(group, "TEST VENDOR", create=True).add_new(0x01, "SQ", items)


def _nested_items(levels: int) -> list[pydicom.Dataset]:
    items: list[pydicom.Dataset] = []
    for _ in range(levels):
        item = pydicom.Dataset()
        _private_sequence(item, 0x0029, items)
        items = [item]
    return items


def _damage(image: pydicom.Dataset, damage: str) -> None:
    if damage == "InstanceNumber":
        image.InstanceNumber = "99999999999"  # beyond what an integer string may hold: refused on receipt
    elif damage == "Pixel Data is truncated":
        image.PixelData = image.PixelData[:-512]  # cut short: refused on receipt before its header is checked
    elif damage == "5,000 at most":  # a private sequence of 300 items of 20 elements, before the series UID
        items = [pydicom.Dataset() for _ in range(300)]
        for item in items:
            block = item.private_block(0x0011, "TEST VENDOR", create=True)
            for element in range(20):
                block.add_new(element, "LO", f"v{element}")
        _private_sequence(image, 0x0011, items)
    else:  # sequences nested deeper than the structure walk reads, after the series UID
        _private_sequence(image, 0x0029, _nested_items(70))


@pytest.mark.parametrize(
    "damage", ["InstanceNumber", "Pixel Data is truncated", "5,000 at most", "nests sequences too deeply"]
)
def test_an_image_refused_on_receipt_makes_its_series_result_partial_until_it_is_sent_again(
    tmp_path, start_node, damage
):
    """Also an image refused unread by the structure walk (too many elements, too deep), before its header is
    read: the walk notes the top-level SeriesInstanceUID it passes."""
    series = write_phantom_series(tmp_path / "ct", SMALL)
    last = pydicom.dcmread(series.files[-1])
    _damage(last, damage)
    wrong = tmp_path / "wrong.dcm"
    last.save_as(wrong)
    node = start_node(rules=CT_RULES, inference={"workers": 1}, completion={"quiet_seconds": 1})

    storescu(node.port, series.files[:-1])
    storescu(node.port, [wrong])
    node.wait_for_state(series.series_instance_uid, JobState.DONE, timeout=180)

    partial = pydicom.dcmread(result_files(node, series.series_instance_uid)["seg-binary.dcm"], stop_before_pixels=True)
    assert "PARTIAL" in partial.SeriesDescription
    assert len(partial.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == SMALL.slices - 1
    (warning,) = _missing_warning(node, series.series_instance_uid)
    assert warning.startswith("partial series: 1 image(s) sent for this series were refused or set aside on receipt")
    assert f"SOP Instance UID {last.SOPInstanceUID}" in warning and damage in warning

    assert storescu(node.port, series.files[-1:]).returncode == 0  # the image, as it should have been
    node.wait_for_state(series.series_instance_uid, JobState.RECEIVING, timeout=30)
    node.wait_for_state(series.series_instance_uid, JobState.DONE, timeout=180)
    full = pydicom.dcmread(result_files(node, series.series_instance_uid)["seg-binary.dcm"], stop_before_pixels=True)
    assert "PARTIAL" not in full.SeriesDescription
    assert len(full.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == SMALL.slices
    assert _missing_warning(node, series.series_instance_uid) == []


def _unreadable_series(image: pydicom.Dataset, damage: str) -> None:
    if damage == "SeriesInstanceUID is empty":
        image.SeriesInstanceUID = ""
    else:  # a private sequence of 12,000 items before (0020,000E): refused unread, before the walk reaches it
        _private_sequence(image, 0x0011, [pydicom.Dataset() for _ in range(12_000)])


@pytest.mark.parametrize("damage", ["SeriesInstanceUID is empty", "items"])
def test_an_image_refused_before_its_series_could_be_read_makes_the_series_its_sender_sent_meanwhile_partial(
    tmp_path, start_node, damage
):
    """Before, such a refusal was recorded with no series, and a series missing its first slice (no gap shows at an
    end) without ImagesInAcquisition completed as whole and went to the PACS. Another sender's series is untouched."""
    series = write_phantom_series(tmp_path / "ct", SMALL)
    other = write_phantom_series(tmp_path / "other", SMALL)
    for path in [*series.files, *other.files]:  # no count to wait for: the quiet period decides
        image = pydicom.dcmread(path)
        del image.ImagesInAcquisition
        image.save_as(path)
    first = pydicom.dcmread(series.files[0])
    _unreadable_series(first, damage)
    wrong = tmp_path / "wrong.dcm"
    first.save_as(wrong)
    node = start_node(rules=CT_RULES, completion={"quiet_seconds": 1})

    storescu(node.port, [wrong])  # refused
    assert storescu(node.port, series.files[1:]).returncode == 0
    node.wait_for_state(series.series_instance_uid, JobState.QUEUED, timeout=60)
    (warning,) = _missing_warning(node, series.series_instance_uid)
    assert warning.startswith(
        "partial series: 1 image(s) that PACS sent while this series was received were refused before the series "
        "they belong to could be read, and may belong to this one; the result covers the 11 stored (first, SOP "
        f"Instance UID {first.SOPInstanceUID}: "
    ), warning
    with node.sessions() as session:
        (refused,) = session.query(RejectedInstance).all()
        assert refused.series_instance_uid is None

    storescu(node.port, [wrong], calling_ae="MODALITY")  # another sender's unreadable image, meanwhile
    assert storescu(node.port, other.files).returncode == 0
    node.wait_for_state(other.series_instance_uid, JobState.QUEUED, timeout=60)
    assert _missing_warning(node, other.series_instance_uid) == []


def test_a_series_whole_by_its_images_in_acquisition_is_not_marked_partial_for_another_images_refusal(
    tmp_path, start_node
):
    """A series holding every image its ImagesInAcquisition counts cannot lack the image refused meanwhile with no
    series (another object of the study, from the same sender): it completes with no warning."""
    series = write_phantom_series(tmp_path / "ct", SMALL)  # ImagesInAcquisition 12
    stray = pydicom.dcmread(write_phantom_series(tmp_path / "stray", SMALL).files[0])
    stray.SeriesInstanceUID = ""
    wrong = tmp_path / "stray.dcm"
    stray.save_as(wrong)
    node = start_node(rules=CT_RULES, completion={"quiet_seconds": 1})

    storescu(node.port, [wrong])  # refused, with no series
    assert storescu(node.port, series.files).returncode == 0
    node.wait_for_state(series.series_instance_uid, JobState.QUEUED, timeout=60)
    assert _missing_warning(node, series.series_instance_uid) == []
    with node.sessions() as session:
        assert [r.series_instance_uid for r in session.query(RejectedInstance).all()] == [None]


def test_an_instance_already_stored_in_another_series_is_set_aside_and_its_new_series_marked_partial(
    tmp_path, start_node
):
    first = write_phantom_series(tmp_path / "first", SMALL)
    second = write_phantom_series(tmp_path / "second", dataclasses.replace(SMALL, seed=1))
    reused = pydicom.dcmread(second.files[-1])
    reused.SOPInstanceUID = reused.file_meta.MediaStorageSOPInstanceUID = pydicom.dcmread(
        first.files[-1]
    ).SOPInstanceUID
    reused.save_as(second.files[-1])  # a modality that reissued a SOP Instance UID in a new series
    node = start_node(completion={"quiet_seconds": 1})

    assert storescu(node.port, first.files).returncode == 0
    assert storescu(node.port, second.files).returncode == 0  # acknowledged: nothing refused at the door
    node.wait_for_state(second.series_instance_uid, JobState.IGNORED, timeout=30)

    (warning,) = _missing_warning(node, second.series_instance_uid)
    assert warning.startswith("partial series: 1 image(s) sent for this series were refused or set aside")
    assert f"already stored in series {first.series_instance_uid}" in warning
    assert _missing_warning(node, first.series_instance_uid) == []
    stored = node.storage / "instances" / first.study_instance_uid / first.series_instance_uid
    assert pydicom.dcmread(stored / f"{reused.SOPInstanceUID}.dcm").SeriesInstanceUID == first.series_instance_uid
    with node.sessions() as session:
        row = session.query(RejectedInstance).one()
        counts = dict(session.query(Series.series_instance_uid, Series.instance_count))
    assert counts == {first.series_instance_uid: SMALL.slices, second.series_instance_uid: SMALL.slices - 1}
    kept = pydicom.dcmread(row.path)  # the acknowledged copy, whole, in quarantine
    assert (kept.SeriesInstanceUID, row.series_instance_uid) == (second.series_instance_uid,) * 2
    listed = node.cli("rejected")
    assert listed.returncode == 0 and "0x0000" in listed.stdout
    status = node.cli("status")
    assert "refused instances: 0; copies set aside: 1" in status.stdout, status.stdout


def test_a_series_still_receiving_says_how_many_of_its_images_came_and_when_it_completes(tmp_path, start_node):
    """A RECEIVING series waiting for the rest of its ImagesInAcquisition count said only "first instance
    received", in `status` and on the console's worklist, however many images had come since."""
    from dicom_node.console.queries import job_summary

    series = write_phantom_series(tmp_path / "ct", dataclasses.replace(SPEC, slices=6))  # ImagesInAcquisition 6
    node = start_node(completion={"quiet_seconds": 600})
    assert storescu(node.port, series.files[:4]).returncode == 0
    node.wait_for_state(series.series_instance_uid, JobState.RECEIVING)
    progress = "receiving: 4 of 6 expected images (ImagesInAcquisition) so far, the last one "

    rows = [line.split("│")[1:-1] for line in node.cli("status").stdout.splitlines() if line.startswith("│")]
    reason = " ".join(cells[6].strip() for cells in rows)  # the table folds its one row's cells over lines
    assert re.fullmatch(re.escape(progress) + r"\d+ s ago; it completes after 600 s without a new image", reason)
    with node.sessions() as session:
        job = job_for_series_uid(session, series.series_instance_uid)
        assert job_summary(session, job, with_patient=False)["reason"].startswith(progress)
        assert job.reason == "first instance received"  # the history keeps what happened when
