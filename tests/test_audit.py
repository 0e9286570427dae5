"""The audit trail: records of who did what, queryable, without patient data."""

from __future__ import annotations

import logging
import subprocess
from types import SimpleNamespace

import pytest
import yaml
from pydicom import config
from pydicom.dataset import Dataset

from db.models import AuditEvent
from db.session import make_engine, make_session_factory, migrate
from dicom_node.audit import Peer, StoreTally, association_ended, audited_retrieve, disclosed, recent, record
from tests.conftest import DICOM_NODE, free_port, wait_for


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


def test_an_audit_log_line_leaves_out_the_study_and_detail_a_record_has_not(tmp_path, caplog):
    """An association's line said ``study_instance_uid=None detail=None``."""
    with caplog.at_level(logging.INFO, logger="dicom_node.audit"):
        association_ended(_sessions(tmp_path), _assoc("PACS", "10.1.2.3", 40000), "released")

    (line,) = [r for r in caplog.records if r.getMessage() == "audit"]
    assert line.event_fields == {
        "action": "association",
        "peer_ae": "PACS",
        "peer_address": "10.1.2.3:40000",
        "outcome": "released",
        "instances": 0,
    }


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

    def cancelled_after_one(event, *args):
        yield 3
        yield 0xFF00, _sent("1.2.3")
        cancelled = Dataset()
        cancelled.FailedSOPInstanceUIDList = ["1.2.3.4.6", "1.2.3.4.7"]
        yield 0xFE00, cancelled

    def cancelled_before_any(event, *args):
        yield 3
        yield 0xFE00, Dataset()

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
    assert run(cancelled_after_one) == [("1.2.3", "partial", 1)]  # once "failed", though one went
    assert run(cancelled_before_any) == [(None, "failed", 0)]
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


def _match(level: str, study: str | None = None) -> Dataset:
    """A C-FIND match as the node answers it: PATIENT-level ones name the patient, not a study."""
    match = Dataset()
    match.QueryRetrieveLevel, match.PatientName, match.PatientID = level, "Doe^Jane", "PID-1"
    if study is not None:
        match.StudyInstanceUID = study
    return match


def test_a_broad_query_is_recorded_under_each_study_its_matches_disclosed(tmp_path):
    """A C-FIND by PatientName=* once left one record without a study: `audit --study` missed it."""
    sessions = _sessions(tmp_path)
    event = SimpleNamespace(identifier=Dataset(), assoc=_assoc("FINDER", "10.0.0.8", 4000))
    event.identifier.QueryRetrieveLevel, event.identifier.PatientName = "STUDY", "*"

    def studies(event, *args):
        for study in ("1.2.3", "1.2.9", "1.2.3"):
            yield 0xFF00, _match("STUDY", study)
        yield 0x0000, None

    def patients(event, *args):
        disclosed(event, ["1.2.3", "1.2.4"])  # the node names the studies of the patient it answers
        yield 0xFF00, _match("PATIENT")
        yield 0x0000, None

    def run(handler) -> list[tuple[str | None, str, int, str]]:
        list(audited_retrieve("find", handler, sessions)(event))
        with sessions() as session:
            rows = [(r.study_instance_uid, r.outcome, r.instances, r.detail) for r in recent(session)]
            session.execute(AuditEvent.__table__.delete())
            session.commit()
        return sorted(rows, key=lambda row: row[0] or "")

    assert run(studies) == [
        ("1.2.3", "success", 2, "STUDY level, 2 matches (3 in all, over 2 studies)"),
        ("1.2.9", "success", 1, "STUDY level, 1 matches (3 in all, over 2 studies)"),
    ]
    event.identifier.QueryRetrieveLevel = "PATIENT"
    assert run(patients) == [
        ("1.2.3", "success", 1, "PATIENT level, 1 matches (1 in all, over 2 studies)"),
        ("1.2.4", "success", 1, "PATIENT level, 1 matches (1 in all, over 2 studies)"),
    ]


