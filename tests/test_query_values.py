"""Query/Retrieve refuses key values no matching could use, in a sentence naming the attribute, never the value.

A value longer than its VR allows (a 60,002-character wildcard name made SQLite give up: "pattern too complex"),
with dozens of wildcards, a UID list of thousands beyond reason, or a control character (a NUL cut SQLite's pattern
short, so ``*<NUL>zzz`` matched every study; PostgreSQL refuses a NUL outright) is refused with 0xA900 through the
throttled ``query.refused`` path, and a C-GET or C-MOVE naming one with ``retrieve.refused``. Trailing padding (a
space, a NUL) is no part of a value. Matching is checked on SQLite and PostgreSQL; what a peer hears and what the
log keeps, on a real ``dicom-node serve`` with DCMTK findscu, getscu and movescu and a pynetdicom requestor.
"""

from __future__ import annotations

import io
import ipaddress
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.dsutils import decode, encode
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from db.ingest import StudyAttributes, record_instance
from db.session import make_engine, make_session_factory, migrate, transaction
from dicom_node.config import NetworkSettings
from dicom_node.logs import Throttle
from dicom_node.phantom import PhantomSpec, write_phantom_series
from dicom_node.receive import scp as receive_scp
from dicom_node.receive.recorder import InstanceRecorder
from dicom_node.receive.storage import InstanceStore
from dicom_node.retrieve import scp as retrieve_scp
from dicom_node.retrieve.matching import (
    MAX_LISTED_UIDS,
    MAX_WILDCARDS,
    UnsearchableValue,
    matching_instances,
)
from dicom_node.retrieve.scp import RetrieveContext
from dicom_node.security import Peer, PeerPolicy
from tests.conftest import Node, free_port, require_tool, storescu, wait_for
from tests.test_matching import answers, instance, query

FIND = StudyRootQueryRetrieveInformationModelFind
PLANNER = "PLANNER"
HUGE_PATTERN = "*" + "?*" * 30000  # 60,001 characters, as the reviewer sent: over SQLite's 50,000-byte pattern limit
JAPANESE_NAME = "Yamada^Tarou=山田^太郎"
JIS_NAME = "Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B".encode("latin-1")  # JAPANESE_NAME in ISO 2022 IR 87


@pytest.fixture
def sessions(database_url):
    """Two patients' studies (P1 Doe^Jane, P2 with a Japanese name), three images each, on SQLite and PostgreSQL."""
    migrate(database_url)
    factory = make_session_factory(make_engine(database_url))
    studies = [
        StudyAttributes("1.1", patient_id="P1", patient_name="Doe^Jane", study_date="20260110", study_time="083000"),
        StudyAttributes("2.1", patient_id="P2", patient_name=JAPANESE_NAME, study_date="20251231"),
    ]
    with transaction(factory) as session:
        for study in studies:
            uid = study.study_instance_uid
            for n in range(3):
                record_instance(session, instance(f"{uid}.9.{n}", f"{uid}.9", study, n + 1))
    return factory


def refusal(sessions, identifier: Dataset) -> str:
    """The sentence a C-FIND of ``identifier`` is refused with."""
    with pytest.raises(UnsearchableValue) as refused:
        answers(sessions, identifier, "StudyInstanceUID")
    return str(refused.value)


def as_received(charset: str | list[str] | None, keyword: str, raw: bytes) -> Dataset:
    """A STUDY query whose ``keyword`` holds ``raw`` bytes, encoded and decoded as pynetdicom hands it over."""
    identifier = Dataset()
    if charset is not None:
        identifier.SpecificCharacterSet = charset
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    tag = tag_for_keyword(keyword)
    identifier[tag] = RawDataElement(tag, dictionary_VR(tag), len(raw), raw, 0, True, True)
    encoded = encode(identifier, True, True)
    assert encoded is not None
    decoded = decode(io.BytesIO(encoded), True, True)
    assert decoded is not None
    return decoded


