"""bridge_portals: a Kalandra room and its Matrix room, and how far it has been bridged."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mautrix.types import EventID, RoomID
from mautrix.util.async_db import Database

from .util import now_ms, transaction

_COLUMNS = (
    "room_id, mxid, encrypted, name, topic, relay_enabled, relay_mxid, last_log_index,"
    " last_event_id"
)


@dataclass(slots=True)
class PortalRow:
    room_id: bytes
    mxid: RoomID | None
    encrypted: bool
    name: str
    topic: str
    relay_enabled: bool = False
    relay_mxid: str | None = None
    last_log_index: int = -1  # newest log entry bridged to Matrix
    last_event_id: EventID | None = None


def _row(r: Any) -> PortalRow:  # asyncpg Record or sqlite3.Row: both index by name
    return PortalRow(
        room_id=bytes(r["room_id"]),
        mxid=r["mxid"],
        encrypted=bool(r["encrypted"]),
        name=r["name"],
        topic=r["topic"],
        relay_enabled=bool(r["relay_enabled"]),
        relay_mxid=r["relay_mxid"],
        last_log_index=int(r["last_log_index"]),
        last_event_id=r["last_event_id"],
    )


class PortalTable:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def all(self) -> list[PortalRow]:
        rows = await self.db.fetch(f"SELECT {_COLUMNS} FROM bridge_portals ORDER BY created_at")
        return [_row(r) for r in rows]

    async def get(self, room_id: bytes) -> PortalRow | None:
        row = await self.db.fetchrow(
            f"SELECT {_COLUMNS} FROM bridge_portals WHERE room_id = $1", room_id
        )
        return None if row is None else _row(row)

    async def by_mxid(self, mxid: RoomID) -> PortalRow | None:
        row = await self.db.fetchrow(
            f"SELECT {_COLUMNS} FROM bridge_portals WHERE mxid = $1", mxid
        )
        return None if row is None else _row(row)

    async def insert(self, portal: PortalRow) -> bool:
        """Insert unless the room already has a portal; True if inserted."""
        existing = await self.get(portal.room_id)
        if existing is not None:
            return False
        await self.db.execute(
            "INSERT INTO bridge_portals (room_id, mxid, encrypted, name, topic, relay_enabled,"
            " relay_mxid, last_log_index, last_event_id, created_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (room_id) DO NOTHING",
            portal.room_id,
            portal.mxid,
            portal.encrypted,
            portal.name,
            portal.topic,
            portal.relay_enabled,
            portal.relay_mxid,
            portal.last_log_index,
            portal.last_event_id,
            now_ms(),
        )
        return True

    async def set_mxid(self, room_id: bytes, mxid: RoomID) -> None:
        await self.db.execute(
            "UPDATE bridge_portals SET mxid = $2 WHERE room_id = $1", room_id, mxid
        )

    async def set_relay(self, room_id: bytes, *, enabled: bool, mxid: str | None) -> None:
        await self.db.execute(
            "UPDATE bridge_portals SET relay_enabled = $2, relay_mxid = $3 WHERE room_id = $1",
            room_id,
            enabled,
            mxid,
        )

    async def delete(self, room_id: bytes) -> None:
        """Forget the portal and its message map (the Kalandra room stays)."""
        async with transaction(self.db) as conn:
            await conn.execute("DELETE FROM bridge_messages WHERE room_id = $1", room_id)
            await conn.execute("DELETE FROM bridge_portals WHERE room_id = $1", room_id)
