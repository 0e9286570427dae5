"""Admission from headers (unit level): phantom files mutated on disk, checked without a node."""

from __future__ import annotations

import subprocess
import sys
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import PersonName
from sqlalchemy import select

from db import jobs
from db.jobs import is_partial_series_warning
from db.models import Job, JobEvent, JobState, Series, Study
from db.session import make_engine, make_session_factory, migrate, transaction
from dicom_node.admission import (
    BYTES_PER_CLASS_TILE,
    BYTES_PER_VOXEL_AFTER_SOURCE,
    LARGEST_FOOTPRINT,
    TASK_FOOTPRINTS,
    THRESHOLD_FOOTPRINT,
    InstanceFile,
    ModelFootprint,
    RecordedStudy,
    _class_bytes,
    _Frame,
    _identity_value_problem,
    _memory_estimate,
    admit,
    is_admission_warning,
    model_footprint,
)
from dicom_node.config import AdmissionSettings, ThresholdModelSettings, TotalSegmentatorModelSettings
from dicom_node.phantom import PhantomSpec, write_phantom_series
from dicom_node.receive.header import InvalidInstance, StudyPatient, check_header, read_header
from inference.volume import VolumeError, load_series_volume
from tests.conftest import data_set_bytes

STRICT = AdmissionSettings()


def series_files(folder: Path, **spec) -> list[InstanceFile]:
    series = write_phantom_series(folder, PhantomSpec(**{"rows": 16, "columns": 16, "slices": 4, **spec}))
    files = []
    for number, path in enumerate(series.files, start=1):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        files.append(
            InstanceFile(
                path=path,
                sop_instance_uid=str(ds.SOPInstanceUID),
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                instance_number=int(ds.InstanceNumber) if "InstanceNumber" in ds else number,
                number_of_frames=int(ds.NumberOfFrames) if "NumberOfFrames" in ds else None,
            )
        )
    return files


def rewrite(file: InstanceFile, **raw: str) -> None:
    """Put each keyword's text into the file undecoded, as a broken modality writes it."""
    ds = pydicom.dcmread(file.path)
    for keyword, text in raw.items():
        tag = Tag(tag_for_keyword(keyword))
        value = text.encode() + b" " * (len(text) % 2)
        ds._dict[tag] = RawDataElement(tag, dictionary_VR(tag), len(value), value, 0, False, True)
    ds.save_as(file.path)


def test_valid_series_is_admitted_with_its_memory_estimate(tmp_path):
    result = admit(series_files(tmp_path), STRICT)
    assert result.admitted and result.warnings == []
    assert result.images == 4
    source = 4 * 16 * 16 * (2 + BYTES_PER_VOXEL_AFTER_SOURCE)
    assert result.estimated_bytes == source + _class_bytes((1, 1, 1), LARGEST_FOOTPRINT)


def test_enhanced_ct_frames_are_checked_from_functional_groups(tmp_path):
    result = admit(series_files(tmp_path, enhanced=True), STRICT)
    assert result.admitted and result.images == 4


def test_decimal_string_text_names_attribute_instance_and_value(tmp_path):
    files = series_files(tmp_path)
    rewrite(files[1], PixelSpacing="abc\\abc")
    assert admit(files, STRICT).refusal == "PixelSpacing of instance 2 is not a number ('abc')"


def test_identity_refusal_never_shows_the_values(tmp_path):
    files = series_files(tmp_path)
    rewrite(files[0], PatientID="SECRET-ID-42")
    refusal = admit(files, STRICT).refusal
    assert refusal is not None and refusal.startswith("PatientID differs within the series: 1 of 4 instances")
    assert "SECRET" not in refusal


def test_a_series_without_patient_id_is_refused(tmp_path):
    files = series_files(tmp_path)
    for file in files:
        rewrite(file, PatientID="")
    assert admit(files, STRICT).refusal == (
        "4 of 4 instances have no PatientID (first: instance 1); a result must name its patient"
    )
    ds = pydicom.dcmread(files[2].path)
    del ds.PatientID
    ds.save_as(files[2].path)
    assert "have no PatientID (first: instance 1)" in (admit(files, STRICT).refusal or "")


VALUES = {
    "PatientSex": ("F", "M"),
    "StudyDate": ("20240101", "20240102"),
    "StudyTime": ("101010", "111111"),
    "PatientAge": ("040Y", "045Y"),
    "PatientSize": ("1.70", "1.75"),
    "PatientWeight": ("70", "75"),
}


@pytest.mark.parametrize(
    ("keyword", "subject"),
    [
        ("IssuerOfPatientID", "patient"),
        ("PatientSex", "patient"),
        ("AccessionNumber", "study"),
    ],
)
def test_every_identity_attribute_the_result_carries_must_agree(tmp_path, keyword, subject):
    """highdicom copies the patient and study modules from one source, so all must say the same."""
    files = series_files(tmp_path)
    for file in files[:2]:
        rewrite(file, **{keyword: VALUES.get(keyword, ("HOSP_A", "HOSP_B"))[0]})
    for file in files[2:]:
        rewrite(file, **{keyword: VALUES.get(keyword, ("HOSP_A", "HOSP_B"))[1]})
    refusal = admit(files, STRICT).refusal or ""
    assert refusal.startswith(f"{keyword} differs within the series: 2 of 4 instances"), refusal
    assert refusal.endswith(f"one series must hold one {subject}")
    assert "HOSP" not in refusal


def _other_ids(*ids: str) -> list[pydicom.Dataset]:
    items = []
    for patient_id in ids:
        item = pydicom.Dataset()
        item.PatientID = patient_id
        item.TypeOfPatientID = "TEXT"
        items.append(item)
    return items


@pytest.mark.parametrize(
    ("first", "rest", "agree"),
    [
        (("OLD-1", "OLD-2"), ("OLD-2", "OLD-1"), True),  # the same items in another order
        (("OLD-1",), ("OLD-9",), False),  # another patient's former ID
        ((), ("OLD-1",), False),  # a merge some instances know of and others do not
    ],
)
def test_every_instance_names_the_same_other_patient_ids(tmp_path, first, rest, agree):
    """The results copy OtherPatientIDsSequence from one instance: it must say the same in every instance."""
    files = series_files(tmp_path)
    for file, ids in zip(files, [first, rest, rest, rest], strict=True):
        ds = pydicom.dcmread(file.path)
        if ids:
            ds.OtherPatientIDsSequence = _other_ids(*ids)
        ds.save_as(file.path)
    result = admit(files, STRICT)
    if agree:
        assert result.admitted
    else:
        assert result.refusal == (
            "OtherPatientIDsSequence differs within the series: 1 of 4 instances (first: instance 1) carry another "
            "value than the rest; one series must hold one patient"
        )


def test_every_instance_qualifies_the_issuer_of_patient_id_alike(tmp_path):
    files = series_files(tmp_path)
    for number, file in enumerate(files):
        ds = pydicom.dcmread(file.path)
        ds.IssuerOfPatientID = "HOSPITAL_A"
        qualifier = pydicom.Dataset()
        qualifier.UniversalEntityID = "1.2.3.4.5" if number else "1.2.3.4.6"
        qualifier.UniversalEntityIDType = "ISO"
        ds.IssuerOfPatientIDQualifiersSequence = [qualifier]
        ds.save_as(file.path)
    assert (admit(files, STRICT).refusal or "").startswith(
        "IssuerOfPatientIDQualifiersSequence differs within the series: 1 of 4 instances (first: instance 1)"
    )


@pytest.mark.parametrize(
    "keyword",
    ["StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName", "PatientAge", "PatientSize", "PatientWeight"],
)
def test_study_details_that_differ_within_the_series_are_a_warning_naming_the_attribute(tmp_path, keyword):
    files = series_files(tmp_path)
    for number, file in enumerate(files):
        rewrite(file, **{keyword: VALUES.get(keyword, ("S1", "S2"))[number % 2]})
    result = admit(files, STRICT)
    assert result.admitted
    assert result.warnings == [
        f"{keyword} differs within the series: 2 of 4 instances carry another value than the rest; the results "
        "carry the value of the first image by position"
    ]


RECORDED = {"StudyDate": "20221208", "StudyTime": "101010", "StudyID": "S1", "AccessionNumber": "A1"}
SECOND_SERIES = {"StudyDate": "20221209", "StudyTime": "111111", "StudyID": "S2", "AccessionNumber": "A2"}