def test_a_nul_inside_a_value_is_refused_and_trailing_padding_is_no_part_of_it(sessions) -> None:
    for value in ("*\x00zzz", "P\x001", "?\x00*", "P1\x00zzz"):
        sentence = refusal(sessions, query("STUDY", PatientID=value, StudyInstanceUID=""))
        assert sentence.startswith("PatientID holds a control character (NUL"), sentence
        assert "zzz" not in sentence
    for control in ("\t", "\n", "\r", "\x07", "\x7f"):
        assert "control character" in refusal(sessions, query("STUDY", StudyDescription=f"CHEST{control}*"))
    assert "control character" in refusal(sessions, query("STUDY", StudyInstanceUID="1.1\x00\\2.1"))

    # padding at the end, as DICOM pads a value (a NUL after a UID), is no part of the value
    assert answers(sessions, query("STUDY", PatientID="P1\x00", StudyInstanceUID=""), "StudyInstanceUID") == ["1.1"]
    assert answers(sessions, query("STUDY", PatientID="P2 \x00", StudyInstanceUID=""), "StudyInstanceUID") == ["2.1"]
    assert answers(sessions, query("STUDY", StudyInstanceUID="1.1\x00"), "StudyInstanceUID") == ["1.1"]


def test_an_escape_sequence_counts_only_to_a_declared_character_set(sessions) -> None:
    declared = as_received(["", "ISO 2022 IR 87"], "PatientName", JIS_NAME)
    assert answers(sessions, declared, "StudyInstanceUID") == ["2.1"]
    with pytest.warns(UserWarning):  # pydicom reads it in ISO_IR 100, the escape sequence left in the text
        undeclared = as_received("ISO_IR 100", "PatientName", JIS_NAME)
        sentence = refusal(sessions, undeclared)
    assert sentence.startswith("PatientName holds an escape sequence to a character set that its "), sentence
    assert "SpecificCharacterSet does not declare" in sentence


def test_a_value_longer_than_its_vr_allows_is_refused_naming_its_length_not_its_text(sessions) -> None:
    sentence = refusal(sessions, query("STUDY", PatientName=HUGE_PATTERN, StudyInstanceUID=""))
    assert sentence.startswith("PatientName has a component group of 60001 characters, where at most 64"), sentence
    assert "?*?*" not in sentence
    for keyword, vr, limit in [("StudyDescription", "LO", 64), ("AccessionNumber", "SH", 16), ("Modality", "CS", 16)]:
        level = "SERIES" if keyword == "Modality" else "STUDY"
        sentence = refusal(sessions, query(level, StudyInstanceUID="1.1", **{keyword: "A" * (limit + 1) + "*"}))
        assert sentence.startswith(f"{keyword} is {limit + 2} characters long, more than the {limit} DICOM allows "
                                   f"({vr})"), sentence  # fmt: skip
    assert "(UI)" in refusal(sessions, query("STUDY", StudyInstanceUID="1." + "2" * 70))
    assert "(IS)" in refusal(sessions, query("SERIES", StudyInstanceUID="1.1", SeriesNumber="1" * 13))
    assert "DICOM allows (DA range)" in refusal(sessions, query("STUDY", StudyDate="20260101-2026013100"))
    assert "DICOM allows (TM range)" in refusal(sessions, query("STUDY", StudyTime="083000.00000000-090000.000000"))
    name_groups = refusal(sessions, query("STUDY", PatientName="A=B=C=D"))
    assert name_groups.startswith("PatientName has 4 component groups"), name_groups


