"""C-ECHO both ways: DCMTK echoscu to the node, `dicom-node echo` to a DCMTK storescp."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import DICOM_NODE, free_port, require_tool, wait_for

pytestmark = pytest.mark.integration


def test_node_answers_echoscu(start_node):
    node = start_node()
    result = subprocess.run(
        [require_tool("echoscu"), "-v", "-aet", "PACS", "-aec", node.ae_title, "127.0.0.1", str(node.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Received Echo Response (Success)" in result.stdout + result.stderr


def test_echo_command_reaches_a_real_peer_and_reports_a_dead_one(tmp_path):
    port = free_port()
    peer = subprocess.Popen([require_tool("storescp"), "-aet", "PEERSCP", "-od", str(tmp_path), str(port)])
    try:
        config = tmp_path / "config.yaml"
        config.write_text(f"destinations:\n  peer: {{ae_title: PEERSCP, host: 127.0.0.1, port: {port}}}\n")

        def echo(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([DICOM_NODE, "echo", *args, "--config", str(config)], capture_output=True, text=True)

        ok = wait_for(lambda: (r := echo("peer")).returncode == 0 and r, timeout=20, what="storescp to answer")
        assert "C-ECHO PEERSCP@127.0.0.1" in ok.stdout and "success" in ok.stdout
        unknown = echo("nowhere")
        assert unknown.returncode == 2 and "unknown destination 'nowhere' (known: peer)" in unknown.stderr
    finally:
        peer.terminate()
        peer.wait()
    dead = subprocess.run(
        [
            DICOM_NODE,
            "echo",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--ae-title",
            "PEERSCP",
            "--timeout",
            "3",
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
    )
    assert dead.returncode == 1
    assert "FAILED: no association (peer down or unreachable)" in dead.stderr
