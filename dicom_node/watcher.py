"""The series watcher: closes quiet series (RECEIVING -> COMPLETE), then routes and admits them.

Routing picks a rule; admission (:mod:`dicom_node.admission`) reads the series' headers
and either queues it (QUEUED) or refuses it (FAILED) before any inference time is spent.
It works from the database, so after a restart it simply carries on: a COMPLETE series whose
routing was cut off is routed again. A series completes only once the watcher has itself seen it
unchanged for the quiet period on its own steady clock (:class:`QuietClock`), so a series that went
quiet while the node was down completes one quiet period after the start. Events are logged only
once their transaction has committed, so the log never tells of a change the database does not hold.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.tag import Tag
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from db import jobs, transfers
from db.ingest import MissingInstances, instances_refused_for_series, unattributed_refusals_near_series
from db.jobs import PARTIAL_SERIES_PREFIX, is_partial_series_warning
from db.models import Instance, InterruptedTransfer, Job, JobState, Series, as_utc, utcnow
from db.session import read_only, transaction
from dicom_node.admission import (
    AdmissionResult,
    InstanceFile,
    StorageUnavailable,
    admit,
    instance_files,
    is_admission_warning,
    model_footprint,
    recorded_patient,
)
from dicom_node.config import Settings
from dicom_node.logs import log_event, shown
from dicom_node.periodic import PeriodicTask
from dicom_node.receive.header import StudyPatient
from dicom_node.receive.open_transfers import series_being_sent
from dicom_node.receive.recorder import series_waiting_to_be_recorded
from dicom_node.receive.storage import hold_series_with_different_copies
from dicom_node.routing import Decision, decide, series_facts
from inference.volume import raw_text

LOG = logging.getLogger(__name__)

EXPECTED_COUNT_SETTLE_SECONDS = 2.0
"""A series that reached its ImagesInAcquisition count completes once this long has passed without a new instance
(or the quiet period, if shorter): an instance past the count shows that the count was one acquisition's."""
COUNT_TAGS = [Tag("AcquisitionNumber"), Tag("ImagesInAcquisition")]
"""What is read from the stored files of a series that reached its count, to tell whether it is one acquisition."""

_CountKey = tuple[int, int, datetime]
"""A series as one check of its count saw it: id, instances held, last instance's arrival."""


@dataclass
class _Pending:
    """Events of one transaction, logged after it commits."""

    events: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)

    def add(self, level: int, event: str, **fields: Any) -> None:
        self.events.append((level, event, fields))

    def log(self) -> None:
        for level, event, fields in self.events:
            log_event(LOG, level, event, **fields)


@dataclass(frozen=True)
class _Sighting:
    """A receiving series as the watcher saw it: instances held and last arrival, and since when (steady clock)."""

    instances: int
    last_received_at: datetime
    since: float


