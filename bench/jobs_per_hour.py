"""Jobs per hour with 1, 2 and 4 inference workers sharing one PostgreSQL database.

For each worker count the script takes a fresh database on a throwaway PostgreSQL server
(or ``--database-url``'s server), records ``--series`` phantom series as received and
QUEUED for the threshold baseline model (CPU), starts that many real ``dicom-node worker``
processes (each with its own host name in its lease) and waits until every job is DONE.

Figures, from the database's own time stamps (``job_events``):

- jobs/hour: series / (last DONE - first claim) x 3600, so worker start-up (imports,
  model load, highdicom warm-up) is not counted;
- claim overhead: per job, ``timings.claim``, the seconds from the worker starting its
  claim to the claim committed (median and 95th percentile);
- per job: the median seconds from claim to DONE.

Run from the repository root:

    PYTHONPATH=$PWD .venv/bin/python bench/jobs_per_hour.py --series 20 --workers 1 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from sqlalchemy import create_engine, func, select, text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from db.models import Job, JobEvent, JobState  # noqa: E402
from db.session import make_engine, make_session_factory, migrate  # noqa: E402
from dicom_node.phantom import PhantomSpec  # noqa: E402
from tests.conftest import PostgreSQL, seed_queued_series  # noqa: E402

DICOM_NODE = str(Path(sys.executable).with_name("dicom-node"))
RULES = [{"name": "ct", "match": {"modality": "CT"}, "action": "process", "model": "baseline"}]


def fresh_database(server_url: str, name: str) -> str:
    engine = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return server_url.rsplit("/", 1)[0] + f"/{name}"


def run(url: str, folder: Path, workers: int, series: int, spec: PhantomSpec) -> dict[str, object]:
    """One measurement: ``series`` QUEUED jobs, ``workers`` worker processes, until all are DONE."""
    migrate(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    seed_queued_series(sessions, folder / "storage" / "instances", series, spec)
    config = folder / "worker.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage": {"directory": str(folder / "storage")},
                "database": {"url": url},
                "rules": RULES,
                "inference": {"poll_seconds": 0.1, "device": "cpu", "cpu_threads": 1},
                "logging": {"level": "WARNING"},
            }
        )
    )
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen(
            [DICOM_NODE, "worker", "--config", str(config), "--name", f"bench-host-{n}"],
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=(folder / f"worker-{n}.log").open("wb"),
        )
        for n in range(workers)
    ]
    try:
        deadline = time.monotonic() + 3600
        while time.monotonic() < deadline:
            with sessions() as session:
                done = session.scalar(select(func.count()).select_from(Job).where(Job.state == JobState.DONE))
                failed = session.scalar(select(func.count()).select_from(Job).where(Job.state == JobState.FAILED))
            if failed:
                raise SystemExit(f"{failed} job(s) FAILED; see {folder}/worker-*.log")
            if done == series:
                break
            time.sleep(0.5)
        else:
            raise SystemExit("the jobs did not finish within an hour")
    finally:
        for process in processes:
            process.terminate()
        for number, process in enumerate(processes):
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGUSR1)  # the worker prints every thread's stack
                time.sleep(2)
                process.kill()
                print(f"worker {number} did not stop within 60 s of SIGTERM; its log ends:", file=sys.stderr)
                print((folder / f"worker-{number}.log").read_text()[-6000:], file=sys.stderr)
    with sessions() as session:
        claims = list(session.scalars(select(JobEvent.at).where(JobEvent.to_state == JobState.PROCESSING)))
        finishes = list(session.scalars(select(JobEvent.at).where(JobEvent.to_state == JobState.DONE)))
        jobs = list(session.scalars(select(Job)))
        per_job = []
        for job in jobs:
            claimed = next(e.at for e in job.events if e.to_state is JobState.PROCESSING)
            finished = next(e.at for e in job.events if e.to_state is JobState.DONE)
            per_job.append((finished - claimed).total_seconds())
    engine.dispose()
    span = (max(finishes) - min(claims)).total_seconds()
    claim_seconds = sorted(float((job.timings or {}).get("claim", 0.0)) for job in jobs)
    hosts = {job.claimed_by.rpartition(":")[0] for job in jobs if job.claimed_by}
    return {
        "workers": workers,
        "series": series,
        "seconds": round(span, 2),
        "jobs_per_hour": round(series / span * 3600),
        "claim_ms_median": round(statistics.median(claim_seconds) * 1000, 1),
        "claim_ms_p95": round(claim_seconds[max(0, round(0.95 * len(claim_seconds)) - 1)] * 1000, 1),
        "job_seconds_median": round(statistics.median(per_job), 2),
        "hosts_used": len(hosts),
        "stalled_exits": sum(
            (folder / f"worker-{n}.log").read_text().count("worker.exit_stalled") for n in range(workers)
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=20, help="phantom series (jobs) per measurement")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="worker counts to measure")
    parser.add_argument("--size", type=int, default=128, help="phantom rows and columns")
    parser.add_argument("--slices", type=int, default=40, help="phantom slices")
    parser.add_argument(
        "--database-url", help="a PostgreSQL server's URL (postgresql+psycopg://user@host/db); default: a throwaway one"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    options = parser.parse_args()
    spec = PhantomSpec(
        rows=options.size, columns=options.size, slices=options.slices, pixel_spacing=(3.0, 3.0), slice_spacing=4.0
    )
    server = None if options.database_url else PostgreSQL().start()
    server_url = options.database_url or server.url()  # type: ignore[union-attr]
    results = []
    try:
        for number, workers in enumerate(options.workers):
            with tempfile.TemporaryDirectory(prefix="jobs-per-hour-") as folder:
                url = fresh_database(server_url, f"bench_jobs_{number}_{workers}")
                result = run(url, Path(folder), workers, options.series, spec)
            results.append(result)
            print(json.dumps(result), flush=True)
    finally:
        if server is not None:
            server.stop()
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}, load {os.getloadavg()}")
    print(f"phantom: {options.size}x{options.size}x{options.slices}, {options.series} series, threshold baseline, CPU")
    print("| workers | jobs/hour | seconds | median s/job | claim ms (median / p95) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['workers']} | {r['jobs_per_hour']} | {r['seconds']} | {r['job_seconds_median']} | "
            f"{r['claim_ms_median']} / {r['claim_ms_p95']} |"
        )
    if options.json:
        options.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
