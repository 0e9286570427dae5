#!/usr/bin/env python
"""Inference speed: the node's TotalSegmentator ``total_fast`` pipeline against TotalSegmentator's own CLI, on CPU.

Both run the same weights (built by ``scripts/build_test_weights.py``: TotalSegmentator's
layout, the 3 mm network nnU-Net plans, random initialisation) on the same synthetic CT
(``dicom_node.phantom``, 512x512x``--slices``, 0.8x0.8x1.5 mm):

* **reference**: ``TotalSegmentator -i ct.nii.gz -o out.nii.gz --fast --ml -d cpu`` (the
  venv's entry point) run offline (``TOTALSEG_WEIGHTS_PATH``, ``TOTALSEG_HOME_DIR``) under
  ``/usr/bin/time -v``;
* **node**: a fresh Python process (also under ``/usr/bin/time -v``) that imports the
  project, builds ``TotalSegmentatorModel("total_fast", weights, device="cpu")`` (model
  load), reads the DICOM series with ``load_series_volume`` and calls ``.segment()``
  (cold: what a worker's first job pays), then reads and segments again in the same
  process (warm: models resident, what every later job pays).

**Backends** (``--backends``, default ``torch-fp32,openvino-fp32,openvino-auto``): each node
configuration runs in every round, after the reference. OpenVINO models are converted (and
cached in ``<weights>/.openvino``) once before the first round; that one-off time is reported
separately (``conversion``). ``openvino-auto`` is resolved first: where it picks the same
precision as another configuration of the run (FP32 on a CPU without native BF16), its figures
are that configuration's and the report says so, instead of running the same thing twice.

Rounds alternate reference, node(s), reference, node(s), ... (``--repeats`` rounds). Every node
label map is compared with the same round's reference output (voxels that differ, mean
Dice over the classes present in either). Peak memory is reported three ways: GNU time's
"Maximum resident set size" (the largest single process of the tree, see getrusage(2)),
the sums of RSS and of anonymous RSS over the whole process tree sampled from /proc every
``--sample-interval`` seconds, and (node only) the driver's own ``ru_maxrss``.

Usage::

    .venv/bin/python bench/inference_speed.py                                  # 300 slices, 2 rounds
    .venv/bin/python bench/inference_speed.py --weights bench/results/weights  # build once, then reuse
    .venv/bin/python bench/inference_speed.py --slices 300 --repeats 3 --output bench/results/inference.json
    .venv/bin/python bench/inference_speed.py --api     # also TotalSegmentator's Python API, fresh process
    .venv/bin/python bench/inference_speed.py --backends openvino-fp32 --total --repeats 0   # only the total task, node

Exit status is non-zero (with a message) if a run fails or a label map differs from the
reference by more than ``--max-differing-voxels`` voxels.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
TOTALSEGMENTATOR = (
    str(VENV_BIN / "TotalSegmentator") if (VENV_BIN / "TotalSegmentator").exists() else "TotalSegmentator"
)
GNU_TIME = "/usr/bin/time"
TASK = "total_fast"
RUN_TIMEOUT_SECONDS = 1800
GOAL_RATIO = 0.5  # the node should take at most half the reference's time on CPU (fast task)
DEFAULT_CONFIGURATIONS = ("torch-fp32", "openvino-fp32", "openvino-auto")


class BenchError(RuntimeError):
    """A run failed or gave a wrong result; the figures would be meaningless."""


def log(message: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


# --------------------------------------------------------------------------- process-tree memory sampler


class TreeSampler:
    """Samples RSS and anonymous RSS summed over a process and all its descendants, from /proc.

    Summed RSS counts pages shared between processes (shared libraries, the page cache of
    files several processes map) once per process, so it over-states what the tree needs;
    summed ``RssAnon`` (heap, tensors, arrays: memory private to each process, as
    nnU-Net's workers are spawned, not forked) is the better "memory the tree needs"
    figure. Both are sampled, so a peak shorter than the interval can be missed.

    Only ``/proc/PID/stat`` and ``/proc/PID/status`` are read (about 0.1 ms each).
    ``/proc/PID/smaps_rollup`` (PSS) is *not*: it walks the page tables under the
    process's mmap lock and took 0.37 s per read on a 3.6 GB process here, which slowed
    the measured process itself.
    """

    def __init__(self, root_pid: int, interval: float) -> None:
        self.root = root_pid
        self.interval = interval
        self.peak_rss_kib = 0
        self.peak_anon_kib = 0
        self.peak_processes = 0
        self.samples = 0
        self.sampling_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    stat = handle.read()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
        tree, todo = [], [self.root]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo.extend(children.get(pid, []))
        return tree

    @staticmethod
    def _memory_kib(pid: int) -> tuple[int, int]:
        rss = anon = 0
        try:
            with open(f"/proc/{pid}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1])
                    elif line.startswith("RssAnon:"):
                        anon = int(line.split()[1])
                        break
        except (OSError, ValueError, IndexError):
            pass
        return rss, anon

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            tree = self._tree()
            memory = [self._memory_kib(pid) for pid in tree]
            self.peak_rss_kib = max(self.peak_rss_kib, sum(m[0] for m in memory))
            self.peak_anon_kib = max(self.peak_anon_kib, sum(m[1] for m in memory))
            self.peak_processes = max(self.peak_processes, len(tree))
            self.samples += 1
            self.sampling_s += time.perf_counter() - started
            self._stop.wait(self.interval)

    def result(self) -> dict[str, Any]:
        return {
            "tree_peak_rss_sum_mib": round(self.peak_rss_kib / 1024, 1),
            "tree_peak_anon_sum_mib": round(self.peak_anon_kib / 1024, 1),
            "tree_peak_processes": self.peak_processes,
            "tree_samples": self.samples,
            "tree_sampling_cpu_s": round(self.sampling_s, 2),
        }


def parse_gnu_time(path: Path) -> dict[str, Any]:
    """The figures of ``/usr/bin/time -v -o PATH`` that matter here."""
    text = path.read_text()

    def number(label: str) -> float | None:
        match = re.search(rf"{re.escape(label)}:\s*([0-9.]+)", text)
        return float(match.group(1)) if match else None

    maxrss = number("Maximum resident set size (kbytes)")
    return {
        "time_max_rss_mib": round(maxrss / 1024, 1) if maxrss is not None else None,
        "user_s": number("User time (seconds)"),
        "system_s": number("System time (seconds)"),
        "cpu_percent": number("Percent of CPU this job got"),
    }


def run_measured(
    command: list[str], env: dict[str, str], log_path: Path, time_path: Path, interval: float
) -> dict[str, Any]:
    """Run ``command`` under GNU time with the tree sampler; wall seconds from spawn to exit."""
    full = [GNU_TIME, "-v", "-o", str(time_path), *command]
    load = loadavg()
    with open(log_path, "wb") as out:
        spawned_wall = time.time()
        started = time.perf_counter()
        process = subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log_path.parent)
        with TreeSampler(process.pid, interval) as sampler:
            try:
                returncode = process.wait(timeout=RUN_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise BenchError(f"{command[0]} ran longer than {RUN_TIMEOUT_SECONDS} s; log: {log_path}") from None
        wall = time.perf_counter() - started
    if returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise BenchError(f"{' '.join(command)} exited {returncode}; log {log_path}:\n{tail}")
    return {
        "wall_s": round(wall, 3),
        "spawned_wall": spawned_wall,
        "loadavg_before": load,
        "loadavg_after": loadavg(),
        **parse_gnu_time(time_path),
        **sampler.result(),
    }


# --------------------------------------------------------------------------- reference (TotalSegmentator)


def totalseg_env(weights: Path, home: Path) -> dict[str, str]:
    from inference.weights import offline_totalsegmentator_environment

    return offline_totalsegmentator_environment(weights, home, "bench")


def reference_stages(log_text: str) -> dict[str, float]:
    """TotalSegmentator's own printed stage times (``Resampled in``, ``Predicted in``, ``Saved in``)."""
    resampled = [float(v) for v in re.findall(r"Resampled in ([0-9.]+)s", log_text)]
    stages: dict[str, float] = {}
    if resampled:
        stages["resample_in"] = resampled[0]
    if len(resampled) > 1:
        stages["resample_back"] = resampled[1]
    for key, label in (("predict", "Predicted in"), ("save", "Saved in")):
        match = re.search(rf"{label} ([0-9.]+)s", log_text)
        if match:
            stages[key] = float(match.group(1))
    # nnU-Net's tqdm bar over the sliding-window tiles: "8/8 [01:42<00:00, 12.8s/it]" (whole seconds)
    bars = [m for m in re.finditer(r"(\d+)/(\d+) \[(?:(\d+):)?(\d+):(\d+)<", log_text) if m.group(1) == m.group(2)]
    if bars:
        last = bars[-1]
        stages["predict.sliding_window_tqdm"] = float(
            int(last.group(3) or 0) * 3600 + int(last.group(4)) * 60 + int(last.group(5))
        )
        stages["tiles"] = int(last.group(2))
    return stages


def run_reference(work: Path, ct: Path, weights: Path, tag: str, interval: float) -> tuple[dict[str, Any], Path]:
    run_dir = work / f"reference-{tag}"
    run_dir.mkdir()
    output = run_dir / "out.nii.gz"
    env = totalseg_env(weights, work / "totalseg-home")
    command = [TOTALSEGMENTATOR, "-i", str(ct), "-o", str(output), "--fast", "--ml", "-d", "cpu"]
    result = run_measured(command, env, run_dir / "log.txt", run_dir / "time.txt", interval)
    result["stages"] = reference_stages((run_dir / "log.txt").read_text(errors="replace"))
    top_level = [v for k, v in result["stages"].items() if "." not in k and k != "tiles"]
    result["stages"]["other"] = round(result["wall_s"] - sum(top_level), 3)
    result["command"] = " ".join(command)
    if not output.is_file():
        raise BenchError(f"TotalSegmentator wrote no {output}")
    return result, output


API_SCRIPT = (
    "from totalsegmentator.python_api import totalsegmentator; import sys; "
    "totalsegmentator(sys.argv[1], sys.argv[2], fast=True, ml=True, device='cpu')"
)


def run_api(work: Path, ct: Path, weights: Path, tag: str, interval: float) -> tuple[dict[str, Any], Path]:
    run_dir = work / f"api-{tag}"
    run_dir.mkdir()
    output = run_dir / "out.nii.gz"
    env = totalseg_env(weights, work / "totalseg-home")
    result = run_measured(
        [sys.executable, "-c", API_SCRIPT, str(ct), str(output)],
        env,
        run_dir / "log.txt",
        run_dir / "time.txt",
        interval,
    )
    result["stages"] = reference_stages((run_dir / "log.txt").read_text(errors="replace"))
    return result, output


# --------------------------------------------------------------------------- node


def run_node(
    work: Path,
    files_list: Path,
    weights: Path,
    tag: str,
    interval: float,
    threads: int | None,
    configuration: str = "torch-fp32",
    task: str = TASK,
    extra: tuple[str, ...] = (),
) -> tuple[dict[str, Any], Path]:
    run_dir = work / f"node-{configuration}-{task}-{tag}"
    run_dir.mkdir()
    labels = run_dir / "labels.npy"
    report = run_dir / "driver.json"
    backend, precision = configuration.split("-", 1)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--node-driver",
        "--driver-files",
        str(files_list),
        "--weights",
        str(weights),
        "--driver-labels",
        str(labels),
        "--driver-report",
        str(report),
        "--driver-backend",
        backend,
        "--driver-precision",
        precision,
        "--driver-task",
        task,
        *extra,
    ]
    if threads:
        command += ["--cpu-threads", str(threads)]
    result = run_measured(command, dict(os.environ), run_dir / "log.txt", run_dir / "time.txt", interval)
    driver = json.loads(report.read_text())
    result["driver"] = driver
    if "cold_done_wall" in driver:  # not for a preparation-only run
        result["cold_s"] = round(driver["cold_done_wall"] - result["spawned_wall"], 3)
        result["python_start_s"] = round(driver["driver_start_wall"] - result["spawned_wall"], 3)
    return result, labels


