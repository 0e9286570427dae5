"""TotalSegmentator model weights: where they must be, and how to get them there.

Layout (TotalSegmentator's own, so one folder serves both the node and the
reference tool)::

    <weights>/Dataset297_TotalSegmentator_total_3mm_1559subj/
        nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres/
            plans.json  dataset.json  fold_0/checkpoint_final.pth

On a connected machine ``dicom-node weights download`` fetches TotalSegmentator's
release zips; on an offline one ``dicom-node weights import FILE.zip`` unpacks a
zip carried over by hand (``--sha256`` checks it against a published hash first).

Every installed model folder gets a manifest, ``dicom-node-weights.json``, with the
SHA-256 of its plans, dataset description and checkpoint. A model verifies it when it
loads, and its results name the weights by folder and hash (:class:`WeightsIdentity`),
so a result can always be traced to the exact files that made it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

TRAINER_TOTAL = "nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres"
TRAINER_FAST = "nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres"

TASK_DATASETS: dict[str, list[tuple[int, str, str]]] = {
    # task -> [(dataset id, dataset folder, trainer folder)], in TotalSegmentator's order
    "total": [
        (291, "Dataset291_TotalSegmentator_part1_organs_1559subj", TRAINER_TOTAL),
        (292, "Dataset292_TotalSegmentator_part2_vertebrae_1532subj", TRAINER_TOTAL),
        (293, "Dataset293_TotalSegmentator_part3_cardiac_1559subj", TRAINER_TOTAL),
        (294, "Dataset294_TotalSegmentator_part4_muscles_1559subj", TRAINER_TOTAL),
        (295, "Dataset295_TotalSegmentator_part5_ribs_1559subj", TRAINER_TOTAL),
    ],
    "total_fast": [(297, "Dataset297_TotalSegmentator_total_3mm_1559subj", TRAINER_FAST)],
}

REQUIRED_FILES = ("plans.json", "dataset.json", "fold_0/checkpoint_final.pth")
MANIFEST_NAME = "dicom-node-weights.json"
"""Written beside plans.json at install: the SHA-256 of each required file."""
CONVERTED_MODELS_FOLDER = ".openvino"
"""Beside the Dataset folders: networks converted for a faster runtime, named by weights hash and runtime version."""
MAX_IMPORT_GIGABYTES = 20.0
"""Largest total unpacked size ``weights import`` accepts (the five ``total`` models are about 1.2 GB)."""
TEST_WEIGHTS_MARKERS = ("synthetic test weights", "not a trained model", "randomly initialised", "untrained")
"""Words in a dataset.json's name or description that mark weights that must not be used clinically."""


class WeightsMissing(RuntimeError):
    """Model weights are not where the node looks; the message names the commands that fix it."""


class WeightsCorrupt(RuntimeError):
    """Installed weights differ from what was installed, or an archive from its published hash."""


@dataclass(frozen=True)
class ModelFolder:
    dataset_id: int
    path: Path  # the trainer folder holding plans.json, dataset.json, fold_0/

    @property
    def complete(self) -> bool:
        return all((self.path / name).is_file() for name in REQUIRED_FILES)


def model_folders(task: str, weights_directory: Path) -> list[ModelFolder]:
    """The trainer folders a task needs, in order.

    Raises
    ------
    WeightsMissing
        If any is absent or incomplete.
    """
    if task not in TASK_DATASETS:
        raise ValueError(f"unknown TotalSegmentator task {task!r} (known: {', '.join(TASK_DATASETS)})")
    folders = [ModelFolder(i, weights_directory / d / t) for i, d, t in TASK_DATASETS[task]]
    missing = [f for f in folders if not f.complete]
    if missing:
        names = ", ".join(f"Dataset{f.dataset_id}" for f in missing)
        raise WeightsMissing(
            f"TotalSegmentator weights for task {task!r} are missing in {weights_directory} ({names}). "
            f"On a connected machine run `dicom-node weights download --task {task}`; on an offline one copy "
            f"the release zip(s) over and run `dicom-node weights import FILE.zip`."
        )
    return folders


