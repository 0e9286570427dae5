"""Refusals a caller can repeat at will (throttled logins, refused downloads, C-FINDs refused for the peer's role)
leave one audit record per caller each 10 s, counting the others, not a row (and a log line) each."""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]
from sqlalchemy import select

from db.models import AuditEvent
from dicom_node.logs import REPEATED_REFUSALS
from tests.conftest import Node, free_port, wait_for
from tests.console_helpers import PASSWORDS, console_settings, log_in

FIND = StudyRootQueryRetrieveInformationModelFind
PEERS = {
    "planner": {"ae_title": "PLANNER", "hosts": ["127.0.0.1"], "roles": ["move", "echo"]},
    "planner2": {"ae_title": "PLANNER2", "hosts": ["127.0.0.1"], "roles": ["move", "echo"]},
}
QUERIES_PER_MINUTE = 20


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Node, str]]:
    """A real node with its console (3 failed logins a minute; each test's client names its own address in
    X-Forwarded-For, as a proxy would) and two peers without the find role."""
    console_port = free_port()
    running = Node(
        tmp_path_factory.mktemp("floods") / "node",
        {
            "peers": PEERS,
            "retrieve": {"queries_per_minute_without_find": QUERIES_PER_MINUTE},
            "console": console_settings(console_port, login_attempts_per_minute=3, trust_forwarded_for=True),
        },
    ).start()
    url = f"http://127.0.0.1:{console_port}"

    def answers() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(answers, timeout=30, what="the console to answer")
        yield running, url
    finally:
        running.stop()


def _details(node: Node, action: str, like: str) -> list[str]:
    with node.sessions() as session:
        query = select(AuditEvent.detail).where(AuditEvent.action == action, AuditEvent.detail.like(like))
        return [str(detail) for detail in session.scalars(query.order_by(AuditEvent.id))]


def _logins(client: httpx.Client, user: str, times: int, node: Node) -> tuple[Counter[int], int]:
    """Send ``times`` logins with a wrong password (each answer's fresh form token reused, as a script would);
    the statuses, and how many throttled-login records there were right after the first 429."""
    form = client.get("/login")
    statuses: Counter[int] = Counter()
    after_first = -1
    for _ in range(times):
        token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
        assert token is not None, form.text
        form = client.post("/login", data={"username": user, "password": "wrong", "next": "/", "csrf_token": token[1]})
        statuses[form.status_code] += 1
        if form.status_code == 429 and after_first < 0:
            after_first = len(_details(node, "console", "%login refused: too many failed logins%"))
    return statuses, after_first


