"""The OpenVINO backend against TotalSegmentator's own Python API, on the same random-initialised weights.

Only the network forward passes run in OpenVINO; nnU-Net's sliding window and TotalSegmentator's
resampling and orientation handling stay as they are. The issue asks for FP32 mean Dice >= 0.99
against TotalSegmentator over the classes present, with the differing voxels reported; both are
printed. Measured 2026-11-29: mean Dice 1.0000 on the DICOM fixture (54 of 5,242,880 voxels
differ) and 0.9999 on the phantom (6 of 501,760). That needs the instance normalisations
rewritten (``stabilise_instance_norms``): with OpenVINO's own kernel the logits moved by up to
0.2 and the Dice was 0.982. BF16 is reported; it is asserted only on a CPU with native BF16.
The network is converted once per test session (the cache in ``<weights>/.openvino``); the tests
of the cache and of the rewrite use tiny networks.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dicom_node.phantom import PhantomSpec, write_phantom_series
from inference.volume import Volume, load_series_volume
from inference.weights import MANIFEST_NAME, ModelFolder, folder_hashes, model_folders, write_manifest
from tests.conftest import totalsegmentator_reference

pytest.importorskip("openvino", reason="openvino not installed (pip install -e '.[totalsegmentator]')")
pytest.importorskip("nnunetv2", reason="TotalSegmentator extra not installed (pip install -e '.[totalsegmentator]')")
pytest.importorskip("totalsegmentator", reason="TotalSegmentator extra not installed")

pytestmark = pytest.mark.integration

FP32_MIN_DICE = 0.99
"""OpenVINO FP32 against TotalSegmentator, mean Dice over the classes present (the issue's bar)."""


@pytest.fixture(scope="module")
def weights(total_fast_test_weights) -> Path:
    """A random-initialised total_fast weights folder in TotalSegmentator's layout (built once per session)."""
    return total_fast_test_weights


@pytest.fixture(scope="module")
def fp32_model(weights):
    from inference.models.totalsegmentator import TotalSegmentatorModel

    started = time.perf_counter()
    model = TotalSegmentatorModel("total_fast", weights, device="cpu", backend="openvino", precision="fp32")
    print(f"OpenVINO model ready (conversion included) in {time.perf_counter() - started:.0f} s")
    return model


@pytest.fixture(scope="module")
def dicom_ct(dicom_ct_reference):
    """The real DICOM fixture as a volume, and as the NIfTI TotalSegmentator reads (its reference map is made
    once per session, shared with the PyTorch parity tests)."""
    volume, ct, _reference = dicom_ct_reference
    return volume, ct, ct.parent


@pytest.fixture(scope="module")
def phantom_ct(tmp_path_factory):
    """A small phantom CT series (112 x 112 x 40, 3 mm pixels, 5 mm slices): one tile at 3 mm."""
    spec = PhantomSpec(rows=112, columns=112, slices=40, pixel_spacing=(3.0, 3.0), slice_spacing=5.0)
    series = write_phantom_series(tmp_path_factory.mktemp("phantom-dicom"), spec)
    return _case(series.files, tmp_path_factory, "phantom")


def _case(files: list[Path], tmp_path_factory: pytest.TempPathFactory, name: str) -> tuple[Volume, Path, Path]:
    import nibabel as nib

    volume = load_series_volume(list(files))
    workdir = tmp_path_factory.mktemp(name)
    nib.save(volume.to_nibabel(np.int16), str(workdir / "ct.nii.gz"))  # TotalSegmentator reads NIfTI; HU are integers
    return volume, workdir / "ct.nii.gz", workdir


@pytest.fixture(scope="module")
def references(weights, dicom_ct_reference, phantom_ct) -> dict[str, np.ndarray]:
    _volume, ct, workdir = phantom_ct
    return {"dicom": dicom_ct_reference[2], "phantom": totalsegmentator_reference(ct, weights, workdir)}


def compare(ours: np.ndarray, reference: np.ndarray) -> tuple[float, int, int, str]:
    """Mean Dice over classes present in either map, their number, differing voxels, and a one-line summary."""
    from inference.models.totalsegmentator import mean_dice

    present = int(np.count_nonzero(np.union1d(np.unique(ours), np.unique(reference))))
    dice = mean_dice(ours, reference)
    differing = int((ours != reference).sum())
    return (
        dice,
        present,
        differing,
        f"{present} classes, mean Dice {dice:.4f}, {differing} of {ours.size} voxels differ",
    )


def test_openvino_fp32_label_map_stays_close_to_totalsegmentator_on_the_real_dicom_ct(fp32_model, dicom_ct, references):
    volume, _ct, _workdir = dicom_ct
    ours = fp32_model.segment(volume).labels

    dice, present, _differing, summary = compare(ours, references["dicom"])
    print(f"DICOM CT, OpenVINO FP32 vs TotalSegmentator: {summary}")
    assert fp32_model.backend == "openvino" and fp32_model.precision == "fp32"
    assert present >= 5, summary
    assert dice >= FP32_MIN_DICE, summary


def test_openvino_fp32_label_map_stays_close_to_totalsegmentator_on_a_phantom(fp32_model, phantom_ct, references):
    volume, _ct, _workdir = phantom_ct
    ours = fp32_model.segment(volume).labels

    dice, present, _differing, summary = compare(ours, references["phantom"])
    print(f"phantom, OpenVINO FP32 vs TotalSegmentator: {summary}")
    assert present >= 5, summary
    assert dice >= FP32_MIN_DICE, summary


def test_bf16_dice_is_reported_and_auto_uses_bf16_only_where_native_and_matching(
    weights, fp32_model, dicom_ct, references
):
    from inference.models.openvino_backend import BF16_PARITY_DICE, cpu_has_native_bf16
    from inference.models.totalsegmentator import TotalSegmentatorModel

    bf16_model = TotalSegmentatorModel("total_fast", weights, device="cpu", backend="openvino", precision="bf16")
    auto_model = TotalSegmentatorModel("total_fast", weights, device="cpu", backend="openvino", precision="auto")
    native = cpu_has_native_bf16()
    if not native:
        # OpenVINO compiles a BF16 request in FP32 on this CPU: the model says so, and auto stays FP32.
        assert bf16_model.precision == "fp32" and auto_model.precision == "fp32"
        print("OpenVINO precision bf16: no native BF16 on this CPU, so OpenVINO computes in FP32 (no BF16 Dice here)")
        return
    volume, _ct, _workdir = dicom_ct
    ours = bf16_model.segment(volume).labels
    dice, _present, _differing, summary = compare(ours, references["dicom"])
    print(f"DICOM CT, OpenVINO BF16 (native) vs TotalSegmentator: {summary}")
    assert bf16_model.precision == "bf16"
    assert ours.shape == volume.hu.shape and set(np.unique(ours)) <= {0, *fp32_model.classes}
    if auto_model.precision == "bf16":
        assert dice >= BF16_PARITY_DICE, summary  # auto picked BF16: it must match TotalSegmentator too


def test_converted_model_is_cached_next_to_the_weights_and_reused(weights, fp32_model):
    from inference.models.openvino_backend import ConvertedModelFiles, runtime_version
    from inference.models.totalsegmentator import TotalSegmentatorModel

    (folder,) = model_folders("total_fast", weights)
    files = ConvertedModelFiles.for_folder(folder, folder_hashes(folder.path))
    assert files.xml.parent == weights / ".openvino"
    assert files.xml.is_file() and files.bin.is_file() and files.record.is_file()
    assert runtime_version() in files.xml.name and "Dataset297" in files.xml.name
    modified = files.bin.stat().st_mtime_ns

    started = time.perf_counter()
    TotalSegmentatorModel("total_fast", weights, device="cpu", backend="openvino", precision="fp32")
    print(f"loaded from the cache in {time.perf_counter() - started:.1f} s")
    assert files.bin.stat().st_mtime_ns == modified  # not converted again


class _TinyNetwork:
    """A 3-class two-layer 3D CNN: converts in seconds, so the cache's failure paths can be exercised."""

    def __new__(cls, seed: int = 0) -> Any:
        import torch

        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 3, 1))


