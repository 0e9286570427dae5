"""Series to volume: geometry against known phantoms and the real CT, and each defect's reason."""

from __future__ import annotations

import random
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.phantom import PHANTOM_HU, PHANTOM_LABELS, PhantomSpec, write_phantom_series
from inference.volume import VolumeError, check_slice_stack, load_series_volume, orthonormal_directions

SPEC = PhantomSpec(rows=96, columns=80, slices=24, pixel_spacing=(4.0, 4.5), slice_spacing=6.0, noise_sd=0.0)


def liver_voxel(labels: np.ndarray) -> tuple[int, int, int]:
    k, j, i = (int(v[len(v) // 2]) for v in np.nonzero(labels == PHANTOM_LABELS["liver"]))
    return k, j, i


def test_geometry_and_hu_match_the_phantom(tmp_path):
    series = write_phantom_series(tmp_path, SPEC)
    shuffled = list(series.files)
    random.Random(1).shuffle(shuffled)

    volume = load_series_volume(shuffled)

    assert volume.hu.shape == (24, 96, 80)
    np.testing.assert_allclose(volume.origin, series.slice_positions[0])
    np.testing.assert_allclose(volume.spacing, [4.5, 4.0, 6.0])
    np.testing.assert_allclose(volume.direction, np.eye(3), atol=1e-9)
    k, j, i = liver_voxel(series.labels)
    assert volume.hu[k, j, i] == series.hu[k, j, i] == pytest.approx(PHANTOM_HU["liver"], abs=1)
    expected_position = np.add(series.slice_positions[k], [i * 4.5, j * 4.0, 0])
    np.testing.assert_allclose(volume.index_to_patient((i, j, k)), expected_position)
    assert [s.sop_instance_uid for s in volume.slices] == series.sop_instance_uids


def test_slices_are_ordered_by_position_not_instance_number(tmp_path):
    series = write_phantom_series(tmp_path, replace(SPEC, slice_direction_sign=-1))
    for number, path in enumerate(series.files):
        dataset = pydicom.dcmread(path)
        dataset.InstanceNumber = (number * 7) % len(series.files) + 1  # scrambled numbering
        dataset.save_as(path)

    volume = load_series_volume(series.files)

    positions = [volume.index_to_patient((0, 0, k))[2] for k in range(volume.hu.shape[0])]
    assert positions == sorted(positions)
    np.testing.assert_allclose(volume.direction[:, 2], [0, 0, 1], atol=1e-9)
    k, j, i = liver_voxel(series.labels[::-1])  # the phantom wrote them head to feet
    assert volume.hu[k, j, i] == pytest.approx(PHANTOM_HU["liver"], abs=1)


@pytest.mark.parametrize("compression", ["jpeg2000", "jpegls", "rle", "deflate"])
def test_compressed_series_decode_to_the_same_volume(tmp_path, compression):
    plain = load_series_volume(write_phantom_series(tmp_path / "plain", SPEC).files)
    packed = load_series_volume(
        write_phantom_series(tmp_path / compression, replace(SPEC, compression=compression)).files
    )
    np.testing.assert_array_equal(plain.hu, packed.hu)


def test_enhanced_ct_multiframe_gives_the_same_volume(tmp_path):
    plain = load_series_volume(write_phantom_series(tmp_path / "plain", SPEC).files)
    enhanced = load_series_volume(write_phantom_series(tmp_path / "enhanced", replace(SPEC, enhanced=True)).files)
    np.testing.assert_array_equal(plain.hu, enhanced.hu)
    np.testing.assert_allclose(plain.origin, enhanced.origin)
    assert [s.frame_number for s in enhanced.slices] == list(range(1, 25))


def test_localizer_in_series_is_dropped_with_a_note(tmp_path):
    series = write_phantom_series(tmp_path, replace(SPEC, add_localizer=True))
    volume = load_series_volume(series.files, allow_partial=False)  # a dropped localizer is not a partial volume
    assert volume.hu.shape[0] == 24
    assert volume.notes == ["1 localizer image(s) left out of the volume"]
    assert volume.excluded_images == 0


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"gaps": (10, 11)}, "about 2 missing slice(s): slices 10 and 11 (by position) are 18.00 mm apart"),
        ({"gantry_tilt_degrees": 15.0}, "gantry tilt of about 15.0 degrees"),
        ({"slices": 1}, "single slice"),
    ],
)
def test_defects_are_refused_with_a_reason(tmp_path, change, reason):
    series = write_phantom_series(tmp_path, replace(SPEC, **change))
    with pytest.raises(VolumeError) as error:
        load_series_volume(series.files)
    assert reason in str(error.value)


