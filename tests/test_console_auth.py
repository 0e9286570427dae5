"""Console logins beyond passwords: `dicom-node user add`, the reverse-proxy header mode, HTTPS, readiness."""

from __future__ import annotations

import os
import re
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from dicom_node.config import ConfigError, Settings, load_settings
from dicom_node.console.app import ConsoleServer
from dicom_node.console.auth import check_password, hash_password
from dicom_node.console.metrics import Liveness
from dicom_node.service import open_database
from tests.conftest import DICOM_NODE, ROOT, free_port, wait_for
from tests.console_helpers import log_in


def _user_add(*args: str, password: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DICOM_NODE, "user", "add", *args, "--password-stdin"],
        input=password + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.integration
def test_user_add_prints_an_argon2_entry_the_configuration_accepts_and_never_the_password(tmp_path):
    result = _user_add("olga", "--role", "operator", password="correct horse battery")
    assert result.returncode == 0, result.stderr
    assert "correct horse battery" not in result.stdout
    entry = yaml.safe_load(result.stdout)
    user = entry["console"]["users"]["olga"]
    assert user["role"] == "operator" and user["password_hash"].startswith("$argon2id$")
    assert check_password(user["password_hash"], "correct horse battery")
    assert not check_password(user["password_hash"], "correct horse")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(entry))
    assert load_settings(config).console.users["olga"].role == "operator"


@pytest.mark.integration
def test_user_add_refuses_a_short_password_and_an_unknown_role():
    short = _user_add("olga", password="short")
    assert short.returncode == 2 and "too short: use at least 8 characters" in short.stderr
    role = _user_add("olga", "--role", "admin", password="long enough password")
    assert role.returncode == 2 and "unknown role 'admin': use viewer or operator" in role.stderr


@pytest.mark.parametrize(
    ("console", "expected"),
    [
        (
            {"users": {"olga": {"password_hash": "plaintext", "role": "operator"}}},
            "console.users.olga.password_hash: not an argon2 hash: make one with `dicom-node user add",
        ),
        ({"tls_certificate": "/etc/cert.pem"}, "console: tls_certificate and tls_private_key go together (HTTPS)"),
        ({"trusted_proxies": ["proxy.example.org"]}, "'proxy.example.org' is not an IP address or CIDR network"),
    ],
)
def test_console_settings_name_what_is_wrong(tmp_path, console, expected):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"console": console}))
    with pytest.raises(ConfigError) as error:
        load_settings(config)
    assert expected in str(error.value)


def test_shipped_config_documents_every_console_key():
    shipped = yaml.safe_load((ROOT / "config.yaml").read_text())["console"]
    assert set(shipped) == set(Settings.model_fields["console"].annotation.model_fields)  # type: ignore[union-attr]
    readme = (ROOT / "README.md").read_text()
    for key in shipped:
        assert f"| `{key}`" in readme or f", `{key}` |" in readme, key


@pytest.fixture
def console_server(tmp_path: Path) -> Iterator[Callable[..., tuple[str, Settings]]]:
    """Start the console alone (real Uvicorn, a migrated database, no DICOM port): returns its URL."""
    servers: list[ConsoleServer] = []

    def start(**console: Any) -> tuple[str, Settings]:
        port = free_port()
        settings = Settings(
            storage={"directory": str(tmp_path / f"storage{len(servers)}")},
            network={"port": free_port()},
            console={"enabled": True, "port": port, "echo_interval_seconds": 0, **console},
        )
        server = ConsoleServer(settings, open_database(settings), Liveness(lambda: None, lambda: False))
        server.start()
        servers.append(server)
        scheme = "https" if settings.console.https else "http"
        return f"{scheme}://127.0.0.1:{port}", settings

    yield start
    for server in servers:
        server.stop()


BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
"""The Accept header a browser sends when it navigates to a page (curl and scripts send ``*/*``)."""
SERIES = "1.2.826.0.1.3680043.99.7"
SEG_BYTES = b"DICM a result file"
PNG_BYTES = b"\x89PNG a preview"


