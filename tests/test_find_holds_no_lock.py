"""A Query/Retrieve peer holds no lock on the node's database while it is being answered.

The matches of a C-FIND (and the instances of a C-GET or C-MOVE) are read in one short read-only transaction that
ends before the first response goes out: on SQLite a WAL reader, so receivers, workers and the dispatcher write
while a peer is slow to read its answers, and a query is answered while another process writes. In this process:
the node's own Storage and Q/R SCP, a real pynetdicom peer over loopback TCP, a real database.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless
from pynetdicom import AE, build_role, evt
from pynetdicom.dimse_messages import C_FIND_RSP
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # pynetdicom creates its SOP classes at import
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.ingest import record_instance
from db.models import AuditEvent, Study
from db.session import make_engine, make_session_factory, migrate, transaction
from dicom_node.config import NetworkSettings
from dicom_node.receive import scp
from dicom_node.receive.recorder import InstanceRecorder
from dicom_node.receive.storage import InstanceStore
from dicom_node.retrieve.scp import RetrieveContext
from tests.conftest import ct_instance, free_port, wait_for

STUDIES = 12
PENDING = 0xFF00
GUARD_SECONDS = 60.0  # only ever reached when the node is stuck: the test then fails instead of hanging


@dataclass
class QueryRetrieveNode:
    url: str
    sessions: sessionmaker[Session]
    network: NetworkSettings
    server: Any

    def associate(self, *, receiving: bool = False) -> Any:
        """An association of the planning system that finds and gets (and, ``receiving``, takes CT images)."""
        ae = AE(ae_title="PLANNER")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        roles: list[Any] = []
        if receiving:
            ae.add_requested_context(CTImageStorage, JPEG2000Lossless)
            roles = [build_role(CTImageStorage, scp_role=True)]
        assoc = ae.associate(self.network.host, self.network.port, ae_title=self.network.ae_title, ext_neg=roles)
        assert assoc.is_established
        return assoc

    def find_audits(self) -> list[tuple[str | None, int, str]]:
        with self.sessions() as session:
            rows = session.scalars(select(AuditEvent).where(AuditEvent.action == "find").order_by(AuditEvent.id))
            return [(row.study_instance_uid, row.instances, row.outcome) for row in rows]


@contextmanager
def running_node(tmp_path: Path, url: str, busy_timeout_seconds: float = 30.0) -> Iterator[QueryRetrieveNode]:
    """The node's Storage and Q/R SCP on ``url``, holding one image of each of ``STUDIES`` studies."""
    migrate(url)
    sessions = make_session_factory(make_engine(url, busy_timeout_seconds))
    with transaction(sessions) as session:  # one image of each study, as the receiver records them
        for n in range(1, STUDIES + 1):
            record_instance(session, ct_instance(f"1.2.3.{n}.9.1", f"1.2.3.{n}.9", study_instance_uid=f"1.2.3.{n}"))
    store = InstanceStore(tmp_path / "storage")
    recorder = InstanceRecorder(store, sessions)
    recorder.start()
    network = NetworkSettings(ae_title="NODE", host="127.0.0.1", port=free_port())
    retrieve = RetrieveContext(ae_title="NODE", destinations={}, sessions=sessions)
    server = scp.start_storage_scp(
        network, scp.StoreContext(store=store, sessions=sessions, recorder=recorder), retrieve
    )
    try:
        yield QueryRetrieveNode(url, sessions, network, server)
    finally:
        server.shutdown()
        recorder.stop()
        store.close()


@pytest.fixture
def node(tmp_path: Path, database_url: str) -> Iterator[QueryRetrieveNode]:
    with running_node(tmp_path, database_url) as running:
        yield running


def status_of(response: Dataset) -> int:
    """A response's status; -1 for none (the peer gave up waiting for it)."""
    return int(response.get("Status", -1))


def every_study() -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    identifier.ModalitiesInStudy = ""
    identifier.NumberOfStudyRelatedInstances = ""
    return identifier