AXIAL = (0.0, 0.0, 1.0)


def stack(steps: list[float], *, shifts: dict[int, tuple[float, float]] | None = None) -> np.ndarray:
    """Positions of an axial stack with these steps (mm); ``shifts`` moves slice k by (x, y) mm."""
    z = np.concatenate([[0.0], np.cumsum(steps)])
    points = np.column_stack([np.zeros_like(z), np.zeros_like(z), z])
    for k, (x, y) in (shifts or {}).items():
        points[k, :2] += (x, y)
    return points


def test_uneven_steps_that_add_up_to_a_drift_are_refused_though_each_is_within_tolerance():
    steps = [1.5] * 20 + [1.62] * 21  # each step within 10 % of the median; together 2.5 mm past a regular grid
    with pytest.raises(VolumeError) as error:
        check_slice_stack(stack(steps), AXIAL, pixel_spacing=0.8)
    assert str(error.value).startswith("non-uniform spacing: slice 21 (by position) lies 1.2")
    assert "the uneven steps add up, and volumes and contours would be wrong" in str(error.value)


def test_a_position_given_twice_names_the_two_images_and_where_they_are():
    points = stack([1.5, 1.5, 0.0, 1.5])
    with pytest.raises(VolumeError) as by_place:
        check_slice_stack(points, AXIAL, pixel_spacing=0.8)
    with pytest.raises(VolumeError) as by_label:
        check_slice_stack(points, AXIAL, pixel_spacing=0.8, labels=[f"instance {n}" for n in (4, 7, 9, 2, 5)])
    start = "1 slice position(s) occur twice in one acquisition: "
    assert (
        str(by_place.value)
        == start + "slices 3 and 4 (by position) are both at ImagePositionPatient (0.00, 0.00, 3.00)"
    )
    assert (
        str(by_label.value) == start + "instance 9 and instance 2 are both at ImagePositionPatient (0.00, 0.00, 3.00)"
    )


def test_a_slice_shifted_sideways_in_the_middle_is_refused():
    with pytest.raises(VolumeError) as error:
        check_slice_stack(stack([1.5] * 30, shifts={12: (2.0, 0.0)}), AXIAL, pixel_spacing=0.8)
    assert str(error.value).startswith(
        "slices are not stacked straight: slice 13 (by position) lies 2.00 mm beside the axis through the first "
        "slice along the slice normal (more than 0.40 mm)"
    )


def test_a_shear_under_the_gantry_tilt_angle_is_refused_once_it_moves_slices_half_a_pixel():
    tilt = np.tan(np.radians(0.3))  # below the 0.5 degree named gantry tilt; over 300 mm, 1.6 mm sideways
    points = stack([1.5] * 200)
    points[:, 1] = points[:, 2] * tilt
    with pytest.raises(VolumeError) as error:
        check_slice_stack(points, AXIAL, pixel_spacing=0.8)
    assert str(error.value).startswith("slices are not stacked straight: slice 201 (by position) lies 1.57 mm")
    assert check_slice_stack(points[:20], AXIAL, pixel_spacing=0.8) == pytest.approx(1.5)  # 0.15 mm: kept


def test_positions_rounded_by_the_scanner_make_a_regular_stack():
    rng = np.random.default_rng(7)
    points = stack([0.625] * 400, shifts=dict.fromkeys(range(0, 400, 7), (0.004, -0.004)))
    points = np.round(points + rng.uniform(-0.004, 0.004, points.shape), 2)  # two decimals, as some scanners write
    assert check_slice_stack(points, AXIAL, pixel_spacing=0.7) == pytest.approx(0.625, abs=1e-4)


def test_the_slice_step_is_the_first_to_last_distance_over_the_slices_between():
    assert check_slice_stack(stack([2.0, 2.1, 1.9, 2.0, 2.05]), AXIAL) == pytest.approx(10.05 / 5)


