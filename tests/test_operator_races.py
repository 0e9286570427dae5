"""Operator actions and re-runs racing the pipeline: a series re-opened while its re-routed results go out, a retry
after retention purged the images, a cancel while the dispatcher is finished with a destination, and the command
line's retry, cancel and purge (named in the job's events and in the audit trail)."""

from __future__ import annotations

import getpass
import os
import subprocess
import threading
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
import yaml
from sqlalchemy import select

from db import jobs
from db.ingest import record_instance
from db.jobs import job_for_series_uid
from db.models import AuditEvent, JobEvent, JobState, Series, Study, utcnow
from db.session import NodeLock, make_engine, make_session_factory, migrate, transaction
from dicom_node.config import Settings
from dicom_node.console.queries import job_summary
from dicom_node.phantom import PhantomSpec, write_phantom_series
from tests.conftest import DICOM_NODE, ct_instance, wait_for

SMALL = PhantomSpec(rows=32, columns=32, slices=13, pixel_spacing=(8.0, 8.0), slice_spacing=10.0)
CT_TO_PACS = {"name": "ct", "match": {"modality": "CT"}, "action": "process", "model": "baseline"}


def _state(sessions, uid: str) -> JobState:
    with sessions() as session:
        return job_for_series_uid(session, uid).state


def _receive(sessions, series, paths: list[Path]) -> None:
    """Record instances as the receiver does (the files are real CT images)."""
    uids = dict(zip(series.files, series.sop_instance_uids, strict=True))
    with transaction(sessions) as session:
        for path in paths:
            record_instance(
                session,
                ct_instance(
                    uids[path], series.series_instance_uid, study_instance_uid=series.study_instance_uid, path=path
                ),
            )


def _routed(watcher, sessions, uid: str) -> None:
    """Watcher passes until the quiet series is complete and routed (QUEUED)."""

    def queued() -> bool:
        watcher.run_once()
        return _state(sessions, uid) is JobState.QUEUED

    wait_for(queued, timeout=30, interval=0.1, what="the series to be completed and routed")


@pytest.fixture
def node_parts(tmp_path):
    """The node's watcher, an inference worker and the dispatcher, in this process; a PACS and a planner."""
    from dicom_node.dispatch import Dispatcher
    from dicom_node.watcher import SeriesWatcher
    from dicom_node.worker import InferenceWorker
    from tests.test_dispatch_faults import Peer

    pacs, planner = Peer("PACS").start(), Peer("PLANNER").start()
    settings = Settings(
        storage={"directory": tmp_path / "storage"},
        completion={"quiet_seconds": 1, "check_interval_seconds": 0.1},
        inference={"workers": 0},
        dispatch={"check_interval_seconds": 0.1, "first_retry_seconds": 0.5, "max_retry_seconds": 0.5},
        rules=[{**CT_TO_PACS, "destinations": ["pacs"]}],
        destinations={
            "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port},
            "planner": {"ae_title": "PLANNER", "host": "127.0.0.1", "port": planner.port},
        },
    )
    migrate(settings.database_url)
    sessions = make_session_factory(make_engine(settings.database_url))
    dispatcher = Dispatcher(settings, sessions)
    dispatcher.start()
    try:
        yield (
            settings,
            sessions,
            SeriesWatcher(settings, sessions),
            InferenceWorker(settings, sessions, "test-host:1"),
            pacs,
            planner,
        )
    finally:
        dispatcher.stop()
        pacs.stop()
        planner.stop()


# --- 1. a new run goes wherever an earlier run's results went --------------------------------------------------


