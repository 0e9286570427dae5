"""Routing decisions (the guard first, then the first matching rule) and the watcher's completion and admission."""

from __future__ import annotations

import errno
import gc
import logging
import multiprocessing
import os
import resource
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta

import pydicom
import pytest
from sqlalchemy import select, update

from db.ingest import InstanceRecord, SeriesAttributes, StudyAttributes, record_instance
from db.models import Job, JobEvent, JobState, Series, Study, as_utc, utcnow
from db.session import make_engine, make_session_factory, migrate, transaction
from dicom_node import MANUFACTURER
from dicom_node.config import Rule, Settings
from dicom_node.phantom import PhantomSpec, write_phantom_series
from dicom_node.routing import Decision, SeriesFacts, decide
from dicom_node.watcher import EXPECTED_COUNT_SETTLE_SECONDS, SeriesWatcher
from tests.conftest import storescu
from tests.test_completion_clock_step import SteadyClock

CT = SeriesFacts(
    modality="CT",
    series_description="Abdomen 1.5 mm",
    image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
    slice_thickness=1.5,
    number_of_images=300,
    calling_ae_title="PACS",
    body_part_examined="ABDOMEN",
    manufacturer="SIEMENS",
    sop_class_uids=frozenset({"1.2.840.10008.5.1.4.1.1.2"}),
)


def rule(name: str, action: str = "process", **match) -> Rule:
    return Rule(name=name, action=action, model="baseline" if action == "process" else None, match=match)


def test_first_matching_rule_wins():
    rules = [rule("thin", slice_thickness={"max": 1.0}), rule("abdomen", series_description="(?i)abd"), rule("any")]
    assert decide(rules, CT).rule_name == "abdomen"


@pytest.mark.parametrize(
    ("match", "matches"),
    [
        ({"modality": "CT"}, True),
        ({"modality": ["MR", "PT"]}, False),
        ({"image_type": ["axial"]}, True),
        ({"image_type": ["AXIAL", "DERIVED"]}, False),
        ({"slice_thickness": {"min": 0.5, "max": 2}}, True),
        ({"number_of_images": {"min": 400}}, False),
        ({"calling_ae_title": "pacs"}, True),
        ({"body_part_examined": ["CHEST"]}, False),
        ({"series_description": "^Abdomen"}, True),
    ],
)
def test_each_condition(match, matches):
    decision = decide([rule("r", **match)], CT)
    assert (decision.action == "process") is matches


def test_no_match_is_ignored_with_reason():
    decision = decide([rule("mr", modality="MR")], CT)
    assert (decision.action, decision.reason) == (
        "ignore",
        "no routing rule matched (rule 'mr' did not match: Modality CT is not MR)",
    )


def test_an_ignored_series_names_why_each_process_rule_before_did_not_take_it():
    """An Enhanced CT (ImageType VOLUME, its thickness only in the functional groups) under the shipped rules was
    IGNORED as "rule 'everything-else': ignore", which told the administrator nothing."""
    enhanced = replace(
        CT,
        image_type=("ORIGINAL", "PRIMARY", "VOLUME", "NONE"),
        slice_thickness=None,
        number_of_images=8,
        calling_ae_title="CT01",
    )
    rules = [
        rule(
            "ct-axial",
            modality="CT",
            image_type=["AXIAL"],
            slice_thickness={"min": 0.5, "max": 5.0},
            number_of_images={"min": 10},
        ),
        rule("from-pacs", calling_ae_title="PACS", slice_thickness={"max": 0.4}),
        rule("skip", action="ignore", body_part_examined="HEAD"),
        rule("everything-else", action="ignore"),
    ]
    assert decide(rules, enhanced).reason == (
        "rule 'everything-else': ignore (rule 'ct-axial' did not match: ImageType ORIGINAL\\PRIMARY\\VOLUME\\NONE "
        "lacks AXIAL; the series gives no SliceThickness it can be judged by; 8 images is under 10; rule "
        "'from-pacs' did not match: the series gives no SliceThickness it can be judged by; it came from CT01, not "
        "PACS)"
    )
    thick = replace(CT, slice_thickness=7.0, body_part_examined="CHEST")
    assert decide(rules, thick).reason == (
        "rule 'everything-else': ignore (rule 'ct-axial' did not match: SliceThickness 7 mm is outside 0.5-5 mm; "
        "rule 'from-pacs' did not match: SliceThickness 7 mm is over 0.4 mm)"
    )
    assert decide(rules, replace(thick, body_part_examined="HEAD")).reason.startswith("rule 'skip': ignore (")


