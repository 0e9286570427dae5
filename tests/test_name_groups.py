"""One person per study, whatever character sets and spellings a name comes in.

A name is up to three component groups (alphabetic, ideographic, phonetic). Two names are one person's only where
they share a group and differ in none both carry, letter case and composed or decomposed letters aside
(:mod:`db.names`). A study takes each group from the first series carrying it, so a later series naming someone else
in that group is refused; and Query/Retrieve serves every image admission took as the study patient's.

The node is a real ``dicom-node serve``; the images are the real CT of the shared fixtures, renamed; the peers are
DCMTK storescu, findscu and getscu.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from db.jobs import job_for_series_uid
from db.models import Instance, JobState, RejectedInstance, Series, Study
from tests.conftest import CT_RULES, Node, free_port, storescu
from tests.test_qr_identity import _find, _get, _node

SLICES = 3


def _series(folder: Path, fixtures: Path, study_uid: str, name: str, character_set: str | None) -> tuple[str, list]:
    """Three slices of the real CT under ``study_uid``, PatientID PID-N, named ``name`` in ``character_set``;
    the series' UID and files."""
    folder.mkdir(parents=True)
    series_uid = generate_uid()
    files = []
    for number, source in enumerate(sorted((fixtures / "example_ct_dicom_valid").glob("*.dcm"))[:SLICES]):
        dataset = pydicom.dcmread(source)
        if character_set is None:
            del dataset.SpecificCharacterSet
        else:
            dataset.SpecificCharacterSet = character_set
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study_uid, series_uid
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        dataset.PatientID, dataset.PatientName = "PID-N", name
        target = folder / f"{number}.dcm"
        dataset.save_as(target, enforce_file_format=True)
        files.append(target)
    return series_uid, files


def _send_study(node: Node, folder: Path, fixtures: Path, names: list[tuple[str, str | None]]) -> tuple[str, list]:
    """Send one series per (name, character set), one after the other; the study's UID and, per series, its UID
    and whether every instance was acknowledged."""
    study_uid, sent = generate_uid(), []
    for number, (name, character_set) in enumerate(names):
        series_uid, files = _series(folder / str(number), fixtures, study_uid, name, character_set)
        output = storescu(node.port, files, extra=["-xv"])  # the fixture is JPEG 2000 lossless
        sent.append((series_uid, output.returncode == 0))
    return study_uid, sent


def _study_name(node: Node, study_uid: str) -> str | None:
    with node.sessions() as session:
        return session.scalar(select(Study.patient_name).where(Study.study_instance_uid == study_uid))


KANJI = "\\ISO 2022 IR 87"


@pytest.mark.integration
def test_a_series_naming_another_person_in_a_group_the_study_took_or_sharing_no_group_is_refused(
    start_node, tmp_path, shared_fixtures
) -> None:
    """Yamada^Tarou, then Yamada^Tarou=山田^太郎, then Yamada^Tarou=田中^次郎: the study stayed Yamada^Tarou, all three
    were admitted and served. =山田^太郎 then Tanaka^Ichiro (no group in common): both admitted. Now the study takes
    =山田^太郎 from the second series, whichever comes first, and the third, like Tanaka^Ichiro, is refused."""
    node = _node(start_node, free_port(), rules=CT_RULES)
    richer_last = [("Yamada^Tarou", "ISO_IR 192"), ("Yamada^Tarou=山田^太郎", KANJI), ("Yamada^Tarou=田中^次郎", KANJI)]
    richer_first = [("Yamada^Tarou=山田^太郎", KANJI), ("YAMADA^TAROU", None), ("Yamada^Tarou=田中^次郎", KANJI)]
    no_group_in_common = [("=山田^太郎", KANJI), ("Tanaka^Ichiro", None)]
    studies = {
        label: _send_study(node, tmp_path / "sent" / label, shared_fixtures, names)
        for label, names in [("last", richer_last), ("first", richer_first), ("none", no_group_in_common)]
    }

    acknowledged = {label: [ok for _uid, ok in sent] for label, (_study, sent) in studies.items()}
    assert acknowledged == {"last": [True, True, False], "first": [True, True, False], "none": [True, False]}
    for _study_uid, sent in studies.values():
        for series_uid, ok in sent:
            if ok:
                node.wait_for_state(series_uid, JobState.QUEUED, timeout=60)  # admitted
            else:
                assert node.job_state(series_uid) is None
    with node.sessions() as session:
        reasons = set(session.scalars(select(RejectedInstance.reason)))
    assert reasons == {
        f"StudyInstanceUID {studies[label][0]} is already stored for another patient (its PatientName differs); "
        "one study holds one patient, so this instance is quarantined"
        for label in studies
    }
    assert {label: _study_name(node, study_uid) for label, (study_uid, _sent) in studies.items()} == {
        "last": "Yamada^Tarou=山田^太郎",
        "first": "Yamada^Tarou=山田^太郎",
        "none": "=山田^太郎",
    }
    got, output = _get(
        node, tmp_path / "got", "-S", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={studies['last'][0]}"
    )
    assert got == Counter({("PID-N", "Yamada^Tarou"): SLICES, ("PID-N", "Yamada^Tarou=山田^太郎"): SLICES}), output
    series = _find(
        node, tmp_path / "found", "-S", "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={studies['none'][0]}",
        "SeriesInstanceUID", "PatientName",
    )  # fmt: skip
    assert [(str(d.SeriesInstanceUID), str(d.PatientName)) for d in series] == [
        (studies["none"][1][0][0], "=山田^太郎")
    ]


