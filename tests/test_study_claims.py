"""One study, one patient, node-wide and before anything is recorded: of two series of one StudyInstanceUID under two
patients arriving at the same moment, on any receiving process, only the first is acknowledged.

The first instance of a new series claims its study in a table every receiving process shares
(:class:`dicom_node.receive.claims.StudyClaims`); these tests race real processes on it, directly and through a real
``dicom-node serve`` with two receiving processes and two DCMTK senders at once.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from db.models import RejectedInstance, Study
from dicom_node.receive.claims import FIELD_BYTES, StudyClaims
from dicom_node.receive.header import StudyPatient
from tests.conftest import real_ct_copy, require_tool, succeeded_files, wait_for
from tests.test_faults import hold_database_lock

SMITH = StudyPatient("P-1", patient_name="SMITH^ANNA", patient_birth_date="19500101", patient_sex="F")
JONES = StudyPatient("P-2", patient_name="JONES^BOB", patient_birth_date="19600202", patient_sex="M")


def _claim_in_step(claims: StudyClaims, turns: list[tuple[str, StudyPatient]], step: Any, answers: Any) -> None:
    """In a receiving process of its own: claim each study at the same moment as the other process does."""
    for study, patient in turns:
        step.wait(timeout=120)
        answers.put((claims.row, study, claims.claim(study, patient)))


def race(claims: StudyClaims, first: list[tuple[str, StudyPatient]], second: list[tuple[str, StudyPatient]]) -> dict:
    """Two real processes (spawned, as ``serve`` starts receivers) claiming turn by turn together; study ->
    {process: answer}."""
    context = multiprocessing.get_context("spawn")
    step, answers = context.Barrier(2), context.Queue()
    racers = [
        context.Process(target=_claim_in_step, args=(claims.for_process(number), turns, step, answers))
        for number, turns in enumerate((first, second))
    ]
    for racer in racers:
        racer.start()
    results: dict[str, dict[int, str | None]] = {}
    for _ in range(len(first) + len(second)):
        row, study, answer = answers.get(timeout=180)
        results.setdefault(study, {})[row] = answer
    for racer in racers:
        racer.join(timeout=60)
        assert racer.exitcode == 0
    return results


def test_two_processes_claiming_one_study_for_two_patients_at_once_leave_exactly_one_the_winner():
    claims = StudyClaims(processes=2)
    studies = [f"1.2.826.0.1.3680043.8.498.{turn}" for turn in range(30)]

    answers = race(claims, [(study, SMITH) for study in studies], [(study, JONES) for study in studies])

    for study in studies:
        assert sorted(answers[study].values(), key=str) == [None, "PatientID"], study
        winner = SMITH if answers[study][0] is None else JONES
        loser = JONES if winner is SMITH else SMITH
        assert claims.claim(study, winner) is None  # the claim stays the winner's
        assert claims.claim(study, loser) == "PatientID"


def test_the_same_patient_wins_in_both_and_only_values_both_carry_are_compared():
    """A second series of the same patient, or one leaving out (or writing otherwise) what the first carries, joins
    the study; the claim takes what it adds, so a third series with another birth date is refused."""
    claims = StudyClaims(processes=2)
    same, padded, completed = "1.2.3.1", "1.2.3.2", "1.2.3.3"
    bare = StudyPatient("P-1", patient_name="SMITH^ANNA")
    first = [(same, SMITH), (padded, SMITH), (completed, bare)]
    second = [
        (same, SMITH),
        (padded, StudyPatient("P-1", patient_name="Smith^Anna^^", patient_sex="F")),
        (completed, StudyPatient("P-1", patient_birth_date="19500101")),
    ]

    answers = race(claims, first, second)

    assert answers == {study: {0: None, 1: None} for study in (same, padded, completed)}
    assert claims.claim(completed, StudyPatient("P-1", patient_birth_date="19800303")) == "PatientBirthDate"
    assert claims.claim(completed, StudyPatient("P-1", patient_name="JONES^ANNA")) == "PatientName"
    assert claims.claim(completed, StudyPatient("P-1", patient_sex="M")) is None  # neither carried a sex
    assert claims.claim(completed, StudyPatient("P-1", issuer_of_patient_id="OTHER-HOSPITAL")) is None
    assert claims.claim(completed, StudyPatient("P-1", patient_sex="F")) == "PatientSex"  # M is the claim's now


def test_a_claim_takes_each_name_group_from_the_first_series_carrying_it_and_two_racing_people_leave_one():
    """A study claimed as Yamada^Tarou takes =山田^太郎 from the next series; of two processes then claiming it at
    once for =山田^太郎 and =田中^次郎, one wins and the other is refused. Names that share no group are two
    people: Tanaka^Ichiro under =山田^太郎 was acknowledged, the claim comparing nothing."""
    claims = StudyClaims(processes=2)
    studies = [f"1.2.826.0.1.3680043.8.498.7{turn}" for turn in range(10)]
    for study in studies:
        assert claims.claim(study, StudyPatient("P-Y", patient_name="Yamada^Tarou")) is None

    answers = race(
        claims,
        [(study, StudyPatient("P-Y", patient_name="Yamada^Tarou=山田^太郎")) for study in studies],
        [(study, StudyPatient("P-Y", patient_name="YAMADA^TAROU=田中^次郎")) for study in studies],
    )

    for study in studies:
        assert sorted(answers[study].values(), key=str) == [None, "PatientName"], study
        won = "山田^太郎" if answers[study][0] is None else "田中^次郎"
        assert claims.claim(study, StudyPatient("P-Y", patient_name=f"={won}")) is None
        assert claims.claim(study, StudyPatient("P-Y", patient_name="Yamada^Tarou=鈴木^一郎")) == "PatientName"
    assert claims.claim("1.2.5", StudyPatient("P-Z", patient_name="=山田^太郎")) is None
    assert claims.claim("1.2.5", StudyPatient("P-Z", patient_name="Tanaka^Ichiro")) == "PatientName"


def test_a_name_completed_past_what_the_table_keeps_leaves_the_claim_as_it_was():
    """Groups of two series, each name fitting, may not fit together: the claim keeps its first name (and every
    other value) whole rather than spill into the next value."""
    claims = StudyClaims()
    ideographic, phonetic = "山" * 70 + "^太郎", "や" * 70 + "^たろう"  # 217 and 220 bytes
    first = StudyPatient("P-1", patient_name=f"Yamada^Tarou={ideographic}", patient_birth_date="19500101")
    assert claims.claim("1.2.6", first) is None
    assert claims.claim("1.2.6", StudyPatient("P-1", patient_name=f"Yamada^Tarou=={phonetic}")) is None
    assert claims.claim("1.2.6", StudyPatient("P-1", patient_birth_date="19800303")) == "PatientBirthDate"
    assert claims.claim("1.2.6", StudyPatient("P-1", patient_name="Yamada^Tarou=田中^次郎")) == "PatientName"
    assert claims.claim("1.2.6", StudyPatient("P-1", patient_name=f"Yamada^Tarou={ideographic}")) is None


def test_values_longer_than_the_table_keeps_never_make_one_patient_two_nor_two_one():
    claims = StudyClaims()
    long_id = "7" * (FIELD_BYTES + 10)
    long_name = "MÜLLER^" + "A" * FIELD_BYTES
    assert claims.claim("1.2.4", StudyPatient(long_id, patient_name=long_name)) is None
    assert claims.claim("1.2.4", StudyPatient(long_id + " ", patient_name=long_name + "B")) is None
    assert claims.claim("1.2.4", StudyPatient(long_id[:-1] + "8")) == "PatientID"
    assert claims.claim("1.2.4", StudyPatient(long_id, patient_name="MÜLLER^B")) is None  # the long name: admission's


def test_a_full_table_drops_its_oldest_claim_and_a_long_uid_is_a_key_of_its_own():
    claims = StudyClaims(slots=8)
    studies = [f"1.2.5.{number}" for number in range(9)]
    for study in studies:
        assert claims.claim(study, SMITH) is None
    assert claims.claim(studies[0], JONES) is None  # dropped by the ninth: recorded long since
    assert [claims.claim(study, JONES) for study in studies[2:]] == ["PatientID"] * 7
    long_uid = "1." + "2" * 80
    assert claims.claim(long_uid, SMITH) is None
    assert claims.claim(long_uid[:64], JONES) is None  # another study, though its first 64 characters are the same
    assert claims.claim(long_uid, JONES) == "PatientID"


def test_a_claim_from_before_the_studys_identity_was_erased_names_nobody_but_the_next_claim_counts():
    claims = StudyClaims(slots=8)
    assert claims.claim("1.2.7", SMITH) is None
    erased = time.monotonic()  # a purge erased the study's identity after SMITH's series was recorded
    assert claims.claim("1.2.7", JONES) == "PatientID"  # not told of the erasure: SMITH's claim holds
    assert claims.claim("1.2.7", JONES, stale_before=erased) is None  # the corrected series is received
    assert claims.claim("1.2.7", SMITH, stale_before=erased) == "PatientID"  # and claims it: one patient again
    for number in range(1, 8):  # the study keeps one slot: seven other studies still fit beside it
        assert claims.claim(f"1.2.7.{number}", SMITH) is None
    assert claims.claim("1.2.7", SMITH) == "PatientID"


def test_a_clock_stepped_back_after_a_purge_does_not_make_a_claim_taken_since_count_as_stale(tmp_path, monkeypatch):
    """The study's identity was erased by a purge, SMITH's series claimed it again; NTP steps the clock back an hour:
    JONES's series of the same study moments later is still refused, the purge kept at its instant."""
    from datetime import timedelta

    from db.ingest import record_instance
    from db.models import Series, utcnow
    from db.session import make_engine, make_session_factory, migrate, transaction
    from dicom_node.receive import studies
    from dicom_node.receive.studies import KnownStudies
    from tests.conftest import ct_instance

    url = f"sqlite:///{tmp_path / 'state.db'}"
    migrate(url)
    sessions = make_session_factory(make_engine(url))
    with transaction(sessions) as session:
        record_instance(session, ct_instance("1.2.7.1.1", "1.2.7.1", study_instance_uid="1.2.7"))
        session.scalars(select(Series)).one().purged_at = utcnow()  # retention purged the study's one series
    claims = StudyClaims(slots=8)
    known = KnownStudies(sessions, claims)
    time.sleep(0.05)
    assert claims.claim("1.2.7", SMITH, stale_before=known._erased_at("1.2.7")) is None  # SMITH's series, after it

    monkeypatch.setattr(studies, "utcnow", lambda: utcnow() - timedelta(hours=1))  # the clock stepped back

    assert claims.claim("1.2.7", JONES, stale_before=known._erased_at("1.2.7")) == "PatientID"


