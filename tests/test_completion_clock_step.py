"""A wall clock stepped forward (NTP correcting a clock that was behind, a virtual machine restored, the time set by
hand) while a series is still arriving: the series completes only once the watcher has itself seen it unchanged for
the quiet period (or the completion timeout, or the settle time) on its own steady clock."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

import db.jobs
import dicom_node.watcher
from db.ingest import InstanceRecord, SeriesAttributes, StudyAttributes, record_instance
from db.models import Job, JobEvent, JobState, Series, utcnow
from db.session import make_engine, make_session_factory, migrate, read_only, transaction
from dicom_node.config import Settings
from dicom_node.phantom import PhantomSpec, write_phantom_series
from dicom_node.watcher import EXPECTED_COUNT_SETTLE_SECONDS, SeriesWatcher
from tests.conftest import ct_instance, storescu


class SteadyClock:
    """A steady clock (as time.monotonic) that moves only when told: how much real time the watcher sees pass."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class WallClock:
    """The node's wall clock (``utcnow`` of the watcher and of db.jobs), which can be stepped."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.offset = timedelta(0)
        for module in (dicom_node.watcher, db.jobs):
            monkeypatch.setattr(module, "utcnow", self.utcnow)

    def utcnow(self) -> datetime:
        return utcnow() + self.offset

    def step(self, **kwargs: float) -> None:
        self.offset += timedelta(**kwargs)


def _node_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    url = f"sqlite:///{tmp_path / 'state.db'}"
    migrate(url)
    sessions = make_session_factory(make_engine(url))
    settings = Settings(
        storage={"directory": tmp_path / "storage"},
        completion={"quiet_seconds": 30, "expected_count_timeout_seconds": 600},
    )
    steady = SteadyClock()
    return sessions, SeriesWatcher(settings, sessions, steady_clock=steady), steady, WallClock(monkeypatch)


def _history(sessions: sessionmaker[Session], series_uid: str) -> list[tuple[JobState, str | None]]:
    with read_only(sessions) as session:
        job = session.scalars(select(Job).join(Series).where(Series.series_instance_uid == series_uid)).one()
        events = session.scalars(select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id))
        return [(event.to_state, event.reason) for event in events]


def _state(sessions: sessionmaker[Session], series_uid: str) -> JobState:
    return _history(sessions, series_uid)[-1][0]


def test_a_series_still_arriving_is_not_completed_by_a_clock_stepped_forward(tmp_path, monkeypatch):
    """150 of 200 announced images, and 10 of a series without ImagesInAcquisition, then the clock jumps an hour:
    both completed at once ('no new instance for 30 s'), and half a series went out as a whole one."""
    sessions, watcher, steady, wall = _node_parts(tmp_path, monkeypatch)
    with transaction(sessions) as session:
        for number in range(150):
            record_instance(session, ct_instance(f"1.2.9.{number}", "1.2.9", expected=200), counted_at=wall.utcnow())
        for number in range(10):
            record_instance(session, ct_instance(f"1.2.8.{number}", "1.2.8"), counted_at=wall.utcnow())
    watcher.complete_ready_series()

    wall.step(hours=1)
    steady.advance(1)  # one check interval of real time
    watcher.complete_ready_series()
    assert (_state(sessions, "1.2.9"), _state(sessions, "1.2.8")) == (JobState.RECEIVING, JobState.RECEIVING)

    steady.advance(29)  # 30 s seen quiet: the series without a count is complete; the other waits for its timeout
    watcher.complete_ready_series()
    assert _history(sessions, "1.2.8")[-1] == (JobState.COMPLETE, "no new instance for 30 s (10 received)")
    assert _state(sessions, "1.2.9") is JobState.RECEIVING

    steady.advance(570)
    watcher.complete_ready_series()
    assert _history(sessions, "1.2.9")[-1] == (
        JobState.COMPLETE,
        "only 150 of 200 expected images (ImagesInAcquisition) after 600 s without a new one (partial series)",
    )


def test_a_clock_stepped_between_an_image_and_the_next_look_does_not_count_as_quiet(tmp_path, monkeypatch):
    """The watcher has run before; an image arrives, and the clock jumps before the watcher's next pass: the image
    is at most one pass old, whatever the wall clock says."""
    sessions, watcher, steady, wall = _node_parts(tmp_path, monkeypatch)
    watcher.complete_ready_series()
    steady.advance(1)
    with transaction(sessions) as session:
        record_instance(session, ct_instance("1.2.7.1", "1.2.7"), counted_at=wall.utcnow())
    wall.step(hours=1)
    steady.advance(1)
    watcher.complete_ready_series()
    assert _state(sessions, "1.2.7") is JobState.RECEIVING

    steady.advance(29)  # 29 s since the look that saw it first: it may have come just before that look
    watcher.complete_ready_series()
    assert _state(sessions, "1.2.7") is JobState.RECEIVING
    steady.advance(1)
    watcher.complete_ready_series()
    assert _state(sessions, "1.2.7") is JobState.COMPLETE


def test_a_series_first_seen_after_a_long_pass_is_quiet_only_from_that_look(tmp_path, monkeypatch):
    """The watcher's host runs 5 minutes ahead of the receiving host's, and a pass took 45 s (admission reads every
    header of a large series in the watcher's thread): ten images recorded just before the next look were counted
    quiet for the whole 45 s, and the series completed with its last image 0 s old."""
    sessions, watcher, steady, wall = _node_parts(tmp_path, monkeypatch)  # quiet 30 s
    wall.step(minutes=5)  # the watcher's clock; the images are stamped by the receiving host's (db.ingest's utcnow)
    watcher.complete_ready_series()
    steady.advance(45)
    with transaction(sessions) as session:
        for number in range(10):
            record_instance(session, ct_instance(f"1.2.5.{number}", "1.2.5"), counted_at=utcnow())
    watcher.complete_ready_series()
    assert _state(sessions, "1.2.5") is JobState.RECEIVING

    steady.advance(30)
    watcher.complete_ready_series()
    assert _history(sessions, "1.2.5")[-1] == (JobState.COMPLETE, "no new instance for 30 s (10 received)")


def test_a_series_that_went_quiet_while_the_node_was_down_completes_one_quiet_period_after_the_start(
    tmp_path, monkeypatch
):
    sessions, watcher, steady, wall = _node_parts(tmp_path, monkeypatch)
    with transaction(sessions) as session:
        record_instance(session, ct_instance("1.2.6.1", "1.2.6"))
        session.execute(update(Series).values(last_received_at=wall.utcnow() - timedelta(hours=1)))
    watcher.complete_ready_series()  # the first pass after the start
    assert _state(sessions, "1.2.6") is JobState.RECEIVING
    steady.advance(30)
    watcher.complete_ready_series()
    assert _history(sessions, "1.2.6")[-1] == (JobState.COMPLETE, "no new instance for 30 s (1 received)")


def test_a_series_at_its_expected_count_waits_the_settle_time_on_the_steady_clock(tmp_path, monkeypatch):
    """Reaching ImagesInAcquisition completes a series 2 s after its last image, not at once when the clock jumps
    right after it: an image past the count would show the count to be one acquisition's."""
    sessions, watcher, steady, wall = _node_parts(tmp_path, monkeypatch)
    series = write_phantom_series(tmp_path / "ct", PhantomSpec(rows=16, columns=16, slices=4))
    watcher.complete_ready_series()
    steady.advance(1)
    with transaction(sessions) as session:
        for number, path in enumerate(series.files, start=1):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            record = InstanceRecord(
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                path=str(path),
                size_bytes=path.stat().st_size,
                study=StudyAttributes(series.study_instance_uid),
                series=SeriesAttributes(series.series_instance_uid, modality="CT", expected_instances=4),
                instance_number=number,
            )
            record_instance(session, record, counted_at=wall.utcnow())
    wall.step(hours=1)
    steady.advance(0.5)
    watcher.complete_ready_series()
    assert _state(sessions, series.series_instance_uid) is JobState.RECEIVING

    steady.advance(EXPECTED_COUNT_SETTLE_SECONDS)
    watcher.complete_ready_series()
    assert _history(sessions, series.series_instance_uid)[-1] == (
        JobState.COMPLETE,
        "all 4 expected images received (ImagesInAcquisition)",
    )


# --- end to end: a real node whose wall clock is stepped while a sender pauses -----------------------------------

STEPPED_CLOCK = '''"""Loaded at the start of every Python process with this folder on PYTHONPATH: db.models.utcnow, which the node's
modules import by name, reads the wall clock plus the offset (seconds) in the file $STEPPED_CLOCK_FILE."""
import os
from datetime import timedelta

import db.models

_real = db.models.utcnow


def _utcnow():
    try:
        with open(os.environ["STEPPED_CLOCK_FILE"]) as offset:
            return _real() + timedelta(seconds=float(offset.read() or 0))
    except (OSError, ValueError):
        return _real()


db.models.utcnow = _utcnow
'''

QUIET_SECONDS = 10
"""Long enough that the real pause of the sender below stays well inside it."""
SPEC = PhantomSpec(rows=32, columns=32, slices=40, pixel_spacing=(8.0, 8.0), slice_spacing=4.0)


@pytest.mark.integration
def test_a_real_node_whose_clock_jumps_an_hour_mid_series_completes_it_with_every_image(
    tmp_path, start_node, monkeypatch
):
    """Half of a series without ImagesInAcquisition, a pause of a few seconds in which the node's clock jumps an
    hour, then the rest: the series completed at the jump, and half of it was processed as a whole."""
    # many scanners send no ImagesInAcquisition: only the quiet period decides
    series = write_phantom_series(tmp_path / "ct", replace(SPEC, images_in_acquisition=False))
    clock_folder, offset = tmp_path / "stepped-clock", tmp_path / "clock-offset"
    clock_folder.mkdir()
    (clock_folder / "sitecustomize.py").write_text(STEPPED_CLOCK)
    offset.write_text("0")
    monkeypatch.setenv("PYTHONPATH", str(clock_folder))
    monkeypatch.setenv("STEPPED_CLOCK_FILE", str(offset))
    node = start_node(completion={"quiet_seconds": QUIET_SECONDS, "check_interval_seconds": 0.2})

    half = SPEC.slices // 2
    assert storescu(node.port, series.files[:half]).returncode == 0
    assert node.job_state(series.series_instance_uid) is JobState.RECEIVING
    offset.write_text("3600")  # the node's clock jumps an hour forward
    time.sleep(3)  # the sender pauses: many watcher passes, far less than the quiet period
    assert node.job_state(series.series_instance_uid) is JobState.RECEIVING, node.job_reason(series.series_instance_uid)
    assert storescu(node.port, series.files[half:]).returncode == 0

    node.wait_for_state(series.series_instance_uid, JobState.IGNORED, timeout=120)  # no rule: completed, not run
    reasons = [reason for _state, reason in _history(node.sessions, series.series_instance_uid)]
    assert reasons[:2] == [
        "first instance received",
        f"no new instance for {QUIET_SECONDS} s ({SPEC.slices} received)",
    ]
