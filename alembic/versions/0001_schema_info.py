"""schema_info: deployment facts (schema creation time, which component created it).

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "schema_info",
        sa.Column("key", sa.Text(), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
    )
    op.bulk_insert(
        sa.table("schema_info", sa.column("key", sa.Text()), sa.column("value", sa.Text())),
        [{"key": "created_by", "value": "kalandra-bridge"}],
    )


def downgrade() -> None:
    op.drop_table("schema_info")
