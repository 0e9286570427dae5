"""Retention: purging received images and results of finished series, by age or disk budget.

Only a series whose job is finished (DONE, FAILED, IGNORED) is ever purged, and
its job's state is checked again inside the purge transaction. Purging a
received series deletes its instance files and ``Instance`` rows and stamps
``Series.purged_at``; purging its results deletes the job folder and the
instances of its result series (SEG, SR, RTSTRUCT), stamped the same way. The
``Series``, ``Job`` and ``job_events`` rows stay as history. Once every series of a
study is purged, the study row keeps only its UID: the patient's name, ID, birth
date and sex, the study's accession number, description, referring physician, date and time
are erased (:data:`~db.ingest.STUDY_ROW_IDENTITY_COLUMNS`). Refused instances (``quarantine/`` and their
``rejected_instances`` rows) are purged by their own age, ``retention.quarantine_days``, and audit records by
theirs, ``retention.audit_days``.

:func:`plan_retention` decides (and changes nothing), :func:`apply_plan` deletes,
:class:`RetentionTask` runs both periodically in ``serve``; ``dicom-node purge``
runs them once, or plans only with ``--dry-run``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, delete, func, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from db.ingest import STUDY_ROW_IDENTITY_COLUMNS, lock_studies_of_job, studies_of_job
from db.jobs import made_by_node_reason
from db.models import (
    AuditEvent,
    ClockDoubt,
    Instance,
    Job,
    JobState,
    RejectedInstance,
    Series,
    Study,
    as_utc,
    utcnow,
)
from db.session import transaction
from dicom_node.config import RetentionSettings, Settings
from dicom_node.logs import log_event
from dicom_node.periodic import PeriodicTask
from dicom_node.pipeline import STAGING_PREFIX
from dicom_node.receive.recorder import series_waiting_to_be_recorded
from dicom_node.retrieve.inflight import being_retrieved

LOG = logging.getLogger(__name__)

FINISHED_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.IGNORED})
GIGABYTE = 1_000_000_000


@dataclass(frozen=True)
class Holding:
    """What one received series and its job's results occupy on disk."""

    job_id: int
    series_instance_uid: str
    state: JobState
    changed_at: datetime  # the job's last state change: a finished series' age counts from here
    image_bytes: int
    has_images: bool
    result_bytes: int
    has_results: bool

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES


@dataclass(frozen=True)
class PurgeItem:
    """One series to purge: its images, its results, or both, and why."""

    job_id: int
    series_instance_uid: str
    state: JobState
    changed_at: datetime
    images: bool
    results: bool
    bytes: int
    reason: str


@dataclass(frozen=True)
class RetentionPlan:
    """What retention would purge now, oldest first, and what it could not."""

    items: list[PurgeItem]
    used_bytes: int  # images plus results on disk before purging
    budget_bytes: int | None
    unfinished_bytes: int  # held by series not finished: never purged
    unfinished_series: int

    @property
    def bytes_freed(self) -> int:
        return sum(item.bytes for item in self.items)

    @property
    def over_budget_bytes(self) -> int:
        """How far over the disk budget the node stays after the plan (0: within it)."""
        if self.budget_bytes is None:
            return 0
        return max(0, self.used_bytes - self.bytes_freed - self.budget_bytes)

    def shortfall(self) -> str | None:
        """Why the budget cannot be met, or None when it can."""
        if not self.over_budget_bytes:
            return None
        return (
            f"still {format_bytes(self.over_budget_bytes)} over the {format_bytes(self.budget_bytes or 0)} "
            f"disk budget: {format_bytes(self.unfinished_bytes)} is held by {self.unfinished_series} "
            "series not finished yet, which are never purged"
        )


@dataclass
class PurgeOutcome:
    purged: list[PurgeItem] = field(default_factory=list)
    skipped: list[tuple[PurgeItem, str]] = field(default_factory=list)  # (item, why)
    failed: list[tuple[PurgeItem, str]] = field(default_factory=list)  # (item, which file could not go and why)

    @property
    def bytes_freed(self) -> int:
        return sum(item.bytes for item in self.purged)


