"""Fixtures that start real processes: the node itself and DCMTK peers."""

from __future__ import annotations

import hashlib
import inspect
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.orm import Session, sessionmaker

from db.jobs import job_for_series_uid
from db.models import JobState
from db.session import make_engine, make_session_factory

ROOT = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = ROOT.parent / "shared" / "fixtures" / "totalsegmentator"
DICOM_NODE = str(Path(sys.executable).with_name("dicom-node"))


def require_tool(name: str) -> str:
    """Path of a system tool; in CI a missing tool fails the test, elsewhere it skips it.

    The Python environment's own scripts are passed over: pynetdicom installs storescu, findscu, echoscu... there
    too, which an activated virtual environment puts ahead of DCMTK's on PATH, and they answer differently.
    """
    own_scripts = Path(sys.prefix, "bin").resolve()
    search = [
        entry
        for entry in os.environ.get("PATH", "").split(os.pathsep)
        if entry and Path(entry).resolve() != own_scripts
    ]
    path = shutil.which(name, path=os.pathsep.join(search))
    if path is None:
        message = f"{name} is not installed (bash .ci/run installs it with apt-get)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def require_extra(module: str, extra: str = "totalsegmentator") -> Any:
    """Import ``module`` of an optional extra, or skip with a reason that names the extra.

    Called at module level it skips the whole file; in a test or fixture, that test. E.g.
    ``torch = require_extra("torch")``; ``require_extra("playwright", "console")``.
    """
    __tracebackhide__ = True  # the skip is reported at the caller's line
    reason = f"{module} is not installed: it comes with the {extra} extra (pip install -e '.[{extra}]')"
    return pytest.importorskip(module, reason=reason)


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    """TotalSegmentator's example data, read in place from ../shared (never copied)."""
    if not SHARED_FIXTURES.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_FIXTURES} (it lives beside the checkout)")
    return SHARED_FIXTURES


def real_ct_copy(folder: Path, shared_fixtures: Path) -> list[Path]:
    """A copy of the real 20-slice Siemens CT (2 mm apart, 3 mm thick, 0.977 mm pixels, ConvolutionKernel Br38f\\3,
    GantryDetectorTilt 0) in ``folder``, to change; its files sorted by position."""
    import pydicom

    shutil.copytree(shared_fixtures / "example_ct_dicom_valid", folder)
    return sorted(folder.glob("*.dcm"), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))


