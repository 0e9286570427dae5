"""Two processes changing one series' state at once, on PostgreSQL (the scale-out database).

SQLite serialises every writer (each transaction takes the write lock before its first read), so
these interleavings cannot happen there. On PostgreSQL a writer reads without a lock by default:
a late instance may re-open a series between another writer's read and its write. Every state
change is then checked against the job's version: the stale write fails, is decided again on the
newer state, and never overwrites it. Each test holds the late instance's transaction open while
the other actor runs, which makes the interleaving certain rather than likely.
"""

from __future__ import annotations

import subprocess
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
import yaml
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from db import jobs
from db.ingest import InstanceRecord, record_instance
from db.models import Delivery, Job, JobEvent, JobState
from db.results import DeliveryRecord, ResultFile, ResultKind
from db.session import make_engine, make_session_factory, migrate, transaction
from dicom_node.config import load_settings
from dicom_node.dispatch import Dispatcher, run_key
from tests.conftest import DICOM_NODE, ct_instance

SERIES = "1.2.3.4"


@pytest.fixture
def sessions(postgresql_url: str) -> sessionmaker[Session]:
    migrate(postgresql_url)
    return make_session_factory(make_engine(postgresql_url))


def record(uid: str) -> InstanceRecord:
    return ct_instance(uid, SERIES)


def series_in(sessions: sessionmaker[Session], state: JobState, destinations: list[str]) -> int:
    """One series driven through the named transitions to ``state``; returns its job id."""
    with transaction(sessions) as session:
        record_instance(session, record(f"{SERIES}.1"))
        job = session.scalars(select(Job)).one()
        jobs.mark_complete(session, job, "quiet")
        jobs.queue(session, job, rule_name="ct", model_name="baseline", destinations=destinations)
        assert jobs.claim(session, job, "host:1", timedelta(minutes=5))
        jobs.finish_processing(
            session,
            job,
            state,
            "segmented",
            result_path="/results/1",
            result_files=[ResultFile(ResultKind.SEG, "/results/1/seg.dcm", "BINARY")],
        )
        return job.id


def transitions(sessions: sessionmaker[Session], job_id: int) -> list[str]:
    with sessions() as session:
        events = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))
        return [f"{e.from_state.value if e.from_state else None}->{e.to_state.value}" for e in events]


def state_of(sessions: sessionmaker[Session], job_id: int) -> JobState:
    with sessions() as session:
        return session.get_one(Job, job_id).state


def late_instance_held_open(sessions: sessionmaker[Session]) -> Session:
    """A late instance recorded (the series re-opened) in a transaction left open; commit it to let it land."""
    session = sessions()
    session.begin()
    record_instance(session, record(f"{SERIES}.2"))
    session.flush()
    return session


def test_a_state_change_made_from_a_stale_read_fails_and_the_newer_state_stands(sessions):
    job_id = series_in(sessions, JobState.SENDING, ["pacs"])
    stale = sessions()
    stale.begin()
    job = stale.get_one(Job, job_id)  # read SENDING
    with transaction(sessions) as session:
        record_instance(session, record(f"{SERIES}.2"))  # a late instance re-opens the series meanwhile

    jobs.finish_sending(stale, job, "sent 1 file(s)")
    with pytest.raises(StaleDataError):
        stale.commit()
    stale.close()

    assert state_of(sessions, job_id) is JobState.RECEIVING
    assert "SENDING->DONE" not in transitions(sessions, job_id)


def test_the_dispatcher_decides_again_when_the_series_is_reopened_between_its_read_and_its_write(sessions, tmp_path):
    job_id = series_in(sessions, JobState.SENDING, ["pacs"])
    with transaction(sessions) as session:  # the destination accepted the one file: the next write says DONE
        job = session.get_one(Job, job_id)
        job.deliveries = {"pacs": DeliveryRecord(files={"9.9.1": "/results/1/seg.dcm"})}
        session.add(
            Delivery(job_id=job_id, destination="pacs", sop_instance_uid="9.9.1", sop_class_uid="x", path="p", status=0)
        )
        key = run_key(job)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"storage": {"directory": str(tmp_path / "storage")}}))
    dispatcher = Dispatcher(load_settings(config), sessions)

    receiving = late_instance_held_open(sessions)
    finishing = threading.Thread(
        target=dispatcher._finish_attempt, args=(job_id, "pacs", None, datetime.now(timezone.utc), key)
    )
    finishing.start()
    time.sleep(1.0)  # the dispatcher has read SENDING and waits for the row the late instance holds
    receiving.commit()
    receiving.close()
    finishing.join(timeout=60)

    assert not finishing.is_alive()
    assert state_of(sessions, job_id) is JobState.RECEIVING
    assert transitions(sessions, job_id)[-1] == "SENDING->RECEIVING"
    assert "SENDING->DONE" not in transitions(sessions, job_id)


