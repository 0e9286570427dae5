"""The node's C-STORE handler in this process (its server, store and recorder); pynetdicom sends over loopback TCP.

In-process, so a stage of the handler can be made to fail and its clean-up checked.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Instance
from db.session import make_engine, make_session_factory, migrate
from dicom_node import status
from dicom_node.config import NetworkSettings
from dicom_node.phantom import PhantomSeries, PhantomSpec, write_phantom_series
from dicom_node.receive import recorder as recorder_module
from dicom_node.receive import scp
from dicom_node.receive.recorder import InstanceRecorder
from dicom_node.receive.storage import InstanceStore
from tests.conftest import free_port
from tests.test_faults import assert_no_temporary_files

SMALL_CT = PhantomSpec(rows=64, columns=64, slices=4, pixel_spacing=(5.0, 5.0), slice_spacing=5.0)


@dataclass
class RunningScp:
    network: NetworkSettings
    store: InstanceStore
    sessions: sessionmaker[Session]
    recorder: InstanceRecorder
    context: scp.StoreContext | None = None  # what the SCP's handlers share: its studies' claims, say

    def associate(self) -> Any:
        """An established association from PACS that may store CT."""
        ae = AE(ae_title="PACS")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate(self.network.host, self.network.port, ae_title=self.network.ae_title)
        assert assoc.is_established
        return assoc

    def stored_bytes(self) -> dict[Path, bytes]:
        """Every stored instance file and its bytes."""
        return {path: path.read_bytes() for path in self.store.instances_dir.rglob("*.dcm")}

    def send(self, files: list[Path]) -> list[tuple[int, str]]:
        """Each file's (status, error comment), over one association."""
        assoc = self.associate()
        try:
            answers = []
            for path in files:
                response = assoc.send_c_store(dcmread(path))
                answers.append((int(response.Status), str(response.get("ErrorComment", ""))))
            return answers
        finally:
            assoc.release()


@pytest.fixture
def running_scp(tmp_path: Path) -> Iterator[RunningScp]:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    migrate(url)
    sessions = make_session_factory(make_engine(url))
    store = InstanceStore(tmp_path / "storage")
    recorder = InstanceRecorder(store, sessions)
    recorder.start()
    network = NetworkSettings(ae_title="NODE", host="127.0.0.1", port=free_port())
    context = scp.StoreContext(store=store, sessions=sessions, recorder=recorder)
    server = scp.start_storage_scp(network, context)
    try:
        yield RunningScp(network, store, sessions, recorder, context)
    finally:
        server.shutdown()
        recorder.stop()
        store.close()


def test_instances_are_stored_whole_and_recorded_through_spare_files(running_scp, tmp_path):
    series = write_phantom_series(tmp_path / "ct", SMALL_CT)

    answers = running_scp.send(series.files)

    assert answers == [(status.SUCCESS, "")] * len(series.files)
    assert running_scp.recorder.wait_until_recorded(30)
    with running_scp.sessions() as session:
        recorded = {row.sop_instance_uid: row.path for row in session.scalars(select(Instance))}
    assert sorted(recorded) == sorted(series.sop_instance_uids)
    for sent, uid in zip(series.files, series.sop_instance_uids, strict=True):
        assert dcmread(recorded[uid]).PixelData == dcmread(sent).PixelData
    assert_no_temporary_files(running_scp.store.root)


def test_a_release_is_answered_once_its_instances_are_recorded_without_waiting_for_the_batch(
    running_scp, tmp_path, monkeypatch
):
    # A batch gathers for longer than a release waits (scp.RELEASE_WAIT_SECONDS): only a release that ends
    # the gathering finds its instances recorded when it is answered.
    monkeypatch.setattr(recorder_module, "BATCH_GATHER_SECONDS", 600.0)
    series = write_phantom_series(tmp_path / "ct", SMALL_CT)

    for files in (series.files[:2], series.files[2:]):  # a second association: the recorder still gathers
        assert running_scp.send(files) == [(status.SUCCESS, "")] * len(files)  # released on return
        with running_scp.sessions() as session:
            recorded = set(session.scalars(select(Instance.sop_instance_uid)))
        assert recorded >= {str(dcmread(path).SOPInstanceUID) for path in files}
        assert running_scp.recorder.unrecorded == 0


