"""A stop asked for while `dicom-node serve` is still starting (here: waiting for another node's lock on the
database) ends it cleanly, as a stop would later; it used to be killed half-started (status 143)."""

from __future__ import annotations

import signal
import subprocess

import pytest

from tests.conftest import DICOM_NODE, Node, wait_for

pytestmark = pytest.mark.integration


def test_sigterm_while_waiting_for_another_nodes_lock_stops_at_once(tmp_path, start_node):
    node = start_node()
    waiting = Node(tmp_path / "second", {})
    waiting.config_path.write_text(node.config_path.read_text())  # the same database and port
    with open(waiting.log_path, "ab") as log:
        second = subprocess.Popen(
            [DICOM_NODE, "serve", "--config", str(waiting.config_path)], stdout=log, stderr=subprocess.STDOUT
        )
        try:
            wait_for(lambda: "node.waiting_for_other_node" in waiting.log(), timeout=60, what="the second node waiting")
            second.send_signal(signal.SIGTERM)
            returncode = second.wait(timeout=30)
        finally:
            if second.poll() is None:
                second.kill()
                second.wait()

    assert returncode == 0, waiting.log()
    assert "stopped while it waited for the other node to stop" in waiting.log()
    assert node.process is not None and node.process.poll() is None  # the first node serves on