def test_a_series_reopened_while_its_rerouted_results_go_to_the_planner_sends_the_new_run_there_too(
    node_parts, tmp_path
):
    """The operator re-routes a DONE series to the planner; while the planner stores its first file, the PACS sends
    one more image. The rules route the new run to the PACS; the planner, which keeps a file of the superseded run,
    gets the new run too, and the job says so."""
    _settings, sessions, watcher, worker, pacs, planner = node_parts
    series = write_phantom_series(tmp_path / "ct", SMALL)
    uid = series.series_instance_uid
    *first, late = series.files
    _receive(sessions, series, first)
    _routed(watcher, sessions, uid)
    assert worker.run_once()
    wait_for(lambda: _state(sessions, uid) is JobState.DONE, timeout=60, what="run 1 to reach the PACS")

    with transaction(sessions) as session:
        job = job_for_series_uid(session, uid, lock=True)
        jobs.reroute(session, job, rule_name="to-planner", model_name="baseline", destinations=["planner"], by="olga")
    arrived = threading.Event()

    def one_more_image_arrives(_sop_instance_uid: str) -> None:
        if not arrived.is_set():
            _receive(sessions, series, [late])  # re-opens the series while this file is in flight
            arrived.set()

    planner.before_answer = one_more_image_arrives
    assert worker.run_once()  # run 2, for the planner
    wait_for(arrived.is_set, timeout=60, what="the planner to be sending run 2 when the image arrives")
    _routed(watcher, sessions, uid)
    assert worker.run_once()  # run 3
    wait_for(lambda: _state(sessions, uid) is JobState.DONE, timeout=60, what="run 3 to be sent")

    with sessions() as session:
        job = job_for_series_uid(session, uid)
        assert job.rule_name == "ct" and job.destinations == ["pacs", "planner"]
        run_3 = jobs.delivery_record(job, "planner").files or {}
        assert set(jobs.delivery_record(job, "pacs").files or {}) <= set(pacs.acknowledged)
        assert run_3 and all("/run-3/" in path for path in run_3.values())
        assert "planner was sent results of an earlier run of this series, so it is sent this run too" in (
            job.warnings or []
        )
        queued = session.scalars(
            select(JobEvent.reason).where(JobEvent.job_id == job.id, JobEvent.to_state == JobState.QUEUED)
        ).all()[-1]
    assert set(run_3) <= set(planner.acknowledged)  # the planner holds the new run, not only the superseded one
    (sr,) = [path for path in run_3.values() if Path(path).name.startswith("sr-")]
    assert "earlier run" not in str(pydicom.dcmread(sr).ContentSequence)  # where results go is not the SR's say
    assert queued == (
        "rule 'ct': process with model 'baseline' (routed by the rules again; before, it was routed to rule "
        "'to-planner' with model 'baseline' for planner, which is not kept: re-route it again if that is still wanted)"
    )


def test_sending_stops_saying_which_newer_run_replaced_the_results(tmp_path):
    from dicom_node.dispatch import Dispatcher

    settings = Settings(storage={"directory": tmp_path / "storage"})
    migrate(settings.database_url)
    sessions = make_session_factory(make_engine(settings.database_url))
    with transaction(sessions) as session:
        job = jobs.open_job(session, Series(series_instance_uid="1.2.3", study=Study(study_instance_uid="1.2")))
        for run, folder in ((1, "/r/jobs/1"), (2, "/r/jobs/1/run-2")):
            if run == 2:
                jobs.reopen(session, job)
            jobs.mark_complete(session, job, "quiet")
            jobs.queue(session, job, rule_name="ct", model_name="baseline", destinations=["pacs"])
            session.flush()
            assert jobs.claim(session, job, "test-host:1", timedelta(minutes=5))
            jobs.finish_processing(
                session, job, JobState.SENDING, "segmented", result_path=folder, result_files=[f"{folder}/seg.dcm"]
            )
        job_id = job.id

    first_run = ("/r/jobs/1/seg.dcm",)  # the run key: its result files
    assert Dispatcher(settings, sessions)._superseded(job_id, first_run) == (
        f"sending stopped: job {job_id}'s results were replaced by a newer run of the series (run-2) while they were "
        "being sent, so the rest of them are not sent; the results of run-2 are sent instead"
    )


# --- 2. a retry resends kept results without the purged images ---------------------------------------------------


