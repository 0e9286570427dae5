"""Operator actions on a series (retry, re-route, cancel): one transaction each, a JobEvent and an audit record."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fastapi import Request
from sqlalchemy.orm import Session

from db import jobs
from db.jobs import InvalidTransition
from db.models import Job, JobState, as_utc
from db.session import transaction
from dicom_node.admission import (
    AdmissionResult,
    InstanceFile,
    StorageUnavailable,
    admit,
    instance_files,
    model_footprint,
    recorded_patient,
)
from dicom_node.console.access import ConsoleContext
from dicom_node.console.auth import User
from dicom_node.logs import shown
from dicom_node.receive.header import StudyPatient
from dicom_node.routing import never_process_reason, series_facts

LOG = logging.getLogger(__name__)


class ActionRefused(Exception):
    """The action is not possible for this series now; the message says why."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def seen_version(value: str | int | None, verb: str) -> int | None:
    """The job version a page or API client showed (``version`` of the series), or None where none was sent.

    Raises
    ------
    ActionRefused
        If ``value`` is not a whole number (422).
    """
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ActionRefused(f"cannot {verb}: {shown(value)} is not a series version", status=422) from None


def _run(
    context: ConsoleContext,
    request: Request,
    user: User,
    uid: str,
    verb: str,
    change: object,
    seen: int | None = None,
) -> str:
    """Apply ``change(session, job)`` to the series' job; audit the outcome; return the job's new state.

    ``seen`` is the job version the operator's page showed: a series that changed since (another operator's
    re-route or run again, finished meanwhile and back in the same state) is refused, not processed once more.
    """
    study = None
    try:
        with transaction(context.sessions) as session:
            job = jobs.job_for_series_uid(session, uid)
            if job is None:
                made = jobs.made_by_node_reason(session, uid)
                raise ActionRefused(made or f"no series {uid} on this node", status=404)
            # Lock the row and read it again: of two actions sent at once, the second sees the first's outcome
            # (PostgreSQL: SELECT ... FOR UPDATE; SQLite's BEGIN IMMEDIATE already serialises writers).
            session.refresh(job, with_for_update=True)
            study = job.series.study.study_instance_uid
            if seen is not None and job.version != seen:
                raise ActionRefused(_changed_since_shown(job))
            change(session, job)  # type: ignore[operator]
            state = job.state.value
    except InvalidTransition as exc:
        context.audit(request, user.name, "refused", f"{verb} of series {uid} refused: {exc}", study)
        raise ActionRefused(f"cannot {verb}: {exc}") from None
    except ActionRefused as exc:
        context.audit(request, user.name, "refused", f"{verb} of series {uid} refused: {exc.message}", study)
        raise ActionRefused(f"cannot {verb}: {exc.message}", exc.status) from None
    context.audit(request, user.name, "success", f"{verb} of series {uid}: now {state}", study)
    return state


def _changed_since_shown(job: Job) -> str:
    """Why an action on a page older than the series' last change is refused, with the change."""
    return (
        f"the series changed since it was shown (it is {job.state.value} now, since "
        f"{as_utc(job.state_changed_at):%Y-%m-%d %H:%M:%S} UTC: {job.reason or 'no reason recorded'}); "
        "look at it again first"
    )


def retry(
    context: ConsoleContext,
    request: Request,
    user: User,
    uid: str,
    seen: str | None = None,
    version: int | None = None,
) -> str:
    """Resend what a destination lacks, or route the series again (``db.jobs.retry``); ``seen`` is the state and
    ``version`` the job version the page or API client showed when the operator asked: a series that changed
    since is not retried."""
    try:
        seen_state = JobState(seen) if seen else None
    except ValueError:
        raise ActionRefused(f"cannot retry: {shown(seen)} is not a series state", status=422) from None
    return _run(
        context,
        request,
        user,
        uid,
        "retry",
        lambda session, job: jobs.retry(session, job, by=user.name, seen=seen_state),
        seen=version,
    )


def cancel(context: ConsoleContext, request: Request, user: User, uid: str) -> str:
    """Stop a waiting, processing or sending series (``db.jobs.cancel``): FAILED, naming the user."""
    finished = jobs.settled_rule(context.settings.dispatch.max_attempts, context.settings.dispatch.unreachable_hours)
    return _run(
        context,
        request,
        user,
        uid,
        "cancel",
        lambda session, job: jobs.cancel(session, job, by=user.name, finished=finished),
    )