def recorded_study(**details: str | None) -> RecordedStudy:
    """The study's row as an earlier series of DOE^JOHN left it (the phantom's patient)."""
    return RecordedStudy("PHANTOM", patient_name="DOE^JOHN", details=tuple({**RECORDED, **details}.items()))


@pytest.mark.parametrize("keyword", SECOND_SERIES)
def test_study_details_that_differ_from_the_studys_record_are_a_warning_naming_the_attribute(tmp_path, keyword):
    """A second series of the study with another StudyDate (StudyTime, StudyID, AccessionNumber): the study's
    queries answer the first series' value while this series' results carry its own, so the job says so."""
    files = series_files(tmp_path, patient_id="PHANTOM", patient_name="DOE^JOHN")
    for file in files:
        rewrite(file, **{**RECORDED, keyword: SECOND_SERIES[keyword]})

    result = admit(files, STRICT, study_patient=recorded_study())

    assert result.admitted
    assert result.warnings == [
        f"{keyword} differs from the value the study holds from the series received first; queries for the study "
        "answer that value, while these results carry this series' value"
    ]
    assert all(is_admission_warning(warning) for warning in result.warnings)
    assert admit(files, STRICT, study_patient=recorded_study(**{keyword: SECOND_SERIES[keyword]})).warnings == []
    assert admit(files, STRICT, study_patient=recorded_study(**{keyword: None})).warnings == []  # one side only


def test_a_study_detail_that_differs_within_the_series_is_not_warned_twice(tmp_path):
    files = series_files(tmp_path, patient_id="PHANTOM", patient_name="DOE^JOHN")
    for number, file in enumerate(files):
        rewrite(file, **{**RECORDED, "StudyDate": ("20221209", "20221210")[number % 2]})

    warnings = admit(files, STRICT, study_patient=recorded_study()).warnings

    assert [warning.split(":")[0] for warning in warnings] == ["StudyDate differs within the series"]


def test_a_study_record_warning_is_replaced_when_the_series_is_admitted_again(tmp_path):
    """Admitted again (a late image, a retry) once the study agrees, the job no longer carries the warning; other
    stages' warnings stay."""
    files = series_files(tmp_path, patient_id="PHANTOM", patient_name="DOE^JOHN")
    for file in files:
        rewrite(file, **{**RECORDED, "StudyDate": "20221209"})
    job = Job(warnings=["partial series: 3 of 4"])
    jobs.append_warnings(job, admit(files, STRICT, study_patient=recorded_study()).warnings)
    assert len(job.warnings or []) == 2

    again = admit(files, STRICT, study_patient=recorded_study(StudyDate="20221209"))
    jobs.append_warnings(job, again.warnings, replacing=is_admission_warning)

    assert job.warnings == ["partial series: 3 of 4"]


def test_the_same_name_bytes_under_another_character_set_are_another_name(tmp_path):
    """'M\xc3\xbcller' is Müller in UTF-8 and MÃ¼ller in Latin-1: the series does not hold one patient."""
    files = series_files(tmp_path)
    for file in files:
        ds = pydicom.dcmread(file.path)
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = "Müller^Jürgen"
        ds.save_as(file.path)
    first = files[0].path.read_bytes()
    assert first.count(b"ISO_IR 192") == 1
    files[0].path.write_bytes(first.replace(b"ISO_IR 192", b"ISO_IR 100"))  # the same bytes, read as Latin-1
    refusal = admit(files, STRICT).refusal or ""
    assert refusal.startswith("PatientName differs within the series: 1 of 4 instances (first: instance 1)"), refusal
    files[0].path.write_bytes(first)  # the same bytes and character set everywhere: one name
    assert admit(files, STRICT).admitted


def test_the_same_name_in_latin_1_and_in_utf_8_is_one_name(tmp_path):
    """A PACS that re-encodes some instances (Latin-1 from one modality, UTF-8 after a migration) still names
    one patient: the results would carry Müller^Jürgen from any of them."""
    files = series_files(tmp_path)
    for file in files:
        ds = pydicom.dcmread(file.path)
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = "Müller^Jürgen"
        ds.save_as(file.path)
    latin_1 = pydicom.dcmread(files[0].path)
    latin_1.SpecificCharacterSet = "ISO_IR 100"
    latin_1.save_as(files[0].path)
    assert admit(files, STRICT).admitted


def with_name_bytes(files: list[InstanceFile], character_set: str | list[str], names: list[bytes]) -> None:
    """Write each file's PatientName as the given bytes, undecoded, under ``character_set``, as a sender would."""
    tag = Tag(tag_for_keyword("PatientName"))
    for file, name in zip(files, names, strict=True):
        ds = pydicom.dcmread(file.path)
        ds.SpecificCharacterSet = character_set
        ds.save_as(file.path)  # first: pydicom re-encodes the text of a data set whose character set changed
        ds = pydicom.dcmread(file.path)
        value = name + b" " * (len(name) % 2)
        ds._dict[tag] = RawDataElement(tag, "PN", len(value), value, 0, False, True)
        ds.save_as(file.path)


@pytest.mark.parametrize(
    ("character_set", "name", "shown_set"),
    [
        ("ISO_IR 192", b"M\xfcller^J\xfcrgen", "'ISO_IR 192'"),  # Latin-1 bytes in a UTF-8 data set
        (["", "ISO 2022 IR 87"], b"DOE^\x1b$)CJOHN", "'\\\\ISO 2022 IR 87'"),  # switches to Korean, not declared
    ],
    ids=["latin-1-bytes-under-utf-8", "undeclared-escape-sequence"],
)
def test_an_identity_value_that_does_not_decode_in_its_character_set_is_refused(
    tmp_path, character_set, name, shown_set
):
    """The results would carry replacement characters (another name than the one sent): refused, naming the
    attribute, the instance and the character set, never the name."""
    files = series_files(tmp_path)
    with_name_bytes(files, character_set, [name] * 4)
    assert admit(files, STRICT).refusal == (
        f"PatientName of instance 1 does not decode in its SpecificCharacterSet {shown_set}, so the results would "
        "carry a changed name; the sender must correct it"
    )


UTF_8_NAME = "Müller^Jürgen".encode()
EUC_KR_NAME = b"Hong^Gildong=" + "홍^길동".encode("euc_kr")


@pytest.mark.parametrize(
    ("character_set", "name", "shown_set"),
    [
        ("ISO_IR192", UTF_8_NAME, "'ISO_IR192' (not a character set DICOM defines: plain ASCII only)"),
        ("ISO_IR 999", b"M\xfcller^J\xfcrgen", "'ISO_IR 999' (not a character set DICOM defines: plain ASCII only)"),
        (None, UTF_8_NAME, "(none given: plain ASCII only)"),
        ("", UTF_8_NAME, "(none given: plain ASCII only)"),
        ("ISO_IR 6", b"M\xfcller^J\xfcrgen", "'ISO_IR 6' (plain ASCII only)"),
        (
            ["", "ISO 2022 IR 149"],
            EUC_KR_NAME,  # no escape sequence before the Korean characters
            "'\\\\ISO 2022 IR 149' (plain ASCII except where an escape sequence switches character set)",
        ),
        (
            ["", "ISO 2022 IR 87"],
            b"DOE^\x1b(BJ\xfcRGEN",  # a Latin-1 byte after switching back to ASCII
            "'\\\\ISO 2022 IR 87' (plain ASCII except where an escape sequence switches character set)",
        ),
    ],
    ids=["misspelled-utf-8", "undefined", "absent", "empty", "iso-ir-6", "ir-149-without-escape", "after-esc-b"],
)
def test_a_name_beyond_ascii_under_no_default_or_undefined_character_set_is_refused_not_guessed(
    tmp_path, character_set, name, shown_set
):
    """pydicom reads such text as Latin-1, which decodes any byte: a UTF-8 or Korean name would reach the results
    as another name (MÃ¼ller^JÃ¼rgen, È«^±æµ¿) labelled as UTF-8. Refused, naming the attribute, the instance and
    the character set (never the name)."""
    files = series_files(tmp_path)
    with_name_bytes(files, character_set or "", [name] * 4)
    if character_set is None:
        without_character_set(files)
    assert admit(files, STRICT).refusal == (
        f"PatientName of instance 1 does not decode in its SpecificCharacterSet {shown_set}, so the results would "
        "carry a changed name; the sender must correct it"
    )


