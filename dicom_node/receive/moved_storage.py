"""The storage folder named by another path than the database's rows: moved, or named through a symbolic link.

Every stored file is recorded by its full path (``instances``, ``rejected_instances``, ``deliveries``, and a job's
``result_path``, ``result_files`` and delivery plans). When the folder is moved with its database, or named once
through a symbolic link and then by its real path, those rows name a folder that is not the current one. At
start-up, before anything compares the rows with the disk, :func:`adopt_moved_storage` finds each such folder and,
when the recorded files are at the same place inside the current folder, rewrites every row's path in one
transaction, so no stored image is taken for an unrecorded copy.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path, PurePath

from sqlalchemy import ColumnElement, func, literal, not_, select, update
from sqlalchemy.orm import InstrumentedAttribute, Session, sessionmaker

from db.models import Delivery, Instance, Job, RejectedInstance
from db.results import DeliveryRecord
from db.session import transaction
from dicom_node.logs import log_event

LOG = logging.getLogger(__name__)

SAMPLE_FILES = 50
"""Recorded files of another folder looked for inside the current one before its rows are rewritten."""
MOST_FOLDERS = 20
"""Other folders examined at one start-up (each costs a query; rows naming no storage folder are left alone)."""

_PLAIN_PATH_COLUMNS: tuple[InstrumentedAttribute[str] | InstrumentedAttribute[str | None], ...] = (
    Instance.path,
    RejectedInstance.path,
    Delivery.path,
)
"""Columns that hold one path each; a job's paths (its results folder, files and plans) are rewritten row by row."""
_FOLDER_DEPTH = {
    Instance.path: ("instances", 3),
    RejectedInstance.path: ("quarantine", 1),
    Job.result_path: ("jobs", 1),
}
"""Where a storage folder's sub-folder sits in each kind of recorded path: ``<storage>/instances/<study>/<series>/
<file>``, ``<storage>/quarantine/<file>``, ``<storage>/jobs/<job folder>``."""


@dataclass(frozen=True)
class MovedStorage:
    """One folder the rows named, now rewritten to the current storage folder."""

    old: str
    new: str
    rows: int


def adopt_moved_storage(root: Path, sessions: sessionmaker[Session]) -> list[MovedStorage]:
    """Rewrite the paths of rows that name another storage folder whose files are now inside ``root``.

    Another folder is adopted when it resolves to ``root`` (a symbolic link) or when some of its recorded files are
    at the same place inside ``root`` (the folder was moved, or copied, there). Each folder is rewritten in one
    transaction and logged once (``repair.storage_moved``); running it again changes nothing. Rows naming a folder
    whose files are not inside ``root`` are left as they are.
    """
    current = _prefix(str(root))
    examined: list[str] = []
    moved: list[MovedStorage] = []
    while len(examined) < MOST_FOLDERS:
        with sessions() as session:
            old = _another_storage_folder(session, current, examined)
        if old is None:
            break
        examined.append(old)
        if not _holds_its_files(root, old, sessions):
            continue
        with transaction(sessions) as session:
            rows = _rewrite_paths(session, old, current)
        moved.append(MovedStorage(old.rstrip("/"), str(root), rows))
        log_event(
            LOG,
            logging.WARNING,
            "repair.storage_moved",
            old_directory=old.rstrip("/"),
            directory=str(root),
            rows=rows,
            note=f"the database recorded the stored images and results in {old.rstrip('/')}, and they are now in "
            f"the storage folder {root} (moved, or named by another path): {rows} database rows now name {root}",
        )
    return moved


def _prefix(folder: str) -> str:
    return folder.rstrip("/") + "/"


def _another_storage_folder(session: Session, current: str, examined: list[str]) -> str | None:
    """A storage folder (as a prefix ending in ``/``) that a row names, other than ``current`` and ``examined``."""
    for column, (sub_folder, depth) in _FOLDER_DEPTH.items():
        elsewhere = [not_(column.startswith(prefix, autoescape=True)) for prefix in (current, *examined)]
        rows = session.scalars(select(column).where(column.is_not(None), *elsewhere).limit(MOST_FOLDERS))
        for path in rows:
            folder = _storage_folder(PurePath(path), sub_folder, depth) if path else None
            if folder is not None and _prefix(folder) not in examined:
                return _prefix(folder)
    return None


def _storage_folder(path: PurePath, sub_folder: str, depth: int) -> str | None:
    """The storage folder of a recorded path laid out as ``<storage>/<sub_folder>/<depth parts>``, or None."""
    if not path.is_absolute() or len(path.parents) <= depth + 1 or path.parents[depth - 1].name != sub_folder:
        return None
    return str(path.parents[depth])


def _holds_its_files(root: Path, old: str, sessions: sessionmaker[Session]) -> bool:
    """Whether ``old`` is ``root`` by another name, or some of its recorded files are at their place in ``root``."""
    if Path(old).resolve() == root.resolve():
        return True
    with sessions() as session:
        for column in _FOLDER_DEPTH:
            sample = session.scalars(select(column).where(column.startswith(old, autoescape=True)).limit(SAMPLE_FILES))
            if any((root / path.removeprefix(old)).exists() for path in sample if path):
                return True
    return False


def _rewrite_paths(session: Session, old: str, new: str) -> int:
    """Rewrite every recorded path under ``old`` to the same place under ``new``; how many rows changed (each once)."""
    changed = 0
    for column in _PLAIN_PATH_COLUMNS:
        table = column.class_
        under_old: ColumnElement[bool] = column.startswith(old, autoescape=True)
        rewritten = literal(new) + func.substr(column, len(old) + 1)
        statement = update(table).where(under_old).values({column.key: rewritten})
        changed += session.connection().execute(statement).rowcount
    with_results = select(Job).where(Job.result_path.is_not(None))
    for job in session.scalars(with_results):
        changed += _rewrite_job_results(job, old, new)
    return changed


def _rewrite_job_results(job: Job, old: str, new: str) -> int:
    """Rewrite a job's results folder, result files, delivery plans and the folder its state's reason names under
    ``old``; 1 if any changed, else 0."""

    def moved(path: str) -> str:
        return new + path.removeprefix(old) if path.startswith(old) else path

    files = [dataclasses.replace(f, path=moved(f.path)) for f in job.result_files or []]
    deliveries = {
        name: record.model_copy(
            update={
                "files": {uid: moved(p) for uid, p in record.files.items()} if record.files is not None else None,
                "sent": [moved(p) for p in record.sent],
            }
        )
        for name, record in (job.deliveries or {}).items()
    }
    reason = job.reason.replace(old, new) if job.reason else job.reason  # "...; results in <folder>"
    result_path = moved(job.result_path) if job.result_path else job.result_path
    unchanged = files == (job.result_files or []) and _same_plans(deliveries, job.deliveries or {})
    if unchanged and (result_path, reason) == (job.result_path, job.reason):
        return 0
    job.result_path, job.reason = result_path, reason
    if job.result_files is not None:
        job.result_files = files
    if job.deliveries is not None:
        job.deliveries = deliveries
    return 1


def _same_plans(new: dict[str, DeliveryRecord], old: dict[str, DeliveryRecord]) -> bool:
    return all(new[name].files == old[name].files and new[name].sent == old[name].sent for name in old)
