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
    """Three axial slices (at 25, 50, 75 % of the range), the middle coronal and sagittal, in one row."""
    colours = _colour_table(classes, int(labels.max()))
    depth, rows, columns = labels.shape
    views = [
        (volume.hu[k], labels[k], volume.spacing[1], volume.spacing[0])
        for k in (depth // 4, depth // 2, 3 * depth // 4)
    ]
    views.append(
        (volume.hu[:, rows // 2, :][::-1], labels[:, rows // 2, :][::-1], volume.spacing[2], volume.spacing[0])
    )
    views.append(
        (volume.hu[:, :, columns // 2][::-1], labels[:, :, columns // 2][::-1], volume.spacing[2], volume.spacing[1])
    )
    tiles = [_tile(hu, lab, colours, row_mm, column_mm) for hu, lab, row_mm, column_mm in views]
    sheet = Image.new("RGB", (TILE_PIXELS * len(tiles), TILE_PIXELS))
    for index, tile in enumerate(tiles):
        sheet.paste(tile, (index * TILE_PIXELS + (TILE_PIXELS - tile.width) // 2, (TILE_PIXELS - tile.height) // 2))
    sheet.save(path, format="PNG")
    return path


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
