"""MemoryStore keeps SqlStore's semantics: the checks of test_store.py that do not look at a
database, run against the in-memory store (copied, so test_store.py stays the SQL suite)."""

from __future__ import annotations

import hashlib
import random
from dataclasses import replace
from typing import Any

import pytest

from kalandra_core.storage import (
    AlreadyExists,
    AppendConflict,
    Ban,
    Handshake,
    LogEntry,
    NotFound,
    Role,
    Room,
    RoomChanges,
    RoomMember,
    RoomState,
    StoreError,
)
from kalandra_core.storage.base import Store
from kalandra_core.storage.memory import MemoryStore

COMMIT = 0x0201
APP = 0x0301
HIGH = (1 << 64) - 1
MID = 1 << 63
OWNER = RoomMember(HIGH, Role.OWNER, 0)


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


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


async def test_members(store: MemoryStore) -> None:
    alice = await store.create_member("alice")
    assert 0 < alice.member_id < 1 << 64
    assert alice.signature_key is None
    with pytest.raises(AlreadyExists):
        await store.create_member("alice")
    bob = await store.create_member("bob")
    assert await store.get_member(alice.member_id) == alice
    assert await store.find_member("bob") == bob
    assert await store.find_member("carol") is None
    assert await store.get_member(12345) is None
    assert [m.name for m in await store.list_members()] == ["alice", "bob"]
    await store.set_signature_key(bob.member_id, b"\x01" * 32)
    assert await store.get_member(bob.member_id) == replace(bob, signature_key=b"\x01" * 32)
    with pytest.raises(NotFound):
        await store.set_signature_key(12345, b"k")


async def test_seeded_ids_repeat() -> None:
    a, b = MemoryStore(rng=random.Random(7)), MemoryStore(rng=random.Random(7))
    ids = [(await a.create_member(f"m{i}")).member_id for i in range(5)]
    assert ids == [(await b.create_member(f"m{i}")).member_id for i in range(5)]
    assert await a.issue_token(ids[0]) == await b.issue_token(ids[0])


async def test_ids_at_the_edges_of_u64(store: MemoryStore) -> None:
    rid = await new_room(store)
    edge = RoomMember(MID, Role.MODERATOR, 7)
    ban = Ban(MID - 1, HIGH, "spam", None)
    await store.append(
        rid, [entry(0, sender=MID)], RoomChanges(upsert_members=[edge], set_bans=[ban])
    )
    state = await state_of(store, rid)
    assert state.room.creator == HIGH
    assert state.members == {HIGH: OWNER, MID: edge}
    assert state.bans == {MID - 1: ban}
    assert (await store.load_frames(rid, 0, 1))[0].sender_id == MID
    assert await store.rooms_of(HIGH) == [rid] == await store.rooms_of(MID)


async def test_tokens_are_stored_hashed(store: MemoryStore) -> None:
    alice, bob = [(await store.create_member(n)).member_id for n in ("alice", "bob")]
    t1, t2 = await store.issue_token(alice), await store.issue_token(alice)
    tb = await store.issue_token(bob)
    assert len({t1, t2, tb}) == 3
    assert len(t1) >= 43
    assert await store.authenticate(t1) == alice
    assert await store.authenticate(tb) == bob
    assert await store.authenticate("not-a-token") is None
    assert await store.authenticate("") is None
    assert set(store._tokens) == {hashlib.sha256(t.encode()).digest() for t in (t1, t2, tb)}
    assert await store.revoke_tokens(alice) == 2
    assert await store.authenticate(t1) is None
    assert await store.authenticate(t2) is None
    assert await store.authenticate(tb) == bob
    assert await store.revoke_tokens(alice) == 0
    t3 = await store.issue_token(alice)
    assert await store.authenticate(t3) == alice
    with pytest.raises(NotFound):
        await store.issue_token(12345)


