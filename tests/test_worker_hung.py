"""A frozen or hung worker cannot stop the queue, and a results folder that cannot be written holds the job, named.

A `dicom-node worker` (no `serve` of its own to end it) keeps the job time limit itself, and a late result of a
job it no longer holds is never recorded.

The hang is real: the node's Device Observer UID file (read by a worker in stage encode) is replaced by a named
pipe that the test opens for writing and never writes to, so the worker's main thread waits in the kernel, as on
a hung disk, while its heartbeat thread goes on renewing the lease.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.jobs import job_for_series_uid
from db.models import Job, JobState
from db.session import make_engine, make_session_factory, migrate
from dicom_node.config import Settings
from dicom_node.encode.sr import DEVICE_UID_FILE
from dicom_node.phantom import PhantomSpec, write_phantom_series
from dicom_node.pipeline import STAGING_PREFIX
from dicom_node.service import WorkerSupervisor
from dicom_node.worker import EXIT_JOB_OVER_TIME, InferenceWorker
from tests.conftest import CT_RULES, Node, seed_queued_series, storescu, wait_for
from tests.test_scaleout import start_worker, worker_config

pytestmark = pytest.mark.integration

SMALL = PhantomSpec(rows=64, columns=64, slices=12, pixel_spacing=(5.0, 5.0), slice_spacing=5.0, seed=5)
FAST_CHECKS = {"workers": 1, "lease_seconds": 20, "lease_renew_seconds": 1}


@pytest.fixture
def node_with_storage(tmp_path: Path) -> Iterator[Any]:
    """Factory: a real `serve` whose storage folder the test may prepare (``prepare(storage)``) before it starts."""
    nodes: list[Node] = []

    def _start(prepare: Any = None, **settings: Any) -> Node:
        node = Node(tmp_path / f"node{len(nodes)}", {"rules": CT_RULES, **settings})
        node.storage.mkdir(parents=True, exist_ok=True)
        if prepare is not None:
            prepare(node.storage)
        nodes.append(node)
        return node.start()

    yield _start
    for node in nodes:
        node.stop()


@contextlib.contextmanager
def hung_reader(storage: Path) -> Iterator[Any]:
    """Replace the node's Device Observer UID file with a named pipe; yields a function that waits until a worker
    reads it and then holds the pipe open without writing, so that worker's read never returns."""
    pipe = storage / DEVICE_UID_FILE
    held: list[int] = []

    def wait_until_read() -> None:
        held.append(wait_for(lambda: _open_for_writing(pipe), timeout=300, what="a worker to read the named pipe"))
        pipe.unlink()  # the worker keeps waiting on it; the next worker makes the file afresh

    try:
        yield wait_until_read
    finally:
        for fd in held:
            os.close(fd)


def _open_for_writing(pipe: Path) -> int | None:
    try:
        return os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no reader yet
            return None
        raise


def _make_pipe(storage: Path) -> None:
    os.mkfifo(storage / DEVICE_UID_FILE)


def _job(node: Node, series_instance_uid: str) -> tuple[JobState, str | None, str | None, list[tuple[JobState, str]]]:
    with node.sessions() as session:
        job = job_for_series_uid(session, series_instance_uid)
        assert job is not None
        return job.state, job.claimed_by, job.reason, [(e.to_state, e.reason or "") for e in job.events]


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie not yet reaped counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def _status_line(node: Node, uid: str) -> str | None:
    said = " ".join(node.cli("status").stdout.split())  # as one line: the terminal wraps long sentences
    found = re.search(rf"series {re.escape(uid)}: worker \S+ stopped renewing its lease .*?\)", said)
    return found.group(0) if found else None


