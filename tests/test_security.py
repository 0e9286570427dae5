"""Who may get in, what they may do, and what a caller can cost the node before it is known.

"Another host" is another loopback address (127.0.0.2, ...): Linux routes all
of 127.0.0.0/8 to lo, and pynetdicom can bind a client to it.
"""

from __future__ import annotations

import re
import socket
import struct
import subprocess
import time
import tracemalloc
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_role
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)
from sqlalchemy import select

from db.models import Instance
from dicom_node.phantom import PhantomSpec, write_phantom_series
from dicom_node.retrieve.scp import hidden_keys_matched, without_demographics
from dicom_node.retrieve.stored import read_stored
from tests.conftest import associate_seeing_rejection, free_port, require_tool, storescu, wait_for

pytestmark = pytest.mark.integration

SMALL_CT = PhantomSpec(rows=32, columns=32, slices=5, pixel_spacing=(5.0, 5.0), slice_spacing=5.0)
PEERS = {
    "pacs": {"ae_title": "PACS", "hosts": ["127.0.0.1"], "roles": ["store", "echo"]},
    "planner": {"ae_title": "PLANNER", "hosts": ["127.0.0.1/32"], "roles": ["get", "echo"]},
    "reader": {"ae_title": "READER", "hosts": ["127.0.0.1"], "roles": ["find"]},
}


def associate(node, calling_ae: str, contexts, source: str = "127.0.0.1"):
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    for context in contexts:
        ae.add_requested_context(context)
    return associate_seeing_rejection(ae, "127.0.0.1", node.port, ae_title=node.ae_title, bind_address=(source, 0))


def served_after(node) -> bool:
    """Whether a new association is accepted; it is released at once (one left open keeps the node's stop
    waiting for its timeout)."""
    assoc = associate(node, "PACS", [Verification])
    established = assoc.is_established
    if established:
        assoc.release()
    return established


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the node has closed the connection (EOF or reset); the A-ABORT it may send first is skipped."""
    sock.settimeout(0.2)
    try:
        while chunk := sock.recv(4096):
            del chunk
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


def test_a_known_ae_title_calling_from_another_host_is_refused(start_node):
    node = start_node(peers=PEERS)

    spoofed = associate(node, "PACS", [Verification], source="127.0.0.2")
    genuine = associate(node, "PACS", [Verification])

    assert spoofed.rejection_received
    assert genuine.is_established
    genuine.release()
    assert "association.rejected calling_ae=PACS address=127.0.0.2" in node.log()
    assert "is configured for 127.0.0.1/32, but called from 127.0.0.2" in node.log()


@pytest.mark.parametrize("max_pdu", [1, 6, 7, 4095])
def test_a_peer_asking_for_pdus_smaller_than_dcmtks_smallest_is_refused_with_a_sentence(start_node, max_pdu):
    """pynetdicom accepted a maximum PDU of 1 to 6 bytes and then failed on the first answer ('fragment_length cannot
    be between 1 and 7'), aborting with no reason; 7 bytes sent a study as millions of PDUs."""
    node = start_node(peers=PEERS)
    ae = AE(ae_title="PACS")
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)

    small = associate_seeing_rejection(ae, "127.0.0.1", node.port, ae_title=node.ae_title, max_pdu=max_pdu)
    smallest_allowed = associate_seeing_rejection(ae, "127.0.0.1", node.port, ae_title=node.ae_title, max_pdu=4096)
    unlimited = associate_seeing_rejection(ae, "127.0.0.1", node.port, ae_title=node.ae_title, max_pdu=0)

    assert small.rejection_received and not small.is_established
    for assoc in (smallest_allowed, unlimited):
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    reason = (
        f"PACS at 127.0.0.1 asked for PDUs of at most {max_pdu} bytes, fewer than the 4096 the node sends in at the "
        "least; set the peer's maximum PDU length to 4096 bytes or more (0: no limit)"
    )
    wait_for(lambda: reason in node.log(), timeout=10, what="the rejection's reason in the log")
    audit = node.cli("audit", "--action", "association", "--hours", "1")
    assert "PACS at 127.0.0.1 asked for PDUs of at most" in " ".join(audit.stdout.split()), audit.stdout


def test_the_default_admits_any_ae_title_from_loopback_only_and_says_so(start_node):
    node = start_node()

    assoc = associate(node, "ANYONE", [Verification], source="127.0.0.5")

    assert assoc.is_established
    assoc.release()
    assert "admitting any AE title from this machine (loopback) only" in node.log()


def test_the_old_allow_list_still_admits_with_a_deprecation_warning(start_node):
    """A listed AE title, from any host, may store and echo; it may not query or retrieve: anyone can claim it."""
    node = start_node(network={"allowed_calling_ae_titles": ["PACS"]})

    allowed, other = associate(node, "PACS", [Verification]), associate(node, "OTHER", [Verification])
    querying = associate(node, "PACS", [StudyRootQueryRetrieveInformationModelFind])

    assert allowed.is_established and other.rejection_received
    allowed.release()
    assert not querying.is_established
    assert "config.deprecated key=network.allowed_calling_ae_titles" in node.log()


def test_each_service_needs_its_role(tmp_path, start_node):
    node = start_node(peers=PEERS)
    series = write_phantom_series(tmp_path / "ct", SMALL_CT)

    # planner may get, not store: a storage context it proposes in the default role (itself storing) is refused;
    # pynetdicom's own check on such a request is the next line of defence
    planner = associate(node, "PLANNER", [CTImageStorage, StudyRootQueryRetrieveInformationModelFind])
    assert planner.is_established
    planner_storage = [str(c.abstract_syntax) for c in planner.accepted_contexts if c.abstract_syntax == CTImageStorage]
    planner.release()
    # pacs may store: a C-STORE on a storage context it opened gets to the handler, which checks the role again
    pacs = associate(node, "PACS", [CTImageStorage])
    assert pacs.is_established
    stored = pacs.send_c_store(pydicom.dcmread(series.files[0]))
    pacs.release()
    # reader may only find: no storage and no verification context at all
    reader = associate(node, "READER", [CTImageStorage, Verification, StudyRootQueryRetrieveInformationModelFind])
    accepted = {str(c.abstract_syntax) for c in reader.accepted_contexts}
    reader.release()

    assert planner_storage == []
    assert stored.Status == 0x0000
    assert accepted == {str(StudyRootQueryRetrieveInformationModelFind)}
    with node.sessions() as session:
        assert [i.sop_instance_uid for i in session.scalars(select(Instance))] == [series.sop_instance_uids[0]]


