"""Fault injection against a running node: concurrent senders, SIGKILL, a locked database, a full disk.

Each test counts: instances acknowledged = stored (byte-identical), duplicates stored = 0,
jobs finished = series sent, workers alive. The long variants (marker ``faults_long``) are
deselected by default; run them with ``pytest -m faults_long tests/test_faults.py``.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db.jobs import job_for_series_uid
from db.models import Instance, JobEvent, JobState, RejectedInstance, Series
from db.session import make_engine, make_session_factory
from dicom_node import status
from dicom_node.phantom import PhantomSeries, PhantomSpec, write_phantom_series
from dicom_node.receive.pending_refusals import kept_in
from tests.conftest import CT_RULES, Node, data_set_bytes, require_tool, storescu, succeeded_files, wait_for

pytestmark = pytest.mark.integration

SMALL_CT = PhantomSpec(rows=64, columns=64, slices=16, pixel_spacing=(5.0, 5.0), slice_spacing=5.0)
LARGER_CT = PhantomSpec(rows=256, columns=256, slices=60, pixel_spacing=(1.5, 1.5), slice_spacing=2.0)
PROCESSING_NODE = {
    "rules": CT_RULES,
    "inference": {"workers": 1, "poll_seconds": 0.2},
    "completion": {"quiet_seconds": 3},
}


# --- helpers -------------------------------------------------------------------------------------


def send_in_background(port: int, files: Sequence[Path]) -> subprocess.Popen[str]:
    """One DCMTK storescu association sending ``files``, verbose, as a PACS would."""
    command = [require_tool("storescu"), "-v", "-aet", "PACS", "-aec", "DICOMNODE", "127.0.0.1", str(port)]
    return subprocess.Popen(
        [*command, *map(str, files)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TCP_NODELAY": "1"},
    )


def stored_instances(storage: Path) -> dict[str, Path]:
    """SOP Instance UID -> file, for every instance file under ``instances/``."""
    return {path.stem: path for path in (storage / "instances").rglob("*.dcm")}


def recorded_uids(sessions: sessionmaker[Session]) -> list[str]:
    """Every recorded SOP Instance UID (a list: a duplicate row would show twice)."""
    with sessions() as session:
        return list(
            session.scalars(
                select(Instance.sop_instance_uid).join(Instance.series).where(Series.source_job_id.is_(None))
            )
        )


def times_reached(sessions: sessionmaker[Session], series_uid: str, state: JobState) -> int:
    """How often the series' job entered ``state`` (from its events)."""
    with sessions() as session:
        job = job_for_series_uid(session, series_uid)
        if job is None:
            return 0
        return (
            session.scalar(
                select(func.count()).select_from(JobEvent).where(JobEvent.job_id == job.id, JobEvent.to_state == state)
            )
            or 0
        )


def job_state(sessions: sessionmaker[Session], series_uid: str) -> tuple[JobState | None, str | None]:
    with sessions() as session:
        job = job_for_series_uid(session, series_uid)
        return (job.state, job.reason) if job else (None, None)


def wait_for_state(sessions: sessionmaker[Session], series_uid: str, state: JobState, timeout: float = 120) -> None:
    try:
        wait_for(lambda: job_state(sessions, series_uid)[0] is state, timeout=timeout, interval=0.2, what=state.value)
    except AssertionError:
        now, reason = job_state(sessions, series_uid)
        raise AssertionError(f"series did not reach {state.value}: it is {now} ({reason})") from None


def assert_byte_identical(series: PhantomSeries, stored: dict[str, Path], uids: Sequence[str]) -> None:
    sources = dict(zip(series.sop_instance_uids, series.files, strict=True))
    for uid in uids:
        assert uid in stored, f"acknowledged instance {uid} is not on disk"
        assert data_set_bytes(stored[uid]) == data_set_bytes(sources[uid]), f"instance {uid} differs from what was sent"


def acknowledged_uids(series: PhantomSeries, storescu_output: str) -> list[str]:
    by_file = {str(path): uid for path, uid in zip(series.files, series.sop_instance_uids, strict=True)}
    return [by_file[name] for name in succeeded_files(storescu_output)]


def worker_pids(node: Node) -> list[int]:
    return [int(pid) for pid in re.findall(r"worker\.started worker=\d+ pid=(\d+)", node.log())]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def assert_no_temporary_files(storage: Path) -> None:
    """No written temporary file is left, nor a spare of a process that is gone; running receivers keep spares."""
    leftovers = [p for p in (storage / "incoming").iterdir() if not _live_empty_spare(p)]
    leftovers += list((storage / "instances").rglob("*.partial"))
    assert leftovers == [], f"temporary files left behind: {leftovers[:5]}"