def node_driver(args: argparse.Namespace) -> None:
    """Runs in the fresh subprocess: what a worker does for its first job, then for a second one."""
    start_wall = time.time()
    started = time.perf_counter()
    import resource

    sys.path.insert(0, str(REPO))
    import numpy as np
    import torch

    from inference.models.totalsegmentator import TotalSegmentatorModel
    from inference.volume import load_series_volume

    imported = time.perf_counter()
    model = TotalSegmentatorModel(
        args.driver_task,
        Path(args.weights),
        device="cpu",
        cpu_threads=args.cpu_threads,
        backend=args.driver_backend,
        precision=args.driver_precision,
    )
    loaded = time.perf_counter()
    if args.driver_prepare_only:  # only convert (and cache) the OpenVINO model: the one-off cost
        Path(args.driver_report).write_text(
            json.dumps({"model_load_s": round(loaded - imported, 3), "precision": model.precision})
        )
        return

    # Stage timers inside nnU-Net's predictor (instance attributes; a few perf_counter calls per tile).
    inner: dict[str, float] = {}

    def wrap(predictor: Any, name: str, key: str) -> None:
        original = getattr(predictor, name)

        def timed(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            inner.setdefault(key + "_first_start", t)
            value = original(*a, **k)
            now = time.perf_counter()
            inner[key + "_last_end"] = now
            inner[key] = inner.get(key, 0.0) + now - t
            inner[key + "_calls"] = inner.get(key + "_calls", 0) + 1
            return value

        setattr(predictor, name, timed)

    for predictor, _lookup in model.predictors:
        if hasattr(predictor.network, "predict_tiles"):
            # OpenVINO streams: the tiles' forward passes overlap nnU-Net's accumulation, so "forward" is the
            # time spent waiting for each tile's logits (the part of the forward passes nothing else hides).
            wrap(predictor.network, "_collect", "forward")
        else:
            wrap(predictor, "_internal_maybe_mirror_and_predict", "forward")
        wrap(predictor, "predict_logits_from_preprocessed_data", "sliding_window")
        wrap(predictor, "predict_single_npy_array", "nnunet")

    def job() -> tuple[Any, dict[str, float]]:
        inner.clear()
        t0 = time.perf_counter()
        paths = [Path(p) for p in json.loads(Path(args.driver_files).read_text())]
        volume = load_series_volume(paths)
        t1 = time.perf_counter()
        segmentation = model.segment(volume)
        t2 = time.perf_counter()
        stages: dict[str, Any] = {"dicom_read": t1 - t0, **segmentation.timings}
        if "nnunet" in inner and len(model.predictors) == 1:
            stages["predict.nnunet_preprocess"] = (
                inner["nnunet"]
                - inner["sliding_window"]
                - (inner["nnunet_last_end"] - inner["sliding_window_last_end"])
            )
            stages["predict.network_forward"] = inner["forward"]
            stages["predict.sliding_window_other"] = inner["sliding_window"] - inner["forward"]
            stages["predict.nnunet_export"] = inner["nnunet_last_end"] - inner["sliding_window_last_end"]
            stages["predict.other"] = segmentation.timings["predict"] - inner["nnunet"]
            stages["tiles"] = inner["forward_calls"]
        stages.update({"segment": t2 - t1, "job": t2 - t0})
        return segmentation, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in stages.items()}

    if args.driver_no_warm:  # the long total task: one job only
        cold, cold_stages = job()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        np.save(args.driver_labels, cold.labels)
        Path(args.driver_report).write_text(
            json.dumps(
                {
                    "driver_start_wall": start_wall,
                    "cold_done_wall": time.time(),
                    "import_s": round(imported - started, 3),
                    "model_load_s": round(loaded - imported, 3),
                    "cold": cold_stages,
                    "backend": model.backend,
                    "precision": model.precision,
                    "cold_cpu_user_s": round(usage.ru_utime, 1),
                    "cold_cpu_system_s": round(usage.ru_stime, 1),
                    "cold_ru_maxrss_mib": round(usage.ru_maxrss / 1024, 1),
                    "labels_shape": list(cold.labels.shape),
                },
                indent=2,
            )
        )
        return
    cold, cold_stages = job()
    cold_done_wall = time.time()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cold_maxrss_kib, cold_cpu = usage.ru_maxrss, (usage.ru_utime, usage.ru_stime)
    np.save(args.driver_labels, cold.labels)
    cold_labels = cold.labels
    del cold

    before_warm = resource.getrusage(resource.RUSAGE_SELF)
    warm, warm_stages = job()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    warm_maxrss_kib = usage.ru_maxrss
    warm_cpu = (usage.ru_utime - before_warm.ru_utime, usage.ru_stime - before_warm.ru_stime)
    report = {
        "driver_start_wall": start_wall,
        "cold_done_wall": cold_done_wall,
        "import_s": round(imported - started, 3),
        "model_load_s": round(loaded - imported, 3),
        "cold": cold_stages,
        "warm": warm_stages,
        "warm_equals_cold": bool(np.array_equal(warm.labels, cold_labels)),
        "labels_shape": list(cold_labels.shape),
        "cold_cpu_user_s": round(cold_cpu[0], 1),
        "cold_cpu_system_s": round(cold_cpu[1], 1),
        "warm_cpu_user_s": round(warm_cpu[0], 1),
        "warm_cpu_system_s": round(warm_cpu[1], 1),
        "cold_ru_maxrss_mib": round(cold_maxrss_kib / 1024, 1),
        "warm_ru_maxrss_mib": round(warm_maxrss_kib / 1024, 1),
        "backend": model.backend,
        "precision": model.precision,
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "patch_size": [list(p.configuration_manager.patch_size) for p, _ in model.predictors],
    }
    Path(args.driver_report).write_text(json.dumps(report, indent=2))


