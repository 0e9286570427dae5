"""Receiving in one process or several: the SCP (C-ECHO, C-STORE, Q/R), its instance recorder, their supervision.

With ``receive.processes`` 1, the SCP runs in ``serve``'s own process, as it
always did. With more, ``serve`` binds the port itself and starts that many
receiving processes, each accepting on the same listening socket (the kernel
hands each connection to one of them), each with the same AE, peers, TLS and
PDU limits, and its own recorder. The per-host and global association caps
are counted in one :class:`~dicom_node.security.AssociationCaps`, and the
studies being received are claimed by patient in one
:class:`~dicom_node.receive.claims.StudyClaims`, both of which ``serve``
creates before starting them.

A receiving process that dies is started again (later each time while it keeps
dying); the instances it acknowledged and had not yet recorded are indexed from its journal first
(:func:`~dicom_node.receive.recorder.recover_journals`), without restarting
``serve``, and the series its open associations were storing are marked cut short
(:func:`~dicom_node.receive.open_transfers.mark_left_open`). One whose accepting loop stops running
(the process stopped, or hung) for ``receive.unresponsive_seconds`` is ended and handled the same way.
A receiving process whose ``serve`` is gone stops by itself.
"""

from __future__ import annotations

import fcntl
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from pynetdicom.transport import AssociationServer
from sqlalchemy.orm import Session, sessionmaker

from db.models import utcnow
from dicom_node.audit import flush_repeated
from dicom_node.config import Settings
from dicom_node.logs import first_line, log_event
from dicom_node.process_exit import how_a_process_ended
from dicom_node.receive.claims import StudyClaims
from dicom_node.receive.open_transfers import mark_left_open
from dicom_node.receive.recorder import InstanceRecorder, journal_folder, recover_journals
from dicom_node.receive.scp import StoreContext, start_storage_scp
from dicom_node.receive.storage import TEMPORARY_SUFFIXES, InstanceStore
from dicom_node.retrieve.scp import RetrieveContext
from dicom_node.security import AssociationCaps
from dicom_node.stop_signal import wait_until_stopped

LOG = logging.getLogger(__name__)

PROCESSES_PER_CORE = 2
"""Receiving processes per CPU core for ``receive.processes: 0``. While one process waits for its disk writes
another can run: ten senders on 2 cores finished in a median 3.2-3.7 s with four processes against 4.0-4.8 s
with two (``bench/receive_throughput.py``, 2026-11-30)."""
MOST_AUTOMATIC_PROCESSES = 8
READY_TIMEOUT_SECONDS = 120.0
START_ATTEMPTS = 3
"""Starts of one receiving process at start-up before ``serve`` gives up (one killed while starting is started
again)."""


class ReceiverNotStarted(RuntimeError):
    """A receiving process could not be started at start-up; the message is a sentence for the administrator."""


def _ended_how(process: multiprocessing.process.BaseProcess) -> str:
    """How a process that did not start ended, in words."""
    if process.exitcode is None:
        return f"it did not listen within {READY_TIMEOUT_SECONDS:.0f} s"
    return how_a_process_ended(process.exitcode)


class Receiving(Protocol):
    def shutdown(self) -> None: ...

    def alive_count(self) -> int | None:
        """Receiving processes alive now; None where ``serve`` receives in its own process."""
        ...


def receiving_processes(settings: Settings) -> int:
    """``receive.processes``, with 0 meaning two per CPU core (at most :data:`MOST_AUTOMATIC_PROCESSES`)."""
    wanted = settings.receive.processes
    if wanted == 0:
        wanted = min(PROCESSES_PER_CORE * len(os.sched_getaffinity(0)), MOST_AUTOMATIC_PROCESSES)
    return max(wanted, 1)


def start_receiving(settings: Settings, store: InstanceStore, sessions: sessionmaker[Session]) -> Receiving:
    """Start the SCP and its recorder here, or in ``receive.processes`` supervised processes.

    Raises OSError if the port cannot be bound (before any process starts).
    """
    _wait_for_earlier_receivers(store)
    store.remove_partial_files()  # again: an earlier receiver may have written after start-up repair looked
    recover_journals(store, sessions)  # left by receivers that ended before recording
    mark_left_open(journal_folder(store), sessions, NODE_STOPPED)  # before any sender can send the rest again
    processes = receiving_processes(settings)
    if processes == 1:
        return InProcessReceiver.start(settings, store, sessions)
    store.close()  # serve's own process stores no instances beside its receivers: it keeps no spare files
    pool = ReceiverPool(settings, store, sessions, processes)
    pool.start()
    return pool


