"""Workers on several hosts sharing one PostgreSQL database and one storage folder.

Each worker is a real `dicom-node worker` process with its own host name in its lease
(``--name``); the jobs are phantom series recorded as received and routed, so the test
measures the workers, not the receiver.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from db import jobs
from db.models import Job, JobEvent, JobState, Series, utcnow
from db.session import make_engine, make_session_factory, migrate, transaction
from dicom_node.config import Settings
from dicom_node.phantom import PhantomSpec
from dicom_node.worker import InferenceWorker
from tests.conftest import CT_RULES, DICOM_NODE, end_node_lock_connection, seed_queued_series, wait_for

SMALL = PhantomSpec(rows=64, columns=64, slices=16, pixel_spacing=(6.0, 6.0), slice_spacing=10.0, noise_sd=5.0)
HOSTS = ["gpu-a", "gpu-b", "gpu-c", "gpu-d"]


def worker_config(folder: Path, url: str, **inference: float) -> Path:
    """The config every worker host reads: the shared storage folder and the PostgreSQL URL."""
    config = folder / "worker.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage": {"directory": str(folder / "storage")},
                "database": {"url": url},
                "rules": CT_RULES,
                "inference": {"poll_seconds": 0.2, **inference},
                "logging": {"level": "INFO"},
            }
        )
    )
    return config


def start_worker(config: Path, host: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as output:
        return subprocess.Popen(
            [DICOM_NODE, "worker", "--config", str(config), "--name", host], stdout=output, stderr=subprocess.STDOUT
        )


def states(sessions: sessionmaker[Session]) -> Counter[JobState]:
    with sessions() as session:
        return Counter(session.scalars(select(Job.state)))


def transitions_to(sessions: sessionmaker[Session], state: JobState) -> Counter[int]:
    """Per job id: how many times it entered ``state``."""
    with sessions() as session:
        return Counter(session.scalars(select(JobEvent.job_id).where(JobEvent.to_state == state)))


@pytest.mark.integration
def test_four_workers_on_four_hosts_process_every_job_once_and_finish_the_job_of_a_killed_one(tmp_path, postgresql_url):
    migrate(postgresql_url)
    sessions = make_session_factory(make_engine(postgresql_url))
    uids = seed_queued_series(sessions, tmp_path / "storage" / "instances", 40, SMALL)
    config = worker_config(tmp_path, postgresql_url, lease_seconds=4, lease_renew_seconds=1)
    workers = {host: start_worker(config, host, tmp_path / f"{host}.log") for host in HOSTS}
    victim = workers["gpu-d"]
    try:
        killed_job = _kill_mid_job(sessions, victim, f"gpu-d:{victim.pid}")

        wait_for(
            lambda: states(sessions)[JobState.DONE] == 40,
            timeout=240,
            interval=0.5,
            what=f"all 40 jobs DONE (now {dict(states(sessions))})",
        )
    finally:
        for process in workers.values():
            process.terminate()
        for process in workers.values():
            process.wait(timeout=60)

    assert set(transitions_to(sessions, JobState.DONE).values()) == {1}  # each job finished exactly once
    assert len(transitions_to(sessions, JobState.DONE)) == 40 == len(uids)
    with sessions() as session:
        done = session.scalars(select(Job)).all()
        claimed_by = {job.claimed_by.rpartition(":")[0] for job in done}
        assert claimed_by <= set(HOSTS) and len(claimed_by - {"gpu-d"}) >= 2  # spread over the hosts
        results = Counter(
            session.scalars(
                select(Series.source_job_id).where(Series.source_job_id.is_not(None), Series.superseded_at.is_(None))
            )
        )
        assert set(results.values()) == {2} and len(results) == 40  # one SEG and one SR series per job
        job = session.get_one(Job, killed_job)
        assert job.worker_deaths == 1 and not job.claimed_by.startswith("gpu-d:")
        requeued = [e for e in job.events if e.from_state is JobState.PROCESSING and e.to_state is JobState.QUEUED]
        assert len(requeued) == 1
        assert requeued[0].reason.startswith(f"worker gpu-d:{victim.pid} died in stage")
        assert "its lease having run out" in requeued[0].reason
        others = list(
            session.scalars(select(JobEvent).where(JobEvent.job_id != killed_job, JobEvent.to_state == JobState.QUEUED))
        )
        assert all(e.from_state is JobState.COMPLETE for e in others)  # no other job was taken from its worker
    assert victim.returncode == -signal.SIGKILL


def _kill_mid_job(sessions: sessionmaker[Session], victim: subprocess.Popen[bytes], worker: str) -> int:
    """SIGKILL ``victim`` while it holds a job (stopped first, so the job cannot finish in between); the job's id."""
    held = _stop_mid_job(sessions, victim, worker)
    victim.kill()
    victim.wait(timeout=30)
    return held


