"""Sending under faults: the node killed while sending, a locked database, slow, stalled and absent peers.

The destinations are real pynetdicom Storage SCPs in the test process, on their own
ports (real networking), that the test can slow down, stall or count: every C-STORE
request that reaches one is counted when it arrives (``received``) and when the peer
answers success (``acknowledged``).
"""

from __future__ import annotations

import random
import re
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from pynetdicom import AE, AllStoragePresentationContexts, evt
from sqlalchemy import select

from db import jobs
from db.jobs import delivered_sop_instance_uids, job_for_series_uid
from db.models import Delivery, JobState
from dicom_node.config import DatabaseSettings
from dicom_node.phantom import PhantomSpec, write_phantom_series
from tests.conftest import Node, free_port, storescu, wait_for

pytestmark = pytest.mark.integration

PHANTOM = PhantomSpec(rows=96, columns=96, slices=30, pixel_spacing=(3.5, 3.5), slice_spacing=5.0)
LABEL_MAP_SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.7"


class Peer:
    """A Storage SCP the test controls: answers after ``delay`` s, or never while ``stalled``."""

    def __init__(self, ae_title: str = "PEERSCP", *, delay: float = 0.0, delay_from_bytes: int = 0) -> None:
        self.ae_title = ae_title
        self.port = free_port()
        self.delay = delay  # seconds before answering an object of at least delay_from_bytes
        self.delay_from_bytes = delay_from_bytes
        self.stalled = False  # accept the association, never answer a C-STORE
        self.before_answer: Callable[[str], None] | None = None
        self.statuses: list[int] = []  # the statuses to answer with, one per request, then success
        self.received: list[str] = []  # SOP Instance UIDs as each request arrived
        self.acknowledged: list[str] = []  # SOP Instance UIDs answered with success
        self.waiting = 0  # requests held without an answer right now
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._server = None

    def start(self) -> Peer:
        ae = AE(ae_title=self.ae_title)
        ae.network_timeout = None
        ae.maximum_pdu_size = 0
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(LABEL_MAP_SEGMENTATION)
        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        return self

    def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def release(self) -> None:
        """Stop stalling: held requests and new ones are answered."""
        self.stalled = False
        self._release.set()

    def _on_store(self, event) -> int:
        uid = str(event.dataset.SOPInstanceUID)
        size = len(event.request.DataSet.getvalue())
        with self._lock:
            self.received.append(uid)
        if self.stalled:
            with self._lock:
                self.waiting += 1
            self._release.wait()
            with self._lock:
                self.waiting -= 1
            return 0xA700  # the node gave up on this request long ago; it never sees this answer
        if size >= self.delay_from_bytes and self.delay:
            time.sleep(self.delay)
        if self.before_answer is not None:
            self.before_answer(uid)
        with self._lock:
            status = self.statuses.pop(0) if self.statuses else 0x0000
            if status == 0x0000 or 0xB000 <= status <= 0xBFFF or status in (0x0001, 0x0107, 0x0116):
                self.acknowledged.append(uid)  # success, or a warning: stored
        return status


@pytest.fixture
def start_peer():
    started: list[Peer] = []

    def _start(*args, **kwargs) -> Peer:
        peer = Peer(*args, **kwargs)
        started.append(peer)
        return peer.start()

    yield _start
    for peer in started:
        peer.stop()


def destination(peer: Peer, **extra) -> dict:
    return {"ae_title": peer.ae_title, "host": "127.0.0.1", "port": peer.port, **extra}


def process_rule(*destinations: str) -> list[dict]:
    return [
        {
            "name": "ct",
            "match": {"modality": "CT"},
            "action": "process",
            "model": "baseline",
            "destinations": list(destinations),
        }
    ]


def send_phantom(node: Node, folder: Path) -> str:
    series = write_phantom_series(folder, PHANTOM)
    assert storescu(node.port, series.files).returncode == 0
    return series.series_instance_uid


def delivery_records(node: Node, series_uid: str) -> list[Delivery]:
    with node.sessions() as session:
        job = job_for_series_uid(session, series_uid)
        return list(session.scalars(select(Delivery).where(Delivery.job_id == job.id))) if job else []


def planned_files(node: Node, series_uid: str, name: str) -> dict[str, str]:
    with node.sessions() as session:
        job = job_for_series_uid(session, series_uid)
        return dict(jobs.delivery_record(job, name).files or {}) if job else {}


def dispatch_log(node: Node) -> str:
    """The node's own dispatch lines (pynetdicom's lines, such as TCP's "Connection refused", left out)."""
    return "\n".join(line for line in node.log().splitlines() if " dispatch." in line or " job." in line)


