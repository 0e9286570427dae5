"""Refusals the database cannot take (its disk full) are kept in a preallocated file and in memory, hold their series
back from completion, and are recorded once the database takes writes, or by whoever finds the file of a receiving
process that died."""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from db.models import RejectedInstance
from db.session import make_engine, make_session_factory, migrate
from dicom_node.receive.pending_refusals import (
    SLOT_BYTES,
    SLOTS,
    RefusalKeeper,
    kept_in,
    record_kept_refusals,
    series_with_kept_refusals,
)
from dicom_node.receive.recorder import series_waiting_to_be_recorded


@pytest.fixture
def sessions(tmp_path):
    url = f"sqlite:///{tmp_path / 'node.db'}"
    migrate(url)
    return make_session_factory(make_engine(url))


class FullDatabase:
    """A session factory whose every transaction fails as a database on a full disk does."""

    @contextmanager
    def begin(self):
        raise OperationalError("INSERT", {}, Exception("database or disk is full"))
        yield  # pragma: no cover

    def __call__(self):
        raise OperationalError("INSERT", {}, Exception("database or disk is full"))


def _refusal(number: int, series: str = "1.2.3") -> dict:
    return {
        "status": 0xA700,
        "reason": "out of disk space on the node; answered 0xA700, the sender keeps the instance",
        "path": None,
        "sop_instance_uid": f"1.2.3.4.{number}",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "calling_ae_title": "CT1",
        "series_instance_uid": series,
    }


def _refused(sessions) -> list[str]:
    with sessions() as session:
        return sorted(session.scalars(select(RejectedInstance.sop_instance_uid)))


def test_a_kept_refusal_holds_its_series_until_the_database_takes_it(tmp_path, sessions):
    storage = tmp_path / "storage"
    keeper = RefusalKeeper(storage / "journal")
    assert keeper.path.stat().st_size == SLOTS * SLOT_BYTES  # its space taken at start, while there is some
    keeper.keep(**_refusal(1))
    keeper.keep(**_refusal(2, series="1.2.9"))

    assert not keeper.record(FullDatabase())  # still full
    assert series_with_kept_refusals(storage) == {"1.2.3", "1.2.9"}
    assert {"1.2.3", "1.2.9"} <= series_waiting_to_be_recorded(storage)  # completion leaves them alone

    assert keeper.record(sessions)
    assert _refused(sessions) == ["1.2.3.4.1", "1.2.3.4.2"]
    assert series_with_kept_refusals(storage) == set()
    keeper.close()
    assert not keeper.path.exists()


def test_the_refusals_of_a_process_that_died_are_recorded_from_its_file(tmp_path, sessions):
    folder = tmp_path / "journal"
    keeper = RefusalKeeper(folder)
    for number in range(3):
        keeper.keep(**_refusal(number))
    assert len(list(kept_in(keeper.path))) == 3  # what a process killed now leaves

    assert record_kept_refusals(folder, sessions, os.getpid()) == 3
    assert _refused(sessions) == ["1.2.3.4.0", "1.2.3.4.1", "1.2.3.4.2"]
    assert not keeper.path.exists()


def test_more_refusals_than_slots_are_kept_in_memory_and_every_series_keeps_one_in_the_file(
    tmp_path, sessions, monkeypatch, caplog
):
    """One series refused beyond the file's slots used them all: a second series' refusals were kept in memory only,
    so completion did not wait for them and a process killed then lost them without a word."""
    from dicom_node.receive import pending_refusals

    monkeypatch.setattr(pending_refusals, "SLOTS", 20)
    monkeypatch.setattr(pending_refusals, "SERIES_SLOTS", 4)
    keeper = RefusalKeeper(tmp_path / "journal")
    for number in range(30):
        keeper.keep(**_refusal(number, series="1.2.3"))
    for number in range(30, 33):
        keeper.keep(**_refusal(number, series="1.2.9"))

    assert len(list(kept_in(keeper.path))) == 16 + 1  # 16 of the first series, one for the second
    assert series_with_kept_refusals(tmp_path) == {"1.2.3", "1.2.9"}
    assert keeper.waiting == 33
    assert "instance.rejection_in_memory_only" in caplog.text
    assert keeper.record(sessions)
    assert len(_refused(sessions)) == 33 and list(kept_in(keeper.path)) == []
