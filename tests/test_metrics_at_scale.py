"""/metrics after months of uptime: a scrape reads totals the database keeps, never the audit trail or the instances
table, and the totals say what those tables hold (records written and deleted, images recorded, purged, replaced)."""

from __future__ import annotations

import re
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from alembic import command
from prometheus_client.core import Metric
from sqlalchemy import delete, event, select
from sqlalchemy.orm import Session, sessionmaker

from db.ingest import record_instance
from db.models import AuditEvent, Instance
from db.session import alembic_config, make_engine, make_session_factory, migrate, transaction
from dicom_node import audit
from dicom_node.config import Settings
from dicom_node.console.metrics import DatabaseCollector, Liveness
from dicom_node.retention import purge_audit
from tests.conftest import ct_instance

AUDIT_ROWS = 200_000
COUNTED = (
    "dicom_node_instances_received",
    "dicom_node_instances_stored",
    "dicom_node_associations",
    "dicom_node_dispatch_attempts",
    "dicom_node_dispatch_files_accepted",
    "dicom_node_storage_instances_bytes",
)
SCANS_ALLOWED = {
    "SCAN audit_totals": "a few rows: one per action, outcome and destination",
    "SCAN instance_totals": "one row",
    "SCAN jobs USING INDEX ix_jobs_state_changed_at": "the newest jobs first, stopping at the window",
    "SCAN recent_jobs": "the same window of newest jobs, whose events are then found through their index",
    "SCAN jobs USING COVERING INDEX ix_jobs_state": "series per state: the index alone, not the rows",
    "SCAN rejected_instances": "refused instances, emptied by retention.quarantine_days",
}


def _collector(sessions: sessionmaker[Session], folder: Path) -> DatabaseCollector:
    settings = Settings.model_validate({"storage": {"directory": str(folder)}})
    return DatabaseCollector(settings, sessions, Liveness(lambda: None, lambda: False))


def _scraped(collector: DatabaseCollector) -> dict[tuple[str, tuple[str, ...]], float]:
    """(metric, label values) -> value of the counts the totals feed."""
    families: list[Metric] = list(collector.collect())
    return {
        (family.name, tuple(sample.labels.values())): sample.value
        for family in families
        if family.name in COUNTED
        for sample in family.samples
    }


def _bulk_audit(sessions: sessionmaker[Session], rows: int) -> None:
    """An association and a store record per image received one image per association, a send per hundred."""
    records = []
    for n in range(rows):
        if n % 100 == 99:
            records.append(("send", "PACS", "10.0.0.9:104", "success", 2, "2 result files accepted"))
        elif n % 2:
            records.append(("association", "CT1", f"10.0.0.5:{40000 + n % 20000}", "released", 0, None))
        else:
            records.append(("store", "CT1", f"10.0.0.5:{40000 + n % 20000}", "success", 1, None))
    with transaction(sessions) as session:
        session.connection().exec_driver_sql(
            "INSERT INTO audit_events (at, action, peer_ae_title, peer_address, outcome, instances, detail) "
            "VALUES ('2026-12-01 00:00:00', ?, ?, ?, ?, ?, ?)",
            records,
        )


