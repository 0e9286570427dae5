"""C-FIND matching on the database: keys, wildcards, ranges, UID lists, and what retrieval refuses."""

from __future__ import annotations

import re

import pytest
from pydicom import config
from pydicom.dataset import Dataset
from sqlalchemy import event, select, update

from db.ingest import (
    InstanceRecord,
    SeriesAttributes,
    StudyAttributes,
    record_instance,
    record_new_instances,
    record_results,
)
from db.models import Instance, Job, JobState, Series, Study, utcnow
from db.session import make_engine, make_session_factory, migrate, transaction
from dicom_node.receive.header import comparable_identity
from dicom_node.retrieve.matching import (
    AmbiguousPatient,
    QueryError,
    UnsearchableValue,
    check_retrieval_keys,
    conditions,
    find,
    is_narrow,
    matching_instances,
    query_level,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture
def sessions(database_url):
    url = database_url
    migrate(url)
    factory = make_session_factory(make_engine(url))
    studies = [
        StudyAttributes(
            "1.1",
            patient_id="P1",
            patient_name="Doe^Jane",
            study_date="20260110",
            study_time="083000",
            accession_number="ACC_1",
        ),
        StudyAttributes(
            "1.2",
            patient_id="P1",
            patient_name="Doe^Jane",
            study_date="20260301",
            study_time="140000",
            accession_number="ACC%2",
        ),
        StudyAttributes("2.1", patient_id="P2", patient_name="Müller^Jörg", study_date="20251231"),
    ]
    with transaction(factory) as session:
        for study in studies:
            for n in range(3):
                record_instance(
                    session,
                    instance(f"{study.study_instance_uid}.9.{n}", f"{study.study_instance_uid}.9", study, n + 1),
                )
        record_results(session, 1, [instance("1.1.97.1", "1.1.97", studies[0], 1, sop_class=SEG, modality="SEG")])
    return factory


def instance(
    uid: str, series: str, study: StudyAttributes, number: int, *, sop_class: str = CT, modality: str = "CT"
) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=uid,
        sop_class_uid=sop_class,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"/data/{uid}.dcm",
        size_bytes=10,
        study=study,
        series=SeriesAttributes(series, modality=modality, series_number=1),
        instance_number=number,
    )


def record_one_image_each(sessions, studies: list[StudyAttributes]) -> None:
    """One image (series ``<study>.9``, image ``<study>.9.1``) of each study, as the receiver records it."""
    with transaction(sessions) as session:
        for study in studies:
            uid = study.study_instance_uid
            record_instance(session, instance(f"{uid}.9.1", f"{uid}.9", study, 1))


