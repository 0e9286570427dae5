"""DICOM-SEG encoding: validates, decodes back to the same label map at the same positions, codes laterality;
the fast writer's bytes are pydicom's."""

from __future__ import annotations

import copy
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, SegmentationStorage

from dicom_node.encode.codes import LEFT, RIGHT, display_label, structure_codes
from dicom_node.encode.fast_write import save_preencoded
from dicom_node.encode.seg import (
    PER_FRAME_FUNCTIONAL_GROUPS,
    Algorithm,
    encode_segmentation,
    label_values,
    warm_up,
    write_segmentation,
)
from dicom_node.phantom import PHANTOM_LABELS, PhantomSpec, write_phantom_series
from inference.models.threshold import ThresholdModel
from inference.volume import load_series_volume
from tests.conftest import dciodvfy, require_extra

SPEC = PhantomSpec(rows=96, columns=96, slices=20, pixel_spacing=(3.5, 3.5), slice_spacing=5.0)
TS_ALGORITHM = Algorithm(
    "TotalSegmentator total_fast",
    "2.18.0",
    is_baseline=False,
    parameters=(("device", "cpu"), ("backend", "openvino"), ("precision", "bf16")),
)


def sources_in_volume_order(files: list[Path], volume) -> list[pydicom.Dataset]:
    by_uid = {}
    for path in files:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        by_uid[dataset.SOPInstanceUID] = dataset
    return [by_uid[s.sop_instance_uid] for s in volume.slices]


def decoded_label_map(path: Path, volume, segment_classes: dict[int, int]) -> np.ndarray:
    segmentation = hd.seg.segread(path)
    numbers = segmentation.get_pixels_by_source_instance(
        [s.sop_instance_uid for s in volume.slices], combine_segments=True, relabel=False
    )
    labels = np.zeros(numbers.shape, dtype=np.uint8)
    for number, label in segment_classes.items():
        labels[numbers == number] = label
    return labels


@pytest.fixture
def phantom_with_kidneys(tmp_path):
    """A phantom CT and a label map in TotalSegmentator numbering (kidneys, liver, spleen, aorta)."""
    class_map = require_extra("totalsegmentator.map_to_binary").class_map

    series = write_phantom_series(tmp_path / "ct", SPEC)
    volume = load_series_volume(series.files)
    numbers = {name: number for number, name in class_map["total"].items()}
    labels = np.zeros(series.labels.shape, dtype=np.uint8)
    for name in ("kidney_left", "kidney_right", "liver", "spleen", "aorta"):
        labels[series.labels == PHANTOM_LABELS[name]] = numbers[name]
    return series, volume, labels, dict(class_map["total"])


@pytest.mark.parametrize("kind", ["BINARY", "LABELMAP"])
def test_seg_decodes_to_the_encoded_label_map_on_the_real_ct(shared_fixtures, tmp_path, kind):
    files = sorted((shared_fixtures / "example_ct_dicom_valid").glob("*.dcm"))
    volume = load_series_volume(files)
    result = ThresholdModel().segment(volume)
    algorithm = Algorithm(ThresholdModel.algorithm_name, ThresholdModel.algorithm_version, is_baseline=True)

    encoded = encode_segmentation(
        sources_in_volume_order(files, volume), result.labels, result.classes, algorithm, segmentation_type=kind
    )
    path = tmp_path / "seg.dcm"
    write_segmentation(encoded.dataset, path)

    np.testing.assert_array_equal(decoded_label_map(path, volume, encoded.segment_classes), result.labels)
    written = pydicom.dcmread(path)
    assert written.FrameOfReferenceUID == volume.frame_of_reference_uid
    assert written.StudyInstanceUID == volume.study_instance_uid
    assert "baseline" in written.SeriesDescription
    expected_class = "1.2.840.10008.5.1.4.1.1.66.4" if kind == "BINARY" else "1.2.840.10008.5.1.4.1.1.66.7"
    assert written.SOPClassUID == expected_class


def test_binary_seg_passes_dciodvfy(phantom_with_kidneys, tmp_path):
    series, volume, labels, classes = phantom_with_kidneys
    encoded = encode_segmentation(
        sources_in_volume_order(series.files, volume), labels, classes, TS_ALGORITHM, segmentation_type="BINARY"
    )
    path = tmp_path / "seg.dcm"
    write_segmentation(encoded.dataset, path)

    errors, _warnings = dciodvfy(path)

    assert errors == []


def test_every_segment_names_the_device_backend_and_precision_that_made_it(phantom_with_kidneys):
    series, volume, labels, classes = phantom_with_kidneys
    encoded = encode_segmentation(
        sources_in_volume_order(series.files, volume), labels, classes, TS_ALGORITHM, segmentation_type="BINARY"
    )
    identifications = [item.SegmentationAlgorithmIdentificationSequence[0] for item in encoded.dataset.SegmentSequence]
    assert {i.AlgorithmParameters for i in identifications} == {"device=cpu,backend=openvino,precision=bf16"}
    assert {i.AlgorithmVersion for i in identifications} == {"2.18.0"}


