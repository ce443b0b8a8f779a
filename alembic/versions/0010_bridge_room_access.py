"""bridge room access: who may enter a portal, and on whose word (the access policy).

- bridge_room_access: one row per (Kalandra room, Matrix user) let into the room's portal:
  ``granted_by`` says on whose word — ``member:<id>`` (a native member's encrypted invitation,
  at ``log_index`` of the room's log), ``matrix:<user id>`` (an invitation in the portal by a
  user with invite power), ``admin:<user id>`` (a bridge admin's ``invite``), ``admin:bridge``
  (present when an admin bridged the Matrix room), ``creator:<user id>`` (who made the room
  with ``create``); deleted when the user leaves or is removed from the portal.

Revision ID: 0010
Revises: 0008
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "bridge_room_access",
        sa.Column("room_id", sa.LargeBinary(16), nullable=False),
        sa.Column("mxid", sa.Text(), nullable=False),
        sa.Column("granted_by", sa.Text(), nullable=False),
        sa.Column("log_index", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("room_id", "mxid", name="pk_bridge_room_access"),
    )


def downgrade() -> None:
    op.drop_table("bridge_room_access")
