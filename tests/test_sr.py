"""TID 1500 measurement report: validates, references the SEG's segments, carries the measured values."""

from __future__ import annotations

import multiprocessing
import re
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from db.jobs import job_for_series_uid
from db.models import JobState
from dicom_node.encode.measurements import measure
from dicom_node.encode.seg import Algorithm, encode_segmentation
from dicom_node.encode.sr import (
    CUT_BY_SCAN_EDGE,
    DEVICE_UID_FILE,
    encode_measurement_report,
    holds_3d_coordinates,
    node_device_uid,
)
from dicom_node.phantom import PhantomSpec, write_phantom_series
from inference.models.threshold import ThresholdModel
from inference.volume import load_series_volume
from tests.conftest import CT_RULES, dciodvfy, free_port, require_tool, storescu, wait_for

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
ARCHIVE_WITHOUT_3D_SR = f"""\
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = LittleEndianImplicit

[[PresentationContexts]]
[SegAndComprehensiveSR]
PresentationContext1 = VerificationSOPClass\\Uncompressed
PresentationContext2 = {SEGMENTATION}\\Uncompressed
PresentationContext3 = {COMPREHENSIVE_SR}\\Uncompressed

[[Profiles]]
[OldArchive]
PresentationContexts = SegAndComprehensiveSR
"""
"""storescp's association configuration of an archive that predates Comprehensive 3D SR: SEG and Comprehensive SR."""


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


VALID_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
"""A DICOM UID: digits and dots, no component with a leading zero (and 64 characters at most)."""


def _device_uids(dataset: pydicom.Dataset) -> list[str]:
    return [str(item.UID) for item in _content_items(dataset) if _concept(item) == "121012"]  # Device Observer UID


def test_the_device_observer_uid_is_made_once_per_node_storage_and_kept(tmp_path):
    """Restarting (or a second container on the same storage) reads the UID made first; other storage, another."""
    first = node_device_uid(tmp_path / "a")
    assert node_device_uid(tmp_path / "a") == first
    assert node_device_uid(tmp_path / "b") != first  # another node on the same host
    assert (tmp_path / "a" / DEVICE_UID_FILE).read_text() == f"{first}\n"
    assert len(first) <= 64 and VALID_UID.fullmatch(first)

    series = write_phantom_series(tmp_path / "ct", PhantomSpec(rows=32, columns=32, slices=4))
    volume = load_series_volume(series.files)
    result = ThresholdModel().segment(volume)
    headers = {d.SOPInstanceUID: d for d in (pydicom.dcmread(f, stop_before_pixels=True) for f in series.files)}
    sources = [headers[s.sop_instance_uid] for s in volume.slices]
    algorithm = Algorithm(ThresholdModel.algorithm_name, ThresholdModel.algorithm_version, is_baseline=True)
    seg = encode_segmentation(sources, result.labels, result.classes, algorithm, segmentation_type="BINARY")
    measurements = measure(volume, result.labels, result.classes)
    sr = encode_measurement_report(seg, sources, measurements, algorithm, device_uid=first)
    assert _device_uids(sr) == [first]


def _device_uid_after(barrier, storage: Path, uids) -> None:
    barrier.wait()
    uids.put(node_device_uid(storage))


def test_processes_of_one_node_starting_at_once_name_one_device(tmp_path):
    """Workers sharing the storage folder, all writing their first SR at once: one UID, the file whole."""
    context = multiprocessing.get_context("fork")
    barrier, uids = context.Barrier(6), context.Queue()
    processes = [context.Process(target=_device_uid_after, args=(barrier, tmp_path, uids)) for _ in range(6)]
    for process in processes:
        process.start()
    got = {uids.get(timeout=60) for _ in processes}
    for process in processes:
        process.join(timeout=60)
    assert got == {node_device_uid(tmp_path)}
    assert [path.name for path in tmp_path.iterdir()] == [DEVICE_UID_FILE]  # no temporary file left


def test_a_device_uid_file_that_holds_no_uid_is_refused_with_what_to_do(tmp_path):
    (tmp_path / DEVICE_UID_FILE).write_text("node-7f3a\n")
    with pytest.raises(ValueError, match=r"device-observer-uid does not hold a DICOM UID \(it reads 'node-7f3a'\)"):
        node_device_uid(tmp_path)


def test_a_device_uid_that_cannot_be_kept_is_refused_with_a_sentence_naming_the_file(tmp_path):
    """Storage that cannot be written (here a file where the folder should be) failed the job with the generic
    "unexpected error in stage encode"; the job's reason now names the file and what the node needs."""
    storage = tmp_path / "storage"
    storage.write_text("not a folder")
    with pytest.raises(
        ValueError, match=r"^this node's Device Observer UID cannot be kept in .*device-observer-uid \("
    ):
        node_device_uid(storage)


@pytest.mark.integration
def test_a_node_names_one_device_in_its_srs_across_a_restart_and_another_node_another(tmp_path, start_node):
    """Real nodes: the SR names the UID kept in the node's storage, the same after a restart; a second node on
    this host (its own storage) names another."""
    spec = PhantomSpec(rows=32, columns=32, slices=8)

    def segmented(node, name: str) -> str:
        series = write_phantom_series(tmp_path / name, spec)
        assert storescu(node.port, series.files).returncode == 0
        node.wait_for_state(series.series_instance_uid, JobState.DONE, timeout=120)
        with node.sessions() as session:
            files = job_for_series_uid(session, series.series_instance_uid).result_files
        (uid,) = {uid for f in files if Path(f).name.startswith("sr-") for uid in _device_uids(pydicom.dcmread(f))}
        return uid

    first = start_node(rules=CT_RULES, inference={"workers": 1})
    before = segmented(first, "a")
    first.stop()
    first.start()
    after = segmented(first, "b")
    other = segmented(start_node(rules=CT_RULES, inference={"workers": 1}), "c")

    assert before == after
    assert other != before
    assert before == (first.storage / DEVICE_UID_FILE).read_text().strip()


