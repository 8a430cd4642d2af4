"""Schema versions of the results store, through Alembic (harness/migrations).

A new store is created at the newest schema and stamped; a store at an older schema
(including a results.db from before migrations, which has tables but no version) is
refused with the command that upgrades it: `harness db upgrade`.

The harness keeps its revision in its own table, `harness_alembic_version`: Optuna's
study storage (`harness tune`), which lives in the same database, keeps its own in
Alembic's default `alembic_version`. Stores stamped before that (our revision in
`alembic_version`) are moved over by `harness db upgrade`.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import URL, Connection, Engine

from harness import HarnessError
from harness.locks import server_lock

BASELINE = "0001"  # the schema results.db had before migrations existed
VERSION_TABLE = "harness_alembic_version"
LEGACY_TABLE = "alembic_version"  # where our revision was kept before Optuna shared the database
SCHEMA_LOCK = "ltr-harness schema"  # the server lock (harness.locks) under which a store is created
DB_OPTION = "--db / HARNESS_DB"   # how a command is given its store; `db merge` names its source SOURCE


class NoStore(HarnessError):
    """A store opened only to read is not there (yet): no SQLite file, or a database without tables."""

    def __init__(self, what: str, option: str = DB_OPTION):
        made = ", or make one with `harness run` or `harness sweep`" if option == DB_OPTION else ""
        super().__init__(f"{what}; check {option}{made}")


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


def our_revisions() -> set[str]:
    from alembic.script import ScriptDirectory

    return {s.revision for s in ScriptDirectory.from_config(alembic_config(None)).walk_revisions()}


def legacy_revision(conn: Connection) -> str | None:
    """Our revision where an older harness stamped it: in Alembic's default table."""
    if not inspect(conn).has_table(LEGACY_TABLE):
        return None
    rows = [r[0] for r in conn.execute(text(f"SELECT version_num FROM {LEGACY_TABLE}"))]
    return next((r for r in rows if r in our_revisions()), None)


def current_revision(conn: Connection) -> str | None:
    """The stamped revision; BASELINE for a pre-migration store; None for an empty one."""
    from alembic.runtime.migration import MigrationContext

    revision = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()
    if revision is None:
        revision = legacy_revision(conn)
    if revision is None and inspect(conn).has_table("runs"):
        return BASELINE
    return revision


def ensure_schema(engine: Engine, url: str, metadata, create: bool = True, option: str = DB_OPTION) -> None:
    from alembic import command

    # processes opening a new store together create it one at a time: SQLite's BEGIN IMMEDIATE
    # makes them, elsewhere a server lock (MySQL commits each CREATE TABLE on its own, so its
    # transaction alone would not)
    with engine.connect() as conn, server_lock(conn, SCHEMA_LOCK), conn.begin():
        revision = current_revision(conn)
        if revision is None and not create:
            raise NoStore(f"{url} holds no results store", option)
        if revision is None:
            metadata.create_all(conn)
            command.stamp(alembic_config(conn), "head")
        elif revision != head_revision() or legacy_revision(conn) is not None:
            raise HarnessError(f"results store {url} has schema {revision}, this harness needs {head_revision()}; "
                               f"run `harness db upgrade --db {url}` (keeps every row)")


def sqlite_file(url: URL) -> str | None:
    """The file of a SQLite store; None in memory or on a server."""
    return url.database if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:") \
        else None


def upgrade(url: str) -> tuple[str | None, str]:
    """Upgrade the store at `url` to the newest schema; returns (from, to). A store that is not
    there is refused, not made: upgrading a mistyped path is no upgrade."""
    from alembic import command

    # a plain engine: SQLite's foreign-key enforcement stays off while tables may be rebuilt
    engine = create_engine(url)
    path = sqlite_file(engine.url)
    if path and not os.path.exists(path):   # connecting would make the file
        raise NoStore(f"no results store at {path}")
    try:
        with engine.begin() as conn:
            before = current_revision(conn)
            if before is None:
                raise NoStore(f"{url} holds no results store")
            cfg = alembic_config(conn)
            legacy = legacy_revision(conn)
            if legacy is not None:  # move our stamp out of the table Optuna uses
                conn.execute(text(f"DELETE FROM {LEGACY_TABLE} WHERE version_num = :v"), {"v": legacy})
                if conn.execute(text(f"SELECT COUNT(*) FROM {LEGACY_TABLE}")).scalar() == 0:
                    conn.execute(text(f"DROP TABLE {LEGACY_TABLE}"))
                command.stamp(cfg, legacy)
            elif before == BASELINE and not inspect(conn).has_table(VERSION_TABLE):
                command.stamp(cfg, BASELINE)
            command.upgrade(cfg, "head")
    finally:
        engine.dispose()
    return before, head_revision()
