"""bridge_outgoing and bridge_send_chains: what is about to be sent toward Kalandra.

Before a bridged user's frame leaves, :meth:`OutgoingTable.prepare` writes, in one transaction,
the exact signed frame (with its request id) under the Matrix event id, and the highest
sender-key generation used for (room, epoch, leaf). A Matrix event replayed after a crash
resends those bytes (the server answers a resend of a sequenced frame from its log), and a bot
state restored from an older snapshot moves its send chains past the recorded generations, so
no message key is ever used for two plaintexts. The bot's own messages for a Matrix event
(members/bot_send.py) are recorded with their request id only (an empty frame): the bot's client
keeps its outbox and send marks itself. The row goes when the event is recorded (message.py) or
recorded as failed (dedupe.py)."""

from __future__ import annotations

from dataclasses import dataclass

from mautrix.types import EventID
from mautrix.util.async_db import Database

from . import group_commit
from .group_commit import Statement
from .util import now_ms, u64_from_db, u64_to_db


@dataclass(frozen=True, slots=True)
class Outgoing:
    event_id: EventID
    room_id: bytes
    sender_id: int
    request_id: int
    frame: bytes


@dataclass(frozen=True, slots=True)
class SendMark:
    """The highest generation used as ``leaf`` in ``epoch``."""

    epoch: int
    leaf: int
    generation: int


_UPSERT_MARK = (
    "INSERT INTO bridge_send_chains (room_id, epoch, leaf, generation) VALUES ($1, $2, $3, $4)"
    " ON CONFLICT (room_id, epoch, leaf) DO UPDATE SET generation = excluded.generation"
    " WHERE bridge_send_chains.generation < excluded.generation"
)


class OutgoingTable:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def prepare(self, item: Outgoing, mark: SendMark | None = None) -> None:
        statements: list[Statement] = [
            (
                "INSERT INTO bridge_outgoing"
                " (event_id, room_id, sender_id, request_id, frame, created_at)"
                " VALUES ($1, $2, $3, $4, $5, $6)"
                " ON CONFLICT (event_id) DO UPDATE SET sender_id = excluded.sender_id,"
                " request_id = excluded.request_id, frame = excluded.frame",
                (
                    item.event_id,
                    item.room_id,
                    u64_to_db(item.sender_id),
                    item.request_id,
                    item.frame,
                    now_ms(),
                ),
            )
        ]
        if mark is not None:
            statements.append(_mark(item.room_id, mark))
        await group_commit.write(self.db, statements)

    async def mark(self, room_id: bytes, mark: SendMark) -> None:
        """Only the high-water mark (the bot's own sends, through its client)."""
        await group_commit.write(self.db, [_mark(room_id, mark)])

    async def get(self, event_id: EventID) -> Outgoing | None:
        row = await self.db.fetchrow(
            "SELECT event_id, room_id, sender_id, request_id, frame FROM bridge_outgoing"
            " WHERE event_id = $1",
            event_id,
        )
        if row is None:
            return None
        return Outgoing(
            EventID(row["event_id"]),
            bytes(row["room_id"]),
            u64_from_db(int(row["sender_id"])),
            int(row["request_id"]),
            bytes(row["frame"]),
        )

    async def marks(self, room_id: bytes, epoch: int) -> list[SendMark]:
        """The room's marks for ``epoch``; older epochs' are dropped (never sent in again)."""
        await self.db.execute(
            "DELETE FROM bridge_send_chains WHERE room_id = $1 AND epoch < $2", room_id, epoch
        )
        rows = await self.db.fetch(
            "SELECT epoch, leaf, generation FROM bridge_send_chains"
            " WHERE room_id = $1 AND epoch = $2",
            room_id,
            epoch,
        )
        return [SendMark(int(r["epoch"]), int(r["leaf"]), int(r["generation"])) for r in rows]


def _mark(room_id: bytes, mark: SendMark) -> Statement:
    return (_UPSERT_MARK, (room_id, mark.epoch, mark.leaf, mark.generation))
