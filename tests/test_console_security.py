"""The console attacked: every route behind login, roles, sessions, CSRF and Origin, hostile DICOM text,
search and paging bounds, downloads confined to the job's files, no patient data for viewers or in
metrics, body size, the login throttle, and operator actions sent twice at once.

Most tests run the real console (Uvicorn, a migrated database) in this process, with series
recorded through ``db`` as the receiver records them; one sends hostile headers to a real node.
"""

from __future__ import annotations

import html.parser
import logging
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from fastapi.routing import APIRoute
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.routing import Mount, Route

from db import jobs
from db.ingest import InstanceRecord, SeriesAttributes, StudyAttributes, record_instance, record_rejection
from db.models import AuditEvent, Instance, Job, JobEvent, JobState, Series, Study, utcnow
from db.results import ResultFile, ResultKind
from db.session import transaction
from dicom_node.config import Settings
from dicom_node.console.app import MAX_BODY_BYTES, ConsoleServer, create_app
from dicom_node.console.auth import SESSION_COOKIE, Sessions
from dicom_node.console.metrics import MAX_REFUSAL_KINDS, Liveness
from dicom_node.phantom import PhantomSpec, write_phantom_series
from dicom_node.service import open_database
from tests.conftest import free_port, storescu, wait_for
from tests.console_helpers import (
    METRICS_TOKEN,
    PASSWORDS,
    SMALL_PHANTOM,
    console_node,
    console_settings,
    log_in,
)

pytestmark = pytest.mark.integration

SCRIPT = "<script>alert('x')</script>"
IMG = '"><img src=x onerror=alert(1)>'
TEMPLATE = "{{7*7}}"
PATIENT_NAME = f"Doe^Jane{SCRIPT}"
PATIENT_ID = f"PID-4711{IMG}"
BIRTH_DATE = "19610203"
ACCESSION = "ACC'%_99"
SECRET = "a-session-secret-for-tests-only-0123456789"

HOSTILE = "1.2.826.0.1.3680043.99.1"
DONE_AGAIN = "1.2.826.0.1.3680043.99.2"
QUEUED = "1.2.826.0.1.3680043.99.3"
IN_FLIGHT = "1.2.826.0.1.3680043.99.4"
WAITING = "1.2.826.0.1.3680043.99.5"


@dataclass
class Console:
    url: str
    settings: Settings
    sessions: sessionmaker[Session]
    server: ConsoleServer
    outside: Path  # a file outside every job folder

    def client(self, user: str | None = None, **headers: str) -> httpx.Client:
        client = httpx.Client(base_url=self.url, timeout=30, follow_redirects=False, headers=headers)
        if user is not None:
            assert log_in(client, user, PASSWORDS[user]).status_code == 303
        return client

    @staticmethod
    def csrf(client: httpx.Client) -> str:
        return str(client.get("/api/me").json()["csrf_token"])


def _start(tmp_path: Path, **console: Any) -> Console:
    port = free_port()
    settings = Settings(
        storage={"directory": str(tmp_path / "storage")},
        network={"port": free_port()},
        rules=[
            {
                "name": "ct",
                "match": {"modality": "CT"},
                "action": "process",
                "model": "baseline",
                "destinations": ["pacs"],
            }
        ],
        destinations={"pacs": {"ae_title": "PACSSCP", "host": "127.0.0.1", "port": free_port()}},
        console={**console_settings(port), "session_secret": SECRET, **console},
    )
    sessions = open_database(settings)
    server = ConsoleServer(settings, sessions, Liveness(lambda: None, lambda: False))
    server.start()
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, timeout=20, what="the console to answer")
    outside = tmp_path / "config.yaml"
    outside.write_text("console:\n  session_secret: do-not-serve-me\n")
    return Console(url, settings, sessions, server, outside)


def _series(session: Session, uid: str, *, patient: bool = False, study: StudyAttributes | None = None) -> Job:
    study = study or (
        StudyAttributes(
            uid + ".0",
            patient_id=PATIENT_ID,
            patient_name=PATIENT_NAME,
            patient_birth_date=BIRTH_DATE,
            accession_number=ACCESSION,
            study_description=f"Thorax {TEMPLATE} {SCRIPT}",
        )
        if patient
        else StudyAttributes(uid + ".0")
    )
    series = SeriesAttributes(uid, modality="CT", series_description=f"{IMG} {TEMPLATE}")
    record = InstanceRecord(
        sop_instance_uid=uid + ".1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"/data/{uid}.dcm",
        size_bytes=1,
        study=study,
        series=series,
    )
    record_instance(session, record)
    job = jobs.job_for_series_uid(session, uid)
    assert job is not None
    jobs.mark_complete(session, job, "quiet")
    jobs.queue(session, job, rule_name="ct", model_name="baseline", destinations=["pacs"])
    return job


def _results(folder: Path, outside: Path) -> list[ResultFile]:
    """A job folder: a real result, a symbolic link to a file outside it, and measurements with hostile names."""
    folder.mkdir(parents=True)
    (folder / "seg-binary.dcm").write_bytes(b"DICM result")
    (folder / "evil.dcm").symlink_to(outside)
    (folder / "preview.png").symlink_to(outside)
    (folder / "measurements.json").write_text(
        '{"structures": {"' + SCRIPT.replace("'", "") + '": {"volume_ml": 1.0, "mean_hu": 40.0, "sd_hu": 1.0}}}'
    )
    return [
        ResultFile(ResultKind.SEG, str(folder / "seg-binary.dcm"), "BINARY"),
        ResultFile(ResultKind.SEG, str(folder / "evil.dcm"), "BINARY"),
        ResultFile(ResultKind.SEG, str(outside), "BINARY"),
    ]


