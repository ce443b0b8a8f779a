"""Migration 0004 and its tables, on SQLite and PostgreSQL: upgrading from 0003 keeps the
bridge's rows, the prepared frames and send-chain marks behave as the bridge relies on (a frame
replaced by a newer one for the same event, forgotten once the event is recorded or recorded as
failed; marks only move up; older epochs' marks dropped), device tokens are stored sealed, and
downgrading to 0003 gives the old schema back with the rows it had."""

from __future__ import annotations

import os

from mautrix.types import EventID, RoomID, UserID
from mautrix.util.async_db import Database

from bridge.db import (
    BridgedUserRow,
    BridgedUserTable,
    DedupeTable,
    MessageTable,
    Outgoing,
    OutgoingTable,
    SendMark,
)
from kalandra_core.storage import migrations

ROOM = bytes(range(16))
KEY = os.urandom(32)
MXID = UserID("@bob:localhost")


async def _setup_0003(db: Database) -> None:
    await db.execute(
        "INSERT INTO rooms (room_id, epoch, next_log_index, creator, created_at, handshake,"
        " group_id, name, topic) VALUES ($1, 0, 0, 1, 0, 'public', $2, '', '')",
        ROOM,
        b"g",
    )
    await db.execute(
        "INSERT INTO bridge_portals (room_id, mxid, encrypted, name, topic, relay_enabled,"
        " last_log_index, created_at) VALUES ($1, '!p:localhost', false, '', '', false, -1, 0)",
        ROOM,
    )
    await db.execute(
        "INSERT INTO bridge_users (mxid, member_id, permission) VALUES ($1, 7, 'user')", MXID
    )


async def test_migration_0004_up_and_down_with_data(db_url: str) -> None:
    await migrations.upgrade(db_url, "0003")
    db = Database.create(db_url)
    await db.start()
    try:
        await _setup_0003(db)
        await migrations.upgrade(db_url)
        assert await migrations.current(db_url) == migrations.head_revision()

        users = BridgedUserTable(db, KEY)
        row = await users.get(MXID)
        assert row is not None
        assert row.member_id == 7
        assert row.device_token is None
        await users.set_device_token(MXID, "token-1")
        stored = await db.fetchval("SELECT device_token FROM bridge_users WHERE mxid = $1", MXID)
        assert b"token-1" not in bytes(stored)  # sealed
        row = await users.get(MXID)
        assert row is not None
        assert row.device_token == "token-1"
        await users.put(BridgedUserRow(MXID, "user", 7, b"k" * 32, None, None, "token-2"))
        assert (await users.get(MXID) or row).device_token == "token-2"

        outgoing = OutgoingTable(db)
        first, second = EventID("$first"), EventID("$second")
        await outgoing.prepare(Outgoing(first, ROOM, 7, 11, b"frame-a"), SendMark(4, 1, 0))
        await outgoing.prepare(Outgoing(first, ROOM, 7, 12, b"frame-b"), SendMark(4, 1, 1))
        await outgoing.prepare(Outgoing(second, ROOM, 7, 13, b"frame-c"), SendMark(4, 2, 5))
        await outgoing.mark(ROOM, SendMark(4, 1, 0))  # never moves down
        await outgoing.mark(ROOM, SendMark(3, 1, 9))  # an older epoch
        assert await outgoing.get(first) == Outgoing(first, ROOM, 7, 12, b"frame-b")
        marks = await outgoing.marks(ROOM, 4)
        assert sorted(marks, key=lambda m: m.leaf) == [SendMark(4, 1, 1), SendMark(4, 2, 5)]
        assert await outgoing.marks(ROOM, 3) == []  # dropped once epoch 4 was asked for

        await MessageTable(db).record_to_kalandra(ROOM, 0, RoomID("!p:localhost"), first)
        assert await outgoing.get(first) is None
        dedupe = DedupeTable(db)
        assert await dedupe.event_seen(first)
        assert await dedupe.failure(first) is None
        await dedupe.record_done(second, "m.no_permission")
        assert await outgoing.get(second) is None
        assert await dedupe.failure(second) == "m.no_permission"

        await migrations.downgrade(db_url, "0003")
        assert await migrations.current(db_url) == "0003"
        kept = await db.fetchrow("SELECT member_id FROM bridge_users WHERE mxid = $1", MXID)
        assert kept is not None
        assert int(kept["member_id"]) == 7
        assert await db.fetchval("SELECT COUNT(*) FROM bridge_matrix_events") == 2
        await migrations.upgrade(db_url)  # and up again
    finally:
        await db.stop()