def attempts(node: Node, series_uid: str, name: str) -> int:
    """Attempts made to send to ``name``, whether they reached it or found it unreachable."""
    with node.sessions() as session:
        job = job_for_series_uid(session, series_uid)
        if job is None:
            return 0
        record = jobs.delivery_record(job, name)
        return record.attempts + record.unreachable_attempts


# --- SIGKILL while sending -----------------------------------------------------------------------


def kill_while_sending(tmp_path: Path, start_node, start_peer, *, seed: int, rounds: int) -> dict[str, int]:
    """Each round: a new series, SIGKILL at a seeded random moment of SENDING, restart, wait for DONE.

    Returns the counts; asserts after every round that each file reached the peer, that no
    file the node had recorded as delivered was sent again, and that at most the one file
    in flight at the kill reached the peer twice.
    """
    rng = random.Random(seed)
    peer = start_peer(delay=0.8)  # slow to acknowledge: the kill lands in the middle of SENDING
    node = start_node(
        destinations={"peer": destination(peer, send=["seg", "sr", "rtstruct"])},
        rules=process_rule("peer"),
        inference={"workers": 1},
        dispatch={"first_retry_seconds": 0.5, "max_retry_seconds": 1, "check_interval_seconds": 0.2},
    )
    counts = Counter()
    for round_number in range(rounds):
        series_uid = send_phantom(node, tmp_path / f"ct{round_number}")
        node.wait_for_state(series_uid, JobState.SENDING, timeout=180)
        time.sleep(rng.uniform(0.0, 3.0))  # three files at 0.8 s each, plus the association
        node.kill()
        recorded_at_kill = {d.sop_instance_uid for d in delivery_records(node, series_uid)}
        received_at_kill = Counter(peer.received)
        node.start()
        node.wait_for_state(series_uid, JobState.DONE, timeout=120)

        planned = set(planned_files(node, series_uid, "peer"))
        assert len(planned) == 3
        received = Counter(uid for uid in peer.received if uid in planned)
        assert set(received) == planned, "every file reached the destination"
        assert {d.sop_instance_uid for d in delivery_records(node, series_uid)} == planned
        for uid in recorded_at_kill:
            assert received[uid] == 1, "a file recorded as delivered before the kill was sent again"
        twice = [uid for uid, n in received.items() if n > 1]
        assert len(twice) <= 1 and all(received[uid] == 2 for uid in twice), "only the file in flight may go twice"
        assert all(received_at_kill[uid] >= 1 for uid in twice), "a second copy only of a file the peer had got"
        counts["kills"] += 1
        counts["files"] += len(planned)
        counts["recorded_before_kill"] += len(recorded_at_kill)
        counts["in_flight_sent_again"] += len(twice)
        counts["recorded_sent_again"] += sum(received[uid] - 1 for uid in recorded_at_kill)
        counts["jobs_stuck"] += node.job_state(series_uid) is not JobState.DONE
    print("kill-while-sending:", dict(counts))
    return counts


def test_kill_while_sending_resends_only_the_file_in_flight(tmp_path, start_node, start_peer):
    counts = kill_while_sending(tmp_path, start_node, start_peer, seed=11, rounds=1)  # 20 rounds: faults_long
    assert counts["kills"] == 1 and counts["recorded_sent_again"] == 0 and counts["jobs_stuck"] == 0


@pytest.mark.faults_long
def test_many_kills_while_sending_resend_only_the_file_in_flight(tmp_path, start_node, start_peer):
    counts = kill_while_sending(tmp_path, start_node, start_peer, seed=2026, rounds=20)
    assert counts["kills"] == 20 and counts["recorded_sent_again"] == 0 and counts["jobs_stuck"] == 0


# --- a locked database right after a successful send ---------------------------------------------


def test_database_locked_after_a_send_does_not_resend(tmp_path, start_node, start_peer):
    busy_timeout = 30.0  # the node's SQLite busy timeout, unless the configuration can shorten it
    settings = {}
    if "busy_timeout_seconds" in DatabaseSettings.model_fields:
        busy_timeout = 2.0
        settings["database"] = {"busy_timeout_seconds": busy_timeout}
    peer = start_peer()
    node = start_node(
        destinations={"peer": destination(peer)},
        rules=process_rule("peer"),
        inference={"workers": 1},
        **settings,
    )
    database = node.storage / "dicom-node.db"
    locks: list[threading.Timer] = []

    def lock_before_first_answer(_uid: str) -> None:
        if locks:
            return
        holder = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
        holder.execute("BEGIN EXCLUSIVE")  # the node's record of this file must wait for it
        release = threading.Timer(busy_timeout + 5, lambda: (holder.rollback(), holder.close()))
        release.start()  # before it is seen: the test joins it as soon as the list holds it
        locks.append(release)

    peer.before_answer = lock_before_first_answer
    series_uid = send_phantom(node, tmp_path / "ct")
    wait_for(lambda: locks, timeout=240, what="the first file to reach the peer")  # no database reads: it is locked
    locks[0].join()
    node.wait_for_state(series_uid, JobState.DONE, timeout=120)

    assert len(peer.received) == 2 and Counter(peer.received).most_common(1)[0][1] == 1, "each file sent once"
    assert {d.sop_instance_uid for d in delivery_records(node, series_uid)} == set(peer.received)
    assert "database.busy" in node.log()


