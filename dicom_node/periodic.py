"""A thread of ``serve`` that runs one pass of work every few seconds and survives a failed pass."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from db.session import DatabaseBusy, is_database_locked
from dicom_node.config import Settings
from dicom_node.logs import log_event

REPEATED_FAILURE_LOG_SECONDS = 60.0
"""While passes keep failing (a damaged or unreachable database), one ``pass_failed`` line this often."""

STOP_WAIT_LOG_SECONDS = 30.0
"""While a stop waits for a pass that has not ended, one ``stop_waiting`` line this often, naming the task."""


class PeriodicTask:
    """Calls :meth:`run_once` every :attr:`interval_seconds` until stopped.

    A pass that raises is logged as ``<name>.pass_failed`` with a reason and, for the
    first of a run of failures, its trace (a database locked by another process: a WARNING
    in words, no trace); the next pass runs as usual: one bad series
    must not stop the node's loops, and a database that stays broken writes one line a
    minute, not one a pass. The pass after the last failure logs ``<name>.recovered``.
    """

    name = "task"

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._log = logging.getLogger(type(self).__module__)

    @property
    def interval_seconds(self) -> float:
        raise NotImplementedError

    def run_once(self) -> Any:
        raise NotImplementedError

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Run no further pass, and return once the pass in progress has ended: never while it still writes.

        A pass still running :data:`STOP_WAIT_LOG_SECONDS` after the stop is named in the log (``stop_waiting``),
        and again at each such interval, while the stop goes on waiting for it.
        """
        self._stop.set()
        if threading.current_thread() is self._thread or not self._thread.is_alive():
            return  # asked from its own pass (the loop ends once that pass returns), or not running
        started = time.monotonic()
        self._thread.join(timeout=STOP_WAIT_LOG_SECONDS)
        while self._thread.is_alive():
            waited = time.monotonic() - started
            log_event(
                self._log,
                logging.WARNING,
                f"{self.name}.stop_waiting",
                task=self.name,
                waited_seconds=round(waited),
                reason=f"the {self.name} task (thread {self._thread.name}) had not finished its pass {waited:.0f} s "
                "after the node was asked to stop (it may be waiting for a locked database or a slow disk); the stop "
                "waits for it, so that nothing the pass writes is cut off",
            )
            self._thread.join(timeout=STOP_WAIT_LOG_SECONDS)

    def _run(self) -> None:
        failures = 0  # passes failed in a row
        logged_at = 0.0
        logged: tuple[type, str] | None = None  # the error whose trace was logged last
        while not self._stop.is_set():
            try:
                self.run_once()
                if failures:
                    log_event(self._log, logging.INFO, f"{self.name}.recovered", failed_passes=failures)
                failures, logged = 0, None
            except StaleDataError:  # another process changed a job this pass had read: the next pass decides again
                log_event(
                    self._log,
                    logging.INFO,
                    f"{self.name}.changed_meanwhile",
                    note="a series changed state while this pass looked at it; the next pass looks again",
                )
            except Exception as exc:  # noqa: BLE001 - keep running; each new error's trace is logged once
                failures += 1
                locked = locked_database_words(exc)
                kind = (DatabaseBusy, "") if locked else (type(exc), str(exc)[:200])
                new = kind != logged
                if new or time.monotonic() - logged_at >= REPEATED_FAILURE_LOG_SECONDS:
                    logged_at, logged = time.monotonic(), kind
                    self._log_failure(exc, failures, new, locked)
            self._stop.wait(self.interval_seconds)

    def _log_failure(self, exc: Exception, failures: int, new: bool, locked: str | None) -> None:
        """``pass_failed``: a database locked by another process is a WARNING in words; any other error an ERROR,
        with its trace when it is new."""
        if locked:
            again = (
                f"the pass is tried again in {self.interval_seconds:g} s; while the database stays locked, one line "
                "a minute counts the failed passes"
            )
            fields = {"failed_passes": failures, "reason": f"{locked}; {again}"}
            self._log.warning(f"{self.name}.pass_failed", extra={"event_fields": fields})
            return
        self._log.error(
            f"{self.name}.pass_failed",
            exc_info=new,
            extra={"event_fields": {"failed_passes": failures, "reason": self._failure_reason(exc, new)}},
        )

    def _failure_reason(self, exc: Exception, traced: bool) -> str:
        details = "its details are in this line's exception field" if traced else "the same error as logged before"
        again = (
            f"it runs again every {self.interval_seconds:g} s; while it keeps failing, one line a minute counts "
            "the failed passes"
        )
        if isinstance(exc, DBAPIError):
            return f"the database could not be read or written (damaged, locked or unreachable; {details}); {again}"
        return f"an unexpected error ({details}); {again}"


def locked_database_words(error: BaseException) -> str | None:
    """Why a database another process holds locked stopped the caller, in words; None for any other error."""
    if isinstance(error, DatabaseBusy):
        return str(error)  # "the database is locked by another process for 30 s while ..."
    if is_database_locked(error):
        return "the database is locked by another process"
    return None
