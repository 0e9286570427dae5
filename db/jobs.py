"""State transitions of a series' job: the only place a job's state changes.

Every change is checked against :data:`ALLOWED_TRANSITIONS`, stamped, and logged
as a :class:`~db.models.JobEvent`, so the database tells the whole story of each
series. Functions take an open session; the caller owns the transaction.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, and_, exists, func, or_, select, update
from sqlalchemy.orm import Session

from db.models import Delivery, InterruptedTransfer, Job, JobEvent, JobState, Series, as_utc, utcnow
from db.results import DeliveryRecord, ResultFile

S = JobState

ALLOWED_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    S.RECEIVING: frozenset({S.COMPLETE}),
    S.COMPLETE: frozenset({S.QUEUED, S.IGNORED, S.FAILED, S.RECEIVING}),
    S.QUEUED: frozenset({S.PROCESSING, S.FAILED, S.RECEIVING}),
    S.PROCESSING: frozenset({S.SENDING, S.DONE, S.FAILED, S.QUEUED, S.RECEIVING}),
    S.SENDING: frozenset({S.DONE, S.FAILED, S.RECEIVING}),
    S.DONE: frozenset({S.RECEIVING, S.COMPLETE}),
    S.FAILED: frozenset({S.COMPLETE, S.QUEUED, S.SENDING, S.RECEIVING}),
    S.IGNORED: frozenset({S.COMPLETE, S.RECEIVING}),
}

RETRYABLE_STATES = frozenset({S.FAILED, S.IGNORED, S.DONE})


class InvalidTransition(RuntimeError):
    """A state change that the job's current state does not allow."""


def change_state(
    session: Session, job: Job, to_state: JobState, reason: str | None = None, *, event_reason: str | None = None
) -> None:
    """Move ``job`` to ``to_state``, recording why (``event_reason``: what the history keeps, where it says more
    than the job's reason).

    Raises
    ------
    InvalidTransition
        If the transition is not in :data:`ALLOWED_TRANSITIONS`.
    """
    from_state = job.state
    if to_state not in ALLOWED_TRANSITIONS[from_state]:
        raise InvalidTransition(f"job {job.id}: {from_state.value} -> {to_state.value} is not allowed")
    now = utcnow()
    if to_state is not S.PROCESSING:
        job.lease_expires_at = None  # a lease covers PROCESSING only
    job.state = to_state
    job.reason = reason
    job.state_changed_at = now
    session.add(JobEvent(job=job, from_state=from_state, to_state=to_state, reason=event_reason or reason, at=now))


def open_job(session: Session, series: Series) -> Job:
    """Create the RECEIVING job of a newly seen series."""
    job = Job(series=series, state=S.RECEIVING, reason="first instance received")
    session.add(job)
    session.add(JobEvent(job=job, from_state=None, to_state=S.RECEIVING, reason=job.reason))
    return job


def reopen(session: Session, job: Job, why: str = "late instance") -> bool:
    """A new instance arrived (or ``why`` else): put the series back to RECEIVING unless it is there already.

    Returns True when the job was re-opened (it had completed, or finished).
    """
    if job.state is S.RECEIVING:
        return False
    job.warnings = None  # the series changed: the next run's caveats are its own
    job.worker_deaths = 0
    change_state(session, job, S.RECEIVING, f"{why} re-opened the series (was {job.state.value})")
    return True


def mark_complete(session: Session, job: Job, reason: str) -> None:
    change_state(session, job, S.COMPLETE, reason)


def queue(
    session: Session,
    job: Job,
    *,
    rule_name: str,
    model_name: str,
    destinations: Sequence[str],
    note: str | None = None,
) -> None:
    """Routing chose a model: hand the series to the inference workers (``note``: more to say in the event)."""
    job.rule_name = rule_name
    job.model_name = model_name
    job.destinations = list(destinations)
    job.not_before = None  # routed afresh: an earlier wait for disk space no longer holds it back
    reason = f"rule {rule_name!r}: process with model {model_name!r}"
    change_state(session, job, S.QUEUED, f"{reason} ({note})" if note else reason)


EARLIER_RESULTS = "was sent results of an earlier run of this series"


def holders_of_earlier_results(session: Session, job: Job) -> list[str]:
    """Destinations that accepted any result file of the series as it is now (the ``deliveries`` rows, which stay
    when a new run clears ``job.deliveries``), or that the last run's files were being sent to (planned: a file in
    flight when the series re-opened is stored after this is read). Each keeps what it stored; a new run
    supersedes it. Only what was sent since the series was first received as it is now counts: a purged series
    sent again (perhaps corrected, under another study or patient) is routed as it is sent now, and the
    destinations of its earlier self get nothing of it.
    """
    since = job.series.first_received_at
    query = select(Delivery.destination).where(Delivery.job_id == job.id, Delivery.delivered_at >= since)
    accepted = set(session.scalars(query.distinct()))
    last_sent = session.scalar(
        select(func.max(JobEvent.at)).where(JobEvent.job_id == job.id, JobEvent.to_state == S.SENDING)
    )
    planned: set[str] = set()
    if last_sent is not None and as_utc(last_sent) >= as_utc(since):
        planned = {name for name, record in (job.deliveries or {}).items() if record.files is not None or record.sent}
    return sorted(accepted | planned)


