"""Query/Retrieve never hands out an image under another patient: not an image of a stored series that names another
name, birth date or sex than its study's patient, and not one patient's images under another patient that shares
the PatientID but not the issuer, where the issuer is given only as IssuerOfPatientIDQualifiersSequence.

The node is a real ``dicom-node serve``; the peers are DCMTK storescu (sending), findscu, getscu and movescu. How
an image's name is compared with its study's is checked on the database itself, SQLite and PostgreSQL.
"""

from __future__ import annotations

import subprocess
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from db.ingest import StudyAttributes, record_instance
from db.models import JobState
from db.session import make_engine, make_session_factory, migrate, transaction
from dicom_node.phantom import PhantomSpec, write_phantom_series
from tests.conftest import Node, free_port, require_tool, storescu, wait_for
from tests.test_matching import answers, instance, query

PLANNER = "PLANNER"
SLICES = 4


def _node(start_node, planner_port: int, **settings: Any) -> Node:
    """A node whose planner may find, get and move (``settings``: more of its configuration)."""
    return start_node(
        peers={
            "pacs": {"ae_title": "PACS", "hosts": ["127.0.0.1"], "roles": ["store"]},
            "planner": {"ae_title": PLANNER, "hosts": ["127.0.0.1"], "roles": ["find", "move", "get"]},
        },
        destinations={"planner": {"ae_title": PLANNER, "host": "127.0.0.1", "port": planner_port}},
        completion={"quiet_seconds": 1, "expected_count_timeout_seconds": 600},
        **settings,
    )


def _series(folder: Path, study_uid: str | None = None, **patient: object) -> list[Path]:
    """A four-slice phantom CT whose files carry ``patient`` (keyword: value; a list of dicts is a sequence)."""
    series = write_phantom_series(
        folder, PhantomSpec(rows=32, columns=32, slices=SLICES, study_instance_uid=study_uid or generate_uid())
    )
    for path in series.files:
        dataset = pydicom.dcmread(path)
        for keyword, value in patient.items():
            setattr(dataset, keyword, _sequence(value) if isinstance(value, list) else value)
        dataset.save_as(path)
    return list(series.files)


def _sequence(items: list[dict[str, str]]) -> Sequence:
    datasets = []
    for item in items:
        dataset = Dataset()
        for keyword, value in item.items():
            setattr(dataset, keyword, value)
        datasets.append(dataset)
    return Sequence(datasets)


def _uids(path: Path) -> tuple[str, str, str]:
    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    return str(dataset.StudyInstanceUID), str(dataset.SeriesInstanceUID), str(dataset.SOPInstanceUID)


def _settled(node: Node, series_uid: str) -> None:
    """Wait until the series has been completed and routed (no rule: IGNORED; or refused by admission: FAILED)."""
    wait_for(
        lambda: node.job_state(series_uid) in (JobState.IGNORED, JobState.FAILED),
        timeout=60,
        what=f"series {series_uid} to be completed",
    )


def _send(node: Node, paths: list[Path]) -> None:
    sent = storescu(node.port, paths)
    assert sent.returncode == 0, sent.stdout + sent.stderr


