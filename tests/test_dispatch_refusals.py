"""What a PACS answers when it does not take the results, as a real `dicom-node serve` meets it.

The PACS stand-ins are real peers: pynetdicom Storage SCPs in the test process (answering chosen statuses, or
aborting every association request as some PACS do for a calling AE title they do not know), DCMTK storescp with
a profile that leaves Segmentation Storage out, and a TCP port that accepts connections and never answers.
"""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # created at import

from db import jobs
from db.jobs import job_for_series_uid
from db.models import JobState
from db.results import DeliveryRecord
from dicom_node.config import Destination
from dicom_node.dispatch import send_files, stored
from dicom_node.phantom import PhantomSpec, write_phantom_series
from dicom_node.scu import verify
from tests.conftest import Node, free_port, require_tool, wait_for
from tests.test_dispatch_faults import Peer, destination, dispatch_log, process_rule, send_phantom

pytestmark = pytest.mark.integration

FAST_RETRIES = {"first_retry_seconds": 0.2, "max_retry_seconds": 0.5, "check_interval_seconds": 0.2}


def node_sending_to(start_node, name: str, pacs: dict[str, object], **dispatch: object) -> Node:
    """A node with one worker that processes CT and sends the results to ``pacs`` (destination ``name``), retrying
    quickly; ``dispatch``: more of its dispatch settings."""
    return start_node(
        destinations={name: pacs},
        rules=process_rule(name),
        inference={"workers": 1},
        dispatch={**FAST_RETRIES, **dispatch},
    )


@pytest.fixture
def peer() -> Iterator[Peer]:
    """A Storage SCP answering ``peer.statuses`` one per request, then success (tests/test_dispatch_faults.py)."""
    started = Peer().start()
    yield started
    started.stop()


def delivery(node: Node, series_uid: str, name: str) -> DeliveryRecord:
    with node.sessions() as session:
        return jobs.delivery_record(job_for_series_uid(session, series_uid), name)


# --- 0xA7xx Out of Resources: "not now" ---------------------------------------------------------------------------


def test_a_pacs_out_of_resources_for_a_while_gets_every_file_once_without_using_up_attempts(tmp_path, start_node, peer):
    """A PACS whose disk is full for a few tries: each try stops at its answer (nothing else is sent on that
    association), none counts against max_attempts (1 here), and every file arrives once the PACS takes them."""
    peer.statuses = [0xA700, 0xA702, 0xA7FF]  # the first file, three tries in a row; then success
    node = node_sending_to(start_node, "peer", destination(peer, send=["seg", "sr", "rtstruct"]), max_attempts=1)
    series_uid = send_phantom(node, tmp_path / "ct")
    node.wait_for_state(series_uid, JobState.DONE, timeout=120)

    received = Counter(peer.received)
    assert sorted(received.values()) == [1, 1, 4], "only the file answered 0xA7xx went again; nothing after it"
    assert peer.received[:4] == [peer.received[0]] * 4
    assert sorted(peer.acknowledged) == sorted(received)
    record = delivery(node, series_uid, "peer")
    assert record.attempts == 1 and record.unreachable_attempts == 0
    log = dispatch_log(node)
    failed = [line for line in log.splitlines() if "dispatch.attempt_failed" in line]
    assert len(failed) == 3 and all("PEERSCP answered Out of Resources (0xA7" in line for line in failed), log
    assert "PEERSCP answered Out of Resources (0xA702) for seg-binary.dcm: it cannot take it now" in log, log
    assert "without using up dispatch.max_attempts" in log, log
    assert [int(n) for n in re.findall(r"dispatch\.attempt_failed .*?uncounted_try=(\d+)", log)] == [1, 2, 3], log
    assert "attempt=0" not in log and "refused" not in log, log


