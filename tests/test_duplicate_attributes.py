"""The same SOP Instance UID sent again with other values of what the node's results are made from.

A real `dicom-node serve`, the real 20-slice JPEG 2000 lossless CT and DCMTK storescu. A resend that changes
RescaleIntercept or ImagePositionPatient (same pixel data) is refused 0x0111 and holds the series, as one with other
pixel data is; a resend that changes only what the node does not use (InstitutionName, a private tag) or writes a
number differently (``-1024.0`` for ``-1024``) is kept once. The comparison reads the stored file once.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid
from pynetdicom import AE

from db.models import JobState
from dicom_node.phantom import PhantomSpec, write_phantom_series
from dicom_node.receive.storage import (
    IDENTITY_TEXT_ATTRIBUTES,
    RESULT_ATTRIBUTES,
    copy_difference,
    different_copy_comment,
    different_copy_reason,
    encode_file_meta,
)
from tests.conftest import CT_RULES, data_set_bytes, storescu, succeeded_files, wait_for
from tests.test_duplicate_content import refusals, sop_uid_of, stored_instances

DIFFERENT_CONTENT = 0x0111  # Duplicate SOP Instance (PS3.7 Annex C), as a number a sender sees


@pytest.fixture
def ct_series(shared_fixtures) -> list[Path]:
    return sorted((shared_fixtures / "example_ct_dicom_valid").glob("*.dcm"))


def edited(source: Path, target: Path, **values: object) -> Path:
    """``source`` with the given attributes set, its pixel data (JPEG 2000 lossless) untouched."""
    dataset = pydicom.dcmread(source)
    for keyword, value in values.items():
        setattr(dataset, keyword, value)
    dataset.save_as(target, enforce_file_format=True)
    return target


def refused_by_storescu(output: str) -> int:
    """How many answers storescu reported as 'Duplicate SOP Instance' (0x0111), a status it has no name for."""
    return output.count("Received Store Response (Unknown Status: 0x111)")


def answer_to(node, path: Path) -> Dataset:
    """The C-STORE response to ``path``, sent as it is stored (JPEG 2000 lossless) by a pynetdicom sender."""
    ae = AE(ae_title="CORRECTOR")
    ae.add_requested_context(CTImageStorage, JPEG2000Lossless)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        return assoc.send_c_store(pydicom.dcmread(path))
    finally:
        assoc.release()


def test_a_resend_with_another_rescale_or_position_is_refused_and_holds_the_series(ct_series, tmp_path, start_node):
    node = start_node(rules=CT_RULES, completion={"quiet_seconds": 600})
    first = storescu(node.port, ct_series, extra=["-xv"])
    assert len(succeeded_files(first.stderr)) == 20, first.stdout + first.stderr
    wait_for(lambda: len(stored_instances(node)) == 20, timeout=30, what="the 20 instances to be recorded")
    (tmp_path / "resent").mkdir()
    intercept = edited(ct_series[3], tmp_path / "resent" / "intercept.dcm", RescaleIntercept="0")
    position = pydicom.dcmread(ct_series[7], stop_before_pixels=True).ImagePositionPatient
    moved = [str(position[0]), str(position[1]), str(float(position[2]) + 5)]
    shifted = edited(ct_series[7], tmp_path / "resent" / "position.dcm", ImagePositionPatient=moved)

    resent = storescu(node.port, [intercept, shifted], extra=["-xv", "-nh"])
    answer = answer_to(node, intercept)  # sent once more, to read the answer's comment

    output = resent.stdout + resent.stderr
    assert succeeded_files(resent.stderr) == [] and refused_by_storescu(output) == 2, output
    assert int(answer.Status) == DIFFERENT_CONTENT
    assert str(answer.ErrorComment) == "RescaleIntercept differs from the stored copy; first kept"
    stored = stored_instances(node)
    for source in ct_series:  # the first copies stay, byte for byte
        assert data_set_bytes(stored[sop_uid_of(source)]) == data_set_bytes(source)
    reasons = {row.sop_instance_uid: row.reason for row in refusals(node)}
    assert {row.status for row in refusals(node)} == {DIFFERENT_CONTENT}
    assert reasons[sop_uid_of(ct_series[3])].startswith(
        f"SOP Instance UID {sop_uid_of(ct_series[3])} was already received with another RescaleIntercept "
        "('-1024' in the stored copy, '0' in this one); the first copy is kept and this one quarantined"
    )
    assert "was already received with another ImagePositionPatient (" in reasons[sop_uid_of(ct_series[7])]
    assert f"{float(position[2]) + 5}" in reasons[sop_uid_of(ct_series[7])]  # both values are named
    assert all(Path(row.path or "").is_file() for row in refusals(node))  # each refused copy kept in quarantine
    series_uid = str(pydicom.dcmread(ct_series[0], stop_before_pixels=True).SeriesInstanceUID)
    node.wait_for_state(series_uid, JobState.FAILED)
    assert (node.job_reason(series_uid) or "").startswith(
        f"SOP Instance UID {sop_uid_of(ct_series[3])} was sent again with another RescaleIntercept and refused"
    )
    refused_lines = [line for line in node.log().splitlines() if "instance.refused" in line]
    assert len(refused_lines) == 3 and all("WARNING" in line for line in refused_lines)


def test_a_resend_that_differs_only_in_what_the_node_does_not_use_is_kept_once(ct_series, tmp_path, start_node):
    node = start_node(rules=CT_RULES, completion={"quiet_seconds": 600})
    assert len(succeeded_files(storescu(node.port, ct_series, extra=["-xv"]).stderr)) == 20
    wait_for(lambda: len(stored_instances(node)) == 20, timeout=30, what="the 20 instances to be recorded")
    (tmp_path / "resent").mkdir()
    resent_files = []
    for source in ct_series:
        target = edited(source, tmp_path / "resent" / source.name, InstitutionName="ANOTHER HOSPITAL")
        dataset = pydicom.dcmread(target)
        dataset.RescaleIntercept = "-1024.0"  # the same number, written another way
        dataset.private_block(0x0011, "RESEND TEST", create=True).add_new(0x01, "LO", "resent by the PACS")
        dataset.save_as(target, enforce_file_format=True)
        resent_files.append(target)

    resent = storescu(node.port, resent_files, extra=["-xv"])

    assert len(succeeded_files(resent.stderr)) == 20, resent.stdout + resent.stderr
    assert refusals(node) == []
    stored = stored_instances(node)
    for source in ct_series:  # kept once: the first copies, untouched
        assert data_set_bytes(stored[sop_uid_of(source)]) == data_set_bytes(source)


def test_an_identity_attribute_that_differs_is_named_without_its_values(ct_series, tmp_path):
    stored = ct_series[0]
    dataset = pydicom.dcmread(stored)
    dataset.PatientID = "SOMEONE-ELSE-4711"
    syntax = UID(dataset.file_meta.TransferSyntaxUID)

    difference = copy_difference(stored, encoded(dataset, syntax), syntax)

    assert difference is not None and difference.attribute == "PatientID"
    assert "SOMEONE-ELSE" not in difference.detail and str(pydicom.dcmread(stored).PatientID) not in difference.detail
    assert set(IDENTITY_TEXT_ATTRIBUTES) == {"PatientID", "PatientName", "StudyInstanceUID", "SeriesInstanceUID"}
    assert set(IDENTITY_TEXT_ATTRIBUTES) < set(RESULT_ATTRIBUTES)


def encoded(dataset: Dataset, syntax: UID) -> bytes:
    """The data set as a sender puts it on the wire (no File Meta Information)."""
    stream = DicomBytesIO()
    stream.is_little_endian, stream.is_implicit_VR = True, syntax.is_implicit_VR
    write_dataset(stream, dataset)
    return stream.getvalue()


def test_comparing_a_resent_copy_reads_the_stored_file_once_without_a_second_copy_in_memory(tmp_path):
    """An 8 MB uncompressed instance, resent with another InstitutionName: kept once, and the comparison holds
    the stored data set once (it held about three copies of the instance before)."""
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPClassUID, dataset.SOPInstanceUID = CTImageStorage, generate_uid()
    dataset.Modality, dataset.InstitutionName, dataset.RescaleIntercept = "CT", "FIRST", "-1024"
    dataset.Rows = dataset.Columns = 2048
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 12, 11, 0
    dataset.PixelData = np.arange(2048 * 2048, dtype=np.uint16).__mod__(4096).tobytes()
    first = encoded(dataset, ExplicitVRLittleEndian)
    stored = tmp_path / "stored.dcm"
    meta = encode_file_meta(CTImageStorage, dataset.SOPInstanceUID, ExplicitVRLittleEndian, "PACS")
    stored.write_bytes(meta + first)
    dataset.InstitutionName = "SECOND"
    again = encoded(dataset, ExplicitVRLittleEndian)
    del dataset, first

    tracemalloc.start()
    try:
        difference = copy_difference(stored, again, ExplicitVRLittleEndian)
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert difference is None
    assert peak < 1.5 * len(again), f"the comparison held {peak / len(again):.1f} times the instance"


@pytest.mark.parametrize("bomb_stored_first", [False, True])
def test_a_copy_whose_jpeg_2000_frame_says_a_larger_image_is_not_decoded_to_compare_it(
    ct_series, tmp_path, monkeypatch, bomb_stored_first
):
    """A resend whose codestream says 2048 x 2048 under Rows and Columns of 512: decoding it would allocate what the
    frame says (gigabytes at 16384 x 16384, for a file of 2 KB, in the receiving process). Either copy, stored or
    sent again, is named and refused as a different copy without being decoded."""
    from dicom_node.receive import storage

    normal = ct_series[0]
    bomb = pydicom.dcmread(normal)
    rows, columns = bomb.Rows, bomb.Columns
    bomb.Rows = bomb.Columns = 2048
    bomb.PixelData = np.zeros((2048, 2048), dtype=np.int16).tobytes()
    bomb.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    bomb.compress(JPEG2000Lossless, generate_instance_uid=False)
    bomb.Rows, bomb.Columns = rows, columns
    bomb_file = tmp_path / "bomb.dcm"
    bomb.save_as(bomb_file, enforce_file_format=True)
    stored, resent = (bomb_file, normal) if bomb_stored_first else (normal, bomb_file)

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("a copy was decoded although a frame's own header disagrees with Rows and Columns")

    monkeypatch.setattr(storage, "iter_pixels", no_decoding)
    difference = copy_difference(stored, data_set_bytes(resent), JPEG2000Lossless)

    assert difference is not None and difference.attribute == storage.PIXEL_DATA
    which = "the stored copy" if bomb_stored_first else "this copy"
    assert f"the JPEG 2000 data of {which}" in difference.detail and "it is not decoded" in difference.detail
    assert "2048" in difference.detail


def test_an_enhanced_ct_resent_with_another_frame_position_names_the_frame(tmp_path):
    [stored] = write_phantom_series(tmp_path / "ct", PhantomSpec(rows=16, columns=16, slices=4, enhanced=True)).files
    syntax = UID(pydicom.dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    retimed = pydicom.dcmread(stored)  # what the node does not use, inside a frame's functional groups
    retimed.PerFrameFunctionalGroupsSequence[2].FrameContentSequence[0].FrameAcquisitionDuration = 750.0
    moved = pydicom.dcmread(stored)
    plane = moved.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence[0]
    plane.ImagePositionPatient = [plane.ImagePositionPatient[0], plane.ImagePositionPatient[1], -999.5]

    assert copy_difference(stored, encoded(retimed, syntax), syntax) is None
    difference = copy_difference(stored, encoded(moved, syntax), syntax)

    assert difference is not None
    assert different_copy_reason("1.2.3.4", "1.2.3", difference).startswith(
        "SOP Instance UID 1.2.3.4 was already received with another ImagePositionPatient in item 1 of "
        "PlanePositionSequence in item 3 of PerFrameFunctionalGroupsSequence ("
    )
    assert difference.detail.endswith(" in the stored copy, '-6, -6, -999.5' in this one")  # both values
    assert different_copy_comment(difference) == "ImagePositionPatient differs from the stored copy; first kept"
