"""SQLite's write-ahead log stays within its limit over weeks of uptime: while readers overlap SQLite never starts it
over, so ``serve`` checkpoints it once no reader or writer holds the database; a burst leaves at most the limit."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from db.models import AuditEvent
from db.session import (
    JOURNAL_SIZE_LIMIT_BYTES,
    make_engine,
    make_session_factory,
    migrate,
    read_only,
    sqlite_file,
    transaction,
)
from dicom_node.config import Settings
from dicom_node.service import _start_wal_checkpoint
from dicom_node.wal_checkpoint import BUSY_PASSES_BEFORE_WARNING, WalCheckpoint

DETAIL = "x" * 1900  # near the most an audit record's detail holds


def _database(tmp_path: Path) -> tuple[str, sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path / 'dicom-node.db'}"
    migrate(url)
    return url, make_session_factory(make_engine(url))


def _write(sessions: sessionmaker[Session], megabytes: int) -> None:
    """About ``megabytes`` of audit records, in transactions of 1 MB as the node commits its batches."""
    for _ in range(megabytes):
        with transaction(sessions) as session:
            session.add_all([AuditEvent(action="store", outcome="success", detail=DETAIL) for _ in range(500)])


def _wal_bytes(url: str) -> int:
    database = sqlite_file(url)
    assert database is not None
    return os.path.getsize(f"{database}-wal")


def _checkpoint(tmp_path: Path, url: str, sessions: sessionmaker[Session]) -> WalCheckpoint:
    database = sqlite_file(url)
    assert database is not None
    return WalCheckpoint(Settings.model_validate({"storage": {"directory": str(tmp_path)}}), sessions, database)


def test_the_log_outgrown_while_a_reader_held_the_database_is_emptied_once_the_reader_has_gone(tmp_path, caplog):
    url, sessions = _database(tmp_path)
    checkpoint = _checkpoint(tmp_path, url, sessions)
    caplog.set_level(logging.DEBUG, logger="dicom_node.wal_checkpoint")
    with read_only(sessions) as reader:  # a console page or a scrape reading meanwhile
        reader.execute(text("SELECT count(*) FROM audit_events")).scalar()
        _write(sessions, 40)
        assert _wal_bytes(url) > 2 * JOURNAL_SIZE_LIMIT_BYTES  # automatic checkpoints could not start it over
        assert checkpoint.run_once() is False  # the reader still holds it: left for a later pass, no writer held up
    assert _wal_bytes(url) > 2 * JOURNAL_SIZE_LIMIT_BYTES

    assert checkpoint.run_once() is True

    assert _wal_bytes(url) <= JOURNAL_SIZE_LIMIT_BYTES
    with sessions() as session:  # every record is in the database itself
        assert session.execute(text("SELECT count(*) FROM audit_events")).scalar() == 40 * 500
    assert caplog.records == []  # a checkpoint, done or left for later, logs nothing


def test_a_log_that_keeps_growing_because_readers_never_pause_is_named_once_and_its_end_too(tmp_path, caplog):
    url, sessions = _database(tmp_path)
    checkpoint = _checkpoint(tmp_path, url, sessions)
    caplog.set_level(logging.INFO, logger="dicom_node.wal_checkpoint")
    with read_only(sessions) as reader:  # readers overlapping back to back, for ten minutes' worth of passes
        reader.execute(text("SELECT count(*) FROM audit_events")).scalar()
        _write(sessions, 20)
        for _ in range(BUSY_PASSES_BEFORE_WARNING + 3):
            assert checkpoint.run_once() is False

    waiting = [r for r in caplog.records if r.msg == "database.checkpoint_waiting"]
    assert len(waiting) == 1 and waiting[0].levelno == logging.WARNING
    reason = waiting[0].__dict__["event_fields"]["reason"]
    assert f"the write-ahead log of the database {tmp_path / 'dicom-node.db'} is past 16 MiB and keeps growing" in (
        reason
    )
    assert f"at each of the last {BUSY_PASSES_BEFORE_WARNING} tries" in reason

    assert checkpoint.run_once() is True
    done = [r for r in caplog.records if r.msg == "database.checkpoint_done"]
    assert (
        len(done) == 1 and f"after {BUSY_PASSES_BEFORE_WARNING + 3} tries" in done[0].__dict__["event_fields"]["note"]
    )


def test_a_burst_without_readers_leaves_at_most_the_limit_behind(tmp_path):
    url, sessions = _database(tmp_path)
    with sessions() as session:
        assert session.execute(text("PRAGMA journal_size_limit")).scalar() == JOURNAL_SIZE_LIMIT_BYTES
    with transaction(sessions) as session:  # one large transaction: the log grows past the limit before its end
        session.add_all([AuditEvent(action="store", outcome="success", detail=DETAIL) for _ in range(20_000)])
    assert _wal_bytes(url) > JOURNAL_SIZE_LIMIT_BYTES

    _write(sessions, 2)  # the commit's automatic checkpoint copies the log back; the next write starts it over

    assert _wal_bytes(url) <= JOURNAL_SIZE_LIMIT_BYTES


def test_a_checkpoint_that_fails_says_so_in_one_sentence_naming_the_database(tmp_path, caplog):
    database = tmp_path / "damaged.db"
    database.write_bytes(b"not a database " * 1000)  # a damaged file whose log outgrew its limit
    Path(f"{database}-wal").write_bytes(b"\0" * (JOURNAL_SIZE_LIMIT_BYTES + 1))
    _url, sessions = _database(tmp_path)
    checkpoint = WalCheckpoint(Settings.model_validate({"storage": {"directory": str(tmp_path)}}), sessions, database)

    assert checkpoint.run_once() is False

    [line] = [r for r in caplog.records if r.name == "dicom_node.wal_checkpoint"]
    assert line.levelno == logging.WARNING and line.getMessage() == "database.checkpoint_failed"
    reason = line.__dict__["event_fields"]["reason"]
    assert reason.startswith(f"the write-ahead log of the database {database} could not be copied back into it (")
    assert "Error" not in reason  # SQLite's words, no exception class


def test_serve_checkpoints_sqlite_only(tmp_path):
    """``serve`` starts the checkpoint thread on SQLite (its file named), and none on PostgreSQL, which has no such log."""
    url, sessions = _database(tmp_path)
    sqlite = Settings.model_validate({"storage": {"directory": str(tmp_path)}, "database": {"url": url}})
    started = _start_wal_checkpoint(sqlite, sessions)
    assert started is not None and started.database == sqlite_file(url)
    assert started._thread.is_alive()
    started.stop()
    postgresql = Settings.model_validate(
        {"storage": {"directory": str(tmp_path)}, "database": {"url": "postgresql+psycopg://node@db.example.org/node"}}
    )
    assert _start_wal_checkpoint(postgresql, sessions) is None