def _tiny_folder(tmp_path: Path, payload: bytes) -> ModelFolder:
    trainer = tmp_path / "weights" / "Dataset297_TotalSegmentator_total_3mm_1559subj" / "trainer"
    (trainer / "fold_0").mkdir(parents=True)
    (trainer / "plans.json").write_text("{}")
    (trainer / "dataset.json").write_text("{}")
    (trainer / "fold_0" / "checkpoint_final.pth").write_bytes(payload)
    write_manifest(trainer)
    return ModelFolder(297, trainer)


def test_a_damaged_or_mismatched_cache_is_converted_again_not_trusted(tmp_path):
    from inference.models.openvino_backend import ConvertedModelFiles, compile_model, load_or_convert

    folder = _tiny_folder(tmp_path, b"weights one")
    network = _TinyNetwork()
    patch = (8, 8, 8)
    _model, cached = load_or_convert(network, folder, patch, 3, folder_hashes(folder.path))
    assert not cached
    _model, cached = load_or_convert(network, folder, patch, 3, folder_hashes(folder.path))
    assert cached

    files = ConvertedModelFiles.for_folder(folder, folder_hashes(folder.path))
    damaged = bytearray(files.bin.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # one flipped byte in the weights
    files.bin.write_bytes(bytes(damaged))
    model, cached = load_or_convert(network, folder, patch, 3, folder_hashes(folder.path))
    assert not cached  # the record's SHA-256 no longer matched: converted again
    x = np.random.default_rng(0).standard_normal((1, 1, *patch)).astype(np.float32)
    import torch

    with torch.no_grad():
        expected = network(torch.from_numpy(x)).numpy()
    result = compile_model(model, "fp32", 1)({0: x})[0]
    assert np.abs(result - expected).max() < 1e-4
    assert load_or_convert(network, folder, patch, 3, folder_hashes(folder.path))[
        1
    ]  # and the rebuilt cache is trusted again

    files.record.write_text("not json")
    assert not load_or_convert(network, folder, patch, 3, folder_hashes(folder.path))[1]

    _model, cached = load_or_convert(
        network, folder, (8, 8, 16), 3, folder_hashes(folder.path)
    )  # the same weights, another patch size
    assert not cached

    # New weights (the manifest's hashes change) get their own cache file; the old one is not used.
    shutil.rmtree(folder.path.parent)
    new_folder = _tiny_folder(tmp_path, b"weights two")
    assert ConvertedModelFiles.for_folder(new_folder, folder_hashes(new_folder.path)).xml != files.xml
    assert not load_or_convert(_TinyNetwork(seed=1), new_folder, patch, 3, folder_hashes(new_folder.path))[1]
    assert json.loads((new_folder.path / MANIFEST_NAME).read_text())["files"]


def test_auto_precision_is_fp32_on_a_cpu_without_native_bf16():
    from inference.models.openvino_backend import choose_precision, cpu_has_native_bf16

    calls = []

    def calibrate() -> float:
        calls.append(1)
        return 1.0

    chosen = choose_precision("auto", calibrate)
    if cpu_has_native_bf16():
        assert chosen == "bf16" and calls  # calibrated, and a perfect match takes BF16
        assert choose_precision("auto", lambda: 0.9) == "fp32"
    else:
        assert chosen == "fp32" and not calls  # no native BF16: no calibration, FP32
    assert choose_precision("fp32", calibrate) == "fp32" and choose_precision("bf16", calibrate) == "bf16"


def test_the_precision_a_compiled_model_reports_is_read_in_every_spelling(tmp_path):
    """OpenVINO 2026.4 answers ``<Type: 'bfloat16'>`` for BF16: a reader looking for "bf16" called it FP32."""
    from inference.models.openvino_backend import (
        compile_model,
        cpu_has_native_bf16,
        effective_precision,
        load_or_convert,
    )

    class Answering:
        def __init__(self, hint: Any) -> None:
            self.hint = hint

        def get_property(self, name: str) -> Any:
            assert name == "INFERENCE_PRECISION_HINT"
            return self.hint

    for hint in ("bf16", "bfloat16", "<Type: 'bfloat16'>"):
        assert effective_precision(Answering(hint)) == "bf16", hint
    for hint in ("f32", "float32", "<Type: 'float32'>"):
        assert effective_precision(Answering(hint)) == "fp32", hint

    tiny = _tiny_folder(tmp_path, b"weights")
    model, _cached = load_or_convert(_TinyNetwork(), tiny, (8, 8, 8), 3, folder_hashes(tiny.path))
    assert effective_precision(compile_model(model, "fp32", 1)) == "fp32"
    # A BF16 request is computed in BF16 exactly where the CPU has it natively, and must be reported so.
    assert effective_precision(compile_model(model, "bf16", 1)) == ("bf16" if cpu_has_native_bf16() else "fp32")


class _NormalisedNetwork:
    """Convolution, instance normalisation (nnU-Net's), leaky ReLU and a 1x1 head: the block nnU-Net repeats."""

    def __new__(cls) -> Any:
        import torch

        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv3d(1, 8, 3, padding=1),
            torch.nn.InstanceNorm3d(8, eps=1e-5, affine=True),
            torch.nn.LeakyReLU(0.01),
            torch.nn.Conv3d(8, 3, 1),
        ).eval()


