"""A thread of ``serve`` on SQLite: the write-ahead log is copied back into the database and emptied once it outgrows
its limit, which SQLite's own checkpoints never do while readers overlap."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from db.session import JOURNAL_SIZE_LIMIT_BYTES, checkpoint_wal
from dicom_node.config import Settings
from dicom_node.logs import log_event
from dicom_node.periodic import PeriodicTask

LOG = logging.getLogger(__name__)

CHECKPOINT_INTERVAL_SECONDS = 60.0
"""How often the write-ahead log's size is looked at: it grows by at most a minute of writes past its limit."""


class WalCheckpoint(PeriodicTask):
    """Every :data:`CHECKPOINT_INTERVAL_SECONDS`: :func:`db.session.checkpoint_wal` of the SQLite database, at a
    moment when no reader or writer holds it (a busy database is tried at the next pass, silently). Logs only a
    failure: one WARNING sentence naming the database file."""

    name = "database.checkpoint"

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], database: Path) -> None:
        super().__init__(settings, sessions)
        self.database = database

    @property
    def interval_seconds(self) -> float:
        return CHECKPOINT_INTERVAL_SECONDS

    def run_once(self) -> bool:
        """Checkpoint now if the log outgrew its limit; whether it is within the limit afterwards."""
        try:
            return checkpoint_wal(self.database)
        except (sqlite3.Error, OSError) as exc:
            log_event(
                LOG,
                logging.WARNING,
                "database.checkpoint_failed",
                database=str(self.database),
                reason=f"the write-ahead log of the database {self.database} could not be copied back into it "
                f"({str(exc) or 'SQLite gave no reason'}); it keeps growing past "
                f"{JOURNAL_SIZE_LIMIT_BYTES // (1024 * 1024)} MiB until a later try, one a minute, succeeds",
            )
            return False