def test_two_workers_claiming_at_the_same_moment_never_get_the_same_job(tmp_path, database_url):
    """50 rounds: two workers (separate connections) claim at a barrier; one job each round, or two."""
    migrate(database_url)
    settings = Settings(storage={"directory": tmp_path / "storage"}, database={"url": database_url})
    seeding = make_session_factory(make_engine(database_url))
    uids = seed_queued_series(seeding, tmp_path / "series", 1, SMALL)
    workers = [
        InferenceWorker(settings, make_session_factory(make_engine(database_url)), f"host-{n}:1") for n in range(2)
    ]
    for round_number in range(50):
        queued = 1 + round_number % 2  # odd rounds: one job for two workers; even rounds: two jobs
        with transaction(seeding) as session:
            for job in jobs.jobs_in_state(session, [JobState.PROCESSING]):
                jobs.worker_stopped(session, job)  # back to the queue for the next round
            waiting = jobs.jobs_in_state(session, [JobState.QUEUED])
        if len(waiting) < queued:
            uids += seed_queued_series(seeding, tmp_path / f"series-{round_number}", 1, SMALL)
        with transaction(seeding) as session:
            for extra in jobs.jobs_in_state(session, [JobState.QUEUED])[queued:]:
                jobs.fail(session, extra, "set aside for this round")
        barrier = threading.Barrier(2)
        claimed: list[int | None] = [None, None]
        threads = [threading.Thread(target=_claim_at, args=(workers[n], barrier, claimed, n)) for n in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        got = [job_id for job_id in claimed if job_id is not None]
        assert len(got) == len(set(got)) == queued, f"round {round_number}: claims {claimed} of {queued} job(s)"
        with seeding() as session:
            rows = session.execute(select(Job.id, Job.claimed_by).where(Job.state == JobState.PROCESSING))
            holders = dict(rows.all())
        assert {holders[job_id] for job_id in got} == {workers[n].identity for n, c in enumerate(claimed) if c}
        with transaction(seeding) as session:  # set-aside jobs back in the queue
            for job in jobs.jobs_in_state(session, [JobState.FAILED]):
                jobs.retry(session, job)
                jobs.queue(session, job, rule_name="test", model_name="baseline", destinations=[])
    with seeding() as session:
        claims = session.scalar(
            select(func.count()).select_from(JobEvent).where(JobEvent.to_state == JobState.PROCESSING)
        )
    assert claims == sum(1 + n % 2 for n in range(50))  # one event per claim, none for a lost race


def _claim_at(worker: InferenceWorker, barrier: threading.Barrier, claimed: list[int | None], index: int) -> None:
    """Claim once all workers reached ``barrier``; the job id (or None) goes to ``claimed[index]``."""
    barrier.wait()
    claim = worker.claim()
    claimed[index] = claim.job_id if claim else None


def _one_queued_series(tmp_path: Path, url: str, **inference: float) -> tuple[Settings, sessionmaker[Session]]:
    """A migrated database holding one queued series, and settings for workers on it (``inference`` settings)."""
    migrate(url)
    settings = Settings(storage={"directory": tmp_path / "storage"}, database={"url": url}, inference=inference)
    sessions = make_session_factory(make_engine(url))
    seed_queued_series(sessions, tmp_path / "series", 1, SMALL)
    return settings, sessions


def test_job_whose_lease_ran_out_is_queued_again_by_a_worker_on_another_host(tmp_path, database_url):
    settings, sessions = _one_queued_series(tmp_path, database_url, lease_seconds=2, lease_renew_seconds=1)
    gone = InferenceWorker(settings, sessions, "host-that-lost-power:4242")
    assert gone.claim() is not None
    other = InferenceWorker(settings, sessions, "other-host:1")

    assert other.requeue_expired_leases() == 0  # the lease still holds
    wait_for(lambda: other.requeue_expired_leases() == 1, timeout=30, interval=0.5, what="the lease to run out")
    assert other.run_once()

    with sessions() as session:
        job = session.scalars(select(Job)).one()
        assert job.state is JobState.DONE and job.claimed_by == "other-host:1" and job.worker_deaths == 1
        assert job.lease_expires_at is None
        reasons = [e.reason for e in job.events if e.to_state is JobState.QUEUED]
        assert reasons[-1].startswith(
            "worker host-that-lost-power:4242 died in stage claimed (1 of 2 allowed), its lease having run out"
        )
    assert not gone.renew_lease(job.id)  # the first worker learns the job is no longer its own


def test_working_worker_renews_its_lease_so_no_other_worker_takes_the_job(tmp_path, database_url):
    settings, sessions = _one_queued_series(tmp_path, database_url, lease_seconds=2, lease_renew_seconds=0.5)
    worker = InferenceWorker(settings, sessions, "busy-host:1")
    claim = worker.claim()
    assert claim is not None
    other = InferenceWorker(settings, sessions, "other-host:1")
    from dicom_node.worker import LeaseHeartbeat

    heartbeat = LeaseHeartbeat(worker, claim.job_id)
    heartbeat.start()
    try:
        for _ in range(8):  # 4 s: twice the lease
            time.sleep(0.5)
            assert other.requeue_expired_leases() == 0
    finally:
        heartbeat.stop()
    with sessions() as session:
        job = session.scalars(select(Job)).one()
        assert job.state is JobState.PROCESSING and job.claimed_by == "busy-host:1" and job.worker_deaths == 0


def test_a_clock_stepped_forward_does_not_take_the_job_of_a_worker_still_renewing_its_lease(
    tmp_path, database_url, monkeypatch
):
    """The sweeping worker's wall clock runs a whole lease ahead (an NTP step, or another host's clock)."""
    settings, sessions = _one_queued_series(tmp_path, database_url, lease_seconds=1, lease_renew_seconds=0.5)
    busy = InferenceWorker(settings, sessions, "busy-host:1")
    claim = busy.claim()
    assert claim is not None
    ahead = InferenceWorker(settings, sessions, "clock-ahead-host:1")
    true_now = jobs.utcnow

    def sweep_with_the_clock_ahead() -> int:
        monkeypatch.setattr(jobs, "utcnow", lambda: true_now() + timedelta(seconds=61))
        try:
            return ahead.requeue_expired_leases()
        finally:
            monkeypatch.setattr(jobs, "utcnow", true_now)

    for _ in range(4):  # two seconds: twice the lease, each sweep seeing the lease run out by its clock
        assert sweep_with_the_clock_ahead() == 0
        assert busy.renew_lease(claim.job_id)
        time.sleep(0.5)
    assert sweep_with_the_clock_ahead() == 0
    with sessions() as session:
        job = session.scalars(select(Job)).one()
        assert job.state is JobState.PROCESSING and job.claimed_by == "busy-host:1" and job.worker_deaths == 0

    # The busy worker stops renewing: now its lease stays run out for a whole lease period (by the sweeper's clock
    # on SQLite; on PostgreSQL leases are counted by the database server's clock, which the sweeper cannot step).
    wait_for(lambda: sweep_with_the_clock_ahead() == 1, timeout=10, interval=0.5, what="the abandoned lease")
    with sessions() as session:
        assert session.scalars(select(Job)).one().state is JobState.QUEUED


def test_a_clock_set_back_does_not_hold_a_frozen_workers_job_until_it_catches_up(tmp_path, database_url):
    """The clock is set back an hour right after a worker's last renewal, then the worker freezes: its lease reads
    valid for an hour more, yet the job is queued again once the lease stays unchanged for two lease periods."""
    settings, sessions = _one_queued_series(tmp_path, database_url, lease_seconds=1, lease_renew_seconds=0.5)
    busy = InferenceWorker(settings, sessions, "busy-host:1")
    claim = busy.claim()
    assert claim is not None
    other = InferenceWorker(settings, sessions, "other-host:1")
    for _ in range(6):  # three seconds: three lease periods, the lease renewed all along
        assert other.requeue_expired_leases() == 0
        assert busy.renew_lease(claim.job_id)
        time.sleep(0.5)
    with transaction(sessions) as session:  # the last renewal, as written in the time before the step back
        session.execute(update(Job).values(lease_expires_at=utcnow() + timedelta(hours=1, seconds=1)))

    wait_for(lambda: other.requeue_expired_leases() == 1, timeout=10, interval=0.5, what="the lease left unrenewed")
    with sessions() as session:
        job = session.scalars(select(Job)).one()
        assert job.state is JobState.QUEUED and job.worker_deaths == 1
        assert re.fullmatch(
            r"worker busy-host:1 died in stage claimed \(1 of 2 allowed\), its lease not renewed for \d+ s, though it "
            r"reads valid until [-\d]+ [:\d]+ UTC \(the clock was set back since it was written\); queued again",
            job.reason,
        ), job.reason
    assert not busy.renew_lease(claim.job_id)


def test_stopped_worker_hands_its_job_back_without_counting_a_death(tmp_path, database_url):
    settings, sessions = _one_queued_series(tmp_path, database_url)
    worker = InferenceWorker(settings, sessions, "stopping-host:1")
    worker.current = worker.claim()

    assert worker.hand_back()

    with sessions() as session:
        job = session.scalars(select(Job)).one()
        assert job.state is JobState.QUEUED and job.worker_deaths == 0 and job.lease_expires_at is None
        assert (
            job.reason == "worker stopping-host:1 was stopped while it processed the series (not a crash); queued again"
        )


@pytest.mark.integration
@pytest.mark.parametrize(("grace", "outcome"), [(60, JobState.DONE), (0, JobState.QUEUED)])
def test_worker_command_on_sigterm_finishes_its_job_within_the_grace_or_hands_it_back(
    tmp_path, postgresql_url, grace, outcome
):
    migrate(postgresql_url)
    sessions = make_session_factory(make_engine(postgresql_url))
    seed_queued_series(sessions, tmp_path / "storage" / "instances", 1, SMALL)
    config = worker_config(tmp_path, postgresql_url, shutdown_grace_seconds=grace)
    worker = start_worker(config, "remote-host", tmp_path / "worker.log")
    try:
        _stop_mid_job(sessions, worker, f"remote-host:{worker.pid}")
        worker.send_signal(signal.SIGTERM)
        worker.send_signal(signal.SIGCONT)
        assert worker.wait(timeout=90) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
    with sessions() as session:
        job = session.scalars(select(Job)).one()
        assert job.state is outcome and job.worker_deaths == 0
        if outcome is JobState.DONE:
            assert job.claimed_by == f"remote-host:{worker.pid}" and Path(job.result_path).is_dir()
        else:
            assert job.reason == (
                f"worker remote-host:{worker.pid} was stopped while it processed the series (not a crash); queued again"
            )


def _stop_mid_job(sessions: sessionmaker[Session], worker: subprocess.Popen[bytes], identity: str) -> int:
    """SIGSTOP ``worker`` at a moment it holds a job (checked while it is stopped); the job's id."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with sessions() as session:
            held = session.scalar(select(Job.id).where(Job.state == JobState.PROCESSING, Job.claimed_by == identity))
        if held is not None:
            worker.send_signal(signal.SIGSTOP)
            with sessions() as session:
                job = session.get_one(Job, held)
                if job.state is JobState.PROCESSING and job.claimed_by == identity:
                    return held
            worker.send_signal(signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError(f"worker {identity} never held a job")


# --- docker-compose.yml: checked by Docker where it exists, and against the CLI and the Dockerfile everywhere ---

COMPOSE_FILE = Path(__file__).resolve().parents[1] / "docker-compose.yml"


def test_compose_file_is_valid_for_docker_compose(tmp_path):
    docker = shutil.which("docker")
    if (
        docker is None
        or subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode != 0
    ):
        pytest.skip("docker compose is not installed here; the compose file is checked against the CLI below")
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE_FILE), "config", "-q"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "POSTGRES_PASSWORD": "test"},
    )
    assert result.returncode == 0, result.stderr


def test_compose_services_run_commands_the_cli_has_with_settings_the_node_accepts(monkeypatch):
    import typer.main

    from dicom_node.cli import app

    text = COMPOSE_FILE.read_text()
    compose = yaml.safe_load(text)
    services = compose["services"]
    assert {"postgres", "node", "worker"} <= set(services)
    # no well-known fallback password: compose refuses to start without one (${VAR:?...}), never uses a default
    assert "${POSTGRES_PASSWORD:-" not in text and text.count("${POSTGRES_PASSWORD:?") == 2
    cli = typer.main.get_command(app)
    dockerfile = (COMPOSE_FILE.parent / "Dockerfile").read_text()
    storage = dockerfile.split("DICOM_NODE_STORAGE__DIRECTORY=", 1)[1].split()[0]
    for name in ("node", "worker"):
        service = services[name]
        command, *options = service["command"]
        assert command in cli.commands, f"{name}: dicom-node has no command {command!r}"  # type: ignore[attr-defined]
        known = {option for param in cli.commands[command].params for option in param.opts}  # type: ignore[attr-defined]
        assert {option for option in options if option.startswith("--")} <= known
        assert service["build"] == "." and f"storage:{storage}" in service["volumes"]  # the image's storage folder
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        for variable, value in service["environment"].items():
            monkeypatch.setenv(variable, str(value))
        settings = Settings()
        assert settings.database_url.startswith("postgresql+psycopg://")
        assert settings.database_url.endswith("@postgres:5432/dicomnode")
        for variable in service["environment"]:
            monkeypatch.delenv(variable)
    node_workers = services["node"]["environment"]["DICOM_NODE_INFERENCE__WORKERS"]
    assert Settings.model_validate({"inference": {"workers": node_workers}}).inference.workers == 0  # GPU hosts infer
    gpus = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpus == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert services["worker"]["environment"]["DICOM_NODE_INFERENCE__DEVICE"] == "cuda"
    assert "postgresql" in dockerfile.split("pip install", 1)[1].split("\n")[0]  # the image has the driver
    for name, service in services.items():  # Docker's json-file log grows for good unless told to rotate it
        rotated = service["logging"]
        assert rotated["driver"] == "json-file", name
        assert rotated["options"]["max-size"].endswith("m") and int(rotated["options"]["max-file"]) >= 2, name


def test_a_dead_workers_lease_runs_out_by_the_databases_clock_whatever_its_hosts_clock_said(
    tmp_path, postgresql_url, monkeypatch
):
    """The claiming host's clock ran ten minutes ahead: its lease must still run out two lease periods after it
    died, as counted by the clock every host shares (the database server's), not ten minutes later."""
    settings, sessions = _one_queued_series(tmp_path, postgresql_url, lease_seconds=1, lease_renew_seconds=0.5)
    true_now = jobs.utcnow
    monkeypatch.setattr(jobs, "utcnow", lambda: true_now() + timedelta(minutes=10))
    ahead = InferenceWorker(settings, sessions, "clock-ahead-host:7")
    claim = ahead.claim()
    assert claim is not None and ahead.renew_lease(claim.job_id, claim.attempt)
    monkeypatch.setattr(jobs, "utcnow", true_now)  # the host with the clock ahead is gone; the others' clocks are true
    other = InferenceWorker(settings, sessions, "other-host:1")

    wait_for(lambda: other.requeue_expired_leases() == 1, timeout=30, interval=0.5, what="the dead worker's lease")
    with sessions() as session:
        job = session.scalars(select(Job)).one()
        assert job.state is JobState.QUEUED and job.worker_deaths == 1


def test_a_worker_whose_claim_was_taken_over_no_longer_renews_or_writes_its_stage(tmp_path, database_url):
    """Two claims under one worker id (containers sharing a host name and pid): the old claim's heartbeat must not
    keep the new claim's lease alive, nor write its stage over the new claim's."""
    settings, sessions = _one_queued_series(tmp_path, database_url, lease_seconds=60)
    first = InferenceWorker(settings, sessions, "node:8")
    old = first.claim()
    assert old is not None
    with sessions.begin() as session:
        job = session.get(Job, old.job_id)
        assert job is not None
        jobs.change_state(session, job, JobState.QUEUED, "queued again for the test")
    new = InferenceWorker(settings, sessions, "node:8").claim()
    assert new is not None and new.attempt == old.attempt + 1

    assert not first.renew_lease(old.job_id, old.attempt)
    first._record_stage(old, "encode")
    with sessions() as session:
        job = session.get(Job, new.job_id)
        assert job is not None and job.stage == "claimed" and job.attempts == new.attempt


def test_one_serve_per_database_the_second_waits_for_the_first(tmp_path, database_url):
    """Two nodes on one database would each dispatch every result (the PACS would get every file twice)."""
    from dicom_node.service import DatabaseUnavailable, take_node_lock

    migrate(database_url)
    settings = Settings(storage={"directory": tmp_path / "storage"}, database={"url": database_url})
    first = take_node_lock(settings, give_up_after=0)
    try:
        with pytest.raises(DatabaseUnavailable, match=r"another dicom-node serve is running on .*; only one may"):
            take_node_lock(settings, give_up_after=0.5)
    finally:
        first.release()
    take_node_lock(settings, give_up_after=0).release()  # given back at the first one's stop


def test_a_second_serve_on_the_same_database_starts_only_once_the_first_has_stopped(tmp_path, start_node):
    node = start_node(rules=CT_RULES)
    second = subprocess.Popen(
        [DICOM_NODE, "serve", "--config", str(node.config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        time.sleep(5)
        assert second.poll() is None  # waiting, not failed
        node.stop()  # the first node goes: the second takes over
        lines: list[str] = []
        assert second.stdout is not None
        for line in second.stdout:
            lines.append(line)
            if "node.ready" in line:
                break
        text = "".join(lines)
        assert "another dicom-node serve is running on this database (or the database cannot be reached yet); " in text
        assert "this one starts once it has stopped" in text
        assert text.index("node.waiting_for_other_node") < text.index("node.storage_checked")
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=30)


def test_a_node_whose_lock_connection_ended_takes_the_lock_again_or_stops_if_another_node_has_it(
    postgresql_url, monkeypatch
):
    from db.session import NodeLock

    migrate(postgresql_url)
    monkeypatch.setattr(NodeLock, "WATCH_SECONDS", 0.3)
    lost: list[str] = []
    first = NodeLock(postgresql_url)
    assert first.try_take()
    first.watch(lost.append)
    try:
        end_node_lock_connection(postgresql_url)
        wait_for(lambda: not NodeLock(postgresql_url).try_take(), timeout=10, what="the lock taken again")
        assert not lost

        monkeypatch.setattr(NodeLock, "WATCH_SECONDS", 3.0)
        time.sleep(0.5)  # the watcher now sleeps 3 s between checks
        end_node_lock_connection(postgresql_url)
        second = NodeLock(postgresql_url)
        assert second.try_take()  # another node took the database meanwhile
        wait_for(lambda: bool(lost), timeout=15, what="the first node told to stop")
        assert "another dicom-node serve holds the database now" in lost[0]
        second.release()
    finally:
        first.release()
