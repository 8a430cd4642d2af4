"""Schema versions of the results store, through Alembic (harness/migrations).

A new store is created at the newest schema and stamped; a store at an older schema
(including a results.db from before migrations, which has tables but no version) is
refused with the command that upgrades it: `harness db upgrade`.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import Connection, Engine

from harness import HarnessError

BASELINE = "0001"  # the schema results.db had before migrations existed


def alembic_config(connection: Connection):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.attributes["connection"] = connection
    return cfg


@lru_cache(maxsize=1)
def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(None)).get_current_head()


def current_revision(conn: Connection) -> str | None:
    """The stamped revision; BASELINE for a pre-migration store; None for an empty one."""
    from alembic.runtime.migration import MigrationContext

    revision = MigrationContext.configure(conn).get_current_revision()
    if revision is None and inspect(conn).has_table("runs"):
        return BASELINE
    return revision


def ensure_schema(engine: Engine, url: str, metadata) -> None:
    from alembic import command

    with engine.begin() as conn:
        revision = current_revision(conn)
        if revision is None:
            metadata.create_all(conn)
            command.stamp(alembic_config(conn), "head")
        elif revision != head_revision():
            raise HarnessError(f"results store {url} has schema {revision}, this harness needs {head_revision()}; "
                               f"run `harness db upgrade --db {url}` (keeps every row)")


def upgrade(url: str) -> tuple[str | None, str]:
    """Upgrade the store at `url` to the newest schema; returns (from, to)."""
    from alembic import command

    # a plain engine: SQLite's foreign-key enforcement stays off while tables may be rebuilt
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            before = current_revision(conn)
            cfg = alembic_config(conn)
            if before == BASELINE and not inspect(conn).has_table("alembic_version"):
                command.stamp(cfg, BASELINE)
            command.upgrade(cfg, "head")
    finally:
        engine.dispose()
    return before, head_revision()