def test_ignore_rule_ignores():
    decision = decide([rule("skip", action="ignore", calling_ae_title="PACS"), rule("any")], CT)
    assert decision.action == "ignore" and decision.rule_name == "skip"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"modality": "MR"}, "modality MR is not CT"),
        ({"manufacturer": MANUFACTURER}, "created by this node"),
        ({"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")}, "localizer"),
        (
            {"modality": "CT", "sop_class_uids": frozenset({"1.2.840.10008.5.1.4.1.1.66.4"})},
            "not processed: series holds no CT images (only Segmentation Storage)",
        ),
    ],
)
def test_guard_overrides_a_process_rule(change, reason):
    decision = decide([rule("everything")], replace(CT, **change))
    assert decision.action == "ignore"
    assert reason in decision.reason


def test_an_ignore_rule_that_takes_a_guarded_series_says_the_guards_reason_too():
    decision = decide([rule("everything-else", action="ignore")], replace(CT, modality="MR"))
    assert decision.reason == (
        "rule 'everything-else': ignore (not processed: modality MR is not CT; only CT series are processed)"
    )


def test_a_ct_series_holding_other_objects_too_goes_on_to_admission_which_names_them():
    """A dose screen (Secondary Capture) among CT images: not IGNORED by the guard (no one would look), but
    routed, so that admission refuses it (FAILED) naming the instance."""
    facts = replace(CT, sop_class_uids=frozenset({"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.7"}))
    assert decide([rule("everything")], facts).action == "process"


def test_an_ignore_rule_catches_a_series_that_names_its_value_among_several():
    """BodyPartExamined HEAD\\NECK (one value allowed, two sent): an ignore rule on HEAD still ignores it, never
    letting it through to a later process rule; a Modality CT\\MR is still never processed."""
    rules = [rule("no heads", action="ignore", body_part_examined=["HEAD"]), rule("any")]
    decision = decide(rules, replace(CT, body_part_examined="HEAD\\NECK"))
    assert (decision.action, decision.rule_name) == ("ignore", "no heads")
    mixed = decide([rule("ct", modality="CT")], replace(CT, modality="CT\\MR"))
    assert mixed.action == "ignore" and "modality CT\\MR is not CT" in mixed.reason


CATASTROPHIC = "(a+)+$"
"""Backtracking tries 2^n ways to split n letters before it gives up on a text that ends otherwise."""
CRAFTED = "a" * 63 + "!"  # the longest SeriesDescription (64 characters) a peer can send


