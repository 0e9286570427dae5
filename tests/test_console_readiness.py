"""/readyz, dicom_node_scp_listening and the Docker health check tell whether the node receives: the DICOM port is
C-ECHOed (at most once each 5 s, however many probes ask), the storage folder is tried, and the health endpoints
answer whatever the Host header."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from dicom_node.console.metrics import Cached, Outcome
from tests.conftest import Node, free_port, wait_for
from tests.console_helpers import console_settings
from tests.test_receive_concurrency import receiver_pids

pytestmark = pytest.mark.integration

TWO_RECEIVERS = {"receive": {"processes": 2, "unresponsive_seconds": 600}}  # stopped on purpose: not ended


def _health(node: Node) -> subprocess.CompletedProcess[str]:
    """The Docker HEALTHCHECK command, reading the node's configuration as the container does."""
    return subprocess.run(
        [sys.executable, "-m", "dicom_node.console.health"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "DICOM_NODE_CONFIG": str(node.config_path)},
    )


def _ready(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=15)
    except httpx.TransportError:
        return None


def _metric(metrics_port: int, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=15).text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"{name} ")]
    assert len(values) == 1, text
    return values[0]


@pytest.fixture
def receiving_node(start_node) -> Iterator[tuple[Node, int]]:
    metrics_port = free_port()
    node = start_node(**TWO_RECEIVERS, console=console_settings(free_port(), metrics_port=metrics_port))
    wait_for(lambda: len(receiver_pids(node.log())) == 2, timeout=60, what="both receiving processes to start")
    ready_url = f"http://127.0.0.1:{metrics_port}/readyz"
    wait_for(lambda: (answer := _ready(ready_url)) is not None and answer.status_code == 200, timeout=60, what="ready")
    yield node, metrics_port


def test_every_receiving_process_stopped_makes_readyz_503_and_the_health_check_fail(receiving_node):
    """SIGSTOP leaves the processes alive and the port taking connections into the kernel's queue, answered by
    nobody: before, /readyz said 200, the health check exited 0 and dicom_node_scp_listening was 1."""
    node, metrics_port = receiving_node
    ready_url = f"http://127.0.0.1:{metrics_port}/readyz"
    pids = list(receiver_pids(node.log()).values())
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        answer = wait_for(
            lambda: (seen := _ready(ready_url)) is not None and seen.status_code == 503 and seen,
            timeout=30,
            what="/readyz to answer 503 while every receiving process is stopped",
        )
        body = answer.json()
        assert body["ready"] is False and body["checks"]["scp"] is False
        assert (
            f"the DICOM port {node.port} accepted a connection but did not answer a C-ECHO within 5 s"
            in body["reasons"][0]
        ), body
        assert _metric(metrics_port, "dicom_node_scp_listening") == 0
        health = _health(node)
        assert health.returncode == 1, health.stdout + health.stderr
        assert "did not answer a C-ECHO" in health.stdout
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    wait_for(lambda: (seen := _ready(ready_url)) is not None and seen.status_code == 200, timeout=30, what="200")
    assert _health(node).returncode == 0
    assert _metric(metrics_port, "dicom_node_scp_listening") == 1


def test_readiness_probes_in_a_loop_cost_one_c_echo_each_5_s_and_leave_callers_their_places(receiving_node):
    """Before, every probe opened a TCP connection to the DICOM port: 16 probe loops took the places one host may
    hold (network.maximum_associations_per_host) and real callers' C-ECHOs from that host were refused."""
    from dicom_node.scu import verify

    node, metrics_port = receiving_node
    ready_url = f"http://127.0.0.1:{metrics_port}/readyz"
    before = _own_echoes(node)
    stop = time.monotonic() + 10
    answers: list[int] = []

    def probe() -> None:
        with httpx.Client(timeout=15) as client:
            while time.monotonic() < stop:
                answers.append(client.get(ready_url).status_code)

    threads = [threading.Thread(target=probe) for _ in range(16)]
    for thread in threads:
        thread.start()
    echoes = []
    while time.monotonic() < stop:
        echoes.append(verify("SENDER", node.ae_title, "127.0.0.1", node.port, timeout=5).message)
        time.sleep(0.3)
    for thread in threads:
        thread.join()
    assert set(answers) == {200} and len(answers) > 100
    assert set(echoes) == {"success"}, echoes
    assert "maximum_associations_per_host" not in node.log()
    assert "calling_ae=DICOMNODE" not in node.log()  # the node's own echoes are logged at DEBUG only
    node.stop()  # the echo records' counts still open are written
    own_echoes = _own_echoes(node) - before
    assert 1 <= own_echoes <= 4, own_echoes  # 10 s of probes: one C-ECHO each 5 s