def test_a_writer_goes_ahead_while_the_node_waits_to_send_a_c_find_answer(node: QueryRetrieveNode) -> None:
    """The node is held between two pending answers of a C-FIND (at the send of the second): the window a long
    list of matches, or a peer slow to take its answers, stretches. A transaction of another process (the
    receiver recording an image, a worker, the dispatcher) must commit then, without waiting for the query or
    failing with "database is locked". Every match is answered and each disclosed study audited once, as before."""
    held, written = threading.Event(), threading.Event()
    pending_sent = 0

    def hold_the_second_answer(event: evt.Event) -> None:  # runs between two yields of the C-FIND handler
        nonlocal pending_sent
        message = event.message
        if isinstance(message, C_FIND_RSP) and message.command_set.Status == PENDING:
            pending_sent += 1
            if pending_sent == 2:
                held.set()
                written.wait(GUARD_SECONDS)

    node.server.bind(evt.EVT_DIMSE_SENT, hold_the_second_answer)
    answers: list[tuple[int, str]] = []
    assoc = node.associate()

    def query() -> None:
        for status, identifier in assoc.send_c_find(every_study(), StudyRootQueryRetrieveInformationModelFind):
            uid = str(identifier.StudyInstanceUID) if identifier is not None else ""
            answers.append((status_of(status), uid))

    peer = threading.Thread(target=query)
    peer.start()
    error: BaseException | None = None
    try:
        assert held.wait(GUARD_SECONDS), "the node never sent a second answer"
        # another process: its own engine, which waits at most a second for SQLite's write lock
        writer = make_engine(node.url, busy_timeout_seconds=1.0)
        try:
            with transaction(make_session_factory(writer)) as session:
                record_instance(session, ct_instance("1.2.3.99.9.1", "1.2.3.99.9", study_instance_uid="1.2.3.99"))
        except Exception as exc:  # noqa: BLE001 - asserted below, after the peer is let go
            error = exc
        finally:
            writer.dispose()
        still_held = not written.is_set() and peer.is_alive()
    finally:
        written.set()
        peer.join(GUARD_SECONDS)
        assoc.release()

    assert error is None, f"the write waited for the C-FIND and failed: {error}"
    assert still_held, "the write completed only once the node had sent its answers"
    studies = [f"1.2.3.{n}" for n in range(1, STUDIES + 1)]
    assert sorted(answers) == sorted([(PENDING, uid) for uid in studies] + [(0x0000, "")])
    with node.sessions() as session:
        assert session.scalar(select(Study.id).where(Study.study_instance_uid == "1.2.3.99")) is not None
    audits = wait_for(lambda: len(node.find_audits()) == STUDIES and node.find_audits(), what="the audit records")
    assert sorted(audits) == [(uid, 1, "success") for uid in sorted(studies)]


def test_a_query_and_a_retrieval_are_answered_while_another_process_holds_the_write_lock(
    tmp_path: Path, shared_fixtures: Path
) -> None:
    """Reading the matches takes no write lock: a C-FIND and a C-GET are answered at once while another process
    holds SQLite's write lock for longer than the node's busy timeout (0.5 s here)."""
    database = tmp_path / "state.db"
    with running_node(tmp_path, f"sqlite:///{database}", busy_timeout_seconds=0.5) as node:
        image = sorted((shared_fixtures / "example_ct_dicom_valid").glob("*.dcm"))[0]
        header = dcmread(image, stop_before_pixels=True)
        sop_instance_uid = str(header.SOPInstanceUID)
        stored = ct_instance(sop_instance_uid, str(header.SeriesInstanceUID), study_instance_uid="1.2.3.50", path=image)
        with transaction(node.sessions) as session:
            record_instance(session, replace(stored, transfer_syntax_uid=str(header.file_meta.TransferSyntaxUID)))
        holder = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
        holder.execute("BEGIN IMMEDIATE")  # another writer's transaction: the write lock, held
        guard = threading.Lock()
        received: list[tuple[str, bool]] = []  # each instance the peer got, and whether the lock was held then

        def give_back() -> None:
            with guard:
                if holder.in_transaction:
                    holder.execute("ROLLBACK")

        def on_store(event: evt.Event) -> int:
            received.append((str(event.dataset.SOPInstanceUID), holder.in_transaction))
            give_back()  # the C-GET's audit record, written before its final status, waits for the lock
            return 0x0000

        try:  # two associations: the C-FIND's audit record waits for the lock after its answers, on its own
            finding, getting = node.associate(), node.associate(receiving=True)
            getting.bind(evt.EVT_C_STORE, on_store)
            found = [
                status_of(s) for s, _ in finding.send_c_find(every_study(), StudyRootQueryRetrieveInformationModelFind)
            ]
            get = Dataset()
            get.QueryRetrieveLevel = "STUDY"
            get.StudyInstanceUID = "1.2.3.50"
            got = [status_of(s) for s, _ in getting.send_c_get(get, StudyRootQueryRetrieveInformationModelGet)]
        finally:
            give_back()
            holder.close()
        finding.release()
        getting.release()

    assert found == [PENDING] * (STUDIES + 1) + [0x0000], "the C-FIND waited for the other writer and failed"
    assert received == [(sop_instance_uid, True)], "the C-GET waited for the other writer and failed"
    assert got[-1] == 0x0000