class QuietClock:
    """How long each receiving series has stayed unchanged (same instance count, same last arrival), measured on
    this process' steady clock, which no step of the wall clock moves.

    A wall clock stepped forward (NTP correcting a clock that was behind, a virtual machine restored, the time set
    by hand), or a receiving host whose clock runs behind this one's, makes a series' last arrival look long past
    while its images still arrive: by this clock it is only as quiet as the watcher has seen it. A series new or
    changed since the previous look is counted quiet from this look: it may have changed just before it, however
    long ago the previous look was (a pass that admitted a large series, a long check interval), so its quiet
    period costs at most one check interval more than the images' own times would say.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._seen: dict[int, _Sighting] = {}
        self._looked_at: float | None = None

    def look(self, session: Session) -> None:
        """Note every receiving series, and when it was first seen as it is; series no longer receiving are
        forgotten."""
        steady = self.clock()
        rows = session.execute(
            select(Series.id, Series.instance_count, Series.last_received_at)
            .join(Job, Job.series_id == Series.id)
            .where(Job.state == JobState.RECEIVING)
        )
        seen: dict[int, _Sighting] = {}
        for series_id, instances, last in rows:
            earlier = self._seen.get(series_id)
            if earlier is not None and (earlier.instances, earlier.last_received_at) == (instances, as_utc(last)):
                seen[series_id] = earlier
                continue
            seen[series_id] = _Sighting(instances, as_utc(last), steady)
        self._seen, self._looked_at = seen, steady

    def quiet_for(self, series: Series) -> timedelta:
        """How long ``series`` had stayed as it is now, at the last look (nothing for a series not seen so)."""
        sighting = self._seen.get(series.id)
        if self._looked_at is None or sighting is None:
            return timedelta(0)
        if (sighting.instances, sighting.last_received_at) != (series.instance_count, as_utc(series.last_received_at)):
            return timedelta(0)
        return timedelta(seconds=self._looked_at - sighting.since)


def _refusal_warnings(
    series: Series, missing: MissingInstances | None, unattributed: MissingInstances | None
) -> list[str]:
    """The partial-series warnings for images sent for ``series`` that it does not hold (refused, set aside), and for
    images its sender sent meanwhile that were refused before their series could be read (they may be its)."""
    warnings = []
    if missing is not None:
        warnings.append(
            f"{PARTIAL_SERIES_PREFIX} {missing.count} image(s) sent for this series were refused or set aside on "
            f"receipt and are not in it; the result covers the {series.instance_count} stored "
            f"({_first_refused(missing)})"
        )
    if unattributed is not None:
        sender = f"{series.calling_ae_title} " if series.calling_ae_title else ""
        warnings.append(
            f"{PARTIAL_SERIES_PREFIX} {unattributed.count} image(s) that {sender}sent while this series was received "
            "were refused before the series they belong to could be read, and may belong to this one; the result "
            f"covers the {series.instance_count} stored ({_first_refused(unattributed)})"
        )
    return warnings


def _first_refused(missing: MissingInstances) -> str:
    first = f"SOP Instance UID {missing.first_sop_instance_uid}" if missing.first_sop_instance_uid else "one"
    reason = missing.first_reason if len(missing.first_reason) <= 300 else missing.first_reason[:297] + "..."
    return f"first, {first}: {reason}"


class SeriesWatcher(PeriodicTask):
    """Completion, routing and admission, run every ``completion.check_interval_seconds``."""

    name = "watcher"

    def __init__(
        self, settings: Settings, sessions: sessionmaker[Session], steady_clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(settings, sessions)
        self._count_doubts: dict[_CountKey, str | None] = {}
        """Why each series that reached its ImagesInAcquisition count may not be whole (None: it is whole)."""
        self.quiet_clock = QuietClock(steady_clock)

    @property
    def interval_seconds(self) -> float:
        return self.settings.completion.check_interval_seconds

    def run_once(self) -> None:
        """One pass: complete what is ready, then route and admit what is complete."""
        self.complete_ready_series()
        self.route_complete_series()

    def complete_ready_series(self) -> None:
        """Complete series whose expected count is reached, or that stayed quiet long enough.

        The quiet period does not complete a series that an association still open is sending (the last series
        it stored an image of, :func:`~dicom_node.receive.open_transfers.series_being_sent`): a sender pausing
        between images is not done; ``completion.expected_count_timeout_seconds`` without an image still is.

        While ``ImagesInAcquisition`` says more images are due, the quiet period alone does not
        complete a series; ``completion.expected_count_timeout_seconds`` of silence does, and the
        job then carries a "partial series" warning. The same holds for a series sent again after
        retention purged it, while it holds fewer images than it did then. Images sent for the series
        but refused or set aside on receipt count towards the expected number, and add a "partial
        series" warning too. Reaching the count completes a series early only where the count covers the
        whole series (:func:`_numbering_doubt`, :func:`_acquisition_doubt`); else the quiet period decides.
        Every wait (the quiet period, the timeout, the settle time once the count is reached) must have passed both
        by the wall clock and on the watcher's steady clock (:class:`QuietClock`).
        """
        completion = self.settings.completion
        quiet = timedelta(seconds=completion.quiet_seconds)
        expected_timeout = timedelta(seconds=completion.expected_count_timeout_seconds)
        pending = _Pending()
        settle = timedelta(seconds=min(EXPECTED_COUNT_SETTLE_SECONDS, completion.quiet_seconds))
        doubts = self._check_reached_counts(settle)
        with transaction(self.sessions) as session:
            # The clocks are read once the transaction holds SQLite's write lock: read before a wait for another
            # process' lock, they would take a series recorded during the wait for one from the future.
            session.connection()  # SQLite: the transaction's BEGIN IMMEDIATE, which may wait for another process' lock
            now = utcnow()
            _restart_quiet_periods_from_the_future(session, now, pending)
            self.quiet_clock.look(session)
            timed_out = {job.id for job in self._quiet_jobs(session, expected_timeout, now)}
            waiting = series_waiting_to_be_recorded(self.settings.storage.directory)
            being_sent = series_being_sent(self.settings.storage.directory / "journal")
            for job in _expected_count_reached(session, settle, now):
                if self.quiet_clock.quiet_for(job.series) < settle:
                    continue  # the wall clock may have been stepped forward: not yet settled by the steady clock
                if job.series.series_instance_uid in waiting:
                    continue  # more acknowledged instances are on their way into the count
                if doubts.get(_count_key(job.series), "not checked yet") is not None:
                    continue  # the count may be one acquisition's: the quiet period decides
                count = job.series.instance_count
                reason = f"all {count} expected images received (ImagesInAcquisition)"
                missing = instances_refused_for_series(session, job.series)  # the count says whole: no unknown
                self._complete(session, job, reason, pending, _refusal_warnings(job.series, missing, None))
            for job in self._quiet_jobs(session, quiet, now, cut_short_quiet=expected_timeout):
                series = job.series
                if series.series_instance_uid in waiting:
                    continue  # acknowledged instances of it are not recorded yet: not quiet
                if series.series_instance_uid in being_sent and job.id not in timed_out:
                    continue  # the association sending it is open and has sent nothing else since: a pause
                cut_short = transfers.interruption_of(session, series.series_instance_uid)
                if cut_short is not None:
                    if job.id in timed_out:  # else its sender has time yet to send it again
                        self._complete_cut_short(session, job, cut_short, expected_timeout, quiet, pending)
                    continue
                expected, images, expecting = _expectation(session, series)
                missing = instances_refused_for_series(session, series)
                if expected is None or images >= expected:
                    reason = f"no new instance for {quiet.total_seconds():g} s ({series.instance_count} received)"
                    whole = expected is not None and doubts.get(_count_key(series), "not checked") is None
                    unattributed = None if whole else unattributed_refusals_near_series(session, series, quiet)
                    self._complete(session, job, reason, pending, _refusal_warnings(series, missing, unattributed))
                elif missing is not None and images + missing.count >= expected:
                    reason = (
                        f"no new instance for {quiet.total_seconds():g} s; {images} of {expected} {expecting} "
                        f"stored, and {missing.count} were refused or set aside on receipt"
                    )
                    unattributed = unattributed_refusals_near_series(session, series, quiet)
                    self._complete(session, job, reason, pending, _refusal_warnings(series, missing, unattributed))
                elif job.id in timed_out:
                    unattributed = unattributed_refusals_near_series(session, series, quiet)
                    warning = (
                        f"{PARTIAL_SERIES_PREFIX} {images} of {expected} {expecting} "
                        "had arrived when the completion timeout ran out"
                    )
                    reason = (
                        f"only {images} of {expected} {expecting} after "
                        f"{expected_timeout.total_seconds():g} s without a new one (partial series)"
                    )
                    self._complete(
                        session, job, reason, pending, [warning, *_refusal_warnings(series, missing, unattributed)]
                    )
        pending.log()

    def _quiet_jobs(
        self, session: Session, quiet: timedelta, now: datetime, cut_short_quiet: timedelta | None = None
    ) -> list[Job]:
        """RECEIVING jobs whose series got no instance for ``quiet``, by the wall clock and the steady clock (of
        those cut short, only those quiet for ``cut_short_quiet`` by the wall clock, where given)."""
        return [
            job
            for job in jobs.quiet_receiving_jobs(session, quiet, now, cut_short_quiet=cut_short_quiet)
            if self.quiet_clock.quiet_for(job.series) >= quiet
        ]

    def _check_reached_counts(self, settle: timedelta) -> dict[_CountKey, str | None]:
        """Whether each series that reached its ImagesInAcquisition count holds the whole series (None) or why
        it may not; read outside any write transaction, and the files of a series once while it is unchanged."""
        with read_only(self.sessions) as session:
            reached = [(_count_key(job.series), job.series) for job in _expected_count_reached(session, settle)]
            unchecked = [
                (key, series.series_instance_uid, _instance_numbers(session, series))
                for key, series in reached
                if key not in self._count_doubts
            ]
        doubts = {key: self._count_doubts[key] for key, _series in reached if key in self._count_doubts}
        pending = _Pending()
        for key, series_uid, numbered in unchecked:
            doubt = _numbering_doubt([number for number, _path in numbered]) or _acquisition_doubt(numbered)
            doubts[key] = doubt
            if doubt is not None:
                pending.add(
                    logging.INFO,
                    "series.count_not_trusted",
                    series_instance_uid=series_uid,
                    instances=key[1],
                    reason=f"the ImagesInAcquisition count is reached, but {doubt}; the series completes after "
                    "the quiet period instead",
                )
        self._count_doubts = doubts  # only series still at their count are remembered
        pending.log()
        return doubts

    def route_complete_series(self) -> None:
        """Route every COMPLETE series; admit (read headers) outside any write transaction."""
        with self.sessions() as session:
            job_ids = [job.id for job in jobs.jobs_in_state(session, [JobState.COMPLETE])]
        for job_id in job_ids:
            self._route(job_id)

    def _complete_cut_short(
        self,
        session: Session,
        job: Job,
        cut_short: InterruptedTransfer,
        waited: timedelta,
        quiet: timedelta,
        pending: _Pending,
    ) -> None:
        """Complete a series whose images came on an association cut short, after ``waited`` without another one."""
        series = job.series
        seconds = f"{waited.total_seconds():g} s"
        warning = (
            f"{PARTIAL_SERIES_PREFIX} the association from {cut_short.calling_ae_title or 'its sender'} that sent "
            f"images of it ended without a release ({cut_short.reason}), and no image came in the {seconds} after; "
            f"the result covers the {series.instance_count} received and may lack the rest"
        )
        reason = (
            f"no new instance for {seconds} after an association sending it was cut short "
            f"({series.instance_count} received; partial series)"
        )
        missing = instances_refused_for_series(session, series)
        unattributed = unattributed_refusals_near_series(session, series, quiet)
        self._complete(session, job, reason, pending, [warning, *_refusal_warnings(series, missing, unattributed)])

    def _complete(
        self, session: Session, job: Job, reason: str, pending: _Pending, warnings: Sequence[str] = ()
    ) -> None:
        transfers.forget_interruptions(session, [job.series.series_instance_uid])
        jobs.mark_complete(session, job, reason)
        jobs.append_warnings(job, warnings, replacing=is_partial_series_warning)
        pending.add(
            logging.INFO,
            "series.complete",
            series_instance_uid=job.series.series_instance_uid,
            instances=job.series.instance_count,
            reason=reason,
        )

    def _route(self, job_id: int) -> None:
        with self.sessions() as session:
            job = session.get(Job, job_id)
            if job is None or job.state is not JobState.COMPLETE:
                return
            facts = series_facts(session, job.series)
            decision = decide(self.settings.rules, facts)
            files = instance_files(session, job.series) if decision.action == "process" else []
            modality, study_patient = facts.modality, recorded_patient(job.series.study)  # as routed
            decided_on, series_uid = job.version, job.series.series_instance_uid
        try:
            admission = (
                self._admit(job_id, files, modality, study_patient, decision.model)
                if decision.action == "process"
                else None
            )
        except StorageUnavailable as exc:
            log_event(
                LOG,
                logging.WARNING,
                "series.admission_waiting",
                series_instance_uid=series_uid,
                reason=f"{exc}: the series stays COMPLETE and its images are checked again at the next pass",
            )
            return
        pending = _Pending()
        with transaction(self.sessions) as session:
            job = session.get_one(Job, job_id)
            if job.state is not JobState.COMPLETE or job.version != decided_on:
                return  # re-opened by a late instance meanwhile (and perhaps complete again): decided at the next pass
            # A copy refused for other pixel data whose refusal and the series' creation ran at the same moment
            # (PostgreSQL) left the series unheld: it is held here, before anything is processed.
            held = hold_series_with_different_copies(session, job.series.series_instance_uid)
            state = JobState.FAILED if held else self._apply(session, job, decision, admission)
            fields: dict[str, Any] = {
                "series_instance_uid": job.series.series_instance_uid,
                "modality": facts.modality,
                "images": facts.number_of_images,
                "reason": job.reason,
            }
            if admission is not None and admission.warnings:
                fields["warnings"] = len(admission.warnings)
            level = logging.WARNING if state is JobState.FAILED else logging.INFO
            pending.add(level, f"series.{state.value.lower()}", **fields)
        pending.log()

    def _admit(
        self,
        job_id: int,
        files: list[InstanceFile],
        modality: str | None,
        study_patient: StudyPatient | None,
        model: str | None,
    ) -> AdmissionResult:
        try:
            footprint = model_footprint(self.settings.models, model)
            return admit(files, self.settings.admission, modality, study_patient, footprint)
        except StorageUnavailable:
            raise  # this machine's trouble, not the series': it is checked again at the next pass
        except Exception:  # a header no check foresaw must not stall the watcher
            LOG.exception("admission.error", extra={"event_fields": {"job_id": job_id}})
            return AdmissionResult(
                refusal=f"the series' headers could not be checked (an unexpected error, logged with job id {job_id})"
            )

    def _apply(self, session: Session, job: Job, decision: Decision, admission: AdmissionResult | None) -> JobState:
        if decision.action != "process":
            jobs.ignore(session, job, decision.reason, rule_name=decision.rule_name)
            return JobState.IGNORED
        assert admission is not None and decision.model is not None and decision.rule_name is not None
        if admission.refusal is not None:
            jobs.refuse_admission(session, job, admission.refusal, rule_name=decision.rule_name)
            return JobState.FAILED
        jobs.append_warnings(job, admission.warnings, replacing=is_admission_warning)
        # A series routed before (re-opened by a late image, or retried) is sent its new run wherever an earlier
        # run's results went: they are superseded, and an operator's re-route elsewhere is not kept by the rules.
        destinations = jobs.add_holders_of_earlier_results(
            session, job, decision.destinations, self.settings.destinations
        )
        jobs.queue(
            session,
            job,
            rule_name=decision.rule_name,
            model_name=decision.model,
            destinations=destinations,
            note=_routed_otherwise(job, decision),
        )
        return JobState.QUEUED


def _routed_otherwise(job: Job, decision: Decision) -> str | None:
    """What to say when the rules route a series that was last routed (by an operator's re-route, or by rules
    since changed) to another rule: the rules decide again, and the earlier choice is not kept."""
    if job.rule_name is None or job.model_name is None or job.rule_name == decision.rule_name:
        return None
    earlier = ", ".join(job.destinations or []) or "no destination"
    return (
        f"routed by the rules again; before, it was routed to rule {job.rule_name!r} with model {job.model_name!r} "
        f"for {earlier}, which is not kept: re-route it again if that is still wanted"
    )


def _expectation(session: Session, series: Series) -> tuple[int | None, int, str]:
    """How many images ``series`` should hold before the quiet period alone completes it, how many it holds,
    and what says so: the count it held before retention purged it, while it is short of that (a series sent
    again in part is partial, not whole); else ``ImagesInAcquisition``."""
    before = series.images_before_purge
    if before and series.instance_count < before:
        return before, series.instance_count, "images it held before retention purged it"
    return series.expected_instances, _images_received(session, series), "expected images (ImagesInAcquisition)"


def receiving_progress(
    session: Session, series: Series, quiet_seconds: float | None = None, being_sent: Collection[str] = ()
) -> str:
    """What a RECEIVING series is waiting for, in a sentence: its images so far (of how many, where the series
    says), how long ago the last one came, and (given ``quiet_seconds``) when it completes without a count; whether
    an association still open is sending it (``being_sent``: :func:`~dicom_node.receive.open_transfers.series_being_sent`)."""
    expected, images, expecting = _expectation(session, series)
    held = f"{images} of {expected} {expecting}" if expected is not None else f"{series.instance_count} images"
    ago = max(0, int((utcnow() - as_utc(series.last_received_at)).total_seconds()))
    since = f"{ago} s" if ago < 120 else f"{ago // 60} min"
    sentence = f"receiving: {held} so far, the last one {since} ago"
    cut_short = transfers.interruption_of(session, series.series_instance_uid)
    if cut_short is not None:
        sender = cut_short.calling_ae_title or "its sender"
        return f"{sentence}; the association from {sender} sending it was cut short: waiting for the rest"
    if series.series_instance_uid in being_sent:
        sentence += "; the association sending it is still open"
        return sentence + (
            f": it completes once that ends and {quiet_seconds:g} s passed without a new image"
            if quiet_seconds is not None
            else ""
        )
    if quiet_seconds is not None:
        sentence += f"; it completes after {quiet_seconds:g} s without a new image"
    return sentence


def _images_received(session: Session, series: Series) -> int:
    """Images (frames) received: ImagesInAcquisition counts frames of multi-frame instances too."""
    total = session.scalar(
        select(func.sum(func.coalesce(Instance.number_of_frames, 1))).where(Instance.series_id == series.id)
    )
    return int(total or 0)


CLOCK_STEP_SECONDS = 5.0
"""A series' last arrival this far ahead of the clock means the clock was set back since it was recorded."""


