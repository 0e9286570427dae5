"""Console answers made before any page handler runs carry the security headers too, and behind an HTTPS reverse
proxy the console's cookies are Secure and its answers carry HSTS (the download route's included).

Each test runs the real console (Uvicorn, a migrated database) in this process and talks to it over HTTP.
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dicom_node.config import Settings
from dicom_node.console.app import MAX_BODY_BYTES, ConsoleServer
from dicom_node.console.auth import SESSION_COOKIE
from dicom_node.console.metrics import Liveness
from dicom_node.service import open_database
from tests.conftest import free_port, wait_for
from tests.console_helpers import PASSWORDS, console_settings
from tests.test_console_auth import SEG_BYTES, _series_with_results

pytestmark = pytest.mark.integration

HTTPS_PROXY = {"X-Forwarded-Proto": "https"}
OLGA = {"X-Forwarded-User": "olga", "X-Forwarded-Role": "operator"}
HSTS = "strict-transport-security"


def _assert_security_headers(response: httpx.Response, *, no_store: bool = True) -> None:
    what = f"{response.request.method} {response.request.url.path} ({response.status_code})"
    assert response.headers.get("x-frame-options") == "DENY", what
    assert response.headers.get("x-content-type-options") == "nosniff", what
    assert response.headers.get("referrer-policy") == "same-origin", what
    assert "frame-ancestors 'none'" in response.headers.get("content-security-policy", ""), what
    if no_store:
        assert response.headers.get("cache-control") == "no-store", what


@pytest.fixture
def console(tmp_path: Path) -> Iterator[Callable[..., tuple[str, Settings]]]:
    """Start a console alone (no DICOM port) with ``console`` settings; its URL and settings."""
    servers: list[ConsoleServer] = []

    def start(verify: ssl.SSLContext | None = None, **console: Any) -> tuple[str, Settings]:
        """``verify``: the CA context of an HTTPS console (``tls_certificate``, ``tls_private_key``)."""
        port = free_port()
        settings = Settings(
            storage={"directory": str(tmp_path / f"storage{len(servers)}")},
            network={"port": free_port()},
            console={**console_settings(port), **console},
        )
        server = ConsoleServer(settings, open_database(settings), Liveness(lambda: None, lambda: False))
        server.start()
        servers.append(server)
        url = f"{'https' if verify else 'http'}://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(f"{url}/healthz", timeout=1, verify=verify or True).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout=20, what="the console to answer")
        return url, settings

    yield start
    for server in servers:
        server.stop()


def _session_cookie(response: httpx.Response) -> str:
    """The session cookie's Set-Cookie value in ``response``; fails when there is none."""
    found = [value for value in response.headers.get_list("set-cookie") if value.startswith(f"{SESSION_COOKIE}=")]
    assert len(found) == 1, response.headers.get_list("set-cookie")
    return found[0]


def test_every_early_answer_carries_the_security_headers(console):
    """The host check's 400 once had none of the headers every page carries."""
    url, _settings = console(allowed_hosts=["127.0.0.1"])
    client = httpx.Client(base_url=url, timeout=30, follow_redirects=False)

    rebound = client.get("/api/me", headers={"Host": "evil.example"})
    unknown = client.get("/no-such-page")
    wrong_method = client.delete("/healthz")
    too_large = client.post("/login", content=b"a" * (MAX_BODY_BYTES + 1))
    missing_static = client.get("/static/no-such-file.css")
    static = client.get("/static/console.css")
    not_logged_in = client.get("/api/jobs")

    assert [r.status_code for r in (rebound, unknown, wrong_method, too_large, missing_static, not_logged_in)] == [
        400,
        404,
        405,
        413,
        404,
        401,
    ]
    for response in (rebound, unknown, wrong_method, too_large, not_logged_in):
        _assert_security_headers(response)
    assert static.status_code == 200 and "body" in static.text
    for response in (static, missing_static):
        _assert_security_headers(response, no_store=False)  # the console's own stylesheet may be cached
    for response in (rebound, unknown, static, too_large):
        assert HSTS not in response.headers, "plain HTTP, no proxy saying otherwise: no HSTS"