def _claim_and_die_holding_the_lock(claims: StudyClaims, study: str) -> None:
    assert claims.claim(study, SMITH) is None
    claims._lock.acquire()
    os._exit(0)  # killed between taking the lock and giving it back


def test_a_dead_receiving_process_blocks_nobody_its_claims_end_and_the_lock_is_given_back(caplog):
    claims = StudyClaims(processes=2)
    assert claims.for_process(0).claim("1.2.6.2", SMITH) is None  # claimed by both: stays
    dying = multiprocessing.get_context("spawn").Process(
        target=_claim_and_die_holding_the_lock, args=(claims.for_process(1), "1.2.6.1")
    )
    dying.start()
    dying.join(timeout=120)
    assert dying.exitcode == 0  # its claim taken, and the lock held

    caplog.set_level(logging.WARNING)
    claims.forget(1)  # as serve does once it has indexed what the dead process acknowledged

    (recovered,) = [record for record in caplog.records if record.msg == "receiver.lock_recovered"]
    assert "died while it held the lock on the shared study claims" in recovered.event_fields["note"]
    assert claims.claim("1.2.6.1", JONES) is None  # its claim is gone, and the lock works again
    assert claims.claim("1.2.6.2", JONES) == "PatientID"


def test_a_table_whose_lock_cannot_be_had_holds_up_no_instance_and_the_log_says_admission_compares(caplog, monkeypatch):
    claims = StudyClaims(processes=2)
    assert claims.claim("1.2.8", SMITH) is None
    monkeypatch.setattr("dicom_node.receive.claims.WAIT_SECONDS", 0.2)
    caplog.set_level(logging.WARNING)
    with claims._lock:  # another receiving process stuck inside it (alive, so never given back)
        assert claims.for_process(1).claim("1.2.8", JONES) is None  # not held up: admission compares
    (line,) = [record for record in caplog.records if record.msg == "receiver.claims_unavailable"]
    assert line.event_fields["reason"] == (
        "the studies being received by the other receiving processes could not be read within 0.2 s; a new series is "
        "compared with the study's other patients by admission only until they can"
    )
    assert claims.claim("1.2.8", JONES) == "PatientID"  # the lock back: SMITH's claim stands