def test_a_peer_that_only_gets_receives_on_its_storage_contexts_and_cannot_push_a_data_set(tmp_path, start_node):
    """A get-only peer had every storage context accepted in both roles, and could send C-STOREs of up to
    network.maximum_data_set_megabytes that the node read whole before refusing them."""
    node = start_node(peers=PEERS)
    ae = AE(ae_title="PLANNER")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    roles = [build_role(CTImageStorage, scu_role=True, scp_role=True)]
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title, ext_neg=roles)
    assert assoc.is_established
    (storage,) = [c for c in assoc.accepted_contexts if c.abstract_syntax == CTImageStorage]
    assert (storage.as_scu, storage.as_scp) == (False, True)  # the node sends the C-STOREs, the peer none

    # a peer that stores anyway (its own software ignores the roles): a 40 MB data set, stopped at its start
    storage._as_scu = True
    big = pydicom.dcmread(write_phantom_series(tmp_path / "ct", SMALL_CT).files[0])
    big.NumberOfFrames, big.Rows, big.Columns = 20, 1024, 1024
    big.PixelData = bytes(20 * 1024 * 1024 * 2)
    started = time.monotonic()
    try:
        status = assoc.send_c_store(big)
    except (RuntimeError, OSError, ValueError):  # pynetdicom's ways of telling the association is gone
        status = None
    seconds = time.monotonic() - started

    assert not status  # no response: the association was aborted, not answered
    assert wait_for(lambda: not assoc.is_established, what="the association to end")
    assert seconds < 10
    log = wait_for(
        lambda: "has no store role, but sent a data set on a storage context" in node.log() and node.log(),
        what="the abort's log line",
    )
    assert (
        'connection.aborted address=127.0.0.1 calling_ae=PLANNER reason="peer planner has no store role, but sent a '
        "data set on a storage context" in log
    ), log
    with node.sessions() as session:
        assert session.scalars(select(Instance)).first() is None


@pytest.fixture
def stored_series(tmp_path, start_node):
    """A node holding one small CT series (sent by PACS), with caps low enough to reach."""
    node = start_node(peers=PEERS, retrieve={"max_find_matches": 2, "max_instances_per_retrieval": 3})
    series = write_phantom_series(tmp_path / "ct", SMALL_CT)
    sent = storescu(node.port, series.files)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    return node, series