# --- down, then slow, then up --------------------------------------------------------------------


def test_destination_down_then_slow_then_up_gets_each_file_once(tmp_path, start_node, start_peer):
    peer = Peer(delay=3.0)  # not started yet: the destination is down
    node = start_node(
        destinations={"peer": destination(peer)},
        rules=process_rule("peer"),
        inference={"workers": 1},
        dispatch={
            "first_retry_seconds": 0.5,
            "max_retry_seconds": 1,
            "max_attempts": 100,
            "timeout_seconds": 6,
            "seconds_per_megabyte": 0,
        },
    )
    series_uid = send_phantom(node, tmp_path / "ct")
    wait_for(lambda: attempts(node, series_uid, "peer") >= 2, timeout=180, what="two attempts while the peer is down")
    peer.start()  # up, but slow: 3 s per answer, within the 6 s timeout
    try:
        wait_for(lambda: len(peer.acknowledged) >= 1, timeout=60, what="a first slow answer")
        peer.delay = 0.0  # fully up
        node.wait_for_state(series_uid, JobState.DONE, timeout=60)
    finally:
        peer.stop()
    assert len(peer.received) == 2 and set(Counter(peer.received).values()) == {1}, "each file delivered once"
    assert "is unreachable (no association" in dispatch_log(node)
    assert "refused" not in dispatch_log(node)


# --- a large object acknowledged only after the default timeout ----------------------------------


@pytest.mark.parametrize("seconds_per_megabyte", [200.0, 0.0], ids=["timeout-scaled-by-size", "fixed-timeout"])
def test_slowly_acknowledged_large_object(tmp_path, start_node, start_peer, seconds_per_megabyte):
    """The SEG (the large object here) is answered after 5 s; the fixed timeout is 2 s."""
    peer = start_peer(delay=5.0, delay_from_bytes=20_000)
    node = start_node(
        destinations={"peer": destination(peer)},
        rules=process_rule("peer"),
        inference={"workers": 1},
        dispatch={"timeout_seconds": 2, "seconds_per_megabyte": seconds_per_megabyte, "max_attempts": 1},
    )
    series_uid = send_phantom(node, tmp_path / "ct")
    if seconds_per_megabyte:
        node.wait_for_state(series_uid, JobState.DONE, timeout=240)
        assert len(peer.acknowledged) == 2 and set(Counter(peer.received).values()) == {1}, "delivered once"
        return
    node.wait_for_state(series_uid, JobState.FAILED, timeout=240)
    reason = node.job_reason(series_uid)
    assert reason.startswith("sending failed: peer received 0 of 2 files: no response within 2 s from PEERSCP to ")
    assert reason.endswith("(after 1 attempt)")
    log = dispatch_log(node)
    assert "no response within 2 s from PEERSCP to seg-binary.dcm" in log
    assert "refused" not in log and "refused" not in reason


# --- two destinations, one never answering -------------------------------------------------------


