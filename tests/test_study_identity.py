"""One study, one patient identity: a new series of a stored study under the same PatientID but another name,
birth date or sex is refused at receipt (and by admission), as a re-sent instance with another identity is."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from db.ingest import STUDY_ROW_IDENTITY_COLUMNS
from db.jobs import job_for_series_uid
from db.models import JobState, RejectedInstance, Study, utcnow
from dicom_node import status
from dicom_node.admission import InstanceFile, admit, recorded_patient
from dicom_node.config import AdmissionSettings
from dicom_node.phantom import PhantomSeries, write_phantom_series
from dicom_node.receive.header import InstanceHeader, check_header, read_header
from dicom_node.receive.studies import KnownStudies
from tests import test_receive_handler
from tests.conftest import CT_RULES, data_set_bytes, storescu
from tests.test_receive_handler import SMALL_CT

running_scp = test_receive_handler.running_scp
YAMAMOTO = "Yamamoto^Tarou=山本^太郎=やまもと^たろう"  # 本 is JIS 0x4B5C: a backslash byte inside a character
JAPANESE = ["", "ISO 2022 IR 87"]


def phantom(folder: Path, study_instance_uid: str | None = None, **attributes: object) -> PhantomSeries:
    """A small CT series of PHANTOM-1, named DOE^JOHN, born 19500101, M, unless ``attributes`` say otherwise
    (None removes one)."""
    spec = replace(SMALL_CT, patient_id="PHANTOM-1", patient_name="DOE^JOHN")
    if study_instance_uid is not None:
        spec = replace(spec, study_instance_uid=study_instance_uid)
    series = write_phantom_series(folder, spec)
    for path in series.files:
        ds = dcmread(path)
        ds.PatientBirthDate, ds.PatientSex = "19500101", "M"
        for keyword, value in attributes.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(path)
    return series


def rejection_reasons(running_scp) -> set[str]:
    with running_scp.sessions() as session:
        return set(session.scalars(select(RejectedInstance.reason)))


@pytest.mark.parametrize(
    ("keyword", "value"),
    [("PatientName", "ROE^JANE"), ("PatientBirthDate", "19800202"), ("PatientSex", "F")],
)
def test_a_new_series_of_a_stored_study_with_another_name_birth_date_or_sex_is_refused(
    running_scp, tmp_path, keyword, value
):
    """The study's answers would keep the first identity while the new series' results carry the second."""
    first = phantom(tmp_path / "first")
    assert running_scp.send(first.files) == [(status.SUCCESS, "")] * len(first.files)
    assert running_scp.recorder.wait_until_recorded(30)
    other = phantom(tmp_path / "other", first.study_instance_uid, **{keyword: value})

    refused = running_scp.send(other.files[:2])

    assert [code for code, _comment in refused] == [status.CANNOT_UNDERSTAND] * 2
    assert running_scp.recorder.wait_until_recorded(30)
    reasons = rejection_reasons(running_scp)
    assert reasons == {
        f"StudyInstanceUID {first.study_instance_uid} is already stored for another patient (its {keyword} "
        "differs); one study holds one patient, so this instance is quarantined"
    }
    assert value not in str(reasons)
    with running_scp.sessions() as session:
        (study,) = session.scalars(select(Study))
    assert (study.patient_name, study.patient_birth_date, study.patient_sex) == ("DOE^JOHN", "19500101", "M")


def test_a_new_series_that_only_pads_leaves_out_or_orders_anew_joins_its_study(running_scp, tmp_path):
    """DOE^JOHN^^ is DOE^JOHN, and so are Doe^John (a workstation's series of the study) and DOE^JOHN with an
    ideographic group; a series without a sex or birth date names no other patient; another AccessionNumber is
    another order of the same study, not another patient."""
    first = phantom(tmp_path / "first")
    assert running_scp.send(first.files) == [(status.SUCCESS, "")] * len(first.files)
    assert running_scp.recorder.wait_until_recorded(30)
    study = first.study_instance_uid
    padded = phantom(tmp_path / "padded", study, PatientName="DOE^JOHN^^")
    unsexed = phantom(tmp_path / "unsexed", study, PatientSex=None, PatientBirthDate="")
    ordered = phantom(tmp_path / "ordered", study, AccessionNumber="ANOTHER-ORDER")
    cased = phantom(tmp_path / "cased", study, PatientName="Doe^John")
    grouped = phantom(
        tmp_path / "grouped", study, PatientName="DOE^JOHN=ドウ^ジョン", SpecificCharacterSet="ISO_IR 192"
    )

    answers = [*running_scp.send(padded.files[:2]), *running_scp.send(unsexed.files[:2])]
    answers += [*running_scp.send(ordered.files[:2]), *running_scp.send(cased.files[:2])]
    answers += running_scp.send(grouped.files[:2])

    assert answers == [(status.SUCCESS, "")] * 10
    assert running_scp.recorder.wait_until_recorded(30)
    assert rejection_reasons(running_scp) == set()


def test_another_process_reads_the_recorded_name_birth_date_and_sex_from_the_database(running_scp, tmp_path):
    """A receiver that did not store the study itself (another process) compares with the study's row."""
    first = phantom(tmp_path / "first")
    assert running_scp.send(first.files) == [(status.SUCCESS, "")] * len(first.files)
    assert running_scp.recorder.wait_until_recorded(30)
    elsewhere = KnownStudies(running_scp.sessions)  # remembers nothing: reads the study's row

    def conflict(series: PhantomSeries) -> str | None:
        """What the receiver answers the series' first instance: its header read from the bytes sent."""
        sent = dcmread(series.files[0], stop_before_pixels=True)
        dataset = read_header(data_set_bytes(series.files[0]), sent.file_meta.TransferSyntaxUID)
        return elsewhere.conflict(check_header(dataset, str(sent.SOPClassUID), str(sent.SOPInstanceUID)))

    born_later = phantom(tmp_path / "born-later", first.study_instance_uid, PatientBirthDate="19800202")
    same = phantom(tmp_path / "same", first.study_instance_uid, PatientName="DOE^JOHN^^^")

    assert conflict(born_later) == (
        f"StudyInstanceUID {first.study_instance_uid} is already stored for another patient (its PatientBirthDate "
        "differs); one study holds one patient, so this instance is quarantined"
    )
    assert conflict(same) is None


def test_admission_compares_a_series_with_its_studys_recorded_name_decoded_in_either_character_set(
    running_scp, tmp_path
):
    """Two senders at once, each the first of a study, escape the receiver: admission compares the series with
    the study's row, the name decoded as the results carry it (a JIS name under ISO 2022 IR 87 is the name the
    receiver recorded, not two values split at a backslash byte)."""
    first = phantom(tmp_path / "first", SpecificCharacterSet=JAPANESE, PatientName=YAMAMOTO)
    assert running_scp.send(first.files) == [(status.SUCCESS, "")] * len(first.files)
    assert running_scp.recorder.wait_until_recorded(30)
    with running_scp.sessions() as session:
        (study,) = session.scalars(select(Study))
        patient = recorded_patient(study)
    assert patient is not None and patient.patient_name == YAMAMOTO
    same = phantom(tmp_path / "same", first.study_instance_uid, SpecificCharacterSet=JAPANESE, PatientName=YAMAMOTO)
    in_utf8 = phantom(
        tmp_path / "utf8", first.study_instance_uid, SpecificCharacterSet="ISO_IR 192", PatientName=YAMAMOTO
    )
    other = phantom(
        tmp_path / "other",
        first.study_instance_uid,
        SpecificCharacterSet=JAPANESE,
        PatientName="Yamada^Tarou=山田^太郎=やまだ^たろう",
    )

    assert admit(instance_files(same), AdmissionSettings(), study_patient=patient).admitted
    assert admit(instance_files(in_utf8), AdmissionSettings(), study_patient=patient).admitted
    assert admit(instance_files(other), AdmissionSettings(), study_patient=patient).refusal == (
        "the series' study already holds another patient's images (its PatientName differs from the study's); "
        "one study must hold one patient"
    )


def instance_files(series: PhantomSeries) -> list[InstanceFile]:
    return [
        InstanceFile(path, uid, str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID), number)
        for number, (path, uid) in enumerate(zip(series.files, series.sop_instance_uids, strict=True), start=1)
    ]


