"""Multi-frame CT (Enhanced CT, Legacy Converted Enhanced CT): segmented, and every result references the source frames."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from db.jobs import job_for_series_uid
from db.models import JobState
from dicom_node.admission import InstanceFile, admit
from dicom_node.config import AdmissionSettings
from dicom_node.encode.results import EncodingError, _sources_and_frames
from dicom_node.phantom import PhantomSpec, write_phantom_series
from inference.models.threshold import ThresholdModel
from inference.volume import VolumeError, load_series_volume
from tests.conftest import CT_RULES, dciodvfy, storescu, succeeded_files

MULTIFRAME = PhantomSpec(
    rows=96,
    columns=96,
    slices=30,
    pixel_spacing=(4.0, 4.0),
    slice_spacing=5.0,
    noise_sd=5.0,
    enhanced=True,
    slice_direction_sign=-1,  # frames head to feet: frame order is the reverse of slice order
)
KINDS = {"enhanced-ct": False, "legacy-converted-enhanced-ct": True}


def _frame_position(source: pydicom.Dataset, number: int) -> list[float]:
    return [
        float(v)
        for v in source.PerFrameFunctionalGroupsSequence[number - 1].PlanePositionSequence[0].ImagePositionPatient
    ]


@pytest.mark.integration
@pytest.mark.parametrize("legacy", KINDS.values(), ids=KINDS.keys())
def test_multiframe_ct_goes_done_with_valid_results_that_reference_its_frames(tmp_path, start_node, legacy):
    series = write_phantom_series(tmp_path / "ct", replace(MULTIFRAME, legacy_converted=legacy))
    node = start_node(rules=CT_RULES, inference={"workers": 1}, results={"rtstruct": True})

    sent = storescu(node.port, series.files, extra=["-R"])  # -R: storescu's default list lacks Legacy Converted
    assert sent.returncode == 0 and succeeded_files(sent.stdout + sent.stderr), sent.stdout + sent.stderr

    node.wait_for_state(series.series_instance_uid, JobState.DONE, timeout=240)
    with node.sessions() as session:
        job = job_for_series_uid(session, series.series_instance_uid)
        files = {Path(f).name: Path(f) for f in job.result_files}
    assert set(files) == {"seg-binary.dcm", "sr-binary.dcm", "rtstruct.dcm"}
    for path in files.values():
        errors, _warnings = dciodvfy(path)
        assert errors == [], f"{path.name}: {errors}"

    source = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    volume = load_series_volume(series.files)
    expected = ThresholdModel().segment(volume).labels  # the baseline is deterministic: the node computed the same
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(files["seg-binary.dcm"]))
    for item in seg.PerFrameFunctionalGroupsSequence:
        reference = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert reference.ReferencedSOPClassUID == source.SOPClassUID
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, _frame_position(source, int(reference.ReferencedFrameNumber)))
    frame_numbers = [ref.frame_number for ref in volume.slices]
    assert frame_numbers == list(range(MULTIFRAME.slices, 0, -1))
    pixels = seg.get_pixels_by_source_frame(
        source.SOPInstanceUID, source_frame_numbers=frame_numbers, combine_segments=True
    )
    np.testing.assert_array_equal(pixels, expected)  # segments 1..4 are labels 1..4: all four structures present

    sr = pydicom.dcmread(files["sr-binary.dcm"])
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series_item in study.ReferencedSeriesSequence
        for item in series_item.ReferencedSOPSequence
    }
    assert evidence == {source.SOPInstanceUID, seg.SOPInstanceUID}

    rtstruct = pydicom.dcmread(files["rtstruct.dcm"])
    contour_images = (
        rtstruct.ReferencedFrameOfReferenceSequence[0]
        .RTReferencedStudySequence[0]
        .RTReferencedSeriesSequence[0]
        .ContourImageSequence
    )
    assert sorted(int(i.ReferencedFrameNumber) for i in contour_images) == list(range(1, MULTIFRAME.slices + 1))
    assert {i.ReferencedSOPInstanceUID for i in contour_images} == {source.SOPInstanceUID}
    contours = [c for roi in rtstruct.ROIContourSequence for c in roi.ContourSequence]
    assert contours
    for contour in contours:
        reference = contour.ContourImageSequence[0]
        z = _frame_position(source, int(reference.ReferencedFrameNumber))[2]
        np.testing.assert_allclose([float(v) for v in contour.ContourData[2::3]], z, atol=1e-3)


def _two_multiframe_halves(folder: Path, offset: float = -50.0) -> tuple[str, list[Path]]:
    """One series of two Enhanced CT instances, 10 frames each, as a scanner splitting a volume writes it (the second
    ``offset`` mm along the slices from the first)."""
    halves = [
        write_phantom_series(folder / name, replace(MULTIFRAME, slices=10, origin=(-190.0, -190.0, z)))
        for name, z in (("upper", 0.0), ("lower", offset))
    ]
    files = [f for half in halves for f in half.files]
    accession = pydicom.dcmread(files[0], stop_before_pixels=True).AccessionNumber  # one study: one accession
    for index, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.FrameOfReferenceUID = halves[0].series_instance_uid, halves[0].frame_of_reference_uid
        ds.StudyInstanceUID, ds.InstanceNumber = halves[0].study_instance_uid, index + 1
        ds.AccessionNumber = accession
        ds.save_as(path)
    return halves[0].series_instance_uid, files


def instance_file(path: Path) -> InstanceFile:
    """The file as the database lists it for admission."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return InstanceFile(path, str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID), int(ds.InstanceNumber))


