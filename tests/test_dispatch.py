"""Results back to the PACS: a real Orthanc end to end, and a destination that is down at first."""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from datetime import timedelta

import pydicom
import pytest

from db import jobs
from db.jobs import job_for_series_uid
from db.models import JobState
from dicom_node.phantom import PhantomSpec, write_phantom_series
from tests.conftest import free_port, require_tool, storescu, wait_for

pytestmark = pytest.mark.integration

PHANTOM = PhantomSpec(rows=96, columns=96, slices=30, pixel_spacing=(3.5, 3.5), slice_spacing=5.0)


def rules_to(destination: str) -> list[dict]:
    return [
        {
            "name": "ct",
            "match": {"modality": "CT"},
            "action": "process",
            "model": "baseline",
            "destinations": [destination],
        }
    ]


def test_results_reach_orthanc_under_the_same_study(shared_fixtures, start_node, start_orthanc):
    node_port = free_port()
    orthanc = start_orthanc({"node": ["DICOMNODE", "127.0.0.1", node_port]})
    node = start_node(
        network={"port": node_port},
        destinations={
            "pacs": {
                "ae_title": orthanc.ae_title,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
                "send": ["seg", "sr", "rtstruct"],
            }
        },
        rules=rules_to("pacs"),
        inference={"workers": 1},
        completion={"quiet_seconds": 2},
    )
    assert node.port == node_port
    files = sorted((shared_fixtures / "example_ct_dicom_valid").glob("*.dcm"))
    study_id = {orthanc.upload(path)["ParentStudy"] for path in files}.pop()

    orthanc.post_json("/modalities/node/store", {"Resources": [study_id], "Synchronous": True})

    def modalities() -> set[str]:
        return {s["MainDicomTags"].get("Modality") for s in orthanc.get(f"/studies/{study_id}/series")}

    wait_for(lambda: {"SEG", "SR", "RTSTRUCT"} <= modalities(), timeout=180, what="SEG, SR and RTSTRUCT in Orthanc")
    series = orthanc.get(f"/studies/{study_id}/series")
    assert len(series) == 4  # the CT, the SEG, the SR and the RTSTRUCT, one study
    seg_series = next(s for s in series if s["MainDicomTags"]["Modality"] == "SEG")
    assert "baseline" in seg_series["MainDicomTags"]["SeriesDescription"]


