"""bridge_client_state: the sans-IO client state of an identity the bridge runs (owner "bot"
for its own), sealed, in the bridge database: what ``kalandra_core.client.state.ClientState``
keeps in a native client's SQLite file, here on the deployment's one database (PostgreSQL
included).

Rows: ``identity`` (member id, token, device signing key), ``claim`` (the device signing key of
an account being made, written before the account exists: see bridge/bot.py), one ``room`` row
per room (MLS group, sender keys, last applied log index), ``bundles`` (unused KeyPackage
private parts), ``outbox`` (with our merged commits that no saved room state includes yet) and
``marks`` (the generations the client's encryptions used: kalandra_core/client/send_marks.py).
Values are sealed with the purpose ``client-<kind>``.
"""

from __future__ import annotations

from dataclasses import dataclass

import cbor2
from mautrix.util.async_db import Database

from kalandra_core.client.core import ClientCore
from kalandra_core.client.room import ClientRoom, Pending
from kalandra_core.crypto import sealed
from kalandra_core.mls.keypackage import KeyPackageBundle

from . import group_commit
from .group_commit import Statement

_NO_KEY = b""


@dataclass(frozen=True, slots=True)
class SealedIdentity:
    """An identity's secrets (plaintext in memory only)."""

    member_id: int
    token: str
    signing_key: bytes


class ClientStateTable:
    def __init__(self, db: Database, state_key: bytes, owner: str) -> None:
        self.db = db
        self._key = state_key
        self.owner = owner

    def _seal(self, kind: str, value: bytes) -> bytes:
        return sealed.seal(self._key, f"client-{kind}", value)

    def _unseal(self, kind: str, value: bytes) -> bytes:
        return sealed.unseal(self._key, f"client-{kind}", bytes(value))

    # --- identity ------------------------------------------------------------------------------

    async def load_identity(self) -> SealedIdentity | None:
        value = await self.db.fetchval(
            "SELECT value FROM bridge_client_state WHERE owner = $1 AND kind = 'identity'",
            self.owner,
        )
        if value is None:
            return None
        data = cbor2.loads(self._unseal("identity", value))
        return SealedIdentity(int(data["member_id"]), str(data["token"]), bytes(data["key"]))

    async def save_identity(self, identity: SealedIdentity) -> None:
        blob = cbor2.dumps(
            {"member_id": identity.member_id, "token": identity.token, "key": identity.signing_key}
        )
        await self.db.execute(
            "INSERT INTO bridge_client_state (owner, kind, key, value) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (owner, kind, key) DO UPDATE SET value = excluded.value",
            self.owner,
            "identity",
            _NO_KEY,
            self._seal("identity", blob),
        )

    async def load_claim(self) -> bytes | None:
        value = await self.db.fetchval(
            "SELECT value FROM bridge_client_state WHERE owner = $1 AND kind = 'claim'",
            self.owner,
        )
        return None if value is None else self._unseal("claim", value)

    async def save_claim(self, signing_key: bytes) -> None:
        await self.db.execute(
            "INSERT INTO bridge_client_state (owner, kind, key, value) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (owner, kind, key) DO UPDATE SET value = excluded.value",
            self.owner,
            "claim",
            _NO_KEY,
            self._seal("claim", signing_key),
        )

    async def drop_claim(self) -> None:
        await self.db.execute(
            "DELETE FROM bridge_client_state WHERE owner = $1 AND kind = 'claim'", self.owner
        )

    # --- rooms, bundles, outbox ------------------------------------------------------------------

    async def load_into(self, core: ClientCore) -> None:
        rows = await self.db.fetch(
            "SELECT kind, key, value FROM bridge_client_state"
            " WHERE owner = $1 AND kind IN ('room', 'bundles', 'outbox', 'marks')",
            self.owner,
        )
        for row in rows:
            kind, value = row["kind"], self._unseal(row["kind"], row["value"])
            if kind == "room":
                room = ClientRoom.from_bytes(value)
                core.rooms[room.room_id] = room
            elif kind == "bundles":
                for blob in cbor2.loads(value):
                    bundle = KeyPackageBundle.from_bytes(blob)
                    core.bundles[bundle.ref] = bundle
            elif kind == "outbox":
                for state in cbor2.loads(value):
                    core.load_pending(Pending.from_state(state))
            elif kind == "marks":
                core.send_marks.load(value)

    async def write(
        self,
        rooms: dict[bytes, bytes | None],
        *,
        bundles: bytes | None = None,
        outbox: bytes | None = None,
        marks: bytes | None = None,
    ) -> None:
        """One transaction: room states (None deletes the room), and the bundles, outbox and
        send-mark blobs when given (cbor lists, as :func:`bundles_blob`, :func:`outbox_blob` and
        ``SendMarks.to_bytes`` make)."""
        upsert = (
            "INSERT INTO bridge_client_state (owner, kind, key, value) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (owner, kind, key) DO UPDATE SET value = excluded.value"
        )
        statements: list[Statement] = [
            (upsert, (self.owner, kind, _NO_KEY, self._seal(kind, blob)))
            for kind, blob in (("bundles", bundles), ("outbox", outbox), ("marks", marks))
            if blob is not None
        ]
        for room_id, state in rooms.items():
            if state is None:
                statements.append(
                    (
                        "DELETE FROM bridge_client_state"
                        " WHERE owner = $1 AND kind = 'room' AND key = $2",
                        (self.owner, room_id),
                    )
                )
            else:
                statements.append(
                    (upsert, (self.owner, "room", room_id, self._seal("room", state)))
                )
        await group_commit.write(self.db, statements)


def bundles_blob(core: ClientCore) -> bytes:
    return cbor2.dumps([b.to_bytes() for b in core.bundles.values()])


def outbox_blob(core: ClientCore) -> bytes:
    """The outbox and our merged commits that no saved room state includes yet."""
    return cbor2.dumps([p.to_state() for p in [*core.outbox.values(), *core.merged.values()]])
