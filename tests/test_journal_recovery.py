"""Recovering a dead receiving process' journal while the other receiving processes record.

``serve``'s supervisor indexes what a receiver that died had acknowledged (``recover_journals``) while the live
receivers go on recording. A live receiver inserting the same new study, series or instance at the same moment is
no fault of the file: the acknowledged instance is recorded, and a file an instance row names is never moved.
"""

from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy import insert, select, text

from db.ingest import InstanceRecord, SeriesAttributes, StudyAttributes
from db.models import Instance, RejectedInstance, Study
from db.session import make_engine, make_session_factory, migrate
from dicom_node.phantom import PhantomSeries, PhantomSpec, write_phantom_series
from dicom_node.receive.recorder import JOURNAL_SUFFIX, journal_folder, recover_journals
from dicom_node.receive.storage import InstanceStore, record_stored_instances
from tests.conftest import wait_for

TINY_CT = PhantomSpec(rows=16, columns=16, slices=2)


def _in_storage(store: InstanceStore, series: PhantomSeries, number: int) -> Path:
    """Instance ``number`` of ``series`` in place in storage, as a receiver leaves it before recording it."""
    path = store.path_for(series.study_instance_uid, series.series_instance_uid, series.sop_instance_uids[number])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(series.files[number].read_bytes())
    return path


def _journaled_by_a_dead_receiver(store: InstanceStore, *paths: Path) -> None:
    journal_folder(store).mkdir(parents=True, exist_ok=True)
    lines = "".join(f"{path}\n" for path in paths)
    (journal_folder(store) / f"999999999-0{JOURNAL_SUFFIX}").write_text(lines)


def _record_of(series: PhantomSeries, path: Path) -> InstanceRecord:
    """What the live receiver records for the file at ``path``."""
    return InstanceRecord(
        sop_instance_uid=path.stem,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=str(path),
        size_bytes=path.stat().st_size,
        study=StudyAttributes(series.study_instance_uid),
        series=SeriesAttributes(series.series_instance_uid, modality="CT"),
    )


def _recover_while_another_process_commits(engine, store: InstanceStore, sessions, live_transaction) -> None:
    """Recover the dead receiver's journal; once its insert waits for the live receiver's transaction, commit that."""
    recovery = threading.Thread(target=recover_journals, args=(store, sessions, 999999999))
    recovery.start()
    wait_for(lambda: _a_lock_is_waited_for(engine), what="the recovery's insert to wait for the live receiver")
    live_transaction.commit()
    recovery.join(timeout=60)
    assert not recovery.is_alive()


def _a_lock_is_waited_for(engine) -> bool:
    with engine.connect() as connection:
        return bool(connection.scalar(text("SELECT count(*) FROM pg_locks WHERE NOT granted")))


def test_an_instance_recovered_while_another_receiver_inserts_its_new_study_is_recorded(tmp_path, postgresql_url):
    """The live receiver inserts the new study (its first image); the dead one had acknowledged the second image."""
    migrate(postgresql_url)
    engine = make_engine(postgresql_url)
    sessions = make_session_factory(engine)
    store = InstanceStore(tmp_path / "storage", fsync=False)
    series = write_phantom_series(tmp_path / "ct", TINY_CT)
    acknowledged = _in_storage(store, series, 1)
    _journaled_by_a_dead_receiver(store, acknowledged)

    with engine.connect() as live_receiver:
        live = live_receiver.begin()
        live_receiver.execute(insert(Study).values(study_instance_uid=series.study_instance_uid))
        _recover_while_another_process_commits(engine, store, sessions, live)

    with sessions() as session:
        recorded = session.execute(select(Instance.sop_instance_uid, Instance.path)).all()
        rejected = session.scalars(select(RejectedInstance.reason)).all()
    assert recorded == [(acknowledged.stem, str(acknowledged))] and rejected == []
    assert acknowledged.read_bytes() == series.files[1].read_bytes()
    assert not (store.quarantine_dir.is_dir() and any(store.quarantine_dir.iterdir()))


def test_an_instance_recovered_while_another_receiver_records_it_stays_recorded_at_its_path(tmp_path, postgresql_url):
    """The sender sent the image again after the dead receiver's abort; a live receiver records it meanwhile."""
    migrate(postgresql_url)
    engine = make_engine(postgresql_url)
    sessions = make_session_factory(engine)
    store = InstanceStore(tmp_path / "storage", fsync=False)
    series = write_phantom_series(tmp_path / "ct", TINY_CT)
    acknowledged = _in_storage(store, series, 0)
    _journaled_by_a_dead_receiver(store, acknowledged)

    live_session = sessions()
    live = live_session.begin()
    record_stored_instances(live_session, store, [_record_of(series, acknowledged)])
    live_session.flush()
    _recover_while_another_process_commits(engine, store, sessions, live)
    live_session.close()

    with sessions() as session:
        recorded = session.execute(select(Instance.sop_instance_uid, Instance.path)).all()
        rejected = session.scalars(select(RejectedInstance.reason)).all()
    assert recorded == [(acknowledged.stem, str(acknowledged))] and rejected == []
    assert acknowledged.read_bytes() == series.files[0].read_bytes()


def test_a_file_recovery_cannot_index_is_quarantined_with_the_reason_naming_the_dead_receiver(tmp_path):
    url = f"sqlite:///{tmp_path / 'state.db'}"
    migrate(url)
    sessions = make_session_factory(make_engine(url))
    store = InstanceStore(tmp_path / "storage", fsync=False)
    damaged = store.path_for("1.2.3", "1.2.3.4", "1.2.3.4.5")
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"not DICOM")
    _journaled_by_a_dead_receiver(store, damaged)

    assert recover_journals(store, sessions, 999999999) == 0

    with sessions() as session:
        (reason,) = session.scalars(select(RejectedInstance.reason)).all()
    assert reason == (
        "stored and acknowledged by a receiving process that stopped before recording it, then not indexed from its "
        "journal: not a readable DICOM file"
    )
    assert not damaged.exists()
