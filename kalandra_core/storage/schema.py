"""SQLAlchemy Core tables mirroring ``alembic/versions`` (the migrations are the source of truth;
``tests/integration/test_store.py`` checks that the two agree).

Member ids are u64; the columns holding them use :class:`U64`, which stores the value in a signed
BIGINT as its two's-complement (ids >= 2**63 become negative) and converts back on read, so both
engines can hold the whole range. Equality lookups work unchanged; ordering by member id does not
(nothing orders by it). Epochs and log indexes are plain BIGINTs: they stay far below 2**63 and
range queries need their order.
"""

from __future__ import annotations

from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

_U64_LIMIT: Final = 1 << 64
_I64_LIMIT: Final = 1 << 63


def u64_to_db(value: int) -> int:
    if not 0 <= value < _U64_LIMIT:
        raise ValueError(f"not a u64: {value}")
    return value - _U64_LIMIT if value >= _I64_LIMIT else value


def u64_from_db(value: int) -> int:
    return value + _U64_LIMIT if value < 0 else value


class U64(TypeDecorator[int]):
    """An unsigned 64-bit id in a signed BIGINT column."""

    impl = sa.BigInteger
    cache_ok = True

    def process_bind_param(self, value: int | None, dialect: Dialect) -> int | None:
        return None if value is None else u64_to_db(value)

    def process_result_value(self, value: Any | None, dialect: Dialect) -> int | None:
        return None if value is None else u64_from_db(int(value))


# INTEGER PRIMARY KEY is SQLite's rowid alias (what autoincrement needs there).
_SERIAL = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

metadata = sa.MetaData()


def _room_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["room_id"], ["rooms.room_id"], name=f"fk_{table}_room", ondelete="CASCADE"
    )


members = sa.Table(
    "members",
    metadata,
    sa.Column("member_id", U64(), primary_key=True, autoincrement=False),
    sa.Column("name", sa.Text(), nullable=False, unique=True),
    sa.Column("signature_key", sa.LargeBinary(), nullable=True),
    sa.Column("created_at", sa.BigInteger(), nullable=False),
)

