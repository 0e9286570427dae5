"""`dicom-node demo`: the whole loop in one command, as a newcomer runs it."""

from __future__ import annotations

import re
import subprocess

import pydicom
import pytest

from tests.conftest import DICOM_NODE

pytestmark = pytest.mark.integration


def test_demo_runs_the_whole_loop_and_prints_the_structures(tmp_path):
    output = tmp_path / "demo"
    result = subprocess.run([DICOM_NODE, "demo", "--output", str(output)], capture_output=True, text=True, timeout=600)
    printed = result.stdout + result.stderr
    print(printed)
    assert result.returncode == 0, printed

    rows = {
        m.group(1): (float(m.group(2)), float(m.group(3)))
        for m in re.finditer(r"│ (\w+)\s*│\s*([\d.]+) │\s*(-?[\d.]+) │", printed)
    }
    assert set(rows) == {"body", "lung_left", "lung_right", "skeleton"}
    assert all(volume > 0 for volume, _ in rows.values())
    assert rows["lung_left"][1] < -700 and rows["lung_right"][1] < -700  # air-filled lungs
    assert rows["skeleton"][1] > 300  # bone
    for modality, name in (("SEG", "seg.dcm"), ("SR", "sr.dcm"), ("RTSTRUCT", "rtstruct.dcm")):
        path = output / "retrieved" / name
        assert f"{modality:<9} {path}" in printed
        assert pydicom.dcmread(path, stop_before_pixels=True).Modality == modality
    assert (output / "preview.png").read_bytes().startswith(b"\x89PNG")
    assert "stop the node" in printed
    node_pids = subprocess.run(["pgrep", "-f", f"serve --config {output}"], capture_output=True, text=True).stdout
    assert node_pids.strip() == ""  # every process the demo started has stopped


def test_demo_fails_with_the_step_and_a_non_zero_exit(tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the output folder should go")
    result = subprocess.run([DICOM_NODE, "demo", "--output", str(blocked)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "demo failed at: prepare" in result.stderr, result.stderr
    said = " ".join(result.stderr.split())
    assert f"not a directory: {blocked}" in said, said  # the operating system's words, not an exception's name
    assert "Error" not in said and "Errno" not in said, said
    assert "node log:" not in said  # no node was started: no log to point at
