"""C-FIND answers as PS3.4 asks: times matched as times of day, every key asked answered, levels of the model only.

A StudyTime stored as ``1015`` (minute precision) or ``10:15:00`` (the older form with colons, stored as sent) was
matched as text: ``103000-110000`` found ``10:15:00`` and ``101500-`` missed ``1015``. A private key asked was left
out of the answers (PS3.4 C.4.1.1.3: every key asked is answered, empty when the node holds none). A Study Root
C-FIND, C-GET or C-MOVE at PATIENT level, a level that model does not have, was answered. Matching is checked on
SQLite and PostgreSQL; what a peer hears, with DCMTK findscu against a real ``dicom-node serve``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from db.ingest import StudyAttributes
from db.models import Instance, Series, Study
from db.session import make_engine, make_session_factory, migrate, transaction
from dicom_node.retrieve.matching import QueryError, check_level_in_model, find
from tests.conftest import Node, require_tool
from tests.test_matching import answers, query, record_one_image_each

STUDY_TIMES = {"9.1": "1015", "9.2": "10:15:00", "9.3": "101530.25", "9.4": "0930", "9.5": "11"}
"""StudyInstanceUID: StudyTime as stored; 9.1 is 10:15:00-10:15:59.999999, 9.5 the whole hour 11."""

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PLANNER = "PLANNER"


@pytest.fixture
def sessions(database_url):
    migrate(database_url)
    factory = make_session_factory(make_engine(database_url))
    studies = [StudyAttributes(uid, patient_id="P1", study_time=time) for uid, time in STUDY_TIMES.items()]
    record_one_image_each(factory, studies)
    return factory


def found_times(sessions, study_time: str) -> list[str]:
    return sorted(answers(sessions, query("STUDY", StudyTime=study_time, StudyInstanceUID=""), "StudyInstanceUID"))


@pytest.mark.parametrize(
    ("asked", "expected"),
    [
        ("103000-110000", ["9.5"]),  # not 10:15:00; the hour 11 holds 11:00:00
        ("101500-", ["9.1", "9.2", "9.3", "9.5"]),  # 1015 is 10:15 to 10:15:59.999999
        ("-101500", ["9.1", "9.2", "9.4"]),
        ("101000-102000", ["9.1", "9.2", "9.3"]),
        ("10:15-10:16", ["9.1", "9.2", "9.3"]),  # the older form in a query too
        ("101531-1200", ["9.1", "9.5"]),  # 10:15:30.25 is before 10:15:31; the minute 10:15 reaches past it
        ("101500", ["9.1", "9.2"]),  # a single value is the range from itself to itself
        ("10:15:00", ["9.1", "9.2"]),
        ("1015", ["9.1", "9.2", "9.3"]),
        ("101530.25", ["9.1", "9.3"]),
    ],
)
def test_study_times_are_compared_as_times_of_day_on_every_database(sessions, asked, expected) -> None:
    assert found_times(sessions, asked) == expected


def test_a_time_range_that_ends_before_it_starts_finds_nothing_not_even_a_whole_hour(sessions) -> None:
    record_one_image_each(sessions, [StudyAttributes("9.6", patient_id="P1", study_time="10")])
    assert found_times(sessions, "1015-1014") == []  # the hour 10 reaches both bounds, yet the range is empty
    assert found_times(sessions, "1014-1015") == ["9.1", "9.2", "9.3", "9.6"]


def test_a_time_that_is_no_time_of_day_is_refused_in_a_sentence_without_the_value(sessions) -> None:
    with pytest.raises(QueryError) as refused:
        found_times(sessions, "10h30-")
    assert "StudyTime holds a value that is not a time of day" in str(refused.value)
    assert "10h30" not in str(refused.value)


@pytest.mark.parametrize("impossible", ["9999", "24", "2400-", "-1060", "106000", "101561", "235960.5-2400"])
def test_a_time_no_clock_shows_is_refused_naming_the_attribute(sessions, impossible) -> None:
    with pytest.raises(QueryError) as refused:
        found_times(sessions, impossible)
    assert "StudyTime holds a value that is not a time of day" in str(refused.value)


def test_the_last_hour_minute_and_leap_second_of_the_day_are_times_of_day(sessions) -> None:
    record_one_image_each(sessions, [StudyAttributes("9.7", patient_id="P1", study_time="235960.5")])
    assert found_times(sessions, "235960") == ["9.7"]
    assert found_times(sessions, "2359-") == ["9.7"]
    assert found_times(sessions, "23") == ["9.7"]
    assert found_times(sessions, "0000-000100") == []


def test_a_date_range_in_the_older_form_with_points_is_read_as_dates(sessions) -> None:
    record_one_image_each(sessions, [StudyAttributes("8.1", patient_id="P2", study_date="20260315")])
    asked = {"2026.03.01-": ["8.1"], "2026.03.16-": [], "-2026.03.14": [], "-2026.03.15": ["8.1"]}
    asked |= {"2026.03.01-2026.03.31": ["8.1"], "2026.03.15": ["8.1"], "2026.03.16": []}  # both bounds; one date
    for study_date, expected in asked.items():
        identifier = query("STUDY", StudyDate=study_date, StudyInstanceUID="")
        assert answers(sessions, identifier, "StudyInstanceUID") == expected, study_date


def private_keys_asked() -> Dataset:
    identifier = query("STUDY", StudyInstanceUID="")
    identifier.add(DataElement(Tag(0x0009, 0x0010), "LO", "ACME 1.0"))
    identifier.add(DataElement(Tag(0x0009, 0x1001), "LO", "asked value"))
    identifier.add(DataElement(Tag(0x0009, 0x1002), "UN", b"\x01\x02"))
    identifier.add(DataElement(Tag(0x0011, 0x0010), "LO", "Präzision"))  # a creator that is not ASCII
    identifier.add(DataElement(Tag(0x0011, 0x1001), "DS", "1.5"))
    return identifier


def test_private_keys_asked_are_answered_empty_and_their_creators_as_asked(sessions) -> None:
    with sessions() as session:
        [answer, *_] = list(find(session, private_keys_asked(), "NODE"))
    assert answer[0x0009, 0x0010].value == "ACME 1.0"
    assert answer[0x0011, 0x0010].value == "Präzision" and answer.SpecificCharacterSet == "ISO_IR 192"
    for tag, vr in ((0x00091001, "LO"), (0x00091002, "UN"), (0x00111001, "DS")):
        assert (answer[tag].VR, answer[tag].is_empty) == (vr, True), tag  # never a value the node does not hold
    assert answer.StudyInstanceUID


@pytest.mark.parametrize("model", [STUDY_ROOT_FIND, STUDY_ROOT_MOVE, STUDY_ROOT_GET])
def test_the_study_root_models_have_no_patient_level(model) -> None:
    with pytest.raises(QueryError, match="the Study Root model has no PATIENT level: query by STUDY, SERIES or IMAGE"):
        check_level_in_model(query("PATIENT", PatientID="P1"), model)
    check_level_in_model(query("STUDY", PatientID="P1"), model)
    check_level_in_model(query("PATIENT", PatientID="P1"), PATIENT_ROOT_FIND)


@pytest.fixture
def node(start_node) -> Node:
    """A real node whose planner may find, holding the studies of :data:`STUDY_TIMES` (one image each, recorded as
    the receiver records them: C-FIND reads no file)."""
    started = start_node(
        peers={"planner": {"ae_title": PLANNER, "hosts": ["127.0.0.1"], "roles": ["find", "move", "get"]}},
        completion={"quiet_seconds": 600},
    )
    with transaction(started.sessions) as session:
        for uid, time in STUDY_TIMES.items():
            study = Study(study_instance_uid=uid, patient_id="P1", study_time=time)
            series = Series(series_instance_uid=f"{uid}.1", study=study, modality="CT", instance_count=1)
            session.add(
                Instance(
                    sop_instance_uid=f"{uid}.1.1",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    series=series,
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    path=f"/data/{uid}.dcm",
                    size_bytes=1,
                    patient_id="P1",
                )
            )
    return started


def findscu(node: Node, folder: Path, *options: str) -> tuple[list[Dataset], str]:
    """The answers DCMTK findscu received (extracted to ``folder``) and what it said of the final response."""
    folder.mkdir()
    command = [require_tool("findscu"), "-v", "-aet", PLANNER, "-aec", node.ae_title, "-X", "-od", str(folder)]
    result = subprocess.run(
        [*command, *options, "127.0.0.1", str(node.port)], capture_output=True, text=True, timeout=120
    )
    said = "\n".join(line for line in (result.stdout + result.stderr).splitlines() if "Final Find Response" in line)
    return [pydicom.dcmread(path) for path in sorted(folder.glob("rsp*.dcm"))], said


def test_findscu_finds_study_times_as_times_and_hears_its_private_keys_back(node, tmp_path: Path) -> None:
    keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID", "-k", "StudyTime=101500-"]
    private = ["-k", "(0009,0010)=ACME 1.0", "-k", "(0009,1001)=asked value", "-k", "(0019,1001)"]
    found, said = findscu(node, tmp_path / "times", "-S", *keys, *private)
    assert "Success" in said, said
    assert sorted(str(answer.StudyInstanceUID) for answer in found) == ["9.1", "9.2", "9.3", "9.5"]
    for answer in found:
        assert answer[0x0009, 0x0010].value == "ACME 1.0"
        assert answer[0x0009, 0x1001].is_empty and answer[0x0019, 0x1001].is_empty

    found, said = findscu(node, tmp_path / "early", "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyTime=-101500")
    assert "Success" in said, said
    assert sorted(str(answer.StudyInstanceUID) for answer in found) == ["9.1", "9.2", "9.4"]


def test_a_study_root_query_at_patient_level_is_refused_and_a_patient_root_one_answered(node, tmp_path) -> None:
    keys = ["-k", "QueryRetrieveLevel=PATIENT", "-k", "PatientID=P1"]
    found, said = findscu(node, tmp_path / "study-root", "-S", *keys)
    assert found == [] and "Error: DataSetDoesNotMatchSOPClass" in said, said
    assert "the Study Root model has no PATIENT level: query by STUDY, SERIES or IMAGE" in node.log()

    found, said = findscu(node, tmp_path / "patient-root", "-P", *keys)
    assert "Success" in said and [str(answer.PatientID) for answer in found] == ["P1"], said


def test_a_study_root_retrieval_at_patient_level_is_refused(node, tmp_path: Path) -> None:
    received = tmp_path / "received"
    received.mkdir()
    command = [require_tool("getscu"), "-v", "-S", "-aet", PLANNER, "-aec", node.ae_title, "-od", str(received)]
    keys = ["-k", "QueryRetrieveLevel=PATIENT", "-k", "PatientID=P1"]
    result = subprocess.run([*command, *keys, "127.0.0.1", str(node.port)], capture_output=True, text=True, timeout=120)
    said = result.stdout + result.stderr
    assert "Received C-GET Response (Error: DataSetDoesNotMatchSOPClass)" in said, said
    refused = [line for line in node.log().splitlines() if " retrieve.refused " in line]
    assert any("the Study Root model has no PATIENT level" in line for line in refused), node.log()
    assert list(received.iterdir()) == []
