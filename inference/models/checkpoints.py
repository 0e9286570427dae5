"""Loading nnU-Net model folders without running code from them.

nnU-Net's own ``initialize_from_trained_model_folder`` unpickles the checkpoint with
``torch.load(weights_only=False)``: a crafted ``checkpoint_final.pth`` would run its
code inside the worker. Here the checkpoint is read with ``weights_only=True`` and an
explicit allow-list of the few non-tensor types real nnU-Net checkpoints hold (numpy
scalars in the training log), and the network classes that ``plans.json`` names are
checked to come from the network packages before nnU-Net imports them. Anything else
is refused with :class:`UnsafeWeights`, and so is a checkpoint whose layers hold a value that
is not a finite number (a NaN would label every voxel alike); the predictor is then set up
with nnU-Net's ``manual_initialization`` exactly as its own loader would.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from pathlib import Path
from typing import Any


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
    damaged = not_a_number_layer(checkpoint["network_weights"])
    if damaged is not None:
        layer, what = damaged
        raise UnsafeWeights(
            f"{path} holds {what} in layer {layer}: the weights file is damaged; import it again from a good copy"
        )
    return checkpoint


def not_a_number_layer(weights: object) -> tuple[str, str] | None:
    """The first layer of a checkpoint's ``network_weights`` holding a value that is not a finite number, and what
    it holds in words ("values that are not numbers (NaN)", "infinite values"); None when every value is finite.

    A layer's sum is finite only if each of its values is (a NaN or an infinity carries through), so each layer is
    read once and looked into value by value only where its sum is not finite.
    """
    import torch

    if not isinstance(weights, dict):
        return None  # not a table of layers: the fit to the network refuses it, naming that
    for name, tensor in weights.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            continue
        if bool(torch.isfinite(tensor.sum())):
            continue
        if bool(torch.isnan(tensor).any()):
            return str(name), "values that are not numbers (NaN)"
        if bool(torch.isinf(tensor).any()):
            return str(name), "infinite values"
    return None


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


def labels_problem(labels: object) -> str | None:
    """What is wrong with a dataset.json's ``labels`` for nnU-Net and for naming the results, in words; None when
    it is a table of names and whole label numbers, background 0, each number with one name."""
    if not isinstance(labels, dict):
        return 'it has no "labels" table of structure names and label numbers'
    if "background" not in labels:
        return 'its labels give no number for "background" (it must be 0)'
    background = labels["background"]
    if isinstance(background, bool) or background != 0:
        return f'its labels number "background" {json.dumps(background)}, where it must be 0'
    named: dict[int, str] = {}
    for name, value in labels.items():
        if isinstance(value, bool) or not isinstance(value, int):
            return f"its label {str(name)!r} is {json.dumps(value)}, not one whole label number"
        if value in named:
            return f"its label number {value} has two names, {named[value]!r} and {str(name)!r}"
        named[value] = str(name)
    return None


def check_labels(dataset_json: dict[str, Any], path: Path) -> None:
    """Refuse a dataset.json whose labels nnU-Net cannot use, or that would name two structures by one number.

    Raises
    ------
    UnsafeWeights
        Naming the file and the problem.
    """
    problem = labels_problem(dataset_json.get("labels"))
    if problem is not None:
        raise UnsafeWeights(
            f"{path} cannot name the model's output: {problem}; the model was not loaded; install the weights as "
            "TotalSegmentator publishes them"
        )


NNUNET_PLANS_KEYS = ("transpose_forward", "transpose_backward")
"""What nnU-Net reads from the top of a plans.json to run a network (besides its configurations)."""
NNUNET_CONFIGURATION_KEYS = (
    "patch_size",
    "spacing",
    "normalization_schemes",
    "use_mask_for_norm",
    "preprocessor_name",
    "resampling_fn_data",
    "resampling_fn_data_kwargs",
    "resampling_fn_seg",
    "resampling_fn_seg_kwargs",
    "resampling_fn_probabilities",
    "resampling_fn_probabilities_kwargs",
)
"""What nnU-Net reads from a plans.json's configuration to prepare a CT, run the network and undo the resampling."""
NNUNET_ARCHITECTURE_KEYS = ("network_class_name", "arch_kwargs", "_kw_requires_import")
"""How a plans.json of nnU-Net 2.4 and later describes the network (its configuration's "architecture")."""
NNUNET_OLD_ARCHITECTURE_KEYS = (
    "UNet_class_name",
    "UNet_base_num_features",
    "unet_max_num_features",
    "n_conv_per_stage_encoder",
    "n_conv_per_stage_decoder",
    "conv_kernel_sizes",
    "pool_op_kernel_sizes",
    "num_pool_per_axis",
)
"""How a plans.json of earlier nnU-Net 2 releases describes the network (nnU-Net still reads it)."""
REINSTALL = "install the weights as TotalSegmentator publishes them"


