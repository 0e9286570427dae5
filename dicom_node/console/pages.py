"""The console's server-rendered pages: login, worklist, series, rejected, destinations, configuration, audit."""

from __future__ import annotations

from datetime import date, datetime, timezone
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

import yaml
from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import FileResponse, RedirectResponse, Response

from db import jobs
from db.models import JobState
from db.session import read_only
from dicom_node import audit
from dicom_node.console import actions, queries
from dicom_node.console.access import (
    Forbidden,
    check_origin,
    client_address,
    console_of,
    identify,
    over_https,
    posting_operator,
    posting_viewer,
    viewer,
)
from dicom_node.console.auth import (
    LOGIN_COOKIE,
    LOGIN_FORM_SECONDS,
    SESSION_COOKIE,
    LoginThrottle,
    User,
    local_login,
)

router = APIRouter(include_in_schema=False)


def _page(request: Request, template: str, user: User | None, status_code: int = 200, **values: Any) -> Response:
    context = console_of(request)
    base = {
        "user": user,
        "csrf": context.auth.csrf_token(user) if user else "",
        "ae_title": context.settings.network.ae_title,
        "sees_patient": bool(user and context.may_see_patient(user)),
        "may_download": bool(user and context.may_download(user)),
    }
    return context.templates.TemplateResponse(request, template, {**base, **values}, status_code=status_code)


def _safe_next(target: str | None) -> str:
    """Only a path on this console (never another site) is followed after login.

    Browsers drop tabs and line breaks from a Location and read a backslash as a slash, so
    ``/<tab>/evil.example`` would leave the console: any control character, space or backslash is refused.
    """
    if (
        target
        and target.startswith("/")
        and not target.startswith("//")
        and not any(ord(c) <= 0x20 or ord(c) == 0x7F or c == "\\" for c in target)
    ):
        return target
    return "/"


def _login_page(request: Request, next_path: str, status_code: int = 200, error: str | None = None) -> Response:
    """The login form, with a fresh login token bound to a short-lived cookie (CSRF protection of the login)."""
    context = console_of(request)
    proxy = context.settings.console.auth == "proxy_header"
    nonce = context.auth.login_nonce()
    response = _page(
        request,
        "login.html",
        None,
        status_code=status_code,
        next=next_path,
        proxy=proxy,
        error=error,
        login_token=context.auth.login_token(nonce),
        title="Log in",
    )
    response.set_cookie(
        LOGIN_COOKIE,
        nonce,
        max_age=LOGIN_FORM_SECONDS,
        httponly=True,
        samesite="strict",
        secure=over_https(request),
        path="/login",
    )
    return response


@router.get("/login")
def login_form(request: Request, next: str = "/") -> Response:
    if identify(request) is not None:
        return RedirectResponse(_safe_next(next), status_code=303)
    return _login_page(request, _safe_next(next))


@router.post("/login")
def login(
    request: Request,
    username: Annotated[str, Form()] = "",
    password: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/",
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    context = console_of(request)
    address = client_address(request) or "unknown"
    # What the audit trail, which every role reads, records of a refused attempt: a configured user's name,
    # never what else was typed (often a password typed into the wrong field).
    claimed = username if username in context.settings.console.users else "(a name that is no user)"
    target = _safe_next(next)
    check_origin(request)
    if not context.auth.login_token_valid(request.cookies.get(LOGIN_COOKIE), csrf_token):
        error = "The login form expired or came from another page; log in again."
        return _login_page(request, target, status_code=403, error=error)
    wait, throttled = context.throttle.begin(address, username)
    if wait:
        if throttled == "name":
            reason = f"login refused: too many failed logins as {claimed} in the last minute"
            error = f"Too many failed logins for this user name; try again in {wait} s."
        else:
            reason = f"login refused: too many failed logins from {address}"
            error = f"Too many failed logins from this address; try again in {wait} s."
        # a client can repeat these at will: one record per address and user name each 10 s, counting the others
        key = ("login", LoginThrottle.key(address), claimed)
        context.audit_repeatable(request, key, "such logins were refused", claimed, "refused", reason)
        return _login_page(request, target, status_code=429, error=error)
    console = context.settings.console
    role = local_login(console, username, password) if console.auth == "local" else None
    if role is None:  # already counted as a failure by begin()
        context.audit(request, claimed, "refused", "login failed: wrong user name or password")
        return _login_page(request, target, status_code=401, error="Wrong user name or password.")
    context.throttle.succeeded(address, username)
    _user, cookie = context.auth.issue(username, role, console.users[username].password_hash)
    context.audit(request, username, "success", f"logged in ({role})")
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        cookie,
        max_age=int(context.auth.lifetime_seconds),
        httponly=True,
        samesite="strict",
        secure=over_https(request),
        path="/",
    )
    response.delete_cookie(LOGIN_COOKIE, path="/login")
    return response