def test_binary_and_labelmap_to_two_destinations_are_series_a_radiologist_tells_apart(
    shared_fixtures, start_node, start_orthanc
):
    node_port = free_port()
    # Orthanc 1.10 does not list Label Map Segmentation Storage: it takes it as an unknown SOP class
    orthanc = start_orthanc({"node": ["DICOMNODE", "127.0.0.1", node_port]}, {"UnknownSopClassAccepted": True})
    peer = {"ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port}
    start_node(
        network={"port": node_port},
        destinations={
            "viewer": {**peer, "segmentation_type": "BINARY"},
            "archive": {**peer, "segmentation_type": "LABELMAP"},
        },
        rules=[
            {
                "name": "ct",
                "match": {"modality": "CT"},
                "action": "process",
                "model": "baseline",
                "destinations": ["viewer", "archive"],
            }
        ],
        inference={"workers": 1},
    )
    files = sorted((shared_fixtures / "example_ct_dicom_valid").glob("*.dcm"))
    study_id = {orthanc.upload(path)["ParentStudy"] for path in files}.pop()

    orthanc.post_json("/modalities/node/store", {"Resources": [study_id], "Synchronous": True})

    wait_for(lambda: len(orthanc.get(f"/studies/{study_id}/series")) == 5, timeout=180, what="CT plus 2 SEGs and 2 SRs")
    results = [
        s["MainDicomTags"] for s in orthanc.get(f"/studies/{study_id}/series") if s["MainDicomTags"]["Modality"] != "CT"
    ]
    numbers = sorted(int(tags["SeriesNumber"]) for tags in results)
    descriptions = {tags["SeriesDescription"] for tags in results}
    assert numbers == [9701, 9702, 9704, 9705]  # BINARY SEG and SR, LABELMAP SEG and SR
    assert len(descriptions) == 4 and any(d.startswith("Label map ") for d in descriptions)
    assert all(tags.get("SeriesDate") for tags in results)


def test_destination_down_at_first_gets_the_results_once_when_it_comes_up(tmp_path, start_node):
    """Down for more tries than max_attempts allows: tries that find no association are not counted against it."""
    peer_port = free_port()
    received = tmp_path / "peer"
    received.mkdir()
    node = start_node(
        destinations={"peer": {"ae_title": "PEERSCP", "host": "127.0.0.1", "port": peer_port}},
        rules=rules_to("peer"),
        inference={"workers": 1},
        dispatch={"first_retry_seconds": 0.5, "max_retry_seconds": 1, "max_attempts": 2},
    )
    series = write_phantom_series(tmp_path / "ct", PHANTOM)
    assert storescu(node.port, series.files).returncode == 0

    def unreachable_attempts() -> int:
        with node.sessions() as session:
            job = job_for_series_uid(session, series.series_instance_uid)
            return jobs.delivery_record(job, "peer").unreachable_attempts if job else 0

    wait_for(lambda: unreachable_attempts() >= 4, timeout=120, what="four attempts while the peer is down")
    assert node.job_state(series.series_instance_uid) is JobState.SENDING
    shown = node.cli("show", series.series_instance_uid).stdout
    assert "(0 attempts; not taking files since " in shown
    tries = r"\d+ tries found no association or were answered Out of Resources, not counted against dispatch"
    assert re.search(r"not taking files since [\dT:-]+: " + tries, shown), shown
    peer = subprocess.Popen([require_tool("storescp"), "-aet", "PEERSCP", "-od", str(received), str(peer_port)])
    try:
        node.wait_for_state(series.series_instance_uid, JobState.DONE, timeout=60)
    finally:
        peer.terminate()
        peer.wait()
    arrived = sorted(received.iterdir())
    assert len(arrived) == 2  # one SEG and one SR, each once
    assert {pydicom.dcmread(p).Modality for p in arrived} == {"SEG", "SR"}
    assert "dispatch.attempt_failed" in node.log()


def test_exhausted_attempts_fail_and_retry_resends_the_missing_file(tmp_path, start_node):
    peer_port = free_port()
    received = tmp_path / "peer"
    received.mkdir()
    node = start_node(
        destinations={
            "peer": {
                "ae_title": "PEERSCP",
                "host": "127.0.0.1",
                "port": peer_port,
                "segmentation_type": "LABELMAP",
                "send": ["seg"],
            }
        },
        rules=rules_to("peer"),
        inference={"workers": 1},
        # unreachable for 3.6 s: long enough for several tries (tries that find it down do not use max_attempts)
        dispatch={"first_retry_seconds": 0.2, "max_retry_seconds": 0.2, "max_attempts": 2, "unreachable_hours": 0.001},
    )
    series = write_phantom_series(tmp_path / "ct", PHANTOM)
    storescu(node.port, series.files)

    node.wait_for_state(series.series_instance_uid, JobState.FAILED, timeout=120)
    reason = node.job_reason(series.series_instance_uid)
    assert reason.startswith("sending failed: peer received 0 of 1 file: PEERSCP@127.0.0.1:")
    assert re.search(
        r"is unreachable \(no association: destination down, or not answering\) "
        r"\(not taking files since \d{4}-\d\d-\d\d \d\d:\d\d UTC\)$",
        reason,
    ), reason
    with node.sessions() as session:
        record = jobs.delivery_record(job_for_series_uid(session, series.series_instance_uid), "peer")
    assert record.attempts == 0 and record.unreachable_attempts > 2

    # -pm: this 2022 DCMTK does not know the Label Map Segmentation SOP class yet
    peer = subprocess.Popen([require_tool("storescp"), "-pm", "-aet", "PEERSCP", "-od", str(received), str(peer_port)])
    try:
        retried = node.cli("retry", series.series_instance_uid)
        assert retried.returncode == 0 and "SENDING" in retried.stdout
        node.wait_for_state(series.series_instance_uid, JobState.DONE, timeout=60)
    finally:
        peer.terminate()
        peer.wait()
    assert [pydicom.dcmread(p).SOPClassUID for p in sorted(received.iterdir())] == ["1.2.840.10008.5.1.4.1.1.66.7"]


# --- delivery records, the failure reason and retry, on the database alone ------------------------


@pytest.fixture
def sessions(tmp_path):
    from db.session import make_engine, make_session_factory, migrate

    url = f"sqlite:///{tmp_path / 'node.db'}"
    migrate(url)
    return make_session_factory(make_engine(url))


def sending_job(session, files: dict[str, dict[str, str]]):
    """A SENDING job whose destinations take ``files`` (destination -> SOP Instance UID -> path)."""
    from db import jobs
    from db.models import Series, Study

    series = Series(series_instance_uid="1.2.3", study=Study(study_instance_uid="1.2"), modality="CT")
    job = jobs.open_job(session, series)
    jobs.mark_complete(session, job, "quiet")
    jobs.queue(session, job, rule_name="ct", model_name="baseline", destinations=list(files))
    session.flush()  # the job gets its id
    assert jobs.claim(session, job, "test-host:1", timedelta(minutes=5))
    paths = sorted({path for planned in files.values() for path in planned.values()})
    jobs.finish_processing(session, job, JobState.SENDING, "segmented", result_path="/r", result_files=paths)
    for name, planned in files.items():
        jobs.plan_delivery(session, job, name, planned)
    return job


def deliver(session, job, name: str, uid: str) -> None:
    from db import jobs

    jobs.record_delivery(
        session,
        job.id,
        name,
        sop_instance_uid=uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
        path=f"/results/{uid}.dcm",
        status=0,
    )


def test_failure_reason_says_which_destination_lacks_which_files_and_retry_sends_only_those(sessions):
    from db import jobs
    from db.session import transaction
    from dicom_node.dispatch import sending_failure

    with transaction(sessions) as session:
        job = sending_job(session, {"pacs": {"1": "/r/seg.dcm", "2": "/r/sr.dcm"}, "planner": {"3": "/r/rtstruct.dcm"}})
        deliver(session, job, "pacs", "1")
        deliver(session, job, "pacs", "2")
        deliver(session, job, "pacs", "2")  # recorded once, however often it is recorded
        jobs.update_delivery_record(
            job,
            "planner",
            jobs.delivery_record(job, "planner").model_copy(
                update={"attempts": 5, "last_error": "no response within 60 s from PLANNER"}
            ),
        )
        progress = jobs.delivery_progress(session, job)
        assert [p.summary() for p in progress] == ["pacs 2/2", "planner 0/1"]
        assert [p.missing for p in progress] == [{}, {"3": "/r/rtstruct.dcm"}]
        jobs.fail(session, job, sending_failure(progress))
        assert job.reason == (
            "sending failed: pacs received 2 of 2 files; planner received 0 of 1 file: "
            "no response within 60 s from PLANNER (after 5 attempts)"
        )
        jobs.retry(session, job)
        assert job.state is JobState.SENDING and jobs.delivery_record(job, "planner").attempts == 0
        assert jobs.delivered_sop_instance_uids(session, job.id, "pacs") == {"1", "2"}


def test_retry_routes_again_when_every_destination_has_its_files(sessions):
    from db import jobs
    from db.session import transaction

    with transaction(sessions) as session:
        job = sending_job(session, {"pacs": {"1": "/r/seg.dcm"}})
        deliver(session, job, "pacs", "1")
        jobs.fail(session, job, "sending failed: the operator stopped it")
        assert not jobs.lacks_deliveries(session, job)
        jobs.retry(session, job)
        assert job.state is JobState.COMPLETE


# --- an attempt that fails after the destination accepted a file ---------------------------------------------


@pytest.fixture
def processed_for_pacs(tmp_path):
    """A SENDING job (baseline model, SEG and SR for "pacs"), and a Storage SCP as that PACS noting what it got."""
    from sqlalchemy import select

    from db.models import Job
    from db.session import make_engine, make_session_factory, migrate, transaction
    from dicom_node.config import Settings
    from dicom_node.worker import InferenceWorker
    from tests.conftest import seed_queued_series
    from tests.test_dispatch_faults import Peer

    pacs = Peer("PACS").start()
    settings = Settings(
        storage={"directory": tmp_path / "storage"},
        inference={"workers": 0},
        dispatch={
            "check_interval_seconds": 0.2,
            "first_retry_seconds": 0.5,
            "max_retry_seconds": 0.5,
            "max_attempts": 2,
        },
        destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port, "send": ["seg", "sr"]}},
    )
    migrate(settings.database_url)
    sessions = make_session_factory(make_engine(settings.database_url))
    small = PhantomSpec(rows=32, columns=32, slices=12, pixel_spacing=(8.0, 8.0), slice_spacing=10.0)
    (uid,) = seed_queued_series(sessions, tmp_path / "ct", 1, small)
    with transaction(sessions) as session:
        session.scalars(select(Job)).one().destinations = ["pacs"]
    assert InferenceWorker(settings, sessions, "test-host:1").run_once()
    try:
        yield settings, sessions, uid, pacs
    finally:
        pacs.stop()


