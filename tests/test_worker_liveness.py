"""A worker of `serve` that freezes while it holds no job is ended and replaced, and the queue goes on.

The freeze is real: SIGSTOP on the worker process of a real `dicom-node serve`, before any series arrives, so
no lease can run out (it holds none); the series sent next must still be segmented, by the worker that replaces it.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from db.jobs import job_for_series_uid
from db.models import JobState
from dicom_node.phantom import PhantomSpec, write_phantom_series
from tests.conftest import CT_RULES, Node, storescu, wait_for

pytestmark = pytest.mark.integration

SMALL = PhantomSpec(rows=64, columns=64, slices=12, pixel_spacing=(5.0, 5.0), slice_spacing=5.0, seed=7)


def _worker_pids(node: Node) -> list[int]:
    return [int(pid) for pid in re.findall(r"worker\.started worker=\d+ pid=(\d+)", node.log())]


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie not yet reaped counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def test_an_idle_worker_that_freezes_is_ended_and_its_replacement_processes_the_next_series(tmp_path, start_node):
    # Idle limit: max(lease 4 s, busy timeout 1 s + 5 s pause between tries) + poll 0.2 s = 6.2 s.
    node = start_node(
        rules=CT_RULES,
        inference={"workers": 1, "lease_seconds": 4, "lease_renew_seconds": 1, "job_timeout_minutes": None},
        database={"busy_timeout_seconds": 1},
    )
    wait_for(lambda: "worker.ready" in node.log(), timeout=180, what="the worker to poll the queue")
    (frozen,) = _worker_pids(node)
    os.kill(frozen, signal.SIGSTOP)  # idle: it holds no job, so no lease can run out
    try:
        series = write_phantom_series(tmp_path / "series", SMALL)
        assert storescu(node.port, series.files).returncode == 0

        node.wait_for_state(series.series_instance_uid, JobState.DONE, timeout=300)
    finally:
        if not _gone(frozen):
            os.kill(frozen, signal.SIGCONT)

    ended = re.search(r"worker\.ended worker=0 pid=(\d+) reason=\"([^\"]*)\"", node.log())
    assert ended is not None, node.log()
    assert int(ended.group(1)) == frozen
    assert re.fullmatch(
        rf"worker 0 \(process {frozen}\) was ended because it showed no sign of life for \d+ s while it held no "
        r"job \(frozen, or stuck in a database query; the limit is 6\.2 s, set by inference\.lease_seconds and "
        r"database\.busy_timeout_seconds\); a new worker takes its place",
        ended.group(2),
    ), ended.group(2)
    assert _gone(frozen)
    pids = _worker_pids(node)
    assert len(pids) == 2 and pids[0] == frozen
    with node.sessions() as session:
        job = job_for_series_uid(session, series.series_instance_uid)
        assert job is not None
        assert job.claimed_by is not None and job.claimed_by.endswith(f":{pids[1]}")  # done by the replacement
        assert job.worker_deaths == 0  # the frozen worker never held it
        assert [e.to_state for e in job.events].count(JobState.PROCESSING) == 1
