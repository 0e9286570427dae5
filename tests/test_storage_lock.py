"""One `dicom-node serve` per storage folder and per database file, however the configuration names them.

A second `serve` on the storage folder of a running one, but with a database of its own, would repair that folder
for its own database at start-up: overwrite the first one's results and delete the files it takes for spare. It is
refused, naming the folder and the node that holds it; a folder recorded as another database's is refused too. A
SQLite database reached through a symbolic link is the same database: a second `serve` on it waits like one
configured with the same path.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import subprocess
import threading

import pytest

from tests.conftest import DICOM_NODE, Node, wait_for


def launch(node: Node) -> subprocess.Popen[bytes]:
    """Start `dicom-node serve` without waiting for it to listen (it may wait for, or be refused, a lock)."""
    node._log = open(node.log_path, "ab")  # kept open for the process lifetime, as Node.start does
    node.process = subprocess.Popen(
        [DICOM_NODE, "serve", "--config", str(node.config_path)], stdout=node._log, stderr=subprocess.STDOUT
    )
    return node.process


def listening(node: Node) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", node.port), timeout=0.2):
            return True
    except OSError:
        return False


def one_line(text: str) -> str:
    return " ".join(text.split())


def refused_or_listening(node: Node) -> int | None:
    """Wait until ``node`` exited (its exit status) or listens (None)."""
    process = launch(node)
    wait_for(
        lambda: process.poll() is not None or listening(node), timeout=90, what="the second serve to end or listen"
    )
    return process.poll()


@pytest.mark.integration
def test_a_second_serve_on_the_storage_folder_of_a_running_one_with_another_database_is_refused(start_node, tmp_path):
    first = start_node()
    other_database = f"sqlite:///{tmp_path / 'other' / 'other.db'}"
    second = Node(
        tmp_path / "second", {"storage": {"directory": str(first.storage)}, "database": {"url": other_database}}
    )
    try:
        code = refused_or_listening(second)
        assert code == 2, second.log()  # a restart cannot help: not restarted by systemd
        assert first.process is not None
        said = one_line(second.log())
        assert (
            f"cannot start: storage.directory {first.storage} is in use by another dicom-node serve (DICOMNODE on "
            in said
        )
        assert f":{first.process.pid}) on the SQLite database file dicom-node.db in this storage folder" in said
        assert "Each database needs a storage folder of its own" in said
        assert first.process.poll() is None and listening(first)  # the first node runs on, untouched
    finally:
        second.stop()


def _empty_database(tmp_path):
    from db.session import make_engine, make_session_factory, migrate

    url = f"sqlite:///{tmp_path / 'empty.db'}"
    migrate(url)
    return make_session_factory(make_engine(url))


@pytest.mark.integration
def test_a_storage_file_system_not_mounted_refuses_the_start_instead_of_storing_under_its_mount_point(
    start_node, tmp_path
):
    """The storage folder's file system not mounted (its empty mount point left), the database elsewhere: serve
    adopted the empty folder, stored new images on the disk under it (hidden once the file system was mounted) and
    said it was ready."""
    from dicom_node.phantom import PhantomSpec, write_phantom_series
    from tests.conftest import storescu

    node = start_node(database={"url": f"sqlite:///{tmp_path / 'state' / 'node.db'}"})
    series = write_phantom_series(tmp_path / "ct", PhantomSpec(rows=16, columns=16, slices=3))
    assert storescu(node.port, series.files).returncode == 0
    node.stop()
    mounted = node.storage.rename(tmp_path / "mounted")  # unmounted: the empty mount point is left
    node.storage.mkdir()

    assert refused_or_listening(node) == 1, node.log()  # exit 1: systemd tries again, once it is mounted
    said = one_line(node.log())
    assert (
        f"cannot start: storage.directory {node.storage} holds none of the 3 images the database records (the "
        f"newest at {node.storage}/instances/" in said
    ), said
    assert "is the file system of the images mounted? Mount it" in said
    assert not (node.storage / ".database").exists() and not (node.storage / "instances").exists()

    shutil.rmtree(node.storage)  # its lock file: nothing else
    mounted.rename(node.storage)  # mounted again
    node.process = None
    node.start()
    assert storescu(node.port, series.files).returncode == 0


@pytest.mark.integration
def test_a_storage_folder_recorded_as_another_databases_is_refused_and_one_without_a_record_is_adopted(
    start_node, tmp_path
):
    first = start_node()
    first.stop()
    record = first.storage / ".database"
    assert "database sqlite:dicom-node.db" in record.read_text()

    other_database = f"sqlite:///{tmp_path / 'other' / 'other.db'}"
    second = Node(
        tmp_path / "second", {"storage": {"directory": str(first.storage)}, "database": {"url": other_database}}
    )
    try:
        assert refused_or_listening(second) == 2, second.log()
    finally:
        second.stop()
    said = one_line(second.log())
    assert (
        f"cannot start: storage.directory {first.storage} holds the images of the SQLite database file "
        f"dicom-node.db in this storage folder (recorded in {record}), not of the SQLite database file "
        f"{tmp_path / 'other' / 'other.db'} that this node is set to use" in said
    )
    assert f"delete {record} and start again" in said

    record.unlink()  # a folder of an earlier version (or its database moved): adopted by the next serve
    first.start()
    assert "database sqlite:dicom-node.db" in record.read_text()
    assert "node.storage_recorded" in first.log()


@pytest.mark.integration
def test_a_serve_on_a_sqlite_database_reached_through_a_symbolic_link_waits_for_the_one_on_its_real_path(
    start_node, tmp_path
):
    real = tmp_path / "databases" / "dicom-node.db"
    real.parent.mkdir()
    link = tmp_path / "link-to-dicom-node.db"
    link.symlink_to(real)
    start_node(database={"url": f"sqlite:///{real}"})
    second = Node(tmp_path / "second", {"database": {"url": f"sqlite:///{link}"}})
    try:
        process = launch(second)
        wait_for(
            lambda: "node.waiting_for_other_node" in second.log() or listening(second) or process.poll() is not None,
            timeout=90,
            what="the second serve to wait, listen or end",
        )
        assert process.poll() is None and not listening(second), second.log()
        assert str(link) in second.log()  # the database as its configuration names it
    finally:
        second.stop()


@pytest.mark.integration
def test_a_start_on_a_database_that_cannot_be_used_leaves_the_storage_folder_to_the_corrected_one(tmp_path):
    """A mistyped database.url that names a file of another kind fails the start; it must not record the storage
    folder as that file's, or the corrected configuration would be refused on its own folder."""
    wrong_file = tmp_path / "notes.db"
    wrong_file.write_text("not a database\n" * 200)
    mistyped = Node(tmp_path / "node", {"database": {"url": f"sqlite:///{wrong_file}"}})
    try:
        assert refused_or_listening(mistyped) == 1, mistyped.log()
    finally:
        mistyped.stop()
    assert f"the database file {wrong_file} is not an SQLite database" in one_line(mistyped.log())
    assert not (mistyped.storage / ".database").exists()

    corrected = Node(tmp_path / "node", {})  # database.url removed: the SQLite file in the storage folder
    try:
        corrected.start()
        assert "database sqlite:dicom-node.db" in (corrected.storage / ".database").read_text()
    finally:
        corrected.stop()