def dcmtk(tool: str, node, calling_ae: str, *arguments: str) -> str:
    command = [require_tool(tool), "-v", "-aet", calling_ae, "-aec", node.ae_title, *arguments]
    command += ["127.0.0.1", str(node.port)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    return result.stdout + result.stderr


def test_universal_patient_query_needs_the_find_role(stored_series, tmp_path):
    node, series = stored_series

    browsing = dcmtk(
        "findscu",
        node,
        "PLANNER",
        "-S",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "PatientName",
        "-k",
        "StudyInstanceUID",
    )
    patients = dcmtk(
        "findscu", node, "PLANNER", "-S", "-k", "QueryRetrieveLevel=PATIENT", "-k", "PatientID=*", "-k", "PatientName"
    )
    narrow = dcmtk(
        "findscu",
        node,
        "PLANNER",
        "-S",
        "-k",
        "QueryRetrieveLevel=SERIES",
        "-k",
        f"StudyInstanceUID={series.study_instance_uid}",
        "-k",
        "SeriesInstanceUID",
    )
    # a key below the query's level is ignored by matching, so it must not pass for a narrowing one
    disguised = dcmtk(
        "findscu",
        node,
        "PLANNER",
        "-S",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "PatientName",
        "-k",
        "StudyInstanceUID",
        "-k",
        "SOPInstanceUID=1",
    )
    by_reader = dcmtk("findscu", node, "READER", "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID")

    for refused in (browsing, patients, disguised):
        assert "Received Final Find Response (Unknown Status: 0x124)" in refused, refused  # Refused: Not Authorized
        assert "Find Response: 1 (Pending)" not in refused
    assert "Find Response: 1 (Pending)" in narrow and "Received Final Find Response (Success)" in narrow, narrow
    assert "Find Response: 1 (Pending)" in by_reader and "(Success)" in by_reader, by_reader
    assert "has no find role: only narrow queries" in node.log()


def test_a_peer_without_the_find_role_learns_uids_and_the_patient_id_never_who_the_patient_is(stored_series):
    """Trying accession numbers one after another must not harvest names and birth dates."""
    node, series = stored_series
    header = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={series.study_instance_uid}"]
    keys += ["-k", "PatientName", "-k", "PatientBirthDate", "-k", "PatientSex", "-k", "PatientID"]

    by_planner = dcmtk("findscu", node, "PLANNER", "-S", *keys)
    by_reader = dcmtk("findscu", node, "READER", "-S", *keys)

    assert "Find Response: 1 (Pending)" in by_planner and str(header.PatientID) in by_planner, by_planner
    assert str(header.PatientName) not in by_planner and str(header.PatientBirthDate) not in by_planner, by_planner
    assert str(header.PatientName) in by_reader and str(header.PatientBirthDate) in by_reader, by_reader


def test_a_peer_without_the_find_role_cannot_guess_patient_details_from_matches(stored_series, tmp_path):
    """Matching on a detail the answer hides would tell it, one guess at a time (PatientName D*: a match or not)."""
    node, series = stored_series
    header = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    study = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={series.study_instance_uid}"]
    guesses = [
        f"PatientName={str(header.PatientName)[0]}*",
        f"PatientSex={header.PatientSex}",
        f"PatientBirthDate={header.PatientBirthDate}",
        "PatientName=*^*",  # wildcards and separators alone still select: this asks whether there is a given name
    ]

    found = [dcmtk("findscu", node, "PLANNER", "-S", *study, "-k", guess) for guess in guesses]
    counts = dcmtk("findscu", node, "PLANNER", "-S", *study, "-k", "PatientName=*", "-k", "NumberOfStudyRelatedSeries")
    patient_counts = dcmtk(
        "findscu", node, "PLANNER", "-S", *study, "-k", "NumberOfPatientRelatedStudies", "-k", "PatientName"
    )
    out = tmp_path / "get"
    out.mkdir()
    got = dcmtk("getscu", node, "PLANNER", "-S", "-od", str(out), *study, "-k", guesses[0])

    for answer in found:
        assert "Received Final Find Response (Unknown Status: 0x124)" in answer, answer
        assert "Find Response: 1 (Pending)" not in answer
    assert "Find Response: 1 (Pending)" in counts and "(Success)" in counts, counts  # * asks, it does not select
    assert "Find Response: 1 (Pending)" in patient_counts, patient_counts
    answer = patient_counts.split("Find Response: 1 (Pending)")[1]  # -v prints the request's keys first
    assert "(0020,1200) IS (no value available)" in answer, answer  # NumberOfPatientRelatedStudies
    assert list(out.iterdir()) == [], got
    log = node.log()
    assert "peer planner has no find role, so it may not match on patient details it is not shown (PatientName)" in log
    assert "may not select by patient details it is not shown (PatientName)" in log


def test_only_keys_matched_on_hidden_details_count_as_guesses():
    """Return keys (empty, *, an empty sequence item) and attributes the node never matches on ask nothing."""
    asking = pydicom.Dataset()
    asking.PatientName = "*"
    asking.OtherPatientIDs = ["*", "*"]
    asking.OtherPatientIDsSequence = [pydicom.Dataset()]
    asking.PatientPosition, asking.PatientAge, asking.PatientBirthDate = "HFS", "054Y", ""
    guessing = pydicom.Dataset()
    guessing.PatientName, guessing.PatientSex, guessing.PatientBirthDate = "D*", "F", "19510317"

    assert hidden_keys_matched(asking) == []
    assert hidden_keys_matched(guessing) == ["PatientBirthDate", "PatientName", "PatientSex"]
    for structure in ("*^*", "*^*^*", "* *", "*=*", "^"):  # each tells how the name is built, one query at a time
        probing = pydicom.Dataset()
        probing.PatientName = structure
        assert hidden_keys_matched(probing) == ["PatientName"], structure


@pytest.mark.parametrize(("description", "character_set_kept"), [("Thorax", False), ("Thorax Übersicht", True)])
def test_a_hidden_non_ascii_name_leaves_no_character_set_behind(description, character_set_kept):
    """ISO_IR 192 set only for the patient's name would tell a peer without the find role the name is not ASCII."""
    match = pydicom.Dataset()
    match.SpecificCharacterSet = "ISO_IR 192"
    match.PatientName, match.PatientID, match.StudyDescription = "Müller^Jürgen", "P1", description
    match.NumberOfPatientRelatedStudies = 2

    shown = without_demographics(match)

    assert shown.PatientName in (None, "") and shown.NumberOfPatientRelatedStudies in (None, "")
    assert shown.PatientID == "P1" and shown.StudyDescription == description
    assert ("SpecificCharacterSet" in shown) is character_set_kept


def test_a_peer_without_the_find_role_cannot_try_accession_numbers_one_after_another(start_node):
    """Three queries a minute here (retrieve.queries_per_minute_without_find): the fourth is refused, a peer
    with the find role is not counted."""
    node = start_node(peers=PEERS, retrieve={"queries_per_minute_without_find": 3})

    def statuses(calling_ae: str) -> list[int]:
        assoc = associate(node, calling_ae, [StudyRootQueryRetrieveInformationModelFind])
        assert assoc.is_established
        finals = []
        for number in range(5):
            query = pydicom.Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.AccessionNumber = f"A{1000 + number}"
            query.StudyInstanceUID = ""
            responses = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
            finals.append(int(responses[-1][0].Status))
        assoc.release()
        return finals

    assert statuses("PLANNER") == [0x0000, 0x0000, 0x0000, 0xA700, 0xA700]
    assert statuses("READER") == [0x0000] * 5
    log = node.log()
    assert "peer planner has no find role and made 3 queries in the last minute" in log
    assert log.count("retrieve.queries_per_minute_without_find") == 1  # the second refusal is not logged again


def test_wildcard_and_empty_unique_keys_retrieve_nothing(stored_series, tmp_path):
    node, _series = stored_series
    for value in ("*", "1.2.*", "", "?"):
        out = tmp_path / f"get{len(value)}{value.count('*')}"
        out.mkdir()
        output = dcmtk(
            "getscu",
            node,
            "PLANNER",
            "-S",
            "-od",
            str(out),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={value}",
        )
        assert list(out.iterdir()) == [], output
        assert "Received C-GET Response (Error: DataSetDoesNotMatchSOPClass)" in output  # 0xA900, output
    assert "has a wildcard; a retrieval needs literal unique keys" in node.log()


def test_a_peer_without_the_find_role_cannot_retrieve_a_whole_patient_by_a_guessed_patient_id(stored_series, tmp_path):
    node, series = stored_series
    patient_id = pydicom.dcmread(series.files[0], stop_before_pixels=True).PatientID
    out = tmp_path / "patient"
    out.mkdir()

    output = dcmtk(
        "getscu",
        node,
        "PLANNER",
        "-P",
        "-od",
        str(out),
        "-k",
        "QueryRetrieveLevel=PATIENT",
        "-k",
        f"PatientID={patient_id}",
    )

    assert list(out.iterdir()) == [], output
    assert "Received C-GET Response (Error: DataSetDoesNotMatchSOPClass)" in output, output
    assert (
        "peer planner has no find role, so it may not retrieve a whole patient by PatientID (which can be guessed); "
        "it retrieves by StudyInstanceUID or below"
    ) in node.log()


def test_find_stops_at_the_match_cap_and_retrievals_over_the_instance_cap_are_refused(stored_series, tmp_path):
    node, series = stored_series

    found = dcmtk(
        "findscu",
        node,
        "READER",
        "-S",
        "-k",
        "QueryRetrieveLevel=IMAGE",
        "-k",
        f"StudyInstanceUID={series.study_instance_uid}",
        "-k",
        f"SeriesInstanceUID={series.series_instance_uid}",
        "-k",
        "SOPInstanceUID",
    )
    out = tmp_path / "get"
    out.mkdir()
    got = dcmtk(
        "getscu",
        node,
        "PLANNER",
        "-S",
        "-od",
        str(out),
        "-k",
        "QueryRetrieveLevel=SERIES",
        "-k",
        f"StudyInstanceUID={series.study_instance_uid}",
        "-k",
        f"SeriesInstanceUID={series.series_instance_uid}",
    )

    assert found.count("(Pending)") == 2, found
    assert "Refused: OutOfResources" in found, found
    assert "Refused: OutOfResourcesSubOperations" in got or "0xa702" in got.lower(), got
    assert list(out.iterdir()) == []
    assert "more than 2 matches (retrieve.max_find_matches)" in node.log()
    assert "more than 3 instances selected (retrieve.max_instances_per_retrieval)" in node.log()


def slow_loris(source: str, port: int, count: int, first_bytes: bytes) -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        if first_bytes:
            sock.sendall(first_bytes)
        sockets.append(sock)
    return sockets


@pytest.mark.parametrize(
    "first_bytes",
    [b"", b"GET / HTTP/1.0\r\n\r\n", bytes.fromhex("16030100c4010000c00303") + bytes(32)],
    ids=["connect-and-close", "http-health-check", "tls-hello-on-the-plain-port"],
)
def test_a_port_check_that_never_requests_an_association_gives_its_place_back_at_once(start_node, first_bytes):
    """A monitor's check (connect, perhaps some bytes that are no association request, close) must not hold the
    sender's one place until the request timeout (60 s here): each check is followed at once by a real
    association."""
    node = start_node(network={"maximum_associations_per_host": 1, "association_request_timeout_seconds": 60})
    for check in range(5):
        with socket.create_connection(("127.0.0.1", node.port), timeout=5) as probe:
            probe.sendall(first_bytes)
        sender = wait_for(
            lambda: (assoc := associate(node, "PACS", [Verification])).is_established and assoc,
            timeout=20,
            what=f"an association after port check {check + 1}",
        )
        sender.release()


def test_half_sent_and_silent_connections_are_closed_while_a_real_peer_still_associates(start_node):
    node = start_node(
        network={
            "association_request_timeout_seconds": 2,
            "pdu_read_timeout_seconds": 2,
            "maximum_associations": 7,  # the two hosts below can hold 3 + 3 at most: one place stays free
            "maximum_associations_per_host": 3,
        }
    )
    header_only = struct.pack(">BBL", 0x01, 0, 1000) + b"\x00\x01"  # an A-ASSOCIATE-RQ that never finishes
    half_sent = slow_loris("127.0.0.3", node.port, 16, header_only)
    silent = slow_loris("127.0.0.4", node.port, 3, b"")
    try:
        # 13 of the 16 are over the per-address cap and closed at once; the held ones leave room for others
        wait_for(lambda: sum(closed_by_peer(s) for s in half_sent) >= 13, timeout=10, what="over-cap sockets closed")
        during = associate(node, "PACS", [Verification])
        assert during.is_established
        during.release()
        # the rest are closed by the read timeout (2 s), not held for minutes
        wait_for(lambda: all(closed_by_peer(s) for s in half_sent + silent), timeout=30, what="all closed")
    finally:
        for sock in half_sent + silent:
            sock.close()
    log = node.log()
    assert "connection.refused address=127.0.0.3" in log and "maximum_associations_per_host is 3" in log
    assert "connection.aborted address=127.0.0.3" in log and "did not arrive whole within 2 s" in log
    after = associate(node, "PACS", [Verification])
    assert after.is_established
    after.release()


def test_connections_from_addresses_no_peer_calls_from_take_two_places_at_most(start_node):
    """Unknown hosts cannot fill network.maximum_associations and lock out the configured peers."""
    node = start_node(
        peers=PEERS,  # every peer calls from 127.0.0.1
        network={
            "maximum_associations": 4,
            "maximum_associations_per_host": 4,
            "association_request_timeout_seconds": 30,
        },
    )
    silent = slow_loris("127.0.0.2", node.port, 4, b"") + slow_loris("127.0.0.3", node.port, 4, b"")
    try:
        wait_for(lambda: sum(closed_by_peer(s) for s in silent) >= 6, timeout=10, what="unknown hosts' sockets closed")
        assoc = associate(node, "PACS", [Verification])  # two of four places are held by strangers
        assert assoc.is_established
        assoc.release()
    finally:
        for sock in silent:
            sock.close()
    log = node.log()
    assert "connection.refused address=127.0.0.3" in log or "connection.refused address=127.0.0.2" in log
    assert "connections from addresses no peer calls from are already open (at most 2 at a time" in log


def test_peers_that_send_no_images_share_a_few_places_and_never_lock_out_the_pacs(start_node, tmp_path):
    """An echo-only peer on three addresses opens connections in a loop; the PACS still associates and sends."""
    monitors = {"hosts": ["127.0.0.2", "127.0.0.3", "127.0.0.5"], "roles": ["echo"]}  # any AE title, echo only
    node = start_node(
        peers={**PEERS, "monitors": monitors},
        network={
            "maximum_associations": 4,
            "maximum_associations_per_host": 4,
            "association_request_timeout_seconds": 30,
        },
    )
    held = [sock for host in monitors["hosts"] for sock in slow_loris(host, node.port, 8, b"")]
    try:
        # three places per address, eight in all: 8 of 24 stay open
        wait_for(lambda: sum(closed_by_peer(s) for s in held) >= 16, timeout=10, what="all but eight closed")
        assoc = associate(node, "PACS", [Verification])
        assert assoc.is_established
        assoc.release()
        sent = storescu(node.port, write_phantom_series(tmp_path / "ct", SMALL_CT).files)
        assert sent.returncode == 0, sent.stdout + sent.stderr
    finally:
        for sock in held:
            sock.close()
    log = node.log()
    assert "connections from addresses of peers that send no images are already open (at most 8 at a time" in log
    assert "a peer that sends no images may hold at most 3 at a time" in log


def test_a_monitor_that_holds_connections_open_leaves_room_for_the_planning_system(start_node):
    """An echo-only monitor on one address fills its own three places; the planner, on another, still connects."""
    planner = {"ae_title": "PLANNER", "hosts": ["127.0.0.4"], "roles": ["get", "echo"]}
    monitor = {"hosts": ["127.0.0.2"], "roles": ["echo"]}
    node = start_node(
        peers={**PEERS, "planner": planner, "monitor": monitor},
        network={"maximum_associations_per_host": 8, "association_request_timeout_seconds": 30},
    )
    held = slow_loris("127.0.0.2", node.port, 8, b"")
    try:
        wait_for(lambda: sum(closed_by_peer(s) for s in held) >= 5, timeout=10, what="the monitor's extra closed")
        assoc = associate(node, "PLANNER", [Verification], source="127.0.0.4")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    finally:
        for sock in held:
            sock.close()
    assert "connection.refused address=127.0.0.2" in node.log()


@pytest.mark.parametrize(
    ("context", "control", "fragment_bytes", "refusal"),
    [
        (Verification, 0x00, 1 << 20, "a data set was sent on the Verification context, whose messages carry none"),
        (
            StudyRootQueryRetrieveInformationModelFind,
            0x00,
            600_000,
            "a query or retrieval identifier of more than 1 MB",
        ),
        (Verification, 0x01, 40 * 1024, "a command of more than 64 KB was being sent"),
    ],
    ids=["data-set-on-verification", "identifier-over-1-MB", "command-over-64-KB"],
)
def test_a_message_over_its_contexts_limit_aborts_the_association_before_it_is_held(
    start_node, context, control, fragment_bytes, refusal
):
    """No message is held whole before its limit is checked: fragments are counted, and added up, as they
    arrive (the identifier's and the command's fragments are each under their limit, two together over)."""
    monitors = {"hosts": ["127.0.0.2"], "roles": ["echo", "find"]}
    node = start_node(peers={**PEERS, "monitors": monitors})
    assert node.process is not None
    before = rss_kib(node.process.pid)
    assoc = associate(node, "MONITOR", [context], source="127.0.0.2")
    assert assoc.is_established
    context_id = assoc.accepted_contexts[0].context_id
    fragment = bytes(fragment_bytes)  # a message's fragment, never its last (control bit 0x02 unset)
    item = struct.pack(">LBB", len(fragment) + 2, context_id, control) + fragment
    raw = assoc.dul.socket.socket
    raw.settimeout(10)
    try:
        for _ in range(300):
            raw.sendall(struct.pack(">BBL", 0x04, 0, len(item)) + item)
    except OSError:
        pass  # closed by the node
    wait_for(lambda: not assoc.is_established, timeout=20, what="the association to be aborted")

    assert rss_kib(node.process.pid) - before < 64 * 1024
    assert refusal in node.log()
    assert served_after(node)


def flood(sock: socket.socket, header: bytes, megabytes: int) -> int:
    """Send ``header`` and then up to ``megabytes`` MiB of zeros; the bytes the node took before it closed."""
    chunk = bytes(1 << 20)
    sent = 0
    try:
        sock.sendall(header)
        for _ in range(megabytes):
            sock.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass
    return sent


def test_oversized_association_request_and_pdu_are_refused_with_bounded_memory(start_node):
    node = start_node(network={"maximum_pdu_size": 65536, "maximum_association_request_bytes": 65536})
    assert node.process is not None
    before = rss_kib(node.process.pid)

    request = socket.create_connection(("127.0.0.1", node.port))
    request.settimeout(10)
    flood(request, struct.pack(">BBL", 0x01, 0, 300 * 1024 * 1024), 200)
    request.close()

    assoc = associate(node, "PACS", [Verification])
    assert assoc.is_established
    raw = assoc.dul.socket.socket
    raw.settimeout(10)
    flood(raw, struct.pack(">BBL", 0x04, 0, 300 * 1024 * 1024), 200)
    wait_for(lambda: not assoc.is_established, timeout=20, what="the association to be aborted")

    after = rss_kib(node.process.pid)
    print(f"node RSS before {before} KiB, after {after} KiB")
    assert after - before < 64 * 1024  # neither 300 MiB body was ever held
    log = node.log()
    assert "PDU type 0x01 of 314572800 bytes is over the limit of 65536 bytes" in log
    assert "PDU type 0x04 of 314572800 bytes is over the limit of 65542 bytes" in log
    assert served_after(node)


def test_a_data_set_over_the_limit_aborts_its_association_before_it_is_whole(start_node, tmp_path):
    node = start_node(network={"maximum_data_set_megabytes": 3})
    big = write_phantom_series(tmp_path / "big", PhantomSpec(rows=1536, columns=1536, slices=1))  # 4.7 MB
    small = write_phantom_series(tmp_path / "small", SMALL_CT)

    assoc = associate(node, "PACS", [CTImageStorage])
    assert assoc.is_established
    response = assoc.send_c_store(pydicom.dcmread(big.files[0]))
    wait_for(lambda: not assoc.is_established, timeout=20, what="the association to be aborted")

    assert not response  # no status: the association was aborted under the request
    assert "a data set of more than 3 MB was being sent (network.maximum_data_set_megabytes)" in node.log()
    assert storescu(node.port, small.files).returncode == 0  # the next sender is served
    with node.sessions() as session:
        stored = set(session.scalars(select(Instance.sop_instance_uid)))
    assert stored == set(small.sop_instance_uids)


def store_messages(assoc, sizes: list[int], *, last_fragment: bool = True) -> None:
    """Send a C-STORE-RQ per size (a data set of that many bytes) on ``assoc``'s raw socket, without waiting for
    answers; with ``last_fragment`` False the last data set is left unfinished (its final fragment never sent)."""
    context = assoc.accepted_contexts[0]
    raw = assoc.dul.socket.socket
    for number, size in enumerate(sizes, start=1):
        request = C_STORE()
        request.MessageID = number
        request.AffectedSOPClassUID = CTImageStorage
        request.AffectedSOPInstanceUID = generate_uid()
        request.Priority = 2
        request.DataSet = BytesIO(b"\0" * size)
        message = C_STORE_RQ()
        message.primitive_to_message(request)
        fragments = list(message.encode_msg(context.context_id, assoc.acceptor.maximum_length))
        if not last_fragment and number == len(sizes):
            fragments = fragments[:-1]
        for fragment in fragments:
            pdu = P_DATA_TF()
            pdu.from_primitive(fragment)
            try:
                raw.sendall(pdu.encode())
            except OSError:  # the node closed the connection while this was being sent
                return


def test_data_sets_still_arriving_are_bounded_over_all_senders_and_receiving_processes(start_node):
    node = start_node(
        network={"maximum_data_set_megabytes": 3, "maximum_in_flight_megabytes": 4, "maximum_pdu_size": 262_144},
        receive={"processes": 2},
    )
    first = associate(node, "PACS", [CTImageStorage])
    second = associate(node, "PACS", [CTImageStorage])
    assert first.is_established and second.is_established

    store_messages(first, [2_500_000], last_fragment=False)  # 2.3 MB held: its last fragment never comes
    time.sleep(1)
    store_messages(second, [2_500_000], last_fragment=False)  # together 4.5 MB: over the 4
    wait_for(lambda: not second.is_established, timeout=20, what="the second association to be aborted")

    assert first.is_established  # the one already holding its bytes goes on
    assert re.search(
        r"the node already holds [45] MB of images still arriving from all senders together "
        r"\(network.maximum_in_flight_megabytes is 4\)",
        node.log(),
    )
    first.abort()  # its 2.3 MB are given back: a 2 MB image fits again
    big = write_phantom_series(node.storage.parent / "big", PhantomSpec(rows=1024, columns=1024, slices=1))

    def stored() -> bool:
        return storescu(node.port, big.files).returncode == 0

    wait_for(stored, timeout=20, interval=1, what="a 2 MB image to be stored once the first sender let go")


def test_data_sets_sent_without_waiting_for_answers_count_together(start_node):
    node = start_node(network={"maximum_data_set_megabytes": 3, "maximum_pdu_size": 1_000_000})
    assoc = associate(node, "PACS", [CTImageStorage])
    assert assoc.is_established

    store_messages(assoc, [1_000_000] * 10)  # each under the limit, ten of them without a pause for the answers
    wait_for(lambda: not assoc.is_established, timeout=20, what="the association to be aborted")

    assert (
        "more than 3 MB of data sets were sent without waiting for the node's answers "
        "(network.maximum_data_set_megabytes)" in node.log()
    )
    small = write_phantom_series(node.storage.parent / "small", SMALL_CT)
    assert storescu(node.port, small.files).returncode == 0  # the next sender is served


def _encoded(message, context_id: int, max_pdu: int) -> list:
    return list(message.encode_msg(context_id, max_pdu))


def test_a_data_sets_bytes_go_back_only_once_the_message_holding_them_was_served(tmp_path):
    """Inferring that from the answers the node sent could be fooled (interleaved C-ECHOs, a tiny maximum PDU,
    decoy requests pynetdicom serves as another service, two commands merged into one message): pipelining peers
    held 19-22 MB under a 3 MB limit. The bytes now go back when pynetdicom has served the message itself."""
    from types import SimpleNamespace

    from pynetdicom.dimse_messages import C_ECHO_RQ
    from pynetdicom.dimse_primitives import C_ECHO

    from dicom_node.security import AssociationCaps, GuardedDUL, Limits, message_data_set_bytes

    caps = AssociationCaps(slots=4)
    dul = GuardedDUL.__new__(GuardedDUL)
    context = SimpleNamespace(context_id=1, abstract_syntax=CTImageStorage)
    dul._assoc = SimpleNamespace(_server=SimpleNamespace(caps=caps), accepted_contexts=[context])
    limits = Limits(65536, 1_000_000, 10, 30, 8, data_set_bytes=3_000_000, in_flight_bytes=6_000_000)

    def receive(message) -> str | None:
        refused = None
        for fragment in _encoded(message, 1, 1_000_000):
            pdu = P_DATA_TF()
            pdu.from_primitive(fragment)
            refused = refused or dul._fragments_refused(bytearray(pdu.encode()), limits)
        return refused

    def store(number: int) -> tuple[C_STORE_RQ, C_STORE]:
        request = C_STORE()
        request.MessageID = number
        request.AffectedSOPClassUID = CTImageStorage
        request.AffectedSOPInstanceUID = generate_uid()
        request.Priority = 2
        request.DataSet = BytesIO(b"\0" * 1_000_000)
        message = C_STORE_RQ()
        message.primitive_to_message(request)
        return message, request

    def echo(number: int) -> tuple[C_ECHO_RQ, C_ECHO]:
        request = C_ECHO()
        request.MessageID = number
        request.AffectedSOPClassUID = Verification
        message = C_ECHO_RQ()
        message.primitive_to_message(request)
        return message, request

    sent = [store(1), echo(2), store(3), echo(4), store(5)]
    assert [receive(message) for message, _ in sent] == [None] * 5  # 3 MB held: at the limit, not over it
    assert message_data_set_bytes(sent[0][1]) == 1_000_000 and message_data_set_bytes(sent[1][1]) == 0

    dul.handled(sent[3][1])  # an echo served, out of turn or not: it held nothing
    assert dul._unanswered_bytes == 3_000_000
    dul.handled(sent[0][1])  # the first image served
    assert dul._unanswered_bytes == 2_000_000 == caps.set_in_flight(GuardedDUL._process_unanswered)
    assert receive(store(6)[0]) is None  # 3 MB again
    assert "without waiting for the node's answers" in (receive(store(7)[0]) or "")  # over 3
    dul._let_go()
    assert dul._unanswered_bytes == 0


def _fragment_pdu(data: bytes, control: int, context_id: int = 1) -> bytearray:
    """A P-DATA-TF carrying one fragment (``control``: 0x01 a command's, 0x02 the last of its part)."""
    item = struct.pack(">LBB", len(data) + 2, context_id, control) + data
    return bytearray(struct.pack(">BBL", 0x04, 0, len(item)) + item)


def test_a_message_must_arrive_at_the_configured_rate_once_the_pdu_timeout_has_passed():
    """Each PDU arriving whole and in time is not enough: two bytes of a command every 19 s held an association
    for ever. A slow link's image still arrives (at 11 kB/s, with 10 kB/s configured), the time between messages
    does not count, and at the default 2 kB/s one of 8 associations sharing a 512 kbit/s link (8 kB/s) is not cut."""
    from types import SimpleNamespace

    from dicom_node.config import Settings
    from dicom_node.security import AssociationCaps, GuardedDUL, Limits

    def receiver() -> tuple[GuardedDUL, list[float]]:
        clock = [0.0]
        dul = GuardedDUL.__new__(GuardedDUL)
        context = SimpleNamespace(context_id=1, abstract_syntax=CTImageStorage)
        dul._assoc = SimpleNamespace(
            _server=SimpleNamespace(caps=AssociationCaps(slots=4)), accepted_contexts=[context]
        )
        dul._clock = lambda: clock[0]
        return dul, clock

    limits = Limits(65536, 1_000_000, 10, 30, 8, message_bytes_per_second=10_000)
    default = Limits.from_settings(Settings().network)
    assert default.message_bytes_per_second == 2_000 and default.pdu_seconds == 30
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = generate_uid()
    request.Priority = 2
    request.DataSet = BytesIO(b"\0" * 500_000)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    fragments = []
    for fragment in _encoded(message, 1, 10_006):  # 10 kB fragments
        pdu = P_DATA_TF()
        pdu.from_primitive(fragment)
        fragments.append(bytearray(pdu.encode()))

    slow_link, clock = receiver()
    for pdu in fragments:  # 0.5 MB in 46 s
        clock[0] += 0.9
        assert slow_link._fragments_refused(pdu, limits) is None
    clock[0] += 55  # idle between messages
    for pdu in fragments[:10]:
        clock[0] += 0.9
        assert slow_link._fragments_refused(pdu, limits) is None

    too_slow, clock = receiver()
    refusals = []
    for pdu in fragments:  # 8 kB/s: the first arrives at 1.25 s, the 26th 31.25 s later
        clock[0] += 1.25
        refusals.append(too_slow._fragments_refused(pdu, limits))
    assert refusals[:25] == [None] * 25
    assert refusals[25] == (
        "a C-STORE request was still arriving after 31 s (250,158 bytes so far): a message must arrive at 10 kB/s "
        "at least (network.minimum_message_kilobytes_per_second), once 30 s (network.pdu_read_timeout_seconds) "
        "have passed"
    )
    shared_link, clock = receiver()
    for pdu in fragments:
        clock[0] += 1.25
        assert shared_link._fragments_refused(pdu, default) is None

    drip, clock = receiver()
    answers = []
    for _ in range(3):
        answers.append(drip._fragments_refused(_fragment_pdu(b"\0\0", 0x01), default))
        clock[0] += 19
    assert answers[:2] == [None, None]
    assert answers[2] == (
        "a command was still arriving after 38 s (6 bytes so far): a message must arrive at 2 kB/s at least "
        "(network.minimum_message_kilobytes_per_second), once 30 s (network.pdu_read_timeout_seconds) have passed"
    )


def test_a_peer_dripping_a_command_is_aborted_though_every_pdu_arrives_in_time(start_node):
    """A real peer's association, kept busy with a complete PDU of two bytes of a command twice a second: within
    the PDU deadline and never idle, it is aborted once the message is late, and its place is free again."""
    node = start_node(network={"pdu_read_timeout_seconds": 2, "network_timeout_seconds": 120})
    ae = AE(ae_title="PACS")
    ae.acse_timeout = 10
    ae.network_timeout = 120  # the requestor's own idle timeout must not end it first
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    raw = assoc.dul.socket.socket
    context_id = assoc.accepted_contexts[0].context_id
    for _ in range(120):
        if not assoc.is_established:
            break
        try:
            raw.sendall(_fragment_pdu(b"\0\0", 0x01, context_id))
        except OSError:
            break
        time.sleep(0.5)
    wait_for(lambda: assoc.is_aborted, timeout=10, what="the node to abort the association")

    log = node.log()
    assert "connection.aborted address=127.0.0.1" in log
    assert "a command was still arriving after" in log
    assert served_after(node)


@pytest.mark.parametrize(
    ("command", "refusal"),
    [
        # an echo whose CommandField pydicom never reads (it stops at the item delimiter): a request hidden from
        # the count, whose answer would give back a queued image
        (
            struct.pack("<HHLH", 0, 0x0100, 2, 0x0030)
            + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
            + struct.pack("<HHLH", 0, 0x0100, 2, 0x8030),
            "a command set that is not well-formed was sent",
        ),
        (struct.pack("<HHL", 0, 0x0002, 0xFFFFFFFF) + struct.pack("<HHLH", 0, 0x0100, 2, 0x0030), "not well-formed"),
        (  # a normalized request pynetdicom would hand to the storage handler by its SOP class
            struct.pack("<HHLH", 0, 0x0100, 2, 0x0140) + struct.pack("<HHLH", 0, 0x0110, 2, 7),
            "a DIMSE command the node does not serve was sent (CommandField 0x0140); it serves C-ECHO, C-STORE",
        ),
        (  # served by pynetdicom on a thread of its own, out of turn
            struct.pack("<HHLH", 0, 0x0100, 2, 0x0100) + struct.pack("<HHLH", 0, 0x0110, 2, 7),
            "a DIMSE command the node does not serve was sent (CommandField 0x0100)",
        ),
    ],
)
def test_a_command_the_node_cannot_follow_or_does_not_serve_ends_the_association(command, refusal):
    from types import SimpleNamespace

    from dicom_node.security import AssociationCaps, GuardedDUL, Limits

    dul = GuardedDUL.__new__(GuardedDUL)
    dul._assoc = SimpleNamespace(_server=SimpleNamespace(caps=AssociationCaps(slots=4)), accepted_contexts=[])
    limits = Limits(65536, 1_000_000, 10, 30, 8)
    item = struct.pack(">LBB", len(command) + 2, 1, 0x03) + command
    pdu = bytearray(struct.pack(">BBL", 0x04, 0, len(item)) + item)

    assert refusal in (dul._fragments_refused(pdu, limits) or "")


def deeply_nested_file(path: Path, depth: int) -> Path:
    """A CT-class data set whose one sequence nests ``depth`` undefined-length sequences, written by hand."""
    sop_instance = generate_uid()
    body = bytearray()
    body += b"\x08\x00\x16\x00UI" + struct.pack("<H", 26) + str(CTImageStorage).encode().ljust(26, b"\x00")
    uid = sop_instance.encode()
    uid += b"\x00" * (len(uid) % 2)
    body += b"\x08\x00\x18\x00UI" + struct.pack("<H", len(uid)) + uid
    opening = b"\x40\x00\x30\xa7SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    closing = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    body += opening * depth + closing * depth
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with open(path, "wb") as stream:
        stream.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(stream, meta)  # type: ignore[arg-type]
        stream.write(body)
    return path


def test_a_deeply_nested_stored_data_set_goes_out_byte_for_byte_without_being_parsed(tmp_path):
    path = deeply_nested_file(tmp_path / "nested.dcm", 50_000)
    stored = path.read_bytes()

    tracemalloc.start()
    started = time.perf_counter()
    dataset = read_stored(path)
    sent = encode(dataset, False, True)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    assert sent is not None and stored.endswith(sent)
    print(f"50,000 nested sequences: encoded in {time.perf_counter() - started:.2f} s, peak {peak / 2**20:.1f} MiB")
    assert peak < 10 * len(stored)  # a few copies of the file, not a parsed tree


def test_a_wildcard_move_sends_nothing(start_node, tmp_path):
    incoming = free_port()
    planner = {"ae_title": "PLANNER", "hosts": ["127.0.0.1"], "roles": ["move"], "host": "127.0.0.1", "port": incoming}
    node = start_node(peers={"planner": planner})
    output = dcmtk(
        "movescu",
        node,
        "PLANNER",
        "-S",
        "--port",
        str(incoming),
        "-od",
        str(tmp_path),
        "-aem",
        "PLANNER",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "StudyInstanceUID=*",
    )
    assert "Received Final Move Response (Error: DataSetDoesNotMatchSOPClass)" in output, output  # 0xA900
    assert "StudyInstanceUID '*' has a wildcard" in node.log()


def test_a_peer_host_that_is_no_address_or_network_is_a_configuration_error(tmp_path):
    from dicom_node.config import ConfigError, load_settings

    config = tmp_path / "config.yaml"
    config.write_text("peers:\n  pacs: {ae_title: PACS, hosts: [pacs.example.org], roles: [store, fly]}\n")
    with pytest.raises(ConfigError) as error:
        load_settings(config)
    message = str(error.value)
    assert "peers.pacs.hosts: 'pacs.example.org' is not an IP address or CIDR network" in message
    assert "peers.pacs.roles.1" in message


def test_a_caller_rejected_in_a_loop_costs_one_log_line_and_one_audit_record_per_ten_seconds(start_node):
    from db.models import AuditEvent

    node = start_node(peers=PEERS)

    for _ in range(20):  # rejected, or closed at once while its earlier connections still hold the 2 places
        assert not associate(node, "INTRUDER", [Verification], source="127.0.0.4").is_established
    time.sleep(10.5)  # the throttle's interval: the next refusal is logged again, counting the ones before
    assert associate(node, "INTRUDER", [Verification], source="127.0.0.4").rejection_received
    genuine = associate(node, "PACS", [Verification])  # the loop never shut the node to its peers
    assert genuine.is_established
    genuine.release()

    log = node.log().splitlines()
    lines = [line for line in log if "association.rejected calling_ae=INTRUDER" in line]
    assert len(lines) == 2, lines
    dropped = int(re.search(r"not_logged_since_last=(\d+)", lines[1]).group(1))
    assert 0 < dropped <= 19
    refused = [line for line in log if "connection.refused address=127.0.0.4" in line]
    assert len(refused) <= 2, refused  # one per reason (the count of open connections is part of it) at most

    def rejected() -> list[AuditEvent]:
        with node.sessions() as session:
            return list(session.scalars(select(AuditEvent).where(AuditEvent.outcome == "rejected")))

    records = wait_for(lambda: len(rejected()) == 2 and rejected(), timeout=10, what="two audit records")
    why = "no peer is configured for AE title INTRUDER calling from 127.0.0.4"
    assert [record.peer_ae_title for record in records] == ["INTRUDER", "INTRUDER"]  # who called, and why refused
    assert records[0].detail == why
    assert records[1].detail == (
        f"{why}; {dropped} more association(s) from this address were rejected since the previous record and not "
        "recorded one by one"
    )


@pytest.mark.parametrize(("processes", "each"), [(1, 60), (4, 15), (8, 7), (100, 1)])
def test_the_query_budget_without_find_is_the_nodes_shared_among_receiving_processes(tmp_path, processes, each):
    """Associations land on the receiving processes in turn: each allows its share, so opening an association per
    query gains a peer nothing."""
    from dicom_node.config import Settings
    from dicom_node.retrieve.scp import RetrieveContext

    settings = Settings(storage={"directory": tmp_path}, retrieve={"queries_per_minute_without_find": 60})
    context = RetrieveContext.from_settings(settings, sessions=None, processes=processes)  # type: ignore[arg-type]
    assert context.queries_without_find.per_minute == each
    assert [context.queries_without_find.spend("planner") for _ in range(each + 1)] == [True] * each + [False]


def test_a_c_get_answer_naming_a_path_instead_of_a_uid_writes_no_file_outside_the_folder(tmp_path):
    """The node's C-GET client files each instance under its SOP Instance UID: a peer's '../x' is refused."""
    from pynetdicom import evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

    from dicom_node.scu import ScuError, get

    hostile = pydicom.Dataset()
    hostile.SOPClassUID, hostile.SOPInstanceUID = CTImageStorage, "../../escaped"
    hostile.file_meta = FileMetaDataset()
    hostile.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    hostile.PatientID = "X"

    def answer(_event):
        yield 1
        yield 0xFF00, hostile

    scp = AE(ae_title="HOSTILE")
    scp.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
    scp.add_supported_context(CTImageStorage, ExplicitVRLittleEndian, scp_role=True, scu_role=True)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_GET, answer)])
    try:
        query = pydicom.Dataset()
        query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", "1.2.3"
        folder = tmp_path / "retrieved" / "inner"
        with pytest.raises(ScuError, match="C-GET answered status 0xA702"):  # its one sub-operation failed
            get("NODE", "HOSTILE", "127.0.0.1", port, query, [CTImageStorage], folder)
    finally:
        server.shutdown()

    assert not (tmp_path / "escaped.dcm").exists() and list(folder.iterdir()) == []