def _populate(console: Console, tmp_path: Path) -> None:
    with transaction(console.sessions) as session:
        for uid in (HOSTILE, DONE_AGAIN):
            job = _series(session, uid, patient=uid == HOSTILE)
            jobs.change_state(session, job, JobState.PROCESSING)
            job.result_path = str(tmp_path / "jobs" / uid)
            job.result_files = _results(tmp_path / "jobs" / uid, console.outside)
            job.warnings = [f"warning {IMG} {TEMPLATE}"]
            jobs.change_state(session, job, JobState.DONE, f"segmented {SCRIPT}")
        _series(session, QUEUED)
        for uid in (IN_FLIGHT, WAITING):
            job = _series(session, uid)
            jobs.change_state(session, job, JobState.PROCESSING)
            job.result_files = []
            jobs.change_state(session, job, JobState.SENDING)
        waiting = jobs.job_for_series_uid(session, WAITING)
        assert waiting is not None
        later = (utcnow() + timedelta(minutes=5)).isoformat()
        waiting.deliveries = {"pacs": {"attempts": 1, "last_error": "refused", "next_attempt_at": later}}
        rejections = [f"Odd attribute{'x' * index} in the header: value {index}" for index in range(60)]
        rejections += [f"AccessionNumber is 20 characters long ('{ACCESSION}...'); at most 16 are accepted"] * 2
        rejections += [f"StudyDescription Doe^Jane {IMG} is not text"] * 2  # a value not quoted, as careless reasons do
        for index, reason in enumerate(rejections):
            record_rejection(
                session,
                status=0xC000 if index >= 60 else 0xA900,
                reason=reason,
                path=None,
                sop_instance_uid=f"1.2.3.{index}",
                sop_class_uid=None,
                transfer_syntax_uid=None,
                calling_ae_title=SCRIPT[:16] if index >= 60 else f"AE{index}",
            )


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    tmp_path = tmp_path_factory.mktemp("console-security")
    running = _start(tmp_path)
    _populate(running, tmp_path)
    yield running
    running.server.stop()


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", lambda m: "pacs" if m.group(0) == "{name}" else HOSTILE, path)


PUBLIC = {"/healthz", "/readyz"}


def _routes(routes: list[Any], prefix: str = "") -> Iterator[tuple[str, set[str]]]:
    """(path, methods) of every route the app answers, through included routers (FastAPI keeps them nested)."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _routes(included.routes, prefix + route.include_context.prefix)
        elif isinstance(route, Mount):
            continue  # /static: the stylesheet and the worklist's script, no data
        else:
            assert isinstance(route, (APIRoute, Route)), route
            yield prefix + route.path, set(route.methods or ())


def test_every_route_refuses_a_stranger_except_health_checks(console):
    """Enumerates the app's routes, so a route added later without a login check fails here."""
    stranger = console.client()
    checked = 0
    for template, methods in _routes(create_app(console.server.context).routes):
        for method in sorted(methods):
            path = _concrete(template)
            response = stranger.request(method, path)
            checked += 1
            if template in PUBLIC:
                continue
            if template == "/login":
                assert response.status_code in (200, 403), (method, path)  # the form; a POST without its token
                continue
            assert response.status_code in (401, 303), (method, path, response.status_code)
            if response.status_code == 303:
                assert response.headers["location"].startswith("/login?next="), (method, path)
            assert "Doe" not in response.text
    assert checked >= 32


def test_viewer_reaches_no_operator_action_by_any_method(console):
    viewer = console.client("vera")
    token = console.csrf(viewer)
    operator_posts = [
        path
        for path, methods in _routes(create_app(console.server.context).routes)
        if "POST" in methods and path not in ("/login", "/logout")
    ]
    assert len(operator_posts) == 8
    for path in operator_posts:
        path = _concrete(path)
        refused = viewer.post(path, headers={"X-CSRF-Token": token}, json={"model": "baseline"})
        assert refused.status_code == 403, path
        for method in ("GET", "HEAD", "PUT", "DELETE"):
            assert viewer.request(method, path).status_code == 405, (method, path)
    with console.sessions() as session:
        job = jobs.job_for_series_uid(session, QUEUED)
        assert job is not None and job.state is JobState.QUEUED


def test_api_post_with_the_session_cookie_needs_the_csrf_header(console):
    operator = console.client("olga")
    refused = operator.post(f"/api/jobs/{QUEUED}/cancel", json={})
    assert refused.status_code == 403 and "CSRF" in refused.json()["detail"]
    form = operator.post(f"/api/jobs/{QUEUED}/cancel", data={"csrf_token": "forged"})
    assert form.status_code == 403
    assert (
        "access-control-allow-origin"
        not in operator.options("/api/jobs", headers={"Origin": "https://x.example"}).headers
    )


def test_a_post_from_another_site_is_refused_even_with_the_token(console):
    operator = console.client("olga")
    token = console.csrf(operator)
    for header in ({"Origin": "https://evil.example"}, {"Origin": "null"}, {"Referer": "https://evil.example/page"}):
        response = operator.post(f"/series/{QUEUED}/retry", data={"csrf_token": token}, headers=header)
        assert response.status_code == 403 and "came from another site" in response.text, header
    with console.sessions() as session:
        refused = session.scalars(
            select(AuditEvent.detail).where(AuditEvent.action == "console", AuditEvent.outcome == "refused")
        ).all()
    assert (
        f"user olga: POST /series/{QUEUED}/retry refused: this request came from another site (its Origin or Referer "
        "is not this console)"
    ) in refused
    form = console.client()
    page = form.get("/login")
    login_token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert login_token is not None
    data = {"username": "olga", "password": PASSWORDS["olga"], "csrf_token": login_token.group(1)}
    assert form.post("/login", data=data, headers={"Origin": "https://evil.example"}).status_code == 403
    same = form.post("/login", data=data, headers={"Origin": console.url})
    assert same.status_code == 303


def test_logout_holds_after_serve_restarts(tmp_path):
    first = _start(tmp_path)
    try:
        client = first.client("olga")
        cookie = client.cookies[SESSION_COOKIE]
        assert client.post("/logout", data={"csrf_token": first.csrf(client)}).status_code == 303
    finally:
        first.server.stop()
    again = _start(tmp_path)
    try:
        assert httpx.get(f"{again.url}/api/me", cookies={SESSION_COOKIE: cookie}).status_code == 401
        assert again.client("olga").get("/api/me").status_code == 200
    finally:
        again.server.stop()


def test_an_unknown_user_costs_one_password_check_like_a_wrong_password(monkeypatch):
    from dicom_node.console import auth

    checks: list[str] = []
    real_check = auth.check_password

    def counted(password_hash: str, password: str) -> bool:
        checks.append(password_hash)
        return real_check(password_hash, password)

    monkeypatch.setattr(auth, "check_password", counted)
    settings = Settings(console=console_settings(free_port()))
    assert auth.local_login(settings.console, "nobody", "guess") is None
    assert auth.local_login(settings.console, "olga", "guess") is None
    assert (
        len(checks) == 2 and checks[0] == auth._DUMMY_HASH and checks[1] == settings.console.users["olga"].password_hash
    )