def test_instance_norms_are_rewritten_so_openvino_matches_pytorch_on_a_whole_patch():
    """OpenVINO's own instance normalisation drifts on a 112 x 128 x 112 patch; the rewrite matches PyTorch."""
    import torch

    from inference.models.openvino_backend import compile_model, convert, stabilise_instance_norms

    network = _NormalisedNetwork()
    shape = (1, 1, 112, 128, 112)  # the total_fast patch
    x = (np.random.default_rng(0).standard_normal(shape) * 0.5 - 1.0).astype(np.float32)  # mostly "air", like CT
    with torch.no_grad():
        expected = network(torch.from_numpy(x)).numpy()

    as_converted = convert(network, shape)
    kernel_error = float(np.abs(compile_model(as_converted, "fp32", 2)({0: x})[0] - expected).max())
    rewritten = as_converted.clone()  # one conversion serves both
    assert stabilise_instance_norms(rewritten) == 1
    assert not [op for op in rewritten.get_ordered_ops() if op.get_type_name() == "MVN"]
    assert stabilise_instance_norms(rewritten) == 0  # idempotent: a cached model may pass through twice
    rewrite_error = float(np.abs(compile_model(rewritten, "fp32", 2)({0: x})[0] - expected).max())
    print(f"largest logit difference from PyTorch: OpenVINO's MVN {kernel_error:.2e}, rewritten {rewrite_error:.2e}")
    assert rewrite_error < 1e-4, f"rewritten instance norm differs from PyTorch by {rewrite_error:.2e}"