def test_a_scrape_reads_no_table_that_grows_with_uptime(tmp_path):
    """Every statement of a scrape, on a trail of 200,000 records: SQLite's plan reads neither ``audit_events`` nor
    ``instances``, and scans only the small tables and indexes named (the newest jobs through their index, no
    sort of every job)."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    migrate(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    _bulk_audit(sessions, AUDIT_ROWS)
    statements: list[tuple[str, Any]] = []

    def seen(_connection: Any, _cursor: Any, sql: str, params: Any, *_: Any) -> None:
        statements.append((sql, params))

    event.listen(engine, "before_cursor_execute", seen)
    scraped = _scraped(_collector(sessions, tmp_path))
    event.remove(engine, "before_cursor_execute", seen)
    assert scraped[("dicom_node_instances_received", ())] == AUDIT_ROWS // 2  # the bulk counted: a store per image
    plans = {}
    with engine.connect() as connection:
        for sql, params in statements:
            if sql.lstrip().upper().startswith("SELECT") and "FROM" in sql.upper():
                rows = connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params).all()
                plans[sql] = [re.sub(r"^SCAN TABLE ", "SCAN ", row[-1]) for row in rows]
    steps = [step for plan in plans.values() for step in plan]
    assert not [step for step in steps if re.search(r"\b(audit_events|instances)\b", step)], plans
    assert {step for step in steps if step.startswith("SCAN")} <= set(SCANS_ALLOWED), plans
    assert not [step for step in steps if "TEMP B-TREE FOR ORDER BY" in step], plans
    assert "SCAN jobs USING INDEX ix_jobs_state_changed_at" in steps  # the histograms' window is read by the index


def _reference(session: Session) -> dict[tuple[str, tuple[str, ...]], float]:
    """What a scrape said before the totals: every row of ``audit_events`` and ``instances`` read and summed."""
    rows = session.scalars(select(AuditEvent)).all()
    expected: Counter[tuple[str, tuple[str, ...]]] = Counter()
    expected[("dicom_node_instances_received", ())] += sum(
        r.instances for r in rows if (r.action, r.outcome) == ("store", "success")
    )
    for r in rows:
        if r.action == "association":
            found = re.search(r"; (\d+) more C-ECHO-only associations of this peer since", r.detail or "")
            expected[("dicom_node_associations", (r.outcome,))] += 1 + (int(found[1]) if found else 0)
        if r.action == "send":
            expected[("dicom_node_dispatch_attempts", (r.peer_ae_title or "", r.outcome))] += 1
            expected[("dicom_node_dispatch_files_accepted", (r.peer_ae_title or "",))] += r.instances
    images = session.scalars(select(Instance)).all()
    expected[("dicom_node_instances_stored", ())] = len(images)
    expected[("dicom_node_storage_instances_bytes", ())] = sum(i.size_bytes for i in images)
    return dict(expected)


def test_the_totals_follow_every_record_and_image_written_deleted_or_replaced(tmp_path, database_url):
    """Rows there before the upgrade are counted by it; then audit records written by the node's own code (a record
    standing for 41 left-out C-ECHO-only associations), purged by retention; images recorded, one replaced by a
    bigger copy, a series' images purged: each scrape says what the tables hold, on SQLite and PostgreSQL."""
    command.upgrade(alembic_config(database_url), "0014")
    engine = make_engine(database_url)
    sessions = make_session_factory(engine)
    old = datetime.now(timezone.utc) - timedelta(days=400)
    with transaction(sessions) as session:
        session.add_all(
            [
                AuditEvent(at=old, action="store", outcome="success", instances=7, peer_address="10.0.0.5:4000"),
                AuditEvent(at=old, action="association", outcome="released", detail="C-ECHO only; 3 more x"),
                AuditEvent(action="send", outcome="failed", peer_ae_title="PACS", peer_address="10.0.0.9:104"),
            ]
        )
    migrate(database_url)  # revision 0015: the totals of what is there
    collector = _collector(sessions, tmp_path)
    with sessions() as session:
        assert _scraped(collector) == _reference(session)

    peer = audit.Peer("CT1", "10.0.0.5:40001")
    echo_loop = audit.with_count(audit.ECHO_ONLY_DETAIL, 41, audit.ECHO_ONLY_ASSOCIATIONS)
    audit.record(sessions, "association", peer, "released", detail=echo_loop)
    audit.record(sessions, "association", peer, "aborted", detail="the peer sent A-ABORT")
    audit.record(sessions, "store", peer, "success", study_instance_uid="1.2.3", instances=3)
    audit.record(sessions, "send", audit.Peer("PACS", "10.0.0.9:104"), "success", instances=2)
    with transaction(sessions) as session:
        for number in range(5):
            record_instance(session, ct_instance(f"1.2.3.4.{number}", "1.2.3.4"))
        record_instance(session, ct_instance("1.2.3.5.1", "1.2.3.5"))
    with sessions() as session:
        counted = _scraped(collector)
        assert counted == _reference(session)
    assert counted[("dicom_node_associations", ("released",))] == 1 + 1 + 41  # the old row's "3 more x" says no count

    with transaction(sessions) as session:
        replaced = session.scalars(select(Instance).where(Instance.sop_instance_uid == "1.2.3.4.0")).one()
        replaced.size_bytes = 526_000
        session.execute(delete(Instance).where(Instance.sop_instance_uid.like("1.2.3.5.%")))
    assert purge_audit(sessions, days=365) == 2
    with sessions() as session:
        assert _scraped(collector) == _reference(session)
    engine.dispose()


def test_the_oldest_series_in_each_unfinished_state_gives_its_age_for_alerts(tmp_path):
    """A series stuck RECEIVING (a sender that stopped half-way), waiting for a worker or for its destination for
    an hour was only a count (dicom_node_jobs), which a low-volume site's alert on counts never caught."""
    from sqlalchemy import update

    from db.models import Job

    url = f"sqlite:///{tmp_path / 'state.db'}"
    migrate(url)
    sessions = make_session_factory(make_engine(url))
    with transaction(sessions) as session:
        record_instance(session, ct_instance("1.2.3.1", "1.2.3"))
        record_instance(session, ct_instance("1.2.4.1", "1.2.4"))
    hour_ago = datetime.now(timezone.utc) - timedelta(hours=1)
    with transaction(sessions) as session:
        session.execute(update(Job).where(Job.id == 1).values(state_changed_at=hour_ago))

    families = {family.name: family for family in _collector(sessions, tmp_path).collect()}
    ages = {sample.labels["state"]: sample.value for sample in families["dicom_node_oldest_job_age_seconds"].samples}
    assert set(ages) == {"RECEIVING", "COMPLETE", "QUEUED", "PROCESSING", "SENDING"}
    assert 3590 < ages["RECEIVING"] < 3700, ages  # the older of the two receiving series
    assert ages["QUEUED"] == ages["SENDING"] == 0.0