def run_dispatcher_until(settings, sessions, uid: str, state: JobState) -> None:
    from dicom_node.dispatch import Dispatcher

    dispatcher = Dispatcher(settings, sessions)
    dispatcher.start()
    try:
        wait_for(
            lambda: _state(sessions, uid) is state, timeout=60, interval=0.1, what=f"the job to become {state.value}"
        )
    finally:
        dispatcher.stop()


def _state(sessions, uid: str) -> JobState:
    with sessions() as session:
        return job_for_series_uid(session, uid).state


def test_a_full_database_disk_while_recording_a_delivery_waits_instead_of_sending_the_file_again(
    processed_for_pacs, monkeypatch
):
    from sqlalchemy.exc import OperationalError

    settings, sessions, uid, pacs = processed_for_pacs
    real, refusals = jobs.record_delivery, []

    def full_at_first(*args, **kwargs):
        if len(refusals) < 4:
            refusals.append(1)
            raise OperationalError("INSERT INTO deliveries ...", {}, Exception("database or disk is full"))
        return real(*args, **kwargs)

    monkeypatch.setattr(jobs, "record_delivery", full_at_first)
    run_dispatcher_until(settings, sessions, uid, JobState.DONE)

    received = Counter(pacs.received)
    assert len(refusals) == 4
    assert len(received) == 2 and set(received.values()) == {1}, received  # SEG and SR, each accepted once
    with sessions() as session:
        assert jobs.delivery_record(job_for_series_uid(session, uid), "pacs").attempts == 1