def _dcmtk(tool: str, node: Node, *arguments: str) -> str:
    command = [require_tool(tool), "-v", *arguments, "127.0.0.1", str(node.port)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    return result.stdout + result.stderr


def _keys(*keys: str) -> list[str]:
    return [argument for key in keys for argument in ("-k", key)]


def _find(node: Node, out: Path, model: str, *keys: str) -> list[Dataset]:
    out.mkdir(parents=True)
    output = _dcmtk(
        "findscu", node, model, "-aet", PLANNER, "-aec", node.ae_title, "-X", "-od", str(out), *_keys(*keys)
    )
    assert "Received Final Find Response (Success)" in output, output
    return [pydicom.dcmread(path) for path in sorted(out.glob("rsp*.dcm"))]


def _get(node: Node, out: Path, model: str, *keys: str) -> tuple[Counter[tuple[str, str]], str]:
    """The (PatientID, PatientName) of each instance a C-GET received, counted, and getscu's output."""
    out.mkdir(parents=True)
    output = _dcmtk("getscu", node, model, "-aet", PLANNER, "-aec", node.ae_title, "-od", str(out), *_keys(*keys))
    return _patients(out), output


def _patients(folder: Path) -> Counter[tuple[str, str]]:
    found = (pydicom.dcmread(path, stop_before_pixels=True) for path in folder.iterdir())
    return Counter((str(d.PatientID), str(d.PatientName)) for d in found)


@pytest.mark.integration
def test_an_image_of_a_stored_series_naming_another_name_birth_date_and_sex_is_never_found_or_retrieved(
    start_node, tmp_path: Path
) -> None:
    """The late image has the series' PatientID but another patient's name, birth date and sex: admission fails
    the series for it, yet every C-FIND, C-GET and C-MOVE served it under the study's patient Right^Rita."""
    planner_port = free_port()
    node = _node(start_node, planner_port)
    rita = {"PatientID": "R1-PID", "PatientName": "Right^Rita", "PatientBirthDate": "19900909", "PatientSex": "F"}
    files = _series(tmp_path / "rita", **rita)
    study_uid, series_uid, _ = _uids(files[0])
    _send(node, files)
    _settled(node, series_uid)

    late = pydicom.dcmread(files[-1])
    late.SOPInstanceUID = late.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    late.InstanceNumber = SLICES + 1
    late.ImagePositionPatient = [*late.ImagePositionPatient[:2], float(late.ImagePositionPatient[2]) + 5]
    late.PatientName, late.PatientBirthDate, late.PatientSex = "Wrong^Walter", "20010101", "M"
    late_path = tmp_path / "late.dcm"
    late.save_as(late_path)
    _send(node, [late_path])
    wait_for(lambda: node.job_state(series_uid) is JobState.RECEIVING, timeout=30, what="the series to reopen")
    _settled(node, series_uid)

    images = _find(
        node, tmp_path / "images", "-S", "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study_uid}",
        f"SeriesInstanceUID={series_uid}", "SOPInstanceUID", "PatientName",
    )  # fmt: skip
    assert len(images) == SLICES
    assert late.SOPInstanceUID not in {str(d.SOPInstanceUID) for d in images}
    (study,) = _find(
        node, tmp_path / "study", "-S", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_uid}",
        "NumberOfStudyRelatedInstances",
    )  # fmt: skip
    assert int(study.NumberOfStudyRelatedInstances) == SLICES
    by_sop = _find(
        node, tmp_path / "by-sop", "-S", "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study_uid}",
        f"SeriesInstanceUID={series_uid}", f"SOPInstanceUID={late.SOPInstanceUID}",
    )  # fmt: skip
    assert by_sop == []

    only_rita = Counter({("R1-PID", "Right^Rita"): SLICES})
    by_study, _ = _get(node, tmp_path / "get-study", "-S", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_uid}")
    by_patient, _ = _get(node, tmp_path / "get-patient", "-P", "QueryRetrieveLevel=PATIENT", "PatientID=R1-PID")
    by_image, _ = _get(
        node, tmp_path / "get-image", "-S", "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study_uid}",
        f"SeriesInstanceUID={series_uid}", f"SOPInstanceUID={late.SOPInstanceUID}",
    )  # fmt: skip
    assert by_study == only_rita and by_patient == only_rita and by_image == Counter()

    moved = tmp_path / "moved"
    moved.mkdir()
    _dcmtk(
        "movescu", node, "-S", "-aet", PLANNER, "-aec", node.ae_title, "-aem", PLANNER, "--port", str(planner_port),
        "-od", str(moved), *_keys("QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study_uid}",
        f"SeriesInstanceUID={series_uid}"),
    )  # fmt: skip
    assert _patients(moved) == only_rita


GB18030_NAME = b"Wang^XiaoDong=" + "王^小东".encode("gb18030")
"""A name in GB18030 bytes sent without SpecificCharacterSet: it does not decode in the default repertoire."""