def built_once_per_run(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder ``build`` fills once per test run: under pytest-xdist its workers share it (the first builds it,
    the others wait for it), as one process shares a session fixture."""
    import fcntl

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    folder = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / ".built").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder


@pytest.fixture(scope="session")
def total_fast_test_weights(tmp_path_factory) -> Path:
    """Random-initialised total_fast weights (scripts/build_test_weights.py), built once per test run.

    Shared by the TotalSegmentator and OpenVINO parity tests, so the OpenVINO conversion cached in
    ``<weights>/.openvino`` (minutes on 2 cores) is made once per run too.
    """

    def build(folder: Path) -> None:
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "build_test_weights.py"), str(folder), "--task", "total_fast"],
            check=True,
            capture_output=True,
            timeout=600,
        )

    return built_once_per_run(tmp_path_factory, "total-fast-weights", build)


def totalsegmentator_reference(ct: Path, weights: Path, workdir: Path) -> Any:
    """Label map from TotalSegmentator's Python API (fast task), offline, as [k, j, i] (a uint8 array)."""
    import textwrap

    import numpy as np

    from inference.weights import offline_totalsegmentator_environment

    output = workdir / "reference.nii.gz"
    script = textwrap.dedent(
        f"""
        from totalsegmentator.python_api import totalsegmentator
        totalsegmentator({str(ct)!r}, {str(output)!r}, fast=True, ml=True, device="cpu", quiet=True)
        """
    )
    environment = offline_totalsegmentator_environment(weights, workdir / "totalseg-home", "offline-test")
    subprocess.run([sys.executable, "-c", script], check=True, env=environment, timeout=900)
    import nibabel as nib

    return np.asanyarray(nib.load(str(output)).dataobj).astype(np.uint8).transpose(2, 1, 0)


@pytest.fixture(scope="session")
def dicom_ct_reference(shared_fixtures, total_fast_test_weights, tmp_path_factory) -> tuple[Any, Path, Any]:
    """The real DICOM series as a volume, as the NIfTI TotalSegmentator reads, and TotalSegmentator's own label
    map of it on the test weights: one run of TotalSegmentator for the PyTorch and OpenVINO parity tests."""
    import nibabel as nib
    import numpy as np

    from inference.volume import load_series_volume

    volume = load_series_volume(sorted((shared_fixtures / "example_ct_dicom_valid").glob("*.dcm")))

    def build(workdir: Path) -> None:
        ct = workdir / "ct.nii.gz"
        nib.save(volume.to_nibabel(np.int16), str(ct))  # TotalSegmentator reads NIfTI; HU are integers
        np.save(workdir / "reference.npy", totalsegmentator_reference(ct, total_fast_test_weights, workdir))

    workdir = built_once_per_run(tmp_path_factory, "dicom-ct-reference", build)
    return volume, workdir / "ct.nii.gz", np.load(workdir / "reference.npy")


def changed_sources(pinned: dict[Any, str]) -> list[str]:
    """The qualified names of those ``pinned`` functions whose source no longer hashes to its recorded digest."""
    return [
        function.__qualname__
        for function, digest in pinned.items()
        if hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16] != digest
    ]


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def associate_seeing_rejection(ae: Any, host: str, port: int, *, ae_title: str, **kwargs: Any) -> Any:
    """``ae.associate``, with ``rejection_received``: whether the node's A-ASSOCIATE-RJ reached this requestor.

    pynetdicom's requestor checks, after sending its request, whether the connection was made; a rejection that
    arrives and closes the connection before that check (a loaded machine: the requestor's thread descheduled)
    reads as a failure to connect, so ``is_rejected`` is False although the node rejected the association as it
    should. The node's own :class:`~dicom_node.scu.AssociationWatch` sees the A-ASSOCIATE-RJ PDU itself arrive.
    """
    from dicom_node.scu import AssociationWatch

    watch = AssociationWatch()
    assoc = watch.associate(ae, host, port, ae_title, **kwargs)
    assoc.rejection_received = assoc.is_rejected or watch.rejection is not None
    return assoc


