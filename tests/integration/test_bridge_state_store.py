"""The bridge's Matrix state store on PostgreSQL under concurrent writes for one room.

mautrix replaces a room's member list with DELETE, then COPY, in one transaction; at READ
COMMITTED, a second replacement (or a single member's upsert) for the same room committed in
between is invisible to the DELETE and collides with the COPY: UniqueViolation on
mx_user_profile, and the caller (a Matrix event's handling) failed. It happened when two
events of one room each asked for its joined members at once."""

from __future__ import annotations

import asyncio

from mautrix.types import Member, Membership, MemberStateEventContent, RoomID, UserID
from mautrix.util.async_db import Database

from bridge.db.state_store import BridgeStateStore

ROOM = RoomID("!room:localhost")
ROUNDS = 30


async def _no_puppet(user_id: UserID, create: bool = False) -> None:
    return None


def _members(n: int) -> dict[UserID, Member | MemberStateEventContent]:
    return {
        UserID(f"@u{i}:localhost"): Member(membership=Membership.JOIN, displayname=f"u{i}")
        for i in range(n)
    }


async def test_concurrent_member_lists_of_one_room(postgres_url: str) -> None:
    db = Database.create(
        postgres_url, upgrade_table=BridgeStateStore.upgrade_table, db_args={"max_size": 10}
    )
    await db.start()
    try:
        store = BridgeStateStore(db, _no_puppet, _no_puppet)
        for round_ in range(ROUNDS):
            late = UserID(f"@late{round_}:localhost")
            await asyncio.gather(
                store.set_members(ROOM, _members(20)),
                store.set_members(ROOM, _members(20)),
                store.set_membership(ROOM, late, Membership.JOIN),
                store.set_members(ROOM, _members(20)),
            )
        members = await store.get_members(ROOM)
        assert set(_members(20)) <= set(members)
    finally:
        await db.stop()