def without_character_set(files: list[InstanceFile]) -> None:
    """Remove SpecificCharacterSet from each file, its text left as written."""
    for file in files:
        ds = pydicom.dcmread(file.path)
        del ds.SpecificCharacterSet
        ds.save_as(file.path)
        assert "SpecificCharacterSet" not in pydicom.dcmread(file.path)


@pytest.mark.parametrize("character_set", ["ISO_IR192", "ISO_IR 999", None])
def test_an_ascii_name_under_an_undefined_or_no_character_set_is_admitted(tmp_path, character_set):
    """Plain ASCII reads the same in every character set: the label does not matter."""
    files = series_files(tmp_path)
    with_name_bytes(files, character_set or "", [b"Muller^Jurgen"] * 4)
    if character_set is None:
        without_character_set(files)
    assert admit(files, STRICT).admitted


@pytest.mark.parametrize(
    ("character_set", "name"),
    [
        ("UTF-8", UTF_8_NAME),  # a Python name for UTF-8, read as UTF-8
        ("ISO-IR 100", b"M\xfcller^J\xfcrgen"),  # a misspelling of ISO_IR 100 pydicom corrects
        (["", "ISO 2022 IR 149"], PersonName("Hong^Gildong=洪^吉洞=홍^길동", ["iso8859", "euc_kr"]).encode()),
        (
            ["", "ISO 2022 IR 87"],
            PersonName("Yamada^Tarou=山田^太郎=やまだ^たろう", ["iso8859", "iso2022_jp"]).encode(),
        ),
        ("GB18030", "Wang^XiaoDong=王^小东".encode("gb18030")),
    ],
    ids=["utf-8-label", "iso-ir-100-misspelled", "ir-149-with-escapes", "ir-87", "gb18030"],
)
def test_names_in_the_character_sets_read_today_are_still_admitted(tmp_path, character_set, name):
    files = series_files(tmp_path)
    with_name_bytes(files, character_set, [name] * 4)
    assert admit(files, STRICT).admitted


def test_instances_that_differ_only_in_the_character_set_spelling_are_refused_naming_it(tmp_path):
    """The same UTF-8 bytes under ISO_IR 192 and under ISO_IR192: the second reads as another name, and the
    refusal says why (its SpecificCharacterSet) rather than that the series holds two names."""
    files = series_files(tmp_path)
    with_name_bytes(files[0::2], "ISO_IR 192", [UTF_8_NAME] * 2)
    with_name_bytes(files[1::2], "ISO_IR192", [UTF_8_NAME] * 2)
    assert admit(files, STRICT).refusal == (
        "PatientName of instance 2 does not decode in its SpecificCharacterSet 'ISO_IR192' (not a character set "
        "DICOM defines: plain ASCII only), so the results would carry a changed name; the sender must correct it"
    )


def test_checking_identity_values_leaves_the_header_as_written():
    """Checking a value's count must not replace the bytes the identity comparison reads with the decoded text."""
    header = pydicom.Dataset()
    header.SpecificCharacterSet = "ISO_IR 192"
    tag = Tag(tag_for_keyword("PatientName"))
    header._dict[tag] = RawDataElement(tag, "PN", 6, b"DOE^\xc3\xbc", 0, False, True)

    assert _identity_value_problem(header, "PatientName") is None

    element = header.get_item(tag, keep_deferred=True)
    assert isinstance(element, RawDataElement) and element.value == b"DOE^\xc3\xbc"