@router.post("/logout")
def logout(request: Request, user: Annotated[User, Depends(posting_viewer)]) -> Response:
    context = console_of(request)
    context.auth.end(user)
    context.audit(request, user.name, "success", "logged out")
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


def _filters(request: Request) -> queries.WorklistFilter:
    params = request.query_params
    state = params.get("state") or None
    if state not in {s.value for s in JobState}:
        state = None
    try:
        day = date.fromisoformat(params["day"]) if params.get("day") else None
    except ValueError:
        day = None
    try:
        page = min(max(int(params.get("page", "1")), 1), queries.MAX_PAGE)
    except ValueError:
        page = 1
    search = (params.get("search") or "")[: queries.MAX_SEARCH_CHARACTERS] or None
    return queries.WorklistFilter(
        state, day, params.get("rule") or None, params.get("destination") or None, search, page
    )


def _worklist_values(request: Request, user: User) -> dict[str, Any]:
    context = console_of(request)
    wanted = _filters(request)
    context.audit_view(request, user, f"viewed the worklist ({wanted.described()})")
    with read_only(context.sessions) as session:
        listing = queries.worklist(session, wanted, with_patient=context.may_see_patient(user))
        counts = queries.state_counts(session)
    query = {k: v for k, v in request.query_params.items() if k != "page" and v}
    return {
        "listing": listing,
        "counts": counts,
        "filters": wanted,
        "states": [s.value for s in JobState],
        "rules": [r.name for r in context.settings.rules],
        "destinations": list(context.settings.destinations),
        "page_link": lambda page: "/?" + urlencode({**query, "page": page}),
        "rows_link": "/worklist/rows?" + urlencode({**query, "page": wanted.page}),
        "refresh_ms": int(context.settings.console.refresh_seconds * 1000),
        "now": datetime.now(timezone.utc).strftime("%H:%M:%S"),
    }


@router.get("/")
def worklist(request: Request, user: Annotated[User, Depends(viewer)]) -> Response:
    return _page(request, "worklist.html", user, title="Worklist", **_worklist_values(request, user))


@router.get("/worklist/rows")
def worklist_rows(request: Request, user: Annotated[User, Depends(viewer)]) -> Response:
    """The worklist's table body alone: what the page fetches to refresh itself."""
    return _page(request, "worklist_table.html", user, **_worklist_values(request, user))


@router.get("/series/{uid}")
def series(uid: str, request: Request, user: Annotated[User, Depends(viewer)]) -> Response:
    context = console_of(request)
    with read_only(context.sessions) as session:
        job = jobs.job_for_series_uid(session, uid)
        if job is None:
            return _page(
                request,
                "error.html",
                user,
                status_code=404,
                title="Not found",
                message=f"No series {uid} on this node.",
            )
        detail = queries.job_detail(session, job, with_patient=context.may_see_patient(user))
        study = job.series.study.study_instance_uid
    context.audit_view(request, user, f"viewed series {uid}", study)
    flash = _notice(request, uid, "done")
    problem = _notice(request, uid, "error")
    return _page(
        request,
        "series.html",
        user,
        title="Series",
        job=detail,
        flash=flash,
        problem=problem,
        rules=[r.name for r in context.settings.rules if r.action == "process"],
        models=list(context.settings.models),
    )


def _notice(request: Request, uid: str, kind: str) -> str | None:
    """The outcome an action put in the address; shown only when this console signed it (no text from links)."""
    text = request.query_params.get(kind)
    signature = request.query_params.get("sig")
    if not text or not console_of(request).auth.notice_valid(f"{kind}:{uid}:{text}", signature):
        return None
    return text


def _back_to_series(request: Request, uid: str, kind: str, text: str) -> Response:
    signature = console_of(request).auth.notice_signature(f"{kind}:{uid}:{text}")
    return RedirectResponse(f"/series/{uid}?" + urlencode({kind: text, "sig": signature}), status_code=303)


def _after_action(request: Request, uid: str, run: Any) -> Response:
    try:
        state = run()
    except actions.ActionRefused as exc:
        return _back_to_series(request, uid, "error", exc.message)
    return _back_to_series(request, uid, "done", f"done: the series is now {state}")


@router.post("/series/{uid}/retry")
def retry(
    uid: str,
    request: Request,
    user: Annotated[User, Depends(posting_operator)],
    state: Annotated[str, Form()] = "",
    version: Annotated[str, Form()] = "",
) -> Response:
    """The series page's Retry: only while the series is as the page showed it (its state and version)."""
    return _after_action(
        request,
        uid,
        lambda: actions.retry(
            console_of(request), request, user, uid, state or None, actions.seen_version(version, "retry")
        ),
    )


