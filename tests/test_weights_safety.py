"""Weights that cannot run code, and weights whose identity is checked: import, hash, load."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from inference.weights import MANIFEST_NAME, TASK_DATASETS, WeightsCorrupt, identify, import_zip, model_folders
from tests.conftest import DICOM_NODE, require_extra

torch = require_extra("torch")

from inference.models.checkpoints import UnsafeWeights, check_network_classes, load_checkpoint  # noqa: E402

_ID, DATASET, TRAINER = TASK_DATASETS["total_fast"][0]


class _RunsCode:
    """A pickle payload that would create a file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _checkpoint_bytes(payload: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def _data_checkpoint() -> bytes:
    return _checkpoint_bytes(
        {"network_weights": {"w": torch.zeros(2)}, "trainer_name": "nnUNetTrainer", "init_args": {}}
    )


def _weights_zip(path: Path, checkpoint: bytes, description: str = "TotalSegmentator") -> Path:
    with zipfile.ZipFile(path, "w") as bundle:
        bundle.writestr(f"{DATASET}/{TRAINER}/plans.json", "{}")
        bundle.writestr(f"{DATASET}/{TRAINER}/dataset.json", json.dumps({"name": DATASET, "description": description}))
        bundle.writestr(f"{DATASET}/{TRAINER}/fold_0/checkpoint_final.pth", checkpoint)
    return path


def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "code-ran"
    checkpoint = tmp_path / "checkpoint_final.pth"
    checkpoint.write_bytes(
        _checkpoint_bytes({"network_weights": {}, "trainer_name": "x", "init_args": _RunsCode(marker)})
    )

    with pytest.raises(UnsafeWeights, match="holds Python objects other than weights"):
        load_checkpoint(checkpoint)
    assert not marker.exists()


def test_weights_import_refuses_a_malicious_checkpoint_and_installs_nothing(tmp_path):
    marker = tmp_path / "code-ran"
    archive = _weights_zip(tmp_path / "evil.zip", _checkpoint_bytes({"network_weights": _RunsCode(marker)}))
    config = tmp_path / "config.yaml"
    config.write_text(f"storage: {{directory: {tmp_path / 'storage'}}}\n")

    result = subprocess.run(
        [DICOM_NODE, "weights", "import", str(archive), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 1
    assert "loading it could run code, so it was refused" in result.stderr
    assert "Nothing was installed" in result.stderr
    assert not marker.exists()
    assert not (tmp_path / "storage" / "weights" / DATASET).exists()


def _release_zip(weights: Path, path: Path) -> Path:
    """A zip of the total_fast weights in ``weights`` as the release holds them (no manifest)."""
    with zipfile.ZipFile(path, "w") as bundle:
        for file in sorted((weights / DATASET).rglob("*")):
            if file.is_file() and file.name != MANIFEST_NAME:
                bundle.write(file, file.relative_to(weights).as_posix())
    return path


def test_weights_import_checks_the_published_sha256(total_fast_test_weights, tmp_path):
    archive = _release_zip(total_fast_test_weights, tmp_path / f"{DATASET}.zip")
    published = hashlib.sha256(archive.read_bytes()).hexdigest()

    with pytest.raises(WeightsCorrupt, match="not the expected"):
        import_zip(archive, tmp_path / "weights", sha256="0" * 64)
    assert not (tmp_path / "weights" / DATASET).exists()

    added = import_zip(archive, tmp_path / "weights", sha256=published.upper())
    assert added == [tmp_path / "weights" / DATASET]
    assert (tmp_path / "weights" / DATASET / TRAINER / MANIFEST_NAME).is_file()


def test_weights_import_refuses_an_archive_that_unpacks_past_the_cap(tmp_path):
    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr(f"{DATASET}/{TRAINER}/fold_0/checkpoint_final.pth", b"\0" * (4 * 1024 * 1024))
    assert archive.stat().st_size < 64 * 1024  # a small file that inflates 100-fold

    with pytest.raises(ValueError, match=r"unpacks to .* GB, more than"):
        import_zip(archive, tmp_path / "weights", max_gigabytes=0.001)
    assert not (tmp_path / "weights" / DATASET).exists()


def test_identity_names_the_files_and_catches_a_changed_checkpoint(total_fast_test_weights, tmp_path):
    import_zip(_release_zip(total_fast_test_weights, tmp_path / "w.zip"), tmp_path)  # SYNTHETIC TEST WEIGHTS
    folders = model_folders("total_fast", tmp_path)

    identity = identify("total_fast", folders)
    assert identity.version == f"Dataset297 sha256:{identity.sha256[:16]}"
    assert len(identity.version) <= 64 and identity.test_weights
    assert identify("total_fast", folders) == identity  # stable

    checkpoint = folders[0].path / "fold_0" / "checkpoint_final.pth"
    checkpoint.write_bytes(checkpoint.read_bytes() + b"\0")
    with pytest.raises(WeightsCorrupt, match=r"changed since they were installed \(fold_0/checkpoint_final.pth"):
        identify("total_fast", folders)


def test_weights_placed_by_hand_are_not_recorded_by_looking_at_them(tmp_path):
    folder = tmp_path / DATASET / TRAINER
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text("{}")
    (folder / "dataset.json").write_text(json.dumps({"name": DATASET, "description": "trained on 1559 subjects"}))
    (folder / "fold_0" / "checkpoint_final.pth").write_bytes(_data_checkpoint())

    identity = identify("total_fast", model_folders("total_fast", tmp_path))

    assert identity.unrecorded == (folder,) and not identity.test_weights
    assert not (folder / MANIFEST_NAME).exists()  # recorded only once a model has loaded them


_NETWORK = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
_GOOD_KWARGS = {
    "conv_op": "torch.nn.modules.conv.Conv3d",
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
    "norm_op_kwargs": {"eps": 1e-05, "affine": True},
    "dropout_op": None,
    "nonlin": "torch.nn.LeakyReLU",  # exported by torch.nn, defined in torch.nn.modules.activation: as the release
    "nonlin_kwargs": {"inplace": True},
}


def _plans(network: str = _NETWORK, **changes: object) -> SimpleNamespace:
    return SimpleNamespace(
        network_arch_class_name=network,
        network_arch_init_kwargs={**_GOOD_KWARGS, **changes},
        network_arch_init_kwargs_req_import=["conv_op", "norm_op", "dropout_op", "nonlin"],
    )


def test_plans_may_only_name_network_building_blocks(tmp_path):
    check_network_classes(_plans(), tmp_path / "plans.json")

    with pytest.raises(UnsafeWeights, match=r"names the class 'os\.system' as conv_op \(arch_kwargs\), which is not"):
        check_network_classes(_plans(conv_op="os.system"), tmp_path / "plans.json")


@pytest.mark.parametrize(
    ("plans", "said"),
    [
        (  # pydoc.locate follows attributes: this is torch.hub.load, which imports a hubconf.py and runs it
            _plans("torch.nn.modules.module.torch.hub.load"),
            r"names the class 'torch\.nn\.modules\.module\.torch\.hub\.load' as the network \(network_class_name\), "
            r"which is not a network building block \(it must be a class of dynamic_network_architectures",
        ),
        (
            _plans(nonlin="torch.nn.modules.module.torch.hub.load"),
            r"names the class 'torch\.nn\.modules\.module\.torch\.hub\.load' as nonlin \(arch_kwargs\)",
        ),
        (  # a real class, reached through another module's attribute
            _plans(conv_op="torch.nn.modules.module.torch.nn.Conv3d"),
            r"names the class 'torch\.nn\.modules\.module\.torch\.nn\.Conv3d' as conv_op",
        ),
        (  # a function of torch.nn, not a class
            _plans(nonlin="torch.nn.functional.leaky_relu"),
            r"names the class 'torch\.nn\.functional\.leaky_relu' as nonlin",
        ),
        (  # an operation where the network belongs
            _plans("torch.nn.modules.conv.Conv3d"),
            r"names the class 'torch\.nn\.modules\.conv\.Conv3d' as the network",
        ),
        (
            _plans(repo_or_dir="/weights", source="local"),
            r"gives PlainConvUNet the setting 'repo_or_dir' \(arch_kwargs\), which it does not take",
        ),
        (
            _plans(num_classes=200),
            r"gives PlainConvUNet the setting 'num_classes' \(arch_kwargs\), which it does not take",
        ),
        (
            _plans(nonlin_kwargs={"inplace": True, "source": "local"}),
            r"gives LeakyReLU the setting 'source' \(nonlin_kwargs\), which it does not take",
        ),
    ],
    ids=[
        "attribute-walk-network",
        "attribute-walk-nonlin",
        "class-through-attribute",
        "function",
        "op-as-network",
        "undeclared-setting",
        "setting-nnunet-passes",
        "undeclared-op-setting",
    ],
)
def test_plans_naming_anything_but_a_building_block_or_its_settings_are_refused_with_a_sentence(tmp_path, plans, said):
    with pytest.raises(UnsafeWeights, match=said) as refused:
        check_network_classes(plans, tmp_path / "plans.json")
    assert str(refused.value).startswith(f"{tmp_path / 'plans.json'} ")
    assert "the model was not loaded" in str(refused.value)


def _hub_plans_release(weights: Path, source: Path, installed_trainer: Path, marker: Path) -> None:
    """The test release with a plans.json whose network is ``torch.hub.load`` (by an attribute walk) of a
    hubconf.py beside it that writes ``marker``: code that would run when the network is built."""
    import shutil

    shutil.copytree(weights / DATASET, source / DATASET, ignore=shutil.ignore_patterns(MANIFEST_NAME))
    trainer = source / DATASET / TRAINER
    plans = json.loads((trainer / "plans.json").read_text())
    architecture = plans["configurations"]["3d_fullres"]["architecture"]
    architecture["network_class_name"] = "torch.nn.modules.module.torch.hub.load"
    architecture["arch_kwargs"].update(repo_or_dir=str(installed_trainer), model="net", source="local")
    (trainer / "plans.json").write_text(json.dumps(plans))
    (trainer / "hubconf.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "def net(**kwargs):\n"
        "    from dynamic_network_architectures.architectures.unet import PlainConvUNet\n"
        "    return PlainConvUNet(**kwargs)\n"
    )


def test_plans_that_would_run_a_hubconf_from_the_zip_are_refused_at_import_and_at_load(
    total_fast_test_weights, tmp_path
):
    """The reviewer's finding: ``torch.nn.modules.module.torch.hub.load`` passed a prefix check; nnU-Net then
    imported a hubconf.py the same zip installed. Neither ``weights import`` nor the model may get that far."""
    import shutil

    from inference.models import ModelUnavailable
    from inference.models.totalsegmentator import TotalSegmentatorModel

    marker = tmp_path / "code-ran"
    weights = tmp_path / "storage" / "weights"
    _hub_plans_release(total_fast_test_weights, tmp_path / "src", weights / DATASET / TRAINER, marker)
    archive = _release_zip(tmp_path / "src", tmp_path / f"{DATASET}.zip")
    config = tmp_path / "config.yaml"
    config.write_text(f"storage: {{directory: {tmp_path / 'storage'}}}\n")

    result = subprocess.run(
        [DICOM_NODE, "weights", "import", str(archive), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 1, result.stdout
    assert result.stderr.strip() == (
        f"import failed: {archive}: {DATASET}/{TRAINER}/plans.json names the class "
        "'torch.nn.modules.module.torch.hub.load' as the network (network_class_name), which is not a network "
        "building block (it must be a class of dynamic_network_architectures, named by the module that defines or "
        "exports it). Nothing was installed."
    )
    assert not (weights / DATASET).exists() and not marker.exists()

    shutil.copytree(tmp_path / "src" / DATASET, weights / DATASET)  # placed by hand instead
    with pytest.raises(ModelUnavailable, match=r"plans\.json names the class 'torch\.nn\.modules\.module\.torch\.hub"):
        TotalSegmentatorModel("total_fast", weights, device="cpu", backend="torch")
    assert not marker.exists()


def test_weights_import_command_refuses_a_file_that_is_not_the_published_release(tmp_path):
    archive = _weights_zip(tmp_path / f"{DATASET}.zip", _data_checkpoint())
    config = tmp_path / "config.yaml"
    config.write_text(f"storage: {{directory: {tmp_path / 'storage'}}}\n")

    result = subprocess.run(
        [DICOM_NODE, "weights", "import", str(archive), "--sha256", "ab" * 32, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 1
    assert f"not the expected {'ab' * 32}" in result.stderr and "nothing was installed" in result.stderr
    assert not (tmp_path / "storage" / "weights" / DATASET).exists()


def test_weights_that_number_the_structures_otherwise_than_the_package_are_refused(total_fast_test_weights, tmp_path):
    """A dataset.json whose label numbers name other structures than the installed TotalSegmentator's class map
    (weights of another release, a fine-tuned model copied in): every segment would be named wrongly."""
    import shutil

    from inference.models import ModelUnavailable
    from inference.models.totalsegmentator import TotalSegmentatorModel

    shutil.copytree(total_fast_test_weights, tmp_path / "weights", ignore=shutil.ignore_patterns(".openvino"))
    (folder,) = model_folders("total_fast", tmp_path / "weights")
    for manifest in (tmp_path / "weights").rglob(MANIFEST_NAME):
        manifest.unlink()  # placed by hand: identified afresh on first use
    dataset = json.loads((folder.path / "dataset.json").read_text())
    labels = dataset["labels"]
    labels["spleen"], labels["liver"] = labels["liver"], labels["spleen"]
    (folder.path / "dataset.json").write_text(json.dumps(dataset))

    with pytest.raises(ModelUnavailable) as refused:
        TotalSegmentatorModel("total_fast", tmp_path / "weights", device="cpu", backend="torch")

    assert "do not label the structures as the installed TotalSegmentator" in str(refused.value)
    assert "2 label numbers name another structure, e.g. 1 is 'liver' in the weights and 'spleen'" in str(refused.value)


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        ("dataset.json", r"dataset\.json is not valid JSON \(line 1, column 2\); import the weights again"),
        ("plans.json", r"plans\.json is not valid JSON \(line 1, column 2\); import the weights again"),
        ("plans-configuration", r"plans\.json does not describe the configuration '3d_fullres' that .* was trained"),
        (  # was model.load_failed with nnU-Net's traceback (KeyError) at every worker start
            "dataset-channels",
            r"dataset\.json is not a dataset description as nnU-Net writes it: it names no input channel "
            r"\(\"channel_names\", e\.g\. \{\"0\": \"CT\"\}\); the model was not loaded",
        ),
    ],
)
def test_a_weights_folder_with_a_damaged_json_file_is_refused_with_a_sentence(
    total_fast_test_weights, tmp_path, damage, said
):
    """A worker used to die on such a folder at every start (a JSON traceback), leaving its jobs queued for ever."""
    import shutil

    from dicom_node.config import Settings
    from dicom_node.pipeline import ModelCache
    from inference.models import ModelUnavailable

    shutil.copytree(total_fast_test_weights, tmp_path / "weights", ignore=shutil.ignore_patterns(".openvino"))
    (folder,) = model_folders("total_fast", tmp_path / "weights")
    for manifest in (tmp_path / "weights").rglob(MANIFEST_NAME):
        manifest.unlink()  # placed by hand: identified afresh on first use
    if damage == "plans-configuration":
        plans = json.loads((folder.path / "plans.json").read_text())
        plans["configurations"] = {}
        (folder.path / "plans.json").write_text(json.dumps(plans))
    elif damage == "dataset-channels":
        described = json.loads((folder.path / "dataset.json").read_text())
        del described["channel_names"]
        (folder.path / "dataset.json").write_text(json.dumps(described))
    else:
        (folder.path / damage).write_text("{'not': json")
    settings = Settings(
        storage={"directory": str(tmp_path / "storage")},
        models={
            "ts": {"kind": "totalsegmentator", "task": "total_fast", "weights_directory": str(tmp_path / "weights")}
        },
        inference={"device": "cpu"},
    )

    with pytest.raises(ModelUnavailable, match=said) as refused:
        ModelCache(settings).get("ts", {})
    assert "Error" not in str(refused.value) and "Traceback" not in str(refused.value)


def _settings_with_a_ts_rule(tmp_path):
    """Settings whose one processing rule uses a TotalSegmentator model named ts (its weights folder empty)."""
    from dicom_node.config import Settings

    return Settings(
        storage={"directory": str(tmp_path / "storage")},
        models={"ts": {"kind": "totalsegmentator", "task": "total_fast", "weights_directory": str(tmp_path / "w")}},
        rules=[{"name": "ct", "match": {"modality": "CT"}, "action": "process", "model": "ts"}],
    )


def test_a_model_with_its_own_weights_folder_missing_its_weights_names_the_command_for_that_folder(tmp_path):
    from dicom_node import pipeline
    from inference.models import ModelUnavailable

    cache = pipeline.ModelCache(_settings_with_a_ts_rule(tmp_path))
    with pytest.raises(ModelUnavailable) as missing:
        cache.get("ts", {})
    assert f"missing in {tmp_path / 'w'}" in str(missing.value)
    assert "`dicom-node weights import FILE.zip --model ts`" in str(missing.value)


def test_a_model_that_fails_to_load_in_an_unforeseen_way_is_unavailable_with_a_sentence(tmp_path, monkeypatch):
    """Whatever goes wrong while loading, the worker keeps serving and the jobs say why (no crash loop)."""
    from dicom_node import pipeline

    def broken(*_args, **_kwargs):
        raise KeyError("init_args")

    monkeypatch.setattr(pipeline, "load_model", broken)
    cache = pipeline.ModelCache(_settings_with_a_ts_rule(tmp_path))
    cache.load_all()  # logged, not raised: the worker goes on to serve

    with pytest.raises(pipeline.ModelUnavailable, match=r"model 'ts' could not be loaded from .*its weights could not"):
        cache.get("ts", {})


def test_a_label_count_or_region_that_differs_from_the_class_map_is_named():
    from inference.models.totalsegmentator import label_mismatch

    expected = {1: "spleen", 2: "kidney_right"}
    assert label_mismatch({"background": 0, "spleen": 1, "kidney_right": 2}, expected) is None
    assert label_mismatch({"background": 0, "spleen": 1}, expected) == "1 labels numbered 1-1, where 2 are expected"
    assert label_mismatch({"background": 0, "spleen": 1, "kidney_right": [1, 2]}, expected) == (
        "label 'kidney_right' is a region ([1, 2]), not one label number"
    )


@pytest.mark.parametrize(
    ("labels", "said"),
    [
        (
            {"background": 0, "tumor": 1, "spleen": 1, "kidney_right": 2},
            "label number 1 has two names, 'tumor' and 'spleen'",
        ),
        (
            {"background": 0, "spleen": 1, "kidney_right": 2, "tumor": 1},
            "label number 1 has two names, 'spleen' and 'tumor'",
        ),
        ({"background": 0, "spleen": True, "kidney_right": 2}, "label 'spleen' is true, not one whole label number"),
        ({"background": 0, "spleen": 1.0, "kidney_right": 2}, "label 'spleen' is 1.0, not one whole label number"),
        ({"background": 7, "spleen": 1, "kidney_right": 2}, 'labels number "background" 7, where it must be 0'),
        ({"spleen": 1, "kidney_right": 2}, 'labels give no number for "background" (it must be 0)'),
    ],
    ids=["extra-name-first", "extra-name-last", "true", "float", "background-7", "no-background"],
)
def test_labels_that_give_a_number_two_names_or_no_whole_number_never_match(labels, said):
    from inference.models.totalsegmentator import label_mismatch

    assert label_mismatch(labels, {1: "spleen", 2: "kidney_right"}) == said


def test_a_hand_placed_folder_whose_labels_nnunet_cannot_use_gives_the_job_that_sentence(
    total_fast_test_weights, tmp_path
):
    """Without a sentence of its own the job would say its weights could not be read and to import them again."""
    from dicom_node import pipeline
    from inference.models import ModelUnavailable

    (folder,) = model_folders("total_fast", _copy_of(total_fast_test_weights, tmp_path / "copy"))
    (tmp_path / "w").mkdir()
    (folder.path.parent).rename(tmp_path / "w" / DATASET)  # the model 'ts' of the settings below looks in <tmp>/w
    dataset_json = tmp_path / "w" / DATASET / TRAINER / "dataset.json"
    described = json.loads(dataset_json.read_text())
    described["labels"]["background"] = 7
    dataset_json.write_text(json.dumps(described))
    for manifest in (tmp_path / "w").rglob(MANIFEST_NAME):
        manifest.unlink()  # copied in by hand

    with pytest.raises(ModelUnavailable) as refused:
        pipeline.ModelCache(_settings_with_a_ts_rule(tmp_path)).get("ts", {})

    assert str(refused.value) == (
        f'{dataset_json} cannot name the model\'s output: its labels number "background" 7, where it must be 0; the '
        "model was not loaded; install the weights as TotalSegmentator publishes them"
    )
    assert not (dataset_json.parent / MANIFEST_NAME).exists()


def test_the_total_tasks_five_parts_keep_the_whole_short_hash_in_a_dicom_long_string():
    """Every result names the weights in a 64-character LO; the five parts of ``total`` must leave the hash whole."""
    from inference.weights import WeightsIdentity

    parts = tuple(f"Dataset{n}_TotalSegmentator_part{n - 290}" for n in range(291, 296))
    identity = WeightsIdentity("total", parts, "ab" * 32, test_weights=False)
    assert identity.version == f"Dataset291-295 sha256:{'ab' * 8}"
    assert len(f"TotalSegmentator total {identity.version}") <= 64  # the RTSTRUCT's ROIGenerationDescription
    assert WeightsIdentity("x", ("Dataset297_a", "Dataset300_b"), "cd" * 32, False).version.startswith(
        "Dataset297+Dataset300 sha256:"
    )


def _copy_of(weights: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(weights, tmp_path / "weights", ignore=shutil.ignore_patterns(".openvino"))
    return tmp_path / "weights"


def test_weights_changed_between_identification_and_loading_are_not_used(
    total_fast_test_weights, tmp_path, monkeypatch
):
    """The identity is taken before loading; a file that changes before it is read would make the results name
    weights that did not make them. Each file is hashed as it is read: other bytes leave the model unloaded."""
    from inference.models import ModelUnavailable, totalsegmentator

    weights = _copy_of(total_fast_test_weights, tmp_path)
    (folder,) = model_folders("total_fast", weights)
    real = totalsegmentator.initialize_predictor

    def import_before_the_read(predictor, path):
        plans = folder.path / "plans.json"
        replacement = folder.path / "plans.json.new"  # as an import installs a file: written beside, renamed over
        replacement.write_bytes(plans.read_bytes() + b"\n")
        os.replace(replacement, plans)
        return real(predictor, path)

    monkeypatch.setattr(totalsegmentator, "initialize_predictor", import_before_the_read)
    with pytest.raises(ModelUnavailable) as refused:
        totalsegmentator.TotalSegmentatorModel("total_fast", weights, device="cpu", backend="torch")

    assert "changed while the total_fast model was loading" in str(refused.value)


@pytest.mark.nightly  # converts a network to OpenVINO (about 100 s); the load-time check is tested above
def test_weights_changed_after_they_were_read_do_not_change_what_the_loaded_model_says_or_caches(
    total_fast_test_weights, tmp_path, monkeypatch
):
    """An import that lands once the files are read leaves the loaded model as identified (its results name the
    bytes it was built from), and the network converted for OpenVINO is cached under those bytes' hashes, not
    under the new files' (a cache named after the new files but holding the old network would outlive a restart)."""
    from inference.models import totalsegmentator
    from inference.models.openvino_backend import ConvertedModelFiles
    from inference.weights import folder_hashes

    require_extra("openvino")
    weights = _copy_of(total_fast_test_weights, tmp_path)
    (folder,) = model_folders("total_fast", weights)
    before = folder_hashes(folder.path)
    real = totalsegmentator.initialize_predictor

    def import_after_the_read(predictor, path):
        loaded = real(predictor, path)
        plans = folder.path / "plans.json"
        plans.write_bytes(plans.read_bytes() + b"\n")
        return loaded

    monkeypatch.setattr(totalsegmentator, "initialize_predictor", import_after_the_read)
    model = totalsegmentator.TotalSegmentatorModel(
        "total_fast", weights, device="cpu", backend="openvino", precision="fp32"
    )

    assert model.weights.folder_hashes == (before,)
    assert ConvertedModelFiles.for_folder(folder, before).record.is_file()
    assert not ConvertedModelFiles.for_folder(folder, folder_hashes(folder.path)).record.exists()


def _rewrite_plans(folder: Path, change) -> None:
    from inference.weights import write_manifest

    plans = json.loads((folder / "plans.json").read_text())
    change(plans)
    (folder / "plans.json").write_text(json.dumps(plans))
    write_manifest(folder)  # installed so, as by an import: only what the files say is wrong


def test_weights_of_another_spacing_in_a_tasks_folder_are_refused(total_fast_test_weights, tmp_path):
    from inference.models import ModelUnavailable
    from inference.models.totalsegmentator import TotalSegmentatorModel

    weights = _copy_of(total_fast_test_weights, tmp_path)
    (folder,) = model_folders("total_fast", weights)
    _rewrite_plans(folder.path, lambda plans: plans["configurations"]["3d_fullres"].update(spacing=[6.0, 6.0, 6.0]))

    with pytest.raises(ModelUnavailable) as refused:
        TotalSegmentatorModel("total_fast", weights, device="cpu", backend="torch")
    assert "work at 6 x 6 x 6 mm spacing (plans.json), where this task's models work at 3 mm" in str(refused.value)


def test_weights_whose_plans_name_another_dataset_id_load_with_a_warning(total_fast_test_weights, tmp_path, caplog):
    """A release renamed by hand is still the weights its hash names; the folder name alone does not refuse it."""
    from inference.models.totalsegmentator import TotalSegmentatorModel

    weights = _copy_of(total_fast_test_weights, tmp_path)
    (folder,) = model_folders("total_fast", weights)
    _rewrite_plans(folder.path, lambda plans: plans.update(dataset_name="Dataset298_TotalSegmentator_total_6mm"))

    model = TotalSegmentatorModel("total_fast", weights, device="cpu", backend="torch")
    assert model.weights.folder_hashes
    assert "were made for Dataset298_TotalSegmentator_total_6mm (plans.json dataset_name), not for" in caplog.text


def test_a_checkpoint_that_does_not_fit_the_labels_is_refused_with_the_layer_sizes(total_fast_test_weights, tmp_path):
    from inference.models import ModelUnavailable
    from inference.models.totalsegmentator import TotalSegmentatorModel
    from inference.weights import write_manifest

    weights = _copy_of(total_fast_test_weights, tmp_path)
    (folder,) = model_folders("total_fast", weights)
    described = json.loads((folder.path / "dataset.json").read_text())
    described["labels"]["one_more_structure"] = max(described["labels"].values()) + 1
    (folder.path / "dataset.json").write_text(json.dumps(described))
    write_manifest(folder.path)

    with pytest.raises(ModelUnavailable) as refused:
        TotalSegmentatorModel("total_fast", weights, device="cpu", backend="torch")
    message = str(refused.value)
    assert "checkpoint_final.pth does not fit the network that" in message
    assert "layer(s) differ in size, e.g." in message and "in the checkpoint" in message


@pytest.mark.parametrize(
    "content",
    [b"", b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n", None],
    ids=["empty", "git-lfs-pointer", "cut-short"],
)
def test_a_damaged_checkpoint_is_called_damaged_not_dangerous(tmp_path, content):
    checkpoint = tmp_path / "checkpoint_final.pth"
    whole = _data_checkpoint()
    checkpoint.write_bytes(whole[: len(whole) // 2] if content is None else content)

    with pytest.raises(UnsafeWeights) as refused:
        load_checkpoint(checkpoint)
    assert str(refused.value) == (
        f"{checkpoint} is not a readable PyTorch checkpoint (damaged, cut short, or a Git LFS pointer in place of "
        "the file); import the weights again"
    )


@pytest.mark.parametrize(
    ("value", "said"), [(float("nan"), "values that are not numbers (NaN)"), (float("-inf"), "infinite values")]
)
def test_installed_weights_holding_a_value_that_is_not_a_number_are_not_loaded(
    total_fast_test_weights, tmp_path, value, said
):
    """Put in place by hand (or damaged once installed, with the manifest rewritten): the load refuses them, naming
    the file and the layer, as ``weights import`` does (tests/test_weights_import.py)."""
    from inference.models import ModelUnavailable
    from inference.models.totalsegmentator import TotalSegmentatorModel
    from inference.weights import write_manifest
    from tests.test_weights_import import with_one_value

    weights = _copy_of(total_fast_test_weights, tmp_path)
    (folder,) = model_folders("total_fast", weights)
    checkpoint = folder.path / "fold_0" / "checkpoint_final.pth"
    layer = [name for name in load_checkpoint(checkpoint)["network_weights"] if name.endswith(".bias")][-1]
    checkpoint.write_bytes(with_one_value(checkpoint.read_bytes(), value, output_layer=True))
    write_manifest(folder.path)

    with pytest.raises(ModelUnavailable) as refused:
        TotalSegmentatorModel("total_fast", weights, device="cpu", backend="torch")
    assert str(refused.value) == (
        f"{checkpoint} holds {said} in layer {layer}: the weights file is damaged; import it again from a good copy"
    )


def test_a_model_load_that_finds_the_disk_full_is_left_to_wait_not_failed_for_good(tmp_path, monkeypatch):
    """OpenVINO writes its converted model beside the weights while loading: a full disk there queues the job
    again (as elsewhere in processing) instead of failing it with "import the weights again"."""
    import errno

    from dicom_node import pipeline

    def disk_full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline, "load_model", disk_full)
    cache = pipeline.ModelCache(_settings_with_a_ts_rule(tmp_path))
    cache.load_all()  # logged: the worker starts all the same

    with pytest.raises(OSError) as raised:
        cache.get("ts", {})
    assert pipeline.is_disk_full(raised.value) and not isinstance(raised.value, pipeline.ModelUnavailable)