def test_tiles_run_in_two_streams_come_back_in_order_equal_one_at_a_time_and_after_a_release(tmp_path):
    import torch

    from inference.models.openvino_backend import OpenVINONetwork, compile_model, load_or_convert

    network = _TinyNetwork()
    patch = (16, 16, 16)
    tiny = _tiny_folder(tmp_path, b"tiny weights")
    model, _cached = load_or_convert(network, tiny, patch, 3, folder_hashes(tiny.path))
    streamed = OpenVINONetwork(compile_model(model, "fp32", 2, streams=2), "fp32")
    single = OpenVINONetwork(compile_model(model, "fp32", 2), "fp32")
    tiles = [np.random.default_rng(seed).standard_normal((1, 1, *patch)).astype(np.float32) for seed in range(5)]

    assert streamed.streams == 2 and single.streams == 1
    results = [result.numpy().copy() for result in streamed.predict_tiles(iter(tiles))]  # each valid until the next
    assert len(results) == len(tiles)
    for tile, result in zip(tiles, results, strict=True):
        np.testing.assert_allclose(result, single(torch.from_numpy(tile)).numpy(), atol=1e-5)

    streamed.release_memory()  # between part models and jobs: the next tiles allocate it again
    again = [result.numpy().copy() for result in streamed.predict_tiles(iter(tiles))]
    for first, second in zip(results, again, strict=True):
        np.testing.assert_array_equal(first, second)


def test_backend_auto_is_openvino_on_the_cpu_where_installed_and_torch_elsewhere(monkeypatch, caplog):
    import importlib.util
    import logging

    from inference.models.totalsegmentator import _resolve_backend

    assert _resolve_backend("auto", "cpu") == "openvino"  # installed here (this module skips otherwise)
    assert _resolve_backend("torch", "cpu") == "torch"
    assert _resolve_backend("auto", "cuda") == "torch"
    with caplog.at_level(logging.INFO, logger="inference.models.totalsegmentator"):
        assert _resolve_backend("openvino", "cuda") == "torch"
        real_find_spec = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real_find_spec(name, *a)
        )
        assert _resolve_backend("auto", "cpu") == "torch"
    assert "runs on the CPU only; on cuda the network runs in PyTorch" in caplog.text
    assert "OpenVINO is not installed, so the network runs in PyTorch on the CPU" in caplog.text


