"""Retention: finished series are purged by age or disk budget; unfinished ones never are."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from db import jobs
from db.ingest import InstanceRecord, record_instance, record_rejection
from db.models import (
    STUDY_IDENTITY_COLUMNS,
    AuditEvent,
    ClockDoubt,
    Instance,
    Job,
    JobEvent,
    JobState,
    RejectedInstance,
    Series,
    Study,
    as_utc,
    utcnow,
)
from db.session import make_engine, make_session_factory, migrate, transaction
from dicom_node.config import ConfigError, RetentionSettings, Settings, load_settings
from dicom_node.retention import (
    PurgeOutcome,
    RetentionTask,
    apply_plan,
    confirm_clock,
    newest_recorded_time,
    plan_retention,
    purge_quarantine,
    recorded_before_start,
)
from tests.conftest import DICOM_NODE, ct_instance, drive_job_to, wait_for

STUDY = "1.2.826.0.1.3680043.10.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
NOW = utcnow()  # set afresh before each test (below): the node stamps what it records with the real clock
UNFINISHED = [JobState.RECEIVING, JobState.COMPLETE, JobState.QUEUED, JobState.PROCESSING, JobState.SENDING]


@dataclass
class Stored:
    """One received series as written by the helper: its files and its job."""

    uid: str
    job_id: int
    images: list[Path]
    results: Path | None


@pytest.fixture(autouse=True)
def _now_is_now() -> None:
    """``NOW`` as each test starts, not as the module was imported: a test that runs an hour into the suite compares
    the times it sets against the ones the node records at the real clock."""
    global NOW
    NOW = utcnow()


@pytest.fixture
def node(tmp_path, database_url) -> tuple[Settings, sessionmaker[Session]]:
    """Settings and sessions of a node's database: each test runs on SQLite and on PostgreSQL."""
    settings = Settings(storage={"directory": tmp_path / "storage"}, database={"url": database_url})
    migrate(settings.database_url)
    return settings, make_session_factory(make_engine(settings.database_url))


@pytest.fixture
def pg_node(tmp_path, postgresql_url) -> tuple[Settings, sessionmaker[Session]]:
    """The same on PostgreSQL only, for the races SQLite cannot have (its writers take turns)."""
    settings = Settings(storage={"directory": tmp_path / "storage"}, database={"url": postgresql_url})
    migrate(settings.database_url)
    return settings, make_session_factory(make_engine(settings.database_url))


def add_series(
    node: tuple[Settings, sessionmaker[Session]],
    uid: str,
    state: JobState,
    days_ago: float,
    *,
    images: int = 2,
    image_bytes: int = 1000,
    results: bool = True,
) -> Stored:
    """A received series with real files, its job put in ``state`` ``days_ago``, and (optionally) results."""
    settings, sessions = node
    folder = settings.storage.directory / "instances" / STUDY / uid
    folder.mkdir(parents=True)
    files = []
    with transaction(sessions) as session:
        for n in range(1, images + 1):
            path = folder / f"{uid}.{n}.dcm"
            path.write_bytes(b"\0" * image_bytes)
            files.append(path)
            record_instance(session, _record(f"{uid}.{n}", uid, path))
        job = session.scalars(select(Job).join(Job.series).where(Series.series_instance_uid == uid)).one()
        drive_job_to(session, job, state)
        job.state_changed_at = NOW - timedelta(days=days_ago)
        session.flush()
        result_folder = _add_results(session, settings, job) if results else None
        return Stored(uid, job.id, files, result_folder)


def _record(sop_uid: str, series_uid: str, path: Path) -> InstanceRecord:
    return ct_instance(sop_uid, series_uid, study_instance_uid=STUDY, path=path)


def _add_results(session: Session, settings: Settings, job: Job) -> Path:
    """The job folder a worker leaves, with a SEG indexed as a result series of the job."""
    folder = settings.jobs_directory / str(job.id)
    folder.mkdir(parents=True)
    for name in ("labels.nii.gz", "measurements.json", "segmentation.json", "preview.png"):
        (folder / name).write_bytes(b"\0" * 100)
    seg = folder / "seg-binary.dcm"
    seg.write_bytes(b"\0" * 500)
    study = session.scalars(select(Study).where(Study.study_instance_uid == STUDY)).one()
    result = Series(
        series_instance_uid=f"{job.series.series_instance_uid}.9701",
        study=study,
        modality="SEG",
        source_job_id=job.id,
        instance_count=1,
    )
    session.add(
        Instance(
            series=result,
            sop_instance_uid=f"{job.series.series_instance_uid}.9701.1",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            path=str(seg),
            size_bytes=500,
        )
    )
    job.result_path = str(folder)
    job.result_files = [str(seg)]
    return folder


def purge(node: tuple[Settings, sessionmaker[Session]], **retention: float) -> list[str]:
    """Plan and apply retention; the UIDs of the series purged."""
    settings, sessions = node
    with sessions() as session:
        plan = plan_retention(session, RetentionSettings(**retention), NOW)
    return [item.series_instance_uid for item in apply_plan(sessions, settings, plan, NOW).purged]


def instance_rows(sessions: sessionmaker[Session], series_uid: str) -> int:
    with sessions() as session:
        query = select(func.count()).select_from(Instance).join(Instance.series)
        return session.scalar(query.where(Series.series_instance_uid == series_uid)) or 0


def test_old_done_series_is_purged_with_its_results_and_keeps_its_history(node):
    settings, sessions = node
    old = add_series(node, "1.2.3.1", JobState.DONE, days_ago=10)
    recent = add_series(node, "1.2.3.2", JobState.DONE, days_ago=1)

    assert purge(node, days=7) == [old.uid]

    assert not any(path.exists() for path in old.images)
    assert not (settings.storage.directory / "instances" / STUDY / old.uid).exists()
    assert not old.results.exists()
    assert all(path.exists() for path in recent.images) and recent.results.is_dir()
    assert instance_rows(sessions, old.uid) == 0 and instance_rows(sessions, f"{old.uid}.9701") == 0
    with sessions() as session:
        job = session.get_one(Job, old.job_id)
        result = session.scalars(select(Series).where(Series.source_job_id == old.job_id)).one()
        assert job.state is JobState.DONE and job.series.purged_at is not None and result.purged_at is not None
        assert job.series.instance_count == 0 and job.result_files is None
        assert session.scalar(select(func.count()).select_from(JobEvent).where(JobEvent.job_id == old.job_id)) >= 1
        assert session.scalar(select(func.count()).select_from(Study)) == 1


@pytest.mark.parametrize("state", UNFINISHED)
def test_unfinished_series_is_never_purged_however_old_or_over_budget(node, state):
    busy = add_series(node, "1.2.3.1", state, days_ago=400)

    assert purge(node, days=1, max_disk_gigabytes=1e-9) == []

    assert all(path.exists() for path in busy.images) and busy.results.is_dir()
    assert instance_rows(node[1], busy.uid) == 2


def test_disk_budget_purges_the_oldest_finished_series_first(node):
    busy = add_series(node, "1.2.3.1", JobState.QUEUED, days_ago=30, results=False)
    oldest = add_series(node, "1.2.3.2", JobState.IGNORED, days_ago=20, results=False)
    older = add_series(node, "1.2.3.3", JobState.DONE, days_ago=10)
    newest = add_series(node, "1.2.3.4", JobState.DONE, days_ago=1)
    # 2000 B of images each, 900 B of results for the last two: 9800 B in all.

    assert purge(node, max_disk_gigabytes=5000e-9) == [oldest.uid, older.uid]

    assert all(path.exists() for path in busy.images + newest.images)
    assert not any(path.exists() for path in oldest.images + older.images) and not older.results.exists()


