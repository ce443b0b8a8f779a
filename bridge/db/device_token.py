"""The homeserver's device_tokens, as the `device-token` command sees them: per member, by id.

Tokens are stored as SHA-256 only (the plaintext is shown once, when issued), so a token is
named by its *token id*: the first hex digits of that hash. This module reads and revokes rows
of the homeserver's own table (same database); issuing goes through the Kalandra store.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from mautrix.util.async_db import Database

from .util import now_ms, u64_to_db

ID_LENGTH = 12


def token_id(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:ID_LENGTH]


@dataclass(frozen=True, slots=True)
class ActiveToken:
    token_id: str
    created_at: int  # Unix ms
    token_hash: bytes


class DeviceTokenTable:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def active(self, member_id: int) -> list[ActiveToken]:
        rows = await self.db.fetch(
            "SELECT token_hash, created_at FROM device_tokens"
            " WHERE member_id = $1 AND revoked_at IS NULL ORDER BY created_at",
            u64_to_db(member_id),
        )
        return [
            ActiveToken(
                bytes(r["token_hash"]).hex()[:ID_LENGTH],
                int(r["created_at"]),
                bytes(r["token_hash"]),
            )
            for r in rows
        ]

    async def revoke(self, member_id: int, token_hash: bytes) -> bool:
        """Revoke one of the member's tokens; False if it was not active."""
        active = {t.token_hash for t in await self.active(member_id)}
        if token_hash not in active:
            return False
        await self.db.execute(
            "UPDATE device_tokens SET revoked_at = $3"
            " WHERE member_id = $1 AND token_hash = $2 AND revoked_at IS NULL",
            u64_to_db(member_id),
            token_hash,
            now_ms(),
        )
        return True


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()