def test_an_instance_sent_into_a_series_of_the_nodes_own_results_is_refused(running_scp, tmp_path):
    """A forged or looped-back instance under a result series' UID would be handed out by Query/Retrieve as the
    node's result."""
    from db.ingest import record_results
    from db.models import Job

    first = phantom(tmp_path / "first")
    assert running_scp.send(first.files) == [(status.SUCCESS, "")] * len(first.files)
    assert running_scp.recorder.wait_until_recorded(30)
    result = phantom(tmp_path / "result", first.study_instance_uid)
    sent = dcmread(result.files[0], stop_before_pixels=True)
    dataset = read_header(data_set_bytes(result.files[0]), sent.file_meta.TransferSyntaxUID)
    header = check_header(dataset, str(sent.SOPClassUID), str(sent.SOPInstanceUID))
    with running_scp.sessions() as session:
        job_id = session.scalars(select(Job.id)).one()
        record_results(session, job_id, [header.record(sent.file_meta.TransferSyntaxUID, "result.dcm", 1, "NODE")])
        session.commit()

    refused = running_scp.send(result.files[1:3])

    assert [code for code, _comment in refused] == [status.CANNOT_UNDERSTAND] * 2
    assert running_scp.recorder.wait_until_recorded(30)
    assert rejection_reasons(running_scp) == {
        f"SeriesInstanceUID {result.series_instance_uid} is a series of this node's own results (job {job_id}); "
        "the node never adds received instances to its results, so this instance is quarantined"
    }


