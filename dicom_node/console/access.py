"""Who is asking, and may they: the console's request context, logins, roles, CSRF and origin checks.

Pages, the JSON API and operator actions depend on these; the application (``app.py``) wires them up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, NoReturn
from urllib.parse import quote, urlsplit

from fastapi import Depends, HTTPException, Request, Response
from fastapi.templating import Jinja2Templates
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session, sessionmaker
from starlette.datastructures import Headers

from dicom_node import audit
from dicom_node.config import ConsoleSettings, Settings
from dicom_node.console.auth import (
    CSRF_FIELD,
    CSRF_HEADER,
    PROXY_CREDENTIAL,
    SESSION_COOKIE,
    LoginThrottle,
    Sessions,
    User,
    forwarded_client,
    forwarded_scheme,
    from_trusted_proxy,
)
from dicom_node.console.metrics import Liveness

VIEW_AUDIT_SECONDS = 300.0
"""The same view by the same session (behind the single sign-on proxy: by the same user from the same address) is
recorded once in this long: a worklist that refreshes itself every few seconds does not fill the audit trail."""
VIEWS_REMEMBERED = 10_000


@dataclass
class ConsoleContext:
    """What every request handler needs: settings, database, sessions, throttle, metrics."""

    settings: Settings
    sessions: sessionmaker[Session]
    auth: Sessions
    throttle: LoginThrottle
    liveness: Liveness
    registry: CollectorRegistry
    templates: Jinja2Templates
    _views: dict[tuple[tuple[str, ...], str, str | None, bool], float] = field(default_factory=dict, repr=False)
    _views_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def may_see_patient(self, user: User) -> bool:
        return user.role in self.settings.console.show_patient_details_to

    def may_download(self, user: User) -> bool:
        return user.role in self.settings.console.downloads_allowed_to

    def audit(self, request: Request, user: str | None, outcome: str, detail: str, study: str | None = None) -> None:
        """One ``console`` audit record naming the user and the address they came from."""
        who = f"user {user}: " if user else ""
        audit.record(
            self.sessions,
            "console",
            audit.Peer(None, client_address(request)),
            outcome,  # type: ignore[arg-type]
            study_instance_uid=study,
            detail=f"{who}{detail}",
        )

    def audit_repeatable(
        self, request: Request, key: Any, what: str, user: str | None, outcome: str, detail: str
    ) -> None:
        """:meth:`audit` of a refusal a client can repeat at will: one record per ``key`` each 10 s, the next one
        counting ``what`` was left out (:data:`dicom_node.audit.REPEATS`)."""
        who = f"user {user}: " if user else ""
        audit.REPEATS.record(
            key,
            what,
            self.sessions,
            "console",
            audit.Peer(None, client_address(request)),
            outcome,  # type: ignore[arg-type]
            detail=f"{who}{detail}",
        )

    def audit_view(self, request: Request, user: User, what: str, study: str | None = None) -> None:
        """A ``console`` audit record of ``user`` reading patient data (a page, an API answer, a preview).

        ``what`` says what was seen (``viewed the series ...``); the same view by the same viewer
        (:func:`viewed_by`), with or without patient details alike, is recorded once per :data:`VIEW_AUDIT_SECONDS`.
        """
        with_details = self.may_see_patient(user)
        key = (viewed_by(request, user), what, study, with_details)
        now = time.monotonic()
        with self._views_lock:
            seen = self._views.get(key)
            if seen is not None and now - seen < VIEW_AUDIT_SECONDS:
                return
            if len(self._views) >= VIEWS_REMEMBERED:
                for old in [k for k, at in self._views.items() if now - at >= VIEW_AUDIT_SECONDS] or list(self._views):
                    del self._views[old]
            self._views[key] = now
        details = "with" if with_details else "without"
        self.audit(request, user.name, "success", f"{what} ({details} patient details)", study)


def viewed_by(request: Request, user: User) -> tuple[str, ...]:
    """Whose views :meth:`ConsoleContext.audit_view` records once a while: a password login's session; a user the
    single sign-on proxy names, from the client's address (a script without a cookie jar gets a new session with
    every request, so its session would make every request a new view)."""
    if user.credential == PROXY_CREDENTIAL:
        return ("proxy user", user.name, client_address(request) or "")
    return ("session", user.session_id)


class NotLoggedIn(Exception):
    """The request carries no valid session (or no trusted proxy header)."""


class Forbidden(Exception):
    """The user is logged in, but their role (or a missing CSRF token) does not allow this."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def peer_address(request: Request) -> str | None:
    """The address the connection comes from: the browser's, or the reverse proxy's in front of the console."""
    return request.client.host if request.client else None