# --------------------------------------------------------------------------- comparison


def compare(node_labels: Path, reference_nifti: Path) -> dict[str, Any]:
    import nibabel as nib
    import numpy as np

    ours = np.load(node_labels)
    reference = np.asanyarray(nib.load(str(reference_nifti)).dataobj).astype(np.uint8).transpose(2, 1, 0)
    if ours.shape != reference.shape:
        return {"shape_node": list(ours.shape), "shape_reference": list(reference.shape), "identical": False}
    differing = int(np.count_nonzero(ours != reference))
    pairs = np.bincount((ours.astype(np.uint16) * 256 + reference).ravel(), minlength=65536).reshape(256, 256)
    in_node, in_reference, both = pairs.sum(axis=1), pairs.sum(axis=0), np.diag(pairs)
    present = [c for c in range(1, 256) if in_node[c] or in_reference[c]]
    dice = [2.0 * both[c] / (in_node[c] + in_reference[c]) for c in present]
    return {
        "identical": differing == 0,
        "differing_voxels": differing,
        "voxels": int(ours.size),
        "classes_present": len(present),
        "mean_dice": round(float(np.mean(dice)), 6) if dice else None,
        "min_dice": round(float(np.min(dice)), 6) if dice else None,
    }


# --------------------------------------------------------------------------- set-up