def format_bytes(size: float) -> str:
    """``512 B``, ``3.4 MB``, ``61.2 GB`` (decimal units, like ``max_disk_gigabytes``)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(size) < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def plan_retention(session: Session, retention: RetentionSettings, now: datetime | None = None) -> RetentionPlan:
    """What to purge now under ``retention``; reads the database and the job folders, changes nothing.

    First the age limits (``days``, ``results_days``), then, while the disk in use
    stays over ``max_disk_gigabytes``, whatever is left of the oldest finished series.
    """
    now = now or utcnow()
    holdings = sorted(_holdings(session), key=lambda h: h.changed_at)
    finished = [h for h in holdings if h.finished]
    drafts: dict[int, _Draft] = {}
    for holding in finished:
        _apply_age_limits(drafts, holding, retention, now)
    used = sum(h.image_bytes + h.result_bytes for h in holdings)
    budget = int(retention.max_disk_gigabytes * GIGABYTE) if retention.max_disk_gigabytes else None
    if budget is not None:
        _apply_budget(drafts, finished, used, budget)
    unfinished = [h for h in holdings if not h.finished]
    return RetentionPlan(
        items=[drafts[h.job_id].item(h) for h in finished if h.job_id in drafts],
        used_bytes=used,
        budget_bytes=budget,
        unfinished_bytes=sum(h.image_bytes + h.result_bytes for h in unfinished),
        unfinished_series=len(unfinished),
    )


OPERATOR_REQUEST = "requested by the operator (dicom-node purge --series)"


def _finished_states() -> str:
    """``DONE, FAILED or IGNORED``: the states retention purges, in words."""
    *first, last = sorted(state.value for state in FINISHED_STATES)
    return f"{', '.join(first)} or {last}"


def plan_series_purge(session: Session, series_instance_uid: str, storage: Path | None = None) -> RetentionPlan:
    """A plan that purges one finished series' images and results now, whatever its age (a PACS correction).

    Raises
    ------
    LookupError
        Naming the series, when the node holds no such received series, it is not finished, or a peer is retrieving
        it now (a C-GET or C-MOVE, found in ``storage``: the sentence names the peer).
    """
    holdings = _holdings(session, series_instance_uid)
    if not holdings:
        made = made_by_node_reason(session, series_instance_uid)
        raise LookupError(made or f"the node holds no received series {series_instance_uid}")
    (holding,) = holdings
    if not holding.finished:
        raise LookupError(
            f"series {series_instance_uid} is {holding.state.value}; only {_finished_states()} series are purged ("
            + (
                "wait until it has been received, then cancel it"
                if holding.state is JobState.RECEIVING
                else f"cancel it first, once no destination is receiving it: `dicom-node cancel {series_instance_uid}`"
            )
            + ")"
        )
    retrieved = being_retrieved(storage, series_instance_uid) if storage is not None else None
    if retrieved is not None:
        raise LookupError(retrieved)
    draft = _Draft()
    draft.add(holding, images=True, results=True, reason=OPERATOR_REQUEST)
    items = [draft.item(holding)] if draft.images or draft.results else []
    used = holding.image_bytes + holding.result_bytes
    return RetentionPlan(items=items, used_bytes=used, budget_bytes=None, unfinished_bytes=0, unfinished_series=0)


@dataclass
class _Draft:
    images: bool = False
    results: bool = False
    reasons: list[str] = field(default_factory=list)

    def add(self, holding: Holding, *, images: bool, results: bool, reason: str) -> int:
        """Mark more of ``holding`` for purging; returns the bytes this adds."""
        add_images = images and holding.has_images and not self.images
        add_results = results and holding.has_results and not self.results
        if not (add_images or add_results):
            return 0
        self.images, self.results = self.images or add_images, self.results or add_results
        if reason not in self.reasons:
            self.reasons.append(reason)
        return (holding.image_bytes if add_images else 0) + (holding.result_bytes if add_results else 0)

    def item(self, holding: Holding) -> PurgeItem:
        size = (holding.image_bytes if self.images else 0) + (holding.result_bytes if self.results else 0)
        return PurgeItem(
            job_id=holding.job_id,
            series_instance_uid=holding.series_instance_uid,
            state=holding.state,
            changed_at=holding.changed_at,
            images=self.images,
            results=self.results,
            bytes=size,
            reason="; ".join(self.reasons),
        )


def _apply_age_limits(drafts: dict[int, _Draft], holding: Holding, retention: RetentionSettings, now: datetime) -> None:
    age = now - holding.changed_at
    images_days = retention.days
    results_days = retention.results_days or retention.days
    expired_images = images_days is not None and age > timedelta(days=images_days)
    expired_results = results_days is not None and age > timedelta(days=results_days)
    if not (expired_images or expired_results):
        return
    draft = drafts.setdefault(holding.job_id, _Draft())
    if expired_images and expired_results and images_days == results_days:
        draft.add(holding, images=True, results=True, reason=f"older than {images_days:g} days")
    else:
        if expired_images:
            draft.add(holding, images=True, results=False, reason=f"images older than {images_days:g} days")
        if expired_results:
            draft.add(holding, images=False, results=True, reason=f"results older than {results_days:g} days")
    if not (draft.images or draft.results):
        del drafts[holding.job_id]  # expired, but nothing of it is left on disk


def _apply_budget(drafts: dict[int, _Draft], finished: list[Holding], used: int, budget: int) -> None:
    """Oldest finished series first, until the disk in use is within ``budget``; FAILED series last of all
    (they may wait for a retry once a destination is back, or a fix: ``dicom-node retry`` needs their images)."""
    remaining = used - sum(drafts[h.job_id].item(h).bytes for h in finished if h.job_id in drafts)
    reason = f"disk budget {format_bytes(budget)} exceeded: {format_bytes(used)} used"
    for holding in sorted(finished, key=lambda h: h.state is JobState.FAILED):  # stable: oldest first within each
        if remaining <= budget:
            return
        draft = drafts.setdefault(holding.job_id, _Draft())
        remaining -= draft.add(holding, images=True, results=True, reason=reason)
        if not (draft.images or draft.results):
            del drafts[holding.job_id]


def _holdings(session: Session, series_instance_uid: str | None = None) -> list[Holding]:
    """Every received series (or the one named) with its job, the bytes of its instances, and of its results."""
    images_query = select(Instance.series_id, func.count(), func.sum(Instance.size_bytes)).group_by(Instance.series_id)
    jobs_query = select(
        Job.id, Job.series_id, Series.series_instance_uid, Job.state, Job.state_changed_at, Job.result_path
    ).join(Series, Job.series_id == Series.id)
    if series_instance_uid is not None:
        named = select(Series.id).where(Series.series_instance_uid == series_instance_uid)
        images_query = images_query.where(Instance.series_id.in_(named))
        jobs_query = jobs_query.where(Series.series_instance_uid == series_instance_uid)
    images = {series_id: (count, size or 0) for series_id, count, size in session.execute(images_query)}
    result_jobs = set(
        session.scalars(
            select(Series.source_job_id)
            .join(Instance, Instance.series_id == Series.id)
            .where(Series.source_job_id.is_not(None))
        )
    )
    rows = session.execute(jobs_query)
    holdings = []
    for job_id, series_id, uid, state, changed_at, result_path in rows:
        count, image_bytes = images.get(series_id, (0, 0))
        folder = Path(result_path) if result_path else None
        holdings.append(
            Holding(
                job_id=job_id,
                series_instance_uid=uid,
                state=state,
                changed_at=as_utc(changed_at),
                image_bytes=image_bytes,
                has_images=count > 0,
                result_bytes=_folder_bytes(folder) if folder else 0,
                has_results=job_id in result_jobs or bool(folder and folder.exists()),
            )
        )
    return holdings


def _folder_bytes(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def apply_plan(
    sessions: sessionmaker[Session], settings: Settings, plan: RetentionPlan, now: datetime | None = None
) -> PurgeOutcome:
    """Purge each planned series in its own transaction; a series that changed since planning is skipped.

    Files that an earlier purge could not delete go first (:func:`delete_purged_leftovers`). A series whose
    files cannot be set aside or deleted is counted in ``failed``, and the rest of the plan goes on.
    """
    delete_purged_leftovers(sessions, settings.storage.directory / "instances")
    outcome = PurgeOutcome()
    for item in plan.items:
        uid = item.series_instance_uid
        try:
            why_not = purge_item(sessions, settings, item, now or utcnow())
        except PurgeFailed as failure:
            outcome.failed.append((item, str(failure)))
            log_event(LOG, logging.WARNING, "retention.purge_failed", series_instance_uid=uid, reason=str(failure))
            continue
        except StaleDataError:
            raise  # the job changed meanwhile: the periodic task says so, and the next pass decides again
        except Exception:
            reason = f"purging series {uid} failed; this pass stops here and the next pass tries again"
            log_event(LOG, logging.ERROR, "retention.series_failed", series_instance_uid=uid, reason=reason)
            raise
        if why_not is None:
            outcome.purged.append(item)
        else:
            outcome.skipped.append((item, why_not))
            log_event(LOG, logging.INFO, "retention.skipped", series_instance_uid=uid, why=why_not)
    return outcome


class PurgeFailed(Exception):
    """A series' files could not be set aside or deleted; the message says which file and why, in a sentence."""


