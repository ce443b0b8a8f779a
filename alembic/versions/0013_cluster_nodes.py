"""cluster: the live processes (for rebalancing rooms over them).

- cluster_nodes: one row per process of the cluster that takes part in rebalancing, kept alive
  (``expires_at``, judged by the database's clock only) every ``rebalance_seconds``. A process
  gives rooms only to processes alive here; a stopped one lets its row expire at once.

Used on PostgreSQL only (cluster mode refuses SQLite); created on both engines so the schema
stays one.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "cluster_nodes",
        sa.Column("node", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("node", name="pk_cluster_nodes"),
    )


def downgrade() -> None:
    op.drop_table("cluster_nodes")
