"""The GPU benchmark script, rehearsed on the CPU, so a GPU machine's scarce time is never spent on a broken script.

``bench/gpu_inference.py --rehearse-on-cpu`` runs every step of the GPU benchmark (weights, phantom as DICOM
and NIfTI, the node's pipeline with its prefetcher for three jobs, TotalSegmentator's Python API in a fresh
process, Dice per class) on the CPU with a small phantom and ``total_fast``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_inference.py"

pytest.importorskip("totalsegmentator", reason="the rehearsal runs TotalSegmentator itself (extra 'totalsegmentator')")


@pytest.mark.integration
@pytest.mark.nightly  # about 100 s: the GPU script's own steps on the CPU; its parts are tested on their own
def test_rehearsal_runs_every_step_and_labels_agree(total_fast_test_weights: Path, tmp_path: Path) -> None:
    output = tmp_path / "rehearsal.json"
    command = [sys.executable, str(SCRIPT), "--rehearse-on-cpu", "--weights", str(total_fast_test_weights)]
    done = subprocess.run(
        [*command, "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(output.read_text())
    assert result["rehearsal"] is True
    assert result["gpu"].startswith("the CPU")
    assert list(result["tasks"]) == ["total_fast"]
    figures = result["tasks"]["total_fast"]
    node = figures["node"]
    for job in ("first", "second", "third"):
        assert node[f"{job}_job_s"] > 0
        assert node[f"{job}_stages"]["predict"] > 0
    assert node["peak_gpu_mib"] is None and figures["totalsegmentator"]["peak_gpu_mib"] is None
    assert figures["totalsegmentator"]["seconds"] > 0
    assert len(figures["dice_per_class"]) >= 5  # random weights still label many classes in the phantom
    assert figures["mean_dice"] >= 0.99
    assert "## total_fast on the CPU (a rehearsal: not GPU figures)" in done.stdout
    assert total_fast_test_weights.is_dir()  # weights passed with --weights are kept


def test_without_a_gpu_the_script_says_so_and_how_to_rehearse() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: the script would run the benchmark")
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "needs a CUDA GPU" in done.stderr and "--rehearse-on-cpu" in done.stderr
