"""What the pages and the API show, read from the database (and the job folders) in one place.

Every function returns plain dicts and lists (JSON-ready), so a page and its API twin show the
same thing. Patient details are included only when the caller says the user may see them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import ColumnElement, String, and_, cast, func, or_, select
from sqlalchemy.orm import Session, selectinload

from db import jobs
from db.models import AuditEvent, Instance, Job, JobEvent, JobState, RejectedInstance, Series, Study, as_utc
from dicom_node.admission import recorded_patient
from dicom_node.config import Destination, Settings, hide_url_password
from dicom_node.provenance import made_by_weights, recorded_made_by, weights_digits
from dicom_node.receive.header import StudyPatient, is_valid_uid
from dicom_node.watcher import receiving_progress

STATE_COLOURS: dict[str, str] = {
    "RECEIVING": "blue",
    "COMPLETE": "blue",
    "QUEUED": "grey",
    "PROCESSING": "amber",
    "SENDING": "amber",
    "DONE": "green",
    "FAILED": "red",
    "IGNORED": "grey",
}

INFER_EXCLUDED_TIMINGS = frozenset({"write", "encode", "model_load"})
"""jobs.timings keys that are not the model's work: the rest (load, predict, resample, ...) make up "infer"."""


MAX_SEARCH_CHARACTERS = 128
"""A search names one accession number or UID (at most 64 characters); longer text is cut here."""
MAX_PAGE = 100_000
"""Pages beyond this are not offered (the database's integers stay in range)."""


def _like_literal(text: str) -> str:
    """``text`` for a LIKE pattern with ``\\`` as escape: its ``%`` and ``_`` match only themselves."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


@dataclass(frozen=True)
class WorklistFilter:
    """The worklist's filters; empty fields filter nothing."""

    state: str | None = None
    day: date | None = None  # the day the series' first image arrived (UTC)
    rule: str | None = None
    destination: str | None = None
    search: str | None = None  # accession number, series or study instance UID (exact), or sha256:<weights>
    page: int = 1
    per_page: int = 25

    def described(self) -> str:
        """The page and filters, for the audit trail: ``page 2, state "FAILED", search "1.2.3.4"``."""
        parts = [f"page {self.page}"]
        for name in ("state", "day", "rule", "destination"):
            value = getattr(self, name)
            if value:
                parts.append(f'{name} "{str(value)[:MAX_SEARCH_CHARACTERS]}"')
        if self.search:  # every role reads the audit trail: an accession number searched for is not written
            named = is_valid_uid(self.search) or searched_weights(self.search)
            parts.append(f'search "{self.search}"' if named else "search by accession number")
        return ", ".join(parts)


def searched_weights(text: str) -> str | None:
    """The weights' SHA-256 digits a search names (``sha256:`` and 8 to 64 hex digits, as results name them); None
    for any other search (a UID or accession number made of digits only is never taken for one)."""
    return weights_digits(text) if text.strip().lower().startswith("sha256:") else None


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return as_utc(moment).isoformat(timespec="seconds")


class Transition(NamedTuple):
    """One change of a job's state, as :func:`stages_of` reads it (a :class:`JobEvent` row serves as well)."""

    from_state: JobState | None
    to_state: JobState
    at: datetime


def stage_seconds(job: Job) -> dict[str, float]:
    """:func:`stages_of` the job, its series and its events."""
    series = job.series
    return stages_of(job.state, job.timings, series.first_received_at, series.last_received_at, job.events)