def import_zip(
    archive: Path,
    weights_directory: Path,
    *,
    sha256: str | None = None,
    max_gigabytes: float = MAX_IMPORT_GIGABYTES,
) -> list[Path]:
    """Unpack a TotalSegmentator weights zip into the weights folder; returns the dataset folders added.

    Parameters
    ----------
    sha256
        The archive's published SHA-256; when given, a different archive is refused before unpacking.
    max_gigabytes
        Largest total unpacked size accepted (zip entries cannot unpack past their declared size).

    Raises
    ------
    ValueError
        If the zip is not a weights zip (no ``Dataset.../<trainer>/fold_0/checkpoint_final.pth``),
        has entries that would land outside the weights folder, or unpacks to more than ``max_gigabytes``.
    WeightsCorrupt
        If ``sha256`` is given and the archive's hash differs.
    """
    if sha256 is not None:
        actual = file_sha256(archive)
        if actual != sha256.strip().lower():
            raise WeightsCorrupt(
                f"{archive.name} has SHA-256 {actual}, not the expected {sha256.strip().lower()}: "
                "the file is damaged or not the published release; nothing was installed"
            )
    with zipfile.ZipFile(archive) as bundle:
        names = bundle.namelist()
        for name in names:
            parts = PurePosixPath(name).parts
            if PurePosixPath(name).is_absolute() or ".." in parts:
                raise ValueError(f"{archive}: unsafe entry {name!r}")
        unpacked = sum(info.file_size for info in bundle.infolist())
        if unpacked > max_gigabytes * 1024**3:
            raise ValueError(
                f"{archive}: unpacks to {unpacked / 1024**3:.1f} GB, more than the {max_gigabytes:g} GB a weights "
                "release can be; nothing was installed"
            )
        checkpoints = [n for n in names if n.endswith("fold_0/checkpoint_final.pth")]
        datasets = sorted(
            {PurePosixPath(n).parts[0] for n in checkpoints if PurePosixPath(n).parts[0].startswith("Dataset")}
        )
        if not datasets:
            raise ValueError(
                f"{archive}: not a TotalSegmentator weights zip (no Dataset*/…/fold_0/checkpoint_final.pth)"
            )
        weights_directory.mkdir(parents=True, exist_ok=True)
        staging = weights_directory / f".import-{archive.stem}"
        shutil.rmtree(staging, ignore_errors=True)
        bundle.extractall(staging)
    try:
        _refuse_unsafe_checkpoints(staging, checkpoints)
    except Exception:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    added = []
    for dataset in datasets:
        target = weights_directory / dataset
        if target.exists():
            shutil.rmtree(target)
        (staging / dataset).rename(target)
        added.append(target)
    shutil.rmtree(staging, ignore_errors=True)
    for trainer_folder in _trainer_folders(added):
        write_manifest(trainer_folder)
    return added


def _refuse_unsafe_checkpoints(staging: Path, checkpoints: Sequence[str]) -> None:
    """Read every checkpoint as data only before anything is installed (a pickle could run code)."""
    from inference.models.checkpoints import UnsafeWeights, load_checkpoint

    for name in checkpoints:
        try:
            load_checkpoint(staging / name)
        except UnsafeWeights as exc:
            raise ValueError(f"{str(exc).replace(str(staging / name), name)} Nothing was installed.") from None


