"""Alembic migrations of the usage and credit tables, run programmatically by `UsageStore.start`."""