@pytest.mark.parametrize(
    ("first_blank", "second", "third"),
    [
        (
            {"PatientName": ""},  # and no IssuerOfPatientID
            {"IssuerOfPatientID": "HOSPITAL-A"},
            {"IssuerOfPatientID": "HOSPITAL-B", "PatientName": "ROE^JANE"},
        ),
        (
            {"PatientBirthDate": "", "PatientSex": None},
            {},
            {"PatientBirthDate": "19800202", "PatientSex": "F"},
        ),
    ],
)
def test_a_study_whose_first_series_left_details_empty_takes_them_from_the_next_and_refuses_a_third_patient(
    running_scp, tmp_path, first_blank, second, third
):
    """A value only one side has is no conflict: the study's row kept the first series' blanks, so a second
    series naming DOE^JOHN and a third naming ROE^JANE were both accepted, and results went out for both."""
    first = phantom(tmp_path / "first", **first_blank)
    assert running_scp.send(first.files) == [(status.SUCCESS, "")] * len(first.files)
    assert running_scp.recorder.wait_until_recorded(30)
    study = first.study_instance_uid
    named = phantom(tmp_path / "named", study, **second)
    assert running_scp.send(named.files) == [(status.SUCCESS, "")] * len(named.files)
    assert running_scp.recorder.wait_until_recorded(30)
    other = phantom(tmp_path / "other", study, **third)

    refused = running_scp.send(other.files[:2])

    assert [code for code, _comment in refused] == [status.CANNOT_UNDERSTAND] * 2
    with running_scp.sessions() as session:
        (row,) = session.scalars(select(Study))
    held = {
        "IssuerOfPatientID": row.issuer_of_patient_id,
        "PatientName": row.patient_name,
        "PatientBirthDate": row.patient_birth_date,
        "PatientSex": row.patient_sex,
    }
    assert {keyword: held[keyword] for keyword in third} == {
        keyword: dcmread(named.files[0]).get(keyword) for keyword in third
    }
    elsewhere = KnownStudies(running_scp.sessions)  # another process: reads the completed row
    sent = dcmread(other.files[2], stop_before_pixels=True)
    header = check_header(
        read_header(data_set_bytes(other.files[2]), sent.file_meta.TransferSyntaxUID),
        str(sent.SOPClassUID),
        str(sent.SOPInstanceUID),
    )
    assert elsewhere.conflict(header) is not None


