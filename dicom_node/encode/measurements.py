"""Per-structure measurements from a label map: volume (ml), mean and SD of attenuation (HU).

A structure within three voxels of the first or last slice of the scanned range or of the side
of the image (TotalSegmentator's own rule), or touching the edge of the reconstructed field, is cut
by the edge of the scan: its volume is
that of the part scanned, not of the whole organ, and it is flagged so that reports never
present it as a whole-organ volume. Outside the field are the pixels the images mark as
padding (PixelPaddingValue, whatever they read as) and any reading below tissue (-2000 HU or
lower). A model never labels them, so a structure cut by the field stops beside them: lying
on or next to one (in the slice, diagonals too) is touching the edge. Where a scanner writes
air (-1024 HU) outside its field and marks no padding, that edge cannot be told from air
around the patient and is not seen. Voxels outside the field are no tissue: they are left
out of the mean and SD.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inference.volume import Volume


@dataclass(frozen=True)
class StructureMeasurement:
    label: int
    name: str
    voxels: int
    volume_ml: float
    mean_hu: float | None  # None: no voxel of the structure lies inside the reconstructed field
    sd_hu: float | None
    cut_by_scan_edge: bool


def measure(volume: Volume, labels: np.ndarray, classes: dict[int, str]) -> list[StructureMeasurement]:
    """Measurements of every structure present in ``labels`` (same grid as ``volume.hu``), slice by slice."""
    size = max(int(labels.max()) + 1, 1)
    counts, tissue_counts = np.zeros(size, dtype=np.int64), np.zeros(size, dtype=np.int64)
    sums, squares = np.zeros(size), np.zeros(size)
    at_edge = _labels_at_edge(labels)
    for k in range(labels.shape[0]):
        plane = labels[k].astype(np.intp)
        outside = outside_field(volume, k)
        tissue, hu = plane[~outside], volume.hu[k][~outside].astype(np.float64)
        counts += np.bincount(plane.ravel(), minlength=size)
        tissue_counts += np.bincount(tissue, minlength=size)
        sums += np.bincount(tissue, weights=hu, minlength=size)
        squares += np.bincount(tissue, weights=hu * hu, minlength=size)
        if outside.any():
            at_edge.update(np.unique(plane[beside(outside)]).tolist())
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    results = []
    for label in np.flatnonzero(counts):
        if label == 0 or int(label) not in classes:
            continue
        n = int(counts[label])
        measured = int(tissue_counts[label])
        mean = sums[label] / measured if measured else None
        sd = float(np.sqrt(max(squares[label] / measured - mean * mean, 0.0))) if mean is not None else None
        results.append(
            StructureMeasurement(
                label=int(label),
                name=classes[int(label)],
                voxels=n,
                volume_ml=n * voxel_ml,
                mean_hu=float(mean) if mean is not None else None,
                sd_hu=sd,
                cut_by_scan_edge=int(label) in at_edge,
            )
        )
    return results


OUTSIDE_FIELD_HU = -2000.0
"""At or below this a voxel is padding outside the reconstructed field (air reads -1000 HU, noise a little lower)."""


def outside_field(volume: Volume, k: int) -> np.ndarray:
    """Slice k's pixels outside the reconstructed field: marked as padding, or reading at or below -2000 HU."""
    return volume.padding_mask(k) | (volume.hu[k] <= OUTSIDE_FIELD_HU)


def beside(mask: np.ndarray) -> np.ndarray:
    """The pixels of a 2D ``mask`` and their eight neighbours in the slice."""
    near = mask.copy()
    near[1:] |= mask[:-1]
    near[:-1] |= mask[1:]
    wide = near.copy()
    wide[:, 1:] |= near[:, :-1]
    wide[:, :-1] |= near[:, 1:]
    return wide


EDGE_MARGIN_VOXELS = 3
"""A structure this close to the first or last slice, or to the side of the image, may be cut by it: the
models segment the last slices of a scan poorly (TotalSegmentator leaves such structures out of its own
statistics by the same rule)."""


def _labels_at_edge(labels: np.ndarray) -> set[int]:
    """Labels within :data:`EDGE_MARGIN_VOXELS` of the first or last slice, or of the image's sides."""
    m = EDGE_MARGIN_VOXELS
    faces = (labels[:m], labels[-m:], labels[:, :m, :], labels[:, -m:, :], labels[:, :, :m], labels[:, :, -m:])
    return set().union(*(np.unique(face).tolist() for face in faces))


def write_measurements_json(
    path: Path, measurements: list[StructureMeasurement], algorithm: dict[str, Any] | None = None
) -> None:
    """The figures of the SR as JSON: ``{"algorithm": {...}, "structures": {name: {...}}}``.

    ``algorithm`` names what made them (model, version, weights identity).
    """
    structures = {m.name: {k: v for k, v in asdict(m).items() if k != "name"} for m in measurements}
    path.write_text(json.dumps({"algorithm": algorithm or {}, "structures": structures}, indent=2))