def is_earlier_results_warning(warning: str) -> bool:
    """A warning written by :func:`add_holders_of_earlier_results`."""
    return EARLIER_RESULTS in warning


def add_holders_of_earlier_results(
    session: Session, job: Job, destinations: Sequence[str], configured: Collection[str]
) -> list[str]:
    """``destinations``, and after them every configured destination that holds results of an earlier run of the
    series: the new run supersedes those results, so it goes where they went. Each one added, or left out because
    it is no longer configured, is named in the job's warnings."""
    chosen = list(destinations)
    warnings = []
    for name in holders_of_earlier_results(session, job):
        if name in chosen:
            continue
        if name in configured:
            chosen.append(name)
            warnings.append(f"{name} {EARLIER_RESULTS}, so it is sent this run too")
        else:
            warnings.append(
                f"{name} {EARLIER_RESULTS} but is no longer a configured destination, so it keeps the earlier "
                "results, which this run supersedes"
            )
    append_warnings(job, warnings, replacing=is_earlier_results_warning)
    return chosen


def ignore(session: Session, job: Job, reason: str, *, rule_name: str | None = None) -> None:
    job.rule_name = rule_name
    change_state(session, job, S.IGNORED, reason)


def fail(session: Session, job: Job, reason: str) -> None:
    change_state(session, job, S.FAILED, reason)


def finish_sending(session: Session, job: Job, reason: str) -> None:
    """Every destination has every result file: SENDING -> DONE."""
    change_state(session, job, S.DONE, reason)


ADMISSION_REFUSED_PREFIX = "not admitted"


def refuse_admission(session: Session, job: Job, reason: str, *, rule_name: str | None = None) -> None:
    """Admission refused a COMPLETE series from its headers: FAILED, never queued for inference."""
    job.rule_name = rule_name
    change_state(session, job, S.FAILED, f"{ADMISSION_REFUSED_PREFIX}: {reason}")


PARTIAL_SERIES_PREFIX = "partial series:"


def is_partial_series_warning(warning: str) -> bool:
    """The warning completion writes when the expected-count timeout completed a series."""
    return warning.startswith(PARTIAL_SERIES_PREFIX)


def _keep_completion_warnings(job: Job) -> None:
    """Before a series is routed again: drop the warnings of the run before, keep what completion found.

    Completion runs once per arrival of images, not again on retry or re-route, so its partial-series
    warning must stay with the series for every later run's results.
    """
    job.warnings = [w for w in job.warnings or [] if is_partial_series_warning(w)] or None


def append_warnings(job: Job, warnings: Sequence[str], *, replacing: Callable[[str], bool] | None = None) -> None:
    """Add sentences to ``job.warnings`` (each once), first dropping the earlier ones ``replacing`` selects.

    The list is shared by every stage; each stage only ever removes the warnings it wrote itself.
    """
    merged = [w for w in (job.warnings or []) if replacing is None or not replacing(w)]
    for warning in warnings:
        if warning and warning not in merged:
            merged.append(warning)
    job.warnings = merged or None


def defer(session: Session, job: Job, until: datetime, reason: str) -> None:
    """Put a job that hit a transient fault (a full disk) back in the queue, to be claimed from ``until``.

    The job stays visible as QUEUED with ``reason`` (e.g. "waiting for disk space: ...");
    workers skip it until ``not_before`` has passed, so it finishes without an operator.
    """
    job.not_before = until
    change_state(session, job, S.QUEUED, reason)


def claimable(now: datetime | None = None) -> ColumnElement[bool]:
    """The condition a job must meet to be claimed by a worker: QUEUED and not deferred past ``now``."""
    moment = now or utcnow()
    return and_(Job.state == S.QUEUED, or_(Job.not_before.is_(None), Job.not_before <= moment))


SENDING_FAILURE_PREFIX = "sending failed"


IMAGES_PURGED = "the series' images were purged (by retention or dicom-node purge); send the series again to process it"


