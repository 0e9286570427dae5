"""Prometheus metrics computed from the database at scrape time, and the health checks.

Receivers in several processes and workers on other hosts all write to the one database, so
counting there (not in this process' memory) sees everything. Each scrape runs a handful of
queries whose cost does not grow with uptime: the audit and instance counts come from totals the
database keeps as rows are written (:class:`db.models.AuditTotal`, :class:`db.models.InstanceTotal`),
and the histograms are built from the most recent ``console.metrics_window_jobs`` jobs, read
through an index. README "Operations console" documents every metric.
"""

from __future__ import annotations

import shutil
import socket
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import distinct, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from db.models import AuditTotal, InstanceTotal, Job, JobEvent, JobState, RejectedInstance, Series
from db.session import read_only
from dicom_node.config import Settings
from dicom_node.console.queries import Transition, refusal_kind, stages_of

DURATION_BUCKETS: tuple[float, ...] = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
STAGES: tuple[str, ...] = ("receive", "complete", "infer", "encode", "dispatch")


MAX_REFUSAL_KINDS = 20
"""At most this many reason labels on dicom_node_instances_refused; the rarer kinds are counted as "other"."""


def bounded_refusal_tally(rows: Iterable[tuple[int, str, int]]) -> dict[tuple[str, str], int]:
    """(status, kind) -> count, with no more than :data:`MAX_REFUSAL_KINDS` kinds (the most frequent)."""
    tally: dict[tuple[str, str], int] = {}
    per_kind: dict[str, int] = {}
    for status, reason, count in rows:
        kind = refusal_kind(reason)
        key = (f"0x{status:04X}", kind)
        tally[key] = tally.get(key, 0) + int(count)
        per_kind[kind] = per_kind.get(kind, 0) + int(count)
    if len(per_kind) <= MAX_REFUSAL_KINDS:
        return tally
    kept = set(sorted(per_kind, key=lambda kind: (-per_kind[kind], kind))[: MAX_REFUSAL_KINDS - 1])
    bounded: dict[tuple[str, str], int] = {}
    for (code, kind), count in tally.items():
        merged = (code, kind if kind in kept else "other")
        bounded[merged] = bounded.get(merged, 0) + count
    return bounded


@dataclass(frozen=True)
class Liveness:
    """Callables the metrics and /readyz ask about this process: workers alive (None: run elsewhere), SCP listening,
    receiving processes alive (None: ``serve`` receives in its own process)."""

    workers_alive: Callable[[], int | None]
    scp_listening: Callable[[], bool]
    receivers_alive: Callable[[], int | None] = lambda: None


def scp_listener(host: str, port: int) -> Callable[[], bool]:
    """Whether something accepts TCP connections on the SCP's port (a wildcard host is tried on loopback)."""
    target = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host

    def check() -> bool:
        try:
            with socket.create_connection((target, port), timeout=1.0):
                return True
        except OSError:
            return False

    return check


def _histogram(name: str, documentation: str, label: str, samples: dict[str, list[float]]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=[label])
    for key, values in sorted(samples.items()):
        ordered = sorted(values)
        buckets = [(str(bound), float(bisect_right(ordered, bound))) for bound in DURATION_BUCKETS]
        buckets.append(("+Inf", float(len(values))))
        family.add_metric([key], buckets, sum_value=float(sum(values)))
    return family


