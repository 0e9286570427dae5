"""Query/Retrieve leftovers: no purge underneath a retrieval, each C-MOVE sub-association with its own connect
timeout, a stalled retrieval's sentence in its audit record, and associations (not audit rows) counted.

The node is a real ``dicom-node serve`` (an in-process SCP where the AE itself is looked at); the peers are DCMTK
movescu, getscu and echoscu, and pynetdicom peers that hold an instance for as long as the test needs.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet  # type: ignore[attr-defined]
from sqlalchemy import select

from db.ingest import record_instance
from db.models import AuditEvent, Instance, JobState
from db.session import make_engine, make_session_factory, migrate, transaction
from dicom_node.audit import recent
from dicom_node.config import Destination, NetworkSettings
from dicom_node.phantom import PhantomSeries, PhantomSpec, write_phantom_series
from dicom_node.receive import scp
from dicom_node.receive.recorder import InstanceRecorder
from dicom_node.receive.storage import InstanceStore
from dicom_node.retrieve.scp import RetrieveContext
from dicom_node.retrieve.suboperations import SendLimits
from tests.conftest import Node, ct_instance, free_port, require_tool, storescu, wait_for
from tests.console_helpers import console_settings
from tests.stalling_proxy import StallingProxy

pytestmark = pytest.mark.integration

PLANNER = "PLANNER"
PEERS = {
    "pacs": {"ae_title": "PACS", "hosts": ["127.0.0.1"], "roles": ["store"]},
    "planner": {"ae_title": PLANNER, "hosts": ["127.0.0.1"], "roles": ["find", "move", "get"]},
}


class HoldingStorageScp:
    """A pynetdicom Storage SCP (a C-MOVE destination) that holds its answer to the first instance until released."""

    def __init__(self, ae_title: str) -> None:
        self.port = free_port()
        self.holding = threading.Event()  # set once the first instance arrived and is held
        self.release = threading.Event()
        self.received: list[str] = []
        ae = AE(ae_title=ae_title)
        ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.dimse_timeout = ae.network_timeout = 120
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )

    def _on_store(self, event: evt.Event) -> int:
        if not self.received:
            self.holding.set()
            self.release.wait(timeout=120)
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()


@dataclass
class Rig:
    node: Node
    series: PhantomSeries
    destination: HoldingStorageScp


@pytest.fixture
def rig(start_node, tmp_path: Path) -> Iterator[Rig]:
    """A node holding a finished (IGNORED: no rule) four-slice CT, and a move destination that holds its answers."""
    destination = HoldingStorageScp("HOLDER")
    try:
        node = start_node(
            peers=PEERS,
            destinations={"holder": {"ae_title": "HOLDER", "host": "127.0.0.1", "port": destination.port}},
            completion={"quiet_seconds": 1, "expected_count_timeout_seconds": 600},
        )
        series = write_phantom_series(tmp_path / "ct", PhantomSpec(rows=32, columns=32, slices=4))
        assert storescu(node.port, series.files).returncode == 0
        node.wait_for_state(series.series_instance_uid, JobState.IGNORED, timeout=60)
        yield Rig(node, series, destination)
    finally:
        destination.close()


def _stored_files(node: Node) -> list[Path]:
    with node.sessions() as session:
        return [Path(path) for path in session.scalars(select(Instance.path))]


def _records(node: Node, action: str) -> list[tuple[str, str]]:
    """The outcome and detail of each audit record of ``action``, oldest first."""
    with node.sessions() as session:
        return [(r.outcome, r.detail or "") for r in reversed(recent(session, actions=[action]))]


def test_a_series_being_moved_is_not_purged_underneath_the_c_move(rig: Rig) -> None:
    node, series, destination = rig.node, rig.series, rig.destination
    uid = series.series_instance_uid
    command = [require_tool("movescu"), "-S", "-aet", PLANNER, "-aec", node.ae_title, "-aem", "HOLDER"]
    command += ["-k", "QueryRetrieveLevel=SERIES", "-k", f"SeriesInstanceUID={uid}", "127.0.0.1", str(node.port)]
    movescu = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(destination.holding.is_set, timeout=60, what="the first instance to reach the move destination")

        by_operator = node.cli("purge", "--series", uid)
        by_retention = node.cli("purge", "--days", "0.000001")  # what the retention pass of `serve` does

        assert all(path.is_file() for path in _stored_files(node))
        assert len(_stored_files(node)) == 4
    finally:
        destination.release.set()
        output, _ = movescu.communicate(timeout=120)

    expected = f"series {uid} is being retrieved by {PLANNER} at 127.0.0.1:"
    for purge in (by_operator, by_retention):
        said = " ".join((purge.stdout + purge.stderr).split())  # the table folds long cells over lines
        assert expected in said and "(C-MOVE to HOLDER)" in said, said
    refusals = [detail for outcome, detail in _records(node, "operator") if outcome == "refused"]
    assert len(refusals) == 2 and all(expected in detail for detail in refusals), refusals
    assert movescu.returncode == 0, output
    assert sorted(destination.received) == sorted(series.sop_instance_uids)
    assert "no longer on disk" not in node.log()

    purged = node.cli("purge", "--series", uid)  # the retrieval has ended: nothing holds the series any more

    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert _stored_files(node) == []


def test_a_series_being_fetched_by_c_get_is_not_purged_until_the_c_get_ends(rig: Rig) -> None:
    node, series = rig.node, rig.series
    uid = series.series_instance_uid
    holding, release = threading.Event(), threading.Event()
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        if not received:
            holding.set()
            release.wait(timeout=120)
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    ae = AE(ae_title=PLANNER)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(
        "127.0.0.1",
        node.port,
        ae_title=node.ae_title,
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    query = pydicom.Dataset()
    query.QueryRetrieveLevel, query.SeriesInstanceUID = "SERIES", uid
    responses: list[tuple[pydicom.Dataset, pydicom.Dataset | None]] = []
    getting = threading.Thread(
        target=lambda: responses.extend(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet))
    )
    getting.start()
    try:
        wait_for(holding.is_set, timeout=60, what="the first instance of the C-GET to arrive")
        refused = node.cli("purge", "--series", uid)
    finally:
        release.set()
        getting.join(timeout=120)
        assoc.release()

    said = " ".join((refused.stdout + refused.stderr).split())
    assert f"series {uid} is being retrieved by {PLANNER} at 127.0.0.1:" in said and "(C-GET)" in said, said
    assert responses[-1][0].Status == 0x0000
    assert sorted(received) == sorted(series.sop_instance_uids)
    assert node.cli("purge", "--series", uid).returncode == 0
    assert _stored_files(node) == []


def test_a_c_get_requestor_cut_by_the_send_bound_is_said_to_have_stopped_reading_in_its_audit_record(
    start_node, tmp_path: Path
) -> None:
    """With the send bound shorter than the per-instance wait (as by default: 30 s against 30 s + 1 s a MB), the
    send bound cuts the stalled requestor: the sentence says it stopped taking data, not that it closed."""
    node = start_node(
        peers=PEERS,
        network={"pdu_read_timeout_seconds": 3},
        dispatch={"timeout_seconds": 60},
        completion={"quiet_seconds": 600},
    )
    series = write_phantom_series(tmp_path / "ct", PhantomSpec(rows=2600, columns=2600, slices=2))  # 13.5 MB each
    assert storescu(node.port, series.files).returncode == 0
    stalling = StallingProxy(node.port, stall_replies=True)
    (tmp_path / "got").mkdir()
    command = [require_tool("getscu"), "-S", "-aet", PLANNER, "-aec", node.ae_title, "-od", str(tmp_path / "got")]
    command += ["-k", "QueryRetrieveLevel=SERIES", "-k", f"SeriesInstanceUID={series.series_instance_uid}"]
    getscu = subprocess.Popen(
        [*command, "127.0.0.1", str(stalling.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for(lambda: _records(node, "get"), timeout=120, what="the C-GET's audit record")
    finally:
        stalling.close()
        getscu.wait(timeout=60)

    ((outcome, detail),) = _records(node, "get")
    assert outcome == "failed", detail
    assert f"the C-GET ended: {PLANNER} at 127.0.0.1:" in detail, detail
    assert " stopped taking data for " in detail and "so the node closed the connection" in detail, detail
    assert "the 1 instance(s) left were not sent" in detail, detail
    assert "closed the association" not in node.log()
    assert detail.split("; ", 1)[1] in node.log()  # the log says the same


def test_echo_only_associations_are_each_counted_in_the_associations_metric(start_node) -> None:
    """A monitoring system's C-ECHO-only associations are recorded once per peer each 10 s, the record counting
    those left out: /metrics counts every association."""
    metrics_port = free_port()
    monitor = {"ae_title": "MONITOR", "hosts": ["127.0.0.1"], "roles": ["echo"]}
    node = start_node(peers={"monitor": monitor}, console=console_settings(free_port(), metrics_port=metrics_port))
    echoes = 0

    def echo_until_a_second_record() -> bool:
        nonlocal echoes
        command = [require_tool("echoscu"), "-aet", "MONITOR", "-aec", node.ae_title, "127.0.0.1", str(node.port)]
        assert subprocess.run(command, capture_output=True, timeout=30).returncode == 0
        echoes += 1
        return len(_association_details(node)) == 2

    wait_for(echo_until_a_second_record, timeout=60, interval=0.5, what="a second C-ECHO-only association record")
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).text

    details = _association_details(node)
    assert echoes > 2 and f"{echoes - 2} more C-ECHO-only associations of this peer" in details[1], details
    counted = {
        tuple(sample.labels.items()): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "dicom_node_associations_total"
    }
    assert counted[(("outcome", "released"),)] == echoes


def _association_details(node: Node) -> list[str]:
    with node.sessions() as session:
        query = select(AuditEvent.detail).where(AuditEvent.action == "association").order_by(AuditEvent.id)
        return [detail or "" for detail in session.scalars(query)]


def test_each_c_move_sub_association_has_its_own_connect_timeout_and_the_shared_ae_is_left_alone(
    tmp_path: Path,
) -> None:
    """The node's AE serves every association: a C-MOVE setting its connect timeout there would change it under
    any other C-MOVE opening its sub-association at the same moment (pynetdicom also copies it into every
    association the AE holds). The sub-association has its own; the AE's stays as configured."""
    url = f"sqlite:///{tmp_path / 'node.db'}"
    migrate(url)
    sessions = make_session_factory(make_engine(url))
    series = write_phantom_series(tmp_path / "ct", PhantomSpec(rows=32, columns=32, slices=2))
    with transaction(sessions) as session:
        for path, uid in zip(series.files, series.sop_instance_uids, strict=True):
            study = series.study_instance_uid
            record_instance(session, ct_instance(uid, series.series_instance_uid, study_instance_uid=study, path=path))
    destination = HoldingStorageScp("HOLDER")
    store = InstanceStore(tmp_path / "storage")
    recorder = InstanceRecorder(store, sessions)
    network = NetworkSettings(ae_title="NODE", host="127.0.0.1", port=free_port())
    retrieve = RetrieveContext(
        ae_title="NODE",
        destinations={"holder": Destination(ae_title="HOLDER", host="127.0.0.1", port=destination.port)},
        sessions=sessions,
        sending=SendLimits(timeout_seconds=7),
    )
    server = scp.start_storage_scp(
        network, scp.StoreContext(store=store, sessions=sessions, recorder=recorder), retrieve
    )
    command = [require_tool("movescu"), "-S", "-aet", PLANNER, "-aec", "NODE", "-aem", "HOLDER", "-k"]
    command += ["QueryRetrieveLevel=SERIES", "-k", f"SeriesInstanceUID={series.series_instance_uid}"]
    movescu = subprocess.Popen([*command, "127.0.0.1", str(network.port)], stdout=subprocess.PIPE, text=True)
    try:
        wait_for(destination.holding.is_set, timeout=60, what="the first instance to reach the move destination")
        sub_associations = [assoc for assoc in server.ae.active_associations if assoc.is_requestor]
        timeouts = [assoc.connection_timeout for assoc in sub_associations]
        shared = server.ae.connection_timeout
    finally:
        destination.release.set()
        output, _ = movescu.communicate(timeout=120)
        server.shutdown()
        destination.close()
        store.close()

    assert timeouts == [7], timeouts
    assert shared is None  # pynetdicom's default: the node's AE was never changed
    assert server.ae.connection_timeout is None
    assert movescu.returncode == 0, output
    assert sorted(destination.received) == sorted(series.sop_instance_uids)
