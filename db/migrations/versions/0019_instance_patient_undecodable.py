"""an instance whose patient values did not decode in their character set is marked (instances.patient_undecodable),
so Query/Retrieve never serves it under its study's patient: recorded as unknown, such a name compared as not sent

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-05 02:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # op.add_column, not batch_alter_table: on SQLite a batch would copy the instances table and drop its triggers
    op.add_column(
        "instances", sa.Column("patient_undecodable", sa.Boolean(), nullable=False, server_default=sa.false())
    )


def downgrade() -> None:
    op.drop_column("instances", "patient_undecodable")
