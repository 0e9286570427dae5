#!/usr/bin/env python
"""Receive throughput: the node's Storage SCP against DCMTK storescp, on loopback.

One synthetic CT series (uncompressed, 512x512, ``--slices`` slices) is sent with
DCMTK ``storescu +sd`` to

* the reference, DCMTK ``storescp -od DIR`` (writes files, no fsync), and
* the node, ``dicom-node serve`` (writes every instance atomically, fsyncs it
  unless ``--no-fsync``, records it in SQLite, then answers success),

alternately (ref, node, ref, node, ...) for ``--repeats`` rounds. Each timed
figure is the wall time of the whole ``storescu`` process (start to exit),
``TCP_NODELAY=1`` set for storescu and storescp. The node is restarted on an
empty storage directory before each timed send so that every repeat stores
``--slices`` new instances; after the timed send the same series is sent once
more to the still-running node and timed separately as the "duplicate resend"
(every instance is then already on disk and in the database).

With ``--floor`` (default on) each round also times two bare SCPs whose C-STORE
handler answers success at once without storing anything, both built with the
node's own ``build_ae``:

* plain pynetdicom (``ae.start_server``, its polling reactors with a 0.2 ms DUL
  poll): pynetdicom's ceiling on this machine, the issue's reference;
* the node's own server (``start_guarded_server``: guarded PDU reader, reactors
  that sleep until there is work, C-STORE responses encoded directly): the most
  the node could reach whatever its storage path does.

With ``--concurrent N`` (default 10) each round then also times N senders at once: N
``storescu`` processes, each with its own association and its own series of
``--concurrent-slices`` slices, against storescp (plain, which serves one association
at a time, and ``--fork``, one process per association), the node (``receive.processes``
as configured, ``--node-processes`` to set it) and the two bare SCPs (one process each). The figure is
the wall time from starting the first sender until the last one exits. Every node start
waits for its ``node.ready`` log line, so receiving processes that are still starting are
not timed.

With ``--one-by-one N`` each round also sends the series' first N slices one association
per image: one ``storescu`` process per file, one after another (as senders that open an
association per instance do), to storescp, a fresh node and the bare SCPs. The figure is
the wall time from the first storescu start until the last one exits; it includes N
storescu starts, the same for every receiver.

The node is configured with ``inference: {workers: 0}`` (when the configuration
has that section) so no inference worker process starts up during the timed
send; ``--node-workers N`` changes that.

Usage::

    .venv/bin/python bench/receive_throughput.py                       # fsync on
    .venv/bin/python bench/receive_throughput.py --no-fsync            # fsync off
    .venv/bin/python bench/receive_throughput.py --slices 300 --repeats 5 --output bench/results/x.json
    .venv/bin/python bench/receive_throughput.py --profile bench/results/profile.txt   # + py-spy
    .venv/bin/python bench/receive_throughput.py --summarise-profile bench/results/profile.txt

Exit status is non-zero (with a message) if any send fails or any receiver
stored a different number of files than were sent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
# Full paths: the venv also holds pynetdicom's own "storescu"/"storescp" apps.
DCMTK_STORESCU = shutil.which("storescu", path="/usr/bin:/usr/local/bin") or "storescu"
DCMTK_STORESCP = shutil.which("storescp", path="/usr/bin:/usr/local/bin") or "storescp"
DICOM_NODE = str(VENV_BIN / "dicom-node") if (VENV_BIN / "dicom-node").exists() else "dicom-node"
PY_SPY = os.environ.get("PY_SPY") or (str(VENV_BIN / "py-spy") if (VENV_BIN / "py-spy").exists() else "py-spy")
"""py-spy for --profile: $PY_SPY, else the venv's, else the one on PATH."""

HOST = "127.0.0.1"
PORT_RANGE = (20000, 30000)
CALLING_AE = "BENCH"
REFERENCE_AE = "STORESCP"
NODE_AE = "DICOMNODE"
START_TIMEOUT_SECONDS = 30.0
SEND_TIMEOUT_SECONDS = 900.0


class BenchError(RuntimeError):
    """A run did not do what it must (send failed, files missing); the figures would be meaningless."""


# --------------------------------------------------------------------------- helpers


def free_port(exclude: set[int] = frozenset()) -> int:  # type: ignore[assignment]
    """A loopback TCP port in PORT_RANGE that nobody listens on now."""
    candidates = list(range(*PORT_RANGE))
    random.shuffle(candidates)
    for port in candidates:
        if port in exclude:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((HOST, port))
            except OSError:
                continue
            return port
    raise BenchError(f"no free port in {PORT_RANGE}")