@dataclass
class _Deletion:
    """What a purge deletes once its transaction has committed."""

    files: list[Path] = field(default_factory=list)  # the images (set aside), the result instances
    folder: Path | None = None  # the job folder
    attempts: list[Path] = field(default_factory=list)  # folders of attempts that never published their results


def purge_item(sessions: sessionmaker[Session], settings: Settings, item: PurgeItem, now: datetime) -> str | None:
    """Delete the rows, then the files, of one planned series; returns why it was skipped, or None.

    The job is read again, locked, inside the transaction: a series re-opened or
    re-run since planning is left alone. The rows go first, with the images set
    aside (renamed) and the files deleted once the transaction has committed: a
    failure before the commit puts the images back and changes nothing, and a file
    that cannot be deleted after it is left without a row, for the next pass
    (:func:`delete_purged_leftovers`, or the job folder planned again).

    A sender may be sending the series again at this moment: an instance it finds
    already stored is answered success without being written, and recorded after.
    So the series' instance rows are locked (PostgreSQL: a recorder looking the
    instance up waits for this purge, then finds it gone and records it again), its
    files set aside, then the receivers' journals are read: an instance of the
    series acknowledged and not yet recorded, or a file written again at its own
    name since, puts the files back and leaves the series for a later pass. A
    receiver journals an instance before it looks for its file, so either the purge
    sees the journal line, or the receiver finds no file and writes the instance itself.

    A series a peer is retrieving (a C-GET or C-MOVE sending its images or results) is left alone, for a later pass:
    it is looked for before anything is touched, and again once the images are set aside
    (:mod:`dicom_node.retrieve.inflight`).

    Raises
    ------
    PurgeFailed
        When a file cannot be set aside (nothing changed) or deleted (the rows are gone).
    """
    root = settings.storage.directory
    deletion = _purge_rows(sessions, root, item, now)
    if isinstance(deletion, str):
        return deletion
    if item.images:  # what attempts killed part-way wrote (a SEG, a label map) names the patient too
        deletion.attempts = sorted((settings.jobs_directory / str(item.job_id)).glob(f"{STAGING_PREFIX}*"))
    _delete_files(deletion, root, item.series_instance_uid)
    log_event(
        LOG,
        logging.INFO,
        "series.purged",
        series_instance_uid=item.series_instance_uid,
        job=item.job_id,
        images=item.images,
        results=item.results,
        bytes=item.bytes,
        reason=item.reason,
    )
    return None


def _purge_rows(sessions: sessionmaker[Session], root: Path, item: PurgeItem, now: datetime) -> _Deletion | str:
    """The database side of a purge, committed; the images set aside. Put back on any failure or skip."""
    aside: list[Path] = []
    try:
        with transaction(sessions) as session:
            outcome = _purge_in(session, root, item, now, aside)
    except OSError as exc:
        _put_back(aside)
        raise PurgeFailed(
            f"could not set aside {exc.filename or 'a file'} ({_strerror(exc)}); series "
            f"{item.series_instance_uid} is left as it was, for the next pass"
        ) from None
    except OperationalError as exc:
        _put_back(aside)
        if _row_locked(exc):  # a receiver holds one of its rows, or its study's: it is recording one again
            return f"instances of it or of its study are being received again (series {item.series_instance_uid})"
        raise
    except BaseException:
        _put_back(aside)
        raise
    if isinstance(outcome, str):
        _put_back(aside)
        return outcome
    return _Deletion([*aside, *outcome.files], outcome.folder)


RECEIVER_IN_THE_WAY = frozenset({"55P03", "40P01"})
"""PostgreSQL's "could not obtain lock on row" (only the NOWAIT on the instance rows raises it here) and "deadlock
detected" (receivers and the purge lock study rows before job rows, so none is expected; should one come, a
receiver is recording the series or its study): the purge steps aside."""


def _row_locked(error: OperationalError) -> bool:
    """Whether a receiver's row locks stopped the purge (:data:`RECEIVER_IN_THE_WAY`). SQLite's "database is
    locked" is not that: another writer holds the whole database, and a stuck one is an error to see."""
    return getattr(error.orig, "sqlstate", None) in RECEIVER_IN_THE_WAY


def _purge_in(session: Session, root: Path, item: PurgeItem, now: datetime, aside: list[Path]) -> _Deletion | str:
    """Inside the purge's transaction: check the job, set the images aside, delete the rows."""
    locked_studies = lock_studies_of_job(session, item.job_id)  # before the job row, as receivers do
    job = session.scalars(select(Job).where(Job.id == item.job_id).with_for_update()).one_or_none()
    if job is None:
        return "its job no longer exists"
    if job.state not in FINISHED_STATES or as_utc(job.state_changed_at) != item.changed_at:
        return f"it changed since planning (now {job.state.value})"
    if not studies_of_job(session, item.job_id) <= locked_studies:
        return "it moved to another study since planning"
    retrieved = being_retrieved(root, item.series_instance_uid)
    if retrieved is not None:
        return retrieved  # left untouched; the next pass tries again
    deletion = _Deletion()
    if item.images:
        why_not = _set_series_aside(session, job.series, root, aside)
        if why_not is not None:
            return why_not
        # again once they are set aside, as for the receivers' journals: a retrieval that registered meanwhile
        # gets them back; one that starts later finds the series purged
        retrieved = being_retrieved(root, item.series_instance_uid)
        if retrieved is not None:
            return retrieved
        _delete_series_rows(session, job.series, root, now)
    studies = {job.series.study_id}
    if item.results:
        studies |= _delete_result_rows(session, job, root, now, deletion)
    for study_id in sorted(studies):  # a series sent again under a corrected study left its results in the old one
        _erase_phi_of_emptied_study(session, study_id)
    return deletion


def _set_series_aside(session: Session, series: Series, root: Path, aside: list[Path]) -> str | None:
    """Lock the series' instance rows and rename its files aside; why not to purge it now, or None."""
    receiving = f"instances of it are being received again (series {series.series_instance_uid})"
    if series.series_instance_uid in series_waiting_to_be_recorded(root):
        return receiving
    # NOWAIT (PostgreSQL): a receiver that holds one of these rows next waits for the job row this purge holds;
    # waiting for it here would close the circle
    locked = select(Instance.path).where(Instance.series_id == series.id).with_for_update(nowait=True)
    paths = [path for path in map(Path, session.scalars(locked)) if _inside(path, root)]
    _set_aside(paths, aside)
    if series.series_instance_uid in series_waiting_to_be_recorded(root) or any(p.exists() for p in paths):
        return receiving  # a receiver has written one again at its own name: it is being recorded
    return None


