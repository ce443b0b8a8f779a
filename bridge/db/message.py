"""bridge_messages: (Kalandra room, log index) <-> Matrix event id, and the portal's progress.

``record_to_matrix`` is the one place the Kalandra -> Matrix queue advances: the message map row
and the portal's ``last_log_index`` change in one transaction, the row first, so the index never
moves past an item that is not recorded.
"""

from __future__ import annotations

from mautrix.types import EventID, RoomID
from mautrix.util.async_db import Database

from . import group_commit
from .util import now_ms

TO_MATRIX = "to_matrix"
TO_KALANDRA = "to_kalandra"


class MessageTable:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def record_to_matrix(
        self, room_id: bytes, log_index: int, mx_room: RoomID, event_id: EventID
    ) -> None:
        await group_commit.write(
            self.db,
            [
                (
                    "INSERT INTO bridge_messages"
                    " (room_id, log_index, mx_room, event_id, direction, created_at)"
                    " VALUES ($1, $2, $3, $4, $5, $6)"
                    " ON CONFLICT (room_id, log_index) DO NOTHING",
                    (room_id, log_index, mx_room, event_id, TO_MATRIX, now_ms()),
                ),
                (
                    "UPDATE bridge_portals SET last_log_index = $2, last_event_id = $3"
                    " WHERE room_id = $1 AND last_log_index < $2",
                    (room_id, log_index, event_id),
                ),
            ],
        )

    async def record_to_kalandra(
        self, room_id: bytes, log_index: int, mx_room: RoomID, event_id: EventID
    ) -> None:
        """A Matrix event sequenced as (room, log index): the map row and the event's dedupe
        mark in one transaction, and its prepared frame (outgoing.py) forgotten (the portal's
        ``last_log_index`` is the other direction's)."""
        await group_commit.write(
            self.db,
            [
                (
                    "INSERT INTO bridge_messages"
                    " (room_id, log_index, mx_room, event_id, direction, created_at)"
                    " VALUES ($1, $2, $3, $4, $5, $6)"
                    " ON CONFLICT (room_id, log_index) DO NOTHING",
                    (room_id, log_index, mx_room, event_id, TO_KALANDRA, now_ms()),
                ),
                (
                    "INSERT INTO bridge_matrix_events (event_id, processed_at) VALUES ($1, $2)"
                    " ON CONFLICT (event_id) DO NOTHING",
                    (event_id, now_ms()),
                ),
                ("DELETE FROM bridge_outgoing WHERE event_id = $1", (event_id,)),
            ],
        )

    async def event_for(self, room_id: bytes, log_index: int) -> EventID | None:
        value = await self.db.fetchval(
            "SELECT event_id FROM bridge_messages WHERE room_id = $1 AND log_index = $2",
            room_id,
            log_index,
        )
        return None if value is None else EventID(value)

    async def index_for(self, mx_room: RoomID, event_id: EventID) -> tuple[bytes, int] | None:
        row = await self.db.fetchrow(
            "SELECT room_id, log_index FROM bridge_messages WHERE mx_room = $1 AND event_id = $2",
            mx_room,
            event_id,
        )
        return None if row is None else (bytes(row["room_id"]), int(row["log_index"]))

    async def count(self, room_id: bytes) -> int:
        value = await self.db.fetchval(
            "SELECT COUNT(*) FROM bridge_messages WHERE room_id = $1", room_id
        )
        return int(value or 0)