def test_disk_budget_purges_failed_series_only_after_every_done_and_ignored_one(node):
    """A FAILED series may wait for `dicom-node retry` once its destination is back: older or not, it goes last."""
    failed = add_series(node, "1.2.3.1", JobState.FAILED, days_ago=30)
    older = add_series(node, "1.2.3.2", JobState.IGNORED, days_ago=20, results=False)
    newest = add_series(node, "1.2.3.3", JobState.DONE, days_ago=1)
    # 2900 + 2000 + 2900 B: 7800 B in all.

    assert purge(node, max_disk_gigabytes=3000e-9) == [older.uid, newest.uid]
    assert all(path.exists() for path in failed.images) and failed.results.is_dir()

    assert purge(node, max_disk_gigabytes=1000e-9) == [failed.uid]  # the budget still exceeded: its turn


def test_plan_says_what_unfinished_series_keep_over_the_budget(node):
    add_series(node, "1.2.3.1", JobState.PROCESSING, days_ago=30, image_bytes=5000)
    add_series(node, "1.2.3.2", JobState.DONE, days_ago=20)
    with node[1]() as session:
        plan = plan_retention(session, RetentionSettings(max_disk_gigabytes=2000e-9), NOW)

    assert [item.series_instance_uid for item in plan.items] == ["1.2.3.2"]
    assert plan.items[0].reason == "disk budget 2.0 kB exceeded: 13.8 kB used"
    assert plan.bytes_freed == 2900 and plan.over_budget_bytes == 13800 - 2900 - 2000
    assert plan.shortfall() == (
        "still 8.9 kB over the 2.0 kB disk budget: 10.9 kB is held by 1 series not finished yet, which are never purged"
    )


def test_what_attempts_killed_part_way_wrote_goes_with_the_images_of_a_failed_series(node):
    """A job failed at the crash limit (its worker killed in each attempt) published no results, but each attempt
    left a folder with a SEG naming the patient: the purge deletes them with the images. A job whose results are
    kept longer keeps its published folder."""
    settings, _sessions = node
    failed = add_series(node, "1.2.3.1", JobState.FAILED, days_ago=10, results=False)
    kept = add_series(node, "1.2.3.2", JobState.DONE, days_ago=10)
    job_folder = settings.jobs_directory / str(failed.job_id)
    for attempt in (".claim-1-ab12cd", ".claim-2-ef34gh"):
        (job_folder / attempt).mkdir(parents=True)
        (job_folder / attempt / "seg-binary.dcm").write_bytes(b"\0" * 500)
    (kept.results / ".claim-3-ij56kl").mkdir()  # left by an earlier attempt, beside the published results

    assert sorted(purge(node, days=7, results_days=30)) == [failed.uid, kept.uid]

    assert not job_folder.exists()
    assert kept.results.is_dir() and (kept.results / "seg-binary.dcm").is_file()
    assert not (kept.results / ".claim-3-ij56kl").exists()


def test_attempts_left_inside_a_purged_job_folder_are_no_failure(node):
    """A DONE job's folder holding an earlier attempt's folder goes whole with its images and results: the attempt
    went with it, which is no file the purge "could not delete"."""
    done = add_series(node, "1.2.3.9", JobState.DONE, days_ago=10)
    (done.results / ".claim-3-ij56kl").mkdir()
    (done.results / ".claim-3-ij56kl" / "seg-binary.dcm").write_bytes(b"\0" * 500)

    assert purge(node, days=7) == [done.uid]

    assert not done.results.exists()


def test_results_can_be_kept_longer_than_images(node):
    middle = add_series(node, "1.2.3.1", JobState.DONE, days_ago=10)
    old = add_series(node, "1.2.3.2", JobState.DONE, days_ago=40)
    with node[1]() as session:
        plan = plan_retention(session, RetentionSettings(days=7, results_days=30), NOW)
    assert [(i.series_instance_uid, i.images, i.results) for i in plan.items] == [
        (old.uid, True, True),
        (middle.uid, True, False),
    ]
    assert plan.items[1].reason == "images older than 7 days"

    purge(node, days=7, results_days=30)

    assert not any(path.exists() for path in middle.images + old.images)
    assert middle.results.is_dir() and not old.results.exists()
    assert purge(node, days=7, results_days=30) == []  # nothing left to purge
    assert purge(node, days=7, results_days=5) == [middle.uid]
    assert not middle.results.exists()


def test_series_reopened_after_planning_is_left_alone(node):
    settings, sessions = node
    stored = add_series(node, "1.2.3.1", JobState.DONE, days_ago=10)
    with sessions() as session:
        plan = plan_retention(session, RetentionSettings(days=7), NOW)
    with transaction(sessions) as session:
        jobs.reopen(session, session.get_one(Job, stored.job_id))

    outcome = apply_plan(sessions, settings, plan, NOW)

    assert outcome.purged == [] and "now RECEIVING" in outcome.skipped[0][1]
    assert all(path.exists() for path in stored.images) and stored.results.is_dir()


def test_retention_task_purges_in_the_background_and_stops(node):
    settings, sessions = node
    settings.retention = RetentionSettings(days=7, check_interval_seconds=0.1)
    stored = add_series(node, "1.2.3.1", JobState.DONE, days_ago=10)
    task = RetentionTask(settings, sessions)
    task.start()
    try:
        wait_for(lambda: not stored.results.exists(), timeout=10, what="the retention pass")
    finally:
        task.stop()
    assert not any(path.exists() for path in stored.images)


def _audit_records(sessions: sessionmaker[Session], *at: datetime) -> int:
    """Add an audit record written at each of ``at``; how many the database holds then."""
    with transaction(sessions) as session:
        session.add_all(AuditEvent(at=moment, action="echo", outcome="success") for moment in at)
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(AuditEvent)) or 0


def test_a_clock_jumped_forward_while_the_node_runs_deletes_nothing_by_age_until_it_is_set_right(node, caplog):
    settings, sessions = node
    settings.retention = RetentionSettings(days=30, audit_days=365)
    recent = add_series(node, "1.2.3.1", JobState.DONE, days_ago=1)
    task = RetentionTask(settings, sessions)
    assert task.run_once(NOW).purged == []  # the pass the jump is measured from
    old = add_series(node, "1.2.3.2", JobState.DONE, days_ago=40)
    jumped = NOW + timedelta(days=400)
    held = _audit_records(sessions, NOW, jumped)  # images and associations go on, written at the jumped time

    with caplog.at_level(logging.INFO, logger="dicom_node.retention"):
        assert task.run_once(jumped).purged == []
        assert task.run_once(jumped + timedelta(minutes=10)).purged == []  # one warning, not one a pass
        outcome = task.run_once(NOW + timedelta(minutes=20))  # the clock set right: ages count again

    assert [item.series_instance_uid for item in outcome.purged] == [old.uid]
    assert all(path.exists() for path in recent.images) and _audit_records(sessions) == held
    (doubted,) = [r for r in caplog.records if r.getMessage() == "retention.clock_doubted"]
    assert doubted.levelno == logging.WARNING
    assert re.fullmatch(
        r"the clock reads [-\d]+ [:\d]+ UTC, 400\.0 days on from the last retention pass \([-\d]+ [:\d]+ UTC\) "
        r"although only 0\.0 days passed since, and the newest time the database records is [-\d]+ [:\d]+ UTC; "
        r"retention deletes nothing by age \(the disk budget still applies\) until the clock agrees again: .*",
        doubted.event_fields["reason"],
    )
    assert [r.getMessage() for r in caplog.records].count("retention.clock_trusted") == 1


