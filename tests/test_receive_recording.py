"""The recorder's batches: several instances, series and duplicates recorded in one transaction."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import delete, func, insert, select, text

from db import jobs
from db.ingest import InstanceRecord, SeriesAttributes, StudyAttributes, record_instance
from db.models import Instance, Job, JobState, RejectedInstance, Series, Study
from db.session import make_engine, make_session_factory, migrate, transaction
from dicom_node.receive.recorder import InstanceRecorder
from dicom_node.receive.storage import InstanceStore, record_stored_instances
from tests.conftest import wait_for

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LITTLE = "1.2.840.10008.1.2.1"


def _setup(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'state.db'}"
    migrate(url)
    return InstanceStore(tmp_path / "storage"), make_session_factory(make_engine(url))


def _stored(store: InstanceStore, series_uid: str, sop_uid: str, expected: int | None = None) -> InstanceRecord:
    """An instance file in place at its path, and what the receiver would record for it."""
    path = store.path_for("1.2.3", series_uid, sop_uid)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(f"{series_uid}/{sop_uid}".encode())
    return InstanceRecord(
        sop_instance_uid=sop_uid,
        sop_class_uid=CT_IMAGE,
        transfer_syntax_uid=EXPLICIT_LITTLE,
        path=str(path),
        size_bytes=path.stat().st_size,
        study=StudyAttributes("1.2.3"),
        series=SeriesAttributes(series_uid, modality="CT", expected_instances=expected),
    )


def test_a_batch_records_each_series_once_and_counts_every_new_instance(tmp_path):
    store, sessions = _setup(tmp_path)
    batch = [_stored(store, "1.2.3.1", f"1.2.3.1.{n}", expected=3) for n in range(1, 4)]
    batch += [_stored(store, "1.2.3.2", f"1.2.3.2.{n}") for n in range(1, 3)]

    with transaction(sessions) as session:
        outcomes = record_stored_instances(session, store, batch)

    assert [o.recorded.stored for o in outcomes] == [True] * 5
    assert [o.recorded.series_created for o in outcomes] == [True, False, False, True, False]
    assert [o.path for o in outcomes] == [Path(r.path) for r in batch]
    with sessions() as session:
        counts = dict(session.execute(select(Series.series_instance_uid, Series.instance_count)).all())
        expected = session.scalar(select(Series.expected_instances).where(Series.series_instance_uid == "1.2.3.1"))
        states = set(session.scalars(select(Job.state)))
        recorded = set(session.scalars(select(Instance.sop_instance_uid)))
    assert counts == {"1.2.3.1": 3, "1.2.3.2": 2}
    assert expected == 3
    assert states == {JobState.RECEIVING}
    assert recorded == {r.sop_instance_uid for r in batch}


def test_a_copy_under_other_series_uids_is_set_aside_with_a_row_naming_its_series(tmp_path):
    store, sessions = _setup(tmp_path)
    first = _stored(store, "1.2.3.1", "1.2.3.9")
    same_path_again = replace(first)
    elsewhere = _stored(store, "1.2.3.2", "1.2.3.9")  # same SOP Instance UID, other series

    with transaction(sessions) as session:
        outcomes = record_stored_instances(session, store, [first, same_path_again, elsewhere])

    assert [o.recorded.stored for o in outcomes] == [True, False, False]
    assert {o.path for o in outcomes} == {Path(first.path)}
    assert [o.set_aside is not None for o in outcomes] == [False, False, True]
    assert Path(first.path).read_bytes() == b"1.2.3.1/1.2.3.9"  # never replaced by the other series' copy
    assert not Path(elsewhere.path).exists()
    set_aside = outcomes[2].set_aside
    assert set_aside is not None and set_aside.parent == store.quarantine_dir
    assert set_aside.read_bytes() == b"1.2.3.2/1.2.3.9"  # nothing acknowledged is lost
    with sessions() as session:
        assert session.scalar(select(Series.instance_count).where(Series.series_instance_uid == "1.2.3.1")) == 1
        assert session.scalar(select(Series.id).where(Series.series_instance_uid == "1.2.3.2")) is None
        row = session.scalars(select(RejectedInstance)).one()
    assert (row.series_instance_uid, row.sop_instance_uid, row.status, row.path) == (
        "1.2.3.2",
        "1.2.3.9",
        0,
        str(set_aside),
    )
    assert "already stored in series 1.2.3.1" in row.reason and "set aside" in row.reason


def test_setting_a_copy_aside_again_after_a_rollback_records_it_once(tmp_path):
    store, sessions = _setup(tmp_path)
    with transaction(sessions) as session:
        record_stored_instances(session, store, [_stored(store, "1.2.3.1", "1.2.3.9")])
    elsewhere = _stored(store, "1.2.3.2", "1.2.3.9")

    session = sessions()
    with session.begin():
        record_stored_instances(session, store, [elsewhere])
        session.rollback()  # the recorder's transaction failed after the file was moved
    with transaction(sessions) as session:
        (outcome,) = record_stored_instances(session, store, [elsewhere])

    assert outcome.set_aside is not None and outcome.set_aside.exists()
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(RejectedInstance)) == 1


def test_a_batch_reopens_a_completed_series_once_and_skips_what_is_recorded(tmp_path):
    store, sessions = _setup(tmp_path)
    earlier = _stored(store, "1.2.3.1", "1.2.3.1.1")
    with transaction(sessions) as session:
        record_instance(session, earlier)
    with transaction(sessions) as session:
        job = session.scalars(select(Job)).one()
        jobs.mark_complete(session, job, "quiet period over")

    late = [earlier] + [_stored(store, "1.2.3.1", f"1.2.3.1.{n}") for n in (2, 3)]
    with transaction(sessions) as session:
        outcomes = record_stored_instances(session, store, late)

    assert [o.recorded.stored for o in outcomes] == [False, True, True]
    assert [o.recorded.series_reopened for o in outcomes] == [False, True, False]
    with sessions() as session:
        assert session.scalar(select(Series.instance_count)) == 3
        assert session.scalars(select(Job.state)).one() == JobState.RECEIVING


def test_a_copy_set_aside_for_a_completed_series_reopens_it_so_its_result_is_marked_partial(tmp_path):
    store, sessions = _setup(tmp_path)
    with transaction(sessions) as session:
        record_stored_instances(session, store, [_stored(store, "1.2.3.1", "1.2.3.9"), _stored(store, "1.2.3.2", "1")])
        claimed = session.scalars(select(Job).join(Job.series).where(Series.series_instance_uid == "1.2.3.2")).one()
        jobs.mark_complete(session, claimed, "quiet period over")

    late = _stored(store, "1.2.3.2", "1.2.3.9")  # arrives after series 1.2.3.2 completed
    again = replace(_stored(store, "1.2.3.2", "1.2.3.9"), received_at=late.received_at + timedelta(seconds=1))
    with transaction(sessions) as session:
        (outcome,) = record_stored_instances(session, store, [late])
    _stored(store, "1.2.3.2", "1.2.3.9")  # and is sent once more: its own file in quarantine, its own row
    with transaction(sessions) as session:
        (second,) = record_stored_instances(session, store, [again])

    with sessions() as session:
        job = session.scalars(select(Job).join(Job.series).where(Series.series_instance_uid == "1.2.3.2")).one()
        rows = list(session.scalars(select(RejectedInstance.path)))
    assert job.state is JobState.RECEIVING
    assert job.reason == (
        "an image set aside for it (its SOP Instance UID is stored in another series) re-opened the series "
        "(was COMPLETE)"
    )
    assert outcome.set_aside != second.set_aside and sorted(rows) == sorted(
        [str(outcome.set_aside), str(second.set_aside)]
    )
    assert outcome.set_aside.exists() and second.set_aside.exists()


def test_the_same_stray_copy_sent_again_after_its_series_was_processed_does_not_reopen_it(tmp_path):
    """The series already knows it lacks the image (its first copy re-opened it, and its result says partial):
    every further copy changes nothing, so it must not produce another, identical result set."""
    store, sessions = _setup(tmp_path)
    with transaction(sessions) as session:
        record_stored_instances(session, store, [_stored(store, "1.2.3.1", "1.2.3.9"), _stored(store, "1.2.3.2", "1")])
        claimed = session.scalars(select(Job).join(Job.series).where(Series.series_instance_uid == "1.2.3.2")).one()
        jobs.mark_complete(session, claimed, "quiet period over")
    late = _stored(store, "1.2.3.2", "1.2.3.9")
    with transaction(sessions) as session:
        record_stored_instances(session, store, [late])  # the first copy re-opens it (tested above)
    with transaction(sessions) as session:
        job = session.scalars(select(Job).join(Job.series).where(Series.series_instance_uid == "1.2.3.2")).one()
        job.state = JobState.DONE  # processed again, without the image, and sent

    again = replace(_stored(store, "1.2.3.2", "1.2.3.9"), received_at=late.received_at + timedelta(seconds=1))
    with transaction(sessions) as session:
        (outcome,) = record_stored_instances(session, store, [again])

    with sessions() as session:
        job = session.scalars(select(Job).join(Job.series).where(Series.series_instance_uid == "1.2.3.2")).one()
        rows = session.scalar(select(func.count()).select_from(RejectedInstance))
    assert job.state is JobState.DONE
    assert outcome.set_aside is not None and outcome.set_aside.exists() and rows == 2  # kept and recorded all the same


def test_a_copy_of_a_done_series_under_another_study_uid_is_set_aside_without_processing_it_again(tmp_path):
    """The same images (SOP and series UIDs) sent again under another StudyInstanceUID: the series already has
    each of them, so nothing changed; re-opening it would send a second, different result."""
    store, sessions = _setup(tmp_path)
    with transaction(sessions) as session:
        record_stored_instances(session, store, [_stored(store, "1.2.3.2", "1.2.3.9")])
        job = session.scalars(select(Job)).one()
        jobs.mark_complete(session, job, "quiet period over")
        job.state = JobState.DONE

    path = store.path_for("9.9", "1.2.3.2", "1.2.3.9")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"the same image")
    copy = replace(_stored(store, "1.2.3.2", "1.2.3.9"), path=str(path), study=StudyAttributes("9.9"))
    with transaction(sessions) as session:
        (outcome,) = record_stored_instances(session, store, [copy])

    with sessions() as session:
        job = session.scalars(select(Job)).one()
        reason = session.scalars(select(RejectedInstance.reason)).one()
    assert job.state is JobState.DONE and outcome.set_aside is not None and outcome.set_aside.exists()
    assert reason == (
        "SOP Instance UID 1.2.3.9 arrived in series 1.2.3.2 under StudyInstanceUID 9.9, but is already stored in "
        "that series under study 1.2.3; this copy was acknowledged, then set aside in quarantine, and the series "
        "keeps the copy it had"
    )


def a_lock_is_waited_for(engine) -> bool:
    """PostgreSQL: whether some transaction waits for a lock another holds."""
    with engine.connect() as connection:
        return bool(connection.scalar(text("SELECT count(*) FROM pg_locks WHERE NOT granted")))


def test_a_study_another_receiving_process_records_at_the_same_moment_loses_no_instance(tmp_path, postgresql_url):
    """PostgreSQL, two receiving processes, the first images of one new study in each: the second insert of the
    study waits for the first, then finds its UID taken. The instance is recorded under the study the other process
    created; an acknowledged image is never quarantined for it."""
    migrate(postgresql_url)
    engine = make_engine(postgresql_url)
    sessions = make_session_factory(engine)
    store = InstanceStore(tmp_path / "storage")
    record = _stored(store, "1.2.3.1", "1.2.3.1.1")
    recorder = InstanceRecorder(store, sessions)
    recorder.start()
    with engine.connect() as other_process:
        other = other_process.begin()
        other_process.execute(insert(Study).values(study_instance_uid="1.2.3"))  # not committed yet
        recorder.submit(record, recorder.journal.append(record.path))
        wait_for(
            lambda: a_lock_is_waited_for(engine),
            what="the recorder's insert of the study to wait for the other transaction",
        )
        other.commit()
    assert recorder.wait_until_recorded(30)
    recorder.stop()

    with sessions() as session:
        recorded = session.scalars(select(Instance.sop_instance_uid)).all()
        studies = session.scalars(select(Study.study_instance_uid)).all()
        rejected = session.scalars(select(RejectedInstance.sop_instance_uid)).all()
    assert recorded == ["1.2.3.1.1"] and studies == ["1.2.3"] and rejected == []
    assert Path(record.path).read_bytes() == b"1.2.3.1/1.2.3.1.1"


def test_an_instance_written_again_while_retention_deletes_its_row_is_recorded_after_the_purge(
    tmp_path, postgresql_url
):
    """PostgreSQL: retention has deleted the instance's row (not committed yet) when the same image arrives again
    and is written anew. The recorder waits for the purge instead of taking the copy for a duplicate of a row that
    is about to vanish, which would leave an acknowledged file that no row names."""
    migrate(postgresql_url)
    engine = make_engine(postgresql_url)
    sessions = make_session_factory(engine)
    store = InstanceStore(tmp_path / "storage")
    record = _stored(store, "1.2.3.1", "1.2.3.1.1")
    with transaction(sessions) as session:
        record_stored_instances(session, store, [record])
    recorder = InstanceRecorder(store, sessions)
    recorder.start()
    with engine.connect() as retention:
        purge = retention.begin()
        retention.execute(delete(Instance).where(Instance.sop_instance_uid == "1.2.3.1.1"))  # not committed yet
        recorder.submit(record, recorder.journal.append(record.path))  # the file, written again, is in place
        wait_for(lambda: a_lock_is_waited_for(engine), what="the recorder to wait for the purge's transaction")
        purge.commit()
    assert recorder.wait_until_recorded(30)
    recorder.stop()

    with sessions() as session:
        paths = session.scalars(select(Instance.path).where(Instance.sop_instance_uid == "1.2.3.1.1")).all()
    assert paths == [record.path] and Path(record.path).exists()


def test_a_copy_set_aside_by_a_recorder_that_died_before_committing_is_recorded_from_its_journal(tmp_path):
    """The recorder moves a copy of an instance stored in another series into quarantine inside its transaction:
    killed before the commit, the copy was acknowledged and sits in quarantine without a row, so its series would
    complete as if it had never been sent. Recovering the dead receiver's journal records it as set aside."""
    from dicom_node.phantom import PhantomSpec, write_phantom_series
    from dicom_node.receive.recorder import JOURNAL_SUFFIX, journal_folder, recover_journals
    from dicom_node.receive.storage import index_file

    store, sessions = _setup(tmp_path)
    series = write_phantom_series(tmp_path / "ct", PhantomSpec(rows=16, columns=16, slices=2))
    first = store.path_for(series.study_instance_uid, series.series_instance_uid, series.sop_instance_uids[0])
    first.parent.mkdir(parents=True)
    first.write_bytes(series.files[0].read_bytes())
    assert index_file(first, store, sessions) == "indexed"
    copy = pydicom.dcmread(series.files[0])
    copy.SeriesInstanceUID = "1.2.826.0.1.3680043.2.9"
    elsewhere = store.path_for(series.study_instance_uid, copy.SeriesInstanceUID, copy.SOPInstanceUID)
    elsewhere.parent.mkdir(parents=True)
    copy.save_as(elsewhere, enforce_file_format=True)
    journal_folder(store).mkdir()
    (journal_folder(store) / f"999999999-0{JOURNAL_SUFFIX}").write_text(f"{elsewhere}\n")  # acknowledged
    record = InstanceRecord(
        sop_instance_uid=copy.SOPInstanceUID,
        sop_class_uid=CT_IMAGE,
        transfer_syntax_uid=str(copy.file_meta.TransferSyntaxUID),
        path=str(elsewhere),
        size_bytes=elsewhere.stat().st_size,
        study=StudyAttributes(series.study_instance_uid),
        series=SeriesAttributes(copy.SeriesInstanceUID, modality="CT"),
    )
    session = sessions()
    with session.begin():
        (outcome,) = record_stored_instances(session, store, [record])
        session.rollback()  # the process died here: the copy is in quarantine, its row never committed
    assert outcome.set_aside is not None and outcome.set_aside.exists() and not elsewhere.exists()

    assert recover_journals(store, sessions) == 1

    with sessions() as session:
        row = session.scalars(select(RejectedInstance)).one()
    assert (row.series_instance_uid, row.sop_instance_uid, row.path) == (
        copy.SeriesInstanceUID,
        copy.SOPInstanceUID,
        str(outcome.set_aside),
    )
    assert recover_journals(store, sessions) == 0  # the journal is gone, and the copy is recorded once