@dataclass
class InProcessReceiver:
    """The SCP in ``serve``'s own process."""

    server: AssociationServer
    recorder: InstanceRecorder
    store: InstanceStore

    @classmethod
    def start(cls, settings: Settings, store: InstanceStore, sessions: sessionmaker[Session]) -> InProcessReceiver:
        recorder = InstanceRecorder(store, sessions)
        recorder.start()
        server = start_storage_scp(
            settings.network,
            StoreContext(store=store, sessions=sessions, recorder=recorder),
            RetrieveContext.from_settings(settings, sessions),
        )
        return cls(server, recorder, store)

    def alive_count(self) -> int | None:
        return None

    def shutdown(self) -> None:
        self.server.shutdown()
        self.recorder.stop()
        self.store.close()


NODE_STOPPED = (
    "the node stopped without ending its associations in order (it was killed or crashed, or its machine stopped)"
)
"""How an earlier ``serve`` left associations open, for the series they were storing."""
ALIVE_SUFFIX = ".alive"
EARLIER_RECEIVER_WAIT_SECONDS = 60.0


def _hold_alive_lock(store: InstanceStore) -> Any:
    """Hold ``journal/<pid>.alive`` locked for this process' whole life (the kernel lets go once every thread ended)."""
    path = journal_folder(store) / f"{os.getpid()}{ALIVE_SUFFIX}"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(path, "w")  # noqa: SIM115 - open until the process ends
    fcntl.flock(lock, fcntl.LOCK_EX)
    return lock


def _wait_for_earlier_receivers(store: InstanceStore) -> None:
    """Wait until the receiving processes of an earlier ``serve`` have ended completely.

    A ``serve`` that was killed takes its receivers with it, but a receiver thread inside a
    slow write or fsync finishes that system call first; its files must not appear after
    start-up has cleaned up. Each receiver holds ``journal/<pid>.alive`` locked until then.
    """
    deadline = time.monotonic() + EARLIER_RECEIVER_WAIT_SECONDS
    for path in journal_folder(store).glob(f"*{ALIVE_SUFFIX}"):
        with open(path, "a") as lock:
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"a receiving process of an earlier run (pid {path.stem}) still runs; "
                            "stop it, then start the node again"
                        ) from None
                    time.sleep(0.1)
        path.unlink(missing_ok=True)