def test_a_frozen_worker_is_ended_its_series_queued_again_and_the_next_series_done(tmp_path, node_with_storage):
    frozen_series = write_phantom_series(tmp_path / "frozen", SMALL)
    next_series = write_phantom_series(tmp_path / "next", SMALL)
    with hung_reader(tmp_path / "node0" / "storage") as wait_until_read:
        node = node_with_storage(_make_pipe, inference={**FAST_CHECKS, "job_timeout_minutes": None})
        assert storescu(node.port, frozen_series.files).returncode == 0
        wait_until_read()  # the worker is inside the job, in stage encode
        _, claimed_by, _, _ = _job(node, frozen_series.series_instance_uid)
        pid = int((claimed_by or "").rpartition(":")[2])
        os.kill(pid, signal.SIGSTOP)  # frozen: not even its heartbeat thread runs
        assert storescu(node.port, next_series.files).returncode == 0

        line = wait_for(lambda: _status_line(node, frozen_series.series_instance_uid), timeout=120, interval=0.5)
        assert re.fullmatch(
            rf"series {re.escape(frozen_series.series_instance_uid)}: worker {re.escape(claimed_by or '')} stopped "
            r"renewing its lease \d+ s ago in stage encode \(it is frozen, hung or gone\)",
            line,
        ), line

        node.wait_for_state(next_series.series_instance_uid, JobState.DONE, timeout=300)
        node.wait_for_state(frozen_series.series_instance_uid, JobState.DONE, timeout=300)

    _, _, _, events = _job(node, frozen_series.series_instance_uid)
    requeued = [reason for to_state, reason in events if to_state is JobState.QUEUED and "taken from" in reason]
    assert len(requeued) == 1, events
    assert re.fullmatch(
        rf"taken from worker {re.escape(claimed_by or '')} in stage encode: it stopped renewing its lease \(frozen "
        r"or hung; the lease ran out \d+ s ago\), so serve ended it \(1 of 2 allowed by "
        r"inference.max_worker_deaths\); queued again",
        requeued[0],
    ), requeued[0]
    assert _gone(pid)
    assert "worker.ended" in node.log()


def test_a_job_past_the_time_limit_has_its_worker_ended_and_fails_at_the_crash_limit(tmp_path, node_with_storage):
    hung_series = write_phantom_series(tmp_path / "hung", SMALL)
    next_series = write_phantom_series(tmp_path / "next", SMALL)
    with hung_reader(tmp_path / "node0" / "storage") as wait_until_read:
        node = node_with_storage(
            _make_pipe, inference={**FAST_CHECKS, "job_timeout_minutes": 0.25, "max_worker_deaths": 1}
        )
        assert storescu(node.port, hung_series.files).returncode == 0
        wait_until_read()  # stuck in the kernel while its heartbeat renews the lease: only the time limit helps
        _, claimed_by, _, _ = _job(node, hung_series.series_instance_uid)
        pid = int((claimed_by or "").rpartition(":")[2])
        assert storescu(node.port, next_series.files).returncode == 0

        node.wait_for_state(hung_series.series_instance_uid, JobState.FAILED, timeout=300)
        node.wait_for_state(next_series.series_instance_uid, JobState.DONE, timeout=300)

    _, _, reason, _ = _job(node, hung_series.series_instance_uid)
    assert reason == (
        f"taken from worker {claimed_by} in stage encode: the job ran past the time limit of 0.25 min "
        "(inference.job_timeout_minutes), so serve ended the worker; raise the limit if the series needs longer "
        "(1 of 1 allowed by inference.max_worker_deaths, so the series is not tried again)"
    )
    assert _gone(pid)


def test_a_results_folder_that_cannot_be_written_holds_the_job_named_until_it_is_fixed(tmp_path, node_with_storage):
    series = write_phantom_series(tmp_path / "series", SMALL)
    results = tmp_path / "node0" / "storage" / "jobs"
    as_root = os.geteuid() == 0  # root writes into any folder: a file where the folder belongs stops it instead

    def break_results_folder(storage: Path) -> None:
        if as_root:
            results.write_text("not a folder")
        else:
            results.mkdir()
            results.chmod(0o500)

    try:
        node = node_with_storage(break_results_folder, inference={"workers": 1}, storage={"disk_full_retry_seconds": 2})
        assert storescu(node.port, series.files).returncode == 0
        uid = series.series_instance_uid
        wait_for(
            lambda: (node.job_reason(uid) or "").startswith("waiting for the results folder"),
            timeout=300,
            what="the job to wait for its results folder",
        )
        state, _, reason, _ = _job(node, uid)
        with node.sessions() as session:
            job = job_for_series_uid(session, uid)
            assert job is not None
            job_folder = results / str(job.id)
            assert job.worker_deaths == 0
        words = "not a directory" if as_root else "permission denied"
        assert state is JobState.QUEUED
        assert re.fullmatch(
            rf"waiting for the results folder {re.escape(str(results))} to be usable: {words}: "
            rf"{re.escape(str(job_folder))} while writing the results; tried again from \d\d:\d\d:\d\d UTC",
            reason or "",
        ), reason
    finally:
        if as_root:
            results.unlink(missing_ok=True)
        elif results.exists():
            results.chmod(0o700)  # the administrator's fix

    node.wait_for_state(uid, JobState.DONE, timeout=300)
    _, _, _, events = _job(node, uid)
    assert all(to_state is not JobState.FAILED for to_state, _ in events)
    assert (job_folder / "segmentation.json").is_file()


