"""A series of several acquisitions, each saying ImagesInAcquisition 10: reaching 10 images does not complete it.

Step-and-shoot CT writes one acquisition's count on every image. Sent in two bursts with a pause longer than the
expected-count settle time (but shorter than the quiet period), the series must wait for the quiet period after
the second burst and complete once, with all 20 images, never at the count with half of them.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from db.jobs import job_for_series_uid
from db.models import JobEvent, JobState
from dicom_node.phantom import PhantomSpec, write_phantom_series
from tests.conftest import CT_RULES, Node, storescu, wait_for
from tests.test_partial_results import result_files

pytestmark = pytest.mark.integration

SPEC = PhantomSpec(rows=48, columns=48, slices=20, pixel_spacing=(8.0, 8.0), slice_spacing=4.0)
PER_ACQUISITION = 10
QUIET_SECONDS = 20


def _two_acquisitions(folder: Path, *, numbered_each_from_1: bool) -> tuple[str, list[Path]]:
    """The 20-slice phantom as two acquisitions of 10 along the stack (AcquisitionNumber 1, then 2), each image
    saying ImagesInAcquisition 10; InstanceNumbers run 1-20, or 1-10 in each acquisition."""
    series = write_phantom_series(folder, SPEC)
    for index, path in enumerate(series.files):
        dataset = pydicom.dcmread(path)
        dataset.AcquisitionNumber = 1 + index // PER_ACQUISITION
        dataset.ImagesInAcquisition = PER_ACQUISITION
        if numbered_each_from_1:
            dataset.InstanceNumber = 1 + index % PER_ACQUISITION
        dataset.save_as(path)
    return series.series_instance_uid, list(series.files)


def _start(start_node) -> Node:
    return start_node(
        rules=CT_RULES,
        inference={"workers": 1},
        completion={"quiet_seconds": QUIET_SECONDS, "expected_count_timeout_seconds": 600},
    )


def _wait_for_doubt(node: Node, words: str) -> None:
    """Until the node logs that it reached the count and did not trust it (the moment it used to complete)."""
    wait_for(
        lambda: "series.count_not_trusted" in node.log() and words in node.log(),
        timeout=120,
        what=f"the node to log that the ImagesInAcquisition count is not trusted ({words})",
    )


def _assert_completed_once_with_all(node: Node, series_uid: str) -> None:
    with node.sessions() as session:
        job = job_for_series_uid(session, series_uid)
        events = session.query(JobEvent).filter(JobEvent.job_id == job.id).order_by(JobEvent.id).all()
        completions = [event.reason for event in events if event.to_state is JobState.COMPLETE]
        assert job.series.instance_count == 2 * PER_ACQUISITION
    assert completions == [f"no new instance for {QUIET_SECONDS} s ({2 * PER_ACQUISITION} received)"]
    assert JobState.RECEIVING not in [event.to_state for event in events[1:]]  # never re-opened


def test_the_second_acquisition_sent_first_waits_for_the_quiet_period_not_its_count(tmp_path, start_node):
    series_uid, files = _two_acquisitions(tmp_path / "ct", numbered_each_from_1=False)
    node = _start(start_node)

    assert storescu(node.port, files[PER_ACQUISITION:]).returncode == 0  # acquisition 2: InstanceNumbers 11-20
    _wait_for_doubt(node, "InstanceNumbers run from 11 to 20, not from 1 to 10")
    assert node.job_state(series_uid) is JobState.RECEIVING
    assert storescu(node.port, files[:PER_ACQUISITION]).returncode == 0

    node.wait_for_state(series_uid, JobState.DONE, timeout=240)
    _assert_completed_once_with_all(node, series_uid)
    seg = pydicom.dcmread(result_files(node, series_uid)["seg-binary.dcm"], stop_before_pixels=True)
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 2 * PER_ACQUISITION
    assert "PARTIAL" not in seg.SeriesDescription


def test_half_of_each_acquisition_adding_up_to_the_count_waits_for_the_quiet_period(tmp_path, start_node):
    """Acquisitions numbered each from 1: the first burst holds InstanceNumbers 1-10 once each, 5 of either
    acquisition, so only their AcquisitionNumbers tell that the count of 10 is not the series'."""
    series_uid, files = _two_acquisitions(tmp_path / "ct", numbered_each_from_1=True)
    first = files[:5] + files[-5:]  # acquisition 1's InstanceNumbers 1-5, acquisition 2's 6-10
    node = _start(start_node)

    assert storescu(node.port, first).returncode == 0
    _wait_for_doubt(node, "2 AcquisitionNumbers (1 on 5 image(s), 2 on 5 image(s))")
    assert node.job_state(series_uid) is JobState.RECEIVING
    assert storescu(node.port, files[5:-5]).returncode == 0

    wait_for(
        lambda: node.job_state(series_uid) not in (JobState.RECEIVING, JobState.COMPLETE, JobState.QUEUED, None),
        timeout=240,
        what="the series to be completed and processed",
    )
    _assert_completed_once_with_all(node, series_uid)
