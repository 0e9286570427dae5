"""the totals /metrics reports (audit records per action and outcome, instances and their bytes) are kept as records
are written and deleted, and the most recently changed jobs are indexed, so a scrape costs the same after months of
uptime as on the first day instead of reading the whole audit trail and instances table each time

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-04 02:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

AUDIT_KEY = ("action", "outcome", "peer_address", "peer_ae_title")
SEND_PEER = "CASE WHEN {row}.action = 'send' THEN coalesce({row}.{column}, '') ELSE '' END"
"""A record's peer in its total: only a ``send`` record's (a caller's address changes with each association)."""
LEFT_OUT_CLAUSE = " more C-ECHO-only associations of this peer since the previous record"
"""How a record standing for other C-ECHO-only associations says how many (``dicom_node.audit.with_count``): the
number right after the detail's first ``; ``."""


def _left_out(dialect: str, detail: str) -> str:
    """SQL for the C-ECHO-only associations a record's ``detail`` counts besides its own record (0 for others)."""
    if dialect == "postgresql":
        number = f"substring({detail} from '; ([0-9]+){LEFT_OUT_CLAUSE}')"
    else:  # CAST reads the number at the start of what follows "; " and ignores the rest
        number = f"substr({detail}, instr({detail}, '; ') + 2)"
    return f"CASE WHEN {detail} LIKE '%{LEFT_OUT_CLAUSE}%' THEN coalesce(CAST({number} AS BIGINT), 0) ELSE 0 END"


def _audit_upsert(dialect: str, row: str, sign: str) -> str:
    """Add (``sign`` 1) or take away (-1) the audit record ``row`` (NEW, OLD, or a trigger function's variable)."""
    peer = [SEND_PEER.format(row=row, column=column) for column in ("peer_address", "peer_ae_title")]
    return (
        f"INSERT INTO audit_totals ({', '.join(AUDIT_KEY)}, records, instances, left_out) "
        f"VALUES ({row}.action, {row}.outcome, {peer[0]}, {peer[1]}, {sign}, {sign} * {row}.instances, "
        f"{sign} * {_left_out(dialect, f'{row}.detail')}) "
        f"ON CONFLICT ({', '.join(AUDIT_KEY)}) DO UPDATE SET records = audit_totals.records + excluded.records, "
        "instances = audit_totals.instances + excluded.instances, left_out = audit_totals.left_out + excluded.left_out"
    )


INSTANCE_CHANGES = {
    "added": ("INSERT", "instances = instances + 1, bytes = bytes + NEW.size_bytes"),
    "removed": ("DELETE", "instances = instances - 1, bytes = bytes - OLD.size_bytes"),
    "resized": ("UPDATE OF size_bytes", "bytes = bytes - OLD.size_bytes + NEW.size_bytes"),
}
"""Trigger name suffix -> (event on ``instances``, what it changes in ``instance_totals``)."""


def _sqlite_triggers() -> list[str]:
    """Triggers run in the writer's transaction: SQLite's writers take turns, so a totals row is never contended."""
    return [
        f"CREATE TRIGGER audit_totals_added AFTER INSERT ON audit_events BEGIN {_audit_upsert('sqlite', 'NEW', '1')}; "
        "END",
        f"CREATE TRIGGER audit_totals_removed AFTER DELETE ON audit_events BEGIN "
        f"{_audit_upsert('sqlite', 'OLD', '-1')}; END",
        *(
            f"CREATE TRIGGER instance_totals_{name} AFTER {event} ON instances BEGIN UPDATE instance_totals SET "
            f"{change}; END"
            for name, (event, change) in INSTANCE_CHANGES.items()
        ),
    ]


def _postgresql_triggers() -> list[str]:
    """Constraint triggers deferred to the commit: a transaction takes a totals row's lock last, just before it
    commits, after every other lock it holds, so the totals add no deadlock and are held for the commit only."""
    instance_branches = " ".join(
        f"{'IF' if n == 0 else 'ELSIF'} TG_OP = '{event.split()[0]}' THEN UPDATE instance_totals SET {change};"
        for n, (event, change) in enumerate(INSTANCE_CHANGES.values())
    )
    return [
        "CREATE FUNCTION audit_totals_follow() RETURNS trigger LANGUAGE plpgsql AS $$ "
        "DECLARE r audit_events%ROWTYPE; sign integer; "
        "BEGIN IF TG_OP = 'INSERT' THEN r := NEW; sign := 1; ELSE r := OLD; sign := -1; END IF; "
        f"{_audit_upsert('postgresql', 'r', 'sign')}; RETURN NULL; END $$",
        "CREATE CONSTRAINT TRIGGER audit_totals_follow AFTER INSERT OR DELETE ON audit_events "
        "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION audit_totals_follow()",
        "CREATE FUNCTION instance_totals_follow() RETURNS trigger LANGUAGE plpgsql AS $$ "
        f"BEGIN {instance_branches} END IF; RETURN NULL; END $$",
        "CREATE CONSTRAINT TRIGGER instance_totals_follow AFTER INSERT OR DELETE OR UPDATE OF size_bytes ON instances "
        "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION instance_totals_follow()",
    ]


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.create_table(
        "audit_totals",
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("peer_address", sa.String(length=64), nullable=False),
        sa.Column("peer_ae_title", sa.String(length=16), nullable=False),
        sa.Column("records", sa.BigInteger(), nullable=False),
        sa.Column("instances", sa.BigInteger(), nullable=False),
        sa.Column("left_out", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(*AUDIT_KEY),
    )
    op.create_table(
        "instance_totals",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("instances", sa.BigInteger(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_jobs_state_changed_at"), ["state_changed_at"], unique=False)
    # The triggers first, then the totals of the rows already there, in the upgrade's one transaction: on PostgreSQL
    # creating a trigger waits for the transactions writing the table and holds off new ones until the upgrade
    # commits, so no row is counted twice or left out.
    for statement in _postgresql_triggers() if dialect == "postgresql" else _sqlite_triggers():
        op.execute(statement)
    peer = [SEND_PEER.format(row="audit_events", column=column) for column in ("peer_address", "peer_ae_title")]
    op.execute(
        f"INSERT INTO audit_totals ({', '.join(AUDIT_KEY)}, records, instances, left_out) "
        f"SELECT action, outcome, {peer[0]}, {peer[1]}, count(*), coalesce(sum(instances), 0), "
        f"coalesce(sum({_left_out(dialect, 'audit_events.detail')}), 0) FROM audit_events "
        f"GROUP BY action, outcome, {peer[0]}, {peer[1]}"
    )
    op.execute(
        "INSERT INTO instance_totals (id, instances, bytes) SELECT 1, count(*), coalesce(sum(size_bytes), 0) "
        "FROM instances"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER instance_totals_follow ON instances")
        op.execute("DROP TRIGGER audit_totals_follow ON audit_events")
        op.execute("DROP FUNCTION instance_totals_follow()")
        op.execute("DROP FUNCTION audit_totals_follow()")
    else:
        for name in ("audit_totals_added", "audit_totals_removed", *(f"instance_totals_{n}" for n in INSTANCE_CHANGES)):
            op.execute(f"DROP TRIGGER {name}")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_state_changed_at"))
    op.drop_table("instance_totals")
    op.drop_table("audit_totals")
