"""Workers never change the database's schema: `dicom-node serve` upgrades it, holding the node's lock.

A newer `dicom-node worker` started before the node is updated (GPU hosts first) waits for that upgrade instead of
making it under the older node still running; one older than the database says so and exits 2."""

from __future__ import annotations

import re
import threading

import pytest
from alembic import command
from sqlalchemy import Engine, create_engine, text

from db.models import JobState
from db.session import alembic_config, make_engine, make_session_factory, migrate, newest_revision, schema_revision
from dicom_node.config import Settings
from dicom_node.worker import InferenceWorker, SchemaChanged
from tests.conftest import seed_queued_series, wait_for
from tests.test_scaleout import SMALL, start_worker, states, worker_config

pytestmark = pytest.mark.integration


def test_a_worker_on_an_older_schema_waits_for_serve_to_upgrade_it_then_works(tmp_path):
    url = f"sqlite:///{tmp_path / 'state.db'}"
    command.upgrade(alembic_config(url), "0012")  # as a node of that version left it, still running
    config = worker_config(tmp_path, url)
    log = tmp_path / "worker.log"
    worker = start_worker(config, "gpu-host", log)
    try:
        wait_for(lambda: "worker.waiting_for_upgrade" in log.read_text(), timeout=120, what="the worker waiting")
        assert schema_revision(url) == "0012" and worker.poll() is None  # it changed nothing, and waits
        [reason] = re.findall(r'worker.waiting_for_upgrade .*?reason="([^"]*)"', log.read_text())
        assert reason == (
            f"the database has schema revision 0012, older than this worker's (revision {newest_revision()}): it "
            "waits for `dicom-node serve` of this version to upgrade it (workers never change the schema), "
            "looking every 10 s"
        )

        migrate(url)  # serve of this version, started once the older one stopped
        sessions = make_session_factory(make_engine(url))
        seed_queued_series(sessions, tmp_path / "series", 1, SMALL)
        wait_for(lambda: states(sessions) == {JobState.DONE: 1}, timeout=300, what="the job done")
    finally:
        worker.terminate()
        worker.wait(timeout=60)


def test_a_worker_older_than_its_database_says_so_and_exits_2(tmp_path):
    url = f"sqlite:///{tmp_path / 'state.db'}"
    migrate(url)
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0099'"))  # a newer version's upgrade
    engine.dispose()
    log = tmp_path / "worker.log"
    worker = start_worker(worker_config(tmp_path, url), "gpu-host", log)
    assert worker.wait(timeout=120) == 2
    output = log.read_text()
    assert "Traceback" not in output, output
    [reason] = re.findall(r'worker.schema_newer .*?reason="([^"]*)"', output)
    assert reason == (
        f"the database has schema revision 0099, made by a newer version of dicom-node than this worker (revision "
        f"{newest_revision()}): install the version the node runs on this host"
    )


@pytest.mark.parametrize(
    ("revision", "code", "event", "says"),
    [
        ("0099", 2, "worker.schema_newer", "made by a newer version of dicom-node than this worker"),
        ("0012", 1, "worker.schema_older", "since the worker started (a database restored from a backup?)"),
    ],
)
def test_a_running_worker_whose_schema_changes_under_it_claims_nothing_more_and_exits(
    tmp_path, revision, code, event, says
):
    """A newer serve upgraded the tables while this worker ran (the node updated before the GPU hosts), or the
    database was put back to an older one: its code would write rows the schema no longer expects."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    migrate(url)
    log = tmp_path / "worker.log"
    worker = start_worker(worker_config(tmp_path, url), "gpu-host", log)
    try:
        wait_for(lambda: "worker.ready" in log.read_text(), timeout=180, what="the worker ready")
        engine = create_engine(url)
        with engine.begin() as connection:
            connection.execute(text(f"UPDATE alembic_version SET version_num = '{revision}'"))
        engine.dispose()
        sessions = make_session_factory(make_engine(url))
        seed_queued_series(sessions, tmp_path / "series", 1, SMALL)

        assert worker.wait(timeout=120) == code
    finally:
        if worker.poll() is None:
            worker.terminate()
            worker.wait(timeout=60)
    assert states(sessions) == {JobState.QUEUED: 1}  # left for a worker of the database's version
    output = log.read_text()
    assert "Traceback" not in output, output
    [reason] = re.findall(rf'{event} .*?reason="([^"]*)"', output)
    assert f"the database has schema revision {revision}, " in reason and says in reason


def test_a_claim_that_waited_behind_a_newer_serves_upgrade_on_postgresql_claims_nothing(tmp_path, postgresql_url):
    """PostgreSQL: the claim's statements wait for the tables an upgrade holds and go on once it committed, after the
    revision was first read; read again last, it shows the upgrade, and the job stays queued."""
    migrate(postgresql_url)
    settings = Settings(storage={"directory": tmp_path / "storage"}, database={"url": postgresql_url})
    sessions = make_session_factory(make_engine(postgresql_url))
    seed_queued_series(sessions, tmp_path / "series", 1, SMALL)
    worker = InferenceWorker(settings, sessions, "gpu-host:1")
    engine = create_engine(postgresql_url)
    upgrade = engine.connect()
    upgrade.begin()  # a newer serve's upgrade, in one transaction as alembic runs it
    upgrade.execute(text("ALTER TABLE instances ADD COLUMN added_by_a_newer_version integer"))
    upgrade.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    outcome: dict[str, object] = {}
    claiming = threading.Thread(target=_claim_into, args=(worker, outcome))
    claiming.start()
    try:
        wait_for(lambda: _waiting_for_a_lock(engine), timeout=60, what="the claim waiting behind the upgrade")
        upgrade.commit()
    finally:
        upgrade.close()
        claiming.join(timeout=60)
        engine.dispose()
    assert outcome == {"schema changed to": "0099"}
    assert states(sessions) == {JobState.QUEUED: 1}  # left for a worker of the database's version


def _claim_into(worker: InferenceWorker, outcome: dict[str, object]) -> None:
    try:
        outcome["claimed"] = worker.claim()
    except SchemaChanged as exc:
        outcome["schema changed to"] = exc.revision


def _waiting_for_a_lock(engine: Engine) -> bool:
    """Whether another connection to the database waits for a lock (the claim, behind the upgrade's)."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        waiting = (
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
        )
        return bool(connection.scalar(text(waiting)))
