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
SHA-256 of its plans, dataset description and checkpoint: written at import or download,
or, for a folder put in place by hand, once a model has loaded it. A model verifies it when
it loads, and its results name the weights by folder and hash (:class:`WeightsIdentity`),
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
SWAP_PLAN_NAME = "swap-plan.json"
"""In a staging folder: written to disk before an import renames its first folder: the archive, every dataset folder
it swaps in (and whether it replaces an installed one) and the SHA-256 of each new folder's files."""
UNPACKED_FOLDER = "unpacked"
"""In a staging folder: the new dataset folders, until each is renamed into the weights folder."""
REPLACED_FOLDER = "replaced"
"""In a staging folder: the installed dataset folders an import renamed aside, until all new ones are in."""
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
        If any is absent or incomplete, or an interrupted import of any is not finished or undone yet (its
        folders may mix two releases).
    """
    if task not in TASK_DATASETS:
        raise ValueError(f"unknown TotalSegmentator task {task!r} (known: {', '.join(TASK_DATASETS)})")
    unfinished = unfinished_imports(weights_directory, [d for _i, d, _t in TASK_DATASETS[task]])
    if unfinished:
        raise WeightsMissing(
            f"TotalSegmentator weights for task {task!r} in {weights_directory} are not used: a weights import was "
            f"interrupted while it replaced them and is not finished or undone yet (its folders are in "
            f"{unfinished[0]}), so they may mix two releases; run `dicom-node weights list` as a user who may write "
            "to that folder, which finishes or undoes it."
        )
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
        If the zip is not a weights zip the node can use: no ``Dataset.../<trainer>/fold_0/checkpoint_final.pth``
        (or an archive cut short, whose table of contents is gone), a dataset folder no task uses or without the
        trainer folder the node loads (plans.json, dataset.json and checkpoint), a plans.json or dataset.json that is
        not a JSON object, an entry that is a symbolic link (or any other non-file), an entry that would land outside
        the weights folder, more than ``max_gigabytes`` unpacked, a checkpoint that could run code when loaded or
        whose layers hold a NaN or an infinite value, or weights the model would refuse to load (a plans.json naming
        anything but network building blocks, a checkpoint that does not fit the network, another spacing, labels
        numbered otherwise than the installed TotalSegmentator's class map). Nothing is installed then.
    WeightsCorrupt
        If ``sha256`` is given and the archive's hash differs.

    The dataset folders are unpacked and checked in a staging folder of the import's own (so imports at the same
    time do not meet), written to disk, and then swapped in as one: a plan naming every folder and the SHA-256 of
    its files is written to disk in the staging folder first (:data:`SWAP_PLAN_NAME`), then each installed folder
    is renamed aside and the new one renamed in, and only when all are in are the old ones deleted. If anything
    fails every folder is put back as it was, so an install never mixes two releases and a working one is never
    lost. An import killed in between (or a power loss) leaves its plan: the next import, ``weights list`` or
    model load finishes it where every new folder is complete, or else puts every folder back
    (:func:`recover_interrupted_imports`).
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
        staging.chmod(0o755)  # a node running as another user must read its plan and live mark (mkdtemp: 0700)
        alive = _mark_live(staging)
    keep_staging = False  # only when the folders could not all be put back: the plan in there finishes the job
    try:
        unpacked_folder = staging / UNPACKED_FOLDER
        with zipfile.ZipFile(archive) as bundle:
            bundle.extractall(unpacked_folder)
        _refuse_unsafe_checkpoints(archive, unpacked_folder, checkpoints)
        if loadable is not None:
            _refuse_unloadable(archive, unpacked_folder, datasets, loadable)
        recorded = {
            folder: write_manifest(folder) for folder in _trainer_folders([unpacked_folder / d for d in datasets])
        }
        _flush_tree(unpacked_folder)  # the new files are on disk before an installed folder moves
        with _swap_lock(weights_directory):
            _swap_in(staging, weights_directory, _plan_swap(archive, weights_directory, unpacked_folder, recorded))
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
    """Finish or undo what an interrupted ``weights import`` (killed, power loss) left, and delete its staging
    folder; returns the dataset folders it changed.

    An import writes its swap plan (:data:`SWAP_PLAN_NAME`) before it renames its first folder. Where every new
    folder the plan names is complete (its files hash as planned) the import is finished; else every folder is
    put back as it was before it. Either way one warning says which weights are installed now, so a task never
    mixes two releases. A staging folder without a plan was left before any folder moved (or by an older
    version, whose folders put aside go back where their place is empty); it is deleted. Where the weights folder
    cannot be written (a worker that may only read it), a warning says who can finish the job.

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
            if _is_live(staging) or not _left_folders(staging):
                continue
            LOG.warning(
                "An interrupted weights import left weights folders in %s, and this process cannot finish or undo it "
                "(%s): run `dicom-node weights list` as a user who may write to %s.",
                staging,
                (exc.strerror or "the folder cannot be written").lower(),
                weights_directory,
            )
        return []


