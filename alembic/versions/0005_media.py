"""media: encrypted blocks stored once by hash (media_blocks, with a reference count) and the
references rooms hold to them (media_refs, one per room, block and uploader).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "media_blocks",
        sa.Column("digest", sa.LargeBinary(32), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),  # ciphertext only
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("refcount", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("digest", name="pk_media_blocks"),
    )
    op.create_table(
        "media_refs",
        sa.Column("room_id", sa.LargeBinary(16), nullable=False),
        sa.Column("digest", sa.LargeBinary(32), nullable=False),
        sa.Column("uploader_id", sa.BigInteger(), nullable=False),  # u64 as two's complement
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("room_id", "digest", "uploader_id", name="pk_media_refs"),
        sa.ForeignKeyConstraint(
            ["room_id"], ["rooms.room_id"], name="fk_media_refs_room", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["digest"], ["media_blocks.digest"], name="fk_media_refs_block", ondelete="CASCADE"
        ),
    )
    op.create_index("ix_media_refs_digest", "media_refs", ["digest"])


def downgrade() -> None:
    op.drop_index("ix_media_refs_digest", table_name="media_refs")
    op.drop_table("media_refs")
    op.drop_table("media_blocks")
