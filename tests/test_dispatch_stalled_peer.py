"""A destination that stops reading in the middle of a file: the attempt ends by its time limit and counts as failed.

The stalled destination is a real pynetdicom Storage SCP behind a TCP proxy (a thread of the test) that relays
the association, then stops reading what the node sends after ``stall_after`` bytes while keeping the connection
open: a hung PACS process whose kernel advertises a zero window. The file is larger than the socket buffers, so
the node's send blocks mid-file.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

from db import jobs
from db.models import Job, JobState, Series, Study
from db.session import make_engine, make_session_factory, migrate, transaction
from dicom_node.config import Destination, Settings
from dicom_node.dispatch import Dispatcher, SendOutcome, send_files
from tests.conftest import wait_for
from tests.stalling_proxy import StallingProxy
from tests.test_dispatch_faults import LABEL_MAP_SEGMENTATION, Peer

pytestmark = pytest.mark.integration

# pynetdicom's response wait (and its idle timer) starts once the file is queued, not sent: on a loaded CI machine
# its sending thread may not have reached the stall within 1 s, and the attempt then ends as "no response" between two
# PDUs instead of blocked on the stalled peer. 3 s lets the send reach the stall, so the watchdog is what ends it.
NETWORK_TIMEOUT = 3.0
LARGE_BYTES = 12_000_000  # beyond what the node's send buffer (4 MB at most) and the proxy's take before it stalls


@pytest.fixture
def peers():
    healthy, behind_proxy = Peer("PLANNER").start(), Peer("STALLED").start()
    proxy = StallingProxy(behind_proxy.port)
    try:
        yield healthy, proxy
    finally:
        proxy.close()
        healthy.stop()
        behind_proxy.stop()


def large_labelmap_seg(path: Path) -> str:
    """A LABELMAP SEG file of about 12 MB (its pixel data all zero); returns its SOP Instance UID."""
    ds = Dataset()
    ds.SOPClassUID = LABEL_MAP_SEGMENTATION
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2", generate_uid()
    ds.Modality, ds.PatientID = "SEG", "STALL"
    ds.Rows = ds.Columns = 1000
    ds.NumberOfFrames = LARGE_BYTES // 1_000_000
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.SamplesPerPixel, ds.PixelRepresentation = 7, 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(LARGE_BYTES)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def test_a_destination_that_stops_reading_mid_file_fails_its_attempts_while_another_gets_the_file(tmp_path, peers):
    healthy, proxy = peers
    seg = tmp_path / "results" / "seg-labelmap.dcm"
    seg.parent.mkdir()
    uid = large_labelmap_seg(seg)
    seg_only = {"host": "127.0.0.1", "send": ["seg"], "segmentation_type": "LABELMAP"}
    settings = Settings(
        storage={"directory": tmp_path / "storage"},
        database={"url": f"sqlite:///{tmp_path / 'node.db'}"},
        dispatch={
            "timeout_seconds": NETWORK_TIMEOUT,
            "seconds_per_megabyte": 0,
            "max_attempts": 2,
            "parallel_sends": 1,  # the stalled destination holds the only send: the other waits for it to end
            "first_retry_seconds": 0.2,
            "max_retry_seconds": 0.2,
            "check_interval_seconds": 0.2,
        },
        destinations={
            "stalled": {"ae_title": "STALLED", "port": proxy.port, **seg_only},
            "planner": {"ae_title": "PLANNER", "port": healthy.port, **seg_only},
        },
    )
    migrate(settings.database_url)
    sessions = make_session_factory(make_engine(settings.database_url))
    with transaction(sessions) as session:
        series = Series(series_instance_uid="1.2.3", study=Study(study_instance_uid="1.2"), modality="CT")
        job = jobs.open_job(session, series)
        jobs.mark_complete(session, job, "quiet")
        jobs.queue(session, job, rule_name="ct", model_name="baseline", destinations=["stalled", "planner"])
        session.flush()
        assert jobs.claim(session, job, "test-host:1", timedelta(minutes=5))
        jobs.finish_processing(
            session, job, JobState.SENDING, "segmented", result_path=str(seg.parent), result_files=[str(seg)]
        )
        job_id = job.id

    def state() -> JobState:
        with sessions() as session:
            return session.get_one(Job, job_id).state

    dispatcher = Dispatcher(settings, sessions)
    dispatcher.start()
    try:
        wait_for(lambda: state() is JobState.FAILED, timeout=90, interval=0.2, what="the job to fail")
    finally:
        dispatcher.stop()

    assert proxy.stalled.is_set(), "the node's send stopped in the middle of the file"
    assert healthy.acknowledged == [uid]
    with sessions() as session:
        job = session.get_one(Job, job_id)
        record = jobs.delivery_record(job, "stalled")
        assert jobs.delivered_sop_instance_uids(session, job_id, "stalled") == set()
        assert jobs.delivered_sop_instance_uids(session, job_id, "planner") == {uid}
        assert record.attempts == 2
        assert record.last_error is not None
        assert f"STALLED at 127.0.0.1:{proxy.port} stopped taking data for " in record.last_error
        assert "while seg-labelmap.dcm (12.0 MB) was being sent" in record.last_error
        assert "stalled received 0 of 1 file: STALLED at" in (job.reason or "")
    assert not [t for t in threading.enumerate() if t.name.startswith("dispatch-")], "every send thread ended"


def test_sending_to_a_destination_that_stops_reading_ends_and_frees_the_association(tmp_path, peers):
    _, proxy = peers
    seg = tmp_path / "seg-labelmap.dcm"
    large_labelmap_seg(seg)
    destination = Destination(ae_title="STALLED", host="127.0.0.1", port=proxy.port)

    outcomes: list[SendOutcome] = []
    sending = threading.Thread(
        daemon=True, target=lambda: outcomes.append(send_files("DICOMNODE", destination, [str(seg)], NETWORK_TIMEOUT))
    )
    sending.start()
    wait_for(lambda: not sending.is_alive(), timeout=60, what="the send to end")

    (outcome,) = outcomes
    assert outcome.sent == [] and not outcome.unreachable
    assert outcome.error is not None and "stopped taking data for" in outcome.error
    assert not node_side_threads(), "the association's threads ended with the attempt"


def node_side_threads() -> list[threading.Thread]:
    """The threads of associations this process requested (and their watchdogs), still running."""
    return [
        t
        for t in threading.enumerate()
        if t.name == "dispatch-watchdog"
        or (isinstance(t, Association) and t.is_requestor)
        or (isinstance(t, DULServiceProvider) and t.assoc.is_requestor)
    ]
