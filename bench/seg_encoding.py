#!/usr/bin/env python
"""DICOM SEG encoding speed: the node's writers against TotalSegmentator's own.

One synthetic full-body-like label map (``--slices`` x 512 x 512, ``--structures``
distinct TotalSegmentator ``total`` classes) on a synthetic CT series is encoded by

* ``node-binary``      ``encode_segmentation(..., segmentation_type="BINARY")`` + ``write_segmentation``
* ``node-labelmap``    ``encode_segmentation(..., segmentation_type="LABELMAP")`` + ``write_segmentation``
* ``node-binary-nowarmup`` / ``node-labelmap-nowarmup``  the same without the start-up ``warm_up()``
* ``node-labelmap-rle``  LABELMAP with ``compress=True`` (RLE Lossless)       [extra line]
* ``node-binary-j2k``    BINARY with ``compress=True`` (JPEG 2000 Lossless)   [extra line]
* ``node-rtstruct``      ``encode_rtstruct`` + ``save_as`` (RT Structure Set, no goal) [extra line,
  only with ``--writers``]
* ``totalseg``         ``totalsegmentator.dicom_io.save_mask_as_dicomseg`` (BINARY, uncompressed)

for ``--repeats`` rounds; every writer runs in a fresh Python subprocess, so the peak
RSS reported (``ru_maxrss`` of that child) belongs to that writer alone. The order of
the writers is rotated from round to round.

What the timed step includes (``seconds``):

* node SEG writers: ``encode_segmentation`` (label values, relabelling, segment
  descriptions, ``highdicom.seg.Segmentation``) and ``write_segmentation(dataset, path)``.
  Not included: reading the 300 source headers (``dcmread(stop_before_pixels=True)``)
  and loading the label map (``np.load``), done before the clock starts; and
  ``dicom_node.encode.seg.warm_up()``, which the child calls first, right after its
  imports, as an inference worker does once at start-up before any job (highdicom's
  one-off table loading). The ``-nowarmup`` writers skip it and pay that in the step.
* ``node-rtstruct``: ``encode_rtstruct`` and ``save_as(path, enforce_file_format=True)``,
  as ``dicom_node/encode/results.py`` does; reading the volume (with pixels) is excluded.
* ``totalseg``: the whole ``save_mask_as_dicomseg`` call (SNOMED/colour tables, the
  per-class mask loop, reorientation, ``highdicom.seg.Segmentation``, ``save_as``).
  The function reads the source DICOM files itself (``pydicom.dcmread``, with pixels);
  that read is *excluded*: the files are read before the clock starts and the
  function's ``pydicom.dcmread`` is served from that in-memory cache. The label map is
  passed as TotalSegmentator passes it (uint8 array in the NIfTI's orientation, read
  with nibabel before the clock starts).

Every SEG output is decoded afterwards with ``highdicom.seg.segread`` in another
subprocess and compared voxel by voxel with the input label map
(``get_pixels_by_source_instance(uids, combine_segments=True, relabel=False)``, then
segment number -> label value through ``segment_classes`` for the node's writers and
through the segment labels (TotalSegmentator class names) for ``totalseg``). The
RTSTRUCT is only checked for one ROI per structure present.

Usage::

    .venv/bin/python bench/seg_encoding.py                     # 300 slices, 117 structures, 3 repeats
    .venv/bin/python bench/seg_encoding.py --slices 300 --structures 117 --repeats 3 \\
        --output bench/results/seg.json
    .venv/bin/python bench/seg_encoding.py --profile bench/results/seg-profile   # + cProfile, one run each
    .venv/bin/python bench/seg_encoding.py --writers node-binary,totalseg         # a subset
    .venv/bin/python bench/seg_encoding.py --writers node-rtstruct,totalseg --repeats 1 \
        --output bench/results/seg-rtstruct.json                                 # the RTSTRUCT line

Before timing it waits (polling every 20 s, at most 10 min) until the 1-minute load
average is below 1.5, and records the load at the start of every run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # the project is installed editable; this is only a fallback
    sys.path.insert(0, str(REPO))

WRITERS = (
    "node-binary",
    "node-labelmap",
    "node-binary-nowarmup",
    "node-labelmap-nowarmup",
    "node-labelmap-rle",
    "node-binary-j2k",
    "node-rtstruct",
    "totalseg",
)
DEFAULT_WRITERS = tuple(w for w in WRITERS if w != "node-rtstruct")  # RTSTRUCT: about 1.5 min a run; ask for it
REFERENCE = "totalseg"
GOALS = {  # reference seconds / node seconds, at least
    "node-binary": 2.0,
    "node-labelmap": 10.0,
    "node-binary-nowarmup": 2.0,
    "node-labelmap-nowarmup": 10.0,
}
COLD_ONLY = {"node-rtstruct"}  # no second (warm) run: it takes long and has no goal
LOAD_THRESHOLD = 1.5
LOAD_POLL_SECONDS = 20
LOAD_MAX_WAIT_SECONDS = 600
CHILD_TIMEOUT_SECONDS = 1800


# --------------------------------------------------------------------------- input


def _total_classes() -> dict[int, str]:
    from totalsegmentator.map_to_binary import class_map

    return dict(class_map["total"])


def _by_name(classes: dict[int, str]) -> dict[str, int]:
    return {name: label for label, name in classes.items()}


def build_label_map(phantom: Any, structures: int, seed: int = 7) -> np.ndarray:
    """A full-body-like label map in TotalSegmentator ``total`` numbering.

    Starts from the phantom's anatomy (physical coordinates, LPS mm):

    * liver, spleen, both kidneys, aorta as drawn by the phantom;
    * each lung split into lobes by oblique planes (left: 2, right: 3);
    * the spine cylinder cut along z into sacrum, S1, L5..L1, T12..T1, C7..C1
      (26 "vertebrae", 2 mm unlabelled discs between them), with the spinal cord
      (5 mm radius) in its posterior part;
    * the remaining soft tissue inside the body (not the 12 mm subcutaneous fat rim)
      is partitioned into compact 3-D Voronoi cells (farthest-point seeds, mm
      distances), one remaining TotalSegmentator class per cell.

    Every structure is a compact region spanning several slices; about a quarter to
    a third of the voxels end up labelled, as on a real CT.
    """
    from scipy.spatial import cKDTree

    from dicom_node.phantom import PHANTOM_LABELS as P

    classes = _total_classes()
    name = _by_name(classes)
    src = phantom.labels
    n_slices, rows, cols = src.shape
    spec = phantom.spec
    origin = np.asarray(phantom.slice_positions[0], dtype=float)
    # phantom orientation is axial (row dir +x, column dir +y); slices advance in z
    x = (origin[0] + np.arange(cols) * spec.pixel_spacing[1]).astype(np.float32)
    y = (origin[1] + np.arange(rows) * spec.pixel_spacing[0]).astype(np.float32)
    z = np.asarray([p[2] for p in phantom.slice_positions], dtype=np.float32)
    if not np.all(np.diff(z) > 0) or list(spec.orientation) != [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]:
        raise SystemExit("the label-map builder expects an axial, feet-to-head phantom")

    out = np.zeros(src.shape, dtype=np.uint8)
    zz = z[:, None, None]
    yy = y[None, :, None]
    xx = x[None, None, :]

    # organs drawn by the phantom
    for phantom_name, ts_name in (
        ("liver", "liver"),
        ("spleen", "spleen"),
        ("kidney_left", "kidney_left"),
        ("kidney_right", "kidney_right"),
        ("aorta", "aorta"),
    ):
        out[src == P[phantom_name]] = name[ts_name]
    # lungs -> lobes (oblique fissures: z + 0.4 y against a threshold)
    fissure = zz + 0.4 * yy  # (slices, rows, 1)
    left = src == P["lung_left"]
    out[left & (fissure >= 30)] = name["lung_upper_lobe_left"]
    out[left & (fissure < 30)] = name["lung_lower_lobe_left"]
    right = src == P["lung_right"]
    out[right & (fissure >= 42)] = name["lung_upper_lobe_right"]
    out[right & (fissure < 42) & (fissure >= 22)] = name["lung_middle_lobe_right"]
    out[right & (fissure < 22)] = name["lung_lower_lobe_right"]
    # spine -> 26 vertebrae along z, discs unlabelled, spinal cord posteriorly
    spine = src == P["spine"]
    vertebrae = [name["sacrum"], name["vertebrae_S1"]] + [
        name[f"vertebrae_{v}"]
        for v in ["L5", "L4", "L3", "L2", "L1"]
        + [f"T{i}" for i in range(12, 0, -1)]
        + [f"C{i}" for i in range(7, 0, -1)]
    ]
    edges = np.linspace(float(z[0]), float(z[-1]) + 1e-3, len(vertebrae) + 1)
    for k, label in enumerate(vertebrae):
        in_slab = (z >= edges[k]) & (z < edges[k + 1] - 2.0)  # 2 mm disc above each
        out[in_slab] = np.where(spine[in_slab], label, out[in_slab])
    cord = ((xx - 0.0) ** 2 + (yy - 80.0) ** 2) <= 5.0**2  # inside the spine (centre y 72, r 17)
    out[np.broadcast_to(cord, out.shape) & spine] = name["spinal_cord"]

    used = sorted(set(np.unique(out).tolist()) - {0})
    remaining = structures - len(used)
    if remaining < 1:
        raise SystemExit(f"--structures must be more than the {len(used)} anatomical ones")
    rng = np.random.default_rng(seed)
    free = [label for label in classes if label not in used]
    if remaining > len(free):
        raise SystemExit(f"--structures at most {len(used) + len(free)} (TotalSegmentator 'total')")
    cell_labels = rng.permutation(np.asarray(free))[:remaining].astype(np.uint8)

    # soft tissue inside the body, without the subcutaneous fat rim (inner ellipse 148 x 98 mm)
    inner = ((xx / 148.0) ** 2 + (yy / 98.0) ** 2) <= 1.0  # (1, rows, cols)
    soft = (src == P["body"]) & inner
    # farthest-point seeds among a coarse sample of the soft tissue
    ks, js, is_ = np.nonzero(soft[::3, ::8, ::8])
    cand = np.column_stack([z[ks * 3], y[js * 8], x[is_ * 8]]).astype(np.float64)
    if len(cand) < remaining:
        raise SystemExit("too little soft tissue for that many structures; use more slices")
    chosen = [int(rng.integers(len(cand)))]
    dist = np.linalg.norm(cand - cand[chosen[0]], axis=1)
    for _ in range(remaining - 1):
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(cand - cand[nxt], axis=1))
    tree = cKDTree(cand[chosen])
    for k in range(n_slices):
        jj, ii = np.nonzero(soft[k])
        if len(jj) == 0:
            continue
        pts = np.column_stack([np.full(len(jj), z[k]), y[jj], x[ii]])
        _, nearest = tree.query(pts, workers=-1)
        out[k, jj, ii] = cell_labels[nearest]
    return out


def prepare(workdir: Path, n_slices: int, structures: int) -> dict[str, Any]:
    """Write the CT series, the label map (.npy, and .nii.gz as TotalSegmentator holds it)."""
    import nibabel as nib

    from dicom_node.phantom import PhantomSpec, write_phantom_series
    from inference.volume import load_series_volume

    ct_dir = workdir / "ct"
    ct_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    phantom = write_phantom_series(
        ct_dir, PhantomSpec(rows=512, columns=512, slices=n_slices, pixel_spacing=(0.8, 0.8), slice_spacing=1.5)
    )
    t1 = time.perf_counter()
    labels = build_label_map(phantom, structures)
    t2 = time.perf_counter()
    volume = load_series_volume(phantom.files)
    uids = [s.sop_instance_uid for s in volume.slices]
    if uids != list(phantom.sop_instance_uids):
        raise SystemExit("volume slice order differs from the phantom's file order")
    files_in_order = [str(p) for p in phantom.files]
    np.save(workdir / "labels.npy", labels)
    # TotalSegmentator's writer takes the label map as its pipeline holds it: the array of
    # the NIfTI made from the DICOM by dicom2nifti, indexed [column, row reversed, slice]
    # (it transposes back and reverses the rows itself when ImageOrientationPatient[4] >= 0).
    # The affine is the CT's RAS affine (Volume.ras_affine) with the row axis reversed.
    ras = volume.ras_affine()
    flip = np.eye(4)
    flip[1, 1], flip[1, 3] = -1.0, labels.shape[1] - 1
    nifti = nib.Nifti1Image(np.ascontiguousarray(labels.transpose(2, 1, 0)[:, ::-1, :]), ras @ flip)
    nifti.set_data_dtype(np.uint8)
    nib.save(nifti, workdir / "labels.nii.gz")
    t3 = time.perf_counter()
    present = sorted(set(np.unique(labels).tolist()) - {0})
    counts = np.bincount(labels.ravel(), minlength=256)
    spans = [int(np.count_nonzero((labels == v).any(axis=(1, 2)))) for v in present]
    meta = {
        "slices": n_slices,
        "structures_asked": structures,
        "shape": list(labels.shape),
        "structures_present": len(present),
        "labelled_fraction": float(1 - counts[0] / labels.size),
        "binary_frames": int(sum(spans)),  # one BINARY frame per (structure, slice it appears on)
        "slices_per_structure": {"min": min(spans), "median": statistics.median(spans), "max": max(spans)},
        "voxels_per_structure": {
            "min": int(min(counts[v] for v in present)),
            "median": float(statistics.median(counts[v] for v in present)),
            "max": int(max(counts[v] for v in present)),
        },
        "classes": _total_classes(),
        "source_uids": uids,
        "files": files_in_order,
        "prepare_seconds": {"phantom": t1 - t0, "label_map": t2 - t1, "volume_and_files": t3 - t2},
    }
    (workdir / "meta.json").write_text(json.dumps(meta))
    return meta


# --------------------------------------------------------------------------- child: one writer


def _rss_mib() -> float:
    """Peak RSS so far (MiB). Linux keeps ru_maxrss across execve, so the parent that
    starts the children is kept small (the inputs are prepared in a child too)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _vm_hwm_mib() -> float:
    """VmHWM of this process (MiB): the peak RSS of this address space only (reset by exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return float("nan")


def child_run(writer: str, workdir: Path, out_path: Path, profile: Path | None, warm: bool) -> dict[str, Any]:
    meta = json.loads((workdir / "meta.json").read_text())
    classes = {int(k): v for k, v in meta["classes"].items()}  # TotalSegmentator's class_map["total"]
    warm_up_seconds = None
    if writer == "node-rtstruct":
        import pydicom

        from dicom_node.encode.rtstruct import encode_rtstruct
        from dicom_node.encode.seg import Algorithm
        from inference.volume import load_series_volume

        volume = load_series_volume([Path(f) for f in meta["files"]])
        sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in meta["files"]]
        labels = np.load(workdir / "labels.npy")
        algorithm = Algorithm("TotalSegmentator", "2.18.0", is_baseline=False)
        timings: dict[str, float] = {}

        def step() -> dict[str, int]:
            t0 = time.perf_counter()
            dataset = encode_rtstruct(volume, sources, labels, classes, algorithm)
            t1 = time.perf_counter()
            dataset.save_as(out_path, enforce_file_format=True)
            timings.update(encode=t1 - t0, save=time.perf_counter() - t1)
            return {}

    elif writer.startswith("node"):
        import pydicom

        from dicom_node.encode.seg import Algorithm, encode_segmentation, warm_up, write_segmentation

        if not writer.endswith("-nowarmup"):  # what an inference worker does once at start-up
            warm_up_seconds = warm_up()
        sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in meta["files"]]
        labels = np.load(workdir / "labels.npy")
        algorithm = Algorithm("TotalSegmentator", "2.18.0", is_baseline=False)
        kind = "BINARY" if "binary" in writer else "LABELMAP"
        compress = writer.endswith(("-rle", "-j2k"))
        timings = {}

        def step() -> dict[str, int]:
            t0 = time.perf_counter()
            encoded = encode_segmentation(
                sources, labels, classes, algorithm, segmentation_type=kind, compress=compress
            )
            t1 = time.perf_counter()
            write_segmentation(encoded.dataset, out_path)
            t2 = time.perf_counter()
            timings.update(encode=t1 - t0, save=t2 - t1)
            return encoded.segment_classes

    elif writer == "totalseg":
        import nibabel as nib
        import pydicom
        from totalsegmentator import dicom_io

        ct_dir = Path(meta["files"][0]).parent
        cache = {str(f): pydicom.dcmread(str(f)) for f in sorted(ct_dir.glob("*.dcm"))}
        real_dcmread = pydicom.dcmread

        def cached_dcmread(fp: Any, *args: Any, **kwargs: Any) -> Any:
            ds = cache.pop(str(fp), None)  # each file is read once by the writer
            return ds if ds is not None else real_dcmread(fp, *args, **kwargs)

        pydicom.dcmread = cached_dcmread
        image = nib.load(str(workdir / "labels.nii.gz"))
        img_data = np.asanyarray(image.dataobj)
        if img_data.dtype != np.uint8:
            raise SystemExit(f"NIfTI label map is {img_data.dtype}, expected uint8")
        affine = image.affine
        timings = {}

        def step() -> dict[str, int]:
            t0 = time.perf_counter()
            dicom_io.save_mask_as_dicomseg(img_data, classes, ct_dir, out_path, affine)
            timings.update(encode=time.perf_counter() - t0)
            return {}

    else:
        raise SystemExit(f"unknown writer {writer}")

    rss_before = _rss_mib()
    load = os.getloadavg()[0]
    if profile is not None:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        start = time.perf_counter()
        segment_classes = profiler.runcall(step)
        seconds = time.perf_counter() - start
        profiler.dump_stats(str(profile) + ".prof")
        with open(str(profile) + ".txt", "w") as fh:
            fh.write(f"{writer}: {seconds:.2f} s under cProfile\n\n")
            stats = pstats.Stats(profiler, stream=fh).strip_dirs()
            stats.sort_stats("tottime").print_stats(35)
            stats.sort_stats("cumulative").print_stats(45)
    else:
        start = time.perf_counter()
        segment_classes = step()
        seconds = time.perf_counter() - start
    peak_rss, vm_hwm, file_bytes, cold_steps = _rss_mib(), _vm_hwm_mib(), out_path.stat().st_size, dict(timings)
    seconds_warm = None
    if warm and profile is None and writer not in COLD_ONLY:
        # the same step again in the same process: what a long-lived worker pays from its
        # second job on (highdicom loads its DICOM standard tables on first use)
        import gc

        gc.collect()
        if writer == "totalseg":
            cache.update({str(f): real_dcmread(str(f)) for f in sorted(ct_dir.glob("*.dcm"))})
        start = time.perf_counter()
        step()
        seconds_warm = time.perf_counter() - start
    return {
        "writer": writer,
        "seconds": seconds,
        "steps": cold_steps,
        "seconds_warm": seconds_warm,
        "warm_up_seconds": warm_up_seconds,
        "steps_warm": timings if seconds_warm is not None else None,
        "peak_rss_mib": peak_rss,
        "vm_hwm_mib": vm_hwm,
        "rss_before_step_mib": rss_before,
        "file_bytes": file_bytes,
        "load_1min_at_start": load,
        "segment_classes": {str(k): int(v) for k, v in segment_classes.items()},
        "profiled": profile is not None,
    }


def child_verify(writer: str, workdir: Path, out_path: Path, segment_classes: dict[str, int]) -> dict[str, Any]:
    import highdicom as hd

    meta = json.loads((workdir / "meta.json").read_text())
    labels = np.load(workdir / "labels.npy")
    if writer == "node-rtstruct":
        return _verify_rtstruct(out_path, meta)
    t0 = time.perf_counter()
    seg = hd.seg.segread(str(out_path))
    decoded = seg.get_pixels_by_source_instance(meta["source_uids"], combine_segments=True, relabel=False)
    t1 = time.perf_counter()
    if segment_classes:
        mapping = {int(k): v for k, v in segment_classes.items()}
    else:  # TotalSegmentator: segment label = class name
        name = _by_name(_total_classes())
        mapping = {int(d.SegmentNumber): name[str(d.SegmentLabel)] for d in seg.SegmentSequence}
    lut = np.zeros(int(decoded.max()) + 1 if decoded.size else 1, dtype=np.uint8)
    for number, label in mapping.items():
        if number < len(lut):
            lut[number] = label
    restored = lut[decoded]
    mismatched = int(np.count_nonzero(restored != labels)) if restored.shape == labels.shape else -1
    return {
        "writer": writer,
        "sop_class": str(seg.SOPClassUID.name),
        "segmentation_type": str(seg.SegmentationType),
        "transfer_syntax": str(seg.file_meta.TransferSyntaxUID.name),
        "frames": int(seg.NumberOfFrames),
        "segments": len(seg.SegmentSequence),
        "decoded_shape": list(decoded.shape),
        "mismatched_voxels": mismatched,
        "equal": mismatched == 0,
        "decode_seconds": t1 - t0,
    }


def _verify_rtstruct(out_path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """One ROI per structure present, each with contours (contours are not rasterised back)."""
    import pydicom

    t0 = time.perf_counter()
    ds = pydicom.dcmread(out_path)
    contours = [len(item.get("ContourSequence", [])) for item in ds.ROIContourSequence]
    ok = len(ds.StructureSetROISequence) == meta["structures_present"] and all(contours)
    return {
        "writer": "node-rtstruct",
        "sop_class": str(ds.SOPClassUID.name),
        "segmentation_type": "-",
        "transfer_syntax": str(ds.file_meta.TransferSyntaxUID.name),
        "frames": 0,
        "segments": len(ds.StructureSetROISequence),
        "contours": sum(contours),
        "decoded_shape": [],
        "mismatched_voxels": None,
        "equal": ok,
        "check": "ROI count and contours present only",
        "decode_seconds": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------- py-spy summary

# (bucket, test on the stack). First match wins; a stack is "a;b;c" outermost first, as
# ``py-spy record -f raw`` writes it. Lines of the node's and TotalSegmentator's own
# functions are told apart by their source text.
PYSPY_RULES: list[tuple[str, Any]] = [
    (
        "node: pre-encoding the per-frame groups (fast_write)",
        lambda st, src: "fast_write.py" in st and "dcmwrite" not in st,
    ),
    (
        "save_as: pydicom correct_ambiguous_vr (every nested item)",
        lambda st, src: "dcmwrite" in st and "correct_ambiguous_vr" in st,
    ),
    ("save_as: pydicom element/sequence encoding", lambda st, src: "dcmwrite" in st),
    ("highdicom: decode lookup tables (_build_luts) at end of constructor", lambda st, src: "_build_luts" in st),
    ("highdicom: frame compression (encode_frame)", lambda st, src: "encode_frame" in st),
    (
        "highdicom: bit packing (pack_bits) / frame bytes",
        lambda st, src: "pack_bits" in st or "_encode_pixels_native" in st,
    ),
    (
        "highdicom: per-frame functional group items (_get_pffg_item)",
        lambda st, src: "_get_pffg_item" in st or "_add_segment_identification" in st,
    ),
    ("highdicom: per-segment mask of each plane (plane == n)", lambda st, src: "_get_segment_pixel_array" in st),
    (
        "highdicom: source images, plane positions, derivation items",
        lambda st, src: any(
            k in st
            for k in (
                "_prepare_spatial_metadata",
                "get_plane_positions",
                "_get_derivation",
                "get_image_position",
                "_check_source",
            )
        ),
    ),
    (
        "highdicom: DICOM standard tables (JSON on first use) / IOD checks",
        lambda st, src: "_standard_utils" in st or "json/decoder" in st,
    ),
    (
        "highdicom: frame loop, other (np.any per segment x plane, flatten, join)",
        lambda st, src: "_init_multiframe_image" in st,
    ),
    (
        "node: label values (np.unique / per-slice bincount)",
        lambda st, src: "np.unique" in src.get("seg.py", "") or "bincount" in src.get("seg.py", ""),
    ),
    ("node: relabel lookup[labels]", lambda st, src: "lookup[labels]" in src.get("seg.py", "")),
    (
        "node: segment descriptions",
        lambda st, src: "segment_descriptions (dicom_node" in st or "SegmentDescription.__init__" in st,
    ),
    (
        "totalseg: per-class mask img_data == class (117 full passes)",
        lambda st, src: "== class_idx" in src.get("dicom_io.py", ""),
    ),
    (
        "totalseg: per-class mask .sum() (117 full passes)",
        lambda st, src: "binary_mask.sum()" in src.get("dicom_io.py", ""),
    ),
    (
        "totalseg: np.unique / remap",
        lambda st, src: "unique" in src.get("dicom_io.py", "") or "remapped_image" in src.get("dicom_io.py", ""),
    ),
    ("highdicom: other constructor work", lambda st, src: "Segmentation.__init__" in st),
    ("totalseg: other (imports, tables, reorientation)", lambda st, src: "save_mask_as_dicomseg" in st),
    ("other", lambda st, src: True),
]


def summarise_pyspy(raw: Path, seconds: float | None = None) -> str:
    """Bucket the samples of the timed step (``step`` in ``child_run``) of a py-spy raw profile."""
    import linecache
    import re

    buckets: dict[str, int] = {}
    total = 0
    frame_re = re.compile(r"\((?P<file>[^():]+):(?P<line>\d+)\)$")
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if "step (seg_encoding.py" not in stack:
            continue
        n = int(count)
        total += n
        src: dict[str, str] = {}
        for frame in stack.split(";"):  # innermost line of seg.py / dicom_io.py
            m = frame_re.search(frame)
            if not m:
                continue
            name = Path(m["file"]).name
            if name in ("seg.py", "dicom_io.py"):
                path = REPO / m["file"] if name == "seg.py" else None
                if path is None:
                    from totalsegmentator import dicom_io

                    path = Path(dicom_io.__file__)
                src[name] = linecache.getline(str(path), int(m["line"])).strip()
        for bucket, test in PYSPY_RULES:
            if test(stack, src):
                buckets[bucket] = buckets.get(bucket, 0) + n
                break
    lines = [f"{raw.name}: {total} samples in the timed step" + (f" ({seconds:.2f} s)" if seconds else "")]
    for bucket, n in sorted(buckets.items(), key=lambda kv: -kv[1]):
        est = f"  ~{n / total * seconds:6.2f} s" if seconds else ""
        lines.append(f"  {100 * n / total:5.1f} %{est}  {bucket}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- parent


def wait_for_quiet(threshold: float = LOAD_THRESHOLD) -> dict[str, Any]:
    start = time.monotonic()
    first = os.getloadavg()[0]
    while True:
        load = os.getloadavg()[0]
        waited = time.monotonic() - start
        if load < threshold:
            return {"load_before_wait": first, "load_at_start": load, "waited_s": round(waited), "gave_up": False}
        if waited >= LOAD_MAX_WAIT_SECONDS:
            print(f"load {load:.2f} still >= {threshold} after {waited:.0f} s; timing anyway", flush=True)
            return {"load_before_wait": first, "load_at_start": load, "waited_s": round(waited), "gave_up": True}
        print(f"waiting for load < {threshold} (now {load:.2f}, waited {waited:.0f} s)", flush=True)
        time.sleep(LOAD_POLL_SECONDS)


def _run_child(args: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-u", str(Path(__file__).resolve()), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_SECONDS, cwd=REPO)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"child {' '.join(args)} failed with status {proc.returncode}")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise SystemExit(f"child {' '.join(args)} printed no result:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {"python": platform.python_version()}
    for pkg in (
        "highdicom",
        "pydicom",
        "numpy",
        "nibabel",
        "TotalSegmentator",
        "pylibjpeg-openjpeg",
        "pylibjpeg",
        "scipy",
    ):
        try:
            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - optional packages
            out[pkg] = "not installed"
    return out


def _machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "unknown"
    try:
        kb = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    git = {}
    try:
        git["head"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "dicom_node/encode", "inference"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout
        git["uncommitted_in_encode_or_inference"] = dirty.splitlines()
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "memory": mem, "kernel": platform.release(), "git": git}


def summarise(runs: list[dict[str, Any]], writers: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for w in writers:
        rs = [r for r in runs if r["writer"] == w]
        if not rs:
            continue
        summary[w] = {
            "seconds_median": statistics.median(r["seconds"] for r in rs),
            "seconds": [round(r["seconds"], 3) for r in rs],
            "peak_rss_mib_median": statistics.median(r["peak_rss_mib"] for r in rs),
            "vm_hwm_mib_median": statistics.median(r["vm_hwm_mib"] for r in rs),
            "rss_before_step_mib_median": statistics.median(r["rss_before_step_mib"] for r in rs),
            "file_bytes": statistics.median(r["file_bytes"] for r in rs),
        }
        warm_up = [r["warm_up_seconds"] for r in rs if r.get("warm_up_seconds") is not None]
        if warm_up:
            summary[w]["warm_up_seconds_median"] = statistics.median(warm_up)
        warm = [r["seconds_warm"] for r in rs if r.get("seconds_warm") is not None]
        if warm:
            summary[w]["seconds_warm_median"] = statistics.median(warm)
            summary[w]["seconds_warm"] = [round(v, 3) for v in warm]
    if REFERENCE in summary:
        ref = summary[REFERENCE]
        for w, s in summary.items():
            if w != REFERENCE:
                s["speedup_vs_totalseg"] = ref["seconds_median"] / s["seconds_median"]
                if "seconds_warm_median" in s and "seconds_warm_median" in ref:
                    s["speedup_vs_totalseg_warm"] = ref["seconds_warm_median"] / s["seconds_warm_median"]
                if w in GOALS:
                    s["goal"] = GOALS[w]
                    s["goal_met"] = s["speedup_vs_totalseg"] >= GOALS[w]
                    if "speedup_vs_totalseg_warm" in s:
                        s["goal_met_warm"] = s["speedup_vs_totalseg_warm"] >= GOALS[w]
    return summary


def _verdict(v: dict[str, Any]) -> str:
    if v.get("check"):  # RTSTRUCT
        return f"{v['segments']} ROIs, {v['contours']} contours: {'ok' if v['equal'] else 'NOT ok'} ({v['check']})"
    return "equal to input" if v["equal"] else f"MISMATCH {v['mismatched_voxels']}"


def print_table(summary: dict[str, Any], verify: dict[str, Any]) -> None:
    head = (
        f"{'writer':<22} {'cold s':>7} {'runs (s)':<20} {'warm s':>7} {'warm-up':>7} {'peak RSS':>9} {'(before)':>9} "
        f"{'file MiB':>9} {'x cold':>7} {'x warm':>7} {'goal':>5} {'decodes=input':>14}"
    )
    print(head)
    print("-" * len(head))
    for w, s in summary.items():
        runs = ", ".join(f"{v:.2f}" for v in s["seconds"])
        warm = f"{s['seconds_warm_median']:.2f}" if "seconds_warm_median" in s else "-"
        warm_up = f"{s['warm_up_seconds_median']:.2f}" if "warm_up_seconds_median" in s else "-"
        speed = f"{s['speedup_vs_totalseg']:.2f}" if "speedup_vs_totalseg" in s else "(ref)"
        speed_warm = (
            f"{s['speedup_vs_totalseg_warm']:.2f}"
            if "speedup_vs_totalseg_warm" in s
            else ("(ref)" if w == REFERENCE else "-")
        )
        goal = f">={s['goal']:g}" if "goal" in s else ""
        v = verify.get(w, {})
        ok = ("yes" if v.get("equal") else f"NO ({v.get('mismatched_voxels')})") if v else "n/a"
        if v.get("check"):
            ok = "ROIs ok" if v["equal"] else "ROIs NOT ok"
        print(
            f"{w:<22} {s['seconds_median']:>7.2f} {runs:<20} {warm:>7} {warm_up:>7} {s['peak_rss_mib_median']:>5.0f} MiB "
            f"{s['rss_before_step_mib_median']:>5.0f} MiB {s['file_bytes'] / 2**20:>9.1f} {speed:>7} {speed_warm:>7} {goal:>5} {ok:>14}"
        )
    print("cold: first encode in a fresh process (median of the rounds); warm: the same step again in that process;")
    print("warm-up: seg.warm_up() at the child's start-up, before and outside the timed step (none for -nowarmup);")
    print("peak RSS: ru_maxrss of the child after the cold step; (before): ru_maxrss just before it (inputs loaded);")
    print("x: TotalSegmentator's writer seconds / this writer's seconds.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300, help="CT slices (512 x 512, 0.8 mm, 1.5 mm apart)")
    parser.add_argument(
        "--structures", type=int, default=117, help="distinct TotalSegmentator 'total' classes (38-117)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds; every writer once per round, fresh process each"
    )
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "seg.json", help="JSON report")
    parser.add_argument(
        "--writers", default=",".join(DEFAULT_WRITERS), help=f"comma-separated subset of {','.join(WRITERS)}"
    )
    parser.add_argument(
        "--profile", type=Path, default=None, help="also run each writer once under cProfile; PREFIX-<writer>.txt/.prof"
    )
    parser.add_argument(
        "--pyspy",
        type=Path,
        default=None,
        help="also run each writer once under py-spy (raw, 200 Hz); PREFIX-<writer>.raw/.txt",
    )
    parser.add_argument(
        "--summarise-pyspy", type=Path, nargs="+", help="print the bucket summary of py-spy raw files and exit"
    )
    parser.add_argument("--no-warm", action="store_true", help="skip the second (warm) run of each writer in its child")
    parser.add_argument("--no-wait", action="store_true", help="do not wait for a quiet machine")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep inputs/outputs here (default: a temporary folder, removed)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--prepare-in", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--verify", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--segment-classes", help=argparse.SUPPRESS)
    parser.add_argument("--profile-to", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.summarise_pyspy:
        for raw in args.summarise_pyspy:
            print(summarise_pyspy(raw))
        return
    if args.prepare_in:
        meta = prepare(args.prepare_in, args.slices, args.structures)
        meta = {k: v for k, v in meta.items() if k not in ("source_uids", "files", "classes")}
        print("RESULT " + json.dumps(meta), flush=True)
        return
    if args.child:
        result = child_run(args.child, args.workdir, args.out, args.profile_to, not args.no_warm)
        print("RESULT " + json.dumps(result), flush=True)
        return
    if args.verify:
        result = child_verify(args.verify, args.workdir, args.out, json.loads(args.segment_classes or "{}"))
        print("RESULT " + json.dumps(result), flush=True)
        return

    writers = [w.strip() for w in args.writers.split(",") if w.strip()]
    unknown = set(writers) - set(WRITERS)
    if unknown:
        raise SystemExit(f"unknown writers: {sorted(unknown)}")
    keep = args.workdir is not None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="seg-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)
    try:
        print(f"preparing {args.slices} slices, {args.structures} structures in {workdir} ...", flush=True)
        inp = workdir / "input"
        previous = json.loads((inp / "meta.json").read_text()) if (inp / "meta.json").exists() else None
        if previous and previous["slices"] == args.slices and previous.get("structures_asked") == args.structures:
            meta = previous  # --workdir given again with the same input: reuse it
            print("reusing the input in", inp, flush=True)
        else:
            shutil.rmtree(inp, ignore_errors=True)
            # in a child, so this process stays small (children inherit its ru_maxrss)
            meta = _run_child(
                ["--prepare-in", str(inp), "--slices", str(args.slices), "--structures", str(args.structures)]
            )
        print(
            f"label map {meta['shape']}: {meta['structures_present']} structures, "
            f"{100 * meta['labelled_fraction']:.1f} % of voxels labelled, {meta['binary_frames']} BINARY frames, "
            f"slices per structure {meta['slices_per_structure']}",
            flush=True,
        )
        load_info = {} if args.no_wait else wait_for_quiet()
        runs: list[dict[str, Any]] = []
        outputs: dict[str, tuple[Path, dict[str, int]]] = {}
        for r in range(args.repeats):
            order = writers[r % len(writers) :] + writers[: r % len(writers)]
            for w in order:
                out_path = workdir / "out" / f"{w}-{r}.dcm"
                out_path.parent.mkdir(exist_ok=True)
                res = _run_child(
                    ["--child", w, "--workdir", str(inp), "--out", str(out_path)]
                    + (["--no-warm"] if args.no_warm else [])
                )
                res["round"] = r
                runs.append(res)
                warm_s = f" (warm {res['seconds_warm']:.2f} s)" if res.get("seconds_warm") is not None else ""
                if res.get("warm_up_seconds") is not None:
                    warm_s += f" (start-up warm-up {res['warm_up_seconds']:.2f} s, not timed)"
                print(
                    f"round {r + 1} {w:<22} {res['seconds']:8.2f} s{warm_s}  peak RSS {res['peak_rss_mib']:7.0f} MiB  "
                    f"{res['file_bytes'] / 2**20:8.1f} MiB  load {res['load_1min_at_start']:.2f}",
                    flush=True,
                )
                if w in outputs:
                    out_path.unlink()  # keep the first round's file only (disk)
                else:
                    outputs[w] = (out_path, res["segment_classes"])
        verify: dict[str, Any] = {}
        for w, (path, seg_classes) in outputs.items():
            v = _run_child(
                ["--verify", w, "--workdir", str(inp), "--out", str(path), "--segment-classes", json.dumps(seg_classes)]
            )
            verify[w] = v
            print(
                f"verify {w:<22} {v['sop_class']}, {v['segmentation_type']}, {v['transfer_syntax']}, "
                f"{v['frames']} frames, {v['segments']} segments: "
                f"{_verdict(v)} "
                f"(decode {v['decode_seconds']:.1f} s)",
                flush=True,
            )
        profiles = {}
        if args.profile is not None:
            args.profile.parent.mkdir(parents=True, exist_ok=True)
            for w in writers:
                prefix = Path(f"{args.profile}-{w}")
                res = _run_child(
                    [
                        "--child",
                        w,
                        "--workdir",
                        str(inp),
                        "--out",
                        str(workdir / "out" / f"{w}-prof.dcm"),
                        "--profile-to",
                        str(prefix),
                    ]
                )
                (workdir / "out" / f"{w}-prof.dcm").unlink()
                profiles[w] = {"seconds_under_cprofile": res["seconds"], "report": str(prefix) + ".txt"}
                print(f"profiled {w}: {res['seconds']:.2f} s under cProfile -> {prefix}.txt", flush=True)
        if args.pyspy is not None:
            args.pyspy.parent.mkdir(parents=True, exist_ok=True)
            py_spy = Path(sys.executable).parent / "py-spy"
            for w in writers:
                raw = Path(f"{args.pyspy}-{w}.raw")
                out_path = workdir / "out" / f"{w}-pyspy.dcm"
                cmd = [
                    str(py_spy),
                    "record",
                    "--nonblocking",
                    "-r",
                    "200",
                    "-f",
                    "raw",
                    "-o",
                    str(raw),
                    "--",
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--child",
                    w,
                    "--workdir",
                    str(inp),
                    "--out",
                    str(out_path),
                    "--no-warm",
                ]
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_SECONDS, cwd=REPO)
                out_path.unlink(missing_ok=True)
                result = next((json.loads(x[7:]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if proc.returncode != 0 or result is None or not raw.exists():
                    print(f"py-spy run of {w} failed: {proc.stderr[-2000:]}", flush=True)
                    continue
                text = summarise_pyspy(raw, result["seconds"])
                Path(f"{args.pyspy}-{w}.txt").write_text(text + "\n")
                profiles[f"pyspy:{w}"] = {"seconds": result["seconds"], "summary": text.splitlines()}
                print(text, flush=True)
        summary = summarise(runs, writers)
        print()
        print_table(summary, verify)
        print()
        for w in GOALS:
            if w in summary and "speedup_vs_totalseg" in summary[w]:
                s = summary[w]
                warm = (
                    f"; warm {s['speedup_vs_totalseg_warm']:.2f}x ({'met' if s['goal_met_warm'] else 'NOT met'})"
                    if "speedup_vs_totalseg_warm" in s
                    else ""
                )
                print(
                    f"{w}: {s['speedup_vs_totalseg']:.2f}x faster than TotalSegmentator's writer, cold "
                    f"(goal >= {s['goal']:g}x: {'met' if s['goal_met'] else 'NOT met'}){warm}"
                )
        meta_out = {k: v for k, v in meta.items() if k not in ("source_uids", "files", "classes")}
        report = {
            "benchmark": "seg_encoding",
            "started_utc": started.isoformat(timespec="seconds"),
            "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "arguments": {
                "slices": args.slices,
                "structures": args.structures,
                "repeats": args.repeats,
                "writers": writers,
            },
            "input": meta_out,
            "load": load_info,
            "machine": _machine(),
            "versions": _versions(),
            "timed_step": {
                "node-* (SEG)": "encode_segmentation(...) + write_segmentation(dataset, path); source headers and label map "
                "read before; warm_up() called once at child start-up before that (a worker's start-up), except -nowarmup",
                "node-rtstruct": "encode_rtstruct(...) + save_as(path, enforce_file_format=True); volume and headers read before",
                "totalseg": "save_mask_as_dicomseg(...) whole call; its dcmread of the source files served from a cache filled before",
            },
            "summary": summary,
            "verify": verify,
            "runs": runs,
            "profiles": profiles,
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.output}")
        if any(not v["equal"] for v in verify.values()):
            raise SystemExit("some output did not decode back to the input label map")
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
