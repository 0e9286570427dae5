"""A thread of ``serve`` on SQLite: the write-ahead log is copied back into the database and emptied once it outgrows
its limit, which SQLite's own checkpoints never do while readers overlap."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from db.session import JOURNAL_SIZE_LIMIT_BYTES, checkpoint_wal, wal_file
from dicom_node.config import Settings
from dicom_node.logs import log_event
from dicom_node.periodic import PeriodicTask

LOG = logging.getLogger(__name__)

CHECKPOINT_INTERVAL_SECONDS = 60.0
"""How often the write-ahead log's size is looked at: it grows by at most a minute of writes past its limit."""

BUSY_PASSES_BEFORE_WARNING = 10
"""Passes in a row that found the database always in use (readers overlapping back to back) before the log says
that the write-ahead log keeps growing; then again every :data:`BUSY_PASSES_BETWEEN_WARNINGS` passes."""
BUSY_PASSES_BETWEEN_WARNINGS = 60


class WalCheckpoint(PeriodicTask):
    """Every :data:`CHECKPOINT_INTERVAL_SECONDS`: :func:`db.session.checkpoint_wal` of the SQLite database, at a
    moment when no reader or writer holds it (a busy database is tried at the next pass). Logs a failure, and a
    database found busy at :data:`BUSY_PASSES_BEFORE_WARNING` passes in a row (the log then keeps growing), at
    WARNING naming the database file; the pass that empties it after that, at INFO."""

    name = "database.checkpoint"

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], database: Path) -> None:
        super().__init__(settings, sessions)
        self.database = database
        self._busy_passes = 0

    @property
    def interval_seconds(self) -> float:
        return CHECKPOINT_INTERVAL_SECONDS

    def run_once(self) -> bool:
        """Checkpoint now if the log outgrew its limit; whether it is within the limit afterwards."""
        try:
            within = checkpoint_wal(self.database)
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
        self._note_busy(within)
        return within

    def _note_busy(self, within: bool) -> None:
        """Count the passes in a row that found the database in use; say so once they are many, and when it ends."""
        if within:
            if self._busy_passes >= BUSY_PASSES_BEFORE_WARNING:
                log_event(
                    LOG,
                    logging.INFO,
                    "database.checkpoint_done",
                    database=str(self.database),
                    note=f"the write-ahead log of the database {self.database} was copied back into it and emptied "
                    f"after {self._busy_passes} tries that found the database in use",
                )
            self._busy_passes = 0
            return
        self._busy_passes += 1
        over = self._busy_passes - BUSY_PASSES_BEFORE_WARNING
        if over < 0 or over % BUSY_PASSES_BETWEEN_WARNINGS:
            return
        log_event(
            LOG,
            logging.WARNING,
            "database.checkpoint_waiting",
            database=str(self.database),
            wal_megabytes=round(self._wal_bytes() / 1_000_000, 1),
            reason=f"the write-ahead log of the database {self.database} is past "
            f"{JOURNAL_SIZE_LIMIT_BYTES // (1024 * 1024)} MiB and keeps growing: at each of the last "
            f"{self._busy_passes} tries, one a minute, a reader or writer was using the database (console pages, "
            "/metrics scrapes or Query/Retrieve answers overlapping without a pause); it is emptied at the first "
            "try that finds a pause",
        )

    def _wal_bytes(self) -> int:
        try:
            return wal_file(self.database).stat().st_size
        except OSError:
            return 0
