"""The audit trail: one record per association and per store, query, retrieve and send (IHE ATNA in spirit).

Each record says when, which peer (AE title and network address), what action, which
study (by UID only: no names, IDs or birth dates), the outcome and how many instances.
Stores are summed per association and study, as ATNA's "DICOM Instances Transferred"
message is, so the receive path adds no database write per image. Writing an audit
record never fails the operation it describes: a record that cannot be written is
logged at ERROR instead. ``dicom-node audit`` lists the records.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import AuditEvent
from db.session import transaction
from dicom_node.logs import log_event

LOG = logging.getLogger(__name__)

Action = Literal["association", "store", "find", "move", "get", "send", "echo"]
Outcome = Literal["success", "refused", "failed", "partial", "released", "aborted", "rejected"]
ACTIONS: tuple[str, ...] = ("association", "store", "find", "move", "get", "send", "echo")


@dataclass(frozen=True)
class Peer:
    ae_title: str | None
    address: str | None

    @classmethod
    def of(cls, assoc: Any) -> Peer:
        """The requesting peer of a pynetdicom association."""
        requestor = assoc.requestor
        address = f"{requestor.address}:{requestor.port}" if getattr(requestor, "address", None) else None
        return cls(str(requestor.ae_title or "").strip() or None, address)


def record(
    sessions: sessionmaker[Session],
    action: Action,
    peer: Peer,
    outcome: Outcome,
    *,
    study_instance_uid: str | None = None,
    instances: int = 0,
    detail: str | None = None,
) -> None:
    """Write one audit record in its own transaction; never raises."""
    try:
        with transaction(sessions) as session:
            session.add(
                AuditEvent(
                    action=action,
                    peer_ae_title=(peer.ae_title or "")[:16] or None,
                    peer_address=(peer.address or "")[:64] or None,
                    study_instance_uid=study_instance_uid,
                    outcome=outcome,
                    instances=instances,
                    detail=detail,
                )
            )
    except Exception:  # noqa: BLE001 - the audited operation must not fail because of its record
        LOG.exception(
            "audit.not_recorded",
            extra={"event_fields": {"action": action, "peer_ae": peer.ae_title, "outcome": outcome}},
        )
        return
    log_event(
        LOG, logging.INFO, "audit", action=action, peer_ae=peer.ae_title, peer_address=peer.address,
        study_instance_uid=study_instance_uid, outcome=outcome, instances=instances, detail=detail,
    )


class StoreTally:
    """Instances stored and refused on one association, per study; written when the association ends."""

    ATTRIBUTE = "_dicom_node_store_tally"

    def __init__(self) -> None:
        self._counts: Counter[tuple[str | None, str]] = Counter()
        self._lock = threading.Lock()

    @classmethod
    def of(cls, assoc: Any) -> StoreTally:
        """The tally kept on a pynetdicom association (created on first use)."""
        tally = getattr(assoc, cls.ATTRIBUTE, None)
        if tally is None:
            tally = cls()
            setattr(assoc, cls.ATTRIBUTE, tally)
        return tally

    def add(self, study_instance_uid: str | None, outcome: Literal["success", "refused", "failed"]) -> None:
        with self._lock:
            self._counts[(study_instance_uid, outcome)] += 1

    def flush(self, sessions: sessionmaker[Session], peer: Peer) -> None:
        """One ``store`` record per study and outcome; the tally is emptied."""
        with self._lock:
            counts, self._counts = self._counts, Counter()
        for (study, outcome), count in sorted(counts.items(), key=lambda item: (item[0][0] or "", item[0][1])):
            record(sessions, "store", peer, outcome, study_instance_uid=study, instances=count)  # type: ignore[arg-type]


def association_ended(sessions: sessionmaker[Session], assoc: Any, outcome: Literal["released", "aborted"]) -> None:
    """Write the association's store tally, then the association record itself."""
    peer = Peer.of(assoc)
    tally = getattr(assoc, StoreTally.ATTRIBUTE, None)
    if tally is not None:
        tally.flush(sessions, peer)
    record(sessions, "association", peer, outcome)


def recent(
    session: Session,
    *,
    since: datetime | None = None,
    peer_ae_title: str | None = None,
    actions: Sequence[str] = (),
    study_instance_uid: str | None = None,
    limit: int = 100,
) -> list[AuditEvent]:
    """Audit records, newest first, filtered."""
    query = select(AuditEvent).order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(limit)
    if since is not None:
        query = query.where(AuditEvent.at >= since)
    if peer_ae_title:
        query = query.where(AuditEvent.peer_ae_title == peer_ae_title)
    if actions:
        query = query.where(AuditEvent.action.in_(list(actions)))
    if study_instance_uid:
        query = query.where(AuditEvent.study_instance_uid == study_instance_uid)
    return list(session.scalars(query))
