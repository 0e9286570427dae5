"""Run nnU-Net's network forward passes with OpenVINO on the CPU, inside nnU-Net's own predictor.

Only the network call changes: :class:`OpenVINONetwork` stands in for ``predictor.network``,
so nnU-Net's preprocessing, Gaussian weighting, logit accumulation and argmax (and
TotalSegmentator's resampling and orientation handling around them) run as they do with
PyTorch. Each tile is one call of the compiled model, with the input shape fixed to the
model's patch size (nnU-Net pads every volume to at least one patch, so all tiles have that
shape); :func:`sliding_window_logits` runs nnU-Net's sliding-window loop with
:data:`TILES_IN_FLIGHT` tiles computed at once, in OpenVINO streams, added up in nnU-Net's order.

Converting a network takes minutes, so the converted model is cached next to the weights::

    <weights>/.openvino/Dataset297-<sha256 of the model folder, 16 digits>-ov<version>-<8 digits of the sha256 of
    the torch, nnunetv2, dynamic_network_architectures and OpenVINO versions>.xml/.bin/.json

The name holds the weights' SHA-256 (from the manifest ``inference.weights`` verified at load)
and the package versions, so new weights or a new exporter or runtime convert again (and workers with other
versions sharing one weights folder keep separate files). The ``.json`` beside
it records the SHA-256 of the ``.xml`` and ``.bin``, the whole SHA-256 of the weights, the dataset
id and the torch, nnunetv2, dynamic_network_architectures and OpenVINO versions; a cache whose
files do not match it, whose record names other weights or versions (a conversion copied or
renamed from elsewhere), or that does not read back with the expected input and output shapes,
is converted again rather than trusted. The model is saved in FP32; the precision (FP32 or BF16) is chosen when it is
compiled, so one conversion serves both.

Instance normalisation is rewritten before compiling (:func:`stabilise_instance_norms`):
OpenVINO's CPU kernel for it (``MVN``) sums a whole 112 x 128 x 112 channel in a few FP32
accumulators, which put its output up to 0.06 off (on values of unit variance) and moved the
logits by up to 0.2, against 1e-4 between two PyTorch runs that sum in another order.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import time
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from inference.models import HALF_PRECISION_OVERFLOW, SegmentationFailed
from inference.models.not_a_number import NotANumber, holds_nan
from inference.weights import ModelFolder, converted_model_directory, file_sha256

LOG = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "auto"]
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""/proc/cpuinfo flags of CPUs that compute BF16 natively (Cooper Lake, Sapphire Rapids and later, Zen 4)."""
BF16_PARITY_DICE = 0.99
"""Mean Dice against FP32 a BF16 model must reach on the calibration volume before ``auto`` uses it."""


class OpenVINOUnavailable(RuntimeError):
    """The OpenVINO backend cannot run here (package missing, conversion failed); the message says why."""


def runtime_version() -> str:
    """OpenVINO's version, short (e.g. ``2026.4.1``), as used in cache names."""
    import openvino

    return openvino.__version__.split("-", 1)[0]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes BF16 natively (OpenVINO says so, or the kernel lists the flags)."""
    try:
        import openvino

        if "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            return True
    except Exception as exc:  # noqa: BLE001 - an unknown property only means "ask the kernel instead"
        LOG.debug("OpenVINO did not list the CPU's capabilities (%s); reading /proc/cpuinfo.", exc)
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(flag in flags for flag in BF16_CPU_FLAGS)


@dataclass(frozen=True)
class ConvertedModelFiles:
    """The three files of one cached conversion."""

    xml: Path
    bin: Path
    record: Path

    @classmethod
    def for_folder(
        cls, folder: ModelFolder, hashes: dict[str, str], versions: dict[str, str] | None = None
    ) -> ConvertedModelFiles:
        """The cache files of the network built from the files with these SHA-256 (those actually read), by the
        package ``versions`` (default: those installed here). Workers with other versions sharing one weights
        folder get other files, so they never convert over each other's cache."""
        digest = _folder_digest(hashes)
        packages = _versions_digest(versions if versions is not None else conversion_versions())
        directory = converted_model_directory(folder.path)
        stem = f"Dataset{folder.dataset_id}-{digest[:16]}-ov{runtime_version()}-{packages[:8]}"
        return cls(directory / f"{stem}.xml", directory / f"{stem}.bin", directory / f"{stem}.json")


def _folder_digest(hashes: dict[str, str]) -> str:
    import hashlib

    combined = hashlib.sha256()
    for name in sorted(hashes):
        combined.update(f"{name}:{hashes[name]}\n".encode())
    return combined.hexdigest()


