"""A stored file gone from disk while a series is retrieved (a purge that ran meanwhile) is named as such, not as
damaged storage; the other instances are sent. A stored file damaged in place (its size unchanged) fails its own
sub-operation, named in the log, and the instances after it are sent: it aborted the whole C-GET or C-MOVE (0xC411,
0xC511, a traceback or no reason at all)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from sqlalchemy import select

from db.models import Instance
from dicom_node.phantom import PhantomSpec, write_phantom_series
from tests.conftest import (
    Node,
    free_port,
    real_ct_copy,
    require_tool,
    storescp_destination,
    storescu,
    wait_for,
)

pytestmark = pytest.mark.integration

PLANNER = "PLANNER"


def test_a_stored_file_gone_during_a_c_get_is_named_as_gone_and_the_rest_is_sent(tmp_path, start_node):
    node = start_node(
        peers={
            "pacs": {"ae_title": "PACS", "hosts": ["127.0.0.1"], "roles": ["store"]},
            "planner": {"ae_title": PLANNER, "hosts": ["127.0.0.1"], "roles": ["find", "get"]},
        },
        completion={"quiet_seconds": 600},
    )
    series = write_phantom_series(tmp_path / "ct", PhantomSpec(rows=32, columns=32, slices=4))
    assert storescu(node.port, series.files).returncode == 0
    with node.sessions() as session:
        wait_for(lambda: len(session.scalars(select(Instance)).all()) == 4, timeout=30, what="4 recorded instances")
        gone = session.scalars(select(Instance).order_by(Instance.id)).first()
        assert gone is not None
        Path(gone.path).unlink()  # as a purge that ran while the retrieval was on its way would leave it

    out = tmp_path / "got"
    out.mkdir()
    command = [require_tool("getscu"), "-S", "-aet", PLANNER, "-aec", node.ae_title, "-od", str(out)]
    command += ["-k", "QueryRetrieveLevel=SERIES", "-k", f"SeriesInstanceUID={series.series_instance_uid}"]
    subprocess.run([*command, "127.0.0.1", str(node.port)], capture_output=True, text=True, timeout=120)

    assert len(list(out.iterdir())) == 3
    (line,) = [line for line in node.log().splitlines() if "retrieve.file_unreadable" in line]
    assert "WARNING" in line
    assert f"the stored file of instance {gone.sop_instance_uid} is no longer on disk (its series was purged" in line


def _c_get(node: Node, series_uid: str) -> tuple[list[tuple[Dataset, Dataset | None]], list[str]]:
    """A pynetdicom C-GET of the series, taking CT in Explicit VR Little Endian only (so that the node decompresses
    what it stored): its responses, and the SOP Instance UIDs of the images received."""
    received: list[str] = []

    def on_store(event: Any) -> int:
        received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    ae = AE(ae_title=PLANNER)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 60
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    roles: list[Any] = [build_role(CTImageStorage, scp_role=True)]
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title, ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])  # fmt: skip
    assert assoc.is_established
    try:
        return list(assoc.send_c_get(_series_query(series_uid), StudyRootQueryRetrieveInformationModelGet)), received
    finally:
        assoc.release()


def _c_move(node: Node, series_uid: str) -> list[tuple[Dataset, Dataset | None]]:
    ae = AE(ae_title=PLANNER)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 60
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        return list(assoc.send_c_move(_series_query(series_uid), PLANNER, StudyRootQueryRetrieveInformationModelMove))
    finally:
        assoc.release()


def _series_query(series_uid: str) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel, query.SeriesInstanceUID = "SERIES", series_uid
    return query


def _final(responses: list[tuple[Dataset, Dataset | None]]) -> tuple[int, int, int, list[str]]:
    """The final response's status, completed and failed counts, and Failed SOP Instance UID List."""
    status, identifier = responses[-1]
    listed = identifier.get("FailedSOPInstanceUIDList", []) if identifier is not None else []
    failed = [str(listed)] if isinstance(listed, str) else [str(uid) for uid in listed]
    completed, failures = status.NumberOfCompletedSuboperations, status.NumberOfFailedSuboperations
    return int(status.Status), int(completed), int(failures), failed


def test_a_stored_ct_file_damaged_in_place_fails_alone_and_the_images_after_it_are_sent(
    tmp_path, start_node, shared_fixtures
):
    """The real JPEG 2000 CT; 400 bytes of one stored file's header overwritten, its size unchanged (a disk fault
    a size check cannot see): decompressing it for a peer that takes uncompressed CT fails."""
    planner_port = free_port()
    node = start_node(
        peers={
            "pacs": {"ae_title": "PACS", "hosts": ["127.0.0.1"], "roles": ["store"]},
            "planner": {"ae_title": PLANNER, "hosts": ["127.0.0.1"], "roles": ["get", "move"]},
        },
        destinations={"planner": {"ae_title": PLANNER, "host": "127.0.0.1", "port": planner_port}},
        completion={"quiet_seconds": 600},
    )
    files = real_ct_copy(tmp_path / "ct", shared_fixtures)
    assert storescu(node.port, files, extra=["-xv"]).returncode == 0
    with node.sessions() as session:
        wait_for(lambda: len(session.scalars(select(Instance)).all()) == 20, timeout=60, what="20 recorded instances")
        stored = session.scalars(select(Instance).order_by(Instance.instance_number)).all()
        series_uid = stored[0].series.series_instance_uid
    damaged = stored[2]
    data = bytearray(Path(damaged.path).read_bytes())
    data[400:800] = b"\xff" * 400
    Path(damaged.path).write_bytes(data)
    assert damaged.transfer_syntax_uid != ExplicitVRLittleEndian

    got, received = _c_get(node, series_uid)
    moved_to = tmp_path / "planner"
    moved_to.mkdir()
    with storescp_destination(moved_to, planner_port, PLANNER):
        moved = _c_move(node, series_uid)

    intact = {instance.sop_instance_uid for instance in stored} - {damaged.sop_instance_uid}
    assert set(received) == intact
    assert _final(got) == (0xB000, 19, 1, [damaged.sop_instance_uid])
    assert _final(moved) == (0xB000, 19, 1, [damaged.sop_instance_uid])
    assert len(list(moved_to.iterdir())) == 19
    lines = [line for line in node.log().splitlines() if "retrieve.file_unreadable" in line]
    assert len(lines) == 2, node.log()[-4000:]
    for line in lines:
        assert " WARNING " in line and f"path={damaged.path}" in line, line
        assert f"the stored file of instance {damaged.sop_instance_uid} cannot be read as DICOM" in line, line
    assert "Traceback" not in node.log() and "Exception in handler" not in node.log()