def test_a_clock_far_past_every_time_the_database_records_deletes_by_disk_budget_only(node, caplog):
    """A node started with its clock 400 days ahead (a bad hardware clock): no pass of this node to measure from."""
    settings, sessions = node
    older = add_series(node, "1.2.3.1", JobState.DONE, days_ago=2)
    newer = add_series(node, "1.2.3.2", JobState.DONE, days_ago=1)  # 2900 bytes each with its results
    settings.retention = RetentionSettings(days=30, audit_days=365, max_disk_gigabytes=3000 / 1e9)
    held = _audit_records(sessions, NOW)

    with caplog.at_level(logging.WARNING, logger="dicom_node.retention"):
        outcome = RetentionTask(settings, sessions).run_once(NOW + timedelta(days=400))

    assert [(item.series_instance_uid, item.reason) for item in outcome.purged] == [
        (older.uid, "disk budget 3.0 kB exceeded: 5.8 kB used")
    ]
    assert all(path.exists() for path in newer.images) and _audit_records(sessions) == held
    (doubted,) = [r for r in caplog.records if r.getMessage() == "retention.clock_doubted"]
    assert re.match(
        r"the clock reads [-\d]+ [:\d]+ UTC, 400\.0 days past the newest time the database recorded before this "
        r"node started \([-\d]+ [:\d]+ UTC: its last image received, job change or audit record\) although only "
        r"0\.0 days passed since; retention deletes nothing by age",
        doubted.event_fields["reason"],
    )


def test_a_node_started_with_its_clock_far_ahead_deletes_nothing_by_age_whatever_it_records_meanwhile(
    node, caplog, monkeypatch
):
    """A PACS' C-ECHO, the first image, start-up's requeue or a worker host's job change, all written at the bad clock,
    must not vouch for it: the node judges its clock by what the database recorded before it started."""
    settings, sessions = node
    steady = [1000.0]
    monkeypatch.setattr("dicom_node.retention.steady_seconds", lambda: steady[0])
    recent = add_series(node, "1.2.3.1", JobState.DONE, days_ago=1)
    old = add_series(node, "1.2.3.2", JobState.DONE, days_ago=40)
    settings.retention = RetentionSettings(days=30, audit_days=365)
    _audit_records(sessions, NOW)
    before_start = recorded_before_start(sessions)  # as serve reads it, before it repairs storage or receives
    bad = NOW + timedelta(days=400)  # the hardware clock at boot
    add_series(node, "1.2.3.3", JobState.DONE, days_ago=-400)  # start-up requeue, or a worker host's job change
    task = RetentionTask(settings, sessions, before_start)

    with caplog.at_level(logging.INFO, logger="dicom_node.retention"):
        assert task.run_once(bad).purged == []
        held = _audit_records(sessions, bad + timedelta(minutes=1))  # the PACS' C-ECHO heartbeat
        steady[0] += 120
        assert task.run_once(bad + timedelta(minutes=2)).purged == []
        steady[0] += 86400  # a day on, echoes all the while: still in doubt, and warned again
        held = _audit_records(sessions, bad + timedelta(days=1))
        assert task.run_once(bad + timedelta(days=1, minutes=2)).purged == []
        assert all(path.exists() for path in recent.images + old.images) and _audit_records(sessions) == held
        doubted = [r for r in caplog.records if r.getMessage() == "retention.clock_doubted"]
        assert [r.levelno for r in doubted] == [logging.WARNING, logging.WARNING]
        assert (
            "400.0 days past the newest time the database recorded before this node started"
            in (doubted[0].event_fields["reason"])
        )
        assert "although only 1.0 days passed since" in doubted[1].event_fields["reason"]

        steady[0] += 60
        outcome = task.run_once(NOW + timedelta(days=1, minutes=3))  # the clock set right: ages count again

    assert [item.series_instance_uid for item in outcome.purged] == [old.uid]
    assert all(path.exists() for path in recent.images)
    assert [r.getMessage() for r in caplog.records].count("retention.clock_trusted") == 1


def test_a_clock_set_back_deletes_no_more_and_is_not_doubted_once_set_right_again(node, caplog):
    settings, sessions = node
    old = add_series(node, "1.2.3.1", JobState.DONE, days_ago=40)
    older = add_series(node, "1.2.3.2", JobState.DONE, days_ago=45)
    settings.retention = RetentionSettings(days=30, audit_days=365)
    held = _audit_records(sessions, NOW - timedelta(days=300))
    task = RetentionTask(settings, sessions)

    with caplog.at_level(logging.INFO, logger="dicom_node.retention"):
        set_back = task.run_once(NOW - timedelta(days=12))  # 12 days behind: everything looks younger
        set_right = task.run_once(NOW)  # 12 days on from the last pass at once: the clock agrees with the records

    assert [item.series_instance_uid for item in set_back.purged] == [older.uid]
    assert [item.series_instance_uid for item in set_right.purged] == [old.uid]
    assert _audit_records(sessions) == held  # 300 days old: kept for 365
    assert "retention.clock_doubted" not in [r.getMessage() for r in caplog.records]


def test_a_restart_with_the_clock_set_right_deletes_by_age_again(node):
    settings, sessions = node
    recent = add_series(node, "1.2.3.1", JobState.DONE, days_ago=1)
    old = add_series(node, "1.2.3.2", JobState.DONE, days_ago=40)
    settings.retention = RetentionSettings(days=30)
    bad = NOW + timedelta(days=400)
    assert RetentionTask(settings, sessions).run_once(bad).purged == []
    _audit_records(sessions, bad)  # recorded at the wrong time before the clock was set right

    outcome = RetentionTask(settings, sessions).run_once(NOW)  # restarted with the right clock

    assert [item.series_instance_uid for item in outcome.purged] == [old.uid]
    assert all(path.exists() for path in recent.images)


def _clock_doubt(sessions: sessionmaker[Session]) -> ClockDoubt | None:
    with sessions() as session:
        return session.get(ClockDoubt, 1)


