"""A monitoring system's C-ECHOs and a peer's refused requests in a loop leave one audit record and one log line per
peer each 10 s, counting the others; counts still open are written when the node stops; and audit records older
than ``retention.audit_days`` are deleted."""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import event, select
from sqlalchemy.orm import Session, sessionmaker

from db.models import AuditEvent, as_utc, utcnow
from db.session import transaction
from dicom_node import audit, retention
from dicom_node.config import Settings
from dicom_node.retention import RetentionTask
from dicom_node.security import PeerPolicy, require_role
from dicom_node.service import open_database
from tests.conftest import Node, free_port, require_tool, wait_for
from tests.console_helpers import console_settings

PEERS = {
    "monitor": {"ae_title": "MONITOR", "hosts": ["127.0.0.1"], "roles": ["echo"]},
    "planner": {"ae_title": "PLANNER", "hosts": ["127.0.0.1"], "roles": ["get", "move"]},  # no broad queries
}
LEFT_OUT = "since the previous record, not recorded one by one"


@pytest.fixture
def node(tmp_path) -> Iterator[Node]:
    """A real node with its console on (its stop writes the counts still open) and two peers: one that may only
    echo, one that may only retrieve."""
    running = Node(tmp_path / "node", {"peers": PEERS, "console": console_settings(free_port())}).start()
    try:  # the DICOM port listens first; a stop before the rest has started would end the process unhandled
        wait_for(lambda: "node.ready" in running.log(), timeout=60, what="the node to finish starting")
        yield running
    finally:
        running.stop()