def wait_for_port(
    port: int, process: subprocess.Popen[bytes], what: str, timeout: float = START_TIMEOUT_SECONDS
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"{what} exited with status {process.returncode} before listening on port {port}")
        try:
            with socket.create_connection((HOST, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"{what} did not accept connections on port {port} within {timeout:.0f} s")


def stop(process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def nodelay_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def send_series(series_dir: Path, called_ae: str, port: int, log: Path) -> float:
    """Run ``storescu +sd`` once; returns its wall time in seconds. Raises if it fails."""
    command = [DCMTK_STORESCU, "+sd", "-aet", CALLING_AE, "-aec", called_ae, HOST, str(port), str(series_dir)]
    with open(log, "ab") as out:
        start = time.perf_counter()
        result = subprocess.run(
            command, env=nodelay_env(), stdout=out, stderr=subprocess.STDOUT, timeout=SEND_TIMEOUT_SECONDS
        )
        elapsed = time.perf_counter() - start
    if result.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise BenchError(f"storescu to {called_ae} exited with status {result.returncode}; log {log}:\n{tail}")
    return elapsed


def send_concurrently(series_dirs: list[Path], called_ae: str, port: int, log: Path) -> float:
    """One ``storescu +sd`` process (own association) per folder, all at once; wall time until the last exits."""
    command = [DCMTK_STORESCU, "+sd", "-aet", CALLING_AE, "-aec", called_ae, HOST, str(port)]
    with open(log, "ab") as out:
        start = time.perf_counter()
        senders = [
            subprocess.Popen([*command, str(folder)], env=nodelay_env(), stdout=out, stderr=subprocess.STDOUT)
            for folder in series_dirs
        ]
        codes = [sender.wait(timeout=SEND_TIMEOUT_SECONDS) for sender in senders]
        elapsed = time.perf_counter() - start
    if any(codes):
        tail = log.read_text(errors="replace")[-2000:]
        raise BenchError(f"a storescu to {called_ae} exited with status {max(codes)}; log {log}:\n{tail}")
    return elapsed


@dataclass(frozen=True)
class OneByOne:
    """Files sent by one ``storescu`` process each, so one association per image, one after another."""

    files: list[Path]


def send_one_by_one(target: OneByOne, called_ae: str, port: int, log: Path) -> float:
    """Wall time from the first ``storescu`` start until the last one exits."""
    start = time.perf_counter()
    for file in target.files:
        send_series(file, called_ae, port, log)
    return time.perf_counter() - start


SendTarget = Path | list[Path] | OneByOne
"""A series folder (one storescu), folders sent at once (one storescu each), or files one association each."""


def send(target: SendTarget, called_ae: str, port: int, log: Path) -> float:
    if isinstance(target, OneByOne):
        return send_one_by_one(target, called_ae, port, log)
    if isinstance(target, list):
        return send_concurrently(target, called_ae, port, log)
    return send_series(target, called_ae, port, log)


def count_files(folder: Path, pattern: str = "*") -> int:
    return sum(1 for p in folder.rglob(pattern) if p.is_file())


def cpu_seconds_of_tree(pid: int) -> float:
    """User + system CPU seconds used so far by a live process and its live descendants (every thread)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
        except (OSError, ValueError, IndexError):
            continue  # ended meanwhile
    return total


def idle_core_seconds() -> float:
    """Core-seconds the whole machine has spent idle or waiting for I/O since boot (``/proc/stat``)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    return (int(fields[3]) + int(fields[4])) / os.sysconf("SC_CLK_TCK")


def peak_rss_kib(pid: int) -> int | None:
    """VmHWM (peak resident set size) of a live process, KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def machine_info() -> dict[str, Any]:
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import pynetdicom

        pynetdicom_version = pynetdicom.__version__
    except ImportError:  # pragma: no cover
        pynetdicom_version = None
    try:
        import pydicom

        pydicom_version = pydicom.__version__
    except ImportError:  # pragma: no cover
        pydicom_version = None
    version = subprocess.run([DCMTK_STORESCU, "--version"], capture_output=True, text=True)
    first_line = next((line for line in version.stdout.splitlines() if line.strip()), "").strip()
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    return {
        "nproc": int(nproc) if nproc.isdigit() else os.cpu_count(),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "pynetdicom": pynetdicom_version,
        "pydicom": pydicom_version,
        "storescu_version": first_line,
        "storescu": DCMTK_STORESCU,
        "storescp": DCMTK_STORESCP,
    }


def summarise(seconds: list[float], images: int) -> dict[str, Any]:
    median = statistics.median(seconds)
    return {
        "seconds": [round(s, 4) for s in seconds],
        "median_seconds": round(median, 4),
        "min_seconds": round(min(seconds), 4),
        "max_seconds": round(max(seconds), 4),
        "images_per_second": round(images / median, 2),
    }


def rate_ratio(numerator: dict[str, Any] | None, denominator: dict[str, Any] | None) -> float | None:
    """One receiver's images per second over another's (two :func:`summarise` results); None if either was not timed."""
    if not numerator or not denominator:
        return None
    return round(numerator["images_per_second"] / denominator["images_per_second"], 3)


# --------------------------------------------------------------------------- receivers


class Reference:
    """DCMTK storescp, started once; its output folder is emptied before each send."""

    def __init__(self, work: Path, port: int, *, fork: bool = False) -> None:
        self.port = port
        self.fork = fork  # --fork: one child process per association (storescp's own way to use several cores)
        self.out_dir = work / ("storescp-fork-out" if fork else "storescp-out")
        self.out_dir.mkdir()
        self.log = work / ("storescp-fork.log" if fork else "storescp.log")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [
            DCMTK_STORESCP,
            *(["--fork"] if self.fork else []),
            "-aet",
            REFERENCE_AE,
            "-od",
            str(self.out_dir),
            str(self.port),
        ]
        self.process = subprocess.Popen(
            command, env=nodelay_env(), stdout=open(self.log, "ab"), stderr=subprocess.STDOUT
        )
        wait_for_port(self.port, self.process, "storescp")

    def run(self, series_dir: SendTarget, expected: int, send_log: Path) -> float:
        assert self.process is not None
        for child in self.out_dir.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
        seconds = send(series_dir, REFERENCE_AE, self.port, send_log)
        if not isinstance(series_dir, Path):
            time.sleep(0.5)  # --fork children may still be closing their last file
        received = count_files(self.out_dir)
        if received != expected:
            raise BenchError(f"storescp stored {received} files, expected {expected} (folder {self.out_dir})")
        return seconds

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)


class Node:
    """``dicom-node serve`` on a fresh storage directory for every run."""

    def __init__(
        self, work: Path, port: int, *, fsync: bool, workers: int | None, processes: int | None = None
    ) -> None:
        self.port = port
        self.work = work
        self.data_dir = work / "node-data"
        self.config = work / "node-config.yaml"
        self.log = work / "node.log"
        self.fsync = fsync
        storage = f"{{directory: {self.data_dir}}}" if fsync else f"{{directory: {self.data_dir}, fsync: false}}"
        self.config.write_text(
            f"network: {{ae_title: {NODE_AE}, host: {HOST}, port: {port}, maximum_associations: 32, maximum_associations_per_host: 32}}\n"
            f"storage: {storage}\n"
            "completion: {quiet_seconds: 600}\n"
            "rules: []\n"
            "logging: {level: INFO}\n"  # INFO: node.ready says when every receiving process listens
            + (f"inference: {{workers: {workers}}}\n" if workers is not None else "")
            + (f"receive: {{processes: {processes}}}\n" if processes is not None else ""),
            encoding="utf-8",
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, command: list[str] | None = None) -> None:
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
        starts = self.ready_lines()
        self.process = subprocess.Popen(
            command or [DICOM_NODE, "serve", "--config", str(self.config)],
            cwd=self.work,
            env=env,
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port, self.process, "dicom-node serve")
        self.wait_until_ready(starts)

    def ready_lines(self) -> int:
        return self.log.read_text(errors="replace").count("node.ready") if self.log.exists() else 0

    def wait_until_ready(self, earlier: int, timeout: float = 120.0) -> None:
        """Until this start's ``node.ready`` line: the port may accept before every receiving process listens."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while self.ready_lines() <= earlier:
            if self.process.poll() is not None:
                raise BenchError(f"dicom-node serve exited with status {self.process.returncode}; log {self.log}")
            if time.monotonic() > deadline:
                raise BenchError(f"dicom-node serve was not ready within {timeout:.0f} s; log {self.log}")
            time.sleep(0.05)

    def check_stored(self, expected: int) -> None:
        stored = count_files(self.data_dir / "instances", "*.dcm")
        if stored != expected:
            raise BenchError(f"the node stored {stored} instance files, expected {expected} (folder {self.data_dir})")
        if self.process is not None and self.process.poll() is not None:
            raise BenchError(f"the node exited with status {self.process.returncode} during the run; log {self.log}")

    def run(self, series_dir: Path, expected: int, send_log: Path, *, duplicate: bool) -> dict[str, Any]:
        self.start()
        assert self.process is not None
        try:
            cpu_before = cpu_seconds_of_tree(self.process.pid)
            seconds = send_series(series_dir, NODE_AE, self.port, send_log)
            cpu = cpu_seconds_of_tree(self.process.pid) - cpu_before
            self.check_stored(expected)
            result: dict[str, Any] = {
                "seconds": seconds,
                "peak_rss_kib": peak_rss_kib(self.process.pid),
                "cpu_ms_per_image": round(1000 * cpu / expected, 3),
            }
            if duplicate:
                result["duplicate_seconds"] = send_series(series_dir, NODE_AE, self.port, send_log)
                self.check_stored(expected)
                result["peak_rss_kib_after_duplicate"] = peak_rss_kib(self.process.pid)
            return result
        finally:
            stop(self.process)
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def run_fresh(self, target: list[Path] | OneByOne, expected: int, send_log: Path) -> dict[str, Any]:
        """A fresh node; every folder sent at once, each on its own association (or files one association each)."""
        self.start()
        assert self.process is not None
        try:
            cpu_before, idle_before = cpu_seconds_of_tree(self.process.pid), idle_core_seconds()
            seconds = send(target, NODE_AE, self.port, send_log)
            cpu = cpu_seconds_of_tree(self.process.pid) - cpu_before
            idle = idle_core_seconds() - idle_before
            self.check_stored(expected)
            return {
                "seconds": seconds,
                "peak_rss_kib": peak_rss_kib(self.process.pid),
                "cpu_ms_per_image": round(1000 * cpu / expected, 3),
                "machine_idle_fraction": round(idle / (seconds * (os.cpu_count() or 1)), 3),
            }
        finally:
            stop(self.process)
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def stage_timing(self, series_dir: Path, expected: int, send_log: Path) -> dict[str, Any]:
        """One extra send to a node whose C-STORE handler stages are wrapped in timers."""
        out = self.work / "stages.json"
        out.unlink(missing_ok=True)
        self.start([sys.executable, str(Path(__file__).resolve()), "--serve-node-timed", str(self.config), str(out)])
        assert self.process is not None
        try:
            seconds = send_series(series_dir, NODE_AE, self.port, send_log)
            self.check_stored(expected)
        finally:
            stop(self.process)
            shutil.rmtree(self.data_dir, ignore_errors=True)
        if not out.exists():
            raise BenchError(f"the timed node wrote no stage timings; log {self.log}")
        stages = json.loads(out.read_text())
        return {"seconds_while_timed": round(seconds, 4), "stages": stages}

    def profile(self, series_dir: Path, expected: int, send_log: Path, out: Path, rate: int) -> dict[str, Any]:
        """One extra, untimed-for-the-table send with py-spy sampling the serve process."""
        self.start()
        assert self.process is not None
        out.parent.mkdir(parents=True, exist_ok=True)
        spy = subprocess.Popen(
            [
                PY_SPY,
                "record",
                "--nonblocking",
                *([] if os.environ.get("PROFILE_ON_CPU_ONLY") else ["--idle"]),
                "--threads",
                "--subprocesses",  # the receiving processes (receive.processes) are children of serve
                "-r",
                str(rate),
                "-f",
                "raw",
                "-o",
                str(out),
                "--pid",
                str(self.process.pid),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.work / "py-spy.log", "ab"),
        )
        try:
            time.sleep(1.0)  # let py-spy attach before the first association
            seconds = send_series(series_dir, NODE_AE, self.port, send_log)
            self.check_stored(expected)
        finally:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                spy.wait(timeout=60)
            except subprocess.TimeoutExpired:
                spy.kill()
            stop(self.process)
            shutil.rmtree(self.data_dir, ignore_errors=True)
        return {"seconds_while_profiled": round(seconds, 4), "raw_output": str(out), "rate_hz": rate}


FLOOR_KINDS: dict[str, tuple[str, str]] = {
    "floor": ("bare pynetdicom", "--serve-floor"),
    "reactor_floor": ("bare, node's reactors", "--serve-floor-reactors"),
    "durable_floor": ("durable writes only", "--serve-floor-durable"),
}
"""Each bare SCP: its key (in the results and the send logs' names), its name, and the option that serves it."""


class Floor:
    """A bare SCP: plain pynetdicom or the node's own server, answering at once (``floor``, ``reactor_floor``), or
    the node's server writing each data set durably with the node's storage code and nothing else (``durable_floor``).
    """

    def __init__(self, work: Path, port: int, key: str = "floor", *, fsync: bool = True) -> None:
        self.port = port
        self.key = key
        self.fsync = fsync
        """For the durable floor: write as the node does with ``storage.fsync`` on (else as with it off)."""
        self.name, self._option = FLOOR_KINDS[key]
        self.log = work / f"{key}.log"
        self.data = work / f"{key}-data"
        """Where the durable floor writes (emptied at each start and at stop)."""
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        shutil.rmtree(self.data, ignore_errors=True)
        extra = [str(self.data), "fsync" if self.fsync else "no-fsync"] if self.key == "durable_floor" else []
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), self._option, str(self.port), *extra],
            cwd=REPO,
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port, self.process, "bare pynetdicom SCP")

    def run(self, series_dir: SendTarget, send_log: Path) -> float:
        seconds = send(series_dir, NODE_AE, self.port, send_log)
        if self.process is not None and self.process.poll() is not None:
            raise BenchError(f"the bare pynetdicom SCP exited during the run; log {self.log}")
        return seconds

    def timed_run(self, series_dir: Path, send_log: Path, images: int) -> tuple[float, float]:
        """One send: its wall seconds and this SCP's CPU milliseconds per image."""
        assert self.process is not None
        cpu_before = cpu_seconds_of_tree(self.process.pid)
        seconds = self.run(series_dir, send_log)
        return seconds, round(1000 * (cpu_seconds_of_tree(self.process.pid) - cpu_before) / images, 3)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
        shutil.rmtree(self.data, ignore_errors=True)


