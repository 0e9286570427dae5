"""A C-GET requestor or a C-MOVE destination that stops reading mid-instance: the node cuts the association after
a bounded wait, says why in a sentence naming the peer, and goes on serving.

The node is a real ``dicom-node serve``; the peers are DCMTK getscu, movescu and storescp. The stalled peer sits
behind a TCP proxy (:mod:`tests.stalling_proxy`) that stops reading what the node sends after 100 kB while keeping
the connection open: a hung workstation whose kernel advertises a zero window. Each instance (a 2600 x 2600 CT
slice, 13.5 MB) is larger than the socket buffers, so the node's send blocks mid-instance.
"""

from __future__ import annotations

import re
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet  # type: ignore[attr-defined]

from dicom_node.audit import recent
from dicom_node.phantom import PhantomSeries, PhantomSpec, write_phantom_series
from dicom_node.retrieve.suboperations import IGNORED_FINAL_STATUS
from tests.conftest import Node, free_port, require_tool, storescu, wait_for
from tests.stalling_proxy import StallingProxy

pytestmark = pytest.mark.integration

PLANNER = "PLANNER"
LARGE = PhantomSpec(rows=2600, columns=2600, slices=2)  # 13.5 MB a slice
# Each instance may take 2 s + 0.2 s a MB (4.7 s) before the node gives up on its peer: dispatch's settings.
SENDING = {"timeout_seconds": 2, "seconds_per_megabyte": 0.2}


@dataclass
class Rig:
    node: Node
    series: PhantomSeries
    stalled_destination: StallingProxy  # STALLED: a storescp behind the proxy, which stops reading from the node
    healthy_folder: Path  # where HEALTHY, a storescp the node reaches directly, writes what it receives


@pytest.fixture
def rig(start_node, tmp_path: Path) -> Iterator[Rig]:
    """A node holding a two-slice CT of large slices, with a stalled and a healthy move destination."""
    stalled_port, healthy_port = free_port(), free_port()
    proxy = StallingProxy(stalled_port)
    healthy_folder = tmp_path / "healthy"
    healthy_folder.mkdir()
    storescps = [
        _storescp("STALLED", stalled_port, tmp_path / "stalled"),
        _storescp("HEALTHY", healthy_port, healthy_folder),
    ]
    try:
        node = start_node(
            peers={
                "pacs": {"ae_title": "PACS", "hosts": ["127.0.0.1"], "roles": ["store"]},
                "planner": {"ae_title": PLANNER, "hosts": ["127.0.0.1"], "roles": ["find", "move", "get"]},
            },
            destinations={
                "stalled": {"ae_title": "STALLED", "host": "127.0.0.1", "port": proxy.port},
                "healthy": {"ae_title": "HEALTHY", "host": "127.0.0.1", "port": healthy_port},
            },
            dispatch=SENDING,
            completion={"quiet_seconds": 600},
        )
        series = write_phantom_series(tmp_path / "ct", LARGE)
        sent = storescu(node.port, series.files)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        yield Rig(node, series, proxy, healthy_folder)
    finally:
        proxy.close()
        for scp in storescps:
            scp.terminate()
            scp.wait(timeout=30)


