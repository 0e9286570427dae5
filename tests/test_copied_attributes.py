"""Header values the results copy from the source: an invalid FrameOfReferenceUID is refused at the door, other
values that break their VR are left out of (or emptied in) the SEG, SR and RTSTRUCT, each with a warning."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from sqlalchemy import select

from db.models import RejectedInstance
from dicom_node import status
from dicom_node.encode.measurements import measure
from dicom_node.encode.results import encode_results
from dicom_node.phantom import PhantomSpec, write_phantom_series
from inference.models.threshold import ThresholdModel
from inference.volume import load_series_volume
from tests.conftest import CT_RULES, dciodvfy, storescu, succeeded_files

SMALL_CT = PhantomSpec(rows=32, columns=32, slices=4, pixel_spacing=(5.0, 5.0), slice_spacing=5.0)
INVALID = {
    "PatientWeight": ("DS", "abc", "is not a decimal number: left out of the results"),
    "PatientSize": ("DS", "NaN", "is not a decimal number: left out of the results"),
    "MeasuredAPDimension": ("DS", "1e999", "is not a decimal number: left out of the results"),
    "PatientAge": (
        "AS",
        "ABCD",
        "is not an age in the DICOM form nnnD, nnnW, nnnM or nnnY (such as 045Y): left out of the results",
    ),
    "StudyDescription": (
        "LO",
        "CT THORAX ABDOMEN " * 12,
        "is 215 characters long, more than the 64 DICOM allows: left out of the results",
    ),
    "AdmissionID": ("LO", "FIRST\\SECOND", "has 2 values where one is allowed: left out of the results"),
    "Occupation": (
        "SH",
        "NIGHT\tSHIFT",
        "holds a control character (a tab, line break or similar): left out of the results",
    ),
    "ImageLaterality": ("CS", "X", "is not one of R, L, U or B: left out of the results"),
    "ReferringPhysicianName": (
        "PN",
        "A^B^C^D^E^F^G=X=Y=Z",
        "has 4 component groups (=), where a name has at most 3: written empty in the results",
    ),
    "PhysiciansOfRecord": (
        "PN",
        "A^B^C^D^E^F^G",
        "has 7 components (^), where a name has at most 5 (family, given, middle, prefix, suffix): left out of the "
        "results",
    ),
    "PositionReferenceIndicator": (
        "LO",
        "ILIAC CREST AND MORE TEXT THAN SIXTY FOUR CHARACTERS ALLOWED IN LO",
        "is 66 characters long, more than the 64 DICOM allows: written empty in the results",
    ),
}
"""keyword: (VR, value as a sender wrote it, the end of the job's warning)."""
LEFT_OUT = [keyword for keyword, (*_, outcome) in INVALID.items() if outcome.endswith("left out of the results")]
EMPTIED = [keyword for keyword, (*_, outcome) in INVALID.items() if outcome.endswith("written empty in the results")]


def put_raw(ds: Dataset, keyword: str, vr: str, text: str) -> None:
    """Store ``text`` as the element's encoded value, unchecked, as a broken modality would write it."""
    value = text.encode("latin-1")
    value += b" " * (len(value) % 2)
    tag = Tag(tag_for_keyword(keyword))
    ds._dict[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)


def broken_series(folder: Path, values: dict[str, tuple[str, str]]) -> list[Path]:
    """A small phantom CT series whose every image carries ``values`` (keyword: (VR, text)) as written."""
    series = write_phantom_series(folder, SMALL_CT)
    for path in series.files:
        dataset = pydicom.dcmread(path)
        for keyword, (vr, text) in values.items():
            put_raw(dataset, keyword, vr, text)
        dataset.save_as(path)
    return series.files


@pytest.mark.parametrize("rtstruct", [True, False], ids=["with-rtstruct", "seg-and-sr"])
def test_results_leave_out_or_empty_invalid_copied_values_and_say_so(tmp_path, rtstruct):
    files = broken_series(tmp_path / "ct", {keyword: (vr, text) for keyword, (vr, text, _) in INVALID.items()})
    volume = load_series_volume(files)
    model = ThresholdModel()
    segmentation = model.segment(volume)
    out = tmp_path / "out"
    out.mkdir()
    warnings = ["2 localizer image(s) left out of the volume"]

    written = encode_results(
        volume,
        segmentation,
        measure(volume, segmentation.labels, segmentation.classes),
        model,
        out,
        ["BINARY"],
        rtstruct=rtstruct,
        warnings=warnings,
    )

    expected = [f"{keyword} of the source images {outcome}" for keyword, (*_, outcome) in INVALID.items()]
    assert sorted(warnings) == sorted(["2 localizer image(s) left out of the volume", *expected])  # each once
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    for result in written:
        path = Path(result.path)
        errors, _ = dciodvfy(path)
        assert errors == [], path.name
        dataset = pydicom.dcmread(path)
        for keyword in LEFT_OUT:  # absent, or empty where a result writes it anyway (the RTSTRUCT's study)
            own = keyword == "ImageLaterality" and dataset.get(keyword) == "B"  # the SEG's own: both sides
            assert keyword not in dataset or dataset[keyword].value in (None, "") or own, f"{keyword} in {path.name}"
        for keyword in EMPTIED:  # Type 2: present and empty where the result has the module (the SR has no frame)
            assert dataset.get(keyword, "") in (None, ""), f"{keyword} in {path.name}"
        assert "ReferringPhysicianName" in dataset
        for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "AccessionNumber", "PatientBirthDate"):
            assert str(dataset.get(keyword, "")) == str(source.get(keyword, "")), f"{keyword} in {path.name}"
        if "FrameOfReferenceUID" in dataset:
            assert dataset.FrameOfReferenceUID == source.FrameOfReferenceUID
    report = pydicom.dcmread(out / "sr-binary.dcm")
    texts = [str(item.TextValue) for item in report.ContentSequence if item.ValueType == "TEXT"]
    comment = next(text for text in texts if text.startswith("Read with care"))
    assert all(sentence in comment for sentence in expected)
    assert pydicom.dcmread(files[0]).PatientWeight == "abc", "the stored source is left as it was sent"


@pytest.mark.integration
def test_an_invalid_frame_of_reference_uid_is_refused_at_store_naming_it_and_the_instance(tmp_path, start_node):
    series = write_phantom_series(tmp_path / "ct", SMALL_CT)
    bad = {series.files[0]: "1.2.840.abc.01", series.files[1]: "1.2.840." + "1234567890" * 7}
    for path, uid in bad.items():
        dataset = pydicom.dcmread(path)
        put_raw(dataset, "FrameOfReferenceUID", "UI", uid)
        dataset.save_as(path)
    node = start_node(rules=CT_RULES)

    sent = storescu(node.port, series.files, extra=["--no-halt"])

    assert succeeded_files(sent.stdout + sent.stderr) == [str(path) for path in series.files if path not in bad]
    with node.sessions() as session:
        rejections = {row.sop_instance_uid: row for row in session.scalars(select(RejectedInstance))}
    first, second = (pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID for path in bad)
    assert set(rejections) == {first, second}
    assert rejections[first].reason == (
        f"FrameOfReferenceUID '1.2.840.abc.01' of instance {first} is not a valid UID; the results reference it, so "
        "the sender must correct it"
    )
    assert rejections[second].reason == (
        f"FrameOfReferenceUID '1.2.840.1234567890123456'... (78 characters) of instance {second} is not a valid UID; "
        "the results reference it, so the sender must correct it"
    )
    assert {row.status for row in rejections.values()} == {status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS}
