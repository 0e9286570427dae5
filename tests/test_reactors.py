"""Accepted associations sleep until there is work, and still serve, release, abort and time out (dicom_node.reactors).

The server here is the node's own guarded server (in this process, so its threads
can be watched); the peer is pynetdicom's requestor over real loopback TCP.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from dicom_node.config import NetworkSettings
from dicom_node.reactors import IDLE_CHECK_SECONDS, EventDrivenAssociation, EventDrivenDUL
from dicom_node.security import GuardedServer, start_guarded_server
from tests.conftest import changed_sources, free_port, wait_for

MIRRORED: dict[Callable[..., Any], str] = {
    Association._run_reactor: "f28838c5559e462a",
    Association.kill: "8f9713666a7f4cff",
    DULServiceProvider.run_reactor: "e3a10eb3a0931e48",
    DULServiceProvider._is_transport_event: "8725ed03bb8fbdef",
    DULServiceProvider.stop_dul: "28a7e0be126e7b30",
    DULServiceProvider.send_pdu: "7cbce5da8594124e",
    DULServiceProvider.kill_dul: "5ceccf8dd01c2072",
}
"""pynetdicom 3.0.4's methods that dicom_node.reactors copies or wraps, by a hash of their source."""


def test_the_pynetdicom_loops_the_node_replaces_are_the_ones_it_was_written_against():
    changed = changed_sources(MIRRORED)
    assert not changed, (
        f"pynetdicom changed {', '.join(changed)}: compare them with dicom_node/reactors.py, "
        "bring its loops in line, then update MIRRORED here"
    )


class Counted:
    """Counts calls of a bound method, in place of it on the instance."""

    def __init__(self, owner: Any, name: str) -> None:
        self.calls = 0
        self._method = getattr(owner, name)
        setattr(owner, name, self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self._method(*args, **kwargs)


@pytest.fixture
def serve() -> Iterator[Callable[..., GuardedServer]]:
    """Start the node's guarded server with a C-STORE and C-ECHO handler; ``serve(network_timeout_seconds=...)``."""
    servers: list[GuardedServer] = []

    def _serve(**network: Any) -> GuardedServer:
        settings = NetworkSettings(ae_title="NODE", host="127.0.0.1", port=free_port(), **network)
        ae = AE(ae_title="NODE")
        ae.add_supported_context(Verification)
        ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.network_timeout = settings.network_timeout_seconds
        stored: list[str] = []

        def on_store(event: evt.Event) -> int:
            stored.append(event.request.AffectedSOPInstanceUID)
            return 0x0000

        handlers = [(evt.EVT_C_STORE, on_store), (evt.EVT_C_ECHO, lambda event: 0x0000)]
        server = start_guarded_server(ae, (settings.host, settings.port), settings, handlers)
        server.stored = stored  # type: ignore[attr-defined]
        servers.append(server)
        return server

    yield _serve
    for server in servers:
        server.shutdown()


def requestor(server: GuardedServer) -> Any:
    ae = AE(ae_title="PEER")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    host, port = server.server_address[:2]
    assoc = ae.associate(host, port, ae_title="NODE")
    assert assoc.is_established
    return assoc


def accepted(server: GuardedServer) -> Association:
    return wait_for(lambda: next(iter(server.active_associations), None), timeout=5, what="accepted association")


def ct_instance() -> Dataset:
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPClassUID = CTImageStorage
    dataset.SOPInstanceUID = generate_uid()
    dataset.Modality = "CT"
    return dataset


def test_an_idle_association_wakes_its_two_threads_only_to_check_its_timers(serve):
    server = serve()
    assoc = requestor(server)
    acceptor = accepted(server)
    assert isinstance(acceptor, EventDrivenAssociation) and isinstance(acceptor.dul, EventDrivenDUL)
    association_turns = Counted(acceptor.dimse, "get_msg")  # once per turn of the association loop
    dul_turns = Counted(acceptor.dul, "_is_transport_event")  # once per idle turn of the DUL loop
    time.sleep(1.0)
    # pynetdicom's own loops turn about 900 (1 ms sleep) and thousands (run_loop_delay) of times a second
    most = 2 / IDLE_CHECK_SECONDS
    assert association_turns.calls <= most and dul_turns.calls <= most, (association_turns.calls, dul_turns.calls)
    assert assoc.send_c_echo().Status == 0x0000  # and the next request still wakes them
    assoc.release()


def test_stores_echoes_and_release_are_answered_and_the_threads_end(serve):
    server = serve()
    assoc = requestor(server)
    acceptor = accepted(server)
    sent = [ct_instance() for _ in range(20)]
    statuses = [assoc.send_c_store(dataset).Status for dataset in sent]
    assert statuses == [0x0000] * 20
    assert server.stored == [dataset.SOPInstanceUID for dataset in sent]  # type: ignore[attr-defined]
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert assoc.is_released
    wait_for(lambda: not acceptor.is_alive() and not acceptor.dul.is_alive(), timeout=5, what="threads ended")
    assert isinstance(acceptor.dul, EventDrivenDUL)
    assert all(end.fileno() == -1 for end in acceptor.dul._doorbell)  # closed with the DUL thread


def test_a_peer_abort_ends_the_association_at_once(serve):
    server = serve()
    aborted = threading.Event()
    assoc = requestor(server)
    acceptor = accepted(server)
    acceptor.bind(evt.EVT_ABORTED, lambda event: aborted.set())
    assoc.abort()
    assert aborted.wait(timeout=5)
    wait_for(lambda: not acceptor.is_alive() and not acceptor.dul.is_alive(), timeout=5, what="threads ended")


def test_a_silent_peer_is_still_dropped_after_the_network_timeout(serve):
    server = serve(network_timeout_seconds=1)
    assoc = requestor(server)
    acceptor = accepted(server)
    wait_for(lambda: not acceptor.is_alive(), timeout=10, what="the node to drop the silent association")
    wait_for(lambda: not assoc.is_established, timeout=10, what="the peer to see the association end")