@pytest.mark.parametrize(
    ("character_set", "name"),
    [
        (["", "ISO 2022 IR 87"], "Yamamoto^Tarou=山本^太郎=やまもと^たろう"),  # 本 is JIS 0x4B5C
        (["", "ISO 2022 IR 87"], "Bo^Bo=ボ^ぼ"),  # JIS 0x255C and 0x245C
        ("GB18030", "Wang^Jo=王^乗"),  # 乗 is 0x815C
        ("GBK", "Wang^Jo=王^乗"),
    ],
    ids=["jis-hon", "jis-bo", "gb18030", "gbk"],
)
def test_a_name_whose_encoded_characters_hold_a_backslash_byte_is_one_value(tmp_path, character_set, name):
    """A 0x5C byte inside a two-byte character is no value separator: the name is counted once decoded in its
    own character set (pydicom's default character set would split it into two values), quietly."""
    encoded = PersonName(name, convert_encodings(character_set)).encode()
    assert b"\\" in encoded
    files = series_files(tmp_path)
    with_name_bytes(files, character_set, [encoded] * 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert admit(files, STRICT).admitted
    assert [str(w.message) for w in caught] == []  # such as pydicom's "unknown escape sequence", naming no instance


def test_a_name_written_with_empty_trailing_components_is_the_same_name(tmp_path):
    """DOE^JOHN and DOE^JOHN^^^ name one patient (as the receiver compares a resent copy); DOE^JANE another."""
    files = series_files(tmp_path, patient_name="DOE^JOHN")
    rewrite(files[1], PatientName="DOE^JOHN^^^")
    assert admit(files, STRICT).admitted
    rewrite(files[2], PatientName="DOE^JANE")
    assert (admit(files, STRICT).refusal or "").startswith("PatientName differs within the series: 1 of 4")


def named(files: list[InstanceFile], *names: str) -> None:
    """Give each file the name at its place in ``names`` (the last for the rest), written in UTF-8."""
    for number, file in enumerate(files):
        ds = pydicom.dcmread(file.path)
        ds.SpecificCharacterSet, ds.PatientName = "ISO_IR 192", names[min(number, len(names) - 1)]
        ds.save_as(file.path)


@pytest.mark.parametrize(
    "other_spelling",
    ["MÜLLER^JÜRGEN", unicodedata.normalize("NFD", "Müller^Jürgen"), "müller^jürgen^^", "Müller^Jürgen=ミュラー"],
    ids=["upper-case", "decomposed-letters", "lower-case-padded", "with-a-group-more"],
)
def test_a_series_spelling_one_persons_name_two_ways_holds_one_patient(tmp_path, other_spelling):
    """A series completed by a PACS re-sending it with the name in its own form (many upper-case names) mixes two
    spellings of one person's name (db.names): admitted, as a series so spelt is admitted to the study."""
    files = series_files(tmp_path)
    named(files, "Müller^Jürgen", "Müller^Jürgen", other_spelling)

    assert admit(files, STRICT).refusal is None
    assert admit(files, STRICT, study_patient=StudyPatient("PHANTOM-1", patient_name="Müller^Jürgen")).refusal is None


def test_a_series_naming_two_people_by_the_names_rule_is_still_refused(tmp_path):
    """One instance naming another person in a component group the others carry: refused, and counted alone, not
    with the instances that only spell the same name otherwise."""
    files = series_files(tmp_path)
    named(files, "Yamada^Tarou=山田^太郎", "YAMADA^TAROU", "Yamada^Tarou=山田^太郎", "Yamada^Tarou=田中^次郎")

    assert admit(files, STRICT).refusal == (
        "PatientName differs within the series: 1 of 4 instances (first: instance 4) carry another value than the "
        "rest; one series must hold one patient"
    )


def test_a_spelling_of_the_series_naming_another_person_than_the_studys_is_refused(tmp_path):
    """The study is compared with the name the whole series carries, not its first image's: a series of
    YAMADA^TAROU and Yamada^Tarou=田中^次郎 (one person) names someone else than a study of Yamada^Tarou=山田^太郎."""
    files = series_files(tmp_path)
    named(files, "YAMADA^TAROU", "YAMADA^TAROU", "YAMADA^TAROU", "Yamada^Tarou=田中^次郎")

    refusal = admit(
        files, STRICT, study_patient=StudyPatient("PHANTOM-1", patient_name="Yamada^Tarou=山田^太郎")
    ).refusal

    assert refusal == (
        "the series' study already holds another patient's images (its PatientName differs from the study's); "
        "one study must hold one patient"
    )


def test_an_instance_without_a_name_in_a_named_series_is_still_refused(tmp_path):
    """Two spellings of one name agree; a name and none do not (the results must carry the one name)."""
    files = series_files(tmp_path)
    named(files, "Müller^Jürgen", "MÜLLER^JÜRGEN", "", "Müller^Jürgen")

    assert (admit(files, STRICT).refusal or "").startswith(
        "PatientName differs within the series: 1 of 4 instances (first: instance 3)"
    )


@pytest.mark.parametrize(
    ("orientation", "detail"),
    [
        ("2\\0\\0\\0\\2\\0", "lengths 2.000 and 2.000, cosine of their angle 0.000"),
        ("1\\0\\0\\0.6\\0.8\\0", "lengths 1.000 and 1.000, cosine of their angle 0.600"),
    ],
)
def test_an_orientation_that_is_not_orthonormal_is_refused(tmp_path, orientation, detail):
    files = series_files(tmp_path)
    rewrite(files[1], ImageOrientationPatient=orientation)
    assert admit(files, STRICT).refusal == (
        f"ImageOrientationPatient of instance 2 is not two perpendicular unit directions ({detail}); "
        "positions and contours computed from it would be wrong"
    )


def test_an_orientation_written_with_three_decimals_is_admitted(tmp_path):
    files = series_files(tmp_path)
    for file in files:
        rewrite(file, ImageOrientationPatient="0.940\\0.342\\0\\-0.342\\0.940\\0")  # 20 degrees, as rounded
    assert admit(files, STRICT).admitted


def test_a_volume_longer_than_any_ct_scan_is_refused(tmp_path):
    files = series_files(tmp_path, rows=64, columns=64, pixel_spacing=(50.0, 50.0), slice_spacing=50.0)
    assert admit(files, STRICT).refusal == (
        "the volume would measure 3200 x 3200 x 200 mm, longer than a CT scan can be (3000 mm along each "
        "axis at most); PixelSpacing or ImagePositionPatient is wrong"
    )


def test_a_pixel_spacing_written_in_centimetres_is_refused(tmp_path):
    """0.07 for 0.7 mm: a 256-pixel image 18 mm across, which would make every reported volume 100 times small."""
    files = series_files(tmp_path, rows=256, columns=256, pixel_spacing=(0.07, 0.07))
    assert admit(files, STRICT).refusal == (
        "the images would be 18 x 18 mm across (PixelSpacing 0.07 x 0.07 mm), narrower than the body regions the "
        "models segment (80 mm at least): a small field (dental, inner ear) is not for this node; otherwise "
        "PixelSpacing is wrong, perhaps written in centimetres"
    )


def test_a_narrow_field_of_128_pixels_is_refused(tmp_path):
    """A 128-pixel matrix at 0.35 mm (3.5 written as 0.35) is 45 mm across: refused as any clinical matrix is."""
    files = series_files(tmp_path, rows=128, columns=128, pixel_spacing=(0.35, 0.35))
    refusal = admit(files, STRICT).refusal
    assert refusal is not None and refusal.startswith("the images would be 45 x 45 mm across (PixelSpacing 0.35")


@pytest.mark.parametrize(
    ("matrix", "spacing", "diameter", "width"),
    [(96, 0.35, "336", 34), (512, 0.2, "358.4", 102)],
    ids=["under the clinical matrix", "wide enough to pass the width check"],
)
def test_a_pixel_spacing_far_from_the_reconstruction_diameter_is_refused(tmp_path, matrix, spacing, diameter, width):
    """PixelSpacing 0.35 where the ReconstructionDiameter says 3.5 mm pixels, 0.2 where it says 0.7: the width alone
    did not tell (a small matrix, or a field still 80 mm wide), and the result reported every volume many times
    small."""
    files = series_files(tmp_path, rows=matrix, columns=matrix, pixel_spacing=(spacing, spacing))
    for file in files:
        rewrite(file, ReconstructionDiameter=diameter)
    assert admit(files, STRICT).refusal == (
        f"instance 1 is {width} mm across ({matrix} x {matrix} pixels at PixelSpacing {spacing} x {spacing} mm) but "
        f"its ReconstructionDiameter says the reconstructed field is {diameter} mm: one of the two is wrong "
        "(PixelSpacing perhaps in centimetres), and every volume the node reported would be wrong with it; the "
        "sender must correct the series"
    )


@pytest.mark.parametrize("diameter", ["500", "250", "", "abc", "0", "nan"])
def test_a_reconstruction_diameter_near_the_width_or_unreadable_is_admitted(tmp_path, diameter):
    """A field cropped or padded afterwards stays within 2 times its diameter; an unreadable one is not judged."""
    files = series_files(tmp_path, rows=16, columns=16, pixel_spacing=(22.0, 22.0))  # 352 mm
    for file in files:
        rewrite(file, ReconstructionDiameter=diameter)
    assert admit(files, STRICT).admitted


def test_a_narrow_but_possible_field_is_admitted(tmp_path):
    """A 256-pixel image at 0.32 mm is 82 mm across, a temporal-bone field."""
    assert admit(series_files(tmp_path, rows=256, columns=256, pixel_spacing=(0.32, 0.32)), STRICT).admitted


def test_a_coarse_series_is_estimated_on_the_model_grid(tmp_path):
    """A 10 mm series is resampled up to ``total``'s 1.5 mm: 107 x 107 x 27 voxels, far more than its 16 x 16 x 4,
    each scored for 27 classes on a grid padded to one 128-voxel tile."""
    files = series_files(tmp_path, pixel_spacing=(10.0, 10.0), slice_spacing=10.0)
    result = admit(files, STRICT, model=TASK_FOOTPRINTS["total"])
    assert result.admitted
    classes = 27 * (128**3 * 2 + BYTES_PER_CLASS_TILE)
    assert result.estimated_bytes == 4 * 16 * 16 * (2 + 4 + 8) + 107 * 107 * 27 * (4 + 4 + 1 + 1) + classes


def test_an_enhanced_frame_whose_rescale_lacks_its_intercept_is_refused_not_read_as_intercept_0(tmp_path):
    """Slope and intercept come from one place per frame; the shared intercept does not fill in a per-frame gap."""
    files = series_files(tmp_path, enhanced=True)
    ds = pydicom.dcmread(files[0].path)
    for group in ds.PerFrameFunctionalGroupsSequence:
        item = pydicom.Dataset()
        item.RescaleSlope = "1"
        group.PixelValueTransformationSequence = [item]
    ds.save_as(files[0].path)
    assert admit(files, STRICT).refusal == (
        "frame 1 of instance 1 has RescaleSlope but no RescaleIntercept (per-frame functional group); "
        "its pixel values cannot be read as HU"
    )
    with pytest.raises(VolumeError, match=r"has RescaleSlope but no RescaleIntercept \(per-frame functional group\)"):
        load_series_volume([files[0].path])


def test_rescale_half_given_at_the_top_level_is_refused(tmp_path):
    files = series_files(tmp_path)
    ds = pydicom.dcmread(files[2].path)
    del ds.RescaleIntercept
    ds.save_as(files[2].path)
    assert admit(files, STRICT).refusal == (
        "instance 3 has RescaleSlope but no RescaleIntercept (top level); its pixel values cannot be read as HU"
    )


def test_a_rescale_type_other_than_hu_is_refused_and_hu_is_admitted(tmp_path):
    files = series_files(tmp_path)
    for file, unit in zip(files[:2], ("HU", "US"), strict=True):
        ds = pydicom.dcmread(file.path)
        ds.RescaleType = unit  # US: unspecified units, e.g. a scanner's raw attenuation values
        ds.save_as(file.path)
    assert admit(files, STRICT).refusal == (
        "RescaleType of instance 2 (top level) is 'US': its rescaled pixel values are not Hounsfield units, "
        "which the models and the reported mean HU need"
    )
    ds = pydicom.dcmread(files[1].path)
    ds.RescaleType = "HU"
    ds.save_as(files[1].path)
    assert admit(files, STRICT).admitted
    ds = pydicom.dcmread(files[0].path)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.RescaleType = "US"  # a scout left out of the volume: its unit is no reason to refuse the series
    ds.save_as(files[0].path)
    assert admit(files, STRICT).admitted


def test_a_gap_left_by_an_image_marked_localizer_names_it(tmp_path):
    """Image 4 of 8 marked LOCALIZER by mistake is left out of the volume: the gap it leaves once read as a slice
    missing, and the administrator looked for an image that had arrived."""
    files = series_files(tmp_path, slices=8)
    ds = pydicom.dcmread(files[3].path)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.save_as(files[3].path)
    refusal = admit(files, STRICT).refusal
    assert refusal is not None and refusal.startswith("about 1 missing slice(s): slices 3 and 4 (by position: ")
    assert refusal.endswith(
        "; 1 image(s) with LOCALIZER in their ImageType were left out of the volume (instance 4): an image marked "
        "so by mistake leaves such a gap though it arrived"
    )


def test_two_slices_at_one_position_are_named_where_each_slice_has_its_own_acquisition_number(tmp_path):
    """A scanner numbering every slice as its own acquisition, two at one position: once refused with a list of
    every AcquisitionNumber and "which one to process cannot be told", never naming the two images."""
    files = series_files(tmp_path, slices=6)
    positions = [pydicom.dcmread(file.path).ImagePositionPatient for file in files]
    for number, file in enumerate(files, start=1):
        ds = pydicom.dcmread(file.path)
        ds.AcquisitionNumber = number
        if number == 4:
            ds.ImagePositionPatient = positions[2]
        ds.save_as(file.path)
    refusal = admit(files, STRICT).refusal
    assert refusal is not None and refusal.startswith(
        "1 slice position(s) occur twice in one acquisition: instance 3 and instance 4 are both at ImagePositionPatient"
    )


def test_a_series_of_another_patient_than_its_study_is_refused(tmp_path):
    """A study already recorded for PHANTOM-1 cannot take a series of someone else (a StudyInstanceUID collision)."""
    files = series_files(tmp_path)
    assert admit(files, STRICT, study_patient=StudyPatient("PHANTOM-1")).admitted
    refusal = admit(files, STRICT, study_patient=StudyPatient("SOMEONE-ELSE")).refusal
    assert refusal == (
        "the series' study already holds another patient's images (its PatientID differs from the study's); "
        "one study must hold one patient"
    )


STUDY_PATIENT_FIELDS = {
    "PatientName": "patient_name",
    "PatientBirthDate": "patient_birth_date",
    "PatientSex": "patient_sex",
}


@pytest.mark.parametrize(
    ("keyword", "recorded", "sent"),
    [("PatientName", "DOE^JOHN", "DOE^JANE"), ("PatientBirthDate", "19500101", "19800202"), ("PatientSex", "M", "F")],
)
def test_a_series_under_its_studys_patient_id_with_another_name_birth_date_or_sex_is_refused(
    tmp_path, keyword, recorded, sent
):
    """The study's answers (queries, the console) would name the first patient while this series' results name
    another: refused as a re-sent instance with another identity is, the values never named."""
    files = series_files(tmp_path)
    for file in files:
        rewrite(file, **{keyword: sent})
    field = STUDY_PATIENT_FIELDS[keyword]

    refusal = admit(files, STRICT, study_patient=StudyPatient("PHANTOM-1", **{field: recorded})).refusal

    assert refusal == (
        f"the series' study already holds another patient's images (its {keyword} differs from the study's); "
        "one study must hold one patient"
    )
    assert admit(files, STRICT, study_patient=StudyPatient("PHANTOM-1", **{field: sent})).admitted


@pytest.mark.parametrize(
    ("recorded", "sent"),
    [
        (StudyPatient("PHANTOM-1", None, None, None, None), {"PatientName": "DOE^JANE", "PatientSex": "F"}),
        (
            StudyPatient("PHANTOM-1", None, "DOE^JANE", "19800202", "F"),
            {"PatientName": "", "PatientBirthDate": "", "PatientSex": ""},
        ),
        (StudyPatient("PHANTOM-1", None, "DOE^JANE^^^", None, None), {"PatientName": "DOE^JANE"}),
    ],
    ids=["study-recorded-none", "series-sends-none", "empty-trailing-name-components"],
)
def test_a_value_missing_on_one_side_or_padded_is_no_other_patient(tmp_path, recorded, sent):
    files = series_files(tmp_path)
    for file in files:
        rewrite(file, **sent)
    assert admit(files, STRICT, study_patient=recorded).admitted


@pytest.mark.parametrize(
    ("recorded", "sent", "admitted"),
    [
        ("=山田^太郎", "Tanaka^Ichiro", False),  # no group both carry: nothing shows them to be one person
        ("Yamada^Tarou=山田^太郎", "Yamada^Tarou=田中^次郎", False),
        ("Yamada^Tarou=山田^太郎", "YAMADA^TAROU", True),
        ("=山田^太郎", "Yamada^Tarou=山田^太郎=やまだ^たろう", True),
        ("Müller^Jürgen", "MÜLLER^JÜRGEN", True),  # letter case beyond ASCII
        ("Müller^Jürgen", unicodedata.normalize("NFD", "Müller^Jürgen"), True),  # ü as u and a combining diaeresis
    ],
    ids=["no-shared-group", "other-ideographic", "alphabetic-only", "more-groups", "upper-case-umlauts", "nfd"],
)
def test_names_are_one_person_only_where_they_share_a_component_group_and_differ_in_none(
    tmp_path, recorded, sent, admitted
):
    files = series_files(tmp_path)
    for file in files:
        ds = pydicom.dcmread(file.path)
        ds.SpecificCharacterSet, ds.PatientName = "ISO_IR 192", sent
        ds.save_as(file.path)

    refusal = admit(files, STRICT, study_patient=StudyPatient("PHANTOM-1", patient_name=recorded)).refusal

    assert refusal == (
        None
        if admitted
        else "the series' study already holds another patient's images (its PatientName differs from the study's); "
        "one study must hold one patient"
    )


@pytest.mark.parametrize(
    ("study_issuer", "series_issuer", "admitted"),
    [
        ("HOSPITAL_A", "HOSPITAL_A", True),
        ("HOSPITAL_A", "HOSPITAL_B", False),  # PHANTOM-1 of another hospital's numbering: another patient
        ("HOSPITAL_A", None, True),  # an issuer only one side sends names no other patient
        (None, "HOSPITAL_B", True),
    ],
)
def test_the_same_patient_id_from_another_issuer_is_another_patient(tmp_path, study_issuer, series_issuer, admitted):
    files = series_files(tmp_path)
    for file in files:
        ds = pydicom.dcmread(file.path)
        if series_issuer is not None:
            ds.IssuerOfPatientID = series_issuer
        ds.save_as(file.path)
    result = admit(files, STRICT, study_patient=StudyPatient("PHANTOM-1", study_issuer))
    if admitted:
        assert result.admitted
    else:
        assert result.refusal == (
            "the series' study already holds another patient's images (its IssuerOfPatientID differs from the "
            "study's); one study must hold one patient"
        )


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (
            {"RescaleIntercept": "0", "PixelRepresentation": "0"},
            "instance 1 has RescaleSlope 1 and RescaleIntercept 0 (top level); with unsigned 16-bit pixels its values "
            "start at 0 HU, so it cannot show air",
        ),
        (
            {"RescaleIntercept": "-40000"},
            "instance 1 has RescaleSlope 1 and RescaleIntercept -40000 (top level); with signed 16-bit pixels its "
            "values end at -7,233 HU, so it cannot show water (0 HU)",
        ),
        ({"PixelRepresentation": "2"}, "PixelRepresentation of instance 1 is 2; it must be 0 (unsigned) or 1"),
        ({"PixelPaddingValue": "1024"}, "instance 1: its padding (PixelPaddingValue 1024) reads as 0 HU"),
        ({"PixelPaddingValue": "1\\2"}, "instance 1: its PixelPaddingValue cannot be read as one whole number"),
    ],
)
def test_pixel_values_that_cannot_be_hounsfield_units_are_refused(tmp_path, change, reason):
    files = series_files(tmp_path)
    for file in files:
        ds = pydicom.dcmread(file.path)
        for keyword, value in change.items():
            vr = "SS" if keyword == "PixelPaddingValue" else dictionary_VR(keyword)
            ds.add_new(keyword, vr, [int(v) for v in value.split("\\")] if vr in ("SS", "US") else value)
        ds.save_as(file.path)
    refusal = admit(files, STRICT).refusal or ""
    assert refusal.startswith(reason), refusal