def test_waiting_for_the_recorder_does_not_wait_for_instances_that_arrive_meanwhile(running_scp, tmp_path, monkeypatch):
    # A release waits until its association's instances are recorded, not until another association of the
    # same process stops sending. Here the other instance arrives while the first batch is being recorded, and
    # then sits in a gathering that outlasts the wait.
    monkeypatch.setattr(recorder_module, "BATCH_GATHER_SECONDS", 600.0)
    first = write_phantom_series(tmp_path / "first", SMALL_CT)
    other = write_phantom_series(tmp_path / "other", SMALL_CT)
    recorder = running_scp.recorder
    commit = recorder._commit
    late: list[Any] = []

    def commit_while_another_association_sends(batch: list[Any]) -> Any:
        outcomes = commit(batch)
        if not late:
            late.append(running_scp.associate())
            late.append(late[0].send_c_store(dcmread(other.files[0])).Status)  # answered: submitted to the recorder
        return outcomes

    monkeypatch.setattr(recorder, "_commit", commit_while_another_association_sends)
    sender = running_scp.associate()
    assert [sender.send_c_store(dcmread(path)).Status for path in first.files[:2]] == [status.SUCCESS] * 2

    assert recorder.wait_until_recorded(30)  # returns once the two are recorded

    assert late[1] == status.SUCCESS and recorder.unrecorded == 1
    with running_scp.sessions() as session:
        recorded = set(session.scalars(select(Instance.sop_instance_uid)))
    assert recorded == set(first.sop_instance_uids[:2])
    sender.release()
    late[0].release()  # its own release records the late instance
    with running_scp.sessions() as session:
        assert str(dcmread(other.files[0]).SOPInstanceUID) in set(session.scalars(select(Instance.sop_instance_uid)))
    assert recorder.unrecorded == 0


def test_an_unexpected_error_in_the_header_check_leaves_no_temporary_file(running_scp, tmp_path, monkeypatch):
    series = write_phantom_series(tmp_path / "ct", SMALL_CT)

    def broken_check(*_args: object) -> None:
        raise RuntimeError("a defect in the header check")

    monkeypatch.setattr(scp, "check_header", broken_check)
    answers = running_scp.send(series.files[:2])

    assert all(code != status.SUCCESS for code, _ in answers)  # pynetdicom answers a failure for the handler
    assert_no_temporary_files(running_scp.store.root)
    assert not list(running_scp.store.instances_dir.rglob("*.dcm"))