def load_or_convert(
    network: Any, folder: ModelFolder, patch_size: tuple[int, ...], outputs: int, hashes: dict[str, str]
) -> tuple[Any, bool]:
    """The OpenVINO model of ``network``, read from the cache or converted (and cached) now.

    Returns the model and whether it came from the cache. A cache that is missing, damaged,
    for other weights or another runtime is converted again; if the cache folder cannot be
    written, the model is converted in memory for this process only (with a warning).
    """
    import openvino

    files = ConvertedModelFiles.for_folder(folder, hashes)
    input_shape = (1, 1, *patch_size)
    made_from = conversion_source(folder, hashes)
    cached = _read_cache(files, input_shape, outputs, made_from)
    if cached is not None:
        stabilise_instance_norms(cached)
        return cached, True
    _remove_abandoned_writes(files)
    started = time.perf_counter()
    model = convert(network, input_shape)
    LOG.info(
        "Converted the Dataset%d network to OpenVINO in %.0f s (done once per weights and OpenVINO version).",
        folder.dataset_id,
        time.perf_counter() - started,
    )
    try:
        _write_cache(openvino, model, files, input_shape, outputs, made_from)
    except OSError as exc:
        LOG.warning(
            "The converted Dataset%d model could not be saved in %s (%s); it will be converted again next start.",
            folder.dataset_id,
            files.xml.parent,
            exc.strerror or exc,
        )
    stabilise_instance_norms(model)
    return model, False