def _warnings(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    return [r.event_fields["reason"] for r in caplog.records if r.getMessage() == event]


def test_a_restart_with_the_clock_still_far_ahead_deletes_nothing_by_age_and_says_so(node, caplog, monkeypatch):
    """The doubt is kept in the database: what the node recorded while it doubted its clock (a PACS' C-ECHO, an
    image, a job change), all stamped with the wrong time, must not vouch for the clock after a crash, a systemd
    restart or an upgrade, however many restarts in a row."""
    settings, sessions = node
    steady = [1000.0]
    monkeypatch.setattr("dicom_node.retention.steady_seconds", lambda: steady[0])
    recent = add_series(node, "1.2.3.1", JobState.DONE, days_ago=1)
    old = add_series(node, "1.2.3.2", JobState.DONE, days_ago=40)
    settings.retention = RetentionSettings(days=30, audit_days=365)
    _audit_records(sessions, NOW - timedelta(hours=1))
    bad = NOW + timedelta(days=400)  # a bad hardware clock at boot
    with sessions() as session:
        newest_before = newest_recorded_time(session)

    first = RetentionTask(settings, sessions, recorded_before_start(sessions, bad))
    assert first.run_once(bad).purged == []
    add_series(node, "1.2.3.3", JobState.DONE, days_ago=-400)  # a job finished at the bad clock
    held = _audit_records(sessions, bad + timedelta(minutes=5))  # a PACS' C-ECHO at the bad clock
    steady[0] += 3600
    assert first.run_once(bad + timedelta(hours=1)).purged == []
    recorded = _clock_doubt(sessions)
    assert recorded is not None and recorded.counted_seconds == 3600

    # restarted twice in a row (the host rebooted: its steady clock starts again), the clock still 400 days ahead
    steady[0] = 5.0
    recorded_before_start(sessions, bad + timedelta(hours=2))  # a start that crashed before its first pass
    steady[0] = 7.0
    with caplog.at_level(logging.INFO, logger="dicom_node.retention"):
        caplog.clear()  # what the restart logs
        third = RetentionTask(settings, sessions, recorded_before_start(sessions, bad + timedelta(hours=2)))
        outcome = third.run_once(bad + timedelta(hours=2))
        held = _audit_records(sessions, bad + timedelta(hours=2, minutes=1))
        steady[0] += 600
        assert third.run_once(bad + timedelta(hours=2, minutes=10)).purged == []

    assert outcome.purged == []
    assert all(path.exists() for path in recent.images + old.images) and _audit_records(sessions) == held
    (doubted,) = _warnings(caplog, "retention.clock_doubted")
    assert re.match(
        r"the clock reads [-\d]+ [:\d]+ UTC, 400\.1 days past the newest time the database recorded before the "
        r"clock was first doubted \([-\d]+ [:\d]+ UTC: its last image received, job change or audit record\) "
        r"although the node has run only 0\.0 days since; the clock has been doubted since it read "
        + re.escape(f"{bad:%Y-%m-%d %H:%M} UTC")
        + r", and what the node recorded since then, at that clock, does not vouch for it, nor does a restart; "
        r"retention deletes nothing by age \(the disk budget still applies\) until the clock agrees again: if it is "
        r"wrong \(.*\), set it right; if it is right \(.*\), run `dicom-node purge`: .*",
        doubted,
    )
    assert "retention.clock_trusted" not in [r.getMessage() for r in caplog.records]
    kept = _clock_doubt(sessions)
    assert kept is not None and kept.counted_seconds == 3600 + 600  # each run's time in doubt, none counted twice
    assert as_utc(kept.trusted_at) == newest_before  # judged by what was recorded before the doubt began


def test_a_clock_set_right_while_the_node_was_stopped_ends_the_doubt_and_ages_count_again(node, caplog, monkeypatch):
    """The node ran in doubt for two days, was stopped an hour, and its clock set right meanwhile: its next start
    trusts the clock (two days of running counted since the doubt began), deletes the recorded doubt and deletes by
    age again; and so does every start after it, though the records of the doubt still read 400 days ahead."""
    settings, sessions = node
    steady = [1000.0]
    monkeypatch.setattr("dicom_node.retention.steady_seconds", lambda: steady[0])
    recent = add_series(node, "1.2.3.1", JobState.DONE, days_ago=1)
    old = add_series(node, "1.2.3.2", JobState.DONE, days_ago=40)
    settings.retention = RetentionSettings(days=30, audit_days=365)
    _audit_records(sessions, NOW)
    bad = NOW + timedelta(days=400)
    doubting = RetentionTask(settings, sessions, recorded_before_start(sessions, bad))
    assert doubting.run_once(bad).purged == []
    steady[0] += 2 * 86400
    held = _audit_records(sessions, bad + timedelta(days=2))
    assert doubting.run_once(bad + timedelta(days=2)).purged == []

    steady[0] = 5.0  # rebooted with the clock set right, an hour after it stopped
    right = NOW + timedelta(days=2, hours=1)
    with caplog.at_level(logging.INFO, logger="dicom_node.retention"):
        caplog.clear()  # what the restart logs
        outcome = RetentionTask(settings, sessions, recorded_before_start(sessions, right)).run_once(right)

    assert [item.series_instance_uid for item in outcome.purged] == [old.uid]
    assert all(path.exists() for path in recent.images) and _audit_records(sessions) == held
    assert _clock_doubt(sessions) is None
    assert "retention.clock_doubted" not in [r.getMessage() for r in caplog.records]
    (trusted,) = _warnings(caplog, "retention.clock_trusted")
    assert trusted.endswith("agrees with the node's records again: retention deletes by age")

    older = add_series(node, "1.2.3.3", JobState.DONE, days_ago=35)
    steady[0] = 5.0  # and restarted once more: the records of the doubt, far ahead, only look younger
    later = right + timedelta(minutes=5)
    outcome = RetentionTask(settings, sessions, recorded_before_start(sessions, later)).run_once(later)
    assert [item.series_instance_uid for item in outcome.purged] == [older.uid]
    assert _clock_doubt(sessions) is None


def test_the_operator_confirms_a_doubted_clock_with_purge_and_serve_deletes_by_age_again(node, caplog):
    """A node switched off over a long weekend cannot tell that from a wrong clock: it doubts the clock, in this run
    and after restarts, until the operator confirms it."""
    settings, sessions = node
    recent = add_series(node, "1.2.3.1", JobState.DONE, days_ago=1)
    old = add_series(node, "1.2.3.2", JobState.DONE, days_ago=40)
    settings.retention = RetentionSettings(days=30)
    assert confirm_clock(sessions) is None  # nothing doubted: nothing to say
    monday = NOW + timedelta(days=3)
    task = RetentionTask(settings, sessions, recorded_before_start(sessions, monday))
    assert task.run_once(monday).purged == []
    restarted = RetentionTask(settings, sessions, recorded_before_start(sessions, monday + timedelta(minutes=1)))
    assert restarted.run_once(monday + timedelta(minutes=1)).purged == []

    confirmed = confirm_clock(sessions, monday + timedelta(minutes=2))
    assert confirmed is not None and re.fullmatch(
        r"the clock \([-\d]+ [:\d]+ UTC\), which retention had doubted since it read [-\d]+ [:\d]+ UTC, is trusted "
        r"again on the operator's word: serve deletes finished series, refused instances and audit records by age "
        r"again from its next retention pass",
        confirmed,
    )
    with caplog.at_level(logging.INFO, logger="dicom_node.retention"):
        caplog.clear()  # what the next pass logs
        outcome = restarted.run_once(monday + timedelta(minutes=10))
    assert [item.series_instance_uid for item in outcome.purged] == [old.uid]
    assert all(path.exists() for path in recent.images) and _clock_doubt(sessions) is None
    (trusted,) = _warnings(caplog, "retention.clock_trusted")
    assert "the operator confirmed the clock" in trusted


def test_a_doubt_found_after_days_switched_off_ends_once_the_node_has_run_that_long(node, caplog, monkeypatch):
    """A node off over a long weekend cannot tell that from a clock 3 days ahead: it keeps nothing by age from being
    kept for 3 days of running (over restarts), then deletes by age again on its own; a clock 400 days ahead stays
    doubted that long. Before, only `dicom-node purge` ended such a doubt: retention by age stopped for good."""
    settings, sessions = node
    steady = [1000.0]
    monkeypatch.setattr("dicom_node.retention.steady_seconds", lambda: steady[0])
    old = add_series(node, "1.2.3.2", JobState.DONE, days_ago=40)
    settings.retention = RetentionSettings(days=30)
    monday = NOW + timedelta(days=3)
    task = RetentionTask(settings, sessions, recorded_before_start(sessions, monday))
    with caplog.at_level(logging.WARNING, logger="dicom_node.retention"):
        assert task.run_once(monday).purged == []
    (said,) = _warnings(caplog, "retention.clock_doubted")
    assert said.endswith(
        "; without either, deletions by age resume on their own once the node has run in doubt as long as the clock "
        "jumped (3.0 days: 3.0 days from now), as after a node switched off that long"
    ), said
    steady[0] += 2 * 86400  # two days of running, then a restart (the host's steady clock starts again)
    assert task.run_once(monday + timedelta(days=2)).purged == []
    steady[0] = 5.0
    restarted = RetentionTask(settings, sessions, recorded_before_start(sessions, monday + timedelta(days=2)))
    assert restarted.run_once(monday + timedelta(days=2)).purged == []
    steady[0] += 86400 + 60  # the third day
    with caplog.at_level(logging.INFO, logger="dicom_node.retention"):
        caplog.clear()
        outcome = restarted.run_once(monday + timedelta(days=3, seconds=60))
    assert [item.series_instance_uid for item in outcome.purged] == [old.uid]
    assert _clock_doubt(sessions) is None
    (trusted,) = [r.event_fields["reason"] for r in caplog.records if r.getMessage() == "retention.clock_trusted"]
    assert "the node has run 3.0 days in doubt of its clock, as long as the clock had jumped (3.0 days)" in trusted


def test_dicom_node_purge_confirms_a_doubted_clock_and_a_dry_run_does_not(tmp_path):
    """The doubt's log line tells the operator to run `dicom-node purge` where the clock is right: the command ends
    the doubt, says so and audits it; `--dry-run` confirms nothing."""
    from typer.testing import CliRunner

    from dicom_node.cli import app

    storage = tmp_path / "storage"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"storage": {"directory": str(storage)}, "retention": {"days": 30}}))
    settings = load_settings(config)
    migrate(settings.database_url)
    sessions = make_session_factory(make_engine(settings.database_url))
    add_series((settings, sessions), "1.2.3.1", JobState.DONE, days_ago=1)
    recorded_before_start(sessions, NOW + timedelta(days=3))  # started after a long weekend off: doubted
    assert _clock_doubt(sessions) is not None

    dry = CliRunner().invoke(app, ["purge", "--dry-run", "--config", str(config)])
    assert dry.exit_code == 0 and "operator's word" not in dry.stdout and _clock_doubt(sessions) is not None
    purged = CliRunner().invoke(app, ["purge", "--config", str(config)])
    assert purged.exit_code == 0, purged.stdout + purged.stderr
    assert "is trusted again on the operator's word" in " ".join(purged.stdout.split())
    assert _clock_doubt(sessions) is None
    with sessions() as session:
        details = session.scalars(select(AuditEvent.detail).where(AuditEvent.action == "operator")).all()
    assert any("trusted again on the operator's word" in (detail or "") for detail in details), details