def _restart_quiet_periods_from_the_future(session: Session, now: datetime, pending: _Pending) -> None:
    """A receiving series whose last image was recorded in the future (the clock was set back since) starts its
    quiet period ``now``: else it would wait for the clock to catch up, an hour for a clock set back an hour.

    ``now`` is read once the transaction holds SQLite's write lock: read before a wait for another process' lock,
    it would take a series recorded during the wait for one from the future, and start its quiet period back then.
    """
    ahead = list(
        session.scalars(
            select(Series)
            .join(Job, Job.series_id == Series.id)
            .where(
                Job.state == JobState.RECEIVING, Series.last_received_at > now + timedelta(seconds=CLOCK_STEP_SECONDS)
            )
        )
    )
    for series in ahead:
        pending.add(
            logging.WARNING,
            "series.clock_stepped_back",
            series_instance_uid=series.series_instance_uid,
            reason=f"the last image of the series was recorded at {series.last_received_at:%Y-%m-%d %H:%M:%S} UTC, "
            "later than the clock says it is now (the clock was set back); its quiet period starts again now",
        )
        series.last_received_at = now


def _count_key(series: Series) -> _CountKey:
    return series.id, series.instance_count, series.last_received_at


def _instance_numbers(session: Session, series: Series) -> list[tuple[int | None, Path]]:
    """The InstanceNumber and stored file of each instance of ``series``."""
    rows = session.execute(
        select(Instance.instance_number, Instance.path).where(Instance.series_id == series.id).order_by(Instance.id)
    )
    return [(number, Path(path)) for number, path in rows]


