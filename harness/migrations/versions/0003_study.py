"""runs.study: the tuning study a run is a trial of (`harness tune`); NULL for runs that
are ranked. Trials are stored like any run but never appear on a leaderboard.

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("study", sa.String(128), nullable=True))
        batch.create_index("ix_runs_study", ["study"])


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_index("ix_runs_study")
        batch.drop_column("study")
