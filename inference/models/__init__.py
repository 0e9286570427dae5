"""Segmentation models: a registry from config.yaml names to loaded, resident models."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from inference.volume import Volume
from inference.weights import WeightsIdentity


@dataclass
class Segmentation:
    """A label map on the volume's grid (``labels[k, j, i]``) and what its values mean."""

    labels: np.ndarray
    classes: dict[int, str]
    timings: dict[str, float] = field(default_factory=dict)


class SegmentationModel(Protocol):
    """What the worker needs of a model; models are loaded once and reused for every job."""

    algorithm_name: str
    algorithm_version: str  # for trained models: the weights' identity (dataset ids and SHA-256)
    is_baseline: bool
    is_test_weights: bool  # the weights describe themselves as synthetic/untrained: never clinical
    classes: dict[int, str]

    @property
    def weights(self) -> WeightsIdentity | None:
        """The weights' identity; None for models without weights (the baseline)."""

    def segment(self, volume: Volume) -> Segmentation: ...


def run_parameters(model: SegmentationModel) -> dict[str, str]:
    """How the model computes its results: device, backend, precision, the sliding window's step and whether it
    mirrors (none of them for a model without a network), and the package whose class map names the labels.

    The results say it (SEG and SR algorithm parameters, measurements.json): BF16 and FP32 label maps may
    differ in a few boundary voxels, and a step of 0.5 labelled a quarter of a CT's voxels otherwise than 0.8, so a
    result names what made it; the structure names and codes come from the installed totalsegmentator package, so
    a result names its version.
    """
    found = {key: getattr(model, key, None) for key in ("device", "backend", "precision", "tile_step_size")}
    parameters = {key: str(value) for key, value in found.items() if value is not None}
    mirroring = getattr(model, "use_mirroring", None)
    if mirroring is not None:
        parameters["mirroring"] = "on" if mirroring else "off"
    names_from = (getattr(model, "software_versions", None) or {}).get("totalsegmentator")
    if names_from:
        parameters["labels"] = f"totalsegmentator {names_from}"
    return parameters


class ModelUnavailable(RuntimeError):
    """A configured model cannot be loaded (e.g. weights missing); the message says how to fix it."""


class SegmentationFailed(RuntimeError):
    """The model ran but gave no label map to trust for this series; the message says why, for the job's reason."""


HALF_PRECISION_OVERFLOW = (
    "the model's summed outputs for this series overflowed half precision (the sliding window adds the tiles' "
    "weighted logits in 16-bit floats, as nnU-Net does), so there is no label map to trust; these weights "
    "cannot segment this series"
)


def load_model(
    settings, weights_directory: Path, device: str = "auto", cpu_threads: int | None = None, name: str | None = None
) -> SegmentationModel:
    """Build the model a ``models:`` entry (named ``name``) describes."""
    if settings.kind == "threshold":
        from inference.models.threshold import ThresholdModel

        return ThresholdModel()
    if settings.kind == "totalsegmentator":
        from inference.models.totalsegmentator import TotalSegmentatorModel

        folder = settings.weights_directory or weights_directory
        return TotalSegmentatorModel(
            settings.task,
            folder,
            device=device,
            cpu_threads=cpu_threads,
            tile_step_size=settings.tile_step_size,
            backend=settings.backend,
            precision=settings.precision,
            model_name=name if settings.weights_directory else None,
        )
    raise ModelUnavailable(f"unknown model kind {settings.kind!r}")