FLOOR_POLL_SECONDS = 0.0002
"""The plain pynetdicom floor's DUL poll delay (pynetdicom's default is 1 ms): what the node used until its
reactors stopped polling, so the floor stays what it was in earlier reports."""


def serve_floor(port: int, reactors: bool = False, durable_dir: str | None = None, fsync: bool = True) -> int:
    """The --floor receivers: answer every C-STORE with success, keeping nothing or (``durable_dir``) a durable file.

    Plain pynetdicom (``ae.start_server``, polling reactors), or with ``reactors`` the node's
    own server (``start_guarded_server``: guarded PDU reader, reactors that sleep until there is work,
    C-STORE responses encoded directly). With ``durable_dir`` (always the node's server), each data set is
    written before the answer exactly as the node writes it (``InstanceStore.write``: an ``O_DSYNC`` write
    into a spare file, the rename into place, the folder's fsync), under a new name each time, and nothing
    else: no header check, no journal, no database. What a receiver keeping the node's promise
    "acknowledged means on disk" cannot do without, on this disk (``fsync=False``: as the node with
    ``storage.fsync: false``).
    """
    import itertools
    import threading

    from pynetdicom import evt

    sys.path.insert(0, str(REPO))
    from dicom_node.config import NetworkSettings
    from dicom_node.receive import scp
    from dicom_node.receive.storage import InstanceStore, encode_file_meta

    store = InstanceStore(Path(durable_dir), fsync=fsync) if durable_dir else None
    names = itertools.count()

    def on_store(event: Any) -> int:
        encoded = event.request.DataSet.getvalue()  # the node's handler starts with this copy too
        if store is not None:
            request = event.request
            file_meta = encode_file_meta(
                request.AffectedSOPClassUID,
                request.AffectedSOPInstanceUID,
                event.context.transfer_syntax,
                event.assoc.requestor.ae_title,
            )
            store.write(store.instances_dir / "floor" / f"{next(names)}.dcm", file_meta, encoded)
        return 0x0000

    def on_open(event: Any) -> None:
        getattr(scp, "_on_connection_open", lambda _: None)(event)  # TCP_NODELAY
        if not reactors:
            event.assoc.dul._run_loop_delay = FLOOR_POLL_SECONDS

    network = NetworkSettings(
        ae_title=NODE_AE, host=HOST, port=port, maximum_associations=64, maximum_associations_per_host=64
    )
    ae = scp.build_ae(network)
    ae.maximum_associations = 64
    handlers: list[Any] = [(evt.EVT_C_STORE, on_store), (evt.EVT_CONN_OPEN, on_open)]
    if reactors or store is not None:
        from dicom_node.security import start_guarded_server

        server = start_guarded_server(ae, (HOST, port), network, handlers)
    else:
        server = ae.start_server((HOST, port), block=False, evt_handlers=handlers)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    stopping.wait()
    server.shutdown()
    if store is not None:
        store.close()  # its spare files
    return 0