def test_retention_settings_are_validated_and_read_from_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"retention": {"days": 0}}))
    with pytest.raises(ConfigError, match=r"retention\.days: Input should be greater than 0"):
        load_settings(path)
    monkeypatch.setenv("DICOM_NODE_RETENTION__MAX_DISK_GIGABYTES", "250")
    path.write_text(yaml.safe_dump({"retention": {"days": 7}}))
    settings = load_settings(path)
    assert (settings.retention.days, settings.retention.max_disk_gigabytes) == (7, 250)
    assert not load_settings(tmp_path / "config.yaml").retention.results_days


def cli(node: tuple[Settings, sessionmaker[Session]], tmp_path: Path, *args: str, **retention: float):
    config = tmp_path / "config.yaml"
    data = {
        "storage": {"directory": str(node[0].storage.directory)},
        "database": {"url": node[0].database_url},
        "retention": retention,
    }
    config.write_text(yaml.safe_dump(data))
    return subprocess.run([DICOM_NODE, "purge", *args, "--config", str(config)], capture_output=True, text=True)


def test_purge_dry_run_prints_the_plan_and_deletes_nothing(node, tmp_path):
    old = add_series(node, "1.2.3.1", JobState.DONE, days_ago=10)
    add_series(node, "1.2.3.2", JobState.SENDING, days_ago=10)

    result = cli(node, tmp_path, "--dry-run", days=7)

    assert result.returncode == 0, result.stderr
    assert "would purge (dry run: nothing deleted)" in result.stdout
    assert old.uid in result.stdout and "1.2.3.2" not in result.stdout
    assert "older than 7 days" in result.stdout and "images + results" in result.stdout
    assert "would free 2.9 kB from 1 series" in result.stdout
    assert all(path.exists() for path in old.images) and old.results.is_dir()
    assert instance_rows(node[1], old.uid) == 2


def test_purge_deletes_what_it_prints(node, tmp_path):
    old = add_series(node, "1.2.3.1", JobState.DONE, days_ago=10)

    result = cli(node, tmp_path, "--days", "7")  # no retention configured: the option alone

    assert result.returncode == 0, result.stderr
    assert "freed 2.9 kB from 1 series" in result.stdout and old.uid in result.stdout
    assert not any(path.exists() for path in old.images) and not old.results.exists()
    assert instance_rows(node[1], old.uid) == 0


def test_purge_without_retention_configured_says_so(node, tmp_path):
    old = add_series(node, "1.2.3.1", JobState.DONE, days_ago=1000)

    result = cli(node, tmp_path)

    assert result.returncode == 0, result.stderr
    assert "retention is not configured" in result.stdout
    assert all(path.exists() for path in old.images)


def test_purge_of_one_series_takes_it_whatever_its_age_and_refuses_one_in_progress(node, tmp_path):
    recent = add_series(node, "1.2.3.1", JobState.DONE, days_ago=0.01)
    other = add_series(node, "1.2.3.2", JobState.DONE, days_ago=0.01)
    add_series(node, "1.2.3.3", JobState.PROCESSING, days_ago=10)

    result = cli(node, tmp_path, "--series", recent.uid)  # no retention configured: not needed for one series

    assert result.returncode == 0, result.stderr
    assert "requested by the operator (dicom-node purge --series)" in result.stdout
    assert not any(path.exists() for path in recent.images) and not recent.results.exists()
    assert all(path.exists() for path in other.images)
    busy = cli(node, tmp_path, "--series", "1.2.3.3")
    unknown = cli(node, tmp_path, "--series", "9.9.9")
    assert busy.returncode == 1 and "series 1.2.3.3 is PROCESSING; only DONE, FAILED or IGNORED" in busy.stderr
    assert unknown.returncode == 1 and "the node holds no received series 9.9.9" in unknown.stderr


def test_a_purged_series_sent_again_is_held_again_and_cannot_be_retried_while_purged(node):
    settings, sessions = node
    old = add_series(node, "1.2.3.1", JobState.DONE, days_ago=10)
    assert purge(node, days=7) == [old.uid]
    with transaction(sessions) as session:
        job = session.get_one(Job, old.job_id)
        with pytest.raises(jobs.InvalidTransition, match="images were purged"):
            jobs.retry(session, job)

    again = settings.storage.directory / "again.dcm"
    again.write_bytes(b"\0" * 10)
    with transaction(sessions) as session:
        record_instance(session, _record(f"{old.uid}.1", old.uid, again))
    with sessions() as session:
        job = session.get_one(Job, old.job_id)
        assert job.series.purged_at is None and job.state is JobState.RECEIVING


def _study(sessions: sessionmaker[Session]) -> Study:
    with sessions() as session:
        return session.scalars(select(Study).where(Study.study_instance_uid == STUDY)).one()


def test_a_study_keeps_no_patient_identity_once_all_its_series_are_purged(node):
    _settings, sessions = node
    add_series(node, "1.2.3.1", JobState.DONE, days_ago=10)
    add_series(node, "1.2.3.2", JobState.DONE, days_ago=1)
    with transaction(sessions) as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == STUDY)).one()
        study.patient_name, study.patient_id, study.patient_birth_date = "Doe^Jane", "PID-7", "19700101"
        study.accession_number, study.referring_physician_name = "ACC1", "Who^Doctor"

    assert purge(node, days=7) == ["1.2.3.1"]
    assert _study(sessions).patient_name == "Doe^Jane"  # one series still held

    assert purge(node, days=0.5) == ["1.2.3.2"]
    study = _study(sessions)
    assert study.study_instance_uid == STUDY
    assert all(getattr(study, column) is None for column in STUDY_IDENTITY_COLUMNS)


def test_refused_instances_are_purged_by_their_own_age(node):
    settings, sessions = node
    quarantine = settings.storage.directory / "quarantine"
    quarantine.mkdir(parents=True, exist_ok=True)
    old_file, new_file, orphan = quarantine / "old.dcm", quarantine / "new.dcm", quarantine / "orphan.raw"
    set_aside_twice = quarantine / "1.2.3.2-1.2.3.9.dcm"  # a copy set aside 40 days ago and again yesterday
    for path in (old_file, new_file, orphan, set_aside_twice):
        path.write_bytes(b"junk")
    os.utime(orphan, (NOW.timestamp() - 40 * 86400,) * 2)
    with transaction(sessions) as session:
        for path, days in ((old_file, 40), (new_file, 1), (set_aside_twice, 40), (set_aside_twice, 1)):
            record_rejection(
                session,
                status=0xC000,
                reason="not a DICOM data set",
                path=str(path),
                sop_instance_uid=None,
                sop_class_uid=None,
                transfer_syntax_uid=None,
                calling_ae_title="PACS",
            )
            session.flush()
            newest = session.scalars(
                select(RejectedInstance).where(RejectedInstance.path == str(path)).order_by(RejectedInstance.id.desc())
            ).first()
            newest.received_at = NOW - timedelta(days=days)

    removed = purge_quarantine(sessions, settings.storage.directory, days=30, now=NOW)

    assert removed == 3  # two rows 40 days old and the orphan file
    assert not old_file.exists() and not orphan.exists() and new_file.exists() and set_aside_twice.exists()
    with sessions() as session:
        kept = sorted(row.path for row in session.scalars(select(RejectedInstance)))
    assert kept == sorted([str(new_file), str(set_aside_twice)])


