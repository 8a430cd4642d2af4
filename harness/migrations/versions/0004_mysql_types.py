"""MySQL / MariaDB: numbers as DOUBLE, times as DATETIME(6), runs.error as MEDIUMTEXT. Their
FLOAT is single precision (a top-1 of 82.46 read back as 82.4599990845), their DATETIME whole
seconds (runs started within a second could not be ordered) and their TEXT at most 64 KiB (a
longer error failed the write that marks its run failed). SQLite and PostgreSQL already keep
doubles, microseconds and any length: nothing changes there. Numbers already rounded stay
rounded.

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# (table, column, nullable)
NUMBERS = [("runs", "rho", False), ("runs", "wall_seconds", True), ("metrics", "top1", True),
           ("metrics", "error", True), ("class_metrics", "accuracy", False),
           ("class_metrics", "weight_norm", False), ("curves", "x", False), ("curves", "value", True)]
TIMES = [("runs", "started_at", False), ("runs", "finished_at", True)]


def retype(numbers, times, error) -> None:
    if op.get_bind().dialect.name not in ("mysql", "mariadb"):
        return
    for table, column, nullable in NUMBERS:
        op.alter_column(table, column, type_=numbers, existing_nullable=nullable)
    for table, column, nullable in TIMES:
        op.alter_column(table, column, type_=times, existing_nullable=nullable)
    op.alter_column("runs", "error", type_=error, existing_nullable=True)


def upgrade() -> None:
    retype(mysql.DOUBLE(asdecimal=False), mysql.DATETIME(fsp=6), mysql.MEDIUMTEXT())


def downgrade() -> None:
    retype(sa.Float(), sa.DateTime(timezone=True), sa.Text())