SET_ASIDE_SUFFIX = ".purging"
"""An instance file renamed while its series is being purged: ``<sop>.dcm.purging``. Start-up puts any left by a
crash back (:func:`put_back_set_aside_files`); one left by a purge that committed is deleted by the next
(:func:`delete_purged_leftovers`)."""


def _set_aside(paths: list[Path], aside: list[Path]) -> None:
    """Rename each existing file to ``<name>.purging``, adding the renamed paths to ``aside``."""
    for path in paths:
        renamed = path.with_name(path.name + SET_ASIDE_SUFFIX)
        try:
            os.rename(path, renamed)
        except FileNotFoundError:
            continue
        aside.append(renamed)


def _original(renamed: Path) -> Path:
    return renamed.with_name(renamed.name.removesuffix(SET_ASIDE_SUFFIX))


def _put_back(aside: list[Path]) -> None:
    """Undo :func:`_set_aside`, never over a file a receiver has written meanwhile."""
    for renamed in aside:
        try:
            os.link(renamed, _original(renamed))  # fails if the receiver wrote the instance again: that copy stays
        except FileExistsError:
            pass
        except FileNotFoundError:
            continue
        except OSError as exc:
            reason = f"could not put {renamed} back at {_original(renamed)} ({_strerror(exc)}); it stays set aside"
            log_event(LOG, logging.ERROR, "retention.put_back_failed", path=str(renamed), reason=reason)
            continue
        renamed.unlink(missing_ok=True)


def put_back_set_aside_files(instances_dir: Path) -> int:
    """At start-up: files a purge set aside and did not finish with go back to their names; how many."""
    if not instances_dir.is_dir():
        return 0
    aside = list(instances_dir.glob(f"*/*/*{SET_ASIDE_SUFFIX}"))
    _put_back(aside)
    return len(aside)


def delete_purged_leftovers(sessions: sessionmaker[Session], instances_dir: Path) -> int:
    """Delete set-aside files whose purge has committed (no row names their own name any more); how many.

    A set-aside file whose row is still there belongs to a purge in progress (or cut off by a crash:
    start-up puts it back), unless a newer copy is back at its own name. Call it before
    :func:`put_back_set_aside_files` at start-up, so a purged image is not put back and indexed again.
    """
    aside = list(instances_dir.glob(f"*/*/*{SET_ASIDE_SUFFIX}")) if instances_dir.is_dir() else []
    recorded = _recorded_paths(sessions, [str(_original(path)) for path in aside])
    deleted = 0
    for renamed in aside:
        original = _original(renamed)
        if str(original) in recorded and not original.exists():
            continue
        try:
            renamed.unlink(missing_ok=True)
        except OSError as exc:
            reason = f"could not delete {renamed} ({_strerror(exc)}); the next pass tries again"
            log_event(LOG, logging.WARNING, "retention.leftover_kept", path=str(renamed), reason=reason)
            continue
        deleted += 1
        _remove_empty_folders({renamed.parent}, instances_dir)
    return deleted


def _recorded_paths(sessions: sessionmaker[Session], paths: list[str]) -> set[str]:
    """Those of ``paths`` an ``instances`` row names (500 per query)."""
    found: set[str] = set()
    with sessions() as session:
        for start in range(0, len(paths), 500):
            chunk = paths[start : start + 500]
            found.update(session.scalars(select(Instance.path).where(Instance.path.in_(chunk))))
    return found


def _delete_series_rows(session: Session, series: Series, root: Path, now: datetime) -> list[Path]:
    """Delete a series' instance rows; the series row stays, stamped ``purged_at``. Its files inside storage."""
    paths = [Path(p) for p in session.scalars(select(Instance.path).where(Instance.series_id == series.id))]
    for path in paths:
        if not _inside(path, root):
            reason = f"{path} is outside the storage folder {root}, so retention leaves it in place"
            log_event(LOG, logging.WARNING, "retention.file_outside_storage_kept", path=str(path), reason=reason)
    session.execute(delete(Instance).where(Instance.series_id == series.id))
    series.purged_at = now
    series.accession_number = None  # an identifier of the patient's order: it does not outlive the images
    series.images_before_purge = max(series.images_before_purge or 0, series.instance_count) or None
    series.instance_count = 0  # a re-sent series counts from zero again, up to images_before_purge
    return [path for path in paths if _inside(path, root)]


def _delete_result_rows(session: Session, job: Job, root: Path, now: datetime, deletion: _Deletion) -> set[int]:
    """Delete the rows of the job's result series; their files and the job folder go into ``deletion``. Returns
    the studies those series were in."""
    query = select(Series).where(Series.source_job_id == job.id, Series.purged_at.is_(None))
    studies = set()
    for series in list(session.scalars(query)):
        deletion.files.extend(_delete_series_rows(session, series, root, now))
        studies.add(series.study_id)
    if job.result_path:
        folder = Path(job.result_path)
        if _inside(folder, root):
            deletion.folder = folder
        else:
            reason = f"{folder} is outside the storage folder {root}, so retention leaves it in place"
            log_event(LOG, logging.WARNING, "retention.folder_outside_storage_kept", path=str(folder), reason=reason)
    job.result_files = None  # gone: a retry must not try to send them
    return studies


def _delete_files(deletion: _Deletion, root: Path, series_instance_uid: str) -> None:
    """Delete what a committed purge left on disk; raises :class:`PurgeFailed` naming the first file that stayed."""
    failures: list[tuple[str, OSError]] = []
    for path in deletion.files:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            failures.append((str(path), exc))
    if deletion.folder is not None and deletion.folder.exists():
        shutil.rmtree(deletion.folder, onerror=lambda _function, path, info: _failed(failures, path, info[1]))
    for attempt in deletion.attempts:  # gone already where the job folder went whole
        if attempt.exists():
            shutil.rmtree(attempt, onerror=lambda _function, path, info: _failed(failures, path, info[1]))
    if deletion.attempts:
        with contextlib.suppress(OSError):  # a job folder that holds published results is not empty: it stays
            deletion.attempts[0].parent.rmdir()
    _remove_empty_folders({path.parent for path in deletion.files}, root / "instances")
    if failures:
        (name, first), more = failures[0], f" and {len(failures) - 1} more" if len(failures) > 1 else ""
        raise PurgeFailed(
            f"could not delete {name}{more} ({_strerror(first)}); series {series_instance_uid} is purged "
            "from the database, and the next pass deletes what is left of its files"
        )