def _broad_queries(node: Node, calling_ae: str, times: int) -> Counter[int]:
    """``times`` PatientName=* STUDY queries on one association; the final statuses."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    ae.add_requested_context(FIND)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    query = pydicom.Dataset()
    query.QueryRetrieveLevel, query.PatientName, query.StudyInstanceUID = "STUDY", "*", ""
    statuses: Counter[int] = Counter()
    for _ in range(times):
        statuses[int(list(assoc.send_c_find(query, FIND))[-1][0].Status)] += 1
    assoc.release()
    wait_for(lambda: _association_released(node, calling_ae), what=f"{calling_ae}'s association record")
    return statuses


def _association_released(node: Node, calling_ae: str) -> bool:
    with node.sessions() as session:
        query = select(AuditEvent.id).where(
            AuditEvent.action == "association", AuditEvent.peer_ae_title == calling_ae, AuditEvent.outcome == "released"
        )
        return session.scalars(query).first() is not None


def _find_records(node: Node, calling_ae: str) -> list[str]:
    with node.sessions() as session:
        query = select(AuditEvent.detail).where(AuditEvent.action == "find", AuditEvent.peer_ae_title == calling_ae)
        return [str(detail) for detail in session.scalars(query.order_by(AuditEvent.id))]


def test_throttled_logins_in_a_loop_leave_one_audit_record_the_first_at_once(node):
    running, url = node
    client = httpx.Client(base_url=url, timeout=30, headers={"X-Forwarded-For": "203.0.113.9"})
    statuses, after_first = _logins(client, "x", 40, running)

    assert statuses == {401: 3, 429: 37}
    assert after_first == 1, "the first throttled login is recorded at once"
    assert _details(running, "console", "%login refused: too many failed logins%") == [
        "user (a name that is no user): login refused: too many failed logins from 203.0.113.9"
    ]
    assert len(_details(running, "console", "%login failed: wrong user name or password%")) == 3


def test_refused_downloads_are_recorded_short_and_once_a_while(node):
    running, url = node
    viewer = httpx.Client(base_url=url, timeout=30)
    assert log_in(viewer, "vera", PASSWORDS["vera"]).status_code == 303
    name = "n" * 1900

    assert {viewer.get(f"/series/1.2.3/files/{name}").status_code for _ in range(30)} == {403}
    [detail] = _details(running, "console", "%download of%refused%")
    assert detail.startswith("user vera: download of 'nnnn") and detail.endswith(
        "... (1900 characters) of series 1.2.3 refused: role viewer"
    )
    assert len(detail) < 200


def test_refused_queries_count_against_the_budget_and_leave_one_line_and_record_per_reason(node):
    running, _url = node

    statuses = _broad_queries(running, "PLANNER", 2 * QUERIES_PER_MINUTE)

    assert statuses == {0x0124: QUERIES_PER_MINUTE, 0xA700: QUERIES_PER_MINUTE}  # refusals spend the budget too
    assert _find_records(running, "PLANNER") == ["STUDY level, 0 matches"]
    lines = [line for line in running.log().splitlines() if "query.refused" in line and "planner" in line]
    assert len(lines) == 2, lines  # one per reason: too broad, too many queries


def test_the_refusals_left_out_are_counted_in_the_next_record(node):
    running, url = node
    client = httpx.Client(base_url=url, timeout=30, headers={"X-Forwarded-For": "203.0.113.10"})
    statuses, _after_first = _logins(client, "olga", 8, running)
    assert _broad_queries(running, "PLANNER2", 5) == {0x0124: 5}
    assert _find_records(running, "PLANNER2") == ["STUDY level, 0 matches"]

    time.sleep(REPEATED_REFUSALS.seconds + 0.5)  # the window passes: the next refusal is recorded, with the count
    more, _ = _logins(client, "olga", 1, running)
    assert more == {429: 1}
    assert _broad_queries(running, "PLANNER2", 1) == {0x0124: 1}

    refused_as_olga = _details(running, "console", "user olga: login refused: too many failed logins%")
    assert len(refused_as_olga) == 2
    assert refused_as_olga[1].endswith(
        f"; {statuses[429] - 1} more such logins were refused since the previous record, not recorded one by one"
    )
    assert _find_records(running, "PLANNER2") == [
        "STUDY level, 0 matches",
        "STUDY level, 0 matches; 4 more refused C-FIND requests of this peer since the previous record, "
        "not recorded one by one",
    ]


def _association_records(node: Node, calling_ae: str) -> list[tuple[str, str | None]]:
    """The aborted associations' records of ``calling_ae`` (other tests' released ones left out)."""
    with node.sessions() as session:
        query = select(AuditEvent.outcome, AuditEvent.detail).where(
            AuditEvent.action == "association", AuditEvent.peer_ae_title == calling_ae, AuditEvent.outcome == "aborted"
        )
        return [(str(outcome), detail) for outcome, detail in session.execute(query.order_by(AuditEvent.id))]


def test_associations_opened_and_aborted_in_a_loop_leave_one_record_each_10_seconds(node):
    """A caller that opens an association and aborts it at once, 30 times: one audit record and one
    association.aborted line (not 30 of each); an association that makes a request keeps a record of its own."""
    running, _url = node
    ae = AE(ae_title="PLANNER2")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    ae.add_requested_context(FIND)
    for _ in range(30):
        assoc = ae.associate("127.0.0.1", running.port, ae_title=running.ae_title)
        assert assoc.is_established
        assoc.abort()
    busy = ae.associate("127.0.0.1", running.port, ae_title=running.ae_title)
    query = pydicom.Dataset()
    query.QueryRetrieveLevel, query.PatientID, query.StudyInstanceUID = "STUDY", "NOBODY", ""
    assert list(busy.send_c_find(query, FIND))  # answered (refused for its role: what matters is the request)
    busy.abort()

    wait_for(lambda: len(_association_records(running, "PLANNER2")) >= 2, what="the association records")
    records = _association_records(running, "PLANNER2")
    assert [outcome for outcome, _detail in records] == ["aborted", "aborted"], records
    assert records[0][1] is not None and records[0][1].startswith("no request was made; PLANNER2 at 127.0.0.1")
    assert records[1][1] is not None and not records[1][1].startswith("no request was made")
    aborted_lines = [
        line for line in running.log().splitlines() if "association.aborted" in line and "PLANNER2" in line
    ]
    assert len(aborted_lines) == 2, aborted_lines  # the first of the 30, and the one that made a request
