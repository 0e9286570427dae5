"""The job's preview PNG: CT in a soft-tissue window on black, each structure outlined (not filled) in its colour."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicom_node.encode.preview import TILE_PIXELS, outlines, write_preview
from dicom_node.phantom import PHANTOM_LABELS, PhantomSpec, write_phantom_series
from inference.volume import Volume, load_series_volume

LUNG_LEFT = (71, 232, 244)
FIVE_MM = PhantomSpec(pixel_spacing=(5.0, 5.0), slice_spacing=5.0, noise_sd=0.0)
ACQUISITIONS = {
    "head-first-supine": replace(FIVE_MM, rows=48, columns=64, slices=32, orientation=(1, 0, 0, 0, 1, 0)),
    "feet-first-supine": replace(FIVE_MM, rows=48, columns=64, slices=32, orientation=(-1, 0, 0, 0, 1, 0)),
    "coronal": replace(FIVE_MM, rows=32, columns=64, slices=48, orientation=(1, 0, 0, 0, 0, -1)),
}
"""One phantom sampled on one grid (x 64, y 48, z 32 voxels of 5 mm, centred on it), acquired three ways: axial
with slices towards the head, axial with slices towards the feet (the image mirrored left to right), coronal."""


def _volume_with_a_box(tmp_path):
    """A 20-slice water block (40 HU) in air with a 10-voxel cube labelled lung_left."""
    hu = np.full((20, 64, 64), -1000.0, dtype=np.float32)
    hu[:, 8:56, 8:56] = 40.0
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[5:15, 20:40, 20:40] = 1
    volume = Volume(
        hu=hu,
        origin=np.zeros(3),
        spacing=np.array([2.0, 2.0, 2.0]),
        direction=np.eye(3),
        slices=[],
        frame_of_reference_uid=None,
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
    )
    return write_preview(tmp_path / "preview.png", volume, labels, {1: "lung_left"})


def test_outlines_mark_the_rim_of_each_structure_and_leave_its_inside_alone():
    labels = np.zeros((20, 20), dtype=np.int32)
    labels[5:15, 5:15] = 3
    edge = outlines(labels, thickness=2)
    assert edge[5, 10] and edge[6, 10] and not edge[7, 10]  # two pixels thick, inside the structure
    assert not edge[10, 10] and not edge[4, 10] and not edge[0, 0]  # not its middle, not the background


def test_preview_outlines_structures_over_a_soft_tissue_window(tmp_path):
    pixels = np.asarray(Image.open(_volume_with_a_box(tmp_path)).convert("RGB")).astype(int)
    assert pixels.shape == (TILE_PIXELS, 5 * TILE_PIXELS, 3)
    axial = pixels[:, TILE_PIXELS : 2 * TILE_PIXELS]  # the middle axial slice: the cube spans rows/columns 20-39
    centre, rim = axial[120, 120], axial[80, 120]  # 64 voxels -> 256 pixels: voxel 20 starts at pixel 80
    assert tuple(rim) == LUNG_LEFT, "the structure's edge is drawn in its display colour"
    assert tuple(centre) == (127, 127, 127), "inside the outline the CT shows through (40 HU at level 40, width 400)"
    assert tuple(axial[10, 10]) == (0, 0, 0), "air is black: readable on a dark screen"
    coloured = (np.abs(axial - axial[..., :1]) > 10).any(axis=2)
    assert coloured.sum() < 0.2 * (80 * 80), "an outline, not a filled overlay"


def _preview_of(folder: Path, spec: PhantomSpec) -> np.ndarray:
    """The preview of a phantom series written with ``spec``, its true structures outlined."""
    series = write_phantom_series(folder, spec)
    volume = load_series_volume(series.files)
    stack_index = dict(zip(series.sop_instance_uids, series.slice_indices, strict=True))
    labels = series.labels[[stack_index[ref.sop_instance_uid] for ref in volume.slices]]
    classes = {label: name for name, label in PHANTOM_LABELS.items()}
    return np.asarray(Image.open(write_preview(folder / "preview.png", volume, labels, classes)).convert("RGB"))


def _centre_of(tile: np.ndarray, colour: tuple[int, int, int]) -> tuple[float, float]:
    """Where a colour is drawn in a tile: (column, row), from the tile's centre."""
    rows, columns = np.nonzero(np.all(tile == colour, axis=-1))
    assert rows.size, f"{colour} is not drawn"
    return columns.mean() - TILE_PIXELS / 2, rows.mean() - TILE_PIXELS / 2


@pytest.mark.parametrize("acquisition", ACQUISITIONS)
def test_the_preview_shows_the_patient_in_radiological_convention_whatever_the_acquisition(tmp_path, acquisition):
    """Slices towards the feet drew the coronal and sagittal tiles upside down; a coronal acquisition drew coronal
    planes as the "axial" tiles. Now every acquisition gives the head-first axial one's preview."""
    reference = _preview_of(tmp_path / "reference", ACQUISITIONS["head-first-supine"])
    preview = _preview_of(tmp_path / acquisition, ACQUISITIONS[acquisition])

    tiles = [preview[:, n * TILE_PIXELS : (n + 1) * TILE_PIXELS] for n in range(5)]
    for axial in tiles[1:3]:
        assert _centre_of(axial, LUNG_LEFT)[0] > 0, "the patient's left is on the image's right"
    column, row = _centre_of(tiles[3], LUNG_LEFT)
    assert column > 0 and row < 0, "coronal: the patient's left on the image's right, the lungs (head end) up"
    np.testing.assert_array_equal(preview, reference)
