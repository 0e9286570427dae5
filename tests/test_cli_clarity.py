"""What the operator commands say is true: who removed a purged series' images, and that they never create or
upgrade a database (README promised both). Real `dicom-node` processes on real SQLite files."""

from __future__ import annotations

import dataclasses
import getpass
import signal
import socket
import sqlite3
import subprocess
import sys
from contextlib import closing
from datetime import timedelta
from pathlib import Path

import yaml
from alembic import command

from db import jobs
from db.ingest import record_instance
from db.models import JobState, utcnow
from db.session import alembic_config, make_engine, make_session_factory, migrate, transaction
from dicom_node.config import RetentionSettings, Settings
from dicom_node.retention import apply_plan, plan_retention
from tests.conftest import DICOM_NODE, ct_instance, drive_job_to

ROOT = Path(__file__).resolve().parent.parent
OLD_REVISION = "0011"
"""A schema revision before the newest: the columns ``series.images_before_purge`` came with 0012 lack."""


def _node(tmp_path: Path) -> tuple[Settings, Path]:
    storage = tmp_path / "storage"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"storage": {"directory": str(storage)}}))
    return Settings(storage={"directory": str(storage)}), config


def _add_done_series(settings: Settings, *uids: str) -> None:
    """Finished series of one image each, their files in storage, as the receiver and a worker leave them."""
    migrate(settings.database_url)
    engine = make_engine(settings.database_url)
    sessions = make_session_factory(engine)
    with transaction(sessions) as session:
        for uid in uids:
            path = settings.storage.directory / "instances" / f"{uid}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"\0" * 100)
            record_instance(session, ct_instance(f"{uid}.1", uid, study_instance_uid=f"{uid}.0", path=path))
            job = jobs.job_for_series_uid(session, uid)
            assert job is not None
            drive_job_to(session, job, JobState.DONE)
    engine.dispose()


def dicom_node(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DICOM_NODE, *args, "--config", str(config)], capture_output=True, text=True, timeout=120)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def test_show_says_who_removed_a_purged_series_images(tmp_path):
    """`dicom-node show` said "by retention" of every purged series, also of one an operator purged with
    `dicom-node purge`; it now names the purge its audit record names, and hedges where nothing says who."""
    settings, config = _node(tmp_path)
    by_retention, by_operator = "1.2.826.0.1.3680043.99.36.1", "1.2.826.0.1.3680043.99.36.2"
    _add_done_series(settings, by_retention, by_operator)
    engine = make_engine(settings.database_url)
    sessions = make_session_factory(engine)
    with sessions() as session:  # retention, as `serve` runs it (here of one series): nothing in the audit trail
        plan = plan_retention(session, RetentionSettings(days=1), utcnow() + timedelta(days=2))
    plan = dataclasses.replace(plan, items=[i for i in plan.items if i.series_instance_uid == by_retention])
    assert [item.series_instance_uid for item in apply_plan(sessions, settings, plan).purged] == [by_retention]
    engine.dispose()
    purged = dicom_node(config, "purge", "--series", by_operator)
    assert purged.returncode == 0, purged.stderr

    shown_retention = dicom_node(config, "show", by_retention)
    shown_operator = dicom_node(config, "show", by_operator)
    retried = dicom_node(config, "retry", by_operator)

    assert shown_retention.returncode == 0 and shown_operator.returncode == 0, shown_operator.stderr
    assert "by retention or `dicom-node purge`" in shown_retention.stdout
    user, host = getpass.getuser(), socket.gethostname()
    assert f"by `dicom-node purge`, run by OS user {user} on {host}" in _one_line(shown_operator.stdout)
    assert "by retention" not in shown_operator.stdout
    assert retried.returncode == 1
    assert "images were purged (by retention or dicom-node purge)" in _one_line(retried.stderr)


def _revision(database: Path) -> str:
    with closing(sqlite3.connect(database)) as connection:
        return str(connection.execute("SELECT version_num FROM alembic_version").fetchone()[0])


def test_operator_commands_never_create_or_upgrade_a_database_as_the_readme_says(tmp_path):
    """README said `status`, `show`, `retry` and `rejected` create or upgrade the database; they never do (only
    `serve` and `worker` migrate): an older schema is refused with a sentence, and left as it was."""
    settings, config = _node(tmp_path)
    uid = "1.2.826.0.1.3680043.99.36.3"
    database = settings.storage.directory / "dicom-node.db"
    missing = dicom_node(config, "status")
    assert missing.returncode == 1 and f"no database at {database}" in _one_line(missing.stderr)
    assert not database.exists()

    _add_done_series(settings, uid)
    command.downgrade(alembic_config(settings.database_url), OLD_REVISION)  # as an older version left it
    said = {args[0]: dicom_node(config, *args) for args in (["status"], ["show", uid], ["retry", uid])}

    for name, result in said.items():
        assert result.returncode == 1, (name, result.stdout)
        assert (
            f"the database file {database} was made by another version of dicom-node (a column is missing): start "
            "`dicom-node serve` of this version once to upgrade it"
        ) in _one_line(result.stderr), name
    assert _revision(database) == OLD_REVISION

    readme = _one_line((ROOT / "README.md").read_text())
    assert "also create or upgrade it" not in readme
    assert "whenever the node or a CLI command opens the database" not in readme
    assert "they never create or upgrade it" in readme


