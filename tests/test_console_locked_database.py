"""The console on an SQLite database another process holds locked past the busy timeout: pages, the API's reads,
metrics and readiness still answer (they read as WAL readers, taking no write lock); every operator action answers
503 with Retry-After and a sentence saying the database is busy, logged in one line, no traceback.

The real console (Uvicorn, a migrated SQLite file) runs in this process; the lock is a ``BEGIN IMMEDIATE`` of
Python's own sqlite3 module on the same file, as any other process' writer holds it.
"""

from __future__ import annotations

import html
import logging
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import httpx
import pytest

from db import jobs
from db.ingest import record_instance
from db.models import JobState
from db.session import transaction
from dicom_node.config import Settings
from dicom_node.console.app import ConsoleServer
from dicom_node.console.metrics import Liveness
from dicom_node.service import open_database
from dicom_node.storage_lock import StorageLock, database_identity
from tests.conftest import ct_instance, drive_job_to, free_port, wait_for
from tests.console_helpers import PASSWORDS, console_settings, log_in

pytestmark = pytest.mark.integration

SERIES = "1.2.826.0.1.3680043.99.35.1"
BUSY = "The node's database is busy: another process held it locked for longer than the console waits"

PAGES = ["/", "/worklist/rows", f"/series/{SERIES}", "/rejected", "/destinations", "/audit"]
API = [
    "/api/jobs",
    f"/api/jobs/{SERIES}",
    "/api/rejected",
    "/api/destinations",
    "/api/audit",
    "/api/metrics/summary",
]
ACTIONS = [f"/series/{SERIES}/{verb}" for verb in ("retry", "cancel", "reroute")]
API_ACTIONS = [f"/api/jobs/{SERIES}/{verb}" for verb in ("retry", "cancel", "reroute")]


@contextmanager
def _console(tmp_path: Path) -> Iterator[tuple[str, Settings]]:
    """The console alone, on a database whose writes wait 0.2 s for another process' lock; one FAILED series."""
    settings = Settings(
        storage={"directory": str(tmp_path / "storage")},
        network={"port": free_port()},
        database={"busy_timeout_seconds": 0.2},
        rules=[{"name": "ct", "match": {"modality": "CT"}, "action": "process", "model": "baseline"}],
        destinations={"pacs": {"ae_title": "PACSSCP", "host": "127.0.0.1", "port": free_port()}},
        console=console_settings(free_port()),
    )
    sessions = open_database(settings)
    with transaction(sessions) as session:
        record_instance(session, ct_instance(SERIES + ".1", SERIES, study_instance_uid=SERIES + ".0"))
        job = jobs.job_for_series_uid(session, SERIES)
        assert job is not None
        drive_job_to(session, job, JobState.FAILED)
    storage = settings.storage.directory
    (storage / "incoming").mkdir(parents=True, exist_ok=True)  # as serve leaves it: /readyz tries it
    StorageLock(storage, database_identity(settings.database_url, storage), "test").record_database()
    server = ConsoleServer(settings, sessions, Liveness(lambda: None, lambda: True))
    server.start()
    url = f"http://127.0.0.1:{settings.console.port}"
    try:
        wait_for(lambda: _answers(url), timeout=20, what="the console to answer")
        yield url, settings
    finally:
        server.stop()


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def _locked(database: Path) -> Iterator[None]:
    """Another writer holding the SQLite file's write lock."""
    with closing(sqlite3.connect(database, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            other.execute("ROLLBACK")


def _post(client: httpx.Client, path: str, token: str) -> httpx.Response:
    if path.startswith("/api/"):
        return client.post(path, headers={"X-CSRF-Token": token}, json={"model": "baseline"})
    return client.post(path, data={"csrf_token": token, "model": "baseline"})


def test_pages_answer_and_actions_say_the_database_is_busy_while_another_process_holds_it_locked(tmp_path, caplog):
    """Both answered 500 with a traceback in the log, and readiness said the database was unreachable. (Login,
    logout and C-ECHO write only an audit record, which waits for the lock and is given up with a log line: they
    are not asked here.)"""
    caplog.set_level(logging.INFO)
    with _console(tmp_path) as (url, settings):
        operator = httpx.Client(base_url=url, timeout=30, follow_redirects=False)
        assert log_in(operator, "olga", PASSWORDS["olga"]).status_code == 303
        token = str(operator.get("/api/me").json()["csrf_token"])
        for path in PAGES + API:  # each view is audited once a while: seen now, it is not audited again below
            assert operator.get(path).status_code == 200, path
        caplog.clear()

        with _locked(settings.storage.directory / "dicom-node.db"):
            views = {path: operator.get(path) for path in PAGES + API}
            answers = {path: _post(operator, path, token) for path in ACTIONS + API_ACTIONS}
            no_database = {path: operator.get(path).status_code for path in ("/api/me", "/config", "/healthz")}
            ready = operator.get("/readyz")

        assert {path: view.status_code for path, view in views.items()} == dict.fromkeys(PAGES + API, 200)
        assert SERIES in views[f"/api/jobs/{SERIES}"].text and "FAILED" in views[f"/api/jobs/{SERIES}"].text
        assert ready.status_code == 200 and ready.json()["checks"]["database"] is True, ready.text
        for path, answer in answers.items():
            assert answer.status_code == 503, (path, answer.status_code, answer.text[:300])
            assert answer.headers["retry-after"] == "1", path
            said = answer.json()["detail"] if path.startswith("/api/") else html.unescape(answer.text)
            assert BUSY in said and "(database.busy_timeout_seconds, 0.2 s)." in said and "try again" in said, path
            assert "Traceback" not in said and "OperationalError" not in said, path
            if answer.request.method == "POST":
                assert "Nothing was changed." in said, path
        assert no_database == {"/api/me": 200, "/config": 200, "/healthz": 200}
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info] == []
        busy = [r for r in caplog.records if r.getMessage() == "console.database_busy"]
        assert len(busy) == len(answers)
        reason = getattr(busy[-1], "event_fields", {})["reason"]
        assert reason == (
            f"the console could not answer POST /api/jobs/{SERIES}/reroute: another process held the database locked "
            "for longer than the console waits (database.busy_timeout_seconds, 0.2 s); the user was asked to try again"
        )

        # The lock gone, the same console answers again and the action is made.
        assert operator.get(f"/series/{SERIES}").status_code == 200
        retried = operator.post(f"/api/jobs/{SERIES}/retry", headers={"X-CSRF-Token": token})
        assert retried.status_code == 200 and retried.json() == {"state": "COMPLETE"}
