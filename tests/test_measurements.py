"""Per-structure measurements against TotalSegmentator's own statistics and a phantom."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dicom_node.encode.measurements import measure
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