def test_logits_that_overflow_half_precision_fail_the_series_with_a_reason_and_release_the_memory(tmp_path):
    """nnU-Net sums the tiles' weighted logits in FP16; where that overflows, no label map is returned."""
    from types import SimpleNamespace

    import torch

    from inference.models import HALF_PRECISION_OVERFLOW, SegmentationFailed
    from inference.models.openvino_backend import OpenVINONetwork, compile_model, load_or_convert, sliding_window_logits

    network = _TinyNetwork()
    with torch.no_grad():
        network[-1].bias.fill_(1e5)  # times the Gaussian's peak of 10: past FP16's largest value, 65,504
    patch = (8, 8, 8)
    tiny = _tiny_folder(tmp_path, b"overflowing weights")
    model, _cached = load_or_convert(network, tiny, patch, 3, folder_hashes(tiny.path))
    ov_network = OpenVINONetwork(compile_model(model, "fp32", 2, streams=2), "fp32")
    released = []
    release_memory = ov_network.release_memory
    ov_network.release_memory = lambda: released.append(True) or release_memory()  # type: ignore[method-assign]
    predictor = SimpleNamespace(
        network=ov_network,
        configuration_manager=SimpleNamespace(patch_size=patch),
        label_manager=SimpleNamespace(num_segmentation_heads=3),
        use_gaussian=True,
    )
    data = torch.zeros((1, 12, 8, 8))
    slicers = [(slice(None), slice(start, start + 8), slice(0, 8), slice(0, 8)) for start in (0, 4)]

    with pytest.raises(SegmentationFailed) as failure:
        sliding_window_logits(predictor, data, slicers)
    assert str(failure.value) == HALF_PRECISION_OVERFLOW
    assert released == [True]


def test_sums_whose_overflows_of_either_sign_meet_are_an_overflow_too():
    """Two tiles overflowed at one voxel, one to +inf, the other to -inf: their sum is NaN, not an infinity, which
    nnU-Net's check (for infinities) let through to the argmax."""
    from types import SimpleNamespace

    import torch

    from inference.models import HALF_PRECISION_OVERFLOW, SegmentationFailed
    from inference.models.openvino_backend import sliding_window_logits

    tiles = [torch.zeros((1, 3, 8, 8, 8)), torch.zeros((1, 3, 8, 8, 8))]
    tiles[0][0, 1, 6, 0, 0] = float("inf")
    tiles[1][0, 1, 2, 0, 0] = float("-inf")  # the same voxel: the second tile starts 4 slices on
    network = SimpleNamespace(predict_tiles=lambda _inputs: iter(tiles), release_memory=lambda: None)
    predictor = SimpleNamespace(
        network=network,
        configuration_manager=SimpleNamespace(patch_size=(8, 8, 8)),
        label_manager=SimpleNamespace(num_segmentation_heads=3),
        use_gaussian=False,
    )
    slicers = [(slice(None), slice(start, start + 8), slice(0, 8), slice(0, 8)) for start in (0, 4)]

    with pytest.raises(SegmentationFailed) as failure:
        sliding_window_logits(predictor, torch.zeros((1, 12, 8, 8)), slicers)
    assert str(failure.value) == HALF_PRECISION_OVERFLOW


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_tile_whose_logits_are_not_numbers_stops_the_window_naming_the_weights_and_releases_the_memory(
    tmp_path, precision
):
    """A NaN in the output layer's bias gave every voxel that channel's label (liver, air included) and the job
    ended DONE; BF16 has FP32's range, so the NaN is the weights' in either precision."""
    from types import SimpleNamespace

    import torch

    from inference.models.not_a_number import NotANumber
    from inference.models.openvino_backend import OpenVINONetwork, compile_model, load_or_convert, sliding_window_logits

    network = _TinyNetwork()
    with torch.no_grad():
        network[-1].bias[1] = float("nan")
    patch = (8, 8, 8)
    tiny = _tiny_folder(tmp_path, b"weights holding a NaN")
    model, _cached = load_or_convert(network, tiny, patch, 3, folder_hashes(tiny.path))
    ov_network = OpenVINONetwork(compile_model(model, precision, 2, streams=2), precision)
    released = []
    release_memory = ov_network.release_memory
    ov_network.release_memory = lambda: released.append(True) or release_memory()  # type: ignore[method-assign]
    predictor = SimpleNamespace(
        network=ov_network,
        configuration_manager=SimpleNamespace(patch_size=patch),
        label_manager=SimpleNamespace(num_segmentation_heads=3),
        use_gaussian=True,
    )
    data = torch.zeros((1, 12, 8, 8))
    slicers = [(slice(None), slice(start, start + 8), slice(0, 8), slice(0, 8)) for start in (0, 4)]

    with pytest.raises(NotANumber) as failure:
        sliding_window_logits(predictor, data, slicers)
    assert failure.value.reason("Dataset297 sha256:0123456789abcdef") == (
        "the weights Dataset297 sha256:0123456789abcdef computed values that are not numbers (NaN) for this series, "
        "so there is no label map to trust: the weights are damaged or unusable; import them again from a good copy"
    )
    assert released == [True]