def convert(network: Any, input_shape: tuple[int, ...]) -> Any:
    """Convert a PyTorch network to an OpenVINO model with a fixed input shape (minutes on 2 cores).

    The network goes through ONNX in memory first (TorchScript export, then OpenVINO's ONNX
    reader): 1 minute here against 2.7 for ``openvino.convert_model`` on the module directly,
    with the same results. Where the ONNX export fails, the direct conversion is used.
    """
    import openvino
    import torch

    network = network.to("cpu").eval()
    example = torch.zeros(input_shape, dtype=torch.float32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript and the legacy ONNX exporter announce their deprecation
        try:
            exported = io.BytesIO()
            torch.onnx.export(
                network,
                (example,),
                exported,  # type: ignore[arg-type]  # the TorchScript exporter writes to a file object too
                opset_version=17,
                dynamo=False,
                input_names=["input"],
                output_names=["logits"],
            )
            return openvino.convert_model(io.BytesIO(exported.getvalue()))
        except Exception as exc:  # noqa: BLE001 - any exporter failure: the direct conversion still works
            LOG.info("The ONNX export of the network failed (%s); converting it directly, which takes longer.", exc)
        return openvino.convert_model(network, example_input=example, input=[input_shape])


def stabilise_instance_norms(model: Any) -> int:
    """Replace each instance normalisation (``MVN`` over the spatial axes) by sums taken one axis at a time.

    The mean and the variance (of the centred values, two passes) are each reduced over
    the last axis, then the one before, and so on, so no FP32 sum adds more values than
    one axis is long. The result matches PyTorch's ``InstanceNorm3d`` to about 1e-4 in the
    logits instead of 0.2 (see the module docstring); a tile takes about as long. Any
    other ``MVN`` (not over exactly the spatial axes, or another epsilon mode) is left as
    it is. Returns how many were replaced; a model without ``MVN`` is returned unchanged.
    """
    import openvino.opset13 as ops
    from openvino.utils import replace_node

    replaced = 0
    for node in model.get_ordered_ops():
        if node.get_type_name() != "MVN":
            continue
        data = node.input_value(0)
        attributes = node.get_attributes()
        shape = data.get_partial_shape()
        axes_node = node.input_value(1).get_node()
        if (
            shape.is_dynamic
            or axes_node.get_type_name() != "Constant"
            or not attributes.get("normalize_variance", False)
            or str(attributes.get("eps_mode", "")).lower() != "inside_sqrt"
            or sorted(int(a) % len(shape) for a in axes_node.get_data().ravel()) != list(range(2, len(shape)))
        ):
            continue
        dims = [int(d) for d in shape.to_shape()]
        mean = _mean_axis_by_axis(ops, data, dims)
        centred = ops.subtract(data, mean)
        variance = _mean_axis_by_axis(ops, ops.multiply(centred, centred), dims)
        epsilon = ops.constant(np.float32(attributes["eps"]))
        scale = ops.power(ops.add(variance, epsilon), ops.constant(np.float32(-0.5)))
        replace_node(node, ops.multiply(centred, scale))
        replaced += 1
    return replaced


def _mean_axis_by_axis(ops: Any, values: Any, dims: list[int]) -> Any:
    """The mean over axes 2.. of ``values``: a sum over one axis at a time, each scaled to a mean at once."""
    result = values
    for axis in range(len(dims) - 1, 1, -1):
        summed = ops.reduce_sum(result, ops.constant(np.array([axis], dtype=np.int64)), True)
        result = ops.multiply(summed, ops.constant(np.float32(1.0 / dims[axis])))
    return result


CONVERSION_PACKAGES = ("torch", "nnunetv2", "dynamic_network_architectures", "openvino")
"""The packages whose versions a conversion depends on: the exporter, the network's forward pass, the runtime."""


def conversion_versions() -> dict[str, str]:
    """The installed versions of :data:`CONVERSION_PACKAGES` ("not installed" for a missing one)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in CONVERSION_PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _versions_digest(versions: dict[str, str]) -> str:
    import hashlib

    return hashlib.sha256("".join(f"{name}={versions[name]}\n" for name in sorted(versions)).encode()).hexdigest()


def conversion_source(folder: ModelFolder, hashes: dict[str, str]) -> dict[str, Any]:
    """What a conversion is made from, as its record holds it: the whole SHA-256 over the weight files read, the
    dataset id, and the versions of the packages that export and define the network."""
    return {
        "weights_sha256": _folder_digest(hashes),
        "dataset_id": folder.dataset_id,
        "versions": conversion_versions(),
    }


def _differs_from(record: dict[str, Any], made_from: dict[str, Any]) -> str | None:
    """How the source a cache record names differs from ``made_from``, in words; None when it is the same."""
    if record.get("weights_sha256") != made_from["weights_sha256"]:
        return "it was converted from other weight files"
    if record.get("dataset_id") != made_from["dataset_id"]:
        return f"it was converted for Dataset{record.get('dataset_id')}, not Dataset{made_from['dataset_id']}"
    versions = record.get("versions")
    recorded: dict[str, Any] = versions if isinstance(versions, dict) else {}
    for package, installed in made_from["versions"].items():
        if recorded.get(package) != installed:
            return (
                f"it was converted with {package} {recorded.get(package, 'of an unrecorded version')}, not {installed}"
            )
    return None


def _read_cache(
    files: ConvertedModelFiles, input_shape: tuple[int, ...], outputs: int, made_from: dict[str, Any]
) -> Any | None:
    import openvino

    if not (files.xml.is_file() and files.bin.is_file() and files.record.is_file()):
        return None
    try:
        record = json.loads(files.record.read_text())
        differs = _differs_from(record, made_from)
        if differs is not None:
            LOG.warning(
                "The cached OpenVINO model %s does not belong to the Dataset%d weights being loaded (%s); converting "
                "it again.",
                files.xml.name,
                made_from["dataset_id"],
                differs,
            )
            return None
        if record.get("xml_sha256") != file_sha256(files.xml) or record.get("bin_sha256") != file_sha256(files.bin):
            LOG.warning("The cached OpenVINO model %s does not match its record; converting it again.", files.xml.name)
            return None
        model = openvino.Core().read_model(str(files.xml))
        if tuple(model.input(0).get_shape()) != input_shape or int(model.output(0).get_shape()[1]) != outputs:
            LOG.warning(
                "The cached OpenVINO model %s has other shapes than the weights; converting it again.", files.xml.name
            )
            return None
        return model
    except (OSError, ValueError, RuntimeError, TypeError, KeyError, IndexError, AttributeError) as exc:
        LOG.warning("The cached OpenVINO model %s is unreadable (%s); converting it again.", files.xml.name, exc)
        return None


def _remove_abandoned_writes(files: ConvertedModelFiles) -> None:
    """Delete this cache entry's temporary files that a writer killed mid-save left (no process of that id runs
    here, and they are over an hour old); a save in progress is never touched."""
    now = time.time()
    for stale in files.xml.parent.glob(f"{files.xml.stem}.tmp-*"):
        pid = stale.name.removeprefix(f"{files.xml.stem}.tmp-").split(".", 1)[0]
        try:
            if not pid.isdigit() or _process_runs(int(pid)) or now - stale.stat().st_mtime < ABANDONED_AFTER_S:
                continue
            stale.unlink()
        except OSError:
            continue
        LOG.info("Deleted %s, left by a conversion that was interrupted while saving.", stale)


ABANDONED_AFTER_S = 3600.0
"""Age after which a temporary cache file whose writer no longer runs is deleted (a save takes seconds)."""


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_cache(
    openvino: Any,
    model: Any,
    files: ConvertedModelFiles,
    input_shape: tuple[int, ...],
    outputs: int,
    made_from: dict[str, Any],
) -> None:
    """Save under temporary names, then rename: a reader never sees half a model (the record goes last)."""
    files.xml.parent.mkdir(parents=True, exist_ok=True)
    temporary = f"{files.xml.stem}.tmp-{os.getpid()}"
    xml_tmp = files.xml.with_name(f"{temporary}.xml")
    bin_tmp = files.xml.with_name(f"{temporary}.bin")
    try:
        openvino.save_model(model, str(xml_tmp), compress_to_fp16=False)
        record = {
            "xml_sha256": file_sha256(xml_tmp),
            "bin_sha256": file_sha256(bin_tmp),
            "input_shape": list(input_shape),
            "outputs": outputs,
            "openvino": runtime_version(),
            **made_from,
        }
        files.record.unlink(missing_ok=True)
        os.replace(bin_tmp, files.bin)
        os.replace(xml_tmp, files.xml)
        record_tmp = files.xml.with_name(f"{temporary}.json")
        record_tmp.write_text(json.dumps(record, indent=2))
        os.replace(record_tmp, files.record)
    finally:
        xml_tmp.unlink(missing_ok=True)
        bin_tmp.unlink(missing_ok=True)


TILES_IN_FLIGHT = 2
"""Sliding-window tiles computed at once, each in its own OpenVINO stream: on 2 cores, two single-threaded
streams did four 112 x 128 x 112 tiles in 0.7-0.75 of the time one two-threaded tile at a time took."""


def compile_model(model: Any, precision: Literal["fp32", "bf16"], threads: int | None, streams: int = 1) -> Any:
    """Compile for the CPU at the given precision with ``threads`` in all.

    One stream (the latency hint) runs a tile on every core; with ``streams`` above one
    (the throughput hint) that many tiles run side by side, sharing the threads.
    """
    import openvino

    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
    if streams > 1:
        config.update({"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": int(streams)})
    else:
        config["PERFORMANCE_HINT"] = "LATENCY"
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return openvino.Core().compile_model(model, "CPU", config)


def _torch_module_base() -> type:
    import torch

    return torch.nn.Module


class OpenVINONetwork(_torch_module_base()):  # type: ignore[misc]
    """A stand-in for an nnU-Net network whose forward pass runs a compiled OpenVINO model.

    nnU-Net's predictor calls ``network(tile)`` for each sliding-window tile, and
    ``load_state_dict``/``to``/``eval`` around that; the weights live in the compiled
    model, so loading a state dict does nothing here.
    """

    def __init__(self, compiled: Any, precision: str) -> None:
        super().__init__()
        self.compiled = compiled
        self.precision = precision
        self.streams = max(1, int(compiled.get_property("NUM_STREAMS")))
        self.requests = [compiled.create_infer_request() for _ in range(self.streams)]

    def forward(self, tile: Any) -> Any:
        import torch

        array = np.ascontiguousarray(tile.detach().to("cpu", torch.float32).numpy())
        request = self.requests[0]
        request.infer({0: array})
        # nnU-Net scales the result in place and adds it up before the next tile: one copy out of OpenVINO's buffer.
        return torch.from_numpy(np.array(request.get_output_tensor(0).data, copy=True))

    def predict_tiles(self, tiles: Iterable[np.ndarray]) -> Iterator[Any]:
        """The logits of each tile, in the tiles' order, with up to one tile per stream computed at once.

        Each result is OpenVINO's own output buffer, not a copy (a tile's logits are 0.68 GB for
        ``total_fast``): it may be changed in place, and is valid until the next result is asked for.
        """
        import torch

        in_flight: deque[tuple[Any, np.ndarray]] = deque()
        for index, tile in enumerate(tiles):
            if len(in_flight) == self.streams:
                yield self._collect(in_flight.popleft()[0], torch)
            request = self.requests[index % self.streams]  # the oldest request, just collected
            array = np.ascontiguousarray(tile, dtype=np.float32)
            request.start_async({0: array})
            in_flight.append((request, array))  # the input stays referenced until its request is done
        while in_flight:
            yield self._collect(in_flight.popleft()[0], torch)

    def release_memory(self) -> None:
        """Free the compiled model's working memory (activations, output buffers) until its next tile.

        A resident model otherwise keeps it between jobs: for ``total``, five part models with
        two streams each held it all at once (18.7 GiB peak on a 512x512x300 CT). No request
        may be running; every result handed out before is invalid afterwards.
        """
        for request in self.requests:
            request.wait()
        self.compiled.release_memory()

    @staticmethod
    def _collect(request: Any, torch: Any) -> Any:
        request.wait()
        return torch.from_numpy(request.get_output_tensor(0).data)  # reused only once the caller asks for more

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        from torch.nn.modules.module import _IncompatibleKeys

        return _IncompatibleKeys([], [])


def sliding_window_logits(predictor: Any, data: Any, slicers: Any, do_on_device: bool = True) -> Any:
    """nnU-Net's ``_internal_predict_sliding_window_return_logits``, with the tiles run through OpenVINO streams.

    The arithmetic is nnU-Net's own (2.6), step for step: each tile's logits are scaled by
    the Gaussian and added, in the tiles' order, to FP16 sums, which are divided by the
    summed weights at the end; only the forward passes overlap (:meth:`OpenVINONetwork.predict_tiles`).
    Mirroring is not supported here (TotalSegmentator runs without it); a predictor that
    mirrors keeps nnU-Net's own loop.

    A tile whose logits hold NaN stops the loop with :class:`NotANumber` (the weights': FP32 and BF16 have one
    range, so no half-precision overflow made it); sums that overflow FP16 (an infinity, or a NaN where
    infinities of both signs met) raise SegmentationFailed.
    """
    import torch
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    network = predictor.network
    patch_size = tuple(predictor.configuration_manager.patch_size)
    with torch.inference_mode():
        data = data.to("cpu")
        logits = torch.zeros((predictor.label_manager.num_segmentation_heads, *data.shape[1:]), dtype=torch.half)
        weights = torch.zeros(data.shape[1:], dtype=torch.half)
        gaussian: Any = 1
        if predictor.use_gaussian:
            gaussian = compute_gaussian(patch_size, sigma_scale=1.0 / 8, value_scaling_factor=10, device=data.device)
        tiles = (data[region][None].numpy() for region in slicers)
        try:
            for region, prediction in zip(slicers, network.predict_tiles(tiles), strict=True):
                prediction = prediction[0]
                if holds_nan(prediction):
                    raise NotANumber("weights")
                if predictor.use_gaussian:
                    prediction *= gaussian
                logits[region] += prediction
                weights[region[1:]] += gaussian
        finally:
            network.release_memory()
        torch.div(logits, weights, out=logits)
        if torch.any(torch.isinf(logits)) or holds_nan(logits):
            raise SegmentationFailed(HALF_PRECISION_OVERFLOW)  # where nnU-Net's own loop raises its RuntimeError
    return logits


def use_streams(predictor: Any) -> bool:
    """Let ``predictor`` run its sliding window through its OpenVINO network's streams; False if it mirrors."""
    if predictor.use_mirroring:
        return False
    predictor._internal_predict_sliding_window_return_logits = functools.partial(sliding_window_logits, predictor)
    return True


