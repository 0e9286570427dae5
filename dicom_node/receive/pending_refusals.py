"""Refusals the database could not take when they happened, kept until it can.

An image refused on receipt counts against its series: completion marks the series partial unless the image is
sent again (:func:`db.ingest.instances_refused_for_series`). When the disk holding storage is full, the image is
refused (0xA700) and, where the database shares that disk, its refusal cannot be recorded either: without a record
the series completes from the images that did fit and its result goes out as whole. So a refusal the database
refuses is kept here: in memory, and in ``journal/<pid>.refusals``, a file of fixed slots whose space is allocated
when the process starts (writing into it needs no free space). The recorder records what is kept once the database
takes writes again; completion leaves a series with a refusal kept here alone until then
(:func:`series_with_kept_refusals`); a process that dies leaves the file to whoever finds it
(:func:`record_kept_refusals`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from db.ingest import record_rejection
from db.models import utcnow
from db.session import transaction
from dicom_node.logs import log_event, log_throttled, os_error_text

LOG = logging.getLogger(__name__)

SUFFIX = ".refusals"
SLOT_BYTES = 512
SLOTS = 4096
"""Refusals the file holds at once (2 MiB, allocated at start); more are kept in memory only (and lost, with a log
line saying so, should the process die before the database takes them)."""
SERIES_SLOTS = 256
"""Of those, the last ones go only to a series that has no slot yet: every series with a refusal kept holds at least
one, so completion waits for it and a process that dies leaves it marked partial, however many other images were
refused."""
REASON_CHARACTERS = 200
"""A reason is kept in its slot up to this long (the full text in memory)."""


class RefusalKeeper:
    """This process' refusals not yet recorded, in memory and in its preallocated file of slots."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / f"{os.getpid()}{SUFFIX}"
        self._lock = threading.Lock()
        self._kept: list[tuple[dict[str, Any], int | None]] = []  # (record_rejection's arguments, slot)
        self._free = list(range(SLOTS - 1, -1, -1))
        self._series_with_slot: set[str | None] = set()
        self._memory_only = 0  # refusals kept now without a slot
        self._descriptor: int | None = None
        self._allocate(folder)

    def _allocate(self, folder: Path) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as error:
            self._not_allocated(error)
            return
        try:
            os.posix_fallocate(descriptor, 0, SLOTS * SLOT_BYTES)
        except OSError as error:
            os.close(descriptor)
            self.path.unlink(missing_ok=True)
            self._not_allocated(error)
            return
        self._descriptor = descriptor

    def _not_allocated(self, error: OSError) -> None:
        log_event(
            LOG,
            logging.WARNING,
            "receiver.refusal_file_unavailable",
            path=str(self.path),
            reason=f"the file that keeps refusals the database cannot take ({self.path}) could not be made "
            f"({os_error_text(error)}); such refusals are kept in memory only, and lost should this process die",
        )

    def keep(self, **refusal: Any) -> None:
        """Keep a refusal (:func:`db.ingest.record_rejection`'s arguments) the database would not take."""
        refusal.setdefault("received_at", utcnow())
        series = refusal.get("series_instance_uid")
        with self._lock:
            slot = None
            if self._descriptor is not None and (
                len(self._free) > SERIES_SLOTS or (self._free and series not in self._series_with_slot)
            ):
                slot = self._free.pop()
                if self._write(slot, _slot_bytes(refusal)):
                    self._series_with_slot.add(series)
                else:
                    self._free.append(slot)
                    slot = None
            self._kept.append((refusal, slot))
            if slot is None:
                self._memory_only += 1
                memory_only = self._memory_only
        if slot is None:
            log_throttled(
                LOG,
                logging.ERROR,
                "instance.rejection_in_memory_only",
                str(self.path),
                refusals=memory_only,
                reason=f"{memory_only} refusal(s) the database could not take are kept in memory only (its file "
                f"{self.path} is full or missing): should this receiving process die before the database takes "
                "writes again, they are not recorded, and their series may complete without counting them",
            )
        log_throttled(
            LOG,
            logging.WARNING,
            "instance.rejection_kept",
            str(self.path),
            sop_instance_uid=refusal.get("sop_instance_uid"),
            series_instance_uid=refusal.get("series_instance_uid"),
            reason="the database could not record this refusal (its disk may be full): it is kept and recorded "
            "once the database takes writes again; its series waits for that before it is completed",
        )

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._kept)

    def record(self, sessions: sessionmaker[Session]) -> bool:
        """Record every refusal kept, in one transaction; whether none is left. Never raises."""
        with self._lock:
            kept = list(self._kept)
        if not kept:
            return True
        try:
            with transaction(sessions) as session:
                for refusal, _slot in kept:
                    record_rejection(session, **refusal)
        except Exception:  # noqa: BLE001 - still full, locked or gone: the next try
            return False
        with self._lock:
            del self._kept[: len(kept)]
            for _refusal, slot in kept:
                if slot is None:
                    self._memory_only -= 1
                elif self._write(slot, b"\0"):
                    self._free.append(slot)
            self._series_with_slot = {
                refusal.get("series_instance_uid") for refusal, slot in self._kept if slot is not None
            }
        log_event(
            LOG,
            logging.INFO,
            "instance.rejections_recorded",
            refusals=len(kept),
            note=f"{len(kept)} refusal(s) the database could not take earlier are recorded now",
        )
        return True

    def close(self) -> None:
        """At a clean stop: the file goes once nothing is kept (else it stays for the next start)."""
        with self._lock:
            if self._descriptor is not None:
                os.close(self._descriptor)
                self._descriptor = None
            if not self._kept:
                self.path.unlink(missing_ok=True)

    def _write(self, slot: int, data: bytes) -> bool:
        assert self._descriptor is not None
        try:
            os.pwrite(self._descriptor, data, slot * SLOT_BYTES)
            return True
        except OSError:
            return False


