"""A locked database must not shorten a series' quiet period.

With the database locked by another process, a receiver acknowledged half a series; when the lock ended, its
recorder recorded them with ``last_received_at`` read before its transaction waited for the lock, so the series
was found quiet at once: half the series was processed as whole, and the other half, sent seconds later, ran again.
Here the image acknowledged during the lock is the series' first, and the rest follows once it is recorded.
The quiet period now starts when the instances are recorded (once the transaction holds its locks), on SQLite and
PostgreSQL. The same holds for the watcher's own correction of a series recorded "in the future".
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from db.ingest import record_instance
from db.models import Job, JobEvent, JobState, Series, as_utc, utcnow
from db.session import make_engine, make_session_factory, migrate, read_only, transaction
from dicom_node.config import Settings
from dicom_node.watcher import SeriesWatcher
from tests.conftest import ct_instance, real_ct_copy, storescu, succeeded_files, wait_for

pytestmark = pytest.mark.integration

QUIET_SECONDS = 8
HOLD_AFTER_SENDING_SECONDS = 3.0
"""The lock is held this long after the first image's sender has gone (it waits up to 10 s at its release for
the image to be recorded), so its recording waited longer than the quiet period for the lock."""
SENT_DURING_THE_LOCK = 1
"""One image: recorded in one transaction, which waits for the lock (of several, those acknowledged after the
first transaction began are recorded by a later one, begun after the lock ended)."""

SQLITE_LOCK_HOLDER = """
import sqlite3, sys
from datetime import datetime, timezone
database = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=60)
database.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
for line in sys.stdin:
    if line.strip() == "record":  # what another receiving process does while it holds the lock: records an image
        now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")
        database.execute("UPDATE series SET last_received_at = ?, instance_count = instance_count + 1", (now,))
        print("recorded", flush=True)
    else:
        break
database.execute("COMMIT")
print("unlocked", flush=True)
"""


class SqliteLockHolder:
    """Another process holding SQLite's write lock (``BEGIN EXCLUSIVE``) until told to commit."""

    def __init__(self, database: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", SQLITE_LOCK_HOLDER, str(database)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._answer() == "locked"

    def _answer(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.readline().strip()

    def record_an_image(self) -> None:
        self._say("record")
        assert self._answer() == "recorded"

    def release(self) -> None:
        self._say("commit")
        assert self._answer() == "unlocked"
        self.process.wait(timeout=30)

    def _say(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class PostgresqlLockHolder:
    """Another connection holding ``instances`` in EXCLUSIVE mode: read, but never written, until it commits."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url, poolclass=NullPool)
        self.connection = self.engine.connect()
        self.connection.execute(text("LOCK TABLE instances IN EXCLUSIVE MODE"))

    def release(self) -> None:
        self.connection.commit()

    def close(self) -> None:
        self.connection.close()
        self.engine.dispose()


@contextmanager
def lock_held(backend: str, url: str, database: Path) -> Iterator[SqliteLockHolder | PostgresqlLockHolder]:
    holder = SqliteLockHolder(database) if backend == "sqlite" else PostgresqlLockHolder(url)
    try:
        yield holder
    finally:
        holder.close()


def _history(sessions: sessionmaker[Session], series_uid: str) -> list[tuple[JobState, str | None]]:
    with read_only(sessions) as session:
        query = (
            select(JobEvent.to_state, JobEvent.reason)
            .join(Job, Job.id == JobEvent.job_id)
            .join(Series, Series.id == Job.series_id)
            .where(Series.series_instance_uid == series_uid)
            .order_by(JobEvent.id)
        )
        return [(state, reason) for state, reason in session.execute(query)]


def _recorded(sessions: sessionmaker[Session], series_uid: str) -> int:
    with read_only(sessions) as session:
        count = session.scalar(select(Series.instance_count).where(Series.series_instance_uid == series_uid))
    return int(count or 0)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_series_recorded_after_a_lock_waits_its_whole_quiet_period_and_completes_once_with_every_image(
    backend, request, tmp_path, start_node, shared_fixtures
):
    import pydicom

    files = real_ct_copy(tmp_path / "ct", shared_fixtures)
    series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    url = request.getfixturevalue("postgresql_url") if backend == "postgresql" else None
    node = start_node(
        completion={"quiet_seconds": QUIET_SECONDS, "check_interval_seconds": 0.2},
        database={"busy_timeout_seconds": 60, **({"url": url} if url else {})},
    )
    url = url or f"sqlite:///{node.storage / 'dicom-node.db'}"
    sessions = make_session_factory(make_engine(url))
    with lock_held(backend, url, node.storage / "dicom-node.db") as holder:
        # Answered at once; the release waits up to 10 s for the recording.
        first = storescu(node.port, files[:SENT_DURING_THE_LOCK], extra=["-xv"])
        assert len(succeeded_files(first.stdout + first.stderr)) == SENT_DURING_THE_LOCK, first.stdout + first.stderr
        threading.Event().wait(HOLD_AFTER_SENDING_SECONDS)
        assert _recorded(sessions, series_uid) == 0  # still waiting for the lock
        holder.release()
        wait_for(
            lambda: _recorded(sessions, series_uid) == SENT_DURING_THE_LOCK,
            timeout=60,
            what="the image sent during the lock to be recorded",
        )
    rest = storescu(node.port, files[SENT_DURING_THE_LOCK:], extra=["-xv"])
    assert len(succeeded_files(rest.stdout + rest.stderr)) == 20 - SENT_DURING_THE_LOCK, rest.stdout + rest.stderr

    def completed_with_all() -> bool:
        return _recorded(sessions, series_uid) == 20 and any(
            state is JobState.COMPLETE and "(20 received)" in (reason or "")
            for state, reason in _history(sessions, series_uid)
        )

    wait_for(completed_with_all, timeout=120, what="the series to complete with every image")
    completions = [reason for state, reason in _history(sessions, series_uid) if state is JobState.COMPLETE]
    assert completions == [f"no new instance for {QUIET_SECONDS} s (20 received)"], _history(sessions, series_uid)
    sessions.kw["bind"].dispose()


def test_a_series_recorded_while_the_watcher_waited_for_the_lock_is_not_taken_for_one_from_the_future(tmp_path):
    """The watcher read the clock before its transaction waited for the write lock; a series another process
    recorded meanwhile then looked recorded "in the future", its quiet period was restarted at that stale time,
    and the series completed at once."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    migrate(url)
    sessions = make_session_factory(make_engine(url, busy_timeout_seconds=60))
    with transaction(sessions) as session:
        record_instance(session, ct_instance("1.2.3.4.1", "1.2.3.4"))
        session.execute(select(Series)).scalars().one().last_received_at = utcnow() - timedelta(hours=1)
    settings = Settings(storage={"directory": tmp_path / "storage"}, completion={"quiet_seconds": QUIET_SECONDS})
    watcher = SeriesWatcher(settings, sessions)
    holder = SqliteLockHolder(tmp_path / "state.db")
    try:
        checking = threading.Thread(target=watcher.complete_ready_series)
        checking.start()  # it waits for the lock
        threading.Event().wait(QUIET_SECONDS)
        holder.record_an_image()  # another receiving process records an image of the series, now
        holder.release()
        checking.join(timeout=90)
        assert not checking.is_alive()
    finally:
        holder.close()
    watcher.complete_ready_series()
    with read_only(sessions) as session:
        job = session.scalars(select(Job)).one()
        assert job.state is JobState.RECEIVING, job.reason
        last = as_utc(session.scalars(select(Series)).one().last_received_at)
        assert utcnow() - last < timedelta(seconds=QUIET_SECONDS)