def series_of_one_study(files: list[Path], folder: Path, study: str, patient_id: str) -> list[Path]:
    """The real CT's first images as a new series of ``study`` under ``patient_id``, each a new instance."""
    folder.mkdir(parents=True)
    series = generate_uid()
    written = []
    for path in files:
        ds = dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID = study, series, patient_id
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(folder / path.name)
        written.append(folder / path.name)
    return written


@pytest.mark.integration
def test_two_senders_at_once_on_two_receiving_processes_get_one_study_for_one_patient_only(
    tmp_path, start_node, shared_fixtures
):
    """Each round, two DCMTK senders at once send a new series of one new study under two PatientIDs, while the
    recorder lags (the database is busy): connections land on either receiving process, and exactly one series is
    acknowledged; the other is refused, and quarantined with the sentence saying why."""
    ct = real_ct_copy(tmp_path / "ct", shared_fixtures)[:3]
    node = start_node(receive={"processes": 2})
    for turn in range(4):
        study = generate_uid()
        sent = {
            patient: series_of_one_study(ct, tmp_path / f"round{turn}-{patient}", study, patient)
            for patient in ("CLAIM-A", "CLAIM-B")
        }
        holder = hold_database_lock(node.storage / "dicom-node.db", seconds=4)  # nothing is recorded meanwhile
        senders = {patient: send_in_background(node.port, files) for patient, files in sent.items()}  # at once
        outputs = {patient: sender.communicate(timeout=120)[0] for patient, sender in senders.items()}
        holder.wait(timeout=60)

        acknowledged = {patient: succeeded_files(output) for patient, output in outputs.items()}
        winners = [patient for patient, files in acknowledged.items() if files]
        assert len(winners) == 1, f"round {turn}: the series of {winners} were acknowledged"
        (winner,) = winners
        (loser,) = [patient for patient in sent if patient != winner]
        assert acknowledged[winner] == [str(path) for path in sent[winner]], outputs[winner]
        assert acknowledged[loser] == [], outputs[loser]
        refused_series = str(dcmread(sent[loser][0]).SeriesInstanceUID)
        reasons = wait_for(
            lambda series=refused_series: _rejection_reasons(node, series, len(ct)), timeout=60, what="refusals"
        )
        said = {  # the claim refuses the first; the later ones may meet the winner's row (or this process' memory)
            f"StudyInstanceUID {study} is {being} for another patient (its PatientID differs); one study holds one "
            "patient, so this instance is quarantined"
            for being in ("being received", "already stored")
        }
        assert len(reasons) == len(ct) and set(reasons) <= said, reasons
        with node.sessions() as session:
            assert session.scalars(select(Study.patient_id).where(Study.study_instance_uid == study)).all() == [winner]