@pytest.mark.parametrize(
    ("keyword", "text", "form"),
    [
        ("StudyDate", "05.01.24", "a date in the DICOM form YYYYMMDD"),
        ("StudyDate", "20240230", "a date in the DICOM form YYYYMMDD"),  # February has no 30th
        ("PatientBirthDate", "1970", "a date in the DICOM form YYYYMMDD"),
        ("StudyTime", "25:61", "a time in the DICOM form HHMMSS.FFFFFF"),
        ("PatientBirthTime", "2500", "a time in the DICOM form HHMMSS.FFFFFF"),
    ],
)
def test_dates_and_times_the_results_copy_must_be_valid(tmp_path, keyword, text, form):
    """Encoding the results would fail on them after inference; admission says which attribute, never its value."""
    files = series_files(tmp_path)
    for file in files:
        rewrite(file, **{keyword: text})
    refusal = admit(files, STRICT).refusal or ""
    assert refusal == (
        f"{keyword} of instance 1 is not {form}; the results carry it, so the sender (or the RIS) must correct it"
    )
    for file in files:
        rewrite(file, **{keyword: {"StudyDate": "20240105", "PatientBirthDate": "19700101"}.get(keyword, "083000.5")})
    assert admit(files, STRICT).admitted


def test_a_patient_sex_the_results_cannot_carry_is_refused_without_naming_it(tmp_path):
    """Encoding the results failed on PatientSex QQ after inference, quoting the library ("'QQ' is not a valid
    PatientSexValues")."""
    files = series_files(tmp_path)
    for file in files:
        rewrite(file, PatientSex="QQ")
    assert admit(files, STRICT).refusal == (
        "PatientSex of instance 1 is not M, F, O or empty; the results carry it, so the sender (or the RIS) must "
        "correct it"
    )
    for file in files:
        rewrite(file, PatientSex="O")
    assert admit(files, STRICT).admitted


