"""an instance records its own PatientID and IssuerOfPatientID, so Query/Retrieve never serves one patient's image
under another patient's study or series

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01 21:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("patient_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("issuer_of_patient_id", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("issuer_of_patient_id")
        batch_op.drop_column("patient_id")