@pytest.mark.parametrize(
    ("keyword", "value", "reason"),
    [
        ("PixelSpacing", "abc\\0.8", "has PixelSpacing values that are not numbers"),
        ("PixelSpacing", "0\\0.8", "has PixelSpacing [0, 0.8]: spacing must be positive"),
        ("ImagePositionPatient", "0\\NaN\\3", "has ImagePositionPatient values that are not finite numbers"),
        ("ImageOrientationPatient", "1\\0\\0\\0\\1", "has 5 ImageOrientationPatient values, not 6"),
    ],
)
def test_unusable_geometry_values_are_refused_naming_image_and_attribute(tmp_path, keyword, value, reason):
    series = write_phantom_series(tmp_path, SPEC)
    dataset = pydicom.dcmread(series.files[2])
    placeholder = "9" * (len(value) - 2) + "\\9"  # a valid DS of the same length, swapped for the value below
    dataset[keyword] = pydicom.DataElement(dataset[keyword].tag, "DS", placeholder)
    dataset.save_as(series.files[2])
    raw = series.files[2].read_bytes()
    assert raw.count(placeholder.encode()) == 1
    series.files[2].write_bytes(raw.replace(placeholder.encode(), value.encode()))  # as a faulty modality writes it

    with pytest.raises(VolumeError) as error:
        load_series_volume(series.files)

    assert str(error.value) == f"image {dataset.InstanceNumber} (SOP Instance UID {dataset.SOPInstanceUID}) {reason}"


def test_mixed_orientations_are_refused(tmp_path):
    axial = write_phantom_series(tmp_path / "axial", SPEC)
    coronal = write_phantom_series(
        tmp_path / "coronal",
        replace(SPEC, orientation=(1, 0, 0, 0, 0, -1), slices=6, series_instance_uid=axial.series_instance_uid),
    )
    with pytest.raises(VolumeError, match="mixed orientations in one series"):
        load_series_volume(axial.files + coronal.files)


def test_missing_pixel_data_is_refused(tmp_path):
    series = write_phantom_series(tmp_path, SPEC)
    dataset = pydicom.dcmread(series.files[3])
    del dataset.PixelData
    dataset.save_as(series.files[3])
    with pytest.raises(VolumeError, match="has no pixel data"):
        load_series_volume(series.files)


