"""The node's TotalSegmentator pipeline against TotalSegmentator's own Python API, same weights.

Real weights cannot be downloaded here, so ``scripts/build_test_weights.py`` builds a
weights folder in TotalSegmentator's layout: nnU-Net's own planner on phantom data, a
randomly initialised network of that architecture saved as an nnU-Net checkpoint. Such
a network already gives label maps with 100+ classes on a real CT, enough to compare
both pipelines voxel by voxel. TotalSegmentator runs in a separate process, offline.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from db.models import JobState
from dicom_node.phantom import PhantomSpec, write_phantom_series
from inference.volume import load_series_volume, volume_from_nifti
from inference.weights import TASK_DATASETS, model_folders
from tests.conftest import free_port, require_extra, require_tool, storescu, totalsegmentator_reference

require_extra("nnunetv2")
require_extra("totalsegmentator")

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def weights(total_fast_test_weights) -> Path:
    """A random-initialised total_fast weights folder in TotalSegmentator's layout (built once per session)."""
    return total_fast_test_weights


@pytest.fixture(scope="module")
def model(weights):
    from inference.models.totalsegmentator import TotalSegmentatorModel

    return TotalSegmentatorModel("total_fast", weights, device="cpu")


def mean_dice(ours: np.ndarray, reference: np.ndarray) -> tuple[float, int]:
    classes = [c for c in np.union1d(np.unique(ours), np.unique(reference)) if c != 0]
    scores = []
    for c in classes:
        a, b = ours == c, reference == c
        scores.append(2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))
    return float(np.mean(scores)), len(classes)


def test_weights_layout_matches_totalsegmentators_own_table():
    from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS

    for datasets in TASK_DATASETS.values():
        for dataset_id, folder, _trainer in datasets:
            assert TASK_ID_WEIGHTS_CONFIGS[dataset_id]["foldername"] == folder


def test_model_names_its_exact_weights_and_knows_they_are_test_weights(model, weights):
    from inference.weights import MANIFEST_NAME

    assert model.algorithm_version == f"Dataset297 sha256:{model.weights.sha256[:16]}"
    assert model.is_test_weights  # build_test_weights.py says so in dataset.json
    assert (model_folders("total_fast", weights)[0].path / MANIFEST_NAME).is_file()


def test_label_map_equals_totalsegmentator_on_the_real_dicom_ct(dicom_ct_reference, model):
    volume, _ct, reference = dicom_ct_reference

    ours = model.segment(volume).labels

    dice, present = mean_dice(ours, reference)
    print(f"DICOM CT: {present} classes, mean Dice {dice:.4f}, {int((ours != reference).sum())} voxels differ")
    assert present >= 5
    assert dice >= 0.99


@pytest.mark.nightly  # the default run checks parity on the real DICOM series
def test_label_map_equals_totalsegmentator_on_the_3mm_nifti(shared_fixtures, weights, model, tmp_path):
    ct = shared_fixtures / "example_ct_sm.nii.gz"

    ours = model.segment(volume_from_nifti(ct)).labels
    reference = totalsegmentator_reference(ct, weights, tmp_path)

    dice, present = mean_dice(ours, reference)
    print(f"example_ct_sm: {present} classes, mean Dice {dice:.4f}, {int((ours != reference).sum())} voxels differ")
    assert present >= 5
    assert dice >= 0.99