def test_missing_rescale_follows_the_setting(tmp_path):
    files = series_files(tmp_path)
    for file in files:
        ds = pydicom.dcmread(file.path)
        del ds.RescaleSlope, ds.RescaleIntercept
        ds.save_as(file.path)
    assert "no RescaleSlope/RescaleIntercept" in (admit(files, STRICT).refusal or "")
    lenient = admit(files, AdmissionSettings(missing_rescale="assume_identity"))
    assert lenient.admitted
    assert lenient.warnings == [
        "rescale attributes missing: pixel values were read as HU with slope 1 and intercept 0 "
        "(admission.missing_rescale: assume_identity)"
    ]


def test_a_modality_lut_instead_of_rescale_is_refused_whatever_missing_rescale_says(tmp_path):
    """With assume_identity, images giving HU = 2 x stored through a Modality LUT Sequence were read with slope 1:
    air at -512 HU, bone at 919 instead of 1839, with only the generic warning."""
    from pydicom.dataset import Dataset

    files = series_files(tmp_path)
    for file in files:
        ds = pydicom.dcmread(file.path)
        del ds.RescaleSlope, ds.RescaleIntercept
        lut = Dataset()
        lut.add_new(0x00283002, "US", [4096, 0, 16])  # LUTDescriptor
        lut.ModalityLUTType = "HU"
        lut.add_new(0x00283006, "US", list(range(0, 8192, 2)))  # LUTData: HU = 2 x stored
        ds.ModalityLUTSequence = [lut]
        ds.save_as(file.path)
    said = (
        "instance 1 gives its pixel values' meaning through a Modality LUT Sequence (0028,3000), which the node does "
        "not apply, and has no RescaleSlope/RescaleIntercept: its pixel values cannot be read as HU (whatever "
        "admission.missing_rescale says)"
    )
    assert admit(files, AdmissionSettings(missing_rescale="assume_identity")).refusal == said
    assert admit(files, STRICT).refusal == said


@pytest.mark.parametrize(
    ("keyword", "vr", "dtype"), [("FloatPixelData", "OF", "<f4"), ("DoubleFloatPixelData", "OD", "<f8")]
)
def test_floating_point_pixels_are_refused_saying_so(tmp_path, keyword, vr, dtype):
    """Was refused as `instance 1 has no BitsStored`, which a float image rightly lacks."""
    files = series_files(tmp_path)
    for file in files:
        ds = pydicom.dcmread(file.path)
        pixels = ds.pixel_array.astype(dtype) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.RescaleSlope, ds.RescaleIntercept
        ds.BitsAllocated = 32 if vr == "OF" else 64
        ds.add_new(Tag(keyword), vr, pixels.tobytes())
        ds.save_as(file.path)
    assert admit(files, STRICT).refusal == (
        f"instance 1 holds floating-point pixels ({keyword}), which CT images do not use: the node reads integer "
        "Pixel Data with RescaleSlope and RescaleIntercept"
    )


def test_instance_cap_refuses_before_reading_any_file(tmp_path):
    files = [InstanceFile(tmp_path / f"absent{i}.dcm", f"1.2.{i}", str(ExplicitVRLittleEndian), i) for i in range(5)]
    result = admit(files, AdmissionSettings(max_instances=4))
    assert result.refusal == "the series has 5 images; at most 4 are processed (admission.max_instances)"


def test_memory_limit_is_checked_from_headers(tmp_path):
    files = series_files(tmp_path)
    result = admit(files, AdmissionSettings(max_memory_gigabytes=10 / 1024**3), model=THRESHOLD_FOOTPRINT)  # 10 bytes
    assert result.refusal == (
        "processing 4 images of 16 x 16 pixels needs about 0.0 MB of memory, over the 0.0 MB limit "
        "(admission.max_memory_gigabytes)"
    )


def test_missing_file_is_named(tmp_path):
    files = series_files(tmp_path)
    files[2].path.unlink()
    assert admit(files, STRICT).refusal == "the file of instance 3 is missing from storage"


def test_native_pixel_data_shorter_than_header_is_refused_at_store(tmp_path):
    path = write_phantom_series(tmp_path, PhantomSpec(rows=16, columns=16, slices=2)).files[0]
    encoded = data_set_bytes(path)
    with pytest.raises(InvalidInstance) as refused:
        read_header(encoded[:-100], ExplicitVRLittleEndian)
    assert str(refused.value) == (
        "Pixel Data is truncated: 412 of 512 bytes (Rows 16 x Columns 16 x SamplesPerPixel 1 x BitsAllocated 16 "
        "x 1 frame(s))"
    )
    assert refused.value.status == 0xC000


@pytest.mark.parametrize(
    ("keyword", "text", "reason"),
    [
        ("SeriesNumber", "99999999999999999999", "SeriesNumber '99999999999999999999' is out of range"),
        ("InstanceNumber", "2147483648", "InstanceNumber '2147483648' is out of range"),
        ("AccessionNumber", "A" * 17, "AccessionNumber is 17 characters long"),
        ("PatientID", "P" * 65, "PatientID is 65 characters long; at most 64 are accepted"),
        ("IssuerOfPatientID", "P" * 65, "IssuerOfPatientID is 65 characters long; at most 64 are accepted"),
    ],
)
def test_values_the_database_cannot_hold_are_refused(tmp_path, keyword, text, reason):
    path = write_phantom_series(tmp_path, PhantomSpec(rows=16, columns=16, slices=2)).files[0]
    rewrite(InstanceFile(path, "", ""), **{keyword: text})
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    with pytest.raises(InvalidInstance) as refused:
        check_header(ds, str(ds.SOPClassUID), str(ds.SOPInstanceUID))
    assert str(refused.value).startswith(reason)
    assert "P" * 65 not in str(refused.value)


def test_over_long_description_is_recorded_shortened(tmp_path):
    path = write_phantom_series(tmp_path, PhantomSpec(rows=16, columns=16, slices=2)).files[0]
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ds.SeriesDescription = "x" * 80
    header = check_header(ds, str(ds.SOPClassUID), str(ds.SOPInstanceUID))
    assert header.series.series_description == "x" * 64


@pytest.mark.parametrize(
    ("encoded", "reason"),
    [
        (b"", "not a DICOM data set: it is empty (0 bytes)"),
        (bytes(300), "not a DICOM data set: no preamble/meta, no recognisable element"),
        (bytes(128) + b"DICM" + bytes(40), "not a DICOM data set: it starts with a file preamble and meta header"),
    ],
)
def test_junk_is_named_as_not_a_data_set(encoded, reason):
    with pytest.raises(InvalidInstance) as refused:
        read_header(encoded, ExplicitVRLittleEndian)
    assert str(refused.value).startswith(reason)


