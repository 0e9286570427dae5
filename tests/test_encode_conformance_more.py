"""What the SEG, SR and RTSTRUCT say must be valid and true: values inside copied sequences keep to their VRs,
LossyImageCompression says "01" when any source was lossy, and the SEG's orientation is unit direction cosines.

Each result is made by the node's own encoders from the real CT (or the phantom) and checked with dciodvfy and
pydicom."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGLSNearLossless

from dicom_node.admission import InstanceFile, admit
from dicom_node.config import AdmissionSettings
from dicom_node.encode.copied import checked_source
from dicom_node.encode.measurements import measure
from dicom_node.encode.results import encode_results
from dicom_node.encode.values import MAXIMUM_SEQUENCE_DEPTH, MAXIMUM_SEQUENCE_VALUES
from dicom_node.phantom import PhantomSpec, write_phantom_series
from inference.models.threshold import ThresholdModel
from inference.volume import load_series_volume
from tests.conftest import dciodvfy, real_ct_copy

SMALL_CT = PhantomSpec(rows=32, columns=32, slices=4, pixel_spacing=(5.0, 5.0), slice_spacing=5.0)
NON_UNIT_ORIENTATION = [0.9995, 0.0, 0.0, 0.0, 1.0, 0.001]
"""Within admission's tolerance, as a scanner's rounding writes it; not unit length."""
LOSSY_KEYWORDS = ("LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod")


def put_raw(item: Dataset, keyword: str, text: str) -> None:
    """Store ``text`` as the element's encoded value, unchecked, as a broken modality writes it."""
    value = text.encode("latin-1")
    value += b" " * (len(value) % 2)
    tag = Tag(tag_for_keyword(keyword))
    item._dict[tag] = RawDataElement(tag, dictionary_VR(tag), len(value), value, 0, False, True)


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    for keyword, text in (("CodeValue", value), ("CodingSchemeDesignator", scheme), ("CodeMeaning", meaning)):
        put_raw(item, keyword, text)
    return item


def change_files(files: list[Path], change: Callable[[int, pydicom.Dataset], None]) -> None:
    """Rewrite each file (in position order) after ``change(index, dataset)``."""
    for index, path in enumerate(files):
        dataset = pydicom.dcmread(path)
        change(index, dataset)
        dataset.save_as(path)


def encode(files: list[Path], out: Path, warnings: list[str] | None = None) -> dict[str, Path]:
    """The baseline's BINARY SEG, its SR and the RTSTRUCT of ``files``, made by the node's encoders."""
    volume = load_series_volume(files)
    model = ThresholdModel()
    segmentation = model.segment(volume)
    out.mkdir()
    written = encode_results(
        volume,
        segmentation,
        measure(volume, segmentation.labels, segmentation.classes),
        model,
        out,
        ["BINARY"],
        rtstruct=True,
        warnings=warnings if warnings is not None else [],
    )
    return {Path(result.path).name: Path(result.path) for result in written}


def assert_valid(results: dict[str, Path]) -> None:
    for name, path in results.items():
        errors, _ = dciodvfy(path)
        assert errors == [], name


def phantom_files(folder: Path, spec: PhantomSpec = SMALL_CT) -> list[Path]:
    files = write_phantom_series(folder, spec).files
    if spec.enhanced:
        return files
    return sorted(files, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))


# 1. Values inside copied sequences