def retry(
    session: Session, job: Job, *, by: str = "operator", seen: JobState | None = None, run_done_again: bool = True
) -> None:
    """Operator's retry (``by`` names who asked): resend what a destination lacks, else route the series again.

    A job that failed while sending, whose results still exist and of which some
    destination lacks some file (no row in ``deliveries``), goes back to SENDING;
    the dispatcher then sends only the missing files, which needs no images. Where the results
    lack a kind a destination takes (made under another configuration), the series is processed again.

    What a retry does depends on the state it finds, so ``seen`` (the state the operator acted on) must still be
    the job's: of two retries of a series that failed while sending, the first resends the missing files and the
    series is soon DONE; the second, found DONE, would process it again and send PACS a second set of results.
    ``run_done_again`` False refuses a DONE series (the command line asks for ``--run-again``).

    Raises
    ------
    InvalidTransition
        If the job is still in progress, changed since the operator saw it, is DONE where ``run_done_again`` is
        False, or must be processed again and retention has purged its images.
    """
    if seen is not None and job.state is not seen:
        raise InvalidTransition(
            f"the series is {job.state.value} now, not {seen.value} as when it was shown (another retry or the node "
            "changed it meanwhile); look at it again before retrying"
        )
    if job.state not in RETRYABLE_STATES:
        raise InvalidTransition(
            f"series is {job.state.value}; only {', '.join(s.value for s in sorted(RETRYABLE_STATES))} can be retried"
        )
    lacking = any(record.lacking for record in (job.deliveries or {}).values())
    resend = job.state is S.FAILED and job.result_files and _failed_while_sending(job) and not lacking
    if resend and lacks_deliveries(session, job):
        job.deliveries = {
            name: record.model_copy(
                update={
                    "attempts": 0,
                    "next_attempt_at": None,
                    "unreachable_since": None,
                    "unreachable_last_at": None,
                    "unreachable_attempts": 0,
                }
            )
            for name, record in (job.deliveries or {}).items()
        }
        change_state(session, job, S.SENDING, f"resend of the missing files requested by {by}")
        return
    if job.series.purged_at is not None:
        raise InvalidTransition(IMAGES_PURGED)
    if job.state is S.DONE and not run_done_again:
        raise InvalidTransition(
            "series is DONE: its results were delivered; retrying it processes it again and sends a second set of "
            "results (marked as replacing the first): ask for that with --run-again"
        )
    _keep_completion_warnings(job)  # routed and processed again: the new run states its own caveats
    job.worker_deaths = 0
    change_state(session, job, S.COMPLETE, f"retry requested by {by} (was {job.state.value})")


def _failed_while_sending(job: Job) -> bool:
    """Whether the job's last transition (its recorded stage, not the wording of its reason) was SENDING -> FAILED."""
    last = job.events[-1] if job.events else None
    return last is not None and last.to_state is S.FAILED and last.from_state is S.SENDING


CANCELLABLE_STATES = frozenset({S.COMPLETE, S.QUEUED, S.PROCESSING, S.SENDING})


def cancel(
    session: Session, job: Job, *, by: str, finished: Callable[[DeliveryRecord | None], bool] | None = None
) -> None:
    """Operator's cancel: stop a series that is waiting, processing or sending; it becomes FAILED.

    A worker still busy with it finds the job no longer theirs and drops its results. A SENDING
    series is cancelled only while every destination lacking files waits for its next try, or is one
    the dispatcher has finished with (``finished``: :func:`settled_rule` under the node's settings):
    a C-STORE association in progress cannot be recalled. ``retry`` starts it again.

    Raises
    ------
    InvalidTransition
        If the series is still receiving or already finished, or its results are being sent now.
    """
    if job.state not in CANCELLABLE_STATES:
        allowed = ", ".join(s.value for s in sorted(CANCELLABLE_STATES))
        raise InvalidTransition(f"series is {job.state.value}; only {allowed} series can be cancelled")
    sending = _sending_now(job, finished) if job.state is S.SENDING else []
    if sending:
        raise InvalidTransition(
            f"the results are being sent to {', '.join(sending)} now and files already on their way cannot be "
            "recalled; cancel once this attempt has ended (while a destination waits for its next try)"
        )
    change_state(session, job, S.FAILED, f"cancelled by {by} (was {job.state.value})")


def _sending_now(job: Job, finished: Callable[[DeliveryRecord | None], bool] | None = None) -> list[str]:
    """Destinations of a SENDING job that may be receiving its files now: not delivered, not finished with
    by the dispatcher, not waiting for a retry."""
    now = utcnow()
    busy = []
    for name in job.destinations or []:
        record = delivery_record(job, name)
        if record.delivered_at is not None or (finished is not None and finished(record)):
            continue
        due = record.next_attempt_at
        waiting = due is not None and (due if due.tzinfo else due.replace(tzinfo=now.tzinfo)) > now
        if not waiting:
            busy.append(name)
    return busy


def delivery_settled(record: DeliveryRecord | None, *, max_attempts: int, unreachable_hours: float) -> bool:
    """Whether the dispatcher has finished with a destination: it has every file, has used ``max_attempts``
    (``dispatch.max_attempts``), or has been unreachable for ``unreachable_hours`` (``dispatch.unreachable_hours``)."""
    record = record or DeliveryRecord()
    return (
        record.delivered_at is not None
        or record.attempts >= max_attempts
        or unreachable_too_long(record.unreachable_since, record.unreachable_last_at, unreachable_hours)
    )


def settled_rule(max_attempts: int, unreachable_hours: float) -> Callable[[DeliveryRecord | None], bool]:
    """:func:`delivery_settled` under these settings (``dispatch.max_attempts``, ``dispatch.unreachable_hours``):
    the one rule the dispatcher and an operator's cancel share."""

    def settled(record: DeliveryRecord | None) -> bool:
        return delivery_settled(record, max_attempts=max_attempts, unreachable_hours=unreachable_hours)

    return settled


