"""Installing weights: `weights import` and `weights download` install only what the node can use, never lose a
working install, and approve nothing that changed after it was installed."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import pytest

from dicom_node.config import load_settings
from inference.weights import (
    IMPORT_LOCK_NAME,
    MANIFEST_NAME,
    TASK_DATASETS,
    WeightsCorrupt,
    WeightsMissing,
    file_sha256,
    folder_hashes,
    identify,
    import_zip,
    model_folders,
    verify_folder,
)
from tests.conftest import DICOM_NODE, ROOT, require_extra

_ID, DATASET, TRAINER = TASK_DATASETS["total_fast"][0]
OTHER_TRAINER = "nnUNetTrainer__nnUNetPlans__3d_fullres"


def run(*args: str, config: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The command as an admin runs it: its exit code, stdout and stderr (log lines included).

    ``weights import`` and ``weights list`` run in this process (a new interpreter loading torch cost about 3 s a
    command); the others, and any given an ``env``, in a process of their own (``weights download`` points
    TotalSegmentator's package at the weights folder through the environment, for the rest of its process)."""
    if env is not None or tuple(args[:2]) not in IN_PROCESS_COMMANDS:
        return subprocess.run(
            [DICOM_NODE, *args, "--config", str(config)], capture_output=True, text=True, timeout=300, env=env
        )
    from typer.testing import CliRunner

    from dicom_node.cli import app

    with _process_state_kept():
        logging.getLogger().handlers[:] = [_StderrNow(logging.WARNING)]  # a command's own process has Python's
        result = CliRunner().invoke(app, [*args, "--config", str(config)])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return subprocess.CompletedProcess([*args], result.exit_code, result.stdout, result.stderr)


IN_PROCESS_COMMANDS = {("weights", "import"), ("weights", "list")}


class _StderrNow(logging.StreamHandler):  # type: ignore[type-arg]
    """Log lines to whatever ``sys.stderr`` is when they are written (the runner's while a command runs), as Python
    writes warnings to stderr in a process where nothing configured logging."""

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


@contextmanager
def _process_state_kept() -> Iterator[None]:
    """What a command sets for its whole process (log handlers and levels, the warnings hook, the umask, the
    environment) put back
    after it, so a command run in the tests' process leaves the next test as it found it."""
    from pynetdicom import _config as pynetdicom_config

    root = logging.getLogger()
    handlers, level, shown = root.handlers[:], root.level, warnings.showwarning
    levels = {name: logging.getLogger(name).level for name in ("pynetdicom", "alembic", "highdicom")}
    handler_level = pynetdicom_config.LOG_HANDLER_LEVEL
    umask = os.umask(0o022)
    os.umask(umask)
    environment = dict(os.environ)
    try:
        yield
    finally:
        if os.environ != environment:
            os.environ.clear()
            os.environ.update(environment)
        root.handlers[:] = handlers
        root.setLevel(level)
        warnings.showwarning = shown
        for name, named_level in levels.items():
            logging.getLogger(name).setLevel(named_level)
        pynetdicom_config.LOG_HANDLER_LEVEL = handler_level
        os.umask(umask)


def make_config(tmp_path: Path, extra: str = "") -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(f"storage: {{directory: {tmp_path / 'storage'}}}\n{extra}")
    return config