def test_origin_behind_a_trusted_proxy_is_its_forwarded_host(console):
    operator = console.client("olga")
    token = console.csrf(operator)
    proxied = {"Origin": "https://console.hospital.example", "X-Forwarded-Host": "console.hospital.example"}
    response = operator.post(f"/series/{HOSTILE}/reroute", data={"csrf_token": token, "rule": "nope"}, headers=proxied)
    assert response.status_code == 303, "127.0.0.1 is a trusted proxy here: its X-Forwarded-Host names the site"


def test_each_login_gets_a_new_session_and_logout_ends_it_on_the_server(console):
    first, second = console.client("vera"), console.client("vera")
    cookie = first.cookies[SESSION_COOKIE]
    assert cookie != second.cookies[SESSION_COOKIE] and console.csrf(first) != console.csrf(second)
    assert first.post("/logout", data={"csrf_token": console.csrf(first)}).status_code == 303
    replayed = httpx.get(f"{console.url}/api/me", cookies={SESSION_COOKIE: cookie})
    assert replayed.status_code == 401, "a copied cookie must not outlive the logout"
    assert second.get("/api/me").status_code == 200, "other sessions of the user go on"


def test_an_expired_or_tampered_session_is_refused_by_the_server(console):
    expired = Sessions(SECRET.encode(), lifetime_seconds=-1).issue("olga", "operator")[1]
    assert httpx.get(f"{console.url}/api/me", cookies={SESSION_COOKIE: expired}).status_code == 401
    vera = console.settings.console.users["vera"].password_hash
    good = Sessions(SECRET.encode(), lifetime_seconds=600).issue("vera", "viewer", vera)[1]
    assert httpx.get(f"{console.url}/api/me", cookies={SESSION_COOKIE: good}).status_code == 200
    payload, signature = good.rsplit(".", 1)
    flipped = f"{payload}.{signature[:-1]}{'0' if signature[-1] != '0' else '1'}"
    assert httpx.get(f"{console.url}/api/me", cookies={SESSION_COOKIE: flipped}).status_code == 401
    forged = Sessions(b"another key", lifetime_seconds=600).issue("vera", "operator", vera)[1]
    without_password = Sessions(SECRET.encode(), lifetime_seconds=600).issue("vera", "viewer")[1]
    assert httpx.get(f"{console.url}/api/me", cookies={SESSION_COOKIE: without_password}).status_code == 401
    assert httpx.get(f"{console.url}/api/me", cookies={SESSION_COOKIE: forged}).status_code == 401


def test_login_redirects_only_to_paths_on_this_console(console):
    client = console.client()
    for target in ("/\t/evil.example", "/\\evil.example", "//evil.example", "https://evil.example", "/ /evil"):
        response = log_in(client, "vera", PASSWORDS["vera"], next_path=target)
        assert response.headers["location"] == "/", target
        client.cookies.clear()
    assert log_in(client, "vera", PASSWORDS["vera"], next_path="/audit").headers["location"] == "/audit"


