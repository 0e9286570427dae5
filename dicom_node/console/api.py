"""The JSON API under /api: the same data and actions as the pages, behind the same login.

Calls with the session cookie send the session's CSRF token in ``X-CSRF-Token`` on every POST
(``GET /api/me`` returns it). The OpenAPI description is at ``/api/openapi.json`` (login needed).
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from db import jobs
from db.models import JobState
from db.session import read_only
from dicom_node.console import actions, queries
from dicom_node.console.access import console_of, operator, posting_operator, viewer
from dicom_node.console.auth import User
from dicom_node.console.metrics import readiness

router = APIRouter(prefix="/api", tags=["api"])


class RerouteRequest(BaseModel):
    """Another processing rule (its model and destinations), another model, or both."""

    rule: str | None = Field(None, description="A rule with action 'process'.")
    model: str | None = Field(None, description="A configured model name.")


def _refused(exc: actions.ActionRefused) -> JSONResponse:
    return JSONResponse({"detail": exc.message}, status_code=exc.status)


@router.get("/me")
def me(request: Request, user: Annotated[User, Depends(viewer)]) -> dict[str, Any]:
    """Who is logged in, their role, and the CSRF token their POSTs must carry."""
    context = console_of(request)
    return {
        "user": user.name,
        "role": user.role,
        "csrf_token": context.auth.csrf_token(user),
        "sees_patient_details": context.may_see_patient(user),
        "may_download": context.may_download(user),
    }


@router.get("/jobs")
def list_jobs(
    request: Request,
    user: Annotated[User, Depends(viewer)],
    state: JobState | None = None,
    day: Annotated[date | None, Query(description="Day the series' first image arrived (UTC), YYYY-MM-DD.")] = None,
    rule: str | None = None,
    destination: str | None = None,
    search: Annotated[
        str | None,
        Query(
            max_length=queries.MAX_SEARCH_CHARACTERS,
            description=(
                "Series or study instance UID; sha256: and the first 8 or more digits of the weights that made the "
                "results; accession number for roles that see patient details."
            ),
        ),
    ] = None,
    page: Annotated[int, Query(ge=1, le=queries.MAX_PAGE)] = 1,
    per_page: Annotated[int, Query(ge=1, le=500)] = 25,
) -> dict[str, Any]:
    """Recent series with state, model, images, stage times, delivery and warnings; filtered and paged."""
    context = console_of(request)
    wanted = queries.WorklistFilter(state.value if state else None, day, rule, destination, search, page, per_page)
    context.audit_view(request, user, f"listed series through the API ({wanted.described()})")
    with read_only(context.sessions) as session:
        return queries.worklist(session, wanted, with_patient=context.may_see_patient(user))


@router.get("/jobs/{series_instance_uid}")
def one_job(series_instance_uid: str, request: Request, user: Annotated[User, Depends(viewer)]) -> Any:
    """One series: timeline, structures, result files and the delivery record per destination."""
    context = console_of(request)
    with read_only(context.sessions) as session:
        job = jobs.job_for_series_uid(session, series_instance_uid)
        if job is None:
            made = jobs.made_by_node_reason(session, series_instance_uid)
            return JSONResponse({"detail": made or f"no series {series_instance_uid} on this node"}, status_code=404)
        detail = queries.job_detail(session, job, with_patient=context.may_see_patient(user))
        study = job.series.study.study_instance_uid
    context.audit_view(request, user, f"read series {series_instance_uid} through the API", study)
    return detail


@router.post("/jobs/{series_instance_uid}/retry")
def retry_job(
    series_instance_uid: str,
    request: Request,
    user: Annotated[User, Depends(posting_operator)],
    expected_state: str | None = None,
    expected_version: str | None = None,
) -> Any:
    """Resend what a destination lacks, or route a FAILED, IGNORED or DONE series again (operator); with
    ``?expected_state=FAILED``, only if the series is still in that state, with ``?expected_version=N`` (the
    ``version`` the series was read with), only if it has not changed since (409 otherwise)."""
    try:
        version = actions.seen_version(expected_version, "retry")
        return {
            "state": actions.retry(console_of(request), request, user, series_instance_uid, expected_state, version)
        }
    except actions.ActionRefused as exc:
        return _refused(exc)


@router.post("/jobs/{series_instance_uid}/cancel")
def cancel_job(series_instance_uid: str, request: Request, user: Annotated[User, Depends(posting_operator)]) -> Any:
    """Stop a COMPLETE, QUEUED, PROCESSING or SENDING series; it becomes FAILED (operator)."""
    try:
        return {"state": actions.cancel(console_of(request), request, user, series_instance_uid)}
    except actions.ActionRefused as exc:
        return _refused(exc)


@router.post("/jobs/{series_instance_uid}/reroute")
def reroute_job(
    series_instance_uid: str,
    body: RerouteRequest,
    request: Request,
    user: Annotated[User, Depends(posting_operator)],
    expected_version: str | None = None,
) -> Any:
    """Process a FAILED, IGNORED or DONE series again with another rule or model (operator); with
    ``?expected_version=N`` (the ``version`` the series was read with), only if it has not changed since (409)."""
    try:
        version = actions.seen_version(expected_version, "re-route")
        return {
            "state": actions.reroute(
                console_of(request), request, user, series_instance_uid, body.rule, body.model, version
            )
        }
    except actions.ActionRefused as exc:
        return _refused(exc)


@router.get("/rejected")
def rejected(
    request: Request, user: Annotated[User, Depends(viewer)], limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[dict[str, Any]]:
    """Instances refused at C-STORE, newest first, with their reasons (patient values hidden from viewers)."""
    context = console_of(request)
    with read_only(context.sessions) as session:
        rows = queries.rejected(session, limit, with_patient=context.may_see_patient(user))
    context.audit_view(request, user, "read the rejected instances through the API")
    return rows


@router.get("/destinations")
def destinations(request: Request, _user: Annotated[User, Depends(viewer)]) -> list[dict[str, Any]]:
    """Configured destinations with their last C-ECHO, last successful send and last error."""
    context = console_of(request)
    with read_only(context.sessions) as session:
        return queries.destinations(session, context.settings)


@router.post("/destinations/{name}/echo")
def echo(name: str, request: Request, user: Annotated[User, Depends(posting_operator)]) -> Any:
    """C-ECHO one destination now (operator); recorded in the audit trail."""
    from dicom_node.console.probe import echo_destination

    context = console_of(request)
    if name not in context.settings.destinations:
        return JSONResponse({"detail": f"unknown destination {name!r}"}, status_code=404)
    return {"destination": name, "reachable": echo_destination(context.settings, context.sessions, name, user.name)}


@router.get("/audit")
def audit_trail(
    request: Request,
    _user: Annotated[User, Depends(viewer)],
    action: str | None = None,
    limit: Annotated[int, Query(ge=1, le=5000)] = 200,
) -> list[dict[str, Any]]:
    """The audit trail, newest first (no patient data: UIDs only)."""
    with read_only(console_of(request).sessions) as session:
        return queries.audit_trail(session, limit, action)


@router.get("/config")
def configuration(request: Request, _user: Annotated[User, Depends(viewer)]) -> dict[str, Any]:
    """The effective configuration, secrets hidden."""
    return queries.visible_config(console_of(request).settings)


@router.get("/metrics/summary")
def metrics_summary(request: Request, _user: Annotated[User, Depends(viewer)]) -> dict[str, Any]:
    """Series per state, queue depth, refused instances and readiness, for dashboards without Prometheus."""
    context = console_of(request)
    with read_only(context.sessions) as session:
        counts = queries.state_counts(session)
        refused = queries.rejected_count(session)
    return {
        "jobs": counts,
        "queue_depth": counts["QUEUED"],
        "rejected_instances": refused,
        "ready": readiness(context.sessions, context.liveness),
    }


@router.get("/openapi.json", include_in_schema=False)
def openapi(request: Request, _user: Annotated[User, Depends(viewer)]) -> dict[str, Any]:
    """The API's OpenAPI description (login needed)."""
    app = request.app
    schema = app.openapi()
    schema["paths"] = {path: item for path, item in schema["paths"].items() if path.startswith("/api/")}
    return schema


__all__ = ["operator", "router"]