def _storescp(ae_title: str, port: int, folder: Path) -> subprocess.Popen[bytes]:
    folder.mkdir(exist_ok=True)
    command = [require_tool("storescp"), "-aet", ae_title, "-od", str(folder), str(port)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _getscu(series_uid: str, port: int, folder: Path) -> list[str]:
    folder.mkdir(exist_ok=True)
    command = [require_tool("getscu"), "-v", "-S", "-aet", PLANNER, "-aec", "DICOMNODE", "-od", str(folder)]
    command += ["-k", "QueryRetrieveLevel=SERIES", "-k", f"SeriesInstanceUID={series_uid}", "127.0.0.1", str(port)]
    return command


def _movescu(node: Node, destination: str, series_uid: str) -> subprocess.CompletedProcess[str]:
    command = [require_tool("movescu"), "-d", "-S", "-aet", PLANNER, "-aec", node.ae_title, "-aem", destination]
    command += ["-k", "QueryRetrieveLevel=SERIES", "-k", f"SeriesInstanceUID={series_uid}"]
    return subprocess.run([*command, "127.0.0.1", str(node.port)], capture_output=True, text=True, timeout=300)


def _records(node: Node, action: str) -> list[tuple[str, str]]:
    """The outcome and detail of each audit record of ``action``, oldest first."""
    with node.sessions() as session:
        return [(r.outcome, r.detail or "") for r in reversed(recent(session, actions=[action]))]


def _stalled_sentence(node: Node) -> str:
    """The reason of the one ``retrieve.peer_stalled`` line of the node's log."""
    (line,) = [line for line in node.log().splitlines() if "retrieve.peer_stalled" in line]
    return line.split(' reason="', 1)[1].removesuffix('"')


def _names_an_instance(sentence: str, series: PhantomSeries) -> bool:
    """Whether ``sentence`` names one of the series' instances, with its size, as the one being sent."""
    return any(f"while instance {uid} (13.5 MB) was being sent" in sentence for uid in series.sop_instance_uids)


@pytest.fixture
def threads_before() -> set[threading.Thread]:
    """The threads running before the test (other tests' idle thread pools among them)."""
    return set(threading.enumerate())


def _threads_left(before: set[threading.Thread]) -> list[str]:
    """Threads the test started that are still running and would keep pytest from exiting."""
    return [t.name for t in threading.enumerate() if not t.daemon and t not in before]


def test_a_c_get_requestor_that_stops_reading_has_its_association_cut_and_the_node_serves_on(
    threads_before, rig, tmp_path
):
    node, series = rig.node, rig.series
    stalling = StallingProxy(node.port, stall_replies=True)  # between getscu and the node
    try:
        getscu = subprocess.Popen(
            _getscu(series.series_instance_uid, stalling.port, tmp_path / "stalled-get"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        wait_for(stalling.stalled.is_set, timeout=60, what="the proxy to stop reading what the node sends")
        wait_for(
            lambda: _records(node, "get"), timeout=120, what="the node to cut the association and record the C-GET"
        )
    finally:
        stalling.close()  # getscu, still waiting on the proxy, sees its connection end
    getscu.communicate(timeout=60)

    assert [outcome for outcome, _ in _records(node, "get")] == ["failed"]  # one record, with the final status
    why = _stalled_sentence(node)
    assert f"{PLANNER} at 127.0.0.1:" in why and " stopped taking data for " in why, why
    assert why.startswith("the C-GET ended: ") and _names_an_instance(why, series), why
    assert why.endswith("so the node closed the connection; the 1 instance(s) left were not sent"), why

    again = subprocess.run(
        _getscu(series.series_instance_uid, node.port, tmp_path / "get"), capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stdout + again.stderr
    received = sorted(str(pydicom.dcmread(path).SOPInstanceUID) for path in (tmp_path / "get").iterdir())
    assert received == sorted(series.sop_instance_uids)
    assert [outcome for outcome, _ in _records(node, "get")][-1] == "success"
    assert _threads_left(threads_before) == []


def test_a_c_move_to_a_destination_that_stops_reading_fails_its_sub_operations_in_a_sentence(threads_before, rig):
    node, series = rig.node, rig.series

    answer = _movescu(node, "STALLED", series.series_instance_uid)

    output = answer.stdout + answer.stderr
    assert rig.stalled_destination.stalled.is_set(), "the node's send stopped in the middle of the instance"
    assert "Received Final Move Response" in output, output
    final = output.split("Received Final Move Response")[-1]
    assert "0xa702: Refused: Out of resources - Unable to perform sub-operations" in final, final  # none done
    assert re.search(r"Failed Suboperations\s+: 2\n", final), final  # the stalled one and the one never sent
    assert re.search(r"Completed Suboperations\s+: 0\n", final), final
    assert re.search(r"Remaining Suboperations\s+: none\n", final), final  # a final response counts none
    assert "[Move destination STALLED stopped taking data]" in final, final  # the final status's comment
    outcomes = _records(node, "move")
    why = _stalled_sentence(node)
    assert why.startswith(
        f"the C-MOVE to STALLED ended: move destination STALLED at 127.0.0.1:{rig.stalled_destination.port} "
        "stopped taking data for "
    ), why
    assert _names_an_instance(why, series), why
    assert [outcome for outcome, _ in outcomes] == ["failed"], outcomes  # one record, with the final status

    again = _movescu(node, "HEALTHY", series.series_instance_uid)

    assert again.returncode == 0, again.stdout + again.stderr
    received = sorted(str(pydicom.dcmread(path).SOPInstanceUID) for path in rig.healthy_folder.iterdir())
    assert received == sorted(series.sop_instance_uids)
    assert _records(node, "move")[-1][0] == "success"
    assert _threads_left(threads_before) == []


def test_a_c_get_whose_requestor_refuses_instances_is_audited_with_the_final_status_it_heard(
    threads_before, start_node, tmp_path
):
    """The audit record of a retrieval once said success when the peer refused what it was sent: it was written
    before pynetdicom answered the final status (0xB000 or 0xA702) from the peer's C-STORE answers."""
    node = start_node(
        peers={
            "pacs": {"ae_title": "PACS", "hosts": ["127.0.0.1"], "roles": ["store"]},
            "planner": {"ae_title": PLANNER, "hosts": ["127.0.0.1"], "roles": ["get"]},
        },
        completion={"quiet_seconds": 600},
    )
    series = write_phantom_series(tmp_path / "ct", PhantomSpec(rows=32, columns=32, slices=2))
    assert storescu(node.port, series.files).returncode == 0
    query = pydicom.Dataset()
    query.QueryRetrieveLevel, query.SeriesInstanceUID = "SERIES", series.series_instance_uid

    cases = (
        ([0x0000, 0xA700], 0xB000, "partial"),  # the second refused (out of resources): a warning
        ([0xA700, 0xC000], 0xA702, "failed"),  # both refused: none of the sub-operations done
        ([0x0000, 0x0000], 0x0000, "success"),
    )
    for count, (answers, final_status, outcome) in enumerate(cases, start=1):
        heard = _c_get(node, query, answers)

        assert heard.Status == final_status
        assert int(heard.get("NumberOfFailedSuboperations") or 0) == len([a for a in answers if a != 0x0000])
        records = wait_for(lambda n=count: _records(node, "get")[n - 1 :], what="the C-GET's audit record")
        assert [record_outcome for record_outcome, _ in records] == [outcome], records
    assert IGNORED_FINAL_STATUS not in node.log()
    assert _threads_left(threads_before) == []


def _c_get(node: Node, query: pydicom.Dataset, answers: list[int]) -> pydicom.Dataset:
    """C-GET with a pynetdicom requestor that answers the node's C-STOREs with ``answers`` in turn; the final
    status it heard."""
    ae = AE(ae_title=PLANNER)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    statuses = iter(answers)
    assoc = ae.associate(
        "127.0.0.1",
        node.port,
        ae_title=node.ae_title,
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, lambda event: next(statuses))],
    )
    assert assoc.is_established
    try:
        responses = list(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()
    return responses[-1][0]
