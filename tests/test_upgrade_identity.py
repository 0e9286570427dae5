"""After an upgrade from a node older than revision 0011, Query/Retrieve never hands out another patient's image.

Such a node recorded no instance's own patient: revisions 0011 and 0013 add the columns empty (NULL). It recorded
another patient's image sent under a series' UIDs (and failed the series for it); today's node, on a fresh
database, withholds that image, but after the upgrade a C-GET of the series sent it, because an unknown patient was
taken to be the study's. Start-up now fills in each such row from its stored file's header
(:mod:`dicom_node.receive.backfill`), and a row whose file cannot be read stays unknown and is withheld.

The database is made at revision 0010 with alembic and filled as the older node filled it; the node is a real
``dicom-node serve``, the peer DCMTK getscu.
"""

from __future__ import annotations

import re
import shutil
import unicodedata
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pydicom
import pytest
from alembic import command
from pydicom.uid import generate_uid
from sqlalchemy import MetaData, create_engine, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from db.ingest import StudyAttributes, record_instance
from db.models import Instance, Study
from db.session import alembic_config, make_engine, make_session_factory, migrate, transaction
from dicom_node.config import Settings
from dicom_node.phantom import PhantomSpec, write_phantom_series
from dicom_node.receive import backfill, name_keys
from dicom_node.service import start_node
from tests.conftest import Node, free_port, wait_for
from tests.test_matching import answers, instance, query
from tests.test_qr_identity import PLANNER, _get

RITA = {"PatientID": "R1-PID", "PatientName": "Right^Rita", "PatientBirthDate": "19900909", "PatientSex": "F"}
JANE = {"PatientID": "OTHER", "PatientName": "Roe^Jane", "PatientBirthDate": "19700101", "PatientSex": "F"}
OLD_REVISION = "0010"
"""The last revision before instances recorded their own patient (0011)."""


def _phantom_files(folder: Path) -> list[Path]:
    """Four of Rita's slices, then one of Jane's sent under the same study and series UIDs (a new SOP Instance)."""
    files = list(write_phantom_series(folder, PhantomSpec(rows=32, columns=32, slices=4)).files)
    for path in files:
        _relabel(path, path, RITA)
    other = folder / "jane.dcm"
    _relabel(files[-1], other, JANE, new_instance=True)
    return [*files, other]


def _relabel(source: Path, target: Path, patient: dict[str, str], new_instance: bool = False) -> None:
    dataset = pydicom.dcmread(source)
    for keyword, value in patient.items():
        setattr(dataset, keyword, value)
    if new_instance:
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        dataset.InstanceNumber = 5
    dataset.save_as(target)


def _record_the_old_way(storage: Path, files: list[Path], revision: str = OLD_REVISION) -> dict[str, str]:
    """A database at ``revision`` holding ``files`` as a node of that revision recorded them: the study under the
    first file's patient, every instance without a patient of its own (from revision 0011: with its own PatientID
    only), the series FAILED for the other patient's image; each file stored where that node stored it. The SOP
    Instance UID of each file, by its name."""
    url = f"sqlite:///{storage / 'dicom-node.db'}"
    storage.mkdir(parents=True)
    command.upgrade(alembic_config(url), revision)
    engine = create_engine(url)
    tables = MetaData()
    tables.reflect(engine)
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    uids = {}
    with engine.begin() as connection:
        study_id = connection.execute(
            insert(tables.tables["studies"]).values(
                study_instance_uid=first.StudyInstanceUID,
                patient_id=RITA["PatientID"],
                patient_name=RITA["PatientName"],
                patient_birth_date=RITA["PatientBirthDate"],
                patient_sex=RITA["PatientSex"],
                created_at=now,
            )
        ).inserted_primary_key[0]
        series_id = connection.execute(
            insert(tables.tables["series"]).values(
                series_instance_uid=first.SeriesInstanceUID,
                study_id=study_id,
                modality="CT",
                instance_count=len(files),
                first_received_at=now,
                last_received_at=now,
            )
        ).inserted_primary_key[0]
        connection.execute(
            insert(tables.tables["jobs"]).values(
                series_id=series_id,
                state="FAILED",
                reason="admission refused: PatientID differs within the series",
                attempts=0,
                created_at=now,
                state_changed_at=now,
            )
        )
        for path in files:
            dataset = pydicom.dcmread(path, stop_before_pixels=True)
            stored = (
                storage
                / "instances"
                / first.StudyInstanceUID
                / first.SeriesInstanceUID
                / f"{dataset.SOPInstanceUID}.dcm"
            )
            stored.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, stored)
            own_patient = {"patient_id": dataset.PatientID} if revision >= "0011" else {}
            connection.execute(
                insert(tables.tables["instances"]).values(
                    **own_patient,
                    sop_instance_uid=dataset.SOPInstanceUID,
                    sop_class_uid=dataset.SOPClassUID,
                    series_id=series_id,
                    transfer_syntax_uid=dataset.file_meta.TransferSyntaxUID,
                    instance_number=dataset.InstanceNumber,
                    path=str(stored),
                    size_bytes=stored.stat().st_size,
                    received_at=now,
                )
            )
            uids[path.name] = str(dataset.SOPInstanceUID)
    engine.dispose()
    return uids