def client_address(request: Request) -> str | None:
    """The client's address, for the login throttle and the audit trail: the connection's, or, with
    ``console.trust_forwarded_for`` and a connection from one of ``console.trusted_proxies``, the address that proxy
    names in ``X-Forwarded-For`` (if it sends one)."""
    peer = peer_address(request)
    settings = console_of(request).settings.console
    if not settings.trust_forwarded_for or not from_trusted_proxy(settings, peer):
        return peer
    return forwarded_client(settings, request.headers.getlist("x-forwarded-for")) or peer


def arrived_over_https(settings: ConsoleSettings, scope: Mapping[str, Any]) -> bool:
    """Whether the browser's request (an ASGI ``scope``) came over HTTPS: to the console itself
    (``console.tls_certificate``), or to a reverse proxy in ``console.trusted_proxies`` that says so in
    ``X-Forwarded-Proto`` (or ``Forwarded: proto=``). Such answers get Secure cookies and HSTS."""
    if scope.get("scheme") == "https":
        return True
    client = scope.get("client")
    if not from_trusted_proxy(settings, client[0] if client else None):
        return False
    headers = Headers(raw=list(scope.get("headers", ())))
    return forwarded_scheme(headers.get("x-forwarded-proto"), headers.get("forwarded")) == "https"


def over_https(request: Request) -> bool:
    """:func:`arrived_over_https` for a request of the console."""
    return arrived_over_https(console_of(request).settings.console, request.scope)


def console_of(request: Request) -> ConsoleContext:
    context: ConsoleContext = request.app.state.console
    return context


def identify(request: Request) -> User | None:
    """The user of a request: from the session cookie, or in proxy mode from a trusted proxy's header."""
    context = console_of(request)
    settings = context.settings.console
    if settings.auth == "proxy_header":
        name = request.headers.get(settings.proxy_user_header, "").strip()
        if not name or not from_trusted_proxy(settings, peer_address(request)):
            return None
        role = request.headers.get(settings.proxy_role_header, "").strip().lower()
        opened: tuple[User, str] | None = getattr(request.state, NEW_PROXY_SESSION, None)
        if opened is not None:  # identified before in this request, in a session opened for it
            return opened[0]
        named, cookie = context.auth.proxy_user(
            name, "operator" if role == "operator" else "viewer", request.cookies.get(SESSION_COOKIE)
        )
        if cookie is not None:
            setattr(request.state, NEW_PROXY_SESSION, (named, cookie))
        return named
    user = context.auth.read(request.cookies.get(SESSION_COOKIE))
    if user is None or user.name not in settings.users:
        return None  # no session, or the user was removed from the configuration since logging in
    configured = settings.users[user.name]
    if not context.auth.opened_with(user, configured.password_hash):
        return None  # the password was changed since logging in: every older session ends
    return User(user.name, configured.role, user.session_id, user.credential, user.expires)  # the role configured now


NEW_PROXY_SESSION = "dicom_node_new_proxy_session"
"""Where :func:`identify` leaves, on the request's state, the session it opened for a user the reverse proxy named
and its cookie value, for :func:`viewer` to hand to the client."""
_CALLED_DIRECTLY = Response()
""":func:`viewer`'s response when it is called as a function, not as a dependency: no cookie can be set."""


def viewer(request: Request, response: Response = _CALLED_DIRECTLY) -> User:
    """Dependency: any logged-in user. Behind the single sign-on proxy, a client without a console session gets
    one (:func:`hand_over_new_session`)."""
    user = identify(request)
    if user is None:
        raise NotLoggedIn()
    if response is not _CALLED_DIRECTLY:
        hand_over_new_session(request, response)
    return user


def hand_over_new_session(request: Request, response: Response) -> None:
    """Give the client the cookie of a session :func:`identify` opened in this request, if it opened one: a page a
    browser navigates to is asked for again with it (a redirect to itself), since the page's forms carry the new
    session's CSRF token; any other answer (the API's, a result file, a preview) is served at once, and the
    console's headers middleware (``app.ConsoleHeaders``) adds the cookie to it, whatever kind of answer it is."""
    opened: tuple[User, str] | None = getattr(request.state, NEW_PROXY_SESSION, None)
    if opened is None:
        return
    if request.method != "GET" or request.url.path.startswith("/api/") or not asks_for_a_page(request):
        return
    location = "/" + quote(request.url.path, safe="/:@!$&'()*+,;=~").lstrip("/")  # a path on this console only
    if request.url.query:
        location += "?" + quote(request.url.query, safe="=&%+:@!$'()*,;/?~")
    cookie = proxy_session_cookie(console_of(request), opened[1], secure=over_https(request))
    raise HTTPException(
        303,
        "a console session was opened for this browser; the page follows",
        headers={"Location": location, "Set-Cookie": cookie},
    )


