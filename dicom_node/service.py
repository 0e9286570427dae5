"""`dicom-node serve`: the SCP (store, query/retrieve), the series watcher, the inference worker processes, the dispatcher and retention."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session, sessionmaker

from db import jobs
from db import session as db_session
from db.session import transaction
from dicom_node import security
from dicom_node.config import Settings
from dicom_node.dispatch import Dispatcher
from dicom_node.logs import log_event
from dicom_node.receive.processes import Receiving, start_receiving
from dicom_node.receive.storage import InstanceStore, repair
from dicom_node.retention import RetentionTask, put_back_set_aside_files
from dicom_node.watcher import SeriesWatcher

if TYPE_CHECKING:
    from dicom_node.console.app import ConsoleServer
from dicom_node.worker import log_worker_death, requeue_jobs_of_previous_run, run_worker, worker_id

LOG = logging.getLogger(__name__)


class WorkerSupervisor:
    """Keeps ``inference.workers`` worker processes running; restarts one that dies.

    When a worker dies, the job it held (PROCESSING, claimed by its "host:pid") is
    queued again at once, or FAILED once ``inference.max_worker_deaths`` workers
    died on it (:func:`db.jobs.worker_died`), so one poison series cannot block the queue.
    """

    CHECK_SECONDS = 0.5
    RESTART_DELAY_SECONDS = 5.0  # at least this long between two starts of one worker slot

    def __init__(self, settings: Settings, sessions: sessionmaker[Session] | None = None) -> None:
        self.settings = settings
        self.sessions = sessions
        self._context = multiprocessing.get_context("spawn")
        self._processes: list[multiprocessing.process.BaseProcess] = []
        self._started_at: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="worker-supervisor", daemon=True)

    def start(self) -> None:
        self._processes = [self._spawn(n) for n in range(self.settings.inference.workers)]
        self._started_at = [time.monotonic()] * len(self._processes)
        self._thread.start()

    def _spawn(self, number: int) -> multiprocessing.process.BaseProcess:
        process = self._context.Process(target=run_worker, args=(self.settings, os.getpid()), name=f"worker-{number}")
        process.start()
        log_event(LOG, logging.INFO, "worker.started", worker=number, pid=process.pid)
        return process

    def _supervise(self) -> None:
        handled: set[int | None] = set()  # pids whose death was recorded
        while not self._stop.wait(self.CHECK_SECONDS):
            for number, process in enumerate(self._processes):
                if process.is_alive() or self._stop.is_set():
                    continue
                if process.pid not in handled:
                    handled.add(process.pid)
                    log_event(
                        LOG, logging.ERROR, "worker.died", worker=number, pid=process.pid, exit_code=process.exitcode
                    )
                    self._release_jobs_of(process.pid)
                if time.monotonic() - self._started_at[number] >= self.RESTART_DELAY_SECONDS:
                    self._processes[number] = self._spawn(number)
                    self._started_at[number] = time.monotonic()

    def _release_jobs_of(self, pid: int | None) -> None:
        """Queue again (or fail, at the crash limit) the job the dead worker ``pid`` held."""
        if self.sessions is None or pid is None:
            return  # the next worker to start finds the job (requeue_abandoned_jobs)
        try:
            with transaction(self.sessions) as session:
                for job in jobs.jobs_of_worker(session, worker_id(pid=pid)):
                    log_worker_death(job, jobs.worker_died(session, job, self.settings.inference.max_worker_deaths))
        except Exception:  # the restarted worker's own check takes over
            LOG.exception("worker.release_failed", extra={"event_fields": {"pid": pid}})

    def alive_count(self) -> int:
        """How many of the local worker processes are running now."""
        return sum(p.is_alive() for p in self._processes)

    def stop(self) -> None:
        """Ask every worker to stop; one still busy after 30 s is killed and its job queued again (not a death)."""
        self._stop.set()
        for process in self._processes:
            process.terminate()
        for process in self._processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join(timeout=10)
                self._requeue_jobs_of(process.pid)

    def _requeue_jobs_of(self, pid: int | None) -> None:
        if self.sessions is None or pid is None:
            return
        with transaction(self.sessions) as session:
            for job in jobs.jobs_of_worker(session, worker_id(pid=pid)):
                jobs.worker_stopped(session, job)


@dataclass
class RunningNode:
    server: Receiving
    watcher: SeriesWatcher
    workers: WorkerSupervisor
    dispatcher: Dispatcher
    sessions: sessionmaker[Session]
    retention: RetentionTask
    console: ConsoleServer | None = None

    def stop(self) -> None:
        if self.console is not None:
            self.console.stop()
        self.server.shutdown()
        self.watcher.stop()
        self.workers.stop()
        self.dispatcher.stop()
        self.retention.stop()
        log_event(LOG, logging.INFO, "node.stopped")


def open_database(settings: Settings) -> sessionmaker[Session]:
    """Migrate the schema to the newest revision and return a session factory."""
    return db_session.open_database(settings.database_url, settings.database.busy_timeout_seconds)


def start_node(settings: Settings) -> RunningNode:
    """Repair storage after any crash, then start the SCP (store, query/retrieve), the watcher, workers and dispatcher."""
    _warn_about_open_doors(settings)
    sessions = open_database(settings)
    store = InstanceStore(
        settings.storage.directory,
        fsync=settings.storage.fsync,
        quarantine_reserve_gigabytes=settings.storage.quarantine_reserve_gigabytes,
    )
    put_back = put_back_set_aside_files(store.instances_dir)  # a purge cut off by a crash: the rows are still there
    report = repair(store, sessions)
    requeue_jobs_of_previous_run(sessions)  # before this run's workers start: their pids may be the old ones'
    log_event(
        LOG,
        logging.INFO,
        "node.storage_checked",
        directory=str(settings.storage.directory),
        set_aside_files_put_back=put_back,
        partial_files_removed=report.partial_files_removed,
        instances_indexed=report.instances_indexed,
        unreadable_files=report.unreadable_files,
        duplicates_of_other_series_quarantined=report.duplicates_quarantined,
    )
    # Bind first: a port in use must stop start-up before any thread or process exists.
    server = start_receiving(settings, store, sessions)
    workers = WorkerSupervisor(settings, sessions)
    console = _start_console(settings, sessions, server, workers)
    watcher = SeriesWatcher(settings, sessions)
    watcher.start()
    workers.start()
    dispatcher = Dispatcher(settings, sessions)
    dispatcher.start()
    retention = RetentionTask(settings, sessions)
    retention.start()
    return RunningNode(
        server=server,
        watcher=watcher,
        workers=workers,
        dispatcher=dispatcher,
        sessions=sessions,
        retention=retention,
        console=console,
    )


def _start_console(
    settings: Settings, sessions: sessionmaker[Session], server: Receiving, workers: WorkerSupervisor
) -> ConsoleServer | None:
    """The operations console (``console.enabled``); a port in use stops start-up like the SCP's would."""
    if not settings.console.enabled:
        return None
    from dicom_node.console.app import start_console
    from dicom_node.console.metrics import Liveness, scp_listener

    def workers_alive() -> int | None:
        return workers.alive_count() if settings.inference.workers else None

    listening = scp_listener(settings.network.host, settings.network.port)
    try:
        return start_console(settings, sessions, Liveness(workers_alive, listening))
    except OSError:
        server.shutdown()
        raise


def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT."""
    node = start_node(settings)
    stopping = threading.Event()

    def _request_stop(signum: int, _frame: object) -> None:
        log_event(LOG, logging.INFO, "node.stopping", signal=signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGINT, _request_stop)
    log_event(LOG, logging.INFO, "node.ready", ae_title=settings.network.ae_title, port=settings.network.port)
    stopping.wait()
    node.stop()


def _warn_about_open_doors(settings: Settings) -> None:
    security.apply(settings)
    if not settings.rules:
        log_event(LOG, logging.WARNING, "config.no_rules", hint="every series will be IGNORED; add rules")