def test_stalled_destination_does_not_hold_up_the_other(tmp_path, start_node, start_peer):
    pacs = start_peer("PACS")
    planner = start_peer("PLANNER")
    planner.stalled = True  # accepts the association, never answers a C-STORE
    node = start_node(
        destinations={"pacs": destination(pacs), "planner": destination(planner)},
        rules=process_rule("planner", "pacs"),
        inference={"workers": 1},
        dispatch={"timeout_seconds": 20, "seconds_per_megabyte": 0, "max_attempts": 1},
    )
    series_uid = send_phantom(node, tmp_path / "ct")

    wait_for(lambda: len(pacs.acknowledged) == 2, timeout=240, what="the PACS to get its two files")
    # The planner holds its first request, unanswered, while the PACS has both files: the PACS did not wait for it.
    # (On a loaded machine the request may reach the planner a moment after the PACS' last answer.)
    wait_for(lambda: planner.waiting == 1, timeout=15, what="the planner to hold the node's first request")
    assert planner.acknowledged == []
    node.wait_for_state(series_uid, JobState.FAILED, timeout=60)

    reason = node.job_reason(series_uid)
    assert reason.startswith(
        "sending failed: planner received 0 of 2 files: no response within 20 s from PLANNER to "
    ), reason
    assert reason.endswith("(after 1 attempt); pacs received 2 of 2 files"), reason
    status = node.cli("status")
    assert "planner 0/2, pacs 2/2" in status.stdout, status.stdout
    shown = node.cli("show", series_uid).stdout
    assert "sent to  planner 0/2 files (1 attempt" in shown and "sent to  pacs 2/2 files (1 attempt)" in shown
    assert shown.count("last error: no response within 20 s from PLANNER") == 1, shown  # once, not per file
    assert shown.count("not delivered (see the last error above)") == 2, shown
    assert shown.count("  delivered 20") == 2, shown

    planner.release()  # the planner answers from now on; retry sends it only what it lacks
    retried = node.cli("retry", series_uid)
    assert retried.returncode == 0 and "SENDING" in retried.stdout
    node.wait_for_state(series_uid, JobState.DONE, timeout=60)
    assert len(pacs.received) == 2, "the PACS got nothing again"
    assert sorted(planner.acknowledged) == sorted(pacs.acknowledged)
    with node.sessions() as session:
        job = job_for_series_uid(session, series_uid)
        assert delivered_sop_instance_uids(session, job.id, "planner") == set(pacs.acknowledged)


# --- warning statuses are stored, failures are not -----------------------------------------------


def test_every_warning_status_counts_as_stored_and_is_not_sent_again(tmp_path, start_node, start_peer):
    """0x0107, 0x0001 and 0xB00F are warnings (stored, with a remark); 0xC000 is a refusal, sent again."""
    peer = start_peer()
    peer.statuses = [0x0107, 0x0001, 0xC000, 0xB00F]  # in the order of arrival; the refused file goes again
    node = start_node(
        destinations={"peer": destination(peer, send=["seg", "sr", "rtstruct"])},
        rules=process_rule("peer"),
        inference={"workers": 1},
        dispatch={"first_retry_seconds": 0.5, "max_retry_seconds": 1, "max_attempts": 2},
    )
    series_uid = send_phantom(node, tmp_path / "ct")
    node.wait_for_state(series_uid, JobState.DONE, timeout=240)

    received = Counter(peer.received)
    assert len(received) == 3 and sorted(received.values()) == [1, 1, 2], "only the refused file went twice"
    statuses = {d.sop_instance_uid: d.status for d in delivery_records(node, series_uid)}
    assert sorted(statuses.values()) == sorted([0x0107, 0x0001, 0xB00F]), statuses
    assert attempts(node, series_uid, "peer") == 2
    log = dispatch_log(node)
    assert log.count("dispatch.stored_with_warning") == 3, log
    assert "0x0107 (Attribute List Error)" in log and "0x0001 (warning)" in log, log
    assert re.search(r"PEERSCP refused \S+\.dcm with status 0xC000 \(Cannot Understand\)", log), log


# --- a late instance re-opens the series while its results are being sent -----------------------


def test_results_superseded_while_sending_stop_and_do_not_use_the_new_runs_attempts(tmp_path, start_node, start_peer):
    """The series is re-opened after the first file of its results reached the peer, and processed again.

    The first run's other files are not sent once the change is seen, and its attempt is not charged to
    the second run: with one attempt allowed, the second run's results are all delivered.
    """
    peer = start_peer()
    node = start_node(
        destinations={"peer": destination(peer, send=["seg", "sr", "rtstruct"])},
        rules=process_rule("peer"),
        inference={"workers": 1},
        completion={"quiet_seconds": 1, "expected_count_timeout_seconds": 1},
        dispatch={"max_attempts": 1, "timeout_seconds": 180},
    )
    series = write_phantom_series(tmp_path / "ct", PHANTOM)
    first_answer: list[str] = []

    def second_run_sending() -> bool:
        with node.sessions() as session:
            job = job_for_series_uid(session, series.series_instance_uid)
            paths = [f.path for f in job.result_files or []]
            return job.state is JobState.SENDING and bool(paths) and all("run-2" in path for path in paths)

    def reopen_before_the_first_answer(uid: str) -> None:
        if first_answer:
            return
        first_answer.append(uid)
        assert storescu(node.port, series.files[-1:]).returncode == 0  # the late image
        wait_for(second_run_sending, timeout=150, what="the series processed again, its new results to send")

    peer.before_answer = reopen_before_the_first_answer
    assert storescu(node.port, series.files[:-1]).returncode == 0  # one image short: completes by timeout
    node.wait_for_state(series.series_instance_uid, JobState.DONE, timeout=300)

    second = set(planned_files(node, series.series_instance_uid, "peer"))
    assert len(second) == 3 and first_answer[0] not in second
    received = Counter(peer.received)
    assert all(received[uid] == 1 for uid in second), "the new results reached the peer, once each"
    first = [uid for uid in received if uid not in second]
    assert first == first_answer, "of the superseded results only the file already in flight was sent"
    assert attempts(node, series.series_instance_uid, "peer") == 1
    assert "dispatch.attempt_superseded" in dispatch_log(node)
    assert "partial series" not in (node.job_reason(series.series_instance_uid) or "")


