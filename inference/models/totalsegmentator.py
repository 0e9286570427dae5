"""TotalSegmentator's nnU-Net models run in memory with nnU-Net's predictor, resident between jobs."""

from __future__ import annotations

from pathlib import Path

from inference.models import ModelUnavailable, Segmentation
from inference.volume import Volume
from inference.weights import WeightsMissing, model_folders


class TotalSegmentatorModel:
    """The `total` (five 1.5 mm models) or `total_fast` (one 3 mm model) task."""

    is_baseline = False

    def __init__(
        self,
        task: str,
        weights_directory: Path,
        *,
        device: str = "auto",
        cpu_threads: int | None = None,
        tile_step_size: float = 0.8,
    ) -> None:
        try:
            self.folders = model_folders(task, weights_directory)
        except WeightsMissing as exc:
            raise ModelUnavailable(str(exc)) from None
        self.task = task
        self.algorithm_name = f"TotalSegmentator {task}"
        self.algorithm_version = "2"
        raise ModelUnavailable("the TotalSegmentator predictor is not wired in yet")

    def segment(self, volume: Volume) -> Segmentation:  # pragma: no cover - see __init__
        raise NotImplementedError