def _dcmtk(tool: str, node: Node, calling_ae: str, *args: str) -> str:
    """Run a DCMTK tool against the node; its output."""
    command = [require_tool(tool), "-v", "-aet", calling_ae, "-aec", node.ae_title, "127.0.0.1", str(node.port)]
    result = subprocess.run([*command, *args], capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert "Association Accepted" in output, output
    return output


def _echo(node: Node, calling_ae: str) -> None:
    assert "Received Echo Response (Success)" in _dcmtk("echoscu", node, calling_ae)


def _broad_query(node: Node, calling_ae: str) -> None:
    """A STUDY-level C-FIND on every patient name, which a peer without the find role is refused."""
    query = ["-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientName=*", "-k", "StudyInstanceUID"]
    assert "Final Find Response (Unknown Status: 0x124)" in _dcmtk("findscu", node, calling_ae, *query)


def _details(sessions: sessionmaker[Session], action: str, peer_ae: str | None = None) -> list[str | None]:
    with sessions() as session:
        query = select(AuditEvent.detail).where(AuditEvent.action == action)
        if peer_ae is not None:
            query = query.where(AuditEvent.peer_ae_title == peer_ae)
        return list(session.scalars(query.order_by(AuditEvent.id)))


@pytest.mark.integration
def test_a_monitoring_system_echoing_in_a_loop_leaves_one_record_per_10_s_counting_the_others(node):
    for _ in range(5):
        _echo(node, "MONITOR")
    assert _details(node.sessions, "echo", "MONITOR") == [None]

    time.sleep(audit.REPEAT_SECONDS + 0.5)  # the window passes: the next one is written, counting those left out
    _echo(node, "MONITOR")

    assert _details(node.sessions, "echo", "MONITOR") == [None, f"4 more C-ECHO requests of this peer {LEFT_OUT}"]


@pytest.mark.integration
def test_requests_refused_for_a_missing_role_leave_one_log_line_per_peer_each_10_s_with_a_count(caplog):
    """The node's own negotiation gives a peer no context for a service it lacks the role for; behind it, a request
    that still comes is refused (0x0124) and logged. A pynetdicom SCP guarded that way alone, called by echoscu."""
    policy = PeerPolicy.from_settings(
        Settings(peers={"sender": {"ae_title": "NOECHO", "hosts": ["127.0.0.1"], "roles": ["store"]}})
    )
    ae = AE(ae_title="GUARDED")
    ae.add_supported_context(Verification)
    port = free_port()
    handler = require_role("echo", policy, lambda _event: 0x0000)
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_ECHO, handler)])

    def echo() -> str:
        command = [require_tool("echoscu"), "-v", "-aet", "NOECHO", "-aec", "GUARDED", "127.0.0.1", str(port)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        return result.stdout + result.stderr

    def refused_lines() -> list[dict[str, Any]]:
        records = [r for r in caplog.records if r.getMessage() == "request.refused"]
        return [fields for r in records if (fields := getattr(r, "event_fields", {})).get("calling_ae") == "NOECHO"]

    try:
        answers = [echo() for _ in range(5)]
        assert all("Echo Response (Unknown Status: 0x124)" in answer for answer in answers), answers[0]
        assert [str(line["reason"]) for line in refused_lines()] == ["peer sender has no echo role"]

        time.sleep(audit.REPEAT_SECONDS + 0.5)
        echo()
    finally:
        server.shutdown()
    lines = refused_lines()
    assert len(lines) == 2 and lines[1]["not_logged_since_last"] == 4, lines


@pytest.mark.integration
def test_the_counts_still_open_when_the_node_stops_are_written(node):
    for _ in range(4):
        _echo(node, "MONITOR")
        _broad_query(node, "PLANNER")
    node.stop()

    assert _details(node.sessions, "echo", "MONITOR") == [
        None,
        f"2 more C-ECHO requests of this peer {LEFT_OUT}; written when the node stopped",
    ]
    assert _details(node.sessions, "find", "PLANNER") == [
        "STUDY level, 0 matches",
        f"STUDY level, 0 matches; 2 more refused C-FIND requests of this peer {LEFT_OUT}; written when the node "
        "stopped",
    ]


@pytest.fixture
def sessions(tmp_path) -> sessionmaker[Session]:
    """A migrated SQLite database of the node's schema."""
    return open_database(Settings(storage={"directory": str(tmp_path / "storage")}))


def test_a_full_count_makes_room_by_writing_the_oldest_callers_count_first(sessions):
    repeats = audit.RepeatedRecords(seconds=3600, max_keys=2)
    console = audit.Peer(None, "192.0.2.1")

    def refused(caller: str) -> bool:
        return repeats.record(caller, "refusals", sessions, "console", console, "refused", detail=f"{caller} refused")

    assert [refused(c) for c in ("a", "a", "a", "b", "c")] == [True, False, False, True, True]
    assert _details(sessions, "console") == [
        "a refused",
        "b refused",
        f"a refused; 1 more refusals {LEFT_OUT}; written early: too many callers were being counted at once",
        "c refused",
    ]
    assert repeats.flush() == 0, "nothing left uncounted"


def test_audit_records_older_than_audit_days_are_deleted_a_batch_at_a_time(sessions, tmp_path, monkeypatch):
    now = utcnow()
    with transaction(sessions) as session:
        for age_days in (40, 31, 31, 31, 30.5, 29, 1):
            session.add(AuditEvent(at=now - timedelta(days=age_days), action="echo", outcome="success"))
    monkeypatch.setattr(retention, "AUDIT_ROWS_PER_TRANSACTION", 2)  # five old rows: three batches
    settings = Settings(storage={"directory": str(tmp_path / "storage")}, retention={"audit_days": 30})

    RetentionTask(settings, sessions).run_once(now)

    with sessions() as session:
        ages = sorted((now - as_utc(at)).days for at in session.scalars(select(AuditEvent.at)))
    assert ages == [1, 29]


@pytest.mark.parametrize("days", [0, -1, True])
def test_audit_days_must_be_a_positive_number_of_days(days):
    with pytest.raises(ValidationError):
        Settings(retention={"audit_days": days})


@pytest.mark.integration
def test_a_monitoring_systems_echo_only_associations_leave_one_record_per_10_s_and_others_keep_their_own(node):
    for _ in range(5):
        _echo(node, "MONITOR")
        _broad_query(node, "PLANNER")  # an association that did something else: a record of its own, each time
    wait_for(
        lambda: len(_details(node.sessions, "association", "PLANNER")) == 5, what="the PLANNER association records"
    )

    assert _details(node.sessions, "association", "MONITOR") == [audit.ECHO_ONLY_DETAIL]
    assert _details(node.sessions, "association", "PLANNER") == [None] * 5
    node.stop()
    assert _details(node.sessions, "association", "MONITOR") == [
        audit.ECHO_ONLY_DETAIL,
        f"{audit.ECHO_ONLY_DETAIL}; 3 more C-ECHO-only associations of this peer {LEFT_OUT}; written when the node "
        "stopped",
    ]


def test_a_wrong_called_ae_title_is_named_and_recorded_even_after_another_rejection_from_the_address(node):
    """A stranger's rejection, then a configured peer asking for the wrong AE title from the same address within
    10 s: each reason gets its own log line and audit record, and the second names the title asked for and ours."""

    def echo(calling_ae: str, called_ae: str) -> str:
        command = [require_tool("echoscu"), "-v", "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(node.port)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        return result.stdout + result.stderr

    assert "Association Rejected" in echo("STRANGER", node.ae_title)
    assert "Association Rejected" in echo("MONITOR", "TYPO")

    expected = f"called AE title 'TYPO' is not this node's ({node.ae_title})"
    wait_for(lambda: expected in node.log(), what="the called AE title's rejection in the log")
    details = wait_for(
        lambda: len(_details(node.sessions, "association")) >= 2 and _details(node.sessions, "association"),
        what="both rejections in the audit trail",
    )
    assert any(expected in (detail or "") for detail in details), details
    assert any("STRANGER" in (detail or "") or "not recognised" in (detail or "") for detail in details), details


class _Poll:
    """A peer polling one C-FIND of one study through :data:`audit.REPEATED_QUERIES`, on a clock the test moves:
    ``at(seconds)`` is both the throttle's clock and the wall time of the poll (2026-01-05 10:00 plus ``seconds``)."""

    START = datetime(2026, 1, 5, 10, 0, tzinfo=timezone.utc)

    def __init__(self, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch) -> None:
        self.sessions = sessions
        self.seconds = 0.0
        monkeypatch.setattr(audit.REPEATED_QUERIES, "clock", lambda: 1000.0 + self.seconds, raising=False)
        monkeypatch.setattr(audit.REPEATED_QUERIES, "sweep_seconds", 0.05, raising=False)
        monkeypatch.setattr(audit, "utcnow", lambda: self.START + timedelta(seconds=self.seconds), raising=False)
        self.key = (sessions, "PLANNING", "10.0.0.5", "fingerprint", "1.2.3.4")

    def at(self, seconds: float) -> bool:
        self.seconds = seconds
        entry = audit.Entry("find", audit.Peer("PLANNING", "10.0.0.5:40001"), "success", "1.2.3.4", 1, "STUDY level")
        return audit.REPEATED_QUERIES.add(self.key, audit.REPEATED_QUERY, self.sessions, entry)

    def records(self) -> list[tuple[float, str | None]]:
        """(seconds after START, detail) of the find records, in the order written."""
        with self.sessions() as session:
            rows = session.execute(select(AuditEvent.at, AuditEvent.detail).order_by(AuditEvent.id)).all()
        return [((as_utc(at) - self.START).total_seconds(), detail) for at, detail in rows]


@pytest.fixture
def poll(sessions, monkeypatch) -> Iterator[_Poll]:
    polling = _Poll(sessions, monkeypatch)
    yield polling
    audit.REPEATED_QUERIES.flush(sessions=sessions)  # nothing of this test's left in the process' throttle


REPEATED = f"1 more {audit.REPEATED_QUERY} {LEFT_OUT}"


def test_a_poll_the_peer_stopped_is_written_with_its_time_once_its_window_is_over_without_a_new_one(poll):
    """Before, the last polls of a query a peer stopped sending were held in memory until the same query came again,
    the node stopped (stamped then) or the process died (lost): a minute after its 5 minutes, the latest one is
    written on its own, stamped with the time it was asked, counting the others."""
    assert [poll.at(s) for s in (0, 120, 240)] == [True, False, False]  # the peer's last access: at 240 s
    poll.seconds = 359  # REPEATED_QUERY_HOLD_SECONDS: a minute after the window of 5 minutes
    time.sleep(0.5)  # ten sweeps: not yet due, the peer's next poll may still come and count it
    assert [detail for _at, detail in poll.records()] == ["STUDY level"]

    poll.seconds = 360  # no new poll: the sweep writes it
    written = wait_for(lambda: len(poll.records()) == 2 and poll.records(), timeout=10, what="the held record")
    assert written[1] == (
        240,
        f"STUDY level; {REPEATED}; written when the 5 minutes after the previous record had passed without a new one",
    )
    assert audit.REPEATED_QUERIES.flush(sessions=poll.sessions) == 0, "nothing held any longer"

    assert poll.at(400)  # the peer polls again later: a new window, its first written at once, nothing to count
    assert poll.records()[2] == (400, "STUDY level")


def test_a_peer_still_polling_still_gets_one_record_per_5_minutes_counting_its_polls(poll):
    assert poll.at(0)
    assert not any(poll.at(s) for s in range(5, 300, 5))
    time.sleep(0.3)  # sweeps within the window write nothing: the next poll's record counts them
    assert poll.at(305)
    assert poll.records() == [(0, "STUDY level"), (305, f"STUDY level; 59 more {audit.REPEATED_QUERY} {LEFT_OUT}")]


def test_the_polls_held_when_the_node_stops_are_written_with_the_time_of_the_last(poll):
    assert [poll.at(s) for s in (0, 30, 60)] == [True, False, False]
    poll.seconds = 100
    assert audit.flush_repeated(poll.sessions) == 1
    assert poll.records()[1] == (60, f"STUDY level; {REPEATED}; written when the node stopped")


def _echo_association(ae_title: str, address: str, local: str = "127.0.0.1") -> SimpleNamespace:
    """A C-ECHO's event on an association to the node (DICOMNODE) of ``ae_title`` calling from ``address`` to the
    node's ``local`` address: Verification its only service."""

    class Socket:
        def getsockname(self) -> tuple[str, int]:
            return (local, 11112)

    assoc = SimpleNamespace(
        requestor=SimpleNamespace(ae_title=ae_title, address=address, port=50000),
        acceptor=SimpleNamespace(ae_title="DICOMNODE"),
        accepted_contexts=[SimpleNamespace(abstract_syntax=audit.VERIFICATION_SOP_CLASS)],
        dul=SimpleNamespace(socket=SimpleNamespace(socket=Socket())),
    )
    return SimpleNamespace(assoc=assoc)


def test_the_own_health_check_is_the_nodes_ae_title_calling_from_this_machine():
    from dicom_node.receive.scp import own_health_check

    assert own_health_check(_echo_association("DICOMNODE", "127.0.0.1").assoc)
    assert own_health_check(_echo_association("DICOMNODE", "::1", local="::1").assoc)
    # network.host one address: the call comes from that very address, the one it called
    assert own_health_check(_echo_association("DICOMNODE", "192.0.2.7", local="192.0.2.7").assoc)
    assert not own_health_check(_echo_association("DICOMNODE", "192.0.2.8", local="192.0.2.7").assoc)  # another host
    assert not own_health_check(_echo_association("MONITOR", "127.0.0.1").assoc)  # another AE title


@pytest.mark.parametrize("address", ["127.0.0.1", "192.0.2.7"])
def test_the_nodes_own_readiness_echo_is_recorded_once_an_hour_logged_at_debug_and_a_peers_echo_as_before(
    sessions, monkeypatch, caplog, address
):
    """Before, the /readyz C-ECHO (one each 5 s) wrote an echo and an association record each 10 s and an INFO
    `audit` line each: 17,000 rows a day. Now one of each an hour, at DEBUG, counting the others; a peer's C-ECHO
    is recorded and logged as before."""
    from dicom_node.receive import scp

    clock = [1000.0]
    monkeypatch.setattr(audit, "time", SimpleNamespace(monotonic=lambda: clock[0], sleep=time.sleep))
    if hasattr(audit, "OWN_CHECKS"):
        monkeypatch.setattr(audit.OWN_CHECKS, "sweep_seconds", 0.05)
    caplog.set_level(logging.DEBUG, logger="dicom_node")
    probe = _echo_association("DICOMNODE", address, local=address)

    for second in range(0, 600, 5):  # 10 minutes of probes
        clock[0] = 1000.0 + second
        scp._on_echo(probe, sessions)
        scp._audit_association_end(probe, sessions, "released")

    assert _details(sessions, "echo", "DICOMNODE") == [None]
    assert _details(sessions, "association", "DICOMNODE") == [audit.ECHO_ONLY_DETAIL]
    audit_lines = [r for r in caplog.records if r.getMessage() == "audit"]
    assert audit_lines and {r.levelno for r in audit_lines} == {logging.DEBUG}
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and "DICOMNODE" in str(r.__dict__)]

    clock[0] = 1000.0 + 3660  # the hour is over and the probes stopped (the console stopped): counted, written
    wait_for(lambda: len(_details(sessions, "echo", "DICOMNODE")) == 2, timeout=10, what="the hour's echo record")
    late = "written when the hour after the previous record had passed without a new one"
    assert _details(sessions, "echo", "DICOMNODE")[1] == (
        f"118 more C-ECHO requests of the node's own readiness check {LEFT_OUT}; {late}"
    )

    caplog.clear()
    peer = f"PEER{address[-1]}"  # REPEATS counts per peer in every database: one of its own each run
    scp._on_echo(_echo_association(peer, "192.0.2.50"), sessions)  # a real peer: a record and an INFO line
    assert _details(sessions, "echo", peer) == [None]
    assert [r.levelno for r in caplog.records if r.getMessage() == "audit"] == [logging.INFO]
    audit.flush_repeated(sessions)


def test_audit_records_the_database_refuses_are_kept_and_written_once_it_takes_writes(tmp_path, caplog):
    """The database full (SQLite held to its size with max_page_count: it answers "database or disk is full", as on
    a full disk): the records are kept with the time they happened and written once a record goes in again, not
    lost with a traceback each."""
    sessions = open_database(Settings(storage={"directory": str(tmp_path / "storage")}))
    peer = audit.Peer("SENDER", "10.0.0.7:1234")
    full = {"limit": True}

    @event.listens_for(sessions.kw["bind"], "connect")
    def _page_limit(connection, _record):  # each new connection of the pool
        connection.execute("PRAGMA max_page_count = 1" if full["limit"] else "PRAGMA max_page_count = 1073741823")

    sessions.kw["bind"].dispose()
    details = [f"held {number:02d} " + "x" * 900 for number in range(20)]  # more than the free room of a page
    with caplog.at_level(logging.INFO, logger="dicom_node.audit"):
        for detail in details:
            audit.record(sessions, "association", peer, "aborted", detail=detail)
        written_while_full = len(_details(sessions, "association", "SENDER"))
        assert written_while_full < len(details)
        [held] = [record for record in caplog.records if record.getMessage() == "audit.held"]  # one each 10 s
        assert held.event_fields["reason"].startswith(  # type: ignore[attr-defined]
            "an audit record could not be written (database or disk is full); it is kept in memory with the time "
            "it happened"
        )
        assert not any(record.exc_info for record in caplog.records)

        full["limit"] = False
        sessions.kw["bind"].dispose()
        audit.record(sessions, "association", peer, "released", detail="written")

    assert sorted(d or "" for d in _details(sessions, "association", "SENDER")) == sorted([*details, "written"])