def test_retry_resends_the_kept_results_of_a_series_whose_images_retention_purged(node_parts, tmp_path):
    from dicom_node.config import RetentionSettings
    from dicom_node.retention import apply_plan, plan_retention

    settings, sessions, watcher, worker, pacs, _planner = node_parts
    settings.dispatch.max_attempts = 1
    series = write_phantom_series(settings.storage.directory / "instances" / "ct", SMALL)
    uid = series.series_instance_uid
    pacs.statuses = [0xC000] * 10  # cannot understand: the PACS refuses every file of the one attempt
    _receive(sessions, series, list(series.files))
    _routed(watcher, sessions, uid)
    assert worker.run_once()
    wait_for(lambda: _state(sessions, uid) is JobState.FAILED, timeout=60, what="sending to fail")
    pacs.statuses = []
    images_only = RetentionSettings(days=0.000001, results_days=30)
    with sessions() as session:
        plan = plan_retention(session, images_only, now=utcnow() + timedelta(seconds=1))
    purged = apply_plan(sessions, settings, plan)
    assert [(item.images, item.results) for item in purged.purged] == [(True, False)]

    with transaction(sessions) as session:
        job = job_for_series_uid(session, uid, lock=True)
        assert job.series.purged_at is not None and job.result_files
        jobs.retry(session, job, by="olga")
        assert job.reason == "resend of the missing files requested by olga"
    wait_for(lambda: _state(sessions, uid) is JobState.DONE, timeout=60, what="the kept results to be resent")
    with sessions() as session:
        planned = jobs.delivery_record(job_for_series_uid(session, uid), "pacs").files or {}
    assert planned and set(planned) <= set(pacs.acknowledged)


# --- 3. to 6. the command line: retry, cancel and purge, named and audited ----------------------------------------


@pytest.fixture
def cli_node(tmp_path):
    """A node's configuration and database (no running node): dispatch gives up on a destination after 1 attempt."""
    storage = tmp_path / "storage"
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage": {"directory": str(storage)},
                "dispatch": {"max_attempts": 1},
                "destinations": {
                    "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 45501},
                    "planner": {"ae_title": "PLANNER", "host": "127.0.0.1", "port": 45502},
                },
            }
        )
    )
    url = f"sqlite:///{storage / 'dicom-node.db'}"
    migrate(url)
    return config, make_session_factory(make_engine(url))


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DICOM_NODE, *args, "--config", str(config)], capture_output=True, text=True, timeout=120)


def _sending_job(sessions, uid: str, storage: Path) -> None:
    """A SENDING series (one image in ``storage``) whose PACS used its one attempt (the dispatcher is finished with
    it; its next try, no longer made, is past) and whose planner waits for its next try."""
    now = utcnow()
    image = storage / "instances" / f"{uid}.1.dcm"
    image.parent.mkdir(parents=True, exist_ok=True)
    image.write_bytes(b"\0" * 128)
    with transaction(sessions) as session:
        record_instance(session, ct_instance(f"{uid}.1", uid, study_instance_uid=f"{uid}.9", path=image))
        job = job_for_series_uid(session, uid)
        jobs.mark_complete(session, job, "quiet")
        jobs.queue(session, job, rule_name="ct", model_name="baseline", destinations=["pacs", "planner"])
        session.flush()
        assert jobs.claim(session, job, "test-host:1", timedelta(minutes=5))
        jobs.finish_processing(
            session, job, JobState.SENDING, "segmented", result_path="/r", result_files=["/r/seg.dcm"]
        )
        refused = "PACS refused seg.dcm with status 0xA700 (Refused: Out of Resources)"
        jobs.record_attempt(
            session, job, "pacs", now=now, complete=False, error=refused, next_attempt_at=now - timedelta(seconds=5)
        )
        jobs.record_attempt(
            session, job, "planner", now=now, complete=False, error="down", next_attempt_at=now + timedelta(hours=1)
        )


def _operator_audit(sessions) -> list[tuple[str, str | None, str]]:
    with sessions() as session:
        rows = session.scalars(select(AuditEvent).where(AuditEvent.action == "operator").order_by(AuditEvent.id))
        return [(row.outcome, row.study_instance_uid, row.detail or "") for row in rows]


def _reasons(sessions, uid: str) -> list[str]:
    with sessions() as session:
        job = job_for_series_uid(session, uid)
        return [e.reason or "" for e in session.scalars(select(JobEvent).where(JobEvent.job_id == job.id))]


def test_cancel_of_a_sending_series_whose_pacs_the_dispatcher_is_finished_with_is_not_refused(cli_node):
    config, sessions = cli_node
    storage = config.parent / "storage"
    _sending_job(sessions, "1.2.7", storage)

    cancelled = cli(config, "cancel", "1.2.7")

    assert cancelled.returncode == 0, cancelled.stderr
    assert _state(sessions, "1.2.7") is JobState.FAILED


