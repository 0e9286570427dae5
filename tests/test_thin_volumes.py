"""A CT stack thinner than the model's grid: refused with its extent in words, not an unexpected error.

TotalSegmentator resamples a series to its model's grid (3 mm for total_fast) before nnU-Net sees it; an axis
shorter than half a voxel of that grid rounds to no voxel, where nnU-Net's preprocessing stops on an empty array.
The model says so first, naming the axis and its extent (``scripts/build_test_weights.py``'s random total_fast
weights: the network's output does not matter here, only whether and why it runs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from db.models import JobState
from dicom_node.phantom import PhantomSpec, write_phantom_series
from inference.models import SegmentationFailed
from inference.volume import load_series_volume
from tests.conftest import require_extra, storescu

require_extra("nnunetv2")
require_extra("totalsegmentator")

pytestmark = pytest.mark.integration

THREE_HALF_MILLIMETRE_SLICES = PhantomSpec(rows=32, columns=32, slices=3, pixel_spacing=(3.0, 3.0), slice_spacing=0.5)
THIN_SLAB_REASON = (
    "the volume is 1.5 mm long along the slice axis (3 slices 0.5 mm apart), less than one voxel of the model's "
    "3 mm grid: resampled to it, TotalSegmentator total_fast would have nothing to segment"
)


@pytest.fixture(scope="module")
def model(total_fast_test_weights):
    from inference.models.totalsegmentator import TotalSegmentatorModel

    return TotalSegmentatorModel("total_fast", total_fast_test_weights, device="cpu", backend="torch")


def phantom_volume(folder: Path, spec: PhantomSpec):
    return load_series_volume(write_phantom_series(folder, spec).files)


def test_a_received_stack_thinner_than_the_grid_fails_naming_its_extent(tmp_path, start_node, total_fast_test_weights):
    series = write_phantom_series(tmp_path / "ct", THREE_HALF_MILLIMETRE_SLICES)
    node = start_node(
        models={
            "ts-fast": {
                "kind": "totalsegmentator",
                "task": "total_fast",
                "weights_directory": str(total_fast_test_weights),
                "backend": "torch",  # no OpenVINO conversion (minutes on 2 cores): the check runs before either
            }
        },
        rules=[{"name": "ct", "match": {"modality": "CT"}, "action": "process", "model": "ts-fast"}],
        inference={"workers": 1, "device": "cpu"},
    )

    assert storescu(node.port, series.files).returncode == 0

    node.wait_for_state(series.series_instance_uid, JobState.FAILED, timeout=300)
    assert node.job_reason(series.series_instance_uid) == THIN_SLAB_REASON  # not "an unexpected error in stage segment"


def test_images_narrower_than_the_grid_name_both_axes(model, tmp_path):
    spec = PhantomSpec(rows=64, columns=64, slices=10, pixel_spacing=(0.02, 0.02), slice_spacing=3.0)

    with pytest.raises(SegmentationFailed) as failure:
        model.segment(phantom_volume(tmp_path / "ct", spec))
    assert str(failure.value) == (
        "the volume is 1.28 mm wide across the images' columns (64 columns of 0.02 mm) and 1.28 mm high down the "
        "images' rows (64 rows of 0.02 mm), less than one voxel of the model's 3 mm grid: resampled to it, "
        "TotalSegmentator total_fast would have nothing to segment"
    )


def test_a_stack_resampled_to_a_single_voxel_is_still_segmented(model, tmp_path):
    """Two slices 1 mm apart (2 mm, two thirds of a 3 mm voxel) keep one voxel: nnU-Net pads it to its patch."""
    spec = PhantomSpec(rows=32, columns=32, slices=2, pixel_spacing=(3.0, 3.0), slice_spacing=1.0)

    labels = model.segment(phantom_volume(tmp_path / "ct", spec)).labels

    assert labels.shape == (2, 32, 32)


@pytest.mark.parametrize(
    "slices, step",
    [(3, 0.5), (2, 0.75), (5, 0.3), (2, 0.7), (3, 0.6), (2, 1.0), (2, 2.25), (4, 0.375)],
)
def test_the_shape_foreseen_is_the_one_totalsegmentator_resamples_to(tmp_path, slices, step):
    """The check runs before resampling: its voxel counts are exactly TotalSegmentator's, rounding halves included
    (1.5 mm at a 3 mm grid is no voxel, 4.5 mm two)."""
    from totalsegmentator.alignment import as_closest_canonical
    from totalsegmentator.resampling import change_spacing

    from inference.models.totalsegmentator import resampled_shape

    spec = PhantomSpec(rows=8, columns=9, slices=slices, pixel_spacing=(1.5, 0.5), slice_spacing=step)
    image = phantom_volume(tmp_path / "ct", spec).to_nibabel()

    resampled = change_spacing(as_closest_canonical(image), [3.0] * 3, order=1, dtype=np.int32, nr_cpus=1)

    assert sorted(resampled_shape(image, 3.0)) == sorted(resampled.shape)
