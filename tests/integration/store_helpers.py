"""What the store suites share: ids at the edges of u64, log entries, rooms to append to."""

from __future__ import annotations

from typing import Any

import pytest

from kalandra_core.storage import LogEntry, Role, Room, RoomMember, RoomState
from kalandra_core.storage.base import Store

COMMIT = 0x0201  # any opcode value works; the store does not interpret it
APP = 0x0301
HIGH = (1 << 64) - 1  # u64 ids above 2**63 land in negative BIGINTs
MID = 1 << 63
OWNER = RoomMember(HIGH, Role.OWNER, 0)

# The SQL engines, as fixture params: each names its fresh-database fixture `<name>_url`.
SQL_ENGINES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def room_id(n: int = 1) -> bytes:
    return n.to_bytes(16, "big")


def entry(i: int, *, epoch: int = 0, opcode: int = APP, sender: int = HIGH) -> LogEntry:
    return LogEntry(i, opcode, sender, epoch, i.to_bytes(8, "big") * 16, b"payload-%d" % i)


def entries(start: int, count: int, **kw: int) -> list[LogEntry]:
    return [entry(i, **kw) for i in range(start, start + count)]


async def new_room(store: Store, n: int = 1, **kw: Any) -> bytes:
    rid = room_id(n)
    await store.create_room(Room(rid, 0, 0, HIGH, 1_700_000_000_000, **kw), OWNER)
    return rid


async def state_of(store: Store, rid: bytes) -> RoomState:
    state = await store.load_room(rid)
    assert state is not None
    return state
