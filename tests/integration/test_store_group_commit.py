"""Group commit of SQLite appends (``sqlite_writer.SqliteWriter``): appends of several rooms
that wait for the writer thread together are committed in one transaction, each in its own
savepoint; one that fails is rolled back alone; a crash before the COMMIT loses every append of
the group and none of them was acknowledged."""

from __future__ import annotations

import asyncio
import signal
import sys

import pytest
from integration.store_helpers import entry, new_room, room_id

from kalandra_core.storage import AppendConflict, NotFound, SqlStore

DEADLINE = 60  # seconds: only there to turn a deadlock into a failure, never a timing assert


async def _waiting_appends(store: SqlStore, count: int) -> None:
    """Until ``count`` appends wait for the (parked) writer thread."""
    assert store._fast is not None
    async with asyncio.timeout(DEADLINE):
        while True:  # the appends' tasks run at the next turns of the loop
            if len(store._fast._waiting) >= count:
                return
            await asyncio.sleep(0)


async def test_appends_waiting_together_commit_together_and_fail_alone(sqlite_url: str) -> None:
    store = await SqlStore.open(sqlite_url)
    try:
        rooms = [await new_room(store, n) for n in (1, 2, 3)]
        await store.append(rooms[1], [entry(0)])
        fast = store._fast
        assert fast is not None
        async with fast.exclusive():  # the writer thread is parked: the appends queue up
            tasks = [
                asyncio.create_task(store.append(rooms[0], [entry(0), entry(1)])),
                asyncio.create_task(store.append(rooms[1], [entry(0)])),  # index 0 is taken
                asyncio.create_task(store.append(room_id(9), [entry(0)])),  # no such room
                asyncio.create_task(store.append(rooms[2], [entry(0)])),
            ]
            await _waiting_appends(store, 4)
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), DEADLINE)
        assert results[0] is None
        assert results[3] is None
        assert isinstance(results[1], AppendConflict)
        assert isinstance(results[2], NotFound)
        assert [f.log_index for f in await store.load_frames(rooms[0], 0, 10)] == [0, 1]
        assert [f.log_index for f in await store.load_frames(rooms[1], 0, 10)] == [0]
        assert [f.log_index for f in await store.load_frames(rooms[2], 0, 10)] == [0]
        # The failed ones left nothing behind: the rooms go on from where they were.
        await store.append(rooms[1], [entry(1)])
        state = await store.load_room(rooms[1])
        assert state is not None
        assert state.room.next_log_index == 2
    finally:
        await store.close()


async def test_a_cancelled_append_is_left_out_of_its_group(sqlite_url: str) -> None:
    store = await SqlStore.open(sqlite_url)
    try:
        rooms = [await new_room(store, n) for n in (1, 2)]
        fast = store._fast
        assert fast is not None
        async with fast.exclusive():
            kept = asyncio.create_task(store.append(rooms[0], [entry(0)]))
            dropped = asyncio.create_task(store.append(rooms[1], [entry(0)]))
            await _waiting_appends(store, 2)
            dropped.cancel()
        await asyncio.wait_for(kept, DEADLINE)
        with pytest.raises(asyncio.CancelledError):
            await dropped
        assert await store.load_frames(rooms[1], 0, 10) == []
        await store.append(rooms[1], [entry(0)])
    finally:
        await store.close()


_CHILD = """
import asyncio, os, signal, sys
from kalandra_core.storage import LogEntry, Role, Room, RoomMember, SqlStore

def entry(i):
    return LogEntry(i, 1, 1, 0, b"h" * 128, b"p%d" % i)

async def main():
    store = await SqlStore.open(sys.argv[1])
    rooms = [n.to_bytes(16, "big") for n in (1, 2, 3)]
    for rid in rooms:
        await store.create_room(Room(rid, 0, 0, 1, 0), RoomMember(1, Role.OWNER, 0))
        await store.append(rid, [entry(0)])
        print("acked", rid[-1], 0, flush=True)
    fast = store._fast

    def die_at_commit(statement):
        if statement == "COMMIT":  # the group's rows are written, not committed
            os.kill(os.getpid(), signal.SIGKILL)

    await fast._run(lambda: fast._connection().set_trace_callback(die_at_commit))

    async def one(rid):
        await store.append(rid, [entry(1), entry(2)])
        print("acked", rid[-1], 1, flush=True)

    async with fast.exclusive():
        tasks = [asyncio.create_task(one(rid)) for rid in rooms]
        while len(fast._waiting) < len(rooms):
            await asyncio.sleep(0)
        print("grouped", len(fast._waiting), flush=True)
    await asyncio.gather(*tasks)
    print("survived", flush=True)

asyncio.run(main())
"""


async def test_a_crash_before_the_group_commits_loses_it_all_and_acked_nothing(
    sqlite_url: str,
) -> None:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD, sqlite_url, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(child.communicate(), DEADLINE)
    assert child.returncode == -signal.SIGKILL, out
    lines = out.decode().splitlines()
    assert lines == ["acked 1 0", "acked 2 0", "acked 3 0", "grouped 3"]
    store = await SqlStore.open(sqlite_url)
    try:
        for n in (1, 2, 3):
            frames = await store.load_frames(room_id(n), 0, 10)
            assert [f.payload for f in frames] == [b"p0"]
            state = await store.load_room(room_id(n))
            assert state is not None
            assert state.room.next_log_index == 1
    finally:
        await store.close()
