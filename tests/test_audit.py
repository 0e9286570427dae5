"""The audit trail: records of who did what, queryable, without patient data."""

from __future__ import annotations

import subprocess
from types import SimpleNamespace

import pytest
import yaml
from pydicom import config
from pydicom.dataset import Dataset

from db.models import AuditEvent
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


def _sent(study: str) -> Dataset:
    dataset = Dataset()
    dataset.StudyInstanceUID = study
    return dataset


def test_a_retrieval_that_sends_is_a_success_with_the_studies_it_sent_and_one_that_fails_some_is_partial(tmp_path):
    """pynetdicom ends a C-GET or C-MOVE after the handler's last pending status: that last status (0xFF00) once
    made every retrieval that sent its instances 'refused', and a retrieval by SeriesInstanceUID named no study."""
    sessions = _sessions(tmp_path)
    event = SimpleNamespace(identifier=Dataset(), assoc=_assoc("PLANNER", "10.0.0.7", 4000), move_destination="")
    event.identifier.QueryRetrieveLevel, event.identifier.SeriesInstanceUID = "SERIES", "1.2.3.4"

    def sends(event, *args):
        yield 3
        for study in ("1.2.3", "1.2.3", "1.2.9"):
            yield 0xFF00, _sent(study)

    def sends_some(event, *args):
        yield 2
        yield 0xFF00, _sent("1.2.3")
        failed = Dataset()
        failed.FailedSOPInstanceUIDList = ["1.2.3.4.5"]
        yield 0xB000, failed

    def nothing_matches(event, *args):
        yield 0

    def run(handler) -> list[tuple[str | None, str, int]]:
        list(audited_retrieve("get", handler, sessions)(event))
        with sessions() as session:
            rows = [(r.study_instance_uid, r.outcome, r.instances) for r in recent(session)]
            session.execute(AuditEvent.__table__.delete())
            session.commit()
        return sorted(rows, key=lambda row: row[0] or "")

    assert run(sends) == [("1.2.3", "success", 2), ("1.2.9", "success", 1)]
    assert run(sends_some) == [("1.2.3", "partial", 1)]
    assert run(nothing_matches) == [(None, "success", 0)]

    generator = audited_retrieve("get", sends, sessions)(event)  # the association ends after the first instance
    next(generator), next(generator)
    generator.close()
    with sessions() as session:
        assert [(r.study_instance_uid, r.outcome, r.instances) for r in recent(session)] == [("1.2.3", "partial", 1)]


@pytest.mark.integration
def test_a_real_get_by_series_is_audited_as_a_success_under_its_study(tmp_path, start_node):
    from dicom_node.phantom import PhantomSpec, write_phantom_series
    from tests.conftest import require_tool, storescu

    peers = {
        "pacs": {"ae_title": "PACS", "hosts": ["127.0.0.1"], "roles": ["store"]},
        "getter": {"ae_title": "GETTER", "hosts": ["127.0.0.1"], "roles": ["get"]},
    }
    node = start_node(peers=peers, completion={"quiet_seconds": 600})
    series = write_phantom_series(tmp_path / "ct", PhantomSpec(rows=32, columns=32, slices=3))
    assert storescu(node.port, series.files).returncode == 0
    out = tmp_path / "got"
    out.mkdir()
    command = [require_tool("getscu"), "-S", "-aet", "GETTER", "-aec", node.ae_title, "-od", str(out)]
    command += ["-k", "QueryRetrieveLevel=SERIES", "-k", f"SeriesInstanceUID={series.series_instance_uid}"]
    subprocess.run([*command, "127.0.0.1", str(node.port)], capture_output=True, text=True, timeout=60)
    assert len(list(out.iterdir())) == 3

    def gets():
        with node.sessions() as session:
            return [(r.study_instance_uid, r.outcome, r.instances) for r in recent(session, actions=["get"])]

    assert wait_for(gets, what="the C-GET's audit record") == [(series.study_instance_uid, "success", 3)]
    listed = node.cli("audit", "--study", series.study_instance_uid, "--action", "get").stdout
    assert "GETTER" in listed and "success" in listed, listed