def test_purge_command_deletes_refused_instances_and_audit_records_by_their_own_age_as_serve_does(node, tmp_path):
    settings, sessions = node
    quarantine = settings.storage.directory / "quarantine"
    quarantine.mkdir(parents=True, exist_ok=True)
    old_file, new_file = quarantine / "old.dcm", quarantine / "new.dcm"
    with transaction(sessions) as session:
        for path, days in ((old_file, 40), (new_file, 1)):
            path.write_bytes(b"junk")
            record_rejection(
                session,
                status=0xC000,
                reason="not a DICOM data set",
                path=str(path),
                sop_instance_uid=None,
                sop_class_uid=None,
                transfer_syntax_uid=None,
                calling_ae_title="PACS",
            )
            session.flush()
            row = session.scalars(select(RejectedInstance).where(RejectedInstance.path == str(path))).one()
            row.received_at = NOW - timedelta(days=days)
        for days in (45, 31, 2):
            session.add(AuditEvent(at=NOW - timedelta(days=days), action="echo", outcome="success"))

    dry = cli(node, tmp_path, "--dry-run", quarantine_days=30, audit_days=30)  # no series retention configured

    assert dry.returncode == 0, dry.stderr
    assert "1 refused instance older than 30 days (retention.quarantine_days) would be deleted" in dry.stdout
    assert "2 audit records older than 30 days (retention.audit_days) would be deleted" in dry.stdout
    assert "retention is not configured" not in dry.stdout
    assert old_file.exists() and _count(sessions, RejectedInstance) == 2 and _count(sessions, AuditEvent) == 3

    result = cli(node, tmp_path, quarantine_days=30, audit_days=30)

    assert result.returncode == 0, result.stderr
    assert "1 refused instance older than 30 days (retention.quarantine_days) was deleted" in result.stdout
    assert "2 audit records older than 30 days (retention.audit_days) were deleted" in result.stdout
    assert not old_file.exists() and new_file.exists() and _count(sessions, RejectedInstance) == 1
    with sessions() as session:
        left = list(session.execute(select(AuditEvent.action, AuditEvent.detail).order_by(AuditEvent.id)).all())
    assert left[0] == ("echo", None)  # the recent record stays; the command's own deletions are audited
    assert [detail.split(": ", 1)[1] for _action, detail in left[1:]] == [
        "purge: 1 refused instance older than 30 days (retention.quarantine_days) was deleted",
        "purge: 2 audit records older than 30 days (retention.audit_days) were deleted",
    ]


def _count(sessions: sessionmaker[Session], table: type) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(table)) or 0


# --- a sender sending the series again while it is purged ------------------------------------------------------


def journal_line(settings: Settings, path: Path) -> Path:
    """A receiving process's journal naming ``path``: acknowledged, not yet recorded."""
    folder = settings.storage.directory / "journal"
    folder.mkdir(parents=True, exist_ok=True)
    journal = folder / "4242-1.journal"
    journal.write_text(f"{path}\n", encoding="utf-8")
    return journal


def test_a_series_with_an_instance_just_received_again_is_left_for_a_later_pass(node):
    settings, sessions = node
    stored = add_series(node, "1.2.3.1", JobState.DONE, days_ago=10)
    journal = journal_line(settings, stored.images[0])

    assert purge(node, days=7) == []
    assert all(path.exists() for path in stored.images) and instance_rows(sessions, "1.2.3.1") == 2

    journal.unlink()  # the receiver recorded it
    assert purge(node, days=7) == ["1.2.3.1"]


def test_files_set_aside_go_back_when_a_resend_is_journaled_meanwhile(node, monkeypatch):
    """The receiver journals the instance after the purge first looked, and found the file there: it stays."""
    import dicom_node.retention as retention

    settings, sessions = node
    stored = add_series(node, "1.2.3.1", JobState.DONE, days_ago=10)
    looks: list[int] = []

    def journals(_root: Path) -> set[str]:
        looks.append(1)
        return set() if len(looks) == 1 else {"1.2.3.1"}  # empty at the first look, the resend's line at the second

    monkeypatch.setattr(retention, "series_waiting_to_be_recorded", journals)
    with sessions() as session:
        plan = plan_retention(session, RetentionSettings(days=7), NOW)
    outcome = apply_plan(sessions, settings, plan, NOW)

    assert outcome.purged == [] and "instances of it are being received again" in outcome.skipped[0][1]
    assert all(path.read_bytes() == b"\0" * 1000 for path in stored.images)
    assert not list(stored.images[0].parent.glob("*.purging")) and instance_rows(sessions, "1.2.3.1") == 2


def test_files_a_crashed_purge_set_aside_are_put_back_at_start_up(tmp_path):
    from dicom_node.retention import put_back_set_aside_files

    folder = tmp_path / "instances" / STUDY / "1.2.3.1"
    folder.mkdir(parents=True)
    (folder / "1.2.3.1.1.dcm.purging").write_bytes(b"set aside")
    (folder / "1.2.3.1.2.dcm.purging").write_bytes(b"set aside")
    (folder / "1.2.3.1.2.dcm").write_bytes(b"written again by a receiver")

    assert put_back_set_aside_files(tmp_path / "instances") == 2
    assert (folder / "1.2.3.1.1.dcm").read_bytes() == b"set aside"
    assert (folder / "1.2.3.1.2.dcm").read_bytes() == b"written again by a receiver"
    assert sorted(p.name for p in folder.iterdir()) == ["1.2.3.1.1.dcm", "1.2.3.1.2.dcm"]


def test_an_instance_written_again_while_its_series_is_set_aside_leaves_the_series_for_a_later_pass(node, monkeypatch):
    """The receiver found the file gone (set aside) and wrote it again: the series is being received, so it stays."""
    import dicom_node.retention as retention

    stored = add_series(node, "1.2.3.1", JobState.DONE, days_ago=10)
    set_aside = retention._set_aside

    def receiver_writes_meanwhile(paths: list[Path], aside: list[Path]) -> None:
        set_aside(paths, aside)
        stored.images[0].write_bytes(b"resent")  # as the receiver's re-check writes an acknowledged instance

    monkeypatch.setattr(retention, "_set_aside", receiver_writes_meanwhile)
    settings, sessions = node
    with sessions() as session:
        plan = plan_retention(session, RetentionSettings(days=7), NOW)
    outcome = apply_plan(sessions, settings, plan, NOW)

    assert outcome.purged == [] and "instances of it are being received again" in outcome.skipped[0][1]
    assert stored.images[0].read_bytes() == b"resent"  # acknowledged: kept, and its row with it
    assert stored.images[1].read_bytes() == b"\0" * 1000  # put back
    assert not list(stored.images[0].parent.glob("*.purging")) and instance_rows(sessions, "1.2.3.1") == 2


def _waiting_for_a_lock(sessions: sessionmaker[Session]) -> bool:
    """PostgreSQL: whether some transaction waits for a row another one has locked."""
    with sessions() as session:
        return bool(session.scalar(text("SELECT count(*) FROM pg_locks WHERE NOT granted")))


def _blocked_or_done(sessions: sessionmaker[Session], thread: threading.Thread) -> None:
    """Wait until ``thread`` has finished or (PostgreSQL) waits for a lock; SQLite: give it a second."""
    if sessions.kw["bind"].dialect.name == "postgresql":
        wait_for(lambda: not thread.is_alive() or _waiting_for_a_lock(sessions), timeout=10, what="a lock wait")
    else:
        thread.join(timeout=1)  # its writer waits for the purge's (BEGIN IMMEDIATE) until the purge commits


