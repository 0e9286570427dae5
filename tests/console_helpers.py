"""A real node with its operations console on, a DCMTK storescp as its PACS, and logged-in HTTP clients."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from dicom_node.console.auth import hash_password
from dicom_node.phantom import PhantomSeries, PhantomSpec, write_phantom_series
from tests.conftest import Node, free_port, require_tool, storescu, wait_for

PASSWORDS = {"olga": "operator-password", "vera": "viewer-password"}
ROLES = {"olga": "operator", "vera": "viewer"}
METRICS_TOKEN = "scrape-token-for-tests"
SMALL_PHANTOM = PhantomSpec(rows=96, columns=96, slices=24, pixel_spacing=(4.0, 4.0), slice_spacing=5.0, noise_sd=5.0)


@dataclass
class ConsoleNode:
    """The node, where its console listens, and the storescp that plays its PACS."""

    node: Node
    url: str
    pacs_port: int
    received: Path

    def client(self, user: str | None = None) -> httpx.Client:
        """An HTTP client; logged in as ``user`` (its session cookie kept) when given."""
        client = httpx.Client(base_url=self.url, timeout=30, follow_redirects=False)
        if user is not None:
            response = log_in(client, user, PASSWORDS[user])
            assert response.status_code == 303, response.text
        return client

    @staticmethod
    def csrf(client: httpx.Client) -> str:
        return str(client.get("/api/me").json()["csrf_token"])


def log_in(client: httpx.Client, user: str, password: str, next_path: str = "/") -> httpx.Response:
    """Load the login form (its token and cookie), then send it as a browser would."""
    form = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert token is not None, form.text
    data = {"username": user, "password": password, "next": next_path, "csrf_token": token.group(1)}
    return client.post("/login", data=data)


def console_settings(port: int, **extra: Any) -> dict[str, Any]:
    return {
        "enabled": True,
        "host": "127.0.0.1",
        "port": port,
        "users": {name: {"password_hash": hash_password(PASSWORDS[name]), "role": ROLES[name]} for name in PASSWORDS},
        "metrics_token": METRICS_TOKEN,
        "echo_interval_seconds": 0,
        "refresh_seconds": 1,
        **extra,
    }


@contextmanager
def console_node(workdir: Path, **console: Any) -> Iterator[ConsoleNode]:
    """Start storescp (as PACS) and a node with one worker, a CT rule sending to the PACS, and the console on."""
    received = workdir / "pacs"
    received.mkdir(parents=True)
    pacs_port, console_port = free_port(), free_port()
    pacs = subprocess.Popen(
        [require_tool("storescp"), "-aet", "PACSSCP", "-od", str(received), str(pacs_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    node = Node(
        workdir / "node",
        {
            "rules": [
                {
                    "name": "ct",
                    "match": {"modality": "CT"},
                    "action": "process",
                    "model": "baseline",
                    "destinations": ["pacs"],
                },
                {"name": "ct-local", "match": {"modality": "MR"}, "action": "process", "model": "baseline"},
            ],
            "destinations": {"pacs": {"ae_title": "PACSSCP", "host": "127.0.0.1", "port": pacs_port}},
            "inference": {"workers": 1, "poll_seconds": 0.2},
            "dispatch": {"check_interval_seconds": 0.2, "first_retry_seconds": 1},
            "console": console_settings(console_port, **console),
        },
    )
    try:
        node.start()
        url = f"http://127.0.0.1:{console_port}"
        wait_for(lambda: _answers(url), timeout=30, what="the console to answer")
        yield ConsoleNode(node, url, pacs_port, received)
    finally:
        node.stop()
        pacs.terminate()
        pacs.wait(timeout=10)


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def send_phantom(node: Node, folder: Path, spec: PhantomSpec = SMALL_PHANTOM) -> PhantomSeries:
    """Write a small phantom CT and send it to the node with DCMTK storescu."""
    series = write_phantom_series(folder, spec)
    result = storescu(node.port, series.files)
    assert result.returncode == 0, result.stderr
    return series
