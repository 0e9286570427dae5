"""A stop asked for while `dicom-node serve` is still starting stops every part in order, as it would later."""

from __future__ import annotations

import signal
import subprocess

import pytest

from tests.conftest import DICOM_NODE, Node, wait_for

pytestmark = pytest.mark.integration


def test_sigterm_during_start_up_stops_the_node_cleanly(tmp_path):
    node = Node(tmp_path / "node", {})
    with open(node.log_path, "ab") as log:
        process = subprocess.Popen(
            [DICOM_NODE, "serve", "--config", str(node.config_path)], stdout=log, stderr=subprocess.STDOUT
        )
        try:
            # Storage is checked before the receivers start: the node is half-started.
            wait_for(lambda: "node.storage_checked" in node.log(), timeout=60, what="the storage check at start-up")
            assert "node.ready" not in node.log()
            process.send_signal(signal.SIGTERM)
            returncode = process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

    assert returncode == 0, node.log()
    log_text = node.log()
    assert "node.stopping signal=SIGTERM" in log_text
    assert "node.stopped" in log_text