def accepts_connections(port: int) -> bool:
    """Whether something listens on ``port`` of the loopback address (a peer started for a test is up)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@contextmanager
def storescp_destination(out: Path, port: int, ae_title: str) -> Iterator[None]:
    """DCMTK storescp as a move destination ``ae_title`` on ``port``, writing into ``out`` with unique file names
    (an instance stored twice leaves two files), listening while the block runs."""
    scp = subprocess.Popen(
        [require_tool("storescp"), "+uf", "-aet", ae_title, "-od", str(out), str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: accepts_connections(port), timeout=30, what="storescp to listen")
        yield
    finally:
        scp.terminate()
        scp.wait(timeout=10)


def wait_for(
    predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1, what: str = "condition"
) -> Any:
    """Poll until ``predicate()`` is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Node:
    """A real `dicom-node serve` process with its own port, storage and database."""

    def __init__(self, workdir: Path, settings: dict[str, Any]) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.ae_title = "DICOMNODE"
        self.storage = workdir / "storage"
        self.config_path = workdir / "config.yaml"
        self.log_path = workdir / "node.log"
        config = {
            "network": {"ae_title": self.ae_title, "host": "127.0.0.1", "port": self.port},
            "storage": {"directory": str(self.storage)},
            "completion": {"quiet_seconds": 2, "check_interval_seconds": 0.2},
            "inference": {"workers": 0, "poll_seconds": 0.2},
            "logging": {"level": "INFO"},
            # One receiving process (serve's own): each extra one costs seconds of imports at every start.
            # tests/test_receive_concurrency.py runs two.
            "receive": {"processes": 1},
        }
        for key, value in settings.items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key] = {**config[key], **value}
            else:
                config[key] = value
        self.port = config["network"]["port"]
        self.config_path.write_text(yaml.safe_dump(config))
        self.process: subprocess.Popen[bytes] | None = None
        self._sessions: sessionmaker[Session] | None = None

    def start(self) -> Node:
        self._log = open(self.log_path, "ab")  # kept open for the process' lifetime
        self.process = subprocess.Popen(
            [DICOM_NODE, "serve", "--config", str(self.config_path)], stdout=self._log, stderr=subprocess.STDOUT
        )
        wait_for(self._listening, timeout=60, what=f"node to listen on port {self.port}")
        return self

    def _listening(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"node exited with {self.process.returncode}:\n{self.log()}")
        return accepts_connections(self.port)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, as in a power cut of the process."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def sessions(self) -> sessionmaker[Session]:
        if self._sessions is None:
            url = f"sqlite:///{self.storage / 'dicom-node.db'}"
            self._sessions = make_session_factory(make_engine(url))
        return self._sessions

    def job_state(self, series_instance_uid: str) -> JobState | None:
        with self.sessions() as session:
            job = job_for_series_uid(session, series_instance_uid)
            return job.state if job else None

    def job_reason(self, series_instance_uid: str) -> str | None:
        with self.sessions() as session:
            job = job_for_series_uid(session, series_instance_uid)
            return job.reason if job else None

    def wait_for_state(self, series_instance_uid: str, state: JobState, timeout: float = 30.0) -> None:
        try:
            wait_for(lambda: self.job_state(series_instance_uid) == state, timeout=timeout, what="state")
        except AssertionError:
            now = self.job_state(series_instance_uid)
            raise AssertionError(
                f"series {series_instance_uid} did not reach {state.value} in {timeout} s: it is "
                f"{now.value if now else 'unknown'} ({self.job_reason(series_instance_uid)})"
            ) from None

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [DICOM_NODE, *args, "--config", str(self.config_path)], capture_output=True, text=True, timeout=60
        )


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Factory: ``start_node(rules=[...], completion={...})`` starts a node; all are stopped afterwards."""
    started: list[Node] = []

    def _start(**settings: Any) -> Node:
        node = Node(tmp_path / f"node{len(started)}", settings)
        started.append(node)
        return node.start()

    yield _start
    for node in started:
        node.stop()


def send_file_raw(
    port: int, path: Path, sop_class: str, syntax: str, *, calling_ae: str = "PACS", called_ae: str = "DICOMNODE"
) -> Any:
    """C-STORE the data set of the file at ``path`` as its bytes stand after the file meta (pynetdicom streams them,
    never re-encoding: a malformed data set reaches the node as it is); returns the response."""
    from pynetdicom import AE, _config

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(sop_class, [syntax])
    previous, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
        assert assoc.is_established
        response = assoc.send_c_store(path)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    return response


def storescu(
    port: int,
    paths: Sequence[Path],
    *,
    calling_ae: str = "PACS",
    called_ae: str = "DICOMNODE",
    extra: Sequence[str] = (),
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Send files with DCMTK storescu (verbose, TCP_NODELAY as DCMTK recommends on loopback)."""
    tool = require_tool("storescu")
    command = [tool, "-v", "-aet", calling_ae, "-aec", called_ae, *extra, "127.0.0.1", str(port)]
    command += [str(p) for p in paths]
    environment = {**os.environ, "TCP_NODELAY": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment)


CT_RULES = [{"name": "ct", "match": {"modality": "CT"}, "action": "process", "model": "baseline"}]


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """Errors and warnings of dicom3tools' validator for a file; the warnings are printed for the test log."""
    result = subprocess.run([require_tool("dciodvfy"), "-new", str(path)], capture_output=True, text=True)
    lines = (result.stdout + result.stderr).splitlines()
    warnings = [line for line in lines if line.startswith("Warning")]
    print(f"dciodvfy {path.name}: {len(warnings)} warning(s)", *warnings, sep="\n  ")
    return [line for line in lines if line.startswith("Error")], warnings