async def test_rooms(store: MemoryStore) -> None:
    rid = await new_room(store, handshake=Handshake.PRIVATE, group_id=b"g", name="n", topic="t")
    with pytest.raises(AlreadyExists):
        await new_room(store)
    with pytest.raises(ValueError, match="16 bytes"):
        await store.create_room(Room(b"short", 0, 0, HIGH, 0), OWNER)
    state = await state_of(store, rid)
    assert state.room == Room(
        rid, 0, 0, HIGH, 1_700_000_000_000, Handshake.PRIVATE, b"g", "n", "t"
    )
    assert state.members == {HIGH: OWNER}
    assert state.bans == {}
    assert await store.load_room(room_id(99)) is None
    other = await new_room(store, 2)
    assert await store.rooms_of(HIGH) == [rid, other]
    assert await store.rooms_of(5) == []
    await store.update_room_metadata(rid, name="new", topic="")
    state = await state_of(store, rid)
    assert (state.room.name, state.room.topic) == ("new", "")
    with pytest.raises(NotFound):
        await store.update_room_metadata(room_id(99), name="x", topic="y")


async def test_append_is_strict_and_dense(store: MemoryStore) -> None:
    rid = await new_room(store)
    await store.append(rid, entries(0, 3))
    with pytest.raises(AppendConflict) as gap:
        await store.append(rid, entries(5, 1))
    assert (gap.value.expected, gap.value.got) == (3, 5)
    with pytest.raises(AppendConflict) as dup:
        await store.append(rid, entries(2, 2))
    assert (dup.value.expected, dup.value.got) == (3, 2)
    with pytest.raises(AppendConflict):
        await store.append(rid, [entry(3), entry(5)])
    with pytest.raises(AppendConflict):
        await store.append(rid, [entry(3), entry(3)])
    with pytest.raises(NotFound):
        await store.append(room_id(99), entries(0, 1))
    frames = await store.load_frames(rid, 0, 100)
    assert [f.log_index for f in frames] == [0, 1, 2]
    assert [f.payload for f in frames] == [b"payload-0", b"payload-1", b"payload-2"]
    assert (await state_of(store, rid)).room.next_log_index == 3
    await store.append(rid, entries(3, 2))
    assert [f.log_index for f in await store.load_frames(rid, 0, 100)] == [0, 1, 2, 3, 4]


async def test_load_frames_ranges(store: MemoryStore) -> None:
    rid = await new_room(store)
    assert await store.load_frames(rid, 0, 10) == []
    batch = entries(0, 10, sender=MID)
    await store.append(rid, batch)
    frames = await store.load_frames(rid, 3, 4)
    assert [f.log_index for f in frames] == [3, 4, 5, 6]
    f = frames[0]
    assert (f.room_id, f.opcode, f.sender_id, f.epoch) == (rid, APP, MID, 0)
    assert f.encode() == batch[3].header + batch[3].payload
    assert [x.log_index for x in await store.load_frames(rid, 8, 100)] == [8, 9]
    assert await store.load_frames(rid, 10, 5) == []
    assert await store.load_frames(rid, 0, 0) == []
    assert await store.load_frames(room_id(99), 0, 5) == []


async def test_room_changes_commit_with_the_append(store: MemoryStore) -> None:
    rid = await new_room(store)
    bob, carol = RoomMember(2, Role.MEMBER, 1), RoomMember(3, Role.MEMBER, 2)
    await store.append(rid, entries(0, 1), RoomChanges(upsert_members=[bob, carol]))
    bob2, dave = RoomMember(2, Role.MODERATOR, 1), RoomMember(4, Role.MEMBER, 3)
    ban = Ban(3, HIGH, "spam", 1_800_000_000_000)
    changes = RoomChanges(1, 2, upsert_members=[bob2, dave], remove_members=[3], set_bans=[ban])
    await store.append(rid, [entry(1), entry(2, opcode=COMMIT)], changes)
    state = await state_of(store, rid)
    assert (state.room.epoch, state.room.next_log_index) == (1, 3)
    assert state.members == {HIGH: OWNER, 2: bob2, 4: dave}
    assert state.bans == {3: ban}
    assert [f.log_index for f in await store.commits_between(rid, 0, 1)] == [2]
    await store.append(
        rid, entries(3, 1, epoch=1), RoomChanges(set_bans=[Ban(3, 2, "again", None)])
    )
    assert (await state_of(store, rid)).bans == {3: Ban(3, 2, "again", None)}
    again = RoomChanges(
        lift_bans=[3], remove_members=[4], upsert_members=[RoomMember(4, Role.MEMBER, 9)]
    )
    await store.append(rid, entries(4, 1, epoch=1), again)
    state = await state_of(store, rid)
    assert state.bans == {}
    assert state.members[4] == RoomMember(4, Role.MEMBER, 9)


