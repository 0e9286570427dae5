"""Which weights made which results stays on record in the database: in the job's history (which no purge deletes),
in the audit trail for every weights install, and in the log when a worker loads other weights than the model's
latest results were made with. A model whose weights are missing is warned about before the first series fails."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from db import jobs
from db.ingest import record_instance
from db.jobs import job_for_series_uid
from db.models import AuditEvent, Job, JobState
from db.session import make_engine, make_session_factory, migrate, transaction
from dicom_node.config import Settings, load_settings
from dicom_node.console import queries
from dicom_node.provenance import results_event_reason
from dicom_node.worker import InferenceWorker
from inference.weights import TASK_DATASETS, file_sha256, identify, model_folders
from tests.conftest import DICOM_NODE, ct_instance, drive_job_to, require_extra, storescu
from tests.test_weights_import import release_entries, without_key, write_zip

_ID, DATASET, TRAINER = TASK_DATASETS["total_fast"][0]


def _weights_sha256(weights: Path) -> str:
    return identify("total_fast", model_folders("total_fast", weights)).sha256


def _ts_model(weights: Path) -> dict[str, object]:
    return {"kind": "totalsegmentator", "task": "total_fast", "weights_directory": str(weights), "backend": "torch"}


def _cli(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DICOM_NODE, *args, "--config", str(config)], capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.integration
def test_the_weights_that_made_a_series_are_shown_and_found_from_the_database_after_a_purge(
    start_node, shared_fixtures, total_fast_test_weights
):
    require_extra("torch")
    files = sorted((shared_fixtures / "example_ct_dicom_valid").glob("*.dcm"))
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    node = start_node(
        models={"ts": _ts_model(total_fast_test_weights)},
        rules=[{"name": "ct", "match": {"modality": "CT"}, "action": "process", "model": "ts"}],
        inference={"workers": 1, "device": "cpu"},
    )
    assert storescu(node.port, files, extra=["-xv"]).returncode == 0  # the CT is JPEG 2000 compressed
    node.wait_for_state(uid, JobState.DONE, timeout=600)
    whole = _weights_sha256(total_fast_test_weights)

    purged = node.cli("purge", "--series", uid)
    assert purged.returncode == 0, purged.stderr

    made_by = [line for line in node.cli("show", uid).stdout.splitlines() if line.startswith("made by")]
    assert len(made_by) == 1, made_by
    assert made_by[0].startswith("made by  model ts: TotalSegmentator total_fast Dataset297 sha256:")
    for said in (f"weights sha256:{whole} (test weights", "device cpu", "backend torch", "precision fp32"):
        assert said in made_by[0]
    with node.sessions() as session:
        job = job_for_series_uid(session, uid)
        assert job is not None and not Path(job.result_path or "").exists()
        assert queries.job_detail(session, job, with_patient=False)["made_by"] == made_by[0].removeprefix("made by  ")
        found = queries.worklist(session, queries.WorklistFilter(search=f"sha256:{whole[:12]}"), with_patient=False)
        assert [row["series_instance_uid"] for row in found["jobs"]] == [uid]
        other = queries.WorklistFilter(search="sha256:" + "0" * 12)
        assert queries.worklist(session, other, with_patient=False)["total"] == 0

    listed = node.cli("status", "--weights", f"sha256:{whole[:12]}").stdout
    assert f"1 series with results made by weights sha256:{whole[:12]}" in listed
    assert "0 series with results made by weights" in node.cli("status", "--weights", "0" * 12).stdout
    refused = node.cli("status", "--weights", "liver")
    assert refused.returncode == 2 and "--weights liver is not a SHA-256" in refused.stderr


@pytest.fixture
def queued_ct(tmp_path, total_fast_test_weights) -> tuple[Settings, object, int]:
    """A database with one job of model ``ts`` (test weights), its results recorded by earlier ``weights``."""
    require_extra("torch")
    settings = Settings(
        storage={"directory": tmp_path / "storage"},
        inference={"workers": 0, "device": "cpu"},
        models={"ts": _ts_model(total_fast_test_weights)},
    )
    migrate(settings.database_url)
    sessions = make_session_factory(make_engine(settings.database_url))
    with transaction(sessions) as session:
        record_instance(session, ct_instance("1.2.826.0.1.5.1", "1.2.826.0.1.5"))
        job = session.scalars(select(Job)).one()
        job.model_name = "ts"
        drive_job_to(session, job, JobState.PROCESSING)
        job_id = job.id
    return settings, sessions, job_id


def _record_results_made_with(sessions, job_id: int, sha256: str) -> None:
    made_by = f"model ts: TotalSegmentator total_fast Dataset297 sha256:{sha256[:16]}, weights sha256:{sha256}"
    with transaction(sessions) as session:
        job = session.get_one(Job, job_id)
        reason = "segmented: 1 structures; results in /x"
        event_reason = results_event_reason(reason, made_by)
        jobs.finish_processing(session, job, JobState.DONE, reason, result_path="/x", event_reason=event_reason)


def test_a_worker_loading_other_weights_than_the_models_latest_results_were_made_with_warns_naming_both(
    queued_ct, total_fast_test_weights, caplog
):
    settings, sessions, job_id = queued_ct
    earlier = "e" * 64
    _record_results_made_with(sessions, job_id, earlier)
    caplog.set_level(logging.INFO)

    InferenceWorker(settings, sessions, "test-host:1").models.get("ts", {})

    changed = [r for r in caplog.records if r.getMessage() == "model.weights_changed"]
    assert len(changed) == 1 and changed[0].levelno == logging.WARNING
    fields = changed[0].__dict__["event_fields"]
    assert fields["weights_sha256"] == _weights_sha256(total_fast_test_weights)
    assert fields["earlier_weights_sha256"] == earlier and fields["earlier_job"] == job_id
    assert "restart the node to have every worker use the same weights" in fields["note"]


def test_a_worker_loading_the_weights_the_latest_results_were_made_with_says_nothing(
    queued_ct, total_fast_test_weights, caplog
):
    settings, sessions, job_id = queued_ct
    _record_results_made_with(sessions, job_id, _weights_sha256(total_fast_test_weights))
    caplog.set_level(logging.INFO)

    InferenceWorker(settings, sessions, "test-host:1").models.get("ts", {})

    assert "model.loaded" in caplog.messages and "model.weights_changed" not in caplog.messages


def _operator_records(config: Path) -> list[AuditEvent]:
    settings = load_settings(config)
    with make_session_factory(make_engine(settings.database_url))() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.action == "operator")))


def test_weights_import_is_audited_with_the_zip_the_folders_and_the_hash_results_name(
    tmp_path, total_fast_test_weights
):
    require_extra("torch")
    weights = tmp_path / "storage" / "weights"
    config = tmp_path / "config.yaml"
    config.write_text(f"storage: {{directory: {tmp_path / 'storage'}}}\n")
    migrate(load_settings(config).database_url)
    archive = write_zip(tmp_path / "release.zip", release_entries(total_fast_test_weights))

    imported = _cli("weights", "import", str(archive), config=config)
    damaged = tmp_path / "damaged.zip"
    damaged.write_bytes(b"not a zip")
    refused = _cli("weights", "import", str(damaged), config=config)

    assert imported.returncode == 0, imported.stderr
    whole = _weights_sha256(weights)
    assert f"task total_fast: weights sha256:{whole}" in imported.stdout
    assert "keeps the weights it has loaded until it is restarted" not in imported.stdout
    assert "a worker `serve` starts again after one died" in imported.stdout
    success, failure = _operator_records(config)
    assert success.outcome == "success" and success.detail is not None
    assert success.detail.startswith("OS user ") and " on the command line: weights import of " in success.detail
    for said in (str(archive), f"into {weights}", f"zip SHA-256 {file_sha256(archive)}", f"installed {DATASET}"):
        assert said in success.detail
    assert success.detail.endswith(f"task total_fast: weights sha256:{whole}")
    assert refused.returncode == 1 and failure.outcome == "failed" and failure.detail is not None
    assert f"weights import of {damaged} into {weights} failed: {damaged} is not a zip file" in failure.detail


def test_a_weights_import_refused_for_a_dataset_json_nnunet_cannot_read_is_audited_as_refused(
    tmp_path, total_fast_test_weights
):
    """It used to end in nnU-Net's traceback (KeyError: 'channel_names'), with no audit record."""
    require_extra("torch")
    config = tmp_path / "config.yaml"
    config.write_text(f"storage: {{directory: {tmp_path / 'storage'}}}\n")
    migrate(load_settings(config).database_url)
    entries = release_entries(total_fast_test_weights)
    description = f"{DATASET}/{TRAINER}/dataset.json"
    archive = write_zip(
        tmp_path / "release.zip", {**entries, description: without_key(entries[description], "channel_names")}
    )

    refused = _cli("weights", "import", str(archive), config=config)

    assert refused.returncode == 1, refused.stdout
    assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr, refused.stderr
    (record,) = _operator_records(config)
    assert record.outcome == "refused" and record.detail is not None
    assert f"{description} is not a dataset description as nnU-Net writes it" in record.detail
    assert not (tmp_path / "storage" / "weights" / DATASET).exists()