def nnunet_gap(folder: Path, dataset_json: dict[str, Any], plans: dict[str, Any], configuration: str) -> str | None:
    """What a trainer folder's dataset.json or plans.json lacks of what nnU-Net reads from it to build and run the
    network of ``configuration``, as a sentence naming the file; None when both hold it all (their labels are
    checked by :func:`check_labels`)."""
    description = folder / "dataset.json"
    channels = dataset_json["modality"] if "modality" in dataset_json else dataset_json.get("channel_names")
    if not isinstance(channels, dict) or not channels:
        return (
            f'{description} is not a dataset description as nnU-Net writes it: it names no input channel ("channel_names", '
            'e.g. {"0": "CT"})'
        )
    lacking = _plans_gap(plans, configuration)
    return None if lacking is None else f"{folder / 'plans.json'} is not a plans file as nnU-Net writes it: {lacking}"


def _plans_gap(plans: dict[str, Any], configuration: str) -> str | None:
    """What a plans.json lacks for ``configuration``, in words ("it has no ..."); None when nothing."""
    missing = [key for key in NNUNET_PLANS_KEYS if key not in plans]
    if not {"foreground_intensity_properties_per_channel", "foreground_intensity_properties_by_modality"} & set(plans):
        missing.append("foreground_intensity_properties_per_channel")
    if missing:
        return f"it has no {', '.join(json.dumps(key) for key in missing)}"
    resolved = _resolved_configuration(plans.get("configurations"), configuration)
    if resolved is None:
        return f"it describes no configuration {configuration!r} (the one the node runs)"
    missing = [key for key in NNUNET_CONFIGURATION_KEYS if key not in resolved]
    architecture = resolved.get("architecture")
    if "architecture" not in resolved:
        missing += [key for key in NNUNET_OLD_ARCHITECTURE_KEYS if key not in resolved]
    elif not isinstance(architecture, dict):
        missing.append("architecture")
    else:
        missing += [f"architecture.{key}" for key in NNUNET_ARCHITECTURE_KEYS if key not in architecture]
    if missing:
        return f"its configuration {configuration!r} has no {', '.join(json.dumps(key) for key in missing)}"
    return None


def _resolved_configuration(configurations: object, name: str) -> dict[str, Any] | None:
    """A plans.json configuration with what it inherits (``inherits_from``) filled in, as nnU-Net resolves it; None
    where it, or one it inherits from, is not there (or the inheritance goes round in a circle)."""
    resolved: dict[str, Any] = {}
    seen: set[str] = set()
    current: object = name
    while current is not None:
        if not isinstance(configurations, dict) or not isinstance(current, str) or current in seen:
            return None
        entry = configurations.get(current)
        if not isinstance(entry, dict):
            return None
        seen.add(current)
        resolved = {**entry, **resolved}
        current = entry.get("inherits_from")
    return resolved


def description_problem(folder: Path) -> str | None:
    """What in a trainer folder's dataset.json or plans.json keeps nnU-Net from building and running its network,
    as a sentence naming the file; None when both hold what it reads. Reads those two files only, not the
    checkpoint (quick, and without torch): the configuration is the one the trainer folder's name ends in."""
    configuration = folder.name.rsplit("__", 1)[-1]
    try:
        described = {name: read_weights_json(folder / name, read_weights_file(folder / name)) for name in JSON_FILES}
    except UnsafeWeights as exc:
        return str(exc).removesuffix("; import the weights again")
    labels = labels_problem(described["dataset.json"].get("labels"))
    if labels is not None:
        return f"{folder / 'dataset.json'} cannot name the model's output: {labels}"
    return nnunet_gap(folder, described["dataset.json"], described["plans.json"], configuration)


JSON_FILES = ("dataset.json", "plans.json")


def check_network_classes(configuration_manager: Any, path: Path) -> None:
    """Refuse plans whose network description names anything but network building blocks, or settings they lack.

    nnU-Net finds these names with ``pydoc.locate``, which follows attributes (``torch.nn.modules.module.torch.hub.load``
    is ``torch.hub.load``), and calls what it finds with the plans' ``arch_kwargs``: so each name must be a class of
    the package its role allows (the network of dynamic_network_architectures, the operations of torch.nn), named by
    the module that defines or exports it, and every setting must be one its constructor declares.
    """
    kwargs = configuration_manager.network_arch_init_kwargs or {}
    network_name = configuration_manager.network_arch_class_name
    network = _building_block(network_name, NETWORK_PACKAGE, "the network (network_class_name)", path)
    if not isinstance(kwargs, dict):
        raise UnsafeWeights(f"{path} gives the network's settings (arch_kwargs) as something other than a table")
    _refuse_undeclared(network, kwargs, "arch_kwargs", path, _PASSED_BY_NNUNET)
    for key in configuration_manager.network_arch_init_kwargs_req_import or ():
        name = kwargs.get(key)
        if name is None:
            continue
        operation = _building_block(name, OPERATIONS_PACKAGE, f"{key} (arch_kwargs)", path)
        settings = kwargs.get(f"{key}_kwargs")
        if isinstance(settings, dict):
            _refuse_undeclared(operation, settings, f"{key}_kwargs", path)


