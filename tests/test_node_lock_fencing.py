"""Fencing: a node that lost its lock on the database to another node sends nothing more (PostgreSQL)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import Counter

import pytest
from sqlalchemy import select

from db import jobs
from db.jobs import job_for_series_uid
from db.models import AuditEvent, Job, JobState
from db.session import NodeLock, make_engine, make_session_factory, migrate, transaction
from dicom_node.config import Settings
from dicom_node.dispatch import LOCK_LOST, Dispatcher
from dicom_node.phantom import PhantomSpec
from dicom_node.worker import InferenceWorker
from tests.conftest import end_node_lock_connection, seed_queued_series, wait_for
from tests.test_dispatch_faults import Peer

pytestmark = pytest.mark.integration

SMALL = PhantomSpec(rows=32, columns=32, slices=12, pixel_spacing=(8.0, 8.0), slice_spacing=10.0)


@pytest.fixture
def sending_on_postgresql(tmp_path, postgresql_url, monkeypatch):
    """A SENDING job (SEG and SR for "pacs") in a PostgreSQL database, and that PACS."""
    monkeypatch.setattr(NodeLock, "WATCH_SECONDS", 600.0)  # the fence is what is tested, not the watch
    pacs = Peer("PACS").start()
    settings = Settings(
        storage={"directory": tmp_path / "storage"},
        database={"url": postgresql_url},
        inference={"workers": 0},
        dispatch={"check_interval_seconds": 0.2, "first_retry_seconds": 0.5, "max_retry_seconds": 0.5},
        destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port, "send": ["seg", "sr"]}},
    )
    migrate(postgresql_url)
    sessions = make_session_factory(make_engine(postgresql_url))
    (uid,) = seed_queued_series(sessions, tmp_path / "ct", 1, SMALL)
    with transaction(sessions) as session:
        session.scalars(select(Job)).one().destinations = ["pacs"]
    assert InferenceWorker(settings, sessions, "test-host:1").run_once()
    try:
        yield settings, sessions, uid, pacs
    finally:
        pacs.stop()
        sessions.kw["bind"].dispose()


def test_a_node_that_lost_its_lock_mid_send_sends_no_further_file_and_the_new_holder_sends_each_once(
    sending_on_postgresql,
):
    settings, sessions, uid, pacs = sending_on_postgresql
    url = settings.database_url
    first, second = NodeLock(url), NodeLock(url)
    lost: list[str] = []
    assert first.try_take()
    first.watch(lost.append)

    def lock_taken_over(_uid: str) -> None:
        """While the first file is being answered: the first node's lock connection ends, another node takes it."""
        if pacs.before_answer is None:
            return
        pacs.before_answer = None
        end_node_lock_connection(url)
        wait_for(second.try_take, timeout=10, what="the other node to take the lock")

    pacs.before_answer = lock_taken_over
    old = Dispatcher(settings, sessions, holds_lock=first.confirm)
    new = Dispatcher(settings, sessions, holds_lock=second.confirm)
    old.start()
    try:
        wait_for(lambda: lost, timeout=60, what="the first node to find its lock lost")
        wait_for(lambda: _send_audits(sessions), timeout=30, what="the first node's attempt to end")
        assert len(pacs.received) == 1  # the file in flight, nothing after it
        assert not first.confirm()  # lost for good: no new attempt either
        with sessions() as session:
            job = job_for_series_uid(session, uid)
            assert job.state is JobState.SENDING
            assert jobs.delivery_record(job, "pacs").attempts == 0  # not counted: the new holder counts its own
        (detail,) = _send_audits(sessions)
        assert detail.endswith(f"1 of 2 file(s) accepted; {LOCK_LOST}")
        assert len(lost) == 1 and "another dicom-node serve holds the database now" in lost[0]

        new.start()
        wait_for(lambda: _state(sessions, uid) is JobState.DONE, timeout=60, what="the new holder to finish")
    finally:
        old.stop()
        new.stop()
        first.release()
        second.release()
    received = Counter(pacs.received)
    assert len(received) == 2 and set(received.values()) == {1}, received


