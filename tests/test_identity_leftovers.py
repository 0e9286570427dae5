"""Identity text and identity sequences after admission learnt to decode identity strictly.

The receiver records no identity text it could only read by guessing its character set (a sender that corrects
SpecificCharacterSet is then received again), study dates and times compare as DICOM values, not as text, and items
of identity sequences without what DICOM requires are left out of the results with a warning, never refusing the
series."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select

from db.models import JobState, RejectedInstance, Study
from dicom_node.admission import RecordedStudy, admit
from dicom_node.config import AdmissionSettings
from dicom_node.phantom import write_phantom_series
from dicom_node.receive.header import check_header, read_header
from tests.conftest import CT_RULES, data_set_bytes, dciodvfy, storescu, succeeded_files
from tests.test_charsets import SMALL, patched
from tests.test_encode_conformance_more import admission_files, change_files, encode, phantom_files

UTF_8_NAME = "Müller^Jürgen"
WITHOUT_CHARACTER_SET = (b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 192", b"")
"""The whole SpecificCharacterSet element of a phantom in UTF-8, in explicit VR little endian."""


def unlabelled_copies(files: list[Path], folder: Path) -> list[Path]:
    """Copies of ``files`` without their SpecificCharacterSet: UTF-8 bytes a sender forgot to declare."""
    folder.mkdir()
    copies = [Path(shutil.copy(path, folder / path.name)) for path in files]
    patched(copies, WITHOUT_CHARACTER_SET)
    return copies


def study_name(node, study_instance_uid: str) -> str | None:
    with node.sessions() as session:
        return session.scalars(select(Study.patient_name).where(Study.study_instance_uid == study_instance_uid)).one()


@pytest.mark.integration
def test_a_sender_that_declares_the_character_set_it_forgot_is_received_again(tmp_path, start_node):
    """A UTF-8 name sent without SpecificCharacterSet was recorded as the Latin-1 guess MÃ¼ller^JÃ¼rgen; the same
    images sent again with the character set declared were refused (another PatientName), and so was a new series
    of the study (the study's PatientName differs). The guess is not recorded: both are received, and the study
    takes the name once a series carries one that decodes."""
    spec = replace(SMALL, slices=4, character_set="ISO_IR 192", patient_name=UTF_8_NAME, patient_id="CHARSET-1")
    corrected = write_phantom_series(tmp_path / "corrected", spec)
    forgotten = unlabelled_copies(corrected.files, tmp_path / "forgotten")
    second = write_phantom_series(
        tmp_path / "second", replace(spec, study_instance_uid=corrected.study_instance_uid, series_number=2)
    )
    node = start_node(rules=CT_RULES)

    first_sending = storescu(node.port, forgotten)
    assert sorted(succeeded_files(first_sending.stdout + first_sending.stderr)) == sorted(map(str, forgotten))
    node.wait_for_state(corrected.series_instance_uid, JobState.FAILED, timeout=60)
    assert "does not decode in its SpecificCharacterSet (none given: plain ASCII only)" in (
        node.job_reason(corrected.series_instance_uid) or ""
    )
    assert study_name(node, corrected.study_instance_uid) is None

    resent = storescu(node.port, corrected.files)
    new_series = storescu(node.port, second.files)

    assert sorted(succeeded_files(resent.stdout + resent.stderr)) == sorted(map(str, corrected.files))
    assert sorted(succeeded_files(new_series.stdout + new_series.stderr)) == sorted(map(str, second.files))
    node.wait_for_state(second.series_instance_uid, JobState.QUEUED, timeout=60)
    with node.sessions() as session:
        assert list(session.scalars(select(RejectedInstance.reason))) == []
    assert study_name(node, corrected.study_instance_uid) == UTF_8_NAME
    # a copy already stored is kept (only pixel data is compared): the first series is processed once purged and
    # sent again (README, "A PACS correction")
    assert node.job_state(corrected.series_instance_uid) is JobState.FAILED


@pytest.mark.parametrize(
    ("character_set", "name", "forget", "recorded"),
    [
        ("ISO_IR 192", UTF_8_NAME, False, UTF_8_NAME),
        ("ISO_IR 192", UTF_8_NAME, True, None),
        ("ISO_IR 100", UTF_8_NAME, False, UTF_8_NAME),
        ("\\ISO 2022 IR 87", "Yamada^Tarou=山田^太郎=やまだ^たろう", False, "Yamada^Tarou=山田^太郎=やまだ^たろう"),
        ("ISO_IR 192", "DOE^JOHN", True, "DOE^JOHN"),
    ],
    ids=["utf-8", "utf-8-undeclared", "latin-1", "japanese", "ascii-undeclared"],
)
def test_the_receiver_records_identity_text_only_as_it_decodes(tmp_path, character_set, name, forget, recorded):
    """What the study row and the stored-copy comparison take from a received header: the name as it decodes in
    the declared character set, and nothing where it only reads as a guess."""
    series = write_phantom_series(
        tmp_path / "ct", replace(SMALL, slices=1, character_set=character_set, patient_name=name)
    )
    files = unlabelled_copies(series.files, tmp_path / "sent") if forget else series.files
    dataset = pydicom.dcmread(files[0], stop_before_pixels=True)

    header = check_header(
        read_header(data_set_bytes(files[0]), dataset.file_meta.TransferSyntaxUID),
        str(dataset.SOPClassUID),
        str(dataset.SOPInstanceUID),
    )

    assert header.study.patient_name == recorded
    assert header.study.patient_id == SMALL.patient_id


@pytest.mark.parametrize(
    ("written", "warned"),
    [("101010.000", False), ("101010", False), ("1010", True), ("101011", True)],
)
def test_study_time_is_compared_with_the_study_as_a_time(tmp_path, written, warned):
    """101010 and 101010.000 are one time: no warning that the study's StudyTime differs. 1010 is 10:10:00."""
    files = phantom_files(tmp_path / "ct")

    def study_date_and_time(_: int, dataset: pydicom.Dataset) -> None:
        dataset.StudyDate, dataset.StudyTime = "20221208", written

    change_files(files, study_date_and_time)
    study = RecordedStudy("PHANTOM-1", details=(("StudyDate", "20221208"), ("StudyTime", "101010")))

    result = admit(admission_files(files), AdmissionSettings(), study_patient=study)

    assert result.admitted, result.refusal
    expected = (
        [
            "StudyTime differs from the value the study holds from the series received first; queries for the study "
            "answer that value, while these results carry this series' value"
        ]
        if warned
        else []
    )
    assert result.warnings == expected


def test_study_time_within_a_series_is_compared_as_a_time(tmp_path):
    """One image's 101010.00 is its series' 101010: no warning that StudyTime differs within the series."""
    files = phantom_files(tmp_path / "ct")
    change_files(files, lambda index, dataset: setattr(dataset, "StudyTime", "101010" if index else "101010.00"))

    result = admit(admission_files(files), AdmissionSettings())

    assert result.admitted, result.refusal
    assert result.warnings == []


def other_id(**attributes: str) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def test_identity_sequence_items_without_what_dicom_requires_are_left_out_of_valid_results(tmp_path):
    """An OtherPatientIDsSequence item without its TypeOfPatientID, and an IssuerOfPatientIDQualifiersSequence
    item whose AssigningFacilitySequence names no facility, made dciodvfy refuse the SEG, SR and RTSTRUCT. The
    series is admitted; those items are left out of the results, each with a sentence in the job's warnings."""
    files = phantom_files(tmp_path / "ct")
    complete = other_id(PatientID="OTHER-2", TypeOfPatientID="TEXT", IssuerOfPatientID="HOSPITAL-B")
    qualifier = other_id(UniversalEntityID="2.16.756.5.30", UniversalEntityIDType="ISO")
    nameless_facility = Dataset()
    nameless_facility.AssigningFacilitySequence = [Dataset()]
    untyped = other_id(UniversalEntityID="2.16.756.5.31")  # its type is required with it, by condition

    def identity_sequences(_: int, dataset: pydicom.Dataset) -> None:
        dataset.OtherPatientIDsSequence = [other_id(PatientID="OTHER-1", IssuerOfPatientID="HOSPITAL-A"), complete]
        dataset.IssuerOfPatientIDQualifiersSequence = [nameless_facility, untyped, qualifier]

    change_files(files, identity_sequences)
    admitted = admit(admission_files(files), AdmissionSettings())
    warnings: list[str] = []

    results = encode(files, tmp_path / "out", warnings)

    assert admitted.admitted, admitted.refusal
    required = "is missing or empty, where DICOM requires it"
    assert sorted(warnings) == sorted(
        [
            f"OtherPatientIDsSequence of the source images: TypeOfPatientID in item 1 {required}; 1 of its 2 items "
            "is left out of the results",
            "IssuerOfPatientIDQualifiersSequence of the source images: LocalNamespaceEntityID or UniversalEntityID in "
            f"item 1 of AssigningFacilitySequence in item 1 {required}; 2 of its 3 items are left out of the results",
        ]
    )
    for name, path in results.items():
        errors, _ = dciodvfy(path)
        assert errors == [], name
        result = pydicom.dcmread(path, stop_before_pixels=True)
        assert [item.PatientID for item in result.OtherPatientIDsSequence] == ["OTHER-2"], name
        qualifiers = [item.UniversalEntityID for item in result.IssuerOfPatientIDQualifiersSequence]
        assert qualifiers == ["2.16.756.5.30"], name