def test_node_segments_a_received_series_with_totalsegmentator(tmp_path, start_node, weights):
    spec = PhantomSpec(rows=96, columns=96, slices=30, pixel_spacing=(3.5, 3.5), slice_spacing=5.0)
    series = write_phantom_series(tmp_path / "ct", spec)
    model = {"kind": "totalsegmentator", "task": "total_fast", "weights_directory": str(weights), "tile_step_size": 0.5}
    node = start_node(
        models={"ts-fast": model},
        rules=[{"name": "ct", "match": {"modality": "CT"}, "action": "process", "model": "ts-fast"}],
        inference={"workers": 1, "device": "cpu"},
    )

    assert storescu(node.port, series.files).returncode == 0

    node.wait_for_state(series.series_instance_uid, JobState.DONE, timeout=300)
    reason = node.job_reason(series.series_instance_uid)
    assert reason.startswith("segmented with 1 warning(s): made with test weights") and "baseline" not in reason
    folder = Path(reason.rsplit("results in ", 1)[1])
    description = json.loads((folder / "segmentation.json").read_text())
    assert description["algorithm_name"] == "TotalSegmentator total_fast"
    assert len(description["classes"]) == 117
    identity = description["weights"]
    assert identity["test_weights"] and identity["datasets"] == ["Dataset297_TotalSegmentator_total_3mm_1559subj"]
    made_by = json.loads((folder / "measurements.json").read_text())["algorithm"]
    assert made_by["weights"] == identity
    # The sliding window's step changes the label map (a quarter of a CT's voxels between 0.5 and 0.8): said too.
    assert made_by["parameters"]["tile_step_size"] == "0.5" and made_by["parameters"]["mirroring"] == "off"

    # A radiologist sees it in every result: the SEG and SR name the exact weights and say "TEST WEIGHTS".
    seg, sr = pydicom.dcmread(folder / "seg-binary.dcm"), pydicom.dcmread(folder / "sr-binary.dcm")
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmVersion == f"Dataset297 sha256:{identity['sha256'][:16]}"
    assert ",tile_step_size=0.5,mirroring=off," in algorithm.AlgorithmParameters
    assert "TEST WEIGHTS" in seg.SeriesDescription and "TEST WEIGHTS" in sr.SeriesDescription
    assert len(seg.SeriesDescription) <= 64 and len(sr.SeriesDescription) <= 64
    sr_bytes = (folder / "sr-binary.dcm").read_bytes()  # the comment item and the algorithm version, as written
    assert b"not a trained model" in sr_bytes and identity["sha256"][:16].encode() in sr_bytes
    assert b"tile_step_size=0.5" in sr_bytes and b"mirroring=off" in sr_bytes
    assert f"SHA-256 {identity['sha256']}" in node.cli("show", series.series_instance_uid).stdout


def test_logits_that_overflow_half_precision_in_nnunets_loop_fail_the_series_with_a_reason(weights, tmp_path):
    """The PyTorch backend runs nnU-Net's own sliding window, whose overflow error becomes the node's reason."""
    import torch

    from inference.models import HALF_PRECISION_OVERFLOW, SegmentationFailed
    from inference.models.totalsegmentator import TotalSegmentatorModel

    model = TotalSegmentatorModel("total_fast", weights, device="cpu", backend="torch")
    predictor, _lookup = model.predictors[0]
    head = [name for name, layer in predictor.network.named_modules() if isinstance(layer, torch.nn.Conv3d)][-1]
    for parameters in predictor.list_of_parameters:  # nnU-Net loads these into the network before predicting
        parameters[f"{head}.bias"].fill_(1e5)  # times the Gaussian's peak of 10: past FP16's largest, 65,504
    spec = PhantomSpec(rows=64, columns=64, slices=20, pixel_spacing=(3.0, 3.0), slice_spacing=3.0)

    with pytest.raises(SegmentationFailed) as failure:
        model.segment(load_series_volume(write_phantom_series(tmp_path / "ct", spec).files))
    assert str(failure.value) == HALF_PRECISION_OVERFLOW
    assert "Encountered inf" in str(failure.value.__cause__)  # nnU-Net's own error, kept for the log


SMALL_PHANTOM = PhantomSpec(rows=64, columns=64, slices=20, pixel_spacing=(3.0, 3.0), slice_spacing=3.0)
"""One sliding-window tile at 3 mm."""


