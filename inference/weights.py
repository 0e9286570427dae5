"""TotalSegmentator model weights: where they must be, and how to get them there.

Layout (TotalSegmentator's own, so one folder serves both the node and the
reference tool)::

    <weights>/Dataset297_TotalSegmentator_total_3mm_1559subj/
        nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres/
            plans.json  dataset.json  fold_0/checkpoint_final.pth

On a connected machine ``dicom-node weights download`` fetches TotalSegmentator's
release zips; on an offline one ``dicom-node weights import FILE.zip`` unpacks a
zip carried over by hand.
"""

from __future__ import annotations

import shutil
import zipfile
from dataclasses import dataclass
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


class WeightsMissing(RuntimeError):
    """Model weights are not where the node looks; the message names the commands that fix it."""


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


def import_zip(archive: Path, weights_directory: Path) -> list[Path]:
    """Unpack a TotalSegmentator weights zip into the weights folder; returns the dataset folders added.

    Raises
    ------
    ValueError
        If the zip is not a weights zip (no ``Dataset.../<trainer>/fold_0/checkpoint_final.pth``)
        or has entries that would land outside the weights folder.
    """
    with zipfile.ZipFile(archive) as bundle:
        names = bundle.namelist()
        for name in names:
            parts = PurePosixPath(name).parts
            if PurePosixPath(name).is_absolute() or ".." in parts:
                raise ValueError(f"{archive}: unsafe entry {name!r}")
        checkpoints = [n for n in names if n.endswith("fold_0/checkpoint_final.pth")]
        datasets = sorted({PurePosixPath(n).parts[0] for n in checkpoints if PurePosixPath(n).parts[0].startswith("Dataset")})
        if not datasets:
            raise ValueError(f"{archive}: not a TotalSegmentator weights zip (no Dataset*/…/fold_0/checkpoint_final.pth)")
        weights_directory.mkdir(parents=True, exist_ok=True)
        staging = weights_directory / f".import-{archive.stem}"
        shutil.rmtree(staging, ignore_errors=True)
        bundle.extractall(staging)
    added = []
    for dataset in datasets:
        target = weights_directory / dataset
        if target.exists():
            shutil.rmtree(target)
        (staging / dataset).rename(target)
        added.append(target)
    shutil.rmtree(staging, ignore_errors=True)
    return added


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
    return [f.path for f in model_folders(task, weights_directory)]
