"""Engine, sessions and schema migrations."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, Executable, Result, Row, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import StaleDataError
from sqlalchemy.pool import NullPool

LOG = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

DEFAULT_BUSY_TIMEOUT_SECONDS = 30.0
"""How long one SQLite statement waits for another process' write lock (``database.busy_timeout_seconds``)."""

T = TypeVar("T")


class DatabaseBusy(Exception):
    """The database stayed locked by another writer for longer than the caller could wait."""


def make_engine(url: str, busy_timeout_seconds: float = DEFAULT_BUSY_TIMEOUT_SECONDS) -> Engine:
    """Create an engine; SQLite gets WAL, a busy timeout and write-locking transactions.

    SQLite runs in WAL mode with ``synchronous=NORMAL``: a commit survives the
    process being killed (the case the node must handle); the instance files
    themselves are fsynced, and any file missing from the database is indexed
    again at start-up (:func:`dicom_node.receive.storage.reconcile`).
    """
    if make_url(url).get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    _create_sqlite_folder(url)
    engine = create_engine(url, connect_args={"timeout": busy_timeout_seconds, "check_same_thread": False})
    busy_timeout_ms = max(1, round(busy_timeout_seconds * 1000))

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        cursor.close()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection, _record, _proxy) -> None:
        if dbapi_connection.isolation_level is not None:  # reset to "" after a read_outside_transaction
            dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:
        if connection.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
            return  # a lone read (read_outside_transaction): WAL readers never wait for the writer
        # Take the write lock up front: two writers never deadlock on a lock upgrade.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _create_sqlite_folder(url: str) -> None:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)


def read_outside_transaction(factory: sessionmaker[Session], query: Executable) -> Any:
    """One scalar, read without a transaction: on SQLite it takes no write lock and never waits for a writer."""
    return _outside_transaction(factory, query).scalar()


def read_row_outside_transaction(factory: sessionmaker[Session], query: Executable) -> Row[Any] | None:
    """The first row, or None, read as :func:`read_outside_transaction` reads a scalar."""
    return _outside_transaction(factory, query).first()


def _outside_transaction(factory: sessionmaker[Session], query: Executable) -> Result[Any]:
    bind = factory.kw["bind"]
    if isinstance(bind, Connection):
        return bind.execute(query)
    with bind.connect() as connection:  # the rows are buffered: they outlive the connection
        return connection.execution_options(isolation_level="AUTOCOMMIT").execute(query).freeze()()


def make_session_factory(engine: Engine | Connection) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose work is committed on success and rolled back on error."""
    with factory() as session, session.begin():
        yield session


def is_database_locked(error: BaseException) -> bool:
    """Whether ``error`` is a transient lock ("database is locked" / busy), not a real fault."""
    if not isinstance(error, OperationalError):
        return False
    message = str(error.orig if error.orig is not None else error).lower()
    return "locked" in message or "busy" in message


def is_database_full(error: BaseException) -> bool:
    """Whether ``error`` is SQLite's "database or disk is full" (clears once space is freed)."""
    return isinstance(error, OperationalError) and "database or disk is full" in str(error.orig or error).lower()


