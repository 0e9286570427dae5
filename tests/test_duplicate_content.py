"""The same SOP Instance UID sent again with other pixel data, and associations that end in an abort.

A real `dicom-node serve`, the real 20-slice JPEG 2000 lossless CT, DCMTK storescu and pynetdicom senders. A copy
whose pixels differ from the stored one is refused (0x0111), quarantined and fails the series; a copy with the same
pixels in another transfer syntax is kept once, as before. An aborted association says why in the log and audit trail.
"""

from __future__ import annotations

import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from db import jobs
from db.ingest import InstanceRecord, SeriesAttributes, StudyAttributes, record_instance, record_rejection
from db.models import AuditEvent, Instance, Job, JobState, RejectedInstance
from db.session import make_engine, make_session_factory, migrate, transaction
from dicom_node import status
from dicom_node.receive.storage import (
    InstanceStore,
    hold_series_with_different_copies,
    record_stored_instances,
)
from tests.conftest import CT_RULES, ct_instance, data_set_bytes, storescu, succeeded_files, wait_for

pytestmark = pytest.mark.integration

DIFFERENT_CONTENT = 0x0111  # Duplicate SOP Instance (PS3.7 Annex C), as a number a sender sees


def rewritten(sources: list[Path], folder: Path, add: int) -> list[Path]:
    """The series decompressed to explicit VR little endian, ``add`` added to every stored pixel value."""
    folder.mkdir()
    written = []
    for source in sources:
        dataset = pydicom.dcmread(source)
        pixels = dataset.pixel_array.astype(np.int32) + add
        dataset.PixelData = pixels.astype(dataset.pixel_array.dtype).tobytes()
        dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        dataset.pop("LossyImageCompression", None)
        target = folder / source.name
        dataset.save_as(target, enforce_file_format=True)
        written.append(target)
    return written


def sop_uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def stored_instances(node) -> dict[str, Path]:
    with node.sessions() as session:
        return {i.sop_instance_uid: Path(i.path) for i in session.scalars(select(Instance))}


def refusals(node) -> list[RejectedInstance]:
    with node.sessions() as session:
        return list(session.scalars(select(RejectedInstance).order_by(RejectedInstance.id)))


@pytest.fixture
def ct_series(shared_fixtures) -> list[Path]:
    return sorted((shared_fixtures / "example_ct_dicom_valid").glob("*.dcm"))


def test_a_resent_copy_with_other_pixels_is_refused_and_one_with_the_same_pixels_kept_once(
    ct_series, tmp_path, start_node
):
    same_pixels = rewritten(ct_series, tmp_path / "same", add=0)
    brighter = rewritten(ct_series, tmp_path / "brighter", add=500)
    node = start_node(rules=CT_RULES, completion={"quiet_seconds": 600})
    original = storescu(node.port, ct_series, extra=["-xv"])  # JPEG 2000 lossless, as stored
    assert len(succeeded_files(original.stderr)) == 20, original.stdout + original.stderr

    resent = storescu(node.port, same_pixels)  # the same pixel values, uncompressed: kept once, silently

    assert len(succeeded_files(resent.stderr)) == 20, resent.stdout + resent.stderr
    wait_for(lambda: len(stored_instances(node)) == 20, timeout=30, what="the 20 instances to be recorded")
    assert refusals(node) == []

    ae = AE(ae_title="CORRECTOR")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    answers = [assoc.send_c_store(pydicom.dcmread(path)) for path in brighter]
    assoc.release()

    assert {int(answer.Status) for answer in answers} == {DIFFERENT_CONTENT}
    assert {str(answer.ErrorComment) for answer in answers} == {
        "already received with other pixel data; the first copy is kept"
    }
    stored = stored_instances(node)
    for source in ct_series:  # the first copies, byte for byte, in the syntax they came in
        assert data_set_bytes(stored[sop_uid_of(source)]) == data_set_bytes(source)
    refused = refusals(node)
    assert {row.sop_instance_uid for row in refused} == set(stored)
    assert {row.status for row in refused} == {DIFFERENT_CONTENT}
    assert all(row.path and Path(row.path).is_file() for row in refused)  # each copy kept in quarantine
    assert all("was already received with different pixel data" in row.reason for row in refused)
    series_uid = str(pydicom.dcmread(ct_series[0], stop_before_pixels=True).SeriesInstanceUID)
    node.wait_for_state(series_uid, JobState.FAILED)
    assert "was sent again with different pixel data" in (node.job_reason(series_uid) or "")
    refused_lines = [line for line in node.log().splitlines() if "instance.refused" in line]
    assert len(refused_lines) == 20 and all("WARNING" in line for line in refused_lines)