def waiting(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.getMessage() == "node.waiting_for_storage"]


def test_a_serve_that_took_the_database_over_waits_for_the_storage_of_the_node_that_lost_it(tmp_path, caplog):
    """PostgreSQL: a node whose lock connection ended loses the database to a new node and stops; the new one holds
    the database lock, and waits (rather than being refused) while the stopping node still holds the folder."""
    from dicom_node.config import Settings
    from dicom_node.service import StoppedWhileStarting, record_storage_database, take_storage_lock
    from dicom_node.storage_lock import StorageLock, database_identity

    url = "postgresql+psycopg://dicom@db.example:5432/dicom"
    settings = Settings(storage={"directory": tmp_path / "storage"}, database={"url": url})
    stopping_node = StorageLock(tmp_path / "storage", database_identity(url, tmp_path / "storage"), "OLD on a:1")
    assert stopping_node.try_take() is None
    stop = threading.Event()
    taken: list[StorageLock] = []
    caplog.set_level(logging.WARNING)

    def start() -> None:
        with contextlib.suppress(StoppedWhileStarting):
            taken.append(take_storage_lock(settings, stopping=stop))

    starting = threading.Thread(target=start)
    starting.start()
    try:
        wait_for(lambda: waiting(caplog), timeout=30, what="the new node to wait")
        assert not taken and waiting(caplog)[0].event_fields["holder"] == "OLD on a:1"
        stopping_node.release()
        wait_for(lambda: taken, timeout=30, what="the new node to take the folder")
        assert not (tmp_path / "storage" / ".database").exists()  # recorded once the database opened
        record_storage_database(settings, taken[0], _empty_database(tmp_path))
    finally:
        stop.set()
        starting.join(timeout=30)
        for lock in taken:
            lock.release()
    assert "database postgresql://db.example:5432/dicom" in (tmp_path / "storage" / ".database").read_text()


@pytest.mark.parametrize(
    ("url", "holds"),
    [
        ("sqlite:///{storage}/dicom-node.db", True),
        ("sqlite:///{elsewhere}/dicom-node.db", False),
        ("sqlite://", False),
        ("postgresql://node@db.example:5432/dicom", False),
    ],
)
def test_only_a_sqlite_file_inside_the_storage_folder_shows_the_folder_is_the_databases(tmp_path, url, holds):
    """The mount check (an empty folder for a database recording images) is skipped where the database's own file is
    in the folder: the folder is then the one the images were recorded in, and no mount point left empty."""
    from dicom_node.storage_lock import StorageLock, database_identity

    storage = tmp_path / "storage"
    storage.mkdir()
    identity = database_identity(url.format(storage=storage, elsewhere=tmp_path / "state"), storage)
    assert StorageLock(storage, identity, "NODE on host:1").holds_its_database is holds
