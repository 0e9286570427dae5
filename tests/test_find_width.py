"""A C-FIND answer is as wide as what the node holds, not as wide as the peer asks.

A peer may list every keyword of the DICOM dictionary in a narrow query (a literal StudyInstanceUID): each answer
would carry thousands of elements, and every match is built before the first is sent. Keys the node does not hold
come back empty, built once per query; an identifier of far more keys than the node could fill is refused
(0xA900). In this process: the node's own Q/R SCP, a real pynetdicom peer over loopback TCP, a real SQLite file.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.datadict import DicomDictionary
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]  # pynetdicom creates its SOP classes at import
from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

from db.ingest import record_instance
from db.session import make_engine, make_session_factory, migrate, transaction
from dicom_node.config import NetworkSettings
from dicom_node.receive import scp
from dicom_node.receive.recorder import InstanceRecorder
from dicom_node.receive.storage import InstanceStore
from dicom_node.retrieve.matching import KEYS, MAX_QUERY_KEYS, QueryError, find
from dicom_node.retrieve.scp import RetrieveContext
from dicom_node.security import Peer, PeerPolicy
from tests.conftest import ct_instance, free_port

IMAGES = 40
STUDY = "1.2.3"


@pytest.fixture
def sessions(tmp_path: Path) -> sessionmaker[Session]:
    """One study of ``IMAGES`` CT images in two series, as the receiver records them."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    migrate(url)
    factory = make_session_factory(make_engine(url))
    with transaction(factory) as session:
        for n in range(IMAGES):
            record_instance(session, ct_instance(f"1.2.3.{n % 2}.{n}", f"1.2.3.{n % 2}", study_instance_uid=STUDY))
    return factory


def every_keyword(identifier: Dataset) -> Dataset:
    """``identifier`` asking, besides its own keys, for every keyword of the DICOM dictionary (as the reviewer's)."""
    for tag, entry in DicomDictionary.items():
        keyword = entry[4]
        if (
            keyword
            and tag >> 16 not in (0x0000, 0x0002, 0xFFFE)
            and " or " not in entry[0]
            and keyword not in identifier
        ):
            identifier.add_new(tag, entry[0], None)
    return identifier


def image_query(**keys: Any) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "IMAGE"
    identifier.StudyInstanceUID = STUDY
    identifier.SeriesInstanceUID = ""
    identifier.SOPInstanceUID = ""
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    return identifier


def unheld_keywords(count: int) -> list[str]:
    """``count`` keywords the node holds nothing of (no column, no count): plain text attributes."""
    found = [
        entry[4]
        for tag, entry in sorted(DicomDictionary.items())
        if entry[0] in ("LO", "SH", "CS") and tag >> 16 > 0x0008 and "Retired" not in entry[3] and entry[4] not in KEYS
    ]
    return found[:count]


def test_an_identifier_of_far_more_keys_than_the_node_fills_is_refused_in_a_sentence(sessions) -> None:
    wide = every_keyword(image_query())
    assert len(wide) > 4000

    with sessions() as session, pytest.raises(QueryError) as refused:
        next(find(session, wide, "NODE"))

    reason = str(refused.value)
    assert f"asks for {len(wide)} attributes" in reason and f"at most {MAX_QUERY_KEYS}" in reason, reason


def test_keys_the_node_does_not_hold_come_back_empty_built_once_for_every_answer(sessions) -> None:
    """Each asked key is in every answer (PS3.4 lets an SCP answer a key it does not hold with no value), the held
    ones with their values; one without a value costs no element of its own per answer."""
    unheld = unheld_keywords(MAX_QUERY_KEYS - 10)
    identifier = image_query(InstanceNumber="", Modality="", **dict.fromkeys(unheld, ""))
    assert len(identifier) <= MAX_QUERY_KEYS

    with sessions() as session:
        answers = list(find(session, identifier, "NODE"))

    assert len(answers) == IMAGES
    for answer in answers:
        assert answer.StudyInstanceUID == STUDY and answer.Modality == "CT" and answer.RetrieveAETitle == "NODE"
        assert all(keyword in answer and answer[keyword].is_empty for keyword in unheld)
    first, second = answers[0], answers[1]
    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert all(first[keyword] is second[keyword] for keyword in unheld)  # one empty element, shared


def test_a_count_is_read_once_per_study_not_once_per_answer(sessions) -> None:
    statements: list[str] = []
    engine = sessions.kw["bind"]

    def counted(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    identifier = image_query(NumberOfStudyRelatedInstances="", ModalitiesInStudy="", NumberOfSeriesRelatedInstances="")
    event.listen(engine, "before_cursor_execute", counted)
    try:
        with sessions() as session:
            answers = list(find(session, identifier, "NODE"))
    finally:
        event.remove(engine, "before_cursor_execute", counted)

    assert [int(a.NumberOfStudyRelatedInstances) for a in answers] == [IMAGES] * IMAGES
    assert {int(a.NumberOfSeriesRelatedInstances) for a in answers} == {IMAGES // 2}
    counts = [s for s in statements if "count(" in s.lower() or "distinct" in s.lower()]
    assert len(counts) <= 4, counts  # the study's counts once, each series' once


@pytest.fixture
def node(tmp_path: Path, sessions: sessionmaker[Session]) -> Iterator[NetworkSettings]:
    """The node's Storage and Q/R SCP; PLANNER (loopback) may move, get and echo, not find."""
    store = InstanceStore(tmp_path / "storage")
    recorder = InstanceRecorder(store, sessions)
    recorder.start()
    network = NetworkSettings(ae_title="NODE", host="127.0.0.1", port=free_port())
    planner = Peer("planner", "PLANNER", (ipaddress.ip_network("127.0.0.0/8"),), frozenset({"move", "get", "echo"}))
    retrieve = RetrieveContext(
        ae_title="NODE", destinations={}, sessions=sessions, peers=PeerPolicy([planner], "the planner only")
    )
    server = scp.start_storage_scp(
        network, scp.StoreContext(store=store, sessions=sessions, recorder=recorder), retrieve
    )
    try:
        yield network
    finally:
        server.shutdown()
        recorder.stop()
        store.close()


def test_a_peer_asking_for_every_keyword_gets_0xa900_and_the_log_says_why(node, caplog) -> None:
    ae = AE(ae_title="PLANNER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        narrow = list(assoc.send_c_find(image_query(), StudyRootQueryRetrieveInformationModelFind))
        wide = list(assoc.send_c_find(every_keyword(image_query()), StudyRootQueryRetrieveInformationModelFind))
    finally:
        assoc.release()

    assert [int(status.Status) for status, _ in narrow] == [0xFF00] * IMAGES + [0x0000]
    assert [int(status.Status) for status, _ in wide] == [0xA900]
    reasons = [getattr(r, "event_fields", {}).get("reason", "") for r in caplog.records if r.msg == "query.refused"]
    assert any(f"at most {MAX_QUERY_KEYS}" in reason for reason in reasons), reasons
