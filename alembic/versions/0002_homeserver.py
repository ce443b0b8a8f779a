"""homeserver: accounts, device tokens, rooms, rosters, bans, the frame log, commit index,
welcome mailbox, key-package directory and group info.

Member ids are u64 on the wire; they are stored in signed BIGINT columns as their
two's-complement value (ids >= 2**63 become negative), converted by the ``U64`` column type in
``kalandra_core/storage/schema.py``. Epochs and log indexes are stored as they are (they stay far
below 2**63 and must keep their order). Timestamps are Unix milliseconds.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# INTEGER PRIMARY KEY is SQLite's rowid alias (what autoincrement needs there).
_SERIAL = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

_TABLES = (
    "members",
    "device_tokens",
    "rooms",
    "room_members",
    "room_bans",
    "frame_log",
    "frame_payloads",
    "commit_index",
    "welcomes",
    "key_packages",
    "group_info",
)


def _room_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["room_id"], ["rooms.room_id"], name=f"fk_{table}_room", ondelete="CASCADE"
    )


def upgrade() -> None:
    op.create_table(
        "members",
        sa.Column("member_id", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("signature_key", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("member_id", name="pk_members"),
        sa.UniqueConstraint("name", name="uq_members_name"),
    )
    op.create_table(
        "device_tokens",
        sa.Column("token_hash", sa.LargeBinary(), nullable=False),
        sa.Column("member_id", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("revoked_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("token_hash", name="pk_device_tokens"),
        sa.ForeignKeyConstraint(
            ["member_id"],
            ["members.member_id"],
            name="fk_device_tokens_member",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_device_tokens_member", "device_tokens", ["member_id"])
    op.create_table(
        "rooms",
        sa.Column("room_id", sa.LargeBinary(16), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("next_log_index", sa.BigInteger(), nullable=False),
        sa.Column("creator", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("handshake", sa.Text(), nullable=False),
        sa.Column("group_id", sa.LargeBinary(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("room_id", name="pk_rooms"),
        sa.CheckConstraint("handshake IN ('public', 'private')", name="ck_rooms_handshake"),
        sa.CheckConstraint("next_log_index >= 0 AND epoch >= 0", name="ck_rooms_counters"),
    )
    # Roster members are not required to be local accounts: the roster follows MLS, and an
    # append must never fail on something the sequencer could not have checked.
    op.create_table(
        "room_members",
        sa.Column("room_id", sa.LargeBinary(16), nullable=False),
        sa.Column("member_id", sa.BigInteger(), nullable=False),
        sa.Column("role", sa.Integer(), nullable=False),
        sa.Column("leaf_index", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("room_id", "member_id", name="pk_room_members"),
        _room_fk("room_members"),
    )
    op.create_index("ix_room_members_member", "room_members", ["member_id"])
    op.create_table(
        "room_bans",
        sa.Column("room_id", sa.LargeBinary(16), nullable=False),
        sa.Column("member_id", sa.BigInteger(), nullable=False),
        sa.Column("moderator_id", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("room_id", "member_id", name="pk_room_bans"),
        _room_fk("room_bans"),
    )
    op.create_table(
        "frame_log",
        sa.Column("room_id", sa.LargeBinary(16), nullable=False),
        sa.Column("log_index", sa.BigInteger(), nullable=False),
        sa.Column("opcode", sa.Integer(), nullable=False),
        sa.Column("sender_id", sa.BigInteger(), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("header", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("room_id", "log_index", name="pk_frame_log"),
        _room_fk("frame_log"),
    )
    # Payloads apart from headers: a redaction deletes the payload row and nothing else.
    op.create_table(
        "frame_payloads",
        sa.Column("room_id", sa.LargeBinary(16), nullable=False),
        sa.Column("log_index", sa.BigInteger(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("room_id", "log_index", name="pk_frame_payloads"),
        sa.ForeignKeyConstraint(
            ["room_id", "log_index"],
            ["frame_log.room_id", "frame_log.log_index"],
            name="fk_frame_payloads_log",
            ondelete="CASCADE",
        ),
    )
    # epoch = the header epoch of the commit, i.e. the epoch that commit ended.
    op.create_table(
        "commit_index",
        sa.Column("room_id", sa.LargeBinary(16), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("log_index", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("room_id", "epoch", name="pk_commit_index"),
        sa.ForeignKeyConstraint(
            ["room_id", "log_index"],
            ["frame_log.room_id", "frame_log.log_index"],
            name="fk_commit_index_log",
            ondelete="CASCADE",
        ),
    )
    op.create_table(
        "welcomes",
        sa.Column("welcome_id", _SERIAL, nullable=False, autoincrement=True),
        sa.Column("room_id", sa.LargeBinary(16), nullable=False),
        sa.Column("recipient_id", sa.BigInteger(), nullable=False),
        sa.Column("frame", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("welcome_id", name="pk_welcomes"),
        _room_fk("welcomes"),
        # AUTOINCREMENT: an id is never reused, so a late ack cannot delete a newer Welcome.
        sqlite_autoincrement=True,
    )
    op.create_index("ix_welcomes_recipient", "welcomes", ["recipient_id", "welcome_id"])
    # Uniqueness on the SHA-256 of the KeyPackage: a B-tree entry on the raw bytes could exceed
    # PostgreSQL's index row limit for large packages.
    op.create_table(
        "key_packages",
        sa.Column("kp_id", _SERIAL, nullable=False, autoincrement=True),
        sa.Column("member_id", sa.BigInteger(), nullable=False),
        sa.Column("kp_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("key_package", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("kp_id", name="pk_key_packages"),
        sa.UniqueConstraint("member_id", "kp_hash", name="uq_key_packages_member_hash"),
        sa.ForeignKeyConstraint(
            ["member_id"],
            ["members.member_id"],
            name="fk_key_packages_member",
            ondelete="CASCADE",
        ),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_key_packages_member", "key_packages", ["member_id", "kp_id"])
    op.create_table(
        "group_info",
        sa.Column("room_id", sa.LargeBinary(16), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("group_info", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("room_id", name="pk_group_info"),
        _room_fk("group_info"),
    )


def downgrade() -> None:
    # Reverse creation order so no foreign key points at a dropped table; indexes go with them.
    for table in reversed(_TABLES):
        op.drop_table(table)
