"""metrics.ece: the expected calibration error (percent) of a split's shot group, as MiSLAS
measures it; NULL for a run stored before it was measured, an empty group, or a head whose
outputs are not logits (NCM's distances).

Revision ID: 0005
Revises: 0004
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("metrics") as batch:
        batch.add_column(sa.Column("ece", sa.Float().with_variant(mysql.DOUBLE(asdecimal=False), "mysql", "mariadb"),
                                   nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("metrics") as batch:
        batch.drop_column("ece")