def test_the_lookup_on_the_acknowledgement_path_finds_where_an_instance_is_recorded(tmp_path, database_url):
    """The receiver asks, for every new instance, whether its SOP Instance UID is recorded at another path: on both
    databases, outside any transaction, and a database that cannot be read is said so (the receiver goes on)."""
    from db.ingest import recorded_path_lookup, series_study_lookup

    migrate(database_url)
    engine = make_engine(database_url)
    sessions = make_session_factory(engine)
    store = InstanceStore(tmp_path / "storage")
    record = _stored(store, "1.2.3.1", "1.2.3.1.1")
    lookup = recorded_path_lookup(engine)
    with transaction(sessions) as session:
        record_stored_instances(session, store, [record])
        assert lookup("1.2.3.1.1") is None  # not committed yet: never waits for the writer

    assert (lookup("1.2.3.1.1"), lookup("1.2.3.1.2")) == (record.path, None)
    study_of = series_study_lookup(engine)
    assert (study_of("1.2.3.1"), study_of("1.2.3.2")) == ("1.2.3", None)
    engine.dispose()
    broken = recorded_path_lookup(make_engine(f"sqlite:///{tmp_path / 'never-migrated.db'}"))  # no tables
    with pytest.raises(broken.errors):
        broken("1.2.3.1.1")