def test_invalid_values_inside_copied_sequences_are_left_out_with_a_sentence(shared_fixtures, tmp_path):
    files = real_ct_copy(tmp_path / "ct", shared_fixtures)
    kept_study = pydicom.dcmread(files[0]).ReferencedStudySequence[0]

    def break_sequences(_: int, dataset: pydicom.Dataset) -> None:
        procedure = dataset.ProcedureCodeSequence[0]
        put_raw(procedure, "CodeValue", "CT-THORAX-ABD-PELVIS-KM")  # 23 characters, SH allows 16
        put_raw(procedure, "CodeMeaning", "M" * 70)
        leading_zero = Dataset()
        leading_zero.ReferencedSOPClassUID = kept_study.ReferencedSOPClassUID
        put_raw(leading_zero, "ReferencedSOPInstanceUID", "1.2.840.113619.6.95.31.0.3.4.1.4285.13.030543134")
        dataset.ReferencedStudySequence.append(leading_zero)
        dataset.AdmittingDiagnosesCodeSequence = [code_item("I10", "I10", "Hypertension\r\nsecond line")]
        institution = Dataset()
        institution.InstitutionCodeSequence = [code_item("HOSPITAL-CODE-TOO-LONG", "99LOCAL", "Hospital")]
        dataset.ReferringPhysicianIdentificationSequence = [institution]

    change_files(files, break_sequences)
    warnings: list[str] = []

    results = encode(files, tmp_path / "out", warnings)

    assert sorted(warnings) == sorted(
        [
            "ProcedureCodeSequence of the source images: CodeValue in item 1 is 23 characters long, more than the 16 "
            "DICOM allows; the sequence is left out of the results",
            "ReferencedStudySequence of the source images: ReferencedSOPInstanceUID in item 2 is not a UID (numbers "
            "joined by dots, none with a leading zero); 1 of its 2 items is left out of the results",
            "AdmittingDiagnosesCodeSequence of the source images: CodeMeaning in item 1 holds a control character (a "
            "tab, line break or similar); the sequence is left out of the results",
            "ReferringPhysicianIdentificationSequence of the source images: CodeValue in item 1 of "
            "InstitutionCodeSequence in item 1 is 22 characters long, more than the 16 DICOM allows; the sequence "
            "is left out of the results",
        ]
    )
    assert_valid(results)
    for name in ("seg-binary.dcm", "sr-binary.dcm"):
        result = pydicom.dcmread(results[name])
        for keyword in ("ProcedureCodeSequence", "AdmittingDiagnosesCodeSequence"):
            assert keyword not in result, f"{keyword} in {name}"
        assert "ReferringPhysicianIdentificationSequence" not in result, name
        assert [str(item.ReferencedSOPInstanceUID) for item in result.ReferencedStudySequence] == [
            str(kept_study.ReferencedSOPInstanceUID)
        ], name
    source = pydicom.dcmread(files[0])
    assert len(source.ReferencedStudySequence) == 2, "the stored source is left as it was sent"
    assert source.ProcedureCodeSequence[0].CodeValue == "CT-THORAX-ABD-PELVIS-KM"


def test_copied_sequence_items_without_an_attribute_dicom_requires_are_left_out(shared_fixtures, tmp_path):
    files = real_ct_copy(tmp_path / "ct", shared_fixtures)

    def leave_out_required(_: int, dataset: pydicom.Dataset) -> None:
        del dataset.ProcedureCodeSequence[0].CodeMeaning
        no_class = Dataset()
        no_class.ReferencedSOPInstanceUID = "1.2.3.4"
        dataset.ReferencedStudySequence.append(no_class)
        no_scheme = Dataset()
        no_scheme.CodeValue = "I10"
        no_scheme.CodeMeaning = "Hypertension"
        dataset.AdmittingDiagnosesCodeSequence = [no_scheme, code_item("I11", "I10", "Hypertensive heart disease")]
        dataset.ReferencedPatientSequence = [Dataset()]

    change_files(files, leave_out_required)
    warnings: list[str] = []

    results = encode(files, tmp_path / "out", warnings)

    required = "is missing or empty, where DICOM requires it"
    assert sorted(warnings) == sorted(
        [
            f"ProcedureCodeSequence of the source images: CodeMeaning in item 1 {required}; the sequence is left "
            "out of the results",
            f"ReferencedStudySequence of the source images: ReferencedSOPClassUID in item 2 {required}; 1 of its 2 "
            "items is left out of the results",
            f"AdmittingDiagnosesCodeSequence of the source images: CodingSchemeDesignator in item 1 {required}; 1 "
            "of its 2 items is left out of the results",
            f"ReferencedPatientSequence of the source images: ReferencedSOPClassUID in item 1 {required}; the "
            "sequence is left out of the results",
        ]
    )
    assert_valid(results)
    for name in ("seg-binary.dcm", "sr-binary.dcm"):
        result = pydicom.dcmread(results[name])
        assert "ProcedureCodeSequence" not in result, name
        assert "ReferencedPatientSequence" not in result, name
        assert [item.CodeValue for item in result.AdmittingDiagnosesCodeSequence] == ["I11"], name
        assert len(result.ReferencedStudySequence) == 1, name