def test_the_results_name_the_package_whose_class_map_names_the_labels():
    """Structure names and codes come from the installed totalsegmentator package, not the weights: say which."""
    from types import SimpleNamespace

    from inference.models import run_parameters

    model = SimpleNamespace(
        device="cpu", backend="torch", precision="fp32", software_versions={"totalsegmentator": "2.18.0"}
    )
    assert run_parameters(model) == {  # type: ignore[arg-type]
        "device": "cpu",
        "backend": "torch",
        "precision": "fp32",
        "labels": "totalsegmentator 2.18.0",
    }
    assert "labels" not in run_parameters(SimpleNamespace(device="cpu"))  # type: ignore[arg-type]


def test_left_and_right_kidney_differ_in_codes_not_only_labels(phantom_with_kidneys):
    series, volume, labels, classes = phantom_with_kidneys

    encoded = encode_segmentation(sources_in_volume_order(series.files, volume), labels, classes, TS_ALGORITHM)

    segments = {item.SegmentLabel: item for item in encoded.dataset.SegmentSequence if item.SegmentNumber}
    left = segments["Left kidney"].SegmentedPropertyTypeCodeSequence[0]
    right = segments["Right kidney"].SegmentedPropertyTypeCodeSequence[0]
    assert left.CodeValue == right.CodeValue == "64033007"  # Kidney
    assert left.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == LEFT.value
    assert right.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == RIGHT.value
    liver = segments["Liver"]
    assert "SegmentedPropertyTypeModifierCodeSequence" not in liver.SegmentedPropertyTypeCodeSequence[0]
    assert liver.SegmentAlgorithmName == "TotalSegmentator total_fast"
    assert liver.RecommendedDisplayCIELabValue


def test_every_totalsegmentator_class_has_codes():
    class_map = require_extra("totalsegmentator.map_to_binary").class_map

    for name in class_map["total"].values():
        assert structure_codes(name).type.value


def test_empty_label_map_is_refused(phantom_with_kidneys):
    series, volume, labels, classes = phantom_with_kidneys
    with pytest.raises(ValueError, match="no structure"):
        encode_segmentation(sources_in_volume_order(series.files, volume), np.zeros_like(labels), classes, TS_ALGORITHM)