class _Markup(html.parser.HTMLParser):
    """Tags, scripts and event-handler attributes of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[str | None] = []
        self.handlers: list[str] = []
        self.images: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "script":
            self.scripts.append(values.get("src"))
        if tag == "img":
            self.images.append(values.get("src"))
        self.handlers += [name for name, _value in attrs if name.startswith("on")]


def _markup(text: str) -> _Markup:
    parser = _Markup()
    parser.feed(text)
    return parser


def test_hostile_text_from_senders_is_shown_as_text_never_as_markup(console):
    operator = console.client("olga")
    pages = ["/", "/worklist/rows", f"/series/{HOSTILE}", "/rejected", "/audit", f"/series/{HOSTILE}?error={SCRIPT}"]
    for page in pages:
        response = operator.get(page)
        assert response.status_code == 200, page
        markup = _markup(response.text)
        assert set(markup.scripts) <= {"/static/console.js"}, page
        assert markup.handlers == [] and all(src and src.startswith("/series/") for src in markup.images), page
        assert (
            response.headers["cache-control"] == "no-store"
            and "form-action 'self'" in response.headers["content-security-policy"]
        )
        if page != "/audit":  # the audit trail holds no sender text here; it is checked for markup all the same
            assert "&lt;script&gt;" in response.text or "&#34;&gt;&lt;img" in response.text, page
        policy = response.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    spoofed = operator.get(f"/series/{HOSTILE}", params={"error": "Call 555-0100 to unlock", "sig": "0" * 64})
    assert "555-0100" not in spoofed.text, "a link cannot put its own text on the console's page"
    series = operator.get(f"/series/{HOSTILE}").text
    assert TEMPLATE in series and "Doe^Jane&lt;script&gt;" in series  # template syntax in data is not evaluated
    assert operator.get(f"/api/jobs/{HOSTILE}").headers["content-type"] == "application/json"


def test_search_and_filters_are_bound_parameters_and_bounded(console):
    operator = console.client("olga")
    for text in ("'", "%", "_", "' OR '1'='1", '"pacs"', "1.2.826.0.1.3680043.99.%"):
        assert operator.get("/api/jobs", params={"search": text}).json()["total"] == 0, text
        assert operator.get("/", params={"search": text}).status_code == 200
    assert operator.get("/api/jobs", params={"search": ACCESSION}).json()["total"] == 1
    assert operator.get("/api/jobs", params={"destination": "%"}).json()["total"] == 0
    assert operator.get("/api/jobs", params={"destination": "pacs"}).json()["total"] == 5
    assert operator.get("/api/jobs", params={"search": "1" * 129}).status_code == 422
    assert operator.get("/api/jobs", params={"per_page": 501}).status_code == 422
    assert operator.get("/api/jobs", params={"page": 10**20}).status_code == 422
    far = operator.get("/", params={"page": str(10**20), "search": "x" * 5000})
    assert far.status_code == 200 and "No series match" in far.text


def test_downloads_and_preview_serve_only_the_jobs_own_files(console):
    operator = console.client("olga")
    assert operator.get(f"/series/{HOSTILE}/files/seg-binary.dcm").content == b"DICM result"
    for name in ("evil.dcm", "config.yaml", "..%2F..%2Fconfig.yaml", "%2e%2e%2fconfig.yaml", "%2e%2e"):
        response = operator.get(f"/series/{HOSTILE}/files/{name}")
        assert response.status_code == 404 and b"do-not-serve-me" not in response.content, name
    assert operator.get(f"/series/{HOSTILE}/files/../../config.yaml").status_code == 404
    assert operator.get(f"/series/{HOSTILE}/preview.png").status_code == 404  # a symbolic link
    names = [f["name"] for f in operator.get(f"/api/jobs/{HOSTILE}").json()["files"]]
    assert names == ["seg-binary.dcm", "measurements.json"]


def test_viewer_receives_no_patient_details_anywhere(console):
    viewer = console.client("vera")
    gets = [
        "/",
        "/worklist/rows",
        f"/series/{HOSTILE}",
        "/rejected",
        "/destinations",
        "/config",
        "/audit",
        "/api/jobs",
        f"/api/jobs/{HOSTILE}",
        "/api/rejected",
        "/api/audit",
        "/api/config",
        "/api/metrics/summary",
        "/metrics",
        f"/series/{HOSTILE}/files/seg-binary.dcm",
    ]
    for path in gets:
        text = viewer.get(path).text
        for detail in ("PID-4711", BIRTH_DATE, "ACC&#39;", "ACC'", "Thorax"):
            assert detail not in text, (path, detail)
        assert "Doe" not in text, path
    assert viewer.get("/api/jobs", params={"search": ACCESSION}).json()["total"] == 0
    reasons = [row["reason"] for row in viewer.get("/api/rejected").json() if row["status"] == "0xC000"]
    assert set(reasons) == {
        "StudyDescription … (the rest is shown to roles that see patient details)",
        "AccessionNumber is … (the rest is shown to roles that see patient details)",
    }
    hashes = console.client("olga")
    for path in ("/config", "/api/config"):
        assert "$argon2" not in hashes.get(path).text and SECRET not in hashes.get(path).text


def test_refusal_metric_labels_are_few_and_carry_no_patient_data(console):
    scraped = httpx.get(f"{console.url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    families = {f.name: f for f in text_string_to_metric_families(scraped.text)}
    samples = families["dicom_node_instances_refused"].samples
    reasons = {s.labels["reason"] for s in samples}
    assert len(reasons) <= MAX_REFUSAL_KINDS and "other" in reasons
    assert sum(s.value for s in samples if s.name.endswith("_total")) == 64
    assert all("Doe" not in r and "<" not in r and len(r) <= 60 for r in reasons), reasons
    assert {"AccessionNumber is", "StudyDescription"} <= reasons
    assert "Doe" not in scraped.text and "1.2.826" not in scraped.text


def test_large_request_bodies_are_refused(console):
    operator = console.client("olga")
    token = console.csrf(operator)
    big = {"csrf_token": token, "rule": "x" * (MAX_BODY_BYTES + 1)}
    declared = operator.post(f"/series/{QUEUED}/reroute", data=big)
    assert declared.status_code == 413 and "larger than the console accepts" in declared.text

    def chunks() -> Iterator[bytes]:
        for _ in range(MAX_BODY_BYTES // 1024 + 8):
            yield b"a" * 1024

    streamed = operator.post(
        f"/api/jobs/{QUEUED}/reroute",
        content=chunks(),
        headers={"X-CSRF-Token": token, "Content-Type": "application/json"},
    )
    assert streamed.status_code == 413
    with console.sessions() as session:
        job = jobs.job_for_series_uid(session, QUEUED)
        assert job is not None and job.state is JobState.QUEUED


def _at_once(client: httpx.Client, path: str, token: str, count: int = 2) -> list[httpx.Response]:
    responses: list[httpx.Response] = []
    start = threading.Barrier(count)

    def post() -> None:
        start.wait()
        responses.append(client.post(path, headers={"X-CSRF-Token": token}))

    threads = [threading.Thread(target=post) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return responses


def _events(console: Console, uid: str, to_state: JobState) -> int:
    with console.sessions() as session:
        job = jobs.job_for_series_uid(session, uid)
        assert job is not None
        return len(
            session.scalars(select(JobEvent).where(JobEvent.job_id == job.id, JobEvent.to_state == to_state)).all()
        )


def test_two_cancels_or_retries_sent_at_once_change_the_series_once(console):
    operator = console.client("olga")
    token = console.csrf(operator)
    cancels = _at_once(operator, f"/api/jobs/{QUEUED}/cancel", token)
    assert sorted(r.status_code for r in cancels) == [200, 409]
    refused = next(r for r in cancels if r.status_code == 409).json()["detail"]
    assert (
        refused == "cannot cancel: series is FAILED; only COMPLETE, PROCESSING, QUEUED, SENDING series can be cancelled"
    )
    assert _events(console, QUEUED, JobState.FAILED) == 1

    retries = _at_once(operator, f"/api/jobs/{DONE_AGAIN}/retry", token)
    assert sorted(r.status_code for r in retries) == [200, 409]
    assert "series is COMPLETE; only DONE, FAILED, IGNORED can be retried" in str(retries[0].json()) + str(
        retries[1].json()
    )
    assert _events(console, DONE_AGAIN, JobState.COMPLETE) == 2  # its first run and the one retry


def test_cancel_refuses_while_results_are_on_their_way_and_not_while_a_destination_waits(console):
    operator = console.client("olga")
    token = console.csrf(operator)
    sending = operator.post(f"/api/jobs/{IN_FLIGHT}/cancel", headers={"X-CSRF-Token": token})
    assert sending.status_code == 409
    assert sending.json()["detail"] == (
        "cannot cancel: the results are being sent to pacs now and files already on their way cannot be recalled; "
        "cancel once this attempt has ended (while a destination waits for its next try)"
    )
    waiting = operator.post(f"/api/jobs/{WAITING}/cancel", headers={"X-CSRF-Token": token})
    assert waiting.status_code == 200 and waiting.json() == {"state": "FAILED"}


def test_reroute_to_a_model_or_rule_that_does_not_exist_is_refused_with_a_sentence(console):
    operator = console.client("olga")
    token = console.csrf(operator)
    model = operator.post(
        f"/api/jobs/{HOSTILE}/reroute", json={"model": "nnunet-9000"}, headers={"X-CSRF-Token": token}
    )
    assert model.status_code == 422
    assert model.json()["detail"] == "cannot re-route: unknown model 'nnunet-9000' (known: baseline)"
    page = operator.post(f"/series/{HOSTILE}/reroute", data={"csrf_token": token, "rule": "nope" * 5000})
    assert page.status_code == 303 and "not+a+processing+rule" in page.headers["location"]
    assert len(page.headers["location"]) < 1000, "the name sent is cut in the message"
    audit = operator.get("/api/audit", params={"action": "console"}).json()
    assert any(
        "re-route of series" in row["detail"] and "unknown model 'nnunet-9000'" in row["detail"] for row in audit
    )


def test_login_throttle_cannot_be_bypassed_with_x_forwarded_for(tmp_path):
    """X-Forwarded-For counts only from console.trusted_proxies: here the client (127.0.0.1) is none."""
    running = _start(tmp_path, login_attempts_per_minute=3, trusted_proxies=["10.9.9.9/32"])
    try:
        client = running.client()
        for attempt in range(3):
            client.headers["X-Forwarded-For"] = f"203.0.113.{attempt}"
            assert log_in(client, "olga" * 1000, "guess").status_code == 401
        client.headers["X-Forwarded-For"] = "198.51.100.7"
        throttled = log_in(client, "olga", PASSWORDS["olga"])
        assert throttled.status_code == 429
        with running.sessions() as session:
            records = session.execute(
                select(AuditEvent.peer_address, AuditEvent.detail).where(AuditEvent.action == "console")
            ).all()
        assert {address for address, _detail in records} == {"127.0.0.1"}, "the real peer, not a header it sent"
        assert all(len(detail) < 200 for _address, detail in records), "a long user name sent is cut"
    finally:
        running.server.stop()


def test_behind_a_trusted_proxy_one_clients_failed_logins_lock_out_no_other_client(tmp_path):
    """Every client of a reverse proxy connects from its address: one user's wrong passwords once locked out
    everyone behind it. The proxy (127.0.0.1, trusted by default) names each client in X-Forwarded-For."""
    running = _start(tmp_path, login_attempts_per_minute=3, trust_forwarded_for=True)
    try:
        guesser = running.client(**{"X-Forwarded-For": "203.0.113.9"})
        # The proxy appends the address it was called from; what the client sent before it counts for nothing.
        colleague = running.client(**{"X-Forwarded-For": "203.0.113.9, 198.51.100.7"})
        assert [log_in(guesser, name, "guess").status_code for name in ("otto", "oscar", "olaf")] == [401] * 3
        assert log_in(guesser, "vera", PASSWORDS["vera"]).status_code == 429, "the guesser's own address waits"
        assert log_in(colleague, "olga", PASSWORDS["olga"]).status_code == 303
        with running.sessions() as session:
            addresses = set(
                session.scalars(select(AuditEvent.peer_address).where(AuditEvent.action == "console")).all()
            )
        assert addresses == {"203.0.113.9", "198.51.100.7"}, "the audit trail names the clients, not the proxy"
    finally:
        running.server.stop()


def test_x_forwarded_for_from_a_trusted_proxy_counts_only_where_the_setting_says_it_is_appended(tmp_path):
    """A proxy on this machine that passes on the header a client sent (nginx does, by default) would let the
    client name any address: escape the throttle and make the audit trail name an address it chose."""
    running = _start(tmp_path, login_attempts_per_minute=3)  # 127.0.0.1 is a trusted proxy by default
    try:
        client = running.client()
        for attempt in range(3):
            client.headers["X-Forwarded-For"] = f"203.0.113.{attempt}"
            assert log_in(client, f"guess{attempt}", "guess").status_code == 401
        client.headers["X-Forwarded-For"] = "198.51.100.7"
        assert log_in(client, "olga", PASSWORDS["olga"]).status_code == 429  # the proxy's address waits
        with running.sessions() as session:
            addresses = set(session.scalars(select(AuditEvent.peer_address).where(AuditEvent.action == "console")))
        assert addresses == {"127.0.0.1"}
    finally:
        running.server.stop()


def test_a_refused_reroute_is_audited_at_once_without_holding_the_database(console):
    """The refusal was audited inside the session that read the series, which on SQLite holds the write lock: the
    request waited for its own lock until the audit record gave up (a minute), and every writer waited with it."""
    with transaction(console.sessions) as session:
        job = _series(session, "1.2.3.77")
        jobs.change_state(session, job, JobState.FAILED, "not admitted: SliceThickness differs within the series")
    operator = console.client("olga")
    token = console.csrf(operator)

    answer = operator.post("/api/jobs/1.2.3.77/reroute", json={"model": "baseline"}, headers={"X-CSRF-Token": token})

    assert answer.status_code == 409 and "admission refused this series" in answer.json()["detail"]
    with console.sessions() as session:
        details = session.scalars(select(AuditEvent.detail).where(AuditEvent.action == "console")).all()
    assert any("re-route of series 1.2.3.77 refused: admission refused this series" in d for d in details)


def test_a_series_refused_for_a_missing_patient_id_is_shown_under_its_studys_patient_not_as_another(console):
    """An image without a PatientID was taken for one naming another patient: its series read "refused: names
    another patient (PatientID (none))" though admission refused it for the missing PatientID."""

    with transaction(console.sessions) as session:
        study = Study(study_instance_uid="1.2.9", patient_id="P1", patient_name="DOE^JOHN")
        series = Series(series_instance_uid="1.2.9.2", study=study, modality="CT", instance_count=1)
        image = Instance(
            sop_instance_uid="1.2.9.2.1",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            series=series,
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            path="/data/1.2.9.2.1.dcm",
            size_bytes=1,
            patient_id="",
        )
        refused = "admission refused: 1 of 1 instances have no PatientID (first: instance 1); the results need it"
        session.add_all([study, series, image, Job(series=series, state=JobState.FAILED, reason=refused)])

    patient = console.client("olga").get("/api/jobs/1.2.9.2").json()["patient"]

    assert "another_patient" not in patient
    assert (patient["patient_id"], patient["patient_name"]) == ("P1", "DOE^JOHN")