def bind_listening_socket(host: str, port: int) -> socket.socket:
    """The node's listening socket, bound before any receiving process starts (a port in use stops start-up)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listening = socket.socket(family, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind((host, port))
        listening.listen(128)
    except OSError:
        listening.close()
        raise
    return listening


class ReceiverPool:
    """``receive.processes`` receiving processes on one listening socket, restarted when one dies.

    A process that keeps dying is started again after a delay that doubles each time (1, 2, 4 ... s, at most
    :data:`LONGEST_RESTART_DELAY_SECONDS`), and after :data:`RESTART_DELAY_SECONDS` again once one has run for
    :data:`STEADY_SECONDS`.
    """

    CHECK_SECONDS = 0.5
    RESTART_DELAY_SECONDS = 1.0
    LONGEST_RESTART_DELAY_SECONDS = 60.0
    STEADY_SECONDS = 60.0

    def __init__(
        self, settings: Settings, store: InstanceStore, sessions: sessionmaker[Session], processes: int
    ) -> None:
        self.settings = settings
        self.store = store
        self.sessions = sessions
        self.count = processes
        self._context = multiprocessing.get_context("spawn")
        self.caps = AssociationCaps.for_network(settings.network, processes)
        self.claims = StudyClaims(processes=processes)
        self.listening = bind_listening_socket(settings.network.host, settings.network.port)
        self._processes: list[multiprocessing.process.BaseProcess] = []  # each slot's latest process
        self._started_at: list[float] = []  # when each slot's latest process was started (monotonic)
        self._restart_delay = [0.0] * processes  # each slot's last delay before a start again
        self._restart_at: dict[int, float] = {}  # slot -> when to start its dead process again (monotonic)
        self._unrecovered: set[int] = set()  # dead receivers whose journals could not be indexed yet
        self._deaths: dict[int, tuple[str, datetime]] = {}  # pid -> how it ended, when it was last seen alive
        self._heartbeats: dict[int, Any] = {}  # pid -> when its accepting loop last ran (monotonic, shared memory)
        self._ended_unresponsive: dict[int, tuple[str, datetime]] = {}  # pid -> why the node ended it, last beat
        self._last_check = utcnow()
        self._stop = threading.Event()
        self._stopped = threading.Event()  # set once shutdown has stopped every receiving process
        self._thread = threading.Thread(target=self._supervise, name="receiver-supervisor", daemon=True)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes if p.pid is not None]

    def alive_count(self) -> int:
        """Receiving processes alive: a dead one is left out from when the supervisor notices it (within
        :data:`CHECK_SECONDS`) until it is started again. Read from the supervisor's own record, so that no other
        thread waits for (reaps) a receiving process."""
        return self.count - len(self._restart_at)

    def start(self) -> None:
        """Start every receiving process (in parallel: each takes seconds to import) and wait until each listens."""
        starting: list[tuple[multiprocessing.process.BaseProcess, Any]] = []
        try:
            for number in range(self.count):
                starting.append(self._spawn(number))
            self._processes = [self._ready_or_again(number, *pair) for number, pair in enumerate(starting)]
            self._started_at = [time.monotonic()] * self.count
        except BaseException:
            self._processes = [process for process, _ in starting]
            self.shutdown()
            raise
        network = self.settings.network
        log_event(
            LOG,
            logging.INFO,
            "scp.listening",
            ae_title=network.ae_title,
            host=network.host,
            port=network.port,
            tls="on" if network.tls else "off",
            processes=self.count,
        )
        self._thread.start()

    def _spawn(self, number: int) -> tuple[multiprocessing.process.BaseProcess, Any]:
        ready = self._context.RawValue("b", 0)  # no lock: a Condition-based Event can hang a setter whose waiter died
        heartbeat = self._context.RawValue("d", 0.0)  # a double is written whole: no lock either
        process = self._context.Process(
            target=run_receiver,
            args=(
                self.settings,
                self.listening,
                self.caps.for_process(number),
                self.claims.for_process(number),
                os.getpid(),
                ready,
                heartbeat,
            ),
            name=f"receiver-{number}",
        )
        process.start()
        if process.pid is not None:
            self._heartbeats[process.pid] = heartbeat
        return process, ready

    def _ready_or_again(
        self, number: int, process: multiprocessing.process.BaseProcess, ready: Any
    ) -> multiprocessing.process.BaseProcess:
        """The receiving process once it listens; one that died while starting (killed, say) is started again,
        up to :data:`START_ATTEMPTS` times in all, before start-up fails with a sentence."""
        for attempt in range(1, START_ATTEMPTS + 1):
            if self._wait_ready(process, ready):
                log_event(LOG, logging.INFO, "receiver.started", receiver=number, pid=process.pid)
                return process
            self._clean_up_after(process.pid)  # it may have acknowledged an instance before it died
            if attempt < START_ATTEMPTS:
                log_event(
                    LOG,
                    logging.WARNING,
                    "receiver.start_failed",
                    receiver=number,
                    pid=process.pid,
                    reason=f"receiving process {number} stopped while starting: {_ended_how(process)}; "
                    f"starting it again (attempt {attempt + 1} of {START_ATTEMPTS})",
                )
                process, ready = self._spawn(number)
        raise ReceiverNotStarted(
            f"receiving process {number} did not start after {START_ATTEMPTS} attempts (at the last one "
            f"{_ended_how(process)}); the lines above say why"
        )

    @staticmethod
    def _wait_ready(process: multiprocessing.process.BaseProcess, ready: Any) -> bool:
        """Whether ``process`` listens within :data:`READY_TIMEOUT_SECONDS` (else it is killed)."""
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while not ready.value:
            if not process.is_alive() or time.monotonic() > deadline:
                process.kill()
                process.join(timeout=10)
                return False
            time.sleep(0.05)
        return True

    def _supervise(self) -> None:
        """Start each receiving process that died again, until shutdown; then wait until shutdown has stopped them.

        A process started here dies with this thread, not with ``serve`` (Linux ties PR_SET_PDEATHSIG to the
        thread that started a process): were the thread to end with the stop request, the receivers it started
        again would be killed before they record what they acknowledged, instead of stopping as the others do.
        """
        self._restart_dead_receivers()
        self._stopped.wait()

    def _restart_dead_receivers(self) -> None:
        while not self._stop.wait(self.CHECK_SECONDS):
            for pid in sorted(self._unrecovered):
                self._clean_up_after(pid)
            for number in range(self.count):
                if self._stop.is_set():
                    return
                if number in self._restart_at:
                    if time.monotonic() >= self._restart_at[number]:
                        self._start_again(number)
                elif not self._processes[number].is_alive():
                    self._after_death(number)
                elif (stalled := self._stalled_seconds(number)) is not None:
                    self._end_unresponsive(number, stalled)
            self._last_check = utcnow()

    def _stalled_seconds(self, number: int) -> float | None:
        """How long slot ``number``'s accepting loop has not run, where that is past
        ``receive.unresponsive_seconds`` and the node has not ended the process yet; else None."""
        pid = self._processes[number].pid
        heartbeat = self._heartbeats.get(pid) if pid is not None else None
        if heartbeat is None or not heartbeat.value or pid in self._ended_unresponsive:
            return None  # not listening yet (its start has its own limit), or already being ended
        stalled = time.monotonic() - heartbeat.value
        return stalled if stalled > self.settings.receive.unresponsive_seconds else None

    def _end_unresponsive(self, number: int, stalled: float) -> None:
        """End slot ``number``'s process, stopped or hung with its accepting loop not running for ``stalled``
        seconds: it takes no new connection and answers none it holds. Once it is gone, it is handled as one
        that died (:meth:`_after_death`), the series its associations were storing marked cut short."""
        process = self._processes[number]
        assert process.pid is not None
        last_beat = utcnow() - timedelta(seconds=stalled)
        why = (
            f"its accepting loop had not run for {stalled:.0f} s (the process was stopped or hung), "
            "so the node ended it"
        )
        self._ended_unresponsive[process.pid] = (why, last_beat)
        log_event(
            LOG,
            logging.ERROR,
            "receiver.unresponsive",
            receiver=number,
            pid=process.pid,
            stalled_seconds=round(stalled, 1),
            reason=f"receiving process {number} (pid {process.pid}) has not run its accepting loop for "
            f"{stalled:.0f} s (over receive.unresponsive_seconds, "
            f"{self.settings.receive.unresponsive_seconds:g} s): it is stopped or hung, and the connections it "
            "holds get no answer; ending it so that it is started again",
        )
        process.kill()
        process.join(timeout=5)  # a process inside a system call ends once the call returns
        if not process.is_alive():
            self._after_death(number)

    def _after_death(self, number: int) -> None:
        """Log how slot ``number``'s process ended, index what it acknowledged, and set when it starts again."""
        process = self._processes[number]
        lived = time.monotonic() - self._started_at[number]
        steady = lived >= self.STEADY_SECONDS or not self._restart_delay[number]
        delay = self.RESTART_DELAY_SECONDS if steady else self._restart_delay[number] * 2
        delay = min(delay, self.LONGEST_RESTART_DELAY_SECONDS)
        self._restart_delay[number] = delay
        self._restart_at[number] = time.monotonic() + delay
        how, alive_at = self._ended_unresponsive.pop(
            process.pid or 0, (how_a_process_ended(process.exitcode), self._last_check)
        )
        self._heartbeats.pop(process.pid or 0, None)
        log_event(
            LOG,
            logging.ERROR,
            "receiver.died",
            receiver=number,
            pid=process.pid,
            restart_in_seconds=round(delay, 1),
            reason=f"receiving process {number} (pid {process.pid}) stopped after running {lived:.1f} s: "
            f"{how}; indexing what it acknowledged, then starting it again in "
            f"{delay:.0f} s"
            + ("" if steady else " (it keeps stopping: each start again waits twice as long, up to a minute)"),
        )
        # First the connections it held and the data sets it was receiving (gone with it), and the lock on
        # the counts if it died holding it: the other receiving processes wait for that, not for indexing.
        self.caps.forget(number)
        self.claims.give_back_lock_of(number)
        if process.pid is not None:  # alive then: a sender's association begun since may resend
            self._deaths[process.pid] = (how, alive_at)
        self._clean_up_after(process.pid)
        if process.pid not in self._unrecovered:  # what it acknowledged is recorded: its claims are the rows now
            self.claims.forget(number)

    def _start_again(self, number: int) -> None:
        """Start slot ``number`` again; one that dies before it listens is noted as dead at the next check. The slot
        counts as dead (:meth:`alive_count`) until its new process listens or is gone."""
        try:
            process, ready = self._spawn(number)
        except Exception:  # e.g. no memory for another process: tried again after a longer delay
            LOG.exception("receiver.restart_failed", extra={"event_fields": {"receiver": number}})
            delay = min(
                max(self._restart_delay[number] * 2, self.RESTART_DELAY_SECONDS), self.LONGEST_RESTART_DELAY_SECONDS
            )
            self._restart_delay[number] = delay
            self._restart_at[number] = time.monotonic() + delay
            return
        started_at = time.monotonic()
        if self._wait_ready(process, ready):
            log_event(LOG, logging.INFO, "receiver.started", receiver=number, pid=process.pid)
        # Once it listens, or is gone: one that died while starting is noted at the next check, by its own pid.
        self._processes[number] = process
        self._started_at[number] = started_at
        del self._restart_at[number]

    def _clean_up_after(self, pid: int | None) -> None:
        """Index the files a gone receiving process acknowledged but did not record, mark the series its open
        associations were storing cut short; drop its partial files."""
        if pid is None:
            return
        try:
            recover_journals(self.store, self.sessions, pid)
            how, alive_at = self._deaths.get(
                pid, ("it did not stop in order (it was stopped at the node's stop, or died while starting)", None)
            )
            mark_left_open(journal_folder(self.store), self.sessions, how, pid, at=alive_at)
            self._unrecovered.discard(pid)
            self._deaths.pop(pid, None)
        except Exception as exc:  # noqa: BLE001 - tried again at every check; start-up repair at the latest
            if pid not in self._unrecovered:
                log_event(
                    LOG,
                    logging.WARNING,
                    "receiver.recovery_waiting",
                    pid=pid,
                    reason=f"its acknowledged instances cannot be indexed yet ({first_line(exc)}); "
                    "trying again every half second",
                )
            self._unrecovered.add(pid)
        for partial in self.store.incoming_dir.glob(f"{pid}-*"):
            if partial.name.endswith(TEMPORARY_SUFFIXES):
                partial.unlink(missing_ok=True)
        (journal_folder(self.store) / f"{pid}{ALIVE_SUFFIX}").unlink(missing_ok=True)

    def shutdown(self) -> None:
        """Stop every receiving process (each records what it acknowledged first), then close the socket."""
        self._stop.set()
        for process in self._processes:
            if process.is_alive():
                process.terminate()
        for process in self._processes:
            process.join(timeout=45)
            if process.is_alive():
                process.kill()
                process.join(timeout=10)
            self._clean_up_after(process.pid)
        self._stopped.set()
        self.listening.close()