# --- `dicom-node worker` (no serve of its own to end it) keeps the job time limit itself ---


def _standalone_worker_setup(tmp_path: Path, **inference: float) -> tuple[sessionmaker[Session], Path]:
    """A SQLite database with one series QUEUED, its storage folder's Device Observer UID file a named pipe, and
    the config of `dicom-node worker` processes on it (``inference`` settings)."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    migrate(url)
    sessions = make_session_factory(make_engine(url))
    seed_queued_series(sessions, tmp_path / "series", 1, SMALL)
    config = worker_config(tmp_path, url, **inference)
    (tmp_path / "storage").mkdir()
    _make_pipe(tmp_path / "storage")
    return sessions, config


def _the_job(sessions: sessionmaker[Session]) -> Job:
    with sessions() as session:
        job = session.scalars(select(Job)).one()
        _ = job.events  # loaded while the session is open
        return job


def _over_time_reason(worker: str, minutes: str, outcome: str) -> str:
    return (
        f"taken from worker {worker} in stage encode: the job ran past the time limit of {minutes} min "
        "(inference.job_timeout_minutes), so the worker gave it up itself; raise the limit if the series needs "
        f"longer {outcome}"
    )


def _log_reasons(log: Path, event: str) -> list[str]:
    return re.findall(rf" {re.escape(event)} .*?reason=\"([^\"]*)\"", log.read_text(errors="replace"))


def test_a_standalone_worker_past_the_time_limit_gives_up_its_job_and_exits_when_the_job_cannot_stop(tmp_path):
    sessions, config = _standalone_worker_setup(tmp_path, job_timeout_minutes=0.25, shutdown_grace_seconds=1)
    log = tmp_path / "worker.log"
    with hung_reader(tmp_path / "storage") as wait_until_read:
        worker = start_worker(config, "remote-host", log)
        try:
            wait_until_read()  # stuck in the kernel in stage encode, its heartbeat renewing the lease
            assert worker.wait(timeout=120) == EXIT_JOB_OVER_TIME
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()

    identity = f"remote-host:{worker.pid}"
    job = _the_job(sessions)
    assert job.state is JobState.QUEUED and job.worker_deaths == 1
    assert job.reason == _over_time_reason(
        identity, "0.25", "(1 of 2 allowed by inference.max_worker_deaths); queued again"
    )
    assert _log_reasons(log, "job.time_limit") == [
        f"worker {identity} gave up job {job.id}, which ran past the time limit of 0.25 min "
        "(inference.job_timeout_minutes): it is queued again; the worker exits unless the job stops within 1 s "
        "(inference.shutdown_grace_seconds)"
    ]
    assert _log_reasons(log, "worker.exiting") == [
        f"worker {identity} is exiting because job {job.id} ran past the time limit of 0.25 min "
        "(inference.job_timeout_minutes) and did not stop within 1 s; its service manager starts it again"
    ]

    restarted = start_worker(config, "remote-host", tmp_path / "restarted.log")  # as its service manager would
    try:
        wait_for(lambda: _the_job(sessions).state is JobState.DONE, timeout=300, what="the job done after the restart")
    finally:
        restarted.terminate()
        restarted.wait(timeout=60)


def test_a_standalone_workers_late_result_of_a_job_it_gave_up_is_discarded_and_it_works_on(tmp_path):
    """The job is given up at the time limit, then the hung read returns within the grace: the pipeline finishes,
    but its result is not recorded (the job is no longer that claim's); the worker stays and claims it afresh."""
    sessions, config = _standalone_worker_setup(tmp_path, job_timeout_minutes=0.4, shutdown_grace_seconds=120)
    pipe = tmp_path / "storage" / DEVICE_UID_FILE
    log = tmp_path / "worker.log"
    worker = start_worker(config, "remote-host", log)
    writer: int | None = None
    try:
        writer = wait_for(lambda: _open_for_writing(pipe), timeout=300, what="the worker to read the named pipe")
        pipe.unlink()  # its next run makes the file afresh
        identity = f"remote-host:{worker.pid}"
        given_up = _over_time_reason(identity, "0.4", "(1 of 2 allowed by inference.max_worker_deaths); queued again")
        wait_for(lambda: _the_job(sessions).reason == given_up, timeout=120, what="the job given up")
        os.write(writer, b"2.25.302731398416390122766540924390613420305\n")  # the read returns: encode finishes
        os.close(writer)
        writer = None

        wait_for(lambda: _the_job(sessions).state is JobState.DONE, timeout=300, what="the job's second claim done")
        assert worker.poll() is None  # the job stopped within the grace: no exit
    finally:
        if writer is not None:
            os.close(writer)
        worker.terminate()
        worker.wait(timeout=60)

    job = _the_job(sessions)
    assert job.claimed_by == identity and job.attempts == 2 and job.worker_deaths == 1
    assert [e.to_state for e in job.events].count(JobState.DONE) == 1
    assert [(e.from_state, e.to_state, e.reason) for e in job.events if e.to_state is JobState.QUEUED][-1] == (
        JobState.PROCESSING,
        JobState.QUEUED,
        given_up,
    )
    assert _log_reasons(log, "job.result_discarded") == [
        f"the job was taken from this claim meanwhile; it is QUEUED: {given_up}"
    ]
    assert "worker.exiting" not in log.read_text()
    job_folder = Path(job.result_path or "")
    assert job_folder.is_dir() and not [p for p in job_folder.iterdir() if p.name.startswith(STAGING_PREFIX)]


def test_a_remote_workers_late_result_after_serve_took_its_job_past_the_time_limit_is_discarded(
    tmp_path, database_url, caplog
):
    """serve cannot end a worker on another host: it queues the job again; the worker's late finish is refused."""
    migrate(database_url)
    settings = Settings(
        storage={"directory": tmp_path / "storage"},
        database={"url": database_url},
        inference={"workers": 0, "job_timeout_minutes": 0.01},
    )
    sessions = make_session_factory(make_engine(database_url))
    seed_queued_series(sessions, tmp_path / "series", 1, SMALL)
    remote = InferenceWorker(settings, sessions, "gpu-host:4242")
    claim = remote.claim()
    assert claim is not None
    supervisor = WorkerSupervisor(settings, sessions)
    supervisor.check_hung_workers()  # serve first sees the claim
    wait_for(
        lambda: supervisor.check_hung_workers() or _the_job(sessions).state is JobState.QUEUED,
        timeout=30,
        what="serve to take the job past its time limit",
    )
    taken = _the_job(sessions).reason

    remote.process(claim)  # the remote worker finishes late

    job = _the_job(sessions)
    assert job.state is JobState.QUEUED and job.result_path is None and job.reason == taken
    assert taken == (
        "taken from worker gpu-host:4242 in stage claimed: the job ran past the time limit of 0.01 min "
        "(inference.job_timeout_minutes), so serve took the job from that worker (one serve did not start: it gives "
        "the job up itself at its own limit); raise the limit if the series needs longer (1 of 2 allowed by "
        "inference.max_worker_deaths); queued again"
    )
    discarded = [r for r in caplog.records if r.getMessage() == "job.result_discarded"]
    assert [r.event_fields["reason"] for r in discarded] == [  # type: ignore[attr-defined]
        f"the job was taken from this claim meanwhile; it is QUEUED: {taken}"
    ]
    job_folder = settings.jobs_directory / str(job.id)
    assert not job_folder.exists() or not any(job_folder.iterdir())  # its staged files were removed

    assert InferenceWorker(settings, sessions, "other-host:1").run_once()
    assert _the_job(sessions).state is JobState.DONE


def test_a_worker_asked_to_stop_while_starting_exits_at_once_having_taken_no_job(tmp_path):
    """SIGTERM while the worker still waits for the database at start-up (another process holds its write lock):
    it exits cleanly without waiting out the grace, which is for a running job, and the queued series stays queued."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    migrate(url)
    sessions = make_session_factory(make_engine(url))
    seed_queued_series(sessions, tmp_path / "series", 1, SMALL)
    config = worker_config(tmp_path, url, shutdown_grace_seconds=600)
    settings = yaml.safe_load(config.read_text())
    settings["database"]["busy_timeout_seconds"] = 0.5  # the lock wait returns often enough for SIGTERM to be seen
    config.write_text(yaml.safe_dump(settings))
    log = tmp_path / "worker.log"
    holder = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # as another process writing for a long time (readers go on)
    worker = start_worker(config, "remote-host", log)
    try:
        wait_for(lambda: "database.busy" in log.read_text(errors="replace"), timeout=120, what="the worker waiting")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=300) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        holder.execute("ROLLBACK")
        holder.close()

    identity = f"remote-host:{worker.pid}"
    assert _log_reasons(log, "worker.stopped_while_starting") == [
        f"worker {identity} was asked to stop while it was still starting (loading its models or waiting for the "
        "database); it had taken no job, so it stops now"
    ]
    job = _the_job(sessions)
    assert job.state is JobState.QUEUED and job.claimed_by is None and job.worker_deaths == 0
