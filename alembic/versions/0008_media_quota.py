"""media quota: the references a member holds, found by uploader (ix_media_refs_uploader), so
the server sums a member's stored bytes when a block is put (server.media.quota_per_member).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_media_refs_uploader", "media_refs", ["uploader_id"])


def downgrade() -> None:
    op.drop_index("ix_media_refs_uploader", table_name="media_refs")
