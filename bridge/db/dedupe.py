"""bridge_appservice_txns and bridge_matrix_events: what was already processed, in the
database (not in memory), so a replayed transaction or event is recognised after a restart."""

from __future__ import annotations

from mautrix.types import EventID
from mautrix.util.async_db import Database

from . import group_commit
from .util import now_ms


class DedupeTable:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def txn_seen(self, txn_id: str) -> bool:
        value = await self.db.fetchval(
            "SELECT 1 FROM bridge_appservice_txns WHERE txn_id = $1", txn_id
        )
        return value is not None

    async def last_txn(self) -> str | None:
        """The id (without its digest) of the transaction acknowledged last, if any."""
        value = await self.db.fetchval(
            "SELECT txn_id FROM bridge_appservice_txns ORDER BY processed_at DESC LIMIT 1"
        )
        return None if value is None else str(value).split(":", 1)[0]

    async def mark_txn(self, txn_id: str) -> None:
        await group_commit.write(
            self.db,
            [
                (
                    "INSERT INTO bridge_appservice_txns (txn_id, processed_at) VALUES ($1, $2)"
                    " ON CONFLICT (txn_id) DO NOTHING",
                    (txn_id, now_ms()),
                )
            ],
        )

    async def claim_event(self, event_id: EventID) -> bool:
        """Mark a Matrix event processed; False if it already was (skip it)."""
        if await self.event_seen(event_id):
            return False
        await self.db.execute(
            "INSERT INTO bridge_matrix_events (event_id, processed_at) VALUES ($1, $2)"
            " ON CONFLICT (event_id) DO NOTHING",
            event_id,
            now_ms(),
        )
        return True

    async def record_done(self, event_id: EventID, failure: str | None = None) -> None:
        """A Matrix event is handled for good: bridged (``failure`` None), or not, and why
        (its status event and notice were sent first). A prepared frame is forgotten."""
        await group_commit.write(
            self.db,
            [
                (
                    "INSERT INTO bridge_matrix_events (event_id, processed_at, failure)"
                    " VALUES ($1, $2, $3) ON CONFLICT (event_id) DO NOTHING",
                    (event_id, now_ms(), failure),
                ),
                ("DELETE FROM bridge_outgoing WHERE event_id = $1", (event_id,)),
            ],
        )

    async def forget(self, event_id: EventID, failure: str) -> None:
        """Drop the record of an event set aside with ``failure`` (it is handled again)."""
        await self.db.execute(
            "DELETE FROM bridge_matrix_events WHERE event_id = $1 AND failure = $2",
            event_id,
            failure,
        )

    async def failure(self, event_id: EventID) -> str | None:
        value = await self.db.fetchval(
            "SELECT failure FROM bridge_matrix_events WHERE event_id = $1", event_id
        )
        return None if value is None else str(value)

    async def event_seen(self, event_id: EventID) -> bool:
        value = await self.db.fetchval(
            "SELECT 1 FROM bridge_matrix_events WHERE event_id = $1", event_id
        )
        return value is not None