def _undecodable_name(paths: list[Path]) -> None:
    for path in paths:
        dataset = pydicom.dcmread(path)
        if "SpecificCharacterSet" in dataset:
            del dataset.SpecificCharacterSet
        dataset["PatientName"].value = GB18030_NAME
        dataset.save_as(path)


@pytest.mark.integration
def test_an_image_whose_patient_name_does_not_decode_is_never_served_under_its_studys_patient(
    start_node, tmp_path: Path
) -> None:
    """A name that does not decode is recorded as unknown, and unknown compared as no name: the images of a series
    so named (admission fails such a series) were answered and sent under the name of the next series of their study and
    PatientID (Li^Na), and so was a late image so named in Li^Na's own series."""
    node = _node(start_node, free_port())
    wang = _series(tmp_path / "wang", PatientID="PID-7", PatientName="placeholder")
    _undecodable_name(wang)
    study_uid, wang_series, _ = _uids(wang[0])
    _send(node, wang)
    _settled(node, wang_series)

    li = _series(tmp_path / "li", study_uid, PatientID="PID-7", PatientName="Li^Na")
    _, li_series, _ = _uids(li[0])
    _send(node, li)
    _settled(node, li_series)
    late = pydicom.dcmread(li[-1])
    late.SOPInstanceUID = late.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    late.InstanceNumber = SLICES + 1
    late.ImagePositionPatient = [*late.ImagePositionPatient[:2], float(late.ImagePositionPatient[2]) + 5]
    late_path = tmp_path / "late.dcm"
    late.save_as(late_path)
    _undecodable_name([late_path])
    _send(node, [late_path])

    images = _find(
        node, tmp_path / "images", "-S", "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study_uid}",
        "SeriesInstanceUID", "SOPInstanceUID", "PatientName",
    )  # fmt: skip
    assert {str(d.SeriesInstanceUID) for d in images} == {li_series}
    assert len(images) == SLICES and {str(d.PatientName) for d in images} == {"Li^Na"}
    series = _find(node, tmp_path / "series", "-S", "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study_uid}",
                   "SeriesInstanceUID")  # fmt: skip
    assert {str(d.SeriesInstanceUID) for d in series} == {li_series}
    by_study, _ = _get(node, tmp_path / "get-study", "-S", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_uid}")
    assert by_study == Counter({("PID-7", "Li^Na"): SLICES})


