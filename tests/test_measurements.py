"""Per-structure measurements against TotalSegmentator's own statistics and a phantom."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.ndimage import binary_dilation

from dicom_node.encode.measurements import EDGE_MARGIN_VOXELS, measure
from dicom_node.phantom import PHANTOM_HU, PHANTOM_LABELS, PhantomSpec, write_phantom_series
from inference.volume import load_series_volume, volume_from_nifti
from tests.conftest import require_extra


def test_volumes_and_mean_hu_equal_totalsegmentators_statistics(shared_fixtures):
    nib = require_extra("nibabel")
    class_map = require_extra("totalsegmentator.map_to_binary").class_map
    volume = volume_from_nifti(shared_fixtures / "example_ct_sm.nii.gz")
    labels = np.asanyarray(nib.load(str(shared_fixtures / "example_seg_fast.nii.gz")).dataobj)
    reference = json.loads((shared_fixtures / "example_seg_fast" / "statistics.json").read_text())

    ours = {m.name: m for m in measure(volume, labels.astype(np.uint8).transpose(2, 1, 0), class_map["total"])}

    compared = 0
    for name, expected in reference.items():
        if expected["volume"] == 0:
            assert name not in ours
            continue
        assert ours[name].volume_ml * 1000 == pytest.approx(expected["volume"], abs=0.5)
        assert ours[name].mean_hu == pytest.approx(expected["intensity"], abs=0.01)
        compared += 1
    assert compared >= 20


def test_phantom_organs_measure_their_hu_and_cut_structures_are_flagged(tmp_path):
    spec = PhantomSpec(rows=64, columns=64, slices=30, pixel_spacing=(6.0, 6.0), slice_spacing=5.0, noise_sd=10.0)
    series = write_phantom_series(tmp_path, spec)
    volume = load_series_volume(series.files)
    classes = {value: name for name, value in PHANTOM_LABELS.items()}

    results = {m.name: m for m in measure(volume, series.labels, classes)}

    liver = results["liver"]
    assert liver.mean_hu == pytest.approx(PHANTOM_HU["liver"], abs=2)
    assert liver.sd_hu == pytest.approx(10, abs=2)
    assert liver.volume_ml == pytest.approx(liver.voxels * 6 * 6 * 5 / 1000)
    assert results["body"].cut_by_scan_edge  # the body runs through the whole scan
    assert not liver.cut_by_scan_edge


def test_a_structure_at_the_side_of_the_image_or_on_padding_is_flagged_cut_and_padding_stays_out_of_its_hu(tmp_path):
    """An arm running off the side of the field is as partial as an organ cut by the first slice; voxels of the
    padding outside the reconstructed field (-3024 HU) are no tissue and never lower a mean."""
    spec = PhantomSpec(rows=64, columns=64, slices=30, pixel_spacing=(6.0, 6.0), slice_spacing=5.0, noise_sd=0.0)
    series = write_phantom_series(tmp_path, spec)
    volume = load_series_volume(series.files)
    classes = {value: name for name, value in PHANTOM_LABELS.items()}
    liver = PHANTOM_LABELS["liver"]
    labels = series.labels.copy()
    whole = {m.name: m for m in measure(volume, labels, classes)}["liver"]

    beside = labels.copy()
    beside[10:12, 30, 0] = liver  # the side of the image
    padded = labels.copy()
    k, j, i = (int(v[0]) for v in np.nonzero(labels == liver))
    volume.hu[k, j, i] = -3024.0  # one liver voxel lies on padding
    side = {m.name: m for m in measure(volume, beside, classes)}["liver"]
    on_padding = {m.name: m for m in measure(volume, padded, classes)}["liver"]

    assert not whole.cut_by_scan_edge
    assert side.cut_by_scan_edge and on_padding.cut_by_scan_edge
    assert on_padding.voxels == whole.voxels and on_padding.mean_hu == pytest.approx(PHANTOM_HU["liver"], abs=0.01)


def test_a_structure_lying_wholly_on_padding_has_no_attenuation_reported_not_0_hu(tmp_path):
    """No voxel inside the reconstructed field: its volume is known, its HU are not; the SR states no Mean."""
    import pydicom

    from dicom_node.encode.seg import Algorithm, encode_segmentation
    from dicom_node.encode.sr import encode_measurement_report
    from inference.models.threshold import ThresholdModel

    spec = PhantomSpec(rows=64, columns=64, slices=30, pixel_spacing=(6.0, 6.0), slice_spacing=5.0, noise_sd=0.0)
    series = write_phantom_series(tmp_path, spec)
    volume = load_series_volume(series.files)
    result = ThresholdModel().segment(volume)
    lung = next(label for label, name in result.classes.items() if "lung" in name)
    volume.hu[result.labels == lung] = -3024.0

    measured = measure(volume, result.labels, result.classes)
    by_label = {m.label: m for m in measured}
    assert by_label[lung].volume_ml > 0 and by_label[lung].mean_hu is None and by_label[lung].sd_hu is None
    assert all(m.mean_hu is not None for m in measured if m.label != lung)

    headers = {d.SOPInstanceUID: d for d in (pydicom.dcmread(f, stop_before_pixels=True) for f in series.files)}
    sources = [headers[s.sop_instance_uid] for s in volume.slices]
    algorithm = Algorithm(ThresholdModel.algorithm_name, ThresholdModel.algorithm_version, is_baseline=True)
    seg = encode_segmentation(sources, result.labels, result.classes, algorithm)
    sr = encode_measurement_report(seg, sources, measured, algorithm)

    def attenuations(item) -> int:
        own = sum(c.CodeValue == "112031" for c in item.get("ConceptNameCodeSequence", []))
        return own + sum(attenuations(child) for child in item.get("ContentSequence", []))

    assert attenuations(sr) == 2 * (len(measured) - 1), "mean and SD for every structure but the lung on padding"


FIELD_RADIUS = 160
"""Pixels from the image centre to the edge of the reconstructed field in the padded copies of the real CT."""
PADDING = {"signed": (1, -2000), "unsigned": (0, 63536)}
"""Two vendors' padding: signed -2000 (reads -3024 HU), and unsigned 63536 (would read 62,512 HU: read as air)."""