def test_sequence_checks_are_bounded_in_depth_and_size(tmp_path):
    """A sequence nesting deeper than is checked, or holding more values than are checked, is not copied whole."""
    header = pydicom.dcmread(phantom_files(tmp_path)[0], stop_before_pixels=True)
    deepest = innermost = Dataset()
    for _ in range(MAXIMUM_SEQUENCE_DEPTH):
        innermost = Dataset()
        innermost.ReferencedSeriesSequence = [deepest]
        deepest = innermost
    header.ReferencedPatientSequence = [innermost]
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    study.ReferencedSOPInstanceUID = "1.2.3"
    header.ReferencedStudySequence = [study] * (MAXIMUM_SEQUENCE_VALUES // 2 + 1)
    notes: list[str] = []

    checked = checked_source(header, notes)

    assert "ReferencedPatientSequence" not in checked
    assert len(checked.ReferencedStudySequence) == MAXIMUM_SEQUENCE_VALUES // 2
    assert notes == [
        "ReferencedPatientSequence of the source images: a sequence in item 1 of ReferencedSeriesSequence"
        + " in item 1 of ReferencedSeriesSequence" * (MAXIMUM_SEQUENCE_DEPTH - 1)
        + f" in item 1 nests deeper than the {MAXIMUM_SEQUENCE_DEPTH} levels that are checked; the sequence is "
        "left out of the results",
        f"ReferencedStudySequence of the source images: a value in item {MAXIMUM_SEQUENCE_VALUES // 2 + 1} is beyond "
        f"the first {MAXIMUM_SEQUENCE_VALUES} values of the sequence, which are checked; 1 of its "
        f"{MAXIMUM_SEQUENCE_VALUES // 2 + 1} items is left out of the results",
    ]
    assert len(header.ReferencedStudySequence) == MAXIMUM_SEQUENCE_VALUES // 2 + 1, "the source is left as it is"


def admission_files(files: list[Path]) -> list[InstanceFile]:
    found = []
    for number, path in enumerate(files, start=1):
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        found.append(
            InstanceFile(
                path=path,
                sop_instance_uid=str(dataset.SOPInstanceUID),
                transfer_syntax_uid=str(dataset.file_meta.TransferSyntaxUID),
                instance_number=number,
            )
        )
    return found


def _other_id(patient_id: str) -> Dataset:
    item = Dataset()
    put_raw(item, "PatientID", patient_id)
    item.TypeOfPatientID = "TEXT"
    return item


def _qualifier(entity_type: str) -> Dataset:
    item = Dataset()
    item.UniversalEntityID = "2.16.756.5.30"
    put_raw(item, "UniversalEntityIDType", entity_type)
    return item


@pytest.mark.parametrize(
    ("keyword", "item", "refusal"),
    [
        (
            "OtherPatientIDsSequence",
            _other_id("X" * 70),
            "OtherPatientIDsSequence of instance 1: PatientID in item 1 is 70 characters long, more than the 64 "
            "DICOM allows; the results carry it, so the sender must correct it",
        ),
        (
            "IssuerOfPatientIDQualifiersSequence",
            _qualifier("ISO\tX"),
            "IssuerOfPatientIDQualifiersSequence of instance 1: UniversalEntityIDType in item 1 holds a control "
            "character (a tab, line break or similar); the results carry it, so the sender must correct it",
        ),
        ("OtherPatientIDsSequence", _other_id("OTHER-1"), None),
        ("IssuerOfPatientIDQualifiersSequence", _qualifier("ISO"), None),
    ],
    ids=["other-id-too-long", "qualifier-with-tab", "valid-other-id", "valid-qualifier"],
)
def test_identity_sequences_with_an_invalid_value_are_refused_at_admission(tmp_path, keyword, item, refusal):
    """The results copy them as they are (they say whose the PatientID is): like an invalid PatientID, the sender
    must correct them. The value itself is never named."""
    files = phantom_files(tmp_path)
    change_files(files, lambda _, dataset: setattr(dataset, keyword, [item]))

    result = admit(admission_files(files), AdmissionSettings())

    assert result.refusal == refusal


# 2. LossyImageCompression from every source


def _j2k_lossy(dataset: pydicom.Dataset) -> None:
    dataset.compress(JPEG2000, j2k_cr=[20], encoding_plugin="pylibjpeg")


def _flag(dataset: pydicom.Dataset, flag: str | None, ratio: str | None = None, method: str | None = None) -> None:
    for keyword, value in zip(LOSSY_KEYWORDS, (flag, ratio, method), strict=True):
        if value is None:
            if keyword in dataset:
                del dataset[keyword]
        else:
            setattr(dataset, keyword, value)


def lossy_but_the_first(index: int, dataset: pydicom.Dataset) -> None:
    """Every image but the first (the one highdicom copies the flag from) JPEG 2000 lossy, flagged."""
    if index:
        _j2k_lossy(dataset)
        _flag(dataset, "01", "20", "ISO_15444_1")


def lossy_unflagged(_: int, dataset: pydicom.Dataset) -> None:
    _j2k_lossy(dataset)
    _flag(dataset, None)


def lossy_said_lossless(_: int, dataset: pydicom.Dataset) -> None:
    """Irreversible JPEG 2000 (which always loses information) with a sender's "00"."""
    _j2k_lossy(dataset)
    _flag(dataset, "00")


def near_lossless_jpeg_ls(_: int, dataset: pydicom.Dataset) -> None:
    dataset.compress(JPEGLSNearLossless, jls_error=3)
    _flag(dataset, "01", None, "ISO_14495_1")


def decompressed_after_jpeg(index: int, dataset: pydicom.Dataset) -> None:
    """One image stored uncompressed that was JPEG compressed once (8:1), as its flag says."""
    if index == 2:
        _flag(dataset, "01", "8", "ISO_10918_1")


def reversible_jpeg_2000(_: int, dataset: pydicom.Dataset) -> None:
    """JPEG 2000 (the transfer syntax that allows lossy) with the reversible transform, flagged "00": lossless."""
    dataset.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    dataset.file_meta.TransferSyntaxUID = JPEG2000  # the same reversible codestream, which this syntax allows too
    _flag(dataset, "00")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lossy_but_the_first, ("01", ["20"], ["ISO_15444_1"])),
        (lossy_unflagged, ("01", None, ["ISO_15444_1"])),
        (lossy_said_lossless, ("01", None, ["ISO_15444_1"])),
        (near_lossless_jpeg_ls, ("01", None, ["ISO_14495_1"])),
        (decompressed_after_jpeg, ("01", ["8"], ["ISO_10918_1"])),
        (reversible_jpeg_2000, ("00", None, None)),
    ],
    ids=lambda value: getattr(value, "__name__", None),
)
def test_results_of_lossy_sources_say_lossy_compression_with_what_is_known(tmp_path, change, expected):
    files = phantom_files(tmp_path / "ct")
    change_files(files, change)

    results = encode(files, tmp_path / "out")

    assert_valid(results)
    flag, ratios, methods = expected
    for name, path in results.items():
        result = pydicom.dcmread(path)
        # The SR's IOD has no such attribute: its comment says the figures come from lossy images.
        if result.Modality == "SR":
            said = "lossy compressed" in _comment(result)
            assert said == (flag == "01"), name
            if ratios and flag == "01":
                assert f"ratio {ratios[0]}:1" in _comment(result), name
        if result.Modality != "SEG":  # only the SEG's IOD has the attribute: the SR and RTSTRUCT leave it out
            assert not any(keyword in result for keyword in LOSSY_KEYWORDS), name
            continue
        assert result.LossyImageCompression == flag, name
        assert _values(result, "LossyImageCompressionRatio") == ratios, name
        assert _values(result, "LossyImageCompressionMethod") == methods, name