def _failed(failures: list[tuple[str, OSError]], path: str, error: BaseException) -> None:
    """Note what :func:`shutil.rmtree` could not delete; a folder left because of what is in it, or a file gone
    already (another pass deleted it), is not news."""
    if not isinstance(error, OSError):
        raise error
    if error.errno not in (errno.ENOTEMPTY, errno.ENOENT):
        failures.append((path, error))


def _strerror(exc: OSError) -> str:
    """``permission denied``, ``operation not permitted``, ``device or resource busy``: the system's words."""
    return (exc.strerror or os.strerror(exc.errno or 0)).lower()


def _erase_phi_of_emptied_study(session: Session, study_id: int) -> None:
    """A study none of whose series holds an instance any more keeps only its UID.

    The study row is locked before the instances are counted: a receiver recording a new series of the
    study holds that lock until it commits (PostgreSQL), so its instances are counted, never erased under.
    """
    session.flush()
    locked = select(Study).where(Study.id == study_id).with_for_update()
    study = session.scalars(locked.execution_options(populate_existing=True)).one()
    held = session.scalar(
        select(func.count())
        .select_from(Instance)
        .join(Series, Instance.series_id == Series.id)
        .where(Series.study_id == study_id)
    )
    if held:
        return
    if any(getattr(study, column) is not None for column in STUDY_ROW_IDENTITY_COLUMNS):
        for column in STUDY_ROW_IDENTITY_COLUMNS:  # with its StudyDate and StudyTime: a correction sent again
            setattr(study, column, None)
        log_event(LOG, logging.INFO, "study.identity_erased", study_instance_uid=study.study_instance_uid)


def purge_quarantine(sessions: sessionmaker[Session], root: Path, days: float, now: datetime | None = None) -> int:
    """Delete refused instances (files in ``quarantine/`` and their rows) older than ``days``; returns how many."""
    cutoff = (now or utcnow()) - timedelta(days=days)
    removed = 0
    with transaction(sessions) as session:
        old = list(session.scalars(select(RejectedInstance).where(RejectedInstance.received_at < cutoff)))
        # A copy set aside again (same series and SOP Instance UID) has one file and a newer row: it stays.
        still_named = set(session.scalars(select(RejectedInstance.path).where(RejectedInstance.received_at >= cutoff)))
        for row in old:
            if row.path and row.path not in still_named and _inside(Path(row.path), root):
                Path(row.path).unlink(missing_ok=True)
            session.delete(row)
            removed += 1
    for path in _unrecorded_quarantine_files(sessions, root, cutoff):
        path.unlink(missing_ok=True)
        removed += 1
    if removed:
        log_event(
            LOG,
            logging.INFO,
            "retention.quarantine_purged",
            removed=removed,
            older_than_days=days,
            reason=quarantine_purge_sentence(removed, days),
        )
    return removed


def count_quarantine(sessions: sessionmaker[Session], root: Path, days: float, now: datetime | None = None) -> int:
    """How many refused instances :func:`purge_quarantine` would delete now; deletes nothing."""
    cutoff = (now or utcnow()) - timedelta(days=days)
    with sessions() as session:
        rows = session.scalar(
            select(func.count()).select_from(RejectedInstance).where(RejectedInstance.received_at < cutoff)
        )
    return (rows or 0) + len(_unrecorded_quarantine_files(sessions, root, cutoff))


def _unrecorded_quarantine_files(sessions: sessionmaker[Session], root: Path, cutoff: datetime) -> list[Path]:
    """Files in ``quarantine/`` older than ``cutoff`` that no row names (their row never got written: the
    database was down at the time)."""
    quarantine = root / "quarantine"
    if not quarantine.is_dir():
        return []
    with sessions() as session:
        named = set(session.scalars(select(RejectedInstance.path).where(RejectedInstance.path.is_not(None))))
    return [
        path
        for path in quarantine.iterdir()
        if str(path) not in named  # a row still names it: it goes with that row
        and path.is_file()
        and datetime.fromtimestamp(path.stat().st_mtime, timezone.utc) < cutoff
    ]


def quarantine_purge_sentence(count: int, days: float, *, dry_run: bool = False) -> str:
    """What a purge of refused instances deleted (or would delete), as ``serve`` logs it and ``purge`` prints it."""
    return _old_rows_sentence(count, "refused instance", days, "retention.quarantine_days", dry_run)


def audit_purge_sentence(count: int, days: float, *, dry_run: bool = False) -> str:
    """What a purge of audit records deleted (or would delete), as ``serve`` logs it and ``purge`` prints it."""
    return _old_rows_sentence(count, "audit record", days, "retention.audit_days", dry_run)


def _old_rows_sentence(count: int, what: str, days: float, setting: str, dry_run: bool) -> str:
    verb = "would be deleted (dry run: nothing deleted)" if dry_run else ("was" if count == 1 else "were") + " deleted"
    return f"{count} {what}{'' if count == 1 else 's'} older than {days:g} days ({setting}) {verb}"


AUDIT_ROWS_PER_TRANSACTION = 5000
"""Old audit records are deleted this many at a time, each batch in its own short transaction: a first purge of a
year of records never holds the database's write lock for long."""


def purge_audit(sessions: sessionmaker[Session], days: float, now: datetime | None = None) -> int:
    """Delete audit records written more than ``days`` ago (``retention.audit_days``); returns how many."""
    cutoff = (now or utcnow()) - timedelta(days=days)
    removed = 0
    while True:
        with transaction(sessions) as session:
            batch = select(AuditEvent.id).where(AuditEvent.at < cutoff).limit(AUDIT_ROWS_PER_TRANSACTION)
            ids = list(session.scalars(batch))
            if ids:
                session.execute(delete(AuditEvent).where(AuditEvent.id.in_(ids)))
        removed += len(ids)
        if len(ids) < AUDIT_ROWS_PER_TRANSACTION:
            break
    if removed:
        log_event(
            LOG,
            logging.INFO,
            "retention.audit_purged",
            removed=removed,
            older_than_days=days,
            reason=audit_purge_sentence(removed, days),
        )
    return removed


def count_audit(sessions: sessionmaker[Session], days: float, now: datetime | None = None) -> int:
    """How many audit records :func:`purge_audit` would delete now; deletes nothing."""
    cutoff = (now or utcnow()) - timedelta(days=days)
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.at < cutoff)) or 0


