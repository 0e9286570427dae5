"""a series remembers how many images it held when retention purged it, so a series sent again with fewer is
processed as a partial series, never as if it were whole

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02 00:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.add_column(sa.Column("images_before_purge", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_column("images_before_purge")