def test_two_senders_at_once_keep_one_copy_each_and_fail_the_series(ct_series, tmp_path, start_node):
    brighter = rewritten(ct_series, tmp_path / "brighter", add=500)
    node = start_node(rules=CT_RULES, completion={"quiet_seconds": 600})

    with ThreadPoolExecutor(2) as senders:
        first = senders.submit(storescu, node.port, ct_series, calling_ae="SENDERA", extra=["-xv", "-nh"])
        second = senders.submit(storescu, node.port, brighter, calling_ae="SENDERB", extra=["-nh"])
        sent_a, sent_b = first.result(), second.result()

    accepted_a = {sop_uid_of(Path(name)) for name in succeeded_files(sent_a.stderr)}
    accepted_b = {sop_uid_of(Path(name)) for name in succeeded_files(sent_b.stderr)}
    all_uids = {sop_uid_of(path) for path in ct_series}
    assert accepted_a | accepted_b == all_uids and not accepted_a & accepted_b  # one copy of each acknowledged
    wait_for(lambda: len(stored_instances(node)) == 20, timeout=30, what="the 20 instances to be recorded")
    stored = stored_instances(node)
    for original, altered in zip(ct_series, brighter, strict=True):
        uid = sop_uid_of(original)
        kept = altered if uid in accepted_b else original
        assert data_set_bytes(stored[uid]) == data_set_bytes(kept)  # the acknowledged copy, untouched
    refused = refusals(node)
    assert sorted(row.sop_instance_uid for row in refused) == sorted(all_uids)
    assert {row.status for row in refused} == {DIFFERENT_CONTENT}
    series_uid = str(pydicom.dcmread(ct_series[0], stop_before_pixels=True).SeriesInstanceUID)
    node.wait_for_state(series_uid, JobState.FAILED)


def aborted_records(node) -> list[AuditEvent]:
    with node.sessions() as session:
        return list(
            session.scalars(
                select(AuditEvent).where(AuditEvent.action == "association", AuditEvent.outcome == "aborted")
            )
        )