async def test_changes_without_frames(store: MemoryStore) -> None:
    rid = await new_room(store)
    await store.append(rid, entries(0, 2))
    await store.append(rid, [], RoomChanges(upsert_members=[RoomMember(5, Role.MEMBER, None)]))
    state = await state_of(store, rid)
    assert state.members[5] == RoomMember(5, Role.MEMBER, None)
    assert state.room.next_log_index == 2
    await store.append(rid, [])
    with pytest.raises(NotFound):
        await store.append(room_id(99), [], RoomChanges(remove_members=[5]))
    with pytest.raises(ValueError, match="not in this batch"):
        await store.append(rid, [], RoomChanges(commit_log_index=2))
    await store.append(rid, entries(2, 1))


async def test_failed_append_writes_nothing_at_all(store: MemoryStore) -> None:
    rid = await new_room(store)
    await store.append(rid, entries(0, 1))
    before = await store.load_room(rid)
    changes = RoomChanges(1, 5, upsert_members=[RoomMember(2, Role.MEMBER, 1)])
    with pytest.raises(AppendConflict):
        await store.append(rid, [entry(5, opcode=COMMIT)], changes)
    bad = RoomChanges(new_epoch=1, commit_log_index=1, set_bans=[Ban(1 << 64, HIGH, "", None)])
    secret = LogEntry(1, COMMIT, HIGH, 0, b"\x00" * 128, b"secret-payload")
    with pytest.raises(StoreError) as failed:
        await store.append(rid, [secret], bad)
    assert "not a u64" in str(failed.value.__cause__)
    assert "secret-payload" not in str(failed.value.__cause__)
    assert await store.load_room(rid) == before
    assert [f.log_index for f in await store.load_frames(rid, 0, 10)] == [0]
    assert await store.commits_between(rid, 0, 10) == []
    with pytest.raises(ValueError, match="not in this batch"):
        await store.append(rid, entries(1, 1), RoomChanges(commit_log_index=0))
    await store.append(rid, [entry(1, opcode=COMMIT)], RoomChanges(1, 1))


async def test_returned_state_is_a_copy(store: MemoryStore) -> None:
    rid = await new_room(store)
    state = await state_of(store, rid)
    state.members[7] = RoomMember(7, Role.MEMBER, 1)
    assert (await state_of(store, rid)).members == {HIGH: OWNER}


async def test_redaction_keeps_the_header(store: MemoryStore) -> None:
    rid = await new_room(store)
    batch = entries(0, 3)
    await store.append(rid, batch)
    assert await store.redact(rid, 1) is True
    frames = await store.load_frames(rid, 0, 3)
    assert [f.payload for f in frames] == [b"payload-0", None, b"payload-2"]
    assert frames[1].header == batch[1].header
    assert frames[1].encode() == batch[1].header
    assert await store.redact(rid, 1) is True
    assert await store.redact(rid, 3) is False
    assert await store.redact(room_id(99), 0) is False
    await store.append(rid, entries(3, 1))


