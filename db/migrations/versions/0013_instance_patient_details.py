"""an instance records its own PatientName, PatientBirthDate and PatientSex, and studies and instances the issuer
named by IssuerOfPatientIDQualifiersSequence, so Query/Retrieve never serves an image naming another patient under a
study, and one PatientID from two issuers (in either form) is two patients; a series records its AccessionNumber,
so a study of several orders is found by each

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03 02:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("issuer_universal_entity_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("issuer_universal_entity_id_type", sa.String(length=16), nullable=True))
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("issuer_universal_entity_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("patient_name", sa.String(length=324), nullable=True))
        batch_op.add_column(sa.Column("patient_birth_date", sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column("patient_sex", sa.String(length=16), nullable=True))
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.add_column(sa.Column("accession_number", sa.String(length=16), nullable=True))
        batch_op.create_index(batch_op.f("ix_series_accession_number"), ["accession_number"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_series_accession_number"))
        batch_op.drop_column("accession_number")
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("patient_sex")
        batch_op.drop_column("patient_birth_date")
        batch_op.drop_column("patient_name")
        batch_op.drop_column("issuer_universal_entity_id")
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_column("issuer_universal_entity_id_type")
        batch_op.drop_column("issuer_universal_entity_id")