def _count_whole_writes(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    writes: list[object] = []
    write_temporary = InstanceStore.write_temporary

    def counted(self: InstanceStore, *args: Any) -> Path:
        writes.append(args)
        return write_temporary(self, *args)

    monkeypatch.setattr(InstanceStore, "write_temporary", counted)
    return writes


def test_a_resent_series_is_written_again_only_until_the_first_duplicate_is_recognised(
    running_scp, tmp_path, monkeypatch
):
    series = write_phantom_series(tmp_path / "ct", SMALL_CT)
    assert running_scp.send(series.files) == [(status.SUCCESS, "")] * len(series.files)
    assert running_scp.recorder.wait_until_recorded(30)
    stored = running_scp.stored_bytes()
    writes = _count_whole_writes(monkeypatch)

    answers = running_scp.send(series.files)  # the same series again, over one association

    assert answers == [(status.SUCCESS, "")] * len(series.files)
    assert len(writes) == 1  # only the first resent instance, before it was known to be here
    assert running_scp.stored_bytes() == stored
    assert running_scp.recorder.wait_until_recorded(30)
    with running_scp.sessions() as session:
        recorded = [row.sop_instance_uid for row in session.scalars(select(Instance))]
    assert sorted(recorded) == sorted(series.sop_instance_uids)  # each once
    assert_no_temporary_files(running_scp.store.root)


def test_a_resent_instance_whose_file_is_purged_before_its_journal_line_is_written_after_all(
    running_scp, tmp_path, monkeypatch
):
    """Retention may take the file away between the receiver finding it and journaling it: the instance is written."""
    from dicom_node.receive.recorder import Journal

    series = write_phantom_series(tmp_path / "ct", SMALL_CT)
    assert running_scp.send(series.files) == [(status.SUCCESS, "")] * len(series.files)
    assert running_scp.recorder.wait_until_recorded(30)
    stored = running_scp.stored_bytes()
    purged: list[Path] = []
    calls: list[str] = []
    append = Journal.append

    def purged_first(self: Journal, path: str) -> int:
        calls.append(path)
        if len(calls) > 1:  # the first resent instance makes the association known as resending
            purged.append(Path(path))
            Path(path).unlink()  # as retention would, in the moment before the line is written
        return append(self, path)

    monkeypatch.setattr(Journal, "append", purged_first)
    answers = running_scp.send(series.files)  # the same series again: from the second on, known to be stored

    assert answers == [(status.SUCCESS, "")] * len(series.files)
    assert len(purged) == len(series.files) - 1
    assert running_scp.stored_bytes() == stored
    assert_no_temporary_files(running_scp.store.root)


def test_new_instances_after_resent_ones_on_one_association_are_stored(running_scp, tmp_path, monkeypatch):
    first = write_phantom_series(tmp_path / "first", SMALL_CT)
    second = write_phantom_series(tmp_path / "second", SMALL_CT)
    assert running_scp.send(first.files[:2]) == [(status.SUCCESS, "")] * 2
    writes = _count_whole_writes(monkeypatch)

    answers = running_scp.send(first.files[:2] + second.files[:2])  # two resent, then two new

    assert answers == [(status.SUCCESS, "")] * 4
    assert len(writes) == 3  # the first resent instance, and each new one
    assert running_scp.recorder.wait_until_recorded(30)
    with running_scp.sessions() as session:
        recorded = {row.sop_instance_uid: Path(row.path) for row in session.scalars(select(Instance))}
    assert sorted(recorded) == sorted(first.sop_instance_uids[:2] + second.sop_instance_uids[:2])
    for sent, uid in zip(second.files[:2], second.sop_instance_uids[:2], strict=True):
        assert dcmread(recorded[uid]) == dcmread(sent)
    assert_no_temporary_files(running_scp.store.root)


def test_a_refused_header_in_a_resend_is_refused_and_quarantined_as_any_other(running_scp, tmp_path):
    series = write_phantom_series(tmp_path / "ct", SMALL_CT)
    assert running_scp.send(series.files[:1]) == [(status.SUCCESS, "")]
    broken = dcmread(series.files[1])
    broken.SeriesInstanceUID = "1.2.3.x"
    broken_path = tmp_path / "broken.dcm"
    broken.save_as(broken_path)

    answers = running_scp.send([series.files[0], broken_path])  # a resend puts the association in resend mode

    assert answers[0] == (status.SUCCESS, "")
    assert answers[1][0] == status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    assert len(list(running_scp.store.quarantine_dir.iterdir())) == 1  # kept for an operator, as on any refusal
    assert_no_temporary_files(running_scp.store.root)


@pytest.mark.parametrize("corrected_keyword", ["PatientID", "IssuerOfPatientID"])
@pytest.mark.parametrize("resending", [False, True], ids=["first-on-its-association", "in-resend-mode"])
def test_an_instance_sent_again_under_another_patient_is_refused_and_the_stored_copy_kept(
    running_scp, tmp_path, resending, corrected_keyword
):
    """A corrected PatientID (or the issuer that says whose IDs they are) on a stored SOP Instance UID: never
    relabelled, never silently dropped either."""
    from db.models import RejectedInstance

    series = write_phantom_series(tmp_path / "ct", SMALL_CT)
    for path in series.files:
        original = dcmread(path)
        original.IssuerOfPatientID = "HOSPITAL_A"
        original.save_as(path)
    assert running_scp.send(series.files) == [(status.SUCCESS, "")] * len(series.files)
    stored = running_scp.stored_bytes()
    corrected = dcmread(series.files[1])
    setattr(corrected, corrected_keyword, "CORRECTED-99")
    corrected_path = tmp_path / "corrected.dcm"
    corrected.save_as(corrected_path)

    answers = running_scp.send([series.files[0], corrected_path] if resending else [corrected_path])

    assert answers[-1][0] == status.CANNOT_UNDERSTAND
    assert running_scp.stored_bytes() == stored
    assert len(list(running_scp.store.quarantine_dir.iterdir())) == 1
    with running_scp.sessions() as session:
        (reason,) = session.scalars(select(RejectedInstance.reason))
    assert reason == (
        f"SOP Instance UID {corrected.SOPInstanceUID} is already stored with another {corrected_keyword}; the stored "
        "copy is kept and this one quarantined (a stored instance is never relabelled with another identity)"
    )
    assert "CORRECTED" not in reason
    assert_no_temporary_files(running_scp.store.root)


def test_an_instance_of_a_stored_study_under_another_patient_is_refused(running_scp, tmp_path):
    """One StudyInstanceUID, two PatientIDs: the second patient's images never join the first one's study."""
    from dataclasses import replace

    from db.models import RejectedInstance, Study

    first = write_phantom_series(tmp_path / "first", replace(SMALL_CT, patient_id="X-1"))
    assert running_scp.send(first.files) == [(status.SUCCESS, "")] * len(first.files)
    assert running_scp.recorder.wait_until_recorded(30)
    other = write_phantom_series(
        tmp_path / "other", replace(SMALL_CT, patient_id="Y-2", study_instance_uid=first.study_instance_uid)
    )
    same = write_phantom_series(
        tmp_path / "same", replace(SMALL_CT, patient_id="X-1", study_instance_uid=first.study_instance_uid)
    )

    refused = running_scp.send(other.files[:2])
    accepted = running_scp.send(same.files[:2])  # the same patient's next series joins the study

    assert [code for code, _comment in refused] == [status.CANNOT_UNDERSTAND] * 2
    assert accepted == [(status.SUCCESS, "")] * 2
    assert running_scp.recorder.wait_until_recorded(30)
    with running_scp.sessions() as session:
        recorded = set(session.scalars(select(Instance.sop_instance_uid)))
        reasons = set(session.scalars(select(RejectedInstance.reason)))
        patients = set(session.scalars(select(Study.patient_id)))
    assert recorded == set(first.sop_instance_uids) | set(same.sop_instance_uids[:2])
    assert patients == {"X-1"}
    assert reasons == {
        f"StudyInstanceUID {first.study_instance_uid} is already stored for another patient (its PatientID differs); "
        "one study holds one patient, so this instance is quarantined"
    }
    assert len(list(running_scp.store.quarantine_dir.iterdir())) == 2


def test_a_study_stored_for_one_issuer_refuses_the_same_patient_id_from_another(running_scp, tmp_path):
    """PatientID X-1 numbered by HOSPITAL_A and X-1 numbered by HOSPITAL_B are two patients; a series without an
    issuer, or with the study's own, joins the study."""
    from dataclasses import replace

    from db.models import RejectedInstance, Study

    def with_issuer(name: str, issuer: str | None, study_uid: str | None = None) -> PhantomSeries:
        spec = replace(SMALL_CT, patient_id="X-1", **({"study_instance_uid": study_uid} if study_uid else {}))
        series = write_phantom_series(tmp_path / name, spec)
        for path in series.files:
            ds = dcmread(path)
            if issuer is not None:
                ds.IssuerOfPatientID = issuer
            ds.save_as(path)
        return series

    first = with_issuer("first", "HOSPITAL_A")
    assert running_scp.send(first.files) == [(status.SUCCESS, "")] * len(first.files)
    assert running_scp.recorder.wait_until_recorded(30)
    study = first.study_instance_uid
    other, same, unnamed = (
        with_issuer("other", "HOSPITAL_B", study),
        with_issuer("same", "HOSPITAL_A", study),
        with_issuer("unnamed", None, study),
    )

    refused = running_scp.send(other.files[:2])
    accepted = running_scp.send(same.files[:2]) + running_scp.send(unnamed.files[:2])

    assert [code for code, _comment in refused] == [status.CANNOT_UNDERSTAND] * 2
    assert accepted == [(status.SUCCESS, "")] * 4
    assert running_scp.recorder.wait_until_recorded(30)
    with running_scp.sessions() as session:
        recorded = set(session.scalars(select(Instance.sop_instance_uid)))
        reasons = set(session.scalars(select(RejectedInstance.reason)))
        issuers = set(session.scalars(select(Study.issuer_of_patient_id)))
    joined = [*first.sop_instance_uids, *same.sop_instance_uids[:2], *unnamed.sop_instance_uids[:2]]
    assert recorded == set(joined)
    assert issuers == {"HOSPITAL_A"}
    assert reasons == {
        f"StudyInstanceUID {study} is already stored for another patient (its IssuerOfPatientID differs); "
        "one study holds one patient, so this instance is quarantined"
    }


def test_a_resend_that_only_completes_or_pads_the_identity_is_a_plain_duplicate(running_scp, tmp_path):
    """A PACS that fills in AccessionNumber from its RIS, or pads the name's components, names the same patient."""
    series = write_phantom_series(tmp_path / "ct", SMALL_CT)
    first = dcmread(series.files[0])
    del first.AccessionNumber
    first.save_as(series.files[0])
    assert running_scp.send(series.files[:2]) == [(status.SUCCESS, "")] * 2
    stored = running_scp.stored_bytes()
    completed = dcmread(series.files[0])
    completed.AccessionNumber = "RIS-0001"
    padded = dcmread(series.files[1])
    padded.PatientName = f"{padded.PatientName}^^^"
    resent = [tmp_path / "completed.dcm", tmp_path / "padded.dcm"]
    completed.save_as(resent[0])
    padded.save_as(resent[1])

    assert running_scp.send(resent) == [(status.SUCCESS, "")] * 2
    assert running_scp.stored_bytes() == stored
    assert not running_scp.store.quarantine_dir.exists() or not list(running_scp.store.quarantine_dir.iterdir())


@pytest.mark.parametrize(
    "resent_name",
    ["MÜLLER^JÜRGEN", unicodedata.normalize("NFD", "Müller^Jürgen"), "müller^jürgen^^"],
    ids=["upper-case", "decomposed-letters", "lower-case-padded"],
)
def test_a_resend_spelling_the_name_of_the_same_person_otherwise_is_a_plain_duplicate(
    running_scp, tmp_path, resent_name
):
    """Many PACS re-send a stored image with the name in their own form (upper case, letters decomposed): by the
    names rule (db.names) it names the same patient, so the copy is the one already stored, kept as it was."""
    from db.models import RejectedInstance

    series = _named_series(tmp_path, "Müller^Jürgen")
    assert running_scp.send(series.files) == [(status.SUCCESS, "")] * len(series.files)
    assert running_scp.recorder.wait_until_recorded(30)
    stored = running_scp.stored_bytes()
    again = dcmread(series.files[1])
    again.PatientName = resent_name
    again.save_as(tmp_path / "again.dcm")

    assert running_scp.send([tmp_path / "again.dcm"]) == [(status.SUCCESS, "")]
    assert running_scp.recorder.wait_until_recorded(30)
    assert running_scp.stored_bytes() == stored
    assert not running_scp.store.quarantine_dir.exists() or not list(running_scp.store.quarantine_dir.iterdir())
    with running_scp.sessions() as session:
        assert not list(session.scalars(select(RejectedInstance.reason)))
        assert set(session.scalars(select(Instance.patient_name))) == {"Müller^Jürgen"}


def test_a_resend_naming_another_person_in_a_component_group_is_refused(running_scp, tmp_path):
    """The names rule is no looser than that: the same alphabetic name with another ideographic one is another
    person, and the copy is refused as under another PatientID."""
    from db.models import RejectedInstance

    series = _named_series(tmp_path, "Yamada^Tarou=山田^太郎")
    assert running_scp.send(series.files[:2]) == [(status.SUCCESS, "")] * 2
    stored = running_scp.stored_bytes()
    other = dcmread(series.files[1])
    other.PatientName = "YAMADA^TAROU=田中^次郎"
    other.save_as(tmp_path / "other.dcm")

    assert running_scp.send([tmp_path / "other.dcm"])[0][0] == status.CANNOT_UNDERSTAND
    assert running_scp.stored_bytes() == stored
    with running_scp.sessions() as session:
        assert list(session.scalars(select(RejectedInstance.reason))) == [
            f"SOP Instance UID {other.SOPInstanceUID} is already stored with another PatientName; the stored copy is "
            "kept and this one quarantined (a stored instance is never relabelled with another identity)"
        ]


def _named_series(tmp_path: Path, name: str) -> PhantomSeries:
    """A small CT series naming its patient ``name``, written in UTF-8."""
    series = write_phantom_series(tmp_path / "ct", SMALL_CT)
    for path in series.files:
        ds = dcmread(path)
        ds.SpecificCharacterSet, ds.PatientName = "ISO_IR 192", name
        ds.save_as(path)
    return series


def _another_copy_placed_first(monkeypatch: pytest.MonkeyPatch, other: Path) -> None:
    """The next instance placed finds ``other`` (a copy of the same SOP Instance UID) put at its path a moment
    before, as a second association sending the same instance at the same time would (both found the name free)."""
    install_new = InstanceStore.install_new

    def other_copy_wins(store: InstanceStore, temporary: Path, path: Path) -> bool:
        monkeypatch.setattr(InstanceStore, "install_new", install_new)
        placed_first = store.write_temporary(b"", other.read_bytes())
        assert install_new(store, placed_first, path)
        placed_first.unlink()  # hard-linked into place: the temporary name is the placer's to remove
        return install_new(store, temporary, path)

    monkeypatch.setattr(InstanceStore, "install_new", other_copy_wins)


def test_a_copy_under_another_patient_arriving_with_the_stored_one_is_refused_not_dropped(
    running_scp, tmp_path, monkeypatch
):
    """Two senders send one SOP Instance UID at once, under two patients: the copy that finds the other already
    placed is compared with it as with any stored copy, so it is refused and quarantined, never answered success
    and dropped (nor recorded with its own patient over the other's file)."""
    from db.models import RejectedInstance

    series = write_phantom_series(tmp_path / "ct", SMALL_CT)
    theirs = dcmread(series.files[0])
    theirs.PatientID = "OTHER-PATIENT-7"
    theirs.save_as(tmp_path / "theirs.dcm", enforce_file_format=True)
    _another_copy_placed_first(monkeypatch, tmp_path / "theirs.dcm")

    answers = running_scp.send(series.files[:1])

    assert answers[0][0] == status.CANNOT_UNDERSTAND
    (stored,) = running_scp.stored_bytes()
    assert dcmread(stored).PatientID == "OTHER-PATIENT-7"
    (quarantined,) = running_scp.store.quarantine_dir.iterdir()
    assert dcmread(quarantined).PatientID == dcmread(series.files[0]).PatientID
    with running_scp.sessions() as session:
        assert list(session.scalars(select(RejectedInstance.reason))) == [
            f"SOP Instance UID {theirs.SOPInstanceUID} is already stored with another PatientID; the stored copy is "
            "kept and this one quarantined (a stored instance is never relabelled with another identity)"
        ]
    assert_no_temporary_files(running_scp.store.root)


def test_a_copy_of_the_same_patient_arriving_with_the_stored_one_is_recorded_as_the_file_kept(
    running_scp, tmp_path, monkeypatch
):
    """The same instance from two senders at once, one with AccessionNumber filled in: the copy answered as a
    duplicate is recorded as the copy kept on disk says, so the database never describes bytes it does not hold."""
    from db.models import Study

    series = write_phantom_series(tmp_path / "ct", SMALL_CT)
    ours = dcmread(series.files[0])
    del ours.AccessionNumber
    ours.save_as(series.files[0])
    theirs = dcmread(series.files[0])
    theirs.AccessionNumber = "RIS-0001"
    theirs.save_as(tmp_path / "theirs.dcm", enforce_file_format=True)
    _another_copy_placed_first(monkeypatch, tmp_path / "theirs.dcm")

    assert running_scp.send(series.files[:1]) == [(status.SUCCESS, "")]
    assert running_scp.recorder.wait_until_recorded(30)
    with running_scp.sessions() as session:
        assert session.scalars(select(Study.accession_number)).one() == "RIS-0001"


@pytest.mark.parametrize("moved_to", ["StudyInstanceUID", "SeriesInstanceUID"])
def test_a_correction_sent_again_under_new_uids_with_another_patient_is_refused_before_it_is_acknowledged(
    running_scp, tmp_path, moved_to
):
    """A PACS correction re-sends the stored images with the same SOP Instance UIDs, another PatientID and a new
    study (or series) UID: the copy recorded at its other path is compared before the answer, so the sender is
    told it was not stored, instead of success followed by a silent set-aside."""
    from db.models import RejectedInstance

    series = write_phantom_series(tmp_path / "ct", SMALL_CT)
    assert running_scp.send(series.files[:1]) == [(status.SUCCESS, "")]
    assert running_scp.recorder.wait_until_recorded(30)
    stored = running_scp.stored_bytes()
    corrected = dcmread(series.files[0])
    corrected.PatientID = "CORRECTED-99"
    setattr(corrected, moved_to, "1.2.826.0.1.3680043.2.1125.9")
    corrected.save_as(tmp_path / "corrected.dcm")

    answers = running_scp.send([tmp_path / "corrected.dcm"])

    assert answers[0][0] == status.CANNOT_UNDERSTAND
    assert running_scp.stored_bytes() == stored
    with running_scp.sessions() as session:
        assert list(session.scalars(select(RejectedInstance.reason))) == [
            f"SOP Instance UID {corrected.SOPInstanceUID} is already stored with another PatientID; the stored copy "
            "is kept and this one quarantined (a stored instance is never relabelled with another identity)"
        ]
    assert_no_temporary_files(running_scp.store.root)


def _set_aside_by_the_recorder(tmp_path: Path, change: Callable[[Dataset], None]) -> tuple[str, Dataset, str]:
    """The first image of a series indexed, then a copy of it under another series (``change`` applied) recorded as
    a second sender's would be: the recorder's reason for setting it aside, the copy, and the first series' UID."""
    from db.models import RejectedInstance
    from db.session import transaction
    from dicom_node.receive.storage import index_file, record_stored_instances

    url = f"sqlite:///{tmp_path / 'state.db'}"
    migrate(url)
    sessions = make_session_factory(make_engine(url))
    store = InstanceStore(tmp_path / "storage")
    series = write_phantom_series(tmp_path / "ct", SMALL_CT)
    first = store.path_for(series.study_instance_uid, series.series_instance_uid, series.sop_instance_uids[0])
    first.parent.mkdir(parents=True)
    first.write_bytes(series.files[0].read_bytes())
    assert index_file(first, store, sessions) == "indexed"
    other = dcmread(series.files[0])
    other.SeriesInstanceUID = "1.2.826.0.1.3680043.2.1125.9"
    change(other)
    path = store.path_for(series.study_instance_uid, other.SeriesInstanceUID, other.SOPInstanceUID)
    path.parent.mkdir(parents=True)
    other.save_as(path, enforce_file_format=True)
    header = scp.check_header(dcmread(path, stop_before_pixels=True), other.SOPClassUID, other.SOPInstanceUID)

    with transaction(sessions) as session:
        record_stored_instances(session, store, [header.record(other.file_meta.TransferSyntaxUID, str(path), 1, "B")])

    with sessions() as session:
        reason = session.scalars(select(RejectedInstance.reason)).one()
    store.close()
    return reason, other, series.series_instance_uid


def test_a_copy_under_another_patient_set_aside_by_the_recorder_names_the_attribute(tmp_path):
    """Two senders at once, the copy under another series and patient: the receiver found no copy recorded yet,
    so the recorder sets it aside, and its reason says the patient differs, not only the series."""

    def another_patient(copy: Dataset) -> None:
        copy.PatientID = "OTHER-7"

    reason, other, first_series = _set_aside_by_the_recorder(tmp_path, another_patient)

    assert reason.startswith(
        f"SOP Instance UID {other.SOPInstanceUID} arrived in series {other.SeriesInstanceUID} with another PatientID "
        f"than the copy already stored in series {first_series}; this copy was acknowledged"
    )


def test_a_copy_of_the_same_patient_set_aside_by_the_recorder_is_not_said_to_name_another(tmp_path):
    """Two senders at once, the copy under another series with the name upper-cased: set aside as a copy filed
    under another series, never as one 'with another PatientName' (by the names rule it is the same patient)."""

    def name_upper_cased(copy: Dataset) -> None:
        copy.PatientName = str(copy.PatientName).upper()

    reason, other, first_series = _set_aside_by_the_recorder(tmp_path, name_upper_cased)

    assert reason.startswith(
        f"SOP Instance UID {other.SOPInstanceUID} arrived in series {other.SeriesInstanceUID} but is already stored "
        f"in series {first_series}; this copy was acknowledged"
    )


def test_an_instance_of_a_stored_series_naming_another_study_is_refused(running_scp, tmp_path):
    """Recorded into its series, it would be answered under the series' study while its header names another (and
    admission would refuse the whole series): refused at the door, and the series keeps its study."""
    from db.models import RejectedInstance

    series = write_phantom_series(tmp_path / "ct", SMALL_CT)
    assert running_scp.send(series.files[:2]) == [(status.SUCCESS, "")] * 2
    assert running_scp.recorder.wait_until_recorded(30)
    stray = dcmread(series.files[2])
    stray.StudyInstanceUID = "1.2.826.0.1.3680043.2.1125.7"
    stray.save_as(tmp_path / "stray.dcm")

    assert running_scp.send([tmp_path / "stray.dcm"])[0][0] == status.CANNOT_UNDERSTAND
    with running_scp.sessions() as session:
        assert list(session.scalars(select(RejectedInstance.reason))) == [
            f"SeriesInstanceUID {series.series_instance_uid} is stored under StudyInstanceUID "
            f"{series.study_instance_uid}, but this instance names StudyInstanceUID {stray.StudyInstanceUID}; a "
            "series belongs to one study, so this instance is quarantined"
        ]
    assert running_scp.send(series.files[2:3]) == [(status.SUCCESS, "")]  # the series' own study: received
