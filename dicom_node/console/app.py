"""The console's ASGI application (FastAPI, Jinja2 templates) and the Uvicorn server ``serve`` runs it in."""

from __future__ import annotations

import errno
import ipaddress
import logging
import math
import socket
import ssl
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markupsafe import Markup
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker
from starlette.datastructures import MutableHeaders
from starlette.middleware.trustedhost import TrustedHostMiddleware

from db.session import DatabaseBusy, is_database_locked
from dicom_node import audit
from dicom_node.config import Settings
from dicom_node.console.access import (
    NEW_PROXY_SESSION,
    ConsoleContext,
    Forbidden,
    NotLoggedIn,
    arrived_over_https,
    console_of,
    identify,
    over_https,
    proxy_session_cookie,
    viewer,
)
from dicom_node.console.auth import (
    SESSION_COOKIE,
    LoginThrottle,
    Sessions,
    session_secret,
)
from dicom_node.console.connections import ConnectionLimits, bounded_protocol, server_tls
from dicom_node.console.metrics import DatabaseCollector, Liveness, assess
from dicom_node.console.probe import DestinationProbe
from dicom_node.logs import log_event, without_reordering

LOG = logging.getLogger(__name__)
HERE = Path(__file__).parent
MAX_BODY_BYTES = 64 * 1024
"""The largest request body the console reads: its forms and JSON bodies are a few hundred bytes."""


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/") or request.url.path == "/metrics"


def _not_logged_in(request: Request, _exc: Exception) -> Response:
    if _wants_json(request):
        return JSONResponse({"detail": "log in first"}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
    if request.method != "GET":
        return Response("log in first", status_code=401, media_type="text/plain")
    return RedirectResponse("/login?" + urlencode({"next": request.url.path}), status_code=303)


def _forbidden(request: Request, exc: Exception) -> Response:
    message = exc.message if isinstance(exc, Forbidden) else "forbidden"
    if _wants_json(request):
        return JSONResponse({"detail": message}, status_code=403)
    context = console_of(request)
    return context.templates.TemplateResponse(
        request,
        "error.html",
        {"user": identify(request), "csrf": "", "message": message, "title": "Not allowed"},
        status_code=403,
    )


def _internal_error(request: Request, exc: Exception) -> Response:
    """Any error no handler expected: a plain 500 with the usual security headers, and a log sentence naming the
    request (the traceback follows it in the log, for whoever fixes the bug)."""
    reason = f"the console could not answer {request.method} {request.url.path[:200]} because of an internal error"
    LOG.error("console.request_failed", exc_info=exc, extra={"event_fields": {"reason": reason}})
    response = Response("internal error: see the node's log", status_code=500, media_type="text/plain")
    _security_headers(response.headers, over_https(request), request.url.path)  # sent outside ConsoleHeaders
    return response


LOCK_WAITED = frozenset({"55P03", "40P01"})
"""PostgreSQL's "could not obtain lock" (a ``lock_timeout`` the administrator set) and "deadlock detected": as
SQLite's "database is locked", the request can be made again once the other writer is done."""


def _database_busy(error: BaseException) -> bool:
    """Whether ``error`` is another writer holding the database longer than a request waits, not a fault."""
    if isinstance(error, DatabaseBusy) or is_database_locked(error):
        return True
    return isinstance(error, OperationalError) and getattr(error.orig, "sqlstate", None) in LOCK_WAITED


def _database_error(request: Request, exc: Exception) -> Response:
    """A database another writer holds locked past the busy timeout: 503 with Retry-After, saying so in a sentence
    (a page, or the API's JSON), and one log line; any other database error is an internal error."""
    if not _database_busy(exc):
        return _internal_error(request, exc)
    context = console_of(request)
    waited = context.settings.database.busy_timeout_seconds
    how_long = (
        f" for longer than the console waits (database.busy_timeout_seconds, {waited:g} s)"
        if is_database_locked(exc)  # SQLite's busy timeout; PostgreSQL has its own lock_timeout
        else ""
    )
    changed = "" if request.method in ("GET", "HEAD") else " Nothing was changed."
    message = f"The node's database is busy: another process held it locked{how_long}.{changed} Please try again."
    log_event(
        LOG,
        logging.WARNING,
        "console.database_busy",
        reason=f"the console could not answer {request.method} {request.url.path[:200]}: another process held "
        f"the database locked{how_long}; the user was asked to try again",
    )
    headers = {"Retry-After": str(max(1, math.ceil(waited)))}
    if _wants_json(request):
        return JSONResponse({"detail": message}, status_code=503, headers=headers)
    user = identify(request)
    return context.templates.TemplateResponse(
        request,
        "error.html",
        {
            "user": user,
            "csrf": context.auth.csrf_token(user) if user else "",
            "ae_title": context.settings.network.ae_title,
            "message": message,
            "title": "Database busy",
        },
        status_code=503,
        headers=headers,
    )


def _security_headers(headers: MutableHeaders, https: bool, path: str) -> None:
    """The headers every answer of the console carries; HSTS where the browser's request came over HTTPS."""
    headers["X-Frame-Options"] = "DENY"
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Referrer-Policy"] = "same-origin"
    headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'; "
        "form-action 'self'; base-uri 'none'; object-src 'none'"
    )
    if not path.startswith("/static/"):
        headers["Cache-Control"] = "no-store"  # pages and answers may name patients: not kept by browsers
    if https:
        headers["Strict-Transport-Security"] = "max-age=31536000"