def _decide_elsewhere(rules: list[Rule], facts: SeriesFacts) -> Decision:
    """``decide`` in a process of its own, so that a match that never ends fails the test instead of hanging it (a
    backtracking match holds the interpreter's lock: no thread of the process would run again)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # leaving it ends the process, even mid-match
        return pool.apply_async(decide, (rules, facts)).get(timeout=60)  # a safety net: RE2 takes microseconds


def test_a_catastrophic_pattern_cannot_hold_routing_on_a_crafted_series_description():
    rules = [rule("repeated letters", action="ignore", series_description=CATASTROPHIC), rule("the rest")]

    crafted = _decide_elsewhere(rules, replace(CT, series_description=CRAFTED))
    matching = _decide_elsewhere(rules, replace(CT, series_description="a" * 64))

    assert (crafted.action, crafted.rule_name) == ("process", "the rest")
    assert (matching.action, matching.rule_name) == ("ignore", "repeated letters")


@pytest.mark.integration
def test_a_real_node_routes_a_crafted_series_description_past_a_catastrophic_pattern(tmp_path, start_node):
    rules = [
        {"name": "repeated letters", "match": {"series_description": CATASTROPHIC}, "action": "ignore"},
        {"name": "the rest", "action": "ignore"},
    ]
    node = start_node(rules=rules)
    crafted = write_phantom_series(
        tmp_path / "crafted", PhantomSpec(rows=16, columns=16, slices=2, series_description=CRAFTED)
    )
    letters = write_phantom_series(
        tmp_path / "letters", PhantomSpec(rows=16, columns=16, slices=2, series_description="a" * 64)
    )

    for series in (crafted, letters):
        assert storescu(node.port, series.files).returncode == 0

    node.wait_for_state(letters.series_instance_uid, JobState.IGNORED, timeout=60)
    node.wait_for_state(crafted.series_instance_uid, JobState.IGNORED, timeout=60)
    assert node.job_reason(crafted.series_instance_uid) == "rule 'the rest': ignore"
    assert node.job_reason(letters.series_instance_uid) == "rule 'repeated letters': ignore"


# --- the watcher's routing step: completion, admission, logging after commit (real SQLite, no node) ---

CT_RULE = {"name": "ct", "match": {"modality": "CT"}, "action": "process", "model": "baseline"}


def watched(tmp_path, slices_sent: int, expected: int | None, **completion):
    """A database holding ``slices_sent`` phantom instances of one series that went quiet an hour ago, and a
    watcher that has seen it so for an hour (its steady clock, ``watcher.quiet_clock.clock``, moves when told)."""
    settings = Settings(
        storage={"directory": tmp_path / "storage"}, rules=[CT_RULE], completion={"quiet_seconds": 30, **completion}
    )
    migrate(settings.database_url)
    sessions = make_session_factory(make_engine(settings.database_url))
    series = write_phantom_series(tmp_path / "ct", PhantomSpec(rows=16, columns=16, slices=4))
    an_hour_ago = utcnow() - timedelta(hours=1)
    with transaction(sessions) as session:
        for number, path in enumerate(series.files[:slices_sent], start=1):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            record_instance(
                session,
                InstanceRecord(
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    sop_class_uid=str(ds.SOPClassUID),
                    transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                    path=str(path),
                    size_bytes=path.stat().st_size,
                    study=StudyAttributes(series.study_instance_uid),
                    series=SeriesAttributes(series.series_instance_uid, modality="CT", expected_instances=expected),
                    instance_number=number,
                    received_at=an_hour_ago,
                ),
            )
    steady = SteadyClock()
    watcher = SeriesWatcher(settings, sessions, steady_clock=steady)
    watcher.complete_ready_series()  # its first look: a series is quiet only once the watcher has seen it so
    steady.advance(3600)
    return watcher, sessions, series


def job_of(sessions) -> tuple[Job, list[JobState]]:
    with sessions() as session:
        job = session.scalars(select(Job)).one()
        return job, [event.to_state for event in session.scalars(select(JobEvent).order_by(JobEvent.id))]


def test_quiet_period_leaves_a_series_short_of_its_expected_count_receiving(tmp_path):
    watcher, sessions, _series = watched(tmp_path, 2, expected=4, expected_count_timeout_seconds=7200)
    watcher.run_once()
    job, _history = job_of(sessions)
    assert job.state is JobState.RECEIVING


def test_expected_count_timeout_completes_with_a_partial_warning(tmp_path):
    watcher, sessions, _series = watched(tmp_path, 2, expected=4, expected_count_timeout_seconds=60)
    watcher.run_once()
    job, history = job_of(sessions)
    assert history == [JobState.RECEIVING, JobState.COMPLETE, JobState.QUEUED]
    assert job.warnings == [
        "partial series: 2 of 4 expected images (ImagesInAcquisition) had arrived when the completion timeout ran out"
    ]


def reasons(sessions) -> list[str]:
    with sessions() as session:
        return [event.reason for event in session.scalars(select(JobEvent).order_by(JobEvent.id))]


def received_at(sessions, when) -> None:
    with transaction(sessions) as session:
        session.execute(update(Series).values(last_received_at=when))


def seen_last_received_at(watcher, sessions, when) -> None:
    """The series' last image recorded at ``when``, and a watcher pass that saw it so: a series changed since the
    previous look is quiet only from the look that saw it, however old its last image looks."""
    received_at(sessions, when)
    watcher.run_once()
    assert job_of(sessions)[0].state is JobState.RECEIVING


def test_a_series_reaching_its_expected_count_completes_once_no_instance_came_for_the_settle_time(tmp_path):
    watcher, sessions, _series = watched(tmp_path, 4, expected=4)
    received_at(sessions, utcnow())  # the fourth instance has just arrived: a fifth may follow
    watcher.run_once()
    assert job_of(sessions)[0].state is JobState.RECEIVING
    seen_last_received_at(watcher, sessions, utcnow() - timedelta(seconds=EXPECTED_COUNT_SETTLE_SECONDS + 1))
    watcher.quiet_clock.clock.advance(EXPECTED_COUNT_SETTLE_SECONDS + 1)
    watcher.run_once()
    _job, history = job_of(sessions)
    assert history[:2] == [JobState.RECEIVING, JobState.COMPLETE]
    assert reasons(sessions)[1] == "all 4 expected images received (ImagesInAcquisition)"


def test_a_series_past_its_expected_count_waits_for_the_quiet_period(tmp_path):
    """ImagesInAcquisition 3 on a series of 4: the count is one acquisition's, so it is not trusted."""
    watcher, sessions, _series = watched(tmp_path, 4, expected=3)
    received_at(sessions, utcnow() - timedelta(seconds=EXPECTED_COUNT_SETTLE_SECONDS + 1))
    watcher.run_once()
    assert job_of(sessions)[0].state is JobState.RECEIVING
    seen_last_received_at(watcher, sessions, utcnow() - timedelta(seconds=31))
    watcher.quiet_clock.clock.advance(31)
    watcher.run_once()
    job, history = job_of(sessions)
    assert history[:2] == [JobState.RECEIVING, JobState.COMPLETE]
    assert reasons(sessions)[1] == "no new instance for 30 s (4 received)"
    assert not job.warnings