def pydicom_bytes(dataset: pydicom.Dataset) -> bytes:
    """What ``save_as`` writes, from a copy: writing can parse or correct elements in place."""
    buffer = BytesIO()
    copy.deepcopy(dataset).save_as(buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(("kind", "compress"), [("BINARY", False), ("LABELMAP", False), ("LABELMAP", True)])
def test_write_segmentation_writes_pydicoms_bytes(phantom_with_kidneys, tmp_path, kind, compress):
    series, volume, labels, classes = phantom_with_kidneys
    encoded = encode_segmentation(
        sources_in_volume_order(series.files, volume),
        labels,
        classes,
        TS_ALGORITHM,
        segmentation_type=kind,
        compress=compress,
    )
    path = tmp_path / "seg.dcm"
    expected = pydicom_bytes(encoded.dataset)

    assert save_preencoded(encoded.dataset, path, PER_FRAME_FUNCTIONAL_GROUPS)  # the fast path, not the fallback

    assert path.read_bytes() == expected
    assert isinstance(encoded.dataset.PerFrameFunctionalGroupsSequence, pydicom.Sequence)  # the dataset is put back
    assert encoded.dataset.original_encoding == (None, None)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID.is_compressed == compress


def test_write_segmentation_falls_back_to_save_as_for_implicit_vr(phantom_with_kidneys):
    series, volume, labels, classes = phantom_with_kidneys
    encoded = encode_segmentation(
        sources_in_volume_order(series.files, volume), labels, classes, TS_ALGORITHM, segmentation_type="BINARY"
    )
    encoded.dataset.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    expected, buffer = pydicom_bytes(encoded.dataset), BytesIO()

    assert not save_preencoded(encoded.dataset, buffer, PER_FRAME_FUNCTIONAL_GROUPS)

    assert buffer.getvalue() == expected


def test_label_values_are_numpys_unique_values():
    rng = np.random.default_rng(3)
    for dtype in (np.uint8, np.uint16, np.int16):
        labels = rng.choice(np.array([0, 2, 7, 200], dtype=dtype), size=(5, 6, 7))
        np.testing.assert_array_equal(label_values(labels), np.unique(labels))


def test_identity_relabelling_leaves_the_label_map_untouched(phantom_with_kidneys, tmp_path):
    series, volume, labels, classes = phantom_with_kidneys
    identity = np.zeros_like(labels)
    for number, value in enumerate(np.unique(labels)[1:], start=1):
        identity[labels == value] = number
    before = identity.copy()

    encoded = encode_segmentation(
        sources_in_volume_order(series.files, volume), identity, classes, TS_ALGORITHM, segmentation_type="BINARY"
    )
    path = tmp_path / "seg.dcm"
    write_segmentation(encoded.dataset, path)

    assert encoded.segment_classes == {number: number for number in range(1, 6)}
    np.testing.assert_array_equal(identity, before)
    np.testing.assert_array_equal(decoded_label_map(path, volume, encoded.segment_classes), identity)


def test_warm_up_encodes_a_dummy_seg():
    assert warm_up() > 0


def small_file_dataset(items: list[pydicom.Dataset]) -> pydicom.Dataset:
    dataset = pydicom.Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID = SegmentationStorage
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID = hd.UID()
    dataset.PixelRepresentation = 0
    dataset.PerFrameFunctionalGroupsSequence = items
    return dataset


def read_item(item: pydicom.Dataset, syntax: str) -> pydicom.Dataset:
    """``item`` written in a file of transfer syntax ``syntax`` and read back: its elements are raw."""
    written = small_file_dataset([item])
    written.file_meta.TransferSyntaxUID = syntax
    return pydicom.dcmread(BytesIO(pydicom_bytes(written)), force=True).PerFrameFunctionalGroupsSequence[0]


def test_save_preencoded_matches_pydicom_on_shared_undefined_length_charset_and_raw_items(tmp_path):
    shared = pydicom.Dataset()
    shared.PlanePositionSequence = [pydicom.Dataset()]
    shared.PlanePositionSequence[0].ImagePositionPatient = [0.0, 1.5, -3.25]
    delimited = pydicom.Dataset()
    delimited.is_undefined_length_sequence_item = True
    delimited.ContentLabel = "DELIMITED"
    undefined = pydicom.Dataset()
    undefined.DerivationImageSequence = [delimited]
    undefined["DerivationImageSequence"].is_undefined_length = True
    shared.add_new(0x00200000, "UL", 8)  # a retired group length, not written
    utf8 = pydicom.Dataset()
    utf8.SpecificCharacterSet = "ISO_IR 192"
    utf8.ContentDescription = "Gefäße  "  # kept as is when raw, stripped when parsed
    read_back = [read_item(utf8, syntax) for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)]  # raw
    dataset = small_file_dataset([shared, undefined, shared, utf8, *read_back])
    path, expected = tmp_path / "small.dcm", pydicom_bytes(dataset)

    assert save_preencoded(dataset, path, PER_FRAME_FUNCTIONAL_GROUPS)

    assert path.read_bytes() == expected


def test_save_preencoded_falls_back_on_an_ambiguous_vr_in_the_sequence():
    item = pydicom.Dataset()
    item.LUTDescriptor = [1, 0, 16]  # US or SS, resolved by pydicom from an ancestor
    dataset = small_file_dataset([item])
    expected, buffer = pydicom_bytes(dataset), BytesIO()

    assert not save_preencoded(dataset, buffer, PER_FRAME_FUNCTIONAL_GROUPS)

    assert buffer.getvalue() == expected