def _left_folders(staging: Path) -> bool:
    """Whether a staging folder holds a swap plan or installed folders put aside (else it is only a leftover)."""
    return (staging / SWAP_PLAN_NAME).is_file() or any((staging / REPLACED_FOLDER).glob("Dataset*"))


def _recover(weights_directory: Path, leftovers: Sequence[Path]) -> list[Path]:
    changed: list[Path] = []
    for staging in leftovers:
        if _is_live(staging):
            continue
        try:
            plan = _read_plan(staging)
            if plan is None:
                changed += _put_back_unplanned(staging, weights_directory)
            else:
                LOG.warning("%s", _finish_swap(staging, weights_directory, plan))
                changed += [weights_directory / planned.dataset for planned in plan.folders]
        except (OSError, ValueError) as exc:
            LOG.warning(
                "An interrupted weights import left weights folders in %s that could not be put in order (%s), so "
                "the models of the folders it swaps are not loaded until it is: import the release zip again, then "
                "delete %s.",
                staging,
                _os_reason(exc),
                staging,
            )
            continue
        shutil.rmtree(staging, ignore_errors=True)
    return changed


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return f"{(exc.strerror or 'an error').lower()}: {exc.filename}" if exc.filename else str(exc)
    return str(exc)


def _put_back_unplanned(staging: Path, weights_directory: Path) -> list[Path]:
    """A staging folder without a swap plan: renamed before any folder moved (nothing to do), or by a version that
    wrote none (each folder put aside goes back where its place is empty)."""
    put_back = []
    for old in sorted((staging / REPLACED_FOLDER).glob("Dataset*")):
        target = weights_directory / old.name
        if not old.is_dir() or _occupied(target):
            continue
        old.rename(target)
        put_back.append(target)
        LOG.warning(
            "A weights import was interrupted while it replaced %s; the weights installed before it were put back "
            "in %s.",
            old.name,
            weights_directory,
        )
    return put_back


def unfinished_imports(weights_directory: Path, datasets: Sequence[str]) -> list[Path]:
    """Staging folders of interrupted imports that still hold a swap plan naming any of ``datasets`` (recovery could
    not run: a read-only process): those folders may mix two releases until it does."""
    if not weights_directory.is_dir():
        return []
    wanted = set(datasets)
    unfinished = []
    for staging in sorted(weights_directory.glob(f"{STAGING_PREFIX}*")):
        try:
            has_plan = (staging / SWAP_PLAN_NAME).is_file()
        except OSError:  # another user's staging folder this process may not read: it may hold a plan
            unfinished.append(staging)
            continue
        if not has_plan or _is_live(staging):
            continue
        try:
            plan = _read_plan(staging)
        except (OSError, ValueError):
            plan = None
        if plan is None or wanted & {planned.dataset for planned in plan.folders}:
            unfinished.append(staging)
    return unfinished


@dataclass(frozen=True)
class _PlannedFolder:
    dataset: str  # e.g. Dataset291_TotalSegmentator_part1_organs_1559subj
    trainer: str  # the trainer folder the node loads
    files: dict[str, str]  # the new trainer folder's SHA-256 by file name, as its manifest records them
    replaces: bool  # an installed folder of that name was there before the import


@dataclass(frozen=True)
class _SwapPlan:
    archive: str  # the zip's file name
    folders: tuple[_PlannedFolder, ...]

    @property
    def datasets(self) -> str:
        """``Dataset291-295``, ``Dataset297``: how the sentences name the folders."""
        return _dataset_ids(tuple(planned.dataset for planned in self.folders))


def _plan_swap(
    archive: Path, weights_directory: Path, unpacked: Path, recorded: dict[Path, dict[str, str]]
) -> _SwapPlan:
    """What an import swaps in (called with the import lock held, so what it replaces stays as found)."""
    trainers = {dataset: trainer for entries in TASK_DATASETS.values() for _id, dataset, trainer in entries}
    datasets = sorted({folder.parent.name for folder in recorded})
    return _SwapPlan(
        archive.name,
        tuple(
            _PlannedFolder(
                dataset,
                trainers[dataset],
                recorded[unpacked / dataset / trainers[dataset]],
                _occupied(weights_directory / dataset),
            )
            for dataset in datasets
        ),
    )


