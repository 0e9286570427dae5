#!/usr/bin/env python
"""Build an offline, randomly initialised TotalSegmentator weights folder for tests.

TotalSegmentator's released weights cannot be downloaded here, so this script
makes a stand-in that has TotalSegmentator's exact folder layout, nnU-Net's
exact file formats and a network of the architecture nnU-Net itself plans::

    OUTPUT_DIR/Dataset297_TotalSegmentator_total_3mm_1559subj/
        nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres/
            plans.json  dataset.json  dataset_fingerprint.json
            fold_0/checkpoint_final.pth

(``--task total`` makes the five 1.5 mm part models 291..295 instead, with
``nnUNetTrainerNoMirroring``.) Folder, trainer and class names are read from
the installed ``totalsegmentator`` package, so they match what it looks for.

How:

1. render a small synthetic torso phantom (``dicom_node.phantom``) at the
   task's resolution and write it as an nnU-Net raw dataset (imagesTr /
   labelsTr, ``.nii.gz``); its dataset.json lists every class of the model
   (118 labels incl. background for ``total_fast``) although the phantom
   labels only a few;
2. run nnU-Net's own fingerprint extraction (once, on the phantom with all its
   structures labelled) and default experiment planner (``ExperimentPlanner``,
   per model, with that model's dataset.json), giving a standard ``plans.json``;
3. instantiate the model's nnU-Net trainer class, build the 3d_fullres network
   with the trainer's own ``build_network_architecture`` (nnU-Net's
   ``InitWeights_He(1e-2)`` initialisation) after ``torch.manual_seed(seed)``,
   and write the checkpoint with the trainer's own ``save_checkpoint``.

The weights are random: predictions are deterministic noise, not anatomy. The
output is deterministic for a given ``--seed`` (the phantom data, and so
plans.json, does not depend on the seed).

Usage::

    python scripts/build_test_weights.py OUTPUT_DIR [--task total_fast|total] [--seed 0]

Then run TotalSegmentator offline with ``TOTALSEG_WEIGHTS_PATH=OUTPUT_DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PLANS_NAME = "nnUNetPlans"
# Scratch dataset (temp folder only) on which the fingerprint is extracted: the phantom labelled with the full
# `total` class map, so that every structure of the phantom counts as foreground.
FINGERPRINT_DATASET_ID = 999
FINGERPRINT_DATASET_NAME = "Dataset999_PhantomFingerprint"
CONFIGURATION = "3d_fullres"
FOLD = 0

# Phantom cases: (slices, rows, columns) in mm of field of view, and noise seed.
# Three cases of slightly different size so that nnU-Net's median shape is a
# real median. Sized like a typical abdominal CT field of view.
PHANTOM_CASES_MM = [
    ((360.0, 402.0, 402.0), 0),
    ((330.0, 384.0, 420.0), 1),
    ((390.0, 420.0, 384.0), 2),
]

# Phantom structure -> TotalSegmentator class name (None: background). The
# phantom's "body" (fat and soft tissue) has no TotalSegmentator class.
PHANTOM_TO_TOTALSEG = {
    "body": None,
    "lung_left": "lung_upper_lobe_left",
    "lung_right": "lung_upper_lobe_right",
    "liver": "liver",
    "spleen": "spleen",
    "kidney_left": "kidney_left",
    "kidney_right": "kidney_right",
    "aorta": "aorta",
    "spine": "vertebrae_L1",
}


# --------------------------------------------------------------------------
# What to build, from the installed TotalSegmentator package
# --------------------------------------------------------------------------


def fingerprint_spec(spacing: float) -> dict:
    from totalsegmentator.map_to_binary import class_map

    return {
        "dataset_id": FINGERPRINT_DATASET_ID,
        "dataset_name": FINGERPRINT_DATASET_NAME,
        "trainer": None,
        "spacing": spacing,
        "classes": dict(sorted(class_map["total"].items())),
    }


def model_specs(task: str) -> list[dict]:
    """The models of a task: dataset id, folder, trainer, spacing and classes, as TotalSegmentator has them."""
    from totalsegmentator.map_tasks_config import TASK_CONFIGS, TASK_ID_WEIGHTS_CONFIGS
    from totalsegmentator.map_to_binary import class_map, class_map_5_parts, map_taskid_to_partname_ct

    if task == "total_fast":
        sub = TASK_CONFIGS["total"]["sub_modes"]["fast"]
        ids, class_maps = [sub["task_id"]], [class_map["total"]]
    elif task == "total":
        sub = TASK_CONFIGS["total"]["sub_modes"]["default"]
        ids = list(sub["task_id"])
        class_maps = [class_map_5_parts[map_taskid_to_partname_ct[i]] for i in ids]
    else:
        raise ValueError(f"unknown task {task!r} (known: total_fast, total)")
    spacing = float(sub["resample"])
    return [
        {
            "dataset_id": i,
            "dataset_name": TASK_ID_WEIGHTS_CONFIGS[i]["foldername"],
            "trainer": sub["trainer"],
            "spacing": spacing,
            "classes": dict(sorted(cm.items())),
        }
        for i, cm in zip(ids, class_maps, strict=True)
    ]


def dataset_json_for(spec: dict, num_training: int) -> dict:
    labels = {"background": 0}
    labels.update({name: int(idx) for idx, name in spec["classes"].items()})
    if list(labels.values()) != list(range(len(labels))):
        raise RuntimeError(f"{spec['dataset_name']}: labels are not consecutive")
    return {
        "channel_names": {"0": "CT"},
        "labels": labels,
        "numTraining": num_training,
        "file_ending": ".nii.gz",
        "name": spec["dataset_name"],
        "description": "SYNTHETIC TEST WEIGHTS: randomly initialised network, planned on a phantom "
        "by scripts/build_test_weights.py. Not a trained model.",
    }


# --------------------------------------------------------------------------
# Step 1: phantom raw dataset
# --------------------------------------------------------------------------


def write_raw_datasets(raw_root: Path, specs: list[dict]) -> None:
    import numpy as np
    import SimpleITK as sitk

    sys.path.insert(0, str(PROJECT_ROOT))
    from dicom_node.phantom import PHANTOM_LABELS, phantom_volume

    spacing = specs[0]["spacing"]
    for spec in specs:
        base = raw_root / spec["dataset_name"]
        (base / "imagesTr").mkdir(parents=True)
        (base / "labelsTr").mkdir(parents=True)
        with open(base / "dataset.json", "w") as f:
            json.dump(dataset_json_for(spec, len(PHANTOM_CASES_MM)), f, indent=4)

    for case_idx, (fov_mm, noise_seed) in enumerate(PHANTOM_CASES_MM):
        shape = tuple(round(e / spacing) for e in fov_mm)
        hu, phantom_labels = phantom_volume(shape=shape, spacing=(spacing,) * 3, seed=noise_seed)
        origin = tuple(-(n - 1) / 2.0 * spacing for n in shape[::-1])  # grid centred on the isocentre, LPS
        image = sitk.GetImageFromArray(hu)  # (slice, row, col) -> x = col (patient left), LPS identity direction
        image.SetSpacing((spacing,) * 3)
        image.SetOrigin(origin)
        case = f"phantom_{case_idx:03d}"
        first_image = raw_root / specs[0]["dataset_name"] / "imagesTr" / f"{case}_0000.nii.gz"
        sitk.WriteImage(image, str(first_image))
        for spec in specs:
            # labels: phantom structures renamed to this model's classes (those it does not have: background)
            name_to_id = {name: idx for idx, name in spec["classes"].items()}
            lut = np.zeros(max(PHANTOM_LABELS.values()) + 1, dtype=np.uint8)
            for phantom_name, phantom_id in PHANTOM_LABELS.items():
                lut[phantom_id] = name_to_id.get(PHANTOM_TO_TOTALSEG.get(phantom_name), 0)
            seg = sitk.GetImageFromArray(lut[phantom_labels])
            seg.CopyInformation(image)
            base = raw_root / spec["dataset_name"]
            if spec is not specs[0]:
                os.symlink(first_image, base / "imagesTr" / f"{case}_0000.nii.gz")
            sitk.WriteImage(seg, str(base / "labelsTr" / f"{case}.nii.gz"))


# --------------------------------------------------------------------------
# Steps 2 and 3: nnU-Net planning, network, checkpoint
# --------------------------------------------------------------------------


def count_parameters(network) -> int:
    return sum(p.numel() for p in network.parameters())


def plan_and_build(specs: list[dict], out_root: Path, seed: int, num_processes: int) -> list[dict]:
    """Runs with nnUNet_raw / nnUNet_preprocessed / nnUNet_results already set (nnunetv2 reads them on import)."""
    import nnunetv2
    import torch
    from batchgenerators.utilities.file_and_folder_operations import join, load_json, save_json
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
    )
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    summaries = []
    quiet = io.StringIO()
    # The fingerprint (spacings, shapes, CT intensity statistics of the foreground) is extracted once, on the
    # phantom labelled with all its structures, and shared by every model of the task (they see the same images).
    with contextlib.redirect_stdout(quiet):
        extract_fingerprint_dataset(
            FINGERPRINT_DATASET_ID,
            DatasetFingerprintExtractor,
            num_processes=num_processes,
            check_dataset_integrity=True,
            clean=True,
            verbose=False,
        )
    fingerprint_file = Path(nnUNet_preprocessed) / FINGERPRINT_DATASET_NAME / "dataset_fingerprint.json"

    for spec in specs:
        pre_dir = Path(nnUNet_preprocessed) / spec["dataset_name"]
        pre_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(fingerprint_file, pre_dir / "dataset_fingerprint.json")
        with contextlib.redirect_stdout(quiet):
            plan_experiment_dataset(spec["dataset_id"], ExperimentPlanner)
        plans = load_json(str(pre_dir / f"{PLANS_NAME}.json"))
        raw_dataset_json = load_json(join(os.environ["nnUNet_raw"], spec["dataset_name"], "dataset.json"))  # noqa: SIM112 - nnU-Net's own spelling
        shutil.copy(join(os.environ["nnUNet_raw"], spec["dataset_name"], "dataset.json"), pre_dir / "dataset.json")  # noqa: SIM112

        trainer_class = recursive_find_python_class(
            join(nnunetv2.__path__[0], "training", "nnUNetTrainer"), spec["trainer"], "nnunetv2.training.nnUNetTrainer"
        )
        if trainer_class is None:
            raise RuntimeError(f"trainer {spec['trainer']} not found in the installed nnunetv2")
        with contextlib.redirect_stdout(quiet):
            trainer = trainer_class(
                plans=plans,
                configuration=CONFIGURATION,
                fold=FOLD,
                dataset_json=raw_dataset_json,
                device=torch.device("cpu"),
            )
        cm, pm = trainer.configuration_manager, trainer.plans_manager

        # What nnUNetTrainer.initialize() does to make the network (it also builds the loss and the data loaders,
        # which need preprocessed training data and do not touch the weights).
        trainer.num_input_channels = determine_num_input_channels(pm, cm, trainer.dataset_json)
        torch.manual_seed(seed)
        trainer.network = trainer.build_network_architecture(
            cm.network_arch_class_name,
            cm.network_arch_init_kwargs,
            cm.network_arch_init_kwargs_req_import,
            trainer.num_input_channels,
            trainer.label_manager.num_segmentation_heads,
            trainer.enable_deep_supervision,
        ).to(trainer.device)
        trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
        with contextlib.redirect_stdout(quiet):
            # sets inference_allowed_mirroring_axes (None for the *NoMirroring trainers)
            trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        trainer.current_epoch = trainer.num_epochs - 1  # a finished training: save_checkpoint stores epoch + 1

        model_dir = out_root / spec["dataset_name"] / f"{spec['trainer']}__{PLANS_NAME}__{CONFIGURATION}"
        (model_dir / f"fold_{FOLD}").mkdir(parents=True)
        # as nnUNetTrainer.on_train_start writes them
        save_json(pm.plans, str(model_dir / "plans.json"), sort_keys=False)
        save_json(trainer.dataset_json, str(model_dir / "dataset.json"), sort_keys=False)
        shutil.copy(pre_dir / "dataset_fingerprint.json", model_dir / "dataset_fingerprint.json")
        with contextlib.redirect_stdout(quiet):
            trainer.save_checkpoint(str(model_dir / f"fold_{FOLD}" / "checkpoint_final.pth"))

        kw = cm.network_arch_init_kwargs
        summaries.append(
            {
                "dataset": spec["dataset_name"],
                "trainer": spec["trainer"],
                "network": cm.network_arch_class_name,
                "n_stages": kw["n_stages"],
                "features_per_stage": list(kw["features_per_stage"]),
                "strides": [list(s) for s in kw["strides"]],
                "patch_size": list(cm.patch_size),
                "spacing": list(cm.spacing),
                "batch_size": cm.batch_size,
                "normalization": list(cm.normalization_schemes),
                "intensity_properties": pm.foreground_intensity_properties_per_channel["0"],
                "num_outputs": trainer.label_manager.num_segmentation_heads,
                "parameters": count_parameters(trainer.network),
                "inference_allowed_mirroring_axes": trainer.inference_allowed_mirroring_axes,
            }
        )
    return summaries


def _print_summary(summaries: list[dict], out_root: Path, seconds: float) -> None:
    for s in summaries:
        ip = s["intensity_properties"]
        print(f"{s['dataset']}/{s['trainer']}__{PLANS_NAME}__{CONFIGURATION}")
        print(
            f"  network      {s['network'].rsplit('.', 1)[-1]}, {s['n_stages']} stages, "
            f"features {'-'.join(map(str, s['features_per_stage']))}"
        )
        print(f"  strides      {s['strides']}")
        print(f"  patch size   {s['patch_size']} at spacing {s['spacing']} mm, batch size {s['batch_size']}")
        print(f"  outputs      {s['num_outputs']}, parameters {s['parameters']:,} ({s['parameters'] / 1e6:.1f} M)")
        print(
            f"  normalise    {s['normalization']} mean {ip['mean']:.1f} std {ip['std']:.1f} "
            f"clip [{ip['percentile_00_5']:.1f}, {ip['percentile_99_5']:.1f}]"
        )
        print(f"  mirroring    {s['inference_allowed_mirroring_axes']}")
    print(f"written to {out_root} in {seconds:.1f} s")


def build(
    output_dir: Path,
    task: str = "total_fast",
    seed: int = 0,
    num_processes: int | None = None,
    verbose: bool = True,
    in_process: bool = False,
) -> list[dict]:
    """Builds the weights folder(s) of ``task`` under ``output_dir``; returns one summary dict per model.

    Existing model folders of the task under ``output_dir`` are replaced; nothing else there is touched.
    nnU-Net's planning runs in a fresh interpreter (nnunetv2 takes its nnUNet_raw/... folders from the
    environment at import), unless ``in_process`` (the command line, which has not imported nnunetv2 yet).
    """
    t0 = time.time()
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    specs = model_specs(task)
    num_processes = num_processes or max(1, min(len(PHANTOM_CASES_MM), os.cpu_count() or 1))

    with tempfile.TemporaryDirectory(prefix="build_test_weights_") as tmp:
        tmp = Path(tmp)
        env_dirs = {k: tmp / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
        for d in env_dirs.values():
            d.mkdir()
        write_raw_datasets(env_dirs["nnUNet_raw"], [fingerprint_spec(specs[0]["spacing"]), *specs])
        staging = tmp / "out"
        staging.mkdir()

        env = dict(os.environ, **{k: str(v) for k, v in env_dirs.items()}, nnUNet_def_n_proc=str(num_processes))
        if not in_process or "nnunetv2" in sys.modules:
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--_plan-and-build",
                str(staging),
                "--task",
                task,
                "--seed",
                str(seed),
                "--num-processes",
                str(num_processes),
            ]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"planning failed:\n{proc.stdout}\n{proc.stderr}")
            summaries = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            os.environ.update({k: env[k] for k in (*env_dirs, "nnUNet_def_n_proc")})
            summaries = plan_and_build(specs, staging, seed, num_processes)

        for spec in specs:
            src_dataset = staging / spec["dataset_name"]
            for model_dir in src_dataset.iterdir():
                dest = output_dir / spec["dataset_name"] / model_dir.name
                if dest.exists():
                    shutil.rmtree(dest)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(model_dir), str(dest))

    if verbose:
        _print_summary(summaries, output_dir, time.time() - t0)
    return summaries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", type=Path, help="weights folder to write into (TOTALSEG_WEIGHTS_PATH)")
    parser.add_argument("--task", choices=["total_fast", "total"], default="total_fast")
    parser.add_argument("--seed", type=int, default=0, help="torch seed for the weight initialisation")
    parser.add_argument("--num-processes", type=int, default=None, help="processes for fingerprint extraction")
    parser.add_argument("--_plan-and-build", dest="plan_and_build", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.plan_and_build:  # internal: fresh interpreter with the nnU-Net folders set
        with contextlib.redirect_stdout(sys.stderr):
            summaries = plan_and_build(model_specs(args.task), args.output_dir, args.seed, args.num_processes)
        print(json.dumps(summaries))
        return 0

    build(args.output_dir, args.task, args.seed, args.num_processes, in_process=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
