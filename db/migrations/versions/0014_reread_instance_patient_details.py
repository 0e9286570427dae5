"""instances recorded before revision 0013 (by a node of revision 0011 or 0012, or by such a node still running
after a newer worker upgraded the schema) have their patient read again from their stored files: they hold a
PatientID but none of PatientName, PatientBirthDate, PatientSex or the issuer's universal entity ID, which 0013 added
empty, so Query/Retrieve took an image naming another patient under the same PatientID to be the study's

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03 22:30:00
"""

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # An unknown PatientID (NULL) is what start-up's repair reads again from the file (dicom_node.receive.backfill);
    # until then Query/Retrieve withholds the row. A row of an image that names none of the four is read once more.
    op.execute(
        "UPDATE instances SET patient_id = NULL WHERE patient_name IS NULL AND patient_birth_date IS NULL "
        "AND patient_sex IS NULL AND issuer_universal_entity_id IS NULL"
    )


def downgrade() -> None:
    pass  # the rows read again keep what their files said
