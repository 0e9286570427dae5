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

Backends for the network forward passes (``backend``): ``torch`` (nnU-Net's own), or
``openvino`` on the CPU (``inference.models.openvino_backend``: the network converted once and
cached next to the weights, compiled at ``precision`` fp32, bf16 or auto); ``auto`` (the
configuration's default) is OpenVINO on the CPU where it is installed, PyTorch elsewhere. Everything around the
forward passes stays nnU-Net's and TotalSegmentator's (tests/test_openvino_parity.py). On CUDA
the network always runs in PyTorch, everything on the device (nnU-Net's autocast), with
TotalSegmentator's GPU resampling where cupy and cuCIM are installed (as TotalSegmentator does).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inference.models import HALF_PRECISION_OVERFLOW, ModelUnavailable, Segmentation, SegmentationFailed
from inference.models.checkpoints import UnsafeWeights, initialize_predictor, labels_problem
from inference.models.not_a_number import NotANumber, guard_tiles
from inference.volume import Volume
from inference.weights import (
    ModelFolder,
    WeightsCorrupt,
    WeightsMissing,
    identify,
    imports_held_off,
    model_folders,
    record_loaded_folder,
    recover_interrupted_imports,
)

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
        backend: str = "torch",
        precision: str = "auto",
        model_name: str | None = None,
    ) -> None:
        try:
            recover_interrupted_imports(weights_directory)  # weights a killed import left aside
            with imports_held_off(weights_directory):  # an import waits: the folders identified are of one release
                folders = model_folders(task, weights_directory, model=model_name)  # the name: its own weights folder
                self.weights = identify(task, folders)
        except (WeightsMissing, WeightsCorrupt) as exc:
            raise ModelUnavailable(str(exc)) from None
        try:
            with _quiet():  # nnU-Net prints path notices at import; they are not ours to show
                import torch
                from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
                from totalsegmentator.map_to_binary import class_map
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
        backend = _resolve_backend(backend, self.device.type)
        self.backend = backend
        # What the forward passes compute in: PyTorch on the CPU in FP32; on CUDA nnU-Net's autocast (FP16 where safe).
        self.precision = "fp32" if self.device.type == "cpu" else "autocast-fp16"
        if backend == "openvino":
            self.software_versions["openvino"] = _package_version("openvino")
        self.is_test_weights = self.weights.test_weights
        self.tile_step_size = tile_step_size  # the results name both: each changes the label map
        self.use_mirroring = False
        self.predictors = []
        compiled: list[OpenVINOPrecisions] = []
        for folder, identified in zip(folders, self.weights.folder_hashes, strict=True):
            with _quiet():  # "perform_everything_on_device ... only supported for cuda" on CPU
                predictor = nnUNetPredictor(
                    tile_step_size=tile_step_size,
                    use_gaussian=True,
                    use_mirroring=self.use_mirroring,
                    perform_everything_on_device=True,
                    device=self.device,
                    verbose=False,
                    verbose_preprocessing=False,
                    allow_tqdm=False,
                )
            try:
                loaded = initialize_predictor(predictor, folder.path)
            except UnsafeWeights as exc:
                raise ModelUnavailable(str(exc)) from None
            if loaded != identified:
                raise ModelUnavailable(
                    f"the weight files in {folder.path} changed while the {task} model was loading (a weights "
                    "import at the same time?), so the results could not say which weights made them; it was not "
                    "loaded: start the worker again"
                )
            lookup = _check_folder(predictor, folder, task)
            if folder.path in self.weights.unrecorded:
                record_loaded_folder(folder.path, loaded)  # put in place by hand: recorded once it loads
            if backend == "openvino":
                compiled.append(_use_openvino(predictor, folder, loaded, precision, cpu_threads, self.spacing_mm))
            else:
                guard_tiles(predictor)
            self.predictors.append((predictor, lookup))
        if compiled:
            self.precision = _one_precision(compiled, [predictor for predictor, _ in self.predictors])

    def _weights_name(self, dataset: str) -> str:
        """How a reason names the weights of one part model: ``Dataset297 sha256:<16 digits>``, or for a part of
        ``total`` ``Dataset292 of Dataset291-295 sha256:<16 digits>``."""
        if len(self.weights.datasets) == 1:
            return self.weights.version
        return f"{dataset.split('_', 1)[0]} of {self.weights.version}"

    def segment(self, volume: Volume) -> Segmentation:
        from totalsegmentator.alignment import as_closest_canonical, undo_canonical
        from totalsegmentator.resampling import change_spacing

        timings: dict[str, float] = {}
        started = time.perf_counter()
        image = volume.to_nibabel()
        too_thin = thinner_than_grid(volume, resampled_shape(image, self.spacing_mm), self.spacing_mm)
        if too_thin is not None:
            raise SegmentationFailed(
                f"{too_thin}: resampled to it, {self.algorithm_name} would have nothing to segment"
            )
        canonical = as_closest_canonical(image)
        spacing = [self.spacing_mm] * 3
        use_gpu = self.device.type == "cuda"  # TotalSegmentator's own choice: cuCIM resampling when installed
        resampled = change_spacing(canonical, spacing, order=1, dtype=np.int32, nr_cpus=1, use_gpu=use_gpu)
        network_input = np.asanyarray(resampled.dataobj).transpose(2, 1, 0)[None].astype(np.float32)
        properties = {"spacing": [float(z) for z in resampled.header.get_zooms()[:3]][::-1]}
        timings["resample"] = time.perf_counter() - started

        started = time.perf_counter()
        combined = np.zeros(network_input.shape[1:], dtype=np.uint8)
        for (predictor, lookup), dataset in zip(self.predictors, self.weights.datasets, strict=True):
            part = predict_label_map(predictor, network_input, properties, self._weights_name(dataset))
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
            prediction,
            spacing,
            canonical.shape,
            order=0,
            dtype=np.uint8,
            nr_cpus=1,
            force_affine=canonical.affine,
            use_gpu=use_gpu,
        )
        original = undo_canonical(back, image)
        labels = np.asanyarray(original.dataobj).astype(np.uint8).transpose(2, 1, 0)
        timings["postprocess"] = time.perf_counter() - started
        return Segmentation(np.ascontiguousarray(labels), dict(self.classes), timings)


VOLUME_AXES = (
    ("wide", "across the images' columns", "columns of {spacing} mm"),
    ("high", "down the images' rows", "rows of {spacing} mm"),
    ("long", "along the slice axis", "slices {spacing} mm apart"),
)
"""How a sentence names the volume's axes in the NIfTI image's order (column, row, slice): its extent, the axis,
and what the extent is made of."""


def resampled_shape(image: Any, spacing_mm: float) -> tuple[int, ...]:
    """The voxels along each axis of ``image`` (a NIfTI image) once TotalSegmentator's ``change_spacing`` resamples
    it to ``spacing_mm``: each axis' voxels times its zoom, rounded half to even, as scipy's and cuCIM's resizing
    round them, the header's float32 zooms divided in float64 as ``change_spacing`` divides them (5 slices 0.3 mm
    apart keep one 3 mm voxel: 0.3 is a hair over in float32). Reorienting to RAS only reorders the axes, so the
    counts are those of the canonical image too."""
    zooms = np.asarray(image.header.get_zooms()[:3], dtype=np.float64) / np.float64(spacing_mm)
    return tuple(int(np.round(count * zoom)) for count, zoom in zip(image.shape[:3], zooms, strict=True))


def thinner_than_grid(volume: Volume, resampled: tuple[int, ...], spacing_mm: float) -> str | None:
    """Where the volume has no voxel left along an axis once resampled (``resampled``, in the NIfTI image's order)
    to the model's grid, the sentence naming that axis and its extent; None where every axis keeps one or more."""
    counts = volume.hu.shape[::-1]  # hu is [k, j, i]; the NIfTI image and the spacing are (i, j, k)
    thin = []
    for axis, voxels in enumerate(resampled):
        if voxels < 1:
            size, where, made_of = VOLUME_AXES[axis]
            spacing = float(volume.spacing[axis])
            extent = counts[axis] * spacing
            thin.append(f"{extent:.3g} mm {size} {where} ({counts[axis]} {made_of.format(spacing=f'{spacing:.3g}')})")
    if not thin:
        return None
    return f"the volume is {' and '.join(thin)}, less than one voxel of the model's {spacing_mm:g} mm grid"


NNUNET_OVERFLOW_MESSAGE = "Encountered inf in predicted array"
"""How nnU-Net 2.6's sliding window begins its error when the FP16 sum of the tiles' logits overflows."""


def predict_label_map(predictor: Any, image: np.ndarray, properties: dict[str, Any], weights: str) -> np.ndarray:
    """One nnU-Net model's label map of ``image`` (no mirroring); logits that overflow or are not numbers are
    SegmentationFailed, with a reason naming ``weights`` (dataset id and hash) where they made the NaN."""
    try:
        return np.asarray(predictor.predict_single_npy_array(image, properties, None, None, False))
    except NotANumber as exc:
        raise SegmentationFailed(exc.reason(weights)) from None
    except RuntimeError as exc:
        if str(exc).startswith(NNUNET_OVERFLOW_MESSAGE):
            raise SegmentationFailed(HALF_PRECISION_OVERFLOW) from exc
        raise


@dataclass(frozen=True)
class OpenVINOPrecisions:
    """One network compiled for OpenVINO: the precision it runs in, and its FP32 compilation."""

    used: str
    fp32: Any


def _one_precision(compiled: list[OpenVINOPrecisions], predictors: list[Any]) -> str:
    """The precision every network of the task runs in. Each of the ``total`` task's five networks is checked
    for BF16 on its own; where they disagree, all run in FP32, so the results name the precision of every part."""
    used = {part.used for part in compiled}
    if len(used) == 1:
        return used.pop()
    from inference.models.openvino_backend import OpenVINONetwork, use_streams

    LOG.info(
        "Not every network of this model kept its labels in BF16 (%s): all of them run in FP32.",
        ", ".join(part.used for part in compiled),
    )
    for predictor, part in zip(predictors, compiled, strict=True):
        predictor.network = OpenVINONetwork(part.fp32, "fp32")
        use_streams(predictor)
    return "fp32"


def load_refusal(folder: ModelFolder, task: str) -> str | None:
    """Why the model would refuse to load this trainer folder of ``task`` (:func:`check_loadable`), or None."""
    try:
        check_loadable(folder, task)
    except ModelUnavailable as exc:
        return str(exc)
    return None


def check_loadable(folder: ModelFolder, task: str) -> None:
    """Run the checks a model runs when it loads on one trainer folder of ``task``, on the CPU, and keep nothing:
    ``weights import`` refuses what the node would refuse to load before it installs anything.

    Raises
    ------
    ModelUnavailable
        With the sentence the model's load would give.
    """
    try:
        with _quiet():
            import torch
            import totalsegmentator.map_to_binary  # noqa: F401 - the class maps the labels are checked against
            from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    except ImportError as exc:
        raise ModelUnavailable(
            f"the weights cannot be checked as the model would load them without torch, nnunetv2 and "
            f"totalsegmentator installed ({exc})"
        ) from None
    with _quiet():
        predictor = nnUNetPredictor(
            use_mirroring=False, perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False
        )
    try:
        initialize_predictor(predictor, folder.path)
    except UnsafeWeights as exc:
        raise ModelUnavailable(str(exc)) from None
    _check_folder(predictor, folder, task)


def _check_folder(predictor: Any, folder: ModelFolder, task: str) -> np.ndarray | None:
    """The checks of one loaded trainer folder against its task: spacing, dataset id, and labels against the class
    map the results name them by. Returns the part model's lookup into the task's labels (None for one model).

    Raises
    ------
    ModelUnavailable
        If the spacing or the labels differ from the task's.
    """
    from totalsegmentator.map_to_binary import class_map, class_map_5_parts, map_taskid_to_partname_ct

    _check_dataset(predictor, folder, TASK_SPACING_MM[task])
    classes: dict[int, str] = dict(class_map["total"])
    lookup = None
    expected = classes
    if task == "total":
        expected = class_map_5_parts[map_taskid_to_partname_ct[folder.dataset_id]]
        lookup = _part_lookup(expected, classes)
    mismatch = label_mismatch(predictor.dataset_json.get("labels") or {}, expected)
    if mismatch is not None:
        raise ModelUnavailable(
            f"the weights in {folder.path} do not label the structures as the installed TotalSegmentator "
            f"{_package_version('totalsegmentator')} names them ({mismatch}): every segment would be named wrongly; "
            "install the weights and the totalsegmentator package of one release"
        )
    return lookup


def _check_dataset(predictor: Any, folder: ModelFolder, spacing_mm: float) -> None:
    """Refuse weights whose plans give another spacing than the task's (a 6 mm model under the 3 mm folder would
    be run and named as the 3 mm one); log a warning when the plans name another dataset id than the folder's
    (a release may have been renamed; the results name the exact bytes by hash either way)."""
    dataset_folder = folder.path.parent.name
    try:
        planned = str(predictor.plans_manager.dataset_name or "")
    except (KeyError, AttributeError, TypeError):
        planned = ""
    if planned.split("_")[0] != f"Dataset{folder.dataset_id}":
        LOG.warning(
            "The weights in %s were made for %s (plans.json dataset_name), not for %s, the folder they are "
            "installed in; check that this is the release zip of %s.",
            folder.path,
            planned or "an unnamed dataset",
            dataset_folder,
            dataset_folder,
        )
    try:
        spacing = [float(value) for value in predictor.configuration_manager.spacing]
    except (KeyError, AttributeError, TypeError, ValueError):
        spacing = []
    if not spacing or any(abs(value - spacing_mm) > 0.05 for value in spacing):
        given = " x ".join(f"{v:g}" for v in spacing) if spacing else "no"
        raise ModelUnavailable(
            f"the weights in {folder.path} work at {given} mm spacing (plans.json), where this task's models work "
            f"at {spacing_mm:g} mm; install the release zip of {dataset_folder}"
        )


def _use_openvino(
    predictor: Any,
    folder: ModelFolder,
    hashes: dict[str, str],
    precision: str,
    cpu_threads: int | None,
    spacing_mm: float,
) -> OpenVINOPrecisions:
    """Put an OpenVINO-compiled copy of the predictor's network in its place (cached under ``hashes``, those of
    the files the network was built from); returns the precision used and the FP32 compilation."""
    try:
        from inference.models import openvino_backend as backend
    except ImportError as exc:
        raise ModelUnavailable(f"backend openvino needs the openvino package installed: {exc}") from None
    patch_size = tuple(int(n) for n in predictor.configuration_manager.patch_size)
    outputs = int(predictor.label_manager.num_segmentation_heads)
    threads = cpu_threads or os.cpu_count() or 1
    try:
        model, _cached = backend.load_or_convert(predictor.network, folder, patch_size, outputs, hashes)
        streams = min(backend.TILES_IN_FLIGHT, threads)
        fp32 = backend.compile_model(model, "fp32", threads, streams)

        def calibrate() -> float:
            bf16 = backend.compile_model(model, "bf16", threads, streams)
            return _bf16_agreement(predictor, fp32, bf16, patch_size, spacing_mm)

        chosen = backend.choose_precision(precision, calibrate)  # type: ignore[arg-type]
        compiled = fp32 if chosen == "fp32" else backend.compile_model(model, "bf16", threads, streams)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ModelUnavailable(
            f"the Dataset{folder.dataset_id} network could not be prepared for OpenVINO ({_first_line(exc)}); "
            "set backend: torch for this model"
        ) from None
    used = backend.effective_precision(compiled)
    if used != chosen:
        LOG.info(
            "OpenVINO computes the Dataset%d network in %s on this CPU (%s was asked for).",
            folder.dataset_id,
            used,
            chosen,
        )
    predictor.network = backend.OpenVINONetwork(compiled, used)
    predictor.list_of_parameters = [{}]  # the weights are in the compiled model now
    backend.use_streams(predictor)
    return OpenVINOPrecisions(used, fp32)


def _resolve_backend(requested: str, device_type: str) -> str:
    """The backend that runs the network: ``auto`` is OpenVINO on the CPU where it is installed, else PyTorch.

    On a GPU the network always runs in PyTorch (an explicit ``openvino`` is overridden, with a log line).
    """
    if device_type != "cpu":
        if requested == "openvino":
            LOG.info("backend openvino runs on the CPU only; on %s the network runs in PyTorch.", device_type)
        return "torch"
    if requested != "auto":
        return requested
    if importlib.util.find_spec("openvino") is None:
        LOG.info("backend auto: OpenVINO is not installed, so the network runs in PyTorch on the CPU.")
        return "torch"
    return "openvino"


def _bf16_agreement(predictor: Any, fp32: Any, bf16: Any, patch_size: tuple[int, ...], spacing_mm: float) -> float:
    """Mean Dice of BF16 against FP32 label maps on a phantom CT one patch in size, at the model spacing."""
    from inference.models.openvino_backend import OpenVINONetwork

    image = calibration_volume(patch_size)[None]
    properties = {"spacing": [spacing_mm] * 3}
    maps = []
    for compiled in (fp32, bf16):
        predictor.network = OpenVINONetwork(compiled, "calibration")
        maps.append(np.asarray(predictor.predict_single_npy_array(image, properties, None, None, False)))
    return mean_dice(maps[1], maps[0])


def calibration_volume(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A body-like CT in HU, ``shape`` voxels: air, a soft-tissue ellipse, two lungs, a spine, mild noise.

    Enough structure for two precisions of one network to be compared; not anatomy.
    """
    z, y, x = np.meshgrid(*(np.linspace(-1.0, 1.0, n) for n in shape[-3:]), indexing="ij")
    hu = np.full(z.shape, -1000.0, dtype=np.float32)
    hu[(x / 0.9) ** 2 + (y / 0.7) ** 2 < 1.0] = 40.0
    for side in (-0.4, 0.4):
        hu[((x - side) / 0.3) ** 2 + (y / 0.45) ** 2 < 1.0] = -850.0
    hu[(x / 0.12) ** 2 + ((y - 0.45) / 0.12) ** 2 < 1.0] = 700.0
    hu += np.random.default_rng(seed).normal(0.0, 10.0, hu.shape).astype(np.float32)
    return hu


def mean_dice(ours: np.ndarray, reference: np.ndarray) -> float:
    """Mean Dice over the labels (other than 0) present in either map; 1.0 when neither has any."""
    labels = np.union1d(np.unique(ours), np.unique(reference))
    scores = []
    for label in labels[labels != 0]:
        a, b = ours == label, reference == label
        scores.append(2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))
    return float(np.mean(scores)) if scores else 1.0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else "no details"


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


def label_mismatch(dataset_labels: dict[str, object], expected: dict[int, str]) -> str | None:
    """How a weights folder's dataset.json labels differ from the structure names the results give each label
    number (TotalSegmentator's class map), in words; None when they agree. Labels that are not a table of whole
    numbers with background 0, or that give one number two names, never agree."""
    for name, value in dataset_labels.items():
        if isinstance(value, (list, tuple)):
            return f"label {name!r} is a region ({value!r}), not one label number"
    problem = labels_problem(dataset_labels)
    if problem is not None:
        return problem.removeprefix("its ")
    given = {value: name for name, value in dataset_labels.items() if name != "background" and isinstance(value, int)}
    if set(given) != set(expected):
        return f"{len(given)} labels numbered {min(given, default=0)}-{max(given, default=0)}, where {len(expected)} are expected"
    differing = [number for number in sorted(expected) if given[number] != expected[number]]
    if differing:
        first = differing[0]
        return (
            f"{len(differing)} label numbers name another structure, e.g. {first} is {given[first]!r} in the weights "
            f"and {expected[first]!r} in the package"
        )
    return None


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