def _own_echoes(node: Node) -> int:
    """The node's own C-ECHOs in its audit trail (one record per 10 s, each counting those it left out)."""
    from dicom_node.audit import recent

    with node.sessions() as session:
        details = [r.detail or "" for r in recent(session, actions=["echo"], peer_ae_title=node.ae_title)]
    return sum(1 + int(m.group(1) if (m := re.search(r"(\d+) more C-ECHO", d)) else 0) for d in details)


def test_the_health_check_passes_with_allowed_hosts_set_and_other_paths_still_check_the_host(start_node):
    """Before, TrustedHostMiddleware answered the health check's request to 127.0.0.1 400 "Invalid host header":
    a working node was reported unhealthy for good."""
    console_port = free_port()
    node = start_node(console=console_settings(console_port, allowed_hosts=["console.example.org"]))
    url = f"http://127.0.0.1:{console_port}"
    wait_for(lambda: _ready(f"{url}/healthz") is not None, timeout=30, what="the console to answer")
    health = _health(node)
    assert health.returncode == 0, health.stdout + health.stderr
    assert httpx.get(f"{url}/readyz").status_code == 200
    assert httpx.get(f"{url}/healthz", headers={"Host": "10.0.0.5:8080"}).json() == {"status": "ok"}
    assert httpx.get(f"{url}/login").status_code == 400  # DNS rebinding: refused as before
    assert httpx.get(f"{url}/metrics").status_code == 400
    assert httpx.get(f"{url}/login", headers={"Host": "console.example.org"}).status_code == 200


def test_storage_folder_not_writable_or_not_this_databases_makes_readyz_503(receiving_node, tmp_path):
    """Before, /readyz said 200 while every image was answered 0xA700 (incoming/ gone with an unmounted file
    system), and while an empty folder stood where the storage file system had been."""
    node, metrics_port = receiving_node
    ready_url = f"http://127.0.0.1:{metrics_port}/readyz"
    incoming = node.storage / "incoming"
    incoming.rename(tmp_path / "incoming")
    try:
        body = wait_for(
            lambda: (seen := _ready(ready_url)) is not None and seen.status_code == 503 and seen.json(),
            timeout=30,
            what="/readyz to answer 503 while incoming/ is gone",
        )
        assert body["checks"]["storage"] is False and body["checks"]["scp"] is True
        assert "the storage folder cannot be written (no such file or directory" in body["reasons"][0], body
        assert _metric(metrics_port, "dicom_node_storage_ready") == 0
    finally:
        (tmp_path / "incoming").rename(incoming)
    wait_for(lambda: (seen := _ready(ready_url)) is not None and seen.status_code == 200, timeout=30, what="200")

    marker = node.storage / ".database"
    with node.sessions() as session:
        session.execute(text("UPDATE instance_totals SET instances = 3"))
        session.commit()
    marker.rename(tmp_path / "marker")
    try:
        body = wait_for(
            lambda: (seen := _ready(ready_url)) is not None and seen.status_code == 503 and seen.json(),
            timeout=30,
            what="/readyz to answer 503 while the folder's marker is missing",
        )
        assert "does not hold this node's images" in body["reasons"][0], body
        assert "the database records 3 instances (is the storage file system mounted?)" in body["reasons"][0]
    finally:
        (tmp_path / "marker").rename(marker)
    wait_for(lambda: (seen := _ready(ready_url)) is not None and seen.status_code == 200, timeout=30, what="200")


