"""studies and instances keep their PatientName as names compare (db.names.name_key: each component group without
letter case, empty trailing components or the difference between composed and decomposed letters), so
Query/Retrieve tells an image's patient from its study's by the rule the receiver and admission use, instead of
SQL's lower(), which on SQLite leaves MÜLLER and Müller two names and withheld images admission had taken as the
study patient's

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-04 03:30:00
"""

import sqlalchemy as sa
from alembic import op

from db.names import name_key

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

BATCH_SIZE = 5000
"""Rows read and updated at a time: memory stays bounded on a node holding millions of images."""


def upgrade() -> None:
    # op.add_column, not batch_alter_table: on SQLite a batch would copy the instances table and drop its triggers
    for table in ("studies", "instances"):
        op.add_column(table, sa.Column("patient_name_key", sa.Text(), nullable=True))
        _fill(table)


def _fill(table: str) -> None:
    """Compute the key of every row of ``table`` that has a name, in batches by id."""
    connection = op.get_bind()
    rows = sa.text(
        f"SELECT id, patient_name FROM {table} WHERE patient_name IS NOT NULL AND id > :after ORDER BY id LIMIT :size"
    )
    update = sa.text(f"UPDATE {table} SET patient_name_key = :key WHERE id = :id")
    after = 0
    while batch := connection.execute(rows, {"after": after, "size": BATCH_SIZE}).all():
        after = batch[-1].id
        keyed = [{"id": row.id, "key": key} for row in batch if (key := name_key(row.patient_name)) is not None]
        if keyed:
            connection.execute(update, keyed)


def downgrade() -> None:
    for table in ("instances", "studies"):
        op.drop_column(table, "patient_name_key")  # not in a batch, for the triggers' sake (SQLite 3.35 drops it)
