"""`dicom-node serve`: the SCP (store, query/retrieve), the series watcher, the inference worker processes, the dispatcher and retention."""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
from dataclasses import dataclass

from pynetdicom.transport import AssociationServer
from sqlalchemy.orm import Session, sessionmaker

from db.session import make_engine, make_session_factory, migrate
from dicom_node.config import Settings
from dicom_node.dispatch import Dispatcher
from dicom_node.logs import log_event
from dicom_node.receive.scp import StoreContext, start_storage_scp
from dicom_node.receive.storage import InstanceStore, repair
from dicom_node.retention import RetentionTask
from dicom_node.retrieve.scp import RetrieveContext
from dicom_node.watcher import SeriesWatcher
from inference.worker import run_worker

LOG = logging.getLogger(__name__)


class WorkerSupervisor:
    """Keeps ``inference.workers`` worker processes running; restarts one that dies."""

    RESTART_DELAY_SECONDS = 5.0

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._context = multiprocessing.get_context("spawn")
        self._processes: list[multiprocessing.process.BaseProcess] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="worker-supervisor", daemon=True)

    def start(self) -> None:
        self._processes = [self._spawn(n) for n in range(self.settings.inference.workers)]
        self._thread.start()

    def _spawn(self, number: int) -> multiprocessing.process.BaseProcess:
        process = self._context.Process(target=run_worker, args=(self.settings,), name=f"worker-{number}")
        process.start()
        log_event(LOG, logging.INFO, "worker.started", worker=number, pid=process.pid)
        return process

    def _supervise(self) -> None:
        while not self._stop.wait(self.RESTART_DELAY_SECONDS):
            for number, process in enumerate(self._processes):
                if not process.is_alive() and not self._stop.is_set():
                    log_event(LOG, logging.ERROR, "worker.died", worker=number, exit_code=process.exitcode)
                    self._processes[number] = self._spawn(number)

    def stop(self) -> None:
        self._stop.set()
        for process in self._processes:
            process.terminate()
        for process in self._processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()


@dataclass
class RunningNode:
    server: AssociationServer
    watcher: SeriesWatcher
    workers: WorkerSupervisor
    dispatcher: Dispatcher
    sessions: sessionmaker[Session]
    retention: RetentionTask

    def stop(self) -> None:
        self.server.shutdown()
        self.watcher.stop()
        self.workers.stop()
        self.dispatcher.stop()
        self.retention.stop()
        log_event(LOG, logging.INFO, "node.stopped")


def open_database(settings: Settings) -> sessionmaker[Session]:
    """Migrate the schema to the newest revision and return a session factory."""
    migrate(settings.database_url)
    return make_session_factory(make_engine(settings.database_url, settings.database.busy_timeout_seconds))


def start_node(settings: Settings) -> RunningNode:
    """Repair storage after any crash, then start the SCP (store, query/retrieve), the watcher, workers and dispatcher."""
    _warn_about_open_doors(settings)
    sessions = open_database(settings)
    store = InstanceStore(settings.storage.directory, fsync=settings.storage.fsync)
    report = repair(store, sessions)
    log_event(
        LOG,
        logging.INFO,
        "node.storage_checked",
        directory=str(settings.storage.directory),
        partial_files_removed=report.partial_files_removed,
        instances_indexed=report.instances_indexed,
        unreadable_files=report.unreadable_files,
    )
    # Bind first: a port in use must stop start-up before any thread or process exists.
    server = start_storage_scp(
        settings.network,
        StoreContext(store=store, sessions=sessions, record_timeout_seconds=settings.database.busy_timeout_seconds),
        RetrieveContext(ae_title=settings.network.ae_title, destinations=settings.destinations, sessions=sessions),
    )
    watcher = SeriesWatcher(settings, sessions)
    watcher.start()
    workers = WorkerSupervisor(settings)
    workers.start()
    dispatcher = Dispatcher(settings, sessions)
    dispatcher.start()
    retention = RetentionTask(settings, sessions)
    retention.start()
    return RunningNode(
        server=server, watcher=watcher, workers=workers, dispatcher=dispatcher, sessions=sessions, retention=retention
    )


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
    if not settings.network.allowed_calling_ae_titles:
        log_event(
            LOG,
            logging.WARNING,
            "config.accepting_every_caller",
            hint="set network.allowed_calling_ae_titles to the PACS AE titles that may send",
        )
    if not settings.rules:
        log_event(LOG, logging.WARNING, "config.no_rules", hint="every series will be IGNORED; add rules")