def _numbering_doubt(numbers: Sequence[int | None]) -> str | None:
    """Why images numbered ``numbers`` may not be the whole series: the count covers a series only when its
    images are numbered 1 to the count, once each (images numbered before, between or again may still come)."""
    count = len(numbers)
    known = [number for number in numbers if number is not None]
    if len(known) < count:
        return (
            f"{count - len(known)} of its {count} images have no InstanceNumber, so images still to come cannot be "
            "ruled out"
        )
    repeated = [(number, times) for number, times in Counter(known).most_common(1) if times > 1]
    if repeated:
        return (
            f"InstanceNumber {repeated[0][0]} occurs on {repeated[0][1]} of its images, as when each acquisition is "
            "numbered from 1"
        )
    if known and (min(known) != 1 or max(known) != count):
        return (
            f"its InstanceNumbers run from {min(known)} to {max(known)}, not from 1 to {count}, so images numbered "
            "before or between them may still come"
        )
    return None


def _acquisition_doubt(numbered: Sequence[tuple[int | None, Path]]) -> str | None:
    """Why the stored files may not be the whole series: they carry several AcquisitionNumbers, or disagree on
    ImagesInAcquisition (each then counts one acquisition), or one cannot be read to tell."""
    acquisitions: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for number, path in numbered:
        try:
            header = dcmread(path, stop_before_pixels=True, specific_tags=COUNT_TAGS)
        except Exception:  # noqa: BLE001 - any unreadable file leaves the decision to the quiet period
            return f"the stored file of instance {number} cannot be read to check its AcquisitionNumber"
        acquisitions[_number_text(raw_text(header, "AcquisitionNumber"))] += 1
        counts[_number_text(raw_text(header, "ImagesInAcquisition"))] += 1
    if len(acquisitions) > 1:
        return (
            f"its images carry {len(acquisitions)} AcquisitionNumbers ({_listed(acquisitions)}) and "
            "ImagesInAcquisition counts the images of one acquisition, so more may come"
        )
    if len(counts) > 1:
        return f"its images disagree on ImagesInAcquisition ({_listed(counts)}), so the count is not the series'"
    return None


