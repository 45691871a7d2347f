"""Usage records, per-key spend and credit grants.

Revision ID: 0001
Revises: none
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# SQLite numbers rows itself only for a column declared INTEGER PRIMARY KEY.
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "usage_records",
        sa.Column("request_id", sa.Text(), primary_key=True),
        sa.Column("key_id", sa.Text(), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("route", sa.Text(), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("images", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("cost_nano_usd", sa.BigInteger(), nullable=False),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_usage_records_created_at_us", "usage_records", ["created_at_us"])
    op.create_index("ix_usage_records_key_id_created_at_us", "usage_records", ["key_id", "created_at_us"])
    op.create_table(
        "credit_spend",
        sa.Column("key_id", sa.Text(), primary_key=True),
        sa.Column("spent_nano_usd", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "credit_grants",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("key_id", sa.Text(), nullable=False),
        sa.Column("amount_nano_usd", sa.BigInteger(), nullable=False),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
    )
    op.create_index("ix_credit_grants_key_id", "credit_grants", ["key_id"])


def downgrade() -> None:
    op.drop_table("credit_grants")
    op.drop_table("credit_spend")
    op.drop_table("usage_records")
