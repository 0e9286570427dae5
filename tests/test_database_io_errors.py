"""A few seconds in which SQLite cannot write the database file (a disk input/output error) are waited out by a
worker, never counted as a crash of it: two such blips used to leave the series FAILED ("worker died while
processing (2 times)"), with nothing sent to PACS.

The fault is real: the database file and its write-ahead log are made immutable (``chattr +i``), so SQLite reports
"disk I/O error" on writes, and a connection it opens meanwhile silently opens read-only and reports "attempt to
write a readonly database" even once the file can be written again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from db.jobs import job_for_series_uid
from db.models import JobState
from db.session import make_engine
from dicom_node.config import Settings
from dicom_node.encode.sr import DEVICE_UID_FILE
from dicom_node.phantom import write_phantom_series
from dicom_node.pipeline import ClaimedJob, Deferred, ModelCache, run_pipeline
from tests.conftest import CT_RULES, storescu, wait_for
from tests.test_worker_hung import FAST_CHECKS, SMALL, _open_for_writing

pytestmark = pytest.mark.integration

DEVICE_UID = "2.25.331804012913947128431003551244012388471"


def _chattr(flag: str, *paths: Path) -> None:
    subprocess.run(["chattr", flag, *map(str, paths)], check=True, capture_output=True)


@contextlib.contextmanager
def database_not_writable(database: Path) -> Iterator[None]:
    """The database file and its write-ahead log immutable: SQLite's writes fail with "disk I/O error"."""
    files = [database, database.with_name(database.name + "-wal")]
    try:
        _chattr("+i", *files)
        yield
    finally:
        if existing := [path for path in files if path.exists()]:
            _chattr("-i", *existing)  # never left immutable: pytest could not remove it


@pytest.fixture(autouse=True)
def _immutable_files_supported(tmp_path: Path) -> None:
    if shutil.which("chattr") is None or os.geteuid() != 0:
        pytest.skip("needs chattr as root, to make the database file immutable for a moment")
    probe = tmp_path / "chattr-probe"
    probe.touch()
    try:
        _chattr("+i", probe)
    except subprocess.CalledProcessError:
        pytest.skip(f"the file system of {tmp_path} has no immutable flag")
    _chattr("-i", probe)


def _events(log: str) -> list[dict[str, Any]]:
    events = []
    for line in log.splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    return events


def test_a_worker_waits_out_a_database_io_error_while_it_records_a_job(tmp_path, start_node):
    series = write_phantom_series(tmp_path / "series", SMALL)
    node = start_node(
        rules=CT_RULES,
        inference={**FAST_CHECKS, "job_timeout_minutes": None},
        logging={"level": "INFO", "format": "json"},
    )
    pipe = node.storage / DEVICE_UID_FILE
    os.mkfifo(pipe)  # read by the worker in stage encode: it waits there until the test writes the UID
    assert storescu(node.port, series.files).returncode == 0
    writer = wait_for(lambda: _open_for_writing(pipe), timeout=120, what="the worker to read the named pipe")

    with database_not_writable(node.storage / "dicom-node.db"):
        wait_for(lambda: "job.lease_not_renewed" in node.log(), timeout=60, what="a lease renewal to fail")
        os.write(writer, DEVICE_UID.encode())  # the worker finishes the job and records it while SQLite cannot write
        os.close(writer)
        pipe.unlink()
        wait_for(lambda: "the outcome of job" in node.log() or "worker.died" in node.log(), timeout=60)
        time.sleep(4)  # the outage goes on: a connection SQLite opens now is read-only
    node.wait_for_state(series.series_instance_uid, JobState.DONE, timeout=120)

    with node.sessions() as session:
        job = job_for_series_uid(session, series.series_instance_uid)
        assert job is not None
        history = [(event.to_state, event.reason) for event in job.events]
        assert job.worker_deaths == 0, history
        assert [state for state, _ in history].count(JobState.PROCESSING) == 1, history
    events = _events(node.log())
    names = {event["event"] for event in events}
    assert not names & {"job.crashed", "job.worker_died", "worker.died", "job.failed"}, names
    renewals = [(e["level"], e.get("reason")) for e in events if e["event"] == "job.lease_not_renewed"]
    # a connection the heartbeat opens during the outage (a busy machine makes that likelier) is read-only
    outage = {
        ("WARNING", f"the database could not be read or written ({error}); the lease is renewed again in 1 s")
        for error in ("disk I/O error", "attempt to write a readonly database")
    }
    assert renewals and set(renewals) <= outage, renewals
    waits = [e["reason"] for e in events if e["event"] == "database.busy" and "the outcome of job" in e["waiting"]]
    assert waits, names
    assert set(waits) <= {
        "the database could not be read or written (disk I/O error)",
        "the database could not be read or written (attempt to write a readonly database)",
    }, waits


def test_a_connection_opened_while_the_database_could_not_be_written_is_not_kept(tmp_path):
    database = tmp_path / "dicom-node.db"
    engine = make_engine(f"sqlite:///{database}")
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE probe (value INTEGER)"))
    with contextlib.closing(sqlite3.connect(database)) as other_process:  # keeps the write-ahead log in place
        other_process.execute("SELECT count(*) FROM probe").fetchall()
        engine.dispose()  # the engine's next connection is opened during the outage

        with database_not_writable(database), engine.connect() as connection:  # SQLite opens it read-only
            reader = connection.execution_options(isolation_level="AUTOCOMMIT")  # as read_outside_transaction reads
            assert reader.execute(text("SELECT count(*) FROM probe")).scalar_one() == 0

        refused = []
        for value in range(2):
            try:
                with engine.begin() as connection:
                    connection.execute(text("INSERT INTO probe VALUES (:value)"), {"value": value})
                break
            except OperationalError as exc:
                refused.append(str(exc.orig))
        assert other_process.execute("SELECT count(*) FROM probe").fetchone() == (1,), refused
    assert refused in ([], ["attempt to write a readonly database"])
    engine.dispose()


def test_a_stage_the_database_could_not_record_defers_the_job_naming_the_error(tmp_path):
    database = tmp_path / "dicom-node.db"
    engine = make_engine(f"sqlite:///{database}")
    with engine.begin() as connection:  # the pool keeps this connection, and with it the write-ahead log
        connection.execute(text("CREATE TABLE stage (name TEXT)"))

    def record_stage(name: str) -> None:
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO stage VALUES (:name)"), {"name": name})

    claim = ClaimedJob(7, "1.2.3", "baseline", [], [], attempt=1)
    settings = Settings(storage={"directory": str(tmp_path / "storage")})
    with database_not_writable(database):
        outcome = run_pipeline(claim, settings, ModelCache(settings), record_stage)
    engine.dispose()

    assert isinstance(outcome, Deferred), outcome
    assert outcome.event == "job.waiting_for_database"
    assert outcome.reason == (
        "waiting for the database: the database could not be read or written (disk I/O error) while the series was "
        "processed; queued again"
    )
