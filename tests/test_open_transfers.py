"""Each receiving process keeps a file of its open associations and the series each stored images of; the file of a
process that died marks those series cut short, as an abort would have. A release clears only marks made before its
association began: one that ran beside an association cut short did not send that one's images again."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import select, update

from db import transfers
from db.models import InterruptedTransfer, Series, utcnow
from db.session import make_engine, make_session_factory, migrate
from dicom_node.receive import open_transfers as open_transfers_module
from dicom_node.receive.open_transfers import SUFFIX, OpenTransfers, left_open, mark_left_open, series_being_sent

DEAD_PID = 999999999


def _association(ae_title: str, address: str = "10.0.0.5") -> SimpleNamespace:
    return SimpleNamespace(requestor=SimpleNamespace(ae_title=ae_title, address=address))


@pytest.fixture
def sessions(tmp_path):
    url = f"sqlite:///{tmp_path / 'node.db'}"
    migrate(url)
    return make_session_factory(make_engine(url))


def _marks(sessions) -> dict[str, str]:
    with sessions() as session:
        return {row.series_instance_uid: row.reason for row in session.scalars(select(InterruptedTransfer))}


def test_the_file_names_the_open_associations_series_and_goes_once_none_is_open(tmp_path):
    open_transfers = OpenTransfers(tmp_path / "journal")
    first, second = _association("CT1"), _association("CT2", "10.0.0.6")
    open_transfers.storing(first, "1.2.1")
    open_transfers.storing(first, "1.2.2")
    open_transfers.storing(second, "1.2.3")

    shown = {(each.calling_ae_title, each.address, frozenset(each.series)) for each in left_open(open_transfers.path)}
    assert shown == {("CT1", "10.0.0.5", frozenset({"1.2.1", "1.2.2"})), ("CT2", "10.0.0.6", frozenset({"1.2.3"}))}

    open_transfers.ended(first)
    assert [each.series for each in left_open(open_transfers.path)] == [{"1.2.3"}]
    open_transfers.ended(_association("ECHO"))  # stored nothing: no change
    assert [each.series for each in left_open(open_transfers.path)] == [{"1.2.3"}]
    open_transfers.ended(second)
    assert not open_transfers.path.exists()

    open_transfers.storing(_association("CT3"), "1.2.4")  # the next association writes a new file
    assert [each.series for each in left_open(open_transfers.path)] == [{"1.2.4"}]


def test_a_file_kept_while_some_association_is_always_open_stays_short(tmp_path, monkeypatch):
    monkeypatch.setattr(open_transfers_module, "COMPACT_AFTER_LINES", 10)
    open_transfers = OpenTransfers(tmp_path / "journal")
    long_open = _association("CT1")
    open_transfers.storing(long_open, "1.2.1")
    for number in range(100):  # one association after another beside it, each with a series
        each = _association("CT2")
        open_transfers.storing(each, f"1.3.{number}")
        open_transfers.ended(each)
        assert len(open_transfers.path.read_text().splitlines()) <= 11
    last = _association("CT3")
    open_transfers.storing(last, "1.4.1")
    assert {frozenset(each.series) for each in left_open(open_transfers.path)} == {
        frozenset({"1.2.1"}),
        frozenset({"1.4.1"}),
    }
    assert not list((tmp_path / "journal").glob("*.new"))


def test_the_series_an_open_association_is_sending_now_is_the_last_it_switched_to(tmp_path):
    folder = tmp_path / "journal"
    open_transfers = OpenTransfers(folder)
    persistent, other = _association("ROUTER"), _association("CT2")
    for series in ("1.2.1", "1.2.1", "1.2.2", "1.2.2"):  # one series after another on one association
        open_transfers.storing(persistent, series)
    open_transfers.storing(other, "1.2.7")
    assert len(open_transfers.path.read_text().splitlines()) == 3  # a line only where the series changes
    assert series_being_sent(folder) == {"1.2.2", "1.2.7"}

    open_transfers.storing(persistent, "1.2.1")  # back to the first (interleaved series)
    assert series_being_sent(folder) == {"1.2.1", "1.2.7"}
    open_transfers.ended(other)
    assert series_being_sent(folder) == {"1.2.1"}
    open_transfers.ended(persistent)
    assert series_being_sent(folder) == set()


def test_a_line_cut_off_as_the_process_died_is_skipped(tmp_path):
    path = tmp_path / f"{DEAD_PID}{SUFFIX}"
    path.write_text(
        '{"association": 1, "series": "1.2.1", "calling_ae": "CT1", "address": "10.0.0.5"}\n'
        '{"association": 2, "series": "1.2.2", "calling_ae": "CT2", "address": "10.0.0.6"}\n'
        '{"association": 2, "end'
    )
    assert sorted(each.calling_ae_title for each in left_open(path)) == ["CT1", "CT2"]


def test_the_series_a_dead_process_was_receiving_are_marked_cut_short_saying_how_it_ended(tmp_path, sessions):
    folder = tmp_path / "journal"
    folder.mkdir()
    (folder / f"{DEAD_PID}{SUFFIX}").write_text(
        '{"association": 1, "series": "1.2.1", "calling_ae": "CT1", "address": "10.0.0.5"}\n'
        '{"association": 1, "series": "1.2.2", "calling_ae": "CT1", "address": "10.0.0.5"}\n'
        '{"association": 2, "series": "1.2.3", "calling_ae": "CT2", "address": "10.0.0.6"}\n'
        '{"association": 2, "ended": true}\n'
    )
    (folder / f"{DEAD_PID - 1}{SUFFIX}").write_text(
        '{"association": 1, "series": "1.2.9", "calling_ae": "CT9", "address": "10.0.0.9"}\n'
    )

    assert mark_left_open(folder, sessions, "it was killed (signal 9, SIGKILL)", DEAD_PID) == 2

    reason = (
        f"the node's receiving process (pid {DEAD_PID}) stopped while the association from CT1 at 10.0.0.5 was "
        "open: it was killed (signal 9, SIGKILL)"
    )
    assert _marks(sessions) == {"1.2.1": reason, "1.2.2": reason}
    assert not (folder / f"{DEAD_PID}{SUFFIX}").exists()
    assert (folder / f"{DEAD_PID - 1}{SUFFIX}").exists()  # another process' file: not named

    assert mark_left_open(folder, sessions, "the node stopped") == 1  # every file left (start-up)
    assert set(_marks(sessions)) == {"1.2.1", "1.2.2", "1.2.9"}
    assert not list(Path(folder).glob(f"*{SUFFIX}"))


def test_a_release_clears_only_marks_made_before_its_association_began(sessions):
    cut_at = utcnow()
    transfers.note_interrupted(sessions, ["1.2.1"], "CT1", "CT1 aborted the association", at=cut_at)

    transfers.clear_interrupted(sessions, ["1.2.1"], began=cut_at - timedelta(seconds=1))  # ran beside it
    assert set(_marks(sessions)) == {"1.2.1"}

    transfers.clear_interrupted(sessions, ["1.2.1"], began=cut_at + timedelta(seconds=1))  # sent it again after
    assert _marks(sessions) == {}


def test_series_waiting_for_the_rest_of_a_transfer_cut_short_are_not_read_at_each_completion_pass(sessions):
    """A sender aborting in a loop left thousands of series waiting for the rest; the watcher read each of them, and
    its interruption, at every pass while holding the database's write lock (senders' audit records waited behind
    it). Only those whose wait is over are read now."""
    from db.ingest import record_instance
    from db.jobs import quiet_receiving_jobs
    from db.session import transaction
    from tests.conftest import ct_instance

    long_ago, now = utcnow() - timedelta(minutes=30), utcnow()
    with transaction(sessions) as session:
        for series in ("1.2.1", "1.2.2", "1.2.3"):
            record_instance(session, ct_instance(f"{series}.1", series))
        session.execute(update(Series).values(last_received_at=now - timedelta(minutes=5)))
        session.execute(update(Series).where(Series.series_instance_uid == "1.2.3").values(last_received_at=long_ago))
    transfers.note_interrupted(sessions, ["1.2.2", "1.2.3"], "CT1", "CT1 aborted the association")

    with sessions() as session:
        quiet = {job.series.series_instance_uid for job in quiet_receiving_jobs(session, timedelta(seconds=30), now)}
        ready = quiet_receiving_jobs(session, timedelta(seconds=30), now, cut_short_quiet=timedelta(minutes=10))
        assert quiet == {"1.2.1", "1.2.2", "1.2.3"}
        assert {job.series.series_instance_uid for job in ready} == {"1.2.1", "1.2.3"}