def _live_empty_spare(path: Path) -> bool:
    try:
        empty = path.suffix == ".spare" and path.stat().st_size == 0
    except FileNotFoundError:
        return True  # taken and renamed into place meanwhile
    return empty and pid_alive(int(path.name.split("-", 1)[0]))


# --- concurrent senders of one series ------------------------------------------------------------


@pytest.mark.parametrize("senders", [2, 3, 10])
def test_concurrent_senders_of_one_series_store_each_instance_once_and_process_it_once(tmp_path, start_node, senders):
    series = write_phantom_series(tmp_path / "ct", SMALL_CT)
    # ten senders on one host (loopback) exceed the default per-address cap of 8: raise it, as for a PACS cluster
    node = start_node(**PROCESSING_NODE, network={"maximum_associations_per_host": 16})

    processes = [send_in_background(node.port, series.files) for _ in range(senders)]
    outputs = [process.communicate(timeout=300)[0] for process in processes]

    for output in outputs:  # every association had every instance acknowledged: no false failures
        assert sorted(acknowledged_uids(series, output)) == sorted(series.sop_instance_uids), output[-2000:]
    wait_for_state(node.sessions, series.series_instance_uid, JobState.DONE)
    stored = stored_instances(node.storage)
    recorded = recorded_uids(node.sessions)
    assert sorted(recorded) == sorted(series.sop_instance_uids)  # duplicates recorded: 0
    assert sorted(stored) == sorted(series.sop_instance_uids)  # duplicates stored: 0, none deleted
    assert_byte_identical(series, stored, series.sop_instance_uids)
    assert times_reached(node.sessions, series.series_instance_uid, JobState.DONE) == 1
    assert times_reached(node.sessions, series.series_instance_uid, JobState.PROCESSING) == 1
    assert_no_temporary_files(node.storage)
    assert all(pid_alive(pid) for pid in worker_pids(node))


# --- SIGKILL during receive ----------------------------------------------------------------------


def kill_during_receive(tmp_path: Path, start_node, *, seed: int, kills: int) -> dict[str, int]:
    """Send a series again and again, SIGKILL the node at a random moment of each transfer, restart it.

    Returns the counts of the whole run; asserts after every restart that each
    acknowledged instance is stored, byte-identical, and recorded once.
    """
    rng = random.Random(seed)
    series = write_phantom_series(tmp_path / "ct", LARGER_CT)
    node = start_node(rules=CT_RULES, completion={"quiet_seconds": 600})
    acknowledged: set[str] = set()
    counts = {"kills": 0, "acknowledged": 0, "lost": 0, "duplicated": 0, "temporary_files_left": 0}
    for _ in range(kills):
        sender = send_in_background(node.port, series.files)
        time.sleep(rng.uniform(0.0, 2.0))
        node.kill()
        counts["kills"] += 1
        output, _ = sender.communicate(timeout=120)
        this_time = acknowledged_uids(series, output)
        acknowledged.update(this_time)
        counts["acknowledged"] += len(this_time)
        node.start()  # repair runs first
        stored = stored_instances(node.storage)
        recorded = recorded_uids(node.sessions)
        counts["lost"] += len(acknowledged - set(stored)) + len(acknowledged - set(recorded))
        counts["duplicated"] += len(recorded) - len(set(recorded))
        counts["temporary_files_left"] += len(list((node.storage / "incoming").iterdir()))
        assert_byte_identical(series, stored, sorted(acknowledged))
        assert sorted(stored) == sorted(set(recorded))  # disk and database agree
    # Finally the PACS resends everything: each instance once, whatever the kills left.
    assert storescu(node.port, series.files).returncode == 0
    assert sorted(recorded_uids(node.sessions)) == sorted(series.sop_instance_uids)
    assert_byte_identical(series, stored_instances(node.storage), series.sop_instance_uids)
    assert_no_temporary_files(node.storage)
    return counts


@pytest.mark.parametrize("seed", [11, 12])
def test_sigkill_during_receive_keeps_every_acknowledged_instance(tmp_path, start_node, seed):
    counts = kill_during_receive(tmp_path, start_node, seed=seed, kills=3)
    print(counts)
    assert counts["kills"] == 3 and counts["lost"] == 0 and counts["duplicated"] == 0
    assert counts["temporary_files_left"] == 0


@pytest.mark.faults_long
def test_fifty_seeded_sigkills_during_receive_lose_nothing(tmp_path, start_node):
    counts = kill_during_receive(tmp_path, start_node, seed=2026, kills=50)
    print(counts)
    assert counts["kills"] == 50 and counts["lost"] == 0 and counts["duplicated"] == 0
    assert counts["temporary_files_left"] == 0