# --- the destination's settings changed before a retry ---------------------------------------------


def retry_after_editing_config(node: Node, series_uid: str, edit: Callable[[dict], object]) -> None:
    """Stop the node, ``edit`` its config.yaml (as a dict), start it, `dicom-node retry` the series, and wait
    until the retry settled."""
    node.stop()
    config = yaml.safe_load(node.config_path.read_text())
    edit(config)
    node.config_path.write_text(yaml.safe_dump(config))
    node.start()
    assert node.cli("retry", series_uid).returncode == 0
    wait_for(
        lambda: node.job_state(series_uid) in (JobState.DONE, JobState.FAILED), timeout=300, what="the retry settled"
    )


def test_a_retry_after_a_destination_was_set_to_take_more_kinds_sends_them_too(tmp_path, start_node, start_peer):
    """A plan made under the old `send` (SEG only) must not count as delivered once the destination also takes
    SR: the retry plans again and sends the SR too (results lacking a kind would be said so, as at a first try)."""
    peer = start_peer()
    peer.statuses = [0xC000]  # the SEG is refused once: the job fails with its plan recorded
    node = start_node(
        destinations={"peer": destination(peer, send=["seg"])},
        rules=process_rule("peer"),
        inference={"workers": 1},
        dispatch={"max_attempts": 1},
    )
    series_uid = send_phantom(node, tmp_path / "ct")
    node.wait_for_state(series_uid, JobState.FAILED, timeout=300)
    assert len(planned_files(node, series_uid, "peer")) == 1 and peer.acknowledged == []

    retry_after_editing_config(
        node, series_uid, lambda config: config["destinations"]["peer"].update(send=["seg", "sr"])
    )

    assert node.job_state(series_uid) is JobState.DONE, node.job_reason(series_uid)
    assert len(set(peer.acknowledged)) == 2  # the SEG, and the SR the results held all along
    assert len(planned_files(node, series_uid, "peer")) == 2


def test_a_destination_pointed_at_another_peer_gets_the_whole_result_there(tmp_path, start_node, start_peer):
    """The PACS took the SEG and refused the SR; `destinations.pacs` was then pointed at a new PACS (AE title,
    host, port) and the series retried: only the SR went to the new one, and the job said DONE `pacs 2/2` while
    each PACS held half the result. What the old peer accepted no longer counts for the new one."""
    old = start_peer("OLDPACS")
    old.statuses = [0x0000, 0xC000]  # the SEG stored, the SR refused once: the job fails with the SEG delivered
    node = start_node(
        destinations={"pacs": destination(old, send=["seg", "sr"])},
        rules=process_rule("pacs"),
        inference={"workers": 1},
        dispatch={"max_attempts": 1},
    )
    series_uid = send_phantom(node, tmp_path / "ct")
    node.wait_for_state(series_uid, JobState.FAILED, timeout=300)
    assert len(old.acknowledged) == 1

    new = start_peer("NEWPACS")
    retry_after_editing_config(
        node, series_uid, lambda config: config["destinations"].update(pacs=destination(new, send=["seg", "sr"]))
    )

    assert node.job_state(series_uid) is JobState.DONE, node.job_reason(series_uid)
    assert sorted(new.acknowledged) == sorted(planned_files(node, series_uid, "pacs"))  # SEG and SR, both
    assert len(new.acknowledged) == 2 and len(old.acknowledged) == 1
    kept = {d.destination for d in delivery_records(node, series_uid)}
    assert kept == {"pacs", f"pacs (was OLDPACS@127.0.0.1:{old.port})"}  # the old peer's record is kept apart
    shown = " ".join(node.cli("show", series_uid).stdout.split())
    assert f"destination pacs names another peer now (NEWPACS@127.0.0.1:{new.port}, was OLDPACS@127.0.0.1:" in shown