def _torch_model_with(weights: Path, change) -> tuple[object, object]:
    """A total_fast model on the PyTorch backend whose loaded weights ``change(layers, network)`` altered after the
    load checks (nnU-Net loads ``list_of_parameters`` into the network before it predicts); the model and its
    predictor."""
    from inference.models.totalsegmentator import TotalSegmentatorModel

    model = TotalSegmentatorModel("total_fast", weights, device="cpu", backend="torch")
    predictor, _lookup = model.predictors[0]
    for layers in predictor.list_of_parameters:
        change(layers, predictor.network)
    return model, predictor


def _conv_names(network) -> list[str]:
    import torch

    return [name for name, layer in network.named_modules() if isinstance(layer, torch.nn.Conv3d)]


def test_weights_that_compute_values_that_are_not_numbers_fail_the_series_naming_the_weights(weights, tmp_path):
    """One NaN in the output layer's bias, past the load checks: without the check every voxel, air included, was
    labelled as that channel's structure (liver) and the job ended DONE."""
    from inference.models import SegmentationFailed

    def poison(layers, network):
        layers[f"{_conv_names(network)[-1]}.bias"][5] = float("nan")

    model, _predictor = _torch_model_with(weights, poison)

    with pytest.raises(SegmentationFailed) as failure:
        model.segment(load_series_volume(write_phantom_series(tmp_path / "ct", SMALL_PHANTOM).files))
    assert str(failure.value) == (
        f"the weights {model.algorithm_version} computed values that are not numbers (NaN) for this series, so there "
        "is no label map to trust: the weights are damaged or unusable; import them again from a good copy"
    )


# A minute to ten on a CPU (16-bit 3D convolutions are emulated there, on one thread): the default run checks half
# precision overflows through the tile guard (nnU-Net's sums below, OpenVINO's logits in test_openvino_parity.py),
# this one the whole network in 16-bit floats and its second look in 32-bit floats.
@pytest.mark.nightly
def test_values_that_are_not_numbers_only_in_half_precision_are_called_an_overflow_not_damaged_weights(
    weights, tmp_path
):
    """nnU-Net computes in 16-bit floats on a GPU (autocast): a first layer a million times larger overflows there
    (its instance norm then gives NaN) but not in 32-bit floats. CPU autocast stands in for the GPU's here."""
    import torch

    from inference.models import SegmentationFailed

    def scale(layers, network):
        layers[f"{_conv_names(network)[0]}.weight"].mul_(1e6)

    model, _predictor = _torch_model_with(weights, scale)
    volume = load_series_volume(write_phantom_series(tmp_path / "ct", SMALL_PHANTOM).files)

    with pytest.raises(SegmentationFailed) as failure, torch.autocast("cpu", dtype=torch.float16):
        model.segment(volume)
    assert str(failure.value) == (
        f"the weights {model.algorithm_version} computed values that are not numbers (NaN) for this series in 16-bit "
        "floats (nnU-Net's mixed precision on the GPU), and numbers in 32-bit floats: a value overflowed half "
        "precision inside the network, so there is no label map to trust; these weights cannot segment this series "
        "in half precision"
    )
    assert model.segment(volume).labels.any()  # in 32-bit floats the same weights segment it


def test_summed_logits_that_are_not_numbers_in_nnunets_loop_are_an_overflow_of_the_sums():
    """Every tile a number, but the 16-bit sums NaN (overflows of either sign met at a voxel): nnU-Net's check, for
    infinities, let them through to the argmax."""
    from types import SimpleNamespace

    import torch

    from inference.models import HALF_PRECISION_OVERFLOW, SegmentationFailed
    from inference.models.not_a_number import guard_tiles
    from inference.models.totalsegmentator import predict_label_map

    sums = torch.zeros((3, 4, 4, 4), dtype=torch.half)
    sums[1, 0, 0, 0] = float("nan")
    predictor = SimpleNamespace(_internal_maybe_mirror_and_predict=lambda tile: tile)
    predictor._internal_predict_sliding_window_return_logits = lambda *_args: sums
    predictor.predict_single_npy_array = lambda *_args: predictor._internal_predict_sliding_window_return_logits()
    guard_tiles(predictor)

    with pytest.raises(SegmentationFailed) as failure:
        predict_label_map(predictor, np.zeros((1, 4, 4, 4), np.float32), {}, "Dataset297 sha256:0123456789abcdef")
    assert str(failure.value) == HALF_PRECISION_OVERFLOW


