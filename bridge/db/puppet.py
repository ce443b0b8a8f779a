"""bridge_puppets: native members' ghosts (member id <-> MXID, display name set)."""

from __future__ import annotations

from dataclasses import dataclass

from mautrix.types import UserID
from mautrix.util.async_db import Database

from .util import u64_from_db, u64_to_db


@dataclass(slots=True)
class PuppetRow:
    member_id: int
    mxid: UserID
    displayname: str | None


class PuppetTable:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, member_id: int) -> PuppetRow | None:
        row = await self.db.fetchrow(
            "SELECT member_id, mxid, displayname FROM bridge_puppets WHERE member_id = $1",
            u64_to_db(member_id),
        )
        if row is None:
            return None
        return PuppetRow(u64_from_db(int(row["member_id"])), row["mxid"], row["displayname"])

    async def put(self, puppet: PuppetRow) -> None:
        await self.db.execute(
            "INSERT INTO bridge_puppets (member_id, mxid, displayname) VALUES ($1, $2, $3)"
            " ON CONFLICT (member_id) DO UPDATE SET mxid = excluded.mxid,"
            " displayname = excluded.displayname",
            u64_to_db(puppet.member_id),
            puppet.mxid,
            puppet.displayname,
        )
