"""The C-STORE sub-operations of a C-GET or C-MOVE: each bounded in time, each outcome counted.

pynetdicom sends each data set a retrieval handler yields (over the requestor's own association for a C-GET,
over a sub-association to the move destination for a C-MOVE) and counts the peer's answers out of the
handler's sight. :class:`SubOperations` counts them too, from the C-STORE responses that association
receives, so the handler yields the final status itself: the audit record, written once that status is
answered, says what the peer heard.

Each send waits for its response ``timeout_seconds`` + its size in MB x ``seconds_per_megabyte`` (as the
dispatcher does, from the same settings). A peer that stops reading mid-instance blocks the send for ever:
past that wait, and a grace, :func:`dicom_node.stall.watchdog` cuts the association, the instance counts as
failed, and the retrieval ends. Over a C-GET requestor's own association the node's send bound
(``network.pdu_read_timeout_seconds``) usually cuts it first; that too is told apart from a peer that closed
its association.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.status import STATUS_FAILURE, STATUS_SUCCESS, STATUS_WARNING, STORAGE_SERVICE_CLASS_STATUS

from dicom_node.stall import CUT_GRACE_SECONDS, watchdog

PENDING = 0xFF00
SUCCESS = 0x0000
SUB_OPERATIONS_FAILED = 0xB000  # warning: one or more sub-operations failed or stored with a warning
UNABLE_TO_PERFORM = 0xA702  # failure: none of the sub-operations could be performed
IGNORED_FINAL_STATUS = "but these will be ignored as the sub-operations are complete"
"""What pynetdicom warns when a handler yields a status after its last sub-operation (it answers its own)."""


@dataclass(frozen=True)
class SendLimits:
    """How long one C-STORE sub-operation may take: ``dispatch.timeout_seconds`` + its size in MB x
    ``dispatch.seconds_per_megabyte``, the time the node gives any peer it stores to."""

    timeout_seconds: float = 30.0
    seconds_per_megabyte: float = 1.0

    def wait(self, size_bytes: int) -> float:
        """Seconds to wait for the response to a C-STORE of ``size_bytes``."""
        return self.timeout_seconds + size_bytes / 1_000_000 * self.seconds_per_megabyte


P_DATA_TF = 0x04
LAST_DATA_SET_FRAGMENT = 0x02  # message control header: the last fragment (bit 1) of a data set (bit 0 clear)


def data_set_ended(pdu: bytes) -> bool:
    """Whether a P-DATA-TF PDU as sent carries the last fragment of a data set (the whole instance went out)."""
    if len(pdu) < 6 or pdu[0] != P_DATA_TF:
        return False
    control, offset = None, 6
    while offset + 6 <= len(pdu):  # each PDV: item length (4), presentation context ID (1), control header (1)
        control = pdu[offset + 5]
        offset += 4 + int.from_bytes(pdu[offset : offset + 4], "big")
    return control is not None and control & 0x03 == LAST_DATA_SET_FRAGMENT


def association_ended(assoc: Any) -> bool:
    """Whether the association is over or ending: pynetdicom returns from a send whose association was cut before
    its own thread has marked it no longer established."""
    return assoc is None or not assoc.is_established or assoc.acse.is_aborted()


class SubOperations:
    """What the peer answered to each C-STORE of one retrieval: stored, stored with a warning, or failed.

    ``send_bound_seconds`` is the node's own bound on each send over the association, when it has one: a C-GET
    goes over the requestor's association, whose sends must each leave within ``network.pdu_read_timeout_seconds``
    (:class:`dicom_node.security.GuardedSocket`), which then cuts a peer that stopped reading before the watchdog
    here does."""

    def __init__(self, send_bound_seconds: float | None = None) -> None:
        self.completed = 0
        self.warned = 0
        self.failed: list[str] = []  # SOP Instance UIDs the peer did not store
        self.send_bound_seconds = send_bound_seconds
        self._responses: list[int | None] = []  # the status of each C-STORE response received, in order
        self._progress = 0.0  # when the association last sent a PDU out
        self._data_set_out = False  # whether the instance being sent went out whole

    def on_message(self, event: evt.Event) -> None:
        """``EVT_DIMSE_RECV`` of the association the instances go over: note each C-STORE response's status."""
        message = event.message
        if isinstance(message, C_STORE_RSP):
            status = message.command_set.get("Status")
            self._responses.append(int(status) if status is not None else None)

    def on_sent(self, event: evt.Event) -> None:
        """``EVT_DATA_SENT`` of the association the instances go over (bound with :meth:`on_message`): note when
        data last left, and whether the instance being sent went out whole."""
        self._progress = time.monotonic()
        if data_set_ended(event.data):
            self._data_set_out = True

    def send(
        self, assoc: Any, dataset: Dataset, sop_instance_uid: str, size_bytes: int, limits: SendLimits
    ) -> Generator[tuple[int, Dataset], None, float | None]:
        """Yield ``dataset`` for pynetdicom to send over ``assoc``; once it is back, count the peer's answer.

        Returns how long the peer took no data when the association was cut for it (by the watchdog here, or by the
        node's send bound), else None.
        """
        wait = limits.wait(size_bytes)
        before, previous = len(self._responses), assoc.dimse_timeout
        assoc.dimse_timeout = wait  # pynetdicom's own wait for the response
        started = self._progress = time.monotonic()
        self._data_set_out = False
        try:
            with watchdog(assoc, wait + CUT_GRACE_SECONDS, name="retrieve-watchdog") as cut:
                yield PENDING, dataset
        finally:
            assoc.dimse_timeout = previous
        answers = self._responses[before:]
        self._count(answers[-1] if answers else None, sop_instance_uid)
        if cut.is_set():
            return time.monotonic() - started
        return self._stopped_reading(assoc, answered=bool(answers))

    def _stopped_reading(self, assoc: Any, *, answered: bool) -> float | None:
        """How long the peer took no data, when the node's send bound cut its association mid-instance: it ended
        unanswered, the instance not all sent, and nothing had left for that bound. Else None."""
        if answered or not association_ended(assoc) or self._data_set_out or self.send_bound_seconds is None:
            return None
        idle = time.monotonic() - self._progress
        return idle if idle >= self.send_bound_seconds else None

    def _count(self, status: int | None, sop_instance_uid: str) -> None:
        """As pynetdicom counts: no response, or a status the Storage service does not define, is a failure."""
        category = STORAGE_SERVICE_CLASS_STATUS.get(status, (STATUS_FAILURE, ""))[0] if status is not None else None
        if category == STATUS_SUCCESS:
            self.completed += 1
        elif category == STATUS_WARNING:
            self.warned += 1
        else:
            self.failed.append(sop_instance_uid)

    def final(self, not_sent: list[str], comment: str | None = None) -> tuple[int | Dataset, Dataset | None]:
        """The final status (with the Failed SOP Instance UID List) once ``not_sent`` were never sent.

        As pynetdicom would answer: success when every instance was stored without a warning; 0xA702 when none
        was stored; else 0xB000. ``comment`` (at most 64 characters) goes with a status other than success.
        """
        failed = [*self.failed, *not_sent]
        if not failed and not self.warned:
            return SUCCESS, None
        status = Dataset()
        status.Status = UNABLE_TO_PERFORM if not self.completed and not self.warned else SUB_OPERATIONS_FAILED
        status.NumberOfRemainingSuboperations = None  # a final status has none (pynetdicom keeps the last count)
        if comment:
            status.ErrorComment = comment[:64]
        report = Dataset()
        report.FailedSOPInstanceUIDList = failed
        return status, report


class IgnoredFinalStatus(logging.Filter):
    """Drops pynetdicom's warning that a retrieval handler yielded a status after its last sub-operation: the
    handlers yield their final status so that their audit record has it, and pynetdicom answers the same one
    itself (the line would tell an administrator of a fault there is not)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return IGNORED_FINAL_STATUS not in str(record.msg)


def quiet_ignored_final_status() -> None:
    """Install :class:`IgnoredFinalStatus` on pynetdicom's Query/Retrieve logger (once)."""
    logger = logging.getLogger("pynetdicom.service_class")
    if not any(isinstance(existing, IgnoredFinalStatus) for existing in logger.filters):
        logger.addFilter(IgnoredFinalStatus())