def _inside(path: Path, root: Path) -> bool:
    resolved = path.resolve()
    return resolved != root.resolve() and resolved.is_relative_to(root.resolve())


def _remove_empty_folders(folders: set[Path], top: Path) -> None:
    """Remove each folder and its parents up to (not including) ``top`` while they are empty."""
    top = top.resolve()
    for folder in folders:
        folder = folder.resolve()
        while folder != top and folder.is_relative_to(top):
            try:
                os.rmdir(folder)
            except OSError:  # not empty (another series, a file arriving) or already gone
                break
            folder = folder.parent


def plan_rows(plan: RetentionPlan, outcome: PurgeOutcome | None = None, now: datetime | None = None) -> list[list[str]]:
    """One row per planned series: UID, state, age, what is purged, size, reason (or why it was skipped or failed)."""
    now = now or utcnow()
    skipped = {item.job_id: f"SKIPPED: {why}" for item, why in (outcome.skipped if outcome else [])}
    skipped.update({item.job_id: f"FAILED: {why}" for item, why in (outcome.failed if outcome else [])})
    rows = []
    for item in plan.items:
        parts = " + ".join(part for part, on in (("images", item.images), ("results", item.results)) if on)
        age = f"{(now - item.changed_at).total_seconds() / 86400:.1f} days"
        reason = skipped.get(item.job_id, item.reason)
        rows.append([item.series_instance_uid, item.state.value, age, parts, format_bytes(item.bytes), reason])
    return rows


def plan_summary(plan: RetentionPlan, outcome: PurgeOutcome | None = None) -> list[str]:
    """The totals under the table: freed (or, with no outcome, would free), in use, and any shortfall."""
    freed, count = (outcome.bytes_freed, len(outcome.purged)) if outcome else (plan.bytes_freed, len(plan.items))
    budget = f" of a {format_bytes(plan.budget_bytes)} budget" if plan.budget_bytes is not None else ""
    verb = "freed" if outcome else "would free"
    used = format_bytes(plan.used_bytes)
    lines = [f"{verb} {format_bytes(freed)} from {count} series; in use before: {used}{budget}"]
    shortfall = plan.shortfall()
    return [*lines, shortfall] if shortfall else lines


CLOCK_DOUBT_LIMIT = timedelta(days=1)
"""How far the wall clock may run ahead of the node's steady clock since the last retention pass, or since the
newest time the database recorded before ``serve`` started (or before the clock was first doubted, while a doubt is
recorded), before retention stops deleting by age: a clock that far ahead (a bad hardware clock at boot, a
misconfigured time server) would make every finished series and audit record look old."""
CLOCK_DOUBT_REPEAT_SECONDS = 86400.0
"""While retention deletes nothing by age for a doubtful clock, its WARNING is repeated this often."""
CLOCK_DOUBT_ID = 1
"""The one :class:`~db.models.ClockDoubt` row's id: a second writer's insert conflicts with the first's."""
CONFIRM_CLOCK = "run `dicom-node purge`: it deletes by age at once and tells serve to trust the clock again"
"""What the operator does when a doubted clock is right after all."""