def test_cli_retry_cancel_and_purge_name_the_os_user_and_are_audited(cli_node):
    config, sessions = cli_node
    me = f"OS user {getpass.getuser()} on the command line"
    now = utcnow()
    _sending_job(sessions, "1.2.7", config.parent / "storage")
    with transaction(sessions) as session:  # the PACS's one attempt is due now: its files may be on their way
        job = job_for_series_uid(session, "1.2.7")
        jobs.update_delivery_record(
            job, "pacs", jobs.delivery_record(job, "pacs").model_copy(update={"attempts": 0, "next_attempt_at": now})
        )

    purge_sending = cli(config, "purge", "--series", "1.2.7")
    running = NodeLock(f"sqlite:///{config.parent / 'storage' / 'dicom-node.db'}")
    assert running.try_take()  # a node runs: its dispatcher may be sending the files now
    busy = cli(config, "cancel", "1.2.7")
    running.release()
    with transaction(sessions) as session:  # the attempt ended: the PACS waits for its next try
        job = job_for_series_uid(session, "1.2.7")
        later = now + timedelta(hours=1)
        jobs.update_delivery_record(
            job, "pacs", jobs.delivery_record(job, "pacs").model_copy(update={"next_attempt_at": later})
        )
    cancelled = cli(config, "cancel", "1.2.7")
    retried = cli(config, "retry", "1.2.7")
    refused = cli(config, "retry", "1.2.7")
    with transaction(sessions) as session:
        jobs.fail(session, job_for_series_uid(session, "1.2.7"), "sending failed: put there by the test")
    purged = cli(config, "purge", "--series", "1.2.7")
    listed = cli(config, "audit", "--action", "operator")

    assert purge_sending.returncode == 1
    assert "(cancel it first, once no destination is receiving it: `dicom-node cancel 1.2.7`)" in purge_sending.stderr
    assert busy.returncode == 1 and "cannot cancel: the results are being sent to pacs now" in busy.stderr
    assert cancelled.returncode == 0, cancelled.stderr
    assert retried.returncode == 0, retried.stderr
    assert refused.returncode == 1 and "cannot retry: series is SENDING" in refused.stderr
    assert purged.returncode == 0, purged.stderr
    assert listed.returncode == 0 and "operator" in listed.stdout
    reasons = _reasons(sessions, "1.2.7")
    assert f"cancelled by {me} (was SENDING)" in reasons
    assert f"resend of the missing files requested by {me}" in reasons
    outcomes = [(outcome, study) for outcome, study, _ in _operator_audit(sessions)]
    details = [detail for _, _, detail in _operator_audit(sessions)]
    assert outcomes == [("refused", "1.2.7.9")] * 2 + [("success", "1.2.7.9")] * 2 + [("refused", "1.2.7.9")] + [
        ("success", "1.2.7.9")
    ]
    assert details[0].startswith(f"{me}: purge of series 1.2.7 refused: series 1.2.7 is SENDING")
    assert details[1].startswith(f"{me}: cancel of series 1.2.7 refused: the results are being sent to pacs now")
    assert details[2:4] == [f"{me}: cancel of series 1.2.7: now FAILED", f"{me}: retry of series 1.2.7: now SENDING"]
    assert details[4].startswith(f"{me}: retry of series 1.2.7 refused: series is SENDING")
    assert details[5] == (
        f"{me}: purge of series 1.2.7: its images deleted: requested by the operator (dicom-node purge --series)"
    )


def test_a_cli_retry_of_a_series_the_node_does_not_hold_is_audited(cli_node):
    config, sessions = cli_node

    refused = cli(config, "retry", "9.9.9")

    assert refused.returncode == 1 and "cannot retry: no series 9.9.9 on this node" in refused.stderr
    assert _operator_audit(sessions) == [
        (
            "refused",
            None,
            f"OS user {getpass.getuser()} on the command line: retry of series 9.9.9 refused: "
            "no series 9.9.9 on this node",
        )
    ]


