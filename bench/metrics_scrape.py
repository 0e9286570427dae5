"""What one /metrics scrape costs on a database of weeks of uptime.

Usage (from the checkout)::

    python bench/metrics_scrape.py /tmp/scrape.db                  # 2,000,000 audit records, 1,000,000 instances
    python bench/metrics_scrape.py /tmp/scrape.db --audit 8000000

Builds the SQLite database once (the newest schema, rows written in bulk: one association and one store record per
instance received, as a modality sending one image per association leaves them, a send record per 100; six state
changes per job), then
prints the median of 5 scrapes (``DatabaseCollector.collect``, warm cache) and each query's plan.
"""

from __future__ import annotations

import argparse
import sqlite3
import time
from itertools import pairwise
from pathlib import Path

from db.session import make_engine, make_session_factory, migrate
from dicom_node.config import Settings
from dicom_node.console.metrics import DatabaseCollector, Liveness

NOW = "2026-12-01 00:00:00.000000"
UID = "1.2.826.0.1.3680043.8.498.{}"
PATH = (None, "RECEIVING", "COMPLETE", "QUEUED", "PROCESSING", "SENDING", "DONE")
"""The states a delivered series went through: six events per job."""
TIMINGS = '{"model_load": 2.1, "preprocess": 1.5, "predict": 31.0, "write": 1.2, "encode": 3.4}'


def build(path: Path, audit: int, instances: int, jobs: int) -> None:
    """The newest schema and its rows, written straight into the file (no ORM: minutes, not hours)."""
    migrate(f"sqlite:///{path}")
    db = sqlite3.connect(path)
    db.execute("PRAGMA synchronous=OFF")
    db.execute("INSERT INTO studies (id, study_instance_uid, created_at) VALUES (1, '1.2.3', ?)", (NOW,))
    db.executemany(
        "INSERT INTO series (id, series_instance_uid, study_id, instance_count, first_received_at, last_received_at) "
        "VALUES (?, ?, 1, 300, ?, ?)",
        ((n, UID.format(f"1.{n}"), NOW, NOW) for n in range(1, jobs + 1)),
    )
    db.executemany(
        "INSERT INTO jobs (id, series_id, state, attempts, worker_deaths, created_at, state_changed_at, version, "
        f"timings) VALUES (?, ?, 'DONE', 1, 0, ?, ?, 1, '{TIMINGS}')",
        ((n, n, NOW, f"2026-11-{1 + n % 28:02d} 00:00:{n % 60:02d}") for n in range(1, jobs + 1)),
    )
    db.executemany(
        "INSERT INTO job_events (job_id, from_state, to_state, at) VALUES (?, ?, ?, ?)",
        ((n, before, after, NOW) for n in range(1, jobs + 1) for before, after in pairwise(PATH)),
    )
    db.executemany(
        "INSERT INTO instances (sop_instance_uid, sop_class_uid, series_id, transfer_syntax_uid, path, size_bytes, "
        "received_at, patient_id) VALUES (?, '1.2.840.10008.5.1.4.1.1.2', ?, '1.2.840.10008.1.2.1', ?, 526000, ?, 'P')",
        (
            (UID.format(n), 1 + n % jobs, f"/data/instances/1.2.3/{UID.format(n // 300)}/{UID.format(n)}.dcm", NOW)
            for n in range(instances)
        ),
    )
    db.executemany(
        "INSERT INTO audit_events (at, action, peer_ae_title, peer_address, study_instance_uid, outcome, instances, "
        "detail) VALUES (?, ?, 'CT1', ?, ?, ?, ?, ?)",
        (_audit_row(n) for n in range(audit)),
    )
    db.commit()
    db.close()


def _audit_row(n: int) -> tuple[str, str, str, str | None, str, int, str | None]:
    if n % 100 == 99:
        return (NOW, "send", "10.0.0.9:104", UID.format(n), "success", 2, "2 result files accepted")
    if n % 2:
        return (NOW, "association", f"10.0.0.5:{40000 + n % 20000}", None, "released", 0, None)
    return (NOW, "store", f"10.0.0.5:{40000 + n % 20000}", UID.format(n), "success", 1, None)


def scrape(collector: DatabaseCollector) -> float:
    started = time.perf_counter()
    for _family in collector.collect():
        pass
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("database", type=Path)
    parser.add_argument("--audit", type=int, default=2_000_000)
    parser.add_argument("--instances", type=int, default=1_000_000)
    parser.add_argument("--jobs", type=int, default=100_000)
    args = parser.parse_args()
    if not args.database.exists():
        started = time.perf_counter()
        build(args.database, args.audit, args.instances, args.jobs)
        print(f"built {args.database} in {time.perf_counter() - started:.0f} s")
    url = f"sqlite:///{args.database}"
    migrate(url)  # a database built by an older checkout is brought to this one's schema
    settings = Settings.model_validate({"storage": {"directory": str(args.database.parent)}})
    collector = DatabaseCollector(
        settings, make_session_factory(make_engine(url)), Liveness(lambda: None, lambda: False)
    )
    scrape(collector)  # the cache warmed
    timings = sorted(scrape(collector) for _ in range(5))
    print(f"one scrape: median {timings[2] * 1e3:.0f} ms (min {timings[0] * 1e3:.0f}, max {timings[-1] * 1e3:.0f})")


if __name__ == "__main__":
    main()