def test_hostile_headers_sent_over_dicom_reach_no_page_as_markup_and_no_info_log(tmp_path):
    """A real node receives a phantom whose patient and study attributes carry markup and template syntax."""
    series = write_phantom_series(tmp_path / "ct", SMALL_PHANTOM)
    for path in series.files:
        dataset = pydicom.dcmread(path)
        dataset.PatientName = "Evil^Eve<script>alert(1)</script>"
        dataset.PatientID = 'PID"><img src=x onerror=alert(1)>'
        dataset.AccessionNumber = "{{7*7}}<b>"
        dataset.StudyDescription = "{{7*7}} <script>x</script>"
        dataset.SeriesDescription = '"><svg onload=alert(1)>'
        dataset.save_as(path)
    with console_node(tmp_path / "run") as running:
        assert storescu(running.node.port, series.files).returncode == 0
        running.node.wait_for_state(series.series_instance_uid, JobState.DONE, timeout=180)
        operator, viewer = running.client("olga"), running.client("vera")
        for client in (operator, viewer):
            for page in ("/", f"/series/{series.series_instance_uid}", "/audit", "/rejected"):
                text = client.get(page).text
                markup = _markup(text)
                assert set(markup.scripts) <= {"/static/console.js"} and markup.handlers == [], page
                assert "<svg" not in text, page
                if page != "/audit":
                    assert "&lt;svg onload" in text or page == "/rejected", page
        assert "Evil^Eve&lt;script&gt;" in operator.get(f"/series/{series.series_instance_uid}").text
        for page in ("/", f"/series/{series.series_instance_uid}", f"/api/jobs/{series.series_instance_uid}"):
            shown = viewer.get(page).text
            assert "Evil" not in shown and "PID" not in shown and "{{7*7}}" not in shown, page
        log = running.node.log()
    assert "$argon2" not in log, "password hashes never reach the log"
    info_lines = [line for line in log.splitlines() if "ERROR" not in line]
    assert not [line for line in info_lines if "Evil" in line or "PID&" in line or 'PID"' in line]