def effective_precision(compiled: Any) -> Literal["fp32", "bf16"]:
    """The precision OpenVINO actually computes in (it runs a BF16 request in FP32 on CPUs without BF16).

    The compiled model answers with an element type: its name is ``bf16``, but its string is
    ``<Type: 'bfloat16'>`` (OpenVINO 2026.4), so both spellings count. Anything else is FP32.
    """
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    name = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
    return "bf16" if any(spelling in str(name).lower() for spelling in ("bf16", "bfloat16")) else "fp32"


def choose_precision(requested: Precision, calibrate: Any = None) -> Literal["fp32", "bf16"]:
    """The precision to compile with.

    ``auto`` is BF16 only where the CPU computes BF16 natively *and* ``calibrate()`` (the
    caller's parity check of BF16 against FP32 on these weights) returns a mean Dice of at
    least :data:`BF16_PARITY_DICE`; everywhere else FP32. An explicit ``bf16`` on a CPU
    without native BF16 is passed on with a warning (OpenVINO 2026 then computes in FP32).
    """
    native = cpu_has_native_bf16()
    if requested == "fp32":
        return "fp32"
    if requested == "bf16":
        if not native:
            LOG.warning(
                "precision bf16 was asked for, but this CPU has no native BF16; OpenVINO may run the model in FP32."
            )
        return "bf16"
    if not native or calibrate is None:
        return "fp32"
    dice = float(calibrate())
    if dice >= BF16_PARITY_DICE:
        LOG.info("BF16 reaches mean Dice %.4f against FP32 on the calibration volume: using BF16.", dice)
        return "bf16"
    LOG.info("BF16 reaches only mean Dice %.4f against FP32 on the calibration volume: using FP32.", dice)
    return "fp32"