def _write_plan(staging: Path, weights_directory: Path, plan: _SwapPlan) -> None:
    """Write the swap plan into the staging folder and onto the disk (the file, its name, the staging folder's)."""
    content = {
        "archive": plan.archive,
        "folders": [
            {"dataset": p.dataset, "trainer": p.trainer, "files": p.files, "replaces": p.replaces} for p in plan.folders
        ],
    }
    partial = staging / f"{SWAP_PLAN_NAME}.partial"
    with open(partial, "w") as stream:
        stream.write(json.dumps(content, indent=2))
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(partial, staging / SWAP_PLAN_NAME)
    _fsync_path(staging)
    _fsync_path(weights_directory)


def _read_plan(staging: Path) -> _SwapPlan | None:
    """The staging folder's swap plan; None where it has none.

    Raises
    ------
    ValueError
        If the plan cannot be read.
    """
    try:
        content = json.loads((staging / SWAP_PLAN_NAME).read_text())
    except FileNotFoundError:
        return None
    try:
        folders = tuple(
            _PlannedFolder(str(f["dataset"]), str(f["trainer"]), dict(f["files"]), bool(f["replaces"]))
            for f in content["folders"]
        )
        return _SwapPlan(str(content["archive"]), folders)
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"its swap plan {staging / SWAP_PLAN_NAME} cannot be read") from None


