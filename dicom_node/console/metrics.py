"""Prometheus metrics computed from the database at scrape time, and the health checks.

Receivers in several processes and workers on other hosts all write to the one database, so
counting there (not in this process' memory) sees everything. Each scrape runs a handful of
queries whose cost does not grow with uptime: the audit and instance counts come from totals the
database keeps as rows are written (:class:`db.models.AuditTotal`, :class:`db.models.InstanceTotal`),
and the histograms are built from the most recent ``console.metrics_window_jobs`` jobs, read
through an index. README "Operations console" documents every metric.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import tempfile
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import distinct, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from db.models import (
    AuditEvent,
    AuditTotal,
    InstanceTotal,
    Job,
    JobEvent,
    JobState,
    RejectedInstance,
    Series,
    as_utc,
    utcnow,
)
from db.session import read_only
from dicom_node.config import Settings, TlsSettings
from dicom_node.console.queries import Transition, echoes_of, refusal_kind, stages_of
from dicom_node.logs import first_line, os_error_text
from dicom_node.receive.recorder import JOURNAL_SUFFIX, instances_waiting_to_be_recorded
from dicom_node.storage_lock import DATABASE_FILE_NAME, database_identity, describe_database

DURATION_BUCKETS: tuple[float, ...] = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
STAGES: tuple[str, ...] = ("receive", "complete", "infer", "encode", "dispatch")

UNFINISHED_STATES = (JobState.RECEIVING, JobState.COMPLETE, JobState.QUEUED, JobState.PROCESSING, JobState.SENDING)
"""The states a series passes through on its way to DONE, FAILED or IGNORED: each has its oldest series' age."""


MAX_REFUSAL_KINDS = 20
"""At most this many reason labels on dicom_node_instances_refused: 19 kinds and "other" for the rest."""


def bounded_refusal_tally(
    rows: Iterable[tuple[int, str, int]], labelled: set[str] | None = None
) -> dict[tuple[str, str], int]:
    """(status, kind) -> count, with no more than :data:`MAX_REFUSAL_KINDS` kinds. ``labelled``: the kinds that have a
    label of their own, kept between scrapes (the collector's, for the process' lifetime) and added to, most frequent
    first, while there is room: a kind once labelled keeps its label and a kind once counted as "other" stays there,
    so no series shrinks between scrapes when a new kind appears (Prometheus would read a counter reset)."""
    labelled = set() if labelled is None else labelled
    tally: dict[tuple[str, str], int] = {}
    per_kind: dict[str, int] = {}
    for status, reason, count in rows:
        kind = refusal_kind(reason)
        key = (f"0x{status:04X}", kind)
        tally[key] = tally.get(key, 0) + int(count)
        per_kind[kind] = per_kind.get(kind, 0) + int(count)
    for kind in sorted(per_kind, key=lambda kind: (-per_kind[kind], kind)):
        if kind not in labelled and len(labelled) < MAX_REFUSAL_KINDS - 1:
            labelled.add(kind)
    bounded: dict[tuple[str, str], int] = {}
    for (code, kind), count in tally.items():
        merged = (code, kind if kind in labelled else "other")
        bounded[merged] = bounded.get(merged, 0) + count
    return bounded


ECHO_TIMEOUT_SECONDS = 5.0
"""How long /readyz's C-ECHO of the node's own DICOM port waits for the association and for the answer."""
CHECK_SECONDS = 5.0
"""A readiness check (the C-ECHO, the storage test write) runs at most once this often; callers in between, or
waiting while it runs, share its result, so probes in a loop cannot flood the DICOM port or the disk."""
READY_FREE_BYTES = 64 * 1024**2
"""Free space under which the node is not ready to receive (a tenth of the file system where that is smaller): the
receiver answers 0xA700 to every image it cannot write, and a CT image is about 0.5 MB."""


@dataclass(frozen=True)
class Outcome:
    """A readiness check's result; ``reason`` says in words why it failed."""

    ok: bool
    reason: str = ""


