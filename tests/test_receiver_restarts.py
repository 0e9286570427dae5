"""A real ``dicom-node serve`` started again after its receiving processes stopped: one that keeps dying is named
with how it ended, in words, and started again after a delay that grows; a start on a full disk with acknowledged
images still to record says so in one sentence and loses none of them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from db.session import make_engine, make_session_factory
from dicom_node.phantom import PhantomSpec, write_phantom_series
from tests.conftest import DICOM_NODE, free_port, storescu, wait_for
from tests.console_helpers import console_settings
from tests.test_faults import (
    fill_disk,
    hold_database_lock,
    recorded_uids,
    small_disk,  # noqa: F401 - the fixture: a small tmpfs
)
from tests.test_receive_concurrency import journal_entries, store_on_one_association

pytestmark = pytest.mark.integration

TWO_RECEIVERS = {"receive": {"processes": 2}}


def receiving_processes(serve_pid: int) -> set[int]:
    """The pids of ``serve``'s receiving processes now (its children started by multiprocessing's spawn)."""
    children: set[int] = set()
    for task in Path(f"/proc/{serve_pid}/task").iterdir():
        try:
            children.update(int(pid) for pid in (task / "children").read_text().split())
        except OSError:
            continue  # the thread ended meanwhile
    spawned = set()
    for pid in children:
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                spawned.add(pid)
        except OSError:
            continue  # ended meanwhile
    return spawned


def died_lines(log: str) -> list[tuple[int, float, str]]:
    """(pid, restart delay, reason) of each ``receiver.died`` line."""
    pattern = r"receiver\.died receiver=\d+ pid=(\d+) restart_in_seconds=([\d.]+) reason=\"([^\"]*)\""
    return [(int(pid), float(delay), reason) for pid, delay, reason in re.findall(pattern, log)]


def test_a_receiving_process_killed_again_and_again_is_named_and_restarted_ever_later(tmp_path, start_node):
    """Each new incarnation is killed the moment it appears (before it listens, as often as not): each death names
    the process that died and its signal, and the starts again wait 1, 2, 4 s; the other process keeps receiving."""
    node = start_node(**TWO_RECEIVERS, completion={"quiet_seconds": 600})
    assert node.process is not None
    serve = node.process.pid
    wait_for(lambda: "scp.listening" in node.log(), timeout=60, what="both receiving processes to listen")
    known = receiving_processes(serve)
    killed: list[int] = []
    victim = min(known)
    for _ in range(3):
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)
        known.discard(victim)
        victim = wait_for(
            lambda: next(iter(receiving_processes(serve) - known - set(killed)), None),
            timeout=60,
            what="the killed receiving process to be started again",
        )
    wait_for(lambda: len(died_lines(node.log())) == 3, timeout=60, what="three receiver.died lines")

    died = died_lines(node.log())
    assert [pid for pid, _, _ in died] == killed
    assert [delay for _, delay, _ in died] == [1.0, 2.0, 4.0]
    assert all(
        re.match(
            rf"receiving process \d \(pid {pid}\) stopped after running [0-9.]+ s: it was killed \(signal 9, "
            r"SIGKILL\), most often by the kernel's out-of-memory killer",
            reason,
        )
        for pid, _, reason in died
    ), died
    series = write_phantom_series(tmp_path / "ct", PhantomSpec(rows=16, columns=16, slices=3))
    assert storescu(node.port, series.files).returncode == 0


def test_a_start_on_a_full_disk_with_images_still_to_record_says_so_and_loses_none(
    tmp_path,
    small_disk,  # noqa: F811 - the fixture imported above
    start_node,
):
    """Images acknowledged while the database was locked wait in the journals when serve is killed; the disk holding
    storage and the database then fills. The next start cannot record them: it says why in one sentence and exits 1,
    the files stay; once space is freed, the next start records every one."""
    series = write_phantom_series(tmp_path / "ct", PhantomSpec(rows=64, columns=64, slices=6))
    storage = small_disk / "storage"
    node = start_node(
        storage={"directory": str(storage)},
        database={"busy_timeout_seconds": 1},
        completion={"quiet_seconds": 600},
        **TWO_RECEIVERS,
    )
    wait_for(lambda: "scp.listening" in node.log(), timeout=60, what="both receiving processes to listen")
    holder = hold_database_lock(storage / "dicom-node.db", seconds=8)
    answers, _association = store_on_one_association(node.port, series.files)
    assert answers == [0] * len(series.files) and journal_entries(storage) == len(series.files)
    assert node.process is not None
    node.process.kill()  # its receiving processes die with it
    node.process.wait()
    holder.kill()
    holder.wait()
    time.sleep(1)  # a receiver inside a write finishes it
    filler = fill_disk(small_disk)

    started = subprocess.run(
        [DICOM_NODE, "serve", "--config", str(node.config_path)], capture_output=True, text=True, timeout=120
    )

    database = storage / "dicom-node.db"
    assert started.returncode == 1
    assert started.stderr.strip().splitlines()[-1] == (
        f"cannot start: the disk holding the database file {database} is full: free space on it (in {storage} or "
        f"elsewhere); start-up cannot record the images stored before the node stopped: they are kept in {storage} "
        "and are recorded at the first start that can write the database"
    )
    assert "Traceback" not in started.stdout + started.stderr
    assert len(list((storage / "instances").rglob("*.dcm"))) == len(series.files)

    filler.unlink()
    node.start()
    wait_for(lambda: "node.ready" in node.log(), timeout=60, what="the node to start with space")
    sessions = make_session_factory(make_engine(f"sqlite:///{database}"))
    assert sorted(recorded_uids(sessions)) == sorted(series.sop_instance_uids)


def test_readyz_is_503_while_no_receiving_process_is_alive_and_200_once_one_is_again(tmp_path, start_node):
    """The port ``serve`` binds for its receiving processes takes connections into its queue even while none of them
    lives to answer: /readyz and /metrics ask the supervisor how many are alive, not only whether the port answers."""
    metrics_port = free_port()
    node = start_node(**TWO_RECEIVERS, console=console_settings(free_port(), metrics_port=metrics_port))
    assert node.process is not None
    ready_url = f"http://127.0.0.1:{metrics_port}/readyz"
    wait_for(lambda: _ready(ready_url) == 200, timeout=60, what="/readyz to answer 200")
    assert httpx.get(ready_url).json()["checks"]["receiver"] is True
    assert _receivers_up(metrics_port) == 2

    for pid in receiving_processes(node.process.pid):
        os.kill(pid, signal.SIGKILL)
    seen = wait_for(
        lambda: (answer := httpx.get(ready_url)).status_code == 503 and answer.json(),
        timeout=30,
        interval=0.05,
        what="/readyz to answer 503 while no receiving process is alive",
    )
    assert seen["checks"]["receiver"] is False  # the port takes connections; "scp" (a C-ECHO) fails unless one is back

    wait_for(lambda: _ready(ready_url) == 200, timeout=60, what="/readyz to answer 200 again")
    wait_for(lambda: _receivers_up(metrics_port) == 2, timeout=60, what="both receiving processes to be counted again")


def _ready(url: str) -> int | None:
    """/readyz's status code; None while the console does not answer yet."""
    try:
        return httpx.get(url).status_code
    except httpx.TransportError:
        return None


def _receivers_up(metrics_port: int) -> float:
    """``dicom_node_receivers_up`` from the separate metrics listener."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith("dicom_node_receivers_up ")]
    assert len(values) == 1, text
    return values[0]
