"""Series being retrieved now, so that no purge deletes them underneath a C-GET or C-MOVE.

Retrievals run in the receiving processes; ``dicom-node purge`` and retention run in other processes. Each
retrieval leaves a small file in ``<storage>/retrievals/`` naming the series it sends (as a purge names them: the
received series, also for its results) and its peer, and holds an exclusive ``flock`` on it until it ends. A purge
reads the files whose lock is held: a retrieval that ended, or whose process died, holds none, so its file never
keeps a series from being purged (and is removed by the next reader).

A purge looks before it touches the series, and again once it has set the series' images aside, as it does for
receivers' journals: a retrieval that registered before the second look is seen (and the images put back); one
that reads the database after the purge committed finds the series purged. Only one that read the instance rows
just before the purge and registers just after its second look (a few milliseconds) still finds their files gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

FOLDER = "retrievals"
SUFFIX = ".retrieval"


@dataclass(frozen=True)
class Retrieval:
    """A retrieval in progress: who retrieves, how, and which series (the Series Instance UIDs a purge names)."""

    peer: str  # "PLANNER at 10.0.0.7:4000"
    operation: str  # "C-GET", "C-MOVE to PACS"
    series: frozenset[str]

    def sentence(self) -> str:
        return f"{self.peer} ({self.operation})"


@contextlib.contextmanager
def retrieving(storage: Path | None, retrieval: Retrieval) -> Iterator[None]:
    """Hold a file naming ``retrieval``, locked, while the block runs (nothing when ``storage`` is None or no series
    is named). It is written under another name and renamed, so a reader never sees it half written."""
    if storage is None or not retrieval.series:
        yield
        return
    folder = storage / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{os.getpid()}-{uuid.uuid4().hex}"
    partial, final = folder / f"{name}.partial", folder / f"{name}{SUFFIX}"
    descriptor = os.open(partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        content = {"peer": retrieval.peer, "operation": retrieval.operation, "series": sorted(retrieval.series)}
        os.write(descriptor, json.dumps(content).encode())
        os.replace(partial, final)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                final.unlink()
    finally:
        with contextlib.suppress(OSError):
            partial.unlink()  # only left when writing failed
        os.close(descriptor)  # lets the lock go


def retrievals_of(storage: Path, series_instance_uid: str) -> list[Retrieval]:
    """The retrievals in progress (in any process on this host) that send series ``series_instance_uid``."""
    return [retrieval for retrieval in _in_progress(storage) if series_instance_uid in retrieval.series]


def being_retrieved(storage: Path, series_instance_uid: str) -> str | None:
    """Why series ``series_instance_uid`` must not be purged now (a sentence naming each retrieving peer), or None."""
    found = retrievals_of(storage, series_instance_uid)
    if not found:
        return None
    who = " and ".join(retrieval.sentence() for retrieval in found)
    return (
        f"series {series_instance_uid} is being retrieved by {who}; it is not purged while a peer is receiving it, "
        "but once the retrieval has ended (by the next retention pass, or `dicom-node purge` run again)"
    )


def _in_progress(storage: Path) -> Iterable[Retrieval]:
    folder = storage / FOLDER
    try:
        files = sorted(folder.glob(f"*{SUFFIX}"))
    except OSError:
        return
    for path in files:
        retrieval = _read_if_held(path)
        if retrieval is not None:
            yield retrieval


def _read_if_held(path: Path) -> Retrieval | None:
    """The retrieval ``path`` names while its lock is held; None (and the file removed) once it is not."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return None  # ended meanwhile
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            with open(descriptor, closefd=False, encoding="utf-8") as stream:
                content = json.loads(stream.read() or "{}")
            return Retrieval(
                str(content.get("peer", "a peer")),
                str(content.get("operation", "a retrieval")),
                frozenset(str(uid) for uid in content.get("series", [])),
            )
        with contextlib.suppress(OSError):
            path.unlink()  # its retrieval ended without removing it (the process died)
        return None
    except (OSError, ValueError):
        return None
    finally:
        os.close(descriptor)
