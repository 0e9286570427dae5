"""DICOM TLS both ways: DCMTK's TLS tools and Orthanc (DICOM TLS on) against the node, with a test PKI."""

from __future__ import annotations

import socket
import ssl
import subprocess
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

from db.models import JobState
from dicom_node.phantom import PhantomSpec, write_phantom_series
from tests.conftest import CT_RULES, DICOM_NODE, Certificates, free_port, require_tool, wait_for

pytestmark = pytest.mark.integration

SMALL_CT = PhantomSpec(rows=48, columns=48, slices=12, pixel_spacing=(5.0, 5.0), slice_spacing=5.0)


def node_tls(certificates: Certificates, **extra: object) -> dict[str, object]:
    return {
        "certificate": str(certificates.node),
        "private_key": str(certificates.node_key),
        "ca_certificates": str(certificates.ca),
        "require_client_certificate": True,
        **extra,
    }


def dcmtk(
    tool: str,
    port: int,
    *arguments: str,
    tls: tuple[Path, Path] | None,
    ca: Path | None,
    files: tuple[Path, ...] = (),
    calling_ae: str = "PEER",
) -> str:
    """Run a DCMTK tool against the node; with ``tls`` = (key, certificate) over TLS trusting ``ca``."""
    command = [require_tool(tool), "-v", "-aet", calling_ae, "-aec", "DICOMNODE"]
    if tls is not None:
        command += ["+tls", str(tls[0]), str(tls[1])]
    if ca is not None:
        command += ["+cf", str(ca)]
    command += [*arguments, "127.0.0.1", str(port), *map(str, files)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    return result.stdout + result.stderr + f"\n(exit {result.returncode})"


def test_dcmtk_echoes_stores_and_finds_over_mutual_tls(tmp_path, start_node, certificates):
    node = start_node(network={"tls": node_tls(certificates)})
    series = write_phantom_series(tmp_path / "ct", SMALL_CT)
    peer = (certificates.peer_key, certificates.peer)

    echoed = dcmtk("echoscu", node.port, tls=peer, ca=certificates.ca)
    stored = dcmtk("storescu", node.port, tls=peer, ca=certificates.ca, files=tuple(series.files))
    found = dcmtk(
        "findscu",
        node.port,
        "-S",
        "-k",
        "QueryRetrieveLevel=SERIES",
        "-k",
        f"StudyInstanceUID={series.study_instance_uid}",
        "-k",
        "SeriesInstanceUID",
        tls=peer,
        ca=certificates.ca,
    )

    assert "Received Echo Response (Success)" in echoed, echoed
    assert stored.count("Received Store Response (Success)") == len(series.files), stored
    assert series.series_instance_uid in found and "Received Final Find Response (Success)" in found, found
    assert "tls=on" in node.log()


def test_plain_tcp_and_an_untrusted_certificate_are_refused_on_the_tls_port(start_node, certificates):
    node = start_node(network={"tls": node_tls(certificates)})

    plain = dcmtk("echoscu", node.port, tls=None, ca=None)
    stranger = dcmtk("echoscu", node.port, tls=(certificates.stranger_key, certificates.stranger), ca=certificates.ca)
    anonymous = dcmtk("echoscu", node.port, "+tla", tls=None, ca=certificates.ca)
    genuine = dcmtk("echoscu", node.port, tls=(certificates.peer_key, certificates.peer), ca=certificates.ca)

    for refused in (plain, stranger, anonymous):
        assert "Received Echo Response (Success)" not in refused and "(exit 0)" not in refused, refused
    assert "Received Echo Response (Success)" in genuine, genuine
    log = node.log()  # each refusal says why in words, OpenSSL's code kept for a search
    for said in (
        "the caller did not speak TLS (plain DICOM to the TLS port?) [WRONG_VERSION_NUMBER]",
        "the caller's certificate is not signed by a CA in network.tls.ca_certificates, or is expired or not valid "
        "yet [CERTIFICATE_VERIFY_FAILED]",
        "the caller sent no certificate, and network.tls.require_client_certificate is on "
        "[PEER_DID_NOT_RETURN_A_CERTIFICATE]",
    ):
        assert f'connection.refused address=127.0.0.1 reason="TLS handshake failed: {said}"' in log, log


def test_a_peer_bound_to_its_certificate_is_refused_under_another_trusted_certificate(start_node, certificates):
    """A certificate the CA signed for another device may not claim this peer's AE title and roles; names are
    compared without regard to case, as DNS names are, and shown as configured."""
    bound = {"ae_title": "PEER", "hosts": ["127.0.0.1"], "roles": ["echo", "find"], "certificate_names": ["Peer"]}
    monitor = {"ae_title": "MONITOR", "hosts": ["127.0.0.1"], "roles": ["echo"]}
    node = start_node(network={"tls": node_tls(certificates)}, peers={"planner": bound, "monitor": monitor})
    peer = (certificates.peer_key, certificates.peer)
    colleague = (certificates.colleague_key, certificates.colleague)

    own = dcmtk("echoscu", node.port, tls=peer, ca=certificates.ca)
    borrowed = dcmtk("echoscu", node.port, tls=colleague, ca=certificates.ca)
    unbound = dcmtk("echoscu", node.port, tls=colleague, ca=certificates.ca, calling_ae="MONITOR")

    assert "Received Echo Response (Success)" in own, own
    assert "Association Rejected" in borrowed and "Received Echo Response (Success)" not in borrowed, borrowed
    assert "Received Echo Response (Success)" in unbound, unbound
    assert (
        "the TLS certificate presented (names: COLLEAGUE, 127.0.0.1, localhost) is not one configured for peer "
        "planner (peers.planner.certificate_names: Peer)"
    ) in node.log()
    assert (
        'config.unbound_peer peer=monitor hint="any certificate your CA signed may call as peer monitor (MONITOR) '
        'with its roles (echo); bind it with peers.monitor.certificate_names"'
    ) in node.log()
    assert "peer=planner" not in node.log()


def test_echo_reaches_a_tls_peer_that_verifies_the_nodes_certificate(tmp_path, certificates):
    port = free_port()
    scp = subprocess.Popen(
        [
            require_tool("storescp"),
            "-aet",
            "TLSPEER",
            "+tls",
            str(certificates.peer_key),
            str(certificates.peer),
            "+cf",
            str(certificates.ca),
            "-od",
            str(tmp_path),
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    config = tmp_path / "config.yaml"

    def echo(tls_key: Path, tls_certificate: Path) -> subprocess.CompletedProcess[str]:
        config.write_text(
            "network:\n"
            f"  tls: {{certificate: {tls_certificate}, private_key: {tls_key}, ca_certificates: {certificates.ca}}}\n"
            f"destinations:\n  peer: {{ae_title: TLSPEER, host: 127.0.0.1, port: {port}, tls: true}}\n"
        )
        return subprocess.run([DICOM_NODE, "echo", "peer", "--config", str(config)], capture_output=True, text=True)

    try:
        ok = wait_for(
            lambda: (r := echo(certificates.node_key, certificates.node)).returncode == 0 and r,
            timeout=20,
            what="storescp to answer over TLS",
        )
        untrusted = echo(certificates.stranger_key, certificates.stranger)
    finally:
        scp.terminate()
        scp.wait(timeout=10)
    assert "C-ECHO TLSPEER@127.0.0.1" in ok.stdout and "success" in ok.stdout
    assert untrusted.returncode == 1 and "FAILED" in untrusted.stderr


@pytest.mark.parametrize(
    ("config_text", "error"),
    [
        (
            "destinations:\n  pacs: {ae_title: PACS, host: 127.0.0.1, port: 104, tls: true}\n",
            "destinations.pacs: tls: true needs network.tls",
        ),
        (
            "peers:\n  planner: {hosts: [10.0.0.0/8], roles: [get], certificate_names: [PLANNER]}\n",
            "peers.planner: certificate_names needs mutual TLS",
        ),
    ],
    ids=["tls-destination", "certificate-names"],
)
def test_tls_settings_without_network_tls_are_a_configuration_error(tmp_path, config_text, error):
    config = tmp_path / "config.yaml"
    config.write_text(config_text)
    result = subprocess.run([DICOM_NODE, "config", "check", "--config", str(config)], capture_output=True, text=True)
    assert result.returncode != 0
    assert error in result.stderr


def test_orthanc_sends_to_the_node_and_receives_its_results_over_dicom_tls(
    tmp_path, start_node, start_orthanc, certificates
):
    node_port = free_port()
    orthanc = start_orthanc(
        {"node": {"AET": "DICOMNODE", "Host": "127.0.0.1", "Port": node_port, "UseDicomTls": True}},
        extra_config={
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(certificates.peer),
            "DicomTlsPrivateKey": str(certificates.peer_key),
            "DicomTlsTrustedCertificates": str(certificates.ca),
            "DicomTlsRemoteCertificateRequired": True,
        },
    )
    node = start_node(
        network={"port": node_port, "tls": node_tls(certificates)},
        destinations={
            "orthanc": {"ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port, "tls": True}
        },
        rules=[{**CT_RULES[0], "destinations": ["orthanc"]}],
        inference={"workers": 1},
        dispatch={"first_retry_seconds": 1},
    )
    series = write_phantom_series(tmp_path / "ct", SMALL_CT)
    uploaded = [orthanc.upload(path) for path in series.files]

    orthanc.post_json("/modalities/node/store", {"Resources": [u["ID"] for u in uploaded], "Synchronous": True})
    node.wait_for_state(series.series_instance_uid, JobState.DONE, timeout=180)

    segs = wait_for(
        lambda: orthanc.post_json("/tools/find", {"Level": "Series", "Query": {"Modality": "SEG"}}),
        timeout=30,
        what="the SEG in Orthanc",
    )
    assert len(segs) == 1
    assert "association.accepted calling_ae=ORTHANC" in node.log()


def test_move_sub_operations_go_to_a_tls_peer_over_tls(tmp_path, start_node, certificates):
    planner_port = free_port()
    received = tmp_path / "received"
    received.mkdir()
    scp = subprocess.Popen(
        [
            require_tool("storescp"),
            "-aet",
            "PLANNER",
            "+tls",
            str(certificates.peer_key),
            str(certificates.peer),
            "+cf",
            str(certificates.ca),
            "-od",
            str(received),
            str(planner_port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    node = start_node(
        network={"tls": node_tls(certificates)},
        peers={
            "pacs": {"ae_title": "PEER", "hosts": ["127.0.0.1"], "roles": ["store", "move"]},
            "planner": {
                "ae_title": "PLANNER",
                "hosts": ["127.0.0.1"],
                "roles": ["move"],
                "host": "127.0.0.1",
                "port": planner_port,
                "tls": True,
            },
        },
    )
    series = write_phantom_series(tmp_path / "ct", SMALL_CT)
    peer = (certificates.peer_key, certificates.peer)
    try:
        stored = dcmtk("storescu", node.port, tls=peer, ca=certificates.ca, files=tuple(series.files[:3]))
        assert stored.count("Received Store Response (Success)") == 3, stored
        moved = move_over_tls(node.port, certificates, series.study_instance_uid, series.series_instance_uid)
        files = wait_for(
            lambda: len(list(received.iterdir())) == 3 and list(received.iterdir()),
            timeout=20,
            what="the moved instances at the TLS peer",
        )
    finally:
        scp.terminate()
        scp.wait(timeout=10)
    assert moved == 0x0000
    assert len(files) == 3


def move_over_tls(port: int, certificates: Certificates, study_uid: str, series_uid: str) -> int:
    """C-MOVE a series to PLANNER as PEER over mutual TLS (DCMTK 3.6.7's movescu has no TLS); the final status."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certificates.ca))
    context.load_cert_chain(str(certificates.peer), str(certificates.peer_key))
    ae = AE(ae_title="PEER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE", tls_args=(context, "127.0.0.1"))
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES"
    identifier.StudyInstanceUID = study_uid
    identifier.SeriesInstanceUID = series_uid
    try:
        statuses = [
            int(status.Status)
            for status, _ in assoc.send_c_move(identifier, "PLANNER", StudyRootQueryRetrieveInformationModelMove)
            if "Status" in status
        ]
    finally:
        assoc.release()
    return statuses[-1]


def test_clients_that_never_finish_the_tls_handshake_block_no_one(start_node, certificates):
    node = start_node(network={"tls": node_tls(certificates), "association_request_timeout_seconds": 2})
    stalled = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(3)]
    try:
        for sock in stalled:
            sock.sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello, and nothing more
        genuine = dcmtk("echoscu", node.port, tls=(certificates.peer_key, certificates.peer), ca=certificates.ca)
        assert "Received Echo Response (Success)" in genuine, genuine
        wait_for(lambda: all(_closed(s) for s in stalled), timeout=30, what="the stalled handshakes to be closed")
    finally:
        for sock in stalled:
            sock.close()
    assert 'connection.refused address=127.0.0.1 reason="no TLS handshake in time"' in node.log()


def _closed(sock: socket.socket) -> bool:
    sock.settimeout(0.2)
    try:
        return sock.recv(4096) == b""
    except TimeoutError:
        return False
    except OSError:
        return True