def _series_with_results(settings: Settings, folder: Path) -> str:
    """Record a series of one instance in the console's database, with a result file and a preview in ``folder``."""
    from db import jobs
    from db.ingest import InstanceRecord, SeriesAttributes, StudyAttributes, record_instance
    from db.results import ResultFile, ResultKind
    from db.session import transaction

    folder.mkdir(parents=True)
    (folder / "seg-binary.dcm").write_bytes(SEG_BYTES)
    (folder / "preview.png").write_bytes(PNG_BYTES)
    record = InstanceRecord(
        sop_instance_uid=SERIES + ".1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=str(folder / "ct.dcm"),
        size_bytes=1,
        study=StudyAttributes(SERIES + ".0"),
        series=SeriesAttributes(SERIES, modality="CT"),
    )
    with transaction(open_database(settings)) as session:
        record_instance(session, record)
        job = jobs.job_for_series_uid(session, SERIES)
        assert job is not None
        job.result_path = str(folder)
        job.result_files = [ResultFile(ResultKind.SEG, str(folder / "seg-binary.dcm"), "BINARY")]
    return SERIES


def _wait_until_up(url: str, **client: Any) -> None:
    def up() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=1, **client).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, timeout=20, what="the console to answer")


@pytest.mark.integration
def test_proxy_header_logs_in_the_named_user_only_from_a_trusted_proxy(console_server):
    url, _settings = console_server(auth="proxy_header")
    _wait_until_up(url)
    operator = httpx.Client(base_url=url, headers={"X-Forwarded-User": "olga", "X-Forwarded-Role": "operator"})
    me = operator.get("/api/me").json()
    assert me["user"] == "olga" and me["role"] == "operator" and me["sees_patient_details"] is True
    viewer = httpx.get(f"{url}/api/me", headers={"X-Forwarded-User": "vera", "X-Forwarded-Role": "radiologist"})
    assert viewer.json()["role"] == "viewer"
    assert httpx.get(f"{url}/api/me").status_code == 401
    assert operator.post("/api/jobs/1.2.3/retry").status_code == 403  # the CSRF token is still needed
    passed = operator.post("/api/jobs/1.2.3/retry", headers={"X-CSRF-Token": me["csrf_token"]})
    assert passed.status_code == 404 and passed.json()["detail"] == "cannot retry: no series 1.2.3 on this node"
    login = httpx.get(f"{url}/login")
    assert "single sign-on" in login.text and "password" not in login.text.lower()

    elsewhere, _ = console_server(auth="proxy_header", trusted_proxies=["10.9.9.9/32"])
    _wait_until_up(elsewhere)
    forged = httpx.get(f"{elsewhere}/api/me", headers={"X-Forwarded-User": "olga", "X-Forwarded-Role": "operator"})
    assert forged.status_code == 401


@pytest.mark.integration
def test_behind_the_proxy_each_session_has_its_own_csrf_token_refused_in_any_other(console_server):
    """The token once was the same for a user forever: seen once (a log, a screenshot), it stayed valid."""
    url, _settings = console_server(auth="proxy_header")
    _wait_until_up(url)
    olga = {"X-Forwarded-User": "olga", "X-Forwarded-Role": "operator"}
    first, second = httpx.Client(base_url=url, headers=olga), httpx.Client(base_url=url, headers=olga)
    token, other = first.get("/api/me").json()["csrf_token"], second.get("/api/me").json()["csrf_token"]
    assert token != other, "two sessions of the same proxy user"
    assert first.get("/api/me").json()["csrf_token"] == token, "a session keeps its token"

    assert first.post("/api/jobs/1.2.3/retry", headers={"X-CSRF-Token": other}).status_code == 403
    assert second.post("/api/jobs/1.2.3/retry", headers={"X-CSRF-Token": token}).status_code == 403
    assert first.post("/api/jobs/1.2.3/retry", headers={"X-CSRF-Token": token}).status_code == 404  # passed
    cookieless = httpx.post(f"{url}/api/jobs/1.2.3/retry", headers={**olga, "X-CSRF-Token": token})
    assert cookieless.status_code == 403
    assert "carries no console session (its cookie)" in cookieless.json()["detail"]

    browser = httpx.Client(base_url=url, headers={**olga, "Accept": BROWSER_ACCEPT}, follow_redirects=False)
    opened = browser.get("/rejected?page=2")
    assert opened.status_code == 303 and opened.headers["location"] == "/rejected?page=2"
    assert "samesite=lax" in opened.headers["set-cookie"].lower()
    page = browser.get(opened.headers["location"])
    assert page.status_code == 200
    found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert found is not None and found.group(1) not in (token, other)
    assert browser.post("/logout", data={"csrf_token": found.group(1)}).status_code == 303
    assert browser.get("/").status_code == 303, "the logged-out session is not taken up again: a new one opens"