def test_an_abort_from_the_sender_is_logged_and_audited_as_such(start_node):
    node = start_node()
    ae = AE(ae_title="ABORTER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established

    assoc.abort()

    wait_for(lambda: aborted_records(node), timeout=20, what="the aborted association's audit record")
    [audited] = aborted_records(node)
    assert audited.peer_ae_title == "ABORTER"
    assert "aborted the association (it sent an A-ABORT)" in (audited.detail or "")
    [line] = [line for line in node.log().splitlines() if "association.aborted" in line]
    assert "it sent an A-ABORT" in line


def test_a_sender_that_stops_mid_store_is_cut_by_the_network_timeout_and_says_so(start_node):
    node = start_node(network={"network_timeout_seconds": 1})
    ae = AE(ae_title="STALLER")
    ae.network_timeout = 60  # the sender's side waits longer than the node's
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    raw = assoc.dul.socket.socket
    assert raw is not None
    # The start of a P-DATA-TF PDU that announces 1000 bytes, then nothing more: a sender stalled mid-C-STORE.
    raw.sendall(struct.pack(">BBI", 0x04, 0x00, 1000) + b"\x00" * 10)

    wait_for(lambda: aborted_records(node), timeout=20, what="the aborted association's audit record")
    [audited] = aborted_records(node)
    assert "nothing arrived from STALLER" in (audited.detail or "")
    assert "network.network_timeout_seconds" in (audited.detail or "")
    with pytest.raises(OSError):  # the node closed the connection
        for _ in range(50):
            raw.sendall(b"\x00" * 1024)
            time.sleep(0.05)
    assoc.abort()


def test_a_connection_dropped_mid_association_says_what_is_known(start_node):
    node = start_node()
    ae = AE(ae_title="DROPPER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    raw = assoc.dul.socket.socket
    assert raw is not None

    raw.shutdown(socket.SHUT_RDWR)  # the connection goes without an A-RELEASE or A-ABORT

    wait_for(lambda: aborted_records(node), timeout=20, what="the aborted association's audit record")
    [audited] = aborted_records(node)
    assert "was closed or broken before the association was released" in (audited.detail or "")
    assoc.abort()


def record_different_copy(session, sop_instance_uid: str, series_instance_uid: str, calling_ae: str) -> None:
    """The refusal of a copy with other pixel data, as the receiver records it."""
    record_rejection(
        session,
        status=status.DUPLICATE_SOP_INSTANCE,
        reason=f"SOP Instance UID {sop_instance_uid} was already received with different pixel data",
        path=None,
        sop_instance_uid=sop_instance_uid,
        sop_class_uid=str(CTImageStorage),
        transfer_syntax_uid=str(ExplicitVRLittleEndian),
        calling_ae_title=calling_ae,
        series_instance_uid=series_instance_uid,
    )


def test_a_done_series_is_failed_by_a_copy_with_other_pixels_and_stays_failed_when_a_late_image_reopens_it(tmp_path):
    url = f"sqlite:///{tmp_path / 'state.db'}"
    migrate(url)
    store, sessions = InstanceStore(tmp_path / "storage"), make_session_factory(make_engine(url))

    def stored(sop_uid: str) -> InstanceRecord:
        path = store.path_for("1.2.3", "1.2.3.1", sop_uid)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(sop_uid.encode())
        return InstanceRecord(
            sop_instance_uid=sop_uid,
            sop_class_uid=str(CTImageStorage),
            transfer_syntax_uid=str(ExplicitVRLittleEndian),
            path=str(path),
            size_bytes=path.stat().st_size,
            study=StudyAttributes("1.2.3"),
            series=SeriesAttributes("1.2.3.1", modality="CT"),
        )

    with transaction(sessions) as session:
        record_instance(session, stored("1.2.3.1.1"))
    with transaction(sessions) as session:  # processed and sent: DONE
        job = session.scalars(select(Job)).one()
        jobs.mark_complete(session, job, "quiet period over")
        jobs.fail(session, job, "stand-in for a finished run")
        jobs.change_state(session, job, JobState.SENDING, "resent")
        jobs.finish_sending(session, job, "all results delivered")

    with transaction(sessions) as session:  # a correction under the same UID, refused
        record_different_copy(session, "1.2.3.1.1", "1.2.3.1", "CORRECTOR")
        assert hold_series_with_different_copies(session, "1.2.3.1")
    with sessions() as session:
        job = session.scalars(select(Job)).one()
        assert job.state is JobState.FAILED
        assert "SOP Instance UID 1.2.3.1.1 was sent again with different pixel data" in (job.reason or "")

    with transaction(sessions) as session:  # a late image re-opens the series: it is failed again at once
        (outcome,) = record_stored_instances(session, store, [stored("1.2.3.1.2")])
    assert outcome.recorded.series_reopened
    with sessions() as session:
        job = session.scalars(select(Job)).one()
        assert job.state is JobState.FAILED
        assert "1.2.3.1.1 was sent again with different pixel data" in (job.reason or "")


def test_a_complete_series_with_a_copy_refused_for_other_pixels_is_not_routed(tmp_path):
    """The refusal and the series' creation ran at the same moment (PostgreSQL), so the series was not held when
    the copy was refused: the watcher holds it before routing."""
    from dicom_node.config import Settings
    from dicom_node.watcher import SeriesWatcher

    url = f"sqlite:///{tmp_path / 'state.db'}"
    migrate(url)
    sessions = make_session_factory(make_engine(url))
    path = tmp_path / "1.2.3.1.1.dcm"
    path.write_bytes(b"\0" * 100)
    with transaction(sessions) as session:
        record_instance(session, ct_instance("1.2.3.1.1", "1.2.3.1", study_instance_uid="1.2.3", path=path))
        record_different_copy(session, "1.2.3.1.1", "1.2.3.1", "SENDERB")
        jobs.mark_complete(session, session.scalars(select(Job)).one(), "quiet period over")
    settings = Settings(storage={"directory": str(tmp_path / "storage")}, rules=CT_RULES)

    SeriesWatcher(settings, sessions).run_once()

    with sessions() as session:
        job = session.scalars(select(Job)).one()
        assert job.state is JobState.FAILED
        assert (job.reason or "").startswith("SOP Instance UID 1.2.3.1.1 was sent again with different pixel data")

    with transaction(sessions) as session:  # the operator confirmed the stored images: a retry routes it
        jobs.retry(session, session.scalars(select(Job)).one())

    SeriesWatcher(settings, sessions).run_once()

    with sessions() as session:  # routed and admitted as any series (its stand-in file is no image): not held again
        job = session.scalars(select(Job)).one()
        assert "different pixel data" not in (job.reason or ""), job.reason


def _send_copies(node, paths: list[Path], calling_ae: str = "CORRECTOR") -> list[int]:
    """C-STORE each file on one association; the status of each answer."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    answers = [int(assoc.send_c_store(pydicom.dcmread(path)).Status) for path in paths]
    assoc.release()
    return answers


def test_a_copy_with_other_pixels_refused_while_the_database_is_locked_is_asked_again_and_then_holds_the_series(
    ct_series, tmp_path, start_node
):
    from tests.test_quiet_after_lock import SqliteLockHolder

    brighter = rewritten(ct_series[:1], tmp_path / "brighter", add=500)
    node = start_node(rules=CT_RULES, completion={"quiet_seconds": 600}, database={"busy_timeout_seconds": 1})
    assert storescu(node.port, ct_series, extra=["-xv"]).returncode == 0
    wait_for(lambda: len(stored_instances(node)) == 20, timeout=30, what="the 20 instances to be recorded")
    series_uid = str(pydicom.dcmread(ct_series[0], stop_before_pixels=True).SeriesInstanceUID)

    holder = SqliteLockHolder(node.storage / "dicom-node.db")
    try:
        during_lock = _send_copies(node, brighter)
    finally:
        holder.release()

    assert during_lock == [0xA700]  # unrecorded, the refusal would not hold the series: send it again later
    assert refusals(node) == [] and list((node.storage / "quarantine").glob("*")) == []
    assert "the database could not record that now" in node.log()

    assert _send_copies(node, brighter) == [DIFFERENT_CONTENT]
    node.wait_for_state(series_uid, JobState.FAILED)
    assert [row.status for row in refusals(node)] == [DIFFERENT_CONTENT]


def test_a_copy_with_other_pixels_of_an_ignored_series_is_recorded_and_the_series_left_ignored(
    ct_series, tmp_path, start_node
):
    brighter = rewritten(ct_series[:1], tmp_path / "brighter", add=500)
    node = start_node(completion={"quiet_seconds": 1})  # no rules: every series is IGNORED
    assert storescu(node.port, ct_series, extra=["-xv"]).returncode == 0
    series_uid = str(pydicom.dcmread(ct_series[0], stop_before_pixels=True).SeriesInstanceUID)
    node.wait_for_state(series_uid, JobState.IGNORED)

    assert _send_copies(node, brighter) == [DIFFERENT_CONTENT]

    assert [row.status for row in refusals(node)] == [DIFFERENT_CONTENT]  # recorded: a re-route holds the series
    assert node.job_state(series_uid) is JobState.IGNORED
    assert "rejection_not_recorded" not in node.log()
