"""Engine, sessions and schema migrations."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, Executable, Result, Row, create_engine, event, text
from sqlalchemy.engine import ExceptionContext, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import StaleDataError
from sqlalchemy.pool import NullPool

LOG = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

DEFAULT_BUSY_TIMEOUT_SECONDS = 30.0
"""How long one SQLite statement waits for another process' write lock (``database.busy_timeout_seconds``)."""

JOURNAL_SIZE_LIMIT_BYTES = 16 * 1024 * 1024
"""What SQLite keeps of its write-ahead log (the ``-wal`` file beside the database) once a checkpoint has copied the
log into the database and the next write starts it over (``PRAGMA journal_size_limit``; without it the file keeps
its largest size for good). Four times the 4 MiB the automatic checkpoint lets the log reach (1,000 pages) before
copying it back: in steady running the file is reused as it is, never cut and grown again at each checkpoint, while
a burst of writes (a retention purge, a backlog received after an outage) leaves at most 16 MiB behind."""

CHECKPOINT_WAIT_SECONDS = 0.2
"""How long :func:`checkpoint_wal` waits for readers and writers to finish. While it waits no writer may begin, so
it is short: a database that is busy now is checkpointed at a later pass."""

T = TypeVar("T")

READ_ONLY = "dicom_node_read_only"
"""Execution option of a :func:`read_only` session's connection: on SQLite its transaction takes no write lock."""


class DatabaseBusy(Exception):
    """The database stayed locked by another writer for longer than the caller could wait."""


def make_engine(url: str, busy_timeout_seconds: float = DEFAULT_BUSY_TIMEOUT_SECONDS) -> Engine:
    """Create an engine; SQLite gets WAL, a busy timeout and write-locking transactions.

    SQLite runs in WAL mode with ``synchronous=FULL``: each commit is on disk before it returns, so a
    power cut never takes back a result recorded as sent (``NORMAL`` survives a killed process only: after a
    power cut the node forgot results it had sent, ran the series again and sent a second result). The
    receiver commits in batches, off the acknowledgement path, so this costs one sync per batch. The instance
    files themselves are fsynced, and any file missing from the database is indexed again at start-up
    (:func:`dicom_node.receive.storage.repair`).

    After SQLite fails to read or write its files (:func:`is_database_storage_fault`) every pooled connection is
    replaced: one opened while the file could not be written is read-only for good (SQLite opens it so without
    a word), and would refuse every write once the file is writable again.
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
        # Asked first: setting it, even to what it is, waits for another process' write lock (a new connection of a
        # reader, say a console page or a C-FIND, would fail while a writer holds the database).
        if str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT_BYTES}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        cursor.close()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection, _record, _proxy) -> None:
        if dbapi_connection.isolation_level is not None:  # reset to "" after a read_outside_transaction
            dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:
        options = connection.get_execution_options()
        if options.get("isolation_level") == "AUTOCOMMIT":
            return  # a lone read (read_outside_transaction): WAL readers never wait for the writer
        if options.get(READ_ONLY):
            connection.exec_driver_sql("BEGIN")  # a read_only session: a WAL reader, one snapshot, no write lock
            return
        # Take the write lock up front: two writers never deadlock on a lock upgrade.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    @event.listens_for(engine, "handle_error")
    def _on_error(context: ExceptionContext) -> None:
        if _is_sqlite_storage_fault(context.original_exception):
            context.is_disconnect = True  # this connection, and every other one in the pool, is opened again

    return engine


def _create_sqlite_folder(url: str) -> None:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)


def sqlite_file(url: str) -> Path | None:
    """The SQLite database file of ``url``; None for another database or one in memory."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(str(parsed.database))


def wal_file(database: Path) -> Path:
    """SQLite's write-ahead log of ``database``: the file beside it named ``<name>-wal``."""
    return database.with_name(database.name + "-wal")


