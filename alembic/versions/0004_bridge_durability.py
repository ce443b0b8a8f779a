"""bridge durability toward Kalandra: frames about to be sent, send-chain high-water marks,
bridged users' device tokens, and why a Matrix event failed.

- bridge_outgoing: the exact signed frame (and its request id) of a Matrix event, written before
  the frame is sent and deleted when the event is recorded, so a replayed event resends the
  same bytes (the server answers a resend from its log) instead of a second message.
- bridge_send_chains: per (room, epoch, leaf) the highest sender-key generation the bridge has
  used, written before the frame leaves; a restart from an older room snapshot moves the send
  chain past it (no message key is used twice).
- bridge_users.device_token: the bridged user's device token (sealed), reused across connects.
- bridge_matrix_events.failure: NULL when the event was bridged, else why it was not.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "bridge_outgoing",
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("room_id", sa.LargeBinary(16), nullable=False),
        sa.Column("sender_id", sa.BigInteger(), nullable=False),
        sa.Column("request_id", sa.BigInteger(), nullable=False),
        sa.Column("frame", sa.LargeBinary(), nullable=False),  # signed ciphertext frame
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("event_id", name="pk_bridge_outgoing"),
        sa.ForeignKeyConstraint(
            ["room_id"],
            ["bridge_portals.room_id"],
            name="fk_bridge_outgoing_portal",
            ondelete="CASCADE",
        ),
    )
    op.create_table(
        "bridge_send_chains",
        sa.Column("room_id", sa.LargeBinary(16), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("leaf", sa.BigInteger(), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),  # highest used
        sa.PrimaryKeyConstraint("room_id", "epoch", "leaf", name="pk_bridge_send_chains"),
    )
    with op.batch_alter_table("bridge_users") as batch:
        batch.add_column(sa.Column("device_token", sa.LargeBinary(), nullable=True))  # sealed
    with op.batch_alter_table("bridge_matrix_events") as batch:
        batch.add_column(sa.Column("failure", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("bridge_matrix_events") as batch:
        batch.drop_column("failure")
    with op.batch_alter_table("bridge_users") as batch:
        batch.drop_column("device_token")
    op.drop_table("bridge_send_chains")
    op.drop_table("bridge_outgoing")
