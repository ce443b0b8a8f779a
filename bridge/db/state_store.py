"""The bridge's Matrix state store: mautrix's, with a room's member writes one at a time.

mautrix replaces a room's member list with a DELETE and then a COPY in one transaction. On
PostgreSQL (READ COMMITTED) another replacement, or one member's upsert, for the same room that
commits in between is invisible to the DELETE and collides with the COPY (UniqueViolation on
mx_user_profile); the Matrix event whose handling asked for the member list then failed. Two
events of a room asking for its joined members at once were enough. The writes of one room are
therefore serialized in this process (the bridge is the only writer of these tables); rooms
stay independent. On SQLite mautrix's single connection serialized them already.
"""

from __future__ import annotations

import asyncio
import weakref

from mautrix.bridge.state_store.asyncpg import PgBridgeStateStore
from mautrix.types import Member, Membership, MemberStateEventContent, RoomID, UserID


class BridgeStateStore(PgBridgeStateStore):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # Kept while in use (a waiter holds it): idle rooms cost nothing.
        self._room_locks: weakref.WeakValueDictionary[RoomID, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    def _lock(self, room_id: RoomID) -> asyncio.Lock:
        lock = self._room_locks.get(room_id)
        if lock is None:
            lock = self._room_locks[room_id] = asyncio.Lock()
        return lock

    async def set_member(
        self, room_id: RoomID, user_id: UserID, member: Member | MemberStateEventContent
    ) -> None:
        async with self._lock(room_id):
            await super().set_member(room_id, user_id, member)

    async def set_membership(
        self, room_id: RoomID, user_id: UserID, membership: Membership
    ) -> None:
        async with self._lock(room_id):
            await super().set_membership(room_id, user_id, membership)

    async def set_members(
        self,
        room_id: RoomID,
        members: dict[UserID, Member | MemberStateEventContent],
        only_membership: Membership | None = None,
    ) -> None:
        async with self._lock(room_id):
            await super().set_members(room_id, members, only_membership)