def test_refused_admission_goes_from_complete_to_failed_with_an_event(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    sessions = make_session_factory(make_engine(url))
    with transaction(sessions) as session:
        series = Series(series_instance_uid="1.2.3", study=Study(study_instance_uid="1.2"))
        job = jobs.open_job(session, series)
        jobs.mark_complete(session, job, "quiet")
        jobs.append_warnings(job, ["partial series: 2 of 4", "processed 3 of 4 images: dropped a localizer"])
        jobs.append_warnings(job, ["other stage's warning", "partial series: 2 of 4"])
        jobs.append_warnings(job, ["partial series: 3 of 4"], replacing=is_partial_series_warning)
        jobs.refuse_admission(session, job, "RescaleSlope of instance 2 is 0")
    with sessions() as session:
        job = session.scalars(select(Job)).one()
        assert job.state is JobState.FAILED
        assert job.reason == "not admitted: RescaleSlope of instance 2 is 0"
        assert job.warnings == [
            "processed 3 of 4 images: dropped a localizer",
            "other stage's warning",
            "partial series: 3 of 4",
        ]
        events = [e.to_state for e in session.scalars(select(JobEvent).order_by(JobEvent.id))]
        assert events == [JobState.RECEIVING, JobState.COMPLETE, JobState.FAILED]


def test_an_enhanced_frame_giving_pixel_spacing_both_per_frame_and_shared_differently_is_refused(tmp_path):
    """Shared PixelMeasures says 0.8 mm, frame 2's own says 0.5 mm: one is wrong, and which cannot be told."""
    files = series_files(tmp_path, enhanced=True)
    ds = pydicom.dcmread(files[0].path)
    shared, own = pydicom.Dataset(), pydicom.Dataset()
    shared.PixelSpacing, own.PixelSpacing = ["0.8", "0.8"], ["0.5", "0.5"]
    shared.SliceThickness = own.SliceThickness = "5"
    ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence[1].PixelMeasuresSequence = [own]
    ds.save_as(files[0].path)
    assert admit(files, STRICT).refusal == (
        "frame 2 of instance 1 gives its PixelSpacing (PixelMeasuresSequence) both in its per-frame functional "
        "group and in the shared one, with different values: DICOM allows one place, and which value is right "
        "cannot be told"
    )
    own.PixelSpacing, own.SpacingBetweenSlices = ["0.800", "0.80"], "5"  # the same values, written otherwise
    ds.PerFrameFunctionalGroupsSequence[1].PixelMeasuresSequence = [own]
    ds.save_as(files[0].path)
    assert admit(files, STRICT).admitted


def test_a_series_where_only_some_images_carry_rescale_values_is_refused_even_when_missing_ones_are_assumed(tmp_path):
    """Air would read 0 HU on some slices and -1024 on the others: one volume with two HU scales."""
    files = series_files(tmp_path)
    for file in files[:2]:
        ds = pydicom.dcmread(file.path)
        del ds.RescaleSlope, ds.RescaleIntercept
        ds.save_as(file.path)
    assume = AdmissionSettings(missing_rescale="assume_identity")
    assert admit(files, assume, modality="CT").refusal == (
        "2 of 4 images have no RescaleSlope/RescaleIntercept (first: instance 1) while the others have them: "
        "their pixel values cannot be read on the same HU scale"
    )
    for file in files[2:]:
        ds = pydicom.dcmread(file.path)
        del ds.RescaleSlope, ds.RescaleIntercept
        ds.save_as(file.path)
    assert admit(files, assume, modality="CT").admitted  # none has them: read as slope 1, with a warning


def test_slice_positions_in_centimetres_are_refused_by_their_step_against_slice_thickness(tmp_path):
    """5 mm slices 0.5 'mm' apart: the positions are in centimetres and every volume would be 10 times too small."""
    files = series_files(tmp_path, slice_spacing=0.5)
    for file in files:
        ds = pydicom.dcmread(file.path)
        ds.SliceThickness = "5"
        ds.save_as(file.path)
    assert admit(files, STRICT).refusal == (
        "the slices are 0.5 mm apart (ImagePositionPatient) but 5 mm thick (SliceThickness): a step more than 8 "
        "times finer than the slices means the positions are not in millimetres (perhaps centimetres), so every "
        "volume would be wrong, or the images are thick slabs (MIP or MPR), which the models do not segment"
    )
    overlapping = series_files(tmp_path / "overlap", slice_spacing=1.25)  # 5 mm slices every 1.25 mm: admitted
    for file in overlapping:
        ds = pydicom.dcmread(file.path)
        ds.SliceThickness = "5"
        ds.save_as(file.path)
    assert admit(overlapping, STRICT).admitted
    localizer = pydicom.dcmread(overlapping[0].path)  # a scout's own thickness, listed first, does not count
    localizer.ImageType, localizer.SliceThickness = ["ORIGINAL", "PRIMARY", "LOCALIZER"], "50"
    localizer.SOPInstanceUID = pydicom.uid.generate_uid()
    localizer.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    localizer.save_as(tmp_path / "scout.dcm")
    scout = InstanceFile(tmp_path / "scout.dcm", str(localizer.SOPInstanceUID), overlapping[0].transfer_syntax_uid, 0)
    assert admit([scout, *overlapping], STRICT).admitted


def test_slices_far_apart_for_their_thickness_are_refused_as_a_sparse_series(tmp_path):
    """3 mm slices 30 mm apart reached DONE with a body of 44,689 ml: nine tenths of the range was never imaged,
    and the segmentation and every volume were interpolated across it. A gap as wide as the slices is admitted."""

    def thickness(files: list[InstanceFile], value: str) -> list[InstanceFile]:
        for file in files:
            ds = pydicom.dcmread(file.path)
            ds.SliceThickness = value
            ds.save_as(file.path)
        return files

    sparse = thickness(series_files(tmp_path / "sparse", slice_spacing=30.0), "3")
    assert admit(sparse, STRICT).refusal == (
        "the slices are 30 mm apart (ImagePositionPatient) but only 3 mm thick (SliceThickness): 90% of the scanned "
        "range lies between slices and was never imaged (a sparse series, such as high-resolution lung CT), so the "
        "segmentation would be interpolated across the gaps and every volume in the report would count tissue "
        "nobody imaged; send a contiguous reconstruction"
    )
    assert admit(thickness(series_files(tmp_path / "gap", slice_spacing=10.0), "5"), STRICT).admitted


@pytest.mark.parametrize(
    ("acquisitions", "thicknesses", "refused"),
    [
        # every slice its own acquisition: checked together
        ("12345678", [5] * 8, "the slices are 0.5 mm apart (ImagePositionPatient) but 5 mm"),
        # step-and-shoot blocks: each block checked
        ("11112222", [5] * 8, "AcquisitionNumber 1: the slices are 0.5 mm apart (ImagePositionPatient) but 5 mm"),
        # two reconstructions interleaved, each 1 mm apart: admitted
        ("12121212", [5] * 8, None),
        # thin slices, and a smaller acquisition of 20 mm slabs that the volume leaves out: admitted
        ("11111122", [0.5] * 6 + [20] * 2, None),
    ],
)
def test_the_step_against_slice_thickness_is_checked_in_a_series_of_several_acquisitions(
    tmp_path, acquisitions, thicknesses, refused
):
    """Several AcquisitionNumbers skipped the check, so centimetre positions reached DONE with volumes 10 times
    too small; the volume assembler checks its stack, not the step. Only the acquisitions it keeps count."""
    files = series_files(tmp_path, slices=8, slice_spacing=0.5)
    for file, acquisition, thickness in zip(files, acquisitions, thicknesses, strict=True):
        ds = pydicom.dcmread(file.path)
        ds.SliceThickness, ds.AcquisitionNumber = str(thickness), acquisition
        ds.save_as(file.path)
    refusal = admit(files, STRICT).refusal
    if refused is None:
        assert refusal is None
    else:
        assert refusal is not None and refusal.startswith(refused), refusal


def test_a_multi_frame_image_without_per_frame_functional_groups_is_refused_with_the_reason(tmp_path):
    files = series_files(tmp_path)
    ds = pydicom.dcmread(files[1].path)
    ds.NumberOfFrames, ds.PixelData = 2, ds.PixelData * 2
    ds.save_as(files[1].path)
    assert admit(files, STRICT).refusal == (
        "instance 2 has 2 frames (NumberOfFrames) but no Per-frame Functional Groups Sequence, so where each frame "
        "lies cannot be told"
    )


def test_values_written_to_another_precision_are_one_orientation_one_spacing_and_one_acquisition(tmp_path):
    """0.00049 and 0.00051, 0.9765625 and 0.97656, an empty and an absent AcquisitionNumber: the same values
    written differently, admitted and read into one volume of every image, not refused as two kinds."""
    files = series_files(tmp_path, rows=64, columns=64, pixel_spacing=(0.9765625, 0.9765625))
    for number, file in enumerate(files):
        ds = pydicom.dcmread(file.path)
        ds.ImageOrientationPatient = [1, 0, 0.00049 if number % 2 else 0.00051, 0, 1, 0]  # two of each
        if number == len(files) - 1:
            ds.PixelSpacing = ["0.97656", "0.97656"]
        if number % 2:
            ds.AcquisitionNumber = None
        elif "AcquisitionNumber" in ds:
            del ds.AcquisitionNumber
        ds.save_as(file.path)
    assert admit(files, STRICT).admitted
    volume = load_series_volume([file.path for file in files], allow_partial=False)
    assert volume.hu.shape[0] == len(files) and not volume.notes


def test_slice_positions_too_far_to_subtract_are_refused_by_what_they_say(tmp_path):
    """z = +/-1e308 makes the steps overflow to infinity, which every comparison used to let through."""
    files = series_files(tmp_path)
    for file, z in zip(files, ("-1e308", "-1e307", "1e307", "1e308"), strict=True):
        rewrite(file, ImagePositionPatient=f"0\\0\\{z}")
    expected = (
        "ImagePositionPatient puts slices more than 100,000 mm from the scanner's origin, which no CT can: the "
        "positions are wrong"
    )
    assert admit(files, STRICT).refusal == expected
    with pytest.raises(VolumeError, match="more than 100,000 mm from the scanner's origin"):
        load_series_volume([file.path for file in files])


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("A^B^C^D^E^F^G", "has 7 components (^), where a name has at most 5 (family, given, middle, prefix, suffix)"),
        ("A=B=C=D", "has 4 component groups (=), where a name has at most 3"),
        ("DOE^" + "J" * 70, "has a component group of 74 characters, where at most 64 are allowed"),
        ("Yamada^Tarou=山田^太郎=やまだ^たろう", None),
        ("DOE^JOHN^^^", None),
    ],
)
def test_a_patient_name_that_breaks_the_person_name_form_is_refused(tmp_path, name, problem):
    """The results carry PatientName unchanged: seven components reached the SEG, SR and RTSTRUCT, which dciodvfy
    refused ("Too many delimiters (^) in PersonName"), and so may a PACS."""
    files = series_files(tmp_path)
    for file in files:
        ds = pydicom.dcmread(file.path)
        ds.SpecificCharacterSet = ["ISO_IR 192"]
        ds.PatientName = name
        ds.save_as(file.path)
    refusal = admit(files, STRICT).refusal
    if problem is None:
        assert refusal is None
    else:
        assert refusal == f"PatientName of instance 1 {problem}; the sender must correct it"