def test_show_of_a_failed_series_plans_no_next_try_and_says_its_results_were_deleted(tmp_path):
    from db.results import DeliveryRecord

    settings, config = _node(tmp_path)
    migrate(settings.database_url)
    engine = make_engine(settings.database_url)
    sessions = make_session_factory(engine)
    image = tmp_path / "a.dcm"
    image.write_bytes(b"\0" * 100)
    with transaction(sessions) as session:
        record_instance(session, ct_instance("9.1.1", "9.1", study_instance_uid="9.0", path=image))
        job = jobs.job_for_series_uid(session, "9.1")
        assert job is not None
        job.destinations = ["pacs"]
        job.result_path = str(tmp_path / "jobs" / "1")  # its results deleted since (a purge)
        # The last failed attempt planned a next one; then the attempts ran out and the job failed.
        last = DeliveryRecord(attempts=3, last_error="PACS refused the association", next_attempt_at=utcnow())
        jobs.update_delivery_record(job, "pacs", last)
        drive_job_to(session, job, JobState.FAILED, reason="sending to pacs failed after 3 attempts")
    engine.dispose()

    shown = dicom_node(config, "show", "9.1")

    assert shown.returncode == 0, shown.stderr
    assert "3 attempts" in shown.stdout and "next try" not in shown.stdout
    assert f"results  {tmp_path / 'jobs' / '1'}  (deleted)" in shown.stdout


TERMINATED_PURGE = """
import os, signal, sys
import dicom_node.retention as retention
set_aside = retention._set_aside

def set_aside_then_terminated(paths, aside):
    set_aside(paths, aside)
    os.kill(os.getpid(), getattr(signal, os.environ.get("STOP_SIGNAL", "SIGTERM")))  # `timeout`, `kill` ... then

retention._set_aside = set_aside_then_terminated
from dicom_node.cli import app
sys.argv = ["dicom-node", *sys.argv[1:]]
app()
"""


def test_a_purge_ended_by_sigterm_puts_back_the_images_it_had_set_aside(tmp_path):
    """`dicom-node purge` ended by SIGTERM after it renamed a series' images aside and before it committed left
    them renamed (``.purging``) under their recorded rows: a running node served none of them until it was
    started again. SIGTERM now ends it as Ctrl-C does, so the images are put back."""
    settings, config = _node(tmp_path)
    uid = "1.2.826.0.1.3680043.99.36.4"
    _add_done_series(settings, uid)
    image = settings.storage.directory / "instances" / f"{uid}.dcm"

    ended = subprocess.run(
        [sys.executable, "-c", TERMINATED_PURGE, "purge", "--series", uid, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert ended.returncode == 128 + signal.SIGTERM, ended.stderr
    assert image.exists() and not list(image.parent.glob("*.purging"))
    shown = dicom_node(config, "show", uid)
    assert "DONE" in shown.stdout and "purged" not in shown.stdout, shown.stdout


def test_a_purge_started_under_nohup_keeps_ignoring_sighup_and_finishes(tmp_path):
    """Started with SIGHUP ignored (nohup), the purge must not take that signal back: a closed terminal does not
    end it, and the series is purged."""
    import os

    settings, config = _node(tmp_path)
    uid = "1.2.826.0.1.3680043.99.36.5"
    _add_done_series(settings, uid)

    finished = subprocess.run(
        [sys.executable, "-c", TERMINATED_PURGE, "purge", "--series", uid, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "STOP_SIGNAL": "SIGHUP"},
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),  # as nohup starts it
    )

    assert finished.returncode == 0, finished.stderr
    assert not (settings.storage.directory / "instances" / f"{uid}.dcm").exists()


def test_status_says_when_no_serve_runs_on_the_storage_folder(tmp_path, start_node):
    """With `serve` stopped (crashed, not enabled after a reboot), status printed the usual table and counts: an
    admin could not tell that nothing was being received or sent."""
    node = start_node()
    stopped = "no dicom-node serve is running on storage folder"

    running = node.cli("status")
    assert running.returncode == 0 and stopped not in running.stdout, running.stdout
    node.stop()
    after = node.cli("status")
    assert after.returncode == 0
    assert f"{stopped} {node.storage}: nothing is received, completed or sent until it is started" in " ".join(
        after.stdout.split()
    ), after.stdout