SEVERAL_SOURCES = (
    "the slices come from 2 instances, at least one of them multi-frame: results can reference the frames of one "
    "multi-frame instance only; send the series as one Enhanced CT instance or as single-frame CT images"
)


@pytest.mark.parametrize("interleaved", [False, True], ids=["one after the other", "interleaved"])
def test_slices_from_several_multiframe_instances_are_refused_before_the_model_runs(tmp_path, interleaved):
    """Found by admission and by the volume, not once the model has run (the results cannot reference them)."""
    _series_uid, files = _two_multiframe_halves(tmp_path, offset=2.5 if interleaved else -50.0)

    with pytest.raises(VolumeError) as refused:
        load_series_volume(files)
    admission = admit([instance_file(path) for path in files], AdmissionSettings())

    assert str(refused.value) == admission.refusal == SEVERAL_SOURCES


def test_the_results_refuse_several_multiframe_sources_of_a_volume_made_elsewhere(tmp_path):
    _series_uid, files = _two_multiframe_halves(tmp_path)
    volume = load_series_volume(files[:1])
    volume.source_paths = list(files)

    with pytest.raises(EncodingError) as refused:
        _sources_and_frames(volume, np.zeros(volume.hu.shape, dtype=np.uint8), [])

    assert str(refused.value) == SEVERAL_SOURCES


@pytest.mark.integration
def test_series_of_several_multiframe_instances_fails_with_the_reason(tmp_path, start_node):
    series_uid, files = _two_multiframe_halves(tmp_path / "ct")
    node = start_node(rules=CT_RULES, inference={"workers": 1})

    assert storescu(node.port, files).returncode == 0

    node.wait_for_state(series_uid, JobState.FAILED, timeout=180)
    assert node.job_reason(series_uid) == f"not admitted: {SEVERAL_SOURCES}"


def test_the_seg_takes_its_pixel_spacing_from_a_frame_the_volume_holds(tmp_path):
    """Pixel measures given per frame only, the first frame at another spacing: the volume leaves that frame out
    (the largest matrix is kept), and the SEG's shared PixelSpacing is the frames' the volume holds, not the first
    frame's (which would draw the segmentation at the wrong scale)."""
    series = write_phantom_series(tmp_path / "ct", replace(MULTIFRAME, slices=6))
    ds = pydicom.dcmread(series.files[0])
    shared = ds.SharedFunctionalGroupsSequence[0]
    measures = shared.PixelMeasuresSequence[0]
    del shared.PixelMeasuresSequence
    for number, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        item = pydicom.Dataset()
        item.PixelSpacing = ["0.5", "0.5"] if number == 0 else measures.PixelSpacing
        item.SliceThickness = measures.SliceThickness
        group.PixelMeasuresSequence = [item]
    ds.save_as(series.files[0])
    volume = load_series_volume(series.files)
    assert 1 not in {ref.frame_number for ref in volume.slices}  # frame 1 left out
    assert list(volume.spacing[:2]) == [float(v) for v in measures.PixelSpacing]

    sources, _frames = _sources_and_frames(volume, np.zeros(volume.hu.shape, dtype=np.uint8), [])

    written = sources[0].SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert [float(v) for v in written] == [float(v) for v in measures.PixelSpacing]


def test_results_that_lack_a_value_say_which_attribute_by_its_keyword(tmp_path, monkeypatch):
    """A value missing while encoding gave ``results cannot be encoded: (0008,0020)``, a bare key."""
    from pydicom.tag import Tag

    from dicom_node import pipeline
    from dicom_node.config import Settings

    def missing_study_date(*_args, **_kwargs):
        raise KeyError(Tag(0x00080020))

    monkeypatch.setattr(pipeline, "encode_results", missing_study_date)
    settings = Settings.model_validate({"storage": {"directory": str(tmp_path / "storage")}})
    claim = pipeline.ClaimedJob(7, "1.2.3", "ts", [], [], 1)
    with pytest.raises(EncodingError) as refused:
        pipeline._encode(settings, claim, None, None, [], None, tmp_path / "out", [])  # type: ignore[arg-type]
    assert str(refused.value) == (
        "results cannot be encoded: a value they need, StudyDate (0008,0020), is missing (the node's log says where)"
    )
