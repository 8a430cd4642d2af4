"""Alembic environment: always driven from harness.migrate with an open connection."""
from alembic import context

from harness.migrate import VERSION_TABLE
from harness.store import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, version_table=VERSION_TABLE,
                  render_as_batch=connection.dialect.name == "sqlite")  # SQLite alters tables by copy
with context.begin_transaction():
    context.run_migrations()