def test_a_pacs_out_of_resources_longer_than_unreachable_hours_fails_naming_the_file_and_its_answer(
    tmp_path, start_node, peer
):
    peer.statuses = [0xA700] * 10_000
    node = node_sending_to(start_node, "peer", destination(peer), max_attempts=1, unreachable_hours=0.001)  # 3.6 s
    series_uid = send_phantom(node, tmp_path / "ct")
    node.wait_for_state(series_uid, JobState.FAILED, timeout=120)

    reason = node.job_reason(series_uid) or ""
    assert reason.startswith(
        "sending failed: peer received 0 of 2 files: PEERSCP answered Out of Resources (0xA700) for seg-binary.dcm: "
        "it cannot take it now (its disk full, or too busy); it is tried again later"
    ), reason
    assert re.search(r"\(not taking files since \d{4}-\d\d-\d\d \d\d:\d\d UTC\)$", reason), reason
    record = delivery(node, series_uid, "peer")
    assert record.attempts == 0 and record.unreachable_attempts >= 2
    assert set(Counter(peer.received)) == {peer.received[0]}, "the SR never went after the SEG's 0xA700"


def test_out_of_resources_after_a_refusal_in_the_same_attempt_counts_it_still(tmp_path, peer):
    """A file refused for good (0xC000) and then 0xA700: the attempt counts (the refusal will not mend itself),
    both are named, and nothing is sent after the 0xA700."""
    images = write_phantom_series(tmp_path / "ct", PhantomSpec(rows=16, columns=16, slices=3)).files
    peer.statuses = [0xC000, 0xA700]

    outcome = send_files("DICOMNODE", Destination(**destination(peer)), [str(path) for path in images], timeout=10)

    assert not outcome.unreachable and outcome.sent == [] and len(peer.received) == 2
    assert outcome.error is not None and re.fullmatch(
        r"PEERSCP refused \S+ with status 0xC000 \(Cannot Understand\); PEERSCP answered Out of Resources "
        r"\(0xA700\) for \S+: it cannot take it now; it and the files not yet sent are sent again at the next attempt",
        outcome.error,
    ), outcome.error


# --- an association request aborted right after the connection opened ----------------------------------------


class AbortingPeer:
    """A peer that accepts the TCP connection and answers every association request with A-ABORT."""

    def __init__(self, ae_title: str = "ABORTER") -> None:
        self.ae_title = ae_title
        self.port = free_port()
        self.requests = 0
        ae = AE(ae_title=ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_REQUESTED, self._abort)]
        )

    def _abort(self, event) -> None:
        self.requests += 1
        event.assoc.abort()

    def stop(self) -> None:
        self._server.shutdown()


@pytest.fixture
def aborting_peer() -> Iterator[AbortingPeer]:
    peer = AbortingPeer()
    yield peer
    peer.stop()


def test_a_pacs_that_aborts_the_association_request_is_named_as_refusing_not_down(tmp_path, start_node, aborting_peer):
    """Some PACS answer a calling AE title they do not know with A-ABORT: said as such, with both AE titles, and
    counted (a configuration to fix, not a destination that is down), by dispatch and by `dicom-node echo`."""
    peer = aborting_peer
    node = node_sending_to(
        start_node, "pacs", {"ae_title": peer.ae_title, "host": "127.0.0.1", "port": peer.port}, max_attempts=2
    )
    series_uid = send_phantom(node, tmp_path / "ct")
    node.wait_for_state(series_uid, JobState.FAILED, timeout=120)

    reason = node.job_reason(series_uid) or ""
    assert reason == (
        f"sending failed: pacs received 0 of 2 files: ABORTER@127.0.0.1:{peer.port} aborted the association request "
        "as soon as the connection opened: it may not admit the calling AE title 'DICOMNODE' (this node) or the "
        "called AE title 'ABORTER' (check that the peer lists this node's AE title and address, and that it answers "
        "to 'ABORTER') (after 2 attempts)"
    ), reason
    record = delivery(node, series_uid, "pacs")
    assert record.attempts == 2 and record.unreachable_attempts == 0 and peer.requests == 2
    assert "unreachable" not in dispatch_log(node)

    echo = node.cli("echo", "pacs")
    assert echo.returncode == 1
    said = " ".join(echo.stderr.split())
    assert f"C-ECHO ABORTER@127.0.0.1:{peer.port}: FAILED: aborted the association request as soon as" in said, said
    assert "'DICOMNODE' (this node) or the called AE title 'ABORTER'" in said, said
    assert "peer down or unreachable" not in said


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word (a hung service, or not DICOM)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            held.append(connection)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        listener.close()
        for connection in held:
            connection.close()


