"""Named locks on the database server of a results store, held by one connection.

Such a lock blocks no table: writers, the store's own and Optuna's, go on while it is held.
PostgreSQL has advisory locks and MySQL / MariaDB named locks; SQLite has neither, and its
callers fall back on what SQLite offers (BEGIN IMMEDIATE, a lock file beside the database).
"""
from __future__ import annotations

import contextlib
import hashlib

from sqlalchemy import text
from sqlalchemy.engine import Connection

from harness import HarnessError

MYSQL = ("mysql", "mariadb")


@contextlib.contextmanager
def server_lock(conn: Connection, name: str):
    """Hold the lock `name` against every other connection to the server, on every machine,
    until the block ends. Yields whether the server has such locks: False on SQLite, where
    nothing is held. Each statement is committed at once, so `conn` is free for transactions
    of its own inside the block."""
    digest = hashlib.sha256(name.encode()).digest()
    if conn.dialect.name == "postgresql":
        params = {"key": int.from_bytes(digest[:8], "big", signed=True)}
        take, release = "SELECT pg_advisory_lock(:key)", "SELECT pg_advisory_unlock(:key)"
    elif conn.dialect.name in MYSQL:
        # names are at most 64 characters; MariaDB takes no negative (endless) timeout: a year
        params = {"key": f"ltr-harness:{digest.hex()[:48]}"}
        take, release = "SELECT GET_LOCK(:key, 31536000)", "SELECT RELEASE_LOCK(:key)"
    else:
        yield False
        return
    answer = conn.execute(text(take), params).scalar()
    conn.commit()
    if conn.dialect.name in MYSQL and answer != 1:   # 0: timed out, NULL: an error
        raise HarnessError(f"could not take the store's lock '{name}' (GET_LOCK answered {answer})")
    try:
        yield True
    finally:
        # a pooled connection outlives the block: the lock must be released, not left to a close
        conn.execute(text(release), params)
        conn.commit()
