#!/usr/bin/env python
"""Per-structure measurements (``dicom_node.encode.measurements.measure``): time and peak memory.

A synthetic ``--slices`` x 512 x 512 CT (air outside a round 500 mm field, -3024 HU padding
beyond it, soft tissue inside) with a label map of ``--structures`` box-shaped structures,
some of them touching the field's edge, is measured ``--repeats`` times, with and without
the padding marked (``Volume.padding``, as PixelPaddingValue sets it). Reported: median
seconds and the peak of Python allocations during one call (``tracemalloc``), beyond the
volume and label map themselves.

    PYTHONPATH=$PWD .venv/bin/python bench/measure_speed.py --slices 300 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc

import numpy as np

from dicom_node.encode.measurements import measure
from inference.volume import Volume


def synthetic(slices: int, structures: int, marked: bool) -> tuple[Volume, np.ndarray, dict[int, str]]:
    rows = columns = 512
    y, x = np.mgrid[:rows, :columns]
    outside = (y - 255.5) ** 2 + (x - 255.5) ** 2 > 250**2
    hu = np.full((slices, rows, columns), 40.0, dtype=np.float32)
    hu[:, outside] = -3024.0
    labels = np.zeros(hu.shape, dtype=np.uint8)
    rng = np.random.default_rng(2026)
    for label in range(1, structures + 1):
        k, j, i = rng.integers(0, slices - 20), rng.integers(0, rows - 40), rng.integers(0, columns - 40)
        labels[k : k + 20, j : j + 40, i : i + 40] = label
    labels[:, outside] = 0  # a model never labels padding
    packed = np.packbits(np.broadcast_to(outside, hu.shape), axis=-1) if marked else None
    volume = Volume(
        hu=hu,
        origin=np.zeros(3),
        spacing=np.array([0.98, 0.98, 1.5]),
        direction=np.eye(3),
        slices=[],
        frame_of_reference_uid=None,
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        padding=packed,
    )
    return volume, labels, {label: f"structure_{label}" for label in range(1, structures + 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--structures", type=int, default=117)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for marked in (False, True):
        volume, labels, classes = synthetic(args.slices, args.structures, marked)
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            results = measure(volume, labels, classes)
            times.append(time.perf_counter() - started)
        tracemalloc.start()
        measure(volume, labels, classes)
        _current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        cut = sum(m.cut_by_scan_edge for m in results)
        print(
            f"padding {'marked' if marked else 'unmarked'}: {len(results)} structures ({cut} flagged cut), "
            f"median {statistics.median(times):.2f} s (min {min(times):.2f}, max {max(times):.2f}), "
            f"peak {peak / 1e6:.0f} MB beyond the volume"
        )


if __name__ == "__main__":
    main()
