"""Logging set-up: pynetdicom's per-PDU log handlers are bound only when their lines are kept (DEBUG)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from pynetdicom import AE, _config, evt
from pynetdicom._handlers import standard_pdu_recv_handler
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.config import NetworkSettings
from dicom_node.logs import configure_logging
from dicom_node.receive import scp
from dicom_node.security import start_guarded_server
from tests.conftest import free_port


@pytest.fixture
def restored_logging(monkeypatch) -> Iterator[None]:
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", _config.LOG_HANDLER_LEVEL)
    root, pynetdicom_logger = logging.getLogger(), logging.getLogger("pynetdicom")
    saved = (root.handlers[:], root.level, pynetdicom_logger.level)
    yield
    root.handlers[:], _, _ = saved
    root.setLevel(saved[1])
    pynetdicom_logger.setLevel(saved[2])


def _accepted_association_after_echo() -> Any:
    """The node's side of one C-ECHO association, served by the node's own server."""
    network = NetworkSettings(ae_title="NODE", host="127.0.0.1", port=free_port())
    accepted: list[Any] = []

    def on_echo(event: evt.Event) -> int:
        accepted.append(event.assoc)
        return 0x0000

    server = start_guarded_server(
        scp.build_ae(network), (network.host, network.port), network, [(evt.EVT_C_ECHO, on_echo)]
    )
    try:
        ae = AE(ae_title="PACS")
        ae.add_requested_context(Verification)
        assoc = ae.associate(network.host, network.port, ae_title=network.ae_title)
        assert assoc.is_established
        assert int(assoc.send_c_echo().Status) == 0x0000
        assoc.release()
    finally:
        server.shutdown()
    return accepted[0]


def test_pynetdicom_per_pdu_log_handlers_are_bound_only_at_debug(restored_logging):
    configure_logging("INFO")
    quiet = _accepted_association_after_echo()
    configure_logging("DEBUG")
    verbose = _accepted_association_after_echo()

    assert quiet.get_handlers(evt.EVT_PDU_RECV) == []
    assert quiet.get_handlers(evt.EVT_DIMSE_SENT) == []
    assert (standard_pdu_recv_handler, None) in verbose.get_handlers(evt.EVT_PDU_RECV)
    assert logging.getLogger("pynetdicom").isEnabledFor(logging.INFO)


def test_the_throttle_lets_one_event_per_key_through_each_interval_and_counts_the_rest(monkeypatch):
    from dicom_node import logs

    clock = [100.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: clock[0])
    throttle = logs.Throttle(10.0, max_keys=3)

    assert [throttle.admit(key) for key in ("a", "b", "c")] == [0, 0, 0]
    assert [throttle.admit("a") for _ in range(5)] == [None] * 5  # counted, not let through
    clock[0] += 10.0
    assert throttle.admit("a") == 5  # the next one says how many were dropped

    assert [throttle.admit("a") for _ in range(2)] == [None, None]
    assert throttle.admit("d") == 0  # full: "b", used least recently, makes room; nothing of it was dropped
    assert throttle.admit("e") == 0 and throttle.admit("f") == 0  # "c", then "a" with its 2 dropped events
    assert throttle.evicted_events() == 2 and throttle.evicted_events() == 0  # reported once