def test_the_sr_is_comprehensive_sr_and_names_a_predecessor_by_its_own_sop_class(report, shared_fixtures):
    """No 3D coordinates in the report: Comprehensive SR, which archives older than Comprehensive 3D SR accept.
    A predecessor written before (as Comprehensive 3D SR) keeps its own SOP class in the Predecessor Documents."""
    path, seg, measurements = report
    assert pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID == COMPREHENSIVE_SR
    files = sorted((shared_fixtures / "example_ct_dicom_valid").glob("*.dcm"))
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    earlier = pydicom.Dataset()
    earlier.SOPClassUID, earlier.SOPInstanceUID = COMPREHENSIVE_3D_SR, "1.2.826.0.1.3680043.8.498.1"
    earlier.StudyInstanceUID, earlier.SeriesInstanceUID = seg.dataset.StudyInstanceUID, "1.2.826.0.1.3680043.8.498.2"
    algorithm = Algorithm(ThresholdModel.algorithm_name, ThresholdModel.algorithm_version, is_baseline=True)

    sr = encode_measurement_report(seg, sources, measurements, algorithm, previous_versions=[earlier])

    assert sr.SOPClassUID == COMPREHENSIVE_SR
    (predecessor,) = sr.PredecessorDocumentsSequence
    (referenced,) = predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert (referenced.ReferencedSOPClassUID, referenced.ReferencedSOPInstanceUID) == (
        COMPREHENSIVE_3D_SR,
        earlier.SOPInstanceUID,
    )


def test_3d_spatial_coordinates_anywhere_in_the_content_are_found():
    """Comprehensive SR cannot carry SCOORD3D: content that holds it (at any depth) must stay Comprehensive 3D SR."""
    point = hd.sr.Scoord3DContentItem(
        name=codes.DCM.ImageRegion,
        graphic_type=hd.sr.GraphicTypeValues3D.POINT,
        graphic_data=np.array([[1.0, 2.0, 3.0]]),
        frame_of_reference_uid="1.2.826.0.1.3680043.8.498.3",
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    inner = hd.sr.ContainerContentItem(
        name=codes.DCM.MeasurementGroup, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    inner.ContentSequence = [point]
    root = hd.sr.ContainerContentItem(name=codes.DCM.ImagingMeasurementReport)
    root.ContentSequence = [inner]

    assert holds_3d_coordinates(root)
    inner.ContentSequence = []
    assert not holds_3d_coordinates(root)


@pytest.mark.integration
def test_an_archive_without_comprehensive_3d_sr_gets_the_sr_and_its_re_run(tmp_path, start_node):
    """A real node sends to a storescp that accepts only SEG and Comprehensive SR (as many older archives): the job
    is DONE with the SEG and SR there; a re-run's SR arrives too and names the first SR as its predecessor."""
    config = tmp_path / "archive.cfg"
    config.write_text(ARCHIVE_WITHOUT_3D_SR)
    received, port = tmp_path / "archive", free_port()
    received.mkdir()
    command = [require_tool("storescp"), "-v", "-aet", "OLDPACS", "-xf", str(config), "OldArchive"]
    with open(tmp_path / "archive.log", "wb") as log:
        archive = subprocess.Popen([*command, "+uf", "-od", str(received), str(port)], stdout=log, stderr=log)
    try:
        node = start_node(
            destinations={"pacs": {"ae_title": "OLDPACS", "host": "127.0.0.1", "port": port, "send": ["seg", "sr"]}},
            rules=[{**CT_RULES[0], "destinations": ["pacs"]}],
            inference={"workers": 1},
        )
        series = write_phantom_series(tmp_path / "ct", PhantomSpec(rows=32, columns=32, slices=8))
        assert storescu(node.port, series.files).returncode == 0

        def finished(count: int) -> bool:
            state = node.job_state(series.series_instance_uid)
            return state is JobState.FAILED or (state is JobState.DONE and len(list(received.iterdir())) == count)

        wait_for(lambda: finished(2), timeout=180, what="the job to finish")
        assert node.job_state(series.series_instance_uid) is JobState.DONE, node.job_reason(series.series_instance_uid)
        first = {str(d.SOPClassUID): d for d in (pydicom.dcmread(p) for p in received.iterdir())}
        assert set(first) == {SEGMENTATION, COMPREHENSIVE_SR}

        assert node.cli("retry", "--run-again", series.series_instance_uid).returncode == 0
        wait_for(lambda: finished(4), timeout=180, what="the re-run to finish")
        assert node.job_state(series.series_instance_uid) is JobState.DONE, node.job_reason(series.series_instance_uid)
    finally:
        archive.terminate()
        archive.wait(timeout=10)
    reports = [d for d in (pydicom.dcmread(p) for p in received.iterdir()) if d.SOPClassUID == COMPREHENSIVE_SR]
    (second,) = [d for d in reports if d.SOPInstanceUID != first[COMPREHENSIVE_SR].SOPInstanceUID]
    predecessor = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPClassUID == COMPREHENSIVE_SR
    assert predecessor.ReferencedSOPInstanceUID == first[COMPREHENSIVE_SR].SOPInstanceUID