def test_a_cached_check_runs_once_for_concurrent_callers_and_again_after_its_time():
    runs: list[float] = []
    now = [0.0]

    def slow() -> Outcome:
        runs.append(now[0])
        time.sleep(0.2)
        return Outcome(len(runs) == 1, "second")

    cached = Cached(slow, seconds=5, clock=lambda: now[0])
    results: list[Outcome] = []
    threads = [threading.Thread(target=lambda: results.append(cached())) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(runs) == 1 and all(result.ok for result in results)
    now[0] = 4.9
    assert cached().ok and len(runs) == 1
    now[0] = 10.0
    assert cached() == Outcome(False, "second") and len(runs) == 2


def test_storage_check_says_when_free_space_is_under_the_floor(tmp_path, monkeypatch):
    import shutil

    from dicom_node.config import Settings
    from dicom_node.console import metrics

    (tmp_path / "incoming").mkdir()
    settings = Settings.model_validate({"storage": {"directory": str(tmp_path)}})
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(metrics.shutil, "disk_usage", lambda _p: usage._replace(free=10 * 1024**2))
    outcome = metrics.storage_check(settings, sessions=None)  # type: ignore[arg-type]  # not reached
    assert not outcome.ok
    assert outcome.reason == (
        f"the storage folder {tmp_path} has 10.0 MB free (less than "
        f"{min(64 * 1024**2, usage.total // 10) / 1024**2:,.0f} MB): the receiver answers 0xA700 to images it "
        "cannot write"
    )
    assert not list(Path(tmp_path / "incoming").iterdir())  # the test file is gone


def test_images_waiting_minutes_to_be_recorded_make_the_storage_check_fail(tmp_path):
    """A database locked by another process for a long time (or its disk full): the receiver acknowledged images
    into its journal, /readyz read the database (a reader is not held up) and said ready."""
    from dicom_node.console.metrics import RECORDING_LAG_SECONDS, RecordingLag

    journal = tmp_path / "journal"
    journal.mkdir()
    clock = [1000.0]
    lag = RecordingLag(clock=lambda: clock[0])
    assert lag.lag(tmp_path) is None  # nothing waits
    (journal / "4242-0.journal").write_text(
        "".join(f"{tmp_path}/instances/1.2/1.2.3/1.2.3.{n}.dcm\n" for n in range(3))
    )
    assert lag.lag(tmp_path) is None  # first seen now: the recorder may just be at work
    clock[0] += RECORDING_LAG_SECONDS - 1
    assert lag.lag(tmp_path) is None
    clock[0] += 1
    outcome = lag.lag(tmp_path)
    assert outcome is not None and not outcome.ok
    assert outcome.reason.startswith(
        "up to 3 acknowledged image(s) have waited about 2 minutes or more to be recorded in the database, which takes "
        "no "
        "writes (another process holds it locked, or its disk is full)"
    )
    (journal / "4242-0.journal").unlink()  # recorded at last
    assert lag.lag(tmp_path) is None


def test_a_steady_stream_of_images_recorded_a_second_after_arrival_keeps_the_storage_check_passing(tmp_path):
    """Before, a journal segment took entries until it held 1,000: with 8 images a second arriving and each batch
    taking about a second to record, it never emptied, lived past 2 minutes, and /readyz said the database took no
    writes while it took every one."""
    from dicom_node.console.metrics import RECORDING_LAG_SECONDS, RecordingLag
    from dicom_node.receive.recorder import Journal

    clock = [0.0]
    journal = Journal(tmp_path / "journal", clock=lambda: clock[0])
    lag = RecordingLag(clock=lambda: clock[0])
    waiting: list[tuple[float, int]] = []  # (acknowledged at, segment)
    for tick in range(int(3 * RECORDING_LAG_SECONDS * 8)):  # 6 minutes, an image each 1/8 s
        clock[0] = tick / 8
        waiting.append((clock[0], journal.append(f"{tmp_path}/instances/1.2/1.2.3/1.2.3.{tick}.dcm")))
        recorded = [segment for at, segment in waiting if clock[0] - at >= 1.0]
        waiting = waiting[len(recorded) :]
        journal.done(recorded)
        if tick % 40 == 0:
            assert lag.lag(tmp_path) is None, clock[0]

    for _ in range(int(RECORDING_LAG_SECONDS)):  # then the database takes no writes: nothing is recorded
        clock[0] += 1
        journal.append(f"{tmp_path}/instances/1.2/1.2.3/1.2.3.late{clock[0]:.0f}.dcm")
    outcome = lag.lag(tmp_path)
    assert outcome is not None and "have waited about 2 minutes or more to be recorded" in outcome.reason


def _addresses_of_this_machine() -> list[str]:
    """127.0.0.2 (loopback, not the 127.0.0.1 the documented health peer lists) and, where this machine has one, its
    first IPv4 address that is not loopback (a node listening on one interface)."""
    import socket

    found = ["127.0.0.2"]
    with contextlib.suppress(OSError):
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with probe:
            probe.connect(("192.0.2.254", 9))  # no packet is sent: the kernel only picks the outgoing address
            address = probe.getsockname()[0]
        if not address.startswith("127."):
            found.append(address)
    return found


@pytest.mark.parametrize("host", _addresses_of_this_machine())
def test_a_node_listening_on_one_address_passes_its_own_health_check_with_peers_that_list_other_hosts(tmp_path, host):
    """Before, /readyz's C-ECHO came from network.host itself (a specific address, not 127.0.0.1): no peer listed
    it, so the node refused its own health check and /readyz answered 503 for ever. The node's own AE title calling
    from this machine is admitted for C-ECHO only."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, Verification

    from dicom_node.config import load_settings
    from dicom_node.console.metrics import echo_own_port
    from dicom_node.scu import verify
    from tests.conftest import DICOM_NODE

    peers = {"pacs": {"ae_title": "PACS", "hosts": ["192.0.2.10"], "roles": ["store", "echo"]}}
    node = Node(tmp_path / "node", {"network": {"host": host}, "peers": peers})
    node.process = subprocess.Popen(
        [DICOM_NODE, "serve", "--config", str(node.config_path)],
        stdout=node.log_path.open("ab"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: "node.ready" in node.log() or node.process.poll() is not None, timeout=60, what="ready")
        assert node.process.poll() is None, node.log()

        assert echo_own_port(load_settings(node.config_path)).ok
        assert verify("SENDER", node.ae_title, host, node.port, timeout=10).ok is False  # no peer: refused
        ae = AE(ae_title=node.ae_title)  # its own AE title may only C-ECHO: no context to store a CT on
        ae.add_requested_context(CTImageStorage)
        ae.add_requested_context(Verification)
        assoc = ae.associate(host, node.port, ae_title=node.ae_title)
        try:
            assert assoc.is_established
            assert [str(cx.abstract_syntax) for cx in assoc.accepted_contexts] == [Verification]
        finally:
            assoc.release()
    finally:
        node.stop()


def test_a_database_that_cannot_be_opened_is_named_in_words_without_the_drivers_class(tmp_path):
    """/readyz's reason quoted SQLAlchemy's whole first line: "(sqlite3.OperationalError) unable to open ..."."""
    from db.session import make_engine, make_session_factory
    from dicom_node.console.metrics import Liveness, assess

    (tmp_path / "dicom-node.db").mkdir()  # a folder where the database file should be: SQLite cannot open it
    sessions = make_session_factory(make_engine(f"sqlite:///{tmp_path / 'dicom-node.db'}"))
    readiness = assess(sessions, Liveness(workers_alive=lambda: None, scp_listening=lambda: True))
    assert readiness.checks["database"] is False and not readiness.ready
    assert readiness.reasons == ["the database does not answer (unable to open database file)"]


def test_a_check_that_breaks_says_why_in_the_drivers_words_only():
    from sqlalchemy.exc import OperationalError

    def broken() -> Outcome:
        raise OperationalError("SELECT 1", {}, Exception("disk I/O error"))

    assert Cached(broken)() == Outcome(False, "the check could not run: disk I/O error")
