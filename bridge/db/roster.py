"""Which Kalandra members are bridged Matrix users: member id -> Matrix user id."""

from __future__ import annotations

from mautrix.types import UserID
from mautrix.util.async_db import Database

from .util import u64_from_db


async def bridged_mxids(db: Database) -> dict[int, UserID]:
    rows = await db.fetch("SELECT mxid, member_id FROM bridge_users WHERE member_id IS NOT NULL")
    return {u64_from_db(int(r["member_id"])): UserID(r["mxid"]) for r in rows}


async def bridged_member(db: Database, mxid: UserID) -> int | None:
    member = await db.fetchval("SELECT member_id FROM bridge_users WHERE mxid = $1", mxid)
    return None if member is None else u64_from_db(int(member))


__all__ = ["bridged_member", "bridged_mxids"]