@pytest.mark.parametrize("sent", ["1.2.3%", "1.2.3 OR 1=1", "1.2.03", "1.2.3\0"])
def test_a_query_without_matches_names_the_study_it_asked_for_only_by_a_valid_uid(tmp_path, sent):
    """A C-FIND without matches is recorded under the StudyInstanceUID it asked for, but only where that is a UID:
    the trail never names a study by whatever a peer put in the key (``1.2.3%``); a NUL padding is no part of it."""
    sessions = _sessions(tmp_path)
    event = SimpleNamespace(identifier=Dataset(), assoc=_assoc("FINDER", "10.0.0.8", 4000))
    event.identifier.QueryRetrieveLevel, event.identifier.StudyInstanceUID = "STUDY", sent

    def nothing(event, *args):
        yield 0x0000, None

    list(audited_retrieve("find", nothing, sessions)(event))
    with sessions() as session:
        (recorded,) = [r.study_instance_uid for r in recent(session)]
    assert recorded == ("1.2.3" if sent == "1.2.3\0" else None)


def test_the_studies_a_query_names_in_the_trail_are_bounded(tmp_path, monkeypatch):
    from dicom_node import audit

    monkeypatch.setattr(audit, "MAX_STUDIES_AUDITED", 2)
    sessions = _sessions(tmp_path)
    event = SimpleNamespace(identifier=Dataset(), assoc=_assoc("FINDER", "10.0.0.8", 4000))
    event.identifier.QueryRetrieveLevel = "STUDY"

    def four_studies(event, *args):
        for study in ("1.2.1", "1.2.2", "1.2.3", "1.2.4"):
            yield 0xFF00, _match("STUDY", study)

    list(audited_retrieve("find", four_studies, sessions)(event))
    with sessions() as session:
        rows = sorted((r.study_instance_uid or "", r.instances, r.detail) for r in recent(session))
    assert rows == [
        (
            "",
            2,
            "STUDY level, 2 matches (4 in all, over 3 studies); 2 belong to studies past the first 2, not named "
            "one by one",
        ),
        ("1.2.1", 1, "STUDY level, 1 matches (4 in all, over 3 studies)"),
        ("1.2.2", 1, "STUDY level, 1 matches (4 in all, over 3 studies)"),
    ]


def _nested_identifier(depth: int) -> bytes:
    """A C-FIND identifier (implicit VR little endian) whose sequences nest ``depth`` levels deep."""
    import struct

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    head = Dataset()
    head.QueryRetrieveLevel, head.StudyInstanceUID, head.PatientName = "STUDY", "", ""
    written = DicomBytesIO()
    written.is_little_endian, written.is_implicit_VR = True, True
    write_dataset(written, head)
    opening = struct.pack("<HHL", 0x0040, 0x0275, 0xFFFFFFFF) + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    closing = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return written.getvalue() + opening * depth + closing * depth


def test_a_query_whose_identifier_cannot_be_read_is_refused_and_recorded_in_a_sentence(tmp_path, caplog):
    """An identifier nested 20,000 levels deep once left no record, and a traceback at ERROR."""
    from io import BytesIO

    from pynetdicom.dsutils import decode

    sessions = _sessions(tmp_path)
    raw = _nested_identifier(20_000)

    class Request(SimpleNamespace):
        @property
        def identifier(self) -> Dataset:  # as pynetdicom's event decodes it, on each read
            return decode(BytesIO(raw), True, True, False)

    def never_run(event, *args):
        raise AssertionError("the handler is not run for an identifier that cannot be read")
        yield

    event = Request(assoc=_assoc("ANY", "10.0.0.9", 4000))
    answers = list(audited_retrieve("find", never_run, sessions)(event))
    assert [(status.Status, status.ErrorComment, match) for status, match in answers] == [
        (0xA900, "Identifier cannot be read", None)
    ]
    with sessions() as session:
        [row] = recent(session)
    assert (row.action, row.outcome, row.study_instance_uid, row.instances, row.detail) == (
        "find",
        "refused",
        None,
        0,
        "refused: its identifier nests sequences too deeply to be read",
    )
    [line] = [r for r in caplog.records if r.getMessage() == "query.refused"]
    assert line.levelname == "WARNING" and line.exc_info is None
    assert line.event_fields["reason"] == (
        "a C-FIND from ANY was refused: its identifier nests sequences too deeply to be read"
    )
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