def ensure_weights(folder: Path, task: str = TASK) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    from inference.weights import WeightsMissing, model_folders

    try:
        model_folders(task, folder)
        return {"weights": str(folder), "built": False}
    except WeightsMissing:
        pass
    folder.mkdir(parents=True, exist_ok=True)
    log(f"building random-initialised {task} weights in {folder} (about 45 s per model)")
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "build_test_weights.py"), str(folder), "--task", task],
        check=True,
        capture_output=True,
        timeout=1200,
    )
    model_folders(task, folder)
    return {"weights": str(folder), "built": True, "build_s": round(time.perf_counter() - started, 1)}


def write_inputs(work: Path, slices: int) -> tuple[Path, Path, dict[str, Any]]:
    import nibabel as nib
    import numpy as np

    from dicom_node.phantom import PhantomSpec, write_phantom_series
    from inference.volume import load_series_volume

    spec = PhantomSpec(rows=512, columns=512, slices=slices, pixel_spacing=(0.8, 0.8), slice_spacing=1.5)
    started = time.perf_counter()
    series = write_phantom_series(work / "dicom", spec)
    files = [str(p) for p in series.files]
    del series
    dicom_s = time.perf_counter() - started
    files_list = work / "files.json"
    files_list.write_text(json.dumps(files))
    started = time.perf_counter()
    volume = load_series_volume([Path(p) for p in files])
    ct = work / "ct.nii.gz"
    nib.save(volume.to_nibabel(np.int16), str(ct))
    info = {
        "rows": 512,
        "columns": 512,
        "slices": slices,
        "pixel_spacing_mm": [0.8, 0.8],
        "slice_spacing_mm": 1.5,
        "dicom_files": len(files),
        "dicom_mib": round(sum(os.path.getsize(p) for p in files) / 2**20, 1),
        "nifti_mib": round(ct.stat().st_size / 2**20, 1),
        "volume_shape_kji": list(volume.hu.shape),
        "write_dicom_s": round(dicom_s, 1),
        "write_nifti_s": round(time.perf_counter() - started, 1),
    }
    return ct, files_list, info


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "nnunetv2", "TotalSegmentator", "openvino", "numpy", "nibabel", "SimpleITK", "pydicom"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def machine_info() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    flags = next(
        (
            line.split(":", 1)[1].split()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        ),
        [],
    )
    memory = next(
        (
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal:")
        ),
        0,
    )
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu,
        "cpu_avx512": any(f.startswith("avx512") for f in flags),
        "cpu_avx2": "avx2" in flags,
        "cpu_native_bf16": any(f in flags for f in ("avx512_bf16", "amx_bf16")),
        "memory_gib": round(memory / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "gpu": "none (CPU only)",
        "thread_env": {
            k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS") if k in os.environ
        },
        "packages": package_versions(),
    }


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    changed = git("status", "--porcelain", "--", "inference", "dicom_node", "scripts").splitlines()
    return {"head": git("rev-parse", "--short", "HEAD"), "uncommitted_changes": [c.strip() for c in changed]}


