"""Images refused before their series could be read: which series they may belong to (db.ingest)."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from sqlalchemy import select, update

from db import jobs
from db.ingest import record_instance, record_rejection, unattributed_refusals_near_series
from db.models import Series, utcnow
from db.session import make_engine, make_session_factory, migrate, transaction
from tests.conftest import ct_instance

QUIET = timedelta(seconds=30)


def _refused(session, at, *, sop: str | None = "9.9.1", sender: str | None = "PACS") -> None:
    record_rejection(
        session,
        status=0xA900,
        reason="SeriesInstanceUID is empty",
        path=None,
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_ae_title=sender,
        received_at=at,
    )


def test_only_the_senders_refusals_while_the_series_was_received_count_and_a_resend_starts_the_window_anew(
    database_url,
):
    """A series re-opened by an image sent days later covered every refusal of its sender since its first image;
    another sender's refusal, one outside the window and one whose image a series holds since never count."""
    migrate(database_url)
    sessions = make_session_factory(make_engine(database_url))
    now = utcnow()
    week_ago = now - timedelta(days=7)
    with transaction(sessions) as session:
        for number in range(3):
            record = replace(ct_instance(f"1.2.5.{number}", "1.2.5"), calling_ae_title="PACS", received_at=week_ago)
            record_instance(session, record, counted_at=week_ago)
        session.execute(update(Series).values(last_received_at=week_ago + timedelta(seconds=2)))
        _refused(session, week_ago + timedelta(seconds=5), sop="9.9.1")  # while it was received: counts
        _refused(session, week_ago + timedelta(seconds=6), sop="9.9.2", sender="OTHER")  # another sender
        _refused(session, week_ago + timedelta(seconds=7), sop="1.2.5.0")  # its image is held since
        _refused(session, week_ago + timedelta(days=3), sop="9.9.3")  # days later: another transfer
    with sessions() as session:
        (series,) = session.scalars(select(Series))
        found = unattributed_refusals_near_series(session, series, QUIET)
    assert found is not None and (found.count, found.first_sop_instance_uid) == (1, "9.9.1")

    with transaction(sessions) as session:  # completed a week ago; a late image re-opens it now
        job = jobs.job_for_series_uid(session, "1.2.5")
        jobs.mark_complete(session, job, "quiet period over (test)")
    with transaction(sessions) as session:
        jobs.reopen(session, jobs.job_for_series_uid(session, "1.2.5"))
        record = replace(ct_instance("1.2.5.7", "1.2.5"), calling_ae_title="PACS", received_at=now)
        record_instance(session, record, counted_at=now)
        _refused(session, now - timedelta(seconds=2), sop="9.9.4")
    with sessions() as session:
        (series,) = session.scalars(select(Series))
        found = unattributed_refusals_near_series(session, series, QUIET)
    assert found is not None and (found.count, found.first_sop_instance_uid) == (1, "9.9.4")  # not 9.9.1 or 9.9.3
