"""The Kalandra -> Matrix queue's progress for log entries that are not messages (commits,
moderation), and the member id -> MXID lookup of bridged users that mirroring needs.

Commits and moderation leave no row in bridge_messages (their Matrix side is state, a
membership change or a redaction, never a message another event could point at), so the
portal's ``last_log_index`` advances on its own here.
"""

from __future__ import annotations

from mautrix.types import EventID, UserID
from mautrix.util.async_db import Database

from .util import u64_to_db


async def advance(db: Database, room_id: bytes, log_index: int, event_id: EventID | None) -> None:
    """``last_log_index`` moves to ``log_index`` (never back); ``last_event_id`` keeps the last
    Matrix event the queue sent, when this entry sent none."""
    await db.execute(
        "UPDATE bridge_portals SET last_log_index = $2,"
        " last_event_id = COALESCE($3, last_event_id)"
        " WHERE room_id = $1 AND last_log_index < $2",
        room_id,
        log_index,
        event_id,
    )


async def bridged_mxid(db: Database, member_id: int) -> UserID | None:
    """The Matrix user whose puppet leaf is ``member_id``, if any."""
    value = await db.fetchval(
        "SELECT mxid FROM bridge_users WHERE member_id = $1", u64_to_db(member_id)
    )
    return None if value is None else UserID(value)
