"""refused and set-aside instances name their series, so completion can tell a series what it lacks

Revision ID: 0008
Revises: 0007_scaleout
Create Date: 2026-11-30 23:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007_scaleout"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rejected_instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("series_instance_uid", sa.String(length=64), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_rejected_instances_series_instance_uid"), ["series_instance_uid"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("rejected_instances", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_rejected_instances_series_instance_uid"))
        batch_op.drop_column("series_instance_uid")