class Cached:
    """``check`` run at most once each ``seconds``, one run at a time: a caller arriving while it runs waits for that
    run and takes its result, so any number of concurrent probes cost one check."""

    def __init__(
        self, check: Callable[[], Outcome], seconds: float = CHECK_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._check = check
        self._seconds = seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._last: tuple[float, Outcome] | None = None

    def __call__(self) -> Outcome:
        with self._lock:
            if self._last is not None and self._clock() - self._last[0] < self._seconds:
                return self._last[1]
            try:
                outcome = self._check()
            except Exception as exc:  # noqa: BLE001 - a check that breaks reports why, it never fails the probe
                outcome = Outcome(False, f"the check could not run: {first_line(exc)[:200]}")
            self._last = (self._clock(), outcome)
            return outcome


class TcpListener:
    """Whether something accepts TCP connections on the SCP's port (a wildcard host is tried on loopback). The
    console replaces it with :class:`ScpEcho` (:meth:`Liveness.for_node`): a port that takes connections says
    nothing of whether anyone answers them."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = local_address(host), port

    def __call__(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0):
                return True
        except OSError:
            return False


def scp_listener(host: str, port: int) -> Callable[[], bool]:
    """The SCP check ``serve`` hands the console: see :class:`TcpListener`."""
    return TcpListener(host, port)


def local_address(host: str) -> str:
    """Where this machine reaches a listener on ``host`` (a wildcard is reached on loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def own_port_tls(tls: TlsSettings) -> tuple[ssl.SSLContext, str]:
    """``tls_args`` for a C-ECHO of the node's own TLS port from this machine: encrypted, the node's certificate
    offered (for mutual TLS), the answer's certificate not checked (it names the public host, not loopback)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_3 if tls.minimum_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    return context, "localhost"


def echo_own_port(settings: Settings, timeout: float = ECHO_TIMEOUT_SECONDS) -> Outcome:
    """C-ECHO the node's own DICOM port from this machine, with its own AE title as calling and called AE title (as
    the Docker health check always did: admitted from loopback, see README "Docker"), over TLS where it listens so."""
    from dicom_node.scu import verify

    network = settings.network
    host, port = local_address(network.host), network.port
    try:
        tls_args = own_port_tls(network.tls) if network.tls is not None else None
    except (OSError, ssl.SSLError) as exc:
        return Outcome(False, f"the node's TLS certificate cannot be read for a C-ECHO of its own port: {exc}")
    result = verify(network.ae_title, network.ae_title, host, port, timeout=timeout, tls_args=tls_args)
    if result.ok:
        return Outcome(True)
    if "gave no answer" in result.message or result.message == "no response":
        return Outcome(
            False,
            f"the DICOM port {port} accepted a connection but did not answer a C-ECHO within {timeout:g} s (the "
            "receiving processes are stopped, hung or overloaded: senders' images are not received)",
        )
    if result.message.startswith("no association"):
        return Outcome(False, f"the DICOM port {port} does not accept connections (on {host})")
    return Outcome(False, f"a C-ECHO of the node's own DICOM port {port} failed: {result.message}")


class ScpEcho:
    """The SCP check of a running node: a real C-ECHO of its own DICOM port (:func:`echo_own_port`), at most one
    each :data:`CHECK_SECONDS`; calling it says whether the last one was answered."""

    def __init__(self, settings: Settings, seconds: float = CHECK_SECONDS) -> None:
        self.outcome = Cached(lambda: echo_own_port(settings), seconds)

    def __call__(self) -> bool:
        return self.outcome().ok


RECORDING_LAG_SECONDS = 120.0
"""A receiving process' journal segment seen this long is a database taking no writes: a segment takes new entries
for :data:`~dicom_node.receive.recorder.SEGMENT_SECONDS` at most and is deleted once all it names are recorded, so
one of its images has waited at least this long less those seconds."""


class RecordingLag:
    """Whether acknowledged images wait too long to be recorded: a journal segment (deleted once all it names are
    recorded) seen for :data:`RECORDING_LAG_SECONDS` by this process' steady clock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._seen: dict[str, float] = {}  # segment name -> when first seen

    def lag(self, folder: Path) -> Outcome | None:
        """A failed outcome naming how many images wait, or None while recording keeps up."""
        now = self.clock()
        try:
            names = [segment.name for segment in (folder / "journal").glob(f"*{JOURNAL_SUFFIX}")]
        except OSError:
            return None
        self._seen = {name: self._seen.get(name, now) for name in names}
        if not any(now - since >= RECORDING_LAG_SECONDS for since in self._seen.values()):
            return None
        waiting = instances_waiting_to_be_recorded(folder)
        return Outcome(
            False,
            f"up to {waiting} acknowledged image(s) have waited about {RECORDING_LAG_SECONDS / 60:.0f} minutes or more "
            "to be recorded in the database, which takes no writes (another process holds it locked, or its disk is "
            "full): they are safe on disk and are recorded once it takes writes; until then their series are not "
            "completed or processed",
        )


RECORDING = RecordingLag()


def storage_check(settings: Settings, sessions: sessionmaker[Session]) -> Outcome:
    """Whether received images can be stored: a small file written and deleted in ``<storage>/incoming`` (where the
    receiver writes), free space above :data:`READY_FREE_BYTES`, and the folder's ``.database`` naming this
    node's database while it records instances (missing: another, empty, file system is mounted there, or none)."""
    folder = settings.storage.directory
    incoming = folder / "incoming"
    try:
        descriptor, name = tempfile.mkstemp(prefix="readyz-", suffix=".partial", dir=incoming)
        try:
            os.write(descriptor, b"\0" * 4096)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
            os.unlink(name)
        usage = shutil.disk_usage(incoming)
    except OSError as exc:
        why = (exc.strerror or "the operating system refused").lower()
        return Outcome(
            False,
            f"the storage folder cannot be written ({why}: {incoming}): the receiver answers 0xA700 to every image",
        )
    floor = min(READY_FREE_BYTES, usage.total // 10)
    if usage.free < floor:
        return Outcome(
            False,
            f"the storage folder {folder} has {usage.free / 1024**2:,.1f} MB free (less than "
            f"{floor / 1024**2:,.0f} MB): the receiver answers 0xA700 to images it cannot write",
        )
    lagging = RECORDING.lag(folder)
    if lagging is not None:
        return lagging
    with read_only(sessions) as session:
        recorded = int(session.scalar(select(InstanceTotal.instances)) or 0)
    if recorded == 0:
        return Outcome(True)
    marker = folder / DATABASE_FILE_NAME
    try:
        lines = marker.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        return Outcome(
            False,
            f"the storage folder {folder} does not hold this node's images: {os_error_text(exc)}, while the database "
            f"records {recorded} instances (is the storage file system mounted?)",
        )
    named = next((value.strip() for key, _, value in (line.partition(" ") for line in lines) if key == "database"), "")
    own = database_identity(settings.database_url, folder)
    if named != own:
        return Outcome(
            False,
            f"the storage folder {folder} holds the images of another database ({marker} names "
            f"{describe_database(named) if named else 'none'}, not {describe_database(own)}): is the right file "
            "system mounted there?",
        )
    return Outcome(True)


@dataclass(frozen=True)
class Liveness:
    """Callables the metrics and /readyz ask about this process: workers alive (None: run elsewhere), SCP listening,
    receiving processes alive (None: ``serve`` receives in its own process), storage writable (None: not checked)."""

    workers_alive: Callable[[], int | None]
    scp_listening: Callable[[], bool]
    receivers_alive: Callable[[], int | None] = lambda: None
    storage_ready: Callable[[], Outcome] | None = None

    def for_node(self, settings: Settings, sessions: sessionmaker[Session]) -> Liveness:
        """The checks the console makes of a running node: its port C-ECHOed (where ``serve`` handed a
        :class:`TcpListener`), its storage folder tried, each at most once each :data:`CHECK_SECONDS`."""
        scp = ScpEcho(settings) if isinstance(self.scp_listening, TcpListener) else self.scp_listening
        storage = self.storage_ready or Cached(lambda: storage_check(settings, sessions))
        return replace(self, scp_listening=scp, storage_ready=storage)

    def scp_outcome(self) -> Outcome:
        if isinstance(self.scp_listening, ScpEcho):
            return self.scp_listening.outcome()
        if self.scp_listening():
            return Outcome(True)
        return Outcome(False, "the DICOM port does not accept connections")


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
        self._refusal_labels: set[str] = set()  # see bounded_refusal_tally
        self._refusal_lock = threading.Lock()  # two listeners may scrape at once

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
        rows = session.execute(
            select(RejectedInstance.status, RejectedInstance.reason, func.count()).group_by(
                RejectedInstance.status, RejectedInstance.reason
            )
        ).all()
        with self._refusal_lock:
            tally = bounded_refusal_tally(rows, self._refusal_labels)
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
        yield self._oldest(session)

    @staticmethod
    def _oldest(session: Session) -> Metric:
        """How long the series longest in each unfinished state has been in it: an alert on a series stuck
        RECEIVING, waiting for a worker or for its destination fires on this, whatever the volume."""
        oldest = dict(
            session.execute(
                select(Job.state, func.min(Job.state_changed_at))
                .where(Job.state.in_(UNFINISHED_STATES))
                .group_by(Job.state)
            ).all()
        )
        age = GaugeMetricFamily(
            "dicom_node_oldest_job_age_seconds",
            "Seconds the series longest in each unfinished state has been in it (0 when none is).",
            labels=["state"],
        )
        now = utcnow()
        for state in UNFINISHED_STATES:
            since = oldest.get(state)
            age.add_metric([state.value], max((now - as_utc(since)).total_seconds(), 0.0) if since else 0.0)
        return age

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
        yield self._destinations_up(session)

    def _destinations_up(self, session: Session) -> Metric:
        """Each destination's latest C-ECHO outcome, from the audit records of the console's periodic probe (and of
        echoes an operator asked for) within the last two probe intervals, plus one C-ECHO time limit per
        destination and a minute: an older one says nothing of now, and the destination is left out."""
        up = GaugeMetricFamily(
            "dicom_node_destination_up",
            "1 when the destination answered its latest C-ECHO (the console sends one every "
            "console.echo_interval_seconds), 0 when it did not; absent while no recent C-ECHO is recorded.",
            labels=["destination"],
        )
        interval = self.settings.console.echo_interval_seconds
        if not interval:
            return up
        destinations = self.settings.destinations
        window = 2 * interval + len(destinations) * self.settings.dispatch.timeout_seconds + 60
        since = utcnow() - timedelta(seconds=window)
        for name, destination in destinations.items():
            latest = session.scalar(
                select(AuditEvent.outcome)
                .where(AuditEvent.at >= since, echoes_of(name, destination))
                .order_by(AuditEvent.at.desc(), AuditEvent.id.desc())
                .limit(1)
            )
            if latest is not None:
                up.add_metric([name], 1.0 if latest == "success" else 0.0)
        return up

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
        listening = GaugeMetricFamily(
            "dicom_node_scp_listening",
            "1 when the DICOM port answers a C-ECHO (the check /readyz makes, at most once each 5 s).",
        )
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
        if self.liveness.storage_ready is not None:
            ready = GaugeMetricFamily(
                "dicom_node_storage_ready",
                "1 when the storage folder takes a test write, has room, and holds this database's images (the check "
                "/readyz makes, at most once each 5 s).",
            )
            ready.add_metric([], 1.0 if self.liveness.storage_ready().ok else 0.0)
            yield ready
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


@dataclass(frozen=True)
class Readiness:
    """What /readyz answers: each check (None: not this process' to check) and, for each failed one, why."""

    checks: dict[str, bool | None]
    reasons: list[str]

    @property
    def ready(self) -> bool:
        return all(value is not False for value in self.checks.values())


def assess(sessions: sessionmaker[Session], liveness: Liveness) -> Readiness:
    """What /readyz checks: database reachable; the DICOM port answering a C-ECHO (a port that only takes
    connections says nothing: ``serve`` binds it for its receiving processes, and the kernel queues connections
    while they are stopped or dead); a receiving process alive (None: ``serve`` receives itself); a worker alive
    (None: workers run elsewhere); the storage folder writable, with room, and this database's."""
    reasons: list[str] = []
    try:
        with read_only(sessions) as session:  # a reader: another process' write lock is no outage
            session.execute(text("SELECT 1"))
        database = True
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
        database = False
        reasons.append(f"the database does not answer ({first_line(exc)[:200]})")
    scp = liveness.scp_outcome()
    if not scp.ok:
        reasons.append(scp.reason)
    alive = liveness.workers_alive()
    receivers = liveness.receivers_alive()
    if receivers == 0:
        reasons.append("no receiving process is alive (serve starts them again)")
    if alive == 0:
        reasons.append("no inference worker process is alive (serve starts them again)")
    storage: bool | None = None
    if liveness.storage_ready is not None:
        if database:
            outcome = liveness.storage_ready()
            storage = outcome.ok
            if not outcome.ok:
                reasons.append(outcome.reason)
        else:
            storage = None  # the check reads the database
    return Readiness(
        {
            "database": database,
            "scp": scp.ok,
            "receiver": None if receivers is None else receivers > 0,
            "worker": None if alive is None else alive > 0,
            "storage": storage,
        },
        reasons,
    )


def readiness(sessions: sessionmaker[Session], liveness: Liveness) -> dict[str, bool | None]:
    """The checks of :func:`assess` (true, false, or None where not this process' to check)."""
    return assess(sessions, liveness).checks
