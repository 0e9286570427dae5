"""A frozen or hung worker cannot stop the queue, and a results folder that cannot be written holds the job, named.

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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from db.jobs import job_for_series_uid
from db.models import JobState
from dicom_node.encode.sr import DEVICE_UID_FILE
from dicom_node.phantom import PhantomSpec, write_phantom_series
from tests.conftest import CT_RULES, Node, storescu, wait_for

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
