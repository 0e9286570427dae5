"""A PNG per job for operators: axial, coronal and sagittal slices with the segmentation overlaid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dicom_node.encode.codes import UnknownStructure, structure_codes
from inference.volume import Volume

WINDOW_HU = (-400.0, 600.0)
OVERLAY_ALPHA = 0.45
TILE_PIXELS = 256


def write_preview(path: Path, volume: Volume, labels: np.ndarray, classes: dict[int, str]) -> Path:
    """Three axial slices (at 25, 50, 75 % of the range), the middle coronal and sagittal, in one row."""
    colours = _colour_table(classes, int(labels.max()))
    depth, rows, columns = labels.shape
    views = [(volume.hu[k], labels[k], volume.spacing[1], volume.spacing[0]) for k in (depth // 4, depth // 2, 3 * depth // 4)]
    views.append((volume.hu[:, rows // 2, :][::-1], labels[:, rows // 2, :][::-1], volume.spacing[2], volume.spacing[0]))
    views.append((volume.hu[:, :, columns // 2][::-1], labels[:, :, columns // 2][::-1], volume.spacing[2], volume.spacing[1]))
    tiles = [_tile(hu, lab, colours, row_mm, column_mm) for hu, lab, row_mm, column_mm in views]
    sheet = Image.new("RGB", (TILE_PIXELS * len(tiles), TILE_PIXELS))
    for index, tile in enumerate(tiles):
        sheet.paste(tile, (index * TILE_PIXELS + (TILE_PIXELS - tile.width) // 2, (TILE_PIXELS - tile.height) // 2))
    sheet.save(path, format="PNG")
    return path


def _colour_table(classes: dict[int, str], largest: int) -> np.ndarray:
    table = np.zeros((max(largest, max(classes, default=0)) + 1, 3), dtype=np.float32)
    for label, name in classes.items():
        try:
            table[label] = structure_codes(name).rgb
        except UnknownStructure:
            table[label] = (255, 255, 0)
    return table


def _tile(hu: np.ndarray, labels: np.ndarray, colours: np.ndarray, row_mm: float, column_mm: float) -> Image.Image:
    low, high = WINDOW_HU
    grey = np.clip((hu - low) / (high - low), 0, 1)[..., None] * 255.0
    rgb = np.repeat(grey, 3, axis=2)
    mask = labels > 0
    rgb[mask] = (1 - OVERLAY_ALPHA) * rgb[mask] + OVERLAY_ALPHA * colours[labels[mask]]
    image = Image.fromarray(rgb.astype(np.uint8))
    height_mm, width_mm = hu.shape[0] * row_mm, hu.shape[1] * column_mm
    scale = TILE_PIXELS / max(height_mm, width_mm)
    size = (max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))
    return image.resize(size, Image.Resampling.NEAREST)