LARGER_PHANTOM = PhantomSpec(
    rows=256, columns=256, slices=80, pixel_spacing=(1.5, 1.5), slice_spacing=3.0, noise_sd=5.0
)


def test_a_series_cancelled_while_processing_never_reaches_the_pacs(tmp_path):
    """The worker finishes its run, finds the series cancelled, and drops the results; nothing is sent."""
    series = write_phantom_series(tmp_path / "ct", LARGER_PHANTOM)
    with console_node(tmp_path / "run") as running:
        assert storescu(running.node.port, series.files).returncode == 0
        running.node.wait_for_state(series.series_instance_uid, JobState.PROCESSING, timeout=120)
        operator = running.client("olga")
        cancelled = operator.post(
            f"/api/jobs/{series.series_instance_uid}/cancel", headers={"X-CSRF-Token": running.csrf(operator)}
        )
        assert cancelled.status_code == 200 and cancelled.json() == {"state": "FAILED"}
        wait_for(lambda: "job.result_discarded" in running.node.log(), timeout=180, what="the worker to finish its run")
        with running.node.sessions() as session:
            job = jobs.job_for_series_uid(session, series.series_instance_uid)
            assert job is not None and job.state is JobState.FAILED
            assert job.reason == "cancelled by olga (was PROCESSING)" and not job.result_files and not job.deliveries
        assert list(running.received.iterdir()) == [], "no result of a cancelled series reaches the PACS"


def test_login_throttle_counts_an_ipv6_client_by_its_network_and_forgets_old_addresses(monkeypatch):
    from dicom_node.console import auth

    clock = [1000.0]
    monkeypatch.setattr(auth.time, "monotonic", lambda: clock[0])
    throttle = auth.LoginThrottle(limit=3)
    for host in ("2001:db8:1:2::a", "2001:db8:1:2::b", "2001:db8:1:2:ffff::1"):
        throttle.failed(host)
    assert throttle.wait_seconds("2001:db8:1:2::c") > 0, "one /64 is one client"
    assert throttle.wait_seconds("2001:db8:1:3::a") == 0 and throttle.wait_seconds("192.0.2.1") == 0
    assert throttle.key("::ffff:192.0.2.1") == "192.0.2.1"
    for index in range(auth.LoginThrottle.PRUNE_ABOVE + 5):
        throttle.failed(f"10.0.{index // 256}.{index % 256}")
    clock[0] += 120
    throttle.failed("198.51.100.1")
    assert len(throttle._failures) == 1, "addresses whose failures are older than the window are forgotten"


def _audit_since(console: Console, first_id: int) -> list[str]:
    with console.sessions() as session:
        return list(
            session.scalars(
                select(AuditEvent.detail)
                .where(AuditEvent.action == "console", AuditEvent.id > first_id)
                .order_by(AuditEvent.id)
            )
        )


def _last_audit_id(console: Console) -> int:
    with console.sessions() as session:
        return max(session.scalars(select(AuditEvent.id)).all(), default=0)


def test_reading_patient_data_is_audited_once_per_view_and_session(console):
    """Who looked at which series is on record; a worklist refreshing itself adds no row per refresh."""
    operator, viewer = console.client("olga"), console.client("vera")
    start = _last_audit_id(console)
    for _ in range(3):
        assert operator.get("/worklist/rows").status_code == 200
    assert operator.get(f"/series/{HOSTILE}").status_code == 200
    assert operator.get(f"/api/jobs/{HOSTILE}").status_code == 200
    assert operator.get("/api/jobs", params={"search": ACCESSION}).json()["total"] == 1
    assert operator.get("/api/jobs", params={"search": HOSTILE}).status_code == 200
    assert viewer.get(f"/series/{HOSTILE}").status_code == 200

    details = [d for d in _audit_since(console, start) if "logged in" not in d]

    assert details == [
        "user olga: viewed the worklist (page 1) (with patient details)",
        f"user olga: viewed series {HOSTILE} (with patient details)",
        f"user olga: read series {HOSTILE} through the API (with patient details)",
        "user olga: listed series through the API (page 1, search by accession number) (with patient details)",
        f'user olga: listed series through the API (page 1, search "{HOSTILE}") (with patient details)',
        f"user vera: viewed series {HOSTILE} (without patient details)",
    ]
    with console.sessions() as session:
        studies = set(session.scalars(select(AuditEvent.study_instance_uid).where(AuditEvent.id > start)))
    assert studies == {None, HOSTILE + ".0"}


