"""A PNG per job for operators: axial, coronal and sagittal slices with each structure outlined.

The CT is shown in a soft-tissue window (W 400, L 40) on black, readable on a dark reading-room
screen; each structure is drawn as a solid outline in its display colour, so the anatomy under
it stays visible (a filled overlay would hide what the reader checks the contour against).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dicom_node.encode.codes import UnknownStructure, structure_codes
from inference.volume import Volume

WINDOW_HU = (-160.0, 240.0)
"""Soft-tissue window: level 40 HU, width 400 HU."""
OUTLINE_PIXELS = 2
"""Thickness of each structure's outline on the 256-pixel tile, drawn inside the structure."""
TILE_PIXELS = 256
UNKNOWN_COLOUR = (255, 255, 0)


def write_preview(path: Path, volume: Volume, labels: np.ndarray, classes: dict[int, str]) -> Path:
    """Three axial slices (at 25, 50, 75 % of the range, feet to head), the middle coronal and sagittal, in one row.

    Whatever plane and direction the series was acquired in, the tiles are drawn in the patient's axes and in
    radiological convention: the patient's left on the image's right, anterior up in the axial tiles, the head up
    in the coronal and sagittal ones (anterior on the image's left in the sagittal one)."""
    colours = _colour_table(classes, int(labels.max()))
    ct, label_map, spacing = _in_patient_axes(volume, labels)
    left, back, up = ct.shape  # indexed [x, y, z]: towards the patient's left, back and head
    views = [(ct[:, :, z].T, label_map[:, :, z].T, spacing[1], spacing[0]) for z in (up // 4, up // 2, 3 * up // 4)]
    views.append((ct[:, back // 2, :].T[::-1], label_map[:, back // 2, :].T[::-1], spacing[2], spacing[0]))
    views.append((ct[left // 2, :, :].T[::-1], label_map[left // 2, :, :].T[::-1], spacing[2], spacing[1]))
    tiles = [_tile(hu, lab, colours, row_mm, column_mm) for hu, lab, row_mm, column_mm in views]
    sheet = Image.new("RGB", (TILE_PIXELS * len(tiles), TILE_PIXELS))
    for index, tile in enumerate(tiles):
        sheet.paste(tile, (index * TILE_PIXELS + (TILE_PIXELS - tile.width) // 2, (TILE_PIXELS - tile.height) // 2))
    sheet.save(path, format="PNG")
    return path


def _in_patient_axes(volume: Volume, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CT and the label map indexed [x, y, z] (DICOM's LPS: towards the patient's left, back and head) along
    the patient axes nearest the volume's own, and the spacing (mm) along each."""
    import nibabel as nib  # imported here, as by the volume

    affine = np.eye(4)
    affine[:3, :3] = volume.direction * volume.spacing
    turn = nib.orientations.io_orientation(affine)  # per array axis (column, row, slice): its LPS axis and sign
    spacing = np.empty(3)
    spacing[turn[:, 0].astype(int)] = volume.spacing
    return (
        nib.orientations.apply_orientation(volume.hu.transpose(2, 1, 0), turn),
        nib.orientations.apply_orientation(labels.transpose(2, 1, 0), turn),
        spacing,
    )


def _colour_table(classes: dict[int, str], largest: int) -> np.ndarray:
    table = np.zeros((max(largest, max(classes, default=0)) + 1, 3), dtype=np.uint8)
    table[1:] = UNKNOWN_COLOUR
    for label, name in classes.items():
        try:
            table[label] = structure_codes(name).rgb
        except UnknownStructure:
            table[label] = UNKNOWN_COLOUR
    return table


def outlines(labels: np.ndarray, thickness: int = OUTLINE_PIXELS) -> np.ndarray:
    """Pixels of each labelled structure within ``thickness`` pixels (4-neighbourhood) of another label."""
    height, width = labels.shape
    padded = np.pad(labels, thickness, mode="edge")
    edge = np.zeros(labels.shape, dtype=bool)
    for distance in range(1, thickness + 1):
        for dy, dx in ((distance, 0), (-distance, 0), (0, distance), (0, -distance)):
            neighbour = padded[thickness + dy : thickness + dy + height, thickness + dx : thickness + dx + width]
            edge |= neighbour != labels
    return edge & (labels > 0)


def _tile(hu: np.ndarray, labels: np.ndarray, colours: np.ndarray, row_mm: float, column_mm: float) -> Image.Image:
    low, high = WINDOW_HU
    grey = (np.clip((hu - low) / (high - low), 0, 1) * 255.0).astype(np.uint8)
    height_mm, width_mm = hu.shape[0] * row_mm, hu.shape[1] * column_mm
    scale = TILE_PIXELS / max(height_mm, width_mm)
    size = (max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))
    image = Image.fromarray(grey).resize(size, Image.Resampling.BILINEAR).convert("RGB")
    shown = np.asarray(Image.fromarray(labels.astype(np.int32)).resize(size, Image.Resampling.NEAREST))
    rgb = np.array(image)
    edge = outlines(shown)  # at display resolution, so every outline is equally thick
    rgb[edge] = colours[shown[edge]]
    return Image.fromarray(rgb)