def _patients(url: str) -> dict[str, str | None]:
    """Each recorded instance's own PatientID, by SOP Instance UID."""
    engine = make_engine(url)
    try:
        with make_session_factory(engine)() as session:
            return dict(session.execute(select(Instance.sop_instance_uid, Instance.patient_id)).all())
    finally:
        engine.dispose()


@pytest.mark.integration
def test_after_an_upgrade_a_series_c_get_sends_only_the_study_patients_images(tmp_path: Path) -> None:
    """The old node recorded Jane's image in Rita's series; after the upgrade a SERIES-level C-GET sent it with
    Rita's four. Start-up now reads each stored file's patient: only Rita's four come, and a second start reads
    nothing again."""
    files = _phantom_files(tmp_path / "sent")
    node = Node(
        tmp_path / "node",
        {
            "peers": {"planner": {"ae_title": PLANNER, "hosts": ["127.0.0.1"], "roles": ["find", "get"]}},
            "destinations": {"planner": {"ae_title": PLANNER, "host": "127.0.0.1", "port": free_port()}},
        },
    )
    _record_the_old_way(node.storage, files)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    series = (f"StudyInstanceUID={first.StudyInstanceUID}", f"SeriesInstanceUID={first.SeriesInstanceUID}")
    try:
        node.start()
        got, output = _get(node, tmp_path / "got", "-S", "QueryRetrieveLevel=SERIES", *series)
        first_log = node.log()
        node.stop()
        node.start()
        second_log = node.log()[len(first_log) :]
    finally:
        node.stop()

    assert got == Counter({(RITA["PatientID"], RITA["PatientName"]): 4}), output
    assert first_log.count("repair.identity_filled") == 1, first_log
    assert "repair.identity_filled" not in second_log, second_log
    assert Counter(_patients(f"sqlite:///{node.storage / 'dicom-node.db'}").values()) == Counter(
        {RITA["PatientID"]: 4, JANE["PatientID"]: 1}
    )


@pytest.mark.integration
def test_after_an_upgrade_from_0012_an_image_of_another_patient_under_the_same_patient_id_is_not_sent(
    tmp_path: Path,
) -> None:
    """A node of revision 0012 recorded each image's PatientID, but not its PatientName, birth date or sex (0013 added
    them empty): Jane's image, sent under Rita's PatientID and series, was served with Rita's after the upgrade.
    Revision 0014 has such rows read again from their files, so only Rita's four come."""
    files = _phantom_files(tmp_path / "sent")
    _relabel(files[-1], files[-1], {**JANE, "PatientID": RITA["PatientID"]})
    node = Node(
        tmp_path / "node",
        {
            "peers": {"planner": {"ae_title": PLANNER, "hosts": ["127.0.0.1"], "roles": ["find", "get"]}},
            "destinations": {"planner": {"ae_title": PLANNER, "host": "127.0.0.1", "port": free_port()}},
        },
    )
    _record_the_old_way(node.storage, files, revision="0012")
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    series = (f"StudyInstanceUID={first.StudyInstanceUID}", f"SeriesInstanceUID={first.SeriesInstanceUID}")
    try:
        node.start()
        got, output = _get(node, tmp_path / "got", "-S", "QueryRetrieveLevel=SERIES", *series)
    finally:
        node.stop()

    assert got == Counter({(RITA["PatientID"], RITA["PatientName"]): 4}), output
    assert node.log().count("repair.identity_filled") == 1, node.log()


