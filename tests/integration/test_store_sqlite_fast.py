"""SqlStore's one-hop SQLite append (``sqlite_writer.SqliteWriter``) next to its SQLAlchemy
writes: races between stores and between paths, rollback, durability, close."""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
from integration.store_helpers import COMMIT, HIGH, OWNER, entry, new_room, room_id

from kalandra_core.storage import (
    AppendConflict,
    BanRecord,
    MediaPut,
    NotFound,
    Role,
    Room,
    RoomChanges,
    RoomMember,
    SqlStore,
    StoreError,
)

DEADLINE = 60  # seconds: only there to turn a deadlock into a failure, never a timing assert


@pytest.fixture
async def store(sqlite_url: str) -> AsyncIterator[SqlStore]:
    s = await SqlStore.open(sqlite_url)
    try:
        yield s
    finally:
        await s.close()


def fast_thread_alive() -> bool:
    return any(t.name.startswith("kalandra-sqlite") for t in threading.enumerate())


async def test_sqlite_uses_the_fast_path_with_durable_settings(store: SqlStore) -> None:
    fast = store._fast
    assert fast is not None

    def pragmas() -> tuple[Any, ...]:
        conn = fast._connection()
        return tuple(
            conn.execute(f"PRAGMA {name}").fetchone()[0]
            for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
        )

    assert await fast._run(pragmas) == ("wal", 2, 1, 10_000)  # synchronous 2 = FULL


async def test_postgres_keeps_the_sqlalchemy_path(postgres_url: str) -> None:
    store = await SqlStore.open(postgres_url)
    try:
        assert store._fast is None
    finally:
        await store.close()


async def test_many_stores_racing_for_the_same_indexes(sqlite_url: str) -> None:
    stores = [await SqlStore.open(sqlite_url) for _ in range(3)]
    try:
        rid = await new_room(stores[0])
        for start in range(0, 30, 3):
            batches = [[entry(i, sender=n + 1) for i in range(start, start + 3)] for n in range(3)]
            results = await asyncio.wait_for(
                asyncio.gather(
                    *(s.append(rid, b) for s, b in zip(stores, batches, strict=True)),
                    return_exceptions=True,
                ),
                DEADLINE,
            )
            assert [
                r for r in results if r is not None and not isinstance(r, AppendConflict)
            ] == []
            winners = [n for n, r in enumerate(results) if r is None]
            assert len(winners) == 1, results
            for r in results:
                if isinstance(r, AppendConflict):
                    assert (r.expected, r.got) == (start + 3, start)
            stored = await stores[1].load_frames(rid, start, 3)
            assert {f.sender_id for f in stored} == {winners[0] + 1}
        state = await stores[2].load_room(rid)
        assert state is not None
        assert state.room.next_log_index == 30
    finally:
        for s in stores:
            await s.close()


async def test_appends_racing_sqlalchemy_writes(store: SqlStore, sqlite_url: str) -> None:
    other = await SqlStore.open(sqlite_url)
    try:
        rid = await new_room(store)
        alice = (await store.create_member("alice")).member_id

        async def appender(s: SqlStore, n: int) -> None:
            for _i in range(n):
                while True:  # two stores append to one room: the loser retries at the new end
                    state = await s.load_room(rid)
                    assert state is not None
                    try:
                        await s.append(rid, [entry(state.room.next_log_index)])
                        break
                    except AppendConflict:
                        continue

        async def sqlalchemy_writes(s: SqlStore, tag: str) -> None:
            for i in range(15):
                rid_n = room_id(1000 + i + (50 if tag == "b" else 0))
                await s.create_room(Room(rid_n, 0, 0, 1, 0), OWNER)
                await s.issue_token(alice)
                await s.put_welcome(rid, 7, b"w")
                await s.create_member(f"{tag}{i}")

        await asyncio.wait_for(
            asyncio.gather(
                appender(store, 40),
                appender(other, 40),
                sqlalchemy_writes(store, "a"),
                sqlalchemy_writes(other, "b"),
            ),
            DEADLINE,
        )
        state = await store.load_room(rid)
        assert state is not None
        assert state.room.next_log_index == 80
        assert [f.log_index for f in await store.load_frames(rid, 0, 100)] == list(range(80))
        assert len(await store.pending_welcomes(7)) == 30
        assert len(await store.rooms_of(HIGH)) == 31
        assert len(await store.list_members()) == 31
    finally:
        await other.close()


async def test_cancelled_writes_do_not_wedge_the_writer(store: SqlStore) -> None:
    rid = await new_room(store)
    for n in range(20):
        tasks = [
            asyncio.create_task(store.create_room(Room(room_id(100 + n), 0, 0, 1, 0), OWNER)),
            asyncio.create_task(store.append(rid, [entry(n)])),
        ]
        await asyncio.sleep(0)
        tasks[n % 2].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        state = await store.load_room(rid)
        assert state is not None
        if state.room.next_log_index == n:  # the cancelled append did not run: redo it
            await asyncio.wait_for(store.append(rid, [entry(n)]), DEADLINE)
    await asyncio.wait_for(store.issue_token((await store.create_member("x")).member_id), DEADLINE)
    assert [f.log_index for f in await store.load_frames(rid, 0, 100)] == list(range(20))