device_tokens = sa.Table(
    "device_tokens",
    metadata,
    sa.Column("token_hash", sa.LargeBinary(), primary_key=True),
    sa.Column(
        "member_id",
        U64(),
        sa.ForeignKey("members.member_id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    sa.Column("created_at", sa.BigInteger(), nullable=False),
    sa.Column("revoked_at", sa.BigInteger(), nullable=True),
)

rooms = sa.Table(
    "rooms",
    metadata,
    sa.Column("room_id", sa.LargeBinary(16), primary_key=True),
    sa.Column("epoch", sa.BigInteger(), nullable=False),
    sa.Column("next_log_index", sa.BigInteger(), nullable=False),
    sa.Column("creator", U64(), nullable=False),
    sa.Column("created_at", sa.BigInteger(), nullable=False),
    sa.Column("handshake", sa.Text(), nullable=False),
    sa.Column("group_id", sa.LargeBinary(), nullable=False),
    sa.Column("name", sa.Text(), nullable=False),
    sa.Column("topic", sa.Text(), nullable=False),
)

room_members = sa.Table(
    "room_members",
    metadata,
    sa.Column("room_id", sa.LargeBinary(16), primary_key=True),
    sa.Column("member_id", U64(), primary_key=True, index=True),
    sa.Column("role", sa.Integer(), nullable=False),
    sa.Column("leaf_index", sa.BigInteger(), nullable=True),
    _room_fk("room_members"),
)

room_bans = sa.Table(
    "room_bans",
    metadata,
    sa.Column("room_id", sa.LargeBinary(16), primary_key=True),
    sa.Column("member_id", U64(), primary_key=True),
    sa.Column("moderator_id", U64(), nullable=False),
    sa.Column("reason", sa.Text(), nullable=False),
    sa.Column("expires_at", sa.BigInteger(), nullable=True),
    _room_fk("room_bans"),
)

frame_log = sa.Table(
    "frame_log",
    metadata,
    sa.Column("room_id", sa.LargeBinary(16), primary_key=True),
    sa.Column("log_index", sa.BigInteger(), primary_key=True, autoincrement=False),
    sa.Column("opcode", sa.Integer(), nullable=False),
    sa.Column("sender_id", U64(), nullable=False),
    sa.Column("epoch", sa.BigInteger(), nullable=False),
    sa.Column("header", sa.LargeBinary(), nullable=False),
    _room_fk("frame_log"),
)

frame_payloads = sa.Table(
    "frame_payloads",
    metadata,
    sa.Column("room_id", sa.LargeBinary(16), primary_key=True),
    sa.Column("log_index", sa.BigInteger(), primary_key=True, autoincrement=False),
    sa.Column("payload", sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(
        ["room_id", "log_index"],
        ["frame_log.room_id", "frame_log.log_index"],
        name="fk_frame_payloads_log",
        ondelete="CASCADE",
    ),
)

# epoch = the header epoch of the commit, i.e. the epoch that commit ended.
commit_index = sa.Table(
    "commit_index",
    metadata,
    sa.Column("room_id", sa.LargeBinary(16), primary_key=True),
    sa.Column("epoch", sa.BigInteger(), primary_key=True, autoincrement=False),
    sa.Column("log_index", sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(
        ["room_id", "log_index"],
        ["frame_log.room_id", "frame_log.log_index"],
        name="fk_commit_index_log",
        ondelete="CASCADE",
    ),
)

welcomes = sa.Table(
    "welcomes",
    metadata,
    sa.Column("welcome_id", _SERIAL, primary_key=True, autoincrement=True),
    sa.Column("room_id", sa.LargeBinary(16), nullable=False),
    sa.Column("recipient_id", U64(), nullable=False),
    sa.Column("frame", sa.LargeBinary(), nullable=False),
    sa.Column("created_at", sa.BigInteger(), nullable=False),
    _room_fk("welcomes"),
    sa.Index("ix_welcomes_recipient", "recipient_id", "welcome_id"),
    sqlite_autoincrement=True,
)

key_packages = sa.Table(
    "key_packages",
    metadata,
    sa.Column("kp_id", _SERIAL, primary_key=True, autoincrement=True),
    sa.Column(
        "member_id", U64(), sa.ForeignKey("members.member_id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("kp_hash", sa.LargeBinary(32), nullable=False),
    sa.Column("key_package", sa.LargeBinary(), nullable=False),
    sa.Column("created_at", sa.BigInteger(), nullable=False),
    sa.UniqueConstraint("member_id", "kp_hash", name="uq_key_packages_member_hash"),
    sa.Index("ix_key_packages_member", "member_id", "kp_id"),
    sqlite_autoincrement=True,
)

group_info = sa.Table(
    "group_info",
    metadata,
    sa.Column("room_id", sa.LargeBinary(16), primary_key=True),
    sa.Column("epoch", sa.BigInteger(), nullable=False),
    sa.Column("group_info", sa.LargeBinary(), nullable=False),
    _room_fk("group_info"),
)

# Media (alembic 0005): encrypted blocks by BLAKE3 hash, kept once; a room reaches a block only
# through its references (one per uploader), and refcount counts every reference.
media_blocks = sa.Table(
    "media_blocks",
    metadata,
    sa.Column("digest", sa.LargeBinary(32), primary_key=True),
    sa.Column("data", sa.LargeBinary(), nullable=False),
    sa.Column("size", sa.BigInteger(), nullable=False),
    sa.Column("refcount", sa.BigInteger(), nullable=False),
    sa.Column("created_at", sa.BigInteger(), nullable=False),
)

media_refs = sa.Table(
    "media_refs",
    metadata,
    sa.Column("room_id", sa.LargeBinary(16), primary_key=True),
    sa.Column("digest", sa.LargeBinary(32), primary_key=True),
    sa.Column("uploader_id", U64(), primary_key=True),
    sa.Column("created_at", sa.BigInteger(), nullable=False),
    _room_fk("media_refs"),
    sa.ForeignKeyConstraint(
        ["digest"], ["media_blocks.digest"], name="fk_media_refs_block", ondelete="CASCADE"
    ),
    sa.Index("ix_media_refs_digest", "digest"),
    sa.Index("ix_media_refs_uploader", "uploader_id"),  # a member's stored bytes (quota)
)

# Credentials (alembic 0007): single-use login codes, stored as SHA-256 only, and one
# last-resort KeyPackage per member (RFC 9420 section 16.8), handed out but never consumed.
login_codes = sa.Table(
    "login_codes",
    metadata,
    sa.Column("code_hash", sa.LargeBinary(32), primary_key=True),
    sa.Column(
        "member_id",
        U64(),
        sa.ForeignKey("members.member_id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    sa.Column("created_at", sa.BigInteger(), nullable=False),
    sa.Column("expires_at", sa.BigInteger(), nullable=False),
)

last_resort_key_packages = sa.Table(
    "last_resort_key_packages",
    metadata,
    sa.Column(
        "member_id",
        U64(),
        sa.ForeignKey("members.member_id", ondelete="CASCADE"),
        primary_key=True,
        autoincrement=False,
    ),
    sa.Column("key_package", sa.LargeBinary(), nullable=False),
    sa.Column("created_at", sa.BigInteger(), nullable=False),
)

# Cluster (alembic 0011): who sequences each room, with its fencing token, and bus messages
# too large for a NOTIFY payload. Used on PostgreSQL only.
room_leases = sa.Table(
    "room_leases",
    metadata,
    sa.Column("room_id", sa.LargeBinary(16), primary_key=True),
    sa.Column("owner", sa.Text(), nullable=False),
    sa.Column("token", sa.BigInteger(), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_room_leases_owner", "owner"),
)

cluster_mail = sa.Table(
    "cluster_mail",
    metadata,
    sa.Column("mail_id", _SERIAL, primary_key=True, autoincrement=True),
    sa.Column("target_node", sa.Text(), nullable=False),
    sa.Column("body", sa.LargeBinary(), nullable=False),
    sa.Index("ix_cluster_mail_target", "target_node", "mail_id"),
)

# Cluster (alembic 0012): the bot of the Matrix bridge embedded in one of the processes (one
# row, slot 1), so every process names it to its clients in HelloReply.
cluster_bridge = sa.Table(
    "cluster_bridge",
    metadata,
    sa.Column("slot", sa.Integer(), primary_key=True, autoincrement=False),
    sa.Column("member_id", U64(), nullable=False),
    sa.Column("mxid", sa.Text(), nullable=False),
)

# Cluster (alembic 0013): the processes taking part in rebalancing, alive until ``expires_at``
# (the database's clock).
cluster_nodes = sa.Table(
    "cluster_nodes",
    metadata,
    sa.Column("node", sa.Text(), primary_key=True),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
)
