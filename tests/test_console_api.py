"""The console's JSON API, login, roles and CSRF against a real node that processed a phantom series."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pydicom
import pytest
from sqlalchemy import select, update

from db.jobs import job_for_series_uid, mark_complete
from db.models import AuditEvent, Instance, JobState, Series, Study
from db.session import transaction
from dicom_node.phantom import PhantomSpec, write_phantom_series
from tests.conftest import Node, free_port, storescu, wait_for
from tests.console_helpers import (
    METRICS_TOKEN,
    SMALL_PHANTOM,
    ConsoleNode,
    _answers,
    console_node,
    console_settings,
    log_in,
    send_phantom,
)

pytestmark = pytest.mark.integration

GET_ENDPOINTS = [
    "/api/me",
    "/api/jobs",
    "/api/jobs/{uid}",
    "/api/rejected",
    "/api/destinations",
    "/api/audit",
    "/api/config",
    "/api/metrics/summary",
    "/api/openapi.json",
]
PAGES = [
    "/",
    "/worklist/rows",
    "/series/{uid}",
    "/series/{uid}/preview.png",
    "/series/{uid}/files/seg-binary.dcm",
    "/rejected",
    "/destinations",
    "/config",
    "/audit",
]
OPERATOR_POSTS = [
    "/api/jobs/{uid}/retry",
    "/api/jobs/{uid}/cancel",
    "/api/jobs/{uid}/reroute",
    "/api/destinations/pacs/echo",
]


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ConsoleNode, str]]:
    """A node whose console is on, after one phantom series went RECEIVING -> DONE (sent to its PACS)."""
    workdir = tmp_path_factory.mktemp("console-api")
    with console_node(workdir, login_attempts_per_minute=3) as running:
        series = send_phantom(running.node, workdir / "ct")
        running.node.wait_for_state(series.series_instance_uid, JobState.DONE, timeout=180)
        yield running, series.series_instance_uid


def test_healthz_answers_without_login_and_readyz_checks_database_scp_and_worker(processed):
    running, _uid = processed
    anonymous = running.client()
    assert anonymous.get("/healthz").json() == {"status": "ok"}
    ready = anonymous.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "ready": True,
        "checks": {"database": True, "scp": True, "receiver": None, "worker": True, "storage": True},
        "reasons": [],
    }


def test_nothing_else_works_without_login(processed):
    running, uid = processed
    anonymous = running.client()
    for path in GET_ENDPOINTS:
        response = anonymous.get(path.format(uid=uid))
        assert response.status_code == 401, path
        assert response.json() == {"detail": "log in first"}
    for path in PAGES:
        response = anonymous.get(path.format(uid=uid))
        assert response.status_code == 303 and response.headers["location"].startswith("/login?next="), path
    for path in [*OPERATOR_POSTS, "/series/{uid}/retry", "/logout"]:
        assert anonymous.post(path.format(uid=uid), json={}).status_code == 401, path
    assert anonymous.get("/metrics").status_code == 401


def test_session_cookie_is_httponly_strict_signed_and_a_forged_one_is_refused(processed):
    running, _uid = processed
    client = running.client()
    response = log_in(client, "vera", "viewer-password")
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Max-Age=28800" in cookie
    assert "Secure" not in cookie  # plain HTTP on loopback; HTTPS adds Secure
    assert "viewer-password" not in cookie
    value = client.cookies["dicom_node_session"]
    payload, signature = value.rsplit(".", 1)
    forged = httpx.Client(base_url=running.url, cookies={"dicom_node_session": f"{payload}.{'0' * len(signature)}"})
    assert forged.get("/api/me").status_code == 401
    assert client.get("/api/me").json()["role"] == "viewer"


def test_a_login_not_sent_from_the_consoles_own_form_is_refused(processed):
    running, _uid = processed
    client = running.client()
    bare = client.post("/login", data={"username": "vera", "password": "viewer-password"})
    assert bare.status_code == 403 and "The login form expired or came from another page" in bare.text
    client.get("/login")  # a login cookie of its own, but a token made up
    forged = client.post("/login", data={"username": "vera", "password": "viewer-password", "csrf_token": "0" * 64})
    assert forged.status_code == 403 and "dicom_node_session" not in client.cookies


def test_login_follows_only_paths_on_this_console(processed):
    running, _uid = processed
    response = log_in(running.client(), "vera", "viewer-password", next_path="//evil.example/")
    assert response.status_code == 303 and response.headers["location"] == "/"


def test_viewer_lists_jobs_without_patient_details_and_operator_sees_them(processed):
    running, uid = processed
    listed = running.client("vera").get("/api/jobs").json()
    assert listed["total"] >= 1
    job = next(j for j in listed["jobs"] if j["series_instance_uid"] == uid)
    assert job["state"] == "DONE" and job["model"] == "baseline" and job["images_received"] == 24
    assert job["delivery"] == ["pacs 2/2"]
    assert job["stage_seconds"]["infer"] > 0 and job["stage_seconds"]["encode"] > 0
    assert "patient" not in job
    operator_view = running.client("olga").get("/api/jobs", params={"search": uid}).json()
    assert operator_view["total"] == 1 and "patient_id" in operator_view["jobs"][0]["patient"]


def test_job_filters_and_paging(processed):
    running, _uid = processed
    client = running.client("vera")
    assert client.get("/api/jobs", params={"state": "FAILED"}).json()["total"] == 0
    assert client.get("/api/jobs", params={"rule": "ct", "destination": "pacs"}).json()["total"] >= 1
    assert client.get("/api/jobs", params={"search": "1.2.3.4.5"}).json()["total"] == 0
    assert client.get("/api/jobs", params={"state": "NOT-A-STATE"}).status_code == 422
    page = client.get("/api/jobs", params={"per_page": 1, "page": 1}).json()
    assert len(page["jobs"]) == 1 and page["pages"] == page["total"]


def test_one_job_has_timeline_structures_files_and_delivery(processed):
    running, uid = processed
    detail = running.client("vera").get(f"/api/jobs/{uid}").json()
    assert [e["to_state"] for e in detail["events"]][:6] == [
        "RECEIVING",
        "COMPLETE",
        "QUEUED",
        "PROCESSING",
        "SENDING",
        "DONE",
    ]
    names = {s["name"] for s in detail["structures"]}
    assert {"body", "lung_left", "lung_right"} <= names
    lung = next(s for s in detail["structures"] if s["name"] == "lung_left")
    assert lung["volume_ml"] > 0 and lung["mean_hu"] < -700
    assert {"seg-binary.dcm", "sr-binary.dcm", "measurements.json"} <= {f["name"] for f in detail["files"]}
    assert detail["has_preview"] is True
    assert detail["deliveries"] == [
        {
            "destination": "pacs",
            "files_total": 2,
            "files_delivered": 2,
            "attempts": 1,
            "last_error": None,
            "delivered_at": detail["deliveries"][0]["delivered_at"],
            "next_attempt_at": None,
            "unreachable_since": None,
        }
    ]
    assert running.client("vera").get("/api/jobs/1.2.3.999").status_code == 404


def test_viewer_is_refused_every_operator_action_and_downloads(processed):
    running, uid = processed
    viewer = running.client("vera")
    token = running.csrf(viewer)
    for path in OPERATOR_POSTS:
        response = viewer.post(path.format(uid=uid), json={"rule": "ct"}, headers={"X-CSRF-Token": token})
        assert response.status_code == 403, path
        assert response.json()["detail"] == "vera is a viewer; this needs the operator role"
    assert viewer.get(f"/series/{uid}/files/seg-binary.dcm").status_code == 403
    assert running.node.job_state(uid) is JobState.DONE
    # each attempt is the audit trail's: the first in the trail, the rest within 10 s counted in the next record
    first = (
        f"user vera: POST {OPERATOR_POSTS[0].format(uid=uid)} refused: vera is a viewer; this needs the operator role"
    )
    assert first in _refused_details(running)


def _refused_details(running) -> list[str]:
    with running.node.sessions() as session:
        return list(
            session.scalars(
                select(AuditEvent.detail).where(AuditEvent.action == "console", AuditEvent.outcome == "refused")
            )
        )


def test_operator_actions_need_the_sessions_csrf_token(processed):
    running, uid = processed
    operator = running.client("olga")
    missing = operator.post(f"/api/jobs/{uid}/retry")
    assert missing.status_code == 403 and "CSRF" in missing.json()["detail"]
    wrong = operator.post(f"/api/jobs/{uid}/retry", headers={"X-CSRF-Token": "0" * 64})
    assert wrong.status_code == 403
    other_session = running.csrf(running.client("olga"))  # a token of another session of the same user
    assert operator.post(f"/api/jobs/{uid}/retry", headers={"X-CSRF-Token": other_session}).status_code == 403
    form = operator.post(f"/series/{uid}/cancel", data={"csrf_token": "forged"})
    assert form.status_code == 403
    assert running.node.job_state(uid) is JobState.DONE
    assert (
        f"user olga: POST /api/jobs/{uid}/retry refused: missing or wrong CSRF token: send the page's csrf_token "
        "field or the X-CSRF-Token header"
    ) in _refused_details(running)


def test_operator_downloads_a_result_and_the_download_is_audited(processed):
    running, uid = processed
    response = running.client("olga").get(f"/series/{uid}/files/seg-binary.dcm")
    assert response.status_code == 200 and response.content[128:132] == b"DICM"
    assert running.client("olga").get(f"/series/{uid}/files/..%2Fdicom-node.db").status_code == 404
    with running.node.sessions() as session:
        details = session.scalars(select(AuditEvent.detail).where(AuditEvent.action == "console")).all()
    assert f"user olga: downloaded seg-binary.dcm of series {uid}" in details
    assert f"user vera: download of seg-binary.dcm of series {uid} refused: role viewer" in details


def test_cancel_of_a_finished_series_is_refused_with_the_reason(processed):
    running, uid = processed
    operator = running.client("olga")
    response = operator.post(f"/api/jobs/{uid}/cancel", headers={"X-CSRF-Token": running.csrf(operator)})
    assert response.status_code == 409
    assert response.json()["detail"] == (
        "cannot cancel: series is DONE; only COMPLETE, PROCESSING, QUEUED, SENDING series can be cancelled"
    )


def test_reroute_to_an_unknown_rule_is_refused_naming_the_rules(processed):
    running, uid = processed
    operator = running.client("olga")
    response = operator.post(
        f"/api/jobs/{uid}/reroute", json={"rule": "nope"}, headers={"X-CSRF-Token": running.csrf(operator)}
    )
    assert response.status_code == 422
    assert response.json()["detail"] == "cannot re-route: 'nope' is not a processing rule (known: ct, ct-local)"


def test_operator_reroutes_then_retries_and_both_are_recorded_with_the_user(processed):
    running, uid = processed
    operator = running.client("olga")
    token = running.csrf(operator)
    shown = operator.get(f"/api/jobs/{uid}").json()
    rerouted = operator.post(
        f"/api/jobs/{uid}/reroute?expected_version={shown['version']}",
        json={"rule": "ct-local"},
        headers={"X-CSRF-Token": token},
    )
    assert rerouted.status_code == 200 and rerouted.json() == {"state": "QUEUED"}
    running.node.wait_for_state(uid, JobState.DONE, timeout=180)
    # A second operator's page, shown before that re-route, sees DONE as before: its re-route or run again would
    # process the series a third time. The version it was shown with tells the two DONEs apart.
    stale_reroute = operator.post(
        f"/api/jobs/{uid}/reroute?expected_version={shown['version']}",
        json={"rule": "ct-local"},
        headers={"X-CSRF-Token": token},
    )
    stale_run_again = operator.post(
        f"/api/jobs/{uid}/retry?expected_state=DONE&expected_version={shown['version']}",
        headers={"X-CSRF-Token": token},
    )
    stale_form = operator.post(
        f"/series/{uid}/reroute", data={"csrf_token": token, "rule": "ct-local", "version": str(shown["version"])}
    )
    form_notice = operator.get(stale_form.headers["location"]).text
    current_page = operator.get(f"/series/{uid}").text
    assert stale_reroute.status_code == 409 and stale_run_again.status_code == 409
    assert stale_reroute.json()["detail"].startswith(
        "cannot re-route: the series changed since it was shown (it is DONE"
    )
    assert stale_reroute.json()["detail"].endswith("look at it again first")
    assert stale_run_again.json()["detail"].startswith("cannot retry: the series changed since it was shown")
    assert "cannot re-route: the series changed since it was shown" in form_notice
    now = operator.get(f"/api/jobs/{uid}").json()["version"]
    assert now != shown["version"] and f'name="version" value="{now}"' in current_page
    # A retry decided on the series as it was before (FAILED while sending: resend the missing files), arriving
    # once another retry had made it DONE, would process it again and send PACS a second set of results.
    stale = operator.post(f"/api/jobs/{uid}/retry?expected_state=FAILED", headers={"X-CSRF-Token": token})
    stale_page = operator.post(f"/series/{uid}/retry", data={"csrf_token": token, "state": "FAILED"})
    shown_after = operator.get(stale_page.headers["location"]).text
    retried = operator.post(f"/api/jobs/{uid}/retry?expected_state=DONE", headers={"X-CSRF-Token": token})
    assert stale.status_code == 409
    assert stale.json()["detail"] == (
        "cannot retry: the series is DONE now, not FAILED as when it was shown (another retry or the node changed "
        "it meanwhile); look at it again before retrying"
    )
    assert stale_page.status_code == 303 and "the series is DONE now, not FAILED as when it was shown" in shown_after
    assert retried.status_code == 200 and retried.json() == {"state": "COMPLETE"}
    running.node.wait_for_state(uid, JobState.DONE, timeout=180)
    with running.node.sessions() as session:
        job = job_for_series_uid(session, uid)
        reasons = [e.reason for e in job.events]
        assert job.rule_name == "ct" and job.destinations == ["pacs"]  # retry routed it by the rules again
        details = session.scalars(select(AuditEvent.detail).where(AuditEvent.action == "console")).all()
    assert "re-route to rule 'ct-local', model 'baseline' requested by olga" in reasons
    assert "retry requested by olga (was DONE)" in reasons
    assert f"user olga: re-route of series {uid}: now QUEUED" in details
    assert f"user olga: retry of series {uid}: now COMPLETE" in details


def test_reroute_runs_the_guard_and_admission_again_before_queueing(processed, tmp_path):
    """A re-route picks the rule and model, never the checks: an MR series or one that now fails admission stays put."""
    running, _uid = processed
    operator = running.client("olga")
    token = running.csrf(operator)
    mr = send_phantom(running.node, tmp_path / "mr", replace(SMALL_PHANTOM, modality="MR"))
    running.node.wait_for_state(mr.series_instance_uid, JobState.IGNORED, timeout=60)
    ct = send_phantom(running.node, tmp_path / "ct")
    running.node.wait_for_state(ct.series_instance_uid, JobState.DONE, timeout=180)
    with running.node.sessions() as session:
        stored = session.scalars(
            select(Instance.path)
            .join(Series, Instance.series_id == Series.id)
            .where(Series.series_instance_uid == ct.series_instance_uid)
            .order_by(Instance.instance_number)
        ).first()
    assert stored is not None
    changed = pydicom.dcmread(stored)
    changed.PatientID = "SOMEONE-ELSE"  # as if the file had been swapped under the node
    changed.save_as(stored)

    refused_mr = operator.post(
        f"/api/jobs/{mr.series_instance_uid}/reroute", json={"rule": "ct"}, headers={"X-CSRF-Token": token}
    )
    refused_ct = operator.post(
        f"/api/jobs/{ct.series_instance_uid}/reroute", json={"rule": "ct-local"}, headers={"X-CSRF-Token": token}
    )

    assert refused_mr.status_code == 409
    assert refused_mr.json()["detail"] == (
        "cannot re-route: not processed: modality MR is not CT; only CT series are processed"
    )
    assert refused_ct.status_code == 409
    assert refused_ct.json()["detail"].startswith(
        "cannot re-route: not admitted: PatientID differs within the series: 1 of 24 instances (first: instance 1)"
    )
    assert "SOMEONE-ELSE" not in refused_ct.text
    assert running.node.job_state(mr.series_instance_uid) == JobState.IGNORED
    assert running.node.job_state(ct.series_instance_uid) == JobState.DONE
    with running.node.sessions() as session:
        details = session.scalars(
            select(AuditEvent.detail).where(AuditEvent.action == "console", AuditEvent.outcome == "refused")
        ).all()
    assert any(f"re-route of series {mr.series_instance_uid} refused: not processed" in d for d in details)


def test_destinations_echo_rejected_audit_config_summary_and_openapi(processed):
    running, _uid = processed
    operator = running.client("olga")
    echoed = operator.post("/api/destinations/pacs/echo", headers={"X-CSRF-Token": running.csrf(operator)})
    assert echoed.json() == {"destination": "pacs", "reachable": True}
    assert (
        operator.post("/api/destinations/nowhere/echo", headers={"X-CSRF-Token": running.csrf(operator)}).status_code
        == 404
    )
    viewer = running.client("vera")
    pacs = viewer.get("/api/destinations").json()[0]
    assert pacs["name"] == "pacs" and pacs["reachable"] is True
    assert pacs["last_echo"]["detail"].startswith("outgoing C-ECHO to destination pacs, requested by olga: success")
    assert pacs["last_success"]["detail"].startswith("job ") and pacs["last_error"] is None
    assert viewer.get("/api/rejected").json() == []
    actions = {row["action"] for row in viewer.get("/api/audit").json()}
    assert {"association", "store", "send", "echo", "console"} <= actions
    config = viewer.get("/api/config").json()
    assert config["console"]["users"]["olga"]["password_hash"] == "(hidden)"
    assert config["console"]["metrics_token"] == "(hidden)" and METRICS_TOKEN not in viewer.get("/config").text
    assert "$argon2" not in viewer.get("/config").text
    summary = viewer.get("/api/metrics/summary").json()
    assert summary["jobs"]["DONE"] >= 1 and summary["queue_depth"] == 0
    schema = viewer.get("/api/openapi.json").json()
    assert "/api/jobs/{series_instance_uid}/retry" in schema["paths"] and "/api/jobs" in schema["paths"]


def test_metrics_need_the_bearer_token(processed):
    running, _uid = processed
    anonymous = running.client()
    assert anonymous.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    scraped = anonymous.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert scraped.status_code == 200 and "dicom_node_jobs" in scraped.text


def test_logout_needs_csrf_and_ends_the_session_in_the_browser(processed):
    running, _uid = processed
    viewer = running.client("vera")
    assert viewer.post("/logout").status_code == 403
    response = viewer.post("/logout", data={"csrf_token": running.csrf(viewer)})
    assert response.status_code == 303 and 'dicom_node_session=""' in response.headers["set-cookie"]


def test_repeated_failed_logins_from_one_address_must_wait(processed):
    running, _uid = processed
    client = running.client()
    for _ in range(3):
        assert log_in(client, "olga", "guess").status_code == 401
    throttled = log_in(client, "olga", "operator-password")
    assert throttled.status_code == 429 and "Too many failed logins from this address" in throttled.text
    with running.node.sessions() as session:
        outcomes = session.scalars(
            select(AuditEvent.detail).where(AuditEvent.action == "console", AuditEvent.outcome == "refused")
        ).all()
    assert "user olga: login failed: wrong user name or password" in outcomes


def test_container_health_check_passes_on_a_ready_node(processed):
    running, _uid = processed
    health = subprocess.run(
        [sys.executable, "-m", "dicom_node.console.health"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "DICOM_NODE_CONFIG": str(running.node.config_path)},
    )
    assert health.returncode == 0, health.stdout + health.stderr
    assert json.loads(health.stdout) == {
        "ready": True,
        "checks": {"database": True, "scp": True, "receiver": None, "worker": True, "storage": True},
        "reasons": [],
    }


def _sent_without_expected_count(node: Node, folder: Path, spec: PhantomSpec) -> str:
    """Send a phantom series whose images say nothing of how many there are: it waits for the quiet period."""
    series = write_phantom_series(folder, replace(spec, images_in_acquisition=False))
    sent = storescu(node.port, series.files)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    return series.series_instance_uid


def test_a_series_refused_for_naming_another_patient_is_not_shown_under_its_studys_patient(tmp_path):
    """Two senders at once, each the first of a study: series of PAT-B (and of PAT-A under another name) were
    recorded under a study whose patient is PAT-A, Alpha^Ann; admission refused them, and the worklist and series
    page listed them with Alpha^Ann's name, ID, birth date and accession number, as her series."""
    console_port = free_port()
    node = Node(
        tmp_path / "node",
        {
            "rules": [{"name": "ct", "match": {"modality": "CT"}, "action": "process", "model": "baseline"}],
            "completion": {"quiet_seconds": 600},
            "console": console_settings(console_port),
        },
    ).start()
    try:
        running = ConsoleNode(node, f"http://127.0.0.1:{console_port}", 0, tmp_path)
        small = PhantomSpec(rows=32, columns=32, slices=3)
        other_id = _sent_without_expected_count(node, tmp_path / "b", replace(small, patient_id="PAT-B"))
        other_name = _sent_without_expected_count(
            node, tmp_path / "c", replace(small, seed=1, patient_id="PAT-A", patient_name="Other^Olive")
        )
        with transaction(node.sessions) as session:  # the other sender's series of PAT-A was recorded first
            session.execute(
                update(Study).values(
                    patient_id="PAT-A", patient_name="Alpha^Ann", patient_birth_date="19500101", accession_number="A1"
                )
            )
        wait_for(lambda: _answers(running.url), timeout=30, what="the console to answer")
        operator = running.client("olga")
        # Still being received (admission has not refused it yet): already not shown as Alpha^Ann's series.
        receiving = {job["series_instance_uid"]: job for job in operator.get("/api/jobs").json()["jobs"]}
        with transaction(node.sessions) as session:  # their quiet period is over: the watcher routes them
            for series_uid in (other_id, other_name):
                mark_complete(session, job_for_series_uid(session, series_uid), "no new instance for 600 s")
        node.wait_for_state(other_id, JobState.FAILED)
        node.wait_for_state(other_name, JobState.FAILED)

        jobs = {job["series_instance_uid"]: job for job in operator.get("/api/jobs").json()["jobs"]}
        worklist = operator.get("/worklist/rows").text
        page = operator.get(f"/series/{other_id}").text
        name_page = operator.get(f"/series/{other_name}").text
        viewer = running.client("vera").get(f"/series/{other_id}").text
    finally:
        node.stop()

    assert receiving[other_name]["state"] == "RECEIVING"
    assert receiving[other_name]["patient"]["another_patient"] == "names another patient (PatientID PAT-A)"
    assert receiving[other_name]["patient"]["another_patient_detail"].startswith("its PatientName differs")
    assert receiving[other_name]["patient"]["patient_name"] is None
    assert jobs[other_id]["patient"] == {
        "patient_name": None,
        "patient_id": "PAT-B",
        "patient_birth_date": None,
        "accession_number": None,
        "study_description": None,
        "another_patient": "refused: names another patient (PatientID PAT-B)",
        "another_patient_detail": (
            "its PatientID differs from its study's patient, so it is not shown as that patient's series, and the "
            "name and birth date its images carry are not shown"
        ),
    }
    assert jobs[other_name]["patient"]["another_patient"] == "refused: names another patient (PatientID PAT-A)"
    assert jobs[other_name]["patient"]["another_patient_detail"].startswith("its PatientName differs")
    assert jobs[other_name]["patient"]["patient_name"] is None
    assert "refused: names another patient (PatientID PAT-B)" in page
    assert "its PatientName differs from its study&#39;s patient" in name_page
    for shown in (worklist, page, name_page):
        assert "Alpha^Ann" not in shown and "19500101" not in shown and "A1<" not in shown
    assert worklist.count("refused: names another patient") == 2
    assert "PAT-B" not in viewer, viewer[viewer.find("PAT-B") - 300 :]  # viewers see no patient details, as before


