"""One `dicom-node serve` per storage folder, and one database per storage folder.

The database lock (:class:`db.session.NodeLock`) keeps a second `serve` off a database; it cannot see a second
`serve` on another database pointed at the same storage folder, whose start-up repair would index, overwrite and
delete the first one's files. So `serve` also holds an exclusive ``flock`` on ``<storage>/.serve-lock`` while it
runs (given back by the kernel when the process dies; on NFS the lock reaches other hosts), and the storage folder
records the database it belongs to in ``<storage>/.database``. Workers (`dicom-node worker`) take neither: on other
hosts they share the storage folder of the one `serve`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url

LOCK_FILE_NAME = ".serve-lock"
DATABASE_FILE_NAME = ".database"
DEFAULT_POSTGRESQL_PORT = 5432


class StorageRefused(Exception):
    """The storage folder belongs to another database; the message says which, and what to do, in words."""


@dataclass(frozen=True)
class Holder:
    """What the `serve` holding a storage folder's lock wrote in its lock file (empty while it is writing)."""

    node: str = ""
    database: str = ""


def database_identity(url: str, storage: Path) -> str:
    """The database of ``url`` as the storage folder records it: ``sqlite:<file>`` (symbolic links followed; the
    path within the storage folder when the file is in it, so the folder can be moved with its database) or
    ``<kind>://<host>:<port>/<database>`` (no user name, no password)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        file = Path(parsed.database or ":memory:")
        if str(file) in ("", ":memory:"):
            return "sqlite::memory:"
        real, folder = file.resolve(), storage.resolve()
        return f"sqlite:{real.relative_to(folder) if real.is_relative_to(folder) else real}"
    socket_folder = parsed.query.get("host")  # a Unix socket folder given as ?host=
    if isinstance(socket_folder, tuple):
        socket_folder = socket_folder[0] if socket_folder else None
    host = str(parsed.host or socket_folder or "localhost").lower()
    port = parsed.port or (DEFAULT_POSTGRESQL_PORT if parsed.get_backend_name() == "postgresql" else "")
    return f"{parsed.get_backend_name()}://{host}{f':{port}' if port else ''}/{parsed.database or ''}"


def describe_database(identity: str) -> str:
    """A recorded database identity in words."""
    if identity.startswith("sqlite:"):
        file = identity.removeprefix("sqlite:")
        where = "in this storage folder" if not Path(file).is_absolute() else ""
        return f"the SQLite database file {file}{f' {where}' if where else ''}"
    return f"the database {identity}"


def serve_holding(directory: Path) -> Holder | None:
    """What the `dicom-node serve` running on the storage folder ``directory`` wrote in its lock file, or None when
    none runs (no lock file, or nobody holds its lock). Tested with a shared lock given back at once, so a `serve`
    starting at that very moment only waits for its next try."""
    try:
        descriptor = os.open(directory / LOCK_FILE_NAME, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return StorageLock(directory, "", "")._holder()
    finally:
        os.close(descriptor)  # gives back the shared lock where it was taken
    return None


class StorageLock:
    """The storage folder's ``flock``, held by one `serve` for as long as it runs."""

    def __init__(self, directory: Path, database: str, node: str) -> None:
        self.directory = directory
        self.database = database  # database_identity() of this node's database
        self.node = node  # this node in words: "<AE title> on <host>:<pid>"
        self._descriptor: int | None = None

    @property
    def lock_file(self) -> Path:
        return self.directory / LOCK_FILE_NAME

    @property
    def database_file(self) -> Path:
        return self.directory / DATABASE_FILE_NAME

    def try_take(self) -> Holder | None:
        """Take the lock if no other `serve` holds it: None once this one holds it, else what its holder wrote."""
        self.directory.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            return self._holder()
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"node {self.node}\ndatabase {self.database}\n".encode(), 0)
        self._descriptor = descriptor
        return None

    def _holder(self) -> Holder:
        try:
            lines = self.lock_file.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return Holder()
        fields = dict(line.partition(" ")[::2] for line in lines)
        return Holder(node=fields.get("node", "").strip(), database=fields.get("database", "").strip())

    def check_database(self) -> None:
        """Check that the storage folder records no other database than this one.

        Raises
        ------
        StorageRefused
            When the folder records another database.
        """
        recorded = self._recorded_database()
        if recorded is not None and recorded != self.database:
            raise StorageRefused(
                f"storage.directory {self.directory} holds the images of {describe_database(recorded)} (recorded in "
                f"{self.database_file}), not of {describe_database(self.database)} that this node is set to use; "
                "give each database a storage folder of its own. If this folder's database really was moved there, "
                f"delete {self.database_file} and start again: the folder is then recorded as that database's"
            )

    @property
    def holds_its_database(self) -> bool:
        """Whether this node's database is a SQLite file inside the folder: then the folder is the one it records
        images in, mounted or not."""
        file = self.database.removeprefix("sqlite:")
        return self.database.startswith("sqlite:") and file != ":memory:" and not Path(file).is_absolute()

    def has_recorded_database(self) -> bool:
        """Whether the folder records a database (this one or another)."""
        return self._recorded_database() is not None

    def record_database(self) -> bool:
        """Record the folder as this database's where it records none yet (a folder of an earlier version, or a new
        one: it is adopted); True when it was recorded now. Called once the database opened, so that a database
        the node cannot use (a mistyped URL) never claims the folder."""
        if self._recorded_database() is not None:
            return False
        self._record_database()
        return True

    def _recorded_database(self) -> str | None:
        try:
            lines = self.database_file.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return None
        for line in lines:
            key, _, value = line.partition(" ")
            if key == "database" and value.strip():
                return value.strip()
        return None  # an empty or cut-off file (a crash while it was first written) is written again

    def _record_database(self) -> None:
        """Write the identity file whole (a temporary file renamed over it), so a crash leaves none or all of it."""
        text = (
            "# The database whose images this storage folder holds: dicom-node serve refuses to start on it with\n"
            "# another database. Delete this file only if that database was moved (it is then recorded again).\n"
            f"database {self.database}\n"
        )
        temporary = self.database_file.with_name(DATABASE_FILE_NAME + ".new")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(descriptor, text.encode())
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, self.database_file)

    def release(self) -> None:
        """Give the lock back (at a clean stop; a dead process gives it back by itself)."""
        if self._descriptor is not None:
            with contextlib.suppress(OSError):
                os.close(self._descriptor)
            self._descriptor = None