@pytest.mark.integration
def test_one_patient_id_under_two_universal_issuers_is_two_patients_and_a_series_of_another_is_never_served(
    start_node, tmp_path: Path
) -> None:
    """Two hospitals number their patients Q88; each names itself only in IssuerOfPatientIDQualifiersSequence.
    The node made them one patient: one PATIENT-level answer, and a C-GET by PatientID sent both patients' images.
    A new series of a HOSP_A study (UniversalEntityID 1.2.3.4) from issuer 9.9.9.9 was served under HOSP_A."""
    node = _node(start_node, free_port())
    gus = _series(
        tmp_path / "gus", PatientID="Q88", PatientName="Gamma^Gus",
        IssuerOfPatientIDQualifiersSequence=[{"UniversalEntityID": "1.1.1", "UniversalEntityIDType": "ISO"}],
    )  # fmt: skip
    dora = _series(
        tmp_path / "dora", PatientID="Q88", PatientName="Delta^Dora",
        IssuerOfPatientIDQualifiersSequence=[{"UniversalEntityID": "2.2.2", "UniversalEntityIDType": "ISO"}],
    )  # fmt: skip
    for files in (gus, dora):
        _send(node, files)
        _settled(node, _uids(files[0])[1])

    patients = _find(
        node, tmp_path / "patients", "-P", "QueryRetrieveLevel=PATIENT", "PatientID=Q88", "PatientName",
        "IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID",
    )  # fmt: skip
    answered = [(str(d.PatientName), str(d.IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID)) for d in patients]
    assert sorted(answered) == [("Delta^Dora", "2.2.2"), ("Gamma^Gus", "1.1.1")]

    both, output = _get(node, tmp_path / "get-both", "-P", "QueryRetrieveLevel=PATIENT", "PatientID=Q88")
    assert both == Counter() and "Error: DataSetDoesNotMatchSOPClass" in output, output  # 0xA900
    only_gus, _ = _get(
        node, tmp_path / "get-gus", "-P", "QueryRetrieveLevel=PATIENT", "PatientID=Q88",
        "IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID=1.1.1",
    )  # fmt: skip
    assert only_gus == Counter({("Q88", "Gamma^Gus"): SLICES})

    hospital_a = {
        "PatientID": "Q77", "PatientName": "Doe^Jane", "IssuerOfPatientID": "HOSP_A",
        "IssuerOfPatientIDQualifiersSequence": [{"UniversalEntityID": "1.2.3.4", "UniversalEntityIDType": "ISO"}],
    }  # fmt: skip
    first = _series(tmp_path / "first", **hospital_a)
    study_uid, first_series, _ = _uids(first[0])
    _send(node, first)
    _settled(node, first_series)
    other_issuer = _series(
        tmp_path / "other", study_uid, PatientID="Q77", PatientName="Doe^Jane",
        IssuerOfPatientIDQualifiersSequence=[{"UniversalEntityID": "9.9.9.9", "UniversalEntityIDType": "ISO"}],
    )  # fmt: skip
    storescu(node.port, other_issuer)  # quarantined on receipt, or stored and refused by admission
    series = _find(node, tmp_path / "series", "-S", "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study_uid}")
    assert [str(d.SeriesInstanceUID) for d in series] == [first_series]
    by_issuer, _ = _get(
        node, tmp_path / "get-q77", "-P", "QueryRetrieveLevel=PATIENT", "PatientID=Q77", "IssuerOfPatientID=HOSP_A"
    )
    assert by_issuer == Counter({("Q77", "Doe^Jane"): SLICES})


@pytest.mark.integration
def test_a_study_of_two_orders_is_found_by_the_accession_number_of_each(start_node, tmp_path: Path) -> None:
    """Each series of the study carries its own order's AccessionNumber. The study was found only by its first
    series' accession: a planning system asking for the second order's found nothing, although its results carry it."""
    node = _node(start_node, free_port())
    anne = {"PatientID": "PA", "PatientName": "Ah^Anne", "PatientBirthDate": "19450101", "PatientSex": "F"}
    first = _series(tmp_path / "first", **anne, AccessionNumber="ACC-A1")
    study_uid = _uids(first[0])[0]
    second = _series(tmp_path / "second", study_uid, **anne, AccessionNumber="ACC-A2")
    for files in (first, second):
        _send(node, files)
        _settled(node, _uids(files[0])[1])

    for accession in ("ACC-A1", "ACC-A2", "ACC-A2*"):
        studies = _find(
            node, tmp_path / f"study-{accession}", "-S", "QueryRetrieveLevel=STUDY", f"AccessionNumber={accession}"
        )
        assert [str(d.StudyInstanceUID) for d in studies] == [study_uid], accession
    assert _find(node, tmp_path / "none", "-S", "QueryRetrieveLevel=STUDY", "AccessionNumber=ACC-A3") == []
    # At SERIES and IMAGE level each series is its own order's: answered with the AccessionNumber its images carry,
    # and found by it (every series once answered the study's first, ACC-A1, and matched the other order's number).
    second_series = _uids(second[0])[1]
    series = _find(
        node, tmp_path / "series", "-S", "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study_uid}",
        "AccessionNumber=ACC-A2", "SeriesInstanceUID",
    )  # fmt: skip
    assert [(str(d.SeriesInstanceUID), str(d.AccessionNumber)) for d in series] == [(second_series, "ACC-A2")]
    every = _find(
        node, tmp_path / "every", "-S", "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study_uid}",
        "AccessionNumber", "SeriesInstanceUID",
    )  # fmt: skip
    assert sorted(str(d.AccessionNumber) for d in every) == ["ACC-A1", "ACC-A2"]
    images = _find(
        node, tmp_path / "images", "-S", "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study_uid}",
        f"SeriesInstanceUID={second_series}", "AccessionNumber=ACC-A2", "SOPInstanceUID",
    )  # fmt: skip
    assert len(images) == SLICES and {str(d.AccessionNumber) for d in images} == {"ACC-A2"}


