"""The bridge's per-event writes committed together (bridge/db/group_commit.py), on SQLite (the
Kalandra store's writer) and PostgreSQL (mautrix's pool, a transaction each): many portals
recording at once share transactions on SQLite, every write is committed (seen by another
connection) when its call returns, each portal's rows are all there in its order, and a write
that fails inside a shared transaction fails alone."""

from __future__ import annotations

import asyncio
import sqlite3

from mautrix.types import EventID, RoomID
from mautrix.util.async_db import Database

from bridge.db import MessageTable, Outgoing, OutgoingTable, SendMark
from bridge.db import group_commit as gc
from kalandra_core.storage import migrations
from kalandra_core.storage.sql import SqlStore

PORTALS = 20
EVENTS = 8


def _room(i: int) -> bytes:
    return i.to_bytes(16, "big")


async def _portals(db: Database) -> None:
    for i in range(PORTALS):
        await db.execute(
            "INSERT INTO rooms (room_id, epoch, next_log_index, creator, created_at, handshake,"
            " group_id, name, topic) VALUES ($1, 0, 0, 1, 0, 'public', $2, '', '')",
            _room(i),
            b"g%d" % i,
        )
        await db.execute(
            "INSERT INTO bridge_portals (room_id, mxid, encrypted, name, topic, relay_enabled,"
            " last_log_index, created_at) VALUES ($1, $2, false, '', '', false, -1, 0)",
            _room(i),
            f"!p{i}:localhost",
        )


def _committed(path: str, room: bytes, log_index: int) -> bool:
    """Seen by a connection of its own: committed, not only written."""
    conn = sqlite3.connect(path)
    try:
        row = conn.execute(
            "SELECT 1 FROM bridge_messages WHERE room_id = ? AND log_index = ?", (room, log_index)
        ).fetchone()
        return row is not None
    finally:
        conn.close()


async def test_portals_recording_at_once_share_commits(db_url: str) -> None:
    await migrations.upgrade(db_url)
    store = await SqlStore.open(db_url, migrate=False)
    db = Database.create(db_url)
    await db.start()
    group = gc.use_group_commit(db, store.sqlite_writer)
    sqlite_path = db_url.removeprefix("sqlite:///") if db_url.startswith("sqlite") else None
    try:
        assert (group is None) == (sqlite_path is None)
        await _portals(db)
        table, outgoing = MessageTable(db), OutgoingTable(db)

        async def portal(i: int) -> None:
            for n in range(EVENTS):
                event = EventID(f"$e{i}-{n}")
                frame = Outgoing(event, _room(i), 7, n, b"frame")
                await outgoing.prepare(frame, SendMark(1, 0, n))
                await table.record_to_kalandra(_room(i), n, RoomID(f"!p{i}:localhost"), event)
                if sqlite_path is not None:
                    assert await asyncio.to_thread(_committed, sqlite_path, _room(i), n)

        await asyncio.gather(*(portal(i) for i in range(PORTALS)))
        for i in range(PORTALS):
            rows = await db.fetch(
                "SELECT log_index, event_id FROM bridge_messages WHERE room_id = $1"
                " ORDER BY log_index",
                _room(i),
            )
            assert [(r["log_index"], r["event_id"]) for r in rows] == [
                (n, f"$e{i}-{n}") for n in range(EVENTS)
            ]
            assert await outgoing.get(EventID(f"$e{i}-0")) is None  # forgotten once recorded
            assert await outgoing.marks(_room(i), 1) == [SendMark(1, 0, EVENTS - 1)]
        if group is not None:
            writes = PORTALS * EVENTS * 2
            assert group.groups < writes / 2, (group.groups, writes)
    finally:
        gc.use_group_commit(db, None)
        await db.stop()
        await store.close()


async def test_a_failing_write_fails_alone(sqlite_url: str) -> None:
    await migrations.upgrade(sqlite_url)
    store = await SqlStore.open(sqlite_url, migrate=False)
    db = Database.create(sqlite_url)
    await db.start()
    group = gc.use_group_commit(db, store.sqlite_writer)
    assert group is not None
    try:
        await _portals(db)
        insert = (
            "INSERT INTO bridge_messages (room_id, log_index, mx_room, event_id, direction,"
            " created_at) VALUES ($1, $2, $3, $4, $5, 0)"
        )

        def row(n: int, direction: str = "to_matrix") -> list[gc.Statement]:
            # Two statements: a failure in the second takes the first back too.
            return [
                (insert, (_room(0), n, "!p0:localhost", f"$a{n}", "to_matrix")),
                (insert, (_room(1), n, "!p1:localhost", f"$b{n}", direction)),
            ]

        before = group.groups
        outcomes = await asyncio.gather(
            gc.write(db, row(1)),
            gc.write(db, row(2, direction="sideways")),  # refused by the CHECK
            gc.write(db, row(3)),
            return_exceptions=True,
        )
        assert outcomes[0] is None
        assert outcomes[2] is None
        assert isinstance(outcomes[1], sqlite3.IntegrityError)
        assert group.groups - before <= 2  # the first alone, the others joined the next one
        got = await db.fetch("SELECT event_id FROM bridge_messages ORDER BY event_id")
        assert [r["event_id"] for r in got] == ["$a1", "$a3", "$b1", "$b3"]
    finally:
        gc.use_group_commit(db, None)
        await db.stop()
        await store.close()
