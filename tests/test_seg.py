"""DICOM-SEG encoding: validates, decodes back to the same label map at the same positions, codes laterality."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_node.encode.codes import LEFT, RIGHT, structure_codes
from dicom_node.encode.seg import Algorithm, encode_segmentation
from inference.models.threshold import ThresholdModel
from inference.phantom import PHANTOM_LABELS, PhantomSpec, write_phantom_series
from inference.volume import load_series_volume
from tests.conftest import dciodvfy

SPEC = PhantomSpec(rows=96, columns=96, slices=20, pixel_spacing=(3.5, 3.5), slice_spacing=5.0)
TS_ALGORITHM = Algorithm("TotalSegmentator total_fast", "2.18.0", is_baseline=False)


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
    from totalsegmentator.map_to_binary import class_map

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

    encoded = encode_segmentation(sources_in_volume_order(files, volume), result.labels, result.classes, algorithm,
                                  segmentation_type=kind)
    path = tmp_path / "seg.dcm"
    encoded.dataset.save_as(path)

    np.testing.assert_array_equal(decoded_label_map(path, volume, encoded.segment_classes), result.labels)
    written = pydicom.dcmread(path)
    assert written.FrameOfReferenceUID == volume.frame_of_reference_uid
    assert written.StudyInstanceUID == volume.study_instance_uid
    assert "baseline" in written.SeriesDescription
    expected_class = "1.2.840.10008.5.1.4.1.1.66.4" if kind == "BINARY" else "1.2.840.10008.5.1.4.1.1.66.7"
    assert written.SOPClassUID == expected_class


def test_binary_seg_passes_dciodvfy(phantom_with_kidneys, tmp_path):
    series, volume, labels, classes = phantom_with_kidneys
    encoded = encode_segmentation(sources_in_volume_order(series.files, volume), labels, classes, TS_ALGORITHM,
                                  segmentation_type="BINARY")
    path = tmp_path / "seg.dcm"
    encoded.dataset.save_as(path)

    errors, _warnings = dciodvfy(path)

    assert errors == []


def test_left_and_right_kidney_differ_in_codes_not_only_labels(phantom_with_kidneys):
    series, volume, labels, classes = phantom_with_kidneys

    encoded = encode_segmentation(sources_in_volume_order(series.files, volume), labels, classes, TS_ALGORITHM)

    segments = {item.SegmentLabel: item for item in encoded.dataset.SegmentSequence if item.SegmentNumber}
    left = segments["kidney_left"].SegmentedPropertyTypeCodeSequence[0]
    right = segments["kidney_right"].SegmentedPropertyTypeCodeSequence[0]
    assert left.CodeValue == right.CodeValue == "64033007"  # Kidney
    assert left.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == LEFT.value
    assert right.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == RIGHT.value
    liver = segments["liver"]
    assert "SegmentedPropertyTypeModifierCodeSequence" not in liver.SegmentedPropertyTypeCodeSequence[0]
    assert liver.SegmentAlgorithmName == "TotalSegmentator total_fast"
    assert liver.RecommendedDisplayCIELabValue


def test_every_totalsegmentator_class_has_codes():
    from totalsegmentator.map_to_binary import class_map

    for name in class_map["total"].values():
        assert structure_codes(name).type.value


def test_empty_label_map_is_refused(phantom_with_kidneys):
    series, volume, labels, classes = phantom_with_kidneys
    with pytest.raises(ValueError, match="no structure"):
        encode_segmentation(sources_in_volume_order(series.files, volume), np.zeros_like(labels), classes, TS_ALGORITHM)