def stages_of(
    state: JobState,
    timings: dict[str, Any] | None,
    first_image: datetime,
    last_image: datetime,
    events: Sequence[Transition | JobEvent],
) -> dict[str, float]:
    """Seconds per stage of a job's latest run, for those it has been through; ``events`` oldest first.

    receive: first to last image; complete: last image to COMPLETE; infer: the model's work
    (``jobs.timings`` except write, encode and model_load); encode: writing the label map and
    SEG/SR/RTSTRUCT; dispatch: SENDING to DONE. Also ``end_to_end``: last image to DONE after
    SENDING (results accepted by every destination).
    """
    timings = timings or {}
    last_image = as_utc(last_image)
    stages = {"receive": max((last_image - as_utc(first_image)).total_seconds(), 0.0)}
    completed = next((e for e in reversed(events) if e.to_state is JobState.COMPLETE), None)
    if completed is not None and as_utc(completed.at) >= last_image:
        stages["complete"] = (as_utc(completed.at) - last_image).total_seconds()
    infer = [float(v) for k, v in timings.items() if k not in INFER_EXCLUDED_TIMINGS]
    if infer:
        stages["infer"] = sum(infer)
    if "write" in timings or "encode" in timings:
        stages["encode"] = float(timings.get("write", 0.0)) + float(timings.get("encode", 0.0))
    if state is JobState.DONE and events and events[-1].from_state is JobState.SENDING:
        done = as_utc(events[-1].at)
        sending = next((e for e in reversed(events) if e.to_state is JobState.SENDING), None)
        if sending is not None:
            stages["dispatch"] = max((done - as_utc(sending.at)).total_seconds(), 0.0)
        stages["end_to_end"] = max((done - last_image).total_seconds(), 0.0)
    return stages


def _patient(study: Study) -> dict[str, Any]:
    return {
        "patient_name": study.patient_name,
        "patient_id": study.patient_id,
        "patient_birth_date": study.patient_birth_date,
        "accession_number": study.accession_number,
        "study_description": study.study_description,
    }


MAX_PATIENTS_SHOWN = 20
"""The most distinct patients read from one series' images to label its row (normally one)."""
ANOTHER_PATIENT = re.compile(r"already holds another patient's images \(its (\w+) differs")
"""Admission's refusal of a series naming another patient than its study's (:func:`admission._check_study_patient`):
the keyword it names is the attribute that differs."""


def _series_patient(session: Session, job: Job) -> dict[str, Any]:
    """The patient a series row is shown under: its study's, unless the series names another patient.

    A series whose images name another patient than its study's (same StudyInstanceUID; another PatientID, or
    another issuer, name, birth date or sex where both carry one, compared as admission compares them) is
    recorded under that study, but it is not that patient's: it is shown with the PatientID its own images carry,
    none of the study's patient details, and ``another_patient`` saying so, whether admission has refused it yet
    or it is still being received."""
    series, study = job.series, job.series.study
    own = session.execute(
        select(
            Instance.patient_id,
            Instance.issuer_of_patient_id,
            Instance.patient_name,
            Instance.patient_birth_date,
            Instance.patient_sex,
            Instance.issuer_universal_entity_id,
        )
        .where(Instance.series_id == series.id, Instance.patient_id.is_not(None), Instance.patient_id != "")
        .distinct()
        .limit(MAX_PATIENTS_SHOWN)
    ).all()  # an image without a PatientID names no other patient (admission refuses it for that)
    study_patient = recorded_patient(study) or StudyPatient(None)  # an erased identity names nobody
    differing_keywords = [study_patient.differing_keyword(StudyPatient(*row)) for row in own]
    refused = ANOTHER_PATIENT.search(job.reason or "")
    if not any(differing_keywords) and refused is None:
        return _patient(study)
    ids = sorted({str(row.patient_id) for row in own})
    issuers = sorted({f"{row.patient_id} of {row.issuer_of_patient_id}" for row in own if row.issuer_of_patient_id})
    named = f"PatientID {', '.join(issuers or ids)}" if ids else "its PatientID is not stored"
    differing = refused.group(1) if refused is not None else next(k for k in differing_keywords if k)
    return {
        "patient_name": None,
        "patient_id": ", ".join(ids) or None,
        "patient_birth_date": None,
        "accession_number": None,
        "study_description": None,
        "another_patient": f"{'refused: ' if job.state is JobState.FAILED else ''}names another patient ({named})",
        "another_patient_detail": (
            f"its {differing} differs from its study's patient, so it is not shown as that patient's series, and "
            "the name and birth date its images carry are not shown"
        ),
    }


