"""A study's row names one patient, taken whole from an instance that names one: never a name from a series without
a PatientID beside another series' PatientID, never the details of a late instance that admission refuses, and
never the StudyDate of a purged series once its correction is sent again. Real `dicom-node serve`, storescu and
findscu."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from db.models import JobState, Study
from tests.conftest import CT_RULES, Node, storescu, succeeded_files
from tests.test_retrieve import QR_PEERS, findscu
from tests.test_study_identity import phantom

pytestmark = pytest.mark.integration

ROW_COLUMNS = ("patient_id", "issuer_of_patient_id", "patient_name", "patient_birth_date", "patient_sex")


def study_row(node: Node, study_instance_uid: str, *columns: str) -> tuple[str | None, ...]:
    with node.sessions() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_instance_uid)).one()
        return tuple(getattr(study, column) for column in columns)


def send_all(node: Node, files: list[Path]) -> None:
    sent = storescu(node.port, files)
    assert sorted(succeeded_files(sent.stdout + sent.stderr)) == sorted(map(str, files)), sent.stdout + sent.stderr


def late_instance(series_files: list[Path], folder: Path, **attributes: str) -> Path:
    """One more slice of a stored series (a new SOP Instance UID, one slice further), with ``attributes`` set."""
    folder.mkdir()
    dataset = pydicom.dcmread(series_files[-1])
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    dataset.InstanceNumber = len(series_files) + 1
    position = [float(value) for value in dataset.ImagePositionPatient]
    position[2] += float(dataset.SliceThickness)
    dataset.ImagePositionPatient = position
    for keyword, value in attributes.items():
        setattr(dataset, keyword, value)
    path = folder / "late.dcm"
    dataset.save_as(path)
    return path


def test_a_study_whose_first_series_had_no_patient_id_takes_the_next_series_identity_whole(tmp_path, start_node):
    """The first series (an empty PatientID: refused by admission) left ROE^RICHARD, 1970, M on the study row; the next
    series (PatientID WZ, DOE^JANE, 1980, F) gave it only WZ, so queries answered WZ as ROE^RICHARD and that
    correct series was refused as another patient's."""
    node = start_node(rules=CT_RULES, peers=QR_PEERS)
    anonymous = phantom(
        tmp_path / "anonymous", PatientID="", PatientName="ROE^RICHARD", PatientBirthDate="19700101", PatientSex="M"
    )
    send_all(node, anonymous.files)
    node.wait_for_state(anonymous.series_instance_uid, JobState.FAILED, timeout=60)
    named = phantom(
        tmp_path / "named",
        anonymous.study_instance_uid,
        PatientID="WZ",
        PatientName="DOE^JANE",
        PatientBirthDate="19800101",
        PatientSex="F",
    )

    send_all(node, named.files)

    node.wait_for_state(named.series_instance_uid, JobState.QUEUED, timeout=60)
    assert study_row(node, named.study_instance_uid, *ROW_COLUMNS) == ("WZ", None, "DOE^JANE", "19800101", "F")
    (patient,) = findscu(
        node,
        tmp_path / "find",
        "QueryRetrieveLevel=PATIENT",
        "PatientID=WZ",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        model="-P",
    )
    assert (patient.PatientName, patient.PatientBirthDate, patient.PatientSex) == ("DOE^JANE", "19800101", "F")


def test_a_late_instance_that_admission_refuses_leaves_its_study_as_it_was(tmp_path, start_node):
    """A series with a PatientID but no name, birth date, sex or issuer: one late instance naming WRONG^WALTER of
    OTHER_HOSP gave the study those details, so queries answered the study as his, and a new series of the
    study's real patient was refused at receipt as another patient's."""
    node = start_node(rules=CT_RULES, peers=QR_PEERS)
    first = phantom(tmp_path / "first", PatientID="Y1-PID", PatientName=None, PatientBirthDate=None, PatientSex=None)
    send_all(node, first.files)
    node.wait_for_state(first.series_instance_uid, JobState.QUEUED, timeout=60)
    intruder = late_instance(
        first.files,
        tmp_path / "late",
        PatientName="WRONG^WALTER",
        PatientBirthDate="20010101",
        PatientSex="M",
        IssuerOfPatientID="OTHER_HOSP",
    )

    send_all(node, [intruder])

    node.wait_for_state(first.series_instance_uid, JobState.FAILED, timeout=60)
    assert study_row(node, first.study_instance_uid, *ROW_COLUMNS) == ("Y1-PID", None, None, None, None)
    (study,) = findscu(
        node,
        tmp_path / "find",
        "QueryRetrieveLevel=STUDY",
        f"StudyInstanceUID={first.study_instance_uid}",
        "PatientName",
        "IssuerOfPatientID",
        "PatientBirthDate",
        "PatientSex",
    )
    assert (study.PatientName, study.IssuerOfPatientID, study.PatientBirthDate, study.PatientSex) == ("", "", "", "")
    real = phantom(
        tmp_path / "real",
        first.study_instance_uid,
        PatientID="Y1-PID",
        PatientName="RIGHT^RITA",
        PatientBirthDate="19600606",
        PatientSex="F",
    )
    send_all(node, real.files)  # the receiver remembers no detail of the refused instance either
    node.wait_for_state(real.series_instance_uid, JobState.QUEUED, timeout=60)
    assert study_row(node, first.study_instance_uid, *ROW_COLUMNS) == ("Y1-PID", None, "RIGHT^RITA", "19600606", "F")


def test_a_corrected_series_sent_again_after_a_purge_gives_its_study_its_own_date_and_time(tmp_path, start_node):
    """A purge erased the study's identity but kept StudyDate 20200101 and StudyTime 080000: the corrected series
    sent again (20261130 170000, PatientID T-NEW) was answered by C-FIND under the purged date, and carried a
    warning that the series received first holds another StudyDate."""
    node = start_node(peers=QR_PEERS)  # no rule: the series is IGNORED, finished, and retention may purge it
    wrong = phantom(tmp_path / "wrong", PatientID="T-OLD", StudyDate="20200101", StudyTime="080000")
    send_all(node, wrong.files)
    node.wait_for_state(wrong.series_instance_uid, JobState.IGNORED, timeout=60)
    purged = node.cli("purge", "--series", wrong.series_instance_uid)
    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert study_row(node, wrong.study_instance_uid, "patient_id", "study_date", "study_time") == (None, None, None)
    corrected = shutil.copytree(tmp_path / "wrong", tmp_path / "corrected")
    corrected_files = sorted(corrected.glob("*.dcm"))
    for path in corrected_files:
        dataset = pydicom.dcmread(path)
        dataset.PatientID, dataset.StudyDate, dataset.StudyTime = "T-NEW", "20261130", "170000"
        dataset.save_as(path)

    send_all(node, corrected_files)

    node.wait_for_state(wrong.series_instance_uid, JobState.IGNORED, timeout=60)
    row = study_row(node, wrong.study_instance_uid, "patient_id", "study_date", "study_time")
    assert row == ("T-NEW", "20261130", "170000")
    shown = node.cli("show", wrong.series_instance_uid)
    assert "StudyDate" not in shown.stdout and "StudyTime" not in shown.stdout, shown.stdout
    (study,) = findscu(
        node,
        tmp_path / "find",
        "QueryRetrieveLevel=STUDY",
        "StudyDate=20261130",
        "PatientID=T-NEW",
        "StudyTime",
    )
    assert (study.StudyInstanceUID, study.StudyTime) == (wrong.study_instance_uid, "170000")
