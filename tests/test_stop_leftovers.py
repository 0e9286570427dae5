"""A stop leaves nothing running behind it: sends end before the node gives its lock back, and a worker frozen
before its first sign of life is ended.

The destination is a real pynetdicom Storage SCP in the test process that answers slowly, or never
(:class:`tests.test_dispatch_faults.Peer`); "another node" is the test taking the node's lock on the database
(the flock beside the SQLite file) the moment it is given back. The worker is a real worker process of a real
`dicom-node serve`, frozen with SIGSTOP the moment it is started.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from db.models import JobState
from db.session import NodeLock
from tests.conftest import CT_RULES, DICOM_NODE, Node, wait_for
from tests.test_dispatch_faults import Peer, delivery_records, destination, process_rule, send_phantom

pytestmark = pytest.mark.integration

FAST_SENDING = {"first_retry_seconds": 0.5, "max_retry_seconds": 1, "check_interval_seconds": 0.2}


class LockWatcher:
    """Another node waiting for the database's lock: records when it could take it, and gives it back at once."""

    def __init__(self, node: Node) -> None:
        self._lock = NodeLock(f"sqlite:///{node.storage / 'dicom-node.db'}")
        self.taken_at: float | None = None  # time.monotonic() when the lock was free
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> LockWatcher:
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._done.wait(0.01):
            if self._lock.try_take():
                self.taken_at = time.monotonic()
                self._lock.release()
                return

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)


def stop_node(node: Node, timeout: float = 60) -> int:
    """SIGTERM, then wait for the process to end by itself; its exit status."""
    assert node.process is not None
    node.process.send_signal(signal.SIGTERM)
    try:
        code = node.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        node.process.kill()
        node.process.wait()
        raise AssertionError(f"serve did not stop within {timeout} s of SIGTERM:\n{node.log()[-4000:]}") from None
    node.process = None
    return code


def test_a_stop_waits_for_the_file_in_flight_before_giving_the_lock_back(tmp_path, start_node):
    peer = Peer(delay=3.0).start()  # each answer takes 3 s: the stop lands while a file is at the destination
    answered_at: dict[str, float] = {}
    peer.before_answer = lambda uid: answered_at.__setitem__(uid, time.monotonic())
    try:
        node = start_node(
            destinations={"pacs": destination(peer, send=["seg", "sr", "rtstruct"])},
            rules=process_rule("pacs"),
            inference={"workers": 1},
            dispatch=FAST_SENDING,
        )
        series_uid = send_phantom(node, tmp_path / "ct")
        wait_for(lambda: peer.received, timeout=180, what="the first result file to reach the destination")
        in_flight = peer.received[-1]
        other_node = LockWatcher(node).start()
        assert stop_node(node) == 0
        other_node.stop()

        assert in_flight in answered_at, "the destination answered the file that was in flight at the stop"
        assert other_node.taken_at is not None and other_node.taken_at > answered_at[in_flight], (
            "another node could take the lock while this one still waited for the destination's answer"
        )
        recorded = {d.sop_instance_uid for d in delivery_records(node, series_uid)}
        assert in_flight in recorded, "the answer to the file in flight was recorded before the lock was given back"
        assert "dispatch.stopped_at_node_stop" in node.log()

        node.start()
        node.wait_for_state(series_uid, JobState.DONE, timeout=120)
        received = Counter(peer.received)
        assert len(received) == 3 and set(received.values()) == {1}, f"each file exactly once: {received}"
    finally:
        peer.stop()