@pytest.mark.integration
def test_one_name_in_another_letter_case_or_unicode_form_is_admitted_and_served_whole(
    start_node, tmp_path, shared_fixtures
) -> None:
    """MÜLLER^JÜRGEN under a study of Müller^Jürgen was admitted, yet SQL's lower() (ASCII only on SQLite) left its
    images out of every C-FIND and C-GET; Müller^Jürgen with its ü decomposed (u and a combining diaeresis, as a
    workstation writing UTF-8 may) was refused as another patient."""
    node = _node(start_node, free_port(), rules=CT_RULES)
    decomposed = unicodedata.normalize("NFD", "Müller^Jürgen")
    upper_case = [("Müller^Jürgen", "ISO_IR 100"), ("MÜLLER^JÜRGEN", "ISO_IR 100")]
    nfd = [("Müller^Jürgen", "ISO_IR 100"), (decomposed, "ISO_IR 192")]
    studies = {
        label: _send_study(node, tmp_path / "sent" / label, shared_fixtures, names)
        for label, names in [("upper", upper_case), ("nfd", nfd)]
    }

    for _study_uid, sent in studies.values():
        assert [ok for _uid, ok in sent] == [True, True]
        for series_uid, _ok in sent:
            node.wait_for_state(series_uid, JobState.QUEUED, timeout=60)  # admitted
    got = {
        label: _get(node, tmp_path / label, "-S", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_uid}")[0]
        for label, (study_uid, _sent) in studies.items()
    }
    assert got == {
        "upper": Counter({("PID-N", "Müller^Jürgen"): SLICES, ("PID-N", "MÜLLER^JÜRGEN"): SLICES}),
        "nfd": Counter({("PID-N", "Müller^Jürgen"): SLICES, ("PID-N", decomposed): SLICES}),
    }
    series = _find(
        node, tmp_path / "found", "-S", "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={studies['upper'][0]}",
        "NumberOfSeriesRelatedInstances",
    )  # fmt: skip
    assert [d.NumberOfSeriesRelatedInstances for d in series] == [SLICES, SLICES]


@pytest.mark.integration
def test_a_series_completed_by_a_resend_in_upper_case_is_one_patients_and_its_results_carry_the_studys_name(
    start_node, tmp_path, shared_fixtures
) -> None:
    """A PACS sends part of a series as Müller^Jürgen, then the whole series again with the name upper-cased (many
    normalise names so): the copies already stored were refused 0xC000 as 'already stored with another
    PatientName', and the series, completed with MÜLLER^JÜRGEN, refused as holding two patients. Now the copies are
    duplicates (the stored files keep their spelling), the series is processed, and its results name the patient
    as the study records it, not as the first slice by position happens to spell it."""
    node = start_node(rules=CT_RULES, inference={"workers": 1})
    series_uid, files = _series(tmp_path / "first", shared_fixtures, generate_uid(), "Müller^Jürgen", "ISO_IR 192")
    resent = []
    for path in files:
        dataset = pydicom.dcmread(path)
        dataset.PatientName = "MÜLLER^JÜRGEN"
        resent.append(tmp_path / f"resent-{path.name}")
        dataset.save_as(resent[-1], enforce_file_format=True)
    middle = files[1:-1]  # the first and last slices by position come only with the resend

    output = storescu(node.port, [*middle, *resent], extra=["-xv"])

    assert output.returncode == 0, output.stderr
    node.wait_for_state(series_uid, JobState.DONE, timeout=120)
    with node.sessions() as session:
        assert not list(session.scalars(select(RejectedInstance.reason)))
        assert session.scalar(select(Study.patient_name)) == "Müller^Jürgen"
        paths = session.scalars(select(Instance.path).join(Series).where(Series.series_instance_uid == series_uid))
        stored = [str(pydicom.dcmread(path).PatientName) for path in paths]
        result_files = job_for_series_uid(session, series_uid).result_files
    assert sorted(stored) == ["MÜLLER^JÜRGEN", "MÜLLER^JÜRGEN", "Müller^Jürgen"]  # the first copy kept
    results = [pydicom.dcmread(path, stop_before_pixels=True) for path in result_files]
    assert {d.Modality for d in results} == {"SEG", "SR"}
    assert {str(d.PatientName) for d in results} == {"Müller^Jürgen"}
