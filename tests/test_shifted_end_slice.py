"""One slice shifted sideways is named as that slice wherever it lies in the stack, never as gantry tilt; a stack
sheared from end to end, as a tilted gantry makes it, is still named gantry tilt. Admission and the volume agree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.admission import InstanceFile, admit
from dicom_node.config import AdmissionSettings
from inference.volume import VolumeError, check_slice_stack, load_series_volume
from tests.conftest import real_ct_copy

STRICT = AdmissionSettings()
AXIAL = (0.0, 0.0, 1.0)
NOT_STRAIGHT = (
    "slices are not stacked straight: slice {slice} (by position) lies 2.00 mm beside the axis through {axis} along "
    "the slice normal (more than {allowed} mm); a sheared or shifted stack is not resampled: reconstruct the series "
    "on the scanner and send it again"
)


def shift_sideways(path: Path, mm: float) -> None:
    ds = pydicom.dcmread(path)
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    ds.ImagePositionPatient = [x + mm, y, z]
    ds.save_as(path)


def refusals(paths: list[Path]) -> tuple[str | None, str]:
    """What admission and the volume say of the series: both must refuse it."""
    files = []
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        files.append(
            InstanceFile(path, str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID), int(ds.InstanceNumber))
        )
    with pytest.raises(VolumeError) as refused:
        load_series_volume(paths)
    return admit(files, STRICT).refusal, str(refused.value)


@pytest.mark.parametrize(
    ("place", "slice", "axis"),
    [(0, 1, "slice 2"), (-1, 20, "the first slice"), (10, 11, "the first slice")],
    ids=["first", "last", "middle"],
)
def test_a_real_ct_with_one_slice_shifted_2mm_names_that_slice_wherever_it_lies(
    tmp_path, shared_fixtures, place, slice, axis
):
    paths = real_ct_copy(tmp_path / "ct", shared_fixtures)
    shift_sideways(paths[place], 2.0)

    admission, volume = refusals(paths)

    assert volume == NOT_STRAIGHT.format(slice=slice, axis=axis, allowed="0.49")
    assert admission == volume


def test_any_one_slice_shifted_sideways_is_named_and_never_called_gantry_tilt():
    for count in (4, 5, 12, 31):
        for place in range(count):
            points = np.column_stack([np.zeros(count), np.zeros(count), np.arange(count) * 1.5])
            points[place, :2] += (-1.2, 1.6)  # 2 mm
            with pytest.raises(VolumeError) as error:
                check_slice_stack(points, AXIAL, pixel_spacing=0.8)
            axis = "slice 2" if place == 0 else "the first slice"
            assert str(error.value) == NOT_STRAIGHT.format(slice=place + 1, axis=axis, allowed="0.40"), (count, place)


@pytest.mark.parametrize("shifted", [None, 0, 9, 19])
def test_a_stack_sheared_from_end_to_end_is_gantry_tilt_even_with_one_slice_off_its_line(shifted):
    points = np.column_stack([np.zeros(20), np.zeros(20), np.arange(20) * 2.0])
    points[:, 1] = points[:, 2] * np.tan(np.radians(7.0))  # every slice offset in proportion to its depth
    if shifted is not None:
        points[shifted, 0] += 2.0
    with pytest.raises(VolumeError) as error:
        check_slice_stack(points, AXIAL, pixel_spacing=0.8)
    assert str(error.value) == (
        "gantry tilt of about 7.0 degrees (slices are sheared): not resampled; reconstruct the series without tilt "
        "on the scanner and send it again"
    )


def test_half_the_stack_moved_sideways_is_named_where_it_moves_not_gantry_tilt():
    points = np.column_stack([np.zeros(20), np.zeros(20), np.arange(20) * 2.0])
    points[10:, 0] += 2.0  # slices 11 to 20 lie 2 mm to the side: a jump, not a shear
    with pytest.raises(VolumeError) as error:
        check_slice_stack(points, AXIAL, pixel_spacing=0.8)
    assert str(error.value) == NOT_STRAIGHT.format(slice=11, axis="the first slice", allowed="0.40")
