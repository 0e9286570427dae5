"""network.maximum_associations caps the image senders only; peers that send no images get places on top.

Real nodes with one and two receiving processes, real pynetdicom peers on loopback addresses holding their
associations open: an echo-only monitor on three addresses never reduces what the PACS gets, and the PACS on
two addresses never gets more than network.maximum_associations, however many processes count them.
"""

from __future__ import annotations

import os
import signal

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.conftest import associate_seeing_rejection, wait_for
from tests.test_receive_concurrency import receiver_pids

pytestmark = pytest.mark.integration

PACS_HOSTS = ["127.0.0.5", "127.0.0.6"]
MONITOR_HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
PEERS = {
    "pacs": {"ae_title": "PACS", "hosts": PACS_HOSTS, "roles": ["store", "echo"]},
    "monitor": {"ae_title": "MONITOR", "hosts": MONITOR_HOSTS, "roles": ["echo"]},
}
NETWORK = {"maximum_associations": 4, "maximum_associations_per_host": 3, "network_timeout_seconds": 120}


def open_associations(node, calling_ae: str, sources: list[str], each: int) -> tuple[list, list]:
    """``each`` associations from every source address, one after the other; (established, the others)."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 30
    ae.add_requested_context(Verification)
    tried = [
        associate_seeing_rejection(ae, "127.0.0.1", node.port, ae_title=node.ae_title, bind_address=(source, 0))
        for source in sources
        for _ in range(each)
    ]
    return [a for a in tried if a.is_established], [a for a in tried if not a.is_established]


def monitor_and_pacs(node) -> tuple[list, list, list]:
    """The monitor takes its eight places (3 + 3 + 2), then the PACS tries three from each of its two addresses."""
    monitor = open_associations(node, "MONITOR", MONITOR_HOSTS[:2], 3)[0]
    monitor += open_associations(node, "MONITOR", MONITOR_HOSTS[2:], 2)[0]
    pacs, refused = open_associations(node, "PACS", PACS_HOSTS, 3)
    return monitor, pacs, refused


def release(associations: list) -> None:
    for assoc in associations:
        assoc.release()


@pytest.mark.parametrize("processes", [1, 2])
def test_the_pacs_gets_maximum_associations_whatever_an_echo_only_monitor_holds(start_node, processes):
    node = start_node(peers=PEERS, network=NETWORK, receive={"processes": processes})
    wait_for(lambda: "node.ready" in node.log(), what="the node to be ready")

    monitor, pacs, refused = monitor_and_pacs(node)
    try:
        assert len(monitor) == 8  # the places of peers that send no images come on top
        assert len(pacs) == 4, node.log()[-3000:]  # network.maximum_associations, not reduced and not exceeded
        assert len(refused) == 2 and all(assoc.rejection_received for assoc in refused)
        assert monitor[0].send_c_echo().Status == 0x0000 and pacs[0].send_c_echo().Status == 0x0000
    finally:
        release(monitor + pacs)
    assert "other connections of peers that send images are open (network.maximum_associations is 4)" in node.log()


def test_a_dead_receiving_process_gives_back_the_places_of_senders_and_of_peers_that_send_none(start_node):
    node = start_node(peers=PEERS, network=NETWORK, receive={"processes": 2})
    wait_for(lambda: "node.ready" in node.log(), what="the node to be ready")
    pids = receiver_pids(node.log())
    monitor, pacs, _ = monitor_and_pacs(node)
    assert (len(monitor), len(pacs)) == (8, 4), node.log()[-3000:]
    for pid in pids.values():  # both die holding their places, without giving any back
        os.kill(pid, signal.SIGKILL)
    for assoc in monitor + pacs:
        assoc.abort()
    wait_for(
        lambda: set(receiver_pids(node.log()).values()).isdisjoint(pids.values()),
        timeout=90,
        what="both receiving processes started again",
    )

    monitor, pacs, _ = monitor_and_pacs(node)
    release(monitor + pacs)
    assert (len(monitor), len(pacs)) == (8, 4), node.log()[-3000:]