def test_behind_an_https_proxy_answers_carry_hsts_and_login_cookies_are_secure(console):
    url, _settings = console()
    proxied = httpx.Client(base_url=url, timeout=30, follow_redirects=False, headers=HTTPS_PROXY)

    form = proxied.get("/login")
    assert form.status_code == 200 and form.headers[HSTS] == "max-age=31536000"
    login_cookie = form.headers["set-cookie"]
    assert "; Secure" in login_cookie and "HttpOnly" in login_cookie
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert token is not None
    data = {"username": "olga", "password": PASSWORDS["olga"], "next": "/", "csrf_token": token[1]}
    # the client's cookie jar keeps Secure cookies for HTTPS: send it as the browser on the proxy's far side does
    logged_in = proxied.post("/login", data=data, headers={"Cookie": login_cookie.split(";")[0]})
    assert logged_in.status_code == 303, logged_in.text
    assert "; Secure" in _session_cookie(logged_in) and logged_in.headers[HSTS] == "max-age=31536000"
    missing = proxied.get("/no-such-page")
    assert missing.status_code == 404 and missing.headers[HSTS] == "max-age=31536000"
    _assert_security_headers(missing)

    plain = httpx.Client(base_url=url, timeout=30, follow_redirects=False)
    for headers in ({}, {"X-Forwarded-Proto": "http"}, {"Forwarded": "for=192.0.2.1;proto=http"}):
        form = plain.get("/login", headers=headers)
        assert HSTS not in form.headers and "Secure" not in form.headers["set-cookie"], headers
    rfc_7239 = plain.get("/login", headers={"Forwarded": 'for="[2001:db8::1]";proto=https, for=10.0.0.1'})
    assert "; Secure" in rfc_7239.headers["set-cookie"] and rfc_7239.headers[HSTS] == "max-age=31536000"


def test_an_https_claim_from_an_address_that_is_no_trusted_proxy_counts_for_nothing(console):
    url, _settings = console(trusted_proxies=["10.9.9.9/32"])
    form = httpx.get(f"{url}/login", headers=HTTPS_PROXY)
    assert form.status_code == 200
    assert HSTS not in form.headers and "Secure" not in form.headers["set-cookie"]


def test_behind_an_https_sign_on_proxy_a_download_gets_a_secure_session_cookie_that_goes_on(console, tmp_path):
    """A result file served to a client without a session once lost the session opened for it: every download
    opened another one, and its cookie never had Secure behind an HTTPS proxy."""
    url, settings = console(auth="proxy_header")
    uid = _series_with_results(settings, tmp_path / "results")
    curl = httpx.Client(base_url=url, timeout=30, follow_redirects=False, headers={**OLGA, **HTTPS_PROXY})

    download = curl.get(f"/series/{uid}/files/seg-binary.dcm", headers={"Accept": "*/*"})
    assert download.status_code == 200 and download.content == SEG_BYTES
    cookie = _session_cookie(download)
    assert "; Secure" in cookie and "HttpOnly" in cookie and "samesite=lax" in cookie.lower()
    assert download.headers[HSTS] == "max-age=31536000"
    _assert_security_headers(download)

    again = curl.get(f"/series/{uid}/files/seg-binary.dcm", headers={"Cookie": cookie.split(";")[0]})
    assert again.status_code == 200 and again.content == SEG_BYTES
    assert "set-cookie" not in again.headers, "the session handed over goes on: no new one"

    browser = curl.get(f"/series/{uid}/files/seg-binary.dcm", headers={"Accept": "text/html,*/*;q=0.8"})
    assert browser.status_code == 303 and browser.headers["location"] == f"/series/{uid}/files/seg-binary.dcm"
    assert "; Secure" in _session_cookie(browser) and browser.headers[HSTS] == "max-age=31536000"

    api = curl.get("/api/me")
    assert api.status_code == 200 and "; Secure" in _session_cookie(api), "one cookie, from the API's own answer"
    refused = httpx.get(f"{url}/series/{uid}/files/seg-binary.dcm", headers={"X-Forwarded-Role": "operator"})
    assert refused.status_code == 303 and "set-cookie" not in refused.headers  # no user named: the login page


def test_a_path_with_a_trailing_slash_is_not_redirected_to_the_host_the_client_named(console):
    """Starlette's slash redirect answered ``Location: http://evil.example/api/jobs``, before any login."""
    url, _settings = console()
    for path in ("/api/jobs/", "/rejected/", "/login/"):
        answer = httpx.get(f"{url}{path}", headers={"Host": "evil.example"}, follow_redirects=False)
        assert answer.status_code == 404 and "location" not in answer.headers, path
        _assert_security_headers(answer)


