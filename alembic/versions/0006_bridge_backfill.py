"""bridge backfill: what the bot decrypted in rooms that have no portal yet.

- bridge_backfill: one row per message (room, log index), with the sender, its original time
  and its content sealed under ``bridge.mls_state_key``; kept only while backfill is on, at
  most ``bridge.backfill.max_messages`` per room, deleted as each is bridged into a new portal
  (the rows are that portal's backfill queue) or redacted.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-09
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "bridge_backfill",
        sa.Column("room_id", sa.LargeBinary(16), nullable=False),
        sa.Column("log_index", sa.BigInteger(), nullable=False),
        sa.Column("sender_id", sa.BigInteger(), nullable=False),
        sa.Column("timestamp_ms", sa.BigInteger(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),  # sealed
        sa.PrimaryKeyConstraint("room_id", "log_index", name="pk_bridge_backfill"),
    )


def downgrade() -> None:
    op.drop_table("bridge_backfill")