def test_a_peer_that_accepts_the_connection_and_never_answers_is_tried_again_and_said_so(tmp_path, silent_port):
    """Not taken for a peer that aborts (counted): it may be overloaded, so it is tried again as one that is down."""
    image = write_phantom_series(tmp_path / "ct", PhantomSpec(rows=16, columns=16, slices=1)).files[0]
    pacs = Destination(ae_title="PACS", host="127.0.0.1", port=silent_port)

    outcome = send_files("DICOMNODE", pacs, [str(image)], timeout=2)
    echo = verify("DICOMNODE", "PACS", "127.0.0.1", silent_port, timeout=2)

    answer = (
        "accepted the connection but gave no answer to the association request within 2 s (overloaded, or not a "
        "DICOM service on that port)"
    )
    assert outcome.unreachable and outcome.sent == []
    assert outcome.error == f"PACS@127.0.0.1:{silent_port} {answer}; tried again later"
    assert not echo.ok and echo.message == answer


def test_a_closed_port_is_still_down(tmp_path):
    image = write_phantom_series(tmp_path / "ct", PhantomSpec(rows=16, columns=16, slices=1)).files[0]
    with closing(socket.socket()) as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, never listening: the connection is refused
        outcome = send_files("DICOMNODE", Destination(ae_title="PACS", host="127.0.0.1", port=port), [str(image)], 2)
        echo = verify("DICOMNODE", "PACS", "127.0.0.1", port, timeout=2)
    assert outcome.unreachable
    assert outcome.error == f"PACS@127.0.0.1:{port} is unreachable (no association: destination down, or not answering)"
    assert echo.message == "no association (peer down or unreachable)"


# --- a refusal, then the PACS closes: both in the error -----------------------------------------------------------


class AbortsAfterARefusal(Peer):
    """A Peer that, once it answered a failure status, aborts the association at the next request instead of
    answering it (as a PACS that gives up on a sender after a refusal)."""

    refused = False

    def _on_store(self, event) -> int:
        if self.refused:
            event.assoc.abort()
            time.sleep(1)  # the A-ABORT goes out before any answer could
            return 0xA700
        status = super()._on_store(event)
        self.refused = not stored(status)
        return status


def test_a_refusal_is_kept_in_the_error_when_the_pacs_then_aborts(tmp_path, start_node):
    peer = AbortsAfterARefusal("ABORTER").start()
    try:
        peer.statuses = [0xC000]  # the SEG: Cannot Understand, then the association is aborted
        node = node_sending_to(start_node, "pacs", destination(peer, send=["seg", "rtstruct"]), max_attempts=1)
        series_uid = send_phantom(node, tmp_path / "ct")
        node.wait_for_state(series_uid, JobState.FAILED, timeout=120)
    finally:
        peer.stop()

    reason = node.job_reason(series_uid) or ""
    assert reason.startswith(
        "sending failed: pacs received 0 of 2 files: ABORTER refused seg-binary.dcm with status 0xC000 "
        "(Cannot Understand); ABORTER closed the association after "
    ), reason
    assert re.search(r"while rtstruct\.dcm \(\d+ kB\) was sent \(after 1 attempt\)$", reason), reason
    assert len(peer.received) == 1 and peer.acknowledged == []  # the RTSTRUCT was aborted, not answered


# --- a PACS that does not take SEG: named in words, and the SR on it held back ------------------------------------

NO_SEG_PROFILE = """\
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = OppositeEndianExplicit
TransferSyntax3 = LittleEndianImplicit

[[PresentationContexts]]
[NoSegContexts]
PresentationContext1 = VerificationSOPClass\\Uncompressed
PresentationContext2 = 1.2.840.10008.5.1.4.1.1.88.22\\Uncompressed
PresentationContext3 = 1.2.840.10008.5.1.4.1.1.88.33\\Uncompressed
PresentationContext4 = 1.2.840.10008.5.1.4.1.1.88.34\\Uncompressed
PresentationContext5 = 1.2.840.10008.5.1.4.1.1.481.3\\Uncompressed

[[Profiles]]
[NoSeg]
PresentationContexts = NoSegContexts
"""


