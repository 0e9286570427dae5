"""Give each patient name recorded without its comparison key (:func:`db.names.name_key`) its key.

Revision 0016 keys the names recorded when it upgrades the database; a row written after it by code of an older
version (a worker that finishes, across the upgrade, the job it held) has a name and no key. Query/Retrieve compares
names by their keys, so it would withhold such an image wherever its name is written otherwise than its study's
(``MÜLLER^JÜRGEN`` under ``Müller^Jürgen``), although admission took it for the same person. ``serve`` keys them at
start, before anything is served.
"""

from __future__ import annotations

import logging

from sqlalchemy import Select, bindparam, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from db.models import Instance, Study
from db.names import name_key
from db.session import transaction
from dicom_node.logs import log_event

LOG = logging.getLogger(__name__)

BATCH_SIZE = 500
"""Rows read, and keyed, per transaction: memory stays bounded, and a start stopped half-way keeps what it keyed."""


def key_recorded_names(sessions: sessionmaker[Session], batch_size: int = BATCH_SIZE) -> int:
    """Key every study and instance row that has a name but no key, in batches of ``batch_size`` rows, each
    committed on its own; how many were keyed (logged when any were)."""
    keyed = sum(_key_table(sessions, table, batch_size) for table in (Study, Instance))
    if keyed:
        log_event(
            LOG,
            logging.INFO,
            "repair.names_keyed",
            keyed=keyed,
            note=f"{keyed} patient name(s) recorded by an older version of dicom-node were given the form names "
            "are compared in, so Query/Retrieve finds their images under their study's patient",
        )
    return keyed


def _key_table(sessions: sessionmaker[Session], table: type[Study] | type[Instance], batch_size: int) -> int:
    """Key the unkeyed names of ``table``, in batches by id; how many were keyed."""
    unkeyed = select(table.id, table.patient_name).where(
        table.patient_name_key.is_(None),
        func.rtrim(table.patient_name, "^= ") != "",  # no name has no key
    )
    keying = (
        update(table)
        .where(
            table.id == bindparam("row"),
            table.patient_name == bindparam("name"),  # not a name changed since it was read
            table.patient_name_key.is_(None),
        )
        .values(patient_name_key=bindparam("key"))
    )
    keyed, after = 0, 0
    while rows := _next_batch(sessions, unkeyed.where(table.id > after).order_by(table.id).limit(batch_size)):
        after = rows[-1][0]
        keys = [{"row": row, "name": name, "key": key} for row, name in rows if (key := name_key(name)) is not None]
        if keys:
            with transaction(sessions) as session:
                session.connection().execute(keying, keys)
            keyed += len(keys)
    return keyed


def _next_batch(sessions: sessionmaker[Session], query: Select[int, str | None]) -> list[tuple[int, str | None]]:
    with sessions() as session:
        return [(row, name) for row, name in session.execute(query)]