def _associate_to(node, calling_ae: str, source: str, destination: str):
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    ae.add_requested_context(Verification)
    return associate_seeing_rejection(ae, destination, node.port, ae_title=node.ae_title, bind_address=(source, 0))


def test_on_a_dual_stack_node_ipv4_networks_admit_ipv4_callers_and_ipv6_networks_ipv6_ones(start_node):
    """With network.host '::', IPv4 callers arrive as ::ffff:a.b.c.d: they are matched (and named) as IPv4. ::/0
    is every IPv6 address, not every address, and the start-up warning says so."""
    peers = {
        "finder": {"ae_title": "FINDER", "hosts": ["127.0.0.3"], "roles": ["echo"]},
        "v6any": {"hosts": ["::/0"], "roles": ["echo", "find"]},
    }
    node = start_node(network={"host": "::"}, peers=peers)

    finder = _associate_to(node, "FINDER", "127.0.0.3", "127.0.0.1")
    finder_elsewhere = _associate_to(node, "FINDER", "127.0.0.4", "127.0.0.1")
    other_v4 = _associate_to(node, "OTHER", "127.0.0.2", "127.0.0.1")
    other_v6 = _associate_to(node, "OTHER", "::1", "::1")

    assert finder.is_established and other_v6.is_established
    assert finder_elsewhere.rejection_received and other_v4.rejection_received, "::/0 admits no IPv4 caller"
    finder.release()
    other_v6.release()
    log = node.log()
    assert "AE title FINDER is configured for 127.0.0.3/32, but called from 127.0.0.4" in log
    assert "no peer is configured for AE title OTHER calling from 127.0.0.2" in log
    assert "peers.v6any admits any AE title from every IPv6 address (::/0) with the roles find" in log
