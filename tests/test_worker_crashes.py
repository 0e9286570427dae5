"""A worker that dies on a series (killed, out of memory) cannot block the inference queue for ever."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time

import pytest

from db.jobs import job_for_series_uid
from db.models import JobState
from dicom_node.phantom import PhantomSpec, write_phantom_series
from tests.conftest import CT_RULES, storescu, wait_for

pytestmark = pytest.mark.integration

POISON = PhantomSpec(rows=256, columns=256, slices=80, pixel_spacing=(1.5, 1.5), slice_spacing=3.0, noise_sd=5.0)
HEALTHY = PhantomSpec(rows=96, columns=96, slices=20, pixel_spacing=(4.0, 4.0), slice_spacing=5.0, seed=3)
STAGES = "claimed|model|load|segment|measure|write|encode"


def test_poison_series_fails_after_the_crash_limit_and_the_next_series_is_done(tmp_path, start_node):
    poison = write_phantom_series(tmp_path / "poison", POISON)
    healthy = write_phantom_series(tmp_path / "healthy", HEALTHY)
    node = start_node(rules=CT_RULES, inference={"workers": 1, "max_worker_deaths": 2})
    assert storescu(node.port, poison.files).returncode == 0

    killed: list[int] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        with node.sessions() as session:
            job = job_for_series_uid(session, poison.series_instance_uid)
            state, claimed_by = (job.state, job.claimed_by) if job else (None, None)
        if state is JobState.FAILED:
            break
        if state is JobState.PROCESSING and claimed_by:
            pid = int(claimed_by.rpartition(":")[2])
            if pid not in killed:
                os.kill(pid, signal.SIGKILL)  # the worker dies holding the poison series
                killed.append(pid)
                if len(killed) == 1:
                    assert storescu(node.port, healthy.files).returncode == 0
        time.sleep(0.02)

    assert len(killed) == 2
    reason = node.job_reason(poison.series_instance_uid)
    assert re.fullmatch(rf"worker died while processing \(2 times\): last seen in stage ({STAGES})", reason), reason
    with node.sessions() as session:
        job = job_for_series_uid(session, poison.series_instance_uid)
        events = [(e.to_state, e.reason) for e in job.events]
        assert job.worker_deaths == 2
    requeued = [r for s, r in events if s is JobState.QUEUED and r.startswith("worker ")]
    assert len(requeued) == 1
    assert re.fullmatch(
        rf"worker \S+:{killed[0]} died in stage ({STAGES}) \(1 of 2 allowed\); queued again", requeued[0]
    )
    node.wait_for_state(healthy.series_instance_uid, JobState.DONE, timeout=180)
    assert "job.worker_died" in node.log()
    assert "worker.died" in node.log() and "it was killed (signal 9, SIGKILL), most often by the kernel's" in node.log()
    assert "workers  died 2 time(s) on this series" in node.cli("show", poison.series_instance_uid).stdout


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.integration
def test_workers_stop_when_serve_is_killed(tmp_path, start_node):
    node = start_node(rules=CT_RULES, inference={"workers": 1})
    deadline = time.monotonic() + 60
    while not (
        workers := [p for p in _children(node.process.pid) if "spawn_main" in open(f"/proc/{p}/cmdline").read()]
    ):
        assert time.monotonic() < deadline, "no worker process started"
        time.sleep(0.2)

    node.kill()  # SIGKILL: serve cannot stop its workers itself

    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in workers):
        assert time.monotonic() < deadline, f"worker(s) {workers} outlived the killed serve"
        time.sleep(0.2)


def _kill_node_and_workers(node) -> None:
    """SIGKILL serve and every process it started at once, as a power cut or a container kill does."""
    children = _children(node.process.pid)
    node.kill()
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_node_restarts_during_one_series_are_not_counted_as_crashes_of_it(tmp_path, start_node):
    """Two power cuts while the same series is segmented: it is done after the second restart, not failed."""
    series = write_phantom_series(tmp_path / "ct", POISON)
    node = start_node(rules=CT_RULES, inference={"workers": 1, "max_worker_deaths": 2})
    assert storescu(node.port, series.files).returncode == 0

    for _restart in range(2):
        node.wait_for_state(series.series_instance_uid, JobState.PROCESSING, timeout=120)
        _kill_node_and_workers(node)
        node.start()
    node.wait_for_state(series.series_instance_uid, JobState.DONE, timeout=300)

    with node.sessions() as session:
        job = job_for_series_uid(session, series.series_instance_uid)
        assert job is not None and job.worker_deaths == 0
        restarts = [e.reason for e in job.events if e.reason.startswith("the node was restarted")]
    assert len(restarts) == 2, restarts
    assert re.fullmatch(
        rf"the node was restarted while worker \S+:\d+ processed the series in stage ({STAGES}) "
        r"\(not counted as a crash of this series\); queued again",
        restarts[0],
    )


def _started_workers(log: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"worker\.started worker=0 pid=(\d+)", log)]


def test_a_worker_that_keeps_dying_while_it_starts_is_started_ever_later_and_counted_down(tmp_path, start_node):
    """A worker killed each time while it loads its models (out of memory at load, a broken install) was started
    again every 5 s for ever, and counted as up between its deaths, so `dicom_node_workers_up == 0` never held
    long enough to alert."""
    node = start_node(rules=CT_RULES, inference={"workers": 1})
    wait_for(lambda: "worker.ready" in node.log(), timeout=120, what="the first worker to be ready")
    first = _started_workers(node.log())[0]
    os.kill(first, signal.SIGKILL)  # a ready worker dies: its slot starts again after the usual 5 s

    killed = [first]
    deadline = time.monotonic() + 120
    while len(killed) < 3 and time.monotonic() < deadline:
        fresh = [pid for pid in _started_workers(node.log()) if pid not in killed]
        for pid in fresh:  # killed before it is ready
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        time.sleep(0.05)
    assert len(killed) == 3, node.log()

    wait_for(lambda: f"pid={killed[2]} exit_code=-9" in node.log(), timeout=30, what="the third death logged")
    died = [line for line in node.log().splitlines() if "worker.died" in line]
    assert "died before it was ready" not in died[0]
    assert (
        "it died before it was ready (while starting or loading its models), 1 time(s) in a row: the next one "
        "starts 5 s after this one did" in died[1]
    )
    assert (
        "2 time(s) in a row: the next one starts 10 s after this one did, and the node counts no worker up in "
        "this slot until one is ready" in died[2]
    )
    starts = [line for line in node.log().splitlines() if "worker.started" in line]
    assert len(starts) == 3  # the fourth waits 10 s after the third started

    healthy = write_phantom_series(tmp_path / "healthy", HEALTHY)  # the next worker that is ready does the work
    assert storescu(node.port, healthy.files).returncode == 0
    node.wait_for_state(healthy.series_instance_uid, JobState.DONE, timeout=180)


def test_a_slot_whose_workers_die_while_starting_counts_no_worker_up_until_one_is_ready(tmp_path):
    """What `dicom_node_workers_up` and /readyz count: a worker starting in a slot whose last worker died before it
    was ready is not up (a crash loop showed as up between its deaths); the first start of a slot is."""
    import multiprocessing
    from types import SimpleNamespace

    from dicom_node.config import Settings
    from dicom_node.service import WorkerSupervisor
    from dicom_node.worker_watch import IdlePulse

    supervisor = WorkerSupervisor(Settings(storage={"directory": tmp_path}, inference={"workers": 1}))
    pulse = IdlePulse(multiprocessing.get_context("spawn"))
    supervisor._processes = [SimpleNamespace(pid=12345, is_alive=lambda: True)]  # type: ignore[list-item]
    supervisor._slot_pulses = {0: pulse}

    supervisor._failed_starts = [0]
    assert supervisor.alive_count() == 1  # starting after a start or a ready worker: up
    supervisor._failed_starts = [2]
    assert supervisor.alive_count() == 0  # starting after two that died while starting: not up
    pulse.mark_ready()
    assert supervisor.alive_count() == 1


def test_a_worker_that_died_after_it_was_ready_is_not_counted_as_a_failed_start(tmp_path):
    """A worker ready and dead within one supervision check (0.5 s) kept its slot's count of failed starts: the next
    one waited the longer delay and counted as not up until ready. Ready, its death resets the count."""
    import multiprocessing
    from types import SimpleNamespace

    from dicom_node.config import Settings
    from dicom_node.service import WorkerSupervisor
    from dicom_node.worker_watch import IdlePulse

    supervisor = WorkerSupervisor(Settings(storage={"directory": tmp_path}, inference={"workers": 1}))
    pulse = IdlePulse(multiprocessing.get_context("spawn"))
    supervisor._slot_pulses = {0: pulse}
    supervisor._failed_starts = [3]  # three before it died while starting
    pulse.mark_ready()
    supervisor._record_death(0, SimpleNamespace(pid=None, exitcode=1))  # type: ignore[arg-type]
    assert supervisor._failed_starts == [0]
    assert supervisor._restart_delay(0) == supervisor.RESTART_DELAY_SECONDS