def test_an_image_is_answered_under_its_study_only_where_its_name_birth_date_sex_and_issuers_agree(
    database_url,
) -> None:
    """Compared as admission compares a series with its study: the same name written in another case, with empty
    trailing components or with a further component group is the same patient, as is a detail the image leaves
    empty; another name, birth date, sex, IssuerOfPatientID or UniversalEntityID is another patient."""
    migrate(database_url)
    sessions = make_session_factory(make_engine(database_url))
    study = StudyAttributes(
        "7.1", patient_id="P7", issuer_of_patient_id="HOSP_A", issuer_universal_entity_id="1.2.3.4",
        patient_name="DOE^JOHN", patient_birth_date="19700101", patient_sex="M",
    )  # fmt: skip
    same = {"1": {}, "2": {"patient_name": "Doe^John^^"}, "3": {"patient_name": "DOE^JOHN=ドウ^ジョン"}}
    same |= {"4": {"patient_name": None, "patient_sex": None, "issuer_universal_entity_id": None}}
    other = {"5": {"patient_name": "DOE^JANE"}, "6": {"patient_birth_date": "19700102"}, "7": {"patient_sex": "F"}}
    other |= {"8": {"issuer_of_patient_id": "HOSP_B"}, "9": {"issuer_universal_entity_id": "9.9.9.9"}}
    with transaction(sessions) as session:
        for number, changes in sorted({**same, **other}.items()):
            image = StudyAttributes(**{**study.__dict__, **changes})
            record_instance(session, instance(f"7.1.9.{number}", "7.1.9", image, int(number)))

    found = answers(
        sessions, query("IMAGE", StudyInstanceUID="7.1", SeriesInstanceUID="7.1.9", SOPInstanceUID=""), "SOPInstanceUID"
    )
    assert found == [f"7.1.9.{number}" for number in sorted(same)]


def test_an_image_name_is_its_studys_by_the_rule_admission_uses_on_every_database(database_url) -> None:
    """Names compared group by group as the receiver and admission compare them: letter case beyond ASCII (SQLite's
    lower() knows none) and composed or decomposed letters aside, a group only one side carries, even before a
    group both carry, is no difference. Another group both carry, or no group in common, is another person."""
    migrate(database_url)
    sessions = make_session_factory(make_engine(database_url))
    study = StudyAttributes("7.2", patient_id="P8", patient_name="Müller^Jürgen=ミュラー^ユルゲン")
    same = {
        "1": "MÜLLER^JÜRGEN",
        "2": unicodedata.normalize("NFD", "Müller^Jürgen"),
        "3": "=ミュラー^ユルゲン",
        "4": "müller^jürgen^^=ミュラー^ユルゲン^=みゅらー^ゆるげん",
        "5": "^^",  # no name
    }
    other = {"6": "Müller^Jürgen=田中^次郎", "7": "==みゅらー^ゆるげん", "8": "Muller^Jurgen"}
    with transaction(sessions) as session:
        record_instance(session, instance("7.2.9.0", "7.2.9", study, 0))
        for number, name in sorted({**same, **other}.items()):
            image = StudyAttributes(**{**study.__dict__, "patient_name": name})
            record_instance(session, instance(f"7.2.9.{number}", "7.2.9", image, int(number)))

    found = answers(
        sessions, query("IMAGE", StudyInstanceUID="7.2", SeriesInstanceUID="7.2.9", SOPInstanceUID=""), "SOPInstanceUID"
    )
    assert found == ["7.2.9.0", *(f"7.2.9.{number}" for number in sorted(same))]
