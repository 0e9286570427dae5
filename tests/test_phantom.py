"""Tests for the synthetic CT phantom writer (dicom_node.phantom)."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    LegacyConvertedEnhancedCTImageStorage,
    MRImageStorage,
    RLELossless,
)

from dicom_node import phantom
from dicom_node.phantom import (
    PHANTOM_HU,
    PHANTOM_LABELS,
    PhantomSeries,
    PhantomSpec,
    phantom_volume,
    write_phantom_series,
)
from tests.conftest import DICOM_NODE, dciodvfy

SMALL = PhantomSpec(rows=64, columns=64, slices=20, pixel_spacing=(6.4, 6.4), slice_spacing=5.0)
LIVER_CENTRE = np.array([-60.0, -10.0, -20.0])  # LPS mm, from the phantom's anatomy


def _spec(**changes: object) -> PhantomSpec:
    return replace(SMALL, **changes)


def _hu(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _floats(values: object) -> np.ndarray:
    return np.array([float(v) for v in values])


def _pixel_positions(ds: pydicom.Dataset) -> np.ndarray:
    """(rows, columns, 3) patient coordinates of every pixel, from the header."""
    iop, ipp = _floats(ds.ImageOrientationPatient), _floats(ds.ImagePositionPatient)
    dr, dc = _floats(ds.PixelSpacing)
    r = np.arange(ds.Rows)[:, None, None] * dr * iop[3:]
    c = np.arange(ds.Columns)[None, :, None] * dc * iop[:3]
    return ipp + r + c


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> PhantomSeries:
    return write_phantom_series(tmp_path_factory.mktemp("small"), SMALL)


@pytest.fixture(scope="module")
def small_pixels(small: PhantomSeries) -> np.ndarray:
    return np.stack([pydicom.dcmread(f).pixel_array for f in small.files])


def test_small_series_writes_one_valid_ct_file_per_slice(small: PhantomSeries) -> None:
    assert len(small.files) == SMALL.slices
    datasets = [pydicom.dcmread(f) for f in small.files]
    assert all(Path(f).read_bytes()[128:132] == b"DICM" for f in small.files)
    assert {ds.SOPClassUID for ds in datasets} == {CTImageStorage}
    assert {ds.file_meta.TransferSyntaxUID for ds in datasets} == {ExplicitVRLittleEndian}
    assert [ds.SOPInstanceUID for ds in datasets] == small.sop_instance_uids
    assert len(set(small.sop_instance_uids)) == SMALL.slices
    assert {ds.StudyInstanceUID for ds in datasets} == {small.study_instance_uid}
    assert {ds.SeriesInstanceUID for ds in datasets} == {small.series_instance_uid}
    assert {ds.FrameOfReferenceUID for ds in datasets} == {small.frame_of_reference_uid}
    assert [ds.InstanceNumber for ds in datasets] == list(range(1, SMALL.slices + 1))
    first = datasets[0]
    assert first.ImagesInAcquisition == SMALL.slices
    assert list(first.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert (first.BitsAllocated, first.PixelRepresentation, first.SamplesPerPixel) == (16, 1, 1)
    assert first.PhotometricInterpretation == "MONOCHROME2"
    assert first.Manufacturer == "dicom-node phantom"
    assert (first.PatientPosition, first.SpecificCharacterSet) == ("HFS", "ISO_IR 100")
    assert float(first.SliceThickness) == SMALL.slice_spacing


def test_every_pixel_read_back_equals_returned_hu(small: PhantomSeries) -> None:
    for k, path in zip(small.slice_indices, small.files, strict=True):
        np.testing.assert_array_equal(_hu(pydicom.dcmread(path)), small.hu[k])
    assert small.hu.dtype == np.int16 and small.labels.dtype == np.uint8
    assert small.hu.shape == small.labels.shape == (SMALL.slices, SMALL.rows, SMALL.columns)


@pytest.mark.parametrize("sign", [1, -1])
def test_slice_positions_advance_by_slice_spacing_along_normal(sign: int, tmp_path: Path) -> None:
    series = write_phantom_series(tmp_path, _spec(slice_direction_sign=sign))
    datasets = [pydicom.dcmread(f) for f in series.files]
    positions = np.array([_floats(ds.ImagePositionPatient) for ds in datasets])
    iop = _floats(datasets[0].ImageOrientationPatient)
    normal = np.cross(iop[:3], iop[3:])
    np.testing.assert_allclose(np.diff(positions, axis=0), np.tile(sign * 5.0 * normal, (19, 1)))
    np.testing.assert_allclose(positions, np.array(series.slice_positions))
    np.testing.assert_allclose([float(ds.SliceLocation) for ds in datasets], positions @ normal)
    centre = positions.mean(axis=0) + 63 / 2 * 6.4 * (iop[:3] + iop[3:])
    np.testing.assert_allclose(centre, 0.0, atol=1e-6)  # default origin centres the body


def test_liver_voxel_in_file_matches_returned_hu_and_liver_mean(small: PhantomSeries) -> None:
    datasets = [pydicom.dcmread(f) for f in small.files]
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in datasets])
    k = int(np.argmin(np.abs(z - LIVER_CENTRE[2])))
    grid = _pixel_positions(datasets[k])
    r, c = np.unravel_index(np.argmin(np.linalg.norm(grid - LIVER_CENTRE, axis=-1)), grid.shape[:2])
    hu_in_file = _hu(datasets[k])[r, c]
    assert small.labels[k, r, c] == PHANTOM_LABELS["liver"]
    assert hu_in_file == small.hu[k, r, c]
    assert abs(hu_in_file - PHANTOM_HU["liver"]) < 5 * SMALL.noise_sd


@pytest.mark.parametrize(
    ("compression", "syntax"),
    [
        ("implicit", ImplicitVRLittleEndian),
        ("deflate", DeflatedExplicitVRLittleEndian),
        ("rle", RLELossless),
        ("jpeg2000", JPEG2000Lossless),
        ("jpegls", JPEGLSLossless),
    ],
)
def test_compression_round_trips_losslessly(
    compression: str, syntax: str, small_pixels: np.ndarray, tmp_path: Path
) -> None:
    try:
        series = write_phantom_series(tmp_path, _spec(compression=compression, slices=SMALL.slices))
    except RuntimeError as exc:
        pytest.skip(str(exc))
    datasets = [pydicom.dcmread(f) for f in series.files]
    assert {ds.file_meta.TransferSyntaxUID for ds in datasets} == {syntax}
    assert [ds.SOPInstanceUID for ds in datasets] == series.sop_instance_uids
    np.testing.assert_array_equal(np.stack([ds.pixel_array for ds in datasets]), small_pixels)


def test_missing_encoder_raises_runtime_error_naming_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = SimpleNamespace(is_available=False, missing_dependencies=["pylibjpeg-openjpeg"])
    monkeypatch.setattr(phantom, "get_encoder", lambda uid: missing)
    with pytest.raises(RuntimeError, match="pylibjpeg-openjpeg"):
        write_phantom_series(tmp_path, _spec(compression="jpeg2000"))
    assert not list(tmp_path.iterdir())


def test_gaps_omit_exactly_those_slices(tmp_path: Path) -> None:
    series = write_phantom_series(tmp_path, _spec(gaps=(3, 7)))
    datasets = [pydicom.dcmread(f) for f in series.files]
    assert len(datasets) == 18
    assert series.slice_indices == [k for k in range(20) if k not in (3, 7)]
    assert list(np.flatnonzero(~series.present)) == [3, 7]
    assert [ds.InstanceNumber - 1 for ds in datasets] == series.slice_indices
    written = [tuple(_floats(ds.ImagePositionPatient)) for ds in datasets]
    assert written == [series.slice_positions[k] for k in series.slice_indices]
    assert {ds.ImagesInAcquisition for ds in datasets} == {18}
    assert series.hu.shape[0] == 20  # full stack kept, gaps included


def test_localizer_adds_one_coronal_localizer_image(tmp_path: Path) -> None:
    series = write_phantom_series(tmp_path, _spec(add_localizer=True))
    datasets = [pydicom.dcmread(f) for f in series.files]
    localizers = [ds for ds in datasets if ds.ImageType[2] == "LOCALIZER"]
    assert len(datasets) == 21 and len(localizers) == 1
    loc = localizers[0]
    assert series.localizer_file == series.files[-1]
    assert loc.SeriesInstanceUID == series.series_instance_uid
    iop = _floats(loc.ImageOrientationPatient)
    assert not np.allclose(iop, _floats(datasets[0].ImageOrientationPatient))
    np.testing.assert_allclose(np.abs(np.cross(iop[:3], iop[3:])), [0, 1, 0])  # coronal
    assert tuple(_floats(loc.ImagePositionPatient)) not in series.slice_positions
    assert all(ds.ImageType[2] == "AXIAL" for ds in datasets[:-1])
    assert datasets[0].ImagesInAcquisition == 20


def test_gantry_tilt_sets_tag_and_shears_the_stack(tmp_path: Path) -> None:
    series = write_phantom_series(tmp_path, _spec(gantry_tilt_degrees=20.0))
    datasets = [pydicom.dcmread(f) for f in series.files]
    assert {float(ds.GantryDetectorTilt) for ds in datasets} == {20.0}
    iop = _floats(datasets[0].ImageOrientationPatient)
    t = np.radians(20.0)
    np.testing.assert_allclose(iop, [1, 0, 0, 0, np.cos(t), np.sin(t)], atol=1e-6)
    steps = np.diff([_floats(ds.ImagePositionPatient) for ds in datasets], axis=0)
    np.testing.assert_allclose(steps, np.tile([0, 0, 5.0], (19, 1)))  # table moves along z
    grids = np.stack([_pixel_positions(ds) for ds in datasets])
    nearest = np.argmin(np.linalg.norm(grids - LIVER_CENTRE, axis=-1))
    k, r, c = np.unravel_index(nearest, grids.shape[:3])
    assert series.labels[k, r, c] == PHANTOM_LABELS["liver"]  # anatomy follows the tilted planes


def test_mr_modality_writes_mr_image_storage(tmp_path: Path) -> None:
    series = write_phantom_series(tmp_path, _spec(modality="MR", slices=4))
    ds = pydicom.dcmread(series.files[0])
    assert (ds.SOPClassUID, ds.Modality) == (MRImageStorage, "MR")
    assert float(ds.MagneticFieldStrength) > 0 and float(ds.RepetitionTime) > 0
    assert "RescaleIntercept" not in ds and ds.PixelRepresentation == 0
    assert ds.pixel_array.min() >= 0 and ds.pixel_array.max() > 0
    np.testing.assert_array_equal(ds.pixel_array, series.hu[0])


def test_enhanced_writes_one_multiframe_file_with_per_frame_positions(tmp_path: Path) -> None:
    series = write_phantom_series(tmp_path, _spec(enhanced=True, slice_direction_sign=-1))
    assert len(series.files) == 1
    ds = pydicom.dcmread(series.files[0])
    assert ds.SOPClassUID == EnhancedCTImageStorage
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    assert ds.NumberOfFrames == 20
    shared = ds.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(_floats(shared.PixelMeasuresSequence[0].PixelSpacing), [6.4, 6.4])
    np.testing.assert_allclose(_floats(shared.PlaneOrientationSequence[0].ImageOrientationPatient), [1, 0, 0, 0, 1, 0])
    frames = ds.PerFrameFunctionalGroupsSequence
    positions = [tuple(_floats(f.PlanePositionSequence[0].ImagePositionPatient)) for f in frames]
    assert positions == series.slice_positions
    assert [f.FrameContentSequence[0].InStackPositionNumber for f in frames] == list(range(1, 21))
    transform = shared.PixelValueTransformationSequence[0]
    hu = ds.pixel_array * float(transform.RescaleSlope) + float(transform.RescaleIntercept)
    np.testing.assert_array_equal(hu, series.hu)


def test_same_seed_gives_identical_pixels(small_pixels: np.ndarray, tmp_path: Path) -> None:
    again = write_phantom_series(tmp_path, SMALL)
    pixels = np.stack([pydicom.dcmread(f).pixel_array for f in again.files])
    np.testing.assert_array_equal(pixels, small_pixels)
    hu_a, labels_a = phantom_volume((4, 32, 32), (5.0, 12.8, 12.8), seed=7)
    hu_b, labels_b = phantom_volume((4, 32, 32), (5.0, 12.8, 12.8), seed=8)
    np.testing.assert_array_equal(labels_a, labels_b)
    assert not np.array_equal(hu_a, hu_b)


def test_phantom_volume_equals_default_geometry_series(small: PhantomSeries) -> None:
    hu, labels = phantom_volume((20, 64, 64), (5.0, 6.4, 6.4), seed=SMALL.seed, noise_sd=SMALL.noise_sd)
    np.testing.assert_array_equal(hu, small.hu)
    np.testing.assert_array_equal(labels, small.labels)


def test_clinical_stack_contains_every_structure_in_place() -> None:
    hu, labels = phantom_volume((100, 128, 128), (1.5, 3.2, 3.2), noise_sd=10.0)
    assert set(np.unique(labels)) == {0, *PHANTOM_LABELS.values()}
    for name, value in PHANTOM_LABELS.items():
        if name != "body":  # body mixes soft tissue and the fat rim
            assert abs(hu[labels == value].mean() - PHANTOM_HU[name]) < 3, name
    for name in ("lung_left", "lung_right", "liver", "spleen", "kidney_left", "kidney_right"):
        present = np.flatnonzero((labels == PHANTOM_LABELS[name]).any(axis=(1, 2)))
        assert present.min() > 0 and present.max() < 99, f"{name} not within the stack"

    def centroid(name: str) -> np.ndarray:
        return np.argwhere(labels == PHANTOM_LABELS[name]).mean(axis=0)  # (slice, row, column)

    # column index grows towards the patient's left (+x), slice index towards the head
    assert centroid("liver")[2] < 63.5 < centroid("spleen")[2]
    assert centroid("lung_right")[2] < 63.5 < centroid("lung_left")[2]
    assert centroid("lung_left")[0] > centroid("liver")[0] > centroid("kidney_left")[0]
    assert centroid("aorta")[1] < centroid("spine")[1]  # aorta anterior of the spine
    assert hu[labels == 0].mean() < -990


def test_short_stack_shows_part_of_the_anatomy() -> None:
    _, labels = phantom_volume((4, 64, 64), (2.0, 6.4, 6.4))
    assert {PHANTOM_LABELS["body"], PHANTOM_LABELS["liver"], PHANTOM_LABELS["spine"]} <= set(np.unique(labels))


@pytest.mark.parametrize(
    "changes",
    [
        {"compression": "jpeg"},
        {"modality": "US"},
        {"slice_direction_sign": 0},
        {"gaps": (20,)},
        {"enhanced": True, "modality": "MR"},
        {"legacy_converted": True},
        {"orientation": (1, 0, 0, 1, 0, 0)},
    ],
)
def test_invalid_spec_is_rejected(changes: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_phantom_series(tmp_path, _spec(**changes))


@pytest.mark.parametrize("legacy", [False, True], ids=["enhanced-ct", "legacy-converted-enhanced-ct"])
def test_multiframe_phantom_passes_dciodvfy(tmp_path: Path, legacy: bool) -> None:
    series = write_phantom_series(tmp_path, _spec(slices=6, enhanced=True, legacy_converted=legacy))
    errors, _warnings = dciodvfy(series.files[0])
    assert errors == []


def test_legacy_converted_writes_one_multiframe_file_referencing_single_frame_images(tmp_path: Path) -> None:
    series = write_phantom_series(tmp_path, _spec(enhanced=True, legacy_converted=True))
    [path] = series.files
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == LegacyConvertedEnhancedCTImageStorage and ds.NumberOfFrames == 20
    frames = ds.PerFrameFunctionalGroupsSequence
    assert [tuple(_floats(f.PlanePositionSequence[0].ImagePositionPatient)) for f in frames] == series.slice_positions
    converted_from = {f.ConversionSourceAttributesSequence[0].ReferencedSOPInstanceUID for f in frames}
    assert len(converted_from) == 20
    transform = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    hu = ds.pixel_array * float(transform.RescaleSlope) + float(transform.RescaleIntercept)
    np.testing.assert_array_equal(hu, series.hu)


def test_character_set_option_encodes_the_patient_name_with_it(tmp_path: Path) -> None:
    name = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    series = write_phantom_series(tmp_path, _spec(slices=1, character_set="\\ISO 2022 IR 87", patient_name=name))
    raw = pydicom.dcmread(series.files[0])
    assert list(raw.SpecificCharacterSet) == ["", "ISO 2022 IR 87"]
    assert b"\x1b$B" in raw["PatientName"].value.original_string  # ISO 2022 escape to JIS X 0208
    assert str(raw.PatientName) == name


def test_phantom_command_writes_legacy_converted_ct_in_a_japanese_character_set(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            DICOM_NODE,
            "phantom",
            str(tmp_path / "ct"),
            "--slices",
            "4",
            "--size",
            "32",
            "--multiframe",
            "legacy",
            "--patient-name",
            "Yamada^Tarou=山田^太郎=やまだ^たろう",
            "--character-set",
            "\\ISO 2022 IR 87",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    [path] = (tmp_path / "ct").glob("*.dcm")
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == LegacyConvertedEnhancedCTImageStorage and ds.NumberOfFrames == 4
    assert str(ds.PatientName) == "Yamada^Tarou=山田^太郎=やまだ^たろう"


@pytest.mark.parametrize(
    ("name", "character_set", "says"),
    [
        (
            "山田^太郎",
            "ISO_IR 100",
            "the patient name '山田^太郎' cannot be written in the character set 'ISO_IR 100': give a "
            "--character-set that has its characters (ISO_IR 192 has them all)",
        ),
        ("Doe^John", "ISO_IR 999", "--character-set 'ISO_IR 999' is not a Specific Character Set DICOM defines"),
    ],
)
def test_phantom_command_refuses_a_name_it_would_write_with_question_marks(
    tmp_path: Path, name: str, character_set: str, says: str
) -> None:
    arguments = ["--slices", "1", "--size", "8", "--patient-name", name, "--character-set", character_set]
    result = subprocess.run(
        [DICOM_NODE, "phantom", str(tmp_path / "ct"), *arguments],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert f"cannot write phantom: {says}" in result.stderr
    assert not (tmp_path / "ct").exists() or not any((tmp_path / "ct").iterdir())


def test_phantom_command_refuses_an_unknown_multiframe_kind(tmp_path: Path) -> None:
    result = subprocess.run(
        [DICOM_NODE, "phantom", str(tmp_path / "ct"), "--slices", "4", "--size", "32", "--multiframe", "tiled"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "--multiframe is 'enhanced' or 'legacy', not 'tiled'" in result.stderr


def test_images_in_acquisition_is_written_or_left_out_as_the_spec_says(tmp_path):
    spec = PhantomSpec(rows=8, columns=8, slices=3, add_localizer=True)
    counted = write_phantom_series(tmp_path / "counted", spec)
    uncounted = write_phantom_series(tmp_path / "uncounted", replace(spec, images_in_acquisition=False))

    assert all("ImagesInAcquisition" in pydicom.dcmread(path) for path in counted.files)
    assert not any("ImagesInAcquisition" in pydicom.dcmread(path) for path in uncounted.files)