def test_series_refused_by_admission_is_failed_without_being_queued(tmp_path):
    watcher, sessions, series = watched(tmp_path, 4, expected=None)
    ds = pydicom.dcmread(series.files[2])
    ds.RescaleSlope = "0"
    ds.save_as(series.files[2])
    watcher.run_once()
    job, history = job_of(sessions)
    assert history == [JobState.RECEIVING, JobState.COMPLETE, JobState.FAILED]
    assert job.reason == "not admitted: RescaleSlope of instance 3 is 0: every pixel would have the same value"
    assert job.rule_name == "ct"


def test_a_series_under_its_studys_patient_id_from_another_issuer_is_refused(tmp_path):
    """Two senders at once, each the first of a study: the receiver could not know the other; admission does."""
    watcher, sessions, series = watched(tmp_path, 4, expected=None)
    with transaction(sessions) as session:
        session.execute(update(Study).values(patient_id="PHANTOM-1", issuer_of_patient_id="HOSPITAL_A"))
    for path in series.files:
        ds = pydicom.dcmread(path)
        ds.IssuerOfPatientID = "HOSPITAL_B"
        ds.save_as(path)
    watcher.run_once()
    job, history = job_of(sessions)
    assert history == [JobState.RECEIVING, JobState.COMPLETE, JobState.FAILED]
    assert job.reason == (
        "not admitted: the series' study already holds another patient's images (its IssuerOfPatientID differs "
        "from the study's); one study must hold one patient"
    )