def test_weights_import_before_the_node_ever_ran_installs_and_says_it_is_not_audited(tmp_path, total_fast_test_weights):
    require_extra("torch")
    config = tmp_path / "config.yaml"
    config.write_text(f"storage: {{directory: {tmp_path / 'storage'}}}\n")
    archive = write_zip(tmp_path / "release.zip", release_entries(total_fast_test_weights))

    imported = _cli("weights", "import", str(archive), config=config)

    assert imported.returncode == 0 and f"imported {tmp_path / 'storage' / 'weights' / DATASET}" in imported.stdout
    assert "not written to the audit trail: the node has no database at" in imported.stderr
    assert not (tmp_path / "storage" / "dicom-node.db").exists()  # the import never creates the database


def test_config_check_warns_about_a_model_whose_weights_are_missing_naming_the_folder_and_commands(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        f"storage: {{directory: {tmp_path / 'storage'}}}\n"
        "models:\n"
        f"  ts: {{kind: totalsegmentator, task: total_fast, weights_directory: {tmp_path / 'none'}}}\n"
        "  baseline: {kind: threshold}\n"
        "rules:\n"
        "  - {name: ct, match: {modality: CT}, action: process, model: ts}\n"
    )

    checked = _cli("config", "check", config=config)

    assert checked.returncode == 0, checked.stderr
    lines = " ".join(checked.stdout.split())  # the terminal's width may wrap the warning
    assert lines.startswith("configuration is valid")
    assert (
        f"warning: model 'ts' cannot be loaded on this host: TotalSegmentator weights for task 'total_fast' are missing in "
        f"{tmp_path / 'none'} (Dataset297)"
    ) in lines
    assert "`dicom-node weights download --task total_fast --model ts`" in lines
    assert "`dicom-node weights import FILE.zip --model ts`" in lines
    assert "every series sent to it fails" in lines and "baseline" not in lines


def test_config_check_on_a_host_that_runs_no_workers_says_where_the_missing_weights_matter(tmp_path):
    """A scale-out receiver (inference.workers 0) loads no model: its missing weights fail no series there."""
    config = tmp_path / "config.yaml"
    config.write_text(
        f"storage: {{directory: {tmp_path / 'storage'}}}\n"
        "inference: {workers: 0}\n"
        "models:\n"
        f"  ts: {{kind: totalsegmentator, task: total_fast, weights_directory: {tmp_path / 'none'}}}\n"
        "rules:\n"
        "  - {name: ct, match: {modality: CT}, action: process, model: ts}\n"
    )

    checked = _cli("config", "check", config=config)

    assert checked.returncode == 0, checked.stderr
    lines = " ".join(checked.stdout.split())
    assert "warning: model 'ts' cannot be loaded on this host" in lines
    assert "This host runs no workers (inference.workers is 0)" in lines
    assert "install them where `dicom-node worker` runs with this configuration" in lines
    assert "Until then every series sent to it fails" not in lines