class DatabaseCollector(Collector):
    """Every metric of the node, read from the database (and the storage folder) when Prometheus scrapes."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], liveness: Liveness) -> None:
        self.settings = settings
        self.sessions = sessions
        self.liveness = liveness

    def collect(self) -> Iterable[Metric]:
        with read_only(self.sessions) as session:
            yield from self._receiving(session)
            yield from self._jobs(session)
            yield from self._durations(session)
            yield from self._dispatch(session)
            yield from self._workers(session)
            yield from self._storage(session)

    def _receiving(self, session: Session) -> Iterator[Metric]:
        received = CounterMetricFamily(
            "dicom_node_instances_received",
            "Instances stored from C-STORE (audit trail, written when each association ends).",
        )
        received.add_metric(
            [],
            float(
                session.scalar(
                    select(func.coalesce(func.sum(AuditTotal.instances), 0)).where(
                        AuditTotal.action == "store", AuditTotal.outcome == "success"
                    )
                )
                or 0
            ),
        )
        yield received
        stored = GaugeMetricFamily(
            "dicom_node_instances_stored", "Received instances recorded now (retention removes purged ones)."
        )
        stored.add_metric([], float(session.scalar(select(InstanceTotal.instances)) or 0))
        yield stored
        refused = CounterMetricFamily(
            "dicom_node_instances_refused",
            "Instances refused at C-STORE, or set aside after it (status 0x0000), by DIMSE status and kind of reason.",
            labels=["status", "reason"],
        )
        tally = bounded_refusal_tally(
            session.execute(
                select(RejectedInstance.status, RejectedInstance.reason, func.count()).group_by(
                    RejectedInstance.status, RejectedInstance.reason
                )
            )
        )
        for (code, kind), total in sorted(tally.items()):
            refused.add_metric([code, kind], float(total))
        yield refused
        associations = CounterMetricFamily(
            "dicom_node_associations",
            "Associations that ended, by outcome (released, aborted, rejected); C-ECHO-only associations recorded "
            "once per peer each 10 s are each counted.",
            labels=["outcome"],
        )
        for outcome, count in session.execute(
            select(AuditTotal.outcome, AuditTotal.records + AuditTotal.left_out).where(
                AuditTotal.action == "association", AuditTotal.records > 0
            )
        ):
            associations.add_metric([outcome], float(count))
        yield associations

    def _jobs(self, session: Session) -> Iterator[Metric]:
        counts = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        by_state = GaugeMetricFamily("dicom_node_jobs", "Series (jobs) in each state now.", labels=["state"])
        for state in JobState:
            by_state.add_metric([state.value], float(counts.get(state, 0)))
        yield by_state
        depth = GaugeMetricFamily("dicom_node_queue_depth", "Series QUEUED and waiting for an inference worker.")
        depth.add_metric([], float(counts.get(JobState.QUEUED, 0)))
        yield depth

    def _durations(self, session: Session) -> Iterator[Metric]:
        window = self.settings.console.metrics_window_jobs
        stages: dict[str, list[float]] = {stage: [] for stage in STAGES}
        end_to_end: list[float] = []
        for stage, seconds in self._recent_stages(session, window):
            (end_to_end if stage == "end_to_end" else stages[stage]).append(seconds)
        yield _histogram(
            "dicom_node_stage_duration_seconds",
            f"Seconds per pipeline stage over the {window} most recent jobs (receive: first to last image; complete: "
            "last image to COMPLETE; infer: model work; encode: writing SEG/SR/RTSTRUCT; dispatch: SENDING to DONE).",
            "stage",
            stages,
        )
        latency = _histogram(
            "dicom_node_end_to_end_seconds",
            f"Seconds from a series' last image to the last of its results accepted by its destinations "
            f"(DONE after SENDING), over the {window} most recent jobs.",
            "path",
            {"delivered": end_to_end},
        )
        yield latency

    @staticmethod
    def _recent_stages(session: Session, window: int) -> Iterator[tuple[str, float]]:
        """(stage, seconds) of the ``window`` most recently changed jobs, read as plain rows (the newest jobs through
        their index, their events through theirs): a scrape of 10,000 jobs builds no ORM object."""
        recent = (
            select(Job.id, Job.state, Job.timings, Series.first_received_at, Series.last_received_at)
            .join(Series, Series.id == Job.series_id)
            .order_by(Job.state_changed_at.desc())
            .limit(window)
        )
        jobs = session.execute(recent).all()
        events: dict[int, list[tuple[int, Transition]]] = {}
        for event_id, job_id, before, after, at in session.execute(
            select(JobEvent.id, JobEvent.job_id, JobEvent.from_state, JobEvent.to_state, JobEvent.at).where(
                JobEvent.job_id.in_(select(recent.subquery("recent_jobs").c.id))
            )
        ):
            events.setdefault(job_id, []).append((event_id, Transition(before, after, at)))
        for job_id, state, timings, first_image, last_image in jobs:
            transitions = [transition for _id, transition in sorted(events.get(job_id, []))]
            yield from stages_of(state, timings, first_image, last_image, transitions).items()

    def _dispatch(self, session: Session) -> Iterator[Metric]:
        names = {f"{d.host}:{d.port}": name for name, d in self.settings.destinations.items()}
        attempts = CounterMetricFamily(
            "dicom_node_dispatch_attempts",
            "Sending attempts per destination, by outcome (success, partial, failed).",
            labels=["destination", "outcome"],
        )
        for address, ae_title, outcome, count in session.execute(
            select(AuditTotal.peer_address, AuditTotal.peer_ae_title, AuditTotal.outcome, AuditTotal.records).where(
                AuditTotal.action == "send", AuditTotal.records > 0
            )
        ):
            attempts.add_metric([names.get(address or "", ae_title or address or "unknown"), outcome], float(count))
        yield attempts
        files = CounterMetricFamily(
            "dicom_node_dispatch_files_accepted",
            "Result files accepted per destination (audit trail).",
            labels=["destination"],
        )
        for address, ae_title, count in session.execute(
            select(AuditTotal.peer_address, AuditTotal.peer_ae_title, func.sum(AuditTotal.instances))
            .where(AuditTotal.action == "send", AuditTotal.records > 0)
            .group_by(AuditTotal.peer_address, AuditTotal.peer_ae_title)
        ):
            files.add_metric([names.get(address or "", ae_title or address or "unknown")], float(count))
        yield files

    def _workers(self, session: Session) -> Iterator[Metric]:
        alive = self.liveness.workers_alive()
        up = GaugeMetricFamily(
            "dicom_node_workers_up",
            "Inference worker processes alive in this serve process (absent: workers run elsewhere).",
        )
        if alive is not None:
            up.add_metric([], float(alive))
        yield up
        busy = GaugeMetricFamily("dicom_node_workers_busy", "Distinct workers (any host) holding a PROCESSING job now.")
        busy.add_metric(
            [],
            float(
                session.scalar(select(func.count(distinct(Job.claimed_by))).where(Job.state == JobState.PROCESSING))
                or 0
            ),
        )
        yield busy
        listening = GaugeMetricFamily("dicom_node_scp_listening", "1 when the DICOM port accepts connections.")
        listening.add_metric([], 1.0 if self.liveness.scp_listening() else 0.0)
        yield listening
        receivers = self.liveness.receivers_alive()
        up = GaugeMetricFamily(
            "dicom_node_receivers_up",
            "Receiving processes alive in this serve process (absent: serve receives in its own process).",
        )
        if receivers is not None:
            up.add_metric([], float(receivers))
        yield up

    def _storage(self, session: Session) -> Iterator[Metric]:
        instances = GaugeMetricFamily(
            "dicom_node_storage_instances_bytes", "Bytes of received instances recorded in the database."
        )
        instances.add_metric([], float(session.scalar(select(InstanceTotal.bytes)) or 0))
        yield instances
        disk = GaugeMetricFamily(
            "dicom_node_storage_filesystem_bytes",
            "The storage folder's file system: total, used and free bytes.",
            labels=["kind"],
        )
        try:
            usage = shutil.disk_usage(self.settings.storage.directory)
        except OSError:
            return
        for kind in ("total", "used", "free"):
            disk.add_metric([kind], float(getattr(usage, kind)))
        yield disk


def readiness(sessions: sessionmaker[Session], liveness: Liveness) -> dict[str, bool | None]:
    """What /readyz checks: database reachable, SCP listening, a worker alive (None: workers run elsewhere), a
    receiving process alive (None: ``serve`` receives itself). The port of several receiving processes is bound by
    ``serve`` and takes connections into its queue even while none of them is alive to answer them, so listening
    alone does not say that images are received."""
    try:
        with read_only(sessions) as session:  # a reader: another process' write lock is no outage
            session.execute(text("SELECT 1"))
        database = True
    except Exception:  # noqa: BLE001 - any failure means "not reachable"
        database = False
    alive = liveness.workers_alive()
    receivers = liveness.receivers_alive()
    return {
        "database": database,
        "scp": liveness.scp_listening(),
        "receiver": None if receivers is None else receivers > 0,
        "worker": None if alive is None else alive > 0,
    }
