"""Per-structure measurements from a label map: volume (ml), mean and SD of attenuation (HU).

A structure that touches the first or last slice of the scanned range is cut by
the edge of the scan: its volume is that of the part scanned, not of the whole
organ, and it is flagged so that reports never present it as a whole-organ volume.
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
    mean_hu: float
    sd_hu: float
    cut_by_scan_edge: bool


def measure(volume: Volume, labels: np.ndarray, classes: dict[int, str]) -> list[StructureMeasurement]:
    """Measurements of every structure present in ``labels`` (same grid as ``volume.hu``)."""
    flat = labels.ravel().astype(np.int64)
    hu = volume.hu.ravel().astype(np.float64)
    size = max(int(flat.max()) + 1, 1)
    counts = np.bincount(flat, minlength=size)
    sums = np.bincount(flat, weights=hu, minlength=size)
    squares = np.bincount(flat, weights=hu * hu, minlength=size)
    at_edge = set(np.unique(labels[0]).tolist()) | set(np.unique(labels[-1]).tolist())
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    results = []
    for label in np.flatnonzero(counts):
        if label == 0 or int(label) not in classes:
            continue
        n = int(counts[label])
        mean = sums[label] / n
        variance = max(squares[label] / n - mean * mean, 0.0)
        results.append(
            StructureMeasurement(
                label=int(label),
                name=classes[int(label)],
                voxels=n,
                volume_ml=n * voxel_ml,
                mean_hu=float(mean),
                sd_hu=float(np.sqrt(variance)),
                cut_by_scan_edge=int(label) in at_edge,
            )
        )
    return results


def write_measurements_json(
    path: Path, measurements: list[StructureMeasurement], algorithm: dict[str, Any] | None = None
) -> None:
    """The figures of the SR as JSON: ``{"algorithm": {...}, "structures": {name: {...}}}``.

    ``algorithm`` names what made them (model, version, weights identity).
    """
    structures = {m.name: {k: v for k, v in asdict(m).items() if k != "name"} for m in measurements}
    path.write_text(json.dumps({"algorithm": algorithm or {}, "structures": structures}, indent=2))