NETWORK_PACKAGE = "dynamic_network_architectures"
"""Where the network class a plans.json names must come from."""
OPERATIONS_PACKAGE = "torch.nn"
"""Where the convolution, norm, dropout and nonlinearity classes a plans.json names must come from."""
_PASSED_BY_NNUNET = ("input_channels", "num_classes")
"""Constructor arguments nnU-Net gives the network itself: a plans.json setting them would collide."""


def _building_block(name: object, package: str, role: str, path: Path) -> type:
    """The class ``name`` stands for, if it is a torch module class of ``package`` named where it lives.

    Raises
    ------
    UnsafeWeights
        Naming the plans file, the class and its role, for anything else (a function, an object reached through
        another module's attributes, a class of another package).
    """
    import importlib
    import pydoc

    import torch

    refused = UnsafeWeights(
        f"{path} names the class {str(name)!r} as {role}, which is not a network building block (it must be a "
        f"class of {package}, named by the module that defines or exports it); the model was not loaded"
    )
    if not isinstance(name, str):
        raise refused
    module_name, _dot, class_name = name.rpartition(".")
    in_package = module_name == package or module_name.startswith(f"{package}.")
    if not in_package or not all(part.isidentifier() for part in name.split(".")):
        raise refused
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise refused from None
    found = getattr(module, class_name, None)
    if not (
        isinstance(found, type)
        and issubclass(found, torch.nn.Module)
        and found.__qualname__ == class_name
        and (found.__module__ == module_name or found.__module__.startswith(f"{module_name}."))
        and pydoc.locate(name) is found  # what nnU-Net will find under that name
    ):
        raise refused
    return found


def _refuse_undeclared(
    block: type, settings: dict[str, Any], where: str, path: Path, reserved: tuple[str, ...] = ()
) -> None:
    """Refuse settings that ``block``'s constructor does not declare by name (or that nnU-Net passes itself)."""
    import inspect

    try:
        parameters = list(inspect.signature(block).parameters.values())
    except (TypeError, ValueError):
        parameters = []
    declared = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    for key in settings:
        if key not in declared or key in reserved:
            raise UnsafeWeights(
                f"{path} gives {block.__name__} the setting {str(key)!r} ({where}), which it does not take; the "
                "model was not loaded"
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
    check_labels(dataset_json, folder / "dataset.json")  # before nnU-Net reads them: it asserts, or fails on a key
    plans = read_weights_json(folder / "plans.json", contents.pop("plans.json"))
    checkpoint = load_checkpoint(folder / "fold_0" / checkpoint_name, contents.pop(f"fold_0/{checkpoint_name}"))
    configuration_name = (
        checkpoint["init_args"].get("configuration") if isinstance(checkpoint["init_args"], dict) else None
    )
    if _resolved_configuration(plans.get("configurations"), str(configuration_name)) is None:
        raise UnsafeWeights(
            f"{folder / 'plans.json'} does not describe the configuration {configuration_name!r} that "
            f"{folder / 'fold_0' / checkpoint_name} was trained with; import the weights again"
        )
    gap = nnunet_gap(folder, dataset_json, plans, str(configuration_name))
    if gap is not None:
        raise UnsafeWeights(f"{gap}; the model was not loaded; {REINSTALL}")
    try:
        plans_manager = PlansManager(plans)
        configuration_manager = plans_manager.get_configuration(str(configuration_name))
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, IndexError):
        raise UnsafeWeights(
            f"{folder / 'plans.json'} does not describe the configuration {configuration_name!r} as nnU-Net writes "
            f"it (a setting is of the wrong kind); the model was not loaded; {REINSTALL}"
        ) from None
    check_network_classes(configuration_manager, folder / "plans.json")
    trainer_name = str(checkpoint["trainer_name"])
    trainer_class = recursive_find_python_class(
        str(Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer"), trainer_name, "nnunetv2.training.nnUNetTrainer"
    )
    if trainer_class is None:
        raise UnsafeWeights(f"{folder}: the checkpoint's trainer {trainer_name!r} is not one nnU-Net provides")
    try:
        network = trainer_class.build_network_architecture(
            configuration_manager.network_arch_class_name,
            configuration_manager.network_arch_init_kwargs,
            configuration_manager.network_arch_init_kwargs_req_import,
            determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
            plans_manager.get_label_manager(dataset_json).num_segmentation_heads,
            enable_deep_supervision=False,
        )
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, AssertionError):
        raise UnsafeWeights(
            f"{folder / 'plans.json'} and {folder / 'dataset.json'} do not describe a network nnU-Net can build (a "
            f"setting is missing or of the wrong kind); the model was not loaded; {REINSTALL}"
        ) from None
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
