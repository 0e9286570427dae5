"""Loading nnU-Net model folders without running code from them.

nnU-Net's own ``initialize_from_trained_model_folder`` unpickles the checkpoint with
``torch.load(weights_only=False)``: a crafted ``checkpoint_final.pth`` would run its
code inside the worker. Here the checkpoint is read with ``weights_only=True`` and an
explicit allow-list of the few non-tensor types real nnU-Net checkpoints hold (numpy
scalars in the training log), and the network classes that ``plans.json`` names are
checked to come from the network packages before nnU-Net imports them. Anything else
is refused with :class:`UnsafeWeights`; the predictor is then set up with nnU-Net's
``manual_initialization`` exactly as its own loader would.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from pathlib import Path
from typing import Any

ALLOWED_CLASS_PREFIXES = ("torch.nn.", "dynamic_network_architectures.")
"""Where the classes a plans.json names (network, convolution, norm, nonlinearity) may come from."""


class UnsafeWeights(RuntimeError):
    """A weights folder holds something other than weights and plans; it is not loaded."""


def _allowed_globals() -> list[Any]:
    import numpy as np

    allowed: list[Any] = [np.dtype]
    for module_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            module = __import__(module_name, fromlist=["scalar"])
            allowed.append(module.scalar)
            break
        except (ImportError, AttributeError):
            continue
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [
            getattr(dtypes, name)
            for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType")
            if hasattr(dtypes, name)
        ]
    return allowed


def load_checkpoint(path: Path, data: bytes | None = None) -> dict[str, Any]:
    """Read an nnU-Net checkpoint as data only: the file at ``path``, or ``data`` already read from it.

    Raises
    ------
    UnsafeWeights
        If the file needs any Python object outside the allow-list to load (it could run code),
        or is not a checkpoint at all.
    """
    import torch

    not_readable = (
        f"{path} is not a readable PyTorch checkpoint (damaged, cut short, or a Git LFS pointer in place of the "
        "file); import the weights again"
    )
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            checkpoint = torch.load(
                io.BytesIO(data) if data is not None else path, map_location="cpu", weights_only=True
            )
    except pickle.UnpicklingError as exc:
        blocked = _blocked_name(str(exc))
        if blocked is None:
            raise UnsafeWeights(not_readable) from None
        raise UnsafeWeights(
            f"{path} holds Python objects other than weights ({blocked}); loading it could run code, so it was "
            "refused. Use the published TotalSegmentator weights."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError):
        raise UnsafeWeights(not_readable) from None
    if not isinstance(checkpoint, dict) or not {"network_weights", "trainer_name", "init_args"} <= set(checkpoint):
        raise UnsafeWeights(f"{path} is not an nnU-Net checkpoint (network_weights, trainer_name or init_args missing)")
    return checkpoint


def read_weights_file(path: Path) -> bytes:
    """A weights file's bytes.

    Raises
    ------
    UnsafeWeights
        If it is missing or cannot be read.
    """
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UnsafeWeights(f"the weights file {path} is missing; import the weights again") from None
    except OSError as exc:
        raise UnsafeWeights(
            f"the weights file {path} cannot be read ({exc.strerror}); import the weights again"
        ) from None


def read_weights_json(path: Path, data: bytes) -> dict[str, Any]:
    """A weights folder's JSON file (dataset.json, plans.json) as a dict, from ``data`` read from ``path``.

    Raises
    ------
    UnsafeWeights
        If it is not JSON, or not a JSON object.
    """
    try:
        value = json.loads(data)
    except json.JSONDecodeError as exc:
        raise UnsafeWeights(
            f"the weights file {path} is not valid JSON (line {exc.lineno}, column {exc.colno}); import the weights again"
        ) from None
    except UnicodeDecodeError:
        raise UnsafeWeights(f"the weights file {path} is not UTF-8 text; import the weights again") from None
    if not isinstance(value, dict):
        raise UnsafeWeights(f"the weights file {path} does not hold a JSON object; import the weights again")
    return value


def check_network_classes(configuration_manager: Any, path: Path) -> None:
    """Refuse plans whose network description names classes outside the network packages.

    nnU-Net imports these names and calls them while building the network, so a plans.json
    naming any other callable could run it.
    """
    kwargs = configuration_manager.network_arch_init_kwargs or {}
    names = [configuration_manager.network_arch_class_name]
    names += [kwargs.get(key) for key in configuration_manager.network_arch_init_kwargs_req_import or ()]
    for name in names:
        if name is not None and not str(name).startswith(ALLOWED_CLASS_PREFIXES):
            raise UnsafeWeights(
                f"{path} names the class {str(name)!r}, which is not a network building block "
                f"(allowed: {', '.join(ALLOWED_CLASS_PREFIXES)}); the model was not loaded"
            )


def initialize_predictor(predictor: Any, folder: Path, checkpoint_name: str = "checkpoint_final.pth") -> dict[str, str]:
    """Set up an ``nnUNetPredictor`` from a trainer folder (fold 0), as nnU-Net would, without unpickling code.

    Each file is read once; returns the SHA-256 of the bytes the predictor was built from, by file name
    (``plans.json``, ``dataset.json``, ``fold_0/checkpoint_final.pth``), so the caller can tell whether they
    are the files it identified.
    """
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    names = ("plans.json", "dataset.json", f"fold_0/{checkpoint_name}")
    contents = {name: read_weights_file(folder / name) for name in names}
    loaded = {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}
    dataset_json = read_weights_json(folder / "dataset.json", contents.pop("dataset.json"))
    plans = read_weights_json(folder / "plans.json", contents.pop("plans.json"))
    checkpoint = load_checkpoint(folder / "fold_0" / checkpoint_name, contents.pop(f"fold_0/{checkpoint_name}"))
    configuration_name = (
        checkpoint["init_args"].get("configuration") if isinstance(checkpoint["init_args"], dict) else None
    )
    try:
        plans_manager = PlansManager(plans)
        configuration_manager = plans_manager.get_configuration(str(configuration_name))
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError):
        raise UnsafeWeights(
            f"{folder / 'plans.json'} does not describe the configuration {configuration_name!r} that "
            f"{folder / 'fold_0' / checkpoint_name} was trained with; import the weights again"
        ) from None
    check_network_classes(configuration_manager, folder / "plans.json")
    trainer_name = str(checkpoint["trainer_name"])
    trainer_class = recursive_find_python_class(
        str(Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer"), trainer_name, "nnunetv2.training.nnUNetTrainer"
    )
    if trainer_class is None:
        raise UnsafeWeights(f"{folder}: the checkpoint's trainer {trainer_name!r} is not one nnU-Net provides")
    network = trainer_class.build_network_architecture(
        configuration_manager.network_arch_class_name,
        configuration_manager.network_arch_init_kwargs,
        configuration_manager.network_arch_init_kwargs_req_import,
        determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads,
        enable_deep_supervision=False,
    )
    parameters = [checkpoint["network_weights"]]
    misfit = _misfit(network.state_dict(), parameters[0])
    if misfit is not None:
        raise UnsafeWeights(
            f"{folder / 'fold_0' / checkpoint_name} does not fit the network that {folder / 'plans.json'} and "
            f"dataset.json describe ({misfit}); install the weights of one release"
        )
    network.load_state_dict(parameters[0])
    predictor.manual_initialization(
        network,
        plans_manager,
        configuration_manager,
        parameters,
        dataset_json,
        trainer_name,
        checkpoint.get("inference_allowed_mirroring_axes"),
    )
    return loaded


def _misfit(expected: dict[str, Any], weights: Any) -> str | None:
    """How a checkpoint's weights differ from the layers of the network built from plans.json, in words."""
    if not isinstance(weights, dict):
        return "its network_weights are not a table of layers"
    missing = [name for name in expected if name not in weights]
    extra = [name for name in weights if name not in expected]
    resized = [
        name
        for name in expected
        if name in weights and tuple(getattr(weights[name], "shape", ())) != tuple(expected[name].shape)
    ]
    if resized:
        name = resized[0]
        return (
            f"{len(resized)} layer(s) differ in size, e.g. {name}: {tuple(weights[name].shape)} in the checkpoint, "
            f"{tuple(expected[name].shape)} from the plans and labels"
        )
    if missing or extra:
        return f"{len(missing)} layer(s) missing from the checkpoint and {len(extra)} it has that the network lacks"
    return None


def _blocked_name(message: str) -> str | None:
    for line in message.splitlines():
        if "Unsupported global" in line or "GLOBAL" in line:
            return line.strip().removeprefix("WeightsUnpickler error: ").strip()
    return None
