"""Start-up repair never stops the node on data: a file it cannot index goes to quarantine with a reason."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from db.models import Instance, RejectedInstance
from dicom_node.phantom import PhantomSpec, write_phantom_series
from tests.conftest import storescu, wait_for

pytestmark = pytest.mark.integration

SPEC = PhantomSpec(rows=32, columns=32, slices=3, pixel_spacing=(4.0, 4.0), slice_spacing=5.0)


def place_in_storage(storage: Path, dataset: pydicom.Dataset) -> Path:
    """Write ``dataset`` where the node keeps instances, as if it had been received and the database lost it."""
    folder = storage / "instances" / dataset.StudyInstanceUID / dataset.SeriesInstanceUID
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dataset.SOPInstanceUID}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path


def new_instance(template: Path, **changes: object) -> pydicom.Dataset:
    dataset = pydicom.dcmread(template)
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    for keyword, value in changes.items():
        setattr(dataset, keyword, value)
    return dataset


def test_node_starts_with_an_out_of_range_value_on_disk_and_quarantines_the_file(tmp_path, start_node):
    series = write_phantom_series(tmp_path / "ct", SPEC)
    node = start_node()
    node.stop()
    overflowing = new_instance(series.files[0])
    overflowing["SeriesNumber"] = pydicom.DataElement(0x00200011, "IS", "99999999999999999999")
    bad = place_in_storage(node.storage, overflowing)
    garbage = bad.parent.parent / generate_uid() / f"{generate_uid()}.dcm"
    garbage.parent.mkdir()
    garbage.write_bytes(b"this is not a DICOM file at all" * 10)
    good = place_in_storage(node.storage, new_instance(series.files[1]))

    node.start()  # the start-up repair meets all three files

    assert not bad.exists() and not garbage.exists()
    with node.sessions() as session:
        rows = {row.sop_instance_uid: row for row in session.query(RejectedInstance)}
        indexed = [path for (path,) in session.query(Instance.path)]
    refused = rows[overflowing.SOPInstanceUID]
    assert refused.reason == (
        "found in storage at start-up and not indexed: SeriesNumber '99999999999999999999' is out of range: "
        "integer strings hold at most 2147483647"
    )
    assert Path(refused.path).parent == node.storage / "quarantine" and Path(refused.path).exists()
    assert pydicom.dcmread(refused.path).SOPInstanceUID == overflowing.SOPInstanceUID
    unreadable = rows[None]
    assert unreadable.reason == "found in storage at start-up and not indexed: not a readable DICOM file"
    assert Path(unreadable.path).read_bytes().startswith(b"this is not a DICOM file")
    assert indexed == [str(good)]
    log = node.log()
    assert log.count("repair.quarantined_file") == 2 and "repair.indexed_file" in log
    assert node.cli("rejected").stdout.count("0x0110") == 2  # listed for the operator

    node.stop()
    node.start()  # and again: nothing left to repair, no crash loop
    assert node.log().count("repair.quarantined_file") == 2


def test_a_copy_left_under_another_series_is_set_aside_at_start_up_not_filed_twice(tmp_path, start_node):
    series = write_phantom_series(tmp_path / "ct", SPEC)
    node = start_node()
    assert storescu(node.port, series.files).returncode == 0
    wait_for(lambda: node.job_state(series.series_instance_uid) is not None, timeout=30, what="the series recorded")
    node.stop()
    copy = pydicom.dcmread(series.files[0])
    copy.SeriesInstanceUID = generate_uid()  # acknowledged under another series, then the node died unrecorded
    left = place_in_storage(node.storage, copy)

    node.start()

    assert not left.exists()
    with node.sessions() as session:
        row = session.query(RejectedInstance).one()
        paths = [
            path for (path,) in session.query(Instance.path).filter(Instance.sop_instance_uid == copy.SOPInstanceUID)
        ]
    assert (row.sop_instance_uid, row.series_instance_uid, row.status) == (
        copy.SOPInstanceUID,
        copy.SeriesInstanceUID,
        0,
    )
    assert pydicom.dcmread(row.path).SeriesInstanceUID == copy.SeriesInstanceUID  # kept whole in quarantine
    assert len(paths) == 1 and pydicom.dcmread(paths[0]).SeriesInstanceUID == series.series_instance_uid
    assert "duplicates_of_other_series_quarantined=1" in node.log() and "repair.set_aside_file" in node.log()
