"""A file in quarantine always gets its ``rejected_instances`` row, even when the process that put it there was
killed between the move (or write) and the commit: start-up repair records it, once."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db import jobs
from db.models import Job, JobState, RejectedInstance, Series, as_utc
from db.session import make_engine, make_session_factory, migrate
from dicom_node import status
from dicom_node.phantom import PhantomSpec, write_phantom_series
from dicom_node.receive.storage import (
    SET_ASIDE_TIME_FORMAT,
    UNRECORDED_QUARANTINE_REASON,
    InstanceStore,
    repair,
)
from tests.conftest import data_set_bytes, wait_for
from tests.test_repair import place_in_storage

SPEC = PhantomSpec(rows=32, columns=32, slices=4, pixel_spacing=(4.0, 4.0), slice_spacing=5.0)


def killed_after_move(store: InstanceStore, stored: Path) -> Path:
    """What ``quarantine_stored_file`` leaves when killed between its ``os.replace`` and its commit."""
    target = store.quarantine_path(".dcm")
    os.replace(stored, target)
    return target


def rows(sessions: sessionmaker[Session]) -> dict[str, RejectedInstance]:
    with sessions() as session:
        return {Path(row.path).name: row for row in session.scalars(select(RejectedInstance)) if row.path}


@pytest.fixture
def state(database_url: str, tmp_path: Path) -> tuple[InstanceStore, sessionmaker[Session]]:
    migrate(database_url)
    return InstanceStore(tmp_path / "storage"), make_session_factory(make_engine(database_url))


def test_files_left_in_quarantine_without_a_row_are_recorded_once(tmp_path, state):
    store, sessions = state
    series = write_phantom_series(tmp_path / "ct", SPEC)
    for source in series.files[:2]:  # the series' stored images, recorded by this start-up's repair
        place_in_storage(store.root, pydicom.dcmread(source))
    refused = killed_after_move(store, place_in_storage(store.root, pydicom.dcmread(series.files[2])))
    os.utime(refused, (1_700_000_000, 1_700_000_000))  # set aside long before this start
    unreadable = store.quarantine_path(".dcm")
    unreadable.write_bytes(b"this is not a DICOM file at all" * 10)
    raw = store.quarantine_path(".raw")  # a refusal's data set as received (no usable UIDs for file meta)
    raw.write_bytes(data_set_bytes(series.files[3]))

    report = repair(store, sessions)

    assert (report.instances_indexed, report.quarantine_files_recorded) == (2, 3)
    recorded = rows(sessions)
    assert set(recorded) == {refused.name, unreadable.name, raw.name}
    row = recorded[refused.name]
    assert row.reason == (
        f"{UNRECORDED_QUARANTINE_REASON}; it holds SOP Instance UID {series.sop_instance_uids[2]} "
        f"of series {series.series_instance_uid}"
    )
    assert row.reason.startswith("found in quarantine at start-up with no record of why: the node stopped")
    assert (row.sop_instance_uid, row.series_instance_uid, row.status) == (
        series.sop_instance_uids[2],
        series.series_instance_uid,
        status.PROCESSING_FAILURE,
    )
    assert as_utc(row.received_at) == datetime.fromtimestamp(1_700_000_000, timezone.utc)  # retention counts from it
    assert recorded[unreadable.name].reason == f"{UNRECORDED_QUARANTINE_REASON}; it is not a readable DICOM file"
    assert recorded[unreadable.name].series_instance_uid is None
    assert recorded[raw.name].reason == (
        f"{UNRECORDED_QUARANTINE_REASON}; it is the data set as received, without file meta information, and names "
        f"SOP Instance UID {series.sop_instance_uids[3]} of series {series.series_instance_uid}"
    )
    assert recorded[raw.name].series_instance_uid == series.series_instance_uid
    assert refused.exists() and unreadable.exists() and raw.exists()  # recorded where they are, nothing deleted

    again = repair(store, sessions)

    assert again.quarantine_files_recorded == 0
    with sessions() as session:
        assert len(session.scalars(select(RejectedInstance.id)).all()) == 3


def test_a_row_naming_the_file_under_a_moved_storage_folder_still_counts(tmp_path, state):
    store, sessions = state
    kept = store.quarantine_path(".dcm")
    kept.write_bytes(b"refused on receipt")
    with sessions.begin() as session:
        session.add(
            RejectedInstance(status=0xA900, reason="refused on receipt", path=f"/old/storage/quarantine/{kept.name}")
        )

    assert repair(store, sessions).quarantine_files_recorded == 0


def test_a_copy_set_aside_by_a_repair_killed_before_its_commit_gets_the_set_aside_row(tmp_path, state):
    """Start-up repair moved a copy naming another series into quarantine (``_keep_first_copy``), then died: no
    journal names that copy, and its series was not re-opened."""
    store, sessions = state
    series = write_phantom_series(tmp_path / "ct", SPEC)
    for source in series.files:
        place_in_storage(store.root, pydicom.dcmread(source))
    repair(store, sessions)
    other = pydicom.dcmread(series.files[0])
    other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    other.SeriesInstanceUID = generate_uid()
    place_in_storage(store.root, other)
    repair(store, sessions)  # series B, with one image
    with sessions.begin() as session:  # series B had completed before the copy came
        job = session.scalars(
            select(Job).join(Job.series).where(Series.series_instance_uid == other.SeriesInstanceUID)
        ).one()
        jobs.mark_complete(session, job, "quiet")
    copy = pydicom.dcmread(series.files[1])  # acknowledged under series B, already stored in series A
    copy.SeriesInstanceUID = other.SeriesInstanceUID
    left = place_in_storage(store.root, copy)
    received = datetime.now(timezone.utc).strftime(SET_ASIDE_TIME_FORMAT)
    set_aside = store.quarantine_dir / f"{other.SeriesInstanceUID}-{copy.SOPInstanceUID}-{received}.dcm"
    os.replace(left, set_aside)  # then killed before the commit

    report = repair(store, sessions)

    assert report.quarantine_files_recorded == 1
    row = rows(sessions)[set_aside.name]
    assert (row.sop_instance_uid, row.series_instance_uid, row.status) == (
        copy.SOPInstanceUID,
        other.SeriesInstanceUID,
        status.SUCCESS,
    )
    assert row.reason == (
        f"SOP Instance UID {copy.SOPInstanceUID} arrived in series {other.SeriesInstanceUID} but is already stored "
        f"in series {series.series_instance_uid}; this copy was acknowledged, then set aside in quarantine, and "
        f"series {other.SeriesInstanceUID} is processed without it"
    )
    with sessions() as session:
        reopened = session.scalars(
            select(Job).join(Job.series).where(Series.series_instance_uid == other.SeriesInstanceUID)
        ).one()
        assert reopened.state is JobState.RECEIVING  # completes again, knowing it lacks the image
    assert repair(store, sessions).quarantine_files_recorded == 0
    assert len(rows(sessions)) == 1


@pytest.mark.integration
def test_a_node_killed_between_quarantine_and_record_marks_the_series_partial_after_restart(tmp_path, start_node):
    """The receiving node was killed while a series arrived: three images acknowledged and on disk, a fourth
    acknowledged, refused by the database and moved to quarantine, its row not yet committed."""
    series = write_phantom_series(tmp_path / "ct", SPEC)
    node = start_node()
    node.stop()
    for source in series.files[:3]:
        place_in_storage(node.storage, pydicom.dcmread(source))
    store = InstanceStore(node.storage)
    quarantined = killed_after_move(store, place_in_storage(node.storage, pydicom.dcmread(series.files[3])))
    store.close()

    node.start()

    wait_for(
        lambda: node.job_state(series.series_instance_uid) not in (None, JobState.RECEIVING),
        timeout=60,
        what="the series completed",
    )
    with node.sessions() as session:
        row = session.scalars(select(RejectedInstance)).one()
        job = session.scalars(
            select(Job).join(Job.series).where(Series.series_instance_uid == series.series_instance_uid)
        ).one()
        warnings = job.warnings or []
    assert Path(row.path) == quarantined and row.series_instance_uid == series.series_instance_uid
    assert row.reason.startswith(UNRECORDED_QUARANTINE_REASON)
    reason = row.reason if len(row.reason) <= 300 else row.reason[:297] + "..."  # as the warning shortens it
    assert [warning for warning in warnings if warning.startswith(jobs.PARTIAL_SERIES_PREFIX)] == [
        f"{jobs.PARTIAL_SERIES_PREFIX} 1 image(s) sent for this series were refused or set aside on receipt and are "
        f"not in it; the result covers the 3 stored (first, SOP Instance UID {series.sop_instance_uids[3]}: {reason})"
    ]
    assert node.log().count("repair.unrecorded_quarantine_file") == 1
    assert node.cli("rejected").stdout.count("0x0110") == 1  # listed for the operator

    node.stop()
    node.start()  # and again: recorded once

    with node.sessions() as session:
        assert len(session.scalars(select(RejectedInstance.id)).all()) == 1
    assert node.log().count("repair.unrecorded_quarantine_file") == 1
