"""Fill in the patient of instances recorded before the node kept an instance's own patient (revisions 0011 and 0013).

Those revisions add the columns empty; a node that recorded images before them left every row's PatientID,
IssuerOfPatientID, issuer qualifiers, PatientName, PatientBirthDate and PatientSex unknown (NULL), although each
stored file holds them. Revision 0014 marks the rows recorded between 0011 and 0013 (a PatientID, none of the rest)
unknown again, so they are read once more. Query/Retrieve serves an instance only when its recorded patient is its study's, so start-up
reads each such file's header and records them as the receiver records a received one, before anything is served.
A row whose file is missing or cannot be read stays unknown, and Query/Retrieve withholds it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from db.ingest import instance_patient_values
from db.models import Instance
from db.session import read_outside_transaction, transaction
from dicom_node.logs import log_event
from dicom_node.receive.header import stored_header

LOG = logging.getLogger(__name__)

BATCH_SIZE = 500
"""Rows read, and headers filled in, per transaction: memory stays bounded, and a start stopped half-way keeps
what it filled."""
_UNKNOWN_PATIENT = Instance.patient_id.is_(None)
"""A row recorded before revision 0011 (the receiver records "" for an image without a PatientID, never NULL)."""


@dataclass
class IdentityBackfill:
    filled: int = 0
    unreadable: int = 0  # rows whose stored file is missing or cannot be read: left unknown, never served


def fill_instance_identities(sessions: sessionmaker[Session], batch_size: int = BATCH_SIZE) -> IdentityBackfill:
    """Record the patient of every instance row that has none from its stored file's header, in batches of
    ``batch_size`` rows, each committed on its own; what was filled and what could not be.

    Only rows with an unknown PatientID are read, so a second start reads none (but the unreadable ones, in case
    their file came back), and a start stopped half-way goes on where it stopped."""
    report = IdentityBackfill()
    pending = read_outside_transaction(sessions, select(func.count()).select_from(Instance).where(_UNKNOWN_PATIENT))
    if not pending:
        return report
    after_id = 0
    while rows := _next_batch(sessions, after_id, batch_size):
        after_id = rows[-1].id
        filled = [values for values in map(_identity_from_file, rows) if values is not None]
        report.unreadable += len(rows) - len(filled)
        if not filled:
            continue
        with transaction(sessions) as session:
            session.execute(update(Instance), filled)
        report.filled += len(filled)
        log_event(
            LOG,
            logging.INFO,
            "repair.identity_filled",
            filled=report.filled,
            unreadable=report.unreadable,
            pending=pending,
            note=f"recorded the patient of {report.filled} of {pending} image(s) stored before this version from "
            "their files' headers",
        )
    if report.unreadable:
        log_event(
            LOG,
            logging.WARNING,
            "repair.identity_unknown",
            unreadable=report.unreadable,
            note=f"{report.unreadable} image(s) stored before this version have a missing or unreadable file: "
            "their patient is unknown, so Query/Retrieve never finds or sends them",
        )
    return report


def _next_batch(sessions: sessionmaker[Session], after_id: int, batch_size: int) -> list[Instance]:
    with sessions() as session:
        query = select(Instance).where(_UNKNOWN_PATIENT, Instance.id > after_id).order_by(Instance.id)
        return list(session.scalars(query.limit(batch_size)))


def _identity_from_file(row: Instance) -> dict[str, object] | None:
    """The row's primary key and patient columns as its stored file's header gives them, or None when the file is
    missing, unreadable, or is not this instance."""
    header = stored_header(row.path, row.sop_class_uid, row.sop_instance_uid)
    if header is None:
        return None
    return {"id": row.id, **instance_patient_values(header.study)}