def checkpoint_wal(database: Path) -> bool:
    """Copy SQLite's write-ahead log into ``database`` and empty it (``PRAGMA wal_checkpoint(TRUNCATE)``) once it is
    larger than :data:`JOURNAL_SIZE_LIMIT_BYTES`; whether the log is within that limit now.

    SQLite's automatic checkpoints copy the log back but start it over only when no reader still uses it: while
    readers overlap (console pages, /metrics scrapes, Query/Retrieve) it never does, and the file grows for as long
    as they do. This waits :data:`CHECKPOINT_WAIT_SECONDS` at most for a moment without them, on a connection of its
    own; a database busy for longer is left as it is (False). Raises ``sqlite3.Error`` when SQLite cannot do it.
    """
    log = wal_file(database)
    if not log.exists() or log.stat().st_size <= JOURNAL_SIZE_LIMIT_BYTES:
        return True
    # mode=rw: a database file moved away is not made anew, empty, at its path
    connection = sqlite3.connect(f"{database.resolve().as_uri()}?mode=rw", uri=True, timeout=CHECKPOINT_WAIT_SECONDS)
    try:
        busy, _pages, _copied = connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        connection.close()
    return not busy


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


@contextmanager
def read_only(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session for reads only, in one transaction that ends (rolled back) when the block is left.

    On SQLite a plain ``BEGIN``, not the ``BEGIN IMMEDIATE`` of :func:`transaction`: a WAL reader that sees one
    snapshot and takes no write lock, so receivers, workers and the dispatcher write meanwhile, and it never
    waits for them. On PostgreSQL an ordinary transaction. Read what is needed and leave the block before
    waiting on anything else (a peer reading its answers): the connection goes back to the pool then.
    """
    with factory() as session:
        if not isinstance(factory.kw.get("bind"), Connection):  # a test's connection is already in its transaction
            session.connection(execution_options={READ_ONLY: True})
        yield session


def is_database_locked(error: BaseException) -> bool:
    """Whether ``error`` is a transient lock ("database is locked" / busy), not a real fault."""
    if not isinstance(error, OperationalError):
        return False
    message = str(error.orig if error.orig is not None else error).lower()
    return "locked" in message or "busy" in message


UNREACHABLE_MARKERS = (
    "connection failed",
    "could not connect",
    "connection refused",
    "connection timed out",
    "server closed the connection",
    "terminating connection",
    "the database system is",  # starting up, shutting down, in recovery
    "no connection to the server",
    "connection is closed",
)
"""Words of PostgreSQL's driver for a server it cannot reach, or that went away (restart, failover)."""


def is_database_unreachable(error: BaseException) -> bool:
    """Whether ``error`` is the database server being unreachable or restarting (clears once it is back)."""
    if not isinstance(error, OperationalError):
        return False
    message = str(error.orig if error.orig is not None else error).lower()
    return bool(error.connection_invalidated) or any(marker in message for marker in UNREACHABLE_MARKERS)


def is_database_full(error: BaseException) -> bool:
    """Whether ``error`` is SQLite's "database or disk is full" (clears once space is freed)."""
    return isinstance(error, OperationalError) and "database or disk is full" in str(error.orig or error).lower()


SQLITE_STORAGE_FAULT_CODES = ("SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_CANTOPEN")
"""SQLite's result codes for files it cannot read or write: an input/output error (``SQLITE_IOERR_*``), a file it
could open read-only only, a file it cannot open."""
SQLITE_DATABASE_MOVED = "SQLITE_READONLY_DBMOVED"
"""The database file was deleted or moved away under the connection: no passing fault (the node lock says so)."""
SQLITE_STORAGE_FAULT_MESSAGES = ("disk i/o error", "readonly database", "unable to open database file")
"""The same, by SQLite's words (a driver that gives no result code)."""


def _is_sqlite_storage_fault(error: BaseException | None) -> bool:
    """Whether the driver's ``error`` is SQLite failing to read, write or open the database's files."""
    code = getattr(error, "sqlite_errorname", None)
    if isinstance(code, str):
        return code.startswith(SQLITE_STORAGE_FAULT_CODES) and code != SQLITE_DATABASE_MOVED
    return error is not None and any(words in str(error).lower() for words in SQLITE_STORAGE_FAULT_MESSAGES)


def is_database_storage_fault(error: BaseException) -> bool:
    """Whether ``error`` is SQLite failing to read or write the database's files ("disk I/O error", "attempt to
    write a readonly database", "unable to open database file"): it clears once the disk or file is usable again."""
    return isinstance(error, OperationalError) and _is_sqlite_storage_fault(error.orig)


def database_error_words(error: BaseException) -> str:
    """What the database said, in its own words, first line only: "disk I/O error"."""
    original = error.orig if isinstance(error, OperationalError) and error.orig is not None else error
    lines = str(original).strip().splitlines()
    return lines[0] if lines else type(original).__name__


def storage_fault_cause(error: BaseException) -> str:
    """A storage fault of the database (:func:`is_database_storage_fault`) in words, naming SQLite's error."""
    return f"the database could not be read or written ({database_error_words(error)})"


def retry_when_locked(
    action: Callable[[], T],
    *,
    waiting: str,
    limit_seconds: float,
    first_delay_seconds: float = 0.05,
    longest_delay_seconds: float = 5.0,
    wait_for_disk_space: bool = False,
    wait_for_server: bool = False,
    wait_for_storage: bool = False,
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
    wait_for_server
        Also wait while the database server cannot be reached (a PostgreSQL restart or failover): workers,
        whose work must not be lost to an outage of a few seconds.
    wait_for_storage
        Also wait while SQLite cannot read or write the database's files (an input/output error of its disk, a file
        turned read-only or that cannot be opened for a moment): workers, whose work must not be lost to a fault of
        a few seconds. Each such error replaces the engine's connections (:func:`make_engine`), so the next try
        opens a connection of its own.

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
            elif wait_for_storage and is_database_storage_fault(exc):
                cause = storage_fault_cause(exc)
            elif wait_for_server and is_database_unreachable(exc):
                cause = "the database server cannot be reached"
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
        if not _sqlite_at_newest_revision(url):
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


def schema_revision(url: str) -> str | None:
    """The database's schema revision, or None where it has none yet (an SQLite file that does not exist is not made)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and (
        not parsed.database or parsed.database == ":memory:" or not Path(parsed.database).is_file()
    ):
        return None
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def newest_revision() -> str:
    """The newest schema revision this version of dicom-node knows."""
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None  # the migrations are one line of revisions
    return head


def is_known_revision(revision: str) -> bool:
    """Whether this version of dicom-node knows ``revision`` (one made by a newer version it does not)."""
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return any(known.revision == revision for known in script.walk_revisions())


def _sqlite_at_newest_revision(url: str) -> bool:
    """Whether the SQLite database already has the newest schema, read without a write lock.

    The upgrade itself writes under ``BEGIN IMMEDIATE``, which waits only the driver's 5 s for a writer: a ``serve``
    started while a worker of the previous run still writes would otherwise fail with "locked" though it has
    nothing to migrate."""
    current = schema_revision(url)
    return current is not None and current == newest_revision()


NODE_LOCK_KEY = 7_316_002
"""PostgreSQL advisory lock held by the one ``dicom-node serve`` of a database for as long as it runs."""

ENDING_CONNECTION_SECONDS = 5.0
"""How long a node waits for its lock's ended connection to give the lock back before it takes it again."""


class NodeLock:
    """Held by the one ``dicom-node serve`` of a database while it runs.

    Two nodes on one database (a rolling update that starts the new node before the old one stops, a
    second node started by mistake) would each dispatch every result: the PACS would get every file twice.
    On PostgreSQL the lock is a session advisory lock on a connection of its own (given back by the server
    when the node's process or host dies); on SQLite an exclusive ``flock`` on ``<database>.serve-lock``
    beside the database file, the link followed when its path is a symbolic link (given back by the kernel when the
    process dies). Workers do not take it.

    On SQLite the lock also stands for the database file the node opened: a file replaced under the running node
    (a backup moved over it, as a restore does) counts as the lock lost (:meth:`confirm`), since the node's open
    connections would go on writing to the file it replaced, which no other program reads any more.
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
    WATCH_SECONDS = 1.0
    """How often the watch confirms the lock: more often than a waiting node looks at it (every 2 s; it takes only a
    lock it found given back at two looks in a row), so a node whose lock connection ended takes it again first."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._connection: Connection | None = None
        self._engine: Engine | None = None
        self._file: int | None = None
        self._backend_pid: int | None = None  # the server process of the lock's connection (PostgreSQL)
        self._held = False
        self._lost = False
        self._on_lost: Callable[[str], object] | None = None
        self._database_identity: tuple[int, int] | None = None  # SQLite: (st_dev, st_ino) of the file opened
        self._guard = threading.Lock()  # one thread at a time on the lock's connection
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
        """The SQLite lock file, beside the database file itself (symbolic links followed, so a node that names the
        file through a link locks the same file as one that names it directly); None for PostgreSQL or in memory."""
        database = self._sqlite_file
        if database is None:
            return None
        real = database.resolve()
        return real.with_name(real.name + ".serve-lock")

    def try_take(self, *, unreachable_is_busy: bool = True) -> bool:
        """Take the lock if no other node holds it; True when this node holds it now.

        A PostgreSQL server that cannot be reached counts as busy (False), unless ``unreachable_is_busy`` is
        False: then its error is raised (the first try at start-up, so a wrong URL fails at once).
        """
        if make_url(self.url).get_backend_name() == "postgresql":
            return self._try_advisory_lock(unreachable_is_busy)
        path = self.lock_file
        if path is None:
            self._held = True
            return True
        path.parent.mkdir(parents=True, exist_ok=True)  # taken before the database exists: before migrating it
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            return False
        self._file = descriptor
        self._held = True
        return True

    @property
    def on_postgresql(self) -> bool:
        """Whether the lock is PostgreSQL's advisory lock (else the SQLite lock file's)."""
        return make_url(self.url).get_backend_name() == "postgresql"

    def given_back(self) -> bool:
        """On PostgreSQL, whether no connection to this database holds the lock now (without taking it); False on
        SQLite, or when the database cannot be reached.

        A waiting node takes only a lock it finds given back at two looks in a row (see
        ``dicom_node.service.take_node_lock``): a holder whose connection ended takes it again within
        :attr:`WATCH_SECONDS`, and only a holder that is gone leaves it free. A connection that has ended but
        whose server process has not yet given the lock back still holds it.
        """
        if not self.on_postgresql:
            return False
        self._engine = self._engine or create_engine(self.url, poolclass=NullPool, connect_args=self.KEEPALIVE)
        try:
            with self._engine.connect() as connection:
                return not connection.execute(
                    text(
                        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted "
                        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                        "AND classid = 0 AND objid::bigint = :key AND objsubid = 1)"
                    ),
                    {"key": NODE_LOCK_KEY},
                ).scalar()
        except OperationalError:
            return False

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
            row = connection.execute(
                text("SELECT pg_try_advisory_lock(:key), pg_backend_pid()"), {"key": NODE_LOCK_KEY}
            ).one()
            connection.commit()  # a session lock outlives the transaction: the connection holds it
            taken = bool(row[0])
        except OperationalError:
            taken = False
        if not taken:
            connection.close()
            return False
        self._connection, self._backend_pid = connection, int(row[1])
        self._held = True
        return True

    def _take_again(self) -> bool:
        """After the lock's connection ended: take the lock again. The server tells the node a connection ends a
        moment before that connection's process has given the lock back: while that process still holds it, the
        lock is not another node's, so this waits for it (up to :data:`ENDING_CONNECTION_SECONDS`)."""
        ending, deadline = self._backend_pid, time.monotonic() + ENDING_CONNECTION_SECONDS
        while not self._try_advisory_lock():
            if ending is None or time.monotonic() > deadline or not self._held_by(ending):
                return False
            time.sleep(0.05)
        return True

    def _held_by(self, pid: int) -> bool:
        """Whether the server process ``pid`` (this node's connection that ended) still holds the lock."""
        assert self._engine is not None
        try:
            with self._engine.connect() as connection:
                return bool(
                    connection.execute(
                        text(
                            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted "
                            "AND pid = :pid AND classid = 0 AND objid::bigint = :key AND objsubid = 1)"
                        ),
                        {"pid": pid, "key": NODE_LOCK_KEY},
                    ).scalar()
                )
        except OperationalError:
            return False

    def watch(self, on_lost: Callable[[str], object]) -> None:
        """Call ``on_lost`` with why (once) when :meth:`confirm` finds the lock lost, and confirm it every
        :attr:`WATCH_SECONDS` from a thread of its own (PostgreSQL: the lock's connection; SQLite: the database
        file, which is remembered now, so call this once the database is open)."""
        self._on_lost = on_lost
        with contextlib.suppress(OSError):  # a file that cannot be looked at now is not watched
            self._database_identity = self._sqlite_identity()
        if self._connection is None and self._database_identity is None:
            return
        self._watching = threading.Event()
        stopped = self._watching

        def check() -> None:
            while not stopped.wait(self.WATCH_SECONDS) and self.confirm():
                pass

        threading.Thread(target=check, name="node-lock-watch", daemon=True).start()

    @property
    def lost(self) -> bool:
        """Whether :meth:`confirm` found the lock lost (this node must stop)."""
        return self._lost

    def _reachable(self) -> bool:
        """Whether the PostgreSQL server answers now (the caller holds ``_guard``)."""
        assert self._engine is not None
        try:
            with self._engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            return True
        except OperationalError:
            return False

    def confirm(self) -> bool:
        """Whether this node still holds the lock, asked of the database now: the fence the dispatcher checks
        before each attempt and each file it sends.

        On PostgreSQL one query on the lock's own connection. A connection that ended (a database restart, a
        failover, a dropped idle connection) gave the lock back, so it is taken again; if another node took it
        meanwhile, the lock is lost for good: ``on_lost`` (see :meth:`watch`) is called, once, and every later
        call answers False. On SQLite the ``flock`` is held until the process ends, but the database file
        remembered by :meth:`watch` must still be the one at its path: replaced or deleted, the lock is lost too.
        """
        with self._guard:
            if self._lost or not self._held:
                return False
            why = self._database_file_changed() if not self.on_postgresql else self._advisory_lock_lost()
            if why is None:
                return True
            self._lost, self._held = True, False
        if self._on_lost is not None:
            self._on_lost(why)
        return False

    def _advisory_lock_lost(self) -> str | None:
        """Why the PostgreSQL lock is lost for good, or None while this node holds it (the caller holds ``_guard``)."""
        if self._still_held():
            return None
        if self._take_again():
            LOG.warning("The connection holding this node's lock on the database ended; the lock was taken again.")
            return None
        why = (
            "another dicom-node serve holds the database now"
            if self._reachable()
            else "the database server cannot be reached to take the lock again (restarted, failed over, or the "
            "network to it is down)"
        )
        return (
            f"the connection holding this node's lock on the database ended and {why}; this node stops, since two "
            "would send every result twice"
        )

    def _sqlite_identity(self) -> tuple[int, int] | None:
        """The device and inode of the SQLite database file; None for PostgreSQL, in memory, or no file there."""
        database = self._sqlite_file
        if database is None:
            return None
        try:
            found = database.stat()
        except FileNotFoundError:
            return None
        return found.st_dev, found.st_ino

    def _database_file_changed(self) -> str | None:
        """Why the SQLite database file is no longer the one :meth:`watch` remembered (replaced, or gone), or None.

        A file that cannot be looked at for another reason (a passing input/output error) is not taken for a
        replaced one: the node's own connections say so if it persists.
        """
        if self._database_identity is None:
            return None
        database = self._sqlite_file
        try:
            now = self._sqlite_identity()
        except OSError:
            return None
        if now == self._database_identity:
            return None
        if now is None:
            return (
                f"the database file {database} was deleted or moved away while this node ran, so what it records "
                f"would reach no file that anything reads; this node stops: put the database back at {database} "
                "(or restore a backup there) and start dicom-node serve again"
            )
        return (
            f"the database file {database} was replaced while this node ran (a restored backup, or another copy "
            "moved over it), so what it records would go to the file it replaced, which nothing reads any more; this "
            f"node stops: start dicom-node serve again to work on the file now at {database} (start-up indexes the "
            "images stored since that copy was made)"
        )

    def _still_held(self) -> bool:
        """Whether the lock's connection is alive and holds the advisory lock (the caller holds ``_guard``)."""
        connection = self._connection
        if connection is None:
            return False
        try:
            held = connection.execute(
                text(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted "
                    "AND pid = pg_backend_pid() AND classid = 0 AND objid::bigint = :key AND objsubid = 1)"
                ),
                {"key": NODE_LOCK_KEY},
            ).scalar()
            connection.commit()
        except Exception:  # noqa: BLE001 - any failure: the connection, and with it the lock, is gone
            held = False
        if not held:
            with contextlib.suppress(Exception):
                connection.close()
            self._connection = None
        return bool(held)

    def release(self) -> None:
        """Give the lock back (at a clean stop; a dead process gives it back by itself)."""
        if self._watching is not None:
            self._watching.set()
        with self._guard:
            self._held = False
            if self._connection is not None:
                self._connection.close()
                self._connection = None
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None
            if self._file is not None:
                os.close(self._file)
                self._file = None
