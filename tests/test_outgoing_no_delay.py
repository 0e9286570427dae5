"""The node's own outgoing associations (sending results, a C-MOVE's sub-association) send each small PDU at once:
TCP_NODELAY on their sockets, as on the associations it accepts. Without it, each instance of a C-MOVE waited for the
destination's delayed acknowledgement (bench/retrieve_speed.py: 300 small instances in 31 s instead of 18 s)."""

from __future__ import annotations

import socket

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from dicom_node.scu import AssociationWatch

pytestmark = pytest.mark.integration


def test_an_association_the_node_opens_sends_without_nagles_delay():
    peer = AE(ae_title="PEER")
    peer.add_supported_context(Verification)
    server = peer.start_server(("127.0.0.1", 0), block=False)
    seen: list[int] = []

    def option(event: evt.Event) -> None:
        seen.append(event.assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    try:
        ae = AE(ae_title="DICOMNODE")
        ae.add_requested_context(Verification)
        port = server.server_address[1]
        assoc = AssociationWatch().associate(ae, "127.0.0.1", port, "PEER", evt_handlers=[(evt.EVT_ACCEPTED, option)])
        assert assoc.is_established
        assoc.release()
    finally:
        server.shutdown()

    assert seen and seen[0] != 0
