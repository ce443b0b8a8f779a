"""credentials: single-use login codes and last-resort KeyPackages.

- login_codes: short-lived codes a member exchanges once, at Hello, for a device token bound to
  the key that signed that Hello. Only the SHA-256 of a code is stored; a redeemed code's row is
  deleted in the same statement that checks it, so a code opens at most one session.
- last_resort_key_packages: one KeyPackage per member handed out when the member has no other
  (RFC 9420 section 16.8); it is not consumed, so draining a member's KeyPackages never makes
  the member impossible to add.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "login_codes",
        sa.Column("code_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("member_id", sa.BigInteger(), nullable=False),  # u64 as two's complement
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("code_hash", name="pk_login_codes"),
        sa.ForeignKeyConstraint(
            ["member_id"],
            ["members.member_id"],
            name="fk_login_codes_member",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_login_codes_member", "login_codes", ["member_id"])
    op.create_table(
        "last_resort_key_packages",
        sa.Column("member_id", sa.BigInteger(), nullable=False),
        sa.Column("key_package", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("member_id", name="pk_last_resort_key_packages"),
        sa.ForeignKeyConstraint(
            ["member_id"],
            ["members.member_id"],
            name="fk_last_resort_key_packages_member",
            ondelete="CASCADE",
        ),
    )


def downgrade() -> None:
    op.drop_table("last_resort_key_packages")
    op.drop_index("ix_login_codes_member", table_name="login_codes")
    op.drop_table("login_codes")