# --- a locked database ---------------------------------------------------------------------------

HOLD_LOCK = """
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
connection.execute("COMMIT")
"""


def hold_database_lock(database: Path, seconds: float) -> subprocess.Popen[str]:
    """Another process holding the SQLite file with BEGIN EXCLUSIVE for ``seconds``."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(database), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


def test_database_locked_past_the_busy_timeout_kills_no_worker_and_loses_nothing(tmp_path, start_node):
    first = write_phantom_series(tmp_path / "first", SMALL_CT)
    second = write_phantom_series(tmp_path / "second", SMALL_CT)
    node = start_node(**PROCESSING_NODE, database={"busy_timeout_seconds": 1})
    workers = wait_for(lambda: worker_pids(node), what="worker processes started")
    wait_for(lambda: "worker.ready" in node.log(), timeout=120, what="the worker to poll the queue")

    assert storescu(node.port, first.files).returncode == 0
    wait_for(
        lambda: job_state(node.sessions, first.series_instance_uid)[0] in (JobState.QUEUED, JobState.PROCESSING),
        interval=0.02,
        what="first series queued",
    )
    holder = hold_database_lock(node.storage / "dicom-node.db", seconds=6)  # the worker claims or finishes meanwhile
    # Each C-STORE is answered success once its file is durable; the recorder waits for the lock and catches up.
    answers = send_with_pynetdicom(node.port, second.files)
    holder.wait(timeout=30)

    assert answers == [(status.SUCCESS, "")] * len(second.files)
    assert_byte_identical(
        second, stored_instances(node.storage), second.sop_instance_uids
    )  # nothing acknowledged is lost
    log = node.log()
    assert re.search(r'database\.busy waiting="worker ', log), (
        "the lock must have met the worker (claim, stage, finish)"
    )
    assert log.count("recorder.waiting") == 1, "the recorder must say once that it waits for the database"
    wait_for_state(node.sessions, first.series_instance_uid, JobState.DONE)
    wait_for_state(node.sessions, second.series_instance_uid, JobState.DONE)

    assert sorted(recorded_uids(node.sessions)) == sorted(first.sop_instance_uids + second.sop_instance_uids)
    for series in (first, second):  # jobs finished = series sent, each once
        assert times_reached(node.sessions, series.series_instance_uid, JobState.DONE) == 1
    assert all(pid_alive(pid) for pid in workers) and "worker.died" not in node.log()
    assert_no_temporary_files(node.storage)


# --- a full disk ---------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 24 MiB tmpfs; skipped where this user may not mount file systems."""
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mountpoint)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN): {result.stderr.strip()}")
    yield mountpoint
    subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def fill_disk(folder: Path) -> Path:
    """Write a filler file until the file system is full; returns it (delete it to free the space)."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as stream:
        try:
            while True:
                stream.write(b"\0" * 65536)
        except OSError:
            pass
    return filler


def test_images_refused_while_the_disk_holding_the_database_is_full_still_mark_their_series_partial(
    tmp_path, small_disk, start_node
):
    """Five images of a series fit, then the disk (storage and the database: the default layout) is full and the
    other seven are refused 0xA700; their refusals could not be recorded either, so once space returned the series
    completed from the five as whole, without a word. The refusals are kept (a preallocated file) and recorded
    when the database takes writes again; the series waits for that, then says what it lacks."""
    spec = PhantomSpec(
        rows=64, columns=64, slices=12, pixel_spacing=(5.0, 5.0), slice_spacing=5.0, images_in_acquisition=False
    )
    series = write_phantom_series(tmp_path / "ct", spec)
    storage = small_disk / "storage"
    node = start_node(
        storage={"directory": str(storage), "disk_full_retry_seconds": 1},
        completion={"quiet_seconds": 3, "check_interval_seconds": 0.2},
        rules=CT_RULES,
        inference={"workers": 0},
    )
    sessions = make_session_factory(make_engine(f"sqlite:///{storage / 'dicom-node.db'}"))
    assert send_with_pynetdicom(node.port, series.files[:5]) == [(status.SUCCESS, "")] * 5
    filler = fill_disk(small_disk)
    answers = send_with_pynetdicom(node.port, series.files[5:])
    assert answers == [(status.OUT_OF_RESOURCES, "out of disk space on the node")] * 7
    time.sleep(5)  # past the quiet period while the disk is full
    filler.unlink()

    wait_for_state(sessions, series.series_instance_uid, JobState.QUEUED)
    with sessions() as session:
        job = job_for_series_uid(session, series.series_instance_uid)
        assert job is not None and job.series.instance_count == 5
        warnings = list(job.warnings or [])
        refused = session.scalars(select(RejectedInstance.sop_instance_uid)).all()
    assert sorted(refused) == sorted(series.sop_instance_uids[5:])
    assert any(
        warning.startswith("partial series: 7 image(s) sent for this series were refused") for warning in warnings
    ), warnings
    assert not [kept for path in (storage / "journal").glob("*.refusals") for kept in kept_in(path)]


def send_with_pynetdicom(port: int, files: Sequence[Path]) -> list[tuple[int, str]]:
    """(status, error comment) of each C-STORE: storescu does not print the ErrorComment."""
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    answers = []
    for path in files:
        response = assoc.send_c_store(path)
        answers.append((int(response.Status), str(response.get("ErrorComment", ""))))
    assoc.release()
    return answers


@pytest.mark.parametrize("database_on", ["another disk", "the full disk"])
def test_full_disk_answers_a700_leaves_no_partial_and_processing_resumes_when_space_returns(
    tmp_path,
    small_disk,
    start_node,
    database_on,  # the disk is unmounted after the node stopped
):
    series = write_phantom_series(tmp_path / "ct", SMALL_CT)
    later = write_phantom_series(tmp_path / "later", SMALL_CT)
    storage = small_disk / "storage"
    # The default layout keeps the database in the storage folder, so it fills up too.
    database = tmp_path / "node.db" if database_on == "another disk" else storage / "dicom-node.db"
    settings = {
        "storage": {"directory": str(storage), "disk_full_retry_seconds": 1},
        "database": {"url": f"sqlite:///{database}"},
        "completion": {"quiet_seconds": 3},
        "rules": CT_RULES,
    }
    node = start_node(**settings, inference={"workers": 0})  # receive only: the job waits QUEUED
    sessions = make_session_factory(make_engine(f"sqlite:///{database}"))
    assert storescu(node.port, series.files).returncode == 0
    wait_for_state(sessions, series.series_instance_uid, JobState.QUEUED)
    node.stop()

    filler = fill_disk(small_disk)
    node.config_path.write_text(node.config_path.read_text().replace("workers: 0", "workers: 1"))
    node.start()
    workers = wait_for(lambda: worker_pids(node), what="worker processes started")

    def waiting_for_space() -> bool:
        deferred = (job_state(sessions, series.series_instance_uid)[1] or "").startswith("waiting for disk space")
        return deferred or "the disk holding the database is full" in node.log()

    wait_for(waiting_for_space, timeout=120, interval=0.1, what="the job to wait for disk space")
    answers = send_with_pynetdicom(node.port, later.files[:3])

    assert answers == [(status.OUT_OF_RESOURCES, "out of disk space on the node")] * 3
    assert_no_temporary_files(storage)
    if database_on == "another disk":  # each refusal is recorded for its series (nowhere to record it otherwise)
        with sessions() as session:
            refused = session.scalars(select(RejectedInstance).order_by(RejectedInstance.id)).all()
        assert [(r.sop_instance_uid, r.series_instance_uid, r.status, r.path) for r in refused] == [
            (uid, later.series_instance_uid, status.OUT_OF_RESOURCES, None) for uid in later.sop_instance_uids[:3]
        ]
        assert refused[0].reason == ("out of disk space on the node; answered 0xA700, the sender keeps the instance")
    assert not set(later.sop_instance_uids) & set(recorded_uids(sessions))
    assert job_state(sessions, series.series_instance_uid)[0] in (JobState.QUEUED, JobState.PROCESSING)
    assert times_reached(sessions, series.series_instance_uid, JobState.FAILED) == 0

    filler.unlink()  # space returns: no operator action needed
    wait_for_state(sessions, series.series_instance_uid, JobState.DONE)
    assert times_reached(sessions, series.series_instance_uid, JobState.DONE) == 1
    assert send_with_pynetdicom(node.port, later.files) == [(status.SUCCESS, "")] * len(later.files)
    assert sorted(recorded_uids(sessions)) == sorted(series.sop_instance_uids + later.sop_instance_uids)
    assert_byte_identical(later, stored_instances(storage), later.sop_instance_uids)
    wait_for_state(sessions, later.series_instance_uid, JobState.DONE)  # sent again: whole, not partial
    assert "partial series" not in (job_state(sessions, later.series_instance_uid)[1] or "")
    assert all(pid_alive(pid) for pid in workers) and "worker.died" not in node.log()
    assert_no_temporary_files(storage)