def test_a_reroute_is_admitted_for_the_memory_of_the_model_it_chooses(tmp_path):
    """A series too large for `total_fast` under max_memory_gigabytes could not be re-routed to a lighter model, the
    obvious way out: the re-route was admitted against the largest footprint of every configured model, and the
    refusal quoted memory figures of a model nobody chose."""
    from db import jobs
    from db.ingest import InstanceRecord, SeriesAttributes, StudyAttributes, record_instance
    from dicom_node.config import Settings
    from dicom_node.console.app import ConsoleServer
    from dicom_node.console.metrics import Liveness
    from dicom_node.service import open_database
    from tests.console_helpers import PASSWORDS, SMALL_PHANTOM, console_settings, log_in

    port = free_port()
    process = {"match": {"modality": "CT"}, "action": "process", "destinations": []}
    settings = Settings(
        storage={"directory": str(tmp_path / "storage")},
        network={"port": free_port()},
        admission={"max_memory_gigabytes": 2.0},
        rules=[{"name": "full", **process, "model": "full"}, {"name": "light", **process, "model": "light"}],
        models={"full": {"kind": "totalsegmentator", "task": "total_fast"}, "light": {"kind": "threshold"}},
        console={**console_settings(port), "session_secret": "a-session-secret-for-tests-only-0123456789"},
    )
    sessions = open_database(settings)
    series = write_phantom_series(tmp_path / "ct", SMALL_PHANTOM)
    with transaction(sessions) as session:
        for number, path in enumerate(series.files, start=1):
            header = pydicom.dcmread(path, stop_before_pixels=True)
            study = StudyAttributes(series.study_instance_uid, patient_id=str(header.PatientID))
            record = InstanceRecord(
                sop_instance_uid=str(header.SOPInstanceUID),
                sop_class_uid=str(header.SOPClassUID),
                transfer_syntax_uid=str(header.file_meta.TransferSyntaxUID),
                path=str(path),
                size_bytes=path.stat().st_size,
                study=study,
                series=SeriesAttributes(series.series_instance_uid, modality="CT"),
                instance_number=number,
            )
            record_instance(session, record)
        job = job_for_series_uid(session, series.series_instance_uid)
        mark_complete(session, job, "quiet")
        jobs.queue(session, job, rule_name="full", model_name="full", destinations=[])
        jobs.change_state(session, job, JobState.FAILED, "admission refused: too large for total_fast")

    server = ConsoleServer(settings, sessions, Liveness(lambda: None, lambda: False))
    server.start()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{url}/healthz", timeout=1).status_code == 200, timeout=20, what="the console")
        with httpx.Client(base_url=url, timeout=30) as operator:
            assert log_in(operator, "olga", PASSWORDS["olga"]).status_code == 303
            token = operator.get("/api/me").json()["csrf_token"]

            def reroute(**body: str) -> httpx.Response:
                path = f"/api/jobs/{series.series_instance_uid}/reroute"
                return operator.post(path, json=body, headers={"X-CSRF-Token": token})

            refused = reroute(rule="full")
            assert refused.status_code == 409 and "over the 2.0 GB limit" in refused.json()["detail"], refused.text
            rerouted = reroute(model="light")
            assert rerouted.status_code == 200 and rerouted.json() == {"state": "QUEUED"}, rerouted.text
    finally:
        server.stop()
    with sessions() as session:
        assert job_for_series_uid(session, series.series_instance_uid).model_name == "light"