def unreachable_too_long(since: datetime | None, last: datetime | None, unreachable_hours: float) -> bool:
    """Whether a destination found unreachable from ``since`` to ``last`` (attempts made, not time passed: a node
    that was down itself tries again first) has been so for ``unreachable_hours``."""
    if since is None or last is None:
        return False
    return as_utc(last) - as_utc(since) >= timedelta(hours=unreachable_hours)


def check_reroutable(job: Job) -> None:
    """Raise InvalidTransition, with the reason, unless the series may be re-routed now."""
    if job.series.purged_at is not None:
        raise InvalidTransition(IMAGES_PURGED)
    if job.state not in RETRYABLE_STATES:
        raise InvalidTransition(
            f"series is {job.state.value}; only {', '.join(s.value for s in sorted(RETRYABLE_STATES))} can be re-routed"
        )
    if job.state is S.FAILED and (job.reason or "").startswith(ADMISSION_REFUSED_PREFIX):
        raise InvalidTransition("admission refused this series; fix the data or settings and retry it instead")


def reroute(
    session: Session,
    job: Job,
    *,
    rule_name: str,
    model_name: str,
    destinations: Sequence[str],
    by: str,
    admission_warnings: Sequence[str] = (),
) -> None:
    """Operator's re-route: process a finished series again with another rule or model (COMPLETE, then QUEUED).

    The caller has run routing's guard and admission on the series first (``admission_warnings`` are
    admission's); this keeps the completion's partial-series warning.

    Raises
    ------
    InvalidTransition
        If the series is in progress, its images were purged, or admission refused it
        (fix the data and retry instead).
    """
    check_reroutable(job)
    _keep_completion_warnings(job)
    append_warnings(job, admission_warnings)
    job.worker_deaths = 0
    change_state(session, job, S.COMPLETE, f"re-route to rule {rule_name!r}, model {model_name!r} requested by {by}")
    queue(session, job, rule_name=rule_name, model_name=model_name, destinations=destinations)


# --- per-file delivery records -------------------------------------------------------------------


@dataclass
class DestinationProgress:
    """What one destination of a job has received, from the ``deliveries`` rows."""

    destination: str
    planned: dict[str, str] | None  # SOP Instance UID -> result file; None before the first attempt
    delivered: dict[str, Delivery] = field(default_factory=dict)  # SOP Instance UID -> its record
    attempts: int = 0
    last_error: str | None = None
    next_attempt_at: datetime | None = None
    unreachable_since: datetime | None = None
    unreachable_last_at: datetime | None = None

    @property
    def total(self) -> int | None:
        return None if self.planned is None else len(self.planned)

    @property
    def missing(self) -> dict[str, str]:
        """SOP Instance UID -> file, for planned files without a delivery record."""
        return {uid: path for uid, path in (self.planned or {}).items() if uid not in self.delivered}

    @property
    def complete(self) -> bool:
        return self.planned is not None and not self.missing

    def waiting_note(self, limit: int = 160) -> str | None:
        """``pacs: <its last error>`` while it lacks files after a try that failed (the PACS down, refusing); None
        otherwise. The error is cut to ``limit`` characters."""
        if self.complete or not self.last_error:
            return None
        error = self.last_error if len(self.last_error) <= limit else self.last_error[: limit - 3] + "..."
        return f"{self.destination}: {error}"

    def summary(self) -> str:
        """``pacs 2/2`` (``planner ?/?`` before its first attempt)."""
        if self.planned is None:
            return f"{self.destination} ?/?"
        return f"{self.destination} {len(self.planned) - len(self.missing)}/{len(self.planned)}"


def delivery_record(job: Job, destination: str) -> DeliveryRecord:
    """``destination``'s side of the job (an empty record before its first attempt)."""
    return (job.deliveries or {}).get(destination) or DeliveryRecord()


def update_delivery_record(job: Job, destination: str, record: DeliveryRecord) -> None:
    """Store ``destination``'s record (the column is written whole, so the change is saved)."""
    job.deliveries = {**(job.deliveries or {}), destination: record}


def plan_delivery(session: Session, job: Job, destination: str, files: dict[str, str], peer: str | None = None) -> None:
    """Record which result files (SOP Instance UID -> path) ``destination`` takes, before sending any, and the
    ``peer`` it names now ("AE@host:port"); the results now hold every kind it takes (a lack noted under older
    settings no longer stands)."""
    update: dict[str, object] = {"files": dict(files), "lacking": [], "peer": peer}
    update_delivery_record(job, destination, delivery_record(job, destination).model_copy(update=update))