def test_values_at_their_vr_limits_are_still_matched(sessions) -> None:
    """A date or time range may be two values long (PS3.5 6.2), a name 64 characters per component group."""
    assert answers(sessions, query("STUDY", StudyDate="20260101-20260131"), "StudyInstanceUID") == ["1.1"]
    assert answers(sessions, query("STUDY", StudyTime="080000.000000-090000.000000"), "StudyInstanceUID") == ["1.1"]
    longest_groups = "=".join(["A" * 64, "B" * 64, "C" * 64])
    assert answers(sessions, query("STUDY", PatientName=longest_groups), "StudyInstanceUID") == []
    assert answers(sessions, query("STUDY", PatientName=f"Yamada^Tarou={'?' * 5}"), "StudyInstanceUID") == ["2.1"]
    assert answers(sessions, query("STUDY", PatientID="?" * 2 + "*" * (MAX_WILDCARDS - 2)), "PatientID") == [
        "P2",
        "P1",
    ]
    many_uids = "\\".join(["1.1", *(f"3.{n}" for n in range(MAX_LISTED_UIDS - 1))])
    assert answers(sessions, query("STUDY", StudyInstanceUID=many_uids), "StudyInstanceUID") == ["1.1"]


def test_too_many_wildcards_or_listed_values_are_refused(sessions) -> None:
    sentence = refusal(sessions, query("STUDY", PatientID="*?" * 17, StudyInstanceUID=""))
    assert sentence.startswith(f"PatientID holds 34 wildcards (* and ?), more than the {MAX_WILDCARDS}"), sentence
    too_many = "\\".join(f"3.{n}" for n in range(MAX_LISTED_UIDS + 1))
    sentence = refusal(sessions, query("STUDY", StudyInstanceUID=too_many))
    assert sentence.startswith(f"StudyInstanceUID lists {MAX_LISTED_UIDS + 1} values, more than the"), sentence
    assert "ModalitiesInStudy lists 1000 values" in refusal(
        sessions, query("STUDY", StudyInstanceUID="", ModalitiesInStudy=["CT"] * 1000)
    )


def test_a_retrieval_naming_such_a_value_is_refused_the_same_way(sessions) -> None:
    identifier = query("STUDY", StudyInstanceUID="1.1", StudyDescription="*" + "?*" * 30000)
    with sessions() as session, pytest.raises(UnsearchableValue) as refused:
        matching_instances(session, identifier, for_retrieval=True)
    assert str(refused.value).startswith("StudyDescription is 60001 characters long, more than the 64")
    identifier = query("STUDY", StudyInstanceUID="1.1", StudyDescription="*\x00zzz")
    with sessions() as session, pytest.raises(UnsearchableValue, match="StudyDescription holds a control character"):
        matching_instances(session, identifier, for_retrieval=True)