def asks_for_a_page(request: Request) -> bool:
    """Whether a request asks for an HTML page, as a browser's navigation does: its Accept header names text/html.
    curl, scripts, images and the worklist's own refresh accept anything (``*/*``) or name other types."""
    accepted = request.headers.get("accept", "")
    return any(item.split(";")[0].strip().lower() == "text/html" for item in accepted.split(","))


def proxy_session_cookie(context: ConsoleContext, value: str, *, secure: bool) -> str:
    """The ``Set-Cookie`` value of a session the console opened for a user the reverse proxy named: Secure where
    the browser's request came over HTTPS (:func:`arrived_over_https`)."""
    carrier = Response()
    carrier.set_cookie(
        SESSION_COOKIE,
        value,
        max_age=int(context.auth.lifetime_seconds),
        httponly=True,
        samesite="lax",  # also sent when the sign-on's redirect from another site leads here
        secure=secure,
        path="/",
    )
    return carrier.headers["set-cookie"]


def operator(request: Request, user: Annotated[User, Depends(viewer)]) -> User:
    """Dependency: a logged-in operator."""
    if not user.has_role("operator"):
        refuse(request, user, f"{user.name} is a {user.role}; this needs the operator role")
    return user


def refuse(request: Request, user: User, message: str) -> NoReturn:
    """Refuse ``user``'s request with 403 and ``message``, recorded in the audit trail first: an attempt to change a
    series without the role, or a forged request in a user's session, is as much the trail's as a refused download.
    A client can repeat these at will: one record per user and reason each 10 s, the next one counting those left
    out."""
    what = f"{request.method} {audit.as_sent(request.url.path, 120)}"
    console_of(request).audit_repeatable(
        request,
        ("refused", user.name, message),
        "more such requests by this user were refused",
        user.name,
        "refused",
        f"{what} refused: {message}",
    )
    raise Forbidden(message)


def same_origin(request: Request) -> bool:
    """Whether a POST came from a page of this console: its Origin (else Referer) names this host, when sent.

    Browsers send Origin with every cross-site POST, so a form on another site is refused here even
    before the CSRF token is checked. Clients that send neither (curl, scripts) still need the token.
    This host is the request's Host, or the X-Forwarded-Host a trusted proxy sets.
    """
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source:
        return True
    if source == "null":
        return False
    hosts = {request.headers.get("host", "").lower()}
    forwarded = request.headers.get("x-forwarded-host")
    if forwarded and from_trusted_proxy(console_of(request).settings.console, peer_address(request)):
        hosts.add(forwarded.split(",")[0].strip().lower())
    return urlsplit(source).netloc.lower() in hosts


def check_origin(request: Request) -> None:
    if not same_origin(request):
        raise Forbidden("this request came from another site (its Origin or Referer is not this console)")


async def _check_csrf(request: Request, user: User) -> None:
    if not same_origin(request):
        refuse(request, user, "this request came from another site (its Origin or Referer is not this console)")
    token = request.headers.get(CSRF_HEADER)
    if token is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        token = str((await request.form()).get(CSRF_FIELD) or "") or None
    if getattr(request.state, NEW_PROXY_SESSION, None) is not None:
        refuse(
            request,
            user,
            "this request carries no console session (its cookie), so no CSRF token can be valid: keep the cookie "
            f"the console sets with its first answer (GET /api/me gives it, and the {CSRF_HEADER} token to send)",
        )
    if not console_of(request).auth.csrf_valid(user, token):
        refuse(
            request,
            user,
            f"missing or wrong CSRF token: send the page's {CSRF_FIELD} field or the {CSRF_HEADER} header",
        )


async def posting_viewer(request: Request, user: Annotated[User, Depends(viewer)]) -> User:
    """Dependency for a POST any user may make: logged in, with the session's CSRF token."""
    await _check_csrf(request, user)
    return user


async def posting_operator(request: Request, user: Annotated[User, Depends(operator)]) -> User:
    """Dependency for an operator's action: logged in, operator, with the session's CSRF token."""
    await _check_csrf(request, user)
    return user