def test_a_model_whose_networks_disagree_on_bf16_runs_all_of_them_in_fp32_and_says_so(tmp_path):
    """The ``total`` task's five networks are each checked for BF16 on their own; one that fails makes all run in
    FP32, so the precision every result names is the one each of its networks ran in."""
    from types import SimpleNamespace

    from inference.models.openvino_backend import OpenVINONetwork, compile_model, effective_precision, load_or_convert
    from inference.models.totalsegmentator import OpenVINOPrecisions, _one_precision

    tiny = _tiny_folder(tmp_path, b"weights")
    model, _cached = load_or_convert(_TinyNetwork(), tiny, (8, 8, 8), 3, folder_hashes(tiny.path))
    fp32, bf16 = compile_model(model, "fp32", 1), compile_model(model, "bf16", 1)
    used = effective_precision(bf16)
    parts = [OpenVINOPrecisions(used, fp32), OpenVINOPrecisions("fp32", fp32), OpenVINOPrecisions(used, fp32)]
    predictors = [
        SimpleNamespace(network=OpenVINONetwork(bf16 if part.used == "bf16" else fp32, part.used), use_mirroring=False)
        for part in parts
    ]

    assert _one_precision(parts, predictors) == "fp32"
    assert [effective_precision(p.network.compiled) for p in predictors] == ["fp32"] * 3
    assert [p.network.precision for p in predictors] == ["fp32"] * 3
    agreeing = [OpenVINOPrecisions(used, fp32)] * 2
    assert _one_precision(agreeing, predictors[:2]) == used


def test_a_conversion_of_other_weights_or_package_versions_under_this_name_is_converted_again(tmp_path, caplog):
    """The cache name holds 16 digits of the weights' hash and the OpenVINO version only: a conversion copied or
    renamed from other weights (a restored .openvino folder) would otherwise run under these weights' identity,
    and one made by another torch, nnunetv2 or dynamic_network_architectures would be kept."""
    from inference.models.openvino_backend import ConvertedModelFiles, compile_model, load_or_convert

    patch = (8, 8, 8)
    one = _tiny_folder(tmp_path / "one", b"weights one")
    two = _tiny_folder(tmp_path / "two", b"weights two")
    network_one, network_two = _TinyNetwork(seed=0), _TinyNetwork(seed=1)
    load_or_convert(network_one, one, patch, 3, folder_hashes(one.path))
    load_or_convert(network_two, two, patch, 3, folder_hashes(two.path))
    files_one = ConvertedModelFiles.for_folder(one, folder_hashes(one.path))
    files_two = ConvertedModelFiles.for_folder(two, folder_hashes(two.path))
    for suffix in (".xml", ".bin", ".json"):  # weights one's conversion, under weights two's name
        shutil.copy(files_one.xml.with_suffix(suffix), files_two.xml.with_suffix(suffix))

    with caplog.at_level("WARNING", logger="inference.models.openvino_backend"):
        model, cached = load_or_convert(network_two, two, patch, 3, folder_hashes(two.path))

    assert not cached
    assert (
        f"The cached OpenVINO model {files_two.xml.name} does not belong to the Dataset297 weights being loaded (it "
        "was converted from other weight files); converting it again."
    ) in caplog.text
    x = np.random.default_rng(0).standard_normal((1, 1, *patch)).astype(np.float32)
    import torch

    with torch.no_grad():
        expected = network_two(torch.from_numpy(x)).numpy()
    assert np.abs(compile_model(model, "fp32", 1)({0: x})[0] - expected).max() < 1e-4  # weights two's network
    assert load_or_convert(network_two, two, patch, 3, folder_hashes(two.path))[1]  # the new record is trusted

    record = json.loads(files_two.record.read_text())
    record["versions"]["torch"] = "1.0.0"  # converted by another exporter
    files_two.record.write_text(json.dumps(record))
    caplog.clear()
    with caplog.at_level("WARNING", logger="inference.models.openvino_backend"):
        assert not load_or_convert(network_two, two, patch, 3, folder_hashes(two.path))[1]
    assert "(it was converted with torch 1.0.0, not " in caplog.text
    written = json.loads(files_two.record.read_text())
    assert written["weights_sha256"] != json.loads(files_one.record.read_text())["weights_sha256"]
    assert len(written["weights_sha256"]) == 64 and written["dataset_id"] == 297
    assert set(written["versions"]) == {"torch", "nnunetv2", "dynamic_network_architectures", "openvino"}