def repoint_delivery(session: Session, job: Job, destination: str, peer: str) -> str | None:
    """``destination`` names ``peer`` now: if its plan was made for another peer (its AE title, host or port
    changed in config.yaml), what that peer accepted does not count for this one. Its delivery rows are kept
    under the old peer's name (``pacs (was AE@host:port)``), its record starts afresh, and the job's warnings
    say so. The sentence, or None when nothing changed."""
    record = delivery_record(job, destination)
    if record.peer is None or record.peer == peer:
        return None
    kept_as = f"{destination} (was {record.peer})"[:64]
    kept = set(
        session.scalars(
            select(Delivery.sop_instance_uid).where(Delivery.job_id == job.id, Delivery.destination == kept_as)
        )
    )
    for row in session.scalars(select(Delivery).where(Delivery.job_id == job.id, Delivery.destination == destination)):
        if row.sop_instance_uid in kept:  # that peer's record of the file is there already (pointed back and forth)
            session.delete(row)
        else:
            row.destination = kept_as
    update_delivery_record(job, destination, DeliveryRecord())
    sentence = (
        f"destination {destination} names another peer now ({peer}, was {record.peer} when its results were "
        "planned): what the earlier peer accepted does not count for it, so it is sent every file of the results"
    )
    append_warnings(job, [sentence])
    return sentence


def note_results_lacking(job: Job, destination: str, kinds: list[str]) -> None:
    """The run made none of these kinds that ``destination`` takes: an operator's retry processes the series again
    (resending would find them missing again)."""
    update_delivery_record(job, destination, delivery_record(job, destination).model_copy(update={"lacking": kinds}))


def record_attempt(
    session: Session,
    job: Job,
    destination: str,
    *,
    now: datetime,
    complete: bool,
    error: str | None,
    next_attempt_at: datetime | None,
    unreachable: bool = False,
    longest_gap: timedelta | None = None,
) -> DeliveryRecord:
    """Count one sending attempt to ``destination``: delivered (every file accepted), or its error and next try.

    An attempt that found the destination ``unreachable`` (no association) is not counted in ``attempts``
    but in ``unreachable_attempts``, from ``unreachable_since``; an attempt that reaches it ends that count.
    The time between two such tries counts up to ``longest_gap`` (the longest wait between tries, and a margin):
    a longer one is the node's own downtime or the wall clock stepped forward, and a negative one the clock stepped
    back, so ``unreachable_since`` moves by the difference and the destination is judged by the tries' own spacing.
    """
    record = delivery_record(job, destination)
    if unreachable:
        streak = {
            "unreachable_since": _unreachable_since(record, now, longest_gap),
            "unreachable_last_at": now,
            "unreachable_attempts": record.unreachable_attempts + 1,
        }
    else:
        streak = {
            "attempts": record.attempts + 1,
            "unreachable_since": None,
            "unreachable_last_at": None,
            "unreachable_attempts": 0,
        }
    if complete:
        updated = record.model_copy(update={**streak, "delivered_at": now, "last_error": None, "next_attempt_at": None})
    else:
        updated = record.model_copy(
            update={
                **streak,
                "last_error": error or "not every file was accepted",
                "next_attempt_at": next_attempt_at,
            }
        )
    update_delivery_record(job, destination, updated)
    return updated


def _unreachable_since(record: DeliveryRecord, now: datetime, longest_gap: timedelta | None) -> datetime:
    """When ``record``'s destination became unreachable, with the time since its last unreachable try counted up to
    ``longest_gap`` and never below zero (:func:`record_attempt`)."""
    if record.unreachable_since is None or record.unreachable_last_at is None:
        return now
    since, gap = as_utc(record.unreachable_since), as_utc(now) - as_utc(record.unreachable_last_at)
    counted = max(gap, timedelta(0)) if longest_gap is None else min(max(gap, timedelta(0)), longest_gap)
    return since + (gap - counted)


def record_delivery(
    session: Session,
    job_id: int,
    destination: str,
    *,
    sop_instance_uid: str,
    sop_class_uid: str,
    path: str,
    status: int,
) -> None:
    """Record that ``destination`` accepted one file: called right after its C-STORE response.

    Idempotent: a row that exists already (the same file accepted again) is left as it is.
    """
    exists = session.scalar(
        select(Delivery.id).where(
            Delivery.job_id == job_id,
            Delivery.destination == destination,
            Delivery.sop_instance_uid == sop_instance_uid,
        )
    )
    if exists is None:
        session.add(
            Delivery(
                job_id=job_id,
                destination=destination,
                sop_instance_uid=sop_instance_uid,
                sop_class_uid=sop_class_uid,
                path=path,
                status=status,
            )
        )


def delivered_sop_instance_uids(session: Session, job_id: int, destination: str) -> set[str]:
    """SOP Instance UIDs that ``destination`` has accepted for this job."""
    query = select(Delivery.sop_instance_uid).where(Delivery.job_id == job_id, Delivery.destination == destination)
    return set(session.scalars(query))


def delivery_progress(session: Session, job: Job) -> list[DestinationProgress]:
    """Per destination of the job: the files it takes, those it has accepted, attempts and last error."""
    rows = session.scalars(select(Delivery).where(Delivery.job_id == job.id))
    by_destination: dict[str, dict[str, Delivery]] = {}
    for row in rows:
        by_destination.setdefault(row.destination, {})[row.sop_instance_uid] = row
    progress = []
    for name in job.destinations or []:
        record = delivery_record(job, name)
        planned = record.files
        delivered = by_destination.get(name, {})
        if planned is not None:
            delivered = {uid: row for uid, row in delivered.items() if uid in planned}
        progress.append(
            DestinationProgress(
                name,
                planned,
                delivered,
                record.attempts,
                record.last_error,
                record.next_attempt_at,
                record.unreachable_since,
                record.unreachable_last_at,
            )
        )
    return progress


