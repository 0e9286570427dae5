"""The baseline model: body, lungs and bones from HU thresholds and connected components.

It needs no weights, so a fresh node works end to end; it is labelled as a
baseline wherever it appears (algorithm name, SR, logs) and is never used in
place of a missing TotalSegmentator model. Its per-slice steps work in the
patient's axial planes and its left/right split on patient coordinates, so an
axial, coronal or sagittal acquisition of the same anatomy gives the same result.
"""

from __future__ import annotations

import time
from importlib.metadata import PackageNotFoundError, version

import numpy as np
from scipy import ndimage

from inference.models import Segmentation
from inference.volume import Volume

BODY_HU = -500.0
LUNG_HU = -400.0
BONE_HU = 250.0


def _package_version() -> str:
    """The installed dicom-node's version (this package imports nothing from the node itself)."""
    try:
        return version("dicom-node")
    except PackageNotFoundError:
        return "unknown"


CLASSES = {1: "body", 2: "lung_left", 3: "lung_right", 4: "skeleton"}


class ThresholdModel:
    """HU-threshold baseline (not a trained model)."""

    algorithm_name = "dicom-node threshold baseline (not a trained model)"
    algorithm_version = _package_version()
    is_baseline = True
    is_test_weights = False
    weights = None
    classes = CLASSES

    def segment(self, volume: Volume) -> Segmentation:
        started = time.perf_counter()
        hu = volume.hu
        axial = _axial_axis(volume)
        body = _largest_component(hu > BODY_HU)
        body = _fill_holes_per_axial_slice(body, axial)
        air_inside = (hu < LUNG_HU) & body
        lungs = _drop_small(_open_in_plane(air_inside, axial), minimum_ml=50, voxel_ml=_voxel_ml(volume))
        bone = (hu > BONE_HU) & body
        labels = np.zeros(hu.shape, dtype=np.uint8)
        labels[body] = 1
        labels[bone] = 4
        left, right = _split_left_right(lungs, body, volume)
        labels[left] = 2
        labels[right] = 3
        return Segmentation(labels, dict(CLASSES), {"predict": time.perf_counter() - started})


def _voxel_ml(volume: Volume) -> float:
    return float(np.prod(volume.spacing)) / 1000.0


def _largest_component(mask: np.ndarray) -> np.ndarray:
    components, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def _axial_axis(volume: Volume) -> int:
    """The array axis of ``volume.hu`` (0 slice, 1 row, 2 column) closest to the patient's head-feet axis.

    Column c of ``direction`` is the step of array axis 2 - c (column index, row index, slice index)."""
    return 2 - int(np.argmax(np.abs(volume.direction[2])))


def _fill_holes_per_axial_slice(mask: np.ndarray, axial: int) -> np.ndarray:
    """Fill holes in each of the patient's axial planes (array axis ``axial`` fixed), whatever the acquisition."""
    planes = np.moveaxis(mask, axial, 0)
    return np.moveaxis(np.stack([ndimage.binary_fill_holes(plane) for plane in planes]), 0, axial)


def _open_in_plane(mask: np.ndarray, axial: int) -> np.ndarray:
    """Binary opening with a 3 x 3 square in the patient's axial planes."""
    shape = [3, 3, 3]
    shape[axial] = 1
    return ndimage.binary_opening(mask, structure=np.ones(shape, dtype=bool))


def _drop_small(mask: np.ndarray, minimum_ml: float, voxel_ml: float) -> np.ndarray:
    components, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(components.ravel())
    keep = np.flatnonzero(sizes * voxel_ml >= minimum_ml)
    keep = keep[keep != 0]
    return np.isin(components, keep)


def _patient_x(volume: Volume, mask: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    k, j, i = np.nonzero(mask)
    steps = np.vstack([i * volume.spacing[0], j * volume.spacing[1], k * volume.spacing[2]])
    return volume.origin[0] + volume.direction[0] @ steps, (k, j, i)


def _split_left_right(lungs: np.ndarray, body: np.ndarray, volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """Assign each lung component to the side of the body's midline its centre lies on (+x is patient left)."""
    if not lungs.any():
        return lungs, lungs
    body_x, _ = _patient_x(volume, body)
    midline = float(np.median(body_x))
    components, count = ndimage.label(lungs)
    lung_x, index = _patient_x(volume, lungs)
    owner = components[index]
    left = np.zeros_like(lungs)
    for component in range(1, count + 1):
        if float(np.mean(lung_x[owner == component])) > midline:
            left |= components == component
    return left, lungs & ~left