@pytest.mark.integration
def test_a_real_node_records_a_patient_query_under_every_study_it_disclosed(tmp_path, start_node):
    """PatientName=* at PATIENT level discloses the patient's name, ID and birth date: each of the patient's
    studies' trails lists it, and a STUDY-level query by name too."""
    from pynetdicom import AE
    from pynetdicom.sop_class import (
        PatientRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelFind,
    )

    from dicom_node.phantom import PhantomSpec, write_phantom_series
    from tests.conftest import storescu

    node = start_node(completion={"quiet_seconds": 600})
    first = write_phantom_series(tmp_path / "a", PhantomSpec(rows=32, columns=32, slices=2))
    second = write_phantom_series(tmp_path / "b", PhantomSpec(rows=32, columns=32, slices=2))
    assert first.study_instance_uid != second.study_instance_uid
    assert storescu(node.port, [*first.files, *second.files], calling_ae="PACS").returncode == 0

    ae = AE(ae_title="FINDER")
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    matches = {}
    for level, model in (
        ("PATIENT", PatientRootQueryRetrieveInformationModelFind),
        ("STUDY", StudyRootQueryRetrieveInformationModelFind),
    ):
        query = Dataset()
        query.QueryRetrieveLevel, query.PatientName, query.PatientID, query.PatientBirthDate = level, "*", "", ""
        answers = list(assoc.send_c_find(query, model))
        assert answers[-1][0].Status == 0
        matches[level] = [str(match.PatientName) for status, match in answers if status.Status == 0xFF00]
    assoc.release()
    assert matches == {"PATIENT": ["Phantom^Synthetic"], "STUDY": ["Phantom^Synthetic", "Phantom^Synthetic"]}

    def finds(study: str) -> list[tuple[str, int, str]]:
        with node.sessions() as session:
            rows = recent(session, actions=["find"], study_instance_uid=study)
            return sorted((r.peer_ae_title, r.instances, r.detail) for r in rows)

    for study in (first.study_instance_uid, second.study_instance_uid):
        assert wait_for(lambda study=study: len(finds(study)) == 2, what="both queries in the study's trail")
        assert finds(study) == [
            ("FINDER", 1, "PATIENT level, 1 matches (1 in all, over 2 studies)"),
            ("FINDER", 1, "STUDY level, 1 matches (2 in all, over 2 studies)"),
        ]
        listed = node.cli("audit", "--study", study, "--action", "find").stdout
        assert listed.count("FINDER") == 2, listed
    assert "Phantom" not in node.cli("audit").stdout


