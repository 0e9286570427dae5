"""Outgoing DICOM: the node as a service user (C-ECHO now; C-STORE of results later)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from pynetdicom import AE
from pynetdicom.sop_class import Verification


@dataclass(frozen=True)
class EchoResult:
    ok: bool
    message: str
    seconds: float


def verify(calling_ae: str, called_ae: str, host: str, port: int, *, timeout: float = 10.0) -> EchoResult:
    """C-ECHO a peer; never raises for network trouble, it reports it."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    started = time.perf_counter()
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        reason = "association rejected" if assoc.is_rejected else "no association (peer down or unreachable)"
        return EchoResult(False, reason, time.perf_counter() - started)
    try:
        response = assoc.send_c_echo()
    finally:
        assoc.release()
    elapsed = time.perf_counter() - started
    if response and response.get("Status") == 0x0000:
        return EchoResult(True, "success", elapsed)
    code = response.get("Status") if response else None
    return EchoResult(False, f"status {code!r}" if code is not None else "no response", elapsed)
