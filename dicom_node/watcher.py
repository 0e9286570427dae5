"""The series watcher: closes quiet series (RECEIVING -> COMPLETE) and routes them (-> QUEUED / IGNORED).

It works only from the database, so after a restart it simply carries on: a
series that went quiet while the node was down completes on the first pass,
and a COMPLETE series whose routing was cut off is routed again.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from db import jobs
from db.models import Job, JobState, Series
from db.session import transaction
from dicom_node.logs import log_event
from dicom_node.periodic import PeriodicTask
from dicom_node.routing import decide, series_facts

LOG = logging.getLogger(__name__)


class SeriesWatcher(PeriodicTask):
    """Completion and routing, run every ``completion.check_interval_seconds``."""

    name = "watcher"

    @property
    def interval_seconds(self) -> float:
        return self.settings.completion.check_interval_seconds

    def run_once(self) -> None:
        """One pass: complete what is ready, then route what is complete."""
        self.complete_ready_series()
        self.route_complete_series()

    def complete_ready_series(self) -> None:
        quiet = timedelta(seconds=self.settings.completion.quiet_seconds)
        with transaction(self.sessions) as session:
            for job in _expected_count_reached(session):
                count = job.series.instance_count
                self._complete(session, job, f"all {count} expected images received (ImagesInAcquisition)")
            for job in jobs.quiet_receiving_jobs(session, quiet):
                count = job.series.instance_count
                self._complete(session, job, f"no new instance for {quiet.total_seconds():g} s ({count} received)")

    def route_complete_series(self) -> None:
        with transaction(self.sessions) as session:
            for job in jobs.jobs_in_state(session, [JobState.COMPLETE]):
                self._route(session, job)

    def _complete(self, session: Session, job: Job, reason: str) -> None:
        jobs.mark_complete(session, job, reason)
        log_event(
            LOG,
            logging.INFO,
            "series.complete",
            series_instance_uid=job.series.series_instance_uid,
            instances=job.series.instance_count,
            reason=reason,
        )

    def _route(self, session: Session, job: Job) -> None:
        facts = series_facts(session, job.series)
        decision = decide(self.settings.rules, facts)
        if decision.action == "process":
            assert decision.model is not None and decision.rule_name is not None
            jobs.queue(
                session, job, rule_name=decision.rule_name, model_name=decision.model, destinations=decision.destinations
            )
            state = JobState.QUEUED
        else:
            jobs.ignore(session, job, decision.reason, rule_name=decision.rule_name)
            state = JobState.IGNORED
        log_event(
            LOG,
            logging.INFO,
            f"series.{state.value.lower()}",
            series_instance_uid=job.series.series_instance_uid,
            modality=facts.modality,
            images=facts.number_of_images,
            reason=job.reason,
        )


def _expected_count_reached(session: Session) -> list[Job]:
    query = (
        select(Job)
        .join(Job.series)
        .where(
            Job.state == JobState.RECEIVING,
            Series.expected_instances.is_not(None),
            Series.instance_count >= Series.expected_instances,
        )
    )
    return list(session.scalars(query))
