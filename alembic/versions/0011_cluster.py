"""cluster: room leases (who sequences a room) and the cluster's mail.

- room_leases: one row per room some process has sequenced in cluster mode. ``owner`` is the
  node name, ``token`` the fencing token (it grows by one at every acquisition and never goes
  back: a released lease keeps its row), ``expires_at`` judged by the database's clock only.
  Every write a room's sequencer makes checks its token against this row, under its row lock,
  in the write's own transaction.
- cluster_mail: bus messages too large for a NOTIFY payload, taken by ``target_node`` in id
  order (the NOTIFY carries only a wake-up).

Used on PostgreSQL only (cluster mode refuses SQLite); created on both engines so the schema
stays one.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SERIAL = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "room_leases",
        sa.Column("room_id", sa.LargeBinary(16), nullable=False),
        sa.Column("owner", sa.Text(), nullable=False),
        sa.Column("token", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("room_id", name="pk_room_leases"),
    )
    op.create_index("ix_room_leases_owner", "room_leases", ["owner"])
    op.create_table(
        "cluster_mail",
        sa.Column("mail_id", _SERIAL, autoincrement=True, nullable=False),
        sa.Column("target_node", sa.Text(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("mail_id", name="pk_cluster_mail"),
    )
    op.create_index("ix_cluster_mail_target", "cluster_mail", ["target_node", "mail_id"])


def downgrade() -> None:
    op.drop_index("ix_cluster_mail_target", table_name="cluster_mail")
    op.drop_table("cluster_mail")
    op.drop_index("ix_room_leases_owner", table_name="room_leases")
    op.drop_table("room_leases")
