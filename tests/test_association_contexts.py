"""Accepted associations share the server's presentation contexts instead of deep-copying them (SharedContexts).

The server is the node's own guarded server with the node's AE (every storage SOP
class, Q/R, Verification) and its peer check, in this process; the peers are
pynetdicom requestors over real loopback TCP.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import AE, build_role, evt
from pynetdicom.presentation import negotiate_as_acceptor
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification  # type: ignore[attr-defined]
from pynetdicom.transport import RequestHandler

from dicom_node.config import NetworkSettings
from dicom_node.receive.scp import build_ae
from dicom_node.security import (
    GuardedServer,
    Peer,
    PeerPolicy,
    Refused,
    SharedContexts,
    on_requested,
    start_guarded_server,
)
from tests.conftest import changed_sources, free_port

READ_ONLY_USERS: dict[Any, str] = {
    RequestHandler._create_association: "05c8d12b79863cdb",
    negotiate_as_acceptor: "d5413f08f0ac7b32",
}
"""pynetdicom 3.0.4's code that copies (the first) and reads (the second) the server's contexts, by a hash of its source."""


def test_the_pynetdicom_code_that_uses_the_shared_contexts_is_the_one_it_was_written_against():
    changed = changed_sources(READ_ONLY_USERS)
    assert not changed, (
        f"pynetdicom changed {', '.join(changed)}: check that accepting an association still only reads the "
        "server's presentation contexts (dicom_node.security.SharedContexts), then update READ_ONLY_USERS here"
    )


def snapshot(contexts: list[Any]) -> list[tuple[object, ...]]:
    return [
        (cx.abstract_syntax, tuple(cx.transfer_syntax), cx.scu_role, cx.scp_role, cx.context_id, cx.result)
        for cx in contexts
    ]


@pytest.fixture
def server() -> Iterator[GuardedServer]:
    """The node's AE behind its guarded server; PEER may store and echo, ECHOER may only echo."""
    settings = NetworkSettings(ae_title="NODE", host="127.0.0.1", port=free_port())
    loopback = (ipaddress.ip_network("127.0.0.0/8"),)
    policy = PeerPolicy(
        [
            Peer("pacs", "PEER", loopback, frozenset({"store", "echo"})),
            Peer("monitor", "ECHOER", loopback, frozenset({"echo"})),
        ],
        "test peers",
    )
    seen: list[list[Any]] = []

    def keep_contexts(event: evt.Event) -> None:
        seen.append(event.assoc.acceptor.supported_contexts)

    handlers = [
        (evt.EVT_REQUESTED, on_requested, [policy, None]),
        (evt.EVT_ACCEPTED, keep_contexts),
        (evt.EVT_C_ECHO, lambda event: 0x0000),
        (evt.EVT_C_STORE, lambda event: 0x0000),
    ]
    guarded = start_guarded_server(build_ae(settings), (settings.host, settings.port), settings, handlers)
    guarded.seen = seen  # type: ignore[attr-defined]
    yield guarded
    guarded.shutdown()


def associate(server: GuardedServer, calling_ae: str, *, roles: bool = False) -> Any:
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, [JPEG2000Lossless, ExplicitVRLittleEndian])
    ae.add_requested_context(MRImageStorage, ImplicitVRLittleEndian)
    host, port = server.server_address[:2]
    role_items = [build_role(CTImageStorage, scu_role=True, scp_role=True)] if roles else []
    assoc = ae.associate(host, port, ae_title="NODE", ext_neg=role_items)
    assert assoc.is_established
    return assoc


def accepted(assoc: Any) -> dict[str, str]:
    """Abstract syntax -> the transfer syntax the node accepted, for each accepted context."""
    return {str(cx.abstract_syntax): str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}


def test_associations_share_the_servers_contexts_and_negotiation_leaves_them_unchanged(server):
    assert isinstance(server.contexts, SharedContexts)
    before = snapshot(server.contexts)

    with_roles = associate(server, "PEER", roles=True)  # SCP/SCU role selection for CT
    echo_only = associate(server, "ECHOER")  # its storage contexts are narrowed away
    plain = associate(server, "PEER")

    expected = {  # the node's own order of transfer syntaxes decides: uncompressed first
        str(Verification): str(ExplicitVRLittleEndian),
        str(CTImageStorage): str(ExplicitVRLittleEndian),
        str(MRImageStorage): str(ImplicitVRLittleEndian),
    }
    assert accepted(with_roles) == accepted(plain) == expected
    assert accepted(echo_only) == {str(Verification): str(ExplicitVRLittleEndian)}
    for assoc in (with_roles, echo_only, plain):
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()

    assert snapshot(server.contexts) == before
    shared = {id(cx) for cx in server.contexts}
    assert len(server.seen) == 3  # type: ignore[attr-defined]
    for contexts in server.seen:  # type: ignore[attr-defined]
        assert contexts is not server.contexts  # each association has its own list (on_requested replaces it) ...
        assert {id(cx) for cx in contexts} <= shared  # ... of the server's own, uncopied contexts


class BrokenPolicy(PeerPolicy):
    """A peer policy whose check fails with an internal error, as a bug in it would."""

    def identify(self, ae_title: str, address: str) -> Peer | Refused:
        raise RuntimeError("a bug in the peer check")


def test_an_error_while_checking_the_caller_rejects_the_association_rather_than_admitting_it(caplog):
    """pynetdicom goes on negotiating when an EVT_REQUESTED handler raises: the node's handler must fail closed."""
    settings = NetworkSettings(ae_title="NODE", host="127.0.0.1", port=free_port())
    handlers = [
        (evt.EVT_REQUESTED, on_requested, [BrokenPolicy([], "broken"), None]),
        (evt.EVT_C_ECHO, lambda event: 0x0000),
    ]
    guarded = start_guarded_server(build_ae(settings), (settings.host, settings.port), settings, handlers)
    try:
        ae = AE(ae_title="ANYONE")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", settings.port, ae_title="NODE")
        assert assoc.is_rejected and not assoc.is_established
    finally:
        guarded.shutdown()
    reasons = [
        getattr(r, "event_fields", {}).get("reason", "") for r in caplog.records if r.msg == "association.rejected"
    ]
    assert any("could not check this caller against the configured peers" in reason for reason in reasons), reasons