@pytest.mark.integration
def test_behind_the_proxy_a_download_needs_only_the_headers_and_a_browsers_page_gets_its_session_first(
    console_server, tmp_path
):
    """A client without a cookie jar (curl -f) once got a redirect to the file with a JSON body, saved as the file."""
    url, settings = console_server(auth="proxy_header")
    _wait_until_up(url)
    uid = _series_with_results(settings, tmp_path / "results")
    olga = {"X-Forwarded-User": "olga", "X-Forwarded-Role": "operator"}
    curl = httpx.Client(base_url=url, headers={**olga, "Accept": "*/*"}, follow_redirects=False)
    download = curl.get(f"/series/{uid}/files/seg-binary.dcm")  # the file at once, and a session for the next
    assert download.status_code == 200 and download.content == SEG_BYTES
    assert download.headers["set-cookie"].startswith("dicom_node_session=")
    again = curl.get(f"/series/{uid}/files/seg-binary.dcm")  # with the cookie: no new session
    assert again.status_code == 200 and again.content == SEG_BYTES and "set-cookie" not in again.headers
    image = curl.get(f"/series/{uid}/preview.png", headers={"Accept": "image/avif,image/webp,*/*"})
    assert image.status_code == 200 and image.content == PNG_BYTES
    cookieless = httpx.get(f"{url}/api/jobs", headers=olga)  # a client without a cookie jar: a session each time
    assert cookieless.headers["set-cookie"].startswith("dicom_node_session="), "the API hands it over"

    browser = httpx.Client(base_url=url, headers={**olga, "Accept": BROWSER_ACCEPT}, follow_redirects=False)
    opened = browser.get(f"/series/{uid}/files/seg-binary.dcm")
    assert opened.status_code == 303 and opened.headers["location"] == f"/series/{uid}/files/seg-binary.dcm"
    assert opened.headers["set-cookie"].startswith("dicom_node_session=")
    followed = browser.get(opened.headers["location"])
    assert followed.status_code == 200 and followed.content == SEG_BYTES
    assert browser.get(f"/series/{uid}").status_code == 200, "the session goes on: no redirect again"


@pytest.mark.integration
def test_views_are_audited_once_a_while_per_proxy_user_and_address_and_per_password_session(console_server):
    """A script polling without a cookie jar gets a new session with every request: each was once a new view."""
    url, _settings = console_server(auth="proxy_header")
    _wait_until_up(url)
    for name, role in [("olga", "operator")] * 4 + [("vera", "operator")] * 2 + [("olga", "viewer")] * 2:
        headers = {"X-Forwarded-User": name, "X-Forwarded-Role": role}
        assert httpx.get(f"{url}/api/jobs", headers=headers).status_code == 200
    details = [row["detail"] for row in httpx.get(f"{url}/api/audit", headers=headers).json()]
    listed = "listed series through the API (page 1) (with patient details)"
    hidden = "listed series through the API (page 1) (without patient details)"
    assert sorted(details) == [f"user olga: {listed}", f"user olga: {hidden}", f"user vera: {listed}"]

    users = {"olga": {"password_hash": hash_password("operator-password"), "role": "operator"}}
    url, _settings = console_server(users=users)
    _wait_until_up(url)
    first, second = httpx.Client(base_url=url), httpx.Client(base_url=url)
    for client in (first, second):
        assert log_in(client, "olga", "operator-password").status_code == 303
    for client in (first, second, first, second):
        assert client.get("/api/jobs").status_code == 200
    details = [row["detail"] for row in first.get("/api/audit", params={"action": "console"}).json()]
    assert details.count(f"user olga: {listed}") == 2, "one record per session, as before"