def _half_requests(url: str, count: int) -> list[socket.socket]:
    """``count`` connections that each send half a request (no blank line ending its headers), as a slow-loris
    client does to hold a server's file handles."""
    port = int(url.rsplit(":", 1)[1])
    held = []
    for _ in range(count):
        connection = socket.create_connection(("127.0.0.1", port), timeout=30)
        connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        held.append(connection)
    return held


def _closed_by_the_console(connection: socket.socket) -> bool:
    try:
        return connection.recv(1024) == b""  # waits for the console to close it (the socket's timeout as safety)
    except ConnectionResetError:
        return True
    finally:
        connection.close()


@pytest.mark.parametrize(
    ("limits", "refusal"),
    [
        ({"max_connections_per_address": 3}, "the console holds 3 connections from that address, its limit"),
        ({"max_connections": 3}, "the console holds 3 connections, its limit (console.max_connections)"),
    ],
    ids=["per-address", "in-all"],
)
def test_idle_connections_sending_half_a_request_are_bounded_and_closed_in_time(console, caplog, limits, refusal):
    """A client that opened a thousand connections and sent half a request on each held every file handle of
    serve: stored images could no longer be opened and a series PACS had been told was stored was failed."""
    caplog.set_level(logging.INFO, logger="dicom_node.console.connections")
    url, _settings = console(request_seconds=1.5, **limits)

    held = _half_requests(url, 5)

    assert all(_closed_by_the_console(connection) for connection in held)
    events = [(record.msg, record.event_fields) for record in caplog.records]
    refused = [fields["reason"] for event, fields in events if event == "console.connection_refused"]
    too_slow = [fields["reason"] for event, fields in events if event == "console.request_too_slow"]
    assert len(refused) == 2 and all(refusal in reason for reason in refused), refused
    assert refused[0].startswith("a connection from 127.0.0.1 was closed at once: ")
    assert too_slow == ["no whole request arrived within 1.5 s (console.request_seconds); the connection is closed"] * 3
    with httpx.Client(timeout=10) as client:  # a whole request is answered, and the next on the same connection
        assert [client.get(f"{url}/healthz").status_code for _ in range(2)] == [200, 200]


def test_an_https_console_counts_connections_before_their_tls_handshake_and_ends_silent_ones_in_time(
    console, caplog, certificates
):
    """Uvicorn's TLS counted a connection only once its handshake was over, and waited 60 s for it: TCP
    connections that never began TLS were neither bounded nor closed in time, and again held every file handle."""
    caplog.set_level(logging.INFO, logger="dicom_node.console.connections")
    trusting = ssl.create_default_context(cafile=str(certificates.ca))
    url, _settings = console(
        verify=trusting,
        request_seconds=1.5,
        max_connections_per_address=3,
        tls_certificate=str(certificates.node),
        tls_private_key=str(certificates.node_key),
    )
    port = int(url.rsplit(":", 1)[1])

    silent = [socket.create_connection(("127.0.0.1", port), timeout=15) for _ in range(5)]
    assert all(_closed_by_the_console(connection) for connection in silent)
    plain = httpx.Client(timeout=10)
    with pytest.raises(httpx.HTTPError):
        plain.get(f"http://127.0.0.1:{port}/healthz")

    def events(name: str) -> list[str]:
        return [record.event_fields["reason"] for record in caplog.records if record.msg == name]

    wait_for(lambda: len(events("console.tls_handshake_failed")) == 4, timeout=10, what="the plain request's log")
    refused, failed = events("console.connection_refused"), events("console.tls_handshake_failed")
    too_many = "the console holds 3 connections from that address, its limit (console.max_connections_per_address)"
    assert refused == [f"a connection from 127.0.0.1 was closed at once: {too_many}"] * 2
    silent_reason = (
        "the TLS handshake with 127.0.0.1 did not finish within 1.5 s (console.request_seconds); the connection is "
        "closed"
    )
    assert failed[:3] == [silent_reason] * 3
    assert failed[3:] == [
        "the TLS handshake with 127.0.0.1 failed (the client may not speak HTTPS, or did not accept the console's "
        "certificate); the connection is closed"
    ]
    with httpx.Client(timeout=10, verify=trusting) as client:  # HTTPS still answers, twice on one connection
        answers = [client.get(f"{url}/healthz") for _ in range(2)]
    assert [a.status_code for a in answers] == [200, 200] and answers[0].url.scheme == "https"