def steady_seconds() -> float:
    """Seconds on a clock nobody sets, counting a suspended host's sleep where the system can (Linux)."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(boottime) if boottime is not None else time.monotonic()


def newest_recorded_time(session: Session) -> datetime | None:
    """The newest time the node has recorded: its last image received, job change or audit record (None: none)."""
    columns = (Series.last_received_at, Job.state_changed_at, AuditEvent.at)
    times = [session.scalar(select(func.max(column))) for column in columns]
    return max((as_utc(moment) for moment in times if moment is not None), default=None)


@dataclass(frozen=True)
class RecordedBeforeStart:
    """What retention judges the wall clock by, read at ``serve``'s start before this run wrote anything.

    Without a recorded doubt: the newest time the database recorded before this start. What this run records (a
    PACS' C-ECHO, the first image, start-up requeueing a job) is stamped with the very clock in doubt, and so is what
    workers on other hosts record, so none of it may vouch for the clock. With a doubt recorded by an earlier run
    (:class:`~db.models.ClockDoubt`): the time the node trusted when that doubt began and how long ``serve`` has run
    in doubt since; what was recorded during the doubt, at the doubted clock, does not count either.
    """

    newest: datetime | None  # None: the database recorded nothing yet
    steady: float  # :func:`steady_seconds` when it was read
    counted: timedelta = timedelta(0)  # how long serve ran in doubt since ``newest``, before this start
    doubted_since: datetime | None = None  # what the clock read when an earlier run began to doubt it
    doubt_recorded: bool = False  # a ClockDoubt row exists (written by this start or an earlier run)


@dataclass(frozen=True)
class _Doubt:
    trusted_at: datetime
    counted: timedelta
    doubted_at: datetime


def _read_doubt(session: Session) -> _Doubt | None:
    row = session.get(ClockDoubt, CLOCK_DOUBT_ID, populate_existing=True)
    if row is None:
        return None
    return _Doubt(as_utc(row.trusted_at), timedelta(seconds=row.counted_seconds), as_utc(row.doubted_at))


def _record_doubt(sessions: sessionmaker[Session], trusted_at: datetime, doubted_at: datetime) -> _Doubt | None:
    """Record that the clock is doubted (a ClockDoubt row) unless a doubt is recorded already; returns that one, or
    None when this call recorded it. One short transaction: a crash leaves the row whole or absent."""
    for _ in range(2):
        try:
            with transaction(sessions) as session:
                found = _read_doubt(session)
                if found is not None:
                    return found
                row = ClockDoubt(id=CLOCK_DOUBT_ID, trusted_at=trusted_at, counted_seconds=0, doubted_at=doubted_at)
                session.add(row)
            return None
        except IntegrityError:  # another process recorded it at the same moment: read theirs
            continue
    raise AssertionError("unreachable: the row that conflicted is there to read")


def recorded_before_start(sessions: sessionmaker[Session], now: datetime | None = None) -> RecordedBeforeStart:
    """Read :class:`RecordedBeforeStart` now: at ``serve``'s start, before repair or receiving record anything.

    A clock that reads more than :data:`CLOCK_DOUBT_LIMIT` past everything recorded is recorded as doubted here, at
    once: a crash or restart before the first retention pass must not let what this run records at that clock vouch
    for it.
    """
    steady = steady_seconds()
    now = now or utcnow()
    with sessions() as session:
        doubt = _read_doubt(session)
        newest = newest_recorded_time(session) if doubt is None else None
    if doubt is None:
        if newest is None or now - newest <= CLOCK_DOUBT_LIMIT:
            return RecordedBeforeStart(newest=newest, steady=steady)
        doubt = _record_doubt(sessions, trusted_at=newest, doubted_at=now)
        if doubt is None:  # recorded by this start: retention words it as a doubt found at this start
            return RecordedBeforeStart(newest=newest, steady=steady, doubt_recorded=True)
    return RecordedBeforeStart(
        newest=doubt.trusted_at,
        steady=steady,
        counted=doubt.counted,
        doubted_since=doubt.doubted_at,
        doubt_recorded=True,
    )


def confirm_clock(sessions: sessionmaker[Session], now: datetime | None = None) -> str | None:
    """The operator's word that the clock is right (``dicom-node purge``): the recorded doubt is deleted, and
    ``serve`` deletes by age again from its next retention pass (or next start). Returns the sentence to print and
    audit, or None when the clock was not doubted."""
    now = now or utcnow()
    with transaction(sessions) as session:
        doubt = _read_doubt(session)
        if doubt is None:
            return None
        session.execute(delete(ClockDoubt).where(ClockDoubt.id == CLOCK_DOUBT_ID))
    return (
        f"the clock ({_minute(now)}), which retention had doubted since it read {_minute(doubt.doubted_at)}, is "
        "trusted again on the operator's word: serve deletes finished series, refused instances and audit records "
        "by age again from its next retention pass"
    )


def _minute(moment: datetime) -> str:
    return f"{as_utc(moment):%Y-%m-%d %H:%M} UTC"


def _days(span: timedelta) -> str:
    return f"{span.total_seconds() / 86400:.1f} days"


class RetentionTask(PeriodicTask):
    """Applies retention every ``retention.check_interval_seconds``; a thread of ``serve``.

    A pass deletes nothing by age while the wall clock looks far ahead (:meth:`clock_doubt`); the disk budget
    still applies. ``before_start`` is what the database recorded before this run wrote anything
    (:func:`recorded_before_start`, read by ``serve`` before it repairs storage or receives); without it, it is read
    here. The doubt is kept in the database (:class:`~db.models.ClockDoubt`) until the clock agrees again or the
    operator confirms it, so a restart with the clock still wrong goes on deleting nothing by age.
    """

    name = "retention"

    def __init__(
        self, settings: Settings, sessions: sessionmaker[Session], before_start: RecordedBeforeStart | None = None
    ) -> None:
        super().__init__(settings, sessions)
        self._before_start = before_start or recorded_before_start(sessions)
        self._trusted: tuple[datetime, float] | None = None  # wall and steady clock at the last pass that used ages
        self._doubt_logged_at: float | None = None  # steady clock at the last clock_doubted warning
        # The recorded doubt this run keeps up: its counted time, at this steady clock reading (None: none recorded).
        start = self._before_start
        self._recorded: tuple[timedelta, float] | None = (start.counted, start.steady) if start.doubt_recorded else None

    @property
    def interval_seconds(self) -> float:
        return self.settings.retention.check_interval_seconds

    def start(self) -> None:
        retention = self.settings.retention
        if not retention.enabled and retention.quarantine_days is None and retention.audit_days is None:
            log_event(
                LOG,
                logging.INFO,
                "retention.off",
                hint="nothing is deleted; set retention.days, max_disk_gigabytes, quarantine_days or audit_days",
            )
            return
        log_event(
            LOG,
            logging.INFO,
            "retention.on",
            days=retention.days,
            results_days=retention.results_days,
            max_disk_gigabytes=retention.max_disk_gigabytes,
            quarantine_days=retention.quarantine_days,
            audit_days=retention.audit_days,
        )
        super().start()

    def run_once(self, now: datetime | None = None) -> PurgeOutcome:
        """Plan and purge once; by age only where the clock is not in doubt."""
        now = now or utcnow()
        retention = self.settings.retention
        if not self._ages_trusted(now):
            ages_off = {"days": None, "results_days": None, "quarantine_days": None, "audit_days": None}
            retention = retention.model_copy(update=ages_off)
        if retention.quarantine_days is not None:
            purge_quarantine(self.sessions, self.settings.storage.directory, retention.quarantine_days, now)
        if retention.audit_days is not None:
            purge_audit(self.sessions, retention.audit_days, now)
        if not retention.enabled:
            return PurgeOutcome()
        with self.sessions() as session:
            plan = plan_retention(session, retention, now)
        outcome = apply_plan(self.sessions, self.settings, plan, now)
        if plan.items:
            log_event(
                LOG,
                logging.INFO,
                "retention.pass",
                purged=len(outcome.purged),
                skipped=len(outcome.skipped),
                failed=len(outcome.failed),
                freed=format_bytes(outcome.bytes_freed),
            )
        if plan.shortfall():
            log_event(LOG, logging.WARNING, "retention.over_budget", detail=plan.shortfall())
        return outcome

    def _ages_trusted(self, now: datetime) -> bool:
        """Whether this pass may delete by age; says so in the log when it may not (and once it may again).

        The clock is judged, and its doubt kept in the database, even where only the disk budget applies: ages set
        later must not trust what was recorded meanwhile at a doubted clock. A doubt that cannot be recorded fails
        the pass before anything is deleted.
        """
        retention = self.settings.retention
        ages = (retention.days, retention.results_days, retention.quarantine_days, retention.audit_days)
        ages_used = any(days is not None for days in ages)
        steady = steady_seconds()
        doubt = self.clock_doubt(now, steady)
        if doubt is None:
            self._trust(now, steady, ages_used, f"the clock ({_minute(now)}) agrees with the node's records again")
            return True
        if not self._keep_doubt(now, steady):
            confirmed = f"the operator confirmed the clock ({_minute(now)}) with `dicom-node purge`"
            self._trust(now, steady, ages_used, confirmed)
            return True
        jump, ran = self._doubt_spans()
        if ran >= jump:
            outlasted = (
                f"the node has run {_days(ran)} in doubt of its clock, as long as the clock had jumped ({_days(jump)}), "
                "so the clock is taken as right (a node switched off, or receiving nothing, that long); were it "
                "wrong by that much, records would now be deleted at most that much early"
            )
            self._trust(now, steady, ages_used, outlasted)
            return True
        if not ages_used:
            return True  # the disk budget alone: no age to misread
        if self._doubt_logged_at is None or steady - self._doubt_logged_at >= CLOCK_DOUBT_REPEAT_SECONDS:
            resumes = (
                f"; without either, deletions by age resume on their own once the node has run in doubt as long as "
                f"the clock jumped ({_days(jump)}: {_days(jump - ran)} from now), as after a node switched off that long"
            )
            log_event(LOG, logging.WARNING, "retention.clock_doubted", clock=_minute(now), reason=doubt + resumes)
            self._doubt_logged_at = steady
        return False

    def _doubt_spans(self) -> tuple[timedelta, timedelta]:
        """How far the clock jumped when the recorded doubt began (what it read then, past the time it was judged
        by), and how long ``serve`` has run in doubt since (every run counted): once the node has run that long, a
        clock that far ahead would have deleted by age only what is truly that old, or a few days' worth early
        (the jump's length) where the jump was shorter than the ages kept."""
        with self.sessions() as session:
            doubt = _read_doubt(session)
        if doubt is None:
            return timedelta(0), timedelta(0)
        return doubt.doubted_at - doubt.trusted_at, doubt.counted

    def _trust(self, now: datetime, steady: float, ages_used: bool, why: str) -> None:
        """Trust the clock from this pass on: the recorded doubt goes first (a failure fails the pass, deleting
        nothing), then the pass deletes by age."""
        cleared = self._recorded is not None
        if cleared:
            with transaction(self.sessions) as session:
                session.execute(delete(ClockDoubt).where(ClockDoubt.id == CLOCK_DOUBT_ID))
            self._recorded = None
        self._trusted = (now, steady)
        if self._doubt_logged_at is not None or (cleared and ages_used):
            log_event(LOG, logging.INFO, "retention.clock_trusted", reason=f"{why}: retention deletes by age")
        self._doubt_logged_at = None

    def _keep_doubt(self, now: datetime, steady: float) -> bool:
        """Record the doubt, or count this run's time in it; False when the operator confirmed the clock meanwhile
        (the recorded doubt is gone)."""
        if self._recorded is None:
            reference = self._clock_reference(steady)
            assert reference is not None  # a doubt is measured from one
            found = _record_doubt(self.sessions, trusted_at=reference, doubted_at=now)
            self._recorded = (found.counted if found is not None else timedelta(0), steady)
            return True
        counted_then, steady_then = self._recorded
        counted = counted_then + timedelta(seconds=steady - steady_then)
        with transaction(self.sessions) as session:
            kept = cast(
                "CursorResult[Any]",
                session.execute(
                    update(ClockDoubt)
                    .where(ClockDoubt.id == CLOCK_DOUBT_ID)
                    .values(counted_seconds=int(counted.total_seconds()))  # whole seconds, rounded down
                    .execution_options(synchronize_session=False)
                ),
            )
        return kept.rowcount == 1

    def _clock_reference(self, steady: float) -> datetime | None:
        """Where the clock should read at least, at steady clock ``steady``: the later of the time recorded before
        this start (or before the doubt, moved on by the time serve ran in doubt) and the last pass that deleted by
        age, each moved on by the time the steady clock counted since. None: nothing to judge by yet."""
        start = self._before_start
        since_start = timedelta(seconds=steady - start.steady)
        from_start = start.newest + start.counted + since_start if start.newest is not None else None
        from_pass = None
        if self._trusted is not None:
            wall_then, steady_then = self._trusted
            from_pass = wall_then + timedelta(seconds=steady - steady_then)
        return max((moment for moment in (from_start, from_pass) if moment is not None), default=None)

    def clock_doubt(self, now: datetime, steady: float) -> str | None:
        """Why the wall clock (``now``) looks far ahead, as the sentence ``serve`` logs; None when it does not.

        It does when it reads more than :data:`CLOCK_DOUBT_LIMIT` past both the last pass that deleted by age and
        the newest time the database recorded before this run started (or, while a doubt is recorded, before the
        doubt began, moved on by the time ``serve`` ran in doubt since), each moved on by the time the steady clock
        counted since. Records written during the doubt (by this node or by workers on other hosts, at a clock that
        may be the wrong one) never vouch for it, in this run or after a restart: the doubt lasts until the clock is
        set right or the operator confirms it (:func:`confirm_clock`). A clock set back (reading earlier than those)
        only makes everything look younger: it is not doubted.
        """
        expected = self._clock_reference(steady)
        if expected is None or now - expected <= CLOCK_DOUBT_LIMIT:
            return None
        stop = "retention deletes nothing by age (the disk budget still applies)"
        wrong = (
            "a bad hardware clock at boot or a misconfigured time server makes every finished series and audit "
            "record look old"
        )
        start = self._before_start
        since_start = timedelta(seconds=steady - start.steady)
        if self._trusted is not None:  # the jump since the last pass that deleted by age says most
            wall_then, steady_then = self._trusted
            since_pass = timedelta(seconds=steady - steady_then)
            with self.sessions() as session:
                newest = newest_recorded_time(session)
            newest_words = f"the newest time the database records is {_minute(newest)}" if newest else "it records none"
            return (
                f"the clock reads {_minute(now)}, {_days(now - wall_then)} on from the last retention pass "
                f"({_minute(wall_then)}) although only {_days(since_pass)} passed since, and {newest_words}; {stop} "
                f"until the clock agrees again: set it right ({wrong}), or if it is right now, {CONFIRM_CLOCK} (a "
                "restart does not end the doubt)"
            )
        assert (
            start.newest is not None
        )  # no pass yet: the time recorded before the start (or the doubt) was the reference
        if start.doubted_since is not None:  # doubted since an earlier run
            return (
                f"the clock reads {_minute(now)}, {_days(now - start.newest)} past the newest time the database "
                f"recorded before the clock was first doubted ({_minute(start.newest)}: its last image received, job "
                f"change or audit record) although the node has run only {_days(start.counted + since_start)} since; "
                f"the clock has been doubted since it read {_minute(start.doubted_since)}, and what the node recorded "
                f"since then, at that clock, does not vouch for it, nor does a restart; {stop} until the clock agrees "
                f"again: if it is wrong ({wrong}), set it right; if it is right (the node was switched off or received "
                f"nothing that long), {CONFIRM_CLOCK}"
            )
        return (
            f"the clock reads {_minute(now)}, {_days(now - start.newest)} past the newest time the database recorded "
            f"before this node started ({_minute(start.newest)}: its last image received, job change or audit record) "
            f"although only {_days(since_start)} passed since; {stop} until the clock agrees again: if it is wrong "
            f"({wrong}), set it right (what the node records meanwhile, at the wrong time, does not vouch for it, nor "
            f"does a restart); if it is right (the node was switched off or received nothing that long), "
            f"{CONFIRM_CLOCK}"
        )
