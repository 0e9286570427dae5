"""The job's preview PNG: CT in a soft-tissue window on black, each structure outlined (not filled) in its colour."""

from __future__ import annotations

import numpy as np
from PIL import Image

from dicom_node.encode.preview import TILE_PIXELS, outlines, write_preview
from inference.volume import Volume

LUNG_LEFT = (71, 232, 244)


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