def test_real_compressed_ct_has_the_geometry_of_totalsegmentators_label_map(shared_fixtures):
    import SimpleITK as sitk

    volume = load_series_volume(sorted((shared_fixtures / "example_ct_dicom_valid").glob("*.dcm")))
    labels = sitk.ReadImage(str(shared_fixtures / "example_seg_dicom.nii.gz"))

    assert volume.hu.shape[::-1] == labels.GetSize()
    np.testing.assert_allclose(volume.spacing, labels.GetSpacing())
    # Every voxel centre of the volume is a voxel centre of the label map.
    for index in [(0, 0, 0), (511, 0, 0), (0, 511, 19), (300, 200, 10)]:
        point = volume.index_to_patient(index)
        continuous = labels.TransformPhysicalPointToContinuousIndex(tuple(point))
        np.testing.assert_allclose(continuous, np.round(continuous), atol=1e-4)
    # And the anatomy agrees: TotalSegmentator's structures sit on the right HU.
    resampled = sitk.Resample(labels, volume.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    label_array = sitk.GetArrayFromImage(resampled)
    assert len(np.unique(label_array)) > 10
    vertebrae = np.isin(label_array, range(26, 51))  # vertebrae_S1 .. vertebrae_C1 in the total task
    assert vertebrae.any() and np.median(volume.hu[vertebrae]) > 150
    air_outside = label_array == 0
    assert np.median(volume.hu[air_outside]) < np.median(volume.hu[vertebrae])


def _series_with_a_repeat_acquisition(tmp_path):
    main = write_phantom_series(tmp_path / "main", SPEC)
    repeat = write_phantom_series(
        tmp_path / "repeat",
        replace(SPEC, slices=8, series_instance_uid=main.series_instance_uid),
    )
    for path in repeat.files:  # a short repeat acquisition over the same table positions
        dataset = pydicom.dcmread(path)
        dataset.AcquisitionNumber = 2
        dataset.save_as(path)
    return main, repeat


def test_second_acquisition_in_the_series_is_dropped_keeping_the_main_stack(tmp_path):
    main, repeat = _series_with_a_repeat_acquisition(tmp_path)

    volume = load_series_volume(main.files + repeat.files)

    assert volume.hu.shape[0] == 24
    assert [s.sop_instance_uid for s in volume.slices] == main.sop_instance_uids
    assert volume.notes == [
        "partial series: 2 acquisitions or matrix sizes in one series; processed the largest, 24 of 32 images "
        "(AcquisitionNumber 1, 96 x 80 at 4 x 4.5 mm)"
    ]
    assert volume.excluded_images == 8


def test_acquisitions_that_continue_one_another_make_one_volume(tmp_path):
    """Step-and-shoot: AcquisitionNumber goes up every 4 slices along one regular stack; nothing is left out."""
    series = write_phantom_series(tmp_path, SPEC)
    for number, path in enumerate(series.files):
        dataset = pydicom.dcmread(path)
        dataset.AcquisitionNumber = 1 + number // 4
        dataset.save_as(path)

    volume = load_series_volume(series.files)

    assert volume.hu.shape[0] == len(series.files)
    assert volume.notes == [] and volume.excluded_images == 0


def test_two_acquisitions_of_the_same_size_are_refused_whatever_order_the_images_arrived_in(tmp_path):
    """Two repeats of one stack, 12 images each: keeping either would be a choice by arrival order."""
    half = replace(SPEC, slices=12)
    first = write_phantom_series(tmp_path / "first", half)
    second = write_phantom_series(tmp_path / "second", replace(half, series_instance_uid=first.series_instance_uid))
    for path in second.files:
        dataset = pydicom.dcmread(path)
        dataset.AcquisitionNumber = 2
        dataset.save_as(path)

    for paths in (first.files + second.files, second.files + first.files):
        with pytest.raises(VolumeError) as error:
            load_series_volume(paths)

        assert str(error.value) == (
            "12 images of AcquisitionNumber 1, 96 x 80 at 4 x 4.5 mm; 12 images of AcquisitionNumber 2, 96 x 80 "
            "at 4 x 4.5 mm: two or more of the largest have 12 images each, so which one to process cannot be "
            "told (a choice by arrival order would be arbitrary); send each acquisition as its own series"
        )


def test_a_refusal_of_many_acquisitions_of_one_size_lists_six_and_counts_the_rest(tmp_path):
    """Eight repeats of one stack of 2: the reason named every group (1,484 characters for 24 in a probe)."""
    first = write_phantom_series(tmp_path / "0", replace(SPEC, slices=2))
    paths = list(first.files)
    for repeat in range(1, 8):
        again = write_phantom_series(
            tmp_path / str(repeat), replace(SPEC, slices=2, series_instance_uid=first.series_instance_uid)
        )
        for path in again.files:
            dataset = pydicom.dcmread(path)
            dataset.AcquisitionNumber = 1 + repeat
            dataset.save_as(path)
        paths += again.files

    with pytest.raises(VolumeError) as error:
        load_series_volume(paths)

    reason = str(error.value)
    assert reason.count("images of AcquisitionNumber") == 6
    assert "; and 2 more groups of 4 images: two or more of the largest have 2 images each" in reason


def test_interleaved_acquisitions_are_two_volumes_not_one_stack_at_half_the_step(tmp_path):
    """Two phases offset by half a step (acquisition 1 at 0, 6, 12 mm ..., acquisition 2 at 3, 9 mm ...):
    together they look like one regular 3 mm stack, but merging them would mix two moments in time."""
    series = write_phantom_series(tmp_path, replace(SPEC, slices=21, slice_spacing=3.0))
    for index, path in enumerate(series.files):
        dataset = pydicom.dcmread(path)
        dataset.AcquisitionNumber = 1 + index % 2
        dataset.save_as(path)

    volume = load_series_volume(series.files)

    assert [s.sop_instance_uid for s in volume.slices] == series.sop_instance_uids[::2]
    assert volume.spacing[2] == pytest.approx(6.0)
    assert volume.excluded_images == 10
    assert volume.notes == [
        "partial series: 2 acquisitions or matrix sizes in one series; processed the largest, 11 of 21 images "
        "(AcquisitionNumber 1, 96 x 80 at 4 x 4.5 mm)"
    ]


def test_orientation_rounded_off_unit_length_gives_unit_directions_and_true_distances(tmp_path):
    """A scanner writing 1.009 for 1 (within admission's 1 %) must not stretch the volume by 0.9 %."""
    series = write_phantom_series(tmp_path, SPEC)
    for path in series.files:
        dataset = pydicom.dcmread(path)
        dataset.ImageOrientationPatient = [1.009, 0, 0, 0.005, 1.009, 0]
        dataset.save_as(path)

    volume = load_series_volume(series.files)

    np.testing.assert_allclose(volume.direction.T @ volume.direction, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(volume.direction[:, 0], [1, 0, 0])
    corner = volume.index_to_patient((79, 0, 0))
    assert float(np.linalg.norm(corner - volume.origin)) == pytest.approx(79 * 4.5)


def test_orthonormal_directions_keep_the_row_and_square_the_column_to_it():
    row, column = orthonormal_directions([0, 2, 0, 0.1, 0.02, -0.99])  # the column leans 1.2 degrees to the row

    np.testing.assert_allclose(row, [0, 1, 0])
    assert float(np.dot(row, column)) == pytest.approx(0, abs=1e-12)
    assert float(np.linalg.norm(column)) == pytest.approx(1)
    np.testing.assert_allclose(column, np.array([0.1, 0, -0.99]) / np.linalg.norm([0.1, 0, -0.99]))


def test_partial_series_is_refused_when_partial_volumes_are_not_allowed(tmp_path):
    main, repeat = _series_with_a_repeat_acquisition(tmp_path)

    with pytest.raises(VolumeError) as error:
        load_series_volume(main.files + repeat.files, allow_partial=False)

    assert str(error.value) == (
        "partial series: 2 acquisitions or matrix sizes in one series; processed the largest, 24 of 32 images "
        "(AcquisitionNumber 1, 96 x 80 at 4 x 4.5 mm); a partial series is not processed (inference.partial_series is 'fail')"
    )


def test_missing_rescale_is_assumed_with_a_note(tmp_path):
    series = write_phantom_series(tmp_path, SPEC)
    for path in series.files[:3]:
        dataset = pydicom.dcmread(path)
        del dataset.RescaleSlope, dataset.RescaleIntercept
        dataset.save_as(path)

    volume = load_series_volume(series.files)

    assert volume.notes == ["RescaleSlope and RescaleIntercept missing on 3 image(s): assumed 1 and 0 (HU as stored)"]


def _real_ct_copy(shared_fixtures: Path, folder: Path) -> list[Path]:
    folder.mkdir()
    files = []
    for source in sorted((shared_fixtures / "example_ct_dicom_valid").glob("*.dcm")):
        files.append(folder / source.name)
        shutil.copyfile(source, files[-1])
    return files


def _replace_codestream(path: Path, change) -> pydicom.Dataset:
    """Rewrite the one JPEG 2000 fragment of ``path`` as ``change(codestream)``; returns the data set."""
    dataset = pydicom.dcmread(path)
    codestream = next(generate_frames(dataset.PixelData, number_of_frames=1))
    dataset.PixelData = encapsulate([change(codestream)])
    dataset.save_as(path)
    return dataset


def test_truncated_jpeg2000_codestream_fails_the_series_naming_the_image(shared_fixtures, tmp_path):
    files = _real_ct_copy(shared_fixtures, tmp_path / "ct")
    damaged = _replace_codestream(files[5], lambda stream: stream[: len(stream) // 2])

    with pytest.raises(VolumeError) as error:
        load_series_volume(files)

    assert str(error.value) == (
        f"image {damaged.InstanceNumber} (SOP Instance UID {damaged.SOPInstanceUID}) cannot be decoded: "
        "its JPEG 2000 Image Compression (Lossless Only) data is damaged or incomplete"
    )


def test_jpeg2000_codestream_of_another_size_fails_the_series_naming_the_image(shared_fixtures, tmp_path):
    files = _real_ct_copy(shared_fixtures, tmp_path / "ct")

    def halve_the_width(stream: bytes) -> bytes:  # SIZ marker: Xsiz is the 4 bytes after Lsiz and Rsiz
        siz = stream.index(b"\xff\x51")
        width = int.from_bytes(stream[siz + 6 : siz + 10], "big")
        return stream[: siz + 6] + (width // 2).to_bytes(4, "big") + stream[siz + 10 :]

    damaged = _replace_codestream(files[7], halve_the_width)

    with pytest.raises(VolumeError) as error:
        load_series_volume(files)

    # refused from the codestream's own header, before the decoder runs
    assert str(error.value) == (
        f"the JPEG 2000 data of image {damaged.InstanceNumber} (SOP Instance UID {damaged.SOPInstanceUID}) "
        f"is {damaged.Columns // 2} x {damaged.Rows} pixels, but its Columns and Rows say "
        f"{damaged.Columns} x {damaged.Rows}; it is not decoded"
    )


def test_pixel_data_cut_short_in_the_file_fails_the_series_naming_the_image(shared_fixtures, tmp_path):
    files = _real_ct_copy(shared_fixtures, tmp_path / "ct")
    victim = pydicom.dcmread(files[2], stop_before_pixels=True)
    files[2].write_bytes(files[2].read_bytes()[:-40000])

    with pytest.raises(VolumeError) as error:
        load_series_volume(files)

    assert str(error.value) == (
        f"image {victim.InstanceNumber} (SOP Instance UID {victim.SOPInstanceUID}) has incomplete pixel data "
        "(the file ends inside it)"
    )


@pytest.mark.parametrize("rows_said", [256, 511], ids=["half the rows", "one row fewer"])
def test_native_pixel_data_of_another_size_than_rows_and_columns_say_fails_naming_both_in_words(
    shared_fixtures, tmp_path, rows_said
):
    """Rows 32 over Pixel Data of 64 x 64 failed with pydicom's warning quoted: ``The number of bytes of pixel data
    is sufficient to contain 2 frames ... pass 'allow_excess_frames=False'``."""
    images = []
    for path in _real_ct_copy(shared_fixtures, tmp_path / "ct"):  # the export got Rows wrong in every image
        image = pydicom.dcmread(path)
        image.decompress()
        image.Rows = rows_said
        image.save_as(path)
        images.append(image)

    with pytest.raises(VolumeError) as error:
        load_series_volume([Path(image.filename) for image in images])

    named = [image for image in images if f"(SOP Instance UID {image.SOPInstanceUID})" in str(error.value)]
    assert len(named) == 1, str(error.value)
    assert str(error.value) == (
        f"the Pixel Data of image {named[0].InstanceNumber} (SOP Instance UID {named[0].SOPInstanceUID}) holds "
        f"{512 * 512 * 2:,} bytes, but its Rows {rows_said} x Columns 512 x SamplesPerPixel 1 x BitsAllocated 16/8 need "
        f"{rows_said * 512 * 2:,}: read with these values the image would be wrong (a wrong Rows or Columns shears "
        "it), so the series is not processed; correct the export, or send the scanner's original images"
    )


def test_non_finite_values_fail_the_series_naming_the_image(tmp_path):
    series = write_phantom_series(tmp_path, SPEC)
    dataset = pydicom.dcmread(series.files[4])
    dataset.RescaleSlope = "1e400"  # overflows to infinity
    dataset.save_as(series.files[4])

    with pytest.raises(VolumeError) as error:
        load_series_volume(series.files)

    assert str(error.value) == (
        f"image {dataset.InstanceNumber} (SOP Instance UID {dataset.SOPInstanceUID}) has pixel values that are "
        "not finite numbers after rescaling"
    )


def _pad_corners(path: Path, value: int, *, unsigned: bool) -> None:
    """A 4 x 4 block of padding in the image's corner, declared with PixelPaddingValue."""
    dataset = pydicom.dcmread(path)
    pixels = dataset.pixel_array.astype(np.uint16 if unsigned else np.int16)
    pixels[:4, :4] = value
    dataset.PixelRepresentation = 0 if unsigned else 1
    dataset.PixelData = pixels.tobytes()
    dataset.add_new("PixelPaddingValue", "US" if unsigned else "SS", value)
    dataset.save_as(path)


def test_padding_that_would_read_as_bone_is_read_as_air_with_a_note(tmp_path):
    series = write_phantom_series(tmp_path, SPEC)
    for path in series.files:
        _pad_corners(path, 63536, unsigned=True)  # 62,512 HU with the intercept of -1024

    volume = load_series_volume(series.files)

    assert (volume.hu[:, :4, :4] == -1024).all()
    assert volume.hu.max() < 3000
    assert volume.notes == [
        f"{16 * SPEC.slices} padding pixel(s) (PixelPaddingValue 63536, outside the reconstructed field) would "
        "read as 62512 HU; they were read as air (-1024 HU)"
    ]


def test_padding_below_air_is_left_as_totalsegmentator_reads_it(tmp_path):
    series = write_phantom_series(tmp_path, SPEC)
    for path in series.files:
        _pad_corners(path, -2000, unsigned=False)

    volume = load_series_volume(series.files)

    assert (volume.hu[:, :4, :4] == -3024).all() and volume.notes == []


def test_padding_that_reads_as_tissue_is_refused(tmp_path):
    """Padding 1024 with the intercept of -1024 reads 0 HU: every pixel of water would be taken for padding."""
    series = write_phantom_series(tmp_path, SPEC)
    for path in series.files:
        _pad_corners(path, 1024, unsigned=False)

    with pytest.raises(VolumeError) as error:
        load_series_volume(series.files)

    assert str(error.value).endswith(
        "its padding (PixelPaddingValue 1024) reads as 0 HU, a value of the patient's tissue: those pixels would be "
        "taken for the area outside the field and read as air; correct the padding value in the export"
    )


def test_pixels_that_cannot_read_as_air_are_not_hounsfield_units(tmp_path):
    """Unsigned 12-bit pixels with RescaleIntercept 0 read 0 to 4,095: air would read as water, soft tissue as
    bone; the model and the mean HU would be silently wrong."""
    series = write_phantom_series(tmp_path, SPEC)
    for path in series.files:
        dataset = pydicom.dcmread(path)
        dataset.PixelData = (dataset.pixel_array.astype(np.int32) + 1024).clip(0, 4095).astype(np.uint16).tobytes()
        dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 12, 11, 0
        dataset.RescaleIntercept = "0"
        dataset.save_as(path)

    with pytest.raises(VolumeError) as error:
        load_series_volume(series.files)

    assert str(error.value).endswith(
        "has RescaleSlope 1 and RescaleIntercept 0 (top level); with unsigned 12-bit pixels its values start at 0 HU, "
        "so it cannot show air (-1,000 HU or below, around every patient): these are not Hounsfield units (a wrong "
        "RescaleIntercept, or PixelRepresentation); send the scanner's original reconstruction"
    )


@pytest.mark.parametrize(
    ("slope", "reason"),
    [
        ("-1", "has RescaleSlope -1 (top level); CT values rise with density, so the slope must be positive"),
        ("1000000", "after RescaleSlope and RescaleIntercept, beyond any CT (over 70,000 HU)"),
        ("0.000001", "has RescaleSlope 1e-06 (top level); with BitsStored 16 its pixel values span at most 0.0655 HU"),
    ],
)
def test_a_rescale_that_cannot_give_hu_is_refused(tmp_path, slope, reason):
    series = write_phantom_series(tmp_path, SPEC)
    for path in series.files:
        dataset = pydicom.dcmread(path)
        dataset.RescaleSlope = slope
        dataset.save_as(path)

    with pytest.raises(VolumeError) as error:
        load_series_volume(series.files)

    assert reason in str(error.value)


def test_a_ct_whose_rescale_intercept_leaves_no_air_or_fat_is_refused_not_segmented(tmp_path, shared_fixtures):
    """TotalSegmentator's real slices told RescaleIntercept 0 (pixels stored as HU + 1024 read as HU): air would
    read as water and every structure and volume would be wrong. As sent, they load."""
    sources = sorted((shared_fixtures / "example_ct_dicom_valid").glob("*.dcm"))[:4]
    assert load_series_volume(sources).hu.min() <= -1000
    shifted = []
    for path in sources:
        dataset = pydicom.dcmread(path)
        stored = dataset.pixel_array.astype(np.int16)  # HU + 1024, as the scanner stored them
        dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        dataset.PixelRepresentation, dataset.BitsStored, dataset.HighBit = 1, 16, 15  # signed: could read as air
        dataset.PixelData, dataset.RescaleIntercept = stored.tobytes(), "0"
        shifted.append(tmp_path / path.name)
        dataset.save_as(shifted[-1], enforce_file_format=True)
    with pytest.raises(VolumeError) as refused:
        load_series_volume(shifted)
    assert str(refused.value).startswith(
        "no pixel inside the field reads as air or fat (-1500 to -100 HU) in 1,048,576 pixels, as no CT of a body "
        "can: its values are not HU as read, most likely because RescaleIntercept (0 on image "
    )
    assert str(refused.value).endswith(") or PixelRepresentation is wrong")


def test_acquisitions_that_follow_one_another_are_refused_for_their_gap_not_for_being_many(tmp_path):
    """One AcquisitionNumber per slice (as some scanners write) and one slice missing: the reason names the gap,
    not 7 acquisitions of one image each."""
    series = write_phantom_series(tmp_path / "ct", replace(SPEC, slices=8))
    for number, path in enumerate(series.files, start=1):
        dataset = pydicom.dcmread(path)
        dataset.AcquisitionNumber = number
        dataset.save_as(path)
    kept = [path for index, path in enumerate(series.files) if index != 3]
    with pytest.raises(VolumeError) as refused:
        load_series_volume(kept)
    assert str(refused.value) == (
        "about 1 missing slice(s): slices 3 and 4 (by position) are 12.00 mm apart, the series' usual step is "
        "6.00 mm (the series' 7 acquisitions follow one another along the slices, so they were checked as one stack)"
    )


def test_orientations_a_little_apart_are_one_orientation_whichever_group_is_larger(tmp_path):
    """Cosines 0.0004 and 0.0013 (0.0009 apart, inside the 0.001 tolerance): one orientation for an 11/9 split
    and for a 9/11 one, not refused one way round and admitted the other."""
    from inference.volume import differing_orientations

    low, high = [1, 0, 0.0004, 0, 1, 0], [1, 0, 0.0013, 0, 1, 0]
    assert differing_orientations([low] * 11 + [high] * 9) == []
    assert differing_orientations([low] * 9 + [high] * 11) == []
    assert differing_orientations([low] * 11 + [[1, 0, 0.0025, 0, 1, 0]] * 9) == list(range(11, 20))


def test_a_position_too_far_sideways_is_refused_too(tmp_path):
    """x = 1e20 mm: too far for any sub-millimetre offset to survive in the arithmetic, whatever the normal."""
    positions = [[1e20, 0.0, 6.0 * k] for k in range(4)]
    with pytest.raises(VolumeError, match="more than 100,000 mm from the scanner's origin"):
        check_slice_stack(positions, [0.0, 0.0, 1.0])


def _turned(degrees: float, about: str = "z") -> tuple[float, ...]:
    """ImageOrientationPatient of axial images turned ``degrees`` about the patient's head-foot axis (``z``), or of
    coronal images turned about the left-right axis (``x``), as an oblique reconstruction writes it."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return (c, s, 0.0, -s, c, 0.0) if about == "z" else (1.0, 0.0, 0.0, 0.0, s, -c)


@pytest.mark.parametrize(
    "orientation",
    [(-1, 0, 0, 0, -1, 0), (1, 0, 0, 0, 0, -1), (0, 1, 0, 0, 0, -1), _turned(5)],
    ids=["prone", "coronal", "sagittal", "5-degrees"],
)
def test_images_in_the_patients_axes_whatever_their_position_carry_no_oblique_note(tmp_path, orientation):
    series = write_phantom_series(tmp_path, replace(SPEC, orientation=orientation))
    assert not [note for note in load_series_volume(series.files).notes if "oblique" in note]


@pytest.mark.parametrize(("orientation", "angle"), [(_turned(20), 20), (_turned(-25, about="x"), 25)])
def test_images_a_little_oblique_are_segmented_with_a_note_saying_so(tmp_path, orientation, angle):
    series = write_phantom_series(tmp_path, replace(SPEC, orientation=orientation))
    [note] = [note for note in load_series_volume(series.files).notes if "oblique" in note]
    assert note.startswith(f"the images are turned about {angle} degrees from the patient's axes"), note
    assert note.endswith("check the result, left and right especially"), note


@pytest.mark.parametrize(("orientation", "angle"), [(_turned(44), 44), (_turned(46), 44), (_turned(135), 45)])
def test_oblique_images_past_30_degrees_are_refused_naming_the_angle(tmp_path, orientation, angle):
    """Near 45 degrees the nearest patient axes swap: the model would see the anatomy turned by up to 45 degrees
    either way, and could take one side for the other."""
    series = write_phantom_series(tmp_path, replace(SPEC, orientation=orientation))
    with pytest.raises(VolumeError) as error:
        load_series_volume(series.files)
    assert str(error.value).startswith(f"the images are turned about {angle} degrees from the patient's axes"), error
    assert "could take one side of the body for the other; send an axial reconstruction" in str(error.value)


def test_images_whose_orientation_does_not_match_their_positions_are_refused_saying_so(tmp_path):
    """Coronal images whose header says axial: every slice is at one depth along the axial normal, at different
    places. The reason says the orientation or the positions are wrong, not that an image was sent twice."""
    series = write_phantom_series(tmp_path, replace(SPEC, orientation=(1, 0, 0, 0, 0, -1)))
    for path in series.files:
        dataset = pydicom.dcmread(path)
        dataset.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        dataset.save_as(path)
    with pytest.raises(VolumeError) as error:
        load_series_volume(series.files)
    reason = str(error.value)
    assert "lie at the same depth along the slice normal [0, 0, 1] that ImageOrientationPatient gives" in reason
    assert reason.endswith("so their ImageOrientationPatient or their ImagePositionPatient is wrong"), reason
    assert "occur twice" not in reason


def test_a_series_with_megabytes_of_private_data_per_image_is_read_without_holding_it(tmp_path):
    """Each image carries a 4 MB private element beside its pixel data: the volume and the results' source headers
    once held every one at a time (a 200-image series took 1.9 GB in the worker, past admission's memory limit)."""
    import tracemalloc

    from dicom_node.encode.results import _sources_and_frames
    from dicom_node.phantom import PhantomSpec, write_phantom_series

    series = write_phantom_series(tmp_path / "ct", PhantomSpec(rows=16, columns=16, slices=12))
    big = 4 * 1024 * 1024
    for path in series.files:
        dataset = pydicom.dcmread(path)
        dataset.private_block(0x0099, "PROBE", create=True).add_new(0x01, "OB", b"\x01" * big)
        dataset.save_as(path)

    tracemalloc.start()
    try:
        volume = load_series_volume(series.files)
        labels = np.zeros((len(volume.slices), 16, 16), dtype=np.uint8)
        sources, _ = _sources_and_frames(volume, labels, [])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(sources) == 12 and not any(element.tag.is_private for source in sources for element in source)
    assert peak < 3 * big  # one image read whole at a time (its pixels), never all twelve private values
