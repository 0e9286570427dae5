"""Give each patient name recorded without its comparison key (:func:`db.names.name_key`) its key.

Revision 0016 keys the names recorded when it upgrades the database; a row written after it by code of an older
version (a worker that finishes, across the upgrade, the job it held) has a name and no key. Query/Retrieve compares
names by their keys, so it would withhold such an image wherever its name is written otherwise than its study's
(``MÜLLER^JÜRGEN`` under ``Müller^Jürgen``), although admission took it for the same person. ``serve`` keys them at
start, before anything is served, and then every :data:`INTERVAL_SECONDS` those recorded since (:class:`NameKeying`):
such a worker records its results after the start that upgraded the database.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from sqlalchemy import Select, bindparam, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from db.models import Instance, Study
from db.names import name_key
from db.session import transaction
from dicom_node.config import Settings
from dicom_node.logs import log_event
from dicom_node.periodic import PeriodicTask

LOG = logging.getLogger(__name__)

BATCH_SIZE = 500
"""Rows read, and keyed, per transaction: memory stays bounded, and a start stopped half-way keeps what it keyed."""
INTERVAL_SECONDS = 60.0
"""How often ``serve`` keys the names recorded since its start, or since the pass before the last."""
TABLES = (Study, Instance)


class NameKeying(PeriodicTask):
    """Keys the names recorded without their key since ``serve`` started; a thread of ``serve``.

    Made before the start's own pass (:func:`key_recorded_names` of every row), it notes the newest row of each
    table then. Each pass reads only the rows after those the pass before the last noted, so a row whose
    transaction was still open at one pass is read at the next, and a pass costs what was recorded since."""

    name = "name_keys"

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        super().__init__(settings, sessions)
        self._after = self._noted = newest_rows(sessions)

    @property
    def interval_seconds(self) -> float:
        return INTERVAL_SECONDS

    def run_once(self) -> int:
        """Key the names recorded since the pass before the last; how many were keyed."""
        newest = newest_rows(self.sessions)
        keyed = key_recorded_names(self.sessions, self._after)
        self._after, self._noted = self._noted, newest
        return keyed


def newest_rows(sessions: sessionmaker[Session]) -> dict[str, int]:
    """The id of the newest row of each table that keeps names (0 for an empty one)."""
    with sessions() as session:
        return {table.__tablename__: session.scalar(select(func.max(table.id))) or 0 for table in TABLES}


def key_recorded_names(
    sessions: sessionmaker[Session], after: Mapping[str, int] | None = None, batch_size: int = BATCH_SIZE
) -> int:
    """Key every study and instance row that has a name but no key (of each table, only those after the id
    ``after`` names), in batches of ``batch_size`` rows, each committed on its own; how many were keyed (logged
    when any were)."""
    keyed = sum(_key_table(sessions, table, (after or {}).get(table.__tablename__, 0), batch_size) for table in TABLES)
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


def _key_table(
    sessions: sessionmaker[Session], table: type[Study] | type[Instance], after: int, batch_size: int
) -> int:
    """Key the unkeyed names of ``table`` after the row ``after``, in batches by id; how many were keyed."""
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
    keyed = 0
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