async def test_commits_between(store: MemoryStore) -> None:
    rid = await new_room(store)
    index = 0
    commit_at: dict[int, int] = {}
    for epoch in range(4):
        await store.append(rid, entries(index, 2, epoch=epoch))
        index += 2
        commit_at[epoch] = index
        changes = RoomChanges(new_epoch=epoch + 1, commit_log_index=index)
        await store.append(rid, [entry(index, epoch=epoch, opcode=COMMIT)], changes)
        index += 1
    await store.redact(rid, commit_at[3])

    async def between(a: int, b: int) -> list[int]:
        return [f.log_index for f in await store.commits_between(rid, a, b)]

    assert await between(0, 4) == [commit_at[e] for e in range(4)]
    assert await between(1, 3) == [commit_at[1], commit_at[2]]
    assert await between(4, 9) == []
    assert await between(3, 3) == []
    assert await between(3, 1) == []
    frames = await store.commits_between(rid, 2, 4)
    assert [(f.opcode, f.epoch) for f in frames] == [(COMMIT, 2), (COMMIT, 3)]
    assert frames[0].payload == b"payload-%d" % commit_at[2]
    assert frames[1].payload is None
    assert (await state_of(store, rid)).room.epoch == 4


async def test_welcome_mailbox(store: MemoryStore) -> None:
    rid = await new_room(store)
    w1 = await store.put_welcome(rid, HIGH, b"welcome-1")
    w2 = await store.put_welcome(rid, HIGH, b"welcome-2")
    w3 = await store.put_welcome(rid, 7, b"welcome-3")
    assert len({w1, w2, w3}) == 3
    pending = await store.pending_welcomes(HIGH)
    assert [(w.welcome_id, w.room_id, w.recipient_id, w.frame) for w in pending] == [
        (w1, rid, HIGH, b"welcome-1"),
        (w2, rid, HIGH, b"welcome-2"),
    ]
    assert [w.frame for w in await store.pending_welcomes(7)] == [b"welcome-3"]
    assert await store.pending_welcomes(8) == []
    await store.welcome_delivered(w1)
    await store.welcome_delivered(w1)
    assert [w.welcome_id for w in await store.pending_welcomes(HIGH)] == [w2]
    w4 = await store.put_welcome(rid, HIGH, b"welcome-4")
    assert w4 not in {w1, w2, w3}
    with pytest.raises(NotFound):
        await store.put_welcome(room_id(99), HIGH, b"w")


async def test_key_packages(store: MemoryStore) -> None:
    alice, bob = [(await store.create_member(n)).member_id for n in ("alice", "bob")]
    assert await store.key_package_count(alice) == 0
    assert await store.take_key_package(alice) is None
    assert await store.publish_key_packages(alice, [b"a", b"b", b"c"]) == 3
    assert await store.publish_key_packages(alice, [b"b", b"d", b"d"]) == 4
    assert await store.publish_key_packages(alice, []) == 4
    assert await store.publish_key_packages(bob, [b"a"]) == 1
    taken = [await store.take_key_package(alice) for _ in range(5)]
    assert taken == [b"a", b"b", b"c", b"d", None]
    assert await store.key_package_count(alice) == 0
    assert await store.key_package_count(bob) == 1
    assert await store.publish_key_packages(alice, [b"a"]) == 1
    with pytest.raises(NotFound):
        await store.publish_key_packages(12345, [b"x"])


async def test_group_info(store: MemoryStore) -> None:
    rid = await new_room(store)
    assert await store.get_group_info(rid) is None
    await store.put_group_info(rid, 1, b"gi-1")
    assert await store.get_group_info(rid) == (1, b"gi-1")
    await store.put_group_info(rid, 3, b"gi-3")
    await store.put_group_info(rid, 2, b"gi-2")
    assert await store.get_group_info(rid) == (3, b"gi-3")
    await store.put_group_info(rid, 3, b"gi-3b")
    assert await store.get_group_info(rid) == (3, b"gi-3b")
    with pytest.raises(NotFound):
        await store.put_group_info(room_id(99), 1, b"x")
