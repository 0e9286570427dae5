"""The associations a receiving process has open and the series each stored images of, kept in a file per process.

An association that ends in an abort marks its series cut short (:mod:`db.transfers`), so completion waits for the
rest instead of processing half a series as whole. A receiving process that dies (killed, crashed, out of memory)
takes its associations with it, and no abort is ever handled for them. So each process notes, in
``journal/<pid>.transfers``, each series an association stores its first image of, and the association's end; the
file exists only while such an association is open. Whoever finds the file of a process that is gone (``serve``'s
supervisor at once, start-up after the whole node stopped) marks the series still open in it cut short
(:func:`mark_left_open`).

The file also says which series each open association is sending now (the last it switched to): completion does not
take that series for whole after the quiet period while its sender is still sending it (:func:`series_being_sent`),
as a scanner that sends images while it reconstructs them may pause longer than the quiet period.

Lines are appended with one ``write`` each on an ``O_APPEND`` file, without fsync, as the journal's are: a process
that dies leaves them in the kernel's page cache.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from db import transfers
from dicom_node.logs import log_event, log_throttled, os_error_text

LOG = logging.getLogger(__name__)

SUFFIX = ".transfers"
COMPACT_AFTER_LINES = 1000
"""A file this long is written again with the open associations' lines only (on a node where some association is
always open, it would never be deleted and grow with every series)."""
ASSOCIATION_NUMBER = "_dicom_node_transfer_number"
"""Set on an association once it stores an image: its number in this process' file."""
SENDING_NOW = "_dicom_node_sending_series"
"""Set on an association: the SeriesInstanceUID of the image it stored last."""