def test_a_send_that_gets_no_answer_is_cut_off_at_the_stop_and_its_file_sent_again(tmp_path, start_node):
    peer = Peer().start()
    peer.stalled = True  # takes the first file and never answers
    try:
        node = start_node(
            destinations={"pacs": destination(peer, send=["seg", "sr", "rtstruct"])},
            rules=process_rule("pacs"),
            inference={"workers": 1},
            # One answer is waited for 3 s at a stop; a file is otherwise given 3 s + 3600 s per MB (a slow PACS).
            dispatch={**FAST_SENDING, "timeout_seconds": 3, "seconds_per_megabyte": 3600},
        )
        series_uid = send_phantom(node, tmp_path / "ct")
        wait_for(lambda: peer.waiting, timeout=180, what="the destination to hold a file without answering")
        held = peer.received[-1]
        other_node = LockWatcher(node).start()
        asked_to_stop = time.monotonic()
        assert stop_node(node) == 0
        other_node.stop()

        assert other_node.taken_at is not None and other_node.taken_at - asked_to_stop >= 3, (
            "the lock was given back before the stop had waited for the destination's answer"
        )
        cut_off = [line for line in node.log().splitlines() if "dispatch.stopped_at_node_stop" in line]
        assert cut_off, node.log()[-3000:]
        assert re.search(
            r"had not answered \S+ 3 s after the stop .* cut the association off; .* sent again", cut_off[-1]
        )
        assert not delivery_records(node, series_uid), "a file the destination never answered is not delivered"

        peer.release()
        node.start()
        node.wait_for_state(series_uid, JobState.DONE, timeout=120)
        received = Counter(peer.received)
        assert len(received) == 3 and received[held] == 2, f"the file cut off at the stop was sent again: {received}"
    finally:
        peer.stop()


def _worker_pids(log: Path) -> list[int]:
    text = log.read_text(errors="replace") if log.exists() else ""
    return [int(pid) for pid in re.findall(r"worker\.started .*?pid=(\d+)", text)]


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def test_a_worker_frozen_before_its_first_sign_of_life_is_ended_and_replaced(tmp_path):
    node = Node(
        tmp_path / "node",
        {
            "rules": CT_RULES,
            "inference": {"workers": 1, "lease_seconds": 2, "lease_renew_seconds": 1, "worker_start_seconds": 20},
            "database": {"busy_timeout_seconds": 1},
        },
    )
    node._log = open(node.log_path, "ab")  # started by hand: the worker is frozen before serve listens
    node.process = subprocess.Popen(
        [DICOM_NODE, "serve", "--config", str(node.config_path)], stdout=node._log, stderr=subprocess.STDOUT
    )
    try:
        frozen = wait_for(lambda: _worker_pids(node.log_path), timeout=60, interval=0.01, what="a worker")[0]
        os.kill(frozen, signal.SIGSTOP)  # moments after its start: long before it could show a sign of life
        # Its first sign of life is waited for 26 s: 6 s idle limit (lease 2 s, busy timeout 1 s) + 20 s to start.
        wait_for(lambda: _gone(frozen), timeout=180, what=f"the frozen worker {frozen} to be ended")
        ended = [line for line in node.log().splitlines() if "worker.ended" in line]
        assert ended and f"process {frozen}" in ended[0], node.log()[-3000:]
        assert "since it was started" in ended[0], ended[0]
        wait_for(lambda: len(_worker_pids(node.log_path)) >= 2, timeout=30, what="a new worker in its slot")
        wait_for(lambda: "worker.ready" in node.log(), timeout=120, what="the new worker to be ready")
    finally:
        node.stop()
        for pid in _worker_pids(node.log_path):
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_stop_waits_for_a_pass_that_still_writes_and_names_it_in_the_log(tmp_path, start_node):
    node = start_node(rules=CT_RULES, database={"busy_timeout_seconds": 50})  # a write waits 50 s for the lock
    holder = sqlite3.connect(node.storage / "dicom-node.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another program holds the database's write lock
        time.sleep(1)  # the watcher's next pass (every 0.2 s) now waits for the lock, inside its pass
        node.process.send_signal(signal.SIGTERM)
        waiting = wait_for(
            lambda: [line for line in node.log().splitlines() if "watcher.stop_waiting" in line],
            timeout=45,
            what="the stop to say which task it waits for",
        )
        assert "the watcher task" in waiting[0] and "the stop waits for it" in waiting[0], waiting[0]
        assert node.process.poll() is None, "the node stopped while the watcher's pass still waited to write"
        assert "node.stopped" not in node.log()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert node.process.wait(timeout=60) == 0
    node.process = None
    assert "node.stopped" in node.log()