@router.post("/series/{uid}/cancel")
def cancel(uid: str, request: Request, user: Annotated[User, Depends(posting_operator)]) -> Response:
    return _after_action(request, uid, lambda: actions.cancel(console_of(request), request, user, uid))


@router.post("/series/{uid}/reroute")
def reroute(
    uid: str,
    request: Request,
    user: Annotated[User, Depends(posting_operator)],
    rule: Annotated[str, Form()] = "",
    model: Annotated[str, Form()] = "",
    version: Annotated[str, Form()] = "",
) -> Response:
    """The series page's Re-route: only while the series is as the page showed it (its version)."""
    context = console_of(request)
    return _after_action(
        request,
        uid,
        lambda: actions.reroute(
            context, request, user, uid, rule or None, model or None, actions.seen_version(version, "re-route")
        ),
    )


@router.get("/series/{uid}/preview.png")
def preview(uid: str, request: Request, user: Annotated[User, Depends(viewer)]) -> Response:
    context = console_of(request)
    with read_only(context.sessions) as session:
        job = jobs.job_for_series_uid(session, uid)
        path = queries.preview_path(job) if job else None
        study = job.series.study.study_instance_uid if job else None
    if path is None:
        return Response("no preview for this series", status_code=404, media_type="text/plain")
    context.audit_view(request, user, f"viewed the CT preview of series {uid}", study)
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "no-store"})


@router.get("/series/{uid}/files/{name}")
def download(uid: str, name: str, request: Request, user: Annotated[User, Depends(viewer)]) -> Response:
    """A result file of the series (roles in console.downloads_allowed_to); every download is audited."""
    context = console_of(request)
    if not context.may_download(user):
        # a viewer can repeat these at will, naming any file: the names cut, one record per user each 10 s
        what = f"download of {audit.as_sent(name, 64)} of series {audit.as_sent(uid, 64)}"
        context.audit_repeatable(
            request,
            ("download", user.name),
            "downloads by this user were refused",
            user.name,
            "refused",
            f"{what} refused: role {user.role}",
        )
        raise Forbidden(
            f"{user.name} is a {user.role}; downloads are for {', '.join(context.settings.console.downloads_allowed_to)}"
        )
    with read_only(context.sessions) as session:
        job = jobs.job_for_series_uid(session, uid)
        files = queries.result_files(job) if job else {}
        study = job.series.study.study_instance_uid if job else None
    path = files.get(name)
    if path is None or not Path(path).is_file():
        return Response("no such result file", status_code=404, media_type="text/plain")
    context.audit(request, user.name, "success", f"downloaded {name} of series {uid}", study)
    media = "application/dicom" if name.endswith(".dcm") else "application/json"
    return FileResponse(path, media_type=media, filename=name, headers={"Cache-Control": "no-store"})


@router.get("/rejected")
def rejected(request: Request, user: Annotated[User, Depends(viewer)]) -> Response:
    context = console_of(request)
    with read_only(context.sessions) as session:
        rows = queries.rejected(session, 200, with_patient=context.may_see_patient(user))
    context.audit_view(request, user, "viewed the rejected instances")
    return _page(request, "rejected.html", user, title="Rejected instances", rows=rows)


@router.get("/destinations")
def destinations(request: Request, user: Annotated[User, Depends(viewer)]) -> Response:
    context = console_of(request)
    with read_only(context.sessions) as session:
        rows = queries.destinations(session, context.settings)
    return _page(request, "destinations.html", user, title="Destinations", rows=rows)


@router.post("/destinations/{name}/echo")
def echo(name: str, request: Request, user: Annotated[User, Depends(posting_operator)]) -> Response:
    from dicom_node.console.probe import echo_destination

    context = console_of(request)
    if name in context.settings.destinations:
        echo_destination(context.settings, context.sessions, name, user.name)
    return RedirectResponse("/destinations", status_code=303)


@router.get("/config")
def configuration(request: Request, user: Annotated[User, Depends(viewer)]) -> Response:
    shown = yaml.safe_dump(queries.visible_config(console_of(request).settings), sort_keys=False)
    return _page(request, "config.html", user, title="Configuration", config_text=shown)


@router.get("/audit")
def audit_trail(request: Request, user: Annotated[User, Depends(viewer)]) -> Response:
    action = request.query_params.get("action") or None
    with read_only(console_of(request).sessions) as session:
        rows = queries.audit_trail(session, 300, action)
    return _page(request, "audit.html", user, title="Audit trail", rows=rows, action=action)
