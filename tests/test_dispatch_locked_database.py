"""Sending while the node's own database holds it up, and a stop in the middle of sending.

The node is a real ``dicom-node serve``; the PACS is a DCMTK storescp that takes a second or more per file
(``--sleep-during``) and aborts an association left idle for 2 s (``--socket-timeout``), as PACS do; the lock is
a ``BEGIN EXCLUSIVE`` on the node's SQLite file held by this test's process.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
from collections import Counter
from pathlib import Path

import pydicom
import pytest

from db import jobs
from db.jobs import job_for_series_uid
from db.models import JobState
from tests.conftest import free_port, require_tool, wait_for
from tests.test_dispatch_faults import delivery_records, process_rule, send_phantom

pytestmark = pytest.mark.integration


class SlowPacs:
    """A DCMTK storescp that sleeps 1 s per PDU it receives; each file it stores under a name of its own."""

    def __init__(self, folder: Path, *options: str) -> None:
        self.ae_title = "PACSSCP"
        self.port = free_port()
        self.folder = folder
        self.log_path = folder.with_suffix(".log")
        self.options = options
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> SlowPacs:
        self.folder.mkdir(parents=True)
        command = [require_tool("storescp"), "-v", "--sleep-during", "1", "-pdu", "131072", "+uf", *self.options]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [*command, "-aet", self.ae_title, "-od", str(self.folder), str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def received(self) -> Counter[str]:
        """How often each SOP Instance UID arrived."""
        return Counter(str(pydicom.dcmread(path).SOPInstanceUID) for path in self.folder.iterdir())

    def destination(self) -> dict:
        return {"ae_title": self.ae_title, "host": "127.0.0.1", "port": self.port}


@pytest.fixture
def start_pacs(tmp_path):
    started: list[SlowPacs] = []

    def _start(*options: str) -> SlowPacs:
        pacs = SlowPacs(tmp_path / f"pacs{len(started)}", *options)
        started.append(pacs)
        return pacs.start()

    yield _start
    for pacs in started:
        pacs.stop()


def test_an_association_the_pacs_ended_while_the_node_waited_for_its_database_costs_no_attempt(
    tmp_path, start_node, start_pacs
):
    pacs = start_pacs("--socket-timeout", "2")  # aborts an association idle for 2 s
    node = start_node(
        destinations={"pacs": pacs.destination()},
        rules=process_rule("pacs"),
        inference={"workers": 1},
        database={"busy_timeout_seconds": 1},
        dispatch={"max_attempts": 1, "check_interval_seconds": 0.2},  # a counted attempt would fail the job
    )
    series_uid = send_phantom(node, tmp_path / "ct")
    wait_for(lambda: "Received Store Request" in pacs.log(), timeout=240, what="the first result file at the PACS")
    holder = sqlite3.connect(node.storage / "dicom-node.db", isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")  # before the PACS answers: the node's record of that file waits for it
        wait_for(lambda: "Association Aborted" in pacs.log(), timeout=60, what="the PACS to end the idle association")
        wait_for(lambda: "recording seg" in node.log(), timeout=60, what="the node to say what waits for the lock")
    finally:
        holder.rollback()
        holder.close()
    node.wait_for_state(series_uid, JobState.DONE, timeout=120)

    received = pacs.received()
    assert set(received.values()) == {1} and len(received) == 2, f"each file sent once: {received}"
    assert {d.sop_instance_uid for d in delivery_records(node, series_uid)} == set(received)
    with node.sessions() as session:
        assert jobs.delivery_record(job_for_series_uid(session, series_uid), "pacs").attempts == 1
    log = node.log()
    assert "dispatch.attempt_failed" not in log
    assert "the association to PACSSCP ended while this node waited" in log
    assert "this does not count as an attempt" in log


def test_a_stop_while_a_file_is_at_the_pacs_is_not_taken_for_a_lost_lock(tmp_path, start_node, start_pacs):
    pacs = start_pacs()
    node = start_node(destinations={"pacs": pacs.destination()}, rules=process_rule("pacs"), inference={"workers": 1})
    series_uid = send_phantom(node, tmp_path / "ct")
    wait_for(lambda: "Received Store Request" in pacs.log(), timeout=240, what="the first result file at the PACS")
    assert node.process is not None
    node.process.send_signal(signal.SIGTERM)
    assert node.process.wait(timeout=120) == 0
    node.process = None

    log = node.log()
    assert "node.stopped" in log
    assert "lock_lost" not in log, "a stop gives the node's lock back: it is not lost to another node"
    assert "dispatch.attempt_failed" not in log

    node.start()  # the rest is sent at the next start, each file once but perhaps the one in flight at the stop
    node.wait_for_state(series_uid, JobState.DONE, timeout=120)
    received = pacs.received()
    assert len(received) == 2 and sum(received.values()) <= 3, received