def serve_node_timed(config: str, out: str) -> int:
    """``dicom-node serve`` with the C-STORE handler's stages wrapped in timers (--stage-timing).

    Wraps module attributes the handler looks up at call time, so nothing in the
    project is edited; a stage the code no longer has is simply not reported.
    """
    import atexit
    import threading

    sys.path.insert(0, str(REPO))
    from dicom_node.receive import recorder, scp, storage

    totals: dict[str, list[float]] = {}
    lock = threading.Lock()

    def timed(name: str, function: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                with lock:
                    entry = totals.setdefault(name, [0.0, 0])
                    entry[0] += time.perf_counter() - start
                    entry[1] += 1

        return wrapper

    for name in ("handle_store", "encode_file_meta", "read_header", "check_header", "_place"):
        if hasattr(scp, name):
            setattr(scp, name, timed(f"scp.{name}", getattr(scp, name)))
    for owner, methods in (
        (storage.InstanceStore, ("write_temporary", "install", "sync_folder", "path_for")),
        (recorder.Journal, ("append",)),
        (recorder.InstanceRecorder, ("submit",)),
    ):
        for method in methods:
            if hasattr(owner, method):
                setattr(owner, method, timed(f"{owner.__name__}.{method}", getattr(owner, method)))
    if hasattr(storage, "os"):
        storage.os.fsync = timed("os.fsync (file and folder)", os.fsync)
    if hasattr(scp, "transaction"):
        import contextlib

        original_transaction = scp.transaction

        @contextlib.contextmanager
        def timed_transaction(sessions: Any) -> Any:
            start = time.perf_counter()
            with original_transaction(sessions) as session:
                yield session
            with lock:
                entry = totals.setdefault("transaction (begin, record_instance, commit)", [0.0, 0])
                entry[0] += time.perf_counter() - start
                entry[1] += 1

        scp.transaction = timed_transaction

    @atexit.register
    def _write() -> None:
        stores = totals.get("scp.handle_store", [0.0, 0])[1] or 1
        report = {
            name: {"seconds": round(total, 4), "calls": calls, "ms_per_instance": round(1000 * total / stores, 3)}
            for name, (total, calls) in sorted(totals.items(), key=lambda item: -item[1][0])
        }
        Path(out).write_text(json.dumps(report, indent=2), encoding="utf-8")

    from dicom_node.cli import app

    sys.argv = ["dicom-node", "serve", "--config", config]
    try:
        app()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


# Profile buckets, checked from the innermost frame outwards; the first that matches wins.
# Each: (bucket, function names, file fragment). "fsync"/"sleep" are told apart by the source line.
PROFILE_RULES: list[tuple[str, set[str] | None, str]] = [
    (
        "storage: write/rename/mkdir",
        {
            "InstanceStore.write_temporary",
            "InstanceStore.install",
            "InstanceStore.sync_folder",
            "fsync_folder",
            "InstanceStore.path_for",
            "_place",
        },
        "dicom_node/receive/storage.py",
    ),
    ("storage: file meta encoding (encode_file_meta)", {"encode_file_meta"}, "dicom_node/receive/storage.py"),
    ("header: read_header (pydicom parse)", {"read_header"}, "dicom_node/receive/header.py"),
    ("header: check_header (attribute access)", {"check_header"}, "dicom_node/receive/header.py"),
    ("journal: acknowledged paths (Journal.append)", {"Journal.append", "Journal.done"}, "recorder.py"),
    (
        "database: recorder thread (record_stored_instances, SQLAlchemy/SQLite)",
        {"record_stored_instances", "record_new_instances", "InstanceRecorder._record", "transaction"},
        "",
    ),
    ("handle_store: other (exists/stat/logging)", {"handle_store"}, "dicom_node/receive/scp.py"),
    (
        "pynetdicom: DUL PDU receive/decode",
        {
            "DULServiceProvider._is_transport_event",
            "DULServiceProvider._read_pdu_data",
            "GuardedDUL._read_pdu_data",
            "_read_exactly",
            "DULServiceProvider._decode_pdu",
            "StateMachine.do_action",
            "AssociationSocket.ready",
            "AssociationSocket.recv",
        },
        "pynetdicom/",
    ),
    (
        "pynetdicom: DIMSE decode, C-STORE dispatch, response send",
        {
            "Association._serve_request",
            "DIMSEServiceProvider.send_msg",
            "DIMSEServiceProvider.receive_primitive",
            "DULServiceProvider._process_recv_primitive",
        },
        "pynetdicom/",
    ),
    # Stacks py-spy could not unwind to the top (--nonblocking): attribute by library.
    ("database: recorder thread (record_stored_instances, SQLAlchemy/SQLite)", None, "sqlalchemy/"),
    ("database: recorder thread (record_stored_instances, SQLAlchemy/SQLite)", None, "db/session.py"),
]


def _frame_parts(frame: str) -> tuple[str, str, int]:
    """'func (path/file.py:123)' -> (func, path, line)."""
    name, _, rest = frame.partition(" (")
    location = rest.rstrip(")")
    path, _, line = location.rpartition(":")
    return name, path, int(line) if line.isdigit() else 0


_source_cache: dict[str, list[str]] = {}


def _source_line(path: str, line: int) -> str:
    if path not in _source_cache:
        candidates = [Path(path), REPO / path]
        candidates += [Path(p) / path for p in sys.path if p]
        text: list[str] = []
        for candidate in candidates:
            try:
                text = candidate.read_text(errors="replace").splitlines()
                break
            except OSError:
                continue
        _source_cache[path] = text
    lines = _source_cache[path]
    return lines[line - 1] if 0 < line <= len(lines) else ""


def classify_stack(frames: list[str]) -> str:
    for frame in reversed(frames):
        name, path, line = _frame_parts(frame)
        for bucket, names, fragment in PROFILE_RULES:
            if (names is None or name in names) and fragment in path:
                if bucket.startswith("storage: write") and "fsync" in _source_line(path, line):
                    return "storage: fsync (file + folder)"
                return bucket
    leaf_name, leaf_path, leaf_line = _frame_parts(frames[-1]) if frames else ("", "", 0)
    text = _source_line(leaf_path, leaf_line)
    waiting = leaf_name in {"Condition.wait", "Event.wait", "Queue.get"} or "sleep" in text or "select" in text
    if waiting and any("pynetdicom/" in _frame_parts(f)[1] for f in frames):
        return "pynetdicom: waiting (polling sleeps, or the node's reactors asleep until there is work)"
    if any("pynetdicom/" in _frame_parts(f)[1] for f in frames):
        return "pynetdicom: other (reactor loops, queues, events)"
    if frames and all("pydicom/" in _frame_parts(f)[1] for f in frames):
        return "pydicom, caller not sampled (incomplete stack)"
    return "other / incomplete stacks"


def _thread_group(label: str) -> str:
    if label.startswith("AcceptorThread"):
        return "association thread (runs the C-STORE handler)"
    if "run_reactor" in label:
        return "DUL reactor thread (socket, PDUs)"
    return "other threads"


def summarise_profile(raw_file: Path, rate_hz: int | None = None) -> dict[str, Any]:
    """Buckets of a ``py-spy record --idle --threads -f raw`` file, per thread group.

    With ``--idle`` every thread is sampled whether running or blocked, so a
    bucket's samples / rate is wall-clock time that thread spent there.
    """
    groups: dict[str, dict[str, int]] = {}
    rows: list[tuple[str, list[str], int]] = []
    serving: set[str] = set()  # threads that served DIMSE messages (not the port probe's idle association)
    for line in raw_file.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rstrip().rpartition(" ")
        if not count_text.isdigit():
            continue
        frames = stack.split(";")
        thread = frames[0] if frames and frames[0].startswith("thread (") else ""
        if "Association._run_reactor" in stack or "DULServiceProvider.run_reactor" in stack:
            serving.add(thread.split(":", 1)[0])
        rows.append((thread, frames[1:] if thread else frames, int(count_text)))
    for thread, frames, count in rows:
        group = "all threads"
        if thread:
            label = thread.split(":", 1)[-1].strip()
            group = _thread_group(label) if thread.split(":", 1)[0] in serving else "other threads"
        bucket = classify_stack(frames)
        buckets = groups.setdefault(group, {})
        buckets[bucket] = buckets.get(bucket, 0) + count
    summary: dict[str, Any] = {"rate_hz": rate_hz, "threads": {}}
    for group, buckets in sorted(groups.items()):
        total = sum(buckets.values())
        summary["threads"][group] = {
            "samples": total,
            "seconds": round(total / rate_hz, 3) if rate_hz else None,
            "buckets": [
                {"bucket": name, "samples": n, "percent": round(100 * n / total, 1) if total else 0.0}
                | ({"seconds": round(n / rate_hz, 3)} if rate_hz else {})
                for name, n in sorted(buckets.items(), key=lambda item: -item[1])
            ],
        }
    return summary


def print_profile(summary: dict[str, Any], min_percent: float = 0.5) -> None:
    for group, data in summary["threads"].items():
        if group == "other threads":
            continue
        seconds = f", {data['seconds']:.2f} s" if data.get("seconds") is not None else ""
        print(f"py-spy, {group}: {data['samples']} samples{seconds}")
        for row in data["buckets"]:
            if row["percent"] < min_percent:
                continue
            extra = f" {row['seconds']:6.2f} s" if "seconds" in row else ""
            print(f"  {row['percent']:5.1f}% {extra}  {row['bucket']}")


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    changed = git("status", "--porcelain", "--", "dicom_node", "db", "inference").splitlines()
    return {"head": git("rev-parse", "--short", "HEAD"), "uncommitted_changes": [c.strip() for c in changed]}


def node_config_has_inference() -> bool:
    sys.path.insert(0, str(REPO))
    try:
        from dicom_node.config import Settings
    except Exception:  # noqa: BLE001 - an unimportable config fails loudly later, in the node
        return False
    return "inference" in Settings.model_fields


# --------------------------------------------------------------------------- main


def generate_series(folder: Path, slices: int) -> float:
    sys.path.insert(0, str(REPO))
    from dicom_node.phantom import PhantomSpec, write_phantom_series

    start = time.perf_counter()
    write_phantom_series(folder, PhantomSpec(rows=512, columns=512, slices=slices))
    return time.perf_counter() - start


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300, help="slices in the synthetic series (default 300)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating ref/node rounds (default 3)")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="JSON results (default bench/results/receive.json, or receive-nofsync.json with --no-fsync)",
    )
    parser.add_argument(
        "--fsync",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="node fsyncs every instance before answering (default on; --no-fsync sets storage.fsync: false)",
    )
    parser.add_argument(
        "--duplicate-resend",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after each timed node send, send the same series again and time it separately (default on)",
    )
    parser.add_argument(
        "--floor",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time a bare pynetdicom SCP (node's AE settings, stores nothing) each round (default on)",
    )
    parser.add_argument(
        "--node-workers",
        type=int,
        default=0,
        help="inference.workers for the node under test (default 0: no worker process competes for the CPU)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="RAW_FILE",
        help="after the timed rounds, run one more node send under `py-spy record -f raw` into RAW_FILE",
    )
    parser.add_argument("--profile-rate", type=int, default=250, help="py-spy samples per second (default 250)")
    parser.add_argument(
        "--summarise-profile", type=Path, default=None, metavar="RAW_FILE", help="only summarise a py-spy raw file"
    )
    parser.add_argument(
        "--stage-timing",
        action="store_true",
        help="after the timed rounds, one more node send with handle_store's stages wrapped in timers",
    )
    parser.add_argument(
        "--concurrent",
        type=int,
        default=10,
        help="senders in the concurrent case: one storescu process and association each, each its own series "
        "(default 10; 0 skips the case)",
    )
    parser.add_argument(
        "--concurrent-slices",
        type=int,
        default=60,
        help="slices of each sender's series in the concurrent case (default 60)",
    )
    parser.add_argument(
        "--one-by-one",
        type=int,
        default=0,
        metavar="N",
        help="also time the first N slices sent one association each (one storescu process per image, one after "
        "another), as senders that open an association per image do (default 0: skip the case)",
    )
    parser.add_argument(
        "--node-processes",
        type=int,
        default=None,
        help="receive.processes for the node under test (default: the node's default, two per core)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (series, logs)")
    parser.add_argument("--serve-floor", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--serve-floor-reactors", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--serve-floor-durable", nargs=3, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--serve-node-timed", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.slices < 1 or args.repeats < 1:
        parser.error("--slices and --repeats must be at least 1")
    if not 0 <= args.one_by_one <= args.slices:
        parser.error("--one-by-one must be between 0 and --slices")
    if args.output is None:
        name = "receive.json" if args.fsync else "receive-nofsync.json"
        args.output = REPO / "bench" / "results" / name
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_floor is not None:
        return serve_floor(args.serve_floor)
    if args.serve_floor_reactors is not None:
        return serve_floor(args.serve_floor_reactors, reactors=True)
    if args.serve_floor_durable is not None:
        port, folder, fsync = args.serve_floor_durable
        return serve_floor(int(port), durable_dir=folder, fsync=fsync == "fsync")
    if args.serve_node_timed is not None:
        return serve_node_timed(*args.serve_node_timed)
    if args.summarise_profile is not None:
        print_profile(summarise_profile(args.summarise_profile, args.profile_rate))
        return 0
    work = Path(tempfile.mkdtemp(prefix="receive-bench-"))
    series_dir = work / "series"
    reference_port = free_port()
    node_port = free_port({reference_port})
    ports = {reference_port, node_port}
    floor_ports: list[int] = []
    for _ in FLOOR_KINDS:
        floor_ports.append(free_port(ports))
        ports.add(floor_ports[-1])
    workers = args.node_workers if node_config_has_inference() else None
    reference = Reference(work, reference_port)
    node = Node(work, node_port, fsync=args.fsync, workers=workers, processes=args.node_processes)
    floors = [Floor(work, port, key, fsync=args.fsync) for key, port in zip(FLOOR_KINDS, floor_ports, strict=True)]
    floors = floors if args.floor else []
    try:
        print(f"generating {args.slices} slices of 512x512 CT into {series_dir} ...", flush=True)
        generation_seconds = generate_series(series_dir, args.slices)
        series_files = sorted(p for p in series_dir.iterdir() if p.is_file())
        if len(series_files) != args.slices:
            raise BenchError(f"generator wrote {len(series_files)} files, expected {args.slices}")
        series_bytes = sum(p.stat().st_size for p in series_files)
        print(f"  {len(series_files)} files, {series_bytes / 2**20:.1f} MiB, {generation_seconds:.1f} s", flush=True)

        reference.start()
        for each in floors:
            each.start()
        ref_seconds: list[float] = []
        node_runs: list[dict[str, Any]] = []
        floor_runs: dict[str, list[tuple[float, float]]] = {each.key: [] for each in floors}  # (seconds, CPU ms)
        for round_number in range(1, args.repeats + 1):
            seconds = reference.run(series_dir, args.slices, work / "storescu-ref.log")
            ref_seconds.append(seconds)
            print(f"round {round_number}: storescp {seconds:6.3f} s", end="", flush=True)
            run = node.run(series_dir, args.slices, work / "storescu-node.log", duplicate=args.duplicate_resend)
            node_runs.append(run)
            print(f" | node {run['seconds']:6.3f} s ({run['cpu_ms_per_image']:.2f} CPU ms/image)", end="", flush=True)
            if "duplicate_seconds" in run:
                print(f" | duplicate resend {run['duplicate_seconds']:6.3f} s", end="", flush=True)
            for each in floors:
                seconds, cpu_ms = each.timed_run(series_dir, work / f"storescu-{each.key}.log", args.slices)
                floor_runs[each.key].append((seconds, cpu_ms))
                print(f" | {each.name} {seconds:6.3f} s ({cpu_ms:.2f} CPU ms/image)", end="", flush=True)
            print(flush=True)

        concurrent = None
        if args.concurrent > 0:
            concurrent = run_concurrent_case(args, work, reference, floors, node, ports)
        one_by_one = None
        if args.one_by_one > 0:
            one_by_one = run_one_by_one_case(
                args, OneByOne(series_files[: args.one_by_one]), work, reference, floors, node
            )
        reference.stop()
        for each in floors:
            each.stop()

        profile = None
        if args.profile is not None:
            print(f"profiling one more node send with py-spy into {args.profile} ...", flush=True)
            profile = node.profile(
                series_dir, args.slices, work / "storescu-profile.log", args.profile.resolve(), args.profile_rate
            )
            profile["summary"] = summarise_profile(args.profile.resolve(), args.profile_rate)

        stage_timing = None
        if args.stage_timing:
            print("one more node send with handle_store's stages timed ...", flush=True)
            stage_timing = node.stage_timing(series_dir, args.slices, work / "storescu-stages.log")

        reference_summary = summarise(ref_seconds, args.slices)
        node_summary = summarise([r["seconds"] for r in node_runs], args.slices)
        peaks = [r["peak_rss_kib"] for r in node_runs if r.get("peak_rss_kib")]
        node_summary["peak_rss_mib"] = round(max(peaks) / 1024, 1) if peaks else None
        node_summary["peak_rss_mib_per_run"] = [round(p / 1024, 1) for p in peaks]
        node_summary["cpu_ms_per_image_per_run"] = [r["cpu_ms_per_image"] for r in node_runs]
        duplicate_summary = None
        if args.duplicate_resend:
            duplicate_summary = summarise([r["duplicate_seconds"] for r in node_runs], args.slices)
        floor_summaries: dict[str, dict[str, Any] | None] = dict.fromkeys(FLOOR_KINDS)
        for key, runs in floor_runs.items():
            summary = summarise([seconds for seconds, _ in runs], args.slices)
            summary["cpu_ms_per_image_per_run"] = [cpu_ms for _, cpu_ms in runs]
            floor_summaries[key] = summary
        floor_summary, reactor_floor_summary = floor_summaries["floor"], floor_summaries["reactor_floor"]
        durable_floor_summary = floor_summaries["durable_floor"]
        ratio = node_summary["images_per_second"] / reference_summary["images_per_second"]
        results: dict[str, Any] = {
            "benchmark": "receive_throughput",
            "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "slices": args.slices,
            "rows": 512,
            "columns": 512,
            "series_bytes": series_bytes,
            "repeats": args.repeats,
            "node_fsync": args.fsync,
            "node_inference_workers": workers,
            "reference_storescp": reference_summary,
            "node": node_summary,
            "node_duplicate_resend": duplicate_summary,
            "bare_pynetdicom_floor": floor_summary,
            "bare_node_reactors_floor": reactor_floor_summary,
            "durable_writes_floor": durable_floor_summary,
            "ratio_node_over_storescp_images_per_second": round(ratio, 3),
            "ratio_floor_over_storescp_images_per_second": rate_ratio(floor_summary, reference_summary),
            "goal_ratio": 0.5,
            "goal_met": ratio >= 0.5,
            "ratio_node_over_floor_images_per_second": rate_ratio(node_summary, floor_summary),
            "goal_node_over_floor": 0.8,
            "ratio_node_over_reactors_floor_images_per_second": rate_ratio(node_summary, reactor_floor_summary),
            "ratio_node_over_durable_floor_images_per_second": rate_ratio(node_summary, durable_floor_summary),
            "ratio_durable_floor_over_floor_images_per_second": rate_ratio(durable_floor_summary, floor_summary),
            "concurrent": concurrent,
            "one_by_one": one_by_one,
            "profile": profile,
            "stage_timing": stage_timing,
            "machine": machine_info(),
            "git": git_state(),
            "commands": {
                "reference": f"TCP_NODELAY=1 {DCMTK_STORESCP} -aet {REFERENCE_AE} -od DIR PORT",
                "node": f"{DICOM_NODE} serve --config CONFIG",
                "send": f"TCP_NODELAY=1 {DCMTK_STORESCU} +sd -aet {CALLING_AE} -aec AET {HOST} PORT SERIES_DIR",
                "node_config": node.config.read_text(encoding="utf-8"),
            },
        }
        print_table(results)
        if profile is not None:
            print_profile(profile["summary"])
        if stage_timing is not None:
            print(f"stage timing (send took {stage_timing['seconds_while_timed']:.2f} s with timers on):")
            for name, row in stage_timing["stages"].items():
                print(f"  {row['ms_per_instance']:7.3f} ms/instance {row['seconds']:7.3f} s  {name}")
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"results written to {args.output}")
        return 0
    except BenchError as exc:
        print(f"\nBENCHMARK FAILED: {exc}\n(work folder kept: {work})", file=sys.stderr)
        args.keep = True
        return 1
    finally:
        reference.stop()
        for each in floors:
            each.stop()
        if node.process is not None:
            stop(node.process)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work folder: {work}", file=sys.stderr)


def time_floors(floors: list[Floor], target: SendTarget, work: Path, case: str, seconds: dict[str, list[float]]) -> str:
    """Send ``target`` to each bare SCP, appending its time to ``seconds[floor.key]``; their part of the round's line."""
    line = ""
    for floor in floors:
        seconds[floor.key].append(floor.run(target, work / f"storescu-{floor.key}-{case}.log"))
        line += f" | {floor.name} {seconds[floor.key][-1]:6.3f} s"
    return line


def run_concurrent_case(
    args: argparse.Namespace, work: Path, reference: Reference, floors: list[Floor], node: Node, ports: set[int]
) -> dict[str, Any]:
    """``--concurrent`` senders at once, each its own series and association: storescp (plain and --fork), node,
    the bare SCPs; alternating, ``--repeats`` rounds. Returns the summaries and ratios."""
    senders, slices = args.concurrent, args.concurrent_slices
    total = senders * slices
    print(f"generating {senders} series of {slices} slices for the concurrent case ...", flush=True)
    dirs = []
    for number in range(senders):
        folder = work / "concurrent" / f"sender{number}"
        generate_series(folder, slices)
        dirs.append(folder)
    forked = Reference(work, free_port(ports), fork=True)
    forked.start()
    seconds: dict[str, list[float]] = {"storescp": [], "storescp_fork": [], "node": []}
    seconds.update((floor.key, []) for floor in floors)
    peaks: list[int] = []
    node_cpu: list[float] = []  # ms per image
    node_idle: list[float] = []  # fraction of the machine's cores idle during the node's send
    try:
        for round_number in range(1, args.repeats + 1):
            seconds["storescp"].append(reference.run(dirs, total, work / "storescu-ref-concurrent.log"))
            seconds["storescp_fork"].append(forked.run(dirs, total, work / "storescu-fork-concurrent.log"))
            run = node.run_fresh(dirs, total, work / "storescu-node-concurrent.log")
            seconds["node"].append(run["seconds"])
            node_cpu.append(run["cpu_ms_per_image"])
            node_idle.append(run["machine_idle_fraction"])
            if run.get("peak_rss_kib"):
                peaks.append(run["peak_rss_kib"])
            line = (
                f"concurrent round {round_number}: storescp {seconds['storescp'][-1]:6.3f} s | storescp --fork "
                f"{seconds['storescp_fork'][-1]:6.3f} s | node {run['seconds']:6.3f} s ({node_cpu[-1]:.2f} CPU "
                f"ms/image, machine {100 * node_idle[-1]:.0f} % idle)"
            )
            print(line + time_floors(floors, dirs, work, "concurrent", seconds), flush=True)
    finally:
        forked.stop()
    summaries = {name: summarise(runs, total) for name, runs in seconds.items() if runs}
    summaries["node"]["cpu_ms_per_image_per_run"] = node_cpu
    summaries["node"]["machine_idle_fraction_per_run"] = node_idle
    node_summary = summaries["node"]
    return {
        "senders": senders,
        "slices_per_sender": slices,
        "images": total,
        "node_processes": args.node_processes,
        **summaries,
        "node_serve_peak_rss_mib": round(max(peaks) / 1024, 1) if peaks else None,
        "ratio_node_over_storescp": rate_ratio(node_summary, summaries["storescp"]),
        "ratio_node_over_storescp_fork": rate_ratio(node_summary, summaries["storescp_fork"]),
        "ratio_node_over_floor": rate_ratio(node_summary, summaries.get("floor")),
        "ratio_node_over_reactor_floor": rate_ratio(node_summary, summaries.get("reactor_floor")),
        "ratio_node_over_durable_floor": rate_ratio(node_summary, summaries.get("durable_floor")),
        "goal_ratio_node_over_storescp": 0.5,
    }


def run_one_by_one_case(
    args: argparse.Namespace, target: OneByOne, work: Path, reference: Reference, floors: list[Floor], node: Node
) -> dict[str, Any]:
    """``--one-by-one`` images, one storescu process and association each: storescp, a fresh node, the bare SCPs;
    alternating, ``--repeats`` rounds. Returns the summaries and ratios."""
    images = len(target.files)
    seconds: dict[str, list[float]] = {"storescp": [], "node": []}
    seconds.update((floor.key, []) for floor in floors)
    node_cpu: list[float] = []  # ms per image, so per association
    for round_number in range(1, args.repeats + 1):
        seconds["storescp"].append(reference.run(target, images, work / "storescu-ref-one-by-one.log"))
        run = node.run_fresh(target, images, work / "storescu-node-one-by-one.log")
        seconds["node"].append(run["seconds"])
        node_cpu.append(run["cpu_ms_per_image"])
        line = (
            f"one by one, round {round_number}: storescp {seconds['storescp'][-1]:6.3f} s | node "
            f"{seconds['node'][-1]:6.3f} s ({node_cpu[-1]:.1f} CPU ms/association)"
        )
        print(line + time_floors(floors, target, work, "one-by-one", seconds), flush=True)
    summaries = {name: summarise(runs, images) for name, runs in seconds.items() if runs}
    summaries["node"]["cpu_ms_per_association_per_run"] = node_cpu
    node_summary = summaries["node"]
    return {
        "images": images,
        **summaries,
        "ratio_node_over_storescp": rate_ratio(node_summary, summaries["storescp"]),
        "ratio_node_over_floor": rate_ratio(node_summary, summaries.get("floor")),
        "ratio_node_over_durable_floor": rate_ratio(node_summary, summaries.get("durable_floor")),
    }


def print_table(results: dict[str, Any]) -> None:
    ref = results["reference_storescp"]
    node = results["node"]
    dup = results["node_duplicate_resend"]
    mib = results["series_bytes"] / 2**20
    fsync = "fsync on" if results["node_fsync"] else "fsync OFF"
    print()
    print(f"{results['slices']} x 512x512 CT slices ({mib:.0f} MiB), {results['repeats']} rounds, node {fsync}")
    header = f"{'receiver':<38} {'runs (s)':<28} {'median s':>9} {'img/s':>8} {'MiB/s':>7}"
    print(header)
    print("-" * len(header))
    rows = [("DCMTK storescp", ref), (f"dicom-node ({fsync}, new instances)", node)]
    if dup is not None:
        rows.append(("dicom-node duplicate resend*", dup))
    if results.get("bare_pynetdicom_floor"):
        rows.append(("bare pynetdicom SCP, stores nothing**", results["bare_pynetdicom_floor"]))
    if results.get("bare_node_reactors_floor"):
        rows.append(("bare SCP, node's reactors***", results["bare_node_reactors_floor"]))
    if results.get("durable_writes_floor"):
        rows.append(("node's server, durable writes only****", results["durable_writes_floor"]))
    for name, summary in rows:
        runs = " ".join(f"{s:.2f}" for s in summary["seconds"])
        print(
            f"{name:<38} {runs:<28} {summary['median_seconds']:>9.3f} {summary['images_per_second']:>8.1f}"
            f" {mib / summary['median_seconds']:>7.1f}"
        )
    ratio = results["ratio_node_over_storescp_images_per_second"]
    print(
        f"node / storescp (images per second): {ratio:.2f}  "
        f"(goal >= 0.50: {'met' if results['goal_met'] else 'NOT met'})"
    )
    print(f"node peak RSS (VmHWM): {node['peak_rss_mib']} MiB")
    if dup is not None:
        print("* same series sent again to the running node: every instance is already stored (duplicate path)")
    if results.get("bare_pynetdicom_floor"):
        floor_ratio = results["ratio_floor_over_storescp_images_per_second"]
        print(
            f"** the node's AE settings, handler answers success at once: the pynetdicom ceiling "
            f"({floor_ratio:.2f} of storescp)"
        )
        floor_goal = results["ratio_node_over_floor_images_per_second"] >= results["goal_node_over_floor"]
        print(
            f"node / bare pynetdicom (images per second): {results['ratio_node_over_floor_images_per_second']:.2f} "
            f"(goal >= {results['goal_node_over_floor']:.2f}: {'met' if floor_goal else 'NOT met'})"
        )
    if results.get("bare_node_reactors_floor"):
        print(
            "*** the node's own server (guarded PDU reader, reactors that sleep until there is work, direct C-STORE "
            f"responses), handler answers success at once; node / it: {results['ratio_node_over_reactors_floor_images_per_second']:.2f}"
        )
    if results.get("durable_writes_floor"):
        print(
            "**** the node's own server, handler writes each data set as the node does (O_DSYNC write, rename, "
            "folder fsync) and answers, nothing else: the most a receiver keeping 'acknowledged means on disk' "
            f"reaches here. It / bare pynetdicom: {results['ratio_durable_floor_over_floor_images_per_second']}; "
            f"node / it: {results['ratio_node_over_durable_floor_images_per_second']:.2f}"
        )
    concurrent = results.get("concurrent")
    if concurrent:
        print()
        print(
            f"{concurrent['senders']} senders at once, {concurrent['slices_per_sender']} slices each "
            f"({concurrent['images']} images), one storescu process and association per sender"
        )
        print(header)
        print("-" * len(header))
        rows = [
            ("DCMTK storescp", "storescp"),
            ("DCMTK storescp --fork", "storescp_fork"),
            ("dicom-node", "node"),
            ("bare pynetdicom SCP, stores nothing", "floor"),
            ("bare SCP, node's reactors", "reactor_floor"),
            ("node's server, durable writes only", "durable_floor"),
        ]
        concurrent_mib = concurrent["images"] * mib / results["slices"]
        for name, key in rows:
            if key not in concurrent:
                continue
            summary = concurrent[key]
            runs = " ".join(f"{s:.2f}" for s in summary["seconds"])
            print(
                f"{name:<38} {runs:<28} {summary['median_seconds']:>9.3f} {summary['images_per_second']:>8.1f}"
                f" {concurrent_mib / summary['median_seconds']:>7.1f}"
            )
        concurrent_goal = concurrent["ratio_node_over_storescp"] >= concurrent["goal_ratio_node_over_storescp"]
        print(
            f"node / storescp: {concurrent['ratio_node_over_storescp']:.2f} "
            f"(goal >= {concurrent['goal_ratio_node_over_storescp']:.2f}: {'met' if concurrent_goal else 'NOT met'}), "
            f"node / storescp --fork: {concurrent['ratio_node_over_storescp_fork']:.2f}, node / bare pynetdicom: "
            f"{concurrent['ratio_node_over_floor']}, node / bare with node's reactors: "
            f"{concurrent['ratio_node_over_reactor_floor']}, node / durable writes only: "
            f"{concurrent['ratio_node_over_durable_floor']}"
        )
        print(
            "node CPU per image (ms): "
            + " ".join(f"{ms:.2f}" for ms in concurrent["node"]["cpu_ms_per_image_per_run"])
            + "; the machine's cores idle during the node's sends (senders included): "
            + " ".join(f"{100 * f:.0f} %" for f in concurrent["node"]["machine_idle_fraction_per_run"])
        )
    one_by_one = results.get("one_by_one")
    if one_by_one:
        print()
        print(f"{one_by_one['images']} images one association each (one storescu process per image, in turn)")
        print(f"{'receiver':<38} {'runs (s)':<28} {'median s':>9} {'img/s':>8} {'ms/assoc':>9}")
        print("-" * len(header))
        for name, key in [
            ("DCMTK storescp", "storescp"),
            ("dicom-node", "node"),
            ("bare pynetdicom SCP, stores nothing", "floor"),
            ("bare SCP, node's reactors", "reactor_floor"),
            ("node's server, durable writes only", "durable_floor"),
        ]:
            if key not in one_by_one:
                continue
            summary = one_by_one[key]
            runs = " ".join(f"{s:.2f}" for s in summary["seconds"])
            per_association = 1000 * summary["median_seconds"] / one_by_one["images"]
            print(
                f"{name:<38} {runs:<28} {summary['median_seconds']:>9.3f} {summary['images_per_second']:>8.1f}"
                f" {per_association:>9.1f}"
            )
        print(
            f"node / storescp: {one_by_one['ratio_node_over_storescp']:.2f}, node / bare pynetdicom: "
            f"{one_by_one['ratio_node_over_floor']}, node / durable writes only: "
            f"{one_by_one['ratio_node_over_durable_floor']}; node CPU per association (ms): "
            + " ".join(f"{ms:.1f}" for ms in one_by_one["node"]["cpu_ms_per_association_per_run"])
        )


if __name__ == "__main__":
    sys.exit(main())