def test_a_purged_series_sent_again_for_another_patient_goes_only_where_the_rules_send_it_now(tmp_path):
    """Run 1 came from a research scanner and went to the research destination; retention purged the images; the
    PACS sends the series again, corrected, under another patient and study. The rules send it to the PACS only:
    the research destination, which holds the earlier patient's results, must get nothing of the other patient."""
    from dataclasses import replace

    from dicom_node.dispatch import Dispatcher
    from dicom_node.retention import apply_plan, plan_retention
    from dicom_node.watcher import SeriesWatcher
    from dicom_node.worker import InferenceWorker
    from tests.test_dispatch_faults import Peer

    pacs, research = Peer("PACS").start(), Peer("RESEARCH").start()
    research_rule = {**CT_TO_PACS, "name": "research", "match": {"modality": "CT", "calling_ae_title": ["RESEARCHCT"]}}
    settings = Settings(
        storage={"directory": tmp_path / "storage"},
        completion={"quiet_seconds": 1, "check_interval_seconds": 0.1},
        inference={"workers": 0},
        dispatch={"check_interval_seconds": 0.1, "first_retry_seconds": 0.5, "max_retry_seconds": 0.5},
        rules=[{**research_rule, "destinations": ["research"]}, {**CT_TO_PACS, "destinations": ["pacs"]}],
        destinations={
            "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port},
            "research": {"ae_title": "RESEARCH", "host": "127.0.0.1", "port": research.port},
        },
    )
    migrate(settings.database_url)
    sessions = make_session_factory(make_engine(settings.database_url))
    watcher, worker = SeriesWatcher(settings, sessions), InferenceWorker(settings, sessions, "test-host:1")
    dispatcher = Dispatcher(settings, sessions)
    dispatcher.start()
    try:
        first = write_phantom_series(tmp_path / "first", replace(SMALL, patient_id="P1-RESEARCH"))
        uid = first.series_instance_uid

        def received(series, calling_ae_title: str) -> None:
            with transaction(sessions) as session:
                for path, sop in zip(series.files, series.sop_instance_uids, strict=True):
                    record = ct_instance(sop, uid, study_instance_uid=series.study_instance_uid, path=path)
                    record_instance(
                        session,
                        replace(
                            record,
                            study=replace(record.study, patient_id=pydicom.dcmread(path).PatientID),
                            calling_ae_title=calling_ae_title,
                        ),
                    )

        received(first, "RESEARCHCT")
        _routed(watcher, sessions, uid)
        assert worker.run_once()
        wait_for(lambda: _state(sessions, uid) is JobState.DONE, timeout=60, what="run 1 to reach the research AE")
        held = len(research.acknowledged)
        assert held and not pacs.acknowledged
        with sessions() as session:
            plan = plan_retention(
                session,
                settings.retention.model_copy(update={"days": 1e-6, "results_days": 30}),
                now=utcnow() + timedelta(seconds=1),
            )
        assert [item.images for item in apply_plan(sessions, settings, plan).purged] == [True]

        again = write_phantom_series(tmp_path / "again", replace(SMALL, series_instance_uid=uid, patient_id="P2"))
        received(again, "PACS")
        _routed(watcher, sessions, uid)
        assert worker.run_once()
        wait_for(lambda: _state(sessions, uid) is JobState.DONE, timeout=60, what="run 2 to reach the PACS")
        with sessions() as session:
            job = job_for_series_uid(session, uid)
            assert (job.rule_name, job.destinations) == ("ct", ["pacs"])
            assert not any(jobs.is_earlier_results_warning(w) for w in job.warnings or [])
    finally:
        dispatcher.stop()
        pacs.stop()
        research.stop()
    assert len(research.acknowledged) == held  # nothing of the other patient
    assert pacs.acknowledged


def test_a_cli_retry_of_a_done_series_asks_for_run_again_before_sending_a_second_set_of_results(cli_node):
    """Two operators retried a series that had failed while sending: the first resent its missing files and it was
    soon DONE; the second, found DONE, processed it again and PACS got a second set of results."""
    config, sessions = cli_node
    _sending_job(sessions, "1.2.8", config.parent / "storage")
    with transaction(sessions) as session:
        jobs.finish_sending(session, job_for_series_uid(session, "1.2.8"), "sent to pacs and planner")

    refused = cli(config, "retry", "1.2.8")
    still = _state(sessions, "1.2.8")
    again = cli(config, "retry", "--run-again", "1.2.8")

    assert refused.returncode == 1 and still is JobState.DONE
    assert (
        "cannot retry: series is DONE: its results were delivered; retrying it processes it again and sends a "
        "second set of results (marked as replacing the first): ask for that with --run-again"
    ) in " ".join(refused.stderr.split())
    assert again.returncode == 0, again.stderr
    assert _state(sessions, "1.2.8") is JobState.COMPLETE


