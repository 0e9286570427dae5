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

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import IO

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
STAGING_PREFIX = ".import-"
"""Beside the Dataset folders: each import's staging folder (``.import-<random>``), deleted when it ends."""
LIVE_MARK_NAME = ".alive"
"""In a staging folder: locked by its import while it runs, so a leftover of a killed one can be told apart."""
IMPORT_LOCK_NAME = ".import.lock"
"""Beside the Dataset folders: held while an import swaps its folders in, so imports at the same time take turns."""
MAX_JSON_MEGABYTES = 64
"""Largest plans.json or dataset.json ``weights import`` reads (TotalSegmentator's are a few hundred kB)."""

LOG = logging.getLogger(__name__)


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


def model_folders(task: str, weights_directory: Path, *, model: str | None = None) -> list[ModelFolder]:
    """The trainer folders a task needs, in order.

    Parameters
    ----------
    model
        The configured model's name, when the caller knows it: the commands the "missing" sentence names then
        install into that model's weights folder (``--model NAME``).

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
        target = f" --model {model}" if model else ""
        hint = (
            ""
            if model
            else " (add `--model NAME` to either command for a model whose configuration sets its own "
            "weights_directory)"
        )
        raise WeightsMissing(
            f"TotalSegmentator weights for task {task!r} are missing in {weights_directory} ({names}): "
            f"on a connected machine run `dicom-node weights download --task {task}{target}`, on an offline one "
            f"copy the release zip(s) over and run `dicom-node weights import FILE.zip{target}`{hint}."
        )
    return folders


def import_zip(
    archive: Path,
    weights_directory: Path,
    *,
    sha256: str | None = None,
    max_gigabytes: float = MAX_IMPORT_GIGABYTES,
    loadable: Callable[[ModelFolder, str], str | None] | None = None,
) -> list[Path]:
    """Unpack a TotalSegmentator weights zip into the weights folder; returns the dataset folders added.

    Parameters
    ----------
    sha256
        The archive's published SHA-256; when given, a different archive is refused before unpacking.
    max_gigabytes
        Largest total unpacked size accepted (zip entries cannot unpack past their declared size).
    loadable
        Why the model would refuse to load a trainer folder of a task, or None
        (``inference.models.totalsegmentator.load_refusal``: ``weights import`` passes it); run on each unpacked
        folder before anything is installed.

    Raises
    ------
    ValueError
        If the zip is not a weights zip the node can use: no ``Dataset.../<trainer>/fold_0/checkpoint_final.pth``,
        a dataset folder no task uses or without the trainer folder the node loads (plans.json, dataset.json and
        checkpoint), a plans.json or dataset.json that is not a JSON object, an entry that is a symbolic link (or
        any other non-file), an entry that would land outside the weights folder, more than ``max_gigabytes``
        unpacked, a checkpoint that could run code when loaded, or weights the model would refuse to load (a
        plans.json naming anything but network building blocks, a checkpoint that does not fit the network, another
        spacing, labels numbered otherwise than the installed TotalSegmentator's class map). Nothing is installed then.
    WeightsCorrupt
        If ``sha256`` is given and the archive's hash differs.

    Each dataset folder is unpacked and checked in a staging folder of its own (so imports at the same time do
    not meet), then swapped in: the installed folder is renamed aside, the new one renamed in, and only then is
    the old one deleted; if anything fails the old folder is put back, so a working install is never missing. An
    import killed in between leaves it in its staging folder: the next import, ``weights list`` or model load puts
    it back (:func:`recover_interrupted_imports`).
    """
    if sha256 is not None:
        actual = file_sha256(archive)
        if actual != sha256.strip().lower():
            raise WeightsCorrupt(
                f"{archive.name} has SHA-256 {actual}, not the expected {sha256.strip().lower()}: "
                "the file is damaged or not the published release; nothing was installed"
            )
    with zipfile.ZipFile(archive) as bundle:
        for info in bundle.infolist():
            _refuse_unsafe_entry(archive, info)
        unpacked = sum(info.file_size for info in bundle.infolist())
        if unpacked > max_gigabytes * 1024**3:
            raise ValueError(
                f"{archive}: unpacks to {unpacked / 1024**3:.1f} GB, more than the {max_gigabytes:g} GB a weights "
                "release can be; nothing was installed"
            )
        checkpoints = [n for n in bundle.namelist() if n.endswith("fold_0/checkpoint_final.pth")]
        datasets = _usable_datasets(archive, bundle)
    weights_directory.mkdir(parents=True, exist_ok=True)
    with _swap_lock(weights_directory):  # no recovery in another process takes a staging folder not yet marked live
        recover_interrupted_imports(weights_directory, locked=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=weights_directory))
        alive = _mark_live(staging)
    keep_staging = False  # only when a replaced folder could not be put back: it is still in there
    try:
        unpacked_folder = staging / "unpacked"
        with zipfile.ZipFile(archive) as bundle:
            bundle.extractall(unpacked_folder)
        _refuse_unsafe_checkpoints(unpacked_folder, checkpoints)
        if loadable is not None:
            _refuse_unloadable(archive, unpacked_folder, datasets, loadable)
        new_folders = [unpacked_folder / dataset for dataset in datasets]
        for trainer_folder in _trainer_folders(new_folders):
            write_manifest(trainer_folder)
        with _swap_lock(weights_directory):
            _swap_in(new_folders, weights_directory, staging / "replaced")
    except _Stranded:
        keep_staging = True
        raise
    finally:
        if not keep_staging:
            shutil.rmtree(staging, ignore_errors=True)
        alive.close()  # a staging folder kept now is a leftover the next import or model load puts back
    return [weights_directory / dataset for dataset in datasets]


def _refuse_unloadable(
    archive: Path, unpacked: Path, datasets: Sequence[str], loadable: Callable[[ModelFolder, str], str | None]
) -> None:
    """Run the checks a model runs when it loads (the network classes, the checkpoint's fit to the network, the
    spacing, the labels against the class map) on each unpacked trainer folder before anything is installed.

    Raises
    ------
    ValueError
        With the sentence the model's load would give, the folder named as in the zip, and "Nothing was installed".
    """
    where = {
        folder: (task, dataset_id, trainer) for task, e in TASK_DATASETS.items() for dataset_id, folder, trainer in e
    }
    for dataset in datasets:
        task, dataset_id, trainer = where[dataset]
        refusal = loadable(ModelFolder(dataset_id, unpacked / dataset / trainer), task)
        if refusal is not None:
            reason = refusal.replace(f"{unpacked}{os.sep}", "").replace("; the model was not loaded", "").rstrip(". ")
            raise ValueError(f"{archive}: {reason}. Nothing was installed.")


def _mark_live(staging: Path) -> IO[str]:
    """Lock a file in an import's staging folder for as long as the import runs (the lock ends with the process)."""
    import fcntl

    alive = open(staging / LIVE_MARK_NAME, "w")  # noqa: SIM115 - held until the import ends
    fcntl.flock(alive, fcntl.LOCK_EX)
    return alive


def _is_live(staging: Path) -> bool:
    """Whether an import still runs in ``staging`` (it holds the lock on its live mark)."""
    import fcntl

    try:
        with open(staging / LIVE_MARK_NAME) as mark:
            fcntl.flock(mark, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except FileNotFoundError:
        return False  # made before live marks, or by an import killed before it marked it: none runs there
    except OSError:
        return True
    return False


def recover_interrupted_imports(weights_directory: Path, *, locked: bool = False) -> list[Path]:
    """Put back installed weights an interrupted ``weights import`` (killed, power loss) left aside, and delete
    what else such imports left; returns the dataset folders put back.

    An import renames the installed folder into ``.import-*/replaced/`` before the new one goes in: killed between
    the two renames, it leaves the task without weights. Each folder there whose place is empty is renamed back,
    with a warning saying so; the rest of a staging folder no import runs in any more is deleted. Where the weights
    folder cannot be written (a worker that may only read it), a warning names what to move back by hand.

    Parameters
    ----------
    locked
        The caller holds the import lock already.
    """
    leftovers = (
        [p for p in weights_directory.glob(f"{STAGING_PREFIX}*") if p.is_dir()] if weights_directory.is_dir() else []
    )
    if not leftovers:
        return []
    if locked:
        return _recover(weights_directory, leftovers)
    try:
        with _swap_lock(weights_directory):
            return _recover(weights_directory, leftovers)
    except OSError as exc:
        for staging in leftovers:
            for old in (staging / "replaced").glob("Dataset*"):
                if old.is_dir() and not (weights_directory / old.name).exists():
                    LOG.warning(
                        "An interrupted weights import left the installed weights %s in %s, and this process cannot "
                        "put them back (%s): move that folder back to %s by hand, or run `dicom-node weights list` "
                        "as a user who may write there.",
                        old.name,
                        old.parent,
                        (exc.strerror or "the folder cannot be written").lower(),
                        weights_directory,
                    )
        return []


def _recover(weights_directory: Path, leftovers: Sequence[Path]) -> list[Path]:
    put_back = []
    for staging in leftovers:
        if _is_live(staging):
            continue
        for old in sorted((staging / "replaced").glob("Dataset*")):
            target = weights_directory / old.name
            if not old.is_dir() or target.exists() or target.is_symlink():
                continue
            old.rename(target)
            put_back.append(target)
            LOG.warning(
                "A weights import was interrupted while it replaced %s; the weights installed before it were put "
                "back in %s.",
                old.name,
                weights_directory,
            )
        shutil.rmtree(staging, ignore_errors=True)
    return put_back


def _refuse_unsafe_entry(archive: Path, info: zipfile.ZipInfo) -> None:
    """Refuse an entry that would unpack outside the weights folder, or that is not a plain file or folder."""
    name = info.filename
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(
            f"{archive}: unsafe entry {name!r} (it would unpack outside the weights folder), so nothing was "
            "installed; use the release zip as published"
        )
    mode = info.external_attr >> 16
    kind = stat.S_IFMT(mode)
    if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
        what = "a symbolic link" if stat.S_ISLNK(mode) else "not a plain file"
        raise ValueError(
            f"{archive}: entry {name!r} is {what}, which a weights release never holds, so nothing was installed; "
            "use the release zip as published"
        )


def _usable_datasets(archive: Path, bundle: zipfile.ZipFile) -> list[str]:
    """The zip's dataset folders, each checked to hold the trainer folder the node loads, with JSON that parses.

    Raises
    ------
    ValueError
        Naming the archive, the folder or file, and what to do; nothing is installed then.
    """
    expected = {folder: trainer for entries in TASK_DATASETS.values() for _id, folder, trainer in entries}
    files = {info.filename: info for info in bundle.infolist() if not info.is_dir()}
    datasets = sorted(
        {
            PurePosixPath(name).parts[0]
            for name in files
            if len(PurePosixPath(name).parts) > 1 and PurePosixPath(name).parts[0].startswith("Dataset")
        }
    )
    if not datasets:
        raise ValueError(
            f"{archive}: not a TotalSegmentator weights zip (no Dataset*/…/fold_0/checkpoint_final.pth), so "
            "nothing was installed"
        )
    for dataset in datasets:
        trainer = expected.get(dataset)
        if trainer is None:
            known = ", ".join(sorted({f"Dataset{i}" for entries in TASK_DATASETS.values() for i, _d, _t in entries}))
            raise ValueError(
                f"{archive} holds {dataset}, which none of the node's tasks uses (they use {known}), so nothing was "
                "installed; use the TotalSegmentator release zip of the task you need"
            )
        lacking = [name for name in REQUIRED_FILES if f"{dataset}/{trainer}/{name}" not in files]
        if lacking:
            others = sorted(
                {
                    PurePosixPath(name).parts[1]
                    for name in files
                    if PurePosixPath(name).parts[0] == dataset
                    and len(PurePosixPath(name).parts) > 2
                    and PurePosixPath(name).parts[1] != trainer
                }
            )
            instead = f" (it holds {', '.join(others)} instead)" if others else ""
            raise ValueError(
                f"{archive}: {dataset}/{trainer}/ lacks {', '.join(lacking)}{instead}, and the node loads only that "
                f"folder, so nothing was installed; use the TotalSegmentator release zip of {dataset}"
            )
        for name in ("plans.json", "dataset.json"):
            _refuse_unusable_json(archive, bundle, files[f"{dataset}/{trainer}/{name}"])
    return datasets


def _refuse_unusable_json(archive: Path, bundle: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    """Refuse a plans.json or dataset.json that is too large or not a JSON object."""
    if info.file_size > MAX_JSON_MEGABYTES * 1024**2:
        raise ValueError(
            f"{archive}: {info.filename} unpacks to {info.file_size / 1024**2:.0f} MB, more than the "
            f"{MAX_JSON_MEGABYTES} MB such a file can be, so nothing was installed; use the release zip as published"
        )
    try:
        content = json.loads(bundle.read(info))
    except (ValueError, RecursionError):
        content = None
    if not isinstance(content, dict):
        raise ValueError(
            f"{archive}: {info.filename} is not a JSON object as nnU-Net writes it, so nothing was installed; "
            "the zip is damaged or not a TotalSegmentator release (copy it again)"
        )


@contextlib.contextmanager
def _swap_lock(weights_directory: Path) -> Iterator[None]:
    """Held while folders are swapped in: imports at the same time take turns (their renames would collide)."""
    import fcntl

    with open(weights_directory / IMPORT_LOCK_NAME, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        yield


class _Stranded(OSError):
    """A failed import could not put a replaced weights folder back; the message says where it is."""


def _swap_in(new_folders: Sequence[Path], weights_directory: Path, aside: Path) -> None:
    """Rename each new dataset folder into the weights folder, the folder it replaces renamed into ``aside`` first.

    On any failure the new folders already in place go back to ``aside`` and the replaced ones are renamed back,
    then the error is raised again (:class:`_Stranded` if one could not be put back: ``aside`` must be kept then).
    """
    aside.mkdir()
    replaced: list[tuple[Path, Path]] = []  # (installed path, where it was put aside)
    put_in: list[Path] = []
    try:
        for new in new_folders:
            target = weights_directory / new.name
            if target.exists() or target.is_symlink():
                old = aside / new.name
                target.rename(old)
                replaced.append((target, old))
            new.rename(target)
            put_in.append(target)
    except BaseException:
        for target in put_in:
            with contextlib.suppress(OSError):
                target.rename(aside / f"{target.name}.new")
        stranded = []
        for target, old in replaced:
            try:
                old.rename(target)
            except OSError:
                stranded.append((target, old))
        if stranded:
            where = ", ".join(f"{old} (it belongs at {target})" for target, old in stranded)
            raise _Stranded(
                f"the weights import failed and the weights that were installed could not be put back: move {where} "
                "back by hand"
            ) from None
        raise


def _refuse_unsafe_checkpoints(staging: Path, checkpoints: Sequence[str]) -> None:
    """Read every checkpoint as data only before anything is installed (a pickle could run code)."""
    from inference.models.checkpoints import UnsafeWeights, load_checkpoint

    for name in checkpoints:
        try:
            load_checkpoint(staging / name)
        except UnsafeWeights as exc:
            reason = str(exc).replace(str(staging / name), name).rstrip(". ")
            raise ValueError(f"{reason}. Nothing was installed.") from None


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


def write_manifest(folder: Path, hashes: dict[str, str] | None = None) -> dict[str, str]:
    """Record the folder's file hashes (``hashes``, else computed now) as installed (at import or download).

    The manifest is written beside the files under a temporary name and renamed into place, so a full disk never
    leaves half a manifest.

    Raises
    ------
    OSError
        If it cannot be written (a read-only folder, a full disk).
    """
    hashes = folder_hashes(folder) if hashes is None else hashes
    manifest = {"files": hashes, "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    partial = folder / f".{MANIFEST_NAME}.{os.getpid()}.partial"
    try:
        partial.write_text(json.dumps(manifest, indent=2))
        os.replace(partial, folder / MANIFEST_NAME)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise
    return hashes


def verify_folder(folder: Path) -> tuple[dict[str, str], bool]:
    """The folder's file hashes, checked against its manifest.

    Returns the hashes and whether a manifest existed; a folder put in place by hand
    (no manifest) gets one now, so later changes are caught. Where the folder is read-only
    (a worker with the weights mounted read-only) the computed hashes are used and a warning
    is logged: changes to those files go unnoticed until a manifest is written.

    Raises
    ------
    WeightsCorrupt
        If a file's hash differs from the manifest recorded at install.
    """
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        hashes = folder_hashes(folder)
        try:
            write_manifest(folder, hashes)
        except OSError as exc:
            reason = (exc.strerror or "it cannot be written").lower()
            LOG.warning(
                "The weights folder %s has no manifest (%s) and this process cannot write one there (%s), so the "
                "model uses the files as they are now; changes to them will not be detected until a manifest is "
                "written, e.g. by `dicom-node weights import` where the folder is writable.",
                folder,
                MANIFEST_NAME,
                reason,
            )
        return hashes, False
    hashes = folder_hashes(folder)
    changed = _changed_since_install(folder, hashes)
    if changed:
        raise WeightsCorrupt(
            f"weights in {folder} changed since they were installed ({', '.join(changed)} differ from the recorded "
            "SHA-256): the model was not loaded; import or download the weights again"
        )
    return hashes, True


def _changed_since_install(folder: Path, hashes: dict[str, str] | None = None) -> list[str]:
    """The required files whose hash (``hashes``, else computed now) differs from the folder's manifest.

    Raises
    ------
    WeightsCorrupt
        If the manifest is unreadable.
    """
    manifest_path = folder / MANIFEST_NAME
    try:
        recorded = json.loads(manifest_path.read_text())["files"]
        if not isinstance(recorded, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise WeightsCorrupt(f"the weights manifest {manifest_path} is unreadable; import the weights again") from None
    hashes = folder_hashes(folder) if hashes is None else hashes
    return [name for name in REQUIRED_FILES if recorded.get(name) != hashes[name]]


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


def is_test_weights(dataset_json: Path) -> bool:
    """Whether a model's dataset.json describes synthetic, random or untrained weights."""
    try:
        description = json.loads(dataset_json.read_text())
    except (OSError, ValueError):
        return False
    text = " ".join(str(description.get(key, "")) for key in ("name", "description", "reference")).lower()
    return any(marker in text for marker in TEST_WEIGHTS_MARKERS)


def installed(weights_directory: Path) -> dict[str, bool]:
    """Each task and whether all its model folders are present (weights an interrupted import left aside are put
    back first)."""
    recover_interrupted_imports(weights_directory)
    result = {}
    for task in TASK_DATASETS:
        try:
            model_folders(task, weights_directory)
            result[task] = True
        except WeightsMissing:
            result[task] = False
    return result


def download(task: str, weights_directory: Path) -> list[Path]:
    """Fetch a task's weights with TotalSegmentator's own downloader (needs network access); returns the task's
    trainer folders.

    TotalSegmentator's downloader keeps a dataset folder that exists, so each one already there is checked first:
    one whose files differ from its manifest, or that lacks files, is refused before anything is downloaded (a
    manifest written over it would approve the changed files). Manifests are written only for the folders this
    download added; what the downloader prints is logged (INFO), not printed.

    Raises
    ------
    WeightsCorrupt
        If a dataset folder already there holds weights changed since they were installed, or is incomplete.
    WeightsMissing
        If the totalsegmentator package is missing, or the download left a folder incomplete.
    """
    if task not in TASK_DATASETS:
        raise ValueError(f"unknown TotalSegmentator task {task!r} (known: {', '.join(TASK_DATASETS)})")
    for _id, dataset, trainer in TASK_DATASETS[task]:
        if (weights_directory / dataset).exists():
            _refuse_kept_folder(weights_directory / dataset, trainer)
    try:
        from totalsegmentator.libs import download_pretrained_weights
    except ImportError as exc:
        raise WeightsMissing(f"the totalsegmentator package is needed to download weights: {exc}") from None
    os.environ["TOTALSEG_WEIGHTS_PATH"] = str(weights_directory)
    weights_directory.mkdir(parents=True, exist_ok=True)
    added = []
    for dataset_id, dataset, trainer in TASK_DATASETS[task]:
        existed = (weights_directory / dataset).exists()
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                download_pretrained_weights(dataset_id)
        finally:
            for line in printed.getvalue().splitlines():
                if line.strip():
                    LOG.info("TotalSegmentator: %s", line.strip())
        if not existed:
            added.append((weights_directory / dataset, trainer))
    for dataset_folder, trainer in added:
        folder = dataset_folder / trainer
        lacking = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
        if lacking:
            raise WeightsMissing(
                f"the download of {dataset_folder.name} left {folder} without {', '.join(lacking)}: move "
                f"{dataset_folder} aside and run the download again, or import the release zip with "
                "`dicom-node weights import FILE.zip`"
            )
        write_manifest(folder)
    return [weights_directory / dataset / trainer for _id, dataset, trainer in TASK_DATASETS[task]]


def _refuse_kept_folder(dataset_folder: Path, trainer: str) -> None:
    """Refuse a dataset folder TotalSegmentator's downloader would keep as it is, if it is not what was installed.

    Raises
    ------
    WeightsCorrupt
        If its trainer folder lacks files, or its files differ from its manifest (one without a manifest is
        left for the model to record when it first loads, as a folder put in place by hand).
    """
    folder = dataset_folder / trainer
    keeps = (
        "and TotalSegmentator's downloader keeps a folder that exists, so nothing was downloaded: move that folder "
        "aside (or delete it) and run the download again"
    )
    lacking = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if lacking:
        raise WeightsCorrupt(
            f"{dataset_folder} already exists but {trainer}/ in it lacks {', '.join(lacking)}, {keeps}"
        )
    if not (folder / MANIFEST_NAME).is_file():
        return
    try:
        changed = _changed_since_install(folder)
    except WeightsCorrupt:
        raise WeightsCorrupt(
            f"{dataset_folder} already holds weights whose manifest ({trainer}/{MANIFEST_NAME}) is unreadable, {keeps}"
        ) from None
    if changed:
        raise WeightsCorrupt(
            f"{dataset_folder} already holds weights that changed since they were installed ({', '.join(changed)} "
            f"differ from the recorded SHA-256), {keeps}"
        )


def offline_totalsegmentator_environment(weights: Path, home: Path, name: str) -> dict[str, str]:
    """Environment for running TotalSegmentator's own CLI or Python API offline on ``weights`` (a reference run):
    a home folder ``home`` whose config sends no usage statistics and shows no disclaimer, ``name`` its id."""
    home.mkdir(parents=True, exist_ok=True)
    config = {
        "totalseg_id": name,
        "send_usage_stats": False,
        "prediction_counter": 0,
        "statistics_disclaimer_shown": True,
    }
    (home / "config.json").write_text(json.dumps(config))
    return {**os.environ, "TOTALSEG_HOME_DIR": str(home), "TOTALSEG_WEIGHTS_PATH": str(weights)}