def test_oblique_images_past_30_degrees_are_refused_before_they_are_queued(tmp_path):
    turned = np.radians(40)
    orientation = (np.cos(turned), np.sin(turned), 0.0, -np.sin(turned), np.cos(turned), 0.0)
    refusal = admit(series_files(tmp_path / "40", orientation=orientation), STRICT).refusal or ""
    assert refusal.startswith("the images are turned about 40 degrees from the patient's axes"), refusal
    turned = np.radians(20)
    orientation = (np.cos(turned), np.sin(turned), 0.0, -np.sin(turned), np.cos(turned), 0.0)
    assert admit(series_files(tmp_path / "20", orientation=orientation), STRICT).admitted  # the volume notes it


MEASURE_SEGMENT = """
import resource, sys
from pathlib import Path
import numpy as np, torch
from inference.models.totalsegmentator import TotalSegmentatorModel
from inference.volume import Volume

class Heads(torch.nn.Module):  # the network's output shape, without its compute
    def __init__(self, heads):
        super().__init__(); self.heads = heads; self.p = torch.nn.Parameter(torch.zeros(1))
    def load_state_dict(self, *args, **kwargs):
        return None
    def forward(self, x):
        return torch.zeros((x.shape[0], self.heads, *x.shape[2:]), dtype=x.dtype)

model = TotalSegmentatorModel("total_fast", Path(sys.argv[1]), device="cpu", backend="torch")
for predictor, _ in model.predictors:
    predictor.network = Heads(int(predictor.label_manager.num_segmentation_heads))
hu = np.full((50, 100, 100), -1000, dtype=np.float32)
hu[:, 25:75, 25:75] = 40
volume = Volume(hu=hu, origin=np.zeros(3), spacing=np.array([3.0, 3.0, 3.0]), direction=np.eye(3), slices=[],
                frame_of_reference_uid=None, study_instance_uid="1", series_instance_uid="2")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model.segment(volume)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_memory_estimate_covers_a_real_segmentation_of_a_model_with_many_classes(total_fast_test_weights):
    """The real ``total_fast`` segment (118 classes; the network's forward pass stubbed) of a 100 x 100 x 50 volume
    at 3 mm grows the worker by more than the series' stored pixels: its estimate covers that growth."""
    run = subprocess.run(
        [sys.executable, "-c", MEASURE_SEGMENT, str(total_fast_test_weights)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    grown = int(run.stdout.split()[-1])
    frame = _Frame("", (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), (3.0, 3.0), (100, 100), 2, False)
    frames = [frame] * 50
    estimate = _memory_estimate(frames, (300.0, 300.0, 150.0), TASK_FOOTPRINTS["total_fast"])
    assert grown > 1024**3  # the 118 classes' scores, not the 2 MB of pixels
    assert estimate >= grown


def test_memory_estimate_is_of_the_routed_model():
    """A series routed to ``total_fast`` is estimated with its 118 classes on its 3 mm grid; one whose model is not
    known, with the finest grid and most classes of the configured models."""
    models = {
        "fast": TotalSegmentatorModelSettings(kind="totalsegmentator", task="total_fast"),
        "full": TotalSegmentatorModelSettings(kind="totalsegmentator", task="total"),
        "baseline": ThresholdModelSettings(kind="threshold"),
    }
    assert model_footprint(models, "fast") == ModelFootprint(3.0, 118)
    assert model_footprint(models, "baseline") == ModelFootprint(None, 0)
    assert model_footprint(models, None) == ModelFootprint(1.5, 118)


def test_config_check_warns_when_the_memory_limit_refuses_every_series_of_a_model(tmp_path):
    """On a small machine (admission.max_memory_gigabytes 3) every total_fast series was refused, and nothing said
    so before the first one was."""
    from tests.conftest import DICOM_NODE

    config = tmp_path / "config.yaml"
    config.write_text(
        f"storage: {{directory: {tmp_path / 'storage'}}}\n"
        "admission: {max_memory_gigabytes: 3}\n"
        "models:\n"
        "  fast: {kind: totalsegmentator, task: total_fast}\n"
        "  full: {kind: totalsegmentator, task: total}\n"
        "rules:\n"
        "  - {name: ct, match: {modality: CT}, action: process, model: fast}\n"
    )

    checked = subprocess.run(
        [DICOM_NODE, "config", "check", "--config", str(config)], capture_output=True, text=True, timeout=60
    )

    assert checked.returncode == 0, checked.stderr
    said = " ".join(checked.stdout.split())
    assert (
        "warning: model 'fast' (TotalSegmentator total_fast) needs about 3.7 GB of memory for the scores of its 118 "
        "classes even for the smallest series, more than admission.max_memory_gigabytes (3 GB): every series routed "
        "to it is refused."
    ) in said, said
    assert "model 'full'" not in said.replace("model 'full' cannot be loaded", "")  # 0.9 GB: within the limit


def test_serve_warns_at_start_when_the_memory_limit_refuses_every_series_of_a_model(start_node):
    node = start_node(
        admission={"max_memory_gigabytes": 3},
        models={"fast": {"kind": "totalsegmentator", "task": "total_fast"}},
        inference={"workers": 0},
    )
    log = node.log()
    assert "WARNING config.memory_too_small hint=\"model 'fast' (TotalSegmentator total_fast) needs about 3.7 GB" in log