def _journaled(recorder: InstanceRecorder, record: InstanceRecord) -> None:
    """As the receiver acknowledges an instance: its path in the journal, then handed to the recorder."""
    recorder.submit(record, recorder.journal.append(record.path))


def test_a_journal_that_cannot_be_deleted_for_a_moment_leaves_the_recorder_recording(tmp_path, monkeypatch, caplog):
    """A journal file whose deletion failed (its folder briefly immutable: EPERM) ended the recorder thread: the
    node went on acknowledging images it never recorded, and their series stayed RECEIVING until a restart."""
    store, sessions = _setup(tmp_path)
    recorder = InstanceRecorder(store, sessions)
    recorder.start()
    real_unlink = Path.unlink
    refusing = [True]

    def unlink(path: Path, missing_ok: bool = False) -> None:
        if refusing[0] and path.suffix == ".journal":
            raise PermissionError(1, "Operation not permitted", str(path))
        real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    try:
        _journaled(recorder, _stored(store, "1.2.3.1", "1.2.3.1.1"))
        assert recorder.wait_until_recorded(timeout=10)
        assert list(recorder.journal.folder.glob("*.journal"))  # recorded, its journal still there
        _journaled(recorder, _stored(store, "1.2.3.1", "1.2.3.1.2"))  # the next image is recorded too
        assert recorder.wait_until_recorded(timeout=10)
        refusing[0] = False
        wait_for(lambda: not list(recorder.journal.folder.glob("*.journal")), timeout=10, what="the journal deleted")
    finally:
        recorder.stop()
    with sessions() as session:
        assert set(session.scalars(select(Instance.sop_instance_uid))) == {"1.2.3.1.1", "1.2.3.1.2"}
    warnings = [r.event_fields["reason"] for r in caplog.records if r.msg == "recorder.journal_not_deleted"]
    assert len(warnings) == 1, warnings
    assert "cannot be deleted (operation not permitted); the instances it names are recorded" in warnings[0]


def test_an_unexpected_error_while_recording_is_logged_and_the_batch_recorded_at_the_next_try(
    tmp_path, monkeypatch, caplog
):
    """The recorder thread outlives an error nothing expected (a bug): it logs it and records the batch again."""
    store, sessions = _setup(tmp_path)
    recorder = InstanceRecorder(store, sessions)
    real_record = recorder._record
    failures = [1]

    def record_once_failing(batch):
        if failures[0]:
            failures[0] -= 1
            raise RuntimeError("a bug")
        return real_record(batch)

    monkeypatch.setattr(recorder, "_record", record_once_failing)
    recorder.start()
    try:
        _journaled(recorder, _stored(store, "1.2.3.1", "1.2.3.1.1"))
        assert recorder.wait_until_recorded(timeout=15)
    finally:
        recorder.stop()
    with sessions() as session:
        assert session.scalar(select(func.count(Instance.id))) == 1
    (failed,) = [r for r in caplog.records if r.msg == "recorder.failed"]
    assert failed.event_fields["reason"] == (
        "1 acknowledged instance(s) could not be recorded because of an unexpected error (details follow); trying "
        "again in a second"
    )
