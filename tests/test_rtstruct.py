"""RTSTRUCT from a label map: validates, one ROI per structure, contours where the structure is."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from skimage import measure

from dicom_node.encode.rtstruct import ContourBudget, encode_rtstruct, encoded_bytes, slice_contours
from dicom_node.encode.seg import Algorithm
from dicom_node.phantom import PhantomSpec, write_phantom_series
from inference.models.threshold import ThresholdModel
from inference.volume import Volume, load_series_volume
from tests.conftest import dciodvfy

ALGORITHM = Algorithm(ThresholdModel.algorithm_name, ThresholdModel.algorithm_version, is_baseline=True)


def segmented_phantom(folder, spec: PhantomSpec):
    """A phantom series' volume, the baseline model's segmentation, and its headers in slice order."""
    series = write_phantom_series(folder, spec)
    volume = load_series_volume(series.files)
    result = ThresholdModel().segment(volume)
    headers = {d.SOPInstanceUID: d for d in (pydicom.dcmread(f, stop_before_pixels=True) for f in series.files)}
    return volume, result, [headers[s.sop_instance_uid] for s in volume.slices]


@pytest.fixture(scope="module")
def structure_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rt")
    volume, result, sources = segmented_phantom(
        folder / "ct", PhantomSpec(rows=96, columns=96, slices=24, pixel_spacing=(4.0, 4.0), slice_spacing=5.0)
    )
    dataset = encode_rtstruct(volume, sources, result.labels, result.classes, ALGORITHM)
    path = folder / "rtstruct.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path, volume, result


def test_rtstruct_names_the_patient_with_the_issuer_of_the_patient_id(tmp_path):
    """The SEG and SR carry IssuerOfPatientID (highdicom copies it); the RTSTRUCT must say the same."""
    volume, result, sources = segmented_phantom(
        tmp_path / "ct", PhantomSpec(rows=32, columns=32, slices=4, pixel_spacing=(5.0, 5.0), slice_spacing=5.0)
    )
    without = encode_rtstruct(volume, sources, result.labels, result.classes, ALGORITHM)
    for source in sources:
        source.IssuerOfPatientID = "HOSPITAL_A"
    with_issuer = encode_rtstruct(volume, sources, result.labels, result.classes, ALGORITHM)
    assert "IssuerOfPatientID" not in without
    assert with_issuer.IssuerOfPatientID == "HOSPITAL_A"
    assert with_issuer.PatientID == sources[0].PatientID


def test_rtstruct_passes_dciodvfy(structure_set):
    path, _volume, _result = structure_set
    errors, _warnings = dciodvfy(path)
    assert errors == []


def test_one_roi_per_structure_with_contours_on_its_slices(structure_set):
    path, volume, result = structure_set
    dataset = pydicom.dcmread(path)

    assert [roi.ROIName for roi in dataset.StructureSetROISequence] == [
        "Body without lungs and bone",
        "Left lung",
        "Right lung",
        "Skeleton",
    ]
    body = dataset.ROIContourSequence[0]
    slices_with_body = {int(k) for k in np.flatnonzero((result.labels == 1).any(axis=(1, 2)))}
    referenced = {c.ContourImageSequence[0].ReferencedSOPInstanceUID for c in body.ContourSequence}
    assert referenced == {volume.slices[k].sop_instance_uid for k in slices_with_body}
    for contour in body.ContourSequence[:5]:
        points = np.array(contour.ContourData, dtype=float).reshape(-1, 3)
        assert len(points) == contour.NumberOfContourPoints >= 3
        assert np.ptp(points[:, 2]) == 0  # planar, on its slice
    assert all(len(str(v)) <= 16 for c in body.ContourSequence for v in c.ContourData)


def test_contours_lie_on_their_own_images_plane_where_positions_are_slightly_irregular(tmp_path):
    """Slice positions off the regular grid, within tolerance: each contour follows its own image's position."""
    series = write_phantom_series(
        tmp_path / "ct", PhantomSpec(rows=64, columns=64, slices=12, pixel_spacing=(4.0, 4.0), slice_spacing=5.0)
    )
    moved: dict[str, np.ndarray] = {}
    for index, (dz, dx) in {4: (0.4, 1.5), 7: (-0.3, -1.0)}.items():  # within 10 % of a step, half a pixel
        dataset = pydicom.dcmread(series.files[index])
        position = np.array(dataset.ImagePositionPatient, dtype=float) + np.array([dx, 0.0, dz])
        dataset.ImagePositionPatient = [f"{v:.3f}" for v in position]
        dataset.save_as(series.files[index])
        moved[dataset.SOPInstanceUID] = position
    volume = load_series_volume(series.files)
    result = ThresholdModel().segment(volume)
    headers = {d.SOPInstanceUID: d for d in (pydicom.dcmread(f, stop_before_pixels=True) for f in series.files)}
    dataset = encode_rtstruct(
        volume, [headers[s.sop_instance_uid] for s in volume.slices], result.labels, result.classes, ALGORITHM
    )

    checked = set()
    for roi in dataset.ROIContourSequence:
        for contour in roi.ContourSequence:
            uid = contour.ContourImageSequence[0].ReferencedSOPInstanceUID
            position = np.array(headers[uid].ImagePositionPatient, dtype=float)
            points = np.array(contour.ContourData, dtype=float).reshape(-1, 3)
            assert np.allclose(points[:, 2], position[2], atol=1e-3), "the contour is on its image's plane"
            columns = (points[:, 0] - position[0]) / 4.0  # in the image's own pixel columns
            assert columns.min() >= -0.5 and columns.max() <= 63.5
            checked.add(uid)
    assert set(moved) <= checked


