"""a doubted clock is remembered in the database (table clock_doubts), so a restart while the clock is still far
ahead keeps deleting nothing by age instead of trusting what the node recorded at the wrong time during the doubt

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-04 15:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "clock_doubts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("trusted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("counted_seconds", sa.BigInteger(), nullable=False),
        sa.Column("doubted_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("clock_doubts")