def _number_text(text: str | None) -> str:
    """An integer string as compared (``01`` is ``1``); an empty or missing value is ``(none)``."""
    if text is None:
        return "(none)"
    try:
        return str(int(text))
    except ValueError:
        return shown(text, 16)


def _listed(values: Counter[str]) -> str:
    """``1 on 5 images, 2 on 5 images``: the most common values first, at most four."""
    listed = ", ".join(f"{value} on {count} image(s)" for value, count in values.most_common(4))
    return listed + (f" and {len(values) - 4} more" if len(values) > 4 else "")


def _expected_count_reached(session: Session, settle: timedelta, now: datetime | None = None) -> list[Job]:
    """RECEIVING series holding exactly as many instances as ImagesInAcquisition says, none new for ``settle``
    by the wall clock (``now``, default the current time).

    ImagesInAcquisition counts one acquisition's images, not always the series': a series that goes past it
    has more coming than it said, so it waits for the quiet period instead.
    """
    query = (
        select(Job)
        .join(Job.series)
        .where(
            Job.state == JobState.RECEIVING,
            Series.expected_instances.is_not(None),
            Series.instance_count == Series.expected_instances,
            # sent again after a purge: whole only once it holds what it held (ImagesInAcquisition is one acquisition)
            or_(Series.images_before_purge.is_(None), Series.instance_count >= Series.images_before_purge),
            Series.last_received_at <= (now or utcnow()) - settle,
        )
    )
    return list(session.scalars(query))