def test_an_instance_recorded_while_its_series_is_purged_keeps_its_row(node, monkeypatch):
    """A re-sent instance written after the purge's last look, and recorded before it commits (PostgreSQL), is
    recorded once the purge has committed: never a file on disk with no row, answered success and then lost."""
    import dicom_node.retention as retention
    from dicom_node.receive.storage import InstanceStore, record_stored_instances

    settings, sessions = node
    stored = add_series(node, "1.2.3.1", JobState.DONE, days_ago=10, results=False)
    resent = stored.images[0]
    store = InstanceStore(settings.storage.directory, fsync=False)
    recorded: list[bool] = []

    def recorder() -> None:
        with transaction(sessions) as session:
            outcome = record_stored_instances(session, store, [_record(resent.stem, stored.uid, resent)])
        recorded.append(outcome[0].recorded.stored)

    thread = threading.Thread(target=recorder)
    delete_rows = retention._delete_series_rows

    def receiver_writes_and_records(*args):
        resent.write_bytes(b"resent")  # after the purge's checks: the receiver found the name free and wrote it
        thread.start()
        _blocked_or_done(sessions, thread)
        return delete_rows(*args)

    monkeypatch.setattr(retention, "_delete_series_rows", receiver_writes_and_records)
    assert purge(node, days=7) == [stored.uid]
    thread.join(timeout=30)

    assert recorded == [True] and resent.read_bytes() == b"resent"
    with sessions() as session:
        paths = list(
            session.scalars(select(Instance.path).join(Series).where(Series.series_instance_uid == stored.uid))
        )
        assert paths == [str(resent)] and session.get_one(Job, stored.job_id).state is JobState.RECEIVING


def test_a_purge_never_waits_for_an_instance_row_a_receiver_holds(pg_node):
    """PostgreSQL: a receiver holding a re-sent instance's row next waits for the job row the purge holds; the
    purge does not wait for that instance row in turn (a deadlock), it leaves the series for a later pass."""
    from db.ingest import recorded_paths

    node = pg_node
    settings, sessions = node
    stored = add_series(node, "1.2.3.1", JobState.DONE, days_ago=10, results=False)
    with transaction(sessions) as receiver:
        assert recorded_paths(receiver, [stored.images[0].stem])  # the re-sent instance's row, locked
        with sessions() as session:
            plan = plan_retention(session, RetentionSettings(days=7), NOW)
        outcome = apply_plan(sessions, settings, plan, NOW)

    assert outcome.purged == [] and [why for _item, why in outcome.skipped] == [
        f"instances of it or of its study are being received again (series {stored.uid})"
    ]
    assert all(path.exists() for path in stored.images) and instance_rows(sessions, stored.uid) == 2
    assert purge(node, days=7) == [stored.uid]  # the receiver done: the next pass purges it


def test_a_study_is_not_erased_while_a_new_series_of_it_is_being_recorded(pg_node):
    """PostgreSQL: the purge counts the study's instances under the study's lock, which the receiver holds."""
    node = pg_node
    settings, sessions = node
    add_series(node, "1.2.3.1", JobState.DONE, days_ago=10)
    with transaction(sessions) as session:
        session.scalars(select(Study)).one().patient_id = "PID-7"
    with sessions() as session:
        plan = plan_retention(session, RetentionSettings(days=7), NOW)
    new_series = settings.storage.directory / "instances" / STUDY / "1.2.3.2.1.dcm"
    new_series.write_bytes(b"\0" * 10)
    receiver = sessions()
    receiver.begin()
    record_instance(receiver, _record("1.2.3.2.1", "1.2.3.2", new_series))
    receiver.flush()  # a new series of the study, not committed yet
    outcomes: list[PurgeOutcome] = []
    thread = threading.Thread(target=lambda: outcomes.append(apply_plan(sessions, settings, plan, NOW)))
    thread.start()
    try:
        _blocked_or_done(sessions, thread)
        receiver.commit()
    finally:
        receiver.close()
        thread.join(timeout=30)

    assert [item.series_instance_uid for item in outcomes[0].purged] == ["1.2.3.1"]
    assert _study(sessions).patient_id == "PID-7"


def test_a_purge_and_a_receiver_re_opening_its_series_wait_in_one_order(pg_node):
    """PostgreSQL: a receiver holding a study's row (a new series of it) re-opens a finished series of the same
    study that a purge has begun: both take the study row before the job row, so the purge waits for the receiver
    and then leaves the re-opened series alone, with no deadlock for PostgreSQL to break (and no lost second)."""
    node = pg_node
    settings, sessions = node
    stored = add_series(node, "1.2.3.1", JobState.DONE, days_ago=10, results=False)
    with sessions() as session:
        plan = plan_retention(session, RetentionSettings(days=7), NOW)
    new_series = settings.storage.directory / "instances" / STUDY / "1.2.3.2.1.dcm"
    late = stored.images[0].with_name("1.2.3.1.3.dcm")
    for path in (new_series, late):
        path.write_bytes(b"\0" * 10)
    receiver = sessions()
    receiver.begin()
    record_instance(receiver, _record("1.2.3.2.1", "1.2.3.2", new_series))
    receiver.flush()  # the study's row is the receiver's until it commits
    outcomes: list[PurgeOutcome] = []
    thread = threading.Thread(target=lambda: outcomes.append(apply_plan(sessions, settings, plan, NOW)))
    thread.start()
    try:
        _blocked_or_done(sessions, thread)
        record_instance(receiver, _record("1.2.3.1.3", stored.uid, late))  # re-opens the DONE series: its job row
        receiver.commit()
    finally:
        receiver.close()
        thread.join(timeout=30)

    assert outcomes[0].purged == []
    assert [why for _item, why in outcomes[0].skipped] == ["it changed since planning (now RECEIVING)"]
    assert instance_rows(sessions, stored.uid) == 3 and all(path.exists() for path in stored.images)


# --- files that cannot be deleted -------------------------------------------------------------------------------


class Undeletable:
    """Makes files impossible to delete, for real, and deletable again.

    Not root: the file's folder is made read-only (unlink and rename fail: permission denied). Root ignores
    that; there only an immutable file (``chattr +i``: operation not permitted) stays, where that is allowed.
    """

    def __init__(self) -> None:
        self.held: list[tuple[str, Path]] = []

    def hold(self, path: Path) -> None:
        if os.geteuid() != 0:
            path.parent.chmod(0o500)
            self.held.append(("folder", path.parent))
            return
        chattr = shutil.which("chattr")
        if chattr is None or subprocess.run([chattr, "+i", str(path)], capture_output=True).returncode:
            pytest.skip("running as root, where only an immutable file cannot be deleted, and chattr +i fails here")
        self.held.append(("file", path))

    def release(self) -> None:
        for kind, path in reversed(self.held):
            if kind == "folder":
                path.chmod(0o700)
            else:
                subprocess.run(["chattr", "-i", str(path)], check=True)
        self.held.clear()


@pytest.fixture
def undeletable() -> Iterator[Undeletable]:
    files = Undeletable()
    yield files
    files.release()


CANNOT = r"\((permission denied|operation not permitted)\)"
MORE = r"( and \d+ more)?"  # not root: the whole folder is read-only