@pytest.mark.integration
def test_a_query_polled_unchanged_is_recorded_once_per_study_and_the_repeats_counted(tmp_path, start_node):
    """A planning system polling its worklist every few seconds wrote one row per study per poll (17.7 million a
    day at 300 studies and 5 s): the same query from the same peer is recorded once per study each 5 minutes, the
    repeats counted in the next record (here, the one written when the node stops); another query is recorded."""
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    from dicom_node.phantom import PhantomSpec, write_phantom_series
    from tests.conftest import storescu

    node = start_node(completion={"quiet_seconds": 600})
    first = write_phantom_series(tmp_path / "a", PhantomSpec(rows=32, columns=32, slices=2))
    second = write_phantom_series(tmp_path / "b", PhantomSpec(rows=32, columns=32, slices=2))
    assert storescu(node.port, [*first.files, *second.files], calling_ae="PACS").returncode == 0
    studies = (first.study_instance_uid, second.study_instance_uid)

    ae = AE(ae_title="FINDER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)

    def ask(**keys: str) -> int:
        query = Dataset()
        query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", ""
        for keyword, value in keys.items():
            setattr(query, keyword, value)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert assoc.is_established
        answers = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
        assoc.release()
        assert answers[-1][0].Status == 0
        return sum(status.Status == 0xFF00 for status, _ in answers)

    def finds(study: str) -> list[str]:
        with node.sessions() as session:
            return sorted(r.detail or "" for r in recent(session, actions=["find"], study_instance_uid=study))

    for _ in range(4):  # the poll, each on its own association as planning systems do
        assert ask(PatientName="*") == 2
    assert ask(PatientID="") == 2  # another query
    each = "STUDY level, 1 matches (2 in all, over 2 studies)"  # the detail of each query's record
    for study in studies:
        assert wait_for(lambda study=study: len(finds(study)) == 2, what="one record of each query")
        assert finds(study) == [each, each]

    node.stop()
    for study in studies:
        assert finds(study) == [
            each,
            each,
            f"{each}; 2 more identical C-FIND requests of this peer that disclosed this study since the previous "
            "record, not recorded one by one; written when the node stopped",
        ]


@pytest.mark.integration
def test_a_patient_query_is_recorded_only_under_the_studies_of_the_person_it_answered(tmp_path, start_node):
    """Two people under one PatientID (another hospital's numbering, a merge): a PATIENT-level answer names one of
    them and counts only their studies, so only their studies' trails record that it was disclosed."""
    from pynetdicom import AE
    from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind

    from dicom_node.phantom import PhantomSpec, write_phantom_series
    from tests.conftest import storescu

    node = start_node(completion={"quiet_seconds": 600})
    asked = write_phantom_series(tmp_path / "a", PhantomSpec(rows=32, columns=32, slices=2, patient_name="ONE^PERSON"))
    other = write_phantom_series(
        tmp_path / "b", PhantomSpec(rows=32, columns=32, slices=2, patient_name="OTHER^PERSON")
    )
    assert storescu(node.port, asked.files, calling_ae="PACS").returncode == 0
    assert storescu(node.port, other.files, calling_ae="PACS").returncode == 0

    ae = AE(ae_title="FINDER")
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel, query.PatientName, query.PatientID = "PATIENT", "ONE^PERSON", ""
    answers = list(assoc.send_c_find(query, PatientRootQueryRetrieveInformationModelFind))
    assoc.release()
    assert [str(match.PatientName) for status, match in answers if status.Status == 0xFF00] == ["ONE^PERSON"]

    def finds(study: str) -> list[tuple[str, str]]:
        with node.sessions() as session:
            return [(r.peer_ae_title, r.detail) for r in recent(session, actions=["find"], study_instance_uid=study)]

    wait_for(lambda: finds(asked.study_instance_uid), what="the query in the asked person's study trail")
    assert finds(asked.study_instance_uid) == [("FINDER", "PATIENT level, 1 matches")]
    assert finds(other.study_instance_uid) == []


@pytest.mark.integration
def test_a_real_node_answers_and_records_a_query_nested_too_deeply_to_read(tmp_path, start_node):
    from io import BytesIO

    from pynetdicom import AE
    from pynetdicom.dimse_primitives import C_FIND
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

    node = start_node()
    ae = AE(ae_title="ANY")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind, "1.2.840.10008.1.2")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    [context] = [c for c in assoc.accepted_contexts if c.abstract_syntax == StudyRootQueryRetrieveInformationModelFind]
    request = C_FIND()
    request.MessageID, request.AffectedSOPClassUID, request.Priority = 1, StudyRootQueryRetrieveInformationModelFind, 2
    request.Identifier = BytesIO(_nested_identifier(20_000))
    # sent as send_c_find sends (pydicom cannot encode a data set this deep): the reactor paused, so that the
    # answer comes here and not to the association's own thread
    assoc._reactor_checkpoint.clear()
    wait_for(lambda: assoc._is_paused, what="the association's reactor to pause")
    try:
        assoc.dimse.send_msg(request, context.context_id)
        _context_id, answer = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    assert answer is not None and answer.Status == 0xA900
    assert assoc.send_c_echo().Status == 0, "the node goes on serving the association"
    assoc.release()

    def finds():
        with node.sessions() as session:
            return [
                (r.peer_ae_title, r.outcome, r.study_instance_uid, r.detail) for r in recent(session, actions=["find"])
            ]

    assert wait_for(finds, what="the refused query's record") == [
        ("ANY", "refused", None, "refused: its identifier nests sequences too deeply to be read")
    ]
    log = node.log()
    assert "a C-FIND from ANY was refused: its identifier nests sequences too deeply to be read" in log
    assert "Traceback" not in log and " ERROR " not in log


