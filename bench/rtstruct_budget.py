#!/usr/bin/env python
"""RTSTRUCT size and encode time for 117 structures, without and with the contour budget.

The label map is the SEG benchmark's full-body map (``bench/seg_encoding.py``'s
``build_label_map``) with speckle added the way a random-weights network makes it
(small blobs of random labels across the body): the case in which an RTSTRUCT grew to
146 MB. Each variant runs once in this process, on the same map:

* ``no budget``: ``ContourBudget`` so large that nothing is simplified beyond 0.25 px
  (what the node wrote before the budget existed);
* ``default budget``: ``results.rtstruct_max_points_per_structure`` 100,000 and
  ``rtstruct_max_megabytes`` 40.

Usage: ``python bench/rtstruct_budget.py [--slices 120] [--speckle 0.02]``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from seg_encoding import build_label_map  # noqa: E402

from dicom_node.encode.rtstruct import ContourBudget, encode_rtstruct  # noqa: E402
from dicom_node.encode.seg import Algorithm  # noqa: E402
from dicom_node.phantom import PhantomSpec, write_phantom_series  # noqa: E402
from inference.volume import load_series_volume  # noqa: E402


def speckle(labels: np.ndarray, fraction: float, seed: int = 3) -> np.ndarray:
    """Blobs of 2 x 2 pixels with random labels over ``fraction`` of the body's voxels."""
    rng = np.random.default_rng(seed)
    values = np.unique(labels[labels > 0])
    noisy = labels.copy()
    body = np.argwhere(labels > 0)
    picks = body[rng.choice(len(body), size=int(len(body) * fraction / 4), replace=False)]
    for dk, dj, di in ((0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)):
        k = picks[:, 0] + dk
        j = np.minimum(picks[:, 1] + dj, labels.shape[1] - 1)
        i = np.minimum(picks[:, 2] + di, labels.shape[2] - 1)
        noisy[k, j, i] = rng.choice(values, size=len(picks))
    return noisy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=120)
    parser.add_argument("--speckle", type=float, default=0.02, help="fraction of body voxels in speckle blobs")
    args = parser.parse_args()
    from totalsegmentator.map_to_binary import class_map

    with tempfile.TemporaryDirectory() as folder:
        phantom = write_phantom_series(
            Path(folder) / "ct",
            PhantomSpec(rows=512, columns=512, slices=args.slices, pixel_spacing=(0.8, 0.8), slice_spacing=1.5),
        )
        volume = load_series_volume(phantom.files)
        labels = speckle(build_label_map(phantom, 117), args.speckle)
        headers = {d.SOPInstanceUID: d for d in (pydicom.dcmread(f, stop_before_pixels=True) for f in phantom.files)}
        sources = [headers[s.sop_instance_uid] for s in volume.slices]
        algorithm = Algorithm("bench", "0", is_baseline=False)
        classes = dict(class_map["total"])
        print(
            f"512 x 512 x {args.slices}, {len(np.unique(labels)) - 1} structures, speckle {args.speckle:.0%} of body voxels"
        )
        print("| variant | encode + write | file | structures | contours | points | structures simplified |")
        print("|---|---|---|---|---|---|---|")
        for name, budget in (("no budget", ContourBudget(10**9, 10**6)), ("default budget", ContourBudget())):
            notes: list[str] = []
            started = time.perf_counter()
            dataset = encode_rtstruct(volume, sources, labels, classes, algorithm, budget=budget, notes=notes)
            path = Path(folder) / f"{name}.dcm"
            dataset.save_as(path, enforce_file_format=True)
            seconds = time.perf_counter() - started
            contours = sum(len(roi.ContourSequence) for roi in dataset.ROIContourSequence)
            points = sum(
                int(c.NumberOfContourPoints) for roi in dataset.ROIContourSequence for c in roi.ContourSequence
            )
            print(
                f"| {name} | {seconds:.1f} s | {path.stat().st_size / 1e6:.1f} MB | {len(dataset.StructureSetROISequence)} "
                f"| {contours} | {points} | {len(notes)} |"
            )


if __name__ == "__main__":
    main()
