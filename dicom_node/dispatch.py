"""The dispatcher: sends a SENDING job's results to each destination, with retries and backoff.

Per destination the job records the files already accepted, the attempts made,
the last error and when to try next (``jobs.deliveries``), so a restart or a
retry never sends an accepted file twice. Every destination done: DONE.
A destination that still fails after ``dispatch.max_attempts``: FAILED, with
the reason; ``dicom-node retry`` sends again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE

from db import jobs
from db.models import Job, JobState
from db.session import transaction
from dicom_node.config import Destination
from dicom_node.logs import log_event
from dicom_node.periodic import PeriodicTask
from dicom_node.security import client_tls

LOG = logging.getLogger(__name__)

ACCEPTED_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}  # success and the storage warnings


@dataclass(frozen=True)
class SendOutcome:
    sent: list[str]  # files the peer accepted in this attempt
    error: str | None  # why the attempt stopped short, or None when all went


def send_files(calling_ae: str, destination: Destination, files: list[str], timeout: float) -> SendOutcome:
    """C-STORE ``files`` over one association, negotiating only the SOP classes and syntaxes sent."""
    datasets = [(path, dcmread(path)) for path in files]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    for pair in sorted({(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for _, d in datasets}):
        ae.add_requested_context(pair[0], pair[1])
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=client_tls(destination))
    if not assoc.is_established:
        reason = "association rejected" if assoc.is_rejected else "no association (destination down or unreachable)"
        return SendOutcome([], f"{destination.ae_title}@{destination.host}:{destination.port}: {reason}")
    sent: list[str] = []
    accepted = {(str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts}
    try:
        for path, dataset in datasets:
            pair = (str(dataset.SOPClassUID), str(dataset.file_meta.TransferSyntaxUID))
            if pair not in accepted:
                return SendOutcome(
                    sent, f"{destination.ae_title} does not accept SOP class {pair[0]} in transfer syntax {pair[1]}"
                )
            response = assoc.send_c_store(dataset)
            status = int(response.Status) if response and "Status" in response else None
            if status not in ACCEPTED_STATUSES:
                shown = f"0x{status:04X}" if status is not None else "no response"
                return SendOutcome(sent, f"{destination.ae_title} refused {Path(path).name}: status {shown}")
            sent.append(path)
    finally:
        if assoc.is_established:
            assoc.release()
    return SendOutcome(sent, None)


class Dispatcher(PeriodicTask):
    """Sends SENDING jobs' results; runs as a thread of ``serve``."""

    name = "dispatch"

    @property
    def interval_seconds(self) -> float:
        return self.settings.dispatch.check_interval_seconds

    def run_once(self, now: datetime | None = None) -> None:
        """One pass over SENDING jobs: every destination that is due gets one attempt."""
        with self.sessions() as session:
            job_ids = [job.id for job in jobs.jobs_in_state(session, [JobState.SENDING])]
        for job_id in job_ids:
            self._dispatch(job_id, now or datetime.now(timezone.utc))

    def _dispatch(self, job_id: int, now: datetime) -> None:
        with self.sessions() as session:
            job = session.get_one(Job, job_id)
            files = list(job.result_files or [])
            deliveries = dict(job.deliveries or {})
            destinations = list(job.destinations or [])
        for name in destinations:
            record = dict(deliveries.get(name) or {"attempts": 0, "sent": []})
            if record.get("delivered_at") or not _due(record, now):
                continue
            destination = self.settings.destinations.get(name)
            pending = [f for f in files_for(destination, files) if f not in record["sent"]] if destination else []
            if destination is None:
                outcome = SendOutcome([], f"destination {name!r} is no longer configured")
            else:
                outcome = send_files(
                    self.settings.network.ae_title, destination, pending, self.settings.dispatch.timeout_seconds
                )
            record["attempts"] += 1
            record["sent"] = record["sent"] + outcome.sent
            if outcome.error is None:
                record["delivered_at"] = now.isoformat()
                record.pop("last_error", None)
                log_event(LOG, logging.INFO, "dispatch.delivered", job=job_id, destination=name, files=len(outcome.sent))
            else:
                record["last_error"] = outcome.error
                record["next_attempt_at"] = (now + self._backoff(record["attempts"])).isoformat()
                log_event(
                    LOG, logging.WARNING, "dispatch.attempt_failed", job=job_id, destination=name,
                    attempt=record["attempts"], error=outcome.error,
                )
            deliveries[name] = record
        self._record(job_id, deliveries, destinations, len(files))

    def _backoff(self, attempts: int) -> timedelta:
        settings = self.settings.dispatch
        return timedelta(seconds=min(settings.first_retry_seconds * 2 ** (attempts - 1), settings.max_retry_seconds))

    def _record(self, job_id: int, deliveries: dict, destinations: list[str], file_count: int) -> None:  # noqa: ANN001
        with transaction(self.sessions) as session:
            job = session.get_one(Job, job_id)
            if job.state is not JobState.SENDING:
                return  # re-opened meanwhile: its new run will send again
            job.deliveries = deliveries
            if all(deliveries.get(d, {}).get("delivered_at") for d in destinations):
                jobs.change_state(session, job, JobState.DONE, f"sent {file_count} file(s) to {', '.join(destinations)}")
                log_event(LOG, logging.INFO, "job.done", job=job_id)
                return
            exhausted = [
                f"{d}: {deliveries[d].get('last_error')} (after {deliveries[d]['attempts']} attempts)"
                for d in destinations
                if d in deliveries
                and not deliveries[d].get("delivered_at")
                and deliveries[d]["attempts"] >= self.settings.dispatch.max_attempts
            ]
            if exhausted:
                jobs.fail(session, job, f"{jobs.SENDING_FAILURE_PREFIX}: " + "; ".join(exhausted))
                log_event(LOG, logging.ERROR, "job.failed", job=job_id, reason=job.reason)


def files_for(destination: Destination, files: list[str]) -> list[str]:
    """The result files this destination takes: its SEG encoding, and what its ``send`` list names."""
    encoding = destination.segmentation_type.lower()
    wanted = {"rtstruct.dcm" if kind == "rtstruct" else f"{kind}-{encoding}.dcm" for kind in destination.send}
    return [f for f in files if Path(f).name in wanted]


def _due(record: dict, now: datetime) -> bool:  # noqa: ANN001
    next_attempt = record.get("next_attempt_at")
    return next_attempt is None or datetime.fromisoformat(next_attempt) <= now