def test_an_attempt_that_stops_on_an_unexpected_error_counts_and_waits_its_backoff(processed_for_pacs, monkeypatch):
    settings, sessions, uid, pacs = processed_for_pacs

    def broken(*args, **kwargs):
        raise RuntimeError("a fault no one foresaw")

    monkeypatch.setattr(jobs, "record_delivery", broken)
    run_dispatcher_until(settings, sessions, uid, JobState.FAILED)

    # each of the 2 attempts sent the first file and stopped: counted, not repeated every pass
    received = Counter(pacs.received)
    assert list(received.values()) == [2], received
    with sessions() as session:
        job = job_for_series_uid(session, uid)
        assert jobs.delivery_record(job, "pacs").attempts == 2
        assert job.reason.endswith(
            f"the attempt to send to pacs stopped on an unexpected error (logged with job id {job.id}) (after 2 attempts)"
        )


@pytest.mark.parametrize(
    ("changed", "missing"),
    [
        ({"segmentation_type": "LABELMAP"}, "seg (LABELMAP), sr (LABELMAP)"),
        ({"send": ["seg", "sr", "rtstruct"]}, "rtstruct"),
    ],
)
def test_a_destination_whose_results_were_made_under_another_configuration_gets_none_and_the_job_fails(
    processed_for_pacs, changed, missing
):
    """The worker made BINARY SEG and SR for pacs; the node's pacs now wants another encoding, or an RTSTRUCT too
    (a worker config.yaml that differs, or an edit since): a plan without them would count as delivered."""
    settings, sessions, uid, pacs = processed_for_pacs
    pacs_settings = settings.destinations["pacs"].model_copy(update=changed)
    changed_settings = settings.model_copy(update={"destinations": {"pacs": pacs_settings}})

    run_dispatcher_until(changed_settings, sessions, uid, JobState.FAILED)

    assert pacs.received == []
    with sessions() as session:
        job = job_for_series_uid(session, uid)
        assert jobs.delivery_record(job, "pacs").files is None  # never planned short
        assert job.reason.startswith(
            f"sending failed: pacs received nothing: this job's results hold no {missing}, which destination pacs "
            "takes: they were made under another configuration"
        ), job.reason
        assert f"`dicom-node retry {uid}`" in job.reason
        jobs.retry(session, job)  # resending would find them missing again: the series is processed again
        assert job.state is JobState.COMPLETE