def test_a_refused_login_records_a_configured_name_never_what_else_was_typed(console):
    start = _last_audit_id(console)
    client = console.client()
    assert log_in(client, "Winter2025!olga", "guess").status_code == 401
    assert log_in(client, "olga", "guess").status_code == 401
    assert log_in(client, "olga", PASSWORDS["olga"]).status_code == 303  # clears this address' failures

    assert _audit_since(console, start) == [
        "user (a name that is no user): login failed: wrong user name or password",
        "user olga: login failed: wrong user name or password",
        "user olga: logged in (operator)",
    ]


def test_tokens_with_any_characters_are_refused_not_answered_with_an_error(console):
    """A cookie, form token, header token or signature holding non-ASCII text is simply wrong."""
    operator = console.client("olga")
    session_cookie = f"{SESSION_COOKIE}=a.\u00e9".encode()
    assert httpx.get(f"{console.url}/api/me", headers={"Cookie": session_cookie}).status_code == 401
    assert httpx.get(f"{console.url}/login", headers={"Cookie": session_cookie}).status_code == 200
    stranger = console.client()
    stranger.get("/login")
    form = {"username": "olga", "password": PASSWORDS["olga"], "csrf_token": "\u00e9"}
    assert stranger.post("/login", data=form).status_code == 403
    refused = operator.post(f"/api/jobs/{QUEUED}/cancel", headers={"X-CSRF-Token": "\u00e9".encode()})
    assert refused.status_code == 403
    page = operator.get(f"/series/{HOSTILE}", params={"done": "made up", "sig": "\u00e9"})
    assert page.status_code == 200 and "made up" not in page.text


def test_an_internal_error_is_a_plain_500_with_the_security_headers_and_a_logged_sentence(
    tmp_path, monkeypatch, caplog
):
    from dicom_node.console import queries

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("a bug in the worklist query")

    running = _start(tmp_path)
    try:
        client = running.client("olga")
        monkeypatch.setattr(queries, "state_counts", broken)
        response = client.get("/")
        big = client.post("/api/jobs/1.2.3/cancel", content=b"a" * (MAX_BODY_BYTES + 1))
    finally:
        running.server.stop()

    assert response.status_code == 500 and response.text == "internal error: see the node's log"
    for answer in (response, big):
        assert answer.headers["X-Frame-Options"] == "DENY" and answer.headers["Cache-Control"] == "no-store"
        assert "default-src 'self'" in answer.headers["Content-Security-Policy"]
    assert big.status_code == 413
    reasons = [getattr(r, "event_fields", {}).get("reason") for r in caplog.records]
    assert "the console could not answer GET / because of an internal error" in reasons


def test_login_attempts_sent_at_once_each_count_before_the_password_is_checked(monkeypatch):
    from dicom_node.console import auth

    monkeypatch.setattr(auth.time, "monotonic", lambda: 1000.0)
    throttle = auth.LoginThrottle(limit=3)

    assert [throttle.begin("192.0.2.7", "olga")[0] for _ in range(5)] == [0, 0, 0, 61, 61]
    assert throttle.begin("192.0.2.8", "vera") == (0, "")


def test_a_successful_login_takes_back_only_its_own_attempt_never_earlier_failures(monkeypatch):
    """A viewer's own login (or, behind the reverse proxy, anyone's) once cleared every failure of the address,
    so a viewer could guess an operator's password without end, logging in as itself between guesses."""
    from dicom_node.console import auth

    monkeypatch.setattr(auth.time, "monotonic", lambda: 1000.0)
    throttle = auth.LoginThrottle(limit=3)
    assert [throttle.begin("192.0.2.7", name) for name in ("olga", "otto")] == [(0, ""), (0, "")]  # two failures
    assert throttle.begin("192.0.2.7", "vera") == (0, "")
    throttle.succeeded("192.0.2.7", "vera")
    assert throttle.begin("192.0.2.7", "oscar") == (0, "")  # the third failure
    assert throttle.begin("192.0.2.7", "olga") == (61, "address")
    assert throttle.wait_seconds("192.0.2.7") == 61 and throttle.wait_seconds("192.0.2.9", "vera") == 0


def test_a_user_name_guessed_from_many_addresses_is_throttled_for_a_minute_only(monkeypatch):
    from dicom_node.console import auth

    clock = [1000.0]
    monkeypatch.setattr(auth.time, "monotonic", lambda: clock[0])
    throttle = auth.LoginThrottle(limit=3)
    for host in ("192.0.2.1", "192.0.2.2", "2001:db8:1::1"):
        assert throttle.begin(host, "olga") == (0, "")
    assert throttle.begin("198.51.100.4", "olga") == (61, "name"), "a fourth address guessing olga waits too"
    assert throttle.begin("198.51.100.4", "vera") == (0, ""), "other names and that address may go on"
    clock[0] += 61
    assert throttle.begin("198.51.100.4", "olga") == (0, ""), "olga is not locked out past the window"
    for index in range(auth.LoginThrottle.PRUNE_ABOVE + 5):
        throttle.failed("192.0.2.1", f"guess-{index}" * 100)
    clock[0] += 120
    throttle.failed("192.0.2.1", "olga")
    assert len(throttle._by_name) == 1, "names whose failures are older than the window are forgotten"


def test_logging_in_as_oneself_between_guesses_does_not_reset_the_throttle(tmp_path):
    running = _start(tmp_path, login_attempts_per_minute=3)
    try:
        guesser, viewer = running.client(), running.client()
        assert [log_in(guesser, name, "guess").status_code for name in ("olga", "otto")] == [401, 401]
        assert log_in(viewer, "vera", PASSWORDS["vera"]).status_code == 303
        assert log_in(guesser, "oscar", "guess").status_code == 401
        refused = log_in(guesser, "olga", PASSWORDS["olga"])
        assert refused.status_code == 429, "the right password, but after three failures from this address"
        assert "Too many failed logins from this address; try again in" in refused.text
    finally:
        running.server.stop()


