"""bridge_users: Matrix users the bridge holds a Kalandra identity for.

The device signing key and the MLS state are stored sealed (purposes "user-signing-key" and
"user-mls-state") under ``bridge.mls_state_key``; this module seals and unseals, so no caller
handles the stored form.
"""

from __future__ import annotations

from dataclasses import dataclass

from mautrix.types import RoomID, UserID
from mautrix.util.async_db import Database

from kalandra_core.crypto import sealed

from .util import u64_from_db, u64_to_db

_KEY_PURPOSE = "user-signing-key"
_STATE_PURPOSE = "user-mls-state"
_TOKEN_PURPOSE = "user-device-token"


@dataclass(slots=True)
class BridgedUserRow:
    mxid: UserID
    permission: str
    member_id: int | None = None
    signing_key: bytes | None = None  # plaintext in memory, sealed in the table
    mls_state: bytes | None = None  # idem
    management_room: RoomID | None = None
    device_token: str | None = None  # idem


class BridgedUserTable:
    def __init__(self, db: Database, state_key: bytes) -> None:
        self.db = db
        self._key = state_key

    def _seal(self, purpose: str, value: bytes | None) -> bytes | None:
        return None if value is None else sealed.seal(self._key, purpose, value)

    def _unseal(self, purpose: str, value: bytes | None) -> bytes | None:
        return None if value is None else sealed.unseal(self._key, purpose, bytes(value))

    async def get(self, mxid: UserID) -> BridgedUserRow | None:
        row = await self.db.fetchrow(
            "SELECT mxid, member_id, signing_key, mls_state, permission, management_room,"
            " device_token FROM bridge_users WHERE mxid = $1",
            mxid,
        )
        if row is None:
            return None
        member = row["member_id"]
        return BridgedUserRow(
            mxid=row["mxid"],
            permission=row["permission"],
            member_id=None if member is None else u64_from_db(int(member)),
            signing_key=self._unseal(_KEY_PURPOSE, row["signing_key"]),
            mls_state=self._unseal(_STATE_PURPOSE, row["mls_state"]),
            management_room=row["management_room"],
            device_token=_text(self._unseal(_TOKEN_PURPOSE, row["device_token"])),
        )

    async def put(self, user: BridgedUserRow) -> None:
        await self.db.execute(
            "INSERT INTO bridge_users"
            " (mxid, member_id, signing_key, mls_state, permission, management_room,"
            " device_token) VALUES ($1, $2, $3, $4, $5, $6, $7)"
            " ON CONFLICT (mxid) DO UPDATE SET member_id = excluded.member_id,"
            " signing_key = excluded.signing_key, mls_state = excluded.mls_state,"
            " permission = excluded.permission, management_room = excluded.management_room,"
            " device_token = excluded.device_token",
            user.mxid,
            None if user.member_id is None else u64_to_db(user.member_id),
            self._seal(_KEY_PURPOSE, user.signing_key),
            self._seal(_STATE_PURPOSE, user.mls_state),
            user.permission,
            user.management_room,
            self._seal(_TOKEN_PURPOSE, _bytes(user.device_token)),
        )

    async def set_device_token(self, mxid: UserID, token: str) -> None:
        await self.db.execute(
            "UPDATE bridge_users SET device_token = $2 WHERE mxid = $1",
            mxid,
            self._seal(_TOKEN_PURPOSE, token.encode()),
        )

    async def member_ids(self) -> list[int]:
        rows = await self.db.fetch(
            "SELECT member_id FROM bridge_users WHERE member_id IS NOT NULL"
        )
        return [u64_from_db(int(r["member_id"])) for r in rows]


def _bytes(value: str | None) -> bytes | None:
    return None if value is None else value.encode()


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()
