"""Operator commands that need no running node: phantom, weights list/import."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pydicom

from inference.weights import TASK_DATASETS, identify, model_folders
from tests.conftest import DICOM_NODE, require_extra


def run(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DICOM_NODE, *args, "--config", str(config)], capture_output=True, text=True, timeout=120)


def make_config(tmp_path: Path) -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(f"storage: {{directory: {tmp_path / 'storage'}}}\n")
    return config


def test_phantom_command_writes_a_readable_ct_series(tmp_path):
    result = subprocess.run(
        [DICOM_NODE, "phantom", str(tmp_path / "ct"), "--slices", "6", "--size", "64", "--compression", "rle"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    files = sorted((tmp_path / "ct").glob("*.dcm"))
    assert len(files) == 6
    dataset = pydicom.dcmread(files[0])
    assert dataset.Modality == "CT" and dataset.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5"
    assert dataset.pixel_array.shape == (64, 64)


def test_weights_import_installs_a_release_zip_and_list_shows_it(tmp_path, monkeypatch, total_fast_test_weights):
    """A zip laid out as TotalSegmentator's release (random-initialised weights: the import loads what it installs)."""
    from tests.test_weights_import import release_entries, write_zip

    require_extra("torch")
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    config = make_config(tmp_path)
    _id, dataset, trainer = TASK_DATASETS["total_fast"][0]
    archive = write_zip(tmp_path / f"{dataset}.zip", release_entries(total_fast_test_weights))

    before = run("weights", "list", config=config)
    imported = run("weights", "import", str(archive), config=config)
    after = run("weights", "list", config=config)

    assert "total_fast  missing" in before.stdout
    assert imported.returncode == 0, imported.stderr
    assert (tmp_path / "storage" / "weights" / dataset / trainer / "fold_0" / "checkpoint_final.pth").is_file()
    assert (tmp_path / "storage" / "weights" / dataset / trainer / "dicom-node-weights.json").is_file()
    assert "total_fast  installed" in after.stdout and "total       missing" in after.stdout
    assert "restarted" in imported.stdout, "the import says a running node keeps the weights it loaded"
    identity = identify("total_fast", model_folders("total_fast", tmp_path / "storage" / "weights"))
    assert f"sha256:{identity.sha256}" in after.stdout and "test weights" in after.stdout

    checkpoint = tmp_path / "storage" / "weights" / dataset / trainer / "fold_0" / "checkpoint_final.pth"
    checkpoint.write_bytes(checkpoint.read_bytes() + b"changed")
    changed = run("weights", "list", config=config)
    assert changed.returncode == 0, changed.stderr
    assert "total_fast  installed  but not usable" in changed.stdout and identity.sha256 not in changed.stdout


def test_weights_import_refuses_other_zips(tmp_path):
    config = make_config(tmp_path)
    unrelated = tmp_path / "photos.zip"
    with zipfile.ZipFile(unrelated, "w") as bundle:
        bundle.writestr("holiday.jpg", "x")
    escaping = tmp_path / "evil.zip"
    with zipfile.ZipFile(escaping, "w") as bundle:
        bundle.writestr("../Dataset297_x/t/fold_0/checkpoint_final.pth", "x")

    for archive, message in ((unrelated, "not a TotalSegmentator weights zip"), (escaping, "unsafe entry")):
        result = run("weights", "import", str(archive), config=config)
        assert result.returncode == 1
        assert message in result.stderr
    assert not (tmp_path / "Dataset297_x").exists()
