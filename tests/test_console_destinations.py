"""The destinations page's reachability: the console C-ECHOes each destination by itself and shows the outcome."""

from __future__ import annotations

import subprocess

import httpx
import pytest

from dicom_node.config import Settings
from dicom_node.console.app import ConsoleServer
from dicom_node.console.metrics import Liveness
from dicom_node.service import open_database
from tests.conftest import free_port, require_tool, wait_for
from tests.console_helpers import METRICS_TOKEN, PASSWORDS, console_settings, log_in

pytestmark = pytest.mark.integration


def test_console_echoes_destinations_periodically_and_shows_the_reachable_and_the_unreachable(tmp_path):
    peer_port, down_port = free_port(), free_port()
    peer = subprocess.Popen(
        [require_tool("storescp"), "-aet", "PACSSCP", "-od", str(tmp_path), str(peer_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    settings = Settings(
        storage={"directory": str(tmp_path / "storage")},
        destinations={
            "pacs": {"ae_title": "PACSSCP", "host": "127.0.0.1", "port": peer_port},
            "archive": {"ae_title": "ARCHIVE", "host": "127.0.0.1", "port": down_port},
        },
        dispatch={"timeout_seconds": 2},
        console=console_settings(free_port(), echo_interval_seconds=0.5),
    )
    server = ConsoleServer(settings, open_database(settings), Liveness(lambda: None, lambda: True))
    server.start()
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{settings.console.port}", timeout=10)
        wait_for(lambda: _answers(client), timeout=20, what="the console to answer")
        assert log_in(client, "vera", PASSWORDS["vera"]).status_code == 303

        def both_checked() -> dict[str, dict] | None:
            rows = {row["name"]: row for row in client.get("/api/destinations").json()}
            return rows if all(row["last_echo"] for row in rows.values()) else None

        rows = wait_for(both_checked, timeout=30, interval=0.5, what="a C-ECHO of each destination")
        page = client.get("/destinations").text
        metrics = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
    finally:
        server.stop()
        peer.terminate()
        peer.wait(timeout=10)
    assert rows["pacs"]["reachable"] is True and rows["pacs"]["last_error"] is None
    assert rows["pacs"]["last_echo"]["detail"].startswith("outgoing C-ECHO to destination pacs: success in ")
    assert rows["archive"]["reachable"] is False
    assert rows["archive"]["last_error"]["detail"].startswith("outgoing C-ECHO to destination archive: failed: ")
    assert "PACSSCP@127.0.0.1" in page and "ARCHIVE@127.0.0.1" in page
    assert 'dicom_node_destination_up{destination="pacs"} 1.0' in metrics.splitlines()
    assert 'dicom_node_destination_up{destination="archive"} 0.0' in metrics.splitlines()


def _answers(client: httpx.Client) -> bool:
    try:
        return client.get("/healthz").status_code == 200
    except httpx.HTTPError:
        return False


def test_destination_up_reads_only_each_destinations_own_recent_c_echo(tmp_path):
    """An echo older than two probe intervals (plus time limits) says nothing of now: the destination is left out;
    a destination named as the start of another's name is not read from the other's records."""
    from datetime import timedelta

    from prometheus_client.core import GaugeMetricFamily

    from db.models import AuditEvent, utcnow
    from dicom_node.console.metrics import DatabaseCollector

    settings = Settings(
        storage={"directory": str(tmp_path / "storage")},
        destinations={
            "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104},
            "pacs2": {"ae_title": "PACS2", "host": "127.0.0.1", "port": 104},
            "archive": {"ae_title": "ARCHIVE", "host": "10.0.0.9", "port": 11112},
            "new": {"ae_title": "NEW", "host": "10.0.0.10", "port": 104},
        },
        dispatch={"timeout_seconds": 10},
        console=console_settings(free_port(), echo_interval_seconds=60),
    )
    sessions = open_database(settings)
    now = utcnow()
    window = 2 * 60 + 4 * 10 + 60

    def echo(name: str, address: str, outcome: str, seconds_ago: float) -> AuditEvent:
        detail = f"outgoing C-ECHO to destination {name}: " + ("success in 3 ms" if outcome == "success" else "failed")
        return AuditEvent(
            at=now - timedelta(seconds=seconds_ago), action="echo", peer_address=address, outcome=outcome, detail=detail
        )

    with sessions() as session:
        session.add_all(
            [
                echo("pacs", "127.0.0.1:104", "success", 30),
                echo("pacs2", "127.0.0.1:104", "failed", 10),  # same address, the newer record, another destination
                echo("archive", "10.0.0.9:11112", "success", window + 30),  # too old to say anything of now
                echo("archive", "10.0.0.9:11112", "failed", window - 30),
                echo("new", "10.0.0.10:104", "success", window + 5),
            ]
        )
        session.commit()
    collector = DatabaseCollector(settings, sessions, Liveness(lambda: None, lambda: True))
    (family,) = [m for m in collector.collect() if m.name == "dicom_node_destination_up"]
    assert isinstance(family, GaugeMetricFamily)
    assert {sample.labels["destination"]: sample.value for sample in family.samples} == {
        "pacs": 1.0,
        "pacs2": 0.0,
        "archive": 0.0,
    }
    settings.console.echo_interval_seconds = 0
    (family,) = [m for m in collector.collect() if m.name == "dicom_node_destination_up"]
    assert family.samples == []


def test_the_destinations_page_reads_each_destinations_own_echoes_and_sends_at_a_shared_address(tmp_path):
    """Two destinations at one host and port (two AE titles of one PACS) each show their own last C-ECHO, send and
    error: the newer record of the other is not theirs."""
    from datetime import timedelta

    from db.models import AuditEvent, utcnow
    from dicom_node.console.queries import destinations

    settings = Settings(
        storage={"directory": str(tmp_path / "storage")},
        destinations={
            "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104},
            "pacs_rt": {"ae_title": "PACSRT", "host": "127.0.0.1", "port": 104},
        },
    )
    sessions = open_database(settings)
    now = utcnow()

    def record(action: str, ae_title: str | None, outcome: str, detail: str, seconds_ago: float) -> AuditEvent:
        at = now - timedelta(seconds=seconds_ago)
        return AuditEvent(
            at=at, action=action, peer_ae_title=ae_title, peer_address="127.0.0.1:104", outcome=outcome, detail=detail
        )

    with sessions() as session:
        session.add_all(
            [
                record("echo", None, "success", "outgoing C-ECHO to destination pacs: success in 3 ms", 50),
                record("send", "PACS", "success", "job 1: 2 of 2 file(s) accepted", 40),
                record("echo", None, "failed", "outgoing C-ECHO to destination pacs_rt: failed: refused", 20),
                record("send", "PACSRT", "failed", "job 2: 0 of 2 file(s) accepted; refused", 10),
            ]
        )
        session.commit()
    with sessions() as session:
        rows = {row["name"]: row for row in destinations(session, settings)}

    assert rows["pacs"]["reachable"] is True
    assert rows["pacs"]["last_echo"]["detail"] == "outgoing C-ECHO to destination pacs: success in 3 ms"
    assert rows["pacs"]["last_success"]["detail"] == "job 1: 2 of 2 file(s) accepted"
    assert rows["pacs"]["last_error"] is None
    assert rows["pacs_rt"]["reachable"] is False
    assert rows["pacs_rt"]["last_success"] is None
    assert rows["pacs_rt"]["last_error"]["detail"] == "job 2: 0 of 2 file(s) accepted; refused"
