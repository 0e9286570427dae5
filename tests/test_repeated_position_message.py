"""A slice resent under a new SOP Instance UID: the refusal names the two copies, not one label twice."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from db.models import JobState
from dicom_node.admission import InstanceFile, admit
from dicom_node.config import AdmissionSettings
from dicom_node.phantom import PhantomSpec, write_phantom_series
from inference.volume import VolumeError, check_slice_stack
from tests.conftest import CT_RULES, storescu

AXIAL = (0.0, 0.0, 1.0)
POSITIONS = [(0.0, 0.0, 0.0), (0.0, 0.0, 1.5), (0.0, 0.0, 3.0), (0.0, 0.0, 3.0), (0.0, 0.0, 4.5)]
START = "1 slice position(s) occur twice in one acquisition: "
COPIES = "two copies of one image under different SOP Instance UIDs (a resend that gave it a new UID?)"


def test_one_label_twice_is_named_by_both_sop_instance_uids():
    labels = ["instance 1", "instance 2", "instance 286", "instance 286", "instance 5"]
    uids = ["1.2.1", "1.2.2", "1.2.286", "1.2.999", "1.2.5"]

    with pytest.raises(VolumeError) as refused:
        check_slice_stack(POSITIONS, AXIAL, pixel_spacing=0.8, labels=labels, instances=uids)

    assert str(refused.value) == (
        START + "instance 286 (SOP Instance UID 1.2.286) and instance 286 (SOP Instance UID 1.2.999) are both at "
        f"ImagePositionPatient (0.00, 0.00, 3.00); {COPIES}"
    )


def test_one_label_twice_without_uids_is_named_once_as_two_copies():
    labels = ["instance 1", "instance 2", "instance 286", "instance 286", "instance 5"]

    with pytest.raises(VolumeError) as refused:
        check_slice_stack(POSITIONS, AXIAL, pixel_spacing=0.8, labels=labels)

    assert str(refused.value) == (
        START + f"two images labelled instance 286 are both at ImagePositionPatient (0.00, 0.00, 3.00); {COPIES}"
    )


def test_two_labels_keep_the_sentence_they_had():
    labels = ["instance 1", "instance 2", "instance 3", "instance 4", "instance 5"]
    uids = ["1.2.1", "1.2.2", "1.2.3", "1.2.4", "1.2.5"]

    with pytest.raises(VolumeError) as refused:
        check_slice_stack(POSITIONS, AXIAL, pixel_spacing=0.8, labels=labels, instances=uids)

    assert str(refused.value) == START + "instance 3 and instance 4 are both at ImagePositionPatient (0.00, 0.00, 3.00)"


def resent_under_a_new_uid(folder: Path) -> tuple[list[Path], str]:
    """A phantom series and a copy of its third image under a new SOP Instance UID (same InstanceNumber and place)."""
    series = write_phantom_series(folder, PhantomSpec(rows=16, columns=16, slices=4))
    copy = pydicom.dcmread(series.files[2])
    copy.SOPInstanceUID = copy.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    copy.save_as(folder / "resent.dcm")
    return [*series.files, folder / "resent.dcm"], series.series_instance_uid


def test_admission_does_not_name_one_instance_twice(tmp_path):
    paths, _series_uid = resent_under_a_new_uid(tmp_path / "ct")
    files = []
    for path in paths:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        files.append(
            InstanceFile(
                path,
                str(header.SOPInstanceUID),
                str(header.file_meta.TransferSyntaxUID),
                int(header.InstanceNumber),
            )
        )

    refusal = admit(files, AdmissionSettings()).refusal or ""

    assert refusal.startswith(START) and "instance 3 and instance 3" not in refusal
    assert refusal.endswith(COPIES)


@pytest.mark.integration
def test_a_resent_slice_under_a_new_uid_is_refused_as_two_copies(tmp_path, start_node):
    paths, series_uid = resent_under_a_new_uid(tmp_path / "ct")
    node = start_node(rules=CT_RULES)

    assert storescu(node.port, paths).returncode == 0

    node.wait_for_state(series_uid, JobState.FAILED, timeout=60)
    reason = node.job_reason(series_uid) or ""
    assert reason.startswith(f"not admitted: {START}") and "instance 3 and instance 3" not in reason
    assert reason.endswith(COPIES)
