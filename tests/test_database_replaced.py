"""A SQLite database file replaced under a running node (a backup moved over it, as a restore does).

The node went on writing to the file it had open, which nothing else read: `dicom-node status` never showed
what it received, and after a restart the images were indexed again, processed and sent a second time. The node
now notices that the file at the database's path is not the one it opened, stops as when it loses its lock on
the database (dispatch and retention first), says so in one sentence naming the file, and exits 1.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from db.models import JobState, Series
from db.session import NodeLock, migrate, read_only
from tests.conftest import real_ct_copy, storescu, succeeded_files, wait_for

pytestmark = pytest.mark.integration


def restore_backup_over(database: Path) -> None:
    """What restoring a backup does: an SQLite backup copy moved over the live file, its -wal and -shm removed."""
    copy = database.with_name("backup.db")
    source, target = sqlite3.connect(database), sqlite3.connect(copy)
    source.backup(target)
    target.close()
    source.close()
    os.replace(copy, database)
    for suffix in ("-wal", "-shm"):
        database.with_name(database.name + suffix).unlink(missing_ok=True)


def test_a_node_lock_on_sqlite_is_lost_once_its_database_file_is_replaced_or_deleted(tmp_path):
    database = tmp_path / "dicom-node.db"
    url = f"sqlite:///{database}"
    replaced, deleted = NodeLock(url), NodeLock(url.replace("dicom-node.db", "other.db"))
    migrate(url)
    migrate(url.replace("dicom-node.db", "other.db"))
    said: list[str] = []
    assert replaced.try_take() and deleted.try_take()
    replaced.watch(said.append)
    deleted.watch(said.append)
    try:
        assert replaced.confirm() and deleted.confirm()
        restore_backup_over(database)
        assert not replaced.confirm()
        assert not replaced.confirm()  # lost for good, said once
        (tmp_path / "other.db").unlink()
        wait_for(lambda: len(said) == 2, timeout=30, what="the watch to find the other file deleted")
        assert not deleted.confirm()
    finally:
        replaced.release()
        deleted.release()
    assert said == [
        f"the database file {database} was replaced while this node ran (a restored backup, or another copy moved "
        "over it), so what it records would go to the file it replaced, which nothing reads any more; this node "
        f"stops: start dicom-node serve again to work on the file now at {database} (start-up indexes the images "
        "stored since that copy was made)",
        f"the database file {tmp_path / 'other.db'} was deleted or moved away while this node ran, so what it "
        "records would reach no file that anything reads; this node stops: put the database back at "
        f"{tmp_path / 'other.db'} (or restore a backup there) and start dicom-node serve again",
    ]


def test_serve_whose_database_file_is_replaced_stops_with_exit_1_and_after_a_restart_holds_what_it_received(
    tmp_path, start_node, shared_fixtures
):
    files = real_ct_copy(tmp_path / "ct", shared_fixtures)
    series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    node = start_node()
    wait_for(lambda: "node.ready" in node.log(), timeout=60, what="the node to be ready")
    database = node.storage / "dicom-node.db"
    restore_backup_over(database)
    sent = storescu(node.port, files, extra=["-xv"])  # as the reviewer did: images arrive at once
    assert node.process is not None
    code = node.process.wait(timeout=30)  # a safety net: it stops within a second or two
    said = node.log()
    assert code == 1, said[-3000:]
    errors = [line for line in said.splitlines() if " ERROR " in line]
    assert len(errors) == 1, errors
    assert "node.lock_lost" in errors[0]
    assert f"the database file {database} was replaced while this node ran" in errors[0]
    assert f"start dicom-node serve again to work on the file now at {database}" in errors[0]

    node.process = None
    node.start()  # the images acknowledged before it stopped are indexed at start-up; the rest is sent again
    acknowledged = set(succeeded_files(sent.stdout + sent.stderr))
    missing = [path for path in files if str(path) not in acknowledged]
    if missing:
        again = storescu(node.port, missing, extra=["-xv"])
        assert len(succeeded_files(again.stdout + again.stderr)) == len(missing), again.stdout + again.stderr
    node.wait_for_state(series_uid, JobState.IGNORED, timeout=60)  # no rules: received, completed, ignored
    with read_only(node.sessions) as session:
        held = session.scalar(select(Series.instance_count).where(Series.series_instance_uid == series_uid))
    assert held == len(files)
    status = node.cli("status", "--state", "IGNORED")
    assert "IGNORED" in status.stdout and " 20 " in status.stdout, status.stdout + status.stderr