def _occupied(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _new_copy(staging: Path, weights_directory: Path, planned: _PlannedFolder) -> Path:
    """Where a planned folder's new copy is: still in the staging folder, else renamed into the weights folder."""
    staged = staging / UNPACKED_FOLDER / planned.dataset
    return staged if _occupied(staged) else weights_directory / planned.dataset


def _new_copies_complete(staging: Path, weights_directory: Path, plan: _SwapPlan) -> bool:
    """Whether every planned folder's new copy is there with the files the import checked (each hashes as planned)."""
    for planned in plan.folders:
        folder = _new_copy(staging, weights_directory, planned) / planned.trainer
        if not all((folder / name).is_file() for name in REQUIRED_FILES):
            return False
        try:
            if folder_hashes(folder) != planned.files:
                return False
        except OSError:
            return False
    return True


def _aside(staging: Path, name: str) -> Path:
    """A free place in the staging folder for a folder taken out of the weights folder (deleted with it)."""
    replaced = staging / REPLACED_FOLDER
    replaced.mkdir(exist_ok=True)
    if not _occupied(replaced / name):
        return replaced / name
    return Path(tempfile.mkdtemp(prefix="displaced-", dir=staging)) / name


def _swap_in(staging: Path, weights_directory: Path, plan: _SwapPlan) -> None:
    """Rename every planned folder into the weights folder, the installed folder it replaces renamed aside first.

    The plan is on disk before the first rename. On any failure every folder is put back as it was
    (:func:`_roll_back`) and the error raised again (:class:`_Stranded` if that failed too: the staging folder,
    with its plan, must be kept then).
    """
    _write_plan(staging, weights_directory, plan)
    (staging / REPLACED_FOLDER).mkdir()
    try:
        for planned in plan.folders:
            target = weights_directory / planned.dataset
            if _occupied(target):
                target.rename(staging / REPLACED_FOLDER / planned.dataset)
            (staging / UNPACKED_FOLDER / planned.dataset).rename(target)
        _fsync_path(weights_directory)
    except BaseException:
        try:
            _roll_back(staging, weights_directory, plan)
            _forget_plan(staging)  # undone: a recovery after a kill now must not finish what the import gave up
        except OSError as exc:
            raise _Stranded(
                f"the weights import failed and could not put the installed weights back ({_os_reason(exc)}); they "
                f"are kept in {staging} with its swap plan: run `dicom-node weights list` as a user who may write to "
                f"{weights_directory} to put them back"
            ) from None
        raise


def _forget_plan(staging: Path) -> None:
    """Delete the swap plan of an import whose folders are all back as they were, durably."""
    (staging / SWAP_PLAN_NAME).unlink(missing_ok=True)
    _fsync_path(staging)


def _roll_forward(staging: Path, weights_directory: Path, plan: _SwapPlan) -> None:
    """Rename every planned folder's new copy still in the staging folder into place, what is there put aside."""
    for planned in plan.folders:
        staged = staging / UNPACKED_FOLDER / planned.dataset
        if not _occupied(staged):
            continue  # renamed in before the import stopped
        target = weights_directory / planned.dataset
        if _occupied(target):
            target.rename(_aside(staging, planned.dataset))
        staged.rename(target)
    _fsync_path(weights_directory)


def _roll_back(staging: Path, weights_directory: Path, plan: _SwapPlan) -> None:
    """Put every planned folder back as it was before the import: its new copy out, the installed one in."""
    for planned in reversed(plan.folders):
        target = weights_directory / planned.dataset
        staged = staging / UNPACKED_FOLDER / planned.dataset
        old = staging / REPLACED_FOLDER / planned.dataset
        if _occupied(target) and (not _occupied(staged) or _occupied(old)):
            # the new copy (renamed in), or something else in the place of the installed folder put aside
            target.rename(staged if not _occupied(staged) else Path(tempfile.mkdtemp(dir=staging)) / planned.dataset)
        if _occupied(old):
            old.rename(target)
    _fsync_path(weights_directory)


def _finish_swap(staging: Path, weights_directory: Path, plan: _SwapPlan) -> str:
    """Finish an interrupted import whose new folders are all complete, else put every folder back; returns the
    sentence saying which weights are installed now."""
    interrupted = (
        f"A weights import of {plan.datasets} from {plan.archive} was interrupted while it swapped its folders into "
        f"{weights_directory}"
    )
    if _new_copies_complete(staging, weights_directory, plan):
        _roll_forward(staging, weights_directory, plan)
        return (
            f"{interrupted}; its new weights were complete, so the import was finished: the weights of "
            f"{plan.archive} are installed in {plan.datasets}."
        )
    _roll_back(staging, weights_directory, plan)
    before = _dataset_ids(tuple(planned.dataset for planned in plan.folders if planned.replaces))
    absent = _dataset_ids(tuple(planned.dataset for planned in plan.folders if not planned.replaces))
    if not absent:
        now = f"the weights installed before it are in {before} again"
    elif not before:
        now = f"no weights are installed in {absent}, as before it"
    else:
        now = f"the weights installed before it are in {before} again, and none in {absent}, as before it"
    return f"{interrupted} before its new weights were complete on disk, so every folder was put back: {now}."


def _fsync_path(path: Path) -> None:
    """Write ``path`` to disk: a file's bytes, or a folder's names (its renames and new files)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _flush_tree(folder: Path) -> None:
    """Write every file under ``folder``, and every folder's names, to disk."""
    for parent, _folders, files in os.walk(folder, topdown=False):
        for name in files:
            _fsync_path(Path(parent) / name)
        _fsync_path(Path(parent))


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
    if not datasets and _cut_short(archive, bundle):
        raise ValueError(
            f"{archive} is damaged or cut short (it does not end as a zip ends), so nothing was installed; copy it "
            "again"
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


ZIP_END_SIGNATURE = b"PK\x05\x06"
"""How a zip's end record begins: the last 22 bytes of a zip (before its comment, if any) are that record."""
CHECKPOINT_ENTRIES = ("data.pkl", "byteorder", "version")
"""Files inside a PyTorch checkpoint (itself a zip), under its one top folder."""


def _cut_short(archive: Path, bundle: zipfile.ZipFile) -> bool:
    """Whether the table of contents zipfile read is not the archive's own: the archive does not end with the end
    record it found, or the entries are those of a PyTorch checkpoint. A zip missing its last bytes loses its own
    end record, and zipfile then finds that of a checkpoint stored inside it."""
    inner = {PurePosixPath(name).parts[-1] for name in bundle.namelist() if len(PurePosixPath(name).parts) == 2}
    if set(CHECKPOINT_ENTRIES) <= inner:
        return True
    end_length = 22 + len(bundle.comment)
    with open(archive, "rb") as stream:
        size = stream.seek(0, os.SEEK_END)
        if size < end_length:
            return True
        stream.seek(size - end_length)
        return stream.read(4) != ZIP_END_SIGNATURE


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


@contextlib.contextmanager
def imports_held_off(weights_directory: Path) -> Iterator[None]:
    """While held, an import waits before it swaps folders into ``weights_directory``, so the folders read inside
    are all of one release (it shares the import lock; a process that may only read the folder takes it too)."""
    import fcntl

    lock: IO[str] | None = None
    for mode in ("a", "r"):
        try:
            lock = open(weights_directory / IMPORT_LOCK_NAME, mode)  # noqa: SIM115 - closed below
            break
        except OSError:
            continue
    if lock is None:  # no weights folder yet, or none that may be written and no import ever ran there
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_SH)  # released when the file is closed
        yield


class _Stranded(OSError):
    """A failed import could not put the installed weights back; the message says where they are."""


def _refuse_unsafe_checkpoints(archive: Path, staging: Path, checkpoints: Sequence[str]) -> None:
    """Read every checkpoint as data only before anything is installed (a pickle could run code), and refuse one
    whose layers hold a value that is not a finite number."""
    from inference.models.checkpoints import UnsafeWeights, load_checkpoint

    for name in checkpoints:
        try:
            load_checkpoint(staging / name)
        except UnsafeWeights as exc:
            reason = str(exc).replace(str(staging / name), name).rstrip(". ")
            raise ValueError(f"{archive}: {reason}. Nothing was installed.") from None


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
    """The folder's file hashes, checked against its manifest; writes nothing.

    Returns the hashes and whether a manifest existed. A folder put in place by hand (no manifest) is recorded
    only once a model has loaded it (:func:`record_loaded_folder`): files seen while a copy still runs are never
    recorded as installed.

    Raises
    ------
    WeightsCorrupt
        If a file's hash differs from the manifest recorded at install.
    """
    manifest_path = folder / MANIFEST_NAME
    hashes = folder_hashes(folder)
    if not manifest_path.is_file():
        return hashes, False
    changed = _changed_since_install(folder, hashes)
    if changed:
        raise WeightsCorrupt(
            f"weights in {folder} changed since they were installed ({', '.join(changed)} differ from the SHA-256 "
            f"recorded in {manifest_path}): the model was not loaded; import or download the weights again, which "
            f"records the new files, or, where these files are the ones meant (a folder copied in by hand), delete "
            f"{MANIFEST_NAME} there and the next load that succeeds records them"
        )
    return hashes, True


def record_loaded_folder(folder: Path, loaded: dict[str, str]) -> None:
    """Record a trainer folder put in place by hand (no manifest) once a model has loaded it: ``loaded`` are the
    SHA-256 of the bytes it was built from, so any later change is caught.

    Where the folder is read-only (a worker with the weights mounted read-only) a warning says that changes to
    those files go unnoticed until a manifest is written.
    """
    if (folder / MANIFEST_NAME).is_file():
        return  # recorded meanwhile (another worker, an import)
    try:
        write_manifest(folder, loaded)
    except OSError as exc:
        LOG.warning(
            "The weights folder %s has no manifest (%s) and this process cannot write one there (%s), so the "
            "model uses the files as they are now; changes to them will not be detected until a manifest is "
            "written, e.g. by `dicom-node weights import` where the folder is writable.",
            folder,
            MANIFEST_NAME,
            (exc.strerror or "it cannot be written").lower(),
        )


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
    unrecorded: tuple[Path, ...] = field(default=(), compare=False, repr=False)
    """The trainer folders without a manifest yet (put in place by hand): recorded at the first load that succeeds."""

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
    """Verify each folder against its manifest and describe the set (writes nothing).

    Raises
    ------
    WeightsCorrupt
        If any installed file changed since it was installed.
    """
    combined = hashlib.sha256()
    test_weights = False
    every_folder = []
    unrecorded = []
    for folder in folders:
        hashes, had_manifest = verify_folder(folder.path)
        every_folder.append(hashes)
        if not had_manifest:
            unrecorded.append(folder.path)
        for name in REQUIRED_FILES:
            combined.update(f"{folder.path.parent.name}/{name}:{hashes[name]}\n".encode())
        test_weights = test_weights or is_test_weights(folder.path / "dataset.json")
    datasets = tuple(f.path.parent.name for f in folders)
    return WeightsIdentity(task, datasets, combined.hexdigest(), test_weights, tuple(every_folder), tuple(unrecorded))


def is_test_weights(dataset_json: Path) -> bool:
    """Whether a model's dataset.json describes synthetic, random or untrained weights."""
    try:
        description = json.loads(dataset_json.read_text())
    except (OSError, ValueError):
        return False
    text = " ".join(str(description.get(key, "")) for key in ("name", "description", "reference")).lower()
    return any(marker in text for marker in TEST_WEIGHTS_MARKERS)


def installed(weights_directory: Path) -> dict[str, bool]:
    """Each task and whether all its model folders are present (an interrupted import is finished or undone
    first)."""
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
        If its trainer folder lacks files, its dataset.json or plans.json lacks what nnU-Net reads from it, or its
        files differ from its manifest (one without a manifest is left for the model to record when it first loads,
        as a folder put in place by hand).
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
    from inference.models.checkpoints import description_problem

    unreadable = description_problem(folder)
    if unreadable is not None:
        raise WeightsCorrupt(f"{dataset_folder} already holds weights a model cannot load ({unreadable}), {keeps}")
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