def test_a_start_stopped_half_way_goes_on_where_it_stopped_and_a_missing_file_leaves_its_row_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each batch is committed on its own: a start stopped in its second batch kept the first, and the next start
    reads only the rest. A row whose file is gone stays unknown (Query/Retrieve withholds it) and is read again at
    each start, so a file put back is filled in then."""
    files = _phantom_files(tmp_path / "sent")
    storage = tmp_path / "storage"
    uids = _record_the_old_way(storage, files)
    url = f"sqlite:///{storage / 'dicom-node.db'}"
    migrate(url)
    sessions = make_session_factory(make_engine(url))
    gone = next(storage.rglob(f"{uids[files[2].name]}.dcm"))
    kept_aside = tmp_path / "kept-aside.dcm"
    gone.rename(kept_aside)

    read = backfill._identity_from_file
    calls: list[object] = []

    def stopped_at_the_third_file(row: Instance) -> dict[str, object] | None:
        calls.append(row)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the node stopped reading its third file (the second batch)
        return read(row)

    monkeypatch.setattr(backfill, "_identity_from_file", stopped_at_the_third_file)
    with pytest.raises(KeyboardInterrupt):
        backfill.fill_instance_identities(sessions, batch_size=2)
    monkeypatch.undo()
    assert Counter(_patients(url).values()) == Counter({RITA["PatientID"]: 2, None: 3})

    resumed = backfill.fill_instance_identities(sessions, batch_size=2)
    assert (resumed.filled, resumed.unreadable) == (2, 1)
    assert _patients(url)[uids[files[2].name]] is None
    assert _patients(url)[uids["jane.dcm"]] == JANE["PatientID"]

    again = backfill.fill_instance_identities(sessions, batch_size=2)
    assert (again.filled, again.unreadable) == (0, 1)

    kept_aside.rename(gone)
    put_back = backfill.fill_instance_identities(sessions, batch_size=2)
    assert (put_back.filled, put_back.unreadable) == (1, 0)
    assert Counter(_patients(url).values()) == Counter({RITA["PatientID"]: 4, JANE["PatientID"]: 1})
    assert backfill.fill_instance_identities(sessions) == backfill.IdentityBackfill()


def test_an_upgrade_keys_the_names_recorded_before_so_one_name_in_another_case_or_form_is_served(database_url) -> None:
    """Revision 0016 keeps each name's comparison key: rows recorded before it get theirs from their recorded name,
    in batches. Without them, MÜLLER^JÜRGEN and a decomposed ü under a study of Müller^Jürgen (the same person,
    admission says) were withheld from Query/Retrieve."""
    command.upgrade(alembic_config(database_url), "0015")
    engine = create_engine(database_url)
    tables = MetaData()
    tables.reflect(engine)
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    names = ["Müller^Jürgen", "MÜLLER^JÜRGEN", unicodedata.normalize("NFD", "Müller^Jürgen"), None]
    with engine.begin() as connection:
        study = (
            tables.tables["studies"]
            .insert()
            .values(study_instance_uid="8.1", patient_id="P8", patient_name=names[0], created_at=now)
        )
        study_id = connection.execute(study).inserted_primary_key[0]
        series = tables.tables["series"].insert().values(
            series_instance_uid="8.1.9", study_id=study_id, modality="CT", instance_count=len(names),
            first_received_at=now, last_received_at=now,
        )  # fmt: skip
        series_id = connection.execute(series).inserted_primary_key[0]
        for number, name in enumerate(names):
            connection.execute(
                tables.tables["instances"].insert().values(
                    sop_instance_uid=f"8.1.9.{number}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", series_id=series_id,
                    transfer_syntax_uid="1.2.840.10008.1.2.1", instance_number=number, path=f"/data/8.1.9.{number}.dcm",
                    size_bytes=1, received_at=now, patient_id="P8", patient_name=name,
                )
            )  # fmt: skip
    engine.dispose()

    migrate(database_url)

    sessions = make_session_factory(make_engine(database_url))
    with sessions() as session:
        keys = session.execute(select(Instance.patient_name_key).order_by(Instance.id)).scalars().all()
    assert keys == ["müller^jürgen==", "müller^jürgen==", "müller^jürgen==", None]
    found = answers(sessions, query("IMAGE", StudyInstanceUID="8.1", SOPInstanceUID=""), "SOPInstanceUID")
    assert found == ["8.1.9.0", "8.1.9.1", "8.1.9.2", "8.1.9.3"]


def _record_without_keys(sessions: sessionmaker[Session]) -> None:
    """Study 7.3 of Müller^Jürgen; images written MÜLLER^JÜRGEN (one person, admission says): the study row and
    image 7.3.9.2 without their key, as a worker of the version before revision 0016 records them after the
    upgrade, and image 7.3.9.3 whose name is no name."""
    names = ["Müller^Jürgen", "MÜLLER^JÜRGEN", "MÜLLER^JÜRGEN", "^^"]
    with transaction(sessions) as session:  # one transaction: no row is seen with its key
        for number, name in enumerate(names):
            study = StudyAttributes("7.3", patient_id="P9", patient_name=name)
            record_instance(session, instance(f"7.3.9.{number}", "7.3.9", study, number))
        session.flush()
        session.execute(update(Study).values(patient_name_key=None))
        session.execute(update(Instance).where(Instance.sop_instance_uid == "7.3.9.2").values(patient_name_key=None))


@pytest.mark.integration
def test_a_name_recorded_without_its_key_after_the_upgrade_is_keyed_at_the_next_start_and_served(
    tmp_path: Path,
) -> None:
    """Revision 0016 keys only the names recorded when it runs: a row written since by an older version's code has
    none, and Query/Retrieve withheld MÜLLER^JÜRGEN under a study of Müller^Jürgen. `serve` keys such rows at start."""
    node = Node(tmp_path / "node", {})
    node.storage.mkdir(parents=True)
    migrate(f"sqlite:///{node.storage / 'dicom-node.db'}")
    _record_without_keys(node.sessions)
    images = query("IMAGE", StudyInstanceUID="7.3", SeriesInstanceUID="7.3.9", SOPInstanceUID="")
    assert answers(node.sessions, images, "SOPInstanceUID") == ["7.3.9.0", "7.3.9.3"]  # as before the start
    try:
        node.start()
        first_log = node.log()
        node.stop()
        node.start()
        second_log = node.log()[len(first_log) :]
    finally:
        node.stop()

    assert answers(node.sessions, images, "SOPInstanceUID") == ["7.3.9.0", "7.3.9.1", "7.3.9.2", "7.3.9.3"]
    [note] = re.findall(r'repair\.names_keyed .*?note="([^"]*)"', first_log)
    assert note == (
        "2 patient name(s) recorded by an older version of dicom-node were given the form names are compared in, so "
        "Query/Retrieve finds their images under their study's patient"
    )
    assert "repair.names_keyed" not in second_log, second_log


def test_names_are_keyed_in_batches_and_a_name_that_is_no_name_is_left_without_a_key(database_url) -> None:
    migrate(database_url)
    sessions = make_session_factory(make_engine(database_url))
    _record_without_keys(sessions)

    assert name_keys.key_recorded_names(sessions, batch_size=1) == 2
    with sessions() as session:
        assert session.scalars(select(Study.patient_name_key)).all() == ["müller^jürgen=="]
        keys = session.scalars(select(Instance.patient_name_key).order_by(Instance.id)).all()
    assert keys == ["müller^jürgen==", "müller^jürgen==", "müller^jürgen==", None]
    assert name_keys.key_recorded_names(sessions) == 0


def test_a_name_an_older_worker_records_while_serve_runs_is_keyed_and_served(tmp_path, monkeypatch) -> None:
    """A worker of the older version finishes the job it held after the start that upgraded the database: its
    results have no key. `serve` keys the names recorded since, at its next pass, without a restart."""
    monkeypatch.setattr(name_keys, "INTERVAL_SECONDS", 0.1)
    settings = Settings(
        storage={"directory": tmp_path / "storage"},
        network={"ae_title": "NODEA", "host": "127.0.0.1", "port": free_port()},
        inference={"workers": 0},
        receive={"processes": 1},
    )
    node = start_node(settings)
    try:
        sessions = make_session_factory(make_engine(settings.database_url))
        _record_without_keys(sessions)  # after the start's own pass
        images = query("IMAGE", StudyInstanceUID="7.3", SeriesInstanceUID="7.3.9", SOPInstanceUID="")
        served = lambda: answers(sessions, images, "SOPInstanceUID")  # noqa: E731
        wait_for(lambda: served() == ["7.3.9.0", "7.3.9.1", "7.3.9.2", "7.3.9.3"], timeout=30, what="the names keyed")
    finally:
        node.stop()


def test_each_pass_keys_the_names_recorded_since_the_pass_before_the_last(database_url) -> None:
    migrate(database_url)
    sessions = make_session_factory(make_engine(database_url))
    keying = name_keys.NameKeying(Settings(database={"url": database_url}), sessions)
    _record_without_keys(sessions)

    assert keying.run_once() == 2
    _drop_key(sessions, "7.3.9.1")  # as if its transaction had been open at the first pass
    assert keying.run_once() == 1  # the second pass reads again the rows the first one read
    _drop_key(sessions, "7.3.9.1")
    assert keying.run_once() == 0  # the third one reads only those recorded since the first


def _drop_key(sessions: sessionmaker[Session], sop_instance_uid: str) -> None:
    with transaction(sessions) as session:
        unkeyed = update(Instance).where(Instance.sop_instance_uid == sop_instance_uid)
        session.execute(unkeyed.values(patient_name_key=None))
