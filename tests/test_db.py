"""The database: migrations match the models, and job states change only along allowed paths."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select

from db import jobs
from db.ingest import InstanceRecord, record_instance
from db.models import Base, Job, JobEvent, JobState
from db.session import make_engine, make_session_factory, migrate, transaction
from tests.conftest import ct_instance


@pytest.fixture
def sessions(database_url):
    url = database_url
    migrate(url)
    return make_session_factory(make_engine(url))


def record(uid: str, series: str = "1.2.3.4", expected: int | None = None) -> InstanceRecord:
    return ct_instance(uid, series, expected=expected)


def test_migrations_create_exactly_the_models_schema(database_url):
    url = database_url
    migrate(url)
    with make_engine(url).connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []


def test_first_instance_opens_a_receiving_job_and_counts(sessions):
    with transaction(sessions) as session:
        first = record_instance(session, record("1.2.3.4.1", expected=2))
        second = record_instance(session, record("1.2.3.4.2", expected=2))
        duplicate = record_instance(session, record("1.2.3.4.2", expected=2))
    assert (first.series_created, second.series_created, duplicate.stored) == (True, False, False)
    with sessions() as session:
        job = session.scalars(select(Job)).one()
        assert job.state is JobState.RECEIVING
        assert (job.series.instance_count, job.series.expected_instances) == (2, 2)


def test_late_instance_reopens_finished_job(sessions):
    with transaction(sessions) as session:
        record_instance(session, record("1.2.3.4.1"))
        job = session.scalars(select(Job)).one()
        jobs.mark_complete(session, job, "quiet")
        jobs.ignore(session, job, "no rule")
        outcome = record_instance(session, record("1.2.3.4.2"))
    assert outcome.series_reopened
    with sessions() as session:
        events = [(e.from_state, e.to_state) for e in session.scalars(select(JobEvent).order_by(JobEvent.id))]
    assert events[-1] == (JobState.IGNORED, JobState.RECEIVING)


def test_disallowed_transition_is_refused(sessions):
    with transaction(sessions) as session:
        record_instance(session, record("1.2.3.4.1"))
        job = session.scalars(select(Job)).one()
        with pytest.raises(jobs.InvalidTransition, match="RECEIVING -> DONE"):
            jobs.change_state(session, job, JobState.DONE)
        with pytest.raises(jobs.InvalidTransition, match="only"):
            jobs.retry(session, job)


def test_retry_routes_a_failed_series_again(sessions):
    with transaction(sessions) as session:
        record_instance(session, record("1.2.3.4.1"))
        job = session.scalars(select(Job)).one()
        jobs.mark_complete(session, job, "quiet")
        jobs.queue(session, job, rule_name="ct", model_name="baseline", destinations=[])
        jobs.fail(session, job, "model crashed")
        jobs.retry(session, job)
        assert job.state is JobState.COMPLETE
        assert job.reason == "retry requested by operator (was FAILED)"


PARTIAL = "partial series: 150 of 200 expected images after 30 s without a new one"
ASSUMED = "rescale attributes missing: pixel values were read as HU with slope 1 and intercept 0"


@pytest.mark.parametrize("action", ["retry", "reroute"])
def test_a_partial_series_stays_marked_partial_when_it_is_processed_again(sessions, action):
    """Completion runs once; the runs after a retry or re-route cover the same incomplete images."""
    with transaction(sessions) as session:
        record_instance(session, record("1.2.3.4.1"))
        job = session.scalars(select(Job)).one()
        jobs.mark_complete(session, job, "partial")
        jobs.append_warnings(job, [PARTIAL, ASSUMED])
        jobs.queue(session, job, rule_name="ct", model_name="baseline", destinations=[])
        jobs.fail(session, job, "model crashed")
        if action == "retry":
            jobs.retry(session, job)
            assert job.warnings == [PARTIAL]  # admission writes its own again when it routes the series
        else:
            jobs.reroute(
                session,
                job,
                rule_name="ct",
                model_name="other",
                destinations=[],
                by="olga",
                admission_warnings=[ASSUMED],
            )
            assert job.state is JobState.QUEUED
            assert job.warnings == [PARTIAL, ASSUMED]


def test_a_read_outside_a_transaction_does_not_wait_for_a_writer(tmp_path):
    """SQLite: every transaction takes the write lock up front; a lone read takes none, so it never waits."""
    import subprocess
    import sys
    import time

    from db.models import Study
    from db.session import read_outside_transaction
    from tests.test_faults import HOLD_LOCK

    url = f"sqlite:///{tmp_path / 'node.db'}"
    migrate(url)
    sessions = make_session_factory(make_engine(url, busy_timeout_seconds=5))
    with transaction(sessions) as session:
        record_instance(session, record("1.2.3.4.1"))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / "node.db"), "3"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        uid = read_outside_transaction(sessions, select(Study.study_instance_uid))
        waited = time.monotonic() - started
    finally:
        holder.wait(timeout=30)
    assert uid == "1.2.3" and waited < 1.0  # the busy timeout is 5 s: it did not wait for the lock
    with transaction(sessions) as session:  # the connection it used is back in the node's own-BEGIN mode
        record_instance(session, record("1.2.3.4.2"))
        assert session.connection().connection.dbapi_connection.isolation_level is None


def test_a_database_already_at_the_newest_schema_is_opened_while_another_process_writes(tmp_path):
    """A worker (re)started while the receiver holds SQLite's write lock has nothing to migrate: it does not wait for
    the lock (the upgrade's own BEGIN IMMEDIATE would give up after the driver's 5 s and the worker would not start).
    """
    import sqlite3

    url = f"sqlite:///{tmp_path / 'node.db'}"
    migrate(url)
    holder = sqlite3.connect(tmp_path / "node.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        migrate(url)
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_every_sqlite_commit_is_synced_to_disk_before_it_returns(tmp_path):
    """synchronous=NORMAL (in WAL mode) loses the last commits on a power cut: a result recorded as sent was
    forgotten, and the series processed and sent again."""
    from sqlalchemy import text

    engine = make_engine(f"sqlite:///{tmp_path / 'state.db'}")
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL


KILLED_UPGRADE = """
import os, signal, sys
from alembic import command
from sqlalchemy import event
from sqlalchemy.engine import Engine
from db.session import alembic_config, migrate

url, start, match, nth = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if start != "none":
    command.upgrade(alembic_config(url), start)
seen = 0

@event.listens_for(Engine, "after_cursor_execute")
def _killed(conn, cursor, statement, params, context, executemany):
    global seen
    seen += match in statement
    if seen == nth:
        os.kill(os.getpid(), signal.SIGKILL)  # a power cut while serve upgrades the schema

migrate(url)
"""


@pytest.mark.parametrize(
    ("start", "statement"), [("0012", "ADD COLUMN"), ("none", "CREATE TABLE")], ids=["upgrade", "first-start"]
)
def test_an_upgrade_killed_part_way_leaves_a_database_the_next_start_upgrades(tmp_path, start, statement):
    """SQLite's driver committed each ADD COLUMN or CREATE TABLE on its own: a serve killed while it upgraded left
    columns or tables its next start added again and failed on ("duplicate column name"), so the node never
    started again. The whole upgrade is one transaction now."""
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'dicom-node.db'}"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_UPGRADE, url, start, statement, "2"], capture_output=True, text=True
    )
    assert killed.returncode == -9, killed.stderr

    migrate(url)  # the next start

    with make_engine(url).connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
