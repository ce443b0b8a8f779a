"""Who may enter which portal (bridge/access.py): (room, Matrix user) -> on whose word."""

from __future__ import annotations

from mautrix.types import UserID
from mautrix.util.async_db import Database

from .util import now_ms


class AccessTable:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def grant(
        self, room_id: bytes, mxid: UserID, granted_by: str, log_index: int | None
    ) -> None:
        """Recorded once: a second grant (a replayed invitation) keeps the first."""
        await self.db.execute(
            "INSERT INTO bridge_room_access (room_id, mxid, granted_by, log_index, created_at)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (room_id, mxid) DO NOTHING",
            room_id,
            mxid,
            granted_by,
            log_index,
            now_ms(),
        )

    async def revoke(self, room_id: bytes, mxid: UserID) -> None:
        await self.db.execute(
            "DELETE FROM bridge_room_access WHERE room_id = $1 AND mxid = $2", room_id, mxid
        )

    async def all(self) -> list[tuple[bytes, UserID]]:
        rows = await self.db.fetch("SELECT room_id, mxid FROM bridge_room_access")
        return [(bytes(r["room_id"]), UserID(r["mxid"])) for r in rows]
