"""`dicom-node demo`: the whole loop on one machine, with nothing but this package.

It starts a node (baseline model) as a process of its own, writes a synthetic CT
phantom, sends it in as a PACS would (C-STORE), waits for the job, pulls the
results back through the node's Query/Retrieve SCP as a planning system would
(C-FIND, then C-GET), and prints the structures with volume and mean HU read
from the retrieved SR. Every process it started is stopped, whatever happens.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_node.logs import os_error_text

NODE_AE = "DEMONODE"
PACS_AE = "DEMOPACS"
PLANNER_AE = "DEMOPLANNER"
RESULT_MODALITIES = ("SEG", "SR", "RTSTRUCT")
VOLUME = "118565006"  # SCT Volume
ATTENUATION = "112031"  # DCM Attenuation Coefficient
DERIVATION = "121401"  # DCM Derivation
MEAN = "373098007"  # SCT Mean
TRACKING_IDENTIFIER = "112039"
COVERAGE = "SCANCOVERAGE"


class DemoFailed(RuntimeError):
    """A step of the demo failed; the message names the step and why."""


@dataclass(frozen=True)
class StructureRow:
    name: str
    volume_ml: float
    mean_hu: float
    cut_by_scan_edge: bool


@dataclass(frozen=True)
class DemoResult:
    structures: list[StructureRow]
    files: dict[str, Path]  # SEG, SR, RTSTRUCT, preview -> path in the output folder
    node_log: Path


def run_demo(output: Path, report: Callable[[str], None], *, timeout: float = 300.0) -> DemoResult:
    """Run the loop in ``output`` (cleared of earlier demo files first); raises :class:`DemoFailed`."""
    output = output.resolve()
    with _step(report, f"prepare {output}"):
        config = _prepare(output)
    with ExitStack() as running:
        with _step(report, "start the node (baseline model) as its own process"):
            port = running.enter_context(_node_process(config, output / "node" / "node.log"))
        with _step(report, "write a synthetic CT phantom"):
            series = _write_phantom(output / "phantom")
        with _step(report, f"send {len(series.files)} CT images to the node as a PACS would (C-STORE)"):
            _send(port, series.files)
        with _step(report, "wait for segmentation, SEG, SR and RTSTRUCT"):
            job_folder = _wait_for_results(config, series.series_instance_uid, timeout)
        with _step(report, "find and retrieve the results through the node's Q/R (C-FIND, C-GET)"):
            files = _retrieve(port, series.study_instance_uid, output / "retrieved")
        shutil.copyfile(job_folder / "preview.png", output / "preview.png")
        files["preview"] = output / "preview.png"
        with _step(report, "read volumes and mean HU from the retrieved SR"):
            structures = read_measurements(files["SR"])
        with _step(report, "stop the node"):
            running.close()
    return DemoResult(structures, files, output / "node" / "node.log")


@contextmanager
def _step(report: Callable[[str], None], what: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    except DemoFailed as exc:
        raise DemoFailed(f"{what}: {exc}") from None
    except OSError as exc:  # a folder that cannot be written, a port or a tool that is missing: in words
        raise DemoFailed(f"{what}: {os_error_text(exc)}") from exc
    except Exception as exc:  # any failure of a step is reported with the step's name
        raise DemoFailed(f"{what}: {exc or 'an unexpected error inside the demo'}") from exc
    report(f"{what} ({time.perf_counter() - started:.1f} s)")


def _free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _prepare(output: Path) -> Path:
    """Clear an earlier demo's files from ``output`` and write the node's configuration."""
    for name in ("node", "phantom", "retrieved", "preview.png"):
        target = output / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    output.mkdir(parents=True, exist_ok=True)
    return _write_config(output / "node")


def _write_config(folder: Path) -> Path:
    folder.mkdir(parents=True)
    config = {
        "network": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": _free_port()},
        "peers": {
            "pacs": {"ae_title": PACS_AE, "hosts": ["127.0.0.1"], "roles": ["store", "echo"]},
            "planner": {"ae_title": PLANNER_AE, "hosts": ["127.0.0.1"], "roles": ["find", "get", "echo"]},
        },
        "storage": {"directory": str(folder / "storage")},
        "completion": {"quiet_seconds": 2, "check_interval_seconds": 0.5},
        "inference": {"workers": 1, "poll_seconds": 0.5},
        "results": {"segmentation_types": ["BINARY"], "rtstruct": True},
        "rules": [{"name": "ct", "match": {"modality": "CT"}, "action": "process", "model": "baseline"}],
        "logging": {"level": "INFO"},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@contextmanager
def _node_process(config: Path, log_path: Path) -> Iterator[int]:
    """`dicom-node serve` as a child process; stopped (SIGTERM, then SIGKILL) on the way out."""
    port = int(yaml.safe_load(config.read_text())["network"]["port"])
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "dicom_node", "serve", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT
        )
        try:
            _wait_until_listening(process, port, log_path)
            yield port
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_until_listening(process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DemoFailed(f"the node exited with {process.returncode}; see {log_path}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise DemoFailed(f"the node did not listen on port {port} within 60 s; see {log_path}")


def _write_phantom(folder: Path) -> Any:
    from dicom_node.phantom import PhantomSpec, write_phantom_series

    return write_phantom_series(
        folder, PhantomSpec(rows=160, columns=160, slices=60, pixel_spacing=(2.8, 2.8), slice_spacing=5.0)
    )


def _send(port: int, files: list[Path]) -> None:
    from dicom_node.config import Destination
    from dicom_node.dispatch import send_files

    node = Destination(ae_title=NODE_AE, host="127.0.0.1", port=port)
    outcome = send_files(PACS_AE, node, [str(f) for f in files], timeout=30)
    if outcome.error:
        raise DemoFailed(f"{len(outcome.sent)} of {len(files)} sent: {outcome.error}")


def _wait_for_results(config: Path, series_uid: str, timeout: float) -> Path:
    from db.jobs import job_for_series_uid
    from db.models import JobState
    from db.session import make_engine, make_session_factory
    from dicom_node.config import load_settings

    sessions = make_session_factory(make_engine(load_settings(config).database_url))
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        with sessions() as session:
            job = job_for_series_uid(session, series_uid)
            state = job.state if job else None
            if state is JobState.DONE and job is not None and job.result_path:
                return Path(job.result_path)
            if state in (JobState.FAILED, JobState.IGNORED) and job is not None:
                raise DemoFailed(f"the job ended {state.value}: {job.reason}")
        time.sleep(0.5)
    raise DemoFailed(f"no result within {timeout:.0f} s (the job is {state.value if state else 'not created'})")


def _retrieve(port: int, study_uid: str, folder: Path) -> dict[str, Path]:
    """Find the study's result instances (C-FIND, image level), then C-GET each result series."""
    from dicom_node import scu

    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = ""
    query.Modality = ""
    query.SOPInstanceUID = ""
    query.SOPClassUID = ""
    found = scu.find(PLANNER_AE, NODE_AE, "127.0.0.1", port, query)
    results = {str(m.Modality): m for m in found if str(m.Modality) in RESULT_MODALITIES}
    missing = [m for m in RESULT_MODALITIES if m not in results]
    if missing:
        raise DemoFailed(f"the node's Q/R does not list {', '.join(missing)} for study {study_uid}")
    files: dict[str, Path] = {}
    for modality, match in results.items():
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "SERIES"
        identifier.StudyInstanceUID = study_uid
        identifier.SeriesInstanceUID = match.SeriesInstanceUID
        got = scu.get(PLANNER_AE, NODE_AE, "127.0.0.1", port, identifier, [str(match.SOPClassUID)], folder)
        if len(got) != 1:
            raise DemoFailed(f"C-GET of the {modality} series returned {len(got)} instances, expected 1")
        files[modality] = got[0].rename(folder / f"{modality.lower()}.dcm")
    return files