def retry_when_locked(
    action: Callable[[], T],
    *,
    waiting: str,
    limit_seconds: float,
    first_delay_seconds: float = 0.05,
    longest_delay_seconds: float = 5.0,
    wait_for_disk_space: bool = False,
) -> T:
    """Run ``action`` (a whole transaction) again while the database is locked by another writer.

    Also when another process changed a job the transaction had read (``StaleDataError`` from the
    job's version): the action reads again and decides on the newer state.

    Each run already waits SQLite's busy timeout; between runs the delay doubles
    up to ``longest_delay_seconds``. Every wait is logged at WARNING, naming what waits.

    Parameters
    ----------
    action
        Opens, does and commits one transaction; it must be safe to run again after a rollback.
    waiting
        What waits, for the log: "recording instance 1.2.3", "worker host:12 claiming a job".
    limit_seconds
        Give up once this long has passed since the first try.
    wait_for_disk_space
        Also wait while SQLite reports "database or disk is full" (workers, whose
        outcome must not be lost; the receiver answers at once instead).

    Raises
    ------
    DatabaseBusy
        If the database is still locked after ``limit_seconds``.
    """
    started = time.monotonic()
    delay = first_delay_seconds
    tries = 0
    while True:
        tries += 1
        try:
            return action()
        except StaleDataError:
            # Another process changed a job this transaction had read (its version moved on): run it again,
            # so the decision is made on the newer state instead of overwriting it.
            LOG.info("database.changed_meanwhile", extra={"event_fields": {"waiting": waiting, "tries": tries}})
            if time.monotonic() - started > limit_seconds:
                raise
            continue
        except OperationalError as exc:
            if is_database_locked(exc):
                cause = "the database is locked by another process"
            elif wait_for_disk_space and is_database_full(exc):
                cause = "the disk holding the database is full"
            else:
                raise
            waited = time.monotonic() - started
            if waited + delay > limit_seconds:
                LOG.error(
                    "database.busy_gave_up",
                    extra={
                        "event_fields": {
                            "waiting": waiting,
                            "waited_seconds": round(waited, 1),
                            "tries": tries,
                            "reason": cause,
                        }
                    },
                )
                raise DatabaseBusy(f"{cause} for {waited:.0f} s while {waiting}") from None
            LOG.warning(
                "database.busy",
                extra={
                    "event_fields": {
                        "waiting": waiting,
                        "waited_seconds": round(waited, 1),
                        "next_try_in_seconds": round(delay, 2),
                        "reason": cause,
                    }
                },
            )
            time.sleep(delay)
            delay = min(delay * 2, longest_delay_seconds)


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


MIGRATION_LOCK_KEY = 7_316_001
"""PostgreSQL advisory lock held while migrating: workers starting at once on several hosts migrate one at a time."""


def migrate(url: str) -> None:
    """Bring the database schema to the newest revision (creating it if needed).

    On PostgreSQL the upgrade runs under an advisory lock, so processes starting at
    the same moment (the node and workers on other hosts) never migrate concurrently.
    """
    _create_sqlite_folder(url)
    if make_url(url).get_backend_name() != "postgresql":
        command.upgrade(alembic_config(url), "head")
        return
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            try:
                command.upgrade(alembic_config(url), "head")
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
    finally:
        engine.dispose()


def open_database(url: str, busy_timeout_seconds: float = DEFAULT_BUSY_TIMEOUT_SECONDS) -> sessionmaker[Session]:
    """Migrate the schema to the newest revision and return a session factory."""
    migrate(url)
    return make_session_factory(make_engine(url, busy_timeout_seconds))


NODE_LOCK_KEY = 7_316_002
"""PostgreSQL advisory lock held by the one ``dicom-node serve`` of a database for as long as it runs."""