def test_a_node_down_longer_than_unreachable_hours_tries_the_destination_again_before_failing(tmp_path):
    """unreachable_hours counts between attempts that found the destination down, not the node's own downtime."""
    from datetime import datetime, timezone

    from db.results import DeliveryRecord
    from dicom_node.config import Settings
    from dicom_node.dispatch import Dispatcher

    dispatcher = Dispatcher(Settings(storage={"directory": str(tmp_path)}, dispatch={"unreachable_hours": 24}), None)
    now = datetime.now(timezone.utc)
    down_then = now - timedelta(hours=48)
    before_the_weekend = DeliveryRecord(
        unreachable_since=down_then, unreachable_last_at=down_then, unreachable_attempts=3
    )
    still_down_now = before_the_weekend.model_copy(update={"unreachable_last_at": now})

    assert not dispatcher._settled(before_the_weekend), "the node was down: one more attempt first"
    assert dispatcher._settled(still_down_now)


def test_the_wait_between_attempts_stays_at_its_most_however_many_attempts_were_made(tmp_path):
    """A destination down for a day at a short max_retry_seconds is tried thousands of times: 2 to the power of
    each try must not overflow (it used to fail the 1,026th try as an unexpected error and restart its clock)."""
    from dicom_node.config import Settings
    from dicom_node.dispatch import Dispatcher

    settings = Settings(
        storage={"directory": str(tmp_path)}, dispatch={"first_retry_seconds": 2, "max_retry_seconds": 60}
    )
    dispatcher = Dispatcher(settings, None)

    waits = [dispatcher._backoff(tries).total_seconds() for tries in (1, 2, 3, 1_026, 100_000)]
    assert waits == [2, 4, 8, 60, 60]


def test_a_destination_whose_host_name_does_not_resolve_is_unreachable_with_a_sentence(tmp_path):
    """A host name the name server does not know (a typing error, or the name server down) used to stop the send
    on an unexpected error, counted against max_attempts, with a traceback in the log."""
    from dicom_node.config import Destination
    from dicom_node.dispatch import send_files
    from dicom_node.scu import verify

    series = write_phantom_series(tmp_path / "ct", PhantomSpec(rows=16, columns=16, slices=1))
    typo = Destination(ae_title="PACS", host="pacs.nonexistent.invalid", port=104)

    outcome = send_files("DICOMNODE", typo, [str(series.files[0])], timeout=10)
    echo = verify("DICOMNODE", "PACS", "pacs.nonexistent.invalid", 104)

    assert outcome.unreachable and outcome.sent == []
    assert outcome.error == (
        "PACS@pacs.nonexistent.invalid:104 is unreachable: the host name 'pacs.nonexistent.invalid' cannot be "
        "resolved to an address (a typing error in the configured host, or the name server is not answering)"
    )
    assert not echo.ok and echo.message.startswith("the host name 'pacs.nonexistent.invalid' cannot be resolved")


def test_a_plan_made_once_the_results_hold_every_kind_clears_an_earlier_lack():
    """Noted under older settings, a lack would make a later retry of that destination process the series again
    although its results now hold all it takes."""
    from db.models import Job

    job = Job(deliveries={})
    jobs.note_results_lacking(job, "pacs", ["rtstruct"])
    assert jobs.delivery_record(job, "pacs").lacking == ["rtstruct"]

    jobs.plan_delivery(None, job, "pacs", {"1.2.3": "/results/rtstruct.dcm"})

    record = jobs.delivery_record(job, "pacs")
    assert record.lacking == [] and record.files == {"1.2.3": "/results/rtstruct.dcm"}