def test_workers_with_other_package_versions_sharing_one_weights_folder_use_other_cache_files(tmp_path):
    """Two workers with another torch (or nnunetv2, dynamic_network_architectures, OpenVINO) on one shared
    weights folder would otherwise convert over each other's cache at every load."""
    from inference.models.openvino_backend import ConvertedModelFiles, conversion_versions

    folder = _tiny_folder(tmp_path / "shared", b"weights")
    hashes = folder_hashes(folder.path)
    here = conversion_versions()
    other_torch = {**here, "torch": "1.0.0"}

    mine = ConvertedModelFiles.for_folder(folder, hashes)
    theirs = ConvertedModelFiles.for_folder(folder, hashes, other_torch)

    assert mine == ConvertedModelFiles.for_folder(folder, hashes, dict(here))
    assert theirs.xml != mine.xml and theirs.record != mine.record and theirs.xml.parent == mine.xml.parent
    assert theirs == ConvertedModelFiles.for_folder(folder, hashes, dict(reversed(list(other_torch.items()))))


def test_temporary_files_a_killed_cache_write_left_are_deleted_when_converting(tmp_path):
    import os
    import subprocess
    import sys

    from inference.models.openvino_backend import ABANDONED_AFTER_S, ConvertedModelFiles, load_or_convert

    folder = _tiny_folder(tmp_path, b"weights one")
    files = ConvertedModelFiles.for_folder(folder, folder_hashes(folder.path))
    files.xml.parent.mkdir(parents=True)
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(ended.stdout)  # a process that has ended: its write can never finish
    writer = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    abandoned = files.xml.with_name(f"{files.xml.stem}.tmp-{dead_pid}.bin")
    in_progress = files.xml.with_name(f"{files.xml.stem}.tmp-{writer.pid}.bin")  # its writer still runs
    recent = files.xml.with_name(f"{files.xml.stem}.tmp-{dead_pid}.xml")
    for path in (abandoned, in_progress, recent):
        path.write_bytes(b"half a model")
    old = time.time() - ABANDONED_AFTER_S - 60
    for path in (abandoned, in_progress):
        os.utime(path, (old, old))

    try:
        load_or_convert(_TinyNetwork(), folder, (8, 8, 8), 3, folder_hashes(folder.path))
    finally:
        writer.communicate(b"", timeout=60)

    assert not abandoned.exists()
    assert in_progress.exists()  # a slow write of a process that still runs is left alone
    assert recent.exists()  # too young to tell from a write on another machine sharing the folder
    assert files.record.is_file()


def test_networks_are_converted_through_onnx_not_the_slower_direct_route(caplog):
    """Without the ``onnx`` package the ONNX export failed and every network took the direct route, which took
    296 s instead of about a minute for ``total_fast`` on 2 cores."""
    from inference.models.openvino_backend import convert

    caplog.set_level(logging.INFO, logger="inference.models.openvino_backend")
    model = convert(_TinyNetwork(), (1, 1, 8, 8, 8))
    assert [r.getMessage() for r in caplog.records if "ONNX export" in r.getMessage()] == []
    assert [list(output.get_partial_shape().to_shape()) for output in model.outputs] == [[1, 3, 8, 8, 8]]