@pytest.mark.integration
def test_readyz_names_the_failing_check_and_the_health_command_exits_1(console_server, tmp_path):
    url, settings = console_server()
    _wait_until_up(url)
    ready = httpx.get(f"{url}/readyz")
    assert ready.status_code == 503
    assert ready.json() == {
        "ready": False,
        "checks": {"database": True, "scp": False, "receiver": None, "worker": None, "storage": False},
        "reasons": [
            "the DICOM port does not accept connections",
            f"the storage folder cannot be written (no such file or directory: {settings.storage.directory}/incoming): "
            "the receiver answers 0xA700 to every image",  # the console alone: serve made no incoming/
        ],
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"console": {"enabled": True, "port": settings.console.port}}))
    health = subprocess.run(
        [sys.executable, "-m", "dicom_node.console.health"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "DICOM_NODE_CONFIG": str(config)},
    )
    assert health.returncode == 1 and '"scp": false' in health.stdout


@pytest.mark.integration
def test_https_console_sets_secure_cookies_and_refuses_plain_http(console_server, certificates):
    from argon2 import PasswordHasher

    users = {"olga": {"password_hash": PasswordHasher().hash("operator-password"), "role": "operator"}}
    url, settings = console_server(
        tls_certificate=str(certificates.node), tls_private_key=str(certificates.node_key), users=users
    )
    trusting = ssl.create_default_context(cafile=str(certificates.ca))
    _wait_until_up(url, verify=trusting)
    client = httpx.Client(base_url=url, verify=trusting, timeout=10)
    response = log_in(client, "olga", "operator-password")
    assert response.status_code == 303
    assert "Secure" in response.headers["set-cookie"] and "HttpOnly" in response.headers["set-cookie"]
    assert response.headers["strict-transport-security"] == "max-age=31536000"
    assert client.get("/api/me").json()["user"] == "olga"
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{settings.console.port}/healthz", timeout=5)


def test_configuration_shown_hides_hashes_keys_tokens_and_the_database_password(tmp_path):
    from dicom_node.console.queries import visible_config

    settings = Settings(
        storage={"directory": str(tmp_path)},
        database={"url": "postgresql+psycopg://dicomnode:db-secret@db.example.org/dicomnode"},
        console={
            "users": {"olga": {"password_hash": "$argon2id$v=19$m=65536,t=3,p=4$abc$def", "role": "operator"}},
            "session_secret": "cookie-secret-of-32-characters-at-least",
            "metrics_token": "scrape-secret",
            "tls_certificate": "/etc/console.pem",
            "tls_private_key": "/etc/console.key",
        },
    )
    shown = yaml.safe_dump(visible_config(settings))
    for secret in ("db-secret", "$argon2id", "cookie-secret", "scrape-secret", "/etc/console.key"):
        assert secret not in shown, secret
    assert "postgresql+psycopg://dicomnode:***@db.example.org/dicomnode" in shown
    assert "/etc/console.pem" in shown and "role: operator" in shown
    slashed = settings.model_copy(
        update={"database": settings.database.model_copy(update={"url": "postgresql+psycopg://n:Zk9/q+L r@db/n"})}
    )
    assert visible_config(slashed)["database"]["url"] == "postgresql+psycopg://n:***@db/n"


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        ("Pixel Data is truncated: 256 of 512 bytes (Rows 16 x Columns 16 ...)", "Pixel Data is truncated"),
        ("SeriesInstanceUID '1.2.abc' is not a valid UID", "SeriesInstanceUID"),
        ("not a DICOM data set: it is empty (0 bytes)", "not a DICOM data set"),
        ("AccessionNumber is 20 characters long ('AAAA'); at most 16 are accepted", "AccessionNumber is"),
    ],
)
def test_refusal_reasons_become_short_metric_labels_without_the_data(reason, kind):
    from dicom_node.console.metrics import refusal_kind

    assert refusal_kind(reason) == kind


def serve_once(node: Any) -> subprocess.CompletedProcess[str]:
    """`dicom-node serve` with ``node``'s configuration, run until it stops (here: refused at start)."""
    return subprocess.run(
        [DICOM_NODE, "serve", "--config", str(node.config_path)], capture_output=True, text=True, timeout=120
    )