class NodeLock:
    """Held by the one ``dicom-node serve`` of a database while it runs.

    Two nodes on one database (a rolling update that starts the new node before the old one stops, a
    second node started by mistake) would each dispatch every result: the PACS would get every file twice.
    On PostgreSQL the lock is a session advisory lock on a connection of its own (given back by the server
    when the node's process or host dies); on SQLite an exclusive ``flock`` on ``<database>.serve-lock``
    beside the database file (given back by the kernel when the process dies). Workers do not take it.
    """

    KEEPALIVE: ClassVar[dict[str, Any]] = {
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
        "options": "-c tcp_keepalives_idle=30 -c tcp_keepalives_interval=10 -c tcp_keepalives_count=3",
    }
    """TCP keepalives of the lock's connection, on both ends: the server gives the lock back about a minute after
    the node's host is gone (its default would keep it for over two hours), and the node learns as soon that
    the server is gone."""
    WATCH_SECONDS = 15.0

    def __init__(self, url: str) -> None:
        self.url = url
        self._connection: Connection | None = None
        self._engine: Engine | None = None
        self._file: int | None = None
        self._watching: threading.Event | None = None

    @property
    def _sqlite_file(self) -> Path | None:
        """The SQLite database file; None for PostgreSQL or an in-memory database."""
        parsed = make_url(self.url)
        if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
            return None
        return Path(str(parsed.database))

    @property
    def where(self) -> str:
        """The database, in words: its file, or "this PostgreSQL database"."""
        database = self._sqlite_file
        return str(database) if database is not None else "this PostgreSQL database"

    @property
    def lock_file(self) -> Path | None:
        """The SQLite lock file; None for PostgreSQL or an in-memory database."""
        database = self._sqlite_file
        return database.with_name(database.name + ".serve-lock") if database is not None else None

    def try_take(self, *, unreachable_is_busy: bool = True) -> bool:
        """Take the lock if no other node holds it; True when this node holds it now.

        A PostgreSQL server that cannot be reached counts as busy (False), unless ``unreachable_is_busy`` is
        False: then its error is raised (the first try at start-up, so a wrong URL fails at once).
        """
        if make_url(self.url).get_backend_name() == "postgresql":
            return self._try_advisory_lock(unreachable_is_busy)
        path = self.lock_file
        if path is None:
            return True
        path.parent.mkdir(parents=True, exist_ok=True)  # taken before the database exists: before migrating it
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            return False
        self._file = descriptor
        return True

    def _try_advisory_lock(self, unreachable_is_busy: bool = True) -> bool:
        """Take the advisory lock on a connection of its own; False when another node holds it or the database
        cannot be reached now (tried again by the caller)."""
        self._engine = self._engine or create_engine(self.url, poolclass=NullPool, connect_args=self.KEEPALIVE)
        try:
            connection = self._engine.connect()
        except OperationalError:
            if not unreachable_is_busy:
                raise
            return False
        try:
            taken = bool(connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": NODE_LOCK_KEY}).scalar())
            connection.commit()  # a session lock outlives the transaction: the connection holds it
        except OperationalError:
            taken = False
        if not taken:
            connection.close()
            return False
        self._connection = connection
        return True

    def watch(self, on_lost: Callable[[str], object]) -> None:
        """On PostgreSQL, check the lock's connection every :attr:`WATCH_SECONDS` from a thread of its own: a
        connection that ended (a database restart, a failover, a dropped idle connection) gave the lock back, so
        it is taken again; if another node took it meanwhile, ``on_lost`` is called with why."""
        if self._connection is None:
            return
        self._watching = threading.Event()
        stopped = self._watching

        def check() -> None:
            while not stopped.wait(self.WATCH_SECONDS):
                if self._still_held():
                    continue
                if self._try_advisory_lock():
                    LOG.warning(
                        "The connection holding this node's lock on the database ended; the lock was taken again."
                    )
                    continue
                on_lost(
                    "the connection holding this node's lock on the database ended and another dicom-node serve "
                    "holds the database now (or it cannot be reached); this node stops, since two would send every "
                    "result twice"
                )
                return

        threading.Thread(target=check, name="node-lock-watch", daemon=True).start()

    def _still_held(self) -> bool:
        connection = self._connection
        if connection is None:
            return False
        try:
            connection.execute(text("SELECT 1")).scalar()
            connection.commit()
            return True
        except Exception:  # noqa: BLE001 - any failure: the connection, and with it the lock, is gone
            with contextlib.suppress(Exception):
                connection.close()
            self._connection = None
            return False

    def release(self) -> None:
        """Give the lock back (at a clean stop; a dead process gives it back by itself)."""
        if self._watching is not None:
            self._watching.set()
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        if self._file is not None:
            os.close(self._file)
            self._file = None