def _outside_circle(rows: int, columns: int) -> np.ndarray:
    j, i = np.mgrid[:rows, :columns]
    return np.hypot(j - (rows - 1) / 2, i - (columns - 1) / 2) > FIELD_RADIUS


@pytest.fixture(scope="module")
def real_ct(shared_fixtures):
    """The real CT and TotalSegmentator's label map of it, resampled onto its grid (nearest neighbour)."""
    import SimpleITK as sitk

    files = sorted((shared_fixtures / "example_ct_dicom_valid").glob("*.dcm"))
    volume = load_series_volume(files)
    seg = sitk.ReadImage(str(shared_fixtures / "example_seg_dicom.nii.gz"))
    resampled = sitk.Resample(seg, volume.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return files, volume, sitk.GetArrayFromImage(resampled).astype(np.uint8)


@pytest.fixture(scope="module")
def padded_ct(real_ct, tmp_path_factory):
    """The real CT with its field narrowed to a circle: outside it, padding (PixelPaddingValue) in each encoding."""
    import pydicom

    files, _volume, _labels = real_ct
    volumes = {}
    for encoding, (representation, value) in PADDING.items():
        folder = tmp_path_factory.mktemp(f"padding-{encoding}")
        for path in files:
            dataset = pydicom.dcmread(path)
            stored = dataset.pixel_array.astype(np.int64)
            stored[_outside_circle(*stored.shape)] = value
            dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 16, 15
            dataset.PixelRepresentation = representation
            dataset.PixelData = stored.astype(np.int16 if representation else np.uint16).tobytes()
            dataset.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
            dataset["PixelPaddingValue"] = pydicom.DataElement(0x00280120, "SS" if representation else "US", value)
            dataset.save_as(folder / path.name, enforce_file_format=True)
        volumes[encoding] = load_series_volume(sorted(folder.glob("*.dcm")))
    return volumes


def test_a_structure_cut_by_the_round_field_of_view_is_flagged_though_the_model_labels_no_padding(real_ct, padded_ct):
    """A model never labels padding: a rib cut by the field stops beside it, and is as partial as one cut by the
    first slice. Structures away from the field's edge and from the ends of the scan stay whole."""
    class_map = require_extra("totalsegmentator.map_to_binary").class_map
    _files, _volume, labels = real_ct
    volume = padded_ct["signed"]
    outside = _outside_circle(*labels.shape[1:])
    inner = labels.copy()
    inner[:EDGE_MARGIN_VOXELS], inner[-EDGE_MARGIN_VOXELS:] = 0, 0  # no structure cut by the ends of the scan
    cut = inner.copy()
    cut[:, outside] = 0  # as the model labels the narrowed field

    whole = {m.name: m for m in measure(volume, inner, class_map["total"])}
    measured = {m.name: m for m in measure(volume, cut, class_map["total"])}
    near_edge = binary_dilation(outside, iterations=3)  # within 3 pixels of the field's edge
    away = {class_map["total"][v] for v in set(np.unique(cut)) - set(np.unique(cut[:, near_edge])) - {0}}

    lost = {name for name, m in measured.items() if m.voxels < whole[name].voxels}
    assert "rib_left_10" in lost and measured["rib_left_10"].voxels < whole["rib_left_10"].voxels / 2
    assert all(measured[name].cut_by_scan_edge for name in lost)
    assert away and not any(measured[name].cut_by_scan_edge for name in away)


@pytest.mark.parametrize("encoding", PADDING)
def test_padding_stays_out_of_the_mean_and_marks_the_field_edge_however_it_is_encoded(real_ct, padded_ct, encoding):
    """Unsigned padding that would read as bone is read as air (-1024 HU); where it lies is still known, so a
    structure the model drew onto it keeps the mean of its voxels inside the field and is flagged cut."""
    class_map = require_extra("totalsegmentator.map_to_binary").class_map
    _files, original, labels = real_ct
    volume = padded_ct[encoding]
    outside = _outside_circle(*labels.shape[1:])
    inner = labels.copy()
    inner[:EDGE_MARGIN_VOXELS], inner[-EDGE_MARGIN_VOXELS:] = 0, 0

    measured = measure(volume, inner, class_map["total"])

    assert all(np.array_equal(volume.padding_mask(k), outside) for k in range(labels.shape[0]))
    on_padding = {int(v) for v in np.unique(inner[:, outside])} - {0}
    at_edge = {int(v) for v in np.unique(inner[:, binary_dilation(outside, np.ones((3, 3)))])} - {0}
    assert on_padding and at_edge > on_padding  # some structures reach onto the padding, some stop beside it
    for m in measured:
        assert m.cut_by_scan_edge == (m.label in at_edge)
        inside = original.hu[(inner == m.label) & ~outside[None]]
        assert m.mean_hu == (pytest.approx(float(inside.mean()), abs=1e-3) if inside.size else None)
        assert m.voxels == int(np.count_nonzero(inner == m.label))


def test_a_structure_within_three_slices_of_the_end_of_the_scan_may_be_cut_and_is_flagged(tmp_path):
    """TotalSegmentator's own rule: the last slices of a scan are segmented poorly, so a structure that reaches
    within three voxels of them may be cut. One that stops four slices before the end is whole."""
    spec = PhantomSpec(rows=64, columns=64, slices=30, pixel_spacing=(6.0, 6.0), slice_spacing=5.0, noise_sd=0.0)
    volume = load_series_volume(write_phantom_series(tmp_path, spec).files)
    labels = np.zeros(volume.hu.shape, dtype=np.uint8)
    labels[2:12, 20:30, 20:30] = 1  # its first slice is the scan's third
    labels[3:12, 35:45, 35:45] = 2  # its first slice is the scan's fourth
    labels[10:20, 30:40, 61:63] = 3  # two columns from the side of the image

    flagged = {m.name: m.cut_by_scan_edge for m in measure(volume, labels, {1: "near", 2: "away", 3: "side"})}

    assert flagged == {"near": True, "away": False, "side": True}