# A real node and real peers.


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A real node holding one small CT study (sent by DCMTK storescu), whose planner may find, get and move (to
    itself: movescu's own storage SCP); the node, the planner's port, and the study's UID."""
    planner_port = free_port()
    folder = tmp_path_factory.mktemp("values")
    running = Node(
        folder / "node",
        {
            "peers": {
                "pacs": {"ae_title": "PACS", "hosts": ["127.0.0.1"], "roles": ["store"]},
                "planner": {"ae_title": PLANNER, "hosts": ["127.0.0.1"], "roles": ["find", "move", "get"]},
            },
            "destinations": {"planner": {"ae_title": PLANNER, "host": "127.0.0.1", "port": planner_port}},
        },
    ).start()
    try:
        series = write_phantom_series(folder / "ct", PhantomSpec(rows=32, columns=32, slices=2))
        sent = storescu(running.port, list(series.files))
        assert sent.returncode == 0, sent.stdout + sent.stderr
        study = str(pydicom.dcmread(series.files[0], stop_before_pixels=True).StudyInstanceUID)
        wait_for(lambda: _find_statuses(running, query("STUDY", StudyInstanceUID=study)) == [0xFF00, 0x0000])
        yield running, planner_port, study
    finally:
        running.stop()


def _find_statuses(node: Node, identifier: Dataset) -> list[int]:
    """The statuses a pynetdicom C-FIND of ``identifier`` is answered with."""
    ae = AE(ae_title=PLANNER)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 30
    ae.add_requested_context(FIND)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        return [int(status.Status) for status, _ in assoc.send_c_find(identifier, FIND)]
    finally:
        assoc.release()


def _dcmtk(tool: str, *args: str) -> str:
    """What a DCMTK tool said of the node's responses (its lines naming a response)."""
    result = subprocess.run([require_tool(tool), "-v", *args], capture_output=True, text=True, timeout=120)
    return "\n".join(line for line in (result.stdout + result.stderr).splitlines() if "Response" in line)


def _lines(node: Node, event: str) -> list[str]:
    """The node's log lines of ``event``."""
    return [line for line in node.log().splitlines() if f" {event} " in line]


def test_a_huge_wildcard_name_is_answered_0xa900_and_100_of_them_leave_a_bounded_log(node, tmp_path: Path) -> None:
    running, _port, _study = node
    output = _dcmtk(
        "findscu", "-S", "-aet", PLANNER, "-aec", running.ae_title, "-k", "QueryRetrieveLevel=STUDY",
        "-k", f"PatientName={HUGE_PATTERN}", "-k", "StudyInstanceUID", "127.0.0.1", str(running.port),
    )  # fmt: skip
    assert "Received Final Find Response (Error: DataSetDoesNotMatchSOPClass)" in output, output
    [line] = wait_for(lambda: _lines(running, "query.refused"), what="the refusal's log line")
    assert "PatientName has a component group of 60001 characters, where at most 64 are allowed" in line
    assert "?*?*" not in running.log() and "Traceback" not in running.log()

    before = running.log_path.stat().st_size
    ae = AE(ae_title=PLANNER)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 30
    ae.add_requested_context(FIND)
    assoc = ae.associate("127.0.0.1", running.port, ae_title=running.ae_title)
    assert assoc.is_established
    identifier = query("STUDY", PatientName=HUGE_PATTERN, StudyInstanceUID="")
    statuses = [int(list(assoc.send_c_find(identifier, FIND))[-1][0].Status) for _ in range(100)]
    nul = [int(list(assoc.send_c_find(query("STUDY", PatientID=v, StudyInstanceUID=""), FIND))[-1][0].Status)
           for v in ("*\x00zzz", "XSS\x00*")]  # fmt: skip
    assoc.release()

    assert statuses == [0xA900] * 100 and nul == [0xA900] * 2
    wait_for(lambda: any("PatientID holds a control character" in line for line in _lines(running, "query.refused")))
    grown = running.log_path.stat().st_size - before
    assert grown < 20_000, f"100 refused queries grew the log by {grown} bytes"
    assert "query.failed" not in running.log()


def test_a_get_or_move_naming_a_huge_value_is_refused_with_a_reason(node, tmp_path: Path) -> None:
    running, planner_port, study = node
    keys = [
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study}",
        "-k",
        f"StudyDescription={HUGE_PATTERN}",
    ]
    got = _dcmtk(
        "getscu", "-S", "-aet", PLANNER, "-aec", running.ae_title, "-od", str(tmp_path), *keys,
        "127.0.0.1", str(running.port),
    )  # fmt: skip
    moved = _dcmtk(
        "movescu", "-S", "-aet", PLANNER, "-aec", running.ae_title, "-aem", PLANNER, "--port", str(planner_port),
        "-od", str(tmp_path), *keys, "127.0.0.1", str(running.port),
    )  # fmt: skip
    assert "Received C-GET Response (Error: DataSetDoesNotMatchSOPClass)" in got, got
    assert "Received Final Move Response (Error: DataSetDoesNotMatchSOPClass)" in moved, moved
    lines = wait_for(lambda: _lines(running, "retrieve.refused"), what="the refusal's log line")
    assert any("StudyDescription is 60001 characters long, more than the 64 DICOM allows (LO)" in x for x in lines)
    assert "invalid number of sub-operations" not in running.log()