def _slot_bytes(refusal: dict[str, Any]) -> bytes:
    """The refusal as its slot holds it: JSON, its reason shortened to fit."""
    stored = {**refusal, "received_at": refusal["received_at"].isoformat()}
    stored["reason"] = str(stored.get("reason") or "")[:REASON_CHARACTERS]
    data = json.dumps(stored, ensure_ascii=True).encode("ascii")
    if len(data) >= SLOT_BYTES:  # UIDs and titles are bounded: only a long transfer syntax or path could do this
        stored["path"] = None
        data = json.dumps(stored, ensure_ascii=True).encode("ascii")[: SLOT_BYTES - 1]
    return data + b"\0"


def kept_in(path: Path) -> Iterator[dict[str, Any]]:
    """The refusals a file holds (slots cut off or unreadable are skipped)."""
    try:
        content = path.read_bytes()
    except OSError:
        return
    for offset in range(0, len(content), SLOT_BYTES):
        data = content[offset : offset + SLOT_BYTES].split(b"\0", 1)[0]
        if not data:
            continue
        try:
            refusal = json.loads(data)
            refusal["received_at"] = datetime.fromisoformat(refusal["received_at"])
        except (ValueError, KeyError, TypeError):
            continue
        yield refusal


_READ: dict[Path, tuple[int, frozenset[str]]] = {}
"""Each file's series as last read, by its modification time: a file unchanged for two seconds since is not read
again (each is 2 MiB, and completion asks at every pass)."""


def series_with_kept_refusals(storage_directory: Path) -> set[str]:
    """Series with a refusal that some receiving process keeps, not recorded yet."""
    folder = storage_directory / "journal"
    try:
        files = list(folder.glob(f"*{SUFFIX}"))
    except OSError:
        return set()
    series: set[str] = set()
    for path in files:
        try:
            changed = path.stat().st_mtime_ns
        except OSError:
            continue  # gone meanwhile: nothing kept
        known = _READ.get(path)
        recent = time.time_ns() - changed < 2_000_000_000  # two writes within one tick of the file clock look alike
        if known is None or known[0] != changed or recent:
            found = frozenset(str(r["series_instance_uid"]) for r in kept_in(path) if r.get("series_instance_uid"))
            known = _READ[path] = (changed, found)
        series |= known[1]
    for gone in set(_READ) - set(files):
        del _READ[gone]
    return series


def record_kept_refusals(folder: Path, sessions: sessionmaker[Session], pid: int | None = None) -> int:
    """Record the refusals kept by a receiving process that is gone (``pid``), or by every one (call it only when
    none runs), and delete their files; how many. Raises if the database cannot be written: the files stay."""
    pattern = f"{pid}{SUFFIX}" if pid is not None else f"*{SUFFIX}"
    recorded = 0
    for path in sorted(folder.glob(pattern)):
        refusals = list(kept_in(path))
        if refusals:
            with transaction(sessions) as session:
                for refusal in refusals:
                    record_rejection(session, **refusal)
            recorded += len(refusals)
        path.unlink(missing_ok=True)
    if recorded:
        log_event(
            LOG,
            logging.WARNING,
            "instance.rejections_recorded",
            refusals=recorded,
            note=f"{recorded} refusal(s) kept by a receiving process that stopped before the database took them are "
            "recorded now",
        )
    return recorded