@pytest.mark.parametrize("legacy", [False, True], ids=["enhanced-ct", "legacy-converted-enhanced-ct"])
def test_seg_of_a_multiframe_source_references_each_source_frame(tmp_path, legacy):
    spec = PhantomSpec(
        rows=64,
        columns=64,
        slices=12,
        pixel_spacing=(5.0, 5.0),
        slice_spacing=10.0,
        enhanced=True,
        legacy_converted=legacy,
        slice_direction_sign=-1,
    )
    series = write_phantom_series(tmp_path / "ct", spec)
    source = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    labels = (series.labels > 0).astype(np.uint8)  # per frame, in the file's frame order
    labels[:3] = 0  # three empty frames: left out of the SEG, not misnumbered

    seg = encode_segmentation([source], labels, {1: "body"}, TS_ALGORITHM, segmentation_type="BINARY").dataset
    path = tmp_path / "seg.dcm"
    write_segmentation(seg, path)

    assert dciodvfy(path)[0] == []
    referenced = [
        int(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
        for item in seg.PerFrameFunctionalGroupsSequence
    ]
    assert referenced == list(range(4, 13))
    decoded = hd.seg.segread(path).get_pixels_by_source_frame(
        source.SOPInstanceUID, source_frame_numbers=list(range(1, 13)), combine_segments=True
    )
    np.testing.assert_array_equal(decoded, labels)


def test_label_map_that_does_not_match_the_source_frames_is_refused_with_counts(tmp_path):
    spec = PhantomSpec(rows=32, columns=32, slices=6, pixel_spacing=(8.0, 8.0), slice_spacing=10.0, enhanced=True)
    source = pydicom.dcmread(write_phantom_series(tmp_path, spec).files[0], stop_before_pixels=True)

    with pytest.raises(ValueError) as refused:
        encode_segmentation([source], np.ones((5, 32, 32), dtype=np.uint8), {1: "body"}, TS_ALGORITHM)

    assert str(refused.value) == "the label map's 5 slices of 32 x 32 pixels do not match the 6 source image frames"


def test_segment_labels_are_words_with_laterality_first_and_tracking_ids_keep_the_class_name(phantom_with_kidneys):
    series, volume, labels, classes = phantom_with_kidneys

    encoded = encode_segmentation(sources_in_volume_order(series.files, volume), labels, classes, TS_ALGORITHM)

    by_tracking = {item.TrackingID: item.SegmentLabel for item in encoded.dataset.SegmentSequence}
    assert by_tracking["kidney_left"] == "Left kidney" and by_tracking["liver"] == "Liver"
    assert display_label("adrenal_gland_right") == "Right adrenal gland"
    assert display_label("rib_left_3") == "Left rib 3" and display_label("vertebrae_L1") == "Vertebrae L1"
    assert display_label("lung_upper_lobe_left") == "Left lung upper lobe"


def test_labelmap_seg_has_no_background_segment_and_still_decodes(phantom_with_kidneys):
    series, volume, labels, classes = phantom_with_kidneys
    sources = sources_in_volume_order(series.files, volume)

    encoded = encode_segmentation(sources, labels, classes, TS_ALGORITHM, segmentation_type="LABELMAP")

    numbers = [int(item.SegmentNumber) for item in encoded.dataset.SegmentSequence]
    assert numbers == list(range(1, len(numbers) + 1))  # monotonically increasing from one
    assert encoded.dataset.PixelPaddingValue == 0  # background
    buffer = BytesIO()
    write_segmentation(encoded.dataset, buffer)
    decoded = hd.seg.segread(BytesIO(buffer.getvalue()))
    assert decoded.segmentation_type.value == "LABELMAP"
    assert sorted(decoded.segment_numbers) == numbers


def test_a_long_description_drops_whole_words_of_the_model_name_never_part_of_one():
    from dicom_node.encode.seg import Algorithm

    trained = Algorithm("TotalSegmentator total_fast (3 mm, 117 structures)", "w", is_baseline=False)
    baseline = Algorithm("dicom-node threshold", "w", is_baseline=True)

    assert (
        trained.series_description("Segmentation", 2, partial=True, source_series="1001")
        == "Segmentation TotalSegmentator of series 1001 PARTIAL (re-run 2)"
    )
    assert (
        baseline.series_description("Label map measurements", 2, partial=True, source_series="1001")
        == "Label map measurements of series 1001 PARTIAL (re-run 2)"
    )
    for what in ("Segmentation", "Label map segmentation", "Measurements", "Structures"):
        for model in (trained, baseline):
            text = model.series_description(what, 3, partial=True, source_series="123456789012")
            assert len(text) <= 64 and text.startswith(what) and text.endswith("PARTIAL (re-run 3)"), text
            whole_words = f"{what} {model.name} (baseline) of series 123456789012 PARTIAL (re-run 3)".split()
            assert set(text.split()) <= set(whole_words), text


def test_a_structure_has_one_tracking_uid_in_every_seg_and_sr_of_a_run(tmp_path):
    """The BINARY and LABELMAP SEGs and the SRs on them are one run's findings: each structure is tracked as one."""
    from db.results import ResultKind
    from dicom_node.encode.measurements import measure
    from dicom_node.encode.results import encode_results

    series = write_phantom_series(tmp_path / "ct", SPEC)
    volume = load_series_volume(series.files)
    model = ThresholdModel()
    segmentation = model.segment(volume)
    measurements = measure(volume, segmentation.labels, segmentation.classes)
    (tmp_path / "results").mkdir()
    files = encode_results(
        volume, segmentation, measurements, model, tmp_path / "results", ["BINARY", "LABELMAP"], rtstruct=False
    )

    uids: dict[str, set[str]] = {}
    for file in files:
        if file.kind is ResultKind.SEG:
            items = [(s.TrackingID, s.TrackingUID) for s in pydicom.dcmread(file.path).SegmentSequence]
        else:
            groups = hd.sr.srread(file.path).content.get_volumetric_roi_measurement_groups()
            items = [(group.tracking_identifier, group.tracking_uid) for group in groups]
        for name, uid in items:
            uids.setdefault(name, set()).add(str(uid))
    assert len(files) == 4 and set(uids) == {m.name for m in measurements}
    assert all(len(found) == 1 for found in uids.values()), uids
    assert len({uid for found in uids.values() for uid in found}) == len(uids)  # and each structure its own