@pytest.mark.integration
def test_a_second_series_of_a_study_with_another_study_date_and_time_is_queued_with_warnings_naming_them(
    tmp_path, start_node
):
    """Both series are processed, but the study's queries answer the first series' StudyDate and StudyTime while
    the second's results carry its own: the second job says which attributes differ (never the values)."""
    first = phantom(tmp_path / "first", StudyDate="20221208", StudyTime="101010", StudyID="S1")
    second = phantom(
        tmp_path / "second", first.study_instance_uid, StudyDate="20221209", StudyTime="111111", StudyID="S1"
    )
    node = start_node(rules=CT_RULES)

    assert storescu(node.port, first.files).returncode == 0
    node.wait_for_state(first.series_instance_uid, JobState.QUEUED, timeout=60)
    assert storescu(node.port, second.files).returncode == 0
    node.wait_for_state(second.series_instance_uid, JobState.QUEUED, timeout=60)

    with node.sessions() as session:
        assert not job_for_series_uid(session, first.series_instance_uid).warnings
        assert job_for_series_uid(session, second.series_instance_uid).warnings == [
            f"{keyword} differs from the value the study holds from the series received first; queries for the "
            "study answer that value, while these results carry this series' value"
            for keyword in ("StudyDate", "StudyTime")
        ]


def test_a_claim_never_outlives_the_studys_row_so_a_correction_after_a_purge_is_received(running_scp, tmp_path):
    """The node-wide claim of a study by its patient (taken before the study's row is written) lasted 10 minutes:
    after `dicom-node purge --series` erased the study's identity, the PACS' corrected series (another PatientID)
    was refused as "already stored for another patient" on every receiving process. Once the row exists, it
    decides; a row whose identity a purge erased names nobody, and the claims taken before the erasure neither.
    The first new series after the erasure claims the study again: a third patient's series arriving at the same
    moment on another receiving process was acknowledged too, both reading the erased row."""
    wrong = phantom(tmp_path / "wrong", PatientID="PAT-WRONG")
    assert running_scp.send(wrong.files) == [(status.SUCCESS, "")] * len(wrong.files)  # claimed for PAT-WRONG
    assert running_scp.recorder.wait_until_recorded(30)
    with running_scp.sessions() as session:  # as the purge erases it: the row stays, naming nobody
        (study,) = session.scalars(select(Study))
        for column in STUDY_ROW_IDENTITY_COLUMNS:
            setattr(study, column, None)
        for series in study.series:
            series.purged_at = utcnow()
        session.commit()
    corrected = phantom(tmp_path / "right", wrong.study_instance_uid, PatientID="PAT-RIGHT")
    other = phantom(tmp_path / "other", wrong.study_instance_uid, PatientID="PAT-OTHER")
    claimed_by = running_scp.context.studies  # the receiving process that claimed the study
    elsewhere = KnownStudies(running_scp.sessions, claims=claimed_by.claims)  # another one, sharing the table
    third = KnownStudies(running_scp.sessions, claims=claimed_by.claims)  # and a third

    assert elsewhere.conflict(_first_header(corrected)) is None
    refused = third.conflict(_first_header(other))  # at the same moment, before PAT-RIGHT's series is recorded
    assert refused == (
        f"StudyInstanceUID {wrong.study_instance_uid} is being received for another patient (its PatientID "
        "differs); one study holds one patient, so this instance is quarantined"
    )


def _first_header(series: PhantomSeries) -> InstanceHeader:
    """The checked header of the series' first file, as the receiver reads it."""
    sent = dcmread(series.files[0], stop_before_pixels=True)
    return check_header(
        read_header(data_set_bytes(series.files[0]), sent.file_meta.TransferSyntaxUID),
        str(sent.SOPClassUID),
        str(sent.SOPInstanceUID),
    )
