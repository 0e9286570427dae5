"""The receiving node end to end: a real `dicom-node serve`, real DCMTK and pynetdicom senders."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import func, select

from db.models import Instance, JobEvent, JobState, RejectedInstance, Series
from dicom_node import status
from dicom_node.phantom import PhantomSpec, write_phantom_series
from tests.conftest import CT_RULES, data_set_bytes, require_tool, storescu, succeeded_files, wait_for

pytestmark = pytest.mark.integration

SMALL_CT = PhantomSpec(rows=64, columns=64, slices=12, pixel_spacing=(5.0, 5.0), slice_spacing=5.0)


def stored_path(node, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    return node.storage / "instances" / study_uid / series_uid / f"{sop_uid}.dcm"


def instance_count(node, series_uid: str | None = None) -> int:
    with node.sessions() as session:
        query = select(func.count()).select_from(Instance)
        if series_uid:
            query = query.join(Instance.series).where(Series.series_instance_uid == series_uid)
        return session.scalar(query) or 0


def send_raw(port: int, files: list[Path], calling_ae: str = "PACS") -> list[int]:
    """Send files as they are on disk (pynetdicom streams the bytes after the file meta), returning statuses.

    This is how a PACS forwards what it holds: the data set is not re-encoded, so a
    malformed data set reaches the node exactly as malformed as it is on disk.
    """
    ae = AE(ae_title=calling_ae)
    for transfer_syntax in (JPEG2000Lossless, ExplicitVRLittleEndian):  # one context each: both accepted
        ae.add_requested_context(CTImageStorage, transfer_syntax)
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
        assert assoc.is_established
        statuses = [int(assoc.send_c_store(path).Status) for path in files]
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    return statuses


def test_synthetic_series_lands_byte_identical_and_is_queued(tmp_path, start_node):
    series = write_phantom_series(tmp_path / "ct", SMALL_CT)
    node = start_node(rules=CT_RULES, completion={"quiet_seconds": 600})

    result = storescu(node.port, series.files)

    assert result.returncode == 0, result.stdout + result.stderr
    assert len(succeeded_files(result.stderr + result.stdout)) == len(series.files)
    for source, sop_uid in zip(series.files, series.sop_instance_uids, strict=True):
        stored = stored_path(node, series.study_instance_uid, series.series_instance_uid, sop_uid)
        assert data_set_bytes(stored) == data_set_bytes(source)
    assert instance_count(node, series.series_instance_uid) == len(series.files)
    # ImagesInAcquisition is reached, so it completes without waiting out the 600 s quiet period.
    node.wait_for_state(series.series_instance_uid, JobState.QUEUED, timeout=20)
    with node.sessions() as session:
        states = [e.to_state for e in session.scalars(select(JobEvent).order_by(JobEvent.id))]
    assert states == [JobState.RECEIVING, JobState.COMPLETE, JobState.QUEUED]
    assert "all 12 expected images received" in node.cli("show", series.series_instance_uid).stdout


def test_series_completes_after_quiet_period_without_expected_count(tmp_path, start_node):
    series = write_phantom_series(tmp_path / "ct", SMALL_CT)
    node = start_node(rules=CT_RULES, completion={"quiet_seconds": 2, "expected_count_timeout_seconds": 2})

    storescu(node.port, series.files[:5])  # 5 of the 12 announced by ImagesInAcquisition

    node.wait_for_state(series.series_instance_uid, JobState.QUEUED, timeout=30)
    shown = node.cli("show", series.series_instance_uid).stdout
    assert "only 5 of 12 expected images (ImagesInAcquisition) after 2 s without a new one (partial series)" in shown


def test_real_compressed_ct_is_stored_as_sent_and_ignored_without_matching_rule(shared_fixtures, start_node):
    files = sorted((shared_fixtures / "example_ct_dicom_valid").glob("*.dcm"))
    node = start_node(
        rules=[{"name": "mr-only", "match": {"modality": "MR"}, "action": "process", "model": "baseline"}]
    )

    result = storescu(node.port, files, extra=["-xv"])  # propose JPEG 2000 lossless: sent as stored

    assert result.returncode == 0, result.stdout + result.stderr
    with node.sessions() as session:
        instances = list(session.scalars(select(Instance)))
        series_uid = instances[0].series.series_instance_uid
    assert len(instances) == 20
    assert {i.transfer_syntax_uid for i in instances} == {"1.2.840.10008.1.2.4.90"}
    by_uid = {i.sop_instance_uid: Path(i.path) for i in instances}
    for source in files:
        sop_uid = source.name.removeprefix("CT.").removesuffix(".dcm")
        assert data_set_bytes(by_uid[sop_uid]) == data_set_bytes(source)
    node.wait_for_state(series_uid, JobState.IGNORED)
    assert (
        node.job_reason(series_uid) == "no routing rule matched (rule 'mr-only' did not match: Modality CT is not MR)"
    )


def test_mr_series_is_stored_but_never_processed(tmp_path, start_node):
    series = write_phantom_series(tmp_path / "mr", PhantomSpec(rows=32, columns=32, slices=4, modality="MR"))
    process_everything = [{"name": "everything", "action": "process", "model": "baseline"}]
    node = start_node(rules=process_everything)

    result = storescu(node.port, series.files)

    assert result.returncode == 0
    assert instance_count(node) == 4
    node.wait_for_state(series.series_instance_uid, JobState.IGNORED)
    assert "modality MR is not CT" in node.job_reason(series.series_instance_uid)


def test_unknown_calling_ae_title_is_rejected_at_association(tmp_path, start_node):
    series = write_phantom_series(tmp_path / "ct", SMALL_CT)
    node = start_node(network={"allowed_calling_ae_titles": ["PACS"]})

    refused = storescu(node.port, series.files[:1], calling_ae="INTRUDER")
    accepted = storescu(node.port, series.files[:1], calling_ae="PACS")

    assert refused.returncode != 0
    assert "Association Rejected" in refused.stdout + refused.stderr
    assert accepted.returncode == 0
    assert instance_count(node) == 1
    assert "association.rejected calling_ae=INTRUDER" in node.log()


def test_corrupt_data_set_is_refused_quarantined_and_recorded(tmp_path, start_node):
    good = write_phantom_series(tmp_path / "ct", SMALL_CT)
    source = good.files[0]
    corrupt = tmp_path / "corrupt.dcm"
    offset = len(source.read_bytes()) - len(data_set_bytes(source))
    corrupt.write_bytes(source.read_bytes()[:offset] + b"\x08\x00\x16\x00UI\xff\xff" + b"\x00garbage" * 40)
    node = start_node(rules=CT_RULES)

    statuses = send_raw(node.port, [corrupt])

    assert statuses[0] in (status.CANNOT_UNDERSTAND, status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS)
    assert instance_count(node) == 0
    with node.sessions() as session:
        rejection = session.scalars(select(RejectedInstance)).one()
    assert rejection.status == statuses[0]
    assert Path(rejection.path).read_bytes().endswith(b"\x00garbage" * 40)
    assert "instance.refused" in node.log()
    # The node keeps serving.
    assert storescu(node.port, good.files).returncode == 0
    assert instance_count(node) == len(good.files)


def test_published_files_with_empty_uids_are_refused_with_reason(shared_fixtures, start_node):
    files = sorted((shared_fixtures / "example_ct_dicom").iterdir())
    node = start_node(rules=CT_RULES)

    statuses = send_raw(node.port, files)

    assert statuses == [status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS] * len(files)
    assert instance_count(node) == 0
    assert not list((node.storage / "instances").rglob("*.dcm")), "nothing may be half-stored"
    with node.sessions() as session:
        reasons = set(session.scalars(select(RejectedInstance.reason)))
    assert reasons == {"SOPClassUID is empty"}
    assert len(list((node.storage / "quarantine").glob("*.dcm"))) == len(files)
    assert 'reason="SOPClassUID is empty"' in node.log()
    assert "SOPClassUID is empty" in node.cli("rejected").stdout


def test_duplicate_instance_is_stored_once(tmp_path, start_node):
    series = write_phantom_series(tmp_path / "ct", SMALL_CT)
    node = start_node(rules=CT_RULES)

    first = storescu(node.port, series.files)
    second = storescu(node.port, series.files)

    assert first.returncode == 0 and second.returncode == 0
    assert instance_count(node) == len(series.files)
    assert len(list((node.storage / "instances").rglob("*.dcm"))) == len(series.files)
    assert node.log().count("instance.duplicate") == len(series.files)


def test_late_instance_reopens_a_completed_series(tmp_path, start_node):
    series = write_phantom_series(tmp_path / "ct", SMALL_CT)
    # One image short of ImagesInAcquisition: the expected-count timeout completes it early.
    node = start_node(rules=CT_RULES, completion={"quiet_seconds": 1, "expected_count_timeout_seconds": 1})
    storescu(node.port, series.files[:-1])
    node.wait_for_state(series.series_instance_uid, JobState.QUEUED)

    storescu(node.port, series.files[-1:])

    node.wait_for_state(series.series_instance_uid, JobState.QUEUED)
    assert instance_count(node, series.series_instance_uid) == len(series.files)
    with node.sessions() as session:
        reasons = [e.reason for e in session.scalars(select(JobEvent).order_by(JobEvent.id))]
    assert "late instance re-opened the series (was QUEUED)" in reasons
    assert reasons.count("rule 'ct': process with model 'baseline'") == 2


def test_instance_survives_kill_during_transfer(tmp_path, start_node):
    spec = PhantomSpec(rows=256, columns=256, slices=120, pixel_spacing=(1.5, 1.5), slice_spacing=2.0)
    series = write_phantom_series(tmp_path / "ct", spec)
    node = start_node(rules=CT_RULES, completion={"quiet_seconds": 2, "expected_count_timeout_seconds": 2})

    sender = subprocess.Popen(
        [
            require_tool("storescu"),
            "-v",
            "-aet",
            "PACS",
            "-aec",
            "DICOMNODE",
            "127.0.0.1",
            str(node.port),
            *map(str, series.files),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    wait_for(lambda: instance_count(node) >= 20, timeout=60, interval=0.01, what="20 instances stored")
    node.kill()
    output, _ = sender.communicate(timeout=60)

    acknowledged = succeeded_files(output)
    assert 10 <= len(acknowledged) < len(series.files), "the kill must land in the middle of the transfer"
    node.start()
    stored_uids = {p.stem for p in (node.storage / "instances").rglob("*.dcm")}
    with node.sessions() as session:
        recorded_uids = set(session.scalars(select(Instance.sop_instance_uid)))
    for path in acknowledged:
        sop_uid = series.sop_instance_uids[series.files.index(Path(path))]
        assert sop_uid in stored_uids and sop_uid in recorded_uids
    assert stored_uids == recorded_uids
    assert not list((node.storage / "incoming").iterdir())  # no temporary file survives the restart
    node.wait_for_state(series.series_instance_uid, JobState.QUEUED)

    # The PACS resends what failed; the series re-opens, gets every instance once, and completes.
    assert storescu(node.port, series.files).returncode == 0
    node.wait_for_state(series.series_instance_uid, JobState.QUEUED)
    assert instance_count(node, series.series_instance_uid) == len(series.files)


def test_restart_resumes_from_recorded_state(tmp_path, start_node):
    series = write_phantom_series(tmp_path / "ct", SMALL_CT)
    node = start_node(rules=CT_RULES)
    storescu(node.port, series.files)
    node.wait_for_state(series.series_instance_uid, JobState.QUEUED)
    with node.sessions() as session:
        events_before = session.scalar(select(func.count()).select_from(JobEvent))

    node.stop()
    node.start()
    wait_for(lambda: "node.ready" in node.log().split("node.stopped")[-1], what="node ready again")

    assert node.job_state(series.series_instance_uid) == JobState.QUEUED
    with node.sessions() as session:
        assert session.scalar(select(func.count()).select_from(JobEvent)) == events_before
    assert instance_count(node) == len(series.files)


def test_status_command_lists_series_and_states(tmp_path, start_node):
    series = write_phantom_series(tmp_path / "ct", SMALL_CT)
    node = start_node(rules=CT_RULES)
    storescu(node.port, series.files)
    node.wait_for_state(series.series_instance_uid, JobState.QUEUED)

    table = node.cli("status")

    assert table.returncode == 0, table.stderr
    assert "QUEUED" in table.stdout
    assert "QUEUED 1; refused instances: 0" in table.stdout


def test_a_refused_instance_is_not_kept_when_it_would_eat_into_the_space_kept_for_accepted_images(tmp_path, start_node):
    """A sender of junk fills quarantine/ only down to storage.quarantine_reserve_gigabytes; the refusal is still
    recorded, and good images are still accepted."""
    good = write_phantom_series(tmp_path / "ct", SMALL_CT)
    source = good.files[0]
    corrupt = tmp_path / "corrupt.dcm"
    offset = len(source.read_bytes()) - len(data_set_bytes(source))
    corrupt.write_bytes(source.read_bytes()[:offset] + b"\x08\x00\x16\x00UI\xff\xff" + b"\x00garbage" * 40)
    node = start_node(rules=CT_RULES, storage={"quarantine_reserve_gigabytes": 1_000_000})  # more than any disk

    statuses = send_raw(node.port, [corrupt])

    assert statuses[0] in (status.CANNOT_UNDERSTAND, status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS)
    with node.sessions() as session:
        rejection = session.scalars(select(RejectedInstance)).one()
    assert rejection.path is None and not list((node.storage / "quarantine").iterdir())
    assert "instance.quarantine_full" in node.log()
    assert "GB are kept for accepted images (storage.quarantine_reserve_gigabytes)" in node.log()
    assert storescu(node.port, good.files).returncode == 0
    assert instance_count(node) == len(good.files)
