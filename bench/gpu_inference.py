#!/usr/bin/env python
"""GPU inference: the node's TotalSegmentator pipeline against TotalSegmentator itself, on one CUDA device.

On a machine with CUDA, in about 5 minutes:

1. builds random-initialised weights (``scripts/build_test_weights.py``) for ``total_fast`` (one
   3 mm model) and ``total`` (five 1.5 mm models) in TotalSegmentator's layout;
2. writes a 512x512x300 phantom CT (0.8x0.8x1.5 mm) as DICOM, and as the NIfTI TotalSegmentator reads;
3. per task: the node's pipeline in this process (``TotalSegmentatorModel(task, device="cuda")``:
   nnU-Net's predictor with everything on the device and its mixed precision, TotalSegmentator's
   GPU resampling where cupy and cuCIM are installed, the models loaded once and resident), a
   first job, then two more back to back, the third's DICOM decoding overlapping the second's
   inference (``inference.models.prefetch.VolumePrefetcher``); then TotalSegmentator's Python API
   (``device="gpu"``) in a fresh process, offline;
4. prints wall times, peak GPU memory (``torch.cuda.max_memory_allocated``; TotalSegmentator's is
   measured inside its process) and the Dice of every class between the two label maps.

Without CUDA it exits with status 2 and one sentence. ``--rehearse-on-cpu`` runs every step on the CPU
instead, on a small phantom and ``total_fast`` unless ``--tasks`` says otherwise (about a minute on 2 cores): it checks the script itself on
a machine without a GPU, so the device time of a GPU machine is not spent finding a broken script. Its figures
say nothing about GPU speed. Usage::

    .venv/bin/python bench/gpu_inference.py [--weights DIR] [--tasks total_fast,total] [--output FILE.json]
    .venv/bin/python bench/gpu_inference.py --rehearse-on-cpu [--weights DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TS_SCRIPT = """
