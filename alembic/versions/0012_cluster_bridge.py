"""cluster: the bridge's bot, named by every process of the cluster.

- cluster_bridge: one row (``slot`` 1), the member id and Matrix user id of the bot of the
  Matrix bridge whose embedded homeserver is one of the cluster's processes. Every process
  names it to its clients in HelloReply, as the bridge's own process does, so a native member
  connected to any of them can add the bridge to a room (`kalandra invite ROOM bridge`).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "cluster_bridge",
        sa.Column("slot", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("member_id", sa.BigInteger(), nullable=False),
        sa.Column("mxid", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("slot", name="pk_cluster_bridge"),
    )


def downgrade() -> None:
    op.drop_table("cluster_bridge")
