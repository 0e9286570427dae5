"""a series some of whose images came on an aborted association is remembered (table interrupted_transfers), so
completion waits for the rest, as for an expected count, instead of processing half of it after the quiet period

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-04 23:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "interrupted_transfers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("calling_ae_title", sa.String(length=16), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_interrupted_transfers_series_instance_uid", "interrupted_transfers", ["series_instance_uid"])


def downgrade() -> None:
    op.drop_index("ix_interrupted_transfers_series_instance_uid", table_name="interrupted_transfers")
    op.drop_table("interrupted_transfers")
