"""Alembic's environment for the usage and credit tables.

There is no alembic.ini: `UsageStore` runs the upgrade on a connection it has already opened, inside its own
transaction (and, on PostgreSQL, under an advisory lock), and hands that connection in through
`config.attributes["connection"]`. Alembic sees the transaction is the caller's and neither begins nor commits one.
A new revision is a new file in `versions/` whose `down_revision` is the last one's `revision`; it must work
on both SQLite and PostgreSQL (the unit tests migrate SQLite, the integration tests PostgreSQL).
"""

from alembic import context

from serve_app.tenancy.metering import METADATA, VERSION_TABLE

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=METADATA,
    version_table=VERSION_TABLE,  # our own, so other alembic histories may share the database
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
)
with context.begin_transaction():
    context.run_migrations()