def _release_with_a_huge_first_layer(weights: Path, archive: Path) -> Path:
    """A release zip of the test weights whose first layer's weights are all 1e37: every value a finite number, so
    the import and load checks pass, but the first instance norm overflows 32-bit floats and gives NaN."""
    import io
    import zipfile

    import torch

    from inference.models.checkpoints import load_checkpoint

    _id, dataset, trainer = TASK_DATASETS["total_fast"][0]
    folder = weights / dataset / trainer
    checkpoint = load_checkpoint(folder / "fold_0" / "checkpoint_final.pth")
    next(iter(checkpoint["network_weights"].values())).fill_(1e37)
    written = io.BytesIO()
    torch.save(checkpoint, written)
    with zipfile.ZipFile(archive, "w") as bundle:
        for name in ("plans.json", "dataset.json"):
            bundle.write(folder / name, f"{dataset}/{trainer}/{name}")
        bundle.writestr(f"{dataset}/{trainer}/fold_0/checkpoint_final.pth", written.getvalue())
    return archive


def test_weights_whose_network_gives_values_that_are_not_numbers_fail_the_job_and_send_nothing(
    tmp_path, start_node, weights, shared_fixtures
):
    """Imported and loaded without complaint (every value is a number), the weights compute NaN on the real CT:
    the job fails naming them, and the destination receives nothing (no SEG labelling every voxel alike)."""
    from inference.models.totalsegmentator import load_refusal
    from inference.weights import identify, import_zip

    installed = tmp_path / "weights"
    import_zip(_release_with_a_huge_first_layer(weights, tmp_path / "release.zip"), installed, loadable=load_refusal)
    version = identify("total_fast", model_folders("total_fast", installed)).version
    files = sorted((shared_fixtures / "example_ct_dicom_valid").glob("*.dcm"))
    series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    received = tmp_path / "peer"
    received.mkdir()
    peer_port = free_port()
    peer = subprocess.Popen([require_tool("storescp"), "-aet", "PEERSCP", "-od", str(received), str(peer_port)])
    try:
        node = start_node(
            models={
                "ts": {
                    "kind": "totalsegmentator",
                    "task": "total_fast",
                    "weights_directory": str(installed),
                    "backend": "torch",
                }
            },
            destinations={"peer": {"ae_title": "PEERSCP", "host": "127.0.0.1", "port": peer_port}},
            rules=[
                {
                    "name": "ct",
                    "match": {"modality": "CT"},
                    "action": "process",
                    "model": "ts",
                    "destinations": ["peer"],
                }
            ],
            inference={"workers": 1, "device": "cpu"},
        )
        sent = storescu(node.port, files, extra=["-xv"])  # the files' own (JPEG 2000) transfer syntax
        assert sent.returncode == 0, sent.stdout + sent.stderr

        node.wait_for_state(series_uid, JobState.FAILED, timeout=300)
    finally:
        peer.terminate()
        peer.wait()
    assert node.job_reason(series_uid) == (
        f"the weights {version} computed values that are not numbers (NaN) for this series, so there is no label map "
        "to trust: the weights are damaged or unusable; import them again from a good copy"
    )
    with node.sessions() as session:
        from db.jobs import job_for_series_uid

        assert not job_for_series_uid(session, series_uid).result_files
    assert list(received.iterdir()) == []
