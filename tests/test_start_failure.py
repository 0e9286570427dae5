"""A `serve` that fails part-way through starting (the DICOM port taken after the storage was checked) gives back
what it took: its locks on the database and on the storage folder, and the caller's signal handlers."""

from __future__ import annotations

import signal
import socket
from contextlib import closing

import pytest

from db.session import NodeLock, migrate
from dicom_node.config import Settings
from dicom_node.service import serve
from dicom_node.storage_lock import StorageLock, database_identity
from tests.conftest import free_port


def test_a_serve_that_cannot_listen_gives_back_its_locks_and_the_callers_signal_handlers(tmp_path):
    port = free_port()
    settings = Settings(storage={"directory": tmp_path / "storage"}, network={"ae_title": "NODEA", "port": port})
    migrate(settings.database_url)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("0.0.0.0", port))
        taken.listen()
        with pytest.raises(Exception):  # noqa: B017 - how a port in use is reported is not this test's subject
            serve(settings)

    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    lock = NodeLock(settings.database_url)
    assert lock.try_take(), "the database lock was given back"
    lock.release()
    storage = StorageLock(
        settings.storage.directory, database_identity(settings.database_url, settings.storage.directory), "test"
    )
    assert storage.try_take() is None, "the storage folder's lock was given back"
    storage.release()