def test_a_cli_cancel_with_no_node_running_is_not_told_the_files_are_being_sent(cli_node):
    """With the node stopped (killed during an attempt), cancel said 'the results are being sent to pacs now', and
    once the node was started again its dispatcher sent at once: the operator could not cancel at all."""
    config, sessions = cli_node
    _sending_job(sessions, "1.2.9", config.parent / "storage")
    with transaction(sessions) as session:  # the PACS's attempt was due when the node stopped
        job = job_for_series_uid(session, "1.2.9")
        jobs.update_delivery_record(
            job, "pacs", jobs.delivery_record(job, "pacs").model_copy(update={"attempts": 0, "next_attempt_at": None})
        )

    cancelled = cli(config, "cancel", "1.2.9")

    assert cancelled.returncode == 0, cancelled.stderr
    assert _state(sessions, "1.2.9") is JobState.FAILED


def test_status_says_what_a_destination_lacking_files_last_answered_while_the_series_waits_to_send(cli_node):
    """A series SENDING for hours while its PACS was down showed only 'segmented ...' and 'pacs 0/1' in the status
    table; why it waited was only in `dicom-node show`."""
    config, sessions = cli_node
    _sending_job(sessions, "1.2.10", config.parent / "storage")
    with transaction(sessions) as session:
        job = job_for_series_uid(session, "1.2.10")
        progress = {p.destination: p.waiting_note() for p in jobs.delivery_progress(session, job)}
        worklist_row = job_summary(session, job, with_patient=False)  # the console's worklist and /api/jobs

    wide = {**os.environ, "COLUMNS": "1000"}  # the table's cells on one line each
    status = subprocess.run(
        [DICOM_NODE, "status", "--config", str(config)], capture_output=True, text=True, timeout=120, env=wide
    )

    assert status.returncode == 0, status.stderr
    assert progress == {
        "pacs": "pacs: PACS refused seg.dcm with status 0xA700 (Refused: Out of Resources)",
        "planner": "planner: down",
    }
    assert worklist_row["delivery_waiting"] == [progress["pacs"], progress["planner"]]
    assert f"pacs ?/?, planner ?/?; waiting for {progress['pacs']}; waiting for {progress['planner']}" in status.stdout


def test_a_cli_cancel_without_a_database_leaves_no_lock_file_or_folder_behind(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"storage": {"directory": str(tmp_path / "storage")}}))

    refused = cli(config, "cancel", "1.2.3")

    assert refused.returncode == 1 and "no database at" in refused.stderr
    assert not (tmp_path / "storage").exists()


def test_show_cancel_and_purge_of_a_series_of_results_name_the_ct_series_it_was_made_from(cli_node):
    """A planning system pulled a SEG; its SeriesInstanceUID given to show, cancel or purge was answered "no series
    on this node", as for a UID the node never held, although Query/Retrieve serves it."""
    from dataclasses import replace

    from db.ingest import SeriesAttributes, record_results

    config, sessions = cli_node
    with transaction(sessions) as session:
        record_instance(session, ct_instance("1.2.5.1", "1.2.5", study_instance_uid="1.2.9"))
        job = job_for_series_uid(session, "1.2.5")
        seg = ct_instance("1.2.6.1", "1.2.6", study_instance_uid="1.2.9")
        seg = replace(seg, sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4", series=SeriesAttributes("1.2.6", "SEG"))
        record_results(session, job.id, [seg])
        job_id = job.id

    said = (
        f"series 1.2.6 holds results the node made (job {job_id}), not images it received: name the CT series they "
        "were made from, 1.2.5"
    )
    shown, cancelled, purged = (
        cli(config, "show", "1.2.6"),
        cli(config, "cancel", "1.2.6"),
        cli(config, "purge", "--series", "1.2.6"),
    )
    assert shown.returncode == 1 and said in shown.stderr.replace("\n", " ")
    assert cancelled.returncode == 1 and said in cancelled.stderr.replace("\n", " ")
    assert purged.returncode == 1 and said in purged.stderr.replace("\n", " ")
    assert "no series 9.9.9 on this node" in cli(config, "show", "9.9.9").stderr