def test_confirm_takes_the_lock_again_when_its_connection_ended_and_no_other_node_took_it(postgresql_url):
    migrate(postgresql_url)
    lock = NodeLock(postgresql_url)
    lost: list[str] = []
    assert lock.try_take()
    lock.watch(lost.append)
    try:
        end_node_lock_connection(postgresql_url)
        assert lock.confirm()
        assert not NodeLock(postgresql_url).try_take() and not lost
    finally:
        lock.release()
    assert not lock.confirm()  # released at a clean stop: nothing is sent after it


def test_a_node_that_lost_its_lock_stops_its_dispatcher_and_retention_first_and_says_so(tmp_path, caplog, monkeypatch):
    from dicom_node.retention import RetentionTask
    from dicom_node.service import _stop_this_node

    settings = Settings(storage={"directory": tmp_path / "storage"}, network={"ae_title": "NODEA"})
    migrate(settings.database_url)
    sessions = make_session_factory(make_engine(settings.database_url))
    dispatcher, retention = Dispatcher(settings, sessions), RetentionTask(settings, sessions)
    dispatcher.start()
    retention.start()
    running_at_sigterm: list[bool] = []

    def on_sigterm(pid: int, signum: int) -> None:  # the SIGTERM the node sends itself, taken here: never delivered
        assert pid == os.getpid() and signum == signal.SIGTERM
        running_at_sigterm.extend([dispatcher._thread.is_alive(), retention._thread.is_alive()])

    monkeypatch.setattr("dicom_node.service.os.kill", on_sigterm)
    try:
        with caplog.at_level(logging.ERROR, logger="dicom_node.service"):
            _stop_this_node(settings, "another dicom-node serve holds the database now", [dispatcher, retention])
    finally:
        dispatcher.stop()
        retention.stop()
    assert running_at_sigterm == [False, False]  # stopped before the rest of the node is told to stop
    (record,) = [r for r in caplog.records if r.getMessage() == "node.lock_lost"]
    note = record.event_fields["note"]  # type: ignore[attr-defined]
    assert note.startswith("dicom-node serve NODEA on ") and "lost its lock on the database" in note
    assert (
        "its dispatcher (no further file is sent; one in flight gets its answer) and retention stopped at once; "
        in note
    )
    assert note.endswith("the receiver, the watcher and the workers stop next")


def _send_audits(sessions) -> list[str]:
    with sessions() as session:
        return list(session.scalars(select(AuditEvent.detail).where(AuditEvent.action == "send")))


def _state(sessions, uid: str) -> JobState:
    with sessions() as session:
        return job_for_series_uid(session, uid).state


def test_a_waiting_node_leaves_a_lock_just_given_back_to_its_holder_whose_connection_ended(
    tmp_path, postgresql_url, monkeypatch, caplog
):
    """The holder confirms its lock more often than a waiting node tries to take it, and the waiting node lets one
    try pass when it finds the lock just given back: a holder whose connection ended takes it again, every time."""
    from dicom_node import service
    from dicom_node.service import take_node_lock

    monkeypatch.setattr(NodeLock, "WATCH_SECONDS", 0.15)
    monkeypatch.setattr(service, "NODE_LOCK_RETRY_SECONDS", 0.6)
    migrate(postgresql_url)
    settings = Settings(storage={"directory": tmp_path / "storage"}, database={"url": postgresql_url})
    holder = NodeLock(postgresql_url)
    lost: list[str] = []
    assert holder.try_take()
    holder.watch(lost.append)
    ended: list[BaseException | None] = []

    def wait_for_the_lock() -> None:
        try:
            take_node_lock(settings, give_up_after=60).release()
            ended.append(None)
        except BaseException as exc:  # noqa: BLE001 - the test reads what ended the wait
            ended.append(exc)

    waiter = threading.Thread(target=wait_for_the_lock, daemon=True)
    with caplog.at_level(logging.WARNING, logger="dicom_node.service"):
        waiter.start()
        wait_for(lambda: "node.waiting_for_other_node" in caplog.messages, timeout=10, what="the other node waiting")
    try:
        for _ in range(8):
            end_node_lock_connection(postgresql_url)
            wait_for(lambda: not holder.given_back(), timeout=10, what="the lock held again")
            assert not ended and not lost, "the waiting node took the lock from a holder still running"
            # Not a wait for a condition: connections end seconds apart, each at another point of the waiter's cycle.
            time.sleep(1.3)
    finally:
        holder.release()
    waiter.join(timeout=30)
    assert ended == [None]  # a lock given back for good (the holder stopped) is taken at the next try
