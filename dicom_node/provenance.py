"""Which model and weights made a job's results, kept in the job's history in the database.

The job event that records a run's results (PROCESSING to SENDING or DONE) says, after the job's reason, what made
them (:func:`results_event_reason`)::

    segmented: 108 structures; results in /srv/dicom-node/jobs/7; made by model ts: TotalSegmentator total_fast
    Dataset297 sha256:e7a03ab88bf64f5e, weights sha256:<all 64 digits>, device cpu, backend torch, precision fp32,
    tile_step_size 0.8, mirroring off, labels totalsegmentator 2.18.0

Retention and ``dicom-node purge`` delete the files but never the job history, so ``dicom-node show``, the console's
series page, ``dicom-node status --weights`` and the console's search still tell which weights made which series.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, exists, select
from sqlalchemy.orm import Session

from db.models import Job, JobEvent, JobState

MADE_BY = "; made by "
"""What separates a results event's reason from what made the results."""
RESULT_STATES = (JobState.SENDING, JobState.DONE)
"""The states a worker records results with (the event from PROCESSING)."""
WEIGHTS = re.compile(r"\bweights sha256:([0-9a-f]{64})\b")
HASH_DIGITS = re.compile(r"[0-9a-f]{8,64}")


@dataclass(frozen=True)
class RecordedWeights:
    """The weights the latest recorded results of a model were made with."""

    sha256: str
    job_id: int
    at: datetime


def results_event_reason(reason: str, made_by: str) -> str:
    """The reason of the event that records a run's results: the job's reason, then what made them."""
    return f"{reason}{MADE_BY}{made_by}" if made_by else reason


def made_by_in(reason: str | None) -> str | None:
    """What made the results, from a results event's reason; None where it does not say (recorded before it did)."""
    if not reason or MADE_BY not in reason:
        return None
    return reason.rpartition(MADE_BY)[2]


def _results_event(event: JobEvent) -> bool:
    return event.from_state is JobState.PROCESSING and event.to_state in RESULT_STATES


def recorded_made_by(job: Job) -> str | None:
    """What made the job's latest results, as its history records it; None without results, or for results
    recorded before the history said it."""
    latest = next((event for event in reversed(job.events) if _results_event(event)), None)
    return made_by_in(latest.reason) if latest is not None else None


def weights_digits(text: str) -> str | None:
    """The hex digits of a weights SHA-256 as an operator gives it (``sha256:e7a03ab8…``, or only its digits, at
    least 8 of them); None when ``text`` is not one."""
    digits = text.strip().lower().removeprefix("sha256:")
    return digits if HASH_DIGITS.fullmatch(digits) else None


def made_by_weights(digits: str) -> ColumnElement[bool]:
    """A condition on :class:`Job`: any of its runs made results with weights whose SHA-256 starts with ``digits``
    (a superseded run's too: its results were sent)."""
    return exists().where(
        JobEvent.job_id == Job.id,
        JobEvent.from_state == JobState.PROCESSING,
        JobEvent.to_state.in_(RESULT_STATES),
        JobEvent.reason.like(f"%{MADE_BY}%weights sha256:{digits}%"),
    )


def latest_weights(session: Session, model_name: str) -> RecordedWeights | None:
    """The weights the latest results recorded for model ``model_name`` were made with; None when no results of it
    recorded weights."""
    name = model_name.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    row = session.execute(
        select(JobEvent.reason, JobEvent.job_id, JobEvent.at)
        .where(
            JobEvent.from_state == JobState.PROCESSING,
            JobEvent.to_state.in_(RESULT_STATES),
            JobEvent.reason.like(f"%{MADE_BY}model {name}: %", escape="\\"),
        )
        .order_by(JobEvent.id.desc())
        .limit(1)
    ).first()
    if row is None:
        return None
    found = WEIGHTS.search(made_by_in(row.reason) or "")
    return RecordedWeights(found.group(1), row.job_id, row.at) if found else None
