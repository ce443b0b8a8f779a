"""bridge: portals, puppets (ghosts), bridged users, the message map, de-duplication of
appservice transactions and Matrix events, and the sealed client state the bridge holds.

Member ids are u64 stored as signed BIGINT (two's complement), as in 0002. Every secret (device
signing keys, MLS/client state, tokens) is stored sealed with ``bridge.mls_state_key``
(``kalandra_core.crypto.sealed``); nothing here is plaintext key material.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TABLES = (
    "bridge_portals",
    "bridge_puppets",
    "bridge_users",
    "bridge_messages",
    "bridge_appservice_txns",
    "bridge_matrix_events",
    "bridge_client_state",
)


def upgrade() -> None:
    # One per Kalandra room with a Matrix room. mxid is NULL while the Matrix room is being
    # made (a restart finishes it). last_log_index/last_event_id: the newest log entry bridged
    # to Matrix (-1: none yet); the portal resumes after it.
    op.create_table(
        "bridge_portals",
        sa.Column("room_id", sa.LargeBinary(16), nullable=False),
        sa.Column("mxid", sa.Text(), nullable=True),
        sa.Column("encrypted", sa.Boolean(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("relay_enabled", sa.Boolean(), nullable=False),
        sa.Column("relay_mxid", sa.Text(), nullable=True),
        sa.Column("last_log_index", sa.BigInteger(), nullable=False),
        sa.Column("last_event_id", sa.Text(), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("room_id", name="pk_bridge_portals"),
        sa.UniqueConstraint("mxid", name="uq_bridge_portals_mxid"),
        sa.ForeignKeyConstraint(
            ["room_id"], ["rooms.room_id"], name="fk_bridge_portals_room", ondelete="CASCADE"
        ),
    )
    # Ghosts of native members.
    op.create_table(
        "bridge_puppets",
        sa.Column("member_id", sa.BigInteger(), nullable=False),
        sa.Column("mxid", sa.Text(), nullable=False),
        sa.Column("displayname", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("member_id", name="pk_bridge_puppets"),
        sa.UniqueConstraint("mxid", name="uq_bridge_puppets_mxid"),
    )
    # Matrix users the bridge holds a Kalandra identity for (puppet leaves).
    op.create_table(
        "bridge_users",
        sa.Column("mxid", sa.Text(), nullable=False),
        sa.Column("member_id", sa.BigInteger(), nullable=True),
        sa.Column("signing_key", sa.LargeBinary(), nullable=True),  # sealed
        sa.Column("mls_state", sa.LargeBinary(), nullable=True),  # sealed
        sa.Column("permission", sa.Text(), nullable=False),
        sa.Column("management_room", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("mxid", name="pk_bridge_users"),
        sa.UniqueConstraint("member_id", name="uq_bridge_users_member"),
    )
    # Every bridged item, both ids, recorded before it is acknowledged.
    op.create_table(
        "bridge_messages",
        sa.Column("room_id", sa.LargeBinary(16), nullable=False),
        sa.Column("log_index", sa.BigInteger(), nullable=False),
        sa.Column("mx_room", sa.Text(), nullable=False),
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("direction", sa.Text(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("room_id", "log_index", name="pk_bridge_messages"),
        sa.UniqueConstraint("mx_room", "event_id", name="uq_bridge_messages_event"),
        sa.CheckConstraint(
            "direction IN ('to_matrix', 'to_kalandra')", name="ck_bridge_messages_direction"
        ),
        sa.ForeignKeyConstraint(
            ["room_id"],
            ["bridge_portals.room_id"],
            name="fk_bridge_messages_portal",
            ondelete="CASCADE",
        ),
    )
    op.create_table(
        "bridge_appservice_txns",
        sa.Column("txn_id", sa.Text(), nullable=False),
        sa.Column("processed_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("txn_id", name="pk_bridge_appservice_txns"),
    )
    op.create_table(
        "bridge_matrix_events",
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("processed_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("event_id", name="pk_bridge_matrix_events"),
    )
    # The sans-IO client state of the identities the bridge runs (its bot, later the bridged
    # users' leaves): owner "bot" or an MXID; kind identity/room/bundles/outbox; key = room id
    # for rooms, empty otherwise; value sealed.
    op.create_table(
        "bridge_client_state",
        sa.Column("owner", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("key", sa.LargeBinary(), nullable=False),
        sa.Column("value", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("owner", "kind", "key", name="pk_bridge_client_state"),
    )


def downgrade() -> None:
    for table in reversed(_TABLES):
        op.drop_table(table)