def data_set_bytes(path: Path) -> bytes:
    """The encoded data set of a DICOM file: everything after its File Meta Information."""
    from pynetdicom.dsutils import split_dataset

    _meta, offset = split_dataset(path)
    with open(path, "rb") as stream:
        stream.seek(offset)
        return stream.read()


def succeeded_files(storescu_output: str) -> list[str]:
    """Files storescu reported as sent with a Success response (from its -v log)."""
    sent: list[str] = []
    current: str | None = None
    for line in storescu_output.splitlines():
        if line.startswith("I: Sending file: "):
            current = line.removeprefix("I: Sending file: ").strip()
        elif "Received Store Response (Success)" in line and current:
            sent.append(current)
            current = None
    return sent


class Orthanc:
    """A real Orthanc (Debian's package) as the PACS, on its own ports and folder."""

    def __init__(self, workdir: Path, modalities: dict[str, Any], extra_config: dict[str, Any] | None = None) -> None:
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.ae_title = "ORTHANC"
        workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "test-pacs",
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "storage"),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": modalities,
            "Plugins": [],
            **(extra_config or {}),
        }
        self.config_path = workdir / "orthanc.json"
        self.config_path.write_text(__import__("json").dumps(config))
        self.log_path = workdir / "orthanc.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Orthanc:
        tool = require_tool("Orthanc")
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen([tool, str(self.config_path)], stdout=self._log, stderr=subprocess.STDOUT)
        wait_for(self._answers, timeout=60, what="Orthanc's REST API")
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"Orthanc exited: {self.log_path.read_text(errors='replace')[-2000:]}")
        try:
            self.get("/system")
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json") -> Any:
        import json
        import urllib.request

        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method)
        if body is not None:
            request.add_header("Content-Type", content_type)
        with urllib.request.urlopen(request, timeout=120) as response:
            payload = response.read()
        return json.loads(payload) if payload else None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def request_bytes(self, path: str) -> bytes:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=120) as response:
            return response.read()

    def post_json(self, path: str, payload: Any) -> Any:
        import json

        return self.request("POST", path, json.dumps(payload).encode())

    def upload(self, path: Path) -> dict[str, Any]:
        return self.request("POST", "/instances", path.read_bytes(), "application/dicom")


@pytest.fixture
def start_orthanc(tmp_path: Path) -> Iterator[Callable[..., Orthanc]]:
    started: list[Orthanc] = []

    def _start(modalities: dict[str, Any] | None = None, extra_config: dict[str, Any] | None = None) -> Orthanc:
        """Start an Orthanc; ``extra_config`` adds or overrides keys of its JSON configuration (e.g. DICOM TLS)."""
        orthanc = Orthanc(tmp_path / f"orthanc{len(started)}", modalities or {}, extra_config)
        started.append(orthanc)
        return orthanc.start()

    yield _start
    for orthanc in started:
        orthanc.stop()


PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
PIXELMED_OPTIONS = [
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
]