def release_entries(weights: Path) -> dict[str, bytes]:
    """The files of the total_fast release, as a zip holds them (``Dataset297_.../<trainer>/...``)."""
    return {
        path.relative_to(weights).as_posix(): path.read_bytes()
        for path in sorted((weights / DATASET).rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    }


def write_zip(path: Path, entries: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    """A zip of ``entries``; each of ``links`` (name -> target) is stored as a symbolic link, as `zip -y` does."""
    with zipfile.ZipFile(path, "w") as bundle:
        for name, content in entries.items():
            bundle.writestr(name, content)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            bundle.writestr(info, target)
    return path


@pytest.fixture
def release(total_fast_test_weights, tmp_path) -> dict[str, bytes]:
    require_extra("torch")
    return release_entries(total_fast_test_weights)


@pytest.fixture
def installed(release, tmp_path) -> Path:
    """A working total_fast install in <storage>/weights (imported from the release zip); returns the weights folder."""
    weights = tmp_path / "storage" / "weights"
    import_zip(write_zip(tmp_path / f"{DATASET}.zip", release), weights)
    assert identify("total_fast", model_folders("total_fast", weights))
    return weights


def _fingerprint(weights: Path) -> dict[str, str]:
    """Every file of the installed dataset folder and its SHA-256 (what a refused import must leave as it was)."""
    return {
        path.relative_to(weights).as_posix(): file_sha256(path)
        for path in sorted((weights / DATASET).rglob("*"))
        if path.is_file()
    }


def _no_staging_left(weights: Path) -> bool:
    """Only the dataset folder (and the lock imports take turns with) in the weights folder: no ``.import-…``."""
    return sorted(p.name for p in weights.iterdir() if p.name != IMPORT_LOCK_NAME) == [DATASET]


# 1. weights download never approves weights changed after they were installed.


def test_download_refuses_a_folder_whose_weights_changed_since_install_and_keeps_its_manifest(installed, tmp_path):
    require_extra("totalsegmentator")
    checkpoint = installed / DATASET / TRAINER / "fold_0" / "checkpoint_final.pth"
    checkpoint.write_bytes(checkpoint.read_bytes() + b"\0")  # changed after install
    manifest = installed / DATASET / TRAINER / MANIFEST_NAME
    recorded = manifest.read_bytes()

    result = run("weights", "download", "--task", "total_fast", config=make_config(tmp_path))

    assert result.returncode == 1, result.stdout
    assert str(installed / DATASET) in result.stderr
    assert "fold_0/checkpoint_final.pth differ from the recorded SHA-256" in result.stderr
    assert "move that folder aside (or delete it) and run the download again" in result.stderr
    assert "Traceback" not in result.stderr and "Error" not in result.stderr
    assert manifest.read_bytes() == recorded
    with pytest.raises(WeightsCorrupt, match="changed since they were installed"):
        identify("total_fast", model_folders("total_fast", installed))


def test_download_writes_no_manifest_for_a_folder_it_did_not_add(total_fast_test_weights, tmp_path):
    """TotalSegmentator's downloader keeps a folder that exists: the download must not record it as installed
    (a model records a folder placed by hand when it first loads, as before)."""
    require_extra("totalsegmentator")
    weights = tmp_path / "storage" / "weights"
    shutil.copytree(total_fast_test_weights / DATASET, weights / DATASET)
    for manifest in weights.rglob(MANIFEST_NAME):
        manifest.unlink()

    result = run("weights", "download", "--task", "total_fast", config=make_config(tmp_path))

    assert result.returncode == 0, result.stderr
    assert f"already there {weights / DATASET / TRAINER}" in result.stdout
    assert not (weights / DATASET / TRAINER / MANIFEST_NAME).exists()


def _placed_by_hand_without_channel_names(weights: Path, into: Path) -> Path:
    """A copy of the total_fast weights in ``into`` without a manifest, its dataset.json lacking channel_names;
    returns that dataset.json."""
    shutil.copytree(weights / DATASET, into / DATASET)
    for manifest in into.rglob(MANIFEST_NAME):
        manifest.unlink()
    description = into / DATASET / TRAINER / "dataset.json"
    description.write_bytes(without_key(description.read_bytes(), "channel_names"))
    return description


def test_download_refuses_a_folder_already_there_whose_dataset_json_nnunet_cannot_read(
    total_fast_test_weights, tmp_path
):
    """It used to answer "already there" (audited as a success) and only a worker start failed, with a traceback."""
    weights = tmp_path / "storage" / "weights"
    description = _placed_by_hand_without_channel_names(total_fast_test_weights, weights)

    result = run("weights", "download", "--task", "total_fast", config=make_config(tmp_path))

    assert result.returncode == 1, result.stdout
    assert "already there" not in result.stdout
    assert result.stderr.startswith(
        f"download refused: {weights / DATASET} already holds weights a model cannot load ({description} is not a "
        'dataset description as nnU-Net writes it: it names no input channel ("channel_names"'
    ), result.stderr
    assert "move that folder aside (or delete it) and run the download again" in result.stderr
    assert "Traceback" not in result.stderr and "Error" not in result.stderr


def test_config_check_and_weights_list_name_the_file_of_installed_weights_nnunet_cannot_read(
    total_fast_test_weights, tmp_path
):
    weights = tmp_path / "storage" / "weights"
    description = _placed_by_hand_without_channel_names(total_fast_test_weights, weights)
    config = make_config(tmp_path, "models:\n  ts: {kind: totalsegmentator, task: total_fast}\n")

    checked = run("config", "check", config=config)
    listed = run("weights", "list", config=config)

    assert checked.returncode == 0, checked.stderr
    assert (
        f"warning: model 'ts' cannot be loaded on this host: {description} is not a dataset description as nnU-Net "
        'writes it: it names no input channel ("channel_names", e.g. {"0": "CT"}); import the release zip again with '
        "`dicom-node weights import FILE.zip`, which replaces that folder. Until then every series sent to it fails."
    ) in " ".join(checked.stdout.split())
    assert "total_fast installed but not usable: " in " ".join(listed.stdout.split()), listed.stdout
    assert f"{description} is not a dataset description as nnU-Net writes it" in " ".join(listed.stdout.split())


def test_download_keeps_totalsegmentators_progress_lines_off_stdout(tmp_path):
    require_extra("totalsegmentator")
    env = {**os.environ, "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    for name in ("NO_PROXY", "no_proxy", "https_proxy", "http_proxy", "TOTALSEG_WEIGHTS_PATH"):
        env.pop(name, None)

    result = run("weights", "download", "--task", "total_fast", config=make_config(tmp_path), env=env)

    assert result.returncode == 1
    assert result.stdout == ""  # TotalSegmentator prints "Downloading model for Task 297 ..." here
    assert "cannot download the weights from github.com" in result.stderr


# 2. weights import refuses a zip the node cannot use, and never loses the working install.


@pytest.mark.parametrize(
    ("kind", "said"),
    [
        (
            "other-trainer",
            rf"{DATASET}/{TRAINER}/ lacks plans\.json, dataset\.json, fold_0/checkpoint_final\.pth \(it holds "
            rf"{OTHER_TRAINER} instead\), and the node loads only that folder, so nothing was installed",
        ),
        ("symlink", rf"entry '{DATASET}/{TRAINER}/dataset\.json' is a symbolic link, .* so nothing was installed"),
        ("plans-not-json", rf"{DATASET}/{TRAINER}/plans\.json is not a JSON object .*, so nothing was installed"),
        ("dataset-a-list", rf"{DATASET}/{TRAINER}/dataset\.json is not a JSON object .*, so nothing was installed"),
        ("unknown-dataset", r"holds Dataset999_Other, which none of the node's tasks uses \(they use Dataset291, "),
        (  # what the model would refuse to load is refused before it replaces the working install
            "swapped-labels",
            rf": the weights in {DATASET}/{TRAINER} do not label the structures as the installed TotalSegmentator "
            r"\S+ names them \(2 label numbers name another structure, e\.g\. 2 is 'kidney_left' in the weights and "
            r"'kidney_right' in the package\): .*of one release\. Nothing was installed\.$",
        ),
        (  # labels nnU-Net cannot use are refused in a sentence, before nnU-Net reads them
            "no-labels",
            rf": {DATASET}/{TRAINER}/dataset\.json cannot name the model's output: it has no \"labels\" table of "
            r"structure names and label numbers; install the weights as TotalSegmentator publishes them\. Nothing was "
            r"installed\.$",
        ),
        (
            "no-background",
            rf": {DATASET}/{TRAINER}/dataset\.json cannot name the model's output: its labels give no number for "
            r"\"background\" \(it must be 0\); .*\. Nothing was installed\.$",
        ),
        (
            "background-7",
            rf": {DATASET}/{TRAINER}/dataset\.json cannot name the model's output: its labels number \"background\" 7, "
            r"where it must be 0; .*\. Nothing was installed\.$",
        ),
        (
            "label-true",
            rf": {DATASET}/{TRAINER}/dataset\.json cannot name the model's output: its label 'spleen' is true, not one "
            r"whole label number; .*\. Nothing was installed\.$",
        ),
        (  # one number, two names: the results would name the structure after whichever came last
            "number-named-twice",
            rf": {DATASET}/{TRAINER}/dataset\.json cannot name the model's output: its label number 1 has two names, "
            r"'tumor' and 'spleen'; .*\. Nothing was installed\.$",
        ),
        (
            "foreign-checkpoint",
            rf": {DATASET}/{TRAINER}/fold_0/checkpoint_final\.pth does not fit the network that {DATASET}/{TRAINER}/"
            r"plans\.json and dataset\.json describe \(1 layer\(s\) differ in size, .*\. Nothing was installed\.$",
        ),
        (
            "other-spacing",
            rf": the weights in {DATASET}/{TRAINER} work at 6 x 6 x 6 mm spacing \(plans\.json\), where this task's "
            rf"models work at 3 mm; install the release zip of {DATASET}\. Nothing was installed\.$",
        ),
        (
            "plans-class",
            rf": {DATASET}/{TRAINER}/plans\.json names the class 'torch\.nn\.modules\.module\.torch\.nn\.Conv3d' as "
            r"conv_op \(arch_kwargs\), which is not a network building block .*\. Nothing was installed\.$",
        ),
        (  # one NaN in the output layer's bias labelled every voxel of a CT, air included, as that channel
            "nan-in-output-layer",
            rf": {DATASET}/{TRAINER}/fold_0/checkpoint_final\.pth holds values that are not numbers \(NaN\) in layer "
            r"decoder\.seg_layers\.\d+\.bias: the weights file is damaged; import it again from a good copy\. Nothing "
            r"was installed\.$",
        ),
        (
            "infinity-in-first-layer",
            rf": {DATASET}/{TRAINER}/fold_0/checkpoint_final\.pth holds infinite values in layer "
            r"encoder\.stages\.0\.0\.convs\.0\.conv\.weight: the weights file is damaged; import it again from a good "
            r"copy\. Nothing was installed\.$",
        ),
        (  # nnU-Net read it as it built the network: a traceback (KeyError), no audit record
            "no-channel-names",
            rf": {DATASET}/{TRAINER}/dataset\.json is not a dataset description as nnU-Net writes it: it names no input "
            r"channel \(\"channel_names\", .*; install the weights as TotalSegmentator publishes them\. Nothing was "
            r"installed\.$",
        ),
        (
            "plans-without-transpose",
            rf": {DATASET}/{TRAINER}/plans\.json is not a plans file as nnU-Net writes it: it has no "
            r"\"transpose_forward\"; .*\. Nothing was installed\.$",
        ),
        (
            "configuration-without-patch-size",
            rf": {DATASET}/{TRAINER}/plans\.json is not a plans file as nnU-Net writes it: its configuration "
            r"'3d_fullres' has no \"patch_size\"; .*\. Nothing was installed\.$",
        ),
        (
            "checkpoint-without-network-weights",
            rf": {DATASET}/{TRAINER}/fold_0/checkpoint_final\.pth is not an nnU-Net checkpoint \(network_weights, "
            r"trainer_name or init_args missing\)\. Nothing was installed\.$",
        ),
        (  # its own end record gone, zipfile finds the one of the checkpoint stored inside it
            "missing-its-last-bytes",
            r" is damaged or cut short \(it does not end as a zip ends\), so nothing was installed; copy it again$",
        ),
    ],
)
def test_import_refuses_a_zip_the_node_cannot_use_and_keeps_the_working_install(
    installed, release, tmp_path, kind, said
):
    before = _fingerprint(installed)
    plans = f"{DATASET}/{TRAINER}/plans.json"
    description = f"{DATASET}/{TRAINER}/dataset.json"
    links = None
    if kind == "other-trainer":
        entries = {name.replace(TRAINER, OTHER_TRAINER): content for name, content in release.items()}
    elif kind == "symlink":
        entries = {name: content for name, content in release.items() if name != description}
        links = {description: "/etc/passwd"}
    elif kind == "plans-not-json":
        entries = {**release, plans: b"not json at all"}
    elif kind == "dataset-a-list":
        entries = {**release, description: b"[1, 2, 3]"}
    elif kind == "swapped-labels":
        entries = {**release, description: _swap_kidneys(release[description])}
    elif kind in LABEL_CHANGES:
        entries = {**release, description: _change_labels(release[description], LABEL_CHANGES[kind])}
    elif kind == "foreign-checkpoint":
        checkpoint = f"{DATASET}/{TRAINER}/fold_0/checkpoint_final.pth"
        entries = {**release, checkpoint: _resize_first_layer(release[checkpoint])}
    elif kind in ("nan-in-output-layer", "infinity-in-first-layer"):
        checkpoint = f"{DATASET}/{TRAINER}/fold_0/checkpoint_final.pth"
        output_layer = kind == "nan-in-output-layer"
        value = float("nan") if output_layer else float("inf")
        entries = {**release, checkpoint: with_one_value(release[checkpoint], value, output_layer=output_layer)}
    elif kind == "no-channel-names":
        entries = {**release, description: without_key(release[description], "channel_names")}
    elif kind == "plans-without-transpose":
        entries = {**release, plans: without_key(release[plans], "transpose_forward")}
    elif kind == "configuration-without-patch-size":
        entries = {**release, plans: without_key(release[plans], "configurations", "3d_fullres", "patch_size")}
    elif kind == "checkpoint-without-network-weights":
        checkpoint = f"{DATASET}/{TRAINER}/fold_0/checkpoint_final.pth"
        entries = {**release, checkpoint: _without_network_weights(release[checkpoint])}
    elif kind == "other-spacing":
        entries = {**release, plans: _change_architecture(release[plans], spacing=[6.0, 6.0, 6.0])}
    elif kind == "plans-class":
        entries = {
            **release,
            plans: _change_architecture(release[plans], conv_op="torch.nn.modules.module.torch.nn.Conv3d"),
        }
    else:
        entries = {**release, **{n.replace(DATASET, "Dataset999_Other"): c for n, c in release.items()}}
    archive = write_zip(tmp_path / f"{kind}.zip", entries, links)
    if kind == "missing-its-last-bytes":
        archive.write_bytes(archive.read_bytes()[:-100])

    result = run("weights", "import", str(archive), config=make_config(tmp_path))

    assert result.returncode == 1, result.stdout
    assert result.stderr.startswith(f"import failed: {archive}")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # one sentence
    assert re.search(said, result.stderr), result.stderr
    assert "imported" not in result.stdout
    assert _fingerprint(installed) == before
    assert _no_staging_left(installed)
    identify("total_fast", model_folders("total_fast", installed))  # still verifies


LABEL_CHANGES = {
    "no-labels": lambda labels: None,
    "no-background": lambda labels: {k: v for k, v in labels.items() if k != "background"},
    "background-7": lambda labels: {**labels, "background": 7},
    "label-true": lambda labels: {**labels, "spleen": True},
    "number-named-twice": lambda labels: {"background": 0, "tumor": 1, **labels},
}
"""How each refused dataset.json changes the release's labels (None: no labels at all)."""


def _change_labels(dataset_json: bytes, change) -> bytes:
    described = json.loads(dataset_json)
    labels = change(described.pop("labels"))
    if labels is not None:
        described["labels"] = labels
    return json.dumps(described).encode()


def without_key(json_file: bytes, *keys: str) -> bytes:
    """A JSON file without the entry at ``keys`` (a path into nested objects)."""
    described = json.loads(json_file)
    inner = described
    for key in keys[:-1]:
        inner = inner[key]
    del inner[keys[-1]]
    return json.dumps(described).encode()


def _without_network_weights(checkpoint: bytes) -> bytes:
    import io

    import torch

    from inference.models.checkpoints import load_checkpoint

    loaded = load_checkpoint(Path("checkpoint_final.pth"), checkpoint)
    del loaded["network_weights"]
    written = io.BytesIO()
    torch.save(loaded, written)
    return written.getvalue()


def _swap_kidneys(dataset_json: bytes) -> bytes:
    described = json.loads(dataset_json)
    labels = described["labels"]
    labels["kidney_left"], labels["kidney_right"] = labels["kidney_right"], labels["kidney_left"]
    return json.dumps(described).encode()


def _resize_first_layer(checkpoint: bytes, *, resize: bool = True) -> bytes:
    """The checkpoint with its first layer's weights of another size (as another model's checkpoint has), or, with
    ``resize=False``, of the same size and other values (as a retrained model's checkpoint has)."""
    import io

    import torch

    from inference.models.checkpoints import load_checkpoint

    loaded = load_checkpoint(Path("checkpoint_final.pth"), checkpoint)
    first = next(iter(loaded["network_weights"]))
    layer = loaded["network_weights"][first]
    loaded["network_weights"][first] = torch.zeros(1) if resize else layer + 0.5
    written = io.BytesIO()
    torch.save(loaded, written)
    return written.getvalue()


def with_one_value(checkpoint: bytes, value: float, *, output_layer: bool) -> bytes:
    """The checkpoint with one value set to ``value``: channel 5 (liver) of the output layer's bias, or the first
    value of the first layer's weights."""
    import io

    import torch

    from inference.models.checkpoints import load_checkpoint

    loaded = load_checkpoint(Path("checkpoint_final.pth"), checkpoint)
    layers = loaded["network_weights"]
    name = [name for name in layers if name.endswith(".bias")][-1] if output_layer else next(iter(layers))
    layers[name].view(-1)[5 if output_layer else 0] = value
    written = io.BytesIO()
    torch.save(loaded, written)
    return written.getvalue()


def _change_architecture(plans: bytes, spacing: list[float] | None = None, **arch_kwargs: object) -> bytes:
    described = json.loads(plans)
    configuration = described["configurations"]["3d_fullres"]
    if spacing is not None:
        configuration["spacing"] = spacing
    configuration["architecture"]["arch_kwargs"].update(arch_kwargs)
    return json.dumps(described).encode()


def test_import_replaces_a_working_install_only_with_a_complete_one(installed, release, tmp_path):
    checkpoint = f"{DATASET}/{TRAINER}/fold_0/checkpoint_final.pth"
    stale = installed / DATASET / TRAINER / "stale-file"
    stale.write_text("from the old install")
    newer = dict(release)
    newer[f"{DATASET}/{TRAINER}/plans.json"] = json.dumps(json.loads(release[f"{DATASET}/{TRAINER}/plans.json"]))
    archive = write_zip(tmp_path / f"{DATASET}.zip", newer)

    result = run("weights", "import", str(archive), config=make_config(tmp_path))

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"imported {installed / DATASET}"
    assert "Workers already running keep the weights they loaded" in result.stdout
    assert not stale.exists()  # the old folder was replaced as a whole
    assert (installed / checkpoint).read_bytes() == release[checkpoint]
    hashes, had_manifest = verify_folder(installed / DATASET / TRAINER)
    assert had_manifest and hashes == folder_hashes(installed / DATASET / TRAINER)
    assert _no_staging_left(installed)


# 3. Imports at the same time do not share a staging folder; a failed one leaves none behind.


def test_imports_of_archives_with_the_same_name_at_the_same_time_both_install_whole_weights(release, tmp_path):
    weights = tmp_path / "weights"
    archives = []
    for n in range(4):
        (tmp_path / f"copy{n}").mkdir()
        archives.append(write_zip(tmp_path / f"copy{n}" / f"{DATASET}.zip", release))
    failures: list[BaseException] = []
    start = threading.Barrier(len(archives))

    def install(archive: Path) -> None:
        start.wait()
        try:
            import_zip(archive, weights)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
            failures.append(exc)

    threads = [threading.Thread(target=install, args=(archive,)) for archive in archives]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)

    assert not failures, failures
    identify("total_fast", model_folders("total_fast", weights))
    assert _no_staging_left(weights)


def test_an_import_that_fails_while_unpacking_leaves_no_staging_folder_and_the_install_as_it_was(
    installed, release, tmp_path
):
    archive = write_zip(tmp_path / f"{DATASET}.zip", release)
    data = bytearray(archive.read_bytes())
    checkpoint = release[f"{DATASET}/{TRAINER}/fold_0/checkpoint_final.pth"]
    offset = bytes(data).index(checkpoint[-4096:])
    data[offset : offset + 16] = bytes(16)  # damaged in transit: the CRC check fails while unpacking
    archive.write_bytes(bytes(data))
    before = _fingerprint(installed)

    result = run("weights", "import", str(archive), config=make_config(tmp_path))

    assert result.returncode == 1
    assert f"import failed: {archive} is not a zip file, or it is damaged (copy it again)" in result.stderr
    assert _fingerprint(installed) == before
    assert _no_staging_left(installed)


_KILLED_WHILE_SWAPPING = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
import inference.weights as weights
rename = Path.rename
into, count = sys.argv[4], int(sys.argv[5])
renamed = []
def rename_then_die(self, target):
    moved = rename(self, target)
    if Path(target).parent.name == into:
        renamed.append(target)
        if len(renamed) == count:  # power loss: the process ends right after this rename
            os.kill(os.getpid(), signal.SIGKILL)
    return moved
Path.rename = rename_then_die
weights.import_zip(Path(sys.argv[1]), Path(sys.argv[2]))
"""


def _kill_an_import_while_it_swaps(archive: Path, weights: Path, *, into: str = "replaced", count: int = 1) -> Path:
    """Run an import in a process that is killed (SIGKILL, as by power loss) right after its ``count``-th rename
    into the folder named ``into`` ("replaced": an installed folder put aside; the weights folder's name: a new
    folder put in); returns the staging folder it left."""
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_WHILE_SWAPPING, str(archive), str(weights), str(ROOT), into, str(count)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr
    (staging,) = weights.glob(".import-*")
    return staging


def _required_hashes(weights: Path) -> dict[str, str]:
    """The SHA-256 of the files the model loads, as the weights list names them."""
    return folder_hashes(weights / DATASET / TRAINER)


def test_a_killed_import_whose_new_folder_was_not_complete_on_disk_is_undone_by_weights_list(
    installed, release, tmp_path
):
    before = _fingerprint(installed)
    staging = _kill_an_import_while_it_swaps(write_zip(tmp_path / f"{DATASET}.zip", release), installed)
    assert not (installed / DATASET).exists()  # the installed folder is aside, the new one not in yet
    staged = staging / "unpacked" / DATASET / TRAINER / "fold_0" / "checkpoint_final.pth"
    staged.write_bytes(staged.read_bytes()[:1000])  # the power loss came before its bytes reached the disk

    result = run("weights", "list", config=make_config(tmp_path))

    assert result.returncode == 0, result.stderr
    assert re.search(r"total_fast\s+installed", result.stdout), result.stdout
    assert result.stderr.strip() == (
        f"A weights import of Dataset297 from {DATASET}.zip was interrupted while it swapped its folders into "
        f"{installed} before its new weights were complete on disk, so every folder was put back: the weights "
        "installed before it are in Dataset297 again."
    )
    assert _fingerprint(installed) == before
    assert _no_staging_left(installed)


def test_a_killed_import_whose_new_folder_is_complete_is_finished_when_the_model_loads(
    installed, release, tmp_path, caplog
):
    from inference.models.totalsegmentator import TotalSegmentatorModel

    checkpoint = f"{DATASET}/{TRAINER}/fold_0/checkpoint_final.pth"
    newer = {**release, checkpoint: _resize_first_layer(release[checkpoint], resize=False)}  # same network, new bytes
    _kill_an_import_while_it_swaps(write_zip(tmp_path / "newer.zip", newer), installed)

    with caplog.at_level(logging.WARNING, logger="inference.weights"):
        model = TotalSegmentatorModel("total_fast", installed, device="cpu", backend="torch")

    assert (
        f"A weights import of Dataset297 from newer.zip was interrupted while it swapped its folders into {installed}; "
        "its new weights were complete, so the import was finished: the weights of newer.zip are installed in "
        "Dataset297."
    ) in caplog.text
    assert (installed / checkpoint).read_bytes() == newer[checkpoint]
    assert model.weights.folder_hashes == (_required_hashes(installed),)
    assert _no_staging_left(installed)


def test_the_next_import_finishes_what_a_killed_import_left_and_installs(installed, release, tmp_path):
    """Killed after its new folder went in, an import leaves the old folder in its staging folder: the next
    import finishes it, deletes that folder (a leftover never holds gigabytes for ever) and installs as usual."""
    archive = write_zip(tmp_path / f"{DATASET}.zip", release)
    staging = _kill_an_import_while_it_swaps(archive, installed, into=installed.name)
    assert [p.name for p in staging.glob("replaced/*")] == [DATASET]

    result = run("weights", "import", str(archive), config=make_config(tmp_path))

    assert result.returncode == 0, result.stderr
    assert "the import was finished" in result.stderr and "put back" not in result.stderr
    assert _no_staging_left(installed)
    identify("total_fast", model_folders("total_fast", installed))


# 3b. A release of several folders (the total task's five) is installed whole or not at all.


def _described(tag: str) -> tuple[str, str]:
    """A dataset.json and a plans.json marked ``tag`` that hold what the node checks nnU-Net reads (no network is
    built from them: their values are placeholders)."""
    from inference.models.checkpoints import NNUNET_ARCHITECTURE_KEYS, NNUNET_CONFIGURATION_KEYS

    configuration: dict[str, object] = dict.fromkeys(NNUNET_CONFIGURATION_KEYS)
    configuration["architecture"] = dict.fromkeys(NNUNET_ARCHITECTURE_KEYS)
    plans = {
        "release": tag,
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "foreground_intensity_properties_per_channel": {},
        "configurations": {"3d_fullres": configuration},
    }
    dataset = {"release": tag, "channel_names": {"0": "CT"}, "labels": {"background": 0, "structure": 1}}
    return json.dumps(dataset), json.dumps(plans)


def _total_release(tmp_path: Path, tag: str) -> Path:
    """A zip of the five ``total`` folders, each with files marked ``tag`` (no model loads them)."""
    import io

    import torch

    checkpoint = io.BytesIO()
    torch.save({"network_weights": {"w": torch.zeros(1)}, "trainer_name": "nnUNetTrainer", "init_args": {}}, checkpoint)
    archive = tmp_path / f"total-{tag}.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for _id, dataset, trainer in TASK_DATASETS["total"]:
            description, plans = _described(tag)
            bundle.writestr(f"{dataset}/{trainer}/plans.json", plans)
            bundle.writestr(f"{dataset}/{trainer}/dataset.json", description)
            bundle.writestr(f"{dataset}/{trainer}/fold_0/checkpoint_final.pth", checkpoint.getvalue())
    return archive


def _total_releases(weights: Path) -> list[str]:
    """Which release each of the five folders holds now."""
    return [
        json.loads((weights / dataset / trainer / "plans.json").read_text())["release"]
        for _id, dataset, trainer in TASK_DATASETS["total"]
    ]


@pytest.fixture
def total_v1_and_v2(tmp_path) -> tuple[Path, Path, Path, dict[str, str]]:
    """Release v1 of ``total`` installed in <storage>/weights, the zip of release v2, and each release's SHA-256
    as `weights list` names it (a clean install of each elsewhere): (weights, v1 zip, v2 zip, {tag: sha256})."""
    require_extra("torch")
    v1, v2 = _total_release(tmp_path, "v1"), _total_release(tmp_path, "v2")
    identities = {}
    for tag, archive in (("v1", v1), ("v2", v2)):
        import_zip(archive, tmp_path / f"clean-{tag}")
        identities[tag] = identify("total", model_folders("total", tmp_path / f"clean-{tag}")).sha256
    weights = tmp_path / "storage" / "weights"
    import_zip(v1, weights)
    return weights, v1, v2, identities


def test_an_import_of_five_folders_killed_midway_is_finished_whole_by_weights_list(total_v1_and_v2, tmp_path):
    weights, _v1, v2, identities = total_v1_and_v2
    staging = _kill_an_import_while_it_swaps(v2, weights, count=3)  # Dataset291-292 swapped, 293 just put aside
    assert sorted(p.name.split("_")[0] for p in staging.glob("replaced/*")) == [
        "Dataset291",
        "Dataset292",
        "Dataset293",
    ]

    result = run("weights", "list", config=make_config(tmp_path))

    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == (
        f"A weights import of Dataset291-295 from total-v2.zip was interrupted while it swapped its folders into "
        f"{weights}; its new weights were complete, so the import was finished: the weights of total-v2.zip are "
        "installed in Dataset291-295."
    )
    assert re.search(rf"total\s+installed  sha256:{identities['v2']}\n", result.stdout), result.stdout
    assert _total_releases(weights) == ["v2"] * 5
    assert not list(weights.glob(".import-*"))


def test_an_import_of_five_folders_killed_midway_with_a_new_folder_incomplete_is_undone_whole(
    total_v1_and_v2, tmp_path
):
    weights, _v1, v2, identities = total_v1_and_v2
    staging = _kill_an_import_while_it_swaps(v2, weights, count=3)
    _id, dataset, trainer = TASK_DATASETS["total"][4]
    (staging / "unpacked" / dataset / trainer / "plans.json").write_bytes(b"")  # not on disk before the power loss

    result = run("weights", "list", config=make_config(tmp_path))

    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == (
        f"A weights import of Dataset291-295 from total-v2.zip was interrupted while it swapped its folders into "
        f"{weights} before its new weights were complete on disk, so every folder was put back: the weights "
        "installed before it are in Dataset291-295 again."
    )
    assert re.search(rf"total\s+installed  sha256:{identities['v1']}\n", result.stdout), result.stdout
    assert _total_releases(weights) == ["v1"] * 5
    assert not list(weights.glob(".import-*"))


def test_an_import_waits_while_a_model_identifies_the_installed_folders(total_v1_and_v2):
    """A model loading while an import swaps would identify some folders of each release: the import waits."""
    from inference.weights import imports_held_off

    weights, _v1, v2, _identities = total_v1_and_v2
    importing = threading.Thread(target=import_zip, args=(v2, weights))

    with imports_held_off(weights):
        importing.start()
        importing.join(timeout=5)  # long enough for the import to finish were it not held off
        releases_while_held = _total_releases(weights)
        still_waiting = importing.is_alive()
    importing.join(timeout=300)

    assert still_waiting and releases_while_held == ["v1"] * 5
    assert _total_releases(weights) == ["v2"] * 5


def test_a_process_that_cannot_finish_a_killed_import_does_not_use_the_mixed_folders(total_v1_and_v2):
    """A worker that may only read the weights folder cannot finish or undo the import: it loads none of them."""
    weights, _v1, v2, _identities = total_v1_and_v2
    staging = _kill_an_import_while_it_swaps(v2, weights, count=3)

    with pytest.raises(WeightsMissing) as refused:
        model_folders("total", weights)

    assert "a weights import was interrupted while it replaced them and is not finished or undone yet" in str(
        refused.value
    )
    assert stat.S_IMODE(staging.stat().st_mode) == 0o755  # a node running as another user can read its plan
    assert str(staging) in str(refused.value)
    assert "run `dicom-node weights list` as a user who may write to that folder" in str(refused.value)


_FAILED_THEN_KILLED = """
import os, shutil, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
import inference.weights as weights
rename = Path.rename
renamed = []
def rename_or_fail(self, target):
    if Path(target).parent.name == "replaced":
        renamed.append(target)
        if len(renamed) == 3:
            raise OSError(5, "Input/output error")  # the third folder cannot be put aside: the import gives up
    return rename(self, target)
Path.rename = rename_or_fail
shutil.rmtree = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)  # power loss before the clean-up
weights.import_zip(Path(sys.argv[1]), Path(sys.argv[2]))
"""


def test_an_import_that_gave_up_and_put_every_folder_back_is_not_finished_after_a_power_loss(total_v1_and_v2, tmp_path):
    """An import that failed midway put every folder back but kept its swap plan until its staging folder was
    deleted: killed in between, the next recovery found the plan and the complete new copies, and installed the
    release the operator had been told had failed."""
    weights, _v1, v2, identities = total_v1_and_v2
    killed = subprocess.run(
        [sys.executable, "-c", _FAILED_THEN_KILLED, str(v2), str(weights), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr
    assert _total_releases(weights) == ["v1"] * 5

    result = run("weights", "list", config=make_config(tmp_path))

    assert result.returncode == 0, result.stderr
    assert re.search(rf"total\s+installed  sha256:{identities['v1']}\n", result.stdout), result.stdout
    assert _total_releases(weights) == ["v1"] * 5
    assert not list(weights.glob(".import-*"))


# 4. A model with its own weights folder: --model installs there, and the "missing" sentence says so.


def test_import_and_download_install_into_the_weights_folder_of_the_model_named(release, tmp_path):
    own = tmp_path / "own"
    config = make_config(
        tmp_path,
        f"models:\n  ts: {{kind: totalsegmentator, task: total_fast, weights_directory: {own}}}\n"
        "  base: {kind: threshold}\n",
    )
    archive = write_zip(tmp_path / f"{DATASET}.zip", release)

    imported = run("weights", "import", str(archive), "--model", "ts", config=config)
    unknown = run("weights", "import", str(archive), "--model", "tss", config=config)
    threshold = run("weights", "download", "--model", "base", config=config)

    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.splitlines()[0] == f"imported {own / DATASET}"
    identify("total_fast", model_folders("total_fast", own))
    assert not (tmp_path / "storage" / "weights" / DATASET).exists()
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == (
        "--model 'tss' is not configured (the TotalSegmentator models in the configuration: ts)"
    )
    assert threshold.returncode == 2
    assert "--model 'base' is a threshold model, which needs no weights" in threshold.stderr


def test_download_with_model_uses_that_models_folder_and_task(installed, tmp_path):
    require_extra("totalsegmentator")
    config = make_config(
        tmp_path, f"models:\n  ts: {{kind: totalsegmentator, task: total_fast, weights_directory: {installed}}}\n"
    )
    default_folder = tmp_path / "elsewhere"
    env = {**os.environ, "TOTALSEG_WEIGHTS_PATH": str(default_folder)}

    result = run("weights", "download", "--model", "ts", config=config, env=env)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"already there {installed / DATASET / TRAINER}"
    assert not default_folder.exists()


def test_the_missing_weights_sentence_names_the_command_that_installs_where_the_model_looks(tmp_path):
    with pytest.raises(WeightsMissing) as named:
        model_folders("total_fast", tmp_path / "own", model="ts")
    with pytest.raises(WeightsMissing) as unnamed:
        model_folders("total_fast", tmp_path / "own")

    assert "`dicom-node weights download --task total_fast --model ts`" in str(named.value)
    assert "`dicom-node weights import FILE.zip --model ts`" in str(named.value)
    assert "add `--model NAME` to either command for a model whose configuration sets its own" in str(unnamed.value)
    for sentence in (str(named.value), str(unnamed.value)):
        assert sentence.count(". ") == 0 and sentence.endswith(".")


# 5. A weights folder the worker may only read, with no manifest: the model loads, and a warning says why.

_LOAD_AS_WORKER = """
import logging, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
from inference.models.totalsegmentator import TotalSegmentatorModel
model = TotalSegmentatorModel("total_fast", Path(sys.argv[1]), device="cpu", backend="torch")
print(model.weights.folder_hashes[0]["fold_0/checkpoint_final.pth"], bool(model.weights.unrecorded))
"""


def test_a_read_only_weights_folder_without_a_manifest_is_used_with_a_warning(total_fast_test_weights):
    top = Path(tempfile.mkdtemp(prefix="read-only-weights-"))  # outside pytest's private (0700) folder
    try:
        weights = top / "weights"
        shutil.copytree(total_fast_test_weights / DATASET, weights / DATASET)
        for manifest in weights.rglob(MANIFEST_NAME):
            manifest.unlink()  # as TotalSegmentator's own download leaves it
        for path in (top, *top.rglob("*")):
            path.chmod(0o555 if path.is_dir() else 0o444)
        worker = [sys.executable, "-c", _LOAD_AS_WORKER, str(weights), str(ROOT)]
        if os.geteuid() == 0:  # root may write anywhere: run as an unprivileged worker user
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip("setpriv is needed to run the check as an unprivileged user")
            worker = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *worker]
        folder = weights / DATASET / TRAINER

        result = subprocess.run(
            worker, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(top)}, cwd=top
        )

        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == [file_sha256(folder / "fold_0" / "checkpoint_final.pth"), "True"]
        warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING inference.")]
        assert len(warnings) == 1, result.stderr
        expected = f"The weights folder {folder} has no manifest ({MANIFEST_NAME}) and this process cannot write"
        assert expected in warnings[0]
        assert "changes to them will not be detected until a manifest is written" in warnings[0]
        assert not (folder / MANIFEST_NAME).exists()
    finally:
        for path in (top, *top.rglob("*")):
            if path.is_dir():
                path.chmod(0o755)
        shutil.rmtree(top)


def _copied_by_hand(weights: Path, into: Path) -> Path:
    """The total_fast folder copied in as TotalSegmentator's own download leaves it (no manifest); its trainer
    folder."""
    shutil.copytree(weights / DATASET, into / DATASET)
    for manifest in into.rglob(MANIFEST_NAME):
        manifest.unlink()
    return into / DATASET / TRAINER


def test_a_folder_copied_in_by_hand_is_recorded_once_a_model_has_loaded_it(total_fast_test_weights, tmp_path, caplog):
    from inference.models.totalsegmentator import TotalSegmentatorModel

    folder = _copied_by_hand(total_fast_test_weights, tmp_path)

    hashes, had_manifest = verify_folder(folder)
    identity = identify("total_fast", model_folders("total_fast", tmp_path))
    assert not had_manifest and identity.unrecorded == (folder,)
    assert not (folder / MANIFEST_NAME).exists()  # looking records nothing
    with caplog.at_level(logging.WARNING, logger="inference.weights"):
        model = TotalSegmentatorModel("total_fast", tmp_path, device="cpu", backend="torch")

    assert not caplog.records
    assert json.loads((folder / MANIFEST_NAME).read_text())["files"] == model.weights.folder_hashes[0] == hashes
    assert not list(folder.glob(f".{MANIFEST_NAME}*"))  # no partial file left beside it


def test_weights_list_records_no_manifest_for_a_copy_still_running_and_the_complete_copy_loads(
    total_fast_test_weights, tmp_path
):
    """A folder seen while its copy runs is listed as not recorded yet; nothing is recorded until a model loads it,
    so the complete copy loads, and only then is it recorded."""
    from inference.models import ModelUnavailable
    from inference.models.totalsegmentator import TotalSegmentatorModel

    weights = tmp_path / "storage" / "weights"
    folder = _copied_by_hand(total_fast_test_weights, weights)
    checkpoint = folder / "fold_0" / "checkpoint_final.pth"
    whole = checkpoint.read_bytes()
    checkpoint.write_bytes(whole[: len(whole) // 3])  # the copy is still running

    listed = run("weights", "list", config=make_config(tmp_path))
    with pytest.raises(ModelUnavailable, match="is not a readable PyTorch checkpoint"):
        TotalSegmentatorModel("total_fast", weights, device="cpu", backend="torch")
    checkpoint.write_bytes(whole)  # the copy completed
    model = TotalSegmentatorModel("total_fast", weights, device="cpu", backend="torch")
    relisted = run("weights", "list", config=make_config(tmp_path))

    assert listed.returncode == 0, listed.stderr
    assert re.search(
        r"total_fast\s+installed  sha256:[0-9a-f]{64} .*\(no manifest yet: recorded at the first successful load\)",
        listed.stdout,
    ), listed.stdout
    assert json.loads((folder / MANIFEST_NAME).read_text())["files"] == folder_hashes(folder)
    assert relisted.returncode == 0, relisted.stderr
    assert f"total_fast  installed  sha256:{model.weights.sha256} " in relisted.stdout
    assert "no manifest yet" not in relisted.stdout


def test_weights_changed_since_they_were_recorded_are_refused_naming_the_manifest(installed, tmp_path):
    folder = installed / DATASET / TRAINER
    checkpoint = folder / "fold_0" / "checkpoint_final.pth"
    checkpoint.write_bytes(checkpoint.read_bytes() + b"\0")

    result = run("weights", "list", config=make_config(tmp_path))

    assert result.returncode == 0, result.stderr
    listed = " ".join(result.stdout.split())  # as printed, wrapped to the terminal
    assert (
        f"total_fast installed but not usable: weights in {folder} changed since they were installed "
        f"(fold_0/checkpoint_final.pth differ from the SHA-256 recorded in {folder / MANIFEST_NAME}): the model was "
        "not loaded; import or download the weights again, which records the new files, or, where these files are "
        f"the ones meant (a folder copied in by hand), delete {MANIFEST_NAME} there and the next load that succeeds "
        "records them"
    ) in listed


# 6. A relative weights_directory is relative to the config file, like storage.directory.


def test_a_relative_model_weights_directory_is_relative_to_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "etc").mkdir()
    config = tmp_path / "etc" / "config.yaml"
    config.write_text(
        "storage: {directory: data}\nmodels:\n  ts: {kind: totalsegmentator, task: total_fast, weights_directory: w}\n"
    )
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")

    settings = load_settings(config)

    assert settings.models["ts"].weights_directory == tmp_path / "etc" / "w"  # type: ignore[union-attr]
    assert settings.storage.directory == tmp_path / "etc" / "data"