# --------------------------------------------------------------------------- report


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    ref = [r["reference"]["wall_s"] for r in rounds]
    cold = [r["node"]["cold_s"] for r in rounds]
    warm = [r["node"]["driver"]["warm"]["segment"] for r in rounds]
    warm_job = [r["node"]["driver"]["warm"]["job"] for r in rounds]
    ref_cpu = [round(r["reference"]["user_s"] + r["reference"]["system_s"], 1) for r in rounds]
    node_cpu = [round(r["node"]["user_s"] + r["node"]["system_s"], 1) for r in rounds]
    drivers = [r["node"]["driver"] for r in rounds]
    if all("cold_cpu_user_s" in d for d in drivers):
        node_cold_cpu = [round(d["cold_cpu_user_s"] + d["cold_cpu_system_s"], 1) for d in drivers]
        node_warm_cpu = [round(d["warm_cpu_user_s"] + d["warm_cpu_system_s"], 1) for d in drivers]
    else:  # result files written before the driver recorded its CPU time
        node_cold_cpu = node_warm_cpu = []
    summary: dict[str, Any] = {
        "reference_cpu_s": ref_cpu,
        "reference_cpu_median_s": median(ref_cpu),
        "node_cpu_s_cold_and_warm": node_cpu,
        "node_cpu_median_s_cold_and_warm": median(node_cpu),
        "node_cold_cpu_s": node_cold_cpu,
        "node_cold_cpu_median_s": median(node_cold_cpu) if node_cold_cpu else None,
        "node_warm_cpu_s": node_warm_cpu,
        "node_warm_cpu_median_s": median(node_warm_cpu) if node_warm_cpu else None,
        "ratio_cpu_node_cold_over_reference": round(median(node_cold_cpu) / median(ref_cpu), 3)
        if node_cold_cpu
        else None,
        "reference_system_share": round(
            statistics.median(
                [r["reference"]["system_s"] / (r["reference"]["user_s"] + r["reference"]["system_s"]) for r in rounds]
            ),
            3,
        ),
        "node_system_share": round(
            statistics.median([r["node"]["system_s"] / (r["node"]["user_s"] + r["node"]["system_s"]) for r in rounds]),
            3,
        ),
        "reference_wall_s": ref,
        "reference_median_s": median(ref),
        "node_cold_s": cold,
        "node_cold_median_s": median(cold),
        "node_warm_segment_s": warm,
        "node_warm_segment_median_s": median(warm),
        "node_warm_job_s": warm_job,
        "node_warm_job_median_s": median(warm_job),
        "ratio_node_cold_over_reference": round(median(cold) / median(ref), 3),
        "ratio_node_warm_segment_over_reference": round(median(warm) / median(ref), 3),
        "ratio_node_warm_job_over_reference": round(median(warm_job) / median(ref), 3),
        "goal_ratio": GOAL_RATIO,
        "reference_peak_time_max_rss_mib": max(r["reference"]["time_max_rss_mib"] for r in rounds),
        "reference_peak_tree_anon_mib": max(r["reference"]["tree_peak_anon_sum_mib"] for r in rounds),
        "reference_peak_tree_rss_sum_mib": max(r["reference"]["tree_peak_rss_sum_mib"] for r in rounds),
        "node_peak_time_max_rss_mib": max(r["node"]["time_max_rss_mib"] for r in rounds),
        "node_peak_tree_anon_mib": max(r["node"]["tree_peak_anon_sum_mib"] for r in rounds),
        "node_cold_ru_maxrss_mib": max(r["node"]["driver"]["cold_ru_maxrss_mib"] for r in rounds),
    }
    stage_names = ["import_s", "model_load_s"]
    summary["node_stage_median_s"] = {name: median([r["node"]["driver"][name] for r in rounds]) for name in stage_names}
    summary["node_stage_median_s"]["python_start_s"] = median([r["node"]["python_start_s"] for r in rounds])
    for phase in ("cold", "warm"):
        keys = [k for k, v in rounds[0]["node"]["driver"][phase].items() if isinstance(v, float)]
        summary[f"node_{phase}_stage_median_s"] = {
            k: median([r["node"]["driver"][phase][k] for r in rounds]) for k in keys
        }
    ref_keys = set.intersection(*(set(r["reference"]["stages"]) for r in rounds))
    summary["reference_stage_median_s"] = {
        k: median([r["reference"]["stages"][k] for r in rounds]) for k in sorted(ref_keys)
    }
    if all("api" in r for r in rounds):
        api = [r["api"]["wall_s"] for r in rounds]
        summary["api_wall_s"] = api
        summary["api_median_s"] = median(api)
    return summary