def worklist(session: Session, wanted: WorklistFilter, *, with_patient: bool) -> dict[str, Any]:
    """One page of recent series (newest change first) and how many match in all."""
    query = select(Job).join(Job.series).join(Series.study)
    if wanted.state:
        query = query.where(Job.state == JobState(wanted.state))
    if wanted.day:
        start = datetime(wanted.day.year, wanted.day.month, wanted.day.day, tzinfo=timezone.utc)
        query = query.where(Series.first_received_at >= start, Series.first_received_at < start + timedelta(days=1))
    if wanted.rule:
        query = query.where(Job.rule_name == wanted.rule)
    if wanted.destination:
        pattern = f'%"{_like_literal(wanted.destination)}"%'
        query = query.where(cast(Job.destinations, String).like(pattern, escape="\\"))
    if wanted.search:
        text = wanted.search.strip()[:MAX_SEARCH_CHARACTERS]
        matches = [Series.series_instance_uid == text, Study.study_instance_uid == text]
        if with_patient:  # the accession number is a patient detail: only who may see it may search by it
            matches.append(Study.accession_number == text)
        digits = searched_weights(text)
        if digits:  # "sha256:e7a03ab8...": the series whose results these weights made
            matches.append(made_by_weights(digits))
        query = query.where(or_(*matches))
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    page = min(max(wanted.page, 1), MAX_PAGE)
    rows = session.scalars(
        query.options(selectinload(Job.series).selectinload(Series.study), selectinload(Job.events))
        .order_by(Job.state_changed_at.desc(), Job.id.desc())
        .offset((page - 1) * wanted.per_page)
        .limit(wanted.per_page)
    ).all()
    return {
        "total": total,
        "page": page,
        "per_page": wanted.per_page,
        "pages": max(1, -(-total // wanted.per_page)),
        "jobs": [job_summary(session, job, with_patient=with_patient) for job in rows],
    }


def job_summary(session: Session, job: Job, *, with_patient: bool) -> dict[str, Any]:
    """One worklist row; while SENDING, ``delivery_waiting`` says what each destination lacking files last
    answered (a PACS down shows on the worklist, not only on the series page)."""
    series = job.series
    progress = jobs.delivery_progress(session, job) if job.deliveries else []
    sending = job.state is JobState.SENDING
    summary: dict[str, Any] = {
        "job_id": job.id,
        "series_instance_uid": series.series_instance_uid,
        "study_instance_uid": series.study.study_instance_uid,
        "modality": series.modality,
        "series_description": series.series_description,
        "calling_ae_title": series.calling_ae_title,
        "state": job.state.value,
        "state_colour": STATE_COLOURS[job.state.value],
        "stage": job.stage if job.state is JobState.PROCESSING else None,
        "reason": receiving_progress(session, series) if job.state is JobState.RECEIVING else job.reason,
        "rule": job.rule_name,
        "model": job.model_name,
        "destinations": list(job.destinations or []),
        "images_received": series.instance_count,
        "images_expected": series.expected_instances,
        "first_received_at": _iso(series.first_received_at),
        "state_changed_at": _iso(job.state_changed_at),
        "version": job.version,  # changes with every change of the job: actions can ask for the one shown
        "stage_seconds": {k: round(v, 2) for k, v in stage_seconds(job).items()},
        "delivery": [p.summary() for p in progress],
        "delivery_waiting": [note for p in progress if (note := p.waiting_note())] if sending else [],
        "warnings": list(job.warnings or []),
    }
    if with_patient:
        summary["patient"] = _series_patient(session, job)
    return summary


def job_detail(session: Session, job: Job, *, with_patient: bool) -> dict[str, Any]:
    """The series page: summary, timeline, structures, result files, delivery record."""
    detail = job_summary(session, job, with_patient=with_patient)
    detail["events"] = [
        {
            "at": _iso(event.at),
            "from_state": event.from_state.value if event.from_state else None,
            "to_state": event.to_state.value,
            "reason": event.reason,
        }
        for event in job.events
    ]
    detail["timings"] = dict(job.timings or {})
    detail["made_by"] = recorded_made_by(job)  # from the job's history: still there after a purge
    detail["structures"] = structures(job)
    detail["files"] = [{"name": path.name, "size_bytes": _size(path)} for path in result_files(job).values()]
    detail["has_preview"] = preview_path(job) is not None
    detail["deliveries"] = [
        {
            "destination": p.destination,
            "files_total": p.total,
            "files_delivered": len(p.delivered),
            "attempts": p.attempts,
            "last_error": p.last_error,
            "delivered_at": _iso(jobs.delivery_record(job, p.destination).delivered_at),
            "next_attempt_at": _iso(p.next_attempt_at) if job.state is JobState.SENDING else None,
            "unreachable_since": _iso(p.unreachable_since),
        }
        for p in jobs.delivery_progress(session, job)
    ]
    detail["purged_at"] = _iso(job.series.purged_at)
    return detail


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def latest_run_folder(job: Job) -> Path | None:
    """The folder of the job's latest results: ``jobs/<id>/`` after the first run, ``jobs/<id>/run-<N>/`` after a
    re-run (where its recorded result files lie); None without results."""
    if not job.result_path:
        return None
    job_folder = Path(job.result_path).resolve()
    for file in job.result_files or []:
        folder = Path(file).parent.resolve()
        if folder == job_folder or folder.parent == job_folder:
            return folder
    return job_folder


def structures(job: Job) -> list[dict[str, Any]]:
    """The job's measurements.json (latest run): name, volume ml, mean and SD HU, cut by the scan's edge."""
    folder = latest_run_folder(job)
    if folder is None:
        return []
    try:
        written = json.loads((folder / "measurements.json").read_text())
    except (OSError, ValueError):
        return []
    rows = []
    for name, figures in (written.get("structures") or {}).items():
        rows.append(
            {
                "name": name,
                "volume_ml": round(float(figures.get("volume_ml", 0.0)), 2),
                "mean_hu": _rounded(figures.get("mean_hu"), 1),
                "sd_hu": _rounded(figures.get("sd_hu"), 1),
                "cut_by_scan_edge": bool(figures.get("cut_by_scan_edge")),
            }
        )
    return rows


def result_files(job: Job) -> dict[str, Path]:
    """File name -> path of what the console offers for download: the DICOM results and measurements.json.

    Only files recorded for this job and lying, as plain files (no symbolic links), inside its own
    result folder are offered: nothing else on the disk can be reached through a download.
    """
    files = {Path(p).name: Path(p) for p in job.result_files or []}
    folder = latest_run_folder(job)
    if folder is not None:
        files["measurements.json"] = folder / "measurements.json"
    return {name: path for name, path in files.items() if _inside_results(job, path)}


def _inside_results(job: Job, path: Path) -> bool:
    folder = latest_run_folder(job)
    if folder is None or path.is_symlink() or not path.is_file():
        return False
    return path.resolve().parent == folder


def _rounded(value: Any, digits: int) -> float | None:
    """A figure of measurements.json, rounded; None where it has none (no voxel inside the reconstructed field)."""
    return None if value is None else round(float(value), digits)


def preview_path(job: Job) -> Path | None:
    folder = latest_run_folder(job)
    if folder is None:
        return None
    path = folder / "preview.png"
    return path if _inside_results(job, path) else None


PATIENT_KEYWORDS = ("Patient", "AccessionNumber", "StudyDescription")
"""A refusal reason naming one of these may quote a patient detail: viewers see only its first words."""
_LABEL_WORD = re.compile(r"[A-Za-z][A-Za-z-]*")


def refusal_kind(reason: str) -> str:
    """A reason's first plain words: at most five, before the first quote, colon, digit or bracket.

    Words with other characters (``Doe^Jane``, UIDs, paths) end it, so values taken from the data
    do not appear: the metrics' reason label, and what a viewer sees of a reason naming the patient.
    """
    head = re.split(r"[:'\"(\d]", reason, maxsplit=1)[0].strip().rstrip(",;.")
    words = []
    for word in head.split()[:5]:
        if not _LABEL_WORD.fullmatch(word.rstrip(",;.")):
            break
        words.append(word.rstrip(",;."))
    return " ".join(words) or "other"


def _reason_for(reason: str, with_patient: bool) -> str:
    if with_patient or not any(keyword in reason for keyword in PATIENT_KEYWORDS):
        return reason
    return f"{refusal_kind(reason)} … (the rest is shown to roles that see patient details)"


def rejected(session: Session, limit: int = 100, *, with_patient: bool = True) -> list[dict[str, Any]]:
    rows = session.scalars(select(RejectedInstance).order_by(RejectedInstance.received_at.desc()).limit(limit))
    return [
        {
            "received_at": _iso(row.received_at),
            "calling_ae_title": row.calling_ae_title,
            "status": f"0x{row.status:04X}",
            "series_instance_uid": row.series_instance_uid,
            "sop_instance_uid": row.sop_instance_uid,
            "reason": _reason_for(row.reason, with_patient),
        }
        for row in rows
    ]


def rejected_count(session: Session) -> int:
    return int(session.scalar(select(func.count(RejectedInstance.id))) or 0)


ECHO_DETAIL_PREFIX = "outgoing C-ECHO"


def echo_detail(destination: str) -> str:
    """How the audit record of a C-ECHO of ``destination`` begins; ``: <outcome>`` (the console's probe) or
    ``, requested by <user>: <outcome>`` (an operator's) follows."""
    return f"{ECHO_DETAIL_PREFIX} to destination {destination}"


def echoes_of(name: str, destination: Destination) -> ColumnElement[bool]:
    """The audit records of C-ECHOs of destination ``name``: by its address and the name its records give (two
    destinations at one host and port, two AE titles there, are two)."""
    said = echo_detail(name)
    return and_(
        AuditEvent.action == "echo",
        AuditEvent.peer_address == f"{destination.host}:{destination.port}",
        AuditEvent.detail.startswith(f"{said}:", autoescape=True)
        | AuditEvent.detail.startswith(f"{said},", autoescape=True),
    )


def sends_to(destination: Destination) -> ColumnElement[bool]:
    """The audit records of sends to ``destination``: by its address and AE title."""
    return and_(
        AuditEvent.action == "send",
        AuditEvent.peer_address == f"{destination.host}:{destination.port}",
        AuditEvent.peer_ae_title == destination.ae_title,
    )


def destinations(session: Session, settings: Settings) -> list[dict[str, Any]]:
    """Per configured destination: last C-ECHO, last successful send, last error (from the audit trail)."""
    result = []
    for name, destination in settings.destinations.items():
        latest = select(AuditEvent).order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(1)
        echoes, sends = echoes_of(name, destination), sends_to(destination)
        echo = session.scalars(latest.where(echoes))
        sent = session.scalars(latest.where(sends, AuditEvent.outcome == "success"))
        error = session.scalars(latest.where(or_(echoes, sends), AuditEvent.outcome != "success"))
        last_echo, last_success, last_error = echo.first(), sent.first(), error.first()
        result.append(
            {
                "name": name,
                "ae_title": destination.ae_title,
                "host": destination.host,
                "port": destination.port,
                "tls": destination.tls,
                "send": list(destination.send),
                "last_echo": _audit_brief(last_echo),
                "last_success": _audit_brief(last_success),
                "last_error": _audit_brief(last_error),
                "reachable": None if last_echo is None else last_echo.outcome == "success",
            }
        )
    return result


def _audit_brief(row: AuditEvent | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {"at": _iso(row.at), "outcome": row.outcome, "detail": row.detail}


def audit_trail(session: Session, limit: int = 200, action: str | None = None) -> list[dict[str, Any]]:
    query = select(AuditEvent).order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(limit)
    if action:
        query = query.where(AuditEvent.action == action)
    return [
        {
            "at": _iso(row.at),
            "action": row.action,
            "peer_ae_title": row.peer_ae_title,
            "peer_address": row.peer_address,
            "study_instance_uid": row.study_instance_uid,
            "outcome": row.outcome,
            "instances": row.instances,
            "detail": row.detail,
        }
        for row in session.scalars(query)
    ]


def state_counts(session: Session) -> dict[str, int]:
    counts = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
    return {state.value: int(counts.get(state, 0)) for state in JobState}


SECRET_KEYS = (
    "password_hash",
    "session_secret",
    "metrics_token",
    "private_key",
    "tls_private_key",
    "password",
    "token",
)
HIDDEN = "(hidden)"


def visible_config(settings: Settings) -> dict[str, Any]:
    """The effective configuration with every secret (hashes, keys, tokens, database password) hidden."""
    data = settings.model_dump(mode="json")
    _hide(data)
    url = (data.get("database") or {}).get("url")
    if url:  # a password holding '@', '/' or spaces defeats URL parsers: hidden up to the URL's last '@'
        data["database"]["url"] = hide_url_password(url)
    return data


def _hide(value: Any) -> None:
    if isinstance(value, dict):
        for key in list(value):
            if any(key == secret or key.endswith(f"_{secret}") for secret in SECRET_KEYS) and value[key] is not None:
                value[key] = HIDDEN
            else:
                _hide(value[key])
    elif isinstance(value, list):
        for item in value:
            _hide(item)