def lacks_deliveries(session: Session, job: Job) -> bool:
    """Whether some destination of the job lacks some result file (or was never sent to)."""
    return any(not p.complete for p in delivery_progress(session, job))


def jobs_in_state(session: Session, states: Iterable[JobState]) -> list[Job]:
    return list(session.scalars(select(Job).where(Job.state.in_(list(states))).order_by(Job.id)))


def quiet_receiving_jobs(
    session: Session, quiet: timedelta, now: datetime | None = None, *, cut_short_quiet: timedelta | None = None
) -> list[Job]:
    """RECEIVING jobs whose series got no instance for ``quiet``; with ``cut_short_quiet``, of the series an
    association cut short (:mod:`db.transfers`) only those that got none for that long either: the others wait for
    the rest, and a node with thousands of them (a sender aborting in a loop) reads none of them at each pass."""
    now = now or utcnow()
    query = (
        select(Job)
        .join(Job.series)
        .where(Job.state == S.RECEIVING, Series.last_received_at <= now - quiet)
        .order_by(Series.last_received_at)
    )
    if cut_short_quiet is not None:
        cut_short = exists().where(InterruptedTransfer.series_instance_uid == Series.series_instance_uid)
        query = query.where(or_(~cut_short, Series.last_received_at <= now - cut_short_quiet))
    return list(session.scalars(query))


def job_for_series_uid(session: Session, series_instance_uid: str, *, lock: bool = False) -> Job | None:
    """The series' job; with ``lock``, its row locked for this transaction (PostgreSQL), to change it safely."""
    query = select(Job).join(Job.series).where(Series.series_instance_uid == series_instance_uid)
    if lock:
        query = query.with_for_update(of=Job)
    return session.scalars(query).one_or_none()


def made_by_node_reason(session: Session, series_instance_uid: str) -> str | None:
    """Where ``series_instance_uid`` is a series of the node's own results (a SEG, SR or RTSTRUCT that Query/Retrieve
    serves, with no job of its own), a sentence naming the CT series and job they were made from; else None."""
    made_from = select(Series.source_job_id).where(Series.series_instance_uid == series_instance_uid)
    source = session.execute(
        select(Series.series_instance_uid, Job.id)
        .join(Job, Job.series_id == Series.id)
        .where(Job.id == made_from.scalar_subquery())
    ).first()
    if source is None:
        return None
    return (
        f"series {series_instance_uid} holds results the node made (job {source.id}), not images it received: "
        f"name the CT series they were made from, {source.series_instance_uid}"
    )


# --- Warnings, stages and worker deaths (the inference worker's side of a job) ---

PARTIAL_WARNING = re.compile(r"^(partial\b|processed \d+ of \d+ images)", re.IGNORECASE)


def is_partial_warning(warning: str) -> bool:
    """A warning that says the result covers less than the whole series.

    It starts with "partial" (e.g. "partial series: 38 of 200 expected images ...")
    or "processed N of M images".
    """
    return PARTIAL_WARNING.match(warning) is not None


def set_stage(session: Session, job_id: int, stage: str, worker: str | None = None, attempt: int | None = None) -> None:
    """Record the stage a worker has reached on a job (one cheap UPDATE; read after a worker death).

    With ``worker`` (and ``attempt``), only while that claim holds the job: a worker whose lease was taken over
    never writes its stage over the new claim's.
    """
    query = update(Job).where(Job.id == job_id)
    if worker is not None:
        query = query.where(*_of_claim(worker, attempt))
    session.execute(query.values(stage=stage).execution_options(synchronize_session=False))


def _of_claim(worker: str, attempt: int | None) -> list[ColumnElement[bool]]:
    """A job ``worker`` is processing (in claim number ``attempt`` if given): the SQL twin of :func:`holds`."""
    conditions = [Job.state == S.PROCESSING, Job.claimed_by == worker]
    if attempt is not None:
        conditions.append(Job.attempts == attempt)
    return conditions


def database_now(session: Session) -> datetime:
    """The time leases are counted in: the database server's clock on PostgreSQL, which every host shares (a host
    whose clock runs ahead would otherwise write leases that run out late, or sweep others' early); this host's
    on SQLite, whose processes all run on one host."""
    if session.get_bind().dialect.name == "postgresql":
        moment = session.scalar(select(func.statement_timestamp()))
        if isinstance(moment, datetime):
            return as_utc(moment)
    return utcnow()


def next_claimable_series_id(session: Session, now: datetime | None = None) -> int | None:
    """The series of the job :func:`claim_next` would take now, without claiming or locking it (a peek)."""
    return session.scalar(
        select(Job.series_id).where(claimable(now or utcnow())).order_by(Job.state_changed_at, Job.id).limit(1)
    )