async def test_failure_mid_transaction_rolls_back_everything(db_url: str) -> None:
    # Both engines: a duplicate commit-index row (the epoch's commit is already indexed) fails the
    # transaction after the claim, the frames and the payloads were written.
    store = await SqlStore.open(db_url)
    try:
        rid = await new_room(store)
        await store.append(rid, [entry(0, opcode=COMMIT)], RoomChanges(1, 0))
        before = await store.load_room(rid)
        again = RoomChanges(
            new_epoch=2,
            commit_log_index=2,
            upsert_members=[RoomMember(5, Role.MEMBER, 1)],
            set_bans=[BanRecord(6, HIGH, "", None)],
        )
        with pytest.raises(sa.exc.IntegrityError) as failed:
            await store.append(rid, [entry(1), entry(2, opcode=COMMIT)], again)
        assert "payload" not in str(failed.value)
        assert await store.load_room(rid) == before
        assert [f.log_index for f in await store.load_frames(rid, 0, 10)] == [0]
        assert [f.log_index for f in await store.commits_between(rid, 0, 5)] == [0]
        # The store is still usable, from the same index.
        await store.append(rid, [entry(1), entry(2, opcode=COMMIT, epoch=1)], RoomChanges(2, 2))
        assert [f.log_index for f in await store.commits_between(rid, 0, 5)] == [0, 2]
    finally:
        await store.close()


async def test_errors_match_the_contract(store: SqlStore) -> None:
    rid = await new_room(store)
    with pytest.raises(NotFound):
        await store.append(room_id(9), [entry(0)])
    with pytest.raises(NotFound):
        await store.append(room_id(9), [], RoomChanges(upsert_members=[OWNER]))
    with pytest.raises(ValueError, match="not in this batch"):
        await store.append(rid, [entry(0)], RoomChanges(commit_log_index=3))
    with pytest.raises(StoreError) as bad_sender:
        await store.append(rid, [entry(0, sender=1 << 64)])
    assert "not a u64" in str(bad_sender.value.__cause__)
    with pytest.raises(StoreError):
        await store.append(rid, [], RoomChanges(remove_members=[-1]))
    await store.append(rid, [], RoomChanges(new_epoch=3))  # changes only, epoch moves
    state = await store.load_room(rid)
    assert state is not None
    assert (state.room.epoch, state.room.next_log_index) == (3, 0)


async def test_close_shuts_the_connection_and_the_thread(sqlite_url: str) -> None:
    store = await SqlStore.open(sqlite_url)
    rid = await new_room(store)
    await store.append(rid, [entry(0)])
    assert fast_thread_alive()
    await store.close()
    assert not fast_thread_alive()
    with pytest.raises(StoreError, match="closed"):
        await store.append(rid, [entry(1)])
    await store.close()  # twice is harmless


async def test_media_blocks_read_in_one_hop_see_every_committed_write(sqlite_url: str) -> None:
    """Blocks are read on the writer's read-only connection: they see the group commit's
    puts and a release made through SQLAlchemy, answer per digest asked (repeats, unknown
    digests and other rooms' blocks included), and the store refuses reads once closed."""
    store = await SqlStore.open(sqlite_url)
    rid, other = await new_room(store), await new_room(store, 2)
    blocks = {bytes([i]) * 32: bytes([i]) * (1000 + i) for i in range(3)}
    puts = [MediaPut(rid, d, data, HIGH) for d, data in blocks.items()]
    assert await store.media_put_many(puts) == [True, True, True]
    d0, d1, d2 = blocks
    unknown = b"\xff" * 32
    got = await store.media_get_many(rid, [d1, unknown, d0, d1])
    assert got == [blocks[d1], None, blocks[d0], blocks[d1]]
    assert await store.media_get_many(other, [d0]) == [None]
    assert await store.media_release(rid, [d1], None) == [d1]
    assert await store.media_get_many(rid, [d0, d1, d2]) == [blocks[d0], None, blocks[d2]]
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.media_get_many(rid, [d0])


_CHILD = """
import asyncio, sys
from kalandra_core.storage import LogEntry, Role, Room, RoomMember, SqlStore

async def main():
    store = await SqlStore.open(sys.argv[1])
    rid = (1).to_bytes(16, "big")
    await store.create_room(Room(rid, 0, 0, 1, 0), RoomMember(1, Role.OWNER, 0))
    i = 0
    while True:
        await store.append(rid, [LogEntry(i, 1, 1, 0, b"h" * 128, b"p%d" % i)])
        sys.stdout.write(f"{i}\\n")
        sys.stdout.flush()
        i += 1

asyncio.run(main())
"""


async def test_kill_9_loses_no_acknowledged_append(sqlite_url: str) -> None:
    # The child prints each index once its append returned; SIGKILL it mid-stream, then every
    # printed index must be in the log.
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD, sqlite_url, stdout=asyncio.subprocess.PIPE
    )
    assert child.stdout is not None
    acked = -1
    try:
        while acked < 200:
            line = await asyncio.wait_for(child.stdout.readline(), DEADLINE)
            assert line, "the child died"
            acked = int(line)
    finally:
        child.kill()  # SIGKILL
        rest = await child.stdout.read()
        await child.wait()
    assert child.returncode == -signal.SIGKILL
    acked = max([acked, *(int(x) for x in rest.split())])
    store = await SqlStore.open(sqlite_url)
    try:
        state = await store.load_room(room_id())
        assert state is not None
        assert state.room.next_log_index > acked
        frames = await store.load_frames(room_id(), 0, acked + 1)
        assert [f.payload for f in frames] == [b"p%d" % i for i in range(acked + 1)]
    finally:
        await store.close()
