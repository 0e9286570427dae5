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
from tests.console_helpers import PASSWORDS, console_settings, log_in

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
    finally:
        server.stop()
        peer.terminate()
        peer.wait(timeout=10)
    assert rows["pacs"]["reachable"] is True and rows["pacs"]["last_error"] is None
    assert rows["pacs"]["last_echo"]["detail"].startswith("outgoing C-ECHO to destination pacs: success in ")
    assert rows["archive"]["reachable"] is False
    assert rows["archive"]["last_error"]["detail"].startswith("outgoing C-ECHO to destination archive: failed: ")
    assert "PACSSCP@127.0.0.1" in page and "ARCHIVE@127.0.0.1" in page


def _answers(client: httpx.Client) -> bool:
    try:
        return client.get("/healthz").status_code == 200
    except httpx.HTTPError:
        return False
