"""network.maximum_associations_per_peer: one image-sending peer entry, from all its addresses together, never takes
every place from the others.

A real node; real TCP connections and pynetdicom peers from loopback addresses (127.0.1.x stands for a scanner
network given as a CIDR, 127.0.0.1 for the PACS, another entry): silent connections from forty addresses of the
scanner network, or associations from four of them held open, leave the PACS its association.
"""

from __future__ import annotations

import socket
from contextlib import ExitStack

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_node.config import Settings
from dicom_node.security import PeerPolicy
from tests.conftest import associate_seeing_rejection, wait_for

SCANNER_HOSTS = [f"127.0.1.{n}" for n in range(1, 41)]
PEERS = {
    "scanners": {"ae_title": None, "hosts": ["127.0.1.0/24"], "roles": ["store", "echo"]},
    "pacs": {"ae_title": "PACS", "hosts": ["127.0.0.1"], "roles": ["store", "echo"]},
}
NETWORK = {
    "maximum_associations": 8,  # the table of addresses then has 2 x 8 + 16 = 32 places
    "maximum_associations_per_host": 2,
    "association_request_timeout_seconds": 120,  # the silent connections stay for the whole test
    "network_timeout_seconds": 120,
}


def still_open(connection: socket.socket) -> bool:
    """Whether the node kept the connection (a closed one reads as end of file at once)."""
    connection.settimeout(1.0)
    try:
        return connection.recv(1) != b""
    except TimeoutError:
        return True
    except OSError:
        return False


def pacs_echo(node) -> tuple[bool, str]:
    """The PACS associates and echoes: (whether it worked, the node's log tail for the failure message)."""
    ae = AE(ae_title="PACS")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 30
    ae.add_requested_context(Verification)
    assoc = associate_seeing_rejection(ae, "127.0.0.1", node.port, ae_title=node.ae_title)
    try:
        return assoc.is_established and assoc.send_c_echo().Status == 0x0000, node.log()[-2000:]
    finally:
        if assoc.is_established:
            assoc.release()


@pytest.mark.integration
def test_silent_connections_from_a_scanner_networks_many_addresses_leave_the_pacs_its_place(start_node):
    """Forty addresses each open a TCP connection and send nothing: before, they filled the node's table of
    addresses and every new caller was refused ("as many connections as it can track")."""
    node = start_node(peers=PEERS, network=NETWORK)
    wait_for(lambda: "node.ready" in node.log(), what="the node to be ready")
    with ExitStack() as stack:
        silent = []
        for host in SCANNER_HOSTS:
            connection = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            connection.bind((host, 0))
            connection.connect(("127.0.0.1", node.port))
            silent.append(connection)
        kept = [connection for connection in silent if still_open(connection)]

        worked, log = pacs_echo(node)

        assert worked, log
        assert len(kept) == 6, log  # three quarters of maximum_associations for the whole network
    assert (
        "connections of peer 'scanners' are already open from its addresses together "
        "(network.maximum_associations_per_peer is 6, so one peer never takes every place from the others)"
    ) in node.log()


@pytest.mark.integration
def test_associations_held_from_several_addresses_of_one_peer_leave_the_pacs_its_place(start_node):
    """Two associations from each of four scanner addresses, each kept alive: one peer would hold all eight places
    of maximum_associations; it holds six, and the PACS associates."""
    node = start_node(peers=PEERS, network=NETWORK)
    wait_for(lambda: "node.ready" in node.log(), what="the node to be ready")
    ae = AE(ae_title="SCANNER")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 30
    ae.add_requested_context(Verification)
    tried = [
        associate_seeing_rejection(ae, "127.0.0.1", node.port, ae_title=node.ae_title, bind_address=(host, 0))
        for host in SCANNER_HOSTS[:4]
        for _ in range(2)
    ]
    held = [assoc for assoc in tried if assoc.is_established]
    try:
        worked, log = pacs_echo(node)

        assert len(held) == 6, log
        assert worked, log
    finally:
        for assoc in held:
            assoc.release()


def test_an_address_counts_in_the_most_specific_peer_entry_and_any_host_entries_share_nothing():
    """A PACS at 10.1.9.9 inside a scanner network 10.1.0.0/16 listed before it is the PACS; an entry that admits
    any host (the deprecated AE title allow-list) is no group of addresses to share places by."""
    policy = PeerPolicy.from_settings(
        Settings(
            peers={
                "scanners": {"hosts": ["10.1.0.0/16"], "roles": ["store"]},
                "pacs": {"ae_title": "PACS", "hosts": ["10.1.9.9"], "roles": ["store", "find"]},
                "anyone": {"ae_title": "ANY", "hosts": ["0.0.0.0/0"], "roles": ["store"]},
            },
            network={"allowed_calling_ae_titles": ["OLD1", "OLD2"]},
        )
    )

    assert policy.sender_at("10.1.9.9").name == "pacs"
    assert policy.sender_at("10.1.2.3").name == "scanners"
    assert policy.sender_at("192.0.2.7") is None and policy.sends_from("192.0.2.7")
    assert [peer.name for peer in policy.sending_entries()] == ["scanners", "pacs"]