import json, sys, time, torch
from totalsegmentator.python_api import totalsegmentator
started = time.perf_counter()
totalsegmentator(sys.argv[1], sys.argv[2], fast=sys.argv[3] == "total_fast", ml=True, device=sys.argv[4], quiet=True)
print(json.dumps({"seconds": time.perf_counter() - started,
                  "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if sys.argv[4] == "gpu" else None}))
"""

FULL_PHANTOM = (512, 512, 300)
REHEARSAL_PHANTOM = (160, 160, 48)
"""Rows, columns, slices of the phantom: the issue's 512x512x300 on the GPU; small enough for 2 cores in a rehearsal."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def build_weights(folder: Path, task: str) -> float:
    from inference.weights import WeightsMissing, model_folders

    try:
        model_folders(task, folder)
        return 0.0
    except WeightsMissing:
        pass
    started = time.perf_counter()
    command = [sys.executable, str(REPO / "scripts" / "build_test_weights.py"), str(folder), "--task", task]
    subprocess.run(command, check=True, capture_output=True, timeout=900)
    return time.perf_counter() - started


def write_phantom(work: Path, size: tuple[int, int, int] = FULL_PHANTOM) -> tuple[list[Path], Path]:
    import nibabel as nib
    import numpy as np

    from dicom_node.phantom import PhantomSpec, write_phantom_series
    from inference.volume import load_series_volume

    rows, columns, slices = size
    spec = PhantomSpec(rows=rows, columns=columns, slices=slices, pixel_spacing=(0.8, 0.8), slice_spacing=1.5)
    files = list(write_phantom_series(work / "dicom", spec).files)
    nib.save(load_series_volume(files).to_nibabel(np.int16), str(work / "ct.nii.gz"))
    return files, work / "ct.nii.gz"


def run_node(task: str, weights: Path, files: list[Path], device: str = "cuda") -> tuple[dict[str, Any], Any]:
    import torch

    from inference.models.prefetch import VolumePrefetcher
    from inference.models.totalsegmentator import TotalSegmentatorModel

    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    model = TotalSegmentatorModel(task, weights, device=device)
    figures: dict[str, Any] = {"model_load_s": time.perf_counter() - started, "precision": model.precision}
    # Job 1 pays the one-off costs (CUDA kernels, cuDNN autotuning). Jobs 2 and 3 run back to back as a worker
    # with the prefetcher would: job 3's series is decoded in the background while job 2's inference runs
    # (job 3 lists the same files in another order, so nothing is reused from job 2).
    jobs = (("first", files, None), ("second", files, files[::-1]), ("third", files[::-1], None))
    prefetcher = VolumePrefetcher()
    labels = None
    try:
        for job, series, following in jobs:
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            volume = prefetcher.take(series)
            decoded = time.perf_counter()
            if following is not None:
                prefetcher.prefetch(following)
            segmentation = model.segment(volume)
            if cuda:
                torch.cuda.synchronize()
            figures[f"{job}_job_s"] = time.perf_counter() - started
            figures[f"{job}_decode_s"] = decoded - started
            figures[f"{job}_stages"] = {k: round(v, 2) for k, v in segmentation.timings.items()}
            labels = segmentation.labels
    finally:
        prefetcher.close()
    figures["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    del model
    if cuda:
        torch.cuda.empty_cache()
    return figures, labels


def run_totalsegmentator(
    task: str, weights: Path, ct: Path, work: Path, device: str = "cuda"
) -> tuple[dict[str, Any], Any]:
    import nibabel as nib
    import numpy as np

    from inference.weights import offline_totalsegmentator_environment

    output = work / f"totalsegmentator-{task}.nii.gz"
    environment = offline_totalsegmentator_environment(weights, work / "totalseg-home", "gpu-bench")
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", TS_SCRIPT, str(ct), str(output), task, "gpu" if device == "cuda" else "cpu"],
        check=True,
        capture_output=True,
        text=True,
        env=environment,
        timeout=900,
    )
    figures = {"process_s": time.perf_counter() - started, **json.loads(done.stdout.strip().splitlines()[-1])}
    labels = np.asanyarray(nib.load(str(output)).dataobj).astype(np.uint8).transpose(2, 1, 0)  # type: ignore[attr-defined]
    return figures, labels


def dice_per_class(ours: Any, reference: Any, classes: dict[int, str]) -> dict[str, float]:
    import numpy as np

    pairs = np.bincount((ours.astype(np.uint16) * 256 + reference).ravel(), minlength=65536).reshape(256, 256)
    in_ours, in_reference, both = pairs.sum(axis=1), pairs.sum(axis=0), np.diag(pairs)
    return {
        classes.get(c, str(c)): round(float(2 * both[c] / (in_ours[c] + in_reference[c])), 4)
        for c in range(1, 256)
        if in_ours[c] or in_reference[c]
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, help="weights folder (built there if absent; default: a temp folder)")
    parser.add_argument("--tasks", default=None, help="default total_fast,total (a rehearsal: total_fast)")
    parser.add_argument("--output", type=Path, default=None, help="default bench/results/gpu_inference.json")
    parser.add_argument(
        "--rehearse-on-cpu",
        action="store_true",
        help="run every step on the CPU, small phantom, total_fast unless --tasks: checks this script, not GPU speed",
    )
    args = parser.parse_args(argv)
    rehearsal = args.rehearse_on_cpu
    device = "cpu" if rehearsal else "cuda"
    if args.tasks is None:
        args.tasks = "total_fast" if rehearsal else "total_fast,total"
    if args.output is None:
        args.output = (
            REPO / "bench" / "results" / ("gpu_inference_rehearsal.json" if rehearsal else "gpu_inference.json")
        )
    try:
        import torch
    except ImportError:
        print("This benchmark needs PyTorch with CUDA, and torch is not installed here.", file=sys.stderr)
        return 2
    if not rehearsal and not torch.cuda.is_available():
        print(
            "This benchmark needs a CUDA GPU, and PyTorch sees none on this machine "
            "(--rehearse-on-cpu checks the script without one).",
            file=sys.stderr,
        )
        return 2
    from totalsegmentator.map_to_binary import class_map

    classes = dict(class_map["total"])
    began = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    weights = (args.weights or work / "weights").resolve()
    gpu = "the CPU (a rehearsal: not GPU figures)" if rehearsal else torch.cuda.get_device_name(0)
    phantom = REHEARSAL_PHANTOM if rehearsal else FULL_PHANTOM
    result: dict[str, Any] = {"gpu": gpu, "torch": torch.__version__, "rehearsal": rehearsal, "tasks": {}}
    result["phantom"] = "x".join(str(n) for n in phantom)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        for task in tasks:
            log(f"building {task} weights")
            result.setdefault("weights_build_s", {})[task] = round(build_weights(weights, task), 1)
        log(f"writing the {result['phantom']} phantom")
        files, ct = write_phantom(work, phantom)
        for task in tasks:
            log(f"{task}: node")
            node, ours = run_node(task, weights, files, device)
            log(f"{task}: TotalSegmentator")
            reference, theirs = run_totalsegmentator(task, weights, ct, work, device)
            dice = dice_per_class(ours, theirs, classes)
            result["tasks"][task] = {
                "node": node,
                "totalsegmentator": reference,
                "differing_voxels": int((ours != theirs).sum()),
                "voxels": int(ours.size),
                "mean_dice": round(sum(dice.values()) / len(dice), 4) if dice else None,
                "dice_per_class": dice,
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the phantom, the label maps, and the weights unless --weights
    result["bench_wall_s"] = round(time.perf_counter() - began, 1)
    for task, figures in result["tasks"].items():
        node, reference = figures["node"], figures["totalsegmentator"]
        print(f"\n## {task} on {result['gpu']}")
        print(
            f"node: model load {node['model_load_s']:.1f} s; job 1 {node['first_job_s']:.1f} s "
            f"(decode {node['first_decode_s']:.1f} s, {node['first_stages']}); job 2 {node['second_job_s']:.1f} s "
            f"(decode {node['second_decode_s']:.1f} s); job 3, decoded during job 2's inference, "
            f"{node['third_job_s']:.1f} s (waited {node['third_decode_s']:.2f} s for its volume); "
            f"peak GPU memory {_mib(node['peak_gpu_mib'])}; precision {node['precision']}"
        )
        print(
            f"TotalSegmentator (Python API, fresh process): {reference['seconds']:.1f} s in the call, "
            f"{reference['process_s']:.1f} s with start-up; peak GPU memory {_mib(reference['peak_gpu_mib'])}"
        )
        print(f"ratio node second job / TotalSegmentator call: {node['second_job_s'] / reference['seconds']:.2f}")
        print(
            f"labels: {figures['differing_voxels']} of {figures['voxels']} voxels differ, mean Dice {figures['mean_dice']}"
        )
        print("Dice per class: " + ", ".join(f"{name} {value}" for name, value in figures["dice_per_class"].items()))
    print(f"\nin all {result['bench_wall_s']:.0f} s")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    return 0


def _mib(value: float | None) -> str:
    return "not measured (CPU)" if value is None else f"{value:.0f} MiB"


if __name__ == "__main__":
    sys.exit(main())