def storescp(folder: Path, port: int, *profile: str) -> subprocess.Popen[bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    command = [require_tool("storescp"), *profile, "-aet", "PEERSCP", "-od", str(folder), str(port)]
    peer = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: verify("PROBE", "PEERSCP", "127.0.0.1", port, timeout=2).ok, timeout=20, what="storescp")
    return peer


def modalities(folder: Path) -> list[str]:
    return sorted(str(pydicom.dcmread(path).Modality) for path in folder.iterdir())


def test_a_pacs_without_segmentation_storage_is_told_in_words_and_gets_no_sr_on_the_missing_seg(tmp_path, start_node):
    """DCMTK storescp without Segmentation Storage: the SEG is named in words (not UIDs), the SR that references
    it is held back (the PACS would hold a report on a segmentation it lacks), the RTSTRUCT goes. Once the PACS
    takes SEG, a retry sends the SEG, then its SR, and not the RTSTRUCT again."""
    profile = tmp_path / "storescp.cfg"
    profile.write_text(NO_SEG_PROFILE)
    port = free_port()
    first_folder = tmp_path / "pacs-without-seg"
    peer = storescp(first_folder, port, "-xf", str(profile), "NoSeg")
    try:
        node = node_sending_to(
            start_node,
            "pacs",
            {"ae_title": "PEERSCP", "host": "127.0.0.1", "port": port, "send": ["seg", "sr", "rtstruct"]},
            max_attempts=1,
        )
        series_uid = send_phantom(node, tmp_path / "ct")
        node.wait_for_state(series_uid, JobState.FAILED, timeout=120)
    finally:
        peer.terminate()
        peer.wait()

    reason = node.job_reason(series_uid) or ""
    assert reason == (
        "sending failed: pacs received 1 of 3 files: PEERSCP does not accept Segmentation Storage (seg-binary.dcm) "
        "in any of the transfer syntaxes offered: Explicit VR Little Endian, Implicit VR Little Endian; "
        "sr-binary.dcm held back: it references seg-binary.dcm, which PEERSCP did not accept; it is sent once it "
        "has (after 1 attempt)"
    ), reason
    assert "1.2.840.10008" not in reason
    assert modalities(first_folder) == ["RTSTRUCT"]

    second_folder = tmp_path / "pacs-with-seg"
    peer = storescp(second_folder, port)
    try:
        assert node.cli("retry", series_uid).returncode == 0
        node.wait_for_state(series_uid, JobState.DONE, timeout=120)
    finally:
        peer.terminate()
        peer.wait()
    assert modalities(second_folder) == ["SEG", "SR"]


def test_a_rejection_pynetdicom_read_as_an_abort_is_still_named_with_its_reason():
    """pynetdicom's requestor, descheduled between sending its request and checking the connection, reads an
    A-ASSOCIATE-RJ that already closed the connection as an abort (seen once in CI with a loaded machine: the node
    then said the PACS 'may not admit' it). The rejection the watch saw arrive names the real reason."""
    from types import SimpleNamespace

    from dicom_node.scu import AssociationWatch, not_established

    read_as_aborted = SimpleNamespace(
        is_rejected=False, is_aborted=True, acceptor=SimpleNamespace(), rejected_contexts=[], acse_timeout=10
    )
    watch = AssociationWatch()
    watch.connected = True
    watch.rejection = (0x01, 0x01, 0x03)  # rejected permanently by the service user: calling AE title not recognised

    answer = not_established(read_as_aborted, "DICOMNODE", "ORTHANC", watch)  # type: ignore[arg-type]

    assert answer.reason == (
        "rejected the association: it does not know the node's AE title 'DICOMNODE' as a peer (add it to the peer's "
        "configuration)"
    )
    assert not answer.unreachable
