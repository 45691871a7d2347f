"""Revisions of the usage and credit schema, oldest first; one schema for SQLite and PostgreSQL."""