@pytest.mark.integration
def test_serve_stops_at_start_naming_the_console_port_in_use(tmp_path):
    import socket

    from tests.conftest import Node

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = serve_once(Node(tmp_path / "node", {"console": {"enabled": True, "port": port}}))
    assert result.returncode == 1
    assert (
        f"cannot start: the console cannot listen on 127.0.0.1:{port}: console.port {port} is already in use by "
        "another program" in result.stderr
    )


@pytest.mark.integration
@pytest.mark.parametrize(
    ("console", "expected"),
    [
        (
            {"host": "192.0.2.77"},  # TEST-NET-1: never an address of this machine
            "the console cannot listen on 192.0.2.77:PORT: console.host '192.0.2.77' is not an address of this machine",
        ),
        (
            {"metrics_host": "192.0.2.77"},
            "the metrics listener cannot listen on 192.0.2.77:PORT: console.metrics_host '192.0.2.77' is not an address "
            "of this machine",
        ),
    ],
)
def test_serve_stops_at_start_naming_the_console_setting_that_gives_an_address_of_another_machine(
    tmp_path, console, expected
):
    from tests.conftest import Node, free_port

    port, metrics_port = free_port(), free_port()
    settings = {"enabled": True, "port": port, "metrics_port": metrics_port, **console}
    node = Node(tmp_path / "node", {"console": settings})
    expected = expected.replace("PORT", str(metrics_port if "metrics" in expected else port))
    result = serve_once(node)
    assert result.returncode == 1  # the address may come up later (a VIP, a late network): systemd tries again
    assert f"cannot start: {expected}" in result.stderr


def test_the_console_shows_and_offers_the_latest_runs_results(tmp_path):
    """After a re-run the results live in jobs/<id>/run-<N>/: its measurements, preview and files, not run 1's."""
    import json

    from db.models import Job
    from db.results import ResultFile, ResultKind
    from dicom_node.console.queries import preview_path, result_files, structures

    job_folder = tmp_path / "jobs" / "7"
    for folder, volume in ((job_folder, 1.0), (job_folder / "run-2", 2.0)):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "measurements.json").write_text(json.dumps({"structures": {"liver": {"volume_ml": volume}}}))
        (folder / "preview.png").write_bytes(b"png")
        (folder / "seg-binary.dcm").write_bytes(b"seg")
    job = Job(
        result_path=str(job_folder),
        result_files=[ResultFile(ResultKind.SEG, str(job_folder / "run-2" / "seg-binary.dcm"), "BINARY")],
    )

    assert [row["volume_ml"] for row in structures(job)] == [2.0]
    assert preview_path(job) == job_folder / "run-2" / "preview.png"
    assert result_files(job) == {
        "seg-binary.dcm": job_folder / "run-2" / "seg-binary.dcm",
        "measurements.json": job_folder / "run-2" / "measurements.json",
    }


@pytest.mark.parametrize("left", [b"", b"3f2a\n"])
def test_an_empty_or_short_kept_session_key_is_made_anew(tmp_path, caplog, left):
    """A node stopped between creating `console-secret` and writing it left an empty file, and the empty string
    became the key that signs the console's forms and notices: anyone could forge them."""
    import logging

    from dicom_node.config import ConsoleSettings
    from dicom_node.console.auth import session_secret

    (tmp_path / "console-secret").write_bytes(left)
    caplog.set_level(logging.WARNING)

    key = session_secret(ConsoleSettings(), tmp_path)

    assert len(key) == 64 and key == (tmp_path / "console-secret").read_bytes()
    assert (tmp_path / "console-secret").stat().st_mode & 0o777 == 0o600
    assert session_secret(ConsoleSettings(), tmp_path) == key  # kept from now on
    [record] = [r for r in caplog.records if r.getMessage() == "console.session_key_replaced"]
    said = "empty" if not left else "cut short"
    assert record.event_fields["reason"] == (
        f"the console's session key in {tmp_path / 'console-secret'} was {said}; a new key was made, so everyone "
        "logged in must log in again"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["console-secret"]  # no spare file left


def test_a_session_key_is_made_once_and_kept(tmp_path):
    from dicom_node.config import ConsoleSettings
    from dicom_node.console.auth import session_secret

    first = session_secret(ConsoleSettings(), tmp_path)
    assert len(first) == 64 and session_secret(ConsoleSettings(), tmp_path) == first
    assert (tmp_path / "console-secret").stat().st_mode & 0o777 == 0o600