def claim_next(session: Session, worker: str, lease: timedelta, now: datetime | None = None) -> Job | None:
    """Claim the oldest claimable QUEUED job for ``worker``, with a lease until now + ``lease``; None if none.

    Two workers never get one job: on PostgreSQL the candidate row is locked with
    ``FOR UPDATE SKIP LOCKED`` (a concurrent claim skips to the next job); on every database
    the claim itself is a conditional UPDATE (``WHERE state = 'QUEUED'``) whose row count
    must be 1, so a job claimed meanwhile is left alone.
    """
    candidate = session.scalars(
        select(Job)
        .where(claimable(now))
        .order_by(Job.state_changed_at, Job.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    ).first()
    # The claim's time is taken in claim(), after this first statement: on SQLite its BEGIN IMMEDIATE may have waited
    # for another writer, and a time taken before that wait would date the claim before that writer's events.
    if candidate is None or not claim(session, candidate, worker, lease, now):
        return None  # nothing queued, or another worker's claim came first
    return candidate


def claim(session: Session, job: Job, worker: str, lease: timedelta, now: datetime | None = None) -> bool:
    """QUEUED -> PROCESSING for ``worker``, with a lease until now + ``lease``; False if ``job`` was claimed meanwhile.

    One conditional UPDATE (``WHERE state = 'QUEUED'``) whose row count must be 1. The lease runs from the
    database's clock (:func:`database_now`); the state's times are this host's, as every other state change's
    (start-up compares a claim's time with the claiming process' start on this host).
    """
    moment = now or utcnow()
    lease_start = now or database_now(session)
    reason = f"claimed by worker {worker}"
    claimed = cast(
        "CursorResult[Any]",
        session.execute(
            update(Job)
            .where(Job.id == job.id, Job.state == S.QUEUED)
            .values(
                state=S.PROCESSING,
                reason=reason,
                state_changed_at=moment,
                claimed_by=worker,
                stage="claimed",
                not_before=None,
                attempts=Job.attempts + 1,
                lease_expires_at=lease_start + lease,
                version=Job.version + 1,  # a writer that read the job QUEUED must decide again
            )
            .execution_options(synchronize_session=False)
        ),
    )
    if claimed.rowcount != 1:
        return False
    session.add(JobEvent(job_id=job.id, from_state=S.QUEUED, to_state=S.PROCESSING, reason=reason, at=moment))
    session.flush()
    session.refresh(job)
    return True


def renew_lease(session: Session, job_id: int, worker: str, lease: timedelta, attempt: int | None = None) -> bool:
    """Extend ``worker``'s lease on a job it is processing (claim number ``attempt`` if given) to ``lease`` from
    now by the database's clock; False when the job is no longer its own.

    (Re-opened by a late instance, or queued again after the lease ran out: the worker's
    result will be discarded.)
    """
    query = update(Job).where(Job.id == job_id, *_of_claim(worker, attempt))
    renewed = cast(
        "CursorResult[Any]",
        session.execute(
            query.values(lease_expires_at=database_now(session) + lease).execution_options(synchronize_session=False)
        ),
    )
    return renewed.rowcount == 1


def holds(job: Job, worker: str, attempt: int | None = None) -> bool:
    """Whether ``worker`` still holds ``job`` (PROCESSING, claimed by it, in claim number ``attempt`` if given).

    The attempt tells two claims by one worker id apart: containers that share a host name and run as
    pid 1 have the same id, and a claim lost and taken again must not publish the earlier run's result.
    """
    return job.state is S.PROCESSING and job.claimed_by == worker and (attempt is None or job.attempts == attempt)


def finish_processing(
    session: Session,
    job: Job,
    state: JobState,
    reason: str,
    *,
    result_path: str | None = None,
    result_files: Sequence[ResultFile] | None = None,
    warnings: Sequence[str] = (),
    event_reason: str | None = None,
) -> None:
    """The worker is done with ``job``: SENDING (results for destinations), DONE or FAILED; the lease ends.

    With ``result_path`` the run's results replace the job's earlier ones, and every
    destination starts afresh (no delivery record). ``event_reason`` is what the job's history keeps instead of
    ``reason`` (the worker's also names the model and weights that made the results).
    """
    if result_path is not None:
        job.result_path = result_path
        job.result_files = list(result_files or [])
        job.deliveries = {}
        append_warnings(job, warnings)
    change_state(session, job, state, reason, event_reason=event_reason)


def expired_leases(session: Session, now: datetime | None = None, *, lock: bool = True) -> list[Job]:
    """PROCESSING jobs whose worker's lease ran out: the worker died, hangs, or lost its host.

    With ``lock``, on PostgreSQL the rows are locked (``SKIP LOCKED``), so two workers sweeping at
    once never both queue one job again; without it, a plain read (``dicom-node status``, a first look).
    """
    moment = now or database_now(session)
    query = (
        select(Job)
        .where(Job.state == S.PROCESSING, Job.lease_expires_at.is_not(None), Job.lease_expires_at < moment)
        .order_by(Job.id)
    )
    return list(session.scalars(query.with_for_update(skip_locked=True) if lock else query))


def leased_jobs(session: Session, *, lock: bool = True) -> list[Job]:
    """PROCESSING jobs holding a lease, run out or not: what a sweep watches by its own steady clock (a lease
    written before the clock was set back reads valid for as long as the step). Locked as :func:`expired_leases`."""
    query = select(Job).where(Job.state == S.PROCESSING, Job.lease_expires_at.is_not(None)).order_by(Job.id)
    return list(session.scalars(query.with_for_update(skip_locked=True) if lock else query))


def jobs_of_worker(session: Session, worker: str) -> list[Job]:
    """PROCESSING jobs claimed by ``worker`` ("host:pid")."""
    query = select(Job).where(Job.state == S.PROCESSING, Job.claimed_by == worker).order_by(Job.id)
    return list(session.scalars(query))


def worker_died(session: Session, job: Job, max_deaths: int, *, detail: str = "") -> bool:
    """The worker holding ``job`` died: queue it again, or fail it once ``max_deaths`` workers died on it.

    Returns True when the job was failed. Call it only for a PROCESSING job whose
    ``claimed_by`` worker is known to be gone (or whose lease ran out); ``detail`` is added to the reason.
    """
    job.worker_deaths = (job.worker_deaths or 0) + 1
    stage = job.stage or "start"
    if job.worker_deaths >= max_deaths:
        change_state(
            session,
            job,
            S.FAILED,
            f"worker died while processing ({job.worker_deaths} times): last seen in stage {stage}{detail}",
        )
        return True
    change_state(
        session,
        job,
        S.QUEUED,
        f"worker {job.claimed_by} died in stage {stage} ({job.worker_deaths} of {max_deaths} allowed){detail}; "
        "queued again",
    )
    return False


def worker_stopped(session: Session, job: Job) -> None:
    """The worker holding ``job`` was stopped (shutdown): queue it again without counting a death."""
    change_state(
        session,
        job,
        S.QUEUED,
        f"worker {job.claimed_by} was stopped while it processed the series (not a crash); queued again",
    )


def node_restarted(session: Session, job: Job) -> None:
    """The whole node stopped (killed, power cut) while ``job`` was processed: queue it again without counting a
    death, because a restart says nothing about the series (a worker dying under a living node does)."""
    change_state(
        session,
        job,
        S.QUEUED,
        f"the node was restarted while worker {job.claimed_by} processed the series in stage {job.stage or 'start'} "
        "(not counted as a crash of this series); queued again",
    )


def lease_expired(
    session: Session, job: Job, max_deaths: int, now: datetime | None = None, *, ended_by: str | None = None
) -> bool:
    """``job``'s lease ran out: its worker is taken for dead (:func:`worker_died`); True when the job was failed.

    ``ended_by`` names who ended the worker because of it (``serve``, for a worker of its own that stopped
    responding): the reason then says so (:func:`taken_from_hung_worker`).
    """
    late = lease_overdue_seconds(session, job, now)
    if ended_by is not None:
        why = f"it stopped renewing its lease (frozen or hung; the lease ran out {late:.0f} s ago), so {ended_by} ended it"
        return taken_from_hung_worker(session, job, max_deaths, why)
    return worker_died(session, job, max_deaths, detail=f", its lease having run out {late:.0f} s ago")


def lease_overdue_seconds(session: Session, job: Job, now: datetime | None = None) -> float:
    """How long ago ``job``'s lease ran out, by the clock leases are counted in (0 when it has none)."""
    if job.lease_expires_at is None:
        return 0.0
    return max(0.0, ((now or database_now(session)) - as_utc(job.lease_expires_at)).total_seconds())


def taken_from_hung_worker(session: Session, job: Job, max_deaths: int, why: str) -> bool:
    """``job`` was taken from its worker, found hung (``why``: a clause saying how, and what became of the worker).

    Counted against ``max_deaths`` like a death (:func:`worker_died`), so a series that hangs every worker
    ends FAILED instead of blocking the queue again and again. Returns True when the job was failed.
    """
    job.worker_deaths = (job.worker_deaths or 0) + 1
    stage = job.stage or "start"
    count = f"{job.worker_deaths} of {max_deaths} allowed by inference.max_worker_deaths"
    ended = f"taken from worker {job.claimed_by} in stage {stage}: {why}"
    if job.worker_deaths >= max_deaths:
        change_state(session, job, S.FAILED, f"{ended} ({count}, so the series is not tried again)")
        return True
    change_state(session, job, S.QUEUED, f"{ended} ({count}); queued again")
    return False


def ran_too_long(session: Session, job: Job, max_deaths: int, limit_minutes: float, *, done: str) -> bool:
    """``job`` ran past ``inference.job_timeout_minutes`` (``done``: what was done about its worker, e.g. "serve
    ended the worker"): queued again or, at the crash limit, FAILED (:func:`taken_from_hung_worker`); True when
    the job was failed."""
    why = (
        f"the job ran past the time limit of {limit_minutes:g} min (inference.job_timeout_minutes), so {done}; "
        "raise the limit if the series needs longer"
    )
    return taken_from_hung_worker(session, job, max_deaths, why)