# A query the node cannot answer for a reason of its own: the trace once, not once per query.


@contextmanager
def node_on_an_unreadable_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, role: str) -> Iterator[int]:
    """The node's SCP in this process, receiving into a database of its own but answering the planner (``role``)
    from one that cannot be opened, its log throttles fresh; the port it listens on."""
    monkeypatch.setattr(retrieve_scp, "REPEATED_REFUSALS", Throttle(10.0))
    monkeypatch.setattr(retrieve_scp, "FAILURES_TRACED", Throttle(3600.0))
    url = f"sqlite:///{tmp_path / 'state.db'}"
    migrate(url)
    sessions = make_session_factory(make_engine(url))
    (tmp_path / "not-a-database").mkdir()
    unreadable = make_session_factory(make_engine(f"sqlite:///{tmp_path / 'not-a-database'}"))
    store = InstanceStore(tmp_path / "storage")
    recorder = InstanceRecorder(store, sessions)
    recorder.start()
    network = NetworkSettings(ae_title="NODE", host="127.0.0.1", port=free_port())
    planner = Peer("planner", PLANNER, (ipaddress.ip_network("127.0.0.0/8"),), frozenset({role}))
    retrieve = RetrieveContext(
        ae_title="NODE", destinations={}, sessions=unreadable, peers=PeerPolicy([planner], "the planner only")
    )
    server = receive_scp.start_storage_scp(
        network, receive_scp.StoreContext(store=store, sessions=sessions, recorder=recorder), retrieve
    )
    try:
        yield network.port
    finally:
        server.shutdown()
        recorder.stop()
        store.close()


def test_a_query_failing_inside_the_node_leaves_one_traceback_not_one_per_query(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Each C-FIND fails on a database that cannot be opened (0xC001); 50 of them leave one ERROR line with the
    details, and a line of another failure has its own."""
    with node_on_an_unreadable_database(tmp_path, monkeypatch, "find") as port:
        ae = AE(ae_title=PLANNER)
        ae.add_requested_context(FIND)
        assoc = ae.associate("127.0.0.1", port, ae_title="NODE")
        assert assoc.is_established
        statuses = [
            int(list(assoc.send_c_find(query("STUDY", StudyInstanceUID=""), FIND))[-1][0].Status) for _ in range(50)
        ]
        assoc.release()

    assert statuses == [0xC001] * 50
    [failed] = [record for record in caplog.records if record.msg == "query.failed"]
    assert failed.exc_info is not None
    assert "its details are in this line's exception field" in failed.event_fields["reason"]  # type: ignore[attr-defined]


def test_a_retrieval_failing_inside_the_node_is_answered_unable_to_process_with_one_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A C-GET on a database that cannot be opened ended in pynetdicom's own failure (the handler gave no count of
    sub-operations) and no reason in the log; it is answered 0xC000 now, the log saying why once per failure."""
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet  # type: ignore[attr-defined]

    with node_on_an_unreadable_database(tmp_path, monkeypatch, "get") as port:
        ae = AE(ae_title=PLANNER)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        assoc = ae.associate("127.0.0.1", port, ae_title="NODE")
        assert assoc.is_established
        identifier = query("STUDY", StudyInstanceUID="1.2.3")
        finals = [
            list(assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet))[-1][0] for _ in range(5)
        ]
        assoc.release()

    assert [(int(s.Status), str(s.get("ErrorComment"))) for s in finals] == [
        (0xC000, "Unable to process: see the node's log")
    ] * 5
    [failed] = [record for record in caplog.records if record.msg == "retrieve.failed"]
    assert failed.exc_info is not None
    assert failed.event_fields["reason"].startswith(  # type: ignore[attr-defined]
        "the node could not answer this retrieval (C-GET or C-MOVE) because of an internal error"
    )