def test_watcher_logs_each_change_only_after_it_is_committed(tmp_path):
    watcher, _sessions, _series = watched(tmp_path, 4, expected=None)
    database = str(watcher.settings.storage.directory / "dicom-node.db")
    seen: dict[str, str] = {}

    class CommittedState(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            with sqlite3.connect(database) as connection:  # sees committed rows only
                (state,) = connection.execute("SELECT state FROM jobs").fetchone()
            seen[record.getMessage()] = state

    logger, handler = logging.getLogger("dicom_node.watcher"), CommittedState()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        watcher.run_once()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert seen == {"series.complete": "COMPLETE", "series.queued": "QUEUED"}


def test_a_series_reopened_and_completed_again_during_admission_is_routed_on_its_new_images(tmp_path, monkeypatch):
    """The verdict of an admission that read the series before a late image must not queue the series with it."""
    from db import jobs

    watcher, sessions, _series = watched(tmp_path, 4, expected=None)
    real_admit = watcher._admit

    def admit_while_a_late_image_lands(*args, **kwargs):
        verdict = real_admit(*args, **kwargs)
        with transaction(sessions) as session:
            job = session.scalars(select(Job)).one()
            jobs.reopen(session, job, "a late image")
            jobs.mark_complete(session, job, "quiet period over")
        monkeypatch.setattr(watcher, "_admit", real_admit)
        return verdict

    monkeypatch.setattr(watcher, "_admit", admit_while_a_late_image_lands)
    watcher.run_once()  # completes the quiet series, then routes it
    _job, history = job_of(sessions)
    assert history == [JobState.RECEIVING, JobState.COMPLETE, JobState.RECEIVING, JobState.COMPLETE], history

    watcher.route_complete_series()
    _job, history = job_of(sessions)
    assert history[-1] is JobState.QUEUED


def test_a_series_last_recorded_in_the_future_starts_its_quiet_period_again_now(tmp_path, caplog):
    """A clock set back an hour left each receiving series waiting an hour longer than its quiet period."""
    watcher, sessions, _series = watched(tmp_path, 2, expected=None)
    received_at(sessions, utcnow() + timedelta(hours=1))  # recorded before the clock was set back an hour
    caplog.set_level(logging.WARNING, logger="dicom_node.watcher")

    watcher.run_once()

    assert job_of(sessions)[0].state is JobState.RECEIVING  # the quiet period starts now: 30 s to go
    with sessions() as session:
        (series,) = session.scalars(select(Series))
        assert abs((as_utc(series.last_received_at) - utcnow()).total_seconds()) < 60
    (said,) = [record for record in caplog.records if record.getMessage() == "series.clock_stepped_back"]
    assert said.event_fields["reason"].endswith(  # type: ignore[attr-defined]
        "later than the clock says it is now (the clock was set back); its quiet period starts again now"
    )
    seen_last_received_at(watcher, sessions, utcnow() - timedelta(seconds=31))
    watcher.quiet_clock.clock.advance(31)
    watcher.run_once()
    assert job_of(sessions)[1][:2] == [JobState.RECEIVING, JobState.COMPLETE]


@contextmanager
def _no_file_handles_left() -> Iterator[None]:
    """This process out of file handles, as a flood of idle connections leaves a node: every open() fails."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    # Sockets and files that earlier tests of this process left to the garbage collector are closed now, not while
    # the handles are held: one closed then frees a handle, and the watcher's open() would succeed.
    gc.collect()
    gc.disable()
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 32, hard))
    try:
        while True:
            try:
                held.append(os.open(os.devnull, os.O_RDONLY))
            except OSError as exc:
                assert exc.errno == errno.EMFILE
                break
        yield
    finally:
        for descriptor in held:
            os.close(descriptor)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        gc.enable()


def test_a_series_whose_files_cannot_be_opened_for_want_of_file_handles_waits_and_is_not_failed(tmp_path, caplog):
    """A node out of file handles refused a series PACS had been told was stored, 'the stored file of instance 1
    cannot be read as DICOM': the files were intact, and blaming them sent the operator to the sender."""
    watcher, sessions, series = watched(tmp_path, 4, expected=None)
    watcher.complete_ready_series()  # COMPLETE; the database's connection is open for the next pass
    caplog.set_level(logging.WARNING, logger="dicom_node.watcher")
    with _no_file_handles_left():
        watcher.route_complete_series()
    _job, history = job_of(sessions)
    assert history == [JobState.RECEIVING, JobState.COMPLETE]
    waiting = [record for record in caplog.records if record.msg == "series.admission_waiting"]
    assert [record.event_fields for record in waiting] == [
        {
            "series_instance_uid": series.series_instance_uid,
            "reason": "the stored file of instance 1 cannot be read now (too many open files: "
            f"{series.files[0]}): the series stays COMPLETE and its "
            "images are checked again at the next pass",
        }
    ]

    watcher.run_once()
    assert job_of(sessions)[1] == [JobState.RECEIVING, JobState.COMPLETE, JobState.QUEUED]
