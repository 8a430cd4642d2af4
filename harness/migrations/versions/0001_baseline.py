"""Baseline: the schema results.db had before migrations existed.

Revision ID: 0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("method", sa.String(64), nullable=False, index=True),
        sa.Column("dataset", sa.String(64), nullable=False, index=True),
        sa.Column("rho", sa.Float, nullable=False),
        sa.Column("backbone", sa.String(64), nullable=False),
        sa.Column("seed", sa.Integer, nullable=False),
        sa.Column("generator", sa.String(16), nullable=False),
        sa.Column("preset", sa.String(32), nullable=False, index=True),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("config_hash", sa.String(64), nullable=False, index=True),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("wall_seconds", sa.Float),
        sa.Column("device", sa.String(128), nullable=False),
        sa.Column("git_commit", sa.String(64), nullable=False),
        sa.Column("versions", sa.JSON, nullable=False),
        sa.Column("data_checksum", sa.String(64), nullable=False),
        sa.Column("stage1_cached", sa.Integer, nullable=False),
        sa.Column("extra", sa.JSON, nullable=False),
        sa.Column("error", sa.Text),
    )
    fk = dict(nullable=False, index=True)
    op.create_table(
        "metrics",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(32), sa.ForeignKey("runs.id", ondelete="CASCADE"), **fk),
        sa.Column("split", sa.String(8), nullable=False),
        sa.Column("group", sa.String(8), nullable=False),
        sa.Column("top1", sa.Float),
        sa.Column("error", sa.Float),
        sa.Column("n_classes", sa.Integer, nullable=False),
    )
    op.create_table(
        "class_metrics",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(32), sa.ForeignKey("runs.id", ondelete="CASCADE"), **fk),
        sa.Column("class_index", sa.Integer, nullable=False),
        sa.Column("class_name", sa.String(128), nullable=False),
        sa.Column("train_count", sa.Integer, nullable=False),
        sa.Column("accuracy", sa.Float, nullable=False),
        sa.Column("weight_norm", sa.Float, nullable=False),
    )
    op.create_table(
        "curves",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(32), sa.ForeignKey("runs.id", ondelete="CASCADE"), **fk),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("x", sa.Float, nullable=False),
        sa.Column("split", sa.String(8), nullable=False),
        sa.Column("group", sa.String(8), nullable=False),
        sa.Column("value", sa.Float),
    )


def downgrade() -> None:
    for table in ("curves", "class_metrics", "metrics", "runs"):
        op.drop_table(table)
