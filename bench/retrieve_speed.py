#!/usr/bin/env python
"""Retrieve speed: a C-MOVE of one series from the node against the same C-MOVE from Orthanc, on loopback.

One synthetic CT series (uncompressed, ``--rows`` x ``--columns``, ``--slices`` slices; small images by default,
where the cost per message shows) is stored in the node (``dicom-node serve`` from ``--code``, default this
checkout) and in Orthanc (Debian's package, the reference PACS). DCMTK ``movescu`` then asks each to move the
series to a DCMTK ``storescp`` (a fresh folder each time), alternately (Orthanc, node, Orthanc, node, ...) for
``--repeats`` rounds, with the destination run twice per round: as DCMTK runs by default, and with
``TCP_NODELAY=1`` (DCMTK's switch for Nagle's algorithm). Each figure is the wall time of the ``movescu``
process; every move must deliver all the instances.

Usage::

    .venv/bin/python bench/retrieve_speed.py                              # this checkout
    .venv/bin/python bench/retrieve_speed.py --code /tmp/older-checkout   # another version of the node
    .venv/bin/python bench/retrieve_speed.py --slices 300 --repeats 3 --output bench/results/retrieve.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dicom_node.phantom import PhantomSpec, write_phantom_series  # noqa: E402
from tests.conftest import Orthanc, free_port, wait_for  # noqa: E402

NODE_CONFIG = """\
network: {{ae_title: DICOMNODE, host: 127.0.0.1, port: {port}}}
peers:
  local: {{hosts: [127.0.0.1], roles: [store, echo, find, move, get]}}
  dest: {{ae_title: DEST, hosts: [127.0.0.1], roles: [store, echo], host: 127.0.0.1, port: {destination}}}
storage: {{directory: {storage}, fsync: true}}
destinations: {{}}
models: {{baseline: {{kind: threshold}}}}
inference: {{workers: 0}}
rules: [{{name: everything-else, action: ignore}}]
logging: {{level: INFO, format: text}}
"""


def start_node(code: Path, folder: Path, port: int, destination: int) -> subprocess.Popen[bytes]:
    """``dicom-node serve`` of the checkout ``code``, ready."""
    folder.mkdir(parents=True)
    config = folder / "config.yaml"
    config.write_text(NODE_CONFIG.format(port=port, destination=destination, storage=folder / "storage"))
    log = folder / "serve.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "dicom_node", "serve", "--config", str(config)],
        cwd=code,
        env={**os.environ, "PYTHONPATH": str(code)},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    wait_for(lambda: "node.ready" in log.read_text(errors="replace"), timeout=120, what="the node to be ready")
    return process


def timed_move(called_ae: str, port: int, series_uid: str, destination: int, folder: Path, no_delay: bool) -> float:
    """Seconds for ``movescu`` to move the series to a fresh ``storescp``; every instance must arrive."""
    folder.mkdir(parents=True)
    env = {key: value for key, value in os.environ.items() if key != "TCP_NODELAY"}
    if no_delay:
        env["TCP_NODELAY"] = "1"
    receiver = subprocess.Popen(["storescp", "-aet", "DEST", "-od", str(folder), str(destination)], env=env)
    try:
        time.sleep(0.5)
        start = time.perf_counter()
        command = ["movescu", "-aet", "LOCAL", "-aec", called_ae, "-aem", "DEST", "127.0.0.1", str(port)]
        command += ["-k", "QueryRetrieveLevel=SERIES", "-k", f"SeriesInstanceUID={series_uid}"]
        subprocess.run(command, check=True, capture_output=True)
        return time.perf_counter() - start
    finally:
        receiver.terminate()
        receiver.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout of the node to run")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--columns", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="retrieve-speed-") as scratch:
        work = Path(scratch)
        spec = PhantomSpec(rows=args.rows, columns=args.columns, slices=args.slices, noise_sd=0.0)
        series = write_phantom_series(work / "series", spec)
        destination = free_port()
        node_port = free_port()
        modalities = {"DEST": ["DEST", "127.0.0.1", destination], "LOCAL": ["LOCAL", "127.0.0.1", free_port()]}
        orthanc = Orthanc(work / "orthanc", modalities).start()
        node = start_node(args.code.resolve(), work / "node", node_port, destination)
        try:
            for path in series.files:
                orthanc.upload(path)
            subprocess.run(
                ["storescu", "-aet", "LOCAL", "-aec", "DICOMNODE", "127.0.0.1", str(node_port)]
                + [str(path) for path in series.files],
                check=True,
                capture_output=True,
                env={**os.environ, "TCP_NODELAY": "1"},
            )
            times: dict[str, list[float]] = {}
            moves = 0
            for round_number in range(args.repeats):
                for no_delay in (False, True):
                    for name, called, port in (
                        ("orthanc", "ORTHANC", orthanc.dicom_port),
                        ("node", "DICOMNODE", node_port),
                    ):
                        folder = work / f"dest-{moves}"
                        moves += 1
                        seconds = timed_move(called, port, series.series_instance_uid, destination, folder, no_delay)
                        arrived = sum(1 for path in folder.rglob("*") if path.is_file())
                        if arrived != args.slices:
                            print(f"{name}: {arrived} of {args.slices} instances arrived", file=sys.stderr)
                            return 1
                        key = f"{name}, destination {'TCP_NODELAY=1' if no_delay else 'default'}"
                        times.setdefault(key, []).append(seconds)
                        print(f"round {round_number + 1}: {key}: {seconds:.2f} s", flush=True)
        finally:
            node.terminate()
            node.wait(timeout=60)
            orthanc.stop()
    summary = {key: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v)} for key, v in times.items()}
    for mode in ("default", "TCP_NODELAY=1"):
        node_median = summary[f"node, destination {mode}"]["median_s"]
        reference = summary[f"orthanc, destination {mode}"]["median_s"]
        print(
            f"destination {mode}: node {node_median:.2f} s, Orthanc {reference:.2f} s, ratio {node_median / reference:.2f}"
        )
    if args.output:
        args.output.write_text(
            json.dumps({"slices": args.slices, "rows": args.rows, "times": times, "summary": summary}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