class OpenTransfers:
    """This process' file of open associations that stored images, and the series of each."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = threading.Lock()
        self._numbers = itertools.count(1)
        self._open: dict[int, list[dict[str, Any]]] = {}  # association number -> the lines of its series
        self._descriptor: int | None = None
        self._lines = 0  # in the file now

    @property
    def path(self) -> Path:
        return self.folder / f"{os.getpid()}{SUFFIX}"

    def storing(self, assoc: Any, series_instance_uid: str) -> None:
        """``assoc`` stored an image of ``series_instance_uid`` (called before that image is acknowledged). A line
        is written only where the association stores its first image, or switches to another series."""
        if getattr(assoc, SENDING_NOW, None) == series_instance_uid:
            return
        with self._lock:
            setattr(assoc, SENDING_NOW, series_instance_uid)
            number = getattr(assoc, ASSOCIATION_NUMBER, None)
            if number is None:
                number = next(self._numbers)
                setattr(assoc, ASSOCIATION_NUMBER, number)
            requestor = assoc.requestor
            entry = {
                "association": number,
                "series": series_instance_uid,
                "calling_ae": requestor.ae_title,
                "address": requestor.address,
            }
            entries = self._open.setdefault(number, [])
            entries[:] = [kept for kept in entries if kept["series"] != series_instance_uid] + [entry]  # now last
            self._write(entry)

    def ended(self, assoc: Any) -> None:
        """``assoc`` ended and its series are marked as its end says; the file goes once no association is open."""
        number = getattr(assoc, ASSOCIATION_NUMBER, None)
        if number is None:
            return  # it stored nothing
        with self._lock:
            if self._open.pop(number, None) is None:
                return  # ended already (at its release request)
            if not self._open:
                self._close()
                try:
                    self.path.unlink(missing_ok=True)
                except OSError as error:
                    self._not_written(error)
            elif self._lines >= COMPACT_AFTER_LINES:
                self._compact()
            else:
                self._write({"association": number, "ended": True})

    def _close(self) -> None:
        if self._descriptor is not None:
            descriptor, self._descriptor = self._descriptor, None
            with contextlib.suppress(OSError):  # Linux frees the descriptor even when close reports an error
                os.close(descriptor)
        self._lines = 0

    def _compact(self) -> None:
        """Write the file again with the open associations' lines only; the old one stands until the new one
        replaces it."""
        lines = [entry for entries in self._open.values() for entry in entries]
        temporary = self.path.with_name(self.path.name + ".new")
        try:
            temporary.write_bytes(b"".join(_line(entry) for entry in lines))
            os.replace(temporary, self.path)
        except OSError as error:
            self._not_written(error)
            return
        self._close()
        self._lines = len(lines)

    def _write(self, entry: dict[str, Any]) -> None:
        """Append one line; a file that cannot be written is logged and the image acknowledged all the same (its
        series then lacks this defence only should this process die while the association is open)."""
        try:
            if self._descriptor is None:
                self.folder.mkdir(parents=True, exist_ok=True)
                self._descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.write(self._descriptor, _line(entry))
            self._lines += 1
        except OSError as error:
            self._not_written(error)

    def _not_written(self, error: OSError) -> None:
        log_throttled(
            LOG,
            logging.WARNING,
            "receiver.transfers_not_noted",
            str(self.path),
            path=str(self.path),
            reason=f"the list of open associations at {self.path} cannot be written ({os_error_text(error)}); "
            "should this receiving process die while one is open, its series would complete without a partial "
            "warning",
        )


def _line(entry: dict[str, Any]) -> bytes:
    return (json.dumps(entry, ensure_ascii=True) + "\n").encode("ascii")


@dataclass
class LeftOpen:
    """An association open when its receiving process ended, and the series it stored images of."""

    calling_ae_title: str | None
    address: str | None
    series: set[str] = field(default_factory=set)
    sending: str | None = None  # the series it stored its latest image of

    @property
    def sender(self) -> str:
        return f"{self.calling_ae_title or 'a sender'}" + (f" at {self.address}" if self.address else "")


def left_open(path: Path) -> list[LeftOpen]:
    """The associations ``path`` (a gone process' file) shows open; a line cut off as the process died is skipped."""
    associations: dict[int, LeftOpen] = {}
    for line in path.read_bytes().decode("ascii", errors="replace").splitlines():
        try:
            entry = json.loads(line)
            number = int(entry["association"])
        except (ValueError, KeyError, TypeError):
            continue
        if entry.get("ended"):
            associations.pop(number, None)
        elif isinstance(entry.get("series"), str):
            calling, address = entry.get("calling_ae"), entry.get("address")
            known = associations.setdefault(
                number,
                LeftOpen(calling if isinstance(calling, str) else None, address if isinstance(address, str) else None),
            )
            known.series.add(entry["series"])
            known.sending = entry["series"]
    return list(associations.values())


def series_being_sent(folder: Path) -> set[str]:
    """The series each association still open (by the files of the receiving processes) is sending now."""
    try:
        files = [path for _pid, path in files_left(folder)]
    except OSError:
        return set()
    sending: set[str] = set()
    for path in files:
        try:
            sending.update(each.sending for each in left_open(path) if each.sending)
        except OSError:
            continue  # its association ended meanwhile and the file went
    return sending


def files_left(folder: Path, pid: int | None = None) -> Iterator[tuple[int, Path]]:
    """(pid, file) of the process ``pid``, or of every process, that left a file in ``folder``."""
    pattern = f"{pid}{SUFFIX}" if pid is not None else f"*{SUFFIX}"
    for path in sorted(folder.glob(pattern)):
        if path.stem.isdigit():
            yield int(path.stem), path


def mark_left_open(
    folder: Path, sessions: sessionmaker[Session], how: str, pid: int | None = None, at: datetime | None = None
) -> int:
    """Mark cut short each series an association was storing when its receiving process (``pid``, or any: call it
    only when none runs) ended, ``how`` saying how; delete the files. Returns how many series were marked.

    ``at``: when the process is known to have been alive last (a sender's association begun after it that is
    released clears the mark, :func:`db.transfers.clear_interrupted`). Raises if the database cannot be written:
    the file stays for the next try."""
    marked = 0
    for process, path in files_left(folder, pid):
        for association in left_open(path):
            reason = (
                f"the node's receiving process (pid {process}) stopped while the association from "
                f"{association.sender} was open: {how}"
            )
            log_event(
                LOG,
                logging.WARNING,
                "series.interrupted",
                calling_ae=association.calling_ae_title,
                address=association.address,
                series=len(association.series),
                reason=f"{reason}, after it had stored images of {len(association.series)} series; each waits for "
                "the rest (completion.expected_count_timeout_seconds) before it is processed, then is marked partial",
            )
            transfers.note_interrupted(sessions, association.series, association.calling_ae_title, reason, at=at)
            marked += len(association.series)
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".new").unlink(missing_ok=True)  # a compaction the process did not finish
    return marked