def test_dicom_node_retry_does_not_overwrite_a_series_reopened_meanwhile(sessions, postgresql_url, tmp_path):
    job_id = series_in(sessions, JobState.DONE, [])
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump({"storage": {"directory": str(tmp_path / "storage")}, "database": {"url": postgresql_url}})
    )

    receiving = late_instance_held_open(sessions)
    retry = subprocess.Popen(
        [DICOM_NODE, "retry", SERIES, "--config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    time.sleep(2.0)  # the retry waits for the job's row
    still_waiting = retry.poll() is None
    receiving.commit()
    receiving.close()
    output = retry.communicate(timeout=60)[0].decode()

    assert still_waiting, output
    assert retry.returncode == 1, output
    assert "cannot retry" in output and "series is RECEIVING" in output, output
    assert state_of(sessions, job_id) is JobState.RECEIVING
    assert "DONE->COMPLETE" not in transitions(sessions, job_id)


def test_a_claim_moves_the_version_so_a_writer_that_read_the_job_queued_decides_again(sessions):
    with transaction(sessions) as session:
        record_instance(session, record(f"{SERIES}.1"))
        job = session.scalars(select(Job)).one()
        jobs.mark_complete(session, job, "quiet")
        jobs.queue(session, job, rule_name="ct", model_name="baseline", destinations=[])
        job_id = job.id
    stale = sessions()
    stale.begin()
    queued = stale.get_one(Job, job_id)
    with transaction(sessions) as session:
        assert jobs.claim(session, session.get_one(Job, job_id), "host:2", timedelta(minutes=5))

    jobs.reopen(stale, queued, why="late instance")  # would say "was QUEUED" of a job a worker holds
    with pytest.raises(StaleDataError):
        stale.commit()
    stale.close()
    assert state_of(sessions, job_id) is JobState.PROCESSING


def test_a_late_instance_of_a_receiving_series_stops_a_watcher_that_read_the_series_as_quiet(sessions, tmp_path):
    """The watcher finds the series quiet while a late instance's transaction is open: its completion waits for
    that transaction, then fails on the job's new version, and the series goes on receiving (with both images)."""
    from sqlalchemy import update

    from db.models import Instance, Series, utcnow
    from dicom_node.watcher import SeriesWatcher
    from tests.test_completion_clock_step import SteadyClock

    with transaction(sessions) as session:
        record_instance(session, record(f"{SERIES}.1"))
        session.execute(update(Series).values(last_received_at=utcnow() - timedelta(hours=1)))
        job_id = session.scalars(select(Job)).one().id
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"storage": {"directory": str(tmp_path / "storage")}}))
    steady = SteadyClock()
    watcher = SeriesWatcher(load_settings(config), sessions, steady_clock=steady)
    watcher.complete_ready_series()  # its first look; then it sees the series unchanged for an hour
    steady.advance(3600)

    receiving = late_instance_held_open(sessions)
    outcome: list[BaseException | None] = []

    def complete() -> None:
        try:
            watcher.complete_ready_series()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    completing = threading.Thread(target=complete)
    completing.start()
    time.sleep(1.0)  # the watcher has read the series as quiet and waits for the job row the instance holds
    receiving.commit()
    receiving.close()
    completing.join(timeout=60)

    assert not completing.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], StaleDataError), outcome
    assert state_of(sessions, job_id) is JobState.RECEIVING
    assert "RECEIVING->COMPLETE" not in transitions(sessions, job_id)
    with sessions() as session:
        assert len(session.scalars(select(Instance)).all()) == 2