@pytest.mark.parametrize(
    ("orthanc_config", "called_ae", "reason", "unreachable"),
    [
        (
            {"DicomCheckCalledAet": True},
            "ARCHIVE",
            "rejected the association: it does not know the AE title 'ARCHIVE' it was called by",
            False,
        ),
        (
            {"DicomAlwaysAllowStore": False, "DicomAlwaysAllowEcho": False},
            "ORTHANC",
            "rejected the association: it does not know the node's AE title 'DICOMNODE' as a peer",
            False,
        ),
        (
            {"AcceptedTransferSyntaxes": ["1.2.840.10008.1.2.4.50"]},
            "ORTHANC",
            "accepted the association but none of the SOP classes the node proposed: CT Image Storage",
            False,
        ),
    ],
    ids=["called-ae-unknown", "node-unknown", "no-sop-class-accepted"],
)
def test_a_pacs_that_refuses_the_node_is_named_with_its_reason_not_taken_for_down(
    tmp_path, start_orthanc, orthanc_config, called_ae, reason, unreachable
):
    from dicom_node.config import Destination
    from dicom_node.dispatch import send_files

    orthanc = start_orthanc({}, orthanc_config)
    image = write_phantom_series(tmp_path / "ct", PhantomSpec(rows=32, columns=32, slices=2)).files[0]
    destination = Destination(ae_title=called_ae, host="127.0.0.1", port=orthanc.dicom_port)

    outcome = send_files("DICOMNODE", destination, [str(image)], timeout=10)

    assert outcome.sent == [] and outcome.unreachable is unreachable
    assert outcome.error is not None and outcome.error.startswith(
        f"{called_ae}@127.0.0.1:{orthanc.dicom_port} {reason}"
    )
    assert orthanc.get("/instances") == []


def test_a_file_stored_with_a_warning_status_is_named_in_the_done_jobs_warnings_and_by_show(
    processed_for_pacs, tmp_path
):
    """0xB006 (Element Discarded) and 0xB007: stored, so the job is DONE, but the operator is told which file."""
    import yaml
    from typer.testing import CliRunner

    from dicom_node.cli import app

    settings, sessions, uid, pacs = processed_for_pacs
    pacs.statuses = [0xB006, 0xB007]
    run_dispatcher_until(settings, sessions, uid, JobState.DONE)

    with sessions() as session:
        job = job_for_series_uid(session, uid)
        files = [f.path.rsplit("/", 1)[-1] for f in job.result_files or []]
        warnings = job.warnings or []
    assert len(files) == 2
    said = " | ".join(warnings)
    assert f"pacs stored {files[0]} with warning 0xB006 (Element Discarded)" in said, said
    assert f"pacs stored {files[1]} with warning 0xB007 (Data Set Does Not Match SOP Class)" in said, said
    config = tmp_path / "show.yaml"
    config.write_text(yaml.safe_dump({"storage": {"directory": str(settings.storage.directory)}}))
    shown = CliRunner().invoke(app, ["show", uid, "--config", str(config)])
    assert shown.exit_code == 0, shown.output
    assert f"pacs stored {files[0]} with warning 0xB006" in " ".join(shown.output.split())