def read_measurements(sr_path: Path) -> list[StructureRow]:
    """Per structure (TID 1500 measurement group): volume, mean attenuation and scan coverage."""
    sr = dcmread(sr_path)
    rows = []
    for group in _groups(sr):
        name, volume, mean, cut = "", float("nan"), float("nan"), False
        for item in group.get("ContentSequence", []):
            concept = item.ConceptNameCodeSequence[0].CodeValue
            if concept == TRACKING_IDENTIFIER:
                name = str(item.TextValue)
            elif concept == VOLUME:
                volume = float(item.MeasuredValueSequence[0].NumericValue)
            elif concept == ATTENUATION and _derivation(item) == MEAN:
                mean = float(item.MeasuredValueSequence[0].NumericValue)
            elif concept == COVERAGE:
                cut = item.ConceptCodeSequence[0].CodeValue == "PARTIAL"
        rows.append(StructureRow(name, volume, mean, cut))
    return rows


def _groups(sr: Dataset) -> Iterator[Dataset]:
    for item in sr.get("ContentSequence", []):
        if item.get("ValueType") == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeValue == "126010":
            yield from (g for g in item.get("ContentSequence", []) if g.get("ValueType") == "CONTAINER")


def _derivation(item: Dataset) -> str | None:
    for modifier in item.get("ContentSequence", []):
        if modifier.ConceptNameCodeSequence[0].CodeValue == DERIVATION:
            return str(modifier.ConceptCodeSequence[0].CodeValue)
    return None