def test_contour_encloses_the_mask_area():
    mask = np.zeros((40, 40), dtype=bool)
    mask[10:30, 5:25] = True  # 400 pixels
    (contour,) = slice_contours(mask)
    rows, cols = contour[:, 0], contour[:, 1]
    area = 0.5 * abs(np.dot(rows, np.roll(cols, 1)) - np.dot(cols, np.roll(rows, 1)))
    assert area == pytest.approx(400, rel=0.05)


def test_simplified_contours_stay_within_tolerance_of_the_traced_boundary():
    from scipy import ndimage
    from skimage import measure

    from dicom_node.encode.rtstruct import SIMPLIFY_TOLERANCE_PIXELS, simplify_closed

    rng = np.random.default_rng(3)
    mask = ndimage.binary_opening(ndimage.gaussian_filter(rng.random((120, 120)), 4) > 0.5, iterations=2)
    traced = measure.find_contours(np.pad(mask.astype(np.uint8), 1), 0.5)
    assert len(traced) >= 3
    for contour, simplified in zip(traced, simplify_closed(traced, SIMPLIFY_TOLERANCE_PIXELS), strict=True):
        assert len(simplified) < len(contour)
        closed = np.vstack([simplified, simplified[:1]])
        starts, ends = closed[:-1], closed[1:]
        # every traced point lies within the tolerance of some edge of the simplified polygon
        for point in contour:
            chord = ends - starts
            t = np.clip(((point - starts) * chord).sum(1) / np.maximum((chord**2).sum(1), 1e-12), 0, 1)
            nearest = starts + t[:, None] * chord
            assert np.hypot(*(nearest - point).T).min() <= SIMPLIFY_TOLERANCE_PIXELS + 1e-9
        reference = measure.approximate_polygon(contour, SIMPLIFY_TOLERANCE_PIXELS)[:-1]
        assert abs(len(simplified) - len(reference)) <= 0.1 * len(reference) + 2


@pytest.mark.parametrize("legacy", [False, True], ids=["enhanced-ct", "legacy-converted-enhanced-ct"])
def test_rtstruct_of_a_multiframe_source_references_frames_and_passes_dciodvfy(tmp_path, legacy):
    series = write_phantom_series(
        tmp_path / "ct",
        PhantomSpec(
            rows=64,
            columns=64,
            slices=12,
            pixel_spacing=(5.0, 5.0),
            slice_spacing=10.0,
            enhanced=True,
            legacy_converted=legacy,
            slice_direction_sign=-1,
        ),
    )
    volume = load_series_volume(series.files)
    result = ThresholdModel().segment(volume)
    source = pydicom.dcmread(series.files[0], stop_before_pixels=True)

    dataset = encode_rtstruct(volume, [source], result.labels, result.classes, ALGORITHM)
    path = tmp_path / "rtstruct.dcm"
    dataset.save_as(path, enforce_file_format=True)

    assert dciodvfy(path)[0] == []
    frame_z = {
        number: float(group.PlanePositionSequence[0].ImagePositionPatient[2])
        for number, group in enumerate(source.PerFrameFunctionalGroupsSequence, start=1)
    }
    contours = [c for roi in dataset.ROIContourSequence for c in roi.ContourSequence]
    assert contours
    for contour in contours:
        [image] = contour.ContourImageSequence
        assert image.ReferencedSOPInstanceUID == source.SOPInstanceUID
        z = {round(float(v), 3) for v in contour.ContourData[2::3]}
        assert z == {round(frame_z[int(image.ReferencedFrameNumber)], 3)}


