"""The audit trail: records of who did what, queryable, without patient data."""

from __future__ import annotations

import subprocess
from types import SimpleNamespace

import pytest
import yaml
from pydicom import config
from pydicom.dataset import Dataset

from db.session import make_engine, make_session_factory, migrate
from dicom_node.audit import Peer, StoreTally, association_ended, audited_retrieve, recent, record
from tests.conftest import DICOM_NODE, wait_for


def _sessions(tmp_path):
    url = f"sqlite:///{tmp_path / 'storage' / 'dicom-node.db'}"
    migrate(url)
    return make_session_factory(make_engine(url))


def _assoc(ae_title: str, address: str, port: int) -> SimpleNamespace:
    return SimpleNamespace(requestor=SimpleNamespace(ae_title=ae_title, address=address, port=port))


def test_stores_are_summed_per_association_and_study_and_written_when_it_ends(tmp_path):
    sessions = _sessions(tmp_path)
    assoc = _assoc("PACS", "10.1.2.3", 40000)
    tally = StoreTally.of(assoc)
    for _ in range(3):
        tally.add("1.2.3", "success")
    tally.add("1.2.3", "refused")
    StoreTally.of(assoc).add("1.2.4", "success")  # the same tally, found on the association

    association_ended(sessions, assoc, "released")

    with sessions() as session:
        rows = [
            (r.action, r.study_instance_uid, r.outcome, r.instances, r.peer_ae_title, r.peer_address)
            for r in reversed(recent(session))
        ]
    assert rows == [
        ("store", "1.2.3", "refused", 1, "PACS", "10.1.2.3:40000"),
        ("store", "1.2.3", "success", 3, "PACS", "10.1.2.3:40000"),
        ("store", "1.2.4", "success", 1, "PACS", "10.1.2.3:40000"),
        ("association", None, "released", 0, "PACS", "10.1.2.3:40000"),
    ]


def test_audit_command_filters_by_peer_action_and_study(tmp_path):
    sessions = _sessions(tmp_path)
    record(sessions, "find", Peer("PLANNER", "127.0.0.1:5000"), "success", detail="STUDY level, 2 matches")
    record(sessions, "get", Peer("PLANNER", "127.0.0.1:5000"), "success", study_instance_uid="1.2.9", instances=3)
    record(sessions, "store", Peer("PACS", "127.0.0.1:6000"), "success", study_instance_uid="1.2.9", instances=30)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"storage": {"directory": str(tmp_path / "storage")}}))

    def audit(*args: str) -> str:
        result = subprocess.run(
            [DICOM_NODE, "audit", *args, "--config", str(config)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    planner = audit("--peer", "PLANNER")
    assert "find" in planner and "get" in planner and "PACS" not in planner
    stores = audit("--action", "store", "--study", "1.2.9")
    assert "30" in stores and "PLANNER" not in stores
    assert (
        "unknown action"
        in subprocess.run(
            [DICOM_NODE, "audit", "--action", "delete", "--config", str(config)], capture_output=True, text=True
        ).stderr
    )


@pytest.mark.integration
def test_a_real_node_audits_associations_stores_queries_echoes_and_sends(tmp_path, start_node):
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

    from db.models import JobState
    from dicom_node.phantom import PhantomSpec, write_phantom_series
    from tests.conftest import CT_RULES, storescu

    series = write_phantom_series(tmp_path / "ct", PhantomSpec(rows=64, columns=64, slices=12))
    node = start_node(rules=CT_RULES)
    assert storescu(node.port, series.files, calling_ae="PACS").returncode == 0
    node.wait_for_state(series.series_instance_uid, JobState.QUEUED)

    ae = AE(ae_title="PLANNER")
    ae.add_requested_context(Verification)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    query = Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", series.study_instance_uid
    assert [status.Status for status, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)][
        -1
    ] == 0
    assoc.release()

    def rows():
        with node.sessions() as session:
            return [(r.action, r.peer_ae_title, r.study_instance_uid, r.outcome, r.instances) for r in recent(session)]

    wait_for(lambda: ("association", "PLANNER", None, "released", 0) in rows(), what="the PLANNER association record")
    found = rows()
    assert ("store", "PACS", series.study_instance_uid, "success", 12) in found
    assert ("association", "PACS", None, "released", 0) in found
    assert ("echo", "PLANNER", None, "success", 0) in found
    assert ("find", "PLANNER", series.study_instance_uid, "success", 1) in found
    listed = node.cli("audit", "--action", "store").stdout
    assert "PACS" in listed and series.study_instance_uid in listed
    assert "Phantom" not in node.cli("audit").stdout  # no patient data (PatientName Phantom^Synthetic) in the trail


def test_a_records_detail_is_cut_to_2000_characters_saying_how_many_were_cut(tmp_path):
    sessions = _sessions(tmp_path)
    record(sessions, "console", Peer("admin", "127.0.0.1:5000"), "refused", detail="D" * 900_000)

    with sessions() as session:
        [row] = recent(session)
    assert row.detail == "D" * 2000 + "...(898000 characters cut)"


def test_a_retrieval_record_keeps_what_the_peer_sent_short(tmp_path):
    """A 900 kB QueryRetrieveLevel once made a 900 kB detail per query."""
    sessions = _sessions(tmp_path)

    def refused(event, *args):
        yield 0xA900, None

    def audited(action, level: str, study: str, destination: str = "") -> str:
        with config.disable_value_validation():
            identifier = Dataset()
            identifier.QueryRetrieveLevel = level
            identifier.StudyInstanceUID = study
        event = SimpleNamespace(identifier=identifier, assoc=_assoc("VIEWER", "10.0.0.7", 4000))
        event.move_destination = destination
        assert list(audited_retrieve(action, refused, sessions)(event)) == [(0xA900, None)]
        with sessions() as session:
            row = recent(session, limit=1)[0]
        return f"{row.detail} | {row.study_instance_uid}"

    assert audited("find", "STUDY", "1.2.3") == "STUDY level, 0 matches | 1.2.3"
    assert (
        audited("find", "X" * 900_000, "1." + "9" * 100_000)
        == f"{'X' * 16!r}... (900000 characters) level, 0 matches | None"
    )
    assert audited("move", "ST\rUDY", "1.2\r3", "DEST\x1b[2J") == "'ST?UDY' level, 0 instances, to 'DEST?[2J' | None"