def test_a_login_form_expires_on_the_server(monkeypatch):
    from dicom_node.console import auth

    clock = [1_800_000_000.0]
    monkeypatch.setattr(auth.time, "time", lambda: clock[0])
    sessions = Sessions(SECRET.encode(), lifetime_seconds=600)
    nonce = sessions.login_nonce()
    token = sessions.login_token(nonce)

    assert sessions.login_token_valid(nonce, token)
    clock[0] += auth.LOGIN_FORM_SECONDS + 1
    assert not sessions.login_token_valid(nonce, token), "a form kept for a month must not log anyone in"
    assert not sessions.login_token_valid("no-time-in-it", sessions.login_token("no-time-in-it"))


def test_a_logout_holds_when_the_clock_was_stepped_back_between_login_and_logout(tmp_path, monkeypatch):
    """NTP corrects a clock that ran an hour fast after alice logged in; she logs out ten minutes later. A copy of her
    cookie (a shared workstation's browser) stays refused until it runs out by its own expiry, across a restart."""
    from dicom_node.console import auth

    hours = 3600.0
    login = 1_800_000_000.0
    clock = [login]
    monkeypatch.setattr(auth.time, "time", lambda: clock[0])
    ended = tmp_path / "console-ended-sessions.json"
    sessions = Sessions(SECRET.encode(), lifetime_seconds=8 * hours, ended_file=ended)
    _, cookie = sessions.issue("alice", "operator", "hash")
    clock[0] -= 1 * hours - 600  # stepped back an hour; ten minutes later she logs out
    alice = sessions.read(cookie)
    assert alice is not None
    sessions.end(alice)
    assert sessions.read(cookie) is None

    clock[0] = login + 7.5 * hours  # past the logout + 8 h, before the cookie's own expiry (login + 8 h)
    restarted = Sessions(SECRET.encode(), lifetime_seconds=8 * hours, ended_file=ended)
    restarted.end(restarted.read(restarted.issue("bob", "viewer", "hash")[1]))  # another logout prunes the list

    assert restarted.read(cookie) is None


def test_a_database_password_in_the_url_query_is_hidden_from_the_configuration_page():
    from dicom_node.console.queries import visible_config

    settings = Settings(
        database={"url": "postgresql+psycopg://node:S3cretPw@db/dicom?password=S3cretPw&sslmode=require"}
    )

    shown = visible_config(settings)["database"]["url"]

    assert "S3cretPw" not in shown and "sslmode=require" in shown and "db/dicom" in shown


def test_changing_a_users_password_ends_the_sessions_opened_with_the_old_one(tmp_path):
    from dicom_node.config import ConsoleUser
    from dicom_node.console.auth import hash_password

    running = _start(tmp_path)
    try:
        client = running.client("vera")
        assert client.get("/api/me").status_code == 200
        running.settings.console.users["vera"] = ConsoleUser(password_hash=hash_password("a new one"), role="viewer")

        assert client.get("/api/me").status_code == 401, "a session of the old password must end with it"
        assert log_in(running.client(), "vera", "a new one").status_code == 303
    finally:
        running.server.stop()


def test_a_short_session_secret_is_refused_and_plain_http_beyond_this_machine_is_warned_about(tmp_path, caplog):
    import pydantic

    with pytest.raises(pydantic.ValidationError, match="at least 32 characters"):
        Settings(console={"session_secret": "guessable"})
    running = _start(tmp_path, host="0.0.0.0")
    running.server.stop()
    hints = [
        getattr(r, "event_fields", {}).get("hint", "") for r in caplog.records if r.getMessage() == "console.plain_http"
    ]
    assert len(hints) == 1 and hints[0].startswith("the console listens on 0.0.0.0:"), hints
    caplog.clear()
    _start(tmp_path / "loopback").server.stop()
    assert not [r for r in caplog.records if r.getMessage() == "console.plain_http"]


def test_a_client_leaving_in_the_middle_of_its_body_gets_no_answer_and_no_error_logged(console, caplog):
    import asyncio

    app = create_app(console.server.context)
    sent: list[str] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/login",
        "raw_path": b"/login",
        "query_string": b"",
        "headers": [(b"content-length", b"100")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 80),
        "scheme": "http",
        "http_version": "1.1",
        "root_path": "",
    }
    asyncio.run(app(scope, receive, send))

    assert sent == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_with_allowed_hosts_a_request_naming_another_host_is_refused(tmp_path, caplog):
    """DNS rebinding: another site's page, resolved to this console, sends its own name as Host."""
    running = _start(tmp_path, allowed_hosts=["127.0.0.1", "console.hospital.example"])
    try:
        assert httpx.get(f"{running.url}/healthz").status_code == 200
        named = httpx.get(f"{running.url}/healthz", headers={"Host": "console.hospital.example"})
        rebound = httpx.get(f"{running.url}/api/me", headers={"Host": "evil.example"})
        assert named.status_code == 200 and rebound.status_code == 400
    finally:
        running.server.stop()
    proxied = _start(tmp_path / "proxy", auth="proxy_header")
    proxied.server.stop()
    assert "console.hosts_unchecked" in [r.getMessage() for r in caplog.records]


def test_an_id_or_name_that_reads_as_another_is_shown_as_stored_not_reordered(tmp_path):
    """A right-to-left override makes ``\\u202e4321-NRM`` show as MRN-1234 and ``\\u202eEOD^NHOJ`` as JOHN^DOE:
    admission refuses such a series, but its study row names the patient all the same; every page shows the
    override as ``?`` (what is stored), never as the other ID or name it would draw."""
    running = _start(tmp_path)
    uid = "1.2.826.0.1.3680043.99.42"
    study = StudyAttributes(uid + ".0", patient_id="\u202e4321-NRM", patient_name="\u202eEOD^NHOJ")
    try:
        with transaction(running.sessions) as session:
            _series(session, uid, study=study)
        operator = running.client("olga")
        for page in ("/", "/worklist/rows", f"/series/{uid}"):
            text = operator.get(page).text
            assert "\u202e" not in text, page
            assert "?4321-NRM" in text and "?EOD^NHOJ" in text, page
    finally:
        running.server.stop()