def test_a_result_file_that_cannot_be_deleted_fails_its_series_alone_and_goes_at_the_next_pass(node, undeletable):
    settings, sessions = node
    stuck = add_series(node, "1.2.3.1", JobState.DONE, days_ago=30)
    later = [add_series(node, uid, JobState.DONE, days_ago=20) for uid in ("1.2.3.2", "1.2.3.3")]
    undeletable.hold(stuck.results / "preview.png")
    with sessions() as session:
        plan = plan_retention(session, RetentionSettings(days=7), NOW)

    outcome = apply_plan(sessions, settings, plan, NOW)

    assert [item.series_instance_uid for item in outcome.purged] == ["1.2.3.2", "1.2.3.3"]
    ((_item, why),) = outcome.failed
    assert re.fullmatch(
        rf"could not delete {re.escape(str(stuck.results))}/\S+{MORE} {CANNOT}; series 1\.2\.3\.1 is purged from the "
        "database, and the next pass deletes what is left of its files",
        why,
    )
    assert not any(path.exists() for path in stuck.images) and instance_rows(sessions, stuck.uid) == 0
    with transaction(sessions) as session:
        job = session.get_one(Job, stuck.job_id)
        assert job.series.purged_at is not None and job.result_files is None
        with pytest.raises(jobs.InvalidTransition, match="images were purged"):
            jobs.retry(session, job)
    assert not any(path.exists() for series in later for path in [*series.images, series.results])

    undeletable.release()
    assert purge(node, days=7) == [stuck.uid]
    assert not stuck.results.exists()


def test_an_image_that_cannot_be_set_aside_leaves_its_series_as_it_was(node, undeletable):
    settings, sessions = node
    stuck = add_series(node, "1.2.3.1", JobState.DONE, days_ago=30)
    other = add_series(node, "1.2.3.2", JobState.DONE, days_ago=20)
    undeletable.hold(stuck.images[1])
    with sessions() as session:
        plan = plan_retention(session, RetentionSettings(days=7), NOW)

    outcome = apply_plan(sessions, settings, plan, NOW)

    assert [item.series_instance_uid for item in outcome.purged] == [other.uid]
    assert re.fullmatch(
        rf"could not set aside {re.escape(str(stuck.images[1].parent))}/\S+ {CANNOT}; series 1\.2\.3\.1 is left as it "
        "was, for the next pass",
        outcome.failed[0][1],
    )
    assert all(path.exists() for path in stuck.images) and stuck.results.is_dir()
    assert not list(stuck.images[0].parent.glob("*.purging")) and instance_rows(sessions, stuck.uid) == 2
    with sessions() as session:
        assert session.get_one(Job, stuck.job_id).series.purged_at is None


def test_an_image_set_aside_that_cannot_be_deleted_goes_at_the_next_pass_and_never_comes_back(
    node, undeletable, monkeypatch
):
    import dicom_node.retention as retention
    from dicom_node.retention import put_back_set_aside_files

    settings, sessions = node
    stuck = add_series(node, "1.2.3.1", JobState.DONE, days_ago=30, results=False)
    set_aside = retention._set_aside

    def set_aside_then_stuck(paths: list[Path], aside: list[Path]) -> None:
        set_aside(paths, aside)
        undeletable.hold(aside[0])  # it can be renamed, not deleted (e.g. a file system that fails meanwhile)

    monkeypatch.setattr(retention, "_set_aside", set_aside_then_stuck)
    with sessions() as session:
        plan = plan_retention(session, RetentionSettings(days=7), NOW)
    outcome = apply_plan(sessions, settings, plan, NOW)
    left = stuck.images[0].with_name(stuck.images[0].name + ".purging")

    assert "the next pass deletes what is left of its files" in outcome.failed[0][1]
    assert left.exists() and not stuck.images[1].exists() and instance_rows(sessions, stuck.uid) == 0
    undeletable.release()
    monkeypatch.undo()
    assert purge(node, days=7) == []  # nothing left to plan: the leftover goes before the plan is applied
    assert not left.exists() and not stuck.images[0].parent.exists()
    assert put_back_set_aside_files(settings.storage.directory / "instances") == 0


def test_start_up_goes_on_past_a_set_aside_file_it_cannot_put_back(tmp_path, undeletable, caplog):
    from dicom_node.retention import put_back_set_aside_files

    folder = tmp_path / "instances" / STUDY / "1.2.3.1"
    folder.mkdir(parents=True)
    stuck = folder / "1.2.3.1.1.dcm.purging"
    stuck.write_bytes(b"set aside")
    undeletable.hold(stuck)

    with caplog.at_level(logging.ERROR, logger="dicom_node.retention"):
        assert put_back_set_aside_files(tmp_path / "instances") == 1

    (record,) = caplog.records
    assert re.fullmatch(
        rf"could not put {re.escape(str(stuck))} back at {re.escape(str(folder))}/1\.2\.3\.1\.1\.dcm {CANNOT}; "
        "it stays set aside",
        record.event_fields["reason"],
    )
    assert stuck.exists()


def test_purge_names_the_file_it_could_not_delete_and_exits_1(node, tmp_path, undeletable):
    stuck = add_series(node, "1.2.3.1", JobState.DONE, days_ago=30)
    later = add_series(node, "1.2.3.2", JobState.DONE, days_ago=20)
    undeletable.hold(stuck.results / "preview.png")

    result = cli(node, tmp_path, "--days", "7")

    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert re.search(
        rf"could not delete {re.escape(str(stuck.results))}/\S+{MORE} {CANNOT}; series 1.2.3.1 is purged", result.stderr
    )
    assert "FAILED: could not delete" in result.stdout and "freed 2.9 kB from 1 series" in result.stdout
    assert not any(path.exists() for path in later.images) and not later.results.exists()


def test_files_outside_the_storage_folder_are_left_in_place_with_a_reason(node, tmp_path, caplog):
    settings, sessions = node
    stored = add_series(node, "1.2.3.1", JobState.DONE, days_ago=10)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with transaction(sessions) as session:
        session.get_one(Job, stored.job_id).result_path = str(elsewhere)

    with caplog.at_level(logging.WARNING, logger="dicom_node.retention"):
        assert purge(node, days=7) == [stored.uid]

    (record,) = [r for r in caplog.records if r.getMessage() == "retention.folder_outside_storage_kept"]
    root = settings.storage.directory
    assert record.event_fields["reason"] == (
        f"{elsewhere} is outside the storage folder {root}, so retention leaves it in place"
    )
    assert elsewhere.is_dir()


@pytest.mark.integration
def test_a_series_sent_under_the_wrong_patient_is_purged_so_the_pacs_correction_can_be_received(tmp_path, start_node):
    import pydicom

    from dicom_node.phantom import PhantomSpec, write_phantom_series
    from tests.conftest import storescu

    spec = PhantomSpec(rows=32, columns=32, slices=4, pixel_spacing=(5.0, 5.0), slice_spacing=5.0, patient_id="WRONG-1")
    series = write_phantom_series(tmp_path / "wrong", spec)
    corrected = []
    for path in series.files:
        dataset = pydicom.dcmread(path)
        dataset.PatientID = "RIGHT-2"  # the PACS corrected the patient and sends the same images again
        corrected.append(tmp_path / f"corrected-{path.name}")
        dataset.save_as(corrected[-1])
    node = start_node(completion={"quiet_seconds": 1})  # no rule: the series ends IGNORED, a finished state
    uid = series.series_instance_uid

    storescu(node.port, series.files)
    node.wait_for_state(uid, JobState.IGNORED, timeout=30)
    refused = storescu(node.port, corrected)  # a stored instance is never relabelled: refused, quarantined
    assert "Received Store Response (Error: CannotUnderstand)" in refused.stderr, refused.stderr
    purged = node.cli("purge", "--series", uid)
    assert purged.returncode == 0, purged.stderr
    received = storescu(node.port, corrected)
    assert received.stderr.count("Received Store Response (Success)") == 4, received.stderr
    node.wait_for_state(uid, JobState.RECEIVING, timeout=30)
    node.wait_for_state(uid, JobState.IGNORED, timeout=30)

    with node.sessions() as session:
        study = session.scalars(select(Study).join(Series).where(Series.series_instance_uid == uid)).one()
        paths = list(session.scalars(select(Instance.path).join(Series).where(Series.series_instance_uid == uid)))
    assert study.patient_id == "RIGHT-2"
    assert len(paths) == 4 and {pydicom.dcmread(p).PatientID for p in paths} == {"RIGHT-2"}
