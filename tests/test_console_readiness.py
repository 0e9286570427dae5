"""The health endpoints answer whatever the Host header: the Docker health check calls /readyz on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from tests.conftest import Node, free_port, wait_for
from tests.console_helpers import console_settings

pytestmark = pytest.mark.integration


def _health(node: Node) -> subprocess.CompletedProcess[str]:
    """The Docker HEALTHCHECK command, reading the node's configuration as the container does."""
    return subprocess.run(
        [sys.executable, "-m", "dicom_node.console.health"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "DICOM_NODE_CONFIG": str(node.config_path)},
    )


def _ready(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=15)
    except httpx.TransportError:
        return None


def test_the_health_check_passes_with_allowed_hosts_set_and_other_paths_still_check_the_host(start_node):
    """Before, TrustedHostMiddleware answered the health check's request to 127.0.0.1 400 "Invalid host header":
    a working node was reported unhealthy for good."""
    console_port = free_port()
    node = start_node(console=console_settings(console_port, allowed_hosts=["console.example.org"]))
    url = f"http://127.0.0.1:{console_port}"
    wait_for(lambda: _ready(f"{url}/healthz") is not None, timeout=30, what="the console to answer")
    health = _health(node)
    assert health.returncode == 0, health.stdout + health.stderr
    assert httpx.get(f"{url}/readyz").status_code == 200
    assert httpx.get(f"{url}/healthz", headers={"Host": "10.0.0.5:8080"}).json() == {"status": "ok"}
    assert httpx.get(f"{url}/login").status_code == 400  # DNS rebinding: refused as before
    assert httpx.get(f"{url}/metrics").status_code == 400
    assert httpx.get(f"{url}/login", headers={"Host": "console.example.org"}).status_code == 200