def pixelmed(path: Path, *, sr: bool = False, heap: str = "2g", timeout: float = 900) -> tuple[list[str], list[str]]:
    """Errors and warnings of PixelMed's validator (Debian's libpixelmed-java) for a file.

    ``sr``: the SR validator (templates, context groups) instead of the IOD validator.
    The warnings are printed for the test log.
    """
    java = require_tool("java")
    if not PIXELMED_JAR.is_file():
        message = f"PixelMed is not installed at {PIXELMED_JAR} (bash .ci/run installs libpixelmed-java)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    validator = "com.pixelmed.validate." + ("DicomSRValidator" if sr else "DicomInstanceValidator")
    result = subprocess.run(
        [java, f"-Xmx{heap}", *PIXELMED_OPTIONS, "-cp", str(PIXELMED_JAR), validator, str(path)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = (result.stdout + result.stderr).splitlines()
    if result.returncode != 0 or any("Exception" in line for line in lines):
        raise AssertionError(f"PixelMed did not run to the end on {path.name}: {lines[-5:]}")
    warnings = [line for line in lines if line.startswith("Warning")]
    print(f"PixelMed {path.name}: {len(warnings)} warning(s)", *warnings[:50], sep="\n  ")
    return [line for line in lines if line.startswith("Error")], warnings


def dsrdump(path: Path) -> subprocess.CompletedProcess[str]:
    """DCMTK's SR dump: exit 0 and no "E:" line when it can parse every content item."""
    return subprocess.run([require_tool("dsrdump"), str(path)], capture_output=True, text=True, timeout=120)


class Certificates:
    """A test PKI made with the openssl CLI: a CA, the node's, a peer's and a colleague's certificates, and a
    stranger's.

    Every certificate names 127.0.0.1 and localhost (subjectAltName); the
    stranger's is signed by a CA nobody trusts.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.ca = self._authority("ca", "Test hospital CA")
        self.node_key, self.node = self._leaf("node", "DICOMNODE", self.ca)
        self.peer_key, self.peer = self._leaf("peer", "PEER", self.ca)
        self.colleague_key, self.colleague = self._leaf("colleague", "COLLEAGUE", self.ca)  # trusted, another name
        rogue = self._authority("rogue-ca", "Nobody's CA")
        self.stranger_key, self.stranger = self._leaf("stranger", "STRANGER", rogue)

    def _openssl(self, *args: str) -> None:
        subprocess.run([require_tool("openssl"), *args], check=True, capture_output=True, cwd=self.folder)

    def _authority(self, name: str, subject: str) -> Path:
        self._openssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-subj",
            f"/CN={subject}",
        )
        return self.folder / f"{name}.pem"

    def _leaf(self, name: str, subject: str, authority: Path) -> tuple[Path, Path]:
        extensions = self.folder / f"{name}.ext"
        extensions.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n")
        self._openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={subject}",
        )
        self._openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            authority.name,
            "-CAkey",
            authority.with_suffix(".key").name,
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            extensions.name,
        )
        (self.folder / f"{name}.key").chmod(0o600)
        return self.folder / f"{name}.key", self.folder / f"{name}.pem"


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """One test PKI for the session (see :class:`Certificates`)."""
    return Certificates(tmp_path_factory.mktemp("pki"))


# --- Jobs put in a state through the named transitions of db/jobs.py (the audit trail stays whole) ---

TEST_WORKER = "test-host:1"


def drive_job_to(session: Session, job: Any, state: JobState, *, reason: str = "put there by the test") -> None:
    """Move a RECEIVING ``job`` to ``state`` along the path the node takes, one named transition at a time."""
    from datetime import timedelta

    from db import jobs

    if state is JobState.RECEIVING:
        return
    jobs.mark_complete(session, job, "quiet period over (test)")
    if state is JobState.COMPLETE:
        return
    if state in (JobState.FAILED, JobState.IGNORED):
        (jobs.fail if state is JobState.FAILED else jobs.ignore)(session, job, reason)
        return
    jobs.queue(
        session,
        job,
        rule_name="test",
        model_name=job.model_name or "baseline",
        destinations=list(job.destinations or []),
    )
    if state is JobState.QUEUED:
        return
    assert jobs.claim(session, job, TEST_WORKER, timedelta(minutes=5))
    if state is JobState.PROCESSING:
        return
    jobs.finish_processing(session, job, state, reason)


# --- A throwaway PostgreSQL server (Debian's binaries), and tests parametrized over SQLite and PostgreSQL ---

POSTGRESQL_BINARIES = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)


class PostgreSQL:
    """A PostgreSQL server in a temporary folder on a free port, trusted from 127.0.0.1, stopped at the end.

    initdb refuses to run as root: as root (CI machines) the server runs as the ``postgres``
    user that Debian's package creates, in a folder that user owns.
    """

    def __init__(self) -> None:
        import tempfile

        if not POSTGRESQL_BINARIES:
            pytest.skip("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb; apt-get install postgresql)")
        self.bin = POSTGRESQL_BINARIES[0].parent
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="dicom-node-pg-"))
        self.data = self.folder / "data"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            import pwd

            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as")
            os.chown(self.folder, account.pw_uid, account.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.databases = 0

    def _run(self, *args: str) -> None:
        subprocess.run([*self.as_user, *args], check=True, capture_output=True, text=True, timeout=120)

    def start(self) -> PostgreSQL:
        self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"
        )
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.folder} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.folder / "log"),
            "-w",
            "-t",
            "60",
            "start",
        )
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database on this server; its SQLAlchemy URL."""
        from sqlalchemy import create_engine, text

        self.databases += 1
        name = f"test_{os.getpid()}_{self.databases}"
        engine = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return self.url(name)

    def stop(self) -> None:
        with suppress(subprocess.SubprocessError, OSError):
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgresql_server() -> Iterator[PostgreSQL]:
    """One PostgreSQL server for the whole run (each test takes a fresh database on it)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("the PostgreSQL driver is not installed (pip install -e '.[postgresql]')")
    server = PostgreSQL().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgresql_url(postgresql_server: PostgreSQL) -> str:
    """A fresh, empty PostgreSQL database."""
    return postgresql_server.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: the test runs once on a SQLite file and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return request.getfixturevalue("postgresql_url")


def ct_instance(
    sop_instance_uid: str,
    series_instance_uid: str,
    *,
    study_instance_uid: str = "1.2.3",
    path: Path | None = None,
    expected: int | None = None,
) -> Any:
    """What the receiver records for one CT image (Explicit VR Little Endian): of the file at ``path``, or of a
    one-byte file said to lie under /data when none is given."""
    from db.ingest import InstanceRecord, SeriesAttributes, StudyAttributes

    return InstanceRecord(
        sop_instance_uid=sop_instance_uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=str(path) if path is not None else f"/data/{sop_instance_uid}.dcm",
        size_bytes=path.stat().st_size if path is not None else 1,
        study=StudyAttributes(study_instance_uid),
        series=SeriesAttributes(series_instance_uid, modality="CT", expected_instances=expected),
    )


def seed_queued_series(sessions: sessionmaker[Session], folder: Path, count: int, spec: Any) -> list[str]:
    """``count`` phantom series written under ``folder``, recorded as received and QUEUED for the baseline model.

    As if the node had received and routed them (through the named transitions); returns their Series Instance UIDs.
    Every series is its own study, with its own UIDs and noise.
    """
    from dataclasses import replace

    from db.ingest import record_instance
    from db.session import transaction
    from dicom_node.phantom import write_phantom_series

    uids = []
    for number in range(count):
        series = write_phantom_series(folder / f"series-{number}", replace(spec, seed=number))
        with transaction(sessions) as session:
            for path, uid in zip(series.files, series.sop_instance_uids, strict=False):
                instance = ct_instance(
                    uid, series.series_instance_uid, study_instance_uid=series.study_instance_uid, path=path
                )
                record_instance(session, instance)
            queued = job_for_series_uid(session, series.series_instance_uid)
            queued.destinations = []
            drive_job_to(session, queued, JobState.QUEUED)
        uids.append(series.series_instance_uid)
    return uids


def end_node_lock_connection(url: str) -> None:
    """What a database restart or a dropped idle connection does to a node's lock connection (PostgreSQL)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    from db.session import NODE_LOCK_KEY

    engine = create_engine(url, poolclass=NullPool)
    with engine.connect() as connection:
        ended = connection.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND objid = :key "
                "AND granted"
            ),
            {"key": NODE_LOCK_KEY},
        ).all()
        connection.commit()
    engine.dispose()
    assert ended == [(True,)]