def run_receiver(
    settings: Settings,
    listening: socket.socket,
    caps: AssociationCaps,
    claims: StudyClaims,
    parent_pid: int,
    ready: Any,
    heartbeat: Any,
) -> None:
    """Entry point of a receiving process: the SCP on the shared socket, and a recorder, until SIGTERM.

    ``heartbeat`` is set to the time (monotonic) at each turn of the accepting loop, for the supervisor.
    """
    from db.session import make_engine, make_session_factory
    from dicom_node.logs import configure_logging

    configure_logging(settings.logging.level, settings.logging.format)
    _die_with_parent(parent_pid)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches serve, which stops us in order
    threading.Thread(target=_stop_when_orphaned, args=(stop, parent_pid), name="parent-watch", daemon=True).start()
    sessions = make_session_factory(make_engine(settings.database_url, settings.database.busy_timeout_seconds))
    store = InstanceStore(
        settings.storage.directory,
        fsync=settings.storage.fsync,
        quarantine_reserve_gigabytes=settings.storage.quarantine_reserve_gigabytes,
    )
    alive = _hold_alive_lock(store)
    recorder = InstanceRecorder(store, sessions)
    recorder.start()
    context = StoreContext(store=store, sessions=sessions, recorder=recorder)
    context.studies.share_claims(claims)
    server = start_storage_scp(
        settings.network,
        context,
        RetrieveContext.from_settings(settings, sessions, processes=receiving_processes(settings)),
        caps=caps,
        listening=listening,
        heartbeat=lambda: setattr(heartbeat, "value", time.monotonic()),
    )
    heartbeat.value = time.monotonic()
    ready.value = 1
    wait_until_stopped(stop)
    server.shutdown()
    flush_repeated(sessions)  # counts of repeated requests (C-ECHO, refusals) not yet written
    recorder.stop()
    store.close()
    Path(alive.name).unlink(missing_ok=True)


def _die_with_parent(parent_pid: int) -> None:
    """On Linux, be killed (SIGKILL) the moment ``serve`` dies, as if the node were one process.

    A receiver that kept answering after ``serve`` was killed would acknowledge instances
    while nothing completes or indexes them, and hold the port against the next ``serve``.
    Elsewhere :func:`_stop_when_orphaned` stops it within a second.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # serve died before the request took effect
        os._exit(1)


def _stop_when_orphaned(stop: threading.Event, parent: int, interval_seconds: float = 1.0) -> None:
    """Stop receiving when ``serve`` is gone (killed): a receiver must not outlive it and hold the port."""
    while not stop.wait(interval_seconds):
        if os.getppid() != parent:
            log_event(
                LOG,
                logging.WARNING,
                "receiver.orphaned",
                pid=os.getpid(),
                reason=f"the serve process that started it ({parent}) is gone; stopping",
            )
            stop.set()
