"""Associations cut short: the series whose sender may not have sent every image (table ``interrupted_transfers``).

An association that ends in an abort (the sender's A-ABORT, a dropped connection, the node's own network timeout or
its stop) after storing images of a series leaves that series perhaps incomplete: the sender, if it retries, sends
them again on a new association. Completion then waits as for an expected count, and marks the series partial if
nothing more comes (``dicom_node.watcher``). A released association that stored images of the series and began after
the other was cut short clears it: one that ran beside it (two associations sending halves of one series) does not.
A receiving process that died with associations open marks their series too (:mod:`dicom_node.receive.open_transfers`).
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

from sqlalchemy import delete, exists, select
from sqlalchemy.orm import Session, sessionmaker

from db.models import InterruptedTransfer, Job, JobState, Series, utcnow
from db.session import read_outside_transaction, transaction


def note_interrupted(
    sessions: sessionmaker[Session],
    series_uids: Collection[str],
    calling_ae_title: str | None,
    reason: str,
    at: datetime | None = None,
) -> None:
    """Record that an association ending in an abort (``reason``, ``at`` that moment: default now) had stored images
    of ``series_uids``: of those still receiving, or not recorded yet."""
    if not series_uids:
        return
    with transaction(sessions) as session:
        settled = set(  # completed already (a sender idle past the quiet period): a later image reopens it afresh
            session.scalars(
                select(Series.series_instance_uid)
                .join(Job, Job.series_id == Series.id)
                .where(Series.series_instance_uid.in_(series_uids), Job.state != JobState.RECEIVING)
            )
        )
        session.add_all(
            InterruptedTransfer(
                series_instance_uid=uid,
                calling_ae_title=(calling_ae_title or "")[:16] or None,
                reason=reason,
                at=at or utcnow(),
            )
            for uid in sorted(set(series_uids) - settled)
        )


def clear_interrupted(sessions: sessionmaker[Session], series_uids: Collection[str], began: datetime) -> None:
    """A released association, begun at ``began``, stored images of ``series_uids``: where another was cut short
    before it began, their sender sent them again, whole. One cut short after it began ran beside it: its mark
    stays."""
    if not series_uids:
        return
    earlier = (InterruptedTransfer.series_instance_uid.in_(series_uids), InterruptedTransfer.at < began)
    if not read_outside_transaction(sessions, select(exists().where(*earlier))):  # nearly always: no write
        return
    with transaction(sessions) as session:
        session.execute(delete(InterruptedTransfer).where(*earlier))


def interruption_of(session: Session, series_instance_uid: str) -> InterruptedTransfer | None:
    """The latest association cut short after storing images of the series, if none released since."""
    return session.scalars(
        select(InterruptedTransfer)
        .where(InterruptedTransfer.series_instance_uid == series_instance_uid)
        .order_by(InterruptedTransfer.id.desc())
        .limit(1)
    ).first()


def forget_interruptions(session: Session, series_uids: Collection[str]) -> None:
    """Delete the records of ``series_uids`` (they completed, or were sent again)."""
    session.execute(delete(InterruptedTransfer).where(InterruptedTransfer.series_instance_uid.in_(series_uids)))
