"""TotalSegmentator's nnU-Net models, run in memory with nnU-Net's predictor and kept resident.

The steps are TotalSegmentator's own (``totalsegmentator.nnunet.nnUNet_predict_image``),
done on arrays instead of temporary NIfTI files and worker processes:

1. canonical (RAS) orientation: ``totalsegmentator.alignment.as_closest_canonical``;
2. resampling to the model spacing (3 mm fast, 1.5 mm total), linear, cast to int32:
   ``totalsegmentator.resampling.change_spacing(order=1, dtype=int32)``;
3. nnU-Net's predictor with TotalSegmentator's settings (step 0.8, Gaussian weighting,
   no mirroring) through ``predict_single_npy_array``; the five ``total`` part models are
   merged with TotalSegmentator's class maps, later parts winning where they overlap;
4. nearest-neighbour resampling back to the CT grid and undoing the reorientation.

Using TotalSegmentator's resampling and orientation functions keeps the label map
voxel-identical to TotalSegmentator's (tests/test_totalsegmentator_parity.py).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from inference.models import ModelUnavailable, Segmentation
from inference.models.checkpoints import UnsafeWeights, initialize_predictor
from inference.volume import Volume
from inference.weights import WeightsCorrupt, WeightsMissing, identify, model_folders

LOG = logging.getLogger(__name__)
TASK_SPACING_MM = {"total": 1.5, "total_fast": 3.0}


class TotalSegmentatorModel:
    """The ``total`` (five 1.5 mm models) or ``total_fast`` (one 3 mm model) task."""

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
            folders = model_folders(task, weights_directory)
            self.weights = identify(task, folders)
        except (WeightsMissing, WeightsCorrupt) as exc:
            raise ModelUnavailable(str(exc)) from None
        try:
            with _quiet():  # nnU-Net prints path notices at import; they are not ours to show
                import torch
                from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
                from totalsegmentator.map_to_binary import class_map, class_map_5_parts, map_taskid_to_partname_ct
        except ImportError as exc:
            raise ModelUnavailable(
                f"the totalsegmentator model needs torch, nnunetv2 and totalsegmentator installed: {exc}"
            ) from None
        self.task = task
        self.spacing_mm = TASK_SPACING_MM[task]
        self.device = _choose_device(torch, device)
        torch.set_num_threads(cpu_threads or os.cpu_count() or 1)
        self.classes: dict[int, str] = dict(class_map["total"])
        self.algorithm_name = f"TotalSegmentator {task}"
        # The weights, not the Python package, decide what a result says: name them exactly.
        self.algorithm_version = self.weights.version
        self.software_versions = {
            "totalsegmentator": _package_version("totalsegmentator"),
            "nnunetv2": _package_version("nnunetv2"),
            "torch": _package_version("torch"),
        }
        self.is_test_weights = self.weights.test_weights
        self.predictors = []
        for folder in folders:
            with _quiet():  # "perform_everything_on_device ... only supported for cuda" on CPU
                predictor = nnUNetPredictor(
                    tile_step_size=tile_step_size,
                    use_gaussian=True,
                    use_mirroring=False,
                    perform_everything_on_device=True,
                    device=self.device,
                    verbose=False,
                    verbose_preprocessing=False,
                    allow_tqdm=False,
                )
            try:
                initialize_predictor(predictor, folder.path)
            except UnsafeWeights as exc:
                raise ModelUnavailable(str(exc)) from None
            lookup = None
            if task == "total":
                part = map_taskid_to_partname_ct[folder.dataset_id]
                lookup = _part_lookup(class_map_5_parts[part], self.classes)
            self.predictors.append((predictor, lookup))

    def segment(self, volume: Volume) -> Segmentation:
        from totalsegmentator.alignment import as_closest_canonical, undo_canonical
        from totalsegmentator.resampling import change_spacing

        timings: dict[str, float] = {}
        started = time.perf_counter()
        image = volume.to_nibabel()
        canonical = as_closest_canonical(image)
        spacing = [self.spacing_mm] * 3
        resampled = change_spacing(canonical, spacing, order=1, dtype=np.int32, nr_cpus=1)
        network_input = np.asanyarray(resampled.dataobj).transpose(2, 1, 0)[None].astype(np.float32)
        properties = {"spacing": [float(z) for z in resampled.header.get_zooms()[:3]][::-1]}
        timings["resample"] = time.perf_counter() - started

        started = time.perf_counter()
        combined = np.zeros(network_input.shape[1:], dtype=np.uint8)
        for predictor, lookup in self.predictors:
            part = np.asarray(predictor.predict_single_npy_array(network_input, properties, None, None, False))
            part = part.astype(np.uint8)
            if lookup is None:
                combined = part
            else:
                mapped = lookup[part]
                np.copyto(combined, mapped, where=mapped != 0)
        timings["predict"] = time.perf_counter() - started

        started = time.perf_counter()
        import nibabel as nib

        prediction = nib.Nifti1Image(combined.transpose(2, 1, 0), resampled.affine)
        back = change_spacing(
            prediction, spacing, canonical.shape, order=0, dtype=np.uint8, nr_cpus=1, force_affine=canonical.affine
        )
        original = undo_canonical(back, image)
        labels = np.asanyarray(original.dataobj).astype(np.uint8).transpose(2, 1, 0)
        timings["postprocess"] = time.perf_counter() - started
        return Segmentation(np.ascontiguousarray(labels), dict(self.classes), timings)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep a library's prints off the node's output; they go to the DEBUG log instead."""
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        yield
    for line in captured.getvalue().splitlines():
        if line.strip():
            LOG.debug("library output: %s", line.strip())


def _choose_device(torch, device: str):
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ModelUnavailable("inference.device is cuda but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


def _part_lookup(part_map: dict[int, str], classes: dict[int, str]) -> np.ndarray:
    """Part-model label -> total-task label, TotalSegmentator's way (a lookup table)."""
    by_name = {name: number for number, name in classes.items()}
    lookup = np.zeros(max(part_map) + 1, dtype=np.uint8)
    for local, name in part_map.items():
        lookup[local] = by_name[name]
    return lookup


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"