def send_in_background(port: int, files: list[Path]) -> subprocess.Popen[str]:
    """One DCMTK storescu association sending the real CT's JPEG 2000 images (-xv), each even after a refusal (-nh)."""
    options = ["-v", "-xv", "-nh", "-aet", "PACS", "-aec", "DICOMNODE"]
    return subprocess.Popen(
        [require_tool("storescu"), *options, "127.0.0.1", str(port), *map(str, files)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TCP_NODELAY": "1"},
    )


def _rejection_reasons(node: Any, series_instance_uid: str, count: int) -> list[str]:
    """The reasons recorded for the series' refused instances, once all ``count`` are recorded."""
    with node.sessions() as session:
        reasons = session.scalars(
            select(RejectedInstance.reason).where(RejectedInstance.series_instance_uid == series_instance_uid)
        ).all()
    return list(reasons) if len(reasons) == count else []


@pytest.mark.integration
def test_an_instance_refused_for_its_series_claims_no_study(tmp_path, start_node):
    """An instance of a stored series that names another study is refused for its series; it must not claim the
    study it names, or another patient's own new series of that study would be refused in its place."""
    from dicom_node.phantom import PhantomSpec, write_phantom_series
    from tests.conftest import storescu

    node = start_node(completion={"quiet_seconds": 600})
    small = {"rows": 16, "columns": 16, "slices": 2}
    stored = write_phantom_series(tmp_path / "stored", PhantomSpec(**small, patient_id="P-1"))
    assert storescu(node.port, stored.files).returncode == 0
    wait_for(lambda: node.job_state(stored.series_instance_uid) is not None, what="the series to be recorded")
    node.stop()  # started again, the receiver knows the series from the database only
    node.start()
    elsewhere_study = generate_uid()
    strayed = write_phantom_series(
        tmp_path / "strayed",
        PhantomSpec(
            **small,
            patient_id="P-1",
            study_instance_uid=elsewhere_study,
            series_instance_uid=stored.series_instance_uid,
        ),
    )
    refused = storescu(node.port, strayed.files[:1])
    assert succeeded_files(refused.stderr) == [] and "stored under StudyInstanceUID" in node.log(), refused.stderr
    own = write_phantom_series(
        tmp_path / "own", PhantomSpec(**small, patient_id="P-2", study_instance_uid=elsewhere_study)
    )
    sent = storescu(node.port, own.files)
    assert sorted(succeeded_files(sent.stderr)) == sorted(str(path) for path in own.files), sent.stderr