def test_a_structure_over_the_point_budget_is_simplified_further_never_dropped(tmp_path):
    series = write_phantom_series(tmp_path / "ct", PhantomSpec(rows=128, columns=128, slices=16))
    volume = load_series_volume(series.files)
    result = ThresholdModel().segment(volume)
    headers = {d.SOPInstanceUID: d for d in (pydicom.dcmread(f, stop_before_pixels=True) for f in series.files)}
    sources = [headers[s.sop_instance_uid] for s in volume.slices]

    def points(dataset: pydicom.Dataset) -> dict[int, int]:
        return {
            roi.ReferencedROINumber: sum(int(c.NumberOfContourPoints) for c in roi.ContourSequence)
            for roi in dataset.ROIContourSequence
        }

    notes: list[str] = []
    generous = encode_rtstruct(volume, sources, result.labels, result.classes, ALGORITHM, notes=notes)
    assert notes == []
    tight = encode_rtstruct(
        volume,
        sources,
        result.labels,
        result.classes,
        ALGORITHM,
        budget=ContourBudget(points_per_structure=400),
        notes=notes,
    )

    assert len(tight.StructureSetROISequence) == len(generous.StructureSetROISequence)  # nothing dropped
    before, after = points(generous), points(tight)
    simplified = [number for number in before if before[number] > 400]
    assert simplified and all(after[n] < before[n] for n in simplified)
    assert all(roi.ContourSequence for roi in tight.ROIContourSequence)
    assert any(note.startswith("RTSTRUCT: Body without lungs and bone simplified to within") for note in notes)
    path = tmp_path / "rtstruct.dcm"
    tight.save_as(path, enforce_file_format=True)
    assert dciodvfy(path)[0] == []


def test_the_object_budget_is_shared_between_structures():
    budget = ContourBudget(points_per_structure=100_000, megabytes=27.0)
    assert budget.per_structure(1) == 100_000
    assert budget.per_structure(117) == 1_000_000 // 117


