"""Start-up scan for temporary files on a large store: the old walk of instances/ against one listing of incoming/.

Usage (from the checkout)::

    python bench/startup_scan.py /tmp/scan-store        # builds 100,200 small files in 300 series folders once

Prints the median of 5 runs of each scan, warm cache, and for comparison the time
``repair()`` spends listing every series folder.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from dicom_node.receive.storage import TEMP_SUFFIX, InstanceStore

STUDIES, SERIES_PER_STUDY, FILES_PER_SERIES = 10, 30, 334


def build_store(store: InstanceStore) -> int:
    """Small files in the node's layout, written once."""
    written = 0
    for study in range(STUDIES):
        for series in range(SERIES_PER_STUDY):
            folder = store.instances_dir / f"1.2.3.{study}" / f"1.2.3.{study}.{series}"
            folder.mkdir(parents=True)
            for number in range(FILES_PER_SERIES):
                (folder / f"1.2.3.{study}.{series}.{number}.dcm").write_bytes(b"x" * 64)
                written += 1
    return written


def walk_instances(store: InstanceStore) -> int:
    """What start-up did before temporary files moved to incoming/."""
    return sum(1 for _ in store.instances_dir.rglob(f".*{TEMP_SUFFIX}"))


def median_ms(scan: Callable[[], object], runs: int = 5) -> tuple[float, float, float]:
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        scan()
        timings.append((time.perf_counter() - started) * 1e3)
    return sorted(timings)[runs // 2], min(timings), max(timings)


def main(root: Path) -> None:
    store = InstanceStore(root, fsync=False)
    if not any(store.instances_dir.iterdir()):
        print(f"files written: {build_store(store)}")
    for name, scan in (
        ("old: rglob over instances/", lambda: walk_instances(store)),
        ("new: listing of incoming/ (remove_partial_files)", store.remove_partial_files),
    ):
        median, fastest, slowest = median_ms(scan)
        print(f"{name}: median {median:.3f} ms (min {fastest:.3f}, max {slowest:.3f}) over 5 runs")
    started = time.perf_counter()
    listed = sum(len(list(folder.glob("*.dcm"))) for _study, _series, folder in store.series_folders())
    print(
        f"for comparison, repair()'s listing of every series folder ({listed} files): {(time.perf_counter() - started) * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/scan-store"))