def query(level: str, **keys: str) -> Dataset:
    """An identifier as a peer sends it: with SpecificCharacterSet where a value goes beyond ASCII."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    if not all(str(value).isascii() for value in keys.values()):
        identifier.SpecificCharacterSet = "ISO_IR 192"
    return identifier


def answers(sessions, identifier: Dataset, key: str) -> list[str]:
    with sessions() as session:
        return [str(r.get(key)) for r in find(session, identifier, "NODE")]


def test_universal_single_value_and_uid_list(sessions) -> None:
    assert answers(sessions, query("STUDY", StudyInstanceUID=""), "StudyInstanceUID") == ["2.1", "1.1", "1.2"]
    assert answers(sessions, query("STUDY", StudyInstanceUID="1.2"), "StudyInstanceUID") == ["1.2"]
    assert answers(sessions, query("STUDY", StudyInstanceUID="1.1\\2.1"), "StudyInstanceUID") == ["2.1", "1.1"]
    assert answers(sessions, query("SERIES", StudyInstanceUID="1.1", SeriesInstanceUID=""), "SeriesInstanceUID") == [
        "1.1.9",
        "1.1.97",
    ]


def test_wildcards_escape_sql_patterns(sessions) -> None:
    assert answers(sessions, query("STUDY", AccessionNumber="ACC_*"), "StudyInstanceUID") == ["1.1"]
    assert answers(sessions, query("STUDY", AccessionNumber="ACC?2"), "StudyInstanceUID") == ["1.2"]
    assert answers(sessions, query("STUDY", PatientName="Doe*", StudyInstanceUID=""), "StudyInstanceUID") == [
        "1.1",
        "1.2",
    ]


def test_wildcards_count_case_as_a_single_value_does_on_every_database(sessions) -> None:
    """ab-100 and AB-100 are two patients' IDs (SQLite's LIKE would take them for one); a [ in a value is a
    character like any other."""
    studies = [
        StudyAttributes("6.1", patient_id="ab-100", patient_name="doe^ann"),
        StudyAttributes("6.2", patient_id="AB-100", patient_name="DOE^ANN"),
        StudyAttributes("6.3", patient_id="[AB]-100", patient_name="Doe^Ann"),
    ]
    record_one_image_each(sessions, studies)

    def patient_ids(**keys: str) -> list[str]:
        return sorted(answers(sessions, query("PATIENT", **keys), "PatientID"))

    assert patient_ids(PatientID="ab-100") == ["ab-100"]
    assert patient_ids(PatientID="ab-10*") == ["ab-100"]
    assert patient_ids(PatientID="AB-10?") == ["AB-100"]
    assert patient_ids(PatientID="*AB*") == ["AB-100", "[AB]-100"]
    assert patient_ids(PatientID="[AB]*") == ["[AB]-100"]
    assert patient_ids(PatientID="[ab]*") == []
    assert answers(sessions, query("STUDY", PatientName="doe*", StudyInstanceUID=""), "StudyInstanceUID") == ["6.1"]


def test_names_match_without_empty_trailing_components_on_either_side_on_every_database(sessions) -> None:
    """DOE^JOHN, DOE^JOHN^^ and DOE^JOHN^^^^= name one person (PS3.5 6.2.1): a query in one form found the others
    only where the stored text was the same; case still counts, in wildcards too. A query of the alphabetic group
    alone finds a name stored with more groups."""
    studies = [
        StudyAttributes("7.1", patient_id="P7", patient_name="DOE^JOHN^^", referring_physician_name="WHO^DR^^"),
        StudyAttributes("7.2", patient_id="P8", patient_name="DOE^JOHN"),
        StudyAttributes("7.3", patient_id="P9", patient_name="DOE^JOHN^^^^=YAMADA^TARO^^ =^ "),
        StudyAttributes("7.4", patient_id="P10", patient_name="doe^john"),
        StudyAttributes("7.5", patient_id="P11", patient_name="DOE^JOHNNY"),
    ]
    record_one_image_each(sessions, studies)

    def studies_named(name: str, keyword: str = "PatientName") -> list[str]:
        return sorted(answers(sessions, query("STUDY", **{keyword: name, "StudyInstanceUID": ""}), "StudyInstanceUID"))

    assert studies_named("DOE^JOHN") == ["7.1", "7.2", "7.3"]
    assert studies_named("DOE^JOHN^^") == ["7.1", "7.2", "7.3"]
    assert studies_named("DOE^JOHN^^^ ==") == ["7.1", "7.2", "7.3"]
    assert studies_named("DOE^JOHN=YAMADA^TARO") == ["7.3"]
    assert studies_named("DOE^JOHN^^=YAMADA^TARO^") == ["7.3"]
    assert studies_named("DOE*") == ["7.1", "7.2", "7.3", "7.5"]
    assert studies_named("*JOHN") == ["7.1", "7.2", "7.3"]
    assert studies_named("DOE^JOHN^^*") == ["7.1", "7.3"]  # as stored: 7.2 spells out no empty component
    assert studies_named("*TARO") == ["7.3"]
    assert studies_named("doe^john^") == ["7.4"]
    assert studies_named("DoE*") == []
    assert studies_named("^^") == studies_named("")  # an empty name: universal
    assert studies_named("WHO^DR", "ReferringPhysicianName") == ["7.1"]
    with sessions() as session:  # answered as stored
        (answer,) = find(session, query("STUDY", StudyInstanceUID="7.1", PatientName="DOE^JOHN"), "NODE")
    assert str(answer.PatientName) == "DOE^JOHN^^"


STORED_NAMES = [
    "DOE^JOHN",
    "DOE^JOHN^^",
    "DOE^JOHN^ ^",
    "DOE^JOHNNY",
    "doe^john",
    "DOE",
    "ROE^JANE^^",
    "DOE^JOHN=YAMADA^TARO",
    "DOE^JOHN^^=YAMADA^TARO^^",
    "DOE^JOHN^^^^=YAMADA^TARO^^ =^ ",
    "DOE^JOHN^=^=YAMADA",
    "DOE^JOHN==YAMADA",
    "DOE^JOHN^^==YAMADA",
    "DOE^JOHN==",
    "^^=YAMADA^TARO",
    "=YAMADA^TARO",
    "DOE^JOHN^ =YAMADA=やまだ^たろう",
    "Yamada^Tarou=山田^太郎=やまだ^たろう",
]
NAME_QUERIES = [
    "DOE^JOHN",
    "DOE^JOHN^^",
    "doe^john",
    "DOE",
    "DOE^JOHN=YAMADA^TARO",
    "DOE^JOHN==YAMADA",
    "DOE^JOHN=YAMADA=やまだ^たろう",
    "DOE^JOHN=YAMADA",
    "Yamada^Tarou",
    "Yamada^Tarou=山田^太郎",
    "=YAMADA^TARO",
    "DOE*",
    "*JOHN",
    "*TARO",
    "DOE^JOHN^^*",
    "DOE^JOHN=*",
    "DOE^JOHN*=YAMADA",
    "*=YAMADA*",
    "*^JOHN=*",
    "DOE^JOHN=YAMADA?TARO",
    "DOE^JOHN?YAMADA*",
    "DOE^JOHN??YAMADA",
    "DOE^JOH?",
    "Yamada^Tar?u",
    "?OE^JOHN",
    "D*N",
    "*?",
]


def _reference_name_match(pattern: str, stored: str | None) -> bool:
    """What a name query means (PS3.5 6.2.1, PS3.4 C.2.2.2.4), in Python: the stored name as stored or without its
    empty trailing components matches the pattern, or its first component groups do; case counts."""
    if stored is None:
        return False
    value, trimmed = comparable_identity("PatientName", pattern), comparable_identity("PatientName", stored)
    if "*" not in value and "?" not in value:
        return trimmed == value or trimmed.startswith(value + "=")
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in value)
    return any(re.fullmatch(regex, name, re.DOTALL) for name in (stored, trimmed)) or bool(
        re.fullmatch(regex + "=.*", trimmed, re.DOTALL)
    )


def test_name_matching_finds_exactly_the_names_a_plain_comparison_finds_on_every_database(sessions) -> None:
    """The trimmed name is only computed where a cheap match on the stored one passes; that prefilter never loses a
    match: not with a ``=`` or a ``?`` standing for one in the query (DOE^JOHN=* finds DOE^JOHN^^=YAMADA^TARO^^,
    DOE^JOHN?YAMADA* finds DOE^JOHN^^=YAMADA), and never adds one."""
    record_one_image_each(
        sessions,
        [StudyAttributes(f"8.{n}", patient_id=f"P8{n}", patient_name=name) for n, name in enumerate(STORED_NAMES)],
    )
    with sessions() as session:
        stored = dict(session.execute(select(Study.study_instance_uid, Study.patient_name)).all())
    assert stored["8.9"] == "DOE^JOHN^^^^=YAMADA^TARO^^ =^ "  # the padding is in the database, not trimmed away
    for pattern in NAME_QUERIES:
        found = answers(sessions, query("STUDY", PatientName=pattern, StudyInstanceUID=""), "StudyInstanceUID")
        expected = sorted(uid for uid, name in stored.items() if _reference_name_match(pattern, name))
        assert expected, pattern
        assert sorted(found) == expected, pattern


def test_the_trimmed_name_is_computed_only_for_names_a_cheap_match_leaves(tmp_path) -> None:
    """Trimming a stored name takes sixteen replace() calls; computed for every row, it made a PatientName C-FIND of
    50,000 studies ten times slower and held a writer back for most of a second. SQLite's rtrim(), which ends each
    trimming, is counted here by registering a Python one that does the same."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    migrate(url)
    engine = make_engine(url)
    trimmed: list[str] = []

    def rtrim(text: str | None, characters: str) -> str | None:
        if text is not None:
            trimmed.append(text)
        return None if text is None else text.rstrip(characters)

    @event.listens_for(engine, "connect")
    def _count_rtrim(dbapi_connection, _record) -> None:
        dbapi_connection.create_function("rtrim", 2, rtrim, deterministic=True)

    factory = make_session_factory(engine)
    names = [f"{family}{n}^JANE^^" for family in ("DOE", "ROE", "SMITH") for n in range(10)]
    names += ["DOE^JOHN", "DOE^JOHN^^", "DOE^JOHN^^=YAMADA^TARO", "ROE^JOHN"]
    with transaction(factory) as session:
        for n, name in enumerate(names):
            study = StudyAttributes(f"9.{n}", patient_id=f"P9{n}", patient_name=name)
            record_instance(session, instance(f"9.{n}.9.1", f"9.{n}.9", study, 1))

    def named(name: str) -> list[str | None]:
        trimmed.clear()
        return sorted(answers(factory, query("STUDY", PatientName=name, StudyInstanceUID=""), "PatientName"))

    assert named("DOE^JOHN") == ["DOE^JOHN", "DOE^JOHN^^", "DOE^JOHN^^=YAMADA^TARO"]
    assert trimmed and all(text.startswith("DOE^JOHN") for text in trimmed)
    assert named("DOE^JOHN=YAMADA^TARO") == ["DOE^JOHN^^=YAMADA^TARO"]
    assert trimmed == ["DOE^JOHN=YAMADA^TARO"]
    assert len(named("DOE*")) == 13
    assert trimmed == []  # a pattern ending in * matches the stored name alone
    assert named("*JOHN") == ["DOE^JOHN", "DOE^JOHN^^", "DOE^JOHN^^=YAMADA^TARO", "ROE^JOHN"]
    assert trimmed and all("JOHN" in text for text in trimmed)


def test_date_and_time_ranges(sessions) -> None:
    assert answers(sessions, query("STUDY", StudyDate="20260101-"), "StudyInstanceUID") == ["1.1", "1.2"]
    assert answers(sessions, query("STUDY", StudyDate="-20260110"), "StudyInstanceUID") == ["2.1", "1.1"]
    assert answers(sessions, query("STUDY", StudyDate="20260101-20260201"), "StudyInstanceUID") == ["1.1"]
    assert answers(sessions, query("STUDY", StudyTime="-0830"), "StudyInstanceUID") == ["1.1"]


@pytest.mark.parametrize(
    "value",
    ["2022-12-08", "20221308", "20220230", "1-3", "2022", "20221201-20221308", "1-2-3", "-"],
)
def test_a_date_key_that_is_no_date_or_range_is_refused_not_answered_with_nothing(sessions, value) -> None:
    """A planner's ISO date (read as the range 2022 to 12-08), month 13, or "1-3" (every study) gets a refusal
    naming the attribute, not a silent "no such study"."""
    with sessions() as session, pytest.raises(UnsearchableValue) as refused:
        list(find(session, query("STUDY", StudyDate=value), "NODE"))
    assert str(refused.value) == (
        "StudyDate is not a date (YYYYMMDD, a real day of the calendar) or a range of two (20261201-20261204, "
        "20261201-, -20261204): the node does not search for such a value"
    )


def test_dates_in_the_older_dotted_form_are_matched(sessions) -> None:
    assert answers(sessions, query("STUDY", StudyDate="2026.01.01-"), "StudyInstanceUID") == ["1.1", "1.2"]
    assert answers(sessions, query("STUDY", StudyDate="2025.12.31"), "StudyInstanceUID") == ["2.1"]


def test_a_key_beyond_ascii_in_a_query_that_declares_no_character_set_is_refused(sessions) -> None:
    """Müller* sent as UTF-8 bytes without SpecificCharacterSet reads as Latin-1 "MÃ¼ller*" and found nothing;
    with the character set declared it finds the study."""
    undeclared = query("STUDY", PatientName="Müller*")
    del undeclared.SpecificCharacterSet
    with sessions() as session, pytest.raises(UnsearchableValue, match="declares no SpecificCharacterSet"):
        list(find(session, undeclared, "NODE"))
    assert answers(sessions, query("STUDY", PatientName="Müller*"), "StudyInstanceUID") == ["2.1"]


def test_counts_modalities_and_non_ascii_names(sessions) -> None:
    with sessions() as session:
        (study,) = find(
            session,
            query(
                "STUDY",
                StudyInstanceUID="1.1",
                ModalitiesInStudy="",
                NumberOfStudyRelatedInstances="",
                NumberOfStudyRelatedSeries="",
            ),
            "NODE",
        )
        assert list(study.ModalitiesInStudy) == ["CT", "SEG"]
        assert (study.NumberOfStudyRelatedSeries, study.NumberOfStudyRelatedInstances) == (2, 4)
        assert study.RetrieveAETitle == "NODE"
        (patient,) = find(
            session, query("PATIENT", PatientID="P2", PatientName="", NumberOfPatientRelatedStudies=""), "NODE"
        )
        assert str(patient.PatientName) == "Müller^Jörg" and patient.SpecificCharacterSet == "ISO_IR 192"
        assert patient.NumberOfPatientRelatedStudies == 1
    assert answers(sessions, query("STUDY", ModalitiesInStudy="SEG"), "StudyInstanceUID") == ["1.1"]


def test_modalities_in_study_takes_wildcards_as_every_other_key_does(sessions) -> None:
    """'*' is a universal match (it matched no study at all), 'S?G' a pattern."""
    everything = answers(sessions, query("STUDY", StudyInstanceUID=""), "StudyInstanceUID")
    assert answers(sessions, query("STUDY", ModalitiesInStudy="*"), "StudyInstanceUID") == everything
    assert answers(sessions, query("STUDY", ModalitiesInStudy="S?G"), "StudyInstanceUID") == ["1.1"]
    assert answers(sessions, query("STUDY", ModalitiesInStudy="MR\\SE*"), "StudyInstanceUID") == ["1.1"]


def test_patient_counts_asked_at_study_level_count_the_patient(sessions) -> None:
    with sessions() as session:
        (study,) = find(
            session,
            query(
                "STUDY", StudyInstanceUID="1.1", NumberOfPatientRelatedStudies="", NumberOfPatientRelatedInstances=""
            ),
            "NODE",
        )
    assert (study.NumberOfPatientRelatedStudies, study.NumberOfPatientRelatedInstances) == (2, 7)


def test_one_patient_id_from_two_issuers_is_two_patients(sessions) -> None:
    """P3 numbered by HOSPITAL_A and P3 numbered by HOSPITAL_B: a query or retrieval naming the issuer gets that
    patient only, a PATIENT-level answer lists both, and each one's counts are its own."""
    hospital_a = StudyAttributes("3.1", patient_id="P3", issuer_of_patient_id="HOSPITAL_A", patient_name="One^A")
    hospital_b = StudyAttributes("3.2", patient_id="P3", issuer_of_patient_id="HOSPITAL_B", patient_name="Two^B")
    with transaction(sessions) as session:
        record_instance(session, instance("3.1.9.1", "3.1.9", hospital_a, 1))
        record_instance(session, instance("3.2.9.1", "3.2.9", hospital_b, 1))
        record_instance(session, instance("3.2.9.2", "3.2.9", hospital_b, 2))

    of_b = query("STUDY", PatientID="P3", IssuerOfPatientID="HOSPITAL_B", StudyInstanceUID="")
    assert answers(sessions, of_b, "StudyInstanceUID") == ["3.2"]
    with sessions() as session:
        moved = matching_instances(session, query("PATIENT", PatientID="P3", IssuerOfPatientID="HOSPITAL_A"))
        patients = list(
            find(
                session,
                query("PATIENT", PatientID="P3", IssuerOfPatientID="", NumberOfPatientRelatedInstances=""),
                "NODE",
            )
        )
    assert [i.sop_instance_uid for i in moved] == ["3.1.9.1"]
    assert [(p.IssuerOfPatientID, p.NumberOfPatientRelatedInstances) for p in patients] == [
        ("HOSPITAL_A", 1),
        ("HOSPITAL_B", 2),
    ]


def test_purged_series_are_not_answered(sessions) -> None:
    with transaction(sessions) as session:
        session.execute(update(Series).where(Series.series_instance_uid == "2.1.9").values(purged_at=utcnow()))
    assert answers(sessions, query("STUDY", StudyInstanceUID=""), "StudyInstanceUID") == ["1.1", "1.2"]


def test_one_patient_id_naming_two_people_is_two_patients_each_answered_from_their_own_studies(sessions) -> None:
    """Study 1.3 names another person under P1: a PATIENT-level answer named whichever study was newest, counted
    both people's studies, and a retrieval by P1 sent both. DOE^JANE (case aside) is Doe^Jane."""
    roe = StudyAttributes("1.3", patient_id="P1", patient_name="Roe^Richard", patient_sex="M")
    doe = StudyAttributes("1.4", patient_id="P1", patient_name="DOE^JANE", patient_birth_date="19800101")
    record_one_image_each(sessions, [roe, doe])

    def patients(**keys: str) -> list[tuple[str, int]]:
        asked = query("PATIENT", **{"PatientName": "", "NumberOfPatientRelatedStudies": "", **keys})
        with sessions() as session:
            return [(str(p.PatientName), p.NumberOfPatientRelatedStudies) for p in find(session, asked, "N")]

    assert patients(PatientID="P1") == [("DOE^JANE", 3), ("Roe^Richard", 1)]
    assert patients(PatientName="Doe^Jane") == [("Doe^Jane", 3)]  # from the studies that match: 1.1 and 1.2
    assert patients(PatientSex="M") == [("Roe^Richard", 1)]
    assert patients(PatientID="P1", PatientBirthDate="19800101") == [("DOE^JANE", 3)]
    with sessions() as session:
        (study,) = find(session, query("STUDY", StudyInstanceUID="1.3", NumberOfPatientRelatedStudies=""), "N")
        assert study.NumberOfPatientRelatedStudies == 1
        with pytest.raises(
            AmbiguousPatient, match=r"held for more than one person \(its studies differ in PatientName\)"
        ):
            matching_instances(session, query("PATIENT", PatientID="P1"), for_retrieval=True)
        roe_only = matching_instances(
            session, query("PATIENT", PatientID="P1", PatientName="Roe^Richard"), for_retrieval=True
        )
    assert [i.sop_instance_uid for i in roe_only] == ["1.3.9.1"]


def test_studies_whose_names_share_no_component_group_are_two_people(sessions) -> None:
    """=山田^太郎 (ideographic only) and Tanaka^Ichiro (alphabetic only) under one PatientID: nothing shows them to be
    one person, yet they were answered as one patient with both studies, and a retrieval by the PatientID sent both."""
    record_one_image_each(
        sessions,
        [
            StudyAttributes("3.1", patient_id="P3", patient_name="=山田^太郎"),
            StudyAttributes("3.2", patient_id="P3", patient_name="Tanaka^Ichiro"),
            StudyAttributes("3.3", patient_id="P3", patient_name="TANAKA^ICHIRO^^"),
        ],
    )
    asked = query("PATIENT", PatientID="P3", PatientName="", NumberOfPatientRelatedStudies="")
    with sessions() as session:
        people = [(str(p.PatientName), p.NumberOfPatientRelatedStudies) for p in find(session, asked, "N")]
        with pytest.raises(AmbiguousPatient, match=r"its studies differ in PatientName"):
            matching_instances(session, query("PATIENT", PatientID="P3"), for_retrieval=True)
    assert sorted(people) == [("=山田^太郎", 1), ("TANAKA^ICHIRO^^", 2)]


def test_results_are_withheld_once_their_series_changed_and_their_job_is_failed_or_ignored(sessions) -> None:
    """The SEG of study 1.1 (job 1) is hidden from matching, counts and retrieval once its CT series received an
    image after it and the job is FAILED or IGNORED (a re-run refused, cancelled or set aside), read at each
    query; a job that failed only in delivery still has results that describe its series, and they stay served."""

    def served() -> tuple[list[str], object, int, list[str], int]:
        with sessions() as session:
            series = find(session, query("SERIES", StudyInstanceUID="1.1", SeriesInstanceUID=""), "N")
            asked = query("STUDY", StudyInstanceUID="1.1", ModalitiesInStudy="", NumberOfStudyRelatedInstances="")
            (study,) = find(session, asked, "N")
            by_modality = find(session, query("STUDY", ModalitiesInStudy="SEG", StudyInstanceUID=""), "N")
            retrieved = matching_instances(session, query("STUDY", StudyInstanceUID="1.1"), for_retrieval=True)
            return (
                [str(s.SeriesInstanceUID) for s in series],
                study.ModalitiesInStudy,  # one value is answered as itself
                study.NumberOfStudyRelatedInstances,
                [str(s.StudyInstanceUID) for s in by_modality],
                len(retrieved),
            )

    def job_is(state: JobState) -> None:
        with transaction(sessions) as session:
            session.execute(update(Job).where(Job.id == 1).values(state=state))

    with_results = (["1.1.9", "1.1.97"], ["CT", "SEG"], 4, ["1.1"], 4)
    assert served() == with_results
    for state in (JobState.FAILED, JobState.IGNORED):  # failed in delivery, or run again and failed: unchanged
        job_is(state)
        assert served() == with_results, state

    job_is(JobState.RECEIVING)
    with transaction(sessions) as session:  # a late image after the SEG was made
        late = StudyAttributes("1.1", patient_id="P1", patient_name="Doe^Jane", accession_number="ACC_1")
        record_instance(session, instance("1.1.9.3", "1.1.9", late, 4))
    with_late_image = (["1.1.9", "1.1.97"], ["CT", "SEG"], 5, ["1.1"], 5)
    assert served() == with_late_image  # its re-run in progress: the earlier results stay served meanwhile
    for state in (JobState.FAILED, JobState.IGNORED, JobState.SENDING):
        job_is(state)
        assert served() == (with_late_image if state is JobState.SENDING else (["1.1.9"], "CT", 4, [], 4)), state


def test_modalities_in_study_and_accession_numbers_match_only_series_still_served(sessions) -> None:
    """Study 1.1's CT series is purged, its SEG kept: ModalitiesInStudy=CT matched the study by the purged series,
    whose answer said SEG alone."""
    with transaction(sessions) as session:
        session.execute(update(Series).where(Series.series_instance_uid == "1.1.9").values(purged_at=utcnow()))
        session.execute(update(Series).values(accession_number="ACC-S"))
        session.execute(update(Series).where(Series.series_instance_uid != "1.2.9").values(purged_at=utcnow()))
    assert answers(sessions, query("STUDY", ModalitiesInStudy="CT"), "StudyInstanceUID") == ["1.2"]
    assert answers(sessions, query("STUDY", ModalitiesInStudy="SEG"), "StudyInstanceUID") == []
    assert answers(sessions, query("STUDY", AccessionNumber="ACC-S"), "StudyInstanceUID") == ["1.2"]


def test_retrieval_needs_the_level_unique_key_and_a_known_level(sessions) -> None:
    with sessions() as session:
        with pytest.raises(QueryError, match="needs SeriesInstanceUID"):
            matching_instances(session, query("SERIES", StudyInstanceUID="1.1"), for_retrieval=True)
        with pytest.raises(QueryError, match="QueryRetrieveLevel 'FRAME'"):
            matching_instances(session, query("FRAME"), for_retrieval=True)
        found = matching_instances(session, query("SERIES", SeriesInstanceUID="1.1.97"), for_retrieval=True)
        assert [i.sop_instance_uid for i in found] == ["1.1.97.1"]


def test_only_literal_keys_at_or_above_the_level_make_a_query_narrow() -> None:
    """A peer without the find role may look up what it knows; a key the level ignores narrows nothing."""
    assert is_narrow(query("STUDY", StudyInstanceUID="1.1"), "STUDY")
    assert is_narrow(query("SERIES", StudyInstanceUID="1.1\\2.1", SeriesInstanceUID=""), "SERIES")
    assert is_narrow(query("IMAGE", SOPInstanceUID="1.1.9.1"), "IMAGE")
    assert is_narrow(query("STUDY", AccessionNumber="ACC_1"), "STUDY")
    # keys below the level are dropped by matching, so they would let a browsing query through
    assert not is_narrow(query("STUDY", SOPInstanceUID="1", StudyInstanceUID=""), "STUDY")
    assert not is_narrow(query("STUDY", SeriesInstanceUID="1.1.9"), "STUDY")
    assert not is_narrow(query("SERIES", SOPInstanceUID="1.1.9.1"), "SERIES")
    # wildcards, empty values and lists with an empty item browse
    for value in ("*", "1.1*", "?", "", "\\", "1.1\\", "1.1\\*"):
        assert not is_narrow(query("STUDY", StudyInstanceUID=value), "STUDY"), value
    assert not is_narrow(query("PATIENT", PatientID="P1", StudyInstanceUID="1.1"), "PATIENT")


def test_a_uid_list_of_empty_items_is_a_query_error(sessions) -> None:
    with sessions() as session, pytest.raises(QueryError, match="holds no UID"):
        list(find(session, query("STUDY", StudyInstanceUID="\\"), "NODE"))


def test_the_database_orders_and_cuts_the_matches_so_a_broad_query_loads_only_what_it_may_answer(sessions) -> None:
    with sessions() as session:
        first_two = [str(r.SOPInstanceUID) for r in find(session, query("IMAGE", StudyInstanceUID="1.1"), "N", limit=2)]
        patients = [str(r.PatientID) for r in find(session, query("PATIENT", PatientID=""), "N", limit=1)]
        retrieved = matching_instances(session, query("STUDY", StudyInstanceUID="1.2"), for_retrieval=True, limit=2)
    assert first_two == ["1.1.9.0", "1.1.9.1"]  # instance order, then cut
    assert patients == ["P1"]
    assert [i.sop_instance_uid for i in retrieved] == ["1.2.9.0", "1.2.9.1"]


def test_an_image_level_query_over_more_instances_than_a_statement_may_bind_is_answered(sessions) -> None:
    study = StudyAttributes("3.1", patient_id="P3")
    many = [instance(f"3.1.9.{n}", "3.1.9", study, n + 1) for n in range(70_000)]  # PostgreSQL binds 65,535
    with transaction(sessions) as session:
        record_new_instances(session, many)
    with sessions() as session:
        answered = [str(r.SOPInstanceUID) for r in find(session, query("IMAGE", StudyInstanceUID="3.1"), "N", limit=3)]
    assert answered == ["3.1.9.0", "3.1.9.1", "3.1.9.2"]


def test_a_refusal_quotes_at_most_64_characters_of_what_the_peer_sent() -> None:
    """A 900 kB QueryRetrieveLevel once went whole into the log line and the audit row of every query."""

    def sent(level: str, **keys: str) -> Dataset:
        with config.disable_value_validation():  # as a peer may send them: too long, unprintable, not numbers
            identifier = query(level, **{k: v for k, v in keys.items() if k != "InstanceNumber"})
            if "InstanceNumber" in keys:
                identifier.add_new(0x00200013, "LO", keys["InstanceNumber"])  # a str, as a malformed IS arrives
        return identifier

    def refusal(call, *args) -> str:
        with pytest.raises(QueryError) as raised:
            call(*args)
        return str(raised.value)

    huge = refusal(query_level, sent("X" * 900_000))
    assert huge == f"QueryRetrieveLevel {'X' * 64!r}... (900000 characters) is not one of PATIENT, STUDY, SERIES, IMAGE"
    assert refusal(query_level, sent("FR\rAME")).startswith("QueryRetrieveLevel 'FR?AME' is not")
    assert refusal(query_level, Dataset()).startswith("QueryRetrieveLevel '(missing)' is not")

    messages = [
        refusal(conditions, sent("STUDY", StudyInstanceUID="\\" * 300_000), "STUDY"),
        refusal(conditions, sent("IMAGE", InstanceNumber="1" * 10 + "x" * 400_000), "IMAGE"),
        refusal(check_retrieval_keys, sent("STUDY", StudyInstanceUID="1.2*" + "9" * 400_000), "STUDY"),
    ]
    assert all(len(message) < 200 for message in messages), [m[:200] for m in messages]
    # values longer than their VR allows are refused by their length and count, never quoted
    assert messages[0] == (
        "StudyInstanceUID lists 300001 values, more than the 5000 the node matches: the node does not search for "
        "such a value"
    )
    assert messages[1].startswith("InstanceNumber is 400010 characters long, more than the 12 DICOM allows (IS)")
    # named by their attribute, the value as sent (not quoted as Python would)
    assert refusal(conditions, sent("STUDY", StudyInstanceUID="\\\\"), "STUDY") == (
        "StudyInstanceUID holds no UID, only empty values (\\\\)"
    )
    assert refusal(conditions, sent("IMAGE", InstanceNumber="1" * 10 + "xx"), "IMAGE") == (
        "InstanceNumber is not a number (1111111111xx)"
    )
    assert messages[2].startswith("StudyInstanceUID '1.2*999") and messages[2].endswith(
        "(400004 characters) has a wildcard; a retrieval needs literal unique keys"
    )


def test_another_patients_instance_filed_under_a_stored_series_is_never_answered_or_retrieved(sessions) -> None:
    """A PACS sent patient P9's image with the Study and Series UIDs of P1's series 1.1.9: admission fails the
    series, but the instance was recorded, and every query answered it (and every retrieval sent it) as P1's."""
    foreign = StudyAttributes("1.1", patient_id="P9", patient_name="Other^Patient")
    same_id_no_issuer = StudyAttributes("1.1", patient_id="P1", issuer_of_patient_id=None)
    with transaction(sessions) as session:
        record_instance(session, instance("1.1.9.9", "1.1.9", foreign, 9))
        record_instance(session, instance("1.1.9.8", "1.1.9", same_id_no_issuer, 8))

    assert answers(sessions, query("IMAGE", StudyInstanceUID="1.1", SOPInstanceUID="1.1.9.9"), "PatientID") == []
    assert answers(sessions, query("IMAGE", SeriesInstanceUID="1.1.9", SOPInstanceUID=""), "SOPInstanceUID") == [
        "1.1.9.0",
        "1.1.9.1",
        "1.1.9.2",
        "1.1.9.8",
    ]
    with sessions() as session:
        retrieved = matching_instances(session, query("SERIES", SeriesInstanceUID="1.1.9"), for_retrieval=True)
        by_patient = matching_instances(session, query("PATIENT", PatientID="P9"), for_retrieval=True)
        (study,) = find(session, query("STUDY", StudyInstanceUID="1.1", NumberOfStudyRelatedInstances=""), "N")
    assert "1.1.9.9" not in [i.sop_instance_uid for i in retrieved] and len(retrieved) == 4
    assert by_patient == []  # nor is it P9's study to retrieve: the study is P1's
    assert study.NumberOfStudyRelatedInstances == 5  # 1.1.9.0-2, 1.1.9.8 and the SEG

    # a row recorded before the node kept each instance's patient, whose file start-up could not read to fill it
    # in (NULL, dicom_node/receive/backfill.py), may be another patient's: it is withheld
    with transaction(sessions) as session:
        session.execute(update(Instance).where(Instance.sop_instance_uid == "1.1.9.0").values(patient_id=None))
    assert (
        answers(sessions, query("IMAGE", SOPInstanceUID="1.1.9.0", StudyInstanceUID="1.1", PatientID=""), "PatientID")
        == []
    )


def test_patient_level_answers_carry_the_issuer_and_never_merge_studies_without_a_patient_id(sessions) -> None:
    no_id = [StudyAttributes(f"5.{n}", patient_name=name) for n, name in ((1, "India^Ian"), (2, "Juliet^Jo"))]
    hospital = StudyAttributes("4.1", patient_id="P1", issuer_of_patient_id="HOSPITAL_A", patient_name="Other^Ann")
    with transaction(sessions) as session:
        for study in no_id:
            record_instance(
                session, instance(f"{study.study_instance_uid}.9.1", f"{study.study_instance_uid}.9", study, 1)
            )
        record_instance(session, instance("4.1.9.1", "4.1.9", hospital, 1))

    with sessions() as session:
        patients = [
            (str(p.PatientID), str(p.IssuerOfPatientID), p.NumberOfPatientRelatedStudies)
            for p in find(session, query("PATIENT", PatientID="", NumberOfPatientRelatedStudies=""), "N")
        ]
        (unnamed,) = find(session, query("STUDY", StudyInstanceUID="5.1", NumberOfPatientRelatedStudies=""), "N")
    # asked without IssuerOfPatientID, each answer still says whose ID it is; India and Juliet are no patient "(none)"
    assert patients == [("P1", "", 2), ("P1", "HOSPITAL_A", 1), ("P2", "", 1)]
    assert unnamed.NumberOfPatientRelatedStudies == 1  # its own study only, not every study without a PatientID


def test_a_patient_level_retrieval_by_a_patient_id_of_several_issuers_must_name_the_issuer(sessions) -> None:
    hospital = StudyAttributes("4.1", patient_id="P1", issuer_of_patient_id="HOSPITAL_A", patient_name="Other^Ann")
    with transaction(sessions) as session:
        record_instance(session, instance("4.1.9.1", "4.1.9", hospital, 1))
    with sessions() as session:
        with pytest.raises(AmbiguousPatient, match="belongs to more than one patient"):
            matching_instances(session, query("PATIENT", PatientID="P1"), for_retrieval=True)
        with pytest.raises(AmbiguousPatient):
            matching_instances(session, query("PATIENT", PatientID="P1", IssuerOfPatientID="*"), for_retrieval=True)
        named = matching_instances(
            session, query("PATIENT", PatientID="P1", IssuerOfPatientID="HOSPITAL_A"), for_retrieval=True
        )
        only_one = matching_instances(session, query("PATIENT", PatientID="P2"), for_retrieval=True)
        by_study = matching_instances(session, query("STUDY", StudyInstanceUID="1.1"), for_retrieval=True)
    assert [i.sop_instance_uid for i in named] == ["4.1.9.1"]
    assert len(only_one) == 3 and len(by_study) == 4