def rasterised(dataset: pydicom.Dataset, volume: Volume, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Each ROI's contours filled as planning systems read them: pixel centres inside, by the even-odd rule."""
    slice_of = {ref.sop_instance_uid: k for k, ref in enumerate(volume.slices)}
    names = {int(roi.ROINumber): str(roi.ROIName) for roi in dataset.StructureSetROISequence}
    filled = {}
    for roi in dataset.ROIContourSequence:
        mask = np.zeros(shape, dtype=bool)
        for contour in roi.ContourSequence:
            k = slice_of[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
            points = np.array(contour.ContourData, dtype=float).reshape(-1, 3)
            in_plane = (points - volume.slice_origin(k)) @ volume.direction[:, :2] / volume.spacing[:2]
            mask[k] ^= measure.grid_points_in_poly(shape[1:], in_plane[:, ::-1])  # (row, column) vertices
        filled[names[int(roi.ReferencedROINumber)]] = mask
    return filled


def test_every_voxel_is_in_the_rtstruct_down_to_a_single_voxel_island_a_thin_line_and_a_one_pixel_hole(tmp_path):
    """Islands and holes under a pixel's traced area, and diagonal lines (one-pixel islands touching at corners),
    are contoured as their pixels' squares: the RTSTRUCT holds exactly the voxels the SEG holds."""
    volume, _result, sources = segmented_phantom(
        tmp_path / "ct", PhantomSpec(rows=64, columns=64, slices=12, pixel_spacing=(4.0, 4.0), slice_spacing=5.0)
    )
    labels = np.zeros(volume.hu.shape, dtype=np.uint8)
    labels[3:6, 20:30, 20:30] = 1  # a block, with a one-pixel hole on slice 4
    labels[4, 25, 25] = 0
    labels[4, 40, 40] = 1  # a single-voxel island beside it
    labels[7, 10, 50] = 1  # and one alone on its slice
    labels[5, 50, 5:20] = 2  # a straight line one pixel thin
    for step in range(6):
        labels[6, 30 + step, 40 + step] = 2  # a diagonal line: pixels touching at their corners only
    labels[9, 2, 2] = 3  # a whole structure of one voxel
    classes = {1: "liver", 2: "pancreas", 3: "kidney_right"}
    notes: list[str] = []

    dataset = encode_rtstruct(volume, sources, labels, classes, ALGORITHM, notes=notes)
    path = tmp_path / "rtstruct.dcm"
    dataset.save_as(path, enforce_file_format=True)

    filled = rasterised(pydicom.dcmread(path), volume, labels.shape)
    assert list(filled) == ["Liver", "Pancreas", "Right kidney"]
    for label, name in zip(classes, filled, strict=True):
        assert np.array_equal(filled[name], labels == label), name
    assert notes == []
    errors, _warnings = dciodvfy(path)
    assert errors == []


def test_an_island_that_the_size_budget_simplifies_away_is_kept_as_drawn_finer(tmp_path):
    """At 4 pixels' tolerance a 3 x 3 island reduces to a line: it is kept at a quarter pixel instead."""
    volume, _result, sources = segmented_phantom(
        tmp_path / "ct", PhantomSpec(rows=64, columns=64, slices=12, pixel_spacing=(4.0, 4.0), slice_spacing=5.0)
    )
    labels = np.zeros(volume.hu.shape, dtype=np.uint8)
    rows, columns = np.ogrid[:64, :64]
    labels[2:10][:, (rows - 24) ** 2 + (columns - 24) ** 2 < 18**2] = 1  # a disc, too many points for the budget
    labels[5, 50:53, 50:53] = 1  # an island of 3 x 3 voxels
    notes: list[str] = []

    dataset = encode_rtstruct(
        volume, sources, labels, {1: "liver"}, ALGORITHM, budget=ContourBudget(points_per_structure=40), notes=notes
    )

    assert notes and notes[0].startswith("RTSTRUCT: Liver simplified to within 4 pixel(s)")
    (roi,) = dataset.StructureSetROISequence  # said in the RTSTRUCT itself, for a system that reads it alone
    assert roi.ROIDescription == "simplified to within 4 px to fit the size budget; SEG exact"
    assert dataset.StructureSetDescription.endswith(
        "simplified to fit the size budget, their contours within a few "
        "pixels of the segmentation (the SEG is exact): Liver"
    )
    island = rasterised(dataset, volume, labels.shape)["Liver"][:, 46:58, 46:58]
    assert np.array_equal(island, labels[:, 46:58, 46:58] == 1)


def test_a_structure_of_one_voxel_is_its_voxels_square_and_the_rtstruct_still_validates(tmp_path):
    """One voxel of a structure: traced, its diamond covers half a pixel; it is written as the voxel's square."""
    volume, result, sources = segmented_phantom(
        tmp_path / "ct", PhantomSpec(rows=64, columns=64, slices=12, pixel_spacing=(4.0, 4.0), slice_spacing=5.0)
    )
    labels = result.labels.copy()
    tiny = max(result.classes) + 1
    labels[6, 2, 2] = tiny
    classes = {**result.classes, tiny: "kidney_right"}
    notes: list[str] = []

    dataset = encode_rtstruct(volume, sources, labels, classes, ALGORITHM, notes=notes)
    path = tmp_path / "rtstruct.dcm"
    dataset.save_as(path, enforce_file_format=True)

    names = [roi.ROIName for roi in dataset.StructureSetROISequence]
    (contour,) = dataset.ROIContourSequence[names.index("Right kidney")].ContourSequence
    points = np.array(contour.ContourData, dtype=float).reshape(-1, 3)
    centre = volume.slice_origin(6) + np.array([2.0, 2.0, 0.0]) * 4.0  # the voxel's centre (identity orientation)
    assert sorted(map(tuple, np.round(points - centre, 3))) == [(-2, -2, 0), (-2, 2, 0), (2, -2, 0), (2, 2, 0)]
    assert notes == []
    errors, _warnings = dciodvfy(path)
    assert errors == []


def test_the_size_budget_counts_each_contour_so_a_fragmented_structure_is_reported_over_it(tmp_path):
    """Scattered one-voxel islands cost mostly their contour items (about 170 bytes each beside 4 points):
    the budget counts them, so the note says when the structure stays over its share of the megabytes,
    and the size the encoder reckons is close to the size written."""
    volume, _result, sources = segmented_phantom(
        tmp_path / "ct", PhantomSpec(rows=64, columns=64, slices=12, pixel_spacing=(4.0, 4.0), slice_spacing=5.0)
    )
    labels = np.zeros(volume.hu.shape, dtype=np.uint8)
    labels[2:10, 4:60:3, 4:60:3] = 1  # 8 slices of 19 x 19 islands, none touching another: 2,888 squares
    islands = int(labels.sum())
    notes: list[str] = []
    # 0.4 MB: room for every island's 4 points at 27 bytes (0.31 MB) but not for the contours' items as well
    dataset = encode_rtstruct(
        volume, sources, labels, {1: "liver"}, ALGORITHM, budget=ContourBudget(megabytes=0.4), notes=notes
    )

    contours = dataset.ROIContourSequence[0].ContourSequence
    assert len(contours) == islands  # nothing dropped to fit
    assert len(notes) == 1 and "still over its budget" in notes[0] and f"{islands} contours" in notes[0], notes
    path = tmp_path / "rtstruct.dcm"
    dataset.save_as(path, enforce_file_format=True)
    written = path.stat().st_size
    reckoned = encoded_bytes([np.zeros((int(c.NumberOfContourPoints), 2)) for c in contours])
    assert 0.8 * written < reckoned < 1.2 * written, (reckoned, written)
