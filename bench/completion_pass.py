"""One completion pass of the series watcher over many series waiting for the rest of a transfer cut short.

A sender that aborts its association after each image (a router in a retry loop) leaves each series waiting
``completion.expected_count_timeout_seconds``; the watcher's pass holds the database's write lock, so its length is
what every sender's audit record and instance record may wait behind.

Usage (from the checkout)::

    python bench/completion_pass.py 2000      # the number of waiting series

Prints min, median and max of 7 passes.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import insert, update

from db.ingest import InstanceRecord, SeriesAttributes, StudyAttributes, record_instance
from db.models import InterruptedTransfer, Series, utcnow
from db.session import transaction
from dicom_node.config import Settings
from dicom_node.service import open_database
from dicom_node.watcher import SeriesWatcher


def _image(number: int) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=f"1.2.{number}.1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"/data/1.2.{number}.1.dcm",
        size_bytes=1,
        study=StudyAttributes(f"1.3.{number}"),
        series=SeriesAttributes(f"1.2.{number}", modality="CT"),
    )


def main(count: int) -> None:
    folder = Path(tempfile.mkdtemp())
    settings = Settings(storage={"directory": str(folder / "storage")}, completion={"quiet_seconds": 2})
    sessions = open_database(settings)
    with transaction(sessions) as session:
        for number in range(count):
            record_instance(session, _image(number))
        session.execute(update(Series).values(last_received_at=utcnow() - timedelta(seconds=60)))
        marks = [
            {"series_instance_uid": f"1.2.{n}", "calling_ae_title": "CT", "reason": "aborted", "at": utcnow()}
            for n in range(count)
        ]
        session.execute(insert(InterruptedTransfer), marks)
    watcher = SeriesWatcher(settings, sessions)
    times = []
    for _ in range(7):
        started = time.perf_counter()
        watcher.complete_ready_series()
        times.append(time.perf_counter() - started)
    print(
        f"{count} waiting series: pass min {min(times) * 1000:.0f} ms, median {statistics.median(times) * 1000:.0f} ms, "
        f"max {max(times) * 1000:.0f} ms"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
