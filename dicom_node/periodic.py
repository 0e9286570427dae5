"""A thread of ``serve`` that runs one pass of work every few seconds and survives a failed pass."""

from __future__ import annotations

import logging
import threading
from typing import Any

from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from dicom_node.config import Settings
from dicom_node.logs import log_event


class PeriodicTask:
    """Calls :meth:`run_once` every :attr:`interval_seconds` until stopped.

    A pass that raises is logged as ``<name>.pass_failed`` with its trace, and the
    next pass runs as usual: one bad series must not stop the node's loops.
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
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except StaleDataError:  # another process changed a job this pass had read: the next pass decides again
                log_event(
                    self._log,
                    logging.INFO,
                    f"{self.name}.changed_meanwhile",
                    note="a series changed state while this pass looked at it; the next pass looks again",
                )
            except Exception:  # noqa: BLE001 - keep running; the trace is logged
                self._log.exception(f"{self.name}.pass_failed")
            self._stop.wait(self.interval_seconds)