class ConsoleHeaders:
    """ASGI middleware, outside every other one: each answer carries the security headers, whoever made it (a
    page, the host check's 400, the body limit's 413, a 404 or 405, a static file), with HSTS where the browser's
    request came over HTTPS (:func:`arrived_over_https`); and an answer to a request that opened a session for a
    user the reverse proxy named carries that session's cookie (a result file's too), unless it sets it itself.

    Only Starlette's last-resort 500 is sent outside it: :func:`_internal_error` adds the headers itself."""

    def __init__(self, app: Any, context: ConsoleContext) -> None:
        self.app = app
        self.context = context

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        https = arrived_over_https(self.context.settings.console, scope)

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                _security_headers(headers, https, scope.get("path", ""))
                self._hand_over_proxy_session(scope, headers, https)
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _hand_over_proxy_session(self, scope: Any, headers: MutableHeaders, https: bool) -> None:
        opened = (scope.get("state") or {}).get(NEW_PROXY_SESSION)
        if opened is None:
            return
        if any(value.startswith(f"{SESSION_COOKIE}=") for value in headers.getlist("set-cookie")):
            return  # the answer sets (or ends) the session itself
        headers.append("set-cookie", proxy_session_cookie(self.context, opened[1], secure=https))


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes (413), whether declared or streamed.

    The body is read here first (it is small by then) and handed on whole, so an oversized chunked
    body is refused before any handler or form parser sees it.
    """

    def __init__(self, app: Any, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._too_large(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            if len(body) > self.limit:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        delivered = False

        async def replay() -> Any:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Any, receive: Any, send: Any) -> None:
        message = f"the request body is larger than the console accepts ({self.limit // 1024} KiB)"
        await JSONResponse({"detail": message}, status_code=413)(scope, receive, send)


HEALTH_PATHS = frozenset({"/healthz", "/readyz"})
"""Answered whatever the Host header names: an orchestrator's probe calls by address (the health check by
127.0.0.1). They show nothing about patients: ready or not, and /readyz why in words (naming the storage folder and
the database's host, as they show to any caller, logged in or not)."""


class HostCheck:
    """ASGI middleware: ``console.allowed_hosts`` checked (Starlette's TrustedHostMiddleware, a 400 for any other
    Host header, against DNS rebinding) on every path but :data:`HEALTH_PATHS`."""

    def __init__(self, app: Any, allowed_hosts: list[str]) -> None:
        self.app = app
        self.checked = TrustedHostMiddleware(app, allowed_hosts=allowed_hosts)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") in HEALTH_PATHS and scope.get("method") in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        await self.checked(scope, receive, send)


def _template_environment() -> jinja2.Environment:
    """The pages' templates: HTML escaped, and every text shown with its reordering characters as ``?``
    (:func:`~dicom_node.logs.without_reordering`), so that a patient's ID or name reads on screen as it is stored,
    even one that admission refused for them."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=jinja2.select_autoescape(),
        finalize=_as_stored,
    )


def _as_stored(value: Any) -> Any:
    """A value a page shows, its reordering characters as ``?`` (markup the page built stays markup)."""
    if isinstance(value, Markup):
        return Markup(without_reordering(value))
    return without_reordering(value) if isinstance(value, str) else value


def build_context(settings: Settings, sessions: sessionmaker[Session], liveness: Liveness) -> ConsoleContext:
    console = settings.console
    liveness = liveness.for_node(settings, sessions)  # the DICOM port C-ECHOed, the storage folder tried
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(settings, sessions, liveness))
    templates = Jinja2Templates(env=_template_environment())
    return ConsoleContext(
        settings=settings,
        sessions=sessions,
        auth=Sessions(
            session_secret(console, settings.storage.directory),
            console.session_hours * 3600,
            settings.storage.directory / "console-ended-sessions.json",
        ),
        throttle=LoginThrottle(console.login_attempts_per_minute),
        liveness=liveness,
        registry=registry,
        templates=templates,
    )


def metrics_response(context: ConsoleContext) -> Response:
    return Response(generate_latest(context.registry), media_type=CONTENT_TYPE_LATEST)


def _health_routes(app: FastAPI) -> None:
    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        """Alive: the console answers."""
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    def readyz(request: Request) -> Response:
        """Ready: database reachable, the DICOM port answering a C-ECHO, a receiving process and a worker alive
        (where this process runs them), storage writable; 503 with the reasons in words otherwise."""
        context = console_of(request)
        found = assess(context.sessions, context.liveness)
        body = {"ready": found.ready, "checks": found.checks, "reasons": found.reasons}
        return JSONResponse(body, status_code=200 if found.ready else 503)


def create_app(context: ConsoleContext) -> FastAPI:
    """The console: pages, /api, /metrics, /healthz and /readyz."""
    from dicom_node.console import api, pages

    # No redirect from /path/ to /path: Starlette's would name the Host header the client sent, over http.
    app = FastAPI(
        title="dicom-node console API",
        version="1",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        redirect_slashes=False,
    )
    app.state.console = context
    app.add_exception_handler(NotLoggedIn, _not_logged_in)
    app.add_exception_handler(Forbidden, _forbidden)
    app.add_exception_handler(OperationalError, _database_error)
    app.add_exception_handler(DatabaseBusy, _database_error)
    app.add_exception_handler(Exception, _internal_error)
    # Each middleware added wraps those before it. A client that goes away mid-body gets no answer, without a
    # handler ever running; a request naming another host is answered 400, unread (but /healthz and /readyz, see
    # HostCheck); every answer gets the headers.
    app.add_middleware(BodyLimit)
    if context.settings.console.allowed_hosts:
        app.add_middleware(HostCheck, allowed_hosts=context.settings.console.allowed_hosts)
    app.add_middleware(ConsoleHeaders, context=context)
    _health_routes(app)

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        """Prometheus text format; a bearer token (console.metrics_token) or a logged-in user."""
        token = context.settings.console.metrics_token
        given = request.headers.get("authorization", "")
        if token:
            import hmac

            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                raise NotLoggedIn()
        else:
            viewer(request)
        return metrics_response(context)

    app.include_router(api.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    return app


def create_metrics_app(context: ConsoleContext) -> FastAPI:
    """The separate listener (console.metrics_port): /metrics, /healthz and /readyz without login."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.state.console = context
    _health_routes(app)

    @app.get("/metrics")
    def metrics() -> Response:
        return metrics_response(context)

    return app


def _loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ListenerNotBound(Exception):
    """The console or metrics listener cannot listen where configured; the message says why, naming the setting.
    ``lasting``: only a change to the configuration or the service's rights ends it (a port below 1024)."""

    def __init__(self, sentence: str, *, lasting: bool) -> None:
        super().__init__(sentence)
        self.lasting = lasting


def _bind(host: str, port: int, what: str, keys: tuple[str, str]) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        lasting = exc.errno in (errno.EACCES, errno.EPERM) and port < 1024
        sentence = f"the {what} cannot listen on {host}:{port}: {_why_not_bound(exc, host, port, keys)}"
        raise ListenerNotBound(sentence, lasting=lasting) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _why_not_bound(exc: OSError, host: str, port: int, keys: tuple[str, str]) -> str:
    """Why binding ``host``:``port`` failed, naming the settings (``keys``: the host's and the port's) that give it."""
    host_key, port_key = keys
    if isinstance(exc, socket.gaierror):
        return f"{host_key} {host!r} cannot be resolved to an address (misspelt, or no name service on this machine?)"
    if exc.errno == errno.EADDRINUSE:
        return f"{port_key} {port} is already in use by another program"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{host_key} {host!r} is not an address of this machine"
    if exc.errno in (errno.EACCES, errno.EPERM) and port < 1024:
        return f"the node's user may not listen on {port_key} {port} (ports below 1024 need administrator rights)"
    reason = exc.strerror or "the operating system refused"
    return f"{reason[:1].lower() + reason[1:]} ({host_key}, {port_key})"


class ConsoleServer:
    """Uvicorn serving the console (and the metrics listener) in threads of ``serve``; sockets bound up front."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], liveness: Liveness) -> None:
        console = settings.console
        self.context = build_context(settings, sessions, liveness)
        self._servers: list[tuple[uvicorn.Server, socket.socket]] = []
        tls = server_tls(str(console.tls_certificate), str(console.tls_private_key)) if console.https else None
        listeners: list[tuple[FastAPI, str, int, ssl.SSLContext | None, str]] = [
            (create_app(self.context), console.host, console.port, tls, "console")
        ]
        if console.metrics_port is not None:
            listeners.append(
                (create_metrics_app(self.context), console.metrics_host, console.metrics_port, None, "metrics listener")
            )
        for app, host, port, listener_tls, what in listeners:
            keys = (
                ("console.host", "console.port")
                if what == "console"
                else ("console.metrics_host", "console.metrics_port")
            )
            try:
                sock = _bind(host, port, what, keys)
            except ListenerNotBound:
                for _, bound in self._servers:
                    bound.close()
                raise
            # proxy_headers off: X-Forwarded-For must not replace the peer's address (login throttle, proxy mode).
            config = uvicorn.Config(
                app,
                log_config=None,
                access_log=False,
                lifespan="off",
                proxy_headers=False,
                server_header=False,
                http=bounded_protocol(
                    ConnectionLimits(
                        console.max_connections, console.max_connections_per_address, console.request_seconds, what
                    ),
                    listener_tls,  # the protocol shakes hands itself: uvicorn's TLS counted a connection only after it
                ),
            )
            self._servers.append((uvicorn.Server(config), sock))
        self._threads: list[threading.Thread] = []
        self._probe = (
            DestinationProbe(settings, sessions) if console.echo_interval_seconds and settings.destinations else None
        )

    def start(self) -> None:
        for server, sock in self._servers:
            thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="console", daemon=True)
            thread.start()
            self._threads.append(thread)
        if self._probe is not None:
            self._probe.start()
        console = self.context.settings.console
        scheme = "https" if console.https else "http"
        log_event(
            LOG,
            logging.INFO,
            "console.ready",
            url=f"{scheme}://{console.host}:{console.port}/",
            auth=console.auth,
            users=len(console.users),
        )
        if not console.https and not _loopback(console.host):
            log_event(
                LOG,
                logging.WARNING,
                "console.plain_http",
                hint=f"the console listens on {console.host}:{console.port} without HTTPS: passwords, session "
                "cookies and patient details cross the network readable by anyone on it; set console.tls_certificate "
                "and console.tls_private_key, or listen on 127.0.0.1 behind the hospital's HTTPS reverse proxy",
            )
        if console.auth == "proxy_header" and not console.allowed_hosts:
            log_event(
                LOG,
                logging.WARNING,
                "console.hosts_unchecked",
                hint="with auth: proxy_header, set console.allowed_hosts to the name the proxy serves: otherwise a "
                "web page of another site, opened in a browser on this machine, can send the proxy's headers itself",
            )
        if console.auth == "local" and not console.users:
            log_event(
                LOG,
                logging.WARNING,
                "console.no_users",
                hint="nobody can log in: add a user with `dicom-node user add NAME --role operator`",
            )

    def stop(self) -> None:
        if self._probe is not None:
            self._probe.stop()
        for server, _sock in self._servers:
            server.should_exit = True
        for thread in self._threads:
            thread.join(timeout=10)
        for _server, sock in self._servers:
            sock.close()
        # Refused logins and downloads counted in the last 10 s, and (where the SCP runs in this process) refused
        # queries and C-ECHOs, are written now, not lost with the process.
        audit.flush_repeated(self.context.sessions)


def start_console(settings: Settings, sessions: sessionmaker[Session], liveness: Liveness) -> ConsoleServer | None:
    """Start the console when ``console.enabled``; None otherwise."""
    if not settings.console.enabled:
        return None
    server = ConsoleServer(settings, sessions, liveness)
    server.start()
    return server