def test_a_real_node_refuses_a_move_nested_too_deeply_to_read_in_a_sentence(tmp_path, start_node):
    """pynetdicom needs a C-MOVE's destination before anything else, so its identifier is read by the handler:
    one nested too deeply is refused there, logged in a sentence, and the node goes on serving."""
    from io import BytesIO

    from pynetdicom import AE
    from pynetdicom.dimse_primitives import C_MOVE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove, Verification

    planner = AE(ae_title="PLANNER")  # the destination, listening: the node opens its sub-association first
    planner.add_supported_context(Verification)
    planner_port = free_port()
    server = planner.start_server(("127.0.0.1", planner_port), block=False)
    node = start_node(destinations={"planner": {"ae_title": "PLANNER", "host": "127.0.0.1", "port": planner_port}})
    ae = AE(ae_title="ANY")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove, "1.2.840.10008.1.2")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    [context] = [c for c in assoc.accepted_contexts if c.abstract_syntax == StudyRootQueryRetrieveInformationModelMove]
    request = C_MOVE()
    request.MessageID, request.AffectedSOPClassUID, request.Priority = 1, StudyRootQueryRetrieveInformationModelMove, 2
    request.MoveDestination = "PLANNER"
    request.Identifier = BytesIO(_nested_identifier(20_000))
    assoc._reactor_checkpoint.clear()  # as send_c_move sends: the answer comes here (see the C-FIND test above)
    wait_for(lambda: assoc._is_paused, what="the association's reactor to pause")
    try:
        assoc.dimse.send_msg(request, context.context_id)
        _context_id, answer = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    server.shutdown()
    assert answer is not None and answer.Status == 0xA900
    assert assoc.send_c_echo().Status == 0, "the node goes on serving the association"
    assoc.release()

    log = wait_for(lambda: "retrieve.refused" in node.log() and node.log(), what="the refusal's log line")
    assert "a retrieval by peer" in log and "its identifier nests sequences too deeply to be read" in log
    assert "Traceback" not in log and " ERROR " not in log


def test_a_record_waits_for_a_database_another_writer_holds_locked_past_the_busy_timeout(tmp_path):
    """The lock is held longer than SQLite's busy timeout (0.2 s here): the record is tried again, not lost."""
    import logging
    import sqlite3
    import threading

    database = tmp_path / "storage" / "dicom-node.db"
    migrate(f"sqlite:///{database}")
    sessions = make_session_factory(make_engine(f"sqlite:///{database}", busy_timeout_seconds=0.2))
    with sessions() as session:  # connected once (WAL set up), as a running node is
        assert recent(session) == []
    holder = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # another writer's transaction: the write lock, held
    waited = threading.Event()

    class Busy(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage() == "database.busy":
                waited.set()

    def release_once_the_record_waited() -> None:
        waited.wait(timeout=30)  # a first try has failed after the busy timeout (or the record gave up)
        holder.execute("ROLLBACK")

    handler = Busy()
    logging.getLogger("db.session").addHandler(handler)
    releaser = threading.Thread(target=release_once_the_record_waited)
    releaser.start()
    try:
        record(sessions, "association", Peer("PACS", "10.1.2.3:40000"), "released")
    finally:
        waited.set()
        releaser.join()
        logging.getLogger("db.session").removeHandler(handler)
        holder.close()

    with sessions() as session:
        rows = [(r.action, r.peer_ae_title, r.outcome) for r in recent(session)]
    assert rows == [("association", "PACS", "released")]


def test_a_query_stopped_at_its_final_status_is_recorded_at_once_not_after_its_own_lock(tmp_path, monkeypatch):
    """pynetdicom stops at a C-FIND's final status (as when it is cut at retrieve.max_find_matches) and drops the
    generator: the handler, still inside its session, held SQLite's write lock while its record waited for it."""
    import time

    from sqlalchemy import select

    from db.models import Study
    from dicom_node import audit

    monkeypatch.setattr(audit, "LOCKED_WAIT_LIMIT_SECONDS", 2.0)  # without the fix: lost after 2 s, not 60
    database = tmp_path / "storage" / "dicom-node.db"
    migrate(f"sqlite:///{database}")
    sessions = make_session_factory(make_engine(f"sqlite:///{database}", busy_timeout_seconds=0.2))
    event = SimpleNamespace(identifier=Dataset(), assoc=_assoc("READER", "10.0.0.8", 4000))
    event.identifier.QueryRetrieveLevel = "IMAGE"

    def cut_short(event, *args):
        with sessions() as session:
            session.execute(select(Study.id)).all()  # the session's transaction: on SQLite, the write lock
            yield 0xA700, None  # out of resources: the final status, yielded inside the session

    answers = audited_retrieve("find", cut_short, sessions)(event)
    assert next(answers) == (0xA700, None)
    started = time.monotonic()
    answers.close()  # what dropping the generator does

    assert time.monotonic() - started < 1.0
    with sessions() as session:
        assert [(r.action, r.peer_ae_title, r.outcome) for r in recent(session)] == [("find", "READER", "failed")]
