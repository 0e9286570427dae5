"""TID 1500 measurement report: validates, references the SEG's segments, carries the measured values."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_node.encode.measurements import measure
from dicom_node.encode.seg import Algorithm, encode_segmentation
from dicom_node.encode.sr import CUT_BY_SCAN_EDGE, encode_measurement_report
from inference.models.threshold import ThresholdModel
from inference.volume import load_series_volume
from tests.conftest import dciodvfy


@pytest.fixture(scope="module")
def report(shared_fixtures, tmp_path_factory):
    files = sorted((shared_fixtures / "example_ct_dicom_valid").glob("*.dcm"))
    volume = load_series_volume(files)
    result = ThresholdModel().segment(volume)
    headers = {d.SOPInstanceUID: d for d in (pydicom.dcmread(f, stop_before_pixels=True) for f in files)}
    sources = [headers[s.sop_instance_uid] for s in volume.slices]
    algorithm = Algorithm(ThresholdModel.algorithm_name, ThresholdModel.algorithm_version, is_baseline=True)
    seg = encode_segmentation(sources, result.labels, result.classes, algorithm, segmentation_type="BINARY")
    measurements = measure(volume, result.labels, result.classes)
    sr = encode_measurement_report(seg, sources, measurements, algorithm)
    path = tmp_path_factory.mktemp("sr") / "sr.dcm"
    sr.save_as(path)
    return path, seg, measurements


def test_sr_passes_dciodvfy(report):
    path, _seg, _measurements = report
    errors, _warnings = dciodvfy(path)
    assert errors == []


def test_sr_volumes_equal_the_label_map_and_reference_the_segments(report):
    path, seg, measurements = report
    sr = hd.sr.srread(path)
    groups = sr.content.get_volumetric_roi_measurement_groups()
    by_name = {m.name: m for m in measurements}

    assert len(groups) == len(measurements) >= 2  # body and skeleton: these 20 slices are below the lungs
    for group in groups:
        measured = by_name[group.tracking_identifier]
        volume = next(m for m in group.get_measurements() if m.name.value == "118565006")
        assert volume.value == pytest.approx(measured.volume_ml, abs=1e-3)
        assert volume.unit.value == "ml"
        means = [m for m in group.get_measurements() if m.name.value == "112031"]
        assert {round(float(m.value), 2) for m in means} == {round(measured.mean_hu, 2), round(measured.sd_hu, 2)}
        referenced = group.referenced_segment
        assert referenced.referenced_sop_instance_uid == seg.dataset.SOPInstanceUID
        label = seg.segment_classes[referenced.referenced_segment_numbers[0]]
        assert measured.label == label


def test_sr_names_the_precision_of_the_inference_and_passes_dciodvfy(shared_fixtures, tmp_path):
    files = sorted((shared_fixtures / "example_ct_dicom_valid").glob("*.dcm"))
    volume = load_series_volume(files)
    result = ThresholdModel().segment(volume)
    headers = {d.SOPInstanceUID: d for d in (pydicom.dcmread(f, stop_before_pixels=True) for f in files)}
    sources = [headers[s.sop_instance_uid] for s in volume.slices]
    algorithm = Algorithm(
        "TotalSegmentator total_fast", "Dataset297 sha256:0123", is_baseline=False, parameters=(("precision", "bf16"),)
    )
    seg = encode_segmentation(sources, result.labels, result.classes, algorithm, segmentation_type="BINARY")
    sr = encode_measurement_report(seg, sources, measure(volume, result.labels, result.classes), algorithm)
    path = tmp_path / "sr.dcm"
    sr.save_as(path)

    errors, _warnings = dciodvfy(path)
    assert errors == []
    texts = [item.TextValue for item in _content_items(sr) if _concept(item) == "111002"]
    assert texts and set(texts) == {"precision=bf16"}  # Algorithm Parameters (TID 4019), with each measurement


def _content_items(dataset):
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from _content_items(item)


def _concept(item) -> str | None:
    names = item.get("ConceptNameCodeSequence")
    return str(names[0].CodeValue) if names else None


def test_cut_structures_are_marked(report):
    path, _seg, measurements = report
    assert any(m.cut_by_scan_edge for m in measurements)  # 20 slices: the body runs off both ends
    dataset = pydicom.dcmread(path)
    text = str(dataset)
    assert CUT_BY_SCAN_EDGE.meaning in text
    assert np.isclose(
        sum(m.volume_ml for m in measurements), sum(m.voxels for m in measurements) * 0.9765625**2 * 2 / 1000
    )


@pytest.mark.parametrize(
    ("name", "site", "side"),
    [("kidney_cyst_left", "Kidney", "Left"), ("kidney_cyst_right", "Kidney", "Right"), ("liver", "Liver", None)],
)
def test_the_finding_site_of_a_kidney_cyst_is_its_kidney_and_side(name, site, side):
    """A cyst's type ("Cyst") is no place: its site is the region the SEG names, so the two sides differ."""
    from dicom_node.encode.sr import finding_site

    found = finding_site(name)
    assert found.value.meaning == site
    lateralities = [item.ConceptCodeSequence[0].CodeMeaning for item in found.ContentSequence] if side else []
    assert lateralities == ([side] if side else [])


def test_a_structure_of_a_few_thin_slice_voxels_is_never_0_ml_in_the_sr(tmp_path):
    """0.5 mm voxels: 3 voxels are 0.000375 ml, present in the SEG; a thousandth of a ml would state 0 ml."""
    from dicom_node.phantom import PhantomSpec, write_phantom_series

    spec = PhantomSpec(rows=64, columns=64, slices=12, pixel_spacing=(0.5, 0.5), slice_spacing=0.5)
    series = write_phantom_series(tmp_path, spec)
    volume = load_series_volume(series.files)
    labels = np.zeros(volume.hu.shape, dtype=np.uint8)
    labels[4:8, 20:30, 20:30] = 1  # 400 voxels: 0.05 ml
    labels[6, 40, 40:43] = 2  # 3 voxels
    classes = {1: "liver", 2: "pancreas"}
    headers = {d.SOPInstanceUID: d for d in (pydicom.dcmread(f, stop_before_pixels=True) for f in series.files)}
    sources = [headers[s.sop_instance_uid] for s in volume.slices]
    algorithm = Algorithm(ThresholdModel.algorithm_name, ThresholdModel.algorithm_version, is_baseline=True)
    seg = encode_segmentation(sources, labels, classes, algorithm, segmentation_type="BINARY")
    sr = encode_measurement_report(seg, sources, measure(volume, labels, classes), algorithm)
    sr.save_as(tmp_path / "sr.dcm")

    stated = {
        group.tracking_identifier: float(next(m for m in group.get_measurements() if m.name.value == "118565006").value)
        for group in hd.sr.srread(tmp_path / "sr.dcm").content.get_volumetric_roi_measurement_groups()
    }
    assert stated == {"liver": pytest.approx(0.05, rel=1e-9), "pancreas": pytest.approx(0.000375, rel=1e-9)}