def _comment(sr: pydicom.Dataset) -> str:
    """Every TEXT content item's value in the SR, joined (the caveats are one numbered Comment)."""
    texts: list[str] = []

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            if item.get("ValueType") == "TEXT":
                texts.append(str(item.TextValue))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return "\n".join(texts)


def _values(dataset: pydicom.Dataset, keyword: str) -> list[str] | None:
    """An attribute's values as written (None when absent)."""
    if keyword not in dataset:
        return None
    value = dataset[keyword].value
    return [str(v) for v in (value if isinstance(value, MultiValue) else [value])]


# 3. The SEG's orientation


def _seg_geometry(seg: pydicom.Dataset) -> tuple[np.ndarray, np.ndarray, list[float]]:
    shared = seg.SharedFunctionalGroupsSequence[0]
    orientation = np.array([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    return orientation[:3], orientation[3:], spacing


def test_seg_orientation_is_unit_and_the_rtstruct_contours_lie_on_the_seg_masks(shared_fixtures, tmp_path):
    files = real_ct_copy(tmp_path / "ct", shared_fixtures)
    change_files(files, lambda _, dataset: setattr(dataset, "ImageOrientationPatient", NON_UNIT_ORIENTATION))

    results = encode(files, tmp_path / "out")

    assert_valid(results)
    seg = pydicom.dcmread(results["seg-binary.dcm"])
    row, column, spacing = _seg_geometry(seg)
    assert np.linalg.norm(row) == pytest.approx(1, abs=1e-9)
    assert np.linalg.norm(column) == pytest.approx(1, abs=1e-9)
    assert float(np.dot(row, column)) == pytest.approx(0, abs=1e-9)
    assert np.max(np.abs(np.concatenate([row, column]) - NON_UNIT_ORIENTATION)) < 0.001  # the sources' directions
    masks = _seg_masks(seg)
    positions = {
        str(ds.SOPInstanceUID): np.array([float(v) for v in ds.ImagePositionPatient])
        for ds in (pydicom.dcmread(path, stop_before_pixels=True) for path in files)
    }
    rtstruct = pydicom.dcmread(results["rtstruct.dcm"])
    names = {int(roi.ROINumber): str(roi.ROIName) for roi in rtstruct.StructureSetROISequence}
    checked = on_edge = 0
    for roi in rtstruct.ROIContourSequence:
        for contour in roi.ContourSequence:
            image = str(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)
            mask = masks[(names[int(roi.ReferencedROINumber)], image)]
            points = np.array([float(v) for v in contour.ContourData]).reshape(-1, 3) - positions[image]
            assert np.max(np.abs(points @ np.cross(row, column))) < 0.001, "a point off its image's plane"
            for point in points[:: max(1, len(points) // 20)]:
                r, c = round(float(point @ column) / spacing[0]), round(float(point @ row) / spacing[1])
                window = mask[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2]
                checked += 1
                on_edge += bool(window.size and window.any() and not window.all())
    assert checked > 100 and on_edge >= 0.98 * checked


def _seg_masks(seg: pydicom.Dataset) -> dict[tuple[str, str], np.ndarray]:
    """Each frame of a BINARY SEG by (segment label, source image)."""
    labels = {int(item.SegmentNumber): str(item.SegmentLabel) for item in seg.SegmentSequence}
    pixels = seg.pixel_array.reshape(-1, int(seg.Rows), int(seg.Columns))
    masks = {}
    for frame, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        image = str(group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        masks[(labels[number], image)] = pixels[frame] > 0
    return masks


def test_seg_of_an_enhanced_ct_with_non_unit_orientation_states_unit_direction_cosines(tmp_path):
    files = phantom_files(tmp_path / "ct", replace(SMALL_CT, enhanced=True))

    def non_unit(_: int, dataset: pydicom.Dataset) -> None:
        plane = dataset.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
        plane.ImageOrientationPatient = NON_UNIT_ORIENTATION

    change_files(files, non_unit)

    results = encode(files, tmp_path / "out")

    assert_valid(results)
    row, column, _ = _seg_geometry(pydicom.dcmread(results["seg-binary.dcm"]))
    assert np.linalg.norm(row) == pytest.approx(1, abs=1e-9)
    assert np.linalg.norm(column) == pytest.approx(1, abs=1e-9)
    assert float(np.dot(row, column)) == pytest.approx(0, abs=1e-9)