def reroute(
    context: ConsoleContext,
    request: Request,
    user: User,
    uid: str,
    rule: str | None,
    model: str | None,
    version: int | None = None,
) -> str:
    """Process the series again with another rule (its model and destinations) and/or another model; with
    ``version`` (the job version the page showed), only if the series has not changed since."""
    settings = context.settings
    chosen = next((r for r in settings.rules if r.name == rule), None) if rule else None
    refusal = None
    if rule and (chosen is None or chosen.action != "process"):
        known = ", ".join(r.name for r in settings.rules if r.action == "process") or "none"
        refusal = f"{shown(rule)} is not a processing rule (known: {known})"
    elif model and model not in settings.models:
        refusal = f"unknown model {shown(model)} (known: {', '.join(settings.models)})"
    elif not rule and not model:
        refusal = "choose a rule or a model"
    if refusal is not None:
        context.audit(request, user.name, "refused", f"re-route of series {shown(uid)} refused: {refusal}")
        raise ActionRefused(f"cannot re-route: {refusal}", status=422)

    checked = _check_before_reroute(context, request, user, uid, model or (chosen.model if chosen else None))

    def change(session: Session, job: Job) -> None:
        jobs.check_reroutable(job)
        if checked is None or (job.state, job.series.instance_count) != (checked.state, checked.instances):
            raise InvalidTransition("the series changed while its headers were checked; re-route it again")
        rule_name = chosen.name if chosen else (job.rule_name or "operator")
        model_name = model or (chosen.model if chosen else None) or ""
        destinations = list(chosen.destinations) if chosen else list(job.destinations or [])
        jobs.reroute(
            session,
            job,
            rule_name=rule_name,
            model_name=model_name,
            destinations=destinations,
            by=user.name,
            admission_warnings=checked.warnings,
        )

    return _run(context, request, user, uid, "re-route", change, seen=version)


@dataclass(frozen=True)
class _Checked:
    """What the headers were checked against, and admission's warnings."""

    state: JobState
    instances: int
    warnings: list[str]


def _check_before_reroute(
    context: ConsoleContext, request: Request, user: User, uid: str, model: str | None
) -> _Checked | None:
    """Routing's guard and admission, as for a newly completed series, for the model the re-route chose: a re-route
    chooses the model, not the checks.

    Reads the headers after the session that found the series ended, and audits a refusal outside it (on SQLite
    a session holds the write lock, which the audit record would wait for). None when there is no such series
    (``_run`` says so).

    Raises
    ------
    ActionRefused
        Naming why the series cannot be re-routed now, or what the guard or admission found (and audited).
    """
    not_reroutable: str | None = None
    with context.sessions() as session:  # on SQLite this holds the write lock: nothing is audited inside it
        job = jobs.job_for_series_uid(session, uid)
        if job is None:
            return None
        study = job.series.study.study_instance_uid
        try:
            jobs.check_reroutable(job)
        except InvalidTransition as exc:
            not_reroutable = str(exc)
        else:
            state, instances = job.state, job.series.instance_count
            facts = series_facts(session, job.series)
            guard = never_process_reason(facts)
            files = instance_files(session, job.series) if guard is None else []
            modality, study_patient = facts.modality, recorded_patient(job.series.study)  # as the watcher routes it
    if not_reroutable is not None:
        context.audit(request, user.name, "refused", f"re-route of series {uid} refused: {not_reroutable}", study)
        raise ActionRefused(f"cannot re-route: {not_reroutable}")
    try:
        admission = None if guard else _admit(files, context, modality, study_patient, uid, model)
    except StorageUnavailable as exc:
        context.audit(request, user.name, "refused", f"re-route of series {uid} refused: {exc}", study)
        raise ActionRefused(f"cannot re-route now: {exc}; try again in a moment") from None
    if guard:
        refusal: str | None = f"not processed: {guard}"
    else:
        assert admission is not None
        refusal = f"{jobs.ADMISSION_REFUSED_PREFIX}: {admission.refusal}" if admission.refusal else None
    if refusal is not None:
        context.audit(request, user.name, "refused", f"re-route of series {uid} refused: {refusal}", study)
        raise ActionRefused(f"cannot re-route: {refusal}")
    return _Checked(state, instances, admission.warnings if admission else [])


def _admit(
    files: list[InstanceFile],
    context: ConsoleContext,
    modality: str | None,
    study_patient: StudyPatient | None,
    uid: str,
    model: str | None,
) -> AdmissionResult:
    """Admission for ``model``, with a header no check foresaw refusing the re-route (as the watcher does) instead
    of failing it."""
    try:
        footprint = model_footprint(context.settings.models, model)
        return admit(files, context.settings.admission, modality, study_patient, footprint)
    except StorageUnavailable:
        raise
    except Exception:
        LOG.exception("reroute.admission_error", extra={"event_fields": {"series_instance_uid": uid}})
        return AdmissionResult(
            refusal="the series' headers could not be checked (an unexpected error, in the node's log with the series UID)"
        )