def test_a_database_locked_between_two_files_is_waited_for_and_never_counted_as_an_attempt(
    processed_for_pacs, monkeypatch
):
    """Another process holds the SQLite write lock longer than the busy timeout right after the first file was
    recorded: the reads between files (superseded?, the audit's study) must not fail the attempt."""
    import sqlite3
    import threading

    from sqlalchemy import select

    from db.models import AuditEvent
    from db.session import make_engine, make_session_factory
    from dicom_node.dispatch import Dispatcher

    settings, _, uid, pacs = processed_for_pacs
    busy = 1.0
    sessions = make_session_factory(make_engine(settings.database_url, busy))
    settings = settings.model_copy(update={"dispatch": settings.dispatch.model_copy(update={"max_attempts": 1})})
    database = settings.storage.directory / "dicom-node.db"
    held: list[sqlite3.Connection] = []
    record = Dispatcher._record_delivery

    def record_then_another_process_writes(self, *args, **kwargs):
        record(self, *args, **kwargs)
        if not held:  # the lock is taken right after the first file's record, before the second file
            holder = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
            holder.execute("BEGIN EXCLUSIVE")
            held.append(holder)
            threading.Timer(busy + 2, lambda: (holder.rollback(), holder.close())).start()

    monkeypatch.setattr(Dispatcher, "_record_delivery", record_then_another_process_writes)
    dispatcher = Dispatcher(settings, sessions)
    dispatcher.start()
    try:
        wait_for(lambda: _settled_state(sessions, uid), timeout=60, interval=0.1, what="the job to settle")
    finally:
        dispatcher.stop()

    assert held, "the lock was taken while sending"
    with sessions() as session:
        job = job_for_series_uid(session, uid)
        assert job.state is JobState.DONE, job.reason
        assert jobs.delivery_record(job, "pacs").attempts == 1
        sends = list(session.scalars(select(AuditEvent.detail).where(AuditEvent.action == "send")))
    assert sends == [f"job {job.id}: 2 of 2 file(s) accepted"]  # one attempt sent both: the lock only delayed it
    received = Counter(pacs.received)
    assert len(received) == 2 and set(received.values()) == {1}, received


def _settled_state(sessions, uid: str) -> JobState | None:
    """DONE or FAILED, or None (also while the test's own lock holder keeps the database)."""
    from sqlalchemy.exc import OperationalError

    try:
        state = _state(sessions, uid)
    except OperationalError:
        return None
    return state if state in (JobState.DONE, JobState.FAILED) else None


def test_an_attempt_planned_before_the_clock_was_set_back_is_made_at_once(processed_for_pacs):
    """A retry planned for 14:10 by a clock an hour fast waited an hour, far past dispatch.max_retry_seconds."""
    from datetime import timedelta

    from db.models import utcnow
    from db.results import DeliveryRecord
    from db.session import transaction

    settings, sessions, uid, pacs = processed_for_pacs
    with transaction(sessions) as session:
        job = job_for_series_uid(session, uid)
        jobs.update_delivery_record(
            job, "pacs", DeliveryRecord(attempts=1, next_attempt_at=utcnow() + timedelta(hours=1))
        )

    run_dispatcher_until(settings, sessions, uid, JobState.DONE)

    assert len(Counter(pacs.received)) == 2  # SEG and SR


def test_a_clock_stepped_forward_a_day_does_not_fail_a_job_whose_pacs_was_down_for_seconds(
    processed_for_pacs, monkeypatch
):
    """The PACS restarts for an update; between two tries the wall clock is stepped forward 25 h (a VM restored,
    NTP correcting a clock that was behind). dispatch.unreachable_hours (24 h) counts the tries' own spacing, not
    the step: the job goes on trying instead of failing at once as unreachable for a day."""
    from datetime import datetime as real_datetime

    import dicom_node.dispatch as dispatch
    from dicom_node.dispatch import Dispatcher

    settings, sessions, uid, pacs = processed_for_pacs
    pacs.stop()
    step = [timedelta(0)]

    class SteppedDatetime(real_datetime):
        @classmethod
        def now(cls, tz=None):  # type: ignore[no-untyped-def]
            return real_datetime.now(tz) + step[0]

    monkeypatch.setattr(dispatch, "datetime", SteppedDatetime)

    def record():
        with sessions() as session:
            job = job_for_series_uid(session, uid)
            return job.state, job.reason, jobs.delivery_record(job, "pacs")

    dispatcher = Dispatcher(settings, sessions)
    dispatcher.start()
    try:
        wait_for(lambda: record()[2].unreachable_attempts >= 1, what="a first try that finds the PACS down")
        step[0] = timedelta(hours=25)
        tries = record()[2].unreachable_attempts
        wait_for(lambda: record()[2].unreachable_attempts >= tries + 3, what="three more tries after the step")
    finally:
        dispatcher.stop()

    state, reason, delivery = record()
    assert state is JobState.SENDING, reason
    assert delivery.unreachable_since is not None and delivery.unreachable_last_at is not None
    assert delivery.unreachable_last_at - delivery.unreachable_since < timedelta(minutes=5)