def print_table(rounds: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    def row(*cells: object) -> str:
        return "| " + " | ".join(str(c) for c in cells) + " |"

    lines = [
        row(
            "round",
            "load avg before (ref / node)",
            "reference s",
            "ref CPU s user+sys",
            "ref CPU %",
            "ref max RSS / tree anon MiB",
            "node cold s",
            "node cold CPU s user+sys",
            "node warm segment s",
            "node CPU %",
            "node max RSS / tree anon MiB",
            "labels vs ref",
        ),
        row(*["---"] * 12),
    ]
    for i, r in enumerate(rounds, 1):
        ref, node = r["reference"], r["node"]
        driver = node["driver"]
        cmp = r["comparison"]
        verdict = (
            "identical" if cmp["identical"] else f"{cmp.get('differing_voxels')} differ, Dice {cmp.get('mean_dice')}"
        )
        node_cpu = (
            f"{driver['cold_cpu_user_s']:.0f}+{driver['cold_cpu_system_s']:.0f}" if "cold_cpu_user_s" in driver else "-"
        )
        lines.append(
            row(
                i,
                f"{ref['loadavg_before'][0]:.2f} / {node['loadavg_before'][0]:.2f}",
                f"{ref['wall_s']:.1f}",
                f"{ref['user_s']:.0f}+{ref['system_s']:.0f}",
                f"{ref['cpu_percent']:.0f}",
                f"{ref['time_max_rss_mib']:.0f} / {ref['tree_peak_anon_sum_mib']:.0f}",
                f"{node['cold_s']:.1f}",
                node_cpu,
                f"{driver['warm']['segment']:.1f}",
                f"{node['cpu_percent']:.0f}",
                f"{node['time_max_rss_mib']:.0f} / {node['tree_peak_anon_sum_mib']:.0f}",
                verdict,
            )
        )
    lines.append(
        row(
            "**median**",
            "",
            f"**{summary['reference_median_s']:.1f}**",
            summary["reference_cpu_median_s"],
            "",
            "",
            f"**{summary['node_cold_median_s']:.1f}**",
            summary.get("node_cold_cpu_median_s") or "-",
            f"**{summary['node_warm_segment_median_s']:.1f}**",
            "",
            "",
            "",
        )
    )
    print("\n".join(lines))
    print()
    cold = summary["node_cold_stage_median_s"]
    warm = summary["node_warm_stage_median_s"]
    other = summary["node_stage_median_s"]
    print(row("node stage (median s)", "cold (first job)", "warm (later job)"))
    print(row("---", "---", "---"))
    print(row("python start", other["python_start_s"], "-"))
    print(row("imports", other["import_s"], "-"))
    print(row("model load", other["model_load_s"], "-"))
    for key in cold:
        if key in ("segment", "job"):
            continue
        print(row(key, cold[key], warm.get(key, "")))
    print(row("segment (resample+predict+postprocess)", cold.get("segment"), warm.get("segment")))
    print(row("job (DICOM read + segment)", cold.get("job"), warm.get("job")))
    print()
    print(row("reference stage (median s, TotalSegmentator's own prints)", "seconds"))
    print(row("---", "---"))
    for key, value in summary["reference_stage_median_s"].items():
        print(row(key, value))
    print()
    print(
        f"ratio node cold / reference: {summary['ratio_node_cold_over_reference']:.3f}   "
        f"node warm segment / reference: {summary['ratio_node_warm_segment_over_reference']:.3f}   "
        f"node warm job / reference: {summary['ratio_node_warm_job_over_reference']:.3f}   (goal <= {GOAL_RATIO})"
    )
    if summary.get("ratio_cpu_node_cold_over_reference") is not None:
        print(
            f"CPU seconds (user+sys), less sensitive to other load on the machine: reference {summary['reference_cpu_median_s']}, "
            f"node cold {summary['node_cold_cpu_median_s']}, node warm {summary['node_warm_cpu_median_s']}; "
            f"ratio node cold / reference {summary['ratio_cpu_node_cold_over_reference']:.3f}"
        )
    if "api_median_s" in summary:
        print(f"TotalSegmentator Python API (fresh process) median: {summary['api_median_s']:.1f} s")


# --------------------------------------------------------------------------- backends


def resolve_configurations(requested: str) -> tuple[list[str], dict[str, str]]:
    """The node configurations to run, and those not run because they resolve to another one here.

    ``openvino-auto`` is FP32 on a CPU without native BF16 (and BF16 where BF16 is native; the
    calibration at load then decides, so it is run as its own configuration there).
    """
    sys.path.insert(0, str(REPO))
    from inference.models.openvino_backend import cpu_has_native_bf16

    wanted = [c.strip() for c in requested.split(",") if c.strip()]
    for configuration in wanted:
        if configuration not in ("torch-fp32", "openvino-fp32", "openvino-bf16", "openvino-auto"):
            raise SystemExit(f"unknown node configuration {configuration!r} in --backends")
    aliases: dict[str, str] = {}
    if "openvino-auto" in wanted and not cpu_has_native_bf16() and "openvino-fp32" in wanted:
        aliases["openvino-auto"] = "openvino-fp32"
    return [c for c in wanted if c not in aliases], aliases


def prepare(
    work: Path, files_list: Path, weights: Path, configurations: list[str], args: argparse.Namespace, task: str = TASK
) -> dict[str, Any]:
    """Convert (or find cached) each OpenVINO model once, timed: the one-off cost before the first job."""
    done: dict[str, Any] = {}
    for configuration in configurations:
        if not configuration.startswith("openvino"):
            continue
        log(f"preparing {configuration} for {task} (converts to OpenVINO unless cached; load {loadavg()})")
        result, _labels = run_node(
            work,
            files_list,
            weights,
            f"prepare-{task}",
            args.sample_interval,
            args.cpu_threads,
            configuration,
            task,
            ("--driver-prepare-only",),
        )
        done[configuration] = {
            "wall_s": result["wall_s"],
            "model_load_s": result["driver"]["model_load_s"],
            "precision": result["driver"]["precision"],
            "time_max_rss_mib": result["time_max_rss_mib"],
        }
        log(f"{configuration}: ready in {result['wall_s']:.0f} s, computes in {result['driver']['precision']}")
        break  # one conversion serves every OpenVINO precision
    return done


def run_total(work: Path, files_list: Path, args: argparse.Namespace, configuration: str) -> dict[str, Any]:
    """The total task (five 1.5 mm models), node only, one job in a fresh process (no warm run)."""
    folder = (args.total_weights or args.weights or work / "weights").resolve()
    built = ensure_weights(folder, "total")
    conversion = prepare(work, files_list, folder, [configuration], args, "total")
    log(f"total task: node {configuration} (load {loadavg()})")
    node, labels = run_node(
        work,
        files_list,
        folder,
        "total",
        args.sample_interval,
        args.cpu_threads,
        configuration,
        "total",
        ("--driver-no-warm",),
    )
    labels.unlink()
    log(f"total task: node {configuration} {node['cold_s']:.1f} s")
    return {"configuration": configuration, "weights": built, "conversion": conversion, "node": node}


def for_configuration(rounds: list[dict[str, Any]], configuration: str) -> list[dict[str, Any]]:
    """One configuration's rounds in the shape :func:`summarise` reads (also reads results of one node only)."""
    if "nodes" not in rounds[0]:
        return rounds
    return [
        {
            "reference": r["reference"],
            "node": r["nodes"][configuration],
            "comparison": r["comparisons"][configuration],
            **({"api": r["api"]} if "api" in r else {}),
        }
        for r in rounds
    ]


def report(result: dict[str, Any]) -> None:
    rounds = result.get("rounds", [])
    configurations = result.get("configurations", ["torch-fp32"])
    summaries = {}
    for configuration in configurations if rounds else []:
        print(f"\n## node {configuration}\n")
        summaries[configuration] = summarise(for_configuration(rounds, configuration))
        print_table(for_configuration(rounds, configuration), summaries[configuration])
    if summaries:
        print("\n## all configurations (medians; ratios against the reference of the same rounds)\n")
        print(
            "| node | cold s | warm segment s | forward passes (warm) s | cold / ref | warm segment / ref | "
            "cold CPU / ref CPU | peak max RSS MiB | labels |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for configuration, summary in summaries.items():
            forward = summary["node_warm_stage_median_s"].get("predict.network_forward", "-")
            comparisons = (
                [r["comparisons"][configuration] for r in rounds]
                if "nodes" in rounds[0]
                else [r["comparison"] for r in rounds]
            )
            labels = (
                "identical"
                if all(c["identical"] for c in comparisons)
                else f"max {max(c['differing_voxels'] for c in comparisons)} differ, min mean Dice "
                f"{min(c['mean_dice'] for c in comparisons)}"
            )
            print(
                f"| {configuration} | {summary['node_cold_median_s']:.1f} | {summary['node_warm_segment_median_s']:.1f} | "
                f"{forward} | {summary['ratio_node_cold_over_reference']:.3f} | "
                f"{summary['ratio_node_warm_segment_over_reference']:.3f} | "
                f"{summary['ratio_cpu_node_cold_over_reference']} | {summary['node_peak_time_max_rss_mib']:.0f} | {labels} |"
            )
        print(
            f"| reference (TotalSegmentator CLI) | {next(iter(summaries.values()))['reference_median_s']:.1f} | | | | | | "
            f"{next(iter(summaries.values()))['reference_peak_time_max_rss_mib']:.0f} (tree anon "
            f"{next(iter(summaries.values()))['reference_peak_tree_anon_mib']:.0f}) | |"
        )
    for alias, target in result.get("aliases", {}).items():
        print(
            f"{alias}: not run separately; on this CPU (no native BF16) it is {target}, so its figures are {target}'s."
        )
    for configuration, conversion in result.get("conversion", {}).items():
        print(
            f"one-off OpenVINO conversion ({configuration}, cached afterwards): {conversion['wall_s']:.0f} s "
            f"in a fresh process, computing in {conversion['precision']}"
        )
    total = result.get("total_task")
    if total:
        node = total["node"]
        print(
            f"total task (five 1.5 mm models), node {total['configuration']}, one job: {node['cold_s']:.1f} s "
            f"(model load {node['driver']['model_load_s']:.1f} s, stages {node['driver']['cold']}), "
            f"max RSS {node['time_max_rss_mib']:.0f} MiB; conversion {total['conversion']}"
        )


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (reference, node configurations)")
    parser.add_argument(
        "--backends",
        default=",".join(DEFAULT_CONFIGURATIONS),
        help="node configurations, comma-separated: torch-fp32, openvino-fp32, openvino-bf16, openvino-auto",
    )
    parser.add_argument(
        "--total",
        action="store_true",
        help="also time the node on the total task (five 1.5 mm models, built if absent), once, with "
        "the last of --backends; TotalSegmentator's CLI is not run for it (about 30 min per run)",
    )
    parser.add_argument("--total-weights", type=Path, help="weights folder for --total (default: --weights)")
    parser.add_argument("--weights", type=Path, help="weights folder; built there if absent (default: a temp folder)")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "inference.json")
    parser.add_argument("--api", action="store_true", help="also time TotalSegmentator's Python API in a fresh process")
    parser.add_argument("--cpu-threads", type=int, help="torch threads for the node (default: its own default, nproc)")
    parser.add_argument("--sample-interval", type=float, default=0.5, help="seconds between /proc memory samples")
    parser.add_argument("--max-differing-voxels", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (inputs, outputs, logs)")
    parser.add_argument("--report", type=Path, metavar="JSON", help="only print the tables of an earlier result file")
    # internal: the node driver subprocess
    parser.add_argument("--node-driver", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--driver-files", help=argparse.SUPPRESS)
    parser.add_argument("--driver-labels", help=argparse.SUPPRESS)
    parser.add_argument("--driver-report", help=argparse.SUPPRESS)
    parser.add_argument("--driver-backend", default="torch", help=argparse.SUPPRESS)
    parser.add_argument("--driver-precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--driver-task", default=TASK, help=argparse.SUPPRESS)
    parser.add_argument("--driver-prepare-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--driver-no-warm", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.node_driver:
        node_driver(args)
        return 0
    if args.report:
        report(json.loads(args.report.read_text()))
        return 0
    if not Path(GNU_TIME).exists():
        raise SystemExit(f"{GNU_TIME} (GNU time) is needed for the peak RSS figures")
    began = time.perf_counter()
    started_at = datetime.now(timezone.utc)
    work = Path(tempfile.mkdtemp(prefix="inference-bench-"))
    result: dict[str, Any] = {
        "started_utc": started_at.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "git": git_state(),
        "task": TASK,
        "arguments": {
            "slices": args.slices,
            "repeats": args.repeats,
            "cpu_threads": args.cpu_threads,
            "sample_interval_s": args.sample_interval,
            "api": args.api,
            "backends": args.backends,
            "total": args.total,
        },
    }
    try:
        result["weights"] = ensure_weights((args.weights or work / "weights").resolve())
        weights = Path(result["weights"]["weights"])
        log(f"writing the {args.slices}-slice phantom (DICOM and NIfTI) in {work}")
        ct, files_list, result["input"] = write_inputs(work, args.slices)
        configurations, aliases = resolve_configurations(args.backends)
        result["configurations"] = configurations
        result["aliases"] = aliases
        result["conversion"] = prepare(work, files_list, weights, configurations, args)
        rounds = []
        for i in range(1, args.repeats + 1):
            log(f"round {i}: reference (load {loadavg()})")
            ref, ref_out = run_reference(work, ct, weights, str(i), args.sample_interval)
            log(f"round {i}: reference {ref['wall_s']:.1f} s")
            entry: dict[str, Any] = {"reference": ref, "nodes": {}, "comparisons": {}}
            for configuration in configurations:
                log(f"round {i}: node {configuration} (load {loadavg()})")
                node, labels = run_node(
                    work, files_list, weights, str(i), args.sample_interval, args.cpu_threads, configuration
                )
                log(
                    f"round {i}: node {configuration} cold {node['cold_s']:.1f} s, "
                    f"warm segment {node['driver']['warm']['segment']:.1f} s"
                )
                cmp = compare(labels, ref_out)
                entry["nodes"][configuration] = node
                entry["comparisons"][configuration] = cmp
                log(f"round {i}: {configuration} labels vs reference: {cmp}")
                if args.api and configuration == configurations[0]:
                    log(f"round {i}: TotalSegmentator Python API (load {loadavg()})")
                    api, api_out = run_api(work, ct, weights, str(i), args.sample_interval)
                    api["comparison"] = compare(labels, api_out)
                    entry["api"] = api
                labels.unlink()
                if not cmp.get("identical") and cmp.get("differing_voxels", 10**12) > args.max_differing_voxels:
                    raise BenchError(f"round {i}: the {configuration} label map differs from TotalSegmentator's: {cmp}")
                if not node["driver"]["warm_equals_cold"]:
                    raise BenchError(f"round {i}: the {configuration} warm label map differs from the cold one")
            rounds.append(entry)
            args.output.parent.mkdir(parents=True, exist_ok=True)  # each round kept, should a later one be cut short
            args.output.write_text(json.dumps({**result, "rounds": rounds, "incomplete": True}, indent=2))
        if args.total:
            result["total_task"] = run_total(work, files_list, args, configurations[-1])
        result["rounds"] = rounds
        if rounds:
            result["summary"] = {c: summarise(for_configuration(rounds, c)) for c in configurations}
        result["finished_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        result["bench_wall_s"] = round(time.perf_counter() - began, 1)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2))
        report(result)
        print(f"\nwrote {args.output} ({result['bench_wall_s']:.0f} s in all)")
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