def _trainer_folders(dataset_folders: Sequence[Path]) -> list[Path]:
    return [p.parent.parent for d in dataset_folders for p in d.glob("*/fold_0/checkpoint_final.pth")]


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(4 * 1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def folder_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of each required file of a trainer folder."""
    return {name: file_sha256(folder / name) for name in REQUIRED_FILES}


def write_manifest(folder: Path) -> dict[str, str]:
    """Record the folder's file hashes as installed (at import or download)."""
    hashes = folder_hashes(folder)
    manifest = {"files": hashes, "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return hashes


def verify_folder(folder: Path) -> tuple[dict[str, str], bool]:
    """The folder's file hashes, checked against its manifest.

    Returns the hashes and whether a manifest existed; a folder put in place by hand
    (no manifest) gets one now, so later changes are caught.

    Raises
    ------
    WeightsCorrupt
        If a file's hash differs from the manifest recorded at install.
    """
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        return write_manifest(folder), False
    try:
        recorded = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        raise WeightsCorrupt(f"the weights manifest {manifest_path} is unreadable; import the weights again") from None
    hashes = folder_hashes(folder)
    changed = [name for name in REQUIRED_FILES if recorded.get(name) != hashes[name]]
    if changed:
        raise WeightsCorrupt(
            f"weights in {folder} changed since they were installed ({', '.join(changed)} differ from the recorded "
            "SHA-256): the model was not loaded; import or download the weights again"
        )
    return hashes, True


def installed_hashes(folder: Path) -> dict[str, str]:
    """The file hashes a trainer folder's manifest records (verified by :func:`identify` when a model loads)."""
    manifest_path = folder / MANIFEST_NAME
    try:
        return dict(json.loads(manifest_path.read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return verify_folder(folder)[0]


def converted_model_directory(folder: Path) -> Path:
    """Where converted (e.g. OpenVINO) copies of a trainer folder's network are cached: ``<weights>/.openvino``."""
    return folder.parent.parent / CONVERTED_MODELS_FOLDER


def _dataset_ids(datasets: tuple[str, ...]) -> str:
    """``Dataset297``; ``Dataset291-295`` for three or more consecutive ids; else the ids joined with ``+``."""
    ids = [name.split("_", 1)[0] for name in datasets]
    digits = [i.removeprefix("Dataset") for i in ids]
    if len(ids) > 2 and all(d.isdigit() for d in digits):
        numbers = [int(d) for d in digits]
        if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
            return f"Dataset{numbers[0]}-{numbers[-1]}"
    return "+".join(ids)


@dataclass(frozen=True)
class WeightsIdentity:
    """Which exact weight files a model runs: folder names and one SHA-256 over all of them."""

    task: str
    datasets: tuple[str, ...]  # the release folder names, e.g. Dataset297_TotalSegmentator_total_3mm_1559subj
    sha256: str  # over each folder's plans.json, dataset.json and checkpoint, in order
    test_weights: bool  # dataset.json says these are test or untrained weights
    folder_hashes: tuple[dict[str, str], ...] = field(default=(), compare=False, repr=False)
    """Each folder's file hashes, in order: what the files a model loads must hash to."""

    @property
    def version(self) -> str:
        """Short enough for a DICOM LO (64 characters) with the hash whole in every result: dataset ids (a run of
        consecutive ones as a range, ``Dataset291-295``) and the hash's first 16 digits."""
        return f"{_dataset_ids(self.datasets)} sha256:{self.sha256[:16]}"

    def as_dict(self) -> dict[str, object]:
        return {
            "task": self.task,
            "datasets": list(self.datasets),
            "sha256": self.sha256,
            "version": self.version,
            "test_weights": self.test_weights,
        }


def identify(task: str, folders: Sequence[ModelFolder]) -> WeightsIdentity:
    """Verify each folder against its manifest and describe the set.

    Raises
    ------
    WeightsCorrupt
        If any installed file changed since it was installed.
    """
    combined = hashlib.sha256()
    test_weights = False
    every_folder = []
    for folder in folders:
        hashes, _had_manifest = verify_folder(folder.path)
        every_folder.append(hashes)
        for name in REQUIRED_FILES:
            combined.update(f"{folder.path.parent.name}/{name}:{hashes[name]}\n".encode())
        test_weights = test_weights or is_test_weights(folder.path / "dataset.json")
    datasets = tuple(f.path.parent.name for f in folders)
    return WeightsIdentity(task, datasets, combined.hexdigest(), test_weights, tuple(every_folder))


def file_states(folders: Sequence[ModelFolder]) -> tuple[tuple[str, int, int, int], ...]:
    """Each weight file's path, inode, size and modification time: equal before identification and after loading
    means the files loaded are the ones identified (a ``weights import`` meanwhile changes them)."""
    states = []
    for folder in folders:
        for name in REQUIRED_FILES:
            path = folder.path / name
            try:
                stat = path.stat()
            except OSError:
                states.append((str(path), -1, -1, -1))
                continue
            states.append((str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns))
    return tuple(states)


def is_test_weights(dataset_json: Path) -> bool:
    """Whether a model's dataset.json describes synthetic, random or untrained weights."""
    try:
        description = json.loads(dataset_json.read_text())
    except (OSError, ValueError):
        return False
    text = " ".join(str(description.get(key, "")) for key in ("name", "description", "reference")).lower()
    return any(marker in text for marker in TEST_WEIGHTS_MARKERS)


def installed(weights_directory: Path) -> dict[str, bool]:
    """Each task and whether all its model folders are present."""
    result = {}
    for task in TASK_DATASETS:
        try:
            model_folders(task, weights_directory)
            result[task] = True
        except WeightsMissing:
            result[task] = False
    return result


def download(task: str, weights_directory: Path) -> list[Path]:
    """Fetch a task's weights with TotalSegmentator's own downloader (needs network access)."""
    import os

    os.environ["TOTALSEG_WEIGHTS_PATH"] = str(weights_directory)
    weights_directory.mkdir(parents=True, exist_ok=True)
    try:
        from totalsegmentator.libs import download_pretrained_weights
    except ImportError as exc:
        raise WeightsMissing(f"the totalsegmentator package is needed to download weights: {exc}") from None
    for dataset_id, _dataset, _trainer in TASK_DATASETS[task]:
        download_pretrained_weights(dataset_id)
    folders = [f.path for f in model_folders(task, weights_directory)]
    for folder in folders:
        write_manifest(folder)
    return folders
